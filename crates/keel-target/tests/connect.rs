//! The connector against real servers: PostgreSQL and Redis from keel-testkit, and TCP listeners
//! that misbehave on purpose.
#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::time::{Duration, Instant};

use keel_target::{Connector, Rule, TargetConfig, TargetError};
use secrecy::SecretString;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

fn connector(config: &TargetConfig, state_store: Option<&str>) -> Connector {
    let store = state_store.map(|url| SecretString::from(url.to_owned()));
    config.connector("registry", store.as_ref()).unwrap()
}

/// `url` with its host replaced by `localhost`, so the connector has a name to resolve.
fn via_localhost(url: &str) -> String {
    url.replacen("127.0.0.1", "localhost", 1)
}

#[tokio::test]
async fn sessions_are_named_and_bounded() {
    let env = keel_testkit::TestEnv::new();
    let db = env.database().await.unwrap();
    let config = TargetConfig {
        statement_timeout: Duration::from_millis(1234),
        lock_timeout: Duration::from_millis(567),
        idle_in_transaction_timeout: Duration::from_secs(89),
        ..TargetConfig::default()
    };
    let connector = connector(&config, None);
    // The tenant's own settings pass, but cannot lift Keel's limits.
    let url = format!(
        "{}?options=-c%20search_path%3Dpublic%20-c%20statement_timeout%3D0",
        via_localhost(&db.url)
    );
    let mut conn = connector.connect_postgres(&url).await.unwrap();
    let (name, statement, lock, idle, search_path): (String, String, String, String, String) =
        sqlx::query_as(
            "SELECT a.application_name, current_setting('statement_timeout'),
                    current_setting('lock_timeout'),
                    current_setting('idle_in_transaction_session_timeout'),
                    current_setting('search_path')
             FROM pg_stat_activity a WHERE a.pid = pg_backend_pid()",
        )
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(
        (
            name.as_str(),
            statement.as_str(),
            lock.as_str(),
            idle.as_str(),
            search_path.as_str()
        ),
        ("keel-registry", "1234ms", "567ms", "89s", "public")
    );
    // The limit is enforced, not just shown.
    let slow = sqlx::query("SELECT pg_sleep(3)").execute(&mut conn).await;
    let error = slow.unwrap_err().to_string();
    assert!(error.contains("statement timeout"), "{error}");
}

#[tokio::test]
async fn resolved_addresses_are_checked_at_connect_time() {
    let env = keel_testkit::TestEnv::new();
    let db = env.database().await.unwrap();
    let url = via_localhost(&db.url);
    let config = TargetConfig {
        deny_networks: vec!["127.0.0.0/8".into(), "::1".into()],
        ..TargetConfig::default()
    };
    let connector = connector(&config, None);
    // The name alone breaks no rule, so the URL can be stored...
    connector.check_url(&url).unwrap();
    // ...but what `localhost` resolves to is refused before any packet goes out.
    let err = connector.connect_postgres(&url).await.unwrap_err();
    let TargetError::Denied(denied) = &err else {
        panic!("not refused by the policy: {err}");
    };
    assert!(matches!(denied.rule, Rule::DeniedNetwork(_)), "{denied}");
    assert!(
        denied.subject.contains("of host localhost"),
        "{}",
        denied.subject
    );
    assert!(
        err.to_string().contains("KEEL_TARGET_DENY_NETWORKS"),
        "{err}"
    );
    // The same URL connects once the network is no longer denied.
    let open = self::connector(&TargetConfig::default(), None);
    open.connect_postgres(&url).await.unwrap();
}

