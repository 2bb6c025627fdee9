//! Events per second from commit to JetStream through the outbox and its relay, beside raw
//! JetStream publishes (publish, then await the acks, `KEEL_BENCH_BATCH` at a time, as the relay
//! pipelines a batch of distinct keys) from the same process to the same server in the same run.
//!
//! Run with `cargo bench -p keel-bus --bench outbox`. Settings from the environment:
//! `KEEL_BENCH_SECS` (5, measured seconds per mode and round), `KEEL_BENCH_ROUNDS` (3),
//! `KEEL_BENCH_WRITERS` (8, tasks committing events, one transaction per event),
//! `KEEL_BENCH_KEYS` (1000, ordering keys the events are spread over), `KEEL_BENCH_BATCH` (256,
//! the relay's batch and the raw publisher's window). Servers come from `keel_testkit`
//! (`KEEL_TEST_DATABASE_URL`, `KEEL_TEST_NATS_URL` apply). Run by `cargo test` (without
//! `--bench`) it is a smoke test: one short round.
//!
//! The outbox latency is commit → delivery to a JetStream consumer, which follows the ack.
//! A benchmark reports rather than asserts: the goal is printed as MET or NOT MET.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use async_nats::jetstream::consumer::{DeliverPolicy, pull};
use futures::StreamExt as _;
use keel_bus::{Bus, Outbox, OutboxMessage, Relay, RelayConfig, StreamSettings};
use keel_config::NatsConfig;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// The goal: the outbox path at least this share of the raw publish rate.
const GOAL_RATIO: f64 = 0.3;
const SCHEMA: &str = "bench";

#[derive(Debug, Clone, Copy)]
struct Settings {
    secs: f64,
    rounds: usize,
    writers: usize,
    keys: usize,
    batch: usize,
}

impl Settings {
    fn from_env(smoke: bool) -> anyhow::Result<Self> {
        let settings = Self {
            secs: if smoke {
                0.5
            } else {
                env_number("KEEL_BENCH_SECS", 5.0)?
            },
            rounds: if smoke {
                1
            } else {
                env_number("KEEL_BENCH_ROUNDS", 3)?
            },
            writers: env_number("KEEL_BENCH_WRITERS", 8)?,
            keys: env_number("KEEL_BENCH_KEYS", 1000)?,
            batch: env_number("KEEL_BENCH_BATCH", 256)?,
        };
        ensure!(settings.secs > 0.0, "KEEL_BENCH_SECS must be above 0");
        ensure!(settings.rounds > 0, "KEEL_BENCH_ROUNDS must be at least 1");
        ensure!(
            settings.writers > 0,
            "KEEL_BENCH_WRITERS must be at least 1"
        );
        ensure!(settings.keys > 0, "KEEL_BENCH_KEYS must be at least 1");
        ensure!(settings.batch > 0, "KEEL_BENCH_BATCH must be at least 1");
        Ok(settings)
    }
}

