//! The MedAI gRPC edge of the inference service: predictions for the gateway, the results
//! store, and the model lifecycle.

use std::sync::Arc;
use std::time::Instant;

use futures::StreamExt;
use medai_proto::inference::v1::inference_service_server::InferenceService;
use medai_proto::inference::v1::{
    AbortCanaryRequest, AbortCanaryResponse, ActivateModelVersionRequest,
    ActivateModelVersionResponse, DeliveryNoted, GetModelReportRequest, GetModelReportResponse,
    GetResultRequest, GetResultResponse, LabelCount, LabelProbability, ListModelsRequest,
    ListModelsResponse, ListResultsRequest, ListResultsResponse, ModelChange, ModelChangeOutcome,
    ModelReport, ModelVersionInfo, PredictRequest, PredictResponse, PromoteCanaryRequest,
    PromoteCanaryResponse, RecordDeliveriesRequest, RecordDeliveriesResponse,
    RecordDeliveryRequest, RecordDeliveryResponse, ResultSignature, RetireModelVersionRequest,
    RetireModelVersionResponse, RollbackModelRequest, RollbackModelResponse, SignResultRequest,
    SignResultResponse, StageModelVersionRequest, StageModelVersionResponse, StartCanaryRequest,
    StartCanaryResponse, StartShadowRequest, StartShadowResponse, StopShadowRequest,
    StopShadowResponse, StoredResult as StoredResultMessage,
};
use medai_proto::inference::v1::{
    ConfidenceBand, ExplainResultRequest, ExplainResultResponse, Explanation, ExplanationRecord,
    RecordExplanationRequest, RecordExplanationResponse, Uncertainty as UncertaintyMessage,
    UnusualCase,
};
use medai_proto::inference::v1::{
    PredictThenStoreRequest, PredictThenStoreResponse, ResultStored,
    predict_then_store_response::Progress,
};
use medai_runtime::deadline::caller_deadline;
use medai_runtime::errors::ServiceError;
use tonic::{Request, Response, Status};

use crate::caller::Caller;
use crate::decision_support::{InputDomain, Uncertainty};
use crate::error::InferenceError;
use crate::explain::Explainer;
use crate::lifecycle::{ChangeKind, ChangeRequest, Lifecycle};
use crate::predict::{Prediction, Predictor};
use crate::preprocess::ImageInput;
use crate::repository::VersionView;
use crate::results::{
    HandedOver, ResultFilter, ResultsStore, SIGNED, Signature, StoredExplanation, StoredResult,
    format_timestamp, now_micros, parse_timestamp,
};
use crate::rollout::{Route, summarize};
use crate::shadow::{ShadowJob, ShadowQueue};

/// Results a model report is computed over: the version's most recent ones.
const REPORT_WINDOW: u64 = 10_000;

/// Longest free-text reason kept with a lifecycle change.
const MAX_REASON_CHARS: usize = 500;

pub struct InferenceApi {
    pub predictor: Arc<Predictor>,
    pub explainer: Arc<Explainer>,
    pub results: ResultsStore,
    pub lifecycle: Arc<Lifecycle>,
    pub shadow: ShadowQueue,
}

fn probabilities_message(probabilities: &[(String, f32)]) -> Vec<LabelProbability> {
    probabilities
        .iter()
        .map(|(label, probability)| LabelProbability {
            label: label.clone(),
            probability: *probability,
        })
        .collect()
}

fn uncertainty_message(figures: &Uncertainty) -> UncertaintyMessage {
    UncertaintyMessage {
        normalized_entropy: figures.normalized_entropy,
        top2_margin: figures.top2_margin,
        temperature: figures.temperature,
        confidence_band: figures
            .confidence_band
            .map(|(lower, upper)| ConfidenceBand { lower, upper }),
        ood_score: figures.ood_score,
        ood_threshold: figures.ood_threshold,
    }
}

fn unusual_case_message(reasons: &[String]) -> UnusualCase {
    UnusualCase {
        flagged: !reasons.is_empty(),
        reasons: reasons.to_vec(),
    }
}

