//! Running programs: each command is printed before it runs, and a failure names the command.
//! Also the few facts about the checkout every command needs (root, target dir, privileges).

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, ExitStatus, Stdio};

use anyhow::{Context, Result, bail};

/// Prints `$ program args…` (passwords in URLs masked) for a command about to run.
pub(crate) fn show(cmd: &Command) {
    eprintln!("$ {}", display(cmd));
}

/// Prints a progress line for a step that is not a command.
pub(crate) fn step(what: impl std::fmt::Display) {
    eprintln!("==> {what}");
}

/// Runs `cmd` to completion; fails unless it exits 0.
pub(crate) fn run(cmd: &mut Command) -> Result<()> {
    let status = status(cmd)?;
    if !status.success() {
        bail!("`{}` failed ({status})", display(cmd));
    }
    Ok(())
}

/// Runs `cmd` to completion and returns how it exited, whatever that was.
pub(crate) fn status(cmd: &mut Command) -> Result<ExitStatus> {
    show(cmd);
    cmd.status()
        .with_context(|| format!("cannot start `{}`", display(cmd)))
}

/// Runs `cmd` with stdout captured (stderr passes through); fails unless it exits 0.
pub(crate) fn output(cmd: &mut Command) -> Result<String> {
    show(cmd);
    let out = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("cannot start `{}`", display(cmd)))?;
    if !out.status.success() {
        bail!("`{}` failed ({})", display(cmd), out.status);
    }
    String::from_utf8(out.stdout)
        .with_context(|| format!("`{}` printed non-UTF-8 output", display(cmd)))
}

/// Runs `cmd` silently and tells whether it exited 0 (for probes such as `dpkg-query`).
pub(crate) fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The exit code to hand on for a child's status (a signal counts as 1).
pub(crate) fn exit_code(status: ExitStatus) -> ExitCode {
    status
        .code()
        .and_then(|c| u8::try_from(c).ok())
        .map_or(ExitCode::FAILURE, ExitCode::from)
}

/// `cargo`, the same one that runs this xtask, started in the workspace root.
pub(crate) fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(root());
    cmd
}

/// The workspace root (two levels above this crate's manifest).
pub(crate) fn root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest
        .ancestors()
        .nth(2)
        .unwrap_or(manifest)
        .to_path_buf()
}

/// Cargo's target directory: `CARGO_TARGET_DIR` (relative to the root), else `<root>/target`.
pub(crate) fn target_dir() -> PathBuf {
    let configured = ["CARGO_TARGET_DIR", "CARGO_BUILD_TARGET_DIR"]
        .into_iter()
        .find_map(|name| std::env::var_os(name).filter(|v| !v.is_empty()));
    match configured {
        Some(dir) => root().join(dir),
        None => root().join("target"),
    }
}

/// Whether `program` is an executable file somewhere on `PATH`.
pub(crate) fn on_path(program: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let Some(path) = std::env::var_os("PATH") else {
        return false;
    };
    std::env::split_paths(&path).any(|dir| {
        std::fs::metadata(dir.join(program))
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    })
}

/// Whether this process runs as root (effective uid 0).
pub(crate) fn is_root() -> bool {
    if let Ok(status) = std::fs::read_to_string("/proc/self/status")
        && let Some(line) = status.lines().find(|l| l.starts_with("Uid:"))
    {
        // Uid: real effective saved filesystem
        return line.split_whitespace().nth(2) == Some("0");
    }
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0")
}

/// A command line as text, quoted for a POSIX shell, with URL passwords masked.
pub(crate) fn display(cmd: &Command) -> String {
    // `cargo()` runs the cargo named by $CARGO, a long toolchain path: show it as plain `cargo`.
    let program = match std::env::var_os("CARGO") {
        Some(cargo) if cmd.get_program() == cargo => OsStr::new("cargo"),
        _ => cmd.get_program(),
    };
    std::iter::once(program)
        .chain(cmd.get_args())
        .map(quote)
        .collect::<Vec<_>>()
        .join(" ")
}

fn quote(arg: &OsStr) -> String {
    let arg = mask_url_password(&arg.to_string_lossy());
    let plain = !arg.is_empty()
        && arg
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./:=@,+%".contains(&b));
    if plain {
        arg
    } else if arg.contains('\'') && !arg.contains(['"', '$', '`', '\\', '!']) {
        format!("\"{arg}\"")
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

/// `postgres://app:secret@db/x` → `postgres://app:****@db/x`; anything else unchanged.
pub(crate) fn mask_url_password(text: &str) -> String {
    let Some(scheme_end) = text.find("://") else {
        return text.to_owned();
    };
    let rest = &text[scheme_end + 3..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let Some(at) = authority.rfind('@') else {
        return text.to_owned();
    };
    let Some(colon) = authority[..at].find(':') else {
        return text.to_owned();
    };
    let password_start = scheme_end + 3 + colon + 1;
    let password_end = scheme_end + 3 + at;
    format!("{}****{}", &text[..password_start], &text[password_end..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_passwords_only() {
        let check = |input: &str, expected: &str| assert_eq!(mask_url_password(input), expected);
        check(
            "postgres://app:s3cr:et@db:5432/shop",
            "postgres://app:****@db:5432/shop",
        );
        check(
            "postgres://postgres@127.0.0.1:5432/keel",
            "postgres://postgres@127.0.0.1:5432/keel",
        );
        check("nats://127.0.0.1:4222", "nats://127.0.0.1:4222");
        check("--label", "--label");
        check("http://h/p?x=a:b@c", "http://h/p?x=a:b@c");
    }

    #[test]
    fn quotes_for_the_shell() {
        let mut cmd = Command::new("psql");
        cmd.args(["-c", "SELECT 1", "it's", "$it's", "postgres://u:p@h/db", ""]);
        assert_eq!(
            display(&cmd),
            r#"psql -c 'SELECT 1' "it's" '$it'\''s' 'postgres://u:****@h/db' ''"#
        );
    }
}
