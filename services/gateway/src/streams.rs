//! Streaming ingestion for PACS integrations: one large image in chunks (size enforced as the
//! bytes arrive, hashed as they do), and many images on one bidirectional stream with bounded
//! work in flight, so a fast sender is slowed by HTTP/2 flow control instead of buffered.

use std::collections::HashSet;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use medai_proto::gateway::v1 as gw;
use medai_proto::gateway::v1::upload_image_request::Part;
use sha2::{Digest, Sha256};
use tokio::sync::{Semaphore, mpsc};
use tonic::{Status, Streaming};
use tracing::Instrument;

use crate::downstream::Downstream;
use crate::error::GatewayError;
use crate::infer::{Delivered, Flights, InferInput, InferOutcome, infer};
use crate::load_control::MessageAdmission;
use crate::revocation_check::RevocationSource;
use crate::token_auth::Caller;
use crate::uploads::{PartialUploads, UploadTerms};
use medai_revocation::TokenFacts;
use medai_runtime::errors::reason_of;

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
    /// One running request per idempotency key.
    pub flights: Arc<Flights>,
    /// Consulted again for every image of a stream: a token revoked mid-stream stops it.
    pub revocations: Arc<RevocationSource>,
    /// Unfinished resumable uploads.
    pub uploads: Arc<PartialUploads>,
}

impl Ingest {
    /// One prediction answered by the call's own response (unary and upload calls).
    pub async fn predict(
        &self,
        caller: &Caller,
        input: InferInput,
        correlation: &str,
        deadline: Option<Instant>,
    ) -> Result<InferOutcome, Status> {
        let delivered = self
            .predict_handing_off(caller, input, correlation, deadline, || async {
                Ok::<(), Status>(())
            })
            .await?;
        Ok(delivered.outcome)
    }

    async fn predict_handing_off<T, H, F>(
        &self,
        caller: &Caller,
        mut input: InferInput,
        correlation: &str,
        deadline: Option<Instant>,
        hand_off: H,
    ) -> Result<Delivered<T>, Status>
    where
        H: FnOnce() -> F,
        F: Future<Output = Result<T, Status>>,
    {
        if input.model_name.is_empty() {
            input.model_name = self.default_model.clone();
        }
        infer(
            &self.downstream,
            &self.flights,
            caller,
            input,
            correlation,
            deadline,
            self.max_image_bytes,
            hand_off,
        )
        .await
    }

