//! The advisor: from a workload and a target's statistics to a set of indexes, costed with
//! HypoPG what-if plans, sized from the statistics, chosen for the whole workload.
//!
//! [`advise`] runs on one connection to the target database, read-only apart from HypoPG's
//! session-local hypothetical indexes: statements are only planned (`EXPLAIN` without
//! `ANALYZE`), never executed, and the session is `default_transaction_read_only`.

pub mod candidates;
pub mod catalog;
pub mod evidence;
pub mod model;
pub mod parse;
pub mod plan;
pub mod select;
pub mod shape;
pub mod size;
pub mod whatif;

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use sqlx::PgConnection;

use model::{IndexDef, TableName};
use plan::Plan;
use shape::StatementKind;
use whatif::{Planned, Planning, WhatIf, WhatIfError};

/// The mark that starts every statement the optimizer runs on a target.
pub const OWN_MARK: &str = "/* keel-optimizer */";

/// One statement of the workload.
#[derive(Debug, Clone, Default)]
pub struct WorkloadStatement {
    /// pg_stat_statements query id (or any id the caller gives).
    pub query_id: i64,
    /// Its text; `$n` parameters allowed.
    pub text: String,
    /// Executions in the window (the statement's weight).
    pub calls: f64,
    /// Execution time in the window, in seconds.
    pub total_seconds: f64,
    /// Rows returned or changed in the window.
    pub rows: f64,
}

/// What the advice may spend.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Most bytes the new indexes may take, estimated real size.
    pub budget_bytes: i64,
    /// Most new indexes.
    pub max_indexes: usize,
    /// Planner cost units one index entry costs to write (insert or non-HOT update); about one
    /// page write, amortised, plus the descent.
    pub write_cost_per_row: f64,
    /// The window's share of the time since the table counters were reset, when known: table
    /// writes the workload does not show (other clients' `COPY`, statements evicted from
    /// pg_stat_statements) are scaled by it.
    pub counters_share: Option<f64>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            budget_bytes: 1 << 30,
            max_indexes: 10,
            write_cost_per_row: 1.0,
            counters_share: None,
        }
    }
}

/// Why the advice could not be made.
#[derive(Debug, thiserror::Error)]
pub enum AdvisorError {
    /// HypoPG is not in the target database; the message gives the fix.
    #[error("{0}")]
    HypoPgMissing(String),
    /// The target failed (connection lost, a catalog query refused).
    #[error("target database: {0}")]
    Target(#[from] sqlx::Error),
}

/// How far an analysis is.
#[derive(Debug, Clone)]
pub struct Progress {
    /// The phase: `catalog`, `planning`, `selecting`, `evidence`.
    pub phase: &'static str,
    /// What just happened.
    pub message: String,
    /// What-if plans asked so far.
    pub whatif_calls: u64,
}

/// One statement's part in the advice.
#[derive(Debug, Clone)]
pub struct StatementReport {
    /// Its id.
    pub query_id: i64,
    /// Its text.
    pub text: String,
    /// Its weight.
    pub calls: f64,
    /// Its share of the workload's execution time.
    pub share_of_time: f64,
    /// How it was planned.
    pub planning: Option<Planning>,
    /// Its parameter count (`$n`).
    pub param_count: u32,
    /// Why it was not planned (or not advised on), if so.
    pub problem: Option<String>,
    /// Planner cost with no new index.
    pub cost_before: Option<f64>,
    /// Planner cost with the advised set.
    pub cost_after: Option<f64>,
    /// Plan shape with no new index.
    pub plan_before: String,
    /// Plan shape with the advised set.
    pub plan_after: String,
}

/// A statement one recommendation helps.
#[derive(Debug, Clone)]
pub struct Effect {
    /// The statement's id.
    pub query_id: i64,
    /// Its text.
    pub text: String,
    /// Planner cost before and after.
    pub cost_before: f64,
    /// Planner cost with the advised set.
    pub cost_after: f64,
    /// Plan shape before.
    pub plan_before: String,
    /// Plan shape after.
    pub plan_after: String,
    /// Its share of the workload's execution time.
    pub share_of_time: f64,
}

/// One index to build, with its evidence.
#[derive(Debug, Clone)]
pub struct Recommendation {
    /// The index.
    pub index: IndexDef,
    /// Estimated size in bytes (from the statistics; see [`size`]).
    pub estimated_bytes: i64,
    /// HypoPG's estimate, for comparison.
    pub hypopg_bytes: Option<i64>,
    /// Write overhead over the window, in planner cost units.
    pub write_cost: f64,
    /// Cut in the workload's weighted planner cost.
    pub benefit: f64,
    /// The statements it helps.
    pub effects: Vec<Effect>,
    /// Share of the workload's execution time those statements take.
    pub share_of_time: f64,
    /// Why, in plain words, from the facts above.
    pub explanation: String,
}

/// Why an existing index should go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DropReason {
    /// No scan since the statistics were reset.
    Unused,
    /// Another index (named) has the same keys, or these as its prefix.
    Redundant(String),
}

