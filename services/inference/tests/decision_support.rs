//! Clinical decision support with the real brain-MRI model (issue 18): uncertainty figures,
//! the unusual-case flag and occlusion explanations, through the inference service on port 0
//! with real mTLS, ONNX Runtime and PostgreSQL; recomputed here with ONNX Runtime directly.

mod support;

use std::path::Path;

use medai_inference::config::RuntimeSettings;
use medai_inference::manifest::ModelManifest;
use medai_inference::preprocess::{ImageInput, to_input_tensor};
use medai_proto::common::v1::{CanonicalImage, SafeMetadata};
use medai_proto::inference::v1::{
    ExplainResultRequest, GetResultRequest, PredictResponse, RecordDeliveryRequest,
};
use medai_runtime::errors::reason_of;
use medai_testkit::Assets;
use ndarray::Array4;
use support::Harness;
use tonic::Code;

const BRAIN: &str = "brain-mri-tumor";

/// The brain-MRI model in a temp repository whose `[decision_support]` table is `table`.
fn brain_repository_with(table: &str) -> tempfile::TempDir {
    let repository = support::brain_repository();
    let path = repository
        .path()
        .join(BRAIN)
        .join("1")
        .join("manifest.toml");
    let text = std::fs::read_to_string(&path).expect("manifest");
    let head = text
        .split("[decision_support]")
        .next()
        .expect("manifest head")
        .to_owned();
    std::fs::write(&path, format!("{head}[decision_support]\n{table}")).expect("write manifest");
    repository
}

/// A real MR slice (pydicom's MR_small.dcm) decoded by the validation service's own decoder,
/// as the canonical image inference receives.
fn real_image(file: &str) -> CanonicalImage {
    let bytes = Assets::locate().dicom(file);
    let decoded = medai_validation::decode::decode_image(
        &bytes,
        None,
        &medai_validation::ImageLimits::default(),
    )
    .expect("decode");
    CanonicalImage {
        width: decoded.width,
        height: decoded.height,
        channels: decoded.channels,
        bit_depth: decoded.bit_depth,
        photometric_interpretation: decoded.photometric_interpretation.to_owned(),
        pixels: decoded.pixels.into(),
        metadata: Some(SafeMetadata {
            modality: decoded.metadata.modality,
            body_part_examined: decoded.metadata.body_part_examined,
            ..SafeMetadata::default()
        }),
        resized_for_model_input: false,
    }
}

fn input_of(image: &CanonicalImage) -> ImageInput {
    ImageInput {
        width: image.width,
        height: image.height,
        channels: image.channels,
        bit_depth: image.bit_depth,
        pixels: image.pixels.to_vec(),
        resized_for_model_input: false,
    }
}

/// The model's own output for `tensor`, through an ONNX Runtime session opened here.
struct DirectModel {
    session: ort::session::Session,
    manifest: ModelManifest,
}

impl DirectModel {
    fn open(repository: &Path) -> Self {
        let folder = repository.join(BRAIN).join("1");
        let manifest = ModelManifest::load(&folder.join("manifest.toml")).expect("manifest");
        let environment =
            medai_inference::model::onnx_environment(&Assets::locate().onnxruntime_library)
                .expect("onnx runtime");
        let session = medai_inference::model::open_sessions(
            &environment,
            &manifest,
            &folder,
            &RuntimeSettings::default(),
        )
        .expect("session")
        .remove(0);
        Self { session, manifest }
    }

    fn run(&mut self, tensor: Array4<f32>) -> Vec<f32> {
        medai_inference::model::run_rows(&mut self.session, &self.manifest, tensor)
            .expect("run")
            .remove(0)
    }
}

fn entropy_of(probabilities: &[f32]) -> f64 {
    let entropy: f64 = probabilities
        .iter()
        .map(|p| f64::from(*p))
        .filter(|p| *p > 0.0)
        .map(|p| -p * p.ln())
        .sum();
    entropy / (probabilities.len() as f64).ln()
}

fn probabilities(response: &PredictResponse) -> Vec<f32> {
    response
        .probabilities
        .iter()
        .map(|entry| entry.probability)
        .collect()
}

