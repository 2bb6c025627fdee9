//! Throughput and latency of the registry's Get, List and Update over gRPC, with 100,000
//! instances, next to pgbench's primary-key SELECT on the same PostgreSQL in the same run, and
//! next to two references measured in the same run with the same concurrency:
//! - the ceiling: an empty gRPC call through the same server, layers and channels
//!   (`registry/ceiling.rs`), which Get is a ratio of;
//! - the design Keel replaces: the whole inventory in one `jsonb` document of 10,000 instances,
//!   loaded by every Get and rewritten by every Update (`registry/document.rs`), called in process
//!   without gRPC (which favours it), which Keel's Get and Update are multiples of.
//!
//! Run with `cargo bench -p keel-registry --bench registry`. Settings come from the environment:
//! `KEEL_BENCH_SECS` (5, measured seconds per operation and round), `KEEL_BENCH_WARMUP_SECS` (1),
//! `KEEL_BENCH_CONCURRENCY` (8, client tasks and pgbench `-c`), `KEEL_BENCH_ROUNDS` (3),
//! `KEEL_BENCH_CHANNELS` (4, HTTP/2 connections the tasks share), `KEEL_BENCH_POOL_SIZE` (16, the
//! service's PostgreSQL pool, as `keel serve` defaults it). Servers come from `keel_testkit`, so
//! `KEEL_TEST_DATABASE_URL` and `KEEL_TEST_NATS_URL` apply. `RUST_LOG` (default `warn,sqlx::query=error`)
//! sets the log filter.
//!
//! `cargo test --all-targets` runs this binary too, without the `--bench` that `cargo bench`
//! passes: then it is a smoke test at small scale (2,000 instances, a 1,000-instance document,
//! one round of 1 s, no warm-up; the variables above still apply), whose figures mean nothing.
//!
//! The gRPC clients run on their own tokio runtime, the registry on the main one. Clients,
//! registry, PostgreSQL and pgbench share the machine's cores, so besides ops/s the table shows
//! the CPU each operation costs in each of them (from /proc, when PostgreSQL runs locally):
//! unlike ops/s, that hardly depends on what else the machine is busy with.
//!
//! A benchmark reports rather than asserts: goals are printed as MET or NOT MET. It exits non-zero
//! only when something failed (a server did not start, a call returned an error).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail, ensure};
use hdrhistogram::Histogram;
use keel_auth::{Actor, KeyStore, NewKey, Role};
use keel_bus::Bus;
use keel_config::{DatabaseConfig, ListenConfig, NatsConfig};
use keel_proto::v1::registry_service_client::RegistryServiceClient;
use keel_proto::v1::{GetInstanceRequest, Instance, ListInstancesRequest, UpdateInstanceRequest};
use keel_registry::RegistryConfig;
use keel_registry::crypto::KeyRing;
use keel_service::{Host, HostConfig};
use keel_testkit::bench::env_number;
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use secrecy::SecretString;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

#[path = "registry/ceiling.rs"]
mod ceiling;
#[path = "registry/document.rs"]
mod document;

const TENANT: &str = "bench";
/// Instances seeded for the registry (in a smoke run: [`SMOKE_INSTANCES`]).
const INSTANCES: u32 = 100_000;
/// Instances in the single document of the design Keel replaces (in a smoke run:
/// [`SMOKE_DOCUMENT_INSTANCES`]).
const DOCUMENT_INSTANCES: u32 = 10_000;
const SMOKE_INSTANCES: u32 = 2_000;
const SMOKE_DOCUMENT_INSTANCES: u32 = 1_000;
const PAGE_SIZE: i32 = 50;
const SELECTOR: &str = "tier=db,region in (eu,us)";
/// Pages a List task reads (the first, then following next_page_token) before starting over,
/// so both the first-page query and the `id > $after` one are measured.
const LIST_PAGES: usize = 4;
/// The goals for Get.
const GOAL_RATIO: f64 = 0.5;
const GOAL_P99_MS: f64 = 1.5;
/// Goal for Get as a fraction of the empty call's rate.
const GOAL_CEILING_RATIO: f64 = 0.6;
/// Goal for Get and Update as multiples of the single-document design's.
const GOAL_DOCUMENT_MULTIPLE: f64 = 100.0;
/// Name of the client runtime's threads, by which their CPU time is told apart from the
/// registry's (at most 15 bytes, the kernel's limit).
const CLIENT_THREAD: &str = "bench-client";

/// Instance `n`'s id, the same one the seeding SQL and the pgbench script compute.
fn instance_id(n: u32) -> String {
    format!("00000000-0000-7000-8000-{n:012x}")
}

const ID_SQL: &str = "('00000000-0000-7000-8000-' || lpad(to_hex(n), 12, '0'))::uuid";

fn tier(n: u32) -> &'static str {
    ["db", "cache", "queue", "search"][(n % 4) as usize]
}

fn region(n: u32) -> &'static str {
    ["eu", "us", "ap"][(n % 3) as usize]
}

/// Keel's client-side key interceptor (`keel_auth::bearer_interceptor`), boxed so that the
/// client type can be named.
type Bearer =
    Box<dyn FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Send + Sync>;
type Client = RegistryServiceClient<InterceptedService<Channel, Bearer>>;

#[derive(Debug, Clone, Copy)]
struct Settings {
    /// Run by `cargo test`, not `cargo bench`: small scale, short.
    smoke: bool,
    /// Registry instances seeded.
    instances: u32,
    /// Instances in the single-document design's document.
    document_instances: u32,
    secs: u64,
    warmup_secs: u64,
    concurrency: usize,
    rounds: usize,
    channels: usize,
    pool_size: u32,
}

