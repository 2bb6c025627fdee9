//! Setup shared by the bus tests: a fresh database with the `svc` outbox installed, a private
//! nats-server with the `KEEL` stream, and small readers of what the stream holds.

#![allow(dead_code, unreachable_pub)] // each test binary uses a different part

use std::collections::HashSet;
use std::time::Duration;

use async_nats::jetstream::publish::PublishAck;
use async_nats::jetstream::{self, consumer::AckPolicy, consumer::DeliverPolicy, consumer::pull};
use futures::StreamExt;
use keel_bus::{Bus, Outbox, OutboxMessage, Relay, RelayConfig, StreamSettings};
use keel_config::NatsConfig;
use keel_testkit::TestEnv;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Schema the tests' outbox and inbox live in.
pub const SCHEMA: &str = "svc";

/// How long any wait in a test may take before it counts as a failure.
pub const DEADLINE: Duration = Duration::from_secs(15);

/// One test's servers, pool, bus and outbox. Dropping it stops the servers.
#[derive(Debug)]
pub struct TestBus {
    pub pool: PgPool,
    pub bus: Bus,
    pub outbox: Outbox,
    pub nats_url: String,
    /// The test database's URL (superuser) and name.
    pub database_url: String,
    pub database_name: String,
    _env: TestEnv,
}

impl TestBus {
    /// Servers with the default stream settings.
    pub async fn start() -> Self {
        Self::start_with(StreamSettings::default()).await
    }

    /// Servers whose `KEEL` stream is created with `settings`.
    pub async fn start_with(settings: StreamSettings) -> Self {
        let env = TestEnv::new();
        let db = env.database().await.expect("test database");
        let pool = db.pool().await.expect("test pool");
        let nats_url = env.nats_url().await.expect("test nats-server");
        let bus = Bus::connect(&NatsConfig::from_url(&nats_url), &settings)
            .await
            .expect("connect the bus");
        let outbox = Outbox::new(SCHEMA).expect("valid schema");
        outbox.install(&pool).await.expect("install the outbox");
        Self {
            pool,
            bus,
            outbox,
            nats_url,
            database_url: db.url.clone(),
            database_name: db.name.clone(),
            _env: env,
        }
    }

    /// A relay with the default settings.
    pub fn relay(&self) -> Relay {
        self.relay_with(RelayConfig::default())
    }

    pub fn relay_with(&self, config: RelayConfig) -> Relay {
        Relay::new(
            self.pool.clone(),
            self.outbox.clone(),
            self.bus.jetstream().clone(),
            config,
        )
    }

    /// Runs `relay` in a task until the returned guard is dropped.
    pub fn spawn_relay(&self, relay: Relay) -> CancelOnDrop {
        let token = CancellationToken::new();
        tokio::spawn(relay.run(token.clone()));
        CancelOnDrop(token)
    }

    /// Enqueues `messages` in one transaction and commits it.
    pub async fn commit(&self, messages: &[OutboxMessage]) {
        let mut tx = self.pool.begin().await.expect("begin");
        for message in messages {
            self.outbox
                .enqueue(&mut tx, message)
                .await
                .expect("enqueue");
        }
        tx.commit().await.expect("commit");
    }

    /// Publishes `message` straight to JetStream with its id in `Nats-Msg-Id`, as a relay does.
    pub async fn publish_directly(&self, message: &OutboxMessage) -> PublishAck {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(keel_bus::MSG_ID_HEADER, message.id.to_string().as_str());
        self.bus
            .jetstream()
            .publish_with_headers(
                message.subject.clone(),
                headers,
                message.payload.clone().into(),
            )
            .await
            .expect("publish")
            .await
            .expect("stored by JetStream")
    }

    /// Rows still in the outbox.
    pub async fn pending(&self) -> i64 {
        self.outbox
            .pending(&self.pool)
            .await
            .expect("count pending")
    }

