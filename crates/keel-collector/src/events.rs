//! The collector's events: `<root>.collector.<tenant>.alert.firing|resolved`, written to the
//! outbox in the transaction that changes the alert.

use keel_bus::{EventKind, OutboxMessage, SubjectError, SubjectRoot};
use keel_proto::v1::{AlertFiring, AlertResolved, Event, event};
use prost::Message as _;
use uuid::Uuid;

use crate::convert;
use crate::store::AlertRow;

/// An alert started firing.
pub const FIRING: EventKind = EventKind::new("collector", "alert", "firing");
/// An alert resolved.
pub const RESOLVED: EventKind = EventKind::new("collector", "alert", "resolved");

pub(crate) fn firing(root: &SubjectRoot, alert: &AlertRow) -> Result<OutboxMessage, SubjectError> {
    let payload = event::Payload::AlertFiring(AlertFiring {
        alert: Some(convert::alert(alert)),
    });
    envelope(root, &FIRING, alert, payload)
}

pub(crate) fn resolved(
    root: &SubjectRoot,
    alert: &AlertRow,
) -> Result<OutboxMessage, SubjectError> {
    let payload = event::Payload::AlertResolved(AlertResolved {
        alert: Some(convert::alert(alert)),
    });
    envelope(root, &RESOLVED, alert, payload)
}

fn envelope(
    root: &SubjectRoot,
    kind: &EventKind,
    alert: &AlertRow,
    payload: event::Payload,
) -> Result<OutboxMessage, SubjectError> {
    let id = Uuid::now_v7();
    let event = Event {
        id: id.to_string(),
        r#type: kind.type_name(),
        occurred_at: Some(convert::timestamp(chrono::Utc::now())),
        tenant: alert.tenant.clone(),
        instance_id: alert.instance_id.to_string(),
        payload: Some(payload),
    };
    Ok(OutboxMessage {
        id,
        // One alert's firing and resolution reach subscribers in order.
        key: alert.fingerprint.clone(),
        subject: root.subject(kind, &alert.tenant)?,
        payload: event.encode_to_vec(),
        headers: keel_telemetry::current_traceparent().into_iter().collect(),
    })
}
