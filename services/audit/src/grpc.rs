//! The gRPC edge of the audit service: proto types are converted here and nowhere else.

use medai_proto::audit::v1::audit_service_server::AuditService;
use medai_proto::audit::v1::{AppendRequest, AppendResponse, VerifyRequest, VerifyResponse};
use sea_orm::DatabaseConnection;
use tonic::{Request, Response, Status};

use crate::appender::{AppendError, LedgerAppender, NewEvent};
use crate::chain::canonical_json;
use crate::error::AuditError;
use crate::verify::verify_chain;

const MAX_SHORT_FIELD: usize = 256;
const MAX_CONTEXT: usize = 16 * 1024;

pub struct AuditApi {
    pub appender: LedgerAppender,
    pub connection: DatabaseConnection,
}

impl TryFrom<AppendRequest> for NewEvent {
    type Error = AuditError;

    fn try_from(request: AppendRequest) -> Result<Self, Self::Error> {
        let required = |value: String, field: &'static str| {
            if value.is_empty() {
                return Err(AuditError::MissingField { field });
            }
            if value.len() > MAX_SHORT_FIELD {
                return Err(AuditError::FieldTooLong {
                    field,
                    limit: MAX_SHORT_FIELD,
                });
            }
            Ok(value)
        };
        if request.context_json.len() > MAX_CONTEXT {
            return Err(AuditError::FieldTooLong {
                field: "context_json",
                limit: MAX_CONTEXT,
            });
        }
        let context = if request.context_json.is_empty() {
            "{}".to_owned()
        } else {
            let value: serde_json::Value = serde_json::from_str(&request.context_json)
                .map_err(|_| AuditError::ContextNotAnObject)?;
            if !value.is_object() {
                return Err(AuditError::ContextNotAnObject);
            }
            canonical_json(&value)
        };
        Ok(Self {
            actor: required(request.actor, "actor")?,
            action: required(request.action, "action")?,
            resource: required(request.resource, "resource")?,
            outcome: required(request.outcome, "outcome")?,
            context,
        })
    }
}

#[tonic::async_trait]
impl AuditService for AuditApi {
    async fn append(
        &self,
        request: Request<AppendRequest>,
    ) -> Result<Response<AppendResponse>, Status> {
        let event = NewEvent::try_from(request.into_inner())?;
        let action = event.action.clone();
        let receipt = self.appender.append(event).await.map_err(|error: AppendError| {
            tracing::error!(error = %error, "append refused: the ledger could not make it durable");
            AuditError::LedgerUnavailable(error.to_string())
        })?;
        tracing::info!(seq = receipt.seq, action = %action, "ledger entry appended");
        metrics::counter!("medai_ledger_appends_total", "action" => action).increment(1);
        Ok(Response::new(AppendResponse {
            seq: receipt.seq,
            hash: receipt.hash,
            recorded_at: receipt.recorded_at,
        }))
    }

    async fn verify(
        &self,
        _request: Request<VerifyRequest>,
    ) -> Result<Response<VerifyResponse>, Status> {
        let report = verify_chain(&self.connection)
            .await
            .map_err(|error| AuditError::Storage(error.to_string()))?;
        let (first_bad_seq, problem) = report.first_break.clone().unwrap_or((0, String::new()));
        if first_bad_seq != 0 {
            tracing::error!(first_bad_seq, problem = %problem, "ledger verification found a broken chain");
        }
        Ok(Response::new(VerifyResponse {
            intact: report.first_break.is_none(),
            entries_checked: report.entries_checked,
            first_bad_seq,
            problem,
            head_hash: report.head_hash,
        }))
    }
}
