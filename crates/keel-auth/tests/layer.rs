//! The layer in front of real tonic services on 127.0.0.1:0.

use std::pin::Pin;
use std::time::Duration;

use keel_auth::{Actor, AuthLayer, KeyStore, NewKey, Role, bearer_interceptor};
use keel_testkit::GrpcServer;
use secrecy::{ExposeSecret as _, SecretString};
use tonic::Code;
use tonic::service::Routes;
use tonic::transport::Channel;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::pb::{
    HealthCheckRequest, HealthCheckResponse, health_check_response::ServingStatus,
};
use tower_layer::Layer as _;

async fn store(cache_ttl: Duration) -> KeyStore {
    let env = keel_testkit::TestEnv::new();
    let db = env.database().await.expect("test database");
    let pool = db.pool().await.expect("pool");
    KeyStore::migrate(&pool).await.expect("migrate");
    KeyStore::new(pool, cache_ttl)
}

fn actor() -> Actor {
    Actor::system("test")
}

async fn key(store: &KeyStore, role: Role, name: &str) -> (uuid::Uuid, SecretString) {
    let new = NewKey {
        scope: keel_auth::Scope::tenant("acme").expect("valid tenant"),
        role,
        name: name.into(),
        expires_at: None,
    };
    let created = store.create_key(new, &actor()).await.expect("create key");
    (created.id, created.key)
}

fn check_request() -> HealthCheckRequest {
    HealthCheckRequest {
        service: String::new(),
    }
}

