//! Disaster recovery end to end (issue 17), with the real binaries on real PostgreSQL: the
//! `medai backup` of a running mesh under a stream of predictions, the loss of the database
//! server, `medai restore` into a fresh PostgreSQL server, and a mesh started on the restored
//! databases. A backup older than the newest signed checkpoint is refused by the restore's
//! verification against the checkpoint log, naming the missing seqs. Prints the measured
//! figures (backup time, RPO window, RTO) that compliance/recovery-playbook.md quotes.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use medai_cli::launcher::{MeshSettings, RunningMesh};
use medai_e2e::authorised;
use medai_proto::common::v1::ImageFormat;
use medai_proto::gateway::v1 as gw;
use medai_testkit::{Assets, PrivatePostgres, binaries_dir, fresh_postgres_database};
use sea_orm::{ConnectionTrait, Database};

const ADMIN_PASSWORD: &str = "an admin password for the recovery test";

/// One acknowledged prediction: when the answer came and the ledger seq it names.
#[derive(Clone, Debug)]
struct Acknowledged {
    at: Instant,
    ledger_seq: u64,
    result_id: String,
}

fn infer_request(image: Vec<u8>) -> gw::InferRequest {
    gw::InferRequest {
        image,
        format: ImageFormat::Unspecified.into(),
        model_name: String::new(),
        model_version: String::new(),
        idempotency_key: String::new(),
    }
}

async fn gateway(mesh: &RunningMesh, settings: &MeshSettings) -> medai_cli::client::GatewayClient {
    medai_cli::client::connect_gateway(
        &format!("https://{}", mesh.address("gateway").expect("gateway")),
        &settings.pki().ca_certificate(),
    )
    .await
    .expect("gateway client")
}

async fn login(
    client: &mut medai_cli::client::GatewayClient,
    username: &str,
    password: &str,
) -> String {
    client
        .login(gw::LoginRequest {
            username: username.to_owned(),
            password: password.to_owned(),
        })
        .await
        .expect("login")
        .into_inner()
        .grant
        .expect("tokens")
        .access_token
}

/// Predictions one after another until `stop`; every acknowledged one is returned.
async fn prediction_stream(
    mut client: medai_cli::client::GatewayClient,
    token: String,
    stop: Arc<AtomicBool>,
) -> Vec<Acknowledged> {
    let image = Assets::locate().dicom("MR_small.dcm");
    let mut acknowledged = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        if let Ok(response) = client
            .infer(authorised(infer_request(image.clone()), &token))
            .await
        {
            let response = response.into_inner();
            acknowledged.push(Acknowledged {
                at: Instant::now(),
                ledger_seq: response.ledger_seq,
                result_id: response.result_id,
            });
        }
    }
    acknowledged
}

/// Runs the real `medai` binary; returns (success, stdout, stderr).
async fn medai(arguments: &[String]) -> (bool, String, String) {
    let output = tokio::process::Command::new(binaries_dir().join("medai"))
        .args(arguments)
        .output()
        .await
        .expect("run medai");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn pg_bin() -> String {
    std::env::var("MEDAI_TEST_PG_BIN")
        .expect("MEDAI_TEST_PG_BIN is not set: run the suite with scripts/test.sh")
}

fn url_arguments(ledger: &str, identities: &str, results: &str) -> Vec<String> {
    [
        "--ledger-url",
        ledger,
        "--identities-url",
        identities,
        "--results-url",
        results,
        "--pg-bin",
        &pg_bin(),
    ]
    .iter()
    .map(|text| (*text).to_owned())
    .collect()
}

async fn backup(settings: &MeshSettings, out: &Path) -> (serde_json::Value, Duration) {
    let started = Instant::now();
    let mut arguments = vec![
        "backup".to_owned(),
        "--out".to_owned(),
        out.display().to_string(),
    ];
    arguments.extend(url_arguments(
        &settings.audit_database_url,
        &settings.auth_database_url,
        &settings.inference_database_url,
    ));
    let (ok, stdout, stderr) = medai(&arguments).await;
    let took = started.elapsed();
    assert!(ok, "medai backup failed:\n{stdout}\n{stderr}");
    eprintln!("{stdout}");
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("manifest.json")).expect("manifest"))
            .expect("manifest JSON");
    (manifest, took)
}

