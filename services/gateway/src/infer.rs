//! The one path a prediction takes: validate → infer → record in the ledger → answer.
//! No prediction leaves without its ledger record.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use medai_proto::audit::v1::{AppendRequest, QueryEventsRequest};
use medai_proto::inference::v1::inference_service_client::InferenceServiceClient;
use medai_proto::inference::v1::predict_then_store_response::Progress;
use medai_proto::inference::v1::{
    GetResultRequest, PredictRequest, PredictResponse, PredictThenStoreRequest,
    PredictThenStoreResponse, StoredResult,
};
use medai_proto::validation::v1::ValidateImageRequest;
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tracing::Instrument;

use crate::downstream::{Downstream, mesh_request};
use crate::error::{GatewayError, relay_downstream};
use crate::token_auth::Caller;

pub struct InferInput {
    pub image: bytes::Bytes,
    pub format: i32,
    pub model_name: String,
    pub model_version: String,
    /// The client's key for this logical request; empty for none.
    pub idempotency_key: String,
    /// Already computed while the bytes arrived (uploads); computed here otherwise.
    pub image_sha256: Option<String>,
    /// The client's own id for this request (uploads), kept in its delivery record; empty
    /// for none. Checked like a correlation id before it gets here.
    pub client_request_id: String,
}

/// Longest idempotency key accepted from a client.
const MAX_IDEMPOTENCY_KEY: usize = 256;

#[derive(Clone, Debug)]
pub struct InferOutcome {
    pub quality: Option<medai_proto::validation::v1::QualityReport>,
    pub result_id: String,
    pub prediction: PredictResponse,
    pub image_sha256: String,
    pub ledger_seq: u64,
    pub ledger_hash: String,
    /// The stored answer to an earlier request with the same idempotency key.
    pub replayed: bool,
    /// Which frame of a DICOM object was judged (absent for PNG/JPEG and on a replay).
    pub frame: Option<medai_proto::common::v1::JudgedFrame>,
}

/// The key the results store keeps: a hash of the user and the client's key, so one user's
/// key never answers another's request and the key itself (often a DICOM UID) is not stored.
pub fn scoped_idempotency_key(subject: &str, key: &str) -> String {
    let mut hasher = Sha256::new();
    hasher.update(b"medai-idempotency-v1\x00");
    hasher.update(subject.as_bytes());
    hasher.update(b"\x00");
    hasher.update(key.as_bytes());
    hex::encode(hasher.finalize())
}

/// Codes of the quality checks validation measured as failing: the image is still predicted
/// on (unless validation refuses it), and the prediction is flagged IMAGE_QUALITY.
fn failed_quality_checks(
    quality: Option<&medai_proto::validation::v1::QualityReport>,
) -> Vec<String> {
    quality
        .map(|report| {
            report
                .checks
                .iter()
                .filter(|check| check.verdict() == medai_proto::validation::v1::Verdict::Fail)
                .map(|check| check.code.clone())
                .collect()
        })
        .unwrap_or_default()
}

/// A stored result as a prediction answer.
pub fn prediction_of(result: &StoredResult) -> PredictResponse {
    PredictResponse {
        model_name: result.model_name.clone(),
        model_version: result.model_version.clone(),
        probabilities: result.probabilities.clone(),
        top_label: result.top_label.clone(),
        top_probability: result.confidence,
        intended_use: result.intended_use.clone(),
        model_sha256: result.model_sha256.clone(),
        result_id: result.result_id.clone(),
        decision_threshold: result.decision_threshold,
        decision: result.decision.clone(),
        latency_ms: result.latency_ms,
        replayed: true,
        ledger_seq: result.ledger_seq,
        uncertainty: result.uncertainty,
        unusual_case: result.unusual_case.clone(),
        route: result.route.clone(),
    }
}

/// SHA-256 over the fields of a prediction that a reviewer relies on, so the ledger binds the
/// exact answer that was delivered.
pub fn prediction_sha256(prediction: &PredictResponse) -> String {
    let mut hasher = Sha256::new();
    for part in [
        &prediction.model_name,
        &prediction.model_version,
        &prediction.model_sha256,
    ] {
        hasher.update((part.len() as u64).to_be_bytes());
        hasher.update(part.as_bytes());
    }
    for entry in &prediction.probabilities {
        hasher.update((entry.label.len() as u64).to_be_bytes());
        hasher.update(entry.label.as_bytes());
        hasher.update(entry.probability.to_be_bytes());
    }
    hex::encode(hasher.finalize())
}

/// One logical request per idempotency key in this gateway: the first request with a key
/// leads, requests with the same key that arrive while it runs follow, and get its answer as a
/// replay (no ledger record of their own) once it is delivered. If the leader ends without an
/// answer (refused, cancelled), a follower tries again itself. Across gateway replicas the
/// results store's unique key decides (see [`infer`]).
#[derive(Default)]
pub struct Flights {
    leaders: Mutex<HashMap<String, watch::Receiver<Option<InferOutcome>>>>,
}

enum Flight<'a> {
    Leader(Leader<'a>),
    Follower(watch::Receiver<Option<InferOutcome>>),
}

/// The running request for a key; dropping it, with or without an answer, frees the key.
struct Leader<'a> {
    flights: &'a Flights,
    key: String,
    answer: watch::Sender<Option<InferOutcome>>,
}

impl Flights {
    fn join(&self, key: &str) -> Flight<'_> {
        let mut leaders = self
            .leaders
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(leader) = leaders.get(key) {
            return Flight::Follower(leader.clone());
        }
        let (answer, watcher) = watch::channel(None);
        leaders.insert(key.to_owned(), watcher);
        Flight::Leader(Leader {
            flights: self,
            key: key.to_owned(),
            answer,
        })
    }

    /// Keys with a request running now.
    pub fn in_flight(&self) -> usize {
        self.leaders
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
    }
}

impl Leader<'_> {
    fn finish(self, outcome: &InferOutcome) {
        self.answer.send_replace(Some(outcome.clone()));
    }
}

impl Drop for Leader<'_> {
    fn drop(&mut self) {
        let mut leaders = self
            .flights
            .leaders
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if leaders
            .get(&self.key)
            .is_some_and(|watcher| watcher.same_channel(&self.answer.subscribe()))
        {
            leaders.remove(&self.key);
        }
    }
}

