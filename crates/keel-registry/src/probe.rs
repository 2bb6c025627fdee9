//! `CheckInstance`: connects to the database now and reports what Keel needs from it.

use std::time::{Duration, Instant};

use keel_proto::v1::{CheckFinding, CheckStatus, Engine, InstanceRole};
use keel_target::{Connector, TargetError};
use secrecy::ExposeSecret;
use sqlx::Connection;

use crate::connection::{ConnectionUrl, scrub};
use crate::service::RegistryConfig;
use crate::store::Health;

/// What a probe found.
#[derive(Debug)]
pub(crate) struct Report {
    pub(crate) health: Health,
    pub(crate) findings: Vec<CheckFinding>,
}

impl Report {
    fn reachable(
        server_version: String,
        replica: bool,
        latency: Duration,
        findings: Vec<CheckFinding>,
    ) -> Self {
        let role = if replica {
            InstanceRole::Replica
        } else {
            InstanceRole::Primary
        };
        let health = Health {
            reachable: true,
            server_version,
            role,
            error: String::new(),
            latency: Some(latency),
        };
        Report { health, findings }
    }
}

/// Probes the instance behind `url` through the target policy, giving up after the check timeout.
pub(crate) async fn probe(engine: Engine, url: &ConnectionUrl, config: &RegistryConfig) -> Report {
    let timeout = config.check_timeout;
    let targets = &config.targets;
    let outcome = match engine {
        Engine::Redis => tokio::time::timeout(timeout, probe_redis(url, targets)).await,
        _ => tokio::time::timeout(timeout, probe_postgres(url, targets)).await,
    };
    let (error, fix) = match outcome {
        Ok(Ok(report)) => return report,
        // Refused at connect time, on the resolved address: say which setting would allow it.
        Ok(Err(Failure::Target(TargetError::Denied(denied)))) => {
            (denied.to_string(), denied.remedy())
        }
        Ok(Err(failure)) => (
            scrub(&failure.to_string(), &url.secrets),
            "check the host, port and credentials of connection_url, and that the server accepts connections from Keel's address".to_owned(),
        ),
        Err(_) => (
            format!("no answer within {}s", timeout.as_secs_f32()),
            "check the host, port and credentials of connection_url, and that the server accepts connections from Keel's address".to_owned(),
        ),
    };
    Report {
        health: Health {
            reachable: false,
            server_version: String::new(),
            role: InstanceRole::Unspecified,
            error: error.clone(),
            latency: None,
        },
        findings: vec![finding("connection", CheckStatus::Missing, error, fix)],
    }
}

/// Why a probe found nothing.
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error(transparent)]
    Target(#[from] TargetError),
    #[error("{0}")]
    Query(String),
}

fn finding(
    name: &str,
    status: CheckStatus,
    detail: impl Into<String>,
    fix: impl Into<String>,
) -> CheckFinding {
    CheckFinding {
        name: name.to_owned(),
        status: status as i32,
        detail: detail.into(),
        fix: fix.into(),
    }
}

