//! Shared work, claimed by whichever replica is free: analyses (queued rows, or running ones
//! whose runner's lease lapsed) and applies/rollbacks in flight. A claim is a lease the holder
//! renews while it works; a killed replica's work is claimed again once its lease lapses.

use std::sync::Arc;

use keel_bus::{Outbox, SubjectRoot};
use keel_fleet::FleetChannel;
use keel_proto::v1::collector_service_client::CollectorServiceClient;
use keel_proto::v1::registry_service_client::RegistryServiceClient;
use keel_proto::v1::{Engine, GetInstanceConnectionRequest, GetInstanceRequest, Instance};
use keel_target::Connector;
use secrecy::{ExposeSecret as _, SecretString};
use sqlx::{PgConnection, PgPool};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::OptimizerConfig;
use crate::advisor::model::{IndexDef, Key, quote_ident};
use crate::advisor::{self, Advice, Progress, Settings};
use crate::apply::{self, DdlLimits, Outcome};
use crate::error::OptimizerError;
use crate::events;
use crate::store::{
    self, AnalysisResult, AnalysisRow, EffectRecord, NewRecommendation, RecommendationRow,
    StatementRecord,
};
use crate::workload::{self, Workload};

/// What the workers need; cheap to clone.
#[derive(Clone, Debug)]
pub(crate) struct Workers {
    pub(crate) pool: PgPool,
    pub(crate) registry: RegistryServiceClient<FleetChannel>,
    pub(crate) collector: Option<CollectorServiceClient<FleetChannel>>,
    pub(crate) connector: Connector,
    pub(crate) config: OptimizerConfig,
    pub(crate) outbox: Outbox,
    pub(crate) subjects: SubjectRoot,
    pub(crate) wake: Arc<Notify>,
}

