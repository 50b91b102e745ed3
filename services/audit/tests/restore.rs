//! Restore with proof, against a real PostgreSQL and the real `pg_dump` / `pg_restore`: the
//! signed checkpoints are also kept in a log beside the key, outside the database. A database
//! restored from a backup older than the newest checkpoint is refused for appends with
//! `LEDGER_BEHIND_CHECKPOINT`, naming the missing seq range, with a metric and health
//! NOT_SERVING; the newer backup restores and takes appends again.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use medai_audit::AuditConfig;
use medai_proto::audit::v1 as pb;
use medai_proto::audit::v1::audit_service_client::AuditServiceClient;
use medai_runtime::errors::reason_of;
use medai_runtime::health::Readiness;
use medai_testkit::{
    TestPki, TestServer, fresh_postgres_database, scratch_file, test_process_config,
    wait_until_serving,
};
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

fn metrics() -> &'static metrics_exporter_prometheus::PrometheusHandle {
    static HANDLE: OnceLock<metrics_exporter_prometheus::PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| medai_runtime::admin::install_prometheus_recorder().expect("recorder"))
}

struct Running {
    server: TestServer,
    client: AuditServiceClient<tonic::transport::Channel>,
    readiness: Readiness,
}

/// What audit answers on the standard health check once it answers at all.
async fn health_once_answering(pki: &TestPki, address: std::net::SocketAddr) -> ServingStatus {
    let mut health = HealthClient::new(pki.channel_as("operator", address, "audit"));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        if let Ok(answer) = health
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
        {
            return answer.into_inner().status();
        }
        assert!(std::time::Instant::now() < deadline, "audit never answered");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Starts audit; waits until SERVING, or (`serving` false) until it answers NOT_SERVING.
async fn start_audit(pki: &TestPki, database_url: &str, key_file: &Path, serving: bool) -> Running {
    let config = AuditConfig {
        process: test_process_config(),
        tls: pki.files("audit"),
        database_url: database_url.to_owned(),
        migration_database_url: None,
        checkpoint_key_file: key_file.to_path_buf(),
        checkpoint_key_mode: medai_audit::config::CheckpointKeyMode::Generate,
        checkpoint_log_file: None,
        checkpoint_interval_seconds: 0,
    };
    // The readiness the process would report on its health check.
    let readiness = Readiness::new();
    let scoped = readiness.clone();
    let server = TestServer::start(move |listener, shutdown| {
        scoped.scope(medai_audit::serve(config, listener, shutdown))
    })
    .await;
    if serving {
        wait_until_serving(pki, server.address, "audit").await;
    } else {
        assert_eq!(
            health_once_answering(pki, server.address).await,
            ServingStatus::NotServing
        );
    }
    let client = AuditServiceClient::new(pki.channel_as("gateway", server.address, "audit"));
    Running {
        server,
        client,
        readiness,
    }
}

async fn append(
    client: &mut AuditServiceClient<tonic::transport::Channel>,
    index: usize,
) -> Result<pb::AppendResponse, tonic::Status> {
    client
        .append(pb::AppendRequest {
            actor: "service:inference".to_owned(),
            action: "INFERENCE".to_owned(),
            resource: format!("result/{index}"),
            outcome: "SUCCESS".to_owned(),
            context_json: String::new(),
        })
        .await
        .map(tonic::Response::into_inner)
}

async fn checkpoint(client: &mut AuditServiceClient<tonic::transport::Channel>) -> u64 {
    client
        .create_checkpoint(pb::CreateCheckpointRequest {})
        .await
        .expect("checkpoint")
        .into_inner()
        .checkpoint
        .expect("checkpoint")
        .tree_size
}

/// The PostgreSQL client tools of the suite's server (`MEDAI_TEST_PG_BIN`), else from PATH.
fn pg_tool(name: &str) -> PathBuf {
    std::env::var("MEDAI_TEST_PG_BIN")
        .map(|bin| Path::new(&bin).join(name))
        .unwrap_or_else(|_| PathBuf::from(name))
}

fn run(program: PathBuf, arguments: &[&str]) {
    let output = std::process::Command::new(&program)
        .args(arguments)
        .output()
        .expect("run a PostgreSQL tool");
    assert!(
        output.status.success(),
        "{} failed: {}",
        program.display(),
        String::from_utf8_lossy(&output.stderr)
    );
}

fn dump(database_url: &str, file: &Path) {
    run(
        pg_tool("pg_dump"),
        &[
            "--format=custom",
            "--serializable-deferrable",
            "--file",
            &file.display().to_string(),
            database_url,
        ],
    );
}

/// Restores `file` into a new, empty database and returns its URL.
async fn restore_into_fresh_database(file: &Path) -> String {
    let database_url = fresh_postgres_database().await;
    run(
        pg_tool("pg_restore"),
        &[
            "--exit-on-error",
            "--dbname",
            &database_url,
            &file.display().to_string(),
        ],
    );
    database_url
}

#[tokio::test]
async fn a_restore_older_than_a_signed_checkpoint_is_refused_naming_the_missing_range() {
    metrics();
    let pki = TestPki::new();
    let key_file = scratch_file("audit-checkpoint.key");
    let backups = tempfile::tempdir().expect("tempdir");
    let older = backups.path().join("older.dump");
    let newer = backups.path().join("newer.dump");

    // Five entries, a checkpoint over them (and its own request record): seq 6.
    let database_url = fresh_postgres_database().await;
    let mut audit = start_audit(&pki, &database_url, &key_file, true).await;
    for index in 0..5 {
        append(&mut audit.client, index).await.expect("append");
    }
    assert_eq!(checkpoint(&mut audit.client).await, 6);
    dump(&database_url, &older);
    // More acknowledged entries and a newer checkpoint, seq 11, after that backup.
    for index in 5..9 {
        append(&mut audit.client, index).await.expect("append");
    }
    assert_eq!(checkpoint(&mut audit.client).await, 11);
    dump(&database_url, &newer);
    audit.server.stop().await;

    let log = medai_audit::checkpoint_log::path_beside_key(&key_file);
    let logged = std::fs::read_to_string(&log).expect("the checkpoint log beside the key");
    assert_eq!(logged.lines().count(), 2, "{logged}");

    // The older backup in a fresh database: its own checkpoints (seq 6) are all it knows, but
    // the log outside it holds the checkpoint at seq 11.
    let restored_old = restore_into_fresh_database(&older).await;
    // It starts (reads and verification work) but reports NOT_SERVING on its health check.
    let mut audit = start_audit(&pki, &restored_old, &key_file, false).await;
    let status = append(&mut audit.client, 100)
        .await
        .expect_err("no append onto a chain behind a signed checkpoint");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert_eq!(
        reason_of(&status).as_deref(),
        Some("LEDGER_BEHIND_CHECKPOINT"),
        "{status:?}"
    );
    assert!(status.message().contains("7..=11"), "{status:?}");
    let exposition = metrics().render();
    assert!(
        exposition.contains("medai_audit_ledger_missing_entries 5"),
        "{exposition}"
    );
    assert!(
        exposition.contains("medai_audit_ledger_behind_checkpoint 1"),
        "{exposition}"
    );
    let readiness = audit.readiness.state();
    assert!(!readiness.is_ready());
    assert!(
        readiness
            .missing
            .contains(medai_audit::anchor::READINESS_DEPENDENCY),
        "{readiness:?}"
    );
    // Nothing was appended: seq 7 was not given to another event.
    let report = audit
        .client
        .verify(pb::VerifyRequest {})
        .await
        .expect("verify still answers")
        .into_inner();
    assert_eq!(report.entries_checked, 6);
    audit.server.stop().await;

    // The newer backup holds every acknowledged entry: it restores and takes appends.
    let restored_new = restore_into_fresh_database(&newer).await;
    let mut audit = start_audit(&pki, &restored_new, &key_file, true).await;
    assert_eq!(
        append(&mut audit.client, 101).await.expect("append").seq,
        12
    );
    assert!(audit.readiness.state().is_ready());
    let report = audit
        .client
        .verify(pb::VerifyRequest {})
        .await
        .expect("verify")
        .into_inner();
    assert!(report.intact, "{report:?}");
    assert_eq!(report.entries_checked, 12);
    audit.server.stop().await;
}
