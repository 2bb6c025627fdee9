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
use sqlx::{ConnectOptions, PgPool};

/// Why the state store could not be used.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database URL does not parse.
    #[error("invalid database URL: {0}")]
    InvalidUrl(#[source] sqlx::Error),
    /// The server could not be reached or refused the connection.
    // Not a `#[source]`: sqlx's message already ends with its cause, and an error chain printed
    // with its sources would say it twice.
    #[error("cannot connect to the state store: {0}")]
    Connect(sqlx::Error),
    /// The server answers, but the database in the URL does not exist on it.
    #[error(
        "database \"{database}\" does not exist on {host}:{port}: create it with createdb -h {host} -p {port} -U {user} {database}"
    )]
    MissingDatabase {
        /// The database in the URL.
        database: String,
        /// The server's host (or socket directory).
        host: String,
        /// The server's port.
        port: u16,
        /// The user Keel connects as.
        user: String,
    },
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
    let target = options.clone();
    let pool = PgPoolOptions::new()
        // The default pings every connection before each use, a round trip per query; a
        // broken connection fails its query instead, which callers already handle.
        .test_before_acquire(false)
        .max_connections(config.max_connections)
        .acquire_timeout(config.acquire_timeout)
        .connect_with(options)
        .await
        .map_err(|error| connect_error(error, &target))?;
    Ok(pool)
}

/// A missing database gets its own error saying how to create it; the rest stay as sqlx says.
fn connect_error(error: sqlx::Error, target: &PgConnectOptions) -> StoreError {
    // SQLSTATE 3D000, invalid_catalog_name: what the server answers for an unknown database.
    let missing =
        matches!(&error, sqlx::Error::Database(db) if db.code().as_deref() == Some("3D000"));
    if !missing {
        return StoreError::Connect(error);
    }
    StoreError::MissingDatabase {
        // A URL without a database name connects to the one named like the user.
        database: target
            .get_database()
            .unwrap_or(target.get_username())
            .to_owned(),
        host: target.get_host().to_owned(),
        port: target.get_port(),
        user: target.get_username().to_owned(),
    }
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
    // A pool of one rather than a bare connection: `Migrator::run` on `&mut PgConnection`
    // makes a future that is not `Send`, so services could not migrate from spawned tasks.
    let options = pool
        .connect_options()
        .as_ref()
        .clone()
        // `IF NOT EXISTS` answers every start after the first with NOTICEs ("already exists,
        // skipping") that sqlx logs at INFO: noise, on this session only. Warnings still show.
        // DDL on a big table may outlast the pool's statement_timeout, and replicas starting
        // together wait on sqlx's migration lock for as long as the first one migrates.
        .options([
            ("search_path", schema),
            ("client_min_messages", "warning"),
            ("statement_timeout", "0"),
            ("lock_timeout", "0"),
        ]);
    let migrations = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(options)
        .await
        .map_err(StoreError::Connect)?;
    let result = async {
        create_schema(&migrations, schema).await?;
        migrator
            .run(&migrations)
            .await
            .map_err(|source| StoreError::Migrate {
                schema: schema.to_owned(),
                source,
            })
    }
    .await;
    migrations.close().await;
    result
}

async fn create_schema(pool: &PgPool, schema: &str) -> Result<(), StoreError> {
    match sqlx::query(&format!("CREATE SCHEMA IF NOT EXISTS {schema}"))
        .execute(pool)
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
