//! Instances in the `registry` schema: one row each, every change and its event in one transaction.

use std::collections::BTreeMap;

use keel_auth::{Scope, Tenant};
use keel_bus::{BusError, Outbox, SubjectRoot};
use keel_proto::v1::{Engine, Instance, MonitoringEndpoint};
use secrecy::{ExposeSecret as _, SecretString};
use sqlx::types::Json;
use sqlx::{PgPool, Postgres, QueryBuilder};
use uuid::Uuid;

use crate::connection::ConnectionUrl;
use crate::convert::{COLUMNS, Endpoint, InstanceRow, stored_engine, stored_role};
use crate::crypto::{Keys, Sealed};
use crate::error::RegistryError;
use crate::events;
use crate::selector::Requirement;

/// Schema of the registry's tables.
pub const SCHEMA: &str = "registry";

/// Fields of a new instance, already validated.
#[derive(Debug)]
pub(crate) struct NewInstance {
    pub(crate) name: String,
    pub(crate) engine: Engine,
    pub(crate) url: ConnectionUrl,
    pub(crate) environment: String,
    pub(crate) labels: BTreeMap<String, String>,
    pub(crate) endpoints: Vec<MonitoringEndpoint>,
}

/// Fields an update sets, already validated; `None` keeps the stored value.
#[derive(Debug, Default)]
pub(crate) struct Changes {
    pub(crate) name: Option<String>,
    pub(crate) url: Option<ConnectionUrl>,
    pub(crate) environment: Option<String>,
    pub(crate) labels: Option<BTreeMap<String, String>>,
    pub(crate) endpoints: Option<Vec<MonitoringEndpoint>>,
}

impl Changes {
    /// The API names of the fields set, in alphabetical order (as events list them).
    fn fields(&self) -> Vec<String> {
        [
            ("connection_url", self.url.is_some()),
            ("environment", self.environment.is_some()),
            ("labels", self.labels.is_some()),
            ("monitoring_endpoints", self.endpoints.is_some()),
            ("name", self.name.is_some()),
        ]
        .into_iter()
        .filter(|(_, set)| *set)
        .map(|(field, _)| field.to_owned())
        .collect()
    }
}

/// Which instances a list returns.
#[derive(Debug, Default)]
pub(crate) struct ListFilter {
    /// Only this tenant's; for a tenant caller, its own tenant (checked by the service).
    pub(crate) tenant: Option<Tenant>,
    pub(crate) engine: Option<Engine>,
    pub(crate) environment: Option<String>,
    pub(crate) selector: Vec<Requirement>,
    pub(crate) after: Option<Uuid>,
    pub(crate) limit: i64,
}

/// What a check found, to be stored as the instance's health.
#[derive(Debug, Clone)]
pub(crate) struct Health {
    pub(crate) reachable: bool,
    pub(crate) server_version: String,
    pub(crate) role: keel_proto::v1::InstanceRole,
    pub(crate) error: String,
    pub(crate) latency: Option<std::time::Duration>,
}

/// The registry's persistence.
#[derive(Debug, Clone)]
pub(crate) struct InstanceStore {
    pool: PgPool,
    keys: Keys,
    outbox: Outbox,
    /// Root of the subjects this store's events are published on.
    subjects: SubjectRoot,
}

/// Associated data that binds a ciphertext to its row.
fn aad(tenant: &str, id: Uuid) -> Vec<u8> {
    format!("keel.registry.instance.v1|{tenant}|{id}").into_bytes()
}

/// The tenant a query of `scope` is restricted to; `None` (every tenant) for the fleet.
fn scoped(scope: &Scope) -> Option<&str> {
    scope.tenant_name().map(Tenant::as_str)
}

/// The tenant that owns what `scope` writes: an instance belongs to exactly one tenant,
/// so a fleet caller cannot create or rewrite one (its role refuses it first).
fn owner<'a>(scope: &'a Scope, action: &'static str) -> Result<&'a str, RegistryError> {
    scoped(scope).ok_or(RegistryError::FleetWrite(action))
}

impl InstanceStore {
    pub(crate) fn new(pool: PgPool, keys: Keys, outbox: Outbox, subjects: SubjectRoot) -> Self {
        Self {
            pool,
            keys,
            outbox,
            subjects,
        }
    }

