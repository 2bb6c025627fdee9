//! The gRPC edge: authorise, validate, map errors to status once.

use std::time::Duration;

use chrono::Utc;
use keel_auth::{Role, Scope, principal};
use keel_proto::v1::collector_service_server::CollectorService;
use keel_proto::v1::{
    CollectNowRequest, CollectNowResponse, GetInstanceMetricsRequest, GetInstanceMetricsResponse,
    ListAlertsRequest, ListAlertsResponse, ListTopQueriesRequest, ListTopQueriesResponse, Point,
    Series, TopQuery,
};
use sqlx::PgPool;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::catalog;
use crate::convert;
use crate::error::CollectorError;
use crate::registry::{self, Defaults, RegistryClient};
use crate::scheduler::Scraper;
use crate::store::{self, Engine, Written};

/// The collector's gRPC service.
#[derive(Debug, Clone)]
pub struct Collector {
    pool: PgPool,
    scraper: Scraper,
    retention: Duration,
    registry: RegistryClient,
    defaults: Defaults,
}

impl Collector {
    pub(crate) fn new(
        pool: PgPool,
        scraper: Scraper,
        retention: Duration,
        registry: RegistryClient,
        defaults: Defaults,
    ) -> Self {
        Self {
            pool,
            scraper,
            retention,
            registry,
            defaults,
        }
    }

    /// Claims the job of `id` now; an instance registered so recently that its event has not
    /// reached the collector yet is looked up in the registry and added first.
    async fn claim_now(&self, scope: &Scope, id: Uuid) -> Result<store::Claimed, CollectorError> {
        if let Some(claimed) = store::claim_now(&self.pool, scope, id).await? {
            return Ok(claimed);
        }
        let instance = match self.registry.instance(id).await {
            Ok(instance) => instance,
            Err(status) if status.code() == tonic::Code::NotFound => {
                return Err(CollectorError::NotFound(id.to_string()));
            }
            Err(status) => return Err(status.into()),
        };
        // The registry answers the fleet; the caller may only see its own tenant's.
        let spec = registry::spec(&instance, self.defaults)
            .filter(|spec| scope.covers(&spec.tenant))
            .ok_or_else(|| CollectorError::NotFound(id.to_string()))?;
        let mut conn = self.pool.acquire().await?;
        store::upsert_target(&mut conn, &spec).await?;
        drop(conn);
        store::claim_now(&self.pool, scope, id)
            .await?
            .ok_or_else(|| CollectorError::NotFound(id.to_string()))
    }
}

fn authorize<T>(request: &Request<T>, required: Role, action: &str) -> Result<Scope, Status> {
    let principal = principal(request)?;
    principal.require(required, action)?;
    Ok(principal.scope.clone())
}

fn instance_id(raw: &str) -> Result<Uuid, CollectorError> {
    if raw.is_empty() {
        return Err(CollectorError::Invalid("instance_id is required".into()));
    }
    raw.parse().map_err(|_| {
        CollectorError::Invalid(format!(
            "instance_id {raw:?} is not a UUID; use the id `keel instance get` shows"
        ))
    })
}

/// A window from the request: `default` when unset or zero, refused when negative or longer
/// than the retention.
fn window(
    raw: Option<&prost_types::Duration>,
    default: Duration,
    retention: Duration,
) -> Result<Duration, CollectorError> {
    let Some(raw) = raw else { return Ok(default) };
    if raw.seconds < 0 || raw.nanos < 0 {
        return Err(CollectorError::Invalid(
            "window must not be negative".into(),
        ));
    }
    let window = Duration::new(raw.seconds as u64, raw.nanos as u32);
    if window.is_zero() {
        return Ok(default);
    }
    if window > retention {
        return Err(CollectorError::Invalid(format!(
            "window {}s is longer than the history kept ({}s, --collector-retention / KEEL_COLLECTOR_RETENTION)",
            window.as_secs(),
            retention.as_secs()
        )));
    }
    Ok(window)
}

fn limit(raw: i32, default: i64) -> Result<i64, CollectorError> {
    match raw {
        0 => Ok(default),
        1..=1000 => Ok(i64::from(raw)),
        _ => Err(CollectorError::Invalid(format!(
            "limit must be between 1 and 1000 (0 means {default}), not {raw}"
        ))),
    }
}

fn since(window: Duration) -> chrono::DateTime<Utc> {
    Utc::now() - chrono::Duration::from_std(window).unwrap_or(chrono::Duration::MAX)
}

