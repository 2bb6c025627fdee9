use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use secrecy::{ExposeSecret as _, SecretString};
use serde_json::json;
use sqlx::PgPool;
use sqlx::migrate::Migrator;
use uuid::Uuid;

use crate::audit::{Record, action};
use crate::key::{self, KeyHash};
use crate::{Actor, AuditEntry, AuthError, Principal, Role, validate_tenant};

static MIGRATOR: Migrator = sqlx::migrate!("./migrations");
const SCHEMA: &str = "auth";

/// The cache TTL services use: short enough that a revocation bites within
/// seconds, long enough that a busy client costs one lookup per key every few seconds.
pub const DEFAULT_CACHE_TTL: Duration = Duration::from_secs(5);

/// Past this many cached keys the cache is emptied rather than evicted piecemeal:
/// entries live only a few seconds anyway, and an attacker cannot fill it because
/// only keys that authenticated are cached.
const CACHE_CAPACITY: usize = 10_000;

const NAME_MAX_CHARS: usize = 100;
/// The partial unique index on (tenant, name) among active keys, see the migration.
const ACTIVE_NAME_INDEX: &str = "api_keys_active_name";

/// A key to create with [`KeyStore::create_key`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewKey {
    /// The tenant the key acts for.
    pub tenant: String,
    /// What the key may do.
    pub role: Role,
    /// A label unique among the tenant's active keys, e.g. `"ci-deploy"`.
    pub name: String,
    /// When the key stops working; `None` for never.
    pub expires_at: Option<DateTime<Utc>>,
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
    /// The tenant the key acts for.
    pub tenant: String,
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
    /// The tenant the key acts for.
    pub tenant: String,
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
/// **Revocation takes effect within the cache TTL**: [`KeyStore::revoke`] drops the
/// key from this process's cache at once, but other replicas keep accepting it
/// until their cached entry is older than the TTL. The same holds for
/// [`KeyStore::change_role`].
///
/// **Every change is audited atomically**: each method that changes a
/// key writes one row to `auth.audit_log` in the transaction that changes the key,
/// so a change is never without its record and a failed change leaves none.
#[derive(Clone)]
pub struct KeyStore {
    pool: PgPool,
    cache: Arc<Cache>,
}

