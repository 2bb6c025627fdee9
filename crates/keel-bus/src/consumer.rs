//! Durable JetStream pull consumers with idempotent handling.
//!
//! Replicas that use the same durable name share one consumer, so JetStream hands
//! each message to one of them. The handler runs in a transaction that first
//! records the event id in the service's `inbox`; a redelivered event finds its id
//! there and is acknowledged without running the handler again. [`run`] prunes the inbox
//! periodically, once an entry is older than [`ConsumerConfig::inbox_retention`], a window that
//! covers every redelivery JetStream may still make.

use std::future::Future;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer::pull};
use bytes::Bytes;
use futures::StreamExt;
use sqlx::{PgConnection, PgPool};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use crate::{Bus, BusError, MSG_ID_HEADER, Outbox};

/// An event as delivered to a handler.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// Event id, from the `Nats-Msg-Id` header.
    pub event_id: Uuid,
    /// Subject it was published on.
    pub subject: String,
    /// Encoded event.
    pub payload: Bytes,
    /// How many times JetStream has delivered it, starting at 1.
    pub attempt: i64,
}

/// Why a handler did not process an event.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// Worth retrying later (a database or peer was unavailable); the event is redelivered.
    #[error("{0}")]
    Retry(String),
    /// Retrying cannot help (a malformed event); the event is acknowledged and dropped.
    #[error("{0}")]
    Reject(String),
}

/// Reacts to events. Effects must go through `tx` so they commit together with the inbox row.
pub trait EventHandler: Send + Sync + 'static {
    /// Handles one event inside the consumer's transaction.
    fn handle<'a>(
        &'a self,
        tx: &'a mut PgConnection,
        delivery: &'a Delivery,
    ) -> impl Future<Output = Result<(), HandlerError>> + Send + 'a;
}

/// Which events a consumer reads and how it retries.
#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    /// Durable name shared by the replicas of one service (e.g. `remediation-alerts`).
    pub durable_name: String,
    /// Subjects to receive, e.g. `keel.collector.*.alert.>` (built with
    /// [`SubjectRoot::filter`](crate::SubjectRoot::filter)). More than one needs nats-server
    /// 2.10 or later; [`run`] fails when the server (or an existing durable consumer of the same
    /// name) filters on anything else.
    pub filter_subjects: Vec<String>,
    /// How long JetStream waits for an acknowledgement before redelivering.
    pub ack_wait: Duration,
    /// Delay before a failed event is redelivered.
    pub retry_delay: Duration,
    /// Most deliveries of one event before JetStream gives up on it.
    pub max_deliver: i64,
    /// How long an event id stays in the inbox. Within it a second delivery of the event has
    /// no effect; [`run`] refuses a retention shorter than the stream's duplicate window or
    /// than the span over which JetStream may redeliver (`max_deliver` × (`ack_wait` +
    /// `retry_delay`)), since an id pruned before its last delivery would be handled again.
    pub inbox_retention: Duration,
    /// How often [`run`] deletes inbox entries older than `inbox_retention`.
    pub prune_interval: Duration,
}

impl ConsumerConfig {
    /// A consumer named `durable_name` for `filter_subjects`, with default timings.
    pub fn new(durable_name: &str, filter_subjects: &[&str]) -> Self {
        Self {
            durable_name: durable_name.to_owned(),
            filter_subjects: filter_subjects.iter().map(|s| (*s).to_owned()).collect(),
            ack_wait: Duration::from_secs(30),
            retry_delay: Duration::from_secs(5),
            max_deliver: 20,
            // Above the default redelivery span (20 × 35 s) and stream duplicate window (10 min).
            inbox_retention: Duration::from_secs(3600),
            prune_interval: Duration::from_secs(60),
        }
    }
}

