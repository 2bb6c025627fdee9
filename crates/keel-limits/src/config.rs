use std::time::Duration;

use keel_config::{ConfigError, parse_byte_size, parse_duration};

/// The limits every tenant's API key is held to, read from flags or `KEEL_LIMIT_*` variables.
///
/// Every limit applies to each key separately; the keys of one tenant do not share a budget.
/// Fleet callers (Keel's own services) are held to [`FleetLimitsConfig`] instead.
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

/// The limits each fleet caller (a fleet API key, or an in-process channel) is held to,
/// read from flags or `KEEL_FLEET_LIMIT_*` variables.
///
/// Separate from the tenants' [`LimitsConfig`] so that user limits never throttle Keel's own
/// services, and larger by default: one collector calls on behalf of every tenant. Fleet
/// callers have budgets of their own, so their traffic never uses up a tenant's.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct FleetLimitsConfig {
    /// Requests per second one fleet caller may make, sustained.
    #[arg(
        id = "fleet_limit_rate",
        long = "fleet-limit-rate",
        env = "KEEL_FLEET_LIMIT_RATE",
        default_value_t = 1000
    )]
    pub rate: u32,
    /// Requests one fleet caller may make in a burst above the sustained rate.
    #[arg(
        id = "fleet_limit_burst",
        long = "fleet-limit-burst",
        env = "KEEL_FLEET_LIMIT_BURST",
        default_value_t = 2000
    )]
    pub burst: u32,
    /// Requests one fleet caller may have running at once; more are refused, not queued.
    #[arg(
        id = "fleet_limit_concurrency",
        long = "fleet-limit-concurrency",
        env = "KEEL_FLEET_LIMIT_CONCURRENCY",
        default_value_t = 256
    )]
    pub concurrency: u32,
    /// Largest request body of one fleet call (e.g. 16MiB), gRPC framing included.
    #[arg(
        id = "fleet_limit_message_bytes",
        long = "fleet-limit-message-bytes",
        env = "KEEL_FLEET_LIMIT_MESSAGE_BYTES",
        default_value = "16MiB",
        value_parser = parse_byte_size::<u64>
    )]
    pub message_bytes: u64,
    /// How long a server-streaming response to a fleet caller may run before it is ended.
    #[arg(
        id = "fleet_limit_stream_duration",
        long = "fleet-limit-stream-duration",
        env = "KEEL_FLEET_LIMIT_STREAM_DURATION",
        default_value = "24h",
        value_parser = parse_duration
    )]
    pub stream_duration: Duration,
}

impl Default for FleetLimitsConfig {
    /// The same values as the flags' defaults.
    fn default() -> Self {
        Self {
            rate: 1000,
            burst: 2000,
            concurrency: 256,
            message_bytes: 16 * 1024 * 1024,
            stream_duration: Duration::from_secs(24 * 3600),
        }
    }
}

impl FleetLimitsConfig {
    /// Checks that every limit lets at least some requests through.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.limits().validate_as(&FLEET_SETTINGS)
    }

    /// The same limits, as the layer applies them.
    pub(crate) fn limits(&self) -> LimitsConfig {
        LimitsConfig {
            rate: self.rate,
            burst: self.burst,
            concurrency: self.concurrency,
            message_bytes: self.message_bytes,
            stream_duration: self.stream_duration,
        }
    }
}

/// The flag and variable of each limit, for messages.
#[derive(Debug)]
pub(crate) struct Settings {
    pub(crate) rate: &'static str,
    pub(crate) burst: &'static str,
    pub(crate) concurrency: &'static str,
    pub(crate) message_bytes: &'static str,
    pub(crate) stream_duration: &'static str,
}

pub(crate) const USER_SETTINGS: Settings = Settings {
    rate: "--limit-rate / KEEL_LIMIT_RATE",
    burst: "--limit-burst / KEEL_LIMIT_BURST",
    concurrency: "--limit-concurrency / KEEL_LIMIT_CONCURRENCY",
    message_bytes: "--limit-message-bytes / KEEL_LIMIT_MESSAGE_BYTES",
    stream_duration: "--limit-stream-duration / KEEL_LIMIT_STREAM_DURATION",
};

pub(crate) const FLEET_SETTINGS: Settings = Settings {
    rate: "--fleet-limit-rate / KEEL_FLEET_LIMIT_RATE",
    burst: "--fleet-limit-burst / KEEL_FLEET_LIMIT_BURST",
    concurrency: "--fleet-limit-concurrency / KEEL_FLEET_LIMIT_CONCURRENCY",
    message_bytes: "--fleet-limit-message-bytes / KEEL_FLEET_LIMIT_MESSAGE_BYTES",
    stream_duration: "--fleet-limit-stream-duration / KEEL_FLEET_LIMIT_STREAM_DURATION",
};

/// Smallest useful body limit: the 5-byte header of one gRPC message.
const MIN_MESSAGE_BYTES: u64 = 5;

impl LimitsConfig {
    /// Checks that every limit lets at least some requests through.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_as(&USER_SETTINGS)
    }

    /// [`LimitsConfig::validate`], naming the settings in `names`.
    pub(crate) fn validate_as(&self, names: &Settings) -> Result<(), ConfigError> {
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
        at_least_one(names.rate, self.rate)?;
        at_least_one(names.burst, self.burst)?;
        at_least_one(names.concurrency, self.concurrency)?;
        if self.message_bytes < MIN_MESSAGE_BYTES {
            return Err(ConfigError::Invalid {
                setting: names.message_bytes,
                reason: format!(
                    "must be at least {MIN_MESSAGE_BYTES} bytes (the header of one gRPC message)"
                ),
            });
        }
        if self.stream_duration.is_zero() {
            return Err(ConfigError::Invalid {
                setting: names.stream_duration,
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
        #[command(flatten)]
        fleet: FleetLimitsConfig,
    }

    fn parse_both(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("keel").chain(args.iter().copied()))
    }

    fn parse(args: &[&str]) -> Result<LimitsConfig, clap::Error> {
        parse_both(args).map(|c| c.limits)
    }

    #[test]
    fn fleet_limits_have_their_own_flags_and_larger_defaults() {
        if std::env::vars().any(|(name, _)| name.starts_with("KEEL_FLEET_LIMIT_")) {
            return;
        }
        let cli = parse_both(&["--fleet-limit-rate=7", "--limit-rate=3"]).expect("flags parse");
        assert_eq!((cli.limits.rate, cli.fleet.rate), (3, 7));
        let defaults = parse_both(&[]).expect("defaults parse").fleet;
        assert_eq!(defaults, FleetLimitsConfig::default());
        let user = LimitsConfig::default();
        assert!(defaults.rate > user.rate && defaults.burst > user.burst);
        assert!(defaults.concurrency > user.concurrency);
        assert!(defaults.validate().is_ok());
        let zero = FleetLimitsConfig {
            concurrency: 0,
            ..FleetLimitsConfig::default()
        };
        assert_eq!(
            zero.validate().map_err(|e| e.to_string()),
            Err(
                "--fleet-limit-concurrency / KEEL_FLEET_LIMIT_CONCURRENCY: must be at least 1"
                    .into()
            )
        );
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