/// What a retry names, to be matched against what its key answered before: the same image
/// (by SHA-256), the same model, and the same version if the retry names one.
struct RetryFacts<'a> {
    image_sha256: &'a str,
    model_name: &'a str,
    model_version: &'a str,
}

impl RetryFacts<'_> {
    fn matches(&self, image_sha256: &str, model_name: &str, model_version: &str) -> bool {
        self.image_sha256 == image_sha256
            && self.model_name == model_name
            && (self.model_version.is_empty() || self.model_version == model_version)
    }
}

/// A prediction answered, and what the caller's hand-off gave back if the answer needed a
/// delivery record (see [`infer`]).
pub struct Delivered<T> {
    pub outcome: InferOutcome,
    pub handed_off: Option<T>,
}

/// The request's context on every step.
struct Call<'a> {
    downstream: &'a Downstream,
    caller: &'a Caller,
    correlation_id: &'a str,
    deadline: Option<Instant>,
    client_request_id: &'a str,
}

/// Validates, predicts, records and answers one image.
///
/// `hand_off` is called right before a delivery is recorded, and the record is written only
/// if it succeeds: a stream uses it to reserve the answer's place in its response channel, so
/// that no delivery is recorded for a client that is gone (the answer is then stored, not
/// delivered, and a resend with the same key delivers it). Answers that need no record (the
/// stored answer already delivered once) do not call it.
#[allow(clippy::too_many_arguments)]
pub async fn infer<T, H, F>(
    downstream: &Downstream,
    flights: &Flights,
    caller: &Caller,
    input: InferInput,
    correlation_id: &str,
    deadline: Option<Instant>,
    max_image_bytes: usize,
    hand_off: H,
) -> Result<Delivered<T>, tonic::Status>
where
    H: FnOnce() -> F,
    F: Future<Output = Result<T, tonic::Status>>,
{
    if input.image.len() > max_image_bytes {
        return Err(GatewayError::ImageTooLarge {
            actual: input.image.len(),
            limit: max_image_bytes,
        }
        .into());
    }
    if input.idempotency_key.len() > MAX_IDEMPOTENCY_KEY {
        return Err(GatewayError::IdempotencyKeyTooLong {
            limit: MAX_IDEMPOTENCY_KEY,
        }
        .into());
    }
    let client_request_id = input.client_request_id.clone();
    let call = Call {
        downstream,
        caller,
        correlation_id,
        deadline,
        client_request_id: &client_request_id,
    };
    let image_sha256 = input
        .image_sha256
        .clone()
        .unwrap_or_else(|| hex::encode(Sha256::digest(&input.image)));
    if input.idempotency_key.is_empty() {
        return run(&call, input, image_sha256, String::new(), hand_off).await;
    }
    let idempotency_key = scoped_idempotency_key(&caller.subject, &input.idempotency_key);
    let leader = loop {
        let mut leader_answer = match flights.join(&idempotency_key) {
            Flight::Leader(leader) => break leader,
            Flight::Follower(watcher) => watcher,
        };
        // The leader's answer, copied out so no borrow of the channel is held across awaits.
        let outcome: Option<InferOutcome> = {
            let waited = leader_answer.wait_for(Option::is_some);
            let answered = match deadline {
                Some(at) => tokio::time::timeout_at(at.into(), waited)
                    .await
                    .map_err(|_| tonic::Status::from(GatewayError::DeadlinePassed))?,
                None => waited.await,
            };
            // Err: the leader ended without an answer, and this request tries again.
            answered.map_or(None, |answer| answer.clone())
        };
        let Some(outcome) = outcome else { continue };
        let retry = RetryFacts {
            image_sha256: &image_sha256,
            model_name: &input.model_name,
            model_version: &input.model_version,
        };
        let prediction = &outcome.prediction;
        if !retry.matches(
            &outcome.image_sha256,
            &prediction.model_name,
            &prediction.model_version,
        ) {
            return Err(refuse_reused_key(&call, &image_sha256).await);
        }
        metrics::counter!("medai_gateway_idempotent_replays_total").increment(1);
        return Ok(Delivered {
            outcome: InferOutcome {
                quality: None,
                frame: None,
                replayed: true,
                prediction: PredictResponse {
                    replayed: true,
                    ..outcome.prediction
                },
                ..outcome
            },
            handed_off: None,
        });
    };
    let delivered = run(&call, input, image_sha256, idempotency_key, hand_off).await;
    if let Ok(delivered) = &delivered {
        leader.finish(&delivered.outcome);
    }
    delivered
}

/// Refuses a key reused for another request, and records the refusal.
async fn refuse_reused_key(call: &Call<'_>, image_sha256: &str) -> tonic::Status {
    let status = tonic::Status::from(GatewayError::IdempotencyKeyReused);
    metrics::counter!("medai_gateway_idempotency_key_reused_total").increment(1);
    let refused_id = uuid::Uuid::new_v4().to_string();
    record_refusal(
        call.downstream,
        call.caller,
        &refused_id,
        call.correlation_id,
        image_sha256,
        &status,
        None,
    )
    .await;
    status
}

