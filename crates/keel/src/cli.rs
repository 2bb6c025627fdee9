//! Every flag and environment variable of the `keel` binary, in one place.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use keel_config::{DatabaseConfig, ListenConfig, NatsConfig, TelemetryConfig, parse_duration};
use secrecy::SecretString;

/// Keel keeps fleets of PostgreSQL and Redis databases healthy.
#[derive(Debug, Parser)]
#[command(name = "keel", version, about, propagate_version = true)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Run Keel's services.
    Serve(Box<ServeArgs>),
    /// Register, inspect and check database instances.
    #[command(subcommand)]
    Instance(InstanceCommand),
    /// Show what the collector scraped from an instance: scrape status, latest values, history.
    Metrics(MetricsArgs),
    /// Show an instance's statements by the time they took (from pg_stat_statements).
    #[command(subcommand)]
    Queries(QueriesCommand),
    /// Show the alerts the collector's rules raised.
    #[command(subcommand)]
    Alerts(AlertsCommand),
    /// Analyse a PostgreSQL instance's workload and propose indexes, with the evidence.
    Optimize(OptimizeArgs),
    /// List, show, apply and roll back the optimizer's recommendations.
    #[command(subcommand)]
    Recs(RecsCommand),
    /// Watch Keel's events.
    #[command(subcommand)]
    Events(EventsCommand),
    /// Administer API keys and encryption keys (talks to the state store directly).
    #[command(subcommand)]
    Admin(AdminCommand),
    /// Print a shell completion script, e.g. `keel completion bash > /etc/bash_completion.d/keel`,
    /// `keel completion zsh > "${fpath[1]}/_keel"`, `keel completion fish > ~/.config/fish/completions/keel.fish`.
    Completion {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

/// Which services a process runs. A service is offered here once its crate exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Target {
    /// Every service in one process (a laptop or a small fleet).
    All,
    /// The instance registry.
    Registry,
    /// The metrics collector (scrapes every instance, history, /metrics, alerts).
    Collector,
    /// The query optimizer (index advice with evidence, apply and rollback).
    Optimizer,
}

impl Target {
    /// The services this target runs, in the order they start: the registry first, so that
    /// services in the same process can call it in-process.
    pub(crate) fn services(self) -> &'static [Target] {
        match self {
            Target::All => &[Target::Registry, Target::Collector, Target::Optimizer],
            Target::Registry => &[Target::Registry],
            Target::Collector => &[Target::Collector],
            Target::Optimizer => &[Target::Optimizer],
        }
    }
}

#[derive(Debug, Args)]
pub(crate) struct ServeArgs {
    /// Services to run in this process.
    #[arg(long, env = "KEEL_TARGET", value_enum, default_value_t = Target::All)]
    pub(crate) target: Target,
    #[command(flatten)]
    pub(crate) database: DatabaseConfig,
    #[command(flatten)]
    pub(crate) nats: NatsConfig,
    #[command(flatten)]
    pub(crate) listen: ListenConfig,
    #[command(flatten)]
    pub(crate) telemetry: TelemetryConfig,
    #[command(flatten)]
    pub(crate) limits: keel_limits::LimitsConfig,
    #[command(flatten)]
    pub(crate) fleet_limits: keel_limits::FleetLimitsConfig,
    #[command(flatten)]
    pub(crate) targets: keel_target::TargetConfig,
    #[command(flatten)]
    pub(crate) encryption: EncryptionArgs,
    #[command(flatten)]
    pub(crate) collector: CollectorArgs,
    #[command(flatten)]
    pub(crate) optimizer: OptimizerArgs,
    /// File holding an admin API key to register at start (e.g. a mounted Kubernetes Secret),
    /// so a new deployment can be used without `keel admin create-key`.
    #[arg(long, env = "KEEL_BOOTSTRAP_ADMIN_KEY_FILE")]
    pub(crate) bootstrap_admin_key_file: Option<PathBuf>,
    /// Tenant of the bootstrap admin key.
    #[arg(long, env = "KEEL_BOOTSTRAP_TENANT", default_value = "default")]
    pub(crate) bootstrap_tenant: String,
    /// How long an authenticated API key is trusted before it is looked up again
    /// (revocations reach every server at once; this bounds them only while the state store is unreachable).
    #[arg(long, env = "KEEL_AUTH_CACHE_TTL", default_value = "5s", value_parser = parse_duration)]
    pub(crate) auth_cache_ttl: Duration,
    /// Refuse a `service` API key unless the call comes over mutual TLS with a verified client
    /// certificate naming the key (its name as created, e.g. `collector`), so a leaked service
    /// key is useless without the service's certificate. Needs --tls-client-ca-file.
    #[arg(
        long = "service-keys-require-client-cert",
        env = "KEEL_SERVICE_KEYS_REQUIRE_CLIENT_CERT",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub(crate) service_keys_require_client_cert: bool,
    /// How long an instance check waits for the database.
    #[arg(long, env = "KEEL_CHECK_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub(crate) check_timeout: Duration,
}