    /// The caller's token is still good for one more image: not expired, not revoked. (Its
    /// role is the token's; a role change reaches a running stream through revocation.)
    async fn still_authorised(&self, caller: &Caller) -> Result<(), GatewayError> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(u64::MAX, |since| since.as_secs());
        if caller.token_expires_at <= now {
            return Err(GatewayError::TokenExpired);
        }
        let facts = TokenFacts {
            jti: &caller.token_id,
            subject: &caller.subject,
            generation: caller.token_generation,
        };
        match self.revocations.is_revoked(facts).await {
            Ok(false) => Ok(()),
            Ok(true) => Err(GatewayError::TokenRevoked),
            Err(_) => Err(GatewayError::RevocationUnavailable),
        }
    }

    /// Reads an upload: the header, then chunks, refusing as soon as the bytes pass the limit
    /// or the declared size. With an upload id the bytes are held for a resume (see
    /// [`crate::uploads`]) until the whole image has arrived.
    pub async fn receive_upload(
        &self,
        caller: &Caller,
        mut upload: Streaming<gw::UploadImageRequest>,
    ) -> Result<InferInput, Status> {
        let header = match upload.message().await? {
            Some(gw::UploadImageRequest {
                part: Some(Part::Header(header)),
            }) => header,
            _ => return Err(GatewayError::UploadOutOfOrder.into()),
        };
        // It goes into the ledger: the correlation id's rules (length, characters) apply.
        let client_id = header.client_request_id.as_str();
        if !client_id.is_empty()
            && medai_runtime::correlation::accepted_or_new(Some(client_id)) != client_id
        {
            return Err(GatewayError::ClientRequestIdInvalid.into());
        }
        let limit = self.max_image_bytes as u64;
        if header.declared_size > limit {
            return Err(GatewayError::ImageTooLarge {
                actual: header.declared_size as usize,
                limit: self.max_image_bytes,
            }
            .into());
        }
        if !header.upload_id.is_empty() {
            return self.receive_resumable(caller, header, upload).await;
        }
        if header.offset != 0 {
            // An offset names a place in a held upload; without an id there is none.
            return Err(GatewayError::UploadUnknown.into());
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
            image: image.into(),
            format: header.format,
            model_name: header.model_name,
            model_version: header.model_version,
            idempotency_key: header.idempotency_key,
            image_sha256: Some(hex::encode(hasher.finalize())),
            client_request_id: header.client_request_id,
        })
    }

    /// A resumable upload: the chunks go into the caller's held upload as they arrive, so a
    /// stream that breaks (or is refused, or cancelled) leaves them for a resume at exactly
    /// that offset; the image is predicted once all declared bytes are there.
    async fn receive_resumable(
        &self,
        caller: &Caller,
        header: gw::UploadHeader,
        mut upload: Streaming<gw::UploadImageRequest>,
    ) -> Result<InferInput, Status> {
        let upload_id = header.upload_id.as_str();
        if medai_runtime::correlation::accepted_or_new(Some(upload_id)) != upload_id {
            return Err(GatewayError::UploadIdInvalid.into());
        }
        if header.declared_size == 0 {
            return Err(GatewayError::UploadSizeRequired.into());
        }
        let terms = UploadTerms {
            model_name: header.model_name.clone(),
            model_version: header.model_version.clone(),
            format: header.format,
            declared_size: header.declared_size,
            idempotency_key: header.idempotency_key.clone(),
        };
        let mut lease = self
            .uploads
            .open(&caller.subject, upload_id, header.offset, terms)?;
        if header.offset > 0 {
            metrics::counter!("medai_gateway_uploads_resumed_total").increment(1);
        }
        while let Some(message) = upload.message().await? {
            let Some(Part::Chunk(chunk)) = message.part else {
                return Err(GatewayError::UploadOutOfOrder.into());
            };
            let received = lease.received_bytes() + chunk.len() as u64;
            if received > header.declared_size {
                metrics::counter!("medai_gateway_uploads_refused_total", "reason" => "size")
                    .increment(1);
                return Err(GatewayError::ImageTooLarge {
                    actual: received as usize,
                    limit: header.declared_size as usize,
                }
                .into());
            }
            lease.append(&chunk)?;
        }
        if lease.received_bytes() != header.declared_size {
            // Held as it is: the client may resume it.
            return Err(GatewayError::UploadIncomplete {
                received: lease.received_bytes(),
                declared: header.declared_size,
            }
            .into());
        }
        let whole = lease.finish();
        // One upload id is one logical request: resumed or resent, one prediction, one record.
        let idempotency_key = if header.idempotency_key.is_empty() {
            format!("upload:{}", header.upload_id)
        } else {
            header.idempotency_key
        };
        Ok(InferInput {
            image: whole.bytes.into(),
            format: header.format,
            model_name: header.model_name,
            model_version: header.model_version,
            idempotency_key,
            image_sha256: Some(hex::encode(whole.hasher.finalize())),
            client_request_id: header.client_request_id,
        })
    }

    /// GetUploadStatus: what the gateway holds of the caller's upload.
    pub fn upload_status(
        &self,
        caller: &Caller,
        upload_id: &str,
    ) -> Result<gw::GetUploadStatusResponse, Status> {
        let status = self.uploads.status(&caller.subject, upload_id)?;
        Ok(gw::GetUploadStatusResponse {
            upload_id: upload_id.to_owned(),
            received_bytes: status.received_bytes,
            declared_size: status.declared_size,
            in_use: status.in_use,
            expires_in_seconds: u32::try_from(status.expires_in.as_secs()).unwrap_or(u32::MAX),
        })
    }

    /// Runs a study stream: reads the next image only when a slot is free, and frees the slot
    /// only when its answer has been taken by the outgoing stream. Each image is a call of its
    /// own for authorisation (the token is checked again), rate limits and the in-flight bound
    /// (`admission`); the call's deadline bounds the whole stream.
    pub fn study(
        self,
        caller: Caller,
        inbound: Streaming<gw::StudyStreamRequest>,
        correlation: String,
        deadline: Option<Instant>,
        admission: Option<MessageAdmission>,
    ) -> mpsc::Receiver<Result<gw::StudyStreamResponse, Status>> {
        let (answers, receiver) = mpsc::channel(STUDY_ANSWER_BUFFER);
        // The stream's work outlives the handler; it keeps the call's span (and so its
        // correlation id) on every log line.
        let span = tracing::Span::current();
        tokio::spawn(
            async move {
                let stream = StudyStream {
                    ingest: self,
                    caller,
                    correlation,
                    deadline,
                    admission,
                    answers,
                    slots: Arc::new(Semaphore::new(STUDY_IN_FLIGHT)),
                    tags_in_flight: Arc::default(),
                };
                stream.run(inbound).await;
                metrics::counter!("medai_gateway_study_streams_total").increment(1);
            }
            .instrument(span),
        );
        receiver
    }
}

