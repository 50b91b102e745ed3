//! Streaming ingestion for PACS integrations: one large image in chunks (size enforced as the
//! bytes arrive, hashed as they do), and many images on one bidirectional stream with bounded
//! work in flight, so a fast sender is slowed by HTTP/2 flow control instead of buffered.

use std::sync::Arc;
use std::time::Instant;

use medai_proto::gateway::v1 as gw;
use medai_proto::gateway::v1::upload_image_request::Part;
use sha2::{Digest, Sha256};
use tokio::sync::{Semaphore, mpsc};
use tonic::{Status, Streaming};
use tracing::Instrument;

use crate::downstream::Downstream;
use crate::error::GatewayError;
use crate::infer::{InferInput, InferOutcome, infer};
use crate::token_auth::Caller;

/// Images of one study stream being validated, run or recorded at once.
pub const STUDY_IN_FLIGHT: usize = 4;
/// Finished answers waiting for a slow reader before work stops.
const STUDY_ANSWER_BUFFER: usize = 4;

/// What every prediction on these paths needs from the gateway.
#[derive(Clone)]
pub struct Ingest {
    pub downstream: Downstream,
    pub max_image_bytes: usize,
    pub default_model: String,
}

impl Ingest {
    pub async fn predict(
        &self,
        caller: &Caller,
        mut input: InferInput,
        correlation: &str,
        deadline: Option<Instant>,
    ) -> Result<InferOutcome, Status> {
        if input.model_name.is_empty() {
            input.model_name = self.default_model.clone();
        }
        infer(
            &self.downstream,
            caller,
            input,
            correlation,
            deadline,
            self.max_image_bytes,
        )
        .await
    }

    /// Reads an upload: the header, then chunks, refusing as soon as the bytes pass the limit
    /// or the declared size.
    pub async fn receive_upload(
        &self,
        mut upload: Streaming<gw::UploadImageRequest>,
    ) -> Result<InferInput, Status> {
        let header = match upload.message().await? {
            Some(gw::UploadImageRequest {
                part: Some(Part::Header(header)),
            }) => header,
            _ => return Err(GatewayError::UploadOutOfOrder.into()),
        };
        let limit = self.max_image_bytes as u64;
        if header.declared_size > limit {
            return Err(GatewayError::ImageTooLarge {
                actual: header.declared_size as usize,
                limit: self.max_image_bytes,
            }
            .into());
        }
        let allowed = if header.declared_size > 0 {
            header.declared_size
        } else {
            limit
        };
        let mut image = Vec::with_capacity(header.declared_size.min(limit) as usize);
        let mut hasher = Sha256::new();
        while let Some(message) = upload.message().await? {
            let Some(Part::Chunk(chunk)) = message.part else {
                return Err(GatewayError::UploadOutOfOrder.into());
            };
            let received = (image.len() + chunk.len()) as u64;
            if received > allowed {
                metrics::counter!("medai_gateway_uploads_refused_total", "reason" => "size")
                    .increment(1);
                return Err(GatewayError::ImageTooLarge {
                    actual: received as usize,
                    limit: allowed as usize,
                }
                .into());
            }
            hasher.update(&chunk);
            image.extend_from_slice(&chunk);
        }
        if header.declared_size > 0 && image.len() as u64 != header.declared_size {
            return Err(GatewayError::UploadIncomplete {
                received: image.len() as u64,
                declared: header.declared_size,
            }
            .into());
        }
        Ok(InferInput {
            image,
            format: header.format,
            model_name: header.model_name,
            model_version: header.model_version,
            idempotency_key: header.idempotency_key,
            image_sha256: Some(hex::encode(hasher.finalize())),
        })
    }

    /// Runs a study stream: reads the next image only when a slot is free, and frees the slot
    /// only when its answer has been taken by the outgoing stream.
    pub fn study(
        self,
        caller: Caller,
        mut inbound: Streaming<gw::StudyStreamRequest>,
        correlation: String,
    ) -> mpsc::Receiver<Result<gw::StudyStreamResponse, Status>> {
        let (answers, receiver) = mpsc::channel(STUDY_ANSWER_BUFFER);
        // The stream's work outlives the handler; it keeps the call's span (and so its
        // correlation id) on every log line.
        let span = tracing::Span::current();
        tokio::spawn(async move {
            let slots = Arc::new(Semaphore::new(STUDY_IN_FLIGHT));
            let mut index = 0u64;
            loop {
                let Ok(slot) = slots.clone().acquire_owned().await else {
                    break;
                };
                let message = match inbound.message().await {
                    Ok(Some(message)) => message,
                    Ok(None) => break,
                    Err(status) => {
                        tracing::info!(code = ?status.code(), "study stream ended by the client");
                        break;
                    }
                };
                index += 1;
                // Tags are the client's and may carry identifiers; logs get the index only.
                let image_correlation = format!("{correlation}.{index}");
                let ingest = self.clone();
                let caller = caller.clone();
                let answers = answers.clone();
                tokio::spawn(
                    async move {
                        let answer = ingest
                            .study_image(&caller, message, &image_correlation)
                            .await;
                        // Waits while the reader is slow; the slot stays taken until then.
                        let _ = answers.send(Ok(answer)).await;
                        drop(slot);
                    }
                    .in_current_span(),
                );
            }
            metrics::counter!("medai_gateway_study_streams_total").increment(1);
        }.instrument(span));
        receiver
    }

    async fn study_image(
        &self,
        caller: &Caller,
        message: gw::StudyStreamRequest,
        correlation: &str,
    ) -> gw::StudyStreamResponse {
        use gw::study_stream_response::Outcome;
        let tag = message.tag.clone();
        let outcome = if tag.is_empty() {
            Err(Status::from(GatewayError::TagMissing))
        } else {
            let input = InferInput {
                image: message.image,
                format: message.format,
                model_name: message.model_name,
                model_version: message.model_version,
                idempotency_key: message.idempotency_key,
                image_sha256: None,
            };
            self.predict(caller, input, correlation, None).await
        };
        gw::StudyStreamResponse {
            tag,
            outcome: Some(match outcome {
                Ok(outcome) => Outcome::Result(infer_response(outcome)),
                Err(status) => Outcome::Error(gw::ImageError {
                    code: status.code() as i32,
                    reason: medai_runtime::errors::reason_of(&status).unwrap_or_default(),
                    message: status.message().to_owned(),
                }),
            }),
        }
    }
}

pub fn infer_response(outcome: InferOutcome) -> gw::InferResponse {
    gw::InferResponse {
        result_id: outcome.result_id,
        prediction: Some(outcome.prediction),
        image_sha256: outcome.image_sha256,
        ledger_seq: outcome.ledger_seq,
        ledger_hash: outcome.ledger_hash,
        quality: outcome.quality,
        replayed: outcome.replayed,
    }
}
