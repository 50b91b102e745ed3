//! The inference service: serves the active version of each model in the repository through
//! ONNX Runtime, after checking every model file against the SHA-256 in its manifest.

pub mod config;
mod error;
mod grpc;
pub mod manifest;
pub mod model;
pub mod predict;
pub mod preprocess;
pub mod repository;

use std::future::Future;
use std::sync::Arc;

use medai_proto::inference::v1::inference_service_server::InferenceServiceServer;
use medai_runtime::PeerPolicy;
use medai_runtime::server::{incoming, mesh_server};
use medai_runtime::tls::{ClientCertificates, TlsMaterial};
use tokio::net::TcpListener;

pub use config::InferenceConfig;
pub use error::InferenceError;

/// Canonical images up to 4096×4096 RGB at 16 bits, plus framing.
const MAX_REQUEST_BYTES: usize = 4096 * 4096 * 3 * 2 + 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Tls(#[from] medai_runtime::tls::TlsError),
    #[error(transparent)]
    Model(#[from] model::ModelError),
    #[error(transparent)]
    Repository(#[from] repository::RepositoryError),
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Only the gateway may run models.
pub fn peer_policy() -> PeerPolicy {
    PeerPolicy::new().allow("/medai.inference.v1.InferenceService/Predict", &["gateway"])
}

/// Loads ONNX Runtime and every active model of the repository.
pub fn load_predictor(config: &InferenceConfig) -> Result<predict::Predictor, ServeError> {
    let environment = model::onnx_environment(&config.onnxruntime_library)?;
    let repository =
        repository::ModelRepository::load(&config.model_repository, &environment, &config.runtime)?;
    Ok(predict::Predictor { repository })
}

pub async fn serve(
    config: InferenceConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let tls = TlsMaterial::load(&config.tls)?;
    let blocking_config = config.clone();
    let predictor = tokio::task::spawn_blocking(move || load_predictor(&blocking_config))
        .await
        .map_err(|error| model::ModelError::Run(error.to_string()))??;
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<InferenceServiceServer<grpc::InferenceApi>>()
        .await;
    let api = InferenceServiceServer::new(grpc::InferenceApi {
        predictor: Arc::new(predictor),
    })
    .max_decoding_message_size(MAX_REQUEST_BYTES);
    mesh_server(
        &tls,
        ClientCertificates::Required,
        "inference",
        peer_policy(),
    )?
    .add_service(health_service)
    .add_service(api)
    .serve_with_incoming_shutdown(incoming(listener), shutdown)
    .await?;
    Ok(())
}
