//! The built-in alert rules, the operator's overrides, and when an alert changes state.
//!
//! A rule compares one metric of a target's latest scrape with a threshold. The condition must
//! hold for the rule's `for` duration before the alert fires (until then it is pending); when it
//! stops holding a firing alert resolves and a pending one is forgotten. A metric the scrape did
//! not produce (the target was down, or the feature is off) leaves the alert as it was: missing
//! data is not recovery.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use crate::catalog::{self as c, Sample};

/// Which engine a rule watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineFilter {
    /// PostgreSQL instances.
    Postgres,
    /// Redis instances.
    Redis,
    /// Every instance.
    Any,
}

/// Which side of the threshold is bad.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// The value is bad above the threshold.
    Above,
    /// The value is bad below the threshold.
    Below,
}

/// One alert rule.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    /// Alert name, such as `PostgresLongRunningQuery`.
    pub name: &'static str,
    /// The engine it applies to.
    pub engine: EngineFilter,
    /// The metric it reads (a family without labels).
    pub metric: &'static str,
    /// Which side of the threshold fires.
    pub op: Op,
    /// The threshold.
    pub threshold: f64,
    /// How long the condition must hold before the alert fires.
    pub for_: Duration,
    /// `critical`, `warning` or `info`.
    pub severity: &'static str,
    /// What it means, with `{value}` and `{threshold}` filled in.
    pub summary: &'static str,
}

/// The rules Keel ships with. Thresholds follow common operator practice; override them per
/// label selector (see [`Override`]).
pub fn builtin() -> Vec<Rule> {
    use EngineFilter::{Any, Postgres, Redis};
    use Op::{Above, Below};
    let m = |minutes: u64| Duration::from_secs(minutes * 60);
    vec![
        Rule {
            name: "KeelTargetDown",
            engine: Any,
            metric: c::UP,
            op: Below,
            threshold: 1.0,
            for_: m(1),
            severity: "critical",
            summary: "The collector cannot reach the instance",
        },
        Rule {
            name: "PostgresConnectionsNearMax",
            engine: Postgres,
            metric: c::PG_CONNECTIONS_RATIO,
            op: Above,
            threshold: 0.8,
            for_: m(2),
            severity: "warning",
            summary: "{value} of max_connections in use (threshold {threshold}); new sessions will soon be refused",
        },
        Rule {
            name: "PostgresLongRunningQuery",
            engine: Postgres,
            metric: c::PG_LONGEST_QUERY,
            op: Above,
            threshold: 300.0,
            for_: Duration::ZERO,
            severity: "warning",
            summary: "A query has been running for {value} s (threshold {threshold} s)",
        },
        Rule {
            name: "PostgresIdleInTransaction",
            engine: Postgres,
            metric: c::PG_OLDEST_IDLE_TX,
            op: Above,
            threshold: 300.0,
            for_: Duration::ZERO,
            severity: "warning",
            summary: "A session has been idle in a transaction for {value} s (threshold {threshold} s), holding its locks and holding back vacuum",
        },
        Rule {
            name: "PostgresBlockedSessions",
            engine: Postgres,
            metric: c::PG_BLOCKED,
            op: Above,
            threshold: 0.0,
            for_: m(1),
            severity: "warning",
            summary: "{value} sessions are blocked by another session's lock",
        },
        Rule {
            name: "PostgresReplicationLag",
            engine: Postgres,
            metric: c::PG_REPLICATION_LAG,
            op: Above,
            threshold: 30.0,
            for_: m(2),
            severity: "warning",
            summary: "Replication lags by {value} s (threshold {threshold} s)",
        },
        Rule {
            name: "PostgresCacheHitRatioLow",
            engine: Postgres,
            metric: c::PG_CACHE_HIT_RATIO,
            op: Below,
            threshold: 0.9,
            for_: m(10),
            severity: "info",
            summary: "Only {value} of block reads come from shared buffers (threshold {threshold})",
        },
        Rule {
            name: "PostgresDeadTuplesHigh",
            engine: Postgres,
            metric: c::PG_DEAD_TUPLE_RATIO_MAX,
            op: Above,
            threshold: 0.2,
            for_: m(30),
            severity: "info",
            summary: "A table holds {value} dead tuples (threshold {threshold}); autovacuum is not keeping up",
        },
        Rule {
            name: "RedisMemoryNearMax",
            engine: Redis,
            metric: c::REDIS_MEMORY_RATIO,
            op: Above,
            threshold: 0.9,
            for_: m(2),
            severity: "warning",
            summary: "{value} of maxmemory in use (threshold {threshold})",
        },
        Rule {
            name: "RedisEvictions",
            engine: Redis,
            metric: c::REDIS_EVICTIONS_RATE,
            op: Above,
            threshold: 0.0,
            for_: m(1),
            severity: "warning",
            summary: "Redis evicts {value} keys per second because of maxmemory",
        },
        Rule {
            name: "RedisRejectedConnections",
            engine: Redis,
            metric: c::REDIS_REJECTED_RATE,
            op: Above,
            threshold: 0.0,
            for_: Duration::ZERO,
            severity: "warning",
            summary: "Redis refuses {value} connections per second (maxclients reached)",
        },
    ]
}

