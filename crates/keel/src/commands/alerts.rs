//! `keel alerts ls`: the alerts the collector's rules raised.

use keel_proto::v1::ListAlertsRequest;

use crate::cli::{AlertsCommand, Output};
use crate::client::{self, Collector, Registry};
use crate::commands::instance::resolve;
use crate::output;
use crate::table::Layout;

pub(crate) async fn run(command: AlertsCommand) -> anyhow::Result<()> {
    let AlertsCommand::Ls {
        instance,
        all,
        limit,
        client,
    } = command;
    let connection = client::connect(&client).await?;
    let instance_id = match &instance {
        Some(instance) => resolve(&Registry::new(&connection), instance).await?.id,
        None => String::new(),
    };
    let alerts = Collector::new(&connection)
        .list_alerts(ListAlertsRequest {
            instance_id,
            include_resolved: all,
            limit,
        })
        .await?
        .alerts;
    match client.output {
        Output::Json => output::print(serde_json::Value::Array(
            alerts.iter().map(output::alert_json).collect(),
        ))?,
        Output::Table | Output::Wide => output::print(output::alerts_table(
            &alerts,
            Layout::for_output(client.output),
        ))?,
    }
    Ok(())
}
