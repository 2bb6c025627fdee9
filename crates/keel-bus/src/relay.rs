//! Publishes outbox rows to JetStream, in order per key.
//!
//! A relay claims a batch by deleting it, `DELETE … RETURNING` inside a transaction that it
//! holds while it publishes: the row locks keep other relays off (`SKIP LOCKED`), and a relay
//! that dies rolls the deletion back, so the rows are free again at once. The happy path costs
//! one insert (the enqueue) and one delete per event.
//!
//! Order: a batch takes, per key, only rows from the oldest one of that key onwards (by the
//! sequence PostgreSQL assigned on insert), and publishes each key's rows one after the other,
//! the next only once JetStream acknowledged the previous one; different keys are published
//! concurrently. A row of a key another relay is publishing is skipped together with its
//! successors, so no event ever overtakes an earlier one of its key.
//!
//! Failure: when JetStream refuses an event, it and the later rows of its key in the batch are
//! put back (the first with `attempts + 1`, a `last_error` and a `retry_at` backoff) in the
//! same transaction, which still commits the deletion of everything that was acknowledged:
//! other keys go on, that key waits. After [`RelayConfig::max_attempts`] refusals the event
//! moves to `<schema>.outbox_dead_letter`, counted by `keel_outbox_dead_letters_total{schema}`
//! and logged at WARN; the later events of its key then go on without it
//! ([`crate::Outbox::redrive`] puts it back). An error that says nothing about the event (NATS
//! unreachable, an ack that timed out) puts the rows back without counting an attempt, and the
//! relay backs off.
//!
//! A row published whose deletion did not commit (the relay died in between) is published again
//! with the same `Nats-Msg-Id` and dropped by the stream's de-duplication, so subscribers see
//! each event once.

use std::collections::{BTreeMap, HashMap};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::header::{HeaderName, HeaderValue};
use async_nats::jetstream;
use async_nats::jetstream::context::{PublishError, PublishErrorKind};
use chrono::{DateTime, Utc};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use sqlx::postgres::PgListener;
use sqlx::{PgConnection, PgPool};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use crate::outbox::NOTIFY_CHANNEL;
use crate::{BusError, MSG_ID_HEADER, Outbox};

/// How a relay paces itself.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Most rows claimed at once.
    pub batch_size: i64,
    /// Batches one relay has claimed and is publishing at a time (at least 1): the next claim
    /// overlaps the acks of the last, as two relays' claims would.
    pub claims_in_flight: usize,
    /// Longest a relay may keep its claim transaction idle (while it waits for JetStream):
    /// PostgreSQL ends a stuck relay's session after this, which puts its rows back.
    pub lease: Duration,
    /// How often to look for rows when no notification arrives (a notification can
    /// be missed while the listener reconnects).
    pub poll_interval: Duration,
    /// Refusals by JetStream after which an event moves to the dead-letter table (at least 1).
    pub max_attempts: i32,
    /// Wait before an event is offered again after its first refusal; doubled after each
    /// further one, up to [`RelayConfig::retry_backoff_max`].
    pub retry_backoff: Duration,
    /// Longest wait between two attempts of one event.
    pub retry_backoff_max: Duration,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            batch_size: 256,
            claims_in_flight: 2,
            lease: Duration::from_secs(30),
            poll_interval: Duration::from_secs(2),
            // 0.5 + 1 + 2 + … + 60 s: a stream that refuses everything (deleted by mistake)
            // has about four minutes to come back before events go to the dead-letter table.
            max_attempts: 10,
            retry_backoff: Duration::from_millis(500),
            retry_backoff_max: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SchemaLabels {
    schema: String,
}

/// The relays' counters, by outbox schema (a handful per process). One set per process: a
/// process with several outboxes registers it once and gives it to each relay
/// ([`Relay::with_metrics`]), since a registry refuses no duplicate family and `/metrics` would
/// then list each family twice.
#[derive(Debug, Clone, Default)]
pub struct RelayMetrics {
    published: Family<SchemaLabels, Counter>,
    refused: Family<SchemaLabels, Counter>,
    dead_letters: Family<SchemaLabels, Counter>,
}

