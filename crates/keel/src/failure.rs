//! What kind of failure an error is, and the one mapping from kinds to exit codes (README,
//! "CLI exit codes") and from error chains to the one-line message on stderr.
//!
//! The kind is decided where an error is created when the CLI creates it
//! ([`Failure::error`], [`Kind::kind`]), and otherwise read from the library errors the chain
//! carries: `tonic::Status` from Keel, `sqlx` and the auth store's errors from the state store,
//! NATS connect errors, configuration errors. The outermost decision wins.

use std::error::Error as StdError;
use std::fmt;

/// What went wrong, as far as a script needs to know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    /// An argument, setting or file the user has to fix (exit 3).
    Invalid,
    /// What the command names does not exist (exit 4).
    NotFound,
    /// A name is taken, or the thing changed or is already in the state asked for (exit 5).
    Conflict,
    /// No key, a wrong key, or a role or permission that does not allow it (exit 6).
    Auth,
    /// Keel, the state store or NATS cannot be reached or is busy: retry (exit 7).
    Unavailable,
    /// Anything else (exit 1), including a check that found something missing.
    Other,
}

impl Failure {
    /// The exit code documented for this kind.
    pub(crate) fn exit_code(self) -> u8 {
        match self {
            Failure::Other => 1,
            Failure::Invalid => 3,
            Failure::NotFound => 4,
            Failure::Conflict => 5,
            Failure::Auth => 6,
            Failure::Unavailable => 7,
        }
    }

    /// A new error of this kind, saying `message`.
    pub(crate) fn error(self, message: impl fmt::Display) -> anyhow::Error {
        self.wrap(anyhow::Error::msg(message.to_string()))
    }

    /// `error`, marked as this kind; it reads exactly as before.
    pub(crate) fn wrap(self, error: anyhow::Error) -> anyhow::Error {
        anyhow::Error::new(Tagged {
            kind: self,
            error: error.into(),
        })
    }
}

/// An error marked with its kind where it was created. Shows as the error it wraps, with the
/// same causes.
#[derive(Debug)]
struct Tagged {
    kind: Failure,
    error: Box<dyn StdError + Send + Sync + 'static>,
}

impl fmt::Display for Tagged {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.error.fmt(f)
    }
}

impl StdError for Tagged {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.error.source()
    }
}

/// Marks the error of a `Result` with a kind.
pub(crate) trait Kind<T> {
    /// The error, if any, marked as `kind`.
    fn kind(self, kind: Failure) -> anyhow::Result<T>;
}

impl<T, E: Into<anyhow::Error>> Kind<T> for Result<T, E> {
    fn kind(self, kind: Failure) -> anyhow::Result<T> {
        self.map_err(|error| kind.wrap(error.into()))
    }
}

/// Standard output was closed by its reader (`keel … | head`): the command stops writing and
/// exits quietly, as a program killed by SIGPIPE would, but with status 0.
#[derive(Debug)]
pub(crate) struct PipeClosed;

impl fmt::Display for PipeClosed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("standard output was closed")
    }
}

impl StdError for PipeClosed {}

/// Whether the command stopped because its reader went away.
pub(crate) fn is_pipe_closed(error: &anyhow::Error) -> bool {
    error.chain().any(|e| e.is::<PipeClosed>())
}

/// The kind of `error`: the first cause, from the outside in, that decides one.
pub(crate) fn classify(error: &anyhow::Error) -> Failure {
    error.chain().find_map(kind_of).unwrap_or(Failure::Other)
}