async fn run<T, H, F>(
    call: &Call<'_>,
    input: InferInput,
    image_sha256: String,
    idempotency_key: String,
    hand_off: H,
) -> Result<Delivered<T>, tonic::Status>
where
    H: FnOnce() -> F,
    F: Future<Output = Result<T, tonic::Status>>,
{
    let Call {
        downstream,
        caller,
        correlation_id,
        deadline,
        ..
    } = *call;
    let time_left = || deadline.map(|at| at.saturating_duration_since(Instant::now()));
    let result_id = uuid::Uuid::new_v4().to_string();
    let retry = RetryFacts {
        image_sha256: &image_sha256,
        model_name: &input.model_name,
        model_version: &input.model_version,
    };
    if !idempotency_key.is_empty()
        && let Some(stored) =
            stored_for_key(downstream, &idempotency_key, correlation_id, time_left()).await?
    {
        if !retry.matches(
            &stored.image_sha256,
            &stored.model_name,
            &stored.model_version,
        ) {
            return Err(refuse_reused_key(call, &image_sha256).await);
        }
        return replay(
            call,
            prediction_of(&stored),
            &stored.image_sha256,
            &stored.patient_key,
            hand_off,
        )
        .await;
    }

    // Validation checks the full image and, when the model's input size is known, returns it
    // at that size: the model-sized image is all that crosses the next two hops (issue 14).
    let mut model_input = downstream
        .model_inputs
        .for_request(
            downstream,
            &input.model_name,
            &input.model_version,
            correlation_id,
            time_left(),
        )
        .await;
    let mut image = input.image;
    let (quality, patient_key, frame, prediction, row) = loop {
        // The bytes are kept while a resized image might have to be sent again in full.
        let sent = if model_input.is_some() {
            image.clone()
        } else {
            std::mem::take(&mut image)
        };
        let validated = downstream
            .validation
            .clone()
            .validate_image(downstream.request(
                ValidateImageRequest {
                    image: sent,
                    format: input.format,
                    model_name: input.model_name.clone(),
                    model_input_size: model_input,
                },
                correlation_id,
                time_left(),
            ))
            .await;
        let (quality, patient_key, frame, canonical) = match validated {
            Ok(response) => {
                let response = response.into_inner();
                let metadata = response
                    .image
                    .as_ref()
                    .and_then(|image| image.metadata.as_ref());
                let patient_key = metadata
                    .map(|metadata| metadata.patient_key.clone())
                    .unwrap_or_default();
                // The judged frame (DICOM) is the frame validation resized, if it resized.
                let frame = metadata.and_then(|metadata| metadata.frame.clone());
                (response.quality, patient_key, frame, response.image)
            }
            Err(status) => {
                record_refusal(
                    downstream,
                    caller,
                    &result_id,
                    correlation_id,
                    &image_sha256,
                    &status,
                    None,
                )
                .await;
                return Err(relay_downstream("validation", status));
            }
        };

        let predicted = predict(
            downstream,
            PredictRequest {
                model_name: input.model_name.clone(),
                model_version: input.model_version.clone(),
                image: canonical,
                result_id: result_id.clone(),
                image_sha256: image_sha256.clone(),
                patient_key: patient_key.clone(),
                idempotency_key: idempotency_key.clone(),
                quality_findings: failed_quality_checks(quality.as_ref()),
            },
            correlation_id,
            time_left(),
        )
        .await;
        match predicted {
            // Another gateway replica stored the same key first: the store's unique key decided.
            // Its delivery is being recorded there; this request answers with that record once
            // it is noted, and records one itself only if none is noted in time.
            Ok((mut prediction, _)) if prediction.replayed => {
                if prediction.ledger_seq == 0 {
                    prediction.ledger_seq =
                        noted_delivery(downstream, &idempotency_key, correlation_id, deadline)
                            .await;
                }
                return replay(call, prediction, &image_sha256, &patient_key, hand_off).await;
            }
            Ok((prediction, row)) => break (quality, patient_key, frame, prediction, row),
            // The version that took the request wants another size than the one looked up (a
            // lifecycle change in between): nothing was stored; the full image goes again.
            Err(status)
                if model_input.is_some()
                    && medai_runtime::errors::reason_of(&status).as_deref()
                        == Some("IMAGE_INCONSISTENT") =>
            {
                downstream.model_inputs.forget(&input.model_name);
                model_input = None;
            }
            Err(status) => {
                if medai_runtime::errors::reason_of(&status).as_deref()
                    == Some("IDEMPOTENCY_KEY_REUSED")
                {
                    return Err(refuse_reused_key(call, &image_sha256).await);
                }
                record_refusal(
                    downstream,
                    caller,
                    &result_id,
                    correlation_id,
                    &image_sha256,
                    &status,
                    None,
                )
                .await;
                return Err(relay_downstream("inference", status));
            }
        }
    };

    let handed_off = hand_off().await?;
    let (ledger_seq, ledger_hash) = match row {
        None => {
            record_delivery(
                call,
                &prediction,
                &image_sha256,
                &patient_key,
                frame.as_ref(),
                Noting::BesideTheAnswer,
            )
            .await?
        }
        Some(row) => {
            record_while_stored(
                call,
                &prediction,
                &image_sha256,
                &patient_key,
                frame.as_ref(),
                row,
            )
            .await?
        }
    };
    Ok(Delivered {
        outcome: InferOutcome {
            quality,
            result_id,
            prediction,
            image_sha256,
            ledger_seq,
            ledger_hash,
            replayed: false,
            frame,
        },
        handed_off: Some(handed_off),
    })
}

/// The result stored under a (scoped) key, if any.
async fn stored_for_key(
    downstream: &Downstream,
    idempotency_key: &str,
    correlation_id: &str,
    time_left: Option<Duration>,
) -> Result<Option<StoredResult>, tonic::Status> {
    let stored = downstream
        .inference
        .clone()
        .get_result(downstream.request(
            GetResultRequest {
                result_id: String::new(),
                idempotency_key: idempotency_key.to_owned(),
            },
            correlation_id,
            time_left,
        ))
        .await;
    match stored {
        Ok(found) => Ok(Some(found.into_inner().result.unwrap_or_default())),
        Err(status) if status.code() == tonic::Code::NotFound => Ok(None),
        Err(status) => Err(relay_downstream("inference", status)),
    }
}

/// How long a request that lost the race for its key waits for the winner's delivery record.
const WINNER_RECORD_WAIT: Duration = Duration::from_secs(5);
const WINNER_RECORD_POLL: Duration = Duration::from_millis(50);

/// The winner's delivery record as noted on the stored result, waited for until the caller's
/// deadline or [`WINNER_RECORD_WAIT`]; 0 if none was noted by then (the winner failed or its
/// caller went away), and this request then records the delivery itself.
async fn noted_delivery(
    downstream: &Downstream,
    idempotency_key: &str,
    correlation_id: &str,
    deadline: Option<Instant>,
) -> u64 {
    let bound = Instant::now() + WINNER_RECORD_WAIT;
    let until = deadline.map_or(bound, |at| at.min(bound));
    loop {
        let time_left = until.saturating_duration_since(Instant::now());
        if let Ok(Some(stored)) =
            stored_for_key(downstream, idempotency_key, correlation_id, Some(time_left)).await
            && stored.ledger_seq > 0
        {
            return stored.ledger_seq;
        }
        if Instant::now() + WINNER_RECORD_POLL >= until {
            return 0;
        }
        tokio::time::sleep(WINNER_RECORD_POLL).await;
    }
}