impl RelayMetrics {
    /// New counters registered in `registry` as `keel_outbox_published_total`,
    /// `keel_outbox_refused_total` and `keel_outbox_dead_letters_total`, labelled by schema.
    pub fn register(registry: &mut prometheus_client::registry::Registry) -> Self {
        let metrics = Self::default();
        metrics.register_in(registry);
        metrics
    }

    fn register_in(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register(
            "keel_outbox_published",
            "Outbox events acknowledged by JetStream, by outbox schema",
            self.published.clone(),
        );
        registry.register(
            "keel_outbox_refused",
            "Publishes of outbox events that JetStream refused (retried later), by outbox schema",
            self.refused.clone(),
        );
        registry.register(
            "keel_outbox_dead_letters",
            "Outbox events moved to the dead-letter table after too many refusals, by outbox schema",
            self.dead_letters.clone(),
        );
    }
}

/// Publishes one service's outbox.
#[derive(Debug, Clone)]
pub struct Relay {
    pool: PgPool,
    outbox: Outbox,
    jetstream: jetstream::Context,
    config: RelayConfig,
    metrics: RelayMetrics,
    claims: Arc<ClaimSql>,
}

/// The claim statements of one outbox schema, written once rather than at every batch.
#[derive(Debug)]
struct ClaimSql {
    near_front: String,
    first_of_each_key: String,
}

/// A claimed (deleted, not yet committed) outbox row.
#[derive(sqlx::FromRow)]
struct Row {
    seq: i64,
    id: Uuid,
    key: String,
    subject: String,
    payload: Vec<u8>,
    headers: sqlx::types::Json<BTreeMap<String, String>>,
    created_at: DateTime<Utc>,
    attempts: i32,
    last_error: Option<String>,
}

/// Why a row was not published.
struct Failure {
    /// JetStream answered and refused this event; otherwise the bus did not answer at all.
    refused: bool,
    message: String,
}

/// What one batch did.
#[derive(Debug, Default)]
struct BatchOutcome {
    claimed: usize,
    published: usize,
    dead_lettered: usize,
    /// An error that was not about any one event: the bus is likely down.
    unavailable: Option<String>,
}

impl Relay {
    /// A relay for `outbox`, publishing through `jetstream`.
    pub fn new(
        pool: PgPool,
        outbox: Outbox,
        jetstream: jetstream::Context,
        config: RelayConfig,
    ) -> Self {
        let claims = Arc::new(ClaimSql {
            near_front: claim_near_front_sql(outbox.schema()),
            first_of_each_key: claim_first_of_each_key_sql(outbox.schema()),
        });
        Self {
            pool,
            outbox,
            jetstream,
            config,
            metrics: RelayMetrics::default(),
            claims,
        }
    }

    /// Counts into `metrics` (registered once for every relay of the process) instead of its own.
    pub fn with_metrics(mut self, metrics: RelayMetrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// Registers this relay's counters (see [`RelayMetrics::register`]); for a process with one
    /// outbox. Clones of this relay count into the same series.
    pub fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        self.metrics.register_in(registry);
    }

    fn labels(&self) -> SchemaLabels {
        SchemaLabels {
            schema: self.outbox.schema().to_owned(),
        }
    }

    /// Publishes until `shutdown` is cancelled, waking on each committed outbox row.
    ///
    /// When listening for notifications fails the relay polls, and tries to listen again with
    /// backoff; after each (re)connection of the listener it looks for rows, since
    /// notifications sent meanwhile were lost.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut listener = self.listen().await;
        let mut listen_backoff = LISTEN_RETRY_MIN;
        let mut listen_retry_at = Instant::now() + listen_backoff;
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.publish_pending().await {
                Ok(_) => backoff = Duration::from_millis(100),
                Err(error) => {
                    tracing::warn!(%error, schema = self.outbox.schema(), "outbox relay failed; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                    continue;
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(self.config.poll_interval) => {}
                woke = next_notification(&mut listener) => {
                    if let Wake::Lost(error) = woke {
                        tracing::warn!(%error, schema = self.outbox.schema(), "outbox relay lost its listener; polling until it listens again");
                        listener = None;
                        listen_backoff = LISTEN_RETRY_MIN;
                        listen_retry_at = Instant::now() + listen_backoff;
                    }
                }
                _ = tokio::time::sleep_until(listen_retry_at), if listener.is_none() => {
                    listener = self.listen().await;
                    if listener.is_none() {
                        listen_backoff = (listen_backoff * 2).min(LISTEN_RETRY_MAX);
                        listen_retry_at = Instant::now() + listen_backoff;
                    } else {
                        tracing::info!(schema = self.outbox.schema(), "outbox relay listens for notifications again");
                    }
                }
            }
        }
    }

