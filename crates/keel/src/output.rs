//! Rendering results as tables for people or JSON for scripts, and writing them.
//!
//! Everything goes through [`print`], never `println!`: when the reader of standard output
//! goes away (`keel … | head`) the command stops quietly instead of panicking.

use std::io::Write as _;

use keel_proto::v1::{
    Alert, CheckFinding, CheckStatus, Engine, Event, Instance, InstanceHealth, InstanceRole,
    Metric, ScrapeStatus, Series, TopQuery, event,
};
use keel_proto::v1::{
    Analysis, AnalysisState, Recommendation, RecommendationKind, RecommendationState,
    StatementEffect, StatementOutcome,
};
use serde_json::{Value, json};

use crate::failure::PipeClosed;
use crate::table::{Column, Layout, Table};

/// Writes `text` and a newline to standard output. A closed pipe is [`PipeClosed`], which
/// `main` turns into a quiet exit.
pub(crate) fn print(text: impl std::fmt::Display) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{text}")
        .and_then(|()| stdout.flush())
        .map_err(|error| match error.kind() {
            std::io::ErrorKind::BrokenPipe => anyhow::Error::new(PipeClosed),
            _ => anyhow::Error::new(error).context("cannot write to standard output"),
        })
}

/// Writes a line for people to standard error; nothing to do if that fails.
pub(crate) fn note(text: impl std::fmt::Display) {
    let _ = writeln!(std::io::stderr().lock(), "{text}");
}

pub(crate) fn engine(raw: i32) -> &'static str {
    match Engine::try_from(raw) {
        Ok(Engine::Postgres) => "postgres",
        Ok(Engine::Redis) => "redis",
        _ => "unspecified",
    }
}

fn role(raw: i32) -> &'static str {
    match InstanceRole::try_from(raw) {
        Ok(InstanceRole::Primary) => "primary",
        Ok(InstanceRole::Replica) => "replica",
        _ => "",
    }
}

fn status(raw: i32) -> &'static str {
    match CheckStatus::try_from(raw) {
        Ok(CheckStatus::Ok) => "ok",
        Ok(CheckStatus::Warning) => "warning",
        Ok(CheckStatus::Missing) => "missing",
        _ => "unspecified",
    }
}

fn datetime(ts: Option<&prost_types::Timestamp>) -> Option<chrono::DateTime<chrono::Utc>> {
    ts.and_then(|t| chrono::DateTime::from_timestamp(t.seconds, t.nanos.max(0) as u32))
}

fn time(ts: Option<&prost_types::Timestamp>) -> Value {
    datetime(ts)
        .map(|t| Value::String(t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)))
        .unwrap_or(Value::Null)
}

fn labels_text(instance: &Instance) -> String {
    let mut labels: Vec<String> = instance
        .labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    labels.sort();
    labels.join(",")
}

fn health_text(health: Option<&InstanceHealth>) -> String {
    match health {
        Some(h) if h.last_check_time.is_some() && h.reachable => format!("up {}", role(h.role)),
        Some(h) if h.last_check_time.is_some() => "down".to_owned(),
        _ => "unchecked".to_owned(),
    }
}

pub(crate) fn health_json(health: Option<&InstanceHealth>) -> Value {
    let Some(h) = health else { return Value::Null };
    json!({
        "last_check_time": time(h.last_check_time.as_ref()),
        "reachable": h.reachable,
        "server_version": h.server_version,
        "role": role(h.role),
        "error": h.error,
        "latency_ms": h.latency.as_ref().map(|d| d.seconds as f64 * 1e3 + f64::from(d.nanos) / 1e6),
    })
}

pub(crate) fn instance_json(instance: &Instance) -> Value {
    json!({
        "id": instance.id,
        "tenant": instance.tenant,
        "name": instance.name,
        "engine": engine(instance.engine),
        "connection_url": instance.connection_url,
        "environment": instance.environment,
        "labels": instance.labels,
        "monitoring_endpoints": instance.monitoring_endpoints.iter()
            .map(|e| json!({"kind": e.kind, "url": e.url})).collect::<Vec<_>>(),
        "health": health_json(instance.health.as_ref()),
        "version": instance.version,
        "create_time": time(instance.create_time.as_ref()),
        "update_time": time(instance.update_time.as_ref()),
    })
}

/// Instances, one a row; `-o wide` adds the URL's full form, version and id.
pub(crate) fn instances_table(instances: &[Instance], layout: Layout) -> String {
    if instances.is_empty() {
        return "no instances".to_owned();
    }
    let mut t = Table::new(&[
        // Dropped first when they do not fit: URL, ENV, LABELS, ENGINE, HEALTH.
        Column::keep("NAME"),
        Column::optional("ENGINE", 2),
        Column::optional("ENV", 4),
        Column::optional("HEALTH", 1),
        Column::optional("LABELS", 3).wrapping(),
        Column::optional("URL", 5),
        Column::wide("VERSION"),
        Column::wide("ID"),
    ]);
    for i in instances {
        t.row(vec![
            i.name.clone(),
            engine(i.engine).to_owned(),
            i.environment.clone(),
            health_text(i.health.as_ref()),
            labels_text(i),
            i.connection_url.clone(),
            i.version.to_string(),
            i.id.clone(),
        ]);
    }
    t.render(layout)
}

/// One instance, a field a line; long values wrap between words.
pub(crate) fn instance_details(i: &Instance, layout: Layout) -> String {
    let mut t = Table::headless(&[Column::keep("FIELD"), Column::keep("VALUE").wrapping()]);
    let health = i.health.as_ref();
    let rows: Vec<(&str, String)> = vec![
        ("id:", i.id.clone()),
        ("name:", i.name.clone()),
        ("tenant:", i.tenant.clone()),
        ("engine:", engine(i.engine).to_owned()),
        ("connection_url:", i.connection_url.clone()),
        ("environment:", i.environment.clone()),
        ("labels:", labels_text(i)),
        (
            "monitoring:",
            i.monitoring_endpoints
                .iter()
                .map(|e| format!("{}={}", e.kind, e.url))
                .collect::<Vec<_>>()
                .join(" "),
        ),
        ("health:", health_text(health)),
        (
            "server_version:",
            health.map(|h| h.server_version.clone()).unwrap_or_default(),
        ),
        (
            "last_error:",
            health.map(|h| h.error.clone()).unwrap_or_default(),
        ),
        ("version:", i.version.to_string()),
        (
            "created:",
            time(i.create_time.as_ref())
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        ),
        (
            "updated:",
            time(i.update_time.as_ref())
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        ),
    ];
    for (field, value) in rows {
        t.row(vec![field.to_owned(), value]);
    }
    t.render(layout)
}

pub(crate) fn findings_json(findings: &[CheckFinding]) -> Value {
    findings
        .iter()
        .map(|f| json!({"name": f.name, "status": status(f.status), "detail": f.detail, "fix": f.fix}))
        .collect()
}

/// What a check found: a table of checks, then each fix on lines of its own, whole, so it
/// can be copied (a fix is never wrapped, however long).
pub(crate) fn findings_text(findings: &[CheckFinding], layout: Layout) -> String {
    if findings.is_empty() {
        return "no findings".to_owned();
    }
    let mut t = Table::new(&[
        Column::keep("CHECK"),
        Column::keep("STATUS"),
        Column::optional("DETAIL", 1).wrapping(),
    ]);
    for f in findings {
        t.row(vec![
            f.name.clone(),
            status(f.status).to_owned(),
            f.detail.clone(),
        ]);
    }
    let mut text = t.render(layout);
    for f in findings.iter().filter(|f| !f.fix.trim().is_empty()) {
        let fix = f.fix.trim().replace('\n', "\n  ");
        text.push_str(&format!("\n\nto fix {}:\n  {fix}", f.name));
    }
    text
}

