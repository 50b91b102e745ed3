//! KServe v2 against the inference service over mTLS: tonic calls for the refusals, and
//! Triton's own Python client (tritonclient[grpc] from PyPI, prepared by
//! scripts/kserve-clients.sh) for conformance.

mod support;

use medai_inference::config::RuntimeSettings;
use medai_proto::kserve::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};
use medai_proto::kserve::{
    InferTensorContents, ModelInferRequest, ModelInferResponse, ModelMetadataRequest,
    RepositoryIndexRequest, ServerLiveRequest,
};
use medai_runtime::errors::reason_of;
use medai_testkit::workspace_root;
use support::{Harness, LIGHT, add_light_version, light_repository};
use tonic::Code;

fn pattern(rows: usize) -> Vec<f32> {
    (0..rows * 64 * 64)
        .map(|index| (index % 97) as f32 / 97.0)
        .collect()
}

fn typed_request(rows: usize) -> ModelInferRequest {
    ModelInferRequest {
        model_name: LIGHT.to_owned(),
        id: "typed".to_owned(),
        inputs: vec![InferInputTensor {
            name: "image".to_owned(),
            datatype: "FP32".to_owned(),
            shape: vec![rows as i64, 64, 64, 1],
            contents: Some(InferTensorContents {
                fp32_contents: pattern(rows),
                ..Default::default()
            }),
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn raw_request(rows: usize) -> ModelInferRequest {
    let mut request = typed_request(rows);
    request.id = "raw".to_owned();
    request.inputs[0].contents = None;
    request.raw_input_contents = vec![
        pattern(rows)
            .iter()
            .flat_map(|value| value.to_le_bytes())
            .collect(),
    ];
    request
}

fn scores(response: &ModelInferResponse) -> Vec<f32> {
    response.raw_output_contents[0]
        .chunks_exact(4)
        .map(|bytes| f32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
        .collect()
}

#[tokio::test]
async fn typed_and_raw_tensors_give_the_same_scores_and_bad_tensors_are_refused() {
    let repository = light_repository(&[("1", "active")]);
    let harness = Harness::start(repository.path(), RuntimeSettings::default()).await;
    let mut kserve = harness.kserve_as("operator");

    let typed = kserve
        .model_infer(typed_request(3))
        .await
        .expect("typed")
        .into_inner();
    let raw = kserve
        .model_infer(raw_request(3))
        .await
        .expect("raw")
        .into_inner();
    assert_eq!(typed.id, "typed");
    assert_eq!(typed.outputs[0].name, "scores");
    assert_eq!(typed.outputs[0].shape, [3, 2]);
    assert_eq!(typed.model_version, "1");
    assert_eq!(scores(&typed), scores(&raw));
    for row in scores(&typed).chunks_exact(2) {
        assert!((row[0] + row[1] - 1.0).abs() < 1e-5, "{row:?}");
    }
    // Each row alone (a lone request: its rows go to ONNX Runtime without being copied into a
    // batch) gives bit-identical scores to the same row inside a three-row request.
    let three = scores(&raw);
    for row in 0..3 {
        let mut alone = raw_request(1);
        alone.raw_input_contents[0] = raw_request(3).raw_input_contents[0]
            [row * 64 * 64 * 4..(row + 1) * 64 * 64 * 4]
            .to_vec();
        let answer = kserve
            .model_infer(alone)
            .await
            .expect("one row")
            .into_inner();
        let bits = |values: &[f32]| {
            values
                .iter()
                .map(|value| value.to_bits())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            bits(&scores(&answer)),
            bits(&three[row * 2..row * 2 + 2]),
            "row {row}"
        );
    }
    // The ledger names the input by the SHA-256 of its little-endian FP32 values, the same
    // whether they came as raw bytes (hashed as sent) or typed contents (encoded, then hashed).
    let expected_input_sha256 = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&raw_request(3).raw_input_contents[0]))
    };
    let contexts = harness.ledger_contexts().await;
    assert_eq!(contexts.len(), 5, "{contexts:?}");
    for context in &contexts[..2] {
        assert_eq!(
            context["input_sha256"],
            expected_input_sha256.as_str(),
            "{context}"
        );
        assert_eq!(context["rows"], 3);
    }

    let mut wrong_shape = typed_request(1);
    wrong_shape.inputs[0].shape = vec![1, 32, 32, 1];
    let mut wrong_type = raw_request(1);
    wrong_type.inputs[0].datatype = "INT8".to_owned();
    let mut wrong_name = typed_request(1);
    wrong_name.inputs[0].name = "pixels".to_owned();
    let mut short = raw_request(2);
    short.raw_input_contents[0].truncate(100);
    let mut not_finite = typed_request(1);
    if let Some(contents) = not_finite.inputs[0].contents.as_mut() {
        contents.fp32_contents[5] = f32::NAN;
    }
    let mut unknown_output = typed_request(1);
    unknown_output.outputs = vec![InferRequestedOutputTensor {
        name: "logits".to_owned(),
        ..Default::default()
    }];
    let mut no_inputs = typed_request(1);
    no_inputs.inputs.clear();
    for (what, request, reason) in [
        ("shape", wrong_shape, "TENSOR_INVALID"),
        ("datatype", wrong_type, "TENSOR_INVALID"),
        ("name", wrong_name, "TENSOR_INVALID"),
        ("short raw", short, "TENSOR_INVALID"),
        ("NaN", not_finite, "TENSOR_INVALID"),
        ("output", unknown_output, "TENSOR_INVALID"),
        ("no inputs", no_inputs, "TENSOR_INVALID"),
        ("33 rows", typed_request(33), "BATCH_TOO_LARGE"),
    ] {
        let status = kserve.model_infer(request).await.expect_err(what);
        assert_eq!(
            (status.code(), reason_of(&status).as_deref()),
            (Code::InvalidArgument, Some(reason)),
            "{what}"
        );
    }
    let mut unknown_model = typed_request(1);
    unknown_model.model_name = "no-such-model".to_owned();
    let status = kserve
        .model_infer(unknown_model)
        .await
        .expect_err("unknown model");
    assert_eq!(status.code(), Code::NotFound);

    // KServe is for the gateway, the operator tool and KServe clients, no other peer.
    for identity in ["validation", "audit", "stranger"] {
        let status = harness
            .kserve_as(identity)
            .server_live(ServerLiveRequest {})
            .await
            .expect_err("peer policy");
        assert_eq!(status.code(), Code::PermissionDenied, "{identity}");
    }
}

/// Every KServe inference is in the ledger under the caller's certificate identity before it is
/// answered; without the ledger the caller gets UNAVAILABLE and no outputs, unary or streamed.
/// A KServe-only identity may infer and read metadata, never change what is served.
#[tokio::test]
async fn kserve_inference_is_recorded_under_the_caller_and_withheld_without_the_ledger() {
    use futures::StreamExt;
    use medai_inference::KSERVE_CLIENT_IDENTITY;

    let repository = light_repository(&[("1", "active")]);
    add_light_version(repository.path(), "2", "staged");
    let mut harness = Harness::start(repository.path(), RuntimeSettings::default()).await;
    harness
        .pki
        .layout
        .ensure(&[KSERVE_CLIENT_IDENTITY])
        .expect("kserve-client certificate");
    let mut client = harness.kserve_as(KSERVE_CLIENT_IDENTITY);

    let answer = client
        .model_infer(raw_request(2))
        .await
        .expect("a kserve client may infer")
        .into_inner();
    assert_eq!(scores(&answer).len(), 4);
    client
        .model_metadata(ModelMetadataRequest {
            name: LIGHT.to_owned(),
            version: String::new(),
        })
        .await
        .expect("and read metadata");
    let index = client
        .repository_index(RepositoryIndexRequest {
            repository_name: String::new(),
            ready: false,
        })
        .await
        .expect("and read the repository index")
        .into_inner();
    let listed: Vec<(&str, &str, &str)> = index
        .models
        .iter()
        .map(|model| {
            (
                model.version.as_str(),
                model.state.as_str(),
                model.reason.as_str(),
            )
        })
        .collect();
    assert_eq!(listed, [("1", "READY", ""), ("2", "UNAVAILABLE", "STAGED")]);
    let status = harness
        .client_as(KSERVE_CLIENT_IDENTITY)
        .retire_model_version(medai_proto::inference::v1::RetireModelVersionRequest {
            change: Some(medai_proto::inference::v1::ModelChange {
                model_name: LIGHT.to_owned(),
                model_version: "1".to_owned(),
                reason: "not allowed".to_owned(),
            }),
        })
        .await
        .expect_err("a kserve client may not change what is served");
    assert_eq!(status.code(), Code::PermissionDenied);

    // A stream of two requests from the operator tool: two records, under its identity.
    let requests = futures::stream::iter([typed_request(1), typed_request(1)]);
    let streamed: Vec<_> = harness
        .kserve_as("operator")
        .model_stream_infer(requests)
        .await
        .expect("stream")
        .into_inner()
        .collect()
        .await;
    assert_eq!(streamed.len(), 2);
    for answer in &streamed {
        let answer = answer.as_ref().expect("stream item");
        assert!(answer.error_message.is_empty(), "{}", answer.error_message);
    }

    let resource = format!("model/{LIGHT}/1");
    let record = |actor: &str| {
        (
            actor.to_owned(),
            "KSERVE_MODEL_INFER".to_owned(),
            resource.clone(),
            "SUCCESS".to_owned(),
        )
    };
    assert_eq!(
        harness.ledger().await,
        [
            record("service:kserve-client"),
            record("service:operator"),
            record("service:operator"),
        ]
    );

    // Without the ledger: UNAVAILABLE and no outputs, whatever the door.
    harness.audit.take().expect("audit").stop().await;
    let status = client
        .model_infer(raw_request(1))
        .await
        .expect_err("no answer without its record");
    assert_eq!(
        (status.code(), reason_of(&status).as_deref()),
        (Code::Unavailable, Some("LEDGER_UNAVAILABLE"))
    );
    let streamed: Vec<_> = client
        .model_stream_infer(futures::stream::iter([typed_request(1)]))
        .await
        .expect("stream")
        .into_inner()
        .collect()
        .await;
    let answer = streamed[0].as_ref().expect("stream item");
    assert!(
        answer.error_message.starts_with("LEDGER_UNAVAILABLE"),
        "{}",
        answer.error_message
    );
    let response = answer.infer_response.as_ref().expect("tagged response");
    assert!(response.outputs.is_empty() && response.raw_output_contents.is_empty());
}

#[tokio::test]
async fn tritons_python_client_works_unchanged() {
    let python = workspace_root().join(".cache/kserve-venv/bin/python");
    assert!(
        python.is_file(),
        "{} is missing: run scripts/kserve-clients.sh",
        python.display()
    );
    let repository = light_repository(&[("1", "active")]);
    let harness = Harness::start(repository.path(), RuntimeSettings::default()).await;
    let files = harness.pki.files("operator");
    let script = workspace_root().join("services/inference/tests/tritonclient_check.py");
    let output = tokio::process::Command::new(&python)
        .arg(&script)
        .arg(harness.inference.address.to_string())
        .arg(&files.ca_cert)
        .arg(&files.cert)
        .arg(&files.key)
        .arg(LIGHT)
        .output()
        .await
        .expect("run tritonclient");
    assert!(
        output.status.success(),
        "tritonclient check failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let seen: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("the check prints JSON");

    assert_eq!(seen["live"], true);
    assert_eq!(seen["ready"], true);
    assert_eq!(seen["model_ready"], true);
    assert_eq!(seen["unknown_model_ready"], false);
    assert_eq!(seen["server"]["name"], "medai-inference");
    let extensions = seen["server"]["extensions"].to_string();
    assert!(extensions.contains("statistics") && extensions.contains("model_configuration"));
    assert_eq!(seen["metadata"]["name"], LIGHT);
    assert_eq!(seen["metadata"]["versions"], serde_json::json!(["1"]));
    assert_eq!(seen["metadata"]["inputs"][0]["name"], "image");
    assert_eq!(seen["metadata"]["inputs"][0]["datatype"], "FP32");
    assert_eq!(
        seen["metadata"]["inputs"][0]["shape"],
        serde_json::json!(["-1", "64", "64", "1"])
    );
    assert_eq!(seen["config"]["max_batch_size"], 32);
    assert_eq!(
        seen["config"]["input_dims"],
        serde_json::json!(["64", "64", "1"])
    );
    assert_eq!(seen["config"]["input_data_type"], "TYPE_FP32");
    assert_eq!(seen["config"]["output_dims"], serde_json::json!(["2"]));
    assert_eq!(seen["config"]["dynamic_batching"], true);

    assert_eq!(seen["infer"]["id"], "req-1");
    assert_eq!(seen["infer"]["shape"], serde_json::json!([3, 2]));
    let rows: Vec<Vec<f64>> =
        serde_json::from_value(seen["infer"]["scores"].clone()).expect("scores");
    for row in &rows {
        assert!((row.iter().sum::<f64>() - 1.0).abs() < 1e-5, "{row:?}");
    }
    assert_eq!(seen["unknown_model_error"], "StatusCode.NOT_FOUND");

    // The stream answers every request, tagged, with the same scores as the unary call.
    let stream = seen["stream"].as_array().expect("stream answers");
    assert_eq!(stream.len(), 4);
    for (index, answer) in stream.iter().enumerate() {
        assert_eq!(answer["id"], format!("stream-{index}"));
        assert!(answer["error"].is_null(), "{answer}");
        let streamed: Vec<Vec<f64>> =
            serde_json::from_value(answer["scores"].clone()).expect("scores");
        // A row run alone may round differently from the same row run in a batch of three.
        for (alone, batched) in streamed[0].iter().zip(&rows[index % 3]) {
            assert!((alone - batched).abs() < 1e-6, "{alone} vs {batched}");
        }
    }
    assert_eq!(seen["statistics"]["inference_count"], 7);
    assert_eq!(seen["statistics"]["success"], 5);
    // The repository index answers (Triton's clients call it), not PERMISSION_DENIED.
    assert_eq!(
        seen["index"],
        serde_json::json!([{"name": LIGHT, "version": "1", "state": "READY"}])
    );
}

/// The CUDA runtime library perf_analyzer links (loaded, never used: no GPU is asked for).
fn cuda_runtime_dir() -> std::path::PathBuf {
    let lib = workspace_root().join(".cache/kserve-venv/lib");
    std::fs::read_dir(&lib)
        .expect("the kserve venv: run scripts/kserve-clients.sh")
        .filter_map(Result::ok)
        .map(|entry| entry.path().join("site-packages/nvidia/cuda_runtime/lib"))
        .find(|path| path.is_dir())
        .expect("nvidia-cuda-runtime-cu12 in the kserve venv")
}

#[tokio::test]
async fn tritons_perf_analyzer_drives_the_service_over_mtls() {
    let perf_analyzer = workspace_root().join(".cache/perf-analyzer/perf_analyzer");
    assert!(
        perf_analyzer.is_file(),
        "{} is missing: run scripts/kserve-clients.sh",
        perf_analyzer.display()
    );
    let repository = light_repository(&[("1", "active")]);
    let harness = Harness::start(repository.path(), RuntimeSettings::default()).await;
    let files = harness.pki.files("operator");
    let report = tempfile::tempdir().expect("tempdir");
    let csv = report.path().join("perf.csv");
    let output = tokio::process::Command::new(&perf_analyzer)
        .env("LD_LIBRARY_PATH", cuda_runtime_dir())
        .args(["-m", LIGHT, "-i", "grpc", "-u"])
        .arg(harness.inference.address.to_string())
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
        .args([
            "--concurrency-range",
            "4",
            "--measurement-interval",
            "1000",
            // This test proves perf_analyzer works against the service, not that the
            // machine is quiet: under a loaded CI machine three windows of 1 s differed by more
            // than 2× and perf_analyzer gave up ("Failed to obtain stable measurement").
            "--stability-percentage",
            "1000",
            "--max-trials",
            "10",
            // Its default random bytes read as FP32 include NaNs, which the service refuses.
            "--input-data",
            "zero",
            "-f",
        ])
        .arg(&csv)
        .output()
        .await
        .expect("run perf_analyzer");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "perf_analyzer failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let throughput: f64 = stdout
        .lines()
        .find_map(|line| line.trim().strip_prefix("Throughput:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| panic!("no throughput in:\n{stdout}"));
    assert!(throughput > 0.0, "{stdout}");
    let table = std::fs::read_to_string(&csv).expect("perf_analyzer's CSV");
    assert!(table.lines().count() >= 2, "{table}");
    // The service counted what perf_analyzer sent (its server-side figures come from the
    // statistics extension).
    let stats = harness
        .kserve_as("operator")
        .model_statistics(medai_proto::kserve::ModelStatisticsRequest {
            name: LIGHT.to_owned(),
            version: String::new(),
        })
        .await
        .expect("statistics")
        .into_inner();
    assert!(stats.model_stats[0].inference_count as f64 >= throughput);
}