    async fn listen(&self) -> Option<PgListener> {
        let listener = async {
            let mut listener = PgListener::connect_with(&self.pool).await?;
            listener.listen(NOTIFY_CHANNEL).await?;
            Ok::<_, sqlx::Error>(listener)
        };
        match listener.await {
            Ok(listener) => Some(listener),
            Err(error) => {
                tracing::warn!(%error, schema = self.outbox.schema(), "outbox relay cannot listen for notifications; polling, and trying again");
                None
            }
        }
    }

    /// Publishes every row that is due and not held back by another relay, batch after batch,
    /// and returns how many were published.
    ///
    /// Fails when the bus or the database did not answer; rows JetStream refused wait for
    /// their retry and do not make it fail.
    pub async fn publish_pending(&self) -> Result<usize, BusError> {
        // Most wake-ups find a few rows: one claim takes them all. Only a full batch says a
        // backlog is waiting, and then the claims overlap.
        let first = self.publish_batch_or_fail().await?;
        if !self.more_may_wait(&first) {
            return Ok(first.published);
        }
        let claims = (0..self.config.claims_in_flight.max(1)).map(|_| self.publish_until_done());
        let mut published = first.published;
        let mut failed = None;
        for result in futures::future::join_all(claims).await {
            match result {
                Ok(count) => published += count,
                Err(error) => {
                    failed.get_or_insert(error);
                }
            }
        }
        failed.map_or(Ok(published), Err)
    }

    /// A batch, or the error that made it stop short when JetStream did not answer.
    async fn publish_batch_or_fail(&self) -> Result<BatchOutcome, BusError> {
        let mut outcome = self.publish_batch().await?;
        match outcome.unavailable.take() {
            Some(error) => Err(BusError::JetStream {
                operation: "publish",
                source: error.into(),
            }),
            None => Ok(outcome),
        }
    }

    /// Whether rows may be left after `outcome`: the batch was full, or dead letters freed
    /// the rows behind them.
    fn more_may_wait(&self, outcome: &BatchOutcome) -> bool {
        outcome.claimed >= self.config.batch_size as usize || outcome.dead_lettered > 0
    }

    /// One claim after another until a batch comes back short.
    async fn publish_until_done(&self) -> Result<usize, BusError> {
        let mut published = 0;
        loop {
            let outcome = self.publish_batch_or_fail().await?;
            published += outcome.published;
            if !self.more_may_wait(&outcome) {
                return Ok(published);
            }
        }
    }

