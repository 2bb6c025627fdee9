//! `cargo xtask demo [--once]`: Keel on a laptop, from nothing to a registered, checked and
//! scraped instance.
//!
//! setup → `cargo build -p keel` → PostgreSQL and NATS (see [`backing`]) → an admin API key →
//! `keel serve --target all` in the background, plaintext on loopback, /metrics behind a fresh
//! token → wait for /readyz → register and check the local PostgreSQL → keep serving until
//! Ctrl-C (or stop at once with `--once`).

mod background;
mod backing;
mod net;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use self::background::{Background, Stop};
use self::backing::env;
use crate::{cmd, setup};

#[derive(Debug, Clone, Copy)]
pub(crate) struct Options {
    /// Stop everything once the steps are done instead of serving until Ctrl-C.
    once: bool,
}

impl Options {
    pub(crate) fn parse(args: &[String]) -> Result<Self> {
        let mut options = Self { once: false };
        for arg in args {
            match arg.as_str() {
                "--once" => options.once = true,
                other => bail!("unknown demo option {other:?} (expected --once)"),
            }
        }
        Ok(options)
    }
}

pub(crate) fn run(options: Options) -> Result<ExitCode> {
    setup::run()?;
    let demo_dir = cmd::target_dir().join("demo");
    std::fs::create_dir_all(&demo_dir)
        .with_context(|| format!("cannot create {}", demo_dir.display()))?;

    // Build and check the ports first: a mistake there should not leave servers behind.
    cmd::run(cmd::cargo().args(["build", "-p", "keel"]))?;
    let bin = cmd::target_dir().join("debug").join("keel");
    if !bin.is_file() {
        bail!("`cargo build -p keel` left no binary at {}", bin.display());
    }
    let http = loopback_addr("KEEL_HTTP_LISTEN", "127.0.0.1:9090")?;
    let grpc = loopback_addr("KEEL_GRPC_LISTEN", "127.0.0.1:50051")?;
    for addr in [&http, &grpc] {
        if net::answers(addr) {
            bail!(
                "something already listens on {addr} (another keel?): stop it, or set \
                 KEEL_HTTP_LISTEN/KEEL_GRPC_LISTEN"
            );
        }
    }

    // Declared before the server so they are dropped (stopped) after it.
    let postgres = backing::postgres(&demo_dir)?;
    let nats = backing::nats(&demo_dir)?;
    let mut env = vec![
        ("KEEL_DATABASE_URL", postgres.url.clone()),
        ("KEEL_NATS_URL", nats.url.clone()),
        (
            "KEEL_ENDPOINT",
            env("KEEL_ENDPOINT").unwrap_or_else(|| format!("http://{grpc}")),
        ),
    ];
    if let Some(keys) = encryption_keys(&demo_dir)? {
        env.push(("KEEL_ENCRYPTION_KEYS", keys));
    }
    let metrics_token = metrics_token_file(&demo_dir)?;
    let serve_env = vec![
        ("KEEL_GRPC_LISTEN", grpc.clone()),
        ("KEEL_HTTP_LISTEN", http.clone()),
        // Plaintext is safe here only because both listeners are on loopback (checked by
        // `loopback_addr`): nothing off this machine can reach them. Never copy this to a
        // server; give keel KEEL_TLS_CERT_FILE and KEEL_TLS_KEY_FILE there.
        ("KEEL_ALLOW_PLAINTEXT", "true".to_owned()),
        (
            "KEEL_METRICS_TOKEN_FILE",
            metrics_token.display().to_string(),
        ),
    ];
    let keel = Keel {
        bin,
        env,
        serve_env,
    };

    // Key names are unique per tenant, and the database may be reused from an earlier demo.
    let key_name = format!("demo-{}", unix_seconds());
    let created = cmd::output(&mut keel.command(&[
        "admin",
        "create-key",
        "--tenant",
        "demo",
        "--role",
        "admin",
        "--name",
        &key_name,
        "--output",
        "json",
    ]))?;
    let api_key = json_string_field(&created, "key").with_context(|| {
        format!("no \"key\" field in the output of `keel admin create-key`: {created}")
    })?;
    cmd::step(format!(
        "created API key {}… for tenant demo",
        &api_key[..api_key.len().min(9)]
    ));

    let mut server =
        Background::spawn("keel", keel.serve(), &demo_dir.join("keel.log"), Stop::Term)?;
    wait_ready(&mut server, &http)?;
    check_metrics_token(&http, &metrics_token)?;

    let with_key = |args: &[&str]| {
        let mut c = keel.command(args);
        c.env("KEEL_API_KEY", &api_key);
        c
    };
    add_instance(with_key(&[
        "instance",
        "add",
        "local-pg",
        "--engine",
        "postgres",
        "--url",
        &demo_target(&postgres.url),
        "--label",
        "env=demo",
    ]))?;
    // A check that finds something missing exits 1 after printing the fix: for the demo that
    // is a result to show, not a failure. Other exit codes (unreachable Keel, bad key) are.
    let checked = cmd::status(&mut with_key(&["instance", "check", "local-pg"]))?;
    match checked.code() {
        Some(0) => {}
        Some(1) => cmd::step(
            "the check found things to fix on local-pg (see above); Keel keeps working without them",
        ),
        _ => anyhow::bail!("`keel instance check local-pg` failed ({checked})"),
    }
    cmd::run(&mut with_key(&["instance", "ls"]))?;

    // The collector scrapes every instance on its own; collecting now shows it without waiting.
    // Like a check, a scrape that cannot reach the instance exits 1 after saying why.
    cmd::step("the collector scrapes local-pg now (it does so every 15 s anyway)");
    let collected = cmd::status(&mut with_key(&["instance", "collect", "local-pg"]))?;
    if !matches!(collected.code(), Some(0 | 1)) {
        anyhow::bail!("`keel instance collect local-pg` failed ({collected})");
    }
    cmd::run(&mut with_key(&[
        "metrics",
        "local-pg",
        "--name",
        "keel_pg_connections",
    ]))?;
    cmd::step("its top statements (deltas need two scrapes: more appear after the next one)");
    cmd::run(&mut with_key(&[
        "queries", "top", "local-pg", "--limit", "5",
    ]))?;
    // The optimizer plans that workload with HypoPG. Without the extension in local-pg's
    // database it refuses (exit 3) naming the fix; an idle demo database may need no index.
    cmd::step("the optimizer analyses local-pg's workload (what-if plans with HypoPG)");
    let optimized = cmd::status(&mut with_key(&[
        "optimize", "local-pg", "--budget", "100MB",
    ]))?;
    match optimized.code() {
        Some(0) => {}
        Some(1 | 3) => cmd::step(
            "the optimizer could not analyse local-pg (see above for what to fix); the rest of Keel works without it",
        ),
        _ => anyhow::bail!("`keel optimize local-pg` failed ({optimized})"),
    }

    let logs: Vec<&Path> = [
        Some(&server),
        postgres.server.as_ref(),
        nats.server.as_ref(),
    ]
    .into_iter()
    .flatten()
    .map(Background::log)
    .collect();
    print_next_steps(&keel, &api_key, &http, &grpc, &metrics_token, &logs);
    if options.once {
        cmd::step("--once: stopping keel and the servers this demo started");
        return Ok(ExitCode::SUCCESS);
    }
    cmd::step("serving until Ctrl-C");
    let status = server.wait()?;
    if status.success() {
        Ok(ExitCode::SUCCESS)
    } else {
        Err(server.died(status))
    }
}

