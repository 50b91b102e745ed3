//! The gRPC edge of the audit service: proto types are converted here and nowhere else.

use std::pin::Pin;
use std::sync::Arc;

use base64::Engine;
use medai_ledger::checkpoint::Checkpoint;
use medai_ledger::merkle;
use medai_proto::audit::v1 as pb;
use medai_proto::audit::v1::audit_service_server::AuditService;
use medai_proto::audit::v1::{
    APPEND_BATCH_MAX_BYTES, AppendRequest, AppendResponse, VerifyRequest, VerifyResponse,
};
use sea_orm::DatabaseConnection;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::appender::{AppendError, AppendReceipt, LedgerAppender, MAX_BATCH, NewEvent};
use crate::checkpoints::{CheckpointError, Checkpointer};
use crate::error::AuditError;
use crate::query::{EventFilter, MAX_PAGE, export_chunks, query_events};
use crate::verify::{verified_hashes, verify_ledger};
use medai_ledger::chain::canonical_json;
use medai_runtime::identity::ServiceIdentity;

const MAX_SHORT_FIELD: usize = 256;
const MAX_CONTEXT: usize = 16 * 1024;

pub struct AuditApi {
    pub appender: LedgerAppender,
    pub connection: DatabaseConnection,
    pub checkpointer: Arc<Checkpointer>,
}

fn checkpoint_message(checkpoint: Checkpoint) -> pb::Checkpoint {
    pb::Checkpoint {
        tree_size: checkpoint.tree_size,
        head_hash: checkpoint.head_hash,
        merkle_root: checkpoint.merkle_root,
        created_at: checkpoint.created_at,
        key_id: checkpoint.key_id,
        signature: checkpoint.signature,
    }
}

fn non_empty(text: String) -> Option<String> {
    (!text.is_empty()).then_some(text)
}

fn append_refused(error: AppendError) -> AuditError {
    match error {
        AppendError::AnchorViolation(violation) => match violation.missing_below_checkpoint {
            Some((first, last)) => AuditError::BehindCheckpoint { first, last },
            None => AuditError::ChainAnchorViolation,
        },
        error => {
            tracing::error!(error = %error, "append refused: the ledger could not make it durable");
            AuditError::LedgerUnavailable(error.to_string())
        }
    }
}

impl AuditApi {
    /// Appends one event, answered once durable.
    async fn record(&self, event: NewEvent) -> Result<AppendReceipt, AuditError> {
        let action = event.action.clone();
        let receipt = self.appender.append(event).await.map_err(append_refused)?;
        tracing::info!(seq = receipt.seq, action = %action, "ledger entry appended");
        metrics::counter!("medai_ledger_appends_total", "action" => action).increment(1);
        Ok(receipt)
    }

    /// Appends `events` as consecutive entries, answered once all are durable (or none is).
    async fn record_all(&self, events: Vec<NewEvent>) -> Result<Vec<AppendReceipt>, AuditError> {
        // Counted per action, once per batch: events of one batch mostly share their action.
        let mut actions: Vec<(String, u64)> = Vec::new();
        for event in &events {
            match actions
                .iter_mut()
                .find(|(action, _)| *action == event.action)
            {
                Some((_, count)) => *count += 1,
                None => actions.push((event.action.clone(), 1)),
            }
        }
        let receipts = self
            .appender
            .append_all(events)
            .await
            .map_err(append_refused)?;
        if let (Some(first), Some(last)) = (receipts.first(), receipts.last()) {
            tracing::info!(
                first_seq = first.seq,
                last_seq = last.seq,
                entries = receipts.len(),
                "ledger entries appended as one batch"
            );
        }
        for (action, count) in actions {
            metrics::counter!("medai_ledger_appends_total", "action" => action).increment(count);
        }
        Ok(receipts)
    }

