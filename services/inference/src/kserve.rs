//! KServe v2 (Open Inference Protocol) as Triton serves it, so Triton's clients and tools work
//! unchanged: health, metadata, typed and raw tensor inference, streaming, and the Triton
//! extensions its tools need (model configuration, statistics and the repository index).
//! Requests go through the same dynamic batcher as predictions; unknown request parameters are
//! ignored. Every inference is recorded in the ledger, with the caller's certificate identity as
//! its actor, before its outputs are answered: if the ledger cannot record it, the caller gets
//! UNAVAILABLE and no outputs.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use futures::{Stream, StreamExt};
use medai_ledger_client::LedgerClient;
use medai_proto::kserve::grpc_inference_service_server::GrpcInferenceService;
use medai_proto::kserve::model_infer_response::InferOutputTensor;
use medai_proto::kserve::model_metadata_response::TensorMetadata;
use medai_proto::kserve::repository_index_response::ModelIndex;
use medai_proto::kserve::{
    DataType, InferBatchStatistics, InferStatistics, ModelConfig, ModelConfigRequest,
    ModelConfigResponse, ModelDynamicBatching, ModelInferRequest, ModelInferResponse, ModelInput,
    ModelInstanceGroup, ModelMetadataRequest, ModelMetadataResponse, ModelOutput,
    ModelReadyRequest, ModelReadyResponse, ModelStatistics, ModelStatisticsRequest,
    ModelStatisticsResponse, ModelStreamInferResponse, ModelVersionPolicy, ServerLiveRequest,
    ServerLiveResponse, ServerMetadataRequest, ServerMetadataResponse, ServerReadyRequest,
    ServerReadyResponse, StatisticDuration, model_config, model_input, model_instance_group,
    model_version_policy,
};
use medai_proto::kserve::{RepositoryIndexRequest, RepositoryIndexResponse};
use medai_runtime::deadline::caller_deadline;
use ndarray::Array4;
use serde_json::json;
use sha2::{Digest, Sha256};
use tonic::{Request, Response, Status, Streaming};

use crate::batcher::{ServedVersion, VersionStatistics};
use crate::caller::Caller;
use crate::error::InferenceError;
use crate::repository::ModelRepository;

/// Requests one stream may have running at once.
const STREAM_CONCURRENCY: usize = 32;

/// The ledger action of one KServe inference.
pub const KSERVE_INFER_ACTION: &str = "KSERVE_MODEL_INFER";

#[derive(Clone)]
pub struct KserveApi {
    pub repository: Arc<ModelRepository>,
    pub ledger: LedgerClient,
}

impl KserveApi {
    async fn infer(
        &self,
        caller: &Caller,
        request: ModelInferRequest,
        deadline: Option<Instant>,
    ) -> Result<ModelInferResponse, InferenceError> {
        let served = self
            .repository
            .select(&request.model_name, &request.model_version)?;
        let manifest = &served.manifest;
        for requested in &request.outputs {
            if requested.name != manifest.output.name {
                return Err(InferenceError::TensorInvalid(format!(
                    "unknown output {}; this model has {}",
                    requested.name, manifest.output.name
                )));
            }
        }
        let (rows, input_sha256) = input_rows(&request, &served)?;
        let count = rows.shape()[0];
        let output = served.infer(rows, deadline).await?;
        let labels = manifest.labels.len();
        let raw: Vec<u8> = output
            .scores
            .iter()
            .flatten()
            .flat_map(|score| score.to_le_bytes())
            .collect();
        // No outputs leave without their record. The request id is the client's free text,
        // so it is not recorded (it could carry an identifier); the tensors are, as hashes.
        let context = json!({
            "door": "kserve",
            "model_sha256": manifest.sha256,
            "rows": count,
            "batch_rows": output.batch_rows,
            "input_sha256": input_sha256,
            "output_sha256": hex::encode(Sha256::digest(&raw)),
            "via": caller.service,
        });
        let resource = format!("model/{}/{}", manifest.name, manifest.version);
        if let Err(status) = self
            .ledger
            .record(
                &caller.actor(),
                KSERVE_INFER_ACTION,
                &resource,
                "SUCCESS",
                context,
            )
            .await
        {
            tracing::error!(code = ?status.code(), model = %manifest.name, "kserve inference not recorded; outputs withheld");
            return Err(InferenceError::InferenceUnrecorded);
        }
        Ok(ModelInferResponse {
            model_name: manifest.name.clone(),
            model_version: manifest.version.clone(),
            id: request.id,
            parameters: Default::default(),
            outputs: vec![InferOutputTensor {
                name: manifest.output.name.clone(),
                datatype: "FP32".to_owned(),
                shape: vec![count as i64, labels as i64],
                parameters: Default::default(),
                contents: None,
            }],
            raw_output_contents: vec![raw],
        })
    }
}