/// The keel binary, the environment every invocation gets, and what `keel serve` gets on top.
#[derive(Debug)]
struct Keel {
    bin: PathBuf,
    env: Vec<(&'static str, String)>,
    serve_env: Vec<(&'static str, String)>,
}

/// Settings of `keel serve` that the demo's own would contradict if inherited from the shell:
/// TLS (the demo probes plain HTTP) and anonymous metrics (the demo sets a token).
const SERVE_ENV_REMOVED: [&str; 5] = [
    "KEEL_TLS_CERT_FILE",
    "KEEL_TLS_KEY_FILE",
    "KEEL_TLS_CLIENT_CA_FILE",
    "KEEL_TLS_CLIENT_AUTH",
    "KEEL_METRICS_ANONYMOUS",
];

impl Keel {
    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.bin);
        c.args(args)
            .current_dir(cmd::root())
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        c
    }

    /// `keel serve --target all` with the demo's listener and metrics settings.
    fn serve(&self) -> Command {
        let mut c = self.command(&["serve", "--target", "all"]);
        for name in SERVE_ENV_REMOVED {
            c.env_remove(name);
        }
        c.envs(self.serve_env.iter().map(|(k, v)| (k, v)));
        c
    }
}

/// `keel instance add`, tolerating "already exists" from an earlier demo on the same database.
fn add_instance(mut add: Command) -> Result<()> {
    cmd::show(&add);
    let out = add
        .stdin(Stdio::null())
        .stdout(Stdio::inherit())
        .output()
        .context("cannot start keel")?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprint!("{stderr}");
    if out.status.success() {
        return Ok(());
    }
    let lower = stderr.to_lowercase();
    if lower.contains("already exists") || lower.contains("alreadyexists") {
        eprintln!("demo: local-pg is already registered (from an earlier demo), going on");
        return Ok(());
    }
    bail!("`{}` failed ({})", cmd::display(&add), out.status)
}

