//! Connection URLs: checked against the engine, with credentials masked for display.

use secrecy::SecretString;
use url::Url;

use crate::validate::Invalid;
use keel_proto::v1::Engine;

/// What a masked credential looks like on the way out.
pub(crate) const MASK: &str = "****";
const MAX_URL_LEN: usize = 2048;
/// Query parameters that carry credentials in libpq and redis URLs.
const CREDENTIAL_PARAMS: &[&str] = &["password", "sslpassword", "pass", "auth", "token", "secret"];

/// A checked connection URL: the clear form for connecting, the masked one for everything else.
#[derive(Debug, Clone)]
pub(crate) struct ConnectionUrl {
    /// The URL as given, credentials included.
    pub(crate) clear: SecretString,
    /// The URL with every credential replaced by `****`.
    pub(crate) masked: String,
    /// The password and credential values, so error messages can be scrubbed of them.
    pub(crate) secrets: Vec<SecretString>,
}

/// Checks `raw` for `engine` and derives its masked form.
pub(crate) fn parse(engine: Engine, raw: &str) -> Result<ConnectionUrl, Invalid> {
    const FIELD: &str = "connection_url";
    if raw.is_empty() {
        return Err(Invalid::new(
            FIELD,
            "is required, e.g. postgres://user:password@host:5432/database",
        ));
    }
    if raw.len() > MAX_URL_LEN {
        return Err(Invalid::new(
            FIELD,
            format!(
                "is {} bytes long; at most {MAX_URL_LEN} are allowed",
                raw.len()
            ),
        ));
    }
    let url = Url::parse(raw).map_err(|e| {
        Invalid::new(
            FIELD,
            format!(
                "is not a valid URL ({e}); expected e.g. {}",
                example(engine)
            ),
        )
    })?;
    let allowed: &[&str] = match engine {
        Engine::Postgres => &["postgres", "postgresql"],
        Engine::Redis => &["redis", "rediss"],
        Engine::Unspecified => &[],
    };
    if !allowed.contains(&url.scheme()) {
        return Err(Invalid::new(
            FIELD,
            format!(
                "scheme {:?} is not supported for engine {}; use {}",
                url.scheme(),
                engine_name(engine),
                allowed
                    .iter()
                    .map(|s| format!("{s}://"))
                    .collect::<Vec<_>>()
                    .join(" or ")
            ),
        ));
    }
    let has_host_param = url.query_pairs().any(|(k, _)| k == "host");
    if url.host_str().is_none_or(str::is_empty) && !has_host_param {
        return Err(Invalid::new(
            FIELD,
            format!("has no host; expected e.g. {}", example(engine)),
        ));
    }

    let mut secrets = Vec::new();
    let mut masked = url.clone();
    if let Some(password) = url.password() {
        if is_masked(password) {
            return Err(masked_input());
        }
        secrets.push(SecretString::from(password.to_owned()));
        if let Some(decoded) = percent_decode(password).filter(|d| d != password) {
            secrets.push(SecretString::from(decoded));
        }
        // Setting a password only fails for URLs that cannot have one, which `url` already ruled out.
        let _ = masked.set_password(Some(MASK));
    }
    if url.query().is_some() {
        let mut pairs = Vec::new();
        for (key, value) in url.query_pairs() {
            if CREDENTIAL_PARAMS.contains(&key.to_ascii_lowercase().as_str()) {
                if is_masked(&value) {
                    return Err(masked_input());
                }
                secrets.push(SecretString::from(value.to_string()));
                pairs.push((key.to_string(), MASK.to_owned()));
            } else {
                pairs.push((key.to_string(), value.to_string()));
            }
        }
        masked.query_pairs_mut().clear().extend_pairs(pairs);
    }
    Ok(ConnectionUrl {
        clear: SecretString::from(raw.to_owned()),
        masked: masked.to_string(),
        secrets,
    })
}

fn masked_input() -> Invalid {
    Invalid::new(
        "connection_url",
        "contains a masked credential (****), which is how Keel shows a stored password: send the real password",
    )
}

