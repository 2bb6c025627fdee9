//! The optimizer's errors and their one mapping to gRPC status.

use crate::advisor::AdvisorError;

/// Why an optimizer operation did not happen.
#[derive(Debug, thiserror::Error)]
pub enum OptimizerError {
    /// The request breaks an input rule; the message says which and how to fix it.
    #[error("{0}")]
    Invalid(String),
    /// No such instance, analysis or recommendation among the caller's.
    #[error("{0} not found")]
    NotFound(String),
    /// The request does not apply in this state (a Redis instance, a recommendation in flight).
    #[error("{0}")]
    Precondition(String),
    /// The target refused or failed; the message names the fix where there is one.
    #[error("{0}")]
    Target(String),
    /// The advisor failed.
    #[error(transparent)]
    Advisor(#[from] AdvisorError),
    /// Another Keel service could not be asked.
    #[error("{0}")]
    Peer(#[from] tonic::Status),
    /// The state store failed.
    #[error("state store: {0}")]
    Database(#[from] sqlx::Error),
    /// The outbox failed.
    #[error("event outbox: {0}")]
    Bus(#[from] keel_bus::BusError),
    /// An event subject could not be built.
    #[error("event subject: {0}")]
    Subject(#[from] keel_bus::SubjectError),
}

impl From<OptimizerError> for tonic::Status {
    fn from(err: OptimizerError) -> Self {
        use tonic::Status;
        match err {
            OptimizerError::Invalid(message) => Status::invalid_argument(message),
            OptimizerError::NotFound(_) => Status::not_found(err.to_string()),
            OptimizerError::Precondition(message) => Status::failed_precondition(message),
            OptimizerError::Advisor(AdvisorError::HypoPgMissing(message)) => {
                Status::failed_precondition(message)
            }
            OptimizerError::Target(message) => Status::failed_precondition(message),
            OptimizerError::Advisor(AdvisorError::Target(error)) => {
                Status::unavailable(format!("the instance failed: {}", describe(&error)))
            }
            OptimizerError::Peer(status) if status.code() == tonic::Code::NotFound => {
                Status::not_found("instance not found")
            }
            OptimizerError::Peer(status) => {
                tracing::warn!(code = ?status.code(), message = status.message(), "peer call failed");
                Status::unavailable("another Keel service could not be reached; retry shortly")
            }
            OptimizerError::Database(sqlx::Error::PoolTimedOut) => {
                Status::unavailable("the state store is busy; retry shortly")
            }
            OptimizerError::Database(_) | OptimizerError::Bus(_) | OptimizerError::Subject(_) => {
                tracing::error!(error = %err, "optimizer request failed");
                Status::internal("internal error; the server log has the details")
            }
        }
    }
}

/// A target error as a sentence, without connection details.
pub(crate) fn describe(error: &sqlx::Error) -> String {
    match error {
        sqlx::Error::Database(db) => db.message().to_owned(),
        sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) => "connection lost".to_owned(),
        other => other.to_string(),
    }
}