fn wait_ready(server: &mut Background, http: &str) -> Result<()> {
    cmd::step(format!("waiting for http://{http}/readyz to answer 200"));
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        server.check_running()?;
        let last = match net::http_get_status(http, "/readyz", None) {
            Ok(200) => return Ok(()),
            Ok(code) => format!("status {code}"),
            Err(e) => e.to_string(),
        };
        if Instant::now() > deadline {
            bail!(
                "keel was not ready within 120 s (last: {last}); last lines of its log:\n{}",
                server.tail(30)
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The listener address `var` names (else `default`), refused unless it is on loopback: the demo
/// serves plaintext, which must not be reachable from another machine.
fn loopback_addr(var: &str, default: &str) -> Result<String> {
    let raw = env(var).unwrap_or_else(|| default.to_owned());
    let addr: SocketAddr = raw
        .parse()
        .with_context(|| format!("{var}={raw:?} is not an address such as {default}"))?;
    if !addr.ip().is_loopback() {
        bail!(
            "{var}={raw}: the demo serves plaintext (KEEL_ALLOW_PLAINTEXT), so it listens on \
             loopback only; use e.g. {default}"
        );
    }
    Ok(addr.to_string())
}

/// A fresh random bearer token for /metrics in `<demo>/metrics-token` (mode 0600), new each run.
fn metrics_token_file(demo_dir: &Path) -> Result<PathBuf> {
    let file = demo_dir.join("metrics-token");
    let token = hex(&random_bytes::<32>()?);
    write_private(&file, &token)?;
    cmd::step(format!("metrics token: generated {}", file.display()));
    Ok(file)
}

/// /metrics must refuse a caller without the token and answer one with it.
fn check_metrics_token(http: &str, token_file: &Path) -> Result<()> {
    let token = std::fs::read_to_string(token_file)
        .with_context(|| format!("cannot read {}", token_file.display()))?;
    let anonymous = net::http_get_status(http, "/metrics", None)?;
    let with_token = net::http_get_status(http, "/metrics", Some(token.trim()))?;
    if anonymous != 401 || with_token != 200 {
        bail!(
            "GET http://{http}/metrics answered {anonymous} without the token and {with_token} \
             with it (expected 401 and 200)"
        );
    }
    cmd::step(format!(
        "GET http://{http}/metrics: 401 without the token, 200 with it"
    ));
    Ok(())
}

/// `KEEL_ENCRYPTION_KEYS`, else the demo's own key, made once and kept in `<demo>/encryption-keys`
/// so a database reused across demos stays readable. None when `KEEL_ENCRYPTION_KEYS_FILE` is set:
/// keel reads that itself, and refuses both at once.
fn encryption_keys(demo_dir: &Path) -> Result<Option<String>> {
    if env("KEEL_ENCRYPTION_KEYS_FILE").is_some() {
        cmd::step("encryption keys: keel reads KEEL_ENCRYPTION_KEYS_FILE");
        return Ok(None);
    }
    if let Some(keys) = env("KEEL_ENCRYPTION_KEYS") {
        return Ok(Some(keys));
    }
    let file = demo_dir.join("encryption-keys");
    if let Ok(keys) = std::fs::read_to_string(&file)
        && !keys.trim().is_empty()
    {
        cmd::step(format!("encryption key: reusing {}", file.display()));
        return Ok(Some(keys.trim().to_owned()));
    }
    let keys = format!("demo1:{}", base64(&random_bytes::<32>()?));
    write_private(&file, &keys)?;
    cmd::step(format!(
        "encryption key: generated demo1 in {}",
        file.display()
    ));
    Ok(Some(keys))
}

fn random_bytes<const N: usize>() -> Result<[u8; N]> {
    let mut bytes = [0u8; N];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .context("cannot read /dev/urandom")?;
    Ok(bytes)
}

/// Writes `line` and a newline to `file`, readable by its owner only.
fn write_private(file: &Path, line: &str) -> Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(file)
        .with_context(|| format!("cannot write {}", file.display()))?;
    // `mode` applies only to a new file: tighten one left by an older demo too.
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    writeln!(f, "{line}").with_context(|| format!("cannot write {}", file.display()))
}

fn unix_seconds() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn print_next_steps(
    keel: &Keel,
    api_key: &str,
    http: &str,
    grpc: &str,
    metrics_token: &Path,
    logs: &[&Path],
) {
    let bin = keel.bin.display();
    let env: String = keel
        .env
        .iter()
        .filter(|(k, _)| *k != "KEEL_ENCRYPTION_KEYS")
        .map(|(k, v)| format!("  export {k}='{v}'\n"))
        .collect();
    eprintln!(
        "
keel is serving: gRPC {grpc}, HTTP http://{http} (/healthz, /readyz, /metrics)
in plaintext (KEEL_ALLOW_PLAINTEXT), which is why it listens on loopback only
logs: {logs}

What to try next, in another shell:
  export KEEL_API_KEY='{api_key}'
{env}  alias keel={bin}
  keel events tail                 # follow events as they happen
  keel instance ls                 # the fleet
  keel instance check local-pg     # probe it now
  keel metrics local-pg            # what the collector read
  keel queries top local-pg        # its statements by total time
  keel alerts ls                   # what the alert rules raised
  keel optimize local-pg           # index advice for its workload, with the evidence
  keel recs ls                     # the advice so far; keel recs show|apply|rollback <id>
  curl -s http://{http}/readyz
  curl -s -H \"Authorization: Bearer $(cat {token})\" http://{http}/metrics | head
",
        token = metrics_token.display(),
        logs = logs
            .iter()
            .map(|l| l.display().to_string())
            .collect::<Vec<_>>()
            .join(" "),
    );
}

/// The string value of `"field"` in a flat JSON object (no escapes expected: keys and ids).
fn json_string_field(json: &str, field: &str) -> Option<String> {
    let needle = format!("\"{field}\"");
    let mut rest = json;
    while let Some(at) = rest.find(&needle) {
        rest = &rest[at + needle.len()..];
        if let Some(value) = rest.trim_start().strip_prefix(':') {
            let value = value.trim_start().strip_prefix('"')?;
            return Some(value[..value.find('"')?].to_owned());
        }
    }
    None
}

/// Lowercase hexadecimal.
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Standard base64 with padding.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The local server's `postgres` database: Keel's target policy refuses its own state-store
/// database (KEEL_TARGET_ALLOW_STATE_STORE), and `postgres` exists on every server.
fn demo_target(state_store: &str) -> String {
    let (base, query) = match state_store.split_once('?') {
        Some((base, query)) => (base, format!("?{query}")),
        None => (state_store, String::new()),
    };
    match base.rsplit_once('/') {
        Some((server, _)) if server.contains("://") && !server.ends_with('/') => {
            format!("{server}/postgres{query}")
        }
        _ => format!("{}/postgres{query}", base.trim_end_matches('/')),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_base64() {
        let check = |input: &str, expected: &str| assert_eq!(base64(input.as_bytes()), expected);
        check("", "");
        check("f", "Zg==");
        check("fo", "Zm8=");
        check("foo", "Zm9v");
        check("foobar", "Zm9vYmFy");
        assert_eq!(base64(&[0xff; 32]).len(), 44);
    }

    #[test]
    fn encodes_hex() {
        assert_eq!(hex(&[]), "");
        assert_eq!(hex(&[0x00, 0x0f, 0xa5, 0xff]), "000fa5ff");
    }

    #[test]
    fn listens_on_loopback_only() {
        // Defaults only: these tests must not depend on the caller's KEEL_*_LISTEN.
        let check = |addr: &str| loopback_addr("KEEL_XTASK_TEST_UNSET_LISTEN", addr);
        assert_eq!(
            check("127.0.0.1:9090").ok().as_deref(),
            Some("127.0.0.1:9090")
        );
        assert_eq!(check("[::1]:9090").ok().as_deref(), Some("[::1]:9090"));
        assert!(check("0.0.0.0:9090").is_err());
        assert!(check("192.0.2.1:9090").is_err());
        assert!(check("localhost").is_err());
    }

    #[test]
    fn finds_the_key_field() {
        let check = |json: &str, expected: Option<&str>| {
            assert_eq!(json_string_field(json, "key").as_deref(), expected)
        };
        check(r#"{"key":"keel_abc","id":"1"}"#, Some("keel_abc"));
        check(
            r#"{ "name": "key", "key_id": "k1", "key" : "keel_x" }"#,
            Some("keel_x"),
        );
        check(r#"{"id":"1"}"#, None);
    }

    #[test]
    fn parses_options() {
        assert!(Options::parse(&["--once".to_owned()]).is_ok_and(|o| o.once));
        assert!(Options::parse(&[]).is_ok_and(|o| !o.once));
        assert!(Options::parse(&["--twice".to_owned()]).is_err());
    }
}
