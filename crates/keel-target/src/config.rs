//! The `--target-*` settings: the policy, and the limits of every session on a target.

use std::time::Duration;

use ipnet::IpNet;
use keel_config::{ConfigError, parse_byte_size, parse_duration};
use secrecy::{ExposeSecret, SecretString};

use crate::policy::{
    self, ALLOW_HOSTS, ALLOW_NETWORKS, ALLOW_OPTIONS, DENY_HOSTS, DENY_NETWORKS, FILE_OPTIONS,
    HostPattern, StateStore, TargetPolicy,
};
use crate::url::{self, Kind};
use crate::{Connector, SessionSettings};

/// Where Keel may connect on a tenant's behalf, and how long it lets a session on a target run.
///
/// Denied by default: link-local and cloud-metadata addresses, unix sockets, connection options
/// that read files on Keel's host, and Keel's own state-store database. Loopback and private
/// networks are allowed. An explicit allow overrides a default deny; an explicit deny wins over
/// any allow.
#[derive(Debug, Clone, clap::Args)]
pub struct TargetConfig {
    /// Networks Keel may connect to although the defaults deny them, as comma-separated CIDRs
    /// (e.g. `169.254.10.0/24`; a bare address is one host).
    #[arg(
        id = "target_allow_networks",
        long = "target-allow-networks",
        env = "KEEL_TARGET_ALLOW_NETWORKS",
        value_delimiter = ',',
        value_name = "CIDR,..."
    )]
    pub allow_networks: Vec<String>,
    /// Networks Keel never connects to, as comma-separated CIDRs; wins over every allow setting
    /// (e.g. `10.20.0.0/16` for the control plane's own network).
    #[arg(
        id = "target_deny_networks",
        long = "target-deny-networks",
        env = "KEEL_TARGET_DENY_NETWORKS",
        value_delimiter = ',',
        value_name = "CIDR,..."
    )]
    pub deny_networks: Vec<String>,
    /// Host names Keel may connect to although the defaults deny them or their addresses
    /// (`db.example.com`, or `*.example.com` for every name under it).
    #[arg(
        id = "target_allow_hosts",
        long = "target-allow-hosts",
        env = "KEEL_TARGET_ALLOW_HOSTS",
        value_delimiter = ',',
        value_name = "PATTERN,..."
    )]
    pub allow_hosts: Vec<String>,
    /// Host names Keel never connects to (`vault.internal`, `*.internal`); wins over every allow
    /// setting.
    #[arg(
        id = "target_deny_hosts",
        long = "target-deny-hosts",
        env = "KEEL_TARGET_DENY_HOSTS",
        value_delimiter = ',',
        value_name = "PATTERN,..."
    )]
    pub deny_hosts: Vec<String>,
    /// Accept unix-socket targets (`host=/var/run/postgresql`, `redis+unix://`). Keel then
    /// connects to sockets on its own host as its own OS user, which peer authentication trusts.
    #[arg(
        id = "target_allow_unix_sockets",
        long = "target-allow-unix-sockets",
        env = "KEEL_TARGET_ALLOW_UNIX_SOCKETS",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub allow_unix_sockets: bool,
    /// Connection options that read files on Keel's host and are accepted anyway, comma-separated
    /// (any of sslcert, sslkey, sslrootcert, sslcrl, sslcrldir, sslkeylogfile, passfile, service,
    /// servicefile, krbsrvname, gsslib, gssdelegation).
    #[arg(
        id = "target_allow_options",
        long = "target-allow-options",
        env = "KEEL_TARGET_ALLOW_OPTIONS",
        value_delimiter = ',',
        value_name = "OPTION,..."
    )]
    pub allow_options: Vec<String>,
    /// Accept Keel's own state-store database (same host, port and database as
    /// --database-url) as a target. Tenants could otherwise read and change Keel's own state.
    #[arg(
        id = "target_allow_state_store",
        long = "target-allow-state-store",
        env = "KEEL_TARGET_ALLOW_STATE_STORE",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub allow_state_store: bool,
    /// How long Keel waits to resolve, connect to and log in to a target.
    #[arg(id = "target_connect_timeout", long = "target-connect-timeout", env = "KEEL_TARGET_CONNECT_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub connect_timeout: Duration,
    /// PostgreSQL `statement_timeout` of Keel's sessions on targets.
    #[arg(id = "target_statement_timeout", long = "target-statement-timeout", env = "KEEL_TARGET_STATEMENT_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub statement_timeout: Duration,
    /// PostgreSQL `lock_timeout` of Keel's sessions on targets, so Keel never queues behind (or
    /// in front of) the application's locks for long.
    #[arg(id = "target_lock_timeout", long = "target-lock-timeout", env = "KEEL_TARGET_LOCK_TIMEOUT", default_value = "2s", value_parser = parse_duration)]
    pub lock_timeout: Duration,
    /// PostgreSQL `idle_in_transaction_session_timeout` of Keel's sessions on targets.
    #[arg(id = "target_idle_in_transaction_timeout", long = "target-idle-in-transaction-timeout", env = "KEEL_TARGET_IDLE_IN_TRANSACTION_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub idle_in_transaction_timeout: Duration,
    /// How long Keel waits for the reply to one Redis command.
    #[arg(id = "target_redis_response_timeout", long = "target-redis-response-timeout", env = "KEEL_TARGET_REDIS_RESPONSE_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub redis_response_timeout: Duration,
    /// Most bytes Keel reads from a Redis target per command it sends; a larger reply closes the
    /// connection (`4MiB`, `512KiB`).
    #[arg(id = "target_redis_max_reply", long = "target-redis-max-reply", env = "KEEL_TARGET_REDIS_MAX_REPLY", default_value = "4MiB", value_parser = parse_byte_size::<usize>)]
    pub redis_max_reply: usize,
}

