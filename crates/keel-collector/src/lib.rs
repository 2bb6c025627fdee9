//! Keel's metrics collector: scrapes every registered PostgreSQL and Redis instance of every
//! tenant, keeps a bounded history, serves the fleet's metrics to Prometheus and raises alerts.
//!
//! - Targets come from the registry through the fleet identity ([`RegistryClient`]): a full
//!   list at start and every `resync_interval`, `keel.registry.*.instance.*` events in between.
//! - Replicas share the scrapes with no coordinator: a job row per target, claimed with
//!   `FOR UPDATE SKIP LOCKED`, the claim moving `next_run_at` one interval ahead.
//! - PostgreSQL: pg_stat_statements as deltas (resets and evictions told apart), activity,
//!   locks, database, tables, indexes, replication, sizes; Redis: INFO, SLOWLOG, LATENCY.
//! - History in the `collector` schema, pruned in batches past the retention.
//! - `/metrics`: the fleet's latest scrapes, rendered ahead of time ([`exposition`]).
//! - Alert rules ([`rules`]) publish `keel.collector.alert.firing|resolved` through the outbox.

#![warn(missing_docs)]

pub mod catalog;
mod convert;
mod error;
pub mod events;
mod exposition;
mod registry;
pub mod rules;
mod scheduler;
mod scrape;
mod service;
pub mod statements;
mod store;

use std::sync::Arc;
use std::time::Duration;

use keel_bus::consumer::{self, ConsumerConfig};
use keel_bus::{Filter, Outbox};
use keel_proto::v1::collector_service_server::CollectorServiceServer;
use keel_target::Connector;
use sqlx::PgPool;

pub use error::CollectorError;
pub use exposition::FleetExposition;
pub use registry::{INTERVAL_LABEL, RegistryClient, TIMEOUT_LABEL};
pub use service::Collector;
pub use store::SCHEMA;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// The collector's outbox, for its relay.
pub fn outbox() -> Outbox {
    Outbox::new(SCHEMA).unwrap_or_else(|_| unreachable!("collector schema name is valid"))
}

/// Creates or upgrades the collector's schema, outbox included.
pub async fn migrate(pool: &PgPool) -> Result<(), keel_service::BoxError> {
    keel_store::migrate(pool, SCHEMA, &MIGRATOR).await?;
    outbox().install(pool).await?;
    Ok(())
}

/// How the collector scrapes, keeps and exposes.
#[derive(Debug, Clone)]
pub struct CollectorConfig {
    /// Scrape interval of targets without the [`INTERVAL_LABEL`] label.
    pub interval: Duration,
    /// Scrape timeout of targets without the [`TIMEOUT_LABEL`] label (never above the interval).
    pub timeout: Duration,
    /// How long history (samples, statement deltas, resolved alerts) is kept.
    pub retention: Duration,
    /// Scrapes one replica runs at once.
    pub max_concurrent_scrapes: usize,
    /// Longest wait between looks for due jobs.
    pub poll_interval: Duration,
    /// Largest tables reported one by one per PostgreSQL target.
    pub tables_per_target: i64,
    /// Largest indexes reported one by one per PostgreSQL target.
    pub indexes_per_target: i64,
    /// Statements exposed one by one on `/metrics` per target (the rest as `queryid="other"`).
    pub statements_exported: usize,
    /// Most series per target on `/metrics`.
    pub series_per_target: usize,
    /// How often `/metrics` is re-rendered from the latest scrapes.
    pub metrics_refresh: Duration,
    /// How often the full list of instances is read from the registry again.
    pub resync_interval: Duration,
    /// How often history past the retention is deleted.
    pub prune_interval: Duration,
    /// The alert rules.
    pub rules: rules::Rules,
}

impl Default for CollectorConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(15),
            timeout: Duration::from_secs(5),
            retention: Duration::from_secs(7 * 24 * 3600),
            max_concurrent_scrapes: 64,
            poll_interval: Duration::from_secs(1),
            tables_per_target: 50,
            indexes_per_target: 100,
            statements_exported: 20,
            series_per_target: 500,
            metrics_refresh: Duration::from_secs(5),
            resync_interval: Duration::from_secs(300),
            prune_interval: Duration::from_secs(60),
            rules: rules::Rules::default(),
        }
    }
}

/// The collector as a process hosts it (see [`keel_service::Host::add`]).
#[derive(Debug)]
pub struct Service {
    registry: RegistryClient,
    connector: Connector,
    config: CollectorConfig,
}

impl Service {
    /// The collector, reading instances through `registry` and connecting through `connector`
    /// (whose sessions it names `keel-collector`).
    pub fn new(registry: RegistryClient, connector: Connector, config: CollectorConfig) -> Self {
        Self {
            registry,
            connector,
            config,
        }
    }
}