    pub(crate) async fn create(
        &self,
        scope: &Scope,
        new: NewInstance,
    ) -> Result<Instance, RegistryError> {
        let tenant = owner(scope, "create instances")?;
        let id = Uuid::now_v7();
        let sealed = self.keys.current().seal(
            secrecy::ExposeSecret::expose_secret(&new.url.clear),
            &aad(tenant, id),
        );
        let endpoints: Vec<Endpoint> = new.endpoints.iter().map(Endpoint::from).collect();
        let mut tx = self.pool.begin().await?;
        let row: InstanceRow = sqlx::query_as(&format!(
            "INSERT INTO registry.instances
                 (id, tenant, name, engine, url_masked, url_ciphertext, key_id, environment, labels, monitoring_endpoints)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
             RETURNING {COLUMNS}"
        ))
        .bind(id)
        .bind(tenant)
        .bind(&new.name)
        .bind(stored_engine(new.engine))
        .bind(&new.url.masked)
        .bind(&sealed.bytes)
        .bind(&sealed.key_id)
        .bind(&new.environment)
        .bind(Json(&new.labels))
        .bind(Json(&endpoints))
        .fetch_one(&mut *tx)
        .await
        .map_err(|e| name_taken(e, &new.name))?;
        let instance = Instance::from(&row);
        self.outbox
            .enqueue(&mut tx, &event(events::created(&self.subjects, &instance))?)
            .await?;
        tx.commit().await?;
        Ok(instance)
    }

