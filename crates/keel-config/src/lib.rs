//! Settings shared by Keel's binaries.
//!
//! Each group is a `clap::Args` struct that reads a flag or its `KEEL_*` environment
//! variable, so a binary declares all its configuration in one place by flattening
//! the groups it needs, and calls `validate` on them before doing anything else.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};

/// A setting that cannot be used, with what to change.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The value does not parse or is out of range.
    #[error("{setting}: {reason}")]
    Invalid {
        /// Flag and environment variable, e.g. `--database-url / KEEL_DATABASE_URL`.
        setting: &'static str,
        /// What is wrong and what to do.
        reason: String,
    },
    /// A secret file could not be read.
    #[error("{setting}: cannot read {path}: {source}")]
    SecretFile {
        /// Flag and environment variable naming the file.
        setting: &'static str,
        /// The file.
        path: PathBuf,
        /// Why it could not be read.
        source: std::io::Error,
    },
}

/// Where the PostgreSQL state store is.
#[derive(Debug, Clone, clap::Args)]
pub struct DatabaseConfig {
    /// PostgreSQL URL of Keel's state store (each service keeps its own schema there).
    #[arg(
        id = "database_url",
        long = "database-url",
        env = "KEEL_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/keel",
        hide_env_values = true
    )]
    pub url: SecretString,
    /// Most connections one process holds open to the state store.
    #[arg(
        id = "database_max_connections",
        long = "database-max-connections",
        env = "KEEL_DATABASE_MAX_CONNECTIONS",
        default_value_t = 16
    )]
    pub max_connections: u32,
    /// How long to wait for a free connection before failing a request.
    #[arg(id = "database_acquire_timeout", long = "database-acquire-timeout", env = "KEEL_DATABASE_ACQUIRE_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub acquire_timeout: Duration,
}

impl DatabaseConfig {
    /// A configuration for `url` with default pool settings.
    pub fn from_url(url: impl Into<String>) -> Self {
        Self {
            url: SecretString::from(url.into()),
            max_connections: 16,
            acquire_timeout: Duration::from_secs(5),
        }
    }

    /// Checks the URL scheme and pool bounds.
    pub fn validate(&self) -> Result<(), ConfigError> {
        const SETTING: &str = "--database-url / KEEL_DATABASE_URL";
        let parsed =
            url::Url::parse(self.url.expose_secret()).map_err(|e| ConfigError::Invalid {
                setting: SETTING,
                reason: format!(
                    "not a URL ({e}); expected postgres://user:password@host:5432/database"
                ),
            })?;
        if !matches!(parsed.scheme(), "postgres" | "postgresql") {
            return Err(ConfigError::Invalid {
                setting: SETTING,
                reason: format!(
                    "scheme {:?} is not supported; use postgres://",
                    parsed.scheme()
                ),
            });
        }
        if self.max_connections == 0 {
            return Err(ConfigError::Invalid {
                setting: "--database-max-connections / KEEL_DATABASE_MAX_CONNECTIONS",
                reason: "must be at least 1".into(),
            });
        }
        Ok(())
    }
}

/// Where NATS JetStream is.
#[derive(Debug, Clone, clap::Args)]
pub struct NatsConfig {
    /// NATS server URL (JetStream must be enabled: `nats-server -js`).
    #[arg(
        id = "nats_url",
        long = "nats-url",
        env = "KEEL_NATS_URL",
        default_value = "nats://127.0.0.1:4222"
    )]
    pub url: String,
    /// File holding the NATS credentials (`.creds`), if the server requires them.
    #[arg(
        id = "nats_credentials_file",
        long = "nats-credentials-file",
        env = "KEEL_NATS_CREDENTIALS_FILE"
    )]
    pub credentials_file: Option<PathBuf>,
}

