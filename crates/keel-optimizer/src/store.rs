//! The optimizer's SQL: analysis jobs and recommendations, each change of a recommendation and
//! its event in one transaction. Every read and write is scoped by the caller's `Scope`.

use chrono::{DateTime, Utc};
use keel_auth::Scope;
use keel_bus::{EventKind, Outbox, SubjectRoot};
use serde::{Deserialize, Serialize};
use sqlx::types::Json;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::advisor::whatif::Planning;
use crate::error::OptimizerError;
use crate::events;

/// The optimizer's schema.
pub const SCHEMA: &str = "optimizer";

/// An analysis job row.
#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct AnalysisRow {
    pub(crate) id: Uuid,
    pub(crate) tenant: String,
    pub(crate) instance_id: Uuid,
    pub(crate) state: String,
    pub(crate) budget_bytes: i64,
    pub(crate) max_indexes: i32,
    pub(crate) window_seconds: i32,
    pub(crate) max_statements: i32,
    pub(crate) attempts: i32,
    pub(crate) phase: String,
    pub(crate) message: String,
    pub(crate) whatif_calls: i64,
    pub(crate) result: Option<Json<AnalysisResult>>,
    pub(crate) error: Option<String>,
    pub(crate) created_at: DateTime<Utc>,
    pub(crate) finished_at: Option<DateTime<Utc>>,
}

/// A finished analysis, as stored.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct AnalysisResult {
    pub(crate) workload_source: String,
    pub(crate) problems: Vec<String>,
    pub(crate) statements: Vec<StatementRecord>,
    pub(crate) recommendation_ids: Vec<Uuid>,
    pub(crate) whatif_calls: u64,
    pub(crate) cache_hits: u64,
    pub(crate) elapsed_ms: u64,
    pub(crate) budget_bytes: i64,
}

/// One statement of an analysis, as stored.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct StatementRecord {
    pub(crate) query_id: i64,
    pub(crate) text: String,
    pub(crate) calls: f64,
    pub(crate) share_of_time: f64,
    pub(crate) planning: String,
    pub(crate) problem: String,
    pub(crate) cost_before: f64,
    pub(crate) cost_after: f64,
    pub(crate) plan_before: String,
    pub(crate) plan_after: String,
}

/// One statement a recommendation helps, as stored: enough to plan it again on the real index.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct EffectRecord {
    pub(crate) query_id: i64,
    pub(crate) text: String,
    pub(crate) cost_before: f64,
    pub(crate) cost_after: f64,
    pub(crate) plan_before: String,
    pub(crate) plan_after: String,
    pub(crate) share_of_time: f64,
    /// Values the what-if plan used for `$n` (none: as written, or generic when it has any).
    pub(crate) values: Option<Vec<String>>,
    pub(crate) param_count: u32,
    pub(crate) measured_cost_before: Option<f64>,
    pub(crate) measured_cost_after: Option<f64>,
    pub(crate) measured_plan_after: Option<String>,
}

impl EffectRecord {
    pub(crate) fn planning(&self) -> Planning {
        match (&self.values, self.param_count) {
            (_, 0) => Planning::Literal,
            (Some(values), _) => Planning::Sampled(values.clone()),
            (None, _) => Planning::Generic,
        }
    }
}

/// A recommendation row.
#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct RecommendationRow {
    pub(crate) id: Uuid,
    pub(crate) tenant: String,
    pub(crate) instance_id: Uuid,
    pub(crate) analysis_id: Uuid,
    pub(crate) kind: String,
    pub(crate) state: String,
    pub(crate) state_reason: String,
    pub(crate) table_name: String,
    pub(crate) index_schema: String,
    pub(crate) index_name: String,
    pub(crate) ddl: String,
    pub(crate) rollback_ddl: String,
    pub(crate) estimated_bytes: i64,
    pub(crate) hypopg_bytes: i64,
    pub(crate) built_bytes: i64,
    pub(crate) write_cost: f64,
    pub(crate) benefit: f64,
    pub(crate) share_of_time: f64,
    pub(crate) effects: Json<Vec<EffectRecord>>,
    pub(crate) explanation: String,
    pub(crate) cleanup_pending: bool,
    pub(crate) version: i64,
    pub(crate) created_at: DateTime<Utc>,
    pub(crate) updated_at: DateTime<Utc>,
}

