//! One scrape of a Redis server: INFO, SLOWLOG and LATENCY LATEST.
//!
//! The connection comes from the connector, which caps every reply and times every command out.
//! A command the server refuses (an ACL without `slowlog`, a server without LATENCY) becomes a
//! problem with its fix; INFO is what the scrape cannot do without.

use std::collections::HashMap;

use redis::Value;
use redis::aio::MultiplexedConnection;

use crate::catalog::{self as c, Sample};

/// Newest SLOWLOG entries read per scrape.
const SLOWLOG_ENTRIES: usize = 16;

/// What a Redis scrape read.
#[derive(Debug, Default)]
pub(crate) struct RedisScrape {
    pub(crate) samples: Vec<Sample>,
    pub(crate) problems: Vec<String>,
}

/// Scrapes the server behind `conn`.
pub(crate) async fn scrape(
    conn: &mut MultiplexedConnection,
) -> Result<RedisScrape, redis::RedisError> {
    let mut out = RedisScrape::default();
    // The default sections hold everything read here; `INFO all` adds per-command tables.
    let info: String = redis::cmd("INFO").query_async(conn).await?;
    out.samples = info_samples(&parse_info(&info));

    match redis::cmd("SLOWLOG")
        .arg("GET")
        .arg(SLOWLOG_ENTRIES)
        .query_async::<Value>(conn)
        .await
    {
        Ok(value) => {
            let entries = slowlog_entries(&value);
            let len: Result<i64, _> = redis::cmd("SLOWLOG").arg("LEN").query_async(conn).await;
            if let Ok(len) = len {
                out.samples
                    .push(Sample::new(c::REDIS_SLOWLOG_LENGTH, len as f64));
            }
            let last_id = entries.iter().map(|(id, _)| *id).max().unwrap_or(0);
            let longest = entries.iter().map(|(_, us)| *us).max().unwrap_or(0);
            out.samples
                .push(Sample::new(c::REDIS_SLOWLOG_LAST_ID, last_id as f64));
            out.samples
                .push(Sample::new(c::REDIS_SLOWLOG_MAX, longest as f64 / 1e6));
        }
        Err(error) => out.problems.push(refused("SLOWLOG", "+slowlog", &error)),
    }
    match redis::cmd("LATENCY")
        .arg("LATEST")
        .query_async::<Value>(conn)
        .await
    {
        Ok(value) => {
            for (event, latest_ms, max_ms) in latency_latest(&value) {
                let l = [("event", event.as_str())];
                out.samples.push(Sample::labelled(
                    c::REDIS_LATENCY_LATEST,
                    &l,
                    latest_ms as f64 / 1e3,
                ));
                out.samples.push(Sample::labelled(
                    c::REDIS_LATENCY_MAX,
                    &l,
                    max_ms as f64 / 1e3,
                ));
            }
        }
        Err(error) => out
            .problems
            .push(refused("LATENCY LATEST", "+latency", &error)),
    }
    Ok(out)
}

fn refused(command: &str, acl: &str, error: &redis::RedisError) -> String {
    format!(
        "cannot run {command}: {error}; fix: allow it to the collector's user (ACL SETUSER <user> {acl})"
    )
}

/// INFO's `key:value` lines, sections dropped.
fn parse_info(info: &str) -> HashMap<&str, &str> {
    info.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| line.trim_end().split_once(':'))
        .collect()
}

fn info_samples(info: &HashMap<&str, &str>) -> Vec<Sample> {
    let number = |key: &str| info.get(key).and_then(|v| v.parse::<f64>().ok());
    let mut samples = Vec::new();
    for (name, key) in [
        (c::REDIS_MEMORY_USED, "used_memory"),
        (c::REDIS_MAXMEMORY, "maxmemory"),
        (c::REDIS_FRAGMENTATION, "mem_fragmentation_ratio"),
        (c::REDIS_CLIENTS, "connected_clients"),
        (c::REDIS_BLOCKED_CLIENTS, "blocked_clients"),
        (c::REDIS_OPS, "instantaneous_ops_per_sec"),
        (c::REDIS_COMMANDS, "total_commands_processed"),
        (c::REDIS_HITS, "keyspace_hits"),
        (c::REDIS_MISSES, "keyspace_misses"),
        (c::REDIS_EVICTED, "evicted_keys"),
        (c::REDIS_REJECTED, "rejected_connections"),
    ] {
        if let Some(value) = number(key) {
            samples.push(Sample::new(name, value));
        }
    }
    if let (Some(used), Some(max)) = (number("used_memory"), number("maxmemory"))
        && max > 0.0
    {
        samples.push(Sample::new(c::REDIS_MEMORY_RATIO, used / max));
    }
    // db0:keys=1,expires=0,avg_ttl=0
    let mut dbs: Vec<(&str, f64)> = info
        .iter()
        .filter(|(k, _)| k.starts_with("db") && k[2..].bytes().all(|b| b.is_ascii_digit()))
        .filter_map(|(k, v)| {
            let keys = v.split(',').find_map(|kv| kv.strip_prefix("keys="))?;
            Some((*k, keys.parse().ok()?))
        })
        .collect();
    dbs.sort_by(|a, b| a.0.cmp(b.0));
    for (db, keys) in dbs {
        samples.push(Sample::labelled(c::REDIS_KEYS, &[("db", db)], keys));
    }
    match info.get("role").copied() {
        Some("master") => {
            let replicas = number("connected_slaves").unwrap_or(0.0);
            samples.push(Sample::new(c::REDIS_CONNECTED_REPLICAS, replicas));
            let master_offset = number("master_repl_offset").unwrap_or(0.0);
            // slave0:ip=…,port=…,state=online,offset=123,lag=0
            let slowest = info
                .iter()
                .filter(|(k, _)| {
                    k.starts_with("slave") && k[5..].bytes().all(|b| b.is_ascii_digit())
                })
                .filter_map(|(_, v)| {
                    v.split(',')
                        .find_map(|kv| kv.strip_prefix("offset="))?
                        .parse::<f64>()
                        .ok()
                })
                .reduce(f64::min);
            if let Some(slowest) = slowest {
                samples.push(Sample::new(
                    c::REDIS_REPLICATION_LAG,
                    (master_offset - slowest).max(0.0),
                ));
            }
        }
        Some("slave") => {
            let up = info.get("master_link_status").copied() == Some("up");
            samples.push(Sample::new(
                c::REDIS_MASTER_LINK_UP,
                f64::from(u8::from(up)),
            ));
        }
        _ => {}
    }
    samples
}

