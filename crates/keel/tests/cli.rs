//! The real `keel` binary end to end: `keel serve` on real PostgreSQL and NATS, driven by the CLI,
//! checking output, exit codes, events and graceful shutdown.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{KEEL, expect_exit, free_port, serve_log, spawn_serve, wait_ready, with_overrides};
const ENCRYPTION_KEYS: &str = "k1:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
/// A well-formed key (`keel_` + 40 URL-safe characters), registered at start from a file.
const BOOTSTRAP_KEY: &str = "keel_bootstrapbootstrapbootstrapbootstrap0000";

struct Keel {
    server: Child,
    env: Vec<(&'static str, String)>,
    dir: tempfile::TempDir,
}

impl Drop for Keel {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
    }
}

impl Keel {
    async fn start(env: &keel_testkit::TestEnv) -> Keel {
        let keel = Self::spawn(env, &[("KEEL_ALLOW_PLAINTEXT", "true".to_owned())]).await;
        keel.wait_ready(keel.http_port()).await;
        keel
    }

    /// A ready `keel serve` whose scheduled scrapes are an hour apart (a test's own `instance
    /// collect` decides what the deltas cover), and a database of its own to watch.
    async fn start_with_target(
        env: &keel_testkit::TestEnv,
    ) -> (Keel, keel_testkit::TestDatabase, sqlx::PgPool) {
        let keel = Self::spawn(
            env,
            &[
                ("KEEL_ALLOW_PLAINTEXT", "true".to_owned()),
                ("KEEL_COLLECTOR_INTERVAL", "1h".to_owned()),
            ],
        )
        .await;
        keel.wait_ready(keel.http_port()).await;
        let target = env.database().await.expect("target database");
        let pool = target.pool().await.expect("pool");
        (keel, target, pool)
    }

    fn http_port(&self) -> u16 {
        let listen = &self
            .env
            .iter()
            .find(|(k, _)| *k == "KEEL_HTTP_LISTEN")
            .expect("http listen")
            .1;
        listen
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("port")
    }