/// An alert's state as the CLI shows it.
pub(crate) fn alert_state(state: i32) -> &'static str {
    match keel_proto::v1::AlertState::try_from(state) {
        Ok(keel_proto::v1::AlertState::Pending) => "pending",
        Ok(keel_proto::v1::AlertState::Firing) => "firing",
        Ok(keel_proto::v1::AlertState::Resolved) => "resolved",
        _ => "unknown",
    }
}

/// One alert as a JSON document.
pub(crate) fn alert_json(a: &keel_proto::v1::Alert) -> Value {
    let labels: std::collections::BTreeMap<_, _> = a.labels.iter().collect();
    let annotations: std::collections::BTreeMap<_, _> = a.annotations.iter().collect();
    json!({
        "fingerprint": a.fingerprint,
        "rule": a.rule,
        "state": alert_state(a.state),
        "tenant": a.tenant,
        "instance_id": a.instance_id,
        "instance_name": a.instance_name,
        "value": a.value,
        "threshold": a.threshold,
        "labels": labels,
        "annotations": annotations,
        "active_since": time(a.active_since.as_ref()),
        "fired_at": time(a.fired_at.as_ref()),
        "resolved_at": time(a.resolved_at.as_ref()),
    })
}

/// A duration in milliseconds.
pub(crate) fn millis(d: &prost_types::Duration) -> f64 {
    d.seconds as f64 * 1e3 + f64::from(d.nanos) / 1e6
}

/// `ts` in JSON: RFC 3339 with milliseconds, `null` when unset.
pub(crate) fn timestamp_json(ts: Option<&prost_types::Timestamp>) -> Value {
    time(ts)
}

/// `ts` for people, to the second; `-` when unset.
pub(crate) fn when(ts: Option<&prost_types::Timestamp>) -> String {
    datetime(ts).map_or_else(
        || "-".to_owned(),
        |t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
    )
}

/// How far `ts` is from `now`: `3m12s ago`, `in 14s`; empty when unset.
fn relative(ts: Option<&prost_types::Timestamp>, now: chrono::DateTime<chrono::Utc>) -> String {
    let Some(at) = datetime(ts) else {
        return String::new();
    };
    let seconds = (at - now).num_seconds();
    match seconds {
        0 => "now".to_owned(),
        s if s > 0 => format!("in {}", span(s.unsigned_abs())),
        s => format!("{} ago", span(s.unsigned_abs())),
    }
}

/// Whole seconds in their two largest units: `45s`, `3m12s`, `2h5m`, `3d4h`.
fn span(seconds: u64) -> String {
    let (d, h, m, s) = (
        seconds / 86_400,
        seconds / 3600 % 24,
        seconds / 60 % 60,
        seconds % 60,
    );
    let pair = |a: u64, ua: &str, b: u64, ub: &str| {
        if b == 0 {
            format!("{a}{ua}")
        } else {
            format!("{a}{ua}{b}{ub}")
        }
    };
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => pair(m, "m", s, "s"),
        (0, _, _) => pair(h, "h", m, "m"),
        _ => pair(d, "d", h, "h"),
    }
}

/// `text` with up to three decimals, without trailing zeros: `12.5`, `0.125`, `3`.
fn decimals(value: f64, places: usize) -> String {
    let text = format!("{value:.places$}");
    if text.contains('.') {
        text.trim_end_matches('0').trim_end_matches('.').to_owned()
    } else {
        text
    }
}

/// A number for people: whole numbers as they are, others with three decimals at most.
fn number(value: f64) -> String {
    if value.is_nan() {
        return "NaN".to_owned();
    }
    if value.is_infinite() {
        return if value > 0.0 { "+Inf" } else { "-Inf" }.to_owned();
    }
    if value.fract() == 0.0 && value.abs() < 1e15 {
        return format!("{}", value as i64);
    }
    decimals(value, if value.abs() >= 100.0 { 1 } else { 3 })
}

/// A byte count in binary units: `512 B`, `7.5 MiB`.
fn bytes(value: f64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut scaled = value;
    let mut unit = 0;
    while scaled.abs() >= 1024.0 && unit + 1 < UNITS.len() {
        scaled /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{} B", number(value))
    } else {
        format!("{} {}", decimals(scaled, 1), UNITS[unit])
    }
}

/// Seconds in the unit that reads best: `350 us`, `12.3 ms`, `4.25 s`, `3m12s`, `2h5m`.
fn seconds(value: f64) -> String {
    let abs = value.abs();
    if value == 0.0 {
        "0 s".to_owned()
    } else if abs < 1e-3 {
        format!("{} us", decimals(value * 1e6, 0))
    } else if abs < 1.0 {
        format!("{} ms", decimals(value * 1e3, 1))
    } else if abs < 60.0 || value < 0.0 {
        format!("{} s", decimals(value, 2))
    } else {
        span(value.round() as u64)
    }
}

/// A value of the metric `name` in the unit its name ends with: bytes, seconds, ratios as
/// percentages, rates per second; other values as numbers. `NaN` and infinities as such.
pub(crate) fn metric_value(name: &str, value: f64) -> String {
    if !value.is_finite() {
        return number(value);
    }
    let name = name.strip_suffix("_total").unwrap_or(name);
    if name.ends_with("_bytes") {
        bytes(value)
    } else if name.ends_with("_seconds") {
        seconds(value)
    } else if name.ends_with("_ratio") {
        format!("{}%", decimals(value * 100.0, 1))
    } else if name.ends_with("_per_second") {
        format!("{}/s", number(value))
    } else {
        number(value)
    }
}

/// Labels as `k=v,k=v`, sorted.
fn label_pairs<'a>(labels: impl IntoIterator<Item = (&'a String, &'a String)>) -> String {
    let mut pairs: Vec<String> = labels
        .into_iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    pairs.sort();
    pairs.join(",")
}

pub(crate) fn scrape_status_json(status: &ScrapeStatus) -> Value {
    json!({
        "up": status.up,
        "scraped_at": time(status.scraped_at.as_ref()),
        "duration_ms": status.duration.as_ref().map(millis),
        "problems": status.problems,
        "next_scrape_at": time(status.next_scrape_at.as_ref()),
    })
}

/// How the last scrape of `instance` went, a field a line, then each problem on a line of
/// its own, whole (a problem carries its fix, e.g. SQL to copy).
pub(crate) fn scrape_status_text(
    instance: &str,
    engine_name: &str,
    status: &ScrapeStatus,
    layout: Layout,
) -> String {
    let now = chrono::Utc::now();
    let mut t = Table::headless(&[Column::keep("FIELD"), Column::keep("VALUE").wrapping()]);
    t.row(vec![
        "instance:".into(),
        format!("{instance} ({engine_name})"),
    ]);
    if status.scraped_at.is_some() {
        let took = status
            .duration
            .as_ref()
            .map(|d| format!(", took {}", seconds(millis(d) / 1e3)))
            .unwrap_or_default();
        t.row(vec![
            "scrape:".into(),
            if status.up { "up" } else { "down" }.to_owned(),
        ]);
        t.row(vec![
            "scraped:".into(),
            format!(
                "{} ({}){took}",
                when(status.scraped_at.as_ref()),
                relative(status.scraped_at.as_ref(), now)
            ),
        ]);
    } else {
        t.row(vec!["scrape:".into(), "not scraped yet".into()]);
    }
    if status.next_scrape_at.is_some() {
        t.row(vec![
            "next scrape:".into(),
            format!(
                "{} ({})",
                when(status.next_scrape_at.as_ref()),
                relative(status.next_scrape_at.as_ref(), now)
            ),
        ]);
    }
    let mut text = t.render(layout);
    if !status.problems.is_empty() {
        text.push_str("\n\nproblems of the last scrape:");
        for problem in &status.problems {
            text.push_str(&format!("\n  {}", problem.trim().replace('\n', "\n  ")));
        }
    }
    text
}

