//! The registry's gRPC API against real PostgreSQL and NATS: behaviour, bad input, auth, concurrency.

mod common;

use std::collections::HashMap;

use common::*;
use keel_auth::Role;
use keel_proto::v1::*;
use prost_types::FieldMask;
use tonic::Code;

const URL: &str = "postgres://app:s3cret-pw@db.internal:5432/shop";

#[tokio::test]
async fn create_get_update_delete_round_trip() {
    let app = TestApp::start().await;
    let mut client = app.client("acme", Role::Operator).await;
    let mut instance = pg_instance("orders-db", URL);
    instance.environment = "production".into();
    instance.labels = HashMap::from([("tier".into(), "db".into())]);
    instance.monitoring_endpoints = vec![MonitoringEndpoint {
        kind: "postgres_exporter".into(),
        url: "http://exp:9187/metrics".into(),
    }];
    let created = create(&mut client, instance).await.expect("create");

    assert_eq!(
        created.connection_url,
        "postgres://app:****@db.internal:5432/shop"
    );
    assert_eq!(
        (
            created.version,
            created.tenant.as_str(),
            created.name.as_str()
        ),
        (1, "acme", "orders-db")
    );
    assert_eq!(
        uuid::Uuid::parse_str(&created.id)
            .expect("uuid")
            .get_version_num(),
        7
    );
    assert_eq!(
        get(&mut client, &created.id).await.expect("get by id"),
        created
    );
    let by_name = client
        .get_instance(GetInstanceRequest {
            id: String::new(),
            name: "orders-db".into(),
        })
        .await
        .expect("get by name")
        .into_inner()
        .instance;
    assert_eq!(by_name.as_ref(), Some(&created));

    let updated = client
        .update_instance(UpdateInstanceRequest {
            id: created.id.clone(),
            instance: Some(Instance {
                environment: "staging".into(),
                name: "ignored-because-not-in-mask".into(),
                ..Default::default()
            }),
            update_mask: Some(FieldMask {
                paths: vec!["environment".into()],
            }),
            expected_version: 1,
        })
        .await
        .expect("update")
        .into_inner()
        .instance
        .expect("instance");
    assert_eq!(
        (
            updated.version,
            updated.environment.as_str(),
            updated.name.as_str()
        ),
        (2, "staging", "orders-db")
    );
    assert_eq!(
        updated.labels, created.labels,
        "fields outside the mask are kept"
    );

    client
        .delete_instance(DeleteInstanceRequest {
            id: created.id.clone(),
            expected_version: 2,
        })
        .await
        .expect("delete");
    assert_status(
        get(&mut client, &created.id).await,
        Code::NotFound,
        "not found",
    );
    assert_status(
        client
            .delete_instance(DeleteInstanceRequest {
                id: created.id.clone(),
                expected_version: 0,
            })
            .await,
        Code::NotFound,
        "not found",
    );
}

