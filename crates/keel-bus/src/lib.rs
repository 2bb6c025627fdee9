//! Keel's event bus on NATS JetStream.
//!
//! - [`Bus`] connects and makes sure the `KEEL` stream (subjects `keel.>`) exists.
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

use std::time::Duration;

use async_nats::jetstream;
use keel_config::NatsConfig;

pub use outbox::{Outbox, OutboxMessage};
pub use relay::{Relay, RelayConfig};

/// Name of the one stream that holds every Keel event.
pub const STREAM: &str = "KEEL";
/// Subjects the stream captures.
pub const SUBJECTS: &str = "keel.>";
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

/// Settings of the `KEEL` stream, used only when the stream does not exist yet.
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

/// A connection to NATS with JetStream.
#[derive(Debug, Clone)]
pub struct Bus {
    client: async_nats::Client,
    jetstream: jetstream::Context,
}

impl Bus {
    /// Connects and creates the `KEEL` stream if it does not exist.
    pub async fn connect(config: &NatsConfig, settings: &StreamSettings) -> Result<Self, BusError> {
        let connect_error = |source: Box<dyn std::error::Error + Send + Sync>| BusError::Connect {
            url: keel_config::redact_url(&config.url),
            source,
        };
        let mut options = async_nats::ConnectOptions::new().name("keel");
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
        let bus = Self::from_client(client);
        bus.ensure_stream(settings).await?;
        Ok(bus)
    }

    /// Wraps an existing client without touching the stream.
    pub fn from_client(client: async_nats::Client) -> Self {
        let jetstream = jetstream::new(client.clone());
        Self { client, jetstream }
    }

    /// Creates the `KEEL` stream if it does not exist; an existing one is left as it is.
    pub async fn ensure_stream(
        &self,
        settings: &StreamSettings,
    ) -> Result<jetstream::stream::Stream, BusError> {
        self.jetstream
            .get_or_create_stream(jetstream::stream::Config {
                name: STREAM.to_owned(),
                subjects: vec![SUBJECTS.to_owned()],
                duplicate_window: settings.duplicate_window,
                max_age: settings.max_age,
                storage: jetstream::stream::StorageType::File,
                ..Default::default()
            })
            .await
            .map_err(|e| BusError::jetstream("create stream", e))
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
