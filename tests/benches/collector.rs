//! The collector's benchmarks, each beside its peer measured in the same run:
//!
//! 1. **One database** (`single`): PostgreSQL with 5,000 distinct statements in
//!    pg_stat_statements and 100,000 rows of history. One steady scrape cycle (CollectNow end
//!    to end, over gRPC) and the first one of a new target, against a scrape of Debian's
//!    `prometheus-postgres-exporter` with the pg_stat_statements query (Debian's example with
//!    PG13+ column names and a `toplevel` label, given through `--extend.query-path`) on the
//!    same database, and against the raw `pg_stat_statements(false)` read the collector does;
//!    the process's peak RSS; where the server's time went (pg_stat_statements of the target
//!    and of the state store over the measured rounds). Then Redis with 100,000 keys:
//!    CollectNow of the Redis target against a `prometheus-redis-exporter` scrape of the same
//!    server.
//! 2. **/metrics** (`metrics`): GETs of the fleet's `/metrics` at 100,000 series (the same
//!    database registered as several instances, every statement exported), p50 and p99, in gzip
//!    as Prometheus asks (`Accept-Encoding: gzip`) and without, each beside GETs of the same
//!    bytes from a bare HTTP server in the same process (the floor of moving them); the
//!    process's peak RSS. (The exporters of part 1 are scraped without gzip, their fastest.)
//! 3. **A fleet** (`fleet`): 200 PostgreSQL databases on the local server, each its own
//!    instance with a few statements and a light load, and 20 Redis servers, scraped every 10 s
//!    for five minutes (the issue asks for at least two; in the first two or three the
//!    process's RSS still settles, which a shorter window cannot tell from growth): the process's CPU per target-scrape and as a share of one core (pgwatch's
//!    documentation claims 100 databases on one vCPU under 20% load), scrape duration p99, the
//!    schedule's gaps, history rows written per second, RSS over the run.
//!
//! Each part runs in a process of its own (this binary again, `KEEL_BENCH_PARTS=<part>`), on
//! servers of its own: an allocator keeps what an earlier part freed, which would count in a
//! later part's RSS.
//!
//! Run with `cargo bench -p keel-e2e --bench collector`. Settings from the environment:
//! `KEEL_BENCH_PARTS` (`single,metrics,fleet`), `KEEL_BENCH_ROUNDS` (3), `KEEL_BENCH_CYCLES`
//! (10, measured scrapes of each kind per round), `KEEL_BENCH_STATEMENTS` (5000),
//! `KEEL_BENCH_SECS` (5, seconds of /metrics GETs per kind and round), `KEEL_BENCH_FLEET_SECS` (300,
//! the fleet's measured window), `KEEL_BENCH_FLEET_DATABASES` (200), `KEEL_BENCH_FLEET_REDIS`
//! (20), `KEEL_BENCH_POSTGRES_EXPORTER` and `KEEL_BENCH_REDIS_EXPORTER` (the exporters'
//! binaries, `/usr/bin/prometheus-postgres-exporter` and `/usr/bin/prometheus-redis-exporter`,
//! which `cargo xtask setup` installs). Servers come from `keel_testkit`. `RUST_LOG` (default
//! `warn,sqlx::query=error`) sets the log filter.
//!
//! `cargo test --all-targets` runs this binary without the `--bench` that `cargo bench` passes:
//! then it is a smoke test at small scale (200 statements, 2,000 history rows, one short round,
//! a fleet of 3 databases and 2 Redis servers for 5 s at a 1 s interval) that checks every
//! part works and judges no goal.
//!
//! What the figures cover:
//! - A cycle is `CollectNow` timed by the client: the claim, the read of the target, the
//!   deltas, the write of the scrape (one transaction) and the gRPC round trip. Its read part
//!   (claim to read done, the scrape's own `duration`) and the collector's
//!   `keel_collector_scrape_duration_seconds` histogram (read and write) are shown beside it.
//! - RSS is the part's process's (`/proc/self/status`): registry, collector, the host around
//!   them and the benchmark's own clients. The peak is VmHWM, reset (`/proc/self/clear_refs`)
//!   just before the part's first scrape. An exporter's peak is its process's VmHWM.
//! - CPU is utime + stime from /proc, of this process (the fleet's load runs on threads of its
//!   own, whose time is taken off) and of each exporter.
//!
//! A benchmark reports rather than asserts: goals print as MET or NOT MET. It exits non-zero
//! only when something failed (a server did not start, a scrape did not answer).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use chrono::{DateTime, Utc};
use futures::StreamExt as _;
use keel_auth::Role;
use keel_collector::CollectorConfig;
use keel_e2e::Deployment;
use keel_proto::v1::collector_service_client::CollectorServiceClient;
use keel_proto::v1::registry_service_client::RegistryServiceClient;
use keel_proto::v1::{CollectNowRequest, CreateInstanceRequest, Engine, Instance};
use keel_testkit::bench::env_number;
use keel_testkit::{TestDatabase, TestEnv};
use sqlx::{Connection as _, Executor as _, PgConnection, PgPool};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// The goals.
const GOAL_CYCLE_MS: f64 = 40.0;
const GOAL_EXPORTER_RATIO: f64 = 0.1;
const GOAL_RAW_READ_MULTIPLE: f64 = 3.0;
const GOAL_RSS_MB: f64 = 100.0;
const GOAL_METRICS_P99_MS: f64 = 5.0;
const GOAL_METRICS_SERIES: usize = 100_000;
const GOAL_FLEET_CORE_SHARE: f64 = 0.20;
/// "RSS flat over the run", made a number: the median of the window's last quarter of samples
/// at most this much above the median of its first quarter.
const FLAT_RSS_GROWTH: f64 = 0.05;

const PARTS: [&str; 3] = ["single", "metrics", "fleet"];
/// Set in the process that runs one part for a parent running several.
const CHILD_VAR: &str = "KEEL_BENCH_CHILD";
/// How a part's output marks a goal's verdict, which the parent gathers.
const GOAL_PREFIX: &str = "  goal ";

const TENANT: &str = "acme";
/// Columns of each statement table: every (table, selected column, filtered column) is a
/// statement of its own in pg_stat_statements (constants are normalised away).
const COLUMNS: usize = 10;
const SHAPES_PER_TABLE: usize = COLUMNS * COLUMNS;
/// Extra calls of the active statements while seeding: pg_stat_statements evicts the least
/// used entries when the view is full, and the statements the load runs between cycles must
/// stay put (a statement evicted and back would be a new query id, whose text the next
/// scrape reads: not a steady cycle).
const ACTIVE_EXTRA_CALLS: usize = 4;
/// How Prometheus asks for metrics.
const PROMETHEUS_ACCEPT: &str = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
/// Threads of the fleet's load, whose CPU time is not the collector's.
const LOAD_THREAD: &str = "bench-load";
/// /proc reports CPU time in USER_HZ ticks, 100 per second on Linux.
const TICK_MS: f64 = 10.0;
const EVICTED_SAMPLE: &str = "keel_pg_statements_evicted";
const DURATION_HISTOGRAM: &str = "keel_collector_scrape_duration_seconds";

/// The statements each fleet database has, run again by the load every interval.
const FLEET_STATEMENTS: [&str; 5] = [
    "SELECT v FROM fleet_t WHERE id = 7",
    "SELECT count(*) FROM fleet_t WHERE v > 10",
    "UPDATE fleet_t SET v = v + 1 WHERE id = 3",
    "SELECT id, v FROM fleet_t ORDER BY v DESC LIMIT 5",
    "INSERT INTO fleet_t (id, v) VALUES (1000, 1) ON CONFLICT (id) DO UPDATE SET v = fleet_t.v + 1",
];

#[derive(Debug, Clone)]
struct Settings {
    /// Run by `cargo test`, not `cargo bench`: small scale, short, goals not judged.
    smoke: bool,
    /// The parts to run, in order.
    parts: Vec<&'static str>,
    rounds: usize,
    cycles: usize,
    statements: usize,
    /// Statements run between two steady cycles (their deltas are what a cycle writes).
    active: usize,
    history_rows: i64,
    /// New targets whose first scrape is measured.
    first_scrapes: usize,
    redis_keys: usize,
    series: usize,
    secs: f64,
    fleet_databases: usize,
    fleet_redis: usize,
    fleet_secs: u64,
    fleet_interval: Duration,
    postgres_exporter: PathBuf,
    redis_exporter: PathBuf,
}

impl Settings {
    fn from_env() -> anyhow::Result<Self> {
        // `cargo bench` passes --bench to every bench binary, custom harness or not.
        let smoke = !std::env::args().any(|arg| arg == "--bench");
        let parts = std::env::var("KEEL_BENCH_PARTS")
            .ok()
            .filter(|p| !p.trim().is_empty())
            .unwrap_or_else(|| "single,metrics,fleet".to_owned());
        let mut chosen = Vec::new();
        for part in parts.split(',').map(str::trim) {
            let Some(known) = PARTS.iter().find(|p| **p == part) else {
                bail!("KEEL_BENCH_PARTS: no part {part:?} (single, metrics, fleet)");
            };
            if !chosen.contains(known) {
                chosen.push(*known);
            }
        }
        let statements = env_number("KEEL_BENCH_STATEMENTS", if smoke { 200 } else { 5_000 })?;
        let settings = Self {
            smoke,
            parts: chosen,
            rounds: env_number("KEEL_BENCH_ROUNDS", if smoke { 1 } else { 3 })?,
            cycles: env_number("KEEL_BENCH_CYCLES", if smoke { 2 } else { 10 })?,
            statements,
            active: (statements / 10).max(1),
            history_rows: if smoke { 2_000 } else { 100_000 },
            first_scrapes: if smoke { 1 } else { 3 },
            redis_keys: if smoke { 1_000 } else { 100_000 },
            series: if smoke { 2_000 } else { GOAL_METRICS_SERIES },
            secs: env_number("KEEL_BENCH_SECS", if smoke { 1.0 } else { 5.0 })?,
            fleet_databases: env_number("KEEL_BENCH_FLEET_DATABASES", if smoke { 3 } else { 200 })?,
            fleet_redis: env_number("KEEL_BENCH_FLEET_REDIS", if smoke { 2 } else { 20 })?,
            fleet_secs: env_number("KEEL_BENCH_FLEET_SECS", if smoke { 5 } else { 300 })?,
            fleet_interval: Duration::from_secs(if smoke { 1 } else { 10 }),
            postgres_exporter: env_path(
                "KEEL_BENCH_POSTGRES_EXPORTER",
                "/usr/bin/prometheus-postgres-exporter",
            ),
            redis_exporter: env_path(
                "KEEL_BENCH_REDIS_EXPORTER",
                "/usr/bin/prometheus-redis-exporter",
            ),
        };
        ensure!(settings.rounds > 0, "KEEL_BENCH_ROUNDS must be at least 1");
        ensure!(settings.cycles > 0, "KEEL_BENCH_CYCLES must be at least 1");
        ensure!(
            settings.statements > 0,
            "KEEL_BENCH_STATEMENTS must be at least 1"
        );
        ensure!(settings.secs > 0.0, "KEEL_BENCH_SECS must be above 0");
        ensure!(
            settings.fleet_secs > 0,
            "KEEL_BENCH_FLEET_SECS must be at least 1"
        );
        Ok(settings)
    }
}

