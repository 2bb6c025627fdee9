//! A real server on 127.0.0.1:0, driven through its gRPC and HTTP listeners.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use keel_config::ListenConfig;
use keel_server::{Server, ServerError};
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::service::Routes;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const REGISTRY: &str = "keel.v1.RegistryService";

/// Plaintext listeners with `/metrics` open to anyone; `metrics_*` tests close it.
fn listen(shutdown_grace: Duration) -> ListenConfig {
    let mut listen = ListenConfig::plaintext(
        "127.0.0.1:0".parse().unwrap(),
        "127.0.0.1:0".parse().unwrap(),
    );
    listen.shutdown_grace = shutdown_grace;
    listen.metrics_anonymous = true;
    listen
}

/// A server running in the background, and how to stop it.
struct Running {
    grpc: Channel,
    http: SocketAddr,
    stop: oneshot::Sender<()>,
    served: JoinHandle<Result<(), ServerError>>,
}

/// Serves `server` with no routes of its own (health and reflection are always there).
async fn start(server: Server) -> Running {
    let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let grpc_addr = grpc.local_addr().unwrap();
    let http_addr = http.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let served = tokio::spawn(
        server.serve_with_listeners(grpc, http, Routes::default(), async {
            let _ = stopped.await;
        }),
    );
    let channel = Channel::from_shared(format!("http://{grpc_addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    Running {
        grpc: channel,
        http: http_addr,
        stop,
        served,
    }
}

/// Status, `Content-Type` and body of a plain HTTP/1.0 GET.
async fn get(addr: SocketAddr, path: &str) -> (u16, String, String) {
    get_with(addr, path, None).await
}

/// Status, `Content-Type` and body of a plain HTTP/1.0 GET with an `authorization` header.
async fn get_with(
    addr: SocketAddr,
    path: &str,
    authorization: Option<&str>,
) -> (u16, String, String) {
    let authorization = authorization
        .map(|value| format!("authorization: {value}\r\n"))
        .unwrap_or_default();
    get_with_headers(addr, path, &authorization).await
}

/// Status, `Content-Type` and body of a plain HTTP/1.0 GET with `headers` (CRLF-terminated lines).
async fn get_with_headers(addr: SocketAddr, path: &str, headers: &str) -> (u16, String, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n{headers}\r\n").as_bytes())
        .await
        .unwrap();
    let mut raw = String::new();
    stream.read_to_string(&mut raw).await.unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let content_type = head
        .lines()
        .find_map(|line| line.strip_prefix("content-type: "))
        .unwrap_or_default()
        .to_owned();
    (status, content_type, body.to_owned())
}

async fn health(channel: &Channel, service: &str) -> Result<ServingStatus, tonic::Status> {
    let response = HealthClient::new(channel.clone())
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await?;
    Ok(response.into_inner().status())
}

/// Calls `path` with an empty message and returns the status code it failed with.
async fn call_raw(channel: &Channel, path: &'static str) -> tonic::Code {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.unwrap();
    let codec = tonic_prost::ProstCodec::<(), ()>::default();
    let result = grpc
        .unary(
            tonic::Request::new(()),
            http::uri::PathAndQuery::from_static(path),
            codec,
        )
        .await;
    result.unwrap_err().code()
}

#[tokio::test]
async fn health_reports_registered_services_serving() {
    let mut server = Server::new(&listen(Duration::from_secs(5)));
    server.register_service(REGISTRY);
    let running = start(server).await;

    assert_eq!(
        health(&running.grpc, REGISTRY).await.unwrap(),
        ServingStatus::Serving
    );
    assert_eq!(
        health(&running.grpc, "").await.unwrap(),
        ServingStatus::Serving
    );
    let unknown = health(&running.grpc, "keel.v1.NoSuchService")
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);

    running.stop.send(()).unwrap();
    running.served.await.unwrap().unwrap();
}

#[tokio::test]
async fn reflection_lists_keel_services_in_v1_and_v1alpha() {
    use tonic_reflection::pb::{v1, v1alpha};

    let running = start(Server::new(&listen(Duration::from_secs(5)))).await;

    let request = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut responses =
        v1::server_reflection_client::ServerReflectionClient::new(running.grpc.clone())
            .server_reflection_info(futures::stream::iter([request]))
            .await
            .unwrap()
            .into_inner();
    let response = responses.message().await.unwrap().unwrap();
    let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        response.message_response
    else {
        panic!("not a service list: {response:?}");
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    assert!(names.contains(&REGISTRY), "{names:?}");
    assert!(names.contains(&"grpc.health.v1.Health"), "{names:?}");

    let request = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::ListServices(String::new()),
        ),
    };
    let mut responses =
        v1alpha::server_reflection_client::ServerReflectionClient::new(running.grpc.clone())
            .server_reflection_info(futures::stream::iter([request]))
            .await
            .unwrap()
            .into_inner();
    let response = responses.message().await.unwrap().unwrap();
    let Some(v1alpha::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        response.message_response
    else {
        panic!("not a service list: {response:?}");
    };
    assert!(list.service.iter().any(|s| s.name == REGISTRY), "{list:?}");
}

