//! Keys against a real PostgreSQL: only hashes are stored, and every way a key
//! stops working is reported as such.

use std::time::Duration;

use chrono::Utc;
use keel_auth::{Actor, AuthError, KeyStore, NewKey, Role, Scope};
use secrecy::{ExposeSecret as _, SecretString};
use sha2::{Digest as _, Sha256};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

/// A migrated store on a fresh database, plus a pool for looking behind its back.
async fn store(cache_ttl: Duration) -> (KeyStore, PgPool) {
    let env = keel_testkit::TestEnv::new();
    let db = env.database().await.expect("test database");
    let pool = db.pool().await.expect("pool");
    KeyStore::migrate(&pool).await.expect("migrate");
    (KeyStore::new(pool.clone(), cache_ttl), pool)
}

/// Who the tests act as; the audit log itself is tested in `audit.rs`.
fn actor() -> Actor {
    Actor::system("test")
}

fn new_key(tenant: &str, role: Role, name: &str) -> NewKey {
    NewKey {
        scope: Scope::tenant(tenant).expect("valid tenant"),
        role,
        name: name.into(),
        expires_at: None,
    }
}

#[tokio::test]
async fn created_keys_authenticate_until_revoked() {
    let (store, _pool) = store(Duration::ZERO).await;
    let created = store
        .create_key(new_key("acme", Role::Operator, "ci"), &actor())
        .await
        .expect("create");
    let key = created.key.expose_secret();
    assert!(key.starts_with("keel_") && key.len() == 45, "{key}");
    assert_eq!(created.prefix, key[..12]);
    assert_eq!(
        (
            created.scope.to_string().as_str(),
            created.role,
            created.name.as_str()
        ),
        ("tenant acme", Role::Operator, "ci")
    );
    assert_eq!(created.id.get_version_num(), 7);
    assert!(!format!("{created:?}").contains(key), "Debug shows the key");

    let principal = store.authenticate(key).await.expect("authenticate");
    assert_eq!(
        (
            principal.key_id,
            principal.scope.to_string().as_str(),
            principal.role
        ),
        (created.id, "tenant acme", Role::Operator)
    );

    store.revoke(created.id, &actor()).await.expect("revoke");
    store
        .revoke(created.id, &actor())
        .await
        .expect("revoking twice is a no-op");
    assert!(matches!(
        store.authenticate(key).await,
        Err(AuthError::Revoked)
    ));

    let unknown = format!("keel_{}", "x".repeat(40));
    assert!(matches!(
        store.authenticate(&unknown).await,
        Err(AuthError::UnknownKey)
    ));
    let missing = uuid::Uuid::now_v7();
    assert!(
        matches!(store.revoke(missing, &actor()).await, Err(AuthError::NotFound(id)) if id == missing)
    );
}

#[tokio::test]
async fn expired_keys_are_refused() {
    let (store, pool) = store(Duration::from_secs(60)).await;
    let past = Utc::now() - chrono::Duration::seconds(1);
    let err = store
        .create_key(
            NewKey {
                expires_at: Some(past),
                ..new_key("acme", Role::Viewer, "old")
            },
            &actor(),
        )
        .await;
    assert!(matches!(err, Err(AuthError::ExpiryInPast(_))), "{err:?}");

    // Expired in the database, as another replica's clock would see it.
    let created = store
        .create_key(new_key("acme", Role::Viewer, "dash"), &actor())
        .await
        .expect("create");
    sqlx::query("UPDATE auth.api_keys SET expires_at = now() - interval '1 second' WHERE id = $1")
        .bind(created.id)
        .execute(&pool)
        .await
        .expect("expire");
    assert!(matches!(
        store.authenticate(created.key.expose_secret()).await,
        Err(AuthError::Expired)
    ));

    // Expiring while cached: the cache never outlives the key, whatever its TTL.
    let soon = Utc::now() + chrono::Duration::milliseconds(1500);
    let created = store
        .create_key(
            NewKey {
                expires_at: Some(soon),
                ..new_key("acme", Role::Viewer, "brief")
            },
            &actor(),
        )
        .await;
    let created = created.expect("create");
    store
        .authenticate(created.key.expose_secret())
        .await
        .expect("valid before expiry");
    tokio::time::sleep(Duration::from_millis(1600)).await;
    assert!(matches!(
        store.authenticate(created.key.expose_secret()).await,
        Err(AuthError::Expired)
    ));
}

#[tokio::test]
async fn the_database_holds_only_the_hash() {
    let (store, pool) = store(Duration::ZERO).await;
    let created = store
        .create_key(new_key("acme", Role::Admin, "root"), &actor())
        .await
        .expect("create");
    let key = created.key.expose_secret();

    // Every column of every row, as text.
    let rows: Vec<String> = sqlx::query_scalar("SELECT t::text FROM auth.api_keys t")
        .fetch_all(&pool)
        .await
        .expect("dump");
    assert_eq!(rows.len(), 1);
    assert!(!rows[0].contains(key), "clear key stored: {}", rows[0]);
    assert!(
        !rows[0].contains(&key[12..]),
        "secret part of the key stored: {}",
        rows[0]
    );

    let (hash, prefix): (Vec<u8>, String) =
        sqlx::query_as("SELECT key_hash, key_prefix FROM auth.api_keys")
            .fetch_one(&pool)
            .await
            .expect("row");
    assert_eq!(hash, Sha256::digest(key.as_bytes()).to_vec());
    assert_eq!(prefix, key[..12]);

    let listed = store
        .list(Some(&Scope::tenant("acme").expect("valid tenant")))
        .await
        .expect("list");
    assert_eq!(listed.len(), 1);
    assert!(!format!("{listed:?}").contains(&key[12..]));
    assert_eq!(
        (listed[0].id, listed[0].prefix.as_str(), listed[0].role),
        (created.id, &key[..12], Role::Admin)
    );
}