impl Default for TargetConfig {
    /// The defaults of the flags: nothing explicitly allowed or denied.
    fn default() -> Self {
        Self {
            allow_networks: Vec::new(),
            deny_networks: Vec::new(),
            allow_hosts: Vec::new(),
            deny_hosts: Vec::new(),
            allow_unix_sockets: false,
            allow_options: Vec::new(),
            allow_state_store: false,
            connect_timeout: Duration::from_secs(5),
            statement_timeout: Duration::from_secs(30),
            lock_timeout: Duration::from_secs(2),
            idle_in_transaction_timeout: Duration::from_secs(30),
            redis_response_timeout: Duration::from_secs(5),
            redis_max_reply: 4 << 20,
        }
    }
}

impl TargetConfig {
    /// Checks every setting; reads no file and needs no network.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.policy(None)?;
        self.session()?;
        Ok(())
    }

    /// The policy, with `state_store` (the `--database-url`) never a target unless allowed.
    pub fn policy(&self, state_store: Option<&SecretString>) -> Result<TargetPolicy, ConfigError> {
        let mut allow_options = Vec::new();
        for option in self
            .allow_options
            .iter()
            .map(|o| o.trim().to_ascii_lowercase())
        {
            if option.is_empty() {
                continue;
            }
            if !FILE_OPTIONS.contains(&option.as_str()) {
                return Err(ConfigError::Invalid {
                    setting: ALLOW_OPTIONS,
                    reason: format!(
                        "{option:?} is not an option the policy refuses; list any of {}",
                        FILE_OPTIONS.join(", ")
                    ),
                });
            }
            allow_options.push(option);
        }
        let state_store = state_store
            .map(|url| {
                let invalid = |reason: String| ConfigError::Invalid {
                    setting: "--database-url / KEEL_DATABASE_URL",
                    reason,
                };
                let parsed = url::parse(url.expose_secret()).map_err(|e| invalid(e.to_string()))?;
                if parsed.kind != Kind::Postgres {
                    return Err(invalid("is not a postgres:// URL".to_owned()));
                }
                Ok(StateStore {
                    host: parsed.connect_host().clone(),
                    port: parsed.port,
                    database: parsed.database,
                })
            })
            .transpose()?;
        let reserved = policy::RESERVED_NETWORKS
            .iter()
            .map(|(network, why)| {
                network
                    .parse::<IpNet>()
                    .map(|network| (network, *why))
                    .map_err(|_| ConfigError::Invalid {
                        setting: ALLOW_NETWORKS,
                        reason: format!("built-in network {network} does not parse"),
                    })
            })
            .collect::<Result<_, _>>()?;
        Ok(TargetPolicy {
            allow_networks: networks(ALLOW_NETWORKS, &self.allow_networks)?,
            deny_networks: networks(DENY_NETWORKS, &self.deny_networks)?,
            allow_hosts: patterns(ALLOW_HOSTS, &self.allow_hosts)?,
            deny_hosts: patterns(DENY_HOSTS, &self.deny_hosts)?,
            allow_unix_sockets: self.allow_unix_sockets,
            allow_options,
            allow_state_store: self.allow_state_store,
            state_store,
            reserved,
        })
    }

    /// The session limits; each must be positive, since zero turns a PostgreSQL timeout off.
    pub fn session(&self) -> Result<SessionSettings, ConfigError> {
        for (setting, value) in [
            (
                "--target-connect-timeout / KEEL_TARGET_CONNECT_TIMEOUT",
                self.connect_timeout,
            ),
            (
                "--target-statement-timeout / KEEL_TARGET_STATEMENT_TIMEOUT",
                self.statement_timeout,
            ),
            (
                "--target-lock-timeout / KEEL_TARGET_LOCK_TIMEOUT",
                self.lock_timeout,
            ),
            (
                "--target-idle-in-transaction-timeout / KEEL_TARGET_IDLE_IN_TRANSACTION_TIMEOUT",
                self.idle_in_transaction_timeout,
            ),
            (
                "--target-redis-response-timeout / KEEL_TARGET_REDIS_RESPONSE_TIMEOUT",
                self.redis_response_timeout,
            ),
        ] {
            if value < Duration::from_millis(1) {
                return Err(ConfigError::Invalid {
                    setting,
                    reason: "must be at least 1ms; Keel never leaves a target session unbounded"
                        .into(),
                });
            }
        }
        if self.redis_max_reply < 1024 {
            return Err(ConfigError::Invalid {
                setting: "--target-redis-max-reply / KEEL_TARGET_REDIS_MAX_REPLY",
                reason: "must be at least 1KiB; INFO alone is a few KiB".into(),
            });
        }
        Ok(SessionSettings {
            connect_timeout: self.connect_timeout,
            statement_timeout: self.statement_timeout,
            lock_timeout: self.lock_timeout,
            idle_in_transaction_timeout: self.idle_in_transaction_timeout,
            redis_response_timeout: self.redis_response_timeout,
            redis_max_reply: self.redis_max_reply,
        })
    }

    /// The connector of `service` (its sessions are named `keel-<service>`), with `state_store`
    /// protected.
    pub fn connector(
        &self,
        service: &str,
        state_store: Option<&SecretString>,
    ) -> Result<Connector, ConfigError> {
        Ok(Connector::new(
            self.policy(state_store)?,
            self.session()?,
            service,
        ))
    }
}

