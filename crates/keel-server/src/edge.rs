//! The HTTP listener's edge, in front of every route: who the client is (`X-Forwarded-For` is
//! believed only from trusted proxies), how large a body it may send, and a span per request.

use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::connect_info::Connected;
use axum::extract::{ConnectInfo, DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{Next, from_fn_with_state};
use axum::response::{IntoResponse, Response};
use axum::serve::IncomingStream;
use http_body::{Frame, SizeHint};
use http_body_util::{LengthLimitError, Limited};
use ipnet::IpNet;
use pin_project_lite::pin_project;
use tokio::net::TcpListener;
use tracing::Instrument as _;
use tracing::field::Empty;

use crate::ClientAddr;
use crate::tls::HttpsListener;

const TEXT: &str = "text/plain; charset=utf-8";

/// Paths that probes and scrapers call every few seconds: their spans and log lines are kept at
/// debug level, so that the default `info` filter shows only the requests worth reading.
const PROBE_PATHS: [&str; 3] = ["/metrics", "/healthz", "/readyz"];

/// The TCP peer of an HTTP connection, as `axum::serve` records it for each connection on the
/// plaintext and on the TLS listener alike. A type of our own because axum only knows how to get
/// a `SocketAddr` from its own `TcpListener`, not from [`HttpsListener`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct TcpPeer(SocketAddr);

impl Connected<IncomingStream<'_, TcpListener>> for TcpPeer {
    fn connect_info(stream: IncomingStream<'_, TcpListener>) -> Self {
        Self(*stream.remote_addr())
    }
}

impl Connected<IncomingStream<'_, HttpsListener>> for TcpPeer {
    fn connect_info(stream: IncomingStream<'_, HttpsListener>) -> Self {
        // The address the TLS accept loop got from `accept()`, not anything the client said.
        Self(*stream.remote_addr())
    }
}

/// The networks whose connections may name the client in `X-Forwarded-For`.
#[derive(Debug, Clone, Default)]
pub(crate) struct TrustedProxies(Arc<[IpNet]>);

impl TrustedProxies {
    pub(crate) fn new(networks: Vec<IpNet>) -> Self {
        // Addresses are compared in canonical form (IPv4-mapped IPv6 as IPv4, see `canonical`),
        // so networks written as IPv4-mapped IPv6 are turned into IPv4 ones too.
        let networks = networks
            .into_iter()
            .map(|network| match network {
                IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.addr().to_ipv4_mapped() {
                    Some(v4) => ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96)
                        .map(IpNet::V4)
                        .unwrap_or(network),
                    None => network,
                },
                other => other,
            })
            .collect();
        Self(networks)
    }

    fn contains(&self, address: IpAddr) -> bool {
        self.0.iter().any(|network| network.contains(&address))
    }

    /// The client of a request that arrived from `peer` with these headers.
    ///
    /// From an untrusted peer, the peer itself: anyone can write `X-Forwarded-For`. From a
    /// trusted proxy, `X-Forwarded-For` is walked from the right (each proxy appends the address
    /// it got the request from, so the right end was written by the proxy we trust), skipping
    /// addresses that are trusted proxies themselves, and the first untrusted address is the
    /// client; everything left of it could have been made up by that client. When every address
    /// is a trusted proxy, the leftmost one is the best known. A malformed entry reached in the
    /// walk means the chain cannot be followed, so the peer is the answer then.
    pub(crate) fn client(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let peer = canonical(peer);
        if !self.contains(peer) {
            return peer;
        }
        let mut furthest = peer;
        // Several header lines form one list, in order (RFC 9110, section 5.3).
        for value in headers.get_all("x-forwarded-for").iter().rev() {
            let Ok(value) = value.to_str() else {
                return peer;
            };
            for entry in value.rsplit(',') {
                let Some(hop) = parse_hop(entry) else {
                    return peer;
                };
                if !self.contains(hop) {
                    return hop;
                }
                furthest = hop;
            }
        }
        furthest
    }
}

/// IPv4 peers of a dual-stack (`[::]`) listener appear as `::ffff:a.b.c.d`; as IPv4 they match
/// the IPv4 networks they belong to.
fn canonical(address: IpAddr) -> IpAddr {
    address.to_canonical()
}

/// One `X-Forwarded-For` entry: an address, optionally with a port (`1.2.3.4:5678`,
/// `[2001:db8::1]:443`) as some load balancers write, or a bracketed IPv6 address.
fn parse_hop(entry: &str) -> Option<IpAddr> {
    let entry = entry.trim_matches([' ', '\t']);
    let address = entry
        .parse::<IpAddr>()
        .or_else(|_| entry.parse::<SocketAddr>().map(|socket| socket.ip()))
        .or_else(|_| {
            entry
                .strip_prefix('[')
                .and_then(|rest| rest.strip_suffix(']'))
                .unwrap_or(entry)
                .parse::<std::net::Ipv6Addr>()
                .map(IpAddr::V6)
        })
        .ok()?;
    Some(canonical(address))
}

