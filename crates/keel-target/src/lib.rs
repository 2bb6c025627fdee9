//! Where Keel may connect on a tenant's behalf, and how every connection to a target is made.
//!
//! Any tenant can register a URL and Keel connects to it, so a URL is a request forgery path:
//! loopback services, cloud metadata addresses, unix sockets, options that make the client read
//! local files, Keel's own state store. The [`TargetPolicy`] refuses those by default, once when a
//! URL is stored ([`Connector::check_url`]) and again at connect time on the *resolved* addresses,
//! since DNS can change in between. The [`Connector`] then connects to an address it checked, never
//! to the name again, and gives every session Keel's limits:
//!
//! - PostgreSQL ([`Connector::postgres_options`]): `application_name = keel-<service>` (so Keel can
//!   recognise and spare its own sessions), `statement_timeout`, `lock_timeout`,
//!   `idle_in_transaction_session_timeout`, a connect timeout; nothing from `~/.pgpass`, and an
//!   explicit (possibly empty) password so `PGPASSWORD` of Keel's environment never reaches a target.
//! - Redis ([`Connector::connect_redis`]): connect and response timeouts, and at most
//!   `--target-redis-max-reply` bytes read per command sent (redis 0.32 has no reply-size limit of
//!   its own, so the socket is wrapped).
//!
//! Residual gaps, documented rather than hidden: sqlx connects by host string and has no `hostaddr`,
//! so a TLS `verify-full` connection would need the name and thus a second resolution (this build
//! of sqlx has no TLS, so Keel always connects to the checked address); `PGOPTIONS`, `PGSSLCERT`,
//! `PGSSLKEY` and `PGSSLROOTCERT` of Keel's own environment still reach sqlx (keep them unset); the
//! state store is recognised by name, loopback and resolved address, not by the machine's other
//! interface addresses.

mod config;
mod policy;
mod redis_budget;
mod url;

use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use secrecy::ExposeSecret;
use sqlx::postgres::{PgConnectOptions, PgSslMode};
use sqlx::{ConnectOptions, Connection, PgConnection};

pub use config::TargetConfig;
pub use policy::{Denied, FILE_OPTIONS, HostPattern, Rule, TargetPolicy};

use crate::url::{Host, Kind, ParsedUrl};