/// The decision support figures of a stored result; absent on results stored before they were
/// kept (content hash rule 1).
fn stored_decision_support(
    result: &StoredResult,
) -> Result<(Option<UncertaintyMessage>, Option<UnusualCase>), InferenceError> {
    if result.content_hash_version < 2 {
        return Ok((None, None));
    }
    let band = match (result.confidence_band_lower, result.confidence_band_upper) {
        (Some(lower), Some(upper)) => Some((lower as f32, upper as f32)),
        _ => None,
    };
    let figures = Uncertainty {
        normalized_entropy: result.normalized_entropy as f32,
        top2_margin: result.top2_margin as f32,
        temperature: result.temperature as f32,
        confidence_band: band,
        ood_score: result.ood_score as f32,
        ood_threshold: result.ood_threshold as f32,
    };
    let reasons: Vec<String> = serde_json::from_str(&result.unusual_case_reasons_json)
        .map_err(|_| InferenceError::Store)?;
    Ok((
        Some(uncertainty_message(&figures)),
        Some(UnusualCase {
            flagged: result.unusual_case,
            reasons,
        }),
    ))
}

fn explanation_message(explanation: StoredExplanation) -> ExplanationRecord {
    ExplanationRecord {
        ledger_seq: u64::try_from(explanation.ledger_seq).unwrap_or_default(),
        grid_rows: u32::try_from(explanation.grid_rows).unwrap_or_default(),
        grid_columns: u32::try_from(explanation.grid_columns).unwrap_or_default(),
        heatmap_sha256: explanation.heatmap_sha256,
        created_at: format_timestamp(explanation.created_at),
    }
}

fn stored_probabilities(result: &StoredResult) -> Result<Vec<(String, f32)>, InferenceError> {
    serde_json::from_str(&result.probabilities_json).map_err(|_| InferenceError::Store)
}

fn result_message(result: StoredResult) -> Result<StoredResultMessage, InferenceError> {
    let probabilities = stored_probabilities(&result)?;
    let (uncertainty, unusual_case) = stored_decision_support(&result)?;
    let signature = (result.status == SIGNED).then(|| ResultSignature {
        signer_subject: result.signer_subject.clone(),
        signer_name: result.signer_name.clone(),
        meaning: result.signature_meaning.clone(),
        reason: result.signature_reason.clone(),
        signed_at: format_timestamp(result.signed_at),
        ledger_seq: u64::try_from(result.signature_ledger_seq).unwrap_or_default(),
    });
    Ok(StoredResultMessage {
        result_id: result.result_id,
        model_name: result.model_name,
        model_version: result.model_version,
        image_sha256: result.image_sha256,
        patient_key: result.patient_key,
        probabilities: probabilities_message(&probabilities),
        top_label: result.top_label,
        confidence: result.confidence as f32,
        decision_threshold: result.decision_threshold as f32,
        decision: result.decision,
        latency_ms: result.latency_ms,
        created_at: format_timestamp(result.created_at),
        status: result.status,
        ledger_seq: u64::try_from(result.ledger_seq).unwrap_or_default(),
        content_sha256: result.content_sha256,
        model_sha256: result.model_sha256,
        intended_use: result.intended_use,
        signature,
        uncertainty,
        unusual_case,
        explanations: Vec::new(),
        content_hash_version: u32::try_from(result.content_hash_version).unwrap_or_default(),
        route: result.route,
        shadow_of_result_id: result.shadow_of_result_id,
        shadow_agreement: result.shadow_agreement,
    })
}

/// A stored result answered again for a repeated idempotency key.
fn replayed_response(result: StoredResult) -> Result<PredictResponse, InferenceError> {
    let probabilities = stored_probabilities(&result)?;
    let (uncertainty, unusual_case) = stored_decision_support(&result)?;
    Ok(PredictResponse {
        model_name: result.model_name,
        model_version: result.model_version,
        probabilities: probabilities_message(&probabilities),
        top_label: result.top_label,
        top_probability: result.confidence as f32,
        intended_use: result.intended_use,
        model_sha256: result.model_sha256,
        result_id: result.result_id,
        decision_threshold: result.decision_threshold as f32,
        decision: result.decision,
        latency_ms: result.latency_ms,
        replayed: true,
        ledger_seq: u64::try_from(result.ledger_seq).unwrap_or_default(),
        uncertainty,
        unusual_case,
        route: result.route,
    })
}

fn version_message(view: VersionView) -> ModelVersionInfo {
    ModelVersionInfo {
        name: view.name,
        version: view.version,
        status: view.status.as_str().to_owned(),
        ready: view.ready,
        sha256: view.sha256,
        intended_use: view.intended_use,
        rollout_role: view
            .rollout_role
            .map(|role| role.as_str().to_owned())
            .unwrap_or_default(),
        share_percent: view.share_percent,
    }
}