/// An operator's change to a built-in rule for the instances whose labels match.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Override {
    /// The rule's name.
    pub rule: String,
    /// Instance labels that must all be equal for the override to apply (`tenant` and
    /// `instance` match the tenant and the instance name); empty matches every instance.
    #[serde(default, rename = "match")]
    pub match_labels: BTreeMap<String, String>,
    /// A new threshold.
    #[serde(default)]
    pub threshold: Option<f64>,
    /// A new `for` duration, such as `5m`.
    #[serde(default, rename = "for")]
    pub for_: Option<String>,
    /// Turns the rule off.
    #[serde(default)]
    pub disabled: bool,
}

/// Why the rules file was refused.
#[derive(Debug, thiserror::Error)]
#[error("alert rule overrides, entry {index} ({rule}): {reason}")]
pub struct RulesError {
    index: usize,
    rule: String,
    reason: String,
}

/// The rules in force: the built-in ones and the overrides, later overrides winning.
#[derive(Debug, Clone)]
pub struct Rules {
    rules: Vec<Rule>,
    overrides: Vec<(Override, Option<Duration>)>,
}

impl Default for Rules {
    fn default() -> Self {
        Self {
            rules: builtin(),
            overrides: Vec::new(),
        }
    }
}

impl Rules {
    /// The built-in rules with `overrides`, each checked: the rule must exist, the threshold
    /// be a number and the duration parse.
    pub fn with_overrides(overrides: Vec<Override>) -> Result<Self, RulesError> {
        let rules = builtin();
        let mut checked = Vec::with_capacity(overrides.len());
        for (index, o) in overrides.into_iter().enumerate() {
            let fail = |reason: String| RulesError {
                index,
                rule: o.rule.clone(),
                reason,
            };
            if !rules.iter().any(|r| r.name == o.rule) {
                let names: Vec<_> = rules.iter().map(|r| r.name).collect();
                return Err(fail(format!(
                    "no such rule; the rules are {}",
                    names.join(", ")
                )));
            }
            if o.threshold.is_some_and(|t| !t.is_finite()) {
                return Err(fail("threshold must be a finite number".into()));
            }
            let for_ = o
                .for_
                .as_deref()
                .map(keel_config::parse_duration)
                .transpose()
                .map_err(|e| fail(format!("for: {e}")))?;
            checked.push((o, for_));
        }
        Ok(Self {
            rules,
            overrides: checked,
        })
    }

