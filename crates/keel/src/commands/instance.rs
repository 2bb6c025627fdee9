//! `keel instance …`: the registry from the command line.

use std::collections::{HashMap, HashSet};

use keel_proto::v1::*;
use prost_types::FieldMask;
use secrecy::ExposeSecret;

use crate::cli::{ClientArgs, EngineArg, InstanceCommand, Output};
use crate::client::{self, Collector, Registry};
use crate::failure::Failure;
use crate::output;
use crate::table::Layout;

pub(crate) async fn run(command: InstanceCommand) -> anyhow::Result<()> {
    match command {
        InstanceCommand::Add {
            name,
            engine,
            url,
            environment,
            labels,
            endpoints,
            client,
        } => {
            let labels = once_each("label", labels)?;
            let registry = client::registry(&client).await?;
            let instance = Instance {
                name,
                engine: engine_of(engine) as i32,
                connection_url: url.expose_secret().to_owned(),
                environment,
                labels,
                monitoring_endpoints: endpoints
                    .into_iter()
                    .map(|(kind, url)| MonitoringEndpoint { kind, url })
                    .collect(),
                ..Default::default()
            };
            let created = registry
                .create_instance(CreateInstanceRequest {
                    instance: Some(instance),
                })
                .await?;
            print_instance(&client, &created.instance.unwrap_or_default())?;
        }
        InstanceCommand::Ls {
            selector,
            engine,
            environment,
            limit,
            client,
        } => {
            let registry = client::registry(&client).await?;
            let mut instances = Vec::new();
            let mut page_token = String::new();
            loop {
                let page = registry
                    .list_instances(ListInstancesRequest {
                        page_size: 500,
                        page_token,
                        label_selector: selector.clone(),
                        engine: engine.map_or(0, |e| engine_of(e) as i32),
                        environment: environment.clone().unwrap_or_default(),
                        // A tenant's key sees its own tenant only.
                        tenant: String::new(),
                    })
                    .await?;
                instances.extend(page.instances);
                page_token = page.next_page_token;
                if page_token.is_empty() || limit.is_some_and(|l| instances.len() >= l) {
                    break;
                }
            }
            if let Some(limit) = limit {
                instances.truncate(limit);
            }
            match client.output {
                Output::Json => output::print(serde_json::Value::Array(
                    instances.iter().map(output::instance_json).collect(),
                ))?,
                Output::Table | Output::Wide => output::print(output::instances_table(
                    &instances,
                    Layout::for_output(client.output),
                ))?,
            }
        }
        InstanceCommand::Get { instance, client } => {
            let registry = client::registry(&client).await?;
            let found = resolve(&registry, &instance).await?;
            print_instance(&client, &found)?;
        }
        InstanceCommand::Update {
            instance,
            rename,
            url,
            environment,
            labels,
            remove_labels,
            endpoints,
            remove_endpoints,
            expected_version,
            client,
        } => {
            // Everything that can be refused without Keel is refused before connecting.
            let labels = once_each("label", labels)?;
            let endpoints = once_each("monitoring endpoint kind", endpoints)?;
            both_set_and_removed("label", labels.keys(), &remove_labels)?;
            both_set_and_removed(
                "monitoring endpoint kind",
                endpoints.keys(),
                &remove_endpoints,
            )?;
            if rename.is_none()
                && url.is_none()
                && environment.is_none()
                && labels.is_empty()
                && remove_labels.is_empty()
                && endpoints.is_empty()
                && remove_endpoints.is_empty()
            {
                return Err(Failure::Invalid.error(
                    "nothing to change: pass --rename, --url, --env, --label, --remove-label, \
                     --monitoring-endpoint or --remove-monitoring-endpoint",
                ));
            }
            let registry = client::registry(&client).await?;
            let current = resolve(&registry, &instance).await?;
            let mut changes = Instance::default();
            let mut paths = Vec::new();
            if let Some(name) = rename {
                changes.name = name;
                paths.push("name".to_owned());
            }
            if let Some(url) = url {
                changes.connection_url = url.expose_secret().to_owned();
                paths.push("connection_url".to_owned());
            }
            if let Some(environment) = environment {
                changes.environment = environment;
                paths.push("environment".to_owned());
            }
            if !labels.is_empty() || !remove_labels.is_empty() {
                let mut merged: HashMap<String, String> = current.labels.clone();
                merged.extend(labels);
                for key in &remove_labels {
                    merged.remove(key);
                }
                changes.labels = merged;
                paths.push("labels".to_owned());
            }
            if !endpoints.is_empty() || !remove_endpoints.is_empty() {
                changes.monitoring_endpoints =
                    merge_endpoints(&current.monitoring_endpoints, endpoints, &remove_endpoints);
                paths.push("monitoring_endpoints".to_owned());
            }
            let updated = registry
                .update_instance(UpdateInstanceRequest {
                    id: current.id.clone(),
                    instance: Some(changes),
                    update_mask: Some(FieldMask { paths }),
                    expected_version: expected_version.unwrap_or(current.version),
                })
                .await?
                .instance
                .unwrap_or_default();
            if updated.version == current.version && client.output != Output::Json {
                output::note(format_args!(
                    "{} already had these values; nothing changed (version {})",
                    updated.name, updated.version
                ));
            }
            print_instance(&client, &updated)?;
        }
        InstanceCommand::Rm { instance, client } => {
            let registry = client::registry(&client).await?;
            let current = resolve(&registry, &instance).await?;
            registry
                .delete_instance(DeleteInstanceRequest {
                    id: current.id.clone(),
                    expected_version: current.version,
                })
                .await?;
            match client.output {
                Output::Json => {
                    output::print(serde_json::json!({"deleted": current.id, "name": current.name}))?
                }
                Output::Table | Output::Wide => {
                    output::print(format_args!("deleted {} ({})", current.name, current.id))?
                }
            }
        }
        InstanceCommand::Check { instance, client } => {
            let registry = client::registry(&client).await?;
            let current = resolve(&registry, &instance).await?;
            let report = registry
                .check_instance(CheckInstanceRequest {
                    id: current.id.clone(),
                })
                .await?;
            let health = report.health.unwrap_or_default();
            match client.output {
                Output::Json => output::print(serde_json::json!({
                    "instance": current.name,
                    "health": output::health_json(Some(&health)),
                    "findings": output::findings_json(&report.findings),
                }))?,
                Output::Table | Output::Wide => {
                    if health.reachable {
                        let latency = health
                            .latency
                            .map(|d| d.seconds as f64 * 1e3 + f64::from(d.nanos) / 1e6)
                            .unwrap_or(0.0);
                        output::print(format_args!(
                            "{}: reachable, version {}, {latency:.2} ms\n",
                            current.name, health.server_version
                        ))?;
                    } else {
                        output::print(format_args!(
                            "{}: unreachable: {}\n",
                            current.name, health.error
                        ))?;
                    }
                    output::print(output::findings_text(
                        &report.findings,
                        Layout::for_output(client.output),
                    ))?;
                }
            }
            let missing = report
                .findings
                .iter()
                .any(|f| f.status == CheckStatus::Missing as i32);
            if !health.reachable || missing {
                // A check that found problems is a failure for scripts, after printing what to fix.
                return Err(Failure::Other.error(format!(
                    "{} needs attention: see the fixes above",
                    current.name
                )));
            }
        }
        InstanceCommand::Collect { instance, client } => {
            let connection = client::connect(&client).await?;
            let current = resolve(&Registry::new(&connection), &instance).await?;
            let scraped = Collector::new(&connection)
                .collect_now(CollectNowRequest {
                    instance_id: current.id.clone(),
                })
                .await?;
            let status = scraped.status.unwrap_or_default();
            match client.output {
                Output::Json => output::print(serde_json::json!({
                    "instance_id": current.id,
                    "instance": current.name,
                    "status": output::scrape_status_json(&status),
                    "latest": output::metrics_json(&scraped.latest),
                }))?,
                Output::Table | Output::Wide => {
                    output::print(output::scrape_status_text(
                        &current.name,
                        output::engine(current.engine),
                        &status,
                        Layout::for_output(client.output),
                    ))?;
                    if status.up {
                        output::print(format_args!(
                            "\n{} values read; `keel metrics {}` shows them",
                            scraped.latest.len(),
                            current.name
                        ))?;
                    }
                }
            }
            if !status.up {
                // As a check that cannot reach the instance: a failure for scripts.
                return Err(Failure::Other.error(format!(
                    "{} could not be scraped: see the problems above",
                    current.name
                )));
            }
        }
    }
    Ok(())
}

