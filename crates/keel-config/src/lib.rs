//! Settings shared by Keel's binaries.
//!
//! Each group is a `clap::Args` struct that reads a flag or its `KEEL_*` environment
//! variable, so a binary declares all its configuration in one place by flattening
//! the groups it needs, and calls `validate` on them before doing anything else.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;
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
    /// `statement_timeout` of Keel's sessions on the state store: a runaway query fails instead
    /// of holding a connection (migrations lift it on their own connection).
    #[arg(id = "database_statement_timeout", long = "database-statement-timeout", env = "KEEL_DATABASE_STATEMENT_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub statement_timeout: Duration,
    /// `lock_timeout` of Keel's sessions on the state store: a blocked write fails instead of
    /// queueing every request behind it.
    #[arg(id = "database_lock_timeout", long = "database-lock-timeout", env = "KEEL_DATABASE_LOCK_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub lock_timeout: Duration,
}

impl DatabaseConfig {
    /// A configuration for `url` with default pool settings.
    pub fn from_url(url: impl Into<String>) -> Self {
        Self {
            url: SecretString::from(url.into()),
            max_connections: 16,
            acquire_timeout: Duration::from_secs(5),
            statement_timeout: Duration::from_secs(30),
            lock_timeout: Duration::from_secs(10),
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
        for (setting, value) in [
            (
                "--database-statement-timeout / KEEL_DATABASE_STATEMENT_TIMEOUT",
                self.statement_timeout,
            ),
            (
                "--database-lock-timeout / KEEL_DATABASE_LOCK_TIMEOUT",
                self.lock_timeout,
            ),
        ] {
            // Zero would turn the PostgreSQL timeout off rather than make it immediate.
            if value < Duration::from_millis(1) {
                return Err(ConfigError::Invalid {
                    setting,
                    reason: "must be at least 1ms".into(),
                });
            }
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

/// Where a served process listens, and how its listeners are secured.
///
/// Both listeners serve TLS when a certificate and key are set; plaintext has to be asked for
/// with `--allow-plaintext`, so a missing setting never turns into credentials on the wire.
/// [`ListenConfig::plaintext`] and [`ListenConfig::tls`] build one in code (tests, benchmarks).
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
    /// PEM file with the server certificate chain, leaf first, served on both listeners. Re-read
    /// when it changes (checked every 2 s), so a renewed certificate needs no restart.
    #[arg(long = "tls-cert-file", env = "KEEL_TLS_CERT_FILE")]
    pub tls_cert_file: Option<PathBuf>,
    /// PEM file with the private key of --tls-cert-file (PKCS#8, PKCS#1 or SEC1), re-read with it.
    #[arg(long = "tls-key-file", env = "KEEL_TLS_KEY_FILE")]
    pub tls_key_file: Option<PathBuf>,
    /// PEM file with the CAs that sign client certificates: turns on mutual TLS on the gRPC
    /// listener. The HTTP listener never asks for client certificates, so that probes keep
    /// working.
    #[arg(long = "tls-client-ca-file", env = "KEEL_TLS_CLIENT_CA_FILE")]
    pub tls_client_ca_file: Option<PathBuf>,
    /// Whether gRPC clients must present a certificate signed by --tls-client-ca-file
    /// [default: required when --tls-client-ca-file is set].
    #[arg(long = "tls-client-auth", env = "KEEL_TLS_CLIENT_AUTH", value_enum)]
    pub tls_client_auth: Option<ClientAuth>,
    /// Serve without TLS when no certificate is set. Anyone on the network can then read API keys,
    /// credentials and the metrics token: only for a trusted network or a laptop.
    #[arg(long = "allow-plaintext", env = "KEEL_ALLOW_PLAINTEXT", value_parser = clap::builder::BoolishValueParser::new())]
    pub allow_plaintext: bool,
    /// File holding the bearer token that GET /metrics requires (`authorization: Bearer
    /// <token>`). A file, not a value, so the token shows up in neither `ps` nor the environment.
    /// Without it /metrics answers 401, unless --metrics-anonymous is set.
    #[arg(long = "metrics-token-file", env = "KEEL_METRICS_TOKEN_FILE")]
    pub metrics_token_file: Option<PathBuf>,
    /// Serve /metrics to anyone, without a token. /healthz and /readyz are always open.
    #[arg(long = "metrics-anonymous", env = "KEEL_METRICS_ANONYMOUS", value_parser = clap::builder::BoolishValueParser::new())]
    pub metrics_anonymous: bool,
    /// Networks of the reverse proxies and load balancers in front of the HTTP listener, as
    /// comma-separated CIDRs (e.g. `10.0.0.0/8,192.168.1.10`; a bare address is one host). Only a
    /// connection from one of them may name the client in `X-Forwarded-For`; from anywhere else
    /// the header is ignored, since any client can send it. Empty: trust no proxy.
    #[arg(
        long = "trusted-proxies",
        env = "KEEL_TRUSTED_PROXIES",
        value_delimiter = ',',
        value_name = "CIDR,..."
    )]
    pub trusted_proxies: Vec<String>,
    /// Largest request body the HTTP listener accepts, in bytes or with a unit (`256KiB`, `1MiB`,
    /// `1MB`). Larger bodies are refused with 413 Payload Too Large: at once when the declared
    /// Content-Length is larger, otherwise as soon as that many bytes have arrived.
    #[arg(long = "http-body-limit", env = "KEEL_HTTP_BODY_LIMIT", default_value = "1MiB", value_parser = parse_byte_size)]
    pub http_body_limit: usize,
}

/// Whether gRPC clients must present a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ClientAuth {
    /// The handshake fails without a valid client certificate.
    Required,
    /// A client certificate is verified when presented; clients without one still connect (and
    /// must then authenticate otherwise, e.g. with an API key).
    Optional,
}

