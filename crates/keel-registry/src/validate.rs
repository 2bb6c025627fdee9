//! Input rules for instances. Each failure names the field and says what to send instead.

use std::collections::HashMap;

use keel_proto::v1::{Engine, MonitoringEndpoint};

/// A field that breaks a rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field} {reason}")]
pub struct Invalid {
    /// The offending field, as named in the API (e.g. `labels["tier"]`).
    pub field: String,
    /// What is wrong and what would be accepted.
    pub reason: String,
}

impl Invalid {
    /// A failure of `field`.
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

const MAX_NAME: usize = 63;
const MAX_LABELS: usize = 64;
const MAX_ENDPOINTS: usize = 16;

/// Names are DNS labels, so they can become Kubernetes object names and metric labels.
pub(crate) fn name(name: &str) -> Result<(), Invalid> {
    const FIELD: &str = "name";
    if name.is_empty() {
        return Err(Invalid::new(
            FIELD,
            "is required: 1 to 63 characters of a-z, 0-9 and '-'",
        ));
    }
    if name.len() > MAX_NAME {
        return Err(Invalid::new(
            FIELD,
            format!(
                "is {} characters long; at most {MAX_NAME} are allowed",
                name.chars().count()
            ),
        ));
    }
    if !is_dns_label(name) {
        return Err(Invalid::new(
            FIELD,
            format!(
                "{} is not allowed: use a-z, 0-9 and '-', start with a letter and end with a letter or digit",
                quoted(name)
            ),
        ));
    }
    Ok(())
}

/// The engine must be one Keel knows.
pub(crate) fn engine(raw: i32) -> Result<Engine, Invalid> {
    match Engine::try_from(raw) {
        Ok(Engine::Postgres) => Ok(Engine::Postgres),
        Ok(Engine::Redis) => Ok(Engine::Redis),
        Ok(Engine::Unspecified) => Err(Invalid::new(
            "engine",
            "is required: ENGINE_POSTGRES or ENGINE_REDIS",
        )),
        Err(_) => Err(Invalid::new(
            "engine",
            format!("{raw} is unknown: use ENGINE_POSTGRES or ENGINE_REDIS"),
        )),
    }
}

/// Environments are short lowercase words such as `production`.
pub(crate) fn environment(environment: &str) -> Result<(), Invalid> {
    const FIELD: &str = "environment";
    if environment.len() > MAX_NAME {
        return Err(Invalid::new(
            FIELD,
            format!(
                "is {} characters long; at most {MAX_NAME} are allowed",
                environment.len()
            ),
        ));
    }
    let valid = environment
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.'));
    if !valid {
        return Err(Invalid::new(
            FIELD,
            format!(
                "{} is not allowed: use a-z, 0-9, '-', '_' and '.'",
                quoted(environment)
            ),
        ));
    }
    Ok(())
}

/// Labels follow Kubernetes' rules, so selectors read the same in Keel and kubectl.
pub(crate) fn labels(labels: &HashMap<String, String>) -> Result<(), Invalid> {
    if labels.len() > MAX_LABELS {
        return Err(Invalid::new(
            "labels",
            format!(
                "has {} entries; at most {MAX_LABELS} are allowed",
                labels.len()
            ),
        ));
    }
    let mut keys: Vec<&String> = labels.keys().collect();
    keys.sort();
    for key in keys {
        label_key(key)?;
        label_value(key, &labels[key])?;
    }
    Ok(())
}

/// A label key: an optional DNS-subdomain prefix and '/', then a name of at most 63 characters.
pub(crate) fn label_key(key: &str) -> Result<(), Invalid> {
    let field = format!("labels key {}", quoted(key));
    let (prefix, name) = match key.split_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    if let Some(prefix) = prefix {
        let valid =
            !prefix.is_empty() && prefix.len() <= 253 && prefix.split('.').all(is_dns_label);
        if !valid {
            return Err(Invalid::new(
                field,
                "has an invalid prefix: before '/' put a DNS subdomain such as example.com (at most 253 characters)",
            ));
        }
    }
    if name.is_empty() || name.len() > MAX_NAME || !is_label_word(name) {
        return Err(Invalid::new(
            field,
            "is not a Kubernetes label key: a name of 1 to 63 characters of a-z, A-Z, 0-9, '-', '_' and '.', starting and ending with a letter or digit, optionally after a prefix and '/'",
        ));
    }
    Ok(())
}

fn label_value(key: &str, value: &str) -> Result<(), Invalid> {
    if value.len() > MAX_NAME {
        return Err(Invalid::new(
            format!("labels[{}]", quoted(key)),
            format!(
                "is {} bytes long; label values have at most {MAX_NAME} characters",
                value.len()
            ),
        ));
    }
    if !value.is_empty() && !is_label_word(value) {
        return Err(Invalid::new(
            format!("labels[{}]", quoted(key)),
            "is not a Kubernetes label value: a-z, A-Z, 0-9, '-', '_' and '.', starting and ending with a letter or digit",
        ));
    }
    Ok(())
}

/// The connection URL must point where the target policy lets Keel connect; the refusal names
/// the rule and the setting that would allow it.
pub(crate) fn target(
    targets: &keel_target::Connector,
    url: &crate::connection::ConnectionUrl,
) -> Result<(), Invalid> {
    use secrecy::ExposeSecret;
    targets.check_url(url.clear.expose_secret()).map_err(|e| {
        Invalid::new(
            "connection_url",
            crate::connection::scrub(&e.to_string(), &url.secrets),
        )
    })
}

/// Monitoring endpoints are plain http(s) URLs without credentials.
pub(crate) fn monitoring_endpoints(endpoints: &[MonitoringEndpoint]) -> Result<(), Invalid> {
    if endpoints.len() > MAX_ENDPOINTS {
        return Err(Invalid::new(
            "monitoring_endpoints",
            format!(
                "has {} entries; at most {MAX_ENDPOINTS} are allowed",
                endpoints.len()
            ),
        ));
    }
    for (i, endpoint) in endpoints.iter().enumerate() {
        let kind_ok = !endpoint.kind.is_empty()
            && endpoint.kind.len() <= MAX_NAME
            && endpoint
                .kind
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
        if !kind_ok {
            return Err(Invalid::new(
                format!("monitoring_endpoints[{i}].kind"),
                "must be 1 to 63 characters of a-z, 0-9, '_' and '-', such as postgres_exporter",
            ));
        }
        let field = format!("monitoring_endpoints[{i}].url");
        if endpoint.url.len() > 2048 {
            return Err(Invalid::new(field, "is longer than 2048 bytes"));
        }
        let url = url::Url::parse(&endpoint.url).map_err(|e| {
            Invalid::new(
                &field,
                format!("is not a valid URL ({e}); expected e.g. http://db-exporter:9187/metrics"),
            )
        })?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(Invalid::new(
                field,
                format!(
                    "scheme {:?} is not supported; use http:// or https://",
                    url.scheme()
                ),
            ));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(Invalid::new(
                field,
                "must not carry credentials; configure the scraper's credentials instead",
            ));
        }
    }
    Ok(())
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_NAME
        && s.starts_with(|c: char| c.is_ascii_lowercase())
        && s.ends_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

fn is_label_word(s: &str) -> bool {
    s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.ends_with(|c: char| c.is_ascii_alphanumeric())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Quotes user input for an error message, cut short so a huge value does not make a huge error.
fn quoted(s: &str) -> String {
    const SHOWN: usize = 40;
    if s.chars().count() <= SHOWN {
        format!("{s:?}")
    } else {
        let head: String = s.chars().take(SHOWN).collect();
        format!("{head:?}…")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check<T: std::fmt::Debug>(result: Result<T, Invalid>, expected: Option<&str>) {
        match (result, expected) {
            (Ok(_), None) => {}
            (Err(e), Some(needle)) => assert!(
                e.to_string().contains(needle),
                "{e} does not contain {needle}"
            ),
            (got, want) => panic!("got {got:?}, want error containing {want:?}"),
        }
    }

    #[test]
    fn names() {
        check(name("orders-db-1"), None);
        check(name(""), Some("name is required"));
        check(
            name(&"a".repeat(200)),
            Some("200 characters long; at most 63"),
        );
        check(name("Orders"), Some("is not allowed"));
        check(name("1db"), Some("start with a letter"));
        check(name("db-"), Some("end with a letter or digit"));
    }

    #[test]
    fn engines() {
        check(engine(1), None);
        check(engine(2), None);
        check(engine(0), Some("engine is required"));
        check(engine(7), Some("engine 7 is unknown"));
    }

    #[test]
    fn label_rules_follow_kubernetes() {
        let labels_of = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        check(
            labels(&labels_of(&[
                ("tier", "db"),
                ("app.kubernetes.io/name", "shop"),
                ("empty", ""),
            ])),
            None,
        );
        check(
            labels(&labels_of(&[("bad key", "x")])),
            Some("is not a Kubernetes label key"),
        );
        check(
            labels(&labels_of(&[("-x", "y")])),
            Some("is not a Kubernetes label key"),
        );
        check(
            labels(&labels_of(&[("Example.com/x", "y")])),
            Some("invalid prefix"),
        );
        check(
            labels(&labels_of(&[("x", "not ok")])),
            Some("is not a Kubernetes label value"),
        );
        check(
            labels(&labels_of(&[("x", &"v".repeat(1 << 20))])),
            Some("1048576 bytes long"),
        );
        let many: HashMap<String, String> =
            (0..65).map(|i| (format!("k{i}"), String::new())).collect();
        check(labels(&many), Some("at most 64"));
    }

    #[test]
    fn endpoints() {
        let ep = |kind: &str, url: &str| {
            vec![MonitoringEndpoint {
                kind: kind.into(),
                url: url.into(),
            }]
        };
        check(
            monitoring_endpoints(&ep("postgres_exporter", "http://exp:9187/metrics")),
            None,
        );
        check(
            monitoring_endpoints(&ep("", "http://exp:9187/metrics")),
            Some("kind must be"),
        );
        check(
            monitoring_endpoints(&ep("x", "ftp://exp")),
            Some("use http:// or https://"),
        );
        check(
            monitoring_endpoints(&ep("x", "http://u:p@exp")),
            Some("must not carry credentials"),
        );
    }

    #[test]
    fn long_input_is_cut_in_messages() {
        let err = environment(&"Ä".repeat(30))
            .expect_err("uppercase")
            .to_string();
        assert!(err.len() < 200, "{err}");
    }
}
