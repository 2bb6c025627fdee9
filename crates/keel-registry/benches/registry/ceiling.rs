//! The ceiling of any gRPC service here: a unary call that does no work, served behind the same
//! layers as the registry (the server's tracing and metrics, then `AuthLayer`, then
//! `LimitsLayer`), on the same server and channels.
//!
//! It cannot be `grpc.health.v1.Health/Check` itself: `keel_server::Server` already routes that
//! path, unauthenticated, and a route cannot be served twice. So it is a service of its own with
//! the health check's shape (decode a request, answer a constant), on empty messages.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tonic::codegen::http;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use super::Bearer;

/// Full gRPC name of the empty service; its methods are counted as `other` in the gRPC metrics,
/// like any method the server has no descriptor for.
const SERVICE: &str = "keel.bench.v1.Empty";
const PATH: &str = "/keel.bench.v1.Empty/Call";

/// A gRPC client of the empty service, with Keel's bearer interceptor as the registry client has.
pub(crate) type EmptyClient = tonic::client::Grpc<InterceptedService<Channel, Bearer>>;

/// The empty service as a host mounts any service: `Host::add` puts it behind auth, then
/// limits, exactly as it does the registry, sharing the registry's key store (and so its cache).
#[derive(Debug)]
pub(crate) struct Ceiling;

impl keel_service::Service for Ceiling {
    const NAME: &'static str = "bench_ceiling";

    async fn migrate(_pool: &sqlx::PgPool) -> Result<(), keel_service::BoxError> {
        Ok(())
    }

    fn mount(self, mount: &mut keel_service::Mount<'_>) -> Result<(), keel_service::BoxError> {
        mount.grpc(Empty);
        Ok(())
    }
}

/// One empty call; fails on any status but OK.
pub(crate) async fn call(client: &mut EmptyClient) -> anyhow::Result<()> {
    client
        .ready()
        .await
        .map_err(|e| anyhow::anyhow!("empty service not ready: {e}"))?;
    client
        .unary::<(), (), _>(
            tonic::Request::new(()),
            http::uri::PathAndQuery::from_static(PATH),
            tonic_prost::ProstCodec::default(),
        )
        .await?;
    Ok(())
}

#[derive(Debug, Clone, Copy)]
struct Empty;

impl tonic::server::NamedService for Empty {
    const NAME: &'static str = SERVICE;
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// What tonic generates for a unary method, minus the trait object: route by path, decode the
/// request, answer, encode.
impl tower::Service<http::Request<tonic::body::Body>> for Empty {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        Box::pin(async move {
            if request.uri().path() != PATH {
                return Ok(tonic::Status::unimplemented("no such method").into_http());
            }
            let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::<(), ()>::default());
            Ok(grpc.unary(Nothing, request).await)
        })
    }
}

/// The method's handler: nothing to do.
struct Nothing;

impl tonic::server::UnaryService<()> for Nothing {
    type Response = ();
    type Future = std::future::Ready<Result<tonic::Response<()>, tonic::Status>>;

    fn call(&mut self, _request: tonic::Request<()>) -> Self::Future {
        std::future::ready(Ok(tonic::Response::new(())))
    }
}
