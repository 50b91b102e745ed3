//! Inference throughput and latency: images/s and p50/p99 through the inference service
//! (KServe v2 ModelInfer over mTLS, raw tensors, concurrent clients) against ONNX Runtime
//! called in-process on the same model and the same tensors, for the brain-MRI model and the
//! synthetic light model, with dynamic batching on and off. Every request through the service
//! is recorded in the ledger before it is answered, as in production, so a real audit service
//! runs beside it, on the suite's PostgreSQL as deployed (fresh databases for the ledger and
//! the results; `MEDAI_TEST_POSTGRES_URL`, which `scripts/bench.sh` starts) or, without it, on
//! SQLite, the embedded default. It also times preprocessing (a 512×512
//! 16-bit grey image to each model's input) against the `image` crate's resize, the previous
//! path. One run of this program measures every figure and prints the ratios; it also writes
//! target/bench/inference_throughput.json.
//!
//! Versus KServe Python (issue 14: ModelInfer on the light model at ≥ 5× KServe's Python model
//! server at every concurrency from 1 to 64): the service as deployed (default runtime
//! settings, dynamic batching on) and KServe 0.21.0's own Python model server
//! (scripts/kserve-python/model.py: a `kserve.Model` running the same ONNX file with ONNX
//! Runtime on the same intra-op thread count, one process, no per-request log lines), started
//! in the same run on free ports, are driven by the same compiled tonic ModelInfer client with
//! the same request bytes (raw_input_contents) at concurrency 1, 4, 16 and 64, rounds
//! alternating (ours, theirs, ours, theirs). Both must first give the same answer (within
//! 1e-5). The comparison is conservative for us: ours records every inference durably in the
//! hash-chained ledger before answering and theirs records nothing; ours runs over mTLS and
//! theirs in plaintext (KServe's gRPC server has no TLS).
//!
//! Then Triton's perf_analyzer (scripts/kserve-clients.sh) drives the service over mTLS at the
//! same concurrencies and reports its throughput, client latencies, and the server-side queue
//! and compute times it reads from the service's statistics extension.
//!
//! Run with `scripts/bench.sh`, or `cargo bench --workspace --bench throughput` (after
//! `scripts/kserve-python.sh` and `scripts/kserve-clients.sh`). Arguments after `--` pick
//! sections (`preprocessing`, `service`, `kserve-python`, `perf-analyzer`); `--quick` divides
//! the request counts by 20 to check the program end to end, not to measure.

#![allow(clippy::print_stdout)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use medai_inference::config::RuntimeSettings;
use medai_inference::manifest::ModelManifest;
use medai_inference::model::{intra_op_threads, onnx_environment, open_sessions, run_rows};
use medai_inference::preprocess::{ImageInput, to_input_tensor};
use medai_proto::kserve::grpc_inference_service_client::GrpcInferenceServiceClient;
use medai_proto::kserve::model_infer_request::InferInputTensor;
use medai_proto::kserve::{
    ModelInferRequest, ModelInferResponse, ServerMetadataRequest, ServerReadyRequest,
};
use medai_testkit::bench::{Throughput as Figures, write_report};
use medai_testkit::{
    Assets, TestPki, TestServer, test_process_config, wait_until_serving, workspace_root,
};
use ndarray::Array4;
use tonic::transport::{Channel, Endpoint};

/// The model of the comparison with KServe's Python model server.
const KSERVE_PYTHON_MODEL: &str = "synthetic-light";
const KSERVE_PYTHON_LEVELS: [usize; 4] = [1, 4, 16, 64];
/// Rounds per level, alternating ours and theirs, so that a noisy neighbour hurts both alike.
const KSERVE_PYTHON_ROUNDS: usize = 2;

/// Requests per round at a concurrency, on each side.
fn kserve_python_requests_at(concurrency: usize) -> usize {
    match concurrency {
        1 => 1000,
        4 => 2000,
        _ => 3200,
    }
}

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

/// The inference service as deployed for one model, with the audit service it records every
/// KServe inference in ([`database_url`]), each on a port of its own.
struct ServiceUnderTest {
    pki: TestPki,
    audit: TestServer,
    inference: TestServer,
    _state: tempfile::TempDir,
}

