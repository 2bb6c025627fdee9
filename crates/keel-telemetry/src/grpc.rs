//! Server-side tracing of gRPC requests as a tower layer.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tracing::field::Empty;
use tracing::instrument::Instrumented;
use tracing::{Instrument as _, Span};

use crate::propagation::{HeaderExtractor, set_parent};

/// Health checks arrive every few seconds from every prober; their spans are kept at debug level
/// so that the default `info` filter does not fill traces with them.
const HEALTH_PREFIX: &str = "/grpc.health.v1.Health/";

/// A tower layer for tonic servers that runs every request inside a `grpc.request` span.
///
/// The span's parent is the W3C trace context found in the request's `traceparent` and
/// `tracestate` headers, so a trace continues across services. The span records `rpc.method`
/// (the request path), `otel.kind = "server"` and, once known, `rpc.grpc.status_code` from the
/// `grpc-status` header or trailer. It stays open until the response body has been sent, so its
/// duration covers streaming responses too.
///
/// `tonic::transport::Server::builder().layer(GrpcTraceLayer)`.
#[derive(Debug, Clone, Copy, Default)]
pub struct GrpcTraceLayer;

impl<S> tower_layer::Layer<S> for GrpcTraceLayer {
    type Service = GrpcTrace<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcTrace { inner }
    }
}

/// The service made by [`GrpcTraceLayer`].
#[derive(Debug, Clone)]
pub struct GrpcTrace<S> {
    inner: S,
}

impl<S, ReqBody, ResBody> tower_service::Service<http::Request<ReqBody>> for GrpcTrace<S>
where
    S: tower_service::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
{
    type Response = http::Response<GrpcTraceBody<ResBody>>;
    type Error = S::Error;
    type Future = GrpcTraceFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let path = request.uri().path();
        // OpenTelemetry names gRPC spans `package.Service/Method`.
        let name = path.trim_start_matches('/');
        let span = if path.starts_with(HEALTH_PREFIX) {
            tracing::debug_span!(
                "grpc.request",
                otel.name = name,
                otel.kind = "server",
                rpc.system = "grpc",
                rpc.method = path,
                rpc.grpc.status_code = Empty,
                otel.status_code = Empty,
            )
        } else {
            tracing::info_span!(
                "grpc.request",
                otel.name = name,
                otel.kind = "server",
                rpc.system = "grpc",
                rpc.method = path,
                rpc.grpc.status_code = Empty,
                otel.status_code = Empty,
            )
        };
        let parent = opentelemetry::global::get_text_map_propagator(|p| {
            p.extract(&HeaderExtractor(request.headers()))
        });
        // The parent must be set before the span is first entered, when OpenTelemetry starts it.
        set_parent(&span, parent);
        let future = span.in_scope(|| self.inner.call(request));
        GrpcTraceFuture {
            inner: future.instrument(span.clone()),
            span,
        }
    }
}

pin_project! {
    /// The response future of [`GrpcTrace`].
    #[derive(Debug)]
    pub struct GrpcTraceFuture<F> {
        #[pin]
        inner: Instrumented<F>,
        span: Span,
    }
}

impl<F, ResBody, E> Future for GrpcTraceFuture<F>
where
    F: Future<Output = Result<http::Response<ResBody>, E>>,
{
    type Output = Result<http::Response<GrpcTraceBody<ResBody>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = ready!(this.inner.poll(cx))?;
        // A "trailers-only" response (every error tonic raises before the handler answers) carries
        // grpc-status in its headers; otherwise it comes in the trailers after the body.
        let recorded = record_status(this.span, response.headers());
        let span = this.span.clone();
        Poll::Ready(Ok(response.map(|inner| GrpcTraceBody {
            inner,
            span,
            recorded,
        })))
    }
}

pin_project! {
    /// The response body of [`GrpcTrace`]: keeps the request span open until the body ends and
    /// records the status found in the trailers.
    #[derive(Debug)]
    pub struct GrpcTraceBody<B> {
        #[pin]
        inner: B,
        span: Span,
        recorded: bool,
    }
}

impl<B: Body> Body for GrpcTraceBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        if let Some(Ok(frame)) = &frame
            && !*this.recorded
            && let Some(trailers) = frame.trailers_ref()
        {
            *this.recorded = record_status(this.span, trailers);
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Records the `grpc-status` found in `headers` on `span`; returns whether there was one.
fn record_status(span: &Span, headers: &http::HeaderMap) -> bool {
    let Some(code) = headers
        .get("grpc-status")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<i32>().ok())
    else {
        return false;
    };
    span.record("rpc.grpc.status_code", code);
    // OpenTelemetry's gRPC conventions mark a server span as failed only for codes that mean the
    // server is at fault; NOT_FOUND or INVALID_ARGUMENT are the client's business.
    if is_server_error(tonic::Code::from_i32(code)) {
        span.record("otel.status_code", "error");
    }
    true
}

fn is_server_error(code: tonic::Code) -> bool {
    use tonic::Code;
    matches!(
        code,
        Code::Unknown
            | Code::DeadlineExceeded
            | Code::Unimplemented
            | Code::Internal
            | Code::Unavailable
            | Code::DataLoss
    )
}
