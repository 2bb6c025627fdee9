//! The collector's settings as `keel serve` reads them, checked before anything connects.

use std::time::Duration;

use anyhow::Context as _;
use keel_collector::CollectorConfig;
use keel_collector::rules::{Override, Rules};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

use crate::cli::CollectorArgs;
use crate::failure::Failure;

/// The collector's configuration from its flags, with the alert rule overrides read and checked.
pub(crate) fn config(args: &CollectorArgs) -> anyhow::Result<CollectorConfig> {
    let invalid = |message: String| Failure::Invalid.error(message);
    if args.interval < Duration::from_secs(1) {
        return Err(invalid(
            "--collector-interval / KEEL_COLLECTOR_INTERVAL must be at least 1s".into(),
        ));
    }
    if args.timeout.is_zero() || args.timeout > args.interval {
        return Err(invalid(format!(
            "--collector-timeout / KEEL_COLLECTOR_TIMEOUT must be above 0 and at most the interval ({}s)",
            args.interval.as_secs()
        )));
    }
    if args.retention < Duration::from_secs(3600) {
        return Err(invalid(
            "--collector-retention / KEEL_COLLECTOR_RETENTION must be at least 1h".into(),
        ));
    }
    if args.concurrency == 0 || args.series_per_target == 0 {
        return Err(invalid(
            "--collector-concurrency and --collector-series-per-target must be at least 1".into(),
        ));
    }
    let rules = match &args.alert_rules_file {
        None => Rules::default(),
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| {
                    format!(
                        "cannot read --collector-alert-rules-file {}",
                        path.display()
                    )
                })
                .map_err(|e| invalid(format!("{e:#}")))?;
            let overrides: Vec<Override> = serde_json::from_str(&text).map_err(|e| {
                invalid(format!(
                    "--collector-alert-rules-file {}: {e}",
                    path.display()
                ))
            })?;
            Rules::with_overrides(overrides).map_err(|e| {
                invalid(format!(
                    "--collector-alert-rules-file {}: {e}",
                    path.display()
                ))
            })?
        }
    };
    Ok(CollectorConfig {
        interval: args.interval,
        timeout: args.timeout,
        retention: args.retention,
        max_concurrent_scrapes: args.concurrency,
        series_per_target: args.series_per_target,
        statements_exported: args.statements_exported,
        rules,
        ..CollectorConfig::default()
    })
}

/// A registry client over the network with the fleet key, for a collector that runs apart
/// from the registry. Connects lazily: the registry may start after the collector.
pub(crate) fn remote_registry(
    args: &CollectorArgs,
) -> anyhow::Result<keel_collector::RegistryClient> {
    let (Some(endpoint), Some(_)) = (&args.registry_endpoint, &args.fleet_key_file) else {
        return Err(Failure::Invalid.error(
            "--target collector without the registry in this process needs --registry-endpoint / \
             KEEL_REGISTRY_ENDPOINT and --fleet-key-file / KEEL_FLEET_KEY_FILE (a key from `keel admin create-key --fleet`)",
        ));
    };
    let (channel, key) = remote_channel(args, endpoint, "--registry-endpoint")?;
    Ok(keel_collector::RegistryClient::remote(channel, key))
}

/// A lazy channel to another Keel service at `endpoint`, with the fleet key and the registry
/// TLS settings of `args` (one CA and client identity for Keel's own endpoints).
pub(crate) fn remote_channel(
    args: &CollectorArgs,
    endpoint: &str,
    setting: &str,
) -> anyhow::Result<(tonic::transport::Channel, secrecy::SecretString)> {
    let Some(key_file) = &args.fleet_key_file else {
        return Err(Failure::Invalid.error(format!(
            "{setting} needs --fleet-key-file / KEEL_FLEET_KEY_FILE (a key from `keel admin create-key --fleet`)"
        )));
    };
    let key = keel_config::read_secret_file("--fleet-key-file / KEEL_FLEET_KEY_FILE", key_file)?;
    let mut channel = Endpoint::from_shared(endpoint.to_owned())
        .map_err(|e| Failure::Invalid.error(format!("{setting} {endpoint:?}: {e}")))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10));
    if endpoint.starts_with("https://") {
        let read = |path: &std::path::Path| {
            std::fs::read(path)
                .map_err(|e| Failure::Invalid.error(format!("cannot read {}: {e}", path.display())))
        };
        let mut tls = match &args.registry_tls_ca_file {
            Some(path) => ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(path)?)),
            None => ClientTlsConfig::new().with_webpki_roots(),
        };
        if let (Some(cert), Some(key)) = (&args.registry_tls_cert_file, &args.registry_tls_key_file)
        {
            tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        channel = channel
            .tls_config(tls)
            .map_err(|e| Failure::Invalid.error(format!("registry TLS settings: {e}")))?;
    } else if args.registry_tls_ca_file.is_some() || args.registry_tls_cert_file.is_some() {
        return Err(Failure::Invalid.error(format!(
            "registry TLS settings are set but {setting} {endpoint} is not https://"
        )));
    }
    Ok((channel.connect_lazy(), key))
}
