//! `keel serve`: the services a process runs, wired to the state store, NATS and the listeners.

use std::sync::Arc;

use anyhow::Context as _;
use keel_auth::{KeyStore, Role};
use keel_bus::{Bus, Relay, RelayConfig, StreamSettings};
use keel_proto::v1::registry_service_server::SERVICE_NAME as REGISTRY_SERVICE;
use keel_registry::{Registry, RegistryConfig};
use keel_server::Server;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;

use crate::cli::{ServeArgs, Target};
use crate::commands::admin::key_ring;

pub(crate) async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let _telemetry =
        keel_telemetry::init(&args.telemetry).context("cannot set up logging and tracing")?;
    // Everything that can be checked without a network is checked before connecting.
    args.database.validate()?;
    args.nats.validate()?;
    args.listen.validate()?;
    args.limits.validate()?;
    // The state store is never a target unless explicitly allowed.
    let targets = args
        .targets
        .connector("registry", Some(&args.database.url))?;
    keel_auth::validate_tenant(&args.bootstrap_tenant)
        .context("--bootstrap-tenant / KEEL_BOOTSTRAP_TENANT")?;
    if args.service_keys_require_client_cert && args.listen.tls_client_ca_file.is_none() {
        anyhow::bail!(
            "--service-keys-require-client-cert needs mutual TLS: set --tls-client-ca-file / KEEL_TLS_CLIENT_CA_FILE"
        );
    }
    if matches!(
        args.target,
        Target::Collector | Target::Optimizer | Target::Remediation
    ) {
        anyhow::bail!(
            "target {:?} is not part of this build yet; run --target registry or --target all",
            args.target
        );
    }
    let ring = Arc::new(key_ring(&args.encryption)?);
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

    let pool = keel_store::connect(&args.database)
        .await
        .context("cannot open the state store")?;
    KeyStore::migrate(&pool)
        .await
        .context("migrating the auth schema")?;
    keel_registry::migrate(&pool)
        .await
        .context("migrating the registry schema")?;
    // Read by the AuthLayer that each service builds from `keys`.
    let keys = KeyStore::new(pool.clone(), args.auth_cache_ttl)
        .require_client_cert_for_service_keys(args.service_keys_require_client_cert);
    if let Some(key) = &bootstrap_key {
        keys.ensure_key(
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
    let bus = Bus::connect(&args.nats, &StreamSettings::default()).await?;

    let mut server = Server::new(&args.listen);
    let probe_pool = pool.clone();
    server.readiness_check("postgres", move || {
        let pool = probe_pool.clone();
        Box::pin(async move {
            sqlx::query("SELECT 1")
                .execute(&pool)
                .await
                .map(drop)
                .map_err(|e| e.to_string())
        })
    });
    let probe_bus = bus.clone();
    server.readiness_check("nats", move || {
        let connected = probe_bus.is_connected();
        Box::pin(async move {
            if connected {
                Ok(())
            } else {
                Err("not connected to NATS".to_owned())
            }
        })
    });

    let registry = Registry::new(
        pool.clone(),
        ring,
        RegistryConfig {
            check_timeout: args.check_timeout,
            targets,
        },
    );
    // One limits layer for the process: a key's budget covers all the services it calls.
    let limits = keel_limits::LimitsLayer::new(&args.limits, server.metrics())?;
    let routes = Routes::new(keel_registry::grpc_service(registry, keys.clone(), &limits));
    server.register_service(REGISTRY_SERVICE);

    let relay = Relay::new(
        pool.clone(),
        keel_registry::outbox(),
        bus.jetstream().clone(),
        RelayConfig::default(),
    );
    let relay_stop = CancellationToken::new();
    let relay_task = tokio::spawn(relay.clone().run(relay_stop.clone()));
    // Keys revoked or re-roled on any replica leave this one's auth cache at once.
    let keys_stop = CancellationToken::new();
    let keys_task = tokio::spawn({
        let (keys, stop) = (keys.clone(), keys_stop.clone());
        async move { keys.watch_changes(stop).await }
    });

    tracing::info!(
        target_services = ?args.target,
        grpc = %args.listen.grpc,
        tls = args.listen.tls_cert_file.is_some(),
        http = %args.listen.http,
        "keel serving"
    );
    let served = server.serve(routes, keel_server::shutdown_signal()).await;

    // Requests that finished during the grace period may have left events behind:
    // publish them before exiting (another replica would otherwise pick them up later).
    relay_stop.cancel();
    let _ = relay_task.await;
    keys_stop.cancel();
    let _ = keys_task.await;
    match relay.publish_pending().await {
        Ok(n) if n > 0 => tracing::info!(published = n, "published remaining events before exit"),
        Ok(_) => {}
        Err(error) => {
            tracing::warn!(%error, "remaining events stay in the outbox for the next relay")
        }
    }
    served.context("server failed")?;
    tracing::info!("keel stopped");
    Ok(())
}