    async fn publish_batch(&self) -> Result<BatchOutcome, BusError> {
        let s = self.outbox.schema();
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT set_config('idle_in_transaction_session_timeout', $1, true)")
            .bind(self.config.lease.as_millis().max(1).to_string())
            .execute(&mut *tx)
            .await?;
        // Near the front first: heads among the oldest rows, with the rows of their keys that
        // follow them there, in one cheap pass. When the front holds fewer heads than a batch
        // (few keys, or keys held by other claims or waiting for a retry), the first row of
        // every key, found by skipping through the (key, seq) index: that costs one probe per
        // pending key, where looking for heads row by row would read the whole backlog.
        let mut rows = claim(&mut tx, &self.claims.near_front, self.config.batch_size).await?;
        let wanted = self.config.batch_size - rows.len() as i64;
        if wanted > 0 {
            rows.extend(claim(&mut tx, &self.claims.first_of_each_key, wanted).await?);
        }
        if rows.is_empty() {
            tx.commit().await?;
            return Ok(BatchOutcome::default());
        }
        // RETURNING has no order of its own.
        rows.sort_by_key(|row| row.seq);
        let mut chains: HashMap<&str, Vec<&Row>> = HashMap::new();
        for row in &rows {
            chains.entry(row.key.as_str()).or_default().push(row);
        }
        let results =
            futures::future::join_all(chains.into_values().map(|chain| self.publish_chain(chain)))
                .await;

        let mut outcome = BatchOutcome {
            claimed: rows.len(),
            ..BatchOutcome::default()
        };
        let mut dead = Vec::new();
        for (chain, published, failure) in results {
            outcome.published += published;
            let Some(failure) = failure else { continue };
            let (failed, behind) = (chain[published], &chain[published + 1..]);
            if failure.refused {
                self.metrics.refused.get_or_create(&self.labels()).inc();
                let attempts = failed.attempts.saturating_add(1);
                if attempts >= self.config.max_attempts {
                    self.dead_letter(&mut tx, failed, attempts, &failure.message)
                        .await?;
                    dead.push((failed, attempts, failure.message));
                } else {
                    let wait = self.retry_wait(attempts);
                    put_back(
                        &mut tx,
                        s,
                        failed,
                        attempts,
                        Some(&failure.message),
                        Some(wait),
                    )
                    .await?;
                }
            } else {
                put_back(
                    &mut tx,
                    s,
                    failed,
                    failed.attempts,
                    Some(&failure.message),
                    None,
                )
                .await?;
                outcome.unavailable.get_or_insert(failure.message);
            }
            for row in behind {
                put_back(
                    &mut tx,
                    s,
                    row,
                    row.attempts,
                    row.last_error.as_deref(),
                    None,
                )
                .await?;
            }
        }
        tx.commit().await?;
        // Counted after the commit: only then are the rows behind the dead letters free.
        outcome.dead_lettered = dead.len();
        self.metrics
            .published
            .get_or_create(&self.labels())
            .inc_by(outcome.published as u64);
        for (row, attempts, error) in dead {
            self.metrics
                .dead_letters
                .get_or_create(&self.labels())
                .inc();
            tracing::warn!(
                schema = s,
                event_id = %row.id,
                key = %row.key,
                subject = %row.subject,
                attempts,
                %error,
                "outbox event moved to the dead-letter table; later events of its key go on without it"
            );
        }
        Ok(outcome)
    }

    /// Publishes `chain` (rows of one key, in order) one at a time; returns the chain, how many
    /// were acknowledged, and why the next one was not.
    async fn publish_chain<'r>(
        &self,
        chain: Vec<&'r Row>,
    ) -> (Vec<&'r Row>, usize, Option<Failure>) {
        for (published, row) in chain.iter().enumerate() {
            let span =
                tracing::debug_span!("outbox.publish", subject = %row.subject, event_id = %row.id);
            if let Err(failure) = self.publish_one(row).instrument(span).await {
                return (chain, published, Some(failure));
            }
        }
        let published = chain.len();
        (chain, published, None)
    }

    async fn publish_one(&self, row: &Row) -> Result<(), Failure> {
        let headers = message_headers(row.id, &row.headers.0);
        let ack = self
            .jetstream
            .publish_with_headers(row.subject.clone(), headers, row.payload.clone().into())
            .await
            .map_err(failure)?
            .await
            .map_err(failure)?;
        if ack.duplicate {
            tracing::debug!(event_id = %row.id, "event was already in the stream; dropped as a duplicate");
        }
        Ok(())
    }

    async fn dead_letter(
        &self,
        tx: &mut PgConnection,
        row: &Row,
        attempts: i32,
        error: &str,
    ) -> Result<(), BusError> {
        let s = self.outbox.schema();
        sqlx::query(&format!(
            "INSERT INTO {s}.outbox_dead_letter
                 (id, seq, key, subject, payload, headers, created_at, attempts, last_error)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
             ON CONFLICT (id) DO UPDATE SET seq = EXCLUDED.seq, attempts = EXCLUDED.attempts,
                 last_error = EXCLUDED.last_error, dead_at = now()"
        ))
        .bind(row.id)
        .bind(row.seq)
        .bind(&row.key)
        .bind(&row.subject)
        .bind(&row.payload)
        .bind(&row.headers)
        .bind(row.created_at)
        .bind(attempts)
        .bind(error)
        .execute(&mut *tx)
        .await?;
        Ok(())
    }

    /// How long an event refused `attempts` times waits before its next attempt.
    fn retry_wait(&self, attempts: i32) -> Duration {
        let doublings = u32::try_from(attempts.saturating_sub(1))
            .unwrap_or(0)
            .min(20);
        self.config
            .retry_backoff
            .saturating_mul(1 << doublings)
            .min(self.config.retry_backoff_max)
    }
}

