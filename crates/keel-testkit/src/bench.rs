//! What Keel's benchmark binaries share: reading their settings from the environment.

/// The number in the environment variable `name`, or `default` when it is unset or blank; a
/// value that does not parse is an error naming the variable.
pub fn env_number<T: std::str::FromStr>(name: &str, default: T) -> anyhow::Result<T>
where
    T::Err: std::fmt::Display,
{
    match std::env::var(name) {
        Ok(raw) if !raw.trim().is_empty() => raw
            .trim()
            .parse()
            .map_err(|e| anyhow::anyhow!("{name}={raw:?} is not a number: {e}")),
        _ => Ok(default),
    }
}
