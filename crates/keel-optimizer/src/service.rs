//! The optimizer's gRPC edge: authorise, validate, and map errors to status once.

use std::pin::Pin;
use std::time::Duration;

use futures::Stream;
use keel_auth::{Role, Scope};
use keel_proto::v1::optimizer_service_server::OptimizerService;
use keel_proto::v1::{
    AnalyzeInstanceRequest, AnalyzeInstanceResponse, ApplyRecommendationRequest,
    ApplyRecommendationResponse, Engine, ExplainStatementRequest, ExplainStatementResponse,
    GetAnalysisRequest, GetAnalysisResponse, GetRecommendationRequest, GetRecommendationResponse,
    ListRecommendationsRequest, ListRecommendationsResponse, RecommendationState,
    RollbackRecommendationRequest, RollbackRecommendationResponse,
};
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::advisor::model::{IndexDef, Key, TableName};
use crate::advisor::{self};
use crate::convert;
use crate::error::OptimizerError;
use crate::jobs::{self, Workers};
use crate::store;

/// Longest statement `ExplainStatement` takes.
const MAX_STATEMENT_BYTES: usize = 100_000;

/// The optimizer's gRPC service.
#[derive(Debug, Clone)]
pub struct Optimizer {
    workers: Workers,
}

impl Optimizer {
    pub(crate) fn new(workers: Workers) -> Self {
        Self { workers }
    }

    /// The instance, if the caller may see it.
    async fn instance(
        &self,
        scope: &Scope,
        id: Uuid,
    ) -> Result<keel_proto::v1::Instance, OptimizerError> {
        let instance = match jobs::instance(&self.workers.registry, id).await {
            Err(OptimizerError::Peer(status)) if status.code() == tonic::Code::NotFound => {
                return Err(OptimizerError::NotFound(format!("instance {id}")));
            }
            other => other?,
        };
        if !scope.covers(&instance.tenant) {
            return Err(OptimizerError::NotFound(format!("instance {id}")));
        }
        if instance.engine != Engine::Postgres as i32 {
            return Err(OptimizerError::Precondition(format!(
                "instance {} is a Redis instance; the optimizer advises PostgreSQL instances only",
                instance.name
            )));
        }
        Ok(instance)
    }
}

fn authorize<T>(request: &Request<T>, required: Role, action: &str) -> Result<Scope, Status> {
    let principal = keel_auth::principal(request)?;
    principal.require(required, action)?;
    Ok(principal.scope.clone())
}

fn parse_id(raw: &str, field: &str) -> Result<Uuid, OptimizerError> {
    if raw.is_empty() {
        return Err(OptimizerError::Invalid(format!("{field} is required")));
    }
    Uuid::parse_str(raw)
        .map_err(|_| OptimizerError::Invalid(format!("{field} {raw:?} is not a UUID")))
}

fn parse_table(raw: &str) -> Result<TableName, OptimizerError> {
    let parts: Vec<&str> = raw.split('.').collect();
    let (schema, name) = match parts.as_slice() {
        [name] => ("public", *name),
        [schema, name] => (*schema, *name),
        _ => {
            return Err(OptimizerError::Invalid(format!(
                "indexes.table {raw:?} must be `table` or `schema.table`"
            )));
        }
    };
    if schema.is_empty() || name.is_empty() {
        return Err(OptimizerError::Invalid(format!(
            "indexes.table {raw:?} must be `table` or `schema.table`"
        )));
    }
    Ok(TableName {
        schema: schema.to_owned(),
        name: name.to_owned(),
    })
}

