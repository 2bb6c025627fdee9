//! Child servers, their scratch directories and how they are stopped.

use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::Once;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// Runs a server under `sh` and stops it once the pipe on the wrapper's stdin reaches EOF.
///
/// The test process holds the only write end of that pipe and never writes to it, so EOF means
/// "the harness dropped the server" or "the test process is gone" — including SIGKILL and a
/// panic that aborts, which no `Drop` and no `atexit` would see. This needs no unsafe code (unlike
/// `PR_SET_PDEATHSIG`, which also fires when the spawning *thread* exits) and no polling.
/// Background jobs of a non-interactive shell get `/dev/null` as stdin, hence the copy on fd 3.
/// After the server exits, the wrapper removes the scratch directory.
const WRAPPER: &str = r#"
sig=$1
dir=$2
shift 2
exec 3<&0
"$@" 3<&- </dev/null &
pid=$!
( read -r line <&3; kill -s "$sig" "$pid" 2>/dev/null ) &
exec 3<&-
wait "$pid"
status=$?
rm -rf "$dir"
exit "$status"
"#;

/// How long `Drop` waits for a stopped server before it gives up on it.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// A server process started through [`WRAPPER`].
#[derive(Debug)]
pub(crate) struct Supervised {
    name: &'static str,
    child: Child,
    /// Dropping this is what stops the server.
    stdin: Option<ChildStdin>,
    /// Read handle on the server's output; still readable after the wrapper deleted the file.
    log: File,
    dir: PathBuf,
}

/// What to start and how.
pub(crate) struct Spec<'a> {
    /// Short name for messages (`postgres`, `nats-server`).
    pub(crate) name: &'static str,
    pub(crate) program: &'a Path,
    pub(crate) args: Vec<&'a OsStr>,
    /// Signal the server is stopped with (`QUIT` is PostgreSQL's immediate shutdown).
    pub(crate) stop_signal: &'static str,
    /// Scratch directory, removed when the server stops; the log file is written into it.
    pub(crate) dir: &'a Path,
    /// `(uid, gid)` to run as, for PostgreSQL when the tests run as root.
    pub(crate) user: Option<(u32, u32)>,
}

impl Supervised {
    pub(crate) fn spawn(spec: Spec<'_>) -> anyhow::Result<Self> {
        let log_path = spec.dir.join(format!("{}.log", spec.name));
        let log = File::options()
            .read(true)
            .append(true)
            .create(true)
            .open(&log_path)
            .with_context(|| format!("create {}", log_path.display()))?;
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c")
            .arg(WRAPPER)
            .arg("sh")
            .arg(spec.stop_signal)
            .arg(spec.dir)
            .arg(spec.program)
            .args(&spec.args)
            .current_dir(spec.dir)
            .stdin(Stdio::piped())
            .stdout(log.try_clone()?)
            .stderr(log.try_clone()?);
        if let Some((uid, gid)) = spec.user {
            cmd.uid(uid).gid(gid);
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("start {} through /bin/sh", spec.program.display()))?;
        let stdin = child.stdin.take();
        Ok(Self {
            name: spec.name,
            child,
            stdin,
            log,
            dir: spec.dir.to_owned(),
        })
    }

    /// `Some` once the server (and so its wrapper) has exited.
    pub(crate) fn exited(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        self.child
            .try_wait()
            .with_context(|| format!("poll the {} process", self.name))
    }

    /// The last lines the server logged, for error messages.
    pub(crate) fn log_tail(&self) -> String {
        const MAX: u64 = 4096;
        let mut file = &self.log;
        let mut text = String::new();
        let Ok(len) = file.seek(SeekFrom::End(0)) else {
            return text;
        };
        if file.seek(SeekFrom::Start(len.saturating_sub(MAX))).is_ok() {
            let mut bytes = Vec::new();
            if file.read_to_end(&mut bytes).is_ok() {
                text = String::from_utf8_lossy(&bytes).into_owned();
            }
        }
        let lines: Vec<&str> = text.lines().collect();
        let skip = lines.len().saturating_sub(30);
        lines[skip..].join("\n")
    }

