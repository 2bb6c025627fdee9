use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

/// Which limit a request ran into; the `limit` label of `keel_limit_exceeded_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Limit {
    Rate,
    Concurrency,
    MessageSize,
    StreamDuration,
}

impl Limit {
    fn as_str(self) -> &'static str {
        match self {
            Limit::Rate => "rate",
            Limit::Concurrency => "concurrency",
            Limit::MessageSize => "message_size",
            Limit::StreamDuration => "stream_duration",
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ExceededLabels {
    tenant: String,
    limit: &'static str,
}

/// `keel_limit_exceeded_total{tenant, limit}`.
///
/// Labelled by tenant, never by key: tenants are few and validated DNS labels, so the number
/// of series is at most four per tenant, while keys come and go.
#[derive(Debug, Clone)]
pub(crate) struct LimitMetrics {
    exceeded: Family<ExceededLabels, Counter>,
}

impl LimitMetrics {
    pub(crate) fn register(metrics: &keel_server::Metrics) -> Self {
        let exceeded = Family::<ExceededLabels, Counter>::default();
        metrics.register(
            "keel_limit_exceeded",
            "Requests refused or streams ended because an API key exceeded a limit, by tenant and limit",
            exceeded.clone(),
        );
        Self { exceeded }
    }
}

/// Counts exceeded limits for one caller's tenant; carried by the body wrappers, which find
/// out only later that a limit was hit.
#[derive(Debug, Clone)]
pub(crate) struct Tally {
    metrics: LimitMetrics,
    tenant: Arc<str>,
}

impl Tally {
    pub(crate) fn new(metrics: LimitMetrics, tenant: &str) -> Self {
        Self {
            metrics,
            tenant: tenant.into(),
        }
    }

    pub(crate) fn tenant(&self) -> &str {
        &self.tenant
    }

    pub(crate) fn count(&self, limit: Limit) {
        self.metrics
            .exceeded
            .get_or_create(&ExceededLabels {
                tenant: self.tenant.to_string(),
                limit: limit.as_str(),
            })
            .inc();
    }
}
