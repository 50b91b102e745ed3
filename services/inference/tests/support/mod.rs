//! What the inference service tests share: a real audit service on PostgreSQL for the ledger,
//! the inference service on port 0 with real mTLS, and model repositories in temp folders.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use medai_audit::AuditConfig;
use medai_inference::InferenceConfig;
use medai_inference::config::RuntimeSettings;
use medai_proto::common::v1::CanonicalImage;
use medai_proto::inference::v1::PredictRequest;
use medai_proto::inference::v1::inference_service_client::InferenceServiceClient;
use medai_proto::kserve::grpc_inference_service_client::GrpcInferenceServiceClient;
use medai_testkit::{
    Assets, TestPki, TestServer, fresh_postgres_database, test_process_config, wait_until_serving,
};
use sea_orm::{ConnectionTrait, Database, DatabaseBackend, Statement};
use tonic::transport::Channel;

pub const LIGHT: &str = "synthetic-light";

pub struct Harness {
    pub pki: TestPki,
    pub audit: Option<TestServer>,
    pub audit_database: String,
    pub inference: TestServer,
    pub config: InferenceConfig,
}

pub fn inference_config(
    pki: &TestPki,
    model_repository: &Path,
    database_url: String,
    audit_endpoint: String,
    runtime: RuntimeSettings,
) -> InferenceConfig {
    let assets = Assets::locate();
    InferenceConfig {
        process: test_process_config(),
        tls: pki.files("inference"),
        model_repository: model_repository.to_owned(),
        onnxruntime_library: assets.onnxruntime_library,
        database_url,
        audit_endpoint,
        runtime,
        lifecycle: Default::default(),
    }
}

impl Harness {
    /// Audit on a fresh PostgreSQL database, then inference on `repository` with its results
    /// in another fresh database.
    pub async fn start(repository: &Path, runtime: RuntimeSettings) -> Self {
        Self::start_with_results(repository, runtime, fresh_postgres_database().await).await
    }

