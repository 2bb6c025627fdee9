//! The audit log against a real PostgreSQL: one row per change, written in the
//! change's transaction, never holding a key or its hash.

use std::time::Duration;

use chrono::Utc;
use keel_auth::{Actor, AuditEntry, AuthError, KeyStore, NewKey, Role, Scope, action};
use secrecy::{ExposeSecret as _, SecretString};
use serde_json::json;
use sha2::{Digest as _, Sha256};
use sqlx::PgPool;
use uuid::Uuid;

async fn store(cache_ttl: Duration) -> (KeyStore, PgPool) {
    let env = keel_testkit::TestEnv::new();
    let db = env.database().await.expect("test database");
    let pool = db.pool().await.expect("pool");
    KeyStore::migrate(&pool).await.expect("migrate");
    (KeyStore::new(pool.clone(), cache_ttl), pool)
}

fn new_key(tenant: &str, role: Role, name: &str) -> NewKey {
    NewKey {
        scope: Scope::tenant(tenant).expect("valid tenant"),
        role,
        name: name.into(),
        expires_at: None,
    }
}

fn alice() -> Actor {
    Actor::system("alice")
}

async fn count(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM auth.audit_log")
        .fetch_one(pool)
        .await
        .expect("count")
}

/// The newest entry, after checking that exactly `expected_rows` exist.
async fn newest(store: &KeyStore, pool: &PgPool, expected_rows: i64) -> AuditEntry {
    assert_eq!(count(pool).await, expected_rows, "audit rows");
    store
        .audit_log(1)
        .await
        .expect("audit log")
        .pop()
        .expect("an entry")
}

fn check(
    entry: &AuditEntry,
    actor: &Actor,
    action: &str,
    tenant: Option<&str>,
    subject: &str,
    details: serde_json::Value,
) {
    assert_eq!(
        (
            entry.actor.as_str(),
            entry.action.as_str(),
            entry.tenant.as_deref(),
            entry.subject.as_str(),
            &entry.details,
        ),
        (actor.as_str(), action, tenant, subject, &details),
    );
    assert_eq!(entry.id.get_version_num(), 7);
    let age = Utc::now() - entry.at;
    assert!(age < chrono::Duration::seconds(30), "at {}", entry.at);
}

