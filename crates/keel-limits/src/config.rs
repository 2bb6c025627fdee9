use std::time::Duration;

use keel_config::{ConfigError, parse_byte_size, parse_duration};

/// The limits every API key is held to, read from flags or `KEEL_LIMIT_*` variables.
///
/// Every limit applies to each key separately; the keys of one tenant do not share a budget.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct LimitsConfig {
    /// Requests per second one API key may make, sustained.
    #[arg(
        id = "limit_rate",
        long = "limit-rate",
        env = "KEEL_LIMIT_RATE",
        default_value_t = 50
    )]
    pub rate: u32,
    /// Requests one API key may make in a burst above the sustained rate (the token bucket's size).
    #[arg(
        id = "limit_burst",
        long = "limit-burst",
        env = "KEEL_LIMIT_BURST",
        default_value_t = 100
    )]
    pub burst: u32,
    /// Requests one API key may have running at once; more are refused, not queued.
    #[arg(
        id = "limit_concurrency",
        long = "limit-concurrency",
        env = "KEEL_LIMIT_CONCURRENCY",
        default_value_t = 32
    )]
    pub concurrency: u32,
    /// Largest request body of one call (e.g. 4MiB, 512KiB, 65536; MB is 10^6 bytes, MiB 2^20),
    /// gRPC framing included; for a client-streaming call, all its messages together.
    #[arg(
        id = "limit_message_bytes",
        long = "limit-message-bytes",
        env = "KEEL_LIMIT_MESSAGE_BYTES",
        default_value = "4MiB",
        value_parser = parse_byte_size::<u64>
    )]
    pub message_bytes: u64,
    /// How long a server-streaming response may run before it is ended (the client reconnects).
    #[arg(
        id = "limit_stream_duration",
        long = "limit-stream-duration",
        env = "KEEL_LIMIT_STREAM_DURATION",
        default_value = "1h",
        value_parser = parse_duration
    )]
    pub stream_duration: Duration,
}

impl Default for LimitsConfig {
    /// The same values as the flags' defaults.
    fn default() -> Self {
        Self {
            rate: 50,
            burst: 100,
            concurrency: 32,
            message_bytes: 4 * 1024 * 1024,
            stream_duration: Duration::from_secs(3600),
        }
    }
}

/// Smallest useful body limit: the 5-byte header of one gRPC message.
const MIN_MESSAGE_BYTES: u64 = 5;

impl LimitsConfig {
    /// Checks that every limit lets at least some requests through.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let at_least_one = |setting, value: u32| {
            if value == 0 {
                Err(ConfigError::Invalid {
                    setting,
                    reason: "must be at least 1".into(),
                })
            } else {
                Ok(())
            }
        };
        at_least_one("--limit-rate / KEEL_LIMIT_RATE", self.rate)?;
        at_least_one("--limit-burst / KEEL_LIMIT_BURST", self.burst)?;
        at_least_one(
            "--limit-concurrency / KEEL_LIMIT_CONCURRENCY",
            self.concurrency,
        )?;
        if self.message_bytes < MIN_MESSAGE_BYTES {
            return Err(ConfigError::Invalid {
                setting: "--limit-message-bytes / KEEL_LIMIT_MESSAGE_BYTES",
                reason: format!(
                    "must be at least {MIN_MESSAGE_BYTES} bytes (the header of one gRPC message)"
                ),
            });
        }
        if self.stream_duration.is_zero() {
            return Err(ConfigError::Invalid {
                setting: "--limit-stream-duration / KEEL_LIMIT_STREAM_DURATION",
                reason: "must be longer than zero".into(),
            });
        }
        Ok(())
    }
}

