//! The target policy: which hosts, addresses and connection options Keel accepts for a target.
//!
//! Order of the rules, for a host name and each address it stands for:
//! 1. an explicit deny (`--target-deny-hosts`, `--target-deny-networks`) refuses, whatever else says;
//! 2. an explicit allow (`--target-allow-hosts`, `--target-allow-networks`) accepts;
//! 3. the defaults refuse link-local and metadata addresses and names;
//! 4. anything else (loopback and private networks included) is accepted.
//!
//! Unix sockets, file-reading connection options and Keel's own state-store database are refused
//! unless their own setting allows them; an explicit deny still wins over those.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

use crate::url::{Host, Kind, ParsedUrl};

pub(crate) const ALLOW_NETWORKS: &str = "--target-allow-networks / KEEL_TARGET_ALLOW_NETWORKS";
pub(crate) const DENY_NETWORKS: &str = "--target-deny-networks / KEEL_TARGET_DENY_NETWORKS";
pub(crate) const ALLOW_HOSTS: &str = "--target-allow-hosts / KEEL_TARGET_ALLOW_HOSTS";
pub(crate) const DENY_HOSTS: &str = "--target-deny-hosts / KEEL_TARGET_DENY_HOSTS";
pub(crate) const ALLOW_UNIX_SOCKETS: &str =
    "--target-allow-unix-sockets / KEEL_TARGET_ALLOW_UNIX_SOCKETS";
pub(crate) const ALLOW_OPTIONS: &str = "--target-allow-options / KEEL_TARGET_ALLOW_OPTIONS";
pub(crate) const ALLOW_STATE_STORE: &str =
    "--target-allow-state-store / KEEL_TARGET_ALLOW_STATE_STORE";

/// Networks refused unless explicitly allowed, with the reason shown in the refusal.
/// Sources: the cloud providers' instance-metadata documentation (AWS IMDS on 169.254.169.254 and
/// fd00:ec2::254, GCP and Azure on 169.254.169.254, Azure WireServer 168.63.129.16, Alibaba
/// 100.100.100.200, Oracle Cloud Classic 192.0.0.192) and RFC 3927 / RFC 4291 for link-local.
pub(crate) const RESERVED_NETWORKS: &[(&str, &str)] = &[
    (
        "169.254.0.0/16",
        "a link-local address; cloud metadata services (AWS, GCP, Azure, OpenStack, DigitalOcean, Oracle) answer on 169.254.169.254",
    ),
    ("fe80::/10", "an IPv6 link-local address"),
    (
        "fd00:ec2::254/128",
        "the AWS instance metadata service (IPv6)",
    ),
    ("100.100.100.200/32", "the Alibaba Cloud metadata service"),
    (
        "168.63.129.16/32",
        "the Azure platform endpoint (WireServer)",
    ),
    (
        "192.0.0.192/32",
        "the Oracle Cloud Classic metadata service",
    ),
    (
        "0.0.0.0/8",
        "a 'this host' address, which reaches the services of Keel's own machine",
    ),
    (
        "::/128",
        "the unspecified IPv6 address, which reaches the services of Keel's own machine",
    ),
];

/// Host names refused unless explicitly allowed (they resolve to metadata addresses, which the
/// connect-time check refuses too; refusing the name tells the operator earlier).
pub(crate) const RESERVED_HOSTS: &[&str] = &["metadata.google.internal", "metadata.goog"];

/// Connection options that make the client read (or write) files or use credentials of Keel's
/// own host. From libpq's parameter key words (PostgreSQL 18) and sqlx's aliases.
pub const FILE_OPTIONS: &[&str] = &[
    "passfile",
    "service",
    "servicefile",
    "sslcert",
    "sslkey",
    "sslrootcert",
    "sslcrl",
    "sslcrldir",
    "sslkeylogfile",
    "ssl-cert",
    "ssl-key",
    "ssl-root-cert",
    "ssl-ca",
    "krbsrvname",
    "gsslib",
    "gssdelegation",
];

/// A host-name pattern: `db.example.com` matches that name, `*.internal` any name under
/// `internal` (not `internal` itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPattern {
    wildcard: bool,
    name: String,
}

