//! The HTTP listener's edge, through a route added with `Server::http_routes`, on a real
//! plaintext server on 127.0.0.1:0: the client address with and without trusted proxies, and the
//! body cap for declared and chunked bodies.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

mod common;

use common::Logs;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use axum::Extension;
use axum::body::{Body, Bytes};
use axum::routing::post;
use futures::StreamExt as _;
use keel_config::ListenConfig;
use keel_server::{ClientAddr, Server, ServerError};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::service::Routes;

/// The body cap of these tests: small, so that going past it is quick.
const LIMIT: usize = 1024;

/// What the `/echo` handler saw.
#[derive(Debug, Default)]
struct Seen {
    /// Whether the handler ran at all.
    ran: AtomicBool,
    /// The most body bytes it got for one request.
    most: AtomicUsize,
}

/// Answers `<client address> <body length>`. It streams the body itself, counting what arrives,
/// and answers 400 to a body error: the edge has to turn that into 413.
async fn echo(
    Extension(seen): Extension<Arc<Seen>>,
    Extension(ClientAddr(client)): Extension<ClientAddr>,
    body: Body,
) -> (http::StatusCode, String) {
    seen.ran.store(true, Ordering::SeqCst);
    let mut length = 0;
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(chunk) => {
                length += chunk.len();
                seen.most.fetch_max(length, Ordering::SeqCst);
            }
            Err(error) => return (http::StatusCode::BAD_REQUEST, format!("{error}\n")),
        }
    }
    (http::StatusCode::OK, format!("{client} {length}"))
}

/// The same with axum's `Bytes` extractor, which buffers the body before the handler runs.
async fn echo_bytes(Extension(ClientAddr(client)): Extension<ClientAddr>, body: Bytes) -> String {
    format!("{client} {}", body.len())
}

/// Plaintext listeners with a body cap of [`LIMIT`] and the given trusted proxies.
fn listen(trusted_proxies: &[&str]) -> ListenConfig {
    let mut listen = ListenConfig::plaintext(
        "127.0.0.1:0".parse().unwrap(),
        "127.0.0.1:0".parse().unwrap(),
    );
    listen.shutdown_grace = Duration::from_secs(2);
    listen.trusted_proxies = trusted_proxies.iter().map(|&s| s.to_owned()).collect();
    listen.http_body_limit = LIMIT;
    listen
}

/// A server running in the background, and how to stop it.
struct Running {
    http: SocketAddr,
    seen: Arc<Seen>,
    stop: oneshot::Sender<()>,
    served: JoinHandle<Result<(), ServerError>>,
}

impl Running {
    async fn stop(self) {
        self.stop.send(()).unwrap();
        self.served.await.unwrap().unwrap();
    }
}

async fn start(listen: &ListenConfig) -> Running {
    let seen = Arc::new(Seen::default());
    let mut server = Server::new(listen);
    server.http_routes(
        axum::Router::new()
            .route("/echo", post(echo))
            .route("/echo-bytes", post(echo_bytes))
            .layer(Extension(seen.clone())),
    );
    let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http_addr = http.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let served = tokio::spawn(
        server.serve_with_listeners(grpc, http, Routes::default(), async {
            let _ = stopped.await;
        }),
    );
    Running {
        http: http_addr,
        seen,
        stop,
        served,
    }
}

/// Sends `request` whole and returns status and body of the answer.
async fn exchange(addr: SocketAddr, request: &[u8]) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    read_response(&mut stream).await
}

/// Reads one HTTP/1.x response: its status and its body (up to the connection's end, since
/// every request here says `connection: close`).
async fn read_response(stream: &mut (impl tokio::io::AsyncRead + Unpin)) -> (u16, String) {
    let mut raw = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        let mut buf = [0; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => raw.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(read.is_ok(), "no complete response within 10 s");
    let raw = String::from_utf8(raw).unwrap();
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("{raw:?}"));
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, body.to_owned())
}

