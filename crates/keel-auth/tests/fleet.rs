//! Fleet keys against a real PostgreSQL: no tenant, the service role only (in the code
//! and in the database), bound to their client certificate under mutual TLS; and the
//! in-process identity, which no listener accepts.

mod common;

use std::pin::Pin;
use std::time::Duration;

use common::call;
use keel_auth::{Actor, AuthError, AuthLayer, InProcess, KeyStore, NewKey, Role, Scope, Tenant};
use keel_testkit::GrpcServer;
use secrecy::ExposeSecret as _;
use sqlx::PgPool;
use tonic::Code;
use tonic::service::Routes;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use tower_layer::Layer as _;

async fn store() -> (KeyStore, PgPool) {
    let env = keel_testkit::TestEnv::new();
    let db = env.database().await.expect("test database");
    let pool = db.pool().await.expect("pool");
    KeyStore::migrate(&pool).await.expect("migrate");
    (KeyStore::new(pool.clone(), Duration::ZERO), pool)
}

fn actor() -> Actor {
    Actor::system("test")
}

fn acme() -> Tenant {
    Tenant::new("acme").expect("valid tenant")
}

/// The name of the constraint a failed statement violated.
fn violated(err: sqlx::Error) -> String {
    match err {
        sqlx::Error::Database(db) => db.constraint().unwrap_or_default().to_owned(),
        other => panic!("not a constraint violation: {other}"),
    }
}

#[tokio::test]
async fn fleet_keys_have_no_tenant_and_the_service_role_only() {
    let (store, pool) = store().await;
    let fleet = store
        .create_key(NewKey::fleet("collector"), &actor())
        .await
        .expect("create fleet key");
    assert_eq!(
        (fleet.scope.clone(), fleet.role),
        (Scope::Fleet, Role::Service)
    );
    let principal = store
        .authenticate(fleet.key.expose_secret())
        .await
        .expect("authenticate");
    assert_eq!(
        (principal.scope, principal.role),
        (Scope::Fleet, Role::Service)
    );
    let tenant: Option<String> =
        sqlx::query_scalar("SELECT tenant FROM auth.api_keys WHERE id = $1")
            .bind(fleet.id)
            .fetch_one(&pool)
            .await
            .expect("row");
    assert_eq!(tenant, None, "a fleet key is stored without a tenant");

    // The API refuses every other role for a fleet key, at creation and later.
    for role in [Role::Viewer, Role::Operator, Role::Admin] {
        let err = store
            .create_key(
                NewKey {
                    role,
                    ..NewKey::fleet(format!("fleet-{role}"))
                },
                &actor(),
            )
            .await
            .expect_err("fleet key with a user role");
        assert!(
            matches!(err, AuthError::FleetRoleNotService(r) if r == role),
            "{err}"
        );
        assert_eq!(
            tonic::Status::from(err).code(),
            Code::InvalidArgument,
            "a clear refusal, not a store failure"
        );
        let err = store
            .change_role(fleet.id, role, &actor())
            .await
            .expect_err("fleet key re-roled");
        assert_eq!(
            err.to_string(),
            format!(
                "fleet keys have the service role only, not {role}; a person or a tool needs a key of one tenant (--tenant)"
            )
        );
    }
    let still = store
        .authenticate(fleet.key.expose_secret())
        .await
        .expect("still valid");
    assert_eq!(still.role, Role::Service);

    // Fleet names are unique among active fleet keys: they name client certificates.
    let err = store
        .create_key(NewKey::fleet("collector"), &actor())
        .await
        .expect_err("same fleet name");
    assert_eq!(
        err.to_string(),
        "fleet already has an active API key named \"collector\""
    );
    // A tenant's key of the same name is another key.
    let admin = store
        .create_key(NewKey::tenant(acme(), Role::Admin, "collector"), &actor())
        .await
        .expect("tenant key named like a fleet key");

    let fleet_keys = store.list(Some(&Scope::Fleet)).await.expect("list fleet");
    assert_eq!(
        fleet_keys.iter().map(|k| k.id).collect::<Vec<_>>(),
        [fleet.id]
    );
    let all = store.list(None).await.expect("list all");
    assert_eq!(all.len(), 2);
    assert_eq!(all[0].scope, Scope::Fleet, "fleet keys are listed first");

    // Audit entries of fleet keys have no tenant.
    let entries = store.audit_log(10).await.expect("audit log");
    let created = entries
        .iter()
        .find(|e| e.subject == fleet.id.to_string())
        .expect("fleet key's audit entry");
    assert_eq!(created.tenant, None);
    let created = entries
        .iter()
        .find(|e| e.subject == admin.id.to_string())
        .expect("tenant key's audit entry");
    assert_eq!(created.tenant.as_deref(), Some("acme"));

    // The database itself refuses what the code would: whatever writes the row.
    let err = sqlx::query(
        "INSERT INTO auth.api_keys (id, tenant, role, name, key_hash, key_prefix) \
         VALUES (gen_random_uuid(), NULL, 'admin', 'root', sha256('x'), 'keel_abcdefg')",
    )
    .execute(&pool)
    .await
    .expect_err("fleet admin inserted");
    assert_eq!(violated(err), "api_keys_fleet_service_only");
    let err = sqlx::query("UPDATE auth.api_keys SET role = 'viewer' WHERE id = $1")
        .bind(fleet.id)
        .execute(&pool)
        .await
        .expect_err("fleet key made viewer");
    assert_eq!(violated(err), "api_keys_fleet_service_only");
    // No user-facing key can become a fleet key.
    let err = sqlx::query("UPDATE auth.api_keys SET tenant = NULL WHERE id = $1")
        .bind(admin.id)
        .execute(&pool)
        .await
        .expect_err("admin key made fleet");
    assert_eq!(violated(err), "api_keys_fleet_service_only");
    // And an empty tenant never means "all".
    let err = sqlx::query("UPDATE auth.api_keys SET tenant = '' WHERE id = $1")
        .bind(admin.id)
        .execute(&pool)
        .await
        .expect_err("empty tenant");
    assert_eq!(violated(err), "api_keys_tenant_not_empty");
}

