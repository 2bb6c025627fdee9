//! The target policy at the registry's edge: refused when stored (with the setting that would
//! allow it), and refused again at check time on the address the host resolves to.

mod common;

use common::*;
use keel_auth::Role;
use keel_proto::v1::*;
use keel_target::TargetConfig;
use prost_types::FieldMask;
use tonic::Code;

/// One URL per default-deny class, and the setting its refusal must name.
fn denied_by_default(state_store: &str) -> Vec<(String, &'static str)> {
    vec![
        (
            "postgres://app:pw@169.254.169.254:5432/db".into(),
            "KEEL_TARGET_ALLOW_NETWORKS",
        ),
        (
            "postgres://app:pw@100.100.100.200/db".into(),
            "KEEL_TARGET_ALLOW_NETWORKS",
        ),
        (
            "postgres://app:pw@169.254.10.20/db".into(),
            "KEEL_TARGET_ALLOW_NETWORKS",
        ),
        (
            "postgres://app:pw@[fe80::1]:5432/db".into(),
            "KEEL_TARGET_ALLOW_NETWORKS",
        ),
        (
            "postgres://app:pw@[::ffff:169.254.169.254]/db".into(),
            "KEEL_TARGET_ALLOW_NETWORKS",
        ),
        (
            "postgres://app:pw@db.example.com/db?host=/var/run/postgresql".into(),
            "KEEL_TARGET_ALLOW_UNIX_SOCKETS",
        ),
        (
            "postgres://app:pw@%2Fvar%2Frun%2Fpostgresql/db".into(),
            "KEEL_TARGET_ALLOW_UNIX_SOCKETS",
        ),
        (
            "postgres://app:pw@db.example.com/db?sslkey=/etc/keel/tls.key".into(),
            "KEEL_TARGET_ALLOW_OPTIONS",
        ),
        (
            "postgres://app@db.example.com/db?passfile=/root/.pgpass".into(),
            "KEEL_TARGET_ALLOW_OPTIONS",
        ),
        (
            "postgres://db.example.com/db?service=keel".into(),
            "KEEL_TARGET_ALLOW_OPTIONS",
        ),
        (
            state_store.replacen("127.0.0.1", "localhost", 1),
            "KEEL_TARGET_ALLOW_STATE_STORE",
        ),
    ]
}

#[tokio::test]
async fn stored_urls_are_refused_naming_the_setting_that_allows_them() {
    let app = TestApp::start_with_targets(&TargetConfig::default()).await;
    let mut client = app.client("acme", Role::Operator).await;
    for (i, (url, setting)) in denied_by_default(&app.database_url).into_iter().enumerate() {
        let result = create(&mut client, pg_instance(&format!("db{i}"), &url)).await;
        let status = result.expect_err(&url);
        assert_eq!(
            status.code(),
            Code::InvalidArgument,
            "{url}: {}",
            status.message()
        );
        let message = status.message();
        assert!(
            message.starts_with("connection_url ")
                && message.contains("refused by Keel's target policy")
                && message.contains(setting),
            "{url}: {message}"
        );
        assert!(!message.contains(":pw@"), "credentials in {message}");
    }
    assert_eq!(app.instance_count().await, 0, "nothing refused was stored");

    // A metadata name is refused by name too, and a redis unix socket like a postgres one.
    let status = create(
        &mut client,
        pg_instance("gcp", "postgres://metadata.google.internal/db"),
    )
    .await
    .expect_err("metadata name");
    assert!(
        status.message().contains("KEEL_TARGET_ALLOW_HOSTS"),
        "{}",
        status.message()
    );

    // Updates are checked the same way, and the stored URL stays as it was.
    let ok = create(
        &mut client,
        pg_instance("ok", "postgres://app:pw@db.example.com/shop"),
    )
    .await
    .expect("an ordinary host");
    let status = client
        .update_instance(UpdateInstanceRequest {
            id: ok.id.clone(),
            instance: Some(pg_instance("ok", "postgres://app:pw@169.254.169.254/shop")),
            update_mask: Some(FieldMask {
                paths: vec!["connection_url".into()],
            }),
            expected_version: ok.version,
        })
        .await
        .expect_err("metadata address on update");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("169.254.0.0/16"),
        "{}",
        status.message()
    );
    let stored = get(&mut client, &ok.id).await.expect("get");
    assert_eq!(
        (stored.connection_url.as_str(), stored.version),
        ("postgres://app:****@db.example.com/shop", ok.version)
    );
}

#[tokio::test]
async fn each_setting_allows_its_class() {
    let targets = TargetConfig {
        allow_networks: vec![
            "169.254.0.0/16".into(),
            "100.100.100.200".into(),
            "fe80::/10".into(),
        ],
        allow_unix_sockets: true,
        allow_options: vec!["sslkey".into(), "passfile".into(), "service".into()],
        allow_state_store: true,
        ..TargetConfig::default()
    };
    let app = TestApp::start_with_targets(&targets).await;
    let mut client = app.client("acme", Role::Operator).await;
    for (i, (url, _)) in denied_by_default(&app.database_url).into_iter().enumerate() {
        create(&mut client, pg_instance(&format!("db{i}"), &url))
            .await
            .unwrap_or_else(|status| panic!("{url}: {}", status.message()));
    }

    // An explicit deny wins over every allow.
    let strict = TargetConfig {
        deny_networks: vec!["169.254.169.0/24".into()],
        ..targets
    };
    let app = TestApp::start_with_targets(&strict).await;
    let mut client = app.client("acme", Role::Operator).await;
    let status = create(
        &mut client,
        pg_instance("imds", "postgres://169.254.169.254/db"),
    )
    .await
    .expect_err("denied network");
    assert!(
        status.message().contains("KEEL_TARGET_DENY_NETWORKS"),
        "{}",
        status.message()
    );
}

#[tokio::test]
async fn checks_refuse_what_the_host_resolves_to() {
    let targets = TargetConfig {
        deny_networks: vec!["127.0.0.0/8".into(), "::1".into()],
        ..TargetConfig::default()
    };
    let app = TestApp::start_with_targets(&targets).await;
    let mut client = app.client("acme", Role::Operator).await;
    let target = app.env.database().await.expect("target database");
    // `localhost` is only a name when stored; its addresses are loopback, denied above.
    let url = target.url.replacen("127.0.0.1", "localhost", 1);
    let created = create(&mut client, pg_instance("local", &url))
        .await
        .expect("a name breaks no rule");
    let report = client
        .check_instance(CheckInstanceRequest {
            id: created.id.clone(),
        })
        .await
        .expect("check")
        .into_inner();
    let health = report.health.expect("health");
    assert!(!health.reachable);
    assert!(
        health.error.contains("of host localhost") && health.error.contains("127.0.0.0/8"),
        "{}",
        health.error
    );
    let connection = &report.findings[0];
    assert_eq!(connection.status, CheckStatus::Missing as i32);
    assert!(
        connection.fix.contains("KEEL_TARGET_DENY_NETWORKS"),
        "{}",
        connection.fix
    );

    // Under the default policy the same instance is reachable: the refusal came from the rule.
    let app = TestApp::start_with_targets(&TargetConfig::default()).await;
    let mut client = app.client("acme", Role::Operator).await;
    let created = create(&mut client, pg_instance("local", &url))
        .await
        .expect("create");
    let report = client
        .check_instance(CheckInstanceRequest { id: created.id })
        .await
        .expect("check")
        .into_inner();
    let health = report.health.expect("health");
    assert!(health.reachable, "{}", health.error);
}
