//! The optimizer's events: `<root>.optimizer.<tenant>.recommendation.<verb>`, written to the
//! outbox in the transaction that changes the recommendation.

use keel_bus::{EventKind, OutboxMessage, SubjectError, SubjectRoot};
use keel_proto::v1::{Event, RecommendationChanged, event};
use prost::Message as _;
use uuid::Uuid;

use crate::convert;
use crate::store::RecommendationRow;

/// A recommendation was made.
pub const CREATED: EventKind = EventKind::new("optimizer", "recommendation", "created");
/// A recommendation was applied and verified.
pub const APPLIED: EventKind = EventKind::new("optimizer", "recommendation", "applied");
/// A recommendation was rolled back.
pub const ROLLED_BACK: EventKind = EventKind::new("optimizer", "recommendation", "rolled_back");
/// Applying or rolling back a recommendation failed.
pub const FAILED: EventKind = EventKind::new("optimizer", "recommendation", "failed");

/// The event of `row` having reached its current state.
pub(crate) fn changed(
    root: &SubjectRoot,
    kind: &EventKind,
    row: &RecommendationRow,
) -> Result<OutboxMessage, SubjectError> {
    let body = RecommendationChanged {
        recommendation_id: row.id.to_string(),
        kind: convert::kind(&row.kind) as i32,
        state: convert::state(&row.state) as i32,
        table: row.table_name.clone(),
        index_name: row.index_name.clone(),
        ddl: row.ddl.clone(),
        reason: row.state_reason.clone(),
    };
    let payload = match kind.verb {
        "created" => event::Payload::RecommendationCreated(body),
        "applied" => event::Payload::RecommendationApplied(body),
        "rolled_back" => event::Payload::RecommendationRolledBack(body),
        _ => event::Payload::RecommendationFailed(body),
    };
    let id = Uuid::now_v7();
    let event = Event {
        id: id.to_string(),
        r#type: kind.type_name(),
        occurred_at: Some(convert::timestamp(chrono::Utc::now())),
        tenant: row.tenant.clone(),
        instance_id: row.instance_id.to_string(),
        payload: Some(payload),
    };
    Ok(OutboxMessage {
        id,
        // One recommendation's events reach subscribers in order.
        key: row.id.to_string(),
        subject: root.subject(kind, &row.tenant)?,
        payload: event.encode_to_vec(),
        headers: keel_telemetry::current_traceparent().into_iter().collect(),
    })
}