/// The change a lifecycle request asks for, and who asks and why.
fn change_request<T>(
    request: &Request<T>,
    change: Option<&ModelChange>,
) -> Result<(ModelChange, ChangeRequest), InferenceError> {
    let change = change.cloned().unwrap_or_default();
    if change.reason.chars().count() > MAX_REASON_CHARS {
        return Err(InferenceError::QueryInvalid(format!(
            "reason is longer than {MAX_REASON_CHARS} characters"
        )));
    }
    let who = ChangeRequest {
        caller: Caller::of(request)?,
        reason: change.reason.clone(),
        correlation_id: medai_runtime::correlation::correlation_id(request.metadata()),
    };
    Ok((change, who))
}

fn outcome((view, ledger_seq): (VersionView, u64)) -> Option<ModelChangeOutcome> {
    Some(ModelChangeOutcome {
        changed: Some(version_message(view)),
        ledger_seq,
    })
}

fn is_lower_hex(text: &str, length: usize) -> bool {
    text.len() == length
        && text
            .bytes()
            .all(|byte| byte.is_ascii_digit() || (b'a'..=b'f').contains(&byte))
}

/// The fields stored with a result must look like what they claim to be, so that nothing
/// else (an identifier sent by mistake, for one) is kept in their place.
fn check_result_fields(request: &PredictRequest) -> Result<(), InferenceError> {
    if !request.image_sha256.is_empty() && !is_lower_hex(&request.image_sha256, 64) {
        return Err(InferenceError::QueryInvalid(
            "image_sha256 must be 64 lowercase hex digits".to_owned(),
        ));
    }
    if !request.patient_key.is_empty() && !is_lower_hex(&request.patient_key, 32) {
        return Err(InferenceError::QueryInvalid(
            "patient_key must be the 32 hex digits validation derives".to_owned(),
        ));
    }
    if !request.idempotency_key.is_empty() && !is_lower_hex(&request.idempotency_key, 64) {
        return Err(InferenceError::QueryInvalid(
            "idempotency_key must be 64 lowercase hex digits".to_owned(),
        ));
    }
    // A retry is matched to its first request by the image's hash, so a keyed request names it.
    if !request.idempotency_key.is_empty() && request.image_sha256.is_empty() {
        return Err(InferenceError::QueryInvalid(
            "a request with an idempotency_key needs its image_sha256".to_owned(),
        ));
    }
    if !request.result_id.is_empty() && uuid::Uuid::parse_str(&request.result_id).is_err() {
        return Err(InferenceError::QueryInvalid(
            "result_id must be a UUID".to_owned(),
        ));
    }
    Ok(())
}

/// Most deliveries one `RecordDeliveries` call may note.
const MAX_DELIVERIES_PER_CALL: usize = 1024;

impl InferenceApi {
    /// Hands the prediction's row to the results writer; [`HandedOver::committed`] tells its
    /// commit (or, if its idempotency key was stored meanwhile, the stored result).
    async fn hand_over(
        &self,
        request: &PredictRequest,
        prediction: &Prediction,
        result_id: String,
    ) -> Result<HandedOver, InferenceError> {
        let row = prediction.to_row(
            result_id,
            &request.image_sha256,
            &request.patient_key,
            (!request.idempotency_key.is_empty()).then(|| request.idempotency_key.clone()),
        )?;
        self.results.hand_over(row).await
    }

    /// One lifecycle change asked for by `request`.
    async fn change<T>(
        &self,
        request: &Request<T>,
        change: Option<&ModelChange>,
        kind: ChangeKind,
    ) -> Result<Option<ModelChangeOutcome>, InferenceError> {
        let (change, who) = change_request(request, change)?;
        let done = self
            .lifecycle
            .change(kind, &change.model_name, &change.model_version, &who)
            .await?;
        Ok(outcome(done))
    }
}

/// What a request is routed by: its idempotency key, else its image's SHA-256 (computed from
/// the pixels when the caller sent none), so a resend routes the same way.
fn routing_key(request: &PredictRequest, pixels: &[u8]) -> Vec<u8> {
    if !request.idempotency_key.is_empty() {
        return request.idempotency_key.as_bytes().to_vec();
    }
    if !request.image_sha256.is_empty() {
        return request.image_sha256.as_bytes().to_vec();
    }
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(pixels)).into_bytes()
}

