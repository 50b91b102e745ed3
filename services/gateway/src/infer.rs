//! The one path a prediction takes: validate → infer → record in the ledger → answer.
//! No prediction leaves without its ledger record.

use std::time::{Duration, Instant};

use medai_proto::audit::v1::AppendRequest;
use medai_proto::inference::v1::{
    GetResultRequest, PredictRequest, PredictResponse, RecordDeliveryRequest, StoredResult,
};
use medai_proto::validation::v1::ValidateImageRequest;
use sha2::{Digest, Sha256};

use crate::downstream::Downstream;
use crate::error::{GatewayError, relay_downstream};
use crate::token_auth::Caller;

pub struct InferInput {
    pub image: Vec<u8>,
    pub format: i32,
    pub model_name: String,
    pub model_version: String,
    /// The client's key for this logical request; empty for none.
    pub idempotency_key: String,
    /// Already computed while the bytes arrived (uploads); computed here otherwise.
    pub image_sha256: Option<String>,
}

/// Longest idempotency key accepted from a client.
const MAX_IDEMPOTENCY_KEY: usize = 256;

pub struct InferOutcome {
    pub quality: Option<medai_proto::validation::v1::QualityReport>,
    pub result_id: String,
    pub prediction: PredictResponse,
    pub image_sha256: String,
    pub ledger_seq: u64,
    pub ledger_hash: String,
    /// The stored answer to an earlier request with the same idempotency key.
    pub replayed: bool,
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

pub async fn infer(
    downstream: &Downstream,
    caller: &Caller,
    input: InferInput,
    correlation_id: &str,
    deadline: Option<Instant>,
    max_image_bytes: usize,
) -> Result<InferOutcome, tonic::Status> {
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
    let time_left = || deadline.map(|at| at.saturating_duration_since(Instant::now()));
    let image_sha256 = input
        .image_sha256
        .clone()
        .unwrap_or_else(|| hex::encode(Sha256::digest(&input.image)));
    let result_id = uuid::Uuid::new_v4().to_string();
    let idempotency_key = if input.idempotency_key.is_empty() {
        String::new()
    } else {
        scoped_idempotency_key(&caller.subject, &input.idempotency_key)
    };
    if !idempotency_key.is_empty() {
        let stored = downstream
            .inference
            .clone()
            .get_result(downstream.request(
                GetResultRequest {
                    result_id: String::new(),
                    idempotency_key: idempotency_key.clone(),
                },
                correlation_id,
                time_left(),
            ))
            .await;
        match stored {
            Ok(found) => {
                let stored = found.into_inner().result.unwrap_or_default();
                return replay(
                    downstream,
                    caller,
                    prediction_of(&stored),
                    &stored.image_sha256,
                    &stored.patient_key,
                    correlation_id,
                    deadline,
                )
                .await;
            }
            Err(status) if status.code() == tonic::Code::NotFound => {}
            Err(status) => return Err(relay_downstream("inference", status)),
        }
    }

    let quality;
    let patient_key;
    let validated = downstream
        .validation
        .clone()
        .validate_image(downstream.request(
            ValidateImageRequest {
                image: input.image,
                format: input.format,
                model_name: input.model_name.clone(),
            },
            correlation_id,
            time_left(),
        ))
        .await;
    let canonical = match validated {
        Ok(response) => {
            let response = response.into_inner();
            quality = response.quality;
            patient_key = response
                .image
                .as_ref()
                .and_then(|image| image.metadata.as_ref())
                .map(|metadata| metadata.patient_key.clone())
                .unwrap_or_default();
            response.image
        }
        Err(status) => {
            record_refusal(
                downstream,
                caller,
                &result_id,
                correlation_id,
                &image_sha256,
                &status,
            )
            .await;
            return Err(relay_downstream("validation", status));
        }
    };

    let predicted = downstream
        .inference
        .clone()
        .predict(downstream.request(
            PredictRequest {
                model_name: input.model_name,
                model_version: input.model_version,
                image: canonical,
                result_id: result_id.clone(),
                image_sha256: image_sha256.clone(),
                patient_key: patient_key.clone(),
                idempotency_key,
            },
            correlation_id,
            time_left(),
        ))
        .await;
    let prediction = match predicted {
        // The same key arrived twice at once and the other request stored first.
        Ok(response) if response.get_ref().replayed => {
            let prediction = response.into_inner();
            return replay(
                downstream,
                caller,
                prediction,
                &image_sha256,
                &patient_key,
                correlation_id,
                deadline,
            )
            .await;
        }
        Ok(response) => response.into_inner(),
        Err(status) => {
            record_refusal(
                downstream,
                caller,
                &result_id,
                correlation_id,
                &image_sha256,
                &status,
            )
            .await;
            return Err(relay_downstream("inference", status));
        }
    };

    let (ledger_seq, ledger_hash) = record_delivery(
        downstream,
        caller,
        &prediction,
        &image_sha256,
        &patient_key,
        correlation_id,
        deadline,
    )
    .await?;
    Ok(InferOutcome {
        quality,
        result_id,
        prediction,
        image_sha256,
        ledger_seq,
        ledger_hash,
        replayed: false,
    })
}

/// The stored answer to a repeated key. Its delivery is recorded only if no earlier delivery
/// was (the first attempt may have failed to reach the ledger); otherwise nothing is written.
async fn replay(
    downstream: &Downstream,
    caller: &Caller,
    mut prediction: PredictResponse,
    image_sha256: &str,
    patient_key: &str,
    correlation_id: &str,
    deadline: Option<Instant>,
) -> Result<InferOutcome, tonic::Status> {
    prediction.replayed = true;
    let (ledger_seq, ledger_hash) = if prediction.ledger_seq > 0 {
        (prediction.ledger_seq, String::new())
    } else {
        record_delivery(
            downstream,
            caller,
            &prediction,
            image_sha256,
            patient_key,
            correlation_id,
            deadline,
        )
        .await?
    };
    metrics::counter!("medai_gateway_idempotent_replays_total").increment(1);
    Ok(InferOutcome {
        quality: None,
        result_id: prediction.result_id.clone(),
        image_sha256: image_sha256.to_owned(),
        prediction,
        ledger_seq,
        ledger_hash,
        replayed: true,
    })
}

/// Records a prediction's delivery in the ledger, then notes the entry on the stored result.
/// No prediction is answered without its ledger record; none is recorded once the caller's
/// deadline has passed, so no record claims a delivery the caller never got.
async fn record_delivery(
    downstream: &Downstream,
    caller: &Caller,
    prediction: &PredictResponse,
    image_sha256: &str,
    patient_key: &str,
    correlation_id: &str,
    deadline: Option<Instant>,
) -> Result<(u64, String), tonic::Status> {
    let result_id = prediction.result_id.as_str();
    if deadline.is_some_and(|at| at <= Instant::now()) {
        return Err(GatewayError::DeadlinePassed.into());
    }
    let time_left = deadline.map(|at| at.saturating_duration_since(Instant::now()));
    let context = serde_json::json!({
        "correlation_id": correlation_id,
        "image_sha256": image_sha256,
        "patient_key": patient_key,
        "model": prediction.model_name,
        "model_sha256": prediction.model_sha256,
        "model_version": prediction.model_version,
        "prediction_sha256": prediction_sha256(prediction),
        "top_label": prediction.top_label,
    });
    let append = AppendRequest {
        actor: format!("user:{}", caller.subject),
        action: "INFERENCE".to_owned(),
        resource: format!("result/{result_id}"),
        outcome: "SUCCESS".to_owned(),
        context_json: context.to_string(),
    };
    // The ledger gets its own bound: a prediction already computed deserves a full chance to
    // be recorded, but never an unbounded wait.
    let receipt = downstream
        .audit
        .clone()
        .append(downstream.request(append, correlation_id, time_left.map(|left| left.max(Duration::from_secs(1)))))
        .await
        .map_err(|status| {
            tracing::error!(code = ?status.code(), result_id = %result_id, "prediction not recorded; withholding it");
            metrics::counter!("medai_gateway_unrecorded_predictions_total").increment(1);
            tonic::Status::from(GatewayError::LedgerUnavailable)
        })?
        .into_inner();
    let noted = downstream
        .inference
        .clone()
        .record_delivery(downstream.request(
            RecordDeliveryRequest {
                result_id: result_id.to_owned(),
                ledger_seq: receipt.seq,
            },
            correlation_id,
            None,
        ))
        .await;
    if let Err(status) = noted {
        // The prediction is recorded and is answered; only the results view will miss it.
        tracing::error!(code = ?status.code(), result_id = %result_id, "delivery not noted on the stored result");
        metrics::counter!("medai_gateway_unnoted_deliveries_total").increment(1);
    }
    tracing::info!(result_id = %result_id, seq = receipt.seq, model = %prediction.model_name, "prediction delivered");
    Ok((receipt.seq, receipt.hash))
}

/// Refusals are recorded too, best effort: the caller's answer does not wait on it succeeding.
async fn record_refusal(
    downstream: &Downstream,
    caller: &Caller,
    result_id: &str,
    correlation_id: &str,
    image_sha256: &str,
    status: &tonic::Status,
) {
    let reason =
        medai_runtime::errors::reason_of(status).unwrap_or_else(|| format!("{:?}", status.code()));
    let context = serde_json::json!({
        "correlation_id": correlation_id,
        "image_sha256": image_sha256,
        "reason": reason,
    });
    let append = AppendRequest {
        actor: format!("user:{}", caller.subject),
        action: "INFERENCE".to_owned(),
        resource: format!("result/{result_id}"),
        outcome: "REFUSED".to_owned(),
        context_json: context.to_string(),
    };
    if let Err(error) = downstream
        .audit
        .clone()
        .append(downstream.request(append, correlation_id, None))
        .await
    {
        tracing::error!(code = ?error.code(), "refused inference could not be recorded");
    }
}
