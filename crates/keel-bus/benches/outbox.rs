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
//! Two outbox figures: live, with writers committing while the relay publishes (bounded by how
//! fast PostgreSQL commits one-event transactions), and a committed backlog drained by the
//! relay alone (what the relay itself can carry). The latency, live only, is commit → delivery
//! to a JetStream consumer (which follows the ack), read by its own task as events arrive.
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
    let mut backlog_rates = Vec::new();
    for round in 1..=settings.rounds {
        let raw = raw_round(&bus, settings).await?;
        let run = outbox_round(&bus, &pool, &outbox, settings).await?;
        events_total += run.events;
        // As many events as raw publishing managed in a round: the same work for both.
        let backlog_events = ((raw * settings.secs) as usize).max(1);
        let backlog = backlog_round(&bus, &pool, &outbox, settings, backlog_events).await?;
        events_total += backlog_events as u64;
        println!(
            "  round {round}: raw {:>8.0}/s   outbox live {:>7.0}/s ({} events, writers committed {:.0}/s) ratio {:.2}   backlog {:>7.0}/s ratio {:.2}",
            raw,
            run.rate,
            run.events,
            run.commit_rate,
            run.rate / raw,
            backlog,
            backlog / raw
        );
        backlog_rates.push(backlog);
        raw_rates.push(raw);
        outbox_rates.push(run.rate);
        commit_rates.push(run.commit_rate);
        latencies.extend(run.latencies_ms);
    }
    let (ins, upd, del) = settled_writes(&pool, (ins0, upd0, del0), events_total).await?;
    let raw = median(&mut raw_rates);
    let through = median(&mut outbox_rates);
    let ratio = through / raw;
    let backlog = median(&mut backlog_rates);
    let backlog_ratio = backlog / raw;
    latencies.sort_by(f64::total_cmp);
    println!("  median raw JetStream publish+ack: {raw:.0} events/s");
    println!(
        "  median outbox commit→JetStream, live writers: {through:.0} events/s (the writers committed {:.0}/s: one event per transaction bounds it)",
        median(&mut commit_rates)
    );
    println!("  median outbox relay, committed backlog:       {backlog:.0} events/s");
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
    let verdict = |ratio: f64| {
        if ratio >= GOAL_RATIO {
            "MET"
        } else {
            "NOT MET"
        }
    };
    println!(
        "  goal outbox ≥ {GOAL_RATIO}× raw, live writers:      ratio {ratio:.2} {}",
        verdict(ratio)
    );
    println!(
        "  goal outbox ≥ {GOAL_RATIO}× raw, committed backlog: ratio {backlog_ratio:.2} {}",
        verdict(backlog_ratio)
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

/// Deliveries of the outbox's subject as they arrive, read by a task of their own so that an
/// event's arrival is taken when JetStream delivers it, not when the benchmark gets to it.
struct Arrivals {
    seen: Arc<Mutex<Vec<(Uuid, Instant)>>>,
    reader: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Arrivals {
    async fn start(bus: &Bus) -> anyhow::Result<Self> {
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
        let seen: Arc<Mutex<Vec<(Uuid, Instant)>>> = Arc::default();
        let sink = seen.clone();
        let reader = tokio::spawn(async move {
            while let Some(message) = messages.next().await {
                let message = message.map_err(|e| anyhow::anyhow!("reading the stream: {e}"))?;
                let arrived = Instant::now();
                let id = message
                    .headers
                    .as_ref()
                    .and_then(|h| h.get(keel_bus::MSG_ID_HEADER))
                    .and_then(|v| Uuid::parse_str(v.as_str()).ok())
                    .context("a delivered event without its id")?;
                sink.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push((id, arrived));
            }
            bail!("the stream of messages ended")
        });
        Ok(Self { seen, reader })
    }

    /// Waits until `expected` events arrived (at most 60 s) and returns them.
    async fn wait_for(self, expected: usize) -> anyhow::Result<Vec<(Uuid, Instant)>> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let arrived = self
                .seen
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .len();
            if arrived >= expected {
                break;
            }
            if self.reader.is_finished() {
                self.reader.await.context("reader task")??;
                bail!("the reader stopped after {arrived} of {expected} events");
            }
            ensure!(
                Instant::now() < deadline,
                "only {arrived} of {expected} events arrived within 60 s"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        self.reader.abort();
        Ok(std::mem::take(
            &mut *self.seen.lock().unwrap_or_else(PoisonError::into_inner),
        ))
    }
}

fn relay(bus: &Bus, pool: &PgPool, outbox: &Outbox, settings: Settings) -> Relay {
    Relay::new(
        pool.clone(),
        outbox.clone(),
        bus.jetstream().clone(),
        RelayConfig {
            batch_size: settings.batch as i64,
            ..RelayConfig::default()
        },
    )
}

/// Writers commit events for `secs` while a relay publishes them; a JetStream consumer takes
/// each delivery's time. The rate counts from the first commit to the last delivery.
async fn outbox_round(
    bus: &Bus,
    pool: &PgPool,
    outbox: &Outbox,
    settings: Settings,
) -> anyhow::Result<OutboxRun> {
    let arrivals = Arrivals::start(bus).await?;
    let stop = CancellationToken::new();
    let relay_task = tokio::spawn(relay(bus, pool, outbox, settings).run(stop.clone()));
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
    let committed = std::mem::take(&mut *committed.lock().unwrap_or_else(PoisonError::into_inner));
    let commit_rate = committed.len() as f64 / started.elapsed().as_secs_f64();
    let arrived = arrivals.wait_for(committed.len()).await?;
    stop.cancel();
    relay_task.await.context("relay task")?;
    ensure!(
        outbox.pending(pool).await? == 0,
        "events were left in the outbox"
    );
    let mut last = started;
    let latencies_ms = arrived
        .iter()
        .map(|(id, arrived)| {
            last = last.max(*arrived);
            // A delivery can beat the writer's bookkeeping by microseconds: count it as 0.
            let committed_at = committed.get(id).copied().unwrap_or(*arrived);
            arrived
                .saturating_duration_since(committed_at)
                .as_secs_f64()
                * 1e3
        })
        .collect();
    Ok(OutboxRun {
        events: committed.len() as u64,
        rate: committed.len() as f64 / last.duration_since(started).as_secs_f64(),
        commit_rate,
        latencies_ms,
    })
}

/// The relay alone: `events` already committed (500 to a transaction, untimed), then a relay
/// starts; returns events/s from its start to the last delivery. Unlike [`outbox_round`] this
/// is not bounded by how fast PostgreSQL commits one-event transactions.
async fn backlog_round(
    bus: &Bus,
    pool: &PgPool,
    outbox: &Outbox,
    settings: Settings,
    events: usize,
) -> anyhow::Result<f64> {
    for chunk in 0..events.div_ceil(500) {
        let mut tx = pool.begin().await?;
        for n in chunk * 500..((chunk + 1) * 500).min(events) {
            let key = format!("instance-{}", n % settings.keys);
            let message = OutboxMessage::new(key, "keel.bench.outbox", vec![0; 200]);
            outbox.enqueue(&mut tx, &message).await?;
        }
        tx.commit().await?;
    }
    let arrivals = Arrivals::start(bus).await?;
    let stop = CancellationToken::new();
    let started = Instant::now();
    let relay_task = tokio::spawn(relay(bus, pool, outbox, settings).run(stop.clone()));
    let arrived = arrivals.wait_for(events).await?;
    stop.cancel();
    relay_task.await.context("relay task")?;
    let last = arrived.iter().map(|(_, at)| *at).max().unwrap_or(started);
    Ok(events as f64 / last.duration_since(started).as_secs_f64())
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