/// `invalid` as an update should say it: a masked credential there is most likely the URL
/// Keel showed, sent back, and leaving the field out keeps the stored one.
pub(crate) fn for_update(invalid: Invalid) -> Invalid {
    if invalid == masked_input() {
        return Invalid::new(
            invalid.field,
            format!(
                "{}, or leave connection_url out of update_mask to keep the stored one",
                invalid.reason
            ),
        );
    }
    invalid
}

fn is_masked(value: &str) -> bool {
    value.contains(MASK) || percent_decode(value).is_some_and(|d| d.contains(MASK))
}

fn percent_decode(value: &str) -> Option<String> {
    percent_encoding::percent_decode_str(value)
        .decode_utf8()
        .ok()
        .map(|d| d.into_owned())
}

/// Removes every secret of `url` from `message`, for errors that quote the server or driver.
pub(crate) fn scrub(message: &str, secrets: &[SecretString]) -> String {
    use secrecy::ExposeSecret;
    let mut scrubbed = message.to_owned();
    for secret in secrets {
        let secret = secret.expose_secret();
        if !secret.is_empty() {
            scrubbed = scrubbed.replace(secret, MASK);
        }
    }
    scrubbed
}

fn example(engine: Engine) -> &'static str {
    match engine {
        Engine::Redis => "redis://:password@host:6379/0",
        _ => "postgres://user:password@host:5432/database",
    }
}

/// The engine's name as operators write it.
pub(crate) fn engine_name(engine: Engine) -> &'static str {
    match engine {
        Engine::Postgres => "postgres",
        Engine::Redis => "redis",
        Engine::Unspecified => "unspecified",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    fn check(engine: Engine, raw: &str, expected: Result<&str, &str>) {
        match (parse(engine, raw), expected) {
            (Ok(url), Ok(masked)) => {
                assert_eq!(url.masked, masked, "{raw}");
                assert_eq!(url.clear.expose_secret(), raw);
            }
            (Err(err), Err(needle)) => assert!(err.to_string().contains(needle), "{raw}: {err}"),
            (got, want) => panic!("{raw}: got {got:?}, want {want:?}"),
        }
    }

    #[test]
    fn urls_are_checked_and_masked() {
        use Engine::{Postgres, Redis};
        check(
            Postgres,
            "postgres://app:s3cret@db:5432/shop",
            Ok("postgres://app:****@db:5432/shop"),
        );
        check(
            Postgres,
            "postgresql://app@db/shop",
            Ok("postgresql://app@db/shop"),
        );
        check(
            Postgres,
            "postgres://app@db/shop?sslmode=require&password=hunter2",
            Ok("postgres://app@db/shop?sslmode=require&password=****"),
        );
        check(
            Postgres,
            "postgres:///shop?host=/var/run/postgresql",
            Ok("postgres:///shop?host=%2Fvar%2Frun%2Fpostgresql"),
        );
        check(
            Redis,
            "redis://:pw@cache:6379/0",
            Ok("redis://:****@cache:6379/0"),
        );
        check(Redis, "rediss://cache:6380", Ok("rediss://cache:6380"));
        check(
            Postgres,
            "mysql://app:pw@db/shop",
            Err(
                "scheme \"mysql\" is not supported for engine postgres; use postgres:// or postgresql://",
            ),
        );
        check(
            Redis,
            "postgres://db/shop",
            Err("use redis:// or rediss://"),
        );
        check(Postgres, "not a url", Err("is not a valid URL"));
        check(Postgres, "", Err("is required"));
        check(
            Postgres,
            "postgres://app:****@db/shop",
            Err("masked credential"),
        );
        check(
            Postgres,
            "postgres://app:%2A%2A%2A%2A@db/shop",
            Err("masked credential"),
        );
        check(
            Postgres,
            "postgres://db/shop?password=****",
            Err("masked credential"),
        );
        check(
            Postgres,
            &format!("postgres://db/{}", "x".repeat(3000)),
            Err("at most 2048"),
        );
    }

    #[test]
    fn secrets_are_collected_for_scrubbing() {
        let url = parse(
            Engine::Postgres,
            "postgres://app:p%40ss@db/shop?sslpassword=k3y",
        )
        .expect("valid");
        let message = "password authentication failed: p%40ss p@ss k3y";
        assert_eq!(
            scrub(message, &url.secrets),
            "password authentication failed: **** **** ****"
        );
    }
}
