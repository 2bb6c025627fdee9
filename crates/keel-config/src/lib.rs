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

/// Where the PostgreSQL state store is. `Debug` shows the URL with its password masked.
#[derive(Clone, clap::Args)]
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

impl std::fmt::Debug for DatabaseConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatabaseConfig")
            .field("url", &redact_url(self.url.expose_secret()))
            .field("max_connections", &self.max_connections)
            .field("acquire_timeout", &self.acquire_timeout)
            .finish()
    }
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

/// Where NATS JetStream is. `Debug` shows the URL with its credentials masked.
#[derive(Clone, clap::Args)]
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
    /// JetStream stream holding this deployment's events. Deployments sharing a NATS server need
    /// one each, with a --nats-subject-root of their own.
    #[arg(
        id = "nats_stream",
        long = "nats-stream",
        env = "KEEL_NATS_STREAM",
        default_value = DEFAULT_STREAM
    )]
    pub stream: String,
    /// First token of this deployment's event subjects (`<root>.<service>.<tenant>.<entity>.<verb>`).
    #[arg(
        id = "nats_subject_root",
        long = "nats-subject-root",
        env = "KEEL_NATS_SUBJECT_ROOT",
        default_value = DEFAULT_SUBJECT_ROOT
    )]
    pub subject_root: String,
}

/// Stream of a deployment that does not name one.
pub const DEFAULT_STREAM: &str = "KEEL";
/// Subject root of a deployment that does not name one.
pub const DEFAULT_SUBJECT_ROOT: &str = "keel";

impl std::fmt::Debug for NatsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsConfig")
            .field("url", &redact_url(&self.url))
            .field("credentials_file", &self.credentials_file)
            .field("stream", &self.stream)
            .field("subject_root", &self.subject_root)
            .finish()
    }
}

impl NatsConfig {
    /// A configuration for `url` without credentials, on the default stream and subject root.
    pub fn from_url(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            credentials_file: None,
            stream: DEFAULT_STREAM.to_owned(),
            subject_root: DEFAULT_SUBJECT_ROOT.to_owned(),
        }
    }

    /// The same server, with this deployment's own stream and subject root.
    pub fn with_namespace(mut self, stream: &str, subject_root: &str) -> Self {
        stream.clone_into(&mut self.stream);
        subject_root.clone_into(&mut self.subject_root);
        self
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
        nats_name("--nats-stream / KEEL_NATS_STREAM", &self.stream)?;
        nats_name(
            "--nats-subject-root / KEEL_NATS_SUBJECT_ROOT",
            &self.subject_root,
        )?;
        Ok(())
    }
}

/// Whether `value` is one safe NATS subject token and stream name: 1 to 64 ASCII letters,
/// digits, `-` or `_`, starting with a letter or digit (no `.`, wildcard, space or `$`).
pub fn is_nats_token(value: &str) -> bool {
    let bytes = value.as_bytes();
    (1..=64).contains(&bytes.len())
        && bytes[0].is_ascii_alphanumeric()
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'))
}