impl Settings {
    fn from_env() -> anyhow::Result<Self> {
        // `cargo bench` passes --bench to every bench binary, custom harness or not.
        let smoke = !std::env::args().any(|arg| arg == "--bench");
        let settings = Self {
            smoke,
            instances: if smoke { SMOKE_INSTANCES } else { INSTANCES },
            document_instances: if smoke {
                SMOKE_DOCUMENT_INSTANCES
            } else {
                DOCUMENT_INSTANCES
            },
            secs: env_number("KEEL_BENCH_SECS", if smoke { 1 } else { 5 })?,
            warmup_secs: env_number("KEEL_BENCH_WARMUP_SECS", if smoke { 0 } else { 1 })?,
            concurrency: env_number("KEEL_BENCH_CONCURRENCY", 8)?,
            rounds: env_number("KEEL_BENCH_ROUNDS", if smoke { 1 } else { 3 })?,
            channels: env_number("KEEL_BENCH_CHANNELS", 4)?,
            pool_size: env_number("KEEL_BENCH_POOL_SIZE", 16)?,
        };
        ensure!(settings.secs > 0, "KEEL_BENCH_SECS must be at least 1");
        ensure!(
            settings.concurrency > 0,
            "KEEL_BENCH_CONCURRENCY must be at least 1"
        );
        ensure!(settings.rounds > 0, "KEEL_BENCH_ROUNDS must be at least 1");
        ensure!(
            settings.channels > 0,
            "KEEL_BENCH_CHANNELS must be at least 1"
        );
        ensure!(
            settings.pool_size > 0,
            "KEEL_BENCH_POOL_SIZE must be at least 1"
        );
        Ok(settings)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Op {
    Get,
    List,
    Update,
    /// The empty call through the same stack.
    Empty,
    /// The single-document design's Get and Update.
    DocumentGet,
    DocumentUpdate,
}

impl Op {
    fn label(self) -> &'static str {
        match self {
            Op::Get => "Get (random id)",
            Op::List => "List (50/page, selector)",
            Op::Update => "Update (labels)",
            Op::Empty => "Empty call (same stack)",
            Op::DocumentGet => "Document Get (jsonb)",
            Op::DocumentUpdate => "Document Update (jsonb)",
        }
    }
}

/// One operation's result in one round.
#[derive(Debug)]
struct Measured {
    ops_per_sec: f64,
    /// Microseconds per call.
    latency: Histogram<u64>,
    cpu: Option<CpuPerOp>,
}

/// One pgbench run.
#[derive(Debug, Clone, Copy)]
struct PgbenchRun {
    tps: f64,
    latency_avg_ms: f64,
    cpu: Option<CpuPerOp>,
}

/// CPU time per operation, in microseconds.
#[derive(Debug, Clone, Copy)]
struct CpuPerOp {
    /// The gRPC clients' runtime, or the pgbench process.
    client: f64,
    /// The registry (everything in this process but the clients); none for pgbench.
    service: Option<f64>,
    /// The PostgreSQL server, all its processes.
    postgres: f64,
}

impl CpuPerOp {
    fn total(self) -> f64 {
        self.client + self.service.unwrap_or(0.0) + self.postgres
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                // sqlx warns about statements over 1 s, which the seeding INSERT may be.
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,sqlx::query=error")),
        )
        .with_writer(std::io::stderr)
        .init();
    let settings = Settings::from_env()?;

    let env = keel_testkit::TestEnv::new();
    let server = keel_testkit::postgres().await?;
    let db = env.database().await?;
    // The service's pool is opened exactly as `keel serve` opens it (application name, acquire
    // timeout, size), so the pool is part of what is measured.
    let pool = keel_store::connect(&DatabaseConfig {
        max_connections: settings.pool_size,
        ..DatabaseConfig::from_url(db.url.clone())
    })
    .await
    .context("opening the service's pool")?;
    KeyStore::migrate(&pool)
        .await
        .context("migrating the auth schema")?;
    keel_registry::migrate(&pool)
        .await
        .context("migrating the registry schema")?;
    let server_version: String = sqlx::query_scalar("SHOW server_version")
        .fetch_one(&pool)
        .await?;
    let meter = CpuMeter::find(&pool).await;

    let seeding = Instant::now();
    seed(&pool, settings.instances).await?;
    let seeded_in = seeding.elapsed();
    // The single-document design, on the same server and pool; the registry is idle while it
    // is measured.
    let documents = document::Documents::new(pool.clone());
    documents
        .seed(TENANT, settings.document_instances, ID_SQL)
        .await?;
    let (document_stored, document_text) = documents.sizes(TENANT).await?;

    let pgbench = Pgbench::new(server, &db, settings.concurrency, settings.instances, meter)?;
    let pgbench_version = pgbench.version().await?;

    let keys = KeyStore::new(pool.clone(), keel_auth::DEFAULT_CACHE_TTL);
    let key = keys
        .create_key(
            NewKey {
                scope: keel_auth::Scope::tenant(TENANT)?,
                role: Role::Operator,
                name: "bench".to_owned(),
                expires_at: None,
            },
            &Actor::system("keel-bench"),
        )
        .await
        .context("creating the bench API key")?
        .key;

    let stop = CancellationToken::new();
    let nats_url = env.nats_url().await?;
    let served = serve(&pool, keys, &nats_url, stop.clone()).await?;
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    // The clients get their own threads, as they would in their own process, and so that their
    // CPU time can be read apart from the registry's.
    let client_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cores)
        .thread_name(CLIENT_THREAD)
        .enable_all()
        .build()
        .context("building the client runtime")?;
    let clients = client_runtime.handle().clone();
    // A channel's connection task runs on the runtime that connects it.
    let channels = clients
        .spawn(connect(served.grpc, settings.channels))
        .await
        .context("connect task failed")??;

