//! The Helm chart is the production configuration, so it is run: `helm template` with
//! tests/chart/values.yaml, then every rendered workload as a local process exactly as a pod
//! gets it (see `medai_e2e::cluster`), against the suite's real PostgreSQL and Redis, with
//! the mesh certificates laid out as cert-manager writes them. Through that mesh: a real
//! prediction via the gateway's Service, signed checkpoints from two audit replicas verified
//! offline with one public key, a rolling restart of every Deployment with clients calling
//! throughout, and the chart's `helm test` pod. Apart: a model lifecycle change made through
//! one of two inference replicas, both on the read-only model volume, served by both.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use base64::Engine;
use medai_cli::client::{authorised, connect_gateway};
use medai_e2e::cluster::{ClusterObjects, LocalCluster, parse_manifests, render_chart};
use medai_proto::audit::v1::CreateCheckpointRequest;
use medai_proto::audit::v1::audit_service_client::AuditServiceClient;
use medai_proto::common::v1::ImageFormat;
use medai_proto::gateway::v1::{CreateUserRequest, InferRequest, LoginRequest, RefreshRequest};
use medai_testkit::{Assets, TestPki, binaries_dir, fresh_postgres_database, workspace_root};
use serde_json::Value;

const RELEASE: &str = "medai";
const NAMESPACE: &str = "medai-test";
const SERVICES: [&str; 5] = ["audit", "auth", "validation", "inference", "gateway"];
const ADMIN_PASSWORD: &str = "the bootstrap admin of the render-and-run test";
const READY_TIMEOUT: Duration = Duration::from_secs(120);

fn secret(pairs: &[(&str, Vec<u8>)]) -> BTreeMap<String, Vec<u8>> {
    pairs
        .iter()
        .map(|(key, value)| ((*key).to_owned(), value.clone()))
        .collect()
}

/// The Secrets an SRE creates before installing (k8s/README.md), made from the suite's
/// PostgreSQL and Redis and a throwaway PKI. Returns them and the checkpoint public key.
async fn cluster_objects(
    pki: &TestPki,
    assets: &Assets,
    scratch: &Path,
) -> (ClusterObjects, String) {
    let mut objects = ClusterObjects::default();
    for service in SERVICES {
        let read = |path: std::path::PathBuf| std::fs::read(path).expect("PKI file");
        objects.secrets.insert(
            format!("medai-tls-{service}"),
            secret(&[
                ("ca.crt", read(pki.layout.ca_certificate())),
                ("tls.crt", read(pki.layout.certificate(service))),
                ("tls.key", read(pki.layout.key(service))),
            ]),
        );
    }
    for (name, _) in [
        ("medai-auth-database", ()),
        ("medai-audit-database", ()),
        ("medai-inference-database", ()),
    ] {
        let url = fresh_postgres_database().await;
        objects
            .secrets
            .insert(name.to_owned(), secret(&[("url", url.into_bytes())]));
    }
    objects.secrets.insert(
        "medai-redis".to_owned(),
        secret(&[("url", medai_e2e::suite_redis_url().into_bytes())]),
    );
    objects.secrets.insert(
        "medai-bootstrap-admin".to_owned(),
        secret(&[("password", ADMIN_PASSWORD.as_bytes().to_vec())]),
    );
    objects.secrets.insert(
        "medai-patient-key".to_owned(),
        secret(&[(
            "secret",
            b"a patient-key secret of the render-and-run test".to_vec(),
        )]),
    );
    // One checkpoint key for every audit replica, made once by the operator.
    let key_file = scratch.join("checkpoint.key");
    let signer =
        medai_ledger::checkpoint::CheckpointSigner::load_or_create(&key_file).expect("key");
    let public_key = base64::engine::general_purpose::STANDARD.encode(signer.public_key());
    objects.secrets.insert(
        "medai-audit-checkpoint-key".to_owned(),
        secret(&[(
            "checkpoint.key",
            std::fs::read(&key_file).expect("key file"),
        )]),
    );
    objects
        .claims
        .insert("medai-models".to_owned(), assets.model_repository.clone());
    let binaries = binaries_dir();
    for service in SERVICES {
        objects.image_files.insert(
            format!("/usr/local/bin/medai-{service}"),
            binaries.join(format!("medai-{service}")),
        );
    }
    objects
        .image_files
        .insert("/usr/local/bin/medai".to_owned(), binaries.join("medai"));
    objects.image_files.insert(
        "/opt/onnxruntime/libonnxruntime.so.1.31.1".to_owned(),
        assets.onnxruntime_library.clone(),
    );
    (objects, public_key)
}