async fn probe_postgres(url: &ConnectionUrl, targets: &Connector) -> Result<Report, Failure> {
    let mut conn = targets.connect_postgres(url.clear.expose_secret()).await?;
    let started = Instant::now();
    sqlx::query("SELECT 1")
        .execute(&mut conn)
        .await
        .map_err(|e| Failure::Query(e.to_string()))?;
    let latency = started.elapsed();

    let (version, in_recovery, database, preload): (String, bool, String, String) = sqlx::query_as(
        "SELECT current_setting('server_version'), pg_is_in_recovery(), current_database(),
                current_setting('shared_preload_libraries')",
    )
    .fetch_one(&mut conn)
    .await
    .map_err(|e| Failure::Query(e.to_string()))?;
    let pgss: Option<String> = sqlx::query_scalar(
        "SELECT extversion FROM pg_extension WHERE extname = 'pg_stat_statements'",
    )
    .fetch_optional(&mut conn)
    .await
    .map_err(|e| Failure::Query(e.to_string()))?;
    let hypopg: Option<(Option<String>, Option<String>)> =
        sqlx::query_as("SELECT default_version, installed_version FROM pg_available_extensions WHERE name = 'hypopg'")
            .fetch_optional(&mut conn)
            .await
            .map_err(|e| Failure::Query(e.to_string()))?;
    let _ = conn.close().await;

    let major = version.split(['.', ' ']).next().unwrap_or("15").to_owned();
    let preloaded = preload
        .split(',')
        .any(|lib| lib.trim() == "pg_stat_statements");
    let mut findings = Vec::new();
    findings.push(match (preloaded, pgss) {
        (true, Some(v)) => finding("pg_stat_statements", CheckStatus::Ok, format!("loaded, extension {v} created"), ""),
        (true, None) => finding(
            "pg_stat_statements",
            CheckStatus::Missing,
            format!("loaded but the extension is not created in database {database}"),
            format!("run in database {database}: CREATE EXTENSION pg_stat_statements;"),
        ),
        (false, _) => finding(
            "pg_stat_statements",
            CheckStatus::Missing,
            "not in shared_preload_libraries, so query statistics are not collected",
            format!(
                "run ALTER SYSTEM SET shared_preload_libraries = '{}'; restart PostgreSQL; then in database {database}: CREATE EXTENSION pg_stat_statements;",
                if preload.trim().is_empty() { "pg_stat_statements".to_owned() } else { format!("{preload},pg_stat_statements") }
            ),
        ),
    });
    findings.push(match hypopg {
        Some((_, Some(installed))) => finding("hypopg", CheckStatus::Ok, format!("extension {installed} created"), ""),
        Some((default, None)) => finding(
            "hypopg",
            CheckStatus::Ok,
            format!("installable (version {}); the optimizer creates it when it first needs it", default.unwrap_or_default()),
            "",
        ),
        None => finding(
            "hypopg",
            CheckStatus::Missing,
            "not installed on the server, so index advice cannot cost hypothetical indexes",
            format!(
                "install it on the database host (Debian/Ubuntu: apt-get install postgresql-{major}-hypopg; RHEL: dnf install hypopg_{major}), then in database {database}: CREATE EXTENSION hypopg;"
            ),
        ),
    });
    Ok(Report::reachable(version, in_recovery, latency, findings))
}

async fn probe_redis(url: &ConnectionUrl, targets: &Connector) -> Result<Report, Failure> {
    let mut conn = targets.connect_redis(url.clear.expose_secret()).await?;
    let started = Instant::now();
    let _: String = redis::cmd("PING")
        .query_async(&mut conn)
        .await
        .map_err(|e| Failure::Query(e.to_string()))?;
    let latency = started.elapsed();
    // Only the sections the check reads, so the replies stay small (one section per call:
    // INFO with several sections needs Redis 7).
    let mut info = String::new();
    for section in ["server", "memory", "replication", "cluster"] {
        let part: String = redis::cmd("INFO")
            .arg(section)
            .query_async(&mut conn)
            .await
            .map_err(|e| Failure::Query(e.to_string()))?;
        info.push_str(&part);
    }
    let field = |name: &str| {
        info.lines()
            .find_map(|line| {
                line.strip_prefix(name)
                    .and_then(|rest| rest.strip_prefix(':'))
            })
            .map(|v| v.trim().to_owned())
            .unwrap_or_default()
    };
    let maxmemory: u64 = field("maxmemory").parse().unwrap_or(0);
    let policy = field("maxmemory_policy");
    let mut findings = vec![if maxmemory == 0 {
        finding(
            "maxmemory",
            CheckStatus::Warning,
            "maxmemory is 0 (unlimited): Redis grows until the host runs out of memory",
            "run CONFIG SET maxmemory <bytes> and CONFIG SET maxmemory-policy allkeys-lru (or volatile-lru), then CONFIG REWRITE to keep them in redis.conf",
        )
    } else {
        finding(
            "maxmemory",
            CheckStatus::Ok,
            format!("{maxmemory} bytes, policy {policy}"),
            "",
        )
    }];
    findings.push(if field("cluster_enabled") == "1" {
        finding(
            "cluster_mode",
            CheckStatus::Ok,
            "cluster mode enabled; this check covers the node in the URL only",
            "",
        )
    } else {
        finding(
            "cluster_mode",
            CheckStatus::Ok,
            "standalone (cluster mode disabled)",
            "",
        )
    });
    Ok(Report::reachable(
        field("redis_version"),
        field("role") == "slave",
        latency,
        findings,
    ))
}