/// The stored answer to a repeated key. Its delivery is recorded only if no earlier delivery
/// was (the first attempt may have failed to reach the ledger, or its caller went away before
/// the answer was handed over); otherwise nothing is written.
async fn replay<T, H, F>(
    call: &Call<'_>,
    mut prediction: PredictResponse,
    image_sha256: &str,
    patient_key: &str,
    hand_off: H,
) -> Result<Delivered<T>, tonic::Status>
where
    H: FnOnce() -> F,
    F: Future<Output = Result<T, tonic::Status>>,
{
    prediction.replayed = true;
    let (ledger_seq, ledger_hash, handed_off) = if prediction.ledger_seq > 0 {
        (prediction.ledger_seq, String::new(), None)
    } else if let Some((seq, hash)) = recorded_before(call, &prediction.result_id).await? {
        // The first attempt's record reached the ledger but its note on the stored result was
        // never written (the gateway died first) or is still being written: that record is the
        // delivery's, noted now, and none is added.
        note_delivery(
            call.downstream,
            call.correlation_id,
            &prediction.result_id,
            seq,
        )
        .await;
        (seq, hash, None)
    } else {
        let handed_off = hand_off().await?;
        // A recovery path: its note is written before the answer, as the stored result's
        // state is what the caller comes back to.
        let (seq, hash) = record_delivery(
            call,
            &prediction,
            image_sha256,
            patient_key,
            None,
            Noting::BeforeTheAnswer,
        )
        .await?;
        (seq, hash, Some(handed_off))
    };
    metrics::counter!("medai_gateway_idempotent_replays_total").increment(1);
    Ok(Delivered {
        outcome: InferOutcome {
            quality: None,
            result_id: prediction.result_id.clone(),
            image_sha256: image_sha256.to_owned(),
            prediction,
            ledger_seq,
            ledger_hash,
            replayed: true,
            frame: None,
        },
        handed_off,
    })
}

/// When a delivery's ledger entry is noted on its stored result.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Noting {
    /// The answer waits for the note.
    BeforeTheAnswer,
    /// The note is written while the answer leaves (issue 14): the result is stored and the
    /// ledger record durable before the answer either way, and the note is an index of that
    /// record; reads on this gateway wait for it, and a note lost with the process is made
    /// from the ledger when the result is read or replayed.
    BesideTheAnswer,
}

/// Appends a prediction's delivery record to the ledger (the INFERENCE entry) and answers its
/// seq and hash once it is durable; none is appended once the caller's deadline has passed.
async fn append_delivery(
    call: &Call<'_>,
    prediction: &PredictResponse,
    image_sha256: &str,
    patient_key: &str,
    frame: Option<&medai_proto::common::v1::JudgedFrame>,
) -> Result<(u64, String), tonic::Status> {
    let Call {
        downstream,
        caller,
        correlation_id,
        deadline,
        client_request_id,
    } = *call;
    let result_id = prediction.result_id.as_str();
    if deadline.is_some_and(|at| at <= Instant::now()) {
        return Err(GatewayError::DeadlinePassed.into());
    }
    let time_left = deadline.map(|at| at.saturating_duration_since(Instant::now()));
    let mut context = serde_json::json!({
        "correlation_id": correlation_id,
        "image_sha256": image_sha256,
        "patient_key": patient_key,
        "model": prediction.model_name,
        "model_sha256": prediction.model_sha256,
        "model_version": prediction.model_version,
        "prediction_sha256": prediction_sha256(prediction),
        "top_label": prediction.top_label,
    });
    decision_trail(&mut context, prediction);
    if let Some(frame) = frame {
        context["frame_number"] = frame.frame_number.into();
        context["number_of_frames"] = frame.number_of_frames.into();
        context["frame_policy"] = frame.policy.clone().into();
    }
    if !client_request_id.is_empty() {
        context["client_request_id"] = client_request_id.into();
    }
    let append = AppendRequest {
        actor: format!("user:{}", caller.subject),
        action: "INFERENCE".to_owned(),
        resource: format!("result/{result_id}"),
        outcome: "SUCCESS".to_owned(),
        context_json: context.to_string(),
    };
    // The ledger gets its own bound: a prediction already computed deserves a full chance to
    // be recorded, but never an unbounded wait.
    // Through the batching client: concurrent predictions' records share one AppendBatch, and
    // each is answered only once its own event is durable.
    let receipt = downstream
        .record(append, time_left.map(|left| left.max(Duration::from_secs(1))))
        .instrument(tracing::info_span!("gateway.ledger_append_wait"))
        .await
        .map_err(|status| {
            tracing::error!(code = ?status.code(), result_id = %result_id, "prediction not recorded; withholding it");
            metrics::counter!("medai_gateway_unrecorded_predictions_total").increment(1);
            tonic::Status::from(GatewayError::LedgerUnavailable)
        })?;
    Ok((receipt.seq, receipt.hash))
}

/// Records a prediction's delivery in the ledger, then notes the entry on the stored result.
/// No prediction is answered without its ledger record; none is recorded once the caller's
/// deadline has passed, so no record claims a delivery the caller never got. `frame` names the
/// frame of a DICOM object the model judged, under which policy (issue 15).
async fn record_delivery(
    call: &Call<'_>,
    prediction: &PredictResponse,
    image_sha256: &str,
    patient_key: &str,
    frame: Option<&medai_proto::common::v1::JudgedFrame>,
    noting: Noting,
) -> Result<(u64, String), tonic::Status> {
    let (seq, hash) = append_delivery(call, prediction, image_sha256, patient_key, frame).await?;
    note(call, prediction, seq, noting).await;
    Ok((seq, hash))
}

/// Notes a recorded delivery on its stored result, as `noting` says.
async fn note(call: &Call<'_>, prediction: &PredictResponse, seq: u64, noting: Noting) {
    let result_id = prediction.result_id.as_str();
    match noting {
        Noting::BeforeTheAnswer => {
            note_delivery(call.downstream, call.correlation_id, result_id, seq).await;
        }
        Noting::BesideTheAnswer => {
            note_beside_the_answer(call.downstream, call.correlation_id, result_id, seq);
        }
    }
    tracing::info!(result_id = %result_id, seq, model = %prediction.model_name, "prediction delivered");
}

