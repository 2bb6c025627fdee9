//! The design Keel replaces: a tenant's whole inventory in one JSON document, a `jsonb` value in
//! one PostgreSQL row, that every call loads and every change rewrites.
//!
//! Written as it would have shipped: the application reads the document into its own types with
//! sqlx and serde, picks the instance it wants, and for a change writes the whole document back
//! in a transaction that locks the row (`SELECT ... FOR UPDATE`), so that two concurrent changes
//! cannot lose each other. Instances carry a version, checked as Keel checks `expected_version`.

use std::collections::{BTreeMap, HashMap};

use anyhow::{Context as _, ensure};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use sqlx::types::Json;

/// Its own schema, so nothing here touches the registry's tables.
const SCHEMA_SQL: &str = "CREATE SCHEMA IF NOT EXISTS bench_document;
    CREATE TABLE IF NOT EXISTS bench_document.fleets (tenant text PRIMARY KEY, doc jsonb NOT NULL)";

/// One instance, with the fields a registry row has that Get and Update use or return.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Instance {
    pub(crate) id: String,
    name: String,
    engine: String,
    url_masked: String,
    /// Base64 of the sealed URL.
    url_ciphertext: String,
    key_id: String,
    environment: String,
    labels: BTreeMap<String, String>,
    pub(crate) version: i64,
    created_at: String,
    updated_at: String,
}

/// The document: every instance of the tenant, by id.
#[derive(Debug, Serialize, Deserialize)]
struct Fleet {
    instances: HashMap<String, Instance>,
}

/// The fleets table on `pool`.
#[derive(Debug, Clone)]
pub(crate) struct Documents {
    pool: PgPool,
}

impl Documents {
    pub(crate) fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    /// Writes `tenant`'s document with `count` instances shaped like the registry's seeded rows,
    /// with the same ids (`id_sql`, over `n`).
    pub(crate) async fn seed(&self, tenant: &str, count: u32, id_sql: &str) -> anyhow::Result<()> {
        sqlx::raw_sql(SCHEMA_SQL)
            .execute(&self.pool)
            .await
            .context("creating the document table")?;
        let insert = format!(
            "INSERT INTO bench_document.fleets (tenant, doc)
             SELECT $1, jsonb_build_object('instances', jsonb_object_agg({id_sql}::text,
                 jsonb_build_object(
                     'id', {id_sql}::text,
                     'name', 'inst-' || n,
                     'engine', 'postgres',
                     'url_masked', 'postgres://app:****@db-' || n || ':5432/shop',
                     'url_ciphertext', encode(decode(md5(n::text), 'hex')
                                              || '\\x000000000000000000000000'::bytea, 'base64'),
                     'key_id', 'bench',
                     'environment', (ARRAY['production', 'staging'])[n % 2 + 1],
                     'labels', jsonb_build_object(
                         'tier', (ARRAY['db', 'cache', 'queue', 'search'])[n % 4 + 1],
                         'region', (ARRAY['eu', 'us', 'ap'])[n % 3 + 1],
                         'team', 'team-' || n % 50),
                     'version', 1,
                     'created_at', now()::text,
                     'updated_at', now()::text)))
             FROM generate_series(1, $2) AS n
             ON CONFLICT (tenant) DO UPDATE SET doc = excluded.doc"
        );
        sqlx::query(&insert)
            .bind(tenant)
            .bind(i32::try_from(count).context("too many instances")?)
            .execute(&self.pool)
            .await
            .context("seeding the document")?;
        sqlx::query("ANALYZE bench_document.fleets")
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Size of `tenant`'s document as stored (compressed) and as text, in bytes.
    pub(crate) async fn sizes(&self, tenant: &str) -> anyhow::Result<(i64, i64)> {
        let sizes = sqlx::query_as(
            "SELECT pg_column_size(doc)::bigint, octet_length(doc::text)::bigint
             FROM bench_document.fleets WHERE tenant = $1",
        )
        .bind(tenant)
        .fetch_one(&self.pool)
        .await?;
        Ok(sizes)
    }

    /// Loads the document and picks instance `id`.
    pub(crate) async fn get(&self, tenant: &str, id: &str) -> anyhow::Result<Instance> {
        let Json(mut fleet): Json<Fleet> =
            sqlx::query_scalar("SELECT doc FROM bench_document.fleets WHERE tenant = $1")
                .bind(tenant)
                .fetch_one(&self.pool)
                .await?;
        fleet
            .instances
            .remove(id)
            .with_context(|| format!("instance {id} not found"))
    }

    /// Replaces instance `id`'s labels if it is still at `expected_version`, rewriting the
    /// document; returns the instance as updated.
    pub(crate) async fn update_labels(
        &self,
        tenant: &str,
        id: &str,
        labels: BTreeMap<String, String>,
        expected_version: i64,
    ) -> anyhow::Result<Instance> {
        let mut tx = self.pool.begin().await?;
        let Json(mut fleet): Json<Fleet> = sqlx::query_scalar(
            "SELECT doc FROM bench_document.fleets WHERE tenant = $1 FOR UPDATE",
        )
        .bind(tenant)
        .fetch_one(&mut *tx)
        .await?;
        let instance = fleet
            .instances
            .get_mut(id)
            .with_context(|| format!("instance {id} not found"))?;
        ensure!(
            instance.version == expected_version,
            "instance {id} is at version {}, not {expected_version}",
            instance.version
        );
        instance.labels = labels;
        instance.version += 1;
        instance.updated_at = chrono::Utc::now().to_rfc3339();
        let updated = instance.clone();
        sqlx::query("UPDATE bench_document.fleets SET doc = $2 WHERE tenant = $1")
            .bind(tenant)
            .bind(Json(&fleet))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(updated)
    }
}