fn engine_of(engine: EngineArg) -> Engine {
    match engine {
        EngineArg::Postgres => Engine::Postgres,
        EngineArg::Redis => Engine::Redis,
    }
}

/// `key=value` pairs as a map, refusing a key given twice: which one was meant is a guess.
fn once_each(what: &str, pairs: Vec<(String, String)>) -> anyhow::Result<HashMap<String, String>> {
    let mut map = HashMap::with_capacity(pairs.len());
    for (key, value) in pairs {
        if map.contains_key(&key) {
            return Err(Failure::Invalid.error(format!("{what} {key} given twice; give each once")));
        }
        map.insert(key, value);
    }
    Ok(map)
}

/// Refuses a key that is both set and removed in one update.
fn both_set_and_removed<'a>(
    what: &str,
    set: impl Iterator<Item = &'a String>,
    removed: &[String],
) -> anyhow::Result<()> {
    let set: HashSet<&String> = set.collect();
    match removed.iter().find(|key| set.contains(key)) {
        Some(key) => Err(Failure::Invalid.error(format!(
            "{what} {key} is both set and removed; do one of them"
        ))),
        None => Ok(()),
    }
}

/// The stored endpoints with `set` replacing those of its kinds and `removed` kinds left out,
/// in the stored order, new kinds last (sorted, so the same flags give the same list).
fn merge_endpoints(
    stored: &[MonitoringEndpoint],
    set: HashMap<String, String>,
    removed: &[String],
) -> Vec<MonitoringEndpoint> {
    let mut merged: Vec<MonitoringEndpoint> = Vec::new();
    let mut placed: HashSet<&str> = HashSet::new();
    for endpoint in stored {
        if removed.contains(&endpoint.kind) {
            continue;
        }
        match set.get(&endpoint.kind) {
            Some(url) if placed.insert(endpoint.kind.as_str()) => merged.push(MonitoringEndpoint {
                kind: endpoint.kind.clone(),
                url: url.clone(),
            }),
            // A kind that had several endpoints now has the one given.
            Some(_) => {}
            None => merged.push(endpoint.clone()),
        }
    }
    let mut added: Vec<(&String, &String)> = set
        .iter()
        .filter(|(kind, _)| !placed.contains(kind.as_str()))
        .collect();
    added.sort();
    merged.extend(added.into_iter().map(|(kind, url)| MonitoringEndpoint {
        kind: kind.clone(),
        url: url.clone(),
    }));
    merged
}

