//! One prediction on a canonical image: pick the served version, prepare the image as its
//! manifest says, queue it for a batch, label the scores.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::batcher::ServedVersion;
use crate::decision_support::{
    InputDomain, Uncertainty, calibrate, uncertainty, unusual_case_reasons,
};
use crate::error::InferenceError;
use crate::preprocess::{ImageInput, is_light_preparation, to_input_tensor};
use crate::repository::ModelRepository;
use crate::results::{CONTENT_HASH_VERSION, PRELIMINARY, StoredResult, now_micros};
use crate::rollout::{RolloutFigures, Route};

pub const ABOVE_THRESHOLD: &str = "ABOVE_THRESHOLD";
pub const BELOW_THRESHOLD: &str = "BELOW_THRESHOLD";

#[derive(Clone, Debug, PartialEq)]
pub struct Prediction {
    pub model_name: String,
    pub model_version: String,
    pub model_sha256: String,
    pub intended_use: String,
    /// (label, probability) in the model's label order, calibrated with the manifest's
    /// temperature when it names one.
    pub probabilities: Vec<(String, f32)>,
    pub uncertainty: Uncertainty,
    /// Stable reasons the input is outside the model's domain; empty when it is not.
    pub unusual_case_reasons: Vec<String>,
    pub decision_threshold: f32,
    /// Queue plus compute.
    pub latency: Duration,
    pub batch_rows: usize,
    /// Which role of the model answered.
    pub route: Route,
}

impl Prediction {
    pub fn top(&self) -> Option<&(String, f32)> {
        self.probabilities.iter().max_by(|a, b| a.1.total_cmp(&b.1))
    }

    pub fn decision(&self) -> &'static str {
        match self.top() {
            Some((_, probability)) if *probability >= self.decision_threshold => ABOVE_THRESHOLD,
            _ => BELOW_THRESHOLD,
        }
    }
}

impl Prediction {
    /// The results-store row of this prediction (its content hash is computed on insert).
    pub fn to_row(
        &self,
        result_id: String,
        image_sha256: &str,
        patient_key: &str,
        idempotency_key: Option<String>,
    ) -> Result<StoredResult, InferenceError> {
        let (top_label, confidence) = self.top().cloned().unwrap_or_default();
        let probabilities_json =
            serde_json::to_string(&self.probabilities).map_err(|_| InferenceError::Store)?;
        Ok(StoredResult {
            result_id,
            model_name: self.model_name.clone(),
            model_version: self.model_version.clone(),
            model_sha256: self.model_sha256.clone(),
            image_sha256: image_sha256.to_owned(),
            patient_key: patient_key.to_owned(),
            probabilities_json,
            top_label,
            confidence: f64::from(confidence),
            decision_threshold: f64::from(self.decision_threshold),
            decision: self.decision().to_owned(),
            latency_ms: self.latency.as_secs_f64() * 1000.0,
            created_at: now_micros(),
            status: PRELIMINARY.to_owned(),
            idempotency_key,
            intended_use: self.intended_use.clone(),
            content_sha256: String::new(),
            ledger_seq: 0,
            signer_subject: String::new(),
            signer_name: String::new(),
            signature_meaning: String::new(),
            signature_reason: String::new(),
            signed_at: 0,
            signature_ledger_seq: 0,
            content_hash_version: CONTENT_HASH_VERSION,
            normalized_entropy: f64::from(self.uncertainty.normalized_entropy),
            top2_margin: f64::from(self.uncertainty.top2_margin),
            temperature: f64::from(self.uncertainty.temperature),
            ood_score: f64::from(self.uncertainty.ood_score),
            ood_threshold: f64::from(self.uncertainty.ood_threshold),
            confidence_band_lower: self
                .uncertainty
                .confidence_band
                .map(|(lower, _)| f64::from(lower)),
            confidence_band_upper: self
                .uncertainty
                .confidence_band
                .map(|(_, upper)| f64::from(upper)),
            unusual_case: !self.unusual_case_reasons.is_empty(),
            unusual_case_reasons_json: serde_json::to_string(&self.unusual_case_reasons)
                .map_err(|_| InferenceError::Store)?,
            route: self.route.as_str().to_owned(),
            shadow_of_result_id: String::new(),
            shadow_agreement: String::new(),
        })
    }
}

pub struct Predictor {
    pub repository: Arc<ModelRepository>,
    pub figures: Arc<RolloutFigures>,
}

impl Predictor {
    /// Routes by `routing_key` (see [`crate::rollout`]) and predicts.
    pub async fn predict(
        &self,
        name: &str,
        version: &str,
        routing_key: &[u8],
        image: ImageInput,
        domain: &InputDomain,
        deadline: Option<Instant>,
    ) -> Result<Prediction, InferenceError> {
        let (served, route) = self.repository.route(name, version, routing_key)?;
        self.predict_on(served, route, image, domain, deadline)
            .await
    }

    /// Predicts with `served` in `route`'s role, and counts it in the version's figures.
    pub async fn predict_on(
        &self,
        served: Arc<ServedVersion>,
        route: Route,
        image: ImageInput,
        domain: &InputDomain,
        deadline: Option<Instant>,
    ) -> Result<Prediction, InferenceError> {
        let started = Instant::now();
        let plan = &served.manifest.preprocessing;
        // An image already at the model's size and small is converted in place: a blocking
        // thread's hand-off costs more than the conversion (issue 14).
        let rows = if is_light_preparation(&image, plan) {
            to_input_tensor(image, plan)
        } else {
            let plan = plan.clone();
            tokio::task::spawn_blocking(move || to_input_tensor(image, &plan))
                .await
                .map_err(|error| InferenceError::Failed(error.to_string()))?
        }
        .map_err(|error| InferenceError::ImageInconsistent(error.to_string()))?;
        let output = served.infer(rows, deadline).await?;
        let manifest = &served.manifest;
        let scores = output.scores.into_iter().next().unwrap_or_default();
        let support = &manifest.decision_support;
        let calibrated = calibrate(&scores, support.temperature);
        let figures = uncertainty(&calibrated, support);
        let unusual_case_reasons = unusual_case_reasons(domain, &figures, support);
        let prediction = Prediction {
            model_name: manifest.name.clone(),
            model_version: manifest.version.clone(),
            model_sha256: manifest.sha256.clone(),
            intended_use: manifest.intended_use.clone(),
            probabilities: manifest.labels.iter().cloned().zip(calibrated).collect(),
            uncertainty: figures,
            unusual_case_reasons,
            decision_threshold: manifest.decision_threshold,
            latency: started.elapsed(),
            batch_rows: output.batch_rows,
            route,
        };
        let (top_label, confidence) = prediction.top().cloned().unwrap_or_default();
        self.figures
            .record_prediction(manifest, route, &top_label, confidence, prediction.latency);
        Ok(prediction)
    }
}
