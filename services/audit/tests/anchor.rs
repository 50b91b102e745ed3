//! Ledger head anchoring against a real PostgreSQL: with the append-only triggers switched off
//! by a superuser, a truncated ledger or a deleted last entry makes the service refuse to
//! append (it never restarts the chain from genesis or reuses a seq), at once and after a
//! restart; checkpoint requests are recorded before they are answered.

use std::sync::OnceLock;

use medai_audit::AuditConfig;
use medai_proto::audit::v1 as pb;
use medai_proto::audit::v1::audit_service_client::AuditServiceClient;
use medai_runtime::errors::reason_of;
use medai_testkit::{
    TestPki, TestServer, fresh_postgres_database, scratch_file, test_process_config,
    wait_until_serving,
};
use sea_orm::{ConnectionTrait, Database, DatabaseBackend, DatabaseConnection, Statement};
use tonic::Code;

/// The process-wide Prometheus recorder, installed once for this test binary.
fn metrics() -> &'static metrics_exporter_prometheus::PrometheusHandle {
    static HANDLE: OnceLock<metrics_exporter_prometheus::PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| medai_runtime::admin::install_prometheus_recorder().expect("recorder"))
}

struct Audit {
    pki: TestPki,
    server: Option<TestServer>,
    database_url: String,
    key_file: std::path::PathBuf,
    client: AuditServiceClient<tonic::transport::Channel>,
    superuser: DatabaseConnection,
}

async fn serve(pki: &TestPki, database_url: &str, key_file: &std::path::Path) -> TestServer {
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
    let server =
        TestServer::start(|listener, shutdown| medai_audit::serve(config, listener, shutdown))
            .await;
    wait_until_serving(pki, server.address, "audit").await;
    server
}

impl Audit {
    async fn start() -> Self {
        metrics();
        let pki = TestPki::new();
        let database_url = fresh_postgres_database().await;
        let key_file = scratch_file("checkpoint.key");
        let server = serve(&pki, &database_url, &key_file).await;
        let client = AuditServiceClient::new(pki.channel_as("gateway", server.address, "audit"));
        let superuser = Database::connect(database_url.as_str())
            .await
            .expect("superuser connection");
        Self {
            pki,
            server: Some(server),
            database_url,
            key_file,
            client,
            superuser,
        }
    }

    /// Stops the service and starts a new one on the same database and key.
    async fn restart(&mut self) {
        if let Some(server) = self.server.take() {
            server.stop().await;
        }
        let server = serve(&self.pki, &self.database_url, &self.key_file).await;
        self.client =
            AuditServiceClient::new(self.pki.channel_as("gateway", server.address, "audit"));
        self.server = Some(server);
    }

    async fn append(&mut self, index: usize) -> Result<pb::AppendResponse, tonic::Status> {
        let request = pb::AppendRequest {
            actor: "user:a".to_owned(),
            action: "INFERENCE".to_owned(),
            resource: format!("result/{index}"),
            outcome: "SUCCESS".to_owned(),
            context_json: String::new(),
        };
        self.client
            .append(request)
            .await
            .map(tonic::Response::into_inner)
    }

    async fn append_many(&mut self, count: usize) -> pb::AppendResponse {
        let mut last = None;
        for index in 0..count {
            last = Some(self.append(index).await.expect("append"));
        }
        last.expect("at least one")
    }

    /// What a superuser can do: switch the replication role so no user trigger fires.
    async fn as_superuser(&self, statement: &str) {
        self.superuser
            .execute_unprepared(&format!(
                "SET session_replication_role = replica; {statement}; SET session_replication_role = DEFAULT;"
            ))
            .await
            .expect("superuser statement");
    }

    async fn stored_seqs(&self) -> Vec<i64> {
        self.superuser
            .query_all_raw(Statement::from_string(
                DatabaseBackend::Postgres,
                "SELECT seq FROM ledger_entries ORDER BY seq",
            ))
            .await
            .expect("seqs")
            .iter()
            .map(|row| row.try_get::<i64>("", "seq").expect("seq"))
            .collect()
    }

    async fn checkpoint_count(&self) -> i64 {
        self.superuser
            .query_one_raw(Statement::from_string(
                DatabaseBackend::Postgres,
                "SELECT count(*) AS n FROM ledger_checkpoints",
            ))
            .await
            .expect("count")
            .expect("row")
            .try_get("", "n")
            .expect("n")
    }
}

fn assert_anchor_refusal(outcome: Result<pb::AppendResponse, tonic::Status>) {
    let status = outcome.expect_err("the append must be refused");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert_eq!(
        reason_of(&status).as_deref(),
        Some("LEDGER_ANCHOR_VIOLATION"),
        "{status:?}"
    );
}

fn violations_counted() -> bool {
    metrics().render().lines().any(|line| {
        line.starts_with("medai_audit_chain_anchor_violation_total")
            && line
                .rsplit(' ')
                .next()
                .and_then(|value| value.parse::<f64>().ok())
                .is_some_and(|value| value > 0.0)
    })
}

