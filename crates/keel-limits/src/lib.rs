//! Per-API-key limits for Keel's gRPC services.
//!
//! [`LimitsLayer`] sits inside [`keel_auth::AuthLayer`], around each generated server, and holds
//! every API key to the limits of a [`LimitsConfig`]:
//!
//! - **rate**: a token bucket per key (`--limit-rate` per second, `--limit-burst` at once);
//! - **concurrency**: at most `--limit-concurrency` calls of one key running at once, the rest
//!   refused immediately, never queued;
//! - **message size**: a request body over `--limit-message-bytes` is refused, from its declared
//!   length when it has one and otherwise as soon as that many bytes have come in, so an
//!   oversized request is never buffered whole;
//! - **stream duration**: a response still streaming after `--limit-stream-duration` is ended
//!   with a status in its trailers, and the client reconnects.
//!
//! Fleet callers ([`keel_auth::Scope::Fleet`]: Keel's own services, with a fleet key or over an
//! in-process channel) are held to a separate [`FleetLimitsConfig`] (`--fleet-limit-*`,
//! `KEEL_FLEET_LIMIT_*`, larger defaults), in budgets of their own: tenants' limits never
//! throttle Keel's services, and fleet traffic never uses up a tenant's budget.
//!
//! Exceeding a limit answers RESOURCE_EXHAUSTED with a message saying when to retry (the rate
//! limit also sets the `retry-after-ms` metadata) and increments
//! `keel_limit_exceeded_total{tenant, limit}`, labelled by tenant and never by key, so the
//! number of series is bounded by the number of tenants; fleet callers are counted with an
//! empty tenant.

#![warn(missing_docs)]

mod body;
mod concurrency;
mod config;
mod layer;
mod metrics;

pub use config::{FleetLimitsConfig, LimitsConfig};
pub use layer::{LimitsLayer, LimitsService, RETRY_AFTER_MS};