fn env_path(name: &str, default: &str) -> PathBuf {
    std::env::var_os(name)
        .filter(|p| !p.is_empty())
        .map_or_else(|| PathBuf::from(default), PathBuf::from)
}

/// The goals' verdicts, printed where they are measured and again at the end.
#[derive(Debug, Default)]
struct Goals {
    smoke: bool,
    lines: Vec<String>,
}

impl Goals {
    fn judge(&mut self, what: &str, figure: String, met: bool) {
        let verdict = match (self.smoke, met) {
            (true, _) => "(not judged: smoke run)",
            (false, true) => "MET",
            (false, false) => "NOT MET",
        };
        let line = format!("{what}: {figure} {verdict}");
        println!("{GOAL_PREFIX}{line}");
        self.lines.push(line);
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,sqlx::query=error")),
        )
        .with_writer(std::io::stderr)
        .init();
    let settings = Settings::from_env()?;
    let child = std::env::var_os(CHILD_VAR).is_some();
    if !child {
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        println!("Keel collector benchmark");
        if settings.smoke {
            println!(
                "  SMOKE RUN (cargo test, no --bench): small scale, one short round; the figures mean nothing"
            );
        }
        println!(
            "  machine: {cores} cores, shared by the benchmark's process (registry + collector + clients), \
             PostgreSQL, NATS, Redis and the exporters"
        );
    }
    let goals = if !child && settings.parts.len() > 1 {
        each_in_its_own_process(&settings.parts).await?
    } else {
        let mut goals = Goals {
            smoke: settings.smoke,
            ..Goals::default()
        };
        for part in &settings.parts {
            match *part {
                "single" => one_database(&settings, &mut goals).await?,
                "metrics" => metrics_endpoint(&settings, &mut goals).await?,
                _ => fleet(&settings, &mut goals).await?,
            }
        }
        goals.lines
    };
    if !child {
        println!();
        println!("Goals");
        for line in &goals {
            println!("  {line}");
        }
    }
    Ok(())
}

/// Runs each part in a process of its own (this binary again, with the same arguments), so
/// that a part's RSS is its own (the allocator keeps what an earlier part freed) and each part
/// starts on fresh servers; forwards their output and returns their goal lines.
async fn each_in_its_own_process(parts: &[&str]) -> anyhow::Result<Vec<String>> {
    let program = std::env::current_exe().context("finding this benchmark's binary")?;
    let mut goals = Vec::new();
    for part in parts {
        let mut child = tokio::process::Command::new(&program)
            .args(std::env::args_os().skip(1))
            .env("KEEL_BENCH_PARTS", part)
            .env(CHILD_VAR, "1")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting part {part}"))?;
        let stdout = child.stdout.take().context("the part's output")?;
        let mut lines = BufReader::new(stdout).lines();
        while let Some(line) = lines.next_line().await? {
            println!("{line}");
            if let Some(goal) = line.strip_prefix(GOAL_PREFIX) {
                goals.push(goal.to_owned());
            }
        }
        let status = child.wait().await?;
        ensure!(status.success(), "part {part} failed ({status})");
    }
    Ok(goals)
}

// ---------------------------------------------------------------------------------------------
// Part 1: one database
// ---------------------------------------------------------------------------------------------