/// Validated TLS settings of the listeners: there is always a certificate and its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    /// PEM certificate chain, leaf first.
    pub cert_file: PathBuf,
    /// PEM private key of the leaf certificate.
    pub key_file: PathBuf,
    /// Mutual TLS on the gRPC listener, when configured.
    pub client_auth: Option<ClientCertificates>,
}

/// How client certificates are checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCertificates {
    /// PEM file with the CAs that client certificates must chain to.
    pub ca_file: PathBuf,
    /// Whether a certificate is required or only verified when presented.
    pub mode: ClientAuth,
}

/// Who may read `/metrics`.
#[derive(Debug, Clone)]
pub enum MetricsAccess {
    /// Callers presenting this bearer token.
    Token(SecretString),
    /// Anyone (`--metrics-anonymous`).
    Anonymous,
    /// Nobody: neither a token file nor anonymous access was configured.
    Closed,
}

const TLS_CERT: &str = "--tls-cert-file / KEEL_TLS_CERT_FILE";
const TLS_KEY: &str = "--tls-key-file / KEEL_TLS_KEY_FILE";
const TLS_CLIENT_CA: &str = "--tls-client-ca-file / KEEL_TLS_CLIENT_CA_FILE";
const TLS_CLIENT_AUTH: &str = "--tls-client-auth / KEEL_TLS_CLIENT_AUTH";
const METRICS_TOKEN: &str = "--metrics-token-file / KEEL_METRICS_TOKEN_FILE";
const METRICS_ANONYMOUS: &str = "--metrics-anonymous / KEEL_METRICS_ANONYMOUS";
const TRUSTED_PROXIES: &str = "--trusted-proxies / KEEL_TRUSTED_PROXIES";
const HTTP_BODY_LIMIT: &str = "--http-body-limit / KEEL_HTTP_BODY_LIMIT";

/// The default of `--http-body-limit`: 1 MiB, far more than an Alertmanager notification needs.
pub const DEFAULT_HTTP_BODY_LIMIT: usize = 1024 * 1024;

impl ListenConfig {
    /// Listeners on `grpc` and `http` without TLS (plaintext explicitly allowed), with the default
    /// 20 s shutdown grace, `/metrics` closed until a token or anonymous access is set, no trusted
    /// proxy and the default 1 MiB body limit.
    pub fn plaintext(grpc: SocketAddr, http: SocketAddr) -> Self {
        Self {
            grpc,
            http,
            shutdown_grace: Duration::from_secs(20),
            tls_cert_file: None,
            tls_key_file: None,
            tls_client_ca_file: None,
            tls_client_auth: None,
            allow_plaintext: true,
            metrics_token_file: None,
            metrics_anonymous: false,
            trusted_proxies: Vec::new(),
            http_body_limit: DEFAULT_HTTP_BODY_LIMIT,
        }
    }

