//! What the collector learns from the registry: the instances to scrape (a full list at start
//! and now and then, and `keel.registry.*.instance.*` events in between) and, at scrape time,
//! their clear connection URLs. Both through the fleet identity.

use std::fmt;
use std::time::Duration;

use keel_bus::consumer::{Delivery, EventHandler, HandlerError};
use keel_bus::{Outbox, SubjectRoot};
use keel_fleet::{BoxError, FleetChannel as Channel};
use keel_proto::v1::registry_service_client::RegistryServiceClient;
use keel_proto::v1::{
    Engine as ProtoEngine, Event, GetInstanceConnectionRequest, Instance, InstanceCreated,
    InstanceUpdated, ListInstancesRequest, event,
};
use prost::Message as _;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::store::{self, Engine, TargetSpec};

/// Instance label that sets a target's scrape interval, such as `30s`.
pub const INTERVAL_LABEL: &str = "collector.keel.dev/interval";
/// Instance label that sets a target's scrape timeout, such as `3s`.
pub const TIMEOUT_LABEL: &str = "collector.keel.dev/timeout";

/// A registry client calling as Keel's fleet identity: in-process under `--target all`, or
/// over the network with a fleet key.
#[derive(Clone)]
pub struct RegistryClient {
    inner: RegistryServiceClient<Channel>,
}

impl fmt::Debug for RegistryClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegistryClient").finish_non_exhaustive()
    }
}

impl RegistryClient {
    /// A client over `channel`: [`keel_auth::InProcess`] from `Host::in_process`, or a network
    /// channel that sends a fleet key (see [`RegistryClient::remote`]).
    pub fn new<S, B>(channel: S) -> Self
    where
        S: tower::Service<http::Request<tonic::body::Body>, Response = http::Response<B>>
            + Clone
            + Send
            + Sync
            + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
        B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let channel = Channel::new(channel);
        Self {
            inner: RegistryServiceClient::new(channel),
        }
    }

    /// A client over a network `channel` that sends `key` (a fleet key) on every call.
    pub fn remote(channel: tonic::transport::Channel, key: secrecy::SecretString) -> Self {
        Self {
            inner: RegistryServiceClient::new(Channel::remote(channel, key)),
        }
    }

    /// Every instance of every tenant.
    // Boxed: a `Send` future rustc can check here, not through every caller's generics.
    pub fn list_all(
        &self,
    ) -> futures::future::BoxFuture<'static, Result<Vec<Instance>, tonic::Status>> {
        let mut client = self.inner.clone();
        Box::pin(async move {
            let mut out = Vec::new();
            let mut page_token = String::new();
            loop {
                let page = client
                    .list_instances(ListInstancesRequest {
                        page_size: 1000,
                        page_token,
                        ..ListInstancesRequest::default()
                    })
                    .await?
                    .into_inner();
                out.extend(page.instances);
                if page.next_page_token.is_empty() {
                    return Ok(out);
                }
                page_token = page.next_page_token;
            }
        })
    }

    /// One instance by id, of any tenant.
    pub(crate) fn instance(
        &self,
        id: Uuid,
    ) -> futures::future::BoxFuture<'static, Result<Instance, tonic::Status>> {
        let mut client = self.inner.clone();
        Box::pin(async move {
            let response = client
                .get_instance(keel_proto::v1::GetInstanceRequest {
                    id: id.to_string(),
                    ..Default::default()
                })
                .await?
                .into_inner();
            response
                .instance
                .ok_or_else(|| tonic::Status::not_found("no instance in the answer"))
        })
    }

    /// The clear connection URL of an instance and the version it belongs to.
    pub(crate) fn connection(
        &self,
        id: Uuid,
    ) -> futures::future::BoxFuture<'static, Result<(secrecy::SecretString, i64), tonic::Status>>
    {
        let mut client = self.inner.clone();
        Box::pin(async move {
            let response = client
                .get_instance_connection(GetInstanceConnectionRequest { id: id.to_string() })
                .await?
                .into_inner();
            Ok((response.connection_url.into(), response.version))
        })
    }
}

/// Scrape settings that apply unless an instance's labels say otherwise.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Defaults {
    pub(crate) interval: Duration,
    pub(crate) timeout: Duration,
}

/// The scrape job of `instance`; `None` for an instance the collector does not scrape (an
/// engine it does not know, or an id that is no UUID).
pub(crate) fn spec(instance: &Instance, defaults: Defaults) -> Option<TargetSpec> {
    let engine = match ProtoEngine::try_from(instance.engine).ok()? {
        ProtoEngine::Postgres => Engine::Postgres,
        ProtoEngine::Redis => Engine::Redis,
        ProtoEngine::Unspecified => return None,
    };
    let label = |key: &str, default: Duration| {
        instance
            .labels
            .get(key)
            .and_then(|v| keel_config::parse_duration(v).ok())
            .filter(|d| *d >= Duration::from_secs(1) && *d <= Duration::from_secs(24 * 3600))
            .unwrap_or(default)
    };
    let interval = label(INTERVAL_LABEL, defaults.interval);
    // A scrape never outlives its interval, so one target cannot pile up scrapes.
    let timeout = label(TIMEOUT_LABEL, defaults.timeout).min(interval);
    Some(TargetSpec {
        instance_id: instance.id.parse().ok()?,
        tenant: instance.tenant.clone(),
        name: instance.name.clone(),
        engine,
        labels: instance.labels.clone().into_iter().collect(),
        registry_version: instance.version,
        interval,
        timeout,
    })
}

/// Keeps the scrape jobs in step with the registry's instance events.
#[derive(Debug)]
pub(crate) struct InstanceEvents {
    pub(crate) defaults: Defaults,
    pub(crate) outbox: Outbox,
    pub(crate) subjects: SubjectRoot,
}

impl EventHandler for InstanceEvents {
    async fn handle(&self, tx: &mut PgConnection, delivery: &Delivery) -> Result<(), HandlerError> {
        let event = Event::decode(delivery.payload.as_ref())
            .map_err(|e| HandlerError::Reject(format!("not a keel.v1.Event: {e}")))?;
        let retry = |e: &dyn fmt::Display| HandlerError::Retry(e.to_string());
        match event.payload {
            Some(
                event::Payload::InstanceCreated(InstanceCreated { instance })
                | event::Payload::InstanceUpdated(InstanceUpdated { instance, .. }),
            ) => {
                if let Some(spec) = instance.as_ref().and_then(|i| spec(i, self.defaults)) {
                    store::upsert_target(tx, &spec)
                        .await
                        .map_err(|e| retry(&e))?;
                }
            }
            Some(event::Payload::InstanceDeleted(deleted)) => {
                let id: Uuid = deleted
                    .instance_id
                    .parse()
                    .map_err(|_| HandlerError::Reject("instance id is not a UUID".into()))?;
                store::delete_target(tx, id, deleted.version, &self.outbox, &self.subjects)
                    .await
                    .map_err(|e| retry(&e))?;
            }
            // Other services' events on a shared filter: nothing to do.
            _ => {}
        }
        Ok(())
    }
}
