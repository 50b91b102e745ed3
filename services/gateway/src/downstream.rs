//! The gateway's clients of the four internal services, each over mTLS and each insisting the
//! server it reaches is the service it meant.

use std::sync::Arc;
use std::time::Duration;

use medai_ledger_client::LedgerClient;
use medai_proto::audit::v1::audit_service_client::AuditServiceClient;
use medai_proto::audit::v1::{AppendRequest, AppendResponse};
use medai_proto::auth::v1::auth_service_client::AuthServiceClient;
use medai_proto::inference::v1::inference_service_client::InferenceServiceClient;
use medai_proto::kserve::grpc_inference_service_client::GrpcInferenceServiceClient;
use medai_proto::validation::v1::validation_service_client::ValidationServiceClient;
use medai_runtime::ServiceIdentity;
use medai_runtime::rpc_trace::MeshChannel;
use medai_runtime::tls::{TlsError, TlsMaterial};

use crate::config::GatewayConfig;
use crate::delivery_notes::NotesInFlight;

/// Canonical images up to 4096×4096 RGB at 16 bits, plus framing.
pub const MAX_CANONICAL_MESSAGE: usize = 4096 * 4096 * 3 * 2 + 64 * 1024;

#[derive(Clone)]
pub struct Downstream {
    pub auth: AuthServiceClient<MeshChannel>,
    pub validation: ValidationServiceClient<MeshChannel>,
    pub inference: InferenceServiceClient<MeshChannel>,
    /// The inference service's KServe v2 door on the same channel: model metadata.
    pub kserve: GrpcInferenceServiceClient<MeshChannel>,
    /// Each model's input size, learnt from inference and named to validation.
    pub model_inputs: Arc<crate::model_inputs::ModelInputSizes>,
    /// The ledger's reads, verification and checkpoints.
    pub audit: AuditServiceClient<MeshChannel>,
    /// Every record this gateway makes: concurrent records share `AppendBatch` calls.
    pub ledger: LedgerClient,
    pub timeout: Duration,
    /// Delivery notes this gateway is writing after their answers left.
    pub notes: Arc<NotesInFlight>,
    /// Whether inference serves PredictThenStore, as this gateway last found (see
    /// [`crate::infer::PREDICT_THEN_STORE_RECHECK`]).
    pub predict_then_store: Arc<crate::infer::PredictThenStoreSupport>,
}

impl Downstream {
    pub fn connect(config: &GatewayConfig, tls: &TlsMaterial) -> Result<Self, TlsError> {
        let channel = |endpoint: &str, service: &str| {
            tls.mesh_channel(endpoint, &ServiceIdentity::new(service))
        };
        let inference = channel(&config.inference_endpoint, "inference")?;
        let audit = channel(&config.audit_endpoint, "audit")?;
        Ok(Self {
            auth: AuthServiceClient::new(channel(&config.auth_endpoint, "auth")?),
            validation: ValidationServiceClient::new(channel(
                &config.validation_endpoint,
                "validation",
            )?)
            .max_decoding_message_size(MAX_CANONICAL_MESSAGE)
            .max_encoding_message_size(config.max_image_bytes + 64 * 1024),
            inference: InferenceServiceClient::new(inference.clone())
                .max_encoding_message_size(MAX_CANONICAL_MESSAGE),
            kserve: GrpcInferenceServiceClient::new(inference),
            model_inputs: Arc::new(crate::model_inputs::ModelInputSizes::new(
                config.model_input_resize,
            )),
            audit: AuditServiceClient::new(audit.clone()),
            ledger: LedgerClient::new(audit),
            timeout: Duration::from_secs(config.downstream_timeout_seconds),
            notes: Arc::default(),
            predict_then_store: Arc::default(),
        })
    }

    /// Records `event` in the ledger through the batching client and returns its receipt once
    /// it is durable, within the time left (or the gateway's own bound, whichever is shorter).
    /// A caller that stops waiting before its event is sent withdraws it.
    pub async fn record(
        &self,
        event: AppendRequest,
        caller_deadline: Option<Duration>,
    ) -> Result<AppendResponse, tonic::Status> {
        tokio::time::timeout(self.time_bound(caller_deadline), self.ledger.append(event))
            .await
            .map_err(|_| tonic::Status::deadline_exceeded("the ledger did not answer in time"))?
    }

    /// The time a downstream call may take: the caller's time left or the gateway's own
    /// bound, whichever is shorter.
    pub(crate) fn time_bound(&self, caller_deadline: Option<Duration>) -> Duration {
        caller_deadline.map_or(self.timeout, |left| left.min(self.timeout))
    }

    /// A downstream request carrying the correlation id and the time left of the caller's
    /// deadline (or the gateway's own bound, whichever is shorter).
    pub fn request<T>(
        &self,
        message: T,
        correlation_id: &str,
        caller_deadline: Option<Duration>,
    ) -> tonic::Request<T> {
        mesh_request(message, correlation_id, self.time_bound(caller_deadline))
    }
}

/// A downstream request carrying the correlation id, bounded by `timeout`.
pub(crate) fn mesh_request<T>(
    message: T,
    correlation_id: &str,
    timeout: Duration,
) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    medai_runtime::correlation::propagate(request.metadata_mut(), correlation_id);
    request.set_timeout(timeout);
    request
}
