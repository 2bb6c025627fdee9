//! `keel recs …`: the optimizer's recommendations: list, show, apply, roll back.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use keel_proto::v1::{
    ApplyRecommendationRequest, GetInstanceRequest, GetRecommendationRequest,
    ListRecommendationsRequest, Recommendation, RecommendationState, RollbackRecommendationRequest,
};

use crate::cli::{ClientArgs, Output, RecStateArg, RecsCommand, WaitArgs};
use crate::client::{self, Optimizer, Registry};
use crate::commands::instance::resolve;
use crate::commands::optimize::Progress;
use crate::failure::Failure;
use crate::output;
use crate::table::Layout;

/// How often `--wait` asks how the change goes.
const POLL_EVERY: Duration = Duration::from_millis(500);
/// Recommendations a short id is looked for among (the newest; Keel lists at most these).
const SHORT_ID_SEARCH: i32 = 500;
/// Instance names looked up at once for a list.
const LOOKUP_CONCURRENCY: usize = 8;

pub(crate) async fn run(command: RecsCommand) -> anyhow::Result<()> {
    match command {
        RecsCommand::Ls {
            instance,
            state,
            limit,
            client,
        } => {
            let connection = client::connect(&client).await?;
            let registry = Registry::new(&connection);
            let found = match &instance {
                Some(instance) => Some(resolve(&registry, instance).await?),
                None => None,
            };
            let recommendations = Optimizer::new(&connection)
                .list_recommendations(ListRecommendationsRequest {
                    instance_id: found.as_ref().map(|i| i.id.clone()).unwrap_or_default(),
                    state: state.map_or(RecommendationState::Unspecified, state_of) as i32,
                    limit,
                })
                .await?
                .recommendations;
            match client.output {
                Output::Json => output::print(serde_json::Value::Array(
                    recommendations
                        .iter()
                        .map(output::recommendation_json)
                        .collect(),
                ))?,
                Output::Table | Output::Wide => {
                    let names = match found {
                        Some(instance) => HashMap::from([(instance.id, instance.name)]),
                        None => instance_names(&registry, &recommendations).await,
                    };
                    output::print(output::recommendations_table(
                        &recommendations,
                        &names,
                        Layout::for_output(client.output),
                    ))?;
                }
            }
        }
        RecsCommand::Show { id, client } => {
            let id = RecId::parse(&id)?;
            let connection = client::connect(&client).await?;
            let optimizer = Optimizer::new(&connection);
            let id = id.resolve(&optimizer).await?;
            let recommendation = get(&optimizer, &id).await?;
            match client.output {
                Output::Json => output::print(output::recommendation_json(&recommendation))?,
                Output::Table | Output::Wide => {
                    let registry = Registry::new(&connection);
                    let name = instance_names(&registry, std::slice::from_ref(&recommendation))
                        .await
                        .remove(&recommendation.instance_id)
                        .unwrap_or_default();
                    output::print(output::recommendation_details(
                        &recommendation,
                        &name,
                        Layout::for_output(client.output),
                    ))?;
                }
            }
        }
        RecsCommand::Apply { id, wait, client } => {
            change(Change::Apply, &id, &wait, &client).await?
        }
        RecsCommand::Rollback { id, wait, client } => {
            change(Change::Rollback, &id, &wait, &client).await?
        }
    }
    Ok(())
}

fn state_of(state: RecStateArg) -> RecommendationState {
    match state {
        RecStateArg::Proposed => RecommendationState::Proposed,
        RecStateArg::Applying => RecommendationState::Applying,
        RecStateArg::Applied => RecommendationState::Applied,
        RecStateArg::RollingBack => RecommendationState::RollingBack,
        RecStateArg::RolledBack => RecommendationState::RolledBack,
        RecStateArg::Failed => RecommendationState::Failed,
    }
}

/// The names of the recommendations' instances, by id. One that cannot be looked up (removed
/// since) is left out, and shows by its id.
async fn instance_names(
    registry: &Registry,
    recommendations: &[Recommendation],
) -> HashMap<String, String> {
    let ids: HashSet<&str> = recommendations
        .iter()
        .map(|r| r.instance_id.as_str())
        .filter(|id| !id.is_empty())
        .collect();
    futures::stream::iter(ids)
        .map(|id| async move {
            let found = registry
                .get_instance(GetInstanceRequest {
                    id: id.to_owned(),
                    name: String::new(),
                })
                .await
                .ok()?
                .instance?;
            Some((id.to_owned(), found.name))
        })
        .buffer_unordered(LOOKUP_CONCURRENCY)
        .filter_map(std::future::ready)
        .collect()
        .await
}

