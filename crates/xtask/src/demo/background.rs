//! A server started in the background, logging to a file, and stopped when dropped.
//!
//! Ctrl-C reaches every process of the terminal's foreground group, so the servers started here get
//! it too and shut down by themselves; the drop handles every other way out (`--once`, an error).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::cmd;

/// How to ask a server to shut down.
#[derive(Debug)]
pub(crate) enum Stop {
    /// Send SIGTERM to the process.
    Term,
    /// Run this command (e.g. `pg_ctl stop`, which works across `runuser`).
    Command(Command),
}

#[derive(Debug)]
pub(crate) struct Background {
    name: &'static str,
    child: Child,
    log: PathBuf,
    stop: Option<Stop>,
}

impl Background {
    /// Starts `command` with stdout and stderr appended to `log`.
    pub(crate) fn spawn(
        name: &'static str,
        mut command: Command,
        log: &Path,
        stop: Stop,
    ) -> Result<Self> {
        let file = File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
        command
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file);
        eprintln!("$ {} >{} 2>&1 &", cmd::display(&command), log.display());
        let child = command
            .spawn()
            .with_context(|| format!("cannot start `{}`", cmd::display(&command)))?;
        Ok(Self {
            name,
            child,
            log: log.to_path_buf(),
            stop: Some(stop),
        })
    }

    pub(crate) fn log(&self) -> &Path {
        &self.log
    }

    /// Fails, quoting the end of the log, if the process has already exited.
    pub(crate) fn check_running(&mut self) -> Result<()> {
        match self.child.try_wait()? {
            None => Ok(()),
            Some(status) => Err(self.died(status)),
        }
    }

    /// Waits until the process exits by itself (or is interrupted along with this one).
    pub(crate) fn wait(&mut self) -> Result<ExitStatus> {
        Ok(self.child.wait()?)
    }

    /// An error saying the process exited, with the last lines of its log.
    pub(crate) fn died(&self, status: ExitStatus) -> anyhow::Error {
        anyhow::anyhow!(
            "{} exited ({status}); last lines of {}:\n{}",
            self.name,
            self.log.display(),
            self.tail(30)
        )
    }

    /// The last `lines` lines of the log.
    pub(crate) fn tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    fn stop(&mut self) {
        let Some(stop) = self.stop.take() else { return };
        if !matches!(self.child.try_wait(), Ok(None)) {
            return;
        }
        cmd::step(format!("stopping {}", self.name));
        let asked = match stop {
            Stop::Term => {
                cmd::run(Command::new("kill").args(["-TERM", &self.child.id().to_string()]))
            }
            Stop::Command(mut command) => cmd::run(command.stdout(Stdio::null())),
        };
        if asked.is_ok() && wait_timeout(&mut self.child, Duration::from_secs(25)) {
            return;
        }
        eprintln!("xtask: {} did not stop in time, killing it", self.name);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Polls until `child` exits; false if it is still running after `timeout`.
fn wait_timeout(child: &mut Child, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        match child.try_wait() {
            Ok(Some(_)) | Err(_) => return true,
            Ok(None) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
    false
}