fn hex_hash(key: &str) -> String {
    Sha256::digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[tokio::test]
async fn each_action_writes_one_row_without_key_material() {
    let (store, pool) = store(Duration::ZERO).await;
    let expires_at = Utc::now() + chrono::Duration::days(30);

    let created = store
        .create_key(
            NewKey {
                expires_at: Some(expires_at),
                ..new_key("acme", Role::Viewer, "dash")
            },
            &alice(),
        )
        .await
        .expect("create");
    let id = created.id.to_string();
    check(
        &newest(&store, &pool, 1).await,
        &alice(),
        action::KEY_CREATED,
        Some("acme"),
        &id,
        json!({
            "name": "dash", "role": "viewer", "prefix": created.prefix,
            "expires_at": expires_at,
        }),
    );

    let bob = Actor::key(Uuid::now_v7());
    let info = store
        .change_role(created.id, Role::Operator, &bob)
        .await
        .expect("change role");
    assert_eq!(info.role, Role::Operator);
    check(
        &newest(&store, &pool, 2).await,
        &bob,
        action::KEY_ROLE_CHANGED,
        Some("acme"),
        &id,
        json!({ "name": "dash", "old_role": "viewer", "new_role": "operator" }),
    );

    store.revoke(created.id, &alice()).await.expect("revoke");
    check(
        &newest(&store, &pool, 3).await,
        &alice(),
        action::KEY_REVOKED,
        Some("acme"),
        &id,
        json!({ "name": "dash", "role": "operator" }),
    );
    // Revoking again changes nothing, so records nothing.
    store.revoke(created.id, &alice()).await.expect("no-op");
    assert_eq!(count(&pool).await, 3);

    // Replicas starting together register the bootstrap key once, and record it once.
    let bootstrap = SecretString::from(format!("keel_{}", "B".repeat(40)));
    let serve = Actor::system("keel-serve");
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let (store, key, serve) = (store.clone(), bootstrap.clone(), serve.clone());
            tokio::spawn(async move {
                store
                    .ensure_key(&key, "system", Role::Admin, "bootstrap-admin", &serve)
                    .await
            })
        })
        .collect();
    let mut ids = Vec::new();
    for task in tasks {
        ids.push(task.await.expect("task").expect("ensure_key"));
    }
    check(
        &newest(&store, &pool, 4).await,
        &serve,
        action::BOOTSTRAP_KEY_REGISTERED,
        Some("system"),
        &ids[0].to_string(),
        json!({
            "name": "bootstrap-admin", "role": "admin",
            "prefix": &bootstrap.expose_secret()[..12],
        }),
    );

    // An action performed elsewhere, as the registry's rotation records it.
    let details = json!({ "rows_reencrypted": 3 });
    store
        .record(
            &alice(),
            action::ENCRYPTION_KEY_ROTATED,
            None,
            "k2",
            details.clone(),
        )
        .await
        .expect("record");
    check(
        &newest(&store, &pool, 5).await,
        &alice(),
        action::ENCRYPTION_KEY_ROTATED,
        None,
        "k2",
        details,
    );

    // Every column of every row, as text: no key, no secret part of one, no hash.
    let rows: Vec<String> = sqlx::query_scalar("SELECT t::text FROM auth.audit_log t")
        .fetch_all(&pool)
        .await
        .expect("dump");
    for key in [created.key.expose_secret(), bootstrap.expose_secret()] {
        let hash = hex_hash(key);
        for row in &rows {
            assert!(!row.contains(&key[12..]), "key in the audit log: {row}");
            assert!(!row.contains(&hash), "hash in the audit log: {row}");
        }
    }

    let all = store.audit_log(100).await.expect("audit log");
    let actions: Vec<&str> = all.iter().map(|e| e.action.as_str()).collect();
    assert_eq!(
        actions,
        [
            action::ENCRYPTION_KEY_ROTATED,
            action::BOOTSTRAP_KEY_REGISTERED,
            action::KEY_REVOKED,
            action::KEY_ROLE_CHANGED,
            action::KEY_CREATED,
        ],
        "newest first"
    );
    assert_eq!(store.audit_log(2).await.expect("limited").len(), 2);
    assert!(store.audit_log(-1).await.expect("negative").is_empty());
}

#[tokio::test]
async fn failed_actions_write_no_row() {
    let (store, pool) = store(Duration::ZERO).await;
    let created = store
        .create_key(new_key("acme", Role::Viewer, "ci"), &alice())
        .await
        .expect("create");
    assert_eq!(count(&pool).await, 1);

    let missing = Uuid::now_v7();
    let err = store.revoke(missing, &alice()).await.expect_err("unknown");
    assert!(
        matches!(err, AuthError::NotFound(id) if id == missing),
        "{err}"
    );
    let err = store
        .create_key(new_key("acme", Role::Admin, "ci"), &alice())
        .await
        .expect_err("duplicate name");
    assert!(matches!(err, AuthError::NameTaken { .. }), "{err}");
    let err = Scope::tenant("Acme").expect_err("bad tenant");
    assert!(matches!(err, AuthError::InvalidTenant(_)), "{err}");
    let err = store
        .change_role(missing, Role::Admin, &alice())
        .await
        .expect_err("unknown");
    assert!(matches!(err, AuthError::NotFound(_)), "{err}");
    // Asking for the role the key has is not a change.
    store
        .change_role(created.id, Role::Viewer, &alice())
        .await
        .expect("same role");

    let bootstrap = SecretString::from(format!("keel_{}", "C".repeat(40)));
    store
        .ensure_key(&bootstrap, "system", Role::Admin, "boot", &alice())
        .await
        .expect("register");
    store
        .ensure_key(&bootstrap, "system", Role::Admin, "boot", &alice())
        .await
        .expect("again");
    let err = store
        .ensure_key(&bootstrap, "system", Role::Viewer, "boot", &alice())
        .await
        .expect_err("other role");
    assert!(matches!(err, AuthError::KeyConflict { .. }), "{err}");
    assert_eq!(count(&pool).await, 2, "only the first registration");

    for (action, details) in [
        ("created", json!({})),
        ("Key.Created", json!({})),
        ("custom.thing", json!("not an object")),
        ("custom.thing", json!({ "oops": bootstrap.expose_secret() })),
    ] {
        let err = store
            .record(&alice(), action, None, "s", details)
            .await
            .expect_err(action);
        assert!(matches!(err, AuthError::InvalidAuditRecord(_)), "{err}");
        assert!(!err.to_string().contains(&bootstrap.expose_secret()[12..]));
    }

    store.revoke(created.id, &alice()).await.expect("revoke");
    assert_eq!(count(&pool).await, 3);
    let err = store
        .change_role(created.id, Role::Admin, &alice())
        .await
        .expect_err("revoked");
    assert_eq!(
        err.to_string(),
        format!(
            "API key {} is revoked; create a new key instead",
            created.id
        )
    );
    assert_eq!(count(&pool).await, 3);
}