async fn get(optimizer: &Optimizer, id: &str) -> anyhow::Result<Recommendation> {
    optimizer
        .get_recommendation(GetRecommendationRequest { id: id.to_owned() })
        .await?
        .recommendation
        .ok_or_else(|| anyhow::anyhow!("Keel returned no recommendation"))
}

/// A recommendation id as given: whole, or its short form (the last 12 hex digits, as tables
/// show it; fewer, down to 4, while they name one recommendation).
#[derive(Debug, Clone, PartialEq, Eq)]
enum RecId {
    Whole(String),
    Short(String),
}

impl RecId {
    /// Checked before connecting, so that a mistyped id is an invalid argument (exit 3).
    fn parse(raw: &str) -> anyhow::Result<RecId> {
        let raw = raw.trim();
        if uuid::Uuid::parse_str(raw).is_ok() {
            return Ok(RecId::Whole(raw.to_ascii_lowercase()));
        }
        if (4..=12).contains(&raw.len()) && raw.chars().all(|c| c.is_ascii_hexdigit()) {
            return Ok(RecId::Short(raw.to_ascii_lowercase()));
        }
        Err(Failure::Invalid.error(format!(
            "{raw:?} is not a recommendation id; give one as `keel recs ls` shows it (its last 4 to 12 hex digits), or whole"
        )))
    }

    /// The whole id; a short one is looked for among the caller's newest recommendations.
    async fn resolve(self, optimizer: &Optimizer) -> anyhow::Result<String> {
        match self {
            RecId::Whole(id) => Ok(id),
            RecId::Short(short) => {
                let listed = optimizer
                    .list_recommendations(ListRecommendationsRequest {
                        limit: SHORT_ID_SEARCH,
                        ..Default::default()
                    })
                    .await?
                    .recommendations;
                pick(listed.iter().map(|r| r.id.as_str()), &short)
            }
        }
    }
}

/// The one id of `ids` ending in `short`.
fn pick<'a>(ids: impl Iterator<Item = &'a str>, short: &str) -> anyhow::Result<String> {
    let found: Vec<&str> = ids
        .filter(|id| id.to_ascii_lowercase().ends_with(short))
        .collect();
    match found.as_slice() {
        [one] => Ok((*one).to_owned()),
        [] => Err(Failure::NotFound.error(format!(
            "no recommendation id ends in {short} among your newest {SHORT_ID_SEARCH}; give the whole id"
        ))),
        several => Err(Failure::Invalid.error(format!(
            "{short} ends {} recommendation ids ({}); give more of it, or the whole id",
            several.len(),
            several.join(", ")
        ))),
    }
}

/// A change `keel recs apply` or `rollback` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Change {
    Apply,
    Rollback,
}

impl Change {
    /// The state the recommendation is in while the change runs.
    fn running(self) -> RecommendationState {
        match self {
            Change::Apply => RecommendationState::Applying,
            Change::Rollback => RecommendationState::RollingBack,
        }
    }
}

async fn change(
    change: Change,
    id: &str,
    wait: &WaitArgs,
    client: &ClientArgs,
) -> anyhow::Result<()> {
    let id = RecId::parse(id)?;
    let connection = client::connect(client).await?;
    let optimizer = Optimizer::new(&connection);
    let id = id.resolve(&optimizer).await?;
    let mut current = match change {
        Change::Apply => {
            optimizer
                .apply_recommendation(ApplyRecommendationRequest { id: id.clone() })
                .await?
                .recommendation
        }
        Change::Rollback => {
            optimizer
                .rollback_recommendation(RollbackRecommendationRequest { id: id.clone() })
                .await?
                .recommendation
        }
    }
    .ok_or_else(|| anyhow::anyhow!("Keel returned no recommendation"))?;
    let running = current.state == change.running() as i32;
    if client.output != Output::Json {
        output::print(output::recommendation_state_line(&current))?;
    }
    if wait.wait && running {
        current = wait_out(&optimizer, current, change, wait.wait_timeout).await?;
        if client.output != Output::Json {
            output::print(output::recommendation_state_line(&current))?;
        }
    }
    if client.output == Output::Json {
        output::print(output::recommendation_json(&current))?;
    }
    if current.state == RecommendationState::Failed as i32 {
        return Err(Failure::Other.error(format!(
            "{} failed: see the reason above",
            match change {
                Change::Apply => "applying it",
                Change::Rollback => "rolling it back",
            }
        )));
    }
    Ok(())
}