    /// Starts `keel serve` with the test's servers, plus `extra` settings (which win).
    async fn spawn(env: &keel_testkit::TestEnv, extra: &[(&'static str, String)]) -> Keel {
        let db = env.database().await.expect("database");
        let nats = env.nats_url().await.expect("nats");
        let dir = tempfile::tempdir().expect("tempdir");
        let key_file = dir.path().join("bootstrap-key");
        std::fs::write(&key_file, format!("{BOOTSTRAP_KEY}\n")).expect("write key");
        let (grpc, http) = (free_port(), free_port());
        let env = vec![
            ("KEEL_DATABASE_URL", db.url.clone()),
            ("KEEL_NATS_URL", nats),
            ("KEEL_ENCRYPTION_KEYS", ENCRYPTION_KEYS.to_owned()),
            ("KEEL_GRPC_LISTEN", format!("127.0.0.1:{grpc}")),
            ("KEEL_HTTP_LISTEN", format!("127.0.0.1:{http}")),
            ("KEEL_ENDPOINT", format!("http://127.0.0.1:{grpc}")),
            (
                "KEEL_BOOTSTRAP_ADMIN_KEY_FILE",
                key_file.display().to_string(),
            ),
            ("KEEL_BOOTSTRAP_TENANT", "acme".to_owned()),
            ("KEEL_SHUTDOWN_GRACE", "2s".to_owned()),
        ];
        let env = with_overrides(env, extra);
        let server = spawn_serve(&env, dir.path());
        Keel { server, env, dir }
    }

    async fn wait_ready(&self, http: u16) {
        wait_ready(http, Duration::from_secs(30), self.dir.path()).await;
    }

    fn logs(&self) -> String {
        serve_log(self.dir.path())
    }

    /// Runs the CLI with the server's settings and, if given, an API key.
    fn cli(&self, key: Option<&str>, args: &[&str]) -> Output {
        self.cli_with(key, args, &[])
    }

    /// [`Keel::cli`] with `extra` environment variables (which win).
    fn cli_with(&self, key: Option<&str>, args: &[&str], extra: &[(&str, &str)]) -> Output {
        self.command(key, args, extra)
            .stdin(Stdio::null())
            .output()
            .expect("run keel")
    }

    /// The CLI command, not started yet.
    fn command(&self, key: Option<&str>, args: &[&str], extra: &[(&str, &str)]) -> Command {
        let mut command = Command::new(KEEL);
        command
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (*k, v.as_str())))
            .env_remove("KEEL_API_KEY")
            .env_remove("COLUMNS")
            .envs(extra.iter().copied());
        if let Some(key) = key {
            command.env("KEEL_API_KEY", key);
        }
        command
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_keel_binary_serves_and_the_cli_drives_it() {
    let env = keel_testkit::TestEnv::new();
    let mut keel = Keel::start(&env).await;
    // Another database than the state store, which the target policy refuses.
    let db_url = env.database().await.expect("target database").url;

    // The bootstrap admin key from the file works at once; create-key makes an operator key.
    let created = expect_exit(
        &keel.cli(
            None,
            &[
                "admin",
                "create-key",
                "--tenant",
                "acme",
                "--role",
                "operator",
                "--name",
                "cli",
                "-o",
                "json",
            ],
        ),
        0,
        "",
    );
    let created: serde_json::Value = serde_json::from_str(&created).expect("json");
    let operator = created["key"].as_str().expect("key").to_owned();
    assert!(operator.starts_with("keel_"));

    let with_password = db_url.replacen("postgres@", "postgres:cli-secret-pw@", 1);
    let out = expect_exit(
        &keel.cli(
            Some(&operator),
            &[
                "instance",
                "add",
                "db1",
                "--engine",
                "postgres",
                "--url",
                &with_password,
                "-l",
                "tier=db",
            ],
        ),
        0,
        "",
    );
    assert!(
        out.contains("postgres:****@") && !out.contains("cli-secret-pw"),
        "{out}"
    );

    let listed = expect_exit(
        &keel.cli(
            Some(BOOTSTRAP_KEY),
            &["instance", "ls", "-s", "tier=db", "-o", "json"],
        ),
        0,
        "",
    );
    let listed: serde_json::Value = serde_json::from_str(&listed).expect("json");
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");
    assert_eq!(listed[0]["name"], "db1");

    let checked = expect_exit(
        &keel.cli(Some(&operator), &["instance", "check", "db1", "-o", "json"]),
        0,
        "",
    );
    let checked: serde_json::Value = serde_json::from_str(&checked).expect("json");
    assert_eq!(checked["health"]["reachable"], true, "{checked}");

    let updated = expect_exit(
        &keel.cli(
            Some(&operator),
            &[
                "instance",
                "update",
                "db1",
                "-l",
                "owner=payments",
                "-o",
                "json",
            ],
        ),
        0,
        "",
    );
    let updated: serde_json::Value = serde_json::from_str(&updated).expect("json");
    assert_eq!(
        (
            updated["version"].as_i64(),
            updated["labels"]["owner"].as_str()
        ),
        (Some(2), Some("payments"))
    );

    // Exit codes scripts can rely on, with the server's message on stderr.
    expect_exit(
        &keel.cli(
            Some(&operator),
            &[
                "instance", "add", "db1", "--engine", "postgres", "--url", &db_url,
            ],
        ),
        5,
        "already exists",
    );
    expect_exit(
        &keel.cli(
            Some(&operator),
            &[
                "instance", "add", "db2", "--engine", "redis", "--url", &db_url,
            ],
        ),
        3,
        "use redis:// or rediss://",
    );
    expect_exit(
        &keel.cli(Some(&operator), &["instance", "get", "nope"]),
        4,
        "not found",
    );
    expect_exit(&keel.cli(None, &["instance", "ls"]), 6, "no API key");
    expect_exit(
        &keel.cli(
            Some("keel_wrongwrongwrongwrongwrongwrongwrongwrong"),
            &["instance", "ls"],
        ),
        6,
        "invalid API key",
    );
    expect_exit(&keel.cli(Some(&operator), &["instance", "get"]), 2, "");

    let events = expect_exit(
        &keel.cli(
            None,
            &[
                "events",
                "tail",
                "--from-start",
                "--count",
                "2",
                "-o",
                "json",
            ],
        ),
        0,
        "",
    );
    let subjects: Vec<String> = events
        .lines()
        .map(|line| {
            serde_json::from_str::<serde_json::Value>(line).expect("json line")["subject"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    assert_eq!(
        subjects,
        [
            "keel.registry.acme.instance.created",
            "keel.registry.acme.instance.updated"
        ]
    );

    expect_exit(
        &keel.cli(Some(&operator), &["instance", "rm", "db1"]),
        0,
        "",
    );
    expect_exit(
        &keel.cli(Some(&operator), &["instance", "get", "db1"]),
        4,
        "not found",
    );

    // SIGTERM: a graceful stop with status 0.
    let pid = keel.server.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill")
            .success()
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = keel.server.try_wait().expect("wait") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "keel serve ignored SIGTERM; log:\n{}",
            keel.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "exit {status}; log:\n{}", keel.logs());
    assert!(keel.logs().contains("keel stopped"), "{}", keel.logs());
}

#[test]
fn serve_refuses_bad_configuration_before_connecting() {
    // Nothing listens at these URLs: each refusal must come before any connection is tried.
    let serve = |args: &[&str], env: &[(&str, &str)]| {
        Command::new(KEEL)
            .arg("serve")
            .args(args)
            .env_remove("KEEL_ENCRYPTION_KEYS")
            .env_remove("KEEL_ENCRYPTION_KEYS_FILE")
            .env_remove("KEEL_ALLOW_PLAINTEXT")
            .envs(env.iter().copied())
            .output()
            .expect("run")
    };
    // A setting to fix is exit 3, as for every other command.
    let keys = ("KEEL_ENCRYPTION_KEYS", ENCRYPTION_KEYS);
    let plaintext = ("KEEL_ALLOW_PLAINTEXT", "true");
    expect_exit(
        &serve(&["--database-url", "mysql://db/x"], &[keys, plaintext]),
        3,
        "use postgres://",
    );
    expect_exit(&serve(&[], &[keys]), 3, "no TLS certificate configured");
    expect_exit(
        &serve(&["--tls-cert-file", "/nonexistent.pem"], &[keys]),
        3,
        "--tls-key-file",
    );
    expect_exit(&serve(&[], &[plaintext]), 3, "no encryption keys");
    expect_exit(
        &serve(&["--limit-rate", "0"], &[keys, plaintext]),
        3,
        "limit-rate",
    );
    expect_exit(
        &serve(&["--service-keys-require-client-cert"], &[keys, plaintext]),
        3,
        "needs mutual TLS",
    );
}

/// A CA with a server certificate for localhost and a client certificate, written as PEM files.
fn write_pki(dir: &std::path::Path) -> [PathBuf; 5] {
    use rcgen::{
        BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    };
    let ca_key = KeyPair::generate().expect("ca key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).expect("ca cert");
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf = |names: Vec<String>, usage| {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(names).expect("params");
        params.extended_key_usages = vec![usage];
        (
            params.signed_by(&key, &issuer).expect("cert").pem(),
            key.serialize_pem(),
        )
    };
    let (server_cert, server_key) = leaf(
        vec!["localhost".into()],
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let (client_cert, client_key) =
        leaf(vec!["keel-cli".into()], ExtendedKeyUsagePurpose::ClientAuth);
    let files = [
        "ca.pem",
        "server.pem",
        "server.key",
        "client.pem",
        "client.key",
    ]
    .map(|f| dir.join(f));
    for (path, pem) in files.iter().zip([
        ca_cert.pem(),
        server_cert,
        server_key,
        client_cert,
        client_key,
    ]) {
        std::fs::write(path, pem).expect("write pem");
    }
    files
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_speaks_mutual_tls_with_a_ca_file() {
    let env = keel_testkit::TestEnv::new();
    let pki_dir = tempfile::tempdir().expect("tempdir");
    let [ca, server_cert, server_key, client_cert, client_key] = write_pki(pki_dir.path());
    let path = |p: &PathBuf| p.display().to_string();
    let keel = Keel::spawn(
        &env,
        &[
            ("KEEL_TLS_CERT_FILE", path(&server_cert)),
            ("KEEL_TLS_KEY_FILE", path(&server_key)),
            ("KEEL_TLS_CLIENT_CA_FILE", path(&ca)),
            ("KEEL_TLS_CLIENT_AUTH", "required".to_owned()),
        ],
    )
    .await;
    let https = keel
        .env
        .iter()
        .find(|(k, _)| *k == "KEEL_ENDPOINT")
        .expect("endpoint")
        .1
        .replace("http://127.0.0.1", "https://localhost");
    let ls = |extra: &[&str]| {
        let mut args = vec!["instance", "ls", "--endpoint", https.as_str()];
        args.extend_from_slice(extra);
        keel.cli(Some(BOOTSTRAP_KEY), &args)
    };
    let with_cert = [
        "--tls-ca-file",
        ca.to_str().expect("utf8"),
        "--tls-client-cert-file",
        client_cert.to_str().expect("utf8"),
        "--tls-client-key-file",
        client_key.to_str().expect("utf8"),
    ];
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ls(&with_cert).status.success() {
        assert!(
            Instant::now() < deadline,
            "no TLS answer; log:\n{}\n{:?}",
            keel.logs(),
            ls(&with_cert)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Without a client certificate, or without trusting the CA, the call never reaches Keel.
    expect_exit(
        &ls(&["--tls-ca-file", ca.to_str().expect("utf8")]),
        7,
        "TLS settings",
    );
    expect_exit(&ls(&[]), 7, "TLS settings");
    let plain = keel.cli(
        Some(BOOTSTRAP_KEY),
        &[
            "instance",
            "ls",
            "--tls-ca-file",
            ca.to_str().expect("utf8"),
        ],
    );
    expect_exit(&plain, 3, "is not https://");
}

const NATS_KEEL_PASSWORD: &str = "keel-cli-test-pw";
const NATS_ACME_PASSWORD: &str = "acme-cli-test-pw";

/// Runs `keel` with `env` for at most `window`, then stops it: a tail that is not told how many
/// events to expect would wait for ever. Returns its exit status (`None` if stopped) and output.
async fn run_for(
    env: &[(&'static str, String)],
    args: &[&str],
    window: Duration,
) -> (Option<i32>, String, String) {
    let mut child = Command::new(KEEL)
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run keel");
    let deadline = Instant::now() + window;
    while Instant::now() < deadline && child.try_wait().expect("wait").is_none() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let code = child.try_wait().expect("wait").and_then(|s| s.code());
    if code.is_none() {
        let _ = child.kill();
    }
    let output = child.wait_with_output().expect("output");
    (
        code,
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// `(subject, instance name)` of each JSON line `keel events tail -o json` printed.
fn tailed(stdout: &str) -> Vec<(String, String)> {
    stdout
        .lines()
        .map(|line| {
            let event: serde_json::Value = serde_json::from_str(line).expect("json line");
            let field = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_owned();
            let payload = &event["payload"]["instance"]["name"];
            (field(&event["subject"]), field(payload))
        })
        .collect()
}

/// Two deployments on one NATS server: each `keel events tail` shows its own deployment's events
/// only; and a NATS user confined to tenant acme (deploy/nats/tenant-permissions.conf) tails
/// acme's events and is refused globex's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_tail_stays_inside_its_deployment_and_its_tenant() {
    let example = include_str!("../../../deploy/nats/tenant-permissions.conf");
    let config = format!(
        "NATS_KEEL_PASSWORD: \"{NATS_KEEL_PASSWORD}\"\nNATS_ACME_EVENTS_PASSWORD: \"{NATS_ACME_PASSWORD}\"\n{example}"
    );
    let nats = keel_testkit::NatsServer::start(&config, "keel", NATS_KEEL_PASSWORD)
        .await
        .expect("nats-server with users");
    let keel_url = nats.url_for("keel", NATS_KEEL_PASSWORD).expect("url");
    let env = keel_testkit::TestEnv::new();
    let plaintext = ("KEEL_ALLOW_PLAINTEXT", "true".to_owned());
    let prod = Keel::spawn(
        &env,
        &[plaintext.clone(), ("KEEL_NATS_URL", keel_url.clone())],
    )
    .await;
    let staging = Keel::spawn(
        &env,
        &[
            plaintext,
            ("KEEL_NATS_URL", keel_url),
            ("KEEL_NATS_STREAM", "KEEL_STAGING".to_owned()),
            ("KEEL_NATS_SUBJECT_ROOT", "staging".to_owned()),
        ],
    )
    .await;
    prod.wait_ready(prod.http_port()).await;
    staging.wait_ready(staging.http_port()).await;

    let created = expect_exit(
        &prod.cli(
            None,
            &[
                "admin",
                "create-key",
                "--tenant",
                "globex",
                "--role",
                "operator",
                "--name",
                "globex",
                "-o",
                "json",
            ],
        ),
        0,
        "",
    );
    let created: serde_json::Value = serde_json::from_str(&created).expect("json");
    let globex = created["key"].as_str().expect("key").to_owned();
    let add = |name: &'static str| {
        [
            "instance",
            "add",
            name,
            "--engine",
            "postgres",
            "--url",
            "postgres://app@db/shop",
        ]
    };
    expect_exit(&prod.cli(Some(BOOTSTRAP_KEY), &add("prod-acme")), 0, "");
    expect_exit(&prod.cli(Some(&globex), &add("prod-globex")), 0, "");
    expect_exit(
        &staging.cli(Some(BOOTSTRAP_KEY), &add("staging-acme")),
        0,
        "",
    );

    // Asking for one more event than the deployment has: anything beyond is a leak.
    let tail = ["events", "tail", "--from-start", "-o", "json", "--count"];
    let window = Duration::from_secs(4);
    let (_, out, err) = run_for(&prod.env, &[&tail[..], &["3"]].concat(), window).await;
    assert_eq!(
        tailed(&out),
        [
            (
                "keel.registry.acme.instance.created".into(),
                "prod-acme".into()
            ),
            (
                "keel.registry.globex.instance.created".into(),
                "prod-globex".into()
            ),
        ],
        "{err}"
    );
    let (_, out, err) = run_for(&staging.env, &[&tail[..], &["2"]].concat(), window).await;
    assert_eq!(
        tailed(&out),
        [(
            "staging.registry.acme.instance.created".into(),
            "staging-acme".into()
        )],
        "{err}"
    );

    // The confined user, tailing the way the example configuration allows.
    let mut acme_env = prod.env.clone();
    acme_env.retain(|(k, _)| *k != "KEEL_NATS_URL");
    acme_env.push((
        "KEEL_NATS_URL",
        nats.url_for("acme-events", NATS_ACME_PASSWORD)
            .expect("url"),
    ));
    let confined = [
        "--consumer-name",
        "acme-tail",
        "--inbox-prefix",
        "_INBOX_acme",
    ];
    let args = [&tail[..], &["2", "--tenant", "acme"], &confined[..]].concat();
    let (_, out, err) = run_for(&acme_env, &args, window).await;
    assert_eq!(
        tailed(&out),
        [(
            "keel.registry.acme.instance.created".into(),
            "prod-acme".into()
        )],
        "{err}"
    );
    let args = [&tail[..], &["1", "--tenant", "globex"], &confined[..]].concat();
    let (code, out, err) = run_for(&acme_env, &args, Duration::from_secs(15)).await;
    // A permission NATS refused: the exit code of a key that may not do this.
    assert_eq!(code, Some(6), "stdout: {out}\nstderr: {err}");
    assert!(out.is_empty(), "{out}");
    assert!(
        err.contains("Permissions Violation") && err.contains("keel.*.globex.>"),
        "{err}"
    );
    assert!(
        !err.contains(NATS_ACME_PASSWORD),
        "password in an error: {err}"
    );
}

/// Creates a key for `tenant` with `role` and `name` through the CLI; returns the key.
fn create_key(keel: &Keel, tenant: &str, role: &str, name: &str) -> String {
    let created = expect_exit(
        &keel.cli(
            None,
            &[
                "admin",
                "create-key",
                "--tenant",
                tenant,
                "--role",
                role,
                "--name",
                name,
                "-o",
                "json",
            ],
        ),
        0,
        "",
    );
    let created: serde_json::Value = serde_json::from_str(&created).expect("json");
    created["key"].as_str().expect("key").to_owned()
}

fn json(stdout: &str) -> serde_json::Value {
    serde_json::from_str(stdout).unwrap_or_else(|e| panic!("{e}: not JSON: {stdout}"))
}

/// Asserts what no message may contain: a gRPC code in parentheses, or a cause said twice.
#[track_caller]
fn assert_clean(output: &Output) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    for code in [
        "(InvalidArgument)",
        "(NotFound)",
        "(AlreadyExists)",
        "(Aborted)",
        "(Unauthenticated)",
        "(Unavailable)",
        "status:",
    ] {
        assert!(!stderr.contains(code), "{stderr:?} shows {code}");
    }
    assert!(stderr.matches("(os error").count() <= 1, "{stderr:?}");
    assert!(
        stderr.matches("tcp connect error").count() <= 1,
        "{stderr:?}"
    );
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr:?}");
}

/// Every exit code of README's "CLI exit codes", for instance, admin and events commands alike,
/// each with a message that says what happened once, without gRPC codes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_failure_has_its_documented_exit_code_and_a_clean_message() {
    let env = keel_testkit::TestEnv::new();
    let keel = Keel::start(&env).await;
    let operator = create_key(&keel, "acme", "operator", "cli");
    let op = Some(operator.as_str());
    let url = "postgres://app@127.0.0.1:1/shop";

    // 0: success.
    expect_exit(
        &keel.cli(
            op,
            &[
                "instance", "add", "db1", "--engine", "postgres", "--url", url,
            ],
        ),
        0,
        "",
    );
    // 1: a check that found something missing (nothing listens on port 1).
    let checked = keel.cli(op, &["instance", "check", "db1"]);
    let out = expect_exit(&checked, 1, "db1 needs attention");
    assert!(out.contains("db1: unreachable"), "{out}");
    assert_clean(&checked);
    // And a scrape that cannot reach it, after saying why.
    let collected = keel.cli(op, &["instance", "collect", "db1"]);
    let out = expect_exit(
        &collected,
        1,
        "db1 could not be scraped: see the problems above",
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("scrape:") && l.ends_with(" down")),
        "{out}"
    );
    assert!(out.contains("problems of the last scrape:"), "{out}");
    assert_clean(&collected);

    // 2: usage.
    expect_exit(&keel.cli(op, &["instance", "get"]), 2, "");
    expect_exit(&keel.cli(op, &["completion", "tcsh"]), 2, "");

    // 3: invalid argument, local or the server's.
    // (arguments, extra environment, what stderr says)
    type Case<'a> = (Vec<&'a str>, Vec<(&'a str, &'a str)>, &'a str);
    let invalid: Vec<Case<'_>> = vec![
        (
            vec!["instance", "update", "db1"],
            vec![],
            "nothing to change: pass --rename",
        ),
        (
            vec!["instance", "update", "db1", "-l", "a=1", "-l", "a=2"],
            vec![],
            "label a given twice",
        ),
        (
            vec![
                "instance", "add", "db2", "--engine", "postgres", "--url", url, "-l", "a=1", "-l",
                "a=1",
            ],
            vec![],
            "label a given twice",
        ),
        (
            vec![
                "instance",
                "update",
                "db1",
                "-l",
                "a=1",
                "--remove-label",
                "a",
            ],
            vec![],
            "label a is both set and removed",
        ),
        (
            vec!["instance", "ls"],
            vec![("KEEL_ENDPOINT", "127.0.0.1:50051")],
            "invalid endpoint \"127.0.0.1:50051\" (--endpoint / KEEL_ENDPOINT): it has no scheme",
        ),
        (
            vec!["instance", "add", "db2", "--engine", "redis", "--url", url],
            vec![],
            "use redis:// or rediss://",
        ),
        (
            vec![
                "instance",
                "add",
                "db2",
                "--engine",
                "postgres",
                "--url",
                "postgres://app:****@db/x",
            ],
            vec![],
            "masked credential",
        ),
        (
            vec![
                "admin",
                "create-key",
                "--tenant",
                "Acme",
                "--role",
                "viewer",
                "--name",
                "x",
            ],
            vec![],
            "invalid tenant \"Acme\"",
        ),
        (
            vec!["events", "tail", "--tenant", "Acme"],
            vec![],
            "--tenant: invalid tenant \"Acme\"",
        ),
        (
            vec!["metrics", "db1", "--window", "an hour"],
            vec![],
            "--window: \"an hour\" is not a duration",
        ),
        (
            vec!["queries", "top", "db1", "--window", "0s"],
            vec![],
            "--window: \"0s\" is no window",
        ),
        (
            vec!["metrics", "db1", "--window", "30d"],
            vec![],
            "longer than the history kept",
        ),
        (
            vec!["metrics", "db1", "--name", "pg_up"],
            vec![],
            "no metric is named \"pg_up\"",
        ),
    ];
    for (args, extra, needle) in &invalid {
        let output = keel.cli_with(op, args, extra);
        expect_exit(&output, 3, needle);
        assert_clean(&output);
    }
    let masked = keel.cli(
        op,
        &[
            "instance",
            "add",
            "db2",
            "--engine",
            "postgres",
            "--url",
            "postgres://app:****@db/x",
        ],
    );
    assert!(
        !String::from_utf8_lossy(&masked.stderr).contains("update"),
        "add talks about updates: {masked:?}"
    );
    let missing_file = Command::new(KEEL)
        .args(["instance", "ls", "--api-key-file", "/nonexistent/keel-key"])
        .envs(keel.env.iter().map(|(k, v)| (*k, v.as_str())))
        .env_remove("KEEL_API_KEY")
        .output()
        .expect("run keel");
    expect_exit(&missing_file, 3, "cannot read /nonexistent/keel-key");
    assert_clean(&missing_file);

    // 4: not found.
    expect_exit(&keel.cli(op, &["instance", "get", "nope"]), 4, "not found");
    for args in [
        &["metrics", "nope"][..],
        &["queries", "top", "nope"],
        &["alerts", "ls", "--instance", "nope"],
        &["instance", "collect", "nope"],
    ] {
        let output = keel.cli(op, args);
        expect_exit(&output, 4, "instance named \"nope\" not found");
        assert_clean(&output);
    }
    let unknown = uuid::Uuid::now_v7().to_string();
    let output = keel.cli(None, &["admin", "revoke-key", &unknown]);
    expect_exit(
        &output,
        4,
        &format!("no API key with id or name {unknown:?}"),
    );
    assert_clean(&output);
    expect_exit(
        &keel.cli(None, &["admin", "set-role", "nobody", "--role", "viewer"]),
        4,
        "no API key with id or name \"nobody\"",
    );

    // 5: conflict.
    let output = keel.cli(
        op,
        &[
            "instance", "add", "db1", "--engine", "postgres", "--url", url,
        ],
    );
    expect_exit(&output, 5, "already exists");
    assert_clean(&output);
    let output = keel.cli(
        None,
        &[
            "admin",
            "create-key",
            "--tenant",
            "acme",
            "--role",
            "viewer",
            "--name",
            "cli",
        ],
    );
    expect_exit(&output, 5, "already has an active API key named \"cli\"");
    assert_clean(&output);
    let doomed = create_key(&keel, "acme", "viewer", "doomed");
    expect_exit(&keel.cli(None, &["admin", "revoke-key", "doomed"]), 0, "");
    expect_exit(&keel.cli(Some(&doomed), &["instance", "ls"]), 6, "revoked");
    expect_exit(
        &keel.cli(None, &["admin", "revoke-key", "doomed"]),
        5,
        "is already revoked, since",
    );
    expect_exit(
        &keel.cli(None, &["admin", "set-role", "doomed", "--role", "admin"]),
        5,
        "is revoked; create a new key instead",
    );
    // A name two tenants use needs the id (3), which then works.
    create_key(&keel, "acme", "viewer", "shared");
    create_key(&keel, "globex", "viewer", "shared");
    expect_exit(
        &keel.cli(None, &["admin", "revoke-key", "shared"]),
        3,
        "2 keys are named \"shared\"",
    );
    let keys = json(&expect_exit(
        &keel.cli(
            None,
            &["admin", "list-keys", "--tenant", "globex", "-o", "json"],
        ),
        0,
        "",
    ));
    let globex_shared = keys[0]["id"].as_str().expect("id").to_owned();
    let out = expect_exit(
        &keel.cli(
            None,
            &["admin", "set-role", &globex_shared, "--role", "operator"],
        ),
        0,
        "",
    );
    assert!(out.contains("now has role operator"), "{out}");

    // 6: authentication.
    let output = keel.cli(None, &["instance", "ls"]);
    expect_exit(&output, 6, "no API key");
    assert_clean(&output);
    let viewer = create_key(&keel, "acme", "viewer", "watcher");
    expect_exit(&keel.cli(Some(&viewer), &["metrics", "db1"]), 0, "");
    let output = keel.cli(Some(&viewer), &["instance", "collect", "db1"]);
    expect_exit(&output, 6, "role viewer may not start a scrape");
    assert_clean(&output);
    expect_exit(
        &keel.cli(
            Some("keel_wrongwrongwrongwrongwrongwrongwrongwrong"),
            &["instance", "ls"],
        ),
        6,
        "invalid API key",
    );

    // 7: Keel, the state store or NATS unreachable.
    let nobody = format!("127.0.0.1:{}", free_port());
    let unreachable: Vec<(Vec<&str>, (&str, String), &str)> = vec![
        (
            vec!["instance", "ls"],
            ("KEEL_ENDPOINT", format!("http://{nobody}")),
            "cannot reach Keel",
        ),
        (
            vec!["admin", "list-keys", "--database-acquire-timeout", "2s"],
            (
                "KEEL_DATABASE_URL",
                format!("postgres://postgres@{nobody}/keel"),
            ),
            "cannot connect to the state store",
        ),
        (
            vec!["events", "tail"],
            ("KEEL_NATS_URL", format!("nats://{nobody}")),
            "cannot connect to NATS",
        ),
        (
            vec!["alerts", "ls"],
            ("KEEL_ENDPOINT", format!("http://{nobody}")),
            "cannot reach Keel",
        ),
    ];
    for (args, (name, value), needle) in &unreachable {
        let output = keel.cli_with(op, args, &[(name, value.as_str())]);
        expect_exit(&output, 7, needle);
        assert_clean(&output);
    }
}

/// `keel … | head`: the reader goes away before the output is written. The command stops
/// quietly (status 0), without a panic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_pipe_ends_the_command_quietly() {
    let env = keel_testkit::TestEnv::new();
    let keel = Keel::start(&env).await;
    for n in 0..3 {
        let name = format!("db{n}");
        expect_exit(
            &keel.cli(
                Some(BOOTSTRAP_KEY),
                &[
                    "instance",
                    "add",
                    &name,
                    "--engine",
                    "postgres",
                    "--url",
                    "postgres://app@db/x",
                ],
            ),
            0,
            "",
        );
    }
    for output in ["json", "table"] {
        let mut child = keel
            .command(Some(BOOTSTRAP_KEY), &["instance", "ls", "-o", output], &[])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn keel");
        // Closed before Keel has even answered: every write the CLI makes fails.
        drop(child.stdout.take());
        let done = child.wait_with_output().expect("wait");
        let stderr = String::from_utf8_lossy(&done.stderr);
        assert_ne!(done.status.code(), Some(101), "{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert_eq!(done.status.code(), Some(0), "-o {output}: {stderr}");
        assert!(stderr.is_empty(), "-o {output}: {stderr}");
    }
}

/// At 80 columns, tables fit, ids and labels stay whole, and a check's fix (SQL) is on a line
/// of its own, whole; `-o wide` has the ids.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tables_fit_80_columns_without_breaking_a_word() {
    let env = keel_testkit::TestEnv::new();
    let keel = Keel::start(&env).await;
    let target = env.database().await.expect("target database");
    // A target missing pg_stat_statements, so the check has a fix in SQL.
    sqlx::query("DROP EXTENSION IF EXISTS pg_stat_statements")
        .execute(&target.pool().await.expect("pool"))
        .await
        .expect("drop extension");
    // "db" first, so `--limit 1` lists it alone.
    let names = [
        "db",
        "orders-primary-database-in-the-eu-west-region-for-payments",
        "orders-replica-database-in-the-eu-west-region-for-payments",
        "cache-of-sessions-for-the-storefront-and-the-mobile-apps",
    ];
    let labels = [
        "team=payments-and-billing-platform-engineering",
        "region=eu-west-1",
        "tier=database",
        "owner=someone-with-a-rather-long-name",
        "cost-center=cc-4711-infrastructure",
    ];
    let columns = [("COLUMNS", "80")];
    for name in &names {
        let mut args = vec![
            "instance",
            "add",
            name,
            "--engine",
            "postgres",
            "--url",
            &target.url,
            "--env",
            "production",
        ];
        for label in &labels {
            args.extend(["-l", label]);
        }
        expect_exit(&keel.cli_with(Some(BOOTSTRAP_KEY), &args, &columns), 0, "");
    }
    let listed = json(&expect_exit(
        &keel.cli(Some(BOOTSTRAP_KEY), &["instance", "ls", "-o", "json"]),
        0,
        "",
    ));
    let ids: Vec<String> = listed
        .as_array()
        .expect("array")
        .iter()
        .map(|i| i["id"].as_str().expect("id").to_owned())
        .collect();
    assert_eq!(ids.len(), names.len());

    let fits = |text: &str, what: &str| {
        for line in text.lines() {
            assert!(
                line.chars().count() <= 80,
                "{what}: {} characters: {line:?}\n{text}",
                line.chars().count()
            );
        }
    };
    let table = expect_exit(
        &keel.cli_with(Some(BOOTSTRAP_KEY), &["instance", "ls"], &columns),
        0,
        "",
    );
    fits(&table, "instance ls");
    assert!(table.starts_with("NAME"), "{table}");
    for name in &names {
        assert!(
            table.lines().any(|l| l.contains(name)),
            "{name} broken or missing in\n{table}"
        );
    }
    // Beside a short name the labels fit, wrapped between labels, each whole.
    let short = expect_exit(
        &keel.cli_with(
            Some(BOOTSTRAP_KEY),
            &["instance", "ls", "--limit", "1"],
            &columns,
        ),
        0,
        "",
    );
    fits(&short, "instance ls --limit 1");
    assert!(
        short.lines().count() > 2,
        "labels on several lines:\n{short}"
    );
    for word in [names[0]].iter().chain(&labels) {
        assert!(
            short.lines().any(|l| l.contains(word)),
            "{word} broken or missing in\n{short}"
        );
    }
    let wide = expect_exit(
        &keel.cli_with(
            Some(BOOTSTRAP_KEY),
            &["instance", "ls", "-o", "wide"],
            &columns,
        ),
        0,
        "",
    );
    for id in &ids {
        assert!(!table.contains(id.as_str()), "no ids by default:\n{table}");
        assert!(wide.contains(id.as_str()), "{id} not in\n{wide}");
    }
    let mut sorted = labels.to_vec();
    sorted.sort();
    assert!(wide.contains(&sorted.join(",")), "{wide}");

    let details = expect_exit(
        &keel.cli_with(
            Some(BOOTSTRAP_KEY),
            &["instance", "get", names[1]],
            &columns,
        ),
        0,
        "",
    );
    // The URL is one word wider than what is left beside the field names: it stays whole.
    let (url_line, rest): (Vec<&str>, Vec<&str>) = details
        .lines()
        .partition(|l| l.starts_with("connection_url:"));
    assert_eq!(url_line, [format!("connection_url:  {}", target.url)]);
    fits(&rest.join("\n"), "instance get");
    assert!(details.contains(&ids[1]), "{details}");
    for label in &labels {
        assert!(details.contains(label), "{label} broken in\n{details}");
    }

    let report = json(&expect_exit(
        &keel.cli(
            Some(BOOTSTRAP_KEY),
            &["instance", "check", "db", "-o", "json"],
        ),
        1,
        "needs attention",
    ));
    let fixes: Vec<String> = report["findings"]
        .as_array()
        .expect("findings")
        .iter()
        .map(|f| f["fix"].as_str().unwrap_or_default().to_owned())
        .filter(|fix| !fix.is_empty())
        .collect();
    assert!(
        fixes
            .iter()
            .any(|f| f.contains("CREATE EXTENSION pg_stat_statements;")),
        "{report}"
    );
    let checked = expect_exit(
        &keel.cli_with(Some(BOOTSTRAP_KEY), &["instance", "check", "db"], &columns),
        1,
        "needs attention",
    );
    for fix in &fixes {
        assert!(
            checked.lines().any(|line| line == format!("  {fix}")),
            "fix not on a line of its own:\n{fix}\nin\n{checked}"
        );
    }
    let (findings, _) = checked
        .split_once("\n\nto fix")
        .expect("fixes after the findings");
    fits(findings, "instance check");
    assert!(
        findings.contains("CHECK") && findings.contains("STATUS"),
        "{checked}"
    );

    // The collector's tables: a scrape's status, its values and their history fit; each
    // problem (pg_stat_statements is missing) is on a line of its own, whole, with its fix.
    let scraped = json(&expect_exit(
        &keel.cli(
            Some(BOOTSTRAP_KEY),
            &["instance", "collect", "db", "-o", "json"],
        ),
        0,
        "",
    ));
    let problems: Vec<String> = scraped["status"]["problems"]
        .as_array()
        .expect("problems")
        .iter()
        .filter_map(|p| p.as_str().map(str::to_owned))
        .collect();
    assert!(
        problems
            .iter()
            .any(|p| p.contains("CREATE EXTENSION pg_stat_statements")),
        "{scraped}"
    );
    for args in [
        &["instance", "collect", "db"][..],
        &["metrics", "db"],
        &["metrics", "db", "--window", "1h"],
    ] {
        let text = expect_exit(&keel.cli_with(Some(BOOTSTRAP_KEY), args, &columns), 0, "");
        let (status, rest) = text
            .split_once("\n\nproblems of the last scrape:\n")
            .unwrap_or_else(|| panic!("{args:?}: no problems in\n{text}"));
        fits(status, &args.join(" "));
        let (listed, after) = rest.split_once("\n\n").unwrap_or((rest, ""));
        assert_eq!(
            listed.lines().map(str::to_owned).collect::<Vec<_>>(),
            problems
                .iter()
                .map(|p| format!("  {p}"))
                .collect::<Vec<_>>(),
            "{args:?}: problems whole, a line each:\n{text}"
        );
        fits(after, &args.join(" "));
    }
    let top = keel.cli_with(Some(BOOTSTRAP_KEY), &["queries", "top", "db"], &columns);
    let table = expect_exit(&top, 0, "CREATE EXTENSION pg_stat_statements");
    fits(&table, "queries top");
    assert!(table.contains("no statements in the window"), "{table}");

    // An instance nobody answers for: its KeelTargetDown alert is pending from its first
    // failed scrape, and the alerts table fits beside its long name.
    let down = "payments-ledger-database-in-the-eu-west-region";
    expect_exit(
        &keel.cli(
            Some(BOOTSTRAP_KEY),
            &[
                "instance",
                "add",
                down,
                "--engine",
                "postgres",
                "--url",
                "postgres://app@127.0.0.1:1/ledger",
            ],
        ),
        0,
        "",
    );
    expect_exit(
        &keel.cli(Some(BOOTSTRAP_KEY), &["instance", "collect", down]),
        1,
        "could not be scraped",
    );
    let alerts = expect_exit(
        &keel.cli_with(Some(BOOTSTRAP_KEY), &["alerts", "ls"], &columns),
        0,
        "",
    );
    fits(&alerts, "alerts ls");
    assert!(alerts.starts_with("RULE"), "{alerts}");
    assert!(
        alerts
            .lines()
            .any(|l| l.starts_with("KeelTargetDown") && l.contains("pending") && l.contains(down)),
        "{alerts}"
    );
    let listed = json(&expect_exit(
        &keel.cli(
            Some(BOOTSTRAP_KEY),
            &["alerts", "ls", "--instance", down, "-o", "json"],
        ),
        0,
        "",
    ));
    assert_eq!(listed[0]["rule"], "KeelTargetDown", "{listed}");
    assert_eq!(listed[0]["state"], "pending", "{listed}");
    let wide = expect_exit(
        &keel.cli_with(
            Some(BOOTSTRAP_KEY),
            &["alerts", "ls", "-o", "wide"],
            &columns,
        ),
        0,
        "",
    );
    assert!(
        wide.contains(listed[0]["fingerprint"].as_str().expect("fingerprint")),
        "{wide}"
    );

    // An empty list says so.
    let globex = create_key(&keel, "globex", "viewer", "empty");
    let empty = expect_exit(&keel.cli(Some(&globex), &["instance", "ls"]), 0, "");
    assert_eq!(empty.trim(), "no instances");
    let none = expect_exit(&keel.cli(Some(&globex), &["alerts", "ls"]), 0, "");
    assert_eq!(none.trim(), "no alerts");
    let keys = expect_exit(
        &keel.cli(None, &["admin", "list-keys", "--tenant", "initech"]),
        0,
        "",
    );
    assert_eq!(keys.trim(), "no keys");
}

/// The collector's commands on `keel serve --target all` and a real PostgreSQL: a scrape on
/// demand, the statements it saw ranked by time, the latest values in their units, their
/// history, and the (empty) list of alerts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_collector_commands_show_what_it_read_from_a_real_postgres() {
    let env = keel_testkit::TestEnv::new();
    let (keel, target, pool) = Keel::start_with_target(&env).await;
    let key = Some(BOOTSTRAP_KEY);
    sqlx::query("CREATE TABLE cli_marker (x int)")
        .execute(&pool)
        .await
        .expect("create table");
    expect_exit(
        &keel.cli(
            key,
            &[
                "instance",
                "add",
                "shop",
                "--engine",
                "postgres",
                "--url",
                &target.url,
            ],
        ),
        0,
        "",
    );

    // The baseline scrape, then the work it is compared with.
    let first = json(&expect_exit(
        &keel.cli(key, &["instance", "collect", "shop", "-o", "json"]),
        0,
        "",
    ));
    assert_eq!(first["instance"], "shop", "{first}");
    assert_eq!(first["status"]["up"], true, "{first}");
    assert!(first["status"]["scraped_at"].is_string(), "{first}");
    assert!(
        first["latest"]
            .as_array()
            .expect("latest")
            .iter()
            .any(|m| m["name"] == "keel_pg_connections"),
        "{first}"
    );
    for _ in 0..5 {
        sqlx::query("SELECT count(*) FROM cli_marker WHERE x = 1")
            .execute(&pool)
            .await
            .expect("query");
    }
    let collected = expect_exit(&keel.cli(key, &["instance", "collect", "shop"]), 0, "");
    assert!(
        collected
            .lines()
            .any(|l| l.starts_with("scrape:") && l.ends_with(" up")),
        "{collected}"
    );
    assert!(
        collected.contains("values read; `keel metrics shop` shows them"),
        "{collected}"
    );

    let top = json(&expect_exit(
        &keel.cli(key, &["queries", "top", "shop", "-o", "json"]),
        0,
        "",
    ));
    let marker: Vec<&serde_json::Value> = top["queries"]
        .as_array()
        .expect("queries")
        .iter()
        .filter(|q| q["text"].as_str().is_some_and(|t| t.contains("cli_marker")))
        .collect();
    assert_eq!(marker.len(), 1, "{top}");
    assert_eq!(
        marker[0]["calls"], 5,
        "five calls after the baseline: {top}"
    );
    assert!(
        marker[0]["query_id"]
            .as_str()
            .is_some_and(|id| id.parse::<i64>().is_ok()),
        "{top}"
    );
    assert!(
        top["total_exec_seconds"].as_f64().is_some_and(|t| t > 0.0),
        "{top}"
    );
    assert!(top["covered_from"].is_string(), "{top}");
    let table = expect_exit(&keel.cli(key, &["queries", "top", "shop"]), 0, "");
    // Without a terminal or $COLUMNS, 80 characters; texts are cut to fit.
    for line in table.lines() {
        assert!(line.chars().count() <= 80, "{line:?} in\n{table}");
    }
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("CALLS") || l.starts_with("QUERYID")),
        "{table}"
    );
    assert!(
        table
            .lines()
            .any(|l| l.contains("SELECT count(*) FROM cli_marker")),
        "{table}"
    );
    let wide = expect_exit(
        &keel.cli(
            key,
            &["queries", "top", "shop", "-o", "wide", "--limit", "1000"],
        ),
        0,
        "",
    );
    assert!(
        wide.contains("SELECT count(*) FROM cli_marker WHERE x = $1"),
        "the whole text in -o wide:\n{wide}"
    );

    let metrics = expect_exit(&keel.cli(key, &["metrics", "shop"]), 0, "");
    assert!(metrics.starts_with("instance:"), "{metrics}");
    let size = metrics
        .lines()
        .find(|l| l.starts_with("keel_pg_database_size_bytes "))
        .unwrap_or_else(|| panic!("no database size in\n{metrics}"));
    assert!(size.contains(" MiB ") || size.contains(" KiB "), "{size}");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("keel_pg_connections ") && l.contains("state=")),
        "{metrics}"
    );
    let only = expect_exit(
        &keel.cli(key, &["metrics", "shop", "--name", "keel_pg_connections"]),
        0,
        "",
    );
    let (_, values) = only.split_once("\nNAME").expect("a table after the status");
    assert!(
        values
            .lines()
            .skip(1)
            .all(|l| l.starts_with("keel_pg_connections ")),
        "{only}"
    );

