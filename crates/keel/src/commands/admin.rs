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
use crate::failure::{Failure, Kind as _};
use crate::output;
use crate::table::{Column, Layout, Table};

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
                        .kind(Failure::Invalid)
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
                Output::Json => output::print(serde_json::json!({
                    "id": created.id, "key": created.key.expose_secret(), "prefix": created.prefix,
                    "scope": scope_kind(&created.scope), "tenant": tenant_of(&created.scope),
                    "role": created.role.as_str(), "name": created.name,
                    "expires_at": expires_at.map(|t| t.to_rfc3339()),
                }))?,
                Output::Table | Output::Wide => {
                    output::print(created.key.expose_secret())?;
                    output::note(format_args!(
                        "created {} key {:?} for {} (id {}). This is the only time the key is shown; store it now.",
                        created.role, created.name, created.scope, created.id
                    ));
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
            match output {
                Output::Json => {
                    let keys: Vec<_> = keys.iter().map(key_json).collect();
                    output::print(serde_json::Value::Array(keys))?;
                }
                Output::Table | Output::Wide => {
                    output::print(keys_table(&keys, Layout::for_output(output)))?
                }
            }
        }
        AdminCommand::RevokeKey { key, database } => {
            let store = key_store(&database).await?;
            let found = find_key(&store, &key).await?;
            if let Some(at) = found.revoked_at {
                return Err(Failure::Conflict.error(format!(
                    "key {} ({:?} of {}) is already revoked, since {}",
                    found.id,
                    found.name,
                    found.scope,
                    short_time(at)
                )));
            }
            store.revoke(found.id, &Actor::cli()).await?;
            output::print(format_args!(
                "revoked key {} ({:?} of {})",
                found.id, found.name, found.scope
            ))?;
        }
        AdminCommand::SetRole {
            key,
            role,
            database,
            output,
        } => {
            let store = key_store(&database).await?;
            let found = find_key(&store, &key).await?;
            let id = found.id;
            let key = store.change_role(id, role, &Actor::cli()).await?;
            match output {
                Output::Json => output::print(key_json(&key))?,
                Output::Table | Output::Wide => output::print(format_args!(
                    "key {id} ({:?} of {}) now has role {role}; servers apply it within their auth cache TTL",
                    key.name, key.scope
                ))?,
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
                    output::print(serde_json::Value::Array(entries))?;
                }
                Output::Table | Output::Wide => {
                    output::print(audit_table(&entries, Layout::for_output(output)))?
                }
            }
        }
        AdminCommand::RotateKey {
            database,
            encryption,
            batch,
        } => {
            if batch < 1 {
                return Err(Failure::Invalid.error("--batch must be at least 1"));
            }
            let keys = Arc::new(key_ring(&encryption)?);
            let primary = keys.primary_id().to_owned();
            let pool = connect(&database).await?;
            KeyStore::migrate(&pool).await?;
            keel_registry::migrate(&pool).await?;
            let store = KeyStore::new(pool.clone(), Duration::ZERO);
            output::note(format_args!(
                "re-encrypting credentials under key {primary:?}"
            ));
            let total = keel_registry::rotate_keys(pool, keys, batch, |step| {
                output::note(format_args!(
                    "  {} re-encrypted, {} remaining",
                    step.rotated, step.remaining
                ));
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
            output::print(format_args!(
                "rotation complete: {total} credentials re-encrypted; keys other than the first may now be removed"
            ))?;
        }
    }
    Ok(())
}

