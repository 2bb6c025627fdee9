//! How Keel's services call each other as the fleet identity.
//!
//! A service that reads another (the collector and the optimizer read the registry's instances,
//! the optimizer reads the collector's workload) builds its tonic client on a [`FleetChannel`]:
//! in-process under `--target all` (`keel_service::Host::in_process`, an identity no listener
//! accepts), or over the network with a fleet key sent on every call.

#![warn(missing_docs)]

use std::fmt;

use tower::ServiceExt as _;
use tower::util::BoxCloneSyncService;

/// The error type of a [`FleetChannel`] call.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

type Boxed = BoxCloneSyncService<
    http::Request<tonic::body::Body>,
    http::Response<tonic::body::Body>,
    BoxError,
>;

/// Any channel to another Keel service, behind one type. A named type with its own `Service`
/// impl: with `BoxCloneSyncService` as a client's channel directly, rustc cannot prove the call
/// futures `Send` for every lifetime.
#[derive(Clone)]
pub struct FleetChannel(Boxed);

impl fmt::Debug for FleetChannel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FleetChannel").finish_non_exhaustive()
    }
}

impl FleetChannel {
    /// A channel over `service`: [`keel_auth::InProcess`] from `Host::in_process`, or a network
    /// channel that already sends a fleet key (see [`FleetChannel::remote`]).
    pub fn new<S, B>(service: S) -> Self
    where
        S: tower::Service<http::Request<tonic::body::Body>, Response = http::Response<B>>
            + Clone
            + Send
            + Sync
            + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
        B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        Self(BoxCloneSyncService::new(
            service
                .map_response(|response: http::Response<B>| response.map(tonic::body::Body::new))
                .map_err(Into::into),
        ))
    }

    /// A network `channel` that sends `key` (a fleet key) on every call.
    pub fn remote(channel: tonic::transport::Channel, key: secrecy::SecretString) -> Self {
        Self::new(tonic::service::interceptor::InterceptedService::new(
            channel,
            keel_auth::bearer_interceptor(key),
        ))
    }
}

impl tower::Service<http::Request<tonic::body::Body>> for FleetChannel {
    type Response = http::Response<tonic::body::Body>;
    type Error = BoxError;
    type Future = <Boxed as tower::Service<http::Request<tonic::body::Body>>>::Future;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), BoxError>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        self.0.call(request)
    }
}
