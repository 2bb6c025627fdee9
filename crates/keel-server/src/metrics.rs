//! The Prometheus registry shared by a process, the process and build metrics every process
//! exposes from its start, and the gRPC metrics layer.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, ready};
use std::time::Instant;

use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Metric, Registry, Unit};
use prost::Message as _;

/// The Prometheus registry of a process, served as OpenMetrics text on `/metrics`.
///
/// Cheap to clone; every clone registers into the same registry. Services register their own
/// metrics here before serving starts. Keep label values bounded: never raw SQL, URLs, ids of
/// unbounded sets, or anything secret.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    registry: Arc<Mutex<Registry>>,
    expositions: Arc<Mutex<Vec<Arc<dyn Exposition>>>>,
}

/// Metric families a service renders itself, off the request path, and hands over whole:
/// `/metrics` appends them after the registry's without touching their content. For large,
/// changing sets of series (a collector's view of its fleet) that must be served in
/// milliseconds and never make a scrape wait on a database.
pub trait Exposition: Send + Sync + std::fmt::Debug {
    /// The families as OpenMetrics text, without `# EOF`.
    fn openmetrics(&self) -> bytes::Bytes;
    /// The same families in the Prometheus text format 0.0.4.
    fn prometheus_text(&self) -> bytes::Bytes;
    /// [`Exposition::openmetrics`] as one gzip member, if compressed ahead of time; `None`
    /// has `/metrics` compress it per request.
    fn openmetrics_gzip(&self) -> Option<bytes::Bytes> {
        None
    }
}

/// `data` as one gzip member, at the fastest level (metrics text compresses about tenfold even
/// so).
pub fn gzip(data: &[u8]) -> bytes::Bytes {
    use std::io::Write as _;
    let mut encoder = flate2::write::GzEncoder::new(
        Vec::with_capacity(data.len() / 8 + 64),
        flate2::Compression::fast(),
    );
    // Writing to a Vec cannot fail.
    let _ = encoder.write_all(data);
    encoder.finish().unwrap_or_default().into()
}

impl Metrics {
    /// Registers `metric` under `name` (without the `_total` suffix a counter gets on output).
    pub fn register(&self, name: &str, help: &str, metric: impl Metric) {
        self.with_registry(|registry| registry.register(name, help, metric));
    }

    /// Runs `f` on the registry, for what [`Metrics::register`] does not cover: units,
    /// sub-registries with a prefix or constant labels, collectors.
    pub fn with_registry<R>(&self, f: impl FnOnce(&mut Registry) -> R) -> R {
        // A panic while registering leaves the registry usable: at worst one metric is missing.
        let mut registry = self.registry.lock().unwrap_or_else(PoisonError::into_inner);
        f(&mut registry)
    }

    /// Appends `exposition`'s families to every `/metrics` answer.
    pub fn add_exposition(&self, exposition: Arc<dyn Exposition>) {
        self.expositions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(exposition);
    }

    /// The registry as OpenMetrics text, ending with `# EOF`.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        Ok(join(self.encode_chunks(true)?))
    }

    /// The registry in the Prometheus text format 0.0.4, for clients that do not ask for
    /// OpenMetrics: `curl`, `promtool check metrics`, older scrapers.
    pub fn encode_prometheus_text(&self) -> Result<String, std::fmt::Error> {
        Ok(join(self.encode_chunks(false)?))
    }

    /// [`Metrics::encode_chunks`] gzip-compressed: each piece one gzip member (a file of
    /// several members is one valid gzip stream, RFC 1952 §2.2), expositions compressed ahead of
    /// time sent as they are.
    pub fn encode_chunks_gzip(
        &self,
        openmetrics: bool,
    ) -> Result<Vec<bytes::Bytes>, std::fmt::Error> {
        let mut chunks = self.encode_chunks(openmetrics)?;
        let precompressed: Vec<Option<bytes::Bytes>> = if openmetrics {
            self.expositions
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .iter()
                .map(|e| e.openmetrics_gzip())
                .collect()
        } else {
            Vec::new()
        };
        for (i, chunk) in chunks.iter_mut().enumerate() {
            // Chunk 0 is the registry; expositions follow in order.
            let ready = i
                .checked_sub(1)
                .and_then(|e| precompressed.get(e).cloned().flatten());
            *chunk = match ready {
                Some(gz) => gz,
                None => gzip(chunk),
            };
        }
        Ok(chunks)
    }

    /// Everything `/metrics` serves, as pieces to send one after the other: the registry, then
    /// each [`Exposition`] as it was rendered (not copied), then `# EOF` for OpenMetrics.
    pub fn encode_chunks(&self, openmetrics: bool) -> Result<Vec<bytes::Bytes>, std::fmt::Error> {
        let mut text = String::new();
        self.with_registry(|registry| {
            prometheus_client::encoding::text::encode(&mut text, registry)
        })?;
        // The registry's own `# EOF` goes after the expositions.
        if let Some(body) = text.strip_suffix("# EOF\n") {
            text.truncate(body.len());
        }
        let head = if openmetrics {
            text
        } else {
            openmetrics_to_prometheus_text(&text)
        };
        let expositions = self
            .expositions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let mut chunks = Vec::with_capacity(expositions.len() + 2);
        chunks.push(bytes::Bytes::from(head));
        for exposition in expositions {
            chunks.push(if openmetrics {
                exposition.openmetrics()
            } else {
                exposition.prometheus_text()
            });
        }
        if openmetrics {
            chunks.push(bytes::Bytes::from_static(b"# EOF\n"));
        }
        Ok(chunks)
    }
}

