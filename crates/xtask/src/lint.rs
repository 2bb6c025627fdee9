//! `cargo xtask lint`: rustfmt, clippy and buf. Runs all three and fails if any failed.

use std::process::{Command, ExitCode};

use anyhow::Result;

use crate::cmd;

pub(crate) fn run() -> Result<ExitCode> {
    let mut fmt = cmd::cargo();
    fmt.args(["fmt", "--all", "--", "--check"]);
    let mut clippy = cmd::cargo();
    clippy.args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]);
    let mut checks = vec![("rustfmt", fmt), ("clippy", clippy)];
    if cmd::on_path("npx") {
        let mut buf = Command::new("npx");
        buf.args(["--yes", "@bufbuild/buf", "lint"])
            .current_dir(cmd::root());
        checks.push(("buf", buf));
    } else {
        eprintln!(
            "lint: warning: npx not found, skipping `buf lint` of proto/ (install Node.js and npm)"
        );
    }

    let mut failed = Vec::new();
    for (name, mut check) in checks {
        if !cmd::status(&mut check)?.success() {
            failed.push(name);
        }
    }
    if failed.is_empty() {
        eprintln!("lint: all clean");
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("lint: failed: {}", failed.join(", "));
        Ok(ExitCode::FAILURE)
    }
}
