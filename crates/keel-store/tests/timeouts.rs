//! Every pool connection to the state store carries the configured timeouts.

use std::time::Duration;

use keel_config::DatabaseConfig;

#[tokio::test]
async fn pool_connections_have_statement_and_lock_timeouts() {
    let env = keel_testkit::TestEnv::new();
    let db = env.database().await.expect("test database");
    let config = DatabaseConfig {
        statement_timeout: Duration::from_millis(1500),
        lock_timeout: Duration::from_millis(250),
        ..DatabaseConfig::from_url(db.url.clone())
    };
    config.validate().expect("valid");
    let pool = keel_store::connect(&config).await.expect("connect");
    let (statement, lock): (String, String) = sqlx::query_as(
        "SELECT current_setting('statement_timeout'), current_setting('lock_timeout')",
    )
    .fetch_one(&pool)
    .await
    .expect("settings");
    assert_eq!((statement.as_str(), lock.as_str()), ("1500ms", "250ms"));

    // Enforced, not only shown: a statement over the limit is cancelled.
    let slow = sqlx::query("SELECT pg_sleep(5)").execute(&pool).await;
    let error = slow.expect_err("pg_sleep(5) outlived a 1.5 s statement_timeout");
    assert!(error.to_string().contains("statement timeout"), "{error}");

    // The defaults apply when nothing is configured.
    let defaults = DatabaseConfig::from_url(db.url.clone());
    let pool = keel_store::connect(&defaults).await.expect("connect");
    let statement: String = sqlx::query_scalar("SHOW statement_timeout")
        .fetch_one(&pool)
        .await
        .expect("show");
    assert_eq!(statement, "30s");

    let zero = DatabaseConfig {
        lock_timeout: Duration::ZERO,
        ..DatabaseConfig::from_url(db.url.clone())
    };
    let err = zero.validate().expect_err("zero lock timeout accepted");
    assert!(
        err.to_string().contains("KEEL_DATABASE_LOCK_TIMEOUT"),
        "{err}"
    );
}
