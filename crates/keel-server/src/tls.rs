//! TLS on the listeners: the certificate is re-read from disk while serving, client certificates
//! are verified when configured, and the verified client identity reaches gRPC handlers.

use std::convert::Infallible;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, PoisonError, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use keel_config::{ClientAuth, TlsSettings};
use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ServerConfig, WebPkiClientVerifier};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tonic::transport::server::{Connected, TcpConnectInfo, TlsConnectInfo};

use crate::PeerIdentity;

/// How often the certificate files are checked for changes. Polling the contents, rather than
/// watching for file events, also sees a Kubernetes Secret update, which swaps a symlink to a new
/// directory instead of writing the files that were watched.
const RELOAD_INTERVAL: Duration = Duration::from_secs(2);

/// Longest a client may take to complete the TLS handshake; a slow or silent client would
/// otherwise hold a handshake slot forever.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Most handshakes in progress at once on one listener. Past this, new connections wait in the
/// kernel's accept queue instead of each costing a task.
const MAX_HANDSHAKES: usize = 256;

/// Why the TLS files cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why it could not be read.
        source: io::Error,
    },
    /// A file is not PEM, or holds nothing of the expected kind.
    #[error("{path} does not hold a PEM {expected}: {source}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What the file should hold.
        expected: &'static str,
        /// What is wrong with it.
        source: rustls::pki_types::pem::Error,
    },
    /// The certificate file holds no certificate.
    #[error("{0} holds no certificate")]
    NoCertificate(PathBuf),
    /// The certificate chain and key cannot be served together (they do not match, say).
    #[error("{cert} with key {key} cannot be served: {source}")]
    Certificate {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// What rustls refused.
        source: rustls::Error,
    },
    /// The client CA file cannot be used to verify client certificates.
    #[error("client CA file {path} cannot be used: {reason}")]
    ClientCa {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
}

/// The two listeners differ in what they negotiate and whether they ask for client certificates.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Listener {
    /// gRPC: HTTP/2, client certificates when configured.
    Grpc,
    /// /metrics and probes: HTTP/1.1, never a client certificate, because Kubernetes probes
    /// cannot present one and /metrics has its own token.
    Http,
}

/// The contents of the TLS files as last read. Changes are noticed by content, not timestamps,
/// so a file copied with its old mtime kept, or replaced twice within a timestamp tick, still
/// counts as changed.
#[derive(PartialEq, Eq)]
pub(crate) struct Files {
    cert: Vec<u8>,
    key: Vec<u8>,
    client_ca: Option<Vec<u8>>,
}

impl fmt::Debug for Files {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The key must never reach a log.
        f.debug_struct("Files").finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct Configs {
    grpc: Arc<ServerConfig>,
    http: Arc<ServerConfig>,
}

/// The TLS configurations both listeners serve, replaced whenever the files change.
///
/// Each new connection takes the configuration current when it is accepted, so a renewed
/// certificate is served from the next connection on, and connections already open keep theirs.
/// Swapping the whole configuration (rather than only the certificate through a
/// `ResolvesServerCert`) also picks up a rotated client CA bundle.
#[derive(Debug)]
pub(crate) struct ReloadingTls {
    settings: TlsSettings,
    provider: Arc<CryptoProvider>,
    configs: RwLock<Configs>,
}

impl ReloadingTls {
    /// Reads and checks the files; fails if they cannot be served.
    pub(crate) async fn load(settings: TlsSettings) -> Result<(Arc<Self>, Files), TlsError> {
        // ring, as tonic's `tls-ring` uses: explicit, so that no process-wide default provider
        // needs installing and a second provider compiled in cannot make the choice ambiguous.
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let files = read_files(&settings).await?;
        let configs = build(&settings, &provider, &files)?;
        let tls = Self {
            settings,
            provider,
            configs: RwLock::new(configs),
        };
        Ok((Arc::new(tls), files))
    }

    /// The configuration a new connection on `listener` gets.
    pub(crate) fn config(&self, listener: Listener) -> Arc<ServerConfig> {
        // A panic while holding the lock cannot leave `Configs` half-written: it is replaced whole.
        let configs = self.configs.read().unwrap_or_else(PoisonError::into_inner);
        match listener {
            Listener::Grpc => configs.grpc.clone(),
            Listener::Http => configs.http.clone(),
        }
    }

    /// Whether gRPC clients are asked for certificates, for the start-up log.
    pub(crate) fn client_auth(&self) -> Option<ClientAuth> {
        self.settings.client_auth.as_ref().map(|c| c.mode)
    }