    println!("Keel registry benchmark");
    if settings.smoke {
        println!(
            "  SMOKE RUN (cargo test, no --bench): small scale, one short round; the figures mean nothing"
        );
    }
    println!(
        "  machine: {cores} cores, shared by the gRPC clients (tokio runtime, {cores} workers), the registry (tokio runtime, {cores} workers), PostgreSQL and pgbench"
    );
    println!(
        "  PostgreSQL {server_version} at {}:{}, {}",
        server.host, server.port, pgbench_version
    );
    println!(
        "  seeded {} instances of tenant {TENANT:?} in {:.2} s (one INSERT ... SELECT generate_series, then ANALYZE)",
        settings.instances,
        seeded_in.as_secs_f64()
    );
    println!(
        "  empty call: a no-op unary method behind the registry's AuthLayer + LimitsLayer, on the same server (tracing, metrics), channels and key cache"
    );
    println!(
        "  design Keel replaces: {} instances in one jsonb row ({:.1} MB as text, {:.1} MB stored), called in process with sqlx + serde_json, no gRPC",
        settings.document_instances,
        document_text as f64 / 1e6,
        document_stored as f64 / 1e6,
    );
    println!(
        "    Get = SELECT doc, parse, pick one; Update = BEGIN, SELECT doc FOR UPDATE, parse, change one, UPDATE doc, COMMIT"
    );
    println!(
        "  per round and operation: {} s warm-up + {} s measured; concurrency {} (pgbench -c {} -j {}); {} gRPC channels over TCP; service pool {} connections; auth cache TTL {:?}",
        settings.warmup_secs,
        settings.secs,
        settings.concurrency,
        settings.concurrency,
        pgbench.threads,
        settings.channels,
        settings.pool_size,
        keel_auth::DEFAULT_CACHE_TTL,
    );
    println!();

    // Statistics from here on describe the benchmark's own load, not seeding. Best effort:
    // a KEEL_TEST_DATABASE_URL server may lack pg_stat_statements.
    let statements = sqlx::query("SELECT pg_stat_statements_reset()")
        .execute(&pool)
        .await
        .is_ok();

    let mut results: HashMap<Op, Vec<Measured>> = HashMap::new();
    let mut pgbench_runs = Vec::new();
    for round in 0..settings.rounds {
        // Alternate which of the two compared loads goes first, so drift on a noisy machine
        // (other builds, autovacuum, the relay catching up) does not favour one of them.
        let pgbench_first = round % 2 == 0;
        let mut line = format!("round {}/{}:", round + 1, settings.rounds);
        for step in 0..2 {
            if (step == 0) == pgbench_first {
                pgbench.run(settings.warmup_secs).await?;
                let run = pgbench.run(settings.secs).await?;
                line.push_str(&format!(" pgbench {:.0}/s", run.tps));
                pgbench_runs.push(run);
            } else {
                let measured = drive(Op::Get, &clients, &channels, &key, settings, meter).await?;
                line.push_str(&format!(" get {:.0}/s", measured.ops_per_sec));
                results.entry(Op::Get).or_default().push(measured);
                // Right after Get, so that the two compared loads see the same machine.
                let measured = drive(Op::Empty, &clients, &channels, &key, settings, meter).await?;
                line.push_str(&format!(" empty {:.0}/s", measured.ops_per_sec));
                results.entry(Op::Empty).or_default().push(measured);
            }
        }
        let measured = drive(Op::List, &clients, &channels, &key, settings, meter).await?;
        line.push_str(&format!(" list {:.0}/s", measured.ops_per_sec));
        results.entry(Op::List).or_default().push(measured);
        let measured = drive(Op::Update, &clients, &channels, &key, settings, meter).await?;
        line.push_str(&format!(" update {:.0}/s", measured.ops_per_sec));
        results.entry(Op::Update).or_default().push(measured);
        // The relay publishes the updates' events after the fact; let it finish so its work
        // does not land in the next round's pgbench or Get.
        drain_outbox(&pool).await?;
        for op in [Op::DocumentGet, Op::DocumentUpdate] {
            let measured = drive_documents(op, &documents, settings, meter).await?;
            let name = if op == Op::DocumentGet {
                "doc-get"
            } else {
                "doc-update"
            };
            line.push_str(&format!(" {name} {:.1}/s", measured.ops_per_sec));
            results.entry(op).or_default().push(measured);
        }
        println!("{line}");
    }
    println!();

    pgbench_runs.sort_by(|a, b| a.tps.total_cmp(&b.tps));
    let pgbench_median = pgbench_runs[pgbench_runs.len() / 2];
    println!(
        "{:<25} {:>8} {:>7} {:>7} {:>7}  {:<26}",
        "", "", "", "", "", "CPU µs per op"
    );
    println!(
        "{:<25} {:>8} {:>7} {:>7} {:>7}  {:>8} {:>8} {:>8}",
        "operation", "ops/s", "avg ms", "p50 ms", "p99 ms", "client", "service", "postgres"
    );
    println!(
        "{:<25} {:>8.0} {:>7.3} {:>7} {:>7}  {}",
        "pgbench PK select",
        pgbench_median.tps,
        pgbench_median.latency_avg_ms,
        "-",
        "-",
        cpu_columns(pgbench_median.cpu)
    );
    let mut get = None;
    let mut medians = HashMap::new();
    for op in [
        Op::Get,
        Op::List,
        Op::Update,
        Op::Empty,
        Op::DocumentGet,
        Op::DocumentUpdate,
    ] {
        let mut rounds = results.remove(&op).unwrap_or_default();
        rounds.sort_by(|a, b| a.ops_per_sec.total_cmp(&b.ops_per_sec));
        let Some(median) = rounds.get(rounds.len() / 2) else {
            bail!("no {op:?} results");
        };
        let ms = |quantile: f64| median.latency.value_at_quantile(quantile) as f64 / 1000.0;
        println!(
            "{:<25} {:>8} {:>7.3} {:>7.3} {:>7.3}  {}",
            op.label(),
            rate(median.ops_per_sec),
            median.latency.mean() / 1000.0,
            ms(0.50),
            ms(0.99),
            cpu_columns(median.cpu)
        );
        if op == Op::Get {
            get = Some((median.ops_per_sec, ms(0.99), median.cpu));
        }
        medians.insert(op, (median.ops_per_sec, median.cpu));
    }
    println!(
        "ops/s: median of {} rounds. Latency (measured by the client) and CPU: the round with the median ops/s; \
         pgbench reports only its average latency, and its client is the pgbench process.",
        settings.rounds
    );
    println!();
    let (get_rate, get_p99, get_cpu) = get.context("no Get results")?;
    let ratio = get_rate / pgbench_median.tps;
    let verdict = |met: bool| if met { "MET" } else { "NOT MET" };
    println!(
        "Get / pgbench PK select = {ratio:.2} (goal >= {GOAL_RATIO}) {}",
        verdict(ratio >= GOAL_RATIO)
    );
    println!(
        "Get p99 = {get_p99:.2} ms (goal <= {GOAL_P99_MS} ms) {}",
        verdict(get_p99 <= GOAL_P99_MS)
    );
    if let (Some(get), Some(pgbench)) = (get_cpu, pgbench_median.cpu) {
        // Both loads keep every core busy, so their rates stand in the inverse ratio of their
        // CPU per op; this is the ratio without the other processes this machine runs.
        println!(
            "CPU per op: Get {:.0} µs, pgbench {:.0} µs; from CPU alone Get / pgbench = {:.2}",
            get.total(),
            pgbench.total(),
            pgbench.total() / get.total()
        );
    }
    print_references(&medians, settings)?;
    if statements {
        print_statements(&pool).await?;
    }

