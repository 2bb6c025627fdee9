//! Events a subscriber can trust: a NATS user confined to one tenant (the example in
//! deploy/nats/tenant-permissions.conf, on a real nats-server) gets that tenant's events and
//! nothing else, and two deployments on one NATS server never see each other's events.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
use common::*;
use futures::{Stream, StreamExt};
use keel_auth::Role;
use keel_config::NatsConfig;
use keel_proto::v1::{Event, event};
use prost::Message;

const KEEL_PASSWORD: &str = "keel-nats-test-pw";
const ACME_PASSWORD: &str = "acme-nats-test-pw";
/// How long a test waits for something that must not arrive.
const QUIET: Duration = Duration::from_millis(700);

/// nats-server running the documented example, its passwords defined as variables ahead of it.
async fn nats_with_tenant_permissions() -> keel_testkit::NatsServer {
    let example = include_str!("../../../deploy/nats/tenant-permissions.conf");
    let config = format!(
        "NATS_KEEL_PASSWORD: \"{KEEL_PASSWORD}\"\nNATS_ACME_EVENTS_PASSWORD: \"{ACME_PASSWORD}\"\n{example}"
    );
    keel_testkit::NatsServer::start(&config, "keel", KEEL_PASSWORD)
        .await
        .expect("nats-server with the example's users")
}

/// What the server reported to one client: permission violations arrive this way, on their own.
#[derive(Clone, Default)]
struct ServerErrors(Arc<Mutex<Vec<String>>>);

