//! The validation service: decides whether an image is fit for a model and turns it into the
//! canonical pixel buffer. It keeps nothing.

pub mod config;
mod decode_slots;
mod error;
pub mod frame_policy;
mod grpc;
pub mod metric_catalog;
pub mod quality;

use std::future::Future;

use medai_proto::validation::v1::validation_service_server::ValidationServiceServer;
use medai_runtime::PeerPolicy;
use medai_runtime::server::{incoming, mesh_server};
use medai_runtime::tls::{ClientCertificates, TlsMaterial};
use tokio::net::TcpListener;

pub use config::ValidationConfig;
// The decoders live in medai-imaging; re-exported so callers keep one name for what validation runs.
pub use error::ValidationError;
pub use medai_imaging::{FramePolicy, ImageError, ImageLimits, decode, display};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Tls(#[from] medai_runtime::tls::TlsError),
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Only the gateway may hand images to validation.
pub fn peer_policy() -> PeerPolicy {
    PeerPolicy::new().allow(
        "/medai.validation.v1.ValidationService/ValidateImage",
        &["gateway"],
    )
}

pub async fn serve(
    config: ValidationConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    metric_catalog::describe();
    let connections = config.process.connections.clone();
    config.limits.validate().map_err(ServeError::Config)?;
    if config.decode_memory_budget_bytes < 1024 * 1024 {
        return Err(ServeError::Config(
            "decode_memory_budget_bytes must be at least 1 MiB".to_owned(),
        ));
    }
    let tls = TlsMaterial::load(&config.tls)?;
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<ValidationServiceServer<grpc::ValidationApi>>()
        .await;
    // The transport admits a little more than the image limit so that an oversized image gets
    // the stable IMAGE_TOO_LARGE code rather than a transport error.
    let api = ValidationServiceServer::new(grpc::ValidationApi {
        decode_slots: decode_slots::DecodeSlots::new(
            config.max_concurrent_decodes,
            config.decode_memory_budget_bytes,
        ),
        limits: config.limits,
        quality: std::sync::Arc::new(config.quality.clone()),
        frames: config.frames.clone(),
        patient_key_secret: config
            .patient_key_secret
            .as_ref()
            .map(|secret| std::sync::Arc::new(secret.expose().as_bytes().to_vec())),
    })
    .max_decoding_message_size(config.limits.max_bytes + 64 * 1024)
    .max_encoding_message_size(config.limits.max_canonical_bytes() + 64 * 1024);
    mesh_server(&tls, peer_policy(), &connections)?
        .add_service(health_service)
        .add_service(api)
        .serve_with_incoming_shutdown(
            incoming(listener, &tls, ClientCertificates::Required, &connections),
            shutdown,
        )
        .await?;
    Ok(())
}
