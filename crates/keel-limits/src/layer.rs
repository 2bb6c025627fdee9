use std::future::Future;
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use governor::clock::Clock as _;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use keel_auth::Principal;
use keel_config::ConfigError;
use tonic::Status;
use tonic::metadata::MetadataMap;
use tower_layer::Layer;
use tower_service::Service;
use uuid::Uuid;

use crate::body::{LimitedRequest, LimitedResponse, too_large};
use crate::concurrency::InFlight;
use crate::config::{FLEET_SETTINGS, Settings, USER_SETTINGS};
use crate::metrics::{Limit, LimitMetrics, Tally};
use crate::{FleetLimitsConfig, LimitsConfig};

/// The gRPC metadata key of the rate-limit retry hint: milliseconds until the key may call again.
pub const RETRY_AFTER_MS: &str = "retry-after-ms";

const NO_PRINCIPAL: &str = "limits need the auth layer in front";

/// How many calls pass between two sweeps of idle keys out of the rate limiter.
const SWEEP_EVERY: u64 = 4096;

/// Holds every API key to the limits of a [`LimitsConfig`]: request rate, concurrent requests,
/// request body size and server-stream duration. Fleet callers (fleet keys and in-process
/// channels, [`keel_auth::Scope::Fleet`]) are held to a [`FleetLimitsConfig`] instead, in
/// budgets of their own, so tenants' limits never throttle Keel's own services. A call over a limit is answered with
/// RESOURCE_EXHAUSTED saying when to retry (for the rate, also in the `retry-after-ms` metadata),
/// and counted in `keel_limit_exceeded_total{tenant, limit}`.
///
/// It reads the caller from the [`Principal`] that [`keel_auth::AuthLayer`] puts into the request
/// extensions, so it goes *inside* the auth layer, directly around the generated server; without
/// a principal it fails the call with INTERNAL rather than let it through unlimited.
///
/// Create one layer per process and apply it to every service: its clones share the per-key
/// state, so a key's budget covers all services together.
///
/// ```no_run
/// use tower_layer::Layer as _;
/// # fn example(keys: keel_auth::KeyStore, metrics: &keel_server::Metrics) -> Result<(), keel_config::ConfigError> {
/// let limits = keel_limits::LimitsLayer::new(&keel_limits::LimitsConfig::default(), metrics)?;
/// // Health stands in for any generated `XxxServer`.
/// let (_, health) = tonic_health::server::health_reporter();
/// let routes = tonic::service::Routes::new(
///     keel_auth::AuthLayer::new(keys).layer(limits.layer(health)),
/// );
/// # let _ = routes;
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct LimitsLayer {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    /// Tenants' keys.
    user: Budget,
    /// Fleet callers.
    fleet: Budget,
    calls: AtomicU64,
    metrics: LimitMetrics,
}

/// The limits of one kind of caller and the per-caller state that enforces them.
#[derive(Debug)]
struct Budget {
    rate: u32,
    limiter: DefaultKeyedRateLimiter<Uuid>,
    in_flight: Arc<InFlight>,
    message_bytes: u64,
    stream_duration: Duration,
}

impl Budget {
    fn new(config: &LimitsConfig, names: &Settings) -> Result<Self, ConfigError> {
        config.validate_as(names)?;
        let invalid = |setting| ConfigError::Invalid {
            setting,
            reason: "must be at least 1".into(),
        };
        let rate = NonZeroU32::new(config.rate).ok_or_else(|| invalid(names.rate))?;
        let burst = NonZeroU32::new(config.burst).ok_or_else(|| invalid(names.burst))?;
        Ok(Budget {
            rate: rate.get(),
            limiter: RateLimiter::dashmap(Quota::per_second(rate).allow_burst(burst)),
            in_flight: Arc::new(InFlight::new(config.concurrency)),
            message_bytes: config.message_bytes,
            stream_duration: config.stream_duration,
        })
    }
}

