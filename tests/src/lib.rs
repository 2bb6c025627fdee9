//! A whole Keel deployment in the test process: every service `keel serve --target all` runs,
//! hosted by the same [`keel_service::Host`], on real PostgreSQL and NATS from `keel-testkit`,
//! and the real `keel` binary as its CLI.
//!
//! Cross-service tests live in `tests/tests/`; each service issue adds its own there.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use keel_auth::{Actor, NewKey, Role};
use keel_config::{DatabaseConfig, ListenConfig, NatsConfig};
use keel_service::{Host, HostConfig};
use secrecy::{ExposeSecret as _, SecretString};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The key ring the deployment encrypts credentials with.
pub const ENCRYPTION_KEYS: &str = "k1:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

/// One Keel deployment: every service in one host, serving on loopback ports.
#[derive(Debug)]
pub struct Deployment {
    /// The servers; dropped last, after the host has stopped.
    pub env: keel_testkit::TestEnv,
    /// The state store's URL.
    pub database_url: String,
    /// NATS's URL.
    pub nats_url: String,
    /// The gRPC listener.
    pub grpc: SocketAddr,
    /// The HTTP listener (`/metrics`, `/healthz`, `/readyz`).
    pub http: SocketAddr,
    /// An admin key of tenant `acme`.
    pub admin_key: String,
    keys: keel_auth::KeyStore,
    stop: CancellationToken,
    served: Option<JoinHandle<Result<(), keel_service::HostError>>>,
}

