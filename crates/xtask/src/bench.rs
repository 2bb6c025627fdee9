//! `cargo xtask bench [args]`: setup, then the registry benchmark; exits with cargo's code.

use std::process::ExitCode;

use anyhow::Result;

use crate::{cmd, setup};

pub(crate) fn run(extra: &[String]) -> Result<ExitCode> {
    setup::run()?;
    let status = cmd::status(
        cmd::cargo()
            .args(["bench", "-p", "keel-registry", "--bench", "registry"])
            .args(extra),
    )?;
    Ok(cmd::exit_code(status))
}