async fn one_database(settings: &Settings, goals: &mut Goals) -> anyhow::Result<()> {
    println!();
    println!(
        "1. One database: {} statements, {} rows of history; Redis with {} keys",
        settings.statements, settings.history_rows, settings.redis_keys
    );
    ensure_program(&settings.postgres_exporter, "prometheus-postgres-exporter")?;
    ensure_program(&settings.redis_exporter, "prometheus-redis-exporter")?;
    // Scheduled scrapes an hour apart: the benchmark's CollectNow calls are the cycles.
    let keel = Deployment::start_with(CollectorConfig {
        interval: Duration::from_secs(3600),
        ..CollectorConfig::default()
    })
    .await?;
    let key = keel.key(TENANT, Role::Operator, "bench").await?;
    let mut c = clients(&keel, &key).await?;
    let state = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&keel.database_url)
        .await
        .context("connecting to the state store")?;
    let db = keel.env.database().await?;
    let mut target = PgConnection::connect(&db.url).await?;
    let version: String = sqlx::query_scalar("SHOW server_version")
        .fetch_one(&mut target)
        .await?;
    let pgss_max: String = sqlx::query_scalar("SHOW pg_stat_statements.max")
        .fetch_one(&mut target)
        .await?;

    let seeding = Instant::now();
    seed_statements(&mut target, settings.statements, settings.active).await?;
    let counts = statement_counts(&mut target).await?;
    println!(
        "  PostgreSQL {version}; seeded {} statement shapes in {:.1} s: pg_stat_statements holds {} entries \
         (pg_stat_statements.max = {pgss_max}, server-wide), {} of them in the target database, {} evicted so far",
        settings.statements,
        seeding.elapsed().as_secs_f64(),
        counts.all,
        counts.database,
        counts.dealloc
    );

    // From here on the peak covers the collector's work on this database.
    let rss_idle = rss_mb();
    let peak_reset = reset_peak_rss();
    let shop = register(&mut c, "shop", Engine::Postgres, &db.url).await?;
    let shop_first = first_collect(&mut c, &shop).await?;
    let history = seed_history(&state, &shop, settings.history_rows).await?;
    println!(
        "  history: {history} statement-delta rows for the target (earlier 15 s cycles of every statement), then ANALYZE"
    );
    // First scrapes of new targets (the same database): every query id is new, so every text
    // is read and stored.
    let mut firsts = Vec::new();
    if shop_first.first {
        println!(
            "  first scrape of the target (empty history): {:.1} ms (read {:.1} ms)",
            ms(shop_first.e2e),
            ms(shop_first.read)
        );
    }
    for i in 1..=settings.first_scrapes {
        let id = register(
            &mut c,
            &format!("shop-first-{i}"),
            Engine::Postgres,
            &db.url,
        )
        .await?;
        let cycle = first_collect(&mut c, &id).await?;
        if cycle.first {
            firsts.push(cycle);
        } else {
            println!(
                "  (shop-first-{i}: a scheduled scrape came first, its CollectNow was not a first scrape; not counted)"
            );
        }
    }

    // Warm-up: every query this part runs, once, so that their entries exist before the
    // measured cycles (a new entry is a new text to read, and evicts others from a full view).
    let dir = tempfile::tempdir().context("a scratch directory")?;
    let queries = dir.path().join("queries.yaml");
    std::fs::write(&queries, exporter_queries())?;
    let dsn = format!("{}?sslmode=disable", db.url);
    let pg_exporter = Exporter::start(
        "prometheus-postgres-exporter",
        &settings.postgres_exporter,
        |addr| {
            vec![
                format!("--web.listen-address={addr}"),
                format!("--extend.query-path={}", queries.display()),
                "--log.level=warn".to_owned(),
            ]
        },
        &[("DATA_SOURCE_NAME", dsn.as_str())],
        dir.path(),
    )
    .await?;
    let mut exporter_http = Http::new(pg_exporter.addr);
    exporter_http.get("/metrics").await?;
    raw_read(&mut target).await?;
    raw_read_server_ms(&mut target).await?;
    workload(&mut target, settings.active).await?;
    let databases = [db.name.as_str(), database_name(&keel.database_url)?];
    statement_stats(&mut target, &databases).await?;
    statement_counts(&mut target).await?;
    let mut own_http = Http::new(keel.http);
    own_http.get("/metrics").await?;
    for _ in 0..2 {
        collect_ok(&mut c, &shop).await?;
    }
    // Scheduled first scrapes of the new targets, if they were claimed before their CollectNow,
    // are over by now.
    tokio::time::sleep(Duration::from_secs(3)).await;

    let before = statement_stats(&mut target, &databases).await?;
    let texts_before = stored_texts(&state, &shop).await?;
    let counts_before = statement_counts(&mut target).await?;
    let histogram_before = histogram_sum_count(&own_http.get_text("/metrics").await?, "postgres");
    let exporter_cpu_before = pg_exporter.cpu_ticks();
    let mut cycle_rounds = Vec::new();
    let mut read_rounds = Vec::new();
    let mut exporter_rounds = Vec::new();
    let mut raw_rounds = Vec::new();
    let mut raw_server_rounds = Vec::new();
    let mut all_cycles = Vec::new();
    let mut cycle_ticks = 0u64;
    let mut exporter_series = 0;
    let mut exporter_bytes = 0;
    let mut entries_seen = Vec::new();
    for round in 0..settings.rounds {
        // Rotate the order, so that drift on a noisy machine favours none of the three.
        let mut line = format!("  round {}/{}:", round + 1, settings.rounds);
        for step in 0..3 {
            match (step + round) % 3 {
                0 => {
                    let mut e2e = Vec::new();
                    let mut read = Vec::new();
                    for _ in 0..settings.cycles {
                        workload(&mut target, settings.active).await?;
                        let ticks = process_ticks();
                        let cycle = collect_ok(&mut c, &shop).await?;
                        cycle_ticks += process_ticks().saturating_sub(ticks);
                        ensure!(!cycle.first, "a steady cycle had no delta base: {cycle:?}");
                        e2e.push(ms(cycle.e2e));
                        read.push(ms(cycle.read));
                        entries_seen.extend(cycle.statements);
                        all_cycles.push(ms(cycle.e2e));
                    }
                    line.push_str(&format!(
                        " cycle {:.1} ms (read {:.1})",
                        median(&e2e),
                        median(&read)
                    ));
                    cycle_rounds.push(median(&e2e));
                    read_rounds.push(median(&read));
                }
                1 => {
                    let mut times = Vec::new();
                    for _ in 0..settings.cycles {
                        workload(&mut target, settings.active).await?;
                        let started = Instant::now();
                        let body = exporter_http.get("/metrics").await?;
                        times.push(ms(started.elapsed()));
                        exporter_series = series_lines(&body);
                        exporter_bytes = body.len();
                    }
                    line.push_str(&format!(" · exporter {:.1} ms", median(&times)));
                    exporter_rounds.push(median(&times));
                }
                _ => {
                    let mut times = Vec::new();
                    let mut server = Vec::new();
                    for _ in 0..settings.cycles {
                        times.push(raw_read(&mut target).await?);
                        server.push(raw_read_server_ms(&mut target).await?);
                    }
                    line.push_str(&format!(
                        " · raw read {:.1} ms (server {:.1} ms)",
                        median(&times),
                        median(&server)
                    ));
                    raw_rounds.push(median(&times));
                    raw_server_rounds.push(median(&server));
                }
            }
        }
        println!("{line}");
    }
    let peak = peak_rss_mb();
    let measured = settings.rounds * settings.cycles;
    let exporter_cpu = pg_exporter
        .cpu_ticks()
        .zip(exporter_cpu_before)
        .map(|(after, before)| after.saturating_sub(before));
    let exporter_peak = pg_exporter.peak_rss_mb();
    let histogram_after = histogram_sum_count(&own_http.get_text("/metrics").await?, "postgres");
    let counts_after = statement_counts(&mut target).await?;
    let texts_after = stored_texts(&state, &shop).await?;
    let after = statement_stats(&mut target, &databases).await?;
    pg_exporter.stop().await;

    let cycle = median(&cycle_rounds);
    let read = median(&read_rounds);
    let exporter = median(&exporter_rounds);
    let raw = median(&raw_rounds);
    let raw_server = median(&raw_server_rounds);
    let (hist_sum, hist_count) = (
        histogram_after.0 - histogram_before.0,
        histogram_after.1 - histogram_before.1,
    );
    println!();
    println!(
        "  pg_stat_statements during the cycles: {}..{} entries of the target database ({} server-wide, max {pgss_max}); \
         {} evicted meanwhile; {} new texts stored",
        entries_seen.iter().copied().fold(f64::INFINITY, f64::min),
        entries_seen.iter().copied().fold(0.0, f64::max),
        counts_after.all,
        counts_after.dealloc - counts_before.dealloc,
        texts_after - texts_before
    );
    println!(
        "  steady cycle (CollectNow end to end, median of {} rounds of {}): {cycle:.1} ms; p99 of all {measured}: {:.1} ms",
        settings.rounds,
        settings.cycles,
        quantile(&all_cycles, 0.99)
    );
    println!(
        "    of which the read (claim to read done, the scrape's duration): {read:.1} ms; \
         {DURATION_HISTOGRAM} (read + write) mean {:.1} ms over {hist_count:.0} scrapes; \
         the rest is the claim, the deltas and the gRPC round trip",
        if hist_count > 0.0 {
            hist_sum / hist_count * 1e3
        } else {
            f64::NAN
        }
    );
    println!(
        "    {} active statements ran between cycles, so a cycle writes about as many deltas",
        settings.active
    );
    println!(
        "    CPU of this process per cycle: {:.1} ms (ticks of 10 ms summed over the calls)",
        cycle_ticks as f64 * TICK_MS / measured as f64
    );
    if firsts.is_empty() {
        println!(
            "  first scrape of a new target: not measured (the scheduler was first every time)"
        );
    } else {
        let e2e: Vec<f64> = firsts.iter().map(|f| ms(f.e2e)).collect();
        let read: Vec<f64> = firsts.iter().map(|f| ms(f.read)).collect();
        println!(
            "  first scrape of a new target (connect, every text read and stored; median of {}): {:.1} ms (read {:.1} ms)",
            firsts.len(),
            median(&e2e),
            median(&read)
        );
    }
    println!(
        "  prometheus-postgres-exporter scrape (median): {exporter:.1} ms, {exporter_series} series, {:.1} MB; \
         peak RSS {}; CPU per scrape {}",
        exporter_bytes as f64 / 1e6,
        mb_text(exporter_peak),
        exporter_cpu.map_or_else(
            || "-".to_owned(),
            |t| format!("{:.0} ms", t as f64 * TICK_MS / measured as f64)
        )
    );
    println!(
        "  raw read, the collector's pg_stat_statements(false) query (median): {raw:.1} ms round trip, {raw_server:.1} ms on the server (EXPLAIN ANALYZE, TIMING OFF)"
    );
    println!(
        "  RSS of this process: {} before the first scrape, peak {} {}",
        mb_text(rss_idle),
        mb_text(peak),
        if peak_reset {
            "(VmHWM since the first scrape)"
        } else {
            "(VmHWM since the process started: clear_refs refused)"
        }
    );
    goals.judge(
        "one database, steady cycle",
        format!("{cycle:.1} ms (goal <= {GOAL_CYCLE_MS} ms)"),
        cycle <= GOAL_CYCLE_MS,
    );
    let ratio = cycle / exporter;
    goals.judge(
        "one database, cycle / postgres_exporter scrape",
        format!("{ratio:.3} (goal <= {GOAL_EXPORTER_RATIO})"),
        ratio <= GOAL_EXPORTER_RATIO,
    );
    let multiple = cycle / raw_server;
    goals.judge(
        "one database, cycle / raw pg_stat_statements(false) read on the server",
        format!(
            "{multiple:.1}x (goal <= {GOAL_RAW_READ_MULTIPLE}x; against the round trip {:.1}x)",
            cycle / raw
        ),
        multiple <= GOAL_RAW_READ_MULTIPLE,
    );
    let peak_mb = peak.unwrap_or(f64::NAN);
    goals.judge(
        "one database, peak RSS",
        format!("{peak_mb:.1} MB (goal <= {GOAL_RSS_MB} MB)"),
        peak_mb <= GOAL_RSS_MB,
    );
    print_profile(&before, &after, &databases, measured);

    redis(settings, goals, &keel, &mut c, dir.path()).await?;
    keel.stop().await
}

/// Creates the statement tables and runs every shape once, the active ones a few more times.
async fn seed_statements(
    conn: &mut PgConnection,
    statements: usize,
    active: usize,
) -> anyhow::Result<()> {
    let columns: Vec<String> = (0..COLUMNS).map(|c| format!("c{c} int")).collect();
    for table in 0..statements.div_ceil(SHAPES_PER_TABLE) {
        conn.execute(format!("CREATE TABLE bench_s{table} ({})", columns.join(", ")).as_str())
            .await?;
    }
    for n in 0..statements {
        conn.execute(statement(n).as_str()).await?;
    }
    for _ in 0..ACTIVE_EXTRA_CALLS {
        workload(conn, active).await?;
    }
    Ok(())
}

/// Statement shape `n`.
fn statement(n: usize) -> String {
    let (table, select, filter) = (n / SHAPES_PER_TABLE, n / COLUMNS % COLUMNS, n % COLUMNS);
    format!(
        "SELECT c{select} FROM bench_s{table} WHERE c{filter} = {}",
        n % 97
    )
}

/// The load between two cycles: the first `active` shapes, once each.
async fn workload(conn: &mut PgConnection, active: usize) -> anyhow::Result<()> {
    for n in 0..active {
        conn.execute(statement(n).as_str()).await?;
    }
    Ok(())
}

#[derive(Debug, Clone, Copy)]
struct StatementCounts {
    database: i64,
    all: i64,
    dealloc: i64,
}

async fn statement_counts(conn: &mut PgConnection) -> anyhow::Result<StatementCounts> {
    let (database, all, dealloc): (i64, i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())), \
                count(*), (SELECT dealloc FROM pg_stat_statements_info) \
         FROM pg_stat_statements(false)",
    )
    .fetch_one(conn)
    .await?;
    Ok(StatementCounts {
        database,
        all,
        dealloc,
    })
}

/// `rows` statement deltas for the target, as earlier 15 s cycles of its stored statements
/// wrote them.
async fn seed_history(state: &PgPool, id: &str, rows: i64) -> anyhow::Result<u64> {
    let inserted = sqlx::query(
        "INSERT INTO collector.statement_deltas (instance_id, at, query_id, toplevel, calls, total_exec_ms, \
           rows, shared_blks_hit, shared_blks_read, temp_blks_written, wal_bytes) \
         SELECT $1::uuid, now() - (n / q.cnt + 1) * interval '15 seconds', q.ids[(n % q.cnt + 1)::int], true, \
                1 + n % 5, 0.05 * (1 + n % 13), n % 10, 10, n % 3, 0, 0 \
         FROM (SELECT array_agg(query_id) AS ids, count(*) AS cnt FROM collector.query_texts \
               WHERE instance_id = $1::uuid) q, \
              generate_series(0, $2 - 1) AS n \
         WHERE q.cnt > 0",
    )
    .bind(id)
    .bind(rows)
    .execute(state)
    .await
    .context("seeding history")?
    .rows_affected();
    ensure!(
        inserted > 0,
        "no history seeded: the first scrape stored no query texts"
    );
    sqlx::query("ANALYZE collector.statement_deltas")
        .execute(state)
        .await?;
    Ok(inserted)
}

async fn stored_texts(state: &PgPool, id: &str) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar(
        "SELECT count(*) FROM collector.query_texts WHERE instance_id = $1::uuid",
    )
    .bind(id)
    .fetch_one(state)
    .await?)
}

/// The collector's pg_stat_statements query, in a subquery of its own so that its entry in
/// pg_stat_statements is not the collector's (the planner flattens it: the same plan).
const RAW_READ: &str = "SELECT * FROM (SELECT userid::int8 AS userid, queryid, toplevel, calls, total_exec_time, rows, \
       shared_blks_hit, shared_blks_read, temp_blks_written, wal_bytes::int8 AS wal_bytes \
     FROM pg_stat_statements(false) \
     WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) \
       AND queryid IS NOT NULL) AS raw_read";

