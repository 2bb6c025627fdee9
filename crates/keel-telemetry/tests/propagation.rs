//! Trace context survives NATS headers, outbox carriers and gRPC calls.
//!
//! Each test installs its own thread-local subscriber (the OpenTelemetry layer plus a recorder)
//! and runs on a current-thread runtime, so the server tasks it spawns see that subscriber too.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::sync::{Arc, Mutex};

use opentelemetry::trace::{TraceContextExt as _, TraceId};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Channel, Server};
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};
use tracing::Instrument as _;
use tracing::field::{Field, Visit};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::layer::{Context, SubscriberExt as _};
use tracing_subscriber::registry::LookupSpan;

/// The trace id of a span.
fn trace_id(span: &tracing::Span) -> TraceId {
    span.context().span().span_context().trace_id()
}

/// Records every `rpc.grpc.status_code` set on a span.
#[derive(Clone, Default)]
struct StatusRecorder(Arc<Mutex<Vec<i64>>>);

impl<S: tracing::Subscriber + for<'a> LookupSpan<'a>> tracing_subscriber::Layer<S>
    for StatusRecorder
{
    fn on_record(
        &self,
        _: &tracing::span::Id,
        values: &tracing::span::Record<'_>,
        _: Context<'_, S>,
    ) {
        values.record(&mut StatusVisitor(&self.0));
    }
}

struct StatusVisitor<'a>(&'a Mutex<Vec<i64>>);

impl Visit for StatusVisitor<'_> {
    fn record_i64(&mut self, field: &Field, value: i64) {
        if field.name() == "rpc.grpc.status_code" {
            self.0.lock().unwrap().push(value);
        }
    }

    fn record_debug(&mut self, _: &Field, _: &dyn std::fmt::Debug) {}
}

fn subscriber(recorder: StatusRecorder) -> impl tracing::Subscriber + Send + Sync {
    keel_telemetry::install_propagator();
    tracing_subscriber::registry()
        .with(keel_telemetry::otel_layer())
        .with(recorder)
}

#[test]
fn nats_headers_carry_the_trace() {
    let _default = tracing::subscriber::set_default(subscriber(StatusRecorder::default()));

    let publisher = tracing::info_span!("publish");
    let mut headers = async_nats::HeaderMap::new();
    publisher.in_scope(|| keel_telemetry::inject_nats(&mut headers));
    let published = trace_id(&publisher);
    assert_ne!(published, TraceId::INVALID);
    assert!(headers.get("traceparent").is_some());

    let consumer = tracing::info_span!("consume");
    keel_telemetry::set_parent_from_nats(&consumer, Some(&headers));
    assert_eq!(trace_id(&consumer), published);

    let cx = keel_telemetry::extract_nats(Some(&headers));
    assert_eq!(cx.span().span_context().trace_id(), published);
    assert!(cx.span().span_context().is_remote());
}

#[test]
fn outbox_carrier_carries_the_trace_into_nats() {
    let _default = tracing::subscriber::set_default(subscriber(StatusRecorder::default()));

    let request = tracing::info_span!("request");
    let carrier = request.in_scope(keel_telemetry::current_traceparent);
    assert!(
        carrier["traceparent"].contains(&trace_id(&request).to_string()),
        "{carrier:?}"
    );

    // Later, the relay publishes from its own span, with the stored context.
    let relay = tracing::info_span!("relay");
    let mut headers = async_nats::HeaderMap::new();
    relay.in_scope(|| keel_telemetry::inject_nats_from(&carrier, &mut headers));
    let consumer = tracing::info_span!("consume");
    keel_telemetry::set_parent_from_nats(&consumer, Some(&headers));
    assert_eq!(trace_id(&consumer), trace_id(&request));
    assert_ne!(trace_id(&relay), trace_id(&request));
}

#[test]
fn no_headers_start_a_new_trace() {
    let _default = tracing::subscriber::set_default(subscriber(StatusRecorder::default()));

    assert!(
        !keel_telemetry::extract_nats(None)
            .span()
            .span_context()
            .is_valid()
    );
    assert!(keel_telemetry::current_traceparent().is_empty());

    let earlier = tracing::info_span!("earlier");
    let consumer = tracing::info_span!("consume");
    keel_telemetry::set_parent_from_nats(&consumer, Some(&async_nats::HeaderMap::new()));
    assert_ne!(trace_id(&consumer), TraceId::INVALID);
    assert_ne!(trace_id(&consumer), trace_id(&earlier));
}

/// A health server behind the trace layer, whose interceptor reports the trace id it runs under.
async fn traced_health_server() -> (
    Channel,
    Arc<Mutex<Vec<TraceId>>>,
    tokio::sync::oneshot::Sender<()>,
) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let probe = {
        let seen = seen.clone();
        move |request: tonic::Request<()>| {
            seen.lock()
                .unwrap()
                .push(trace_id(&tracing::Span::current()));
            Ok(request)
        }
    };
    let (_reporter, health) = tonic_health::server::health_reporter();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(
        Server::builder()
            .layer(keel_telemetry::GrpcTraceLayer)
            .add_service(tonic::service::interceptor::InterceptedService::new(
                health, probe,
            ))
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                let _ = stopped.await;
            }),
    );
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    (channel, seen, stop)
}

#[tokio::test]
async fn grpc_server_continues_the_callers_trace() {
    let recorder = StatusRecorder::default();
    let _default = tracing::subscriber::set_default(subscriber(recorder.clone()));
    let (channel, seen, _stop) = traced_health_server().await;
    let mut client = HealthClient::new(channel);

    let mut request = tonic::Request::new(HealthCheckRequest {
        service: String::new(),
    });
    request.metadata_mut().insert(
        "traceparent",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
            .parse()
            .unwrap(),
    );
    let response = client.check(request).await.unwrap();
    assert_eq!(response.into_inner().status(), ServingStatus::Serving);
    assert_eq!(
        seen.lock().unwrap().as_slice(),
        [TraceId::from_hex("0af7651916cd43dd8448eb211c80319c").unwrap()]
    );

    // An unknown service is NOT_FOUND, sent as a trailers-only response.
    let status = client
        .check(HealthCheckRequest {
            service: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound);
    assert_eq!(
        recorder.0.lock().unwrap().as_slice(),
        [0, tonic::Code::NotFound as i64]
    );
}

#[tokio::test]
async fn grpc_client_interceptor_sends_the_current_trace() {
    let _default = tracing::subscriber::set_default(subscriber(StatusRecorder::default()));
    let (channel, seen, _stop) = traced_health_server().await;
    let mut client =
        HealthClient::with_interceptor(channel, keel_telemetry::grpc_client_interceptor);

    let caller = tracing::info_span!("caller");
    client
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .instrument(caller.clone())
        .await
        .unwrap();
    assert_eq!(seen.lock().unwrap().as_slice(), [trace_id(&caller)]);

    // Without a current span the server starts its own trace.
    client
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap();
    let seen = seen.lock().unwrap();
    assert_ne!(seen[1], trace_id(&caller));
    assert_ne!(seen[1], TraceId::INVALID);
}
