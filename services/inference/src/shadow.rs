//! The shadow: a copy of each request the active version answered, run by the model's shadow
//! version off the answer's path. Copies wait in a bounded queue and are dropped (and counted)
//! when it is full, so the shadow never slows or refuses a real request. Each shadow answer is
//! stored as a SHADOW result beside the delivered one, compared with it, recorded in the
//! ledger (`SHADOW_INFERENCE`), and never delivered: its row is never marked delivered, so no
//! person sees it as a result and nobody can sign it.

use std::sync::Arc;

use medai_ledger_client::LedgerClient;
use serde_json::json;
use tokio::sync::mpsc;

use crate::batcher::ServedVersion;
use crate::decision_support::InputDomain;
use crate::predict::Predictor;
use crate::preprocess::ImageInput;
use crate::results::ResultsStore;
use crate::rollout::{RolloutFigures, Route};

/// The ledger action of a shadow answer.
pub const SHADOW_INFERENCE: &str = "SHADOW_INFERENCE";

/// One request copy for the shadow.
pub struct ShadowJob {
    pub served: Arc<ServedVersion>,
    pub image: ImageInput,
    pub domain: InputDomain,
    /// The delivered result the copy shadows, and its top label.
    pub active_result_id: String,
    pub active_top_label: String,
    pub image_sha256: String,
    pub patient_key: String,
    /// Who asked for the original request (the ledger's actor).
    pub actor: String,
    pub correlation_id: String,
}

/// Where request copies go; never waits.
#[derive(Clone)]
pub struct ShadowQueue {
    sender: mpsc::Sender<ShadowJob>,
    figures: Arc<RolloutFigures>,
}

impl ShadowQueue {
    /// Queues the copy, or drops and counts it when the queue is full; true if queued.
    pub fn offer(&self, job: ShadowJob) -> bool {
        match self.sender.try_send(job) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(job) | mpsc::error::TrySendError::Closed(job)) => {
                self.figures
                    .record_shadow_dropped(&job.served.manifest.name, &job.served.manifest.version);
                false
            }
        }
    }
}

/// What runs the copies.
pub struct ShadowRunner {
    pub predictor: Arc<Predictor>,
    pub results: ResultsStore,
    pub ledger: LedgerClient,
    pub figures: Arc<RolloutFigures>,
}

/// Starts the shadow's single worker over a queue of `capacity` copies.
pub fn start(capacity: usize, runner: ShadowRunner) -> (ShadowQueue, tokio::task::JoinHandle<()>) {
    let (sender, mut receiver) = mpsc::channel::<ShadowJob>(capacity.max(1));
    let queue = ShadowQueue {
        sender,
        figures: runner.figures.clone(),
    };
    let worker = tokio::spawn(async move {
        while let Some(job) = receiver.recv().await {
            runner.run(job).await;
        }
    });
    (queue, worker)
}

impl ShadowRunner {
    async fn run(&self, job: ShadowJob) {
        let model = job.served.manifest.name.clone();
        let version = job.served.manifest.version.clone();
        let prediction = match self
            .predictor
            .predict_on(job.served, Route::Shadow, job.image, &job.domain, None)
            .await
        {
            Ok(prediction) => prediction,
            Err(error) => {
                tracing::warn!(model = %model, version = %version, error = %error, "shadow prediction failed");
                metrics::counter!("medai_model_shadow_failures_total", "model" => model, "version" => version).increment(1);
                return;
            }
        };
        let top_label = prediction
            .top()
            .map(|(label, _)| label.clone())
            .unwrap_or_default();
        let agrees = top_label == job.active_top_label;
        self.figures.record_agreement(&model, &version, agrees);
        let row = prediction.to_row(
            uuid::Uuid::new_v4().to_string(),
            &job.image_sha256,
            &job.patient_key,
            None,
        );
        let stored = match row {
            Ok(mut row) => {
                row.shadow_of_result_id = job.active_result_id.clone();
                row.shadow_agreement = if agrees { "AGREES" } else { "DISAGREES" }.to_owned();
                self.results.insert(row).await
            }
            Err(error) => Err(error),
        };
        let stored = match stored {
            Ok((stored, _)) => stored,
            Err(error) => {
                tracing::error!(model = %model, version = %version, error = %error, "shadow result not stored");
                metrics::counter!("medai_model_shadow_failures_total", "model" => model, "version" => version).increment(1);
                return;
            }
        };
        let context = json!({
            "model": model,
            "version": version,
            "route": Route::Shadow.as_str(),
            "shadow_of": job.active_result_id,
            "agreement": stored.shadow_agreement,
            "top_label": stored.top_label,
            "content_sha256": stored.content_sha256,
            "content_hash_version": stored.content_hash_version,
            "delivered": false,
            "correlation_id": job.correlation_id,
        });
        if let Err(status) = self
            .ledger
            .record(
                &job.actor,
                SHADOW_INFERENCE,
                &format!("result/{}", stored.result_id),
                "SUCCESS",
                context,
            )
            .await
        {
            tracing::error!(code = ?status.code(), result_id = %stored.result_id, "shadow result not recorded in the ledger");
            metrics::counter!("medai_model_shadow_failures_total", "model" => model, "version" => version).increment(1);
        }
    }
}
