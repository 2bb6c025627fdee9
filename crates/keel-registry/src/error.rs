//! The registry's errors and their one mapping to gRPC status.

use uuid::Uuid;

use crate::crypto::CryptoError;
use crate::validate::Invalid;

/// Why a registry operation did not happen.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The request breaks an input rule.
    #[error(transparent)]
    Invalid(#[from] Invalid),
    /// No such instance in the caller's tenant.
    #[error("instance {0} not found")]
    NotFound(String),
    /// The name is taken in the tenant.
    #[error("an instance named {0:?} already exists in this tenant; choose another name")]
    NameTaken(String),
    /// A fleet caller asked to write what belongs to one tenant; the string completes
    /// "may not …".
    #[error(
        "a fleet caller may not {0}: an instance belongs to one tenant; use a key of that tenant"
    )]
    FleetWrite(&'static str),
    /// Somebody changed the instance since the caller read it.
    #[error(
        "instance {id} was changed concurrently: stored version is {actual}, request expected {expected}; read it again and retry"
    )]
    VersionConflict {
        /// The instance.
        id: Uuid,
        /// The version the caller sent.
        expected: i64,
        /// The version stored now.
        actual: i64,
    },
    /// A stored credential cannot be decrypted.
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    /// The state store failed.
    #[error("state store: {0}")]
    Database(#[from] sqlx::Error),
    /// The outbox failed.
    #[error("event outbox: {0}")]
    Bus(#[from] keel_bus::BusError),
}

impl From<RegistryError> for tonic::Status {
    fn from(err: RegistryError) -> Self {
        use tonic::Status;
        match err {
            RegistryError::Invalid(invalid) => Status::invalid_argument(invalid.to_string()),
            RegistryError::NotFound(_) => Status::not_found(err.to_string()),
            RegistryError::NameTaken(_) => Status::already_exists(err.to_string()),
            RegistryError::FleetWrite(_) => Status::permission_denied(err.to_string()),
            RegistryError::VersionConflict { .. } => Status::aborted(err.to_string()),
            RegistryError::Database(sqlx::Error::PoolTimedOut) => {
                tracing::warn!("state store connection pool exhausted");
                Status::unavailable("the state store is busy; retry shortly")
            }
            // The operator's to fix, not a bug: a key added on one server (or by
            // `keel admin rotate-key`) but not yet on this one. The id is no secret.
            RegistryError::Crypto(CryptoError::UnknownKey(_)) => {
                tracing::warn!(error = %err, "a stored credential needs a key this server lacks");
                Status::failed_precondition(err.to_string())
            }
            RegistryError::Crypto(_) | RegistryError::Database(_) | RegistryError::Bus(_) => {
                // Details stay in the log: they can name tables, keys or hosts.
                tracing::error!(error = %err, "registry request failed");
                Status::internal("internal error; the server log has the details")
            }
        }
    }
}
