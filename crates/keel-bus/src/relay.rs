//! Publishes outbox rows to JetStream.
//!
//! A relay claims a batch with `FOR UPDATE SKIP LOCKED`, leases it by moving
//! `claimed_until` forward, publishes every row with `Nats-Msg-Id` = its id, and
//! deletes the rows JetStream acknowledged. A relay that dies anywhere in between
//! leaves its rows to be claimed again once the lease runs out; a row that was
//! published but not deleted is republished with the same id and dropped by the
//! stream's de-duplication, so subscribers see each event once.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::header::{HeaderName, HeaderValue};
use async_nats::jetstream;
use sqlx::PgPool;
use sqlx::postgres::PgListener;
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
    /// How long a claim keeps other relays away from the rows; a relay that died
    /// holding a claim delays those events by at most this much.
    pub lease: Duration,
    /// How often to look for rows when no notification arrives (a notification can
    /// be missed while the listener reconnects).
    pub poll_interval: Duration,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            batch_size: 256,
            lease: Duration::from_secs(30),
            poll_interval: Duration::from_secs(2),
        }
    }
}

/// Publishes one service's outbox.
#[derive(Debug, Clone)]
pub struct Relay {
    pool: PgPool,
    outbox: Outbox,
    jetstream: jetstream::Context,
    config: RelayConfig,
}

struct ClaimedRow {
    id: Uuid,
    subject: String,
    payload: Vec<u8>,
    headers: sqlx::types::Json<BTreeMap<String, String>>,
}

impl Relay {
    /// A relay for `outbox`, publishing through `jetstream`.
    pub fn new(
        pool: PgPool,
        outbox: Outbox,
        jetstream: jetstream::Context,
        config: RelayConfig,
    ) -> Self {
        Self {
            pool,
            outbox,
            jetstream,
            config,
        }
    }

    /// Publishes until `shutdown` is cancelled, waking on each committed outbox row.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut listener = self.listen().await;
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
                notified = wait_for_notification(&mut listener) => {
                    if !notified {
                        listener = self.listen().await;
                    }
                }
            }
        }
    }

    async fn listen(&self) -> Option<PgListener> {
        let mut listener = match PgListener::connect_with(&self.pool).await {
            Ok(listener) => listener,
            Err(error) => {
                tracing::warn!(%error, "outbox relay cannot listen for notifications; polling only");
                return None;
            }
        };
        match listener.listen(NOTIFY_CHANNEL).await {
            Ok(()) => Some(listener),
            Err(error) => {
                tracing::warn!(%error, "outbox relay cannot listen for notifications; polling only");
                None
            }
        }
    }

    /// Publishes every row that is not claimed by another relay, batch after batch,
    /// and returns how many were published.
    pub async fn publish_pending(&self) -> Result<usize, BusError> {
        let mut published = 0;
        loop {
            let rows = self.claim().await?;
            if rows.is_empty() {
                return Ok(published);
            }
            let batch = rows.len();
            published += self.publish(rows).await?;
            if batch < self.config.batch_size as usize {
                return Ok(published);
            }
        }
    }

    async fn claim(&self) -> Result<Vec<ClaimedRow>, BusError> {
        let s = self.outbox.schema();
        let mut rows: Vec<ClaimedRow> = sqlx::query_as::<_, (Uuid, String, Vec<u8>, sqlx::types::Json<BTreeMap<String, String>>)>(&format!(
            "UPDATE {s}.outbox SET claimed_until = now() + make_interval(secs => $2), attempts = attempts + 1
             WHERE id IN (
                 SELECT id FROM {s}.outbox
                 WHERE claimed_until IS NULL OR claimed_until < now()
                 ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED)
             RETURNING id, subject, payload, headers"
        ))
        .bind(self.config.batch_size)
        .bind(self.config.lease.as_secs_f64())
        .fetch_all(&self.pool)
        .await?
        .into_iter()
        .map(|(id, subject, payload, headers)| ClaimedRow { id, subject, payload, headers })
        .collect();
        // UUIDv7 ids sort by creation time; RETURNING has no order of its own.
        rows.sort_by_key(|row| row.id);
        Ok(rows)
    }

    async fn publish(&self, rows: Vec<ClaimedRow>) -> Result<usize, BusError> {
        // Send the whole batch before awaiting acknowledgements, in order.
        let mut pending = Vec::with_capacity(rows.len());
        for row in rows {
            let headers = message_headers(row.id, &row.headers.0);
            let span =
                tracing::debug_span!("outbox.publish", subject = %row.subject, event_id = %row.id);
            let publish = self.jetstream.publish_with_headers(
                row.subject.clone(),
                headers,
                row.payload.into(),
            );
            match publish.instrument(span).await {
                Ok(ack) => pending.push((row.id, ack)),
                Err(error) => {
                    self.record_failure(row.id, &error.to_string()).await;
                    return Err(BusError::jetstream("publish", error));
                }
            }
        }
        let mut acked = Vec::with_capacity(pending.len());
        let mut first_error = None;
        for (id, ack) in pending {
            match ack.await {
                Ok(ack) => {
                    if ack.duplicate {
                        tracing::debug!(event_id = %id, "event was already in the stream; dropped as a duplicate");
                    }
                    acked.push(id);
                }
                Err(error) => {
                    self.record_failure(id, &error.to_string()).await;
                    first_error.get_or_insert(error);
                }
            }
        }
        let s = self.outbox.schema();
        sqlx::query(&format!("DELETE FROM {s}.outbox WHERE id = ANY($1)"))
            .bind(&acked)
            .execute(&self.pool)
            .await?;
        match first_error {
            Some(error) => Err(BusError::jetstream("publish acknowledgement", error)),
            None => Ok(acked.len()),
        }
    }

    async fn record_failure(&self, id: Uuid, error: &str) {
        let s = self.outbox.schema();
        let result = sqlx::query(&format!(
            "UPDATE {s}.outbox SET last_error = $2 WHERE id = $1"
        ))
        .bind(id)
        .bind(error)
        .execute(&self.pool)
        .await;
        if let Err(db_error) = result {
            tracing::warn!(%db_error, event_id = %id, "cannot record outbox publish failure");
        }
    }
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

/// Waits for the next notification; false when the listener is gone and must be rebuilt.
async fn wait_for_notification(listener: &mut Option<PgListener>) -> bool {
    match listener {
        Some(l) => l.recv().await.is_ok(),
        None => std::future::pending().await,
    }
}