    let history = json(&expect_exit(
        &keel.cli(key, &["metrics", "shop", "--window", "1h", "-o", "json"]),
        0,
        "",
    ));
    let size = history["series"]
        .as_array()
        .expect("series")
        .iter()
        .find(|s| s["name"] == "keel_pg_database_size_bytes")
        .unwrap_or_else(|| panic!("no size history in {history}"));
    assert!(
        size["points"].as_array().is_some_and(|p| p.len() >= 2),
        "a point per scrape: {size}"
    );
    assert_eq!(history["window_seconds"], 3600.0, "{history}");
    let summary = expect_exit(
        &keel.cli(
            key,
            &[
                "metrics",
                "shop",
                "--window",
                "1h",
                "--name",
                "keel_pg_database_size_bytes",
            ],
        ),
        0,
        "",
    );
    let (_, rows) = summary
        .split_once("\nNAME")
        .expect("a table after the status");
    assert!(
        rows.lines().next().is_some_and(|h| h.contains("LAST")),
        "{summary}"
    );
    assert_eq!(rows.lines().count(), 2, "one series:\n{summary}");

    expect_exit(&keel.cli(key, &["alerts", "ls"]), 0, "");
    let all = json(&expect_exit(
        &keel.cli(
            key,
            &["alerts", "ls", "--all", "--instance", "shop", "-o", "json"],
        ),
        0,
        "",
    ));
    assert!(all.is_array(), "{all}");
}

