//! Durable consumers against real PostgreSQL and NATS: a handler's effects commit once per
//! event id, whatever JetStream redelivers; retries come back, rejections do not.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::consumer;
use bytes::Bytes;
use common::*;
use keel_bus::consumer::{ConsumerConfig, Delivery, EventHandler, HandlerError, handle_once};
use keel_bus::{OutboxMessage, RelayConfig, StreamSettings};
use sqlx::PgConnection;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Records every run, and each successful one as a row in `svc.effects` written through the
/// consumer's transaction; fails the first runs of each event or rejects some subjects on demand.
#[derive(Debug, Default)]
struct Recorder {
    /// Every run, committed or not: (event id, delivery attempt).
    runs: Mutex<Vec<(Uuid, i64)>>,
    /// Runs of each event that end in `Retry` (after writing their effect, to be rolled back).
    fail_first: usize,
    /// Events on subjects starting with this are rejected (after writing their effect).
    reject_prefix: Option<&'static str>,
}

impl Recorder {
    fn failing_first(fail_first: usize) -> Self {
        Self {
            fail_first,
            ..Self::default()
        }
    }

    fn rejecting(prefix: &'static str) -> Self {
        Self {
            reject_prefix: Some(prefix),
            ..Self::default()
        }
    }

    fn runs_of(&self, id: Uuid) -> Vec<i64> {
        let runs = self.runs.lock().expect("runs lock");
        runs.iter()
            .filter(|(e, _)| *e == id)
            .map(|(_, a)| *a)
            .collect()
    }

    fn run_count(&self) -> usize {
        self.runs.lock().expect("runs lock").len()
    }
}

impl EventHandler for Recorder {
    async fn handle(&self, tx: &mut PgConnection, delivery: &Delivery) -> Result<(), HandlerError> {
        let earlier_runs = {
            let mut runs = self.runs.lock().expect("runs lock");
            runs.push((delivery.event_id, delivery.attempt));
            runs.iter().filter(|(e, _)| *e == delivery.event_id).count() - 1
        };
        sqlx::query("INSERT INTO svc.effects (event_id, attempt) VALUES ($1, $2)")
            .bind(delivery.event_id)
            .bind(delivery.attempt)
            .execute(&mut *tx)
            .await
            .map_err(|e| HandlerError::Retry(e.to_string()))?;
        if self
            .reject_prefix
            .is_some_and(|prefix| delivery.subject.starts_with(prefix))
        {
            return Err(HandlerError::Reject("not for us".to_owned()));
        }
        if earlier_runs < self.fail_first {
            return Err(HandlerError::Retry("not yet".to_owned()));
        }
        Ok(())
    }
}

/// The bus with a `svc.effects` table for the handler to write.
async fn start(settings: StreamSettings) -> TestBus {
    let t = TestBus::start_with(settings).await;
    sqlx::query("CREATE TABLE svc.effects (event_id uuid NOT NULL, attempt bigint NOT NULL)")
        .execute(&t.pool)
        .await
        .expect("effects table");
    t
}

/// Committed effects, oldest first.
async fn effects(t: &TestBus) -> Vec<(Uuid, i64)> {
    sqlx::query_as("SELECT event_id, attempt FROM svc.effects ORDER BY event_id, attempt")
        .fetch_all(&t.pool)
        .await
        .expect("effects")
}

/// Event ids in the inbox of `consumer`.
async fn inbox(t: &TestBus, consumer: &str) -> Vec<Uuid> {
    sqlx::query_scalar("SELECT event_id FROM svc.inbox WHERE consumer = $1 ORDER BY event_id")
        .bind(consumer)
        .fetch_all(&t.pool)
        .await
        .expect("inbox")
}

/// Fast retries, so redelivery tests take milliseconds.
fn config(durable_name: &str, filter: &str) -> ConsumerConfig {
    ConsumerConfig {
        retry_delay: Duration::from_millis(100),
        ..ConsumerConfig::new(durable_name, &[filter])
    }
}

/// Runs `keel_bus::consumer::run` in a task until the guard is dropped.
fn spawn_consumer(t: &TestBus, config: ConsumerConfig, handler: Arc<Recorder>) -> CancelOnDrop {
    let token = CancellationToken::new();
    let shutdown = token.clone();
    let (bus, pool, outbox) = (t.bus.clone(), t.pool.clone(), t.outbox.clone());
    tokio::spawn(async move {
        keel_bus::consumer::run(&bus, &pool, &outbox, &config, &*handler, shutdown)
            .await
            .expect("consumer runs");
    });
    CancelOnDrop(token)
}

