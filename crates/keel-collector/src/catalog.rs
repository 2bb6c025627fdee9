//! Every metric the collector emits: its name, type and help. A scrape can only produce
//! names listed here, so `/metrics` has a fixed set of families whatever the targets hold.

use serde::{Deserialize, Serialize};

/// How a metric behaves over time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up (until the target resets it); exposed with `_total`.
    Counter,
    /// Any value.
    Gauge,
}

/// One metric family.
#[derive(Debug)]
pub struct Family {
    /// The name, without `_total` for counters.
    pub name: &'static str,
    /// Counter or gauge.
    pub kind: Kind,
    /// What it measures, in base units.
    pub help: &'static str,
    /// Kept in the history (instance-level metrics); the others are kept as latest only.
    pub history: bool,
}

impl Family {
    /// Whether `/metrics` shows it: not the families whose labels are raw session ids, which
    /// the API returns and Prometheus must not index.
    pub fn exposed(&self) -> bool {
        !API_ONLY.contains(&self.name)
    }
}

/// Families served by the API only.
const API_ONLY: &[&str] = &[PG_LOCK_WAIT];

macro_rules! families {
    ($( $ident:ident = $name:literal, $kind:ident, $history:literal, $help:literal; )*) => {
        $(
            #[doc = $help]
            pub const $ident: &str = $name;
        )*
        /// Every family, in exposition order.
        pub static FAMILIES: &[Family] = &[
            $( Family { name: $name, kind: Kind::$kind, help: $help, history: $history }, )*
        ];
    };
}