impl NatsConfig {
    /// A configuration for `url` without credentials.
    pub fn from_url(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            credentials_file: None,
        }
    }

    /// Checks that the URL parses as a NATS URL.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let parsed = url::Url::parse(&self.url).map_err(|e| ConfigError::Invalid {
            setting: "--nats-url / KEEL_NATS_URL",
            reason: format!("not a URL ({e}); expected nats://host:4222"),
        })?;
        if !matches!(parsed.scheme(), "nats" | "tls" | "ws" | "wss") {
            return Err(ConfigError::Invalid {
                setting: "--nats-url / KEEL_NATS_URL",
                reason: format!("scheme {:?} is not supported; use nats://", parsed.scheme()),
            });
        }
        Ok(())
    }
}

/// Where a served process listens.
#[derive(Debug, Clone, clap::Args)]
pub struct ListenConfig {
    /// Address of the gRPC listener.
    #[arg(
        long = "grpc-listen",
        env = "KEEL_GRPC_LISTEN",
        default_value = "127.0.0.1:50051"
    )]
    pub grpc: SocketAddr,
    /// Address of the HTTP listener (/metrics, /healthz, /readyz).
    #[arg(
        long = "http-listen",
        env = "KEEL_HTTP_LISTEN",
        default_value = "127.0.0.1:9090"
    )]
    pub http: SocketAddr,
    /// How long in-flight requests may take to finish after a shutdown signal.
    #[arg(long = "shutdown-grace", env = "KEEL_SHUTDOWN_GRACE", default_value = "20s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,
}

/// How a process logs and traces.
#[derive(Debug, Clone, clap::Args)]
pub struct TelemetryConfig {
    /// Log filter in `RUST_LOG` syntax.
    #[arg(long = "log", env = "KEEL_LOG", default_value = "info")]
    pub log_filter: String,
    /// Log format.
    #[arg(long = "log-format", env = "KEEL_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// OTLP/gRPC endpoint for traces; tracing export is off when unset.
    #[arg(long = "otlp-endpoint", env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// Service name reported in traces.
    #[arg(
        long = "service-name",
        env = "OTEL_SERVICE_NAME",
        default_value = "keel"
    )]
    pub service_name: String,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object a line, for log collectors.
    Json,
}

/// Reads a secret from a file, trimming one trailing newline (as Kubernetes Secrets are mounted).
pub fn read_secret_file(
    setting: &'static str,
    path: &std::path::Path,
) -> Result<SecretString, ConfigError> {
    let raw = std::fs::read_to_string(path).map_err(|source| ConfigError::SecretFile {
        setting,
        path: path.to_owned(),
        source,
    })?;
    Ok(SecretString::from(
        raw.trim_end_matches(['\n', '\r']).to_owned(),
    ))
}

/// Parses durations such as `250ms`, `5s`, `2m`, `1h`.
pub fn parse_duration(raw: &str) -> Result<Duration, String> {
    let raw = raw.trim();
    let split = raw.find(|c: char| !c.is_ascii_digit()).unwrap_or(raw.len());
    let (digits, unit) = raw.split_at(split);
    let value: u64 = digits
        .parse()
        .map_err(|_| format!("{raw:?} is not a duration; write e.g. 500ms, 5s, 2m or 1h"))?;
    let duration = match unit {
        "ms" => Duration::from_millis(value),
        "s" | "" => Duration::from_secs(value),
        "m" => Duration::from_secs(value * 60),
        "h" => Duration::from_secs(value * 3600),
        other => {
            return Err(format!(
                "unknown unit {other:?} in {raw:?}; use ms, s, m or h"
            ));
        }
    };
    Ok(duration)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("ms").is_err());
    }

    #[test]
    fn database_url_must_be_postgres() {
        assert!(
            DatabaseConfig::from_url("postgres://u@h/db")
                .validate()
                .is_ok()
        );
        let err = DatabaseConfig::from_url("mysql://u@h/db")
            .validate()
            .unwrap_err();
        assert!(err.to_string().contains("use postgres://"), "{err}");
        assert!(DatabaseConfig::from_url("not a url").validate().is_err());
    }

    #[test]
    fn nats_url_must_be_nats() {
        assert!(
            NatsConfig::from_url("nats://127.0.0.1:4222")
                .validate()
                .is_ok()
        );
        assert!(
            NatsConfig::from_url("http://127.0.0.1:4222")
                .validate()
                .is_err()
        );
    }
}
