//! The collector as a deployment runs it: targets from the registry, scrapes of real PostgreSQL
//! and Redis, history, alerts and their events, replicas sharing the work.

use std::collections::HashMap;
use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
use futures::StreamExt as _;
use keel_auth::Role;
use keel_collector::CollectorConfig;
use keel_collector::rules::{Override, Rules};
use keel_e2e::Deployment;
use keel_proto::v1::collector_service_client::CollectorServiceClient;
use keel_proto::v1::registry_service_client::RegistryServiceClient;
use keel_proto::v1::*;
use prost::Message as _;
use sqlx::{Connection as _, Executor as _, PgConnection};
use tonic::transport::Channel;

type Bearer =
    Box<dyn FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Send + Sync>;
type Intercept = tonic::service::interceptor::InterceptedService<Channel, Bearer>;

struct Clients {
    registry: RegistryServiceClient<Intercept>,
    collector: CollectorServiceClient<Intercept>,
}

async fn clients(keel: &Deployment, key: &str) -> anyhow::Result<Clients> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", keel.grpc))?
        .connect()
        .await?;
    let auth = || -> Bearer { Box::new(keel_auth::bearer_interceptor(key.to_owned().into())) };
    Ok(Clients {
        registry: RegistryServiceClient::with_interceptor(channel.clone(), auth()),
        collector: CollectorServiceClient::with_interceptor(channel, auth()),
    })
}

/// Collector settings for tests: scrapes every second, quick to notice changes.
fn fast() -> CollectorConfig {
    CollectorConfig {
        interval: Duration::from_secs(1),
        timeout: Duration::from_secs(1),
        poll_interval: Duration::from_millis(100),
        metrics_refresh: Duration::from_millis(200),
        ..CollectorConfig::default()
    }
}

async fn register(
    c: &mut Clients,
    name: &str,
    engine: Engine,
    url: &str,
    labels: &[(&str, &str)],
) -> anyhow::Result<String> {
    let created = c
        .registry
        .create_instance(CreateInstanceRequest {
            instance: Some(Instance {
                name: name.to_owned(),
                engine: engine as i32,
                connection_url: url.to_owned(),
                labels: labels
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
                ..Instance::default()
            }),
        })
        .await?
        .into_inner();
    Ok(created.instance.map(|i| i.id).unwrap_or_default())
}

