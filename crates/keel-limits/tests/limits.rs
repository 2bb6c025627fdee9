//! The limits layer behind the real auth layer, in front of a real tonic service on 127.0.0.1:0.

use std::time::{Duration, Instant};

use keel_auth::{Actor, AuthLayer, KeyStore, NewKey, Role, bearer_interceptor};
use keel_limits::{FleetLimitsConfig, LimitsConfig, LimitsLayer, RETRY_AFTER_MS};
use keel_testkit::GrpcServer;
use secrecy::SecretString;
use tonic::service::Routes;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Code, Status};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tower_layer::Layer as _;
use uuid::Uuid;

/// What `bearer_interceptor` returns, boxed so the client type can be named.
type Interceptor = Box<dyn FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, Status> + Send>;

type Client = HealthClient<InterceptedService<Channel, Interceptor>>;

/// tonic-health behind auth and limits, with a key store on a fresh database.
struct Harness {
    server: GrpcServer,
    store: KeyStore,
    metrics: keel_server::Metrics,
}

impl Harness {
    async fn start(config: LimitsConfig) -> Harness {
        Self::start_with_fleet(config, FleetLimitsConfig::default()).await
    }

    async fn start_with_fleet(config: LimitsConfig, fleet: FleetLimitsConfig) -> Harness {
        let env = keel_testkit::TestEnv::new();
        let db = env.database().await.expect("test database");
        let pool = db.pool().await.expect("pool");
        KeyStore::migrate(&pool).await.expect("migrate");
        let store = KeyStore::new(pool, keel_auth::DEFAULT_CACHE_TTL);
        let metrics = keel_server::Metrics::default();
        let limits = LimitsLayer::with_fleet(&config, &fleet, &metrics).expect("valid limits");
        let (_, health) = tonic_health::server::health_reporter();
        let routes = Routes::new(AuthLayer::new(store.clone()).layer(limits.layer(health)));
        Harness {
            server: GrpcServer::start(routes).await.expect("grpc server"),
            store,
            metrics,
        }
    }

    /// A client calling with a new key of tenant `acme`, and the key's id.
    async fn client(&self, name: &str) -> (Client, Uuid) {
        let created = self
            .store
            .create_key(
                NewKey {
                    scope: keel_auth::Scope::tenant("acme").expect("valid tenant"),
                    role: Role::Viewer,
                    name: name.into(),
                    expires_at: None,
                },
                &Actor::system("test"),
            )
            .await
            .expect("create key");
        (self.client_for(created.key).await, created.id)
    }

    /// A client calling with a new fleet key, and the key's id.
    async fn fleet_client(&self, name: &str) -> (Client, Uuid) {
        let created = self
            .store
            .create_key(NewKey::fleet(name), &Actor::system("test"))
            .await
            .expect("create fleet key");
        (self.client_for(created.key).await, created.id)
    }

    async fn client_for(&self, key: SecretString) -> Client {
        let interceptor: Interceptor = Box::new(bearer_interceptor(key));
        HealthClient::with_interceptor(self.server.channel().await.expect("channel"), interceptor)
    }

    fn metrics(&self) -> String {
        self.metrics.encode().expect("encode metrics")
    }
}

/// The value of `keel_limit_exceeded_total{tenant="acme",limit=…}` in `text`, 0 if absent.
fn exceeded(text: &str, limit: &str) -> u64 {
    let series = format!("keel_limit_exceeded_total{{tenant=\"acme\",limit=\"{limit}\"}} ");
    text.lines()
        .find_map(|line| line.strip_prefix(&series))
        .map(|value| value.parse().expect("counter value"))
        .unwrap_or(0)
}

fn request(service: &str) -> HealthCheckRequest {
    HealthCheckRequest {
        service: service.into(),
    }
}

async fn check(client: &mut Client) -> Result<ServingStatus, Status> {
    client
        .check(request(""))
        .await
        .map(|response| response.into_inner().status())
}

/// Checks that a call of `client` reaches the service.
async fn assert_serving(client: &mut Client) {
    match check(client).await {
        Ok(status) => assert_eq!(status, ServingStatus::Serving),
        Err(status) => panic!("call refused: {status:?}"),
    }
}

