//! Serving plumbing every Keel service uses.
//!
//! A [`Server`] serves, on the gRPC listener, the caller's services plus `grpc.health.v1` and
//! server reflection (v1 and v1alpha), each call traced ([`keel_telemetry::GrpcTraceLayer`]) and
//! counted in the gRPC metrics; and on the HTTP listener `/metrics` (OpenMetrics, behind a bearer
//! token), `/healthz` (liveness), `/readyz` (readiness checks) and the routes services add with
//! [`Server::http_routes`]. It shuts both down gracefully when told to.
//!
//! Every HTTP request, on every route, passes the same edge first: its [`ClientAddr`] is resolved
//! (`X-Forwarded-For` counts only from `--trusted-proxies`), its body is capped at
//! `--http-body-limit` (413 beyond it), and it runs in an `http.request` span that records both
//! the client and the TCP peer.
//!
//! Both listeners serve TLS with the certificate in [`ListenConfig`], re-read from disk while
//! serving; plaintext only when the configuration explicitly allows it. With a client CA, the gRPC
//! listener verifies client certificates and hands each request the client's [`PeerIdentity`].
//!
//! The caller applies its own authentication to its own services before putting them into
//! [`Routes`], so health and reflection stay open to probes and tools.
//!
//! ```no_run
//! # async fn run(listen: keel_config::ListenConfig, svc: tonic_health::pb::health_server::HealthServer<tonic_health::server::HealthService>) -> Result<(), keel_server::ServerError> {
//! let mut server = keel_server::Server::new(&listen);
//! server.register_service("keel.v1.RegistryService");
//! server.readiness_check("postgres", || Box::pin(async { Ok(()) }));
//! server.serve(tonic::service::Routes::new(svc), keel_server::shutdown_signal()).await
//! # }
//! ```

#![warn(missing_docs)]

mod edge;
mod http;
mod metrics;
mod tls;

use std::collections::HashSet;
use std::future::{Future, IntoFuture as _};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::FutureExt as _;
use futures::future::BoxFuture;
use keel_config::{ConfigError, ListenConfig, MetricsAccess};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::service::Routes;
use tonic_health::ServingStatus;

pub use metrics::{Exposition, Metrics, gzip};
pub use tls::TlsError;

use crate::edge::{TcpPeer, TrustedProxies};
use crate::http::{MetricsAuth, Readiness, ReadinessCheck};
use crate::metrics::GrpcMetrics;
use crate::tls::{PeerIdentityLayer, ReloadingTls};