impl ServerErrors {
    /// Waits (at most 5 s) until the server has reported an error containing `needle`.
    async fn wait_for(&self, needle: &str) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let errors = self.0.lock().expect("lock").clone();
            if errors.iter().any(|e| e.contains(needle)) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the server never reported {needle:?}; it reported {errors:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Connects to `url` with replies on `inbox_prefix`, recording the server's errors.
async fn connect(url: &str, inbox_prefix: &str) -> (async_nats::Client, ServerErrors) {
    let errors = ServerErrors::default();
    let recorded = errors.clone();
    let client = keel_bus::with_url_auth(async_nats::ConnectOptions::new(), url)
        .custom_inbox_prefix(inbox_prefix)
        .event_callback(move |event| {
            let recorded = recorded.clone();
            async move {
                if let async_nats::Event::ServerError(error) = event {
                    recorded.0.lock().expect("lock").push(error.to_string());
                }
            }
        })
        .connect(url)
        .await
        .expect("connect to nats");
    (client, errors)
}

/// The `expected` first items of `stream` (10 s at most), plus anything arriving within [`QUIET`]
/// after them: an extra item is a leak or a duplicate.
async fn take<T>(stream: &mut (impl Stream<Item = T> + Unpin), expected: usize) -> Vec<T> {
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while out.len() < expected {
        match tokio::time::timeout_at(deadline, stream.next()).await {
            Ok(Some(item)) => out.push(item),
            _ => break,
        }
    }
    while let Ok(Some(item)) = tokio::time::timeout(QUIET, stream.next()).await {
        out.push(item);
    }
    out
}

/// (tenant, instance name) of an event.
fn who(payload: &[u8]) -> (String, String) {
    let event = Event::decode(payload).expect("an Event envelope");
    let name = match event.payload {
        Some(event::Payload::InstanceCreated(p)) => p.instance.map(|i| i.name).unwrap_or_default(),
        other => panic!("expected InstanceCreated, got {other:?}"),
    };
    (event.tenant, name)
}

/// The consumer `keel events tail --tenant acme --consumer-name acme-tail --from-start` creates.
fn tail_config(filter: &str) -> pull::Config {
    pull::Config {
        name: Some("acme-tail".to_owned()),
        filter_subject: filter.to_owned(),
        deliver_policy: DeliverPolicy::All,
        ack_policy: AckPolicy::None,
        inactive_threshold: Duration::from_secs(30),
        ..Default::default()
    }
}

#[tokio::test]
async fn a_subscriber_confined_to_one_tenant_gets_its_events_and_is_refused_the_others() {
    let nats = nats_with_tenant_permissions().await;
    let keel_url = nats.url_for("keel", KEEL_PASSWORD).expect("url");
    let acme_url = nats.url_for("acme-events", ACME_PASSWORD).expect("url");
    let app = TestApp::start_with_nats(NatsConfig::from_url(keel_url)).await;

    // A core NATS subscriber, subscribed before anything happens.
    let (core, core_errors) = connect(&acme_url, "_INBOX_acme").await;
    let mut mine = core.subscribe("keel.*.acme.>").await.expect("subscribe");
    let mut theirs = core.subscribe("keel.*.globex.>").await.expect("sent");
    let mut everything = core.subscribe("keel.>").await.expect("sent");
    let mut inboxes = core.subscribe("_INBOX.>").await.expect("sent");
    core.flush().await.expect("flush");
    for refused in ["keel.*.globex.>", "keel.>", "_INBOX.>"] {
        core_errors
            .wait_for(&format!(
                "Permissions Violation for Subscription to \"{refused}\""
            ))
            .await;
    }

    let mut acme = app.client("acme", Role::Operator).await;
    let mut globex = app.client("globex", Role::Operator).await;
    for (tenant, name) in [
        ("globex", "globex-1"),
        ("acme", "acme-1"),
        ("globex", "globex-2"),
    ] {
        let client = if tenant == "acme" {
            &mut acme
        } else {
            &mut globex
        };
        create(client, pg_instance(name, "postgres://app@db/shop"))
            .await
            .expect("create");
    }
    assert_eq!(app.events(3).await.len(), 3, "all three events published");

    let live: Vec<_> = take(&mut mine, 1)
        .await
        .iter()
        .map(|m| (m.subject.to_string(), who(&m.payload)))
        .collect();
    assert_eq!(
        live,
        [(
            "keel.registry.acme.instance.created".to_owned(),
            ("acme".to_owned(), "acme-1".to_owned())
        )]
    );
    for refused in [&mut theirs, &mut everything, &mut inboxes] {
        assert!(
            take(refused, 0).await.is_empty(),
            "a refused subscription got messages"
        );
    }

    // A JetStream consumer, as `keel events tail` creates it, reads acme's history only.
    let (client, js_errors) = connect(&acme_url, "_INBOX_acme").await;
    let mut js = async_nats::jetstream::new(client.clone());
    // A refused request gets no answer at all: fail it fast.
    js.set_timeout(Duration::from_secs(2));
    let consumer = js
        .create_consumer_on_stream(tail_config("keel.*.acme.>"), "KEEL")
        .await
        .expect("acme may read its own events");
    let mut messages = consumer.messages().await.expect("pull");
    let history: Vec<_> = take(&mut messages, 1)
        .await
        .into_iter()
        .map(|m| who(&m.expect("message").payload))
        .collect();
    assert_eq!(history, [("acme".to_owned(), "acme-1".to_owned())]);
    drop(messages);

    // Other tenants' or wider filters, the unfiltered create, and pulling from Keel's own
    // consumers are all refused.
    for filter in ["keel.*.globex.>", "keel.>", "keel.registry.>"] {
        let refused = js
            .create_consumer_on_stream(tail_config(filter), "KEEL")
            .await;
        assert!(refused.is_err(), "acme created a consumer on {filter}");
        js_errors
            .wait_for(&format!(
                "Permissions Violation for Publish to \"$JS.API.CONSUMER.CREATE.KEEL.acme-tail.{filter}\""
            ))
            .await;
    }
    let unnamed = pull::Config {
        name: None,
        ..tail_config("keel.*.acme.>")
    };
    assert!(js.create_consumer_on_stream(unnamed, "KEEL").await.is_err());
    js_errors
        .wait_for("Permissions Violation for Publish to \"$JS.API.CONSUMER.CREATE.KEEL\"")
        .await;
    app.bus
        .jetstream()
        .create_consumer_on_stream(
            pull::Config {
                durable_name: Some("remediation-alerts".to_owned()),
                filter_subject: "keel.>".to_owned(),
                ..Default::default()
            },
            "KEEL",
        )
        .await
        .expect("keel's own durable consumer");
    client
        .publish_with_reply(
            "$JS.API.CONSUMER.MSG.NEXT.KEEL.remediation-alerts",
            "_INBOX_acme.steal",
            "1".into(),
        )
        .await
        .expect("sent");
    js_errors
        .wait_for("Permissions Violation for Publish to \"$JS.API.CONSUMER.MSG.NEXT.KEEL.remediation-alerts\"")
        .await;
}

#[tokio::test]
async fn two_deployments_on_one_nats_server_do_not_see_each_others_events() {
    let env = keel_testkit::TestEnv::new();
    let url = env.nats_url().await.expect("nats");
    let prod = TestApp::start_with_nats(NatsConfig::from_url(&url)).await;
    let staging = TestApp::start_with_nats(
        NatsConfig::from_url(&url).with_namespace("KEEL_STAGING", "staging"),
    )
    .await;

    // Core subscribers to each root, before anything happens.
    let (client, _) = connect(&url, "_INBOX").await;
    let mut prod_live = client.subscribe("keel.>").await.expect("subscribe");
    let mut staging_live = client.subscribe("staging.>").await.expect("subscribe");
    client.flush().await.expect("flush");

    // The same tenant name in both deployments: only the root and the stream keep them apart.
    let mut prod_acme = prod.client("acme", Role::Operator).await;
    let mut staging_acme = staging.client("acme", Role::Operator).await;
    let mut staging_initech = staging.client("initech", Role::Operator).await;
    for (client, name) in [
        (&mut staging_acme, "staging-acme"),
        (&mut prod_acme, "prod-acme"),
        (&mut staging_initech, "staging-initech"),
    ] {
        create(client, pg_instance(name, "postgres://app@db/shop"))
            .await
            .expect("create");
    }

    // Through each registry's outbox and relay, each stream holds its own deployment's events.
    let names = |messages: Vec<async_nats::jetstream::Message>| -> Vec<String> {
        messages.iter().map(|m| who(&m.payload).1).collect()
    };
    assert_eq!(names(prod.events(1).await), ["prod-acme"]);
    assert_eq!(
        names(staging.events(2).await),
        ["staging-acme", "staging-initech"]
    );
    let subjects: Vec<String> = take(&mut staging_live, 2)
        .await
        .iter()
        .map(|m| m.subject.to_string())
        .collect();
    assert_eq!(
        subjects,
        [
            "staging.registry.acme.instance.created",
            "staging.registry.initech.instance.created"
        ]
    );
    let live: Vec<String> = take(&mut prod_live, 1)
        .await
        .iter()
        .map(|m| who(&m.payload).1)
        .collect();
    assert_eq!(live, ["prod-acme"]);

    // What `keel events tail --from-start` reads by default: the whole of its deployment's stream.
    for (app, expected) in [
        (&prod, vec!["prod-acme"]),
        (&staging, vec!["staging-acme", "staging-initech"]),
    ] {
        let consumer = app
            .bus
            .jetstream()
            .create_consumer_on_stream(
                pull::Config {
                    filter_subject: app.bus.subjects().all(),
                    deliver_policy: DeliverPolicy::All,
                    ack_policy: AckPolicy::None,
                    ..Default::default()
                },
                app.bus.stream_name(),
            )
            .await
            .expect("tail consumer");
        let mut messages = consumer.messages().await.expect("pull");
        let seen: Vec<String> = take(&mut messages, expected.len())
            .await
            .into_iter()
            .map(|m| who(&m.expect("message").payload).1)
            .collect();
        assert_eq!(seen, expected, "stream {}", app.bus.stream_name());
    }

    // A deployment pointed at another's stream, or at its subjects, is refused at start.
    let settings = keel_bus::StreamSettings::default();
    let shared_stream = NatsConfig::from_url(&url).with_namespace("KEEL", "other");
    let error = keel_bus::Bus::connect(&shared_stream, &settings)
        .await
        .expect_err("stream KEEL captures keel.>, not other.>")
        .to_string();
    assert!(
        error.contains("stream KEEL captures") && error.contains("--nats-stream"),
        "{error}"
    );
    let shared_root = NatsConfig::from_url(&url).with_namespace("KEEL_OTHER", "keel");
    let error = keel_bus::Bus::connect(&shared_root, &settings)
        .await
        .expect_err("keel.> belongs to stream KEEL")
        .to_string();
    assert!(error.contains("overlap"), "{error}");
    let invalid = NatsConfig::from_url(&url).with_namespace("KEEL", "keel.*");
    assert!(keel_bus::Bus::connect(&invalid, &settings).await.is_err());
}
