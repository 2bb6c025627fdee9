//! A registry served over real TCP on real PostgreSQL and NATS, with keys per tenant and role.
#![allow(dead_code, unreachable_pub)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
use futures::StreamExt;
use keel_auth::{KeyStore, NewKey, Role};
use keel_bus::{Bus, Relay, RelayConfig, StreamSettings};
use keel_config::{ListenConfig, NatsConfig};
use keel_proto::v1::registry_service_client::RegistryServiceClient;
use keel_proto::v1::registry_service_server::SERVICE_NAME;
use keel_proto::v1::*;
use keel_registry::crypto::KeyRing;
use keel_registry::{Registry, RegistryConfig};
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
    pub keys: KeyStore,
    pub bus: Bus,
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    issued: Mutex<HashMap<(String, Role), String>>,
    stop: CancellationToken,
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Limits high enough never to interfere with a test that is not about them.
pub fn generous_limits(metrics: &keel_server::Metrics) -> keel_limits::LimitsLayer {
    let config = keel_limits::LimitsConfig {
        rate: 1_000_000,
        burst: 1_000_000,
        concurrency: 10_000,
        ..Default::default()
    };
    keel_limits::LimitsLayer::new(&config, metrics).expect("valid limits")
}

pub fn key_ring(spec: &str) -> Arc<KeyRing> {
    Arc::new(KeyRing::parse(&SecretString::from(spec.to_owned())).expect("key ring"))
}

pub const K1: &str = "k1:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
pub const K2: &str = "k2:HwAeAR0CHAMbBBoFGQYYBxcIFgkVChQLEwwSDREOEA8=";

impl TestApp {
    pub async fn start() -> TestApp {
        let app = Self::start_without_relay().await;
        app.spawn_relay();
        app
    }

    /// A registry whose outbox nobody publishes: the state after a relay died between
    /// a commit and its publish.
    pub async fn start_without_relay() -> TestApp {
        // Most tests register the harness's own database; the policy tests use `start_with`.
        let targets = keel_target::TargetConfig {
            allow_state_store: true,
            ..Default::default()
        };
        Self::start_with(&targets).await
    }

    /// A registry (with a relay) under the target policy of `targets`, protecting its own
    /// state-store database.
    pub async fn start_with_targets(targets: &keel_target::TargetConfig) -> TestApp {
        let app = Self::start_with(targets).await;
        app.spawn_relay();
        app
    }

    async fn start_with(targets: &keel_target::TargetConfig) -> TestApp {
        let ring = key_ring(K1);
        let env = keel_testkit::TestEnv::new();
        let db = env.database().await.expect("test database");
        let pool = db.pool().await.expect("pool");
        let nats_url = env.nats_url().await.expect("nats");
        keel_auth::KeyStore::migrate(&pool)
            .await
            .expect("auth schema");
        keel_registry::migrate(&pool)
            .await
            .expect("registry schema");
        let keys = KeyStore::new(pool.clone(), Duration::ZERO);
        let bus = Bus::connect(
            &NatsConfig::from_url(nats_url.clone()),
            &StreamSettings::default(),
        )
        .await
        .expect("bus");

        let stop = CancellationToken::new();

        let grpc_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind grpc");
        let http_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind http");
        let (grpc, http) = (
            grpc_listener.local_addr().expect("addr"),
            http_listener.local_addr().expect("addr"),
        );
        let mut listen = ListenConfig::plaintext(grpc, http);
        listen.shutdown_grace = Duration::from_secs(1);
        // The secret-leak test scrapes /metrics without a token.
        listen.metrics_anonymous = true;
        let mut server = keel_server::Server::new(&listen);
        let limits = generous_limits(server.metrics());
        server.register_service(SERVICE_NAME);
        let registry = Registry::new(
            pool.clone(),
            ring,
            RegistryConfig {
                check_timeout: Duration::from_secs(3),
                targets: targets
                    .connector("registry", Some(&SecretString::from(db.url.clone())))
                    .expect("target policy"),
            },
        );
        let routes = tonic::service::Routes::new(keel_registry::grpc_service(
            registry,
            keys.clone(),
            &limits,
        ));
        let shutdown = stop.clone();
        tokio::spawn(async move {
            let _ = server
                .serve_with_listeners(grpc_listener, http_listener, routes, async move {
                    shutdown.cancelled().await
                })
                .await;
        });
        TestApp {
            env,
            pool,
            database_url: db.url.clone(),
            nats_url,
            keys,
            bus,
            grpc,
            http,
            issued: Mutex::new(HashMap::new()),
            stop,
        }
    }

    /// Starts a relay for the registry's outbox, stopped with the app.
    pub fn spawn_relay(&self) {
        let relay = Relay::new(
            self.pool.clone(),
            keel_registry::outbox(),
            self.bus.jetstream().clone(),
            RelayConfig {
                poll_interval: Duration::from_millis(200),
                ..RelayConfig::default()
            },
        );
        tokio::spawn(relay.run(self.stop.child_token()));
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
                    tenant: tenant.to_owned(),
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
        let client = async_nats::connect(&self.nats_url).await.expect("nats");
        let js = async_nats::jetstream::new(client);
        let stream = js.get_stream(keel_bus::STREAM).await.expect("stream");
        let consumer = stream
            .create_consumer(pull::Config {
                filter_subject: "keel.registry.>".into(),
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