impl LimitsLayer {
    /// A layer enforcing `config` on tenants' keys and the default [`FleetLimitsConfig`] on
    /// fleet callers, with its metric registered in `metrics`.
    ///
    /// Fails if `config` does not pass [`LimitsConfig::validate`]. Call it once per registry:
    /// each call registers `keel_limit_exceeded` again.
    pub fn new(config: &LimitsConfig, metrics: &keel_server::Metrics) -> Result<Self, ConfigError> {
        Self::with_fleet(config, &FleetLimitsConfig::default(), metrics)
    }

    /// A layer enforcing `user` on tenants' keys and `fleet` on fleet callers.
    ///
    /// Fails if either does not validate. Call it once per registry, like [`LimitsLayer::new`].
    pub fn with_fleet(
        user: &LimitsConfig,
        fleet: &FleetLimitsConfig,
        metrics: &keel_server::Metrics,
    ) -> Result<Self, ConfigError> {
        Ok(Self {
            shared: Arc::new(Shared {
                user: Budget::new(user, &USER_SETTINGS)?,
                fleet: Budget::new(&fleet.limits(), &FLEET_SETTINGS)?,
                calls: AtomicU64::new(0),
                metrics: LimitMetrics::register(metrics),
            }),
        })
    }
}

impl<S> Layer<S> for LimitsLayer {
    type Service = LimitsService<S>;

    fn layer(&self, inner: S) -> LimitsService<S> {
        LimitsService {
            inner,
            shared: self.shared.clone(),
        }
    }
}

/// A gRPC service wrapped by [`LimitsLayer`]; keeps the inner service's
/// [`NamedService::NAME`](tonic::server::NamedService::NAME) so it can be routed.
#[derive(Debug, Clone)]
pub struct LimitsService<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S: tonic::server::NamedService> tonic::server::NamedService for LimitsService<S> {
    const NAME: &'static str = S::NAME;
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for LimitsService<S>
where
    S: Service<http::Request<tonic::body::Body>, Response = http::Response<ResBody>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    ReqBody: http_body::Body<Data = Bytes> + Send + 'static,
    ReqBody::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    ResBody: http_body::Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        // `self.inner` is the clone that was polled ready, so it must serve this call;
        // a fresh clone stays behind for the next poll_ready.
        let fresh = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, fresh);
        let shared = self.shared.clone();
        // Decided before the async block so the future does not borrow the request (whose
        // body need not be Sync).
        let admitted = shared.admit(&request);
        Box::pin(async move {
            let (tally, slot, fleet) = match admitted {
                Ok(admitted) => admitted,
                Err(status) => return Ok(status.into_http()),
            };
            let budget = shared.budget(fleet);
            let (limit, stream_duration) = (budget.message_bytes, budget.stream_duration);
            let request = request.map(|body| {
                tonic::body::Body::new(LimitedRequest::new(body, limit, tally.clone()))
            });
            let response = inner.call(request).await?;
            Ok(response.map(|body| {
                tonic::body::Body::new(LimitedResponse::new(
                    tonic::body::Body::new(body),
                    stream_duration,
                    tally,
                    slot,
                ))
            }))
        })
    }
}

impl Shared {
    fn budget(&self, fleet: bool) -> &Budget {
        if fleet { &self.fleet } else { &self.user }
    }

