//! Keel's B-tree size estimates checked against real builds on PostgreSQL, next to HypoPG's.
//!
//! Tables shaped like the ones in the optimizer notes, scaled down: each index is built for
//! real, measured with `pg_relation_size` and dropped; HypoPG sizes the same definition.

use anyhow::Context as _;
use keel_optimizer::advisor::catalog;
use keel_optimizer::advisor::model::{IndexDef, Key, Table, TableName};
use keel_optimizer::advisor::size;
use sqlx::{Connection as _, PgConnection};

/// How far off an estimate may be from the built index.
const TOLERANCE: f64 = 0.08;

const SETUP: &str = r#"
CREATE EXTENSION IF NOT EXISTS hypopg;
SELECT setseed(0.42);

CREATE TABLE orders (
    id bigint PRIMARY KEY,
    account_id int NOT NULL,
    status text NOT NULL,
    created_at timestamptz NOT NULL,
    shipped_at timestamptz,
    total numeric(10, 2) NOT NULL
);
INSERT INTO orders
SELECT i,
       1 + floor(random() * 5000)::int,
       CASE WHEN r < 0.70 THEN 'paid' WHEN r < 0.90 THEN 'shipped'
            WHEN r < 0.98 THEN 'pending' ELSE 'cancelled' END,
       created_at,
       CASE WHEN r < 0.50 THEN NULL
            ELSE date_trunc('hour', created_at + interval '2 days') END,
       round((random() * 500)::numeric, 2)
FROM (SELECT i, random() AS r,
             timestamptz '2024-01-01' + random() * interval '365 days' AS created_at
      FROM generate_series(1, 300000) i) s;

CREATE TABLE users (id bigint PRIMARY KEY, email text NOT NULL, name text);
INSERT INTO users
SELECT i, 'User' || i || '@' || (ARRAY['example.com', 'mail.example.org', 'corp.net'])[1 + i % 3],
       'name ' || i
FROM generate_series(1, 100000) i;

CREATE TABLE events (id bigint PRIMARY KEY, created_at timestamptz NOT NULL, kind text NOT NULL);
INSERT INTO events
SELECT i, timestamptz '2024-01-01' + floor(random() * 10000) * interval '1 minute',
       (ARRAY['view', 'click', 'buy'])[1 + floor(random() * 3)::int]
FROM generate_series(1, 300000) i;

-- character(n), as TPC-H writes its codes: padded in pg_stats, never deduplicated.
CREATE TABLE parts (id int PRIMARY KEY, brand char(10) NOT NULL, segment char(10) NOT NULL);
INSERT INTO parts
SELECT i, 'Brand#' || (1 + i % 25), (ARRAY['BUILDING', 'MACHINERY', 'AUTOMOBILE'])[1 + i % 3]
FROM generate_series(1, 200000) i;

ANALYZE orders;
ANALYZE users;
ANALYZE events;
ANALYZE parts;
"#;

fn table_name(name: &str) -> TableName {
    TableName {
        schema: "public".into(),
        name: name.into(),
    }
}

/// The index definitions measured: low and mid cardinality, composite, covering, partial,
/// nullable, unique, expression, numeric and character(n) (not deduplicated), partial on a
/// character(n) constant.
fn cases() -> Vec<IndexDef> {
    let orders = table_name("orders");
    let mut covering = IndexDef::on(orders.clone(), &["account_id"]);
    covering.include = vec!["total".into()];
    let mut pending = IndexDef::on(orders.clone(), &["created_at"]);
    pending.predicate = Some("status = 'pending'".into());
    let mut pending_accounts = IndexDef::on(orders.clone(), &["account_id"]);
    pending_accounts.predicate = Some("status = 'pending'".into());
    let lower_email = IndexDef {
        table: table_name("users"),
        keys: vec![Key::Expression {
            sql: "lower(email)".into(),
            columns: vec!["email".into()],
        }],
        include: Vec::new(),
        predicate: None,
    };
    let mut building = IndexDef::on(table_name("parts"), &["id"]);
    building.predicate = Some("segment = 'BUILDING'".into());
    vec![
        IndexDef::on(orders.clone(), &["status"]),
        IndexDef::on(orders.clone(), &["account_id"]),
        IndexDef::on(orders.clone(), &["account_id", "created_at"]),
        IndexDef::on(orders.clone(), &["status", "account_id"]),
        covering,
        pending,
        pending_accounts,
        IndexDef::on(orders.clone(), &["shipped_at"]),
        IndexDef::on(orders.clone(), &["id"]),
        IndexDef::on(orders, &["total"]),
        lower_email,
        IndexDef::on(table_name("users"), &["email"]),
        IndexDef::on(table_name("events"), &["created_at"]),
        IndexDef::on(table_name("parts"), &["brand"]),
        building,
    ]
}

