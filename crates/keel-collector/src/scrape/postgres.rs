//! One scrape of a PostgreSQL instance (one database of a server).
//!
//! Every query runs on the target's one connection under the session limits the connector set
//! (statement, lock and idle-in-transaction timeouts). Server-wide views are filtered to the
//! instance's database. A part that fails (a missing extension, a missing privilege) becomes a
//! problem with its fix and the rest is still collected; only a broken connection ends the scrape.
//!
//! Every statement starts with [`OWN_MARK`]: pg_stat_statements keeps the comment in its text,
//! so the collector's own statements can be left out of the workload it reports.

use std::collections::{HashMap, HashSet};

use sqlx::{PgConnection, Row as _};

use crate::catalog::{self as c, Sample};
use crate::statements::{Counters, Snapshot, StatementKey};

/// The comment that starts every statement the collector runs on a target.
pub(crate) const OWN_MARK: &str = "/* keel-collector */";

/// Limits on what one scrape reads.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PgLimits {
    /// Largest tables reported one by one.
    pub(crate) tables: i64,
    /// Largest indexes reported one by one.
    pub(crate) indexes: i64,
}

/// What a PostgreSQL scrape read.
#[derive(Debug, Default)]
pub(crate) struct PgScrape {
    pub(crate) samples: Vec<Sample>,
    /// pg_stat_statements counters; `None` when the view cannot be read.
    pub(crate) statements: Option<Snapshot>,
    /// Texts of query ids not in the caller's known set.
    pub(crate) texts: Vec<(i64, String)>,
    /// The ids whose texts were asked for (some may not have come).
    pub(crate) texts_asked: Vec<i64>,
    pub(crate) problems: Vec<String>,
}

/// Whether an error means the connection is unusable (the scrape ends) rather than one query
/// being refused (the scrape goes on).
fn is_connection_error(error: &sqlx::Error) -> bool {
    !matches!(
        error,
        sqlx::Error::Database(_) | sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_)
    )
}

/// Runs one part of the scrape: a refused query becomes a problem, a broken connection an error.
macro_rules! part {
    ($out:expr, $what:literal, $body:expr) => {
        match $body {
            Ok(value) => Some(value),
            Err(error) if is_connection_error(&error) => return Err(error),
            Err(error) => {
                $out.problems
                    .push(format!("cannot read {}: {}", $what, describe(&error)));
                None
            }
        }
    };
}

fn describe(error: &sqlx::Error) -> String {
    match error {
        sqlx::Error::Database(db) => db.message().to_owned(),
        other => other.to_string(),
    }
}

/// Scrapes the database `conn` is connected to. `known_texts` are the query ids whose text the
/// collector holds (or asked for recently); only the others' texts are read.
pub(crate) async fn scrape(
    conn: &mut PgConnection,
    known_texts: &HashSet<i64>,
    limits: PgLimits,
) -> Result<PgScrape, sqlx::Error> {
    let mut out = PgScrape::default();

    let facts = sqlx::query(
        "/* keel-collector */ SELECT current_database() AS db, current_user AS role, \
                current_setting('max_connections')::int8 AS max_connections, \
                pg_is_in_recovery() AS in_recovery, \
                (pg_has_role(current_user, 'pg_read_all_stats', 'MEMBER') \
                   OR (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)) AS reads_all_stats, \
                (SELECT extversion FROM pg_extension WHERE extname = 'pg_stat_statements') AS pgss",
    )
    .fetch_one(&mut *conn)
    .await?;
    let database: String = facts.try_get("db")?;
    let role: String = facts.try_get("role")?;
    let max_connections: i64 = facts.try_get("max_connections")?;
    let in_recovery: bool = facts.try_get("in_recovery")?;
    let reads_all_stats: bool = facts
        .try_get::<Option<bool>, _>("reads_all_stats")?
        .unwrap_or(false);
    let pgss: Option<String> = facts.try_get("pgss")?;
    out.samples
        .push(Sample::new(c::PG_MAX_CONNECTIONS, max_connections as f64));
    out.samples.push(Sample::new(
        c::PG_IN_RECOVERY,
        f64::from(u8::from(in_recovery)),
    ));
    if !reads_all_stats {
        out.problems.push(format!(
            "role {role} lacks pg_monitor: other roles' sessions and statements are hidden \
             (their text reads <insufficient privilege>); fix: GRANT pg_monitor TO {role};"
        ));
    }

    activity(conn, &mut out, max_connections).await?;
    database_stats(conn, &mut out).await?;
    replication(conn, &mut out, in_recovery).await?;
    tables(conn, &mut out, limits).await?;
    indexes(conn, &mut out, limits).await?;
    match pgss {
        None => out.problems.push(format!(
            "pg_stat_statements is not installed in database {database}, so there are no query \
             statistics; fix: add pg_stat_statements to shared_preload_libraries and restart the \
             server, then run CREATE EXTENSION pg_stat_statements; in database {database}"
        )),
        Some(_) => statements(conn, &mut out, known_texts, &database).await?,
    }
    Ok(out)
}