/// The key ring that encrypts connection credentials at rest.
/// Settings of the collector (`--target collector` or `all`).
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Collector")]
pub(crate) struct CollectorArgs {
    /// Scrape interval of instances without a `collector.keel.dev/interval` label.
    #[arg(long = "collector-interval", env = "KEEL_COLLECTOR_INTERVAL", default_value = "15s", value_parser = parse_duration)]
    pub(crate) interval: Duration,
    /// Scrape timeout of instances without a `collector.keel.dev/timeout` label (at most the
    /// interval): a target that has not answered by then counts as down.
    #[arg(long = "collector-timeout", env = "KEEL_COLLECTOR_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub(crate) timeout: Duration,
    /// How long history (metrics, statement deltas, resolved alerts) is kept.
    #[arg(long = "collector-retention", env = "KEEL_COLLECTOR_RETENTION", default_value = "7d", value_parser = parse_duration)]
    pub(crate) retention: Duration,
    /// Scrapes one replica runs at once.
    #[arg(
        long = "collector-concurrency",
        env = "KEEL_COLLECTOR_CONCURRENCY",
        default_value_t = 64
    )]
    pub(crate) concurrency: usize,
    /// Most series per instance on /metrics; what is cut is counted in keel_target_series_dropped.
    #[arg(
        long = "collector-series-per-target",
        env = "KEEL_COLLECTOR_SERIES_PER_TARGET",
        default_value_t = 500
    )]
    pub(crate) series_per_target: usize,
    /// Statements exposed one by one on /metrics per instance (the rest as queryid="other").
    #[arg(
        long = "collector-statements-exported",
        env = "KEEL_COLLECTOR_STATEMENTS_EXPORTED",
        default_value_t = 20
    )]
    pub(crate) statements_exported: usize,
    /// JSON file of alert rule overrides: `[{"rule": "PostgresLongRunningQuery",
    /// "match": {"env": "batch"}, "threshold": 3600, "for": "5m"}, {"rule": "…", "disabled": true}]`.
    #[arg(
        long = "collector-alert-rules-file",
        env = "KEEL_COLLECTOR_ALERT_RULES_FILE"
    )]
    pub(crate) alert_rules_file: Option<PathBuf>,
    /// The registry's gRPC endpoint, when this process does not run the registry itself.
    #[arg(long = "registry-endpoint", env = "KEEL_REGISTRY_ENDPOINT")]
    pub(crate) registry_endpoint: Option<String>,
    /// File holding the fleet key (`keel admin create-key --fleet`) the collector calls the
    /// registry with, when it runs apart from it.
    #[arg(long = "fleet-key-file", env = "KEEL_FLEET_KEY_FILE")]
    pub(crate) fleet_key_file: Option<PathBuf>,
    /// CA certificate (PEM) of the registry's endpoint; the web PKI roots without it.
    #[arg(long = "registry-tls-ca-file", env = "KEEL_REGISTRY_TLS_CA_FILE")]
    pub(crate) registry_tls_ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for the registry under mutual TLS (with --registry-tls-key-file).
    #[arg(
        long = "registry-tls-cert-file",
        env = "KEEL_REGISTRY_TLS_CERT_FILE",
        requires = "registry_tls_key_file"
    )]
    pub(crate) registry_tls_cert_file: Option<PathBuf>,
    /// Private key (PEM) of --registry-tls-cert-file.
    #[arg(
        long = "registry-tls-key-file",
        env = "KEEL_REGISTRY_TLS_KEY_FILE",
        requires = "registry_tls_cert_file"
    )]
    pub(crate) registry_tls_key_file: Option<PathBuf>,
}