#[tokio::test]
async fn malformed_keys_are_refused_without_a_query() {
    // Nothing listens on port 1: any query would fail with a connection error.
    let pool = PgPoolOptions::new()
        .acquire_timeout(Duration::from_secs(1))
        .connect_lazy("postgres://nobody@127.0.0.1:1/nothing")
        .expect("lazy pool");
    let store = KeyStore::new(pool, Duration::ZERO);
    for bad in [
        "",
        "keel_",
        "Bearer keel_abc",
        "keel_short",
        &format!("keel_{}!", "a".repeat(39)),
    ] {
        let result = store.authenticate(bad).await;
        assert!(
            matches!(result, Err(AuthError::MalformedKey)),
            "{bad:?}: {result:?}"
        );
    }
    let result = store
        .authenticate(&format!("keel_{}", "a".repeat(40)))
        .await;
    assert!(
        matches!(result, Err(AuthError::Database(_))),
        "a well-formed key does reach the store: {result:?}"
    );
}

#[tokio::test]
async fn cached_keys_survive_a_revocation_elsewhere_until_the_ttl() {
    let (store, pool) = store(Duration::from_secs(60)).await;
    let created = store
        .create_key(new_key("acme", Role::Viewer, "dash"), &actor())
        .await
        .expect("create");
    let key = created.key.expose_secret();
    store
        .authenticate(key)
        .await
        .expect("first lookup fills the cache");

    // Revoked by another replica: this one keeps its cached answer.
    sqlx::query("UPDATE auth.api_keys SET revoked_at = now()")
        .execute(&pool)
        .await
        .expect("revoke behind");
    store
        .authenticate(key)
        .await
        .expect("cached within the TTL");

    // Revoked through this store: dropped from its cache at once.
    store.revoke(created.id, &actor()).await.expect("revoke");
    assert!(matches!(
        store.authenticate(key).await,
        Err(AuthError::Revoked)
    ));
}

#[tokio::test]
async fn names_are_unique_among_a_tenants_active_keys() {
    let (store, _pool) = store(Duration::ZERO).await;
    let first = store
        .create_key(new_key("acme", Role::Viewer, "ci"), &actor())
        .await
        .expect("create");
    let err = store
        .create_key(new_key("acme", Role::Admin, "ci"), &actor())
        .await
        .expect_err("same name");
    assert_eq!(
        err.to_string(),
        "tenant acme already has an active API key named \"ci\""
    );
    store
        .create_key(new_key("globex", Role::Viewer, "ci"), &actor())
        .await
        .expect("other tenant");
    store.revoke(first.id, &actor()).await.expect("revoke");
    store
        .create_key(new_key("acme", Role::Viewer, "ci"), &actor())
        .await
        .expect("name free again");

    let err = Scope::tenant("Acme").expect_err("bad tenant");
    assert!(matches!(err, AuthError::InvalidTenant(_)), "{err}");
    assert_eq!(store.list(None).await.expect("list").len(), 3);
    let globex = Scope::tenant("globex").expect("valid tenant");
    assert_eq!(store.list(Some(&globex)).await.expect("list").len(), 1);
}

#[tokio::test]
async fn ensure_key_is_idempotent_and_refuses_a_different_grant() {
    let (store, pool) = store(Duration::ZERO).await;
    let key = SecretString::from(format!("keel_{}", "B".repeat(40)));

    // Replicas starting together all register the same bootstrap key.
    let ids = register_concurrently(&store, &key).await;
    assert!(ids.iter().all(|id| *id == ids[0]), "{ids:?}");
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM auth.api_keys")
        .fetch_one(&pool)
        .await
        .expect("count");
    assert_eq!(count, 1);
    let principal = store
        .authenticate(key.expose_secret())
        .await
        .expect("authenticate");
    assert_eq!((principal.key_id, principal.role), (ids[0], Role::Admin));

    let err = store
        .ensure_key(&key, "system", Role::Viewer, "bootstrap", &actor())
        .await
        .expect_err("other role");
    assert_eq!(
        err.to_string(),
        "API key is already registered for tenant system with role admin"
    );
    let err = store
        .ensure_key(&key, "acme", Role::Admin, "bootstrap", &actor())
        .await
        .expect_err("other tenant");
    assert!(matches!(err, AuthError::KeyConflict { .. }), "{err}");

    let err = store
        .ensure_key(
            &SecretString::from("hunter2"),
            "system",
            Role::Admin,
            "x",
            &actor(),
        )
        .await
        .expect_err("format");
    assert!(matches!(err, AuthError::MalformedKey), "{err}");
    assert!(!err.to_string().contains("hunter2"));

    store.revoke(ids[0], &actor()).await.expect("revoke");
    let err = store
        .ensure_key(&key, "system", Role::Admin, "bootstrap", &actor())
        .await
        .expect_err("revoked");
    assert!(matches!(err, AuthError::Revoked), "{err}");
}

async fn register_concurrently(store: &KeyStore, key: &SecretString) -> Vec<uuid::Uuid> {
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let (store, key) = (store.clone(), key.clone());
            tokio::spawn(async move {
                store
                    .ensure_key(&key, "system", Role::Admin, "bootstrap", &actor())
                    .await
            })
        })
        .collect();
    let mut ids = Vec::new();
    for task in tasks {
        ids.push(task.await.expect("task").expect("ensure_key"));
    }
    ids
}