pub(crate) fn metrics_json<'a>(metrics: impl IntoIterator<Item = &'a Metric>) -> Value {
    metrics
        .into_iter()
        .map(|m| {
            let labels: std::collections::BTreeMap<_, _> = m.labels.iter().collect();
            json!({"name": m.name, "labels": labels, "value": m.value})
        })
        .collect()
}

/// Latest values, sorted by name and labels, in their units; `-o wide` adds the exact value
/// and what the metric measures.
pub(crate) fn metrics_table(metrics: &[&Metric], layout: Layout) -> String {
    if metrics.is_empty() {
        return "no values".to_owned();
    }
    let mut rows: Vec<(String, String, &Metric)> = metrics
        .iter()
        .map(|m| (m.name.clone(), label_pairs(&m.labels), *m))
        .collect();
    rows.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
    // Labels last and never dropped: without them the values of one name cannot be told
    // apart, and a label too long for what is left (a long table name) overflows at the end
    // of its line instead of pushing the values out of line.
    let mut t = Table::new(&[
        Column::keep("NAME"),
        Column::keep("VALUE"),
        Column::keep("LABELS").wrapping(),
        Column::wide("EXACT"),
        Column::wide("HELP"),
    ]);
    for (name, labels, m) in rows {
        t.row(vec![
            name,
            metric_value(&m.name, m.value),
            labels,
            m.value.to_string(),
            keel_collector::catalog::family(&m.name)
                .map(|f| f.help.to_owned())
                .unwrap_or_default(),
        ]);
    }
    t.render(layout)
}

pub(crate) fn series_json(series: &[Series]) -> Value {
    series
        .iter()
        .map(|s| {
            let labels: std::collections::BTreeMap<_, _> = s.labels.iter().collect();
            json!({
                "name": s.name,
                "labels": labels,
                "points": s.points.iter()
                    .map(|p| json!({"at": time(p.at.as_ref()), "value": p.value}))
                    .collect::<Vec<_>>(),
            })
        })
        .collect()
}

/// Each series of the history in one row: how many points, the first and last value, the
/// lowest and highest; `-o wide` adds when the first and last were scraped.
pub(crate) fn series_table(series: &[Series], layout: Layout) -> String {
    if series.is_empty() {
        return "no history in the window".to_owned();
    }
    let mut rows: Vec<(String, String, &Series)> = series
        .iter()
        .map(|s| (s.name.clone(), label_pairs(&s.labels), s))
        .collect();
    rows.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
    let mut t = Table::new(&[
        // Dropped first: POINTS, FIRST, MIN, MAX; never the labels, which tell the series
        // of one name apart.
        Column::keep("NAME"),
        Column::keep("LABELS").wrapping(),
        Column::optional("POINTS", 5),
        Column::optional("FIRST", 4),
        Column::keep("LAST"),
        Column::optional("MIN", 3),
        Column::optional("MAX", 2),
        Column::wide("FROM"),
        Column::wide("TO"),
    ]);
    for (name, labels, s) in rows {
        let values = s.points.iter().map(|p| p.value);
        let min = values.clone().fold(f64::INFINITY, f64::min);
        let max = values.fold(f64::NEG_INFINITY, f64::max);
        let show = |v: Option<f64>| v.map(|v| metric_value(&s.name, v)).unwrap_or_default();
        let (first, last) = (s.points.first(), s.points.last());
        t.row(vec![
            name,
            labels,
            s.points.len().to_string(),
            show(first.map(|p| p.value)),
            show(last.map(|p| p.value)),
            show((!s.points.is_empty()).then_some(min)),
            show((!s.points.is_empty()).then_some(max)),
            when(first.and_then(|p| p.at.as_ref())),
            when(last.and_then(|p| p.at.as_ref())),
        ]);
    }
    t.render(layout)
}

pub(crate) fn top_query_json(q: &TopQuery) -> Value {
    json!({
        // A string: pg_stat_statements ids use all 64 bits, more than a JSON number keeps
        // exactly in most readers (as the protobuf JSON mapping of int64 does).
        "query_id": q.query_id.to_string(),
        "text": q.text,
        "calls": q.calls,
        "total_exec_seconds": q.total_exec_seconds,
        "mean_exec_seconds": q.mean_exec_seconds,
        "rows": q.rows,
        "shared_blks_hit": q.shared_blks_hit,
        "shared_blks_read": q.shared_blks_read,
        "temp_blks_written": q.temp_blks_written,
        "wal_bytes": q.wal_bytes,
        "share_of_total_time": q.share_of_total_time,
    })
}

/// Statements by total time, their text on one line cut to the terminal (whole with
/// `-o wide`); the query id is dropped before the text gets short.
pub(crate) fn top_queries_table(queries: &[TopQuery], layout: Layout) -> String {
    if queries.is_empty() {
        return "no statements in the window".to_owned();
    }
    let mut t = Table::new(&[
        Column::optional("QUERYID", 2),
        Column::keep("CALLS"),
        Column::keep("TOTAL S"),
        Column::optional("MEAN MS", 1),
        Column::optional("ROWS", 3),
        Column::keep("SHARE"),
        Column::keep("TEXT").truncating(),
        Column::wide("HIT"),
        Column::wide("READ"),
        Column::wide("TEMP WRITTEN"),
        Column::wide("WAL"),
    ]);
    for q in queries {
        let text = q.text.split_whitespace().collect::<Vec<_>>().join(" ");
        t.row(vec![
            q.query_id.to_string(),
            q.calls.to_string(),
            format!("{:.3}", q.total_exec_seconds),
            format!("{:.3}", q.mean_exec_seconds * 1e3),
            q.rows.to_string(),
            format!("{:.1}%", q.share_of_total_time * 100.0),
            if text.is_empty() {
                "(text not readable)".to_owned()
            } else {
                text
            },
            q.shared_blks_hit.to_string(),
            q.shared_blks_read.to_string(),
            q.temp_blks_written.to_string(),
            bytes(q.wal_bytes as f64),
        ]);
    }
    t.render(layout)
}

/// The metric an alert's rule reads, if it is one of the built-in rules: its value and
/// threshold are in that metric's unit.
fn alert_metric(rule: &str) -> Option<&'static str> {
    keel_collector::rules::builtin()
        .into_iter()
        .find(|r| r.name == rule)
        .map(|r| r.metric)
}

/// Alerts, newest first as Keel lists them; `-o wide` adds severity, times and fingerprint.
pub(crate) fn alerts_table(alerts: &[Alert], layout: Layout) -> String {
    if alerts.is_empty() {
        return "no alerts".to_owned();
    }
    let now = chrono::Utc::now();
    let mut t = Table::new(&[
        Column::keep("RULE"),
        Column::keep("STATE"),
        Column::keep("INSTANCE"),
        Column::optional("VALUE", 2),
        Column::optional("SINCE", 1),
        Column::optional("SUMMARY", 3).wrapping(),
        Column::wide("SEVERITY"),
        Column::wide("ACTIVE SINCE"),
        Column::wide("FIRED"),
        Column::wide("RESOLVED"),
        Column::wide("FINGERPRINT"),
    ]);
    for a in alerts {
        let metric = alert_metric(&a.rule).unwrap_or_default();
        t.row(vec![
            a.rule.clone(),
            alert_state(a.state).to_owned(),
            a.instance_name.clone(),
            format!(
                "{} / {}",
                metric_value(metric, a.value),
                metric_value(metric, a.threshold)
            ),
            relative(a.active_since.as_ref(), now),
            a.annotations.get("summary").cloned().unwrap_or_default(),
            a.labels.get("severity").cloned().unwrap_or_default(),
            when(a.active_since.as_ref()),
            when(a.fired_at.as_ref()),
            when(a.resolved_at.as_ref()),
            a.fingerprint.clone(),
        ]);
    }
    t.render(layout)
}

