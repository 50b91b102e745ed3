//! One prediction: pick the served version, prepare the image, run, label the scores.

use std::sync::Arc;
use std::time::Instant;

use crate::error::InferenceError;
use crate::model::LoadedModel;
use crate::preprocess::{ImageInput, to_input_tensor};
use crate::repository::ModelRepository;

#[derive(Clone, Debug, PartialEq)]
pub struct Prediction {
    pub model_name: String,
    pub model_version: String,
    pub model_sha256: String,
    pub intended_use: String,
    /// (label, probability) in the model's label order.
    pub probabilities: Vec<(String, f32)>,
}

impl Prediction {
    pub fn top(&self) -> Option<&(String, f32)> {
        self.probabilities.iter().max_by(|a, b| a.1.total_cmp(&b.1))
    }
}

pub struct Predictor {
    pub repository: ModelRepository,
}

impl Predictor {
    pub fn select(&self, name: &str, version: &str) -> Result<Arc<LoadedModel>, InferenceError> {
        let model = self
            .repository
            .active(name)
            .ok_or_else(|| InferenceError::ModelNotFound {
                name: name.to_owned(),
            })?;
        if !version.is_empty() && version != model.manifest.version {
            return Err(InferenceError::VersionNotServed {
                name: name.to_owned(),
                version: version.to_owned(),
            });
        }
        Ok(model)
    }

    pub async fn predict(
        &self,
        name: &str,
        version: &str,
        image: ImageInput,
    ) -> Result<Prediction, InferenceError> {
        let model = self.select(name, version)?;
        let started = Instant::now();
        let blocking_model = model.clone();
        let scores = tokio::task::spawn_blocking(move || {
            let tensor = to_input_tensor(image, &blocking_model.manifest.preprocessing)
                .map_err(|error| InferenceError::ImageInconsistent(error.to_string()))?;
            blocking_model
                .run(tensor)
                .map_err(|error| InferenceError::Failed(error.to_string()))
        })
        .await
        .map_err(|error| InferenceError::Failed(error.to_string()))??;
        let manifest = &model.manifest;
        metrics::histogram!("medai_inference_compute_seconds", "model" => manifest.name.clone(), "version" => manifest.version.clone())
            .record(started.elapsed().as_secs_f64());
        Ok(Prediction {
            model_name: manifest.name.clone(),
            model_version: manifest.version.clone(),
            model_sha256: manifest.sha256.clone(),
            intended_use: manifest.intended_use.clone(),
            probabilities: manifest.labels.iter().cloned().zip(scores).collect(),
        })
    }
}