const LISTEN_RETRY_MIN: Duration = Duration::from_millis(500);
const LISTEN_RETRY_MAX: Duration = Duration::from_secs(30);

/// Rows the front of the outbox (the oldest `$1 * FRONT_BATCHES` rows) can give: `heads` are
/// its rows that are due, held by no other claim and preceded by no row of their key (a row
/// another relay is publishing still exists to this snapshot, so the rows behind it are no
/// heads); `batch` adds the rows of the heads' keys that follow them in the front.
fn claim_near_front_sql(s: &str) -> String {
    claim_sql(
        s,
        &format!(
            "front AS (
                 SELECT o.seq, o.key FROM {s}.outbox o ORDER BY o.seq LIMIT $1 * {FRONT_BATCHES}
             ), heads AS (
                 SELECT o.seq, o.key FROM {s}.outbox o
                 WHERE o.seq IN (SELECT seq FROM front)
                   AND o.retry_at <= now()
                   AND NOT EXISTS (SELECT 1 FROM {s}.outbox e WHERE e.key = o.key AND e.seq < o.seq)
                 ORDER BY o.seq LIMIT $1
                 FOR UPDATE SKIP LOCKED
             ), batch AS (
                 SELECT o.seq FROM {s}.outbox o
                 WHERE o.seq IN (SELECT f.seq FROM front f JOIN heads h ON h.key = f.key)
                 ORDER BY o.seq LIMIT $1
                 FOR UPDATE SKIP LOCKED
             )"
        ),
    )
}

/// The first row of each key, oldest first, when it is due and held by no other claim: a
/// loose index scan, one probe of `outbox_key_seq` per key. Rows this transaction claimed
/// already are gone from its snapshot, so their keys' next rows come out as firsts; they are
/// published after them, in the same batch.
fn claim_first_of_each_key_sql(s: &str) -> String {
    claim_sql(
        s,
        &format!(
            "firsts AS (
                 (SELECT o.key, o.seq FROM {s}.outbox o ORDER BY o.key, o.seq LIMIT 1)
                 UNION ALL
                 SELECT n.key, n.seq FROM firsts f, LATERAL (
                     SELECT o.key, o.seq FROM {s}.outbox o WHERE o.key > f.key
                     ORDER BY o.key, o.seq LIMIT 1
                 ) n
             ), batch AS (
                 SELECT o.seq FROM {s}.outbox o
                 WHERE o.seq IN (SELECT seq FROM firsts) AND o.retry_at <= now()
                 ORDER BY o.seq LIMIT $1
                 FOR UPDATE SKIP LOCKED
             )"
        ),
    )
}

/// Deletes and returns the rows of `batch` (defined by `ctes`) that no row of their key
/// outside the batch precedes: whatever the batch holds, no event overtakes an earlier one.
fn claim_sql(s: &str, ctes: &str) -> String {
    format!(
        "WITH RECURSIVE {ctes}
         DELETE FROM {s}.outbox o USING batch b
         WHERE o.seq = b.seq
           AND NOT EXISTS (SELECT 1 FROM {s}.outbox e
                           WHERE e.key = o.key AND e.seq < o.seq
                             AND e.seq NOT IN (SELECT seq FROM batch))
         RETURNING o.seq, o.id, o.key, o.subject, o.payload, o.headers, o.created_at, o.attempts, o.last_error"
    )
}