/// Finds an instance by id or, failing the UUID form, by name.
pub(crate) async fn resolve(registry: &Registry, instance: &str) -> anyhow::Result<Instance> {
    let request = if uuid::Uuid::parse_str(instance).is_ok() {
        GetInstanceRequest {
            id: instance.to_owned(),
            name: String::new(),
        }
    } else {
        GetInstanceRequest {
            id: String::new(),
            name: instance.to_owned(),
        }
    };
    let found = registry.get_instance(request).await?;
    found
        .instance
        .ok_or_else(|| anyhow::anyhow!("Keel returned no instance"))
}

fn print_instance(client: &ClientArgs, instance: &Instance) -> anyhow::Result<()> {
    match client.output {
        Output::Json => output::print(output::instance_json(instance)),
        Output::Table | Output::Wide => output::print(output::instance_details(
            instance,
            Layout::for_output(client.output),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(kind: &str, url: &str) -> MonitoringEndpoint {
        MonitoringEndpoint {
            kind: kind.into(),
            url: url.into(),
        }
    }

    #[test]
    fn a_key_given_twice_is_refused() {
        let error = once_each(
            "label",
            vec![("a".into(), "1".into()), ("a".into(), "2".into())],
        )
        .expect_err("a twice");
        assert_eq!(error.to_string(), "label a given twice; give each once");
        assert_eq!(crate::failure::classify(&error), Failure::Invalid);
        let error = both_set_and_removed("label", [&"a".to_owned()].into_iter(), &["a".into()])
            .expect_err("set and removed");
        assert!(
            error.to_string().contains("both set and removed"),
            "{error}"
        );
    }

    #[test]
    fn endpoints_are_replaced_by_kind_and_removed_by_kind() {
        let stored = [
            endpoint("postgres_exporter", "http://a:9187/metrics"),
            endpoint("node", "http://a:9100/metrics"),
            endpoint("node", "http://b:9100/metrics"),
        ];
        let set = HashMap::from([
            ("node".to_owned(), "http://c:9100/metrics".to_owned()),
            ("pgbouncer".to_owned(), "http://a:9127/metrics".to_owned()),
        ]);
        assert_eq!(
            merge_endpoints(&stored, set, &[]),
            [
                endpoint("postgres_exporter", "http://a:9187/metrics"),
                endpoint("node", "http://c:9100/metrics"),
                endpoint("pgbouncer", "http://a:9127/metrics"),
            ]
        );
        assert_eq!(
            merge_endpoints(&stored, HashMap::new(), &["node".into()]),
            [endpoint("postgres_exporter", "http://a:9187/metrics")]
        );
    }
}