impl HostPattern {
    /// Parses a pattern, refusing anything that is not a DNS name with an optional `*.` prefix.
    pub fn parse(raw: &str) -> Result<Self, String> {
        let lowered = raw.trim().trim_end_matches('.').to_ascii_lowercase();
        let (wildcard, name) = match lowered.strip_prefix("*.") {
            Some(rest) => (true, rest.to_owned()),
            None => (false, lowered),
        };
        let valid = !name.is_empty()
            && name.len() <= 253
            && name.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            });
        if !valid {
            return Err(format!(
                "{raw:?} is not a host pattern; write a DNS name such as db.example.com, or *.internal for every name under internal"
            ));
        }
        Ok(Self { wildcard, name })
    }

    /// Whether `host` (lowercase, without a trailing dot) matches.
    pub fn matches(&self, host: &str) -> bool {
        if self.wildcard {
            host.strip_suffix(self.name.as_str())
                .is_some_and(|prefix| prefix.len() > 1 && prefix.ends_with('.'))
        } else {
            host == self.name
        }
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.wildcard {
            write!(f, "*.{}", self.name)
        } else {
            f.write_str(&self.name)
        }
    }
}

/// Why the policy refuses a target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rule {
    /// The address is in an explicitly denied network.
    DeniedNetwork(IpNet),
    /// The host name matches an explicitly denied pattern.
    DeniedHost(HostPattern),
    /// The address is link-local, a metadata service or otherwise reserved.
    ReservedNetwork {
        /// The reserved network.
        network: IpNet,
        /// What lives there.
        why: &'static str,
    },
    /// The host name is a metadata service's.
    ReservedHost(&'static str),
    /// A unix-domain socket on Keel's own host.
    UnixSocket,
    /// A connection option that reads a file on Keel's host.
    FileOption(String),
    /// Keel's own state-store database.
    StateStore,
}

impl Rule {
    /// The setting that would let the target through, if any does.
    pub fn setting(&self) -> &'static str {
        match self {
            Rule::DeniedNetwork(_) => DENY_NETWORKS,
            Rule::DeniedHost(_) => DENY_HOSTS,
            Rule::ReservedNetwork { .. } => ALLOW_NETWORKS,
            Rule::ReservedHost(_) => ALLOW_HOSTS,
            Rule::UnixSocket => ALLOW_UNIX_SOCKETS,
            Rule::FileOption(_) => ALLOW_OPTIONS,
            Rule::StateStore => ALLOW_STATE_STORE,
        }
    }
}

/// A target the policy refuses: what, by which rule, and the setting that would allow it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{subject} is refused by Keel's target policy: {}", self.explain())]
pub struct Denied {
    /// What was refused, e.g. `address 169.254.169.254 of host metadata`.
    pub subject: String,
    /// The rule that refused it.
    pub rule: Rule,
}

impl Denied {
    fn new(subject: impl Into<String>, rule: Rule) -> Self {
        Self {
            subject: subject.into(),
            rule,
        }
    }

    /// What to change so that the target is accepted.
    pub fn remedy(&self) -> String {
        let setting = self.rule.setting();
        match &self.rule {
            Rule::DeniedNetwork(network) => format!(
                "{network} is in {setting}, which no allow setting overrides; remove it there to allow this target"
            ),
            Rule::DeniedHost(pattern) => format!(
                "{pattern} is in {setting}, which no allow setting overrides; remove it there to allow this target"
            ),
            Rule::ReservedNetwork { network, .. } => {
                format!("to allow it, add {network} (or a narrower network) to {setting}")
            }
            Rule::ReservedHost(host) => format!("to allow it, add {host} to {setting}"),
            Rule::UnixSocket => {
                format!("use a TCP host such as 127.0.0.1 instead, or set {setting}=true")
            }
            Rule::FileOption(option) => {
                format!("remove {option} from the URL, or add {option} to {setting}")
            }
            Rule::StateStore => format!("register another database, or set {setting}=true"),
        }
    }

    fn explain(&self) -> String {
        let why = match &self.rule {
            Rule::DeniedNetwork(network) => format!("{network} is denied explicitly"),
            Rule::DeniedHost(pattern) => format!("{pattern} is denied explicitly"),
            Rule::ReservedNetwork { network, why } => format!("it is {why} ({network})"),
            Rule::ReservedHost(_) => "it is a cloud metadata service's name".to_owned(),
            Rule::UnixSocket => {
                "a unix socket connects to Keel's own host, as Keel's own OS user".to_owned()
            }
            Rule::FileOption(_) => {
                "the option makes Keel read a file or use credentials of its own host".to_owned()
            }
            Rule::StateStore => "it is Keel's own state-store database".to_owned(),
        };
        format!("{why}; {}", self.remedy())
    }
}