    /// The rules for a target of `engine` with `labels` (its instance labels plus `tenant` and
    /// `instance`), overrides applied, disabled ones left out.
    pub fn for_target(&self, postgres: bool, labels: &BTreeMap<String, String>) -> Vec<Rule> {
        let mut out = Vec::new();
        for rule in &self.rules {
            let applies = match rule.engine {
                EngineFilter::Any => true,
                EngineFilter::Postgres => postgres,
                EngineFilter::Redis => !postgres,
            };
            if !applies {
                continue;
            }
            let mut rule = rule.clone();
            let mut disabled = false;
            for (o, for_) in &self.overrides {
                let matches = o.rule == rule.name
                    && o.match_labels.iter().all(|(k, v)| labels.get(k) == Some(v));
                if matches {
                    if let Some(t) = o.threshold {
                        rule.threshold = t;
                    }
                    if let Some(f) = for_ {
                        rule.for_ = *f;
                    }
                    disabled = o.disabled;
                }
            }
            if !disabled {
                out.push(rule);
            }
        }
        out
    }
}

/// Whether a rule's condition holds on a scrape.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Condition {
    /// It holds, with this value.
    Holds(f64),
    /// It does not, with this value.
    Clear(f64),
    /// The scrape has no value for it.
    Unknown,
}

/// The condition of `rule` on `samples`.
pub fn condition(rule: &Rule, samples: &[Sample]) -> Condition {
    match Sample::find(samples, rule.metric) {
        None => Condition::Unknown,
        Some(v) => {
            let bad = match rule.op {
                Op::Above => v > rule.threshold,
                Op::Below => v < rule.threshold,
            };
            if bad {
                Condition::Holds(v)
            } else {
                Condition::Clear(v)
            }
        }
    }
}

/// An alert's state as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Active {
    /// Holding, not yet for long enough.
    Pending {
        /// How long it has held.
        held_for: Duration,
    },
    /// Firing.
    Firing,
}

/// What to do with an alert after an evaluation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// Nothing changes (beyond the value).
    Stay,
    /// The condition started holding: record it as pending.
    Pend,
    /// Start firing (an event).
    Fire,
    /// Forget a pending alert that stopped holding (no event: it never fired).
    Forget,
    /// Resolve a firing alert (an event).
    Resolve,
}

/// The transition of an alert in state `active` whose condition is `condition` under `rule`.
pub fn transition(active: Option<Active>, condition: Condition, for_: Duration) -> Transition {
    match (active, condition) {
        (_, Condition::Unknown) => Transition::Stay,
        (None, Condition::Holds(_)) if for_.is_zero() => Transition::Fire,
        (None, Condition::Holds(_)) => Transition::Pend,
        (None, Condition::Clear(_)) => Transition::Stay,
        (Some(Active::Pending { held_for }), Condition::Holds(_)) if held_for >= for_ => {
            Transition::Fire
        }
        (Some(Active::Pending { .. }), Condition::Holds(_)) => Transition::Stay,
        (Some(Active::Pending { .. }), Condition::Clear(_)) => Transition::Forget,
        (Some(Active::Firing), Condition::Holds(_)) => Transition::Stay,
        (Some(Active::Firing), Condition::Clear(_)) => Transition::Resolve,
    }
}

