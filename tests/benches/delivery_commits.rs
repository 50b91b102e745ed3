//! Issue 14, a measurement: at concurrency 64 and 1, through the gateway with the light model
//! and the benchmarks' textured 256×256 PNG (as versus_monolith drives the mesh), inference's
//! result commits and note calls (RecordDelivery + RecordDeliveries) per prediction, and CPU µs
//! per prediction by process and of the suite's PostgreSQL (from /proc). Two rounds per level.
//! `source scripts/test-servers.sh; cargo bench --workspace --bench delivery_commits` (release
//! binaries from target/release; compare runs made side by side only).

#![allow(clippy::print_stdout)]

use std::collections::BTreeMap;

use medai_e2e::{MeshUnderTest, Storage, authorised, metric_sum};
use medai_proto::common::v1::ImageFormat;
use medai_proto::gateway::v1 as gw;

const LIGHT: &str = "synthetic-light";

/// (result commits, RecordDelivery calls, RecordDeliveries calls, delivery-note commits) so far.
async fn inference_figures(mesh: &MeshUnderTest) -> (f64, f64, f64, f64) {
    let address = mesh
        .mesh
        .admin_address("inference")
        .expect("inference has an admin port");
    let exposition = medai_e2e::http_get(address, "/metrics").await;
    let handled = |method: &str| {
        metric_sum(
            &exposition,
            "grpc_server_handled_total",
            &[("grpc_method", method), ("grpc_code", "OK")],
        )
    };
    let commits = |write: &str| {
        metric_sum(
            &exposition,
            "medai_inference_results_commits_total",
            &[("write", write)],
        )
    };
    (
        commits("result"),
        handled("RecordDelivery"),
        handled("RecordDeliveries"),
        commits("delivery_notes"),
    )
}
#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let quiet = |service: &str| {
        let prefix = format!("MEDAI_{}_", service.to_ascii_uppercase());
        let mut variables = vec![(format!("{prefix}PROCESS__LOG_FILTER"), "warn".to_owned())];
        if service == "gateway" {
            for (name, value) in [
                ("LOAD_CONTROL__PER_USER_PER_SECOND", "0"),
                ("LOAD_CONTROL__PER_CLIENT_PER_SECOND", "0"),
                ("LOAD_CONTROL__MAX_IN_FLIGHT", "100000"),
            ] {
                variables.push((format!("{prefix}{name}"), value.to_owned()));
            }
        }
        (service.to_owned(), variables)
    };
    let extra = ["gateway", "auth", "validation", "inference", "audit"]
        .map(quiet)
        .into_iter()
        .collect();
    let mesh = MeshUnderTest::start_with(Storage::Postgres, extra).await;
    let token = mesh.admin_token().await;
    let image = medai_e2e::bench_images::textured_png();
    let mut channels = Vec::new();
    for _ in 0..8 {
        channels.push(mesh.gateway().await);
    }
    let round = |concurrency: usize, total: usize| {
        let channels = channels.clone();
        let token = token.clone();
        let image = image.clone();
        async move {
            let mut clients = Vec::new();
            for index in 0..concurrency {
                let mut gateway = channels[index % channels.len()].clone();
                let token = token.clone();
                let image = image.clone();
                clients.push(tokio::spawn(async move {
                    for _ in 0..total / concurrency {
                        let request = gw::InferRequest {
                            image: image.clone().into(),
                            format: ImageFormat::Png.into(),
                            model_name: LIGHT.to_owned(),
                            ..Default::default()
                        };
                        gateway
                            .infer(authorised(request, &token))
                            .await
                            .expect("prediction");
                    }
                }));
            }
            for client in clients {
                client.await.expect("client");
            }
        }
    };
    round(4, 256).await;
    for (concurrency, total) in [(64, 1536), (1, 512)] {
        for _ in 0..2 {
            let (commits_before, single_before, batch_before, notes_before) =
                inference_figures(&mesh).await;
            let cpu_before = medai_e2e::process_cpu::cpu_seconds_by_process("other");
            let postgres_before = medai_e2e::process_cpu::postgres_cpu_seconds();
            let started = std::time::Instant::now();
            round(concurrency, total).await;
            let wall = started.elapsed();
            let cpu_after = medai_e2e::process_cpu::cpu_seconds_by_process("other");
            let postgres = (medai_e2e::process_cpu::postgres_cpu_seconds() - postgres_before) * 1e6
                / total as f64;
            let (commits_after, single_after, batch_after, notes_after) =
                inference_figures(&mesh).await;
            let per = |figure: f64| figure / total as f64;
            let cpu: BTreeMap<String, f64> =
                medai_e2e::process_cpu::cpu_per_prediction(&cpu_before, &cpu_after, total);
            let cpu = cpu
                .iter()
                .map(|(name, micros)| format!("{name} {micros:.0}"))
                .collect::<Vec<_>>()
                .join(", ");
            println!(
                "c={concurrency} n={total} {:.0}/s: result commits/prediction {:.3}, note commits/prediction {:.3}, note calls/prediction {:.3} ({} RecordDelivery, {} RecordDeliveries); CPU µs/prediction: {cpu}, postgres {postgres:.0}",
                total as f64 / wall.as_secs_f64(),
                per(commits_after - commits_before),
                per(notes_after - notes_before),
                per((single_after - single_before) + (batch_after - batch_before)),
                single_after - single_before,
                batch_after - batch_before,
            );
        }
    }
    mesh.stop().await;
}