fn join(chunks: Vec<bytes::Bytes>) -> String {
    let mut out = String::with_capacity(chunks.iter().map(bytes::Bytes::len).sum());
    for chunk in chunks {
        out.push_str(&String::from_utf8_lossy(&chunk));
    }
    out
}

/// Rewrites the OpenMetrics that prometheus-client writes as Prometheus text format 0.0.4.
///
/// The formats differ, for what Keel registers, in three places: a counter family is named
/// without `_total` in OpenMetrics and with it in 0.0.4 (its samples are `_total` in both; a
/// 0.0.4 parser otherwise sees samples without HELP or TYPE); `# UNIT` and `# EOF` do not exist in
/// 0.0.4 (they would be read as comments, and are dropped); and `unknown` is `untyped`. Info,
/// stateset and gauge-histogram families and exemplars have no 0.0.4 form: Keel registers none,
/// and the promtool test of `/metrics` fails if one appears.
fn openmetrics_to_prometheus_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    let mut lines = openmetrics.lines().peekable();
    while let Some(line) = lines.next() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let name = rest.split(' ').next().unwrap_or_default();
            // prometheus-client writes HELP just before TYPE.
            let is_counter = lines
                .peek()
                .and_then(|next| next.strip_prefix("# TYPE "))
                .is_some_and(|typed| typed.strip_suffix(" counter") == Some(name));
            if is_counter {
                out.push_str("# HELP ");
                out.push_str(name);
                out.push_str("_total");
                out.push_str(&rest[name.len()..]);
                out.push('\n');
                continue;
            }
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            if let Some(name) = rest.strip_suffix(" counter") {
                out.push_str("# TYPE ");
                out.push_str(name);
                out.push_str("_total counter\n");
                continue;
            }
            if let Some(name) = rest.strip_suffix(" unknown") {
                out.push_str("# TYPE ");
                out.push_str(name);
                out.push_str(" untyped\n");
                continue;
            }
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// The standard `process_*` metrics (as every Prometheus client library names them), read from
/// the operating system at each scrape.
#[derive(Debug)]
struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let process = metrics_process::collector::collect();
        if let Some(seconds) = process.cpu_seconds_total {
            let metric = ConstCounter::new(seconds);
            metric.encode(encoder.encode_descriptor(
                "process_cpu",
                "Total user and system CPU time spent in seconds.",
                Some(&Unit::Seconds),
                metric.metric_type(),
            )?)?;
        }
        let gauges = [
            (
                "process_resident_memory",
                "Resident memory size in bytes.",
                Some(Unit::Bytes),
                process.resident_memory_bytes,
            ),
            (
                "process_virtual_memory",
                "Virtual memory size in bytes.",
                Some(Unit::Bytes),
                process.virtual_memory_bytes,
            ),
            (
                "process_start_time",
                "Start time of the process since the Unix epoch in seconds.",
                Some(Unit::Seconds),
                process.start_time_seconds,
            ),
            (
                "process_open_fds",
                "Number of open file descriptors.",
                None,
                process.open_fds,
            ),
            (
                "process_max_fds",
                "Maximum number of open file descriptors (0: unlimited).",
                None,
                process.max_fds,
            ),
            (
                "process_threads",
                "Number of OS threads in the process.",
                None,
                process.threads,
            ),
        ];
        for (name, help, unit, value) in gauges {
            // A value the platform does not report is left out rather than shown as 0.
            let Some(value) = value else { continue };
            let metric = ConstGauge::new(value);
            metric.encode(encoder.encode_descriptor(
                name,
                help,
                unit.as_ref(),
                metric.metric_type(),
            )?)?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
    os: &'static str,
    arch: &'static str,
}

