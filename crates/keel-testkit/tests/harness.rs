//! The harness against real servers.

use std::time::Duration;

use keel_testkit::{TestDatabase, TestEnv, postgres};

fn external_postgres() -> bool {
    std::env::var_os("KEEL_TEST_DATABASE_URL").is_some()
}

async fn extensions(db: &TestDatabase) -> Vec<String> {
    let pool = db.pool().await.expect("pool");
    sqlx::query_scalar("SELECT extname::text FROM pg_extension ORDER BY 1")
        .fetch_all(&pool)
        .await
        .expect("list extensions")
}

async fn table_count(db: &TestDatabase) -> i64 {
    let pool = db.pool().await.expect("pool");
    sqlx::query_scalar(
        // Views of the template's extensions (pg_stat_statements, hypopg) are expected.
        "SELECT count(*) FROM information_schema.tables \
         WHERE table_schema = 'public' AND table_type = 'BASE TABLE'",
    )
    .fetch_one(&pool)
    .await
    .expect("count tables")
}

#[tokio::test]
async fn databases_are_fresh_and_have_extensions() {
    let env = TestEnv::new();
    let first = env.database().await.expect("first database");
    let second = env.database().await.expect("second database");
    assert_ne!(first.name, second.name);
    assert_ne!(first.url, second.url);
    assert_eq!(table_count(&first).await, 0);

    let pool = first.pool().await.expect("pool");
    sqlx::query("CREATE TABLE only_in_first (id int)")
        .execute(&pool)
        .await
        .expect("create table");
    assert_eq!(table_count(&first).await, 1);
    assert_eq!(table_count(&second).await, 0);

    if !external_postgres() {
        for db in [&first, &second] {
            let names = extensions(db).await;
            assert!(names.iter().any(|n| n == "pg_stat_statements"), "{names:?}");
            assert!(names.iter().any(|n| n == "hypopg"), "{names:?}");
        }
        let preload: String = sqlx::query_scalar("SHOW shared_preload_libraries")
            .fetch_one(&pool)
            .await
            .expect("show");
        assert!(preload.contains("pg_stat_statements"), "{preload}");
        // The preloaded module actually collects statistics.
        let tracked: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_stat_statements")
            .fetch_one(&pool)
            .await
            .expect("read pg_stat_statements");
        assert!(tracked > 0);
    }
}

#[tokio::test]
async fn hypopg_creates_hypothetical_indexes() {
    if external_postgres() {
        return;
    }
    let db = TestEnv::new().database().await.expect("database");
    let pool = db.pool().await.expect("pool");
    sqlx::query("CREATE TABLE t (id int)")
        .execute(&pool)
        .await
        .expect("create table");
    let created: i64 =
        sqlx::query_scalar("SELECT count(*) FROM hypopg_create_index('CREATE INDEX ON t (id)')")
            .fetch_one(&pool)
            .await
            .expect("hypothetical index");
    assert_eq!(created, 1);
}

#[tokio::test]
async fn postgres_server_info() {
    let server = postgres().await.expect("postgres");
    assert!(
        server.admin_url.ends_with("/postgres"),
        "{}",
        server.admin_url
    );
    assert!(server.port > 0);
    if !external_postgres() {
        assert_eq!(server.host, "127.0.0.1");
        assert_eq!(server.user, "postgres");
        let bin = server
            .bin_dir
            .as_ref()
            .expect("bin dir of the started server");
        assert!(bin.join("psql").is_file(), "{}", bin.display());
        assert!(bin.join("pgbench").is_file(), "{}", bin.display());
    }
    // The same server for every caller.
    let again = postgres().await.expect("postgres");
    assert!(std::ptr::eq(server, again));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_databases_in_parallel() {
    let env = TestEnv::new();
    let created = futures::future::try_join_all((0..8).map(|_| env.database()))
        .await
        .expect("databases");
    let mut names: Vec<&str> = created.iter().map(|db| db.name.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), 8);
    for db in &created {
        assert_eq!(table_count(db).await, 0);
    }
}

#[tokio::test]
async fn nats_has_jetstream() {
    let env = TestEnv::new();
    let url = env.nats_url().await.expect("nats");
    let client = async_nats::connect(&url).await.expect("connect");
    let js = async_nats::jetstream::new(client);
    let stream = js
        .get_or_create_stream(async_nats::jetstream::stream::Config {
            name: "HARNESS".into(),
            subjects: vec!["harness.>".into()],
            ..Default::default()
        })
        .await
        .expect("create stream");
    let ack = js
        .publish("harness.hello", "hello".into())
        .await
        .expect("publish")
        .await
        .expect("ack");
    let message = stream
        .get_raw_message(ack.sequence)
        .await
        .expect("read back");
    assert_eq!(message.payload.as_ref(), b"hello");
    assert_eq!(message.subject.as_str(), "harness.hello");
}

#[tokio::test]
async fn redis_answers() {
    let env = TestEnv::new();
    let url = env.redis_url().await.expect("redis");
    let client = redis::Client::open(url.as_str()).expect("client");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let pong: String = redis::cmd("PING")
        .query_async(&mut conn)
        .await
        .expect("ping");
    assert_eq!(pong, "PONG");
    let () = redis::cmd("SET")
        .arg("key")
        .arg("value")
        .query_async(&mut conn)
        .await
        .expect("set");
    let value: String = redis::cmd("GET")
        .arg("key")
        .query_async(&mut conn)
        .await
        .expect("get");
    assert_eq!(value, "value");
}

#[tokio::test]
async fn environments_are_isolated_and_servers_stop_on_drop() {
    if std::env::var_os("KEEL_TEST_NATS_URL").is_some() {
        return;
    }
    let first = TestEnv::new();
    let second = TestEnv::new();
    let first_url = first.nats_url().await.expect("first nats");
    let second_url = second.nats_url().await.expect("second nats");
    assert_ne!(first_url, second_url);
    // Repeated calls reuse the TestEnv's server.
    assert_eq!(first.nats_url().await.expect("again"), first_url);

    let redis_url = first.redis_url().await.expect("redis");
    let nats_address = first_url.trim_start_matches("nats://").to_owned();
    let redis_address = redis_url.trim_start_matches("redis://").to_owned();
    drop(first);
    for address in [nats_address, redis_address] {
        // Drop waits for the server to exit, so the port is closed right away.
        let refused = tokio::net::TcpStream::connect(&address).await.is_err();
        assert!(refused, "{address} still accepts connections");
    }
    // The other environment is untouched.
    async_nats::connect(&second_url).await.expect("second nats");
}

#[tokio::test]
async fn works_from_a_second_runtime_after_the_first_is_gone() {
    // The server must survive the runtime that happened to start it.
    for _ in 0..2 {
        std::thread::spawn(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime")
                .block_on(async {
                    let db = TestEnv::new().database().await.expect("database");
                    let pool = db.pool().await.expect("pool");
                    let one: i32 = tokio::time::timeout(
                        Duration::from_secs(10),
                        sqlx::query_scalar("SELECT 1").fetch_one(&pool),
                    )
                    .await
                    .expect("timely")
                    .expect("query");
                    assert_eq!(one, 1);
                });
        })
        .join()
        .expect("thread");
    }
}
