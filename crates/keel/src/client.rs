//! The CLI's connection to a Keel server.

use std::future::Future;
use std::time::Duration;

use anyhow::Context as _;
use keel_proto::v1::collector_service_client::CollectorServiceClient;
use keel_proto::v1::optimizer_service_client::OptimizerServiceClient;
use keel_proto::v1::registry_service_client::RegistryServiceClient;
use keel_proto::v1::*;
use secrecy::{ExposeSecret, SecretString};
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity, Uri};

use crate::cli::ClientArgs;
use crate::failure::{Failure, Kind as _};

/// Tries of one call that Keel refused with a short rate-limit hint (the first included).
const MAX_TRIES: u32 = 3;
/// The longest `retry-after-ms` hint the CLI waits out itself; a longer one is reported.
const MAX_RETRY_WAIT: Duration = Duration::from_secs(2);

/// Adds the API key and the current trace context to every call.
#[derive(Clone)]
pub(crate) struct Credentials {
    authorization: AsciiMetadataValue,
}

impl tonic::service::Interceptor for Credentials {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        request
            .metadata_mut()
            .insert("authorization", self.authorization.clone());
        keel_telemetry::inject_grpc(&mut request);
        Ok(request)
    }
}

/// The endpoint, if it is an http:// or https:// URL with a host.
fn endpoint_uri(raw: &str) -> anyhow::Result<Uri> {
    let invalid = |why: String| {
        Failure::Invalid.error(format!(
            "invalid endpoint {raw:?} (--endpoint / KEEL_ENDPOINT): {why}; write e.g. https://keel.example:50051, or http://127.0.0.1:50051 on loopback"
        ))
    };
    let uri: Uri = raw
        .parse()
        .map_err(|e: tonic::codegen::http::uri::InvalidUri| invalid(e.to_string()))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        Some(other) => return Err(invalid(format!("{other}:// is not supported"))),
        None => return Err(invalid("it has no scheme".to_owned())),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(invalid("it has no host".to_owned()));
    }
    Ok(uri)
}

/// TLS settings for an https:// endpoint; `None` for http://.
fn tls_config(args: &ClientArgs, uri: &Uri) -> anyhow::Result<Option<ClientTlsConfig>> {
    let wants_tls = args.tls_ca_file.is_some() || args.tls_client_cert_file.is_some();
    if uri.scheme_str() != Some("https") {
        if wants_tls {
            return Err(Failure::Invalid.error(format!(
                "TLS settings are set but the endpoint {} is not https://; use https://",
                args.endpoint
            )));
        }
        return Ok(None);
    }
    let read = |path: &std::path::Path| {
        std::fs::read(path)
            .with_context(|| format!("cannot read {}", path.display()))
            .kind(Failure::Invalid)
    };
    let mut tls = ClientTlsConfig::new();
    tls = match &args.tls_ca_file {
        Some(path) => tls.ca_certificate(Certificate::from_pem(read(path)?)),
        None => tls.with_webpki_roots(),
    };
    if let (Some(cert), Some(key)) = (&args.tls_client_cert_file, &args.tls_client_key_file) {
        tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
    }
    if let Some(name) = &args.tls_server_name {
        tls = tls.domain_name(name.clone());
    }
    Ok(Some(tls))
}

/// A connection to one Keel server: the channel, and the API key every call on it carries.
/// Each service's client wrapper ([`Registry`], [`Collector`]) is made from one, so a command
/// that calls several services connects once.
#[derive(Clone)]
pub(crate) struct Connection {
    channel: Channel,
    credentials: Credentials,
}

/// The registry, each call retried while Keel asks for a short wait (see [`retrying`]).
#[derive(Clone)]
pub(crate) struct Registry {
    inner: RegistryServiceClient<InterceptedService<Channel, Credentials>>,
}

impl Registry {
    pub(crate) fn new(connection: &Connection) -> Registry {
        Registry {
            inner: RegistryServiceClient::with_interceptor(
                connection.channel.clone(),
                connection.credentials.clone(),
            ),
        }
    }
}

/// The collector, each call retried like the registry's.
#[derive(Clone)]
pub(crate) struct Collector {
    inner: CollectorServiceClient<InterceptedService<Channel, Credentials>>,
}

impl Collector {
    pub(crate) fn new(connection: &Connection) -> Collector {
        Collector {
            inner: CollectorServiceClient::with_interceptor(
                connection.channel.clone(),
                connection.credentials.clone(),
            ),
        }
    }
}

/// The optimizer, each call retried like the registry's (a stream: only until it starts).
#[derive(Clone)]
pub(crate) struct Optimizer {
    inner: OptimizerServiceClient<InterceptedService<Channel, Credentials>>,
}

impl Optimizer {
    pub(crate) fn new(connection: &Connection) -> Optimizer {
        Optimizer {
            inner: OptimizerServiceClient::with_interceptor(
                connection.channel.clone(),
                connection.credentials.clone(),
            ),
        }
    }
}

