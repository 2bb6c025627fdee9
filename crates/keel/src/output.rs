//! Rendering results as tables for people or JSON for scripts, and writing them.
//!
//! Everything goes through [`print`], never `println!`: when the reader of standard output
//! goes away (`keel … | head`) the command stops quietly instead of panicking.

use std::io::Write as _;

use keel_proto::v1::{
    Alert, CheckFinding, CheckStatus, Engine, Event, Instance, InstanceHealth, InstanceRole,
    Metric, ScrapeStatus, Series, TopQuery, event,
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
}
