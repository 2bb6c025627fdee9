//! `keel events tail`: a JetStream subscriber printing Keel's events as they happen.

use anyhow::Context as _;
use async_nats::jetstream::consumer::{DeliverPolicy, pull};
use futures::StreamExt;
use keel_proto::v1::Event;
use prost::Message;

use crate::cli::{EventsCommand, Output};
use crate::output;

pub(crate) async fn run(command: EventsCommand) -> anyhow::Result<()> {
    let EventsCommand::Tail {
        subject,
        from_start,
        count,
        nats,
        output,
    } = command;
    nats.validate()?;
    // The URL may carry credentials: errors quote it masked.
    let shown_url = keel_config::redact_url(&nats.url);
    let client = async_nats::connect(&nats.url)
        .await
        .with_context(|| format!("cannot connect to NATS at {shown_url}"))?;
    let jetstream = async_nats::jetstream::new(client);
    let stream = jetstream
        .get_stream(keel_bus::STREAM)
        .await
        .with_context(|| {
            format!(
                "no {} stream on {}: has `keel serve` run against this NATS?",
                keel_bus::STREAM,
                shown_url
            )
        })?;
    // An ephemeral consumer: nothing is left behind on the server when the tail stops.
    let consumer = stream
        .create_consumer(pull::Config {
            filter_subject: subject.clone(),
            deliver_policy: if from_start {
                DeliverPolicy::All
            } else {
                DeliverPolicy::New
            },
            ack_policy: async_nats::jetstream::consumer::AckPolicy::None,
            inactive_threshold: std::time::Duration::from_secs(30),
            ..Default::default()
        })
        .await
        .with_context(|| format!("cannot subscribe to {subject}"))?;
    let mut messages = consumer.messages().await.context("cannot pull events")?;
    if output == Output::Table {
        eprintln!("watching {subject} (Ctrl-C to stop)");
    }
    let mut seen = 0;
    loop {
        let message = tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(()),
            next = messages.next() => match next {
                Some(message) => message.context("receiving events failed")?,
                None => return Ok(()),
            },
        };
        let subject = message.subject.to_string();
        match Event::decode(message.payload.as_ref()) {
            Ok(event) => match output {
                Output::Json => println!("{}", output::event_json(&subject, &event)),
                Output::Table => println!("{}", output::event_line(&subject, &event)),
            },
            Err(error) => eprintln!("skipping undecodable message on {subject}: {error}"),
        }
        seen += 1;
        if count.is_some_and(|c| seen >= c) {
            return Ok(());
        }
    }
}
