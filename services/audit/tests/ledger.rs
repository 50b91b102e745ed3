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

// AppendBatch and the batching LedgerClient (issue 14: durable appends at 256 writers).

/// Stored (seq, resource) pairs in seq order.
async fn stored_resources(database_url: &str) -> Vec<(i64, String)> {
    let database = Database::connect(database_url).await.expect("connect");
    database
        .query_all_raw(sea_orm::Statement::from_string(
            sea_orm::DatabaseBackend::Postgres,
            "SELECT seq, resource FROM ledger_entries ORDER BY seq",
        ))
        .await
        .expect("query")
        .iter()
        .map(|row| {
            (
                row.try_get::<i64>("", "seq").expect("seq"),
                row.try_get::<String>("", "resource").expect("resource"),
            )
        })
        .collect()
}

async fn verified(ledger: &Ledger) -> medai_proto::audit::v1::VerifyResponse {
    ledger
        .client_as("gateway")
        .verify(VerifyRequest {})
        .await
        .expect("verify")
        .into_inner()
}

fn batch_of(prefix: &str, count: usize) -> medai_proto::audit::v1::AppendBatchRequest {
    medai_proto::audit::v1::AppendBatchRequest {
        events: (0..count)
            .map(|index| event("INFERENCE", &format!("{prefix}/{index}")))
            .collect(),
    }
}

/// Makes every commit that stores a row whose resource is `resource` fail at COMMIT (a
/// deferred constraint trigger), as a storage failure after the INSERT went through would.
async fn fail_commits_storing(database_url: &str, resource: &str) {
    let database = Database::connect(database_url).await.expect("connect");
    database
        .execute_unprepared(&format!(
            "CREATE FUNCTION fail_commit() RETURNS trigger LANGUAGE plpgsql AS $$ \
             BEGIN RAISE EXCEPTION 'commit refused for the test'; END; $$; \
             CREATE CONSTRAINT TRIGGER fail_commit AFTER INSERT ON ledger_entries \
             DEFERRABLE INITIALLY DEFERRED FOR EACH ROW \
             WHEN (NEW.resource = '{resource}') EXECUTE FUNCTION fail_commit()"
        ))
        .await
        .expect("trigger");
}

fn ledger_client(ledger: &Ledger, identity: &str) -> medai_ledger_client::LedgerClient {
    let channel = ledger
        .pki
        .material(identity)
        .mesh_channel(
            &format!("https://{}", ledger.server.address),
            &medai_runtime::identity::ServiceIdentity::new("audit"),
        )
        .expect("mesh channel");
    medai_ledger_client::LedgerClient::new(channel)
}

#[tokio::test]
async fn a_batch_takes_consecutive_seqs_in_request_order_and_the_chain_verifies() {
    let ledger = Ledger::start(Some(fresh_postgres_database().await)).await;
    let mut gateway = ledger.client_as("gateway");
    gateway
        .append(event("LOGIN", "single/0"))
        .await
        .expect("append");
    let receipts = gateway
        .append_batch(batch_of("first", 5))
        .await
        .expect("batch")
        .into_inner()
        .receipts;
    let seqs: Vec<u64> = receipts.iter().map(|receipt| receipt.seq).collect();
    assert_eq!(seqs, vec![2, 3, 4, 5, 6]);
    assert!(receipts.iter().all(|receipt| receipt.hash.len() == 64));

    // Concurrent batches: each batch's entries stay one consecutive run in its own order.
    let batches = (0..8).map(|number| {
        let mut client = ledger.client_as("inference");
        tokio::spawn(async move {
            let receipts = client
                .append_batch(batch_of(&format!("batch{number}"), 40))
                .await
                .expect("batch")
                .into_inner()
                .receipts;
            (number, receipts)
        })
    });
    let mut all: Vec<u64> = seqs.clone();
    for batch in batches {
        let (number, receipts) = batch.await.expect("task");
        let first = receipts[0].seq;
        let seqs: Vec<u64> = receipts.iter().map(|receipt| receipt.seq).collect();
        assert_eq!(
            seqs,
            (first..first + 40).collect::<Vec<u64>>(),
            "batch {number}"
        );
        all.extend(seqs);
    }
    all.sort_unstable();
    assert_eq!(all, (2..=6 + 8 * 40).collect::<Vec<u64>>());

    let stored = stored_resources(&ledger.database_url).await;
    assert_eq!(stored.len(), 6 + 8 * 40);
    for (index, (seq, resource)) in stored[1..6].iter().enumerate() {
        assert_eq!(
            (*seq, resource.as_str()),
            (index as i64 + 2, format!("first/{index}").as_str())
        );
    }
    let report = verified(&ledger).await;
    assert!(report.intact, "{report:?}");
    assert_eq!(report.entries_checked, 6 + 8 * 40);
}

