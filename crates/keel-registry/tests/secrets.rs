//! No credential ever leaves the registry except through GetInstanceConnection to a service:
//! not in responses, errors, log lines, span fields, metrics or events. Everything the process
//! logs is captured at TRACE level (its own process: the subscriber is global).

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};

use common::*;
use keel_auth::Role;
use keel_proto::v1::*;
use prost_types::FieldMask;
use tracing_subscriber::fmt::format::FmtSpan;
use tracing_subscriber::layer::SubscriberExt as _;

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("capture lock").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn capture_everything() -> Captured {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_subscriber::EnvFilter::new("trace"))
        .with(keel_telemetry::otel_layer())
        .with(
            tracing_subscriber::fmt::layer()
                .with_ansi(false)
                // Span opening and closing lines carry every span field, recorded or not.
                .with_span_events(FmtSpan::FULL)
                .with_writer(move || writer.clone()),
        );
    tracing::subscriber::set_global_default(subscriber).expect("only test in this binary");
    keel_telemetry::install_propagator();
    captured
}

const SECRETS: [&str; 5] = [
    "Pw1-canary-8c1f",
    "Qs-canary-51d0",
    "Pw2-canary-3e77",
    "Bad-canary-9a2b",
    "Red-canary-44ce",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_in_responses_errors_logs_spans_metrics_or_events() {
    let logs = capture_everything();
    let app = TestApp::start().await;
    let mut client = app.client("acme", Role::Operator).await;
    let mut seen: Vec<String> = Vec::new();

    // The harness's PostgreSQL trusts every local connection, so these URLs connect with any password.
    let pg = app
        .database_url
        .replacen("postgres@", &format!("postgres:{}@", SECRETS[0]), 1);
    let pg = format!("{pg}?sslmode=disable&password={}", SECRETS[1]);
    let created = create(&mut client, pg_instance("orders-db", &pg))
        .await
        .expect("create");
    seen.push(format!("{created:?}"));
    seen.push(format!(
        "{:?}",
        get(&mut client, &created.id).await.expect("get")
    ));
    seen.push(format!(
        "{:?}",
        client
            .list_instances(ListInstancesRequest::default())
            .await
            .expect("list")
    ));
    seen.push(format!(
        "{:?}",
        client
            .check_instance(CheckInstanceRequest {
                id: created.id.clone()
            })
            .await
            .expect("check")
    ));

    let moved = app
        .database_url
        .replacen("postgres@", &format!("postgres:{}@", SECRETS[2]), 1);
    let update = |url: String| UpdateInstanceRequest {
        id: created.id.clone(),
        instance: Some(Instance {
            connection_url: url,
            ..Default::default()
        }),
        update_mask: Some(FieldMask {
            paths: vec!["connection_url".into()],
        }),
        expected_version: 1,
    };
    seen.push(format!(
        "{:?}",
        client.update_instance(update(moved)).await.expect("update")
    ));

    // Failures: wrong scheme, wrong version, an unreachable server, and a Redis that needs no password.
    let errors = [
        create(
            &mut client,
            pg_instance("bad", &format!("mysql://app:{}@db/x", SECRETS[3])),
        )
        .await
        .map(|_| ()),
        client
            .update_instance(update(format!("postgres://app:{}@db/x", SECRETS[3])))
            .await
            .map(|_| ()),
    ];
    for error in errors {
        seen.push(format!("{:?}", error.expect_err("must fail")));
    }
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let down = create(
        &mut client,
        pg_instance(
            "down",
            &format!("postgres://app:{}@127.0.0.1:{closed}/db", SECRETS[3]),
        ),
    )
    .await
    .expect("create down");
    seen.push(format!(
        "{:?}",
        client
            .check_instance(CheckInstanceRequest {
                id: down.id.clone()
            })
            .await
            .expect("check down")
    ));
    let redis_url = app.env.redis_url().await.expect("redis").replacen(
        "redis://",
        &format!("redis://:{}@", SECRETS[4]),
        1,
    );
    let redis = create(&mut client, redis_instance("cache", &redis_url))
        .await
        .expect("create redis");
    seen.push(format!(
        "{:?}",
        client
            .check_instance(CheckInstanceRequest {
                id: redis.id.clone()
            })
            .await
            .expect("check redis")
    ));

    // The one sanctioned way out; its answer is the secret, but nothing may log it.
    let mut service = app.client("acme", Role::Service).await;
    let clear = service
        .get_instance_connection(GetInstanceConnectionRequest {
            id: created.id.clone(),
        })
        .await
        .expect("service reads")
        .into_inner();
    assert!(
        clear.connection_url.contains(SECRETS[2]),
        "the service gets the current credentials"
    );

    let metrics = reqwest_metrics(app.http).await;
    seen.push(metrics.clone());
    for message in app.events(5).await {
        seen.push(String::from_utf8_lossy(&message.payload).into_owned());
        seen.push(format!("{:?}", message.headers));
    }
    let logs = String::from_utf8_lossy(&logs.0.lock().expect("lock")).into_owned();

    // The capture is real: it holds the requests' spans and the registry's own lines.
    assert!(
        logs.contains("instance created") && logs.contains("grpc.request"),
        "capture is empty or partial"
    );
    assert!(
        metrics.contains("grpc_server_handled_total"),
        "metrics not scraped"
    );
    for secret in SECRETS {
        assert!(
            !logs.contains(secret),
            "{secret} in the logs:\n{}",
            context(&logs, secret)
        );
        for (i, text) in seen.iter().enumerate() {
            assert!(
                !text.contains(secret),
                "{secret} in output #{i}: {}",
                context(text, secret)
            );
        }
    }
}

/// The HTTP listener's /metrics, read with a plain HTTP/1.0 request.
async fn reqwest_metrics(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: keel\r\n\r\n")
        .await
        .expect("request");
    let mut body = String::new();
    stream.read_to_string(&mut body).await.expect("response");
    body
}

fn context(text: &str, needle: &str) -> String {
    let at = text.find(needle).unwrap_or(0);
    let start = text[..at]
        .char_indices()
        .rev()
        .nth(200)
        .map_or(0, |(i, _)| i);
    text[start..(at + needle.len() + 100).min(text.len())].to_owned()
}