/// Services this crate adds to every gRPC server; they always get their own metric labels.
const BUILT_IN_SERVICES: [&str; 3] = [
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

/// The identity in a gRPC client's verified TLS certificate: its subject common name, else its
/// first DNS subject alternative name.
///
/// Found in a request's extensions (`request.extensions().get::<PeerIdentity>()`) only when the
/// client presented a certificate that chains to the configured client CA (`--tls-client-ca-file`);
/// without mutual TLS, or from a client without a certificate, there is none. Extensions are set
/// by the server, so a client cannot forge one.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PeerIdentity(pub String);

/// The address of the client that sent an HTTP request, as far as it can be trusted.
///
/// Found in the extensions of every request on the HTTP listener
/// (`axum::Extension<ClientAddr>` in a handler). It is the TCP peer's address, unless the peer is
/// in one of the trusted proxy networks (`--trusted-proxies`): then it is the rightmost address
/// in `X-Forwarded-For` that is not itself a trusted proxy, i.e. the address the outermost
/// trusted proxy got the request from. A malformed `X-Forwarded-For` leaves the peer's address.
/// IPv4 clients of a dual-stack listener are given as IPv4 addresses, not IPv4-mapped IPv6.
///
/// The TCP peer itself is in the extensions too, as `axum::extract::ConnectInfo<SocketAddr>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientAddr(pub IpAddr);

/// Why serving failed.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The listen configuration is incomplete or contradictory, or the metrics token file cannot
    /// be read.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The TLS certificate, key or client CA cannot be served.
    #[error("tls: {0}")]
    Tls(#[from] TlsError),
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// Why the operating system refused.
        source: std::io::Error,
    },
    /// A listener's address could not be read.
    #[error("cannot read the listener's address: {0}")]
    LocalAddr(#[source] std::io::Error),
    /// The reflection service could not be built from the descriptor sets.
    #[error("reflection service cannot be built: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// A descriptor set embedded in the binary does not decode.
    #[error("embedded protobuf descriptors do not decode: {0}")]
    Descriptors(#[from] prost::DecodeError),
    /// The gRPC server stopped with an error.
    #[error("grpc server failed: {0}")]
    Grpc(#[from] tonic::transport::Error),
    /// The HTTP server stopped with an error.
    #[error("http server failed: {0}")]
    Http(#[source] std::io::Error),
    /// A server stopped before shutdown was asked for, without saying why.
    #[error("{0} server stopped before shutdown was requested")]
    StoppedEarly(&'static str),
    /// A server task panicked or was cancelled.
    #[error("{listener} server task failed: {source}")]
    Task {
        /// `grpc` or `http`.
        listener: &'static str,
        /// The panic or cancellation.
        source: tokio::task::JoinError,
    },
}

/// One process's gRPC and HTTP servers, configured before [`Server::serve`] starts them.
#[derive(Debug)]
pub struct Server {
    listen: ListenConfig,
    metrics: Metrics,
    grpc_metrics: GrpcMetrics,
    services: Vec<&'static str>,
    checks: Vec<ReadinessCheck>,
    http_routes: axum::Router,
}

impl Server {
    /// A server for the addresses and shutdown grace in `listen`, with a metrics registry holding
    /// `keel_build_info`, the `process_*` metrics and the gRPC server metrics.
    pub fn new(listen: &ListenConfig) -> Self {
        let metrics = Metrics::default();
        metrics::register_process_and_build(&metrics);
        let grpc_metrics = GrpcMetrics::register(&metrics);
        Self {
            listen: listen.clone(),
            metrics,
            grpc_metrics,
            services: Vec::new(),
            checks: Vec::new(),
            http_routes: axum::Router::new(),
        }
    }

    /// The metrics registry served on `/metrics`; services register their own metrics here.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Declares a gRPC service that the routes passed to [`Server::serve`] contain, by its full
    /// name (e.g. `keel.v1.RegistryService`, the generated `registry_service_server::SERVICE_NAME`).
    ///
    /// The service is reported SERVING by `grpc.health.v1` while the server runs, and its methods
    /// get their own labels in the gRPC metrics (methods of undeclared services are counted as
    /// `other`, which keeps the number of series bounded).
    pub fn register_service(&mut self, name: &'static str) -> &mut Self {
        if !self.services.contains(&name) {
            self.services.push(name);
        }
        self
    }

    /// Adds a readiness check that `/readyz` runs: `/readyz` answers 200 when every check returns
    /// `Ok`, else 503 naming each failing check with its reason. Checks run concurrently and each
    /// gets 800 ms. The reason is shown to anyone who can reach the HTTP listener: never put a
    /// secret in it.
    pub fn readiness_check(
        &mut self,
        name: &'static str,
        check: impl Fn() -> BoxFuture<'static, Result<(), String>> + Send + Sync + 'static,
    ) -> &mut Self {
        self.checks.push(ReadinessCheck {
            name,
            check: Arc::new(check),
        });
        self
    }

    /// Adds routes to the HTTP listener, served beside `/metrics`, `/healthz` and `/readyz` and
    /// behind the same edge: each request carries its [`ClientAddr`] (resolved with the trusted
    /// proxies) in its extensions and runs in the `http.request` span, and its body is capped at
    /// `listen.http_body_limit`. A declared `Content-Length` over the cap is answered 413 before
    /// the handler runs; a body that turns out larger (chunked) ends in an error for the handler
    /// once the cap is passed, and the client gets 413 whatever the handler answers then. Axum's
    /// own 2 MB default limit is turned off, so body extractors (`Bytes`, `String`, `Json`) are
    /// bound by this cap alone.
    ///
    /// The routes are served as given: authentication is the caller's to add (as a layer on
    /// `router`, which then covers only these routes). May be called more than once; the routers
    /// are merged. `router` must have its state applied already (`Router<()>`).
    ///
    /// ```no_run
    /// # fn add(server: &mut keel_server::Server) {
    /// use axum::Extension;
    /// use keel_server::ClientAddr;
    ///
    /// async fn webhook(
    ///     Extension(ClientAddr(client)): Extension<ClientAddr>,
    ///     body: String,
    /// ) -> String {
    ///     format!("{} bytes from {client}\n", body.len())
    /// }
    ///
    /// server.http_routes(
    ///     axum::Router::new().route("/v1/alertmanager", axum::routing::post(webhook)),
    /// );
    /// # }
    /// ```
    ///
    /// # Panics
    ///
    /// Like [`axum::Router::merge`], when a route overlaps one added before or both routers have
    /// a fallback; and when serving starts, if a route overlaps `/metrics`, `/healthz` or
    /// `/readyz`.
    pub fn http_routes(&mut self, router: axum::Router) -> &mut Self {
        self.http_routes = std::mem::take(&mut self.http_routes).merge(router);
        self
    }

    /// Binds `listen.grpc` and `listen.http`, then serves as [`Server::serve_with_listeners`] does.
    pub async fn serve(
        self,
        routes: Routes,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServerError> {
        // Before binding, so that a configuration error is not hidden behind an address in use.
        self.listen.validate()?;
        let grpc = bind(self.listen.grpc).await?;
        let http = bind(self.listen.http).await?;
        self.serve_with_listeners(grpc, http, routes, shutdown)
            .await
    }

    /// Serves until `shutdown` resolves, on listeners the caller bound (tests bind port 0).
    ///
    /// gRPC: `routes` plus health and reflection, behind the tracing and metrics layers; each
    /// request carries the client's [`PeerIdentity`] when it presented a verified certificate.
    /// HTTP: `/metrics` (bearer token, unless anonymous access is configured), `/healthz`,
    /// `/readyz` and the routes added with [`Server::http_routes`], each request with its
    /// [`ClientAddr`] and its body capped at `listen.http_body_limit`.
    ///
    /// Both listeners serve TLS when the configuration has a certificate; the files are checked
    /// every 2 s, and new connections get the new certificate once they change (files that cannot
    /// be served are skipped with a warning). Without a certificate, the configuration must allow
    /// plaintext, and each listener logs a warning saying so. The configuration is validated and
    /// the TLS and token files read before anything is served.
    ///
    /// When `shutdown` resolves, health turns NOT_SERVING and `/readyz` 503, both listeners stop
    /// accepting, and in-flight requests get `listen.shutdown_grace` to finish; whatever is still
    /// running then is cut off. Returns an error if a server fails, including one that stops on
    /// its own before `shutdown`.
    pub async fn serve_with_listeners(
        self,
        grpc: TcpListener,
        http: TcpListener,
        routes: Routes,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServerError> {
        self.listen.validate()?;
        let metrics_access = self.listen.metrics_access()?;
        let trusted_networks = self.listen.trusted_proxy_networks()?;
        let trusted_proxies = TrustedProxies::new(trusted_networks.clone());
        let tls = match self.listen.tls_settings()? {
            Some(settings) => Some(ReloadingTls::load(settings).await?),
            None => None,
        };
        let grpc_addr = grpc.local_addr().map_err(ServerError::LocalAddr)?;
        let http_addr = http.local_addr().map_err(ServerError::LocalAddr)?;

        let (health, health_service) = tonic_health::server::health_reporter();
        for name in &self.services {
            health
                .set_service_status(name, ServingStatus::Serving)
                .await;
        }
        let descriptor_sets = [
            keel_proto::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
        ];
        let reflection_v1 = reflection(&descriptor_sets).build_v1()?;
        let reflection_v1alpha = reflection(&descriptor_sets).build_v1alpha()?;
        let reflection_sets = [
            tonic_health::pb::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
            keel_proto::FILE_DESCRIPTOR_SET,
        ];
        let known: HashSet<&str> = self
            .services
            .iter()
            .copied()
            .chain(BUILT_IN_SERVICES)
            .collect();
        let metrics_layer = self.grpc_metrics.layer(&reflection_sets, &known)?;

        let routes = routes
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha);
        let readiness = Arc::new(Readiness {
            checks: self.checks,
            shutting_down: false.into(),
        });

        let (stop, stopping) = watch::channel(false);
        let grpc_router = tonic::transport::Server::builder()
            // Outermost, so that the layers after it see the peer's identity too.
            .layer(PeerIdentityLayer)
            .layer(keel_telemetry::GrpcTraceLayer)
            .layer(metrics_layer)
            .add_routes(routes);
        let http_router = edge::layer(
            http::router(
                self.metrics.clone(),
                readiness.clone(),
                MetricsAuth::new(&metrics_access),
            )
            .merge(self.http_routes),
            trusted_proxies,
            self.listen.http_body_limit,
        )
        // Every connection records its TCP peer, which the edge starts from.
        .into_make_service_with_connect_info::<TcpPeer>();
        // For the start-up log: whether TLS is on, and with which client authentication.
        let served_tls = tls.as_ref().map(|(tls, _)| tls.client_auth());
        // The TLS side's own tasks (certificate watcher, accept loops): stopped by `stopping`,
        // and aborted at the end, so that no listener outlives this call.
        let mut tls_tasks = Vec::new();
        let (grpc_server, http_server): (BoxFuture<'static, _>, BoxFuture<'static, _>) = match tls {
            Some((tls, files)) => {
                tls_tasks.push(tokio::spawn(tls.clone().watch(files, stopping.clone())));
                let (grpc_connections, grpc_accept) =
                    tls::accept(grpc, tls.clone(), tls::Listener::Grpc, stopping.clone());
                let (http_connections, http_accept) =
                    tls::accept(http, tls.clone(), tls::Listener::Http, stopping.clone());
                tls_tasks.extend([grpc_accept, http_accept]);
                (
                    grpc_router
                        .serve_with_incoming_shutdown(
                            tls::grpc_incoming(grpc_connections),
                            stopped(stopping.clone()),
                        )
                        .boxed(),
                    axum::serve(
                        tls::HttpsListener::new(http_connections, http_addr),
                        http_router,
                    )
                    .with_graceful_shutdown(stopped(stopping))
                    .into_future()
                    .boxed(),
                )
            }
            None => {
                // Loud on purpose: this must not go unnoticed outside a laptop or a test.
                tracing::warn!(
                    %grpc_addr,
                    "serving gRPC WITHOUT TLS on {grpc_addr}: anyone on the network can read API \
                     keys and credentials"
                );
                tracing::warn!(
                    %http_addr,
                    "serving HTTP WITHOUT TLS on {http_addr}: anyone on the network can read the \
                     metrics and the metrics token"
                );
                (
                    grpc_router
                        .serve_with_incoming_shutdown(
                            // TCP_NODELAY: see tls::accept; without it a List page took ~40 ms.
                            tonic::transport::server::TcpIncoming::from(grpc)
                                .with_nodelay(Some(true)),
                            stopped(stopping.clone()),
                        )
                        .boxed(),
                    axum::serve(http, http_router)
                        .with_graceful_shutdown(stopped(stopping))
                        .into_future()
                        .boxed(),
                )
            }
        };
        if matches!(metrics_access, MetricsAccess::Closed) {
            tracing::warn!(
                "/metrics answers 401 to every request: set --metrics-token-file / \
                 KEEL_METRICS_TOKEN_FILE, or --metrics-anonymous / KEEL_METRICS_ANONYMOUS=true"
            );
        }
        let mut grpc_task =
            tokio::spawn(async move { grpc_server.await.map_err(ServerError::Grpc) });
        let mut http_task =
            tokio::spawn(async move { http_server.await.map_err(ServerError::Http) });
        tracing::info!(
            %grpc_addr,
            %http_addr,
            tls = served_tls.is_some(),
            client_auth = ?served_tls.flatten(),
            services = ?self.services,
            trusted_proxies = ?trusted_networks,
            http_body_limit = self.listen.http_body_limit,
            "serving"
        );

        // Either shutdown is asked for, or a server stops by itself, which is a failure.
        let mut first_error = None;
        let mut grpc_done = false;
        let mut http_done = false;
        tokio::select! {
            () = shutdown => tracing::info!("shutdown requested"),
            result = &mut grpc_task => {
                grpc_done = true;
                first_error = Some(early_stop("grpc", result));
            }
            result = &mut http_task => {
                http_done = true;
                first_error = Some(early_stop("http", result));
            }
        }

        readiness.shutting_down.store(true, Ordering::Relaxed);
        for name in self.services.iter().copied().chain([""]) {
            health
                .set_service_status(name, ServingStatus::NotServing)
                .await;
        }
        // Receivers only go away once both servers have stopped, so a send error means nothing is
        // left to notify.
        let _ = stop.send(true);

        let deadline = tokio::time::Instant::now() + self.listen.shutdown_grace;
        let grace = self.listen.shutdown_grace;
        if !grpc_done && let Err(error) = drain("grpc", &mut grpc_task, deadline, grace).await {
            first_error.get_or_insert(error);
        }
        if !http_done && let Err(error) = drain("http", &mut http_task, deadline, grace).await {
            first_error.get_or_insert(error);
        }
        for task in tls_tasks {
            task.abort();
            // Cancelled or finished, it is gone now, and its listener closed.
            let _ = task.await;
        }
        match first_error {
            Some(error) => Err(error),
            None => {
                tracing::info!("servers stopped");
                Ok(())
            }
        }
    }
}

/// Resolves on SIGTERM (how Kubernetes stops a pod) or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            // Without the handler the process can still be stopped by SIGTERM or SIGKILL.
            tracing::warn!(%error, "cannot listen for ctrl-c");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("ctrl-c received"),
        () = terminate => tracing::info!("SIGTERM received"),
    }
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, ServerError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServerError::Bind { addr, source })
}

fn reflection<'b>(descriptor_sets: &[&'b [u8]]) -> tonic_reflection::server::Builder<'b> {
    descriptor_sets.iter().fold(
        tonic_reflection::server::Builder::configure(),
        |builder, set| builder.register_encoded_file_descriptor_set(set),
    )
}