/// Settings of the optimizer (`--target optimizer` or `all`). Apart from the registry it uses
/// the collector's --registry-endpoint, --fleet-key-file and registry TLS settings.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Optimizer")]
pub(crate) struct OptimizerArgs {
    /// The collector's gRPC endpoint (its top queries are the workload), when this process
    /// does not run the collector; without either, pg_stat_statements is read directly.
    #[arg(long = "collector-endpoint", env = "KEEL_COLLECTOR_ENDPOINT")]
    pub(crate) collector_endpoint: Option<String>,
    /// How long a replica's claim on an analysis or an index build lasts unless renewed; a
    /// killed replica's work is taken over after it.
    #[arg(long = "optimizer-lease", env = "KEEL_OPTIMIZER_LEASE", default_value = "30s", value_parser = parse_duration)]
    pub(crate) lease: Duration,
    /// Longest an index build may run on an instance.
    #[arg(long = "optimizer-build-timeout", env = "KEEL_OPTIMIZER_BUILD_TIMEOUT", default_value = "1h", value_parser = parse_duration)]
    pub(crate) build_timeout: Duration,
    /// Longest a build or drop waits for its table's lock (`lock_timeout`).
    #[arg(long = "optimizer-lock-timeout", env = "KEEL_OPTIMIZER_LOCK_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub(crate) lock_timeout: Duration,
    /// Planner cost units one index entry costs to write (insert or non-HOT update).
    #[arg(
        long = "optimizer-write-cost",
        env = "KEEL_OPTIMIZER_WRITE_COST",
        default_value_t = 1.0
    )]
    pub(crate) write_cost: f64,
}

#[derive(Debug, Args)]
pub(crate) struct EncryptionArgs {
    /// File holding the key ring, `id:base64key` entries by line or comma, the key that
    /// encrypts first (e.g. a mounted Kubernetes Secret). Alternatively set the ring itself in
    /// the environment variable KEEL_ENCRYPTION_KEYS; there is deliberately no flag for the
    /// keys themselves, because flags show in `ps`.
    #[arg(long = "encryption-keys-file", env = "KEEL_ENCRYPTION_KEYS_FILE")]
    pub(crate) encryption_keys_file: Option<PathBuf>,
}

/// How the CLI reaches a Keel server.
#[derive(Debug, Clone, Args)]
pub(crate) struct ClientArgs {
    /// gRPC endpoint of Keel.
    #[arg(
        long,
        env = "KEEL_ENDPOINT",
        default_value = "http://127.0.0.1:50051",
        global = true
    )]
    pub(crate) endpoint: String,
    /// File holding the API key (`keel_…`). Alternatively set the key itself in the
    /// environment variable KEEL_API_KEY; there is no flag for the key, because flags show in `ps`.
    #[arg(long = "api-key-file", env = "KEEL_API_KEY_FILE", global = true)]
    pub(crate) api_key_file: Option<PathBuf>,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Table, global = true)]
    pub(crate) output: Output,
    /// CA certificate (PEM) that signed the server's certificate; without it an https://
    /// endpoint is verified against the public web roots.
    #[arg(long = "tls-ca-file", env = "KEEL_TLS_CA_FILE", global = true)]
    pub(crate) tls_ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for servers that require mutual TLS.
    #[arg(
        long = "tls-client-cert-file",
        env = "KEEL_TLS_CLIENT_CERT_FILE",
        global = true,
        requires = "tls_client_key_file"
    )]
    pub(crate) tls_client_cert_file: Option<PathBuf>,
    /// Private key (PEM) of the client certificate.
    #[arg(
        long = "tls-client-key-file",
        env = "KEEL_TLS_CLIENT_KEY_FILE",
        global = true,
        requires = "tls_client_cert_file"
    )]
    pub(crate) tls_client_key_file: Option<PathBuf>,
    /// Name the server certificate must carry, when it differs from the endpoint's host.
    #[arg(long = "tls-server-name", env = "KEEL_TLS_SERVER_NAME", global = true)]
    pub(crate) tls_server_name: Option<String>,
    /// Longest wait for Keel to answer one request (a stream: its first message).
    #[arg(long, env = "KEEL_TIMEOUT", default_value = "30s", value_parser = parse_duration, global = true)]
    pub(crate) timeout: Duration,
    /// Longest wait for the connection to Keel.
    #[arg(long = "connect-timeout", env = "KEEL_CONNECT_TIMEOUT", default_value = "5s", value_parser = parse_duration, global = true)]
    pub(crate) connect_timeout: Duration,
}

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Output {
    /// Tables for people, fitted to the terminal (columns dropped or wrapped between words).
    Table,
    /// Tables with every column (ids included), however wide.
    Wide,
    /// JSON, one document per result (one per line for streams).
    Json,
}

