use std::fmt;
use std::str::FromStr;

use uuid::Uuid;

use crate::AuthError;

/// What a key may do. Roles are not a strict ladder: only [`Role::Service`] may
/// read clear connection URLs, which not even an admin can.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Reads fleet state.
    Viewer,
    /// Reads and changes fleet state.
    Operator,
    /// Everything an operator does, plus tenant and key management.
    Admin,
    /// A Keel component (such as a collector) that needs instance secrets.
    Service,
}

impl Role {
    /// Every role, for tests and help texts.
    pub const ALL: [Role; 4] = [Role::Viewer, Role::Operator, Role::Admin, Role::Service];

    /// Whether a caller holding `self` may do what needs `required`.
    pub fn satisfies(self, required: Role) -> bool {
        match required {
            // Services list instances too, so they read like a viewer.
            Role::Viewer => true,
            Role::Operator => matches!(self, Role::Operator | Role::Admin),
            Role::Admin => self == Role::Admin,
            // Clear secrets go to Keel's own components only, never to a human's key.
            Role::Service => self == Role::Service,
        }
    }

    /// The lowercase name used in the database, in messages and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
            Role::Service => "service",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A string that names no [`Role`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown role {0:?}: expected viewer, operator, admin or service")]
pub struct ParseRoleError(String);

impl FromStr for Role {
    type Err = ParseRoleError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| ParseRoleError(s.to_owned()))
    }
}

/// Checks that a tenant name matches `^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$`, a DNS
/// label, so it can name Kubernetes objects and metric labels unchanged.
pub fn validate_tenant(tenant: &str) -> Result<(), AuthError> {
    let bytes = tenant.as_bytes();
    let inner_ok = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-';
    let edge_ok = |b: Option<&u8>| b.is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    let valid = (1..=63).contains(&bytes.len())
        && edge_ok(bytes.first())
        && edge_ok(bytes.last())
        && bytes.iter().all(inner_ok);
    if valid {
        Ok(())
    } else {
        Err(AuthError::InvalidTenant(tenant.to_owned()))
    }
}

/// A validated tenant name: a DNS label (see [`validate_tenant`]), so it can name
/// Kubernetes objects and metric labels unchanged. It can never be empty.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tenant(String);

impl Tenant {
    /// `name` as a tenant, if it is a DNS label.
    pub fn new(name: impl Into<String>) -> Result<Self, AuthError> {
        let name = name.into();
        validate_tenant(&name)?;
        Ok(Tenant(name))
    }

    /// The tenant's name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Tenant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for Tenant {
    type Err = AuthError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Tenant::new(s)
    }
}

impl AsRef<str> for Tenant {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl PartialEq<str> for Tenant {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<&str> for Tenant {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

/// Whose data a key, and so a call, may reach.
///
/// Every user-facing key is bound to one tenant. Keel's own services (a collector
/// scraping every tenant's instances) hold fleet keys, which always have the
/// [`Role::Service`] role; the database refuses a fleet key with any other role.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Scope {
    /// One tenant's data only; another tenant's looks like nothing at all.
    Tenant(Tenant),
    /// Every tenant's data: Keel's own services only.
    Fleet,
}

impl Scope {
    /// The scope of one tenant, if `name` is a valid tenant.
    pub fn tenant(name: impl Into<String>) -> Result<Self, AuthError> {
        Tenant::new(name).map(Scope::Tenant)
    }

    /// The tenant this scope is bound to; `None` for the fleet.
    pub fn tenant_name(&self) -> Option<&Tenant> {
        match self {
            Scope::Tenant(tenant) => Some(tenant),
            Scope::Fleet => None,
        }
    }

    /// Whether this is the fleet scope.
    pub fn is_fleet(&self) -> bool {
        matches!(self, Scope::Fleet)
    }

    /// Whether a caller of this scope may see `tenant`'s data.
    pub fn covers(&self, tenant: &str) -> bool {
        match self {
            Scope::Tenant(own) => own.as_str() == tenant,
            Scope::Fleet => true,
        }
    }
}

impl fmt::Display for Scope {
    /// `tenant acme` or `fleet`, as messages and listings show it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scope::Tenant(tenant) => write!(f, "tenant {tenant}"),
            Scope::Fleet => f.write_str("fleet"),
        }
    }
}