    /// Checks the limits that can be checked before the call starts, cheapest first, and stops
    /// at the first one exceeded. Every call takes a rate token, refused or not (a client
    /// retrying in a tight loop slows itself down); a refused call takes no concurrency slot.
    ///
    /// Returns the tally and slot of the call, and whether the caller is a fleet caller.
    fn admit<B: http_body::Body>(
        &self,
        request: &http::Request<B>,
    ) -> Result<(Tally, crate::concurrency::Slot, bool), Status> {
        let Some(principal) = request.extensions().get::<Principal>() else {
            tracing::error!(path = request.uri().path(), "{NO_PRINCIPAL}");
            return Err(Status::internal(NO_PRINCIPAL));
        };
        let fleet = principal.scope.is_fleet();
        let budget = self.budget(fleet);
        // Fleet callers are counted without a tenant: they act for all of them.
        let tenant = principal.scope.tenant_name().map_or("", |t| t.as_str());
        let tally = Tally::new(self.metrics.clone(), tenant);
        let refuse = |limit: Limit, status: Status| {
            tally.count(limit);
            tracing::debug!(
                scope = %principal.scope,
                key_id = %principal.key_id,
                limit = ?limit,
                "request refused"
            );
            status
        };

        self.sweep_idle_keys();
        if let Err(not_until) = budget.limiter.check_key(&principal.key_id) {
            let wait = not_until.wait_time_from(budget.limiter.clock().now());
            return Err(refuse(Limit::Rate, budget.rate_exceeded(wait)));
        }

        let known = declared_length(request);
        if known > budget.message_bytes {
            return Err(refuse(
                Limit::MessageSize,
                too_large(known, budget.message_bytes),
            ));
        }

        let Some(slot) = budget.in_flight.try_acquire(principal.key_id) else {
            let message = format!(
                "{} concurrent requests for this API key already running; retry when one finishes",
                budget.in_flight.limit()
            );
            return Err(refuse(
                Limit::Concurrency,
                Status::resource_exhausted(message),
            ));
        };
        Ok((tally, slot, fleet))
    }

    /// Forgets keys whose token bucket is full again, now and then, so keys that stopped
    /// calling (revoked, expired, or just idle) do not stay in memory.
    fn sweep_idle_keys(&self) {
        if self.calls.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1 {
            self.user.limiter.retain_recent();
            self.fleet.limiter.retain_recent();
        }
    }
}

impl Budget {
    fn rate_exceeded(&self, wait: Duration) -> Status {
        // Rounded up, so a client that waits exactly this long is let through.
        let millis = u64::try_from(wait.as_nanos().div_ceil(1_000_000))
            .unwrap_or(u64::MAX)
            .max(1);
        let mut metadata = MetadataMap::new();
        metadata.insert(RETRY_AFTER_MS, millis.into());
        Status::with_metadata(
            tonic::Code::ResourceExhausted,
            format!(
                "rate limit of {} requests/s for this API key exceeded; retry in {millis} ms (see {RETRY_AFTER_MS})",
                self.rate
            ),
            metadata,
        )
    }
}

