//! The collector's tables: scrape jobs, scrape state, history and alerts.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use keel_auth::Scope;
use keel_bus::{Outbox, SubjectRoot};
use sqlx::types::Json;
use sqlx::{PgConnection, PgPool, Row as _};
use uuid::Uuid;

use crate::catalog::{self, Sample};
use crate::error::CollectorError;
use crate::events;
use crate::rules::{self, Active, Rules, Transition};
use crate::statements::{self, Counters, Deltas, Snapshot};

/// The schema the collector owns.
pub const SCHEMA: &str = "collector";

/// The engine of a target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Engine {
    /// PostgreSQL.
    Postgres,
    /// Redis.
    Redis,
}

impl Engine {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Engine::Postgres => "postgres",
            Engine::Redis => "redis",
        }
    }

    fn parse(s: &str) -> Engine {
        if s == "redis" {
            Engine::Redis
        } else {
            Engine::Postgres
        }
    }

    pub(crate) fn proto(self) -> keel_proto::v1::Engine {
        match self {
            Engine::Postgres => keel_proto::v1::Engine::Postgres,
            Engine::Redis => keel_proto::v1::Engine::Redis,
        }
    }
}

/// What the registry says about an instance, as a scrape job.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct TargetSpec {
    pub(crate) instance_id: Uuid,
    pub(crate) tenant: String,
    pub(crate) name: String,
    pub(crate) engine: Engine,
    pub(crate) labels: BTreeMap<String, String>,
    pub(crate) registry_version: i64,
    pub(crate) interval: Duration,
    pub(crate) timeout: Duration,
}

/// A scrape job a replica claimed.
#[derive(Debug, Clone)]
pub(crate) struct Claimed {
    pub(crate) instance_id: Uuid,
    pub(crate) tenant: String,
    pub(crate) name: String,
    pub(crate) engine: Engine,
    pub(crate) labels: BTreeMap<String, String>,
    pub(crate) registry_version: i64,
    pub(crate) timeout: Duration,
    /// `scrape_seq` at the claim: the delta base this scrape must build on.
    pub(crate) scrape_seq: i64,
    pub(crate) next_run_at: DateTime<Utc>,
}

const CLAIMED_COLUMNS: &str = "instance_id, tenant, name, engine, labels, registry_version, interval_ms, timeout_ms, scrape_seq, next_run_at";

fn claimed(row: &sqlx::postgres::PgRow) -> Result<Claimed, sqlx::Error> {
    Ok(Claimed {
        instance_id: row.try_get("instance_id")?,
        tenant: row.try_get("tenant")?,
        name: row.try_get("name")?,
        engine: Engine::parse(row.try_get("engine")?),
        labels: row
            .try_get::<Json<BTreeMap<String, String>>, _>("labels")?
            .0,
        registry_version: row.try_get("registry_version")?,
        timeout: Duration::from_millis(row.try_get::<i32, _>("timeout_ms")?.max(1) as u64),
        scrape_seq: row.try_get("scrape_seq")?,
        next_run_at: row.try_get("next_run_at")?,
    })
}

fn millis(d: Duration) -> i32 {
    i32::try_from(d.as_millis()).unwrap_or(i32::MAX).max(1)
}

/// Adds or updates a scrape job; an older registry version than the stored one changes
/// nothing (events may arrive after a full sync that already saw a newer version). A new job
/// is first due at a random point of its interval, so targets registered together (a full sync
/// at start) spread over the interval instead of being scraped in the same second forever.
pub(crate) async fn upsert_target(
    tx: &mut PgConnection,
    spec: &TargetSpec,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO collector.targets \
           (instance_id, tenant, name, engine, labels, registry_version, interval_ms, timeout_ms, next_run_at, synced_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, \
                 now() + random() * $7 * interval '1 millisecond', now()) \
         ON CONFLICT (instance_id) DO UPDATE SET \
           tenant = EXCLUDED.tenant, name = EXCLUDED.name, labels = EXCLUDED.labels, \
           registry_version = EXCLUDED.registry_version, interval_ms = EXCLUDED.interval_ms, \
           timeout_ms = EXCLUDED.timeout_ms, synced_at = now(), \
           -- a shorter interval takes effect now, not after the old one
           next_run_at = least(collector.targets.next_run_at, now() + EXCLUDED.interval_ms * interval '1 millisecond') \
         WHERE collector.targets.registry_version <= EXCLUDED.registry_version",
    )
    .bind(spec.instance_id)
    .bind(&spec.tenant)
    .bind(&spec.name)
    .bind(spec.engine.as_str())
    .bind(Json(&spec.labels))
    .bind(spec.registry_version)
    .bind(millis(spec.interval))
    .bind(millis(spec.timeout))
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Removes a scrape job (the instance was deleted), resolving its alerts. `version` is the
/// version the registry deleted; a job re-created since with a newer version stays.
pub(crate) async fn delete_target(
    tx: &mut PgConnection,
    instance_id: Uuid,
    version: i64,
    outbox: &Outbox,
    subjects: &SubjectRoot,
) -> Result<bool, CollectorError> {
    let deleted = sqlx::query(
        "DELETE FROM collector.targets WHERE instance_id = $1 AND registry_version <= $2",
    )
    .bind(instance_id)
    .bind(version)
    .execute(&mut *tx)
    .await?
    .rows_affected()
        > 0;
    if deleted {
        close_alerts(tx, instance_id, outbox, subjects).await?;
    }
    Ok(deleted)
}

