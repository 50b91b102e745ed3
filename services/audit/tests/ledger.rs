//! The audit service started on port 0 with real mTLS, against SQLite and the suite's
//! PostgreSQL.

use medai_audit::AuditConfig;
use medai_proto::audit::v1::audit_service_client::AuditServiceClient;
use medai_proto::audit::v1::{AppendRequest, VerifyRequest};
use medai_runtime::errors::reason_of;
use medai_testkit::{
    TestPki, TestServer, fresh_postgres_database, sqlite_url, test_process_config,
    wait_until_serving,
};
use sea_orm::{ConnectionTrait, Database};
use tonic::Code;

struct Ledger {
    pki: TestPki,
    server: TestServer,
    database_url: String,
    _directory: tempfile::TempDir,
}

impl Ledger {
    async fn start(database_url: Option<String>) -> Self {
        let directory = tempfile::tempdir().expect("tempdir");
        let database_url =
            database_url.unwrap_or_else(|| sqlite_url(directory.path(), "audit.sqlite"));
        let pki = TestPki::new();
        let config = AuditConfig {
            process: test_process_config(),
            tls: pki.files("audit"),
            database_url: database_url.clone(),
            checkpoint_key_file: medai_testkit::scratch_file("audit-checkpoint.key"),
            checkpoint_key_mode: medai_audit::config::CheckpointKeyMode::Generate,
            checkpoint_log_file: None,
            checkpoint_interval_seconds: 0,
            migration_database_url: None,
        };
        let server =
            TestServer::start(|listener, shutdown| medai_audit::serve(config, listener, shutdown))
                .await;
        wait_until_serving(&pki, server.address, "audit").await;
        Self {
            pki,
            server,
            database_url,
            _directory: directory,
        }
    }

    fn client_as(&self, identity: &str) -> AuditServiceClient<tonic::transport::Channel> {
        AuditServiceClient::new(self.pki.channel_as(identity, self.server.address, "audit"))
    }
}

fn event(action: &str, resource: &str) -> AppendRequest {
    AppendRequest {
        actor: "user:test".to_owned(),
        action: action.to_owned(),
        resource: resource.to_owned(),
        outcome: "SUCCESS".to_owned(),
        context_json: r#"{"b": 2, "a": 1}"#.to_owned(),
    }
}

async fn append_and_verify(ledger: &Ledger) {
    let mut gateway = ledger.client_as("gateway");
    let first = gateway
        .append(event("INFERENCE", "result/1"))
        .await
        .expect("append")
        .into_inner();
    let second = gateway
        .append(event("INFERENCE", "result/2"))
        .await
        .expect("append")
        .into_inner();
    assert_eq!((first.seq, second.seq), (1, 2));
    assert_eq!(first.hash.len(), 64);
    let report = gateway
        .verify(VerifyRequest {})
        .await
        .expect("verify")
        .into_inner();
    assert!(report.intact, "{report:?}");
    assert_eq!(report.entries_checked, 2);
    assert_eq!(report.head_hash, second.hash);
}

#[tokio::test]
async fn appends_chain_and_verify_on_sqlite() {
    let ledger = Ledger::start(None).await;
    append_and_verify(&ledger).await;
}

#[tokio::test]
async fn appends_chain_and_verify_on_postgres() {
    let ledger = Ledger::start(Some(fresh_postgres_database().await)).await;
    append_and_verify(&ledger).await;
}