/// Keel's state store, as host, port and database, so it is never a target by accident.
#[derive(Debug, Clone)]
pub(crate) struct StateStore {
    pub(crate) host: Host,
    pub(crate) port: u16,
    pub(crate) database: String,
}

/// Where Keel may connect on a tenant's behalf. Build it with
/// [`TargetConfig::policy`](crate::TargetConfig::policy).
#[derive(Debug, Clone)]
pub struct TargetPolicy {
    pub(crate) allow_networks: Vec<IpNet>,
    pub(crate) deny_networks: Vec<IpNet>,
    pub(crate) allow_hosts: Vec<HostPattern>,
    pub(crate) deny_hosts: Vec<HostPattern>,
    pub(crate) allow_unix_sockets: bool,
    pub(crate) allow_options: Vec<String>,
    pub(crate) allow_state_store: bool,
    pub(crate) state_store: Option<StateStore>,
    pub(crate) reserved: Vec<(IpNet, &'static str)>,
}

impl TargetPolicy {
    /// The rules that need no address: unix sockets, options, host names, literal addresses and
    /// the state store by name. Applied when a URL is stored, and again before connecting.
    pub(crate) fn check_static(&self, url: &ParsedUrl) -> Result<(), Denied> {
        for (key, _) in &url.query {
            let key = key.to_ascii_lowercase();
            if FILE_OPTIONS.contains(&key.as_str()) && !self.allow_options.contains(&key) {
                return Err(Denied::new(
                    format!("connection option {key}"),
                    Rule::FileOption(key),
                ));
            }
        }
        for host in &url.hosts {
            match host {
                Host::Unix(path) if !self.allow_unix_sockets => {
                    return Err(Denied::new(
                        format!("unix socket {path:?}"),
                        Rule::UnixSocket,
                    ));
                }
                Host::Unix(_) => {}
                Host::Name(name) => self.decide_name(name)?,
                Host::Ip(ip) => self.decide(None, *ip)?,
            }
        }
        let literal: Vec<IpAddr> = match url.connect_host() {
            Host::Ip(ip) => vec![*ip],
            _ => Vec::new(),
        };
        let store_ips: Vec<IpAddr> = match self.state_store().map(|s| &s.host) {
            Some(Host::Ip(ip)) => vec![*ip],
            _ => Vec::new(),
        };
        self.check_state_store(url, &literal, &store_ips)
    }

    /// The name rules alone, for a host name whose addresses are not known yet.
    fn decide_name(&self, name: &str) -> Result<(), Denied> {
        if let Some(pattern) = self.deny_hosts.iter().find(|p| p.matches(name)) {
            return Err(Denied::new(
                format!("host {name}"),
                Rule::DeniedHost(pattern.clone()),
            ));
        }
        if self.allow_hosts.iter().any(|p| p.matches(name)) {
            return Ok(());
        }
        if let Some(reserved) = RESERVED_HOSTS.iter().find(|r| **r == name) {
            return Err(Denied::new(
                format!("host {name}"),
                Rule::ReservedHost(reserved),
            ));
        }
        Ok(())
    }

    /// Every rule for one address, reached through `name` if it came from DNS.
    pub(crate) fn decide(&self, name: Option<&str>, ip: IpAddr) -> Result<(), Denied> {
        let subject = || match name {
            Some(name) => format!("address {ip} of host {name}"),
            None => format!("address {ip}"),
        };
        let forms = forms(ip);
        if let Some(pattern) =
            name.and_then(|name| self.deny_hosts.iter().find(|p| p.matches(name)))
        {
            return Err(Denied::new(subject(), Rule::DeniedHost(pattern.clone())));
        }
        if let Some(network) = first_containing(&self.deny_networks, &forms) {
            return Err(Denied::new(subject(), Rule::DeniedNetwork(network)));
        }
        if name.is_some_and(|name| self.allow_hosts.iter().any(|p| p.matches(name))) {
            return Ok(());
        }
        if first_containing(&self.allow_networks, &forms).is_some() {
            return Ok(());
        }
        for (network, why) in &self.reserved {
            if forms.iter().any(|ip| network.contains(ip)) {
                return Err(Denied::new(
                    subject(),
                    Rule::ReservedNetwork {
                        network: *network,
                        why,
                    },
                ));
            }
        }
        match name {
            Some(name) => self.decide_name(name),
            None => Ok(()),
        }
    }

