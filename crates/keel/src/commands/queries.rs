//! `keel queries top`: an instance's statements by the time they took.

use keel_proto::v1::ListTopQueriesRequest;

use crate::cli::{Output, QueriesCommand, parse_window};
use crate::client::{self, Collector, Registry};
use crate::commands::instance::resolve;
use crate::commands::metrics::proto_duration;
use crate::output;
use crate::table::{Column, Layout, Table};

pub(crate) async fn run(command: QueriesCommand) -> anyhow::Result<()> {
    let QueriesCommand::Top {
        instance,
        window,
        limit,
        client,
    } = command;
    let window = parse_window(&window)?;
    let connection = client::connect(&client).await?;
    let found = resolve(&Registry::new(&connection), &instance).await?;
    let top = Collector::new(&connection)
        .list_top_queries(ListTopQueriesRequest {
            instance_id: found.id.clone(),
            window: Some(proto_duration(window)),
            limit,
        })
        .await?;
    // Why the list may be short or lack texts, with the fix: for people, whatever the output.
    for problem in &top.problems {
        output::note(format_args!("warning: {}", problem.trim()));
    }
    match client.output {
        Output::Json => output::print(serde_json::json!({
            "instance_id": found.id,
            "instance": found.name,
            "window_seconds": window.as_secs_f64(),
            "covered_from": output::timestamp_json(top.covered_from.as_ref()),
            "total_exec_seconds": top.total_exec_seconds,
            "queries": top.queries.iter().map(output::top_query_json).collect::<Vec<_>>(),
            "problems": top.problems,
        }))?,
        Output::Table | Output::Wide => {
            let layout = Layout::for_output(client.output);
            let mut head =
                Table::headless(&[Column::keep("FIELD"), Column::keep("VALUE").wrapping()]);
            head.row(vec!["instance:".into(), found.name.clone()]);
            head.row(vec![
                "window:".into(),
                match &top.covered_from {
                    Some(from) => format!(
                        "{}, with history from {}",
                        output::metric_value("_seconds", window.as_secs_f64()),
                        output::when(Some(from))
                    ),
                    None => format!(
                        "{}, without statement history yet",
                        output::metric_value("_seconds", window.as_secs_f64())
                    ),
                },
            ]);
            head.row(vec![
                "total time:".into(),
                format!("{:.3} s of execution", top.total_exec_seconds),
            ]);
            output::print(format_args!(
                "{}\n\n{}",
                head.render(layout),
                output::top_queries_table(&top.queries, layout)
            ))?;
        }
    }
    Ok(())
}
