//! What the ledger proves against a real PostgreSQL: tampering of every kind is named by seq,
//! signed checkpoints catch what the chain alone cannot, proofs verify as RFC 9162 says, and an
//! export verifies offline.

use std::io::Cursor;

use base64::Engine;
use medai_audit::AuditConfig;
use medai_ledger::chain::{EntryContent, entry_hash};
use medai_ledger::checkpoint::Checkpoint;
use medai_ledger::export::{ExportRecord, verify_export};
use medai_ledger::merkle;
use medai_proto::audit::v1 as pb;
use medai_proto::audit::v1::audit_service_client::AuditServiceClient;
use medai_testkit::{
    TestPki, TestServer, fresh_postgres_database, scratch_file, test_process_config,
    wait_until_serving,
};
use sea_orm::{ConnectionTrait, Database, DatabaseBackend, DatabaseConnection, Statement};

struct Ledger {
    _pki: TestPki,
    _server: TestServer,
    client: AuditServiceClient<tonic::transport::Channel>,
    database: DatabaseConnection,
    public_key: Vec<u8>,
}

impl Ledger {
    async fn start() -> Self {
        let pki = TestPki::new();
        let database_url = fresh_postgres_database().await;
        let config = AuditConfig {
            process: test_process_config(),
            tls: pki.files("audit"),
            database_url: database_url.clone(),
            checkpoint_key_file: scratch_file("checkpoint.key"),
            checkpoint_key_mode: medai_audit::config::CheckpointKeyMode::Generate,
            checkpoint_log_file: None,
            checkpoint_interval_seconds: 0,
            migration_database_url: None,
        };
        let key_file = config.checkpoint_key_file.clone();
        let server =
            TestServer::start(|listener, shutdown| medai_audit::serve(config, listener, shutdown))
                .await;
        wait_until_serving(&pki, server.address, "audit").await;
        let client = AuditServiceClient::new(pki.channel_as("gateway", server.address, "audit"));
        // The auditor's copy of the public key, from the file the service wrote beside its key.
        let public_text =
            std::fs::read_to_string(key_file.with_extension("pub")).expect("public key file");
        let public_key = base64::engine::general_purpose::STANDARD
            .decode(public_text.trim())
            .expect("base64");
        let database = Database::connect(database_url.as_str())
            .await
            .expect("superuser connection");
        Self {
            _pki: pki,
            _server: server,
            client,
            database,
            public_key,
        }
    }