/// An existing index to drop, with its evidence.
#[derive(Debug, Clone)]
pub struct DropAdvice {
    /// The table.
    pub table: TableName,
    /// The index name.
    pub index: String,
    /// Its definition.
    pub ddl: String,
    /// Why.
    pub reason: DropReason,
    /// Its size in bytes.
    pub size_bytes: i64,
    /// What it costs writes over the window, in planner cost units.
    pub write_cost: f64,
    /// Plain-language explanation.
    pub explanation: String,
}

/// The advice for one workload.
#[derive(Debug, Clone)]
pub struct Advice {
    /// Indexes to build, best first.
    pub recommendations: Vec<Recommendation>,
    /// Indexes to drop.
    pub drops: Vec<DropAdvice>,
    /// Every statement of the workload, planned or not and why.
    pub statements: Vec<StatementReport>,
    /// The selection's steps.
    pub steps: Vec<String>,
    /// What-if plans asked of PostgreSQL.
    pub whatif_calls: u64,
    /// What-if plans answered from the cache.
    pub cache_hits: u64,
    /// How long the analysis took.
    pub elapsed: Duration,
    /// Total size of the user tables (heap), bytes.
    pub data_bytes: i64,
}

/// Whether HypoPG is usable in the database `conn` is connected to; the error names the fix.
pub async fn check_hypopg(conn: &mut PgConnection) -> Result<(), AdvisorError> {
    let (installed, available, database): (bool, bool, String) = sqlx::query_as(
        "/* keel-optimizer */ SELECT \
           EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'hypopg'), \
           EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'hypopg'), \
           current_database()::text",
    )
    .fetch_one(&mut *conn)
    .await?;
    if installed {
        return Ok(());
    }
    let major: String = sqlx::query_scalar(
        "/* keel-optimizer */ SELECT (current_setting('server_version_num')::int / 10000)::text",
    )
    .fetch_one(&mut *conn)
    .await?;
    Err(AdvisorError::HypoPgMissing(if available {
        format!(
            "the hypopg extension is not created in database {database}: run `CREATE EXTENSION hypopg;` \
             in it (as its owner or a superuser); the optimizer needs it for what-if plans"
        )
    } else {
        format!(
            "the hypopg extension is not installed on the server of database {database}: install \
             the package postgresql-{major}-hypopg (or build HypoPG from source), then run \
             `CREATE EXTENSION hypopg;` in the database"
        )
    }))
}

/// Advice for `workload` on the database `conn` is connected to.
pub async fn advise(
    conn: &mut PgConnection,
    workload: &[WorkloadStatement],
    settings: &Settings,
) -> Result<Advice, AdvisorError> {
    advise_with_progress(conn, workload, settings, &|_| {}).await
}

/// [`advise`], telling `progress` how far it is.
// Boxed: a `Send` future rustc can check here, not through every caller's generics.
pub fn advise_with_progress<'a>(
    conn: &'a mut PgConnection,
    workload: &'a [WorkloadStatement],
    settings: &'a Settings,
    progress: &'a (dyn Fn(Progress) + Send + Sync),
) -> BoxFuture<'a, Result<Advice, AdvisorError>> {
    Box::pin(advise_inner(conn, workload, settings, progress))
}

async fn advise_inner(
    conn: &mut PgConnection,
    workload: &[WorkloadStatement],
    settings: &Settings,
    progress: &(dyn Fn(Progress) + Send + Sync),
) -> Result<Advice, AdvisorError> {
    let started = Instant::now();
    check_hypopg(conn).await?;
    // Planning only: anything the workload's texts could do is refused by the session.
    sqlx::Executor::execute(&mut *conn, "SET default_transaction_read_only = on").await?;
    let result = run(conn, workload, settings, progress, started).await;
    // The connection may be reused (the apply path): leave nothing hypothetical behind.
    let _ = sqlx::Executor::execute(
        &mut *conn,
        "SELECT hypopg_reset(); RESET default_transaction_read_only",
    )
    .await;
    result
}

