//! `keel serve`: the services a process runs, hosted by one [`keel_service::Host`].

use anyhow::Context as _;
use keel_auth::Role;
use keel_registry::RegistryConfig;
use keel_service::{Host, HostConfig};

use crate::cli::{ServeArgs, Target};
use crate::commands::admin::key_ring;

pub(crate) async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let _telemetry =
        keel_telemetry::init(&args.telemetry).context("cannot set up logging and tracing")?;
    // Everything that can be checked without a network is checked before connecting.
    args.limits.validate()?;
    args.fleet_limits.validate()?;
    // The state store is never a target unless explicitly allowed.
    let targets = args
        .targets
        .connector("registry", Some(&args.database.url))?;
    let collector_targets = args
        .targets
        .connector("collector", Some(&args.database.url))?;
    let optimizer_targets = args
        .targets
        .connector("optimizer", Some(&args.database.url))?;
    let services = args.target.services();
    let collector_config = crate::collector::config(&args.collector)?;
    keel_auth::validate_tenant(&args.bootstrap_tenant)
        .context("--bootstrap-tenant / KEEL_BOOTSTRAP_TENANT")?;
    if args.service_keys_require_client_cert && args.listen.tls_client_ca_file.is_none() {
        return Err(crate::failure::Failure::Invalid.error(
            "--service-keys-require-client-cert needs mutual TLS: set --tls-client-ca-file / KEEL_TLS_CLIENT_CA_FILE",
        ));
    }
    let ring = keel_registry::crypto::Keys::from(key_ring(&args.encryption)?);
    let bootstrap_key = args
        .bootstrap_admin_key_file
        .as_deref()
        .map(|path| {
            keel_config::read_secret_file(
                "--bootstrap-admin-key-file / KEEL_BOOTSTRAP_ADMIN_KEY_FILE",
                path,
            )
        })
        .transpose()?;

    let config = HostConfig {
        limits: args.limits.clone(),
        fleet_limits: args.fleet_limits.clone(),
        auth_cache_ttl: args.auth_cache_ttl,
        service_keys_require_client_cert: args.service_keys_require_client_cert,
        ..HostConfig::new(
            args.database.clone(),
            args.nats.clone(),
            args.listen.clone(),
        )
    };
    let mut host = Host::connect(&config).await?;
    if let Some(key) = &bootstrap_key {
        host.keys()
            .ensure_key(
                key,
                &args.bootstrap_tenant,
                Role::Admin,
                "bootstrap-admin",
                &keel_auth::Actor::system("keel-serve"),
            )
            .await
            .context("registering the bootstrap admin key")?;
        tracing::info!(tenant = %args.bootstrap_tenant, "bootstrap admin key registered");
    }

    // One line per service: what `--target` names, built from its settings.
    for target in services {
        match target {
            Target::Registry => {
                host.add(
                    keel_registry::Service::new(
                        ring.clone(),
                        RegistryConfig {
                            check_timeout: args.check_timeout,
                            targets: targets.clone(),
                            ..RegistryConfig::default()
                        },
                    )
                    // `keel admin rotate-key` needs every server to hold the new key.
                    .watch_keys_file(args.encryption.encryption_keys_file.clone()),
                )
                .await?;
            }
            Target::Collector => {
                let registry = if services.contains(&Target::Registry) {
                    // Added just before: called in-process, as Keel's internal fleet identity.
                    keel_collector::RegistryClient::new(host.in_process())
                } else {
                    crate::collector::remote_registry(&args.collector)?
                };
                host.add(keel_collector::Service::new(
                    registry,
                    collector_targets.clone(),
                    collector_config.clone(),
                ))
                .await?;
            }
            Target::Optimizer => {
                let in_process = |target| services.contains(&target);
                let registry = if in_process(Target::Registry) {
                    keel_fleet::FleetChannel::new(host.in_process())
                } else {
                    let endpoint =
                        args.collector.registry_endpoint.as_deref().ok_or_else(|| {
                            crate::failure::Failure::Invalid.error(
                                "--target optimizer without the registry in this process needs \
                             --registry-endpoint / KEEL_REGISTRY_ENDPOINT and --fleet-key-file",
                            )
                        })?;
                    let (channel, key) = crate::collector::remote_channel(
                        &args.collector,
                        endpoint,
                        "--registry-endpoint",
                    )?;
                    keel_fleet::FleetChannel::remote(channel, key)
                };
                let collector = if in_process(Target::Collector) {
                    Some(keel_fleet::FleetChannel::new(host.in_process()))
                } else if let Some(endpoint) = &args.optimizer.collector_endpoint {
                    let (channel, key) = crate::collector::remote_channel(
                        &args.collector,
                        endpoint,
                        "--collector-endpoint",
                    )?;
                    Some(keel_fleet::FleetChannel::remote(channel, key))
                } else {
                    None
                };
                host.add(keel_optimizer::Service::new(
                    registry,
                    collector,
                    optimizer_targets.clone(),
                    crate::optimizer::config(&args.optimizer)?,
                ))
                .await?;
            }
            Target::All => unreachable!("`all` expands to the services"),
        }
    }

    // `Server::serve` logs "serving" with the bound addresses once the listeners are up.
    host.serve(keel_server::shutdown_signal())
        .await
        .context("server failed")?;
    tracing::info!("keel stopped");
    Ok(())
}