/// The raw read's round trip, rows decoded as the collector's driver does, in ms.
async fn raw_read(conn: &mut PgConnection) -> anyhow::Result<f64> {
    let started = Instant::now();
    let rows = sqlx::query(RAW_READ).fetch_all(&mut *conn).await?;
    let took = ms(started.elapsed());
    ensure!(
        !rows.is_empty(),
        "pg_stat_statements(false) returned nothing"
    );
    Ok(took)
}

/// The raw read's execution time on the server, in ms.
async fn raw_read_server_ms(conn: &mut PgConnection) -> anyhow::Result<f64> {
    let plan: serde_json::Value = sqlx::query_scalar(&format!(
        "EXPLAIN (ANALYZE, TIMING OFF, FORMAT JSON) {RAW_READ}"
    ))
    .fetch_one(&mut *conn)
    .await?;
    plan.get(0)
        .and_then(|p| p.get("Execution Time"))
        .and_then(serde_json::Value::as_f64)
        .with_context(|| format!("no Execution Time in {plan}"))
}

/// Debian's example pg_stat_statements query for postgres_exporter, with the column names of
/// PostgreSQL 13 and later (`total_exec_time`, …), and `toplevel` as a label: with
/// `pg_stat_statements.track = all` one query id can be a top-level entry and a nested one,
/// which without it are two series of the same labels, and the exporter answers HTTP 500.
fn exporter_queries() -> String {
    let query = "SELECT t2.rolname, t3.datname, queryid, toplevel, calls, total_exec_time / 1000 as total_time_seconds, \
        min_exec_time / 1000 as min_time_seconds, max_exec_time / 1000 as max_time_seconds, \
        mean_exec_time / 1000 as mean_time_seconds, stddev_exec_time / 1000 as stddev_time_seconds, rows, \
        shared_blks_hit, shared_blks_read, shared_blks_dirtied, shared_blks_written, local_blks_hit, \
        local_blks_read, local_blks_dirtied, local_blks_written, temp_blks_read, temp_blks_written, \
        blk_read_time / 1000 as blk_read_time_seconds, blk_write_time / 1000 as blk_write_time_seconds \
        FROM pg_stat_statements t1 JOIN pg_roles t2 ON (t1.userid=t2.oid) JOIN pg_database t3 ON (t1.dbid=t3.oid) \
        WHERE t2.rolname != 'rdsadmin'";
    let mut yaml =
        format!("pg_stat_statements:\n  query: \"{query}\"\n  master: true\n  metrics:\n");
    let columns = [
        ("rolname", "LABEL"),
        ("datname", "LABEL"),
        ("queryid", "LABEL"),
        ("toplevel", "LABEL"),
        ("calls", "COUNTER"),
        ("total_time_seconds", "COUNTER"),
        ("min_time_seconds", "GAUGE"),
        ("max_time_seconds", "GAUGE"),
        ("mean_time_seconds", "GAUGE"),
        ("stddev_time_seconds", "GAUGE"),
        ("rows", "COUNTER"),
        ("shared_blks_hit", "COUNTER"),
        ("shared_blks_read", "COUNTER"),
        ("shared_blks_dirtied", "COUNTER"),
        ("shared_blks_written", "COUNTER"),
        ("local_blks_hit", "COUNTER"),
        ("local_blks_read", "COUNTER"),
        ("local_blks_dirtied", "COUNTER"),
        ("local_blks_written", "COUNTER"),
        ("temp_blks_read", "COUNTER"),
        ("temp_blks_written", "COUNTER"),
        ("blk_read_time_seconds", "COUNTER"),
        ("blk_write_time_seconds", "COUNTER"),
    ];
    for (name, usage) in columns {
        yaml.push_str(&format!(
            "    - {name}:\n        usage: \"{usage}\"\n        description: \"{name}\"\n"
        ));
    }
    yaml
}

type StatementId = (i64, i64, i64, bool);

#[derive(Debug, Clone)]
struct StatementStat {
    database: String,
    calls: i64,
    total_ms: f64,
    query: String,
}

/// Every pg_stat_statements entry of `databases`, with its text.
async fn statement_stats(
    conn: &mut PgConnection,
    databases: &[&str],
) -> anyhow::Result<HashMap<StatementId, StatementStat>> {
    type Row = (String, i64, i64, i64, bool, i64, f64, String);
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT d.datname::text, s.dbid::int8, s.userid::int8, s.queryid, s.toplevel, s.calls, \
                s.total_exec_time, coalesce(left(regexp_replace(s.query, '\\s+', ' ', 'g'), 140), '') \
         FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid \
         WHERE d.datname = ANY($1) AND s.queryid IS NOT NULL",
    )
    .bind(databases)
    .fetch_all(conn)
    .await
    .context("reading pg_stat_statements")?;
    Ok(rows
        .into_iter()
        .map(
            |(database, dbid, userid, queryid, toplevel, calls, total_ms, query)| {
                (
                    (dbid, userid, queryid, toplevel),
                    StatementStat {
                        database,
                        calls,
                        total_ms,
                        query,
                    },
                )
            },
        )
        .collect())
}

/// Where the server's time went during the measured rounds: the target's statements (the
/// collector's reads, the exporter's, the raw reads; the load's shapes left out) and the
/// state store's (the collector's writes, the exposition's refresh, the relay).
fn print_profile(
    before: &HashMap<StatementId, StatementStat>,
    after: &HashMap<StatementId, StatementStat>,
    databases: &[&str],
    cycles: usize,
) {
    for (database, what) in databases.iter().zip(["target database", "state store"]) {
        let mut rows: Vec<(f64, i64, &str)> = after
            .iter()
            .filter(|(_, s)| s.database == *database && !s.query.contains("bench_s"))
            .filter_map(|(id, s)| {
                let (calls, total) = before.get(id).map_or((0, 0.0), |b| (b.calls, b.total_ms));
                let calls = s.calls - calls;
                (calls > 0).then_some((s.total_ms - total, calls, s.query.as_str()))
            })
            .collect();
        rows.sort_by(|a, b| b.0.total_cmp(&a.0));
        println!(
            "  server time in the {what} during the rounds ({cycles} cycles; pg_stat_statements, top 10):"
        );
        println!(
            "  {:>9} {:>7} {:>9}  statement",
            "total ms", "calls", "mean ms"
        );
        for (total, calls, query) in rows.iter().take(10) {
            println!(
                "  {total:>9.1} {calls:>7} {:>9.3}  {query}",
                total / *calls as f64
            );
        }
    }
}

/// Part 1's Redis: CollectNow of a Redis target against a redis_exporter scrape of the same
/// server, in the same deployment.
async fn redis(
    settings: &Settings,
    goals: &mut Goals,
    keel: &Deployment,
    c: &mut Clients,
    dir: &Path,
) -> anyhow::Result<()> {
    let url = keel.env.redis_url().await?;
    let loading = Instant::now();
    load_keys(&url, settings.redis_keys).await?;
    let exporter = Exporter::start(
        "prometheus-redis-exporter",
        &settings.redis_exporter,
        |addr| {
            vec![
                "-redis.addr".to_owned(),
                url.clone(),
                "-web.listen-address".to_owned(),
                addr.to_string(),
            ]
        },
        &[],
        dir,
    )
    .await?;
    let mut http = Http::new(exporter.addr);
    http.get("/metrics").await?;
    let cache = register(c, "cache", Engine::Redis, &url).await?;
    first_collect(c, &cache).await?;
    collect_ok(c, &cache).await?;
    println!(
        "  Redis: {} keys loaded in {:.1} s",
        settings.redis_keys,
        loading.elapsed().as_secs_f64()
    );
    let mut collector_rounds = Vec::new();
    let mut read_rounds = Vec::new();
    let mut exporter_rounds = Vec::new();
    let mut exporter_series = 0;
    for round in 0..settings.rounds {
        let mut line = format!("  round {}/{}:", round + 1, settings.rounds);
        for step in 0..2 {
            if (step + round) % 2 == 0 {
                let mut e2e = Vec::new();
                let mut read = Vec::new();
                for _ in 0..settings.cycles {
                    let cycle = collect_ok(c, &cache).await?;
                    e2e.push(ms(cycle.e2e));
                    read.push(ms(cycle.read));
                }
                line.push_str(&format!(
                    " cycle {:.2} ms (read {:.2})",
                    median(&e2e),
                    median(&read)
                ));
                collector_rounds.push(median(&e2e));
                read_rounds.push(median(&read));
            } else {
                let mut times = Vec::new();
                for _ in 0..settings.cycles {
                    let started = Instant::now();
                    let body = http.get("/metrics").await?;
                    times.push(ms(started.elapsed()));
                    exporter_series = series_lines(&body);
                }
                line.push_str(&format!(" · exporter {:.2} ms", median(&times)));
                exporter_rounds.push(median(&times));
            }
        }
        println!("{line}");
    }
    let exporter_peak = exporter.peak_rss_mb();
    exporter.stop().await;
    let cycle = median(&collector_rounds);
    let peer = median(&exporter_rounds);
    println!(
        "  Redis cycle (CollectNow end to end, median): {cycle:.2} ms, of which the read {:.2} ms; \
         prometheus-redis-exporter scrape: {peer:.2} ms, {exporter_series} series, peak RSS {}",
        median(&read_rounds),
        mb_text(exporter_peak)
    );
    goals.judge(
        "Redis, cycle vs redis_exporter scrape",
        format!(
            "{cycle:.2} ms vs {peer:.2} ms, ratio {:.2} (goal <= 1)",
            cycle / peer
        ),
        cycle <= peer,
    );
    Ok(())
}