async fn run(
    conn: &mut PgConnection,
    workload: &[WorkloadStatement],
    settings: &Settings,
    progress: &(dyn Fn(Progress) + Send + Sync),
    started: Instant,
) -> Result<Advice, AdvisorError> {
    let tell = |phase: &'static str, message: String, whatif_calls: u64| {
        progress(Progress {
            phase,
            message,
            whatif_calls,
        })
    };
    let tables = catalog::read_tables(conn).await?;
    let data_bytes: i64 = tables.iter().map(|t| t.pages * 8192).sum();
    tell("catalog", format!("{} tables read", tables.len()), 0);

    let total_seconds: f64 = workload.iter().map(|s| s.total_seconds).sum();
    let share = |s: &WorkloadStatement| {
        if total_seconds > 0.0 {
            s.total_seconds / total_seconds
        } else {
            0.0
        }
    };
    let mut whatif = WhatIf::default();
    let mut reports: Vec<StatementReport> = Vec::new();
    let mut statements: Vec<select::Statement> = Vec::new();
    let mut statement_report: Vec<usize> = Vec::new();
    let mut shapes: Vec<shape::StatementShape> = Vec::new();
    let mut writes: HashMap<TableName, (f64, f64, Vec<select::Update>)> = HashMap::new();

    for (at, item) in workload.iter().enumerate() {
        let mut report = StatementReport {
            query_id: item.query_id,
            text: item.text.clone(),
            calls: item.calls,
            share_of_time: share(item),
            planning: None,
            param_count: 0,
            problem: None,
            cost_before: None,
            cost_after: None,
            plan_before: String::new(),
            plan_after: String::new(),
        };
        let shape = match parse::analyze(&item.text, &tables) {
            Ok(shape) => shape,
            Err(error) => {
                report.problem = Some(format!("not planned: the parser refused it: {error}"));
                reports.push(report);
                continue;
            }
        };
        if shape.kind == StatementKind::Other {
            report.problem = Some(
                "not planned: only SELECT, INSERT, UPDATE and DELETE statements are advised on"
                    .to_owned(),
            );
            reports.push(report);
            continue;
        }
        if let Some(table) = &shape.written {
            let entry = writes.entry(table.clone()).or_default();
            let rows = if item.rows > 0.0 {
                item.rows
            } else {
                item.calls
            };
            match shape.kind {
                StatementKind::Insert => entry.0 += rows,
                StatementKind::Delete => entry.1 += rows,
                StatementKind::Update => entry.2.push(select::Update {
                    table: table.clone(),
                    columns: shape.updated_columns.clone(),
                    rows,
                }),
                _ => {}
            }
        }
        let planning = if shape.param_count == 0 {
            Planning::Literal
        } else {
            match whatif::sample_values(&shape, &tables) {
                Some(values) => Planning::Sampled(values),
                None => Planning::Generic,
            }
        };
        let mut planned = Planned {
            sql: item.text.clone(),
            planning,
            param_count: shape.param_count,
            tables: shape
                .tables
                .iter()
                .filter_map(|t| t.table.clone())
                .collect(),
        };
        let key = statements.len();
        let mut base = whatif.plan(conn, key, &planned, &[]).await;
        if matches!(base, Err(WhatIfError::Unplannable(_)))
            && matches!(planned.planning, Planning::Sampled(_))
        {
            // Sampled values that do not fit the parameter's type (an array for `= ANY($1)`):
            // the generic plan needs none.
            planned.planning = Planning::Generic;
            base = whatif.plan(conn, key, &planned, &[]).await;
        }
        let base = match base {
            Ok(plan) => plan,
            Err(WhatIfError::Unplannable(reason)) => {
                report.problem = Some(format!("not planned: PostgreSQL refused it: {reason}"));
                reports.push(report);
                continue;
            }
            Err(WhatIfError::Session(error)) => return Err(error.into()),
        };
        report.planning = Some(planned.planning.clone());
        report.param_count = planned.param_count;
        report.cost_before = Some(base.cost);
        let mut options = HashMap::new();
        let mut covering = HashMap::new();
        for used in &shape.tables {
            if let Some(table) = &used.table {
                options.insert(table.clone(), candidates::column_options(&shape, table));
                if !used.all_columns && !used.referenced.is_empty() {
                    covering.insert(table.clone(), used.referenced.clone());
                }
            }
        }
        statements.push(select::Statement {
            planned,
            weight: item.calls.max(1.0),
            base,
            options,
            covering,
        });
        statement_report.push(reports.len());
        reports.push(report);
        shapes.push(shape);
        let _ = at;
    }
    if let Some(share) = settings.counters_share {
        for table in &tables {
            let entry = writes.entry(table.name.clone()).or_default();
            entry.0 = entry.0.max(table.writes.inserted * share);
            entry.1 = entry.1.max(table.writes.deleted * share);
        }
    }
    tell(
        "planning",
        format!(
            "{} of {} statements planned",
            statements.len(),
            workload.len()
        ),
        whatif.calls,
    );

    let mut pool: BTreeSet<IndexDef> = BTreeSet::new();
    for shape in &shapes {
        pool.extend(candidates::for_statement(shape, &tables));
    }
    let candidate_ids: Vec<usize> = pool.iter().map(|d| whatif.id(d)).collect();

    tell(
        "selecting",
        format!("{} candidate indexes", candidate_ids.len()),
        whatif.calls,
    );

    let limits = select::Limits {
        budget_bytes: settings.budget_bytes,
        max_indexes: settings.max_indexes,
        write_cost_per_row: settings.write_cost_per_row,
    };
    let step = |message: &str, calls: u64| tell("selecting", message.to_owned(), calls);
    let selection =
        select::Selector::new(&mut whatif, &statements, &tables, writes.clone(), limits)
            .run(conn, &candidate_ids, &step)
            .await?;

    tell("evidence", "writing the evidence".to_owned(), whatif.calls);
    let recommendations = evidence::recommendations(
        conn,
        &mut whatif,
        &statements,
        &selection,
        &reports,
        &statement_report,
    )
    .await?;
    for (at, plan) in selection.plans.iter().enumerate() {
        let report = &mut reports[statement_report[at]];
        report.cost_after = Some(plan.cost);
        let names = |name: &str| whatif.by_name(name).map(|id| whatif.def(id).label());
        report.plan_before = statements[at].base.shape(&names);
        report.plan_after = plan.shape(&names);
    }
    let drops = evidence::drops(&tables, &writes, settings.write_cost_per_row);

    Ok(Advice {
        recommendations,
        drops,
        statements: reports,
        steps: selection.steps,
        whatif_calls: whatif.calls,
        cache_hits: whatif.hits,
        elapsed: started.elapsed(),
        data_bytes,
    })
}