/// Engines as written on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum EngineArg {
    /// PostgreSQL.
    Postgres,
    /// Redis.
    Redis,
}

#[derive(Debug, Subcommand)]
pub(crate) enum InstanceCommand {
    /// Register an instance.
    Add {
        /// Name, unique in your tenant (a-z, 0-9, '-').
        name: String,
        /// Database engine.
        #[arg(long, value_enum)]
        engine: EngineArg,
        /// Connection URL, e.g. postgres://user:password@host:5432/db.
        #[arg(long, env = "KEEL_INSTANCE_URL", hide_env_values = true)]
        url: SecretString,
        /// Environment, e.g. production.
        #[arg(long = "env", default_value = "")]
        environment: String,
        /// Label `key=value`; repeatable, each key once.
        #[arg(long = "label", short = 'l', value_parser = parse_key_value)]
        labels: Vec<(String, String)>,
        /// Monitoring endpoint `kind=url`, e.g. `postgres_exporter=http://db:9187/metrics`;
        /// repeatable.
        #[arg(long = "monitoring-endpoint", value_parser = parse_key_value)]
        endpoints: Vec<(String, String)>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List instances.
    Ls {
        /// Label selector, e.g. `tier=db,region in (eu,us)`.
        #[arg(long, short = 's', default_value = "")]
        selector: String,
        /// Only this engine.
        #[arg(long, value_enum)]
        engine: Option<EngineArg>,
        /// Only this environment.
        #[arg(long = "env")]
        environment: Option<String>,
        /// Most instances to print (all when unset).
        #[arg(long)]
        limit: Option<usize>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Show one instance.
    Get {
        /// Name or id.
        instance: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Change an instance.
    Update {
        /// Name or id.
        instance: String,
        /// New name.
        #[arg(long)]
        rename: Option<String>,
        /// New connection URL.
        #[arg(long, env = "KEEL_INSTANCE_URL", hide_env_values = true)]
        url: Option<SecretString>,
        /// New environment.
        #[arg(long = "env")]
        environment: Option<String>,
        /// Set label `key=value`; repeatable, each key once.
        #[arg(long = "label", short = 'l', value_parser = parse_key_value)]
        labels: Vec<(String, String)>,
        /// Remove label `key`; repeatable.
        #[arg(long = "remove-label")]
        remove_labels: Vec<String>,
        /// Set the monitoring endpoint of a kind, `kind=url` (replacing that kind's endpoints);
        /// repeatable, each kind once.
        #[arg(long = "monitoring-endpoint", value_parser = parse_key_value)]
        endpoints: Vec<(String, String)>,
        /// Remove the monitoring endpoints of `kind`; repeatable.
        #[arg(long = "remove-monitoring-endpoint")]
        remove_endpoints: Vec<String>,
        /// Fail unless the stored version is this one (default: the version just read).
        #[arg(long)]
        expected_version: Option<i64>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Remove an instance.
    Rm {
        /// Name or id.
        instance: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Probe an instance now and show what Keel needs from it.
    Check {
        /// Name or id.
        instance: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Have the collector scrape an instance now and show how it went (exit 1 if it could
    /// not reach the instance); the next scheduled scrape moves to one interval after it.
    Collect {
        /// Name or id.
        instance: String,
        #[command(flatten)]
        client: ClientArgs,
    },
}

/// `keel metrics`.
#[derive(Debug, Args)]
pub(crate) struct MetricsArgs {
    /// Name or id of the instance.
    pub(crate) instance: String,
    /// Also the history over this window ending now, e.g. 15m, 1h or 2d (at most the
    /// collector's retention): first, last, lowest and highest value of each series, every
    /// point with -o json.
    #[arg(long)]
    pub(crate) window: Option<String>,
    /// Only this metric, e.g. keel_pg_connections; repeatable.
    #[arg(long = "name", short = 'n', value_name = "NAME")]
    pub(crate) names: Vec<String>,
    #[command(flatten)]
    pub(crate) client: ClientArgs,
}

#[derive(Debug, Subcommand)]
pub(crate) enum QueriesCommand {
    /// The statements that took the most execution time over a window, with their share of
    /// the instance's total.
    Top {
        /// Name or id of a PostgreSQL instance.
        instance: String,
        /// The window ending now, e.g. 15m, 1h or 1d (at most the collector's retention).
        #[arg(long, default_value = "1h")]
        window: String,
        /// Most statements to show.
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(i32).range(1..=1000))]
        limit: i32,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum AlertsCommand {
    /// List pending and firing alerts, newest first.
    Ls {
        /// Only this instance's alerts (name or id).
        #[arg(long)]
        instance: Option<String>,
        /// Also resolved alerts (those still within the collector's retention).
        #[arg(long)]
        all: bool,
        /// Most alerts to show.
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(i32).range(1..=1000))]
        limit: i32,
        #[command(flatten)]
        client: ClientArgs,
    },
}

/// `keel optimize`.
#[derive(Debug, Args)]
pub(crate) struct OptimizeArgs {
    /// Name or id of a PostgreSQL instance.
    pub(crate) instance: String,
    /// Most space the new indexes may take (their estimated size), e.g. 500MB, 1.5GB, 200kB or
    /// a number of bytes; kB, MB, GB and TB are powers of 1024 [default: 10% of the data size].
    #[arg(long)]
    pub(crate) budget: Option<String>,
    /// Most new indexes to propose [default: 10].
    #[arg(long, value_parser = clap::value_parser!(i32).range(1..=50))]
    pub(crate) max_indexes: Option<i32>,
    /// The workload's window ending now, e.g. 15m, 1h or 1d (1 minute to 30 days).
    #[arg(long, default_value = "1h")]
    pub(crate) window: String,
    /// Most statements of the workload to plan, by total time [default: 50].
    #[arg(long, value_parser = clap::value_parser!(i32).range(1..=500))]
    pub(crate) max_statements: Option<i32>,
    #[command(flatten)]
    pub(crate) client: ClientArgs,
}

/// Recommendation states as written on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum RecStateArg {
    /// Proposed; nothing done on the instance.
    Proposed,
    /// Being applied.
    Applying,
    /// Applied and verified.
    Applied,
    /// Being rolled back.
    #[value(alias = "rolling_back")]
    RollingBack,
    /// Rolled back.
    #[value(alias = "rolled_back")]
    RolledBack,
    /// Applying or rolling back failed.
    Failed,
}

#[derive(Debug, Subcommand)]
pub(crate) enum RecsCommand {
    /// List recommendations, newest first.
    Ls {
        /// Only this instance's recommendations (name or id).
        #[arg(long)]
        instance: Option<String>,
        /// Only those in this state.
        #[arg(long, value_enum)]
        state: Option<RecStateArg>,
        /// Most recommendations to show.
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(i32).range(1..=500))]
        limit: i32,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Show one recommendation with its evidence: DDL, sizes, costs, and the plan of each
    /// statement it helps before and after.
    Show {
        /// Recommendation id, whole or its short form as `keel recs ls` shows it.
        id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Apply a recommendation: build the index (CREATE INDEX CONCURRENTLY), or drop it.
    /// Applying one already applying or applied changes nothing.
    Apply {
        /// Recommendation id, whole or its short form as `keel recs ls` shows it.
        id: String,
        #[command(flatten)]
        wait: WaitArgs,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Roll back an applied recommendation (DROP INDEX CONCURRENTLY, or the dropped index
    /// built again).
    Rollback {
        /// Recommendation id, whole or its short form as `keel recs ls` shows it.
        id: String,
        #[command(flatten)]
        wait: WaitArgs,
        #[command(flatten)]
        client: ClientArgs,
    },
}

/// Waiting for an apply or a rollback to end.
#[derive(Debug, Clone, Args)]
pub(crate) struct WaitArgs {
    /// Wait until the change ends (applied, rolled back or failed), asking every 500 ms; exit 1
    /// if it failed.
    #[arg(long)]
    pub(crate) wait: bool,
    /// Longest wait with --wait (the change goes on in Keel after it).
    #[arg(long = "wait-timeout", default_value = "1h", value_parser = parse_duration, requires = "wait")]
    pub(crate) wait_timeout: Duration,
}

/// A `--window` value: a duration above zero, parsed like every duration setting. Read by
/// the command rather than by clap, so that a bad window is an invalid argument (exit 3)
/// with the fix, as the server's refusal of one longer than its retention is.
pub(crate) fn parse_window(raw: &str) -> anyhow::Result<Duration> {
    let invalid = |why: String| crate::failure::Failure::Invalid.error(format!("--window: {why}"));
    let window = parse_duration(raw).map_err(invalid)?;
    if window.is_zero() {
        return Err(invalid(format!(
            "{raw:?} is no window; give one above zero, e.g. 15m or 1h"
        )));
    }
    Ok(window)
}

#[derive(Debug, Subcommand)]
pub(crate) enum EventsCommand {
    /// Print Keel's events as they happen.
    Tail {
        /// Subject filter, e.g. `keel.registry.>` or `keel.*.acme.>` [default: every event of
        /// this deployment, `<subject root>.>`].
        subject: Option<String>,
        /// Only this tenant's events: the filter `<root>.*.<tenant>.>` (with --service,
        /// `<root>.<service>.<tenant>.>`).
        #[arg(long, conflicts_with = "subject")]
        tenant: Option<String>,
        /// Only this service's events, e.g. `registry`.
        #[arg(long, conflicts_with = "subject")]
        service: Option<String>,
        /// Start from the oldest stored event instead of new ones.
        #[arg(long)]
        from_start: bool,
        /// Stop after this many events.
        #[arg(long)]
        count: Option<usize>,
        /// Name of the tail's ephemeral consumer [default: chosen by the server]. NATS
        /// permissions that confine a user to one tenant name it (see
        /// deploy/nats/tenant-permissions.conf); one tail per name at a time.
        #[arg(long)]
        consumer_name: Option<String>,
        /// Prefix of the subjects replies come back on. A confined NATS user may subscribe only
        /// to its own, e.g. `_INBOX_acme`.
        #[arg(long, default_value = "_INBOX")]
        inbox_prefix: String,
        #[command(flatten)]
        nats: NatsConfig,
        /// Output format.
        #[arg(long, short = 'o', value_enum, default_value_t = Output::Table)]
        output: Output,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum AdminCommand {
    /// Create an API key and print it once.
    #[command(group(clap::ArgGroup::new("scope").required(true).args(["tenant", "fleet"])))]
    CreateKey {
        /// Tenant the key acts for.
        #[arg(long)]
        tenant: Option<String>,
        /// A fleet key for one of Keel's own services (e.g. a collector), reaching every
        /// tenant; its role is always service, and under mutual TLS it works only with a
        /// client certificate naming it (--name).
        #[arg(long)]
        fleet: bool,
        /// Role: viewer, operator, admin or service (a fleet key is service, and needs none).
        #[arg(long, required_unless_present = "fleet")]
        role: Option<keel_auth::Role>,
        /// Label of the key, unique among the tenant's (or the fleet's) active keys; a fleet
        /// key's client certificate must carry this name.
        #[arg(long)]
        name: String,
        /// Lifetime, e.g. 90d, 2w or 12h (at most 10y); never expires when unset.
        #[arg(long, value_parser = parse_duration)]
        expires_in: Option<Duration>,
        #[command(flatten)]
        database: DatabaseConfig,
        /// Output format.
        #[arg(long, short = 'o', value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// List API keys (never the keys themselves), with the scope each reaches.
    ListKeys {
        /// Only this tenant's keys.
        #[arg(long, conflicts_with = "fleet")]
        tenant: Option<String>,
        /// Only fleet keys.
        #[arg(long)]
        fleet: bool,
        #[command(flatten)]
        database: DatabaseConfig,
        /// Output format.
        #[arg(long, short = 'o', value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Revoke an API key; every server refuses it from its next call. Revoking a revoked key
    /// fails (exit 5) saying when it was revoked.
    RevokeKey {
        /// Key id or name, as listed by list-keys (a name several keys share needs the id).
        key: String,
        #[command(flatten)]
        database: DatabaseConfig,
    },
    /// Give an API key another role; every server applies it from its next call. A fleet
    /// key keeps the service role.
    SetRole {
        /// Key id or name, as listed by list-keys (a name several keys share needs the id).
        key: String,
        /// New role: viewer, operator, admin or service.
        #[arg(long)]
        role: keel_auth::Role,
        #[command(flatten)]
        database: DatabaseConfig,
        /// Output format.
        #[arg(long, short = 'o', value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Show who created, revoked or changed keys and rotated encryption keys, newest first.
    Audit {
        /// Most entries to show.
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(i64).range(1..))]
        limit: i64,
        #[command(flatten)]
        database: DatabaseConfig,
        /// Output format.
        #[arg(long, short = 'o', value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Re-encrypt every stored credential under the key ring's first key.
    RotateKey {
        #[command(flatten)]
        database: DatabaseConfig,
        #[command(flatten)]
        encryption: EncryptionArgs,
        /// Rows re-encrypted per batch.
        #[arg(long, default_value_t = 500)]
        batch: i64,
    },
}

fn parse_key_value(raw: &str) -> Result<(String, String), String> {
    raw.split_once('=')
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .ok_or_else(|| format!("{raw:?} is not key=value"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn secrets_cannot_be_passed_as_flag_values() {
        // Flags show in `ps` to every user of the host; these come from files or the environment.
        for args in [
            &["keel", "serve", "--encryption-keys", "k1:c2VjcmV0"][..],
            &["keel", "instance", "ls", "--api-key", "keel_x"][..],
            &[
                "keel",
                "admin",
                "rotate-key",
                "--encryption-keys",
                "k1:c2VjcmV0",
            ][..],
        ] {
            let err = Cli::try_parse_from(args).expect_err("secret flag accepted");
            assert_eq!(
                err.kind(),
                clap::error::ErrorKind::UnknownArgument,
                "{args:?}"
            );
        }
    }

    fn create_key(expires_in: &str) -> Result<Option<Duration>, clap::Error> {
        let cli = Cli::try_parse_from([
            "keel",
            "admin",
            "create-key",
            "--tenant",
            "acme",
            "--role",
            "viewer",
            "--name",
            "ci",
            "--expires-in",
            expires_in,
        ])?;
        match cli.command {
            Command::Admin(AdminCommand::CreateKey { expires_in, .. }) => Ok(expires_in),
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn every_duration_flag_takes_days_and_weeks() {
        const DAY: Duration = Duration::from_secs(86_400);
        let cli = Cli::try_parse_from([
            "keel",
            "instance",
            "ls",
            "--timeout",
            "1d",
            "--connect-timeout",
            "2w",
        ])
        .expect("client durations");
        let Command::Instance(InstanceCommand::Ls { client, .. }) = cli.command else {
            panic!("parsed as {:?}", cli.command);
        };
        assert_eq!((client.timeout, client.connect_timeout), (DAY, 14 * DAY));

        let cli = Cli::try_parse_from([
            "keel",
            "serve",
            "--auth-cache-ttl",
            "1d",
            "--check-timeout",
            "1w",
            "--database-acquire-timeout",
            "2d",
            "--shutdown-grace",
            "3d",
            "--limit-stream-duration",
            "4d",
            "--target-connect-timeout",
            "5d",
        ])
        .expect("serve durations");
        let Command::Serve(serve) = cli.command else {
            panic!("parsed as {:?}", cli.command);
        };
        assert_eq!(
            (
                serve.auth_cache_ttl,
                serve.check_timeout,
                serve.database.acquire_timeout,
                serve.listen.shutdown_grace,
                serve.limits.stream_duration,
                serve.targets.connect_timeout,
            ),
            (DAY, 7 * DAY, 2 * DAY, 3 * DAY, 4 * DAY, 5 * DAY)
        );
    }

    #[test]
    fn endpoint_is_never_required_and_targets_are_the_services_that_exist() {
        let mut command = Cli::command();
        let ls = command
            .find_subcommand_mut("instance")
            .and_then(|c| c.find_subcommand_mut("ls"))
            .expect("instance ls");
        let usage = ls.render_usage().to_string();
        assert!(!usage.contains("ENDPOINT"), "{usage}");
        let endpoint = ls
            .get_arguments()
            .find(|a| a.get_id() == "endpoint")
            .expect("--endpoint");
        assert!(!endpoint.is_required_set());
        assert_eq!(
            endpoint.get_env().and_then(|e| e.to_str()),
            Some("KEEL_ENDPOINT")
        );

        let targets: Vec<String> = Target::value_variants()
            .iter()
            .filter_map(|t| t.to_possible_value())
            .map(|v| v.get_name().to_owned())
            .collect();
        assert_eq!(targets, ["all", "registry", "collector", "optimizer"]);
        // Each offered service is one `all` runs.
        for target in Target::value_variants() {
            if *target != Target::All {
                assert!(Target::All.services().contains(target), "{target:?}");
            }
        }
    }

    #[test]
    fn a_window_is_a_duration_above_zero_or_an_invalid_argument() {
        assert_eq!(parse_window("1h").expect("1h"), Duration::from_secs(3600));
        assert_eq!(
            parse_window("2d").expect("2d"),
            Duration::from_secs(2 * 86_400)
        );
        for (raw, says) in [
            ("an hour", "--window: \"an hour\" is not a duration"),
            ("0s", "--window: \"0s\" is no window"),
            ("0", "is no window"),
        ] {
            let error = parse_window(raw).expect_err(raw);
            assert_eq!(
                crate::failure::classify(&error),
                crate::failure::Failure::Invalid,
                "{raw}"
            );
            assert!(error.to_string().contains(says), "{raw}: {error}");
        }
        // Parsed by the command (exit 3), not by clap (exit 2).
        let cli = Cli::try_parse_from(["keel", "metrics", "db", "--window", "soon"])
            .expect("parsed as text");
        let Command::Metrics(args) = cli.command else {
            panic!("parsed as {:?}", cli.command);
        };
        assert_eq!(args.window.as_deref(), Some("soon"));
    }

    #[test]
    fn keys_expire_in_days_and_weeks() {
        const DAY: u64 = 86_400;
        for (raw, days) in [("90d", 90), ("2w", 14), ("1d12h", 1)] {
            let got = create_key(raw).expect(raw).expect("a lifetime");
            assert_eq!(got.as_secs() / DAY, days, "{raw}");
        }
        assert_eq!(
            create_key("36h").expect("hours").map(|d| d.as_secs()),
            Some(36 * 3600)
        );
        let err = create_key("1000000000000d").expect_err("too long");
        assert!(err.to_string().contains("is too long"), "{err}");
        let err = create_key("90 days and a bit").expect_err("not a duration");
        assert!(err.to_string().contains("is not a duration"), "{err}");
        // --help promises what the parser takes.
        let help = Cli::command()
            .find_subcommand_mut("admin")
            .and_then(|admin| admin.find_subcommand_mut("create-key"))
            .expect("admin create-key")
            .render_long_help()
            .to_string();
        assert!(help.contains("e.g. 90d, 2w or 12h"), "{help}");
    }
}