/// A POST of `body` with `Content-Length`, and extra header lines.
fn post_request(path: &str, headers: &str, body: &[u8]) -> Vec<u8> {
    let mut request = format!(
        "POST {path} HTTP/1.1\r\nhost: keel\r\nconnection: close\r\n{headers}content-length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(body);
    request
}

/// A chunked POST of `body` in one go.
fn chunked_request(path: &str, body: &[u8]) -> Vec<u8> {
    let mut request = format!(
        "POST {path} HTTP/1.1\r\nhost: keel\r\nconnection: close\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(body);
    request.extend_from_slice(b"\r\n0\r\n\r\n");
    request
}

#[tokio::test]
async fn forwarded_for_from_an_untrusted_peer_is_ignored() {
    let running = start(&listen(&[])).await;
    let request = post_request("/echo", "x-forwarded-for: 1.2.3.4\r\n", b"hello");
    assert_eq!(
        exchange(running.http, &request).await,
        (200, "127.0.0.1 5".to_owned())
    );
    // Trusting other networks does not make 127.0.0.1 a proxy either.
    running.stop().await;
    let running = start(&listen(&["10.0.0.0/8"])).await;
    assert_eq!(
        exchange(running.http, &request).await,
        (200, "127.0.0.1 5".to_owned())
    );
    running.stop().await;
}

#[tokio::test]
async fn forwarded_for_from_a_trusted_proxy_names_the_client() {
    let logs = Logs::default();
    let _guard = logs.capture();
    let running = start(&listen(&["127.0.0.0/8", "10.0.0.0/8"])).await;
    let request = post_request(
        "/echo",
        "x-forwarded-for: 203.0.113.7, 10.0.0.1\r\n",
        b"hello",
    );
    assert_eq!(
        exchange(running.http, &request).await,
        (200, "203.0.113.7 5".to_owned())
    );
    // The span of the request records the client and the TCP peer.
    let text = logs.text();
    let line = text
        .lines()
        .find(|line| line.contains("http request served"))
        .unwrap_or_else(|| panic!("no request log line in\n{text}"));
    assert!(line.contains("client.address=203.0.113.7"), "{line}");
    assert!(line.contains("network.peer.address=127.0.0.1"), "{line}");
    assert!(line.contains("status=200"), "{line}");

    // A client-written address left of the one our proxies saw is not believed...
    let request = post_request(
        "/echo",
        "x-forwarded-for: 1.2.3.4, 203.0.113.7, 10.0.0.1\r\n",
        b"",
    );
    assert_eq!(
        exchange(running.http, &request).await,
        (200, "203.0.113.7 0".to_owned())
    );
    // ...and a malformed chain leaves the peer.
    let request = post_request("/echo", "x-forwarded-for: 203.0.113.7, bogus\r\n", b"");
    assert_eq!(
        exchange(running.http, &request).await,
        (200, "127.0.0.1 0".to_owned())
    );
    running.stop().await;
}

#[tokio::test]
async fn bodies_under_the_cap_reach_the_handler() {
    let running = start(&listen(&[])).await;
    let body = vec![b'x'; LIMIT];
    assert_eq!(
        exchange(running.http, &post_request("/echo", "", &body)).await,
        (200, format!("127.0.0.1 {LIMIT}"))
    );
    assert_eq!(
        exchange(running.http, &chunked_request("/echo", &body)).await,
        (200, format!("127.0.0.1 {LIMIT}"))
    );
    assert_eq!(
        exchange(running.http, &chunked_request("/echo-bytes", &body)).await,
        (200, format!("127.0.0.1 {LIMIT}"))
    );
    running.stop().await;
}

#[tokio::test]
async fn a_declared_length_over_the_cap_is_refused_before_the_handler_runs() {
    let running = start(&listen(&[])).await;
    // Only the head is sent: the answer must come without the server waiting for the body.
    let mut stream = TcpStream::connect(running.http).await.unwrap();
    stream
        .write_all(
            format!(
                "POST /echo HTTP/1.1\r\nhost: keel\r\ncontent-length: {}\r\n\r\n",
                LIMIT + 1
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let (status, body) = read_response(&mut stream).await;
    assert_eq!(status, 413, "{body}");
    assert_eq!(body, format!("request body larger than {LIMIT} bytes\n"));
    assert!(!running.seen.ran.load(Ordering::SeqCst));

    // The same with the body sent, and for the buffering extractor.
    let body = vec![b'x'; LIMIT + 1];
    assert_eq!(
        exchange(running.http, &post_request("/echo-bytes", "", &body))
            .await
            .0,
        413
    );
    assert!(!running.seen.ran.load(Ordering::SeqCst));
    running.stop().await;
}

#[tokio::test]
async fn a_chunked_body_is_cut_off_once_past_the_cap() {
    let running = start(&listen(&[])).await;
    let stream = TcpStream::connect(running.http).await.unwrap();
    let (mut reader, mut writer) = stream.into_split();
    writer
        .write_all(
            b"POST /echo HTTP/1.1\r\nhost: keel\r\nconnection: close\r\ntransfer-encoding: chunked\r\n\r\n",
        )
        .await
        .unwrap();

    // 256 chunks of 256 bytes, one every 10 ms: 64 times the cap, over 2.5 s. The answer has to
    // come long before the last one.
    const CHUNK: usize = 256;
    const CHUNKS: usize = 256;
    let sent = Arc::new(AtomicUsize::new(0));
    let sending = tokio::spawn({
        let sent = sent.clone();
        async move {
            let chunk = format!("{CHUNK:x}\r\n{}\r\n", "x".repeat(CHUNK));
            for _ in 0..CHUNKS {
                // Once the server has answered and closed, writing fails: that is the point.
                if writer.write_all(chunk.as_bytes()).await.is_err() {
                    return;
                }
                sent.fetch_add(CHUNK, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let _ = writer.write_all(b"0\r\n\r\n").await;
        }
    });
    let (status, body) = read_response(&mut reader).await;
    let sent_when_answered = sent.load(Ordering::SeqCst);
    sending.abort();
    assert_eq!(status, 413, "{body}");
    assert_eq!(body, format!("request body larger than {LIMIT} bytes\n"));
    assert!(
        sent_when_answered < CHUNK * CHUNKS,
        "answered only after the whole body: {sent_when_answered} bytes"
    );
    // The handler ran, and never got more than the cap.
    assert!(running.seen.ran.load(Ordering::SeqCst));
    let most = running.seen.most.load(Ordering::SeqCst);
    assert!(most <= LIMIT, "the handler got {most} bytes");

    // A buffering extractor is cut off the same way.
    let body = vec![b'x'; 4 * LIMIT];
    assert_eq!(
        exchange(running.http, &chunked_request("/echo-bytes", &body))
            .await
            .0,
        413
    );
    running.stop().await;
}