/// SHA-256 over the tensor's values as little-endian FP32, whichever way they were sent.
fn tensor_sha256<'a>(values: impl Iterator<Item = &'a f32>) -> String {
    let mut hasher = Sha256::new();
    let mut buffer = Vec::with_capacity(64 * 1024);
    for value in values {
        buffer.extend_from_slice(&value.to_le_bytes());
        if buffer.len() >= 64 * 1024 {
            hasher.update(&buffer);
            buffer.clear();
        }
    }
    hasher.update(&buffer);
    hex::encode(hasher.finalize())
}

/// The request's one input as `[N, H, W, C]`, from raw little-endian bytes or typed contents,
/// with the SHA-256 over its values as little-endian FP32 (raw bytes are hashed as they came:
/// they are that encoding already).
fn input_rows(
    request: &ModelInferRequest,
    served: &ServedVersion,
) -> Result<(Array4<f32>, String), InferenceError> {
    let manifest = &served.manifest;
    let invalid = |reason: String| Err(InferenceError::TensorInvalid(reason));
    let [input] = request.inputs.as_slice() else {
        return invalid(format!(
            "this model takes exactly one input, {}",
            manifest.input.name
        ));
    };
    if input.name != manifest.input.name {
        return invalid(format!(
            "unknown input {}; this model takes {}",
            input.name, manifest.input.name
        ));
    }
    if input.datatype != manifest.input.datatype {
        return invalid(format!(
            "input {} must be {}, not {}",
            input.name, manifest.input.datatype, input.datatype
        ));
    }
    let item_shape = &manifest.input.shape[1..];
    let shape_matches = input.shape.len() == manifest.input.shape.len()
        && input.shape[1..] == *item_shape
        && input.shape[0] >= 1;
    if !shape_matches {
        return invalid(format!(
            "input shape {:?} does not match [-1, {}]",
            input.shape,
            item_shape
                .iter()
                .map(i64::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    let rows = usize::try_from(input.shape[0]).unwrap_or(usize::MAX);
    if rows > served.max_batch_rows {
        return Err(InferenceError::BatchTooLarge {
            rows,
            max: served.max_batch_rows,
        });
    }
    let dims: Vec<usize> = input.shape.iter().map(|dim| *dim as usize).collect();
    let elements: usize = dims.iter().product();
    let (values, input_sha256): (Vec<f32>, String) =
        match (request.raw_input_contents.first(), &input.contents) {
            (Some(raw), _) => {
                if request.raw_input_contents.len() != 1 || raw.len() != elements * 4 {
                    return invalid(format!(
                        "raw input holds {} bytes; shape {:?} of FP32 needs {}",
                        raw.len(),
                        input.shape,
                        elements * 4
                    ));
                }
                let values = raw
                    .chunks_exact(4)
                    .map(|bytes| f32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
                    .collect();
                (values, hex::encode(Sha256::digest(raw)))
            }
            (None, Some(contents)) if contents.fp32_contents.len() == elements => (
                contents.fp32_contents.clone(),
                tensor_sha256(contents.fp32_contents.iter()),
            ),
            _ => {
                return invalid(format!(
                    "input {} needs {elements} FP32 values in raw_input_contents or fp32_contents",
                    input.name
                ));
            }
        };
    if values.iter().any(|value| !value.is_finite()) {
        return invalid("input holds NaN or infinite values".to_owned());
    }
    let rows = Array4::from_shape_vec((dims[0], dims[1], dims[2], dims[3]), values)
        .map_err(|error| InferenceError::TensorInvalid(error.to_string()))?;
    Ok((rows, input_sha256))
}

fn tensor_metadata(spec: &crate::manifest::TensorSpec) -> TensorMetadata {
    TensorMetadata {
        name: spec.name.clone(),
        datatype: spec.datatype.clone(),
        shape: spec.shape.clone(),
    }
}

fn duration(
    count: &std::sync::atomic::AtomicU64,
    ns: &std::sync::atomic::AtomicU64,
) -> Option<StatisticDuration> {
    Some(StatisticDuration {
        count: count.load(Ordering::Relaxed),
        ns: ns.load(Ordering::Relaxed),
    })
}

fn statistics_message(served: &ServedVersion) -> ModelStatistics {
    let stats: &VersionStatistics = &served.statistics;
    let batch_stats = stats
        .batches
        .lock()
        .map(|batches| {
            batches
                .iter()
                .map(|(size, (runs, ns))| InferBatchStatistics {
                    batch_size: *size,
                    compute_input: Some(StatisticDuration {
                        count: *runs,
                        ns: 0,
                    }),
                    compute_infer: Some(StatisticDuration {
                        count: *runs,
                        ns: *ns,
                    }),
                    compute_output: Some(StatisticDuration {
                        count: *runs,
                        ns: 0,
                    }),
                })
                .collect()
        })
        .unwrap_or_default();
    ModelStatistics {
        name: served.manifest.name.clone(),
        version: served.manifest.version.clone(),
        last_inference: stats.last_inference_ms.load(Ordering::Relaxed),
        inference_count: stats.inference_count.load(Ordering::Relaxed),
        execution_count: stats.execution_count.load(Ordering::Relaxed),
        inference_stats: Some(InferStatistics {
            success: duration(&stats.success_count, &stats.success_ns),
            fail: duration(&stats.fail_count, &stats.fail_ns),
            queue: duration(&stats.queue_count, &stats.queue_ns),
            // Tensors are assembled and split inside the run; their time is in compute_infer.
            compute_input: Some(StatisticDuration {
                count: stats.compute_count.load(Ordering::Relaxed),
                ns: 0,
            }),
            compute_infer: duration(&stats.compute_count, &stats.compute_ns),
            compute_output: Some(StatisticDuration {
                count: stats.compute_count.load(Ordering::Relaxed),
                ns: 0,
            }),
            ..Default::default()
        }),
        batch_stats,
        ..Default::default()
    }
}

type InferStream = Pin<Box<dyn Stream<Item = Result<ModelStreamInferResponse, Status>> + Send>>;

#[tonic::async_trait]
impl GrpcInferenceService for KserveApi {
    async fn server_live(
        &self,
        _request: Request<ServerLiveRequest>,
    ) -> Result<Response<ServerLiveResponse>, Status> {
        Ok(Response::new(ServerLiveResponse { live: true }))
    }

    async fn server_ready(
        &self,
        _request: Request<ServerReadyRequest>,
    ) -> Result<Response<ServerReadyResponse>, Status> {
        let ready = self
            .repository
            .model_names()
            .iter()
            .any(|name| self.repository.served(name).is_some());
        Ok(Response::new(ServerReadyResponse { ready }))
    }

    async fn model_ready(
        &self,
        request: Request<ModelReadyRequest>,
    ) -> Result<Response<ModelReadyResponse>, Status> {
        let request = request.into_inner();
        let ready = self
            .repository
            .select(&request.name, &request.version)
            .is_ok();
        Ok(Response::new(ModelReadyResponse { ready }))
    }

    async fn server_metadata(
        &self,
        _request: Request<ServerMetadataRequest>,
    ) -> Result<Response<ServerMetadataResponse>, Status> {
        Ok(Response::new(ServerMetadataResponse {
            name: "medai-inference".to_owned(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            extensions: vec!["model_configuration".to_owned(), "statistics".to_owned()],
        }))
    }

    async fn model_metadata(
        &self,
        request: Request<ModelMetadataRequest>,
    ) -> Result<Response<ModelMetadataResponse>, Status> {
        let request = request.into_inner();
        let served = self.repository.select(&request.name, &request.version)?;
        let manifest = &served.manifest;
        Ok(Response::new(ModelMetadataResponse {
            name: manifest.name.clone(),
            versions: vec![manifest.version.clone()],
            platform: manifest.platform.clone(),
            inputs: vec![tensor_metadata(&manifest.input)],
            outputs: vec![tensor_metadata(&manifest.output)],
        }))
    }

    async fn model_infer(
        &self,
        request: Request<ModelInferRequest>,
    ) -> Result<Response<ModelInferResponse>, Status> {
        let deadline = caller_deadline(request.metadata(), Instant::now());
        let caller = Caller::of(&request)?;
        Ok(Response::new(
            self.infer(&caller, request.into_inner(), deadline).await?,
        ))
    }

    type ModelStreamInferStream = InferStream;

    async fn model_stream_infer(
        &self,
        request: Request<Streaming<ModelInferRequest>>,
    ) -> Result<Response<Self::ModelStreamInferStream>, Status> {
        let api = self.clone();
        let caller = Arc::new(Caller::of(&request)?);
        let answers = request
            .into_inner()
            .take_while(|item| futures::future::ready(item.is_ok()))
            .filter_map(|item| futures::future::ready(item.ok()))
            .map(move |item| {
                let api = api.clone();
                let caller = caller.clone();
                async move {
                    let id = item.id.clone();
                    Ok(match api.infer(&caller, item, None).await {
                        Ok(response) => ModelStreamInferResponse {
                            error_message: String::new(),
                            infer_response: Some(response),
                        },
                        Err(error) => ModelStreamInferResponse {
                            error_message: format!(
                                "{}: {error}",
                                medai_runtime::ServiceError::reason(&error)
                            ),
                            infer_response: Some(ModelInferResponse {
                                id,
                                ..Default::default()
                            }),
                        },
                    })
                }
            })
            .buffer_unordered(STREAM_CONCURRENCY);
        Ok(Response::new(Box::pin(answers)))
    }

    async fn model_config(
        &self,
        request: Request<ModelConfigRequest>,
    ) -> Result<Response<ModelConfigResponse>, Status> {
        let request = request.into_inner();
        let served = self.repository.select(&request.name, &request.version)?;
        let manifest = &served.manifest;
        let specific_version = manifest.version.parse::<i64>().ok();
        let dynamic_batching = (served.max_batch_rows > 1).then(|| {
            model_config::SchedulingChoice::DynamicBatching(ModelDynamicBatching {
                preferred_batch_size: vec![served.max_batch_rows as i32],
                max_queue_delay_microseconds: manifest.batching.max_queue_delay_microseconds,
            })
        });
        let config = ModelConfig {
            name: manifest.name.clone(),
            platform: manifest.platform.clone(),
            backend: "onnxruntime".to_owned(),
            version_policy: specific_version.map(|version| ModelVersionPolicy {
                policy_choice: Some(model_version_policy::PolicyChoice::Specific(
                    model_version_policy::Specific {
                        versions: vec![version],
                    },
                )),
            }),
            max_batch_size: served.max_batch_rows as i32,
            input: vec![ModelInput {
                name: manifest.input.name.clone(),
                data_type: DataType::TypeFp32 as i32,
                format: model_input::Format::Nhwc as i32,
                // With max_batch_size > 0, Triton lists dimensions without the batch one.
                dims: manifest.input.shape[1..].to_vec(),
            }],
            output: vec![ModelOutput {
                name: manifest.output.name.clone(),
                data_type: DataType::TypeFp32 as i32,
                dims: manifest.output.shape[1..].to_vec(),
                label_filename: String::new(),
            }],
            instance_group: vec![ModelInstanceGroup {
                name: manifest.name.clone(),
                kind: model_instance_group::Kind::Cpu as i32,
                count: served.sessions as i32,
            }],
            scheduling_choice: dynamic_batching,
        };
        Ok(Response::new(ModelConfigResponse {
            config: Some(config),
        }))
    }

    async fn model_statistics(
        &self,
        request: Request<ModelStatisticsRequest>,
    ) -> Result<Response<ModelStatisticsResponse>, Status> {
        let request = request.into_inner();
        let model_stats = if request.name.is_empty() {
            self.repository
                .model_names()
                .iter()
                .filter_map(|name| self.repository.served(name))
                .map(|served| statistics_message(&served))
                .collect()
        } else {
            let served = self.repository.select(&request.name, &request.version)?;
            vec![statistics_message(&served)]
        };
        Ok(Response::new(ModelStatisticsResponse { model_stats }))
    }

    /// Triton's repository index: every version in the repository, READY when served, else
    /// UNAVAILABLE with its lifecycle status as the reason (`ready` keeps the served ones).
    async fn repository_index(
        &self,
        request: Request<RepositoryIndexRequest>,
    ) -> Result<Response<RepositoryIndexResponse>, Status> {
        let request = request.into_inner();
        let models = self
            .repository
            .list()
            .into_iter()
            .filter(|view| view.ready || !request.ready)
            .map(|view| ModelIndex {
                state: if view.ready { "READY" } else { "UNAVAILABLE" }.to_owned(),
                reason: if view.ready {
                    String::new()
                } else {
                    view.status.as_str().to_owned()
                },
                name: view.name,
                version: view.version,
            })
            .collect();
        Ok(Response::new(RepositoryIndexResponse { models }))
    }
}
