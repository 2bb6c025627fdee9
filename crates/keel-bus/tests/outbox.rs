//! The outbox and its relay against real PostgreSQL and NATS: every committed event reaches the
//! `KEEL` stream exactly once, whatever point a relay dies at; nothing else does.

mod common;

use std::time::Duration;

use common::*;
use keel_bus::{BusError, MSG_ID_HEADER, Outbox, OutboxMessage, RelayConfig};
use sqlx::Connection as _;
use tokio::time::Instant;

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

#[tokio::test]
async fn a_committed_row_is_published_with_its_id_and_headers_then_deleted() {
    let t = TestBus::start().await;
    let mut sent = event("keel.test.thing.created");
    sent.headers
        .insert("traceparent".to_owned(), TRACEPARENT.to_owned());
    sent.headers
        .insert("tracestate".to_owned(), "keel=1".to_owned());
    t.commit(std::slice::from_ref(&sent)).await;
    assert_eq!(t.pending().await, 1);

    let published = t.relay().publish_pending().await.expect("publish");

    assert_eq!(published, 1);
    assert_eq!(t.pending().await, 0, "the published row is deleted");
    let messages = t.stream_messages().await;
    assert_eq!(messages.len(), 1);
    let message = &messages[0];
    assert_eq!(message.subject.as_str(), "keel.test.thing.created");
    assert_eq!(message.payload.as_ref(), sent.payload.as_slice());
    let headers = message.headers.as_ref().expect("headers");
    let header = |name: &str| headers.get(name).map(|v| v.as_str().to_owned());
    assert_eq!(
        headers.get(MSG_ID_HEADER).map(|v| v.as_str()),
        Some(sent.id.to_string().as_str())
    );
    assert_eq!(header("traceparent").as_deref(), Some(TRACEPARENT));
    assert_eq!(header("tracestate").as_deref(), Some("keel=1"));
}

/// Extra headers come from the caller's request; none of them may forge the event id, which
/// would break de-duplication (and make consumers drop the event).
#[tokio::test]
async fn extra_headers_cannot_replace_or_forge_the_event_id() {
    let t = TestBus::start().await;
    let mut sent = event("keel.test.thing.created");
    for (name, value) in [
        ("traceparent", TRACEPARENT),
        ("Nats-Msg-Id", "replaced"),
        ("nats-msg-id", "replaced-lowercase"),
        ("x-note", "injected\r\nNats-Msg-Id: forged"),
        ("bad name", "spaces are not allowed in names"),
    ] {
        sent.headers.insert(name.to_owned(), value.to_owned());
    }
    t.commit(std::slice::from_ref(&sent)).await;

    assert_eq!(t.relay().publish_pending().await.expect("publish"), 1);

    let messages = t.stream_messages().await;
    let headers = messages[0].headers.as_ref().expect("headers");
    let ids: Vec<&str> = headers.get_all(MSG_ID_HEADER).map(|v| v.as_str()).collect();
    assert_eq!(ids, [sent.id.to_string().as_str()]);
    let mut names: Vec<&str> = headers
        .iter()
        .map(|(name, _)| AsRef::<str>::as_ref(name))
        .collect();
    names.sort_unstable();
    assert_eq!(
        names,
        ["Nats-Msg-Id", "traceparent"],
        "unusable headers left out"
    );
}

#[tokio::test]
async fn a_rolled_back_row_is_never_published() {
    let t = TestBus::start().await;
    let rolled_back = event("keel.test.thing.created");
    let committed = event("keel.test.thing.created");
    let mut tx = t.pool.begin().await.expect("begin");
    t.outbox
        .enqueue(&mut tx, &rolled_back)
        .await
        .expect("enqueue");
    tx.rollback().await.expect("rollback");
    t.commit(std::slice::from_ref(&committed)).await;

    let published = t.relay().publish_pending().await.expect("publish");

    assert_eq!(published, 1);
    assert_eq!(t.pending().await, 0);
    let messages = t.stream_messages().await;
    assert_each_once(&messages, &[committed]);
}

/// The relay was down (killed between the commit and the publish): everything committed
/// meanwhile goes out once, in commit order, as soon as a relay runs again.
#[tokio::test]
async fn rows_committed_while_no_relay_runs_are_published_once_when_one_starts() {
    let t = TestBus::start().await;
    let sent = events("keel.test.thing.created", 50);
    for chunk in sent.chunks(10) {
        t.commit(chunk).await;
    }
    assert_eq!(t.pending().await, 50, "committed, not published");
    assert_eq!(t.stream_len().await, 0);
    let subscriber = t
        .bus
        .jetstream()
        .get_stream(t.bus.stream_name())
        .await
        .expect("stream")
        .create_consumer(async_nats::jetstream::consumer::pull::Config {
            durable_name: Some("subscriber".to_owned()),
            ack_policy: async_nats::jetstream::consumer::AckPolicy::Explicit,
            ..Default::default()
        })
        .await
        .expect("subscriber");

    // Batches smaller than the backlog: one pass of the relay takes several claims.
    let _relay = t.spawn_relay(t.relay_with(RelayConfig {
        batch_size: 7,
        ..RelayConfig::default()
    }));
    let received = read(&subscriber, sent.len()).await;
    for message in &received {
        message.ack().await.expect("ack");
    }

    assert_each_once(&received, &sent);
    let order: Vec<_> = received.iter().map(|m| msg_id(m)).collect();
    let committed: Vec<_> = sent.iter().map(|m| m.id).collect();
    assert_eq!(order, committed, "published in commit order");
    eventually("the outbox to drain", async || {
        (t.pending().await == 0).then_some(())
    })
    .await;
    assert_eq!(t.stream_len().await, 50, "nothing published twice");
}

