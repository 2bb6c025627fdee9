//! The process-wide PostgreSQL server and the template every test database is copied from.

use std::ffi::OsStr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use sqlx::{Connection, Executor, PgConnection};

use crate::process::{self, Spec, Supervised};

/// Name of the template database with the extensions already created.
pub(crate) const TEMPLATE: &str = "keel_template";

/// Extensions created in [`TEMPLATE`].
const EXTENSIONS: [&str; 2] = ["pg_stat_statements", "hypopg"];

/// Attempts at starting a server, for when another process takes the free port first.
const START_ATTEMPTS: usize = 3;

const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// The process-wide PostgreSQL server that test databases are created on.
///
/// Either started by the harness (once per test process) or the one named by
/// `KEEL_TEST_DATABASE_URL`.
#[derive(Debug)]
pub struct PostgresServer {
    /// Superuser URL to the `postgres` database.
    pub admin_url: String,
    /// Host the server listens on.
    pub host: String,
    /// TCP port the server listens on.
    pub port: u16,
    /// Superuser name.
    pub user: String,
    /// `/usr/lib/postgresql/<major>/bin` of the server's major version (for `pgbench`, `psql`),
    /// if it is installed locally.
    pub bin_dir: Option<PathBuf>,
    /// Keeps the server running: dropped only at process exit, because the server lives in a static.
    _process: Option<Supervised>,
}

/// Set once per process. An error is kept as text so that later tests fail fast with the same
/// message instead of each waiting for a server that will not start.
static SERVER: OnceLock<Result<PostgresServer, String>> = OnceLock::new();

/// Process-wide PostgreSQL server, started on first use.
///
/// The server outlives every test's tokio runtime: it is started on a dedicated thread with its
/// own runtime, and nothing the caller's runtime owns is kept.
pub async fn postgres() -> anyhow::Result<&'static PostgresServer> {
    let server = match SERVER.get() {
        Some(server) => server,
        // `get_or_init` blocks concurrent callers until the first one is done, so it runs on the
        // blocking pool rather than on a runtime worker.
        None => tokio::task::spawn_blocking(|| SERVER.get_or_init(start_on_own_thread))
            .await
            .context("the PostgreSQL start task failed")?,
    };
    server.as_ref().map_err(|e| anyhow!("{e}"))
}

fn start_on_own_thread() -> Result<PostgresServer, String> {
    let started = std::thread::Builder::new()
        .name("keel-testkit-postgres".into())
        .spawn(|| {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("build a tokio runtime")?;
            runtime.block_on(start())
        })
        .map_err(|e| format!("spawn the PostgreSQL start thread: {e}"))?
        .join();
    match started {
        Ok(Ok(server)) => Ok(server),
        Ok(Err(e)) => Err(format!("{e:#}")),
        Err(_) => Err("the PostgreSQL start thread panicked".into()),
    }
}

async fn start() -> anyhow::Result<PostgresServer> {
    match std::env::var("KEEL_TEST_DATABASE_URL") {
        Ok(url) if !url.is_empty() => external(url).await,
        _ => owned().await,
    }
}

/// Uses the server named by `KEEL_TEST_DATABASE_URL`; missing extensions are only warnings there.
async fn external(admin_url: String) -> anyhow::Result<PostgresServer> {
    let parsed = url::Url::parse(&admin_url).context("KEEL_TEST_DATABASE_URL is not a URL")?;
    let mut conn = PgConnection::connect(&admin_url)
        .await
        .context("connect to KEEL_TEST_DATABASE_URL")?;
    let version: String = sqlx::query_scalar("SHOW server_version_num")
        .fetch_one(&mut conn)
        .await?;
    conn.close().await?;
    let major = version.parse::<u32>().context("parse server_version_num")? / 10_000;
    create_template(&admin_url, major, false).await?;
    let bin_dir = PathBuf::from(format!("/usr/lib/postgresql/{major}/bin"));
    Ok(PostgresServer {
        host: parsed.host_str().unwrap_or("localhost").to_owned(),
        port: parsed.port().unwrap_or(5432),
        user: match parsed.username() {
            "" => "postgres".to_owned(),
            user => user.to_owned(),
        },
        bin_dir: bin_dir.is_dir().then_some(bin_dir),
        admin_url,
        _process: None,
    })
}

