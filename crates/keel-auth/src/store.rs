use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use secrecy::{ExposeSecret as _, SecretString};
use serde_json::json;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgListener, PgNotification};
use sqlx::{PgConnection, PgPool};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::audit::{Record, action};
use crate::key::{self, KeyHash};
use crate::{Actor, AuditEntry, AuthError, Principal, Role, Scope, Tenant};

static MIGRATOR: Migrator = sqlx::migrate!("./migrations");
const SCHEMA: &str = "auth";

/// The cache TTL services use: short enough that a revocation bites within
/// seconds, long enough that a busy client costs one lookup per key every few seconds.
pub const DEFAULT_CACHE_TTL: Duration = Duration::from_secs(5);

/// Past this many cached keys the cache is emptied rather than evicted piecemeal:
/// entries live only a few seconds anyway, and an attacker cannot fill it because
/// only keys that authenticated are cached.
const CACHE_CAPACITY: usize = 10_000;

/// The channel on which [`KeyStore::revoke`] and [`KeyStore::change_role`] announce the
/// id of the key they changed, and [`KeyStore::watch_changes`] listens.
const CHANGES_CHANNEL: &str = "keel_auth_keys";
/// First wait before listening again after the listener failed; doubled per failure.
const LISTEN_BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest wait between attempts to listen again.
const LISTEN_BACKOFF_MAX: Duration = Duration::from_secs(10);

const NAME_MAX_CHARS: usize = 100;
/// The partial unique index on (tenant, name) among active tenant keys, see the migrations.
const ACTIVE_NAME_INDEX: &str = "api_keys_active_name";
/// The partial unique index on name among active fleet keys (0003_fleet_keys).
const ACTIVE_FLEET_NAME_INDEX: &str = "api_keys_active_fleet_name";
/// The CHECK constraint that gives fleet keys the service role only (0003_fleet_keys).
const FLEET_SERVICE_ONLY: &str = "api_keys_fleet_service_only";

/// A key to create with [`KeyStore::create_key`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewKey {
    /// Whose data the key reaches: one tenant, or the fleet (then `role` must be
    /// [`Role::Service`]).
    pub scope: Scope,
    /// What the key may do.
    pub role: Role,
    /// A label unique among the scope's active keys, e.g. `"ci-deploy"`; for a fleet
    /// key, the identity its client certificate must name under mutual TLS.
    pub name: String,
    /// When the key stops working; `None` for never.
    pub expires_at: Option<DateTime<Utc>>,
}

impl NewKey {
    /// A key of `tenant` with `role`, never expiring.
    pub fn tenant(tenant: Tenant, role: Role, name: impl Into<String>) -> Self {
        NewKey {
            scope: Scope::Tenant(tenant),
            role,
            name: name.into(),
            expires_at: None,
        }
    }

    /// A fleet key (role `service`) for one of Keel's own services, never expiring.
    pub fn fleet(name: impl Into<String>) -> Self {
        NewKey {
            scope: Scope::Fleet,
            role: Role::Service,
            name: name.into(),
            expires_at: None,
        }
    }
}

/// A freshly created key. This is the only time the clear key exists: hand it to
/// its user and drop it.
#[derive(Debug)]
pub struct CreatedKey {
    /// The key's id, used to revoke it.
    pub id: Uuid,
    /// The clear key, `keel_…`.
    pub key: SecretString,
    /// The key's first 12 characters, shown in listings.
    pub prefix: String,
    /// Whose data the key reaches.
    pub scope: Scope,
    /// What the key may do.
    pub role: Role,
    /// The key's label.
    pub name: String,
}

/// A stored key as listings show it: never the key or its hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyInfo {
    /// The key's id.
    pub id: Uuid,
    /// Whose data the key reaches.
    pub scope: Scope,
    /// What the key may do.
    pub role: Role,
    /// The key's label.
    pub name: String,
    /// The key's first 12 characters.
    pub prefix: String,
    /// When the key was created.
    pub created_at: DateTime<Utc>,
    /// When the key stops (or stopped) working, if ever.
    pub expires_at: Option<DateTime<Utc>>,
    /// When the key was revoked, if it was.
    pub revoked_at: Option<DateTime<Utc>>,
}