/// Three empty databases on `server`, as an operator makes them with `createdb`.
async fn empty_databases(server: &PrivatePostgres, suffix: &str) -> [String; 3] {
    let admin = Database::connect(server.url().as_str())
        .await
        .expect("connect to the fresh server");
    let base = server.url();
    let (base, _) = base.rsplit_once('/').expect("a URL with a database");
    let mut urls = Vec::new();
    for name in ["ledger", "identities", "results"] {
        admin
            .execute_unprepared(&format!("CREATE DATABASE {name}_{suffix}"))
            .await
            .expect("create database");
        urls.push(format!("{base}/{name}_{suffix}"));
    }
    admin.close().await.expect("close");
    urls.try_into().expect("three")
}

async fn restore(
    from: &Path,
    [ledger, identities, results]: &[String; 3],
    state_dir: &Path,
) -> (bool, String, String) {
    let mut arguments = vec![
        "restore".to_owned(),
        "--from".to_owned(),
        from.display().to_string(),
    ];
    arguments.extend(url_arguments(ledger, identities, results));
    arguments.extend([
        "--checkpoint-log".to_owned(),
        state_dir
            .join("audit-checkpoint.checkpoints.jsonl")
            .display()
            .to_string(),
        "--public-key".to_owned(),
        state_dir.join("audit-checkpoint.pub").display().to_string(),
    ]);
    medai(&arguments).await
}

fn manifest_head(manifest: &serde_json::Value) -> u64 {
    manifest["ledger"]["head_seq"].as_u64().expect("head_seq")
}