/// A failed call as the command reports it. UNIMPLEMENTED means the process behind the
/// endpoint does not run the service (`keel serve --target` without it): said so, as
/// "unavailable" (exit 7), since another server of the deployment may run it.
fn call_failed(status: tonic::Status, service: &str) -> anyhow::Error {
    if status.code() == tonic::Code::Unimplemented {
        return Failure::Unavailable.error(format!(
            "this Keel server does not run the {service} (keel serve --target all or {service})"
        ));
    }
    status.into()
}

macro_rules! calls {
    ($client:ident, $service:literal, { $($method:ident($request:ty) -> $response:ty;)* }) => {
        impl $client {
            $(
                pub(crate) async fn $method(&self, request: $request) -> anyhow::Result<$response> {
                    retrying(|| {
                        let mut inner = self.inner.clone();
                        let request = request.clone();
                        async move { inner.$method(request).await }
                    })
                    .await
                    .map_err(|status| call_failed(status, $service))
                }
            )*
        }
    };
}

calls!(Registry, "registry", {
    create_instance(CreateInstanceRequest) -> CreateInstanceResponse;
    get_instance(GetInstanceRequest) -> GetInstanceResponse;
    list_instances(ListInstancesRequest) -> ListInstancesResponse;
    update_instance(UpdateInstanceRequest) -> UpdateInstanceResponse;
    delete_instance(DeleteInstanceRequest) -> DeleteInstanceResponse;
    check_instance(CheckInstanceRequest) -> CheckInstanceResponse;
});

calls!(Collector, "collector", {
    get_instance_metrics(GetInstanceMetricsRequest) -> GetInstanceMetricsResponse;
    list_top_queries(ListTopQueriesRequest) -> ListTopQueriesResponse;
    list_alerts(ListAlertsRequest) -> ListAlertsResponse;
    collect_now(CollectNowRequest) -> CollectNowResponse;
});

calls!(Optimizer, "optimizer", {
    analyze_instance(AnalyzeInstanceRequest) -> tonic::Streaming<AnalyzeInstanceResponse>;
    list_recommendations(ListRecommendationsRequest) -> ListRecommendationsResponse;
    get_recommendation(GetRecommendationRequest) -> GetRecommendationResponse;
    apply_recommendation(ApplyRecommendationRequest) -> ApplyRecommendationResponse;
    rollback_recommendation(RollbackRecommendationRequest) -> RollbackRecommendationResponse;
});

/// How long Keel asked the caller to wait before calling again, if it refused the call for
/// its rate limit: the `retry-after-ms` metadata, else the "retry in N ms" of its message.
fn retry_after(status: &tonic::Status) -> Option<Duration> {
    if status.code() != tonic::Code::ResourceExhausted {
        return None;
    }
    let from_metadata = status
        .metadata()
        .get(keel_limits::RETRY_AFTER_MS)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let from_message = || {
        let (_, rest) = status.message().split_once("retry in ")?;
        let (millis, _) = rest.split_once(" ms")?;
        millis.trim().parse::<u64>().ok()
    };
    from_metadata
        .or_else(from_message)
        .map(Duration::from_millis)
}

/// Runs `call`, and again (up to [`MAX_TRIES`] in all) after waiting as long as Keel asks when it
/// refuses the call with a rate-limit hint of at most [`MAX_RETRY_WAIT`]. A longer hint, or any
/// other failure, is returned at once.
async fn retrying<T, F, Fut>(mut call: F) -> Result<T, tonic::Status>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let mut tries = 1;
    loop {
        match call().await {
            Ok(response) => return Ok(response.into_inner()),
            Err(status) => match retry_after(&status) {
                Some(wait) if tries < MAX_TRIES && wait <= MAX_RETRY_WAIT => {
                    tokio::time::sleep(wait).await;
                    tries += 1;
                }
                _ => return Err(status),
            },
        }
    }
}

/// Connects to the registry named by `args`.
pub(crate) async fn registry(args: &ClientArgs) -> anyhow::Result<Registry> {
    Ok(Registry::new(&connect(args).await?))
}