fn env_number<T: std::str::FromStr>(name: &str, default: T) -> anyhow::Result<T>
where
    T::Err: std::fmt::Display,
{
    match std::env::var(name) {
        Ok(value) => value
            .parse()
            .map_err(|e| anyhow::anyhow!("{name}={value:?} is not a number: {e}")),
        Err(_) => Ok(default),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Cargo passes `--bench` to benchmarks it runs with `cargo bench`, not with `cargo test`.
    let smoke = !std::env::args().any(|a| a == "--bench");
    let settings = Settings::from_env(smoke)?;
    let env = keel_testkit::TestEnv::new();
    let db = env.database().await?;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(settings.writers as u32 + 4)
        .connect(&db.url)
        .await
        .context("opening the pool")?;
    let nats_url = env.nats_url().await?;
    let bus = Bus::connect(&NatsConfig::from_url(&nats_url), &StreamSettings::default()).await?;
    let outbox = Outbox::new(SCHEMA)?;
    outbox.install(&pool).await?;
    let server_version: String = sqlx::query_scalar("SHOW server_version")
        .fetch_one(&pool)
        .await?;

    println!(
        "Keel outbox benchmark{}",
        if smoke { " (smoke run)" } else { "" }
    );
    println!(
        "  PostgreSQL {server_version}, NATS at {nats_url}; {} writers (one event per transaction) over {} keys, relay batch {}, {} rounds of {} s",
        settings.writers, settings.keys, settings.batch, settings.rounds, settings.secs
    );
    let mut raw_rates = Vec::new();
    let mut outbox_rates = Vec::new();
    let mut commit_rates = Vec::new();
    let mut latencies = Vec::new();
    let mut events_total = 0u64;
    let (ins0, upd0, del0) = table_writes(&pool).await?;
    for round in 1..=settings.rounds {
        let raw = raw_round(&bus, settings).await?;
        let run = outbox_round(&bus, &pool, &outbox, settings).await?;
        events_total += run.events;
        println!(
            "  round {round}: raw {:>8.0}/s   outbox {:>8.0}/s ({} events, writers committed {:.0}/s)   ratio {:.2}",
            raw,
            run.rate,
            run.events,
            run.commit_rate,
            run.rate / raw
        );
        raw_rates.push(raw);
        outbox_rates.push(run.rate);
        commit_rates.push(run.commit_rate);
        latencies.extend(run.latencies_ms);
    }
    let (ins, upd, del) = settled_writes(&pool, (ins0, upd0, del0), events_total).await?;
    let raw = median(&mut raw_rates);
    let through = median(&mut outbox_rates);
    let ratio = through / raw;
    latencies.sort_by(f64::total_cmp);
    println!("  median raw JetStream publish+ack: {raw:.0} events/s");
    println!(
        "  median outbox commit→JetStream:   {through:.0} events/s (writers alone committed {:.0}/s)",
        median(&mut commit_rates)
    );
    println!(
        "  commit→delivery latency: p50 {:.2} ms, p99 {:.2} ms ({} events)",
        percentile(&latencies, 0.50),
        percentile(&latencies, 0.99),
        latencies.len()
    );
    println!(
        "  outbox writes per event: {:.2} ({} inserts, {} updates, {} deletes for {} events)",
        (ins + upd + del) as f64 / events_total.max(1) as f64,
        ins,
        upd,
        del,
        events_total
    );
    println!(
        "  goal outbox ≥ {GOAL_RATIO}× raw: ratio {ratio:.2} {}",
        if ratio >= GOAL_RATIO {
            "MET"
        } else {
            "NOT MET"
        }
    );
    Ok(())
}

/// Publishes for `secs`, `batch` messages at a time then their acks; returns messages/s.
async fn raw_round(bus: &Bus, settings: Settings) -> anyhow::Result<f64> {
    let js = bus.jetstream();
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(settings.secs);
    let mut sent = 0u64;
    while Instant::now() < deadline {
        let mut acks = Vec::with_capacity(settings.batch);
        for _ in 0..settings.batch {
            let id = Uuid::now_v7();
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(keel_bus::MSG_ID_HEADER, id.to_string().as_str());
            let payload = format!("raw {id}").into_bytes();
            acks.push(
                js.publish_with_headers("keel.bench.raw", headers, payload.into())
                    .await
                    .context("raw publish")?,
            );
        }
        for ack in acks {
            ack.await.context("raw ack")?;
            sent += 1;
        }
    }
    Ok(sent as f64 / started.elapsed().as_secs_f64())
}

struct OutboxRun {
    events: u64,
    rate: f64,
    commit_rate: f64,
    latencies_ms: Vec<f64>,
}

/// Writers commit events for `secs` while a relay publishes them; a JetStream consumer takes
/// each delivery's time. The rate counts from the first commit to the last delivery.
async fn outbox_round(
    bus: &Bus,
    pool: &PgPool,
    outbox: &Outbox,
    settings: Settings,
) -> anyhow::Result<OutboxRun> {
    let stream = bus.jetstream().get_stream(bus.stream_name()).await?;
    let consumer = stream
        .create_consumer(pull::OrderedConfig {
            filter_subject: "keel.bench.outbox".to_owned(),
            deliver_policy: DeliverPolicy::New,
            ..Default::default()
        })
        .await
        .context("the timing consumer")?;
    let mut messages = consumer.messages().await?;
    let relay = Relay::new(
        pool.clone(),
        outbox.clone(),
        bus.jetstream().clone(),
        RelayConfig {
            batch_size: settings.batch as i64,
            ..RelayConfig::default()
        },
    );
    let stop = CancellationToken::new();
    let relay_task = tokio::spawn(relay.run(stop.clone()));
    let committed: Arc<Mutex<HashMap<Uuid, Instant>>> = Arc::default();
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(settings.secs);
    let writers: Vec<_> = (0..settings.writers)
        .map(|w| {
            let (pool, outbox, committed) = (pool.clone(), outbox.clone(), committed.clone());
            tokio::spawn(async move {
                let mut n = w;
                while Instant::now() < deadline {
                    let key = format!("instance-{}", n % settings.keys);
                    let message = OutboxMessage::new(key, "keel.bench.outbox", vec![0; 200]);
                    let mut tx = pool.begin().await?;
                    outbox.enqueue(&mut tx, &message).await?;
                    tx.commit().await?;
                    committed
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .insert(message.id, Instant::now());
                    n += settings.writers;
                }
                Ok::<_, anyhow::Error>(())
            })
        })
        .collect();
    for writer in writers {
        writer.await.context("writer task")??;
    }
    let commit_rate = committed
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .len() as f64
        / started.elapsed().as_secs_f64();
    let expected = committed
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .len();
    let mut latencies_ms = Vec::with_capacity(expected);
    let mut last = started;
    let drain = Instant::now() + Duration::from_secs(60);
    while latencies_ms.len() < expected {
        let next = tokio::time::timeout_at(drain.into(), messages.next()).await;
        let message = match next {
            Ok(Some(Ok(message))) => message,
            Ok(Some(Err(error))) => bail!("reading the stream failed: {error}"),
            Ok(None) => bail!("the stream of messages ended"),
            Err(_) => bail!(
                "only {} of {expected} events arrived within 60 s",
                latencies_ms.len()
            ),
        };
        let arrived = Instant::now();
        let id = message
            .headers
            .as_ref()
            .and_then(|h| h.get(keel_bus::MSG_ID_HEADER))
            .and_then(|v| Uuid::parse_str(v.as_str()).ok())
            .context("a delivered event without its id")?;
        let committed_at = committed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&id)
            .copied();
        // A delivery can beat the writer's bookkeeping by microseconds: count it as 0.
        let committed_at = committed_at.unwrap_or(arrived);
        latencies_ms.push(
            arrived
                .saturating_duration_since(committed_at)
                .as_secs_f64()
                * 1e3,
        );
        last = arrived;
    }
    stop.cancel();
    relay_task.await.context("relay task")?;
    ensure!(
        outbox.pending(pool).await? == 0,
        "events were left in the outbox"
    );
    Ok(OutboxRun {
        events: expected as u64,
        rate: expected as f64 / last.duration_since(started).as_secs_f64(),
        commit_rate,
        latencies_ms,
    })
}

async fn table_writes(pool: &PgPool) -> anyhow::Result<(i64, i64, i64)> {
    Ok(sqlx::query_as(
        "SELECT n_tup_ins, n_tup_upd, n_tup_del FROM pg_stat_user_tables
         WHERE schemaname = $1 AND relname = 'outbox'",
    )
    .bind(SCHEMA)
    .fetch_one(pool)
    .await?)
}

/// The outbox's writes since `before`, once every backend has flushed its statistics.
async fn settled_writes(
    pool: &PgPool,
    before: (i64, i64, i64),
    events: u64,
) -> anyhow::Result<(i64, i64, i64)> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now = table_writes(pool).await?;
        let delta = (now.0 - before.0, now.1 - before.1, now.2 - before.2);
        if (delta.0 >= events as i64 && delta.2 >= events as i64) || Instant::now() > deadline {
            return Ok(delta);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}
