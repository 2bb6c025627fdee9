//! The process that hosts services: shared connections, one server, one limits stack.

use std::fmt;
use std::future::Future;
use std::time::Duration;

use futures::future::BoxFuture;
use keel_auth::{AuthLayer, KeyStore};
use keel_bus::{Bus, Relay, RelayConfig, StreamSettings};
use keel_config::{DatabaseConfig, ListenConfig, NatsConfig};
use keel_limits::{FleetLimitsConfig, LimitsConfig, LimitsLayer};
use keel_server::Server;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::service::{Routes, RoutesBuilder};
use tower_layer::Layer as _;

use crate::{BoxError, GrpcService, Mount, Service, Task};

/// How long background tasks get to stop after shutdown, before the outbox is drained anyway.
const TASK_STOP_GRACE: Duration = Duration::from_secs(5);

/// What a host needs: where the state store and NATS are, the listeners, and how callers
/// are authenticated and limited.
#[derive(Debug, Clone)]
pub struct HostConfig {
    /// The state store.
    pub database: DatabaseConfig,
    /// NATS with JetStream.
    pub nats: NatsConfig,
    /// The gRPC and HTTP listeners.
    pub listen: ListenConfig,
    /// Per-key limits, shared by every service of the process: a key's budget covers all the
    /// services it calls.
    pub limits: LimitsConfig,
    /// Limits of Keel's own services (fleet keys and in-process calls), in budgets of their own
    /// so that user limits never throttle them and they never eat a tenant's budget.
    pub fleet_limits: FleetLimitsConfig,
    /// How long a verified API key is trusted before it is looked up again.
    pub auth_cache_ttl: Duration,
    /// See [`KeyStore::require_client_cert_for_service_keys`].
    pub service_keys_require_client_cert: bool,
    /// How the outbox relays pace themselves; `None` runs no relay in this process, leaving
    /// its events to another replica's (tests use it to stand for a relay that died).
    pub relay: Option<RelayConfig>,
    /// Settings of the event stream, used when it does not exist yet.
    pub stream: StreamSettings,
}

impl HostConfig {
    /// A configuration with the default limits, cache and relay settings.
    pub fn new(database: DatabaseConfig, nats: NatsConfig, listen: ListenConfig) -> Self {
        Self {
            database,
            nats,
            listen,
            limits: LimitsConfig::default(),
            fleet_limits: FleetLimitsConfig::default(),
            auth_cache_ttl: keel_auth::DEFAULT_CACHE_TTL,
            service_keys_require_client_cert: false,
            relay: Some(RelayConfig::default()),
            stream: StreamSettings::default(),
        }
    }
}