/// Connects to the Keel server named by `args`, with its API key and TLS settings.
pub(crate) async fn connect(args: &ClientArgs) -> anyhow::Result<Connection> {
    let uri = endpoint_uri(&args.endpoint)?;
    let key = match (
        std::env::var("KEEL_API_KEY").ok().filter(|k| !k.is_empty()),
        &args.api_key_file,
    ) {
        (Some(key), None) => SecretString::from(key),
        (None, Some(path)) => {
            keel_config::read_secret_file("--api-key-file / KEEL_API_KEY_FILE", path)?
        }
        (Some(_), Some(_)) => {
            return Err(Failure::Invalid
                .error("set either KEEL_API_KEY or --api-key-file / KEEL_API_KEY_FILE, not both"));
        }
        (None, None) => {
            return Err(Failure::Auth.error(
                "no API key: set KEEL_API_KEY or KEEL_API_KEY_FILE (create one with `keel admin create-key`)",
            ));
        }
    };
    let mut authorization: AsciiMetadataValue =
        MetadataValue::try_from(format!("Bearer {}", key.expose_secret())).map_err(|_| {
            Failure::Invalid
                .error("the API key contains characters that cannot be sent; check KEEL_API_KEY")
        })?;
    authorization.set_sensitive(true);
    let mut endpoint = Endpoint::from(uri.clone())
        .connect_timeout(args.connect_timeout)
        // Per request, up to the response headers: a stream's messages are not cut off by it.
        .timeout(args.timeout);
    if let Some(tls) = tls_config(args, &uri)? {
        endpoint = endpoint
            .tls_config(tls)
            .context("cannot set up TLS")
            .kind(Failure::Invalid)?;
    }
    let channel = endpoint.connect().await.map_err(|error| {
        // The transport error's own text is only "transport error": the cause is in its sources.
        let cause = crate::failure::causes_text(&error);
        let cause = if cause.is_empty() {
            String::new()
        } else {
            format!(" ({cause})")
        };
        Failure::Unavailable.error(format!(
            "cannot reach Keel at {}{cause}; is `keel serve` running, and do the TLS settings match?",
            args.endpoint
        ))
    })?;
    Ok(Connection {
        channel,
        credentials: Credentials { authorization },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn limited(millis: u64, in_metadata: bool) -> tonic::Status {
        let message = format!("rate limit exceeded; retry in {millis} ms (see retry-after-ms)");
        let mut metadata = tonic::metadata::MetadataMap::new();
        if in_metadata {
            metadata.insert(keel_limits::RETRY_AFTER_MS, millis.into());
            return tonic::Status::with_metadata(
                tonic::Code::ResourceExhausted,
                "rate limit exceeded",
                metadata,
            );
        }
        tonic::Status::resource_exhausted(message)
    }

    #[test]
    fn the_retry_hint_comes_from_metadata_or_the_message() {
        assert_eq!(
            retry_after(&limited(250, true)),
            Some(Duration::from_millis(250))
        );
        assert_eq!(
            retry_after(&limited(40, false)),
            Some(Duration::from_millis(40))
        );
        assert_eq!(
            retry_after(&tonic::Status::resource_exhausted(
                "32 concurrent requests for this API key already running; retry when one finishes"
            )),
            None
        );
        assert_eq!(
            retry_after(&tonic::Status::unavailable("retry in 5 ms")),
            None
        );
    }

    /// Answers with `failures` in turn, then succeeds; counts the calls.
    async fn run(failures: Vec<tonic::Status>) -> (Result<(), tonic::Status>, u32) {
        let calls = AtomicU32::new(0);
        let failures = std::sync::Mutex::new(failures.into_iter());
        let result = retrying(|| {
            calls.fetch_add(1, Ordering::SeqCst);
            let next = failures.lock().expect("lock").next();
            async move {
                match next {
                    Some(status) => Err(status),
                    None => Ok(tonic::Response::new(())),
                }
            }
        })
        .await;
        (result, calls.load(Ordering::SeqCst))
    }

    #[tokio::test]
    async fn a_short_hint_is_waited_out_at_most_three_tries() {
        let (result, calls) = run(vec![limited(100, true), limited(200, false)]).await;
        assert!(result.is_ok(), "{result:?}");
        assert_eq!(calls, 3);

        let (result, calls) = run(vec![limited(10, true); 3]).await;
        assert_eq!(calls, 3, "gave up after three tries");
        assert_eq!(
            result.map_err(|s| s.code()),
            Err(tonic::Code::ResourceExhausted)
        );

        let (result, calls) = run(vec![limited(2001, true)]).await;
        assert_eq!(calls, 1, "a hint over 2 s is reported, not waited out");
        assert!(result.is_err());

        let (result, calls) = run(vec![tonic::Status::unavailable("down")]).await;
        assert_eq!(calls, 1);
        assert!(result.is_err());
    }

    #[test]
    fn a_service_the_server_does_not_run_is_unavailable_and_named() {
        let error = call_failed(tonic::Status::unimplemented(""), "collector");
        assert_eq!(crate::failure::classify(&error), Failure::Unavailable);
        assert_eq!(
            crate::failure::message(&error),
            "this Keel server does not run the collector (keel serve --target all or collector)"
        );
        let error = call_failed(
            tonic::Status::not_found("instance x not found"),
            "collector",
        );
        assert_eq!(crate::failure::classify(&error), Failure::NotFound);
        assert_eq!(crate::failure::message(&error), "instance x not found");
    }

    #[test]
    fn an_endpoint_needs_a_scheme_and_a_host() {
        for bad in [
            "127.0.0.1:50051",
            "localhost:50051",
            "grpc://keel:50051",
            "http://",
        ] {
            let error = endpoint_uri(bad).expect_err(bad);
            assert_eq!(crate::failure::classify(&error), Failure::Invalid, "{bad}");
            assert!(error.to_string().contains("invalid endpoint"), "{error}");
        }
        for good in ["http://127.0.0.1:50051", "https://keel.example:443"] {
            assert!(endpoint_uri(good).is_ok(), "{good}");
        }
    }
}