impl fmt::Debug for KeyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyStore")
            .field("cache_ttl", &self.cache.ttl)
            .finish_non_exhaustive()
    }
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
        let cache = Cache {
            ttl: cache_ttl,
            entries: Mutex::new(HashMap::new()),
        };
        KeyStore {
            pool,
            cache: Arc::new(cache),
        }
    }

    /// Generates a new random key, stores its hash and records `key.created` for `actor`.
    pub async fn create_key(&self, new: NewKey, actor: &Actor) -> Result<CreatedKey, AuthError> {
        validate_tenant(&new.tenant)?;
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
        .bind(&new.tenant)
        .bind(new.role.as_str())
        .bind(&new.name)
        .bind(&hash[..])
        .bind(&prefix)
        .bind(new.expires_at)
        .execute(&mut *tx)
        .await
        .map_err(|e| insert_error(e, &new.tenant, &new.name))?;
        Record {
            actor,
            action: action::KEY_CREATED,
            tenant: Some(&new.tenant),
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
        tracing::info!(key_id = %id, tenant = %new.tenant, role = %new.role, key_prefix = %prefix, %actor, "created API key");
        Ok(CreatedKey {
            id,
            key,
            prefix,
            tenant: new.tenant,
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
        validate_tenant(tenant)?;
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
        .map_err(|e| insert_error(e, tenant, name))?;
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
        if row.tenant != tenant || existing_role != role {
            return Err(AuthError::KeyConflict {
                tenant: row.tenant,
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
    /// are cached for the store's TTL (never past the key's expiry), so a key revoked
    /// on another replica keeps working here until its entry is older than the TTL.
    pub async fn authenticate(&self, key: &str) -> Result<Principal, AuthError> {
        if !key::is_well_formed(key) {
            return Err(AuthError::MalformedKey);
        }
        let hash = key::hash(key);
        if let Some(principal) = self.cache.get(&hash) {
            return Ok(principal);
        }
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
        let principal = Principal {
            key_id: row.id,
            tenant: row.tenant,
            role: parse_role(&row.role)?,
        };
        self.cache.insert(hash, principal.clone(), row.expires_at);
        Ok(principal)
    }

    /// Revokes a key and records `key.revoked` for `actor`. The key stops working
    /// here at once and on other replicas within their cache TTL.
    ///
    /// Revoking a revoked key is a no-op and records nothing, since nothing changed.
    pub async fn revoke(&self, id: Uuid, actor: &Actor) -> Result<(), AuthError> {
        let mut tx = self.pool.begin().await?;
        // `revoked_at IS NULL` makes a concurrent second revocation wait for the row
        // lock and then match nothing, so each key is recorded as revoked once.
        let revoked: Option<(String, String, String)> = sqlx::query_as(
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
            tenant: Some(&tenant),
            subject: &id.to_string(),
            details: json!({ "name": name, "role": role }),
        }
        .insert(&mut tx)
        .await?;
        tx.commit().await?;
        // After the commit: forgetting earlier would let a concurrent lookup cache the
        // still-active key again.
        self.cache.forget_key(id);
        tracing::info!(key_id = %id, %tenant, %actor, "revoked API key");
        Ok(())
    }

    /// Gives a key another role and records `key.role_changed` for `actor`. Like a
    /// revocation, the new role applies here at once and on other replicas within
    /// their cache TTL.
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
        sqlx::query("UPDATE auth.api_keys SET role = $2 WHERE id = $1")
            .bind(id)
            .bind(role.as_str())
            .execute(&mut *tx)
            .await?;
        Record {
            actor,
            action: action::KEY_ROLE_CHANGED,
            tenant: Some(&info.tenant),
            subject: &id.to_string(),
            details: json!({
                "name": info.name,
                "old_role": info.role.as_str(),
                "new_role": role.as_str(),
            }),
        }
        .insert(&mut tx)
        .await?;
        tx.commit().await?;
        self.cache.forget_key(id);
        tracing::info!(key_id = %id, tenant = %info.tenant, old_role = %info.role, new_role = %role, %actor, "changed API key role");
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

    /// Lists keys, of one tenant or of all, revoked and expired ones included.
    pub async fn list(&self, tenant: Option<&str>) -> Result<Vec<KeyInfo>, AuthError> {
        if let Some(tenant) = tenant {
            validate_tenant(tenant)?;
        }
        let rows: Vec<InfoRow> = sqlx::query_as(
            "SELECT id, tenant, role, name, key_prefix, created_at, expires_at, revoked_at \
             FROM auth.api_keys WHERE $1::text IS NULL OR tenant = $1 \
             ORDER BY tenant, created_at, id",
        )
        .bind(tenant)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(InfoRow::into_info).collect()
    }
}

#[derive(sqlx::FromRow)]
struct KeyRow {
    id: Uuid,
    tenant: String,
    role: String,
    expires_at: Option<DateTime<Utc>>,
    revoked_at: Option<DateTime<Utc>>,
    /// Judged by the database clock, which all replicas share.
    expired: bool,
}

impl KeyRow {
    const SELECT_BY_HASH: &str = "SELECT id, tenant, role, expires_at, revoked_at, \
         coalesce(expires_at <= now(), false) AS expired \
         FROM auth.api_keys WHERE key_hash = $1";
}

#[derive(sqlx::FromRow)]
struct InfoRow {
    id: Uuid,
    tenant: String,
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
            tenant: self.tenant,
            name: self.name,
            prefix: self.key_prefix,
            created_at: self.created_at,
            expires_at: self.expires_at,
            revoked_at: self.revoked_at,
        })
    }
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

fn insert_error(err: sqlx::Error, tenant: &str, name: &str) -> AuthError {
    if keel_store::violated_constraint(&err) == Some(ACTIVE_NAME_INDEX) {
        AuthError::NameTaken {
            tenant: tenant.to_owned(),
            name: name.to_owned(),
        }
    } else {
        AuthError::Database(err)
    }
}

/// Successful authentications by key hash; the clear key is never kept.
struct Cache {
    ttl: Duration,
    entries: Mutex<HashMap<KeyHash, Cached>>,
}

struct Cached {
    principal: Principal,
    fresh_until: Instant,
    expires_at: Option<DateTime<Utc>>,
}

impl Cache {
    fn lock(&self) -> MutexGuard<'_, HashMap<KeyHash, Cached>> {
        // A panic while holding the lock cannot leave a half-written entry worth
        // distrusting: every entry is complete and checked for freshness on read.
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn get(&self, hash: &KeyHash) -> Option<Principal> {
        let mut entries = self.lock();
        let entry = entries.get(hash)?;
        if Instant::now() < entry.fresh_until && entry.expires_at.is_none_or(|t| t > Utc::now()) {
            return Some(entry.principal.clone());
        }
        entries.remove(hash);
        None
    }

    fn insert(&self, hash: KeyHash, principal: Principal, expires_at: Option<DateTime<Utc>>) {
        if self.ttl.is_zero() {
            return;
        }
        // A TTL too large for the clock is treated as "do not cache" rather than forever.
        let Some(fresh_until) = Instant::now().checked_add(self.ttl) else {
            return;
        };
        let mut entries = self.lock();
        if entries.len() >= CACHE_CAPACITY && !entries.contains_key(&hash) {
            entries.clear();
        }
        entries.insert(
            hash,
            Cached {
                principal,
                fresh_until,
                expires_at,
            },
        );
    }

    fn forget_key(&self, id: Uuid) {
        self.lock().retain(|_, entry| entry.principal.key_id != id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn principal(n: u128) -> Principal {
        Principal {
            key_id: Uuid::from_u128(n),
            tenant: "acme".into(),
            role: Role::Viewer,
        }
    }

    fn hash_of(n: u128) -> KeyHash {
        key::hash(&n.to_string())
    }

    fn cache(ttl: Duration) -> Cache {
        Cache {
            ttl,
            entries: Mutex::new(HashMap::new()),
        }
    }

    #[test]
    fn cache_serves_fresh_entries_and_forgets_revoked_ones() {
        let cache = cache(Duration::from_secs(60));
        cache.insert(hash_of(1), principal(1), None);
        cache.insert(hash_of(2), principal(2), None);
        assert_eq!(cache.get(&hash_of(1)), Some(principal(1)));
        cache.forget_key(Uuid::from_u128(1));
        assert_eq!(cache.get(&hash_of(1)), None);
        assert_eq!(cache.get(&hash_of(2)), Some(principal(2)));
    }

    #[test]
    fn cache_never_outlives_the_key() {
        let cache = cache(Duration::from_secs(60));
        cache.insert(
            hash_of(1),
            principal(1),
            Some(Utc::now() - chrono::Duration::seconds(1)),
        );
        assert_eq!(cache.get(&hash_of(1)), None);
    }

    #[test]
    fn zero_ttl_disables_the_cache() {
        let cache = cache(Duration::ZERO);
        cache.insert(hash_of(1), principal(1), None);
        assert_eq!(cache.get(&hash_of(1)), None);
    }

    #[test]
    fn full_cache_starts_over() {
        let cache = cache(Duration::from_secs(60));
        for n in 0..CACHE_CAPACITY as u128 {
            cache.insert(hash_of(n), principal(n), None);
        }
        assert_eq!(cache.lock().len(), CACHE_CAPACITY);
        // Refreshing a cached key does not flush the others.
        cache.insert(hash_of(0), principal(0), None);
        assert_eq!(cache.lock().len(), CACHE_CAPACITY);
        cache.insert(hash_of(u128::MAX), principal(u128::MAX), None);
        assert_eq!(cache.lock().len(), 1);
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