/// The kind one error in a chain decides, if it decides one (`None` looks further in).
fn kind_of(error: &(dyn StdError + 'static)) -> Option<Failure> {
    if let Some(tagged) = error.downcast_ref::<Tagged>() {
        return Some(tagged.kind);
    }
    if let Some(status) = error.downcast_ref::<tonic::Status>() {
        return Some(status_kind(status));
    }
    if let Some(error) = error.downcast_ref::<keel_auth::AuthError>() {
        return auth_kind(error);
    }
    if let Some(error) = error.downcast_ref::<keel_store::StoreError>() {
        return store_kind(error);
    }
    if let Some(error) = error.downcast_ref::<sqlx::Error>() {
        return sqlx_kind(error);
    }
    if error.is::<keel_config::ConfigError>() || error.is::<keel_bus::SubjectError>() {
        return Some(Failure::Invalid);
    }
    // These wrap others transparently: the wrapped error is not in the chain, so it is read here.
    if let Some(error) = error.downcast_ref::<keel_service::HostError>() {
        return host_kind(error);
    }
    if let Some(error) = error.downcast_ref::<keel_server::ServerError>() {
        return server_kind(error);
    }
    if let Some(error) = error.downcast_ref::<keel_bus::BusError>() {
        return bus_kind(error);
    }
    if let Some(error) = error.downcast_ref::<async_nats::ConnectError>() {
        return Some(nats_connect_kind(error.kind()));
    }
    if let Some(error) = error.downcast_ref::<std::io::Error>() {
        return io_kind(error);
    }
    None
}

fn status_kind(status: &tonic::Status) -> Failure {
    use tonic::Code;
    if is_transport_failure(status) {
        return Failure::Unavailable;
    }
    match status.code() {
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => Failure::Invalid,
        Code::NotFound => Failure::NotFound,
        Code::AlreadyExists | Code::Aborted => Failure::Conflict,
        Code::Unauthenticated | Code::PermissionDenied => Failure::Auth,
        Code::Unavailable | Code::DeadlineExceeded | Code::ResourceExhausted => {
            Failure::Unavailable
        }
        _ => Failure::Other,
    }
}

fn auth_kind(error: &keel_auth::AuthError) -> Option<Failure> {
    use keel_auth::AuthError as E;
    Some(match error {
        E::InvalidTenant(_)
        | E::InvalidName(_)
        | E::ExpiryInPast(_)
        | E::FleetRoleNotService(_) => Failure::Invalid,
        // What Keel's own code records: a bug, not the user's to fix.
        E::InvalidAuditRecord(_) => Failure::Other,
        E::MalformedKey | E::UnknownKey | E::Revoked | E::Expired => Failure::Auth,
        E::NameTaken { .. } | E::KeyConflict { .. } | E::KeyRevoked(_) => Failure::Conflict,
        E::NotFound(_) => Failure::NotFound,
        // The store's own error, further down the chain, decides.
        E::Migrate(_) | E::Database(_) => return None,
    })
}

fn store_kind(error: &keel_store::StoreError) -> Option<Failure> {
    use keel_store::StoreError as E;
    match error {
        E::InvalidUrl(_) | E::InvalidSchema(_) => Some(Failure::Invalid),
        // Not a source of the error (its text already ends with it), so read here.
        E::Connect(error) => Some(sqlx_kind(error).unwrap_or(Failure::Unavailable)),
        E::MissingDatabase { .. } => Some(Failure::NotFound),
        E::Database(error) => sqlx_kind(error),
        E::Migrate { .. } => None,
    }
}

fn host_kind(error: &keel_service::HostError) -> Option<Failure> {
    use keel_service::HostError as E;
    match error {
        E::Config(_) => Some(Failure::Invalid),
        E::Store(error) => store_kind(error),
        E::Bus(error) => bus_kind(error),
        E::Server(error) => server_kind(error),
        E::Duplicate(_) => Some(Failure::Other),
        // Their sources follow in the chain.
        E::Auth(_) | E::Migrate { .. } | E::Mount { .. } => None,
    }
}

fn server_kind(error: &keel_server::ServerError) -> Option<Failure> {
    use keel_server::ServerError as E;
    match error {
        // A certificate, key or token file to fix.
        E::Config(_) | E::Tls(_) => Some(Failure::Invalid),
        // The address is taken (or not yet free): retry, or listen elsewhere.
        E::Bind { .. } => Some(Failure::Unavailable),
        _ => None,
    }
}

fn bus_kind(error: &keel_bus::BusError) -> Option<Failure> {
    use keel_bus::BusError as E;
    match error {
        E::Connect { source, .. } => Some(
            source
                .downcast_ref::<async_nats::ConnectError>()
                .map_or(Failure::Unavailable, |e| nats_connect_kind(e.kind())),
        ),
        E::Database(error) => sqlx_kind(error),
        E::Store(error) => store_kind(error),
        E::Subject(_) | E::Invalid(_) => Some(Failure::Invalid),
        // Another deployment's stream: the name is taken.
        E::StreamMismatch { .. } => Some(Failure::Conflict),
        E::JetStream { .. } => None,
    }
}

fn sqlx_kind(error: &sqlx::Error) -> Option<Failure> {
    match error {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => Some(Failure::Unavailable),
        sqlx::Error::Configuration(_) => Some(Failure::Invalid),
        sqlx::Error::Database(db) => {
            let code = db.code();
            let code = code.as_deref().unwrap_or_default();
            Some(match code {
                // unique_violation
                "23505" => Failure::Conflict,
                // invalid_authorization_specification, invalid_password
                "28000" | "28P01" => Failure::Auth,
                // insufficient_privilege
                "42501" => Failure::Auth,
                // invalid_catalog_name: the database does not exist
                "3D000" => Failure::NotFound,
                // too_many_connections, admin/crash shutdown, cannot_connect_now,
                // lock_not_available, query_canceled (statement timeout)
                "53300" | "57P01" | "57P02" | "57P03" | "55P03" | "57014" => Failure::Unavailable,
                // connection_exception and its subclasses
                code if code.starts_with("08") => Failure::Unavailable,
                _ => Failure::Other,
            })
        }
        _ => None,
    }
}

fn nats_connect_kind(kind: async_nats::ConnectErrorKind) -> Failure {
    use async_nats::ConnectErrorKind as K;
    match kind {
        K::ServerParse => Failure::Invalid,
        K::Authentication | K::AuthorizationViolation => Failure::Auth,
        K::Dns | K::TimedOut | K::Tls | K::Io | K::MaxReconnects => Failure::Unavailable,
    }
}

fn io_kind(error: &std::io::Error) -> Option<Failure> {
    use std::io::ErrorKind as K;
    match error.kind() {
        K::NotFound | K::PermissionDenied | K::IsADirectory | K::InvalidData => {
            Some(Failure::Invalid)
        }
        K::ConnectionRefused
        | K::ConnectionReset
        | K::ConnectionAborted
        | K::NotConnected
        | K::TimedOut
        | K::HostUnreachable
        | K::NetworkUnreachable
        | K::AddrNotAvailable => Some(Failure::Unavailable),
        _ => None,
    }
}

/// A call that failed below gRPC: a reset connection or a refused client certificate, which
/// tonic reports as UNKNOWN "transport error" (cause in its sources) or CANCELLED.
pub(crate) fn is_transport_failure(status: &tonic::Status) -> bool {
    use tonic::Code;
    match status.code() {
        Code::Cancelled => true,
        Code::Unknown => StdError::source(status).is_some(),
        _ => false,
    }
}

/// Joins texts with ": ", leaving out one already said by the text before it, so a cause that
/// repeats its wrapper (`tcp connect error: tcp connect error`) is said once.
fn join_causes<'a>(texts: impl IntoIterator<Item = &'a str>) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for text in texts {
        let text = text.trim();
        if text.is_empty() || parts.last().is_some_and(|last| last.contains(text)) {
            continue;
        }
        parts.push(text);
    }
    parts.join(": ")
}

