//! Compiles `proto/` with protox (pure Rust: no system `protoc`) and feeds the
//! descriptors to tonic's code generator. The encoded descriptor set is kept for
//! gRPC server reflection.

use std::path::PathBuf;

/// Messages whose `Debug` is written by hand in `src/debug.rs`, because they carry a
/// connection URL that may hold a password.
const REDACTED_DEBUG: &[&str] = &[
    ".keel.v1.Instance",
    ".keel.v1.MonitoringEndpoint",
    ".keel.v1.GetInstanceConnectionResponse",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Read at run time, not with `env!`: a compiled build script is reused by every clone that
    // shares a target directory, and must compile the protos of the clone that runs it.
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let proto_root = manifest_dir.join("../../proto");
    let files = [
        "keel/v1/common.proto",
        "keel/v1/registry.proto",
        "keel/v1/collector.proto",
        "keel/v1/optimizer.proto",
        "keel/v1/events.proto",
    ];
    let file_paths: Vec<PathBuf> = files.iter().map(|f| proto_root.join(f)).collect();

    // Relative paths, which cargo resolves against the package root of the clone being built:
    // an absolute path would keep pointing at the clone that ran the script last. Cargo scans
    // a directory recursively, so this covers every file under proto/.
    println!("cargo:rerun-if-changed=../../proto");
    println!("cargo:rerun-if-changed=build.rs");

    let descriptors = protox::compile(&file_paths, [&proto_root])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("keel_descriptor.bin"),
        prost::Message::encode_to_vec(&descriptors),
    )?;

    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .skip_debug(REDACTED_DEBUG)
        .compile_fds(descriptors)?;
    Ok(())
}