/// One event as a JSON document.
pub(crate) fn event_json(subject: &str, event: &Event) -> Value {
    let payload = match &event.payload {
        Some(event::Payload::InstanceCreated(p)) => {
            json!({"instance": p.instance.as_ref().map(instance_json)})
        }
        Some(event::Payload::InstanceUpdated(p)) => json!({
            "instance": p.instance.as_ref().map(instance_json),
            "changed_fields": p.changed_fields,
        }),
        Some(event::Payload::InstanceDeleted(p)) => json!({
            "instance_id": p.instance_id, "name": p.name, "engine": engine(p.engine), "version": p.version,
        }),
        Some(event::Payload::AlertFiring(p)) => json!({"alert": p.alert.as_ref().map(alert_json)}),
        Some(event::Payload::AlertResolved(p)) => {
            json!({"alert": p.alert.as_ref().map(alert_json)})
        }
        Some(
            event::Payload::RecommendationCreated(p)
            | event::Payload::RecommendationApplied(p)
            | event::Payload::RecommendationRolledBack(p)
            | event::Payload::RecommendationFailed(p),
        ) => json!({
            "recommendation_id": p.recommendation_id, "table": p.table,
            "index_name": p.index_name, "ddl": p.ddl, "reason": p.reason,
        }),
        None => Value::Null,
    };
    json!({
        "id": event.id,
        "subject": subject,
        "type": event.r#type,
        "occurred_at": time(event.occurred_at.as_ref()),
        "tenant": event.tenant,
        "instance_id": event.instance_id,
        "payload": payload,
    })
}

/// One event as a line for people.
pub(crate) fn event_line(subject: &str, event: &Event) -> String {
    let at = time(event.occurred_at.as_ref());
    let summary = match &event.payload {
        Some(event::Payload::InstanceCreated(p)) => p
            .instance
            .as_ref()
            .map(|i| format!("{} ({}) {}", i.name, engine(i.engine), i.connection_url))
            .unwrap_or_default(),
        Some(event::Payload::InstanceUpdated(p)) => p
            .instance
            .as_ref()
            .map(|i| {
                format!(
                    "{} v{} changed {}",
                    i.name,
                    i.version,
                    p.changed_fields.join(",")
                )
            })
            .unwrap_or_default(),
        Some(event::Payload::InstanceDeleted(p)) => format!("{} v{}", p.name, p.version),
        Some(event::Payload::AlertFiring(keel_proto::v1::AlertFiring { alert: Some(a) }))
        | Some(event::Payload::AlertResolved(keel_proto::v1::AlertResolved { alert: Some(a) })) => {
            format!(
                "{} {} on {}: {}",
                a.rule,
                alert_state(a.state),
                a.instance_name,
                a.annotations
                    .get("summary")
                    .map(String::as_str)
                    .unwrap_or_default()
            )
        }
        Some(event::Payload::AlertFiring(_) | event::Payload::AlertResolved(_)) => String::new(),
        Some(
            event::Payload::RecommendationCreated(p)
            | event::Payload::RecommendationApplied(p)
            | event::Payload::RecommendationRolledBack(p)
            | event::Payload::RecommendationFailed(p),
        ) => {
            let mut line = format!("{} {}", p.index_name, p.ddl);
            if !p.reason.is_empty() {
                line = format!("{line}: {}", p.reason);
            }
            line
        }
        None => String::new(),
    };
    format!(
        "{}  {subject}  tenant={}  {summary}",
        at.as_str().unwrap_or("-"),
        event.tenant
    )
}

/// A recommendation's kind as the CLI shows it.
pub(crate) fn recommendation_kind(raw: i32) -> &'static str {
    match RecommendationKind::try_from(raw) {
        Ok(RecommendationKind::CreateIndex) => "create_index",
        Ok(RecommendationKind::DropIndex) => "drop_index",
        _ => "unspecified",
    }
}

/// A recommendation's state as the CLI shows it (as Keel stores it).
pub(crate) fn recommendation_state(raw: i32) -> &'static str {
    match RecommendationState::try_from(raw) {
        Ok(RecommendationState::Proposed) => "proposed",
        Ok(RecommendationState::Applying) => "applying",
        Ok(RecommendationState::Applied) => "applied",
        Ok(RecommendationState::RollingBack) => "rolling_back",
        Ok(RecommendationState::RolledBack) => "rolled_back",
        Ok(RecommendationState::Failed) => "failed",
        _ => "unspecified",
    }
}

/// An analysis's state as the CLI shows it.
pub(crate) fn analysis_state(raw: i32) -> &'static str {
    match AnalysisState::try_from(raw) {
        Ok(AnalysisState::Queued) => "queued",
        Ok(AnalysisState::Running) => "running",
        Ok(AnalysisState::Done) => "done",
        Ok(AnalysisState::Failed) => "failed",
        _ => "unspecified",
    }
}

/// The short form of a recommendation id: its last group of 12 hex digits, the random part
/// (a UUIDv7 begins with its time, which the recommendations of one analysis share).
pub(crate) fn short_id(id: &str) -> &str {
    match id.rsplit_once('-') {
        Some((_, tail)) if !tail.is_empty() => tail,
        _ => id,
    }
}

/// The id a table shows: short, whole with `-o wide`.
fn table_id(id: &str, layout: Layout) -> String {
    match layout {
        Layout::Wide => id.to_owned(),
        Layout::Fit(_) => short_id(id).to_owned(),
    }
}

/// A share of the instance's query time, 0 to 1, as a percentage.
fn share(value: f64) -> String {
    format!("{:.1}%", value * 100.0)
}

/// Planner costs before and after: `18334.2 → 24.6 (745× cheaper)`, `200 → 150 (-25%)`; one
/// value when they are the same, empty when neither was planned.
fn cost_change(before: f64, after: f64) -> String {
    if before == 0.0 && after == 0.0 {
        return String::new();
    }
    if before == after {
        return number(before);
    }
    let relative = if before > 0.0 && after > 0.0 && before / after >= 2.0 {
        // A percentage would round most index wins to -100%.
        let times = before / after;
        let times = if times >= 10.0 {
            format!("{}", times.round() as i64)
        } else {
            decimals(times, 1)
        };
        format!(" ({times}× cheaper)")
    } else if before > 0.0 {
        format!(" ({:+.0}%)", (after - before) / before * 100.0)
    } else {
        String::new()
    };
    format!("{} → {}{relative}", number(before), number(after))
}

/// Plan shapes before and after: `Seq Scan on orders → Index Scan using … on orders`, one
/// shape when they are the same.
fn plan_change(before: &str, after: &str) -> String {
    match (before.trim(), after.trim()) {
        (before, "") => before.to_owned(),
        ("", after) => format!("? → {after}"),
        (before, after) if before == after => before.to_owned(),
        (before, after) => format!("{before} → {after}"),
    }
}

/// A statement's text on one line, cut to `limit` characters ending in `…`.
fn shortened(text: &str, limit: Option<usize>) -> String {
    let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
    match limit {
        Some(limit) if text.chars().count() > limit => {
            let mut cut: String = text.chars().take(limit.saturating_sub(1)).collect();
            cut.truncate(cut.trim_end().len());
            cut.push('…');
            cut
        }
        _ => text,
    }
}