/// How a study stream stopped reading images.
enum StreamEnd {
    /// The client finished sending.
    Finished,
    /// The client is gone; nothing more can be answered.
    ClientGone,
    /// The stream is refused from here on (deadline passed, token no longer good): the
    /// images in flight are answered, then the stream ends with this status.
    Refused(Status),
}

/// One study stream's state while it runs.
struct StudyStream {
    ingest: Ingest,
    caller: Caller,
    correlation: String,
    deadline: Option<Instant>,
    admission: Option<MessageAdmission>,
    answers: mpsc::Sender<Result<gw::StudyStreamResponse, Status>>,
    slots: Arc<Semaphore>,
    /// Answers are matched to images by tag, so one tag is in flight at most once.
    tags_in_flight: Arc<Mutex<HashSet<String>>>,
}

/// Waits for `work` until `deadline`; `None` once it passed.
async fn before<F: Future>(deadline: Option<Instant>, work: F) -> Option<F::Output> {
    match deadline {
        Some(at) => tokio::time::timeout_at(at.into(), work).await.ok(),
        None => Some(work.await),
    }
}

fn deadline_passed() -> Status {
    medai_runtime::errors::status_with_reason(
        medai_runtime::errors::ErrorKind::DeadlineExceeded,
        "medai.gateway",
        "DEADLINE_EXCEEDED",
        "the stream's deadline passed",
    )
}

impl StudyStream {
    async fn run(self, mut inbound: Streaming<gw::StudyStreamRequest>) {
        let end = self.read_images(&mut inbound).await;
        let StreamEnd::Refused(status) = end else {
            return;
        };
        // Every image in flight answers first (each is bounded by the deadline too).
        let all_slots = u32::try_from(STUDY_IN_FLIGHT).unwrap_or(u32::MAX);
        let _drained = self.slots.acquire_many(all_slots).await;
        let _ = self.answers.send(Err(status)).await;
    }

    async fn read_images(&self, inbound: &mut Streaming<gw::StudyStreamRequest>) -> StreamEnd {
        let mut index = 0u64;
        loop {
            let Some(slot) = before(self.deadline, self.slots.clone().acquire_owned()).await else {
                return StreamEnd::Refused(deadline_passed());
            };
            let Ok(slot) = slot else {
                return StreamEnd::ClientGone;
            };
            let message = match before(self.deadline, inbound.message()).await {
                None => return StreamEnd::Refused(deadline_passed()),
                Some(Ok(Some(message))) => message,
                Some(Ok(None)) => return StreamEnd::Finished,
                Some(Err(status)) => {
                    tracing::info!(code = ?status.code(), "study stream ended by the client");
                    return StreamEnd::ClientGone;
                }
            };
            index += 1;
            metrics::counter!("medai_gateway_study_images_total").increment(1);
            let tag = message.tag.clone();
            // The token is checked for every image, as a call of its own would be.
            if let Err(error) = self.ingest.still_authorised(&self.caller).await {
                tracing::info!(
                    reason = error_reason(&error),
                    image = index,
                    "study stream refused from here on"
                );
                let status = Status::from(error);
                self.answer_now(refusal(tag, &status)).await;
                return StreamEnd::Refused(status);
            }
            if tag.is_empty() {
                self.answer_now(refusal(tag, &GatewayError::TagMissing.into()))
                    .await;
                continue;
            }
            let fresh_tag = self
                .tags_in_flight
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert(tag.clone());
            if !fresh_tag {
                self.answer_now(refusal(tag, &GatewayError::TagInFlight.into()))
                    .await;
                continue;
            }
            let admitted = match &self.admission {
                Some(admission) => admission.admit().await.map(Some),
                None => Ok(None),
            };
            let place = match admitted {
                Ok(place) => place,
                Err(error) => {
                    self.forget_tag(&tag);
                    self.answer_now(refusal(tag, &error.into())).await;
                    continue;
                }
            };
            // Tags are the client's and may carry identifiers; logs get the index only.
            let image_correlation = format!("{}.{index}", self.correlation);
            let ingest = self.ingest.clone();
            let caller = self.caller.clone();
            let answers = self.answers.clone();
            let tags_in_flight = self.tags_in_flight.clone();
            let deadline = self.deadline;
            tokio::spawn(
                async move {
                    study_image(
                        &ingest,
                        &caller,
                        message,
                        &image_correlation,
                        deadline,
                        answers,
                    )
                    .await;
                    tags_in_flight
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .remove(&tag);
                    drop(place);
                    drop(slot);
                }
                .in_current_span(),
            );
        }
    }

