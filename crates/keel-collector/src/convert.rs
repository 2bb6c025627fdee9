//! Conversions between stored rows and API messages.

use std::time::Duration;

use chrono::{DateTime, Utc};
use keel_proto::v1::{Alert, AlertState, Metric, ScrapeStatus};

use crate::catalog::Sample;
use crate::store::{AlertRow, TargetView};

pub(crate) fn timestamp(at: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: at.timestamp(),
        nanos: i32::try_from(at.timestamp_subsec_nanos()).unwrap_or(0),
    }
}

pub(crate) fn duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

pub(crate) fn alert(row: &AlertRow) -> Alert {
    let state = match row.state.as_str() {
        "pending" => AlertState::Pending,
        "firing" => AlertState::Firing,
        _ => AlertState::Resolved,
    };
    Alert {
        fingerprint: row.fingerprint.clone(),
        rule: row.rule.clone(),
        tenant: row.tenant.clone(),
        instance_id: row.instance_id.to_string(),
        instance_name: row.instance_name.clone(),
        state: state as i32,
        labels: row.labels.clone().into_iter().collect(),
        annotations: row.annotations.clone().into_iter().collect(),
        value: row.value,
        threshold: row.threshold,
        active_since: Some(timestamp(row.active_since)),
        fired_at: row.fired_at.map(timestamp),
        resolved_at: row.resolved_at.map(timestamp),
    }
}

pub(crate) fn metric(sample: &Sample) -> Metric {
    Metric {
        name: sample.name.clone(),
        labels: sample.labels.iter().cloned().collect(),
        value: sample.value,
    }
}

pub(crate) fn status(view: &TargetView) -> ScrapeStatus {
    ScrapeStatus {
        up: view.up.unwrap_or(false),
        scraped_at: view.scraped_at.map(timestamp),
        duration: view
            .duration_ms
            .map(|ms| duration(Duration::from_secs_f64((ms / 1e3).max(0.0)))),
        problems: view.problems.clone(),
        next_scrape_at: Some(timestamp(view.next_run_at)),
    }
}
