//! `cargo xtask setup`: installs the Debian packages that the tests, the benchmarks and the demo use.
//!
//! Idempotent: it asks `dpkg-query` first and touches apt only when something is missing, so on a
//! ready machine it costs a few milliseconds.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::cmd;

/// Packages needed whatever PostgreSQL major is installed. `postgresql-contrib` is dropped when
/// apt does not know it as a package of its own (on newer releases contrib is part of the server).
const PACKAGES: &[&str] = &[
    "postgresql",         // server, psql, pgbench
    "postgresql-contrib", // pg_stat_statements (a metapackage on Debian 12)
    "nats-server",
    "redis-server",
    "libclang-dev", // bindgen, for pg_query
    "pkg-config",
    "prometheus", // promtool, which checks what /metrics serves
    "curl",       // the README walkthrough (tests/tests/readme.rs) waits on /readyz with it
    // the collector benchmark's peers (tests/benches/collector.rs)
    "prometheus-postgres-exporter",
    "prometheus-redis-exporter",
];

/// Where Debian puts each PostgreSQL major's server binaries.
const PG_LIB: &str = "/usr/lib/postgresql";

pub(crate) fn run() -> Result<()> {
    if !cmd::on_path("dpkg-query") {
        eprintln!(
            "setup: warning: not a Debian-like system (no dpkg-query); install yourself: PostgreSQL with \
             pg_stat_statements and hypopg, nats-server, redis-server, libclang, pkg-config, promtool, \
             and for the collector benchmark postgres_exporter and redis_exporter"
        );
        return Ok(());
    }
    let mut wanted: Vec<String> = PACKAGES.iter().map(|p| (*p).to_owned()).collect();
    let major_before = pg_major();
    if let Some(major) = major_before {
        wanted.push(hypopg(major));
    }
    let missing: Vec<String> = wanted.iter().filter(|p| !installed(p)).cloned().collect();
    if missing.is_empty() {
        eprintln!("setup: all present: {}", wanted.join(" "));
        return Ok(());
    }
    eprintln!("setup: missing: {}", missing.join(" "));
    let apt = Apt::detect(&missing)?;
    apt.run(&["update"])?;
    let missing: Vec<String> = missing
        .into_iter()
        .filter(|p| {
            let known = p != "postgresql-contrib" || apt.knows(p);
            if !known {
                eprintln!("setup: skipping {p}: apt has no such package here (contrib ships with the server)");
            }
            known
        })
        .collect();
    apt.install(&missing)?;

    // The hypopg package is named after the server's major, known only once the server is in.
    if major_before.is_none() {
        let major = pg_major().with_context(|| {
            format!("postgresql is installed but {PG_LIB}/<major>/bin/postgres is not")
        })?;
        let package = hypopg(major);
        if installed(&package) {
            eprintln!("setup: present: {package}");
        } else {
            apt.install(&[package])?;
        }
    }
    eprintln!("setup: done");
    Ok(())
}

/// The newest PostgreSQL major whose server is installed under `/usr/lib/postgresql`.
pub(crate) fn pg_major() -> Option<u32> {
    std::fs::read_dir(PG_LIB)
        .ok()?
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|major| pg_bin(*major).join("postgres").is_file())
        .max()
}

/// Debian's directory of server binaries (`initdb`, `postgres`, `pg_ctl`) for `major`.
pub(crate) fn pg_bin(major: u32) -> PathBuf {
    Path::new(PG_LIB).join(major.to_string()).join("bin")
}

fn hypopg(major: u32) -> String {
    format!("postgresql-{major}-hypopg")
}

/// Whether dpkg says `package` is installed (`install ok installed`, or held).
fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|out| {
            out.status.success()
                && String::from_utf8_lossy(&out.stdout)
                    .trim_end()
                    .ends_with(" installed")
        })
}

/// How apt-get can be run here: directly as root, through sudo, or not at all.
#[derive(Debug, Clone, Copy)]
enum Apt {
    Root,
    Sudo,
}

impl Apt {
    fn detect(missing: &[String]) -> Result<Self> {
        if cmd::is_root() {
            Ok(Self::Root)
        } else if cmd::on_path("sudo") {
            Ok(Self::Sudo)
        } else {
            bail!(
                "not root and no sudo: run as root\n  \
                 apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends {}",
                missing.join(" ")
            )
        }
    }

    fn command(self) -> Command {
        // `env` keeps DEBIAN_FRONTEND visible in the printed command and survives sudo's env reset.
        let mut cmd = match self {
            Self::Root => Command::new("env"),
            Self::Sudo => {
                let mut c = Command::new("sudo");
                c.arg("env");
                c
            }
        };
        cmd.args(["DEBIAN_FRONTEND=noninteractive", "apt-get"]);
        cmd
    }

    fn run(self, args: &[&str]) -> Result<()> {
        cmd::run(self.command().args(args))
    }

    fn install(self, packages: &[String]) -> Result<()> {
        if packages.is_empty() {
            return Ok(());
        }
        cmd::run(
            self.command()
                .args(["install", "-y", "--no-install-recommends"])
                .args(packages),
        )
    }

    /// Whether apt has a real (not purely virtual) package by this name.
    fn knows(self, package: &str) -> bool {
        cmd::succeeds(Command::new("apt-cache").args(["show", "--no-all-versions", package]))
    }
}