/// Why Keel did not connect to a target.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    /// The policy refuses the target.
    #[error(transparent)]
    Denied(#[from] Denied),
    /// The URL cannot be used as written; the message says why, never quoting credentials.
    #[error("connection URL {0}")]
    InvalidUrl(String),
    /// DNS did not answer for the host.
    #[error("cannot resolve host {host}: {source}")]
    Resolve {
        /// The host name.
        host: String,
        /// The resolver's error.
        #[source]
        source: std::io::Error,
    },
    /// DNS answered with no address.
    #[error("host {0} resolves to no address")]
    NoAddress(String),
    /// Resolving, connecting and logging in took longer than the connect timeout.
    #[error("no connection within {}ms (--target-connect-timeout / KEEL_TARGET_CONNECT_TIMEOUT)", .0.as_millis())]
    ConnectTimeout(Duration),
    /// PostgreSQL refused the connection or failed.
    #[error("{0}")]
    Postgres(#[source] sqlx::Error),
    /// Redis refused the connection or failed.
    #[error("{0}")]
    Redis(#[source] redis::RedisError),
    /// The socket to the target failed.
    #[error("{0}")]
    Io(#[source] std::io::Error),
}

/// The limits of every session Keel opens on a target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionSettings {
    /// Resolving, connecting and logging in, together.
    pub connect_timeout: Duration,
    /// PostgreSQL `statement_timeout`.
    pub statement_timeout: Duration,
    /// PostgreSQL `lock_timeout`.
    pub lock_timeout: Duration,
    /// PostgreSQL `idle_in_transaction_session_timeout`.
    pub idle_in_transaction_timeout: Duration,
    /// Wait for one Redis reply.
    pub redis_response_timeout: Duration,
    /// Most bytes read from Redis per command sent.
    pub redis_max_reply: usize,
}

/// Opens connections to targets for one Keel service: the policy, the session limits and the
/// service's `application_name`. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Connector {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    policy: TargetPolicy,
    session: SessionSettings,
    application_name: String,
}

/// Where a connection goes, after the policy checked it.
enum Resolved {
    Tcp(Vec<SocketAddr>),
    Unix(String),
}

impl Connector {
    /// The connector of `service`, whose sessions are named `keel-<service>`.
    pub fn new(policy: TargetPolicy, session: SessionSettings, service: &str) -> Self {
        Self {
            inner: Arc::new(Inner {
                policy,
                session,
                application_name: format!("keel-{service}"),
            }),
        }
    }

    /// The `application_name` of this connector's PostgreSQL sessions.
    pub fn application_name(&self) -> &str {
        &self.inner.application_name
    }

    /// The session limits.
    pub fn session(&self) -> &SessionSettings {
        &self.inner.session
    }

    /// Checks a URL before it is stored: the rules that need no DNS (unix sockets, file options,
    /// host names and literal addresses, the state store by name).
    pub fn check_url(&self, raw: &str) -> Result<(), TargetError> {
        let url = url::parse(raw)?;
        self.inner.policy.check_static(&url)?;
        Ok(())
    }

    /// Resolves the target's host and checks every address it has; any refused address refuses
    /// the target (a name that resolves partly to a metadata address is not a safe name).
    async fn resolve(&self, url: &ParsedUrl) -> Result<Resolved, TargetError> {
        let policy = &self.inner.policy;
        policy.check_static(url)?;
        let (name, addrs) = match url.connect_host() {
            Host::Unix(path) => return Ok(Resolved::Unix(path.clone())),
            Host::Ip(ip) => (None, vec![SocketAddr::new(*ip, url.port)]),
            Host::Name(name) => (Some(name.as_str()), lookup(name, url.port).await?),
        };
        for addr in &addrs {
            policy.decide(name, addr.ip())?;
        }
        if url.kind == Kind::Postgres
            && let Some(store) = policy.state_store()
        {
            let store_ips = match &store.host {
                Host::Name(store_name) => match lookup(store_name, store.port).await {
                    Ok(found) => found.iter().map(SocketAddr::ip).collect(),
                    Err(error) => {
                        // Keel's own pool would be failing too; the name and loopback
                        // comparisons still apply.
                        tracing::warn!(%error, "cannot resolve the state store's host");
                        Vec::new()
                    }
                },
                Host::Ip(ip) => vec![*ip],
                Host::Unix(_) => Vec::new(),
            };
            let target_ips: Vec<IpAddr> = addrs.iter().map(SocketAddr::ip).collect();
            policy.check_state_store(url, &target_ips, &store_ips)?;
        }
        Ok(Resolved::Tcp(addrs))
    }

    /// The options for a PostgreSQL session on the target behind `raw`, one per checked address
    /// (in the resolver's order), each pinned to that address: a pool built on one of them
    /// reconnects to the same checked address, never to a re-resolved name.
    pub async fn postgres_options(&self, raw: &str) -> Result<Vec<PgConnectOptions>, TargetError> {
        let url = url::parse(raw)?;
        if url.kind != Kind::Postgres {
            return Err(TargetError::InvalidUrl(
                "is not a postgres:// URL".to_owned(),
            ));
        }
        let base = self.postgres_base(&url)?;
        Ok(match self.resolve(&url).await? {
            Resolved::Unix(path) => vec![base.socket(path)],
            Resolved::Tcp(addrs) => addrs
                .iter()
                .map(|addr| base.clone().host(&addr.ip().to_string()).port(addr.port()))
                .collect(),
        })
    }

    /// Everything but the address: credentials, database, TLS mode, Keel's session settings.
    fn postgres_base(&self, url: &ParsedUrl) -> Result<PgConnectOptions, TargetError> {
        let session = &self.inner.session;
        let ssl_mode = match url.param("sslmode").or_else(|| url.param("ssl-mode")) {
            Some(mode) => PgSslMode::from_str(mode).map_err(|_| {
                TargetError::InvalidUrl(format!(
                    "sslmode {mode:?} is not one of disable, allow, prefer, require, verify-ca, verify-full"
                ))
            })?,
            None => PgSslMode::Prefer,
        };
        // `new_without_pgpass`: ~/.pgpass holds Keel's operator's passwords, not the tenant's.
        let mut options = PgConnectOptions::new_without_pgpass()
            .username(&url.user)
            // Always set, so PGPASSWORD from Keel's own environment is never sent to a target.
            .password(url.password.as_ref().map_or("", |p| p.expose_secret()))
            .database(&url.database)
            .ssl_mode(ssl_mode)
            .application_name(&self.inner.application_name)
            .disable_statement_logging();
        // File options reach this point only when the policy allows them.
        for (key, value) in &url.query {
            options = match key.as_str() {
                "sslrootcert" | "ssl-root-cert" | "ssl-ca" => options.ssl_root_cert(value),
                "sslcert" | "ssl-cert" => options.ssl_client_cert(value),
                "sslkey" | "ssl-key" => options.ssl_client_key(value),
                _ => options,
            };
        }
        options = options.options(tenant_settings(url)?);
        // After the tenant's settings, so Keel's limits win.
        Ok(options.options([
            ("statement_timeout", millis(session.statement_timeout)),
            ("lock_timeout", millis(session.lock_timeout)),
            (
                "idle_in_transaction_session_timeout",
                millis(session.idle_in_transaction_timeout),
            ),
        ]))
    }

    /// Connects to the PostgreSQL target behind `raw`: resolved, checked, and within the connect
    /// timeout; the first checked address that accepts wins.
    pub async fn connect_postgres(&self, raw: &str) -> Result<PgConnection, TargetError> {
        let timeout = self.inner.session.connect_timeout;
        tokio::time::timeout(timeout, async {
            let mut last = None;
            for options in self.postgres_options(raw).await? {
                match PgConnection::connect_with(&options).await {
                    Ok(conn) => return Ok(conn),
                    Err(error) => last = Some(error),
                }
            }
            Err(last.map_or_else(
                || TargetError::NoAddress("the target".to_owned()),
                TargetError::Postgres,
            ))
        })
        .await
        .map_err(|_| TargetError::ConnectTimeout(timeout))?
    }

    /// Connects to the Redis target behind `raw`: resolved, checked, within the connect timeout,
    /// with the response timeout on every command and the reply budget on the socket.
    pub async fn connect_redis(
        &self,
        raw: &str,
    ) -> Result<redis::aio::MultiplexedConnection, TargetError> {
        let url = url::parse(raw)?;
        if url.kind != Kind::Redis {
            return Err(TargetError::InvalidUrl("is not a redis:// URL".to_owned()));
        }
        if url.tls {
            return Err(TargetError::InvalidUrl(
                "uses rediss://, and this build of Keel has no TLS for Redis; use redis:// on a trusted network"
                    .to_owned(),
            ));
        }
        let info = redis::IntoConnectionInfo::into_connection_info(raw)
            .map_err(TargetError::Redis)?
            .redis;
        let session = &self.inner.session;
        let config = redis::AsyncConnectionConfig::new()
            .set_response_timeout(session.redis_response_timeout);
        let limit = session.redis_max_reply;
        tokio::time::timeout(session.connect_timeout, async {
            match self.resolve(&url).await? {
                Resolved::Tcp(addrs) => {
                    let stream = connect_tcp(&addrs).await?;
                    redis_budget::handshake(stream, limit, &info, config).await
                }
                Resolved::Unix(path) => {
                    let stream = tokio::net::UnixStream::connect(&path)
                        .await
                        .map_err(TargetError::Io)?;
                    redis_budget::handshake(stream, limit, &info, config).await
                }
            }
        })
        .await
        .map_err(|_| TargetError::ConnectTimeout(session.connect_timeout))?
    }
}

fn millis(duration: Duration) -> String {
    duration.as_millis().max(1).to_string()
}

/// The tenant's own `options=-c name=value` settings (and sqlx's `options[name]=value`), re-applied
/// one by one: sqlx has no way to pass a raw options string through its builder.
fn tenant_settings(url: &ParsedUrl) -> Result<Vec<(String, String)>, TargetError> {
    let invalid = || {
        TargetError::InvalidUrl(
            "options= may only hold settings written -c name=value (or --name=value), without spaces in values"
                .to_owned(),
        )
    };
    let mut settings = Vec::new();
    for (key, value) in &url.query {
        if let Some(name) = key
            .strip_prefix("options[")
            .and_then(|k| k.strip_suffix(']'))
        {
            if value.contains(char::is_whitespace) {
                return Err(invalid());
            }
            settings.push((name.to_owned(), value.clone()));
        } else if key == "options" {
            let mut words = value.split_whitespace();
            while let Some(word) = words.next() {
                let setting = match word {
                    "-c" => words.next().ok_or_else(invalid)?,
                    _ => word
                        .strip_prefix("-c")
                        .or_else(|| word.strip_prefix("--"))
                        .ok_or_else(invalid)?,
                };
                let (name, value) = setting.split_once('=').ok_or_else(invalid)?;
                settings.push((name.replace('-', "_"), value.to_owned()));
            }
        }
    }
    Ok(settings)
}

async fn lookup(name: &str, port: u16) -> Result<Vec<SocketAddr>, TargetError> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((name, port))
        .await
        .map_err(|source| TargetError::Resolve {
            host: name.to_owned(),
            source,
        })?
        .collect();
    if addrs.is_empty() {
        return Err(TargetError::NoAddress(name.to_owned()));
    }
    Ok(addrs)
}

async fn connect_tcp(addrs: &[SocketAddr]) -> Result<tokio::net::TcpStream, TargetError> {
    let mut last = None;
    for addr in addrs {
        match tokio::net::TcpStream::connect(addr).await {
            Ok(stream) => {
                let _ = stream.set_nodelay(true);
                return Ok(stream);
            }
            Err(error) => last = Some(error),
        }
    }
    Err(last.map_or_else(
        || TargetError::NoAddress("the target".to_owned()),
        TargetError::Io,
    ))
}