#[tokio::test]
async fn an_image_outside_the_intended_use_is_flagged_and_its_uncertainty_is_bound_by_the_content_hash()
 {
    let repository = brain_repository_with(
        "modalities = [\"MR\"]\nbody_parts = [\"BRAIN\", \"HEAD\"]\ntemperature = 2.0\nood_threshold = 0.6\n\
         [[decision_support.calibration]]\nconfidence_from = 0.0\nconfidence_to = 0.5\naccuracy_lower = 0.2\naccuracy_upper = 0.45\n\
         [[decision_support.calibration]]\nconfidence_from = 0.5\nconfidence_to = 1.0\naccuracy_lower = 0.55\naccuracy_upper = 0.9\n",
    );
    let harness = Harness::start(repository.path(), RuntimeSettings::default()).await;
    let mut gateway = harness.client_as("gateway");
    let mut direct = DirectModel::open(repository.path());

    // A real CT slice: outside the model's intended use (MR), flagged with that reason.
    let ct = real_image("CT_small.dcm");
    assert_eq!(ct.metadata.as_ref().expect("metadata").modality, "CT");
    let flagged = gateway
        .predict(support::predict(BRAIN, ct.clone()))
        .await
        .expect("prediction")
        .into_inner();
    let flag = flagged.unusual_case.clone().expect("unusual case");
    assert!(flag.flagged);
    assert!(
        flag.reasons
            .contains(&"MODALITY_OUTSIDE_INTENDED_USE".to_owned()),
        "{:?}",
        flag.reasons
    );
    assert!(
        !flag
            .reasons
            .contains(&"BODY_PART_OUTSIDE_INTENDED_USE".to_owned())
    );

    // The returned probabilities are the model's own output calibrated with temperature 2:
    // p^(1/2), renormalised. Entropy, margin, OOD score and band follow from them.
    let raw =
        direct.run(to_input_tensor(input_of(&ct), &direct.manifest.preprocessing).expect("tensor"));
    let roots: Vec<f64> = raw.iter().map(|p| f64::from(*p).sqrt()).collect();
    let total: f64 = roots.iter().sum();
    let returned = probabilities(&flagged);
    for (root, returned) in roots.iter().zip(&returned) {
        assert!(
            (root / total - f64::from(*returned)).abs() < 1e-4,
            "{raw:?} vs {returned}"
        );
    }
    let figures = flagged.uncertainty.expect("uncertainty");
    assert_eq!(figures.temperature, 2.0);
    assert!((entropy_of(&returned) - f64::from(figures.normalized_entropy)).abs() < 1e-5);
    let mut sorted = returned.clone();
    sorted.sort_by(|a, b| b.total_cmp(a));
    assert!(((sorted[0] - sorted[1]) - figures.top2_margin).abs() < 1e-6);
    assert!(((1.0 - sorted[0]) - figures.ood_score).abs() < 1e-6);
    let band = figures.confidence_band.expect("band from calibration data");
    let expected_band = if sorted[0] < 0.5 {
        (0.2, 0.45)
    } else {
        (0.55, 0.9)
    };
    assert_eq!((band.lower, band.upper), expected_band);
    assert_eq!(
        flag.reasons.contains(&"OUT_OF_DISTRIBUTION".to_owned()),
        figures.ood_score > 0.6
    );

    // A real MR slice with a quality failure reported by validation: IMAGE_QUALITY, and not
    // the modality.
    let mut mr_request = support::predict(BRAIN, real_image("MR_small.dcm"));
    mr_request.quality_findings = vec!["QUALITY_BLUR".to_owned()];
    let mr = gateway
        .predict(mr_request)
        .await
        .expect("prediction")
        .into_inner();
    let mr_flag = mr.unusual_case.clone().expect("unusual case");
    assert_eq!(
        mr_flag.reasons.first().map(String::as_str),
        Some("IMAGE_QUALITY")
    );
    assert!(
        !mr_flag
            .reasons
            .contains(&"MODALITY_OUTSIDE_INTENDED_USE".to_owned())
    );

    // GetResult shows the same figures and flag; the content hash (rule 2) binds them.
    gateway
        .record_delivery(RecordDeliveryRequest {
            result_id: flagged.result_id.clone(),
            ledger_seq: 1,
        })
        .await
        .expect("delivery");
    let stored = gateway
        .get_result(GetResultRequest {
            result_id: flagged.result_id.clone(),
            idempotency_key: String::new(),
        })
        .await
        .expect("get")
        .into_inner()
        .result
        .expect("result");
    assert_eq!(stored.content_hash_version, 3);
    assert_eq!(stored.uncertainty, flagged.uncertainty);
    assert_eq!(stored.unusual_case, flagged.unusual_case);
    assert_eq!(stored.decision_threshold, flagged.decision_threshold);
    assert_eq!(stored.model_version, "1");
    assert!(stored.explanations.is_empty());
    assert_eq!(
        medai_inference::results::content_sha256_of_message(&stored),
        stored.content_sha256
    );
    let mut unflagged = stored.clone();
    unflagged.unusual_case = Some(Default::default());
    assert_ne!(
        medai_inference::results::content_sha256_of_message(&unflagged),
        stored.content_sha256,
        "the flag is content"
    );
    let mut surer = stored.clone();
    if let Some(figures) = surer.uncertainty.as_mut() {
        figures.normalized_entropy /= 2.0;
    }
    assert_ne!(
        medai_inference::results::content_sha256_of_message(&surer),
        stored.content_sha256,
        "the uncertainty is content"
    );
}

