//! Event subjects, `<root>.<service>.<tenant>.<entity>.<verb>`, built and filtered in one place.
//!
//! The tenant is a token of its own so that NATS permissions can confine a subscriber to one
//! tenant (`keel.*.acme.>`), and the root is the deployment's, so that deployments sharing a
//! NATS server never see each other's events. Every token is checked: a `.`, a wildcard or a
//! space in a tenant would otherwise widen or break a subscriber's permissions.

use std::fmt;

/// A subject token that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{part} {value:?} cannot be a NATS subject token: use 1 to 64 letters, digits, '-' or '_', starting with a letter or digit"
)]
pub struct SubjectError {
    /// Which part of the subject: `root`, `service`, `tenant`, `entity` or `verb`.
    pub part: &'static str,
    /// The refused value.
    pub value: String,
}

fn token<'a>(part: &'static str, value: &'a str) -> Result<&'a str, SubjectError> {
    // Tenants (lowercase, digits, '-') always pass it.
    if keel_config::is_nats_token(value) {
        Ok(value)
    } else {
        Err(SubjectError {
            part,
            value: value.to_owned(),
        })
    }
}

/// What happened, independent of deployment and tenant: `registry`, `instance`, `created`.
///
/// Services declare their kinds as constants; the tokens are checked when a subject is built.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EventKind {
    /// The publishing service, e.g. `registry`.
    pub service: &'static str,
    /// What the event is about, e.g. `instance`.
    pub entity: &'static str,
    /// What happened to it, e.g. `created`.
    pub verb: &'static str,
}

impl EventKind {
    /// The kind `service.entity.verb`.
    pub const fn new(service: &'static str, entity: &'static str, verb: &'static str) -> Self {
        Self {
            service,
            entity,
            verb,
        }
    }

    /// The event's `type`, `keel.<service>.<entity>.<verb>`: the same in every deployment and for
    /// every tenant, so consumers can match on it.
    pub fn type_name(&self) -> String {
        format!("keel.{}.{}.{}", self.service, self.entity, self.verb)
    }
}

/// A deployment's subject root (`keel` unless configured): the first token of all its subjects.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SubjectRoot(String);

impl Default for SubjectRoot {
    fn default() -> Self {
        Self(keel_config::DEFAULT_SUBJECT_ROOT.to_owned())
    }
}

impl SubjectRoot {
    /// The root `root`, refused unless it is one safe token.
    pub fn new(root: &str) -> Result<Self, SubjectError> {
        token("root", root).map(|r| Self(r.to_owned()))
    }

    /// The root token.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `<root>.>`: every subject of this deployment, what its stream captures.
    pub fn all(&self) -> String {
        format!("{}.>", self.0)
    }

    /// The subject of an event of `kind` for `tenant`.
    pub fn subject(&self, kind: &EventKind, tenant: &str) -> Result<String, SubjectError> {
        Ok([
            self.as_str(),
            token("service", kind.service)?,
            token("tenant", tenant)?,
            token("entity", kind.entity)?,
            token("verb", kind.verb)?,
        ]
        .join("."))
    }

    /// The subject filter selecting the events `filter` names, e.g. `keel.*.acme.>`.
    pub fn filter(&self, filter: &Filter<'_>) -> Result<String, SubjectError> {
        let parts = [
            ("service", filter.service),
            ("tenant", filter.tenant),
            ("entity", filter.entity),
            ("verb", filter.verb),
        ];
        let mut tokens = vec![self.as_str()];
        for (part, value) in parts {
            tokens.push(match value {
                Some(value) => token(part, value)?,
                None => "*",
            });
        }
        // Trailing wildcards become one `>`: `keel.registry.>` rather than `keel.registry.*.*.*`,
        // the form NATS permissions are usually written in (and one that still matches when a
        // subject grows a token).
        let specified = tokens.iter().rposition(|t| *t != "*").unwrap_or(0) + 1;
        if specified < tokens.len() {
            tokens.truncate(specified);
            tokens.push(">");
        }
        Ok(tokens.join("."))
    }
}