/// Registers `keel_build_info` (always 1, the build in its labels) and the `process_*` metrics,
/// so that `/metrics` has content from the start and dashboards can tell versions apart.
pub(crate) fn register_process_and_build(metrics: &Metrics) {
    // A gauge, not an OpenMetrics info metric, which the 0.0.4 text format cannot express.
    let build = Family::<BuildLabels, Gauge>::default();
    build
        .get_or_create(&BuildLabels {
            // All crates share the workspace version.
            version: env!("CARGO_PKG_VERSION"),
            os: std::env::consts::OS,
            arch: std::env::consts::ARCH,
        })
        .set(1);
    metrics.register(
        "keel_build_info",
        "Always 1; the labels say which build of Keel this process runs",
        build,
    );
    metrics.with_registry(|registry| registry.register_collector(Box::new(ProcessCollector)));
}

/// Label value standing for any service or method not in the allow-list, so a client sending
/// made-up paths cannot create new series.
const OTHER: &str = "other";

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    grpc_service: String,
    grpc_method: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HandledLabels {
    grpc_service: String,
    grpc_method: String,
    grpc_code: &'static str,
}

type LatencyFamily = Family<MethodLabels, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 1 ms to about 16 s: from a cached read to a slow what-if analysis.
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

/// The gRPC server metrics, registered when the server is created so that services and
/// dashboards see them before the first request.
#[derive(Debug, Clone)]
pub(crate) struct GrpcMetrics {
    handled: Family<HandledLabels, Counter>,
    latency: LatencyFamily,
}

impl GrpcMetrics {
    pub(crate) fn register(metrics: &Metrics) -> Self {
        let handled = Family::<HandledLabels, Counter>::default();
        let latency = LatencyFamily::new_with_constructor(latency_histogram);
        metrics.register(
            "grpc_server_handled",
            "gRPC calls completed on the server, by service, method and status code",
            handled.clone(),
        );
        metrics.with_registry(|registry| {
            registry.register_with_unit(
                "grpc_server_handling",
                "Time from receiving a gRPC call to sending the end of its response",
                prometheus_client::registry::Unit::Seconds,
                latency.clone(),
            );
        });
        Self { handled, latency }
    }

    /// A layer labelling calls by method for the services named in `services` (and the methods
    /// their descriptors list), and as `other` for everything else.
    pub(crate) fn layer(
        &self,
        descriptor_sets: &[&[u8]],
        services: &HashSet<&str>,
    ) -> Result<GrpcMetricsLayer, prost::DecodeError> {
        let mut methods = HashMap::new();
        for encoded in descriptor_sets {
            let set = prost_types::FileDescriptorSet::decode(*encoded)?;
            for file in &set.file {
                for service in &file.service {
                    let full_name = match file.package() {
                        "" => service.name().to_owned(),
                        package => format!("{package}.{}", service.name()),
                    };
                    if !services.contains(full_name.as_str()) {
                        continue;
                    }
                    for method in &service.method {
                        methods.insert(
                            format!("/{full_name}/{}", method.name()),
                            MethodLabels {
                                grpc_service: full_name.clone(),
                                grpc_method: method.name().into(),
                            },
                        );
                    }
                }
            }
        }
        Ok(GrpcMetricsLayer {
            shared: Arc::new(Shared {
                metrics: self.clone(),
                methods,
                other: MethodLabels {
                    grpc_service: OTHER.into(),
                    grpc_method: OTHER.into(),
                },
            }),
        })
    }
}

#[derive(Debug)]
struct Shared {
    metrics: GrpcMetrics,
    /// Request path (`/package.Service/Method`) to labels.
    methods: HashMap<String, MethodLabels>,
    other: MethodLabels,
}

/// Counts gRPC calls by method and status code and times them until the response ends.
#[derive(Debug, Clone)]
pub(crate) struct GrpcMetricsLayer {
    shared: Arc<Shared>,
}