#[tokio::test]
async fn an_occlusion_map_of_a_real_mr_image_names_the_cell_whose_occlusion_lowers_the_top_probability_most()
 {
    let repository = brain_repository_with("modalities = [\"MR\"]\n");
    // The machine these tests run on is shared: the time limit is not what is tested here.
    let settings = RuntimeSettings {
        explanation_time_limit_seconds: 3600,
        ..RuntimeSettings::default()
    };
    let harness = Harness::start(repository.path(), settings).await;
    let mut gateway = harness.client_as("gateway");
    let image = real_image("MR_small.dcm");
    let predicted = gateway
        .predict(support::predict(BRAIN, image.clone()))
        .await
        .expect("prediction")
        .into_inner();
    assert_eq!(
        predicted.unusual_case.as_ref().map(|flag| flag.flagged),
        Some(false)
    );

    let explain = |grid_rows: u32, grid_columns: u32, result_id: &str| ExplainResultRequest {
        result_id: result_id.to_owned(),
        image: Some(image.clone()),
        grid_rows,
        grid_columns,
    };
    let started = std::time::Instant::now();
    let explanation = gateway
        .explain_result(explain(8, 8, &predicted.result_id))
        .await
        .expect("explanation")
        .into_inner()
        .explanation
        .expect("explanation");
    let wall = started.elapsed();
    eprintln!(
        "explanation cost: one 8x8 occlusion map of the brain-MRI model = {} forward passes, {:.0} ms in the service, {:.0} ms end to end, on {} cores (load average {})",
        explanation.forward_passes,
        explanation.compute_ms,
        wall.as_secs_f64() * 1000.0,
        std::thread::available_parallelism().map_or(1, usize::from),
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    assert_eq!((explanation.grid_rows, explanation.grid_columns), (8, 8));
    assert_eq!(explanation.importance.len(), 64);
    assert_eq!(explanation.forward_passes, 65);
    assert_eq!(explanation.target_label, predicted.top_label);
    let png = image::load_from_memory(&explanation.heatmap_png).expect("png");
    assert_eq!((png.width(), png.height()), (240, 240));
    assert_eq!(
        (explanation.heatmap_width, explanation.heatmap_height),
        (240, 240)
    );
    let best = explanation
        .importance
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map(|(index, _)| index)
        .expect("cells");
    assert_eq!(
        (
            explanation.most_important_row,
            explanation.most_important_column
        ),
        ((best / 8) as u32, (best % 8) as u32)
    );
    assert!(
        explanation
            .importance
            .iter()
            .any(|value| value.abs() > 1e-6)
    );

    // One more forward pass here, through ONNX Runtime directly: the reported cell filled with
    // the image's per-channel mean lowers the top label's probability by what was reported.
    let mut direct = DirectModel::open(repository.path());
    let tensor = to_input_tensor(input_of(&image), &direct.manifest.preprocessing).expect("tensor");
    let target = direct
        .manifest
        .labels
        .iter()
        .position(|label| *label == predicted.top_label)
        .expect("label");
    let baseline = direct.run(tensor.clone())[target];
    assert!((baseline - explanation.baseline_probability).abs() < 1e-4);
    let (height, width, channels) = (tensor.shape()[1], tensor.shape()[2], tensor.shape()[3]);
    let means: Vec<f32> = (0..channels)
        .map(|channel| {
            let mut sum = 0.0f64;
            for y in 0..height {
                for x in 0..width {
                    sum += f64::from(tensor[[0, y, x, channel]]);
                }
            }
            (sum / (height * width) as f64) as f32
        })
        .collect();
    let mut occluded = tensor.clone();
    let (row, column) = (
        explanation.most_important_row as usize,
        explanation.most_important_column as usize,
    );
    for y in row * height / 8..(row + 1) * height / 8 {
        for x in column * width / 8..(column + 1) * width / 8 {
            for (channel, mean) in means.iter().enumerate() {
                occluded[[0, y, x, channel]] = *mean;
            }
        }
    }
    let drop = baseline - direct.run(occluded)[target];
    assert!(
        (drop - explanation.importance[best]).abs() < 1e-3,
        "recomputed drop {drop}, reported {}",
        explanation.importance[best]
    );

    // Refusals with stable codes: a grid over the cap, an unknown result, a caller that is not
    // the gateway.
    let status = gateway
        .explain_result(explain(32, 32, &predicted.result_id))
        .await
        .expect_err("grid too large");
    assert_eq!(
        (status.code(), reason_of(&status).as_deref()),
        (Code::InvalidArgument, Some("EXPLANATION_GRID_INVALID"))
    );
    let status = gateway
        .explain_result(explain(8, 8, &uuid::Uuid::new_v4().to_string()))
        .await
        .expect_err("unknown result");
    assert_eq!(
        (status.code(), reason_of(&status).as_deref()),
        (Code::NotFound, Some("RESULT_NOT_FOUND"))
    );
    let status = harness
        .client_as("validation")
        .explain_result(explain(2, 2, &predicted.result_id))
        .await
        .expect_err("not the gateway");
    assert_eq!(status.code(), Code::PermissionDenied);
}

// --- model rollout (issue 18): shadow, validation report, explanation slots ---

/// Adds version `version` of the brain-MRI model (same file, linked) with `status`; with
/// `research_use_only` false its manifest names no validation report, as a clinical version
/// missing its report would.
fn add_brain_version(root: &Path, version: &str, status: &str, research_use_only: bool) {
    let first = root.join(BRAIN).join("1");
    let folder = root.join(BRAIN).join(version);
    std::fs::create_dir_all(&folder).expect("version folder");
    let manifest = std::fs::read_to_string(first.join("manifest.toml"))
        .expect("manifest")
        .replace("version = \"1\"", &format!("version = \"{version}\""))
        .replace("status = \"active\"", &format!("status = \"{status}\""))
        .replace(
            "research_use_only = true",
            &format!("research_use_only = {research_use_only}"),
        );
    std::fs::write(folder.join("manifest.toml"), manifest).expect("manifest");
    let model = std::fs::canonicalize(first.join("model.onnx")).expect("model");
    std::os::unix::fs::symlink(model, folder.join("model.onnx")).expect("link the model");
}

fn brain_change(version: &str) -> medai_proto::inference::v1::ModelChange {
    medai_proto::inference::v1::ModelChange {
        model_name: BRAIN.to_owned(),
        model_version: version.to_owned(),
        reason: "CHG-77 shadow evaluation".to_owned(),
    }
}

#[tokio::test]
async fn a_shadow_brain_mri_version_answers_every_request_copy_into_the_store_and_ledger_and_is_never_delivered()
 {
    use medai_proto::inference::v1::{ListResultsRequest, StartShadowRequest, StopShadowRequest};
    let repository = support::brain_repository();
    add_brain_version(repository.path(), "2", "staged", true);
    let harness = Harness::start(repository.path(), RuntimeSettings::default()).await;
    let mut gateway = harness.client_as("gateway");
    let mut operator = harness.client_as("operator");
    let started = operator
        .start_shadow(StartShadowRequest {
            change: Some(brain_change("2")),
        })
        .await
        .expect("start the shadow")
        .into_inner()
        .outcome
        .expect("outcome")
        .changed
        .expect("changed");
    assert_eq!(started.rollout_role, "SHADOW");

    let image = real_image("MR_small.dcm");
    let mut delivered = Vec::new();
    for round in 0..3u32 {
        let request = medai_proto::inference::v1::PredictRequest {
            image_sha256: format!("{:064x}", round + 1),
            ..support::predict(BRAIN, image.clone())
        };
        let answer = gateway
            .predict(request)
            .await
            .expect("prediction")
            .into_inner();
        // Only the active version ever answers.
        assert_eq!(
            (answer.model_version.as_str(), answer.route.as_str()),
            ("1", "ACTIVE")
        );
        delivered.push((answer.result_id, answer.top_label));
    }

    // The shadow runs off the answer's path: wait (bounded) for its three ledger entries.
    let waited = std::time::Instant::now();
    let shadow_entries = loop {
        let entries: Vec<_> = harness
            .ledger()
            .await
            .into_iter()
            .filter(|(_, action, _, _)| action == "SHADOW_INFERENCE")
            .collect();
        if entries.len() == 3 {
            break entries;
        }
        assert!(
            waited.elapsed() < std::time::Duration::from_secs(120),
            "shadow entries: {entries:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    let listed = gateway
        .list_results(ListResultsRequest {
            model_name: BRAIN.to_owned(),
            ..ListResultsRequest::default()
        })
        .await
        .expect("list")
        .into_inner()
        .results;
    let shadows: Vec<_> = listed
        .iter()
        .filter(|result| result.route == "SHADOW")
        .collect();
    assert_eq!(shadows.len(), 3);
    for shadow in &shadows {
        assert_eq!(shadow.model_version, "2");
        assert_eq!(shadow.ledger_seq, 0, "a shadow result is never delivered");
        let (_, active_label) = delivered
            .iter()
            .find(|(id, _)| *id == shadow.shadow_of_result_id)
            .expect("the shadow names the delivered result it ran beside");
        // The same weights: the shadow agrees with the active answer.
        assert_eq!(&shadow.top_label, active_label);
        assert_eq!(shadow.shadow_agreement, "AGREES");
        assert_eq!(shadow.content_hash_version, 3);
        assert_eq!(
            medai_inference::results::content_sha256_of_message(shadow),
            shadow.content_sha256
        );
        assert!(
            shadow_entries
                .iter()
                .any(|(_, _, resource, _)| *resource == format!("result/{}", shadow.result_id)),
            "the shadow result is in the ledger"
        );
    }
    // People see delivered results only: no shadow is among them.
    let delivered_only = gateway
        .list_results(ListResultsRequest {
            model_name: BRAIN.to_owned(),
            delivered_only: true,
            ..ListResultsRequest::default()
        })
        .await
        .expect("list")
        .into_inner()
        .results;
    assert!(delivered_only.iter().all(|result| result.route != "SHADOW"));

    let report = operator
        .get_model_report(medai_proto::inference::v1::GetModelReportRequest {
            model_name: BRAIN.to_owned(),
            model_version: "2".to_owned(),
        })
        .await
        .expect("report")
        .into_inner()
        .report
        .expect("report");
    assert_eq!(report.role, "SHADOW");
    assert_eq!((report.shadow_compared, report.shadow_agreements), (3, 3));
    assert!(report.research_use_only && !report.has_reference);

    operator
        .stop_shadow(StopShadowRequest {
            change: Some(brain_change("2")),
        })
        .await
        .expect("stop the shadow");
    let actions: Vec<String> = harness
        .ledger()
        .await
        .into_iter()
        .map(|(_, action, _, _)| action)
        .filter(|action| action.starts_with("MODEL_"))
        .collect();
    assert_eq!(actions, ["MODEL_SHADOW_START", "MODEL_SHADOW_STOP"]);
}

#[tokio::test]
async fn a_brain_mri_version_without_a_validation_report_cannot_be_activated() {
    use medai_proto::inference::v1::{ActivateModelVersionRequest, StageModelVersionRequest};
    let repository = support::brain_repository();
    add_brain_version(repository.path(), "2", "staged", false);
    let harness = Harness::start(repository.path(), RuntimeSettings::default()).await;
    let mut operator = harness.client_as("operator");
    let status = operator
        .activate_model_version(ActivateModelVersionRequest {
            change: Some(brain_change("2")),
        })
        .await
        .expect_err("no validation report");
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(
        reason_of(&status).as_deref(),
        Some("VALIDATION_REPORT_MISSING")
    );
    assert!(harness.ledger().await.is_empty(), "nothing recorded");
    // Staging stays possible (it serves nothing); activation stays refused.
    operator
        .stage_model_version(StageModelVersionRequest {
            change: Some(brain_change("2")),
        })
        .await
        .expect_err("already staged");
    let versions = operator
        .list_models(medai_proto::inference::v1::ListModelsRequest {})
        .await
        .expect("list")
        .into_inner()
        .versions;
    let active: Vec<_> = versions
        .iter()
        .filter(|version| version.status == "ACTIVE")
        .map(|version| version.version.as_str())
        .collect();
    assert_eq!(active, ["1"]);
}

#[tokio::test]
async fn explanations_refuse_with_explanations_busy_when_full_while_predictions_go_through() {
    // One slot, no waiting place: a second explanation is refused while one runs.
    let settings = RuntimeSettings {
        explanation_slots: 1,
        explanation_waiting: 0,
        explanation_time_limit_seconds: 3600,
        ..RuntimeSettings::default()
    };
    let harness = Harness::start(support::brain_repository().path(), settings).await;
    let mut gateway = harness.client_as("gateway");
    let image = real_image("MR_small.dcm");
    let predicted = gateway
        .predict(support::predict(BRAIN, image.clone()))
        .await
        .expect("prediction")
        .into_inner();
    let explain = |grid: u32| ExplainResultRequest {
        result_id: predicted.result_id.clone(),
        image: Some(image.clone()),
        grid_rows: grid,
        grid_columns: grid,
    };
    // Rows the version has run so far (KServe statistics count every forward pass, the
    // explanation's included).
    let mut kserve = harness.kserve_as("operator");
    let mut rows_run = async || {
        kserve
            .model_statistics(medai_proto::kserve::ModelStatisticsRequest {
                name: BRAIN.to_owned(),
                version: String::new(),
            })
            .await
            .expect("statistics")
            .into_inner()
            .model_stats[0]
            .inference_count
    };
    let before = rows_run().await;
    // A long explanation (6×6 cells: 37 forward passes of the VGG16, seconds on 2 cores)
    // takes the only slot; once its first passes have run it holds it for the rest.
    let mut long_client = harness.client_as("gateway");
    let long_request = explain(6);
    let long = tokio::spawn(async move { long_client.explain_result(long_request).await });
    let waited = std::time::Instant::now();
    while rows_run().await == before {
        assert!(
            waited.elapsed() < std::time::Duration::from_secs(300),
            "the long explanation never ran"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let busy = gateway
        .explain_result(explain(1))
        .await
        .expect_err("every slot is taken");
    assert_eq!(busy.code(), Code::ResourceExhausted);
    assert_eq!(reason_of(&busy).as_deref(), Some("EXPLANATIONS_BUSY"));
    assert!(!long.is_finished(), "the long explanation is still running");
    // Predictions go through meanwhile.
    let during = gateway
        .predict(support::predict(BRAIN, image.clone()))
        .await
        .expect("a prediction while explanations are full")
        .into_inner();
    assert_eq!(during.top_label, predicted.top_label);
    assert!(
        !long.is_finished(),
        "the slot was still taken during the prediction"
    );
    eprintln!(
        "EXPLANATIONS_BUSY observed after {:.1} s; a prediction went through meanwhile",
        waited.elapsed().as_secs_f64()
    );
    // The long one completes on its own; the slot is free again afterwards.
    let finished = long
        .await
        .expect("task")
        .expect("the long explanation completes");
    assert_eq!(
        finished
            .into_inner()
            .explanation
            .expect("map")
            .forward_passes,
        37
    );
    gateway
        .explain_result(explain(1))
        .await
        .expect("a free slot explains again");
}