impl Deployment {
    /// Starts every service on fresh servers, as `keel serve --target all` would, with the
    /// collector's default settings.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(keel_collector::CollectorConfig::default()).await
    }

    /// Starts every service on fresh servers, the collector with `collector`.
    pub async fn start_with(collector: keel_collector::CollectorConfig) -> anyhow::Result<Self> {
        Self::start_with_targets(collector, keel_target::TargetConfig::default()).await
    }

    /// Starts every service on fresh servers, the collector with `collector` and connecting
    /// under `collector_targets` (the registry keeps the default policy, as when the two run
    /// with different settings).
    pub async fn start_with_targets(
        collector: keel_collector::CollectorConfig,
        collector_targets: keel_target::TargetConfig,
    ) -> anyhow::Result<Self> {
        Self::start_full(
            collector,
            collector_targets,
            Some(keel_optimizer::OptimizerConfig::default()),
        )
        .await
    }

    /// Starts the services on fresh servers: the collector with `collector` under
    /// `collector_targets`, and the optimizer with `optimizer` (`None`: no optimizer in this
    /// host, for tests that run it as a process of its own).
    pub async fn start_full(
        collector: keel_collector::CollectorConfig,
        collector_targets: keel_target::TargetConfig,
        optimizer: Option<keel_optimizer::OptimizerConfig>,
    ) -> anyhow::Result<Self> {
        let env = keel_testkit::TestEnv::new();
        let db = env.database().await?;
        let nats_url = env.nats_url().await?;
        let (mut host, listeners) = host_on_loopback(&db.url, &nats_url).await?;
        let (grpc, http) = (listeners.0.local_addr()?, listeners.1.local_addr()?);
        let (grpc_listener, http_listener) = listeners;
        let ring = keel_registry::crypto::KeyRing::parse(&SecretString::from(ENCRYPTION_KEYS))
            .context("key ring")?;
        // The same services, built the same way, as `keel serve --target all`.
        host.add(keel_registry::Service::new(
            Arc::new(ring),
            keel_registry::RegistryConfig::default(),
        ))
        .await?;
        let state_store = SecretString::from(db.url.clone());
        host.add(keel_collector::Service::new(
            keel_collector::RegistryClient::new(host.in_process()),
            collector_targets.connector("collector", Some(&state_store))?,
            collector,
        ))
        .await?;
        if let Some(config) = optimizer {
            host.add(keel_optimizer::Service::new(
                keel_fleet::FleetChannel::new(host.in_process()),
                Some(keel_fleet::FleetChannel::new(host.in_process())),
                keel_target::TargetConfig::default().connector("optimizer", Some(&state_store))?,
                config,
            ))
            .await?;
        }

        let keys = host.keys().clone();
        let admin_key = keys
            .create_key(
                NewKey {
                    scope: keel_auth::Scope::tenant("acme")?,
                    role: Role::Admin,
                    name: "e2e-admin".to_owned(),
                    expires_at: None,
                },
                &Actor::system("keel-e2e"),
            )
            .await?
            .key
            .expose_secret()
            .to_owned();
        let stop = CancellationToken::new();
        let served = tokio::spawn(host.serve_with_listeners(grpc_listener, http_listener, {
            let stop = stop.clone();
            async move { stop.cancelled().await }
        }));
        Ok(Self {
            env,
            database_url: db.url,
            nats_url,
            grpc,
            http,
            admin_key,
            keys,
            stop,
            served: Some(served),
        })
    }

    /// A new key of `tenant` with `role`.
    pub async fn key(&self, tenant: &str, role: Role, name: &str) -> anyhow::Result<String> {
        let created = self
            .keys
            .create_key(
                NewKey {
                    scope: keel_auth::Scope::tenant(tenant)?,
                    role,
                    name: name.to_owned(),
                    expires_at: None,
                },
                &Actor::system("keel-e2e"),
            )
            .await?;
        Ok(created.key.expose_secret().to_owned())
    }

    /// A second collector process on the same state store and NATS, as `keel serve --target
    /// collector` runs it: no registry of its own, so it reads instances over gRPC with a fleet
    /// key. Stopped when the returned token is cancelled (or dropped with the deployment).
    pub async fn collector_replica(
        &self,
        config: keel_collector::CollectorConfig,
    ) -> anyhow::Result<CollectorReplica> {
        let fleet_key = self
            .keys
            .create_key(
                NewKey::fleet(format!("collector-{}", uuid_suffix())),
                &Actor::system("keel-e2e"),
            )
            .await?
            .key;
        let (mut host, listeners) = host_on_loopback(&self.database_url, &self.nats_url).await?;
        let (grpc, http) = (listeners.0.local_addr()?, listeners.1.local_addr()?);
        let (grpc_listener, http_listener) = listeners;
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", self.grpc))?
            .connect_lazy();
        let state_store = SecretString::from(self.database_url.clone());
        host.add(keel_collector::Service::new(
            keel_collector::RegistryClient::remote(channel, fleet_key),
            keel_target::TargetConfig::default().connector("collector", Some(&state_store))?,
            config,
        ))
        .await?;
        let stop = self.stop.child_token();
        let served = tokio::spawn(host.serve_with_listeners(grpc_listener, http_listener, {
            let stop = stop.clone();
            async move { stop.cancelled().await }
        }));
        Ok(CollectorReplica {
            grpc,
            http,
            stop,
            served,
        })
    }

    /// A new fleet key (role `service`, every tenant), as `keel admin create-key --fleet` makes.
    pub async fn fleet_key(&self, name: &str) -> anyhow::Result<SecretString> {
        Ok(self
            .keys
            .create_key(
                NewKey::fleet(format!("{name}-{}", uuid_suffix())),
                &Actor::system("keel-e2e"),
            )
            .await?
            .key)
    }

    /// `keel serve --target <target>` as a child process on this deployment's state store and
    /// NATS, calling the registry (and collector) of this deployment with a fleet key, on
    /// loopback ports of its own; `env` adds settings. Killed on drop.
    pub async fn serve_process(
        &self,
        target: &str,
        env: &[(&str, &str)],
    ) -> anyhow::Result<ServeProcess> {
        let dir = tempfile::tempdir()?;
        let key_file = dir.path().join("fleet.key");
        std::fs::write(&key_file, self.fleet_key(target).await?.expose_secret())?;
        let grpc = free_loopback()?;
        let http = free_loopback()?;
        let child = tokio::process::Command::new(keel_binary()?)
            .args(["serve", "--target", target])
            .env("KEEL_DATABASE_URL", &self.database_url)
            .env("KEEL_NATS_URL", &self.nats_url)
            .env("KEEL_GRPC_LISTEN", grpc.to_string())
            .env("KEEL_HTTP_LISTEN", http.to_string())
            .env("KEEL_ALLOW_PLAINTEXT", "true")
            .env("KEEL_ENCRYPTION_KEYS", ENCRYPTION_KEYS)
            .env("KEEL_REGISTRY_ENDPOINT", format!("http://{}", self.grpc))
            .env("KEEL_COLLECTOR_ENDPOINT", format!("http://{}", self.grpc))
            .env("KEEL_FLEET_KEY_FILE", &key_file)
            .env("RUST_LOG", "warn")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting keel serve")?;
        let process = ServeProcess {
            child,
            grpc,
            http,
            _dir: dir,
        };
        for _ in 0..300 {
            if ready(http).await {
                return Ok(process);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        anyhow::bail!("keel serve --target {target} was not ready within 30 s")
    }

    /// Runs the `keel` CLI against this deployment with `key`.
    pub fn cli(&self, key: &str, args: &[&str]) -> anyhow::Result<Output> {
        Command::new(keel_binary()?)
            .args(args)
            .env("KEEL_ENDPOINT", format!("http://{}", self.grpc))
            .env("KEEL_API_KEY", key)
            .env("KEEL_DATABASE_URL", &self.database_url)
            .env("KEEL_NATS_URL", &self.nats_url)
            .stdin(Stdio::null())
            .output()
            .context("running keel")
    }

    /// Stops serving as a signal would, and waits until the host has drained its outboxes.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.stop.cancel();
        if let Some(served) = self.served.take() {
            served.await.context("host task")??;
        }
        Ok(())
    }
}