/// Calls Check with `metadata` set as given, returning the status code and message.
async fn check_with(
    channel: &Channel,
    metadata: &[(&'static str, String)],
) -> Result<ServingStatus, (Code, String)> {
    let mut request = tonic::Request::new(check_request());
    for (name, value) in metadata {
        request
            .metadata_mut()
            .insert(*name, value.parse().expect("metadata value"));
    }
    match HealthClient::new(channel.clone()).check(request).await {
        Ok(response) => Ok(response.into_inner().status()),
        Err(status) => Err((status.code(), status.message().to_owned())),
    }
}

#[tokio::test]
async fn only_valid_keys_reach_the_service() {
    // TTL 0 so the revocation below bites on the next call.
    let store = store(Duration::ZERO).await;
    let (_, health) = tonic_health::server::health_reporter();
    let server = GrpcServer::start(Routes::new(AuthLayer::new(store.clone()).layer(health)))
        .await
        .expect("grpc server");
    let channel = server.channel().await.expect("channel");
    let (id, key) = key(&store, Role::Viewer, "dash").await;
    let bearer = format!("Bearer {}", key.expose_secret());

    let missing = check_with(&channel, &[]).await;
    let expected = "missing API key: send the header \"authorization: Bearer keel_...\"";
    assert_eq!(missing, Err((Code::Unauthenticated, expected.to_owned())));

    let invalid = Err((Code::Unauthenticated, "invalid API key".to_owned()));
    assert_eq!(
        check_with(&channel, &[("authorization", "Bearer nonsense".into())]).await,
        invalid
    );
    let unknown = format!("Bearer keel_{}", "z".repeat(40));
    assert_eq!(
        check_with(&channel, &[("authorization", unknown)]).await,
        invalid
    );

    assert_eq!(
        check_with(&channel, &[("authorization", bearer.clone())]).await,
        Ok(ServingStatus::Serving)
    );
    let api_key = key.expose_secret().to_owned();
    assert_eq!(
        check_with(&channel, &[("x-api-key", api_key)]).await,
        Ok(ServingStatus::Serving)
    );

    // The client-side helper sends the same header.
    let mut client =
        HealthClient::with_interceptor(channel.clone(), bearer_interceptor(key.clone()));
    let response = client
        .check(check_request())
        .await
        .expect("check with interceptor");
    assert_eq!(response.into_inner().status(), ServingStatus::Serving);

    store.revoke(id, &actor()).await.expect("revoke");
    let revoked = check_with(&channel, &[("authorization", bearer)]).await;
    assert_eq!(
        revoked,
        Err((Code::Unauthenticated, "API key revoked".to_owned()))
    );
}

/// A Health service whose Check needs an operator and echoes nothing but success,
/// to see the principal arrive in a real handler.
#[derive(Debug)]
struct OperatorsOnly;

#[tonic::async_trait]
impl Health for OperatorsOnly {
    async fn check(
        &self,
        request: tonic::Request<HealthCheckRequest>,
    ) -> Result<tonic::Response<HealthCheckResponse>, tonic::Status> {
        let principal = keel_auth::principal(&request)?;
        principal.require(Role::Operator, "check health")?;
        if !matches!(&principal.scope, keel_auth::Scope::Tenant(t) if t.as_str() == "acme") {
            return Err(tonic::Status::internal(format!(
                "wrong scope {}",
                principal.scope
            )));
        }
        Ok(tonic::Response::new(HealthCheckResponse {
            status: ServingStatus::Serving.into(),
        }))
    }

    type WatchStream = Pin<
        Box<
            dyn tokio_stream::Stream<Item = Result<HealthCheckResponse, tonic::Status>>
                + Send
                + 'static,
        >,
    >;

    async fn watch(
        &self,
        _request: tonic::Request<HealthCheckRequest>,
    ) -> Result<tonic::Response<Self::WatchStream>, tonic::Status> {
        Err(tonic::Status::unimplemented("not needed here"))
    }
}

#[tokio::test]
async fn handlers_see_the_principal_and_check_its_role() {
    let store = store(Duration::from_secs(5)).await;
    let routes = Routes::new(AuthLayer::new(store.clone()).layer(HealthServer::new(OperatorsOnly)));
    let server = GrpcServer::start(routes).await.expect("grpc server");
    let channel = server.channel().await.expect("channel");

    let (_, operator) = key(&store, Role::Operator, "ops").await;
    let (_, viewer) = key(&store, Role::Viewer, "dash").await;
    let bearer =
        |key: &SecretString| vec![("authorization", format!("Bearer {}", key.expose_secret()))];

    assert_eq!(
        check_with(&channel, &bearer(&operator)).await,
        Ok(ServingStatus::Serving)
    );
    let denied = check_with(&channel, &bearer(&viewer)).await;
    let message = "role viewer may not check health; it needs operator".to_owned();
    assert_eq!(denied, Err((Code::PermissionDenied, message)));
}

#[tokio::test]
async fn a_service_without_the_layer_has_no_principal() {
    let server = GrpcServer::start(Routes::new(HealthServer::new(OperatorsOnly)))
        .await
        .expect("grpc server");
    let channel = server.channel().await.expect("channel");
    let result = check_with(&channel, &[]).await;
    assert!(
        matches!(&result, Err((Code::Internal, m)) if m.contains("auth layer is not installed")),
        "{result:?}"
    );
}

#[tokio::test]
async fn an_unreachable_store_answers_unavailable() {
    // Nothing listens on port 1.
    let pool = sqlx::postgres::PgPoolOptions::new()
        .acquire_timeout(Duration::from_secs(1))
        .connect_lazy("postgres://nobody@127.0.0.1:1/nothing")
        .expect("lazy pool");
    let store = KeyStore::new(pool, Duration::ZERO);
    let (_, health) = tonic_health::server::health_reporter();
    let server = GrpcServer::start(Routes::new(AuthLayer::new(store).layer(health)))
        .await
        .expect("grpc server");
    let channel = server.channel().await.expect("channel");
    let key = format!("keel_{}", "q".repeat(40));
    let result = check_with(&channel, &[("authorization", format!("Bearer {key}"))]).await;
    assert_eq!(
        result,
        Err((
            Code::Unavailable,
            "cannot verify API key right now".to_owned()
        ))
    );
}
