//! `/metrics` for the fleet: every target's latest scrape rendered ahead of time, so that a
//! Prometheus scrape copies bytes and never waits on a database.
//!
//! Each target gets `tenant` and `instance` labels (names, never URLs) and at most
//! `series_per_target` series; what the budget cuts is counted in
//! `keel_target_series_dropped`. `keel_target_up` and the scrape duration are always there.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::catalog::{self as c, FAMILIES, Kind, Sample};
use crate::store::{self, TargetView};

/// The rendered exposition, swapped whole at each refresh.
#[derive(Debug, Default)]
pub struct FleetExposition {
    rendered: RwLock<Rendered>,
}

#[derive(Debug, Default, Clone)]
struct Rendered {
    openmetrics: Bytes,
    /// `openmetrics` gzipped: what Prometheus asks for.
    openmetrics_gzip: Bytes,
    prometheus_text: Bytes,
}

impl keel_server::Exposition for FleetExposition {
    fn openmetrics(&self) -> Bytes {
        self.rendered
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .openmetrics
            .clone()
    }

    fn prometheus_text(&self) -> Bytes {
        self.rendered
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .prometheus_text
            .clone()
    }

    fn openmetrics_gzip(&self) -> Option<Bytes> {
        Some(
            self.rendered
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .openmetrics_gzip
                .clone(),
        )
    }
}

impl FleetExposition {
    /// Renders `targets` and serves the result from now on.
    pub(crate) fn update(&self, targets: &[&TargetView], series_per_target: usize) {
        let openmetrics = render(targets, series_per_target, true);
        let prometheus_text = render(targets, series_per_target, false);
        // Compressed here, once per refresh, rather than for every scrape.
        let openmetrics_gzip = keel_server::gzip(openmetrics.as_bytes());
        *self
            .rendered
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Rendered {
            openmetrics: openmetrics.into(),
            openmetrics_gzip,
            prometheus_text: prometheus_text.into(),
        };
    }

    /// Re-renders from the state store every `every` until `stop`, reading again only the
    /// targets scraped since the last time (a target's latest scrape is tens of kB of JSON).
    pub(crate) async fn refresh(
        self: Arc<Self>,
        pool: PgPool,
        every: Duration,
        series_per_target: usize,
        stop: CancellationToken,
    ) {
        let mut known: HashMap<Uuid, (Option<DateTime<Utc>>, TargetView)> = HashMap::new();
        loop {
            match refresh_views(&pool, &mut known).await {
                Ok(()) => {
                    let mut views: Vec<&TargetView> = known.values().map(|(_, v)| v).collect();
                    views.sort_by(|a, b| (&a.tenant, &a.name).cmp(&(&b.tenant, &b.name)));
                    self.update(&views, series_per_target);
                }
                Err(error) => {
                    tracing::warn!(%error, "refreshing the fleet's metrics failed; serving the previous ones")
                }
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
        }
    }
}

/// Brings `known` in step with the state store: gone targets out, scraped ones read again.
async fn refresh_views(
    pool: &PgPool,
    known: &mut HashMap<Uuid, (Option<DateTime<Utc>>, TargetView)>,
) -> Result<(), sqlx::Error> {
    let stamps = store::view_stamps(pool).await?;
    let current: HashSet<Uuid> = stamps.iter().map(|(id, _)| *id).collect();
    known.retain(|id, _| current.contains(id));
    let changed: Vec<Uuid> = stamps
        .iter()
        .filter(|(id, at)| known.get(id).is_none_or(|(seen, _)| seen != at))
        .map(|(id, _)| *id)
        .collect();
    // In pages, so one refresh after a restart does not read the whole fleet in one answer.
    for page in changed.chunks(100) {
        for view in store::views(pool, page).await? {
            known.insert(view.instance_id, (view.scraped_at, view));
        }
    }
    Ok(())
}

/// The text of every family, OpenMetrics or Prometheus 0.0.4 (they differ in counter names).
pub(crate) fn render(
    targets: &[&TargetView],
    series_per_target: usize,
    openmetrics: bool,
) -> String {
    let index: HashMap<&str, usize> = FAMILIES
        .iter()
        .enumerate()
        .map(|(i, f)| (f.name, i))
        .collect();
    // Per family, the (target, sample) pairs to write.
    let mut by_family: Vec<Vec<(&TargetView, &Sample)>> = vec![Vec::new(); FAMILIES.len()];
    let mut own: Vec<Sample> = Vec::with_capacity(targets.len() * 3);
    let mut own_owner: Vec<usize> = Vec::with_capacity(targets.len() * 3);
    for (t, &target) in targets.iter().enumerate() {
        let mut budget = series_per_target;
        let mut dropped = 0usize;
        for sample in &target.latest {
            // The collector's own series of the target are written below, always.
            if sample.name == c::UP || sample.name == c::SCRAPE_DURATION {
                continue;
            }
            let Some(&family) = index.get(sample.name.as_str()) else {
                continue;
            };
            if !FAMILIES[family].exposed() {
                continue;
            }
            if budget == 0 {
                dropped += 1;
                continue;
            }
            budget -= 1;
            by_family[family].push((target, sample));
        }
        if target.up.is_some() {
            own.push(Sample::new(
                c::UP,
                f64::from(u8::from(target.up == Some(true))),
            ));
            own_owner.push(t);
            if let Some(ms) = target.duration_ms {
                own.push(Sample::new(c::SCRAPE_DURATION, ms / 1e3));
                own_owner.push(t);
            }
        }
        own.push(Sample::new(c::SERIES_DROPPED, dropped as f64));
        own_owner.push(t);
    }
    for (sample, &t) in own.iter().zip(&own_owner) {
        if let Some(&family) = index.get(sample.name.as_str()) {
            by_family[family].push((targets[t], sample));
        }
    }

    let mut out = String::with_capacity(by_family.iter().map(|f| f.len() * 96 + 128).sum());
    for (family, series) in FAMILIES.iter().zip(&by_family) {
        if series.is_empty() {
            continue;
        }
        let (typed, sample_name) = match (family.kind, openmetrics) {
            (Kind::Counter, true) => (family.name.to_owned(), format!("{}_total", family.name)),
            (Kind::Counter, false) => (
                format!("{}_total", family.name),
                format!("{}_total", family.name),
            ),
            (Kind::Gauge, _) => (family.name.to_owned(), family.name.to_owned()),
        };
        let kind = match family.kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
        };
        let _ = writeln!(out, "# HELP {typed} {}.", escape_help(family.help));
        let _ = writeln!(out, "# TYPE {typed} {kind}");
        for (target, sample) in series {
            out.push_str(&sample_name);
            out.push_str("{tenant=\"");
            escape_label(&mut out, &target.tenant);
            out.push_str("\",instance=\"");
            escape_label(&mut out, &target.name);
            out.push('"');
            for (k, v) in &sample.labels {
                out.push(',');
                out.push_str(k);
                out.push_str("=\"");
                escape_label(&mut out, v);
                out.push('"');
            }
            out.push_str("} ");
            write_value(&mut out, sample.value);
            out.push('\n');
        }
    }
    out
}