#[tokio::test]
async fn the_state_store_is_refused_under_another_name() {
    let env = keel_testkit::TestEnv::new();
    let store = env.database().await.unwrap();
    let other = env.database().await.unwrap();
    let connector = connector(&TargetConfig::default(), Some(&store.url));
    let err = connector
        .connect_postgres(&via_localhost(&store.url))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("KEEL_TARGET_ALLOW_STATE_STORE"),
        "{err}"
    );
    // Another database on the same server is a target like any other.
    connector
        .connect_postgres(&via_localhost(&other.url))
        .await
        .unwrap();
    let allowed = self::connector(
        &TargetConfig {
            allow_state_store: true,
            ..TargetConfig::default()
        },
        Some(&store.url),
    );
    allowed.connect_postgres(&store.url).await.unwrap();
}

#[tokio::test]
async fn redis_sessions_work_on_a_real_server() {
    let env = keel_testkit::TestEnv::new();
    let url = env.redis_url().await.unwrap();
    let connector = connector(&TargetConfig::default(), None);
    let mut conn = connector.connect_redis(&url).await.unwrap();
    let pong: String = redis::cmd("PING").query_async(&mut conn).await.unwrap();
    assert_eq!(pong, "PONG");
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(info.contains("redis_version:"), "{info}");
}

/// A Redis impostor: answers the two CLIENT SETINFO commands of the handshake, then calls
/// `after` with the socket once the next command arrives.
async fn impostor<F, Fut>(after: F) -> String
where
    F: FnOnce(tokio::net::TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&seen).contains("LIB-VER") {
            let n = socket.read(&mut buf).await.unwrap();
            assert!(n > 0, "client went away during the handshake");
            seen.extend_from_slice(&buf[..n]);
        }
        socket.write_all(b"+OK\r\n+OK\r\n").await.unwrap();
        let n = socket.read(&mut buf).await.unwrap();
        assert!(n > 0, "no command after the handshake");
        after(socket).await;
    });
    format!("redis://{addr}")
}

#[tokio::test]
async fn redis_commands_time_out() {
    // The impostor holds the socket open and never answers PING.
    let url = impostor(|socket| async move {
        tokio::time::sleep(Duration::from_secs(30)).await;
        drop(socket);
    })
    .await;
    let config = TargetConfig {
        redis_response_timeout: Duration::from_millis(300),
        ..TargetConfig::default()
    };
    let mut conn = connector(&config, None).connect_redis(&url).await.unwrap();
    let started = Instant::now();
    let result: redis::RedisResult<String> = redis::cmd("PING").query_async(&mut conn).await;
    let elapsed = started.elapsed();
    let err = result.unwrap_err();
    assert!(err.is_timeout(), "{err}");
    assert!(
        elapsed >= Duration::from_millis(250) && elapsed < Duration::from_secs(3),
        "{elapsed:?}"
    );
}

#[tokio::test]
async fn redis_connects_time_out() {
    // Accepts the connection, never answers the handshake.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("redis://{}", listener.local_addr().unwrap());
    let config = TargetConfig {
        connect_timeout: Duration::from_millis(300),
        ..TargetConfig::default()
    };
    let started = Instant::now();
    let err = connector(&config, None)
        .connect_redis(&url)
        .await
        .unwrap_err();
    assert!(matches!(err, TargetError::ConnectTimeout(_)), "{err}");
    assert!(started.elapsed() < Duration::from_secs(3));
    drop(listener);
}

#[tokio::test]
async fn oversized_redis_replies_are_refused() {
    // A 64 MiB bulk string, sent as fast as the socket takes it.
    let url = impostor(|mut socket| async move {
        let size = 64usize << 20;
        let _ = socket.write_all(format!("${size}\r\n").as_bytes()).await;
        let chunk = vec![b'x'; 1 << 16];
        for _ in 0..(size / chunk.len()) {
            if socket.write_all(&chunk).await.is_err() {
                return; // the client hung up, as it should
            }
        }
    })
    .await;
    let config = TargetConfig {
        redis_max_reply: 1 << 20,
        ..TargetConfig::default()
    };
    let mut conn = connector(&config, None).connect_redis(&url).await.unwrap();
    let result: redis::RedisResult<String> = redis::cmd("PING").query_async(&mut conn).await;
    assert!(result.is_err(), "a 64 MiB reply was read");
}