/// Puts `router` behind the edge: every request, on every route and the fallback, gets its
/// [`ClientAddr`] and a span, and its body capped at `body_limit` bytes.
pub(crate) fn layer(
    router: axum::Router,
    proxies: TrustedProxies,
    body_limit: usize,
) -> axum::Router {
    router
        // The cap below covers every body, streamed or not; axum's own 2 MB default for its
        // extractors would otherwise undercut a larger configured limit.
        .layer(DefaultBodyLimit::disable())
        .layer(from_fn_with_state(body_limit, limit_body))
        // Outermost, so that a refused body is logged with its client too.
        .layer(from_fn_with_state(proxies, resolve_client))
}

/// Resolves the request's [`ClientAddr`], inserts it (and the TCP peer as
/// `ConnectInfo<SocketAddr>`, for handlers that want the connection itself), and runs the rest of
/// the request in an `http.request` span that records both.
async fn resolve_client(
    State(proxies): State<TrustedProxies>,
    mut request: Request,
    next: Next,
) -> Response {
    let Some(ConnectInfo(TcpPeer(peer))) = request.extensions().get().copied() else {
        // Both listeners are served with `TcpPeer` connection info, so this is a wiring mistake;
        // refusing beats handing out a client address that was never checked.
        tracing::error!("HTTP request without its connection's address; refusing it");
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, TEXT)],
            "internal error\n",
        )
            .into_response();
    };
    let client = proxies.client(peer.ip(), request.headers());
    request.extensions_mut().insert(ClientAddr(client));
    request.extensions_mut().insert(ConnectInfo(peer));

    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    // The route template, not the path, names the span: paths can carry unbounded identifiers.
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|matched| matched.as_str().to_owned());
    let name = match &route {
        Some(route) => format!("{method} {route}"),
        None => method.to_string(),
    };
    let probe = PROBE_PATHS.contains(&path.as_str());
    macro_rules! http_span {
        ($span:ident) => {
            tracing::$span!(
                "http.request",
                otel.name = name,
                otel.kind = "server",
                http.request.method = %method,
                http.route = route.as_deref(),
                url.path = path,
                client.address = %client,
                network.peer.address = %peer.ip(),
                network.peer.port = peer.port(),
                http.response.status_code = Empty,
            )
        };
    }
    let span = if probe {
        http_span!(debug_span)
    } else {
        http_span!(info_span)
    };
    let started = Instant::now();
    let response = next.run(request).instrument(span.clone()).await;
    let status = response.status().as_u16();
    span.record("http.response.status_code", status);
    let elapsed = started.elapsed();
    span.in_scope(|| {
        if probe {
            tracing::debug!(status, ?elapsed, "http request served");
        } else {
            tracing::info!(status, ?elapsed, "http request served");
        }
    });
    response
}

/// Refuses a body over `limit` bytes with 413: before the handler runs when `Content-Length`
/// says so, else as soon as more than `limit` bytes have arrived, whatever the handler then
/// answers. Nothing is buffered here: the body streams through to the handler, and when it is
/// refused its rest is never read (hyper closes the connection instead of draining it).
async fn limit_body(State(limit): State<usize>, request: Request, next: Next) -> Response {
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit as u64) {
        tracing::debug!(
            content_length = declared,
            limit,
            "request body refused: declared length over the limit"
        );
        return too_large(limit);
    }
    let tripped = Arc::new(AtomicBool::new(false));
    let request = request.map(|body| {
        Body::new(CappedBody {
            inner: Limited::new(body, limit),
            tripped: tripped.clone(),
        })
    });
    let response = next.run(request).await;
    if tripped.load(Ordering::Acquire) {
        // The handler saw a body error, and may have answered 400 or 500 for it: the client
        // deserves to know the real reason, and every route the same answer.
        tracing::debug!(limit, "request body refused: more than the limit arrived");
        return too_large(limit);
    }
    response
}

fn too_large(limit: usize) -> Response {
    (
        StatusCode::PAYLOAD_TOO_LARGE,
        [
            (header::CONTENT_TYPE, TEXT),
            // The unread rest of the body is still on its way; this connection cannot carry
            // another request.
            (header::CONNECTION, "close"),
        ],
        format!("request body larger than {limit} bytes\n"),
    )
        .into_response()
}