/// A prediction's delivery recorded in the ledger while its row commits (issue 14: the two
/// durable commits overlap instead of following each other). The answer waits for both: it
/// leaves only once the row is stored and the ledger record durable (record first). The note
/// of the delivery is started once both are, as the serial path does.
///
/// If the row's commit fails after the record was made, the caller gets the store's error and
/// the ledger a second entry for the result, REFUSED with the store's reason and the seq of
/// the record it contradicts (`undelivered_seq`): the prediction was recorded but was never
/// delivered. If the record fails, the caller gets LEDGER_UNAVAILABLE, as on the serial path
/// (the row is kept without a delivery, as when the record fails after the row's commit).
async fn record_while_stored(
    call: &Call<'_>,
    prediction: &PredictResponse,
    image_sha256: &str,
    patient_key: &str,
    frame: Option<&medai_proto::common::v1::JudgedFrame>,
    row: tonic::Streaming<PredictThenStoreResponse>,
) -> Result<(u64, String), tonic::Status> {
    // The stream's messages are not bounded by the call's timeout (only its start is).
    let bound = call.downstream.time_bound(
        call.deadline
            .map(|at| at.saturating_duration_since(Instant::now())),
    );
    let stored = async {
        tokio::time::timeout(bound, row_stored(row))
            .await
            .unwrap_or_else(|_| {
                Err(tonic::Status::deadline_exceeded(
                    "the result's commit was not confirmed in time",
                ))
            })
    };
    let (recorded, stored) = tokio::join!(
        append_delivery(call, prediction, image_sha256, patient_key, frame),
        stored.instrument(tracing::info_span!("gateway.result_commit_wait")),
    );
    match (recorded, stored) {
        (Ok((seq, hash)), Ok(())) => {
            note(call, prediction, seq, Noting::BesideTheAnswer).await;
            Ok((seq, hash))
        }
        (recorded, Err(status)) => {
            let undelivered_seq = recorded.as_ref().ok().map(|(seq, _)| *seq);
            tracing::error!(code = ?status.code(), result_id = %prediction.result_id, ?undelivered_seq, "result not stored; withholding the prediction");
            metrics::counter!("medai_gateway_unstored_predictions_total").increment(1);
            record_refusal(
                call.downstream,
                call.caller,
                &prediction.result_id,
                call.correlation_id,
                image_sha256,
                &status,
                undelivered_seq,
            )
            .await;
            Err(relay_downstream("inference", status))
        }
        (Err(status), Ok(())) => Err(status),
    }
}

/// The rest of a PredictThenStore stream once its prediction is read: the row's outcome.
type RowOutcome = tonic::Streaming<PredictThenStoreResponse>;

/// Waits for the row's outcome on a PredictThenStore stream: Ok once it is committed.
async fn row_stored(
    mut row: tonic::Streaming<PredictThenStoreResponse>,
) -> Result<(), tonic::Status> {
    match row.message().await? {
        Some(PredictThenStoreResponse {
            progress: Some(Progress::Stored(_)),
        }) => {
            // Read to its end (the trailers), so the call ends as answered, not cancelled.
            if let Err(status) = row.message().await {
                tracing::warn!(code = ?status.code(), "the stream ended with an error after `stored`");
            }
            Ok(())
        }
        _ => Err(tonic::Status::internal(
            "the stream ended without the result's commit",
        )),
    }
}

/// How long the gateway keeps sending predictions through Predict after inference answered that
/// it does not serve PredictThenStore (an inference older than the method). Then one prediction
/// tries the stream again: during a rolling upgrade (the gateway first, inference after) an
/// upgraded inference is used again within this time, and an old one costs one refused call
/// (answered through Predict) per this time.
pub const PREDICT_THEN_STORE_RECHECK: Duration = Duration::from_secs(60);

/// Whether the inference a gateway calls serves PredictThenStore, as last found. Kept with the
/// gateway's clients ([`Downstream::predict_then_store`]), so each gateway finds out for itself
/// and finds out again after [`PREDICT_THEN_STORE_RECHECK`].
#[derive(Debug)]
pub struct PredictThenStoreSupport {
    /// When inference last answered that it does not serve the stream (or when a prediction
    /// last set out to check again); `None` while it is not known not to serve it.
    not_served_since: Mutex<Option<Instant>>,
    recheck_after: Duration,
}

impl PredictThenStoreSupport {
    pub fn new(recheck_after: Duration) -> Self {
        Self {
            not_served_since: Mutex::new(None),
            recheck_after,
        }
    }

    /// Whether a prediction made at `now` tries the stream. Once the re-check time has passed,
    /// the first prediction to ask tries it and the time starts again, so predictions made
    /// meanwhile keep to Predict rather than all being refused at once.
    fn try_stream(&self, now: Instant) -> bool {
        let mut since = self
            .not_served_since
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match *since {
            None => true,
            Some(at) if now.saturating_duration_since(at) >= self.recheck_after => {
                *since = Some(now);
                true
            }
            Some(_) => false,
        }
    }

    fn served(&self) {
        *self
            .not_served_since
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
    }

    fn not_served(&self, now: Instant) {
        *self
            .not_served_since
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(now);
    }

    /// Moves what was found `by` into the past, as if that much time had gone by.
    #[cfg(test)]
    fn backdate(&self, by: Duration) {
        let mut since = self
            .not_served_since
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *since = since.map(|at| at - by);
    }
}

impl Default for PredictThenStoreSupport {
    fn default() -> Self {
        Self::new(PREDICT_THEN_STORE_RECHECK)
    }
}

/// Whether `status` says the callee does not serve the method: UNIMPLEMENTED, or the peer
/// policy of a service older than the method (it names only the methods it serves).
fn not_served(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::Unimplemented
        || (status.code() == tonic::Code::PermissionDenied
            && medai_runtime::errors::reason_of(status).as_deref() == Some("PEER_NOT_ALLOWED"))
}

/// Asks inference for a prediction. Without an idempotency key, through PredictThenStore: the
/// prediction comes back as soon as the model has answered and its row is handed to the
/// results writer, with the stream that tells the row's commit (see [`record_while_stored`]).
/// With a key (a replay is known only after the commit), or from an inference without it,
/// through Predict, which answers after the commit (no stream).
async fn predict(
    downstream: &Downstream,
    request: PredictRequest,
    correlation_id: &str,
    time_left: Option<Duration>,
) -> Result<(PredictResponse, Option<RowOutcome>), tonic::Status> {
    predict_through(
        downstream.inference.clone(),
        &downstream.predict_then_store,
        request,
        correlation_id,
        downstream.time_bound(time_left),
    )
    .await
}

