//! `cargo xtask bench [args]`: setup, then the registry, outbox, collector and optimizer (TPC-H)
//! benchmarks; exits with the first failing cargo's code.

use std::process::ExitCode;

use anyhow::Result;

use crate::{cmd, setup};

pub(crate) fn run(extra: &[String]) -> Result<ExitCode> {
    setup::run()?;
    for (package, bench) in [
        ("keel-registry", "registry"),
        ("keel-bus", "outbox"),
        ("keel-e2e", "collector"),
        ("keel-optimizer", "tpch"),
    ] {
        let status = cmd::status(
            cmd::cargo()
                .args(["bench", "-p", package, "--bench", bench])
                .args(extra),
        )?;
        if !status.success() {
            return Ok(cmd::exit_code(status));
        }
    }
    Ok(ExitCode::SUCCESS)
}