    pub(crate) async fn get(&self, scope: &Scope, id: Uuid) -> Result<Instance, RegistryError> {
        let row: Option<InstanceRow> = sqlx::query_as(&format!(
            "SELECT {COLUMNS} FROM registry.instances WHERE id = $1 AND ($2::text IS NULL OR tenant = $2)"
        ))
        .bind(id)
        .bind(scoped(scope))
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| Instance::from(&r))
            .ok_or_else(|| RegistryError::NotFound(id.to_string()))
    }

    /// Names are unique within a tenant only, so a fleet caller must say which tenant.
    pub(crate) async fn get_by_name(
        &self,
        tenant: &Tenant,
        name: &str,
    ) -> Result<Instance, RegistryError> {
        let row: Option<InstanceRow> = sqlx::query_as(&format!(
            "SELECT {COLUMNS} FROM registry.instances WHERE tenant = $1 AND name = $2"
        ))
        .bind(tenant.as_str())
        .bind(name)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| Instance::from(&r))
            .ok_or_else(|| RegistryError::NotFound(format!("named {name:?}")))
    }

    /// One page in id order, and whether more follow: of the caller's tenant, or for a
    /// fleet caller of every tenant unless the filter names one.
    pub(crate) async fn list(
        &self,
        scope: &Scope,
        filter: &ListFilter,
    ) -> Result<(Vec<Instance>, bool), RegistryError> {
        let tenant = match scope {
            Scope::Tenant(own) => Some(own),
            Scope::Fleet => filter.tenant.as_ref(),
        };
        let mut query = QueryBuilder::<Postgres>::new(format!(
            "SELECT {COLUMNS} FROM registry.instances WHERE true"
        ));
        if let Some(tenant) = tenant {
            query
                .push(" AND tenant = ")
                .push_bind(tenant.as_str().to_owned());
        }
        if let Some(after) = filter.after {
            query.push(" AND id > ").push_bind(after);
        }
        if let Some(engine) = filter.engine {
            query
                .push(" AND engine = ")
                .push_bind(stored_engine(engine));
        }
        if let Some(environment) = &filter.environment {
            query
                .push(" AND environment = ")
                .push_bind(environment.clone());
        }
        push_selector(&mut query, &filter.selector);
        // One extra row tells whether another page exists without a count.
        query
            .push(" ORDER BY id LIMIT ")
            .push_bind(filter.limit + 1);
        let mut rows: Vec<InstanceRow> = query.build_query_as().fetch_all(&self.pool).await?;
        let more = rows.len() as i64 > filter.limit;
        rows.truncate(filter.limit as usize);
        Ok((rows.iter().map(Instance::from).collect(), more))
    }

    /// Applies `changes` if the stored version is `expected_version`. A field sent with the
    /// value it already has is no change, and an update that changes nothing returns the
    /// instance as stored: same version, no event.
    ///
    /// The row is read without a lock and written by one statement that checks the version
    /// again, so no row lock is held while the caller thinks, and concurrent writers never wait
    /// on each other beyond that statement.
    pub(crate) async fn update(
        &self,
        scope: &Scope,
        id: Uuid,
        expected_version: i64,
        changes: Changes,
    ) -> Result<Instance, RegistryError> {
        // The new ciphertext is bound to the tenant, which a fleet caller does not have.
        let tenant = owner(scope, "update instances")?;
        let stored: Option<InstanceWithSecret> = sqlx::query_as(&format!(
            "SELECT url_ciphertext, key_id, {COLUMNS} FROM registry.instances WHERE id = $1 AND tenant = $2"
        ))
        .bind(id)
        .bind(tenant)
        .fetch_optional(&self.pool)
        .await?;
        let Some(stored) = stored else {
            return Err(RegistryError::NotFound(id.to_string()));
        };
        if stored.row.version != expected_version {
            return Err(RegistryError::VersionConflict {
                id,
                expected: expected_version,
                actual: stored.row.version,
            });
        }
        let changes = self.differing(changes, &stored);
        let changed_fields = changes.fields();
        if changed_fields.is_empty() {
            return Ok(Instance::from(&stored.row));
        }

        let mut query = QueryBuilder::<Postgres>::new(
            "UPDATE registry.instances SET version = version + 1, updated_at = now()",
        );
        if let Some(name) = &changes.name {
            query.push(", name = ").push_bind(name.clone());
        }
        if let Some(url) = &changes.url {
            let sealed = self.keys.current().seal(
                secrecy::ExposeSecret::expose_secret(&url.clear),
                &aad(tenant, id),
            );
            query.push(", url_masked = ").push_bind(url.masked.clone());
            query.push(", url_ciphertext = ").push_bind(sealed.bytes);
            query.push(", key_id = ").push_bind(sealed.key_id);
        }
        if let Some(environment) = &changes.environment {
            query
                .push(", environment = ")
                .push_bind(environment.clone());
        }
        if let Some(labels) = &changes.labels {
            query.push(", labels = ").push_bind(Json(labels.clone()));
        }
        if let Some(endpoints) = &changes.endpoints {
            let endpoints: Vec<Endpoint> = endpoints.iter().map(Endpoint::from).collect();
            query
                .push(", monitoring_endpoints = ")
                .push_bind(Json(endpoints));
        }
        query.push(" WHERE id = ").push_bind(id);
        query.push(" AND tenant = ").push_bind(tenant);
        query.push(" AND version = ").push_bind(expected_version);
        query.push(format!(" RETURNING {COLUMNS}"));

        let mut tx = self.pool.begin().await?;
        let row: Option<InstanceRow> = query
            .build_query_as()
            .fetch_optional(&mut *tx)
            .await
            .map_err(|e| name_taken(e, changes.name.as_deref().unwrap_or_default()))?;
        let Some(row) = row else {
            drop(tx);
            return Err(self.missing_or_conflict(scope, id, expected_version).await);
        };
        let instance = Instance::from(&row);
        self.outbox
            .enqueue(
                &mut tx,
                &event(events::updated(&self.subjects, &instance, changed_fields))?,
            )
            .await?;
        tx.commit().await?;
        Ok(instance)
    }

    /// The fields of `changes` whose value differs from what `stored` holds.
    fn differing(&self, changes: Changes, stored: &InstanceWithSecret) -> Changes {
        let row = &stored.row;
        Changes {
            name: changes.name.filter(|name| *name != row.name),
            url: changes.url.filter(|url| {
                // Compared in clear: the masked forms hide a changed password. A credential this
                // server cannot open (a key it lacks) is replaced.
                let sealed = Sealed {
                    key_id: stored.key_id.clone(),
                    bytes: stored.url_ciphertext.clone(),
                };
                self.keys
                    .current()
                    .open(&sealed, &aad(&row.tenant, row.id))
                    .map_or(true, |clear| {
                        clear.expose_secret() != url.clear.expose_secret()
                    })
            }),
            environment: changes
                .environment
                .filter(|environment| *environment != row.environment),
            labels: changes.labels.filter(|labels| *labels != row.labels.0),
            endpoints: changes.endpoints.filter(|endpoints| {
                let endpoints: Vec<Endpoint> = endpoints.iter().map(Endpoint::from).collect();
                endpoints != row.monitoring_endpoints.0
            }),
        }
    }

    pub(crate) async fn delete(
        &self,
        scope: &Scope,
        id: Uuid,
        expected_version: Option<i64>,
    ) -> Result<(), RegistryError> {
        let mut tx = self.pool.begin().await?;
        let row: Option<InstanceRow> = sqlx::query_as(&format!(
            "DELETE FROM registry.instances WHERE id = $1 AND ($2::text IS NULL OR tenant = $2)
                 AND ($3::bigint IS NULL OR version = $3)
             RETURNING {COLUMNS}"
        ))
        .bind(id)
        .bind(scoped(scope))
        .bind(expected_version)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            drop(tx);
            return Err(self
                .missing_or_conflict(scope, id, expected_version.unwrap_or(-1))
                .await);
        };
        self.outbox
            .enqueue(
                &mut tx,
                &event(events::deleted(&self.subjects, &Instance::from(&row)))?,
            )
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn missing_or_conflict(&self, scope: &Scope, id: Uuid, expected: i64) -> RegistryError {
        let actual: Result<Option<i64>, sqlx::Error> = sqlx::query_scalar(
            "SELECT version FROM registry.instances WHERE id = $1 AND ($2::text IS NULL OR tenant = $2)",
        )
        .bind(id)
        .bind(scoped(scope))
        .fetch_optional(&self.pool)
        .await;
        match actual {
            Ok(Some(actual)) => RegistryError::VersionConflict {
                id,
                expected,
                actual,
            },
            Ok(None) => RegistryError::NotFound(id.to_string()),
            Err(e) => e.into(),
        }
    }

    /// The clear connection URL and the instance it belongs to.
    pub(crate) async fn connection(
        &self,
        scope: &Scope,
        id: Uuid,
    ) -> Result<(SecretString, Instance), RegistryError> {
        let row: Option<(Vec<u8>, String, InstanceRow)> = sqlx::query_as::<_, InstanceWithSecret>(&format!(
            "SELECT url_ciphertext, key_id, {COLUMNS} FROM registry.instances WHERE id = $1 AND ($2::text IS NULL OR tenant = $2)"
        ))
        .bind(id)
        .bind(scoped(scope))
        .fetch_optional(&self.pool)
        .await?
        .map(|r| (r.url_ciphertext, r.key_id, r.row));
        let (bytes, key_id, row) = row.ok_or_else(|| RegistryError::NotFound(id.to_string()))?;
        // The row's own tenant, which a fleet caller's scope does not name; for a tenant
        // caller it is the caller's, as the query matched it.
        let clear = self
            .keys
            .current()
            .open(&Sealed { key_id, bytes }, &aad(&row.tenant, id))?;
        Ok((clear, Instance::from(&row)))
    }

    /// Stores what a check found; health is observed state, so the version does not change.
    pub(crate) async fn record_health(
        &self,
        scope: &Scope,
        id: Uuid,
        health: &Health,
    ) -> Result<Instance, RegistryError> {
        let row: Option<InstanceRow> = sqlx::query_as(&format!(
            "UPDATE registry.instances SET health_checked_at = now(), health_reachable = $3,
                 health_server_version = $4, health_role = $5, health_error = $6, health_latency_us = $7
             WHERE id = $1 AND ($2::text IS NULL OR tenant = $2) RETURNING {COLUMNS}"
        ))
        .bind(id)
        .bind(scoped(scope))
        .bind(health.reachable)
        .bind(&health.server_version)
        .bind(stored_role(health.role))
        .bind(&health.error)
        .bind(health.latency.map(|l| l.as_micros() as i64))
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| Instance::from(&r))
            .ok_or_else(|| RegistryError::NotFound(id.to_string()))
    }

    /// Re-encrypts up to `batch` rows that are not under the primary key; returns how many.
    ///
    /// Each row is rewritten only if its version is unchanged, without bumping it:
    /// a concurrent update wins and the row is picked up again by the next batch.
    pub(crate) async fn rotate_batch(&self, batch: i64) -> Result<RotationBatch, RegistryError> {
        // One ring for the whole batch, even if the file is reloaded meanwhile.
        let ring = self.keys.current();
        let primary = ring.primary_id().to_owned();
        let rows: Vec<(Uuid, String, i64, String, Vec<u8>)> = sqlx::query_as(
            "SELECT id, tenant, version, key_id, url_ciphertext FROM registry.instances
             WHERE key_id <> $1 ORDER BY id LIMIT $2",
        )
        .bind(&primary)
        .bind(batch)
        .fetch_all(&self.pool)
        .await?;
        let mut rotated = 0;
        for (id, tenant, version, key_id, bytes) in &rows {
            let clear = ring.open(
                &Sealed {
                    key_id: key_id.clone(),
                    bytes: bytes.clone(),
                },
                &aad(tenant, *id),
            )?;
            let sealed = ring.seal(
                secrecy::ExposeSecret::expose_secret(&clear),
                &aad(tenant, *id),
            );
            let done = sqlx::query(
                "UPDATE registry.instances SET url_ciphertext = $3, key_id = $4
                 WHERE id = $1 AND version = $2 AND key_id = $5",
            )
            .bind(id)
            .bind(version)
            .bind(&sealed.bytes)
            .bind(&sealed.key_id)
            .bind(key_id)
            .execute(&self.pool)
            .await?
            .rows_affected();
            rotated += done;
        }
        let remaining: i64 =
            sqlx::query_scalar("SELECT count(*) FROM registry.instances WHERE key_id <> $1")
                .bind(&primary)
                .fetch_one(&self.pool)
                .await?;
        Ok(RotationBatch { rotated, remaining })
    }
}

