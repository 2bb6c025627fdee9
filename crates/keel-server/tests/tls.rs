//! TLS on both listeners, certificate reloading, mutual TLS and the peer identity, against a real
//! server on 127.0.0.1:0 with certificates made here.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

mod common;

use common::Logs;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use keel_config::{ClientAuth, ListenConfig};
use keel_server::{ClientAddr, PeerIdentity, Server, ServerError};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::server::NamedService;
use tonic::service::Routes;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// A test CA that signs server and client certificates.
struct Pki {
    ca_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// A certificate and its key, as PEM, and the certificate as DER to compare with what is served.
struct Leaf {
    cert_pem: String,
    key_pem: String,
    der: CertificateDer<'static>,
}

impl Pki {
    fn new(name: &str) -> Self {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).unwrap();
        Self {
            ca_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    fn leaf(
        &self,
        common_name: Option<&str>,
        alternative_names: &[&str],
        usage: ExtendedKeyUsagePurpose,
    ) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let names: Vec<String> = alternative_names.iter().map(|&n| n.to_owned()).collect();
        let mut params = CertificateParams::new(names).unwrap();
        params.distinguished_name = DistinguishedName::new();
        if let Some(name) = common_name {
            params.distinguished_name.push(DnType::CommonName, name);
        }
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().clone(),
        }
    }

    /// A server certificate for localhost and 127.0.0.1.
    fn server(&self, common_name: &str) -> Leaf {
        self.leaf(
            Some(common_name),
            &["localhost", "127.0.0.1"],
            ExtendedKeyUsagePurpose::ServerAuth,
        )
    }

    fn client(&self, common_name: &str) -> Leaf {
        self.leaf(Some(common_name), &[], ExtendedKeyUsagePurpose::ClientAuth)
    }
}

/// The TLS files of one server, in a temporary directory.
struct Files {
    dir: tempfile::TempDir,
}

impl Files {
    fn new(pki: &Pki, server: &Leaf) -> Self {
        let files = Self {
            dir: tempfile::tempdir().unwrap(),
        };
        files.write_ca(&pki.ca_pem);
        files.write_server(server);
        files
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Replaces the server certificate and key, each file atomically (as a Kubernetes Secret
    /// update or cert-manager does), one after the other.
    fn write_server(&self, leaf: &Leaf) {
        write_atomically(&self.path("tls.crt"), leaf.cert_pem.as_bytes());
        write_atomically(&self.path("tls.key"), leaf.key_pem.as_bytes());
    }

    fn write_ca(&self, pem: &str) {
        write_atomically(&self.path("ca.crt"), pem.as_bytes());
    }

    fn listen(&self) -> ListenConfig {
        let mut listen = ListenConfig::tls(
            "127.0.0.1:0".parse().unwrap(),
            "127.0.0.1:0".parse().unwrap(),
            self.path("tls.crt"),
            self.path("tls.key"),
        );
        listen.shutdown_grace = Duration::from_secs(5);
        listen.metrics_anonymous = true;
        listen
    }

    fn listen_mutual(&self, mode: ClientAuth) -> ListenConfig {
        let mut listen = self.listen();
        listen.tls_client_ca_file = Some(self.path("ca.crt"));
        listen.tls_client_auth = Some(mode);
        listen
    }
}

fn write_atomically(path: &Path, contents: &[u8]) {
    let temporary = path.with_extension("tmp");
    std::fs::write(&temporary, contents).unwrap();
    std::fs::rename(&temporary, path).unwrap();
}

/// A gRPC service that answers with the caller's [`PeerIdentity`] as a handler sees it, and
/// whether tonic's own connection info (remote address, peer certificates) is there too.
#[derive(Debug, Clone)]
struct Whoami;

impl NamedService for Whoami {
    const NAME: &'static str = "keel.test.Whoami";
}

const WHOAMI: &str = "/keel.test.Whoami/Get";

struct WhoamiHandler;

impl tonic::server::UnaryService<()> for WhoamiHandler {
    type Response = String;
    type Future = std::future::Ready<Result<tonic::Response<String>, tonic::Status>>;

    fn call(&mut self, request: tonic::Request<()>) -> Self::Future {
        let identity = request
            .extensions()
            .get::<PeerIdentity>()
            .map(|identity| identity.0.clone())
            .unwrap_or_else(|| "<none>".to_owned());
        let certs = request.peer_certs().map_or(0, |certs| certs.len());
        let remote = request.remote_addr().is_some();
        std::future::ready(Ok(tonic::Response::new(format!(
            "{identity} certs={certs} remote={remote}"
        ))))
    }
}

impl tower_service::Service<http::Request<tonic::body::Body>> for Whoami {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        Box::pin(async move {
            let mut grpc =
                tonic::server::Grpc::new(tonic_prost::ProstCodec::<String, ()>::default());
            Ok(grpc.unary(WhoamiHandler, request).await)
        })
    }
}

async fn whoami(channel: &Channel) -> Result<String, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let response = grpc
        .unary(
            tonic::Request::new(()),
            http::uri::PathAndQuery::from_static(WHOAMI),
            tonic_prost::ProstCodec::<(), String>::default(),
        )
        .await?;
    Ok(response.into_inner())
}

