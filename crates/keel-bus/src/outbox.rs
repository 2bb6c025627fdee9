//! The transactional outbox: an event row written in the same transaction as the
//! change it describes, so an event exists if and only if the change committed.
//!
//! Rows carry an ordering key (the aggregate the event is about) and a sequence number that
//! PostgreSQL assigns on insert. The relay publishes the events of one key in sequence order
//! and never passes an unpublished one, so subscribers see each key's events in order.

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
    /// Ordering key: the aggregate the event is about (for the registry, the instance id).
    ///
    /// Events of one key reach subscribers in the order they were enqueued; events of
    /// different keys in any order. That order is the commit order as long as the writer
    /// serialises its transactions on one key (the registry's `version` check does: the second
    /// writer waits on the row lock of the first), whatever the clocks of the replicas say.
    pub key: String,
    /// Subject to publish on, `keel.<service>.<entity>.<verb>`.
    pub subject: String,
    /// Encoded event.
    pub payload: Vec<u8>,
    /// Extra headers, typically the W3C trace context (`traceparent`, `tracestate`)
    /// of the request that made the change.
    pub headers: BTreeMap<String, String>,
}

impl OutboxMessage {
    /// An event about `key` on `subject`, with a fresh UUIDv7 id and no extra headers.
    pub fn new(key: impl Into<String>, subject: impl Into<String>, payload: Vec<u8>) -> Self {
        Self {
            id: Uuid::now_v7(),
            key: key.into(),
            subject: subject.into(),
            payload,
            headers: BTreeMap::new(),
        }
    }
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

    /// Creates the outbox, dead-letter and inbox tables in the schema if they are missing,
    /// and adds the columns of this version to an outbox made by an earlier one.
    ///
    /// The bus owns their shape, so every service gets the same tables without
    /// copying the DDL into its migrations; the statements are idempotent and
    /// additive, so replicas may run them concurrently at start.
    pub async fn install(&self, pool: &PgPool) -> Result<(), BusError> {
        let s = &self.schema;
        // SET LOCAL lasts only for this one multi-statement query (an implicit transaction): it
        // keeps the "already exists, skipping" NOTICEs of every later start out of the log.
        // `claimed_until` is no longer used (claims are row locks now) but stays, so a replica
        // of the previous version can still run during a rolling upgrade.
        let ddl = format!(
            "SET LOCAL client_min_messages = warning;
             SELECT pg_advisory_xact_lock(hashtext('keel-bus install {s}'));
             CREATE SCHEMA IF NOT EXISTS {s};
             CREATE TABLE IF NOT EXISTS {s}.outbox (
                 seq bigint GENERATED ALWAYS AS IDENTITY,
                 id uuid PRIMARY KEY,
                 key text NOT NULL DEFAULT '',
                 subject text NOT NULL,
                 payload bytea NOT NULL,
                 headers jsonb NOT NULL DEFAULT '{{}}',
                 created_at timestamptz NOT NULL DEFAULT now(),
                 attempts integer NOT NULL DEFAULT 0,
                 retry_at timestamptz NOT NULL DEFAULT '-infinity',
                 claimed_until timestamptz,
                 last_error text
             );
             DO $$ BEGIN
                 IF NOT EXISTS (SELECT 1 FROM information_schema.columns
                                WHERE table_schema = '{s}' AND table_name = 'outbox' AND column_name = 'seq') THEN
                     ALTER TABLE {s}.outbox ADD COLUMN IF NOT EXISTS seq bigint GENERATED ALWAYS AS IDENTITY,
                         ADD COLUMN IF NOT EXISTS key text NOT NULL DEFAULT '',
                         ADD COLUMN IF NOT EXISTS retry_at timestamptz NOT NULL DEFAULT '-infinity';
                 END IF;
             END $$;
             CREATE UNIQUE INDEX IF NOT EXISTS outbox_seq ON {s}.outbox (seq);
             CREATE INDEX IF NOT EXISTS outbox_key_seq ON {s}.outbox (key, seq);
             -- A queue: every row is deleted soon after it is written. The default (vacuum at
             -- 20% dead rows) lets the dead ones pile up, and every claim walks over them.
             ALTER TABLE {s}.outbox SET (autovacuum_vacuum_scale_factor = 0,
                 autovacuum_vacuum_threshold = 5000, autovacuum_vacuum_cost_delay = 0,
                 autovacuum_vacuum_insert_scale_factor = 0, autovacuum_vacuum_insert_threshold = 5000);
             CREATE TABLE IF NOT EXISTS {s}.outbox_dead_letter (
                 id uuid PRIMARY KEY,
                 seq bigint NOT NULL,
                 key text NOT NULL,
                 subject text NOT NULL,
                 payload bytea NOT NULL,
                 headers jsonb NOT NULL,
                 created_at timestamptz NOT NULL,
                 attempts integer NOT NULL,
                 last_error text NOT NULL,
                 dead_at timestamptz NOT NULL DEFAULT now()
             );
             CREATE TABLE IF NOT EXISTS {s}.inbox (
                 consumer text NOT NULL,
                 event_id uuid NOT NULL,
                 processed_at timestamptz NOT NULL DEFAULT now(),
                 PRIMARY KEY (consumer, event_id)
             );
             CREATE INDEX IF NOT EXISTS inbox_processed_at ON {s}.inbox (consumer, processed_at);"
        );
        // The statements run as one implicit transaction, serialised per schema by the
        // transaction-scoped advisory lock (released at its end, like sqlx's migration lock),
        // so replicas starting together do not collide on the catalog half-way through. Run on
        // the pool: through `&mut *conn` this future was not `Send`.
        sqlx::raw_sql(&ddl).execute(pool).await?;
        Ok(())
    }

