//! Connection URLs as the policy reads them: every host they name, port, user and database.

use std::fmt;
use std::net::IpAddr;

use secrecy::SecretString;
use url::Url;

use crate::TargetError;

/// Which protocol a URL speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Postgres,
    Redis,
}

/// One host a URL names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Host {
    /// A DNS name, lowercase, without a trailing dot.
    Name(String),
    /// A literal address.
    Ip(IpAddr),
    /// A unix-socket path (PostgreSQL: the socket's directory).
    Unix(String),
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Name(name) => f.write_str(name),
            Host::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]"),
            Host::Ip(ip) => write!(f, "{ip}"),
            Host::Unix(path) => write!(f, "unix:{path}"),
        }
    }
}

/// A connection URL taken apart. No `Debug`: it holds the password and option values.
pub(crate) struct ParsedUrl {
    pub(crate) kind: Kind,
    /// Every host the URL names (authority, then `host=`, then `hostaddr=`); the last one is the
    /// one connected to, as in libpq and sqlx.
    pub(crate) hosts: Vec<Host>,
    pub(crate) port: u16,
    /// PostgreSQL: the user, defaulted as libpq does (`PGUSER`, then the OS user).
    pub(crate) user: String,
    pub(crate) password: Option<SecretString>,
    /// PostgreSQL: the database, defaulting to the user; Redis: the database number.
    pub(crate) database: String,
    /// Query parameters as given.
    pub(crate) query: Vec<(String, String)>,
    /// `rediss://`.
    pub(crate) tls: bool,
}

impl ParsedUrl {
    /// The host a connection goes to.
    pub(crate) fn connect_host(&self) -> &Host {
        // `parse` always records at least one host.
        &self.hosts[self.hosts.len() - 1]
    }

