//! The gRPC edge of the inference service.

use std::sync::Arc;

use medai_proto::inference::v1::inference_service_server::InferenceService;
use medai_proto::inference::v1::{LabelProbability, PredictRequest, PredictResponse};
use tonic::{Request, Response, Status};

use crate::error::InferenceError;
use crate::predict::{Prediction, Predictor};
use crate::preprocess::ImageInput;

pub struct InferenceApi {
    pub predictor: Arc<Predictor>,
}

impl From<Prediction> for PredictResponse {
    fn from(prediction: Prediction) -> Self {
        let (top_label, top_probability) = prediction.top().cloned().unwrap_or_default();
        Self {
            model_name: prediction.model_name,
            model_version: prediction.model_version,
            probabilities: prediction
                .probabilities
                .into_iter()
                .map(|(label, probability)| LabelProbability { label, probability })
                .collect(),
            top_label,
            top_probability,
            intended_use: prediction.intended_use,
            model_sha256: prediction.model_sha256,
        }
    }
}

#[tonic::async_trait]
impl InferenceService for InferenceApi {
    async fn predict(
        &self,
        request: Request<PredictRequest>,
    ) -> Result<Response<PredictResponse>, Status> {
        let request = request.into_inner();
        let image = request.image.ok_or(InferenceError::ImageMissing)?;
        let input = ImageInput {
            width: image.width,
            height: image.height,
            channels: image.channels,
            bit_depth: image.bit_depth,
            pixels: image.pixels,
        };
        let result = self
            .predictor
            .predict(&request.model_name, &request.model_version, input)
            .await;
        let outcome = match &result {
            Ok(_) => "OK",
            Err(error) => medai_runtime::ServiceError::reason(error),
        };
        metrics::counter!("medai_inference_predictions_total", "model" => request.model_name, "outcome" => outcome).increment(1);
        Ok(Response::new(result?.into()))
    }
}