/// A recommendation to insert.
#[derive(Debug, Clone)]
pub(crate) struct NewRecommendation {
    pub(crate) id: Uuid,
    pub(crate) kind: &'static str,
    pub(crate) table_name: String,
    pub(crate) index_schema: String,
    pub(crate) index_name: String,
    pub(crate) ddl: String,
    pub(crate) rollback_ddl: String,
    pub(crate) estimated_bytes: i64,
    pub(crate) hypopg_bytes: i64,
    pub(crate) write_cost: f64,
    pub(crate) benefit: f64,
    pub(crate) share_of_time: f64,
    pub(crate) effects: Vec<EffectRecord>,
    pub(crate) explanation: String,
}

fn tenant_filter(scope: &Scope) -> Option<String> {
    scope.tenant_name().map(|t| t.as_str().to_owned())
}

/// Queues an analysis.
pub(crate) async fn queue_analysis(
    pool: &PgPool,
    tenant: &str,
    instance_id: Uuid,
    budget_bytes: i64,
    max_indexes: i32,
    window_seconds: i32,
    max_statements: i32,
) -> Result<AnalysisRow, OptimizerError> {
    Ok(sqlx::query_as(
        "INSERT INTO optimizer.analyses (id, tenant, instance_id, budget_bytes, max_indexes, \
                                         window_seconds, max_statements) \
         VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING *",
    )
    .bind(Uuid::now_v7())
    .bind(tenant)
    .bind(instance_id)
    .bind(budget_bytes)
    .bind(max_indexes)
    .bind(window_seconds)
    .bind(max_statements)
    .fetch_one(pool)
    .await?)
}

/// One analysis of the caller's.
pub(crate) async fn analysis(
    pool: &PgPool,
    scope: &Scope,
    id: Uuid,
) -> Result<Option<AnalysisRow>, OptimizerError> {
    Ok(sqlx::query_as(
        "SELECT * FROM optimizer.analyses WHERE id = $1 AND ($2::text IS NULL OR tenant = $2)",
    )
    .bind(id)
    .bind(tenant_filter(scope))
    .fetch_optional(pool)
    .await?)
}

/// Claims one analysis that is queued, or whose runner's lease lapsed.
pub(crate) async fn claim_analysis(
    pool: &PgPool,
    lease: std::time::Duration,
) -> Result<Option<AnalysisRow>, sqlx::Error> {
    sqlx::query_as(
        "UPDATE optimizer.analyses SET state = 'running', attempts = attempts + 1, \
                lease_until = now() + make_interval(secs => $1), phase = 'claimed', message = '' \
         WHERE id = (SELECT id FROM optimizer.analyses \
                     WHERE state IN ('queued', 'running') AND lease_until <= now() \
                     ORDER BY created_at FOR UPDATE SKIP LOCKED LIMIT 1) \
         RETURNING *",
    )
    .bind(lease.as_secs_f64())
    .fetch_optional(pool)
    .await
}

/// Renews a running analysis's lease and records its progress; false when it is no longer
/// this runner's (it finished elsewhere).
pub(crate) async fn analysis_progress(
    pool: &PgPool,
    id: Uuid,
    attempts: i32,
    lease: std::time::Duration,
    phase: &str,
    message: &str,
    whatif_calls: i64,
) -> Result<bool, sqlx::Error> {
    let updated = sqlx::query(
        "UPDATE optimizer.analyses SET lease_until = now() + make_interval(secs => $3), \
                phase = $4, message = $5, whatif_calls = $6 \
         WHERE id = $1 AND attempts = $2 AND state = 'running'",
    )
    .bind(id)
    .bind(attempts)
    .bind(lease.as_secs_f64())
    .bind(phase)
    .bind(message)
    .bind(whatif_calls)
    .execute(pool)
    .await?;
    Ok(updated.rows_affected() == 1)
}

