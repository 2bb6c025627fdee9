//! Keel's event bus on NATS JetStream.
//!
//! - [`Bus`] connects and makes sure the deployment's stream (`KEEL`, subjects `keel.>`, unless
//!   configured otherwise) exists.
//! - [`SubjectRoot`] builds every event subject, `<root>.<service>.<tenant>.<entity>.<verb>`,
//!   and the [`Filter`]s subscribers select them with.
//! - [`Outbox`] writes an event in the same transaction as the change it describes;
//!   [`Relay`] publishes outbox rows with `Nats-Msg-Id` = event id, so a row published
//!   twice (a relay that died before marking it) is dropped by JetStream's de-duplication.
//! - [`consumer`] runs a durable pull consumer whose handler runs in a transaction
//!   together with an inbox row keyed by event id, so a redelivered event has no second effect.
//!
//! None of this takes a lock that outlives a transaction: replicas share the work
//! through `FOR UPDATE SKIP LOCKED` claims and JetStream's consumer groups.

pub mod consumer;
mod outbox;
mod relay;
mod subjects;

use std::time::Duration;

use async_nats::jetstream;
use keel_config::NatsConfig;

pub use outbox::{Outbox, OutboxMessage};
pub use relay::{Relay, RelayConfig, RelayMetrics};
pub use subjects::{EventKind, Filter, SubjectError, SubjectRoot};

/// Header carrying the event id, used by JetStream to drop duplicates. The typed
/// constant matters: a lookup by the string form does not find the standard header.
pub const MSG_ID_HEADER: async_nats::header::HeaderName = async_nats::header::NATS_MESSAGE_ID;

/// Why the bus could not be used.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// Connecting to NATS failed.
    #[error("cannot connect to NATS at {url}: {source}")]
    Connect {
        /// The server URL, its credentials masked ([`keel_config::redact_url`]).
        url: String,
        /// What went wrong.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A JetStream request failed (stream or consumer management, publish, ack).
    #[error("jetstream {operation} failed: {source}")]
    JetStream {
        /// What was being done.
        operation: &'static str,
        /// What went wrong.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The outbox or inbox tables could not be used.
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    /// The schema name is not usable.
    #[error(transparent)]
    Store(#[from] keel_store::StoreError),
    /// A subject token (root, tenant, …) is not usable.
    #[error(transparent)]
    Subject(#[from] SubjectError),
    /// The stream exists but does not capture this deployment's subjects.
    #[error(
        "stream {stream} captures {subjects:?}, not {expected}: another deployment uses it; give this one its own --nats-stream and --nats-subject-root"
    )]
    StreamMismatch {
        /// The stream.
        stream: String,
        /// What it captures.
        subjects: Vec<String>,
        /// What this deployment publishes on.
        expected: String,
    },
    /// An outbox message or a setting cannot be used as given; the message says what to fix.
    #[error("{0}")]
    Invalid(String),
}

impl BusError {
    pub(crate) fn jetstream(
        operation: &'static str,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Self::JetStream {
            operation,
            source: Box::new(source),
        }
    }
}

/// `options` with the user and password (or the token) that `url` carries, as in
/// `nats://user:password@host:4222`: async-nats connects to a URL's host but ignores its user.
pub fn with_url_auth(options: async_nats::ConnectOptions, url: &str) -> async_nats::ConnectOptions {
    let Ok(parsed) = url::Url::parse(url) else {
        // Connecting reports the unparsable URL.
        return options;
    };
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8_lossy()
            .into_owned()
    };
    match (parsed.username(), parsed.password()) {
        ("", _) => options,
        (user, Some(password)) => options.user_and_password(decode(user), decode(password)),
        (token, None) => options.token(decode(token)),
    }
}

/// Settings of the deployment's stream, used only when the stream does not exist yet.
#[derive(Debug, Clone)]
pub struct StreamSettings {
    /// How long JetStream remembers message ids for de-duplication. A relay that
    /// dies after publishing must be replaced within this window for its republish
    /// to be dropped, so it is far longer than the outbox claim lease.
    pub duplicate_window: Duration,
    /// How long events are kept.
    pub max_age: Duration,
}

impl Default for StreamSettings {
    fn default() -> Self {
        Self {
            duplicate_window: Duration::from_secs(10 * 60),
            max_age: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

/// A connection to NATS with JetStream, for one deployment's stream and subject root.
#[derive(Debug, Clone)]
pub struct Bus {
    client: async_nats::Client,
    jetstream: jetstream::Context,
    stream: String,
    root: SubjectRoot,
}

impl Bus {
    /// Connects and creates the configured stream if it does not exist.
    pub async fn connect(config: &NatsConfig, settings: &StreamSettings) -> Result<Self, BusError> {
        // Checked before connecting: a bad root must not reach a stream definition.
        let root = SubjectRoot::new(&config.subject_root)?;
        let connect_error = |source: Box<dyn std::error::Error + Send + Sync>| BusError::Connect {
            url: keel_config::redact_url(&config.url),
            source,
        };
        let mut options =
            with_url_auth(async_nats::ConnectOptions::new().name("keel"), &config.url);
        if let Some(path) = &config.credentials_file {
            options = options
                .credentials_file(path)
                .await
                .map_err(|e| connect_error(Box::new(e)))?;
        }
        let client = options
            .connect(&config.url)
            .await
            .map_err(|e| connect_error(Box::new(e)))?;
        let bus = Self::from_client(client, &config.stream, root);
        bus.ensure_stream(settings).await?;
        Ok(bus)
    }

    /// Wraps an existing client for `stream` and `root` without touching the stream.
    pub fn from_client(client: async_nats::Client, stream: &str, root: SubjectRoot) -> Self {
        let jetstream = jetstream::new(client.clone());
        Self {
            client,
            jetstream,
            stream: stream.to_owned(),
            root,
        }
    }

    /// Creates the stream if it does not exist; an existing one is left as it is, but refused
    /// when it does not capture `<root>.>` (events published there would be lost).
    pub async fn ensure_stream(
        &self,
        settings: &StreamSettings,
    ) -> Result<jetstream::stream::Stream, BusError> {
        let expected = self.root.all();
        let stream = self
            .jetstream
            .get_or_create_stream(jetstream::stream::Config {
                name: self.stream.clone(),
                subjects: vec![expected.clone()],
                duplicate_window: settings.duplicate_window,
                max_age: settings.max_age,
                storage: jetstream::stream::StorageType::File,
                ..Default::default()
            })
            .await
            .map_err(|e| BusError::jetstream("create stream", e))?;
        let subjects = stream.cached_info().config.subjects.clone();
        if !subjects.contains(&expected) {
            return Err(BusError::StreamMismatch {
                stream: self.stream.clone(),
                subjects,
                expected,
            });
        }
        Ok(stream)
    }

    /// Name of this deployment's stream.
    pub fn stream_name(&self) -> &str {
        &self.stream
    }

    /// This deployment's subject root, which builds its subjects and filters.
    pub fn subjects(&self) -> &SubjectRoot {
        &self.root
    }

    /// The plain NATS client.
    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    /// The JetStream context.
    pub fn jetstream(&self) -> &jetstream::Context {
        &self.jetstream
    }

    /// Whether the connection to NATS is up, for readiness checks.
    pub fn is_connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }
}
