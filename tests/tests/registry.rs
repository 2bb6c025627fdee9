//! The registry as a deployment serves it: the CLI's change reaches NATS subscribers and gRPC
//! clients, and a stopping process publishes what it committed.

use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
use futures::StreamExt as _;
use keel_auth::Role;
use keel_e2e::Deployment;
use keel_proto::v1::Event;
use prost::Message as _;

/// Every registry event in the stream, waiting up to 10 s for `expected` of them.
async fn registry_events(nats_url: &str, expected: usize) -> anyhow::Result<Vec<Event>> {
    let js = async_nats::jetstream::new(async_nats::connect(nats_url).await?);
    let consumer = js
        .get_stream("KEEL")
        .await?
        .create_consumer(pull::Config {
            filter_subject: "keel.registry.>".into(),
            deliver_policy: DeliverPolicy::All,
            ack_policy: AckPolicy::None,
            ..Default::default()
        })
        .await?;
    let mut messages = consumer.messages().await?;
    let mut events = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while events.len() < expected {
        match tokio::time::timeout_at(deadline, messages.next()).await {
            Ok(Some(message)) => events.push(Event::decode(message?.payload.as_ref())?),
            _ => break,
        }
    }
    Ok(events)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_added_with_the_cli_reaches_subscribers_and_clients() -> anyhow::Result<()> {
    let keel = Deployment::start().await?;
    let operator = keel.key("acme", Role::Operator, "e2e-operator").await?;

    let added = keel.cli(
        &operator,
        &[
            "instance",
            "add",
            "orders-db",
            "--engine",
            "postgres",
            "--url",
            "postgres://app@127.0.0.1:5432/shop",
            "-o",
            "json",
        ],
    )?;
    assert!(
        added.status.success(),
        "{}",
        String::from_utf8_lossy(&added.stderr)
    );
    let added: serde_json::Value = serde_json::from_slice(&added.stdout)?;
    let id = added["id"]
        .as_str()
        .expect("id in the CLI's JSON")
        .to_owned();

    let events = registry_events(&keel.nats_url, 1).await?;
    assert_eq!(events.len(), 1, "one created event");
    assert_eq!(events[0].instance_id, id);
    assert_eq!(events[0].tenant, "acme");

    // Another tenant's viewer does not see it; the same tenant's does, through gRPC.
    let other = keel.key("globex", Role::Viewer, "e2e-viewer").await?;
    let listed = keel.cli(&other, &["instance", "ls", "-o", "json"])?;
    assert!(listed.status.success());
    assert!(!String::from_utf8_lossy(&listed.stdout).contains(&id));
    let viewer = keel.key("acme", Role::Viewer, "e2e-viewer").await?;
    let got = keel.cli(&viewer, &["instance", "get", "orders-db", "-o", "json"])?;
    assert!(
        got.status.success(),
        "{}",
        String::from_utf8_lossy(&got.stderr)
    );
    assert!(String::from_utf8_lossy(&got.stdout).contains(&id));

    keel.stop().await
}