/// [`predict`] through any inference client (tests stand up a fake inference). Each method is
/// called at most once: PredictThenStore if it is tried, then Predict only if the stream was
/// not served (the same request, sent again) or not tried.
async fn predict_through<T>(
    mut inference: InferenceServiceClient<T>,
    support: &PredictThenStoreSupport,
    request: PredictRequest,
    correlation_id: &str,
    timeout: Duration,
) -> Result<(PredictResponse, Option<RowOutcome>), tonic::Status>
where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::Error: Into<tonic::codegen::StdError>,
    T::ResponseBody: tonic::codegen::Body<Data = bytes::Bytes> + Send + 'static,
    <T::ResponseBody as tonic::codegen::Body>::Error: Into<tonic::codegen::StdError> + Send,
{
    let request = if request.idempotency_key.is_empty() && support.try_stream(Instant::now()) {
        // Kept to send again through Predict should this inference (or this replica of it,
        // during a rolling upgrade) not serve the stream. The pixels are shared, not copied.
        let again = request.clone();
        let streamed = inference
            .predict_then_store(mesh_request(
                PredictThenStoreRequest {
                    request: Some(request),
                },
                correlation_id,
                timeout,
            ))
            .await;
        match streamed {
            Err(status) if not_served(&status) => {
                support.not_served(Instant::now());
                tracing::warn!(
                    code = ?status.code(),
                    "inference does not serve PredictThenStore; using Predict"
                );
                again
            }
            Err(status) => return Err(status),
            Ok(response) => {
                support.served();
                let mut row = response.into_inner();
                return match row.message().await? {
                    Some(PredictThenStoreResponse {
                        progress: Some(Progress::Prediction(prediction)),
                    }) => Ok((prediction, Some(row))),
                    _ => Err(tonic::Status::internal(
                        "the stream ended without the prediction",
                    )),
                };
            }
        }
    } else {
        request
    };
    let answered = inference
        .predict(mesh_request(request, correlation_id, timeout))
        .await?;
    Ok((answered.into_inner(), None))
}

/// Starts the note of a delivery without waiting for it; the gateway's reads of results wait
/// for it (see [`crate::delivery_notes`]). Its span follows from the prediction's rather than
/// being its child, so the prediction's span ends when the answer leaves. A listing that found
/// a delivery only in the ledger notes it this way too.
pub(crate) fn note_beside_the_answer(
    downstream: &Downstream,
    correlation_id: &str,
    result_id: &str,
    ledger_seq: u64,
) {
    let ticket = downstream.notes.begin();
    let downstream = downstream.clone();
    let correlation_id = correlation_id.to_owned();
    let result_id = result_id.to_owned();
    let span = tracing::info_span!(parent: None, "gateway.delivery_note", correlation_id = %correlation_id);
    span.follows_from(tracing::Span::current());
    tokio::spawn(
        async move {
            note_delivery(&downstream, &correlation_id, &result_id, ledger_seq).await;
            drop(ticket);
        }
        .instrument(span),
    );
}

/// Notes a delivery's ledger entry on the stored result (what a replay and the results views
/// look at first).
pub(crate) async fn note_delivery(
    downstream: &Downstream,
    correlation_id: &str,
    result_id: &str,
    ledger_seq: u64,
) {
    // Through the coalescing client: concurrent notes share one RecordDeliveries call.
    let noted = downstream
        .notes
        .write(
            &downstream.inference,
            downstream.timeout,
            correlation_id,
            result_id,
            ledger_seq,
        )
        .await;
    if let Err(status) = noted {
        // The prediction is recorded and is answered; only the results view will miss it.
        tracing::error!(code = ?status.code(), result_id = %result_id, "delivery not noted on the stored result");
        metrics::counter!("medai_gateway_unnoted_deliveries_total").increment(1);
    }
}

/// The ledger's record of an earlier delivery of `result_id` that was never noted on the
/// stored result (a gateway killed between the two writes). Looked up before a replay records
/// a delivery, so a crash there cannot leave two INFERENCE records for one result. A ledger
/// that cannot be asked withholds the answer, as one that cannot record does.
async fn recorded_before(
    call: &Call<'_>,
    result_id: &str,
) -> Result<Option<(u64, String)>, tonic::Status> {
    delivery_in_ledger(call.downstream, call.correlation_id, result_id).await
}

/// The ledger's record of the delivery of `result_id` (its seq and hash), if any.
pub(crate) async fn delivery_in_ledger(
    downstream: &Downstream,
    correlation_id: &str,
    result_id: &str,
) -> Result<Option<(u64, String)>, tonic::Status> {
    let found = downstream
        .audit
        .clone()
        .query_events(downstream.request(
            QueryEventsRequest {
                action: "INFERENCE".to_owned(),
                resource: format!("result/{result_id}"),
                page_size: 10,
                ..Default::default()
            },
            correlation_id,
            Some(Duration::from_secs(5)),
        ))
        .await
        .map_err(|status| {
            tracing::error!(code = ?status.code(), result_id = %result_id, "earlier delivery cannot be looked up in the ledger; withholding the answer");
            tonic::Status::from(GatewayError::LedgerUnavailable)
        })?
        .into_inner();
    Ok(found
        .entries
        .into_iter()
        .find(|entry| entry.outcome == "SUCCESS")
        .map(|entry| (entry.seq, entry.hash)))
}

/// The decision audit trail of a delivery (issue 18): the threshold and decision, the
/// uncertainty figures and the unusual-case flag with its reasons, beside the model version.
fn decision_trail(context: &mut serde_json::Value, prediction: &PredictResponse) {
    context["decision"] = prediction.decision.clone().into();
    // Which role of the model answered (ACTIVE or CANARY), as the result's content hash binds.
    context["route"] = prediction.route.clone().into();
    context["decision_threshold"] = f64::from(prediction.decision_threshold).into();
    if let Some(figures) = &prediction.uncertainty {
        context["normalized_entropy"] = f64::from(figures.normalized_entropy).into();
        context["top2_margin"] = f64::from(figures.top2_margin).into();
        context["temperature"] = f64::from(figures.temperature).into();
        context["ood_score"] = f64::from(figures.ood_score).into();
        if let Some(band) = &figures.confidence_band {
            context["confidence_band"] =
                serde_json::json!([f64::from(band.lower), f64::from(band.upper)]);
        }
    }
    if let Some(flag) = &prediction.unusual_case {
        context["unusual_case"] = flag.flagged.into();
        context["unusual_case_reasons"] = flag.reasons.clone().into();
    }
}