/// Runs a durable consumer on `bus`'s stream until `shutdown` is cancelled.
///
/// `outbox` names the schema whose `inbox` table de-duplicates events (install it
/// with [`Outbox::install`]).
pub async fn run<H: EventHandler>(
    bus: &Bus,
    pool: &PgPool,
    outbox: &Outbox,
    config: &ConsumerConfig,
    handler: &H,
    shutdown: CancellationToken,
) -> Result<(), BusError> {
    let stream = bus
        .jetstream()
        .get_stream(bus.stream_name())
        .await
        .map_err(|e| BusError::jetstream("get stream", e))?;
    check_retention(config, stream.cached_info().config.duplicate_window)?;
    // One subject goes in `filter_subject`: servers before 2.10 ignore `filter_subjects`
    // (and would deliver every subject of the stream).
    let (filter_subject, filter_subjects) = match config.filter_subjects.as_slice() {
        [one] => (one.clone(), Vec::new()),
        many => (String::new(), many.to_vec()),
    };
    let consumer = stream
        .get_or_create_consumer(
            &config.durable_name,
            pull::Config {
                durable_name: Some(config.durable_name.clone()),
                filter_subject,
                filter_subjects,
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                ack_wait: config.ack_wait,
                max_deliver: config.max_deliver,
                ..Default::default()
            },
        )
        .await
        .map_err(|e| BusError::jetstream("create consumer", e))?;
    // The server may have ignored the filters (several of them before 2.10), or the durable
    // consumer may exist already with other ones: either way it would deliver the wrong events.
    let effective = filters(&consumer.cached_info().config);
    if effective != sorted(&config.filter_subjects) {
        return Err(BusError::JetStream {
            operation: "create consumer",
            source: format!(
                "consumer {} filters {effective:?}, not the configured {:?} (several filter subjects need nats-server 2.10; changed filters need the consumer deleted)",
                config.durable_name, config.filter_subjects
            )
            .into(),
        });
    }
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| BusError::jetstream("pull messages", e))?;
    let mut prune = tokio::time::interval(config.prune_interval);
    prune.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let message = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = prune.tick() => {
                match prune_inbox(pool, outbox, &config.durable_name, config.inbox_retention).await {
                    Ok(0) => {}
                    Ok(pruned) => tracing::debug!(pruned, consumer = %config.durable_name, "pruned the inbox"),
                    Err(error) => tracing::warn!(%error, consumer = %config.durable_name, "pruning the inbox failed; trying again later"),
                }
                continue;
            }
            next = messages.next() => match next {
                None => return Ok(()),
                Some(Ok(message)) => message,
                Some(Err(error)) => {
                    tracing::warn!(%error, consumer = %config.durable_name, "receiving from jetstream failed");
                    continue;
                }
            },
        };
        let span = tracing::info_span!("bus.consume", subject = %message.subject, consumer = %config.durable_name, event_id = tracing::field::Empty);
        keel_telemetry::set_parent_from_nats(&span, message.headers.as_ref());
        let ack = process(pool, outbox, config, handler, &message)
            .instrument(span)
            .await;
        if let Err(error) = message.ack_with(ack).await {
            tracing::warn!(%error, subject = %message.subject, "acknowledging an event failed; it will be redelivered");
        }
    }
}

/// Refuses an inbox retention that would forget an event id while it can still be delivered.
fn check_retention(config: &ConsumerConfig, duplicate_window: Duration) -> Result<(), BusError> {
    let redelivery = (config.ack_wait + config.retry_delay)
        .saturating_mul(u32::try_from(config.max_deliver.max(1)).unwrap_or(u32::MAX));
    let needed = redelivery.max(duplicate_window);
    if config.inbox_retention < needed {
        return Err(BusError::Invalid(format!(
            "consumer {}: inbox retention {:?} is shorter than {needed:?} (the stream's duplicate window {duplicate_window:?}, or max_deliver × (ack_wait + retry_delay) = {redelivery:?}); raise inbox_retention",
            config.durable_name, config.inbox_retention
        )));
    }
    if config.prune_interval.is_zero() {
        return Err(BusError::Invalid(format!(
            "consumer {}: prune interval must be longer than zero",
            config.durable_name
        )));
    }
    Ok(())
}

/// Most inbox rows one prune deletes per statement, and statements per prune: a large
/// backlog is worked off over several prunes instead of holding up event handling.
const PRUNE_BATCH: i64 = 1000;
const PRUNE_BATCHES: usize = 20;