    stop.cancel();
    served.stopped().await?;
    // Dropping a runtime blocks, which is not allowed inside another one.
    client_runtime.shutdown_background();
    Ok(())
}

/// Inserts the instances in one statement. The rows bypass the service on purpose: creating
/// 100,000 through gRPC would take minutes and write as many outbox events.
async fn seed(pool: &PgPool, instances: u32) -> anyhow::Result<()> {
    // url_ciphertext is 28 arbitrary bytes (the size of an empty AES-GCM seal): Get, List and
    // Update never decrypt it, only CheckInstance and GetConnection would.
    let insert = format!(
        "INSERT INTO registry.instances
             (id, tenant, name, engine, url_masked, url_ciphertext, key_id, environment, labels)
         SELECT {ID_SQL}, $1, 'inst-' || n, 'postgres',
                'postgres://app:****@db-' || n || ':5432/shop',
                decode(md5(n::text), 'hex') || '\\x000000000000000000000000'::bytea,
                'bench',
                (ARRAY['production', 'staging'])[n % 2 + 1],
                jsonb_build_object(
                    'tier', (ARRAY['db', 'cache', 'queue', 'search'])[n % 4 + 1],
                    'region', (ARRAY['eu', 'us', 'ap'])[n % 3 + 1],
                    'team', 'team-' || n % 50)
         FROM generate_series(1, $2) AS n"
    );
    sqlx::query(&insert)
        .bind(TENANT)
        .bind(i32::try_from(instances).context("too many instances")?)
        .execute(pool)
        .await
        .context("seeding instances")?;
    sqlx::query("ANALYZE registry.instances")
        .execute(pool)
        .await?;
    Ok(())
}

/// The registry as `keel serve` wires it, on listeners bound to port 0.
struct Served {
    grpc: std::net::SocketAddr,
    server: tokio::task::JoinHandle<Result<(), keel_service::HostError>>,
}

impl Served {
    async fn stopped(self) -> anyhow::Result<()> {
        self.server
            .await
            .context("server task failed")?
            .context("server failed")?;
        Ok(())
    }
}

async fn serve(
    pool: &PgPool,
    keys: KeyStore,
    nats_url: &str,
    stop: CancellationToken,
) -> anyhow::Result<Served> {
    let grpc_listener = TcpListener::bind("127.0.0.1:0").await?;
    let http_listener = TcpListener::bind("127.0.0.1:0").await?;
    // Plaintext, so that TLS stays out of the comparison with pgbench (which does not use it
    // either); /metrics open, as nothing here reads it and a closed one only adds a warning.
    let listen = ListenConfig {
        shutdown_grace: Duration::from_secs(2),
        metrics_anonymous: true,
        ..ListenConfig::plaintext(grpc_listener.local_addr()?, http_listener.local_addr()?)
    };
    let config = HostConfig {
        // The limits layer runs as in production, with limits far above what this run sends,
        // so its cost is measured but it never refuses a call.
        limits: keel_limits::LimitsConfig {
            rate: 1_000_000,
            burst: 1_000_000,
            concurrency: 10_000,
            ..Default::default()
        },
        ..HostConfig::new(
            DatabaseConfig::from_url(String::new()),
            NatsConfig::from_url(nats_url),
            listen.clone(),
        )
    };
    // The pool was opened as `keel serve` opens it; the rest is built exactly as `keel serve`
    // builds it. Readiness checks cost nothing here: they run only when /readyz is asked.
    let bus = Bus::connect(&config.nats, &config.stream).await?;
    let mut host = Host::new(pool.clone(), bus, keys, &config)?;
    host.add(keel_registry::Service::new(
        std::sync::Arc::new(KeyRing::generate("bench")),
        RegistryConfig::default(),
    ))
    .await?;
    // The ceiling, mounted as every service is: behind the same auth and limits stack.
    host.add(ceiling::Ceiling).await?;
    let server = tokio::spawn(host.serve_with_listeners(
        grpc_listener,
        http_listener,
        async move { stop.cancelled().await },
    ));
    Ok(Served {
        grpc: listen.grpc,
        server,
    })
}

async fn connect(grpc: std::net::SocketAddr, count: usize) -> anyhow::Result<Vec<Channel>> {
    let mut channels = Vec::with_capacity(count);
    for _ in 0..count {
        let channel = Channel::from_shared(format!("http://{grpc}"))?
            .connect()
            .await
            .context("connecting to the registry")?;
        channels.push(channel);
    }
    Ok(channels)
}

/// Runs `op` on `settings.concurrency` tasks spread over `channels`: warm-up, then the measured
/// window. Any failed call fails the benchmark.
async fn drive(
    op: Op,
    clients: &tokio::runtime::Handle,
    channels: &[Channel],
    key: &SecretString,
    settings: Settings,
    meter: Option<CpuMeter>,
) -> anyhow::Result<Measured> {
    measure(settings, meter, |task, warmed_up, end| {
        let bearer: Bearer = Box::new(keel_auth::bearer_interceptor(key.clone()));
        let channel = channels[task % channels.len()].clone();
        if op == Op::Empty {
            let client = tonic::client::Grpc::new(InterceptedService::new(channel, bearer));
            clients.spawn(empty_worker(client, warmed_up, end))
        } else {
            let client = RegistryServiceClient::with_interceptor(channel, bearer);
            clients.spawn(worker(op, client, task, settings.instances, warmed_up, end))
        }
    })
    .await
}