    /// The verified chain's recomputed entry hashes, for proofs: never the stored ones.
    async fn verified_hashes(&self) -> Result<Vec<merkle::Hash>, AuditError> {
        verified_hashes(&self.connection)
            .await
            .map_err(|error| AuditError::Storage(error.to_string()))
    }
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
        let receipt = self.record(event).await?;
        Ok(Response::new(AppendResponse {
            seq: receipt.seq,
            hash: receipt.hash,
            recorded_at: receipt.recorded_at,
        }))
    }

    async fn append_batch(
        &self,
        request: Request<pb::AppendBatchRequest>,
    ) -> Result<Response<pb::AppendBatchResponse>, Status> {
        let events = request.into_inner().events;
        if events.is_empty() {
            return Err(AuditError::BatchEmpty.into());
        }
        if events.len() > MAX_BATCH
            || events.iter().map(AppendRequest::field_bytes).sum::<usize>() > APPEND_BATCH_MAX_BYTES
        {
            return Err(AuditError::BatchTooLarge {
                events: MAX_BATCH,
                bytes: APPEND_BATCH_MAX_BYTES,
            }
            .into());
        }
        // Every event is checked before any is recorded: one bad event refuses the batch.
        let events = events
            .into_iter()
            .map(NewEvent::try_from)
            .collect::<Result<Vec<_>, _>>()?;
        let receipts = self.record_all(events).await?;
        Ok(Response::new(pb::AppendBatchResponse {
            receipts: receipts
                .into_iter()
                .map(|receipt| AppendResponse {
                    seq: receipt.seq,
                    hash: receipt.hash,
                    recorded_at: receipt.recorded_at,
                })
                .collect(),
        }))
    }

    async fn verify(
        &self,
        _request: Request<VerifyRequest>,
    ) -> Result<Response<VerifyResponse>, Status> {
        let report = verify_ledger(&self.connection, self.checkpointer.signer.public_key())
            .await
            .map_err(|error| AuditError::Storage(error.to_string()))?;
        if let Some(seq) = report.first_bad_seq {
            metrics::counter!(crate::metric_catalog::CHAIN_VERIFICATION_FAILURES, "check" => "verify")
                .increment(1);
            tracing::error!(first_bad_seq = seq, problem = %report.problem, "ledger verification failed");
        }
        Ok(Response::new(VerifyResponse {
            intact: report.first_bad_seq.is_none(),
            entries_checked: report.entries_verified,
            first_bad_seq: report.first_bad_seq.unwrap_or(0),
            problem: report.problem,
            head_hash: report.head_hash,
            checkpoints_verified: report.checkpoints_verified,
        }))
    }

    async fn create_checkpoint(
        &self,
        request: Request<pb::CreateCheckpointRequest>,
    ) -> Result<Response<pb::CreateCheckpointResponse>, Status> {
        // A signed checkpoint is a state change: recorded first, so the checkpoint covers the
        // record of its own request. The peer is the certificate's identity.
        let peer = ServiceIdentity::of_grpc_peer(&request)
            .map(|peer| peer.name().to_owned())
            .unwrap_or_default();
        let context = serde_json::json!({
            "correlation_id": medai_runtime::correlation::correlation_id(request.metadata()),
            "via": peer,
        });
        let requested = self
            .record(NewEvent {
                actor: format!("service:{peer}"),
                action: "LEDGER_CHECKPOINT".to_owned(),
                resource: "ledger".to_owned(),
                outcome: "REQUESTED".to_owned(),
                context: canonical_json(&context),
            })
            .await?;
        let outcome = self
            .checkpointer
            .create()
            .await
            .map_err(|error| match error {
                CheckpointError::BrokenChain { seq, problem } => {
                    tracing::error!(seq, problem = %problem, "checkpoint refused: the ledger does not verify");
                    AuditError::ChainBroken { seq }
                }
                CheckpointError::Database(error) => AuditError::Storage(error.to_string()),
            })?;
        tracing::info!(
            request_seq = requested.seq,
            tree_size = outcome.checkpoint.tree_size,
            entries_read = outcome.entries_read,
            "checkpoint requested and signed"
        );
        Ok(Response::new(pb::CreateCheckpointResponse {
            checkpoint: Some(checkpoint_message(outcome.checkpoint)),
        }))
    }

    async fn list_checkpoints(
        &self,
        _request: Request<pb::ListCheckpointsRequest>,
    ) -> Result<Response<pb::ListCheckpointsResponse>, Status> {
        let checkpoints = crate::verify::stored_checkpoints(&self.connection)
            .await
            .map_err(|error| AuditError::Storage(error.to_string()))?;
        Ok(Response::new(pb::ListCheckpointsResponse {
            checkpoints: checkpoints.into_iter().map(checkpoint_message).collect(),
        }))
    }

    async fn get_checkpoint_key(
        &self,
        _request: Request<pb::GetCheckpointKeyRequest>,
    ) -> Result<Response<pb::GetCheckpointKeyResponse>, Status> {
        let public_key = self.checkpointer.signer.public_key();
        Ok(Response::new(pb::GetCheckpointKeyResponse {
            public_key: base64::engine::general_purpose::STANDARD.encode(public_key),
            key_id: medai_ledger::checkpoint::key_id(public_key),
        }))
    }

    async fn get_inclusion_proof(
        &self,
        request: Request<pb::GetInclusionProofRequest>,
    ) -> Result<Response<pb::GetInclusionProofResponse>, Status> {
        let request = request.into_inner();
        let hashes = self.verified_hashes().await?;
        let size = usize::try_from(request.tree_size).unwrap_or(usize::MAX);
        if request.seq == 0 || request.seq > request.tree_size || size > hashes.len() {
            return Err(AuditError::OutOfRange.into());
        }
        let index = usize::try_from(request.seq - 1).unwrap_or(usize::MAX);
        let proof =
            merkle::inclusion_proof(&hashes[..size], index).ok_or(AuditError::OutOfRange)?;
        Ok(Response::new(pb::GetInclusionProofResponse {
            entry_hash: hex::encode(hashes[index]),
            proof: proof.iter().map(hex::encode).collect(),
        }))
    }

    async fn get_consistency_proof(
        &self,
        request: Request<pb::GetConsistencyProofRequest>,
    ) -> Result<Response<pb::GetConsistencyProofResponse>, Status> {
        let request = request.into_inner();
        let hashes = self.verified_hashes().await?;
        let new_size = usize::try_from(request.new_size).unwrap_or(usize::MAX);
        if new_size > hashes.len() {
            return Err(AuditError::OutOfRange.into());
        }
        let old_size = usize::try_from(request.old_size).unwrap_or(usize::MAX);
        let proof = merkle::consistency_proof(&hashes[..new_size], old_size)
            .ok_or(AuditError::OutOfRange)?;
        Ok(Response::new(pb::GetConsistencyProofResponse {
            proof: proof.iter().map(hex::encode).collect(),
        }))
    }

    async fn query_events(
        &self,
        request: Request<pb::QueryEventsRequest>,
    ) -> Result<Response<pb::QueryEventsResponse>, Status> {
        let request = request.into_inner();
        let after: i64 = if request.page_token.is_empty() {
            0
        } else {
            request
                .page_token
                .parse()
                .map_err(|_| AuditError::PageTokenInvalid)?
        };
        let page_size = match u64::from(request.page_size) {
            0 => 100,
            size => size.min(MAX_PAGE),
        };
        let filter = EventFilter {
            recorded_from: non_empty(request.recorded_from),
            recorded_to: non_empty(request.recorded_to),
            actor: non_empty(request.actor),
            action: non_empty(request.action),
            resource: non_empty(request.resource),
        };
        let (rows, more) = query_events(&self.connection, &filter, after, page_size)
            .await
            .map_err(|error| AuditError::Storage(error.to_string()))?;
        let next_page_token = if more {
            rows.last()
                .map(|row| row.seq.to_string())
                .unwrap_or_default()
        } else {
            String::new()
        };
        let entries = rows
            .into_iter()
            .map(|row| pb::LedgerEntry {
                seq: u64::try_from(row.seq).unwrap_or(0),
                recorded_at: row.recorded_at,
                actor: row.actor,
                action: row.action,
                resource: row.resource,
                outcome: row.outcome,
                context_json: row.context,
                prev_hash: row.prev_hash,
                hash: row.hash,
            })
            .collect();
        Ok(Response::new(pb::QueryEventsResponse {
            entries,
            next_page_token,
        }))
    }

    type ExportLedgerStream =
        Pin<Box<dyn Stream<Item = Result<pb::ExportLedgerResponse, Status>> + Send>>;

    async fn export_ledger(
        &self,
        _request: Request<pb::ExportLedgerRequest>,
    ) -> Result<Response<Self::ExportLedgerStream>, Status> {
        let chunks = export_chunks(&self.connection, 256 * 1024)
            .await
            .map_err(|error| AuditError::Storage(error.to_string()))?;
        let stream = tokio_stream::iter(
            chunks
                .into_iter()
                .map(|lines| Ok(pb::ExportLedgerResponse { lines })),
        );
        Ok(Response::new(Box::pin(stream)))
    }
}