/// API keys in the `auth` schema, with a short-lived cache of successful lookups.
///
/// Cloning is cheap and clones share the cache.
///
/// **A revoked key fails on its next call, on every replica**: [`KeyStore::revoke`]
/// drops the key from this process's cache at once and, at commit, notifies every
/// replica whose [`KeyStore::watch_changes`] runs; they drop it as soon as the
/// notification arrives. The same holds for [`KeyStore::change_role`]. The cache TTL
/// remains the bound only while a replica cannot listen (database unreachable), or
/// on a replica that does not run `watch_changes` at all.
///
/// **Every change is audited atomically**: each method that changes a
/// key writes one row to `auth.audit_log` in the transaction that changes the key,
/// so a change is never without its record and a failed change leaves none.
#[derive(Clone)]
pub struct KeyStore {
    pool: PgPool,
    cache: Arc<Cache>,
    /// Read by [`AuthLayer::new`](crate::AuthLayer::new); see
    /// [`KeyStore::require_client_cert_for_service_keys`].
    pub(crate) require_client_cert_for_service_keys: bool,
    /// Read by [`AuthLayer::new`](crate::AuthLayer::new); see [`KeyStore::mutual_tls`].
    pub(crate) mutual_tls: bool,
}

impl fmt::Debug for KeyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyStore")
            .field("cache_ttl", &self.cache.ttl)
            .field(
                "require_client_cert_for_service_keys",
                &self.require_client_cert_for_service_keys,
            )
            .field("mutual_tls", &self.mutual_tls)
            .finish_non_exhaustive()
    }
}

/// A successful authentication: the caller, plus what only the layer needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Authenticated {
    pub(crate) principal: Principal,
    /// The key's name as created, which a client certificate must name for a service key.
    pub(crate) name: String,
}

impl KeyStore {
    /// Creates the `auth` schema if needed and applies this crate's migrations in it.
    pub async fn migrate(pool: &PgPool) -> Result<(), AuthError> {
        keel_store::migrate(pool, SCHEMA, &MIGRATOR).await?;
        Ok(())
    }

    /// A store on `pool` that caches successful authentications for `cache_ttl`
    /// ([`DEFAULT_CACHE_TTL`] in services); zero disables the cache.
    pub fn new(pool: PgPool, cache_ttl: Duration) -> Self {
        KeyStore {
            pool,
            cache: Arc::new(Cache::new(cache_ttl)),
            require_client_cert_for_service_keys: false,
            mutual_tls: false,
        }
    }

    /// Say `on` when the listeners verify client certificates (mutual TLS): every
    /// [`AuthLayer`](crate::AuthLayer) built from this store then refuses a fleet key
    /// unless the call came with a verified client certificate naming the key, so a
    /// leaked fleet key, which reaches every tenant, is useless on its own. Off by default.
    pub fn mutual_tls(mut self, on: bool) -> Self {
        self.mutual_tls = on;
        self
    }

    /// With `required`, every [`AuthLayer`](crate::AuthLayer) built from this store
    /// refuses a `service` key unless the call came over mutual TLS with a verified
    /// client certificate naming the key (its name as created, e.g. `collector`), so
    /// a leaked service key is useless without the service's certificate. Off by default.
    ///
    /// A setting of the store rather than only of the layer, because services build
    /// their layer themselves from the store they are given.
    pub fn require_client_cert_for_service_keys(mut self, required: bool) -> Self {
        self.require_client_cert_for_service_keys = required;
        self
    }