    /// Listeners on `grpc` and `http` serving TLS with the certificate chain and key in these PEM
    /// files, without client certificates; otherwise like [`ListenConfig::plaintext`].
    pub fn tls(
        grpc: SocketAddr,
        http: SocketAddr,
        cert_file: impl Into<PathBuf>,
        key_file: impl Into<PathBuf>,
    ) -> Self {
        Self {
            tls_cert_file: Some(cert_file.into()),
            tls_key_file: Some(key_file.into()),
            allow_plaintext: false,
            ..Self::plaintext(grpc, http)
        }
    }

    /// Checks that TLS is configured completely, or plaintext explicitly allowed, that the
    /// metrics settings do not contradict each other, that every trusted proxy network is a CIDR
    /// and that the body limit is not zero. Reads no file.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.tls_settings()?;
        if self.metrics_anonymous && self.metrics_token_file.is_some() {
            return Err(ConfigError::Invalid {
                setting: METRICS_ANONYMOUS,
                reason: format!("contradicts {METRICS_TOKEN}; set only one of them"),
            });
        }
        self.trusted_proxy_networks()?;
        if self.http_body_limit == 0 {
            return Err(ConfigError::Invalid {
                setting: HTTP_BODY_LIMIT,
                reason: "must be at least 1 byte; the default is 1MiB".into(),
            });
        }
        Ok(())
    }

    /// The networks in `trusted_proxies`, parsed. Blank entries (as a trailing comma leaves) are
    /// skipped; a bare address is a network of that one host. A network with bits set past its
    /// prefix (`10.0.0.1/8`) is refused rather than guessed at: it is either a typo for a single
    /// host or for the whole network, and the two trust very different sets of peers.
    pub fn trusted_proxy_networks(&self) -> Result<Vec<IpNet>, ConfigError> {
        let invalid = |reason: String| ConfigError::Invalid {
            setting: TRUSTED_PROXIES,
            reason,
        };
        let mut networks = Vec::new();
        for entry in &self.trusted_proxies {
            let entry = entry.trim();
            if entry.is_empty() {
                continue;
            }
            let network = match (entry.parse::<IpNet>(), entry.parse::<IpAddr>()) {
                (Ok(network), _) => network,
                (Err(_), Ok(host)) => IpNet::from(host),
                (Err(_), Err(_)) => {
                    return Err(invalid(format!(
                        "{entry:?} is not a CIDR; write e.g. 10.0.0.0/8, 192.168.1.10 or \
                         fd00::/8, separated by commas"
                    )));
                }
            };
            if network.trunc() != network {
                return Err(invalid(format!(
                    "{entry:?} has bits set past its /{prefix} prefix; write {network_only} for \
                     the whole network or {host} for the single host",
                    prefix = network.prefix_len(),
                    network_only = network.trunc(),
                    host = network.addr(),
                )));
            }
            networks.push(network);
        }
        Ok(networks)
    }

    /// The TLS settings, or `None` when the listeners serve plaintext (only if allowed).
    pub fn tls_settings(&self) -> Result<Option<TlsSettings>, ConfigError> {
        let (cert_file, key_file) = match (&self.tls_cert_file, &self.tls_key_file) {
            (Some(cert), Some(key)) => (cert.clone(), key.clone()),
            (Some(_), None) => {
                return Err(ConfigError::Invalid {
                    setting: TLS_KEY,
                    reason: format!("{TLS_CERT} is set, so its private key is needed too"),
                });
            }
            (None, Some(_)) => {
                return Err(ConfigError::Invalid {
                    setting: TLS_CERT,
                    reason: format!("{TLS_KEY} is set, so its certificate is needed too"),
                });
            }
            (None, None) => {
                if self.tls_client_ca_file.is_some() {
                    return Err(ConfigError::Invalid {
                        setting: TLS_CLIENT_CA,
                        reason: format!(
                            "client certificates need TLS: set {TLS_CERT} and {TLS_KEY}"
                        ),
                    });
                }
                if self.allow_plaintext {
                    return Ok(None);
                }
                return Err(ConfigError::Invalid {
                    setting: TLS_CERT,
                    reason: format!(
                        "no TLS certificate configured: set {TLS_CERT} and {TLS_KEY}, or set \
                         --allow-plaintext / KEEL_ALLOW_PLAINTEXT=true to serve without TLS \
                         (anyone on the network can then read API keys and credentials)"
                    ),
                });
            }
        };
        let client_auth = match (&self.tls_client_ca_file, self.tls_client_auth) {
            (Some(ca_file), mode) => Some(ClientCertificates {
                ca_file: ca_file.clone(),
                mode: mode.unwrap_or(ClientAuth::Required),
            }),
            (None, Some(_)) => {
                return Err(ConfigError::Invalid {
                    setting: TLS_CLIENT_AUTH,
                    reason: format!(
                        "client certificates need a CA to check them: set {TLS_CLIENT_CA}"
                    ),
                });
            }
            (None, None) => None,
        };
        Ok(Some(TlsSettings {
            cert_file,
            key_file,
            client_auth,
        }))
    }

    /// Who may read `/metrics`; reads the token file when one is set. An empty token is refused,
    /// because it would let anyone in who sends `Bearer ` with nothing after it.
    pub fn metrics_access(&self) -> Result<MetricsAccess, ConfigError> {
        match (&self.metrics_token_file, self.metrics_anonymous) {
            (Some(_), true) => Err(ConfigError::Invalid {
                setting: METRICS_ANONYMOUS,
                reason: format!("contradicts {METRICS_TOKEN}; set only one of them"),
            }),
            (Some(path), false) => {
                let token = read_secret_file(METRICS_TOKEN, path)?;
                if token.expose_secret().trim().is_empty() {
                    return Err(ConfigError::Invalid {
                        setting: METRICS_TOKEN,
                        reason: format!("{} is empty; put the token in it", path.display()),
                    });
                }
                Ok(MetricsAccess::Token(token))
            }
            (None, true) => Ok(MetricsAccess::Anonymous),
            (None, false) => Ok(MetricsAccess::Closed),
        }
    }
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

