//! The CLI's connection to a Keel server.

use anyhow::Context as _;
use keel_proto::v1::registry_service_client::RegistryServiceClient;
use secrecy::ExposeSecret;
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

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

pub(crate) type Registry = RegistryServiceClient<InterceptedService<Channel, Credentials>>;

/// Connects to the registry named by `args`.
pub(crate) async fn registry(args: &ClientArgs) -> anyhow::Result<Registry> {
    let Some(key) = &args.api_key else {
        // Reported like the server's own refusal, so scripts see the same exit code.
        return Err(tonic::Status::unauthenticated(
            "no API key: set KEEL_API_KEY or pass --api-key (create one with `keel admin create-key`)",
        )
        .into());
    };
    let mut authorization: AsciiMetadataValue =
        MetadataValue::try_from(format!("Bearer {}", key.expose_secret())).map_err(|_| {
            anyhow::anyhow!(
                "the API key contains characters that cannot be sent; check KEEL_API_KEY"
            )
        })?;
    authorization.set_sensitive(true);
    let channel = Endpoint::from_shared(args.endpoint.clone())
        .with_context(|| {
            format!(
                "invalid endpoint {:?}; expected e.g. http://127.0.0.1:50051",
                args.endpoint
            )
        })?
        .connect_timeout(std::time::Duration::from_secs(5))
        .connect()
        .await
        .with_context(|| {
            format!(
                "cannot reach Keel at {}; is `keel serve` running?",
                args.endpoint
            )
        })?;
    Ok(RegistryServiceClient::with_interceptor(
        channel,
        Credentials { authorization },
    ))
}
