//! The audit log (`auth.audit_log`): who changed which key, and when.
//!
//! Rows are only ever inserted; nothing in Keel updates or deletes them.

use std::fmt;
use std::os::unix::fs::MetadataExt as _;

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::{AuthError, key, validate_tenant};

/// The actions Keel records. [`KeyStore::record`](crate::KeyStore::record) accepts
/// others too, as long as they are dotted lowercase words.
pub mod action {
    /// An API key was created; subject is the key id.
    pub const KEY_CREATED: &str = "key.created";
    /// An API key was revoked; subject is the key id.
    pub const KEY_REVOKED: &str = "key.revoked";
    /// An API key's role changed; subject is the key id.
    pub const KEY_ROLE_CHANGED: &str = "key.role_changed";
    /// Stored credentials were re-encrypted under a new key; subject is that key's id.
    pub const ENCRYPTION_KEY_ROTATED: &str = "encryption_key.rotated";
    /// A key generated outside Keel (the bootstrap admin key) was registered; subject
    /// is the key id.
    pub const BOOTSTRAP_KEY_REGISTERED: &str = "bootstrap_key.registered";
}

/// Longest actor kept; longer ones (a hostile `USER`) are cut.
const ACTOR_MAX_CHARS: usize = 200;

/// Who performed an audited action, e.g. `os:root@db-admin-1`, `key:0198…` or
/// `system:keel-serve`.
///
/// An [`Actor::cli`] is what the operating system environment claims, not a proven
/// identity: whoever runs the CLI already holds the state store's credentials.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Actor(String);

impl Actor {
    /// The user and host running this process, for CLI commands that act on the
    /// state store directly: `os:<user>@<host>`.
    ///
    /// The user comes from `USER` (or `LOGNAME`), else the uid owning this process;
    /// the host from `HOSTNAME`, else the kernel's hostname.
    pub fn cli() -> Self {
        let user = env_value("USER")
            .or_else(|| env_value("LOGNAME"))
            // Containers often set no USER; the uid still says who it was.
            .or_else(|| {
                std::fs::metadata("/proc/self")
                    .ok()
                    .map(|m| format!("uid:{}", m.uid()))
            })
            .unwrap_or_else(|| "unknown".to_owned());
        let host = env_value("HOSTNAME")
            .or_else(|| {
                std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .ok()
                    .map(|h| h.trim().to_owned())
                    .filter(|h| !h.is_empty())
            })
            .unwrap_or_else(|| "unknown".to_owned());
        Actor::from_parts("os", &format!("{user}@{host}"))
    }

    /// An API caller acting with the key `id`: `key:<id>`.
    pub fn key(id: Uuid) -> Self {
        Actor(format!("key:{id}"))
    }

    /// A Keel component acting on its own, e.g. `Actor::system("keel-serve")`:
    /// `system:<name>`.
    pub fn system(name: &str) -> Self {
        Actor::from_parts("system", name)
    }

    /// The actor as stored in the audit log.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Control characters would let a crafted `USER` rewrite the terminal of
    /// whoever reads the log, so they become `?`.
    fn from_parts(kind: &str, name: &str) -> Self {
        let name: String = name
            .chars()
            .take(ACTOR_MAX_CHARS)
            .map(|c| if c.is_control() { '?' } else { c })
            .collect();
        let name = if name.trim().is_empty() {
            "unknown".to_owned()
        } else {
            name
        };
        Actor(format!("{kind}:{name}"))
    }
}

impl fmt::Display for Actor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn env_value(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// One row of the audit log, as [`KeyStore::audit_log`](crate::KeyStore::audit_log)
/// returns it.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct AuditEntry {
    /// The entry's id (UUID v7).
    pub id: Uuid,
    /// When the action was committed, by the database clock.
    pub at: DateTime<Utc>,
    /// Who did it, as [`Actor::as_str`] wrote it.
    pub actor: String,
    /// What was done, e.g. [`action::KEY_CREATED`].
    pub action: String,
    /// The tenant concerned, if the action concerns one.
    pub tenant: Option<String>,
    /// The key id or encryption key id acted on.
    pub subject: String,
    /// Particulars such as the role or name; never a key or its hash.
    pub details: serde_json::Value,
}

/// An audit record about to be written.
pub(crate) struct Record<'a> {
    pub(crate) actor: &'a Actor,
    pub(crate) action: &'a str,
    pub(crate) tenant: Option<&'a str>,
    pub(crate) subject: &'a str,
    pub(crate) details: serde_json::Value,
}

