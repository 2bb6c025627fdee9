//! Real servers for Keel's tests: PostgreSQL, NATS with JetStream, and Redis.
//!
//! ```no_run
//! # async fn example() -> anyhow::Result<()> {
//! let env = keel_testkit::TestEnv::new();
//! let db = env.database().await?; // fresh, empty database
//! let pool = db.pool().await?; // pool in this test's runtime
//! let nats = env.nats_url().await?; // this TestEnv's own nats-server
//! let redis = env.redis_url().await?; // this TestEnv's own redis-server
//! # let _ = (pool, nats, redis);
//! # Ok(())
//! # }
//! ```
//!
//! - **PostgreSQL**: one server per test process, started on first use from the newest
//!   `/usr/lib/postgresql/<major>/bin` (as the `postgres` OS user when running as root). Every
//!   [`TestEnv::database`] call copies a new database from `keel_template`, which has the
//!   `pg_stat_statements` and `hypopg` extensions; `pg_stat_statements` is preloaded.
//! - **NATS and Redis**: one server per [`TestEnv`], started on first use and stopped when the
//!   `TestEnv` is dropped.
//! - **Cleanup**: every server runs under a small `sh` wrapper that stops it (and deletes its
//!   scratch directory under `<temp>/keel-testkit/`) as soon as the test process lets go of it —
//!   on drop, or when the process exits or is killed. Directories of dead test processes are
//!   removed on the next run.
//! - Never share a pool or any tokio object between tests: each `#[tokio::test]` has its own
//!   runtime. Only the server processes are shared.
//!
//! # Environment overrides
//!
//! - `KEEL_TEST_DATABASE_URL`: superuser URL (database `postgres`) of an existing server to use
//!   instead of starting one. Databases are still fresh per call, but are left behind
//!   (`keel_test_*`). A missing `hypopg` or `pg_stat_statements` is only a warning there. The
//!   template is created once per server; to rebuild it, run
//!   `ALTER DATABASE keel_template IS_TEMPLATE false; DROP DATABASE keel_template`.
//! - [`NatsServer::start`] starts a nats-server with a configuration of the test's own (accounts,
//!   users, permissions); `KEEL_TEST_NATS_URL` does not apply to it.
//! - `KEEL_TEST_NATS_URL`, `KEEL_TEST_REDIS_URL`: returned as is instead of starting servers.
//!   Tests then share those servers, so there is **no isolation**: use unique stream, subject and
//!   key names.
//!
//! Missing binaries are reported with the Debian package to install (`nats-server`,
//! `redis-server`, `postgresql-<major>-hypopg`).

pub mod bench;
mod grpc;
mod postgres;
mod process;

use std::ffi::OsStr;
use std::time::{Duration, Instant};

use anyhow::Context;
use sqlx::{Connection, Executor, PgConnection};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::OnceCell;

pub use grpc::GrpcServer;
pub use postgres::{PostgresServer, postgres};
pub use process::free_port;

use process::{Spec, Supervised};

const READY_TIMEOUT: Duration = Duration::from_secs(30);
const START_ATTEMPTS: usize = 3;

/// Per-test environment. Cheap to create; servers start lazily.
///
/// NATS and Redis servers belong to this value and are stopped when it is dropped; keep it alive
/// for as long as the test uses them.
#[derive(Debug, Default)]
pub struct TestEnv {
    nats: OnceCell<Service>,
    redis: OnceCell<Service>,
}

/// A server owned by one [`TestEnv`].
#[derive(Debug)]
struct Service {
    url: String,
    _process: Supervised,
}

impl TestEnv {
    /// An environment with no servers started yet.
    pub fn new() -> TestEnv {
        TestEnv::default()
    }

    /// A fresh, empty database (CREATE DATABASE from a template that already has the extensions
    /// pg_stat_statements and hypopg created), on the process-wide PostgreSQL server. Each call
    /// -> a new database.
    pub async fn database(&self) -> anyhow::Result<TestDatabase> {
        let server = postgres().await?;
        let name = format!("keel_test_{}", uuid::Uuid::now_v7().simple());
        // A connection of our own: a pool would belong to whichever runtime created it.
        let mut admin = PgConnection::connect(&server.admin_url)
            .await
            .context("connect to the test PostgreSQL server")?;
        let create = format!(
            r#"CREATE DATABASE "{name}" TEMPLATE {}"#,
            postgres::TEMPLATE
        );
        let mut attempt = 1;
        loop {
            match admin.execute(create.as_str()).await {
                Ok(_) => break,
                // "source database is being accessed by other users": someone was connected to
                // the template (possible on a shared KEEL_TEST_DATABASE_URL server).
                Err(e) if postgres::has_sql_state(&e, "55006") && attempt < 10 => {
                    tokio::time::sleep(Duration::from_millis(100 * attempt)).await;
                    attempt += 1;
                }
                Err(e) => return Err(e).with_context(|| format!("create database {name}")),
            }
        }
        admin.close().await?;
        Ok(TestDatabase {
            url: postgres::database_url(&server.admin_url, &name)?,
            name,
        })
    }

