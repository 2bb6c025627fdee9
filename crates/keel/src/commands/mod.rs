//! The client subcommands.

pub(crate) mod admin;
pub(crate) mod alerts;
pub(crate) mod events;
pub(crate) mod instance;
pub(crate) mod metrics;
pub(crate) mod optimize;
pub(crate) mod queries;
pub(crate) mod recs;