/// Resolves the firing alerts and forgets the pending ones of a target that is gone.
async fn close_alerts(
    tx: &mut PgConnection,
    instance_id: Uuid,
    outbox: &Outbox,
    subjects: &SubjectRoot,
) -> Result<(), CollectorError> {
    sqlx::query("DELETE FROM collector.alerts WHERE instance_id = $1 AND state = 'pending'")
        .bind(instance_id)
        .execute(&mut *tx)
        .await?;
    let resolved = sqlx::query(&format!(
        "UPDATE collector.alerts SET state = 'resolved', resolved_at = now() \
         WHERE instance_id = $1 AND state = 'firing' RETURNING {ALERT_COLUMNS}"
    ))
    .bind(instance_id)
    .fetch_all(&mut *tx)
    .await?;
    for row in resolved {
        let alert = alert_row(&row)?;
        outbox
            .enqueue(tx, &events::resolved(subjects, &alert)?)
            .await?;
    }
    Ok(())
}

/// Replaces the whole set of jobs with `specs` (a full sync from the registry): jobs not in it
/// and not touched by an event since `started` are removed.
pub(crate) async fn sync_all(
    pool: &PgPool,
    specs: &[TargetSpec],
    started: DateTime<Utc>,
    outbox: &Outbox,
    subjects: &SubjectRoot,
) -> Result<(usize, usize), CollectorError> {
    let mut tx = pool.begin().await?;
    for spec in specs {
        upsert_target(&mut tx, spec).await?;
    }
    let keep: Vec<Uuid> = specs.iter().map(|s| s.instance_id).collect();
    let gone: Vec<(Uuid, i64)> = sqlx::query_as(
        "SELECT instance_id, registry_version FROM collector.targets \
         WHERE instance_id <> ALL($1) AND synced_at < $2",
    )
    .bind(&keep)
    .bind(started)
    .fetch_all(&mut *tx)
    .await?;
    for (id, version) in &gone {
        delete_target(&mut tx, *id, *version, outbox, subjects).await?;
    }
    tx.commit().await?;
    Ok((specs.len(), gone.len()))
}

/// Claims up to `limit` due jobs, moving each one interval ahead; rows another replica is
/// claiming are skipped, not waited for.
pub(crate) async fn claim_due(pool: &PgPool, limit: i64) -> Result<Vec<Claimed>, sqlx::Error> {
    let rows = sqlx::query(&format!(
        "UPDATE collector.targets t SET next_run_at = \
           greatest(t.next_run_at + t.interval_ms * interval '1 millisecond', now()) \
         WHERE instance_id IN ( \
           SELECT instance_id FROM collector.targets WHERE next_run_at <= now() \
           ORDER BY next_run_at LIMIT $1 FOR UPDATE SKIP LOCKED) \
         RETURNING {CLAIMED_COLUMNS}"
    ))
    .bind(limit)
    .fetch_all(pool)
    .await?;
    rows.iter().map(claimed).collect()
}

/// When the next job is due, if any.
pub(crate) async fn next_due(pool: &PgPool) -> Result<Option<DateTime<Utc>>, sqlx::Error> {
    sqlx::query_scalar("SELECT min(next_run_at) FROM collector.targets")
        .fetch_one(pool)
        .await
}

