//! The HTTP side: `/metrics`, `/healthz`, `/readyz`.

use std::fmt::{self, Write as _};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures::future::BoxFuture;

use crate::Metrics;

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const TEXT: &str = "text/plain; charset=utf-8";

/// Longest a readiness check may take. The checks run concurrently, so `/readyz` answers within
/// this bound, under the 1 s default timeout of a Kubernetes probe: a hung dependency then shows
/// up as "not ready" instead of as a probe timeout without a reason.
const CHECK_TIMEOUT: Duration = Duration::from_millis(800);

pub(crate) type CheckFn = Arc<dyn Fn() -> BoxFuture<'static, Result<(), String>> + Send + Sync>;

/// A named readiness check.
#[derive(Clone)]
pub(crate) struct ReadinessCheck {
    pub(crate) name: &'static str,
    pub(crate) check: CheckFn,
}

impl fmt::Debug for ReadinessCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReadinessCheck")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// What `/readyz` consults.
#[derive(Debug)]
pub(crate) struct Readiness {
    pub(crate) checks: Vec<ReadinessCheck>,
    /// Set when shutdown starts, so load balancers stop sending new work before the listeners close.
    pub(crate) shutting_down: AtomicBool,
}

#[derive(Debug, Clone)]
struct HttpState {
    metrics: Metrics,
    readiness: Arc<Readiness>,
}

pub(crate) fn router(metrics: Metrics, readiness: Arc<Readiness>) -> axum::Router {
    axum::Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(HttpState { metrics, readiness })
}

async fn metrics_handler(State(state): State<HttpState>) -> Response {
    match state.metrics.encode() {
        Ok(text) => ([(header::CONTENT_TYPE, OPENMETRICS)], text).into_response(),
        Err(error) => {
            tracing::error!(%error, "encoding metrics failed");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                [(header::CONTENT_TYPE, TEXT)],
                "encoding metrics failed\n",
            )
                .into_response()
        }
    }
}

/// Liveness: the process answers HTTP. Dependencies are `/readyz`'s business, so that an outage
/// of PostgreSQL or NATS does not get every replica restarted.
async fn healthz() -> Response {
    ([(header::CONTENT_TYPE, TEXT)], "ok\n").into_response()
}

/// Readiness: 200 when every check passes, else 503 listing each failing check and its reason.
async fn readyz(State(state): State<HttpState>) -> Response {
    if state.readiness.shutting_down.load(Ordering::Relaxed) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::CONTENT_TYPE, TEXT)],
            "shutting down\n",
        )
            .into_response();
    }
    let results =
        futures::future::join_all(state.readiness.checks.iter().map(|check| async move {
            let outcome = match tokio::time::timeout(CHECK_TIMEOUT, (check.check)()).await {
                Ok(outcome) => outcome,
                Err(_) => Err(format!("no answer within {CHECK_TIMEOUT:?}")),
            };
            (check.name, outcome)
        }))
        .await;
    let mut failures = String::new();
    for (name, outcome) in results {
        if let Err(reason) = outcome {
            // Writing to a String cannot fail.
            let _ = writeln!(failures, "{name}: {reason}");
        }
    }
    if failures.is_empty() {
        ([(header::CONTENT_TYPE, TEXT)], "ok\n").into_response()
    } else {
        tracing::warn!(failures = failures.trim_end(), "not ready");
        (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::CONTENT_TYPE, TEXT)],
            failures,
        )
            .into_response()
    }
}