    /// Refuses the state-store database: same database and port, and the same host by name, by
    /// loopback, or by address (`target_ips` and `store_ips` are known at connect time).
    pub(crate) fn check_state_store(
        &self,
        url: &ParsedUrl,
        target_ips: &[IpAddr],
        store_ips: &[IpAddr],
    ) -> Result<(), Denied> {
        let Some(store) = self.state_store() else {
            return Ok(());
        };
        if url.kind != Kind::Postgres || store.port != url.port || store.database != url.database {
            return Ok(());
        }
        let local = |ip: &IpAddr| {
            let ip = canonical(*ip);
            ip.is_loopback() || ip.is_unspecified()
        };
        let store_local = is_local(&store.host) || store_ips.iter().any(local);
        let same = same_host(url.connect_host(), &store.host)
            || target_ips.iter().any(|target| {
                store_ips
                    .iter()
                    .any(|store| canonical(*store) == canonical(*target))
                    || (store_local && local(target))
            });
        if same {
            return Err(Denied::new(
                format!(
                    "database {} on {}:{}",
                    url.database,
                    url.connect_host(),
                    url.port
                ),
                Rule::StateStore,
            ));
        }
        Ok(())
    }

    /// The state store's host, for resolving it at connect time.
    pub(crate) fn state_store(&self) -> Option<&StateStore> {
        self.state_store
            .as_ref()
            .filter(|_| !self.allow_state_store)
    }
}

fn first_containing(networks: &[IpNet], forms: &[IpAddr]) -> Option<IpNet> {
    networks
        .iter()
        .find(|network| forms.iter().any(|ip| network.contains(ip)))
        .copied()
}

/// The address and the IPv4 address it carries, if any (IPv4-mapped `::ffff:a.b.c.d` and the
/// NAT64 prefix `64:ff9b::/96`), so `::ffff:169.254.169.254` is judged like 169.254.169.254.
fn forms(ip: IpAddr) -> Vec<IpAddr> {
    let mut forms = vec![ip];
    if let IpAddr::V6(v6) = ip
        && let Some(v4) = embedded_v4(v6)
    {
        forms.push(IpAddr::V4(v4));
    }
    forms
}

fn embedded_v4(v6: Ipv6Addr) -> Option<Ipv4Addr> {
    if let Some(v4) = v6.to_ipv4_mapped() {
        return Some(v4);
    }
    let segments = v6.segments();
    if segments[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        let [.., a, b] = segments;
        let [a1, a2] = a.to_be_bytes();
        let [b1, b2] = b.to_be_bytes();
        return Some(Ipv4Addr::new(a1, a2, b1, b2));
    }
    None
}

pub(crate) fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    }
}

/// Loopback names and addresses all reach Keel's own machine, and so count as one host.
fn is_local(host: &Host) -> bool {
    match host {
        Host::Name(name) => name == "localhost" || name.ends_with(".localhost"),
        Host::Ip(ip) => canonical(*ip).is_loopback() || canonical(*ip).is_unspecified(),
        Host::Unix(_) => false,
    }
}

pub(crate) fn same_host(a: &Host, b: &Host) -> bool {
    match (a, b) {
        (Host::Ip(x), Host::Ip(y)) if canonical(*x) == canonical(*y) => true,
        (Host::Name(x), Host::Name(y)) if x == y => true,
        (Host::Unix(x), Host::Unix(y)) => x.trim_end_matches('/') == y.trim_end_matches('/'),
        _ => is_local(a) && is_local(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_patterns_match_names_and_subdomains() {
        let exact = HostPattern::parse("DB.Example.com.").expect("valid");
        assert!(exact.matches("db.example.com"));
        assert!(!exact.matches("x.db.example.com"));
        let wildcard = HostPattern::parse("*.internal").expect("valid");
        assert!(wildcard.matches("metadata.google.internal"));
        assert!(!wildcard.matches("internal"));
        assert!(!wildcard.matches("notinternal"));
        for bad in ["", "*", "a..b", "*.a*", "db:5432", "a/b"] {
            assert!(HostPattern::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn mapped_and_nat64_addresses_carry_their_ipv4_address() {
        let mapped: IpAddr = "::ffff:169.254.169.254".parse().expect("ip");
        let nat64: IpAddr = "64:ff9b::a9fe:a9fe".parse().expect("ip");
        let metadata: IpAddr = "169.254.169.254".parse().expect("ip");
        assert_eq!(forms(mapped), vec![mapped, metadata]);
        assert_eq!(forms(nat64), vec![nat64, metadata]);
        assert_eq!(forms(metadata), vec![metadata]);
    }
}