#[tokio::test]
async fn a_truncated_ledger_is_not_restarted_from_genesis() {
    let mut audit = Audit::start().await;
    audit.append_many(5).await;
    audit.as_superuser("TRUNCATE ledger_entries").await;

    assert_anchor_refusal(audit.append(6).await);
    assert_anchor_refusal(audit.append(7).await);
    assert!(
        audit.stored_seqs().await.is_empty(),
        "no new chain was started from genesis"
    );
    assert!(violations_counted(), "{}", metrics().render());
    assert!(
        metrics()
            .render()
            .contains("medai_audit_chain_anchor_violated 1"),
        "{}",
        metrics().render()
    );

    // Nothing is signed over the rebuilt chain either: the request cannot be recorded first.
    let status = audit
        .client
        .create_checkpoint(pb::CreateCheckpointRequest {})
        .await
        .expect_err("no checkpoint over a truncated ledger");
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(audit.checkpoint_count().await, 0);
    // Verification still answers, for whoever investigates.
    let report = audit
        .client
        .verify(pb::VerifyRequest {})
        .await
        .expect("verify")
        .into_inner();
    assert_eq!(report.entries_checked, 0);
}

#[tokio::test]
async fn a_deleted_last_entry_does_not_have_its_seq_reused() {
    let mut audit = Audit::start().await;
    let last = audit.append_many(5).await;
    assert_eq!(last.seq, 5);
    audit
        .as_superuser("DELETE FROM ledger_entries WHERE seq = 5")
        .await;

    assert_anchor_refusal(audit.append(6).await);
    assert_eq!(
        audit.stored_seqs().await,
        vec![1, 2, 3, 4],
        "seq 5 was not given to another event"
    );
}

#[tokio::test]
async fn a_restart_checks_the_stored_head_against_the_newest_checkpoint() {
    let mut audit = Audit::start().await;
    audit.append_many(5).await;
    let checkpoint = audit
        .client
        .create_checkpoint(pb::CreateCheckpointRequest {})
        .await
        .expect("checkpoint")
        .into_inner()
        .checkpoint
        .expect("checkpoint");
    assert_eq!(checkpoint.tree_size, 6);

    // An intact ledger restarts and takes appends.
    audit.restart().await;
    assert_eq!(audit.append(7).await.expect("append after restart").seq, 7);

    // A ledger cut below the newest checkpoint while the service was down: the new process
    // has no head of its own in memory, but the checkpoint is enough.
    if let Some(server) = audit.server.take() {
        server.stop().await;
    }
    audit
        .as_superuser("DELETE FROM ledger_entries WHERE seq >= 4")
        .await;
    audit.restart().await;
    // Shorter than a signed checkpoint: the refusal names the entries it lacks.
    let status = audit
        .append(8)
        .await
        .expect_err("the append must be refused");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert_eq!(
        reason_of(&status).as_deref(),
        Some("LEDGER_BEHIND_CHECKPOINT"),
        "{status:?}"
    );
    assert!(status.message().contains("4..=6"), "{status:?}");
    assert_eq!(audit.stored_seqs().await, vec![1, 2, 3]);
}

#[tokio::test]
async fn a_consistently_rebuilt_ledger_is_refused_when_its_head_hash_differs() {
    let mut audit = Audit::start().await;
    let last = audit.append_many(3).await;
    // The same length, but the head's stored hash is not the one committed.
    audit
        .as_superuser(&format!(
            "UPDATE ledger_entries SET hash = '{}' WHERE seq = {}",
            "ab".repeat(32),
            last.seq
        ))
        .await;
    assert_anchor_refusal(audit.append(4).await);
}

#[tokio::test]
async fn deleting_a_checkpoint_row_is_refused_naming_the_checkpoints_table() {
    let mut audit = Audit::start().await;
    audit.append_many(2).await;
    audit
        .client
        .create_checkpoint(pb::CreateCheckpointRequest {})
        .await
        .expect("checkpoint");
    let error = audit
        .superuser
        .execute_unprepared("DELETE FROM ledger_checkpoints")
        .await
        .expect_err("refused by the trigger");
    assert!(
        error
            .to_string()
            .contains("ledger_checkpoints is append-only: DELETE refused"),
        "{error}"
    );
    let error = audit
        .superuser
        .execute_unprepared("DELETE FROM ledger_entries")
        .await
        .expect_err("refused by the trigger");
    assert!(
        error
            .to_string()
            .contains("ledger_entries is append-only: DELETE refused"),
        "{error}"
    );
}

#[tokio::test]
async fn a_checkpoint_request_is_recorded_before_it_is_answered() {
    let mut audit = Audit::start().await;
    audit.append_many(3).await;
    let checkpoint = audit
        .client
        .create_checkpoint(pb::CreateCheckpointRequest {})
        .await
        .expect("checkpoint")
        .into_inner()
        .checkpoint
        .expect("checkpoint");
    let recorded = audit
        .client
        .query_events(pb::QueryEventsRequest {
            action: "LEDGER_CHECKPOINT".to_owned(),
            ..Default::default()
        })
        .await
        .expect("query")
        .into_inner()
        .entries;
    assert_eq!(recorded.len(), 1, "{recorded:?}");
    let record = &recorded[0];
    assert_eq!(
        (record.seq, record.actor.as_str(), record.resource.as_str()),
        (4, "service:gateway", "ledger"),
        "the peer's certificate identity, not a request field"
    );
    assert!(
        record.seq <= checkpoint.tree_size,
        "the checkpoint covers the record of its own request"
    );
}