    /// URL of a nats-server with JetStream that belongs to this TestEnv alone (started on first
    /// call, killed on drop). With `KEEL_TEST_NATS_URL` set, that URL (shared, not isolated).
    pub async fn nats_url(&self) -> anyhow::Result<String> {
        if let Some(url) = override_url("KEEL_TEST_NATS_URL") {
            return Ok(url);
        }
        let service = self.nats.get_or_try_init(start_nats).await?;
        Ok(service.url.clone())
    }

    /// URL of a redis-server that belongs to this TestEnv alone (started on first call, killed on
    /// drop). With `KEEL_TEST_REDIS_URL` set, that URL (shared, not isolated).
    pub async fn redis_url(&self) -> anyhow::Result<String> {
        if let Some(url) = override_url("KEEL_TEST_REDIS_URL") {
            return Ok(url);
        }
        let service = self.redis.get_or_try_init(start_redis).await?;
        Ok(service.url.clone())
    }
}

/// A database created for one test. It is not dropped afterwards: the server's data directory
/// goes away with the test process.
#[derive(Debug, Clone)]
pub struct TestDatabase {
    /// Connection URL (superuser) of this database.
    pub url: String,
    /// Database name, `keel_test_<uuid>`.
    pub name: String,
}

impl TestDatabase {
    /// A new pool on this database (created in the caller's runtime).
    pub async fn pool(&self) -> anyhow::Result<sqlx::PgPool> {
        sqlx::PgPool::connect(&self.url)
            .await
            .with_context(|| format!("connect to test database {}", self.name))
    }
}

fn override_url(variable: &str) -> Option<String> {
    std::env::var(variable).ok().filter(|url| !url.is_empty())
}

/// A nats-server with JetStream started from a configuration file of the test's own, stopped when
/// dropped.
#[derive(Debug)]
pub struct NatsServer {
    service: Service,
}

impl NatsServer {
    /// Starts nats-server with `config` (nats-server configuration syntax: accounts, users,
    /// permissions, …). Listen address, port, server name and JetStream store are set by the
    /// harness and win over the file. Readiness is checked by connecting as `user` with
    /// `password`, who must be allowed to call `$JS.API.INFO` and receive its reply.
    pub async fn start(config: &str, user: &str, password: &str) -> anyhow::Result<NatsServer> {
        let service = start_nats_with(Some(config), Some((user, password))).await?;
        Ok(NatsServer { service })
    }

    /// `nats://127.0.0.1:<port>`, no user.
    pub fn url(&self) -> &str {
        &self.service.url
    }

    /// The URL with `user` and `password` in it, as clients take them.
    pub fn url_for(&self, user: &str, password: &str) -> anyhow::Result<String> {
        let mut url = url::Url::parse(&self.service.url)?;
        url.set_username(user)
            .and_then(|()| url.set_password(Some(password)))
            .map_err(|()| anyhow::anyhow!("cannot put credentials into {}", self.service.url))?;
        Ok(url.to_string())
    }
}

async fn start_nats() -> anyhow::Result<Service> {
    start_nats_with(None, None).await
}

async fn start_nats_with(
    config: Option<&str>,
    probe_user: Option<(&str, &str)>,
) -> anyhow::Result<Service> {
    let program = process::find_program("nats-server", "nats-server")?;
    start_with_retries(|| async {
        let dir = process::scratch_dir("nats")?;
        let port = process::free_port()?.to_string();
        let store = dir.join("jetstream");
        // A unique server name lets readiness tell our server from another test's that
        // already holds the port (free_port only finds a port that was free a moment ago).
        let name = format!("keel-test-{}", uuid::Uuid::now_v7().simple());
        let config_file = dir.join("nats.conf");
        let mut args: Vec<&OsStr> = vec![];
        if let Some(config) = config {
            std::fs::write(&config_file, config)
                .with_context(|| format!("write {}", config_file.display()))?;
            args.extend(["-c".as_ref(), config_file.as_os_str()]);
        }
        args.extend::<[&OsStr; 9]>([
            "-js".as_ref(),
            "-a".as_ref(),
            "127.0.0.1".as_ref(),
            "-p".as_ref(),
            port.as_ref(),
            "-n".as_ref(),
            name.as_ref(),
            "-sd".as_ref(),
            store.as_os_str(),
        ]);
        let mut process = Supervised::spawn(Spec {
            name: "nats-server",
            program: &program,
            args,
            stop_signal: "KILL",
            dir: &dir,
            user: None,
        })?;
        let url = format!("nats://127.0.0.1:{port}");
        wait_ready(&mut process, || jetstream_ready(&url, &name, probe_user)).await?;
        Ok(Service {
            url,
            _process: process,
        })
    })
    .await
}