families! {
    UP = "keel_target_up", Gauge, true, "Whether the collector's last scrape reached the target (1) or not (0)";
    SCRAPE_DURATION = "keel_target_scrape_duration_seconds", Gauge, true, "How long the collector's last scrape of the target took";
    SERIES_DROPPED = "keel_target_series_dropped", Gauge, false, "Series of the target left out of this exposition by the per-target series budget";

    PG_CONNECTIONS = "keel_pg_connections", Gauge, true, "Client sessions on the instance's database, by state";
    PG_SERVER_CONNECTIONS = "keel_pg_server_connections", Gauge, true, "Client sessions on the whole server";
    PG_MAX_CONNECTIONS = "keel_pg_max_connections", Gauge, false, "The server's max_connections";
    PG_CONNECTIONS_RATIO = "keel_pg_server_connections_ratio", Gauge, true, "Client sessions on the server as a share of max_connections";
    PG_LONGEST_QUERY = "keel_pg_longest_query_seconds", Gauge, true, "Age of the longest-running active query on the database";
    PG_OLDEST_IDLE_TX = "keel_pg_oldest_idle_in_transaction_seconds", Gauge, true, "Time the oldest idle-in-transaction session has been idle";
    PG_WAITING = "keel_pg_waiting_sessions", Gauge, true, "Sessions waiting on a lock";
    PG_BLOCKED = "keel_pg_blocked_sessions", Gauge, true, "Sessions blocked by another session's lock";
    PG_BLOCKING = "keel_pg_blocking_sessions", Gauge, true, "Sessions holding a lock another session waits for";
    PG_LOCK_WAIT = "keel_pg_lock_wait_seconds", Gauge, false, "How long a blocked session has waited, with its pid and the pids blocking it (API only: pids are no Prometheus labels)";
    PG_COMMITS = "keel_pg_transactions_committed", Counter, true, "Transactions committed in the database";
    PG_ROLLBACKS = "keel_pg_transactions_rolled_back", Counter, true, "Transactions rolled back in the database";
    PG_BLKS_HIT = "keel_pg_blocks_hit", Counter, false, "Shared buffer hits in the database";
    PG_BLKS_READ = "keel_pg_blocks_read", Counter, false, "Blocks read from disk or the OS cache in the database";
    PG_CACHE_HIT_RATIO = "keel_pg_cache_hit_ratio", Gauge, true, "Share of block reads served by shared buffers since the previous scrape (cumulative on the first)";
    PG_DEADLOCKS = "keel_pg_deadlocks", Counter, true, "Deadlocks detected in the database";
    PG_TEMP_BYTES = "keel_pg_temp_bytes", Counter, true, "Bytes written to temporary files by queries on the database";
    PG_DATABASE_SIZE = "keel_pg_database_size_bytes", Gauge, true, "Size of the database on disk";
    PG_REPLICATION_LAG = "keel_pg_replication_lag_seconds", Gauge, true, "Replay lag: of this standby behind its primary, or of the slowest standby of this primary";
    PG_REPLICAS = "keel_pg_replicas", Gauge, false, "Standbys streaming from this primary";
    PG_IN_RECOVERY = "keel_pg_in_recovery", Gauge, false, "Whether the server is a standby (1) or a primary (0)";
    PG_DEAD_TUPLE_RATIO_MAX = "keel_pg_dead_tuples_max_ratio", Gauge, true, "Highest share of dead tuples among the database's tables with at least 10,000 rows";
    PG_STATEMENTS = "keel_pg_statements", Gauge, true, "Entries of pg_stat_statements for the database";
    PG_STATEMENTS_EVICTED = "keel_pg_statements_evicted", Gauge, true, "pg_stat_statements entries evicted since the previous scrape";
    PG_TABLE_SEQ_SCANS = "keel_pg_table_seq_scans", Counter, false, "Sequential scans of the table";
    PG_TABLE_IDX_SCANS = "keel_pg_table_index_scans", Counter, false, "Index scans of the table";
    PG_TABLE_LIVE = "keel_pg_table_live_tuples", Gauge, false, "Estimated live rows of the table";
    PG_TABLE_DEAD = "keel_pg_table_dead_tuples", Gauge, false, "Estimated dead rows of the table";
    PG_TABLE_SIZE = "keel_pg_table_size_bytes", Gauge, false, "Size of the table without indexes, from pg_class.relpages (as of its last VACUUM, ANALYZE or CREATE INDEX; read without locking the table)";
    PG_TABLE_VACUUM_AGE = "keel_pg_table_last_vacuum_age_seconds", Gauge, false, "Time since the table was last vacuumed (manually or by autovacuum)";
    PG_TABLE_ANALYZE_AGE = "keel_pg_table_last_analyze_age_seconds", Gauge, false, "Time since the table was last analysed (manually or by autovacuum)";
    PG_TABLE_WRITES = "keel_pg_table_rows_written", Counter, false, "Rows inserted, updated or deleted in the table, by operation";
    PG_INDEX_SCANS = "keel_pg_index_scans", Counter, false, "Scans of the index";
    PG_INDEX_SIZE = "keel_pg_index_size_bytes", Gauge, false, "Size of the index, from pg_class.relpages (as of its last VACUUM, ANALYZE or build; read without locking it)";
    PG_STATEMENT_CALLS = "keel_pg_statement_calls", Counter, false, "Executions of the statement (top statements by recent time; the rest under queryid=\"other\")";
    PG_STATEMENT_TIME = "keel_pg_statement_exec_seconds", Counter, false, "Execution time of the statement";
    PG_STATEMENT_ROWS = "keel_pg_statement_rows", Counter, false, "Rows returned or affected by the statement";

    REDIS_MEMORY_USED = "keel_redis_memory_used_bytes", Gauge, true, "Memory Redis has allocated (used_memory)";
    REDIS_MAXMEMORY = "keel_redis_maxmemory_bytes", Gauge, false, "The maxmemory setting (0: no limit)";
    REDIS_MEMORY_RATIO = "keel_redis_memory_used_ratio", Gauge, true, "used_memory as a share of maxmemory (absent without a limit)";
    REDIS_FRAGMENTATION = "keel_redis_memory_fragmentation_ratio", Gauge, true, "Resident memory over used memory";
    REDIS_CLIENTS = "keel_redis_connected_clients", Gauge, true, "Connected clients";
    REDIS_BLOCKED_CLIENTS = "keel_redis_blocked_clients", Gauge, true, "Clients blocked in a blocking command";
    REDIS_OPS = "keel_redis_ops_per_second", Gauge, true, "Commands per second, as Redis measures it";
    REDIS_COMMANDS = "keel_redis_commands_processed", Counter, true, "Commands processed";
    REDIS_HITS = "keel_redis_keyspace_hits", Counter, false, "Successful key lookups";
    REDIS_MISSES = "keel_redis_keyspace_misses", Counter, false, "Failed key lookups";
    REDIS_HIT_RATIO = "keel_redis_hit_ratio", Gauge, true, "Share of key lookups that found their key since the previous scrape (cumulative on the first)";
    REDIS_EVICTED = "keel_redis_evicted_keys", Counter, true, "Keys evicted because of maxmemory";
    REDIS_EVICTIONS_RATE = "keel_redis_evictions_per_second", Gauge, true, "Keys evicted per second since the previous scrape";
    REDIS_REJECTED = "keel_redis_rejected_connections", Counter, true, "Connections refused because of maxclients";
    REDIS_REJECTED_RATE = "keel_redis_rejected_connections_per_second", Gauge, true, "Connections refused per second since the previous scrape";
    REDIS_KEYS = "keel_redis_keys", Gauge, true, "Keys, by database";
    REDIS_CONNECTED_REPLICAS = "keel_redis_connected_replicas", Gauge, false, "Replicas connected to this master";
    REDIS_MASTER_LINK_UP = "keel_redis_master_link_up", Gauge, false, "On a replica: whether the link to its master is up";
    REDIS_REPLICATION_LAG = "keel_redis_replication_lag_bytes", Gauge, true, "Replication offset of the master minus the slowest replica's";
    REDIS_SLOWLOG_LENGTH = "keel_redis_slowlog_length", Gauge, true, "Entries in SLOWLOG";
    REDIS_SLOWLOG_LAST_ID = "keel_redis_slowlog_last_id", Gauge, false, "Id of the newest SLOWLOG entry: its growth is the number of new slow commands";
    REDIS_SLOWLOG_MAX = "keel_redis_slowlog_longest_seconds", Gauge, true, "Longest duration among the newest SLOWLOG entries";
    REDIS_LATENCY_LATEST = "keel_redis_latency_latest_seconds", Gauge, false, "LATENCY LATEST: the latest spike of the event";
    REDIS_LATENCY_MAX = "keel_redis_latency_max_seconds", Gauge, false, "LATENCY LATEST: the highest spike of the event";
}

