//! How much the mesh adds to one prediction: the median latency of a real brain-MRI prediction
//! through gateway → validation → inference → audit over mTLS (embedded SQLite ledger, every
//! append durable), against the same image decoded and run through the same model in-process.
//! 20 timed runs each after 2 warm-up runs, in one run of this program. Prints the figures and
//! writes them to target/bench/prediction_latency.json.
//!
//! Run with `scripts/bench.sh` (builds the release service binaries first).

#![allow(clippy::print_stdout)]

use std::time::{Duration, Instant};

use medai_e2e::{MeshUnderTest, Storage, authorised};
use medai_proto::common::v1::ImageFormat;
use medai_proto::gateway::v1::InferRequest;
use medai_testkit::Assets;

const RUNS: usize = 20;
const WARM_UP: usize = 2;

fn summary(mut samples: Vec<Duration>) -> (f64, f64, f64) {
    samples.sort();
    let millis = |duration: Duration| duration.as_secs_f64() * 1000.0;
    let median = if samples.len().is_multiple_of(2) {
        (millis(samples[samples.len() / 2 - 1]) + millis(samples[samples.len() / 2])) / 2.0
    } else {
        millis(samples[samples.len() / 2])
    };
    (
        median,
        millis(samples[0]),
        millis(samples[samples.len() - 1]),
    )
}

#[tokio::main]
async fn main() {
    let assets = Assets::locate();
    let image = assets.dicom("MR_small.dcm");

    // In-process baseline: the same decode, the same preprocessing, the same ONNX session.
    let repository = medai_inference::load_repository(
        &assets.model_repository,
        &assets.onnxruntime_library,
        &Default::default(),
    )
    .expect("load the model in-process");
    let predictor = medai_inference::predict::Predictor {
        repository,
        figures: std::sync::Arc::default(),
    };
    let mut in_process = Vec::with_capacity(RUNS);
    for run in 0..WARM_UP + RUNS {
        let started = Instant::now();
        let canonical = medai_validation::decode::decode_image(
            &image,
            None,
            &medai_validation::ImageLimits::default(),
        )
        .expect("decode");
        let input = medai_inference::preprocess::ImageInput {
            width: canonical.width,
            height: canonical.height,
            channels: canonical.channels,
            bit_depth: canonical.bit_depth,
            pixels: canonical.pixels,
            resized_for_model_input: false,
        };
        predictor
            .predict("brain-mri-tumor", "", b"", input, &Default::default(), None)
            .await
            .expect("predict");
        if run >= WARM_UP {
            in_process.push(started.elapsed());
        }
    }
    drop(predictor);

    let mesh = MeshUnderTest::start(Storage::Sqlite).await;
    let token = mesh.admin_token().await;
    let mut gateway = mesh.gateway().await;
    let mut through_mesh = Vec::with_capacity(RUNS);
    for run in 0..WARM_UP + RUNS {
        let request = InferRequest {
            image: image.clone().into(),
            format: ImageFormat::Unspecified.into(),
            model_name: String::new(),
            model_version: String::new(),
            idempotency_key: String::new(),
        };
        let started = Instant::now();
        gateway
            .infer(authorised(request, &token))
            .await
            .expect("prediction through the mesh");
        if run >= WARM_UP {
            through_mesh.push(started.elapsed());
        }
    }
    mesh.stop().await;

    let (mesh_median, mesh_min, mesh_max) = summary(through_mesh);
    let (direct_median, direct_min, direct_max) = summary(in_process);
    let ratio = mesh_median / direct_median;
    println!("prediction latency, brain-mri-tumor VGG16 on MR_small.dcm, {RUNS} runs each");
    println!(
        "  in-process  median {direct_median:8.2} ms  (min {direct_min:.2}, max {direct_max:.2})"
    );
    println!("  through mesh median {mesh_median:8.2} ms  (min {mesh_min:.2}, max {mesh_max:.2})");
    println!(
        "  mesh / in-process  {ratio:.3}x  (+{:.2} ms per prediction)",
        mesh_median - direct_median
    );

    let report = serde_json::json!({
        "benchmark": "prediction_latency",
        "runs": RUNS,
        "model": "brain-mri-tumor/1",
        "image": "MR_small.dcm",
        "in_process_ms": { "median": direct_median, "min": direct_min, "max": direct_max },
        "through_mesh_ms": { "median": mesh_median, "min": mesh_min, "max": mesh_max },
        "ratio_mesh_over_in_process": ratio,
    });
    let directory = medai_testkit::workspace_root().join("target/bench");
    std::fs::create_dir_all(&directory).expect("bench folder");
    std::fs::write(
        directory.join("prediction_latency.json"),
        serde_json::to_string_pretty(&report).expect("json"),
    )
    .expect("write");
}