/// A fresh database on the suite's PostgreSQL (production's store) when there is one, else a
/// SQLite file named `name` in `state`.
async fn database_url(state: &tempfile::TempDir, name: &str) -> String {
    if std::env::var_os("MEDAI_TEST_POSTGRES_URL").is_some() {
        return medai_testkit::fresh_postgres_database().await;
    }
    format!(
        "sqlite://{}?mode=rwc",
        state.path().join(format!("{name}.sqlite")).display()
    )
}

/// Where the ledger and the results are stored, for the report.
fn storage_name() -> &'static str {
    if std::env::var_os("MEDAI_TEST_POSTGRES_URL").is_some() {
        "PostgreSQL"
    } else {
        "SQLite"
    }
}

impl ServiceUnderTest {
    async fn start(model: &str, runtime: RuntimeSettings) -> Self {
        let assets = Assets::locate();
        let pki = TestPki::new();
        let state = tempfile::tempdir().expect("tempdir");
        let audit_config = medai_audit::AuditConfig {
            process: test_process_config(),
            tls: pki.files("audit"),
            database_url: database_url(&state, "audit").await,
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
        let (manifest, folder) = manifest_of(model);
        let version = repository.join(model).join("1");
        std::fs::create_dir_all(&version).expect("repository");
        std::fs::copy(folder.join("manifest.toml"), version.join("manifest.toml"))
            .expect("manifest");
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
            database_url: database_url(&state, "results").await,
            // Every KServe inference is recorded before it is answered.
            audit_endpoint: format!("https://{}", audit.address),
            runtime,
            lifecycle: Default::default(),
        };
        let inference = TestServer::start(|listener, shutdown| {
            medai_inference::serve(config, listener, shutdown)
        })
        .await;
        wait_until_serving(&pki, inference.address, "inference").await;
        Self {
            pki,
            audit,
            inference,
            _state: state,
        }
    }

    /// A channel over mTLS with the operator certificate.
    fn channel(&self) -> Channel {
        self.pki
            .channel_as("operator", self.inference.address, "inference")
    }

    async fn stop(self) {
        self.inference.stop().await;
        self.audit.stop().await;
    }
}

/// One ModelInfer request of one row in `model`'s input shape, as raw little-endian FP32.
fn infer_request(model: &str, manifest: &ModelManifest) -> ModelInferRequest {
    let row = one_row(manifest);
    ModelInferRequest {
        model_name: model.to_owned(),
        inputs: vec![InferInputTensor {
            name: manifest.input.name.clone(),
            datatype: "FP32".to_owned(),
            shape: row.shape().iter().map(|dim| *dim as i64).collect(),
            ..Default::default()
        }],
        raw_input_contents: vec![row.iter().flat_map(|value| value.to_le_bytes()).collect()],
        ..Default::default()
    }
}

/// Every call's latency and the wall time of a stretch of calls.
struct Calls {
    latencies: Vec<Duration>,
    wall: Duration,
}

impl Calls {
    fn figures(rounds: Vec<Self>) -> Figures {
        let wall = rounds.iter().map(|round| round.wall).sum();
        let latencies = rounds
            .into_iter()
            .flat_map(|round| round.latencies)
            .collect();
        Figures::measure(latencies, wall)
    }
}

/// The KServe v2 client of every figure here, whichever server `channel` reaches:
/// `concurrency` clients share the channel (HTTP/2 streams on one connection), each sends
/// `total / concurrency` ModelInfer calls back to back; any failed call stops the benchmark.
async fn drive(
    channel: Channel,
    request: &ModelInferRequest,
    concurrency: usize,
    total: usize,
) -> Calls {
    let per_client = (total / concurrency).max(1);
    let started = Instant::now();
    let mut clients = Vec::new();
    for _ in 0..concurrency {
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
                    .expect("ModelInfer");
                latencies.push(one.elapsed());
            }
            latencies
        }));
    }
    let mut latencies = Vec::new();
    for client in clients {
        latencies.extend(client.await.expect("client"));
    }
    Calls {
        latencies,
        wall: started.elapsed(),
    }
}

async fn through_service(workload: &Workload, batching: bool) -> Figures {
    let service = ServiceUnderTest::start(
        workload.model,
        RuntimeSettings {
            dynamic_batching: batching,
            queue_capacity: 4096,
            ..RuntimeSettings::default()
        },
    )
    .await;
    let (manifest, _) = manifest_of(workload.model);
    let request = infer_request(workload.model, &manifest);
    let channel = service.channel();
    drive(channel.clone(), &request, 1, 3).await;
    let calls = drive(channel, &request, workload.concurrency, workload.requests).await;
    service.stop().await;
    Calls::figures(vec![calls])
}