/// Ends an analysis as failed.
pub(crate) async fn fail_analysis(
    pool: &PgPool,
    id: Uuid,
    attempts: i32,
    error: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE optimizer.analyses SET state = 'failed', error = $3, phase = 'failed', \
                finished_at = now() WHERE id = $1 AND attempts = $2 AND state = 'running'",
    )
    .bind(id)
    .bind(attempts)
    .bind(error)
    .execute(pool)
    .await?;
    Ok(())
}

/// Ends an analysis with its result and recommendations, their `created` events with them.
pub(crate) async fn finish_analysis(
    pool: &PgPool,
    outbox: &Outbox,
    subjects: &SubjectRoot,
    row: &AnalysisRow,
    mut result: AnalysisResult,
    recommendations: Vec<NewRecommendation>,
) -> Result<bool, OptimizerError> {
    let mut tx = pool.begin().await?;
    result.recommendation_ids = recommendations.iter().map(|r| r.id).collect();
    let updated = sqlx::query(
        "UPDATE optimizer.analyses SET state = 'done', phase = 'done', result = $3, \
                whatif_calls = $4, finished_at = now() \
         WHERE id = $1 AND attempts = $2 AND state = 'running'",
    )
    .bind(row.id)
    .bind(row.attempts)
    .bind(Json(&result))
    .bind(i64::try_from(result.whatif_calls).unwrap_or(i64::MAX))
    .execute(&mut *tx)
    .await?;
    if updated.rows_affected() != 1 {
        // Another runner took it over (this one's lease lapsed): its result wins.
        return Ok(false);
    }
    supersede(&mut tx, row.instance_id).await?;
    for new in recommendations {
        let inserted: RecommendationRow = sqlx::query_as(
            "INSERT INTO optimizer.recommendations (id, tenant, instance_id, analysis_id, kind, \
                 table_name, index_schema, index_name, ddl, rollback_ddl, estimated_bytes, \
                 hypopg_bytes, write_cost, benefit, share_of_time, effects, explanation) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17) \
             RETURNING *",
        )
        .bind(new.id)
        .bind(&row.tenant)
        .bind(row.instance_id)
        .bind(row.id)
        .bind(new.kind)
        .bind(&new.table_name)
        .bind(&new.index_schema)
        .bind(&new.index_name)
        .bind(&new.ddl)
        .bind(&new.rollback_ddl)
        .bind(new.estimated_bytes)
        .bind(new.hypopg_bytes)
        .bind(new.write_cost)
        .bind(new.benefit)
        .bind(new.share_of_time)
        .bind(Json(&new.effects))
        .bind(&new.explanation)
        .fetch_one(&mut *tx)
        .await?;
        outbox
            .enqueue(
                &mut tx,
                &events::changed(subjects, &events::CREATED, &inserted)?,
            )
            .await?;
    }
    tx.commit().await?;
    Ok(true)
}

/// One recommendation of the caller's.
pub(crate) async fn recommendation(
    pool: &PgPool,
    scope: &Scope,
    id: Uuid,
) -> Result<Option<RecommendationRow>, OptimizerError> {
    Ok(sqlx::query_as(
        "SELECT * FROM optimizer.recommendations \
         WHERE id = $1 AND ($2::text IS NULL OR tenant = $2)",
    )
    .bind(id)
    .bind(tenant_filter(scope))
    .fetch_optional(pool)
    .await?)
}

/// The caller's recommendations, newest first.
pub(crate) async fn recommendations(
    pool: &PgPool,
    scope: &Scope,
    instance_id: Option<Uuid>,
    state: Option<&str>,
    limit: i64,
) -> Result<Vec<RecommendationRow>, OptimizerError> {
    Ok(sqlx::query_as(
        "SELECT * FROM optimizer.recommendations \
         WHERE ($1::text IS NULL OR tenant = $1) AND ($2::uuid IS NULL OR instance_id = $2) \
           AND ($3::text IS NULL OR state = $3) \
         ORDER BY created_at DESC, id DESC LIMIT $4",
    )
    .bind(tenant_filter(scope))
    .bind(instance_id)
    .bind(state)
    .bind(limit)
    .fetch_all(pool)
    .await?)
}