#[tokio::test]
async fn lists_page_and_filter_by_labels_engine_and_environment() {
    let app = TestApp::start().await;
    let mut client = app.client("acme", Role::Operator).await;
    // name, engine, environment, labels
    type Spec = (
        &'static str,
        Engine,
        &'static str,
        &'static [(&'static str, &'static str)],
    );
    let specs: [Spec; 7] = [
        (
            "a",
            Engine::Postgres,
            "prod",
            &[("tier", "db"), ("region", "eu")],
        ),
        (
            "b",
            Engine::Postgres,
            "prod",
            &[("tier", "db"), ("region", "us")],
        ),
        (
            "c",
            Engine::Redis,
            "prod",
            &[("tier", "cache"), ("region", "eu")],
        ),
        ("d", Engine::Redis, "dev", &[("tier", "cache")]),
        (
            "e",
            Engine::Postgres,
            "dev",
            &[("tier", "db"), ("legacy", "")],
        ),
        ("f", Engine::Postgres, "dev", &[]),
        ("g", Engine::Redis, "prod", &[("region", "ap")]),
    ];
    for (name, engine, env, labels) in specs {
        let url = if engine == Engine::Redis {
            "redis://cache:6379"
        } else {
            URL
        };
        let instance = Instance {
            name: name.into(),
            engine: engine as i32,
            connection_url: url.into(),
            environment: env.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        };
        create(&mut client, instance).await.expect("create");
    }
    // Another tenant's instances never show up.
    create(
        &mut app.client("other", Role::Operator).await,
        pg_instance("a", URL),
    )
    .await
    .expect("other tenant");

    let mut list = async |selector: &str,
                          engine: Engine,
                          environment: &str|
           -> Result<Vec<String>, tonic::Status> {
        let mut names = Vec::new();
        let mut page_token = String::new();
        loop {
            let page = client
                .list_instances(ListInstancesRequest {
                    page_size: 2,
                    page_token,
                    label_selector: selector.into(),
                    engine: engine as i32,
                    environment: environment.into(),
                    tenant: String::new(),
                })
                .await?
                .into_inner();
            assert!(page.instances.len() <= 2);
            names.extend(page.instances.into_iter().map(|i| i.name));
            if page.next_page_token.is_empty() {
                return Ok(names);
            }
            page_token = page.next_page_token;
        }
    };
    let u = Engine::Unspecified;
    assert_eq!(
        list("", u, "").await.expect("all"),
        ["a", "b", "c", "d", "e", "f", "g"]
    );
    assert_eq!(list("tier=db", u, "").await.expect("eq"), ["a", "b", "e"]);
    assert_eq!(
        list("tier!=db", u, "").await.expect("ne"),
        ["c", "d", "f", "g"]
    );
    assert_eq!(
        list("region in (eu,ap)", u, "").await.expect("in"),
        ["a", "c", "g"]
    );
    assert_eq!(
        list("region notin (eu)", u, "").await.expect("notin"),
        ["b", "d", "e", "f", "g"]
    );
    assert_eq!(list("legacy", u, "").await.expect("exists"), ["e"]);
    assert_eq!(
        list("tier,!legacy", u, "").await.expect("not exists"),
        ["a", "b", "c", "d"]
    );
    assert_eq!(list("tier=db,region=eu", u, "").await.expect("and"), ["a"]);
    assert_eq!(
        list("", Engine::Redis, "").await.expect("engine"),
        ["c", "d", "g"]
    );
    assert_eq!(list("", u, "dev").await.expect("env"), ["d", "e", "f"]);
    assert_eq!(
        list("tier=db", Engine::Postgres, "prod")
            .await
            .expect("combined"),
        ["a", "b"]
    );

    let first = client
        .list_instances(ListInstancesRequest {
            page_size: 2,
            label_selector: "tier=db".into(),
            ..Default::default()
        })
        .await
        .expect("first page")
        .into_inner();
    assert_status(
        client
            .list_instances(ListInstancesRequest {
                page_size: 2,
                page_token: first.next_page_token,
                label_selector: "tier=cache".into(),
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
        "was issued for other filters",
    );
    for (request, needle) in [
        (
            ListInstancesRequest {
                page_size: 5000,
                ..Default::default()
            },
            "page_size 5000 is out of range",
        ),
        (
            ListInstancesRequest {
                page_token: "garbage".into(),
                ..Default::default()
            },
            "page_token is not a token",
        ),
        (
            ListInstancesRequest {
                label_selector: "tier in (db".into(),
                ..Default::default()
            },
            "label_selector has an unclosed",
        ),
        (
            ListInstancesRequest {
                engine: 9,
                ..Default::default()
            },
            "engine 9 is unknown",
        ),
    ] {
        assert_status(
            client.list_instances(request).await,
            Code::InvalidArgument,
            needle,
        );
    }
}

#[tokio::test]
async fn bad_input_is_refused_with_what_to_fix_and_nothing_changes() {
    let app = TestApp::start().await;
    let mut client = app.client("acme", Role::Operator).await;
    let stored = create(&mut client, pg_instance("orders-db", URL))
        .await
        .expect("create");

    let megabyte = "x".repeat(1 << 20);
    let with = |f: &dyn Fn(&mut Instance)| {
        let mut instance = pg_instance("fresh", URL);
        f(&mut instance);
        instance
    };
    let bad_creates: Vec<(Instance, &str)> = vec![
        (with(&|i| i.name = String::new()), "name is required"),
        (
            with(&|i| i.name = "n".repeat(200)),
            "name is 200 characters long; at most 63",
        ),
        (
            with(&|i| i.name = "Orders_DB".into()),
            "name \"Orders_DB\" is not allowed",
        ),
        (with(&|i| i.engine = 0), "engine is required"),
        (with(&|i| i.engine = 42), "engine 42 is unknown"),
        (
            with(&|i| i.connection_url = "postgres//missing-colon".into()),
            "connection_url is not a valid URL",
        ),
        (
            with(&|i| i.connection_url = "mysql://app:pw@db/shop".into()),
            "scheme \"mysql\" is not supported",
        ),
        (
            with(&|i| i.connection_url = "postgres://app:****@db/shop".into()),
            "masked credential",
        ),
        (
            with(&|i| i.labels = HashMap::from([("bad key".into(), "v".into())])),
            "not a Kubernetes label key",
        ),
        (
            with(&|i| i.labels = HashMap::from([("k".into(), megabyte.clone())])),
            "request is",
        ),
        (with(&|i| i.environment = megabyte.clone()), "request is"),
        (with(&|i| i.name = "orders-db".into()), "already exists"),
    ];
    for (instance, needle) in bad_creates {
        let code = if needle == "already exists" {
            Code::AlreadyExists
        } else {
            Code::InvalidArgument
        };
        assert_status(create(&mut client, instance).await, code, needle);
    }
    // A create has no update mask to talk about.
    let masked = create(
        &mut client,
        with(&|i| i.connection_url = "postgres://app:****@db/shop".into()),
    )
    .await
    .expect_err("masked url created");
    assert!(
        !masked.message().contains("update"),
        "{:?} talks about updates",
        masked.message()
    );
    assert_status(
        client
            .create_instance(CreateInstanceRequest { instance: None })
            .await,
        Code::InvalidArgument,
        "instance is required",
    );

    let update =
        |paths: &[&str], instance: Instance, expected_version: i64| UpdateInstanceRequest {
            id: stored.id.clone(),
            instance: Some(instance),
            update_mask: Some(FieldMask {
                paths: paths.iter().map(|p| p.to_string()).collect(),
            }),
            expected_version,
        };
    let bad_updates = [
        (
            update(
                &["connection_url"],
                Instance {
                    connection_url: stored.connection_url.clone(),
                    ..Default::default()
                },
                1,
            ),
            "send the real password, or leave connection_url out of update_mask",
        ),
        (
            update(
                &["connection_url"],
                Instance {
                    connection_url: "redis://cache:6379".into(),
                    ..Default::default()
                },
                1,
            ),
            "use postgres://",
        ),
        (
            update(&["engine"], Instance::default(), 1),
            "engine is fixed at creation",
        ),
        (
            update(&["colour"], Instance::default(), 1),
            "\"colour\" is not a field",
        ),
        (
            update(&[], Instance::default(), 1),
            "update_mask is required",
        ),
        (
            update(&["environment"], Instance::default(), 0),
            "expected_version is required",
        ),
        (
            update(
                &["name"],
                Instance {
                    name: String::new(),
                    ..Default::default()
                },
                1,
            ),
            "name is required",
        ),
        (
            update(
                &["labels"],
                Instance {
                    labels: HashMap::from([("a/b/c".into(), "v".into())]),
                    ..Default::default()
                },
                1,
            ),
            "label key",
        ),
    ];
    for (request, needle) in bad_updates {
        assert_status(
            client.update_instance(request).await,
            Code::InvalidArgument,
            needle,
        );
    }
    assert_status(
        get(&mut client, "not-a-uuid").await,
        Code::InvalidArgument,
        "is not a UUID",
    );

    assert_eq!(app.instance_count().await, 1);
    assert_eq!(
        get(&mut client, &stored.id).await.expect("still there"),
        stored,
        "the stored instance is untouched"
    );
    let events = app.events(1).await;
    assert_eq!(
        events.len(),
        1,
        "only the successful create emitted an event"
    );
}

#[tokio::test]
async fn a_stale_version_is_aborted_and_changes_nothing() {
    let app = TestApp::start().await;
    let mut client = app.client("acme", Role::Operator).await;
    let stored = create(&mut client, pg_instance("orders-db", URL))
        .await
        .expect("create");
    let relabel = |value: &str, expected_version| UpdateInstanceRequest {
        id: stored.id.clone(),
        instance: Some(Instance {
            labels: HashMap::from([("owner".into(), value.into())]),
            ..Default::default()
        }),
        update_mask: Some(FieldMask {
            paths: vec!["labels".into()],
        }),
        expected_version,
    };
    let current = client
        .update_instance(relabel("alice", 1))
        .await
        .expect("first writer")
        .into_inner()
        .instance
        .expect("instance");
    assert_status(
        client.update_instance(relabel("bob", 1)).await,
        Code::Aborted,
        "stored version is 2, request expected 1",
    );
    assert_status(
        client
            .delete_instance(DeleteInstanceRequest {
                id: stored.id.clone(),
                expected_version: 1,
            })
            .await,
        Code::Aborted,
        "stored version is 2",
    );
    assert_eq!(get(&mut client, &stored.id).await.expect("get"), current);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_concurrent_writers_lose_no_update() {
    const WRITERS: usize = 20;
    const INCREMENTS: usize = 5;
    let app = TestApp::start().await;
    let mut client = app.client("acme", Role::Operator).await;
    let stored = create(&mut client, pg_instance("counter", URL))
        .await
        .expect("create");

    let mut tasks = tokio::task::JoinSet::new();
    for writer in 0..WRITERS {
        let mut client = client.clone();
        let id = stored.id.clone();
        tasks.spawn(async move {
            let mut conflicts = 0;
            for _ in 0..INCREMENTS {
                loop {
                    let current = get(&mut client, &id).await.expect("read");
                    let count: usize = current
                        .labels
                        .get("count")
                        .map_or(0, |c| c.parse().expect("number"));
                    let mut labels = current.labels.clone();
                    labels.insert("count".into(), (count + 1).to_string());
                    labels.insert("last-writer".into(), writer.to_string());
                    let result = client
                        .update_instance(UpdateInstanceRequest {
                            id: id.clone(),
                            instance: Some(Instance {
                                labels,
                                ..Default::default()
                            }),
                            update_mask: Some(FieldMask {
                                paths: vec!["labels".into()],
                            }),
                            expected_version: current.version,
                        })
                        .await;
                    match result {
                        Ok(_) => break,
                        Err(status) if status.code() == Code::Aborted => conflicts += 1,
                        Err(status) => panic!("writer {writer}: {status}"),
                    }
                }
            }
            conflicts
        });
    }
    let conflicts: usize = tasks.join_all().await.into_iter().sum();
    let last = get(&mut client, &stored.id).await.expect("final read");
    assert_eq!(
        last.labels["count"],
        (WRITERS * INCREMENTS).to_string(),
        "an increment was lost"
    );
    assert_eq!(last.version, 1 + (WRITERS * INCREMENTS) as i64);
    assert!(
        conflicts > 0,
        "writers never collided, so the test proved nothing"
    );
    // Every successful update produced exactly one event.
    assert_eq!(
        app.events(1 + WRITERS * INCREMENTS).await.len(),
        1 + WRITERS * INCREMENTS
    );
}

#[tokio::test]
async fn keys_roles_and_tenants_are_enforced() {
    let app = TestApp::start().await;
    let mut operator = app.client("acme", Role::Operator).await;
    let stored = create(&mut operator, pg_instance("orders-db", URL))
        .await
        .expect("create");

    let mut anonymous = app.client_with(None, None).await;
    assert_status(
        get(&mut anonymous, &stored.id).await,
        Code::Unauthenticated,
        "missing API key",
    );
    let mut forged = app
        .client_with(
            Some("keel_notarealkeynotarealkeynotarealkey123".into()),
            None,
        )
        .await;
    assert_status(
        get(&mut forged, &stored.id).await,
        Code::Unauthenticated,
        "invalid API key",
    );

    let mut viewer = app.client("acme", Role::Viewer).await;
    assert_eq!(
        get(&mut viewer, &stored.id).await.expect("viewer reads"),
        stored
    );
    assert_status(
        create(&mut viewer, pg_instance("x", URL)).await,
        Code::PermissionDenied,
        "needs operator",
    );
    assert_status(
        viewer
            .check_instance(CheckInstanceRequest {
                id: stored.id.clone(),
            })
            .await,
        Code::PermissionDenied,
        "needs operator",
    );

    let mut stranger = app.client("globex", Role::Admin).await;
    assert_status(
        get(&mut stranger, &stored.id).await,
        Code::NotFound,
        "not found",
    );
    assert_status(
        stranger
            .delete_instance(DeleteInstanceRequest {
                id: stored.id.clone(),
                expected_version: 0,
            })
            .await,
        Code::NotFound,
        "not found",
    );
    let listed = stranger
        .list_instances(ListInstancesRequest::default())
        .await
        .expect("list")
        .into_inner();
    assert!(
        listed.instances.is_empty(),
        "another tenant's instances leaked: {listed:?}"
    );

    // Clear connections are for service identities only, not even for admins.
    let connection = |id: &str| GetInstanceConnectionRequest { id: id.into() };
    let mut admin = app.client("acme", Role::Admin).await;
    assert_status(
        admin.get_instance_connection(connection(&stored.id)).await,
        Code::PermissionDenied,
        "needs service",
    );
    let mut service = app.client("acme", Role::Service).await;
    let clear = service
        .get_instance_connection(connection(&stored.id))
        .await
        .expect("service reads")
        .into_inner();
    assert_eq!((clear.connection_url.as_str(), clear.version), (URL, 1));
    let mut foreign_service = app.client("globex", Role::Service).await;
    assert_status(
        foreign_service
            .get_instance_connection(connection(&stored.id))
            .await,
        Code::NotFound,
        "not found",
    );
}

#[tokio::test]
async fn names_are_unique_within_a_tenant_only() {
    let app = TestApp::start().await;
    let mut acme = app.client("acme", Role::Operator).await;
    let first = create(&mut acme, pg_instance("orders-db", URL))
        .await
        .expect("create");
    let second = create(&mut acme, pg_instance("billing-db", URL))
        .await
        .expect("create");
    assert_status(
        create(&mut acme, pg_instance("orders-db", URL)).await,
        Code::AlreadyExists,
        "\"orders-db\" already exists",
    );
    create(
        &mut app.client("globex", Role::Operator).await,
        pg_instance("orders-db", URL),
    )
    .await
    .expect("same name, other tenant");
    assert_status(
        acme.update_instance(UpdateInstanceRequest {
            id: second.id.clone(),
            instance: Some(Instance {
                name: first.name.clone(),
                ..Default::default()
            }),
            update_mask: Some(FieldMask {
                paths: vec!["name".into()],
            }),
            expected_version: 1,
        })
        .await,
        Code::AlreadyExists,
        "already exists",
    );
}

#[tokio::test]
async fn credentials_are_sealed_at_rest_and_rotate_to_a_new_key() {
    let app = TestApp::start().await;
    let mut client = app.client("acme", Role::Operator).await;
    let url = "postgres://app:pw-9f8e7d@db:5432/shop?sslmode=require&sslpassword=kp-1a2b3c";
    let stored = create(&mut client, pg_instance("orders-db", url))
        .await
        .expect("create");
    assert_eq!(
        stored.connection_url,
        "postgres://app:****@db:5432/shop?sslmode=require&sslpassword=****"
    );

    let row: String = sqlx::query_scalar("SELECT row_to_json(i)::text FROM registry.instances i")
        .fetch_one(&app.pool)
        .await
        .expect("row");
    for secret in ["pw-9f8e7d", "kp-1a2b3c"] {
        assert!(!row.contains(secret), "{secret} stored in clear: {row}");
    }

    let rotated = keel_registry::rotate_keys(
        app.pool.clone(),
        key_ring(&format!("{K2},{K1}")),
        10,
        |_| {},
    )
    .await
    .expect("rotate");
    assert_eq!(rotated, 1);
    let key_ids: Vec<String> = sqlx::query_scalar("SELECT DISTINCT key_id FROM registry.instances")
        .fetch_all(&app.pool)
        .await
        .expect("ids");
    assert_eq!(key_ids, ["k2"]);
    let version: i64 = sqlx::query_scalar("SELECT version FROM registry.instances")
        .fetch_one(&app.pool)
        .await
        .expect("v");
    assert_eq!(version, 1, "rotation is not a change of the instance");

    // A registry that only knows the new key reads the rotated credentials.
    let replica = app.replica(key_ring(K2)).await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", replica.grpc))
        .expect("uri")
        .connect()
        .await
        .expect("channel");
    let key = app.key("acme", Role::Service).await;
    let mut service_client =
        keel_proto::v1::registry_service_client::RegistryServiceClient::with_interceptor(
            channel,
            move |mut req: tonic::Request<()>| {
                req.metadata_mut().insert(
                    "authorization",
                    format!("Bearer {key}").parse().expect("ascii"),
                );
                Ok(req)
            },
        );
    let clear = service_client
        .get_instance_connection(GetInstanceConnectionRequest {
            id: stored.id.clone(),
        })
        .await
        .expect("decrypts under k2")
        .into_inner();
    assert_eq!(clear.connection_url, url);
}

#[tokio::test]
async fn check_reports_what_is_missing_with_the_fix() {
    let app = TestApp::start().await;
    let mut client = app.client("acme", Role::Operator).await;

    // The harness's PostgreSQL preloads pg_stat_statements and ships hypopg.
    let pg = create(&mut client, pg_instance("self", &app.database_url))
        .await
        .expect("create");
    let report = client
        .check_instance(CheckInstanceRequest { id: pg.id.clone() })
        .await
        .expect("check")
        .into_inner();
    let health = report.health.expect("health");
    assert!(health.reachable, "{}", health.error);
    assert_eq!(health.role, InstanceRole::Primary as i32);
    assert!(
        health.server_version.starts_with(char::is_numeric),
        "{}",
        health.server_version
    );
    let status_of = |findings: &[CheckFinding], name: &str| {
        findings
            .iter()
            .find(|f| f.name == name)
            .map(|f| (f.status, f.fix.clone()))
            .expect(name)
    };
    assert_eq!(
        status_of(&report.findings, "pg_stat_statements").0,
        CheckStatus::Ok as i32
    );
    assert_eq!(
        status_of(&report.findings, "hypopg").0,
        CheckStatus::Ok as i32
    );
    let stored = get(&mut client, &pg.id).await.expect("get");
    assert!(
        stored.health.expect("health").last_check_time.is_some(),
        "health is recorded"
    );
    assert_eq!(stored.version, 1, "a check is not a change of the instance");

    // Without the extension in the database, the fix names the statement to run.
    sqlx::query("DROP EXTENSION pg_stat_statements")
        .execute(&app.pool)
        .await
        .expect("drop extension");
    let report = client
        .check_instance(CheckInstanceRequest { id: pg.id.clone() })
        .await
        .expect("check")
        .into_inner();
    let (status, fix) = status_of(&report.findings, "pg_stat_statements");
    assert_eq!(status, CheckStatus::Missing as i32);
    assert!(fix.contains("CREATE EXTENSION pg_stat_statements"), "{fix}");

    // Redis: unlimited memory is flagged with the commands that fix it.
    let redis_url = app.env.redis_url().await.expect("redis");
    let redis = create(&mut client, redis_instance("cache", &redis_url))
        .await
        .expect("create redis");
    let report = client
        .check_instance(CheckInstanceRequest {
            id: redis.id.clone(),
        })
        .await
        .expect("check")
        .into_inner();
    assert!(report.health.expect("health").reachable);
    let (status, fix) = status_of(&report.findings, "maxmemory");
    assert_eq!(status, CheckStatus::Warning as i32);
    assert!(fix.contains("CONFIG SET maxmemory"), "{fix}");
    assert_eq!(
        status_of(&report.findings, "cluster_mode").0,
        CheckStatus::Ok as i32
    );

    // Unreachable: the error is recorded, without the password.
    let closed_port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr").port()
    };
    let down = create(
        &mut client,
        pg_instance(
            "down",
            &format!("postgres://app:hunter2-x@127.0.0.1:{closed_port}/db"),
        ),
    )
    .await
    .expect("create");
    let report = client
        .check_instance(CheckInstanceRequest {
            id: down.id.clone(),
        })
        .await
        .expect("check")
        .into_inner();
    let health = report.health.expect("health");
    assert!(!health.reachable);
    assert!(
        !health.error.is_empty() && !health.error.contains("hunter2"),
        "{}",
        health.error
    );
    assert_eq!(report.findings[0].status, CheckStatus::Missing as i32);
}