/// An instance of any tenant, through the fleet identity.
pub(crate) async fn instance(
    registry: &RegistryServiceClient<FleetChannel>,
    id: Uuid,
) -> Result<Instance, OptimizerError> {
    let mut client = registry.clone();
    client
        .get_instance(GetInstanceRequest {
            id: id.to_string(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .instance
        .ok_or_else(|| OptimizerError::NotFound(format!("instance {id}")))
}

impl Workers {
    pub(crate) async fn connect(&self, id: Uuid) -> Result<PgConnection, OptimizerError> {
        let instance = instance(&self.registry, id).await?;
        if instance.engine != Engine::Postgres as i32 {
            return Err(OptimizerError::Precondition(format!(
                "instance {} is not a PostgreSQL instance",
                instance.name
            )));
        }
        let mut client = self.registry.clone();
        let url: SecretString = client
            .get_instance_connection(GetInstanceConnectionRequest { id: id.to_string() })
            .await?
            .into_inner()
            .connection_url
            .into();
        self.connector
            .connect_postgres(url.expose_secret())
            .await
            .map_err(|e| OptimizerError::Target(format!("cannot connect to the instance: {e}")))
    }

    /// Runs analyses until `stop`.
    pub(crate) async fn analyses(self, stop: CancellationToken) {
        loop {
            match store::claim_analysis(&self.pool, self.config.lease).await {
                Ok(Some(row)) => {
                    self.analyze(row).await;
                    continue;
                }
                Ok(None) => {}
                Err(error) => tracing::warn!(%error, "cannot claim an analysis"),
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = self.wake.notified() => {}
                () = tokio::time::sleep(self.config.poll_interval) => {}
            }
        }
    }

    async fn analyze(&self, row: AnalysisRow) {
        if row.attempts > 3 {
            let _ = store::fail_analysis(
                &self.pool,
                row.id,
                row.attempts,
                "the analysis was interrupted three times (its runner stopped); queue a new one",
            )
            .await;
            return;
        }
        let (sender, progress) = watch::channel(Progress {
            phase: "workload",
            message: "reading the workload".to_owned(),
            whatif_calls: 0,
        });
        let work = self.analysis_work(&row, sender);
        tokio::pin!(work);
        let mut beat = tokio::time::interval(self.config.lease / 4);
        let outcome = loop {
            tokio::select! {
                outcome = &mut work => break outcome,
                _ = beat.tick() => {
                    let now = progress.borrow().clone();
                    let calls = i64::try_from(now.whatif_calls).unwrap_or(i64::MAX);
                    match store::analysis_progress(&self.pool, row.id, row.attempts, self.config.lease, now.phase, &now.message, calls).await {
                        Ok(true) => {}
                        // Lost the claim (it lapsed and another replica took it): stop here.
                        Ok(false) => return,
                        Err(error) => tracing::warn!(%error, "cannot record analysis progress"),
                    }
                }
            }
        };
        let failed = match outcome {
            Ok((result, recommendations)) => {
                match store::finish_analysis(
                    &self.pool,
                    &self.outbox,
                    &self.subjects,
                    &row,
                    result,
                    recommendations,
                )
                .await
                {
                    Ok(_) => return,
                    Err(error) => error,
                }
            }
            Err(error) => error,
        };
        let message = match &failed {
            OptimizerError::Database(_) | OptimizerError::Bus(_) | OptimizerError::Subject(_) => {
                tracing::error!(error = %failed, analysis = %row.id, "analysis failed");
                "internal error; the server log has the details".to_owned()
            }
            other => other.to_string(),
        };
        let _ = store::fail_analysis(&self.pool, row.id, row.attempts, &message).await;
    }

    async fn analysis_work(
        &self,
        row: &AnalysisRow,
        progress: watch::Sender<Progress>,
    ) -> Result<(AnalysisResult, Vec<NewRecommendation>), OptimizerError> {
        let mut conn = self.connect(row.instance_id).await?;
        let collected = match &self.collector {
            Some(collector) => {
                workload::from_collector(
                    collector,
                    row.instance_id,
                    row.window_seconds,
                    row.max_statements,
                )
                .await
            }
            None => None,
        };
        let Workload {
            statements,
            source,
            mut problems,
        } = match collected {
            Some(workload) => workload,
            None => workload::from_pg_stat_statements(&mut conn, row.max_statements)
                .await
                .map_err(advisor::AdvisorError::from)?,
        };
        let (data_bytes, stats_age): (i64, f64) = sqlx::query_as(
            "/* keel-optimizer */ SELECT \
               coalesce((SELECT sum(c.relpages)::int8 * 8192 FROM pg_class c \
                         JOIN pg_namespace n ON n.oid = c.relnamespace \
                         WHERE c.relkind IN ('r', 'm') \
                           AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
                           AND n.nspname NOT LIKE 'pg_toast%'), 0), \
               extract(epoch FROM now() - coalesce( \
                 (SELECT stats_reset FROM pg_stat_database WHERE datname = current_database()), \
                 pg_postmaster_start_time()))::float8",
        )
        .fetch_one(&mut conn)
        .await
        .map_err(advisor::AdvisorError::from)?;
        let budget_bytes = if row.budget_bytes > 0 {
            row.budget_bytes
        } else {
            (data_bytes / 10).max(8 << 20)
        };
        let settings = Settings {
            budget_bytes,
            max_indexes: usize::try_from(row.max_indexes).unwrap_or(10),
            write_cost_per_row: self.config.write_cost_per_row,
            counters_share: (source == "collector" && stats_age > 0.0)
                .then(|| (f64::from(row.window_seconds) / stats_age).min(1.0)),
        };
        let tell = move |p: Progress| {
            let _ = progress.send(p);
        };
        let advice = if statements.is_empty() {
            problems.push(
                "no workload: the instance has run no statements the optimizer can see in the window"
                    .to_owned(),
            );
            None
        } else {
            Some(advisor::advise_with_progress(&mut conn, &statements, &settings, &tell).await?)
        };
        Ok(build_result(source, problems, budget_bytes, advice))
    }

    /// Runs applies and rollbacks until `stop`.
    pub(crate) async fn applies(self, stop: CancellationToken) {
        loop {
            match store::claim_in_flight(&self.pool, self.config.lease).await {
                Ok(Some(row)) => {
                    self.apply(row).await;
                    continue;
                }
                Ok(None) => {}
                Err(error) => tracing::warn!(%error, "cannot claim an apply"),
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = self.wake.notified() => {}
                () = tokio::time::sleep(self.config.poll_interval) => {}
            }
        }
    }

    async fn apply(&self, row: RecommendationRow) {
        let limits = DdlLimits {
            build_timeout: self.config.build_timeout,
            lock_timeout: self.config.lock_timeout,
        };
        let work = async {
            let mut conn = self.connect(row.instance_id).await?;
            Ok::<_, OptimizerError>(apply::run(&mut conn, &row, limits).await?)
        };
        tokio::pin!(work);
        let mut beat = tokio::time::interval(self.config.lease / 4);
        let outcome = loop {
            tokio::select! {
                outcome = &mut work => break outcome,
                _ = beat.tick() => {
                    if let Ok(false) = store::renew(&self.pool, row.id, row.version, self.config.lease).await {
                        // Someone else holds it now; dropping `work` closes our session.
                        return;
                    }
                }
            }
        };
        let applying = row.state == "applying";
        let mut leftover = false;
        let (state, reason, built, effects, kind) = match outcome {
            Ok(Outcome::Done {
                reason,
                built_bytes,
                effects,
            }) => (
                if applying { "applied" } else { "rolled_back" },
                reason,
                built_bytes,
                effects,
                Some(if applying {
                    &events::APPLIED
                } else {
                    &events::ROLLED_BACK
                }),
            ),
            Ok(Outcome::Failed {
                reason,
                leftover: left,
            }) => {
                leftover = left;
                ("failed", reason, None, None, Some(&events::FAILED))
            }
            Ok(Outcome::Cleaned) => {
                let reason = format!("{}; the invalid index it left is dropped", row.state_reason);
                ("failed", reason, None, None, None)
            }
            Ok(Outcome::Retry(reason)) => {
                tracing::info!(recommendation = %row.id, %reason, "apply deferred");
                return;
            }
            Err(OptimizerError::Target(reason)) if row.state != "failed" => {
                ("failed", reason, None, None, Some(&events::FAILED))
            }
            Err(error) => {
                // The instance or a peer is unreachable: the lease lapses and it is tried again.
                tracing::warn!(recommendation = %row.id, %error, "apply interrupted; will retry");
                return;
            }
        };
        if let Err(error) = store::settle(
            &self.pool,
            &self.outbox,
            &self.subjects,
            &row,
            state,
            &reason,
            built,
            effects.as_deref(),
            leftover,
            kind,
        )
        .await
        {
            tracing::error!(recommendation = %row.id, %error, "cannot record the apply's outcome");
        }
    }
}

/// The index name of a recommendation: readable, unique per recommendation, at most 63 bytes.
pub(crate) fn index_name(def: &IndexDef, id: Uuid) -> String {
    let mut parts = vec![def.table.name.clone()];
    for key in &def.keys {
        match key {
            Key::Column { name, .. } => parts.push(name.clone()),
            Key::Expression { columns, .. } => parts.extend(columns.iter().cloned()),
        }
    }
    let stem: String = parts
        .join("_")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .take(44)
        .collect();
    let simple = id.simple().to_string();
    let tail = &simple[simple.len() - 8..];
    format!("keel_{stem}_{tail}")
}

fn build_result(
    source: String,
    problems: Vec<String>,
    budget_bytes: i64,
    advice: Option<Advice>,
) -> (AnalysisResult, Vec<NewRecommendation>) {
    let mut result = AnalysisResult {
        workload_source: source,
        problems,
        budget_bytes,
        ..AnalysisResult::default()
    };
    let Some(advice) = advice else {
        return (result, Vec::new());
    };
    result.whatif_calls = advice.whatif_calls;
    result.cache_hits = advice.cache_hits;
    result.elapsed_ms = u64::try_from(advice.elapsed.as_millis()).unwrap_or(u64::MAX);
    result.statements = advice
        .statements
        .iter()
        .map(|s| StatementRecord {
            query_id: s.query_id,
            text: s.text.clone(),
            calls: s.calls,
            share_of_time: s.share_of_time,
            planning: s
                .planning
                .as_ref()
                .map(|p| p.describe())
                .unwrap_or_default(),
            problem: s.problem.clone().unwrap_or_default(),
            cost_before: s.cost_before.unwrap_or(0.0),
            cost_after: s.cost_after.unwrap_or(0.0),
            plan_before: s.plan_before.clone(),
            plan_after: s.plan_after.clone(),
        })
        .collect();
    let mut out = Vec::new();
    for rec in &advice.recommendations {
        let id = Uuid::now_v7();
        let name = index_name(&rec.index, id);
        let effects = rec
            .effects
            .iter()
            .map(|e| {
                let report = advice.statements.iter().find(|s| s.query_id == e.query_id);
                EffectRecord {
                    query_id: e.query_id,
                    text: e.text.clone(),
                    cost_before: e.cost_before,
                    cost_after: e.cost_after,
                    plan_before: e.plan_before.clone(),
                    plan_after: e.plan_after.clone(),
                    share_of_time: e.share_of_time,
                    values: report.and_then(|r| match &r.planning {
                        Some(advisor::whatif::Planning::Sampled(values)) => Some(values.clone()),
                        _ => None,
                    }),
                    param_count: report.map_or(0, |r| r.param_count),
                    ..EffectRecord::default()
                }
            })
            .collect();
        out.push(NewRecommendation {
            id,
            kind: "create_index",
            table_name: rec.index.table.sql(),
            index_schema: rec.index.table.schema.clone(),
            index_name: name.clone(),
            ddl: rec.index.create_ddl(&name),
            rollback_ddl: format!(
                "DROP INDEX CONCURRENTLY IF EXISTS {}.{}",
                quote_ident(&rec.index.table.schema),
                quote_ident(&name)
            ),
            estimated_bytes: rec.estimated_bytes,
            hypopg_bytes: rec.hypopg_bytes.unwrap_or(0),
            write_cost: rec.write_cost,
            benefit: rec.benefit,
            share_of_time: rec.share_of_time,
            effects,
            explanation: rec.explanation.clone(),
        });
    }
    for drop in &advice.drops {
        out.push(NewRecommendation {
            id: Uuid::now_v7(),
            kind: "drop_index",
            table_name: drop.table.sql(),
            index_schema: drop.table.schema.clone(),
            index_name: drop.index.clone(),
            ddl: format!(
                "DROP INDEX CONCURRENTLY {}.{}",
                quote_ident(&drop.table.schema),
                quote_ident(&drop.index)
            ),
            rollback_ddl: drop
                .ddl
                .replacen("CREATE INDEX ", "CREATE INDEX CONCURRENTLY ", 1),
            estimated_bytes: drop.size_bytes,
            hypopg_bytes: 0,
            write_cost: drop.write_cost,
            benefit: drop.write_cost,
            share_of_time: 0.0,
            effects: Vec::new(),
            explanation: drop.explanation.clone(),
        });
    }
    (result, out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::advisor::model::TableName;

    #[test]
    fn index_names_are_short_and_unique_per_recommendation() {
        let table = TableName {
            schema: "public".into(),
            name: "Orders With A Very Long Name Indeed That Goes On".into(),
        };
        let def = IndexDef::on(table, &["account_id", "created_at"]);
        let a = index_name(&def, Uuid::now_v7());
        let b = index_name(&def, Uuid::now_v7());
        assert!(a.len() <= 63, "{a}");
        assert_ne!(a, b);
        assert!(a.starts_with("keel_orders_with_a_very_long"));
    }
}