/// A 64×64 grey PNG for the synthetic light model (cheap enough to call continuously).
fn light_png(seed: u32) -> Vec<u8> {
    let mut state = seed.wrapping_mul(2_654_435_761).max(1);
    let picture = image::GrayImage::from_fn(64, 64, |_, _| {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        image::Luma([(state & 0xff) as u8])
    });
    let mut png = std::io::Cursor::new(Vec::new());
    picture
        .write_to(&mut png, image::ImageFormat::Png)
        .expect("encode png");
    png.into_inner()
}

fn infer_request(image: Vec<u8>, model: &str) -> InferRequest {
    InferRequest {
        image,
        format: ImageFormat::Unspecified.into(),
        model_name: model.to_owned(),
        model_version: String::new(),
        idempotency_key: String::new(),
    }
}

#[derive(Default)]
struct CallCounts {
    made: AtomicU64,
    failed: AtomicU64,
    /// Calls the transport reported as never sent, retried once (see [`never_sent`]).
    retried: AtomicU64,
    failures: std::sync::Mutex<Vec<String>>,
}

impl CallCounts {
    fn record<T>(&self, what: &str, result: Result<T, tonic::Status>) -> Option<T> {
        self.made.fetch_add(1, Ordering::Relaxed);
        match result {
            Ok(value) => Some(value),
            Err(status) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                self.failures.lock().expect("failures").push(format!(
                    "{what}: {:?} {}",
                    status.code(),
                    status.message()
                ));
                None
            }
        }
    }
}

