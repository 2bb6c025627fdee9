//! `cargo xtask test [args]`: setup, then the whole workspace's tests; exits with cargo's code.

use std::process::ExitCode;

use anyhow::Result;

use crate::{cmd, setup};

pub(crate) fn run(extra: &[String]) -> Result<ExitCode> {
    setup::run()?;
    let status = cmd::status(
        cmd::cargo()
            .args(["test", "--workspace", "--all-targets"])
            .args(extra),
    )?;
    Ok(cmd::exit_code(status))
}
