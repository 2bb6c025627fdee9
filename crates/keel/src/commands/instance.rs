//! `keel instance …`: the registry from the command line.

use std::collections::HashMap;

use keel_proto::v1::*;
use prost_types::FieldMask;
use secrecy::ExposeSecret;

use crate::cli::{ClientArgs, EngineArg, InstanceCommand, Output};
use crate::client::{self, Registry};
use crate::output;

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
            let mut registry = client::registry(&client).await?;
            let instance = Instance {
                name,
                engine: engine_of(engine) as i32,
                connection_url: url.expose_secret().to_owned(),
                environment,
                labels: labels.into_iter().collect(),
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
                .await?
                .into_inner();
            print_instance(&client, created.instance.unwrap_or_default());
        }
        InstanceCommand::Ls {
            selector,
            engine,
            environment,
            limit,
            client,
        } => {
            let mut registry = client::registry(&client).await?;
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
                    .await?
                    .into_inner();
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
                Output::Json => println!(
                    "{}",
                    serde_json::Value::Array(instances.iter().map(output::instance_json).collect())
                ),
                Output::Table => println!("{}", output::instances_table(&instances)),
            }
        }
        InstanceCommand::Get { instance, client } => {
            let mut registry = client::registry(&client).await?;
            let found = resolve(&mut registry, &instance).await?;
            print_instance(&client, found);
        }
        InstanceCommand::Update {
            instance,
            rename,
            url,
            environment,
            labels,
            remove_labels,
            expected_version,
            client,
        } => {
            let mut registry = client::registry(&client).await?;
            let current = resolve(&mut registry, &instance).await?;
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
            if paths.is_empty() {
                anyhow::bail!(
                    "nothing to change: pass --rename, --url, --env, --label or --remove-label"
                );
            }
            let updated = registry
                .update_instance(UpdateInstanceRequest {
                    id: current.id.clone(),
                    instance: Some(changes),
                    update_mask: Some(FieldMask { paths }),
                    expected_version: expected_version.unwrap_or(current.version),
                })
                .await?
                .into_inner();
            print_instance(&client, updated.instance.unwrap_or_default());
        }
        InstanceCommand::Rm { instance, client } => {
            let mut registry = client::registry(&client).await?;
            let current = resolve(&mut registry, &instance).await?;
            registry
                .delete_instance(DeleteInstanceRequest {
                    id: current.id.clone(),
                    expected_version: current.version,
                })
                .await?;
            match client.output {
                Output::Json => println!(
                    "{}",
                    serde_json::json!({"deleted": current.id, "name": current.name})
                ),
                Output::Table => println!("deleted {} ({})", current.name, current.id),
            }
        }
        InstanceCommand::Check { instance, client } => {
            let mut registry = client::registry(&client).await?;
            let current = resolve(&mut registry, &instance).await?;
            let report = registry
                .check_instance(CheckInstanceRequest {
                    id: current.id.clone(),
                })
                .await?
                .into_inner();
            let health = report.health.unwrap_or_default();
            match client.output {
                Output::Json => println!(
                    "{}",
                    serde_json::json!({
                        "instance": current.name,
                        "health": output::health_json(Some(&health)),
                        "findings": output::findings_json(&report.findings),
                    })
                ),
                Output::Table => {
                    if health.reachable {
                        let latency = health
                            .latency
                            .map(|d| d.seconds as f64 * 1e3 + f64::from(d.nanos) / 1e6)
                            .unwrap_or(0.0);
                        println!(
                            "{}: reachable, version {}, {latency:.2} ms",
                            current.name, health.server_version
                        );
                    } else {
                        println!("{}: unreachable: {}", current.name, health.error);
                    }
                    println!("{}", output::findings_table(&report.findings));
                }
            }
            let missing = report
                .findings
                .iter()
                .any(|f| f.status == CheckStatus::Missing as i32);
            if !health.reachable || missing {
                // A check that found problems is a failure for scripts, after printing what to fix.
                anyhow::bail!("{} needs attention: see the fixes above", current.name);
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

/// Finds an instance by id or, failing the UUID form, by name.
async fn resolve(registry: &mut Registry, instance: &str) -> anyhow::Result<Instance> {
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
    let found = registry.get_instance(request).await?.into_inner();
    found
        .instance
        .ok_or_else(|| anyhow::anyhow!("server returned no instance"))
}

fn print_instance(client: &ClientArgs, instance: Instance) {
    match client.output {
        Output::Json => println!("{}", output::instance_json(&instance)),
        Output::Table => println!("{}", output::instance_details(&instance)),
    }
}
