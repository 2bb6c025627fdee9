//! Migrations land in the service's own schema, and re-running them is a no-op.

use keel_config::DatabaseConfig;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("tests/migrations");

#[tokio::test]
async fn migrations_run_inside_the_schema_and_are_idempotent() {
    let env = keel_testkit::TestEnv::new();
    let db = env.database().await.expect("test database");
    let pool = keel_store::connect(&DatabaseConfig::from_url(db.url.clone()))
        .await
        .expect("connect");

    keel_store::migrate(&pool, "svc_a", &MIGRATOR)
        .await
        .expect("first migration");
    keel_store::migrate(&pool, "svc_a", &MIGRATOR)
        .await
        .expect("second migration is a no-op");
    keel_store::migrate(&pool, "svc_b", &MIGRATOR)
        .await
        .expect("another schema migrates on its own");

    let tables: Vec<(String, String)> = sqlx::query_as(
        "SELECT table_schema::text, table_name::text FROM information_schema.tables \
         WHERE table_schema IN ('svc_a', 'svc_b') ORDER BY 1, 2",
    )
    .fetch_all(&pool)
    .await
    .expect("list tables");
    let expected = [
        ("svc_a", "_sqlx_migrations"),
        ("svc_a", "things"),
        ("svc_b", "_sqlx_migrations"),
        ("svc_b", "things"),
    ];
    let tables: Vec<(&str, &str)> = tables
        .iter()
        .map(|(s, t)| (s.as_str(), t.as_str()))
        .collect();
    assert_eq!(tables, expected);

    // The pool's own connections keep the default search_path.
    let path: String = sqlx::query_scalar("SHOW search_path")
        .fetch_one(&pool)
        .await
        .expect("search_path");
    assert!(!path.contains("svc_a"), "{path}");
}

#[tokio::test]
async fn bad_schema_names_are_refused_before_touching_the_database() {
    let env = keel_testkit::TestEnv::new();
    let db = env.database().await.expect("test database");
    let pool = keel_store::connect(&DatabaseConfig::from_url(db.url.clone()))
        .await
        .expect("connect");
    let err = keel_store::migrate(&pool, "x; DROP TABLE y", &MIGRATOR)
        .await
        .expect_err("a schema name with SQL in it must be refused");
    assert!(err.to_string().contains("invalid schema name"), "{err}");
}