/// Claims one job now, whenever it was due (CollectNow).
pub(crate) async fn claim_now(
    pool: &PgPool,
    scope: &Scope,
    id: Uuid,
) -> Result<Option<Claimed>, sqlx::Error> {
    let row = sqlx::query(&format!(
        "UPDATE collector.targets SET next_run_at = now() + interval_ms * interval '1 millisecond' \
         WHERE instance_id = $1 AND ($2::text IS NULL OR tenant = $2) RETURNING {CLAIMED_COLUMNS}"
    ))
    .bind(id)
    .bind(scope.tenant_name().map(|t| t.as_str()))
    .fetch_optional(pool)
    .await?;
    row.as_ref().map(claimed).transpose()
}

/// The delta base of a target: the snapshot and samples its last scrape wrote.
#[derive(Debug, Default)]
pub(crate) struct Base {
    pub(crate) snapshot: Option<Snapshot>,
    pub(crate) latest: Option<(Vec<Sample>, DateTime<Utc>)>,
}

pub(crate) async fn load_base(pool: &PgPool, id: Uuid) -> Result<Base, sqlx::Error> {
    let row = sqlx::query(
        "SELECT snapshot, latest, latest_at FROM collector.scrape_state WHERE instance_id = $1",
    )
    .bind(id)
    .fetch_optional(pool)
    .await?;
    let Some(row) = row else {
        return Ok(Base::default());
    };
    let snapshot: Option<Vec<u8>> = row.try_get("snapshot")?;
    let latest: Option<Json<Vec<Sample>>> = row.try_get("latest")?;
    let latest_at: Option<DateTime<Utc>> = row.try_get("latest_at")?;
    Ok(Base {
        snapshot: snapshot.as_deref().and_then(statements::decode),
        // Instance-level values only, as the scheduler keeps them (see `scrape::derive`).
        latest: latest.zip(latest_at).map(|(l, at)| {
            let mut samples = l.0;
            samples.retain(|s| s.labels.is_empty());
            (samples, at)
        }),
    })
}

/// Query ids whose text is stored for a target.
pub(crate) async fn known_texts(pool: &PgPool, id: Uuid) -> Result<HashSet<i64>, sqlx::Error> {
    let ids: Vec<i64> =
        sqlx::query_scalar("SELECT query_id FROM collector.query_texts WHERE instance_id = $1")
            .bind(id)
            .fetch_all(pool)
            .await?;
    Ok(ids.into_iter().collect())
}

/// What one scrape produced, ready to be written.
#[derive(Debug)]
pub(crate) struct Outcome {
    pub(crate) at: DateTime<Utc>,
    pub(crate) duration: Duration,
    pub(crate) up: bool,
    pub(crate) problems: Vec<String>,
    /// Every sample of the scrape (empty when down).
    pub(crate) samples: Vec<Sample>,
    pub(crate) snapshot: Option<Snapshot>,
    pub(crate) deltas: Option<Deltas>,
    pub(crate) texts: Vec<(i64, String)>,
}

/// How writing a scrape went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Written {
    /// Written; the target's new `scrape_seq`.
    Ok(i64),
    /// The target was deleted meanwhile: nothing written.
    Gone,
    /// Another scrape of the target was written after this one's base: nothing written, so
    /// that no interval is counted twice.
    Stale,
}