pin_project! {
    /// A request body that ends in an error once more than its limit has arrived, and says so
    /// through `tripped`.
    struct CappedBody {
        #[pin]
        inner: Limited<Body>,
        tripped: Arc<AtomicBool>,
    }
}

impl http_body::Body for CappedBody {
    type Data = Bytes;
    // `http_body_util::LengthLimitError` inside, which axum's extractors answer with 413 too.
    type Error = axum::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        if let Poll::Ready(Some(Err(error))) = &polled
            && error.is::<LengthLimitError>()
        {
            this.tripped.store(true, Ordering::Release);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proxies(networks: &[&str]) -> TrustedProxies {
        TrustedProxies::new(
            networks
                .iter()
                .map(|network| network.parse().expect("a network"))
                .collect(),
        )
    }

    fn client(proxies: &TrustedProxies, peer: &str, forwarded: &[&str]) -> String {
        let mut headers = HeaderMap::new();
        for value in forwarded {
            headers.append("x-forwarded-for", value.parse().expect("a header value"));
        }
        proxies
            .client(peer.parse().expect("an address"), &headers)
            .to_string()
    }

    #[test]
    fn forwarded_for_is_ignored_from_untrusted_peers() {
        let none = proxies(&[]);
        assert_eq!(client(&none, "127.0.0.1", &["1.2.3.4"]), "127.0.0.1");
        let lan = proxies(&["10.0.0.0/8"]);
        assert_eq!(client(&lan, "192.0.2.1", &["1.2.3.4"]), "192.0.2.1");
        assert_eq!(client(&lan, "::ffff:192.0.2.1", &["1.2.3.4"]), "192.0.2.1");
    }

    #[test]
    fn forwarded_for_is_walked_from_the_right_past_trusted_proxies() {
        let trusted = proxies(&["127.0.0.0/8", "10.0.0.0/8", "fd00::/8"]);
        assert_eq!(client(&trusted, "127.0.0.1", &[]), "127.0.0.1");
        assert_eq!(
            client(&trusted, "127.0.0.1", &["203.0.113.7"]),
            "203.0.113.7"
        );
        assert_eq!(
            client(&trusted, "127.0.0.1", &["203.0.113.7, 10.0.0.1"]),
            "203.0.113.7"
        );
        // What the client wrote itself, left of the address our proxy saw, is not believed.
        assert_eq!(
            client(&trusted, "127.0.0.1", &["1.2.3.4, 203.0.113.7,10.0.0.1"]),
            "203.0.113.7"
        );
        // Several header lines are one list.
        assert_eq!(
            client(&trusted, "127.0.0.1", &["1.2.3.4, 203.0.113.7", "10.0.0.1"]),
            "203.0.113.7"
        );
        // Ports, brackets, IPv6 and IPv4-mapped peers.
        assert_eq!(
            client(&trusted, "127.0.0.1", &["203.0.113.7:5123, 10.0.0.1:80"]),
            "203.0.113.7"
        );
        assert_eq!(
            client(
                &trusted,
                "::ffff:127.0.0.1",
                &["[2001:db8::7]:443, fd00::1"]
            ),
            "2001:db8::7"
        );
        assert_eq!(
            client(&trusted, "fd00::2", &["[2001:db8::7]"]),
            "2001:db8::7"
        );
        // Only trusted proxies: the leftmost is the furthest known.
        assert_eq!(
            client(&trusted, "127.0.0.1", &["10.0.0.5, 10.0.0.1"]),
            "10.0.0.5"
        );
    }

    #[test]
    fn malformed_forwarded_for_falls_back_to_the_peer() {
        let trusted = proxies(&["127.0.0.0/8", "10.0.0.0/8"]);
        for forwarded in [
            "",
            "unknown",
            "203.0.113.7, garbage",
            "203.0.113.7,,10.0.0.1",
            "203.0.113.7, 10.0.0.1, not-an-ip",
            "203.0.113.300",
        ] {
            assert_eq!(
                client(&trusted, "127.0.0.1", &[forwarded]),
                "127.0.0.1",
                "{forwarded:?}"
            );
        }
        // Garbage left of the first untrusted address is never reached, so it does not matter.
        assert_eq!(
            client(&trusted, "127.0.0.1", &["garbage, 203.0.113.7"]),
            "203.0.113.7"
        );
    }

    #[test]
    fn ipv4_mapped_networks_match_ipv4_peers() {
        let mapped = proxies(&["::ffff:10.0.0.0/104"]);
        assert_eq!(client(&mapped, "10.1.2.3", &["203.0.113.7"]), "203.0.113.7");
        assert_eq!(
            client(&mapped, "::ffff:10.1.2.3", &["203.0.113.7"]),
            "203.0.113.7"
        );
    }
}