    /// Number of messages the `KEEL` stream holds.
    pub async fn stream_len(&self) -> u64 {
        let stream = self
            .bus
            .jetstream()
            .get_stream(self.bus.stream_name())
            .await
            .expect("stream");
        stream.get_info().await.expect("stream info").state.messages
    }

    /// The event ids the `KEEL` stream holds, oldest first.
    pub async fn stream_ids(&self) -> Vec<Uuid> {
        self.stream_messages()
            .await
            .iter()
            .map(|m| msg_id(m))
            .collect()
    }

    /// Every message the `KEEL` stream holds, oldest first.
    pub async fn stream_messages(&self) -> Vec<jetstream::Message> {
        let expected = self.stream_len().await as usize;
        let consumer = self
            .bus
            .jetstream()
            .get_stream(self.bus.stream_name())
            .await
            .expect("stream")
            .create_consumer(pull::Config {
                deliver_policy: DeliverPolicy::All,
                ack_policy: AckPolicy::None,
                ..Default::default()
            })
            .await
            .expect("reader consumer");
        read(&consumer, expected).await
    }
}

/// Cancels a spawned relay or consumer when dropped, so a failing test stops it too.
#[derive(Debug)]
pub struct CancelOnDrop(pub CancellationToken);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

/// Ordering key of the events made by [`event`].
pub const KEY: &str = "thing-1";

/// An event about [`KEY`] with a fresh UUIDv7 id whose payload names it.
pub fn event(subject: &str) -> OutboxMessage {
    keyed(KEY, subject)
}

/// An event about `key` with a fresh UUIDv7 id whose payload names it.
pub fn keyed(key: &str, subject: &str) -> OutboxMessage {
    let mut message = OutboxMessage::new(key, subject, Vec::new());
    message.payload = format!("event {}", message.id).into_bytes();
    message
}

/// `count` events about [`KEY`] on `subject`.
pub fn events(subject: &str, count: usize) -> Vec<OutboxMessage> {
    (0..count).map(|_| event(subject)).collect()
}

/// The event id a message carries in `Nats-Msg-Id`.
pub fn msg_id(message: &async_nats::Message) -> Uuid {
    let value = message
        .headers
        .as_ref()
        .and_then(|h| h.get(keel_bus::MSG_ID_HEADER))
        .expect("a Nats-Msg-Id header");
    Uuid::parse_str(value.as_str()).expect("Nats-Msg-Id is a uuid")
}

/// Asserts that `messages` carry exactly the ids of `sent`, each once.
pub fn assert_each_once(messages: &[jetstream::Message], sent: &[OutboxMessage]) {
    let received: Vec<Uuid> = messages.iter().map(|m| msg_id(m)).collect();
    let distinct: HashSet<Uuid> = received.iter().copied().collect();
    assert_eq!(distinct.len(), received.len(), "an event arrived twice");
    let expected: HashSet<Uuid> = sent.iter().map(|m| m.id).collect();
    assert_eq!(distinct, expected, "received ids differ from the sent ones");
}

/// Reads `count` messages from `consumer`, failing after [`DEADLINE`].
pub async fn read(
    consumer: &jetstream::consumer::PullConsumer,
    count: usize,
) -> Vec<jetstream::Message> {
    let mut messages = consumer.messages().await.expect("pull messages");
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let mut out = Vec::with_capacity(count);
    while out.len() < count {
        match tokio::time::timeout_at(deadline, messages.next()).await {
            Ok(Some(Ok(message))) => out.push(message),
            Ok(Some(Err(error))) => panic!("reading the stream failed: {error}"),
            Ok(None) => panic!("the stream of messages ended after {}", out.len()),
            Err(_) => panic!("only {} of {count} messages arrived", out.len()),
        }
    }
    out
}

/// Polls `probe` until it returns `Some`, failing the test after [`DEADLINE`].
pub async fn eventually<T>(what: &str, mut probe: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}
