//! What-if plans with HypoPG: hypothetical indexes in the analysis session, re-planned
//! statements, and a cache per (statement, relevant index subset) so that each distinct question
//! is asked of the planner once. Calls and cache hits are counted: they are the advisor's cost.
//!
//! Parameterised statements are planned as prepared statements: with values sampled from the
//! column statistics (a custom plan) where every parameter faces a column with statistics,
//! otherwise as PostgreSQL's generic plan. A fresh statement name per plan: a cached generic
//! plan would not see hypothetical indexes created after it.

use std::collections::{BTreeSet, HashMap};

use sqlx::{PgConnection, Row as _};

use super::model::{IndexDef, Table, TableName, quote_literal};
use super::plan::Plan;
use super::shape::{Comparison, StatementShape};

/// How a statement is planned.
#[derive(Debug, Clone, PartialEq)]
pub enum Planning {
    /// As written: it has no parameters.
    Literal,
    /// With these values for `$1`, `$2`, … (SQL literals), sampled from the column statistics.
    Sampled(Vec<String>),
    /// PostgreSQL's generic plan (some parameter faces no column with statistics).
    Generic,
}

impl Planning {
    /// How it reads in evidence.
    pub fn describe(&self) -> String {
        match self {
            Planning::Literal => "planned as written".to_owned(),
            Planning::Sampled(values) => format!(
                "planned with values sampled from the column statistics ({})",
                values
                    .iter()
                    .enumerate()
                    .map(|(i, v)| format!("${} = {v}", i + 1))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Planning::Generic => {
                "planned as a generic plan (no statistics for a parameter)".to_owned()
            }
        }
    }
}

/// Values for a statement's parameters from the statistics of the columns they face: for an
/// equality the most common value of median frequency, or a histogram bound (a typical value
/// rather than the most frequent); for ranges, histogram bounds (a pair on one column gets the
/// 45th and 55th percentiles, a lone bound the 90th). `None` when any parameter has no such column.
pub fn sample_values(shape: &StatementShape, tables: &[Table]) -> Option<Vec<String>> {
    if shape.param_count == 0 {
        return Some(Vec::new());
    }
    let mut ranges: HashMap<(&TableName, &str), Vec<u32>> = HashMap::new();
    for (number, used) in &shape.params {
        if used.comparison == Comparison::Range {
            ranges
                .entry((&used.table, used.column.as_str()))
                .or_default()
                .push(*number);
        }
    }
    let mut values = Vec::with_capacity(shape.param_count as usize);
    for number in 1..=shape.param_count {
        let used = shape.params.get(&number)?;
        let column = tables
            .iter()
            .find(|t| t.name == used.table)?
            .column(&used.column)?;
        let value = match used.comparison {
            Comparison::Range => {
                let bounds = &column.histogram_bounds;
                let mut peers = ranges
                    .get(&(&used.table, used.column.as_str()))
                    .cloned()
                    .unwrap_or_default();
                peers.sort_unstable();
                let quantile = match (peers.len(), peers.first()) {
                    (2, Some(first)) if *first == number => 0.45,
                    (2, _) => 0.55,
                    _ => 0.9,
                };
                pick(bounds, quantile).or_else(|| column.most_common_vals.first())?
            }
            Comparison::Equal | Comparison::Other => {
                if column.histogram_bounds.len() > 2 {
                    pick(&column.histogram_bounds, 0.5)?
                } else {
                    let mut by_freq: Vec<(usize, f64)> = column
                        .most_common_freqs
                        .iter()
                        .copied()
                        .enumerate()
                        .collect();
                    by_freq.sort_by(|a, b| a.1.total_cmp(&b.1));
                    let (at, _) = by_freq.get(by_freq.len() / 2)?;
                    column.most_common_vals.get(*at)?
                }
            }
        };
        values.push(quote_literal(value));
    }
    Some(values)
}

fn pick(bounds: &[String], quantile: f64) -> Option<&String> {
    if bounds.is_empty() {
        return None;
    }
    let at = ((bounds.len() - 1) as f64 * quantile).round() as usize;
    bounds.get(at.min(bounds.len() - 1))
}

/// A statement ready to be planned again and again.
#[derive(Debug, Clone)]
pub struct Planned {
    /// Its SQL (one statement).
    pub sql: String,
    /// How it is planned.
    pub planning: Planning,
    /// Its parameter count.
    pub param_count: u32,
    /// The tables it reads or writes: only indexes on these change its plan.
    pub tables: BTreeSet<TableName>,
}

/// Why a what-if question got no answer.
#[derive(Debug, thiserror::Error)]
pub enum WhatIfError {
    /// The statement cannot be planned (PostgreSQL's reason).
    #[error("{0}")]
    Unplannable(String),
    /// The analysis session failed (connection lost, HypoPG refused an index).
    #[error(transparent)]
    Session(#[from] sqlx::Error),
}

fn is_statement_error(error: &sqlx::Error) -> Option<String> {
    match error {
        sqlx::Error::Database(db) => Some(db.message().to_owned()),
        _ => None,
    }
}

/// The planner's cost assumptions a plan is asked under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Costing {
    /// The session's settings, as the statement will really be planned.
    Default,
    /// `effective_cache_size` = `shared_buffers`: heap pages an index scan fetches are assumed
    /// read from outside PostgreSQL's buffers. A gain that holds only under the default
    /// assumption (fetched pages cached) comes from index nested loops that run slower than
    /// the scans they replace (TPC-H q07, q13 and q21 at SF 1: planned up to 57% cheaper,
    /// measured 1.7 to 4 times slower).
    Cold,
}

/// The hypothetical indexes of one analysis session and the plans asked for so far.
#[derive(Debug, Default)]
pub struct WhatIf {
    /// Every index definition ever asked about; an index is its position here.
    defs: Vec<IndexDef>,
    ids: HashMap<IndexDef, usize>,
    /// Hypothetical indexes that exist in the session now: id → (oid, name).
    live: HashMap<usize, (i64, String)>,
    names: HashMap<String, usize>,
    cache: HashMap<(usize, Vec<usize>, Costing), Plan>,
    sizes: HashMap<usize, i64>,
    next_name: u64,
    /// Plans asked of PostgreSQL (cache misses).
    pub calls: u64,
    /// Plans answered from the cache.
    pub hits: u64,
}

impl WhatIf {
    /// The id of `def`, interned.
    pub fn id(&mut self, def: &IndexDef) -> usize {
        if let Some(id) = self.ids.get(def) {
            return *id;
        }
        let id = self.defs.len();
        self.defs.push(def.clone());
        self.ids.insert(def.clone(), id);
        id
    }

