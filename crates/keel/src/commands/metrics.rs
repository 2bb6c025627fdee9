//! `keel metrics`: what the collector scraped from one instance.

use keel_proto::v1::{GetInstanceMetricsRequest, Metric};

use crate::cli::{MetricsArgs, Output, parse_window};
use crate::client::{self, Collector, Registry};
use crate::commands::instance::resolve;
use crate::output;
use crate::table::Layout;

pub(crate) async fn run(args: MetricsArgs) -> anyhow::Result<()> {
    let MetricsArgs {
        instance,
        window,
        names,
        client,
    } = args;
    let window = window.as_deref().map(parse_window).transpose()?;
    let connection = client::connect(&client).await?;
    let found = resolve(&Registry::new(&connection), &instance).await?;
    let response = Collector::new(&connection)
        .get_instance_metrics(GetInstanceMetricsRequest {
            instance_id: found.id.clone(),
            window: window.map(proto_duration),
            names: names.clone(),
        })
        .await?;
    // The collector filters the history by name; the latest values are filtered here.
    let latest: Vec<&Metric> = response
        .latest
        .iter()
        .filter(|m| names.is_empty() || names.contains(&m.name))
        .collect();
    let status = response.status.unwrap_or_default();
    let name = if response.instance_name.is_empty() {
        &found.name
    } else {
        &response.instance_name
    };
    match client.output {
        Output::Json => {
            let mut doc = serde_json::json!({
                "instance_id": response.instance_id,
                "instance": name,
                "engine": output::engine(response.engine),
                "status": output::scrape_status_json(&status),
                "latest": output::metrics_json(latest.iter().copied()),
            });
            if let Some(window) = window {
                doc["window_seconds"] = window.as_secs_f64().into();
                doc["series"] = output::series_json(&response.series);
            }
            output::print(doc)?;
        }
        Output::Table | Output::Wide => {
            let layout = Layout::for_output(client.output);
            let engine = output::engine(response.engine);
            output::print(format_args!(
                "{}\n",
                output::scrape_status_text(name, engine, &status, layout)
            ))?;
            match window {
                None => output::print(output::metrics_table(&latest, layout))?,
                Some(_) => output::print(output::series_table(&response.series, layout))?,
            }
        }
    }
    if window.is_some() {
        // An empty history for these names is no mystery: they keep none.
        for name in &names {
            if keel_collector::catalog::family(name).is_some_and(|f| !f.history) {
                output::note(format_args!(
                    "{name} keeps no history, only its latest value (`keel metrics {instance} --name {name}`)"
                ));
            }
        }
    }
    Ok(())
}

/// A window as the protobuf duration the collector takes.
pub(crate) fn proto_duration(window: std::time::Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(window.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(window.subsec_nanos()).unwrap_or(0),
    }
}