async fn start_redis() -> anyhow::Result<Service> {
    let program = process::find_program("redis-server", "redis-server")?;
    start_with_retries(|| async {
        let dir = process::scratch_dir("redis")?;
        let port = process::free_port()?.to_string();
        let args: Vec<&OsStr> = vec![
            "--port".as_ref(),
            port.as_ref(),
            "--bind".as_ref(),
            "127.0.0.1".as_ref(),
            "--save".as_ref(),
            "".as_ref(),
            "--appendonly".as_ref(),
            "no".as_ref(),
            "--dir".as_ref(),
            dir.as_os_str(),
        ];
        let mut process = Supervised::spawn(Spec {
            name: "redis-server",
            program: &program,
            args,
            stop_signal: "KILL",
            dir: &dir,
            user: None,
        })?;
        let address = format!("127.0.0.1:{port}");
        wait_ready(&mut process, || redis_ready(&address, &dir)).await?;
        Ok(Service {
            url: format!("redis://{address}"),
            _process: process,
        })
    })
    .await
}

/// Retries a start whose server exited early, typically because another process took the port.
async fn start_with_retries<F, Fut>(mut start: F) -> anyhow::Result<Service>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Service>>,
{
    let mut attempt = 1;
    loop {
        match start().await {
            Ok(service) => return Ok(service),
            Err(e) if attempt < START_ATTEMPTS && process::is_retryable(&e) => {
                tracing::warn!(attempt, error = %format!("{e:#}"), "server start failed; retrying");
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Polls `probe` until it succeeds; fails early when the server exits.
async fn wait_ready<F, Fut>(process: &mut Supervised, mut probe: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if process.exited()?.is_some() {
            return Err(process.failure("server did not start"));
        }
        let error = match tokio::time::timeout(Duration::from_secs(5), probe()).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) => e,
            Err(_) => anyhow::anyhow!("probe timed out"),
        };
        if Instant::now() > deadline {
            return Err(process.failure(&format!(
                "server not ready within {READY_TIMEOUT:?} ({error:#})"
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Asks JetStream for the account info.
///
/// A raw request rather than `jetstream::Context::query_account`: async-nats 0.42 cannot parse
/// the answer of nats-server 2.9 (Debian bookworm), which lacks the `reserved_*` fields.
async fn jetstream_ready(url: &str, name: &str, user: Option<(&str, &str)>) -> anyhow::Result<()> {
    let mut options = async_nats::ConnectOptions::new();
    if let Some((user, password)) = user {
        options = options.user_and_password(user.to_owned(), password.to_owned());
    }
    let client = options.connect(url).await?;
    let answering = client.server_info().server_name;
    anyhow::ensure!(
        answering == name,
        "port taken by another nats-server ({answering})"
    );
    let reply = client.request("$JS.API.INFO", "".into()).await?;
    let body = String::from_utf8_lossy(&reply.payload);
    // Until JetStream is up the server answers with an `error` object (or has no responders).
    anyhow::ensure!(
        body.contains("account_info_response") && !body.contains(r#""error""#),
        "JetStream not ready: {body}"
    );
    Ok(())
}

/// Asks the server for its directory with an inline command (no Redis client needed for
/// one command): only our server has our scratch directory, so another test's server that
/// already holds the port is not mistaken for ours.
async fn redis_ready(address: &str, dir: &std::path::Path) -> anyhow::Result<()> {
    let mut stream = tokio::net::TcpStream::connect(address).await?;
    stream.write_all(b"CONFIG GET dir\r\n").await?;
    // Redis reports the directory it changed into, with symlinks resolved.
    let expected = dir.canonicalize().unwrap_or_else(|_| dir.to_owned());
    let expected = expected.to_string_lossy();
    let mut reply = Vec::new();
    let mut chunk = [0u8; 512];
    // The reply is `*2 $3 dir $<n> <path>`: read until the path has arrived.
    while reply.iter().filter(|&&b| b == b'\n').count() < 5 {
        let n = stream.read(&mut chunk).await?;
        anyhow::ensure!(n > 0, "connection closed before CONFIG GET answered");
        reply.extend_from_slice(&chunk[..n]);
    }
    let reply = String::from_utf8_lossy(&reply);
    anyhow::ensure!(
        reply.contains(expected.as_ref()),
        "port taken by another redis-server: {reply:?}"
    );
    Ok(())
}
