//! The optimizer as a deployment runs it: the workload from the collector (or pg_stat_statements),
//! analyses streamed, recommendations applied and rolled back on a real PostgreSQL with their
//! events, a failed build cleaned up, and a build interrupted by a killed process resumed.

use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
use futures::StreamExt as _;
use keel_auth::Role;
use keel_e2e::Deployment;
use keel_proto::v1::optimizer_service_client::OptimizerServiceClient;
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
    optimizer: OptimizerServiceClient<Intercept>,
}

async fn clients(grpc: std::net::SocketAddr, key: &str) -> anyhow::Result<Clients> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{grpc}"))?
        .connect()
        .await?;
    let auth = || -> Bearer { Box::new(keel_auth::bearer_interceptor(key.to_owned().into())) };
    Ok(Clients {
        registry: RegistryServiceClient::with_interceptor(channel.clone(), auth()),
        optimizer: OptimizerServiceClient::with_interceptor(channel, auth()),
    })
}

/// A target database with an `orders` table and a workload in its pg_stat_statements that an
/// index on (account_id, created_at) serves.
async fn target(keel: &Deployment, rows: i64) -> anyhow::Result<(String, PgConnection)> {
    let db = keel.env.database().await?;
    let mut conn = PgConnection::connect(&db.url).await?;
    conn.execute(
        format!(
            "CREATE TABLE orders (id bigint PRIMARY KEY, account_id int NOT NULL, \
                 created_at timestamptz NOT NULL, total numeric NOT NULL, note text);
             INSERT INTO orders SELECT g, (g * 7919) % 2000, \
                 timestamptz '2026-01-01' + g * interval '1 minute', g % 1000, repeat('n', 50) \
             FROM generate_series(1, {rows}) g"
        )
        .as_str(),
    )
    .await?;
    conn.execute("VACUUM ANALYZE orders").await?;
    conn.execute("SELECT pg_stat_statements_reset()").await?;
    for i in 0..200 {
        sqlx::query("SELECT id, total FROM orders WHERE account_id = $1 AND created_at >= $2")
            .bind(i % 2000)
            .bind(chrono::DateTime::parse_from_rfc3339(
                "2026-01-10T00:00:00Z",
            )?)
            .fetch_all(&mut conn)
            .await?;
    }
    Ok((db.url, conn))
}

async fn register(c: &mut Clients, name: &str, url: &str) -> anyhow::Result<String> {
    let created = c
        .registry
        .create_instance(CreateInstanceRequest {
            instance: Some(Instance {
                name: name.to_owned(),
                engine: Engine::Postgres as i32,
                connection_url: url.to_owned(),
                ..Instance::default()
            }),
        })
        .await?
        .into_inner();
    Ok(created.instance.map(|i| i.id).unwrap_or_default())
}

/// Runs an analysis to its end; returns the progress messages and the analysis.
async fn analyze(
    c: &mut Clients,
    instance: &str,
) -> anyhow::Result<(Vec<AnalyzeInstanceResponse>, Analysis)> {
    let mut stream = c
        .optimizer
        .analyze_instance(AnalyzeInstanceRequest {
            instance_id: instance.to_owned(),
            budget_bytes: 200 << 20,
            ..AnalyzeInstanceRequest::default()
        })
        .await?
        .into_inner();
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while let Some(message) = tokio::time::timeout_at(deadline, stream.message()).await?? {
        let done = message.analysis.clone();
        seen.push(message);
        if let Some(analysis) = done {
            return Ok((seen, analysis));
        }
    }
    anyhow::bail!("the analysis stream ended without the analysis: {seen:?}")
}

fn code<T>(result: Result<T, tonic::Status>) -> tonic::Code {
    match result {
        Ok(_) => tonic::Code::Ok,
        Err(status) => status.code(),
    }
}

