//! The one path a prediction takes: validate → infer → record in the ledger → answer.
//! No prediction leaves without its ledger record.

use std::time::{Duration, Instant};

use medai_proto::audit::v1::AppendRequest;
use medai_proto::inference::v1::{PredictRequest, PredictResponse};
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
}

pub struct InferOutcome {
    pub quality: Option<medai_proto::validation::v1::QualityReport>,
    pub result_id: String,
    pub prediction: PredictResponse,
    pub image_sha256: String,
    pub ledger_seq: u64,
    pub ledger_hash: String,
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
    let time_left = || deadline.map(|at| at.saturating_duration_since(Instant::now()));
    let image_sha256 = hex::encode(Sha256::digest(&input.image));
    let result_id = uuid::Uuid::new_v4().to_string();

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
            },
            correlation_id,
            time_left(),
        ))
        .await;
    let prediction = match predicted {
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

    let context = serde_json::json!({
        "correlation_id": correlation_id,
        "image_sha256": image_sha256,
        "patient_key": patient_key,
        "model": prediction.model_name,
        "model_sha256": prediction.model_sha256,
        "model_version": prediction.model_version,
        "prediction_sha256": prediction_sha256(&prediction),
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
        .append(downstream.request(append, correlation_id, time_left().map(|left| left.max(Duration::from_secs(1)))))
        .await
        .map_err(|status| {
            tracing::error!(code = ?status.code(), result_id = %result_id, "prediction not recorded; withholding it");
            metrics::counter!("medai_gateway_unrecorded_predictions_total").increment(1);
            tonic::Status::from(GatewayError::LedgerUnavailable)
        })?
        .into_inner();
    tracing::info!(result_id = %result_id, seq = receipt.seq, model = %prediction.model_name, "prediction delivered");
    Ok(InferOutcome {
        quality,
        result_id,
        prediction,
        image_sha256,
        ledger_seq: receipt.seq,
        ledger_hash: receipt.hash,
    })
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
