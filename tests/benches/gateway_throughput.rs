//! Gateway throughput: predictions/s and p50/p99 latency through the whole mesh (gateway →
//! validation → inference → audit, every hop on mTLS, every ledger record durable in
//! PostgreSQL) with the synthetic light model, at rising concurrency, for unary calls and for
//! study streams, against the inference service called directly (KServe ModelInfer over mTLS)
//! in the same run. Prints the figures and writes target/bench/gateway_throughput.json.
//!
//! The gateway is sent the 256×256 textured PNG that `versus_monolith` sends (one generator,
//! [`medai_e2e::bench_images`]), so validation decodes and resizes it to the model's 64×64 as
//! in service; the direct baseline sends the model-sized tensor KServe clients send.
//!
//! Beside each unary level it prints the CPU microseconds per prediction of every mesh process
//! over that stretch (from /proc, user + system), the figure that does not depend on the
//! machine's other load. `MEDAI_BENCH_LEVELS=64` (comma separated) runs only those levels.
//!
//! Run with `scripts/bench.sh` (builds the release service binaries first).

#![allow(clippy::print_stdout)]

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use medai_e2e::bench_images::{TEXTURED_PNG_DESCRIPTION, textured_png as png};
use medai_e2e::process_cpu::{cpu_per_prediction, cpu_seconds_by_process};
use medai_e2e::{MeshUnderTest, Storage, authorised};
use medai_proto::common::v1::ImageFormat;
use medai_proto::gateway::v1 as gw;
use medai_proto::kserve::ModelInferRequest;
use medai_proto::kserve::grpc_inference_service_client::GrpcInferenceServiceClient;
use medai_proto::kserve::model_infer_request::InferInputTensor;
use medai_runtime::ServiceIdentity;
use medai_runtime::tls::TlsMaterial;
use medai_testkit::bench::{Throughput as Figures, write_report};
use tokio_stream::StreamExt;

const MODEL: &str = "synthetic-light";
const LEVELS: [usize; 4] = [1, 8, 32, 64];
const REQUESTS_PER_LEVEL: usize = 1536;

async fn unary(mesh: &MeshUnderTest, token: &str, concurrency: usize) -> Figures {
    let image = png();
    let per_client = REQUESTS_PER_LEVEL / concurrency;
    let mut channels = Vec::new();
    for _ in 0..concurrency.min(8) {
        channels.push(mesh.gateway().await);
    }
    let started = Instant::now();
    let mut clients = Vec::new();
    for index in 0..concurrency {
        let mut gateway = channels[index % channels.len()].clone();
        let token = token.to_owned();
        let image = image.clone();
        clients.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(per_client);
            for _ in 0..per_client {
                let request = gw::InferRequest {
                    image: image.clone().into(),
                    format: ImageFormat::Png.into(),
                    model_name: MODEL.to_owned(),
                    model_version: String::new(),
                    idempotency_key: String::new(),
                };
                let one = Instant::now();
                gateway
                    .infer(authorised(request, &token))
                    .await
                    .expect("prediction through the gateway");
                latencies.push(one.elapsed());
            }
            latencies
        }));
    }
    let mut latencies = Vec::new();
    for client in clients {
        latencies.extend(client.await.expect("client"));
    }
    Figures::measure(latencies, started.elapsed())
}

/// `streams` study streams at once, each carrying its share of the images; latency is from an
/// image's send to its tagged answer.
async fn streaming(mesh: &MeshUnderTest, token: &str, streams: usize) -> Figures {
    let image = png();
    let per_stream = REQUESTS_PER_LEVEL / streams;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..streams {
        let mut gateway = mesh.gateway().await;
        let token = token.to_owned();
        let image = image.clone();
        tasks.push(tokio::spawn(async move {
            let sent_at = std::sync::Arc::new(std::sync::Mutex::new(HashMap::new()));
            let (sender, outgoing) = tokio::sync::mpsc::channel(8);
            let stamps = sent_at.clone();
            let producer = tokio::spawn(async move {
                for index in 0..per_stream {
                    let tag = index.to_string();
                    let request = gw::StudyStreamRequest {
                        tag,
                        image: image.clone().into(),
                        format: ImageFormat::Png.into(),
                        model_name: MODEL.to_owned(),
                        ..Default::default()
                    };
                    if sender.send(request).await.is_err() {
                        return;
                    }
                }
            });
            // Latency runs from when the transport takes an image, not from when the client
            // queued it (the stream's backpressure holds the client's queue).
            let outgoing =
                tokio_stream::wrappers::ReceiverStream::new(outgoing).map(move |request| {
                    stamps
                        .lock()
                        .expect("stamps")
                        .insert(request.tag.clone(), Instant::now());
                    request
                });
            let mut answers = gateway
                .study_stream(authorised(outgoing, &token))
                .await
                .expect("stream")
                .into_inner();
            let mut latencies = Vec::with_capacity(per_stream);
            while let Some(answer) = answers.next().await {
                let answer = answer.expect("answer");
                assert!(matches!(
                    answer.outcome,
                    Some(gw::study_stream_response::Outcome::Result(_))
                ));
                let sent = sent_at.lock().expect("stamps").remove(&answer.tag);
                latencies.push(sent.expect("tag sent").elapsed());
            }
            producer.await.expect("producer");
            latencies
        }));
    }
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await.expect("stream task"));
    }
    Figures::measure(latencies, started.elapsed())
}

