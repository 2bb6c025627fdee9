use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use secrecy::{ExposeSecret as _, SecretString};
use sqlx::PgPool;
use sqlx::migrate::Migrator;
use uuid::Uuid;

use crate::key::{self, KeyHash};
use crate::{AuthError, Principal, Role, validate_tenant};

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
/// until their cached entry is older than the TTL.
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

    /// Generates a new random key and stores its hash.
    pub async fn create_key(&self, new: NewKey) -> Result<CreatedKey, AuthError> {
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
        .execute(&self.pool)
        .await
        .map_err(|e| insert_error(e, &new.tenant, &new.name))?;
        tracing::info!(key_id = %id, tenant = %new.tenant, role = %new.role, key_prefix = %prefix, "created API key");
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
    pub async fn ensure_key(
        &self,
        key: &SecretString,
        tenant: &str,
        role: Role,
        name: &str,
    ) -> Result<Uuid, AuthError> {
        let key = key.expose_secret();
        if !key::is_well_formed(key) {
            return Err(AuthError::MalformedKey);
        }
        validate_tenant(tenant)?;
        validate_name(name)?;
        let hash = key::hash(key);
        let prefix = key::display_prefix(key);
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
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| insert_error(e, tenant, name))?;
        if let Some(id) = inserted {
            tracing::info!(key_id = %id, tenant, %role, key_prefix = prefix, "registered API key");
            return Ok(id);
        }
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

    /// Revokes a key; revoking it again is a no-op. The key stops working here at
    /// once and on other replicas within their cache TTL.
    pub async fn revoke(&self, id: Uuid) -> Result<(), AuthError> {
        let result = sqlx::query(
            "UPDATE auth.api_keys SET revoked_at = coalesce(revoked_at, now()) WHERE id = $1",
        )
        .bind(id)
        .execute(&self.pool)
        .await?;
        self.cache.forget_key(id);
        if result.rows_affected() == 0 {
            return Err(AuthError::NotFound(id));
        }
        tracing::info!(key_id = %id, "revoked API key");
        Ok(())
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
        rows.into_iter()
            .map(|r| {
                Ok(KeyInfo {
                    id: r.id,
                    role: parse_role(&r.role)?,
                    tenant: r.tenant,
                    name: r.name,
                    prefix: r.key_prefix,
                    created_at: r.created_at,
                    expires_at: r.expires_at,
                    revoked_at: r.revoked_at,
                })
            })
            .collect()
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
