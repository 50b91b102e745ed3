//! The ledger's speed, in one run against the suite's PostgreSQL:
//! - durable appends/s through the audit service's gRPC API over mTLS with 1, 16 and 256
//!   concurrent clients, against a raw batched INSERT of the same rows (no chain, no RPC);
//! - verification speed over 1,000,000 entries: the chain and Merkle root recomputed in memory,
//!   and the service's own Verify reading them back from PostgreSQL.
//!
//! Prints figures and writes target/bench/ledger.json. Run with scripts/bench.sh.

#![allow(clippy::print_stdout)]

use std::sync::Arc;
use std::time::Instant;

use medai_audit::AuditConfig;
use medai_ledger::chain::{self, EntryContent, StoredEntry};
use medai_ledger::export::LedgerAudit;
use medai_proto::audit::v1 as pb;
use medai_proto::audit::v1::audit_service_client::AuditServiceClient;
use medai_testkit::{
    TestPki, TestServer, fresh_postgres_database, scratch_file, test_process_config,
    wait_until_serving,
};
use sea_orm::{ConnectionTrait, Database, DatabaseConnection};
use tokio::sync::Semaphore;

const VERIFY_ENTRIES: u64 = 1_000_000;

fn content(seq: u64) -> EntryContent {
    EntryContent {
        seq,
        recorded_at: "2026-11-22T00:00:00.000000Z".to_owned(),
        actor: "user:4f0c1a52-8d4b-4e8e-9a55-bench".to_owned(),
        action: "INFERENCE".to_owned(),
        resource: format!("result/{seq}"),
        outcome: "SUCCESS".to_owned(),
        context: r#"{"image_sha256":"3f27d1c22f1a66e80d7bb7c911e8610fd0bb70325a76746a7adb1c0ddefcf2bb","model":"brain-mri-tumor"}"#.to_owned(),
    }
}

fn chained(count: u64) -> Vec<StoredEntry> {
    let mut head = chain::genesis_hash();
    (1..=count)
        .map(|seq| {
            let content = content(seq);
            let hash = chain::entry_hash(&head, &content);
            let entry = StoredEntry {
                content,
                encoding_version: 1,
                prev_hash_hex: hex::encode(head),
                hash_hex: hex::encode(hash),
            };
            head = hash;
            entry
        })
        .collect()
}

fn decode(hex_text: &str) -> [u8; 32] {
    let mut bytes = [0; 32];
    hex::decode_to_slice(hex_text, &mut bytes).expect("hex");
    bytes
}

