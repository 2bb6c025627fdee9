//! Compiles `proto/` with protox (pure Rust: no system `protoc`) and feeds the
//! descriptors to tonic's code generator. The encoded descriptor set is kept for
//! gRPC server reflection.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let files = [
        "keel/v1/common.proto",
        "keel/v1/registry.proto",
        "keel/v1/events.proto",
    ];
    let file_paths: Vec<PathBuf> = files.iter().map(|f| proto_root.join(f)).collect();

    let descriptors = protox::compile(&file_paths, [&proto_root])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("keel_descriptor.bin"),
        prost::Message::encode_to_vec(&descriptors),
    )?;

    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;

    println!("cargo:rerun-if-changed={}", proto_root.display());
    Ok(())
}