async fn connect(database: &DatabaseConfig) -> anyhow::Result<PgPool> {
    database.validate()?;
    // The store's error says what failed ("cannot connect to the state store: …") and decides
    // the exit code: unreachable, missing database, refused login.
    Ok(keel_store::connect(database).await?)
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
        (Some(_), false, None) => {
            Err(Failure::Invalid.error("--role is required for a tenant's key"))
        }
        _ => Err(Failure::Invalid.error("set exactly one of --tenant and --fleet")),
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

/// A time for people: minutes are enough, UTC.
fn short_time(at: chrono::DateTime<chrono::Utc>) -> String {
    at.format("%Y-%m-%d %H:%M UTC").to_string()
}

/// The key `reference` names: its id, or its name. Of the keys with that name, the one still
/// active is meant (revoked keys keep their names); a name several active keys share (in
/// different scopes), or only several revoked ones, needs the id.
async fn find_key(store: &KeyStore, reference: &str) -> anyhow::Result<KeyInfo> {
    let keys = store.list(None).await?;
    if let Ok(id) = uuid::Uuid::parse_str(reference)
        && let Some(key) = keys.iter().find(|k| k.id == id)
    {
        return Ok(key.clone());
    }
    let named: Vec<&KeyInfo> = keys.iter().filter(|k| k.name == reference).collect();
    let active: Vec<&KeyInfo> = named
        .iter()
        .copied()
        .filter(|k| k.revoked_at.is_none())
        .collect();
    let candidates = match (&active[..], &named[..]) {
        ([key], _) | ([], [key]) => return Ok((*key).clone()),
        ([], []) => {
            return Err(Failure::NotFound.error(format!(
                "no API key with id or name {reference:?}; `keel admin list-keys` lists them"
            )));
        }
        ([], _) => named,
        _ => active,
    };
    let listed: Vec<String> = candidates
        .iter()
        .map(|k| {
            let state = if k.revoked_at.is_some() {
                ", revoked"
            } else {
                ""
            };
            format!("{} ({}, {}{state})", k.id, k.scope, k.role)
        })
        .collect();
    Err(Failure::Invalid.error(format!(
        "{} keys are named {reference:?}: {}; give the id of the one you mean",
        candidates.len(),
        listed.join(", ")
    )))
}

/// Keys, one a row; `-o wide` adds the id, the prefix and the revocation time.
fn keys_table(keys: &[KeyInfo], layout: Layout) -> String {
    if keys.is_empty() {
        return "no keys".to_owned();
    }
    let mut t = Table::new(&[
        Column::keep("NAME"),
        Column::optional("SCOPE", 1),
        Column::optional("ROLE", 1),
        Column::optional("STATE", 2),
        Column::optional("CREATED", 4),
        Column::optional("EXPIRES", 3),
        Column::wide("PREFIX"),
        Column::wide("REVOKED"),
        Column::wide("ID"),
    ]);
    let now = chrono::Utc::now();
    for k in keys {
        let state = match (k.revoked_at, k.expires_at) {
            (Some(_), _) => "revoked",
            (None, Some(at)) if at <= now => "expired",
            _ => "active",
        };
        t.row(vec![
            k.name.clone(),
            k.scope.to_string(),
            k.role.to_string(),
            state.to_owned(),
            short_time(k.created_at),
            k.expires_at.map(short_time).unwrap_or_default(),
            k.prefix.clone(),
            k.revoked_at.map(short_time).unwrap_or_default(),
            k.id.to_string(),
        ]);
    }
    t.render(layout)
}

/// The audit log, newest first; details wrap between words.
fn audit_table(entries: &[keel_auth::AuditEntry], layout: Layout) -> String {
    if entries.is_empty() {
        return "no audit entries".to_owned();
    }
    let mut t = Table::new(&[
        Column::keep("AT"),
        Column::keep("ACTION"),
        Column::optional("ACTOR", 2),
        Column::optional("TENANT", 3),
        Column::optional("DETAILS", 4).wrapping(),
        Column::optional("SUBJECT", 5),
    ]);
    for e in entries {
        let details = match &e.details {
            serde_json::Value::Object(map) => map
                .iter()
                .map(|(k, v)| match v {
                    serde_json::Value::String(s) => format!("{k}={s}"),
                    other => format!("{k}={other}"),
                })
                .collect::<Vec<_>>()
                .join(" "),
            other => other.to_string(),
        };
        t.row(vec![
            short_time(e.at),
            e.action.clone(),
            e.actor.clone(),
            e.tenant.clone().unwrap_or_default(),
            details,
            e.subject.clone(),
        ]);
    }
    t.render(layout)
}

/// The key ring from KEEL_ENCRYPTION_KEYS or the file; never from a flag value.
pub(crate) fn key_ring(args: &EncryptionArgs) -> anyhow::Result<KeyRing> {
    let from_env = match std::env::var(ENCRYPTION_KEYS_ENV) {
        Ok(keys) if keys.is_empty() => None,
        Ok(keys) => Some(SecretString::from(keys)),
        Err(std::env::VarError::NotPresent) => None,
        Err(std::env::VarError::NotUnicode(_)) => {
            return Err(Failure::Invalid.error(format!("{ENCRYPTION_KEYS_ENV} is not valid UTF-8")));
        }
    };
    let spec = match (from_env, &args.encryption_keys_file) {
        (Some(_), Some(_)) => {
            return Err(Failure::Invalid.error(format!(
                "set either {ENCRYPTION_KEYS_ENV} or --encryption-keys-file / KEEL_ENCRYPTION_KEYS_FILE, not both"
            )));
        }
        (Some(keys), None) => keys,
        (None, Some(path)) => keel_config::read_secret_file(
            "--encryption-keys-file / KEEL_ENCRYPTION_KEYS_FILE",
            path,
        )?,
        (None, None) => {
            return Err(Failure::Invalid.error(
                "no encryption keys: set KEEL_ENCRYPTION_KEYS_FILE (or KEEL_ENCRYPTION_KEYS) to <key-id>:<base64 of 32 bytes>; \
                 generate a key with: head -c 32 /dev/urandom | base64",
            ));
        }
    };
    KeyRing::parse(&spec).kind(Failure::Invalid)
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

        run(AdminCommand::RevokeKey {
            key: id.to_string(),
            database: database.clone(),
        })
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

        // Again, by name: it says so, as a conflict, and records nothing more.
        let err = run(AdminCommand::RevokeKey {
            key: "ci".into(),
            database,
        })
        .await
        .expect_err("revoked twice");
        assert!(
            err.to_string().contains("is already revoked, since"),
            "{err}"
        );
        assert_eq!(
            crate::failure::classify(&err),
            crate::failure::Failure::Conflict
        );
        assert_eq!(store.audit_log(10).await.expect("audit log").len(), 2);
    }

    #[tokio::test]
    async fn set_role_applies_on_the_next_call_and_is_audited() {
        let (store, database) = setup().await;
        let (_, key) = create(&store, Role::Viewer).await;
        // By name: the tenant's only key named "ci".
        run(AdminCommand::SetRole {
            key: "ci".into(),
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
            key: keys[0].id.to_string(),
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