/// Writes one scrape in one transaction: history, state, texts, and the alerts it raises or
/// resolves with their events.
pub(crate) async fn write_scrape(
    pool: &PgPool,
    target: &Claimed,
    outcome: &Outcome,
    rules: &Rules,
    outbox: &Outbox,
    subjects: &SubjectRoot,
) -> Result<Written, CollectorError> {
    let mut tx = pool.begin().await?;
    // Locks the job row: writers of one target (and its deletion) go one at a time.
    let previous: Option<i64> = sqlx::query_scalar(
        "UPDATE collector.targets SET scrape_seq = scrape_seq + 1 WHERE instance_id = $1 RETURNING scrape_seq - 1",
    )
    .bind(target.instance_id)
    .fetch_optional(&mut *tx)
    .await?;
    match previous {
        None => return Ok(Written::Gone),
        Some(seq) if seq != target.scrape_seq => return Ok(Written::Stale),
        Some(_) => {}
    }
    let id = target.instance_id;

    if outcome.up {
        let (mut metrics, mut labels, mut values) = (Vec::new(), Vec::new(), Vec::new());
        for s in &outcome.samples {
            if catalog::family(&s.name).is_some_and(|f| f.history) {
                metrics.push(s.name.clone());
                labels.push(labels_json(&s.labels));
                values.push(s.value);
            }
        }
        sqlx::query(
            "INSERT INTO collector.samples (instance_id, at, metric, labels, value) \
             SELECT $1, $2, m, l::jsonb, v FROM unnest($3::text[], $4::text[], $5::float8[]) AS u(m, l, v)",
        )
        .bind(id)
        .bind(outcome.at)
        .bind(&metrics)
        .bind(&labels)
        .bind(&values)
        .execute(&mut *tx)
        .await?;
        if let Some(deltas) = &outcome.deltas {
            insert_deltas(&mut tx, id, outcome.at, deltas).await?;
        }
        if !outcome.texts.is_empty() {
            let (ids, texts): (Vec<i64>, Vec<String>) = outcome.texts.iter().cloned().unzip();
            sqlx::query(
                "INSERT INTO collector.query_texts (instance_id, query_id, text) \
                 SELECT $1, q, t FROM unnest($2::int8[], $3::text[]) AS u(q, t) ON CONFLICT DO NOTHING",
            )
            .bind(id)
            .bind(&ids)
            .bind(&texts)
            .execute(&mut *tx)
            .await?;
        }
        sqlx::query(
            "INSERT INTO collector.scrape_state \
               (instance_id, scraped_at, duration_ms, up, problems, latest, latest_at, snapshot) \
             VALUES ($1, $2, $3, true, $4, $5, $2, $6) \
             ON CONFLICT (instance_id) DO UPDATE SET scraped_at = EXCLUDED.scraped_at, \
               duration_ms = EXCLUDED.duration_ms, up = true, problems = EXCLUDED.problems, \
               latest = EXCLUDED.latest, latest_at = EXCLUDED.latest_at, \
               snapshot = coalesce(EXCLUDED.snapshot, collector.scrape_state.snapshot)",
        )
        .bind(id)
        .bind(outcome.at)
        .bind(outcome.duration.as_secs_f64() * 1e3)
        .bind(&outcome.problems)
        .bind(Json(&outcome.samples))
        .bind(outcome.snapshot.as_ref().map(statements::encode))
        .execute(&mut *tx)
        .await?;
    } else {
        // Down: the last good samples and the delta base stay for when it comes back.
        sqlx::query(
            "INSERT INTO collector.samples (instance_id, at, metric, value) VALUES ($1, $2, $3, 0)",
        )
        .bind(id)
        .bind(outcome.at)
        .bind(catalog::UP)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO collector.scrape_state (instance_id, scraped_at, duration_ms, up, problems) \
             VALUES ($1, $2, $3, false, $4) \
             ON CONFLICT (instance_id) DO UPDATE SET scraped_at = EXCLUDED.scraped_at, \
               duration_ms = EXCLUDED.duration_ms, up = false, problems = EXCLUDED.problems",
        )
        .bind(id)
        .bind(outcome.at)
        .bind(outcome.duration.as_secs_f64() * 1e3)
        .bind(&outcome.problems)
        .execute(&mut *tx)
        .await?;
    }
    let evaluated: Vec<Sample> = if outcome.up {
        outcome.samples.clone()
    } else {
        vec![Sample::new(catalog::UP, 0.0)]
    };
    evaluate_alerts(
        &mut tx, target, &evaluated, outcome.at, rules, outbox, subjects,
    )
    .await?;
    let seq = target.scrape_seq + 1;
    tx.commit().await?;
    Ok(Written::Ok(seq))
}