#[tokio::test]
async fn under_mutual_tls_a_fleet_key_needs_its_certificate() {
    let (store, _pool) = store().await;
    let fleet = store
        .create_key(NewKey::fleet("collector"), &actor())
        .await
        .expect("fleet key")
        .key;
    let service = store
        .create_key(NewKey::tenant(acme(), Role::Service, "exporter"), &actor())
        .await
        .expect("tenant service key")
        .key;
    let refused = Err((
        Code::Unauthenticated,
        "fleet keys must come with a client certificate for collector (mutual TLS is on): \
         present the certificate issued to collector"
            .to_owned(),
    ));

    // As serve sets it when a client CA is configured.
    let layer = AuthLayer::new(store.clone().mutual_tls(true));
    assert_eq!(call(&layer, &fleet, None).await.map(|p| p.scope), refused);
    assert_eq!(
        call(&layer, &fleet, Some("optimizer"))
            .await
            .map(|p| p.scope),
        refused
    );
    let principal = call(&layer, &fleet, Some("collector"))
        .await
        .expect("fleet key with its certificate");
    assert_eq!(principal.scope, Scope::Fleet);
    assert_eq!(principal.peer_identity.as_deref(), Some("collector"));
    // A tenant's service key is bound only by --service-keys-require-client-cert.
    let principal = call(&layer, &service, None).await.expect("tenant key");
    assert_eq!(principal.scope, Scope::Tenant(acme()));

    // Without mutual TLS there is no certificate to bind to.
    let layer = AuthLayer::new(store.clone());
    assert!(call(&layer, &fleet, None).await.is_ok());
    // The layer's own setting overrides the store's.
    let layer = AuthLayer::new(store).mutual_tls(true);
    assert_eq!(call(&layer, &fleet, None).await.map(|p| p.scope), refused);
}

/// A Health service whose Check refuses with the caller it saw as the message.
#[derive(Debug)]
struct WhoAmI;

#[tonic::async_trait]
impl Health for WhoAmI {
    async fn check(
        &self,
        request: tonic::Request<HealthCheckRequest>,
    ) -> Result<tonic::Response<HealthCheckResponse>, tonic::Status> {
        let p = keel_auth::principal(&request)?;
        Err(tonic::Status::aborted(format!(
            "{} {} {}",
            p.scope, p.role, p.key_id
        )))
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

fn caller(result: Result<tonic::Response<HealthCheckResponse>, tonic::Status>) -> (Code, String) {
    let status = result.expect_err("WhoAmI always refuses");
    (status.code(), status.message().to_owned())
}

#[tokio::test]
async fn the_in_process_identity_is_accepted_in_process_only() {
    let (store, _pool) = store().await;
    let service = AuthLayer::new(store.clone()).layer(HealthServer::new(WhoAmI));

    // In-process: no key, and the handler sees an internal fleet caller.
    let channel = InProcess::new(service.clone());
    let id = channel.channel_id();
    let mut client = HealthClient::new(channel);
    let request = || HealthCheckRequest {
        service: String::new(),
    };
    assert_eq!(
        caller(client.check(request()).await),
        (Code::Aborted, format!("fleet service {id}"))
    );
    // Clones share the channel's identity; a new channel has its own.
    let mut clone = client.clone();
    assert_eq!(
        caller(clone.check(request()).await).1,
        format!("fleet service {id}")
    );
    let other = InProcess::new(service.clone());
    assert_ne!(other.channel_id(), id);

    // Over a listener, the same service: no header claims the in-process identity.
    let server = GrpcServer::start(Routes::new(service))
        .await
        .expect("grpc server");
    let channel = server.channel().await.expect("channel");
    let viewer = store
        .create_key(NewKey::tenant(acme(), Role::Viewer, "dash"), &actor())
        .await
        .expect("viewer key");
    for header in ["x-keel-internal", "x-keel-in-process", "x-keel-principal"] {
        let mut without_key = tonic::Request::new(request());
        without_key
            .metadata_mut()
            .insert(header, "true".parse().expect("value"));
        assert_eq!(
            caller(HealthClient::new(channel.clone()).check(without_key).await),
            (
                Code::Unauthenticated,
                "missing API key: send the header \"authorization: Bearer keel_...\"".to_owned()
            ),
            "{header}"
        );
        let mut with_key = tonic::Request::new(request());
        with_key
            .metadata_mut()
            .insert(header, "true".parse().expect("value"));
        with_key.metadata_mut().insert(
            "authorization",
            format!("Bearer {}", viewer.key.expose_secret())
                .parse()
                .expect("value"),
        );
        assert_eq!(
            caller(HealthClient::new(channel.clone()).check(with_key).await),
            (Code::Aborted, format!("tenant acme viewer {}", viewer.id)),
            "{header} made a tenant key more than it is"
        );
    }
}
