//! Rows to messages.

use chrono::{DateTime, Utc};
use keel_proto::v1::{
    Analysis, AnalysisState, Recommendation, RecommendationKind, RecommendationState,
    StatementEffect, StatementOutcome,
};

use crate::store::{AnalysisRow, RecommendationRow};

pub(crate) fn timestamp(at: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: at.timestamp(),
        nanos: i32::try_from(at.timestamp_subsec_nanos()).unwrap_or(0),
    }
}

pub(crate) fn kind(kind: &str) -> RecommendationKind {
    match kind {
        "create_index" => RecommendationKind::CreateIndex,
        "drop_index" => RecommendationKind::DropIndex,
        _ => RecommendationKind::Unspecified,
    }
}

pub(crate) fn state(state: &str) -> RecommendationState {
    match state {
        "proposed" => RecommendationState::Proposed,
        "applying" => RecommendationState::Applying,
        "applied" => RecommendationState::Applied,
        "rolling_back" => RecommendationState::RollingBack,
        "rolled_back" => RecommendationState::RolledBack,
        "failed" => RecommendationState::Failed,
        _ => RecommendationState::Unspecified,
    }
}

/// The stored name of a state filter.
pub(crate) fn state_name(state: RecommendationState) -> Option<&'static str> {
    Some(match state {
        RecommendationState::Unspecified => return None,
        RecommendationState::Proposed => "proposed",
        RecommendationState::Applying => "applying",
        RecommendationState::Applied => "applied",
        RecommendationState::RollingBack => "rolling_back",
        RecommendationState::RolledBack => "rolled_back",
        RecommendationState::Failed => "failed",
    })
}

pub(crate) fn analysis_state(state: &str) -> AnalysisState {
    match state {
        "queued" => AnalysisState::Queued,
        "running" => AnalysisState::Running,
        "done" => AnalysisState::Done,
        "failed" => AnalysisState::Failed,
        _ => AnalysisState::Unspecified,
    }
}

pub(crate) fn recommendation(row: &RecommendationRow) -> Recommendation {
    Recommendation {
        id: row.id.to_string(),
        instance_id: row.instance_id.to_string(),
        analysis_id: row.analysis_id.to_string(),
        kind: kind(&row.kind) as i32,
        state: state(&row.state) as i32,
        state_reason: row.state_reason.clone(),
        table: row.table_name.clone(),
        index_name: row.index_name.clone(),
        ddl: row.ddl.clone(),
        rollback_ddl: row.rollback_ddl.clone(),
        estimated_bytes: row.estimated_bytes,
        hypopg_bytes: row.hypopg_bytes,
        built_bytes: row.built_bytes,
        write_cost: row.write_cost,
        benefit: row.benefit,
        share_of_time: row.share_of_time,
        effects: row
            .effects
            .0
            .iter()
            .map(|e| StatementEffect {
                query_id: e.query_id,
                text: e.text.clone(),
                cost_before: e.cost_before,
                cost_after: e.cost_after,
                plan_before: e.plan_before.clone(),
                plan_after: e.plan_after.clone(),
                share_of_time: e.share_of_time,
                measured_cost_before: e.measured_cost_before.unwrap_or(0.0),
                measured_cost_after: e.measured_cost_after.unwrap_or(0.0),
            })
            .collect(),
        explanation: row.explanation.clone(),
        version: row.version,
        created_at: Some(timestamp(row.created_at)),
        updated_at: Some(timestamp(row.updated_at)),
    }
}

pub(crate) fn analysis(row: &AnalysisRow) -> Analysis {
    let result = row.result.as_ref().map(|r| &r.0);
    Analysis {
        id: row.id.to_string(),
        instance_id: row.instance_id.to_string(),
        state: analysis_state(&row.state) as i32,
        error: row.error.clone().unwrap_or_default(),
        budget_bytes: result.map_or(row.budget_bytes, |r| r.budget_bytes),
        max_indexes: row.max_indexes,
        workload_source: result
            .map(|r| r.workload_source.clone())
            .unwrap_or_default(),
        statements: result
            .map(|r| {
                r.statements
                    .iter()
                    .map(|s| StatementOutcome {
                        query_id: s.query_id,
                        text: s.text.clone(),
                        calls: s.calls,
                        share_of_time: s.share_of_time,
                        planning: s.planning.clone(),
                        problem: s.problem.clone(),
                        cost_before: s.cost_before,
                        cost_after: s.cost_after,
                        plan_before: s.plan_before.clone(),
                        plan_after: s.plan_after.clone(),
                    })
                    .collect()
            })
            .unwrap_or_default(),
        recommendation_ids: result
            .map(|r| {
                r.recommendation_ids
                    .iter()
                    .map(ToString::to_string)
                    .collect()
            })
            .unwrap_or_default(),
        whatif_calls: result.map_or(row.whatif_calls, |r| {
            i64::try_from(r.whatif_calls).unwrap_or(i64::MAX)
        }),
        cache_hits: result.map_or(0, |r| i64::try_from(r.cache_hits).unwrap_or(i64::MAX)),
        elapsed: result.map(|r| prost_types::Duration {
            seconds: i64::try_from(r.elapsed_ms / 1000).unwrap_or(i64::MAX),
            nanos: i32::try_from((r.elapsed_ms % 1000) * 1_000_000).unwrap_or(0),
        }),
        created_at: Some(timestamp(row.created_at)),
        finished_at: row.finished_at.map(timestamp),
        problems: result.map(|r| r.problems.clone()).unwrap_or_default(),
    }
}
