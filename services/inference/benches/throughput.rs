//! Inference throughput and latency: images/s and p50/p99 through the inference service
//! (KServe v2 ModelInfer over mTLS, raw tensors, concurrent clients) against ONNX Runtime
//! called in-process on the same model and the same tensors, for the brain-MRI model and the
//! synthetic light model, with dynamic batching on and off. Every request through the service
//! is recorded in the ledger before it is answered, as in production, so a real audit service
//! (on SQLite, the embedded default) runs beside it. It also times preprocessing (a 512×512
//! 16-bit grey image to each model's input) against the `image` crate's resize, the previous
//! path. One run of this program measures every figure and prints the ratios; it also writes
//! target/bench/inference_throughput.json.
//!
//! Run with `scripts/bench.sh`, or `cargo bench -p medai-inference --bench throughput`.

#![allow(clippy::print_stdout)]

use std::time::Instant;

use medai_inference::config::RuntimeSettings;
use medai_inference::manifest::ModelManifest;
use medai_inference::model::{onnx_environment, open_sessions, run_rows};
use medai_inference::preprocess::{ImageInput, to_input_tensor};
use medai_proto::kserve::ModelInferRequest;
use medai_proto::kserve::grpc_inference_service_client::GrpcInferenceServiceClient;
use medai_proto::kserve::model_infer_request::InferInputTensor;
use medai_testkit::bench::{Throughput as Figures, write_report};
use medai_testkit::{Assets, TestPki, TestServer, test_process_config, wait_until_serving};
use ndarray::Array4;

struct Workload {
    model: &'static str,
    /// Requests timed through the service, and in-process runs timed.
    requests: usize,
    /// Clients sending at once to the service.
    concurrency: usize,
}

fn manifest_of(model: &str) -> (ModelManifest, std::path::PathBuf) {
    let folder = Assets::locate().model_repository.join(model).join("1");
    let manifest = ModelManifest::load(&folder.join("manifest.toml")).expect("manifest");
    (manifest, folder)
}

/// A deterministic input of one row in the model's shape.
fn one_row(manifest: &ModelManifest) -> Array4<f32> {
    let shape: Vec<usize> = manifest.input.shape[1..]
        .iter()
        .map(|dim| *dim as usize)
        .collect();
    Array4::from_shape_fn((1, shape[0], shape[1], shape[2]), |(_, y, x, c)| {
        ((y * 31 + x * 7 + c) % 255) as f32 / 255.0
    })
}

/// ONNX Runtime on one session, one image per run, back to back.
fn in_process(workload: &Workload) -> Figures {
    let assets = Assets::locate();
    let environment = onnx_environment(&assets.onnxruntime_library).expect("onnx runtime");
    let (manifest, folder) = manifest_of(workload.model);
    let mut session = open_sessions(
        &environment,
        &manifest,
        &folder,
        &RuntimeSettings::default(),
    )
    .expect("session")
    .pop()
    .expect("one session");
    let row = one_row(&manifest);
    for _ in 0..3 {
        run_rows(&mut session, &manifest, row.clone()).expect("warm-up");
    }
    let started = Instant::now();
    let mut latencies = Vec::with_capacity(workload.requests);
    for _ in 0..workload.requests {
        let one = Instant::now();
        run_rows(&mut session, &manifest, row.clone()).expect("run");
        latencies.push(one.elapsed());
    }
    Figures::measure(latencies, started.elapsed())
}

async fn through_service(workload: &Workload, batching: bool) -> Figures {
    let assets = Assets::locate();
    let pki = TestPki::new();
    let state = tempfile::tempdir().expect("tempdir");
    let audit_config = medai_audit::AuditConfig {
        process: test_process_config(),
        tls: pki.files("audit"),
        database_url: format!(
            "sqlite://{}?mode=rwc",
            state.path().join("audit.sqlite").display()
        ),
        checkpoint_key_file: state.path().join("audit-checkpoint.key"),
        checkpoint_key_mode: medai_audit::config::CheckpointKeyMode::Generate,
        checkpoint_log_file: None,
        checkpoint_interval_seconds: 0,
        migration_database_url: None,
    };
    let audit = TestServer::start(|listener, shutdown| {
        medai_audit::serve(audit_config, listener, shutdown)
    })
    .await;
    wait_until_serving(&pki, audit.address, "audit").await;
    let repository = state.path().join("models");
    let (manifest, folder) = manifest_of(workload.model);
    let version = repository.join(workload.model).join("1");
    std::fs::create_dir_all(&version).expect("repository");
    std::fs::copy(folder.join("manifest.toml"), version.join("manifest.toml")).expect("manifest");
    std::os::unix::fs::symlink(
        std::fs::canonicalize(folder.join(&manifest.file)).expect("model"),
        version.join(&manifest.file),
    )
    .expect("link");
    let config = medai_inference::InferenceConfig {
        process: test_process_config(),
        tls: pki.files("inference"),
        model_repository: repository,
        onnxruntime_library: assets.onnxruntime_library.clone(),
        database_url: format!(
            "sqlite://{}?mode=rwc",
            state.path().join("results.sqlite").display()
        ),
        // Every KServe inference is recorded before it is answered.
        audit_endpoint: format!("https://{}", audit.address),
        runtime: RuntimeSettings {
            dynamic_batching: batching,
            queue_capacity: 4096,
            ..RuntimeSettings::default()
        },
        lifecycle: Default::default(),
    };
    let server =
        TestServer::start(|listener, shutdown| medai_inference::serve(config, listener, shutdown))
            .await;
    wait_until_serving(&pki, server.address, "inference").await;

    let row = one_row(&manifest);
    let request = ModelInferRequest {
        model_name: workload.model.to_owned(),
        inputs: vec![InferInputTensor {
            name: manifest.input.name.clone(),
            datatype: "FP32".to_owned(),
            shape: row.shape().iter().map(|dim| *dim as i64).collect(),
            ..Default::default()
        }],
        raw_input_contents: vec![row.iter().flat_map(|value| value.to_le_bytes()).collect()],
        ..Default::default()
    };
    let channel = pki.channel_as("operator", server.address, "inference");
    let mut warm = GrpcInferenceServiceClient::new(channel.clone());
    for _ in 0..3 {
        warm.model_infer(request.clone()).await.expect("warm-up");
    }
    let per_client = workload.requests / workload.concurrency;
    let started = Instant::now();
    let mut clients = Vec::new();
    for _ in 0..workload.concurrency {
        let mut client = GrpcInferenceServiceClient::new(channel.clone())
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20);
        let request = request.clone();
        clients.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(per_client);
            for _ in 0..per_client {
                let one = Instant::now();
                client
                    .model_infer(request.clone())
                    .await
                    .expect("inference through the service");
                latencies.push(one.elapsed());
            }
            latencies
        }));
    }
    let mut latencies = Vec::new();
    for client in clients {
        latencies.extend(client.await.expect("client"));
    }
    let wall = started.elapsed();
    server.stop().await;
    audit.stop().await;
    Figures::measure(latencies, wall)
}