/// Moves a recommendation from one of `from` to `to` (an apply or rollback request), with a
/// lapsed lease so that a worker claims it at once. `None` when it was in none of `from`: the
/// caller answers with the row as it is (idempotent requests).
pub(crate) async fn request(
    pool: &PgPool,
    scope: &Scope,
    id: Uuid,
    from: &[&str],
    to: &str,
) -> Result<Option<RecommendationRow>, OptimizerError> {
    let from: Vec<String> = from.iter().map(|s| (*s).to_owned()).collect();
    Ok(sqlx::query_as(
        "UPDATE optimizer.recommendations SET state = $4, state_reason = '', \
                cleanup_pending = false, lease_until = now(), version = version + 1, updated_at = now() \
         WHERE id = $1 AND ($2::text IS NULL OR tenant = $2) AND state = ANY($3) RETURNING *",
    )
    .bind(id)
    .bind(tenant_filter(scope))
    .bind(from)
    .bind(to)
    .fetch_optional(pool)
    .await?)
}

/// Claims one apply or rollback in flight whose lease lapsed (new, or its worker died).
pub(crate) async fn claim_in_flight(
    pool: &PgPool,
    lease: std::time::Duration,
) -> Result<Option<RecommendationRow>, sqlx::Error> {
    sqlx::query_as(
        "UPDATE optimizer.recommendations SET lease_until = now() + make_interval(secs => $1), \
                version = version + 1 \
         WHERE id = (SELECT id FROM optimizer.recommendations \
                     WHERE (state IN ('applying', 'rolling_back') OR cleanup_pending) \
                       AND lease_until <= now() \
                     ORDER BY updated_at FOR UPDATE SKIP LOCKED LIMIT 1) \
         RETURNING *",
    )
    .bind(lease.as_secs_f64())
    .fetch_optional(pool)
    .await
}

/// Renews the lease of a claimed recommendation; false when the claim is lost.
pub(crate) async fn renew(
    pool: &PgPool,
    id: Uuid,
    version: i64,
    lease: std::time::Duration,
) -> Result<bool, sqlx::Error> {
    let updated = sqlx::query(
        "UPDATE optimizer.recommendations SET lease_until = now() + make_interval(secs => $3) \
         WHERE id = $1 AND version = $2",
    )
    .bind(id)
    .bind(version)
    .bind(lease.as_secs_f64())
    .execute(pool)
    .await?;
    Ok(updated.rows_affected() == 1)
}

/// Ends a claimed apply, rollback or cleanup in `state`, with its event (`kind`) if it has one,
/// if the claim still holds.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn settle(
    pool: &PgPool,
    outbox: &Outbox,
    subjects: &SubjectRoot,
    claimed: &RecommendationRow,
    state: &str,
    reason: &str,
    built_bytes: Option<i64>,
    effects: Option<&[EffectRecord]>,
    cleanup_pending: bool,
    kind: Option<&EventKind>,
) -> Result<Option<RecommendationRow>, OptimizerError> {
    let mut tx = pool.begin().await?;
    let row: Option<RecommendationRow> = sqlx::query_as(
        "UPDATE optimizer.recommendations SET state = $3, state_reason = $4, \
                built_bytes = coalesce($5, built_bytes), effects = coalesce($6, effects), \
                cleanup_pending = $7, version = version + 1, updated_at = now() \
         WHERE id = $1 AND version = $2 RETURNING *",
    )
    .bind(claimed.id)
    .bind(claimed.version)
    .bind(state)
    .bind(reason)
    .bind(built_bytes)
    .bind(effects.map(Json))
    .bind(cleanup_pending)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(row) = row else {
        return Ok(None);
    };
    if let Some(kind) = kind {
        outbox
            .enqueue(&mut tx, &events::changed(subjects, kind, &row)?)
            .await?;
    }
    tx.commit().await?;
    Ok(Some(row))
}

/// Drops the proposals of earlier analyses of `instance_id` (never touched, so nothing on the
/// instance depends on them): a new analysis supersedes them, and the list shows one current set.
async fn supersede(tx: &mut PgConnection, instance_id: Uuid) -> Result<(), sqlx::Error> {
    sqlx::query(
        "DELETE FROM optimizer.recommendations WHERE instance_id = $1 AND state = 'proposed'",
    )
    .bind(instance_id)
    .execute(tx)
    .await?;
    Ok(())
}
