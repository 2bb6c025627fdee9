//! Two replicas on one real PostgreSQL: a key revoked or re-roled on one stops
//! working as such on the other long before the cache TTL, and a lost listener
//! empties the cache.

use std::time::{Duration, Instant};

use keel_auth::{Actor, AuthError, KeyStore, NewKey, Principal, Role};
use secrecy::{ExposeSecret as _, SecretString};
use sqlx::PgPool;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Long enough that only a notification (or an emptied cache) can explain a refusal.
const TTL: Duration = Duration::from_secs(60);
/// How long a change may take to reach the other replica in these tests.
const DEADLINE: Duration = Duration::from_secs(5);

/// Replica B, which watches for changes until dropped.
struct Watching {
    store: KeyStore,
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl Watching {
    fn start(store: KeyStore) -> Watching {
        let stop = CancellationToken::new();
        let task = tokio::spawn({
            let (store, stop) = (store.clone(), stop.clone());
            async move { store.watch_changes(stop).await }
        });
        Watching {
            store,
            stop,
            task: Some(task),
        }
    }

    async fn stop(mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            tokio::time::timeout(DEADLINE, task)
                .await
                .expect("watch_changes stops when cancelled")
                .expect("watch_changes does not panic");
        }
    }
}

impl Drop for Watching {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Replicas A and B, each with its own pool, on one fresh database, plus a pool for
/// looking behind their backs.
async fn replicas() -> (KeyStore, KeyStore, PgPool) {
    let env = keel_testkit::TestEnv::new();
    let db = env.database().await.expect("test database");
    let pool = db.pool().await.expect("pool");
    KeyStore::migrate(&pool).await.expect("migrate");
    let a = KeyStore::new(db.pool().await.expect("pool A"), TTL);
    let b = KeyStore::new(db.pool().await.expect("pool B"), TTL);
    (a, b, pool)
}

fn actor() -> Actor {
    Actor::system("test")
}

async fn create(store: &KeyStore, role: Role, name: &str) -> (Uuid, SecretString) {
    let new = NewKey {
        scope: keel_auth::Scope::tenant("acme").expect("valid tenant"),
        role,
        name: name.into(),
        expires_at: None,
    };
    let created = store.create_key(new, &actor()).await.expect("create key");
    (created.id, created.key)
}

/// Authenticates on `store` until `done` holds for the result, failing after [`DEADLINE`].
async fn eventually(
    store: &KeyStore,
    key: &SecretString,
    what: &str,
    done: impl Fn(&Result<Principal, AuthError>) -> bool,
) {
    let start = Instant::now();
    loop {
        let result = store.authenticate(key.expose_secret()).await;
        if done(&result) {
            return;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "{what}: still {result:?} after {DEADLINE:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the listener of this database is connected, and returns its backend pid.
async fn listener_pid(pool: &PgPool) -> i32 {
    let start = Instant::now();
    loop {
        let pid: Option<i32> = sqlx::query_scalar(
            "SELECT pid FROM pg_stat_activity \
             WHERE datname = current_database() AND query LIKE 'LISTEN%'",
        )
        .fetch_optional(pool)
        .await
        .expect("pg_stat_activity");
        if let Some(pid) = pid {
            return pid;
        }
        assert!(start.elapsed() < DEADLINE, "no listener after {DEADLINE:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_key_revoked_on_one_replica_is_refused_on_the_other() {
    let (a, b, pool) = replicas().await;
    let b = Watching::start(b);
    let (id, key) = create(&a, Role::Viewer, "dash").await;
    let (_, other) = create(&a, Role::Viewer, "other").await;
    listener_pid(&pool).await;
    b.store
        .authenticate(key.expose_secret())
        .await
        .expect("B caches the key");
    b.store
        .authenticate(other.expose_secret())
        .await
        .expect("B caches the other key");

    a.revoke(id, &actor()).await.expect("revoke on A");
    eventually(&b.store, &key, "revoked on A, asked B", |r| {
        matches!(r, Err(AuthError::Revoked))
    })
    .await;

    // Only the revoked key left B's cache: the other one is still served from it,
    // even with the row changed behind B's back (which notifies nobody).
    sqlx::query("UPDATE auth.api_keys SET role = 'admin' WHERE name = 'other'")
        .execute(&pool)
        .await
        .expect("change behind");
    let principal = b
        .store
        .authenticate(other.expose_secret())
        .await
        .expect("other key");
    assert_eq!(principal.role, Role::Viewer, "served from B's cache");
    b.stop().await;
}

#[tokio::test]
async fn a_role_changed_on_one_replica_applies_on_the_other() {
    let (a, b, pool) = replicas().await;
    let b = Watching::start(b);
    let (id, key) = create(&a, Role::Operator, "ci").await;
    listener_pid(&pool).await;
    let principal = b
        .store
        .authenticate(key.expose_secret())
        .await
        .expect("B caches the key");
    assert_eq!(principal.role, Role::Operator);

    a.change_role(id, Role::Viewer, &actor())
        .await
        .expect("change role on A");
    eventually(
        &b.store,
        &key,
        "re-roled on A, asked B",
        |r| matches!(r, Ok(p) if p.role == Role::Viewer),
    )
    .await;
    b.stop().await;
}

#[tokio::test]
async fn a_lost_listener_empties_the_cache() {
    let (a, b, pool) = replicas().await;
    let b = Watching::start(b);
    let (id, key) = create(&a, Role::Viewer, "dash").await;
    let first = listener_pid(&pool).await;
    b.store
        .authenticate(key.expose_secret())
        .await
        .expect("B caches the key");

    let terminated: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(first)
        .fetch_one(&pool)
        .await
        .expect("terminate the listener");
    assert!(terminated);
    // Revoked while B is not listening, and behind every store's back: no
    // notification exists that B could receive, now or after it reconnects.
    sqlx::query("UPDATE auth.api_keys SET revoked_at = now() WHERE id = $1")
        .bind(id)
        .execute(&pool)
        .await
        .expect("revoke behind");
    eventually(&b.store, &key, "revoked while B was deaf", |r| {
        matches!(r, Err(AuthError::Revoked))
    })
    .await;

    // B listens again, and notifications reach it as before.
    let start = Instant::now();
    while listener_pid(&pool).await == first {
        assert!(start.elapsed() < DEADLINE, "B never listened again");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (id, key) = create(&a, Role::Viewer, "dash").await;
    b.store
        .authenticate(key.expose_secret())
        .await
        .expect("B caches the new key");
    a.revoke(id, &actor()).await.expect("revoke on A");
    eventually(&b.store, &key, "revoked on A after B reconnected", |r| {
        matches!(r, Err(AuthError::Revoked))
    })
    .await;
    b.stop().await;
}

#[tokio::test]
async fn without_a_watcher_the_ttl_still_bounds_a_revocation_elsewhere() {
    // Short, so the test can wait it out; long enough that a loaded machine still makes the
    // second lookup within it.
    const SHORT_TTL: Duration = Duration::from_secs(3);
    let env = keel_testkit::TestEnv::new();
    let db = env.database().await.expect("test database");
    KeyStore::migrate(&db.pool().await.expect("pool"))
        .await
        .expect("migrate");
    let a = KeyStore::new(db.pool().await.expect("pool A"), TTL);
    // B does not watch for changes: only its cache TTL can end its trust in the key.
    let b = KeyStore::new(db.pool().await.expect("pool B"), SHORT_TTL);
    let (id, key) = create(&a, Role::Viewer, "dash").await;

    let before_lookup = Instant::now();
    b.authenticate(key.expose_secret())
        .await
        .expect("B caches the key");
    // The entry is fresh until between these two instants plus the TTL.
    let after_lookup = Instant::now();
    a.revoke(id, &actor()).await.expect("revoke on A");
    assert!(
        matches!(
            a.authenticate(key.expose_secret()).await,
            Err(AuthError::Revoked)
        ),
        "revoked in the store"
    );

    // Before the TTL: B still answers from its cache (a cache that was not used would refuse).
    let result = b.authenticate(key.expose_secret()).await;
    let checked_by = before_lookup.elapsed();
    assert!(
        checked_by < SHORT_TTL,
        "the machine took {checked_by:?} to get here, longer than the TTL of {SHORT_TTL:?}"
    );
    result.expect("cached within the TTL");

    // Once the TTL has passed: B looks the key up again and finds it revoked (a cache that
    // ignored its TTL would still accept it).
    tokio::time::sleep_until((after_lookup + SHORT_TTL + Duration::from_millis(100)).into()).await;
    assert!(
        matches!(
            b.authenticate(key.expose_secret()).await,
            Err(AuthError::Revoked)
        ),
        "still trusted after the TTL"
    );
}
