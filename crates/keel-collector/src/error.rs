//! The collector's errors and their one mapping to gRPC status.

/// Why a collector operation did not happen.
#[derive(Debug, thiserror::Error)]
pub enum CollectorError {
    /// The request breaks an input rule; the message says which and how to fix it.
    #[error("{0}")]
    Invalid(String),
    /// No such instance among the caller's.
    #[error("instance {0} not found")]
    NotFound(String),
    /// The request does not apply to this instance (e.g. top queries of a Redis instance).
    #[error("{0}")]
    Precondition(String),
    /// The registry could not be asked.
    #[error("registry: {0}")]
    Registry(#[from] tonic::Status),
    /// The state store failed.
    #[error("state store: {0}")]
    Database(#[from] sqlx::Error),
    /// The outbox failed.
    #[error("event outbox: {0}")]
    Bus(#[from] keel_bus::BusError),
    /// An event subject could not be built (a tenant name that is no subject token).
    #[error("event subject: {0}")]
    Subject(#[from] keel_bus::SubjectError),
}

impl From<CollectorError> for tonic::Status {
    fn from(err: CollectorError) -> Self {
        use tonic::Status;
        match err {
            CollectorError::Invalid(message) => Status::invalid_argument(message),
            CollectorError::NotFound(_) => Status::not_found(err.to_string()),
            CollectorError::Precondition(message) => Status::failed_precondition(message),
            CollectorError::Database(sqlx::Error::PoolTimedOut) => {
                tracing::warn!("state store connection pool exhausted");
                Status::unavailable("the state store is busy; retry shortly")
            }
            CollectorError::Registry(status) => {
                tracing::warn!(code = ?status.code(), message = status.message(), "registry call failed");
                Status::unavailable("the registry could not be reached; retry shortly")
            }
            CollectorError::Database(_) | CollectorError::Bus(_) | CollectorError::Subject(_) => {
                // Details stay in the log: they can name tables or hosts.
                tracing::error!(error = %err, "collector request failed");
                Status::internal("internal error; the server log has the details")
            }
        }
    }
}
