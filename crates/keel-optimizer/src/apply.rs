//! Applying and rolling back a recommendation on its instance.
//!
//! `CREATE INDEX CONCURRENTLY` cannot run in a transaction and can fail half-way (a lock wait
//! past `lock_timeout`, a cancelled session, a killed Keel), leaving an invalid index that costs
//! writes and serves nothing. So every step starts from what the instance shows: a valid index
//! of the recommendation's name means the build finished (a resumed apply goes on to verify),
//! an invalid one is a leftover and is dropped before building again, and a failure drops what
//! it left. The index name is fixed per recommendation, so a resumed or repeated apply finds it.

use std::time::Duration;

use sqlx::{PgConnection, Row as _};

use crate::advisor::plan::Plan;
use crate::advisor::whatif::{Planned, WhatIf};
use crate::store::{EffectRecord, RecommendationRow};

/// How an apply or rollback ended.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// It did what it should; the new state's reason, size and measured effects.
    Done {
        reason: String,
        built_bytes: Option<i64>,
        effects: Option<Vec<EffectRecord>>,
    },
    /// It failed; the reason names the fix. `leftover`: an invalid index could not be dropped
    /// yet (its lock was held) and is dropped later.
    Failed { reason: String, leftover: bool },
    /// A failed build's leftover was dropped.
    Cleaned,
    /// Another session is still building this index (a previous attempt's, not yet stopped):
    /// try again once the lease lapses.
    Retry(String),
}

/// Session limits for DDL on a target.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DdlLimits {
    /// Longest a build may take.
    pub(crate) build_timeout: Duration,
    /// Longest wait for the table's lock.
    pub(crate) lock_timeout: Duration,
}

fn describe(error: &sqlx::Error) -> String {
    crate::error::describe(error)
}

async fn prepare_session(conn: &mut PgConnection, limits: DdlLimits) -> Result<(), sqlx::Error> {
    sqlx::Executor::execute(
        &mut *conn,
        format!(
            "SET statement_timeout = {}; SET lock_timeout = {}",
            limits.build_timeout.as_millis(),
            limits.lock_timeout.as_millis()
        )
        .as_str(),
    )
    .await?;
    // PostgreSQL 14+: a build whose client died (a killed Keel) stops within a second instead
    // of running on and leaving an index that nobody verifies.
    let _ =
        sqlx::Executor::execute(&mut *conn, "SET client_connection_check_interval = 1000").await;
    Ok(())
}

/// Whether the index `schema.name` exists, and if so whether it is valid.
async fn index_state(
    conn: &mut PgConnection,
    schema: &str,
    name: &str,
) -> Result<Option<bool>, sqlx::Error> {
    sqlx::query_scalar(
        "/* keel-optimizer */ SELECT i.indisvalid FROM pg_index i \
         JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE n.nspname = $1 AND c.relname = $2",
    )
    .bind(schema)
    .bind(name)
    .fetch_optional(&mut *conn)
    .await
}

/// Whether another session is building an index on `table` right now.
async fn build_in_progress(conn: &mut PgConnection, table: &str) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "/* keel-optimizer */ SELECT EXISTS (SELECT 1 FROM pg_stat_progress_create_index \
         WHERE relid = to_regclass($1) AND pid <> pg_backend_pid())",
    )
    .bind(table)
    .fetch_one(&mut *conn)
    .await
}

fn quoted(schema: &str, name: &str) -> String {
    use crate::advisor::model::quote_ident;
    format!("{}.{}", quote_ident(schema), quote_ident(name))
}

async fn drop_index(conn: &mut PgConnection, schema: &str, name: &str) -> Result<(), sqlx::Error> {
    sqlx::Executor::execute(
        &mut *conn,
        format!("DROP INDEX CONCURRENTLY IF EXISTS {}", quoted(schema, name)).as_str(),
    )
    .await?;
    Ok(())
}

/// Whether the session's role may build or drop indexes on `table` (it owns it, directly or
/// through a role it is in); `Err` names the fix.
async fn check_owner(
    conn: &mut PgConnection,
    table: &str,
) -> Result<Result<(), String>, sqlx::Error> {
    let row = sqlx::query(
        "/* keel-optimizer */ SELECT pg_has_role(current_user, c.relowner, 'USAGE') AS owns, \
                pg_get_userbyid(c.relowner)::text AS owner, current_user::text AS me \
         FROM pg_class c WHERE c.oid = to_regclass($1)",
    )
    .bind(table)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(row) = row else {
        return Ok(Err(format!("table {table} no longer exists")));
    };
    if row.try_get::<bool, _>("owns")? {
        return Ok(Ok(()));
    }
    let owner: String = row.try_get("owner")?;
    let me: String = row.try_get("me")?;
    Ok(Err(format!(
        "role {me} does not own table {table} (its owner is {owner}); building or dropping an \
         index needs ownership: run `GRANT {owner} TO {me};` on the instance, or register it \
         with a role that owns the table"
    )))
}

/// Plans every effect's statement on the instance as it is now (real indexes only).
async fn measure(
    conn: &mut PgConnection,
    effects: &[EffectRecord],
) -> Result<Vec<Option<Plan>>, sqlx::Error> {
    sqlx::Executor::execute(&mut *conn, "SET default_transaction_read_only = on").await?;
    let mut whatif = WhatIf::default();
    let mut out = Vec::with_capacity(effects.len());
    for (at, effect) in effects.iter().enumerate() {
        let planned = Planned {
            sql: effect.text.clone(),
            planning: effect.planning(),
            param_count: effect.param_count,
            tables: Default::default(),
        };
        out.push(match whatif.plan(conn, at, &planned, &[]).await {
            Ok(plan) => Some(plan),
            Err(crate::advisor::whatif::WhatIfError::Unplannable(_)) => None,
            Err(crate::advisor::whatif::WhatIfError::Session(error)) => return Err(error),
        });
    }
    sqlx::Executor::execute(&mut *conn, "RESET default_transaction_read_only").await?;
    Ok(out)
}

