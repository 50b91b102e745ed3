//! The Helm chart is the production configuration, so it is run: `helm template` with
//! tests/chart/values.yaml, then every rendered workload as a local process exactly as a pod
//! gets it (see `medai_e2e::cluster`), against the suite's real PostgreSQL and Redis, with
//! the mesh certificates laid out as cert-manager writes them. Through that mesh: a real
//! prediction via the gateway's Service, signed checkpoints from two audit replicas verified
//! offline with one public key, a rolling restart of every Deployment with clients calling
//! throughout, and the chart's `helm test` pod. Apart: a model lifecycle change made through
//! one of two inference replicas, both on the read-only model volume, served by both.

use std::collections::{BTreeMap, BTreeSet};
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

/// One service's database on the suite's PostgreSQL with two roles.
struct ServiceDatabase {
    /// The schema owner (the suite's superuser): only the migration Job gets it.
    owner_url: String,
    /// The service's own login role: it may read and write rows, never change the schema.
    service_url: String,
}

/// A fresh database for `service` and a login role of its own made as a DBA would: audit's
/// role is a member of `medai_ledger_writer` (insert and read the ledger, nothing else; its
/// migrations grant that role), auth's and inference's get read and write on the rows of every
/// table the owner creates (default privileges). None may create or alter a table.
async fn least_privilege_database(service: &str) -> ServiceDatabase {
    use sea_orm::ConnectionTrait;
    let owner_url = fresh_postgres_database().await;
    let role = format!("{service}_app_{}", uuid::Uuid::new_v4().simple());
    let grants = if service == "audit" {
        format!(
            "DO $$ BEGIN CREATE ROLE medai_ledger_writer NOLOGIN; \
             EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$; \
             GRANT medai_ledger_writer TO {role};"
        )
    } else {
        format!(
            "ALTER DEFAULT PRIVILEGES FOR ROLE postgres IN SCHEMA public \
               GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO {role}; \
             ALTER DEFAULT PRIVILEGES FOR ROLE postgres IN SCHEMA public \
               GRANT USAGE, SELECT ON SEQUENCES TO {role};"
        )
    };
    let owner = sea_orm::Database::connect(owner_url.as_str())
        .await
        .expect("connect as the owner");
    owner
        .execute_unprepared(&format!("CREATE ROLE {role} LOGIN; {grants}"))
        .await
        .expect("the service's role");
    owner.close().await.expect("close");
    let (base, database) = owner_url.rsplit_once('/').expect("a database URL");
    let service_url = format!(
        "{}/{database}",
        base.replacen("postgres@", &format!("{role}@"), 1)
    );
    ServiceDatabase {
        owner_url,
        service_url,
    }
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
    // Each database as a DBA prepares it: the schema owner's URL for the migration Job only,
    // and a narrower login role for the service's pods.
    for service in ["auth", "audit", "inference"] {
        let database = least_privilege_database(service).await;
        objects.secrets.insert(
            format!("medai-{service}-database"),
            secret(&[("url", database.service_url.into_bytes())]),
        );
        objects.secrets.insert(
            format!("medai-{service}-migration"),
            secret(&[("url", database.owner_url.into_bytes())]),
        );
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
    // The audit checkpoint log's shared volume (audit.checkpointLogClaim).
    let checkpoint_logs = scratch.join("audit-checkpoints");
    std::fs::create_dir_all(&checkpoint_logs).expect("checkpoint log volume");
    objects
        .claims
        .insert("medai-audit-checkpoints".to_owned(), checkpoint_logs);
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
        image: image.into(),
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
                    "{what}: {:?} {} (transport: {})",
                    status.code(),
                    status.message(),
                    medai_runtime::unprocessed::transport_error_chain(&status)
                ));
                None
            }
        }
    }
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

    // 1. helm install: the pre-install hook Jobs (each service's migrations, as the schema
    //    owner) to completion, then every pod of every Deployment at once, each with its pod's
    //    environment (and Kubernetes' service-link variables unless the chart turns them off).
    let hooks = cluster.install(READY_TIMEOUT).await;
    let mut migrated: Vec<&str> = hooks.iter().map(|run| run.job.as_str()).collect();
    migrated.sort_unstable();
    assert_eq!(
        migrated,
        [
            "medai-audit-migrations",
            "medai-auth-migrations",
            "medai-inference-migrations"
        ],
        "one migration Job per service that owns a database"
    );
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

    // 1b. The argon2id hash bounds of tests/chart/values.yaml (auth.passwords) are in the auth
    //     pod's environment, and auth, started with exactly that environment, takes them as
    //     its effective config (a misspelt variable would have stopped it at start).
    let auth_pod = cluster
        .pods
        .iter()
        .find(|pod| pod.owner == "medai-auth")
        .expect("an auth pod");
    let bounds: Vec<(String, String)> = auth_pod
        .environment()
        .iter()
        .filter(|(name, _)| name.contains("PASSWORDS__"))
        .cloned()
        .collect();
    assert_eq!(
        bounds,
        [
            (
                "MEDAI_AUTH_PASSWORDS__MAX_CONCURRENT_HASHES".to_owned(),
                "2".to_owned()
            ),
            (
                "MEDAI_AUTH_PASSWORDS__MAX_WAITING_HASHES".to_owned(),
                "32".to_owned()
            ),
        ]
    );
    let printed = tokio::process::Command::new(binaries_dir().join("medai-auth"))
        .arg("--print-config")
        .env_clear()
        .envs(auth_pod.environment().iter().cloned())
        .output()
        .await
        .expect("medai-auth --print-config");
    assert!(
        printed.status.success(),
        "{}",
        String::from_utf8_lossy(&printed.stderr)
    );
    let effective: toml::Value =
        toml::from_str(&String::from_utf8_lossy(&printed.stdout)).expect("the config as TOML");
    assert_eq!(
        (
            effective["passwords"]["max_concurrent_hashes"].as_integer(),
            effective["passwords"]["max_waiting_hashes"].as_integer()
        ),
        (Some(2), Some(32)),
        "auth runs with the chart's hash bounds"
    );

    // 1c. Issue 14: each service's async runtime runs as many workers as its container's CPU
    //     request, rounded up (the chart's defaults: 250m and 500m give 1, inference's 2 give 2),
    //     not one per core of the node, as its own metric says.
    for pod in &cluster.pods {
        let Some(service) = pod.owner.strip_prefix("medai-") else {
            continue;
        };
        let expected = match service {
            "inference" => "2",
            "gateway" | "auth" | "validation" | "audit" => "1",
            _ => continue,
        };
        let given: Vec<&str> = pod
            .environment()
            .iter()
            .filter(|(name, _)| name == "TOKIO_WORKER_THREADS")
            .map(|(_, value)| value.as_str())
            .collect();
        assert_eq!(given, [expected], "{}: TOKIO_WORKER_THREADS", pod.name);
        let page = http_get(pod.port("admin"), "/metrics").await;
        assert!(
            page.lines()
                .any(|line| line == format!("medai_runtime_worker_threads {expected}")),
            "{}: the runtime does not run {expected} workers",
            pod.name
        );
    }

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
        let client = connect_gateway(&gateway_endpoint, &ca)
            .await
            .expect("client");
        clients.push(tokio::spawn(async move {
            let mut seed = 100;
            while !stop.load(Ordering::Relaxed) {
                seed += 1;
                // The client sends again, by itself, only a call the draining pod provably
                // never processed (medai_runtime::unprocessed::RetryNeverProcessed).
                let request = authorised(infer_request(light_png(seed), "synthetic-light"), &token);
                let result = client.clone().infer(request).await;
                counts.record("infer", result);
            }
        }));
    }
    {
        let (counts, stop) = (counts.clone(), stop.clone());
        let client = connect_gateway(&gateway_endpoint, &ca)
            .await
            .expect("client");
        let mut refresh_token = grant.refresh_token.clone();
        clients.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                // A refresh token presented twice would revoke its family and fail every later
                // refresh: the loop also proves no call was processed twice.
                let request = RefreshRequest {
                    refresh_token: refresh_token.clone(),
                };
                let result = client.clone().refresh(request).await;
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
    eprintln!("rolling restart of every Deployment: {made} calls made, {failed} failed");
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

/// The chart's Deployments run with migrations off (the pre-install Job runs them): a pod
/// that starts before its schema exists, here even with a role that could create it, must
/// not create a table. It stops with the stable `schema_not_migrated` error, its readiness
/// probe never passes, and the database stays empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_with_migrations_off_refuses_an_empty_database_and_creates_no_table() {
    use sea_orm::ConnectionTrait;
    let root = workspace_root();
    let manifests = render_chart(RELEASE, NAMESPACE, &root.join("tests/chart/values.yaml"));
    let pki = TestPki::new();
    let assets = Assets::locate();
    let scratch = tempfile::tempdir().expect("scratch");
    let (mut objects, _) = cluster_objects(&pki, &assets, scratch.path()).await;
    let mut owner_urls = Vec::new();
    for service in ["audit", "auth", "inference"] {
        // The schema owner's own URL in the pod: only the switch keeps it from migrating.
        let owner_url = fresh_postgres_database().await;
        objects.secrets.insert(
            format!("medai-{service}-database"),
            secret(&[("url", owner_url.clone().into_bytes())]),
        );
        owner_urls.push((service, owner_url));
    }
    let mut cluster = LocalCluster::new(NAMESPACE, manifests, objects).await;
    for (service, owner_url) in &owner_urls {
        let pod = cluster.start_pod(&format!("medai-{service}"));
        assert!(
            cluster
                .pods[pod]
                .environment()
                .iter()
                .any(|(name, value)| name.ends_with("_PROCESS__RUN_MIGRATIONS") && value == "false"),
            "the chart turns migrations off in the {service} Deployment"
        );
        let status = cluster
            .wait_exit(pod, READY_TIMEOUT)
            .await
            .unwrap_or_else(|| panic!("{service} kept running on a schema without migrations"));
        assert!(
            !status.success(),
            "{service} must not succeed on an empty schema"
        );
        assert!(
            !cluster.readiness_passes(pod).await,
            "{service} must never be ready"
        );
        let log = cluster.pods[pod].log_tail();
        assert!(
            log.contains("schema_not_migrated"),
            "{service} names the stable error: {log}"
        );
        let database = sea_orm::Database::connect(owner_url.as_str())
            .await
            .expect("connect as the owner");
        let tables = database
            .query_all_raw(sea_orm::Statement::from_string(
                sea_orm::DatabaseBackend::Postgres,
                "SELECT tablename FROM pg_catalog.pg_tables WHERE schemaname = 'public'",
            ))
            .await
            .expect("list tables");
        assert!(
            tables.is_empty(),
            "{service} created {} table(s) with migrations off",
            tables.len()
        );
        database.close().await.expect("close");
        eprintln!(
            "{service}: {status}, not ready, no table; {}",
            log.lines().last().unwrap_or_default()
        );
    }
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

/// The fields of a cert-manager v1 `Certificate` spec this chart may use (no CRD schema is
/// available offline, so a misspelt field is caught here instead of by the API server).
const CERTIFICATE_SPEC_FIELDS: [&str; 13] = [
    "secretName",
    "secretTemplate",
    "commonName",
    "uris",
    "dnsNames",
    "ipAddresses",
    "duration",
    "renewBefore",
    "privateKey",
    "usages",
    "issuerRef",
    "isCA",
    "subject",
];

/// What a development certificate names: URI SANs, DNS SANs, IP SANs and whether it may serve
/// and be a client.
fn development_certificate_names(pem: &[u8]) -> (Vec<String>, Vec<String>, Vec<String>, bool) {
    use x509_parser::extensions::{GeneralName, ParsedExtension};

    let (_, pem) = x509_parser::pem::parse_x509_pem(pem).expect("a PEM certificate");
    let (_, certificate) =
        x509_parser::parse_x509_certificate(&pem.contents).expect("a certificate");
    let (mut uris, mut dns, mut ips) = (Vec::new(), Vec::new(), Vec::new());
    let san = certificate
        .subject_alternative_name()
        .expect("SAN extension")
        .expect("SANs");
    for name in &san.value.general_names {
        match name {
            GeneralName::URI(uri) => uris.push((*uri).to_owned()),
            GeneralName::DNSName(name) => dns.push((*name).to_owned()),
            GeneralName::IPAddress(bytes) => ips.push(
                std::net::Ipv4Addr::from(<[u8; 4]>::try_from(*bytes).expect("IPv4")).to_string(),
            ),
            other => panic!("unexpected SAN {other:?}"),
        }
    }
    let serves_and_calls = certificate.extensions().iter().any(|extension| {
        matches!(extension.parsed_extension(), ParsedExtension::ExtendedKeyUsage(usage)
            if usage.server_auth && usage.client_auth)
    });
    (uris, dns, ips, serves_and_calls)
}

#[test]
fn cert_manager_certificates_name_each_identity_as_the_development_ca_does() {
    let scratch = tempfile::tempdir().expect("tempdir");
    let values = scratch.path().join("cert-manager.yaml");
    std::fs::write(&values, "certManager:\n  enabled: true\n").expect("values");
    let manifests = render_chart("medai", NAMESPACE, &values);
    let of_kind = |kind: &str| -> Vec<&Value> {
        manifests
            .iter()
            .filter(|object| object["kind"] == kind)
            .collect()
    };
    let pki = TestPki::new();
    pki.layout
        .ensure(&["kserve-client"])
        .expect("the KServe client's development certificate");

    // The chart's own CA: a self-signed Issuer signs a CA Certificate; a CA Issuer signs the rest.
    let issuers = of_kind("Issuer");
    let ca_issuer = issuers
        .iter()
        .find(|issuer| issuer.pointer("/spec/ca").is_some())
        .expect("a CA Issuer");
    let ca_secret = ca_issuer["spec"]["ca"]["secretName"].clone();
    let certificates = of_kind("Certificate");
    let ca_certificate = certificates
        .iter()
        .find(|certificate| certificate["spec"]["isCA"] == true)
        .expect("a CA Certificate");
    assert_eq!(ca_certificate["spec"]["secretName"], ca_secret);
    let self_signed = &ca_certificate["spec"]["issuerRef"]["name"];
    assert!(
        issuers
            .iter()
            .any(|issuer| issuer["metadata"]["name"] == *self_signed
                && issuer.pointer("/spec/selfSigned").is_some()),
        "the CA Certificate is signed by the chart's self-signed Issuer"
    );

    // Which Secret each Deployment mounts at /etc/medai/tls.
    let mounted: BTreeMap<String, String> = of_kind("Deployment")
        .iter()
        .map(|deployment| {
            let component = deployment["metadata"]["labels"]["app.kubernetes.io/component"]
                .as_str()
                .expect("component")
                .to_owned();
            let volumes = deployment["spec"]["template"]["spec"]["volumes"]
                .as_array()
                .expect("volumes");
            let secret = volumes
                .iter()
                .find(|volume| volume["name"] == "tls")
                .and_then(|volume| volume["secret"]["secretName"].as_str())
                .expect("a tls volume")
                .to_owned();
            (component, secret)
        })
        .collect();
    let service_names: Vec<String> = of_kind("Service")
        .iter()
        .filter_map(|service| service["metadata"]["name"].as_str().map(str::to_owned))
        .collect();

    let mut issued = Vec::new();
    for certificate in certificates
        .iter()
        .filter(|certificate| certificate["spec"]["isCA"] != true)
    {
        let spec = &certificate["spec"];
        for field in spec.as_object().expect("spec").keys() {
            assert!(
                CERTIFICATE_SPEC_FIELDS.contains(&field.as_str()),
                "unknown Certificate field {field}"
            );
        }
        let strings = |pointer: &str| -> Vec<String> {
            spec.pointer(pointer)
                .and_then(Value::as_array)
                .map(|items| {
                    items
                        .iter()
                        .map(|item| item.as_str().expect("a string").to_owned())
                        .collect()
                })
                .unwrap_or_default()
        };
        let uris = strings("/uris");
        let identity = uris
            .first()
            .and_then(|uri| uri.strip_prefix("spiffe://medai/"))
            .expect("a SPIFFE URI SAN")
            .to_owned();
        let (dev_uris, dev_dns, dev_ips, dev_serves_and_calls) = development_certificate_names(
            &std::fs::read(pki.layout.certificate(&identity)).expect("development certificate"),
        );
        assert_eq!(uris, dev_uris, "{identity}: URI SANs");
        let dns_names = strings("/dnsNames");
        for name in &dev_dns {
            assert!(
                dns_names.contains(name),
                "{identity}: the DNS name {name} of the development certificate is missing"
            );
        }
        assert_eq!(strings("/ipAddresses"), dev_ips, "{identity}: IP SANs");
        assert!(dev_serves_and_calls);
        let usages = strings("/usages");
        assert!(
            usages.contains(&"server auth".to_owned())
                && usages.contains(&"client auth".to_owned()),
            "{identity}: usable as TLS server and client, as the development certificate is"
        );
        assert_eq!(spec["commonName"], format!("medai-{identity}"));
        assert_eq!(spec["issuerRef"]["name"], ca_issuer["metadata"]["name"]);
        let secret_name = spec["secretName"].as_str().expect("secretName");
        assert_eq!(secret_name, format!("medai-tls-{identity}"));
        if SERVICES.contains(&identity.as_str()) {
            assert_eq!(
                mounted.get(&identity).map(String::as_str),
                Some(secret_name),
                "{identity}: the Deployment mounts the Secret cert-manager writes"
            );
            let service = format!("{RELEASE}-{identity}");
            assert!(service_names.contains(&service));
            for name in [
                service.clone(),
                format!("{service}.{NAMESPACE}.svc"),
                format!("{service}.{NAMESPACE}.svc.cluster.local"),
            ] {
                assert!(dns_names.contains(&name), "{identity}: dials reach {name}");
            }
        }
        issued.push(identity);
    }
    issued.sort();
    assert_eq!(
        issued,
        [
            "audit",
            "auth",
            "gateway",
            "inference",
            "kserve-client",
            "operator",
            "validation"
        ],
        "a Certificate for every service and each client identity"
    );

    // Without cert-manager the chart renders none of it.
    assert!(
        render_chart(
            "medai",
            NAMESPACE,
            &workspace_root().join("tests/chart/values.yaml")
        )
        .iter()
        .all(|object| object["kind"] != "Certificate" && object["kind"] != "Issuer")
    );
}

/// checkov runs on the rendered chart in scripts/chart-checks.sh with helm/checkov.yaml; a
/// finding is never silenced without its reason: each check skipped for the whole chart has
/// a comment just above it, and each `checkov.io/skip<n>` annotation gives one after `=`.
#[test]
fn every_checkov_skip_carries_its_reason() {
    let root = workspace_root();
    let settings = std::fs::read_to_string(root.join("helm/checkov.yaml")).expect("checkov.yaml");
    let lines: Vec<&str> = settings.lines().collect();
    let start = lines
        .iter()
        .position(|line| line.trim() == "skip-check:")
        .expect("a skip-check list");
    let mut skipped = 0;
    for (index, line) in lines.iter().enumerate().skip(start + 1) {
        let Some(check) = line.trim().strip_prefix("- ") else {
            if !line.starts_with(' ') {
                break;
            }
            continue;
        };
        assert!(check.starts_with("CKV_"), "not a check id: {check}");
        let above = lines[index - 1].trim();
        assert!(
            above.starts_with('#') && above.len() > 20,
            "{check} is skipped without a reason above it"
        );
        skipped += 1;
    }
    assert!(skipped > 0, "the skip list was read");
    let manifests = parse_manifests(
        &std::fs::read_to_string(root.join("k8s/medai.yaml")).expect("k8s/medai.yaml"),
    );
    let mut annotated = 0;
    for manifest in &manifests {
        let Some(annotations) = manifest["metadata"]["annotations"].as_object() else {
            continue;
        };
        for (name, value) in annotations {
            if !name.starts_with("checkov.io/skip") {
                continue;
            }
            let (check, reason) = value
                .as_str()
                .and_then(|text| text.split_once('='))
                .unwrap_or_else(|| panic!("{name} names no check and reason"));
            assert!(check.starts_with("CKV_"), "{name}: {check}");
            assert!(reason.trim().len() > 20, "{name}: {check} has no reason");
            annotated += 1;
        }
    }
    assert!(annotated > 0, "the helm test pod's skips were read");
}

/// Whether `selector` (a NetworkPolicy podSelector) selects a pod with `labels`.
fn selects(selector: &Value, labels: &serde_json::Map<String, Value>) -> bool {
    assert!(
        selector.get("matchExpressions").is_none(),
        "matchExpressions are not evaluated here"
    );
    selector["matchLabels"].as_object().is_none_or(|wanted| {
        wanted
            .iter()
            .all(|(key, value)| labels.get(key) == Some(value))
    })
}

/// Where a connection goes: a pod of this namespace (its labels) or an address outside it.
enum Destination<'a> {
    Pod(&'a serde_json::Map<String, Value>),
    Outside,
}

/// Whether the release's NetworkPolicies let a pod with `labels` open a TCP/UDP connection to
/// `destination` on `port`, as a CNI that enforces them decides: allowed when no policy of type
/// Egress selects the pod, else when one of their rules names the port and the destination.
fn egress_allowed(
    policies: &[&Value],
    labels: &serde_json::Map<String, Value>,
    destination: &Destination<'_>,
    port: u64,
    protocol: &str,
) -> bool {
    let selecting: Vec<&&Value> = policies
        .iter()
        .filter(|policy| {
            policy["spec"]["policyTypes"]
                .as_array()
                .is_some_and(|types| types.iter().any(|kind| kind == "Egress"))
                && selects(&policy["spec"]["podSelector"], labels)
        })
        .collect();
    if selecting.is_empty() {
        return true;
    }
    selecting.iter().any(|policy| {
        policy["spec"]["egress"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|rule| {
                let port_matches = rule["ports"].as_array().is_none_or(|ports| {
                    ports.iter().any(|entry| {
                        entry["port"].as_u64() == Some(port)
                            && entry["protocol"].as_str().unwrap_or("TCP") == protocol
                    })
                });
                let peer_matches = match rule["to"].as_array() {
                    None => true,
                    Some(peers) if peers.is_empty() => true,
                    Some(peers) => peers.iter().any(|peer| match destination {
                        // A bare podSelector names pods of the policy's own namespace.
                        Destination::Pod(target) => {
                            peer.get("namespaceSelector").is_none()
                                && peer.get("ipBlock").is_none()
                                && selects(&peer["podSelector"], target)
                        }
                        Destination::Outside => peer.get("ipBlock").is_some(),
                    }),
                };
                port_matches && peer_matches
            })
    })
}

/// Egress under the default deny: every pod of the release (Deployments, migration Jobs, the
/// helm test pod) may reach DNS, and beyond it exactly what its configuration names: the mesh
/// Services in its environment or arguments (and no other), PostgreSQL when it has a database
/// URL, Redis when it has a Redis URL, the OTLP collector when one is set; nothing else.
#[test]
fn egress_policies_allow_each_pod_exactly_the_peers_and_stores_it_uses() {
    let root = workspace_root();
    let output = std::process::Command::new("bash")
        .arg(root.join("scripts/helm.sh"))
        .args(["template", RELEASE, "helm/medai", "--namespace", NAMESPACE])
        .args([
            "--set",
            "otlpEndpoint=http://otel-collector.observability:4317",
        ])
        .current_dir(&root)
        .output()
        .expect("helm template");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let manifests = parse_manifests(&String::from_utf8(output.stdout).expect("UTF-8"));
    let policies: Vec<&Value> = manifests
        .iter()
        .filter(|manifest| manifest["kind"] == "NetworkPolicy")
        .collect();
    let deny = policies
        .iter()
        .find(|policy| {
            policy["metadata"]["name"]
                .as_str()
                .is_some_and(|name| name.ends_with("-default-deny"))
        })
        .expect("a default-deny policy");
    assert!(
        deny["spec"]["egress"].is_null()
            && deny["spec"]["policyTypes"]
                .as_array()
                .is_some_and(|types| types.iter().any(|kind| kind == "Egress")),
        "the default deny covers egress"
    );
    // Every pod template of the release: (name, labels, all text its container is given).
    let mut pods: Vec<(String, serde_json::Map<String, Value>, String)> = Vec::new();
    for manifest in &manifests {
        let template = match manifest["kind"].as_str() {
            Some("Deployment" | "Job") => &manifest["spec"]["template"],
            Some("Pod") => manifest,
            _ => continue,
        };
        let labels = template["metadata"]["labels"]
            .as_object()
            .cloned()
            .expect("pod labels");
        let container = &template["spec"]["containers"][0];
        let given = format!("{} {}", container["env"], container["args"]);
        pods.push((
            manifest["metadata"]["name"]
                .as_str()
                .expect("name")
                .to_owned(),
            labels,
            given,
        ));
    }
    assert!(
        pods.len() >= 9,
        "Deployments, migration Jobs and the test pod"
    );
    let services: Vec<(String, serde_json::Map<String, Value>)> = manifests
        .iter()
        .filter(|manifest| manifest["kind"] == "Deployment")
        .map(|deployment| {
            (
                deployment["metadata"]["name"]
                    .as_str()
                    .expect("name")
                    .to_owned(),
                deployment["spec"]["template"]["metadata"]["labels"]
                    .as_object()
                    .cloned()
                    .expect("labels"),
            )
        })
        .collect();
    for (pod, labels, given) in &pods {
        assert!(
            selects(&deny["spec"]["podSelector"], labels),
            "{pod} is under the default deny"
        );
        assert!(
            egress_allowed(&policies, labels, &Destination::Outside, 53, "UDP")
                || policies.iter().any(|policy| {
                    selects(&policy["spec"]["podSelector"], labels)
                        && policy["spec"]["egress"].to_string().contains("\"port\":53")
                }),
            "{pod} resolves names"
        );
        for (service, target) in &services {
            // Through the Service or its headless twin (the mesh's own calls, issue 13).
            let calls = given.contains(&format!("https://{service}:50051"))
                || given.contains(&format!("https://{service}-headless:50051"));
            assert_eq!(
                egress_allowed(&policies, labels, &Destination::Pod(target), 50051, "TCP"),
                calls,
                "{pod} → {service}: allowed exactly when it calls it"
            );
            assert!(
                !egress_allowed(&policies, labels, &Destination::Pod(target), 9090, "TCP"),
                "{pod} → {service}'s admin port"
            );
        }
        let outside = |port| egress_allowed(&policies, labels, &Destination::Outside, port, "TCP");
        assert_eq!(
            outside(5432),
            given.contains("DATABASE_URL"),
            "{pod} → PostgreSQL"
        );
        assert_eq!(outside(6379), given.contains("REDIS_URL"), "{pod} → Redis");
        assert_eq!(
            outside(4317),
            given.contains("OTLP_ENDPOINT"),
            "{pod} → OTLP"
        );
        assert!(!outside(443), "{pod} may not reach anything else");
    }
}

/// k8s/README.md lists every Secret the chart reads (environment references and volumes of
/// every Deployment, hook Job and test pod, with the optional migration Secrets set), each in
/// a row of its table that names the keys the chart reads from it.
#[test]
fn the_readme_lists_every_secret_and_key_the_chart_reads() {
    let root = workspace_root();
    let readme = std::fs::read_to_string(root.join("k8s/README.md")).expect("k8s/README.md");
    let rows: Vec<&str> = readme
        .lines()
        .filter(|line| line.starts_with('|'))
        .collect();
    let mut arguments = vec![
        "template".to_owned(),
        RELEASE.to_owned(),
        "helm/medai".to_owned(),
    ];
    for service in ["auth", "audit", "inference"] {
        arguments.push("--set".to_owned());
        arguments.push(format!(
            "databases.{service}.migrationSecretName=medai-{service}-migration"
        ));
    }
    let output = std::process::Command::new("bash")
        .arg(root.join("scripts/helm.sh"))
        .args(&arguments)
        .current_dir(&root)
        .output()
        .expect("helm template");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let manifests = parse_manifests(&String::from_utf8(output.stdout).expect("UTF-8"));
    // Secret name → keys read from it.
    let mut read: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for manifest in &manifests {
        let spec = match manifest["kind"].as_str() {
            Some("Deployment" | "Job") => &manifest["spec"]["template"]["spec"],
            Some("Pod") => &manifest["spec"],
            _ => continue,
        };
        for container in spec["containers"].as_array().into_iter().flatten() {
            for entry in container["env"].as_array().into_iter().flatten() {
                let reference = &entry["valueFrom"]["secretKeyRef"];
                if let (Some(name), Some(key)) =
                    (reference["name"].as_str(), reference["key"].as_str())
                {
                    read.entry(name.to_owned())
                        .or_default()
                        .push(key.to_owned());
                }
            }
        }
        let container = &spec["containers"][0];
        let given = format!("{} {}", container["env"], container["args"]);
        for volume in spec["volumes"].as_array().into_iter().flatten() {
            let Some(name) = volume["secret"]["secretName"].as_str() else {
                continue;
            };
            let keys = read.entry(name.to_owned()).or_default();
            if let Some(items) = volume["secret"]["items"].as_array() {
                keys.extend(
                    items
                        .iter()
                        .filter_map(|item| item["key"].as_str().map(str::to_owned)),
                );
                continue;
            }
            // The whole Secret: the keys are the files the container is pointed at under the
            // mount (`/etc/medai/tls/ca.crt`, `--password-file=/etc/medai/admin/password`).
            for mount in container["volumeMounts"].as_array().into_iter().flatten() {
                if mount["name"] != volume["name"] {
                    continue;
                }
                let prefix = format!("{}/", mount["mountPath"].as_str().expect("mountPath"));
                for (at, _) in given.match_indices(&prefix) {
                    let file: String = given[at + prefix.len()..]
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
                        .collect();
                    keys.push(file);
                }
            }
        }
    }
    assert!(read.len() >= 12, "the chart's Secrets were found: {read:?}");
    for (name, keys) in &read {
        // Per-service certificates are one row, `medai-tls-<service>`.
        let listed = ["gateway", "auth", "validation", "inference", "audit"]
            .iter()
            .find_map(|service| name.strip_suffix(service))
            .filter(|prefix| prefix.ends_with("-tls-"))
            .map_or_else(
                || format!("`{name}`"),
                |prefix| format!("`{prefix}<service>`"),
            );
        let row = rows
            .iter()
            .find(|row| row.contains(&listed))
            .unwrap_or_else(|| panic!("k8s/README.md does not list the Secret {name}"));
        for key in keys {
            assert!(
                row.contains(&format!("`{key}`")),
                "k8s/README.md's row for {name} does not name its key {key}"
            );
        }
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
    // As `helm install` would: the migration Jobs first (the pods run with migrations off).
    cluster.run_hook_jobs("pre-install", READY_TIMEOUT).await;
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

/// A port free now, for dcmtk's `storescp` (which binds its own listener from its argument).
fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("address")
        .port()
}

async fn dcmtk(tool: &str, arguments: &[&str]) -> std::process::Output {
    tokio::process::Command::new(tool)
        .args(arguments)
        .output()
        .await
        .unwrap_or_else(|error| panic!("{tool} cannot run ({error}): run scripts/pacs-tools.sh"))
}

/// Issue 15: the PACS bridge as the chart deploys it (bridge.enabled). The chart is rendered
/// with tests/chart/bridge-values.yaml over the test values; the mesh is installed, the bridge's
/// gateway user made by the admin, and the bridge pod started from its Deployment with exactly
/// its pod's environment: its outbox on the claim (SQLite), the gateway reached by the Service
/// name, the mesh CA from its certificate Secret, its probes. Through the bridge's Service
/// (the DICOM port 104): dcmtk's `echoscu` is answered, and a C-STORE of a real MR image from
/// `storescu` comes back as a Structured Report at the configured destination (a dcmtk
/// `storescp`), which `dsrdump` parses, naming the source instance. Then its metrics are
/// scraped as the ServiceMonitor leads (the -metrics Service's admin port) and count both.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_bridge_from_the_chart_answers_c_echo_and_returns_a_c_store_as_a_structured_report() {
    let began = Instant::now();
    let root = workspace_root();
    let scratch = tempfile::tempdir().expect("scratch");

    // The result destination: a storescp that files what it receives.
    let received = scratch.path().join("received");
    std::fs::create_dir_all(&received).expect("received folder");
    let results_port = free_tcp_port();
    let mut storescp = tokio::process::Command::new("storescp")
        .args(["-aet", "RESULTS", "-od"])
        .arg(&received)
        .arg(results_port.to_string())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("storescp runs (scripts/pacs-tools.sh installs dcmtk)");
    let destination = scratch.path().join("destination.yaml");
    std::fs::write(
        &destination,
        format!(
            "bridge:\n  results:\n    address: \"127.0.0.1:{results_port}\"\nmonitoring:\n  serviceMonitor:\n    enabled: true\n"
        ),
    )
    .expect("destination values");

    let manifests = medai_e2e::cluster::render_chart_with(
        RELEASE,
        NAMESPACE,
        &[
            &root.join("tests/chart/values.yaml"),
            &root.join("tests/chart/bridge-values.yaml"),
            &destination,
        ],
    );
    let bridge_deployment = format!("{RELEASE}-bridge");
    let bridge_service = manifests
        .iter()
        .find(|manifest| {
            manifest["kind"] == "Service" && manifest["metadata"]["name"] == bridge_deployment
        })
        .expect("the bridge's Service");
    assert_eq!(bridge_service["spec"]["ports"][0]["port"], 104);
    assert!(
        manifests
            .iter()
            .any(|manifest| manifest["kind"] == "PersistentVolumeClaim"
                && manifest["metadata"]["name"] == "medai-bridge-outbox"),
        "the outbox claim is part of the release"
    );

    let pki = TestPki::new();
    pki.layout
        .ensure(&["bridge"])
        .expect("the bridge's certificate");
    let assets = Assets::locate();
    let (mut objects, _) = cluster_objects(&pki, &assets, scratch.path()).await;
    let read = |path: std::path::PathBuf| std::fs::read(path).expect("PKI file");
    objects.secrets.insert(
        "medai-tls-bridge".to_owned(),
        secret(&[
            ("ca.crt", read(pki.layout.ca_certificate())),
            ("tls.crt", read(pki.layout.certificate("bridge"))),
            ("tls.key", read(pki.layout.key("bridge"))),
        ]),
    );
    let bridge_password = "the pacs bridge of the render-and-run test";
    objects.secrets.insert(
        "medai-bridge-gateway".to_owned(),
        secret(&[("password", bridge_password.as_bytes().to_vec())]),
    );
    let outbox = scratch.path().join("outbox-volume");
    std::fs::create_dir_all(&outbox).expect("outbox volume");
    objects
        .claims
        .insert("medai-bridge-outbox".to_owned(), outbox.clone());
    objects.image_files.insert(
        "/usr/local/bin/medai-bridge".to_owned(),
        binaries_dir().join("medai-bridge"),
    );
    let mut cluster = LocalCluster::new(NAMESPACE, manifests, objects).await;
    cluster.run_hook_jobs("pre-install", READY_TIMEOUT).await;
    for service in SERVICES {
        cluster
            .start_deployment(&format!("{RELEASE}-{service}"), READY_TIMEOUT)
            .await;
    }

    // The bridge's own user, as an admin makes it before installing the bridge.
    let gateway_endpoint = format!(
        "https://{}",
        cluster.service_address("medai-gateway", 50051)
    );
    let mut gateway = connect_gateway(&gateway_endpoint, &pki.layout.ca_certificate())
        .await
        .expect("gateway");
    let admin = gateway
        .login(LoginRequest {
            username: "admin".to_owned(),
            password: ADMIN_PASSWORD.to_owned(),
        })
        .await
        .expect("admin login")
        .into_inner()
        .grant
        .expect("tokens")
        .access_token;
    gateway
        .create_user(authorised(
            CreateUserRequest {
                username: "pacs-bridge".to_owned(),
                password: bridge_password.to_owned(),
                role: "clinician".to_owned(),
            },
            &admin,
        ))
        .await
        .expect("the bridge's user");

    cluster
        .start_deployment(&bridge_deployment, READY_TIMEOUT)
        .await;
    let bridge_pod = cluster
        .pods
        .iter()
        .find(|pod| pod.owner == bridge_deployment)
        .expect("the bridge pod");
    let environment = bridge_pod.environment();
    assert!(
        !environment
            .iter()
            .any(|(name, _)| name.ends_with("_SERVICE_HOST")),
        "service links are off for the bridge"
    );
    let dicom = cluster.service_address(&bridge_deployment, 104);
    let (host, port) = (dicom.ip().to_string(), dicom.port().to_string());

    let echo = dcmtk(
        "echoscu",
        &["-aet", "ECHOSCU", "-aec", "MEDAI_BRIDGE", &host, &port],
    )
    .await;
    assert!(
        echo.status.success(),
        "C-ECHO through the bridge's Service: {}",
        String::from_utf8_lossy(&echo.stderr)
    );
    let stranger = dcmtk(
        "echoscu",
        &["-aet", "STRANGER", "-aec", "MEDAI_BRIDGE", &host, &port],
    )
    .await;
    assert!(
        !stranger.status.success(),
        "a calling AE title outside bridge.allowedCallingAeTitles is rejected"
    );

    let mr = assets.dicom_dir.join("MR_small.dcm");
    let stored = dcmtk(
        "storescu",
        &[
            "-aet",
            "STORESCU",
            "-aec",
            "MEDAI_BRIDGE",
            &host,
            &port,
            mr.to_str().expect("path"),
        ],
    )
    .await;
    assert!(
        stored.status.success(),
        "C-STORE through the bridge's Service: {}",
        String::from_utf8_lossy(&stored.stderr)
    );

    // The report arrives at the destination: a Structured Report on the source instance.
    let deadline = Instant::now() + Duration::from_secs(120);
    let report = loop {
        cluster.assert_no_pod_exited();
        let files: Vec<std::path::PathBuf> = std::fs::read_dir(&received)
            .expect("received")
            .flatten()
            .map(|entry| entry.path())
            .collect();
        if let Some(file) = files.first() {
            // storescp writes the file completely before the C-STORE response; give the
            // rename a moment by reading until it parses.
            let dump = dcmtk("dsrdump", &[file.to_str().expect("path")]).await;
            if dump.status.success() {
                break (file.clone(), dump);
            }
        }
        assert!(
            Instant::now() < deadline,
            "no report reached the destination; the bridge's log ends:\n{}",
            cluster
                .pods
                .iter()
                .find(|pod| pod.owner == bridge_deployment)
                .map(medai_e2e::cluster::Pod::log_tail)
                .unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let printed = String::from_utf8_lossy(&report.1.stdout).to_string();
    assert!(
        printed.contains("RESEARCH USE ONLY"),
        "the SR carries the disclaimer:\n{printed}"
    );
    let source = dcmtk("dcmdump", &["+P", "0008,0018", mr.to_str().expect("path")]).await;
    let source_uid = String::from_utf8_lossy(&source.stdout)
        .split('[')
        .nth(1)
        .and_then(|rest| rest.split(']').next())
        .expect("the source's SOP Instance UID")
        .to_owned();
    let report_dump = dcmtk("dcmdump", &[report.0.to_str().expect("path")]).await;
    assert!(
        String::from_utf8_lossy(&report_dump.stdout).contains(&source_uid),
        "the report references the stored instance"
    );
    // The outbox lives on the claim, nothing outside the pod's mounts changed.
    assert!(
        std::fs::read_dir(&outbox)
            .expect("outbox")
            .flatten()
            .any(|entry| entry.file_name().to_string_lossy().starts_with("outbox.db")),
        "the outbox is on the claim"
    );
    // Prometheus finds the bridge as it finds every service: the ServiceMonitor selects the
    // bridge's -metrics Service, whose admin port leads to the pod's /metrics, which counts the
    // C-STORE and the report just made; the NetworkPolicy lets the scraper in on that port.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        cluster.assert_no_pod_exited();
        let pages = scrape_as_the_service_monitor(&cluster, &bridge_deployment).await;
        assert_eq!(pages.len(), 1, "one bridge pod scraped");
        let page = &pages[0];
        assert!(
            page.contains("# TYPE medai_bridge_outbox_instances gauge"),
            "the bridge's own families:\n{page}"
        );
        let received = metric_sum(page, "medai_bridge_instances_received_total");
        let delivered = metric_sum(page, "medai_bridge_reports_delivered_total");
        let refused = metric_sum(page, "medai_bridge_associations_refused_total");
        if received >= 1.0 && delivered >= 1.0 {
            assert!(
                refused >= 1.0,
                "the stranger's association is counted:\n{page}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the bridge's metrics never counted the C-STORE and its report:\n{page}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let admin_port = cluster.manifests().iter().find_map(|manifest| {
        (manifest["kind"] == "Deployment" && manifest["metadata"]["name"] == bridge_deployment)
            .then(|| manifest["spec"]["template"]["spec"]["containers"][0]["ports"].clone())
    });
    let admin_port = admin_port
        .and_then(|ports| {
            ports.as_array().and_then(|ports| {
                ports
                    .iter()
                    .find(|port| port["name"] == "admin")
                    .and_then(|port| port["containerPort"].as_u64())
            })
        })
        .expect("the bridge container's admin port");
    assert!(
        cluster.manifests().iter().any(|manifest| {
            manifest["kind"] == "NetworkPolicy"
                && manifest["metadata"]["name"] == format!("{RELEASE}-bridge-ingress")
                && manifest["spec"]["ingress"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|rule| {
                        rule.get("from").is_none()
                            && rule["ports"]
                                .as_array()
                                .into_iter()
                                .flatten()
                                .any(|port| port["port"].as_u64() == Some(admin_port))
                    })
        }),
        "the bridge's ingress policy admits the scraper on the admin port"
    );
    cluster.assert_read_only_respected();
    eprintln!(
        "bridge from the chart: C-ECHO, C-STORE and its SR in {:.1} s",
        began.elapsed().as_secs_f64()
    );
    let _ = storescp.kill().await;
    cluster.stop().await;
}

/// What a Prometheus Operator does with the release's ServiceMonitor (issue 15): the Services of
/// the namespace its selector picks (matchLabels and `In` matchExpressions), on each the port its
/// endpoint names, then every ready pod behind that Service on the port's targetPort at the
/// endpoint's path. Returns the pages of the pods that `owner` (a Deployment) runs.
async fn scrape_as_the_service_monitor(cluster: &LocalCluster, owner: &str) -> Vec<String> {
    let manifests = cluster.manifests();
    let monitor = manifests
        .iter()
        .find(|manifest| manifest["kind"] == "ServiceMonitor")
        .expect("the release's ServiceMonitor (monitoring.serviceMonitor.enabled)");
    assert!(
        monitor["spec"]["namespaceSelector"]["matchNames"]
            .as_array()
            .is_some_and(|names| names.iter().any(|name| name == NAMESPACE)),
        "the ServiceMonitor looks in the release's namespace"
    );
    let selector = &monitor["spec"]["selector"];
    let picks = |labels: &Value| {
        let labels_match = selector["matchLabels"]
            .as_object()
            .is_none_or(|wanted| wanted.iter().all(|(key, value)| &labels[key] == value));
        let expressions_match = selector["matchExpressions"]
            .as_array()
            .into_iter()
            .flatten()
            .all(|expression| {
                assert_eq!(expression["operator"], "In", "only In is evaluated here");
                expression["values"].as_array().is_some_and(|values| {
                    values.contains(&labels[expression["key"].as_str().unwrap_or_default()])
                })
            });
        labels_match && expressions_match
    };
    let mut pages = Vec::new();
    for service in manifests
        .iter()
        .filter(|manifest| manifest["kind"] == "Service" && picks(&manifest["metadata"]["labels"]))
    {
        let service_name = service["metadata"]["name"].as_str().expect("name");
        for endpoint in monitor["spec"]["endpoints"].as_array().expect("endpoints") {
            assert_eq!(endpoint["scheme"], "http");
            let Some(port) = service["spec"]["ports"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|port| port["name"] == endpoint["port"])
            else {
                continue;
            };
            let target = port["targetPort"].as_str().expect("a named targetPort");
            let path = endpoint["path"].as_str().unwrap_or("/metrics");
            for pod_name in cluster.endpoints(service_name) {
                let Some(pod) = cluster
                    .pods
                    .iter()
                    .find(|pod| pod.name == pod_name && pod.owner == owner)
                else {
                    continue;
                };
                pages.push(http_get(pod.port(target), path).await);
            }
        }
    }
    pages
}

/// One HTTP/1.0 GET (so the answer is never chunked); the body of a 200 answer.
async fn http_get(address: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address)
        .await
        .expect("connect to the admin port");
    let request = format!("GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .expect("send the request");
    let mut answer = Vec::new();
    stream
        .read_to_end(&mut answer)
        .await
        .expect("read the answer");
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let (head, body) = answer.split_once("\r\n\r\n").expect("an HTTP answer");
    assert_eq!(
        head.split_whitespace().nth(1),
        Some("200"),
        "GET {path}: {head}"
    );
    body.to_owned()
}

/// The sum of a family's samples on a Prometheus text page (0 when absent).
fn metric_sum(page: &str, family: &str) -> f64 {
    page.lines()
        .filter(|line| {
            line.strip_prefix(family)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// With autoscaling on, every service that scales freely gets a HorizontalPodAutoscaler
/// (inference included, issue 13) and leaves its replica count to it; audit keeps its own.
#[test]
fn autoscaling_covers_gateway_auth_validation_and_inference() {
    let scratch = tempfile::tempdir().expect("scratch");
    let values = scratch.path().join("values.yaml");
    std::fs::write(&values, "autoscaling:\n  enabled: true\n").expect("values");
    let manifests = render_chart(RELEASE, NAMESPACE, &values);
    let mut scaled: Vec<&str> = manifests
        .iter()
        .filter(|manifest| manifest["kind"] == "HorizontalPodAutoscaler")
        .map(|hpa| {
            assert_eq!(
                hpa["spec"]["scaleTargetRef"]["name"], hpa["metadata"]["name"],
                "each autoscaler scales its own Deployment"
            );
            hpa["metadata"]["name"].as_str().expect("name")
        })
        .collect();
    scaled.sort_unstable();
    assert_eq!(
        scaled,
        [
            "medai-auth",
            "medai-gateway",
            "medai-inference",
            "medai-validation"
        ]
    );
    for deployment in manifests
        .iter()
        .filter(|manifest| manifest["kind"] == "Deployment")
    {
        let name = deployment["metadata"]["name"].as_str().expect("name");
        assert_eq!(
            deployment["spec"]["replicas"].is_null(),
            scaled.contains(&name),
            "{name}: the replica count is the autoscaler's exactly when one scales it"
        );
    }
}

/// Every container of every workload the chart renders (Deployments, Jobs, the helm test
/// Pod), as (workload name, container).
fn rendered_containers(manifests: &[Value]) -> Vec<(String, &Value)> {
    let mut containers = Vec::new();
    for manifest in manifests {
        let spec = match manifest["kind"].as_str() {
            Some("Deployment" | "StatefulSet" | "DaemonSet" | "Job") => {
                &manifest["spec"]["template"]["spec"]
            }
            Some("Pod") => &manifest["spec"],
            _ => continue,
        };
        let name = manifest["metadata"]["name"].as_str().expect("name");
        for list in ["initContainers", "containers"] {
            for container in spec[list].as_array().into_iter().flatten() {
                containers.push((name.to_owned(), container));
            }
        }
    }
    containers
}

/// A container's `env` entries whose name contains `needle`, as (name, literal value).
fn env_entries(container: &Value, needle: &str) -> Vec<(String, String)> {
    container["env"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|entry| {
            let name = entry["name"].as_str()?;
            name.contains(needle).then(|| {
                (
                    name.to_owned(),
                    entry["value"]
                        .as_str()
                        .unwrap_or("<not a literal>")
                        .to_owned(),
                )
            })
        })
        .collect()
}

/// auth.passwords (the argon2id hash bounds) reach the auth container as exactly the two
/// variables auth reads, and no other container; unset, none is rendered and auth applies its
/// own defaults (the CPU cores up to 8, 64 waiting).
#[test]
fn auth_password_hash_bounds_reach_only_the_auth_container() {
    let scratch = tempfile::tempdir().expect("scratch");
    let values = scratch.path().join("values.yaml");
    std::fs::write(
        &values,
        "auth:\n  passwords:\n    maxConcurrentHashes: 3\n    maxWaitingHashes: 1000\n",
    )
    .expect("values");
    let manifests = render_chart(RELEASE, NAMESPACE, &values);
    let containers = rendered_containers(&manifests);
    assert!(
        containers.len() >= SERVICES.len(),
        "every service's container is rendered"
    );
    let mut auth_seen = false;
    for (workload, container) in &containers {
        let passwords = env_entries(container, "PASSWORDS__");
        if workload == "medai-auth" {
            auth_seen = true;
            assert_eq!(
                passwords,
                [
                    (
                        "MEDAI_AUTH_PASSWORDS__MAX_CONCURRENT_HASHES".to_owned(),
                        "3".to_owned()
                    ),
                    (
                        "MEDAI_AUTH_PASSWORDS__MAX_WAITING_HASHES".to_owned(),
                        "1000".to_owned()
                    ),
                ],
                "the auth container gets exactly the two bounds, as given"
            );
        } else {
            assert!(
                passwords.is_empty(),
                "{workload} must not get auth's hash bounds: {passwords:?}"
            );
        }
    }
    assert!(auth_seen, "the auth Deployment is rendered");

    // Only one of the two set: only that one is rendered.
    std::fs::write(&values, "auth:\n  passwords:\n    maxWaitingHashes: 8\n").expect("values");
    let manifests = render_chart(RELEASE, NAMESPACE, &values);
    let auth = rendered_containers(&manifests)
        .into_iter()
        .find(|(workload, _)| workload == "medai-auth")
        .expect("auth")
        .1
        .clone();
    assert_eq!(
        env_entries(&auth, "PASSWORDS__"),
        [(
            "MEDAI_AUTH_PASSWORDS__MAX_WAITING_HASHES".to_owned(),
            "8".to_owned()
        )]
    );

    // The chart's defaults: nothing set, so the service's own defaults apply.
    std::fs::write(&values, "{}\n").expect("values");
    let manifests = render_chart(RELEASE, NAMESPACE, &values);
    for (workload, container) in rendered_containers(&manifests) {
        assert_eq!(
            env_entries(container, "PASSWORDS__"),
            [],
            "{workload}: no hash bound unless one is set"
        );
    }
}

/// A hash bound that is not a positive integer within its maximum is refused by
/// values.schema.json when the chart is rendered: helm exits non-zero naming the value.
#[test]
fn auth_password_hash_bounds_that_are_not_positive_integers_are_refused_at_template_time() {
    let root = workspace_root();
    let refused = [
        ("--set", "auth.passwords.maxConcurrentHashes=0", "minimum"),
        ("--set", "auth.passwords.maxWaitingHashes=0", "minimum"),
        (
            "--set-string",
            "auth.passwords.maxConcurrentHashes=4",
            "want integer",
        ),
        (
            "--set-string",
            "auth.passwords.maxWaitingHashes=eight",
            "want integer",
        ),
        (
            "--set",
            "auth.passwords.maxConcurrentHashes=2.5",
            "want integer",
        ),
        ("--set", "auth.passwords.maxConcurrentHashes=65", "maximum"),
        ("--set", "auth.passwords.maxWaitingHashes=4097", "maximum"),
        (
            "--set",
            "auth.passwords.maxConcurentHashes=4",
            "additional properties",
        ),
    ];
    for (flag, setting, reason) in refused {
        let output = std::process::Command::new("bash")
            .arg(root.join("scripts/helm.sh"))
            .args(["template", RELEASE, "helm/medai", "--namespace", NAMESPACE])
            .args([flag, setting])
            .current_dir(&root)
            .output()
            .expect("helm template");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            !output.status.success(),
            "{flag} {setting} was rendered instead of refused"
        );
        let key = setting
            .split_once('=')
            .expect("key=value")
            .0
            .rsplit('.')
            .next()
            .expect("a key");
        assert!(
            stderr.contains("/auth/passwords") && stderr.contains(key),
            "{flag} {setting}: the refusal names the value: {stderr}"
        );
        assert!(
            stderr.contains(reason),
            "{flag} {setting}: refused for {reason}: {stderr}"
        );
    }
    // The bounds themselves are accepted.
    let output = std::process::Command::new("bash")
        .arg(root.join("scripts/helm.sh"))
        .args(["template", RELEASE, "helm/medai", "--namespace", NAMESPACE])
        .args(["--set", "auth.passwords.maxConcurrentHashes=1"])
        .args(["--set", "auth.passwords.maxWaitingHashes=4096"])
        .current_dir(&root)
        .output()
        .expect("helm template");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Audit's checkpoint log (every signed checkpoint, outside the database) lives on the
/// chart's shared volume (audit.checkpointLogClaim), one file per pod: each of two replicas
/// appends the checkpoint it signed to its own file, signed by the one key; the files outlive
/// their pods, and a pod started later writes a file of its own beside them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_pods_write_their_signed_checkpoints_to_the_shared_log_volume() {
    use medai_proto::audit::v1::AppendRequest;

    let began = Instant::now();
    let root = workspace_root();
    let manifests = render_chart(RELEASE, NAMESPACE, &root.join("tests/chart/values.yaml"));
    let pki = TestPki::new();
    let assets = Assets::locate();
    let scratch = tempfile::tempdir().expect("scratch");
    let (objects, public_key) = cluster_objects(&pki, &assets, scratch.path()).await;
    let public_key = base64::engine::general_purpose::STANDARD
        .decode(public_key)
        .expect("public key");
    let volume = scratch.path().join("audit-checkpoints");
    let mut cluster = LocalCluster::new(NAMESPACE, manifests, objects).await;
    cluster.run_hook_jobs("pre-install", READY_TIMEOUT).await;
    cluster.start_deployment("medai-audit", READY_TIMEOUT).await;

    let pki = &pki;
    let sign_on = |address| async move {
        let mut audit = AuditServiceClient::new(pki.channel_as("gateway", address, "audit"));
        audit
            .append(AppendRequest {
                actor: "spiffe://medai/gateway".to_owned(),
                action: "CHART_CHECK".to_owned(),
                resource: "chart/checkpoint-log".to_owned(),
                outcome: "SUCCESS".to_owned(),
                context_json: "{}".to_owned(),
            })
            .await
            .expect("append");
        audit
            .create_checkpoint(CreateCheckpointRequest {})
            .await
            .expect("a signed checkpoint")
            .into_inner()
            .checkpoint
            .expect("checkpoint")
            .tree_size
    };
    let logged = |pod: &str| {
        medai_audit::checkpoint_log::newest_signed(
            &volume.join(format!("{pod}.checkpoints.jsonl")),
            &public_key,
        )
        .expect("read the log")
        .map(|checkpoint| checkpoint.tree_size)
    };
    let audit_pods: Vec<(usize, String, std::net::SocketAddr)> = cluster
        .pods
        .iter()
        .enumerate()
        .filter(|(_, pod)| pod.owner == "medai-audit")
        .map(|(index, pod)| (index, pod.name.clone(), pod.port("grpc")))
        .collect();
    assert_eq!(audit_pods.len(), 2, "two audit replicas");
    for (_, name, address) in &audit_pods {
        let signed = sign_on(*address).await;
        assert_eq!(
            logged(name),
            Some(signed),
            "{name} logged the checkpoint it signed in its own file on the volume"
        );
    }

    // The pods go (as a rollout or an eviction ends them); their logs stay on the volume, and
    // the pod that replaces them logs beside them.
    for (index, name, _) in &audit_pods {
        cluster.terminate(*index).await;
        assert!(logged(name).is_some(), "{name}'s log outlives the pod");
    }
    let index = cluster.start_pod("medai-audit");
    cluster.wait_ready(index, READY_TIMEOUT).await;
    let (name, address) = (
        cluster.pods[index].name.clone(),
        cluster.pods[index].port("grpc"),
    );
    let signed = sign_on(address).await;
    assert_eq!(
        logged(&name),
        Some(signed),
        "the new pod logs in a file of its own"
    );
    let mut files: Vec<String> = std::fs::read_dir(&volume)
        .expect("the volume")
        .map(|entry| {
            entry
                .expect("entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    files.sort();
    eprintln!("checkpoint logs on the shared volume: {files:?}");
    assert_eq!(files.len(), 3, "one log per pod that ran: {files:?}");
    cluster.assert_read_only_respected();
    eprintln!(
        "audit checkpoint log check took {:.1} s",
        began.elapsed().as_secs_f64()
    );
    cluster.stop().await;
}

/// Issue 14: every service container's async runtime is sized by its CPU request (a
/// `resourceFieldRef` the kubelet rounds up), unless `services.<name>.workerThreads` names a
/// count; the whole-mesh boot above checks the running pods' figures.
#[test]
fn each_service_s_runtime_workers_follow_its_cpu_request_unless_a_count_is_given() {
    let scratch = tempfile::tempdir().expect("scratch");
    let values = scratch.path().join("values.yaml");
    std::fs::write(&values, "services:\n  gateway:\n    workerThreads: 3\n").expect("values");
    let manifests = render_chart(RELEASE, NAMESPACE, &values);
    let mut seen = BTreeSet::new();
    for (workload, container) in rendered_containers(&manifests) {
        let Some(service) = workload.strip_prefix("medai-") else {
            continue;
        };
        if !medai_cli::launcher::SERVICES.contains(&service) || container["name"] != service {
            continue;
        }
        seen.insert(service.to_owned());
        let entries: Vec<&Value> = container["env"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|entry| entry["name"] == "TOKIO_WORKER_THREADS")
            .collect();
        assert_eq!(entries.len(), 1, "{workload}: {entries:?}");
        if service == "gateway" {
            assert_eq!(entries[0]["value"], "3", "the given count wins");
        } else {
            assert_eq!(
                entries[0]["valueFrom"]["resourceFieldRef"],
                serde_json::json!({ "containerName": service, "resource": "requests.cpu", "divisor": "1" }),
                "{workload}"
            );
        }
    }
    assert_eq!(seen.len(), 5, "every service is rendered: {seen:?}");
}

/// Issue 14: glibc's allocator settings reach the inference container, and only it, as the
/// GLIBC_TUNABLES that glibc reads when the process starts; the image's inference stage and
/// `medai up` give the same value, and `inference.mallocTunables: ""` leaves glibc's defaults.
#[test]
fn the_inference_container_alone_carries_the_malloc_tunables_the_image_and_launcher_give() {
    let expected = medai_cli::launcher::INFERENCE_MALLOC_TUNABLES;
    assert!(
        expected.starts_with("glibc.malloc.mmap_threshold=131072"),
        "{expected}"
    );
    let scratch = tempfile::tempdir().expect("scratch");
    let values = scratch.path().join("values.yaml");
    std::fs::write(&values, "{}\n").expect("values");
    let manifests = render_chart(RELEASE, NAMESPACE, &values);
    let mut inference_seen = false;
    for (workload, container) in rendered_containers(&manifests) {
        let tunables = env_entries(container, "GLIBC_TUNABLES");
        if workload == "medai-inference" {
            inference_seen = true;
            assert_eq!(
                tunables,
                [("GLIBC_TUNABLES".to_owned(), expected.to_owned())],
                "the inference container gets the launcher's tunables"
            );
        } else {
            assert_eq!(tunables, [], "{workload} keeps glibc's defaults");
        }
    }
    assert!(inference_seen, "the inference Deployment is rendered");

    // The image: the inference stage sets the same value, and the final image is the stage
    // its SERVICE names, so no other service's image carries it.
    let dockerfile =
        std::fs::read_to_string(workspace_root().join("Dockerfile.service")).expect("Dockerfile");
    let stages: Vec<&str> = dockerfile.split("\nFROM ").collect();
    let inference_stage = stages
        .iter()
        .find(|stage| stage.starts_with("runtime AS runtime-inference"))
        .expect("an inference runtime stage");
    assert!(
        inference_stage
            .lines()
            .any(|line| line == format!("ENV GLIBC_TUNABLES={expected}")),
        "{inference_stage}"
    );
    for stage in &stages {
        if stage.starts_with("runtime AS runtime-") && !stage.contains("runtime-inference") {
            assert!(!stage.contains("GLIBC_TUNABLES"), "{stage}");
        }
    }
    assert_eq!(
        stages.last().map(|stage| stage.lines().next()),
        Some(Some("runtime-${SERVICE}")),
        "the image is its service's runtime stage"
    );

    // Empty: nothing rendered.
    std::fs::write(&values, "inference:\n  mallocTunables: \"\"\n").expect("values");
    for (workload, container) in rendered_containers(&render_chart(RELEASE, NAMESPACE, &values)) {
        assert_eq!(env_entries(container, "GLIBC_TUNABLES"), [], "{workload}");
    }
}