/// gRPC clients retry a call transparently when the transport reports that it never left the
/// client (grpc-go and grpc-java do by default): a request queued on a connection that a
/// draining pod closed (GOAWAY) before the request was written. tonic reports that as CANCELLED
/// "operation was canceled" (this client never cancels a call itself). Such a call is retried
/// once and counted apart; a call that reached a server and failed is never retried. The
/// refresh loop also proves these calls were not sent: a refresh token presented twice would
/// revoke its family and fail every later refresh.
fn never_sent(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::Cancelled && status.message() == "operation was canceled"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_chart_boots_the_whole_mesh_and_rolls_every_deployment_without_a_failed_call() {
    let began = Instant::now();
    let root = workspace_root();
    let manifests = render_chart(RELEASE, NAMESPACE, &root.join("tests/chart/values.yaml"));
    let pki = TestPki::new();
    let assets = Assets::locate();
    let scratch = tempfile::tempdir().expect("scratch");
    let (objects, public_key) = cluster_objects(&pki, &assets, scratch.path()).await;
    let mut cluster = LocalCluster::new(NAMESPACE, manifests, objects).await;

    // 1. helm install: every pod of every Deployment at once, each with its pod's environment
    //    (and Kubernetes' service-link variables unless the chart turns them off).
    cluster.start_all(READY_TIMEOUT).await;
    let pods: Vec<(String, u32)> = cluster
        .pods
        .iter()
        .map(|pod| (pod.name.clone(), pod.restarts))
        .collect();
    eprintln!(
        "ready after {:.1} s (pod, restarts): {pods:?}",
        began.elapsed().as_secs_f64()
    );
    assert_eq!(
        cluster.endpoints("medai-audit").len(),
        2,
        "two audit replicas"
    );
    assert_eq!(
        cluster.endpoints("medai-gateway").len(),
        2,
        "two gateway replicas"
    );

    // 2. A real prediction through the gateway, reached by its Service name.
    let gateway_address = cluster.service_address("medai-gateway", 50051);
    let gateway_endpoint = format!("https://{gateway_address}");
    let ca = pki.layout.ca_certificate();
    let mut gateway = connect_gateway(&gateway_endpoint, &ca)
        .await
        .expect("gateway");
    let grant = gateway
        .login(LoginRequest {
            username: "admin".to_owned(),
            password: ADMIN_PASSWORD.to_owned(),
        })
        .await
        .expect("the bootstrap admin from the Secret logs in")
        .into_inner()
        .grant
        .expect("tokens");
    let token = grant.access_token.clone();
    let answer = gateway
        .infer(authorised(
            infer_request(assets.dicom("MR_small.dcm"), "brain-mri-tumor"),
            &token,
        ))
        .await
        .expect("a real prediction through the chart's mesh")
        .into_inner();
    let prediction = answer.prediction.clone().expect("prediction");
    assert_eq!(prediction.model_name, "brain-mri-tumor");
    assert!(prediction.intended_use.contains("RESEARCH USE ONLY"));
    assert!(answer.ledger_seq > 0, "the prediction is in the ledger");
    eprintln!(
        "prediction: {} ledger seq {}",
        prediction
            .probabilities
            .iter()
            .max_by(|a, b| a.probability.total_cmp(&b.probability))
            .map(|best| best.label.clone())
            .unwrap_or_default(),
        answer.ledger_seq
    );

    // 3. Each audit replica signs a checkpoint; one public key (from the Secret) verifies both,
    //    offline, with the project's own verifier.
    let audit_pods: Vec<(String, std::net::SocketAddr)> = cluster
        .pods
        .iter()
        .filter(|pod| pod.owner == "medai-audit")
        .map(|pod| (pod.name.clone(), pod.port("grpc")))
        .collect();
    let mut key_ids = Vec::new();
    for (name, address) in &audit_pods {
        // One more ledger entry, so each checkpoint covers a new tree size.
        gateway
            .infer(authorised(
                infer_request(light_png(7), "synthetic-light"),
                &token,
            ))
            .await
            .expect("light prediction");
        let channel = pki.channel_as("gateway", *address, "audit");
        let checkpoint = AuditServiceClient::new(channel)
            .create_checkpoint(CreateCheckpointRequest {})
            .await
            .unwrap_or_else(|status| panic!("{name} signs a checkpoint: {status}"))
            .into_inner()
            .checkpoint
            .expect("checkpoint");
        key_ids.push(checkpoint.key_id);
    }
    assert_eq!(key_ids.len(), 2);
    assert_eq!(
        key_ids[0], key_ids[1],
        "both replicas sign with the one key"
    );
    // The export is an auditor's: the admin makes one, as an operator would.
    let auditor_password = "the auditor of the render-and-run test";
    gateway
        .create_user(authorised(
            CreateUserRequest {
                username: "auditor".to_owned(),
                password: auditor_password.to_owned(),
                role: "auditor".to_owned(),
            },
            &token,
        ))
        .await
        .expect("create the auditor");
    let auditor_token = gateway
        .login(LoginRequest {
            username: "auditor".to_owned(),
            password: auditor_password.to_owned(),
        })
        .await
        .expect("auditor login")
        .into_inner()
        .grant
        .expect("tokens")
        .access_token;
    let state = scratch.path().join("cli");
    std::fs::create_dir_all(state.join("pki")).expect("cli state");
    std::fs::copy(&ca, state.join("pki/ca.pem")).expect("ca");
    std::fs::write(state.join("token"), &auditor_token).expect("token");
    let export = scratch.path().join("ledger.jsonl");
    let medai = binaries_dir().join("medai");
    let exported = std::process::Command::new(&medai)
        .arg("--state-dir")
        .arg(&state)
        .args(["--gateway", &gateway_endpoint, "audit", "export", "--out"])
        .arg(&export)
        .output()
        .expect("medai audit export");
    assert!(
        exported.status.success(),
        "{}",
        String::from_utf8_lossy(&exported.stderr)
    );
    let verified = std::process::Command::new(&medai)
        .args(["audit", "verify", "--export"])
        .arg(&export)
        .args(["--public-key", &public_key])
        .output()
        .expect("medai audit verify");
    let verdict = String::from_utf8_lossy(&verified.stdout).into_owned();
    eprintln!("offline verifier: {}", verdict.trim());
    assert!(
        verified.status.success(),
        "the offline verifier refused the export: {verdict} {}",
        String::from_utf8_lossy(&verified.stderr)
    );

    // 4. Rolling restart of every Deployment while two clients call through the gateway's
    //    Service: predictions (gateway → validation → inference → audit) and token refreshes
    //    (gateway → auth → PostgreSQL, Redis, audit). Not one call may fail.
    let counts = Arc::new(CallCounts::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    {
        let (counts, stop, token) = (counts.clone(), stop.clone(), token.clone());
        let mut client = connect_gateway(&gateway_endpoint, &ca)
            .await
            .expect("client");
        clients.push(tokio::spawn(async move {
            let mut seed = 100;
            while !stop.load(Ordering::Relaxed) {
                seed += 1;
                let call = || authorised(infer_request(light_png(seed), "synthetic-light"), &token);
                let mut result = client.infer(call()).await;
                if matches!(&result, Err(status) if never_sent(status)) {
                    counts.retried.fetch_add(1, Ordering::Relaxed);
                    result = client.infer(call()).await;
                }
                counts.record("infer", result);
            }
        }));
    }
    {
        let (counts, stop) = (counts.clone(), stop.clone());
        let mut client = connect_gateway(&gateway_endpoint, &ca)
            .await
            .expect("client");
        let mut refresh_token = grant.refresh_token.clone();
        clients.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let call = || RefreshRequest {
                    refresh_token: refresh_token.clone(),
                };
                let mut result = client.refresh(call()).await;
                if matches!(&result, Err(status) if never_sent(status)) {
                    counts.retried.fetch_add(1, Ordering::Relaxed);
                    result = client.refresh(call()).await;
                }
                if let Some(response) = counts.record("refresh", result) {
                    refresh_token = response.into_inner().grant.expect("grant").refresh_token;
                }
            }
        }));
    }
    for deployment in [
        "medai-gateway",
        "medai-auth",
        "medai-validation",
        "medai-inference",
        "medai-audit",
    ] {
        let restarted = Instant::now();
        for (pod, status, killed) in cluster.rolling_restart(deployment, READY_TIMEOUT).await {
            assert!(!killed, "{pod} did not drain within its grace period");
            assert!(status.success(), "{pod} ended with {status} after SIGTERM");
        }
        eprintln!(
            "rolled {deployment} in {:.1} s; calls so far {} made, {} failed",
            restarted.elapsed().as_secs_f64(),
            counts.made.load(Ordering::Relaxed),
            counts.failed.load(Ordering::Relaxed)
        );
    }
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.await.expect("client task");
    }
    let made = counts.made.load(Ordering::Relaxed);
    let failed = counts.failed.load(Ordering::Relaxed);
    let retried = counts.retried.load(Ordering::Relaxed);
    eprintln!(
        "rolling restart of every Deployment: {made} calls made, {failed} failed, {retried} retried transparently (never sent)"
    );
    assert_eq!(
        failed,
        0,
        "calls failed during the rollout: {:?}",
        counts.failures.lock().expect("failures")
    );
    assert!(made >= 20, "the clients called throughout ({made} calls)");

    // 5. helm test: the chart's test hook pod, run as a process, must succeed.
    let hooks: Vec<Value> = cluster
        .objects_of("Pod")
        .into_iter()
        .filter(|pod| {
            pod.pointer("/metadata/annotations/helm.sh~1hook")
                .and_then(Value::as_str)
                == Some("test")
        })
        .cloned()
        .collect();
    assert!(!hooks.is_empty(), "the chart has a helm test hook");
    for hook in &hooks {
        let (status, log) = cluster.run_pod(hook, Duration::from_secs(60)).await;
        eprintln!(
            "helm test {}: {status}: {}",
            hook["metadata"]["name"],
            log.trim()
        );
        assert!(status.success(), "helm test failed: {log}");
    }

    // 6. Nothing was written where the chart mounts read-only or to a root filesystem.
    cluster.assert_read_only_respected();
    eprintln!(
        "render-and-run test took {:.1} s",
        began.elapsed().as_secs_f64()
    );
    cluster.stop().await;
}

