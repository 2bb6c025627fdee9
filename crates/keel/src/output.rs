//! Rendering results as tables for people or JSON for scripts, and writing them.
//!
//! Everything goes through [`print`], never `println!`: when the reader of standard output
//! goes away (`keel … | head`) the command stops quietly instead of panicking.

use std::io::Write as _;

use keel_proto::v1::{
    CheckFinding, CheckStatus, Engine, Event, Instance, InstanceHealth, InstanceRole, event,
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

fn time(ts: Option<&prost_types::Timestamp>) -> Value {
    ts.and_then(|t| chrono::DateTime::from_timestamp(t.seconds, t.nanos.max(0) as u32))
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