/// Writes `duration` the way [`parse_duration`] reads it, in the largest exact unit
/// (`1h`, `90s`, `300ms`), so messages quote the limit as it was configured.
pub(crate) fn format_duration(duration: Duration) -> String {
    let millis = duration.as_millis();
    if millis == 0 || !millis.is_multiple_of(1000) {
        return format!("{millis}ms");
    }
    let secs = duration.as_secs();
    if secs.is_multiple_of(3600) {
        format!("{}h", secs / 3600)
    } else if secs.is_multiple_of(60) {
        format!("{}m", secs / 60)
    } else {
        format!("{secs}s")
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        limits: LimitsConfig,
    }

    fn parse(args: &[&str]) -> Result<LimitsConfig, clap::Error> {
        Cli::try_parse_from(std::iter::once("keel").chain(args.iter().copied())).map(|c| c.limits)
    }

    #[test]
    fn flag_defaults_match_default() {
        // Unless the environment sets KEEL_LIMIT_* for this test process.
        if std::env::vars().any(|(name, _)| name.starts_with("KEEL_LIMIT_")) {
            return;
        }
        assert_eq!(parse(&[]).expect("defaults parse"), LimitsConfig::default());
        assert!(LimitsConfig::default().validate().is_ok());
    }

    #[test]
    fn flags_are_read() {
        let config = parse(&[
            "--limit-rate=5",
            "--limit-burst=7",
            "--limit-concurrency=2",
            "--limit-message-bytes=1KiB",
            "--limit-stream-duration=300ms",
        ])
        .expect("flags parse");
        assert_eq!(
            config,
            LimitsConfig {
                rate: 5,
                burst: 7,
                concurrency: 2,
                message_bytes: 1024,
                stream_duration: Duration::from_millis(300),
            }
        );
        // The workspace's one size syntax: MB is 10^6 bytes, as for every other size setting.
        let config = parse(&["--limit-message-bytes=4MB"]).expect("MB is a unit");
        assert_eq!(config.message_bytes, 4_000_000);
        let err = parse(&["--limit-message-bytes=4 parsecs"]).expect_err("not a size");
        assert!(err.to_string().contains("is not a size"), "{err}");
        let err = parse(&["--limit-stream-duration=99999999999h"]).expect_err("too long");
        assert!(err.to_string().contains("is too long"), "{err}");
    }

    fn check(change: impl FnOnce(&mut LimitsConfig), expected: Result<(), &str>) {
        let mut config = LimitsConfig::default();
        change(&mut config);
        let got = config.validate().map_err(|e| e.to_string());
        assert_eq!(got, expected.map_err(str::to_owned));
    }

    #[test]
    fn validation_explains_what_to_fix() {
        check(|_| {}, Ok(()));
        check(
            |c| c.rate = 0,
            Err("--limit-rate / KEEL_LIMIT_RATE: must be at least 1"),
        );
        check(
            |c| c.burst = 0,
            Err("--limit-burst / KEEL_LIMIT_BURST: must be at least 1"),
        );
        check(
            |c| c.concurrency = 0,
            Err("--limit-concurrency / KEEL_LIMIT_CONCURRENCY: must be at least 1"),
        );
        check(
            |c| c.message_bytes = 4,
            Err(
                "--limit-message-bytes / KEEL_LIMIT_MESSAGE_BYTES: must be at least 5 bytes (the header of one gRPC message)",
            ),
        );
        check(|c| c.message_bytes = 5, Ok(()));
        check(
            |c| c.stream_duration = Duration::ZERO,
            Err("--limit-stream-duration / KEEL_LIMIT_STREAM_DURATION: must be longer than zero"),
        );
    }

    #[test]
    fn durations_print_in_the_largest_exact_unit() {
        for (duration, text) in [
            (Duration::from_millis(300), "300ms"),
            (Duration::from_millis(1500), "1500ms"),
            (Duration::ZERO, "0ms"),
            (Duration::from_secs(90), "90s"),
            (Duration::from_secs(120), "2m"),
            (Duration::from_secs(3600), "1h"),
            (Duration::from_secs(7200), "2h"),
        ] {
            assert_eq!(format_duration(duration), text);
            assert_eq!(parse_duration(text), Ok(duration), "{text} round-trips");
        }
    }
}