/// Asks every [`POLL_EVERY`] until the recommendation has left the change's running state,
/// for at most `timeout`; the state on standard error meanwhile.
async fn wait_out(
    optimizer: &Optimizer,
    mut current: Recommendation,
    change: Change,
    timeout: Duration,
) -> anyhow::Result<Recommendation> {
    let deadline = Instant::now() + timeout;
    let mut progress = Progress::new();
    let mut spin = tokio::time::interval(Duration::from_millis(120));
    spin.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut poll = tokio::time::interval(POLL_EVERY);
    poll.tick().await;
    while current.state == change.running() as i32 {
        progress.update(
            format!("waiting: {}", output::recommendation_state_line(&current)),
            String::new(),
        );
        if Instant::now() >= deadline {
            progress.clear();
            return Err(Failure::Unavailable.error(format!(
                "{} ({}) is still {} after waiting {}s (--wait-timeout); it goes on in Keel, and `keel recs show {}` follows it",
                current.index_name,
                output::short_id(&current.id),
                output::recommendation_state(current.state).replace('_', " "),
                timeout.as_secs(),
                output::short_id(&current.id)
            )));
        }
        tokio::select! {
            _ = poll.tick() => current = get(optimizer, &current.id).await?,
            _ = spin.tick() => progress.tick(),
        }
    }
    progress.clear();
    Ok(current)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_is_whole_or_its_last_hex_digits() {
        let whole = "0198f3a2-7c4e-7b1a-9d2e-3f4a5b6c7d8e";
        assert_eq!(
            RecId::parse(whole).expect("whole"),
            RecId::Whole(whole.into())
        );
        assert_eq!(
            RecId::parse(" 3F4A5B6C7D8E ").expect("short"),
            RecId::Short("3f4a5b6c7d8e".into())
        );
        assert_eq!(
            RecId::parse("7d8e").expect("4 digits"),
            RecId::Short("7d8e".into())
        );
        for raw in ["", "7d8", "xyz123", "0198f3a2-7c4e", "3f4a5b6c7d8e0"] {
            let error = RecId::parse(raw).expect_err(raw);
            assert_eq!(crate::failure::classify(&error), Failure::Invalid, "{raw}");
            assert!(
                error.to_string().contains("is not a recommendation id"),
                "{raw}: {error}"
            );
        }
    }

    #[test]
    fn a_short_id_names_one_recommendation_or_says_why_not() {
        let ids = [
            "0198f3a2-7c4e-7b1a-9d2e-3f4a5b6c7d8e",
            "0198f3a2-7c4e-7b1a-8c1d-aaaaaaaa7d8e",
            "0198f3a2-7c4f-7000-8000-000000000001",
        ];
        assert_eq!(
            pick(ids.iter().copied(), "3f4a5b6c7d8e").expect("one"),
            ids[0]
        );
        let error = pick(ids.iter().copied(), "7d8e").expect_err("two");
        assert_eq!(crate::failure::classify(&error), Failure::Invalid);
        assert!(
            error
                .to_string()
                .starts_with("7d8e ends 2 recommendation ids"),
            "{error}"
        );
        let error = pick(ids.iter().copied(), "beef").expect_err("none");
        assert_eq!(crate::failure::classify(&error), Failure::NotFound);
    }

    #[test]
    fn every_state_flag_is_the_state_keel_filters_by() {
        use clap::ValueEnum as _;
        for state in RecStateArg::value_variants() {
            let name = state
                .to_possible_value()
                .map(|v| v.get_name().to_owned())
                .unwrap_or_default();
            assert_eq!(
                output::recommendation_state(state_of(*state) as i32).replace('_', "-"),
                name
            );
        }
    }
}