/// Parses byte sizes such as `1048576`, `512B`, `256KiB`, `1MiB`, `1GiB`, or in powers of 1000
/// `500kB`, `1MB`, `1GB`; `k`, `m` and `g` alone are KiB, MiB and GiB, as in nginx. Units are
/// case-insensitive; a space may separate number and unit.
pub fn parse_byte_size(raw: &str) -> Result<usize, String> {
    let raw = raw.trim();
    let split = raw.find(|c: char| !c.is_ascii_digit()).unwrap_or(raw.len());
    let (digits, unit) = raw.split_at(split);
    let value: u64 = digits
        .parse()
        .map_err(|_| format!("{raw:?} is not a size; write bytes, or e.g. 256KiB, 1MiB or 1MB"))?;
    let multiplier: u64 = match unit.trim_start().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kib" | "k" => 1 << 10,
        "mib" | "m" => 1 << 20,
        "gib" | "g" => 1 << 30,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        _ => {
            return Err(format!(
                "unknown unit {unit:?} in {raw:?}; use B, KiB, MiB, GiB, kB, MB or GB"
            ));
        }
    };
    value
        .checked_mul(multiplier)
        .and_then(|bytes| usize::try_from(bytes).ok())
        .ok_or_else(|| format!("{raw:?} is too large"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly on purpose
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
    fn byte_sizes_parse_with_units() {
        assert_eq!(parse_byte_size("1048576"), Ok(1 << 20));
        assert_eq!(parse_byte_size("512B"), Ok(512));
        assert_eq!(parse_byte_size("256KiB"), Ok(256 << 10));
        assert_eq!(parse_byte_size("1MiB"), Ok(1 << 20));
        assert_eq!(parse_byte_size("1 mib"), Ok(1 << 20));
        assert_eq!(parse_byte_size("2m"), Ok(2 << 20));
        assert_eq!(parse_byte_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_byte_size("500kB"), Ok(500_000));
        assert_eq!(parse_byte_size("1MB"), Ok(1_000_000));
        assert!(parse_byte_size("MiB").is_err());
        assert!(parse_byte_size("-1").is_err());
        assert!(parse_byte_size("1.5MiB").is_err());
        assert!(parse_byte_size("1 parsec").is_err());
        assert!(parse_byte_size("99999999999999999999GiB").is_err());
        assert!(parse_byte_size("18446744073709551615GiB").is_err());
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

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn tls() -> ListenConfig {
        ListenConfig::tls(addr(1), addr(2), "/tls/tls.crt", "/tls/tls.key")
    }

    /// Checks that validation fails naming `setting`, with `hint` in the reason.
    fn check_invalid(config: &ListenConfig, setting: &str, hint: &str) {
        let err = config.validate().unwrap_err();
        let ConfigError::Invalid { setting: named, .. } = &err else {
            panic!("not an invalid setting: {err}");
        };
        assert_eq!(*named, setting, "{err}");
        assert!(err.to_string().contains(hint), "{err}");
    }

    #[test]
    fn listeners_need_tls_or_explicit_plaintext() {
        let mut config = ListenConfig::plaintext(addr(1), addr(2));
        assert_eq!(config.tls_settings().unwrap(), None);
        config.validate().unwrap();

        config.allow_plaintext = false;
        check_invalid(
            &config,
            TLS_CERT,
            "set --tls-cert-file / KEEL_TLS_CERT_FILE and --tls-key-file / KEEL_TLS_KEY_FILE, \
             or set --allow-plaintext / KEEL_ALLOW_PLAINTEXT=true",
        );

        assert_eq!(
            tls().tls_settings().unwrap(),
            Some(TlsSettings {
                cert_file: "/tls/tls.crt".into(),
                key_file: "/tls/tls.key".into(),
                client_auth: None,
            })
        );
        // TLS wins when both are set: allowing plaintext does not turn TLS off.
        let mut both = tls();
        both.allow_plaintext = true;
        assert!(both.tls_settings().unwrap().is_some());
    }

    #[test]
    fn certificate_and_key_come_together() {
        let mut config = tls();
        config.tls_key_file = None;
        check_invalid(&config, TLS_KEY, "its private key is needed too");
        // Allowing plaintext does not excuse a half-configured TLS.
        config.allow_plaintext = true;
        check_invalid(&config, TLS_KEY, "its private key is needed too");

        let mut config = tls();
        config.tls_cert_file = None;
        check_invalid(&config, TLS_CERT, "its certificate is needed too");
    }

    #[test]
    fn client_certificates_need_tls_and_a_ca() {
        let mut config = tls();
        config.tls_client_ca_file = Some("/tls/ca.crt".into());
        let settings = config.tls_settings().unwrap().unwrap();
        assert_eq!(
            settings.client_auth,
            Some(ClientCertificates {
                ca_file: "/tls/ca.crt".into(),
                mode: ClientAuth::Required,
            })
        );
        config.tls_client_auth = Some(ClientAuth::Optional);
        let settings = config.tls_settings().unwrap().unwrap();
        assert_eq!(settings.client_auth.unwrap().mode, ClientAuth::Optional);

        let mut config = tls();
        config.tls_client_auth = Some(ClientAuth::Required);
        check_invalid(&config, TLS_CLIENT_AUTH, "set --tls-client-ca-file");

        let mut config = ListenConfig::plaintext(addr(1), addr(2));
        config.tls_client_ca_file = Some("/tls/ca.crt".into());
        check_invalid(&config, TLS_CLIENT_CA, "client certificates need TLS");
    }

    #[test]
    fn metrics_are_closed_unless_a_token_or_anonymous_access_is_set() {
        let mut config = ListenConfig::plaintext(addr(1), addr(2));
        assert!(matches!(
            config.metrics_access().unwrap(),
            MetricsAccess::Closed
        ));
        config.metrics_anonymous = true;
        assert!(matches!(
            config.metrics_access().unwrap(),
            MetricsAccess::Anonymous
        ));

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics-token");
        std::fs::write(&path, "s3cret\n").unwrap();
        config.metrics_token_file = Some(path.clone());
        check_invalid(&config, METRICS_ANONYMOUS, "set only one of them");
        assert!(config.metrics_access().is_err());

        config.metrics_anonymous = false;
        config.validate().unwrap();
        let MetricsAccess::Token(token) = config.metrics_access().unwrap() else {
            panic!("no token");
        };
        assert_eq!(token.expose_secret(), "s3cret");
        // The token never shows in Debug output.
        assert!(!format!("{:?}", config.metrics_access().unwrap()).contains("s3cret"));

        std::fs::write(&path, "\n").unwrap();
        let err = config.metrics_access().unwrap_err();
        assert!(err.to_string().contains("is empty"), "{err}");
        config.metrics_token_file = Some(dir.path().join("missing"));
        assert!(matches!(
            config.metrics_access().unwrap_err(),
            ConfigError::SecretFile { .. }
        ));
    }

    #[test]
    fn trusted_proxies_are_cidrs() {
        let mut config = ListenConfig::plaintext(addr(1), addr(2));
        assert!(config.trusted_proxy_networks().unwrap().is_empty());

        config.trusted_proxies = vec![
            "10.0.0.0/8".into(),
            " 192.168.1.10 ".into(),
            "fd00::/8".into(),
            String::new(),
        ];
        config.validate().unwrap();
        let networks: Vec<String> = config
            .trusted_proxy_networks()
            .unwrap()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(networks, ["10.0.0.0/8", "192.168.1.10/32", "fd00::/8"]);

        for (entry, hint) in [
            (
                "10.0.0/8",
                "\"10.0.0/8\" is not a CIDR; write e.g. 10.0.0.0/8",
            ),
            ("10.0.0.0/33", "is not a CIDR"),
            ("proxy.internal", "is not a CIDR"),
            (
                "10.0.0.1/8",
                "write 10.0.0.0/8 for the whole network or 10.0.0.1 for",
            ),
        ] {
            config.trusted_proxies = vec!["127.0.0.1".into(), entry.into()];
            check_invalid(&config, TRUSTED_PROXIES, hint);
        }
    }

    #[test]
    fn body_limit_is_not_zero() {
        let mut config = ListenConfig::plaintext(addr(1), addr(2));
        assert_eq!(config.http_body_limit, 1 << 20);
        config.http_body_limit = 0;
        check_invalid(&config, HTTP_BODY_LIMIT, "at least 1 byte");
    }

    #[derive(Debug, clap::Parser)]
    struct Cli {
        #[command(flatten)]
        listen: ListenConfig,
    }

    #[test]
    fn listen_flags_parse() {
        use clap::Parser as _;

        let cli = Cli::try_parse_from([
            "keel",
            "--tls-cert-file",
            "/tls/tls.crt",
            "--tls-key-file",
            "/tls/tls.key",
            "--tls-client-ca-file",
            "/tls/ca.crt",
            "--tls-client-auth",
            "optional",
            "--metrics-token-file",
            "/run/secrets/metrics-token",
        ])
        .unwrap();
        let listen = cli.listen;
        assert_eq!(listen.tls_client_auth, Some(ClientAuth::Optional));
        assert!(!listen.allow_plaintext);
        assert!(!listen.metrics_anonymous);
        listen.validate().unwrap();

        let cli =
            Cli::try_parse_from(["keel", "--allow-plaintext", "--metrics-anonymous"]).unwrap();
        assert!(cli.listen.allow_plaintext);
        assert!(cli.listen.metrics_anonymous);
        cli.listen.validate().unwrap();

        assert!(cli.listen.trusted_proxies.is_empty());
        assert_eq!(cli.listen.http_body_limit, DEFAULT_HTTP_BODY_LIMIT);

        let cli = Cli::try_parse_from([
            "keel",
            "--allow-plaintext",
            "--trusted-proxies",
            "10.0.0.0/8, 192.168.0.0/16",
            "--http-body-limit",
            "256KiB",
        ])
        .unwrap();
        assert_eq!(
            cli.listen.trusted_proxies,
            ["10.0.0.0/8", " 192.168.0.0/16"]
        );
        assert_eq!(cli.listen.trusted_proxy_networks().unwrap().len(), 2);
        assert_eq!(cli.listen.http_body_limit, 256 * 1024);
        let err = Cli::try_parse_from(["keel", "--http-body-limit", "1 parsec"]).unwrap_err();
        assert!(err.to_string().contains("unknown unit"), "{err}");

        // A secret is only ever a file: there is no flag that takes the token itself.
        assert!(Cli::try_parse_from(["keel", "--metrics-token", "x"]).is_err());
    }

    #[test]
    fn help_says_how_to_secure_the_listeners() {
        use clap::CommandFactory as _;

        let help = Cli::command().render_long_help().to_string();
        for expected in [
            "--tls-cert-file",
            "KEEL_TLS_CERT_FILE",
            "KEEL_TLS_KEY_FILE",
            "KEEL_TLS_CLIENT_CA_FILE",
            "KEEL_TLS_CLIENT_AUTH",
            "KEEL_ALLOW_PLAINTEXT",
            "KEEL_METRICS_TOKEN_FILE",
            "KEEL_METRICS_ANONYMOUS",
            "Without it /metrics answers 401",
            "KEEL_TRUSTED_PROXIES",
            "KEEL_HTTP_BODY_LIMIT",
            "[default: 1MiB]",
        ] {
            assert!(help.contains(expected), "missing {expected:?} in\n{help}");
        }
    }
}