/// Waits until the durable consumer has settled (acknowledged, terminated) every one of
/// `count` deliveries and has nothing left to deliver, then returns its state.
async fn settled(t: &TestBus, durable_name: &str, count: u64) -> consumer::Info {
    let stream = t
        .bus
        .jetstream()
        .get_stream(t.bus.stream_name())
        .await
        .expect("stream");
    eventually("the consumer to settle every delivery", async || {
        let info = stream.consumer_info(durable_name).await.ok()?;
        (info.ack_floor.stream_sequence >= count
            && info.num_ack_pending == 0
            && info.num_pending == 0)
            .then_some(info)
    })
    .await
}

fn delivery(message: &OutboxMessage, attempt: i64) -> Delivery {
    Delivery {
        event_id: message.id,
        subject: message.subject.clone(),
        payload: Bytes::from(message.payload.clone()),
        attempt,
    }
}

#[tokio::test]
async fn handle_once_runs_the_handler_once_per_event_and_consumer() {
    let t = start(StreamSettings::default()).await;
    let handler = Recorder::default();
    let sent = event("keel.test.thing.created");

    let first = handle_once(&t.pool, &t.outbox, "a", &handler, &delivery(&sent, 1)).await;
    let again = handle_once(&t.pool, &t.outbox, "a", &handler, &delivery(&sent, 2)).await;
    let other = handle_once(&t.pool, &t.outbox, "b", &handler, &delivery(&sent, 1)).await;

    assert!(matches!(first, Ok(true)), "{first:?}");
    assert!(matches!(again, Ok(false)), "{again:?}");
    assert!(
        matches!(other, Ok(true)),
        "another consumer has its own inbox: {other:?}"
    );
    assert_eq!(effects(&t).await, [(sent.id, 1), (sent.id, 1)]);
    assert_eq!(inbox(&t, "a").await, [sent.id]);
}

#[tokio::test]
async fn handle_once_rolls_back_a_failed_handler_with_its_inbox_row() {
    let t = start(StreamSettings::default()).await;
    let sent = event("keel.test.thing.created");
    let retrying = Recorder::failing_first(1);

    let failed = handle_once(&t.pool, &t.outbox, "a", &retrying, &delivery(&sent, 1)).await;
    assert!(matches!(failed, Err(HandlerError::Retry(_))), "{failed:?}");
    assert!(
        effects(&t).await.is_empty(),
        "the failed run's effect is rolled back"
    );
    assert!(inbox(&t, "a").await.is_empty(), "and so is its inbox row");

    let retried = handle_once(&t.pool, &t.outbox, "a", &retrying, &delivery(&sent, 2)).await;
    assert!(
        matches!(retried, Ok(true)),
        "the retry runs the handler: {retried:?}"
    );
    assert_eq!(effects(&t).await, [(sent.id, 2)]);

    let rejected = event("keel.test.bad.created");
    let rejecting = Recorder::rejecting("keel.test.bad.");
    let outcome = handle_once(&t.pool, &t.outbox, "a", &rejecting, &delivery(&rejected, 1)).await;
    assert!(
        matches!(outcome, Err(HandlerError::Reject(_))),
        "{outcome:?}"
    );
    assert_eq!(
        effects(&t).await,
        [(sent.id, 2)],
        "a rejected event has no effect"
    );
    assert_eq!(inbox(&t, "a").await, [sent.id]);
}

/// The same event id stored twice in the stream (published again after the de-duplication
/// window, as a relay replaced too late would do) is delivered twice but handled once.
#[tokio::test]
async fn an_event_delivered_twice_runs_the_handler_once() {
    let window = Duration::from_millis(200);
    let t = start(StreamSettings {
        duplicate_window: window,
        ..StreamSettings::default()
    })
    .await;
    let handler = Arc::new(Recorder::default());
    let _consumer = spawn_consumer(&t, config("effects", "keel.test.>"), handler.clone());
    let sent = event("keel.test.thing.created");

    assert!(!t.publish_directly(&sent).await.duplicate);
    eventually("the first delivery's effect", async || {
        (!effects(&t).await.is_empty()).then_some(())
    })
    .await;
    // Publish the same id again until the stream no longer remembers it.
    eventually("the de-duplication window to pass", async || {
        (!t.publish_directly(&sent).await.duplicate).then_some(())
    })
    .await;
    let info = settled(&t, "effects", 2).await;

    assert_eq!(t.stream_len().await, 2, "the stream holds the event twice");
    assert_eq!(
        info.delivered.stream_sequence, 2,
        "both copies were delivered"
    );
    assert_eq!(
        handler.runs_of(sent.id),
        [1],
        "the handler ran for the first copy only"
    );
    assert_eq!(effects(&t).await, [(sent.id, 1)]);
    assert_eq!(inbox(&t, "effects").await, [sent.id]);
}