/// How many batches' worth of the oldest rows the cheap claim looks at.
const FRONT_BATCHES: i64 = 8;

async fn claim(tx: &mut PgConnection, sql: &str, limit: i64) -> Result<Vec<Row>, BusError> {
    Ok(sqlx::query_as(sql).bind(limit).fetch_all(&mut *tx).await?)
}

/// Puts a claimed row back under its own sequence number, so it keeps its place in its key.
async fn put_back(
    tx: &mut PgConnection,
    schema: &str,
    row: &Row,
    attempts: i32,
    last_error: Option<&str>,
    retry_in: Option<Duration>,
) -> Result<(), BusError> {
    sqlx::query(&format!(
        "INSERT INTO {schema}.outbox
             (seq, id, key, subject, payload, headers, created_at, attempts, last_error, retry_at)
         OVERRIDING SYSTEM VALUE
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9,
                 CASE WHEN $10::float8 IS NULL THEN '-infinity' ELSE now() + make_interval(secs => $10) END)"
    ))
    .bind(row.seq)
    .bind(row.id)
    .bind(&row.key)
    .bind(&row.subject)
    .bind(&row.payload)
    .bind(&row.headers)
    .bind(row.created_at)
    .bind(attempts)
    .bind(last_error)
    .bind(retry_in.map(|d| d.as_secs_f64()))
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Classifies a publish error: refused when JetStream answered about this very message.
fn failure(error: PublishError) -> Failure {
    let refused = match error.kind() {
        // No stream captures the subject: the server answered "no responders".
        PublishErrorKind::StreamNotFound
        | PublishErrorKind::WrongLastMessageId
        | PublishErrorKind::WrongLastSequence => true,
        // An error response of the JetStream API (message too large, …), rather than a send
        // that failed or an answer that could not be read.
        PublishErrorKind::Other => {
            std::error::Error::source(&error).is_some_and(|source| source.is::<jetstream::Error>())
        }
        PublishErrorKind::TimedOut | PublishErrorKind::BrokenPipe => false,
    };
    let mut message = error.to_string();
    if let Some(source) = std::error::Error::source(&error) {
        let source = source.to_string();
        if !message.contains(&source) {
            message = format!("{message}: {source}");
        }
    }
    Failure { refused, message }
}

/// The headers of the message for event `id`: its extra headers, then `Nats-Msg-Id`.
///
/// An extra header named like the id header would travel next to it (a name given as a
/// string never matches the typed standard name) and the server would de-duplicate on
/// whichever came first, so it is left out, as is any name or value NATS cannot carry.
fn message_headers(id: Uuid, extra: &BTreeMap<String, String>) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for (name, value) in extra {
        if name.eq_ignore_ascii_case(MSG_ID_HEADER.as_ref()) {
            tracing::warn!(event_id = %id, header = %name, "outbox header would replace the event id; left out");
            continue;
        }
        match (HeaderName::from_str(name), HeaderValue::from_str(value)) {
            (Ok(name), Ok(value)) => headers.insert(name, value),
            _ => {
                tracing::warn!(event_id = %id, header = %name, "outbox header is not a valid NATS header; left out")
            }
        }
    }
    headers.insert(MSG_ID_HEADER, id.to_string().as_str());
    headers
}

/// Why the relay woke up.
enum Wake {
    /// A notification arrived (or the listener reconnected and may have missed some).
    Notified,
    /// The listener is gone and must be rebuilt.
    Lost(sqlx::Error),
}

/// Waits for the next notification and drains those already buffered, which the publishing
/// pass about to run covers too. Never returns without a listener.
async fn next_notification(listener: &mut Option<PgListener>) -> Wake {
    let Some(l) = listener else {
        return std::future::pending().await;
    };
    match l.try_recv().await {
        Ok(Some(_)) => {
            while l.next_buffered().is_some() {}
            Wake::Notified
        }
        // The connection dropped and was re-established: notifications may have been lost.
        Ok(None) => Wake::Notified,
        Err(error) => Wake::Lost(error),
    }
}