/// Refusals are recorded too, best effort: the caller's answer does not wait on it succeeding.
/// `undelivered_seq` names the result's INFERENCE record when one was made before the refusal.
async fn record_refusal(
    downstream: &Downstream,
    caller: &Caller,
    result_id: &str,
    correlation_id: &str,
    image_sha256: &str,
    status: &tonic::Status,
    undelivered_seq: Option<u64>,
) {
    let reason =
        medai_runtime::errors::reason_of(status).unwrap_or_else(|| format!("{:?}", status.code()));
    let mut context = serde_json::json!({
        "correlation_id": correlation_id,
        "image_sha256": image_sha256,
        "reason": reason,
    });
    // The seq of this result's INFERENCE record, made before the refusal was known: the
    // prediction it records was not delivered.
    if let Some(seq) = undelivered_seq {
        context["undelivered_seq"] = seq.into();
    }
    let append = AppendRequest {
        actor: format!("user:{}", caller.subject),
        action: "INFERENCE".to_owned(),
        resource: format!("result/{result_id}"),
        outcome: "REFUSED".to_owned(),
        context_json: context.to_string(),
    };
    if let Err(error) = downstream
        .record(append, None)
        .instrument(tracing::info_span!("gateway.ledger_append_wait"))
        .await
    {
        tracing::error!(code = ?error.code(), "refused inference could not be recorded");
    }
}

#[cfg(test)]
mod tests {
    //! The fallback from PredictThenStore to Predict, against a fake inference served by tonic
    //! over TCP: what an inference older than the stream answers (UNIMPLEMENTED, or its peer
    //! policy's PEER_NOT_ALLOWED), then what it answers once upgraded.
    use std::pin::Pin;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    use medai_proto::inference::v1 as pb;
    use medai_proto::inference::v1::inference_service_server::{
        InferenceService, InferenceServiceServer,
    };
    use medai_runtime::errors::{ErrorKind, status_with_reason};
    use tonic::{Request, Response, Status};

    use super::*;

    /// How the fake refuses PredictThenStore while it is "old".
    #[derive(Clone, Copy, Debug)]
    enum Refusal {
        Unimplemented,
        PeerNotAllowed,
        /// Not a "not served" answer: returned to the caller as it is.
        Unavailable,
    }

    #[derive(Debug)]
    struct Calls {
        refusal: Refusal,
        /// Whether PredictThenStore is served (an upgraded inference).
        upgraded: AtomicBool,
        streamed: AtomicUsize,
        predicted: AtomicUsize,
    }

    impl Calls {
        fn counts(&self) -> (usize, usize) {
            (
                self.streamed.load(Ordering::SeqCst),
                self.predicted.load(Ordering::SeqCst),
            )
        }
    }

    struct FakeInference(Arc<Calls>);

    fn answer(request: &PredictRequest) -> PredictResponse {
        PredictResponse {
            result_id: request.result_id.clone(),
            model_name: request.model_name.clone(),
            model_version: "1".to_owned(),
            ..PredictResponse::default()
        }
    }

    type ProgressStream =
        Pin<Box<dyn futures::Stream<Item = Result<PredictThenStoreResponse, Status>> + Send>>;

    impl FakeInference {
        fn predict(&self, request: &PredictRequest) -> Result<Response<PredictResponse>, Status> {
            self.0.predicted.fetch_add(1, Ordering::SeqCst);
            Ok(Response::new(answer(request)))
        }

        fn predict_then_store(
            &self,
            request: PredictThenStoreRequest,
        ) -> Result<Response<ProgressStream>, Status> {
            self.0.streamed.fetch_add(1, Ordering::SeqCst);
            if !self.0.upgraded.load(Ordering::SeqCst) {
                return Err(match self.0.refusal {
                    Refusal::Unimplemented => Status::unimplemented("not served"),
                    Refusal::PeerNotAllowed => status_with_reason(
                        ErrorKind::PermissionDenied,
                        "medai.mesh",
                        "PEER_NOT_ALLOWED",
                        "peer gateway may not call PredictThenStore",
                    ),
                    Refusal::Unavailable => Status::unavailable("draining"),
                });
            }
            let request = request.request.unwrap_or_default();
            let progress = [
                Progress::Prediction(answer(&request)),
                Progress::Stored(pb::ResultStored {
                    result_id: request.result_id,
                }),
            ]
            .map(|progress| {
                Ok(PredictThenStoreResponse {
                    progress: Some(progress),
                })
            });
            Ok(Response::new(Box::pin(futures::stream::iter(progress))))
        }
    }

    /// The fake's service: Predict and PredictThenStore as above, every other method refused.
    macro_rules! fake_inference {
        ($($method:ident($request:ident) -> $response:ident;)*) => {
            #[tonic::async_trait]
            impl InferenceService for FakeInference {
                type PredictThenStoreStream = ProgressStream;

                async fn predict(
                    &self,
                    request: Request<PredictRequest>,
                ) -> Result<Response<PredictResponse>, Status> {
                    FakeInference::predict(self, request.get_ref())
                }

                async fn predict_then_store(
                    &self,
                    request: Request<PredictThenStoreRequest>,
                ) -> Result<Response<ProgressStream>, Status> {
                    FakeInference::predict_then_store(self, request.into_inner())
                }

                $(async fn $method(
                    &self,
                    _: Request<pb::$request>,
                ) -> Result<Response<pb::$response>, Status> {
                    Err(Status::unimplemented(stringify!($method)))
                })*
            }
        };
    }

