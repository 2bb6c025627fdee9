//! `keel`: the services (`keel serve`) and the command-line client.

mod cli;
mod client;
mod collector;
mod commands;
mod failure;
mod optimizer;
mod output;
mod serve;
mod table;

use std::process::ExitCode;

use clap::{CommandFactory as _, Parser as _};

use crate::cli::{Cli, Command};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve::run(*args).await,
        Command::Instance(command) => commands::instance::run(command).await,
        Command::Metrics(args) => commands::metrics::run(args).await,
        Command::Queries(command) => commands::queries::run(command).await,
        Command::Alerts(command) => commands::alerts::run(command).await,
        Command::Optimize(args) => commands::optimize::run(args).await,
        Command::Recs(command) => commands::recs::run(command).await,
        Command::Events(command) => commands::events::run(command).await,
        Command::Admin(command) => commands::admin::run(command).await,
        Command::Completion { shell } => completion(shell),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // The reader went away (`keel … | head`): nothing more to say, nobody to say it to.
        Err(error) if failure::is_pipe_closed(&error) => ExitCode::SUCCESS,
        Err(error) => {
            output::note(format_args!("error: {}", failure::message(&error)));
            ExitCode::from(failure::classify(&error).exit_code())
        }
    }
}

/// Writes the completion script for `shell`.
fn completion(shell: clap_complete::Shell) -> anyhow::Result<()> {
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "keel", &mut script);
    output::print(String::from_utf8_lossy(&script).trim_end())
}