#[tokio::test]
async fn a_retried_event_is_redelivered_until_the_handler_succeeds() {
    let t = start(StreamSettings::default()).await;
    let handler = Arc::new(Recorder::failing_first(2));
    let _consumer = spawn_consumer(&t, config("effects", "keel.test.>"), handler.clone());
    let sent = event("keel.test.thing.created");

    t.publish_directly(&sent).await;
    settled(&t, "effects", 1).await;

    assert_eq!(
        handler.runs_of(sent.id),
        [1, 2, 3],
        "two retries, then success"
    );
    assert_eq!(
        effects(&t).await,
        [(sent.id, 3)],
        "failed runs left no effect"
    );
    assert_eq!(inbox(&t, "effects").await, [sent.id]);
}

#[tokio::test]
async fn a_rejected_event_is_dropped_without_retry() {
    let t = start(StreamSettings::default()).await;
    let handler = Arc::new(Recorder::rejecting("keel.test.bad."));
    let _consumer = spawn_consumer(&t, config("effects", "keel.test.>"), handler.clone());
    let rejected = event("keel.test.bad.created");
    let accepted = event("keel.test.good.created");

    t.publish_directly(&rejected).await;
    t.publish_directly(&accepted).await;
    settled(&t, "effects", 2).await;

    assert_eq!(handler.runs_of(rejected.id), [1], "no retry");
    assert_eq!(handler.runs_of(accepted.id), [1]);
    assert_eq!(effects(&t).await, [(accepted.id, 1)]);
    assert_eq!(inbox(&t, "effects").await, [accepted.id]);
}

#[tokio::test]
async fn an_event_without_an_id_is_dropped() {
    let t = start(StreamSettings::default()).await;
    let handler = Arc::new(Recorder::default());
    let _consumer = spawn_consumer(&t, config("effects", "keel.test.>"), handler.clone());
    let accepted = event("keel.test.thing.created");

    t.bus
        .jetstream()
        .publish("keel.test.thing.created", "no id".into())
        .await
        .expect("publish")
        .await
        .expect("stored");
    t.publish_directly(&accepted).await;
    settled(&t, "effects", 2).await;

    assert_eq!(
        handler.run_count(),
        1,
        "the handler never saw the event without an id"
    );
    assert_eq!(effects(&t).await, [(accepted.id, 1)]);
}

#[tokio::test]
async fn a_consumer_receives_only_its_filter_subjects() {
    let t = start(StreamSettings::default()).await;
    let handler = Arc::new(Recorder::default());
    let _consumer = spawn_consumer(&t, config("alerts", "keel.test.alert.>"), handler.clone());
    let other = event("keel.test.instance.created");
    let alert = event("keel.test.alert.firing");

    t.publish_directly(&other).await;
    t.publish_directly(&alert).await;
    let info = settled(&t, "alerts", 2).await;

    assert_eq!(info.delivered.consumer_sequence, 1, "one delivery");
    assert_eq!(effects(&t).await, [(alert.id, 1)]);
}

/// A durable consumer left by an earlier version with other filters would deliver the wrong
/// events: `run` refuses it instead.
#[tokio::test]
async fn run_refuses_a_durable_consumer_with_other_filters() {
    let t = start(StreamSettings::default()).await;
    t.bus
        .jetstream()
        .get_stream(t.bus.stream_name())
        .await
        .expect("stream")
        .create_consumer(consumer::pull::Config {
            durable_name: Some("alerts".to_owned()),
            filter_subject: "keel.test.instance.>".to_owned(),
            ..Default::default()
        })
        .await
        .expect("an old consumer");

    let outcome = tokio::time::timeout(
        DEADLINE,
        keel_bus::consumer::run(
            &t.bus,
            &t.pool,
            &t.outbox,
            &config("alerts", "keel.test.alert.>"),
            &Recorder::default(),
            CancellationToken::new(),
        ),
    )
    .await
    .expect("run returns");

    let error = outcome.expect_err("filters differ").to_string();
    assert!(error.contains("keel.test.instance.>"), "{error}");
}

/// Replicas share one durable consumer: together they handle each event once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_sharing_a_durable_consumer_handle_each_event_once() {
    let t = start(StreamSettings::default()).await;
    let handler = Arc::new(Recorder::default());
    let _replicas = [
        spawn_consumer(&t, config("effects", "keel.test.>"), handler.clone()),
        spawn_consumer(&t, config("effects", "keel.test.>"), handler.clone()),
    ];
    let sent = events("keel.test.thing.created", 100);
    for message in &sent {
        t.publish_directly(message).await;
    }
    settled(&t, "effects", 100).await;

    let handled: Vec<Uuid> = effects(&t).await.into_iter().map(|(id, _)| id).collect();
    let mut expected: Vec<Uuid> = sent.iter().map(|m| m.id).collect();
    expected.sort_unstable();
    assert_eq!(handled, expected, "each event handled once");
    assert_eq!(handler.run_count(), 100);
}

