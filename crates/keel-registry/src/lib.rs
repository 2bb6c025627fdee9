//! Keel's instance registry: the inventory of database instances.
//!
//! One row per instance in the `registry` schema; connection URLs encrypted with
//! AES-256-GCM (see [`crypto`]) and shown masked; every change written together with
//! its `<root>.registry.<tenant>.instance.*` event through the transactional outbox.

mod connection;
mod convert;
pub mod crypto;
mod error;
pub mod events;
mod probe;
mod selector;
mod service;
mod store;
mod validate;

use std::sync::Arc;

use keel_bus::Outbox;
use keel_proto::v1::registry_service_server::RegistryServiceServer;
use sqlx::PgPool;
use tower::Layer as _;

pub use error::RegistryError;
pub use service::{Registry, RegistryConfig};
pub use store::{RotationBatch, SCHEMA};

use crate::crypto::KeyRing;
use crate::store::InstanceStore;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Creates or upgrades the registry's schema, outbox included.
pub async fn migrate(pool: &PgPool) -> Result<(), RegistryError> {
    keel_store::migrate(pool, SCHEMA, &MIGRATOR)
        .await
        .map_err(|e| match e {
            keel_store::StoreError::Database(db) => RegistryError::Database(db),
            other => RegistryError::Bus(keel_bus::BusError::Store(other)),
        })?;
    outbox().install(pool).await?;
    Ok(())
}

/// The registry's outbox, for its relay.
pub fn outbox() -> Outbox {
    // SCHEMA is a valid identifier, checked by the tests.
    Outbox::new(SCHEMA).unwrap_or_else(|_| unreachable!("registry schema name is valid"))
}

impl Registry {
    /// The service over `pool`, encrypting with `keys`.
    pub fn new(pool: PgPool, keys: Arc<KeyRing>, config: RegistryConfig) -> Self {
        let store = InstanceStore::new(pool, keys, outbox(), config.subjects.clone());
        Self::from_store(store, config)
    }
}

/// The registry's gRPC service as every process serves it: API keys checked first, then
/// the caller's per-key limits, then the service.
pub fn grpc_service(
    registry: Registry,
    keys: keel_auth::KeyStore,
    limits: &keel_limits::LimitsLayer,
) -> keel_auth::AuthService<keel_limits::LimitsService<RegistryServiceServer<Registry>>> {
    keel_auth::AuthLayer::new(keys).layer(limits.layer(RegistryServiceServer::new(registry)))
}

/// Re-encrypts every connection URL not under the ring's primary key, in batches,
/// calling `progress` after each; safe to run while the registry serves and on several replicas.
pub async fn rotate_keys(
    pool: PgPool,
    keys: Arc<KeyRing>,
    batch: i64,
    mut progress: impl FnMut(RotationBatch),
) -> Result<u64, RegistryError> {
    // Re-encryption changes no instance as callers see it, so it publishes no events and
    // needs no subject root.
    let store = InstanceStore::new(pool, keys, outbox(), keel_bus::SubjectRoot::default());
    let mut total = 0;
    loop {
        let step = store.rotate_batch(batch).await?;
        total += step.rotated;
        progress(step);
        if step.remaining == 0 {
            return Ok(total);
        }
        if step.rotated == 0 {
            // Every candidate changed under us; their writers will have re-encrypted
            // them or will soon, so pause briefly rather than spin.
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
}
