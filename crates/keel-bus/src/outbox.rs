//! The transactional outbox: an event row written in the same transaction as the
//! change it describes, so an event exists if and only if the change committed.

use std::collections::BTreeMap;

use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::BusError;

/// Notification channel that wakes relays as soon as an outbox row commits.
pub(crate) const NOTIFY_CHANNEL: &str = "keel_outbox";

/// One event waiting to be published.
#[derive(Debug, Clone)]
pub struct OutboxMessage {
    /// Event id (UUIDv7); becomes the `Nats-Msg-Id` header.
    pub id: Uuid,
    /// Subject to publish on, `keel.<service>.<entity>.<verb>`.
    pub subject: String,
    /// Encoded event.
    pub payload: Vec<u8>,
    /// Extra headers, typically the W3C trace context (`traceparent`, `tracestate`)
    /// of the request that made the change.
    pub headers: BTreeMap<String, String>,
}

/// The outbox of one service, kept in that service's schema.
#[derive(Debug, Clone)]
pub struct Outbox {
    schema: String,
}

impl Outbox {
    /// The outbox in `schema`.
    pub fn new(schema: &str) -> Result<Self, BusError> {
        keel_store::validate_schema_name(schema)?;
        Ok(Self {
            schema: schema.to_owned(),
        })
    }

    /// The schema holding the outbox.
    pub fn schema(&self) -> &str {
        &self.schema
    }

    /// Creates the outbox and inbox tables in the schema if they are missing.
    ///
    /// The bus owns their shape, so every service gets the same tables without
    /// copying the DDL into its migrations; the statements are idempotent and
    /// additive, so replicas may run them concurrently at start.
    pub async fn install(&self, pool: &PgPool) -> Result<(), BusError> {
        let s = &self.schema;
        // SET LOCAL lasts only for this one multi-statement query (an implicit transaction): it
        // keeps the "already exists, skipping" NOTICEs of every later start out of the log.
        let ddl = format!(
            "SET LOCAL client_min_messages = warning;
             CREATE SCHEMA IF NOT EXISTS {s};
             CREATE TABLE IF NOT EXISTS {s}.outbox (
                 id uuid PRIMARY KEY,
                 subject text NOT NULL,
                 payload bytea NOT NULL,
                 headers jsonb NOT NULL DEFAULT '{{}}',
                 created_at timestamptz NOT NULL DEFAULT now(),
                 attempts integer NOT NULL DEFAULT 0,
                 claimed_until timestamptz,
                 last_error text
             );
             CREATE TABLE IF NOT EXISTS {s}.inbox (
                 consumer text NOT NULL,
                 event_id uuid NOT NULL,
                 processed_at timestamptz NOT NULL DEFAULT now(),
                 PRIMARY KEY (consumer, event_id)
             );"
        );
        // Concurrent CREATE ... IF NOT EXISTS can still collide on the catalog; the
        // loser finds the objects there, which is what it wanted. Run on the pool: through
        // `&mut *conn` this future was not `Send`, so replicas could not install from a spawned task.
        match sqlx::raw_sql(&ddl).execute(pool).await {
            Ok(_) => Ok(()),
            Err(e) if keel_store::is_unique_violation(&e) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Adds `message` inside the caller's transaction and wakes the relays on commit.
    pub async fn enqueue(
        &self,
        tx: &mut PgConnection,
        message: &OutboxMessage,
    ) -> Result<(), BusError> {
        let headers = serde_json::to_value(&message.headers).unwrap_or_default();
        sqlx::query(&format!(
            "INSERT INTO {}.outbox (id, subject, payload, headers) VALUES ($1, $2, $3, $4)",
            self.schema
        ))
        .bind(message.id)
        .bind(&message.subject)
        .bind(&message.payload)
        .bind(headers)
        .execute(&mut *tx)
        .await?;
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(NOTIFY_CHANNEL)
            .bind(&self.schema)
            .execute(&mut *tx)
            .await?;
        Ok(())
    }

    /// Number of rows not yet published, for metrics and tests.
    pub async fn pending(&self, pool: &PgPool) -> Result<i64, BusError> {
        let n = sqlx::query_scalar(&format!("SELECT count(*) FROM {}.outbox", self.schema))
            .fetch_one(pool)
            .await?;
        Ok(n)
    }
}