    /// An error saying the server exited or did not get ready, with its log.
    /// An early exit is an [`ExitedEarly`], which callers retry.
    pub(crate) fn failure(&mut self, what: &str) -> anyhow::Error {
        match self.exited() {
            Ok(Some(status)) => anyhow::Error::new(ExitedEarly(format!(
                "{what}: {} exited ({status}); log tail:\n{}",
                self.name,
                self.log_tail()
            ))),
            _ => anyhow::anyhow!(
                "{what}: {} is running; log tail:\n{}",
                self.name,
                self.log_tail()
            ),
        }
    }
}

/// The server exited before it was ready, typically because another process took the port
/// between [`free_port`] and the server binding it; worth another attempt on a new port.
#[derive(Debug)]
pub(crate) struct ExitedEarly(String);

impl std::fmt::Display for ExitedEarly {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ExitedEarly {}

/// Whether a failed start is worth retrying.
pub(crate) fn is_retryable(error: &anyhow::Error) -> bool {
    error.downcast_ref::<ExitedEarly>().is_some()
}

impl Drop for Supervised {
    fn drop(&mut self) {
        // Closing the pipe makes the wrapper stop the server and remove its directory.
        drop(self.stdin.take());
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                _ => {
                    tracing::warn!(
                        name = self.name,
                        "server did not stop in time; killing its wrapper"
                    );
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    break;
                }
            }
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A port that was free a moment ago. Another process may take it before the server binds it,
/// so callers retry a failed start on a new port.
pub fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("bind 127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// `<temp>/keel-testkit`, created world-writable and sticky (like `/tmp`) so that the
/// `postgres` user can remove its own directories there.
fn scratch_root() -> anyhow::Result<PathBuf> {
    let root = std::env::temp_dir().join("keel-testkit");
    fs::create_dir_all(&root).with_context(|| format!("create {}", root.display()))?;
    // Only the owner may change the mode; someone else's root directory is fine as it is.
    let _ = fs::set_permissions(&root, fs::Permissions::from_mode(0o1777));
    Ok(root)
}

/// A new scratch directory `<temp>/keel-testkit/<pid>-<kind>-XXXXXX`. It is not deleted on drop:
/// the wrapper removes it when the server stops, and [`remove_stale`] catches the rest.
pub(crate) fn scratch_dir(kind: &str) -> anyhow::Result<PathBuf> {
    static CLEANUP: Once = Once::new();
    let root = scratch_root()?;
    CLEANUP.call_once(|| remove_stale(&root));
    let dir = tempfile::Builder::new()
        .prefix(&format!("{}-{kind}-", std::process::id()))
        .tempdir_in(&root)
        .with_context(|| format!("create a directory in {}", root.display()))?;
    Ok(dir.keep())
}

/// Best effort: remove directories left by test processes that no longer run (killed before the
/// wrapper could clean up, or a wrapper killed by the `Drop` timeout).
fn remove_stale(root: &Path) {
    let Ok(entries) = fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.split_once('-'))
            .and_then(|(pid, _)| pid.parse::<u32>().ok())
        else {
            continue;
        };
        // A reused pid only means the directory survives until a later run.
        if pid != std::process::id() && !Path::new("/proc").join(pid.to_string()).exists() {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

/// Whether this process runs with effective uid 0 (read from `/proc` to stay free of unsafe code).
pub(crate) fn running_as_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().nth(1).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

/// `(uid, gid)` of an OS user, from `/etc/passwd`.
pub(crate) fn lookup_user(name: &str) -> anyhow::Result<(u32, u32)> {
    let passwd = fs::read_to_string("/etc/passwd").context("read /etc/passwd")?;
    for line in passwd.lines() {
        let mut fields = line.split(':');
        if fields.next() != Some(name) {
            continue;
        }
        let mut ids = fields.skip(1).take(2).map(str::parse::<u32>);
        if let (Some(Ok(uid)), Some(Ok(gid))) = (ids.next(), ids.next()) {
            return Ok((uid, gid));
        }
        bail!("malformed /etc/passwd entry for {name}");
    }
    bail!("there is no OS user `{name}` (the Debian postgresql packages create it)")
}

/// Finds `name` on `PATH`, then in the sbin directories Debian uses (`nats-server` lives in
/// `/usr/sbin`, which is not on a normal user's `PATH`).
pub(crate) fn find_program(name: &str, debian_package: &str) -> anyhow::Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/bin", "/usr/local/bin", "/usr/local/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
        .with_context(|| format!("`{name}` not found on PATH: apt-get install {debian_package}"))
}
