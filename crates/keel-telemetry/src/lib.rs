//! Logging, tracing and W3C trace-context propagation for Keel's services.
//!
//! A process calls [`init`] once at start and keeps the returned [`TelemetryGuard`] alive until it
//! exits. From then on every `tracing` span is also an OpenTelemetry span with a real trace id,
//! whether or not an OTLP endpoint is configured: trace context then flows through gRPC
//! ([`GrpcTraceLayer`], [`grpc_client_interceptor`]), outbox rows ([`current_traceparent`]) and NATS
//! headers ([`inject_nats`], [`set_parent_from_nats`]), so that one trace follows a request from the
//! API through the event bus to its consumers.
//!
//! Tests that need their own subscriber (for instance one that captures every log line) build it
//! from the same parts: [`otel_layer`] plus [`install_propagator`].

#![warn(missing_docs)]

mod grpc;
mod propagation;

use keel_config::{LogFormat, TelemetryConfig};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::Subscriber;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer};

pub use grpc::{GrpcTrace, GrpcTraceBody, GrpcTraceFuture, GrpcTraceLayer};
pub use propagation::{
    current_traceparent, extract_nats, grpc_client_interceptor, inject_grpc, inject_nats,
    inject_nats_from, set_parent_from_nats,
};

/// Instrumentation scope reported with every span Keel creates.
const TRACER_NAME: &str = "keel";

/// Why telemetry could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The log filter does not parse.
    #[error("log filter {filter:?} is invalid: {source}")]
    Filter {
        /// The filter as configured.
        filter: String,
        /// What the parser rejected.
        source: tracing_subscriber::filter::ParseError,
    },
    /// The OTLP exporter could not be built from the configured endpoint.
    #[error("otlp exporter for {endpoint:?} cannot be built: {source}")]
    Exporter {
        /// The endpoint as configured.
        endpoint: String,
        /// Why the exporter refused it.
        source: opentelemetry_otlp::ExporterBuildError,
    },
    /// OTLP export was asked for outside a Tokio runtime, which its gRPC client needs.
    #[error("otlp export needs a running tokio runtime; call init from inside one")]
    NoRuntime,
    /// A global subscriber was installed before (by an earlier `init` or by someone else).
    #[error("a global tracing subscriber is already installed: {0}")]
    AlreadyInitialized(#[source] tracing_subscriber::util::TryInitError),
}

/// Keeps the tracer provider alive; flushes pending spans and shuts the exporter down on drop.
///
/// Drop it last in `main`, after the servers have stopped, so their final spans are exported.
#[derive(Debug)]
pub struct TelemetryGuard {
    provider: SdkTracerProvider,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        // Shutting down flushes the batch processor; a failure here only loses spans, and the
        // process is exiting, so it is reported on stderr rather than turned into a panic.
        if let Err(error) = self.provider.shutdown() {
            eprintln!("keel-telemetry: flushing spans at shutdown failed: {error}");
        }
    }
}

/// Installs the global subscriber: an `EnvFilter` from `config.log_filter`, log lines as text or
/// JSON on stdout (text in colour only when stdout is a terminal), and an OpenTelemetry layer;
/// and sets the W3C TraceContext propagator.
///
/// The OpenTelemetry layer is always there, so spans carry real trace ids and context propagates
/// even when nothing is exported. When `config.otlp_endpoint` is set, spans are also exported in
/// batches over OTLP/gRPC with `service.name` = `config.service_name`; that exporter needs a Tokio
/// runtime, so call `init` from inside one (e.g. at the top of `#[tokio::main] async fn main`).
///
/// Fails, rather than panicking, when a global subscriber is already installed.
pub fn init(config: &TelemetryConfig) -> Result<TelemetryGuard, TelemetryError> {
    let filter =
        EnvFilter::try_new(&config.log_filter).map_err(|source| TelemetryError::Filter {
            filter: config.log_filter.clone(),
            source,
        })?;
    let provider = tracer_provider(config)?;
    let otel = tracing_opentelemetry::layer().with_tracer(provider.tracer(TRACER_NAME));
    let fmt = match config.log_format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_ansi(colour_stdout())
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_ansi(false)
            .boxed(),
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(otel)
        .try_init()
        .map_err(TelemetryError::AlreadyInitialized)?;
    install_propagator();
    Ok(TelemetryGuard { provider })
}

/// Colours only for a person at a terminal: a file, a pipe or a log collector gets plain text,
/// and `NO_COLOR` (<https://no-color.org>) turns them off everywhere.
fn colour_stdout() -> bool {
    use std::io::IsTerminal as _;
    std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// An OpenTelemetry layer backed by an SDK tracer provider without exporter.
///
/// For tests and tools that assemble their own subscriber (e.g. with a capturing layer) and still
/// want spans with real trace ids and working propagation. Call [`install_propagator`] as well.
pub fn otel_layer<S>() -> impl Layer<S>
where
    S: Subscriber + for<'span> LookupSpan<'span>,
{
    // The tracer holds a handle on its provider, so the provider lives as long as the layer.
    let provider = SdkTracerProvider::builder().build();
    tracing_opentelemetry::layer().with_tracer(provider.tracer(TRACER_NAME))
}

/// Sets the global text map propagator to W3C TraceContext (`traceparent`, `tracestate`).
///
/// Idempotent; [`init`] calls it. Without it the injectors and extractors here do nothing, since
/// OpenTelemetry's default propagator is a no-op.
pub fn install_propagator() {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
}

fn tracer_provider(config: &TelemetryConfig) -> Result<SdkTracerProvider, TelemetryError> {
    let resource = Resource::builder()
        .with_service_name(config.service_name.clone())
        .build();
    let builder = SdkTracerProvider::builder().with_resource(resource);
    let Some(endpoint) = config.otlp_endpoint.as_deref() else {
        return Ok(builder.build());
    };
    // The tonic exporter connects lazily on the current runtime and panics without one.
    if tokio::runtime::Handle::try_current().is_err() {
        return Err(TelemetryError::NoRuntime);
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()
        .map_err(|source| TelemetryError::Exporter {
            endpoint: endpoint.to_owned(),
            source,
        })?;
    Ok(builder.with_batch_exporter(exporter).build())
}
