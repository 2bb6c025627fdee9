//! No credential shows in `Debug` (`{:?}`, `{:#?}`) or in an error's `Display`: every config,
//! message and error type that can hold one is formatted with a secret in it, and the secret
//! must not appear while the rest of the value still does.

use std::fmt::Debug;
use std::time::Duration;

use keel_bus::{Bus, StreamSettings};
use keel_config::{DatabaseConfig, NatsConfig, TelemetryConfig};
use keel_proto::v1::{
    CreateInstanceRequest, CreateInstanceResponse, Engine, Event, GetInstanceConnectionResponse,
    GetInstanceResponse, Instance, InstanceCreated, InstanceUpdated, ListInstancesResponse,
    MonitoringEndpoint, UpdateInstanceRequest, UpdateInstanceResponse, event,
};
use keel_registry::crypto::KeyRing;
use secrecy::SecretString;

const SECRET: &str = "hunter2-s3cret";
/// A host name that must still show, so that a `Debug` printing nothing would not pass.
const HOST: &str = "db.internal";

/// Asserts that neither `{:?}` nor `{:#?}` of `value` shows [`SECRET`], and that both show each
/// of `visible`.
#[track_caller]
fn check_debug(value: &impl Debug, visible: &[&str]) {
    for shown in [format!("{value:?}"), format!("{value:#?}")] {
        assert!(!shown.contains(SECRET), "secret in Debug output:\n{shown}");
        for expected in visible {
            assert!(
                shown.contains(expected),
                "{expected:?} missing from\n{shown}"
            );
        }
    }
}

/// Like [`check_debug`], for an error's `Display`, its causes included, too.
#[track_caller]
fn check_error(error: &(dyn std::error::Error + 'static), visible: &[&str]) {
    check_debug(&error, &[]);
    let mut shown = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        shown.push_str(&format!("\ncaused by: {cause}"));
        source = cause.source();
    }
    assert!(!shown.contains(SECRET), "secret in error message:\n{shown}");
    for expected in visible {
        assert!(
            shown.contains(expected),
            "{expected:?} missing from\n{shown}"
        );
    }
}

/// A port on loopback where nothing listens.
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("local address").port()
}

fn instance() -> Instance {
    Instance {
        name: "orders-db".into(),
        engine: Engine::Postgres.into(),
        connection_url: format!("postgres://app:{SECRET}@{HOST}:5432/shop?sslpassword={SECRET}"),
        monitoring_endpoints: vec![MonitoringEndpoint {
            kind: "postgres_exporter".into(),
            url: format!("http://scrape:{SECRET}@exporter.internal:9187/metrics"),
        }],
        ..Instance::default()
    }
}

#[test]
fn configs_mask_credentials() {
    let database = DatabaseConfig::from_url(format!("postgres://keel:{SECRET}@{HOST}:5432/keel"));
    check_debug(&database, &["postgres://keel:****@db.internal:5432/keel"]);

    for url in [
        format!("nats://keel:{SECRET}@{HOST}:4222"),
        format!("nats://{SECRET}@{HOST}:4222"),
        format!("nats://{HOST}:4222?token={SECRET}"),
    ] {
        check_debug(&NatsConfig::from_url(url), &[HOST]);
    }
    // A URL too broken to parse is not shown at all.
    check_debug(
        &NatsConfig::from_url(format!("nats://keel:{SECRET}@{HOST}:port")),
        &["nats://<not a URL, hidden>"],
    );

    let telemetry = TelemetryConfig {
        log_filter: "info".into(),
        log_format: keel_config::LogFormat::Text,
        otlp_endpoint: Some(format!("https://otel:{SECRET}@collector.internal:4317")),
        service_name: "keel".into(),
    };
    check_debug(&telemetry, &["collector.internal"]);

    // The encryption key ring: its key ids show, never its keys.
    let key = "c2VjcmV0LWtleS1tYXRlcmlhbC0zMi1ieXRlcyEhISE=";
    let ring = KeyRing::parse(&SecretString::from(format!("k1:{key}"))).expect("a valid ring");
    check_debug(&ring, &["k1"]);
    assert!(!format!("{ring:#?}").contains(key));
    for bad in [
        format!("k1:{SECRET}"),
        format!("k1:{key},k1:{key}"),
        SECRET.to_owned(),
    ] {
        let err = KeyRing::parse(&SecretString::from(bad)).expect_err("an invalid ring");
        check_error(&err, &["invalid encryption key ring"]);
        assert!(!format!("{err:?} {err}").contains(key));
    }
}