async fn activity(
    conn: &mut PgConnection,
    out: &mut PgScrape,
    max_connections: i64,
) -> Result<(), sqlx::Error> {
    let rows = part!(
        out,
        "pg_stat_activity",
        sqlx::query(
            "/* keel-collector */ SELECT coalesce(state, 'unknown') AS state, count(*)::int8 AS sessions, \
                    coalesce(max(extract(epoch FROM now() - query_start)) \
                      FILTER (WHERE state = 'active'), 0)::float8 AS longest_query, \
                    coalesce(max(extract(epoch FROM now() - state_change)) \
                      FILTER (WHERE state LIKE 'idle in transaction%'), 0)::float8 AS oldest_idle_tx, \
                    count(*) FILTER (WHERE wait_event_type = 'Lock')::int8 AS waiting \
             FROM pg_stat_activity \
             WHERE datname = current_database() AND backend_type = 'client backend' \
               AND pid <> pg_backend_pid() \
             GROUP BY 1",
        )
        .fetch_all(&mut *conn)
        .await
    );
    if let Some(rows) = rows {
        let (mut longest, mut oldest_idle, mut waiting) = (0.0f64, 0.0f64, 0i64);
        let mut by_state: HashMap<&'static str, i64> =
            ["active", "idle", "idle in transaction", "other"]
                .into_iter()
                .map(|s| (s, 0))
                .collect();
        for row in rows {
            let state: String = row.try_get("state")?;
            let state = match state.as_str() {
                "active" => "active",
                "idle" => "idle",
                "idle in transaction" | "idle in transaction (aborted)" => "idle in transaction",
                _ => "other",
            };
            *by_state.entry(state).or_default() += row.try_get::<i64, _>("sessions")?;
            longest = longest.max(row.try_get("longest_query")?);
            oldest_idle = oldest_idle.max(row.try_get("oldest_idle_tx")?);
            waiting += row.try_get::<i64, _>("waiting")?;
        }
        let mut states: Vec<_> = by_state.into_iter().collect();
        states.sort();
        for (state, n) in states {
            out.samples.push(Sample::labelled(
                c::PG_CONNECTIONS,
                &[("state", state)],
                n as f64,
            ));
        }
        out.samples.push(Sample::new(c::PG_LONGEST_QUERY, longest));
        out.samples
            .push(Sample::new(c::PG_OLDEST_IDLE_TX, oldest_idle));
        out.samples.push(Sample::new(c::PG_WAITING, waiting as f64));
    }

    let server = part!(
        out,
        "server sessions",
        sqlx::query_scalar::<_, i64>(
            "/* keel-collector */ SELECT count(*)::int8 FROM pg_stat_activity WHERE backend_type = 'client backend'"
        )
        .fetch_one(&mut *conn)
        .await
    );
    if let Some(server) = server {
        out.samples
            .push(Sample::new(c::PG_SERVER_CONNECTIONS, server as f64));
        if max_connections > 0 {
            out.samples.push(Sample::new(
                c::PG_CONNECTIONS_RATIO,
                server as f64 / max_connections as f64,
            ));
        }
    }

    // pg_blocking_pids takes the lock manager's locks: ask only for sessions waiting on a lock.
    let locks = part!(
        out,
        "lock waits",
        sqlx::query(
            "/* keel-collector */ SELECT count(DISTINCT a.pid)::int8 AS blocked, count(DISTINCT b.pid)::int8 AS blocking \
             FROM pg_stat_activity a CROSS JOIN LATERAL unnest(pg_blocking_pids(a.pid)) AS b(pid) \
             WHERE a.datname = current_database() AND a.wait_event_type = 'Lock'",
        )
        .fetch_one(&mut *conn)
        .await
    );
    if let Some(row) = locks {
        let blocked: i64 = row.try_get("blocked")?;
        out.samples.push(Sample::new(c::PG_BLOCKED, blocked as f64));
        out.samples.push(Sample::new(
            c::PG_BLOCKING,
            row.try_get::<i64, _>("blocking")? as f64,
        ));
        if blocked > 0 {
            lock_chains(conn, out).await?;
        }
    }
    Ok(())
}