    fn forget_tag(&self, tag: &str) {
        self.tags_in_flight
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(tag);
    }

    /// A refusal decided while reading: answered at once (waiting while the reader is slow).
    async fn answer_now(&self, answer: gw::StudyStreamResponse) {
        let _ = self.answers.send(Ok(answer)).await;
    }
}

fn error_reason(error: &GatewayError) -> &'static str {
    medai_runtime::errors::ServiceError::reason(error)
}

fn refusal(tag: String, status: &Status) -> gw::StudyStreamResponse {
    gw::StudyStreamResponse {
        tag,
        outcome: Some(gw::study_stream_response::Outcome::Error(image_error(
            status,
        ))),
    }
}

fn image_error(status: &Status) -> gw::ImageError {
    gw::ImageError {
        code: status.code() as i32,
        reason: medai_runtime::errors::reason_of(status).unwrap_or_default(),
        message: status.message().to_owned(),
    }
}

/// One image of a study stream, answered on the stream. A delivery is recorded only once the
/// answer's place in the response channel is reserved (so the client was still there and the
/// answer is handed to the transport right after the record); if the client is gone by then,
/// the prediction stays stored without a delivery record, and a resend with the same
/// idempotency key delivers it.
async fn study_image(
    ingest: &Ingest,
    caller: &Caller,
    message: gw::StudyStreamRequest,
    correlation: &str,
    deadline: Option<Instant>,
    answers: mpsc::Sender<Result<gw::StudyStreamResponse, Status>>,
) {
    use gw::study_stream_response::Outcome;
    let tag = message.tag.clone();
    let input = InferInput {
        image: message.image,
        format: message.format,
        model_name: message.model_name,
        model_version: message.model_version,
        idempotency_key: message.idempotency_key,
        image_sha256: None,
        client_request_id: String::new(),
    };
    let place = answers.clone();
    let hand_off = move || async move {
        place
            .reserve_owned()
            .await
            .map_err(|_| Status::from(GatewayError::CallerGone))
    };
    let delivered = ingest
        .predict_handing_off(caller, input, correlation, deadline, hand_off)
        .await;
    let (answer, reserved) = match delivered {
        Ok(delivered) => (
            gw::StudyStreamResponse {
                tag,
                outcome: Some(Outcome::Result(infer_response(delivered.outcome))),
            },
            delivered.handed_off,
        ),
        Err(status) if reason_of(&status).as_deref() == Some("CALLER_GONE") => {
            metrics::counter!("medai_gateway_study_answers_undelivered_total").increment(1);
            tracing::info!("study stream client gone; the prediction is stored, not delivered");
            return;
        }
        Err(status) => (refusal(tag, &status), None),
    };
    match reserved {
        Some(place) => {
            place.send(Ok(answer));
        }
        // Waits while the reader is slow; the slot stays taken until then.
        None => {
            let _ = answers.send(Ok(answer)).await;
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
        frame: outcome.frame,
    }
}