/// A prediction made and its row handed to the results writer, not yet committed; or, for a
/// repeated idempotency key, the stored answer.
enum Predicted {
    Replayed(PredictResponse),
    New {
        response: PredictResponse,
        row: HandedOver,
        /// The shadow's job, offered once the row is committed.
        shadow: Option<Box<ShadowJob>>,
    },
}

impl InferenceApi {
    /// What Predict and PredictThenStore share: the checks, a stored answer for a repeated
    /// key, the prediction, and its row handed to the writer.
    async fn predict_and_hand_over(
        &self,
        request: Request<PredictRequest>,
    ) -> Result<Predicted, InferenceError> {
        let deadline = caller_deadline(request.metadata(), Instant::now());
        let actor = Caller::of(&request)
            .map(|caller| caller.actor())
            .unwrap_or_default();
        let correlation_id = medai_runtime::correlation::correlation_id(request.metadata());
        let mut request = request.into_inner();
        check_result_fields(&request)?;
        let image = request.image.take().ok_or(InferenceError::ImageMissing)?;
        let metadata = image.metadata.clone().unwrap_or_default();
        let domain = InputDomain {
            modality: metadata.modality,
            body_part: metadata.body_part_examined,
            quality_findings: request.quality_findings.clone(),
        };
        let input = ImageInput {
            width: image.width,
            height: image.height,
            channels: image.channels,
            bit_depth: image.bit_depth,
            pixels: image.pixels.into(),
            resized_for_model_input: image.resized_for_model_input,
        };
        if !request.idempotency_key.is_empty()
            && let Some(stored) = self
                .results
                .find_retry(
                    &request.idempotency_key,
                    crate::results::RetryFacts {
                        image_sha256: &request.image_sha256,
                        model_name: &request.model_name,
                        model_version: &request.model_version,
                    },
                )
                .await?
        {
            return Ok(Predicted::Replayed(replayed_response(stored)?));
        }
        let key = routing_key(&request, &input.pixels);
        // A copy for the shadow, taken only when the model has one.
        let shadow = self
            .lifecycle
            .repository
            .shadow(&request.model_name)
            .map(|served| (served, input.clone(), domain.clone()));
        let prediction = self
            .predictor
            .predict(
                &request.model_name,
                &request.model_version,
                &key,
                input,
                &domain,
                deadline,
            )
            .await?;
        let result_id = if request.result_id.is_empty() {
            uuid::Uuid::new_v4().to_string()
        } else {
            request.result_id.clone()
        };
        let row = self
            .hand_over(&request, &prediction, result_id.clone())
            .await?;
        let (top_label, top_probability) = prediction.top().cloned().unwrap_or_default();
        // The shadow runs beside the active version only; a canary's answer is not compared.
        let shadow = shadow
            .filter(|_| prediction.route == Route::Active)
            .map(|(served, image, domain)| ShadowJob {
                served,
                image,
                domain,
                active_result_id: result_id.clone(),
                active_top_label: top_label.clone(),
                image_sha256: request.image_sha256.clone(),
                patient_key: request.patient_key.clone(),
                actor,
                correlation_id,
            })
            .map(Box::new);
        let response = PredictResponse {
            route: prediction.route.as_str().to_owned(),
            uncertainty: Some(uncertainty_message(&prediction.uncertainty)),
            unusual_case: Some(unusual_case_message(&prediction.unusual_case_reasons)),
            probabilities: probabilities_message(&prediction.probabilities),
            decision: prediction.decision().to_owned(),
            latency_ms: prediction.latency.as_secs_f64() * 1000.0,
            model_name: prediction.model_name,
            model_version: prediction.model_version,
            top_label,
            top_probability,
            intended_use: prediction.intended_use,
            model_sha256: prediction.model_sha256,
            result_id,
            decision_threshold: prediction.decision_threshold,
            replayed: false,
            ledger_seq: 0,
        };
        Ok(Predicted::New {
            response,
            row,
            shadow,
        })
    }