async fn load_keys(url: &str, keys: usize) -> anyhow::Result<()> {
    let client = redis::Client::open(url)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let batch = 1_000;
    for start in (0..keys).step_by(batch) {
        let mut pipe = redis::pipe();
        for k in start..(start + batch).min(keys) {
            pipe.cmd("SET")
                .arg(format!("bench:key:{k}"))
                .arg(format!("value-{k}"))
                .ignore();
        }
        let () = pipe.query_async(&mut conn).await?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Part 2: /metrics at 100,000 series
// ---------------------------------------------------------------------------------------------

async fn metrics_endpoint(settings: &Settings, goals: &mut Goals) -> anyhow::Result<()> {
    println!();
    println!(
        "2. /metrics at {} series: GETs as Prometheus sends them (OpenMetrics, with and without gzip), one at a time, for {} s each per round",
        settings.series, settings.secs
    );
    // Every statement one by one on /metrics, and no series budget in the way: the series
    // come from statements.
    let keel = Deployment::start_with(CollectorConfig {
        interval: Duration::from_secs(3600),
        statements_exported: 1_000_000,
        series_per_target: 1_000_000,
        ..CollectorConfig::default()
    })
    .await?;
    let key = keel.key(TENANT, Role::Operator, "bench").await?;
    let mut c = clients(&keel, &key).await?;
    let db = keel.env.database().await?;
    let mut conn = PgConnection::connect(&db.url).await?;
    seed_statements(&mut conn, settings.statements, settings.active).await?;
    conn.close().await?;
    let rss_idle = rss_mb();
    let peak_reset = reset_peak_rss();
    let first = register(&mut c, "wide-1", Engine::Postgres, &db.url).await?;
    let per_target = first_collect(&mut c, &first).await?.metrics.max(1);
    let targets = settings.series.div_ceil(per_target).clamp(1, 64);
    for i in 2..=targets {
        let id = register(&mut c, &format!("wide-{i}"), Engine::Postgres, &db.url).await?;
        first_collect(&mut c, &id).await?;
    }
    // The exposition is re-rendered every metrics_refresh (5 s): wait for the one that has
    // every target.
    let mut http = Http::new(keel.http);
    let deadline = Instant::now() + Duration::from_secs(60);
    let (series, bytes) = loop {
        let body = http.get("/metrics").await?;
        let series = series_lines(&body);
        if series >= settings.series {
            break (series, body.len());
        }
        ensure!(
            Instant::now() < deadline,
            "/metrics has {series} series after 60 s, not {}",
            settings.series
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let rss_scraped = rss_mb();
    // One more refresh with every target, GETs going on, before the peak is read: the bare
    // server below holds a copy of the bytes, which is not the collector's.
    let settle = Instant::now();
    while settle.elapsed()
        < Duration::from_secs(6).min(Duration::from_secs_f64(settings.secs * 6.0))
    {
        http.get("/metrics").await?;
    }
    let peak = peak_rss_mb();
    println!(
        "  {targets} instances of the statements database, about {per_target} series each: /metrics serves {series} series, {:.1} MB",
        bytes as f64 / 1e6
    );
    println!(
        "  RSS of this process: {} before the first scrape, {} once every target was scraped, peak {} serving \
         them {} (the client's body buffer of {:.1} MB included)",
        mb_text(rss_idle),
        mb_text(rss_scraped),
        mb_text(peak),
        if peak_reset {
            "(VmHWM since the first scrape)"
        } else {
            "(VmHWM since the process started)"
        },
        bytes as f64 / 1e6
    );
    // Prometheus asks for gzip; other clients (curl, promtool) get the bytes as they are. Each
    // beside its floor: the same bytes from a bare HTTP server in this process (Content-Length,
    // one write), fetched by the same client in the same rounds.
    let mut gzip = Http::gzip(keel.http);
    let plain_body = http.get("/metrics").await?;
    let gzip_body = gzip.get("/metrics").await?;
    ensure!(
        gzip.last_gzip,
        "/metrics answered a gzip request without gzip"
    );
    let gzip_series = series_lines(&gunzip(&gzip_body)?);
    ensure!(
        gzip_series.abs_diff(series) * 100 <= series,
        "/metrics in gzip has {gzip_series} series, not about {series}"
    );
    println!(
        "  in gzip (as Prometheus asks, Accept-Encoding: gzip): {:.2} MB, {gzip_series} series",
        gzip_body.len() as f64 / 1e6
    );
    let (plain_len, gzip_len) = (plain_body.len(), gzip_body.len());
    let (bare_plain_addr, bare_plain) = bare_server(plain_body, None).await?;
    let (bare_gzip_addr, bare_gzip) = bare_server(gzip_body, Some("gzip")).await?;
    let mut clients = [
        ("keel gzip", gzip, gzip_len),
        ("bare gzip", Http::gzip(bare_gzip_addr), gzip_len),
        ("keel identity", http, plain_len),
        ("bare identity", Http::new(bare_plain_addr), plain_len),
    ];
    let mut figures: Vec<Vec<(f64, f64)>> = vec![Vec::new(); clients.len()];
    let mut all_gzip = Vec::new();
    for round in 0..settings.rounds {
        println!("  round {}/{}:", round + 1, settings.rounds);
        for step in 0..clients.len() {
            // Rotate the order, so that drift on a noisy machine favours none of them.
            let which = (step + round) % clients.len();
            let (name, client, len) = &mut clients[which];
            let mut times = Vec::new();
            let deadline = Instant::now() + Duration::from_secs_f64(settings.secs);
            while Instant::now() < deadline && times.len() < 20_000 {
                let started = Instant::now();
                let body = client.get("/metrics").await?;
                times.push(ms(started.elapsed()));
                ensure!(
                    body.len() > *len / 2,
                    "{name}: /metrics shrank to {} bytes",
                    body.len()
                );
            }
            let (p50, p99) = (quantile(&times, 0.5), quantile(&times, 0.99));
            println!(
                "    {name:<13} {:>5} GETs  p50 {p50:>6.2} ms  p99 {p99:>6.2} ms  max {:>7.2} ms",
                times.len(),
                quantile(&times, 1.0)
            );
            figures[which].push((p50, p99));
            if which == 0 {
                all_gzip.extend(times);
            }
        }
    }
    bare_plain.abort();
    bare_gzip.abort();
    let medians: Vec<(f64, f64)> = figures
        .iter()
        .map(|rounds| {
            (
                median(&rounds.iter().map(|f| f.0).collect::<Vec<_>>()),
                median(&rounds.iter().map(|f| f.1).collect::<Vec<_>>()),
            )
        })
        .collect();
    println!("  medians of {} rounds:", settings.rounds);
    for ((name, _, len), (p50, p99)) in clients.iter().zip(&medians) {
        println!(
            "    {name:<13} {:>6.2} MB  p50 {p50:>6.2} ms  p99 {p99:>6.2} ms",
            *len as f64 / 1e6
        );
    }
    let (p50, p99) = medians[0];
    let (plain_p50, plain_p99) = medians[2];
    println!(
        "  /metrics / bare server: gzip p50 {:.2}x p99 {:.2}x, identity p50 {:.2}x p99 {:.2}x; \
         p99 of all {} gzip GETs {:.2} ms; the exposition was re-rendered (and compressed) every 5 s meanwhile, as in production",
        p50 / medians[1].0,
        p99 / medians[1].1,
        plain_p50 / medians[3].0,
        plain_p99 / medians[3].1,
        all_gzip.len(),
        quantile(&all_gzip, 0.99)
    );
    println!(
        "  RSS of this process at the end: {}, peak {} (with the bare servers' copies of the bytes)",
        mb_text(rss_mb()),
        mb_text(peak_rss_mb()),
    );
    goals.judge(
        &format!("/metrics p99 at {series} series, as Prometheus asks (gzip)"),
        format!("{p99:.2} ms (goal <= {GOAL_METRICS_P99_MS} ms; without gzip {plain_p99:.2} ms)"),
        p99 <= GOAL_METRICS_P99_MS && series >= GOAL_METRICS_SERIES,
    );
    let peak_mb = peak.unwrap_or(f64::NAN);
    goals.judge(
        &format!("peak RSS serving {series} series"),
        format!("{peak_mb:.1} MB (goal <= {GOAL_RSS_MB} MB)"),
        peak_mb <= GOAL_RSS_MB,
    );
    keel.stop().await
}

/// A bare HTTP/1.1 server on loopback that answers every request with `body` (in
/// `content_encoding`, if any).
async fn bare_server(
    body: Vec<u8>,
    content_encoding: Option<&'static str>,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let body = std::sync::Arc::new(body);
    let server = tokio::spawn(async move {
        let mut connections = tokio::task::JoinSet::new();
        while let Ok((socket, _)) = listener.accept().await {
            let body = body.clone();
            connections.spawn(async move {
                let mut socket = BufReader::new(socket);
                let encoding = content_encoding
                    .map(|e| format!("Content-Encoding: {e}\r\n"))
                    .unwrap_or_default();
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/openmetrics-text; version=1.0.0; charset=utf-8\r\n\
                     {encoding}Content-Length: {}\r\n\r\n",
                    body.len()
                );
                let mut line = String::new();
                loop {
                    // The request's lines, up to the empty one.
                    loop {
                        line.clear();
                        match socket.read_line(&mut line).await {
                            Ok(0) | Err(_) => return,
                            Ok(_) if line.trim_end().is_empty() => break,
                            Ok(_) => {}
                        }
                    }
                    let conn = socket.get_mut();
                    if conn.write_all(head.as_bytes()).await.is_err()
                        || conn.write_all(&body).await.is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    Ok((addr, server))
}

// ---------------------------------------------------------------------------------------------
// Part 3: a fleet
// ---------------------------------------------------------------------------------------------

async fn fleet(settings: &Settings, goals: &mut Goals) -> anyhow::Result<()> {
    let interval = settings.fleet_interval;
    let total = settings.fleet_databases + settings.fleet_redis;
    println!();
    println!(
        "3. A fleet: {} PostgreSQL databases and {} Redis servers, scraped every {} s, measured for {} s",
        settings.fleet_databases,
        settings.fleet_redis,
        interval.as_secs(),
        settings.fleet_secs
    );
    let keel = Deployment::start_with(CollectorConfig {
        interval,
        timeout: CollectorConfig::default().timeout.min(interval),
        ..CollectorConfig::default()
    })
    .await?;
    let key = keel.key(TENANT, Role::Operator, "bench").await?;
    let mut c = clients(&keel, &key).await?;
    let state = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&keel.database_url)
        .await?;
    // Part 1's 5,000 statements would otherwise be evicted by the fleet's, a few hundred at a
    // time, all through the run.
    sqlx::query("SELECT pg_stat_statements_reset()")
        .execute(&state)
        .await?;
    let postgres = PostgresCpu::find(&state).await;

    let preparing = Instant::now();
    let databases: Vec<TestDatabase> = futures::stream::iter(0..settings.fleet_databases)
        .map(|_| async {
            let db = keel.env.database().await?;
            let mut conn = PgConnection::connect(&db.url).await?;
            conn.execute(
                "CREATE TABLE fleet_t (id int PRIMARY KEY, v int NOT NULL); \
                 INSERT INTO fleet_t SELECT n, n FROM generate_series(1, 100) AS n",
            )
            .await?;
            for statement in FLEET_STATEMENTS {
                conn.execute(statement).await?;
            }
            conn.close().await?;
            Ok::<_, anyhow::Error>(db)
        })
        .buffer_unordered(4)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()?;
    let redis_envs: Vec<TestEnv> = (0..settings.fleet_redis).map(|_| TestEnv::new()).collect();
    let mut redis_urls = Vec::new();
    for env in &redis_envs {
        let url = env.redis_url().await?;
        load_keys(&url, 100).await?;
        redis_urls.push(url);
    }
    println!(
        "  {} databases (a table and {} statements each) and {} Redis servers (100 keys each) ready in {:.1} s",
        databases.len(),
        FLEET_STATEMENTS.len(),
        redis_urls.len(),
        preparing.elapsed().as_secs_f64()
    );

    let peak_reset = reset_peak_rss();
    for (i, db) in databases.iter().enumerate() {
        register(
            &mut c,
            &format!("fleet-pg-{i:03}"),
            Engine::Postgres,
            &db.url,
        )
        .await?;
    }
    for (i, url) in redis_urls.iter().enumerate() {
        register(&mut c, &format!("fleet-redis-{i:02}"), Engine::Redis, url).await?;
    }
    let registered = Instant::now();
    let deadline = registered + Duration::from_secs(120);
    loop {
        let up: i64 = sqlx::query_scalar("SELECT count(*) FROM collector.scrape_state WHERE up")
            .fetch_one(&state)
            .await?;
        if up >= total as i64 {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "only {up} of {total} targets scraped up within 120 s of their registration"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    println!(
        "  every target registered and scraped once {:.1} s after the last registration",
        registered.elapsed().as_secs_f64()
    );

    // The load: every interval, each database's statements once, on threads of its own
    // (connecting per database and round: a connection each would exceed max_connections).
    let load_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name(LOAD_THREAD)
        .enable_all()
        .build()
        .context("building the load runtime")?;
    let stop_load = CancellationToken::new();
    let load = load_runtime.spawn(load_loop(
        databases.iter().map(|d| d.url.clone()).collect(),
        interval,
        stop_load.clone(),
    ));
    // One more interval: the first scrapes (every text new) are behind.
    tokio::time::sleep(interval).await;

    let mut http = Http::new(keel.http);
    let histogram_before = histogram_buckets(&http.get_text("/metrics").await?);
    let from = Utc::now();
    let started = Instant::now();
    let cpu_before = process_ticks();
    let load_before = thread_ticks(LOAD_THREAD);
    let postgres_before = postgres.and_then(PostgresCpu::ticks);
    let mut rss = Vec::new();
    let window = Duration::from_secs(settings.fleet_secs);
    while started.elapsed() < window {
        if let Some(mb) = rss_mb() {
            rss.push((started.elapsed().as_secs_f64(), mb));
        }
        if load.is_finished() {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1).min(window.saturating_sub(started.elapsed())))
            .await;
    }
    let wall = started.elapsed().as_secs_f64();
    let cpu = process_ticks().saturating_sub(cpu_before);
    let load_cpu = thread_ticks(LOAD_THREAD).saturating_sub(load_before);
    let postgres_cpu = postgres
        .and_then(PostgresCpu::ticks)
        .zip(postgres_before)
        .map(|(after, before)| after.saturating_sub(before));
    let to = Utc::now();
    let histogram_after = histogram_buckets(&http.get_text("/metrics").await?);
    let peak = peak_rss_mb();
    stop_load.cancel();
    let load_rounds = load.await.context("load task")??;
    load_runtime.shutdown_background();

    let (scrapes, up): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE value = 1) FROM collector.samples \
         WHERE metric = 'keel_target_up' AND at >= $1 AND at < $2",
    )
    .bind(from)
    .bind(to)
    .fetch_one(&state)
    .await?;
    ensure!(up > 0, "no scrape went well in the fleet's window");
    let durations = scrape_durations(&state, from, to).await?;
    let (gaps, gap_p50, gap_p99, gap_max): (i64, Option<f64>, Option<f64>, Option<f64>) =
        sqlx::query_as(
            "SELECT count(gap), percentile_cont(0.5) WITHIN GROUP (ORDER BY gap), \
                    percentile_cont(0.99) WITHIN GROUP (ORDER BY gap), max(gap) \
             FROM (SELECT extract(epoch FROM at - lag(at) OVER (PARTITION BY instance_id ORDER BY at))::float8 AS gap \
                   FROM collector.samples WHERE metric = 'keel_target_up' AND at >= $1 AND at < $2) g \
             WHERE gap IS NOT NULL",
        )
        .bind(from)
        .bind(to)
        .fetch_one(&state)
        .await?;
    let by_second: Vec<(i32, i64)> = sqlx::query_as(
        "SELECT (floor(extract(epoch FROM at))::int8 % $3)::int4, count(*) FROM collector.samples \
         WHERE metric = 'keel_target_up' AND at >= $1 AND at < $2 GROUP BY 1 ORDER BY 1",
    )
    .bind(from)
    .bind(to)
    .bind(i64::try_from(interval.as_secs().max(1)).unwrap_or(i64::MAX))
    .fetch_all(&state)
    .await?;
    let (samples, deltas, texts): (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM collector.samples WHERE at >= $1 AND at < $2), \
                (SELECT count(*) FROM collector.statement_deltas WHERE at >= $1 AND at < $2), \
                (SELECT count(*) FROM collector.query_texts WHERE first_seen >= $1 AND first_seen < $2)",
    )
    .bind(from)
    .bind(to)
    .fetch_one(&state)
    .await?;

    let collector_ms = cpu.saturating_sub(load_cpu) as f64 * TICK_MS;
    let share = collector_ms / 1e3 / wall;
    let window_secs = (to - from).num_milliseconds() as f64 / 1e3;
    println!(
        "  window {window_secs:.1} s: {scrapes} scrapes ({} down), {:.1} per second; the load ran {load_rounds} rounds",
        scrapes - up,
        scrapes as f64 / window_secs
    );
    println!(
        "  CPU of this process (registry + collector + host; the load's threads, {:.1} s, taken off): {:.1} s, \
         {:.1}% of one core; {:.2} ms per target-scrape",
        load_cpu as f64 * TICK_MS / 1e3,
        collector_ms / 1e3,
        share * 100.0,
        collector_ms / scrapes.max(1) as f64
    );
    if let Some(ticks) = postgres_cpu {
        println!(
            "  PostgreSQL server CPU meanwhile (the scrapes' queries, the state store's writes and the load): {:.1}% of one core",
            ticks as f64 * TICK_MS / 1e3 / wall * 100.0
        );
    }
    for (engine, count, p50, p99, max) in &durations {
        println!(
            "  {engine} scrape duration ({count} scrapes, claim to read done, from the history): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            p50 * 1e3,
            p99 * 1e3,
            max * 1e3
        );
    }
    if let Some(bound) = histogram_quantile(&histogram_before, &histogram_after, 0.99) {
        println!(
            "  {DURATION_HISTOGRAM} (read + write) p99: <= {:.0} ms (bucket bound)",
            bound * 1e3
        );
    }
    println!(
        "  schedule: {gaps} gaps between a target's consecutive scrapes: p50 {:.2} s, p99 {:.2} s, max {:.2} s (interval {} s)",
        gap_p50.unwrap_or(f64::NAN),
        gap_p99.unwrap_or(f64::NAN),
        gap_max.unwrap_or(f64::NAN),
        interval.as_secs()
    );
    let busiest = by_second.iter().map(|(_, n)| *n).max().unwrap_or(0);
    println!(
        "  scrape starts by second of the interval: {}; the busiest second holds {:.0}% of them",
        by_second
            .iter()
            .map(|(second, n)| format!("{second}:{n}"))
            .collect::<Vec<_>>()
            .join(" "),
        busiest as f64 * 100.0 / scrapes.max(1) as f64
    );
    println!(
        "  history written: {:.0} rows/s ({samples} samples, {deltas} statement deltas, {texts} new texts)",
        (samples + deltas + texts) as f64 / window_secs
    );
    let (first, last, slope) = rss_trend(&rss);
    let quarters: Vec<String> = rss
        .chunks(rss.len().div_ceil(4).max(1))
        .map(|q| {
            format!(
                "{:.1}",
                median(&q.iter().map(|(_, mb)| *mb).collect::<Vec<_>>())
            )
        })
        .collect();
    println!(
        "  RSS of this process over the window ({} samples): medians by quarter {} MB; first quarter {first:.1} MB, \
         last quarter {last:.1} MB, trend {slope:+.2} MB/min; peak {} {}",
        rss.len(),
        quarters.join(", "),
        mb_text(peak),
        if peak_reset {
            "(VmHWM since the registrations)"
        } else {
            "(VmHWM since the process started)"
        }
    );
    goals.judge(
        &format!("fleet, CPU for {total} targets"),
        format!(
            "{:.1}% of one core (goal <= {:.0}%)",
            share * 100.0,
            GOAL_FLEET_CORE_SHARE * 100.0
        ),
        share <= GOAL_FLEET_CORE_SHARE,
    );
    let growth = last / first - 1.0;
    goals.judge(
        "fleet, RSS flat over the run",
        format!(
            "{:+.1}% from the first quarter to the last (goal <= {:.0}%)",
            growth * 100.0,
            FLAT_RSS_GROWTH * 100.0
        ),
        growth <= FLAT_RSS_GROWTH,
    );
    let stopped = keel.stop().await;
    drop(redis_envs);
    stopped
}

/// Runs each database's statements once per `interval`, until `stop`; returns the rounds.
async fn load_loop(
    urls: Vec<String>,
    interval: Duration,
    stop: CancellationToken,
) -> anyhow::Result<u64> {
    let mut rounds = 0;
    while !stop.is_cancelled() {
        let started = Instant::now();
        for url in &urls {
            if stop.is_cancelled() {
                break;
            }
            let mut conn = PgConnection::connect(url).await?;
            for statement in FLEET_STATEMENTS {
                conn.execute(statement).await?;
            }
            conn.close().await?;
        }
        rounds += 1;
        tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep(interval.saturating_sub(started.elapsed())) => {}
        }
    }
    Ok(rounds)
}

type Durations = Vec<(String, i64, f64, f64, f64)>;

/// Per engine: scrapes, p50, p99 and max of the scrape duration the history holds, in seconds.
async fn scrape_durations(
    state: &PgPool,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> anyhow::Result<Durations> {
    type Row = (String, i64, Option<f64>, Option<f64>, Option<f64>);
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT t.engine, count(*), percentile_cont(0.5) WITHIN GROUP (ORDER BY s.value), \
                percentile_cont(0.99) WITHIN GROUP (ORDER BY s.value), max(s.value) \
         FROM collector.samples s JOIN collector.targets t USING (instance_id) \
         WHERE s.metric = 'keel_target_scrape_duration_seconds' AND s.at >= $1 AND s.at < $2 \
         GROUP BY t.engine ORDER BY t.engine",
    )
    .bind(from)
    .bind(to)
    .fetch_all(state)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(engine, n, p50, p99, max)| {
            (
                engine,
                n,
                p50.unwrap_or(f64::NAN),
                p99.unwrap_or(f64::NAN),
                max.unwrap_or(f64::NAN),
            )
        })
        .collect())
}

/// The medians of the first and the last quarter of the samples, and the least-squares trend
/// in MB per minute.
fn rss_trend(samples: &[(f64, f64)]) -> (f64, f64, f64) {
    if samples.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    let quarter = (samples.len() / 4).max(1);
    let values = |s: &[(f64, f64)]| s.iter().map(|(_, mb)| *mb).collect::<Vec<_>>();
    let first = median(&values(&samples[..quarter]));
    let last = median(&values(&samples[samples.len() - quarter..]));
    let n = samples.len() as f64;
    let mean_t = samples.iter().map(|(t, _)| t).sum::<f64>() / n;
    let mean_v = samples.iter().map(|(_, v)| v).sum::<f64>() / n;
    let covariance: f64 = samples
        .iter()
        .map(|(t, v)| (t - mean_t) * (v - mean_v))
        .sum();
    let variance: f64 = samples.iter().map(|(t, _)| (t - mean_t).powi(2)).sum();
    let slope = if variance > 0.0 {
        covariance / variance * 60.0
    } else {
        0.0
    };
    (first, last, slope)
}

// ---------------------------------------------------------------------------------------------
// gRPC
// ---------------------------------------------------------------------------------------------

type Bearer =
    Box<dyn FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Send + Sync>;
type Intercept = InterceptedService<Channel, Bearer>;

struct Clients {
    registry: RegistryServiceClient<Intercept>,
    collector: CollectorServiceClient<Intercept>,
}

async fn clients(keel: &Deployment, key: &str) -> anyhow::Result<Clients> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", keel.grpc))?
        .connect()
        .await?;
    let auth = || -> Bearer { Box::new(keel_auth::bearer_interceptor(key.to_owned().into())) };
    Ok(Clients {
        registry: RegistryServiceClient::with_interceptor(channel.clone(), auth()),
        collector: CollectorServiceClient::with_interceptor(channel, auth())
            .max_decoding_message_size(64 * 1024 * 1024),
    })
}

/// Registers an instance (waiting out the tenant's rate limit); returns its id.
async fn register(
    c: &mut Clients,
    name: &str,
    engine: Engine,
    url: &str,
) -> anyhow::Result<String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let request = CreateInstanceRequest {
            instance: Some(Instance {
                name: name.to_owned(),
                engine: engine as i32,
                connection_url: url.to_owned(),
                ..Instance::default()
            }),
        };
        match c.registry.create_instance(request).await {
            Ok(created) => {
                return created
                    .into_inner()
                    .instance
                    .map(|i| i.id)
                    .filter(|id| !id.is_empty())
                    .with_context(|| format!("registering {name}: no id"));
            }
            Err(status)
                if status.code() == tonic::Code::ResourceExhausted && Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(status) => bail!("registering {name}: {status}"),
        }
    }
}

