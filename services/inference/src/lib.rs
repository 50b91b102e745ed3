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
pub mod lifecycle_store;
pub mod manifest;
pub mod metric_catalog;
pub mod model;
pub mod predict;
pub mod preprocess;
pub mod repository;
pub mod results;
pub mod rollout;
pub mod shadow;

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
        "PredictThenStore",
        "GetResult",
        "ListResults",
        "RecordDelivery",
        "RecordDeliveries",
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
        "StartCanary",
        "PromoteCanary",
        "AbortCanary",
        "StartShadow",
        "StopShadow",
        "GetModelReport",
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

/// Loads ONNX Runtime and every model version the repository's manifests name active, with no
/// lifecycle store (in-process use). Call inside a tokio runtime: each served version starts
/// its batch workers.
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

/// Where [`serve_reporting`] puts the repository it serves, so the process's readiness check
/// can ask whether any model version is served (it is not ready before the repository is).
#[derive(Clone, Default)]
pub struct ServedModels(Arc<std::sync::OnceLock<Arc<repository::ModelRepository>>>);

impl ServedModels {
    /// Whether some version of some model is being served now.
    pub fn any(&self) -> bool {
        self.0
            .get()
            .is_some_and(|repository| repository.serves_any())
    }
}

pub async fn serve(
    config: InferenceConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    serve_reporting(config, listener, shutdown, ServedModels::default()).await
}

/// [`serve`], telling `served` what this process serves.
pub async fn serve_reporting(
    config: InferenceConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
    served: ServedModels,
) -> Result<(), ServeError> {
    metric_catalog::describe();
    let connections = config.process.connections.clone();
    rollout::describe();
    let tls = TlsMaterial::load(&config.tls)?;
    let results =
        results::ResultsStore::connect_with(&config.database_url, config.process.run_migrations)
            .await?;
    let lifecycle_store = lifecycle_store::LifecycleStore::new(results.connection());
    let audit = tls.mesh_channel(&config.audit_endpoint, &ServiceIdentity::new("audit"))?;
    let repository = {
        let config = config.clone();
        tokio::task::spawn_blocking(move || {
            let environment = model::onnx_environment(&config.onnxruntime_library)?;
            Ok::<_, ServeError>(repository::ModelRepository::open(
                &config.model_repository,
                &environment,
                &config.runtime,
            )?)
        })
        .await
        .map_err(|error| model::ModelError::Run(error.to_string()))??
    };
    // What is served is what the lifecycle store says, and follows it while this runs.
    lifecycle::adopt_store_state(&repository, &lifecycle_store).await?;
    let follower = tokio::spawn(lifecycle::follow_store(
        repository.clone(),
        lifecycle_store.clone(),
        std::time::Duration::from_millis(config.lifecycle.poll_interval_milliseconds.max(1)),
    ));
    let _stop_following = AbortOnDrop(follower);
    let _ = served.0.set(repository.clone());
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<InferenceServiceServer<grpc::InferenceApi>>()
        .await;
    let ledger = medai_ledger_client::LedgerClient::new(audit);
    let figures = Arc::new(rollout::RolloutFigures::default());
    let predictor = Arc::new(predict::Predictor {
        repository: repository.clone(),
        figures: figures.clone(),
    });
    let (shadow, shadow_worker) = shadow::start(
        config.runtime.shadow_queue_capacity,
        shadow::ShadowRunner {
            predictor: predictor.clone(),
            results: results.clone(),
            ledger: ledger.clone(),
            figures,
        },
    );
    let _stop_shadow = AbortOnDrop(shadow_worker);
    let api = InferenceServiceServer::new(grpc::InferenceApi {
        predictor,
        explainer: Arc::new(explain::Explainer::new(repository.clone(), &config.runtime)),
        shadow,
        results,
        lifecycle: Arc::new(lifecycle::Lifecycle {
            repository: repository.clone(),
            ledger: ledger.clone(),
            store: lifecycle_store,
        }),
    })
    .max_decoding_message_size(MAX_REQUEST_BYTES);
    let kserve = GrpcInferenceServiceServer::new(kserve::KserveApi { repository, ledger })
        .max_decoding_message_size(MAX_REQUEST_BYTES);
    mesh_server(&tls, peer_policy(), &connections)?
        .add_service(health_service)
        .add_service(api)
        .add_service(kserve)
        .serve_with_incoming_shutdown(
            incoming(listener, &tls, ClientCertificates::Required, &connections),
            shutdown,
        )
        .await?;
    Ok(())
}

/// Stops a background task when the server it belongs to returns.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