/// KServe's Python model server (scripts/kserve-python/model.py in .cache/kserve-python-venv)
/// serving one model on free ports, plaintext; killed when dropped.
struct KservePython {
    process: tokio::process::Child,
    grpc: SocketAddr,
    log: tempfile::NamedTempFile,
}

impl KservePython {
    async fn start(model: &str) -> Self {
        let root = workspace_root();
        let python = root.join(".cache/kserve-python-venv/bin/python");
        assert!(
            python.exists(),
            "{} is missing: run scripts/kserve-python.sh (scripts/bench.sh does)",
            python.display()
        );
        let (manifest, folder) = manifest_of(model);
        let model_file = folder.join(&manifest.file);
        // The thread count the inference service gives this model, by the same rule.
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        let model_bytes = std::fs::metadata(&model_file).expect("model file").len() as usize;
        let threads = intra_op_threads(&manifest, &RuntimeSettings::default(), model_bytes, cores);
        // Free ports: both listeners are held until both are known, so they differ.
        let (grpc_port, http_port) = {
            let grpc = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
            let http = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
            (
                grpc.local_addr().expect("port").port(),
                http.local_addr().expect("port").port(),
            )
        };
        let log = tempfile::NamedTempFile::new().expect("log file");
        let output = log.reopen().expect("log file");
        let process = tokio::process::Command::new(python)
            .arg(root.join("scripts/kserve-python/model.py"))
            .args(["--model_name", model, "--model_file"])
            .arg(&model_file)
            .args(["--input_name", &manifest.input.name])
            .args(["--output_name", &manifest.output.name])
            .args(["--intra_op_threads", &threads.to_string()])
            .args(["--grpc_port", &grpc_port.to_string()])
            .args(["--http_port", &http_port.to_string()])
            // No log line per request (KServe's default writes two), as on our side.
            .args(["--enable_latency_logging", "false"])
            .env("KSERVE_LOGLEVEL", "WARNING")
            .stdin(std::process::Stdio::null())
            .stdout(output.try_clone().expect("log file"))
            .stderr(output)
            .kill_on_drop(true)
            .spawn()
            .expect("start KServe's Python model server");
        let mut server = Self {
            process,
            grpc: ([127, 0, 0, 1], grpc_port).into(),
            log,
        };
        server.wait_until_ready().await;
        server
    }

    /// Polls KServe v2 ServerReady until it answers true (Python imports take seconds).
    async fn wait_until_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(status) = self.process.try_wait().expect("child status") {
                panic!(
                    "KServe's model server exited ({status}):\n{}",
                    self.log_text()
                );
            }
            if let Ok(channel) = self.endpoint().connect().await
                && let Ok(answer) = GrpcInferenceServiceClient::new(channel)
                    .server_ready(ServerReadyRequest {})
                    .await
                && answer.into_inner().ready
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "KServe's model server was not ready within 120 s:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn endpoint(&self) -> Endpoint {
        Endpoint::from_shared(format!("http://{}", self.grpc)).expect("endpoint")
    }

    async fn channel(&self) -> Channel {
        self.endpoint().connect().await.expect("connect to KServe")
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    async fn stop(mut self) {
        let _ = self.process.start_kill();
        let _ = self.process.wait().await;
    }
}