/// Runs the single-document design's `op` on `settings.concurrency` tasks on this runtime, where
/// a service using that design would run it.
async fn drive_documents(
    op: Op,
    documents: &document::Documents,
    settings: Settings,
    meter: Option<CpuMeter>,
) -> anyhow::Result<Measured> {
    measure(settings, meter, |task, warmed_up, end| {
        tokio::spawn(document_worker(
            op,
            documents.clone(),
            task,
            settings.document_instances,
            warmed_up,
            end,
        ))
    })
    .await
}

type Task = tokio::task::JoinHandle<anyhow::Result<Histogram<u64>>>;

/// Starts `settings.concurrency` tasks with `spawn(task, warmed_up, end)`, reads the CPU time
/// spent over the measured window, and merges the tasks' latencies.
async fn measure(
    settings: Settings,
    meter: Option<CpuMeter>,
    mut spawn: impl FnMut(usize, Instant, Instant) -> Task,
) -> anyhow::Result<Measured> {
    let warmed_up = Instant::now() + Duration::from_secs(settings.warmup_secs);
    let window = Duration::from_secs(settings.secs);
    let end = warmed_up + window;
    let tasks: Vec<Task> = (0..settings.concurrency)
        .map(|task| spawn(task, warmed_up, end))
        .collect();
    tokio::time::sleep_until(warmed_up.into()).await;
    let cpu_start = meter.and_then(|m| m.sample());
    tokio::time::sleep_until(end.into()).await;
    let cpu_end = meter.and_then(|m| m.sample());
    let mut latency = histogram()?;
    for task in tasks {
        let recorded = task.await.context("benchmark task panicked")??;
        latency
            .add(&recorded)
            .map_err(|e| anyhow!("merging histograms: {e:?}"))?;
    }
    let cpu = match (cpu_start, cpu_end) {
        (Some(start), Some(end)) => Some(end.since(start).registry_per_op(latency.len())),
        _ => None,
    };
    Ok(Measured {
        ops_per_sec: latency.len() as f64 / window.as_secs_f64(),
        latency,
        cpu,
    })
}

fn histogram() -> anyhow::Result<Histogram<u64>> {
    // 1 µs to 60 s at 3 significant digits.
    Histogram::new_with_bounds(1, 60_000_000, 3).map_err(|e| anyhow!("histogram: {e:?}"))
}

/// One client task: calls `op` back to back until `end`, recording calls started after
/// `warmed_up`.
async fn worker(
    op: Op,
    mut client: Client,
    task: usize,
    instances: u32,
    warmed_up: Instant,
    end: Instant,
) -> anyhow::Result<Histogram<u64>> {
    let mut latency = histogram()?;
    let mut rng = StdRng::seed_from_u64(task as u64);
    // Update: every task owns an instance at the end of the id range, away from the first List
    // pages, and keeps its version from each response, so no update conflicts.
    let owned = instances - task as u32;
    let mut version = 0;
    if op == Op::Update {
        version = client
            .get_instance(GetInstanceRequest {
                id: instance_id(owned),
                name: String::new(),
            })
            .await
            .context("reading the instance to update")?
            .into_inner()
            .instance
            .context("get returned no instance")?
            .version;
    }
    let mut page_token = String::new();
    let mut page = 0;
    loop {
        let started = Instant::now();
        if started >= end {
            return Ok(latency);
        }
        match op {
            Op::Get => {
                let n = rng.gen_range(1..=instances);
                let response = client
                    .get_instance(GetInstanceRequest {
                        id: instance_id(n),
                        name: String::new(),
                    })
                    .await
                    .context("GetInstance failed")?;
                ensure!(
                    response.get_ref().instance.is_some(),
                    "get returned no instance"
                );
            }
            Op::List => {
                let response = client
                    .list_instances(ListInstancesRequest {
                        page_size: PAGE_SIZE,
                        page_token: std::mem::take(&mut page_token),
                        label_selector: SELECTOR.to_owned(),
                        ..Default::default()
                    })
                    .await
                    .context("ListInstances failed")?
                    .into_inner();
                ensure!(
                    response.instances.len() == PAGE_SIZE as usize,
                    "list returned {} instances, expected a full page",
                    response.instances.len()
                );
                page += 1;
                if page < LIST_PAGES && !response.next_page_token.is_empty() {
                    page_token = response.next_page_token;
                } else {
                    page = 0;
                }
            }
            Op::Update => {
                // tier and region stay as seeded so List keeps selecting the same rows.
                let labels = HashMap::from([
                    ("tier".to_owned(), tier(owned).to_owned()),
                    ("region".to_owned(), region(owned).to_owned()),
                    ("team".to_owned(), format!("team-{}", owned % 50)),
                    ("revision".to_owned(), version.to_string()),
                ]);
                let updated = client
                    .update_instance(UpdateInstanceRequest {
                        id: instance_id(owned),
                        instance: Some(Instance {
                            labels,
                            ..Default::default()
                        }),
                        update_mask: Some(prost_types::FieldMask {
                            paths: vec!["labels".to_owned()],
                        }),
                        expected_version: version,
                    })
                    .await
                    .context("UpdateInstance failed")?
                    .into_inner()
                    .instance
                    .context("update returned no instance")?;
                ensure!(
                    updated.version == version + 1,
                    "update went from version {version} to {}",
                    updated.version
                );
                version = updated.version;
            }
            Op::Empty | Op::DocumentGet | Op::DocumentUpdate => {
                bail!("{op:?} is not a registry call")
            }
        }
        record(&mut latency, started, warmed_up);
    }
}

/// Records the latency of a call that started at `started`, unless it started in the warm-up.
fn record(latency: &mut Histogram<u64>, started: Instant, warmed_up: Instant) {
    if started >= warmed_up {
        let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        latency.saturating_record(micros.max(1));
    }
}