async fn insert_deltas(
    tx: &mut PgConnection,
    id: Uuid,
    at: DateTime<Utc>,
    deltas: &Deltas,
) -> Result<(), sqlx::Error> {
    if deltas.entries.is_empty() {
        return Ok(());
    }
    // One row per (query id, top level): roles running the same statement are summed.
    let mut merged: BTreeMap<(i64, bool), Counters> = BTreeMap::new();
    for (key, c) in &deltas.entries {
        merged
            .entry((key.query_id, key.toplevel))
            .or_default()
            .add(c);
    }
    let n = merged.len();
    let mut cols = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for ((query_id, toplevel), c) in merged {
        cols.0.push(query_id);
        cols.1.push(toplevel);
        cols.2.push(c.calls);
        cols.3.push(c.total_exec_ms);
        cols.4.push(c.rows);
        cols.5.push(c.shared_blks_hit);
        cols.6.push(c.shared_blks_read);
        cols.7.push(c.temp_blks_written);
        cols.8.push(c.wal_bytes);
    }
    sqlx::query(
        "INSERT INTO collector.statement_deltas (instance_id, at, query_id, toplevel, calls, total_exec_ms, \
           rows, shared_blks_hit, shared_blks_read, temp_blks_written, wal_bytes) \
         SELECT $1, $2, * FROM unnest($3::int8[], $4::bool[], $5::int8[], $6::float8[], $7::int8[], \
           $8::int8[], $9::int8[], $10::int8[], $11::int8[])",
    )
    .bind(id)
    .bind(at)
    .bind(&cols.0)
    .bind(&cols.1)
    .bind(&cols.2)
    .bind(&cols.3)
    .bind(&cols.4)
    .bind(&cols.5)
    .bind(&cols.6)
    .bind(&cols.7)
    .bind(&cols.8)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

fn format_seconds(d: Duration) -> String {
    match d.as_secs() {
        0 => "0s".to_owned(),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

fn labels_json(labels: &[(String, String)]) -> String {
    let map: BTreeMap<&str, &str> = labels
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    serde_json::to_string(&map).unwrap_or_else(|_| "{}".into())
}

/// An alert as stored.
#[derive(Debug, Clone)]
pub(crate) struct AlertRow {
    pub(crate) fingerprint: String,
    pub(crate) tenant: String,
    pub(crate) instance_id: Uuid,
    pub(crate) instance_name: String,
    pub(crate) rule: String,
    pub(crate) state: String,
    pub(crate) labels: BTreeMap<String, String>,
    pub(crate) annotations: BTreeMap<String, String>,
    pub(crate) value: f64,
    pub(crate) threshold: f64,
    pub(crate) active_since: DateTime<Utc>,
    pub(crate) fired_at: Option<DateTime<Utc>>,
    pub(crate) resolved_at: Option<DateTime<Utc>>,
}

const ALERT_COLUMNS: &str = "fingerprint, tenant, instance_id, instance_name, rule, state, labels, annotations, \
     value, threshold, active_since, fired_at, resolved_at";

fn alert_row(row: &sqlx::postgres::PgRow) -> Result<AlertRow, sqlx::Error> {
    Ok(AlertRow {
        fingerprint: row.try_get("fingerprint")?,
        tenant: row.try_get("tenant")?,
        instance_id: row.try_get("instance_id")?,
        instance_name: row.try_get("instance_name")?,
        rule: row.try_get("rule")?,
        state: row.try_get("state")?,
        labels: row
            .try_get::<Json<BTreeMap<String, String>>, _>("labels")?
            .0,
        annotations: row
            .try_get::<Json<BTreeMap<String, String>>, _>("annotations")?
            .0,
        value: row.try_get("value")?,
        threshold: row.try_get("threshold")?,
        active_since: row.try_get("active_since")?,
        fired_at: row.try_get("fired_at")?,
        resolved_at: row.try_get("resolved_at")?,
    })
}

/// The stable identity of a rule on an instance.
pub(crate) fn fingerprint(rule: &str, instance_id: Uuid) -> String {
    use sha2::{Digest as _, Sha256};
    let digest = Sha256::new()
        .chain_update(rule.as_bytes())
        .chain_update([0])
        .chain_update(instance_id.as_bytes())
        .finalize();
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

async fn evaluate_alerts(
    tx: &mut PgConnection,
    target: &Claimed,
    samples: &[Sample],
    now: DateTime<Utc>,
    rules: &Rules,
    outbox: &Outbox,
    subjects: &SubjectRoot,
) -> Result<(), CollectorError> {
    let active: Vec<(String, String, DateTime<Utc>)> = sqlx::query_as(
        "SELECT rule, state, active_since FROM collector.alerts WHERE instance_id = $1 AND state <> 'resolved'",
    )
    .bind(target.instance_id)
    .fetch_all(&mut *tx)
    .await?;
    let mut labels = target.labels.clone();
    labels.insert("tenant".into(), target.tenant.clone());
    labels.insert("instance".into(), target.name.clone());
    for rule in rules.for_target(target.engine == Engine::Postgres, &labels) {
        let condition = rules::condition(&rule, samples);
        let stored = active.iter().find(|(name, _, _)| name == rule.name);
        let state = stored.map(|(_, state, since)| {
            if state == "firing" {
                Active::Firing
            } else {
                Active::Pending {
                    held_for: (now - *since).to_std().unwrap_or_default(),
                }
            }
        });
        let value = match condition {
            rules::Condition::Holds(v) | rules::Condition::Clear(v) => v,
            rules::Condition::Unknown => continue,
        };
        let fp = fingerprint(rule.name, target.instance_id);
        let summary = rules::describe(&rule, value);
        match rules::transition(state, condition, rule.for_) {
            Transition::Stay => {
                if stored.is_some() {
                    sqlx::query("UPDATE collector.alerts SET value = $2 WHERE fingerprint = $1 AND state <> 'resolved'")
                        .bind(&fp)
                        .bind(value)
                        .execute(&mut *tx)
                        .await?;
                }
            }
            Transition::Pend | Transition::Fire => {
                let state = if matches!(
                    rules::transition(state, condition, rule.for_),
                    Transition::Fire
                ) {
                    "firing"
                } else {
                    "pending"
                };
                let alert_labels: BTreeMap<String, String> = [
                    ("alertname", rule.name),
                    ("severity", rule.severity),
                    ("tenant", target.tenant.as_str()),
                    ("instance", target.name.as_str()),
                    ("engine", target.engine.as_str()),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect();
                let annotations: BTreeMap<String, String> = [
                    ("summary".to_owned(), summary.clone()),
                    (
                        "description".to_owned(),
                        format!(
                            "{summary}. Instance {} of tenant {}; rule {} on {} (for {}).",
                            target.name,
                            target.tenant,
                            rule.name,
                            rule.metric,
                            format_seconds(rule.for_)
                        ),
                    ),
                ]
                .into_iter()
                .collect();
                let row = sqlx::query(&format!(
                    "INSERT INTO collector.alerts (id, fingerprint, instance_id, tenant, instance_name, rule, state, \
                       labels, annotations, value, threshold, active_since, fired_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, CASE WHEN $7 = 'firing' THEN $12 END) \
                     ON CONFLICT (fingerprint) WHERE state <> 'resolved' DO UPDATE SET state = EXCLUDED.state, \
                       value = EXCLUDED.value, annotations = EXCLUDED.annotations, \
                       fired_at = CASE WHEN EXCLUDED.state = 'firing' THEN $12 END \
                     RETURNING {ALERT_COLUMNS}"
                ))
                .bind(Uuid::now_v7())
                .bind(&fp)
                .bind(target.instance_id)
                .bind(&target.tenant)
                .bind(&target.name)
                .bind(rule.name)
                .bind(state)
                .bind(Json(&alert_labels))
                .bind(Json(&annotations))
                .bind(value)
                .bind(rule.threshold)
                .bind(now)
                .fetch_one(&mut *tx)
                .await?;
                if state == "firing" {
                    let alert = alert_row(&row)?;
                    outbox
                        .enqueue(tx, &events::firing(subjects, &alert)?)
                        .await?;
                }
            }
            Transition::Forget => {
                sqlx::query(
                    "DELETE FROM collector.alerts WHERE fingerprint = $1 AND state = 'pending'",
                )
                .bind(&fp)
                .execute(&mut *tx)
                .await?;
            }
            Transition::Resolve => {
                let row = sqlx::query(&format!(
                    "UPDATE collector.alerts SET state = 'resolved', resolved_at = $2, value = $3 \
                     WHERE fingerprint = $1 AND state = 'firing' RETURNING {ALERT_COLUMNS}"
                ))
                .bind(&fp)
                .bind(now)
                .bind(value)
                .fetch_one(&mut *tx)
                .await?;
                let alert = alert_row(&row)?;
                outbox
                    .enqueue(tx, &events::resolved(subjects, &alert)?)
                    .await?;
            }
        }
    }
    Ok(())
}

/// A target and how its last scrape went, for the API and the exposition.
#[derive(Debug, Clone)]
pub(crate) struct TargetView {
    pub(crate) instance_id: Uuid,
    pub(crate) tenant: String,
    pub(crate) name: String,
    pub(crate) engine: Engine,
    pub(crate) next_run_at: DateTime<Utc>,
    pub(crate) scraped_at: Option<DateTime<Utc>>,
    pub(crate) duration_ms: Option<f64>,
    pub(crate) up: Option<bool>,
    pub(crate) problems: Vec<String>,
    pub(crate) latest: Vec<Sample>,
}

const VIEW_SELECT: &str = "SELECT t.instance_id, t.tenant, t.name, t.engine, t.next_run_at, s.scraped_at, \
     s.duration_ms, s.up, coalesce(s.problems, '{}') AS problems, s.latest \
     FROM collector.targets t LEFT JOIN collector.scrape_state s USING (instance_id)";

fn view(row: &sqlx::postgres::PgRow) -> Result<TargetView, sqlx::Error> {
    Ok(TargetView {
        instance_id: row.try_get("instance_id")?,
        tenant: row.try_get("tenant")?,
        name: row.try_get("name")?,
        engine: Engine::parse(row.try_get("engine")?),
        next_run_at: row.try_get("next_run_at")?,
        scraped_at: row.try_get("scraped_at")?,
        duration_ms: row.try_get("duration_ms")?,
        up: row.try_get("up")?,
        problems: row.try_get("problems")?,
        latest: row
            .try_get::<Option<Json<Vec<Sample>>>, _>("latest")?
            .map(|j| j.0)
            .unwrap_or_default(),
    })
}

/// One target the caller may see.
pub(crate) async fn target_view(
    pool: &PgPool,
    scope: &Scope,
    id: Uuid,
) -> Result<Option<TargetView>, sqlx::Error> {
    let row = sqlx::query(&format!(
        "{VIEW_SELECT} WHERE t.instance_id = $1 AND ($2::text IS NULL OR t.tenant = $2)"
    ))
    .bind(id)
    .bind(scope.tenant_name().map(|t| t.as_str()))
    .fetch_optional(pool)
    .await?;
    row.as_ref().map(view).transpose()
}

/// Every target and when it was last scraped: what tells the exposition which views to read.
pub(crate) async fn view_stamps(
    pool: &PgPool,
) -> Result<Vec<(Uuid, Option<DateTime<Utc>>)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT t.instance_id, s.scraped_at FROM collector.targets t \
         LEFT JOIN collector.scrape_state s USING (instance_id)",
    )
    .fetch_all(pool)
    .await
}

/// The views of `ids`.
pub(crate) async fn views(pool: &PgPool, ids: &[Uuid]) -> Result<Vec<TargetView>, sqlx::Error> {
    let rows = sqlx::query(&format!("{VIEW_SELECT} WHERE t.instance_id = ANY($1)"))
        .bind(ids)
        .fetch_all(pool)
        .await?;
    rows.iter().map(view).collect()
}

/// One metric series over a window: its name and labels.
pub(crate) type SeriesKey = (String, BTreeMap<String, String>);

/// A series and its points, oldest first.
pub(crate) type SeriesPoints = (SeriesKey, Vec<(DateTime<Utc>, f64)>);

type SampleRow = (String, Json<BTreeMap<String, String>>, DateTime<Utc>, f64);

/// The history of a target since `since`, optionally only some metrics.
pub(crate) async fn series(
    pool: &PgPool,
    id: Uuid,
    since: DateTime<Utc>,
    names: &[String],
) -> Result<Vec<SeriesPoints>, sqlx::Error> {
    let rows: Vec<SampleRow> = sqlx::query_as(
        "SELECT metric, labels, at, value FROM collector.samples \
         WHERE instance_id = $1 AND at >= $2 AND (cardinality($3::text[]) = 0 OR metric = ANY($3)) \
         ORDER BY metric, labels::text, at",
    )
    .bind(id)
    .bind(since)
    .bind(names)
    .fetch_all(pool)
    .await?;
    let mut out: Vec<SeriesPoints> = Vec::new();
    for (metric, labels, at, value) in rows {
        match out.last_mut() {
            Some(((m, l), points)) if *m == metric && *l == labels.0 => points.push((at, value)),
            _ => out.push(((metric, labels.0), vec![(at, value)])),
        }
    }
    Ok(out)
}

/// One statement's work over a window.
#[derive(Debug, Clone)]
pub(crate) struct TopQuery {
    pub(crate) query_id: i64,
    pub(crate) text: Option<String>,
    pub(crate) counters: Counters,
}

/// The statements with the most execution time since `since`, the total time of top-level
/// statements in the window, and the earliest delta in it; the collector's own statements
/// (their text starts with its mark) left out.
pub(crate) async fn top_queries(
    pool: &PgPool,
    id: Uuid,
    since: DateTime<Utc>,
    limit: i64,
) -> Result<(Vec<TopQuery>, f64, Option<DateTime<Utc>>), sqlx::Error> {
    let rows = sqlx::query(
        "SELECT d.query_id, t.text, sum(d.calls)::int8 AS calls, sum(d.total_exec_ms)::float8 AS total_exec_ms, \
           sum(d.rows)::int8 AS rows, sum(d.shared_blks_hit)::int8 AS hit, sum(d.shared_blks_read)::int8 AS read, \
           sum(d.temp_blks_written)::int8 AS temp, sum(d.wal_bytes)::int8 AS wal \
         FROM collector.statement_deltas d \
         LEFT JOIN collector.query_texts t ON t.instance_id = d.instance_id AND t.query_id = d.query_id \
         WHERE d.instance_id = $1 AND d.at >= $2 AND (t.text IS NULL OR NOT starts_with(t.text, $4)) \
         GROUP BY d.query_id, t.text ORDER BY total_exec_ms DESC, d.query_id LIMIT $3",
    )
    .bind(id)
    .bind(since)
    .bind(limit)
    .bind(crate::scrape::postgres::OWN_MARK)
    .fetch_all(pool)
    .await?;
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        out.push(TopQuery {
            query_id: row.try_get("query_id")?,
            text: row.try_get("text")?,
            counters: Counters {
                calls: row.try_get("calls")?,
                total_exec_ms: row.try_get("total_exec_ms")?,
                rows: row.try_get("rows")?,
                shared_blks_hit: row.try_get("hit")?,
                shared_blks_read: row.try_get("read")?,
                temp_blks_written: row.try_get("temp")?,
                wal_bytes: row.try_get("wal")?,
            },
        });
    }
    let (total, from): (Option<f64>, Option<DateTime<Utc>>) = sqlx::query_as(
        "SELECT sum(d.total_exec_ms) FILTER (WHERE d.toplevel)::float8, min(d.at) FROM collector.statement_deltas d \
         LEFT JOIN collector.query_texts t ON t.instance_id = d.instance_id AND t.query_id = d.query_id \
         WHERE d.instance_id = $1 AND d.at >= $2 AND (t.text IS NULL OR NOT starts_with(t.text, $3))",
    )
    .bind(id)
    .bind(since)
    .bind(crate::scrape::postgres::OWN_MARK)
    .fetch_one(pool)
    .await?;
    Ok((out, total.unwrap_or(0.0), from))
}

/// Alerts the caller may see, newest first.
pub(crate) async fn alerts(
    pool: &PgPool,
    scope: &Scope,
    instance: Option<Uuid>,
    include_resolved: bool,
    limit: i64,
) -> Result<Vec<AlertRow>, sqlx::Error> {
    let rows = sqlx::query(&format!(
        "SELECT {ALERT_COLUMNS} FROM collector.alerts \
         WHERE ($1::text IS NULL OR tenant = $1) AND ($2::uuid IS NULL OR instance_id = $2) \
           AND ($3 OR state <> 'resolved') \
         ORDER BY active_since DESC, id DESC LIMIT $4"
    ))
    .bind(scope.tenant_name().map(|t| t.as_str()))
    .bind(instance)
    .bind(include_resolved)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    rows.iter().map(alert_row).collect()
}

/// Deletes history older than `retention`, at most `batch` rows per statement, until none is
/// left; returns how many rows went.
pub(crate) async fn prune(
    pool: &PgPool,
    retention: Duration,
    batch: i64,
) -> Result<u64, sqlx::Error> {
    let cutoff =
        Utc::now() - chrono::Duration::from_std(retention).unwrap_or(chrono::Duration::MAX);
    let mut total = 0;
    for table in ["samples", "statement_deltas"] {
        loop {
            // Small batches keep each transaction short next to the scrapes writing.
            let n = sqlx::query(&format!(
                "DELETE FROM collector.{table} WHERE ctid = ANY(ARRAY( \
                   SELECT ctid FROM collector.{table} WHERE at < $1 LIMIT $2))"
            ))
            .bind(cutoff)
            .bind(batch)
            .execute(pool)
            .await?
            .rows_affected();
            total += n;
            if n < batch as u64 {
                break;
            }
        }
    }
    total +=
        sqlx::query("DELETE FROM collector.alerts WHERE state = 'resolved' AND resolved_at < $1")
            .bind(cutoff)
            .execute(pool)
            .await?
            .rows_affected();
    // Texts of instances no longer watched.
    total += sqlx::query(
        "DELETE FROM collector.query_texts q WHERE NOT EXISTS ( \
           SELECT 1 FROM collector.targets t WHERE t.instance_id = q.instance_id)",
    )
    .execute(pool)
    .await?
    .rows_affected();
    Ok(total)
}