fn quoted(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// Raw batched INSERT of chained rows, 1000 per statement, 10 statements per transaction.
async fn raw_insert(database: &DatabaseConnection, entries: &[StoredEntry]) {
    for transaction_rows in entries.chunks(10_000) {
        let mut sql = String::from("BEGIN;");
        for rows in transaction_rows.chunks(1000) {
            sql.push_str("INSERT INTO ledger_entries (seq, recorded_at, actor, action, resource, outcome, context, prev_hash, hash, encoding_version) VALUES ");
            let values: Vec<String> = rows
                .iter()
                .map(|entry| {
                    let c = &entry.content;
                    format!(
                        "({}, {}, {}, {}, {}, {}, {}, {}, {}, 1)",
                        c.seq,
                        quoted(&c.recorded_at),
                        quoted(&c.actor),
                        quoted(&c.action),
                        quoted(&c.resource),
                        quoted(&c.outcome),
                        quoted(&c.context),
                        quoted(&entry.prev_hash_hex),
                        quoted(&entry.hash_hex)
                    )
                })
                .collect();
            sql.push_str(&values.join(","));
            sql.push(';');
        }
        sql.push_str("COMMIT;");
        database.execute_unprepared(&sql).await.expect("raw insert");
    }
}

async fn audit_service(pki: &TestPki, database_url: &str) -> TestServer {
    let config = AuditConfig {
        process: test_process_config(),
        tls: pki.files("audit"),
        database_url: database_url.to_owned(),
        migration_database_url: None,
        checkpoint_key_file: scratch_file("checkpoint.key"),
        checkpoint_key_mode: medai_audit::config::CheckpointKeyMode::Generate,
        checkpoint_interval_seconds: 0,
    };
    let server =
        TestServer::start(|listener, shutdown| medai_audit::serve(config, listener, shutdown))
            .await;
    wait_until_serving(pki, server.address, "audit").await;
    server
}

async fn appends_per_second(
    client: &AuditServiceClient<tonic::transport::Channel>,
    clients: usize,
    total: usize,
) -> f64 {
    let permits = Arc::new(Semaphore::new(clients));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(total);
    for index in 0..total {
        let mut client = client.clone();
        let permits = permits.clone();
        tasks.push(tokio::spawn(async move {
            let _permit = permits.acquire_owned().await.expect("permit");
            let c = content(index as u64);
            let request = pb::AppendRequest {
                actor: c.actor,
                action: c.action,
                resource: c.resource,
                outcome: c.outcome,
                context_json: c.context,
            };
            client.append(request).await.expect("append");
        }));
    }
    for task in tasks {
        task.await.expect("task");
    }
    total as f64 / started.elapsed().as_secs_f64()
}

#[tokio::main]
async fn main() {
    let pki = TestPki::new();

    // Durable appends through the API.
    let mut api = Vec::new();
    for (clients, total) in [(1usize, 1_000usize), (16, 10_000), (256, 40_000)] {
        let database_url = fresh_postgres_database().await;
        let server = audit_service(&pki, &database_url).await;
        let client = AuditServiceClient::new(pki.channel_as("gateway", server.address, "audit"));
        let rate = appends_per_second(&client, clients, total).await;
        api.push((clients, rate));
        server.stop().await;
    }

    // The baseline: the same rows, already chained, inserted raw.
    let database_url = fresh_postgres_database().await;
    let migrated = audit_service(&pki, &database_url).await;
    migrated.stop().await;
    let database = Database::connect(database_url.as_str())
        .await
        .expect("connect");
    let entries = chained(VERIFY_ENTRIES);
    let started = Instant::now();
    raw_insert(&database, &entries[..40_000]).await;
    let raw_rate = 40_000.0 / started.elapsed().as_secs_f64();
    raw_insert(&database, &entries[40_000..]).await;

    // Verification: in memory (the chain, and a signed checkpoint over all of it: Merkle root
    // and signature), then the service reading PostgreSQL.
    let signer =
        medai_ledger::checkpoint::CheckpointSigner::load_or_create(&scratch_file("bench.key"))
            .expect("key");
    let head = medai_ledger::chain::genesis_hash();
    let hashes: Vec<[u8; 32]> = entries
        .iter()
        .map(|entry| decode(&entry.hash_hex))
        .collect();
    let checkpoint = signer.sign(
        VERIFY_ENTRIES,
        hashes.last().unwrap_or(&head),
        &medai_ledger::merkle::root(&hashes),
        "2026-11-22T00:00:00.000000Z",
    );
    let started = Instant::now();
    let mut audit = LedgerAudit::new();
    for entry in entries {
        audit.add_entry(entry);
    }
    audit.add_checkpoint(checkpoint);
    let report = audit.report(signer.public_key());
    let in_memory_rate = VERIFY_ENTRIES as f64 / started.elapsed().as_secs_f64();
    assert_eq!(
        (
            report.entries_verified,
            report.checkpoints_verified,
            report.first_bad_seq
        ),
        (VERIFY_ENTRIES, 1, None)
    );

    let server = audit_service(&pki, &database_url).await;
    let mut client = AuditServiceClient::new(pki.channel_as("gateway", server.address, "audit"));
    let started = Instant::now();
    let verified = client
        .verify(pb::VerifyRequest {})
        .await
        .expect("verify")
        .into_inner();
    let service_rate = VERIFY_ENTRIES as f64 / started.elapsed().as_secs_f64();
    assert!(
        verified.intact && verified.entries_checked == VERIFY_ENTRIES,
        "{verified:?}"
    );
    server.stop().await;

    println!("ledger appends, durable (acknowledged after COMMIT), gRPC over mTLS, PostgreSQL");
    for (clients, rate) in &api {
        println!(
            "  {clients:>3} clients  {rate:>10.0} appends/s  ({:.3}x raw batched INSERT)",
            rate / raw_rate
        );
    }
    println!("  raw batched INSERT of the same rows: {raw_rate:.0} rows/s");
    println!("ledger verification over {VERIFY_ENTRIES} entries");
    println!("  in memory (chain + signed checkpoint): {in_memory_rate:>10.0} entries/s");
    println!("  audit service Verify from PostgreSQL: {service_rate:>11.0} entries/s");

    let report = serde_json::json!({
        "benchmark": "ledger",
        "appends_per_second": api.iter().map(|(clients, rate)| serde_json::json!({"clients": clients, "rate": rate})).collect::<Vec<_>>(),
        "raw_batched_insert_rows_per_second": raw_rate,
        "verify_entries": VERIFY_ENTRIES,
        "verify_in_memory_entries_per_second": in_memory_rate,
        "verify_service_entries_per_second": service_rate,
    });
    let directory = medai_testkit::workspace_root().join("target/bench");
    std::fs::create_dir_all(&directory).expect("bench folder");
    std::fs::write(
        directory.join("ledger.json"),
        serde_json::to_string_pretty(&report).expect("json"),
    )
    .expect("write");
}
