//! pg_stat_statements counters and the work done between two reads of them.
//!
//! The view holds cumulative counters per (user, database, query id, top level). The collector
//! keeps the previous read of an instance (its *snapshot*, stored with the scrape state so any
//! replica can take the next scrape) and writes the difference. Three things make a counter go
//! backwards, and none of them is negative work:
//! - `pg_stat_statements_reset()`: `pg_stat_statements_info.stats_reset` moves, and every
//!   counter since then is work done after the reset;
//! - an eviction (the view is full, `dealloc` grows): the entry is gone, and when the statement
//!   runs again it comes back from zero, i.e. with fewer calls than before;
//! - a reset of one entry (`pg_stat_statements_reset(userid, dbid, queryid)`), which looks the
//!   same as an eviction that came back.

use std::collections::HashMap;

use chrono::{DateTime, Utc};

/// The identity of one entry within one database.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StatementKey {
    /// `userid`: the same statement run by two roles is two entries.
    pub user_id: u32,
    /// `queryid`.
    pub query_id: i64,
    /// `toplevel`: with `pg_stat_statements.track = all` a statement run inside a function is a
    /// second entry.
    pub toplevel: bool,
}

/// The counters of one entry (cumulative in a snapshot, the work of an interval in a delta).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Counters {
    /// Executions.
    pub calls: i64,
    /// Execution time in milliseconds.
    pub total_exec_ms: f64,
    /// Rows returned or affected.
    pub rows: i64,
    /// Shared buffer hits.
    pub shared_blks_hit: i64,
    /// Shared blocks read.
    pub shared_blks_read: i64,
    /// Temporary blocks written.
    pub temp_blks_written: i64,
    /// WAL bytes generated.
    pub wal_bytes: i64,
}

impl Counters {
    fn minus(&self, earlier: &Counters) -> Counters {
        Counters {
            calls: self.calls - earlier.calls,
            total_exec_ms: (self.total_exec_ms - earlier.total_exec_ms).max(0.0),
            rows: (self.rows - earlier.rows).max(0),
            shared_blks_hit: (self.shared_blks_hit - earlier.shared_blks_hit).max(0),
            shared_blks_read: (self.shared_blks_read - earlier.shared_blks_read).max(0),
            temp_blks_written: (self.temp_blks_written - earlier.temp_blks_written).max(0),
            wal_bytes: (self.wal_bytes - earlier.wal_bytes).max(0),
        }
    }

    /// Adds `other` to these counters.
    pub fn add(&mut self, other: &Counters) {
        self.calls += other.calls;
        self.total_exec_ms += other.total_exec_ms;
        self.rows += other.rows;
        self.shared_blks_hit += other.shared_blks_hit;
        self.shared_blks_read += other.shared_blks_read;
        self.temp_blks_written += other.temp_blks_written;
        self.wal_bytes += other.wal_bytes;
    }
}

/// One read of pg_stat_statements for one database.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    /// `pg_stat_statements_info.stats_reset`.
    pub stats_reset: Option<DateTime<Utc>>,
    /// `pg_stat_statements_info.dealloc`: entries evicted since the last reset.
    pub dealloc: i64,
    /// The entries.
    pub entries: HashMap<StatementKey, Counters>,
}

/// The work between two snapshots.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Deltas {
    /// Entries that did any work, with that work.
    pub entries: Vec<(StatementKey, Counters)>,
    /// Whether the counters were reset between the snapshots.
    pub reset: bool,
    /// Entries evicted between the snapshots (their last interval's work is lost).
    pub evicted: i64,
}

/// The work done between `previous` and `current`; `None` when there is no previous snapshot
/// (the first read is the baseline: its counters cover an unknown span).
pub fn deltas(previous: Option<&Snapshot>, current: &Snapshot) -> Option<Deltas> {
    let previous = previous?;
    let reset = current.stats_reset != previous.stats_reset;
    let mut out = Deltas {
        reset,
        evicted: if reset {
            current.dealloc
        } else {
            (current.dealloc - previous.dealloc).max(0)
        },
        entries: Vec::new(),
    };
    for (key, now) in &current.entries {
        let work = match previous.entries.get(key) {
            // Since a reset every counter is new work, whatever the previous snapshot held.
            _ if reset => *now,
            // Fewer calls than before: the entry was evicted (or reset alone) and came back.
            Some(before) if now.calls >= before.calls => now.minus(before),
            _ => *now,
        };
        if work.calls > 0 || work.total_exec_ms > 0.0 {
            out.entries.push((*key, work));
        }
    }
    out.entries.sort_by_key(|(key, _)| *key);
    Some(out)
}

/// Bytes per entry of [`encode`]: user id, query id, top level, then the seven counters.
const ENTRY_BYTES: usize = 4 + 8 + 1 + 7 * 8;

/// The snapshot in the compact form stored with the scrape state: a header (format 1, reset
/// time in microseconds or i64::MIN, dealloc), then fixed-width little-endian entries.
pub fn encode(snapshot: &Snapshot) -> Vec<u8> {
    let mut out = Vec::with_capacity(17 + snapshot.entries.len() * ENTRY_BYTES);
    out.push(1u8);
    let reset = snapshot
        .stats_reset
        .map_or(i64::MIN, |at| at.timestamp_micros());
    out.extend_from_slice(&reset.to_le_bytes());
    out.extend_from_slice(&snapshot.dealloc.to_le_bytes());
    for (key, c) in &snapshot.entries {
        out.extend_from_slice(&key.user_id.to_le_bytes());
        out.extend_from_slice(&key.query_id.to_le_bytes());
        out.push(u8::from(key.toplevel));
        out.extend_from_slice(&c.calls.to_le_bytes());
        out.extend_from_slice(&c.total_exec_ms.to_le_bytes());
        out.extend_from_slice(&c.rows.to_le_bytes());
        out.extend_from_slice(&c.shared_blks_hit.to_le_bytes());
        out.extend_from_slice(&c.shared_blks_read.to_le_bytes());
        out.extend_from_slice(&c.temp_blks_written.to_le_bytes());
        out.extend_from_slice(&c.wal_bytes.to_le_bytes());
    }
    out
}

