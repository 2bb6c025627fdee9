//! Service keys bound to client certificates: the layer alone, with the
//! [`PeerIdentity`] that keel-server's TLS listener would insert put there by hand
//! (TLS itself is tested in keel-server).

mod common;

use std::time::Duration;

use common::call;
use keel_auth::{Actor, AuthLayer, KeyStore, NewKey, Role};
use secrecy::SecretString;
use tonic::Code;

const REFUSED: &str = "service keys must come with a client certificate for collector";

struct Keys {
    store: KeyStore,
    /// A `service` key named `collector`.
    service: SecretString,
    /// A `viewer` key named `dash`.
    viewer: SecretString,
}

async fn keys() -> Keys {
    let env = keel_testkit::TestEnv::new();
    let db = env.database().await.expect("test database");
    let pool = db.pool().await.expect("pool");
    KeyStore::migrate(&pool).await.expect("migrate");
    let store = KeyStore::new(pool, Duration::from_secs(5));
    let create = |role, name: &str| {
        let new = NewKey {
            scope: keel_auth::Scope::tenant("acme").expect("valid tenant"),
            role,
            name: name.into(),
            expires_at: None,
        };
        let store = store.clone();
        async move {
            let created = store
                .create_key(new, &Actor::system("test"))
                .await
                .expect("create key");
            created.key
        }
    };
    let service = create(Role::Service, "collector").await;
    let viewer = create(Role::Viewer, "dash").await;
    Keys {
        store,
        service,
        viewer,
    }
}

/// Checks that `key` with `peer` is let through with that peer identity, or refused
/// with `refused`.
async fn check(layer: &AuthLayer, key: &SecretString, peer: Option<&str>, refused: Option<&str>) {
    let result = call(layer, key, peer).await;
    match refused {
        Some(message) => assert_eq!(
            result.as_ref().map(|p| &p.peer_identity),
            Err(&(Code::Unauthenticated, message.to_owned())),
            "peer {peer:?}"
        ),
        None => {
            let principal = result.unwrap_or_else(|e| panic!("peer {peer:?} refused: {e:?}"));
            assert_eq!(principal.peer_identity.as_deref(), peer);
            assert_eq!(principal.scope.to_string(), "tenant acme");
        }
    }
}

#[tokio::test]
async fn required_service_keys_need_a_certificate_naming_them() {
    let keys = keys().await;
    let layer = AuthLayer::new(keys.store.clone()).require_client_cert_for_service_keys(true);
    check(&layer, &keys.service, None, Some(REFUSED)).await;
    check(&layer, &keys.service, Some("optimizer"), Some(REFUSED)).await;
    // Names are compared exactly.
    check(&layer, &keys.service, Some("Collector"), Some(REFUSED)).await;
    check(&layer, &keys.service, Some("collector"), None).await;
    // Other roles are not bound to certificates, but see theirs.
    check(&layer, &keys.viewer, None, None).await;
    check(&layer, &keys.viewer, Some("laptop-of-alice"), None).await;
}

#[tokio::test]
async fn by_default_service_keys_need_no_certificate() {
    let keys = keys().await;
    let layer = AuthLayer::new(keys.store.clone());
    check(&layer, &keys.service, None, None).await;
    check(&layer, &keys.service, Some("optimizer"), None).await;
    check(&layer, &keys.viewer, Some("laptop-of-alice"), None).await;
}

#[tokio::test]
async fn layers_follow_the_store_unless_told_otherwise() {
    let keys = keys().await;
    // As serve does it: services build their layer from the store they are given.
    let store = keys
        .store
        .clone()
        .require_client_cert_for_service_keys(true);
    let layer = AuthLayer::new(store.clone());
    check(&layer, &keys.service, None, Some(REFUSED)).await;
    check(&layer, &keys.service, Some("collector"), None).await;
    // Clones keep the setting.
    check(
        &AuthLayer::new(store.clone()),
        &keys.service,
        None,
        Some(REFUSED),
    )
    .await;

    let layer = AuthLayer::new(store).require_client_cert_for_service_keys(false);
    check(&layer, &keys.service, None, None).await;
}