#[tokio::test]
async fn metrics_count_grpc_calls_with_bounded_labels() {
    let mut server = Server::new(&listen(Duration::from_secs(5)));
    server.register_service(REGISTRY);
    let things = Counter::<u64>::default();
    server.metrics().register(
        "keel_test_things",
        "Things a service counts",
        things.clone(),
    );
    things.inc();
    let running = start(server).await;

    health(&running.grpc, "").await.unwrap();
    health(&running.grpc, "").await.unwrap();
    health(&running.grpc, "keel.v1.NoSuchService")
        .await
        .unwrap_err();
    // Declared but not routed here: a known method, answered UNIMPLEMENTED.
    assert_eq!(
        call_raw(&running.grpc, "/keel.v1.RegistryService/CreateInstance").await,
        tonic::Code::Unimplemented
    );
    // Made-up paths all land in one `other` series.
    assert_eq!(
        call_raw(&running.grpc, "/made.up.Service/One").await,
        tonic::Code::Unimplemented
    );
    assert_eq!(
        call_raw(&running.grpc, "/keel.v1.RegistryService/Two").await,
        tonic::Code::Unimplemented
    );

    let (status, content_type, body) = get_with_headers(
        running.http,
        "/metrics",
        "accept: application/openmetrics-text;version=1.0.0,text/plain;q=0.5\r\n",
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        content_type,
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    for expected in [
        r#"grpc_server_handled_total{grpc_service="grpc.health.v1.Health",grpc_method="Check",grpc_code="OK"} 2"#,
        r#"grpc_server_handled_total{grpc_service="grpc.health.v1.Health",grpc_method="Check",grpc_code="NOT_FOUND"} 1"#,
        r#"grpc_server_handled_total{grpc_service="keel.v1.RegistryService",grpc_method="CreateInstance",grpc_code="UNIMPLEMENTED"} 1"#,
        r#"grpc_server_handled_total{grpc_service="other",grpc_method="other",grpc_code="UNIMPLEMENTED"} 2"#,
        r#"grpc_server_handling_seconds_count{grpc_service="grpc.health.v1.Health",grpc_method="Check"} 3"#,
        "# TYPE grpc_server_handling_seconds histogram",
        "keel_test_things_total 1",
    ] {
        assert!(body.contains(expected), "missing {expected:?} in\n{body}");
    }
    assert!(body.ends_with("# EOF\n"), "{body}");
    assert!(!body.contains("Two"), "{body}");

    // Without asking for OpenMetrics: the 0.0.4 text format, counters named like their samples.
    let (status, content_type, body) = get(running.http, "/metrics").await;
    assert_eq!(status, 200);
    assert_eq!(content_type, "text/plain; version=0.0.4; charset=utf-8");
    for expected in [
        "# TYPE grpc_server_handled_total counter",
        r#"grpc_server_handled_total{grpc_service="grpc.health.v1.Health",grpc_method="Check",grpc_code="OK"} 2"#,
        "# TYPE keel_test_things_total counter",
    ] {
        assert!(body.contains(expected), "missing {expected:?} in\n{body}");
    }
    assert!(!body.contains("# EOF"), "{body}");

    running.stop.send(()).unwrap();
    running.served.await.unwrap().unwrap();
}

#[tokio::test]
async fn readyz_reports_failing_checks() {
    let mut server = Server::new(&listen(Duration::from_secs(5)));
    let nats_up = Arc::new(AtomicBool::new(false));
    let flag = nats_up.clone();
    server.readiness_check("nats", move || {
        let up = flag.load(Ordering::SeqCst);
        Box::pin(async move {
            if up {
                Ok(())
            } else {
                Err("connection refused".into())
            }
        })
    });
    server.readiness_check("postgres", || Box::pin(async { Ok(()) }));
    let running = start(server).await;

    assert_eq!(
        get(running.http, "/healthz").await,
        (200, "text/plain; charset=utf-8".into(), "ok\n".into())
    );
    let (status, _, body) = get(running.http, "/readyz").await;
    assert_eq!((status, body.as_str()), (503, "nats: connection refused\n"));

    nats_up.store(true, Ordering::SeqCst);
    let (status, _, body) = get(running.http, "/readyz").await;
    assert_eq!((status, body.as_str()), (200, "ok\n"));

    running.stop.send(()).unwrap();
    running.served.await.unwrap().unwrap();
}

#[tokio::test]
async fn readyz_fails_a_check_that_hangs() {
    let mut server = Server::new(&listen(Duration::from_secs(5)));
    server.readiness_check("postgres", || Box::pin(std::future::pending()));
    let running = start(server).await;

    let (status, _, body) = get(running.http, "/readyz").await;
    assert_eq!(status, 503);
    assert!(body.starts_with("postgres: no answer within"), "{body}");

    running.stop.send(()).unwrap();
    running.served.await.unwrap().unwrap();
}

#[tokio::test]
async fn shutdown_turns_health_off_and_returns_within_the_grace_period() {
    let mut server = Server::new(&listen(Duration::from_millis(300)));
    server.register_service(REGISTRY);
    let running = start(server).await;

    // A Watch stream never ends by itself: it is the in-flight request the grace period cuts off.
    let mut watch = HealthClient::new(running.grpc.clone())
        .watch(HealthCheckRequest {
            service: REGISTRY.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        watch.message().await.unwrap().unwrap().status(),
        ServingStatus::Serving
    );

    running.stop.send(()).unwrap();
    assert_eq!(
        watch.message().await.unwrap().unwrap().status(),
        ServingStatus::NotServing
    );
    let served = tokio::time::timeout(Duration::from_secs(5), running.served).await;
    served.unwrap().unwrap().unwrap();
    assert!(tokio::net::TcpStream::connect(running.http).await.is_err());
}

#[tokio::test]
async fn serve_reports_an_address_in_use() {
    let taken = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut config = listen(Duration::from_secs(1));
    config.grpc = taken.local_addr().unwrap();
    let err = Server::new(&config)
        .serve(Routes::default(), std::future::pending())
        .await
        .unwrap_err();
    assert!(matches!(err, ServerError::Bind { .. }), "{err}");
}

#[tokio::test]
async fn metrics_need_the_bearer_token_from_the_token_file() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("metrics-token");
    std::fs::write(&token_file, "scrape-me\n").unwrap();
    let mut config = listen(Duration::from_secs(5));
    config.metrics_anonymous = false;
    config.metrics_token_file = Some(token_file);
    let running = start(Server::new(&config)).await;

    let check = |authorization: Option<&'static str>, expected: u16| {
        let http = running.http;
        async move {
            let (status, _, body) = get_with(http, "/metrics", authorization).await;
            assert_eq!(status, expected, "{authorization:?}: {body}");
            body
        }
    };
    let body = check(None, 401).await;
    assert_eq!(body, "/metrics needs authorization: Bearer <token>\n");
    check(Some("Bearer wrong"), 401).await;
    check(Some("Bearer scrape-me-too"), 401).await;
    check(Some("Basic scrape-me"), 401).await;
    let body = check(Some("Bearer scrape-me"), 200).await;
    assert!(body.contains("keel_build_info{"), "{body}");
    // Probes stay open.
    assert_eq!(get(running.http, "/healthz").await.0, 200);
    assert_eq!(get(running.http, "/readyz").await.0, 200);

    running.stop.send(()).unwrap();
    running.served.await.unwrap().unwrap();
}

