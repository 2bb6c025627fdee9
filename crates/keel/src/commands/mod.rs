//! The client subcommands.

pub(crate) mod admin;
pub(crate) mod events;
pub(crate) mod instance;
