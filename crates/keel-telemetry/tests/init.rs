//! `init` installs the global subscriber once and reports, rather than panics on, misuse.
//!
//! One test in its own binary, since the global subscriber can be set only once per process.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use keel_config::{LogFormat, TelemetryConfig};
use keel_telemetry::TelemetryError;
use opentelemetry::trace::TraceContextExt as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

fn config(log_filter: &str, otlp_endpoint: Option<&str>) -> TelemetryConfig {
    TelemetryConfig {
        log_filter: log_filter.into(),
        log_format: LogFormat::Json,
        otlp_endpoint: otlp_endpoint.map(Into::into),
        service_name: "keel-test".into(),
    }
}

// Multi-threaded because dropping the guard blocks while the exporter, which runs on the
// runtime, flushes: on a current-thread runtime that flush could not make progress.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn init_installs_once() {
    let err = keel_telemetry::init(&config("info,=bad=", None)).unwrap_err();
    assert!(matches!(err, TelemetryError::Filter { .. }), "{err}");

    // The OTLP client needs a runtime; outside one init says so instead of panicking.
    let err =
        std::thread::spawn(|| keel_telemetry::init(&config("info", Some("http://127.0.0.1:4317"))))
            .join()
            .unwrap()
            .unwrap_err();
    assert!(matches!(err, TelemetryError::NoRuntime), "{err}");

    // Nothing listens on the endpoint: the exporter connects lazily, so init still succeeds.
    let guard = keel_telemetry::init(&config("info", Some("http://127.0.0.1:4317"))).unwrap();
    let span = tracing::info_span!("after init");
    assert!(span.context().span().span_context().is_valid());
    assert!(
        span.in_scope(keel_telemetry::current_traceparent)
            .contains_key("traceparent")
    );

    let err = keel_telemetry::init(&config("info", None)).unwrap_err();
    assert!(
        matches!(err, TelemetryError::AlreadyInitialized(_)),
        "{err}"
    );
    drop(span);
    drop(guard);
}