#[tokio::test]
async fn empty_oversize_and_invalid_batches_are_refused_with_stable_codes_and_record_nothing() {
    let ledger = Ledger::start(Some(fresh_postgres_database().await)).await;
    let mut gateway = ledger.client_as("gateway");
    let refused = |status: tonic::Status| {
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        reason_of(&status)
    };

    let status = gateway
        .append_batch(batch_of("empty", 0))
        .await
        .expect_err("an empty batch");
    assert_eq!(refused(status).as_deref(), Some("BATCH_EMPTY"));

    let status = gateway
        .append_batch(batch_of("many", 513))
        .await
        .expect_err("more than 512 events");
    assert_eq!(refused(status).as_deref(), Some("BATCH_TOO_LARGE"));

    // 100 events of 12 KiB context each: every event is valid, the batch is over 1 MiB.
    let mut heavy = batch_of("heavy", 100);
    for event in &mut heavy.events {
        event.context_json = format!(r#"{{"note":"{}"}}"#, "x".repeat(12 * 1024));
    }
    let status = gateway
        .append_batch(heavy)
        .await
        .expect_err("more than 1 MiB");
    assert_eq!(refused(status).as_deref(), Some("BATCH_TOO_LARGE"));

    // One bad event refuses the whole batch with its own code.
    let mut one_bad = batch_of("one-bad", 10);
    one_bad.events[7].actor.clear();
    let status = gateway
        .append_batch(one_bad)
        .await
        .expect_err("one bad event");
    assert_eq!(refused(status).as_deref(), Some("FIELD_MISSING"));

    assert_eq!(verified(&ledger).await.entries_checked, 0);
    assert!(stored_resources(&ledger.database_url).await.is_empty());
}

#[tokio::test]
async fn a_batch_from_a_peer_outside_the_policy_is_refused() {
    let ledger = Ledger::start(Some(fresh_postgres_database().await)).await;
    for identity in ["validation", "stranger", "operator"] {
        let status = ledger
            .client_as(identity)
            .append_batch(batch_of("peer", 3))
            .await
            .expect_err("refused");
        assert_eq!(status.code(), Code::PermissionDenied, "{identity}");
        assert_eq!(reason_of(&status).as_deref(), Some("PEER_NOT_ALLOWED"));
    }
    assert!(stored_resources(&ledger.database_url).await.is_empty());
    for identity in ["gateway", "auth", "inference"] {
        ledger
            .client_as(identity)
            .append_batch(batch_of(identity, 2))
            .await
            .expect("an appending service may batch");
    }
    assert_eq!(stored_resources(&ledger.database_url).await.len(), 6);
}

#[tokio::test]
async fn a_failing_commit_fails_the_whole_batch_and_records_none_of_it() {
    let ledger = Ledger::start(Some(fresh_postgres_database().await)).await;
    let mut gateway = ledger.client_as("gateway");
    gateway
        .append_batch(batch_of("before", 2))
        .await
        .expect("batch");
    fail_commits_storing(&ledger.database_url, "poison").await;

    let mut poisoned = batch_of("doomed", 5);
    poisoned.events[3].resource = "poison".to_owned();
    let status = gateway
        .append_batch(poisoned)
        .await
        .expect_err("the commit fails");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(reason_of(&status).as_deref(), Some("LEDGER_UNAVAILABLE"));
    let stored = stored_resources(&ledger.database_url).await;
    assert_eq!(
        stored,
        vec![(1, "before/0".to_owned()), (2, "before/1".to_owned())],
        "nothing of the failed batch is stored"
    );

    // The next batch goes in right after the last durable entry.
    let seqs: Vec<u64> = gateway
        .append_batch(batch_of("after", 3))
        .await
        .expect("batch")
        .into_inner()
        .receipts
        .iter()
        .map(|receipt| receipt.seq)
        .collect();
    assert_eq!(seqs, vec![3, 4, 5]);
    let report = verified(&ledger).await;
    assert!(report.intact, "{report:?}");
    assert_eq!(report.entries_checked, 5);
}

#[tokio::test]
async fn concurrent_callers_of_one_ledger_client_get_their_own_receipts_and_one_chain() {
    let ledger = Ledger::start(Some(fresh_postgres_database().await)).await;
    let client = ledger_client(&ledger, "inference");
    let callers = (0..300).map(|index| {
        let client = client.clone();
        tokio::spawn(async move {
            let seq = client
                .record(
                    "service:inference",
                    "INFERENCE",
                    &format!("result/{index}"),
                    "SUCCESS",
                    serde_json::json!({ "index": index }),
                )
                .await
                .expect("recorded");
            (index, seq)
        })
    });
    let mut answers = Vec::new();
    for caller in callers {
        answers.push(caller.await.expect("task"));
    }
    // Each caller's seq is the entry holding its own event.
    let stored: std::collections::HashMap<i64, String> = stored_resources(&ledger.database_url)
        .await
        .into_iter()
        .collect();
    assert_eq!(stored.len(), 300);
    for (index, seq) in &answers {
        assert_eq!(
            stored.get(&(*seq as i64)).map(String::as_str),
            Some(format!("result/{index}").as_str()),
            "caller {index}"
        );
    }
    let report = verified(&ledger).await;
    assert!(report.intact, "{report:?}");
    assert_eq!(report.entries_checked, 300);
}

#[tokio::test]
async fn a_bad_event_among_concurrent_callers_refuses_only_its_caller() {
    let ledger = Ledger::start(Some(fresh_postgres_database().await)).await;
    let client = ledger_client(&ledger, "auth");
    let callers = (0..64).map(|index| {
        let client = client.clone();
        tokio::spawn(async move {
            // Caller 17 leaves the actor empty.
            let actor = if index == 17 { "" } else { "service:auth" };
            let answer = client
                .record(
                    actor,
                    "LOGIN",
                    &format!("session/{index}"),
                    "SUCCESS",
                    serde_json::json!({}),
                )
                .await;
            (index, answer)
        })
    });
    let mut recorded = 0;
    for caller in callers {
        let (index, answer) = caller.await.expect("task");
        if index == 17 {
            let status = answer.expect_err("the bad event is refused");
            assert_eq!(reason_of(&status).as_deref(), Some("FIELD_MISSING"));
        } else {
            answer.expect("every other event is recorded");
            recorded += 1;
        }
    }
    assert_eq!(recorded, 63);
    let report = verified(&ledger).await;
    assert!(report.intact, "{report:?}");
    assert_eq!(report.entries_checked, 63);
}

#[tokio::test]
async fn when_commits_fail_no_caller_of_a_ledger_client_is_told_its_event_is_durable() {
    let ledger = Ledger::start(Some(fresh_postgres_database().await)).await;
    fail_commits_storing(&ledger.database_url, "poison").await;
    let client = ledger_client(&ledger, "inference");
    let callers = (0..200).map(|index| {
        let client = client.clone();
        tokio::spawn(async move {
            // Every tenth event makes its commit fail, and with it its whole group.
            let resource = if index % 10 == 3 {
                "poison".to_owned()
            } else {
                format!("result/{index}")
            };
            let answer = client
                .record(
                    "service:inference",
                    "INFERENCE",
                    &resource,
                    "SUCCESS",
                    serde_json::json!({}),
                )
                .await;
            (resource, answer)
        })
    });
    let mut durable = std::collections::HashMap::new();
    let mut failed = 0;
    for caller in callers {
        let (resource, answer) = caller.await.expect("task");
        match answer {
            Ok(seq) => {
                assert_ne!(resource, "poison", "a failed commit reported durable");
                durable.insert(seq as i64, resource);
            }
            Err(status) => {
                assert_eq!(reason_of(&status).as_deref(), Some("LEDGER_UNAVAILABLE"));
                failed += 1;
            }
        }
    }
    assert!(failed >= 20, "every poisoned caller failed ({failed})");
    // Exactly the callers told "durable" are stored, each at the seq it was given.
    let stored: std::collections::HashMap<i64, String> = stored_resources(&ledger.database_url)
        .await
        .into_iter()
        .collect();
    assert_eq!(stored, durable);
    let report = verified(&ledger).await;
    assert!(report.intact, "{report:?}");
}