/// The snapshot [`encode`] wrote; `None` for bytes of another format or truncated (the next
/// scrape then starts a new baseline).
pub fn decode(bytes: &[u8]) -> Option<Snapshot> {
    let (&format, rest) = bytes.split_first()?;
    if format != 1 || rest.len() < 16 || (rest.len() - 16) % ENTRY_BYTES != 0 {
        return None;
    }
    let i64_at = |b: &[u8], at: usize| -> Option<i64> {
        Some(i64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
    };
    let reset = i64_at(rest, 0)?;
    let mut snapshot = Snapshot {
        stats_reset: if reset == i64::MIN {
            None
        } else {
            DateTime::from_timestamp_micros(reset)
        },
        dealloc: i64_at(rest, 8)?,
        entries: HashMap::with_capacity((rest.len() - 16) / ENTRY_BYTES),
    };
    for e in rest[16..].chunks_exact(ENTRY_BYTES) {
        let key = StatementKey {
            user_id: u32::from_le_bytes(e.get(0..4)?.try_into().ok()?),
            query_id: i64_at(e, 4)?,
            toplevel: e[12] != 0,
        };
        let counters = Counters {
            calls: i64_at(e, 13)?,
            total_exec_ms: f64::from_bits(u64::from_le_bytes(e.get(21..29)?.try_into().ok()?)),
            rows: i64_at(e, 29)?,
            shared_blks_hit: i64_at(e, 37)?,
            shared_blks_read: i64_at(e, 45)?,
            temp_blks_written: i64_at(e, 53)?,
            wal_bytes: i64_at(e, 61)?,
        };
        snapshot.entries.insert(key, counters);
    }
    Some(snapshot)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(query_id: i64) -> StatementKey {
        StatementKey {
            user_id: 10,
            query_id,
            toplevel: true,
        }
    }

    fn calls(calls: i64, ms: f64) -> Counters {
        Counters {
            calls,
            total_exec_ms: ms,
            rows: calls,
            ..Counters::default()
        }
    }

    fn snapshot(entries: &[(i64, Counters)]) -> Snapshot {
        Snapshot {
            stats_reset: DateTime::from_timestamp(1_700_000_000, 0),
            dealloc: 0,
            entries: entries.iter().map(|(q, c)| (key(*q), *c)).collect(),
        }
    }

    #[test]
    fn the_first_read_is_a_baseline() {
        assert_eq!(deltas(None, &snapshot(&[(1, calls(5, 1.0))])), None);
    }

    #[test]
    fn deltas_are_differences_and_idle_entries_are_left_out() {
        let before = snapshot(&[(1, calls(5, 10.0)), (2, calls(3, 3.0))]);
        let after = snapshot(&[(1, calls(8, 16.0)), (2, calls(3, 3.0)), (3, calls(2, 1.0))]);
        let d = deltas(Some(&before), &after).expect("deltas");
        assert!(!d.reset);
        assert_eq!(
            d.entries,
            vec![(key(1), calls(3, 6.0)), (key(3), calls(2, 1.0))]
        );
    }

    #[test]
    fn after_a_reset_every_counter_is_new_work() {
        let before = snapshot(&[(1, calls(500, 100.0))]);
        let mut after = snapshot(&[(1, calls(4, 2.0))]);
        after.stats_reset = DateTime::from_timestamp(1_700_000_100, 0);
        let d = deltas(Some(&before), &after).expect("deltas");
        assert!(d.reset);
        assert_eq!(d.entries, vec![(key(1), calls(4, 2.0))]);
    }

    #[test]
    fn an_evicted_entry_that_comes_back_starts_from_zero() {
        let before = snapshot(&[(1, calls(500, 100.0)), (2, calls(7, 7.0))]);
        let mut after = snapshot(&[(1, calls(3, 1.5))]);
        after.dealloc = 2;
        let d = deltas(Some(&before), &after).expect("deltas");
        assert!(!d.reset);
        assert_eq!(d.evicted, 2);
        assert_eq!(d.entries, vec![(key(1), calls(3, 1.5))]);
    }

    #[test]
    fn snapshots_survive_encoding() {
        let mut s = snapshot(&[(-42, calls(5, 1.25)), (i64::MAX, calls(1, 0.5))]);
        s.entries.insert(
            StatementKey {
                user_id: u32::MAX,
                query_id: 7,
                toplevel: false,
            },
            Counters {
                calls: 9,
                total_exec_ms: 3.5,
                rows: 1,
                shared_blks_hit: 2,
                shared_blks_read: 3,
                temp_blks_written: 4,
                wal_bytes: 5,
            },
        );
        s.dealloc = 17;
        assert_eq!(decode(&encode(&s)), Some(s.clone()));
        s.stats_reset = None;
        assert_eq!(decode(&encode(&s)), Some(s.clone()));
        let bytes = encode(&s);
        assert_eq!(decode(&bytes[..bytes.len() - 1]), None);
        assert_eq!(decode(&[2]), None);
        assert_eq!(decode(&[]), None);
    }
}
