//! What an operator sees of a running `keel serve`: the key ring reloaded from its file during a
//! rotation, `/metrics` that promtool accepts and a real Prometheus scrapes, and plain, quiet
//! logs.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{
    KEEL, free_port, http_get, http_get_with, serve_log, spawn_serve, wait_ready, with_overrides,
};
const K1: &str = "k1:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
const K2: &str = "k2:HwAeAR0CHAMbBBoFGQYYBxcIFgkVChQLEwwSDREOEA8=";
/// A well-formed admin key, registered at start from a file.
const ADMIN_KEY: &str = "keel_operatoroperatoroperatoroperator00000000";

/// A `keel serve` child process, killed on drop, with its settings and log files.
struct Keel {
    server: Child,
    env: Vec<(&'static str, String)>,
    http: u16,
    dir: tempfile::TempDir,
}

impl Drop for Keel {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
    }
}

impl Keel {
    /// Starts `keel serve` on `database_url` with the ring in `dir/keys`, plus `extra` settings,
    /// and waits until it is ready.
    async fn start(
        database_url: &str,
        nats_url: &str,
        extra: &[(&'static str, &str)],
        dir: tempfile::TempDir,
    ) -> Keel {
        let admin_file = dir.path().join("admin-key");
        std::fs::write(&admin_file, ADMIN_KEY).expect("write admin key");
        let keys_file = dir.path().join("keys");
        if !keys_file.exists() {
            std::fs::write(&keys_file, format!("{K1}\n")).expect("write keys");
        }
        let (grpc, http) = (free_port(), free_port());
        let env = vec![
            ("KEEL_DATABASE_URL", database_url.to_owned()),
            ("KEEL_NATS_URL", nats_url.to_owned()),
            ("KEEL_ENCRYPTION_KEYS_FILE", keys_file.display().to_string()),
            ("KEEL_GRPC_LISTEN", format!("127.0.0.1:{grpc}")),
            ("KEEL_HTTP_LISTEN", format!("127.0.0.1:{http}")),
            ("KEEL_ENDPOINT", format!("http://127.0.0.1:{grpc}")),
            (
                "KEEL_BOOTSTRAP_ADMIN_KEY_FILE",
                admin_file.display().to_string(),
            ),
            ("KEEL_BOOTSTRAP_TENANT", "acme".to_owned()),
            ("KEEL_ALLOW_PLAINTEXT", "true".to_owned()),
            ("KEEL_METRICS_ANONYMOUS", "true".to_owned()),
            ("KEEL_SHUTDOWN_GRACE", "1s".to_owned()),
        ];
        let extra: Vec<(&'static str, String)> =
            extra.iter().map(|(k, v)| (*k, (*v).to_owned())).collect();
        let env = with_overrides(env, &extra);
        let server = spawn_serve(&env, dir.path());
        let keel = Keel {
            server,
            env,
            http,
            dir,
        };
        wait_ready(keel.http, Duration::from_secs(60), keel.dir.path()).await;
        keel
    }

    fn log(&self) -> String {
        serve_log(self.dir.path())
    }

    fn keys_file(&self) -> PathBuf {
        self.dir.path().join("keys")
    }

    /// Runs the CLI with the server's settings and the admin key.
    fn cli(&self, args: &[&str]) -> Output {
        Command::new(KEEL)
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (*k, v.as_str())))
            .env("KEEL_API_KEY", ADMIN_KEY)
            .env_remove("KEEL_ENCRYPTION_KEYS")
            .stdin(Stdio::null())
            .output()
            .expect("run keel")
    }

    /// Stops the server as Kubernetes does (SIGTERM) and waits for it to exit.
    fn stop(mut self) -> String {
        let pid = self.server.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.server.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.log()
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_key_in_the_ring_file_reaches_a_running_server() {
    let env = keel_testkit::TestEnv::new();
    let db = env.database().await.expect("database");
    let nats = env.nats_url().await.expect("nats");
    let dir = tempfile::tempdir().expect("tempdir");
    // The check needs a real PostgreSQL to reach: the test's own database, which the target
    // policy refuses unless told otherwise.
    let allow_state_store = [("KEEL_TARGET_ALLOW_STATE_STORE", "true")];
    let keel = Keel::start(&db.url, &nats, &allow_state_store, dir).await;

    let added = keel.cli(&[
        "instance",
        "add",
        "orders-db",
        "--engine",
        "postgres",
        "--url",
        &db.url.replacen("postgres@", "postgres:pw-x7@", 1),
    ]);
    assert!(added.status.success(), "{}", text(&added.stderr));
    let check = || keel.cli(&["instance", "check", "orders-db", "-o", "json"]);
    let before = check();
    assert!(
        before.status.code() != Some(3) && !text(&before.stderr).contains("internal"),
        "check before the rotation: {}",
        text(&before.stderr)
    );

    // `keel admin rotate-key` with a ring whose new primary this server does not hold yet.
    let rotated_ring = keel.dir.path().join("rotated-keys");
    std::fs::write(&rotated_ring, format!("{K2}\n{K1}\n")).expect("write");
    let rotation = keel.cli(&[
        "admin",
        "rotate-key",
        "--encryption-keys-file",
        rotated_ring.to_str().expect("utf-8 path"),
    ]);
    assert!(rotation.status.success(), "{}", text(&rotation.stderr));
    assert!(text(&rotation.stdout).contains("1 credentials re-encrypted"));

    // The server says which key it lacks and what to do, as FAILED_PRECONDITION (exit code 3,
    // which says the kind: the message carries no gRPC code).
    let refused = check();
    let stderr = text(&refused.stderr);
    assert_eq!(refused.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains("add key k2 to KEEL_ENCRYPTION_KEYS_FILE on every server")
            && !stderr.contains("FailedPrecondition"),
        "{stderr}"
    );

    // A file that does not parse changes nothing; the good one is picked up without a restart.
    std::fs::write(keel.keys_file(), "k2:not-base64\n").expect("write");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(check().status.code(), Some(3));
    std::fs::write(keel.keys_file(), format!("{K2}\n{K1}\n")).expect("write");
    let deadline = Instant::now() + Duration::from_secs(20);
    let after = loop {
        let after = check();
        if after.status.code() != Some(3) || Instant::now() > deadline {
            break after;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!(
        text(&before.stdout).contains("\"reachable\":true"),
        text(&after.stdout).contains("\"reachable\":true"),
        "check after the reload differs from before: {} {}",
        text(&after.stdout),
        text(&after.stderr)
    );
    assert!(
        after.status.code() != Some(3),
        "still refused after the reload: {}",
        text(&after.stderr)
    );

    let log = keel.stop();
    assert!(log.contains("encryption key ring reloaded"), "{log}");
    assert!(
        log.contains("cannot reload the encryption key ring; still using the previous one"),
        "{log}"
    );
    assert!(
        !log.contains("HwAeAR0C") && !log.contains("AAECAwQF"),
        "key material in the log"
    );
}

/// Where `program` (promtool, prometheus) is, or a failure that says how to install it.
fn prometheus_tool(program: &str) -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(program))
            .find(|path| path.is_file())
    });
    found.unwrap_or_else(|| {
        panic!(
            "{program} is not installed: run `cargo xtask setup` (or apt-get install prometheus), \
             which CI does"
        )
    })
}

/// Where promtool is, or a failure that says how to install it.
fn promtool() -> PathBuf {
    prometheus_tool("promtool")
}

/// Runs `promtool check metrics` on `exposition`; fails the test on any problem it reports.
#[track_caller]
fn promtool_accepts(promtool: &Path, exposition: &str) {
    use std::io::Write as _;
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(exposition.as_bytes())
        .expect("feed promtool");
    let output = child.wait_with_output().expect("promtool");
    assert!(
        output.status.success() && output.stdout.is_empty() && output.stderr.is_empty(),
        "promtool check metrics: {}{}\nin:\n{exposition}",
        text(&output.stdout),
        text(&output.stderr)
    );
}

/// `/metrics` as `curl` gets it (no Accept header asking for OpenMetrics).
async fn scrape(keel: &Keel) -> String {
    let response = http_get(keel.http, "/metrics").await.expect("scrape");
    let (head, body) = response.split_once("\r\n\r\n").expect("http response");
    assert!(
        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
        "{head}"
    );
    body.to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_pass_promtool_from_the_start_and_after_calls() {
    let promtool = promtool();
    let env = keel_testkit::TestEnv::new();
    let db = env.database().await.expect("database");
    let nats = env.nats_url().await.expect("nats");
    let dir = tempfile::tempdir().expect("tempdir");
    // One request per second, so that a few calls also fill keel_limit_exceeded_total.
    let limits = [("KEEL_LIMIT_RATE", "1"), ("KEEL_LIMIT_BURST", "1")];
    let keel = Keel::start(&db.url, &nats, &limits, dir).await;

    let fresh = scrape(&keel).await;
    for family in [
        "# TYPE keel_build_info gauge",
        "# TYPE process_cpu_seconds_total counter",
        "# TYPE process_resident_memory_bytes gauge",
        "# TYPE process_open_fds gauge",
        "# TYPE process_max_fds gauge",
        "# TYPE process_start_time_seconds gauge",
    ] {
        assert!(fresh.contains(family), "missing {family:?} in\n{fresh}");
    }
    assert!(
        fresh.contains(&format!("version=\"{}\"", env!("CARGO_PKG_VERSION"))),
        "{fresh}"
    );
    promtool_accepts(&promtool, &fresh);

    // Calls faster than one a second: Keel refuses some (the CLI waits out the short
    // retry-after-ms hint and succeeds), so the gRPC and limit families have samples too.
    for _ in 0..3 {
        let output = keel.cli(&["instance", "ls"]);
        assert!(output.status.success(), "{}", text(&output.stderr));
    }
    let after = scrape(&keel).await;
    assert!(
        after
            .lines()
            .any(|l| l.starts_with("keel_limit_exceeded_total{") && !l.ends_with(" 0")),
        "no call was refused at 1 request per second:\n{after}"
    );
    for family in [
        "# TYPE grpc_server_handled_total counter",
        "# TYPE grpc_server_handling_seconds histogram",
        "# TYPE keel_limit_exceeded_total counter",
    ] {
        assert!(after.contains(family), "missing {family:?} in\n{after}");
    }
    promtool_accepts(&promtool, &after);
}

/// The token Prometheus scrapes with in [`prometheus_scrapes_the_fleet_with_the_bearer_token`].
const METRICS_TOKEN: &str = "prometheus-scrape-token-0123456789abcdef";

/// A Prometheus server of the test's own (loopback, its own port and data directory), killed
/// on drop.
struct Prometheus {
    server: Child,
    port: u16,
    dir: PathBuf,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
    }
}

impl Prometheus {
    /// Checks `config` with `promtool check config`, then starts Prometheus on it and waits
    /// until it is ready.
    async fn start(config: &str, dir: &Path) -> Prometheus {
        let config_file = dir.join("prometheus.yml");
        std::fs::write(&config_file, config).expect("write prometheus.yml");
        let checked = Command::new(promtool())
            .args(["check", "config"])
            .arg(&config_file)
            .output()
            .expect("run promtool");
        assert!(
            checked.status.success(),
            "promtool check config: {}{}\n{config}",
            text(&checked.stdout),
            text(&checked.stderr)
        );
        let port = free_port();
        let log = |name: &str| std::fs::File::create(dir.join(name)).expect("log file");
        let server = Command::new(prometheus_tool("prometheus"))
            .arg(format!("--config.file={}", config_file.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(log("prometheus.log"))
            .stderr(log("prometheus.err"))
            .spawn()
            .expect("spawn prometheus");
        let prometheus = Prometheus {
            server,
            port,
            dir: dir.to_owned(),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if http_get(port, "/-/ready")
                .await
                .is_some_and(|r| r.starts_with("HTTP/1.0 200") || r.starts_with("HTTP/1.1 200"))
            {
                return prometheus;
            }
            assert!(
                Instant::now() < deadline,
                "prometheus not ready; log:\n{}",
                prometheus.log()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn log(&self) -> String {
        let read = |name: &str| std::fs::read_to_string(self.dir.join(name)).unwrap_or_default();
        format!("{}{}", read("prometheus.log"), read("prometheus.err"))
    }

    /// The `data` of a `GET /api/v1/<path>` answer.
    async fn api(&self, path: &str) -> serde_json::Value {
        let response = http_get(self.port, &format!("/api/v1/{path}"))
            .await
            .expect("prometheus answers");
        let (head, body) = response.split_once("\r\n\r\n").expect("http response");
        assert!(head.contains(" 200 "), "{path}: {head}\n{body}");
        let answer: serde_json::Value = serde_json::from_str(body).expect("json");
        assert_eq!(answer["status"], "success", "{answer}");
        answer["data"].clone()
    }

    /// The series an instant query returns, each as its labels and value.
    async fn query(&self, promql: &str) -> Vec<(serde_json::Value, String)> {
        let data = self
            .api(&format!("query?query={}", url_encode(promql)))
            .await;
        data["result"]
            .as_array()
            .expect("result")
            .iter()
            .map(|s| {
                let value = s["value"][1].as_str().unwrap_or_default().to_owned();
                (s["metric"].clone(), value)
            })
            .collect()
    }

    /// Waits until `promql` returns at least one series.
    async fn eventually(&self, promql: &str) -> Vec<(serde_json::Value, String)> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let series = self.query(promql).await;
            if !series.is_empty() {
                return series;
            }
            assert!(
                Instant::now() < deadline,
                "{promql} returned nothing; targets: {}\nlog:\n{}",
                self.api("targets").await,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

/// `raw` as a URL query value.
fn url_encode(raw: &str) -> String {
    raw.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Debian's Prometheus (2.42) scrapes `keel serve --target all` the way deploy/ and an operator
/// configure it: with the bearer token from a file, and `honor_labels: true`, so that the
/// collector's `instance` label (the Keel instance's name) stays `instance` instead of becoming
/// `exported_instance`. Keel's own series have no `instance` label and get the target's, as
/// `up` does. The exposition with a scraped instance passes `promtool check metrics`; without
/// the token `/metrics` answers 401, and Prometheus with a wrong one sees the target down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_the_fleet_with_the_bearer_token() {
    let promtool = promtool();
    let env = keel_testkit::TestEnv::new();
    let db = env.database().await.expect("database");
    let target = env.database().await.expect("target database");
    let nats = env.nats_url().await.expect("nats");
    let dir = tempfile::tempdir().expect("tempdir");
    let token_file = dir.path().join("metrics-token");
    std::fs::write(&token_file, format!("{METRICS_TOKEN}\n")).expect("write token");
    let token_path = token_file.display().to_string();
    let keel = Keel::start(
        &db.url,
        &nats,
        &[
            ("KEEL_METRICS_ANONYMOUS", "false"),
            ("KEEL_METRICS_TOKEN_FILE", &token_path),
        ],
        dir,
    )
    .await;

    let added = keel.cli(&[
        "instance",
        "add",
        "orders-db",
        "--engine",
        "postgres",
        "--url",
        &target.url,
    ]);
    assert!(added.status.success(), "{}", text(&added.stderr));
    let collected = keel.cli(&["instance", "collect", "orders-db"]);
    assert!(collected.status.success(), "{}", text(&collected.stderr));

    // Locked without the token, whatever else the request says.
    for headers in [
        &[][..],
        &[("authorization", "Bearer not-the-token")],
        &[("authorization", METRICS_TOKEN)],
    ] {
        let refused = http_get_with(keel.http, "/metrics", headers)
            .await
            .expect("an answer");
        assert!(
            refused.starts_with("HTTP/1.0 401") || refused.starts_with("HTTP/1.1 401"),
            "{headers:?}: {refused}"
        );
    }
    let bearer = format!("Bearer {METRICS_TOKEN}");
    let series = "keel_target_up{tenant=\"acme\",instance=\"orders-db\"} 1";
    let deadline = Instant::now() + Duration::from_secs(30);
    let exposition = loop {
        let response = http_get_with(keel.http, "/metrics", &[("authorization", &bearer)])
            .await
            .expect("scrape");
        let (head, body) = response.split_once("\r\n\r\n").expect("http response");
        assert!(head.contains(" 200 "), "{head}");
        if body.lines().any(|l| l == series) {
            break body.to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "no {series} on /metrics:\n{body}\nlog:\n{}",
            keel.log()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    for family in [
        "# TYPE keel_build_info gauge",
        "# TYPE keel_target_up gauge",
        "# TYPE keel_target_scrape_duration_seconds gauge",
        "# TYPE keel_pg_connections gauge",
        "# TYPE keel_pg_database_size_bytes gauge",
        "# TYPE keel_pg_transactions_committed_total counter",
    ] {
        assert!(
            exposition.contains(family),
            "missing {family:?} in\n{exposition}"
        );
    }
    promtool_accepts(&promtool, &exposition);

    let keel_target = format!("127.0.0.1:{}", keel.http);
    let job = |name: &str, extra: &str| {
        format!(
            "  - job_name: {name}\n    metrics_path: /metrics\n{extra}    static_configs:\n      - targets: [\"{keel_target}\"]\n"
        )
    };
    let token =
        format!("    authorization:\n      type: Bearer\n      credentials_file: {token_path}\n");
    let config = format!(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n{}{}{}",
        job(
            "keel",
            &format!(
                "    # Keel's collector series carry instance=<Keel instance name>: keep it.\n    honor_labels: true\n{token}"
            )
        ),
        job("keel-default-labels", &token),
        job(
            "keel-wrong-token",
            "    authorization:\n      type: Bearer\n      credentials: not-the-token\n"
        ),
    );
    let prometheus_dir = tempfile::tempdir().expect("tempdir");
    let prometheus = Prometheus::start(&config, prometheus_dir.path()).await;

    // Prometheus's view of the targets: up with the token, down (401) without it.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let targets = prometheus.api("targets").await;
        let health = |job: &str| {
            targets["activeTargets"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|t| t["labels"]["job"] == job)
                .map(|t| {
                    (
                        t["health"].as_str().unwrap_or_default().to_owned(),
                        t["lastError"].as_str().unwrap_or_default().to_owned(),
                    )
                })
                .unwrap_or_default()
        };
        let (keel_health, keel_error) = health("keel");
        let (wrong_health, wrong_error) = health("keel-wrong-token");
        if keel_health == "up" && health("keel-default-labels").0 == "up" && wrong_health == "down"
        {
            assert!(wrong_error.contains("401"), "{wrong_error}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "targets not up ({keel_health}: {keel_error}): {targets}\nlog:\n{}",
            prometheus.log()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let up = prometheus.eventually("up{job=\"keel\"}").await;
    assert_eq!(up.len(), 1, "{up:?}");
    assert_eq!(up[0].1, "1", "{up:?}");
    assert_eq!(up[0].0["instance"], keel_target.as_str(), "{up:?}");

    // With honor_labels, the Keel instance's name is `instance`, beside its tenant.
    let collected = prometheus
        .eventually("keel_target_up{job=\"keel\",instance=\"orders-db\"}")
        .await;
    assert_eq!(collected.len(), 1, "{collected:?}");
    let (labels, value) = &collected[0];
    assert_eq!(value, "1", "{collected:?}");
    assert_eq!(labels["tenant"], "acme", "{labels}");
    assert!(labels.get("exported_instance").is_none(), "{labels}");
    let connections = prometheus
        .eventually("keel_pg_connections{job=\"keel\",instance=\"orders-db\",state=\"idle\"}")
        .await;
    assert_eq!(connections.len(), 1, "{connections:?}");
    // Keel's own series have no instance label: they get the target's.
    let build = prometheus.eventually("keel_build_info{job=\"keel\"}").await;
    assert_eq!(build[0].0["instance"], keel_target.as_str(), "{build:?}");

    // Without honor_labels Prometheus renames the collector's label, and `instance` is the
    // scrape address for every series: what the `keel` job above avoids.
    let renamed = prometheus
        .eventually("keel_target_up{job=\"keel-default-labels\"}")
        .await;
    assert_eq!(
        renamed[0].0["exported_instance"], "orders-db",
        "{renamed:?}"
    );
    assert_eq!(
        renamed[0].0["instance"],
        keel_target.as_str(),
        "{renamed:?}"
    );
}

/// The lines that announce serving, with the bound addresses as fields.
fn serving_lines(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|line| line.contains("serving grpc_addr="))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_logs_plain_text_without_notices_once_listening() {
    let env = keel_testkit::TestEnv::new();
    let db = env.database().await.expect("database");
    let nats = env.nats_url().await.expect("nats");
    // The second start finds every schema and table in place: the case that used to log
    // "already exists, skipping" for each of them.
    for start in ["first", "second"] {
        let dir = tempfile::tempdir().expect("tempdir");
        let keel = Keel::start(&db.url, &nats, &[], dir).await;
        let grpc = keel.env[3].1.clone();
        let http = keel.env[4].1.clone();
        let log = keel.stop();
        assert!(
            !log.contains('\u{1b}'),
            "{start} start: ANSI escapes in\n{log}"
        );
        assert!(
            !log.contains("already exists"),
            "{start} start: notices in\n{log}"
        );
        // Once, from the server after binding: with the real addresses.
        let serving = serving_lines(&log);
        assert_eq!(serving.len(), 1, "{start} start:\n{log}");
        assert!(
            serving[0].contains(&format!("grpc_addr={grpc}"))
                && serving[0].contains(&format!("http_addr={http}")),
            "{start} start: {}",
            serving[0]
        );
        assert!(
            !log.contains("keel serving"),
            "{start} start: early log in\n{log}"
        );
    }
}

#[test]
fn a_missing_state_store_database_is_named_once_with_the_fix() {
    let env = keel_testkit::TestEnv::new();
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let db = runtime.block_on(env.database()).expect("database");
    // The same server, a database nobody created.
    let (server, _) = db.url.rsplit_once('/').expect("database in url");
    let missing = format!("{server}/keel_not_created_here");
    let dir = tempfile::tempdir().expect("tempdir");
    let keys = dir.path().join("keys");
    std::fs::write(&keys, K1).expect("write keys");
    let output = Command::new(KEEL)
        .arg("serve")
        .env("KEEL_DATABASE_URL", &missing)
        .env("KEEL_ENCRYPTION_KEYS_FILE", &keys)
        .env("KEEL_ALLOW_PLAINTEXT", "true")
        .env("KEEL_GRPC_LISTEN", format!("127.0.0.1:{}", free_port()))
        .env("KEEL_HTTP_LISTEN", format!("127.0.0.1:{}", free_port()))
        .env_remove("KEEL_ENCRYPTION_KEYS")
        .stdin(Stdio::null())
        .output()
        .expect("run keel serve");
    let stderr = text(&output.stderr);
    // Not found, as the CLI reports a missing database too.
    assert_eq!(output.status.code(), Some(4), "{stderr}");
    assert_eq!(
        stderr.matches("does not exist").count(),
        1,
        "said more than once: {stderr}"
    );
    assert!(
        stderr.contains("database \"keel_not_created_here\" does not exist")
            && stderr.contains("createdb -h ")
            && stderr.trim_end().ends_with(" keel_not_created_here"),
        "{stderr}"
    );
}