impl Record<'_> {
    /// Checks the record, then inserts it on `conn`, which is the transaction of
    /// the change it records so both commit or neither does.
    pub(crate) async fn insert(self, conn: &mut PgConnection) -> Result<(), AuthError> {
        self.validate()?;
        sqlx::query(
            "INSERT INTO auth.audit_log (id, actor, action, tenant, subject, details) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(Uuid::now_v7())
        .bind(self.actor.as_str())
        .bind(self.action)
        .bind(self.tenant)
        .bind(self.subject)
        .bind(&self.details)
        .execute(conn)
        .await?;
        Ok(())
    }

    fn validate(&self) -> Result<(), AuthError> {
        let invalid = |reason: String| Err(AuthError::InvalidAuditRecord(reason));
        if !is_action(self.action) {
            return invalid(format!(
                "action {:?} is not dotted lowercase words such as \"key.created\"",
                self.action
            ));
        }
        if let Some(tenant) = self.tenant {
            validate_tenant(tenant)?;
        }
        if self.subject.trim().is_empty() {
            return invalid("empty subject".to_owned());
        }
        if !self.details.is_object() {
            return invalid("details must be a JSON object".to_owned());
        }
        // The log is read by more people than may hold keys; a caller passing a key
        // by mistake is stopped here rather than leaking it.
        if contains_key(&self.details) {
            return invalid("details contain an API key".to_owned());
        }
        Ok(())
    }
}

/// Mirrors the migration's CHECK: `^[a-z][a-z_]*(\.[a-z][a-z_]*)+$`.
fn is_action(action: &str) -> bool {
    let mut words = action.split('.');
    let word_ok = |w: &str| {
        w.bytes().next().is_some_and(|b| b.is_ascii_lowercase())
            && w.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
    };
    let first_ok = words.next().is_some_and(word_ok);
    let mut rest = 0;
    let rest_ok = words.all(|w| {
        rest += 1;
        word_ok(w)
    });
    first_ok && rest_ok && rest > 0
}

fn contains_key(value: &serde_json::Value) -> bool {
    use serde_json::Value;
    match value {
        Value::String(s) => s.match_indices("keel_").any(|(at, _)| {
            s.get(at..at + key::KEY_LEN)
                .is_some_and(key::is_well_formed)
        }),
        Value::Array(items) => items.iter().any(contains_key),
        Value::Object(fields) => fields
            .iter()
            .any(|(name, value)| key::is_well_formed(name) || contains_key(value)),
        Value::Null | Value::Bool(_) | Value::Number(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn actions_are_dotted_lowercase_words() {
        for good in [
            action::KEY_CREATED,
            action::KEY_REVOKED,
            action::KEY_ROLE_CHANGED,
            action::ENCRYPTION_KEY_ROTATED,
            action::BOOTSTRAP_KEY_REGISTERED,
            "a.b.c",
        ] {
            assert!(is_action(good), "{good:?}");
        }
        for bad in [
            "",
            "key",
            "key.",
            ".key",
            "Key.created",
            "key..x",
            "key.cre ated",
            "_k.x",
            "k.1",
        ] {
            assert!(!is_action(bad), "{bad:?}");
        }
    }

    #[test]
    fn keys_in_details_are_found() {
        let key = format!("keel_{}", "A".repeat(40));
        assert!(contains_key(&json!({ "note": key })));
        assert!(contains_key(
            &json!({ "note": format!("the key was {key}.") })
        ));
        assert!(contains_key(&json!({ "note": format!("x{key}x") })));
        assert!(contains_key(&json!({ "list": [1, { "k": key }] })));
        assert!(contains_key(&json!({ key.clone(): true })));
        assert!(!contains_key(
            &json!({ "prefix": &key[..12], "role": "admin", "rows": 3 })
        ));
    }

    #[test]
    fn actors_name_their_kind_and_stay_printable() {
        let id = Uuid::from_u128(7);
        assert_eq!(
            Actor::key(id).as_str(),
            "key:00000000-0000-0000-0000-000000000007"
        );
        assert_eq!(Actor::system("keel-serve").to_string(), "system:keel-serve");
        assert_eq!(Actor::system("evil\u{1b}[2J").as_str(), "system:evil?[2J");
        assert_eq!(Actor::system(" ").as_str(), "system:unknown");
        assert_eq!(
            Actor::system(&"x".repeat(500)).as_str().len(),
            "system:".len() + ACTOR_MAX_CHARS
        );
        let cli = Actor::cli();
        let (user, host) = cli
            .as_str()
            .strip_prefix("os:")
            .and_then(|rest| rest.rsplit_once('@'))
            .expect("os:user@host");
        assert!(!user.is_empty() && !host.is_empty(), "{cli}");
    }
}
