//! The optimizer's settings as `keel serve` reads them, checked before anything connects.

use keel_optimizer::OptimizerConfig;

use crate::cli::OptimizerArgs;
use crate::failure::Failure;

/// The optimizer's configuration from its flags.
pub(crate) fn config(args: &OptimizerArgs) -> anyhow::Result<OptimizerConfig> {
    if args.lease.as_secs() < 2 {
        return Err(
            Failure::Invalid.error("--optimizer-lease / KEEL_OPTIMIZER_LEASE must be at least 2s")
        );
    }
    if args.build_timeout.as_secs() < 1 || args.lock_timeout.is_zero() {
        return Err(Failure::Invalid
            .error("--optimizer-build-timeout and --optimizer-lock-timeout must be above 0"));
    }
    if !(args.write_cost.is_finite() && args.write_cost >= 0.0) {
        return Err(Failure::Invalid.error("--optimizer-write-cost must be 0 or more"));
    }
    Ok(OptimizerConfig {
        lease: args.lease,
        build_timeout: args.build_timeout,
        lock_timeout: args.lock_timeout,
        write_cost_per_row: args.write_cost,
        ..OptimizerConfig::default()
    })
}
