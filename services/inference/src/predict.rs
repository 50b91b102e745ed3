//! One prediction on a canonical image: pick the served version, prepare the image as its
//! manifest says, queue it for a batch, label the scores.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::decision_support::{
    InputDomain, Uncertainty, calibrate, uncertainty, unusual_case_reasons,
};
use crate::error::InferenceError;
use crate::preprocess::{ImageInput, to_input_tensor};
use crate::repository::ModelRepository;

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

pub struct Predictor {
    pub repository: Arc<ModelRepository>,
}

impl Predictor {
    pub async fn predict(
        &self,
        name: &str,
        version: &str,
        image: ImageInput,
        domain: &InputDomain,
        deadline: Option<Instant>,
    ) -> Result<Prediction, InferenceError> {
        let served = self.repository.select(name, version)?;
        let started = Instant::now();
        let plan = served.manifest.preprocessing.clone();
        let rows = tokio::task::spawn_blocking(move || to_input_tensor(image, &plan))
            .await
            .map_err(|error| InferenceError::Failed(error.to_string()))?
            .map_err(|error| InferenceError::ImageInconsistent(error.to_string()))?;
        let output = served.infer(rows, deadline).await?;
        let manifest = &served.manifest;
        let scores = output.scores.into_iter().next().unwrap_or_default();
        let support = &manifest.decision_support;
        let calibrated = calibrate(&scores, support.temperature);
        let figures = uncertainty(&calibrated, support);
        let unusual_case_reasons = unusual_case_reasons(domain, &figures, support);
        Ok(Prediction {
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
        })
    }
}