    /// Adds `message` inside the caller's transaction and wakes the relays on commit.
    ///
    /// Refuses a message with an empty key: every event belongs to some aggregate, and an
    /// empty key would put all such events in one queue behind each other.
    pub async fn enqueue(
        &self,
        tx: &mut PgConnection,
        message: &OutboxMessage,
    ) -> Result<(), BusError> {
        if message.key.is_empty() {
            return Err(BusError::Invalid(format!(
                "event {} on {} has an empty ordering key; set OutboxMessage::key to the aggregate's id",
                message.id, message.subject
            )));
        }
        let headers = serde_json::to_value(&message.headers).unwrap_or_default();
        sqlx::query(&format!(
            "INSERT INTO {}.outbox (id, key, subject, payload, headers) VALUES ($1, $2, $3, $4, $5)",
            self.schema
        ))
        .bind(message.id)
        .bind(&message.key)
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

    /// Number of events in the dead-letter table.
    pub async fn dead_letters(&self, pool: &PgPool) -> Result<i64, BusError> {
        let n = sqlx::query_scalar(&format!(
            "SELECT count(*) FROM {}.outbox_dead_letter",
            self.schema
        ))
        .fetch_one(pool)
        .await?;
        Ok(n)
    }

    /// Moves dead letter `id` back into the outbox, to be published again; false when there is
    /// no such dead letter.
    ///
    /// The event gets a new sequence number, so it goes out after the later events of its key
    /// (which did not wait for it). The same in SQL, for an operator:
    ///
    /// ```sql
    /// WITH d AS (DELETE FROM <schema>.outbox_dead_letter WHERE id = '<id>' RETURNING *)
    /// INSERT INTO <schema>.outbox (id, key, subject, payload, headers, created_at)
    ///     SELECT id, key, subject, payload, headers, created_at FROM d;
    /// ```
    pub async fn redrive(&self, pool: &PgPool, id: Uuid) -> Result<bool, BusError> {
        let s = &self.schema;
        let mut tx = pool.begin().await?;
        let moved = sqlx::query(&format!(
            "WITH d AS (DELETE FROM {s}.outbox_dead_letter WHERE id = $1 RETURNING *)
             INSERT INTO {s}.outbox (id, key, subject, payload, headers, created_at)
                 SELECT id, key, subject, payload, headers, created_at FROM d"
        ))
        .bind(id)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if moved {
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(NOTIFY_CHANNEL)
                .bind(s)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(moved)
    }
}