/// The whole path: a change's transaction commits an outbox row, the relay publishes it, and
/// a consumer of another service handles it once.
#[tokio::test]
async fn an_event_committed_in_an_outbox_reaches_a_consumer_once() {
    let t = start(StreamSettings::default()).await;
    let handler = Arc::new(Recorder::default());
    let _consumer = spawn_consumer(&t, config("effects", "keel.test.>"), handler.clone());
    let _relay = t.spawn_relay(t.relay_with(RelayConfig::default()));
    let sent = events("keel.test.thing.created", 3);

    t.commit(&sent).await;
    settled(&t, "effects", 3).await;

    let handled: Vec<Uuid> = effects(&t).await.into_iter().map(|(id, _)| id).collect();
    assert_eq!(handled, sent.iter().map(|m| m.id).collect::<Vec<_>>());
    assert_eq!(t.pending().await, 0);
}

/// Inbox entries older than the retention go, younger ones stay and still de-duplicate.
#[tokio::test]
async fn the_inbox_is_pruned_after_the_retention_and_still_deduplicates_within_it() {
    let t = start(StreamSettings::default()).await;
    let handler = Recorder::default();
    let old = event("keel.test.thing.created");
    let recent = event("keel.test.thing.updated");
    for sent in [&old, &recent] {
        handle_once(&t.pool, &t.outbox, "a", &handler, &delivery(sent, 1))
            .await
            .expect("handled");
    }
    sqlx::query(
        "UPDATE svc.inbox SET processed_at = now() - interval '2 hours' WHERE event_id = $1",
    )
    .bind(old.id)
    .execute(&t.pool)
    .await
    .expect("age one entry");
    // Another consumer's old entry is not this consumer's to prune.
    handle_once(&t.pool, &t.outbox, "b", &handler, &delivery(&old, 1))
        .await
        .expect("handled by b");
    sqlx::query(
        "UPDATE svc.inbox SET processed_at = now() - interval '2 hours' WHERE consumer = 'b'",
    )
    .execute(&t.pool)
    .await
    .expect("age b's entry");

    let pruned =
        keel_bus::consumer::prune_inbox(&t.pool, &t.outbox, "a", Duration::from_secs(3600))
            .await
            .expect("prune");

    assert_eq!(pruned, 1);
    assert_eq!(inbox(&t, "a").await, [recent.id]);
    assert_eq!(inbox(&t, "b").await, [old.id]);
    let again = handle_once(&t.pool, &t.outbox, "a", &handler, &delivery(&recent, 2)).await;
    assert!(matches!(again, Ok(false)), "still de-duplicated: {again:?}");
}

/// `run` prunes by itself, periodically.
#[tokio::test]
async fn run_prunes_the_inbox_periodically() {
    let t = start(StreamSettings::default()).await;
    let handler = Arc::new(Recorder::default());
    let old = event("keel.test.thing.created");
    handle_once(&t.pool, &t.outbox, "effects", &*handler, &delivery(&old, 1))
        .await
        .expect("handled");
    sqlx::query("UPDATE svc.inbox SET processed_at = now() - interval '2 hours'")
        .execute(&t.pool)
        .await
        .expect("age the entry");
    let _consumer = spawn_consumer(
        &t,
        ConsumerConfig {
            prune_interval: Duration::from_millis(100),
            ..config("effects", "keel.test.>")
        },
        handler.clone(),
    );

    eventually("the old entry to be pruned", async || {
        inbox(&t, "effects").await.is_empty().then_some(())
    })
    .await;
}

/// A retention shorter than the redelivery span would let a redelivered event run twice.
#[tokio::test]
async fn run_refuses_an_inbox_retention_shorter_than_redelivery() {
    let t = start(StreamSettings::default()).await;
    let outcome = tokio::time::timeout(
        DEADLINE,
        keel_bus::consumer::run(
            &t.bus,
            &t.pool,
            &t.outbox,
            &ConsumerConfig {
                inbox_retention: Duration::from_secs(60),
                ..config("effects", "keel.test.>")
            },
            &Recorder::default(),
            CancellationToken::new(),
        ),
    )
    .await
    .expect("run returns");

    let error = outcome.expect_err("retention too short").to_string();
    assert!(error.contains("raise inbox_retention"), "{error}");
}
