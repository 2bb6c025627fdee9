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
