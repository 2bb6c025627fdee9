//! W3C trace context in and out of outbox rows, NATS headers and gRPC metadata.

use std::collections::HashMap;

use opentelemetry::Context;
use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::TraceContextExt as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// The only keys a W3C TraceContext propagator reads or writes; copying stored context copies
/// these and nothing else, so an outbox row cannot smuggle other headers into a message.
const TRACE_KEYS: [&str; 2] = ["traceparent", "tracestate"];

/// The W3C trace context of the current `tracing` span (`traceparent`, and `tracestate` when
/// there is one), to store beside an outbox row and send with its event later.
///
/// Empty when there is no current span or the OpenTelemetry layer is not installed.
pub fn current_traceparent() -> HashMap<String, String> {
    let mut carrier = HashMap::new();
    inject(&tracing::Span::current().context(), &mut carrier);
    carrier
}

/// Writes the current span's trace context into NATS message headers.
pub fn inject_nats(headers: &mut async_nats::HeaderMap) {
    inject(
        &tracing::Span::current().context(),
        &mut NatsInjector(headers),
    );
}

/// Copies a stored trace context (from [`current_traceparent`], e.g. kept in an outbox row) into
/// NATS message headers, so the event continues the trace of the request that produced it.
pub fn inject_nats_from(carrier: &HashMap<String, String>, headers: &mut async_nats::HeaderMap) {
    for key in TRACE_KEYS {
        if let Some(value) = carrier.get(key) {
            headers.insert(key, value.as_str());
        }
    }
}

/// The trace context carried by NATS message headers; an empty context when there are no headers
/// or they hold none, so a consumer then starts a new trace instead of inheriting an unrelated one.
pub fn extract_nats(headers: Option<&async_nats::HeaderMap>) -> Context {
    match headers {
        Some(headers) => {
            opentelemetry::global::get_text_map_propagator(|p| p.extract(&NatsExtractor(headers)))
        }
        None => Context::new(),
    }
}

/// Makes `span` a child of the trace carried by NATS message headers, if they carry one.
///
/// Call it right after creating the span and before entering it: OpenTelemetry fixes a span's
/// parent when the span starts.
pub fn set_parent_from_nats(span: &tracing::Span, headers: Option<&async_nats::HeaderMap>) {
    set_parent(span, extract_nats(headers));
}

/// Writes the current span's trace context into a gRPC request's metadata.
pub fn inject_grpc<T>(request: &mut tonic::Request<T>) {
    inject(
        &tracing::Span::current().context(),
        &mut MetadataInjector(request.metadata_mut()),
    );
}

/// A tonic client interceptor that sends the current span's trace context with every call:
/// `RegistryServiceClient::with_interceptor(channel, keel_telemetry::grpc_client_interceptor)`.
pub fn grpc_client_interceptor(
    mut request: tonic::Request<()>,
) -> Result<tonic::Request<()>, tonic::Status> {
    inject_grpc(&mut request);
    Ok(request)
}

/// Sets `span`'s parent to `cx` when `cx` holds a valid remote span.
pub(crate) fn set_parent(span: &tracing::Span, cx: Context) {
    if !cx.span().span_context().is_valid() {
        return;
    }
    // Fails only when the span is disabled by the filter, has already started, or the
    // OpenTelemetry layer is missing; none of these should stop the request being served.
    if let Err(error) = span.set_parent(cx) {
        tracing::debug!(?error, "trace context not attached to span");
    }
}

fn inject(cx: &Context, injector: &mut dyn Injector) {
    opentelemetry::global::get_text_map_propagator(|p| p.inject_context(cx, injector));
}

struct NatsInjector<'a>(&'a mut async_nats::HeaderMap);

impl Injector for NatsInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key, value);
    }
}

struct NatsExtractor<'a>(&'a async_nats::HeaderMap);

impl Extractor for NatsExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(|value| value.as_str())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(name, _)| name.as_ref()).collect()
    }
}

struct MetadataInjector<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        // The propagator only writes its own well-formed keys and values; anything that still does
        // not fit into metadata is dropped rather than failing the call.
        let Ok(key) = tonic::metadata::MetadataKey::from_bytes(key.as_bytes()) else {
            return;
        };
        let Ok(value) = tonic::metadata::MetadataValue::try_from(value.as_str()) else {
            return;
        };
        self.0.insert(key, value);
    }
}

/// Reads trace context from HTTP/2 request headers (gRPC metadata on the server side).
pub(crate) struct HeaderExtractor<'a>(pub(crate) &'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}