/// One client task of the empty call, as [`worker`] is for the registry's.
async fn empty_worker(
    mut client: ceiling::EmptyClient,
    warmed_up: Instant,
    end: Instant,
) -> anyhow::Result<Histogram<u64>> {
    let mut latency = histogram()?;
    loop {
        let started = Instant::now();
        if started >= end {
            return Ok(latency);
        }
        ceiling::call(&mut client)
            .await
            .context("the empty call failed")?;
        record(&mut latency, started, warmed_up);
    }
}

/// One task of the single-document design, doing what [`worker`] does for Get and Update: a
/// random instance for Get; for Update, an instance of its own whose labels it rewrites with the
/// version it last saw.
async fn document_worker(
    op: Op,
    documents: document::Documents,
    task: usize,
    instances: u32,
    warmed_up: Instant,
    end: Instant,
) -> anyhow::Result<Histogram<u64>> {
    let mut latency = histogram()?;
    let mut rng = StdRng::seed_from_u64(task as u64);
    let owned = instances - task as u32;
    let owned_id = instance_id(owned);
    let mut version = 0;
    if op == Op::DocumentUpdate {
        version = documents
            .get(TENANT, &owned_id)
            .await
            .context("reading the document instance to update")?
            .version;
    }
    loop {
        let started = Instant::now();
        if started >= end {
            return Ok(latency);
        }
        match op {
            Op::DocumentGet => {
                let id = instance_id(rng.gen_range(1..=instances));
                let instance = documents
                    .get(TENANT, &id)
                    .await
                    .context("document Get failed")?;
                ensure!(instance.id == id, "document Get returned another instance");
            }
            Op::DocumentUpdate => {
                let labels = BTreeMap::from([
                    ("tier".to_owned(), tier(owned).to_owned()),
                    ("region".to_owned(), region(owned).to_owned()),
                    ("team".to_owned(), format!("team-{}", owned % 50)),
                    ("revision".to_owned(), version.to_string()),
                ]);
                let updated = documents
                    .update_labels(TENANT, &owned_id, labels, version)
                    .await
                    .context("document Update failed")?;
                ensure!(
                    updated.version == version + 1,
                    "document update went from version {version} to {}",
                    updated.version
                );
                version = updated.version;
            }
            Op::Get | Op::List | Op::Update | Op::Empty => {
                bail!("{op:?} is not a single-document call")
            }
        }
        record(&mut latency, started, warmed_up);
    }
}

