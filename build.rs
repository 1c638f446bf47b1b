//! Generates the gRPC code and the descriptor set (for server reflection) from proto/.
//! Needs `protoc` on PATH (Debian: protobuf-compiler) or in $PROTOC.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let protos = [
        "proto/allot/v1/common.proto",
        "proto/allot/v1/inventory.proto",
        "proto/allot/v1/routing.proto",
        "proto/allot/v1/orders.proto",
        "proto/allot/v1/fulfilment.proto",
        "proto/allot/v1/admin.proto",
    ];
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("allot_descriptor.bin"))
        .compile_protos(&protos, &["proto"])?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
