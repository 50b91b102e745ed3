//! The gateway's external API. Authentication and roles were settled by the token layer; the
//! handlers convert messages and call the orchestration.

use std::time::Instant;

use medai_proto::audit::v1::{AppendRequest, VerifyRequest};
use medai_proto::auth::v1 as auth;
use medai_proto::gateway::v1 as gw;
use medai_proto::gateway::v1::gateway_service_server::GatewayService;
use medai_proto::gateway::v1::{
    InferRequest, InferResponse, LoginRequest, LoginResponse, VerifyLedgerRequest,
    VerifyLedgerResponse,
};
use medai_runtime::correlation::{CORRELATION_HEADER, correlation_id};
use medai_runtime::deadline::caller_deadline;
use tonic::metadata::MetadataValue;
use tonic::{Request, Response, Status};

use crate::error::{GatewayError, relay_downstream};
use crate::infer::InferInput;
use crate::streams::{Ingest, infer_response};
use crate::token_auth::Caller;

pub struct GatewayApi {
    pub ingest: Ingest,
    /// Told to forget cached "not revoked" answers after every action that revokes tokens.
    pub revocations: std::sync::Arc<crate::revocation_check::RevocationSource>,
}

impl GatewayApi {
    /// Every read of the ledger is itself recorded, before it is answered; a read that cannot
    /// be recorded is refused.
    async fn record_ledger_read(
        &self,
        caller: &Caller,
        action: &str,
        context: serde_json::Value,
    ) -> Result<(), Status> {
        self.record_ledger_act(caller, action, "SUCCESS", context)
            .await
    }

    /// Records, in the caller's name from their token, an act on the ledger before it is
    /// done; an act that cannot be recorded is refused.
    async fn record_ledger_act(
        &self,
        caller: &Caller,
        action: &str,
        outcome: &str,
        context: serde_json::Value,
    ) -> Result<(), Status> {
        let record = AppendRequest {
            actor: format!("user:{}", caller.subject),
            action: action.to_owned(),
            resource: "ledger".to_owned(),
            outcome: outcome.to_owned(),
            context_json: context.to_string(),
        };
        self.ingest
            .downstream
            .record(record, None)
            .await
            .map(|_| ())
            .map_err(|_| GatewayError::LedgerUnavailable.into())
    }
}

type AuthClient = medai_proto::auth::v1::auth_service_client::AuthServiceClient<
    medai_runtime::rpc_trace::MeshChannel,
>;