impl<S> tower_layer::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetricsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetricsService {
            inner,
            shared: self.shared.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct GrpcMetricsService<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S, ReqBody, ResBody> tower_service::Service<http::Request<ReqBody>> for GrpcMetricsService<S>
where
    S: tower_service::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
{
    type Response = http::Response<MetricsBody<ResBody>>;
    type Error = S::Error;
    type Future = MetricsFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let labels = self
            .shared
            .methods
            .get(request.uri().path())
            .unwrap_or(&self.shared.other)
            .clone();
        let recorder = Recorder {
            shared: self.shared.clone(),
            labels,
            start: Instant::now(),
            done: false,
        };
        MetricsFuture {
            inner: self.inner.call(request),
            recorder: Some(recorder),
        }
    }
}

/// Records one call exactly once: when its status is known, or when it is dropped unfinished.
#[derive(Debug)]
struct Recorder {
    shared: Arc<Shared>,
    labels: MethodLabels,
    start: Instant,
    done: bool,
}

impl Recorder {
    fn finish(&mut self, code: &'static str) {
        if self.done {
            return;
        }
        self.done = true;
        let metrics = &self.shared.metrics;
        metrics
            .latency
            .get_or_create(&self.labels)
            .observe(self.start.elapsed().as_secs_f64());
        metrics
            .handled
            .get_or_create(&HandledLabels {
                grpc_service: self.labels.grpc_service.clone(),
                grpc_method: self.labels.grpc_method.clone(),
                grpc_code: code,
            })
            .inc();
    }

    /// Finishes with the `grpc-status` in `headers`, if there is one.
    fn finish_from(&mut self, headers: &http::HeaderMap) {
        if let Some(code) = headers.get("grpc-status") {
            let code = code
                .to_str()
                .ok()
                .and_then(|code| code.parse().ok())
                .unwrap_or(2);
            self.finish(code_name(code));
        }
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        // Dropped before a status was seen: the client went away or the connection broke.
        self.finish("CANCELLED");
    }
}

pin_project! {
    #[derive(Debug)]
    pub(crate) struct MetricsFuture<F> {
        #[pin]
        inner: F,
        recorder: Option<Recorder>,
    }
}

impl<F, ResBody, E> Future for MetricsFuture<F>
where
    F: Future<Output = Result<http::Response<ResBody>, E>>,
{
    type Output = Result<http::Response<MetricsBody<ResBody>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx));
        let Some(mut recorder) = this.recorder.take() else {
            // Polled after completion: a caller bug, but nothing to record twice.
            return Poll::Ready(result.map(|response| {
                response.map(|inner| MetricsBody {
                    inner,
                    recorder: None,
                })
            }));
        };
        match result {
            Ok(response) => {
                // Trailers-only responses (errors raised before a body) carry the status here.
                recorder.finish_from(response.headers());
                Poll::Ready(Ok(response.map(|inner| MetricsBody {
                    inner,
                    recorder: Some(recorder),
                })))
            }
            Err(error) => {
                recorder.finish("INTERNAL");
                Poll::Ready(Err(error))
            }
        }
    }
}

pin_project! {
    #[derive(Debug)]
    pub(crate) struct MetricsBody<B> {
        #[pin]
        inner: B,
        recorder: Option<Recorder>,
    }
}

