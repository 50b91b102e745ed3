//! How much the mesh adds to one prediction: the median latency of a real brain-MRI prediction
//! through gateway → validation → inference → audit over mTLS, against the same image decoded
//! and run through the same model in-process. The mesh runs as the chart deploys it when the
//! suite's servers are up (`scripts/bench.sh` starts them): its ledger and results on PostgreSQL
//! (`MEDAI_TEST_POSTGRES_URL`), revocations and rate limits in Redis (`MEDAI_TEST_REDIS_URL`);
//! without them, on the embedded defaults (SQLite, each process's own revocation list), which
//! the output names. Every append is durable either way.
//! 20 timed runs each after 2 warm-up runs, in one run of this program. Prints the figures and
//! writes them to target/bench/prediction_latency.json.
//!
//! Run with `scripts/bench.sh` (builds the release service binaries first).

#![allow(clippy::print_stdout)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use medai_e2e::{MeshUnderTest, Storage, authorised};
use medai_proto::common::v1::ImageFormat;
use medai_proto::gateway::v1::InferRequest;
use medai_testkit::Assets;

const RUNS: usize = 20;
const WARM_UP: usize = 2;

/// Each service's calls as its server handled them so far: `"service Service/Method"` → (the
/// seconds they took in all, how many), from the `grpc_server_handling_seconds` histograms on
/// its admin endpoint.
async fn server_call_seconds(mesh: &MeshUnderTest) -> BTreeMap<String, (f64, f64)> {
    let mut calls = BTreeMap::new();
    for sample in medai_e2e::handling_samples(mesh, "grpc_server_handling_seconds").await {
        let entry: &mut (f64, f64) = calls
            .entry(format!("{} {}", sample.process, sample.call))
            .or_default();
        match sample.part.as_str() {
            "sum" => entry.0 += sample.value,
            "count" => entry.1 += sample.value,
            _ => {}
        }
    }
    calls
}

/// The mesh's storage, and how the output describes where its records and lists live.
fn deployment() -> (Storage, String) {
    let postgres = std::env::var_os("MEDAI_TEST_POSTGRES_URL").is_some();
    let redis = std::env::var_os("MEDAI_TEST_REDIS_URL").is_some();
    let storage = if postgres {
        Storage::Postgres
    } else {
        Storage::Sqlite
    };
    let described = format!(
        "with its ledger and results on {}, revocations and rate limits {}",
        if postgres { "PostgreSQL" } else { "SQLite" },
        if redis { "in Redis" } else { "in each process" }
    );
    (storage, described)
}

/// With the suite's Redis: revocations in production mode for auth and the gateway, and the
/// gateway's rate limits, in Redis, as the chart deploys them.
fn redis_environment() -> BTreeMap<String, Vec<(String, String)>> {
    let Ok(url) = std::env::var("MEDAI_TEST_REDIS_URL") else {
        return BTreeMap::new();
    };
    let revocation = |prefix: &str| {
        vec![
            (format!("{prefix}REVOCATION__MODE"), "production".to_owned()),
            (format!("{prefix}REVOCATION__REDIS_URL"), url.clone()),
        ]
    };
    let mut gateway = revocation("MEDAI_GATEWAY_");
    gateway.push((
        "MEDAI_GATEWAY_LOAD_CONTROL__REDIS_URL".to_owned(),
        url.clone(),
    ));
    BTreeMap::from([
        ("gateway".to_owned(), gateway),
        ("auth".to_owned(), revocation("MEDAI_AUTH_")),
    ])
}

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

    let (storage, deployment) = deployment();
    let mesh = MeshUnderTest::start_with(storage, redis_environment()).await;
    let token = mesh.admin_token().await;
    let mut gateway = mesh.gateway().await;
    let mut through_mesh = Vec::with_capacity(RUNS);
    let mut calls_before = BTreeMap::new();
    for run in 0..WARM_UP + RUNS {
        if run == WARM_UP {
            calls_before = server_call_seconds(&mesh).await;
        }
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
    let calls = server_call_seconds(&mesh).await;
    mesh.stop().await;

    let (mesh_median, mesh_min, mesh_max) = summary(through_mesh);
    let (direct_median, direct_min, direct_max) = summary(in_process);
    let ratio = mesh_median / direct_median;
    println!(
        "prediction latency, brain-mri-tumor VGG16 on MR_small.dcm, {RUNS} runs each; the mesh \
         {deployment}"
    );
    println!(
        "  in-process  median {direct_median:8.2} ms  (min {direct_min:.2}, max {direct_max:.2})"
    );
    println!("  through mesh median {mesh_median:8.2} ms  (min {mesh_min:.2}, max {mesh_max:.2})");
    println!(
        "  mesh / in-process  {ratio:.3}x  (+{:.2} ms per prediction)",
        mesh_median - direct_median
    );
    println!("  server time per prediction by call (the services' own histograms):");
    let mut per_call = serde_json::Map::new();
    for (call, (seconds, count)) in &calls {
        let (seconds_before, count_before) = calls_before.get(call).copied().unwrap_or_default();
        let (seconds, count) = (seconds - seconds_before, count - count_before);
        if count < 0.5 {
            continue;
        }
        let per_prediction_ms = seconds * 1000.0 / RUNS as f64;
        println!(
            "    {call:<48} {per_prediction_ms:8.2} ms  ({:.1} calls)",
            count / RUNS as f64
        );
        per_call.insert(call.clone(), serde_json::json!(per_prediction_ms));
    }

    let report = serde_json::json!({
        "benchmark": "prediction_latency",
        "runs": RUNS,
        "model": "brain-mri-tumor/1",
        "image": "MR_small.dcm",
        "mesh_deployment": deployment,
        "in_process_ms": { "median": direct_median, "min": direct_min, "max": direct_max },
        "through_mesh_ms": { "median": mesh_median, "min": mesh_min, "max": mesh_max },
        "ratio_mesh_over_in_process": ratio,
        "server_ms_per_prediction_by_call": per_call,
    });
    let directory = medai_testkit::workspace_root().join("target/bench");
    std::fs::create_dir_all(&directory).expect("bench folder");
    std::fs::write(
        directory.join("prediction_latency.json"),
        serde_json::to_string_pretty(&report).expect("json"),
    )
    .expect("write");
}