    /// Re-reads the files every [`RELOAD_INTERVAL`] until `stopping` turns true, and swaps in new
    /// configurations when they changed. Files that cannot be served leave the previous
    /// configuration in place, with a warning.
    pub(crate) async fn watch(self: Arc<Self>, mut seen: Files, stopping: watch::Receiver<bool>) {
        let mut ticks = tokio::time::interval(RELOAD_INTERVAL);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The first tick completes at once; the files were just read.
        ticks.tick().await;
        let stop = crate::stopped(stopping);
        tokio::pin!(stop);
        // Warn once per distinct failure, not every two seconds while a file stays missing.
        let mut last_read_error = None;
        loop {
            tokio::select! {
                () = &mut stop => return,
                _ = ticks.tick() => {}
            }
            let files = match read_files(&self.settings).await {
                Ok(files) => files,
                Err(error) => {
                    let message = error.to_string();
                    if last_read_error.as_ref() != Some(&message) {
                        tracing::warn!(%error, "cannot re-read the tls files; still serving the previous certificate");
                        last_read_error = Some(message);
                    }
                    continue;
                }
            };
            last_read_error = None;
            if files == seen {
                continue;
            }
            match build(&self.settings, &self.provider, &files) {
                Ok(configs) => {
                    *self.configs.write().unwrap_or_else(PoisonError::into_inner) = configs;
                    tracing::info!(cert_file = %self.settings.cert_file.display(), "tls certificate reloaded");
                }
                Err(error) => tracing::warn!(
                    %error,
                    "tls files changed but cannot be served; still serving the previous certificate"
                ),
            }
            // Remembered even when it failed: the same broken files are not retried (and warned
            // about) again; the next change is.
            seen = files;
        }
    }
}

async fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    tokio::fs::read(path)
        .await
        .map_err(|source| TlsError::Read {
            path: path.to_owned(),
            source,
        })
}

async fn read_files(settings: &TlsSettings) -> Result<Files, TlsError> {
    let client_ca = match &settings.client_auth {
        Some(client) => Some(read(&client.ca_file).await?),
        None => None,
    };
    Ok(Files {
        cert: read(&settings.cert_file).await?,
        key: read(&settings.key_file).await?,
        client_ca,
    })
}

fn build(
    settings: &TlsSettings,
    provider: &Arc<CryptoProvider>,
    files: &Files,
) -> Result<Configs, TlsError> {
    let chain = CertificateDer::pem_slice_iter(&files.cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem {
            path: settings.cert_file.clone(),
            expected: "certificate chain",
            source,
        })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate(settings.cert_file.clone()));
    }
    let key = PrivateKeyDer::from_pem_slice(&files.key).map_err(|source| TlsError::Pem {
        path: settings.key_file.clone(),
        expected: "private key",
        source,
    })?;
    let certificate_error = |source| TlsError::Certificate {
        cert: settings.cert_file.clone(),
        key: settings.key_file.clone(),
        source,
    };

    let client_verifier = match (&settings.client_auth, &files.client_ca) {
        (Some(client), Some(pem)) => {
            let ca_error = |reason: String| TlsError::ClientCa {
                path: client.ca_file.clone(),
                reason,
            };
            let mut roots = RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(pem) {
                let cert = cert.map_err(|e| ca_error(e.to_string()))?;
                roots.add(cert).map_err(|e| ca_error(e.to_string()))?;
            }
            let builder =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
            let builder = match client.mode {
                ClientAuth::Required => builder,
                ClientAuth::Optional => builder.allow_unauthenticated(),
            };
            Some(builder.build().map_err(|e| ca_error(e.to_string()))?)
        }
        _ => None,
    };

    let builder = || {
        ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(certificate_error)
    };
    let mut grpc = match client_verifier {
        Some(verifier) => builder()?.with_client_cert_verifier(verifier),
        None => builder()?.with_no_client_auth(),
    }
    .with_single_cert(chain.clone(), key.clone_key())
    .map_err(certificate_error)?;
    grpc.alpn_protocols = vec![b"h2".to_vec()];
    let mut http = builder()?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(certificate_error)?;
    http.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Configs {
        grpc: Arc::new(grpc),
        http: Arc::new(http),
    })
}

/// Accepts TCP connections on `listener` and completes their TLS handshakes concurrently, so one
/// slow client does not hold up the others; yields each established connection with its peer
/// address. Stops, closing the listener, once `stopping` turns true or the receiver is dropped.
pub(crate) fn accept(
    listener: TcpListener,
    tls: Arc<ReloadingTls>,
    which: Listener,
    stopping: watch::Receiver<bool>,
) -> (
    mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    JoinHandle<()>,
) {
    let (sender, receiver) = mpsc::channel(64);
    let task = tokio::spawn(async move {
        let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
        let stop = crate::stopped(stopping);
        tokio::pin!(stop);
        loop {
            let accepted = tokio::select! {
                () = &mut stop => break,
                () = sender.closed() => break,
                accepted = async {
                    // The semaphore is never closed, so acquiring only waits.
                    let permit = handshakes.clone().acquire_owned().await.ok();
                    (permit, listener.accept().await)
                } => accepted,
            };
            let (permit, (tcp, peer)) = match accepted {
                (permit, Ok(connection)) => (permit, connection),
                (_, Err(error)) => {
                    if !is_connection_error(&error) {
                        // Out of file descriptors, say: accepting again at once would spin.
                        tracing::error!(%error, "accepting a connection failed; retrying in 1 s");
                        tokio::select! {
                            () = &mut stop => break,
                            () = tokio::time::sleep(Duration::from_secs(1)) => {}
                        }
                    }
                    continue;
                }
            };
            // Without it, a response that spans several segments waits ~40 ms for the peer's
            // delayed ACK (Nagle): gRPC writes small frames and needs them sent at once.
            if let Err(error) = tcp.set_nodelay(true) {
                tracing::debug!(%error, "cannot set TCP_NODELAY");
            }
            let acceptor = TlsAcceptor::from(tls.config(which));
            let sender = sender.clone();
            tokio::spawn(async move {
                let _permit = permit;
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    // A send error means the server stopped; the connection is just dropped.
                    Ok(Ok(stream)) => drop(sender.send((stream, peer)).await),
                    // Scanners, plaintext clients and clients without a valid certificate end
                    // here; at debug level so that they cannot flood the log.
                    Ok(Err(error)) => tracing::debug!(%peer, %error, "tls handshake failed"),
                    Err(_) => tracing::debug!(%peer, "tls handshake timed out"),
                }
            });
        }
    });
    (receiver, task)
}