#[tokio::test]
async fn a_flooding_key_is_limited_while_another_key_of_the_tenant_works() {
    let config = LimitsConfig {
        rate: 2,
        burst: 5,
        ..LimitsConfig::default()
    };
    let harness = Harness::start(config).await;
    let (mut flooder, flooder_id) = harness.client("flooder").await;
    let (mut neighbour, neighbour_id) = harness.client("neighbour").await;

    let started = Instant::now();
    let mut passed = 0;
    let mut refused = Vec::new();
    for _ in 0..30 {
        match check(&mut flooder).await {
            Ok(_) => passed += 1,
            Err(status) => refused.push(status),
        }
    }
    // The burst, plus whatever refilled at 2/s while the flood ran.
    let allowed = 5 + 2 * started.elapsed().as_secs_f64().ceil() as usize;
    assert!(passed >= 5 && passed <= allowed, "{passed} passed");
    assert!(!refused.is_empty());
    for status in &refused {
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        let hint: u64 = status
            .metadata()
            .get(RETRY_AFTER_MS)
            .expect("retry hint")
            .to_str()
            .expect("ascii")
            .parse()
            .expect("milliseconds");
        // At 2/s the next token is never more than 500 ms away.
        assert!((1..=500).contains(&hint), "{hint}");
        assert_eq!(
            status.message(),
            format!(
                "rate limit of 2 requests/s for this API key exceeded; retry in {hint} ms (see retry-after-ms)"
            )
        );
    }

    // In the same second, the other key of the tenant has its whole burst.
    for _ in 0..5 {
        assert_serving(&mut neighbour).await;
    }

    let text = harness.metrics();
    assert_eq!(exceeded(&text, "rate"), refused.len() as u64, "{text}");
    for id in [flooder_id, neighbour_id] {
        assert!(!text.contains(&id.to_string()), "key id in metrics: {text}");
        assert!(!text.contains(&id.simple().to_string()), "{text}");
    }
}