async fn wait_state(
    c: &mut Clients,
    id: &str,
    want: RecommendationState,
    within: Duration,
) -> anyhow::Result<Recommendation> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let rec = c
            .optimizer
            .get_recommendation(GetRecommendationRequest { id: id.to_owned() })
            .await?
            .into_inner()
            .recommendation
            .unwrap_or_default();
        if rec.state == want as i32 {
            return Ok(rec);
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "recommendation stayed {:?} ({}) instead of {want:?}",
            RecommendationState::try_from(rec.state),
            rec.state_reason
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// (name, valid) of every index on `orders` but its primary key.
async fn indexes(conn: &mut PgConnection) -> anyhow::Result<Vec<(String, bool)>> {
    Ok(sqlx::query_as(
        "SELECT c.relname::text, i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid \
         WHERE i.indrelid = 'orders'::regclass AND NOT i.indisprimary ORDER BY 1",
    )
    .fetch_all(&mut *conn)
    .await?)
}

async fn first_create(c: &mut Clients, analysis: &Analysis) -> anyhow::Result<Recommendation> {
    for id in &analysis.recommendation_ids {
        let rec = c
            .optimizer
            .get_recommendation(GetRecommendationRequest { id: id.clone() })
            .await?
            .into_inner()
            .recommendation
            .unwrap_or_default();
        if rec.kind == RecommendationKind::CreateIndex as i32 {
            return Ok(rec);
        }
    }
    anyhow::bail!("no index recommended: {analysis:?}")
}

#[tokio::test]
async fn analyze_apply_and_roll_back_with_evidence_and_events() -> anyhow::Result<()> {
    let keel = Deployment::start().await?;
    let mut c = clients(keel.grpc, &keel.admin_key).await?;
    let (url, mut conn) = target(&keel, 100_000).await?;
    let instance = register(&mut c, "shop", &url).await?;

    let nats = async_nats::connect(&keel.nats_url).await?;
    let js = async_nats::jetstream::new(nats);
    let consumer = js
        .get_stream("KEEL")
        .await?
        .create_consumer(pull::Config {
            filter_subject: "keel.optimizer.acme.>".into(),
            deliver_policy: DeliverPolicy::New,
            ack_policy: AckPolicy::None,
            ..Default::default()
        })
        .await?;

    let (progress, analysis) = analyze(&mut c, &instance).await?;
    assert_eq!(
        analysis.state,
        AnalysisState::Done as i32,
        "{}",
        analysis.error
    );
    assert!(progress.len() >= 2, "progress is streamed: {progress:?}");
    assert!(analysis.whatif_calls > 0);
    assert!(
        analysis
            .statements
            .iter()
            .any(|s| s.text.contains("account_id") && s.cost_after < s.cost_before),
        "{:?}",
        analysis.statements
    );
    let rec = first_create(&mut c, &analysis).await?;
    assert!(
        rec.ddl.starts_with("CREATE INDEX CONCURRENTLY"),
        "{}",
        rec.ddl
    );
    assert!(rec.ddl.contains("account_id"), "{}", rec.ddl);
    assert!(!rec.effects.is_empty() && rec.estimated_bytes > 0);
    assert!(
        rec.effects[0].plan_before.contains("Seq Scan"),
        "{:?}",
        rec.effects
    );
    assert!(!rec.explanation.is_empty());

    // Two applies at once build one index.
    let mut c2 = clients(keel.grpc, &keel.admin_key).await?;
    let (a, b) = tokio::join!(
        c.optimizer
            .apply_recommendation(ApplyRecommendationRequest { id: rec.id.clone() }),
        c2.optimizer
            .apply_recommendation(ApplyRecommendationRequest { id: rec.id.clone() }),
    );
    a?;
    b?;
    let applied = wait_state(
        &mut c,
        &rec.id,
        RecommendationState::Applied,
        Duration::from_secs(60),
    )
    .await?;
    assert_eq!(
        indexes(&mut conn).await?,
        vec![(rec.index_name.clone(), true)]
    );
    assert!(applied.built_bytes > 0, "{applied:?}");
    let measured = &applied.effects[0];
    assert!(
        measured.measured_cost_after > 0.0
            && measured.measured_cost_after < measured.measured_cost_before,
        "re-planned on the real index: {measured:?}"
    );
    // Applying again changes nothing.
    let again = c
        .optimizer
        .apply_recommendation(ApplyRecommendationRequest { id: rec.id.clone() })
        .await?
        .into_inner()
        .recommendation
        .unwrap_or_default();
    assert_eq!(again.state, RecommendationState::Applied as i32);

    c.optimizer
        .rollback_recommendation(RollbackRecommendationRequest { id: rec.id.clone() })
        .await?;
    wait_state(
        &mut c,
        &rec.id,
        RecommendationState::RolledBack,
        Duration::from_secs(60),
    )
    .await?;
    assert!(indexes(&mut conn).await?.is_empty());

    let mut verbs = Vec::new();
    let mut messages = consumer
        .fetch()
        .max_messages(100)
        .expires(Duration::from_secs(3))
        .messages()
        .await?;
    while let Some(message) = messages.next().await {
        let message = message.map_err(|e| anyhow::anyhow!("{e}"))?;
        let event = Event::decode(message.payload.as_ref())?;
        if event.payload.is_some() {
            verbs.push(event.r#type);
        }
    }
    for verb in ["created", "applied", "rolled_back"] {
        let wanted = format!("keel.optimizer.recommendation.{verb}");
        assert!(verbs.contains(&wanted), "{wanted} missing from {verbs:?}");
    }
    assert_eq!(
        verbs.iter().filter(|v| v.ends_with(".applied")).count(),
        1,
        "one build, one event: {verbs:?}"
    );
    keel.stop().await
}

#[tokio::test]
async fn other_tenants_roles_and_bad_input_get_the_right_status() -> anyhow::Result<()> {
    let keel = Deployment::start().await?;
    let mut c = clients(keel.grpc, &keel.admin_key).await?;
    let (url, _conn) = target(&keel, 20_000).await?;
    let instance = register(&mut c, "shop", &url).await?;

    let request = |id: &str, max_indexes: i32| AnalyzeInstanceRequest {
        instance_id: id.to_owned(),
        max_indexes,
        ..AnalyzeInstanceRequest::default()
    };
    assert_eq!(
        code(
            c.optimizer
                .analyze_instance(request("nope", 0))
                .await
                .map(|_| ())
        ),
        tonic::Code::InvalidArgument
    );
    assert_eq!(
        code(
            c.optimizer
                .analyze_instance(request(&instance, 99))
                .await
                .map(|_| ())
        ),
        tonic::Code::InvalidArgument
    );
    assert_eq!(
        code(
            c.optimizer
                .analyze_instance(request(&uuid::Uuid::now_v7().to_string(), 0))
                .await
                .map(|_| ())
        ),
        tonic::Code::NotFound
    );
    let explain = c
        .optimizer
        .explain_statement(ExplainStatementRequest {
            instance_id: instance.clone(),
            statement: "SELECT id FROM orders WHERE account_id = $1".into(),
            indexes: vec![HypotheticalIndex {
                table: "orders".into(),
                columns: vec!["account_id".into()],
                include: vec![],
            }],
        })
        .await?
        .into_inner();
    assert!(explain.cost_after < explain.cost_before, "{explain:?}");
    assert!(explain.plan_before.contains("Seq Scan"), "{explain:?}");
    let bad = c
        .optimizer
        .explain_statement(ExplainStatementRequest {
            instance_id: instance.clone(),
            statement: "SELECT * FROM no_such_table".into(),
            indexes: vec![],
        })
        .await
        .expect_err("unknown table");
    assert_eq!(bad.code(), tonic::Code::InvalidArgument, "{bad:?}");
    assert!(bad.message().contains("no_such_table"), "{bad:?}");

    let (_, analysis) = analyze(&mut c, &instance).await?;
    let rec = first_create(&mut c, &analysis).await?;

    let beta = keel.key("beta", Role::Admin, "beta-admin").await?;
    let mut other = clients(keel.grpc, &beta).await?;
    assert_eq!(
        code(
            other
                .optimizer
                .analyze_instance(request(&instance, 0))
                .await
                .map(|_| ())
        ),
        tonic::Code::NotFound
    );
    assert_eq!(
        code(
            other
                .optimizer
                .get_recommendation(GetRecommendationRequest { id: rec.id.clone() })
                .await
        ),
        tonic::Code::NotFound
    );
    assert_eq!(
        code(
            other
                .optimizer
                .apply_recommendation(ApplyRecommendationRequest { id: rec.id.clone() })
                .await
        ),
        tonic::Code::NotFound
    );
    let listed = other
        .optimizer
        .list_recommendations(ListRecommendationsRequest::default())
        .await?
        .into_inner();
    assert!(listed.recommendations.is_empty());

    let viewer = keel.key("acme", Role::Viewer, "viewer").await?;
    let mut viewer = clients(keel.grpc, &viewer).await?;
    assert_eq!(
        code(
            viewer
                .optimizer
                .apply_recommendation(ApplyRecommendationRequest { id: rec.id.clone() })
                .await
        ),
        tonic::Code::PermissionDenied
    );
    assert_eq!(
        code(
            c.optimizer
                .rollback_recommendation(RollbackRecommendationRequest { id: rec.id.clone() })
                .await
        ),
        tonic::Code::FailedPrecondition,
        "nothing applied, nothing to roll back"
    );
    // Nothing stored changed.
    let still = c
        .optimizer
        .get_recommendation(GetRecommendationRequest { id: rec.id.clone() })
        .await?
        .into_inner()
        .recommendation
        .unwrap_or_default();
    assert_eq!(still.state, RecommendationState::Proposed as i32);
    assert_eq!(still.version, rec.version);
    keel.stop().await
}

#[tokio::test]
async fn a_failed_build_leaves_no_invalid_index() -> anyhow::Result<()> {
    let keel = Deployment::start_full(
        keel_collector::CollectorConfig::default(),
        keel_target::TargetConfig::default(),
        Some(keel_optimizer::OptimizerConfig {
            lock_timeout: Duration::from_secs(1),
            lease: Duration::from_secs(2),
            poll_interval: Duration::from_millis(200),
            ..keel_optimizer::OptimizerConfig::default()
        }),
    )
    .await?;
    let mut c = clients(keel.grpc, &keel.admin_key).await?;
    let (url, mut conn) = target(&keel, 20_000).await?;
    let instance = register(&mut c, "shop", &url).await?;
    let (_, analysis) = analyze(&mut c, &instance).await?;
    let rec = first_create(&mut c, &analysis).await?;

    // An open snapshot: CREATE INDEX CONCURRENTLY, its catalog entry made, waits for it past
    // the lock timeout and fails, leaving an invalid index behind unless Keel drops it.
    let mut blocker = PgConnection::connect(&url).await?;
    blocker
        .execute("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT count(*) FROM orders")
        .await?;
    c.optimizer
        .apply_recommendation(ApplyRecommendationRequest { id: rec.id.clone() })
        .await?;
    let failed = wait_state(
        &mut c,
        &rec.id,
        RecommendationState::Failed,
        Duration::from_secs(60),
    )
    .await?;
    assert!(
        failed.state_reason.contains("lock timeout"),
        "{}",
        failed.state_reason
    );
    // Dropping the invalid leftover needs the same wait; it goes as soon as the blocker does.
    blocker.execute("COMMIT").await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !indexes(&mut conn).await?.is_empty() {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "an index was left behind: {:?}",
            indexes(&mut conn).await?
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // With the blocker gone, the same recommendation applies.
    c.optimizer
        .apply_recommendation(ApplyRecommendationRequest { id: rec.id.clone() })
        .await?;
    wait_state(
        &mut c,
        &rec.id,
        RecommendationState::Applied,
        Duration::from_secs(60),
    )
    .await?;
    assert_eq!(indexes(&mut conn).await?, vec![(rec.index_name, true)]);
    keel.stop().await
}

#[tokio::test]
async fn an_apply_interrupted_by_a_killed_process_is_resumed() -> anyhow::Result<()> {
    // No optimizer in the deployment's own process: it runs as `keel serve --target optimizer`.
    let keel = Deployment::start_full(
        keel_collector::CollectorConfig::default(),
        keel_target::TargetConfig::default(),
        None,
    )
    .await?;
    let settings = [
        ("KEEL_OPTIMIZER_LEASE", "3s"),
        ("KEEL_OPTIMIZER_LOCK_TIMEOUT", "120s"),
    ];
    let first = keel.serve_process("optimizer", &settings).await?;
    let mut c = clients(first.grpc, &keel.admin_key).await?;
    let (url, mut conn) = target(&keel, 20_000).await?;
    let instance = register(
        &mut clients(keel.grpc, &keel.admin_key).await?,
        "shop",
        &url,
    )
    .await?;
    let (_, analysis) = analyze(&mut c, &instance).await?;
    let rec = first_create(&mut c, &analysis).await?;

    let mut blocker = PgConnection::connect(&url).await?;
    blocker
        .execute("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT count(*) FROM orders")
        .await?;
    c.optimizer
        .apply_recommendation(ApplyRecommendationRequest { id: rec.id.clone() })
        .await?;
    // The build has begun (its invalid catalog entry exists) and waits on the blocker.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while indexes(&mut conn).await? != vec![(rec.index_name.clone(), false)] {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the build never started"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    first.kill().await?;
    blocker.execute("COMMIT").await?;

    let second = keel.serve_process("optimizer", &settings).await?;
    let mut c = clients(second.grpc, &keel.admin_key).await?;
    let applied = wait_state(
        &mut c,
        &rec.id,
        RecommendationState::Applied,
        Duration::from_secs(90),
    )
    .await?;
    assert_eq!(
        indexes(&mut conn).await?,
        vec![(rec.index_name.clone(), true)],
        "one valid index, the invalid leftover gone"
    );
    assert!(applied.built_bytes > 0);
    second.kill().await?;
    keel.stop().await
}
