//! The HTTP side: `/metrics`, `/healthz`, `/readyz`.

use std::fmt::{self, Write as _};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures::future::BoxFuture;
use keel_config::MetricsAccess;
use secrecy::ExposeSecret as _;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;

use crate::Metrics;

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";
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

/// Who may read `/metrics`, in the form checked on each request.
#[derive(Clone)]
pub(crate) enum MetricsAuth {
    /// Callers whose bearer token has this SHA-256 digest. Comparing digests, which all have the
    /// same length, keeps the token's length out of the comparison's timing too.
    Token([u8; 32]),
    /// Anyone.
    Anonymous,
    /// Nobody.
    Closed,
}

impl MetricsAuth {
    pub(crate) fn new(access: &MetricsAccess) -> Self {
        match access {
            MetricsAccess::Token(token) => {
                Self::Token(Sha256::digest(token.expose_secret().as_bytes()).into())
            }
            MetricsAccess::Anonymous => Self::Anonymous,
            MetricsAccess::Closed => Self::Closed,
        }
    }

    /// Whether a request with these headers may read the metrics.
    fn allows(&self, headers: &HeaderMap) -> bool {
        let expected = match self {
            Self::Token(digest) => digest,
            Self::Anonymous => return true,
            Self::Closed => return false,
        };
        let Some(token) = headers
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(bearer_token)
        else {
            return false;
        };
        Sha256::digest(token.as_bytes()).ct_eq(expected).into()
    }
}

impl fmt::Debug for MetricsAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Even the token's digest stays out of logs.
        f.write_str(match self {
            Self::Token(_) => "Token(<redacted>)",
            Self::Anonymous => "Anonymous",
            Self::Closed => "Closed",
        })
    }
}

/// The token of an `authorization: Bearer <token>` value; the scheme is case-insensitive
/// (RFC 9110, section 11.1).
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim_start_matches(' ');
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

#[derive(Debug, Clone)]
struct HttpState {
    metrics: Metrics,
    readiness: Arc<Readiness>,
    metrics_auth: MetricsAuth,
}

pub(crate) fn router(
    metrics: Metrics,
    readiness: Arc<Readiness>,
    metrics_auth: MetricsAuth,
) -> axum::Router {
    axum::Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(HttpState {
            metrics,
            readiness,
            metrics_auth,
        })
}