/// `summary` with `{value}` and `{threshold}` filled in, in a readable precision.
pub fn describe(rule: &Rule, value: f64) -> String {
    let show = |v: f64| {
        if v.fract() == 0.0 && v.abs() < 1e15 {
            format!("{v:.0}")
        } else if v.abs() < 10.0 {
            format!("{v:.2}")
        } else {
            format!("{v:.1}")
        }
    };
    rule.summary
        .replace("{value}", &show(value))
        .replace("{threshold}", &show(rule.threshold))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect()
    }

    #[test]
    fn alerts_pend_then_fire_then_resolve() {
        let five = Duration::from_secs(300);
        assert_eq!(
            transition(None, Condition::Holds(1.0), five),
            Transition::Pend
        );
        assert_eq!(
            transition(None, Condition::Holds(1.0), Duration::ZERO),
            Transition::Fire
        );
        let pending = |s| {
            Some(Active::Pending {
                held_for: Duration::from_secs(s),
            })
        };
        assert_eq!(
            transition(pending(10), Condition::Holds(1.0), five),
            Transition::Stay
        );
        assert_eq!(
            transition(pending(300), Condition::Holds(1.0), five),
            Transition::Fire
        );
        assert_eq!(
            transition(pending(10), Condition::Clear(0.0), five),
            Transition::Forget
        );
        assert_eq!(
            transition(Some(Active::Firing), Condition::Clear(0.0), five),
            Transition::Resolve
        );
        assert_eq!(
            transition(Some(Active::Firing), Condition::Unknown, five),
            Transition::Stay
        );
        assert_eq!(
            transition(None, Condition::Clear(0.0), five),
            Transition::Stay
        );
    }

    #[test]
    fn overrides_apply_to_matching_instances_only() {
        let rules = Rules::with_overrides(vec![
            Override {
                rule: "PostgresLongRunningQuery".into(),
                match_labels: labels(&[("env", "batch")]),
                threshold: Some(3600.0),
                for_: Some("1m".into()),
                disabled: false,
            },
            Override {
                rule: "PostgresCacheHitRatioLow".into(),
                match_labels: BTreeMap::new(),
                threshold: None,
                for_: None,
                disabled: true,
            },
        ])
        .expect("valid overrides");
        let batch = rules.for_target(true, &labels(&[("env", "batch")]));
        let long = batch
            .iter()
            .find(|r| r.name == "PostgresLongRunningQuery")
            .expect("rule");
        assert_eq!(
            (long.threshold, long.for_),
            (3600.0, Duration::from_secs(60))
        );
        assert!(!batch.iter().any(|r| r.name == "PostgresCacheHitRatioLow"));
        assert!(!batch.iter().any(|r| r.name.starts_with("Redis")));
        let web = rules.for_target(true, &labels(&[("env", "web")]));
        let long = web
            .iter()
            .find(|r| r.name == "PostgresLongRunningQuery")
            .expect("rule");
        assert_eq!(long.threshold, 300.0);
    }

    #[test]
    fn a_bad_override_names_the_entry_and_the_fix() {
        let bad = |o: Override| {
            Rules::with_overrides(vec![o])
                .expect_err("refused")
                .to_string()
        };
        let base = Override {
            rule: "PostgresLongRunningQuery".into(),
            match_labels: BTreeMap::new(),
            threshold: None,
            for_: None,
            disabled: false,
        };
        let e = bad(Override {
            rule: "NoSuchRule".into(),
            ..base.clone()
        });
        assert!(
            e.contains("entry 0 (NoSuchRule): no such rule; the rules are KeelTargetDown"),
            "{e}"
        );
        let e = bad(Override {
            for_: Some("soon".into()),
            ..base.clone()
        });
        assert!(e.contains("for:"), "{e}");
        let e = bad(Override {
            threshold: Some(f64::NAN),
            ..base
        });
        assert!(e.contains("finite"), "{e}");
    }

    #[test]
    fn conditions_read_the_metric() {
        let rule = builtin()
            .into_iter()
            .find(|r| r.name == "PostgresLongRunningQuery")
            .expect("rule");
        assert_eq!(
            condition(&rule, &[Sample::new(c::PG_LONGEST_QUERY, 301.0)]),
            Condition::Holds(301.0)
        );
        assert_eq!(
            condition(&rule, &[Sample::new(c::PG_LONGEST_QUERY, 3.0)]),
            Condition::Clear(3.0)
        );
        assert_eq!(condition(&rule, &[]), Condition::Unknown);
        assert_eq!(
            describe(&rule, 301.25),
            "A query has been running for 301.2 s (threshold 300 s)"
        );
    }
}