fn networks(setting: &'static str, entries: &[String]) -> Result<Vec<IpNet>, ConfigError> {
    let mut networks = Vec::new();
    for entry in entries.iter().map(|e| e.trim()).filter(|e| !e.is_empty()) {
        let network = match (entry.parse::<IpNet>(), entry.parse::<std::net::IpAddr>()) {
            (Ok(network), _) => network,
            (Err(_), Ok(host)) => IpNet::from(host),
            (Err(_), Err(_)) => {
                return Err(ConfigError::Invalid {
                    setting,
                    reason: format!(
                        "{entry:?} is not a CIDR; write e.g. 10.0.0.0/8, 169.254.10.5 or fd00::/8, separated by commas"
                    ),
                });
            }
        };
        if network.trunc() != network {
            return Err(ConfigError::Invalid {
                setting,
                reason: format!(
                    "{entry:?} has bits set past its /{} prefix; write {} for the whole network or {} for the single host",
                    network.prefix_len(),
                    network.trunc(),
                    network.addr()
                ),
            });
        }
        networks.push(network);
    }
    Ok(networks)
}

fn patterns(setting: &'static str, entries: &[String]) -> Result<Vec<HostPattern>, ConfigError> {
    entries
        .iter()
        .filter(|e| !e.trim().is_empty())
        .map(|e| HostPattern::parse(e).map_err(|reason| ConfigError::Invalid { setting, reason }))
        .collect()
}