    async fn append(&mut self, count: usize, actor: &str) {
        for index in 0..count {
            let request = pb::AppendRequest {
                actor: actor.to_owned(),
                action: "INFERENCE".to_owned(),
                resource: format!("result/{index}"),
                outcome: "SUCCESS".to_owned(),
                context_json: format!(r#"{{"n":{index}}}"#),
            };
            self.client.append(request).await.expect("append");
        }
    }

    async fn checkpoint(&mut self) -> pb::Checkpoint {
        self.client
            .create_checkpoint(pb::CreateCheckpointRequest {})
            .await
            .expect("checkpoint")
            .into_inner()
            .checkpoint
            .expect("c")
    }

    async fn verify(&mut self) -> pb::VerifyResponse {
        self.client
            .verify(pb::VerifyRequest {})
            .await
            .expect("verify")
            .into_inner()
    }

    /// What a superuser can do: switch the triggers off, change anything, switch them back on.
    async fn as_superuser(&self, statements: &str) {
        self.database
            .execute_unprepared(&format!(
                "ALTER TABLE ledger_entries DISABLE TRIGGER USER; ALTER TABLE ledger_checkpoints DISABLE TRIGGER USER; \
                 {statements} \
                 ALTER TABLE ledger_entries ENABLE TRIGGER USER; ALTER TABLE ledger_checkpoints ENABLE TRIGGER USER;"
            ))
            .await
            .expect("superuser statements");
    }

    async fn export(&mut self) -> String {
        let mut stream = self
            .client
            .export_ledger(pb::ExportLedgerRequest {})
            .await
            .expect("export")
            .into_inner();
        let mut text = String::new();
        while let Some(chunk) = stream.message().await.expect("chunk") {
            text.push_str(&chunk.lines);
        }
        text
    }
}

fn domain_checkpoint(checkpoint: pb::Checkpoint) -> Checkpoint {
    Checkpoint {
        tree_size: checkpoint.tree_size,
        head_hash: checkpoint.head_hash,
        merkle_root: checkpoint.merkle_root,
        created_at: checkpoint.created_at,
        key_id: checkpoint.key_id,
        signature: checkpoint.signature,
    }
}

fn decode(hex_text: &str) -> merkle::Hash {
    merkle::Hash::try_from(hex::decode(hex_text).expect("hex")).expect("32 bytes")
}

#[tokio::test]
async fn two_swapped_rows_are_named() {
    let mut ledger = Ledger::start().await;
    ledger.append(5, "user:a").await;
    ledger
        .as_superuser(
            "UPDATE ledger_entries SET seq = -2 WHERE seq = 2; UPDATE ledger_entries SET seq = 2 WHERE seq = 3; \
             UPDATE ledger_entries SET seq = 3 WHERE seq = -2;",
        )
        .await;
    let report = ledger.verify().await;
    assert!(!report.intact);
    assert_eq!(report.first_bad_seq, 2, "{report:?}");
}

#[tokio::test]
async fn a_truncated_tail_is_caught_by_the_signed_checkpoint() {
    let mut ledger = Ledger::start().await;
    ledger.append(10, "user:a").await;
    let checkpoint = ledger.checkpoint().await;
    assert_eq!(
        checkpoint.tree_size, 11,
        "ten events and the record of the checkpoint request"
    );
    ledger
        .as_superuser("DELETE FROM ledger_entries WHERE seq >= 8;")
        .await;
    let report = ledger.verify().await;
    assert!(
        !report.intact,
        "the chain that is left is internally consistent, but the checkpoint vouches for 10"
    );
    assert_eq!(report.first_bad_seq, 8, "{report:?}");
    assert!(report.problem.contains("missing"), "{}", report.problem);
}

/// Rewrites every entry after seq `kept` with actor `user:mallory` and recomputes every hash
/// after it, so every link and hash is consistent again (what an attacker with the database
/// but without the checkpoint key can do).
async fn rewrite_consistently_after(ledger: &Ledger, kept: i64) {
    let rows = ledger
        .database
        .query_all_raw(Statement::from_string(
            DatabaseBackend::Postgres,
            "SELECT seq, recorded_at, actor, action, resource, outcome, context, hash FROM ledger_entries ORDER BY seq",
        ))
        .await
        .expect("rows");
    let kept_index = usize::try_from(kept - 1).expect("kept >= 1");
    let mut previous = decode(
        &rows[kept_index]
            .try_get::<String>("", "hash")
            .expect("hash"),
    );
    let mut statements = String::new();
    for row in &rows[kept_index + 1..] {
        let seq: i64 = row.try_get("", "seq").expect("seq");
        let content = EntryContent {
            seq: seq as u64,
            recorded_at: row.try_get("", "recorded_at").expect("at"),
            actor: "user:mallory".to_owned(),
            action: row.try_get("", "action").expect("action"),
            resource: row.try_get("", "resource").expect("resource"),
            outcome: row.try_get("", "outcome").expect("outcome"),
            context: row.try_get("", "context").expect("context"),
        };
        let hash = entry_hash(&previous, &content);
        statements.push_str(&format!(
            "UPDATE ledger_entries SET actor = 'user:mallory', prev_hash = '{}', hash = '{}' WHERE seq = {seq}; ",
            hex::encode(previous),
            hex::encode(hash)
        ));
        previous = hash;
    }
    ledger.as_superuser(&statements).await;
}

/// The streamed, batched Verify (rows read in place, hashed on the blocking pool, linked in
/// order) names exactly what the paged one-entry-at-a-time walk names, for every kind of
/// tampering at the first entry, on both sides of batch edges, at a checkpoint's size and at
/// the last entry; with one row per batch, seven, and all rows in one.
#[tokio::test]
async fn the_streamed_verify_reports_what_the_paged_walk_reports_at_batch_edges() {
    use medai_audit::verify::{postgres_pool, verify_ledger_in_batches, verify_ledger_paged};
    let mut ledger = Ledger::start().await;
    ledger.append(20, "user:a").await;
    assert_eq!(ledger.checkpoint().await.tree_size, 21);
    ledger.append(20, "user:b").await;
    assert_eq!(ledger.checkpoint().await.tree_size, 42);
    ledger.append(4, "user:c").await;
    assert!(
        postgres_pool(&ledger.database).is_some(),
        "the streamed walk runs on PostgreSQL"
    );
    ledger
        .as_superuser("CREATE TABLE pristine AS SELECT * FROM ledger_entries;")
        .await;
    let tampers: [(&str, &str); 9] = [
        ("intact", ""),
        (
            "changed actor",
            "UPDATE ledger_entries SET actor = 'user:mallory' WHERE seq = {p};",
        ),
        (
            "changed hash",
            "UPDATE ledger_entries SET hash = repeat('0', 64) WHERE seq = {p};",
        ),
        (
            "changed prev_hash",
            "UPDATE ledger_entries SET prev_hash = repeat('1', 64) WHERE seq = {p};",
        ),
        (
            "prev_hash not hex",
            "UPDATE ledger_entries SET prev_hash = 'not hex' WHERE seq = {p};",
        ),
        (
            "hashes in upper case",
            "UPDATE ledger_entries SET hash = upper(hash), prev_hash = upper(prev_hash) WHERE seq = {p};",
        ),
        (
            "unknown version",
            "UPDATE ledger_entries SET encoding_version = 2 WHERE seq = {p};",
        ),
        ("deleted", "DELETE FROM ledger_entries WHERE seq = {p};"),
        ("tail cut", "DELETE FROM ledger_entries WHERE seq >= {p};"),
    ];
    let mut broken = 0;
    for position in [1, 7, 8, 14, 21, 22, 42, 44] {
        for rewrite in [false, true] {
            for (name, statement) in tampers {
                if rewrite {
                    if position == 1 || name != "intact" {
                        continue;
                    }
                    rewrite_consistently_after(&ledger, position - 1).await;
                } else {
                    ledger
                        .as_superuser(&statement.replace("{p}", &position.to_string()))
                        .await;
                }
                let expected = verify_ledger_paged(&ledger.database, &ledger.public_key)
                    .await
                    .expect("paged walk");
                broken += usize::from(expected.first_bad_seq.is_some());
                for rows_per_batch in [1, 7, 4096] {
                    let streamed = verify_ledger_in_batches(
                        &ledger.database,
                        &ledger.public_key,
                        rows_per_batch,
                    )
                    .await
                    .expect("streamed walk");
                    let case = if rewrite { "consistent rewrite" } else { name };
                    assert_eq!(
                        streamed, expected,
                        "{case} at seq {position}, {rows_per_batch} rows per batch"
                    );
                }
                ledger
                    .as_superuser("DELETE FROM ledger_entries; INSERT INTO ledger_entries SELECT * FROM pristine;")
                    .await;
            }
        }
    }
    // Every tampering but the harmless ones (intact, upper-case hex) is a break at each of the
    // 8 positions, and so is every consistent rewrite (7 positions) except behind the last
    // checkpoint: a tail cut or rewrite after seq 42 is what no checkpoint vouches for.
    assert_eq!(broken, 8 * 7 - 1 + 7 - 1, "the fixture tampers as intended");
}

#[tokio::test]
async fn a_history_rewritten_consistently_after_a_checkpoint_is_caught_by_it() {
    let mut ledger = Ledger::start().await;
    ledger.append(5, "user:a").await;
    let first = ledger.checkpoint().await;
    ledger.append(5, "user:b").await;
    let second = ledger.checkpoint().await;
    // Each checkpoint covers the record of its own request too.
    assert_eq!((first.tree_size, second.tree_size), (6, 12));

    rewrite_consistently_after(&ledger, 8).await;

    let report = ledger.verify().await;
    assert!(!report.intact);
    assert_eq!(
        report.first_bad_seq, 7,
        "the first entry not vouched for by a checkpoint that still verifies: {report:?}"
    );
    assert!(
        report
            .problem
            .contains("between the checkpoints at sizes 6 (holds) and 12 (does not)"),
        "localised between the checkpoints that bound it: {}",
        report.problem
    );
    assert_eq!(report.checkpoints_verified, 1);

    // Even if the attacker also deletes the checkpoint rows, the auditor's saved checkpoint
    // (signed, kept outside the database) catches it offline.
    ledger.as_superuser("DELETE FROM ledger_checkpoints;").await;
    let export = ledger.export().await;
    let saved =
        serde_json::to_string(&ExportRecord::Checkpoint(domain_checkpoint(second))).expect("json");
    let with_saved = format!("{export}{saved}\n");
    let offline = verify_export(Cursor::new(with_saved.clone()), &ledger.public_key)
        .expect("export readable");
    assert_eq!(
        offline.first_bad_seq,
        Some(1),
        "with only the later checkpoint kept, nothing before it is vouched for"
    );
    let first_saved =
        serde_json::to_string(&ExportRecord::Checkpoint(domain_checkpoint(first))).expect("json");
    let offline = verify_export(
        Cursor::new(format!("{with_saved}{first_saved}\n")),
        &ledger.public_key,
    )
    .expect("readable");
    assert_eq!(offline.first_bad_seq, Some(7));
}

#[tokio::test]
async fn proofs_verify_against_signed_checkpoints_as_rfc_9162_says() {
    let mut ledger = Ledger::start().await;
    ledger.append(7, "user:a").await;
    let old = ledger.checkpoint().await;
    ledger.append(6, "user:a").await;
    let new = ledger.checkpoint().await;
    let key = ledger
        .client
        .get_checkpoint_key(pb::GetCheckpointKeyRequest {})
        .await
        .expect("key")
        .into_inner();
    assert_eq!(
        base64::engine::general_purpose::STANDARD
            .decode(&key.public_key)
            .expect("b64"),
        ledger.public_key
    );
    for checkpoint in [&old, &new] {
        assert!(domain_checkpoint(checkpoint.clone()).signature_is_valid(&ledger.public_key));
    }

    let inclusion = ledger
        .client
        .get_inclusion_proof(pb::GetInclusionProofRequest {
            seq: 3,
            tree_size: new.tree_size,
        })
        .await
        .expect("inclusion")
        .into_inner();
    let proof: Vec<merkle::Hash> = inclusion.proof.iter().map(|hash| decode(hash)).collect();
    let root = decode(&new.merkle_root);
    assert!(merkle::verify_inclusion(
        &decode(&inclusion.entry_hash),
        2,
        new.tree_size,
        &proof,
        &root
    ));
    assert!(!merkle::verify_inclusion(
        &decode(&inclusion.entry_hash),
        3,
        new.tree_size,
        &proof,
        &root
    ));

    let consistency = ledger
        .client
        .get_consistency_proof(pb::GetConsistencyProofRequest {
            old_size: old.tree_size,
            new_size: new.tree_size,
        })
        .await
        .expect("consistency")
        .into_inner();
    let proof: Vec<merkle::Hash> = consistency.proof.iter().map(|hash| decode(hash)).collect();
    assert!(merkle::verify_consistency(
        old.tree_size,
        new.tree_size,
        &proof,
        &decode(&old.merkle_root),
        &root
    ));
    assert!(!merkle::verify_consistency(
        old.tree_size,
        new.tree_size,
        &proof,
        &[9; 32],
        &root
    ));

    let status = ledger
        .client
        .get_inclusion_proof(pb::GetInclusionProofRequest {
            seq: 99,
            tree_size: 100,
        })
        .await
        .expect_err("out of range");
    assert_eq!(
        medai_runtime::errors::reason_of(&status).as_deref(),
        Some("OUT_OF_RANGE")
    );
}

#[tokio::test]
async fn an_export_verifies_offline_and_a_tampered_export_names_the_entry() {
    let mut ledger = Ledger::start().await;
    ledger.append(20, "user:a").await;
    ledger.checkpoint().await;
    let export = ledger.export().await;
    let report = verify_export(Cursor::new(&export), &ledger.public_key).expect("readable");
    assert_eq!(
        (
            report.first_bad_seq,
            report.entries_verified,
            report.checkpoints_verified
        ),
        (None, 21, 1)
    );

    let tampered: String = export
        .lines()
        .map(|line| {
            if line.contains(r#""seq":12,"#) {
                line.replace("user:a", "user:b")
            } else {
                line.to_owned()
            }
        })
        .map(|line| line + "\n")
        .collect();
    let report = verify_export(Cursor::new(&tampered), &ledger.public_key).expect("readable");
    assert_eq!(report.first_bad_seq, Some(12), "{report:?}");

    let stranger =
        medai_ledger::checkpoint::CheckpointSigner::load_or_create(&scratch_file("other.key"))
            .expect("key");
    let report = verify_export(Cursor::new(&export), stranger.public_key()).expect("readable");
    assert_eq!(
        report.first_bad_seq,
        Some(1),
        "a checkpoint signed by another key vouches for nothing"
    );
    assert!(verify_export(Cursor::new(b"{not json"), &ledger.public_key).is_err());
}

#[tokio::test]
async fn queries_filter_and_paginate() {
    let mut ledger = Ledger::start().await;
    ledger.append(5, "user:a").await;
    ledger.append(4, "user:b").await;
    let mut page_token = String::new();
    let mut seen = Vec::new();
    loop {
        let page = ledger
            .client
            .query_events(pb::QueryEventsRequest {
                actor: "user:b".to_owned(),
                page_size: 3,
                page_token,
                ..Default::default()
            })
            .await
            .expect("query")
            .into_inner();
        seen.extend(page.entries.iter().map(|entry| entry.seq));
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    assert_eq!(seen, vec![6, 7, 8, 9]);
    let future = ledger
        .client
        .query_events(pb::QueryEventsRequest {
            recorded_from: "2999-01-01T00:00:00.000000Z".to_owned(),
            ..Default::default()
        })
        .await
        .expect("query")
        .into_inner();
    assert!(future.entries.is_empty());
    let status = ledger
        .client
        .query_events(pb::QueryEventsRequest {
            page_token: "x".to_owned(),
            ..Default::default()
        })
        .await
        .expect_err("bad token");
    assert_eq!(
        medai_runtime::errors::reason_of(&status).as_deref(),
        Some("PAGE_TOKEN_INVALID")
    );
}

#[tokio::test]
async fn the_services_database_role_may_only_insert_and_select() {
    let owner_url = fresh_postgres_database().await;
    let owner = Database::connect(owner_url.as_str()).await.expect("owner");
    let role = format!("ledger_app_{}", std::process::id());
    owner
        .execute_unprepared(&format!(
            "DO $$ BEGIN CREATE ROLE medai_ledger_writer NOLOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$; \
             DO $$ BEGIN CREATE ROLE {role} LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$; \
             GRANT medai_ledger_writer TO {role};"
        ))
        .await
        .expect("roles");
    let (base, database) = owner_url.rsplit_once('/').expect("url");
    let service_url = format!(
        "{}/{database}",
        base.replacen("postgres@", &format!("{role}@"), 1)
    );

    let pki = TestPki::new();
    let config = AuditConfig {
        process: test_process_config(),
        tls: pki.files("audit"),
        database_url: service_url.clone(),
        migration_database_url: Some(owner_url.clone()),
        checkpoint_key_file: scratch_file("checkpoint.key"),
        checkpoint_key_mode: medai_audit::config::CheckpointKeyMode::Generate,
        checkpoint_log_file: None,
        checkpoint_interval_seconds: 0,
    };
    let server =
        TestServer::start(|listener, shutdown| medai_audit::serve(config, listener, shutdown))
            .await;
    wait_until_serving(&pki, server.address, "audit").await;
    let mut client = AuditServiceClient::new(pki.channel_as("gateway", server.address, "audit"));
    let append = pb::AppendRequest {
        actor: "user:a".to_owned(),
        action: "LOGIN".to_owned(),
        resource: "session".to_owned(),
        outcome: "SUCCESS".to_owned(),
        context_json: String::new(),
    };
    client
        .append(append)
        .await
        .expect("the narrow role appends");
    client
        .create_checkpoint(pb::CreateCheckpointRequest {})
        .await
        .expect("and signs checkpoints");
    assert!(
        client
            .verify(pb::VerifyRequest {})
            .await
            .expect("and reads")
            .into_inner()
            .intact
    );

    let narrow = Database::connect(service_url.as_str())
        .await
        .expect("service role");
    for statement in [
        "UPDATE ledger_entries SET actor = 'x'",
        "DELETE FROM ledger_entries",
        "TRUNCATE ledger_entries",
        "DELETE FROM ledger_checkpoints",
        "ALTER TABLE ledger_entries DISABLE TRIGGER USER",
    ] {
        let error = narrow
            .execute_unprepared(statement)
            .await
            .expect_err(statement);
        let text = error.to_string();
        assert!(
            text.contains("permission denied") || text.contains("must be owner"),
            "{statement}: {text}"
        );
    }
}

/// The process's Prometheus recorder, installed once for this test binary.
fn metrics() -> &'static metrics_exporter_prometheus::PrometheusHandle {
    static HANDLE: std::sync::OnceLock<metrics_exporter_prometheus::PrometheusHandle> =
        std::sync::OnceLock::new();
    HANDLE.get_or_init(|| medai_runtime::admin::install_prometheus_recorder().expect("recorder"))
}

fn verification_failures() -> Option<f64> {
    metrics().render().lines().find_map(|line| {
        line.strip_prefix(r#"medai_ledger_chain_verification_failures_total{check="verify"} "#)
            .and_then(|value| value.trim().parse().ok())
    })
}

#[tokio::test]
async fn a_chain_that_no_longer_verifies_is_counted_for_alerts() {
    metrics();
    let mut ledger = Ledger::start().await;
    ledger.append(3, "user:a").await;
    // Registered at zero when the service starts, so an alert sees 0 before any failure.
    let before = verification_failures().expect("registered when the service started");
    assert!(ledger.verify().await.intact);
    ledger
        .as_superuser("UPDATE ledger_entries SET actor = 'user:mallory' WHERE seq = 2;")
        .await;
    let report = ledger.verify().await;
    assert!(!report.intact, "{report:?}");
    let after = verification_failures().expect("counted");
    assert!(after >= before + 1.0, "before {before}, after {after}");
}