#[tokio::test]
async fn a_key_at_its_concurrency_limit_is_refused_and_others_are_not() {
    let config = LimitsConfig {
        concurrency: 1,
        ..LimitsConfig::default()
    };
    let harness = Harness::start(config).await;
    let (mut busy, _) = harness.client("busy").await;
    let (mut other, _) = harness.client("other").await;

    // Watch is server-streaming: it stays open, holding the key's only slot.
    let mut watch = busy
        .watch(request(""))
        .await
        .expect("watch starts")
        .into_inner();
    let first = watch.message().await.expect("first update").expect("open");
    assert_eq!(first.status(), ServingStatus::Serving);

    let status = check(&mut busy).await.expect_err("second call of busy");
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert_eq!(
        status.message(),
        "1 concurrent requests for this API key already running; retry when one finishes"
    );
    assert_serving(&mut other).await;
    assert_eq!(exceeded(&harness.metrics(), "concurrency"), 1);

    // Closing the stream frees the slot once the server notices.
    drop(watch);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match check(&mut busy).await {
            Ok(status) => {
                assert_eq!(status, ServingStatus::Serving);
                break;
            }
            Err(status) if status.code() == Code::ResourceExhausted => {
                assert!(Instant::now() < deadline, "slot never freed: {status:?}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(status) => panic!("unexpected {status:?}"),
        }
    }
}

#[tokio::test]
async fn an_oversized_request_is_refused() {
    let config = LimitsConfig {
        message_bytes: 1024,
        ..LimitsConfig::default()
    };
    let harness = Harness::start(config).await;
    let (mut client, _) = harness.client("uploader").await;

    // Under the limit the service answers (NOT_FOUND: no such service name is registered).
    let status = client
        .check(request(&"s".repeat(900)))
        .await
        .expect_err("unknown service");
    assert_eq!(status.code(), Code::NotFound);

    // Just over, and far over (more than HTTP/2's initial flow-control window, so the client
    // is still sending when the server has answered).
    for size in [2 * 1024, 1024 * 1024] {
        let status = client
            .check(request(&"s".repeat(size)))
            .await
            .expect_err("over the limit");
        assert_eq!(status.code(), Code::ResourceExhausted, "{size}: {status:?}");
        let message = status.message();
        assert!(
            message.starts_with("request of at least ")
                && message.ends_with(" bytes exceeds the limit of 1024 bytes"),
            "{message}"
        );
    }
    assert_eq!(exceeded(&harness.metrics(), "message_size"), 2);

    // The connection and the key stay usable.
    assert_serving(&mut client).await;
}

#[tokio::test]
async fn a_stream_running_past_the_duration_limit_ends_with_resource_exhausted() {
    let config = LimitsConfig {
        stream_duration: Duration::from_millis(300),
        ..LimitsConfig::default()
    };
    let harness = Harness::start(config).await;
    let (mut client, _) = harness.client("watcher").await;

    let started = Instant::now();
    let mut watch = client
        .watch(request(""))
        .await
        .expect("watch starts")
        .into_inner();
    let ended = loop {
        match watch.message().await {
            Ok(Some(update)) => assert_eq!(update.status(), ServingStatus::Serving),
            Ok(None) => panic!("stream ended without a status"),
            Err(status) => break status,
        }
    };
    let elapsed = started.elapsed();
    assert_eq!(ended.code(), Code::ResourceExhausted, "{ended:?}");
    assert_eq!(
        ended.message(),
        "stream exceeded the maximum duration of 300ms; reconnect to continue"
    );
    assert!(
        elapsed >= Duration::from_millis(300) && elapsed < Duration::from_secs(5),
        "{elapsed:?}"
    );
    assert_eq!(exceeded(&harness.metrics(), "stream_duration"), 1);

    // Unary calls are unaffected by the stream limit.
    assert_serving(&mut client).await;
}

#[tokio::test]
async fn without_the_auth_layer_calls_fail_closed() {
    let metrics = keel_server::Metrics::default();
    let limits = LimitsLayer::new(&LimitsConfig::default(), &metrics).expect("valid limits");
    let (_, health) = tonic_health::server::health_reporter();
    let server = GrpcServer::start(Routes::new(limits.layer(health)))
        .await
        .expect("grpc server");
    let mut client = HealthClient::new(server.channel().await.expect("channel"));
    let status = client.check(request("")).await.expect_err("no principal");
    assert_eq!(status.code(), Code::Internal);
    assert_eq!(status.message(), "limits need the auth layer in front");
}

/// Calls `client` `n` times and counts the calls refused for the rate.
async fn refused_of(client: &mut Client, n: usize) -> usize {
    let mut refused = 0;
    for _ in 0..n {
        match check(client).await {
            Ok(_) => {}
            Err(status) if status.code() == Code::ResourceExhausted => refused += 1,
            Err(status) => panic!("unexpected refusal: {status:?}"),
        }
    }
    refused
}

#[tokio::test]
async fn fleet_callers_are_held_to_the_fleet_limits_not_the_user_ones() {
    // Tight user limits, generous fleet limits: Keel's own services are not throttled.
    let user = LimitsConfig {
        rate: 1,
        burst: 2,
        ..LimitsConfig::default()
    };
    let harness = Harness::start_with_fleet(user.clone(), FleetLimitsConfig::default()).await;
    let (mut fleet, _) = harness.fleet_client("collector").await;
    let (mut tenant, _) = harness.client("dash").await;
    assert_eq!(
        refused_of(&mut fleet, 20).await,
        0,
        "fleet key throttled by user limits"
    );
    // Five quick calls on a bucket of two; at most one token comes back meanwhile.
    assert!(
        refused_of(&mut tenant, 5).await >= 2,
        "user limits still hold"
    );

    // The reverse: tight fleet limits bind fleet keys, and tenants keep their budget.
    let fleet_limits = FleetLimitsConfig {
        rate: 1,
        burst: 2,
        ..FleetLimitsConfig::default()
    };
    let harness = Harness::start_with_fleet(LimitsConfig::default(), fleet_limits).await;
    let (mut fleet, _) = harness.fleet_client("collector").await;
    let (mut tenant, _) = harness.client("dash").await;
    let refused = refused_of(&mut fleet, 5).await;
    assert!(refused >= 2, "{refused} of 5 fleet calls refused");
    let status = check(&mut fleet)
        .await
        .expect_err("still over the fleet rate");
    assert!(
        status.message().starts_with("rate limit of 1 requests/s"),
        "{}",
        status.message()
    );
    assert_eq!(
        refused_of(&mut tenant, 20).await,
        0,
        "fleet traffic ate a tenant's budget"
    );
    // Fleet refusals are counted without a tenant, never as acme's.
    let text = harness.metrics();
    assert_eq!(exceeded(&text, "rate"), 0, "{text}");
    assert!(
        text.contains(&format!(
            "keel_limit_exceeded_total{{tenant=\"\",limit=\"rate\"}} {}",
            refused + 1
        )),
        "{text}"
    );
}
