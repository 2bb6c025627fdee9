//! A registry served over real TCP on real PostgreSQL and NATS, with keys per tenant and role.
#![allow(dead_code, unreachable_pub)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
use futures::StreamExt;
use keel_auth::{KeyStore, NewKey, Role};
use keel_bus::{Bus, RelayConfig};
use keel_config::{DatabaseConfig, ListenConfig, NatsConfig};
use keel_proto::v1::registry_service_client::RegistryServiceClient;
use keel_proto::v1::*;
use keel_registry::RegistryConfig;
use keel_registry::crypto::KeyRing;
use keel_service::{Host, HostConfig};
use secrecy::{ExposeSecret, SecretString};
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

pub type Client = RegistryServiceClient<InterceptedService<Channel, Auth>>;

/// Sends an API key (if any) and a fixed traceparent (if set).
#[derive(Clone)]
pub struct Auth {
    key: Option<String>,
    traceparent: Option<String>,
}

impl Interceptor for Auth {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(key) = &self.key {
            let value = MetadataValue::try_from(format!("Bearer {key}")).expect("ascii key");
            request.metadata_mut().insert("authorization", value);
        }
        if let Some(traceparent) = &self.traceparent {
            request.metadata_mut().insert(
                "traceparent",
                MetadataValue::try_from(traceparent.as_str()).expect("ascii"),
            );
        }
        Ok(request)
    }
}

pub struct TestApp {
    pub env: keel_testkit::TestEnv,
    pub pool: PgPool,
    pub database_url: String,
    pub nats_url: String,
    pub nats: NatsConfig,
    pub keys: KeyStore,
    pub bus: Bus,
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    issued: Mutex<HashMap<(String, Role), String>>,
    served: Served,
}

/// A registry served by a [`keel_service::Host`] the way `keel serve` builds it, stopped on drop.
pub struct Served {
    pub pool: PgPool,
    pub keys: KeyStore,
    pub bus: Bus,
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    /// The host's in-process channel to the registry (`Host::in_process`).
    pub in_process: keel_auth::InProcess,
    stop: CancellationToken,
}

