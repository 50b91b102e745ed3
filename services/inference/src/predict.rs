//! One prediction on a canonical image: pick the served version, prepare the image as its
//! manifest says, queue it for a batch, label the scores.

use std::sync::Arc;
use std::time::{Duration, Instant};

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
    /// (label, probability) in the model's label order.
    pub probabilities: Vec<(String, f32)>,
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
        Ok(Prediction {
            model_name: manifest.name.clone(),
            model_version: manifest.version.clone(),
            model_sha256: manifest.sha256.clone(),
            intended_use: manifest.intended_use.clone(),
            probabilities: manifest.labels.iter().cloned().zip(scores).collect(),
            decision_threshold: manifest.decision_threshold,
            latency: started.elapsed(),
            batch_rows: output.batch_rows,
        })
    }
}