/// A server running in the background, and how to stop it.
struct Running {
    grpc: SocketAddr,
    http: SocketAddr,
    stop: oneshot::Sender<()>,
    served: JoinHandle<Result<(), ServerError>>,
}

impl Running {
    /// Stops the server; once it returned, both listeners are closed.
    async fn stop(self) {
        self.stop.send(()).unwrap();
        self.served.await.unwrap().unwrap();
        assert!(TcpStream::connect(self.grpc).await.is_err());
        assert!(TcpStream::connect(self.http).await.is_err());
    }
}

async fn start(listen: &ListenConfig) -> Running {
    serve(Server::new(listen)).await
}

async fn serve(server: Server) -> Running {
    let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (grpc_addr, http_addr) = (grpc.local_addr().unwrap(), http.local_addr().unwrap());
    let (stop, stopped) = oneshot::channel::<()>();
    let served =
        tokio::spawn(
            server.serve_with_listeners(grpc, http, Routes::new(Whoami), async {
                let _ = stopped.await;
            }),
        );
    Running {
        grpc: grpc_addr,
        http: http_addr,
        stop,
        served,
    }
}

/// A TLS channel trusting `ca_pem`, presenting `client` when given.
async fn tls_channel(
    addr: SocketAddr,
    ca_pem: &str,
    client: Option<&Leaf>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name("localhost");
    if let Some(client) = client {
        tls = tls.identity(Identity::from_pem(&client.cert_pem, &client.key_pem));
    }
    Channel::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
}

async fn health(channel: &Channel) -> Result<ServingStatus, tonic::Status> {
    let response = HealthClient::new(channel.clone())
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await?;
    Ok(response.into_inner().status())
}

/// Whether a client without a certificate (or with `client`) gets a health answer.
async fn health_ok(addr: SocketAddr, ca_pem: &str, client: Option<&Leaf>) -> bool {
    match tls_channel(addr, ca_pem, client).await {
        Ok(channel) => health(&channel).await.is_ok(),
        Err(_) => false,
    }
}

fn tls_connector(ca_pem: &str) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap())
        .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// The end-entity certificate a fresh TLS handshake with `addr` gets.
async fn served_certificate(addr: SocketAddr, ca_pem: &str) -> CertificateDer<'static> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let tls = tls_connector(ca_pem)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].clone()
}

/// Status and body of an HTTP/1.0 GET over TLS.
async fn https_get(
    addr: SocketAddr,
    ca_pem: &str,
    path: &str,
    authorization: Option<&str>,
) -> (u16, String) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut tls = tls_connector(ca_pem)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let authorization = authorization
        .map(|value| format!("authorization: {value}\r\n"))
        .unwrap_or_default();
    tls.write_all(format!("GET {path} HTTP/1.0\r\nHost: keel\r\n{authorization}\r\n").as_bytes())
        .await
        .unwrap();
    let mut raw = Vec::new();
    // Whether the server closes with a close_notify or not, the response is complete by then.
    let _ = tls.read_to_end(&mut raw).await;
    let raw = String::from_utf8(raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, body.to_owned())
}

/// What a plaintext HTTP/1.0 GET gets back (an error or garbage, from a TLS listener).
async fn plaintext_get(addr: SocketAddr, path: &str) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let _ = stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: keel\r\n\r\n").as_bytes())
        .await;
    let mut raw = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut raw)).await;
    String::from_utf8_lossy(&raw).into_owned()
}

