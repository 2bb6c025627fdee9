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
            match error
                .chain()
                .find_map(|e| e.downcast_ref::<tonic::Status>())
            {
                // The server's message already says what to fix; the code tells scripts what kind of failure.
                Some(status) => eprintln!("error: {} ({:?})", status.message(), status.code()),
                None => eprintln!("error: {error:#}"),
            }
            ExitCode::from(exit_code(&error))
        }
    }
}

/// Exit codes a script can act on; documented in the README.
fn exit_code(error: &anyhow::Error) -> u8 {
    use tonic::Code;
    let Some(status) = error
        .chain()
        .find_map(|e| e.downcast_ref::<tonic::Status>())
    else {
        return 1;
    };
    match status.code() {
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => 3,
        Code::NotFound => 4,
        Code::AlreadyExists | Code::Aborted => 5,
        Code::Unauthenticated | Code::PermissionDenied => 6,
        Code::Unavailable | Code::DeadlineExceeded | Code::ResourceExhausted => 7,
        _ => 1,
    }
}