/// Who blocks whom, longest waits first (at most 20): what an operator or a runbook acts on.
async fn lock_chains(conn: &mut PgConnection, out: &mut PgScrape) -> Result<(), sqlx::Error> {
    let rows = part!(
        out,
        "lock chains",
        sqlx::query(
            "/* keel-collector */ SELECT a.pid, array_to_string(pg_blocking_pids(a.pid), ',') AS blockers, \
                    coalesce(extract(epoch FROM now() - a.state_change), 0)::float8 AS waiting \
             FROM pg_stat_activity a \
             WHERE a.datname = current_database() AND a.wait_event_type = 'Lock' \
               AND cardinality(pg_blocking_pids(a.pid)) > 0 \
             ORDER BY a.state_change LIMIT 20",
        )
        .fetch_all(&mut *conn)
        .await
    );
    for row in rows.into_iter().flatten() {
        let pid: i32 = row.try_get("pid")?;
        let blockers: String = row.try_get("blockers")?;
        out.samples.push(Sample::labelled(
            c::PG_LOCK_WAIT,
            &[("pid", &pid.to_string()), ("blocked_by", &blockers)],
            row.try_get("waiting")?,
        ));
    }
    Ok(())
}

async fn database_stats(conn: &mut PgConnection, out: &mut PgScrape) -> Result<(), sqlx::Error> {
    let row = part!(
        out,
        "pg_stat_database",
        sqlx::query(
            "/* keel-collector */ SELECT xact_commit, xact_rollback, blks_hit, blks_read, deadlocks, temp_bytes, \
                    pg_database_size(datid) AS size \
             FROM pg_stat_database WHERE datname = current_database()",
        )
        .fetch_one(&mut *conn)
        .await
    );
    if let Some(row) = row {
        for (name, column) in [
            (c::PG_COMMITS, "xact_commit"),
            (c::PG_ROLLBACKS, "xact_rollback"),
            (c::PG_BLKS_HIT, "blks_hit"),
            (c::PG_BLKS_READ, "blks_read"),
            (c::PG_DEADLOCKS, "deadlocks"),
            (c::PG_TEMP_BYTES, "temp_bytes"),
            (c::PG_DATABASE_SIZE, "size"),
        ] {
            out.samples
                .push(Sample::new(name, row.try_get::<i64, _>(column)? as f64));
        }
    }
    Ok(())
}

async fn replication(
    conn: &mut PgConnection,
    out: &mut PgScrape,
    in_recovery: bool,
) -> Result<(), sqlx::Error> {
    if in_recovery {
        let lag = part!(
            out,
            "replay lag",
            sqlx::query_scalar::<_, Option<f64>>(
                "/* keel-collector */ SELECT extract(epoch FROM now() - pg_last_xact_replay_timestamp())::float8"
            )
            .fetch_one(&mut *conn)
            .await
        );
        if let Some(Some(lag)) = lag {
            out.samples
                .push(Sample::new(c::PG_REPLICATION_LAG, lag.max(0.0)));
        }
    } else {
        let row = part!(
            out,
            "pg_stat_replication",
            sqlx::query(
                "/* keel-collector */ SELECT count(*)::int8 AS replicas, \
                        coalesce(max(extract(epoch FROM replay_lag)), 0)::float8 AS lag \
                 FROM pg_stat_replication",
            )
            .fetch_one(&mut *conn)
            .await
        );
        if let Some(row) = row {
            out.samples.push(Sample::new(
                c::PG_REPLICAS,
                row.try_get::<i64, _>("replicas")? as f64,
            ));
            out.samples
                .push(Sample::new(c::PG_REPLICATION_LAG, row.try_get("lag")?));
        }
    }
    Ok(())
}

