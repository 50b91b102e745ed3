//! What a checkpoint costs, against a real PostgreSQL: it reads only the entries appended since
//! the last one, however long the ledger (pre-filled with a raw bulk INSERT of correctly
//! chained rows), and appends go on while a checkpoint runs.

use std::sync::Arc;
use std::time::Duration;

use medai_audit::anchor::ChainAnchor;
use medai_audit::appender::{LedgerAppender, NewEvent};
use medai_audit::checkpoints::Checkpointer;
use medai_ledger::chain::{self, EntryContent, Hash};
use medai_ledger::checkpoint::CheckpointSigner;
use medai_testkit::{fresh_postgres_database, scratch_file};
use sea_orm::{
    ConnectionTrait, Database, DatabaseBackend, DatabaseConnection, Statement, TransactionTrait,
};

fn content(seq: u64) -> EntryContent {
    EntryContent {
        seq,
        recorded_at: "2026-11-22T00:00:00.000000Z".to_owned(),
        actor: "user:bulk".to_owned(),
        action: "INFERENCE".to_owned(),
        resource: format!("result/{seq}"),
        outcome: "SUCCESS".to_owned(),
        context: "{}".to_owned(),
    }
}

/// Inserts entries `after+1 ..= after+count` chained from `head`, as raw multi-row INSERTs (what
/// another replica, or a restore, would leave); returns the new head hash.
async fn bulk_insert(
    database: &DatabaseConnection,
    after: u64,
    count: u64,
    mut head: Hash,
) -> Hash {
    let seqs: Vec<u64> = (after + 1..=after + count).collect();
    for rows in seqs.chunks(2000) {
        let values: Vec<String> = rows
            .iter()
            .map(|&seq| {
                let content = content(seq);
                let hash = chain::entry_hash(&head, &content);
                let row = format!(
                    "({seq}, '{}', '{}', '{}', '{}', '{}', '{}', '{}', '{}', 1)",
                    content.recorded_at,
                    content.actor,
                    content.action,
                    content.resource,
                    content.outcome,
                    content.context,
                    hex::encode(head),
                    hex::encode(hash)
                );
                head = hash;
                row
            })
            .collect();
        database
            .execute_unprepared(&format!(
                "INSERT INTO ledger_entries (seq, recorded_at, actor, action, resource, outcome, context, prev_hash, hash, encoding_version) VALUES {}",
                values.join(",")
            ))
            .await
            .expect("bulk insert");
    }
    head
}

fn event(index: usize) -> NewEvent {
    NewEvent {
        actor: "user:a".to_owned(),
        action: "INFERENCE".to_owned(),
        resource: format!("result/new-{index}"),
        outcome: "SUCCESS".to_owned(),
        context: "{}".to_owned(),
    }
}

struct Ledger {
    url: String,
    connection: DatabaseConnection,
    appender: LedgerAppender,
    checkpointer: Arc<Checkpointer>,
    public_key: Vec<u8>,
}