    /// Predict's answer once the row is committed: the prediction, or the stored result its
    /// key names if another request stored that key first.
    async fn committed(
        &self,
        response: PredictResponse,
        row: HandedOver,
        shadow: Option<Box<ShadowJob>>,
    ) -> Result<PredictResponse, InferenceError> {
        let (stored, replayed) = row.committed().await?;
        if replayed {
            return replayed_response(stored);
        }
        if let Some(job) = shadow {
            self.shadow.offer(*job);
        }
        Ok(response)
    }
}

/// PredictThenStore's messages.
type ProgressStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<PredictThenStoreResponse, Status>> + Send>>;

fn prediction_message(prediction: PredictResponse) -> PredictThenStoreResponse {
    PredictThenStoreResponse {
        progress: Some(Progress::Prediction(prediction)),
    }
}

fn stored_message(result_id: String) -> PredictThenStoreResponse {
    PredictThenStoreResponse {
        progress: Some(Progress::Stored(ResultStored { result_id })),
    }
}

#[tonic::async_trait]
impl InferenceService for InferenceApi {
    async fn predict(
        &self,
        request: Request<PredictRequest>,
    ) -> Result<Response<PredictResponse>, Status> {
        let answer = match self.predict_and_hand_over(request).await? {
            Predicted::Replayed(answer) => answer,
            Predicted::New {
                response,
                row,
                shadow,
            } => self.committed(response, row, shadow).await?,
        };
        Ok(Response::new(answer))
    }

    type PredictThenStoreStream = ProgressStream;

    async fn predict_then_store(
        &self,
        request: Request<PredictThenStoreRequest>,
    ) -> Result<Response<Self::PredictThenStoreStream>, Status> {
        let (metadata, extensions, message) = request.into_parts();
        let inner = message
            .request
            .ok_or_else(|| InferenceError::QueryInvalid("request is missing".to_owned()))?;
        let keyed = !inner.idempotency_key.is_empty();
        let predicted = self
            .predict_and_hand_over(Request::from_parts(metadata, extensions, inner))
            .await?;
        let (response, row, shadow) = match predicted {
            Predicted::Replayed(answer) => (answer, None, None),
            // Whether a keyed request replays is known only after the commit: one step.
            Predicted::New {
                response,
                row,
                shadow,
            } if keyed => (self.committed(response, row, shadow).await?, None, None),
            Predicted::New {
                response,
                row,
                shadow,
            } => (response, Some(row), shadow),
        };
        let result_id = response.result_id.clone();
        let first = futures::stream::iter([Ok(prediction_message(response))]);
        let Some(row) = row else {
            let stored = futures::stream::iter([Ok(stored_message(result_id))]);
            return Ok(Response::new(Box::pin(first.chain(stored))));
        };
        // The row's commit is the writer's: it is made whether or not this stream is still read.
        let shadow_queue = self.shadow.clone();
        let second = futures::stream::once(async move {
            // Unkeyed: no stored row can answer in its place.
            row.committed().await.map_err(Status::from)?;
            if let Some(job) = shadow {
                shadow_queue.offer(*job);
            }
            Ok(stored_message(result_id))
        });
        Ok(Response::new(Box::pin(first.chain(second))))
    }

    async fn get_result(
        &self,
        request: Request<GetResultRequest>,
    ) -> Result<Response<GetResultResponse>, Status> {
        let request = request.into_inner();
        let result = if request.idempotency_key.is_empty() {
            self.results.get(&request.result_id).await?
        } else {
            self.results
                .find_by_idempotency_key(&request.idempotency_key)
                .await?
                .ok_or_else(|| InferenceError::ResultNotFound("for that key".to_owned()))?
        };
        let explanations = self.results.explanations(&result.result_id).await?;
        let mut message = result_message(result)?;
        message.explanations = explanations.into_iter().map(explanation_message).collect();
        Ok(Response::new(GetResultResponse {
            result: Some(message),
        }))
    }

