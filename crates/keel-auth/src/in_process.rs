//! Calls between services of one process (`keel serve --target all`), with an
//! internal identity that no listener accepts.

use std::fmt;
use std::task::{Context, Poll};

use bytes::Bytes;
use tower::ServiceExt as _;
use tower::util::BoxCloneSyncService;
use tower_service::Service;
use uuid::Uuid;

use crate::{Principal, Role, Scope};

/// The error of an in-process call that did not produce a response (the server-side
/// service failed instead of answering with a gRPC status).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

type Inner = BoxCloneSyncService<
    http::Request<tonic::body::Body>,
    http::Response<tonic::body::Body>,
    BoxError,
>;

/// Marks a request as sent by an [`InProcess`] channel of this process.
///
/// Crate-private, so nothing outside keel-auth can create or insert it. A request
/// that arrives over a listener starts with empty extensions (hyper never fills them
/// from the wire) and no header is mapped to this, so it cannot claim the identity.
#[derive(Debug, Clone, Copy)]
pub(crate) struct InProcessCall {
    channel: Uuid,
}

impl InProcessCall {
    /// The caller [`AuthLayer`](crate::AuthLayer) lets through for this call.
    pub(crate) fn principal(self) -> Principal {
        Principal {
            key_id: self.channel,
            scope: Scope::Fleet,
            role: Role::Service,
            peer_identity: None,
        }
    }
}

/// A client channel to a server-side gRPC service of this same process, for
/// generated clients: `RegistryServiceClient::new(InProcess::new(service))`.
///
/// `service` is what would go into `tonic::service::Routes`, i.e. the generated
/// server wrapped in [`AuthLayer`](crate::AuthLayer) (and the limits layer); calls
/// go straight to it, without a socket, TLS or API key. Each call carries a private
/// marker that the `AuthLayer` accepts as an internal fleet caller: scope
/// [`Scope::Fleet`], role [`Role::Service`], and as [`Principal::key_id`] an id of this
/// channel (its clones share it), so limits count each channel as one fleet caller.
///
/// Deliberately a client, not a layer: it has no service name, so it cannot be
/// routed on a listener, and a server stack can never be made to mark network
/// requests as internal.
///
/// ```no_run
/// # fn example(store: keel_auth::KeyStore) {
/// use tower_layer::Layer as _;
/// // Health stands in for any generated `XxxServer`.
/// let (_, health) = tonic_health::server::health_reporter();
/// let service = keel_auth::AuthLayer::new(store).layer(health);
/// let mut client =
///     tonic_health::pb::health_client::HealthClient::new(keel_auth::InProcess::new(service));
/// # let _ = &mut client;
/// # }
/// ```
#[derive(Clone)]
pub struct InProcess {
    inner: Inner,
    channel: Uuid,
}

impl fmt::Debug for InProcess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InProcess")
            .field("channel", &self.channel)
            .finish_non_exhaustive()
    }
}

impl InProcess {
    /// A channel calling `service` in-process; see [`InProcess`].
    pub fn new<S, B>(service: S) -> Self
    where
        S: Service<http::Request<tonic::body::Body>, Response = http::Response<B>>
            + Clone
            + Send
            + Sync
            + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let service = service
            .map_response(|response: http::Response<B>| response.map(tonic::body::Body::new))
            .map_err(Into::into);
        InProcess {
            inner: BoxCloneSyncService::new(service),
            channel: Uuid::now_v7(),
        }
    }

    /// The id callers of this channel have as [`Principal::key_id`].
    pub fn channel_id(&self) -> Uuid {
        self.channel
    }
}

impl Service<http::Request<tonic::body::Body>> for InProcess {
    type Response = http::Response<tonic::body::Body>;
    type Error = BoxError;
    type Future = <Inner as Service<http::Request<tonic::body::Body>>>::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<tonic::body::Body>) -> Self::Future {
        request.extensions_mut().insert(InProcessCall {
            channel: self.channel,
        });
        self.inner.call(request)
    }
}