/// Progress of a key rotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RotationBatch {
    /// Rows re-encrypted by this batch.
    pub rotated: u64,
    /// Rows still under another key.
    pub remaining: i64,
}

#[derive(sqlx::FromRow)]
struct InstanceWithSecret {
    url_ciphertext: Vec<u8>,
    key_id: String,
    #[sqlx(flatten)]
    row: InstanceRow,
}

/// A tenant accepted by keel-auth is always a valid subject token: a failure here is a bug, and
/// the change is rolled back with its transaction rather than committed without its event.
fn event(
    message: Result<keel_bus::OutboxMessage, keel_bus::SubjectError>,
) -> Result<keel_bus::OutboxMessage, RegistryError> {
    message.map_err(|e| RegistryError::Bus(BusError::from(e)))
}

fn name_taken(err: sqlx::Error, name: &str) -> RegistryError {
    if keel_store::violated_constraint(&err) == Some("instances_tenant_name_key") {
        RegistryError::NameTaken(name.to_owned())
    } else {
        err.into()
    }
}

/// Adds the selector's clauses to a WHERE. Equalities become one `@>` containment,
/// which the GIN index on labels serves.
fn push_selector(query: &mut QueryBuilder<'_, Postgres>, selector: &[Requirement]) {
    let mut contains = BTreeMap::new();
    for requirement in selector {
        match requirement {
            Requirement::Equals(key, value) => {
                contains.insert(key.clone(), value.clone());
            }
            Requirement::NotEquals(key, value) => {
                let one = BTreeMap::from([(key.clone(), value.clone())]);
                query.push(" AND NOT labels @> ").push_bind(Json(one));
            }
            Requirement::In(key, values) => {
                query
                    .push(" AND labels ->> ")
                    .push_bind(key.clone())
                    .push(" = ANY(")
                    .push_bind(values.clone())
                    .push(")");
            }
            Requirement::NotIn(key, values) => {
                // A missing key compares as NULL: coalesce makes it match, as in Kubernetes.
                query
                    .push(" AND NOT coalesce(labels ->> ")
                    .push_bind(key.clone())
                    .push(" = ANY(")
                    .push_bind(values.clone())
                    .push("), false)");
            }
            Requirement::Exists(key) => {
                query.push(" AND labels ? ").push_bind(key.clone());
            }
            Requirement::NotExists(key) => {
                query.push(" AND NOT labels ? ").push_bind(key.clone());
            }
        }
    }
    if !contains.is_empty() {
        query.push(" AND labels @> ").push_bind(Json(contains));
    }
}