/// One CollectNow, as the client saw it.
#[derive(Debug)]
struct Cycle {
    /// CollectNow end to end.
    e2e: Duration,
    /// The scrape's own duration: from its start to the read done (before the write).
    read: Duration,
    /// Whether it had no delta base (a first scrape): no evictions sample then.
    first: bool,
    up: bool,
    /// `keel_pg_statements`: the database's entries in pg_stat_statements.
    statements: Option<f64>,
    /// Samples in the answer.
    metrics: usize,
    problems: Vec<String>,
}

async fn collect(c: &mut Clients, id: &str) -> Result<Cycle, tonic::Status> {
    let started = Instant::now();
    let answer = c
        .collector
        .collect_now(CollectNowRequest {
            instance_id: id.to_owned(),
        })
        .await?
        .into_inner();
    let e2e = started.elapsed();
    let status = answer.status.unwrap_or_default();
    let read = status.duration.map_or(Duration::ZERO, |d| {
        Duration::new(
            u64::try_from(d.seconds).unwrap_or(0),
            u32::try_from(d.nanos).unwrap_or(0),
        )
    });
    let value = |name: &str| {
        answer
            .latest
            .iter()
            .find(|m| m.name == name && m.labels.is_empty())
            .map(|m| m.value)
    };
    Ok(Cycle {
        e2e,
        read,
        first: value(EVICTED_SAMPLE).is_none(),
        up: status.up,
        statements: value("keel_pg_statements"),
        metrics: answer.latest.len(),
        problems: status.problems,
    })
}

