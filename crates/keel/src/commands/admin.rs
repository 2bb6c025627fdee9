//! `keel admin …`: API keys and encryption keys, straight against the state store,
//! so the first admin key can exist before any server does.

use std::sync::Arc;

use anyhow::Context as _;
use keel_config::DatabaseConfig;
use keel_registry::crypto::KeyRing;
use secrecy::ExposeSecret;
use sqlx::PgPool;

use crate::cli::{AdminCommand, EncryptionArgs, Output};
use crate::output;

pub(crate) async fn run(command: AdminCommand) -> anyhow::Result<()> {
    match command {
        AdminCommand::CreateKey {
            tenant,
            role,
            name,
            expires_in,
            database,
            output,
        } => {
            let pool = connect(&database).await?;
            keel_auth::KeyStore::migrate(&pool).await?;
            let store = keel_auth::KeyStore::new(pool, keel_auth::DEFAULT_CACHE_TTL);
            let expires_at = expires_in
                .map(|d| chrono::Duration::from_std(d).map(|d| chrono::Utc::now() + d))
                .transpose()
                .context("--expires-in is too long")?;
            let created = store
                .create_key(keel_auth::NewKey {
                    tenant,
                    role,
                    name,
                    expires_at,
                })
                .await?;
            match output {
                Output::Json => println!(
                    "{}",
                    serde_json::json!({
                        "id": created.id, "key": created.key.expose_secret(), "prefix": created.prefix,
                        "tenant": created.tenant, "role": created.role.as_str(), "name": created.name,
                        "expires_at": expires_at.map(|t| t.to_rfc3339()),
                    })
                ),
                Output::Table => {
                    println!("{}", created.key.expose_secret());
                    eprintln!(
                        "created {} key {:?} for tenant {} (id {}). This is the only time the key is shown; store it now.",
                        created.role, created.name, created.tenant, created.id
                    );
                }
            }
        }
        AdminCommand::ListKeys {
            tenant,
            database,
            output,
        } => {
            let pool = connect(&database).await?;
            keel_auth::KeyStore::migrate(&pool).await?;
            let store = keel_auth::KeyStore::new(pool, keel_auth::DEFAULT_CACHE_TTL);
            let keys = store.list(tenant.as_deref()).await?;
            let when = |t: Option<chrono::DateTime<chrono::Utc>>| {
                t.map(|t| t.to_rfc3339()).unwrap_or_default()
            };
            match output {
                Output::Json => {
                    let keys: Vec<_> = keys
                        .iter()
                        .map(|k| {
                            serde_json::json!({
                                "id": k.id, "tenant": k.tenant, "role": k.role.as_str(), "name": k.name,
                                "prefix": k.prefix, "created_at": k.created_at.to_rfc3339(),
                                "expires_at": k.expires_at.map(|t| t.to_rfc3339()),
                                "revoked_at": k.revoked_at.map(|t| t.to_rfc3339()),
                            })
                        })
                        .collect();
                    println!("{}", serde_json::Value::Array(keys));
                }
                Output::Table => {
                    let mut table = output::table(&[
                        "ID", "TENANT", "ROLE", "NAME", "PREFIX", "CREATED", "EXPIRES", "REVOKED",
                    ]);
                    for k in &keys {
                        table.add_row(vec![
                            k.id.to_string(),
                            k.tenant.clone(),
                            k.role.to_string(),
                            k.name.clone(),
                            k.prefix.clone(),
                            k.created_at.to_rfc3339(),
                            when(k.expires_at),
                            when(k.revoked_at),
                        ]);
                    }
                    println!("{table}");
                }
            }
        }
        AdminCommand::RevokeKey { id, database } => {
            let pool = connect(&database).await?;
            let store = keel_auth::KeyStore::new(pool, keel_auth::DEFAULT_CACHE_TTL);
            store.revoke(id).await?;
            println!("revoked key {id}");
        }
        AdminCommand::RotateKey {
            database,
            encryption,
            batch,
        } => {
            anyhow::ensure!(batch > 0, "--batch must be at least 1");
            let keys = Arc::new(key_ring(&encryption)?);
            let pool = connect(&database).await?;
            keel_registry::migrate(&pool).await?;
            eprintln!(
                "re-encrypting credentials under key {:?}",
                keys.primary_id()
            );
            let total = keel_registry::rotate_keys(pool, keys, batch, |step| {
                eprintln!(
                    "  {} re-encrypted, {} remaining",
                    step.rotated, step.remaining
                );
            })
            .await?;
            println!(
                "rotation complete: {total} credentials re-encrypted; keys other than the first may now be removed"
            );
        }
    }
    Ok(())
}

async fn connect(database: &DatabaseConfig) -> anyhow::Result<PgPool> {
    database.validate()?;
    keel_store::connect(database)
        .await
        .context("cannot open the state store")
}

/// The key ring from the flag, environment or file.
pub(crate) fn key_ring(args: &EncryptionArgs) -> anyhow::Result<KeyRing> {
    let spec = match (&args.keys, &args.encryption_keys_file) {
        (Some(keys), _) => keys.clone(),
        (None, Some(path)) => keel_config::read_secret_file(
            "--encryption-keys-file / KEEL_ENCRYPTION_KEYS_FILE",
            path,
        )?,
        (None, None) => anyhow::bail!(
            "no encryption keys: set KEEL_ENCRYPTION_KEYS_FILE (or KEEL_ENCRYPTION_KEYS) to <key-id>:<base64 of 32 bytes>; \
             generate a key with: head -c 32 /dev/urandom | base64"
        ),
    };
    Ok(KeyRing::parse(&spec)?)
}