/// The metrics, for callers with the bearer token (or anyone, when anonymous access is on).
async fn metrics_handler(State(state): State<HttpState>, headers: HeaderMap) -> Response {
    if !state.metrics_auth.allows(&headers) {
        // One answer for a missing, a wrong and an unconfigured token: a caller learns nothing
        // about which it was.
        return (
            StatusCode::UNAUTHORIZED,
            [
                (header::WWW_AUTHENTICATE, r#"Bearer realm="keel-metrics""#),
                (header::CONTENT_TYPE, TEXT),
            ],
            "/metrics needs authorization: Bearer <token>\n",
        )
            .into_response();
    }
    // OpenMetrics to those who ask for it (Prometheus does), the 0.0.4 text format to everyone
    // else, as the Go and Python clients do: `curl … | promtool check metrics` reads only 0.0.4.
    let openmetrics = accepts_openmetrics(&headers);
    let content_type = if openmetrics {
        OPENMETRICS
    } else {
        PROMETHEUS_TEXT
    };
    let gzip = accepts_gzip(&headers);
    let chunks = if gzip {
        state.metrics.encode_chunks_gzip(openmetrics)
    } else {
        state.metrics.encode_chunks(openmetrics)
    };
    match chunks {
        Ok(chunks) => {
            let body = axum::body::Body::from_stream(futures::stream::iter(
                chunks.into_iter().map(Ok::<_, std::convert::Infallible>),
            ));
            let mut response = ([(header::CONTENT_TYPE, content_type)], body).into_response();
            let headers = response.headers_mut();
            headers.insert(
                header::VARY,
                header::HeaderValue::from_static("accept, accept-encoding"),
            );
            if gzip {
                headers.insert(
                    header::CONTENT_ENCODING,
                    header::HeaderValue::from_static("gzip"),
                );
            }
            response
        }
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

/// Whether `Accept-Encoding` names gzip with a quality above zero (Prometheus sends
/// `gzip`; a fleet's metrics are megabytes that compress about tenfold).
fn accepts_gzip(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|coding| {
            let mut parts = coding.split(';').map(str::trim);
            let is_gzip = parts.next().is_some_and(|c| {
                c.eq_ignore_ascii_case("gzip") || c.eq_ignore_ascii_case("x-gzip")
            });
            let refused = parts.any(|param| {
                param
                    .strip_prefix("q=")
                    .and_then(|q| q.parse::<f32>().ok())
                    .is_some_and(|q| q <= 0.0)
            });
            is_gzip && !refused
        })
}

/// Whether `Accept` names OpenMetrics with a quality above zero.
fn accepts_openmetrics(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|range| {
            let mut parts = range.split(';').map(str::trim);
            let is_openmetrics = parts
                .next()
                .is_some_and(|media| media.eq_ignore_ascii_case("application/openmetrics-text"));
            let refused = parts.any(|param| {
                param
                    .strip_prefix("q=")
                    .and_then(|q| q.parse::<f32>().ok())
                    .is_some_and(|q| q <= 0.0)
            });
            is_openmetrics && !refused
        })
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

#[cfg(test)]
mod tests {
    use super::*;

    fn check(auth: &MetricsAuth, authorization: Option<&str>, allowed: bool) {
        let mut headers = HeaderMap::new();
        if let Some(value) = authorization {
            headers.insert(
                header::AUTHORIZATION,
                value.parse().expect("a valid header value"),
            );
        }
        assert_eq!(auth.allows(&headers), allowed, "{authorization:?}");
    }

    #[test]
    fn gzip_only_when_asked_for() {
        let accepts = |value: Option<&str>| {
            let mut headers = HeaderMap::new();
            if let Some(value) = value {
                headers.insert(header::ACCEPT_ENCODING, value.parse().expect("header"));
            }
            accepts_gzip(&headers)
        };
        assert!(accepts(Some("gzip")));
        assert!(accepts(Some("deflate, gzip;q=0.5")));
        assert!(accepts(Some("identity, GZIP")));
        assert!(!accepts(Some("gzip;q=0")));
        assert!(!accepts(Some("br, deflate")));
        assert!(!accepts(None));
    }

    #[test]
    fn openmetrics_only_when_asked_for() {
        let accepts = |value: Option<&str>| {
            let mut headers = HeaderMap::new();
            if let Some(value) = value {
                headers.insert(header::ACCEPT, value.parse().expect("a valid header value"));
            }
            accepts_openmetrics(&headers)
        };
        // What Prometheus 2.x sends by default.
        assert!(accepts(Some(
            "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
        )));
        assert!(accepts(Some("Application/OpenMetrics-Text")));
        assert!(!accepts(None));
        assert!(!accepts(Some("*/*")));
        assert!(!accepts(Some("text/plain;version=0.0.4")));
        assert!(!accepts(Some("application/openmetrics-text;q=0")));
    }

    #[test]
    fn metrics_need_the_exact_bearer_token() {
        let auth = MetricsAuth::new(&MetricsAccess::Token("s3cret".to_owned().into()));
        check(&auth, Some("Bearer s3cret"), true);
        check(&auth, Some("bearer s3cret"), true);
        check(&auth, Some("Bearer  s3cret"), true);
        check(&auth, None, false);
        check(&auth, Some("Bearer"), false);
        check(&auth, Some("Bearer "), false);
        check(&auth, Some("Bearer s3cre"), false);
        check(&auth, Some("Bearer s3cret2"), false);
        check(&auth, Some("Basic s3cret"), false);
        check(&auth, Some("s3cret"), false);
        assert!(!format!("{auth:?}").contains("s3cret"));

        check(&MetricsAuth::new(&MetricsAccess::Anonymous), None, true);
        check(&MetricsAuth::new(&MetricsAccess::Closed), None, false);
        check(
            &MetricsAuth::new(&MetricsAccess::Closed),
            Some("Bearer anything"),
            false,
        );
    }
}
