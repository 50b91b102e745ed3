//! The gateway's external API. Authentication and roles were settled by the token layer; the
//! handlers convert messages and call the orchestration.

use std::time::Instant;

use medai_proto::audit::v1::{AppendRequest, VerifyRequest};
use medai_proto::auth::v1 as auth;
use medai_proto::gateway::v1::gateway_service_server::GatewayService;
use medai_proto::gateway::v1::{
    InferRequest, InferResponse, LoginRequest, LoginResponse, VerifyLedgerRequest,
    VerifyLedgerResponse,
};
use medai_runtime::correlation::{CORRELATION_HEADER, correlation_id};
use medai_runtime::deadline::caller_deadline;
use tonic::metadata::MetadataValue;
use tonic::{Request, Response, Status};

use crate::downstream::Downstream;
use crate::error::{GatewayError, relay_downstream};
use crate::infer::{InferInput, infer};
use crate::token_auth::Caller;

pub struct GatewayApi {
    pub downstream: Downstream,
    pub max_image_bytes: usize,
    pub default_model: String,
}

fn with_correlation<T>(message: T, id: &str) -> Response<T> {
    let mut response = Response::new(message);
    if let Ok(value) = MetadataValue::try_from(id) {
        response.metadata_mut().insert(CORRELATION_HEADER, value);
    }
    response
}

fn caller_of<T>(request: &Request<T>) -> Result<Caller, Status> {
    request
        .extensions()
        .get::<Caller>()
        .cloned()
        .ok_or_else(|| GatewayError::CallerMissing.into())
}

#[tonic::async_trait]
impl GatewayService for GatewayApi {
    async fn login(
        &self,
        request: Request<LoginRequest>,
    ) -> Result<Response<LoginResponse>, Status> {
        let received_at = Instant::now();
        let correlation = correlation_id(request.metadata());
        let deadline = caller_deadline(request.metadata(), received_at)
            .map(|at| at.saturating_duration_since(received_at));
        let request = request.into_inner();
        let login = auth::LoginRequest {
            username: request.username,
            password: request.password,
            correlation_id: correlation.clone(),
        };
        let response = self
            .downstream
            .auth
            .clone()
            .login(self.downstream.request(login, &correlation, deadline))
            .await
            .map_err(|status| relay_downstream("auth", status))?
            .into_inner();
        Ok(with_correlation(
            LoginResponse {
                access_token: response.access_token,
                expires_in_seconds: response.expires_in_seconds,
                role: response.role,
            },
            &correlation,
        ))
    }

    async fn infer(
        &self,
        request: Request<InferRequest>,
    ) -> Result<Response<InferResponse>, Status> {
        let received_at = Instant::now();
        let caller = caller_of(&request)?;
        let correlation = correlation_id(request.metadata());
        let deadline = caller_deadline(request.metadata(), received_at);
        let request = request.into_inner();
        let model_name = if request.model_name.is_empty() {
            self.default_model.clone()
        } else {
            request.model_name
        };
        let input = InferInput {
            image: request.image,
            format: request.format,
            model_name,
            model_version: request.model_version,
        };
        let outcome = infer(
            &self.downstream,
            &caller,
            input,
            &correlation,
            deadline,
            self.max_image_bytes,
        )
        .await?;
        Ok(with_correlation(
            InferResponse {
                result_id: outcome.result_id,
                prediction: Some(outcome.prediction),
                image_sha256: outcome.image_sha256,
                ledger_seq: outcome.ledger_seq,
                ledger_hash: outcome.ledger_hash,
            },
            &correlation,
        ))
    }

    async fn verify_ledger(
        &self,
        request: Request<VerifyLedgerRequest>,
    ) -> Result<Response<VerifyLedgerResponse>, Status> {
        let caller = caller_of(&request)?;
        let correlation = correlation_id(request.metadata());
        let verification = self
            .downstream
            .audit
            .clone()
            .verify(
                self.downstream
                    .request(VerifyRequest {}, &correlation, None),
            )
            .await
            .map_err(|status| relay_downstream("audit", status))?
            .into_inner();
        // Reading the ledger is itself an auditable act.
        let context = serde_json::json!({
            "correlation_id": correlation,
            "entries_checked": verification.entries_checked,
            "intact": verification.intact,
        });
        let record = AppendRequest {
            actor: format!("user:{}", caller.subject),
            action: "LEDGER_VERIFY".to_owned(),
            resource: "ledger".to_owned(),
            outcome: "SUCCESS".to_owned(),
            context_json: context.to_string(),
        };
        self.downstream
            .audit
            .clone()
            .append(self.downstream.request(record, &correlation, None))
            .await
            .map_err(|_| GatewayError::LedgerUnavailable)?;
        Ok(with_correlation(
            VerifyLedgerResponse {
                verification: Some(verification),
            },
            &correlation,
        ))
    }
}