    /// As [`Self::start`], with the results store at `results_url` (SQLite, for one).
    pub async fn start_with_results(
        repository: &Path,
        runtime: RuntimeSettings,
        results_url: String,
    ) -> Self {
        let pki = TestPki::new();
        let audit_database = fresh_postgres_database().await;
        let audit_config = AuditConfig {
            process: test_process_config(),
            tls: pki.files("audit"),
            database_url: audit_database.clone(),
            checkpoint_key_file: medai_testkit::scratch_file("audit-checkpoint.key"),
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
        let config = inference_config(
            &pki,
            repository,
            results_url,
            format!("https://{}", audit.address),
            runtime,
        );
        let inference = Self::start_inference(&pki, config.clone()).await;
        Self {
            pki,
            audit: Some(audit),
            audit_database,
            inference,
            config,
        }
    }

    pub async fn start_inference(pki: &TestPki, config: InferenceConfig) -> TestServer {
        let server = TestServer::start(|listener, shutdown| {
            medai_inference::serve(config, listener, shutdown)
        })
        .await;
        wait_until_serving(pki, server.address, "inference").await;
        server
    }

    /// Stops the inference service and starts it again on the same repository and databases.
    pub async fn restart_inference(&mut self) {
        let fresh = Self::start_inference(&self.pki, self.config.clone()).await;
        let old = std::mem::replace(&mut self.inference, fresh);
        old.stop().await;
    }

    pub fn channel_as(&self, identity: &str) -> Channel {
        self.pki
            .channel_as(identity, self.inference.address, "inference")
    }

    pub fn client_as(&self, identity: &str) -> InferenceServiceClient<Channel> {
        InferenceServiceClient::new(self.channel_as(identity))
    }

    pub fn kserve_as(&self, identity: &str) -> GrpcInferenceServiceClient<Channel> {
        GrpcInferenceServiceClient::new(self.channel_as(identity))
    }

    /// (actor, action, resource, outcome) of every ledger entry, in order.
    pub async fn ledger(&self) -> Vec<(String, String, String, String)> {
        self.ledger_rows("SELECT actor, action, resource, outcome FROM ledger_entries ORDER BY seq")
            .await
            .into_iter()
            .map(|row| {
                (
                    row.try_get("", "actor").expect("actor"),
                    row.try_get("", "action").expect("action"),
                    row.try_get("", "resource").expect("resource"),
                    row.try_get("", "outcome").expect("outcome"),
                )
            })
            .collect()
    }

    /// The JSON context of every ledger entry, in order.
    pub async fn ledger_contexts(&self) -> Vec<serde_json::Value> {
        self.ledger_rows("SELECT context FROM ledger_entries ORDER BY seq")
            .await
            .into_iter()
            .map(|row| {
                let context: String = row.try_get("", "context").expect("context");
                serde_json::from_str(&context).expect("a JSON context")
            })
            .collect()
    }

    async fn ledger_rows(&self, query: &str) -> Vec<sea_orm::QueryResult> {
        Database::connect(self.audit_database.as_str())
            .await
            .expect("connect to the ledger database")
            .query_all_raw(Statement::from_string(DatabaseBackend::Postgres, query))
            .await
            .expect("query the ledger")
    }
}

/// A repository in a temp folder holding the light model as the given versions, each with the
/// given status (`active`, `staged`, `retired`).
pub fn light_repository(versions: &[(&str, &str)]) -> tempfile::TempDir {
    let repository = tempfile::tempdir().expect("tempdir");
    for (version, status) in versions {
        add_light_version(repository.path(), version, status);
    }
    repository
}

/// Copies the light model into `<root>/synthetic-light/<version>` with `status`.
pub fn add_light_version(root: &Path, version: &str, status: &str) -> PathBuf {
    let source = Assets::locate().model_repository.join("synthetic-light/1");
    let folder = root.join(LIGHT).join(version);
    std::fs::create_dir_all(&folder).expect("version folder");
    std::fs::copy(source.join("model.onnx"), folder.join("model.onnx")).expect("model");
    let manifest = std::fs::read_to_string(source.join("manifest.toml"))
        .expect("manifest")
        .replace("version = \"1\"", &format!("version = \"{version}\""))
        .replace("status = \"active\"", &format!("status = \"{status}\""));
    std::fs::write(folder.join("manifest.toml"), manifest).expect("write manifest");
    folder
}

pub fn manifest_status(root: &Path, version: &str) -> String {
    let text = std::fs::read_to_string(root.join(LIGHT).join(version).join("manifest.toml"))
        .expect("manifest");
    text.lines()
        .find_map(|line| line.strip_prefix("status = "))
        .map(|value| value.trim_matches('"').to_owned())
        .expect("status line")
}

/// A grey test pattern.
pub fn grey_image(side: u32, seed: u32) -> CanonicalImage {
    CanonicalImage {
        width: side,
        height: side,
        channels: 1,
        bit_depth: 8,
        photometric_interpretation: "MONOCHROME2".to_owned(),
        pixels: (0..side * side)
            .map(|index| ((index * 7 + seed * 31) % 256) as u8)
            .collect(),
        metadata: None,
        resized_for_model_input: false,
    }
}

pub fn predict(model: &str, image: CanonicalImage) -> PredictRequest {
    PredictRequest {
        model_name: model.to_owned(),
        model_version: String::new(),
        image: Some(image),
        result_id: String::new(),
        image_sha256: String::new(),
        patient_key: String::new(),
        idempotency_key: String::new(),
        quality_findings: Vec::new(),
    }
}

/// A repository in a temp folder holding only the brain-MRI model (its file linked, not copied).
pub fn brain_repository() -> tempfile::TempDir {
    let source = Assets::locate().model_repository.join("brain-mri-tumor/1");
    let repository = tempfile::tempdir().expect("tempdir");
    let folder = repository.path().join("brain-mri-tumor/1");
    std::fs::create_dir_all(&folder).expect("version folder");
    std::fs::copy(source.join("manifest.toml"), folder.join("manifest.toml")).expect("manifest");
    let model = std::fs::canonicalize(source.join("model.onnx")).expect("model");
    std::os::unix::fs::symlink(model, folder.join("model.onnx")).expect("link the model");
    repository
}