#[test]
fn messages_with_urls_mask_credentials() {
    let masked = ["postgres://app:****@db.internal:5432/shop?sslpassword=****"];
    check_debug(&instance(), &masked);
    check_debug(&instance().monitoring_endpoints[0], &["exporter.internal"]);
    check_debug(
        &CreateInstanceRequest {
            instance: Some(instance()),
        },
        &masked,
    );
    check_debug(
        &CreateInstanceResponse {
            instance: Some(instance()),
        },
        &masked,
    );
    check_debug(
        &GetInstanceResponse {
            instance: Some(instance()),
        },
        &masked,
    );
    check_debug(
        &ListInstancesResponse {
            instances: vec![instance()],
            ..Default::default()
        },
        &masked,
    );
    check_debug(
        &UpdateInstanceRequest {
            id: "0199".into(),
            instance: Some(instance()),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["connection_url".into()],
            }),
            expected_version: 3,
        },
        &masked,
    );
    check_debug(
        &UpdateInstanceResponse {
            instance: Some(instance()),
        },
        &masked,
    );
    check_debug(
        &GetInstanceConnectionResponse {
            instance_id: "0199".into(),
            engine: Engine::Redis.into(),
            connection_url: format!("redis://:{SECRET}@{HOST}:6379/0"),
            version: 3,
        },
        &["redis://:****@db.internal:6379/0", "Redis"],
    );
    for payload in [
        event::Payload::InstanceCreated(InstanceCreated {
            instance: Some(instance()),
        }),
        event::Payload::InstanceUpdated(InstanceUpdated {
            instance: Some(instance()),
            changed_fields: vec!["connection_url".into()],
        }),
    ] {
        check_debug(
            &Event {
                payload: Some(payload),
                ..Default::default()
            },
            &masked,
        );
    }
}

#[tokio::test]
async fn connect_errors_mask_credentials() {
    let port = closed_port();

    let nats = NatsConfig::from_url(format!("nats://keel:{SECRET}@127.0.0.1:{port}"));
    let err = Bus::connect(&nats, &StreamSettings::default())
        .await
        .expect_err("nothing listens there");
    assert!(matches!(err, keel_bus::BusError::Connect { .. }), "{err:?}");
    check_error(&err, &[&format!("nats://keel:****@127.0.0.1:{port}")]);
    let token = NatsConfig::from_url(format!("nats://{SECRET}@127.0.0.1:{port}"));
    let err = Bus::connect(&token, &StreamSettings::default())
        .await
        .expect_err("nothing listens there");
    check_error(&err, &[&format!("nats://****@127.0.0.1:{port}")]);

    let mut database =
        DatabaseConfig::from_url(format!("postgres://keel:{SECRET}@127.0.0.1:{port}/keel"));
    database.acquire_timeout = Duration::from_secs(2);
    let err = keel_store::connect(&database)
        .await
        .expect_err("nothing listens there");
    assert!(matches!(err, keel_store::StoreError::Connect(_)), "{err:?}");
    check_error(&err, &["cannot connect to the state store"]);

    for url in [
        format!("postgres://keel:{SECRET}@127.0.0.1:port/keel"),
        format!("postgres://keel@127.0.0.1/keel?password={SECRET}&port=notaport"),
    ] {
        let err = keel_store::connect(&DatabaseConfig::from_url(url))
            .await
            .expect_err("an invalid URL");
        assert!(
            matches!(err, keel_store::StoreError::InvalidUrl(_)),
            "{err:?}"
        );
        check_error(&err, &["invalid database URL"]);
    }
    let err = DatabaseConfig::from_url(format!("mysql://keel:{SECRET}@{HOST}/keel"))
        .validate()
        .expect_err("not postgres");
    check_error(&err, &["use postgres://"]);
}