/// Polls `condition` every 50 ms until it holds; fails after 20 s (reloads happen every 2 s).
async fn eventually<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !condition().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn both_listeners_serve_tls_and_refuse_plaintext() {
    let pki = Pki::new("keel test ca");
    let files = Files::new(&pki, &pki.server("keel-server"));
    let running = start(&files.listen()).await;

    let channel = tls_channel(running.grpc, &pki.ca_pem, None).await.unwrap();
    assert_eq!(health(&channel).await.unwrap(), ServingStatus::Serving);
    // Without mutual TLS there is no peer identity, but tonic's connection info is there.
    assert_eq!(
        whoami(&channel).await.unwrap(),
        "<none> certs=0 remote=true"
    );

    let plaintext = Channel::from_shared(format!("http://{}", running.grpc))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5));
    // The TLS listener drops the connection at the first plaintext byte: either connecting fails
    // or the call does (with UNKNOWN or UNAVAILABLE: the client's choice).
    if let Ok(channel) = plaintext.connect().await {
        assert!(health(&channel).await.is_err());
    }

    assert_eq!(
        https_get(running.http, &pki.ca_pem, "/healthz", None).await,
        (200, "ok\n".to_owned())
    );
    let (status, body) = https_get(running.http, &pki.ca_pem, "/metrics", None).await;
    assert_eq!(status, 200);
    assert!(body.contains("grpc_server_handled_total"), "{body}");
    let answer = plaintext_get(running.http, "/healthz").await;
    assert!(!answer.contains("ok"), "plaintext answered: {answer:?}");

    running.stop().await;
}

#[tokio::test]
async fn a_replaced_certificate_is_served_to_new_connections() {
    let logs = Logs::default();
    let _guard = logs.capture();
    let pki = Pki::new("keel test ca");
    let first = pki.server("keel-server-1");
    let files = Files::new(&pki, &first);
    let running = start(&files.listen()).await;

    assert_eq!(
        served_certificate(running.grpc, &pki.ca_pem).await,
        first.der
    );
    assert_eq!(
        served_certificate(running.http, &pki.ca_pem).await,
        first.der
    );
    let open = tls_channel(running.grpc, &pki.ca_pem, None).await.unwrap();
    health(&open).await.unwrap();

    // A broken certificate file is skipped with a warning; the previous certificate stays.
    write_atomically(&files.path("tls.crt"), b"not a certificate");
    eventually("the broken file is reported", || {
        let text = logs.text();
        async move { text.contains("still serving the previous certificate") }
    })
    .await;
    assert_eq!(
        served_certificate(running.grpc, &pki.ca_pem).await,
        first.der
    );
    assert_eq!(health(&open).await.unwrap(), ServingStatus::Serving);

    let second = pki.server("keel-server-2");
    assert_ne!(first.der, second.der);
    files.write_server(&second);
    eventually("the new certificate is served", || {
        let (addr, ca) = (running.grpc, pki.ca_pem.clone());
        let expected = second.der.clone();
        async move { served_certificate(addr, &ca).await == expected }
    })
    .await;
    assert_eq!(
        served_certificate(running.http, &pki.ca_pem).await,
        second.der
    );
    assert!(logs.text().contains("tls certificate reloaded"));
    // New connections work with the new certificate; the one already open goes on.
    let fresh = tls_channel(running.grpc, &pki.ca_pem, None).await.unwrap();
    assert_eq!(health(&fresh).await.unwrap(), ServingStatus::Serving);
    assert_eq!(health(&open).await.unwrap(), ServingStatus::Serving);

    running.stop().await;
}

#[tokio::test]
async fn required_client_certificates_refuse_clients_without_one() {
    let pki = Pki::new("keel test ca");
    let files = Files::new(&pki, &pki.server("keel-server"));
    let running = start(&files.listen_mutual(ClientAuth::Required)).await;

    assert!(!health_ok(running.grpc, &pki.ca_pem, None).await);
    let stranger = Pki::new("someone else's ca").client("svc-reporter");
    assert!(!health_ok(running.grpc, &pki.ca_pem, Some(&stranger)).await);

    let client = pki.client("svc-reporter");
    let channel = tls_channel(running.grpc, &pki.ca_pem, Some(&client))
        .await
        .unwrap();
    assert_eq!(health(&channel).await.unwrap(), ServingStatus::Serving);
    assert_eq!(
        whoami(&channel).await.unwrap(),
        "svc-reporter certs=1 remote=true"
    );

    // Probes cannot present certificates: the HTTP listener does not ask for one.
    assert_eq!(
        https_get(running.http, &pki.ca_pem, "/healthz", None).await,
        (200, "ok\n".to_owned())
    );

    running.stop().await;
}

#[tokio::test]
async fn optional_client_certificates_give_an_identity_when_presented() {
    let pki = Pki::new("keel test ca");
    let files = Files::new(&pki, &pki.server("keel-server"));
    let running = start(&files.listen_mutual(ClientAuth::Optional)).await;

    let anonymous = tls_channel(running.grpc, &pki.ca_pem, None).await.unwrap();
    assert_eq!(
        whoami(&anonymous).await.unwrap(),
        "<none> certs=0 remote=true"
    );

    let client = pki.client("svc-collector");
    let channel = tls_channel(running.grpc, &pki.ca_pem, Some(&client))
        .await
        .unwrap();
    assert_eq!(
        whoami(&channel).await.unwrap(),
        "svc-collector certs=1 remote=true"
    );

    // Without a common name, the first DNS name stands in.
    let unnamed = pki.leaf(
        None,
        &["collector.keel.internal", "other.keel.internal"],
        ExtendedKeyUsagePurpose::ClientAuth,
    );
    let channel = tls_channel(running.grpc, &pki.ca_pem, Some(&unnamed))
        .await
        .unwrap();
    assert_eq!(
        whoami(&channel).await.unwrap(),
        "collector.keel.internal certs=1 remote=true"
    );

    // A certificate that is presented is still verified.
    let stranger = Pki::new("someone else's ca").client("svc-collector");
    assert!(!health_ok(running.grpc, &pki.ca_pem, Some(&stranger)).await);

    running.stop().await;
}