fn parse_index(index: &keel_proto::v1::HypotheticalIndex) -> Result<IndexDef, OptimizerError> {
    let table = parse_table(&index.table)?;
    if index.columns.is_empty() || index.columns.len() > 32 {
        return Err(OptimizerError::Invalid(
            "indexes.columns must list 1 to 32 columns".into(),
        ));
    }
    let keys = index
        .columns
        .iter()
        .map(|c| {
            let (name, descending) = match c.trim().rsplit_once(' ') {
                Some((name, dir)) if dir.eq_ignore_ascii_case("desc") => (name.trim(), true),
                Some((name, dir)) if dir.eq_ignore_ascii_case("asc") => (name.trim(), false),
                _ => (c.trim(), false),
            };
            if name.is_empty() {
                return Err(OptimizerError::Invalid(
                    "indexes.columns has an empty name".into(),
                ));
            }
            Ok(Key::Column {
                name: name.to_owned(),
                descending,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(IndexDef {
        table,
        keys,
        include: index.include.clone(),
        predicate: None,
    })
}

type ProgressStream =
    Pin<Box<dyn Stream<Item = Result<AnalyzeInstanceResponse, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl OptimizerService for Optimizer {
    type AnalyzeInstanceStream = ProgressStream;

    async fn analyze_instance(
        &self,
        request: Request<AnalyzeInstanceRequest>,
    ) -> Result<Response<Self::AnalyzeInstanceStream>, Status> {
        let scope = authorize(&request, Role::Operator, "analyze instances")?;
        let req = request.into_inner();
        let id = parse_id(&req.instance_id, "instance_id")?;
        if req.budget_bytes < 0 {
            return Err(OptimizerError::Invalid(
                "budget_bytes must be 0 (10% of the data size) or more".into(),
            )
            .into());
        }
        if !(0..=50).contains(&req.max_indexes) {
            return Err(OptimizerError::Invalid("max_indexes must be 0 to 50".into()).into());
        }
        if !(0..=500).contains(&req.max_statements) {
            return Err(OptimizerError::Invalid("max_statements must be 0 to 500".into()).into());
        }
        let window = match req.window {
            None => 3600,
            Some(w) if w.seconds == 0 && w.nanos == 0 => 3600,
            Some(w) if (60..=30 * 24 * 3600).contains(&w.seconds) && w.nanos >= 0 => w.seconds,
            Some(_) => {
                return Err(OptimizerError::Invalid(
                    "window must be between 1 minute and 30 days".into(),
                )
                .into());
            }
        };
        let instance = self.instance(&scope, id).await?;
        let row = store::queue_analysis(
            &self.workers.pool,
            &instance.tenant,
            id,
            req.budget_bytes,
            if req.max_indexes == 0 {
                10
            } else {
                req.max_indexes
            },
            i32::try_from(window).unwrap_or(3600),
            if req.max_statements == 0 {
                50
            } else {
                req.max_statements
            },
        )
        .await?;
        self.workers.wake.notify_waiters();
        let (sender, receiver) = tokio::sync::mpsc::channel(16);
        let pool = self.workers.pool.clone();
        tokio::spawn(async move {
            let mut last = None;
            loop {
                let row = match store::analysis(&pool, &scope, row.id).await {
                    Ok(Some(row)) => row,
                    Ok(None) => return,
                    Err(error) => {
                        let _ = sender.send(Err(Status::from(error))).await;
                        return;
                    }
                };
                let ended = matches!(row.state.as_str(), "done" | "failed");
                let now = (
                    row.state.clone(),
                    row.phase.clone(),
                    row.message.clone(),
                    row.whatif_calls,
                );
                if last.as_ref() != Some(&now) || ended {
                    let message = AnalyzeInstanceResponse {
                        analysis_id: row.id.to_string(),
                        state: convert::analysis_state(&row.state) as i32,
                        phase: row.phase.clone(),
                        message: if ended {
                            row.error.clone().unwrap_or_else(|| "done".to_owned())
                        } else {
                            row.message.clone()
                        },
                        whatif_calls: row.whatif_calls,
                        analysis: ended.then(|| convert::analysis(&row)),
                    };
                    if sender.send(Ok(message)).await.is_err() || ended {
                        return;
                    }
                    last = Some(now);
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(receiver),
        )))
    }

    async fn get_analysis(
        &self,
        request: Request<GetAnalysisRequest>,
    ) -> Result<Response<GetAnalysisResponse>, Status> {
        let scope = authorize(&request, Role::Viewer, "read analyses")?;
        let id = parse_id(&request.get_ref().id, "id")?;
        let row = store::analysis(&self.workers.pool, &scope, id)
            .await?
            .ok_or_else(|| OptimizerError::NotFound(format!("analysis {id}")))?;
        Ok(Response::new(GetAnalysisResponse {
            analysis: Some(convert::analysis(&row)),
        }))
    }

    async fn list_recommendations(
        &self,
        request: Request<ListRecommendationsRequest>,
    ) -> Result<Response<ListRecommendationsResponse>, Status> {
        let scope = authorize(&request, Role::Viewer, "read recommendations")?;
        let req = request.into_inner();
        let instance = if req.instance_id.is_empty() {
            None
        } else {
            Some(parse_id(&req.instance_id, "instance_id")?)
        };
        let state = RecommendationState::try_from(req.state).map_err(|_| {
            OptimizerError::Invalid(format!("state {} is not a recommendation state", req.state))
        })?;
        if !(0..=500).contains(&req.limit) {
            return Err(OptimizerError::Invalid("limit must be 0 to 500".into()).into());
        }
        let limit = if req.limit == 0 { 100 } else { req.limit };
        let rows = store::recommendations(
            &self.workers.pool,
            &scope,
            instance,
            convert::state_name(state),
            i64::from(limit),
        )
        .await?;
        Ok(Response::new(ListRecommendationsResponse {
            recommendations: rows.iter().map(convert::recommendation).collect(),
        }))
    }

    async fn get_recommendation(
        &self,
        request: Request<GetRecommendationRequest>,
    ) -> Result<Response<GetRecommendationResponse>, Status> {
        let scope = authorize(&request, Role::Viewer, "read recommendations")?;
        let id = parse_id(&request.get_ref().id, "id")?;
        let row = store::recommendation(&self.workers.pool, &scope, id)
            .await?
            .ok_or_else(|| OptimizerError::NotFound(format!("recommendation {id}")))?;
        Ok(Response::new(GetRecommendationResponse {
            recommendation: Some(convert::recommendation(&row)),
        }))
    }

    async fn apply_recommendation(
        &self,
        request: Request<ApplyRecommendationRequest>,
    ) -> Result<Response<ApplyRecommendationResponse>, Status> {
        let scope = authorize(&request, Role::Operator, "apply recommendations")?;
        let id = parse_id(&request.get_ref().id, "id")?;
        let pool = &self.workers.pool;
        let row = match store::request(
            pool,
            &scope,
            id,
            &["proposed", "failed", "rolled_back"],
            "applying",
        )
        .await?
        {
            Some(row) => {
                self.workers.wake.notify_waiters();
                row
            }
            None => {
                let row = store::recommendation(pool, &scope, id)
                    .await?
                    .ok_or_else(|| OptimizerError::NotFound(format!("recommendation {id}")))?;
                if row.state == "rolling_back" {
                    return Err(OptimizerError::Precondition(
                        "the recommendation is being rolled back; apply it again once that ends"
                            .into(),
                    )
                    .into());
                }
                // Applying or applied already: the same answer as the first request.
                row
            }
        };
        Ok(Response::new(ApplyRecommendationResponse {
            recommendation: Some(convert::recommendation(&row)),
        }))
    }

    async fn rollback_recommendation(
        &self,
        request: Request<RollbackRecommendationRequest>,
    ) -> Result<Response<RollbackRecommendationResponse>, Status> {
        let scope = authorize(&request, Role::Operator, "roll back recommendations")?;
        let id = parse_id(&request.get_ref().id, "id")?;
        let pool = &self.workers.pool;
        let row = match store::request(pool, &scope, id, &["applied"], "rolling_back").await? {
            Some(row) => {
                self.workers.wake.notify_waiters();
                row
            }
            None => {
                let row = store::recommendation(pool, &scope, id)
                    .await?
                    .ok_or_else(|| OptimizerError::NotFound(format!("recommendation {id}")))?;
                if !matches!(row.state.as_str(), "rolling_back" | "rolled_back") {
                    return Err(OptimizerError::Precondition(format!(
                        "the recommendation is {}; only an applied one can be rolled back",
                        row.state.replace('_', " ")
                    ))
                    .into());
                }
                row
            }
        };
        Ok(Response::new(RollbackRecommendationResponse {
            recommendation: Some(convert::recommendation(&row)),
        }))
    }

    async fn explain_statement(
        &self,
        request: Request<ExplainStatementRequest>,
    ) -> Result<Response<ExplainStatementResponse>, Status> {
        let scope = authorize(&request, Role::Operator, "plan statements on instances")?;
        let req = request.into_inner();
        let id = parse_id(&req.instance_id, "instance_id")?;
        if req.statement.trim().is_empty() {
            return Err(OptimizerError::Invalid("statement is required".into()).into());
        }
        if req.statement.len() > MAX_STATEMENT_BYTES {
            return Err(OptimizerError::Invalid(format!(
                "statement is {} bytes; at most {MAX_STATEMENT_BYTES}",
                req.statement.len()
            ))
            .into());
        }
        if req.indexes.len() > 20 {
            return Err(OptimizerError::Invalid("at most 20 indexes".into()).into());
        }
        let indexes = req
            .indexes
            .iter()
            .map(parse_index)
            .collect::<Result<Vec<_>, _>>()?;
        self.instance(&scope, id).await?;
        let mut conn = self.workers.connect(id).await?;
        let (planning, outcome) = advisor::explain(&mut conn, &req.statement, &indexes)
            .await
            .map_err(OptimizerError::from)?;
        let (before, after) = outcome.map_err(|reason| {
            OptimizerError::Invalid(format!("the statement cannot be planned: {reason}"))
        })?;
        let none = |_: &str| None;
        Ok(Response::new(ExplainStatementResponse {
            planning: planning.map(|p| p.describe()).unwrap_or_default(),
            cost_before: before.cost,
            cost_after: after.cost,
            plan_before: before.shape(&none),
            plan_after: after.shape(&none),
        }))
    }
}
