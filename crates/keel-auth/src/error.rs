use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::{Role, Scope};

/// Why an API key could not be created, registered, found or accepted.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// A tenant name that is not a DNS label.
    #[error(
        "invalid tenant {0:?}: use 1 to 63 lowercase letters, digits and '-', starting and ending with a letter or digit"
    )]
    InvalidTenant(String),
    /// A key name that is empty, too long or contains control characters.
    #[error("invalid key name {0:?}: use 1 to 100 printable characters")]
    InvalidName(String),
    /// A new key whose expiry has already passed.
    #[error("expiry {0} is in the past")]
    ExpiryInPast(DateTime<Utc>),
    /// A string that cannot be a Keel key; refused before any database lookup.
    #[error("malformed API key: expected \"keel_\" followed by 40 letters, digits, '-' or '_'")]
    MalformedKey,
    /// A well-formed key that is not registered.
    #[error("unknown API key")]
    UnknownKey,
    /// The key was revoked.
    #[error("API key revoked")]
    Revoked,
    /// The key's expiry has passed.
    #[error("API key expired")]
    Expired,
    /// The scope (a tenant, or the fleet) already has an active key with this name.
    #[error("{scope} already has an active API key named {name:?}")]
    NameTaken {
        /// The key's scope.
        scope: Scope,
        /// The name asked for.
        name: String,
    },
    /// [`KeyStore::ensure_key`](crate::KeyStore::ensure_key) was given a key that is
    /// already registered with another scope or role.
    #[error("API key is already registered for {scope} with role {role}")]
    KeyConflict {
        /// The scope the key is registered for.
        scope: Scope,
        /// The role the key is registered with.
        role: Role,
    },
    /// A fleet key asked for, or given, a role other than [`Role::Service`]: only
    /// Keel's own services reach every tenant, and they need nothing more.
    #[error(
        "fleet keys have the service role only, not {0}; a person or a tool needs a key of one tenant (--tenant)"
    )]
    FleetRoleNotService(Role),
    /// No key has this id.
    #[error("no API key with id {0}")]
    NotFound(Uuid),
    /// [`KeyStore::change_role`](crate::KeyStore::change_role) was asked to change a
    /// revoked key, which stays revoked for good.
    #[error("API key {0} is revoked; create a new key instead")]
    KeyRevoked(Uuid),
    /// [`KeyStore::record`](crate::KeyStore::record) was given an action, subject or
    /// details the audit log does not accept.
    #[error("invalid audit record: {0}")]
    InvalidAuditRecord(String),
    /// Creating the schema or running the migrations failed.
    #[error(transparent)]
    Migrate(#[from] keel_store::StoreError),
    /// The state store failed or returned something unexpected.
    #[error("auth store: {0}")]
    Database(#[from] sqlx::Error),
}

impl From<AuthError> for tonic::Status {
    /// Maps to the status a handler managing keys should return; store details stay out
    /// of the message because they go to the client.
    fn from(err: AuthError) -> Self {
        use tonic::Status;
        match err {
            AuthError::InvalidTenant(_)
            | AuthError::InvalidName(_)
            | AuthError::ExpiryInPast(_)
            | AuthError::FleetRoleNotService(_) => Status::invalid_argument(err.to_string()),
            AuthError::MalformedKey | AuthError::UnknownKey => {
                Status::unauthenticated("invalid API key")
            }
            AuthError::Revoked | AuthError::Expired => Status::unauthenticated(err.to_string()),
            AuthError::NameTaken { .. } | AuthError::KeyConflict { .. } => {
                Status::already_exists(err.to_string())
            }
            AuthError::NotFound(_) => Status::not_found(err.to_string()),
            AuthError::KeyRevoked(_) => Status::failed_precondition(err.to_string()),
            // Actions and details come from Keel's code, not from the client.
            AuthError::InvalidAuditRecord(_) => Status::internal("cannot write the audit log"),
            AuthError::Migrate(_) => Status::internal("auth store is not migrated"),
            AuthError::Database(_) => Status::unavailable("auth store unavailable"),
        }
    }
}
