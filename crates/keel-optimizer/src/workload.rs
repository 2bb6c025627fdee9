//! Where an analysis's workload comes from: the collector's top queries over the window (the
//! deltas it scraped), or, where the collector has no history of the instance yet (or is not
//! deployed), pg_stat_statements read directly, which counts since its last reset.

use keel_fleet::FleetChannel;
use keel_proto::v1::ListTopQueriesRequest;
use keel_proto::v1::collector_service_client::CollectorServiceClient;
use sqlx::{PgConnection, Row as _};
use uuid::Uuid;

use crate::advisor::WorkloadStatement;

/// A workload and what the reader noticed about it.
#[derive(Debug, Default)]
pub(crate) struct Workload {
    pub(crate) statements: Vec<WorkloadStatement>,
    pub(crate) source: String,
    pub(crate) problems: Vec<String>,
}

/// The collector's top statements of `instance`, or `None` when it has none to give.
pub(crate) async fn from_collector(
    collector: &CollectorServiceClient<FleetChannel>,
    instance: Uuid,
    window_seconds: i32,
    limit: i32,
) -> Option<Workload> {
    let mut client = collector.clone();
    let answer = client
        .list_top_queries(ListTopQueriesRequest {
            instance_id: instance.to_string(),
            window: Some(prost_types::Duration {
                seconds: i64::from(window_seconds),
                nanos: 0,
            }),
            limit,
        })
        .await;
    let answer = match answer {
        Ok(answer) => answer.into_inner(),
        Err(status) => {
            tracing::info!(code = ?status.code(), %instance, "no workload from the collector; reading pg_stat_statements");
            return None;
        }
    };
    let mut workload = Workload {
        source: "collector".to_owned(),
        problems: answer.problems,
        ..Workload::default()
    };
    for query in answer.queries {
        if query.text.is_empty() {
            workload.problems.push(format!(
                "statement {} has no text (hidden from the collector's role): not advised on",
                query.query_id
            ));
            continue;
        }
        workload.statements.push(WorkloadStatement {
            query_id: query.query_id,
            text: query.text,
            calls: query.calls as f64,
            total_seconds: query.total_exec_seconds,
            rows: query.rows as f64,
        });
    }
    (!workload.statements.is_empty()).then_some(workload)
}

/// The database's top statements from pg_stat_statements, by total time since its reset.
pub(crate) async fn from_pg_stat_statements(
    conn: &mut PgConnection,
    limit: i32,
) -> Result<Workload, sqlx::Error> {
    let mut workload = Workload {
        source: "pg_stat_statements".to_owned(),
        ..Workload::default()
    };
    let rows = sqlx::query(
        "/* keel-optimizer */ SELECT s.queryid::int8 AS queryid, s.query, s.calls::float8 AS calls, \
                (s.total_exec_time / 1000)::float8 AS seconds, s.rows::float8 AS rows \
         FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid \
         WHERE d.datname = current_database() AND s.toplevel \
           AND s.query NOT LIKE '/* keel-%' \
         ORDER BY s.total_exec_time DESC LIMIT $1",
    )
    .bind(i64::from(limit))
    .fetch_all(&mut *conn)
    .await;
    let rows = match rows {
        Ok(rows) => rows,
        Err(sqlx::Error::Database(db)) => {
            workload.problems.push(format!(
                "cannot read pg_stat_statements ({}): add pg_stat_statements to \
                 shared_preload_libraries, restart, and run `CREATE EXTENSION pg_stat_statements;`",
                db.message()
            ));
            return Ok(workload);
        }
        Err(other) => return Err(other),
    };
    let mut hidden = 0;
    for row in rows {
        let text: Option<String> = row.try_get("query")?;
        let Some(text) = text.filter(|t| t != "<insufficient privilege>") else {
            hidden += 1;
            continue;
        };
        workload.statements.push(WorkloadStatement {
            query_id: row.try_get::<Option<i64>, _>("queryid")?.unwrap_or(0),
            text,
            calls: row.try_get("calls")?,
            total_seconds: row.try_get("seconds")?,
            rows: row.try_get("rows")?,
        });
    }
    if hidden > 0 {
        workload.problems.push(format!(
            "{hidden} statements of other roles are hidden: run `GRANT pg_read_all_stats TO <role>;`"
        ));
    }
    Ok(workload)
}