/// Plan of one statement, for `ExplainStatement`: with no new index and with `indexes`.
pub fn explain<'a>(
    conn: &'a mut PgConnection,
    text: &'a str,
    indexes: &'a [IndexDef],
) -> BoxFuture<'a, Result<Explained, AdvisorError>> {
    Box::pin(explain_inner(conn, text, indexes))
}

/// How a statement was planned, and its plans with no new index and with the given ones (or
/// why it could not be planned).
pub type Explained = (Option<Planning>, Result<(Plan, Plan), String>);

async fn explain_inner(
    conn: &mut PgConnection,
    text: &str,
    indexes: &[IndexDef],
) -> Result<Explained, AdvisorError> {
    check_hypopg(conn).await?;
    sqlx::Executor::execute(&mut *conn, "SET default_transaction_read_only = on").await?;
    let tables = catalog::read_tables(conn).await?;
    let outcome = async {
        let shape = match parse::analyze(text, &tables) {
            Ok(shape) => shape,
            Err(error) => return Ok((None, Err(format!("the parser refused it: {error}")))),
        };
        let planning = if shape.param_count == 0 {
            Planning::Literal
        } else {
            whatif::sample_values(&shape, &tables).map_or(Planning::Generic, Planning::Sampled)
        };
        let planned = Planned {
            sql: text.to_owned(),
            planning: planning.clone(),
            param_count: shape.param_count,
            tables: shape
                .tables
                .iter()
                .filter_map(|t| t.table.clone())
                .collect(),
        };
        let mut whatif = WhatIf::default();
        let ids: Vec<usize> = indexes.iter().map(|d| whatif.id(d)).collect();
        let before = whatif.plan(conn, 0, &planned, &[]).await;
        let after = whatif.plan(conn, 0, &planned, &ids).await;
        Ok::<_, AdvisorError>(match (before, after) {
            (Ok(before), Ok(after)) => (Some(planning), Ok((before, after))),
            (Err(WhatIfError::Session(e)), _) | (_, Err(WhatIfError::Session(e))) => {
                return Err(e.into());
            }
            (Err(e), _) | (_, Err(e)) => (Some(planning), Err(e.to_string())),
        })
    }
    .await;
    let _ = sqlx::Executor::execute(
        &mut *conn,
        "SELECT hypopg_reset(); RESET default_transaction_read_only",
    )
    .await;
    outcome
}