    async fn explain_result(
        &self,
        request: Request<ExplainResultRequest>,
    ) -> Result<Response<ExplainResultResponse>, Status> {
        let deadline = caller_deadline(request.metadata(), Instant::now());
        let request = request.into_inner();
        if uuid::Uuid::parse_str(&request.result_id).is_err() {
            return Err(InferenceError::ResultNotFound(request.result_id).into());
        }
        let result = self.results.get(&request.result_id).await?;
        let image = request.image.ok_or(InferenceError::ImageMissing)?;
        let input = ImageInput {
            width: image.width,
            height: image.height,
            channels: image.channels,
            bit_depth: image.bit_depth,
            pixels: image.pixels.into(),
            resized_for_model_input: image.resized_for_model_input,
        };
        // The version that produced the result, and no other, explains it.
        let map = self
            .explainer
            .explain(
                &result.model_name,
                &result.model_version,
                &result.top_label,
                input,
                (request.grid_rows, request.grid_columns),
                deadline,
            )
            .await?;
        tracing::info!(
            result_id = %result.result_id,
            grid_rows = map.grid_rows,
            grid_columns = map.grid_columns,
            forward_passes = map.forward_passes,
            compute_ms = map.compute.as_secs_f64() * 1000.0,
            "explanation computed"
        );
        Ok(Response::new(ExplainResultResponse {
            explanation: Some(Explanation {
                result_id: result.result_id,
                model_name: map.model_name,
                model_version: map.model_version,
                target_label: map.target_label,
                baseline_probability: map.baseline_probability,
                grid_rows: map.grid_rows,
                grid_columns: map.grid_columns,
                importance: map.importance,
                most_important_row: map.most_important.0,
                most_important_column: map.most_important.1,
                heatmap_png: map.heatmap_png,
                heatmap_width: map.heatmap_width,
                heatmap_height: map.heatmap_height,
                heatmap_sha256: map.heatmap_sha256,
                forward_passes: map.forward_passes,
                compute_ms: map.compute.as_secs_f64() * 1000.0,
            }),
        }))
    }

    async fn record_explanation(
        &self,
        request: Request<RecordExplanationRequest>,
    ) -> Result<Response<RecordExplanationResponse>, Status> {
        let request = request.into_inner();
        let seq = i64::try_from(request.ledger_seq)
            .ok()
            .filter(|seq| *seq > 0)
            .ok_or_else(|| InferenceError::QueryInvalid("ledger_seq must be positive".into()))?;
        if !is_lower_hex(&request.heatmap_sha256, 64) {
            return Err(InferenceError::QueryInvalid(
                "heatmap_sha256 must be 64 lowercase hex digits".to_owned(),
            )
            .into());
        }
        self.results
            .record_explanation(StoredExplanation {
                ledger_seq: seq,
                result_id: request.result_id,
                grid_rows: i32::try_from(request.grid_rows).unwrap_or(i32::MAX),
                grid_columns: i32::try_from(request.grid_columns).unwrap_or(i32::MAX),
                heatmap_sha256: request.heatmap_sha256,
                created_at: now_micros(),
            })
            .await?;
        Ok(Response::new(RecordExplanationResponse {}))
    }

    async fn record_delivery(
        &self,
        request: Request<RecordDeliveryRequest>,
    ) -> Result<Response<RecordDeliveryResponse>, Status> {
        let request = request.into_inner();
        let seq = i64::try_from(request.ledger_seq)
            .ok()
            .filter(|seq| *seq > 0)
            .ok_or_else(|| InferenceError::QueryInvalid("ledger_seq must be positive".into()))?;
        let noted = self
            .results
            .record_delivery(&request.result_id, seq)
            .await?;
        Ok(Response::new(RecordDeliveryResponse {
            ledger_seq: u64::try_from(noted).unwrap_or_default(),
        }))
    }

    async fn record_deliveries(
        &self,
        request: Request<RecordDeliveriesRequest>,
    ) -> Result<Response<RecordDeliveriesResponse>, Status> {
        let deliveries = request.into_inner().deliveries;
        if deliveries.len() > MAX_DELIVERIES_PER_CALL {
            return Err(InferenceError::QueryInvalid(format!(
                "at most {MAX_DELIVERIES_PER_CALL} deliveries per call"
            ))
            .into());
        }
        // A note with no usable seq is answered QUERY_INVALID on its own; the others are noted.
        let checked: Vec<Option<(String, i64)>> = deliveries
            .into_iter()
            .map(|delivery| {
                i64::try_from(delivery.ledger_seq)
                    .ok()
                    .filter(|seq| *seq > 0)
                    .map(|seq| (delivery.result_id, seq))
            })
            .collect();
        let notes: Vec<(String, i64)> = checked.iter().flatten().cloned().collect();
        let mut noted = self.results.record_deliveries(&notes).await.into_iter();
        let answers = checked
            .iter()
            .map(|note| {
                let outcome = match note {
                    Some(_) => noted.next().unwrap_or(Err(InferenceError::Store)),
                    None => Err(InferenceError::QueryInvalid(
                        "ledger_seq must be positive".into(),
                    )),
                };
                match outcome {
                    Ok(seq) => DeliveryNoted {
                        ledger_seq: u64::try_from(seq).unwrap_or_default(),
                        error_code: String::new(),
                    },
                    Err(error) => DeliveryNoted {
                        ledger_seq: 0,
                        error_code: error.reason().to_owned(),
                    },
                }
            })
            .collect();
        Ok(Response::new(RecordDeliveriesResponse { noted: answers }))
    }