async fn direct(mesh: &MeshUnderTest, concurrency: usize) -> Figures {
    let layout = mesh.mesh.pki_layout();
    let tls = TlsMaterial::load(&medai_runtime::TlsFiles {
        ca_cert: layout.ca_certificate(),
        cert: layout.certificate("operator"),
        key: layout.key("operator"),
    })
    .expect("operator tls");
    let endpoint = format!(
        "https://{}",
        mesh.mesh.address("inference").expect("inference")
    );
    let channel = tls
        .channel(&endpoint, &ServiceIdentity::new("inference"))
        .expect("channel");
    let tensor: Vec<u8> = (0..64 * 64)
        .flat_map(|index| (((index * 37) % 251) as f32 / 255.0).to_le_bytes())
        .collect();
    let request = ModelInferRequest {
        model_name: MODEL.to_owned(),
        inputs: vec![InferInputTensor {
            name: "image".to_owned(),
            datatype: "FP32".to_owned(),
            shape: vec![1, 64, 64, 1],
            ..Default::default()
        }],
        raw_input_contents: vec![tensor],
        ..Default::default()
    };
    let per_client = REQUESTS_PER_LEVEL / concurrency;
    let started = Instant::now();
    let mut clients = Vec::new();
    for _ in 0..concurrency {
        let mut client = GrpcInferenceServiceClient::new(channel.clone());
        let request = request.clone();
        clients.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(per_client);
            for _ in 0..per_client {
                let one = Instant::now();
                client
                    .model_infer(request.clone())
                    .await
                    .expect("direct inference");
                latencies.push(one.elapsed());
            }
            latencies
        }));
    }
    let mut latencies = Vec::new();
    for client in clients {
        latencies.extend(client.await.expect("client"));
    }
    Figures::measure(latencies, started.elapsed())
}

#[tokio::main]
async fn main() {
    let unlimited = vec![
        (
            "MEDAI_GATEWAY_LOAD_CONTROL__PER_USER_PER_SECOND".to_owned(),
            "0".to_owned(),
        ),
        (
            "MEDAI_GATEWAY_LOAD_CONTROL__PER_CLIENT_PER_SECOND".to_owned(),
            "0".to_owned(),
        ),
        (
            "MEDAI_GATEWAY_LOAD_CONTROL__MAX_IN_FLIGHT".to_owned(),
            "100000".to_owned(),
        ),
        (
            "MEDAI_GATEWAY_PROCESS__LOG_FILTER".to_owned(),
            "warn".to_owned(),
        ),
    ];
    let quiet = |service: &str| {
        (
            service.to_owned(),
            vec![(
                format!("MEDAI_{}_PROCESS__LOG_FILTER", service.to_ascii_uppercase()),
                "warn".to_owned(),
            )],
        )
    };
    let mut extra = BTreeMap::from([("gateway".to_owned(), unlimited)]);
    extra.extend(["auth", "validation", "inference", "audit"].map(quiet));
    let mesh = MeshUnderTest::start_with(Storage::Postgres, extra).await;
    let token = mesh.admin_token().await;
    // Warm-up: connections, sessions, caches.
    unary(&mesh, &token, 8).await;

    println!(
        "gateway throughput, {MODEL}, {TEXTURED_PNG_DESCRIPTION} (the image versus_monolith sends), {REQUESTS_PER_LEVEL} predictions per level, every hop mTLS, ledger durable in PostgreSQL"
    );
    println!(
        "  {:>11}  {:>28}  {:>28}  {:>28}",
        "concurrency", "unary through gateway", "study streams", "inference direct (KServe)"
    );
    let mut report = serde_json::Map::new();
    let levels = medai_e2e::bench_levels(&LEVELS);
    let mut cpu_report = serde_json::Map::new();
    for level in levels {
        let cpu_before = cpu_seconds_by_process("other");
        let through = unary(&mesh, &token, level).await;
        let cpu = cpu_per_prediction(
            &cpu_before,
            &cpu_seconds_by_process("other"),
            REQUESTS_PER_LEVEL / level * level,
        );
        let streamed = streaming(&mesh, &token, level.min(16)).await;
        let baseline = direct(&mesh, level).await;
        let cell = |figures: Figures| {
            format!(
                "{:>7.0}/s p50 {:>6.2} p99 {:>6.2}",
                figures.per_second, figures.p50_ms, figures.p99_ms
            )
        };
        println!(
            "  {level:>11}  {}  {}  {}   gateway/direct {:.3}x",
            cell(through),
            cell(streamed),
            cell(baseline),
            through.per_second / baseline.per_second
        );
        println!(
            "  {level:>11}  unary CPU µs per prediction: {}",
            cpu.iter()
                .map(|(name, micros)| format!("{name} {micros:.0}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        cpu_report.insert(level.to_string(), serde_json::json!(cpu));
        report.insert(
            level.to_string(),
            serde_json::json!({
                "unary": through.to_json(),
                "streams": level.min(16),
                "streaming": streamed.to_json(),
                "direct": baseline.to_json(),
                "ratio_unary_over_direct": through.per_second / baseline.per_second,
            }),
        );
    }
    mesh.stop().await;
    report.insert(
        "unary_cpu_micros_per_prediction".to_owned(),
        serde_json::Value::Object(cpu_report),
    );
    write_report("gateway_throughput", serde_json::Value::Object(report));
}