/// `error` and its causes as one line, each cause said once.
pub(crate) fn chain_text(error: &(dyn StdError + 'static)) -> String {
    let mut texts = Vec::new();
    let mut next = Some(error);
    while let Some(error) = next {
        texts.push(error.to_string());
        next = error.source();
    }
    join_causes(texts.iter().map(String::as_str))
}

/// The causes below `error` as one line, each said once (empty if there are none).
pub(crate) fn causes_text(error: &(dyn StdError + 'static)) -> String {
    error.source().map(chain_text).unwrap_or_default()
}

/// What a failed call to Keel says: the server's message, never the gRPC code (the exit code
/// carries that), or for a failure below gRPC what to look at.
fn status_text(status: &tonic::Status) -> String {
    // tonic's own text for a request that outlived Endpoint::timeout.
    if status.message().contains("Timeout expired") {
        return "Keel did not answer in time; retry, or allow longer with --timeout / KEEL_TIMEOUT"
            .to_owned();
    }
    if is_transport_failure(status) {
        let causes = causes_text(status);
        let what = join_causes([status.message(), causes.as_str()]);
        return format!(
            "the connection to Keel failed ({what}); do the TLS settings match (CA, client certificate)?"
        );
    }
    if status.message().is_empty() {
        return format!("Keel answered {}", status.code().description());
    }
    status.message().to_owned()
}

/// The message for `error`: its contexts and causes, each said once, a gRPC status as its
/// message alone.
pub(crate) fn message(error: &anyhow::Error) -> String {
    let mut texts = Vec::new();
    for cause in error.chain() {
        if let Some(status) = cause.downcast_ref::<tonic::Status>() {
            // Its sources are part of its text when they matter (a transport failure).
            texts.push(status_text(status));
            break;
        }
        texts.push(cause.to_string());
    }
    join_causes(texts.iter().map(String::as_str))
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context as _;

    #[test]
    fn a_kind_decided_where_the_error_is_created_wins_over_its_causes() {
        let not_found = std::io::Error::new(std::io::ErrorKind::NotFound, "gone");
        let error = Err::<(), _>(not_found)
            .kind(Failure::Conflict)
            .context("outer")
            .expect_err("an error");
        assert_eq!(classify(&error), Failure::Conflict);
        assert_eq!(message(&error), "outer: gone");
        assert_eq!(classify(&anyhow::anyhow!("plain")), Failure::Other);
        assert_eq!(Failure::Invalid.error("x").to_string(), "x");
    }

    #[test]
    fn library_errors_map_to_their_kind() {
        let cases: Vec<(anyhow::Error, Failure)> = vec![
            (tonic::Status::not_found("no").into(), Failure::NotFound),
            (tonic::Status::aborted("stale").into(), Failure::Conflict),
            (
                tonic::Status::resource_exhausted("slow down").into(),
                Failure::Unavailable,
            ),
            (tonic::Status::internal("bug").into(), Failure::Other),
            (sqlx::Error::PoolTimedOut.into(), Failure::Unavailable),
            (
                keel_auth::AuthError::InvalidTenant("Acme".into()).into(),
                Failure::Invalid,
            ),
            (
                keel_auth::AuthError::NotFound(uuid::Uuid::nil()).into(),
                Failure::NotFound,
            ),
            (
                keel_auth::AuthError::Database(sqlx::Error::PoolTimedOut).into(),
                Failure::Unavailable,
            ),
            (
                keel_store::StoreError::Connect(sqlx::Error::Io(std::io::Error::from(
                    std::io::ErrorKind::ConnectionRefused,
                )))
                .into(),
                Failure::Unavailable,
            ),
            (
                std::io::Error::from(std::io::ErrorKind::NotFound).into(),
                Failure::Invalid,
            ),
        ];
        for (error, kind) in cases {
            assert_eq!(classify(&error), kind, "{error:#}");
        }
    }

    #[test]
    fn every_kind_has_its_documented_exit_code() {
        let codes: Vec<u8> = [
            Failure::Other,
            Failure::Invalid,
            Failure::NotFound,
            Failure::Conflict,
            Failure::Auth,
            Failure::Unavailable,
        ]
        .iter()
        .map(|k| k.exit_code())
        .collect();
        assert_eq!(codes, [1, 3, 4, 5, 6, 7]);
    }

    #[test]
    fn a_cause_is_said_once_and_a_status_without_its_code() {
        #[derive(Debug)]
        struct Wrapper(std::io::Error);
        impl fmt::Display for Wrapper {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "cannot read /x: {}", self.0)
            }
        }
        impl StdError for Wrapper {
            fn source(&self) -> Option<&(dyn StdError + 'static)> {
                Some(&self.0)
            }
        }
        let io = std::io::Error::from_raw_os_error(2);
        let error = anyhow::Error::new(Wrapper(io)).context("--api-key-file");
        let text = message(&error);
        assert_eq!(text.matches("(os error 2)").count(), 1, "{text}");
        assert!(
            text.starts_with("--api-key-file: cannot read /x: "),
            "{text}"
        );

        assert_eq!(
            join_causes(["tcp connect error", "tcp connect error"]),
            "tcp connect error"
        );
        assert_eq!(join_causes(["a: b", "b", "c"]), "a: b: c");

        let status: anyhow::Error = tonic::Status::invalid_argument("name is required").into();
        let error = status.context("cannot add orders-db");
        assert_eq!(message(&error), "cannot add orders-db: name is required");
    }
}
