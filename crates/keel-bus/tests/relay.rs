//! The relay's guarantees against real PostgreSQL and NATS: each key's events in order with
//! concurrent relays whatever the ids say, a refused event holds back only its own key, dead
//! letters after repeated refusals, two writes per event, a listener that comes back, and a
//! stuck relay that loses its claim after the lease.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use keel_bus::{OutboxMessage, RelayConfig};
use sqlx::Connection as _;
use tokio::time::Instant;
use uuid::Uuid;

/// A subject no stream captures: JetStream answers "no responders" and the publish is refused.
const OUTSIDE: &str = "elsewhere.test.thing.created";

/// Relays that retry a refused event only after a minute, so a test sees it wait.
fn patient() -> RelayConfig {
    RelayConfig {
        retry_backoff: Duration::from_secs(60),
        max_attempts: 100,
        ..RelayConfig::default()
    }
}

/// `(key, version)` from the payloads made by [`versioned`].
fn key_version(message: &async_nats::jetstream::Message) -> (String, u32) {
    let text = std::str::from_utf8(&message.payload).expect("utf-8 payload");
    let (key, version) = text.split_once(' ').expect("`key version` payload");
    (key.to_owned(), version.parse().expect("a version number"))
}

fn versioned(key: &str, version: u32, id: Uuid) -> OutboxMessage {
    OutboxMessage {
        id,
        ..OutboxMessage::new(
            key,
            "keel.test.thing.updated",
            format!("{key} {version}").into_bytes(),
        )
    }
}

/// Ids handed out newest first, as replicas whose clocks run behind one another would: the
/// id order is the reverse of the commit order, so a relay that orders by id reorders.
fn reversed_ids(count: usize) -> Vec<Uuid> {
    let mut ids: Vec<Uuid> = (0..count).map(|_| Uuid::now_v7()).collect();
    ids.reverse();
    ids
}