    /// Generates a new random key, stores its hash and records `key.created` for `actor`.
    pub async fn create_key(&self, new: NewKey, actor: &Actor) -> Result<CreatedKey, AuthError> {
        check_scope_role(&new.scope, new.role)?;
        validate_name(&new.name)?;
        if let Some(expires_at) = new.expires_at
            && expires_at <= Utc::now()
        {
            return Err(AuthError::ExpiryInPast(expires_at));
        }
        let key = key::generate();
        let hash = key::hash(key.expose_secret());
        let prefix = key::display_prefix(key.expose_secret()).to_owned();
        let id = Uuid::now_v7();
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO auth.api_keys (id, tenant, role, name, key_hash, key_prefix, expires_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(id)
        .bind(tenant_of(&new.scope))
        .bind(new.role.as_str())
        .bind(&new.name)
        .bind(&hash[..])
        .bind(&prefix)
        .bind(new.expires_at)
        .execute(&mut *tx)
        .await
        .map_err(|e| insert_error(e, &new.scope, &new.name, new.role))?;
        Record {
            actor,
            action: action::KEY_CREATED,
            tenant: tenant_of(&new.scope),
            subject: &id.to_string(),
            details: json!({
                "name": new.name,
                "role": new.role.as_str(),
                "prefix": prefix,
                "expires_at": new.expires_at,
            }),
        }
        .insert(&mut tx)
        .await?;
        tx.commit().await?;
        tracing::info!(key_id = %id, scope = %new.scope, role = %new.role, key_prefix = %prefix, %actor, "created API key");
        Ok(CreatedKey {
            id,
            key,
            prefix,
            scope: new.scope,
            role: new.role,
            name: new.name,
        })
    }

    /// Registers a key that was generated outside Keel (the bootstrap admin key from
    /// an environment variable or a Kubernetes Secret), and returns its id.
    ///
    /// Idempotent: registering the same key again returns the existing id, so every
    /// replica can call this at start. Fails if the key is already registered with
    /// another tenant or role, or was revoked; the name of an existing key is left as is.
    /// Only the call that inserts the key records `bootstrap_key.registered` for `actor`.
    pub async fn ensure_key(
        &self,
        key: &SecretString,
        tenant: &str,
        role: Role,
        name: &str,
        actor: &Actor,
    ) -> Result<Uuid, AuthError> {
        let key = key.expose_secret();
        if !key::is_well_formed(key) {
            return Err(AuthError::MalformedKey);
        }
        let scope = Scope::tenant(tenant)?;
        validate_name(name)?;
        let hash = key::hash(key);
        let prefix = key::display_prefix(key);
        let mut tx = self.pool.begin().await?;
        let inserted: Option<Uuid> = sqlx::query_scalar(
            "INSERT INTO auth.api_keys (id, tenant, role, name, key_hash, key_prefix) \
             VALUES ($1, $2, $3, $4, $5, $6) \
             ON CONFLICT (key_hash) DO NOTHING RETURNING id",
        )
        .bind(Uuid::now_v7())
        .bind(tenant)
        .bind(role.as_str())
        .bind(name)
        .bind(&hash[..])
        .bind(prefix)
        .fetch_optional(&mut *tx)
        .await
        .map_err(|e| insert_error(e, &scope, name, role))?;
        if let Some(id) = inserted {
            Record {
                actor,
                action: action::BOOTSTRAP_KEY_REGISTERED,
                tenant: Some(tenant),
                subject: &id.to_string(),
                details: json!({ "name": name, "role": role.as_str(), "prefix": prefix }),
            }
            .insert(&mut tx)
            .await?;
            tx.commit().await?;
            tracing::info!(key_id = %id, tenant, %role, key_prefix = prefix, %actor, "registered API key");
            return Ok(id);
        }
        // Nothing was written; ending the transaction here keeps the read below simple.
        tx.rollback().await?;
        // The key exists (ON CONFLICT waited for any concurrent insert to commit, so
        // this read sees it); it must be the same grant, not a different one.
        let row: KeyRow = sqlx::query_as(KeyRow::SELECT_BY_HASH)
            .bind(&hash[..])
            .fetch_one(&self.pool)
            .await?;
        let existing_role = parse_role(&row.role)?;
        let existing_scope = parse_scope(row.tenant)?;
        if existing_scope != scope || existing_role != role {
            return Err(AuthError::KeyConflict {
                scope: existing_scope,
                role: existing_role,
            });
        }
        if row.revoked_at.is_some() {
            return Err(AuthError::Revoked);
        }
        Ok(row.id)
    }

    /// Finds who `key` belongs to.
    ///
    /// Malformed keys are refused without touching the database. Successful results
    /// are cached for the store's TTL (never past the key's expiry); a key revoked or
    /// re-roled on another replica leaves this cache when [`KeyStore::watch_changes`]
    /// hears of it, or, if nothing runs it, once its entry is older than the TTL.
    pub async fn authenticate(&self, key: &str) -> Result<Principal, AuthError> {
        self.authenticate_key(key)
            .await
            .map(|found| found.principal)
    }

    /// [`KeyStore::authenticate`], with the key's name.
    pub(crate) async fn authenticate_key(&self, key: &str) -> Result<Authenticated, AuthError> {
        if !key::is_well_formed(key) {
            return Err(AuthError::MalformedKey);
        }
        let hash = key::hash(key);
        if let Some(found) = self.cache.get(&hash) {
            return Ok(found);
        }
        // Taken before the lookup: an eviction while it runs means the row read may
        // already be stale, and then the answer is not cached.
        let generation = self.cache.generation();
        let row: Option<KeyRow> = sqlx::query_as(KeyRow::SELECT_BY_HASH)
            .bind(&hash[..])
            .fetch_optional(&self.pool)
            .await?;
        let Some(row) = row else {
            return Err(AuthError::UnknownKey);
        };
        if row.revoked_at.is_some() {
            return Err(AuthError::Revoked);
        }
        if row.expired {
            return Err(AuthError::Expired);
        }
        let found = Authenticated {
            principal: Principal {
                key_id: row.id,
                scope: parse_scope(row.tenant)?,
                role: parse_role(&row.role)?,
                peer_identity: None,
            },
            name: row.name,
        };
        self.cache
            .insert(hash, found.clone(), row.expires_at, generation);
        Ok(found)
    }

    /// Drops from this store's cache every key that any replica revokes or gives
    /// another role, as soon as the change commits, until `shutdown` is cancelled.
    /// Services run it for as long as they serve.
    ///
    /// It LISTENs on a connection of its own from the pool. Whenever that connection
    /// fails, a notification may have been missed, so the whole cache is emptied, and
    /// emptied again once listening resumes (attempts back off from 100 ms to 10 s).
    /// While the database is unreachable nothing can be heard, and the cache TTL is
    /// again what bounds how long a revoked key keeps working.
    pub async fn watch_changes(&self, shutdown: CancellationToken) {
        let mut backoff = LISTEN_BACKOFF_MIN;
        loop {
            let listening = tokio::select! {
                _ = shutdown.cancelled() => return,
                listening = self.listen() => listening,
            };
            match listening {
                Ok(mut listener) => {
                    // Changes committed before LISTEN took effect were never announced
                    // to this listener.
                    self.cache.clear();
                    tracing::debug!(channel = CHANGES_CHANNEL, "listening for API key changes");
                    let since = Instant::now();
                    let error = tokio::select! {
                        _ = shutdown.cancelled() => return,
                        error = self.evict_changed(&mut listener) => error,
                    };
                    // A connection that served a while failed for a new reason: retry soon.
                    if since.elapsed() >= LISTEN_BACKOFF_MAX {
                        backoff = LISTEN_BACKOFF_MIN;
                    }
                    tracing::warn!(%error, retry_in = ?backoff, "lost the API key change listener; emptied the auth cache");
                }
                Err(error) => {
                    tracing::warn!(%error, retry_in = ?backoff, "cannot listen for API key changes; emptied the auth cache");
                }
            }
            self.cache.clear();
            if self.pool.is_closed() {
                return;
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(LISTEN_BACKOFF_MAX);
        }
    }

    async fn listen(&self) -> Result<PgListener, sqlx::Error> {
        let mut listener = PgListener::connect_with(&self.pool).await?;
        // A lost connection must surface here, where the cache is emptied, instead of
        // being replaced behind our back with the notifications in between missed.
        listener.eager_reconnect(false);
        listener.listen(CHANGES_CHANNEL).await?;
        Ok(listener)
    }

    /// Evicts each announced key until the listener fails, and returns why it failed.
    async fn evict_changed(&self, listener: &mut PgListener) -> sqlx::Error {
        loop {
            match listener.try_recv().await {
                Ok(Some(notification)) => self.evict(&notification),
                // `try_recv` reports a dropped connection as no notification.
                Ok(None) => {
                    return sqlx::Error::Io(std::io::Error::new(
                        std::io::ErrorKind::ConnectionAborted,
                        "connection to the database lost",
                    ));
                }
                Err(error) => return error,
            }
        }
    }

    fn evict(&self, notification: &PgNotification) {
        match notification.payload().parse::<Uuid>() {
            Ok(key_id) => {
                self.cache.forget_key(key_id);
                tracing::debug!(%key_id, "evicted a changed API key from the auth cache");
            }
            Err(_) => {
                // Not sent by this crate; whatever changed, forgetting everything is safe.
                self.cache.clear();
                tracing::warn!(
                    channel = CHANGES_CHANNEL,
                    payload = notification.payload(),
                    "unexpected API key change notification; emptied the auth cache"
                );
            }
        }
    }

    /// Revokes a key and records `key.revoked` for `actor`. The key stops working
    /// here at once, and on other replicas as soon as their
    /// [`KeyStore::watch_changes`] hears of it (see [`KeyStore`]).
    ///
    /// Revoking a revoked key is a no-op and records nothing, since nothing changed.
    pub async fn revoke(&self, id: Uuid, actor: &Actor) -> Result<(), AuthError> {
        let mut tx = self.pool.begin().await?;
        // `revoked_at IS NULL` makes a concurrent second revocation wait for the row
        // lock and then match nothing, so each key is recorded as revoked once.
        let revoked: Option<(Option<String>, String, String)> = sqlx::query_as(
            "UPDATE auth.api_keys SET revoked_at = now() \
             WHERE id = $1 AND revoked_at IS NULL RETURNING tenant, role, name",
        )
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some((tenant, role, name)) = revoked else {
            let exists: bool =
                sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM auth.api_keys WHERE id = $1)")
                    .bind(id)
                    .fetch_one(&mut *tx)
                    .await?;
            // Revoked elsewhere but maybe still cached here: this store stops accepting it too.
            self.cache.forget_key(id);
            return if exists {
                Ok(())
            } else {
                Err(AuthError::NotFound(id))
            };
        };
        Record {
            actor,
            action: action::KEY_REVOKED,
            tenant: tenant.as_deref(),
            subject: &id.to_string(),
            details: json!({ "name": name, "role": role }),
        }
        .insert(&mut tx)
        .await?;
        announce_change(&mut tx, id).await?;
        tx.commit().await?;
        // After the commit: forgetting earlier would let a concurrent lookup cache the
        // still-active key again.
        self.cache.forget_key(id);
        tracing::info!(key_id = %id, tenant = tenant.as_deref().unwrap_or("(fleet)"), %actor, "revoked API key");
        Ok(())
    }

    /// Gives a key another role and records `key.role_changed` for `actor`. Like a
    /// revocation, the new role applies here at once and on other replicas as soon
    /// as their [`KeyStore::watch_changes`] hears of it.
    ///
    /// Revoked keys are refused ([`AuthError::KeyRevoked`]); asking for the role the
    /// key already has changes and records nothing.
    pub async fn change_role(
        &self,
        id: Uuid,
        role: Role,
        actor: &Actor,
    ) -> Result<KeyInfo, AuthError> {
        let mut tx = self.pool.begin().await?;
        // FOR UPDATE: a concurrent change or revocation waits, so old_role is exact.
        let row: Option<InfoRow> = sqlx::query_as(
            "SELECT id, tenant, role, name, key_prefix, created_at, expires_at, revoked_at \
             FROM auth.api_keys WHERE id = $1 FOR UPDATE",
        )
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        let info = row.ok_or(AuthError::NotFound(id))?.into_info()?;
        if info.revoked_at.is_some() {
            return Err(AuthError::KeyRevoked(id));
        }
        if info.role == role {
            return Ok(info);
        }
        check_scope_role(&info.scope, role)?;
        sqlx::query("UPDATE auth.api_keys SET role = $2 WHERE id = $1")
            .bind(id)
            .bind(role.as_str())
            .execute(&mut *tx)
            .await
            .map_err(|e| insert_error(e, &info.scope, &info.name, role))?;
        Record {
            actor,
            action: action::KEY_ROLE_CHANGED,
            tenant: tenant_of(&info.scope),
            subject: &id.to_string(),
            details: json!({
                "name": info.name,
                "old_role": info.role.as_str(),
                "new_role": role.as_str(),
            }),
        }
        .insert(&mut tx)
        .await?;
        announce_change(&mut tx, id).await?;
        tx.commit().await?;
        self.cache.forget_key(id);
        tracing::info!(key_id = %id, scope = %info.scope, old_role = %info.role, new_role = %role, %actor, "changed API key role");
        Ok(KeyInfo { role, ..info })
    }

    /// Records an action Keel performed outside this store, such as re-encrypting
    /// credentials under a new key (`encryption_key.rotated`).
    ///
    /// `action` must be dotted lowercase words (see [`action`](crate::action) for
    /// Keel's own), `subject` the id of what was acted on, and `details` a JSON
    /// object. Details must never carry a secret: one holding an API key is refused.
    pub async fn record(
        &self,
        actor: &Actor,
        action: &str,
        tenant: Option<&str>,
        subject: &str,
        details: serde_json::Value,
    ) -> Result<(), AuthError> {
        let mut conn = self.pool.acquire().await?;
        Record {
            actor,
            action,
            tenant,
            subject,
            details,
        }
        .insert(&mut conn)
        .await
    }

    /// The newest `limit` entries of the audit log, newest first (none for a limit
    /// below 1).
    pub async fn audit_log(&self, limit: i64) -> Result<Vec<AuditEntry>, AuthError> {
        let entries = sqlx::query_as(
            "SELECT id, at, actor, action, tenant, subject, details FROM auth.audit_log \
             ORDER BY at DESC, id DESC LIMIT $1",
        )
        // PostgreSQL rejects a negative LIMIT.
        .bind(limit.max(0))
        .fetch_all(&self.pool)
        .await?;
        Ok(entries)
    }

    /// Lists keys, revoked and expired ones included: those of one scope (a tenant's,
    /// or the fleet keys), or all with `None`. Fleet keys come first.
    pub async fn list(&self, scope: Option<&Scope>) -> Result<Vec<KeyInfo>, AuthError> {
        let (all, tenant) = match scope {
            None => (true, None),
            Some(scope) => (false, tenant_of(scope)),
        };
        let rows: Vec<InfoRow> = sqlx::query_as(
            "SELECT id, tenant, role, name, key_prefix, created_at, expires_at, revoked_at \
             FROM auth.api_keys WHERE $1 OR tenant IS NOT DISTINCT FROM $2 \
             ORDER BY tenant NULLS FIRST, created_at, id",
        )
        .bind(all)
        .bind(tenant)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(InfoRow::into_info).collect()
    }
}

#[derive(sqlx::FromRow)]
struct KeyRow {
    id: Uuid,
    /// NULL for a fleet key.
    tenant: Option<String>,
    role: String,
    name: String,
    expires_at: Option<DateTime<Utc>>,
    revoked_at: Option<DateTime<Utc>>,
    /// Judged by the database clock, which all replicas share.
    expired: bool,
}

impl KeyRow {
    const SELECT_BY_HASH: &str = "SELECT id, tenant, role, name, expires_at, revoked_at, \
         coalesce(expires_at <= now(), false) AS expired \
         FROM auth.api_keys WHERE key_hash = $1";
}

#[derive(sqlx::FromRow)]
struct InfoRow {
    id: Uuid,
    tenant: Option<String>,
    role: String,
    name: String,
    key_prefix: String,
    created_at: DateTime<Utc>,
    expires_at: Option<DateTime<Utc>>,
    revoked_at: Option<DateTime<Utc>>,
}

impl InfoRow {
    fn into_info(self) -> Result<KeyInfo, AuthError> {
        Ok(KeyInfo {
            id: self.id,
            role: parse_role(&self.role)?,
            scope: parse_scope(self.tenant)?,
            name: self.name,
            prefix: self.key_prefix,
            created_at: self.created_at,
            expires_at: self.expires_at,
            revoked_at: self.revoked_at,
        })
    }
}

/// Tells every replica's [`KeyStore::watch_changes`] that key `id` changed. PostgreSQL
/// delivers the notification when the transaction commits, and never if it rolls back.
async fn announce_change(conn: &mut PgConnection, id: Uuid) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(CHANGES_CHANNEL)
        .bind(id.to_string())
        .execute(conn)
        .await?;
    Ok(())
}

