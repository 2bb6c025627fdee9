//! The CLI's connection to a Keel server.

use anyhow::Context as _;
use keel_proto::v1::registry_service_client::RegistryServiceClient;
use secrecy::{ExposeSecret, SecretString};
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::cli::ClientArgs;

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

/// TLS settings for an https:// endpoint; `None` for http://.
fn tls_config(args: &ClientArgs) -> anyhow::Result<Option<ClientTlsConfig>> {
    let wants_tls = args.tls_ca_file.is_some() || args.tls_client_cert_file.is_some();
    if !args.endpoint.starts_with("https://") {
        anyhow::ensure!(
            !wants_tls,
            "TLS settings are set but the endpoint {} is not https://; use https://",
            args.endpoint
        );
        return Ok(None);
    }
    let read = |path: &std::path::Path| {
        std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
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

pub(crate) type Registry = RegistryServiceClient<InterceptedService<Channel, Credentials>>;

/// Connects to the registry named by `args`.
pub(crate) async fn registry(args: &ClientArgs) -> anyhow::Result<Registry> {
    let key = match (
        std::env::var("KEEL_API_KEY").ok().filter(|k| !k.is_empty()),
        &args.api_key_file,
    ) {
        (Some(key), None) => SecretString::from(key),
        (None, Some(path)) => {
            keel_config::read_secret_file("--api-key-file / KEEL_API_KEY_FILE", path)?
        }
        (Some(_), Some(_)) => {
            anyhow::bail!("set either KEEL_API_KEY or --api-key-file / KEEL_API_KEY_FILE, not both")
        }
        // Reported like the server's own refusal, so scripts see the same exit code.
        (None, None) => {
            return Err(tonic::Status::unauthenticated(
                "no API key: set KEEL_API_KEY or KEEL_API_KEY_FILE (create one with `keel admin create-key`)",
            )
            .into());
        }
    };
    let mut authorization: AsciiMetadataValue =
        MetadataValue::try_from(format!("Bearer {}", key.expose_secret())).map_err(|_| {
            anyhow::anyhow!(
                "the API key contains characters that cannot be sent; check KEEL_API_KEY"
            )
        })?;
    authorization.set_sensitive(true);
    let mut endpoint = Endpoint::from_shared(args.endpoint.clone())
        .with_context(|| {
            format!(
                "invalid endpoint {:?}; expected e.g. https://keel.example:50051",
                args.endpoint
            )
        })?
        .connect_timeout(args.connect_timeout)
        // Per request, up to the response headers: a stream's messages are not cut off by it.
        .timeout(args.timeout);
    if let Some(tls) = tls_config(args)? {
        endpoint = endpoint.tls_config(tls).context("cannot set up TLS")?;
    }
    let channel = endpoint.connect().await.map_err(|error| {
        // The transport error's own text is only "transport error": the cause is in its sources.
        let cause = crate::causes(&error);
        // UNAVAILABLE, so scripts get the exit code for "retry later".
        tonic::Status::unavailable(format!(
            "cannot reach Keel at {}{cause}; is `keel serve` running, and do the TLS settings match?",
            args.endpoint
        ))
    })?;
    Ok(RegistryServiceClient::with_interceptor(
        channel,
        Credentials { authorization },
    ))
}
