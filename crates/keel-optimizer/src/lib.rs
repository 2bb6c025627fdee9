//! Keel's query optimizer: index advice for a PostgreSQL instance's whole workload, with the
//! evidence a DBA would ask for, applied and rolled back as a persisted state machine.
//!
//! - [`advisor`]: the workload's statements parsed (pg_query), candidates, what-if plans with
//!   HypoPG (cached, counted), sizes from the statistics, Extend under a budget net of write
//!   overhead, never a set that makes a statement's plan dearer; evidence and explanations.
//! - Workload from the collector's `ListTopQueries`, or pg_stat_statements where the collector
//!   has no history of the instance.
//! - Analyses and applies are job rows any replica claims (`FOR UPDATE SKIP LOCKED`, a lease
//!   renewed while it works); `keel.optimizer.<tenant>.recommendation.*` through the outbox.

#![warn(missing_docs)]

pub mod advisor;
mod apply;
mod convert;
mod error;
pub mod events;
mod jobs;
mod service;
mod store;
mod workload;

use std::sync::Arc;
use std::time::Duration;

use keel_bus::Outbox;
use keel_fleet::FleetChannel;
use keel_proto::v1::collector_service_client::CollectorServiceClient;
use keel_proto::v1::optimizer_service_server::OptimizerServiceServer;
use keel_proto::v1::registry_service_client::RegistryServiceClient;
use keel_target::Connector;
use sqlx::PgPool;

pub use error::OptimizerError;
pub use service::Optimizer;
pub use store::SCHEMA;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// The optimizer's outbox, for its relay.
pub fn outbox() -> Outbox {
    Outbox::new(SCHEMA).unwrap_or_else(|_| unreachable!("optimizer schema name is valid"))
}

/// Creates or upgrades the optimizer's schema, outbox included.
pub async fn migrate(pool: &PgPool) -> Result<(), keel_service::BoxError> {
    keel_store::migrate(pool, SCHEMA, &MIGRATOR).await?;
    outbox().install(pool).await?;
    Ok(())
}

/// How the optimizer runs its jobs.
#[derive(Debug, Clone)]
pub struct OptimizerConfig {
    /// How long a claim on an analysis or apply lasts unless renewed (renewed every quarter).
    pub lease: Duration,
    /// Longest wait between looks for claimable work.
    pub poll_interval: Duration,
    /// Longest an index build may take.
    pub build_timeout: Duration,
    /// Longest a build or drop waits for the table's lock.
    pub lock_timeout: Duration,
    /// Planner cost units one index entry costs to write.
    pub write_cost_per_row: f64,
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        Self {
            lease: Duration::from_secs(30),
            poll_interval: Duration::from_secs(1),
            build_timeout: Duration::from_secs(3600),
            lock_timeout: Duration::from_secs(5),
            write_cost_per_row: 1.0,
        }
    }
}

/// The optimizer as a process hosts it (see [`keel_service::Host::add`]).
#[derive(Debug)]
pub struct Service {
    registry: FleetChannel,
    collector: Option<FleetChannel>,
    connector: Connector,
    config: OptimizerConfig,
}

impl Service {
    /// The optimizer, reading instances through `registry`, workloads through `collector`
    /// (none: pg_stat_statements directly), connecting through `connector` (whose sessions it
    /// names `keel-optimizer`).
    pub fn new(
        registry: FleetChannel,
        collector: Option<FleetChannel>,
        connector: Connector,
        config: OptimizerConfig,
    ) -> Self {
        Self {
            registry,
            collector,
            connector,
            config,
        }
    }
}

impl keel_service::Service for Service {
    const NAME: &'static str = SCHEMA;

    async fn migrate(pool: &PgPool) -> Result<(), keel_service::BoxError> {
        migrate(pool).await
    }

    fn outbox() -> Option<Outbox> {
        Some(outbox())
    }

    fn mount(self, mount: &mut keel_service::Mount<'_>) -> Result<(), keel_service::BoxError> {
        let workers = jobs::Workers {
            pool: mount.pool().clone(),
            registry: RegistryServiceClient::new(self.registry),
            collector: self.collector.map(CollectorServiceClient::new),
            connector: self.connector,
            config: self.config,
            outbox: outbox(),
            subjects: mount.bus().subjects().clone(),
            wake: Arc::new(tokio::sync::Notify::new()),
        };
        {
            let workers = workers.clone();
            mount.task("optimizer analyses", move |stop| workers.analyses(stop));
        }
        {
            let workers = workers.clone();
            mount.task("optimizer applies", move |stop| workers.applies(stop));
        }
        mount.grpc(OptimizerServiceServer::new(Optimizer::new(workers)));
        Ok(())
    }
}