    fake_inference! {
        get_result(GetResultRequest) -> GetResultResponse;
        list_results(ListResultsRequest) -> ListResultsResponse;
        record_delivery(RecordDeliveryRequest) -> RecordDeliveryResponse;
        record_deliveries(RecordDeliveriesRequest) -> RecordDeliveriesResponse;
        sign_result(SignResultRequest) -> SignResultResponse;
        list_models(ListModelsRequest) -> ListModelsResponse;
        stage_model_version(StageModelVersionRequest) -> StageModelVersionResponse;
        activate_model_version(ActivateModelVersionRequest) -> ActivateModelVersionResponse;
        retire_model_version(RetireModelVersionRequest) -> RetireModelVersionResponse;
        rollback_model(RollbackModelRequest) -> RollbackModelResponse;
        explain_result(ExplainResultRequest) -> ExplainResultResponse;
        record_explanation(RecordExplanationRequest) -> RecordExplanationResponse;
        start_canary(StartCanaryRequest) -> StartCanaryResponse;
        promote_canary(PromoteCanaryRequest) -> PromoteCanaryResponse;
        abort_canary(AbortCanaryRequest) -> AbortCanaryResponse;
        start_shadow(StartShadowRequest) -> StartShadowResponse;
        stop_shadow(StopShadowRequest) -> StopShadowResponse;
        get_model_report(GetModelReportRequest) -> GetModelReportResponse;
    }

    /// Serves a fake inference on a free local port; its calls and a client to it.
    async fn fake_inference(
        refusal: Refusal,
    ) -> (
        Arc<Calls>,
        InferenceServiceClient<tonic::transport::Channel>,
    ) {
        let calls = Arc::new(Calls {
            refusal,
            upgraded: AtomicBool::new(false),
            streamed: AtomicUsize::new(0),
            predicted: AtomicUsize::new(0),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("address");
        let server = tonic::transport::Server::builder()
            .add_service(InferenceServiceServer::new(FakeInference(calls.clone())))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
        tokio::spawn(server);
        let channel = tonic::transport::Channel::from_shared(format!("http://{address}"))
            .expect("uri")
            .connect()
            .await
            .expect("connect");
        (calls, InferenceServiceClient::new(channel))
    }

    fn request(result_id: &str, idempotency_key: &str) -> PredictRequest {
        PredictRequest {
            model_name: "light".to_owned(),
            result_id: result_id.to_owned(),
            idempotency_key: idempotency_key.to_owned(),
            ..PredictRequest::default()
        }
    }

    const TIMEOUT: Duration = Duration::from_secs(10);

    #[tokio::test]
    async fn an_old_inference_is_asked_through_predict_until_the_recheck_finds_it_upgraded() {
        for refusal in [Refusal::Unimplemented, Refusal::PeerNotAllowed] {
            let (calls, client) = fake_inference(refusal).await;
            let support = PredictThenStoreSupport::new(PREDICT_THEN_STORE_RECHECK);
            let predict = |result_id: &str| {
                predict_through(
                    client.clone(),
                    &support,
                    request(result_id, ""),
                    "corr",
                    TIMEOUT,
                )
            };

            // The stream is refused as not served; the same request goes once through Predict.
            let (prediction, row) = predict("r1").await.expect("answered through Predict");
            assert_eq!(prediction.result_id, "r1", "{refusal:?}");
            assert!(row.is_none(), "{refusal:?}: Predict has no row stream");
            assert_eq!(calls.counts(), (1, 1), "{refusal:?}");

            // Within the re-check time: straight to Predict, even once inference is upgraded.
            predict("r2").await.expect("answered");
            assert_eq!(calls.counts(), (1, 2), "{refusal:?}");
            calls.upgraded.store(true, Ordering::SeqCst);
            support.backdate(PREDICT_THEN_STORE_RECHECK - Duration::from_secs(1));
            predict("r3").await.expect("answered");
            assert_eq!(calls.counts(), (1, 3), "{refusal:?}");

            // After it: the stream is tried again and, served, used (Predict is not asked).
            support.backdate(Duration::from_secs(1));
            let (prediction, row) = predict("r4").await.expect("answered through the stream");
            assert_eq!(prediction.result_id, "r4", "{refusal:?}");
            row_stored(row.expect("the row's stream"))
                .await
                .expect("stored");
            assert_eq!(calls.counts(), (2, 3), "{refusal:?}");
            predict("r5").await.expect("answered");
            assert_eq!(calls.counts(), (3, 3), "{refusal:?}");

            // A keyed request goes through Predict whatever is known.
            predict_through(
                client.clone(),
                &support,
                request("r6", "key"),
                "corr",
                TIMEOUT,
            )
            .await
            .expect("answered");
            assert_eq!(calls.counts(), (3, 4), "{refusal:?}");

            // An inference (or a replica of it) rolled back: the stream is refused once, the
            // request answered through Predict, and Predict used from then on.
            calls.upgraded.store(false, Ordering::SeqCst);
            let (prediction, row) = predict("r7").await.expect("answered through Predict");
            assert_eq!(prediction.result_id, "r7", "{refusal:?}");
            assert!(row.is_none());
            assert_eq!(calls.counts(), (4, 5), "{refusal:?}");
            predict("r8").await.expect("answered");
            assert_eq!(calls.counts(), (4, 6), "{refusal:?}");
        }
    }

    #[tokio::test]
    async fn a_refusal_that_is_not_not_served_is_returned_and_predict_is_not_asked() {
        let (calls, client) = fake_inference(Refusal::Unavailable).await;
        let support = PredictThenStoreSupport::new(PREDICT_THEN_STORE_RECHECK);
        for (attempt, result_id) in ["r1", "r2"].into_iter().enumerate() {
            let refused = predict_through(
                client.clone(),
                &support,
                request(result_id, ""),
                "corr",
                TIMEOUT,
            )
            .await
            .expect_err("refused");
            assert_eq!(refused.code(), tonic::Code::Unavailable);
            // Nothing was learnt: the next prediction tries the stream again.
            assert_eq!(calls.counts(), (attempt + 1, 0));
        }
    }

    #[test]
    fn each_gateway_finds_out_for_itself_and_one_prediction_rechecks_at_a_time() {
        let first = PredictThenStoreSupport::new(Duration::from_secs(60));
        let second = PredictThenStoreSupport::new(Duration::from_secs(60));
        let now = Instant::now();
        first.not_served(now);
        assert!(!first.try_stream(now + Duration::from_secs(59)));
        assert!(
            second.try_stream(now),
            "another gateway's finding is not shared"
        );
        let later = now + Duration::from_secs(60);
        assert!(first.try_stream(later), "re-checked after the time");
        assert!(
            !first.try_stream(later),
            "while one prediction re-checks, the others keep to Predict"
        );
        first.served();
        assert!(first.try_stream(later));
    }
}