async fn serve_error(listen: &ListenConfig) -> ServerError {
    let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
    Server::new(listen)
        .serve_with_listeners(grpc, http, Routes::default(), std::future::pending())
        .await
        .unwrap_err()
}

#[tokio::test]
async fn serving_refuses_missing_or_unusable_tls() {
    let pki = Pki::new("keel test ca");
    let files = Files::new(&pki, &pki.server("keel-server"));

    let mut plaintext_not_allowed = files.listen();
    plaintext_not_allowed.tls_cert_file = None;
    plaintext_not_allowed.tls_key_file = None;
    let err = serve_error(&plaintext_not_allowed).await;
    assert!(matches!(err, ServerError::Config(_)), "{err}");
    assert!(
        err.to_string()
            .contains("or set --allow-plaintext / KEEL_ALLOW_PLAINTEXT=true"),
        "{err}"
    );
    // `serve` checks before binding anything.
    let err = Server::new(&plaintext_not_allowed)
        .serve(Routes::default(), std::future::pending())
        .await
        .unwrap_err();
    assert!(matches!(err, ServerError::Config(_)), "{err}");

    let mut key_only = files.listen();
    key_only.tls_cert_file = None;
    key_only.allow_plaintext = true;
    let err = serve_error(&key_only).await;
    assert!(matches!(err, ServerError::Config(_)), "{err}");

    // A key that does not belong to the certificate.
    write_atomically(
        &files.path("tls.key"),
        pki.server("other").key_pem.as_bytes(),
    );
    let err = serve_error(&files.listen()).await;
    assert!(matches!(err, ServerError::Tls(_)), "{err}");

    let mut missing_ca = files.listen_mutual(ClientAuth::Required);
    missing_ca.tls_client_ca_file = Some(files.path("no-such-ca.crt"));
    let err = serve_error(&missing_ca).await;
    assert!(matches!(err, ServerError::Tls(_)), "{err}");
    assert!(err.to_string().contains("no-such-ca.crt"), "{err}");
}

#[tokio::test]
async fn http_routes_get_the_client_address_over_tls_too() {
    use axum::Extension;
    use axum::extract::ConnectInfo;

    let pki = Pki::new("keel test ca");
    let files = Files::new(&pki, &pki.server("keel-server"));
    let mut server = Server::new(&files.listen());
    server.http_routes(axum::Router::new().route(
        "/client",
        axum::routing::get(
            |Extension(ClientAddr(client)): Extension<ClientAddr>,
             ConnectInfo(peer): ConnectInfo<SocketAddr>| async move {
                format!("{client} {}", peer.ip())
            },
        ),
    ));
    let running = serve(server).await;
    assert_eq!(
        https_get(running.http, &pki.ca_pem, "/client", None).await,
        (200, "127.0.0.1 127.0.0.1".to_owned())
    );
    running.stop().await;
}

#[tokio::test]
async fn plaintext_is_served_only_with_a_warning_per_listener() {
    let logs = Logs::default();
    let _guard = logs.capture();
    let mut listen = ListenConfig::plaintext(
        "127.0.0.1:0".parse().unwrap(),
        "127.0.0.1:0".parse().unwrap(),
    );
    listen.shutdown_grace = Duration::from_secs(5);
    let running = start(&listen).await;

    let channel = Channel::from_shared(format!("http://{}", running.grpc))
        .unwrap()
        .connect()
        .await
        .unwrap();
    assert_eq!(health(&channel).await.unwrap(), ServingStatus::Serving);
    let text = logs.text();
    for expected in [
        format!(
            "serving gRPC WITHOUT TLS on {}: anyone on the network can read API keys and credentials",
            running.grpc
        ),
        format!("serving HTTP WITHOUT TLS on {}", running.http),
        "/metrics answers 401 to every request".to_owned(),
    ] {
        assert!(text.contains(&expected), "missing {expected:?} in\n{text}");
    }
    assert!(text.contains(" WARN "), "{text}");

    running.stop().await;
}