/// The authenticated caller of an RPC, put into the request extensions by
/// [`AuthLayer`](crate::AuthLayer) and read back with [`principal`](crate::principal).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The API key the caller used; for an in-process call
    /// ([`in_process_channel`](crate::in_process_channel)), an id of the channel, which
    /// names no stored key.
    pub key_id: Uuid,
    /// Whose data every query of this call is scoped to.
    pub scope: Scope,
    /// What the caller may do.
    pub role: Role,
    /// The identity in the client certificate the server verified under mutual TLS
    /// (see `keel_server::PeerIdentity`), whatever the role; `None` without one.
    pub peer_identity: Option<String>,
}

impl Principal {
    /// Fails with PERMISSION_DENIED unless the caller's role satisfies `required`.
    ///
    /// `action` completes the sentence "role viewer may not …", e.g. `"create instances"`.
    pub fn require(&self, required: Role, action: &str) -> Result<(), tonic::Status> {
        if self.role.satisfies(required) {
            Ok(())
        } else {
            Err(tonic::Status::permission_denied(format!(
                "role {} may not {action}; it needs {required}",
                self.role
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_matrix() {
        use Role::*;
        // (held, required, allowed)
        let matrix = [
            (Viewer, Viewer, true),
            (Viewer, Operator, false),
            (Viewer, Admin, false),
            (Viewer, Service, false),
            (Operator, Viewer, true),
            (Operator, Operator, true),
            (Operator, Admin, false),
            (Operator, Service, false),
            (Admin, Viewer, true),
            (Admin, Operator, true),
            (Admin, Admin, true),
            (Admin, Service, false),
            (Service, Viewer, true),
            (Service, Operator, false),
            (Service, Admin, false),
            (Service, Service, true),
        ];
        assert_eq!(matrix.len(), Role::ALL.len() * Role::ALL.len());
        for (held, required, allowed) in matrix {
            assert_eq!(
                held.satisfies(required),
                allowed,
                "{held} satisfies {required}"
            );
        }
    }

    #[test]
    fn roles_round_trip_through_strings() {
        for role in Role::ALL {
            assert_eq!(role.to_string().parse::<Role>(), Ok(role));
        }
        let err = "Admin".parse::<Role>().expect_err("capitalised role");
        assert_eq!(
            err.to_string(),
            "unknown role \"Admin\": expected viewer, operator, admin or service"
        );
    }

    fn check_tenant(tenant: &str, valid: bool) {
        assert_eq!(validate_tenant(tenant).is_ok(), valid, "{tenant:?}");
    }

    #[test]
    fn tenant_names_are_dns_labels() {
        for good in ["a", "0", "acme", "acme-prod", "a1-b2", &"a".repeat(63)] {
            check_tenant(good, true);
        }
        for bad in [
            "",
            "-a",
            "a-",
            "Acme",
            "a_b",
            "a.b",
            "a b",
            "ä",
            &"a".repeat(64),
        ] {
            check_tenant(bad, false);
        }
        let err = validate_tenant("Acme").expect_err("uppercase tenant");
        assert!(
            err.to_string()
                .starts_with("invalid tenant \"Acme\": use 1 to 63 lowercase"),
            "{err}"
        );
    }

    #[test]
    fn require_explains_the_missing_role() {
        let p = Principal {
            key_id: Uuid::nil(),
            scope: Scope::tenant("acme").expect("valid tenant"),
            role: Role::Viewer,
            peer_identity: None,
        };
        assert!(p.require(Role::Viewer, "list instances").is_ok());
        let status = p
            .require(Role::Operator, "create instances")
            .expect_err("viewer");
        assert_eq!(status.code(), tonic::Code::PermissionDenied);
        assert_eq!(
            status.message(),
            "role viewer may not create instances; it needs operator"
        );
        let admin = Principal {
            role: Role::Admin,
            ..p
        };
        let status = admin
            .require(Role::Service, "read connection URLs")
            .expect_err("admin");
        assert_eq!(
            status.message(),
            "role admin may not read connection URLs; it needs service"
        );
    }
}