/// Why a host could not be built or could not serve.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] keel_config::ConfigError),
    /// The state store cannot be reached.
    #[error(transparent)]
    Store(#[from] keel_store::StoreError),
    /// The `auth` schema cannot be migrated.
    #[error("cannot migrate the auth schema")]
    Auth(#[from] keel_auth::AuthError),
    /// NATS cannot be reached, or the event stream cannot be created.
    #[error(transparent)]
    Bus(#[from] keel_bus::BusError),
    /// A service failed to migrate its schema.
    #[error("cannot migrate the {service} schema")]
    Migrate {
        /// The service's name.
        service: &'static str,
        /// What went wrong.
        source: BoxError,
    },
    /// A service failed to mount its parts.
    #[error("cannot start the {service} service")]
    Mount {
        /// The service's name.
        service: &'static str,
        /// What went wrong.
        source: BoxError,
    },
    /// The same service was added twice.
    #[error("the {0} service is already part of this process")]
    Duplicate(&'static str),
    /// The server failed.
    #[error(transparent)]
    Server(#[from] keel_server::ServerError),
}

/// The services of one process, the connections they share and the server that serves them.
pub struct Host {
    pool: PgPool,
    bus: Bus,
    keys: KeyStore,
    auth: AuthLayer,
    limits: LimitsLayer,
    server: Server,
    routes: RoutesBuilder,
    tasks: Vec<(&'static str, Task)>,
    relays: Vec<Relay>,
    relay_metrics: Option<keel_bus::RelayMetrics>,
    relay_config: Option<RelayConfig>,
    services: Vec<&'static str>,
}

impl fmt::Debug for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Host")
            .field("services", &self.services)
            .field(
                "tasks",
                &self.tasks.iter().map(|(n, _)| n).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl Host {
    /// Opens the state store (migrating the `auth` schema every process needs), connects to
    /// NATS and makes sure the event stream exists, then builds the host as [`Host::new`] does.
    pub async fn connect(config: &HostConfig) -> Result<Self, HostError> {
        config.database.validate()?;
        config.nats.validate()?;
        config.listen.validate()?;
        let pool = keel_store::connect(&config.database).await?;
        KeyStore::migrate(&pool).await?;
        let keys = KeyStore::new(pool.clone(), config.auth_cache_ttl)
            .require_client_cert_for_service_keys(config.service_keys_require_client_cert)
            // Under mutual TLS a fleet key works only with its own client certificate.
            .mutual_tls(config.listen.tls_client_ca_file.is_some());
        let bus = Bus::connect(&config.nats, &config.stream).await?;
        Self::new(pool, bus, keys, config)
    }

    /// A host over connections the caller opened (the `auth` schema already migrated), with
    /// readiness checks for both and the key-change watcher as a background task.
    pub fn new(
        pool: PgPool,
        bus: Bus,
        keys: KeyStore,
        config: &HostConfig,
    ) -> Result<Self, HostError> {
        let server = Server::new(&config.listen);
        let limits =
            LimitsLayer::with_fleet(&config.limits, &config.fleet_limits, server.metrics())?;
        let mut host = Self {
            auth: AuthLayer::new(keys.clone()),
            pool,
            bus,
            keys,
            limits,
            server,
            routes: RoutesBuilder::default(),
            tasks: Vec::new(),
            relays: Vec::new(),
            relay_metrics: None,
            relay_config: config.relay.clone(),
            services: Vec::new(),
        };
        let pool = host.pool.clone();
        host.add_readiness("postgres", move || {
            let pool = pool.clone();
            Box::pin(async move {
                sqlx::query("SELECT 1")
                    .execute(&pool)
                    .await
                    .map(drop)
                    .map_err(|e| e.to_string())
            })
        });
        let bus = host.bus.clone();
        host.add_readiness("nats", move || {
            let connected = bus.is_connected();
            Box::pin(async move {
                if connected {
                    Ok(())
                } else {
                    Err("not connected to NATS".to_owned())
                }
            })
        });
        // Keys revoked or re-roled on any replica leave this one's auth cache at once.
        let keys = host.keys.clone();
        host.add_task(
            "auth key changes",
            Box::new(move |stop| Box::pin(async move { keys.watch_changes(stop).await })),
        );
        Ok(host)
    }

    /// The state store.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The connection to NATS.
    pub fn bus(&self) -> &Bus {
        &self.bus
    }

    /// The API keys.
    pub fn keys(&self) -> &KeyStore {
        &self.keys
    }

    /// The metrics registry served on `/metrics`.
    pub fn metrics(&self) -> &keel_server::Metrics {
        self.server.metrics()
    }

    /// The names of the services added so far, in order.
    pub fn services(&self) -> &[&'static str] {
        &self.services
    }

    /// A client channel to every gRPC service added so far, called in-process with Keel's
    /// internal fleet identity (see [`keel_auth::InProcess`]): through the same auth and limits
    /// stack as network callers, but with an identity no listener can accept. Create it after
    /// the services it should reach were added.
    pub fn in_process(&self) -> keel_auth::InProcess {
        keel_auth::InProcess::new(self.routes.clone().routes())
    }

    /// Migrates `service`'s schema and mounts its parts; its outbox gets a relay while serving.
    pub async fn add<S: Service>(&mut self, service: S) -> Result<&mut Self, HostError> {
        let name = S::NAME;
        if self.services.contains(&name) {
            return Err(HostError::Duplicate(name));
        }
        S::migrate(&self.pool)
            .await
            .map_err(|source| HostError::Migrate {
                service: name,
                source,
            })?;
        let mut mount = Mount {
            host: self,
            service: name,
        };
        service
            .mount(&mut mount)
            .map_err(|source| HostError::Mount {
                service: name,
                source,
            })?;
        if let (Some(outbox), Some(config)) = (S::outbox(), &self.relay_config) {
            // One set of relay counters for every outbox of the process, registered once.
            let metrics = match &self.relay_metrics {
                Some(metrics) => metrics.clone(),
                None => {
                    let metrics = self
                        .server
                        .metrics()
                        .with_registry(keel_bus::RelayMetrics::register);
                    self.relay_metrics = Some(metrics.clone());
                    metrics
                }
            };
            let relay = Relay::new(
                self.pool.clone(),
                outbox,
                self.bus.jetstream().clone(),
                config.clone(),
            )
            .with_metrics(metrics);
            self.relays.push(relay);
        }
        self.services.push(name);
        Ok(self)
    }

    pub(crate) fn add_grpc<S: GrpcService>(&mut self, service: S) {
        self.server.register_service(S::NAME);
        self.routes
            .add_service(self.auth.layer(self.limits.layer(service)));
    }

    pub(crate) fn add_http(&mut self, router: axum::Router) {
        self.server.http_routes(router);
    }

    pub(crate) fn add_task(&mut self, name: &'static str, task: Task) {
        self.tasks.push((name, task));
    }

    pub(crate) fn add_readiness(
        &mut self,
        name: &'static str,
        check: impl Fn() -> BoxFuture<'static, Result<(), String>> + Send + Sync + 'static,
    ) {
        self.server.readiness_check(name, check);
    }

    /// Binds the configured listeners and serves as [`Host::serve_with_listeners`] does.
    pub async fn serve(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), HostError> {
        self.run(
            |server, routes, shutdown| async move { server.serve(routes, shutdown).await },
            shutdown,
        )
        .await
    }

    /// Serves every added service on listeners the caller bound (tests bind port 0) until
    /// `shutdown` resolves, with their background tasks and outbox relays running. Then it
    /// stops the tasks and relays and publishes the events still in the outboxes, so that
    /// requests finished during the shutdown grace do not leave their events to another replica.
    pub async fn serve_with_listeners(
        self,
        grpc: TcpListener,
        http: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), HostError> {
        self.run(
            |server, routes, shutdown| async move {
                server
                    .serve_with_listeners(grpc, http, routes, shutdown)
                    .await
            },
            shutdown,
        )
        .await
    }

    async fn run<F, Fut>(
        self,
        serve: F,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), HostError>
    where
        F: FnOnce(Server, Routes, BoxFuture<'static, ()>) -> Fut,
        Fut: Future<Output = Result<(), keel_server::ServerError>>,
    {
        let stop = CancellationToken::new();
        let mut running = tokio::task::JoinSet::new();
        for relay in &self.relays {
            running.spawn(relay.clone().run(stop.child_token()));
        }
        for (name, task) in self.tasks {
            let token = stop.child_token();
            running.spawn(async move {
                task(token).await;
                tracing::trace!(task = name, "stopped");
            });
        }
        tracing::info!(services = ?self.services, "services mounted");
        let served = serve(self.server, self.routes.routes(), Box::pin(shutdown)).await;

        stop.cancel();
        if tokio::time::timeout(TASK_STOP_GRACE, async {
            while running.join_next().await.is_some() {}
        })
        .await
        .is_err()
        {
            tracing::warn!("background tasks did not stop in time; abandoning them");
            running.abort_all();
        }
        for relay in &self.relays {
            match relay.publish_pending().await {
                Ok(0) => {}
                Ok(n) => tracing::info!(published = n, "published remaining events before exit"),
                Err(error) => {
                    tracing::warn!(%error, "remaining events stay in the outbox for the next relay")
                }
            }
        }
        served.map_err(HostError::from)
    }
}