/// The family named `name`.
pub fn family(name: &str) -> Option<&'static Family> {
    FAMILIES.iter().find(|f| f.name == name)
}

/// One value of one series, as a scrape produced it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// Family name (from [`FAMILIES`]).
    #[serde(rename = "n")]
    pub name: String,
    /// Labels beyond `tenant` and `instance`, which the exposition adds.
    #[serde(rename = "l", default, skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<(String, String)>,
    /// The value.
    #[serde(rename = "v")]
    pub value: f64,
}

impl Sample {
    /// A sample of `name` without labels.
    pub fn new(name: &'static str, value: f64) -> Self {
        Self {
            name: name.to_owned(),
            labels: Vec::new(),
            value,
        }
    }

    /// A sample of `name` with `labels`.
    pub fn labelled(name: &'static str, labels: &[(&str, &str)], value: f64) -> Self {
        Self {
            name: name.to_owned(),
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            value,
        }
    }

    /// The first sample of `name` without labels in `samples`.
    pub fn find(samples: &[Sample], name: &str) -> Option<f64> {
        samples
            .iter()
            .find(|s| s.name == name && s.labels.is_empty())
            .map(|s| s.value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_prometheus_names_in_base_units() {
        let mut seen = std::collections::HashSet::new();
        for f in FAMILIES {
            assert!(seen.insert(f.name), "{} twice", f.name);
            assert!(f.name.starts_with("keel_"), "{}", f.name);
            assert!(
                f.name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
                "{}",
                f.name
            );
            assert!(
                !f.name.ends_with("_total"),
                "{}: counters get _total on output",
                f.name
            );
            for unit in ["_ms", "_milliseconds", "_kb", "_mb", "_percent"] {
                assert!(!f.name.ends_with(unit), "{} is not in base units", f.name);
            }
        }
    }
}