/// Size of `def` built for real, then dropped.
async fn built_size(conn: &mut PgConnection, def: &IndexDef) -> anyhow::Result<i64> {
    let ddl =
        def.hypothetical_ddl()
            .replacen("CREATE INDEX ON", "CREATE INDEX keel_size_probe ON", 1);
    sqlx::raw_sql(&ddl)
        .execute(&mut *conn)
        .await
        .with_context(|| ddl.clone())?;
    let bytes: i64 = sqlx::query_scalar("SELECT pg_relation_size('keel_size_probe')")
        .fetch_one(&mut *conn)
        .await?;
    sqlx::raw_sql("DROP INDEX keel_size_probe")
        .execute(&mut *conn)
        .await?;
    Ok(bytes)
}

/// HypoPG's size for `def` (hypothetical indexes live in this connection's backend).
async fn hypopg_size(conn: &mut PgConnection, def: &IndexDef) -> anyhow::Result<i64> {
    let bytes: i64 = sqlx::query_scalar(
        "SELECT hypopg_relation_size(indexrelid)::int8 FROM hypopg_create_index($1)",
    )
    .bind(def.hypothetical_ddl())
    .fetch_one(&mut *conn)
    .await?;
    sqlx::raw_sql("SELECT hypopg_reset()")
        .execute(&mut *conn)
        .await?;
    Ok(bytes)
}

fn table<'a>(tables: &'a [Table], name: &TableName) -> anyhow::Result<&'a Table> {
    catalog::find(tables, name).with_context(|| format!("table {name} not read"))
}

struct Row {
    label: String,
    estimate: size::SizeEstimate,
    real: i64,
    hypopg: i64,
}

impl Row {
    fn ratio(&self) -> f64 {
        self.estimate.bytes as f64 / self.real as f64
    }

    fn hypopg_ratio(&self) -> f64 {
        self.hypopg as f64 / self.real as f64
    }
}

fn kib(bytes: i64) -> String {
    format!("{} kB", bytes / 1024)
}

#[tokio::test]
async fn estimates_match_real_builds() -> anyhow::Result<()> {
    let env = keel_testkit::TestEnv::new();
    let db = env.database().await?;
    let mut conn = PgConnection::connect(&db.url).await?;
    sqlx::raw_sql(SETUP).execute(&mut conn).await?;
    let tables = catalog::read_tables(&mut conn).await?;

    let mut rows = Vec::new();
    for def in cases() {
        let estimate = size::estimate(&def, table(&tables, &def.table)?);
        let real = built_size(&mut conn, &def).await?;
        let hypopg = hypopg_size(&mut conn, &def).await?;
        rows.push(Row {
            label: def.label(),
            estimate,
            real,
            hypopg,
        });
    }

    println!(
        "| index | Keel estimate | built | ratio | HypoPG | HypoPG ratio | dedup |\n\
         | --- | ---: | ---: | ---: | ---: | ---: | --- |"
    );
    for row in &rows {
        println!(
            "| {} | {} | {} | {:.2} | {} | {:.2} | {} |",
            row.label,
            kib(row.estimate.bytes),
            kib(row.real),
            row.ratio(),
            kib(row.hypopg),
            row.hypopg_ratio(),
            if row.estimate.deduplicated {
                "yes"
            } else {
                "no"
            },
        );
    }

    for row in &rows {
        assert!(
            (row.ratio() - 1.0).abs() <= TOLERANCE,
            "{}: estimated {} bytes, built {} ({:.2})",
            row.label,
            row.estimate.bytes,
            row.real,
            row.ratio()
        );
    }
    let status = rows
        .iter()
        .find(|r| r.label == "orders(status)")
        .context("orders(status) measured")?;
    assert!(
        (status.estimate.bytes - status.real).abs() < (status.hypopg - status.real).abs(),
        "Keel {} vs HypoPG {} for a built {}",
        status.estimate.bytes,
        status.hypopg,
        status.real
    );
    Ok(())
}