/// Waits up to `within` for `check` to return `Some`.
async fn eventually<T, F, Fut>(within: Duration, what: &str, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(value) = check().await? {
            return Ok(value);
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn metrics(c: &mut Clients, id: &str) -> Result<GetInstanceMetricsResponse, tonic::Status> {
    c.collector
        .get_instance_metrics(GetInstanceMetricsRequest {
            instance_id: id.to_owned(),
            ..Default::default()
        })
        .await
        .map(tonic::Response::into_inner)
}

fn latest(m: &GetInstanceMetricsResponse, name: &str) -> Option<f64> {
    m.latest
        .iter()
        .find(|s| s.name == name && s.labels.is_empty())
        .map(|s| s.value)
}

async fn top_calls(c: &mut Clients, id: &str, marker: &str) -> anyhow::Result<i64> {
    let top = c
        .collector
        .list_top_queries(ListTopQueriesRequest {
            instance_id: id.to_owned(),
            limit: 1000,
            ..Default::default()
        })
        .await?
        .into_inner();
    Ok(top
        .queries
        .iter()
        .filter(|q| q.text.contains(marker))
        .map(|q| q.calls)
        .sum())
}

async fn collect(c: &mut Clients, id: &str) -> anyhow::Result<CollectNowResponse> {
    Ok(c.collector
        .collect_now(CollectNowRequest {
            instance_id: id.to_owned(),
        })
        .await?
        .into_inner())
}

async fn run(conn: &mut PgConnection, sql: &str, times: usize) -> anyhow::Result<()> {
    for _ in 0..times {
        conn.execute(sql).await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statement_deltas_survive_a_reset_and_an_entry_that_comes_back() -> anyhow::Result<()> {
    // Scheduled scrapes far apart: the test's own CollectNow calls decide the intervals.
    let keel = Deployment::start_with(CollectorConfig {
        interval: Duration::from_secs(3600),
        ..fast()
    })
    .await?;
    let operator = keel.key("acme", Role::Operator, "e2e-operator").await?;
    let mut c = clients(&keel, &operator).await?;
    let db = keel.env.database().await?;
    let mut target = PgConnection::connect(&db.url).await?;
    target.execute("CREATE TABLE delta_marker (x int)").await?;
    let id = register(&mut c, "shop", Engine::Postgres, &db.url, &[]).await?;
    let query = "SELECT count(*) FROM delta_marker WHERE x = 1";

    let first = collect(&mut c, &id).await?;
    assert!(first.status.as_ref().is_some_and(|s| s.up), "{first:?}");

    run(&mut target, query, 5).await?;
    collect(&mut c, &id).await?;
    assert_eq!(
        top_calls(&mut c, &id, "delta_marker").await?,
        5,
        "five calls after the baseline"
    );

    // The entry removed (what an eviction does) and back with fewer calls than before.
    let (userid, dbid, queryid): (i64, i64, i64) = sqlx::query_as(
        "SELECT userid::int8, dbid::int8, queryid FROM pg_stat_statements \
         WHERE query LIKE '%delta_marker WHERE%' AND dbid = (SELECT oid FROM pg_database WHERE datname = current_database())",
    )
    .fetch_one(&mut target)
    .await?;
    sqlx::query("SELECT pg_stat_statements_reset($1::oid, $2::oid, $3)")
        .bind(userid)
        .bind(dbid)
        .bind(queryid)
        .execute(&mut target)
        .await?;
    run(&mut target, query, 2).await?;
    collect(&mut c, &id).await?;
    assert_eq!(
        top_calls(&mut c, &id, "delta_marker").await?,
        7,
        "two more, not 2 - 5"
    );

    // A full reset moves stats_reset: every counter since is new work.
    target.execute("SELECT pg_stat_statements_reset()").await?;
    run(&mut target, query, 3).await?;
    collect(&mut c, &id).await?;
    assert_eq!(
        top_calls(&mut c, &id, "delta_marker").await?,
        10,
        "three more after the reset"
    );

    let top = c
        .collector
        .list_top_queries(ListTopQueriesRequest {
            instance_id: id.clone(),
            ..Default::default()
        })
        .await?
        .into_inner();
    for q in &top.queries {
        assert!(
            q.calls >= 0 && q.total_exec_seconds >= 0.0 && q.rows >= 0,
            "negative work: {q:?}"
        );
        assert!((0.0..=1.0).contains(&q.share_of_total_time), "{q:?}");
    }
    assert!(top.covered_from.is_some());
    // The collector's own statements run on the target too; they are not the workload.
    let own: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_statements WHERE query LIKE '/* keel-collector */%' \
         AND dbid = (SELECT oid FROM pg_database WHERE datname = current_database())",
    )
    .fetch_one(&mut target)
    .await?;
    assert!(own > 0, "the collector's statements do not carry its mark");
    assert!(
        !top.queries
            .iter()
            .any(|q| q.text.contains("keel-collector")),
        "the collector's own statements in the workload: {top:?}"
    );
    keel.stop().await
}

/// A TCP server that accepts connections and never says a word; counts the connections.
async fn silent_server() -> anyhow::Result<(u16, tokio::sync::watch::Receiver<usize>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let (tx, rx) = tokio::sync::watch::channel(0usize);
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
            let _ = tx.send(held.len());
        }
    });
    Ok((port, rx))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_target_times_out_and_the_others_stay_on_time() -> anyhow::Result<()> {
    let keel = Deployment::start_with(fast()).await?;
    let operator = keel.key("acme", Role::Operator, "e2e-operator").await?;
    let mut c = clients(&keel, &operator).await?;
    let (port, _) = silent_server().await?;
    let hung = register(
        &mut c,
        "hung",
        Engine::Postgres,
        &format!("postgres://app:pw@127.0.0.1:{port}/shop"),
        &[],
    )
    .await?;
    let db = keel.env.database().await?;
    let good = register(&mut c, "good", Engine::Postgres, &db.url, &[]).await?;

    // Let several intervals pass: the good target keeps its 1 s rhythm while the hung one
    // takes its whole timeout every time.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let hung_status = metrics(&mut c, &hung).await?.status.unwrap_or_default();
    assert!(!hung_status.up, "{hung_status:?}");
    assert!(
        hung_status
            .problems
            .iter()
            .any(|p| p.contains("no answer within the scrape timeout of 1000 ms")),
        "{hung_status:?}"
    );
    let good_metrics = metrics(&mut c, &good).await?;
    let status = good_metrics.status.clone().unwrap_or_default();
    assert!(status.up, "{status:?}");
    let scraped = status.scraped_at.map(|t| t.seconds).unwrap_or_default();
    let now = chrono::Utc::now().timestamp();
    assert!(
        now - scraped <= 2,
        "the good target was last scraped {}s ago",
        now - scraped
    );

    // Its history holds a scrape for (nearly) every second.
    let pool = sqlx::PgPool::connect(&keel.database_url).await?;
    let scrapes: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM collector.samples WHERE instance_id = $1::uuid AND metric = 'keel_target_up' AND value = 1",
    )
    .bind(&good)
    .fetch_one(&pool)
    .await?;
    assert!(
        scrapes >= 3,
        "only {scrapes} scrapes of the good target in 5 s"
    );
    assert!(latest(&good_metrics, "keel_pg_max_connections").is_some_and(|v| v > 0.0));
    keel.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_deleted_mid_scrape_leaves_nothing_behind() -> anyhow::Result<()> {
    let keel = Deployment::start_with(fast()).await?;
    let operator = keel.key("acme", Role::Operator, "e2e-operator").await?;
    let mut c = clients(&keel, &operator).await?;
    let (port, mut connections) = silent_server().await?;
    let id = register(
        &mut c,
        "leaving",
        Engine::Postgres,
        &format!("postgres://app:pw@127.0.0.1:{port}/shop"),
        // The first scrape comes at a random point of the first interval.
        &[
            ("collector.keel.dev/interval", "8s"),
            ("collector.keel.dev/timeout", "3s"),
        ],
    )
    .await?;
    // The scrape is under way (connected, waiting for an answer) when the instance goes.
    tokio::time::timeout(Duration::from_secs(12), connections.wait_for(|n| *n > 0)).await??;
    c.registry
        .delete_instance(DeleteInstanceRequest {
            id: id.clone(),
            expected_version: 0,
        })
        .await?;
    let pool = sqlx::PgPool::connect(&keel.database_url).await?;
    eventually(
        Duration::from_secs(10),
        "the target to be dropped",
        || async {
            let left: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM collector.targets WHERE instance_id = $1::uuid",
            )
            .bind(&id)
            .fetch_one(&pool)
            .await?;
            Ok((left == 0).then_some(()))
        },
    )
    .await?;
    // The scrape ends at its timeout and finds nothing to write to.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let state: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM collector.scrape_state WHERE instance_id = $1::uuid",
    )
    .bind(&id)
    .fetch_one(&pool)
    .await?;
    assert_eq!(state, 0);
    let status = metrics(&mut c, &id).await.expect_err("gone");
    assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
    let body = reqwest_metrics(keel.http).await?;
    assert!(!body.contains("instance=\"leaving\""), "{body}");
    keel.stop().await
}