impl<B: Body> Body for MetricsBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        if let Some(recorder) = this.recorder {
            match &frame {
                Some(Ok(frame)) => {
                    if let Some(trailers) = frame.trailers_ref() {
                        recorder.finish_from(trailers);
                    }
                }
                Some(Err(_)) => recorder.finish("INTERNAL"),
                // A gRPC response always ends with a status; one that does not is unexplained.
                None => recorder.finish("UNKNOWN"),
            }
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

/// The canonical name of a gRPC status code, as other gRPC metrics libraries label it.
fn code_name(code: i32) -> &'static str {
    match code {
        0 => "OK",
        1 => "CANCELLED",
        3 => "INVALID_ARGUMENT",
        4 => "DEADLINE_EXCEEDED",
        5 => "NOT_FOUND",
        6 => "ALREADY_EXISTS",
        7 => "PERMISSION_DENIED",
        8 => "RESOURCE_EXHAUSTED",
        9 => "FAILED_PRECONDITION",
        10 => "ABORTED",
        11 => "OUT_OF_RANGE",
        12 => "UNIMPLEMENTED",
        13 => "INTERNAL",
        14 => "UNAVAILABLE",
        15 => "DATA_LOSS",
        16 => "UNAUTHENTICATED",
        // 2 is UNKNOWN, and so is anything outside the defined range.
        _ => "UNKNOWN",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_text_names_counter_families_like_their_samples() {
        let metrics = Metrics::default();
        let calls = Counter::<u64>::default();
        calls.inc();
        metrics.register("keel_test_calls", "Calls", calls);
        let time = Histogram::new(exponential_buckets(0.1, 2.0, 2));
        time.observe(0.15);
        metrics.with_registry(|registry| {
            registry.register_with_unit("keel_test_time", "Time", Unit::Seconds, time);
        });
        register_process_and_build(&metrics);

        let text = metrics.encode_prometheus_text().expect("encode");
        for expected in [
            "# HELP keel_test_calls_total Calls.\n# TYPE keel_test_calls_total counter\nkeel_test_calls_total 1\n",
            "# TYPE keel_test_time_seconds histogram\n",
            "keel_test_time_seconds_bucket{le=\"0.2\"} 1\n",
            "# TYPE process_cpu_seconds_total counter\n",
            "# TYPE process_resident_memory_bytes gauge\n",
            "# TYPE process_open_fds gauge\n",
            "# TYPE process_start_time_seconds gauge\n",
            &format!(
                "keel_build_info{{version=\"{}\",os=\"{}\",arch=\"{}\"}} 1\n",
                env!("CARGO_PKG_VERSION"),
                std::env::consts::OS,
                std::env::consts::ARCH
            ),
        ] {
            assert!(text.contains(expected), "missing {expected:?} in\n{text}");
        }
        for absent in ["# EOF", "# UNIT", "# TYPE keel_test_calls counter"] {
            assert!(!text.contains(absent), "{absent:?} in\n{text}");
        }
        // OpenMetrics stays as it was.
        let openmetrics = metrics.encode().expect("encode");
        assert!(
            openmetrics.contains("# TYPE keel_test_calls counter\n"),
            "{openmetrics}"
        );
        assert!(openmetrics.ends_with("# EOF\n"), "{openmetrics}");
    }

    #[derive(Debug)]
    struct Fixed(&'static str, bool);

    impl Exposition for Fixed {
        fn openmetrics(&self) -> bytes::Bytes {
            bytes::Bytes::from_static(self.0.as_bytes())
        }
        fn prometheus_text(&self) -> bytes::Bytes {
            bytes::Bytes::from_static(self.0.as_bytes())
        }
        fn openmetrics_gzip(&self) -> Option<bytes::Bytes> {
            self.1.then(|| gzip(self.0.as_bytes()))
        }
    }

    #[test]
    fn gzip_pieces_decode_to_the_plain_answer() {
        use std::io::Read as _;
        let metrics = Metrics::default();
        register_process_and_build(&metrics);
        metrics.add_exposition(Arc::new(Fixed("# TYPE keel_a gauge\nkeel_a 1\n", true)));
        metrics.add_exposition(Arc::new(Fixed("# TYPE keel_b gauge\nkeel_b 2\n", false)));
        for openmetrics in [true, false] {
            let plain: Vec<u8> = metrics.encode_chunks(openmetrics).expect("encode").concat();
            let gz: Vec<u8> = metrics
                .encode_chunks_gzip(openmetrics)
                .expect("encode")
                .concat();
            let mut decoded = Vec::new();
            flate2::read::MultiGzDecoder::new(gz.as_slice())
                .read_to_end(&mut decoded)
                .expect("one valid gzip stream");
            // process_* values move between the two encodings; compare the shape.
            let names = |b: &[u8]| -> Vec<String> {
                String::from_utf8_lossy(b)
                    .lines()
                    .map(|l| l.split(' ').next().unwrap_or_default().to_owned())
                    .collect()
            };
            assert_eq!(names(&decoded), names(&plain));
            let text = String::from_utf8_lossy(&decoded);
            assert!(
                text.contains("keel_a 1\n") && text.contains("keel_b 2\n"),
                "{text}"
            );
            assert_eq!(text.ends_with("# EOF\n"), openmetrics);
        }
    }

    #[test]
    fn codes_have_canonical_names() {
        assert_eq!(code_name(0), "OK");
        assert_eq!(code_name(tonic::Code::Aborted as i32), "ABORTED");
        assert_eq!(
            code_name(tonic::Code::Unauthenticated as i32),
            "UNAUTHENTICATED"
        );
        assert_eq!(code_name(2), "UNKNOWN");
        assert_eq!(code_name(99), "UNKNOWN");
        assert_eq!(code_name(-1), "UNKNOWN");
    }
}