/// A server that runs the registry alone: the registry's commands work, the collector's say
/// which server they need, as "unavailable" (exit 7).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collector_commands_on_a_registry_only_server_say_what_to_run() {
    let env = keel_testkit::TestEnv::new();
    let keel = Keel::spawn(
        &env,
        &[
            ("KEEL_ALLOW_PLAINTEXT", "true".to_owned()),
            ("KEEL_TARGET", "registry".to_owned()),
        ],
    )
    .await;
    keel.wait_ready(keel.http_port()).await;
    let key = Some(BOOTSTRAP_KEY);
    expect_exit(
        &keel.cli(
            key,
            &[
                "instance",
                "add",
                "db1",
                "--engine",
                "postgres",
                "--url",
                "postgres://app@db/x",
            ],
        ),
        0,
        "",
    );
    expect_exit(&keel.cli(key, &["instance", "get", "db1"]), 0, "");
    let needle =
        "this Keel server does not run the collector (keel serve --target all or collector)";
    for args in [
        &["metrics", "db1"][..],
        &["queries", "top", "db1"],
        &["alerts", "ls"],
        &["instance", "collect", "db1"],
    ] {
        let output = keel.cli(key, args);
        expect_exit(&output, 7, needle);
        assert_clean(&output);
    }
}

/// The optimizer's commands on `keel serve --target all`, a real PostgreSQL with HypoPG and a
/// workload an index on (account_id, created_at) serves: `keel optimize` advises it with its
/// evidence, `keel recs` lists, shows, applies (the index is built and valid) and rolls it back
/// (the index is gone), and a bad budget or id is refused with exit 3 and nothing changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_optimizer_commands_advise_apply_and_roll_back_an_index() {
    let env = keel_testkit::TestEnv::new();
    let (keel, target, pool) = Keel::start_with_target(&env).await;
    let key = Some(BOOTSTRAP_KEY);
    sqlx::raw_sql(
        "CREATE TABLE orders (id bigint PRIMARY KEY, account_id int NOT NULL, \
             created_at timestamptz NOT NULL, total numeric NOT NULL, note text);
         INSERT INTO orders SELECT g, (g * 7919) % 2000, \
             timestamptz '2026-01-01' + g * interval '1 minute', g % 1000, repeat('n', 50) \
         FROM generate_series(1, 100000) g",
    )
    .execute(&pool)
    .await
    .expect("the orders table");
    // VACUUM refuses a transaction block, which several statements in one string make.
    for sql in ["VACUUM ANALYZE orders", "SELECT pg_stat_statements_reset()"] {
        sqlx::raw_sql(sql).execute(&pool).await.expect(sql);
    }
    let since = chrono::DateTime::parse_from_rfc3339("2026-01-10T00:00:00Z").expect("time");
    for i in 0..200 {
        sqlx::query("SELECT id, total FROM orders WHERE account_id = $1 AND created_at >= $2")
            .bind(i % 2000)
            .bind(since)
            .fetch_all(&pool)
            .await
            .expect("workload");
    }
    expect_exit(
        &keel.cli(
            key,
            &[
                "instance",
                "add",
                "shop",
                "--engine",
                "postgres",
                "--url",
                &target.url,
            ],
        ),
        0,
        "",
    );

    // Refused before anything runs: no analysis, no recommendation.
    expect_exit(
        &keel.cli(key, &["optimize", "shop", "--budget", "lots"]),
        3,
        "--budget: \"lots\" is not a size",
    );
    let none = json(&expect_exit(
        &keel.cli(key, &["recs", "ls", "-o", "json"]),
        0,
        "",
    ));
    assert_eq!(none.as_array().map(Vec::len), Some(0), "{none}");

    let analysis = json(&expect_exit(
        &keel.cli(
            key,
            &["optimize", "shop", "--budget", "200MB", "-o", "json"],
        ),
        0,
        "",
    ));
    assert_eq!(analysis["state"], "done", "{analysis}");
    assert_eq!(analysis["budget_bytes"], 200 << 20, "{analysis}");
    assert!(
        analysis["whatif_calls"].as_u64().is_some_and(|n| n > 0),
        "{analysis}"
    );
    let recommendations = analysis["recommendations"]
        .as_array()
        .expect("recommendations");
    let advised = recommendations
        .iter()
        .find(|r| {
            r["ddl"]
                .as_str()
                .is_some_and(|d| d.contains("orders") && d.contains("(account_id, created_at"))
        })
        .unwrap_or_else(|| panic!("no index on (account_id, created_at): {analysis}"));
    let ddl = advised["ddl"].as_str().expect("ddl");
    assert!(ddl.starts_with("CREATE INDEX CONCURRENTLY"), "{ddl}");
    assert!(
        advised["effects"].as_array().is_some_and(|e| !e.is_empty()),
        "evidence with the advice: {advised}"
    );
    let id = advised["id"].as_str().expect("id").to_owned();
    let index_name = advised["index_name"]
        .as_str()
        .expect("index name")
        .to_owned();

    let listed = expect_exit(&keel.cli(key, &["recs", "ls", "--instance", "shop"]), 0, "");
    assert!(listed.contains("public.orders"), "{listed}");
    let short = id.rsplit('-').next().expect("the short id");
    assert!(
        listed.contains(short),
        "ls shows the short id {short}:\n{listed}"
    );
    let shown = expect_exit(&keel.cli(key, &["recs", "show", short]), 0, "");
    for needle in [ddl, "DROP INDEX CONCURRENTLY", "Seq Scan"] {
        assert!(shown.contains(needle), "show lacks {needle:?}:\n{shown}");
    }
    expect_exit(
        &keel.cli(key, &["recs", "apply", "not-an-id", "--wait"]),
        3,
        "",
    );

    let valid = "SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid \
                 WHERE c.relname = $1";
    let applied = json(&expect_exit(
        &keel.cli(key, &["recs", "apply", short, "--wait", "-o", "json"]),
        0,
        "",
    ));
    assert_eq!(applied["state"], "applied", "{applied}");
    assert!(
        applied["built_bytes"].as_i64().is_some_and(|b| b > 0),
        "{applied}"
    );
    let is_valid: Option<bool> = sqlx::query_scalar(valid)
        .bind(&index_name)
        .fetch_optional(&pool)
        .await
        .expect("pg_index");
    assert_eq!(is_valid, Some(true), "{index_name} built and valid");

    let rolled_back = json(&expect_exit(
        &keel.cli(key, &["recs", "rollback", &id, "--wait", "-o", "json"]),
        0,
        "",
    ));
    assert_eq!(rolled_back["state"], "rolled_back", "{rolled_back}");
    let gone: Option<bool> = sqlx::query_scalar(valid)
        .bind(&index_name)
        .fetch_optional(&pool)
        .await
        .expect("pg_index");
    assert_eq!(gone, None, "{index_name} dropped");
    let listed = json(&expect_exit(
        &keel.cli(key, &["recs", "ls", "--state", "rolled-back", "-o", "json"]),
        0,
        "",
    ));
    assert!(
        listed
            .as_array()
            .is_some_and(|r| r.iter().any(|r| r["id"] == id.as_str())),
        "{listed}"
    );
}

