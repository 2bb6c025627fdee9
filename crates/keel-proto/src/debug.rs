//! `Debug` for the messages that carry connection URLs, with every credential masked.
//!
//! `build.rs` skips the derived `Debug` of exactly these messages; every message holding one of
//! them (requests, responses, events) keeps its derived `Debug`, which calls these.

use std::fmt;

use keel_config::redact_url;

use crate::v1::{Engine, GetInstanceConnectionResponse, Instance, MonitoringEndpoint};

/// An engine as prost's derived `Debug` shows it: its name, or the number if unknown.
struct EngineName(i32);

impl fmt::Debug for EngineName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match Engine::try_from(self.0) {
            Ok(engine) => fmt::Debug::fmt(&engine, f),
            Err(_) => fmt::Debug::fmt(&self.0, f),
        }
    }
}

impl fmt::Debug for Instance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Instance")
            .field("id", &self.id)
            .field("tenant", &self.tenant)
            .field("name", &self.name)
            .field("engine", &EngineName(self.engine))
            .field("connection_url", &redact_url(&self.connection_url))
            .field("environment", &self.environment)
            .field("labels", &self.labels)
            .field("monitoring_endpoints", &self.monitoring_endpoints)
            .field("health", &self.health)
            .field("version", &self.version)
            .field("create_time", &self.create_time)
            .field("update_time", &self.update_time)
            .finish()
    }
}

impl fmt::Debug for MonitoringEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MonitoringEndpoint")
            .field("kind", &self.kind)
            .field("url", &redact_url(&self.url))
            .finish()
    }
}

impl fmt::Debug for GetInstanceConnectionResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GetInstanceConnectionResponse")
            .field("instance_id", &self.instance_id)
            .field("engine", &EngineName(self.engine))
            .field("connection_url", &redact_url(&self.connection_url))
            .field("version", &self.version)
            .finish()
    }
}