async fn prefilled(entries: u64) -> Ledger {
    let url = fresh_postgres_database().await;
    let connection = medai_audit::store::connect_and_migrate(&url)
        .await
        .expect("migrate");
    bulk_insert(&connection, 0, entries, chain::genesis_hash()).await;
    let signer = Arc::new(CheckpointSigner::load_or_create(&scratch_file("key")).expect("key"));
    let public_key = signer.public_key().to_vec();
    let anchor = Arc::new(ChainAnchor::new());
    let appender = LedgerAppender::start(connection.clone(), anchor.clone());
    let checkpointer = Arc::new(Checkpointer::new(connection.clone(), signer, anchor));
    Ledger {
        url,
        connection,
        appender,
        checkpointer,
        public_key,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_reads_only_the_entries_since_the_last_whatever_the_ledger_size() {
    for size in [1_000_u64, 60_000] {
        let ledger = prefilled(size).await;
        let first = ledger
            .checkpointer
            .create()
            .await
            .expect("first checkpoint");
        assert_eq!(
            (first.checkpoint.tree_size, first.entries_read),
            (size, size),
            "the first checkpoint of a process verifies what is stored"
        );
        for index in 0..10 {
            ledger.appender.append(event(index)).await.expect("append");
        }
        let next = ledger.checkpointer.create().await.expect("next checkpoint");
        assert_eq!(
            (next.checkpoint.tree_size, next.entries_read),
            (size + 10, 10),
            "at {size} entries a checkpoint reads only the 10 new ones"
        );
        let again = ledger.checkpointer.create().await.expect("no new entries");
        assert_eq!(
            (again.checkpoint, again.entries_read),
            (next.checkpoint.clone(), 0)
        );

        // Entries another replica appended are new entries too; and the appender still
        // appends on top of them (the chain it sees extends its own head).
        let head = medai_audit::anchor::decode_hash(&next.checkpoint.head_hash).expect("head");
        bulk_insert(&ledger.connection, size + 10, 5, head).await;
        let receipt = ledger.appender.append(event(99)).await.expect("append");
        assert_eq!(receipt.seq, size + 16);
        let last = ledger.checkpointer.create().await.expect("checkpoint");
        assert_eq!(
            (last.checkpoint.tree_size, last.entries_read),
            (size + 16, 6)
        );

        // Every checkpoint signed incrementally holds under a full verification from genesis.
        let report = medai_audit::verify::verify_ledger(&ledger.connection, &ledger.public_key)
            .await
            .expect("verify");
        assert_eq!(
            (
                report.first_bad_seq,
                report.entries_verified,
                report.checkpoints_verified
            ),
            (None, size + 16, 3),
            "{report:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_verified_entry_stops_the_next_checkpoint() {
    let ledger = prefilled(50).await;
    ledger.checkpointer.create().await.expect("checkpoint");
    ledger
        .connection
        .execute_unprepared(
            "SET session_replication_role = replica; \
             UPDATE ledger_entries SET hash = repeat('0', 64) WHERE seq = 50; \
             SET session_replication_role = DEFAULT;",
        )
        .await
        .expect("superuser");
    let error = ledger
        .checkpointer
        .create()
        .await
        .expect_err("the verified head changed");
    assert!(
        matches!(
            error,
            medai_audit::checkpoints::CheckpointError::BrokenChain { seq: 50, .. }
        ),
        "{error}"
    );
}

/// Whether some backend waits for a lock on `ledger_checkpoints`.
async fn a_backend_waits_on_the_checkpoints_table(database: &DatabaseConnection) -> bool {
    let row = database
        .query_one_raw(Statement::from_string(
            DatabaseBackend::Postgres,
            "SELECT count(*) AS n FROM pg_locks l JOIN pg_class c ON c.oid = l.relation \
             WHERE c.relname = 'ledger_checkpoints' AND NOT l.granted",
        ))
        .await
        .expect("pg_locks")
        .expect("row");
    row.try_get::<i64>("", "n").expect("n") > 0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_proceed_while_a_checkpoint_runs() {
    let ledger = prefilled(2_000).await;
    // Hold the checkpoint at its last step: another session locks the checkpoints table.
    let blocker = Database::connect(ledger.url.as_str())
        .await
        .expect("second connection");
    let holding = blocker.begin().await.expect("begin");
    holding
        .execute_unprepared("LOCK TABLE ledger_checkpoints IN ACCESS EXCLUSIVE MODE")
        .await
        .expect("lock");
    let checkpointer = ledger.checkpointer.clone();
    let checkpoint = tokio::spawn(async move { checkpointer.create().await });
    let waited = tokio::time::timeout(Duration::from_secs(60), async {
        while !a_backend_waits_on_the_checkpoints_table(&blocker).await {
            // Polls the server's lock table; the condition, not the pause, is what is awaited.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(
        waited.is_ok(),
        "the checkpoint reached the checkpoints table"
    );

    // The checkpoint is mid-way; appends must not wait for it.
    for index in 0..20 {
        let receipt = tokio::time::timeout(
            Duration::from_secs(30),
            ledger.appender.append(event(index)),
        )
        .await
        .expect("an append does not wait for the running checkpoint")
        .expect("append");
        assert_eq!(receipt.seq, 2_001 + index as u64);
    }
    assert!(
        !checkpoint.is_finished(),
        "the checkpoint was still running"
    );

    holding.rollback().await.expect("release");
    let outcome = checkpoint.await.expect("task").expect("checkpoint");
    assert_eq!(
        outcome.checkpoint.tree_size, 2_000,
        "the checkpoint covers the head it saw when it started"
    );
}
