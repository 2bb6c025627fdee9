//! The demo's PostgreSQL and NATS: the ones named by the environment, else the ones answering on
//! their default ports, else throwaway servers under `<target>/demo` on free ports.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::background::{Background, Stop};
use super::net;
use crate::{cmd, setup};

/// A server the demo uses, and the process when the demo started it.
#[derive(Debug)]
pub(crate) struct Backing {
    pub(crate) url: String,
    pub(crate) server: Option<Background>,
}

const DATABASE: &str = "keel";

pub(crate) fn postgres(demo_dir: &Path) -> Result<Backing> {
    if let Some(url) = env("KEEL_DATABASE_URL") {
        cmd::step("PostgreSQL: using KEEL_DATABASE_URL");
        return Ok(Backing { url, server: None });
    }
    if net::answers("127.0.0.1:5432") {
        let user = env("PGUSER").unwrap_or_else(|| "postgres".to_owned());
        cmd::step(format!(
            "PostgreSQL: using the server on 127.0.0.1:5432 as {user} (PGUSER, PGPASSWORD apply)"
        ));
        let exists = cmd::output(psql(5432, &user, "postgres").args([
            "-c",
            &format!("SELECT 1 FROM pg_database WHERE datname = '{DATABASE}'"),
        ]))
        .context(
            "cannot query the PostgreSQL on 127.0.0.1:5432: set PGUSER/PGPASSWORD, or KEEL_DATABASE_URL \
             to a database keel may use",
        )?;
        if exists.trim() != "1" {
            cmd::run(
                psql(5432, &user, "postgres").args(["-c", &format!("CREATE DATABASE {DATABASE}")]),
            )?;
        }
        let url = postgres_url(&user, env("PGPASSWORD").as_deref(), 5432);
        return Ok(Backing { url, server: None });
    }
    start_postgres(demo_dir)
}