/// Checks a stream name or subject token: no `.`, wildcard, space or `$`, so it is one subject
/// token and a valid stream name on every NATS version.
fn nats_name(setting: &'static str, value: &str) -> Result<(), ConfigError> {
    if is_nats_token(value) {
        Ok(())
    } else {
        Err(ConfigError::Invalid {
            setting,
            reason: format!(
                "{value:?} is not usable: use 1 to 64 letters, digits, '-' or '_', starting with a letter or digit"
            ),
        })
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
    #[arg(long = "http-body-limit", env = "KEEL_HTTP_BODY_LIMIT", default_value = "1MiB", value_parser = parse_byte_size::<usize>)]
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

/// How a process logs and traces. `Debug` masks credentials in the OTLP endpoint.
#[derive(Clone, clap::Args)]
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

impl std::fmt::Debug for TelemetryConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TelemetryConfig")
            .field("log_filter", &self.log_filter)
            .field("log_format", &self.log_format)
            .field(
                "otlp_endpoint",
                &self.otlp_endpoint.as_deref().map(redact_url),
            )
            .field("service_name", &self.service_name)
            .finish()
    }
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

/// The longest duration any setting accepts: ten years (`10y`). Longer values are refused
/// rather than carried into clock arithmetic, where they would overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(10 * 31_557_600);

/// Parses a duration, the one syntax of every duration setting: a number and a unit, as
/// `humantime` reads them (`250ms`, `5s`, `2m`, `1h`, `90d`, `2w`, combined as `1h30m`); a bare
/// number is seconds. At most [`MAX_DURATION`].
pub fn parse_duration(raw: &str) -> Result<Duration, String> {
    let raw = raw.trim();
    let too_long = || format!("{raw:?} is too long; at most 10y (3652d) is accepted");
    let duration = if !raw.is_empty() && raw.bytes().all(|b| b.is_ascii_digit()) {
        Duration::from_secs(raw.parse().map_err(|_| too_long())?)
    } else {
        humantime::parse_duration(raw).map_err(|e| match e {
            humantime::DurationError::NumberOverflow => too_long(),
            e => {
                format!("{raw:?} is not a duration ({e}); write e.g. 500ms, 5s, 2m, 1h, 90d or 2w")
            }
        })?
    };
    if duration > MAX_DURATION {
        return Err(too_long());
    }
    Ok(duration)
}

/// Parses a byte size, the one syntax of every size setting: a number of bytes, or a number and a
/// unit where `kB`, `MB`, `GB`, `TB` (and `k`, `M`, `G`, `T`) are powers of 1000 and `KiB`, `MiB`,
/// `GiB`, `TiB` powers of 1024. Units are case-insensitive, a space may separate number and unit,
/// fractions are rounded to the nearest byte (`1.5KiB` is 1536). A size that does not fit `T` is
/// refused, never wrapped or saturated.
pub fn parse_byte_size<T: TryFrom<u64>>(raw: &str) -> Result<T, String> {
    let raw = raw.trim();
    let too_large = || format!("{raw:?} is too large for this setting");
    let bytes = parse_size::parse_size(raw).map_err(|e| match e {
        parse_size::Error::PosOverflow => too_large(),
        _ => format!(
            "{raw:?} is not a size; write bytes, or e.g. 256KiB, 4MiB (4 x 2^20 bytes) or 4MB \
             (4 x 10^6 bytes)"
        ),
    })?;
    T::try_from(bytes).map_err(|_| too_large())
}

/// What a masked credential looks like in logs, errors and `Debug` output.
pub const REDACTED: &str = "****";

/// Query parameters that carry credentials in libpq, redis and NATS URLs.
const CREDENTIAL_PARAMS: &[&str] = &["password", "sslpassword", "pass", "auth", "token", "secret"];

/// Schemes where a user without a password is itself a secret (`nats://<token>@host`).
const TOKEN_IN_USER_SCHEMES: &[&str] = &["nats", "tls", "ws", "wss"];

/// `raw` with every credential replaced by [`REDACTED`], for `Debug` output, logs and error
/// messages: the userinfo password, a NATS token in the user part, and credential query
/// parameters (`?password=`, `?token=`, ...). A value that does not parse as a URL is not shown at
/// all, since there is no telling where a credential in it would be.
pub fn redact_url(raw: &str) -> String {
    // An opaque URL (`app:s3cret@db`, no `//`) has no userinfo to mask: the secret would be in
    // its path.
    let Some(mut url) = url::Url::parse(raw)
        .ok()
        .filter(|url| !url.cannot_be_a_base())
    else {
        return match raw.split_once("://") {
            Some((scheme, _))
                if scheme
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'+') =>
            {
                format!("{scheme}://<not a URL, hidden>")
            }
            _ => "<not a URL, hidden>".to_owned(),
        };
    };
    // `set_password` and `set_username` fail only for URLs that cannot have userinfo, and
    // those have nothing to hide there.
    if url.password().is_some() {
        let _ = url.set_password(Some(REDACTED));
    } else if !url.username().is_empty() && TOKEN_IN_USER_SCHEMES.contains(&url.scheme()) {
        let _ = url.set_username(REDACTED);
    }
    let is_credential = |key: &str| CREDENTIAL_PARAMS.contains(&key.to_ascii_lowercase().as_str());
    if url.query_pairs().any(|(key, _)| is_credential(&key)) {
        let pairs: Vec<(String, String)> = url
            .query_pairs()
            .map(|(key, value)| {
                let value = if is_credential(&key) {
                    REDACTED.into()
                } else {
                    value.into_owned()
                };
                (key.into_owned(), value)
            })
            .collect();
        url.query_pairs_mut().clear().extend_pairs(pairs);
    }
    url.to_string()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly on purpose
mod tests {
    use super::*;

    /// Checks that `raw` parses as a duration of `expected`, or fails with `expected`'s text in
    /// the message.
    fn check_duration(raw: &str, expected: Result<Duration, &str>) {
        match (parse_duration(raw), expected) {
            (Ok(got), Ok(want)) => assert_eq!(got, want, "{raw}"),
            (Err(got), Err(want)) => assert!(got.contains(want), "{raw}: {got}"),
            (got, want) => panic!("{raw}: got {got:?}, want {want:?}"),
        }
    }

    #[test]
    fn durations_parse_with_units() {
        const DAY: u64 = 86_400;
        check_duration("250ms", Ok(Duration::from_millis(250)));
        check_duration("5s", Ok(Duration::from_secs(5)));
        check_duration(" 2m ", Ok(Duration::from_secs(120)));
        check_duration("1h", Ok(Duration::from_secs(3600)));
        check_duration("1h30m", Ok(Duration::from_secs(5400)));
        check_duration("1h 30m", Ok(Duration::from_secs(5400)));
        check_duration("90d", Ok(Duration::from_secs(90 * DAY)));
        check_duration("2w", Ok(Duration::from_secs(14 * DAY)));
        check_duration("7", Ok(Duration::from_secs(7)));
        check_duration("0", Ok(Duration::ZERO));
        check_duration("10y", Ok(MAX_DURATION));
        check_duration("5 parsecs", Err("is not a duration"));
        check_duration("ms", Err("is not a duration"));
        check_duration("", Err("is not a duration"));
        check_duration("-5s", Err("is not a duration"));
    }

    #[test]
    fn huge_durations_are_refused_not_overflowed() {
        for raw in [
            "3653d",
            "11y",
            "315576001",
            "18446744073709551615s",
            "18446744073709551615h",
            "99999999999999999999999",
            "99999999999999999999999w",
        ] {
            check_duration(raw, Err("is too long; at most 10y"));
        }
    }

    #[test]
    fn byte_sizes_parse_with_units() {
        assert_eq!(parse_byte_size::<u64>("1048576"), Ok(1 << 20));
        assert_eq!(parse_byte_size::<u64>("512B"), Ok(512));
        assert_eq!(parse_byte_size::<u64>("256KiB"), Ok(256 << 10));
        assert_eq!(parse_byte_size::<u64>("1MiB"), Ok(1 << 20));
        assert_eq!(parse_byte_size::<u64>(" 1 mib "), Ok(1 << 20));
        assert_eq!(parse_byte_size::<u64>("1GiB"), Ok(1 << 30));
        assert_eq!(parse_byte_size::<u64>("1.5KiB"), Ok(1536));
        // Without an `i`, prefixes are powers of 1000, whatever the case.
        assert_eq!(parse_byte_size::<u64>("500kB"), Ok(500_000));
        assert_eq!(parse_byte_size::<u64>("4MB"), Ok(4_000_000));
        assert_eq!(parse_byte_size::<u64>("4mb"), Ok(4_000_000));
        assert_eq!(parse_byte_size::<u64>("2m"), Ok(2_000_000));
        assert_eq!(parse_byte_size::<u64>("1G"), Ok(1_000_000_000));
        for raw in ["", "MiB", "-1", "1 parsec", "4 MiBs", "0x10"] {
            let err = parse_byte_size::<u64>(raw).unwrap_err();
            assert!(err.contains("is not a size"), "{raw}: {err}");
        }
    }

    #[test]
    fn huge_byte_sizes_are_refused_not_wrapped() {
        for raw in [
            "99999999999999999999",
            "99999999999999999999GiB",
            "18446744073709551615GiB",
            "16EiB",
            "18446744073709551616",
        ] {
            let err = parse_byte_size::<u64>(raw).unwrap_err();
            assert!(err.contains("is too large"), "{raw}: {err}");
        }
        assert_eq!(parse_byte_size::<u64>("18446744073709551615"), Ok(u64::MAX));
        // What fits u64 but not the setting's type is refused too.
        let err = parse_byte_size::<u32>("4GiB").unwrap_err();
        assert!(err.contains("is too large"), "{err}");
        assert_eq!(parse_byte_size::<u32>("4294967295"), Ok(u32::MAX));
    }

    fn check_redacted(raw: &str, expected: &str) {
        assert_eq!(redact_url(raw), expected, "{raw}");
    }

    #[test]
    fn urls_are_redacted() {
        check_redacted(
            "postgres://app:s3cret@db:5432/shop",
            "postgres://app:****@db:5432/shop",
        );
        check_redacted("postgres://app@db/shop", "postgres://app@db/shop");
        check_redacted(
            "postgres://app@db/shop?sslmode=require&PassWord=s3cret",
            "postgres://app@db/shop?sslmode=require&PassWord=****",
        );
        check_redacted("redis://:s3cret@cache:6379/0", "redis://:****@cache:6379/0");
        check_redacted("nats://user:s3cret@bus:4222", "nats://user:****@bus:4222");
        // A lone user part of a NATS URL is a token.
        check_redacted("nats://s3cret@bus:4222", "nats://****@bus:4222");
        check_redacted("tls://s3cret@bus:4222", "tls://****@bus:4222");
        check_redacted("nats://bus:4222?token=s3cret", "nats://bus:4222?token=****");
        check_redacted("nats://127.0.0.1:4222", "nats://127.0.0.1:4222");
        // An unencoded `@` in the password still ends up masked as a whole.
        check_redacted(
            "postgres://app:s3@cret@db/shop",
            "postgres://app:****@db/shop",
        );
        // What does not parse is not shown.
        check_redacted(
            "postgres://app:s3cret@db:port/shop",
            "postgres://<not a URL, hidden>",
        );
        check_redacted("app:s3cret@db", "<not a URL, hidden>");
        check_redacted("s3cret", "<not a URL, hidden>");
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

    #[test]
    fn nats_stream_and_subject_root_are_single_safe_tokens() {
        let nats = || NatsConfig::from_url("nats://127.0.0.1:4222");
        assert!(
            nats()
                .with_namespace("KEEL_STAGING", "keel-staging")
                .validate()
                .is_ok()
        );
        for bad in [
            "",
            "keel.prod",
            "keel.*",
            ">",
            "a b",
            "$JS",
            "_INBOX",
            "-x",
            "é",
        ] {
            let err = nats().with_namespace(bad, "keel").validate().unwrap_err();
            assert!(
                err.to_string().starts_with("--nats-stream"),
                "{bad:?}: {err}"
            );
            let err = nats().with_namespace("KEEL", bad).validate().unwrap_err();
            assert!(
                err.to_string().starts_with("--nats-subject-root")
                    && err.to_string().contains("letters, digits"),
                "{bad:?}: {err}"
            );
        }
        assert!(
            nats()
                .with_namespace(&"K".repeat(65), "keel")
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
        assert!(err.to_string().contains("is not a size"), "{err}");

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
