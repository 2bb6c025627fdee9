//! `keel admin …`: API keys and encryption keys, straight against the state store,
//! so the first admin key can exist before any server does.
//!
//! Every change is recorded in the audit log with the OS user and host running the
//! command as its actor.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use keel_auth::{Actor, KeyInfo, KeyStore, Role, Scope};
use keel_config::DatabaseConfig;
use keel_registry::crypto::KeyRing;
use secrecy::{ExposeSecret, SecretString};
use sqlx::PgPool;

use crate::cli::{AdminCommand, EncryptionArgs, Output};
use crate::output;

/// The key ring itself, for `rotate-key`, which takes it only from the environment
/// or a file: never from a flag, which would show in `ps`.
const ENCRYPTION_KEYS_ENV: &str = "KEEL_ENCRYPTION_KEYS";

pub(crate) async fn run(command: AdminCommand) -> anyhow::Result<()> {
    match command {
        AdminCommand::CreateKey {
            tenant,
            fleet,
            role,
            name,
            expires_in,
            database,
            output,
        } => {
            let (scope, role) = scope_and_role(tenant, fleet, role)?;
            let store = key_store(&database).await?;
            // The parser caps durations, but the clock arithmetic is checked anyway: an
            // overflow here would panic.
            let expires_at = expires_in
                .map(|d| {
                    chrono::Duration::from_std(d)
                        .ok()
                        .and_then(|d| chrono::Utc::now().checked_add_signed(d))
                        .context("--expires-in is too long; at most 10y is accepted")
                })
                .transpose()?;
            let created = store
                .create_key(
                    keel_auth::NewKey {
                        scope,
                        role,
                        name,
                        expires_at,
                    },
                    &Actor::cli(),
                )
                .await?;
            match output {
                Output::Json => println!(
                    "{}",
                    serde_json::json!({
                        "id": created.id, "key": created.key.expose_secret(), "prefix": created.prefix,
                        "scope": scope_kind(&created.scope), "tenant": tenant_of(&created.scope),
                        "role": created.role.as_str(), "name": created.name,
                        "expires_at": expires_at.map(|t| t.to_rfc3339()),
                    })
                ),
                Output::Table => {
                    println!("{}", created.key.expose_secret());
                    eprintln!(
                        "created {} key {:?} for {} (id {}). This is the only time the key is shown; store it now.",
                        created.role, created.name, created.scope, created.id
                    );
                }
            }
        }
        AdminCommand::ListKeys {
            tenant,
            fleet,
            database,
            output,
        } => {
            let scope = match (tenant, fleet) {
                (Some(tenant), _) => Some(Scope::tenant(tenant)?),
                (None, true) => Some(Scope::Fleet),
                (None, false) => None,
            };
            let store = key_store(&database).await?;
            let keys = store.list(scope.as_ref()).await?;
            let when = |t: Option<chrono::DateTime<chrono::Utc>>| {
                t.map(|t| t.to_rfc3339()).unwrap_or_default()
            };
            match output {
                Output::Json => {
                    let keys: Vec<_> = keys.iter().map(key_json).collect();
                    println!("{}", serde_json::Value::Array(keys));
                }
                Output::Table => {
                    let mut table = output::table(&[
                        "ID", "SCOPE", "ROLE", "NAME", "PREFIX", "CREATED", "EXPIRES", "REVOKED",
                    ]);
                    for k in &keys {
                        table.add_row(vec![
                            k.id.to_string(),
                            k.scope.to_string(),
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
            let store = key_store(&database).await?;
            store.revoke(id, &Actor::cli()).await?;
            println!("revoked key {id}");
        }
        AdminCommand::SetRole {
            id,
            role,
            database,
            output,
        } => {
            let store = key_store(&database).await?;
            let key = store.change_role(id, role, &Actor::cli()).await?;
            match output {
                Output::Json => println!("{}", key_json(&key)),
                Output::Table => println!(
                    "key {id} ({:?} of {}) now has role {role}; servers apply it within their auth cache TTL",
                    key.name, key.scope
                ),
            }
        }
        AdminCommand::Audit {
            limit,
            database,
            output,
        } => {
            let store = key_store(&database).await?;
            let entries = store.audit_log(limit).await?;
            match output {
                Output::Json => {
                    let entries: Vec<_> = entries
                        .iter()
                        .map(|e| {
                            serde_json::json!({
                                "id": e.id, "at": e.at.to_rfc3339(), "actor": e.actor,
                                "action": e.action, "tenant": e.tenant, "subject": e.subject,
                                "details": e.details,
                            })
                        })
                        .collect();
                    println!("{}", serde_json::Value::Array(entries));
                }
                Output::Table => {
                    let mut table =
                        output::table(&["AT", "ACTOR", "ACTION", "TENANT", "SUBJECT", "DETAILS"]);
                    for e in &entries {
                        table.add_row(vec![
                            e.at.to_rfc3339(),
                            e.actor.clone(),
                            e.action.clone(),
                            e.tenant.clone().unwrap_or_default(),
                            e.subject.clone(),
                            e.details.to_string(),
                        ]);
                    }
                    println!("{table}");
                }
            }
        }
        AdminCommand::RotateKey {
            database,
            encryption,
            batch,
        } => {
            anyhow::ensure!(batch > 0, "--batch must be at least 1");
            let keys = Arc::new(key_ring(&encryption)?);
            let primary = keys.primary_id().to_owned();
            let pool = connect(&database).await?;
            KeyStore::migrate(&pool).await?;
            keel_registry::migrate(&pool).await?;
            let store = KeyStore::new(pool.clone(), Duration::ZERO);
            eprintln!("re-encrypting credentials under key {primary:?}");
            let total = keel_registry::rotate_keys(pool, keys, batch, |step| {
                eprintln!(
                    "  {} re-encrypted, {} remaining",
                    step.rotated, step.remaining
                );
            })
            .await?;
            store
                .record(
                    &Actor::cli(),
                    keel_auth::action::ENCRYPTION_KEY_ROTATED,
                    None,
                    &primary,
                    serde_json::json!({ "rows_reencrypted": total }),
                )
                .await
                .context(
                    "credentials were re-encrypted, but recording it in the audit log failed",
                )?;
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

/// A key store on a migrated `auth` schema, so commands also work on a state store
/// no server has started on yet.
async fn key_store(database: &DatabaseConfig) -> anyhow::Result<KeyStore> {
    let pool = connect(database).await?;
    KeyStore::migrate(&pool).await?;
    // A one-shot command authenticates nothing, so there is nothing to cache.
    Ok(KeyStore::new(pool, Duration::ZERO))
}

/// The scope and role of a new key from `create-key`'s flags, which clap already made
/// exclusive (`--tenant` or `--fleet`, one required; `--role` unless `--fleet`).
fn scope_and_role(
    tenant: Option<String>,
    fleet: bool,
    role: Option<Role>,
) -> anyhow::Result<(Scope, Role)> {
    match (tenant, fleet, role) {
        (None, true, None | Some(Role::Service)) => Ok((Scope::Fleet, Role::Service)),
        (None, true, Some(role)) => Err(keel_auth::AuthError::FleetRoleNotService(role))
            .context("--fleet with --role: leave --role out, a fleet key is always service"),
        (Some(tenant), false, Some(role)) => Ok((Scope::tenant(tenant)?, role)),
        (Some(_), false, None) => anyhow::bail!("--role is required for a tenant's key"),
        _ => anyhow::bail!("set exactly one of --tenant and --fleet"),
    }
}

/// `"tenant"` or `"fleet"`, for JSON output.
fn scope_kind(scope: &Scope) -> &'static str {
    match scope {
        Scope::Tenant(_) => "tenant",
        Scope::Fleet => "fleet",
    }
}

/// The key's tenant, `null` for a fleet key.
fn tenant_of(scope: &Scope) -> Option<&str> {
    scope.tenant_name().map(keel_auth::Tenant::as_str)
}

fn key_json(k: &KeyInfo) -> serde_json::Value {
    serde_json::json!({
        "id": k.id, "scope": scope_kind(&k.scope), "tenant": tenant_of(&k.scope),
        "role": k.role.as_str(), "name": k.name,
        "prefix": k.prefix, "created_at": k.created_at.to_rfc3339(),
        "expires_at": k.expires_at.map(|t| t.to_rfc3339()),
        "revoked_at": k.revoked_at.map(|t| t.to_rfc3339()),
    })
}

/// The key ring from KEEL_ENCRYPTION_KEYS or the file; never from a flag value.
pub(crate) fn key_ring(args: &EncryptionArgs) -> anyhow::Result<KeyRing> {
    let from_env = match std::env::var(ENCRYPTION_KEYS_ENV) {
        Ok(keys) if keys.is_empty() => None,
        Ok(keys) => Some(SecretString::from(keys)),
        Err(std::env::VarError::NotPresent) => None,
        Err(std::env::VarError::NotUnicode(_)) => {
            anyhow::bail!("{ENCRYPTION_KEYS_ENV} is not valid UTF-8")
        }
    };
    let spec = match (from_env, &args.encryption_keys_file) {
        (Some(_), Some(_)) => anyhow::bail!(
            "set either {ENCRYPTION_KEYS_ENV} or --encryption-keys-file / KEEL_ENCRYPTION_KEYS_FILE, not both"
        ),
        (Some(keys), None) => keys,
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

#[cfg(test)]
mod tests {
    use clap::Parser as _;
    use keel_auth::{AuthError, NewKey};

    use super::*;
    use crate::cli::{Cli, Command};

    /// A migrated key store on a fresh database, and the flags that reach it.
    async fn setup() -> (KeyStore, DatabaseConfig) {
        let env = keel_testkit::TestEnv::new();
        let db = env.database().await.expect("test database");
        let pool = db.pool().await.expect("pool");
        KeyStore::migrate(&pool).await.expect("migrate");
        // TTL 0, as a server's cache past its TTL: every call looks the key up.
        (
            KeyStore::new(pool, Duration::ZERO),
            DatabaseConfig::from_url(db.url),
        )
    }

    async fn create(store: &KeyStore, role: Role) -> (uuid::Uuid, SecretString) {
        let new = NewKey {
            scope: Scope::tenant("acme").expect("valid tenant"),
            role,
            name: "ci".into(),
            expires_at: None,
        };
        let created = store
            .create_key(new, &Actor::system("test"))
            .await
            .expect("create");
        (created.id, created.key)
    }

    #[tokio::test]
    async fn a_key_revoked_with_the_cli_fails_on_its_next_call() {
        let (store, database) = setup().await;
        let (id, key) = create(&store, Role::Operator).await;
        store
            .authenticate(key.expose_secret())
            .await
            .expect("valid before");

        run(AdminCommand::RevokeKey { id, database })
            .await
            .expect("revoke-key");
        let result = store.authenticate(key.expose_secret()).await;
        assert!(matches!(result, Err(AuthError::Revoked)), "{result:?}");

        let entry = &store.audit_log(1).await.expect("audit log")[0];
        assert_eq!(
            (entry.actor.as_str(), entry.action.as_str()),
            (Actor::cli().as_str(), keel_auth::action::KEY_REVOKED)
        );
        assert_eq!(entry.subject, id.to_string());
    }

    #[tokio::test]
    async fn set_role_applies_on_the_next_call_and_is_audited() {
        let (store, database) = setup().await;
        let (id, key) = create(&store, Role::Viewer).await;
        run(AdminCommand::SetRole {
            id,
            role: Role::Operator,
            database: database.clone(),
            output: Output::Json,
        })
        .await
        .expect("set-role");
        let principal = store
            .authenticate(key.expose_secret())
            .await
            .expect("authenticate");
        assert_eq!(principal.role, Role::Operator);

        let entries = store.audit_log(10).await.expect("audit log");
        let actions: Vec<&str> = entries.iter().map(|e| e.action.as_str()).collect();
        assert_eq!(actions, ["key.role_changed", "key.created"]);
        run(AdminCommand::Audit {
            limit: 10,
            database,
            output: Output::Table,
        })
        .await
        .expect("audit");
    }

    fn create_key(args: &[&str]) -> Result<AdminCommand, clap::Error> {
        let mut argv = vec!["keel", "admin", "create-key", "--name", "collector"];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv).map(|cli| match cli.command {
            Command::Admin(command) => command,
            other => panic!("not an admin command: {other:?}"),
        })
    }

    #[test]
    fn create_key_takes_exactly_one_of_tenant_and_fleet() {
        let err = create_key(&["--role", "viewer"]).expect_err("no scope");
        assert_eq!(err.kind(), clap::error::ErrorKind::MissingRequiredArgument);
        let err = create_key(&["--tenant", "acme", "--fleet"]).expect_err("both scopes");
        assert_eq!(err.kind(), clap::error::ErrorKind::ArgumentConflict);
        let err = create_key(&["--tenant", "acme"]).expect_err("tenant key without role");
        assert_eq!(err.kind(), clap::error::ErrorKind::MissingRequiredArgument);
        assert!(
            create_key(&["--fleet"]).is_ok(),
            "a fleet key needs no role"
        );

        assert_eq!(
            scope_and_role(None, true, None).expect("fleet"),
            (Scope::Fleet, Role::Service)
        );
        assert_eq!(
            scope_and_role(None, true, Some(Role::Service)).expect("fleet service"),
            (Scope::Fleet, Role::Service)
        );
        for role in [Role::Viewer, Role::Operator, Role::Admin] {
            let err = scope_and_role(None, true, Some(role)).expect_err("fleet with a user role");
            assert!(
                format!("{err:#}").contains("fleet keys have the service role only"),
                "{err:#}"
            );
        }
        let err = scope_and_role(Some("Acme".into()), false, Some(Role::Viewer))
            .expect_err("invalid tenant");
        assert!(
            err.to_string().starts_with("invalid tenant \"Acme\""),
            "{err}"
        );
    }

    #[tokio::test]
    async fn create_key_fleet_makes_a_service_key_listed_with_its_scope() {
        let (store, database) = setup().await;
        let AdminCommand::CreateKey {
            name, expires_in, ..
        } = create_key(&["--fleet"]).expect("parse")
        else {
            unreachable!("create-key parses to CreateKey");
        };
        run(AdminCommand::CreateKey {
            tenant: None,
            fleet: true,
            role: None,
            name,
            expires_in,
            database: database.clone(),
            output: Output::Json,
        })
        .await
        .expect("create-key --fleet");
        let keys = store.list(Some(&Scope::Fleet)).await.expect("list");
        assert_eq!(keys.len(), 1);
        assert_eq!(
            (keys[0].role, keys[0].name.as_str()),
            (Role::Service, "collector")
        );
        assert_eq!(key_json(&keys[0])["scope"], "fleet");
        assert_eq!(key_json(&keys[0])["tenant"], serde_json::Value::Null);
        let entry = &store.audit_log(1).await.expect("audit log")[0];
        assert_eq!(
            entry.tenant, None,
            "a fleet key's audit entry has no tenant"
        );

        // set-role cannot take a fleet key out of the service role.
        let err = run(AdminCommand::SetRole {
            id: keys[0].id,
            role: Role::Admin,
            database,
            output: Output::Json,
        })
        .await
        .expect_err("fleet key made admin");
        assert!(
            err.to_string()
                .contains("fleet keys have the service role only"),
            "{err}"
        );
    }

    #[test]
    fn rotate_key_takes_no_secret_flag() {
        let parse =
            |args: &[&str]| Cli::try_parse_from(["keel", "admin", "rotate-key"].iter().chain(args));
        let err = parse(&["--encryption-keys", "k1:c2VjcmV0"]).expect_err("secret flag");
        assert_eq!(err.kind(), clap::error::ErrorKind::UnknownArgument);
        let cli = parse(&["--encryption-keys-file", "/run/secrets/keys"]).expect("file flag");
        assert!(matches!(
            cli.command,
            Command::Admin(AdminCommand::RotateKey {
                encryption: EncryptionArgs {
                    encryption_keys_file: Some(_)
                },
                ..
            })
        ));
    }
}