/// `/metrics` of a listener, as Prometheus asks for it.
async fn reqwest_metrics(addr: std::net::SocketAddr) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut socket = tokio::net::TcpStream::connect(addr).await?;
    socket
        .write_all(format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut body = String::new();
    socket.read_to_string(&mut body).await?;
    Ok(body)
}

async fn next_event(events: &mut pull::Stream) -> anyhow::Result<(String, Event)> {
    let message = tokio::time::timeout(Duration::from_secs(15), events.next())
        .await?
        .ok_or_else(|| anyhow::anyhow!("stream ended"))??;
    Ok((
        message.subject.to_string(),
        Event::decode(message.payload.as_ref())?,
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alert_fires_and_resolves_on_a_real_long_running_query() -> anyhow::Result<()> {
    let rules = Rules::with_overrides(vec![Override {
        rule: "PostgresLongRunningQuery".into(),
        match_labels: [("tier".to_owned(), "test".to_owned())].into(),
        threshold: Some(1.0),
        for_: Some("0s".into()),
        disabled: false,
    }])?;
    let keel = Deployment::start_with(CollectorConfig { rules, ..fast() }).await?;
    let operator = keel.key("acme", Role::Operator, "e2e-operator").await?;
    let mut c = clients(&keel, &operator).await?;
    let db = keel.env.database().await?;
    let id = register(
        &mut c,
        "sleepy",
        Engine::Postgres,
        &db.url,
        &[("tier", "test")],
    )
    .await?;

    let js = async_nats::jetstream::new(async_nats::connect(&keel.nats_url).await?);
    let consumer = js
        .get_stream("KEEL")
        .await?
        .create_consumer(pull::Config {
            filter_subject: "keel.collector.acme.alert.>".into(),
            deliver_policy: DeliverPolicy::All,
            ack_policy: AckPolicy::None,
            ..Default::default()
        })
        .await?;
    let mut events = consumer.messages().await?;

    let mut sleeper = PgConnection::connect(&db.url).await?;
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut sleeper)
        .await?;
    let sleeping =
        tokio::spawn(async move { sleeper.execute("SELECT pg_sleep(60)").await.map(|_| ()) });

    let (subject, firing) = next_event(&mut events).await?;
    assert_eq!(subject, "keel.collector.acme.alert.firing");
    assert_eq!(firing.r#type, "keel.collector.alert.firing");
    let Some(event::Payload::AlertFiring(AlertFiring { alert: Some(alert) })) = firing.payload
    else {
        anyhow::bail!("not a firing payload: {firing:?}");
    };
    assert_eq!(alert.rule, "PostgresLongRunningQuery");
    assert_eq!(alert.instance_id, id);
    assert_eq!(
        alert.labels.get("instance").map(String::as_str),
        Some("sleepy")
    );
    assert!(alert.value > 1.0, "{alert:?}");
    assert!(
        alert
            .annotations
            .get("summary")
            .is_some_and(|s| s.contains("running for")),
        "{alert:?}"
    );
    let listed = c
        .collector
        .list_alerts(ListAlertsRequest {
            instance_id: id.clone(),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert!(
        listed
            .alerts
            .iter()
            .any(|a| a.fingerprint == alert.fingerprint && a.state == AlertState::Firing as i32),
        "{listed:?}"
    );

    // The query ends: the next scrape resolves the alert, same fingerprint.
    let mut admin = PgConnection::connect(&db.url).await?;
    sqlx::query("SELECT pg_cancel_backend($1)")
        .bind(pid)
        .execute(&mut admin)
        .await?;
    assert!(sleeping.await?.is_err(), "the sleep was cancelled");
    let (subject, resolved) = next_event(&mut events).await?;
    assert_eq!(subject, "keel.collector.acme.alert.resolved");
    let Some(event::Payload::AlertResolved(AlertResolved { alert: Some(done) })) = resolved.payload
    else {
        anyhow::bail!("not a resolved payload: {resolved:?}");
    };
    assert_eq!(done.fingerprint, alert.fingerprint);
    assert_eq!(done.state, AlertState::Resolved as i32);
    assert!(done.resolved_at.is_some());
    let active = c
        .collector
        .list_alerts(ListAlertsRequest {
            instance_id: id.clone(),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert!(active.alerts.is_empty(), "{active:?}");
    keel.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_collectors_never_scrape_a_target_twice_in_one_interval() -> anyhow::Result<()> {
    let keel = Deployment::start_with(fast()).await?;
    let replica = keel.collector_replica(fast()).await?;
    let operator = keel.key("acme", Role::Operator, "e2e-operator").await?;
    let mut c = clients(&keel, &operator).await?;
    let mut ids = Vec::new();
    for i in 0..8 {
        let db = keel.env.database().await?;
        ids.push(
            register(
                &mut c,
                &format!("shard-{i}"),
                Engine::Postgres,
                &db.url,
                &[("collector.keel.dev/interval", "2s")],
            )
            .await?,
        );
    }
    tokio::time::sleep(Duration::from_secs(9)).await;
    replica.stop().await?;

    let pool = sqlx::PgPool::connect(&keel.database_url).await?;
    let rows: Vec<(String, chrono::DateTime<chrono::Utc>)> = sqlx::query_as(
        "SELECT instance_id::text, at FROM collector.samples WHERE metric = 'keel_target_up' ORDER BY instance_id, at",
    )
    .fetch_all(&pool)
    .await?;
    let mut by_target: HashMap<String, Vec<chrono::DateTime<chrono::Utc>>> = HashMap::new();
    for (id, at) in rows {
        by_target.entry(id).or_default().push(at);
    }
    for id in &ids {
        let times = by_target.get(id).map(Vec::as_slice).unwrap_or_default();
        assert!(
            times.len() >= 3,
            "target {id} scraped {} times in 9 s",
            times.len()
        );
        for pair in times.windows(2) {
            let gap = (pair[1] - pair[0]).num_milliseconds();
            // Claims move next_run_at a whole interval; a little slack for clock reads.
            assert!(gap >= 1800, "target {id} scraped twice within {gap} ms");
        }
    }
    // Both replicas did part of the work.
    let own = reqwest_metrics(keel.http).await?;
    assert!(scrapes_ok(&own) > 0, "{own}");
    keel.stop().await
}

fn scrapes_ok(metrics: &str) -> u64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("keel_collector_scrapes_total{") && l.contains("outcome=\"ok\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_tenants_target_is_scraped_but_invisible_to_this_tenant() -> anyhow::Result<()> {
    let keel = Deployment::start_with(fast()).await?;
    let globex = keel.key("globex", Role::Operator, "e2e-globex").await?;
    let acme = keel.key("acme", Role::Operator, "e2e-acme").await?;
    let mut g = clients(&keel, &globex).await?;
    let mut a = clients(&keel, &acme).await?;
    let db = keel.env.database().await?;
    let id = register(&mut g, "secret-db", Engine::Postgres, &db.url, &[]).await?;

    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let scraped = loop {
        // NOT_FOUND until the registry's event reaches the collector.
        match metrics(&mut g, &id).await {
            Ok(m) if m.status.as_ref().is_some_and(|s| s.up) => break m,
            Ok(_) => {}
            Err(status) if status.code() == tonic::Code::NotFound => {}
            Err(status) => return Err(status.into()),
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "no scrape within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(scraped.instance_name, "secret-db");
    for status in [
        metrics(&mut a, &id).await.expect_err("hidden"),
        a.collector
            .list_top_queries(ListTopQueriesRequest {
                instance_id: id.clone(),
                ..Default::default()
            })
            .await
            .expect_err("hidden"),
        a.collector
            .collect_now(CollectNowRequest {
                instance_id: id.clone(),
            })
            .await
            .expect_err("hidden"),
    ] {
        assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
    }
    // The exposition is re-rendered every 200 ms here, after the scrape it waited for.
    let up = "keel_target_up{tenant=\"globex\",instance=\"secret-db\"} 1";
    let body = eventually(Duration::from_secs(5), "the target on /metrics", || async {
        let body = reqwest_metrics(keel.http).await?;
        Ok(body.contains(up).then_some(body))
    })
    .await?;
    assert!(
        !body.contains(&db.url) && !body.contains("postgres://"),
        "a URL in /metrics"
    );
    keel.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_info_slowlog_and_latency_are_collected() -> anyhow::Result<()> {
    let keel = Deployment::start_with(fast()).await?;
    let operator = keel.key("acme", Role::Operator, "e2e-operator").await?;
    let mut c = clients(&keel, &operator).await?;
    let url = keel.env.redis_url().await?;
    let client = redis::Client::open(url.as_str())?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("slowlog-log-slower-than")
        .arg(0)
        .query_async(&mut conn)
        .await?;
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("latency-monitor-threshold")
        .arg(1)
        .query_async(&mut conn)
        .await?;
    let _: () = redis::cmd("SET")
        .arg("k")
        .arg("v")
        .query_async(&mut conn)
        .await?;
    let _: () = redis::cmd("DEBUG")
        .arg("SLEEP")
        .arg("0.01")
        .query_async(&mut conn)
        .await
        .unwrap_or(());
    let id = register(&mut c, "cache", Engine::Redis, &url, &[]).await?;

    let scraped = collect(&mut c, &id).await?;
    let status = scraped.status.clone().unwrap_or_default();
    assert!(status.up, "{status:?}");
    let value = |name: &str| {
        scraped
            .latest
            .iter()
            .find(|m| m.name == name)
            .map(|m| m.value)
    };
    assert!(
        value("keel_redis_memory_used_bytes").is_some_and(|v| v > 0.0),
        "{scraped:?}"
    );
    assert!(value("keel_redis_connected_clients").is_some_and(|v| v >= 1.0));
    assert!(
        value("keel_redis_slowlog_length").is_some_and(|v| v >= 1.0),
        "{scraped:?}"
    );
    assert!(value("keel_redis_ops_per_second").is_some());
    let err = c
        .collector
        .list_top_queries(ListTopQueriesRequest {
            instance_id: id.clone(),
            ..Default::default()
        })
        .await
        .expect_err("redis has no statements");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    keel.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_say_what_to_fix() -> anyhow::Result<()> {
    let keel = Deployment::start_with(fast()).await?;
    let viewer = keel.key("acme", Role::Viewer, "e2e-viewer").await?;
    let mut c = clients(&keel, &viewer).await?;
    let bad = c
        .collector
        .get_instance_metrics(GetInstanceMetricsRequest {
            instance_id: "not-a-uuid".into(),
            ..Default::default()
        })
        .await
        .expect_err("refused");
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    assert!(bad.message().contains("is not a UUID"), "{bad:?}");
    let too_long = c
        .collector
        .list_top_queries(ListTopQueriesRequest {
            instance_id: uuid::Uuid::now_v7().to_string(),
            window: Some(prost_types::Duration {
                seconds: 365 * 24 * 3600,
                nanos: 0,
            }),
            limit: 0,
        })
        .await
        .expect_err("refused");
    assert_eq!(too_long.code(), tonic::Code::InvalidArgument);
    assert!(
        too_long.message().contains("longer than the history kept"),
        "{too_long:?}"
    );
    let limit = c
        .collector
        .list_alerts(ListAlertsRequest {
            limit: 5000,
            ..Default::default()
        })
        .await
        .expect_err("refused");
    assert!(limit.message().contains("between 1 and 1000"), "{limit:?}");
    let name = c
        .collector
        .get_instance_metrics(GetInstanceMetricsRequest {
            instance_id: uuid::Uuid::now_v7().to_string(),
            names: vec!["pg_up".into()],
            ..Default::default()
        })
        .await
        .expect_err("refused");
    assert!(
        name.message().contains("no metric is named \"pg_up\""),
        "{name:?}"
    );
    let denied = c
        .collector
        .collect_now(CollectNowRequest {
            instance_id: uuid::Uuid::now_v7().to_string(),
        })
        .await
        .expect_err("a viewer may not");
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);
    keel.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_outside_the_policy_is_never_contacted_and_says_why() -> anyhow::Result<()> {
    // The registry accepts loopback; this collector's policy denies it (set apart, as when the
    // services of a deployment run with different settings).
    let strict = keel_target::TargetConfig {
        deny_networks: vec!["127.0.0.0/8".into()],
        ..keel_target::TargetConfig::default()
    };
    let keel = Deployment::start_with_targets(fast(), strict).await?;
    let operator = keel.key("acme", Role::Operator, "e2e-operator").await?;
    let mut c = clients(&keel, &operator).await?;
    let (port, connections) = silent_server().await?;
    let id = register(
        &mut c,
        "fenced",
        Engine::Postgres,
        &format!("postgres://app:pw@127.0.0.1:{port}/shop"),
        &[],
    )
    .await?;
    let scraped = collect(&mut c, &id).await?;
    let status = scraped.status.unwrap_or_default();
    assert!(!status.up, "{status:?}");
    assert!(
        status
            .problems
            .iter()
            .any(|p| p.starts_with("not contacted: the target policy refuses it")),
        "{status:?}"
    );
    assert!(
        !status.problems.iter().any(|p| p.contains(":pw@")),
        "a password in {status:?}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        *connections.borrow(),
        0,
        "the collector connected to a denied target"
    );
    keel.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_privileges_and_extensions_are_reported_with_their_fix() -> anyhow::Result<()> {
    let keel = Deployment::start_with(CollectorConfig {
        interval: Duration::from_secs(3600),
        ..fast()
    })
    .await?;
    let operator = keel.key("acme", Role::Operator, "e2e-operator").await?;
    let mut c = clients(&keel, &operator).await?;

    // A role without pg_monitor: statements of other roles are hidden, the rest is collected.
    let db = keel.env.database().await?;
    let mut admin = PgConnection::connect(&db.url).await?;
    let role = format!("watcher_{}", &db.name[db.name.len() - 8..]);
    admin
        .execute(format!("CREATE ROLE {role} LOGIN PASSWORD 'pw'").as_str())
        .await?;
    admin
        .execute(format!("GRANT CONNECT ON DATABASE \"{}\" TO {role}", db.name).as_str())
        .await?;
    let url = url::Url::parse(&db.url)?;
    let limited = format!(
        "postgres://{role}:pw@{}:{}{}",
        url.host_str().unwrap_or("127.0.0.1"),
        url.port().unwrap_or(5432),
        url.path()
    );
    let id = register(&mut c, "limited", Engine::Postgres, &limited, &[]).await?;
    let scraped = collect(&mut c, &id).await?;
    let status = scraped.status.clone().unwrap_or_default();
    assert!(status.up, "{status:?}");
    assert!(
        status
            .problems
            .iter()
            .any(|p| p.contains(&format!("GRANT pg_monitor TO {role};"))),
        "{status:?}"
    );
    assert!(
        scraped
            .latest
            .iter()
            .any(|m| m.name == "keel_pg_connections"),
        "{scraped:?}"
    );

    // A database without pg_stat_statements: the fix is named and the rest still comes.
    let bare = keel.env.database().await?;
    let mut conn = PgConnection::connect(&bare.url).await?;
    conn.execute("DROP EXTENSION pg_stat_statements").await?;
    let id = register(&mut c, "bare", Engine::Postgres, &bare.url, &[]).await?;
    let scraped = collect(&mut c, &id).await?;
    let status = scraped.status.clone().unwrap_or_default();
    assert!(status.up, "{status:?}");
    assert!(
        status
            .problems
            .iter()
            .any(|p| p.contains("pg_stat_statements is not installed")
                && p.contains("CREATE EXTENSION pg_stat_statements")),
        "{status:?}"
    );
    assert!(
        scraped
            .latest
            .iter()
            .any(|m| m.name == "keel_pg_database_size_bytes"),
        "{scraped:?}"
    );
    let top = c
        .collector
        .list_top_queries(ListTopQueriesRequest {
            instance_id: id.clone(),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert!(top.queries.is_empty());
    assert!(
        top.problems
            .iter()
            .any(|p| p.contains("CREATE EXTENSION pg_stat_statements")),
        "{top:?}"
    );
    keel.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_chain_shows_who_blocks_whom_in_the_api_but_no_pids_on_metrics() -> anyhow::Result<()>
{
    let keel = Deployment::start_with(CollectorConfig {
        interval: Duration::from_secs(3600),
        ..fast()
    })
    .await?;
    let operator = keel.key("acme", Role::Operator, "e2e-operator").await?;
    let mut c = clients(&keel, &operator).await?;
    let db = keel.env.database().await?;
    let mut holder = PgConnection::connect(&db.url).await?;
    holder.execute("CREATE TABLE contended (x int)").await?;
    let holder_pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut holder)
        .await?;
    holder
        .execute("BEGIN; LOCK TABLE contended IN ACCESS EXCLUSIVE MODE")
        .await?;
    let mut waiter = PgConnection::connect(&db.url).await?;
    let waiter_pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut waiter)
        .await?;
    let waiting = tokio::spawn(async move {
        waiter
            .execute("SELECT count(*) FROM contended")
            .await
            .map(|_| ())
    });
    let id = register(&mut c, "contended", Engine::Postgres, &db.url, &[]).await?;

    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let scraped = loop {
        let scraped = collect(&mut c, &id).await?;
        if scraped
            .latest
            .iter()
            .any(|m| m.name == "keel_pg_blocked_sessions" && m.value >= 1.0)
        {
            break scraped;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "no blocked session seen: {scraped:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let chain = scraped
        .latest
        .iter()
        .find(|m| m.name == "keel_pg_lock_wait_seconds")
        .ok_or_else(|| anyhow::anyhow!("no lock chain in {scraped:?}"))?;
    assert_eq!(chain.labels.get("pid"), Some(&waiter_pid.to_string()));
    assert_eq!(
        chain.labels.get("blocked_by"),
        Some(&holder_pid.to_string())
    );
    let value = |name: &str| {
        scraped
            .latest
            .iter()
            .find(|m| m.name == name && m.labels.is_empty())
            .map(|m| m.value)
    };
    assert_eq!(value("keel_pg_blocking_sessions"), Some(1.0));

    let body = eventually(Duration::from_secs(5), "the target on /metrics", || async {
        let body = reqwest_metrics(keel.http).await?;
        Ok(body
            .contains("keel_pg_blocked_sessions{tenant=\"acme\",instance=\"contended\"} 1")
            .then_some(body))
    })
    .await?;
    assert!(
        !body.contains("keel_pg_lock_wait_seconds"),
        "session ids on /metrics"
    );
    assert!(
        !body.contains(&format!("\"{waiter_pid}\"")),
        "a pid on /metrics"
    );
    holder.execute("COMMIT").await?;
    waiting.await??;
    keel.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_past_the_retention_is_deleted() -> anyhow::Result<()> {
    let keel = Deployment::start_with(CollectorConfig {
        retention: Duration::from_secs(3),
        prune_interval: Duration::from_millis(200),
        ..fast()
    })
    .await?;
    let operator = keel.key("acme", Role::Operator, "e2e-operator").await?;
    let mut c = clients(&keel, &operator).await?;
    let db = keel.env.database().await?;
    let mut target = PgConnection::connect(&db.url).await?;
    let id = register(&mut c, "brief", Engine::Postgres, &db.url, &[]).await?;
    let pool = sqlx::PgPool::connect(&keel.database_url).await?;
    // Scrapes every second, with statement work between them, for 6 s.
    for _ in 0..12 {
        target.execute("SELECT count(*) FROM pg_class").await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (oldest, rows): (Option<f64>, i64) = sqlx::query_as(
        "SELECT extract(epoch FROM now() - min(at))::float8, count(*) FROM collector.samples WHERE instance_id = $1::uuid",
    )
    .bind(&id)
    .fetch_one(&pool)
    .await?;
    assert!(rows > 0, "no history at all");
    // Retention 3 s, pruned every 0.2 s: nothing much older survives.
    assert!(
        oldest.is_some_and(|age| age < 4.5),
        "history {oldest:?} s old survives a 3 s retention"
    );
    let old_deltas: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM collector.statement_deltas WHERE instance_id = $1::uuid AND at < now() - interval '4.5 seconds'",
    )
    .bind(&id)
    .fetch_one(&pool)
    .await?;
    assert_eq!(old_deltas, 0);
    let window = c
        .collector
        .get_instance_metrics(GetInstanceMetricsRequest {
            instance_id: id.clone(),
            window: Some(prost_types::Duration {
                seconds: 3,
                nanos: 0,
            }),
            names: vec!["keel_target_up".into()],
        })
        .await?
        .into_inner();
    let up = window
        .series
        .iter()
        .find(|s| s.name == "keel_target_up")
        .ok_or_else(|| anyhow::anyhow!("no up series: {window:?}"))?;
    assert!(up.points.len() >= 2, "{up:?}");
    assert!(
        up.points
            .windows(2)
            .all(|p| p[0].at.as_ref().map(|t| t.seconds) <= p[1].at.as_ref().map(|t| t.seconds))
    );
    keel.stop().await
}