#[tokio::test]
async fn context_is_stored_in_canonical_form() {
    let ledger = Ledger::start(Some(fresh_postgres_database().await)).await;
    ledger
        .client_as("gateway")
        .append(event("LOGIN", "session"))
        .await
        .expect("append");
    let database = Database::connect(ledger.database_url.as_str())
        .await
        .expect("connect");
    let row = database
        .query_one_raw(sea_orm::Statement::from_string(
            sea_orm::DatabaseBackend::Postgres,
            "SELECT context FROM ledger_entries WHERE seq = 1",
        ))
        .await
        .expect("query")
        .expect("row");
    let context: String = row.try_get("", "context").expect("context");
    assert_eq!(context, r#"{"a":1,"b":2}"#);
}

#[tokio::test]
async fn bad_events_are_refused_with_stable_codes() {
    let ledger = Ledger::start(None).await;
    let mut gateway = ledger.client_as("gateway");
    let mut missing_actor = event("LOGIN", "session");
    missing_actor.actor.clear();
    let status = gateway.append(missing_actor).await.expect_err("refused");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(reason_of(&status).as_deref(), Some("FIELD_MISSING"));

    let mut not_an_object = event("LOGIN", "session");
    not_an_object.context_json = "[1,2]".to_owned();
    let status = gateway.append(not_an_object).await.expect_err("refused");
    assert_eq!(reason_of(&status).as_deref(), Some("CONTEXT_NOT_OBJECT"));

    let mut too_long = event("LOGIN", "session");
    too_long.resource = "r".repeat(1000);
    let status = gateway.append(too_long).await.expect_err("refused");
    assert_eq!(reason_of(&status).as_deref(), Some("FIELD_TOO_LONG"));

    // Nothing refused was recorded.
    let report = gateway
        .verify(VerifyRequest {})
        .await
        .expect("verify")
        .into_inner();
    assert_eq!(report.entries_checked, 0);
}

#[tokio::test]
async fn a_peer_outside_the_policy_is_refused() {
    let ledger = Ledger::start(None).await;
    for identity in ["validation", "stranger", "operator"] {
        let status = ledger
            .client_as(identity)
            .append(event("LOGIN", "session"))
            .await
            .expect_err("refused");
        assert_eq!(status.code(), Code::PermissionDenied, "{identity}");
        assert_eq!(reason_of(&status).as_deref(), Some("PEER_NOT_ALLOWED"));
    }
    let status = ledger
        .client_as("auth")
        .verify(VerifyRequest {})
        .await
        .expect_err("auth may not read");
    assert_eq!(status.code(), Code::PermissionDenied);
    ledger
        .client_as("auth")
        .append(event("LOGIN", "session"))
        .await
        .expect("auth may append");
}

#[tokio::test]
async fn clients_without_a_mesh_certificate_are_refused() {
    let ledger = Ledger::start(None).await;
    let endpoint = format!("https://{}", ledger.server.address);
    // TLS without a client certificate: refused by the handshake itself, with the
    // certificate-required alert (TLS 1.3), not by some later failure.
    let address = ledger.server.address;
    let ca_certificate = ledger.pki.layout.ca_certificate();
    let refusal = tokio::task::spawn_blocking(move || {
        medai_testkit::tls_refusal_without_client_certificate(
            address,
            &ca_certificate,
            "medai-audit",
        )
    })
    .await
    .expect("handshake");
    assert_eq!(
        refusal,
        medai_testkit::rustls::Error::AlertReceived(
            medai_testkit::rustls::AlertDescription::CertificateRequired
        ),
        "the ledger must refuse a client without a certificate in the handshake"
    );
    let ca = std::fs::read(ledger.pki.layout.ca_certificate()).expect("ca");
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(ca))
        .domain_name("medai-audit");
    let channel = tonic::transport::Endpoint::from_shared(endpoint.clone())
        .expect("endpoint")
        .tls_config(tls)
        .expect("tls");
    if let Ok(channel) = channel.connect().await {
        AuditServiceClient::new(channel)
            .append(event("LOGIN", "session"))
            .await
            .expect_err("a client without a certificate must not reach the ledger");
    }

    // A certificate from another CA.
    let foreign = TestPki::new();
    let tls = foreign.material("gateway");
    let foreign_channel = tls
        .channel(&endpoint, &medai_runtime::ServiceIdentity::new("audit"))
        .expect("channel");
    let status = AuditServiceClient::new(foreign_channel)
        .append(event("LOGIN", "session"))
        .await
        .expect_err("refused");
    assert_eq!(
        status.code(),
        Code::Unavailable,
        "the handshake fails: {status:?}"
    );

    let report = ledger
        .client_as("gateway")
        .verify(VerifyRequest {})
        .await
        .expect("verify")
        .into_inner();
    assert_eq!(
        report.entries_checked, 0,
        "nothing was recorded by refused clients"
    );
}

