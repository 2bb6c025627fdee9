//! The registry's events, written to the outbox in the transaction of each change.
//!
//! Subjects are `<root>.registry.<tenant>.instance.<verb>` (root from the deployment's
//! configuration); the envelope's `type` is `keel.registry.instance.<verb>` in every deployment.

use keel_bus::{EventKind, OutboxMessage, SubjectError, SubjectRoot};
use keel_proto::v1::{Event, Instance, InstanceCreated, InstanceDeleted, InstanceUpdated, event};
use prost::Message;
use uuid::Uuid;

/// An instance was registered.
pub const CREATED: EventKind = EventKind::new("registry", "instance", "created");
/// An instance changed.
pub const UPDATED: EventKind = EventKind::new("registry", "instance", "updated");
/// An instance was removed.
pub const DELETED: EventKind = EventKind::new("registry", "instance", "deleted");

/// The event for a newly registered instance (its URL already masked).
pub fn created(root: &SubjectRoot, instance: &Instance) -> Result<OutboxMessage, SubjectError> {
    envelope(
        root,
        &CREATED,
        instance,
        event::Payload::InstanceCreated(InstanceCreated {
            instance: Some(instance.clone()),
        }),
    )
}

/// The event for a changed instance.
pub fn updated(
    root: &SubjectRoot,
    instance: &Instance,
    changed_fields: Vec<String>,
) -> Result<OutboxMessage, SubjectError> {
    envelope(
        root,
        &UPDATED,
        instance,
        event::Payload::InstanceUpdated(InstanceUpdated {
            instance: Some(instance.clone()),
            changed_fields,
        }),
    )
}

/// The event for a removed instance.
pub fn deleted(root: &SubjectRoot, instance: &Instance) -> Result<OutboxMessage, SubjectError> {
    envelope(
        root,
        &DELETED,
        instance,
        event::Payload::InstanceDeleted(InstanceDeleted {
            instance_id: instance.id.clone(),
            name: instance.name.clone(),
            engine: instance.engine,
            version: instance.version,
        }),
    )
}

fn envelope(
    root: &SubjectRoot,
    kind: &EventKind,
    instance: &Instance,
    payload: event::Payload,
) -> Result<OutboxMessage, SubjectError> {
    let subject = root.subject(kind, &instance.tenant)?;
    let id = Uuid::now_v7();
    let event = Event {
        id: id.to_string(),
        r#type: kind.type_name(),
        occurred_at: Some(crate::convert::timestamp(chrono::Utc::now())),
        tenant: instance.tenant.clone(),
        instance_id: instance.id.clone(),
        payload: Some(payload),
    };
    Ok(OutboxMessage {
        id,
        // Events of one instance reach subscribers in the order of its versions.
        key: instance.id.clone(),
        subject,
        payload: event.encode_to_vec(),
        headers: keel_telemetry::current_traceparent().into_iter().collect(),
    })
}
