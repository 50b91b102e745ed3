//! The inference service: serves the active version of each model in the repository through
//! ONNX Runtime with dynamic batching, after checking every model file against the SHA-256 in
//! its manifest; keeps every prediction's result; speaks KServe v2 beside its own API.

pub mod batcher;
pub mod caller;
pub mod config;
pub mod decision_support;
mod error;
pub mod explain;
mod grpc;
pub mod kserve;
pub mod lifecycle;
pub mod manifest;
pub mod model;
pub mod predict;
pub mod preprocess;
pub mod repository;
pub mod results;

use std::future::Future;
use std::sync::Arc;

use medai_proto::inference::v1::inference_service_server::InferenceServiceServer;
use medai_proto::kserve::grpc_inference_service_server::GrpcInferenceServiceServer;
use medai_runtime::PeerPolicy;
use medai_runtime::identity::ServiceIdentity;
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
    #[error("results store: {0}")]
    Store(#[from] sea_orm::DbErr),
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// The identity of internal teams' KServe v2 clients: they may run inference and read
/// metadata, never change what is served.
pub const KSERVE_CLIENT_IDENTITY: &str = "kserve-client";

/// Predictions and results are the gateway's; model lifecycle is the gateway's and the
/// operator tool's; KServe v2 is open to the gateway, the operator tool and KServe clients.
pub fn peer_policy() -> PeerPolicy {
    let ours = |method: &str| format!("/medai.inference.v1.InferenceService/{method}");
    let kserve = |method: &str| format!("/inference.GRPCInferenceService/{method}");
    let gateway_only = [
        "Predict",
        "GetResult",
        "ListResults",
        "RecordDelivery",
        "SignResult",
        "ExplainResult",
        "RecordExplanation",
    ]
    .iter()
    .fold(PeerPolicy::new(), |policy, method| {
        policy.allow(&ours(method), &["gateway"])
    });
    let management = [
        "ListModels",
        "StageModelVersion",
        "ActivateModelVersion",
        "RetireModelVersion",
        "RollbackModel",
    ]
    .iter()
    .fold(gateway_only, |policy, method| {
        policy.allow(&ours(method), &["gateway", "operator"])
    });
    [
        "ServerLive",
        "ServerReady",
        "ModelReady",
        "ServerMetadata",
        "ModelMetadata",
        "ModelInfer",
        "ModelStreamInfer",
        "ModelConfig",
        "ModelStatistics",
        "RepositoryIndex",
    ]
    .iter()
    .fold(management, |policy, method| {
        policy.allow(
            &kserve(method),
            &["gateway", "operator", KSERVE_CLIENT_IDENTITY],
        )
    })
}

/// Loads ONNX Runtime and every active model of the repository. Call inside a tokio runtime:
/// each served version starts its batch workers.
pub fn load_repository(
    model_repository: &std::path::Path,
    onnxruntime_library: &std::path::Path,
    settings: &config::RuntimeSettings,
) -> Result<Arc<repository::ModelRepository>, ServeError> {
    let environment = model::onnx_environment(onnxruntime_library)?;
    Ok(repository::ModelRepository::load(
        model_repository,
        &environment,
        settings,
    )?)
}

pub async fn serve(
    config: InferenceConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let tls = TlsMaterial::load(&config.tls)?;
    let results = results::ResultsStore::connect(&config.database_url).await?;
    let audit = tls.channel(&config.audit_endpoint, &ServiceIdentity::new("audit"))?;
    // Sessions are started inside the runtime: each served version spawns its batch workers.
    let repository = {
        let config = config.clone();
        let handle = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || {
            let _entered = handle.enter();
            load_repository(
                &config.model_repository,
                &config.onnxruntime_library,
                &config.runtime,
            )
        })
        .await
        .map_err(|error| model::ModelError::Run(error.to_string()))??
    };
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<InferenceServiceServer<grpc::InferenceApi>>()
        .await;
    let ledger = medai_ledger_client::LedgerClient::new(audit);
    let api = InferenceServiceServer::new(grpc::InferenceApi {
        predictor: Arc::new(predict::Predictor {
            repository: repository.clone(),
        }),
        explainer: Arc::new(explain::Explainer::new(repository.clone(), &config.runtime)),
        results,
        lifecycle: Arc::new(lifecycle::Lifecycle {
            repository: repository.clone(),
            ledger: ledger.clone(),
        }),
    })
    .max_decoding_message_size(MAX_REQUEST_BYTES);
    let kserve = GrpcInferenceServiceServer::new(kserve::KserveApi { repository, ledger })
        .max_decoding_message_size(MAX_REQUEST_BYTES);
    mesh_server(
        &tls,
        ClientCertificates::Required,
        "inference",
        peer_policy(),
    )?
    .add_service(health_service)
    .add_service(api)
    .add_service(kserve)
    .serve_with_incoming_shutdown(incoming(listener), shutdown)
    .await?;
    Ok(())
}