/// A collector running in a host of its own (see [`Deployment::collector_replica`]).
#[derive(Debug)]
pub struct CollectorReplica {
    /// Its gRPC listener.
    pub grpc: SocketAddr,
    /// Its HTTP listener.
    pub http: SocketAddr,
    stop: CancellationToken,
    served: JoinHandle<Result<(), keel_service::HostError>>,
}

impl CollectorReplica {
    /// Stops it and waits until it has drained its outbox.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.stop.cancel();
        self.served.await.context("replica task")??;
        Ok(())
    }
}

/// A host on the state store and NATS given, with loopback listeners on free ports (anonymous
/// `/metrics`, plaintext) that it has not bound to yet.
async fn host_on_loopback(
    database_url: &str,
    nats_url: &str,
) -> anyhow::Result<(Host, (TcpListener, TcpListener))> {
    let grpc_listener = TcpListener::bind("127.0.0.1:0").await?;
    let http_listener = TcpListener::bind("127.0.0.1:0").await?;
    let listen = ListenConfig {
        shutdown_grace: Duration::from_secs(2),
        metrics_anonymous: true,
        ..ListenConfig::plaintext(grpc_listener.local_addr()?, http_listener.local_addr()?)
    };
    let config = HostConfig::new(
        DatabaseConfig::from_url(database_url.to_owned()),
        NatsConfig::from_url(nats_url.to_owned()),
        listen,
    );
    Ok((
        Host::connect(&config).await?,
        (grpc_listener, http_listener),
    ))
}

/// A `keel serve` child process (see [`Deployment::serve_process`]).
#[derive(Debug)]
pub struct ServeProcess {
    child: tokio::process::Child,
    /// Its gRPC listener.
    pub grpc: SocketAddr,
    /// Its HTTP listener.
    pub http: SocketAddr,
    _dir: tempfile::TempDir,
}

impl ServeProcess {
    /// Kills it with SIGKILL, as a crash or an OOM kill would, and reaps it.
    pub async fn kill(mut self) -> anyhow::Result<()> {
        self.child.start_kill()?;
        self.child.wait().await?;
        Ok(())
    }
}

/// Whether `/readyz` at `http` answers 200.
async fn ready(http: SocketAddr) -> bool {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let Ok(mut stream) = tokio::net::TcpStream::connect(http).await else {
        return false;
    };
    let request = format!("GET /readyz HTTP/1.1\r\nHost: {http}\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).await.is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).await.is_ok() && head.ends_with(b"200")
}

fn free_loopback() -> anyhow::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?)
}

fn uuid_suffix() -> String {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos().to_string())
        .unwrap_or_default()
}

impl Drop for Deployment {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The `keel` binary of this build: `cargo test --workspace` builds it beside the test binaries
/// (`target/<profile>/keel`, the test being in `target/<profile>/deps/`).
pub fn keel_binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .context("test binary has no profile directory")?;
    let keel = profile_dir.join("keel");
    if keel.is_file() {
        return Ok(keel);
    }
    // Run alone (`cargo test -p keel-e2e`), nothing built the binary yet.
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let status = Command::new(cargo)
        .args(["build", "--quiet", "-p", "keel", "--bin", "keel"])
        .status()
        .context("building the keel binary")?;
    anyhow::ensure!(
        status.success() && keel.is_file(),
        "cannot build {}",
        keel.display()
    );
    Ok(keel)
}