#[tokio::test]
async fn the_database_refuses_update_and_delete() {
    for database_url in [None, Some(fresh_postgres_database().await)] {
        let ledger = Ledger::start(database_url).await;
        ledger
            .client_as("gateway")
            .append(event("LOGIN", "session"))
            .await
            .expect("append");
        let database = Database::connect(ledger.database_url.as_str())
            .await
            .expect("connect");
        let update = database
            .execute_unprepared("UPDATE ledger_entries SET actor = 'mallory' WHERE seq = 1")
            .await;
        assert!(update.is_err(), "UPDATE must be refused");
        let delete = database
            .execute_unprepared("DELETE FROM ledger_entries WHERE seq = 1")
            .await;
        assert!(delete.is_err(), "DELETE must be refused");
        if ledger.database_url.starts_with("postgres") {
            let truncate = database.execute_unprepared("TRUNCATE ledger_entries").await;
            assert!(truncate.is_err(), "TRUNCATE must be refused");
        }
        let report = ledger
            .client_as("gateway")
            .verify(VerifyRequest {})
            .await
            .expect("verify")
            .into_inner();
        assert!(report.intact);
        assert_eq!(report.entries_checked, 1);
    }
}

#[tokio::test]
async fn tampering_by_a_superuser_is_detected_and_the_seq_named() {
    let ledger = Ledger::start(Some(fresh_postgres_database().await)).await;
    let mut gateway = ledger.client_as("gateway");
    for index in 1..=5 {
        gateway
            .append(event("INFERENCE", &format!("result/{index}")))
            .await
            .expect("append");
    }
    let database = Database::connect(ledger.database_url.as_str())
        .await
        .expect("connect");
    database
        .execute_unprepared(
            "ALTER TABLE ledger_entries DISABLE TRIGGER USER; \
             UPDATE ledger_entries SET outcome = 'FAILURE' WHERE seq = 3; \
             ALTER TABLE ledger_entries ENABLE TRIGGER USER;",
        )
        .await
        .expect("superuser bypasses the triggers");
    let report = gateway
        .verify(VerifyRequest {})
        .await
        .expect("verify")
        .into_inner();
    assert!(!report.intact);
    assert_eq!(report.first_bad_seq, 3);
    assert_eq!(report.entries_checked, 2);

    // Put the row back as it was, then delete a middle row: the missing seq is named.
    database
        .execute_unprepared(
            "ALTER TABLE ledger_entries DISABLE TRIGGER USER; \
             UPDATE ledger_entries SET outcome = 'SUCCESS' WHERE seq = 3; \
             DELETE FROM ledger_entries WHERE seq = 4; \
             ALTER TABLE ledger_entries ENABLE TRIGGER USER;",
        )
        .await
        .expect("superuser deletes");
    let report = gateway
        .verify(VerifyRequest {})
        .await
        .expect("verify")
        .into_inner();
    assert!(!report.intact);
    assert_eq!(report.first_bad_seq, 4, "{report:?}");
    assert_eq!(report.entries_checked, 3);
}

#[tokio::test]
async fn concurrent_appends_form_one_gapless_chain() {
    let ledger = Ledger::start(Some(fresh_postgres_database().await)).await;
    let client = ledger.client_as("gateway");
    let appends = (0..200).map(|index| {
        let mut client = client.clone();
        tokio::spawn(async move {
            client
                .append(event("INFERENCE", &format!("result/{index}")))
                .await
                .map(|r| r.into_inner().seq)
        })
    });
    let mut seqs = Vec::new();
    for append in appends {
        seqs.push(append.await.expect("task").expect("append"));
    }
    seqs.sort_unstable();
    assert_eq!(
        seqs,
        (1..=200).collect::<Vec<u64>>(),
        "every append got its own seq, none skipped"
    );
    let report = client
        .clone()
        .verify(VerifyRequest {})
        .await
        .expect("verify")
        .into_inner();
    assert!(report.intact);
    assert_eq!(report.entries_checked, 200);
}