/// Each key's events reach the subscriber in the order of its versions, with three relays
/// publishing at once, a backlog, and writers still committing, although ids run backwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_keys_events_arrive_in_version_order_with_concurrent_relays() {
    const KEYS: usize = 12;
    const VERSIONS: u32 = 20;
    let t = Arc::new(TestBus::start().await);
    let mut ids = reversed_ids(KEYS * VERSIONS as usize).into_iter();
    let plan: Vec<Vec<OutboxMessage>> = (0..KEYS)
        .map(|k| {
            let key = format!("instance-{k}");
            (0..VERSIONS)
                .map(|v| versioned(&key, v, ids.next().expect("enough ids")))
                .collect()
        })
        .collect();
    // A backlog committed while no relay runs: the first half of every key's versions.
    for version in 0..VERSIONS as usize / 2 {
        for key in plan.iter().rev() {
            t.commit(std::slice::from_ref(&key[version])).await;
        }
    }
    let config = RelayConfig {
        batch_size: 7,
        ..RelayConfig::default()
    };
    let _relays: Vec<_> = (0..3)
        .map(|_| t.spawn_relay(t.relay_with(config.clone())))
        .collect();
    // The second half from one writer per key, all at once, while the relays drain.
    let writers: Vec<_> = plan
        .iter()
        .map(|versions| {
            let (t, versions) = (t.clone(), versions[VERSIONS as usize / 2..].to_vec());
            tokio::spawn(async move {
                for message in versions {
                    t.commit(std::slice::from_ref(&message)).await;
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.expect("writer");
    }
    eventually("every event in the stream", async || {
        (t.stream_len().await >= (KEYS * VERSIONS as usize) as u64).then_some(())
    })
    .await;

    let received = t.stream_messages().await;
    let all: Vec<OutboxMessage> = plan.into_iter().flatten().collect();
    assert_each_once(&received, &all);
    let mut seen: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    for message in &received {
        let (key, version) = key_version(message);
        seen.entry(key).or_default().push(version);
    }
    assert_eq!(seen.len(), KEYS);
    for (key, versions) in seen {
        assert_eq!(
            versions,
            (0..VERSIONS).collect::<Vec<_>>(),
            "{key}'s versions out of order"
        );
    }
}

/// JetStream refuses one event mid-batch: the events of other keys in that batch are published
/// by the same pass, the refused one and those after it of the same key wait, and nothing is
/// held for a lease (new events of other keys go out on the next pass).
#[tokio::test]
async fn a_refused_event_holds_back_only_the_later_events_of_its_key() {
    let t = TestBus::start().await;
    let a1 = keyed("a", "keel.test.thing.created");
    let a2 = keyed("a", OUTSIDE);
    let a3 = keyed("a", "keel.test.thing.updated");
    let others: Vec<OutboxMessage> = (0..6)
        .map(|n| keyed(&format!("other-{n}"), "keel.test.thing.created"))
        .collect();
    let mut batch = vec![a1.clone(), a2.clone(), a3.clone()];
    batch.extend(others.iter().cloned());
    t.commit(&batch).await;
    let relay = t.relay_with(patient());

    let started = Instant::now();
    let published = relay
        .publish_pending()
        .await
        .expect("a refusal is no relay failure");

    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(published, 7, "a1 and the six others");
    let mut expected = vec![a1.clone()];
    expected.extend(others.iter().cloned());
    assert_each_once(&t.stream_messages().await, &expected);
    let waiting: Vec<(Uuid, i32, Option<String>)> =
        sqlx::query_as("SELECT id, attempts, last_error FROM svc.outbox ORDER BY seq")
            .fetch_all(&t.pool)
            .await
            .expect("waiting rows");
    assert_eq!(waiting.len(), 2, "{waiting:?}");
    assert_eq!(
        (waiting[0].0, waiting[0].1),
        (a2.id, 1),
        "the refused event, one attempt"
    );
    let error = waiting[0].2.as_deref().unwrap_or_default();
    assert!(error.contains("no stream"), "{error}");
    assert_eq!(
        (waiting[1].0, waiting[1].1),
        (a3.id, 0),
        "the next of its key, untouched"
    );

    // Released at once: a new event of another key goes out on the next pass, a's stay.
    let later = keyed("other-0", "keel.test.thing.updated");
    t.commit(std::slice::from_ref(&later)).await;
    assert_eq!(relay.publish_pending().await.expect("publish"), 1);
    assert_eq!(t.stream_ids().await.last(), Some(&later.id));
    assert_eq!(t.pending().await, 2);
}

/// Another relay is publishing a key's oldest event (it holds the row): this relay publishes
/// the other keys and leaves that key alone, then takes the rest in order once it is free.
#[tokio::test]
async fn a_key_held_by_another_relay_is_skipped_with_its_later_events() {
    let t = TestBus::start().await;
    let a1 = keyed("a", "keel.test.thing.created");
    let a2 = keyed("a", "keel.test.thing.updated");
    let b1 = keyed("b", "keel.test.thing.created");
    t.commit(&[a1.clone(), a2.clone(), b1.clone()]).await;
    let mut other_relay = sqlx::PgConnection::connect(&t.database_url)
        .await
        .expect("the other relay's connection");
    let mut holding = other_relay.begin().await.expect("begin");
    sqlx::query("SELECT 1 FROM svc.outbox WHERE id = $1 FOR UPDATE")
        .bind(a1.id)
        .execute(&mut *holding)
        .await
        .expect("hold a1");
    let relay = t.relay();

    assert_eq!(relay.publish_pending().await.expect("publish"), 1);
    assert_eq!(t.stream_ids().await, [b1.id], "a2 did not overtake a1");

    holding.rollback().await.expect("the other relay lets go");
    assert_eq!(relay.publish_pending().await.expect("publish"), 2);
    assert_eq!(t.stream_ids().await, [b1.id, a1.id, a2.id]);
}

/// After `max_attempts` refusals the event moves to the dead-letter table, counted in the
/// metric; the later events of its key go on; an operator can re-drive it.
#[tokio::test]
async fn an_event_refused_max_attempts_times_becomes_a_dead_letter() {
    let t = TestBus::start().await;
    let relay = t.relay_with(RelayConfig {
        max_attempts: 3,
        retry_backoff: Duration::from_millis(20),
        ..RelayConfig::default()
    });
    let mut registry = prometheus_client::registry::Registry::default();
    relay.register_metrics(&mut registry);
    let a1 = keyed("a", "keel.test.thing.created");
    let a2 = keyed("a", OUTSIDE);
    let a3 = keyed("a", "keel.test.thing.updated");
    t.commit(&[a1.clone(), a2.clone(), a3.clone()]).await;

    eventually("a dead letter", async || {
        relay.publish_pending().await.expect("publish");
        (t.outbox.dead_letters(&t.pool).await.expect("count") == 1).then_some(())
    })
    .await;

    assert_eq!(
        t.stream_ids().await,
        [a1.id, a3.id],
        "a3 went on without a2"
    );
    assert_eq!(t.pending().await, 0);
    let (id, attempts, error): (Uuid, i32, String) =
        sqlx::query_as("SELECT id, attempts, last_error FROM svc.outbox_dead_letter")
            .fetch_one(&t.pool)
            .await
            .expect("the dead letter");
    assert_eq!((id, attempts), (a2.id, 3));
    assert!(error.contains("no stream"), "{error}");
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
    assert!(
        text.contains("keel_outbox_dead_letters_total{schema=\"svc\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("keel_outbox_refused_total{schema=\"svc\"} 3"),
        "{text}"
    );
    assert!(
        text.contains("keel_outbox_published_total{schema=\"svc\"} 2"),
        "{text}"
    );

    assert!(t.outbox.redrive(&t.pool, a2.id).await.expect("redrive"));
    assert!(
        !t.outbox
            .redrive(&t.pool, a2.id)
            .await
            .expect("redrive again")
    );
    assert_eq!(t.outbox.dead_letters(&t.pool).await.expect("count"), 0);
    let attempts: Vec<i32> = sqlx::query_scalar("SELECT attempts FROM svc.outbox WHERE id = $1")
        .bind(a2.id)
        .fetch_all(&t.pool)
        .await
        .expect("the re-driven row");
    assert_eq!(attempts, [0], "back in the outbox, its attempts afresh");
}

/// The happy path costs two writes per event in the outbox: the enqueue's insert and the
/// relay's delete, and no update.
#[tokio::test]
async fn each_published_event_costs_one_insert_and_one_delete() {
    const EVENTS: i64 = 40;
    let t = TestBus::start().await;
    let sent: Vec<OutboxMessage> = (0..EVENTS)
        .map(|n| keyed(&format!("k{}", n % 5), "keel.test.thing.created"))
        .collect();
    for chunk in sent.chunks(4) {
        t.commit(chunk).await;
    }
    assert_eq!(
        t.relay().publish_pending().await.expect("publish"),
        EVENTS as usize
    );

    // Statistics reach the view when each backend flushes them, within seconds.
    let (inserted, updated, deleted) = eventually("the table statistics", async || {
        let counts: (i64, i64, i64) = sqlx::query_as(
            "SELECT n_tup_ins, n_tup_upd, n_tup_del FROM pg_stat_user_tables
             WHERE schemaname = 'svc' AND relname = 'outbox'",
        )
        .fetch_one(&t.pool)
        .await
        .expect("statistics");
        (counts.0 >= EVENTS && counts.2 >= EVENTS).then_some(counts)
    })
    .await;
    assert_eq!((inserted, updated, deleted), (EVENTS, 0, EVENTS));
}

/// The relay's listener is cut off while PostgreSQL refuses new connections: the relay keeps
/// trying to listen and, once it can, a commit is published on its notification again, well
/// before the next poll.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_whose_listen_fails_listens_again() {
    let t = TestBus::start().await;
    // From another database: PostgreSQL cannot lock out the one a session is connected to.
    let admin_url = t
        .database_url
        .replacen(t.database_name.as_str(), "postgres", 1);
    let mut admin = sqlx::PgConnection::connect(&admin_url)
        .await
        .expect("admin connection");
    // The relay's pool gives up quickly when PostgreSQL refuses, so that its attempts to
    // listen fail instead of waiting out the refusal.
    let relay_pool = sqlx::postgres::PgPoolOptions::new()
        .acquire_timeout(Duration::from_millis(500))
        .connect(&t.database_url)
        .await
        .expect("the relay's pool");
    let _relay = t.spawn_relay(keel_bus::Relay::new(
        relay_pool,
        t.outbox.clone(),
        t.bus.jetstream().clone(),
        RelayConfig {
            poll_interval: Duration::from_secs(120),
            ..RelayConfig::default()
        },
    ));
    let first = event("keel.test.thing.created");
    t.commit(std::slice::from_ref(&first)).await;
    eventually("the first event", async || {
        (t.stream_len().await == 1).then_some(())
    })
    .await;

    let db = &t.database_name;
    sqlx::raw_sql(&format!(r#"ALTER DATABASE "{db}" ALLOW_CONNECTIONS false"#))
        .execute(&mut admin)
        .await
        .expect("refuse connections");
    let killed: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE datname = $1",
    )
    .bind(db)
    .fetch_all(&mut admin)
    .await
    .expect("cut every other connection");
    assert!(!killed.is_empty(), "the relay's listener was connected");
    // Long enough for the relay to notice and for its attempts to reconnect to fail.
    tokio::time::sleep(Duration::from_secs(3)).await;
    sqlx::raw_sql(&format!(r#"ALTER DATABASE "{db}" ALLOW_CONNECTIONS true"#))
        .execute(&mut admin)
        .await
        .expect("accept connections");
    // The relay is back to waiting: anything published now comes from a notification.
    tokio::time::sleep(Duration::from_secs(3)).await;

    let second = event("keel.test.thing.updated");
    t.commit(std::slice::from_ref(&second)).await;
    let committed_at = Instant::now();
    eventually("the second event", async || {
        (t.stream_len().await == 2).then_some(())
    })
    .await;

    assert!(
        committed_at.elapsed() < Duration::from_secs(10),
        "took {:?}",
        committed_at.elapsed()
    );
    assert_eq!(t.stream_ids().await, [first.id, second.id]);
}

/// A relay that claimed a batch and then waits forever for JetStream (a network that stopped
/// delivering) loses its claim after `lease`: PostgreSQL ends its idle transaction, the rows
/// come back in order, and another relay publishes them; when the stuck relay wakes up, its
/// late publishes are duplicates that JetStream drops and its commit fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_stuck_on_jetstream_loses_its_claim_after_the_lease() {
    const COUNT: usize = 5;
    let t = TestBus::start().await;
    let proxy = FreezingProxy::start(&t.nats_url).await;
    let stuck_bus = keel_bus::Bus::connect(
        &keel_config::NatsConfig::from_url(&proxy.url),
        &keel_bus::StreamSettings::default(),
    )
    .await
    .expect("connect through the proxy");
    let mut stuck_jetstream = stuck_bus.jetstream().clone();
    // Far beyond the lease and the test: only the lease can free the rows in time.
    stuck_jetstream.set_timeout(Duration::from_secs(120));
    let lease = Duration::from_secs(1);
    let stuck = keel_bus::Relay::new(
        t.pool.clone(),
        t.outbox.clone(),
        stuck_jetstream,
        RelayConfig { lease, ..patient() },
    );
    let messages: Vec<OutboxMessage> = (0..COUNT as u32)
        .map(|v| versioned("k", v, Uuid::now_v7()))
        .collect();
    t.commit(&messages).await;

    proxy.freeze();
    let stuck_run = tokio::spawn(async move { stuck.publish_pending().await });
    let healthy = t.relay();
    // The claim is held once the stuck relay's transaction waits, idle after its claim, for
    // JetStream (idle between two earlier statements does not count).
    let waiting = Instant::now();
    loop {
        let idle: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = $1 AND state = 'idle in transaction'
               AND query LIKE '%DELETE FROM svc.outbox%'",
        )
        .bind(&t.database_name)
        .fetch_one(&t.pool)
        .await
        .expect("read pg_stat_activity");
        if idle == 1 {
            break;
        }
        assert!(
            waiting.elapsed() < DEADLINE,
            "the stuck relay never claimed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let claimed = Instant::now();
    // While the stuck relay holds its claim, the rows are skipped, not published twice.
    assert_eq!(healthy.publish_pending().await.expect("publish"), 0);

    let mut published = 0;
    while published < COUNT {
        assert!(
            claimed.elapsed() < lease + DEADLINE,
            "the stuck relay's rows never came back"
        );
        published += healthy.publish_pending().await.expect("publish");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Measured from when the claim was seen, so the lease may have started a little earlier.
    assert!(
        claimed.elapsed() >= lease / 2,
        "rows came back before the lease ran out"
    );
    let order: Vec<u32> = t
        .stream_messages()
        .await
        .iter()
        .map(|m| key_version(m).1)
        .collect();
    assert_eq!(order, (0..COUNT as u32).collect::<Vec<_>>());

    proxy.thaw();
    let outcome = tokio::time::timeout(DEADLINE, stuck_run)
        .await
        .expect("the stuck relay finishes once the network is back")
        .expect("relay task");
    assert!(
        outcome.is_err(),
        "a relay whose session was ended must not report success: {outcome:?}"
    );
    assert_eq!(
        t.stream_len().await,
        COUNT as u64,
        "late publishes were de-duplicated"
    );
    assert_eq!(t.pending().await, 0);
}

/// A TCP proxy to NATS that can stop delivering what the client sends, as a network that
/// drops packets would, while keeping the connection open.
struct FreezingProxy {
    url: String,
    frozen: Arc<tokio::sync::watch::Sender<bool>>,
    _accept: CancelOnDrop,
}

impl FreezingProxy {
    async fn start(nats_url: &str) -> Self {
        let upstream = nats_url
            .trim_start_matches("nats://")
            .rsplit('@')
            .next()
            .expect("host:port")
            .to_owned();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let url = format!("nats://{}", listener.local_addr().expect("proxy address"));
        let frozen = Arc::new(tokio::sync::watch::channel(false).0);
        let token = tokio_util::sync::CancellationToken::new();
        let (accepting, stop) = (frozen.clone(), token.clone());
        tokio::spawn(async move {
            loop {
                let client = tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok((client, _)) => client,
                        Err(_) => return,
                    },
                    () = stop.cancelled() => return,
                };
                let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
                    return;
                };
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                tokio::spawn(pump(
                    client_read,
                    server_write,
                    accepting.subscribe(),
                    stop.clone(),
                ));
                tokio::spawn(pump(
                    server_read,
                    client_write,
                    accepting.subscribe(),
                    stop.clone(),
                ));
            }
        });
        Self {
            url,
            frozen,
            _accept: CancelOnDrop(token),
        }
    }

    fn freeze(&self) {
        self.frozen.send_replace(true);
    }

    fn thaw(&self) {
        self.frozen.send_replace(false);
    }
}

/// Copies `from` to `to`, holding each chunk back while the proxy is frozen.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut frozen: tokio::sync::watch::Receiver<bool>,
    stop: tokio_util::sync::CancellationToken,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buffer = vec![0; 64 * 1024];
    loop {
        let read = tokio::select! {
            read = from.read(&mut buffer) => match read {
                Ok(0) | Err(_) => return,
                Ok(read) => read,
            },
            () = stop.cancelled() => return,
        };
        if frozen.wait_for(|frozen| !frozen).await.is_err() {
            return;
        }
        if to.write_all(&buffer[..read]).await.is_err() {
            return;
        }
    }
}