/// Deletes the inbox entries of `consumer` older than `retention` (by the database's clock),
/// at most [`PRUNE_BATCH`] × [`PRUNE_BATCHES`] of them; returns how many.
pub async fn prune_inbox(
    pool: &PgPool,
    outbox: &Outbox,
    consumer: &str,
    retention: Duration,
) -> Result<u64, BusError> {
    let s = outbox.schema();
    let mut pruned = 0;
    for _ in 0..PRUNE_BATCHES {
        let deleted = sqlx::query(&format!(
            "DELETE FROM {s}.inbox WHERE consumer = $1 AND event_id IN (
                 SELECT event_id FROM {s}.inbox
                 WHERE consumer = $1 AND processed_at < now() - make_interval(secs => $2)
                 LIMIT $3)"
        ))
        .bind(consumer)
        .bind(retention.as_secs_f64())
        .bind(PRUNE_BATCH)
        .execute(pool)
        .await?
        .rows_affected();
        pruned += deleted;
        if deleted < PRUNE_BATCH as u64 {
            break;
        }
    }
    Ok(pruned)
}

/// The subjects a consumer's configuration filters on, sorted.
fn filters(config: &jetstream::consumer::Config) -> Vec<String> {
    if config.filter_subjects.is_empty() && !config.filter_subject.is_empty() {
        vec![config.filter_subject.clone()]
    } else {
        sorted(&config.filter_subjects)
    }
}

fn sorted(subjects: &[String]) -> Vec<String> {
    let mut subjects = subjects.to_vec();
    subjects.sort();
    subjects
}

async fn process<H: EventHandler>(
    pool: &PgPool,
    outbox: &Outbox,
    config: &ConsumerConfig,
    handler: &H,
    message: &jetstream::Message,
) -> AckKind {
    let event_id = message
        .headers
        .as_ref()
        .and_then(|h| h.get(MSG_ID_HEADER.clone()))
        .and_then(|v| Uuid::parse_str(v.as_str()).ok());
    let Some(event_id) = event_id else {
        tracing::warn!(subject = %message.subject, "event without a valid Nats-Msg-Id header; dropped");
        return AckKind::Term;
    };
    tracing::Span::current().record("event_id", tracing::field::display(event_id));
    let attempt = message.info().map(|i| i.delivered).unwrap_or(1);
    let delivery = Delivery {
        event_id,
        subject: message.subject.to_string(),
        payload: message.payload.clone(),
        attempt,
    };
    match handle_once(pool, outbox, &config.durable_name, handler, &delivery).await {
        Ok(true) => AckKind::Ack,
        Ok(false) => {
            tracing::debug!("event already processed; acknowledged again");
            AckKind::Ack
        }
        Err(HandlerError::Reject(reason)) => {
            tracing::warn!(%reason, "event rejected by its handler; dropped");
            AckKind::Term
        }
        Err(HandlerError::Retry(reason)) => {
            tracing::warn!(%reason, attempt, "event handling failed; will retry");
            AckKind::Nak(Some(config.retry_delay))
        }
    }
}

/// Runs the handler unless the event was processed before; true when it ran.
pub async fn handle_once<H: EventHandler>(
    pool: &PgPool,
    outbox: &Outbox,
    consumer: &str,
    handler: &H,
    delivery: &Delivery,
) -> Result<bool, HandlerError> {
    let retry = |e: sqlx::Error| HandlerError::Retry(e.to_string());
    let mut tx = pool.begin().await.map_err(retry)?;
    let first_time = sqlx::query(&format!(
        "INSERT INTO {}.inbox (consumer, event_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
        outbox.schema()
    ))
    .bind(consumer)
    .bind(delivery.event_id)
    .execute(&mut *tx)
    .await
    .map_err(retry)?
    .rows_affected()
        == 1;
    if !first_time {
        return Ok(false);
    }
    handler.handle(&mut tx, delivery).await?;
    tx.commit().await.map_err(retry)?;
    Ok(true)
}