#[tonic::async_trait]
impl CollectorService for Collector {
    async fn get_instance_metrics(
        &self,
        request: Request<GetInstanceMetricsRequest>,
    ) -> Result<Response<GetInstanceMetricsResponse>, Status> {
        let scope = authorize(&request, Role::Viewer, "read metrics")?;
        let req = request.into_inner();
        let id = instance_id(&req.instance_id)?;
        let window = window(req.window.as_ref(), Duration::ZERO, self.retention)?;
        if req.names.len() > 100 {
            return Err(CollectorError::Invalid("at most 100 names".into()).into());
        }
        for name in &req.names {
            if catalog::family(name).is_none() {
                return Err(CollectorError::Invalid(format!(
                    "no metric is named {name:?}; names look like keel_pg_connections (see the collector's metric list in the README)"
                ))
                .into());
            }
        }
        let view = store::target_view(&self.pool, &scope, id)
            .await
            .map_err(CollectorError::from)?
            .ok_or_else(|| CollectorError::NotFound(id.to_string()))?;
        let series = if window.is_zero() {
            Vec::new()
        } else {
            store::series(&self.pool, id, since(window), &req.names)
                .await
                .map_err(CollectorError::from)?
                .into_iter()
                .map(|((name, labels), points)| Series {
                    name,
                    labels: labels.into_iter().collect(),
                    points: points
                        .into_iter()
                        .map(|(at, value)| Point {
                            at: Some(convert::timestamp(at)),
                            value,
                        })
                        .collect(),
                })
                .collect()
        };
        Ok(Response::new(GetInstanceMetricsResponse {
            instance_id: id.to_string(),
            instance_name: view.name.clone(),
            engine: view.engine.proto() as i32,
            status: Some(convert::status(&view)),
            latest: view.latest.iter().map(convert::metric).collect(),
            series,
        }))
    }

    async fn list_top_queries(
        &self,
        request: Request<ListTopQueriesRequest>,
    ) -> Result<Response<ListTopQueriesResponse>, Status> {
        let scope = authorize(&request, Role::Viewer, "read top queries")?;
        let req = request.into_inner();
        let id = instance_id(&req.instance_id)?;
        let window = window(
            req.window.as_ref(),
            Duration::from_secs(3600),
            self.retention,
        )?;
        let limit = limit(req.limit, 20)?;
        let view = store::target_view(&self.pool, &scope, id)
            .await
            .map_err(CollectorError::from)?
            .ok_or_else(|| CollectorError::NotFound(id.to_string()))?;
        if view.engine != Engine::Postgres {
            return Err(CollectorError::Precondition(format!(
                "instance {} is a Redis instance; top queries come from PostgreSQL's pg_stat_statements",
                view.name
            ))
            .into());
        }
        let (queries, total_ms, from) = store::top_queries(&self.pool, id, since(window), limit)
            .await
            .map_err(CollectorError::from)?;
        let queries = queries
            .into_iter()
            .map(|q| {
                let c = q.counters;
                TopQuery {
                    query_id: q.query_id,
                    text: q.text.unwrap_or_default(),
                    calls: c.calls,
                    total_exec_seconds: c.total_exec_ms / 1e3,
                    mean_exec_seconds: if c.calls > 0 {
                        c.total_exec_ms / 1e3 / c.calls as f64
                    } else {
                        0.0
                    },
                    rows: c.rows,
                    shared_blks_hit: c.shared_blks_hit,
                    shared_blks_read: c.shared_blks_read,
                    temp_blks_written: c.temp_blks_written,
                    wal_bytes: c.wal_bytes,
                    share_of_total_time: if total_ms > 0.0 {
                        (c.total_exec_ms / total_ms).min(1.0)
                    } else {
                        0.0
                    },
                }
            })
            .collect();
        let mut problems: Vec<String> = view
            .problems
            .iter()
            .filter(|p| {
                p.contains("pg_stat_statements")
                    || p.contains("pg_monitor")
                    || p.contains("insufficient privilege")
            })
            .cloned()
            .collect();
        if from.is_none() {
            problems.push(match view.scraped_at {
                None => "the collector has not scraped this instance yet; try again after its first scrapes (or `keel instance collect`)".into(),
                Some(_) => "no statement ran in the window, or only one scrape covers it (deltas need two)".into(),
            });
        }
        Ok(Response::new(ListTopQueriesResponse {
            queries,
            total_exec_seconds: total_ms / 1e3,
            covered_from: from.map(convert::timestamp),
            problems,
        }))
    }

    async fn list_alerts(
        &self,
        request: Request<ListAlertsRequest>,
    ) -> Result<Response<ListAlertsResponse>, Status> {
        let scope = authorize(&request, Role::Viewer, "read alerts")?;
        let req = request.into_inner();
        let instance = if req.instance_id.is_empty() {
            None
        } else {
            Some(instance_id(&req.instance_id)?)
        };
        let limit = limit(req.limit, 100)?;
        let rows = store::alerts(&self.pool, &scope, instance, req.include_resolved, limit)
            .await
            .map_err(CollectorError::from)?;
        Ok(Response::new(ListAlertsResponse {
            alerts: rows.iter().map(convert::alert).collect(),
        }))
    }

    async fn collect_now(
        &self,
        request: Request<CollectNowRequest>,
    ) -> Result<Response<CollectNowResponse>, Status> {
        let scope = authorize(&request, Role::Operator, "start a scrape")?;
        let id = instance_id(&request.get_ref().instance_id)?;
        let claimed = self.claim_now(&scope, id).await?;
        let next = claimed.next_run_at;
        let scraped = self.scraper.scrape(claimed).await?;
        if scraped.written == Written::Gone {
            return Err(CollectorError::NotFound(id.to_string()).into());
        }
        let outcome = scraped.outcome;
        Ok(Response::new(CollectNowResponse {
            status: Some(keel_proto::v1::ScrapeStatus {
                up: outcome.up,
                scraped_at: Some(convert::timestamp(outcome.at)),
                duration: Some(convert::duration(outcome.duration)),
                problems: outcome.problems,
                next_scrape_at: Some(convert::timestamp(next)),
            }),
            latest: outcome.samples.iter().map(convert::metric).collect(),
        }))
    }
}
