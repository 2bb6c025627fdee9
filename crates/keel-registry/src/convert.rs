//! Conversions between stored rows and API messages.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use keel_proto::v1::{Engine, Instance, InstanceHealth, InstanceRole, MonitoringEndpoint};
use serde::{Deserialize, Serialize};
use sqlx::types::Json;
use uuid::Uuid;

use crate::connection::engine_name;

/// An instance as stored, without its ciphertext.
#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct InstanceRow {
    pub(crate) id: Uuid,
    pub(crate) tenant: String,
    pub(crate) name: String,
    pub(crate) engine: String,
    pub(crate) url_masked: String,
    pub(crate) environment: String,
    pub(crate) labels: Json<BTreeMap<String, String>>,
    pub(crate) monitoring_endpoints: Json<Vec<Endpoint>>,
    pub(crate) version: i64,
    pub(crate) created_at: DateTime<Utc>,
    pub(crate) updated_at: DateTime<Utc>,
    pub(crate) health_checked_at: Option<DateTime<Utc>>,
    pub(crate) health_reachable: bool,
    pub(crate) health_server_version: String,
    pub(crate) health_role: String,
    pub(crate) health_error: String,
    pub(crate) health_latency_us: Option<i64>,
}

/// Columns of [`InstanceRow`], for SELECT and RETURNING lists.
pub(crate) const COLUMNS: &str = "id, tenant, name, engine, url_masked, environment, labels, monitoring_endpoints, \
     version, created_at, updated_at, health_checked_at, health_reachable, health_server_version, health_role, \
     health_error, health_latency_us";

/// A monitoring endpoint as stored in JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Endpoint {
    pub(crate) kind: String,
    pub(crate) url: String,
}

impl From<&MonitoringEndpoint> for Endpoint {
    fn from(e: &MonitoringEndpoint) -> Self {
        Self {
            kind: e.kind.clone(),
            url: e.url.clone(),
        }
    }
}

impl From<&InstanceRow> for Instance {
    fn from(row: &InstanceRow) -> Self {
        Instance {
            id: row.id.to_string(),
            tenant: row.tenant.clone(),
            name: row.name.clone(),
            engine: parse_engine(&row.engine) as i32,
            connection_url: row.url_masked.clone(),
            environment: row.environment.clone(),
            labels: row
                .labels
                .0
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            monitoring_endpoints: row
                .monitoring_endpoints
                .0
                .iter()
                .map(|e| MonitoringEndpoint {
                    kind: e.kind.clone(),
                    url: e.url.clone(),
                })
                .collect(),
            health: Some(health(row)),
            version: row.version,
            create_time: Some(timestamp(row.created_at)),
            update_time: Some(timestamp(row.updated_at)),
        }
    }
}

fn health(row: &InstanceRow) -> InstanceHealth {
    InstanceHealth {
        last_check_time: row.health_checked_at.map(timestamp),
        reachable: row.health_reachable,
        server_version: row.health_server_version.clone(),
        role: parse_role(&row.health_role) as i32,
        error: row.health_error.clone(),
        latency: row.health_latency_us.map(|us| prost_types::Duration {
            seconds: us / 1_000_000,
            nanos: ((us % 1_000_000) * 1000) as i32,
        }),
    }
}

/// Engine from its stored name.
pub(crate) fn parse_engine(engine: &str) -> Engine {
    match engine {
        "postgres" => Engine::Postgres,
        "redis" => Engine::Redis,
        _ => Engine::Unspecified,
    }
}

/// Stored name of an engine.
pub(crate) fn stored_engine(engine: Engine) -> &'static str {
    engine_name(engine)
}

/// Stored name of a role.
pub(crate) fn stored_role(role: InstanceRole) -> &'static str {
    match role {
        InstanceRole::Primary => "primary",
        InstanceRole::Replica => "replica",
        InstanceRole::Unspecified => "",
    }
}

fn parse_role(role: &str) -> InstanceRole {
    match role {
        "primary" => InstanceRole::Primary,
        "replica" => InstanceRole::Replica,
        _ => InstanceRole::Unspecified,
    }
}

/// A protobuf timestamp.
pub(crate) fn timestamp(at: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: at.timestamp(),
        nanos: at.timestamp_subsec_nanos() as i32,
    }
}