fn int(value: &Value) -> Option<i64> {
    match value {
        Value::Int(i) => Some(*i),
        Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        Value::SimpleString(s) => s.parse().ok(),
        _ => None,
    }
}

/// (id, duration in µs) of each SLOWLOG GET entry: `[id, timestamp, micros, args, …]`.
fn slowlog_entries(value: &Value) -> Vec<(i64, i64)> {
    let Value::Array(entries) = value else {
        return Vec::new();
    };
    entries
        .iter()
        .filter_map(|entry| match entry {
            Value::Array(fields) => Some((int(fields.first()?)?, int(fields.get(2)?)?)),
            _ => None,
        })
        .collect()
}

/// (event, latest ms, max ms) of each LATENCY LATEST entry: `[event, timestamp, latest, max]`.
fn latency_latest(value: &Value) -> Vec<(String, i64, i64)> {
    let Value::Array(entries) = value else {
        return Vec::new();
    };
    entries
        .iter()
        .filter_map(|entry| {
            let Value::Array(fields) = entry else {
                return None;
            };
            let event = match fields.first()? {
                Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
                Value::SimpleString(s) => s.clone(),
                _ => return None,
            };
            // Event names are Redis's own, a small fixed set; anything else is not a label value.
            if event.is_empty()
                || event.len() > 64
                || !event
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return None;
            }
            Some((event, int(fields.get(2)?)?, int(fields.get(3)?)?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_becomes_samples() {
        let info = "# Memory\r\nused_memory:1000\r\nmaxmemory:4000\r\nmem_fragmentation_ratio:1.5\r\n\
                    # Clients\r\nconnected_clients:3\r\nblocked_clients:1\r\n\
                    # Stats\r\nkeyspace_hits:90\r\nkeyspace_misses:10\r\nevicted_keys:2\r\nrejected_connections:0\r\n\
                    # Replication\r\nrole:master\r\nconnected_slaves:1\r\nmaster_repl_offset:500\r\n\
                    slave0:ip=10.0.0.1,port=6380,state=online,offset=420,lag=0\r\n\
                    # Keyspace\r\ndb0:keys=12,expires=0,avg_ttl=0\r\ndb3:keys=1,expires=1,avg_ttl=9\r\n";
        let samples = info_samples(&parse_info(info));
        let get = |n: &str| Sample::find(&samples, n);
        assert_eq!(get(c::REDIS_MEMORY_USED), Some(1000.0));
        assert_eq!(get(c::REDIS_MEMORY_RATIO), Some(0.25));
        assert_eq!(get(c::REDIS_FRAGMENTATION), Some(1.5));
        assert_eq!(get(c::REDIS_BLOCKED_CLIENTS), Some(1.0));
        assert_eq!(get(c::REDIS_EVICTED), Some(2.0));
        assert_eq!(get(c::REDIS_REPLICATION_LAG), Some(80.0));
        let keys: Vec<_> = samples.iter().filter(|s| s.name == c::REDIS_KEYS).collect();
        assert_eq!(keys.len(), 2);
        assert_eq!(keys[0].labels, vec![("db".to_owned(), "db0".to_owned())]);
        assert_eq!(keys[0].value, 12.0);
    }

    #[test]
    fn no_maxmemory_means_no_ratio() {
        let samples = info_samples(&parse_info("used_memory:1000\r\nmaxmemory:0\r\n"));
        assert_eq!(Sample::find(&samples, c::REDIS_MEMORY_RATIO), None);
    }

    #[test]
    fn slowlog_and_latency_replies_are_read() {
        let slow = Value::Array(vec![
            Value::Array(vec![
                Value::Int(7),
                Value::Int(1_700_000_000),
                Value::Int(25_000),
                Value::Array(vec![]),
            ]),
            Value::Array(vec![
                Value::Int(6),
                Value::Int(1_700_000_000),
                Value::Int(12_000),
            ]),
        ]);
        assert_eq!(slowlog_entries(&slow), vec![(7, 25_000), (6, 12_000)]);
        let latency = Value::Array(vec![
            Value::Array(vec![
                Value::BulkString(b"command".to_vec()),
                Value::Int(1_700_000_000),
                Value::Int(250),
                Value::Int(1000),
            ]),
            Value::Array(vec![
                Value::BulkString(b"bad event{}".to_vec()),
                Value::Int(0),
                Value::Int(1),
                Value::Int(1),
            ]),
        ]);
        assert_eq!(
            latency_latest(&latency),
            vec![("command".to_owned(), 250, 1000)]
        );
    }
}