/// Rows deleted per statement when pruning history.
const PRUNE_BATCH: i64 = 10_000;

impl keel_service::Service for Service {
    const NAME: &'static str = SCHEMA;

    async fn migrate(pool: &PgPool) -> Result<(), keel_service::BoxError> {
        migrate(pool).await
    }

    fn outbox() -> Option<Outbox> {
        Some(outbox())
    }

    fn mount(self, mount: &mut keel_service::Mount<'_>) -> Result<(), keel_service::BoxError> {
        let pool = mount.pool().clone();
        let subjects = mount.bus().subjects().clone();
        let config = self.config;
        let defaults = registry::Defaults {
            interval: config.interval,
            timeout: config.timeout.min(config.interval),
        };
        let registry = self.registry;
        let scraper = scheduler::Scraper::new(
            pool.clone(),
            registry.clone(),
            self.connector,
            config.clone(),
            outbox(),
            subjects.clone(),
            scheduler::WorkerMetrics::register(mount.metrics()),
        );

        let exposition = Arc::new(FleetExposition::default());
        mount.metrics().add_exposition(exposition.clone());
        {
            let (pool, every, budget) = (
                pool.clone(),
                config.metrics_refresh,
                config.series_per_target,
            );
            mount.task("collector metrics exposition", move |stop| {
                exposition.refresh(pool, every, budget, stop)
            });
        }
        {
            let scraper = scraper.clone();
            mount.task("collector scrapes", move |stop| scraper.run(stop));
        }
        {
            let (pool, registry, subjects) = (pool.clone(), registry.clone(), subjects.clone());
            let every = config.resync_interval;
            mount.task("collector registry sync", move |stop| async move {
                sync_loop(pool, registry, defaults, subjects, every, stop).await;
            });
        }
        {
            let bus = mount.bus().clone();
            let pool = pool.clone();
            let filter = subjects
                .filter(&Filter {
                    service: Some("registry"),
                    entity: Some("instance"),
                    ..Filter::default()
                })
                .map_err(|e| Box::new(e) as keel_service::BoxError)?;
            let handler = registry::InstanceEvents {
                defaults,
                outbox: outbox(),
                subjects: subjects.clone(),
            };
            mount.task("collector instance events", move |stop| async move {
                let config = ConsumerConfig::new("collector-instances", &[filter.as_str()]);
                let outbox = outbox();
                // The consumer ends on errors it cannot ride out (NATS gone for good): try again.
                while !stop.is_cancelled() {
                    if let Err(error) = consumer::run(&bus, &pool, &outbox, &config, &handler, stop.clone()).await {
                        tracing::warn!(%error, "registry event consumer stopped; restarting in 2 s");
                        tokio::select! {
                            () = stop.cancelled() => return,
                            () = tokio::time::sleep(Duration::from_secs(2)) => {}
                        }
                    }
                }
            });
        }
        {
            let (pool, retention, every) = (pool.clone(), config.retention, config.prune_interval);
            mount.task("collector history retention", move |stop| async move {
                loop {
                    match store::prune(&pool, retention, PRUNE_BATCH).await {
                        Ok(0) => {}
                        Ok(n) => tracing::debug!(rows = n, "history past the retention deleted"),
                        Err(error) => {
                            tracing::warn!(%error, "pruning history failed; retrying later")
                        }
                    }
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(every) => {}
                    }
                }
            });
        }
        mount.grpc(CollectorServiceServer::new(Collector::new(
            pool,
            scraper,
            config.retention,
            registry,
            defaults,
        )));
        Ok(())
    }
}

/// Reads every instance from the registry now and every `every`, retrying soon after a failure.
async fn sync_loop(
    pool: PgPool,
    registry: RegistryClient,
    defaults: registry::Defaults,
    subjects: keel_bus::SubjectRoot,
    every: Duration,
    stop: tokio_util::sync::CancellationToken,
) {
    let outbox = outbox();
    loop {
        let started = chrono::Utc::now();
        let wait = match registry.list_all().await {
            Ok(instances) => {
                let specs: Vec<_> = instances
                    .iter()
                    .filter_map(|i| registry::spec(i, defaults))
                    .collect();
                match store::sync_all(&pool, &specs, started, &outbox, &subjects).await {
                    Ok((kept, removed)) => {
                        tracing::info!(
                            targets = kept,
                            removed,
                            "scrape targets synchronised with the registry"
                        );
                        every
                    }
                    Err(error) => {
                        tracing::warn!(%error, "storing the registry's instances failed; retrying in 5 s");
                        Duration::from_secs(5)
                    }
                }
            }
            Err(status) => {
                tracing::warn!(code = ?status.code(), message = status.message(), "listing the registry's instances failed; retrying in 5 s");
                Duration::from_secs(5)
            }
        };
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
    }
}