/// Starts a throwaway server from the newest locally installed PostgreSQL.
async fn owned() -> anyhow::Result<PostgresServer> {
    let (major, bin_dir) = newest_installation()?;
    // initdb and postgres refuse to run as root.
    let user = if process::running_as_root() {
        Some(process::lookup_user("postgres")?)
    } else {
        None
    };
    let mut attempt = 1;
    loop {
        match start_owned(&bin_dir, user).await {
            Ok((process, port)) => {
                let admin_url = format!("postgres://postgres@127.0.0.1:{port}/postgres");
                create_template(&admin_url, major, true).await?;
                tracing::info!(port, major, "started PostgreSQL for tests");
                return Ok(PostgresServer {
                    admin_url,
                    host: "127.0.0.1".to_owned(),
                    port,
                    user: "postgres".to_owned(),
                    bin_dir: Some(bin_dir),
                    _process: Some(process),
                });
            }
            Err(e) if attempt < START_ATTEMPTS && process::is_retryable(&e) => {
                tracing::warn!(attempt, error = %format!("{e:#}"), "PostgreSQL start failed; retrying");
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

/// `(major, bin dir)` of the newest `/usr/lib/postgresql/<major>/bin/initdb`.
fn newest_installation() -> anyhow::Result<(u32, PathBuf)> {
    let root = Path::new("/usr/lib/postgresql");
    std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let major = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").is_file().then_some((major, bin))
        })
        .max_by_key(|(major, _)| *major)
        .context("no /usr/lib/postgresql/<major>/bin/initdb: apt-get install postgresql")
}

/// One attempt: a new data directory, initdb, then the server on a new port.
async fn start_owned(
    bin_dir: &Path,
    user: Option<(u32, u32)>,
) -> anyhow::Result<(Supervised, u16)> {
    let dir = process::scratch_dir("pg")?;
    if let Some((uid, gid)) = user {
        std::os::unix::fs::chown(&dir, Some(uid), Some(gid))
            .with_context(|| format!("chown {} to the postgres user", dir.display()))?;
    }
    let data = dir.join("data");
    let mut initdb = Command::new(bin_dir.join("initdb"));
    initdb
        .arg("-D")
        .arg(&data)
        .args([
            "--auth=trust",
            "-U",
            "postgres",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
        ])
        .current_dir(&dir);
    if let Some((uid, gid)) = user {
        initdb.uid(uid).gid(gid);
    }
    let output = initdb.output().context("run initdb")?;
    if !output.status.success() {
        let _ = std::fs::remove_dir_all(&dir);
        bail!(
            "initdb failed ({}): {}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    let port = process::free_port()?;
    let port_arg = port.to_string();
    let socket_dir = format!("unix_socket_directories={}", dir.display());
    let mut args: Vec<&OsStr> = vec![
        "-D".as_ref(),
        data.as_os_str(),
        "-p".as_ref(),
        port_arg.as_ref(),
    ];
    for setting in [
        "listen_addresses=127.0.0.1",
        &socket_dir,
        "shared_preload_libraries=pg_stat_statements",
        "pg_stat_statements.track=all",
        // Throwaway data: durability only costs time.
        "fsync=off",
        "synchronous_commit=off",
        "full_page_writes=off",
        // Tests run in parallel, each with its own pool.
        "max_connections=400",
    ] {
        args.push("-c".as_ref());
        args.push(setting.as_ref());
    }
    let postgres = bin_dir.join("postgres");
    let mut process = Supervised::spawn(Spec {
        name: "postgres",
        program: &postgres,
        args,
        stop_signal: "QUIT",
        dir: &dir,
        user,
    })?;

    let admin_url = format!("postgres://postgres@127.0.0.1:{port}/postgres");
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if process.exited()?.is_some() {
            return Err(process.failure("PostgreSQL did not start"));
        }
        match PgConnection::connect(&admin_url).await {
            Ok(conn) => {
                conn.close().await?;
                return Ok((process, port));
            }
            Err(e) if Instant::now() > deadline => {
                return Err(process.failure(&format!(
                    "PostgreSQL did not accept connections within {READY_TIMEOUT:?} ({e})"
                )));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Creates [`TEMPLATE`] unless it exists.
///
/// It is built under a unique name and renamed at the end, so a concurrent test process (on a
/// shared `KEEL_TEST_DATABASE_URL` server) never copies a half-built template. It ends up with
/// `ALLOW_CONNECTIONS false`: `CREATE DATABASE … TEMPLATE` fails while anyone is connected to the
/// template, and this makes sure no one is.
async fn create_template(admin_url: &str, major: u32, required: bool) -> anyhow::Result<()> {
    let mut admin = PgConnection::connect(admin_url).await?;
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(TEMPLATE)
            .fetch_one(&mut admin)
            .await?;
    if exists {
        return Ok(admin.close().await?);
    }
    let building = format!("keel_template_{}", uuid::Uuid::now_v7().simple());
    admin
        .execute(format!(r#"CREATE DATABASE "{building}""#).as_str())
        .await
        .context("create the template database")?;

    let mut template = PgConnection::connect(&database_url(admin_url, &building)?).await?;
    for extension in EXTENSIONS {
        let available: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = $1)",
        )
        .bind(extension)
        .fetch_one(&mut template)
        .await?;
        let package = match extension {
            "hypopg" => format!("postgresql-{major}-hypopg"),
            _ => format!("postgresql-contrib (or postgresql-{major})"),
        };
        if available {
            template
                .execute(format!("CREATE EXTENSION IF NOT EXISTS {extension}").as_str())
                .await
                .with_context(|| format!("create extension {extension}"))?;
        } else if required {
            template.close().await?;
            let _ = admin
                .execute(format!(r#"DROP DATABASE "{building}""#).as_str())
                .await;
            bail!(
                "the {extension} extension is not installed for PostgreSQL {major}: \
                 apt-get install {package}"
            );
        } else {
            tracing::warn!(
                extension,
                "extension not available on KEEL_TEST_DATABASE_URL; test databases will lack it \
                 (install {package} there, then drop {TEMPLATE})"
            );
        }
    }
    template.close().await?;

    let renamed = admin
        .execute(format!(r#"ALTER DATABASE "{building}" RENAME TO {TEMPLATE}"#).as_str())
        .await;
    match renamed {
        Ok(_) => {
            admin
                .execute(
                    format!(
                        "ALTER DATABASE {TEMPLATE} WITH IS_TEMPLATE true ALLOW_CONNECTIONS false"
                    )
                    .as_str(),
                )
                .await?;
        }
        // Another process finished its template first; use that one.
        Err(e) if has_sql_state(&e, "42P04") => {
            admin
                .execute(format!(r#"DROP DATABASE "{building}""#).as_str())
                .await?;
        }
        Err(e) => return Err(e).context("rename the template database"),
    }
    Ok(admin.close().await?)
}

/// `admin_url` with its database replaced by `database`.
pub(crate) fn database_url(admin_url: &str, database: &str) -> anyhow::Result<String> {
    let mut url = url::Url::parse(admin_url).context("parse the admin URL")?;
    url.set_path(&format!("/{database}"));
    Ok(url.into())
}

/// Whether `error` is a database error with SQLSTATE `state`.
pub(crate) fn has_sql_state(error: &sqlx::Error, state: &str) -> bool {
    error
        .as_database_error()
        .and_then(|e| e.code())
        .is_some_and(|code| code == state)
}