/// The FP32 values and shape of a ModelInfer answer's only output, sent raw or as contents.
fn only_output(answer: &ModelInferResponse) -> (Vec<i64>, Vec<f32>) {
    assert_eq!(answer.outputs.len(), 1, "one output expected: {answer:?}");
    let shape = answer.outputs[0].shape.clone();
    let values = match answer.raw_output_contents.first() {
        Some(raw) => raw
            .chunks_exact(4)
            .map(|bytes| f32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
            .collect(),
        None => answer.outputs[0]
            .contents
            .as_ref()
            .map(|contents| contents.fp32_contents.clone())
            .unwrap_or_default(),
    };
    (shape, values)
}

/// Both servers answer the same request with the same tensor (within 1e-5): a baseline that
/// computes something else would be worthless.
async fn check_same_answers(ours: Channel, theirs: Channel, request: &ModelInferRequest) {
    let ask = |channel: Channel| async move {
        let answer = GrpcInferenceServiceClient::new(channel)
            .model_infer(request.clone())
            .await
            .expect("ModelInfer")
            .into_inner();
        only_output(&answer)
    };
    let (our_shape, our_values) = ask(ours).await;
    let (their_shape, their_values) = ask(theirs).await;
    assert_eq!(our_shape, their_shape, "output shapes differ");
    assert!(
        !our_values.is_empty() && our_values.len() == their_values.len(),
        "output values differ in number: {our_values:?} vs {their_values:?}"
    );
    for (ours, theirs) in our_values.iter().zip(&their_values) {
        assert!(
            (ours - theirs).abs() <= 1e-5,
            "the answers differ: ours {our_values:?}, KServe Python's {their_values:?}"
        );
    }
    println!("  same answer from both (within 1e-5): {our_values:?}");
}

/// The inference service (mTLS, every inference recorded in the ledger before it is answered)
/// against KServe's Python model server (plaintext, records nothing) on the light model, with
/// the same compiled client and the same request bytes at each concurrency, rounds alternating.
async fn versus_kserve_python(scale: usize) -> serde_json::Value {
    let (manifest, _) = manifest_of(KSERVE_PYTHON_MODEL);
    let request = infer_request(KSERVE_PYTHON_MODEL, &manifest);
    let service = ServiceUnderTest::start(KSERVE_PYTHON_MODEL, RuntimeSettings::default()).await;
    let kserve = KservePython::start(KSERVE_PYTHON_MODEL).await;
    let ours = service.channel();
    let theirs = kserve.channel().await;
    // Which KServe answers, in its own words (`kserve` and the installed package's version).
    let metadata = GrpcInferenceServiceClient::new(theirs.clone())
        .server_metadata(ServerMetadataRequest {})
        .await
        .expect("KServe's ServerMetadata")
        .into_inner();
    let their_server = format!("{} {}", metadata.name, metadata.version);
    println!(
        "{KSERVE_PYTHON_MODEL} — the inference service (mTLS, ledger on {}) vs {their_server} Python model server (plaintext, no records), {KSERVE_PYTHON_ROUNDS} alternating rounds per level",
        storage_name()
    );
    check_same_answers(ours.clone(), theirs.clone(), &request).await;
    // Warm-up on both: connections, sessions, Python's first calls.
    drive(ours.clone(), &request, 4, 256 / scale).await;
    drive(theirs.clone(), &request, 4, 256 / scale).await;
    println!(
        "  {:>11}  {:>34}  {:>34}  {:>10}",
        "concurrency", "ours", "KServe Python", "ours/theirs"
    );
    let mut report = serde_json::Map::new();
    report.insert("kserve_server".to_owned(), serde_json::json!(their_server));
    for concurrency in KSERVE_PYTHON_LEVELS {
        let total = (kserve_python_requests_at(concurrency) / scale).max(concurrency);
        let (mut our_rounds, mut their_rounds) = (Vec::new(), Vec::new());
        for _ in 0..KSERVE_PYTHON_ROUNDS {
            our_rounds.push(drive(ours.clone(), &request, concurrency, total).await);
            their_rounds.push(drive(theirs.clone(), &request, concurrency, total).await);
        }
        let (our_figures, their_figures) =
            (Calls::figures(our_rounds), Calls::figures(their_rounds));
        let ratio = our_figures.per_second / their_figures.per_second;
        println!(
            "  {concurrency:>11}  {}  {}  {ratio:>10.2}x",
            cell(our_figures),
            cell(their_figures)
        );
        report.insert(
            concurrency.to_string(),
            serde_json::json!({
                "requests_per_round": total / concurrency * concurrency,
                "rounds": KSERVE_PYTHON_ROUNDS,
                "ours": our_figures.to_json(),
                "kserve_python": their_figures.to_json(),
                "ratio_ours_over_kserve_python": ratio,
            }),
        );
    }
    kserve.stop().await;
    service.stop().await;
    serde_json::Value::Object(report)
}

fn cell(figures: Figures) -> String {
    format!(
        "{:>7.0}/s p50 {:>6.2} ms p99 {:>7.2} ms",
        figures.per_second, figures.p50_ms, figures.p99_ms
    )
}

/// The CUDA runtime library perf_analyzer links (loaded, never used: no GPU is asked for).
fn cuda_runtime_dir() -> PathBuf {
    let lib = workspace_root().join(".cache/kserve-venv/lib");
    std::fs::read_dir(&lib)
        .expect("the kserve venv: run scripts/kserve-clients.sh (scripts/bench.sh does)")
        .filter_map(Result::ok)
        .map(|entry| entry.path().join("site-packages/nvidia/cuda_runtime/lib"))
        .find(|path| path.is_dir())
        .expect("nvidia-cuda-runtime-cu12 in the kserve venv")
}

/// Triton's perf_analyzer (scripts/kserve-clients.sh) against the inference service over mTLS
/// at each concurrency: its throughput and client latencies, and the server-side queue and
/// compute times it reads from the service's statistics extension (microseconds).
async fn perf_analyzer_on_ours(quick: bool) -> serde_json::Value {
    let perf_analyzer = workspace_root().join(".cache/perf-analyzer/perf_analyzer");
    assert!(
        perf_analyzer.is_file(),
        "{} is missing: run scripts/kserve-clients.sh (scripts/bench.sh does)",
        perf_analyzer.display()
    );
    let service = ServiceUnderTest::start(KSERVE_PYTHON_MODEL, RuntimeSettings::default()).await;
    let files = service.pki.files("operator");
    let folder = tempfile::tempdir().expect("tempdir");
    // Windows of 5 s until three in a row agree within 15 % (perf_analyzer's rule), at most 20.
    let (interval, trials, stability) = if quick {
        ("1000", "10", "100")
    } else {
        ("5000", "20", "15")
    };
    println!(
        "{KSERVE_PYTHON_MODEL} — Triton's perf_analyzer against the inference service (mTLS, ledger); server-side times from its statistics extension"
    );
    // The service's statistics cover a request's queue and compute; the rest of its time on the
    // server (decoding, the ledger record before the answer) counts in perf_analyzer's
    // "Network+Server Send/Recv".
    println!(
        "  {:>11}  {:>10}  {:>9}  {:>9}  {:>9}  {:>9}  {:>9}  {:>9}  {:>13}",
        "concurrency",
        "infer/s",
        "p50 µs",
        "p99 µs",
        "queue µs",
        "input µs",
        "infer µs",
        "output µs",
        "net+server µs"
    );
    let mut report = serde_json::Map::new();
    for concurrency in KSERVE_PYTHON_LEVELS {
        let csv = folder.path().join(format!("concurrency-{concurrency}.csv"));
        let output = tokio::process::Command::new(&perf_analyzer)
            .env("LD_LIBRARY_PATH", cuda_runtime_dir())
            .args(["-m", KSERVE_PYTHON_MODEL, "-i", "grpc", "-u"])
            .arg(service.inference.address.to_string())
            .args([
                "--ssl-grpc-use-ssl",
                "true",
                "--ssl-grpc-root-certifications-file",
            ])
            .arg(&files.ca_cert)
            .arg("--ssl-grpc-private-key-file")
            .arg(&files.key)
            .arg("--ssl-grpc-certificate-chain-file")
            .arg(&files.cert)
            .arg("--concurrency-range")
            .arg(format!("{concurrency}:{concurrency}"))
            .args(["--measurement-interval", interval])
            .args(["--max-trials", trials])
            .args(["--stability-percentage", stability])
            // Its default random bytes read as FP32 include NaNs, which the service refuses.
            .args(["--input-data", "zero", "-f"])
            .arg(&csv)
            .kill_on_drop(true)
            .output()
            .await
            .expect("run perf_analyzer");
        if !output.status.success() {
            // Most often no stable measurement on a busy machine: said and recorded, and the
            // other levels (and the rest of the report) still measured.
            let stdout = String::from_utf8_lossy(&output.stdout);
            let reason = stdout
                .lines()
                .chain(String::from_utf8_lossy(&output.stderr).lines())
                .filter(|line| line.contains("ailed") || line.contains("rror"))
                .collect::<Vec<_>>()
                .join(" ");
            println!("  {concurrency:>11}  perf_analyzer failed: {reason}");
            report.insert(
                concurrency.to_string(),
                serde_json::json!({ "failed": reason }),
            );
            continue;
        }
        let table = std::fs::read_to_string(&csv).expect("perf_analyzer's CSV");
        let row = perf_analyzer_row(&table);
        let column = |name: &str| {
            *row.get(name)
                .unwrap_or_else(|| panic!("no {name} column in perf_analyzer's CSV:\n{table}"))
        };
        println!(
            "  {concurrency:>11}  {:>10.1}  {:>9.0}  {:>9.0}  {:>9.0}  {:>9.0}  {:>9.0}  {:>9.0}  {:>13.0}",
            column("Inferences/Second"),
            column("p50 latency"),
            column("p99 latency"),
            column("Server Queue"),
            column("Server Compute Input"),
            column("Server Compute Infer"),
            column("Server Compute Output"),
            column("Network+Server Send/Recv"),
        );
        report.insert(concurrency.to_string(), serde_json::json!(row));
    }
    service.stop().await;
    serde_json::Value::Object(report)
}

/// The measured row of perf_analyzer's CSV (one concurrency), by column name.
fn perf_analyzer_row(table: &str) -> BTreeMap<String, f64> {
    let mut lines = table.lines();
    let header: Vec<&str> = lines.next().unwrap_or_default().split(',').collect();
    let values: Vec<&str> = lines.next().unwrap_or_default().split(',').collect();
    header
        .iter()
        .zip(&values)
        .filter_map(|(name, value)| Some(((*name).to_owned(), value.trim().parse().ok()?)))
        .collect()
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

/// The sections this program runs: all by default, or those named as arguments
/// (`cargo bench --workspace --bench throughput -- kserve-python perf-analyzer`). `--quick`
/// divides every request count by 20 and shortens perf_analyzer's trials: it proves the program
/// works end to end (for example in a debug build), its figures mean nothing.
struct Options {
    sections: Vec<String>,
    scale: usize,
}

const SECTIONS: [&str; 4] = ["preprocessing", "service", "kserve-python", "perf-analyzer"];

impl Options {
    fn from_arguments() -> Self {
        let mut options = Self {
            sections: Vec::new(),
            scale: 1,
        };
        // cargo bench passes `--bench`; other flags are the harness's and mean nothing here.
        for argument in std::env::args().skip(1) {
            if argument == "--quick" {
                options.scale = 20;
            } else if !argument.starts_with('-') {
                assert!(
                    SECTIONS.contains(&argument.as_str()),
                    "unknown section {argument}; the sections are {SECTIONS:?}"
                );
                options.sections.push(argument);
            }
        }
        options
    }

    fn runs(&self, section: &str) -> bool {
        self.sections.is_empty() || self.sections.iter().any(|named| named == section)
    }
}

#[tokio::main]
async fn main() {
    let options = Options::from_arguments();
    let requests = |count: usize, concurrency: usize| (count / options.scale).max(concurrency);
    let workloads = [
        Workload {
            model: "brain-mri-tumor",
            requests: requests(48, 4),
            concurrency: 4,
        },
        Workload {
            model: "synthetic-light",
            requests: requests(2000, 1),
            concurrency: 1,
        },
        Workload {
            model: "synthetic-light",
            requests: requests(6000, 32),
            concurrency: 32,
        },
    ];
    let mut report = serde_json::Map::new();
    for model in ["brain-mri-tumor", "synthetic-light"] {
        if !options.runs("preprocessing") {
            break;
        }
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
        if !options.runs("service") {
            break;
        }
        let baseline = in_process(workload);
        let batched = through_service(workload, true).await;
        let unbatched = through_service(workload, false).await;
        println!(
            "{} — {} requests, {} concurrent clients over mTLS, ledger and results on {}",
            workload.model,
            workload.requests,
            workload.concurrency,
            storage_name()
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
    if options.runs("kserve-python") {
        report.insert(
            format!("{KSERVE_PYTHON_MODEL}/versus-kserve-python"),
            versus_kserve_python(options.scale).await,
        );
    }
    if options.runs("perf-analyzer") {
        report.insert(
            format!("{KSERVE_PYTHON_MODEL}/perf-analyzer"),
            perf_analyzer_on_ours(options.scale > 1).await,
        );
    }
    if options.scale > 1 {
        report.insert("quick".to_owned(), serde_json::json!(true));
    }
    write_report("inference_throughput", serde_json::Value::Object(report));
}