    pub(crate) fn param(&self, key: &str) -> Option<&str> {
        self.query
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

fn invalid(reason: impl Into<String>) -> TargetError {
    TargetError::InvalidUrl(reason.into())
}

/// Takes `raw` apart, refusing what Keel could not connect to as written.
pub(crate) fn parse(raw: &str) -> Result<ParsedUrl, TargetError> {
    let url = Url::parse(raw).map_err(|e| invalid(format!("is not a valid URL ({e})")))?;
    match url.scheme() {
        "postgres" | "postgresql" => parse_postgres(&url),
        "redis" | "rediss" | "valkey" | "valkeys" => parse_redis(&url),
        "redis+unix" | "valkey+unix" | "unix" => Ok(ParsedUrl {
            kind: Kind::Redis,
            hosts: vec![Host::Unix(decode(url.path()))],
            port: 0,
            user: String::new(),
            password: None,
            database: "0".to_owned(),
            query: pairs(&url),
            tls: false,
        }),
        other => Err(invalid(format!(
            "scheme {other:?} is not a database Keel connects to; use postgres:// or redis://"
        ))),
    }
}

fn pairs(url: &Url) -> Vec<(String, String)> {
    url.query_pairs()
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

fn decode(raw: &str) -> String {
    percent_encoding::percent_decode_str(raw)
        .decode_utf8_lossy()
        .into_owned()
}

fn parse_postgres(url: &Url) -> Result<ParsedUrl, TargetError> {
    let query = pairs(url);
    let mut hosts = Vec::new();
    if let Some(host) = url.host() {
        let raw = match host {
            url::Host::Domain(domain) => decode(domain),
            url::Host::Ipv4(ip) => ip.to_string(),
            url::Host::Ipv6(ip) => ip.to_string(),
        };
        if !raw.is_empty() {
            hosts.push(classify(&raw)?);
        }
    }
    for key in ["host", "hostaddr"] {
        for (_, value) in query.iter().filter(|(k, _)| k == key) {
            if value.contains(',') {
                return Err(invalid(format!(
                    "{key}= lists several hosts; Keel connects to one host per instance, so register each host as its own instance"
                )));
            }
            hosts.push(classify(value)?);
        }
    }
    if hosts.is_empty() {
        // libpq and sqlx then use the default unix-socket directory.
        hosts.push(Host::Unix("(the default socket directory)".to_owned()));
    }
    let param = |key: &str| {
        query
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
    };
    let port = match param("port") {
        Some(port) => port
            .parse()
            .map_err(|_| invalid(format!("port {port:?} is not a port number")))?,
        None => url.port().unwrap_or(5432),
    };
    let user = param("user")
        .or_else(|| (!url.username().is_empty()).then(|| decode(url.username())))
        .unwrap_or_else(default_user);
    let password = param("password")
        .or_else(|| url.password().map(decode))
        .map(SecretString::from);
    let path = decode(url.path().trim_start_matches('/'));
    let database = param("dbname")
        .or_else(|| (!path.is_empty()).then_some(path))
        .unwrap_or_else(|| user.clone());
    Ok(ParsedUrl {
        kind: Kind::Postgres,
        hosts,
        port,
        user,
        password,
        database,
        query,
        tls: false,
    })
}

fn parse_redis(url: &Url) -> Result<ParsedUrl, TargetError> {
    let host = match url.host() {
        Some(url::Host::Domain(domain)) if !domain.is_empty() => classify(&decode(domain))?,
        Some(url::Host::Ipv4(ip)) => Host::Ip(IpAddr::V4(ip)),
        Some(url::Host::Ipv6(ip)) => Host::Ip(IpAddr::V6(ip)),
        _ => return Err(invalid("has no host; expected e.g. redis://host:6379/0")),
    };
    let path = url.path().trim_start_matches('/');
    Ok(ParsedUrl {
        kind: Kind::Redis,
        hosts: vec![host],
        port: url.port().unwrap_or(6379),
        user: String::new(),
        password: None,
        database: if path.is_empty() { "0" } else { path }.to_owned(),
        query: pairs(url),
        tls: matches!(url.scheme(), "rediss" | "valkeys"),
    })
}

/// The user libpq and sqlx connect as when the URL names none.
pub(crate) fn default_user() -> String {
    sqlx::postgres::PgConnectOptions::new_without_pgpass()
        .get_username()
        .to_owned()
}

/// A host as written, decoded: a socket path, an address, or a name.
fn classify(raw: &str) -> Result<Host, TargetError> {
    let raw = raw.trim();
    if raw.starts_with('/') || raw.starts_with('@') {
        return Ok(Host::Unix(raw.to_owned()));
    }
    let unbracketed = raw
        .strip_prefix('[')
        .and_then(|r| r.strip_suffix(']'))
        .unwrap_or(raw);
    let name = unbracketed.trim_end_matches('.').to_ascii_lowercase();
    if name.is_empty() {
        return Ok(Host::Unix("(the default socket directory)".to_owned()));
    }
    if let Ok(ip) = name.parse::<IpAddr>() {
        return Ok(Host::Ip(ip));
    }
    // The resolver reads `2852039166`, `0xa9fea9fe` or `0251.0376.0251.0376` as addresses
    // (inet_aton), which the name rules would not see; no real name ends in a numeric label.
    let last = name.rsplit('.').next().unwrap_or_default();
    if last.chars().all(|c| c.is_ascii_digit()) || last.starts_with("0x") {
        return Err(invalid(format!(
            "host {name:?} looks like an address but is not one in the usual form; write IPv4 addresses as four decimal numbers (e.g. 10.0.0.5)"
        )));
    }
    if name
        .chars()
        .any(|c| c.is_whitespace() || c == '/' || c == '\\')
    {
        return Err(invalid(format!("host {name:?} is not a host name")));
    }
    Ok(Host::Name(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts(raw: &str) -> Vec<String> {
        match parse(raw) {
            Ok(url) => url.hosts.iter().map(ToString::to_string).collect(),
            Err(e) => vec![format!("error: {e}")],
        }
    }

    #[test]
    fn every_host_form_is_seen() {
        assert_eq!(hosts("postgres://u@DB.Example.com./d"), ["db.example.com"]);
        assert_eq!(hosts("postgres://u@[::1]:5433/d"), ["[::1]"]);
        assert_eq!(hosts("postgres://u@127.0.0.1/d"), ["127.0.0.1"]);
        assert_eq!(
            hosts("postgres://u@%31%36%39.254.169.254/d"),
            ["169.254.169.254"]
        );
        assert_eq!(
            hosts("postgres://u@%2Fvar%2Frun%2Fpostgresql/d"),
            ["unix:/var/run/postgresql"]
        );
        assert_eq!(
            hosts("postgres://db/d?host=/tmp&hostaddr=10.0.0.1"),
            ["db", "unix:/tmp", "10.0.0.1"]
        );
        assert_eq!(
            hosts("postgres:///d"),
            ["unix:(the default socket directory)"]
        );
        assert_eq!(
            hosts("redis+unix:///tmp/redis.sock"),
            ["unix:/tmp/redis.sock"]
        );
        assert_eq!(hosts("redis://cache:6380/1"), ["cache"]);
        for numeric in [
            "postgres://2852039166/d",
            "postgres://0xa9fea9fe/d",
            "postgres://0251.0376.0251.0376/d",
        ] {
            assert!(hosts(numeric)[0].contains("usual form"), "{numeric}");
        }
        assert!(hosts("postgres://db/d?host=a,b")[0].contains("several hosts"));
        assert!(hosts("mysql://db/d")[0].contains("not a database"));
    }

    #[test]
    fn port_user_and_database_default_like_libpq() {
        let url = parse("postgres://app@db/shop").expect("valid");
        assert_eq!(
            (url.port, url.user.as_str(), url.database.as_str()),
            (5432, "app", "shop")
        );
        let url = parse("postgres://app@db:6000").expect("valid");
        assert_eq!((url.port, url.database.as_str()), (6000, "app"));
        let url = parse("postgres://db/x?dbname=y&port=7000&user=z").expect("valid");
        assert_eq!(
            (url.port, url.user.as_str(), url.database.as_str()),
            (7000, "z", "y")
        );
    }
}