    /// The definition of index `id`.
    pub fn def(&self, id: usize) -> &IndexDef {
        &self.defs[id]
    }

    /// The index a plan names, if it is one of the session's hypothetical ones.
    pub fn by_name(&self, name: &str) -> Option<usize> {
        self.names.get(name).copied()
    }

    /// The plan of `statement` (number `key` in the caller's list) with exactly the indexes of
    /// `config` that are on its tables, hypothetically, besides the real ones.
    // Boxed: a `Send` future rustc can check here, not through every caller's generics.
    pub fn plan<'a>(
        &'a mut self,
        conn: &'a mut PgConnection,
        key: usize,
        statement: &'a Planned,
        config: &'a [usize],
    ) -> futures::future::BoxFuture<'a, Result<Plan, WhatIfError>> {
        Box::pin(self.plan_inner(conn, key, statement, config, Costing::Default))
    }

    /// [`WhatIf::plan`] under the [`Costing::Cold`] assumptions.
    pub fn plan_cold<'a>(
        &'a mut self,
        conn: &'a mut PgConnection,
        key: usize,
        statement: &'a Planned,
        config: &'a [usize],
    ) -> futures::future::BoxFuture<'a, Result<Plan, WhatIfError>> {
        Box::pin(self.plan_inner(conn, key, statement, config, Costing::Cold))
    }

    async fn plan_inner(
        &mut self,
        conn: &mut PgConnection,
        key: usize,
        statement: &Planned,
        config: &[usize],
        costing: Costing,
    ) -> Result<Plan, WhatIfError> {
        let mut relevant: Vec<usize> = config
            .iter()
            .copied()
            .filter(|id| statement.tables.contains(&self.defs[*id].table))
            .collect();
        relevant.sort_unstable();
        relevant.dedup();
        let cache_key = (key, relevant, costing);
        if let Some(plan) = self.cache.get(&cache_key) {
            self.hits += 1;
            return Ok(plan.clone());
        }
        self.arrange(conn, &statement.tables, &cache_key.1).await?;
        let plan = match costing {
            Costing::Default => self.explain(conn, statement).await,
            Costing::Cold => {
                sqlx::Executor::execute(
                    &mut *conn,
                    "/* keel-optimizer */ SELECT set_config('effective_cache_size', \
                     current_setting('shared_buffers'), false)",
                )
                .await?;
                let plan = self.explain(conn, statement).await;
                sqlx::Executor::execute(&mut *conn, "RESET effective_cache_size").await?;
                plan
            }
        }?;
        self.calls += 1;
        self.cache.insert(cache_key, plan.clone());
        Ok(plan)
    }

    /// Makes the hypothetical indexes on `tables` exactly `wanted`.
    async fn arrange(
        &mut self,
        conn: &mut PgConnection,
        tables: &BTreeSet<TableName>,
        wanted: &[usize],
    ) -> Result<(), sqlx::Error> {
        let extra: Vec<usize> = self
            .live
            .keys()
            .copied()
            .filter(|id| tables.contains(&self.defs[*id].table) && !wanted.contains(id))
            .collect();
        for id in extra {
            // Its name stays known: cached plans still mention it.
            if let Some((oid, _)) = self.live.remove(&id) {
                sqlx::query("/* keel-optimizer */ SELECT hypopg_drop_index($1::int8::oid)")
                    .bind(oid)
                    .execute(&mut *conn)
                    .await?;
            }
        }
        for id in wanted {
            if self.live.contains_key(id) {
                continue;
            }
            let row = sqlx::query(
                "/* keel-optimizer */ SELECT indexrelid::int8 AS oid, indexname::text AS name \
                 FROM hypopg_create_index($1)",
            )
            .bind(self.defs[*id].hypothetical_ddl())
            .fetch_one(&mut *conn)
            .await?;
            let (oid, name): (i64, String) = (row.try_get("oid")?, row.try_get("name")?);
            self.names.insert(name.clone(), *id);
            self.live.insert(*id, (oid, name));
        }
        Ok(())
    }

    async fn explain(
        &mut self,
        conn: &mut PgConnection,
        statement: &Planned,
    ) -> Result<Plan, WhatIfError> {
        let answer = match &statement.planning {
            Planning::Literal => {
                let script = format!(
                    "/* keel-optimizer */ EXPLAIN (FORMAT JSON) {}",
                    statement.sql
                );
                sqlx::Executor::fetch_all(&mut *conn, script.as_str()).await
            }
            Planning::Sampled(_) | Planning::Generic => {
                self.next_name += 1;
                let name = format!("keel_whatif_{}", self.next_name);
                let (mode, args) = match &statement.planning {
                    Planning::Sampled(values) => ("force_custom_plan", values.join(", ")),
                    _ => (
                        "force_generic_plan",
                        vec!["NULL"; statement.param_count as usize].join(", "),
                    ),
                };
                let script = format!(
                    "SET plan_cache_mode = {mode}; \
                     PREPARE {name} AS {sql}; \
                     /* keel-optimizer */ EXPLAIN (FORMAT JSON) EXECUTE {name}({args}); \
                     DEALLOCATE {name}; RESET plan_cache_mode",
                    sql = statement.sql
                );
                let answer = sqlx::Executor::fetch_all(&mut *conn, script.as_str()).await;
                if answer.is_err() {
                    // The prepared statement outlives the failed script; never leave it behind.
                    let cleanup = format!("DEALLOCATE {name}; RESET plan_cache_mode");
                    let _ = sqlx::Executor::execute(&mut *conn, cleanup.as_str()).await;
                }
                answer
            }
        };
        let rows = match answer {
            Ok(rows) => rows,
            Err(error) => {
                return Err(match is_statement_error(&error) {
                    Some(message) => WhatIfError::Unplannable(message),
                    None => WhatIfError::Session(error),
                });
            }
        };
        let explain: serde_json::Value = rows
            .first()
            .ok_or_else(|| WhatIfError::Unplannable("EXPLAIN returned no plan".to_owned()))?
            .try_get(0)?;
        Plan::from_json(&explain).ok_or_else(|| {
            WhatIfError::Unplannable("EXPLAIN returned an unreadable plan".to_owned())
        })
    }

    /// HypoPG's own size estimate of index `id` (made hypothetical for the question).
    pub async fn hypopg_size(
        &mut self,
        conn: &mut PgConnection,
        id: usize,
    ) -> Result<i64, sqlx::Error> {
        if let Some(size) = self.sizes.get(&id) {
            return Ok(*size);
        }
        if !self.live.contains_key(&id) {
            let table = self.defs[id].table.clone();
            let mut wanted: Vec<usize> = self
                .live
                .keys()
                .copied()
                .filter(|other| self.defs[*other].table == table)
                .collect();
            wanted.push(id);
            self.arrange(conn, &BTreeSet::from([table]), &wanted)
                .await?;
        }
        let Some((oid, _)) = self.live.get(&id) else {
            return Ok(0);
        };
        let size: i64 = sqlx::query_scalar(
            "/* keel-optimizer */ SELECT hypopg_relation_size($1::int8::oid)::int8",
        )
        .bind(*oid)
        .fetch_one(&mut *conn)
        .await?;
        self.sizes.insert(id, size);
        Ok(size)
    }

    /// Drops every hypothetical index of the session.
    pub async fn reset(&mut self, conn: &mut PgConnection) -> Result<(), sqlx::Error> {
        sqlx::query("/* keel-optimizer */ SELECT hypopg_reset()")
            .execute(&mut *conn)
            .await?;
        self.live.clear();
        Ok(())
    }
}
