//! The README's laptop walkthrough, run from top to bottom by bash on a fresh state-store
//! database, with the `keel` binary of this build on PATH. Only what differs on a test machine
//! is replaced (the PostgreSQL server's address, free ports, this run's NATS stream), each
//! replacement checked to have found its text, so an edit of the README that this test does
//! not follow fails here instead of going unrun.

use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};

const MARKER: &str = "<!-- laptop walkthrough";

/// The fenced `sh` block after the marker.
fn walkthrough(readme: &str) -> anyhow::Result<String> {
    let after = readme
        .split_once(MARKER)
        .context("README.md has no laptop walkthrough marker")?
        .1;
    let body = after
        .split_once("```sh\n")
        .context("no ```sh block after the marker")?
        .1;
    let (block, _) = body.split_once("\n```").context("unterminated block")?;
    Ok(block.to_owned())
}

/// Replaces every `from` in `text`, failing when there is none.
fn replace(text: &str, from: &str, to: &str) -> anyhow::Result<String> {
    ensure!(
        text.contains(from),
        "the walkthrough no longer contains {from:?}; update tests/tests/readme.rs"
    );
    Ok(text.replace(from, to))
}

/// `(host, port, user)` of a `postgres://user@host:port/db` URL.
fn server_of(url: &str) -> anyhow::Result<(String, String, String)> {
    let rest = url
        .strip_prefix("postgres://")
        .context("a postgres:// URL")?;
    let (user, rest) = rest.split_once('@').context("a user in the URL")?;
    let (address, _) = rest.split_once('/').context("a database in the URL")?;
    let (host, port) = address.rsplit_once(':').context("a port in the URL")?;
    Ok((host.to_owned(), port.to_owned(), user.to_owned()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_laptop_walkthrough_runs_from_top_to_bottom() -> anyhow::Result<()> {
    let env = keel_testkit::TestEnv::new();
    // A database of the test server: the "laptop's own PostgreSQL" the walkthrough watches.
    let watched = env.database().await?;
    let nats_url = env.nats_url().await?;
    let (host, port, user) = server_of(&watched.url)?;
    let state_store = format!("readme_{}", uuid_suffix());
    let state_url = format!("postgres://{user}@{host}:{port}/{state_store}");
    let (grpc, http) = (keel_testkit::free_port()?, keel_testkit::free_port()?);

    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"))?;
    let mut script = walkthrough(&readme)?;
    script = replace(
        &script,
        "cargo install --locked --path crates/keel",
        ": already built",
    )?;
    script = replace(
        &script,
        "createdb -h 127.0.0.1 -p 5432 -U postgres keel",
        &format!("createdb -h {host} -p {port} -U {user} {state_store}"),
    )?;
    script = replace(
        &script,
        "postgres://postgres@127.0.0.1:5432/keel",
        &state_url,
    )?;
    script = replace(
        &script,
        "postgres://postgres@127.0.0.1:5432/postgres",
        &watched.url,
    )?;
    script = replace(
        &script,
        "postgres://app:secret@127.0.0.1:5432/shop",
        &format!("postgres://app:secret@{host}:{port}/shop"),
    )?;
    script = replace(
        &script,
        "http://127.0.0.1:9090/",
        &format!("http://127.0.0.1:{http}/"),
    )?;
    // Every failing command is reported with its status; the walkthrough goes on, as a person
    // reading it would.
    let script =
        format!("set -u\ntrap 'echo \"STEP FAILED ($?): $BASH_COMMAND\" >&2' ERR\n{script}\n");

    let keel = keel_e2e::keel_binary()?;
    let bin_dir = keel.parent().context("keel has a directory")?;
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let work = tempfile::tempdir()?;
    let mut command = Command::new("bash");
    command
        .arg("-c")
        .arg(&script)
        .current_dir(work.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so that whatever it left running is stopped below.
        .process_group(0);
    for (name, _) in std::env::vars().filter(|(name, _)| name.starts_with("KEEL_")) {
        command.env_remove(name);
    }
    let subject_root = format!("readme{}", uuid_suffix());
    command
        .env("PATH", path)
        .env("KEEL_GRPC_LISTEN", format!("127.0.0.1:{grpc}"))
        .env("KEEL_HTTP_LISTEN", format!("127.0.0.1:{http}"))
        .env("KEEL_ENDPOINT", format!("http://127.0.0.1:{grpc}"))
        .env("KEEL_NATS_URL", &nats_url)
        .env("KEEL_NATS_STREAM", subject_root.to_uppercase())
        .env("KEEL_NATS_SUBJECT_ROOT", &subject_root);
    let child = command.spawn().context("starting bash")?;
    let group = child.id();
    let output = tokio::task::spawn_blocking(move || child.wait_with_output());
    let output = match tokio::time::timeout(Duration::from_secs(120), output).await {
        Ok(output) => output??,
        Err(_) => {
            stop_group(group);
            bail!("the walkthrough did not finish within 120 s");
        }
    };
    stop_group(group);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let log = std::fs::read_to_string(work.path().join("keel.log")).unwrap_or_default();
    let tail = std::fs::read_to_string(work.path().join("tail.err")).unwrap_or_default();
    let report = format!(
        "--- stdout\n{stdout}\n--- stderr\n{stderr}\n--- keel.log\n{log}\n--- tail.err\n{tail}"
    );
    drop_database(&watched.url, &state_store).await;

    ensure!(output.status.success(), "the walkthrough failed\n{report}");
    // The check of a laptop's PostgreSQL may find something missing (exit 1, with the fix);
    // any other failing step is a broken walkthrough.
    for failed in stderr.lines().filter(|l| l.starts_with("STEP FAILED")) {
        ensure!(
            failed.starts_with("STEP FAILED (1): keel instance check laptop-pg"),
            "{failed}\n{report}"
        );
    }
    for expected in [
        "laptop-pg",
        "orders-db",
        "postgres://app:****@",
        "keel_build_info{",
    ] {
        ensure!(stdout.contains(expected), "no {expected:?} in\n{report}");
    }
    ensure!(
        !stdout.contains("secret"),
        "the password was printed\n{report}"
    );
    // `events tail` saw the changes made after it started.
    for event in ["created", "updated", "deleted"] {
        ensure!(
            stdout
                .lines()
                .any(|l| l.contains(event) && l.contains("acme")),
            "events tail printed no {event:?} event of acme\n{report}"
        );
    }
    // Server logs: plain text in a file, no migration notices, serving once bound.
    ensure!(
        !log.contains('\u{1b}'),
        "ANSI colours in the log file\n{report}"
    );
    ensure!(!log.contains("already exists, skipping"), "{report}");
    ensure!(
        !log.contains("secret"),
        "the password reached the log\n{report}"
    );
    ensure!(log.contains("serving"), "{report}");
    Ok(())
}

fn uuid_suffix() -> String {
    format!(
        "{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default()
            ^ u128::from(std::process::id())
    )
}

/// Stops every process of the walkthrough's group (a `keel serve &` left by a failed run).
fn stop_group(group: u32) {
    let _ = Command::new("kill")
        .args(["-TERM", "--", &format!("-{group}")])
        .stderr(Stdio::null())
        .status();
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        let alive = Command::new("kill")
            .args(["-0", "--", &format!("-{group}")])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !alive {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{group}")])
        .status();
}

/// Drops the walkthrough's state store; best effort, as the server may be gone already.
async fn drop_database(server_url: &str, name: &str) {
    use sqlx::Connection as _;
    let Ok(mut admin) = sqlx::PgConnection::connect(server_url).await else {
        return;
    };
    let _ = sqlx::query(&format!(r#"DROP DATABASE IF EXISTS "{name}" WITH (FORCE)"#))
        .execute(&mut admin)
        .await;
}
