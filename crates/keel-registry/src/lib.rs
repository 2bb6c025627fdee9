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

use std::path::PathBuf;

use keel_bus::Outbox;
use keel_proto::v1::registry_service_server::RegistryServiceServer;
use sqlx::PgPool;

pub use error::RegistryError;
pub use service::{Registry, RegistryConfig};
pub use store::{RotationBatch, SCHEMA};

use crate::crypto::Keys;
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
    /// The service over `pool`, encrypting with `keys`: a [`crypto::KeyRing`] (`Arc` or not),
    /// or a [`Keys`] handle that [`Keys::watch_file`] keeps current.
    pub fn new(pool: PgPool, keys: impl Into<Keys>, config: RegistryConfig) -> Self {
        let store = InstanceStore::new(pool, keys.into(), outbox(), config.subjects.clone());
        Self::from_store(store, config)
    }
}

/// The registry as a process hosts it (see [`keel_service::Host::add`]): its schema, its
/// outbox and its gRPC service.
#[derive(Debug)]
pub struct Service {
    keys: Keys,
    keys_file: Option<PathBuf>,
    config: RegistryConfig,
}

impl Service {
    /// The registry, encrypting with `keys`.
    pub fn new(keys: impl Into<Keys>, config: RegistryConfig) -> Self {
        Self {
            keys: keys.into(),
            keys_file: None,
            config,
        }
    }

    /// Re-reads the key ring from `path` while serving (see [`Keys::watch_file`]), so that
    /// `keel admin rotate-key` can use a key added to the file after the server started.
    pub fn watch_keys_file(mut self, path: Option<PathBuf>) -> Self {
        self.keys_file = path;
        self
    }
}

impl keel_service::Service for Service {
    const NAME: &'static str = SCHEMA;

    async fn migrate(pool: &PgPool) -> Result<(), keel_service::BoxError> {
        Ok(migrate(pool).await?)
    }

    fn outbox() -> Option<Outbox> {
        Some(outbox())
    }

    fn mount(self, mount: &mut keel_service::Mount<'_>) -> Result<(), keel_service::BoxError> {
        if let Some(path) = self.keys_file {
            let keys = self.keys.clone();
            mount.task("encryption key ring file", move |stop| {
                keys.watch_file(path, stop.cancelled_owned())
            });
        }
        // Events go under this deployment's subject root, whatever the caller configured.
        let config = RegistryConfig {
            subjects: mount.bus().subjects().clone(),
            ..self.config
        };
        let registry = Registry::new(mount.pool().clone(), self.keys, config);
        mount.grpc(RegistryServiceServer::new(registry));
        Ok(())
    }
}

/// Re-encrypts every connection URL not under the ring's primary key, in batches,
/// calling `progress` after each; safe to run while the registry serves and on several replicas.
pub async fn rotate_keys(
    pool: PgPool,
    keys: impl Into<Keys>,
    batch: i64,
    mut progress: impl FnMut(RotationBatch),
) -> Result<u64, RegistryError> {
    // Re-encryption changes no instance as callers see it, so it publishes no events and
    // needs no subject root.
    let store = InstanceStore::new(
        pool,
        keys.into(),
        outbox(),
        keel_bus::SubjectRoot::default(),
    );
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