#[tokio::test]
async fn a_change_that_cannot_be_audited_does_not_happen() {
    let (store, pool) = store(Duration::ZERO).await;
    let created = store
        .create_key(new_key("acme", Role::Viewer, "ci"), &alice())
        .await
        .expect("create");
    // From now on every audit insert fails, as a full disk or a bug would make it.
    sqlx::query(
        "ALTER TABLE auth.audit_log ADD CONSTRAINT refuse_all CHECK (action = 'never.this') NOT VALID",
    )
    .execute(&pool)
    .await
    .expect("break the audit log");

    let err = store
        .create_key(new_key("acme", Role::Admin, "root"), &alice())
        .await
        .expect_err("unaudited create");
    assert!(matches!(err, AuthError::Database(_)), "{err}");
    assert_eq!(store.list(None).await.expect("list").len(), 1);

    store
        .change_role(created.id, Role::Admin, &alice())
        .await
        .expect_err("unaudited role change");
    store
        .revoke(created.id, &alice())
        .await
        .expect_err("unaudited revocation");
    let bootstrap = SecretString::from(format!("keel_{}", "D".repeat(40)));
    store
        .ensure_key(&bootstrap, "system", Role::Admin, "boot", &alice())
        .await
        .expect_err("unaudited registration");

    let keys = store.list(None).await.expect("list");
    assert_eq!(keys.len(), 1);
    assert_eq!((keys[0].role, keys[0].revoked_at), (Role::Viewer, None));
    let principal = store
        .authenticate(created.key.expose_secret())
        .await
        .expect("still valid");
    assert_eq!(principal.role, Role::Viewer);
    assert_eq!(count(&pool).await, 1);
}

#[tokio::test]
async fn a_role_change_applies_on_the_next_call() {
    // A long TTL: the change must not wait for the cached entry to go stale.
    let (store, _pool) = store(Duration::from_secs(60)).await;
    let created = store
        .create_key(new_key("acme", Role::Viewer, "dash"), &alice())
        .await
        .expect("create");
    let key = created.key.expose_secret();
    let principal = store.authenticate(key).await.expect("cached as viewer");
    assert_eq!(principal.role, Role::Viewer);

    let info = store
        .change_role(created.id, Role::Operator, &alice())
        .await
        .expect("change role");
    assert_eq!(
        (
            info.id,
            info.scope.to_string().as_str(),
            info.name.as_str(),
            info.role
        ),
        (created.id, "tenant acme", "dash", Role::Operator)
    );
    let principal = store.authenticate(key).await.expect("authenticate");
    assert_eq!(
        (principal.key_id, principal.role),
        (created.id, Role::Operator)
    );
    assert_eq!(
        store
            .list(Some(&Scope::tenant("acme").expect("valid tenant")))
            .await
            .expect("list")[0]
            .role,
        Role::Operator
    );

    store.revoke(created.id, &alice()).await.expect("revoke");
    assert!(matches!(
        store.authenticate(key).await,
        Err(AuthError::Revoked)
    ));
}
