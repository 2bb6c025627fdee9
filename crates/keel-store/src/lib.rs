//! Keel's PostgreSQL state store.
//!
//! All services share one database server, each in its own schema (`registry`,
//! `collector`, …) with its own migrations, so a service never reads another's
//! tables: cross-service data flows through gRPC or events.

use std::str::FromStr;

use keel_config::DatabaseConfig;
use secrecy::ExposeSecret;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgConnection, PgPool};

/// Why the state store could not be used.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database URL does not parse.
    #[error("invalid database URL: {0}")]
    InvalidUrl(#[source] sqlx::Error),
    /// The server could not be reached or refused the connection.
    #[error("cannot connect to the state store: {0}")]
    Connect(#[source] sqlx::Error),
    /// A schema name that is not a plain lowercase identifier.
    #[error("invalid schema name {0:?}: use lowercase letters, digits and '_'")]
    InvalidSchema(String),
    /// A migration failed.
    #[error("migrating schema {schema} failed: {source}")]
    Migrate {
        /// The schema being migrated.
        schema: String,
        /// What went wrong.
        source: sqlx::migrate::MigrateError,
    },
    /// Any other database error.
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// Opens a connection pool on the state store and checks that it answers.
pub async fn connect(config: &DatabaseConfig) -> Result<PgPool, StoreError> {
    let options = PgConnectOptions::from_str(config.url.expose_secret())
        .map_err(StoreError::InvalidUrl)?
        .application_name("keel")
        .options([
            ("statement_timeout", millis(config.statement_timeout)),
            ("lock_timeout", millis(config.lock_timeout)),
        ])
        // Statement logging would put instance data into logs at INFO; keep it for debugging only.
        .log_statements(tracing::log::LevelFilter::Debug);
    let pool = PgPoolOptions::new()
        // The default pings every connection before each use, a round trip per query; a
        // broken connection fails its query instead, which callers already handle.
        .test_before_acquire(false)
        .max_connections(config.max_connections)
        .acquire_timeout(config.acquire_timeout)
        .connect_with(options)
        .await
        .map_err(StoreError::Connect)?;
    Ok(pool)
}

fn millis(duration: std::time::Duration) -> String {
    duration.as_millis().max(1).to_string()
}

/// Creates `schema` if needed and applies `migrator` inside it.
///
/// Migrations run on a dedicated connection whose `search_path` is the schema, so
/// sqlx's bookkeeping table lands in that schema too and services migrate
/// independently. Replicas starting together are serialised by sqlx's own
/// migration lock, which is held only while DDL runs.
pub async fn migrate(pool: &PgPool, schema: &str, migrator: &Migrator) -> Result<(), StoreError> {
    validate_schema_name(schema)?;
    let options = pool.connect_options();
    let mut conn = PgConnection::connect_with(&options)
        .await
        .map_err(StoreError::Connect)?;
    // DDL on a big table may outlast the pool's statement_timeout, and replicas starting
    // together wait on sqlx's migration lock for as long as the first one migrates.
    sqlx::raw_sql("SET statement_timeout = 0; SET lock_timeout = 0")
        .execute(&mut conn)
        .await?;
    create_schema(&mut conn, schema).await?;
    sqlx::query(&format!("SET search_path TO {schema}"))
        .execute(&mut conn)
        .await?;
    migrator
        .run(&mut conn)
        .await
        .map_err(|source| StoreError::Migrate {
            schema: schema.to_owned(),
            source,
        })?;
    conn.close().await?;
    Ok(())
}

async fn create_schema(conn: &mut PgConnection, schema: &str) -> Result<(), StoreError> {
    match sqlx::query(&format!("CREATE SCHEMA IF NOT EXISTS {schema}"))
        .execute(&mut *conn)
        .await
    {
        Ok(_) => Ok(()),
        // Two replicas racing on IF NOT EXISTS: the loser sees a unique violation
        // on the catalog, and the schema exists, which is all it wanted.
        Err(e) if is_unique_violation(&e) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Schema names are interpolated into SQL, so only plain identifiers are accepted.
pub fn validate_schema_name(schema: &str) -> Result<(), StoreError> {
    let valid = !schema.is_empty()
        && schema.len() <= 63
        && schema.starts_with(|c: char| c.is_ascii_lowercase())
        && schema
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if valid {
        Ok(())
    } else {
        Err(StoreError::InvalidSchema(schema.to_owned()))
    }
}

/// Whether the error is a unique-constraint violation (SQLSTATE 23505).
pub fn is_unique_violation(err: &sqlx::Error) -> bool {
    matches!(err, sqlx::Error::Database(db) if db.is_unique_violation())
}

/// The constraint a database error names, if any.
pub fn violated_constraint(err: &sqlx::Error) -> Option<&str> {
    match err {
        sqlx::Error::Database(db) => db.constraint(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_names_are_plain_identifiers() {
        assert!(validate_schema_name("registry").is_ok());
        assert!(validate_schema_name("svc_2").is_ok());
        for bad in ["", "Registry", "2svc", "a;drop", "a-b", "a b"] {
            assert!(validate_schema_name(bad).is_err(), "{bad:?} accepted");
        }
    }
}