impl fmt::Display for SubjectRoot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Which events a subscriber wants; `None` matches any value.
///
/// ```
/// # use keel_bus::{Filter, SubjectRoot};
/// let root = SubjectRoot::default();
/// let acme = Filter { tenant: Some("acme"), ..Filter::default() };
/// assert_eq!(root.filter(&acme).unwrap(), "keel.*.acme.>");
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Filter<'a> {
    /// Only events of this service.
    pub service: Option<&'a str>,
    /// Only events of this tenant.
    pub tenant: Option<&'a str>,
    /// Only events about this entity.
    pub entity: Option<&'a str>,
    /// Only events with this verb.
    pub verb: Option<&'a str>,
}

#[cfg(test)]
mod tests {
    use super::*;

    const CREATED: EventKind = EventKind::new("registry", "instance", "created");

    fn root(r: &str) -> SubjectRoot {
        SubjectRoot::new(r).expect("valid root")
    }

    #[test]
    fn subjects_put_the_tenant_second_after_the_service() {
        assert_eq!(
            root("keel").subject(&CREATED, "acme").as_deref(),
            Ok("keel.registry.acme.instance.created")
        );
        assert_eq!(
            root("staging").subject(&CREATED, "a-1").as_deref(),
            Ok("staging.registry.a-1.instance.created")
        );
        assert_eq!(CREATED.type_name(), "keel.registry.instance.created");
        assert_eq!(root("staging").all(), "staging.>");
    }

    #[test]
    fn a_token_that_could_widen_or_break_a_subject_is_refused() {
        // Leaked so that it can stand in an `EventKind`'s `'static` tokens.
        let too_long: &'static str = "x".repeat(65).leak();
        for bad in [
            "", "a.b", "*", ">", "a b", "$JS", "_INBOX", "a\tb", "ä", too_long,
        ] {
            let err = root("keel").subject(&CREATED, bad).expect_err("refused");
            assert_eq!((err.part, err.value.as_str()), ("tenant", bad));
            assert!(err.to_string().contains("letters, digits"), "{err}");
            assert_eq!(SubjectRoot::new(bad).expect_err("refused").part, "root");
            let kind = EventKind::new("registry", bad, "created");
            assert_eq!(
                root("keel")
                    .subject(&kind, "acme")
                    .expect_err("refused")
                    .part,
                "entity"
            );
        }
        let kind = EventKind::new("reg.istry", "instance", "created");
        assert_eq!(
            root("keel")
                .subject(&kind, "acme")
                .expect_err("refused")
                .part,
            "service"
        );
        let kind = EventKind::new("registry", "instance", ">");
        assert_eq!(
            root("keel")
                .subject(&kind, "acme")
                .expect_err("refused")
                .part,
            "verb"
        );
    }

    #[test]
    fn filters_use_wildcards_for_what_they_leave_open() {
        let check = |filter: Filter<'_>, expected: &str| {
            assert_eq!(
                root("keel").filter(&filter).as_deref(),
                Ok(expected),
                "{filter:?}"
            );
        };
        check(Filter::default(), "keel.>");
        check(
            Filter {
                service: Some("registry"),
                ..Filter::default()
            },
            "keel.registry.>",
        );
        check(
            Filter {
                tenant: Some("acme"),
                ..Filter::default()
            },
            "keel.*.acme.>",
        );
        check(
            Filter {
                verb: Some("created"),
                ..Filter::default()
            },
            "keel.*.*.*.created",
        );
        check(
            Filter {
                service: Some("registry"),
                tenant: Some("acme"),
                entity: Some("instance"),
                verb: None,
            },
            "keel.registry.acme.instance.>",
        );
        check(
            Filter {
                service: Some("registry"),
                tenant: Some("acme"),
                entity: Some("instance"),
                verb: Some("created"),
            },
            "keel.registry.acme.instance.created",
        );
        let wildcard = Filter {
            tenant: Some("*"),
            ..Filter::default()
        };
        assert_eq!(
            root("keel").filter(&wildcard).expect_err("refused").part,
            "tenant"
        );
    }
}