/// Kubernetes' service-link variables fall inside each service's own prefix (the Service
/// medai-audit gives audit's pod MEDAI_AUDIT_PORT=tcp://…); with them, and without
/// `enableServiceLinks: false`, every service must still start. Checked on the binary itself.
#[tokio::test]
async fn a_service_starts_with_every_service_link_variable_of_the_release_in_its_environment() {
    let manifests = render_chart(
        RELEASE,
        NAMESPACE,
        &workspace_root().join("tests/chart/values.yaml"),
    );
    let mut links = Vec::new();
    for service in manifests
        .iter()
        .filter(|manifest| manifest["kind"] == "Service" && manifest["spec"]["clusterIP"] != "None")
    {
        let name = medai_e2e::cluster::service_link_name(
            service["metadata"]["name"].as_str().expect("name"),
        );
        links.push((format!("{name}_SERVICE_HOST"), "10.96.0.10".to_owned()));
        links.push((format!("{name}_SERVICE_PORT"), "50051".to_owned()));
        links.push((format!("{name}_SERVICE_PORT_GRPC"), "50051".to_owned()));
        links.push((format!("{name}_PORT"), "tcp://10.96.0.10:50051".to_owned()));
        links.push((
            format!("{name}_PORT_50051_TCP"),
            "tcp://10.96.0.10:50051".to_owned(),
        ));
        links.push((format!("{name}_PORT_50051_TCP_PROTO"), "tcp".to_owned()));
        links.push((format!("{name}_PORT_50051_TCP_PORT"), "50051".to_owned()));
        links.push((
            format!("{name}_PORT_50051_TCP_ADDR"),
            "10.96.0.10".to_owned(),
        ));
    }
    assert!(links.iter().any(|(name, _)| name == "MEDAI_AUDIT_PORT"));
    let pki = TestPki::new();
    let files = pki.files("validation");
    let output = tokio::process::Command::new(binaries_dir().join("medai-validation"))
        .arg("--print-config")
        .env_clear()
        .envs(links)
        .env("MEDAI_VALIDATION_PROCESS__LISTEN_ADDR", "127.0.0.1:0")
        .env("MEDAI_VALIDATION_TLS__CA_CERT", &files.ca_cert)
        .env("MEDAI_VALIDATION_TLS__CERT", &files.cert)
        .env("MEDAI_VALIDATION_TLS__KEY", &files.key)
        .output()
        .await
        .expect("run medai-validation");
    assert!(
        output.status.success(),
        "service-link variables were refused: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The image and the chart agree: the user the chart runs as, the binary each container's
/// command names and the ONNX Runtime library path are what Dockerfile.service builds, and
/// the build context leaves out local state and secrets.
#[test]
fn dockerfile_and_chart_agree_on_user_paths_and_entrypoint() {
    let root = workspace_root();
    let dockerfile = std::fs::read_to_string(root.join("Dockerfile.service")).expect("Dockerfile");
    let manifests = parse_manifests(
        &std::fs::read_to_string(root.join("k8s/medai.yaml")).expect("k8s/medai.yaml"),
    );
    let deployments: Vec<&Value> = manifests
        .iter()
        .filter(|manifest| manifest["kind"] == "Deployment")
        .collect();
    assert_eq!(deployments.len(), 5);
    let user = dockerfile
        .lines()
        .find_map(|line| line.strip_prefix("USER "))
        .expect("the runtime stage names its USER")
        .trim()
        .to_owned();
    assert!(
        dockerfile.contains("/usr/local/bin/medai-${SERVICE}"),
        "the image installs the binary as /usr/local/bin/medai-<service>"
    );
    let library = "/opt/onnxruntime/libonnxruntime.so.1.31.1";
    assert!(
        dockerfile.contains("/opt/onnxruntime"),
        "the image carries ONNX Runtime"
    );
    for deployment in deployments {
        let spec = &deployment["spec"]["template"]["spec"];
        let component = deployment["metadata"]["labels"]["app.kubernetes.io/component"]
            .as_str()
            .expect("component");
        assert_eq!(
            spec["securityContext"]["runAsUser"].to_string(),
            user,
            "{component}"
        );
        let container = &spec["containers"][0];
        assert_eq!(
            container["command"][0],
            format!("/usr/local/bin/medai-{component}"),
            "{component}"
        );
        assert_eq!(
            container["readinessProbe"]["exec"]["command"][0],
            format!("/usr/local/bin/medai-{component}")
        );
        for port in container["ports"].as_array().expect("ports") {
            let number = port["containerPort"].to_string();
            assert!(
                dockerfile
                    .lines()
                    .any(|line| line.starts_with("EXPOSE") && line.contains(&number)),
                "the image exposes {number}"
            );
        }
        if component == "inference" {
            assert!(
                container["env"]
                    .as_array()
                    .expect("env")
                    .iter()
                    .any(|entry| entry["value"] == library)
            );
        }
    }
    let ignored = std::fs::read_to_string(root.join(".dockerignore")).expect(".dockerignore");
    for excluded in [".medai", "target", ".cache", ".git"] {
        assert!(
            ignored
                .lines()
                .any(|line| line.trim().trim_end_matches('/').trim_start_matches('/') == excluded),
            ".dockerignore leaves out {excluded}"
        );
    }
}

/// A model repository for the chart's read-only claim: the light model as version 1 (active)
/// and version 2 (staged), then every file and folder made read-only.
fn read_only_light_repository(assets: &Assets, root: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let source = assets.model_repository.join("synthetic-light/1");
    let manifest = std::fs::read_to_string(source.join("manifest.toml")).expect("manifest");
    for (version, status) in [("1", "active"), ("2", "staged")] {
        let folder = root.join("synthetic-light").join(version);
        std::fs::create_dir_all(&folder).expect("version folder");
        std::fs::copy(source.join("model.onnx"), folder.join("model.onnx")).expect("model");
        std::fs::write(
            folder.join("manifest.toml"),
            manifest
                .replace("version = \"1\"", &format!("version = \"{version}\""))
                .replace("status = \"active\"", &format!("status = \"{status}\"")),
        )
        .expect("manifest");
    }
    let mut paths = vec![root.to_owned()];
    for model in ["synthetic-light", "synthetic-light/1", "synthetic-light/2"] {
        paths.push(root.join(model));
    }
    for version in ["1", "2"] {
        for file in ["manifest.toml", "model.onnx"] {
            paths.push(root.join("synthetic-light").join(version).join(file));
        }
    }
    for path in paths.into_iter().rev() {
        let mode = if path.is_dir() { 0o555 } else { 0o444 };
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    }
}

/// Issue 13: lifecycle state every inference replica agrees on, with no writable model volume.
/// The chart's two inference replicas share the read-only model claim and the inference
/// database; a version activated through one is served by the other within the poll bound
/// (KServe readiness, metadata and ListModels agree on both), a rollback through the other
/// reaches the first, and nothing is written under the read-only mounts.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_inference_replicas_on_the_read_only_model_volume_agree_on_a_lifecycle_change() {
    use medai_proto::inference::v1::inference_service_client::InferenceServiceClient;
    use medai_proto::inference::v1::{
        ActivateModelVersionRequest, ListModelsRequest, ModelChange, RollbackModelRequest,
        StageModelVersionRequest,
    };
    use medai_proto::kserve::grpc_inference_service_client::GrpcInferenceServiceClient;
    use medai_proto::kserve::{ModelMetadataRequest, ModelReadyRequest};

    const MODEL: &str = "synthetic-light";
    const AGREEMENT_BOUND: Duration = Duration::from_secs(15);
    let began = Instant::now();
    let manifests = render_chart(
        RELEASE,
        NAMESPACE,
        &workspace_root().join("tests/chart/values.yaml"),
    );
    let inference_deployment = manifests
        .iter()
        .find(|manifest| {
            manifest["kind"] == "Deployment" && manifest["metadata"]["name"] == "medai-inference"
        })
        .expect("the inference Deployment");
    assert_eq!(
        inference_deployment["spec"]["replicas"], 2,
        "tests/chart/values.yaml runs two inference replicas"
    );
    let pki = TestPki::new();
    let assets = Assets::locate();
    let scratch = tempfile::tempdir().expect("scratch");
    let (mut objects, _) = cluster_objects(&pki, &assets, scratch.path()).await;
    let models = scratch.path().join("models");
    read_only_light_repository(&assets, &models);
    objects.claims.insert("medai-models".to_owned(), models);
    let mut cluster = LocalCluster::new(NAMESPACE, manifests, objects).await;
    cluster.start_deployment("medai-audit", READY_TIMEOUT).await;
    cluster
        .start_deployment("medai-inference", READY_TIMEOUT)
        .await;
    let replicas: Vec<(String, std::net::SocketAddr)> = cluster
        .pods
        .iter()
        .filter(|pod| pod.owner == "medai-inference")
        .map(|pod| (pod.name.clone(), pod.port("grpc")))
        .collect();
    assert_eq!(replicas.len(), 2, "two inference replicas");
    let operator = |address| pki.channel_as("operator", address, "inference");
    let mut first = InferenceServiceClient::new(operator(replicas[0].1));
    let mut second = InferenceServiceClient::new(operator(replicas[1].1));
    let mut first_kserve = GrpcInferenceServiceClient::new(operator(replicas[0].1));
    let mut second_kserve = GrpcInferenceServiceClient::new(operator(replicas[1].1));
    let change = |version: &str| {
        Some(ModelChange {
            model_name: MODEL.to_owned(),
            model_version: version.to_owned(),
            reason: "CHG-13 render-and-run lifecycle check".to_owned(),
        })
    };
    // What one replica says it serves: ListModels' active-and-ready versions, KServe's
    // metadata versions and which of 1 and 2 KServe calls ready.
    async fn served(
        client: &mut InferenceServiceClient<tonic::transport::Channel>,
        kserve: &mut GrpcInferenceServiceClient<tonic::transport::Channel>,
    ) -> (Vec<String>, Vec<String>, Vec<bool>) {
        let listed = client
            .list_models(ListModelsRequest {})
            .await
            .expect("list models")
            .into_inner()
            .versions
            .into_iter()
            .filter(|info| info.status == "ACTIVE" && info.ready)
            .map(|info| info.version)
            .collect();
        let metadata = kserve
            .model_metadata(ModelMetadataRequest {
                name: MODEL.to_owned(),
                version: String::new(),
            })
            .await
            .expect("model metadata")
            .into_inner()
            .versions;
        let mut ready = Vec::new();
        for version in ["1", "2"] {
            ready.push(
                kserve
                    .model_ready(ModelReadyRequest {
                        name: MODEL.to_owned(),
                        version: version.to_owned(),
                    })
                    .await
                    .expect("model ready")
                    .into_inner()
                    .ready,
            );
        }
        (listed, metadata, ready)
    }
    let serving_one = (
        vec!["1".to_owned()],
        vec!["1".to_owned()],
        vec![true, false],
    );
    let serving_two = (
        vec!["2".to_owned()],
        vec!["2".to_owned()],
        vec![false, true],
    );
    assert_eq!(served(&mut first, &mut first_kserve).await, serving_one);
    assert_eq!(served(&mut second, &mut second_kserve).await, serving_one);

    // The manifests seeded the inference database once: version 2 is already staged there.
    let status = first
        .stage_model_version(StageModelVersionRequest {
            change: change("2"),
        })
        .await
        .expect_err("version 2 was seeded as staged from its manifest");
    assert_eq!(
        medai_runtime::errors::reason_of(&status).as_deref(),
        Some("MODEL_VERSION_ALREADY_IN_STATE")
    );
    let activated = Instant::now();
    first
        .activate_model_version(ActivateModelVersionRequest {
            change: change("2"),
        })
        .await
        .expect("activate 2 through the first replica on a read-only model volume");
    while served(&mut second, &mut second_kserve).await != serving_two {
        assert!(
            activated.elapsed() < AGREEMENT_BOUND,
            "{} did not serve version 2 within {AGREEMENT_BOUND:?}",
            replicas[1].0
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "{} served version 2 {:.0} ms after {} activated it",
        replicas[1].0,
        activated.elapsed().as_secs_f64() * 1000.0,
        replicas[0].0
    );
    assert_eq!(served(&mut first, &mut first_kserve).await, serving_two);

    let rolled_back = Instant::now();
    second
        .rollback_model(RollbackModelRequest { change: change("") })
        .await
        .expect("roll back through the second replica");
    while served(&mut first, &mut first_kserve).await != serving_one {
        assert!(
            rolled_back.elapsed() < AGREEMENT_BOUND,
            "{} did not follow the rollback within {AGREEMENT_BOUND:?}",
            replicas[0].0
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "{} served version 1 {:.0} ms after {} rolled back",
        replicas[0].0,
        rolled_back.elapsed().as_secs_f64() * 1000.0,
        replicas[1].0
    );
    cluster.assert_read_only_respected();
    eprintln!(
        "inference lifecycle check took {:.1} s",
        began.elapsed().as_secs_f64()
    );
    cluster.stop().await;
}