async fn drain_outbox(pool: &PgPool) -> anyhow::Result<()> {
    let outbox = keel_registry::outbox();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let pending = outbox.pending(pool).await?;
        if pending == 0 {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "the relay left {pending} events unpublished for 30 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// pgbench on the testkit's server, selecting the seeded rows by primary key.
struct Pgbench {
    program: PathBuf,
    script: tempfile::NamedTempFile,
    host: String,
    port: u16,
    user: String,
    password: Option<String>,
    database: String,
    clients: usize,
    threads: usize,
    meter: Option<CpuMeter>,
}

impl Pgbench {
    fn new(
        server: &keel_testkit::PostgresServer,
        db: &keel_testkit::TestDatabase,
        clients: usize,
        instances: u32,
        meter: Option<CpuMeter>,
    ) -> anyhow::Result<Self> {
        // The server's own major version if installed here, else whatever is on PATH.
        let program = server
            .bin_dir
            .as_deref()
            .map(|dir| dir.join("pgbench"))
            .filter(|path| path.is_file())
            .unwrap_or_else(|| PathBuf::from("pgbench"));
        let mut script = tempfile::Builder::new()
            .prefix("keel-bench-")
            .suffix(".sql")
            .tempfile()?;
        // The columns a client would want; the registry's Get reads all 17 and checks the tenant.
        // `-M prepared` sends :n as a parameter of unknown type, which to_hex cannot resolve
        // (int or bigint) without the cast.
        std::io::Write::write_all(
            &mut script,
            format!(
                "\\set n random(1, {instances})\n\
                 SELECT id, name, engine, url_masked, labels, version FROM registry.instances \
                 WHERE id = ('00000000-0000-7000-8000-' || lpad(to_hex(:n::bigint), 12, '0'))::uuid;\n"
            )
            .as_bytes(),
        )?;
        // A KEEL_TEST_DATABASE_URL server may need a password; libpq takes it from PGPASSWORD.
        let url = url::Url::parse(&db.url).context("parsing the test database URL")?;
        let password = url.password().map(|p| {
            percent_encoding::percent_decode_str(p)
                .decode_utf8_lossy()
                .into_owned()
        });
        Ok(Self {
            program,
            script,
            host: server.host.clone(),
            port: server.port,
            user: server.user.clone(),
            password,
            database: db.name.clone(),
            clients,
            threads: clients.min(2),
            meter,
        })
    }

    async fn version(&self) -> anyhow::Result<String> {
        let output = tokio::process::Command::new(&self.program)
            .arg("--version")
            .output()
            .await
            .with_context(|| {
                format!(
                    "running {} (install postgresql-client or postgresql)",
                    self.program.display()
                )
            })?;
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    }

    async fn run(&self, secs: u64) -> anyhow::Result<PgbenchRun> {
        if secs == 0 {
            return Ok(PgbenchRun {
                tps: 0.0,
                latency_avg_ms: 0.0,
                cpu: None,
            });
        }
        let mut command = tokio::process::Command::new(&self.program);
        command
            .args(["-n", "-M", "prepared"])
            .arg("-c")
            .arg(self.clients.to_string())
            .arg("-j")
            .arg(self.threads.to_string())
            .arg("-T")
            .arg(secs.to_string())
            .arg("-f")
            .arg(self.script.path())
            .arg("-h")
            .arg(&self.host)
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-U")
            .arg(&self.user)
            .arg(&self.database);
        if let Some(password) = &self.password {
            command.env("PGPASSWORD", password);
        }
        let backends = self.meter.map(|m| m.postgres_children());
        let cpu_start = self.meter.and_then(|m| m.sample());
        let output = command
            .output()
            .await
            .with_context(|| format!("running {}", self.program.display()))?;
        let mut cpu_end = None;
        if let (Some(meter), Some(backends)) = (self.meter, &backends) {
            meter.wait_for_exit_of_all_but(backends).await;
            cpu_end = meter.sample();
        }
        let stdout = String::from_utf8_lossy(&output.stdout);
        if !output.status.success() {
            bail!(
                "pgbench failed ({}): {}{}",
                output.status,
                stdout,
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let mut run = parse_pgbench(&stdout, self.script.path())?;
        if let (Some(start), Some(end)) = (cpu_start, cpu_end) {
            let transactions = (run.tps * secs as f64) as u64;
            run.cpu = Some(end.since(start).pgbench_per_op(transactions));
        }
        Ok(run)
    }
}

fn parse_pgbench(stdout: &str, script: &Path) -> anyhow::Result<PgbenchRun> {
    let number = |line: &str, prefix: &str| -> Option<f64> {
        line.strip_prefix(prefix)?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    let mut tps = None;
    let mut latency_avg_ms = None;
    for line in stdout.lines() {
        if line.contains("without initial connection time") {
            tps = tps.or(number(line, "tps = "));
        }
        latency_avg_ms = latency_avg_ms.or(number(line, "latency average = "));
        if let Some(failed) = number(line, "number of failed transactions: ") {
            ensure!(
                failed == 0.0,
                "pgbench ({}) had failed transactions:\n{stdout}",
                script.display()
            );
        }
    }
    match (tps, latency_avg_ms) {
        (Some(tps), Some(latency_avg_ms)) => Ok(PgbenchRun {
            tps,
            latency_avg_ms,
            cpu: None,
        }),
        _ => bail!("cannot find tps and latency average in pgbench's output:\n{stdout}"),
    }
}

/// Where the server's time went, per statement: answers whether the auth cache hits (few
/// auth.api_keys lookups) and how the registry's queries compare with pgbench's.
async fn print_statements(pool: &PgPool) -> anyhow::Result<()> {
    let rows: Vec<(i64, f64, String)> = sqlx::query_as(
        "SELECT calls, mean_exec_time, left(regexp_replace(query, '\\s+', ' ', 'g'), 110)
         FROM pg_stat_statements
         WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
         ORDER BY calls DESC LIMIT 8",
    )
    .fetch_all(pool)
    .await
    .context("reading pg_stat_statements")?;
    // The registry's statements, without pgbench's (the only ones computing ids with lpad).
    let (auth_lookups, calls): (i64, i64) = sqlx::query_as(
        "SELECT coalesce(sum(calls) FILTER (WHERE query ILIKE '%FROM auth.api_keys%'), 0)::bigint,
                coalesce(sum(calls) FILTER (WHERE query ILIKE '%registry.instances%'
                                              AND query NOT ILIKE '%lpad(%'), 0)::bigint
         FROM pg_stat_statements
         WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())",
    )
    .fetch_one(pool)
    .await
    .context("reading pg_stat_statements")?;
    println!();
    println!(
        "auth: {auth_lookups} API key lookups in PostgreSQL for about {calls} gRPC calls (one registry.instances statement each); all others hit the key cache"
    );
    println!("server-side statements (pg_stat_statements, all rounds):");
    println!("{:>10} {:>9}  query", "calls", "mean ms");
    for (calls, mean_ms, query) in rows {
        println!("{calls:>10} {mean_ms:>9.3}  {query}");
    }
    Ok(())
}

/// A rate as the table shows it: whole operations per second, with a decimal below 100/s,
/// where the single-document design lands.
fn rate(ops_per_sec: f64) -> String {
    if ops_per_sec < 100.0 {
        format!("{ops_per_sec:.1}")
    } else {
        format!("{ops_per_sec:.0}")
    }
}

/// The goals against the two references, the empty call and the single-document design, with
/// the CPU figures that explain them.
fn print_references(
    medians: &HashMap<Op, (f64, Option<CpuPerOp>)>,
    settings: Settings,
) -> anyhow::Result<()> {
    let median = |op: Op| {
        medians
            .get(&op)
            .copied()
            .with_context(|| format!("no {op:?} results"))
    };
    let verdict = |met: bool| if met { "MET" } else { "NOT MET" };
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    // CPU per op times ops/s: how many of the machine's cores a load kept busy. Well below all
    // of them, a load waits (on a lock, on the network) rather than computes.
    let busy = |ops: f64, cpu: CpuPerOp| cpu.total() * ops / 1e6;

    let (get, get_cpu) = median(Op::Get)?;
    let (empty, empty_cpu) = median(Op::Empty)?;
    let ratio = get / empty;
    println!(
        "Get / empty call = {ratio:.2} (goal >= {GOAL_CEILING_RATIO}) {}",
        verdict(ratio >= GOAL_CEILING_RATIO)
    );
    if let (Some(g), Some(e)) = (get_cpu, empty_cpu) {
        println!(
            "  CPU per op: Get {:.0} µs, empty call {:.0} µs; Get's own work: service {:+.0} µs, \
             postgres {:+.0} µs, client {:+.0} µs; from CPU alone Get / empty = {:.2}; \
             cores busy: Get {:.1}, empty {:.1} of {cores}",
            g.total(),
            e.total(),
            g.service.unwrap_or(0.0) - e.service.unwrap_or(0.0),
            g.postgres - e.postgres,
            g.client - e.client,
            e.total() / g.total(),
            busy(get, g),
            busy(empty, e),
        );
    }

    for (name, keel_op, document_op) in [
        ("Get", Op::Get, Op::DocumentGet),
        ("Update", Op::Update, Op::DocumentUpdate),
    ] {
        let (keel, keel_cpu) = median(keel_op)?;
        let (document, document_cpu) = median(document_op)?;
        // No document call started after the warm-up: a window shorter than one call, not a
        // result, and never a MET.
        if document == 0.0 {
            println!(
                "{name} / document {name}: NOT MEASURED, no document {name} started in the window \
                 (raise KEEL_BENCH_SECS)"
            );
            continue;
        }
        let multiple = keel / document;
        println!(
            "{name} / document {name} = {multiple:.0}x (goal >= {GOAL_DOCUMENT_MULTIPLE:.0}x) {}",
            verdict(multiple >= GOAL_DOCUMENT_MULTIPLE)
        );
        if let (Some(k), Some(d)) = (keel_cpu, document_cpu) {
            println!(
                "  CPU per op: document {name} {:.0} µs (service {:.0}, postgres {:.0}), \
                 Keel {name} {:.0} µs; from CPU alone {:.0}x; \
                 cores busy: document {:.1}, Keel {:.1} of {cores}",
                d.total(),
                d.service.unwrap_or(0.0),
                d.postgres,
                k.total(),
                d.total() / k.total(),
                busy(document, d),
                busy(keel, k),
            );
        }
    }
    println!(
        "  Keel at {} instances, the document at {}: Keel's Get and Update touch one row through \
         an index, a cost that hardly grows with the fleet, the document's grows in proportion to it, \
         so the larger registry only handicaps Keel; Keel's calls also cross gRPC, auth and limits, \
         the document's do not.",
        settings.instances, settings.document_instances
    );
    Ok(())
}

fn cpu_columns(cpu: Option<CpuPerOp>) -> String {
    let Some(cpu) = cpu else {
        return format!("{:>8} {:>8} {:>8}", "-", "-", "-");
    };
    let service = cpu
        .service
        .map_or_else(|| "-".to_owned(), |us| format!("{us:.1}"));
    format!("{:>8.1} {service:>8} {:>8.1}", cpu.client, cpu.postgres)
}

/// Reads CPU time from /proc: this process's, its client threads', its waited-for children's
/// (pgbench) and the PostgreSQL server's. Only when PostgreSQL is a local process we can see.
#[derive(Debug, Clone, Copy)]
struct CpuMeter {
    postmaster: u32,
}

/// Cumulative CPU time, in clock ticks.
#[derive(Debug, Clone, Copy)]
struct CpuTimes {
    process: u64,
    client_threads: u64,
    children: u64,
    postgres: u64,
}

/// /proc reports CPU time in USER_HZ ticks, which Linux fixes at 100 per second for user space.
const TICK_MICROS: f64 = 10_000.0;

impl CpuMeter {
    async fn find(pool: &PgPool) -> Option<Self> {
        let backend: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(pool)
            .await
            .ok()?;
        // A remote server's backend pid may be any local process: check it is PostgreSQL.
        let is_postgres = |pid: u32| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|comm| comm.trim() == "postgres")
        };
        let backend = u32::try_from(backend).ok()?;
        let postmaster = ProcStat::read(&format!("/proc/{backend}/stat"))?.ppid;
        (is_postgres(backend) && is_postgres(postmaster)).then_some(Self { postmaster })
    }

    /// Pids of the PostgreSQL server's processes but the postmaster.
    fn postgres_children(self) -> HashSet<u32> {
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return HashSet::new();
        };
        entries
            .flatten()
            .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| {
                ProcStat::read(&format!("/proc/{pid}/stat"))
                    .is_some_and(|stat| stat.ppid == self.postmaster)
            })
            .collect()
    }

    /// Waits (up to 5 s) until every server process not in `kept` has been reaped. A backend's
    /// CPU time moves into the postmaster's children time only then; sampled before, the
    /// pgbench backends' time would be missed here and counted in the next measurement.
    async fn wait_for_exit_of_all_but(self, kept: &HashSet<u32>) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline && !self.postgres_children().is_subset(kept) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn sample(self) -> Option<CpuTimes> {
        let process = ProcStat::read("/proc/self/stat")?;
        let mut client_threads = 0;
        for entry in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
            let dir = entry.path();
            let is_client = std::fs::read_to_string(dir.join("comm"))
                .is_ok_and(|comm| comm.trim() == CLIENT_THREAD);
            if is_client && let Some(stat) = ProcStat::read(&dir.join("stat").to_string_lossy()) {
                client_threads += stat.cpu();
            }
        }
        let postmaster = ProcStat::read(&format!("/proc/{}/stat", self.postmaster))?;
        // Exited backends are in the postmaster's children time; live ones are added one by one.
        let mut postgres = postmaster.cpu() + postmaster.children_cpu();
        for entry in std::fs::read_dir("/proc").ok()?.flatten() {
            if !entry
                .file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
            {
                continue;
            }
            if let Some(stat) = ProcStat::read(&entry.path().join("stat").to_string_lossy())
                && stat.ppid == self.postmaster
            {
                postgres += stat.cpu();
            }
        }
        Some(CpuTimes {
            process: process.cpu(),
            client_threads,
            children: process.children_cpu(),
            postgres,
        })
    }
}