/// `layout` for text indented by `by` characters.
fn indented(layout: Layout, by: usize) -> Layout {
    match layout {
        Layout::Fit(width) => Layout::Fit(width.saturating_sub(by).max(40)),
        Layout::Wide => Layout::Wide,
    }
}

/// Each line of `text` after `by` spaces.
fn indent(text: &str, by: usize) -> String {
    let pad = " ".repeat(by);
    text.lines()
        .map(|line| {
            if line.is_empty() {
                String::new()
            } else {
                format!("{pad}{line}")
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn statement_effect_json(e: &StatementEffect) -> Value {
    json!({
        // A string, as for top queries: pg_stat_statements ids use all 64 bits.
        "query_id": e.query_id.to_string(),
        "text": e.text,
        "share_of_time": e.share_of_time,
        "cost_before": e.cost_before,
        "cost_after": e.cost_after,
        "plan_before": e.plan_before,
        "plan_after": e.plan_after,
        "measured_cost_before": e.measured_cost_before,
        "measured_cost_after": e.measured_cost_after,
    })
}

/// One recommendation as a JSON document, its evidence included.
pub(crate) fn recommendation_json(r: &Recommendation) -> Value {
    json!({
        "id": r.id,
        "instance_id": r.instance_id,
        "analysis_id": r.analysis_id,
        "kind": recommendation_kind(r.kind),
        "state": recommendation_state(r.state),
        "state_reason": r.state_reason,
        "table": r.table,
        "index_name": r.index_name,
        "ddl": r.ddl,
        "rollback_ddl": r.rollback_ddl,
        "estimated_bytes": r.estimated_bytes,
        "hypopg_bytes": r.hypopg_bytes,
        "built_bytes": r.built_bytes,
        "write_cost": r.write_cost,
        "benefit": r.benefit,
        "share_of_time": r.share_of_time,
        "effects": r.effects.iter().map(statement_effect_json).collect::<Vec<_>>(),
        "explanation": r.explanation,
        "version": r.version,
        "created_at": time(r.created_at.as_ref()),
        "updated_at": time(r.updated_at.as_ref()),
    })
}

fn statement_outcome_json(s: &StatementOutcome) -> Value {
    json!({
        "query_id": s.query_id.to_string(),
        "text": s.text,
        "calls": s.calls,
        "share_of_time": s.share_of_time,
        "planning": s.planning,
        "problem": s.problem,
        "cost_before": s.cost_before,
        "cost_after": s.cost_after,
        "plan_before": s.plan_before,
        "plan_after": s.plan_after,
    })
}

/// An analysis as a JSON document, with the recommendations it made (as fetched).
pub(crate) fn analysis_json(
    instance: &str,
    a: &Analysis,
    recommendations: &[Recommendation],
) -> Value {
    json!({
        "id": a.id,
        "instance_id": a.instance_id,
        "instance": instance,
        "state": analysis_state(a.state),
        "error": a.error,
        "budget_bytes": a.budget_bytes,
        "max_indexes": a.max_indexes,
        "workload_source": a.workload_source,
        "statements": a.statements.iter().map(statement_outcome_json).collect::<Vec<_>>(),
        "recommendation_ids": a.recommendation_ids,
        "recommendations": recommendations.iter().map(recommendation_json).collect::<Vec<_>>(),
        "whatif_calls": a.whatif_calls,
        "cache_hits": a.cache_hits,
        "elapsed_seconds": a.elapsed.as_ref().map(|d| millis(d) / 1e3),
        "created_at": time(a.created_at.as_ref()),
        "finished_at": time(a.finished_at.as_ref()),
        "problems": a.problems,
    })
}

/// The statements of an analysis: calls, share of time, planner cost and plan shape before
/// and after the advised set, or why a statement was not planned; `-o wide` adds the text and
/// how each was planned.
pub(crate) fn analysis_statements_table(statements: &[StatementOutcome], layout: Layout) -> String {
    if statements.is_empty() {
        return "no statements in the window".to_owned();
    }
    let mut t = Table::new(&[
        Column::keep("QUERYID"),
        Column::optional("CALLS", 2),
        Column::keep("SHARE"),
        Column::keep("COST"),
        Column::optional("PLAN", 1).wrapping(),
        Column::keep("PROBLEM").wrapping(),
        Column::wide("PLANNING"),
        Column::wide("TEXT"),
    ]);
    for s in statements {
        t.row(vec![
            s.query_id.to_string(),
            number(s.calls),
            share(s.share_of_time),
            cost_change(s.cost_before, s.cost_after),
            plan_change(&s.plan_before, &s.plan_after),
            s.problem.clone(),
            s.planning.clone(),
            shortened(&s.text, None),
        ]);
    }
    t.render(layout)
}

/// The recommendations an analysis made: short id, kind, DDL, estimated size, share of time
/// of the statements it helps, benefit; `-o wide` adds the table and the state.
pub(crate) fn analysis_recommendations_table(
    recommendations: &[Recommendation],
    layout: Layout,
) -> String {
    if recommendations.is_empty() {
        return "no recommendations".to_owned();
    }
    let mut t = Table::new(&[
        Column::keep("ID"),
        Column::keep("KIND"),
        Column::keep("DDL").wrapping(),
        Column::optional("EST. SIZE", 2),
        Column::optional("SHARE", 1),
        Column::optional("BENEFIT", 3),
        Column::wide("TABLE"),
        Column::wide("STATE"),
    ]);
    for r in recommendations {
        t.row(vec![
            table_id(&r.id, layout),
            recommendation_kind(r.kind).to_owned(),
            r.ddl.clone(),
            bytes(r.estimated_bytes as f64),
            share(r.share_of_time),
            number(r.benefit),
            r.table.clone(),
            recommendation_state(r.state).to_owned(),
        ]);
    }
    t.render(layout)
}

/// An analysis for people: how it ran, its statements, the recommendations it made, the
/// problems of the workload (each whole on a line of its own, with its fix).
pub(crate) fn analysis_text(
    instance: &str,
    a: &Analysis,
    recommendations: &[Recommendation],
    layout: Layout,
) -> String {
    let mut head = Table::headless(&[Column::keep("FIELD"), Column::keep("VALUE").wrapping()]);
    head.row(vec!["instance:".into(), instance.to_owned()]);
    head.row(vec!["analysis:".into(), a.id.clone()]);
    head.row(vec!["state:".into(), analysis_state(a.state).to_owned()]);
    if !a.error.trim().is_empty() {
        head.row(vec!["error:".into(), a.error.trim().to_owned()]);
    }
    head.row(vec![
        "workload:".into(),
        match (a.statements.len(), a.workload_source.as_str()) {
            (1, "") => "1 statement".to_owned(),
            (1, source) => format!("1 statement, from {source}"),
            (n, "") => format!("{n} statements"),
            (n, source) => format!("{n} statements, from {source}"),
        },
    ]);
    head.row(vec![
        "budget:".into(),
        format!(
            "{}, at most {} new indexes",
            bytes(a.budget_bytes as f64),
            a.max_indexes
        ),
    ]);
    head.row(vec![
        "what-if plans:".into(),
        format!(
            "{} asked of PostgreSQL, {} answered from the cache",
            a.whatif_calls, a.cache_hits
        ),
    ]);
    if let Some(elapsed) = &a.elapsed {
        head.row(vec!["elapsed:".into(), seconds(millis(elapsed) / 1e3)]);
    }
    let mut text = head.render(layout);
    text.push_str(&format!(
        "\n\nstatements ({}):\n{}",
        a.statements.len(),
        analysis_statements_table(&a.statements, layout)
    ));
    text.push_str(&format!(
        "\n\nrecommendations ({}):\n{}",
        recommendations.len(),
        analysis_recommendations_table(recommendations, layout)
    ));
    if !a.problems.is_empty() {
        text.push_str("\n\nproblems of the workload:");
        for problem in &a.problems {
            text.push_str(&format!("\n  {}", problem.trim().replace('\n', "\n  ")));
        }
    }
    if let Some(first) = recommendations.first() {
        text.push_str(&format!(
            "\n\n`keel recs show {id}` shows a recommendation's evidence; `keel recs apply {id}` applies it.",
            id = short_id(&first.id)
        ));
    }
    text
}

/// Recommendations, newest first as Keel lists them, the instance by its name from `names`
/// (by id when it is not there); `-o wide` adds the whole id, when each last changed, and
/// the reason of its state.
pub(crate) fn recommendations_table(
    recommendations: &[Recommendation],
    names: &std::collections::HashMap<String, String>,
    layout: Layout,
) -> String {
    if recommendations.is_empty() {
        return "no recommendations".to_owned();
    }
    let now = chrono::Utc::now();
    let mut t = Table::new(&[
        // Dropped first: CREATED, INDEX, INSTANCE, EST. SIZE, SHARE.
        Column::keep("ID"),
        Column::optional("INSTANCE", 3),
        Column::keep("KIND"),
        Column::keep("STATE"),
        Column::keep("TABLE"),
        Column::optional("INDEX", 4),
        Column::optional("EST. SIZE", 2),
        Column::optional("SHARE", 1),
        Column::optional("CREATED", 5),
        Column::wide("UPDATED"),
        Column::wide("REASON"),
    ]);
    for r in recommendations {
        t.row(vec![
            table_id(&r.id, layout),
            names
                .get(&r.instance_id)
                .cloned()
                .unwrap_or_else(|| r.instance_id.clone()),
            recommendation_kind(r.kind).to_owned(),
            recommendation_state(r.state).to_owned(),
            r.table.clone(),
            r.index_name.clone(),
            bytes(r.estimated_bytes as f64),
            share(r.share_of_time),
            relative(r.created_at.as_ref(), now),
            when(r.updated_at.as_ref()),
            r.state_reason.clone(),
        ]);
    }
    t.render(layout)
}

/// One recommendation with everything Keel knows of it: a field a line (long values wrap
/// between words), then its DDL and rollback DDL each whole on a line of its own (to copy),
/// then each statement it helps: text (shortened, whole with `-o wide`), plan and planner
/// cost before and after, and the costs measured on the real index once applied.
pub(crate) fn recommendation_details(r: &Recommendation, instance: &str, layout: Layout) -> String {
    let mut t = Table::headless(&[Column::keep("FIELD"), Column::keep("VALUE").wrapping()]);
    t.row(vec!["id:".into(), r.id.clone()]);
    t.row(vec![
        "instance:".into(),
        if instance.is_empty() || instance == r.instance_id {
            r.instance_id.clone()
        } else {
            format!("{instance} ({})", r.instance_id)
        },
    ]);
    t.row(vec!["analysis:".into(), r.analysis_id.clone()]);
    t.row(vec!["kind:".into(), recommendation_kind(r.kind).to_owned()]);
    t.row(vec![
        "state:".into(),
        recommendation_state(r.state).to_owned(),
    ]);
    if !r.state_reason.trim().is_empty() {
        t.row(vec!["reason:".into(), r.state_reason.trim().to_owned()]);
    }
    t.row(vec!["table:".into(), r.table.clone()]);
    t.row(vec!["index:".into(), r.index_name.clone()]);
    let mut sizes = vec![format!("{} estimated", bytes(r.estimated_bytes as f64))];
    if r.hypopg_bytes > 0 {
        sizes.push(format!("{} by HypoPG", bytes(r.hypopg_bytes as f64)));
    }
    if r.built_bytes > 0 {
        sizes.push(format!("{} built", bytes(r.built_bytes as f64)));
    }
    t.row(vec!["size:".into(), sizes.join(", ")]);
    t.row(vec![
        "write cost:".into(),
        format!(
            "{} planner cost units over the window",
            number(r.write_cost)
        ),
    ]);
    t.row(vec![
        "benefit:".into(),
        format!(
            "{} planner cost units over the window, net of the write cost",
            number(r.benefit)
        ),
    ]);
    t.row(vec![
        "share of time:".into(),
        format!(
            "{} of the instance's query time, in the statements it helps",
            share(r.share_of_time)
        ),
    ]);
    t.row(vec!["version:".into(), r.version.to_string()]);
    t.row(vec!["created:".into(), when(r.created_at.as_ref())]);
    t.row(vec!["updated:".into(), when(r.updated_at.as_ref())]);
    t.row(vec!["explanation:".into(), r.explanation.trim().to_owned()]);
    let mut text = t.render(layout);
    for (what, ddl) in [("DDL", &r.ddl), ("rollback DDL", &r.rollback_ddl)] {
        if !ddl.trim().is_empty() {
            text.push_str(&format!(
                "\n\n{what}:\n  {}",
                ddl.trim().replace('\n', "\n  ")
            ));
        }
    }
    if !r.effects.is_empty() {
        text.push_str(&format!("\n\nstatements it helps ({}):", r.effects.len()));
        let limit = match indented(layout, 4) {
            Layout::Fit(width) => Some(width),
            Layout::Wide => None,
        };
        for e in &r.effects {
            text.push_str(&format!(
                "\n\n  query {}, {} of the instance's time:\n    {}",
                e.query_id,
                share(e.share_of_time),
                match shortened(&e.text, limit) {
                    text if text.is_empty() => "(text not readable)".to_owned(),
                    text => text,
                }
            ));
            let mut facts =
                Table::headless(&[Column::keep("FIELD"), Column::keep("VALUE").wrapping()]);
            facts.row(vec![
                "plan:".into(),
                plan_change(&e.plan_before, &e.plan_after),
            ]);
            facts.row(vec![
                "cost:".into(),
                cost_change(e.cost_before, e.cost_after),
            ]);
            if e.measured_cost_before != 0.0 || e.measured_cost_after != 0.0 {
                facts.row(vec![
                    "measured:".into(),
                    cost_change(e.measured_cost_before, e.measured_cost_after),
                ]);
            }
            text.push('\n');
            text.push_str(&indent(&facts.render(indented(layout, 4)), 4));
        }
    }
    text
}

/// Where a recommendation is, on one line: `keel_orders_status_1a2b (9b1deb4d3b7d): applied`,
/// and the reason of its state when there is one.
pub(crate) fn recommendation_state_line(r: &Recommendation) -> String {
    let name = if r.index_name.is_empty() {
        "recommendation"
    } else {
        r.index_name.as_str()
    };
    let mut line = format!(
        "{name} ({}): {}",
        short_id(&r.id),
        recommendation_state(r.state).replace('_', " ")
    );
    if !r.state_reason.trim().is_empty() {
        line.push_str(&format!("; {}", r.state_reason.trim()));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_show_in_the_unit_of_their_name() {
        let cases = [
            ("keel_pg_connections", 3.0, "3"),
            ("keel_pg_database_size_bytes", 7_864_320.0, "7.5 MiB"),
            ("keel_pg_database_size_bytes", 512.0, "512 B"),
            ("keel_target_scrape_duration_seconds", 0.0123, "12.3 ms"),
            ("keel_pg_longest_query_seconds", 312.0, "5m12s"),
            ("keel_pg_replication_lag_seconds", 4.25, "4.25 s"),
            ("keel_pg_replication_lag_seconds", 0.00035, "350 us"),
            ("keel_pg_cache_hit_ratio", 0.9871, "98.7%"),
            ("keel_pg_server_connections_ratio", 1.0, "100%"),
            ("keel_redis_ops_per_second", 12.5, "12.5/s"),
            ("keel_pg_temp_bytes_total", 2048.0, "2 KiB"),
            ("keel_pg_blocks_hit", 0.1234567, "0.123"),
            ("keel_pg_cache_hit_ratio", f64::NAN, "NaN"),
            ("", 300.0, "300"),
        ];
        for (name, value, shown) in cases {
            assert_eq!(metric_value(name, value), shown, "{name} {value}");
        }
        assert_eq!(span(59), "59s");
        assert_eq!(span(3600), "1h");
        assert_eq!(span(90_061), "1d1h");
    }

    #[test]
    fn every_builtin_rule_reads_a_metric_with_a_unit_the_cli_knows() {
        for rule in keel_collector::rules::builtin() {
            assert_eq!(alert_metric(rule.name), Some(rule.metric));
            assert!(
                keel_collector::catalog::family(rule.metric).is_some(),
                "{}",
                rule.name
            );
        }
    }

    #[test]
    fn a_scrape_status_puts_each_problem_whole_on_a_line() {
        let fix = "pg_stat_statements is not installed in this database: run CREATE EXTENSION pg_stat_statements; as a superuser (shared_preload_libraries must include it)";
        let status = ScrapeStatus {
            up: true,
            scraped_at: Some(prost_types::Timestamp {
                seconds: chrono::Utc::now().timestamp() - 3,
                nanos: 0,
            }),
            duration: Some(prost_types::Duration {
                seconds: 0,
                nanos: 12_300_000,
            }),
            problems: vec![fix.to_owned()],
            next_scrape_at: None,
        };
        let text = scrape_status_text("db", "postgres", &status, Layout::Fit(80));
        assert!(
            text.lines()
                .any(|l| l.starts_with("scrape:") && l.ends_with(" up")),
            "{text}"
        );
        assert!(text.contains("ago), took 12.3 ms"), "{text}");
        assert!(text.lines().any(|l| l == format!("  {fix}")), "{text}");
        let fresh = scrape_status_text("db", "postgres", &ScrapeStatus::default(), Layout::Wide);
        assert!(fresh.contains("not scraped yet"), "{fresh}");
    }

    #[test]
    fn details_keep_every_label() {
        let labels = [
            "team=payments-and-billing-platform-engineering",
            "region=eu-west-1",
            "tier=database",
            "owner=someone-with-a-rather-long-name",
            "cost-center=cc-4711-infrastructure",
        ];
        let instance = Instance {
            name: "orders".into(),
            connection_url: format!("postgres://postgres@127.0.0.1:43807/{}", "k".repeat(43)),
            labels: labels
                .iter()
                .filter_map(|l| l.split_once('='))
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
            ..Default::default()
        };
        let text = instance_details(&instance, Layout::Fit(80));
        for label in labels {
            assert!(text.contains(label), "{label} in\n{text}");
        }
    }

    fn ts(seconds: i64) -> Option<prost_types::Timestamp> {
        Some(prost_types::Timestamp { seconds, nanos: 0 })
    }

    /// A recommendation as Keel returns one after it was applied.
    fn applied_recommendation() -> Recommendation {
        Recommendation {
            id: "0198f3a2-7c4e-7b1a-9d2e-3f4a5b6c7d8e".into(),
            instance_id: "0198f39e-1111-7222-8333-444455556666".into(),
            analysis_id: "0198f3a1-0000-7000-8000-00000000abcd".into(),
            kind: RecommendationKind::CreateIndex as i32,
            state: RecommendationState::Applied as i32,
            state_reason: "built in 4.2 s and verified valid (indisvalid)".into(),
            table: "public.orders".into(),
            index_name: "keel_orders_customer_id_created_at_3f4a5b6c".into(),
            ddl: "CREATE INDEX CONCURRENTLY keel_orders_customer_id_created_at_3f4a5b6c ON public.orders USING btree (customer_id, created_at DESC)".into(),
            rollback_ddl: "DROP INDEX CONCURRENTLY IF EXISTS public.keel_orders_customer_id_created_at_3f4a5b6c".into(),
            estimated_bytes: 22_020_096,
            hypopg_bytes: 56_623_104,
            built_bytes: 23_068_672,
            write_cost: 1840.0,
            benefit: 1_204_331.5,
            share_of_time: 0.634,
            effects: vec![
                StatementEffect {
                    query_id: -8_270_145_529_340_217_213,
                    text: "SELECT id, total, status\n  FROM orders\n WHERE customer_id = $1\n ORDER BY created_at DESC\n LIMIT 20 -- the customer's latest orders, on every page view".into(),
                    cost_before: 18_334.2,
                    cost_after: 24.6,
                    plan_before: "Seq Scan on orders".into(),
                    plan_after: "Index Scan using orders(customer_id, created_at DESC) on orders".into(),
                    share_of_time: 0.512,
                    measured_cost_before: 18_334.2,
                    measured_cost_after: 23.9,
                },
                StatementEffect {
                    query_id: 4_411_092_177_263_556_101,
                    text: "SELECT count(*) FROM orders o JOIN customers c ON c.id = o.customer_id WHERE o.customer_id = $1".into(),
                    cost_before: 17_990.0,
                    cost_after: 8.4,
                    plan_before: "Seq Scan on orders; Index Scan using customers_pkey on customers".into(),
                    plan_after: "Index Only Scan using orders(customer_id, created_at DESC) on orders; Index Scan using customers_pkey on customers".into(),
                    share_of_time: 0.122,
                    measured_cost_before: 0.0,
                    measured_cost_after: 0.0,
                },
            ],
            explanation: "2 statements taking 63.4% of the instance's query time read orders by customer_id and sort by created_at; an index on (customer_id, created_at DESC) turns their sequential scans into index scans, for an estimated 21 MiB and 1840 planner cost units of writes over the window.".into(),
            version: 4,
            created_at: ts(1_764_670_000),
            updated_at: ts(1_764_670_950),
        }
    }

    #[test]
    fn a_recommendation_shows_its_ddl_whole_and_the_evidence_of_each_statement() {
        let r = applied_recommendation();
        let text = recommendation_details(&r, "orders-db", Layout::Fit(80));
        // The DDL whole on a line of its own, to copy; everything else fits 80 columns.
        assert!(text.lines().any(|l| l == format!("  {}", r.ddl)), "{text}");
        assert!(
            text.lines().any(|l| l == format!("  {}", r.rollback_ddl)),
            "{text}"
        );
        for line in text.lines().filter(|l| !l.contains("CONCURRENTLY")) {
            assert!(line.chars().count() <= 80, "{line:?} in\n{text}");
        }
        for needle in [
            "orders-db (0198f39e-1111-7222-8333-444455556666)",
            "applied",
            "built in 4.2 s and verified valid",
            "21 MiB estimated, 54 MiB by HypoPG, 22 MiB built",
            "1840 planner cost units over the window",
            "1204331.5 planner cost units",
            "63.4% of the instance's query time",
            "statements it helps (2):",
            "query -8270145529340217213, 51.2% of the instance's time:",
            "SELECT id, total, status FROM orders WHERE customer_id = $1 ORDER BY",
            "plan:      Seq Scan on orders → Index Scan using orders(customer_id,",
            "18334.2 → 24.6 (745× cheaper)",
            "measured:  18334.2 → 23.9 (767× cheaper)",
            "17990 → 8.4 (2142× cheaper)",
        ] {
            assert!(text.contains(needle), "{needle:?} in\n{text}");
        }
        // The long text is cut to the width, whole with -o wide; measured costs only once
        // there are some.
        assert!(
            text.lines()
                .any(|l| l.starts_with("    SELECT id") && l.ends_with('…')),
            "{text}"
        );
        assert_eq!(text.matches("measured:").count(), 1, "{text}");
        let wide = recommendation_details(&r, "orders-db", Layout::Wide);
        assert!(wide.contains("LIMIT 20 -- the customer's latest orders, on every page view"));
        // A proposed drop: no effects, no sizes it does not have.
        let drop = Recommendation {
            kind: RecommendationKind::DropIndex as i32,
            state: RecommendationState::Proposed as i32,
            state_reason: String::new(),
            hypopg_bytes: 0,
            built_bytes: 0,
            effects: Vec::new(),
            ..r
        };
        let text = recommendation_details(&drop, "", Layout::Fit(80));
        assert!(!text.contains("statements it helps ("), "{text}");
        assert!(
            !text.contains("reason:") && !text.contains("HypoPG"),
            "{text}"
        );
        assert!(text.contains("drop_index"), "{text}");
    }

    #[test]
    fn an_analysis_lists_every_statement_its_advice_and_its_problems() {
        let r = applied_recommendation();
        let analysis = Analysis {
            id: "0198f3a1-0000-7000-8000-00000000abcd".into(),
            instance_id: r.instance_id.clone(),
            state: AnalysisState::Done as i32,
            budget_bytes: 524_288_000,
            max_indexes: 10,
            workload_source: "collector".into(),
            statements: vec![
                StatementOutcome {
                    query_id: -8_270_145_529_340_217_213,
                    text: "SELECT id FROM orders WHERE customer_id = $1".into(),
                    calls: 120_344.0,
                    share_of_time: 0.512,
                    planning: "with values sampled from the statistics".into(),
                    cost_before: 18_334.2,
                    cost_after: 24.6,
                    plan_before: "Seq Scan on orders".into(),
                    plan_after: "Index Scan using orders(customer_id) on orders".into(),
                    ..Default::default()
                },
                StatementOutcome {
                    query_id: 77,
                    calls: 3.0,
                    share_of_time: 0.01,
                    problem: "its text is not readable (needs pg_read_all_stats)".into(),
                    ..Default::default()
                },
            ],
            recommendation_ids: vec![r.id.clone()],
            whatif_calls: 148,
            cache_hits: 37,
            elapsed: Some(prost_types::Duration {
                seconds: 4,
                nanos: 250_000_000,
            }),
            problems: vec![
                "the key cannot read other roles' statement texts: GRANT pg_read_all_stats TO keel;"
                    .into(),
            ],
            ..Default::default()
        };
        let text = analysis_text(
            "orders-db",
            &analysis,
            std::slice::from_ref(&r),
            Layout::Fit(100),
        );
        for needle in [
            "500 MiB, at most 10 new indexes",
            "2 statements, from collector",
            "148 asked of PostgreSQL, 37 answered from the cache",
            "4.25 s",
            "statements (2):",
            "-8270145529340217213",
            "18334.2 → 24.6 (745× cheaper)",
            "readable (needs",
            "recommendations (1):",
            "3f4a5b6c7d8e",
            "create_index",
            "\n  the key cannot read other roles' statement texts: GRANT pg_read_all_stats TO keel;",
            "`keel recs show 3f4a5b6c7d8e`",
        ] {
            assert!(text.contains(needle), "{needle:?} in\n{text}");
        }
        assert!(!text.contains(&r.id[..20]), "short ids only:\n{text}");
        let json = analysis_json("orders-db", &analysis, &[r]);
        assert_eq!(json["statements"][0]["query_id"], "-8270145529340217213");
        assert_eq!(json["recommendations"][0]["state"], "applied");
        assert_eq!(
            json["recommendations"][0]["effects"][1]["query_id"],
            "4411092177263556101"
        );
        assert_eq!(json["elapsed_seconds"], 4.25);
        let empty = analysis_text("db", &Analysis::default(), &[], Layout::Fit(80));
        assert!(empty.contains("no statements in the window"), "{empty}");
        assert!(empty.contains("no recommendations"), "{empty}");
        assert!(!empty.contains("keel recs show"), "{empty}");
    }

    #[test]
    fn a_list_of_recommendations_fits_and_names_the_instance() {
        let mut r = applied_recommendation();
        r.created_at = ts(chrono::Utc::now().timestamp() - 300);
        let other = Recommendation {
            id: "0198f3a2-7c4e-7b1a-9d2e-000000000001".into(),
            instance_id: "gone".into(),
            state: RecommendationState::Failed as i32,
            state_reason: "lock_timeout".into(),
            ..r.clone()
        };
        let names = std::collections::HashMap::from([(r.instance_id.clone(), "orders-db".into())]);
        let text = recommendations_table(&[r.clone(), other], &names, Layout::Fit(80));
        for line in text.lines() {
            assert!(line.chars().count() <= 80, "{line:?} in\n{text}");
        }
        assert!(text.starts_with("ID "), "{text}");
        for needle in [
            "3f4a5b6c7d8e",
            "000000000001",
            "applied",
            "failed",
            "public.orders",
        ] {
            assert!(text.contains(needle), "{needle} in\n{text}");
        }
        let wide = recommendations_table(&[r.clone()], &names, Layout::Wide);
        for needle in [
            r.id.as_str(),
            "orders-db",
            "5m ago",
            "21 MiB",
            "63.4%",
            "verified valid",
        ] {
            assert!(wide.contains(needle), "{needle} in\n{wide}");
        }
        assert_eq!(
            recommendations_table(&[], &names, Layout::Fit(80)),
            "no recommendations"
        );
        assert_eq!(
            recommendation_state_line(&r),
            "keel_orders_customer_id_created_at_3f4a5b6c (3f4a5b6c7d8e): applied; built in 4.2 s and verified valid (indisvalid)"
        );
        let json = recommendation_json(&r);
        assert_eq!(json["kind"], "create_index");
        assert_eq!(json["estimated_bytes"], 22_020_096);
    }

    #[test]
    fn costs_and_plans_show_before_and_after_once_each() {
        assert_eq!(cost_change(200.0, 50.0), "200 → 50 (4× cheaper)");
        assert_eq!(cost_change(200.0, 150.0), "200 → 150 (-25%)");
        assert_eq!(cost_change(100.0, 130.0), "100 → 130 (+30%)");
        assert_eq!(cost_change(100.0, 40.0), "100 → 40 (2.5× cheaper)");
        assert_eq!(cost_change(10.5, 10.5), "10.5");
        assert_eq!(cost_change(0.0, 0.0), "");
        assert_eq!(cost_change(0.0, 3.0), "0 → 3");
        assert_eq!(
            plan_change("Seq Scan on t", "Seq Scan on t"),
            "Seq Scan on t"
        );
        assert_eq!(plan_change("Seq Scan on t", ""), "Seq Scan on t");
        assert_eq!(
            plan_change("Seq Scan on t", "Index Scan using t(a) on t"),
            "Seq Scan on t → Index Scan using t(a) on t"
        );
        assert_eq!(
            short_id("0198f3a2-7c4e-7b1a-9d2e-3f4a5b6c7d8e"),
            "3f4a5b6c7d8e"
        );
        assert_eq!(short_id("plain"), "plain");
        assert_eq!(shortened("a  b\n c", Some(10)), "a b c");
        assert_eq!(shortened("abc def ghi", Some(6)), "abc d…");
    }
}