/// Builds the index of a `create_index` recommendation (or rebuilds a dropped one, for a
/// rollback of `drop_index`), verifying it and measuring the plans before and after.
async fn build(
    conn: &mut PgConnection,
    row: &RecommendationRow,
    ddl: &str,
) -> Result<Outcome, sqlx::Error> {
    if let Err(fix) = check_owner(conn, &row.table_name).await? {
        return Ok(Outcome::Failed {
            reason: fix,
            leftover: false,
        });
    }
    let mut effects = row.effects.0.clone();
    match index_state(conn, &row.index_schema, &row.index_name).await? {
        Some(true) => {}
        state => {
            if build_in_progress(conn, &row.table_name).await? {
                return Ok(Outcome::Retry(format!(
                    "another session is still building an index on {}",
                    row.table_name
                )));
            }
            let before = measure(conn, &effects).await?;
            for (effect, plan) in effects.iter_mut().zip(before) {
                effect.measured_cost_before = plan.map(|p| p.cost);
            }
            if state == Some(false) {
                // A leftover of an earlier attempt that did not finish.
                drop_index(conn, &row.index_schema, &row.index_name).await?;
            }
            if let Err(error) = sqlx::Executor::execute(&mut *conn, ddl).await {
                let reason = describe(&error);
                let cleanup = drop_index(conn, &row.index_schema, &row.index_name).await;
                let hint = if reason.contains("lock timeout") {
                    format!(
                        "; another session held a lock on {} longer than the lock timeout: \
                         retry when the table is quieter",
                        row.table_name
                    )
                } else {
                    String::new()
                };
                let (left, leftover) = match cleanup {
                    Ok(()) => (String::new(), false),
                    Err(e) => (
                        format!(
                            "; the invalid index {} it left could not be dropped yet ({}): Keel \
                             drops it as soon as the lock is free",
                            row.index_name,
                            describe(&e)
                        ),
                        true,
                    ),
                };
                return Ok(Outcome::Failed {
                    reason: format!("the build failed: {reason}{hint}{left}"),
                    leftover,
                });
            }
        }
    }
    if index_state(conn, &row.index_schema, &row.index_name).await? != Some(true) {
        let leftover = drop_index(conn, &row.index_schema, &row.index_name)
            .await
            .is_err();
        return Ok(Outcome::Failed {
            reason: "the build ended with an invalid index; see the instance's log".into(),
            leftover,
        });
    }
    let built: i64 =
        sqlx::query_scalar("/* keel-optimizer */ SELECT pg_relation_size(to_regclass($1))::int8")
            .bind(quoted(&row.index_schema, &row.index_name))
            .fetch_one(&mut *conn)
            .await?;
    let after = measure(conn, &effects).await?;
    for (effect, plan) in effects.iter_mut().zip(after) {
        effect.measured_cost_after = plan.as_ref().map(|p| p.cost);
        effect.measured_plan_after = plan.map(|p| p.scans.join("; "));
    }
    Ok(Outcome::Done {
        reason: format!("index {} built and valid", row.index_name),
        built_bytes: Some(built),
        effects: Some(effects),
    })
}

/// Drops the recommendation's index (for an applied `create_index` rolled back, or an applied
/// `drop_index`).
async fn remove(
    conn: &mut PgConnection,
    row: &RecommendationRow,
    measure_effects: bool,
) -> Result<Outcome, sqlx::Error> {
    if let Err(fix) = check_owner(conn, &row.table_name).await? {
        return Ok(Outcome::Failed {
            reason: fix,
            leftover: false,
        });
    }
    drop_index(conn, &row.index_schema, &row.index_name).await?;
    let effects = if measure_effects {
        let mut effects = row.effects.0.clone();
        let after = measure(conn, &effects).await?;
        for (effect, plan) in effects.iter_mut().zip(after) {
            effect.measured_cost_after = plan.map(|p| p.cost);
        }
        Some(effects)
    } else {
        None
    };
    Ok(Outcome::Done {
        reason: format!("index {} dropped", row.index_name),
        built_bytes: None,
        effects,
    })
}

/// Carries out the claimed step of `row` (its state says which: applying or rolling back).
// Boxed: a `Send` future rustc can check here, not through every caller's generics.
pub(crate) fn run<'a>(
    conn: &'a mut PgConnection,
    row: &'a RecommendationRow,
    limits: DdlLimits,
) -> futures::future::BoxFuture<'a, Result<Outcome, sqlx::Error>> {
    Box::pin(run_inner(conn, row, limits))
}

async fn run_inner(
    conn: &mut PgConnection,
    row: &RecommendationRow,
    limits: DdlLimits,
) -> Result<Outcome, sqlx::Error> {
    prepare_session(conn, limits).await?;
    match (row.kind.as_str(), row.state.as_str()) {
        ("create_index", "applying") => build(conn, row, &row.ddl).await,
        ("create_index", "rolling_back") => remove(conn, row, false).await,
        ("drop_index", "applying") => remove(conn, row, true).await,
        ("drop_index", "rolling_back") => build(conn, row, &row.rollback_ddl).await,
        ("create_index", "failed") if row.cleanup_pending => {
            if index_state(conn, &row.index_schema, &row.index_name).await? == Some(false) {
                drop_index(conn, &row.index_schema, &row.index_name).await?;
            }
            Ok(Outcome::Cleaned)
        }
        (kind, state) => Ok(Outcome::Failed {
            reason: format!("nothing to do for a {kind} recommendation in state {state}"),
            leftover: false,
        }),
    }
}
