//! Every registry change reaches NATS once, in order, with the caller's trace context.

mod common;

use common::*;
use keel_auth::Role;
use keel_proto::v1::*;
use prost::Message;
use prost_types::FieldMask;

/// The trace context exists only where the service's tracing is set up, as `keel serve` does.
fn install_tracing() {
    use tracing_subscriber::layer::SubscriberExt as _;
    keel_telemetry::install_propagator();
    let subscriber = tracing_subscriber::registry().with(keel_telemetry::otel_layer());
    let _ = tracing::subscriber::set_global_default(subscriber);
}

#[tokio::test]
async fn every_change_emits_one_event_in_order_with_the_callers_trace() {
    install_tracing();
    let app = TestApp::start().await;
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let key = app.key("acme", Role::Operator).await;
    let mut client = app
        .client_with(
            Some(key),
            Some(format!("00-{trace_id}-00f067aa0ba902b7-01")),
        )
        .await;

    let url = "postgres://app:evt-pw-31337@db:5432/shop";
    let created = create(&mut client, pg_instance("orders-db", url))
        .await
        .expect("create");
    client
        .update_instance(UpdateInstanceRequest {
            id: created.id.clone(),
            instance: Some(Instance {
                labels: [("tier".to_owned(), "db".to_owned())].into(),
                ..Default::default()
            }),
            update_mask: Some(FieldMask {
                paths: vec!["labels".into()],
            }),
            expected_version: 1,
        })
        .await
        .expect("update");
    client
        .delete_instance(DeleteInstanceRequest {
            id: created.id.clone(),
            expected_version: 2,
        })
        .await
        .expect("delete");

    let messages = app.events(3).await;
    let subjects: Vec<&str> = messages.iter().map(|m| m.subject.as_str()).collect();
    assert_eq!(
        subjects,
        [
            "keel.registry.acme.instance.created",
            "keel.registry.acme.instance.updated",
            "keel.registry.acme.instance.deleted"
        ],
        "each change exactly once, in order, with the tenant in the subject"
    );
    for message in &messages {
        let headers = message.headers.as_ref().expect("headers");
        let event = Event::decode(message.payload.as_ref()).expect("an Event envelope");
        assert_eq!(
            headers.get(keel_bus::MSG_ID_HEADER).map(|v| v.as_str()),
            Some(event.id.as_str())
        );
        assert_eq!(
            uuid::Uuid::parse_str(&event.id)
                .expect("uuid")
                .get_version_num(),
            7
        );
        // The type names what happened, the same in every deployment and for every tenant.
        let verb = message.subject.rsplit('.').next().unwrap_or_default();
        assert_eq!(event.r#type, format!("keel.registry.instance.{verb}"));
        assert_eq!(
            (event.tenant.as_str(), event.instance_id.as_str()),
            ("acme", created.id.as_str())
        );
        assert!(event.occurred_at.is_some());
        let traceparent = headers
            .get("traceparent")
            .map(|v| v.as_str().to_owned())
            .unwrap_or_default();
        assert!(
            traceparent.contains(trace_id),
            "event not in the caller's trace: {traceparent:?}"
        );
        assert!(
            !String::from_utf8_lossy(&message.payload).contains("evt-pw-31337"),
            "secret in an event"
        );
    }

    let payloads: Vec<_> = messages
        .iter()
        .map(|m| Event::decode(m.payload.as_ref()).expect("event").payload)
        .collect();
    match &payloads[0] {
        Some(event::Payload::InstanceCreated(p)) => {
            assert_eq!(
                p.instance.as_ref().map(|i| i.connection_url.as_str()),
                Some("postgres://app:****@db:5432/shop")
            )
        }
        other => panic!("expected InstanceCreated, got {other:?}"),
    }
    match &payloads[1] {
        Some(event::Payload::InstanceUpdated(p)) => {
            assert_eq!(p.changed_fields, ["labels"]);
            assert_eq!(p.instance.as_ref().map(|i| i.version), Some(2));
        }
        other => panic!("expected InstanceUpdated, got {other:?}"),
    }
    match &payloads[2] {
        Some(event::Payload::InstanceDeleted(p)) => {
            assert_eq!((p.name.as_str(), p.version), ("orders-db", 2))
        }
        other => panic!("expected InstanceDeleted, got {other:?}"),
    }
    assert_eq!(
        keel_registry::outbox()
            .pending(&app.pool)
            .await
            .expect("pending"),
        0,
        "outbox drained"
    );
}

#[tokio::test]
async fn events_committed_while_no_relay_runs_arrive_once_when_relays_start() {
    let app = TestApp::start_without_relay().await;
    let mut client = app.client("acme", Role::Operator).await;
    let created = create(
        &mut client,
        pg_instance("orders-db", "postgres://app@db/shop"),
    )
    .await
    .expect("create");
    assert_eq!(
        keel_registry::outbox()
            .pending(&app.pool)
            .await
            .expect("pending"),
        1,
        "committed, not published"
    );
    assert!(
        app.events(0).await.is_empty(),
        "nothing published without a relay"
    );

    // Two relays come up (a restart, plus a second replica): the event arrives once.
    let _first = app.replica(key_ring(K1)).await;
    let _second = app.replica(key_ring(K1)).await;
    let messages = app.events(1).await;
    assert_eq!(messages.len(), 1, "the create event arrived exactly once");
    assert_eq!(
        Event::decode(messages[0].payload.as_ref())
            .expect("event")
            .instance_id,
        created.id
    );
    assert_eq!(
        keel_registry::outbox()
            .pending(&app.pool)
            .await
            .expect("pending"),
        0
    );
}

/// Fields sent with the values they already have change nothing: the version stays, no event
/// is published, and a later real change lists only the fields that did change.
#[tokio::test]
async fn an_update_that_changes_nothing_keeps_its_version_and_publishes_nothing() {
    let app = TestApp::start().await;
    let mut client = app.client("acme", Role::Operator).await;
    let url = "postgres://app:noop-pw@db:5432/shop";
    let created = create(
        &mut client,
        Instance {
            environment: "production".into(),
            labels: [("tier".to_owned(), "db".to_owned())].into(),
            monitoring_endpoints: vec![MonitoringEndpoint {
                kind: "postgres_exporter".into(),
                url: "http://db:9187/metrics".into(),
            }],
            ..pg_instance("orders-db", url)
        },
    )
    .await
    .expect("create");
    let update =
        |paths: &[&str], instance: Instance, expected_version: i64| UpdateInstanceRequest {
            id: created.id.clone(),
            instance: Some(instance),
            update_mask: Some(FieldMask {
                paths: paths.iter().map(|p| p.to_string()).collect(),
            }),
            expected_version,
        };

    // Every field, each set to what is stored (the URL in clear, as first sent).
    let same = Instance {
        name: created.name.clone(),
        connection_url: url.into(),
        environment: created.environment.clone(),
        labels: created.labels.clone(),
        monitoring_endpoints: created.monitoring_endpoints.clone(),
        ..Default::default()
    };
    let all = [
        "name",
        "connection_url",
        "environment",
        "labels",
        "monitoring_endpoints",
    ];
    let unchanged = client
        .update_instance(update(&all, same.clone(), 1))
        .await
        .expect("no-op update")
        .into_inner()
        .instance
        .expect("instance");
    assert_eq!(unchanged, created, "returned as stored, version 1");
    // Removing a label that is not there (the CLI sends the merged labels) is no change either.
    client
        .update_instance(update(&["labels"], same.clone(), 1))
        .await
        .expect("no-op relabel");
    assert_eq!(get(&mut client, &created.id).await.expect("get"), created);
    // A stale version is still refused, change or not.
    assert_status(
        client
            .update_instance(update(&["labels"], same.clone(), 7))
            .await,
        tonic::Code::Aborted,
        "stored version is 1, request expected 7",
    );

    // A real change among unchanged fields: one new version, one event naming that field.
    let changed = client
        .update_instance(update(
            &all,
            Instance {
                environment: "staging".into(),
                ..same
            },
            1,
        ))
        .await
        .expect("update")
        .into_inner()
        .instance
        .expect("instance");
    assert_eq!(
        (changed.version, changed.environment.as_str()),
        (2, "staging")
    );

    // Only the password differs: the masked forms are equal, the URLs are not.
    let repassworded = client
        .update_instance(update(
            &["connection_url"],
            Instance {
                connection_url: "postgres://app:other-pw@db:5432/shop".into(),
                ..Default::default()
            },
            2,
        ))
        .await
        .expect("new password")
        .into_inner()
        .instance
        .expect("instance");
    assert_eq!(
        (repassworded.version, repassworded.connection_url.as_str()),
        (3, created.connection_url.as_str())
    );

    let messages = app.events(3).await;
    let subjects: Vec<&str> = messages.iter().map(|m| m.subject.as_str()).collect();
    assert_eq!(
        subjects,
        [
            "keel.registry.acme.instance.created",
            "keel.registry.acme.instance.updated",
            "keel.registry.acme.instance.updated"
        ],
        "no event for the updates that changed nothing"
    );
    let changed: Vec<(Vec<String>, Option<i64>)> = messages[1..]
        .iter()
        .map(
            |m| match Event::decode(m.payload.as_ref()).expect("event").payload {
                Some(event::Payload::InstanceUpdated(p)) => {
                    (p.changed_fields, p.instance.map(|i| i.version))
                }
                other => panic!("expected InstanceUpdated, got {other:?}"),
            },
        )
        .collect();
    assert_eq!(
        changed,
        [
            (vec!["environment".to_owned()], Some(2)),
            (vec!["connection_url".to_owned()], Some(3))
        ]
    );
}