#[test]
fn completions_for_bash_zsh_and_fish_know_the_commands() {
    for shell in ["bash", "zsh", "fish"] {
        let output = Command::new(KEEL)
            .args(["completion", shell])
            .output()
            .expect("run keel");
        let script = expect_exit(&output, 0, "");
        assert!(script.len() > 200, "{shell}: {script}");
        for word in [
            "instance",
            "events",
            "admin",
            "revoke-key",
            "metrics",
            "queries",
            "alerts",
            "collect",
            "optimize",
            "recs",
            "rollback",
        ] {
            assert!(script.contains(word), "{shell} completion lacks {word}");
        }
    }
}

/// An update that changes nothing keeps the version and sends no event; monitoring endpoints
/// change like labels.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_that_changes_nothing_keeps_the_version() {
    let env = keel_testkit::TestEnv::new();
    let keel = Keel::start(&env).await;
    let key = Some(BOOTSTRAP_KEY);
    expect_exit(
        &keel.cli(
            key,
            &[
                "instance",
                "add",
                "db",
                "--engine",
                "postgres",
                "--url",
                "postgres://app@db/x",
                "-l",
                "a=1",
                "--monitoring-endpoint",
                "postgres_exporter=http://db:9187/metrics",
            ],
        ),
        0,
        "",
    );
    let version = |args: &[&str]| {
        let mut args = args.to_vec();
        args.extend(["-o", "json"]);
        json(&expect_exit(&keel.cli(key, &args), 0, ""))
    };
    let unchanged = version(&["instance", "update", "db", "--remove-label", "nothere"]);
    assert_eq!(unchanged["version"], 1, "{unchanged}");
    let unchanged = version(&["instance", "update", "db", "-l", "a=1"]);
    assert_eq!(unchanged["version"], 1, "{unchanged}");
    let said = keel.cli(key, &["instance", "update", "db", "-l", "a=1"]);
    expect_exit(
        &said,
        0,
        "already had these values; nothing changed (version 1)",
    );

    let relabelled = version(&["instance", "update", "db", "-l", "a=2"]);
    assert_eq!(
        (
            relabelled["version"].as_i64(),
            relabelled["labels"]["a"].as_str()
        ),
        (Some(2), Some("2"))
    );
    let endpoints = version(&[
        "instance",
        "update",
        "db",
        "--monitoring-endpoint",
        "node=http://db:9100/metrics",
        "--remove-monitoring-endpoint",
        "postgres_exporter",
    ]);
    assert_eq!(endpoints["version"], 3, "{endpoints}");
    assert_eq!(
        endpoints["monitoring_endpoints"],
        serde_json::json!([{"kind": "node", "url": "http://db:9100/metrics"}])
    );

    // One more event asked for than the changes made: the no-ops sent none.
    let (_, out, err) = run_for(
        &keel.env,
        &[
            "events",
            "tail",
            "--from-start",
            "-o",
            "json",
            "--count",
            "4",
        ],
        Duration::from_secs(4),
    )
    .await;
    let subjects: Vec<String> = tailed(&out).into_iter().map(|(s, _)| s).collect();
    assert_eq!(
        subjects,
        [
            "keel.registry.acme.instance.created",
            "keel.registry.acme.instance.updated",
            "keel.registry.acme.instance.updated"
        ],
        "{err}"
    );
}