/// Errors that concern one connection only, not the listener.
fn is_connection_error(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// The gRPC listener's connections, as tonic's `serve_with_incoming` takes them.
pub(crate) fn grpc_incoming(
    connections: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
) -> impl Stream<Item = Result<PeerConnection, Infallible>> {
    futures::stream::unfold(connections, |mut connections| async move {
        let (stream, _) = connections.recv().await?;
        Some((Ok(PeerConnection::new(stream)), connections))
    })
}

/// A TLS connection on the gRPC listener, with the identity in its client's certificate.
#[derive(Debug)]
pub(crate) struct PeerConnection {
    stream: TlsStream<TcpStream>,
    identity: Option<PeerIdentity>,
}

impl PeerConnection {
    fn new(stream: TlsStream<TcpStream>) -> Self {
        // Parsed once per connection, not per request.
        let identity = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|certs| certs.first())
            .and_then(identity_of);
        Self { stream, identity }
    }
}

/// What tonic puts into the extensions of each request on a [`PeerConnection`];
/// [`PeerIdentityLayer`] unpacks it.
#[derive(Debug, Clone)]
pub(crate) struct PeerConnectInfo {
    tls: TlsConnectInfo<TcpConnectInfo>,
    identity: Option<PeerIdentity>,
}

impl Connected for PeerConnection {
    type ConnectInfo = PeerConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        PeerConnectInfo {
            tls: self.stream.connect_info(),
            identity: self.identity.clone(),
        }
    }
}

impl AsyncRead for PeerConnection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for PeerConnection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// The subject common name of a certificate, else its first DNS subject alternative name.
fn identity_of(cert: &CertificateDer<'_>) -> Option<PeerIdentity> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let common_name = cert
        .subject()
        .iter_common_name()
        .find_map(|name| name.as_str().ok())
        .filter(|name| !name.is_empty());
    if let Some(name) = common_name {
        return Some(PeerIdentity(name.to_owned()));
    }
    let alternative_names = cert.subject_alternative_name().ok().flatten()?;
    alternative_names
        .value
        .general_names
        .iter()
        .find_map(|name| match name {
            x509_parser::extensions::GeneralName::DNSName(dns) => {
                Some(PeerIdentity((*dns).to_owned()))
            }
            _ => None,
        })
}

/// Moves what a TLS connection tells about its peer into each request's extensions: tonic's own
/// [`TlsConnectInfo`] (so `Request::remote_addr` and `Request::peer_certs` work as with tonic's
/// TLS) and the [`PeerIdentity`], when the client presented a verified certificate.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct PeerIdentityLayer;

impl<S> tower_layer::Layer<S> for PeerIdentityLayer {
    type Service = PeerIdentityService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        PeerIdentityService { inner }
    }
}

/// The service [`PeerIdentityLayer`] wraps around the gRPC routes.
#[derive(Debug, Clone)]
pub(crate) struct PeerIdentityService<S> {
    inner: S,
}

impl<S, B> tower_service::Service<http::Request<B>> for PeerIdentityService<S>
where
    S: tower_service::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let extensions = request.extensions_mut();
        // Extensions come from the server, never from the wire, so a client cannot forge these.
        if let Some(info) = extensions.remove::<PeerConnectInfo>() {
            extensions.insert(info.tls);
            if let Some(identity) = info.identity {
                extensions.insert(identity);
            }
        }
        self.inner.call(request)
    }
}

/// The HTTP listener's connections, as `axum::serve` takes them.
#[derive(Debug)]
pub(crate) struct HttpsListener {
    connections: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local_addr: SocketAddr,
}

impl HttpsListener {
    pub(crate) fn new(
        connections: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
        local_addr: SocketAddr,
    ) -> Self {
        Self {
            connections,
            local_addr,
        }
    }
}

impl axum::serve::Listener for HttpsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.connections.recv().await {
            Some(connection) => connection,
            // The accept task stops only at shutdown, when axum stops asking for connections.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local_addr)
    }
}
