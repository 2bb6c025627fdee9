//! Running a real `keel serve` child for this crate's integration tests: free ports, start,
//! readiness, logs.
#![allow(dead_code, unreachable_pub)] // each test binary uses a different part

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const KEEL: &str = env!("CARGO_BIN_EXE_keel");

/// A loopback port nothing listens on right now.
pub fn free_port() -> u16 {
    keel_testkit::free_port().expect("a free port")
}

/// `env` with each of `extra` replacing the setting of the same name, or added.
pub fn with_overrides(
    mut env: Vec<(&'static str, String)>,
    extra: &[(&'static str, String)],
) -> Vec<(&'static str, String)> {
    for (name, value) in extra {
        env.retain(|(k, _)| k != name);
        env.push((name, value.clone()));
    }
    env
}

/// Starts `keel serve` with `env`, its stdout and stderr in `dir/serve.log` and `dir/serve.err`
/// (files, not a terminal: what a container runtime or systemd hands the server). An
/// encryption key ring or `NO_COLOR` of the test's own environment never reaches it.
pub fn spawn_serve(env: &[(&'static str, String)], dir: &Path) -> Child {
    let mut command = Command::new(KEEL);
    command.arg("serve").env_remove("NO_COLOR");
    if !env.iter().any(|(k, _)| *k == "KEEL_ENCRYPTION_KEYS") {
        command.env_remove("KEEL_ENCRYPTION_KEYS");
    }
    command
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(dir.join("serve.log")).expect("log"))
        .stderr(std::fs::File::create(dir.join("serve.err")).expect("log"))
        .spawn()
        .expect("spawn keel serve")
}

/// What the server in `dir` has logged so far, stdout then stderr.
pub fn serve_log(dir: &Path) -> String {
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap_or_default();
    format!("{}{}", read("serve.log"), read("serve.err"))
}

/// Waits until `/readyz` on `http` answers 200, failing with the server's log after `within`.
pub async fn wait_ready(http: u16, within: Duration, dir: &Path) {
    let deadline = Instant::now() + within;
    loop {
        if http_get(http, "/readyz")
            .await
            .is_some_and(|r| r.starts_with("HTTP/1.1 200") || r.starts_with("HTTP/1.0 200"))
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "keel serve not ready; log:\n{}",
            serve_log(dir)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The whole HTTP/1.0 response to `GET path`, or None when the server cannot be reached.
pub async fn http_get(port: u16, path: &str) -> Option<String> {
    http_get_with(port, path, &[]).await
}

/// [`http_get`] with request `headers`, e.g. `("authorization", "Bearer …")`.
pub async fn http_get_with(port: u16, path: &str, headers: &[(&str, &str)]) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    let mut request = format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    Some(response)
}

/// The command's standard output, after asserting its exit code and that its standard error
/// contains `stderr_needle`.
#[track_caller]
pub fn expect_exit(output: &Output, code: i32, stderr_needle: &str) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(code),
        "stdout: {stdout}\nstderr: {stderr}"
    );
    assert!(
        stderr.contains(stderr_needle),
        "stderr {stderr:?} lacks {stderr_needle:?}"
    );
    stdout
}
