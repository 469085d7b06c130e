use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let protos =
        ["proto/imagebackup/v1/types.proto", "proto/imagebackup/v1/agent.proto", "proto/imagebackup/v1/jobs.proto"];
    // The descriptor set is what the coordinator serves through gRPC
    // reflection, so grpcurl needs no .proto file.
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("imagebackup_descriptor.bin"))
        // An assignment carries source credentials: its Debug, in
        // src/lib.rs, leaves them out of any log.
        .skip_debug(["imagebackup.v1.Assignment"])
        .compile_protos(&protos, &["proto"])?;
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    Ok(())
}
