//! Fleet callers (Keel's own services) across tenants, and tenant callers kept to theirs.

mod common;

use common::*;
use keel_auth::Role;
use keel_proto::v1::registry_service_client::RegistryServiceClient;
use keel_proto::v1::*;
use tonic::Code;

fn list(tenant: &str, page_size: i32, page_token: String) -> ListInstancesRequest {
    ListInstancesRequest {
        page_size,
        page_token,
        tenant: tenant.into(),
        ..Default::default()
    }
}

const ACME_URL: &str = "postgres://app:acme-secret@db-a:5432/shop";
const GLOBEX_URL: &str = "redis://:globex-secret@cache-g:6379";

/// Two instances of acme and one of globex, by their operators.
async fn seed(app: &TestApp) -> (Vec<Instance>, Instance) {
    let mut acme = app.client("acme", Role::Operator).await;
    let mut globex = app.client("globex", Role::Operator).await;
    let a1 = create(&mut acme, pg_instance("a1", ACME_URL))
        .await
        .expect("a1");
    let a2 = create(&mut acme, pg_instance("a2", ACME_URL))
        .await
        .expect("a2");
    let g1 = create(&mut globex, redis_instance("g1", GLOBEX_URL))
        .await
        .expect("g1");
    (vec![a1, a2], g1)
}

#[tokio::test]
async fn a_fleet_key_lists_and_reads_connections_across_tenants() {
    let app = TestApp::start().await;
    let (acme, globex) = seed(&app).await;
    let mut fleet = app.fleet_client("collector").await;

    let all = fleet
        .list_instances(list("", 0, String::new()))
        .await
        .expect("list all")
        .into_inner()
        .instances;
    let seen: Vec<(&str, &str)> = all
        .iter()
        .map(|i| (i.tenant.as_str(), i.name.as_str()))
        .collect();
    assert_eq!(seen, [("acme", "a1"), ("acme", "a2"), ("globex", "g1")]);

    let only_globex = fleet
        .list_instances(list("globex", 0, String::new()))
        .await
        .expect("list globex")
        .into_inner()
        .instances;
    assert_eq!(
        only_globex
            .iter()
            .map(|i| i.id.as_str())
            .collect::<Vec<_>>(),
        [globex.id.as_str()]
    );
    assert_status(
        fleet.list_instances(list("Globex", 0, String::new())).await,
        Code::InvalidArgument,
        "tenant \"Globex\" is not a valid name",
    );

    // Paging across tenants; the token stays bound to its tenant filter.
    let first = fleet
        .list_instances(list("", 1, String::new()))
        .await
        .expect("page 1")
        .into_inner();
    assert_eq!(first.instances[0].id, acme[0].id);
    assert_status(
        fleet
            .list_instances(list("acme", 1, first.next_page_token.clone()))
            .await,
        Code::InvalidArgument,
        "keep label_selector, engine, environment and tenant the same",
    );
    let second = fleet
        .list_instances(list("", 1, first.next_page_token))
        .await
        .expect("page 2")
        .into_inner();
    assert_eq!(second.instances[0].id, acme[1].id);

    // Clear connections of any tenant's instance, decrypted with the row's tenant.
    for (instance, url) in [(&acme[0], ACME_URL), (&globex, GLOBEX_URL)] {
        let clear = fleet
            .get_instance_connection(GetInstanceConnectionRequest {
                id: instance.id.clone(),
            })
            .await
            .expect("connection")
            .into_inner();
        assert_eq!(clear.connection_url, url);
        let got = get(&mut fleet, &instance.id).await.expect("get by id");
        assert_eq!(got.tenant, instance.tenant);
    }
    assert_status(
        fleet
            .get_instance(GetInstanceRequest {
                id: String::new(),
                name: "a1".into(),
            })
            .await,
        Code::InvalidArgument,
        "a fleet caller must send the id",
    );

    // Writes stay refused: a fleet key is service-only.
    assert_status(
        create(&mut fleet, pg_instance("f1", ACME_URL)).await,
        Code::PermissionDenied,
        "role service may not create instances",
    );
    assert_status(
        fleet
            .delete_instance(DeleteInstanceRequest {
                id: globex.id.clone(),
                expected_version: 0,
            })
            .await,
        Code::PermissionDenied,
        "role service may not delete instances",
    );
    assert_eq!(app.instance_count().await, 3, "nothing stored is lost");
}

#[tokio::test]
async fn a_tenant_key_still_sees_only_its_own_tenant() {
    let app = TestApp::start().await;
    let (acme, globex) = seed(&app).await;
    let mut viewer = app.client("acme", Role::Viewer).await;
    let mut service = app.client("acme", Role::Service).await;

    for tenant in ["", "acme"] {
        let listed = viewer
            .list_instances(list(tenant, 0, String::new()))
            .await
            .expect("own tenant")
            .into_inner()
            .instances;
        assert_eq!(
            listed.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(),
            [acme[0].id.as_str(), acme[1].id.as_str()],
            "tenant filter {tenant:?}"
        );
    }
    assert_status(
        viewer
            .list_instances(list("globex", 0, String::new()))
            .await,
        Code::PermissionDenied,
        "a key of tenant acme may list only tenant acme's instances, not tenant globex's",
    );
    // A tenant's service key reads its own connections, not another tenant's.
    assert_status(
        service
            .get_instance_connection(GetInstanceConnectionRequest {
                id: globex.id.clone(),
            })
            .await,
        Code::NotFound,
        "not found",
    );
    assert_status(
        get(&mut viewer, &globex.id).await,
        Code::NotFound,
        "not found",
    );
}

#[tokio::test]
async fn services_of_one_process_call_the_registry_in_process() {
    let app = TestApp::start().await;
    let (acme, globex) = seed(&app).await;
    let mut client = RegistryServiceClient::new(app.in_process());

    let all = client
        .list_instances(list("", 0, String::new()))
        .await
        .expect("in-process list")
        .into_inner()
        .instances;
    assert_eq!(all.len(), 3);
    let clear = client
        .get_instance_connection(GetInstanceConnectionRequest {
            id: globex.id.clone(),
        })
        .await
        .expect("in-process connection")
        .into_inner();
    assert_eq!(clear.connection_url, GLOBEX_URL);
    assert_status(
        client
            .delete_instance(DeleteInstanceRequest {
                id: acme[0].id.clone(),
                expected_version: 0,
            })
            .await,
        Code::PermissionDenied,
        "role service may not delete instances",
    );
}