fn validate_name(name: &str) -> Result<(), AuthError> {
    let valid = !name.trim().is_empty()
        && name.chars().count() <= NAME_MAX_CHARS
        && !name.chars().any(char::is_control);
    if valid {
        Ok(())
    } else {
        Err(AuthError::InvalidName(name.to_owned()))
    }
}

/// The CHECK constraint admits only known roles, so a failure here means the
/// schema and this code disagree.
fn parse_role(role: &str) -> Result<Role, AuthError> {
    role.parse()
        .map_err(|e| AuthError::Database(sqlx::Error::Decode(Box::new(e))))
}

/// The error to report for a failed INSERT or UPDATE of a key of `scope` named `name`
/// with `role`.
fn insert_error(err: sqlx::Error, scope: &Scope, name: &str, role: Role) -> AuthError {
    match keel_store::violated_constraint(&err) {
        Some(ACTIVE_NAME_INDEX | ACTIVE_FLEET_NAME_INDEX) => AuthError::NameTaken {
            scope: scope.clone(),
            name: name.to_owned(),
        },
        // Checked before every write; the constraint catches what the code missed.
        Some(FLEET_SERVICE_ONLY) => AuthError::FleetRoleNotService(role),
        _ => AuthError::Database(err),
    }
}

/// Refuses a fleet key with any role but service, before the database would.
fn check_scope_role(scope: &Scope, role: Role) -> Result<(), AuthError> {
    if scope.is_fleet() && role != Role::Service {
        return Err(AuthError::FleetRoleNotService(role));
    }
    Ok(())
}