/// initdb + postgres on a free port, as the `postgres` OS user when running as root (initdb
/// refuses root), with pg_stat_statements preloaded and hypopg created, like a monitored server.
fn start_postgres(demo_dir: &Path) -> Result<Backing> {
    cmd::step("PostgreSQL: nothing on 127.0.0.1:5432, starting a throwaway server");
    let major = setup::pg_major()
        .context("no PostgreSQL server under /usr/lib/postgresql: run `cargo xtask setup`")?;
    let bin = setup::pg_bin(major);
    let as_root = cmd::is_root();
    let data = data_dir(demo_dir, as_root)?;
    let port = net::free_port()?;

    cmd::run(
        as_postgres(as_root, bin.join("initdb"))
            .args([
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-sync",
                "-D",
            ])
            .arg(&data)
            .stdout(std::process::Stdio::null()),
    )?;
    let mut server_cmd = as_postgres(as_root, bin.join("postgres"));
    server_cmd.arg("-D").arg(&data).args([
        "-p",
        &port.to_string(),
        "-k",
        "", // no Unix socket: everything goes over 127.0.0.1
        "-c",
        "listen_addresses=127.0.0.1",
        "-c",
        "shared_preload_libraries=pg_stat_statements",
        "-c",
        "fsync=off",
    ]);
    let mut stop = as_postgres(as_root, bin.join("pg_ctl"));
    stop.arg("-D").arg(&data).args(["-m", "fast", "-w", "stop"]);
    let mut server = Background::spawn(
        "postgres",
        server_cmd,
        &demo_dir.join("postgres.log"),
        Stop::Command(stop),
    )?;

    let deadline = Instant::now() + Duration::from_secs(30);
    while !cmd::succeeds(psql(port, "postgres", "postgres").args(["-c", "SELECT 1"])) {
        server.check_running()?;
        if Instant::now() > deadline {
            bail!(
                "postgres did not accept connections within 30 s; see {}",
                server.log().display()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    cmd::run(
        psql(port, "postgres", "postgres").args(["-c", &format!("CREATE DATABASE {DATABASE}")]),
    )?;
    cmd::run(psql(port, "postgres", DATABASE).args([
        "-c",
        "CREATE EXTENSION IF NOT EXISTS pg_stat_statements",
        "-c",
        "CREATE EXTENSION IF NOT EXISTS hypopg",
    ]))?;
    Ok(Backing {
        url: postgres_url("postgres", None, port),
        server: Some(server),
    })
}

/// A fresh data directory the server's OS user can reach: `<demo>/postgres`, or under the system
/// temp dir when running as root and `postgres` cannot traverse the checkout (e.g. under /root).
fn data_dir(demo_dir: &Path, as_root: bool) -> Result<PathBuf> {
    let fresh = |dir: &Path| -> Result<()> {
        if dir.exists() {
            std::fs::remove_dir_all(dir)
                .with_context(|| format!("cannot remove {}", dir.display()))?;
        }
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        if as_root {
            cmd::run(Command::new("chown").arg("postgres:postgres").arg(dir))?;
        }
        Ok(())
    };
    let preferred = demo_dir.join("postgres");
    fresh(&preferred)?;
    if !as_root
        || cmd::succeeds(
            Command::new("runuser")
                .args(["-u", "postgres", "--", "test", "-w"])
                .arg(&preferred),
        )
    {
        return Ok(preferred);
    }
    let fallback = std::env::temp_dir().join("keel-demo-postgres");
    eprintln!(
        "demo: the postgres user cannot reach {}, using {}",
        preferred.display(),
        fallback.display()
    );
    std::fs::remove_dir_all(&preferred).ok();
    fresh(&fallback)?;
    Ok(fallback)
}

fn as_postgres(as_root: bool, program: PathBuf) -> Command {
    if as_root {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

/// `psql` over TCP, no password prompt, quiet unaligned output, stopping at the first error.
fn psql(port: u16, user: &str, database: &str) -> Command {
    let mut c = Command::new("psql");
    c.args([
        "-h",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-U",
        user,
        "-d",
        database,
        "-w",
        "-X",
        "-q",
        "-tA",
    ])
    .args(["-v", "ON_ERROR_STOP=1"])
    .env("PGCONNECT_TIMEOUT", "5");
    c
}

fn postgres_url(user: &str, password: Option<&str>, port: u16) -> String {
    let password = password
        .map(|p| format!(":{}", percent_encode(p)))
        .unwrap_or_default();
    format!(
        "postgres://{}{password}@127.0.0.1:{port}/{DATABASE}",
        percent_encode(user)
    )
}

fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

pub(crate) fn nats(demo_dir: &Path) -> Result<Backing> {
    if let Some(url) = env("KEEL_NATS_URL") {
        cmd::step("NATS: using KEEL_NATS_URL");
        return Ok(Backing { url, server: None });
    }
    const DEFAULT: &str = "127.0.0.1:4222";
    if net::answers(DEFAULT) {
        if net::nats_has_jetstream(DEFAULT).unwrap_or(false) {
            cmd::step("NATS: using the JetStream server on 127.0.0.1:4222");
            return Ok(Backing {
                url: format!("nats://{DEFAULT}"),
                server: None,
            });
        }
        cmd::step("NATS: the server on 127.0.0.1:4222 has no JetStream, starting a throwaway one");
    } else {
        cmd::step("NATS: nothing on 127.0.0.1:4222, starting a throwaway server");
    }
    let port = net::free_port()?;
    let store = demo_dir.join("nats");
    if store.exists() {
        std::fs::remove_dir_all(&store)
            .with_context(|| format!("cannot remove {}", store.display()))?;
    }
    let mut command = Command::new("nats-server");
    command
        .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
        .arg(&store);
    let mut server = Background::spawn(
        "nats-server",
        command,
        &demo_dir.join("nats.log"),
        Stop::Term,
    )?;
    let addr = format!("127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(15);
    while !net::nats_has_jetstream(&addr).unwrap_or(false) {
        server.check_running()?;
        if Instant::now() > deadline {
            bail!(
                "nats-server did not answer within 15 s; see {}",
                server.log().display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(Backing {
        url: format!("nats://{addr}"),
        server: Some(server),
    })
}

/// An environment variable that is set and not empty.
pub(crate) fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_urls() {
        assert_eq!(
            postgres_url("postgres", None, 5432),
            "postgres://postgres@127.0.0.1:5432/keel"
        );
        assert_eq!(
            postgres_url("app", Some("p@ss/w:rd"), 6543),
            "postgres://app:p%40ss%2Fw%3Ard@127.0.0.1:6543/keel"
        );
    }
}