impl Drop for Served {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Serves the registry on loopback ports with the test settings: no auth cache (so revocations
/// show at once), generous limits, anonymous `/metrics` (the secret-leak test scrapes it), a
/// relay that polls every 200 ms unless `relay` is false.
pub async fn serve_registry(
    database_url: &str,
    nats: &NatsConfig,
    ring: Arc<KeyRing>,
    relay: bool,
    targets: &keel_target::TargetConfig,
) -> Served {
    let grpc_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind grpc");
    let http_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind http");
    let (grpc, http) = (
        grpc_listener.local_addr().expect("addr"),
        http_listener.local_addr().expect("addr"),
    );
    let mut listen = ListenConfig::plaintext(grpc, http);
    listen.shutdown_grace = Duration::from_secs(1);
    listen.metrics_anonymous = true;
    let config = HostConfig {
        limits: generous_limits(),
        auth_cache_ttl: Duration::ZERO,
        relay: relay.then(|| RelayConfig {
            poll_interval: Duration::from_millis(200),
            ..RelayConfig::default()
        }),
        ..HostConfig::new(DatabaseConfig::from_url(database_url), nats.clone(), listen)
    };
    let mut host = Host::connect(&config).await.expect("host");
    host.add(keel_registry::Service::new(
        ring,
        RegistryConfig {
            check_timeout: Duration::from_secs(3),
            targets: targets
                .connector(
                    "registry",
                    Some(&SecretString::from(database_url.to_owned())),
                )
                .expect("target policy"),
            ..RegistryConfig::default()
        },
    ))
    .await
    .expect("registry");
    let stop = CancellationToken::new();
    let served = Served {
        pool: host.pool().clone(),
        keys: host.keys().clone(),
        bus: host.bus().clone(),
        grpc,
        http,
        in_process: host.in_process(),
        stop: stop.clone(),
    };
    tokio::spawn(async move {
        let _ = host
            .serve_with_listeners(grpc_listener, http_listener, async move {
                stop.cancelled().await
            })
            .await;
    });
    served
}

/// Most tests register the harness's own database; the policy tests use `start_with_targets`.
fn harness_targets() -> keel_target::TargetConfig {
    keel_target::TargetConfig {
        allow_state_store: true,
        ..Default::default()
    }
}

/// Limits high enough never to interfere with a test that is not about them.
pub fn generous_limits() -> keel_limits::LimitsConfig {
    keel_limits::LimitsConfig {
        rate: 1_000_000,
        burst: 1_000_000,
        concurrency: 10_000,
        ..Default::default()
    }
}

pub fn key_ring(spec: &str) -> Arc<KeyRing> {
    Arc::new(KeyRing::parse(&SecretString::from(spec.to_owned())).expect("key ring"))
}

pub const K1: &str = "k1:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
pub const K2: &str = "k2:HwAeAR0CHAMbBBoFGQYYBxcIFgkVChQLEwwSDREOEA8=";

impl TestApp {
    pub async fn start() -> TestApp {
        let env = keel_testkit::TestEnv::new();
        let nats_url = env.nats_url().await.expect("nats");
        Self::start_on(
            env,
            NatsConfig::from_url(nats_url),
            true,
            &harness_targets(),
        )
        .await
    }

    /// A registry (with a relay) under the target policy of `targets`, protecting its own
    /// state-store database.
    pub async fn start_with_targets(targets: &keel_target::TargetConfig) -> TestApp {
        let env = keel_testkit::TestEnv::new();
        let nats_url = env.nats_url().await.expect("nats");
        Self::start_on(env, NatsConfig::from_url(nats_url), true, targets).await
    }

    /// A registry whose outbox nobody publishes: the state after a relay died between
    /// a commit and its publish.
    pub async fn start_without_relay() -> TestApp {
        let env = keel_testkit::TestEnv::new();
        let nats_url = env.nats_url().await.expect("nats");
        Self::start_on(
            env,
            NatsConfig::from_url(nats_url),
            false,
            &harness_targets(),
        )
        .await
    }

    /// A registry (with its relay) on `nats`: another server, user, stream or subject root.
    pub async fn start_with_nats(nats: NatsConfig) -> TestApp {
        Self::start_on(keel_testkit::TestEnv::new(), nats, true, &harness_targets()).await
    }

    async fn start_on(
        env: keel_testkit::TestEnv,
        nats: NatsConfig,
        relay: bool,
        targets: &keel_target::TargetConfig,
    ) -> TestApp {
        let db = env.database().await.expect("test database");
        let served = serve_registry(&db.url, &nats, key_ring(K1), relay, targets).await;
        TestApp {
            env,
            pool: served.pool.clone(),
            database_url: db.url.clone(),
            nats_url: nats.url.clone(),
            nats,
            keys: served.keys.clone(),
            bus: served.bus.clone(),
            grpc: served.grpc,
            http: served.http,
            issued: Mutex::new(HashMap::new()),
            served,
        }
    }

    /// The host's in-process channel, as another service of the same process would use it.
    pub fn in_process(&self) -> keel_auth::InProcess {
        self.served.in_process.clone()
    }

    /// Another registry replica on the same state store and NATS, with its own key ring.
    pub async fn replica(&self, ring: Arc<KeyRing>) -> Served {
        serve_registry(
            &self.database_url,
            &self.nats,
            ring,
            true,
            &harness_targets(),
        )
        .await
    }

    /// The clear key for (tenant, role), created on first use.
    pub async fn key(&self, tenant: &str, role: Role) -> String {
        if let Some(key) = self
            .issued
            .lock()
            .expect("lock")
            .get(&(tenant.to_owned(), role))
        {
            return key.clone();
        }
        let created = self
            .keys
            .create_key(
                NewKey {
                    scope: keel_auth::Scope::tenant(tenant).expect("valid tenant"),
                    role,
                    name: format!("{role}-key"),
                    expires_at: None,
                },
                &keel_auth::Actor::system("test"),
            )
            .await
            .expect("create key");
        let key = created.key.expose_secret().to_owned();
        self.issued
            .lock()
            .expect("lock")
            .insert((tenant.to_owned(), role), key.clone());
        key
    }

    /// A client with a new fleet key named `name` (role service, every tenant).
    pub async fn fleet_client(&self, name: &str) -> Client {
        let created = self
            .keys
            .create_key(NewKey::fleet(name), &keel_auth::Actor::system("test"))
            .await
            .expect("create fleet key");
        self.client_with(Some(created.key.expose_secret().to_owned()), None)
            .await
    }

    pub async fn client(&self, tenant: &str, role: Role) -> Client {
        let key = self.key(tenant, role).await;
        self.client_with(Some(key), None).await
    }

    pub async fn client_with(&self, key: Option<String>, traceparent: Option<String>) -> Client {
        let channel = Channel::from_shared(format!("http://{}", self.grpc))
            .expect("uri")
            .connect()
            .await
            .expect("connect");
        RegistryServiceClient::with_interceptor(channel, Auth { key, traceparent })
    }

    /// Reads every registry event in the stream, waiting until `expected` arrived (or 10 s).
    pub async fn events(&self, expected: usize) -> Vec<async_nats::jetstream::Message> {
        let client = keel_bus::with_url_auth(async_nats::ConnectOptions::new(), &self.nats_url)
            .connect(&self.nats_url)
            .await
            .expect("nats");
        let js = async_nats::jetstream::new(client);
        let stream = js.get_stream(self.bus.stream_name()).await.expect("stream");
        let registry = keel_bus::Filter {
            service: Some("registry"),
            ..Default::default()
        };
        let consumer = stream
            .create_consumer(pull::Config {
                filter_subject: self.bus.subjects().filter(&registry).expect("filter"),
                deliver_policy: DeliverPolicy::All,
                ack_policy: AckPolicy::None,
                ..Default::default()
            })
            .await
            .expect("consumer");
        let mut messages = consumer.messages().await.expect("messages");
        let mut out = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while out.len() < expected {
            match tokio::time::timeout_at(deadline, messages.next()).await {
                Ok(Some(Ok(m))) => out.push(m),
                _ => break,
            }
        }
        // Anything beyond what was expected would be a duplicate or a stray event.
        if let Ok(Some(Ok(m))) =
            tokio::time::timeout(Duration::from_millis(500), messages.next()).await
        {
            out.push(m);
        }
        out
    }

    pub async fn instance_count(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM registry.instances")
            .fetch_one(&self.pool)
            .await
            .expect("count")
    }
}

pub fn pg_instance(name: &str, url: &str) -> Instance {
    Instance {
        name: name.into(),
        engine: Engine::Postgres as i32,
        connection_url: url.into(),
        ..Default::default()
    }
}

pub fn redis_instance(name: &str, url: &str) -> Instance {
    Instance {
        name: name.into(),
        engine: Engine::Redis as i32,
        connection_url: url.into(),
        ..Default::default()
    }
}

pub async fn create(client: &mut Client, instance: Instance) -> Result<Instance, tonic::Status> {
    client
        .create_instance(CreateInstanceRequest {
            instance: Some(instance),
        })
        .await
        .map(|r| r.into_inner().instance.expect("instance in response"))
}

pub async fn get(client: &mut Client, id: &str) -> Result<Instance, tonic::Status> {
    client
        .get_instance(GetInstanceRequest {
            id: id.into(),
            name: String::new(),
        })
        .await
        .map(|r| r.into_inner().instance.expect("instance in response"))
}

/// Asserts a gRPC failure with `code` whose message contains `needle`.
#[track_caller]
pub fn assert_status<T: std::fmt::Debug>(
    result: Result<T, tonic::Status>,
    code: tonic::Code,
    needle: &str,
) {
    match result {
        Ok(value) => panic!("expected {code:?} containing {needle:?}, got Ok({value:?})"),
        Err(status) => {
            assert_eq!(status.code(), code, "{}", status.message());
            assert!(
                status.message().contains(needle),
                "{:?} does not contain {needle:?}",
                status.message()
            );
        }
    }
}
