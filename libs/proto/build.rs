//! Compiles every proto under `proto/` once, with the pure-Rust protox compiler so no system
//! `protoc` is needed.
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let files = [
        "medai/common/v1/image.proto",
        "medai/auth/v1/auth.proto",
        "medai/validation/v1/validation.proto",
        "medai/inference/v1/inference.proto",
        "medai/audit/v1/audit.proto",
        "medai/gateway/v1/gateway.proto",
        "kserve/grpc_service.proto",
    ];
    println!("cargo:rerun-if-changed={}", proto_root.display());
    for file in &files {
        println!("cargo:rerun-if-changed={}", proto_root.join(file).display());
    }
    let file_descriptors = protox::compile(files, [&proto_root])?;
    // The same descriptors, for server reflection.
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("medai_descriptor.bin"),
        prost::Message::encode_to_vec(&file_descriptors),
    )?;
    // Image bytes are shared, not copied: a decoded request's image is a view of the received
    // buffer, and a gateway that may have to send an image twice clones a handle (issue 14).
    tonic_prost_build::configure()
        .codec_path("crate::codec::ReservingProstCodec")
        .bytes(".medai.gateway.v1.InferRequest.image")
        .bytes(".medai.gateway.v1.StudyStreamRequest.image")
        .bytes(".medai.validation.v1.ValidateImageRequest.image")
        .bytes(".medai.common.v1.CanonicalImage.pixels")
        .build_server(true)
        .build_client(true)
        .compile_fds(file_descriptors)?;
    Ok(())
}