/// Over its rate limit, Keel answers RESOURCE_EXHAUSTED with `retry-after-ms`; the CLI waits
/// a hint that short out itself instead of failing with exit 7.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_waits_out_a_short_rate_limit_itself() {
    let env = keel_testkit::TestEnv::new();
    let keel = Keel::spawn(
        &env,
        &[
            ("KEEL_ALLOW_PLAINTEXT", "true".to_owned()),
            ("KEEL_LIMIT_RATE", "1".to_owned()),
            ("KEEL_LIMIT_BURST", "1".to_owned()),
        ],
    )
    .await;
    keel.wait_ready(keel.http_port()).await;
    let key = Some(BOOTSTRAP_KEY);
    let started = Instant::now();
    expect_exit(
        &keel.cli(
            key,
            &[
                "instance",
                "add",
                "db",
                "--engine",
                "postgres",
                "--url",
                "postgres://app@db/x",
            ],
        ),
        0,
        "",
    );
    // Two calls each (get, then update), one a second allowed.
    for value in ["1", "2"] {
        let label = format!("a={value}");
        let output = keel.cli(key, &["instance", "update", "db", "-l", &label]);
        expect_exit(&output, 0, "");
    }
    assert!(
        started.elapsed() >= Duration::from_secs(3),
        "five calls at one a second took {:?}: were they limited?",
        started.elapsed()
    );
}

/// A server that accepts connections and never answers (a hung process, a black-holing
/// proxy) makes the CLI give up after `--timeout` with "retry" (exit 7), not hang.
#[test]
fn a_server_that_never_answers_times_out() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let address = listener.local_addr().expect("address");
    // Accepted connections are kept open and never read from nor written to.
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for connection in listener.incoming().take(16).flatten() {
            held.push(connection);
        }
    });
    let mut child = Command::new(KEEL)
        .args(["instance", "ls", "--timeout", "1s"])
        .env("KEEL_ENDPOINT", format!("http://{address}"))
        .env(
            "KEEL_API_KEY",
            "keel_nobodynobodynobodynobodynobodynobody0000",
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run keel");
    // Bounded here, so that a CLI that hangs fails this test instead of hanging the suite.
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the CLI was still waiting after 10 s with --timeout 1s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let output = child.wait_with_output().expect("output");
    expect_exit(&output, 7, "did not answer in time");
}
