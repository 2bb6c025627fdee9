//! Rendering results as tables for people or JSON for scripts.

use comfy_table::presets::UTF8_BORDERS_ONLY;
use comfy_table::{ContentArrangement, Table};
use keel_proto::v1::{
    CheckFinding, CheckStatus, Engine, Event, Instance, InstanceHealth, InstanceRole, event,
};
use serde_json::{Value, json};

pub(crate) fn table(header: &[&str]) -> Table {
    let mut table = Table::new();
    table
        .load_preset(UTF8_BORDERS_ONLY)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_header(header);
    table
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

pub(crate) fn instances_table(instances: &[Instance]) -> Table {
    let mut t = table(&[
        "NAME", "ENGINE", "ENV", "URL", "LABELS", "HEALTH", "VERSION", "ID",
    ]);
    for i in instances {
        t.add_row(vec![
            i.name.clone(),
            engine(i.engine).to_owned(),
            i.environment.clone(),
            i.connection_url.clone(),
            labels_text(i),
            health_text(i.health.as_ref()),
            i.version.to_string(),
            i.id.clone(),
        ]);
    }
    t
}

pub(crate) fn instance_details(i: &Instance) -> Table {
    let mut t = table(&["FIELD", "VALUE"]);
    let health = i.health.as_ref();
    let rows: Vec<(&str, String)> = vec![
        ("id", i.id.clone()),
        ("name", i.name.clone()),
        ("tenant", i.tenant.clone()),
        ("engine", engine(i.engine).to_owned()),
        ("connection_url", i.connection_url.clone()),
        ("environment", i.environment.clone()),
        ("labels", labels_text(i)),
        (
            "monitoring_endpoints",
            i.monitoring_endpoints
                .iter()
                .map(|e| format!("{}={}", e.kind, e.url))
                .collect::<Vec<_>>()
                .join(" "),
        ),
        ("health", health_text(health)),
        (
            "server_version",
            health.map(|h| h.server_version.clone()).unwrap_or_default(),
        ),
        (
            "last_error",
            health.map(|h| h.error.clone()).unwrap_or_default(),
        ),
        ("version", i.version.to_string()),
        (
            "created",
            time(i.create_time.as_ref())
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        ),
        (
            "updated",
            time(i.update_time.as_ref())
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        ),
    ];
    for (field, value) in rows {
        t.add_row(vec![field.to_owned(), value]);
    }
    t
}

pub(crate) fn findings_json(findings: &[CheckFinding]) -> Value {
    findings
        .iter()
        .map(|f| json!({"name": f.name, "status": status(f.status), "detail": f.detail, "fix": f.fix}))
        .collect()
}

pub(crate) fn findings_table(findings: &[CheckFinding]) -> Table {
    let mut t = table(&["CHECK", "STATUS", "DETAIL", "FIX"]);
    for f in findings {
        t.add_row(vec![
            f.name.clone(),
            status(f.status).to_owned(),
            f.detail.clone(),
            f.fix.clone(),
        ]);
    }
    t
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
        None => String::new(),
    };
    format!(
        "{}  {subject}  tenant={}  {summary}",
        at.as_str().unwrap_or("-"),
        event.tenant
    )
}
