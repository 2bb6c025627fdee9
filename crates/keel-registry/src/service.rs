//! The `keel.v1.RegistryService` gRPC API: authorisation, validation, then the store.

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine as _;
use keel_auth::{Principal, Role, Scope, Tenant, principal};
use keel_proto::v1::registry_service_server::RegistryService;
use keel_proto::v1::*;
use prost::Message;
use secrecy::ExposeSecret;
use sha2::Digest;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::connection;
use crate::error::RegistryError;
use crate::probe;
use crate::selector;
use crate::store::{Changes, InstanceStore, ListFilter, NewInstance};
use crate::validate::{self, Invalid};

/// Largest request the registry reads. Instances are small; anything bigger is a
/// mistake or an attack, and is refused with what to fix rather than stored.
const MAX_REQUEST_BYTES: usize = 64 * 1024;
const DEFAULT_PAGE_SIZE: i32 = 100;
const MAX_PAGE_SIZE: i32 = 1000;
/// Fields an update mask may name.
const UPDATABLE: &[&str] = &[
    "name",
    "connection_url",
    "environment",
    "labels",
    "monitoring_endpoints",
];

/// Settings of the registry service.
#[derive(Debug, Clone)]
pub struct RegistryConfig {
    /// How long `CheckInstance` waits for the database to answer.
    pub check_timeout: Duration,
    /// Root of the deployment's event subjects (`--nats-subject-root`).
    pub subjects: keel_bus::SubjectRoot,
    /// Where instances may point, and how the registry connects to them (`keel-registry`).
    pub targets: keel_target::Connector,
}

impl Default for RegistryConfig {
    /// A 5 s check and the default target policy, without a state store to protect.
    fn default() -> Self {
        Self {
            check_timeout: Duration::from_secs(5),
            subjects: keel_bus::SubjectRoot::default(),
            targets: keel_target::TargetConfig::default()
                .connector("registry", None)
                .unwrap_or_else(|_| unreachable!("the default target settings are valid")),
        }
    }
}

/// The registry's gRPC service.
#[derive(Debug, Clone)]
pub struct Registry {
    store: InstanceStore,
    config: RegistryConfig,
}

impl Registry {
    pub(crate) fn from_store(store: InstanceStore, config: RegistryConfig) -> Self {
        Self { store, config }
    }
}

fn check_size<T: Message>(request: &Request<T>) -> Result<(), Status> {
    let size = request.get_ref().encoded_len();
    if size > MAX_REQUEST_BYTES {
        return Err(Status::invalid_argument(format!(
            "request is {size} bytes; the registry accepts at most {MAX_REQUEST_BYTES} (names, URLs, labels and endpoints are all short)"
        )));
    }
    Ok(())
}

/// The caller, if its role allows `action`; its scope (its tenant, or the whole fleet)
/// scopes everything that follows.
fn authorize<'a, T>(
    request: &'a Request<T>,
    required: Role,
    action: &str,
) -> Result<&'a Principal, Status> {
    let principal = principal(request)?;
    principal.require(required, action)?;
    let tenant = match &principal.scope {
        Scope::Tenant(tenant) => tenant.as_str(),
        // Not a tenant name: those are DNS labels, which have no parentheses.
        Scope::Fleet => "(fleet)",
    };
    tracing::Span::current().record("tenant", tenant);
    Ok(principal)
}

/// The tenant a list is filtered on: a fleet caller's choice (`None` for all), a tenant
/// caller's own tenant, which is the only one it may name.
fn tenant_filter(scope: &Scope, requested: &str) -> Result<Option<Tenant>, Status> {
    let requested = if requested.is_empty() {
        None
    } else {
        let tenant = Tenant::new(requested).map_err(|_| {
            RegistryError::from(Invalid::new(
                "tenant",
                format!(
                    "{requested:?} is not a valid name: use 1 to 63 lowercase letters, digits and '-', \
                     starting and ending with a letter or digit, or leave it empty for every tenant you may see"
                ),
            ))
        })?;
        Some(tenant)
    };
    match (scope, requested) {
        (Scope::Fleet, requested) => Ok(requested),
        (Scope::Tenant(own), Some(requested)) if requested != *own => {
            Err(Status::permission_denied(format!(
                "a key of tenant {own} may list only tenant {own}'s instances, not tenant {requested}'s; leave tenant empty or set it to {own}"
            )))
        }
        (Scope::Tenant(own), _) => Ok(Some(own.clone())),
    }
}