/// The `tenant` column for `scope`: NULL for the fleet.
fn tenant_of(scope: &Scope) -> Option<&str> {
    scope.tenant_name().map(Tenant::as_str)
}

/// The scope of a stored key from its `tenant` column. Only valid tenants are ever
/// written, so an invalid one means the row was changed behind Keel's back.
fn parse_scope(tenant: Option<String>) -> Result<Scope, AuthError> {
    match tenant {
        None => Ok(Scope::Fleet),
        Some(tenant) => Tenant::new(tenant).map(Scope::Tenant).map_err(|e| {
            AuthError::Database(sqlx::Error::Decode(Box::new(std::io::Error::other(
                e.to_string(),
            ))))
        }),
    }
}

/// Successful authentications by key hash; the clear key is never kept.
struct Cache {
    ttl: Duration,
    state: Mutex<CacheState>,
}

#[derive(Default)]
struct CacheState {
    entries: HashMap<KeyHash, Cached>,
    /// Counts evictions, so that a lookup that overlapped one does not cache what it
    /// read before the change (see [`Cache::insert`]).
    generation: u64,
}

struct Cached {
    found: Authenticated,
    fresh_until: Instant,
    expires_at: Option<DateTime<Utc>>,
}

impl Cache {
    fn new(ttl: Duration) -> Self {
        Cache {
            ttl,
            state: Mutex::new(CacheState::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, CacheState> {
        // A panic while holding the lock cannot leave a half-written entry worth
        // distrusting: every entry is complete and checked for freshness on read.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn get(&self, hash: &KeyHash) -> Option<Authenticated> {
        let mut state = self.lock();
        let entry = state.entries.get(hash)?;
        if Instant::now() < entry.fresh_until && entry.expires_at.is_none_or(|t| t > Utc::now()) {
            return Some(entry.found.clone());
        }
        state.entries.remove(hash);
        None
    }

    /// The generation to pass to [`Cache::insert`] for a lookup starting now.
    fn generation(&self) -> u64 {
        self.lock().generation
    }

    /// Caches `found` unless an eviction happened since `generation` was read: the
    /// lookup may then have read the key just before it was revoked, and caching that
    /// would undo the eviction.
    fn insert(
        &self,
        hash: KeyHash,
        found: Authenticated,
        expires_at: Option<DateTime<Utc>>,
        generation: u64,
    ) {
        if self.ttl.is_zero() {
            return;
        }
        // A TTL too large for the clock is treated as "do not cache" rather than forever.
        let Some(fresh_until) = Instant::now().checked_add(self.ttl) else {
            return;
        };
        let mut state = self.lock();
        if state.generation != generation {
            return;
        }
        if state.entries.len() >= CACHE_CAPACITY && !state.entries.contains_key(&hash) {
            state.entries.clear();
        }
        state.entries.insert(
            hash,
            Cached {
                found,
                fresh_until,
                expires_at,
            },
        );
    }

    /// Evicts key `id`. A scan rather than an index by id: the cache is bounded and
    /// keys change rarely, so each change costs at most [`CACHE_CAPACITY`] comparisons.
    fn forget_key(&self, id: Uuid) {
        let mut state = self.lock();
        state.generation += 1;
        state
            .entries
            .retain(|_, entry| entry.found.principal.key_id != id);
    }

    fn clear(&self) {
        let mut state = self.lock();
        state.generation += 1;
        state.entries.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(n: u128) -> Authenticated {
        Authenticated {
            principal: Principal {
                key_id: Uuid::from_u128(n),
                scope: Scope::tenant("acme").expect("valid tenant"),
                role: Role::Viewer,
                peer_identity: None,
            },
            name: format!("key-{n}"),
        }
    }

    fn hash_of(n: u128) -> KeyHash {
        key::hash(&n.to_string())
    }

    /// Caches key `n` as a lookup that started now would.
    fn insert(cache: &Cache, n: u128, expires_at: Option<DateTime<Utc>>) {
        cache.insert(hash_of(n), found(n), expires_at, cache.generation());
    }

    #[test]
    fn cache_serves_fresh_entries_and_forgets_revoked_ones() {
        let cache = Cache::new(Duration::from_secs(60));
        insert(&cache, 1, None);
        insert(&cache, 2, None);
        assert_eq!(cache.get(&hash_of(1)), Some(found(1)));
        cache.forget_key(Uuid::from_u128(1));
        assert_eq!(cache.get(&hash_of(1)), None);
        assert_eq!(cache.get(&hash_of(2)), Some(found(2)));
        cache.clear();
        assert_eq!(cache.get(&hash_of(2)), None);
    }

    #[test]
    fn a_lookup_overlapping_an_eviction_is_not_cached() {
        let cache = Cache::new(Duration::from_secs(60));
        // The lookup reads the key, then the key is revoked and evicted before the
        // lookup caches what it read.
        let generation = cache.generation();
        cache.forget_key(Uuid::from_u128(1));
        cache.insert(hash_of(1), found(1), None, generation);
        assert_eq!(cache.get(&hash_of(1)), None);

        let generation = cache.generation();
        cache.clear();
        cache.insert(hash_of(1), found(1), None, generation);
        assert_eq!(cache.get(&hash_of(1)), None);

        // Lookups that start after the eviction are cached again.
        insert(&cache, 1, None);
        assert_eq!(cache.get(&hash_of(1)), Some(found(1)));
    }

    #[test]
    fn cache_never_outlives_the_key() {
        let cache = Cache::new(Duration::from_secs(60));
        insert(&cache, 1, Some(Utc::now() - chrono::Duration::seconds(1)));
        assert_eq!(cache.get(&hash_of(1)), None);
    }

    #[test]
    fn zero_ttl_disables_the_cache() {
        let cache = Cache::new(Duration::ZERO);
        insert(&cache, 1, None);
        assert_eq!(cache.get(&hash_of(1)), None);
    }

    #[test]
    fn full_cache_starts_over() {
        let cache = Cache::new(Duration::from_secs(60));
        for n in 0..CACHE_CAPACITY as u128 {
            insert(&cache, n, None);
        }
        assert_eq!(cache.lock().entries.len(), CACHE_CAPACITY);
        // Refreshing a cached key does not flush the others.
        insert(&cache, 0, None);
        assert_eq!(cache.lock().entries.len(), CACHE_CAPACITY);
        insert(&cache, u128::MAX, None);
        assert_eq!(cache.lock().entries.len(), 1);
    }

    #[test]
    fn key_names_are_short_printable_labels() {
        for good in ["ci", "bootstrap admin", "déploiement", &"n".repeat(100)] {
            assert!(validate_name(good).is_ok(), "{good:?}");
        }
        for bad in ["", "   ", "a\nb", "tab\t", &"n".repeat(101)] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
    }
}