    async fn sign_result(
        &self,
        request: Request<SignResultRequest>,
    ) -> Result<Response<SignResultResponse>, Status> {
        let request = request.into_inner();
        let signature = request.signature.unwrap_or_default();
        if signature.signer_subject.is_empty() || signature.ledger_seq == 0 {
            return Err(InferenceError::QueryInvalid(
                "a signature needs its signer and its ledger entry".to_owned(),
            )
            .into());
        }
        let signed_at = if signature.signed_at.is_empty() {
            now_micros()
        } else {
            parse_timestamp(&signature.signed_at)?
        };
        let signed = self
            .results
            .sign(
                &request.result_id,
                &request.expected_content_sha256,
                Signature {
                    signer_subject: signature.signer_subject,
                    signer_name: signature.signer_name,
                    meaning: signature.meaning,
                    reason: signature.reason,
                    signed_at,
                    ledger_seq: i64::try_from(signature.ledger_seq).unwrap_or_default(),
                },
            )
            .await?;
        Ok(Response::new(SignResultResponse {
            result: Some(result_message(signed)?),
        }))
    }

    async fn list_results(
        &self,
        request: Request<ListResultsRequest>,
    ) -> Result<Response<ListResultsResponse>, Status> {
        let request = request.into_inner();
        let optional_time = |text: &str| -> Result<Option<i64>, InferenceError> {
            if text.is_empty() {
                Ok(None)
            } else {
                parse_timestamp(text).map(Some)
            }
        };
        let filter = ResultFilter {
            created_from: optional_time(&request.created_from)?,
            created_until: optional_time(&request.created_until)?,
            model_name: request.model_name,
            status: request.status,
            patient_key: request.patient_key,
            page_size: request.page_size,
            page_token: request.page_token,
            delivered_only: request.delivered_only,
        };
        let (rows, next_page_token) = self.results.list(&filter).await?;
        let results = rows
            .into_iter()
            .map(result_message)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Response::new(ListResultsResponse {
            results,
            next_page_token,
        }))
    }

    async fn list_models(
        &self,
        _request: Request<ListModelsRequest>,
    ) -> Result<Response<ListModelsResponse>, Status> {
        let versions = self
            .lifecycle
            .repository
            .list()
            .into_iter()
            .map(version_message)
            .collect();
        Ok(Response::new(ListModelsResponse { versions }))
    }

    async fn stage_model_version(
        &self,
        request: Request<StageModelVersionRequest>,
    ) -> Result<Response<StageModelVersionResponse>, Status> {
        let outcome = self
            .change(
                &request,
                request.get_ref().change.as_ref(),
                ChangeKind::Stage,
            )
            .await?;
        Ok(Response::new(StageModelVersionResponse { outcome }))
    }

    async fn activate_model_version(
        &self,
        request: Request<ActivateModelVersionRequest>,
    ) -> Result<Response<ActivateModelVersionResponse>, Status> {
        let outcome = self
            .change(
                &request,
                request.get_ref().change.as_ref(),
                ChangeKind::Activate,
            )
            .await?;
        Ok(Response::new(ActivateModelVersionResponse { outcome }))
    }

    async fn retire_model_version(
        &self,
        request: Request<RetireModelVersionRequest>,
    ) -> Result<Response<RetireModelVersionResponse>, Status> {
        let outcome = self
            .change(
                &request,
                request.get_ref().change.as_ref(),
                ChangeKind::Retire,
            )
            .await?;
        Ok(Response::new(RetireModelVersionResponse { outcome }))
    }

    async fn rollback_model(
        &self,
        request: Request<RollbackModelRequest>,
    ) -> Result<Response<RollbackModelResponse>, Status> {
        let mut change = request.get_ref().change.clone().unwrap_or_default();
        change.model_version.clear();
        let outcome = self
            .change(&request, Some(&change), ChangeKind::Rollback)
            .await?;
        Ok(Response::new(RollbackModelResponse { outcome }))
    }

    async fn start_canary(
        &self,
        request: Request<StartCanaryRequest>,
    ) -> Result<Response<StartCanaryResponse>, Status> {
        let kind = ChangeKind::StartCanary {
            share_percent: request.get_ref().share_percent,
        };
        let outcome = self
            .change(&request, request.get_ref().change.as_ref(), kind)
            .await?;
        Ok(Response::new(StartCanaryResponse { outcome }))
    }

    async fn promote_canary(
        &self,
        request: Request<PromoteCanaryRequest>,
    ) -> Result<Response<PromoteCanaryResponse>, Status> {
        let outcome = self
            .change(
                &request,
                request.get_ref().change.as_ref(),
                ChangeKind::PromoteCanary,
            )
            .await?;
        Ok(Response::new(PromoteCanaryResponse { outcome }))
    }

    async fn abort_canary(
        &self,
        request: Request<AbortCanaryRequest>,
    ) -> Result<Response<AbortCanaryResponse>, Status> {
        let outcome = self
            .change(
                &request,
                request.get_ref().change.as_ref(),
                ChangeKind::AbortCanary,
            )
            .await?;
        Ok(Response::new(AbortCanaryResponse { outcome }))
    }

    async fn start_shadow(
        &self,
        request: Request<StartShadowRequest>,
    ) -> Result<Response<StartShadowResponse>, Status> {
        let outcome = self
            .change(
                &request,
                request.get_ref().change.as_ref(),
                ChangeKind::StartShadow,
            )
            .await?;
        Ok(Response::new(StartShadowResponse { outcome }))
    }

    async fn stop_shadow(
        &self,
        request: Request<StopShadowRequest>,
    ) -> Result<Response<StopShadowResponse>, Status> {
        let outcome = self
            .change(
                &request,
                request.get_ref().change.as_ref(),
                ChangeKind::StopShadow,
            )
            .await?;
        Ok(Response::new(StopShadowResponse { outcome }))
    }

    async fn get_model_report(
        &self,
        request: Request<GetModelReportRequest>,
    ) -> Result<Response<GetModelReportResponse>, Status> {
        let request = request.into_inner();
        let repository = &self.lifecycle.repository;
        let view = repository
            .view(&request.model_name, &request.model_version)
            .ok_or_else(|| InferenceError::VersionUnknown {
                name: request.model_name.clone(),
                version: request.model_version.clone(),
            })?;
        let (report, research_use_only, labels) =
            repository.validation_report(&request.model_name, &request.model_version)?;
        let rows = self
            .results
            .version_figures(&request.model_name, &request.model_version, REPORT_WINDOW)
            .await?;
        let summary = summarize(
            &rows,
            &labels,
            report.as_ref().map(|checked| &checked.report.reference),
        );
        let role = if view.ready && view.rollout_role.is_none() {
            Route::Active.as_str().to_owned()
        } else {
            view.rollout_role
                .map(|role| role.as_str().to_owned())
                .unwrap_or_default()
        };
        let counts = |pairs: Vec<(String, u64)>| {
            pairs
                .into_iter()
                .map(|(label, count)| LabelCount { label, count })
                .collect()
        };
        Ok(Response::new(GetModelReportResponse {
            report: Some(ModelReport {
                model_name: view.name,
                model_version: view.version,
                role,
                share_percent: view.share_percent,
                predictions: summary.predictions,
                window: u32::try_from(REPORT_WINDOW).unwrap_or(u32::MAX),
                routes: counts(summary.routes),
                labels: counts(summary.labels),
                mean_confidence: summary.mean_confidence,
                latency_p50_ms: summary.latency_p50_ms,
                latency_p99_ms: summary.latency_p99_ms,
                shadow_compared: summary.shadow_compared,
                shadow_agreements: summary.shadow_agreements,
                validation_report_sha256: report.map(|checked| checked.sha256).unwrap_or_default(),
                research_use_only,
                has_reference: summary.psi.is_some(),
                label_psi: summary.psi.map_or(0.0, |psi| psi.0),
                confidence_psi: summary.psi.map_or(0.0, |psi| psi.1),
            }),
        }))
    }
}