fn parse_id(id: &str) -> Result<Uuid, Status> {
    if id.is_empty() {
        return Err(Status::invalid_argument("id is required"));
    }
    Uuid::parse_str(id).map_err(|_| {
        let shown: String = id.chars().take(40).collect();
        Status::invalid_argument(format!(
            "id {shown:?} is not a UUID such as 01890a5d-ac96-774b-bcce-b302099a8057"
        ))
    })
}

fn labels_of(
    labels: &std::collections::HashMap<String, String>,
) -> Result<BTreeMap<String, String>, Invalid> {
    validate::labels(labels)?;
    Ok(labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
}

/// Page tokens carry the last id and a digest of the filters, so a token reused
/// with other filters is refused instead of silently skipping rows.
fn page_token(last: Uuid, filters: &[u8; 8]) -> String {
    let mut raw = last.as_bytes().to_vec();
    raw.extend_from_slice(filters);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
}

fn filters_digest(request: &ListInstancesRequest) -> [u8; 8] {
    let mut hasher = sha2::Sha256::new();
    hasher.update(request.label_selector.as_bytes());
    hasher.update([0]);
    hasher.update(request.engine.to_le_bytes());
    hasher.update(request.environment.as_bytes());
    hasher.update([0]);
    hasher.update(request.tenant.as_bytes());
    let digest = hasher.finalize();
    let mut out = [0u8; 8];
    out.copy_from_slice(&digest[..8]);
    out
}

fn parse_page_token(token: &str, filters: &[u8; 8]) -> Result<Option<Uuid>, Invalid> {
    if token.is_empty() {
        return Ok(None);
    }
    let invalid = || {
        Invalid::new(
            "page_token",
            "is not a token this server issued; send next_page_token unchanged",
        )
    };
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .map_err(|_| invalid())?;
    if raw.len() != 24 {
        return Err(invalid());
    }
    if raw[16..] != filters[..] {
        return Err(Invalid::new(
            "page_token",
            "was issued for other filters; keep label_selector, engine, environment and tenant the same while paging",
        ));
    }
    let id = Uuid::from_slice(&raw[..16]).map_err(|_| invalid())?;
    Ok(Some(id))
}

#[tonic::async_trait]
impl RegistryService for Registry {
    #[tracing::instrument(skip_all, fields(tenant, instance_id))]
    async fn create_instance(
        &self,
        request: Request<CreateInstanceRequest>,
    ) -> Result<Response<CreateInstanceResponse>, Status> {
        check_size(&request)?;
        let principal = authorize(&request, Role::Operator, "create instances")?;
        let instance = request
            .get_ref()
            .instance
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("instance is required"))?;
        let new = (|| -> Result<NewInstance, Invalid> {
            validate::name(&instance.name)?;
            let engine = validate::engine(instance.engine)?;
            let url = connection::parse(engine, &instance.connection_url)?;
            validate::target(&self.config.targets, &url)?;
            validate::environment(&instance.environment)?;
            let labels = labels_of(&instance.labels)?;
            validate::monitoring_endpoints(&instance.monitoring_endpoints)?;
            Ok(NewInstance {
                name: instance.name.clone(),
                engine,
                url,
                environment: instance.environment.clone(),
                labels,
                endpoints: instance.monitoring_endpoints.clone(),
            })
        })()
        .map_err(RegistryError::from)?;
        let created = self.store.create(&principal.scope, new).await?;
        tracing::Span::current().record("instance_id", created.id.as_str());
        tracing::info!(name = %created.name, "instance created");
        Ok(Response::new(CreateInstanceResponse {
            instance: Some(created),
        }))
    }

    #[tracing::instrument(skip_all, fields(tenant, instance_id))]
    async fn get_instance(
        &self,
        request: Request<GetInstanceRequest>,
    ) -> Result<Response<GetInstanceResponse>, Status> {
        check_size(&request)?;
        let principal = authorize(&request, Role::Viewer, "read instances")?;
        let req = request.get_ref();
        let instance = match (req.id.is_empty(), req.name.is_empty()) {
            (false, true) => {
                let id = parse_id(&req.id)?;
                tracing::Span::current().record("instance_id", tracing::field::display(id));
                self.store.get(&principal.scope, id).await?
            }
            (true, false) => {
                validate::name(&req.name).map_err(RegistryError::from)?;
                let Scope::Tenant(tenant) = &principal.scope else {
                    return Err(Status::invalid_argument(
                        "a fleet caller must send the id: names are unique only within a tenant",
                    ));
                };
                self.store.get_by_name(tenant, &req.name).await?
            }
            _ => return Err(Status::invalid_argument("send exactly one of id or name")),
        };
        Ok(Response::new(GetInstanceResponse {
            instance: Some(instance),
        }))
    }

    #[tracing::instrument(skip_all, fields(tenant))]
    async fn list_instances(
        &self,
        request: Request<ListInstancesRequest>,
    ) -> Result<Response<ListInstancesResponse>, Status> {
        check_size(&request)?;
        let principal = authorize(&request, Role::Viewer, "list instances")?;
        let req = request.get_ref();
        let digest = filters_digest(req);
        let tenant = tenant_filter(&principal.scope, &req.tenant)?;
        let filter = (|| -> Result<ListFilter, Invalid> {
            let limit = match req.page_size {
                0 => DEFAULT_PAGE_SIZE,
                n if (1..=MAX_PAGE_SIZE).contains(&n) => n,
                n => return Err(Invalid::new("page_size", format!("{n} is out of range; use 1 to {MAX_PAGE_SIZE}, or 0 for {DEFAULT_PAGE_SIZE}"))),
            };
            let engine = match req.engine {
                0 => None,
                raw => Some(validate::engine(raw)?),
            };
            let environment = (!req.environment.is_empty()).then(|| req.environment.clone());
            if let Some(environment) = &environment {
                validate::environment(environment)?;
            }
            Ok(ListFilter {
                tenant,
                engine,
                environment,
                selector: selector::parse(&req.label_selector)?,
                after: parse_page_token(&req.page_token, &digest)?,
                limit: i64::from(limit),
            })
        })()
        .map_err(RegistryError::from)?;
        let (instances, more) = self.store.list(&principal.scope, &filter).await?;
        let next_page_token = match instances.last() {
            Some(last) if more => {
                page_token(Uuid::parse_str(&last.id).unwrap_or_default(), &digest)
            }
            _ => String::new(),
        };
        Ok(Response::new(ListInstancesResponse {
            instances,
            next_page_token,
        }))
    }

    #[tracing::instrument(skip_all, fields(tenant, instance_id))]
    async fn update_instance(
        &self,
        request: Request<UpdateInstanceRequest>,
    ) -> Result<Response<UpdateInstanceResponse>, Status> {
        check_size(&request)?;
        let principal = authorize(&request, Role::Operator, "update instances")?;
        let req = request.get_ref();
        let id = parse_id(&req.id)?;
        tracing::Span::current().record("instance_id", tracing::field::display(id));
        if req.expected_version <= 0 {
            return Err(Status::invalid_argument(
                "expected_version is required: send the version you last read, so concurrent changes are not overwritten",
            ));
        }
        let paths: Vec<String> = req
            .update_mask
            .as_ref()
            .map(|m| m.paths.clone())
            .unwrap_or_default();
        if paths.is_empty() {
            return Err(Status::invalid_argument(format!(
                "update_mask is required: name the fields to change, any of {}",
                UPDATABLE.join(", ")
            )));
        }
        for path in &paths {
            if !UPDATABLE.contains(&path.as_str()) {
                let reason = match path.as_str() {
                    "engine" => {
                        "engine is fixed at creation; register a new instance instead".to_owned()
                    }
                    "id" | "tenant" | "version" | "health" | "create_time" | "update_time" => {
                        format!("{path} is output only")
                    }
                    other => format!(
                        "{other:?} is not a field; use any of {}",
                        UPDATABLE.join(", ")
                    ),
                };
                return Err(Status::invalid_argument(format!("update_mask: {reason}")));
            }
        }
        let empty = Instance::default();
        let instance = req.instance.as_ref().unwrap_or(&empty);
        let has = |field: &str| paths.iter().any(|p| p == field);
        // The engine decides which URL schemes are valid; it is read only when needed.
        let engine = if has("connection_url") {
            let stored = self.store.get(&principal.scope, id).await?;
            Engine::try_from(stored.engine).unwrap_or(Engine::Unspecified)
        } else {
            Engine::Unspecified
        };
        let changes = (|| -> Result<Changes, Invalid> {
            let mut changes = Changes::default();
            if has("name") {
                validate::name(&instance.name)?;
                changes.name = Some(instance.name.clone());
            }
            if has("connection_url") {
                let url = connection::parse(engine, &instance.connection_url)
                    .map_err(connection::for_update)?;
                validate::target(&self.config.targets, &url)?;
                changes.url = Some(url);
            }
            if has("environment") {
                validate::environment(&instance.environment)?;
                changes.environment = Some(instance.environment.clone());
            }
            if has("labels") {
                changes.labels = Some(labels_of(&instance.labels)?);
            }
            if has("monitoring_endpoints") {
                validate::monitoring_endpoints(&instance.monitoring_endpoints)?;
                changes.endpoints = Some(instance.monitoring_endpoints.clone());
            }
            Ok(changes)
        })()
        .map_err(RegistryError::from)?;
        let updated = self
            .store
            .update(&principal.scope, id, req.expected_version, changes)
            .await?;
        if updated.version == req.expected_version {
            tracing::info!(
                version = updated.version,
                "instance unchanged: nothing differed"
            );
        } else {
            tracing::info!(version = updated.version, "instance updated");
        }
        Ok(Response::new(UpdateInstanceResponse {
            instance: Some(updated),
        }))
    }

    #[tracing::instrument(skip_all, fields(tenant, instance_id))]
    async fn delete_instance(
        &self,
        request: Request<DeleteInstanceRequest>,
    ) -> Result<Response<DeleteInstanceResponse>, Status> {
        let principal = authorize(&request, Role::Operator, "delete instances")?;
        let req = request.get_ref();
        let id = parse_id(&req.id)?;
        tracing::Span::current().record("instance_id", tracing::field::display(id));
        let expected = match req.expected_version {
            0 => None,
            v if v > 0 => Some(v),
            v => {
                return Err(Status::invalid_argument(format!(
                    "expected_version {v} is negative; send the version you read, or 0 for any"
                )));
            }
        };
        self.store.delete(&principal.scope, id, expected).await?;
        tracing::info!("instance deleted");
        Ok(Response::new(DeleteInstanceResponse {}))
    }

    #[tracing::instrument(skip_all, fields(tenant, instance_id))]
    async fn check_instance(
        &self,
        request: Request<CheckInstanceRequest>,
    ) -> Result<Response<CheckInstanceResponse>, Status> {
        let principal = authorize(&request, Role::Operator, "check instances")?;
        let id = parse_id(&request.get_ref().id)?;
        tracing::Span::current().record("instance_id", tracing::field::display(id));
        let (clear, instance) = self.store.connection(&principal.scope, id).await?;
        let engine = Engine::try_from(instance.engine).unwrap_or(Engine::Unspecified);
        let url = connection::parse(engine, clear.expose_secret()).map_err(RegistryError::from)?;
        let report = probe::probe(engine, &url, &self.config).await;
        let checked = self
            .store
            .record_health(&principal.scope, id, &report.health)
            .await?;
        tracing::info!(reachable = report.health.reachable, "instance checked");
        Ok(Response::new(CheckInstanceResponse {
            health: checked.health,
            findings: report.findings,
        }))
    }

    #[tracing::instrument(skip_all, fields(tenant, instance_id))]
    async fn get_instance_connection(
        &self,
        request: Request<GetInstanceConnectionRequest>,
    ) -> Result<Response<GetInstanceConnectionResponse>, Status> {
        let principal = authorize(&request, Role::Service, "read clear connection URLs")?;
        let id = parse_id(&request.get_ref().id)?;
        tracing::Span::current().record("instance_id", tracing::field::display(id));
        let (clear, instance) = self.store.connection(&principal.scope, id).await?;
        Ok(Response::new(GetInstanceConnectionResponse {
            instance_id: instance.id,
            engine: instance.engine,
            connection_url: clear.expose_secret().to_owned(),
            version: instance.version,
        }))
    }
}