/// The least the request body will carry, from `content-length` or the body's own size hint
/// (gRPC clients usually send neither, so the body is also counted as it is read).
fn declared_length<B: http_body::Body>(request: &http::Request<B>) -> u64 {
    let header = request
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok())
        .unwrap_or(0);
    header.max(request.body().size_hint().lower())
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use http_body_util::Full;
    use tower::ServiceExt as _;

    use super::*;

    /// An inner service that answers every call with an empty OK response, counting calls.
    #[derive(Debug, Clone, Default)]
    struct Ok200 {
        calls: Arc<AtomicU64>,
    }

    impl Service<http::Request<tonic::body::Body>> for Ok200 {
        type Response = http::Response<tonic::body::Body>;
        type Error = Infallible;
        type Future = std::future::Ready<Result<Self::Response, Infallible>>;

        fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _request: http::Request<tonic::body::Body>) -> Self::Future {
            self.calls.fetch_add(1, Ordering::Relaxed);
            std::future::ready(Ok(http::Response::new(tonic::body::Body::empty())))
        }
    }

    /// An inner service that takes `delay` to answer with a body of one data frame.
    #[derive(Debug, Clone)]
    struct Slow {
        delay: Duration,
    }

    impl Service<http::Request<tonic::body::Body>> for Slow {
        type Response = http::Response<Full<Bytes>>;
        type Error = Infallible;
        type Future = BoxFuture<Result<Self::Response, Infallible>>;

        fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _request: http::Request<tonic::body::Body>) -> Self::Future {
            let delay = self.delay;
            Box::pin(async move {
                tokio::time::sleep(delay).await;
                Ok(http::Response::new(Full::new(Bytes::from_static(
                    b"answer",
                ))))
            })
        }
    }

    #[tokio::test]
    async fn a_slow_handler_is_not_a_long_stream() {
        let config = LimitsConfig {
            stream_duration: Duration::from_millis(50),
            ..LimitsConfig::default()
        };
        let layer = LimitsLayer::new(&config, &keel_server::Metrics::default()).expect("layer");
        let service = layer.layer(Slow {
            delay: Duration::from_millis(150),
        });
        let mut request = http::Request::new(Full::<Bytes>::default());
        request.extensions_mut().insert(principal());
        let response = service
            .oneshot(request)
            .await
            .unwrap_or_else(|e| match e {});
        let body = http_body_util::BodyExt::collect(response.into_body())
            .await
            .expect("whole answer");
        assert!(body.trailers().is_none(), "no status added");
        assert_eq!(body.to_bytes(), Bytes::from_static(b"answer"));
    }

    fn principal() -> Principal {
        Principal {
            key_id: Uuid::now_v7(),
            scope: keel_auth::Scope::tenant("acme").expect("valid tenant"),
            role: keel_auth::Role::Viewer,
            peer_identity: None,
        }
    }

    async fn call(
        service: LimitsService<Ok200>,
        principal: Option<Principal>,
        body: Full<Bytes>,
    ) -> Option<Status> {
        let mut request = http::Request::new(body);
        if let Some(principal) = principal {
            request.extensions_mut().insert(principal);
        }
        let response = service
            .oneshot(request)
            .await
            .unwrap_or_else(|e| match e {});
        Status::from_header_map(response.headers())
    }

    fn service(config: LimitsConfig) -> (LimitsService<Ok200>, Arc<AtomicU64>) {
        let layer = LimitsLayer::new(&config, &keel_server::Metrics::default()).expect("layer");
        let inner = Ok200::default();
        let calls = inner.calls.clone();
        (layer.layer(inner), calls)
    }

    #[tokio::test]
    async fn without_a_principal_the_call_fails_closed() {
        let (service, calls) = service(LimitsConfig::default());
        let status = call(service, None, Full::default()).await.expect("refused");
        assert_eq!(status.code(), tonic::Code::Internal);
        assert_eq!(status.message(), NO_PRINCIPAL);
        assert_eq!(calls.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn a_body_of_known_size_is_refused_before_the_service_runs() {
        let config = LimitsConfig {
            message_bytes: 1024,
            ..LimitsConfig::default()
        };
        let (service, calls) = service(config);
        let small = Full::new(Bytes::from(vec![0u8; 1024]));
        assert!(
            call(service.clone(), Some(principal()), small)
                .await
                .is_none()
        );
        let big = Full::new(Bytes::from(vec![0u8; 1025]));
        let status = call(service, Some(principal()), big)
            .await
            .expect("refused");
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert_eq!(
            status.message(),
            "request of at least 1025 bytes exceeds the limit of 1024 bytes"
        );
        assert_eq!(calls.load(Ordering::Relaxed), 1, "only the small call ran");
    }

    #[tokio::test]
    async fn the_rate_limit_tells_when_to_retry() {
        let config = LimitsConfig {
            rate: 1,
            burst: 2,
            ..LimitsConfig::default()
        };
        let (service, _) = service(config);
        let caller = principal();
        for _ in 0..2 {
            assert!(
                call(service.clone(), Some(caller.clone()), Full::default())
                    .await
                    .is_none()
            );
        }
        let status = call(service.clone(), Some(caller), Full::default())
            .await
            .expect("third call within a second is refused");
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        let hint: u64 = status
            .metadata()
            .get(RETRY_AFTER_MS)
            .expect("retry hint")
            .to_str()
            .expect("ascii")
            .parse()
            .expect("a number");
        assert!((1..=1000).contains(&hint), "{hint}");
        assert_eq!(
            status.message(),
            format!(
                "rate limit of 1 requests/s for this API key exceeded; retry in {hint} ms (see retry-after-ms)"
            )
        );
        // Another key of the same tenant has its own bucket.
        assert!(
            call(service, Some(principal()), Full::default())
                .await
                .is_none()
        );
    }
}