fn print_row(label: &str, figures: Figures, baseline: Figures) {
    println!(
        "  {label:<28} {:>9.1} images/s  p50 {:>8.2} ms  p99 {:>8.2} ms  throughput {:.3}x in-process",
        figures.per_second,
        figures.p50_ms,
        figures.p99_ms,
        figures.per_second / baseline.per_second
    );
}

/// Milliseconds per image to turn a 512×512 16-bit grey image into `model`'s input: through
/// this service's preprocessing, and through the `image` crate's resize (the previous path).
fn preprocessing(model: &str) -> (f64, f64) {
    let (manifest, _) = manifest_of(model);
    let plan = manifest.preprocessing.clone();
    let side = 512u32;
    let image = ImageInput {
        width: side,
        height: side,
        channels: 1,
        bit_depth: 16,
        pixels: (0..side * side)
            .flat_map(|index| ((index * 37 % 4096) as u16).to_le_bytes())
            .collect(),
        resized_for_model_input: false,
    };
    let rounds = 40;
    let started = Instant::now();
    for _ in 0..rounds {
        std::hint::black_box(to_input_tensor(image.clone(), &plan).expect("tensor"));
    }
    let ours = started.elapsed().as_secs_f64() * 1000.0 / f64::from(rounds);
    let samples: Vec<u16> = image
        .pixels
        .chunks_exact(2)
        .map(|pair| u16::from_le_bytes([pair[0], pair[1]]))
        .collect();
    let started = Instant::now();
    for _ in 0..rounds {
        let grey =
            image::ImageBuffer::<image::Luma<u16>, Vec<u16>>::from_raw(side, side, samples.clone())
                .expect("buffer");
        let resized = image::DynamicImage::ImageLuma16(grey).resize_exact(
            plan.width,
            plan.height,
            image::imageops::FilterType::CatmullRom,
        );
        std::hint::black_box(resized.to_rgb8());
    }
    let image_crate = started.elapsed().as_secs_f64() * 1000.0 / f64::from(rounds);
    (ours, image_crate)
}

#[tokio::main]
async fn main() {
    let workloads = [
        Workload {
            model: "brain-mri-tumor",
            requests: 48,
            concurrency: 4,
        },
        Workload {
            model: "synthetic-light",
            requests: 2000,
            concurrency: 1,
        },
        Workload {
            model: "synthetic-light",
            requests: 6000,
            concurrency: 32,
        },
    ];
    let mut report = serde_json::Map::new();
    for model in ["brain-mri-tumor", "synthetic-light"] {
        let (ours, image_crate) = preprocessing(model);
        println!(
            "{model} preprocessing, 512×512 16-bit grey: {ours:.2} ms/image (image crate resize {image_crate:.2} ms, {:.1}x faster)",
            image_crate / ours
        );
        report.insert(
            format!("{model}/preprocessing"),
            serde_json::json!({ "ms_per_image": ours, "image_crate_ms_per_image": image_crate }),
        );
    }
    for workload in &workloads {
        let baseline = in_process(workload);
        let batched = through_service(workload, true).await;
        let unbatched = through_service(workload, false).await;
        println!(
            "{} — {} requests, {} concurrent clients over mTLS",
            workload.model, workload.requests, workload.concurrency
        );
        print_row("ort in-process (batch 1)", baseline, baseline);
        print_row("service, dynamic batching", batched, baseline);
        print_row("service, batching off", unbatched, baseline);
        report.insert(
            format!("{}/concurrency-{}", workload.model, workload.concurrency),
            serde_json::json!({
                "requests": workload.requests,
                "concurrency": workload.concurrency,
                "in_process": baseline.to_json(),
                "service_batching_on": batched.to_json(),
                "service_batching_off": unbatched.to_json(),
                "ratio_batching_on": batched.per_second / baseline.per_second,
                "ratio_batching_off": unbatched.per_second / baseline.per_second,
            }),
        );
    }
    write_report("inference_throughput", serde_json::Value::Object(report));
}