async fn tables(
    conn: &mut PgConnection,
    out: &mut PgScrape,
    limits: PgLimits,
) -> Result<(), sqlx::Error> {
    let rows = part!(
        out,
        "pg_stat_user_tables",
        sqlx::query(
            // Sizes from pg_class, never pg_table_size() and friends: those take a lock on the
            // table and would wait behind any ACCESS EXCLUSIVE lock (an ALTER, a VACUUM FULL).
            "/* keel-collector */ SELECT s.schemaname || '.' || s.relname AS name, s.seq_scan, coalesce(s.idx_scan, 0) AS idx_scan, \
                    s.n_live_tup, s.n_dead_tup, s.n_tup_ins, s.n_tup_upd, s.n_tup_del, \
                    extract(epoch FROM now() - greatest(s.last_vacuum, s.last_autovacuum))::float8 AS vacuum_age, \
                    extract(epoch FROM now() - greatest(s.last_analyze, s.last_autoanalyze))::float8 AS analyze_age, \
                    c.relpages::int8 * current_setting('block_size')::int8 AS size \
             FROM pg_stat_user_tables s JOIN pg_class c ON c.oid = s.relid \
             ORDER BY c.relpages DESC, s.relid LIMIT $1",
        )
        .bind(limits.tables)
        .fetch_all(&mut *conn)
        .await
    );
    let Some(rows) = rows else { return Ok(()) };
    let mut worst_dead = 0.0f64;
    for row in rows {
        let name: String = row.try_get("name")?;
        let live: i64 = row.try_get("n_live_tup")?;
        let dead: i64 = row.try_get("n_dead_tup")?;
        if live + dead >= 10_000 {
            worst_dead = worst_dead.max(dead as f64 / (live + dead) as f64);
        }
        let t = [("table", name.as_str())];
        out.samples.push(Sample::labelled(
            c::PG_TABLE_SEQ_SCANS,
            &t,
            row.try_get::<i64, _>("seq_scan")? as f64,
        ));
        out.samples.push(Sample::labelled(
            c::PG_TABLE_IDX_SCANS,
            &t,
            row.try_get::<i64, _>("idx_scan")? as f64,
        ));
        out.samples
            .push(Sample::labelled(c::PG_TABLE_LIVE, &t, live as f64));
        out.samples
            .push(Sample::labelled(c::PG_TABLE_DEAD, &t, dead as f64));
        out.samples.push(Sample::labelled(
            c::PG_TABLE_SIZE,
            &t,
            row.try_get::<i64, _>("size")? as f64,
        ));
        for (op, column) in [
            ("insert", "n_tup_ins"),
            ("update", "n_tup_upd"),
            ("delete", "n_tup_del"),
        ] {
            out.samples.push(Sample::labelled(
                c::PG_TABLE_WRITES,
                &[("table", name.as_str()), ("operation", op)],
                row.try_get::<i64, _>(column)? as f64,
            ));
        }
        if let Some(age) = row.try_get::<Option<f64>, _>("vacuum_age")? {
            out.samples
                .push(Sample::labelled(c::PG_TABLE_VACUUM_AGE, &t, age));
        }
        if let Some(age) = row.try_get::<Option<f64>, _>("analyze_age")? {
            out.samples
                .push(Sample::labelled(c::PG_TABLE_ANALYZE_AGE, &t, age));
        }
    }
    out.samples
        .push(Sample::new(c::PG_DEAD_TUPLE_RATIO_MAX, worst_dead));
    Ok(())
}

