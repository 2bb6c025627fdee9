//! Keel's API keys and the layer that authenticates every gRPC call.
//!
//! A key looks like `keel_` followed by 40 random characters. Only its SHA-256
//! hash is stored (table `auth.api_keys`), together with the [`Scope`] and the
//! [`Role`] it is bound to, so a database dump never yields a usable key. A key's
//! scope is one [`Tenant`], or the fleet for Keel's own services (role `service`
//! only, enforced by the database too).
//!
//! Services of one process call each other through an [`InProcess`] channel, as an
//! internal fleet caller that needs no key and that no listener accepts.
//!
//! Services wrap each generated server in [`AuthLayer`]; handlers then read the
//! caller's [`Principal`] with [`principal`] and check it with
//! [`Principal::require`]. Clients attach their key with [`bearer_interceptor`].
//!
//! Successful lookups are cached briefly; each serving process runs
//! [`KeyStore::watch_changes`], so that a key revoked or re-roled on any replica
//! is treated as such on its next call everywhere.
//!
//! Every change to a key is written to the audit log (table `auth.audit_log`) in
//! the transaction that makes it, with the [`Actor`] who asked for it; see
//! [`KeyStore::audit_log`].

mod audit;
mod error;
mod in_process;
mod key;
mod layer;
mod role;
mod store;

pub use audit::{Actor, AuditEntry, action};
pub use error::AuthError;
pub use in_process::{BoxError, InProcess};
pub use layer::{AuthLayer, AuthService, bearer_interceptor, principal};
pub use role::{ParseRoleError, Principal, Role, Scope, Tenant, validate_tenant};
pub use store::{CreatedKey, DEFAULT_CACHE_TTL, KeyInfo, KeyStore, NewKey};