/// A CollectNow that must go well (waiting out the tenant's rate limit; a refused call is not
/// timed).
async fn collect_ok(c: &mut Clients, id: &str) -> anyhow::Result<Cycle> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match collect(c, id).await {
            Ok(cycle) => {
                ensure!(cycle.up, "the target was down: {:?}", cycle.problems);
                return Ok(cycle);
            }
            Err(status)
                if status.code() == tonic::Code::ResourceExhausted && Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(status) => bail!("CollectNow: {status}"),
        }
    }
}

/// The first CollectNow of a new instance, as soon as the collector has its job (NOT_FOUND
/// until the registry's event arrives).
async fn first_collect(c: &mut Clients, id: &str) -> anyhow::Result<Cycle> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match collect(c, id).await {
            Ok(cycle) => {
                ensure!(cycle.up, "the target was down: {:?}", cycle.problems);
                return Ok(cycle);
            }
            Err(status)
                if matches!(
                    status.code(),
                    tonic::Code::NotFound | tonic::Code::ResourceExhausted
                ) && Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(status) => bail!("CollectNow of a new instance: {status}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP and the exporters
// ---------------------------------------------------------------------------------------------

/// A keep-alive HTTP/1.1 client for GETs of /metrics, as Prometheus scrapes: one connection,
/// one request at a time.
struct Http {
    addr: SocketAddr,
    conn: Option<BufReader<TcpStream>>,
    /// Asks for gzip, as Prometheus does.
    gzip: bool,
    /// Whether the last answer came in gzip.
    last_gzip: bool,
}

impl Http {
    /// A client that takes the bytes as they are (as curl does).
    fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            conn: None,
            gzip: false,
            last_gzip: false,
        }
    }

    /// A client that asks for gzip (as Prometheus does); the body comes back compressed.
    fn gzip(addr: SocketAddr) -> Self {
        Self {
            gzip: true,
            ..Self::new(addr)
        }
    }

    /// The body of `GET path` (a connection the server closed meanwhile is opened again).
    async fn get(&mut self, path: &str) -> anyhow::Result<Vec<u8>> {
        let reused = self.conn.is_some();
        match self.exchange(path).await {
            Ok(body) => Ok(body),
            Err(_) if reused => self.exchange(path).await,
            Err(error) => Err(error),
        }
    }

    async fn get_text(&mut self, path: &str) -> anyhow::Result<String> {
        Ok(String::from_utf8_lossy(&self.get(path).await?).into_owned())
    }

    async fn exchange(&mut self, path: &str) -> anyhow::Result<Vec<u8>> {
        let mut conn = match self.conn.take() {
            Some(conn) => conn,
            None => BufReader::new(
                TcpStream::connect(self.addr)
                    .await
                    .with_context(|| format!("connecting to {}", self.addr))?,
            ),
        };
        conn.get_mut()
            .write_all(
                format!(
                    "GET {path} HTTP/1.1\r\nHost: {}\r\nAccept: {PROMETHEUS_ACCEPT}\r\n{}User-Agent: keel-collector-bench\r\n\r\n",
                    self.addr,
                    if self.gzip { "Accept-Encoding: gzip\r\n" } else { "" }
                )
                .as_bytes(),
            )
            .await?;
        let mut line = String::new();
        read_line(&mut conn, &mut line).await?;
        let status = line
            .split_whitespace()
            .nth(1)
            .unwrap_or_default()
            .to_owned();
        let mut close = line.starts_with("HTTP/1.0");
        let (mut length, mut chunked) = (None, false);
        self.last_gzip = false;
        loop {
            read_line(&mut conn, &mut line).await?;
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                let value = value.trim();
                match name.trim().to_ascii_lowercase().as_str() {
                    "content-length" => length = value.parse::<usize>().ok(),
                    "transfer-encoding" => chunked = value.eq_ignore_ascii_case("chunked"),
                    "connection" => close |= value.eq_ignore_ascii_case("close"),
                    "content-encoding" => self.last_gzip = value.eq_ignore_ascii_case("gzip"),
                    _ => {}
                }
            }
        }
        let mut body = Vec::new();
        if chunked {
            loop {
                read_line(&mut conn, &mut line).await?;
                let size = line.trim().split(';').next().unwrap_or_default();
                let size = usize::from_str_radix(size.trim(), 16)
                    .with_context(|| format!("a chunk size of {line:?}"))?;
                if size == 0 {
                    // Trailers, then the empty line.
                    loop {
                        read_line(&mut conn, &mut line).await?;
                        if line.trim_end().is_empty() {
                            break;
                        }
                    }
                    break;
                }
                read_body(&mut conn, &mut body, size).await?;
                read_line(&mut conn, &mut line).await?;
            }
        } else if let Some(length) = length {
            read_body(&mut conn, &mut body, length).await?;
        } else {
            conn.read_to_end(&mut body).await?;
            close = true;
        }
        ensure!(
            status == "200",
            "GET {path} from {}: HTTP {status}: {}",
            self.addr,
            String::from_utf8_lossy(&body[..body.len().min(400)])
        );
        if !close {
            self.conn = Some(conn);
        }
        Ok(body)
    }
}

