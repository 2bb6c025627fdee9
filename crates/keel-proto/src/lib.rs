//! Keel's wire contracts: the protobuf messages and gRPC services of `proto/keel/v1`.
//!
//! This is the only crate the services share for talking to each other.
#![allow(missing_docs, unreachable_pub, clippy::all)]

/// Version 1 of the Keel API (`keel.v1`).
pub mod v1 {
    tonic::include_proto!("keel.v1");
}

mod debug;

/// Encoded `FileDescriptorSet` of every Keel proto, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/keel_descriptor.bin"));