impl CpuTimes {
    fn since(self, start: CpuTimes) -> CpuTimes {
        CpuTimes {
            process: self.process.saturating_sub(start.process),
            client_threads: self.client_threads.saturating_sub(start.client_threads),
            children: self.children.saturating_sub(start.children),
            postgres: self.postgres.saturating_sub(start.postgres),
        }
    }

    fn registry_per_op(self, ops: u64) -> CpuPerOp {
        let per_op = |ticks: u64| ticks as f64 * TICK_MICROS / ops.max(1) as f64;
        CpuPerOp {
            client: per_op(self.client_threads),
            service: Some(per_op(self.process.saturating_sub(self.client_threads))),
            postgres: per_op(self.postgres),
        }
    }

    fn pgbench_per_op(self, transactions: u64) -> CpuPerOp {
        let per_op = |ticks: u64| ticks as f64 * TICK_MICROS / transactions.max(1) as f64;
        CpuPerOp {
            client: per_op(self.children),
            service: None,
            postgres: per_op(self.postgres),
        }
    }
}

/// The fields of a /proc/<pid>/stat (or a thread's) this benchmark needs.
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
        // The command name (field 2) may contain spaces and parentheses; fields after it don't.
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

    fn children_cpu(self) -> u64 {
        self.cutime + self.cstime
    }
}