impl GatewayApi {
    /// One call to auth with the correlation id and the gateway's deadline; refusals that speak
    /// to the caller pass through, the rest mean auth is unavailable.
    async fn call_auth<Req, Res, F, Fut>(
        &self,
        correlation: &str,
        call: F,
        message: Req,
    ) -> Result<Res, Status>
    where
        F: FnOnce(AuthClient, tonic::Request<Req>) -> Fut,
        Fut: std::future::Future<Output = Result<Response<Res>, Status>>,
    {
        // A call auth provably never processed (it arrived as an auth pod drained) is sent
        // again by the mesh channel itself, whatever it changes: see medai_runtime::unprocessed.
        let request = self.ingest.downstream.request(message, correlation, None);
        let answer = call(self.ingest.downstream.auth.clone(), request).await;
        // Every state-changing auth call may have revoked tokens (logout, disable, reset, role
        // change, delete, refresh reuse): no cached "not revoked" answer survives it here.
        self.revocations.forget_recent_checks();
        answer
            .map(Response::into_inner)
            .map_err(|status| relay_downstream("auth", status))
    }
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
            .ingest
            .downstream
            .auth
            .clone()
            .login(
                self.ingest
                    .downstream
                    .request(login, &correlation, deadline),
            )
            .await
            .map_err(|status| relay_downstream("auth", status))?
            .into_inner();
        Ok(with_correlation(
            LoginResponse {
                grant: response.grant,
            },
            &correlation,
        ))
    }

    async fn refresh(
        &self,
        request: Request<gw::RefreshRequest>,
    ) -> Result<Response<gw::RefreshResponse>, Status> {
        let correlation = correlation_id(request.metadata());
        let refresh = auth::RefreshRequest {
            refresh_token: request.into_inner().refresh_token,
            correlation_id: correlation.clone(),
        };
        let response = self
            .call_auth(
                &correlation,
                |mut auth, request| async move { auth.refresh(request).await },
                refresh,
            )
            .await?;
        Ok(with_correlation(
            gw::RefreshResponse {
                grant: response.grant,
            },
            &correlation,
        ))
    }

    async fn logout(
        &self,
        request: Request<gw::LogoutRequest>,
    ) -> Result<Response<gw::LogoutResponse>, Status> {
        let caller = caller_of(&request)?;
        let correlation = correlation_id(request.metadata());
        let logout = auth::LogoutRequest {
            actor: caller.subject,
            access_token_id: caller.token_id,
            access_token_expires_at: caller.token_expires_at,
            refresh_token: request.into_inner().refresh_token,
            correlation_id: correlation.clone(),
        };
        self.call_auth(
            &correlation,
            |mut auth, request| async move { auth.logout(request).await },
            logout,
        )
        .await?;
        Ok(with_correlation(gw::LogoutResponse {}, &correlation))
    }

    async fn change_password(
        &self,
        request: Request<gw::ChangePasswordRequest>,
    ) -> Result<Response<gw::ChangePasswordResponse>, Status> {
        let caller = caller_of(&request)?;
        let correlation = correlation_id(request.metadata());
        let request = request.into_inner();
        let change = auth::ChangePasswordRequest {
            actor: caller.subject,
            current_password: request.current_password,
            new_password: request.new_password,
            correlation_id: correlation.clone(),
        };
        self.call_auth(
            &correlation,
            |mut auth, request| async move { auth.change_password(request).await },
            change,
        )
        .await?;
        Ok(with_correlation(
            gw::ChangePasswordResponse {},
            &correlation,
        ))
    }

    async fn reauthenticate(
        &self,
        request: Request<gw::ReauthenticateRequest>,
    ) -> Result<Response<gw::ReauthenticateResponse>, Status> {
        let caller = caller_of(&request)?;
        let correlation = correlation_id(request.metadata());
        let reauthenticate = auth::ReauthenticateRequest {
            actor: caller.subject,
            password: request.into_inner().password,
            correlation_id: correlation.clone(),
        };
        let response = self
            .call_auth(
                &correlation,
                |mut auth, request| async move { auth.reauthenticate(request).await },
                reauthenticate,
            )
            .await?;
        Ok(with_correlation(
            gw::ReauthenticateResponse {
                signing_ticket: response.signing_ticket,
                expires_in_seconds: response.expires_in_seconds,
            },
            &correlation,
        ))
    }

    async fn create_user(
        &self,
        request: Request<gw::CreateUserRequest>,
    ) -> Result<Response<gw::CreateUserResponse>, Status> {
        let caller = caller_of(&request)?;
        let correlation = correlation_id(request.metadata());
        let request = request.into_inner();
        let create = auth::CreateUserRequest {
            actor: caller.subject,
            username: request.username,
            password: request.password,
            role: request.role,
            correlation_id: correlation.clone(),
        };
        let response = self
            .call_auth(
                &correlation,
                |mut auth, request| async move { auth.create_user(request).await },
                create,
            )
            .await?;
        Ok(with_correlation(
            gw::CreateUserResponse {
                user_id: response.user_id,
            },
            &correlation,
        ))
    }

    async fn set_user_role(
        &self,
        request: Request<gw::SetUserRoleRequest>,
    ) -> Result<Response<gw::SetUserRoleResponse>, Status> {
        let caller = caller_of(&request)?;
        let correlation = correlation_id(request.metadata());
        let request = request.into_inner();
        let set = auth::SetUserRoleRequest {
            actor: caller.subject,
            username: request.username,
            role: request.role,
            correlation_id: correlation.clone(),
        };
        self.call_auth(
            &correlation,
            |mut auth, request| async move { auth.set_user_role(request).await },
            set,
        )
        .await?;
        Ok(with_correlation(gw::SetUserRoleResponse {}, &correlation))
    }

    async fn disable_user(
        &self,
        request: Request<gw::DisableUserRequest>,
    ) -> Result<Response<gw::DisableUserResponse>, Status> {
        let caller = caller_of(&request)?;
        let correlation = correlation_id(request.metadata());
        let disable = auth::DisableUserRequest {
            actor: caller.subject,
            username: request.into_inner().username,
            correlation_id: correlation.clone(),
        };
        self.call_auth(
            &correlation,
            |mut auth, request| async move { auth.disable_user(request).await },
            disable,
        )
        .await?;
        Ok(with_correlation(gw::DisableUserResponse {}, &correlation))
    }

    async fn reset_user_password(
        &self,
        request: Request<gw::ResetUserPasswordRequest>,
    ) -> Result<Response<gw::ResetUserPasswordResponse>, Status> {
        let caller = caller_of(&request)?;
        let correlation = correlation_id(request.metadata());
        let request = request.into_inner();
        let reset = auth::ResetUserPasswordRequest {
            actor: caller.subject,
            username: request.username,
            new_password: request.new_password,
            correlation_id: correlation.clone(),
        };
        self.call_auth(
            &correlation,
            |mut auth, request| async move { auth.reset_user_password(request).await },
            reset,
        )
        .await?;
        Ok(with_correlation(
            gw::ResetUserPasswordResponse {},
            &correlation,
        ))
    }

    async fn delete_user(
        &self,
        request: Request<gw::DeleteUserRequest>,
    ) -> Result<Response<gw::DeleteUserResponse>, Status> {
        let caller = caller_of(&request)?;
        let correlation = correlation_id(request.metadata());
        let delete = auth::DeleteUserRequest {
            actor: caller.subject,
            username: request.into_inner().username,
            correlation_id: correlation.clone(),
        };
        self.call_auth(
            &correlation,
            |mut auth, request| async move { auth.delete_user(request).await },
            delete,
        )
        .await?;
        Ok(with_correlation(gw::DeleteUserResponse {}, &correlation))
    }

    async fn rotate_signing_key(
        &self,
        request: Request<gw::RotateSigningKeyRequest>,
    ) -> Result<Response<gw::RotateSigningKeyResponse>, Status> {
        let caller = caller_of(&request)?;
        let correlation = correlation_id(request.metadata());
        let rotate = auth::RotateSigningKeyRequest {
            actor: caller.subject,
            correlation_id: correlation.clone(),
        };
        let response = self
            .call_auth(
                &correlation,
                |mut auth, request| async move { auth.rotate_signing_key(request).await },
                rotate,
            )
            .await?;
        Ok(with_correlation(
            gw::RotateSigningKeyResponse {
                kid: response.kid,
                signs_from: response.signs_from,
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
        let input = InferInput {
            image: request.image,
            format: request.format,
            model_name: request.model_name,
            model_version: request.model_version,
            idempotency_key: request.idempotency_key,
            image_sha256: None,
            client_request_id: String::new(),
        };
        let outcome = self
            .ingest
            .predict(&caller, input, &correlation, deadline)
            .await?;
        Ok(with_correlation(infer_response(outcome), &correlation))
    }

    async fn upload_image(
        &self,
        request: Request<tonic::Streaming<gw::UploadImageRequest>>,
    ) -> Result<Response<gw::UploadImageResponse>, Status> {
        let received_at = Instant::now();
        let caller = caller_of(&request)?;
        let correlation = correlation_id(request.metadata());
        let deadline = caller_deadline(request.metadata(), received_at);
        let input = self
            .ingest
            .receive_upload(&caller, request.into_inner())
            .await?;
        let outcome = self
            .ingest
            .predict(&caller, input, &correlation, deadline)
            .await?;
        Ok(with_correlation(
            gw::UploadImageResponse {
                result: Some(infer_response(outcome)),
            },
            &correlation,
        ))
    }

    async fn get_upload_status(
        &self,
        request: Request<gw::GetUploadStatusRequest>,
    ) -> Result<Response<gw::GetUploadStatusResponse>, Status> {
        let caller = caller_of(&request)?;
        let correlation = correlation_id(request.metadata());
        let status = self
            .ingest
            .upload_status(&caller, &request.into_inner().upload_id)?;
        Ok(with_correlation(status, &correlation))
    }

    type StudyStreamStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<gw::StudyStreamResponse, Status>> + Send>,
    >;

    async fn study_stream(
        &self,
        request: Request<tonic::Streaming<gw::StudyStreamRequest>>,
    ) -> Result<Response<Self::StudyStreamStream>, Status> {
        let received_at = Instant::now();
        let caller = caller_of(&request)?;
        let correlation = correlation_id(request.metadata());
        let deadline = caller_deadline(request.metadata(), received_at);
        let admission = request
            .extensions()
            .get::<crate::load_control::MessageAdmission>()
            .cloned();
        let answers = self.ingest.clone().study(
            caller,
            request.into_inner(),
            correlation.clone(),
            deadline,
            admission,
        );
        Ok(with_correlation(
            Box::pin(tokio_stream::wrappers::ReceiverStream::new(answers))
                as Self::StudyStreamStream,
            &correlation,
        ))
    }

    async fn get_result(
        &self,
        request: Request<gw::GetResultRequest>,
    ) -> Result<Response<gw::GetResultResponse>, Status> {
        let caller = caller_of(&request)?;
        let correlation = correlation_id(request.metadata());
        let deadline = caller_deadline(request.metadata(), Instant::now());
        let result = crate::results::get_result(
            &self.ingest.downstream,
            &caller,
            &request.into_inner().result_id,
            &correlation,
            deadline,
        )
        .await?;
        Ok(with_correlation(
            gw::GetResultResponse {
                result: Some(result),
            },
            &correlation,
        ))
    }

    async fn list_results(
        &self,
        request: Request<gw::ListResultsRequest>,
    ) -> Result<Response<gw::ListResultsResponse>, Status> {
        let caller = caller_of(&request)?;
        let correlation = correlation_id(request.metadata());
        let deadline = caller_deadline(request.metadata(), Instant::now());
        let page = crate::results::list_results(
            &self.ingest.downstream,
            &caller,
            request.into_inner().filter,
            &correlation,
            deadline,
        )
        .await?;
        Ok(with_correlation(page, &correlation))
    }

    async fn sign_result(
        &self,
        request: Request<gw::SignResultRequest>,
    ) -> Result<Response<gw::SignResultResponse>, Status> {
        let caller = caller_of(&request)?;
        let correlation = correlation_id(request.metadata());
        let deadline = caller_deadline(request.metadata(), Instant::now());
        let signed = crate::results::sign_result(
            &self.ingest.downstream,
            &caller,
            request.into_inner(),
            &correlation,
            deadline,
        )
        .await?;
        Ok(with_correlation(signed, &correlation))
    }

    async fn explain_result(
        &self,
        request: Request<gw::ExplainResultRequest>,
    ) -> Result<Response<gw::ExplainResultResponse>, Status> {
        let caller = caller_of(&request)?;
        let correlation = correlation_id(request.metadata());
        let deadline = caller_deadline(request.metadata(), Instant::now());
        let explained = crate::explain::explain_result(
            &self.ingest.downstream,
            &caller,
            request.into_inner(),
            self.ingest.max_image_bytes,
            &correlation,
            deadline,
        )
        .await?;
        Ok(with_correlation(explained, &correlation))
    }

    async fn verify_ledger(
        &self,
        request: Request<VerifyLedgerRequest>,
    ) -> Result<Response<VerifyLedgerResponse>, Status> {
        let caller = caller_of(&request)?;
        let correlation = correlation_id(request.metadata());
        let verification = self
            .ingest
            .downstream
            .audit
            .clone()
            .verify(
                self.ingest
                    .downstream
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
        self.ingest
            .downstream
            .record(record, None)
            .await
            .map_err(|_| GatewayError::LedgerUnavailable)?;
        Ok(with_correlation(
            VerifyLedgerResponse {
                verification: Some(verification),
            },
            &correlation,
        ))
    }

    async fn query_ledger(
        &self,
        request: Request<gw::QueryLedgerRequest>,
    ) -> Result<Response<gw::QueryLedgerResponse>, Status> {
        let caller = caller_of(&request)?;
        let correlation = correlation_id(request.metadata());
        let query = request.into_inner().query.unwrap_or_default();
        let context = serde_json::json!({
            "correlation_id": correlation,
            "action": query.action,
            "actor": query.actor,
            "recorded_from": query.recorded_from,
            "recorded_to": query.recorded_to,
            "resource": query.resource,
        });
        self.record_ledger_read(&caller, "LEDGER_QUERY", context)
            .await?;
        let result = self
            .ingest
            .downstream
            .audit
            .clone()
            .query_events(self.ingest.downstream.request(query, &correlation, None))
            .await
            .map_err(|status| relay_downstream("audit", status))?
            .into_inner();
        Ok(with_correlation(
            gw::QueryLedgerResponse {
                result: Some(result),
            },
            &correlation,
        ))
    }

    type ExportLedgerStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<gw::ExportLedgerResponse, Status>> + Send>,
    >;

    async fn export_ledger(
        &self,
        request: Request<gw::ExportLedgerRequest>,
    ) -> Result<Response<Self::ExportLedgerStream>, Status> {
        let caller = caller_of(&request)?;
        let correlation = correlation_id(request.metadata());
        let context = serde_json::json!({ "correlation_id": correlation });
        self.record_ledger_read(&caller, "LEDGER_EXPORT", context)
            .await?;
        let upstream = self
            .ingest
            .downstream
            .audit
            .clone()
            .export_ledger(self.ingest.downstream.request(
                medai_proto::audit::v1::ExportLedgerRequest {},
                &correlation,
                None,
            ))
            .await
            .map_err(|status| relay_downstream("audit", status))?
            .into_inner();
        let relayed = tokio_stream::StreamExt::map(upstream, |chunk| {
            chunk
                .map(|chunk| gw::ExportLedgerResponse { lines: chunk.lines })
                .map_err(|status| relay_downstream("audit", status))
        });
        Ok(with_correlation(
            Box::pin(relayed) as Self::ExportLedgerStream,
            &correlation,
        ))
    }

    async fn create_ledger_checkpoint(
        &self,
        request: Request<gw::CreateLedgerCheckpointRequest>,
    ) -> Result<Response<gw::CreateLedgerCheckpointResponse>, Status> {
        let caller = caller_of(&request)?;
        let correlation = correlation_id(request.metadata());
        // Audit records the request in the gateway's name (its certificate); who asked is
        // known only here, from the token, so it is recorded here first.
        let context = serde_json::json!({ "correlation_id": correlation });
        self.record_ledger_act(&caller, "LEDGER_CHECKPOINT", "REQUESTED", context)
            .await?;
        let response = self
            .ingest
            .downstream
            .audit
            .clone()
            .create_checkpoint(self.ingest.downstream.request(
                medai_proto::audit::v1::CreateCheckpointRequest {},
                &correlation,
                None,
            ))
            .await
            .map_err(|status| relay_downstream("audit", status))?
            .into_inner();
        Ok(with_correlation(
            gw::CreateLedgerCheckpointResponse {
                checkpoint: response.checkpoint,
            },
            &correlation,
        ))
    }
}
