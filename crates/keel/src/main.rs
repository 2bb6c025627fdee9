//! `keel`: the services (`keel serve`) and the command-line client.

mod cli;
mod client;
mod commands;
mod output;
mod serve;

use std::process::ExitCode;

use clap::Parser;

use crate::cli::{Cli, Command};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve::run(*args).await,
        Command::Instance(command) => commands::instance::run(command).await,
        Command::Events(command) => commands::events::run(command).await,
        Command::Admin(command) => commands::admin::run(command).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            match status_of(&error) {
                // tonic's own text for a request that outlived Endpoint::timeout.
                Some(status) if status.message().contains("Timeout expired") => eprintln!(
                    "error: Keel did not answer in time; retry, or allow longer with --timeout / KEEL_TIMEOUT"
                ),
                Some(status) if is_transport_failure(status) => eprintln!(
                    "error: the connection to Keel failed ({}{}); do the TLS settings match (CA, client certificate)?",
                    status.message(),
                    causes(status)
                ),
                // The server's message already says what to fix; the code tells scripts what kind of failure.
                Some(status) => eprintln!("error: {} ({:?})", status.message(), status.code()),
                None => eprintln!("error: {error:#}"),
            }
            ExitCode::from(exit_code(&error))
        }
    }
}

fn status_of(error: &anyhow::Error) -> Option<&tonic::Status> {
    error
        .chain()
        .find_map(|e| e.downcast_ref::<tonic::Status>())
}

/// A call that failed below gRPC: a reset connection or a refused client certificate, which
/// tonic reports as UNKNOWN "transport error" (cause in its sources) or CANCELLED.
fn is_transport_failure(status: &tonic::Status) -> bool {
    use tonic::Code;
    match status.code() {
        Code::Cancelled => true,
        Code::Unknown => std::error::Error::source(status).is_some(),
        _ => false,
    }
}

/// The chain of causes below an error, as ": cause: cause".
pub(crate) fn causes(error: &dyn std::error::Error) -> String {
    let mut causes = String::new();
    let mut source = error.source();
    while let Some(inner) = source {
        causes.push_str(&format!(": {inner}"));
        source = inner.source();
    }
    causes
}

/// Exit codes a script can act on; documented in the README.
fn exit_code(error: &anyhow::Error) -> u8 {
    use tonic::Code;
    let Some(status) = status_of(error) else {
        return 1;
    };
    if is_transport_failure(status) {
        return 7;
    }
    match status.code() {
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => 3,
        Code::NotFound => 4,
        Code::AlreadyExists | Code::Aborted => 5,
        Code::Unauthenticated | Code::PermissionDenied => 6,
        Code::Unavailable | Code::DeadlineExceeded | Code::ResourceExhausted => 7,
        _ => 1,
    }
}