/// The relay died after JetStream stored the message but before deleting the row: the next
/// relay republishes it under the same id, the stream drops the copy, and the row goes.
#[tokio::test]
async fn a_row_published_but_not_deleted_is_deduplicated_and_deleted() {
    let t = TestBus::start().await;
    let sent = event("keel.test.thing.created");
    t.commit(std::slice::from_ref(&sent)).await;
    // What the dead relay did before its claim rolled back: publish the row.
    let ack = t.publish_directly(&sent).await;
    assert!(!ack.duplicate);

    let published = t.relay().publish_pending().await.expect("publish");

    assert_eq!(published, 1, "acknowledged (as a duplicate)");
    assert_eq!(t.pending().await, 0, "the row is deleted");
    assert_eq!(t.stream_len().await, 1, "the stream kept one copy");
    assert_each_once(&t.stream_messages().await, &[sent]);
}

/// A relay claimed a batch (deleted its rows in an open transaction) and died before it
/// committed: the rows are back as soon as its connection is gone, with no lease to wait for.
#[tokio::test]
async fn rows_claimed_by_a_relay_that_died_are_free_at_once() {
    let t = TestBus::start().await;
    let sent = events("keel.test.thing.created", 3);
    t.commit(&sent).await;
    let mut dead_relay = sqlx::PgConnection::connect(&t.database_url)
        .await
        .expect("the dead relay's connection");
    sqlx::query("BEGIN")
        .execute(&mut dead_relay)
        .await
        .expect("begin");
    let claimed = sqlx::query("DELETE FROM svc.outbox RETURNING id")
        .fetch_all(&mut dead_relay)
        .await
        .expect("claim as a relay does");
    assert_eq!(claimed.len(), 3);
    let relay = t.relay();
    assert_eq!(
        relay.publish_pending().await.expect("publish"),
        0,
        "the claim keeps other relays off"
    );

    dead_relay.close().await.expect("the relay dies");
    let died_at = Instant::now();
    let published = eventually("the rows to come back", async || {
        match relay.publish_pending().await.expect("publish") {
            0 => None,
            n => Some(n),
        }
    })
    .await;

    assert!(
        died_at.elapsed() < Duration::from_secs(2),
        "took {:?}",
        died_at.elapsed()
    );
    assert_eq!(published, 3);
    assert_eq!(t.pending().await, 0);
    assert_each_once(&t.stream_messages().await, &sent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_draining_one_outbox_publish_each_event_once() {
    let t = TestBus::start().await;
    let sent = events("keel.test.thing.created", 500);
    t.commit(&sent).await;
    let config = RelayConfig {
        batch_size: 20,
        ..RelayConfig::default()
    };
    let start = std::sync::Arc::new(tokio::sync::Barrier::new(2));
    let tasks: Vec<_> = (0..2)
        .map(|_| {
            let relay = t.relay_with(config.clone());
            let outbox = t.outbox.clone();
            let pool = t.pool.clone();
            let start = start.clone();
            tokio::spawn(async move {
                start.wait().await;
                let mut published = 0;
                let mut rounds = 0;
                // Rounds until the outbox is empty; the other relay may hold claims meanwhile.
                while outbox.pending(&pool).await.expect("pending") > 0 {
                    published += relay.publish_pending().await.expect("publish");
                    rounds += 1;
                    tokio::task::yield_now().await;
                }
                (published, rounds)
            })
        })
        .collect();
    let mut published = 0;
    for task in tasks {
        let (n, _rounds) = tokio::time::timeout(DEADLINE, task)
            .await
            .expect("relays finish")
            .expect("relay task");
        published += n;
    }

    assert_eq!(published, 500, "each row published by exactly one relay");
    assert_eq!(t.pending().await, 0);
    assert_eq!(t.stream_len().await, 500);
    assert_each_once(&t.stream_messages().await, &sent);
}

#[tokio::test]
async fn run_publishes_on_the_commit_notification_without_waiting_for_the_poll() {
    let t = TestBus::start().await;
    let _relay = t.spawn_relay(t.relay_with(RelayConfig {
        poll_interval: Duration::from_secs(60),
        ..RelayConfig::default()
    }));
    // A first event shows the relay is up and past its start-up pass.
    let first = event("keel.test.thing.created");
    t.commit(std::slice::from_ref(&first)).await;
    eventually("the first event", async || {
        (t.stream_len().await == 1).then_some(())
    })
    .await;

    let second = event("keel.test.thing.updated");
    let committed_at = Instant::now();
    t.commit(std::slice::from_ref(&second)).await;
    eventually("the second event", async || {
        (t.stream_len().await == 2).then_some(())
    })
    .await;

    assert!(
        committed_at.elapsed() < Duration::from_secs(5),
        "took {:?}",
        committed_at.elapsed()
    );
    assert_each_once(&t.stream_messages().await, &[first, second]);
}

#[test]
fn outbox_new_refuses_schema_names_that_are_not_plain_identifiers() {
    let too_long = "s".repeat(64);
    for bad in [
        "",
        "Svc",
        "1svc",
        "svc-x",
        "svc x",
        "svc.outbox",
        "svc; DROP TABLE x",
        "\"svc\"",
        too_long.as_str(),
    ] {
        assert!(
            matches!(Outbox::new(bad), Err(BusError::Store(_))),
            "{bad:?} accepted"
        );
    }
    assert_eq!(Outbox::new("svc_2").expect("valid").schema(), "svc_2");
}

#[tokio::test]
async fn install_is_idempotent_and_keeps_pending_rows() {
    let t = TestBus::start().await;
    let sent = event("keel.test.thing.created");
    t.commit(std::slice::from_ref(&sent)).await;

    t.outbox.install(&t.pool).await.expect("second install");
    t.outbox.install(&t.pool).await.expect("third install");

    assert_eq!(t.pending().await, 1, "installing again keeps the rows");
    assert_eq!(t.relay().publish_pending().await.expect("publish"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn install_is_safe_when_replicas_run_it_at_once() {
    let t = TestBus::start().await;
    for round in 0..5 {
        let schema = format!("svc_concurrent_{round}");
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let outbox = Outbox::new(&schema).expect("valid schema");
                let pool = t.pool.clone();
                tokio::spawn(async move {
                    outbox.install(&pool).await?;
                    // Each replica may use the tables as soon as its own install returns.
                    let inbox: i64 = sqlx::query_scalar(&format!(
                        "SELECT count(*) FROM {}.inbox",
                        outbox.schema()
                    ))
                    .fetch_one(&pool)
                    .await?;
                    Ok::<_, BusError>((outbox.pending(&pool).await?, inbox))
                })
            })
            .collect();
        for task in tasks {
            let counts = task
                .await
                .expect("install task")
                .unwrap_or_else(|e| panic!("concurrent install in {schema}: {e}"));
            assert_eq!(counts, (0, 0));
        }
    }
}

#[tokio::test]
async fn an_event_without_an_ordering_key_is_refused_and_nothing_is_stored() {
    let t = TestBus::start().await;
    let keyless = OutboxMessage::new("", "keel.test.thing.created", b"x".to_vec());
    let mut tx = t.pool.begin().await.expect("begin");

    let error = t
        .outbox
        .enqueue(&mut tx, &keyless)
        .await
        .expect_err("an empty key is refused")
        .to_string();

    assert!(error.contains("empty ordering key"), "{error}");
    tx.commit().await.expect("commit");
    assert_eq!(t.pending().await, 0);
}

/// An outbox installed by the previous version (no sequence, no key) keeps its rows and gets
/// the new columns; its rows are published.
#[tokio::test]
async fn install_upgrades_an_outbox_of_the_previous_version() {
    let t = TestBus::start().await;
    sqlx::raw_sql(
        "CREATE SCHEMA old;
         CREATE TABLE old.outbox (
             id uuid PRIMARY KEY, subject text NOT NULL, payload bytea NOT NULL,
             headers jsonb NOT NULL DEFAULT '{}', created_at timestamptz NOT NULL DEFAULT now(),
             attempts integer NOT NULL DEFAULT 0, claimed_until timestamptz, last_error text);
         INSERT INTO old.outbox (id, subject, payload) VALUES
             ('00000000-0000-7000-8000-000000000001', 'keel.test.old.created', 'a'),
             ('00000000-0000-7000-8000-000000000002', 'keel.test.old.created', 'b');",
    )
    .execute(&t.pool)
    .await
    .expect("an old outbox");
    let outbox = Outbox::new("old").expect("valid schema");

    outbox.install(&t.pool).await.expect("upgrade");
    outbox.install(&t.pool).await.expect("and again");

    assert_eq!(outbox.pending(&t.pool).await.expect("pending"), 2);
    let relay = keel_bus::Relay::new(
        t.pool.clone(),
        outbox.clone(),
        t.bus.jetstream().clone(),
        RelayConfig::default(),
    );
    assert_eq!(relay.publish_pending().await.expect("publish"), 2);
    assert_eq!(t.stream_len().await, 2);
}
