//! Keel's project automation, run as `cargo xtask <command>` (an alias in `.cargo/config.toml`).
//!
//! Plain `std` plus `anyhow`, so it compiles in seconds on a fresh machine. Each command lives in
//! its own module; every external program runs through [`cmd`], which prints it first.

mod bench;
mod cmd;
mod demo;
mod lint;
mod setup;
mod test;

use std::process::ExitCode;

use anyhow::{Result, bail};

const USAGE: &str = "\
usage: cargo xtask <command> [args]

commands:
  setup              install the Debian packages tests, benches and the demo need (idempotent)
  test [args]        setup, then `cargo test --workspace --all-targets [args]`
  lint               cargo fmt --check, cargo clippy -D warnings, buf lint (via npx)
  demo [--once]      setup, start PostgreSQL and NATS if none answer, run `keel serve --target all`,
                     register the local PostgreSQL; --once stops everything when the steps are done
  bench [args]       setup, then the registry, outbox and collector benchmarks (`cargo bench … [args]`)";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (command, rest) = match args.split_first() {
        Some((command, rest)) => (command.as_str(), rest),
        None => ("help", &[][..]),
    };
    match dispatch(command, rest) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("xtask {command}: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(command: &str, rest: &[String]) -> Result<ExitCode> {
    match command {
        "setup" => {
            no_args(command, rest)?;
            setup::run()?;
            Ok(ExitCode::SUCCESS)
        }
        "test" => test::run(rest),
        "lint" => {
            no_args(command, rest)?;
            lint::run()
        }
        "demo" => demo::run(demo::Options::parse(rest)?),
        "bench" => bench::run(rest),
        "help" | "-h" | "--help" => {
            println!("{USAGE}");
            Ok(ExitCode::SUCCESS)
        }
        other => bail!("unknown command {other:?}\n\n{USAGE}"),
    }
}

fn no_args(command: &str, rest: &[String]) -> Result<()> {
    if let Some(arg) = rest.first() {
        bail!("`{command}` takes no arguments, got {arg:?}");
    }
    Ok(())
}