fn escape_help(help: &str) -> String {
    help.replace('\\', "\\\\").replace('\n', "\\n")
}

fn escape_label(out: &mut String, value: &str) {
    for ch in value.chars() {
        match ch {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            ch => out.push(ch),
        }
    }
}

fn write_value(out: &mut String, v: f64) {
    if v.is_nan() {
        out.push_str("NaN");
    } else if v.is_infinite() {
        out.push_str(if v > 0.0 { "+Inf" } else { "-Inf" });
    } else if v.fract() == 0.0 && v.abs() < 1e15 {
        let _ = write!(out, "{}", v as i64);
    } else {
        let _ = write!(out, "{v}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Engine;

    fn target(name: &str, samples: Vec<Sample>) -> TargetView {
        TargetView {
            instance_id: uuid::Uuid::now_v7(),
            tenant: "acme".into(),
            name: name.into(),
            engine: Engine::Postgres,
            next_run_at: chrono::Utc::now(),
            scraped_at: Some(chrono::Utc::now()),
            duration_ms: Some(12.5),
            up: Some(true),
            problems: Vec::new(),
            latest: samples,
        }
    }

    #[test]
    fn families_are_typed_and_labelled_with_names() {
        let t = target(
            "shop\"db",
            vec![
                Sample::new(c::UP, 1.0),
                Sample::new(c::PG_COMMITS, 42.0),
                Sample::labelled(c::PG_CONNECTIONS, &[("state", "active")], 3.0),
            ],
        );
        let om = render(&[&t], 100, true);
        assert!(
            om.contains("# TYPE keel_pg_transactions_committed counter\n"),
            "{om}"
        );
        assert!(
            om.contains(
                "keel_pg_transactions_committed_total{tenant=\"acme\",instance=\"shop\\\"db\"} 42\n"
            ),
            "{om}"
        );
        assert!(
            om.contains(
                "keel_pg_connections{tenant=\"acme\",instance=\"shop\\\"db\",state=\"active\"} 3\n"
            ),
            "{om}"
        );
        assert!(
            om.contains("keel_target_up{tenant=\"acme\",instance=\"shop\\\"db\"} 1\n"),
            "{om}"
        );
        assert!(om.contains("keel_target_scrape_duration_seconds{tenant=\"acme\",instance=\"shop\\\"db\"} 0.0125\n"), "{om}");
        assert_eq!(om.matches("keel_target_up{").count(), 1, "{om}");
        let text = render(&[&t], 100, false);
        assert!(
            text.contains("# TYPE keel_pg_transactions_committed_total counter\n"),
            "{text}"
        );
    }

    #[test]
    fn the_budget_cuts_series_and_says_how_many() {
        let many: Vec<Sample> = (0..50)
            .map(|i| Sample::labelled(c::PG_TABLE_SIZE, &[("table", &format!("t{i}"))], 1.0))
            .collect();
        let om = render(&[&target("big", many)], 10, true);
        assert_eq!(om.matches("keel_pg_table_size_bytes{").count(), 10, "{om}");
        assert!(
            om.contains("keel_target_series_dropped{tenant=\"acme\",instance=\"big\"} 40\n"),
            "{om}"
        );
        assert!(
            om.contains("keel_target_up{tenant=\"acme\",instance=\"big\"} 1\n"),
            "{om}"
        );
    }
}