#[tokio::test]
async fn a_backup_of_the_running_mesh_restores_into_a_fresh_server_with_nothing_acknowledged_lost()
{
    let state = tempfile::tempdir().expect("state dir");
    let backups = tempfile::tempdir().expect("backups");
    let assets = Assets::locate();
    let mut settings = MeshSettings::embedded(
        state.path(),
        &binaries_dir(),
        &assets.model_repository,
        &assets.onnxruntime_library,
    );
    settings.audit_database_url = fresh_postgres_database().await;
    settings.auth_database_url = fresh_postgres_database().await;
    settings.inference_database_url = fresh_postgres_database().await;
    settings.admin_password = ADMIN_PASSWORD.to_owned();
    // Checkpoints only when asked, so the test knows which ones the log holds.
    settings.extra_environment.insert(
        "audit".to_owned(),
        vec![(
            "MEDAI_AUDIT_CHECKPOINT_INTERVAL_SECONDS".to_owned(),
            "0".to_owned(),
        )],
    );
    let mesh = RunningMesh::start(&settings)
        .await
        .expect("the mesh starts");
    let mut client = gateway(&mesh, &settings).await;
    let admin = login(&mut client, "admin", ADMIN_PASSWORD).await;
    client
        .create_user(authorised(
            gw::CreateUserRequest {
                username: "audrey".to_owned(),
                password: "audrey password 123".to_owned(),
                role: "auditor".to_owned(),
            },
            &admin,
        ))
        .await
        .expect("create auditor");
    let auditor = login(&mut client, "audrey", "audrey password 123").await;

    // A steady stream of predictions for the whole time the system is backed up.
    let stop = Arc::new(AtomicBool::new(false));
    let stream = tokio::spawn(prediction_stream(
        gateway(&mesh, &settings).await,
        admin.clone(),
        stop.clone(),
    ));
    let image = assets.dicom("MR_small.dcm");
    client
        .infer(authorised(infer_request(image.clone()), &admin))
        .await
        .expect("a prediction before the first backup");

    // Backup 1 under load; then more predictions and a signed checkpoint past it.
    let older = backups.path().join("older");
    let (older_manifest, _) = backup(&settings, &older).await;
    client
        .infer(authorised(infer_request(image.clone()), &admin))
        .await
        .expect("a prediction after the first backup");
    let checkpoint = client
        .create_ledger_checkpoint(authorised(gw::CreateLedgerCheckpointRequest {}, &auditor))
        .await
        .expect("checkpoint")
        .into_inner()
        .checkpoint
        .expect("checkpoint");
    assert!(checkpoint.tree_size > manifest_head(&older_manifest));

    // Backup 2, still under load.
    let newer = backups.path().join("newer");
    let backup_started = Instant::now();
    let (newer_manifest, backup_took) = backup(&settings, &newer).await;
    stop.store(true, Ordering::Relaxed);
    let acknowledged = stream.await.expect("stream");
    let newer_head = manifest_head(&newer_manifest);
    assert!(newer_head >= checkpoint.tree_size);
    for dumped in newer_manifest["databases"].as_array().expect("databases") {
        let file = newer.join(dumped["file"].as_str().expect("file"));
        assert_eq!(
            std::fs::metadata(&file).expect("dump").len(),
            dumped["bytes"].as_u64().expect("bytes")
        );
        assert_eq!(dumped["sha256"].as_str().expect("sha256").len(), 64);
    }
    // Every prediction acknowledged before the backup began is in it; those acknowledged
    // after its snapshot are the RPO window of a restore from it.
    let before: Vec<&Acknowledged> = acknowledged
        .iter()
        .filter(|ack| ack.at < backup_started)
        .collect();
    assert!(!before.is_empty(), "predictions ran before the backup");
    for ack in &before {
        assert!(
            ack.ledger_seq <= newer_head,
            "prediction at seq {} was acknowledged before the backup but is not in it (head {newer_head})",
            ack.ledger_seq
        );
    }
    let after_snapshot = acknowledged
        .iter()
        .filter(|ack| ack.ledger_seq > newer_head)
        .count();
    let kept_result = before.last().expect("one").result_id.clone();

    // The database server is lost.
    mesh.stop(Duration::from_secs(10)).await;
    let server = PrivatePostgres::start();

    // The older backup restores, but its verification against the checkpoint log refuses it.
    let targets = empty_databases(&server, "old").await;
    let (ok, stdout, stderr) = restore(&older, &targets, state.path()).await;
    assert!(
        !ok,
        "a restore behind a signed checkpoint must fail:\n{stdout}"
    );
    assert!(stderr.contains("LEDGER_BEHIND_CHECKPOINT"), "{stderr}");
    let missing = format!(
        "entries {}..={} are missing",
        manifest_head(&older_manifest) + 1,
        checkpoint.tree_size
    );
    assert!(stderr.contains(&missing), "{stderr}");

    // The newer backup restores and verifies; a mesh on it answers predictions.
    let targets = empty_databases(&server, "new").await;
    let restore_started = Instant::now();
    let (ok, stdout, stderr) = restore(&newer, &targets, state.path()).await;
    assert!(ok, "restore failed:\n{stdout}\n{stderr}");
    assert!(
        stdout.contains("passes through the newest signed checkpoint"),
        "{stdout}"
    );
    let restore_took = restore_started.elapsed();
    let mut restored = settings.clone();
    restored.audit_database_url = targets[0].clone();
    restored.auth_database_url = targets[1].clone();
    restored.inference_database_url = targets[2].clone();
    let mesh = RunningMesh::start(&restored)
        .await
        .expect("the mesh starts on the restored databases");
    let mut client = gateway(&mesh, &restored).await;
    let admin = login(&mut client, "admin", ADMIN_PASSWORD).await;
    let answer = client
        .infer(authorised(infer_request(image), &admin))
        .await
        .expect("a prediction on the restored system")
        .into_inner();
    let recovered = restore_started.elapsed();
    assert!(answer.ledger_seq > newer_head);
    // The auditor (an identity) and a result (from the results database) came back too.
    let auditor = login(&mut client, "audrey", "audrey password 123").await;
    let result = client
        .get_result(authorised(
            gw::GetResultRequest {
                result_id: kept_result.clone(),
            },
            &admin,
        ))
        .await
        .expect("a result acknowledged before the backup")
        .into_inner();
    assert!(result.result.is_some());
    let verification = client
        .verify_ledger(authorised(gw::VerifyLedgerRequest {}, &auditor))
        .await
        .expect("verify")
        .into_inner()
        .verification
        .expect("report");
    assert!(verification.intact, "{verification:?}");
    assert!(verification.checkpoints_verified >= 1);
    mesh.stop(Duration::from_secs(10)).await;

    eprintln!(
        "RECOVERY FIGURES: backup of 3 databases under load {:.2} s (ledger head seq {newer_head}); \
         {} predictions acknowledged during the run, {after_snapshot} after the backup's snapshot \
         (RPO = the time since the last backup); restore {:.2} s; RTO (restore start to first \
         prediction on the restored mesh) {:.2} s",
        backup_took.as_secs_f64(),
        acknowledged.len(),
        restore_took.as_secs_f64(),
        recovered.as_secs_f64()
    );
}
