//! The registry's events, written to the outbox in the transaction of each change.

use keel_bus::OutboxMessage;
use keel_proto::v1::{Event, Instance, InstanceCreated, InstanceDeleted, InstanceUpdated, event};
use prost::Message;
use uuid::Uuid;

/// Subject of `InstanceCreated`.
pub const CREATED: &str = "keel.registry.instance.created";
/// Subject of `InstanceUpdated`.
pub const UPDATED: &str = "keel.registry.instance.updated";
/// Subject of `InstanceDeleted`.
pub const DELETED: &str = "keel.registry.instance.deleted";

/// The event for a newly registered instance (its URL already masked).
pub fn created(instance: &Instance) -> OutboxMessage {
    envelope(
        CREATED,
        instance,
        event::Payload::InstanceCreated(InstanceCreated {
            instance: Some(instance.clone()),
        }),
    )
}

/// The event for a changed instance.
pub fn updated(instance: &Instance, changed_fields: Vec<String>) -> OutboxMessage {
    envelope(
        UPDATED,
        instance,
        event::Payload::InstanceUpdated(InstanceUpdated {
            instance: Some(instance.clone()),
            changed_fields,
        }),
    )
}

/// The event for a removed instance.
pub fn deleted(instance: &Instance) -> OutboxMessage {
    envelope(
        DELETED,
        instance,
        event::Payload::InstanceDeleted(InstanceDeleted {
            instance_id: instance.id.clone(),
            name: instance.name.clone(),
            engine: instance.engine,
            version: instance.version,
        }),
    )
}

fn envelope(subject: &str, instance: &Instance, payload: event::Payload) -> OutboxMessage {
    let id = Uuid::now_v7();
    let event = Event {
        id: id.to_string(),
        r#type: subject.to_owned(),
        occurred_at: Some(crate::convert::timestamp(chrono::Utc::now())),
        tenant: instance.tenant.clone(),
        instance_id: instance.id.clone(),
        payload: Some(payload),
    };
    OutboxMessage {
        id,
        // Events of one instance reach subscribers in the order of its versions.
        key: instance.id.clone(),
        subject: subject.to_owned(),
        payload: event.encode_to_vec(),
        headers: keel_telemetry::current_traceparent().into_iter().collect(),
    }
}