/// Appends the next `len` bytes to `body` (read into spare capacity, not zeroed first).
async fn read_body(
    conn: &mut BufReader<TcpStream>,
    body: &mut Vec<u8>,
    len: usize,
) -> anyhow::Result<()> {
    let expected = body.len() + len;
    body.reserve(len);
    (&mut *conn).take(len as u64).read_to_end(body).await?;
    ensure!(
        body.len() == expected,
        "the server closed the connection mid-body"
    );
    Ok(())
}

async fn read_line(conn: &mut BufReader<TcpStream>, line: &mut String) -> anyhow::Result<()> {
    line.clear();
    let n = conn.read_line(line).await?;
    ensure!(n > 0, "the server closed the connection");
    Ok(())
}

/// A gzip body (one member or several) decompressed.
fn gunzip(body: &[u8]) -> anyhow::Result<Vec<u8>> {
    use std::io::Read as _;
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(body)
        .read_to_end(&mut out)
        .context("decompressing a gzip body")?;
    Ok(out)
}

/// Lines of an exposition that are series (not comments or blank).
fn series_lines(body: &[u8]) -> usize {
    body.split(|&b| b == b'\n')
        .filter(|l| l.first().is_some_and(|&b| b != b'#'))
        .count()
}

/// `(sum, count)` of the collector's scrape duration histogram, outcome ok, of `engine`.
fn histogram_sum_count(body: &str, engine: &str) -> (f64, f64) {
    let (mut sum, mut count) = (0.0, 0.0);
    let engine = format!("engine=\"{engine}\"");
    for line in body.lines() {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        if !series.contains(&engine) || !series.contains("outcome=\"ok\"") {
            continue;
        }
        let value: f64 = value.parse().unwrap_or(0.0);
        if series.starts_with(&format!("{DURATION_HISTOGRAM}_sum{{")) {
            sum += value;
        } else if series.starts_with(&format!("{DURATION_HISTOGRAM}_count{{")) {
            count += value;
        }
    }
    (sum, count)
}

/// The scrape duration histogram's cumulative buckets (upper bound, count), every engine,
/// outcome ok.
fn histogram_buckets(body: &str) -> Vec<(f64, f64)> {
    let mut buckets: Vec<(f64, f64)> = Vec::new();
    for line in body.lines() {
        if !line.starts_with(&format!("{DURATION_HISTOGRAM}_bucket{{"))
            || !line.contains("outcome=\"ok\"")
        {
            continue;
        }
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Some(le) = series
            .split("le=\"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
        else {
            continue;
        };
        let le = if le == "+Inf" {
            f64::INFINITY
        } else {
            le.parse().unwrap_or(f64::NAN)
        };
        let value: f64 = value.parse().unwrap_or(0.0);
        match buckets.iter_mut().find(|(bound, _)| *bound == le) {
            Some((_, count)) => *count += value,
            None => buckets.push((le, value)),
        }
    }
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    buckets
}

/// The upper bound of the bucket holding quantile `q` of the observations between two reads.
fn histogram_quantile(before: &[(f64, f64)], after: &[(f64, f64)], q: f64) -> Option<f64> {
    let delta: Vec<(f64, f64)> = after
        .iter()
        .map(|(le, n)| {
            let earlier = before
                .iter()
                .find(|(b, _)| b == le)
                .map_or(0.0, |(_, n)| *n);
            (*le, n - earlier)
        })
        .collect();
    let total = delta.last()?.1;
    (total > 0.0)
        .then(|| {
            delta
                .iter()
                .find(|(_, n)| *n >= q * total)
                .map(|(le, _)| *le)
        })
        .flatten()
}

/// An exporter process on a loopback port of its own.
struct Exporter {
    name: &'static str,
    child: tokio::process::Child,
    addr: SocketAddr,
}

impl Exporter {
    /// Starts `program` with `args(listen address)` and waits until its /metrics answers (its
    /// first scrape, not timed).
    async fn start(
        name: &'static str,
        program: &Path,
        args: impl Fn(SocketAddr) -> Vec<String>,
        envs: &[(&str, &str)],
        dir: &Path,
    ) -> anyhow::Result<Self> {
        let mut attempt = 1;
        loop {
            let addr = SocketAddr::from(([127, 0, 0, 1], keel_testkit::free_port()?));
            let log_path = dir.join(format!("{name}.log"));
            let log = std::fs::File::create(&log_path)?;
            let mut child = tokio::process::Command::new(program)
                .args(args(addr))
                .envs(envs.iter().copied())
                .stdin(std::process::Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("starting {}", program.display()))?;
            let deadline = Instant::now() + Duration::from_secs(30);
            let exited = loop {
                if let Some(status) = child.try_wait()? {
                    break status.to_string();
                }
                match Http::new(addr).get("/metrics").await {
                    Ok(_) => return Ok(Self { name, child, addr }),
                    Err(error) if Instant::now() > deadline => {
                        let _ = child.kill().await;
                        bail!(
                            "{name} did not answer within 30 s ({error:#}); its log:\n{}",
                            std::fs::read_to_string(&log_path).unwrap_or_default()
                        );
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            };
            // Most likely another process took the free port first.
            ensure!(
                attempt < 3,
                "{name} exited ({exited}); its log:\n{}",
                std::fs::read_to_string(&log_path).unwrap_or_default()
            );
            attempt += 1;
        }
    }

    fn peak_rss_mb(&self) -> Option<f64> {
        status_kb(&format!("/proc/{}/status", self.child.id()?), "VmHWM").map(|kb| kb / 1024.0)
    }

    fn cpu_ticks(&self) -> Option<u64> {
        ProcStat::read(&format!("/proc/{}/stat", self.child.id()?)).map(ProcStat::cpu)
    }

    async fn stop(mut self) {
        if let Err(error) = self.child.kill().await {
            eprintln!("stopping {}: {error}", self.name);
        }
    }
}

fn ensure_program(path: &Path, package: &str) -> anyhow::Result<()> {
    ensure!(
        path.is_file(),
        "{} is missing: install the Debian package {package} (cargo xtask setup does)",
        path.display()
    );
    Ok(())
}

fn database_name(url: &str) -> anyhow::Result<&str> {
    url.rsplit('/')
        .next()
        .map(|name| name.split('?').next().unwrap_or(name))
        .filter(|name| !name.is_empty())
        .with_context(|| format!("no database name in {url}"))
}

// ---------------------------------------------------------------------------------------------
// /proc: memory and CPU
// ---------------------------------------------------------------------------------------------

/// A `kB` field of a /proc/<pid>/status.
fn status_kb(path: &str, field: &str) -> Option<f64> {
    let status = std::fs::read_to_string(path).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn rss_mb() -> Option<f64> {
    status_kb("/proc/self/status", "VmRSS").map(|kb| kb / 1024.0)
}

fn peak_rss_mb() -> Option<f64> {
    status_kb("/proc/self/status", "VmHWM").map(|kb| kb / 1024.0)
}

/// Resets this process's VmHWM to its current RSS (proc(5), clear_refs "5").
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

fn mb_text(mb: Option<f64>) -> String {
    mb.map_or_else(|| "-".to_owned(), |mb| format!("{mb:.1} MB"))
}

/// The fields of a /proc/<pid>/stat this benchmark needs.
#[derive(Debug, Clone, Copy)]
struct ProcStat {
    ppid: u32,
    utime: u64,
    stime: u64,
    cutime: u64,
    cstime: u64,
}

impl ProcStat {
    fn read(path: &str) -> Option<Self> {
        let text = std::fs::read_to_string(path).ok()?;
        // The command name (field 2) may hold spaces and parentheses; no field after it does.
        let rest = text.get(text.rfind(')')? + 1..)?;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // fields[0] is field 3 (state) of proc_pid_stat(5).
        let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
        Some(Self {
            ppid: u32::try_from(field(4)?).ok()?,
            utime: field(14)?,
            stime: field(15)?,
            cutime: field(16)?,
            cstime: field(17)?,
        })
    }

    fn cpu(self) -> u64 {
        self.utime + self.stime
    }
}

fn process_ticks() -> u64 {
    ProcStat::read("/proc/self/stat").map_or(0, ProcStat::cpu)
}

/// CPU ticks of this process's threads named `name`.
fn thread_ticks(name: &str) -> u64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    tasks
        .flatten()
        .filter(|task| {
            std::fs::read_to_string(task.path().join("comm")).is_ok_and(|comm| comm.trim() == name)
        })
        .filter_map(|task| ProcStat::read(&task.path().join("stat").to_string_lossy()))
        .map(ProcStat::cpu)
        .sum()
}

/// The local PostgreSQL server's CPU time: the postmaster, its live children and those reaped.
#[derive(Debug, Clone, Copy)]
struct PostgresCpu {
    postmaster: u32,
}

impl PostgresCpu {
    async fn find(pool: &PgPool) -> Option<Self> {
        let backend: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(pool)
            .await
            .ok()?;
        let postmaster = ProcStat::read(&format!("/proc/{backend}/stat"))?.ppid;
        let is_postgres = std::fs::read_to_string(format!("/proc/{postmaster}/comm"))
            .is_ok_and(|comm| comm.trim() == "postgres");
        is_postgres.then_some(Self { postmaster })
    }

    fn ticks(self) -> Option<u64> {
        let postmaster = ProcStat::read(&format!("/proc/{}/stat", self.postmaster))?;
        let mut ticks = postmaster.cpu() + postmaster.cutime + postmaster.cstime;
        for entry in std::fs::read_dir("/proc").ok()?.flatten() {
            let name = entry.file_name();
            if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            if let Some(stat) = ProcStat::read(&entry.path().join("stat").to_string_lossy())
                && stat.ppid == self.postmaster
            {
                ticks += stat.cpu();
            }
        }
        Some(ticks)
    }
}

// ---------------------------------------------------------------------------------------------
// Figures
// ---------------------------------------------------------------------------------------------

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The `q` quantile (nearest rank) of `values`; NaN for none.
fn quantile(values: &[f64], q: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

fn median(values: &[f64]) -> f64 {
    quantile(values, 0.5)
}