/// Resolves once `stopping` turns true, or its sender is gone (nothing can stop us then anyway).
async fn stopped(mut stopping: watch::Receiver<bool>) {
    let _ = stopping.wait_for(|stop| *stop).await;
}

type ServerTask = JoinHandle<Result<(), ServerError>>;

fn early_stop(
    listener: &'static str,
    result: Result<Result<(), ServerError>, tokio::task::JoinError>,
) -> ServerError {
    match result {
        Ok(Ok(())) => ServerError::StoppedEarly(listener),
        Ok(Err(error)) => error,
        Err(source) => ServerError::Task { listener, source },
    }
}

/// Waits for a stopping server until `deadline`, then cuts it off.
async fn drain(
    listener: &'static str,
    task: &mut ServerTask,
    deadline: tokio::time::Instant,
    grace: Duration,
) -> Result<(), ServerError> {
    match tokio::time::timeout_at(deadline, &mut *task).await {
        Ok(Ok(result)) => result,
        Ok(Err(source)) => Err(ServerError::Task { listener, source }),
        Err(_) => {
            // Long streams (a health Watch, say) never end by themselves. The server stops waiting
            // for them here; the connections themselves end when the process exits.
            tracing::warn!(
                listener,
                ?grace,
                "in-flight requests still running after the grace period; cutting them off"
            );
            task.abort();
            Ok(())
        }
    }
}