#[tokio::test]
async fn metrics_are_closed_without_a_token_unless_anonymous_access_is_set() {
    let mut config = listen(Duration::from_secs(5));
    config.metrics_anonymous = false;
    let running = start(Server::new(&config)).await;
    assert_eq!(get(running.http, "/metrics").await.0, 401);
    assert_eq!(
        get_with(running.http, "/metrics", Some("Bearer ")).await.0,
        401
    );
    assert_eq!(get(running.http, "/healthz").await.0, 200);
    running.stop.send(()).unwrap();
    running.served.await.unwrap().unwrap();

    config.metrics_anonymous = true;
    let running = start(Server::new(&config)).await;
    assert_eq!(get(running.http, "/metrics").await.0, 200);
    running.stop.send(()).unwrap();
    running.served.await.unwrap().unwrap();
}

#[tokio::test]
async fn an_empty_metrics_token_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("metrics-token");
    std::fs::write(&token_file, "\n").unwrap();
    let mut config = listen(Duration::from_secs(5));
    config.metrics_anonymous = false;
    config.metrics_token_file = Some(token_file);
    let err = Server::new(&config)
        .serve(Routes::default(), std::future::pending())
        .await
        .unwrap_err();
    assert!(matches!(err, ServerError::Config(_)), "{err}");
    assert!(err.to_string().contains("is empty"), "{err}");
}