async fn indexes(
    conn: &mut PgConnection,
    out: &mut PgScrape,
    limits: PgLimits,
) -> Result<(), sqlx::Error> {
    let rows = part!(
        out,
        "pg_stat_user_indexes",
        sqlx::query(
            "/* keel-collector */ SELECT s.schemaname || '.' || s.relname AS table_name, s.indexrelname AS index_name, s.idx_scan, \
                    c.relpages::int8 * current_setting('block_size')::int8 AS size \
             FROM pg_stat_user_indexes s JOIN pg_class c ON c.oid = s.indexrelid \
             ORDER BY c.relpages DESC, s.indexrelid LIMIT $1",
        )
        .bind(limits.indexes)
        .fetch_all(&mut *conn)
        .await
    );
    for row in rows.into_iter().flatten() {
        let table: String = row.try_get("table_name")?;
        let index: String = row.try_get("index_name")?;
        let l = [("table", table.as_str()), ("index", index.as_str())];
        out.samples.push(Sample::labelled(
            c::PG_INDEX_SCANS,
            &l,
            row.try_get::<i64, _>("idx_scan")? as f64,
        ));
        out.samples.push(Sample::labelled(
            c::PG_INDEX_SIZE,
            &l,
            row.try_get::<i64, _>("size")? as f64,
        ));
    }
    Ok(())
}

async fn statements(
    conn: &mut PgConnection,
    out: &mut PgScrape,
    known_texts: &HashSet<i64>,
    database: &str,
) -> Result<(), sqlx::Error> {
    // Without text: the text file is what makes this view expensive to read (see the notes).
    let rows = part!(
        out,
        "pg_stat_statements",
        sqlx::query(
            "/* keel-collector */ SELECT userid::int8 AS userid, queryid, toplevel, calls, total_exec_time, rows, \
                    shared_blks_hit, shared_blks_read, temp_blks_written, wal_bytes::int8 AS wal_bytes \
             FROM pg_stat_statements(false) \
             WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) \
               AND queryid IS NOT NULL",
        )
        .fetch_all(&mut *conn)
        .await
    );
    let Some(rows) = rows else {
        // "must be loaded via shared_preload_libraries": installed, but not loaded.
        if let Some(last) = out.problems.last_mut()
            && last.contains("shared_preload_libraries")
        {
            last.push_str(&format!(
                "; fix: add pg_stat_statements to shared_preload_libraries and restart the server of database {database}"
            ));
        }
        return Ok(());
    };
    let info = part!(
        out,
        "pg_stat_statements_info",
        sqlx::query(
            "/* keel-collector */ SELECT dealloc, stats_reset FROM pg_stat_statements_info"
        )
        .fetch_one(&mut *conn)
        .await
    );
    let mut snapshot = Snapshot::default();
    if let Some(info) = info {
        snapshot.dealloc = info.try_get("dealloc")?;
        snapshot.stats_reset = info.try_get("stats_reset")?;
    }
    snapshot.entries.reserve(rows.len());
    let mut unknown = Vec::new();
    for row in rows {
        let query_id: i64 = row.try_get("queryid")?;
        let key = StatementKey {
            user_id: u32::try_from(row.try_get::<i64, _>("userid")?).unwrap_or(u32::MAX),
            query_id,
            toplevel: row.try_get("toplevel")?,
        };
        let counters = Counters {
            calls: row.try_get("calls")?,
            total_exec_ms: row.try_get("total_exec_time")?,
            rows: row.try_get("rows")?,
            shared_blks_hit: row.try_get("shared_blks_hit")?,
            shared_blks_read: row.try_get("shared_blks_read")?,
            temp_blks_written: row.try_get("temp_blks_written")?,
            wal_bytes: row.try_get("wal_bytes")?,
        };
        if !known_texts.contains(&query_id) {
            unknown.push(query_id);
        }
        // Two roles running one statement are two entries; keep them apart.
        snapshot.entries.insert(key, counters);
    }
    unknown.sort_unstable();
    unknown.dedup();
    out.samples
        .push(Sample::new(c::PG_STATEMENTS, snapshot.entries.len() as f64));
    if !unknown.is_empty() {
        // The text of new statements only: reading text means reading the whole text file,
        // which is worth it only when something new appeared.
        let texts = part!(
            out,
            "pg_stat_statements query texts",
            sqlx::query(
                "/* keel-collector */ SELECT DISTINCT ON (queryid) queryid, query FROM pg_stat_statements(true) \
                 WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) \
                   AND queryid = ANY($1) AND query IS NOT NULL",
            )
            .bind(&unknown)
            .fetch_all(&mut *conn)
            .await
        );
        out.texts_asked = unknown.clone();
        for row in texts.into_iter().flatten() {
            out.texts
                .push((row.try_get("queryid")?, row.try_get("query")?));
        }
    }
    out.statements = Some(snapshot);
    Ok(())
}
