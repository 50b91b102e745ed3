//! Issue 14: new results stored at the same time share one durable commit, on PostgreSQL and
//! on SQLite, with the idempotency semantics of a single insert, and a commit that fails fails
//! every caller in it.

use medai_inference::results::{ResultsStore, StoredResult};
use medai_runtime::errors::reason_of;
use sea_orm::ConnectionTrait;

/// The stable code an error of the store reaches a caller with.
fn code_of<T: std::fmt::Debug>(outcome: Result<T, impl Into<tonic::Status>>) -> String {
    let status: tonic::Status = outcome.expect_err("an error").into();
    reason_of(&status).unwrap_or_default()
}

fn new_result(index: u32, key: Option<&str>) -> StoredResult {
    StoredResult {
        result_id: uuid::Uuid::new_v4().to_string(),
        model_name: "light".to_owned(),
        model_version: "1".to_owned(),
        model_sha256: format!("{:064x}", 1),
        image_sha256: format!("{index:064x}"),
        patient_key: String::new(),
        probabilities_json: r#"[["bright",0.75],["dark",0.25]]"#.to_owned(),
        top_label: "bright".to_owned(),
        confidence: 0.75,
        decision_threshold: 0.5,
        decision: "ABOVE_THRESHOLD".to_owned(),
        latency_ms: 1.0,
        created_at: 1_700_000_000_000_000 + i64::from(index),
        status: "PRELIMINARY".to_owned(),
        idempotency_key: key.map(str::to_owned),
        intended_use: String::new(),
        content_sha256: String::new(),
        ledger_seq: 0,
        signer_subject: String::new(),
        signer_name: String::new(),
        signature_meaning: String::new(),
        signature_reason: String::new(),
        signed_at: 0,
        signature_ledger_seq: 0,
        content_hash_version: medai_inference::results::CONTENT_HASH_VERSION,
        normalized_entropy: 0.8,
        top2_margin: 0.5,
        temperature: 1.0,
        ood_score: 0.0,
        ood_threshold: 1.0,
        confidence_band_lower: None,
        confidence_band_upper: None,
        unusual_case: false,
        unusual_case_reasons_json: "[]".to_owned(),
        route: "ACTIVE".to_owned(),
        shadow_of_result_id: String::new(),
        shadow_agreement: String::new(),
    }
}

async fn postgres_store() -> ResultsStore {
    ResultsStore::connect(&medai_testkit::fresh_postgres_database().await)
        .await
        .expect("results store")
}

async fn sqlite_store(folder: &tempfile::TempDir) -> ResultsStore {
    let url = format!(
        "sqlite://{}?mode=rwc",
        folder.path().join("inference.sqlite").display()
    );
    ResultsStore::connect(&url).await.expect("results store")
}

/// Many concurrent inserts: fewer commits than rows, each caller answered with its own row,
/// and every answered row is in the store.
async fn concurrent_inserts_share_commits(store: &ResultsStore) {
    const ROWS: u32 = 96;
    let commits_before = store.result_commits();
    let inserts = (0..ROWS).map(|index| {
        let store = store.clone();
        let key = format!("{:064x}", 1000 + index);
        tokio::spawn(async move { store.insert(new_result(index, Some(&key))).await })
    });
    let answers = futures::future::join_all(inserts).await;
    let commits = store.result_commits() - commits_before;
    eprintln!("{ROWS} concurrent inserts in {commits} commits");
    for (index, answer) in answers.into_iter().enumerate() {
        let (stored, replayed) = answer.expect("task").expect("stored");
        assert!(!replayed);
        assert_eq!(stored.image_sha256, format!("{index:064x}"));
        let kept = store.get(&stored.result_id).await.expect("kept");
        assert_eq!(kept, stored, "an answered row is in the store as answered");
        assert_eq!(kept.content_sha256.len(), 64);
    }
    assert!(
        commits < u64::from(ROWS) / 2,
        "{ROWS} inserts took {commits} commits: not grouped"
    );
}

#[tokio::test]
async fn concurrent_results_share_a_commit_and_each_is_kept_on_postgres() {
    concurrent_inserts_share_commits(&postgres_store().await).await;
}

#[tokio::test]
async fn concurrent_results_share_a_commit_and_each_is_kept_on_sqlite() {
    let folder = tempfile::tempdir().expect("tempdir");
    concurrent_inserts_share_commits(&sqlite_store(&folder).await).await;
}

/// Rows with one key in one batch, and a row whose key an earlier commit stored: the first of
/// the batch is stored, a resend of the same request is its replay, another request under the
/// key is refused, exactly as when they come one by one.
async fn one_key_twice_in_a_batch(store: &ResultsStore) {
    let earlier_key = format!("{:064x}", 7);
    let (earlier, replayed) = store
        .insert(new_result(70, Some(&earlier_key)))
        .await
        .expect("stored");
    assert!(!replayed);

    let key = format!("{:064x}", 8);
    let first = new_result(1, Some(&key));
    let resend = new_result(1, Some(&key));
    let other_image = new_result(2, Some(&key));
    let other_version = StoredResult {
        model_version: "2".to_owned(),
        ..new_result(1, Some(&key))
    };
    let earlier_resend = new_result(70, Some(&earlier_key));
    let unkeyed = new_result(3, None);
    let first_id = first.result_id.clone();
    let commits_before = store.result_commits();
    // Polled together on this (single-threaded) runtime, they are all queued before the
    // writer runs: one batch.
    let answers = futures::future::join_all(
        [
            first,
            resend,
            other_image,
            other_version,
            earlier_resend,
            unkeyed,
        ]
        .map(|row| store.insert(row)),
    )
    .await;
    assert_eq!(
        store.result_commits() - commits_before,
        1,
        "the six rows went in one commit"
    );
    let mut answers = answers.into_iter();
    let (stored, replayed) = answers.next().unwrap().expect("first stored");
    assert_eq!(
        (stored.result_id.as_str(), replayed),
        (first_id.as_str(), false)
    );
    let (replay, replayed) = answers.next().unwrap().expect("resend replayed");
    assert_eq!(
        (replay.result_id.as_str(), replayed),
        (first_id.as_str(), true)
    );
    assert_eq!(replay, store.get(&first_id).await.expect("stored"));
    for refused in [answers.next().unwrap(), answers.next().unwrap()] {
        assert_eq!(
            code_of(refused),
            "IDEMPOTENCY_KEY_REUSED",
            "another request under a stored key is refused"
        );
    }
    let (replay, replayed) = answers.next().unwrap().expect("earlier key replayed");
    assert_eq!((replay, replayed), (earlier, true));
    let (unkeyed, replayed) = answers.next().unwrap().expect("unkeyed stored");
    assert!(!replayed);
    store.get(&unkeyed.result_id).await.expect("unkeyed kept");
    let (listed, _) = store
        .list(&medai_inference::results::ResultFilter::default())
        .await
        .expect("listed");
    assert_eq!(
        listed.len(),
        3,
        "the earlier row, the first of the key, the unkeyed one"
    );
}

#[tokio::test]
async fn one_idempotency_key_twice_in_one_commit_on_postgres() {
    one_key_twice_in_a_batch(&postgres_store().await).await;
}

#[tokio::test]
async fn one_idempotency_key_twice_in_one_commit_on_sqlite() {
    let folder = tempfile::tempdir().expect("tempdir");
    one_key_twice_in_a_batch(&sqlite_store(&folder).await).await;
}

/// A commit that fails (a deferred constraint refusing it at COMMIT, after every INSERT went
/// through) fails each of its callers with the stable store error, and none of its rows is
/// kept; the writer goes on serving once the database accepts rows again.
#[tokio::test]
async fn a_failing_commit_fails_every_caller_in_it() {
    let store = postgres_store().await;
    let connection = store.connection();
    connection
        .execute_unprepared(
            r#"
CREATE FUNCTION refuse_at_commit() RETURNS trigger AS $$
BEGIN
  RAISE EXCEPTION 'refused at commit';
END;
$$ LANGUAGE plpgsql;
CREATE CONSTRAINT TRIGGER refuse_at_commit AFTER INSERT ON inference_results
  DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION refuse_at_commit();
"#,
        )
        .await
        .expect("trigger");
    let rows: Vec<StoredResult> = (0..8)
        .map(|index| new_result(index, Some(&format!("{:064x}", 500 + index))))
        .collect();
    let ids: Vec<String> = rows.iter().map(|row| row.result_id.clone()).collect();
    let commits_before = store.result_commits();
    let answers = futures::future::join_all(rows.into_iter().map(|row| store.insert(row))).await;
    assert_eq!(store.result_commits() - commits_before, 1, "one batch");
    for answer in answers {
        assert_eq!(
            code_of(answer),
            "RESULTS_STORE_FAILED",
            "a caller of a failed commit is failed with the store's stable code"
        );
    }
    for id in &ids {
        assert_eq!(
            code_of(store.get(id).await),
            "RESULT_NOT_FOUND",
            "a failed commit keeps no row"
        );
    }
    connection
        .execute_unprepared("DROP TRIGGER refuse_at_commit ON inference_results")
        .await
        .expect("drop trigger");
    let (stored, _) = store
        .insert(new_result(9, Some(&format!("{:064x}", 500))))
        .await
        .expect("the writer goes on after a failed commit");
    store.get(&stored.result_id).await.expect("kept");
}

/// Issue 14: on PostgreSQL the delivery notes of a commit go in one statement whose own
/// transaction runs with `synchronous_commit` off (a note indexes a ledger record already
/// durable), while a result's commit keeps it on; the first seq of a result stands, a later
/// note of it and a note of no result are answered as before.
#[tokio::test]
async fn delivery_notes_commit_without_waiting_for_the_flush_and_results_wait_for_it() {
    let store = postgres_store().await;
    let connection = store.connection();
    connection
        .execute_unprepared(
            r#"
CREATE TABLE seen_commit_settings (operation text, synchronous_commit text);
CREATE FUNCTION see_commit_setting() RETURNS trigger AS $$
BEGIN
  INSERT INTO seen_commit_settings VALUES (TG_OP, current_setting('synchronous_commit'));
  RETURN NULL;
END;
$$ LANGUAGE plpgsql;
CREATE TRIGGER see_commit_setting AFTER INSERT OR UPDATE ON inference_results
  FOR EACH ROW EXECUTE FUNCTION see_commit_setting();
"#,
        )
        .await
        .expect("trigger");
    let (first, _) = store.insert(new_result(1, None)).await.expect("stored");
    let (second, _) = store.insert(new_result(2, None)).await.expect("stored");
    let notes = [
        (first.result_id.clone(), 7),
        (second.result_id.clone(), 8),
        (first.result_id.clone(), 9),
        (uuid::Uuid::new_v4().to_string(), 10),
    ];
    let answers = store.record_deliveries(&notes).await;
    let outcomes: Vec<Result<i64, String>> = answers
        .into_iter()
        .map(|answer| answer.map_err(|error| code_of::<()>(Err(error))))
        .collect();
    assert_eq!(
        outcomes,
        [Ok(7), Ok(8), Ok(7), Err("RESULT_NOT_FOUND".to_owned())]
    );
    assert_eq!(
        store.get(&first.result_id).await.expect("first").ledger_seq,
        7
    );
    assert_eq!(
        store
            .get(&second.result_id)
            .await
            .expect("second")
            .ledger_seq,
        8
    );
    let seen: Vec<(String, String)> = connection
        .query_all_raw(sea_orm::Statement::from_string(
            sea_orm::DatabaseBackend::Postgres,
            "SELECT operation, synchronous_commit FROM seen_commit_settings ORDER BY operation",
        ))
        .await
        .expect("seen")
        .iter()
        .map(|row| {
            (
                row.try_get::<String>("", "operation").expect("operation"),
                row.try_get::<String>("", "synchronous_commit")
                    .expect("setting"),
            )
        })
        .collect();
    let pair = |operation: &str, setting: &str| (operation.to_owned(), setting.to_owned());
    assert_eq!(
        seen,
        [
            pair("INSERT", "on"),
            pair("INSERT", "on"),
            pair("UPDATE", "off"),
            pair("UPDATE", "off"),
        ]
    );
}

/// `column` of `pg_stat_user_tables` for the results table (rows read by sequential scans,
/// rows updated, …), read once the counters have stopped moving (each backend reports its
/// share when it ends or goes idle).
async fn results_table_statistic(url: &str, column: &str) -> i64 {
    let reader = sea_orm::Database::connect(url).await.expect("connect");
    let read = || async {
        reader
            .query_one_raw(sea_orm::Statement::from_string(
                sea_orm::DatabaseBackend::Postgres,
                format!(
                    "SELECT {column} AS counted FROM pg_stat_user_tables \
                     WHERE relname = 'inference_results'"
                ),
            ))
            .await
            .expect("statistics")
            .expect("one row")
            .try_get::<i64>("", "counted")
            .expect(column)
    };
    let mut counted = read().await;
    for _ in 0..30 {
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        reader
            .execute_unprepared("SELECT pg_stat_clear_snapshot()")
            .await
            .expect("fresh statistics");
        let now = read().await;
        if now == counted {
            break;
        }
        counted = now;
    }
    counted
}

/// Issue 14 (found in a profile of the half-peak open loop, where PostgreSQL scanned the whole
/// results table for every batch of notes): the notes' statement is planned for the table as
/// it is, not as it was when a connection first ran it. A plan cached while the table held a
/// few rows (a sequential scan) would read every row of the grown table at each batch.
#[tokio::test]
async fn delivery_notes_find_their_rows_by_key_however_small_the_table_was_when_first_noted() {
    const GROWN_TO: i64 = 3_000;
    const BATCHES: u32 = 40;
    const NOTES_PER_BATCH: u32 = 3;
    let url = medai_testkit::fresh_postgres_database().await;
    let store = ResultsStore::connect(&url).await.expect("results store");
    // Batches of notes as a busy gateway sends them: a few results' at once (with one note a
    // batch PostgreSQL kept planning each run for its arguments and the scan did not show).
    let note_fresh_results = |batch: u32| {
        let store = store.clone();
        async move {
            let mut notes = Vec::new();
            for index in batch * NOTES_PER_BATCH..(batch + 1) * NOTES_PER_BATCH {
                let (stored, _) = store.insert(new_result(index, None)).await.expect("stored");
                notes.push((stored.result_id, i64::from(index)));
            }
            let answers = store.record_deliveries(&notes).await;
            for ((_, seq), answer) in notes.iter().zip(&answers) {
                assert_eq!(answer.as_ref().ok(), Some(seq));
            }
            notes.swap_remove(0).0
        }
    };
    // While the table is tiny (every connection's statements are prepared and, after a few
    // runs, their plans cached).
    let mut model_row = String::new();
    for batch in 0..BATCHES {
        model_row = note_fresh_results(batch).await;
    }
    // The table grows.
    store
        .connection()
        .execute_unprepared(&format!(
            "INSERT INTO inference_results SELECT (jsonb_populate_record(NULL::inference_results, \
             to_jsonb(r) || jsonb_build_object('result_id', 'grown-' || g, 'idempotency_key', \
             NULL))).* FROM inference_results r, generate_series(1, {GROWN_TO}) g \
             WHERE r.result_id = '{model_row}'"
        ))
        .await
        .expect("grow the table");
    let before = results_table_statistic(&url, "seq_tup_read").await;
    let fetched_before = results_table_statistic(&url, "idx_tup_fetch").await;
    for batch in BATCHES..2 * BATCHES {
        note_fresh_results(batch).await;
    }
    store.close().await.expect("close the pools");
    let read = results_table_statistic(&url, "seq_tup_read").await - before;
    assert!(
        read < GROWN_TO,
        "{BATCHES} batches of notes on a table of {GROWN_TO} rows read {read} rows sequentially"
    );
    // Nor through a whole index (a hash join's full index scan reads every row by index).
    let fetched = results_table_statistic(&url, "idx_tup_fetch").await - fetched_before;
    assert!(
        fetched < GROWN_TO,
        "{BATCHES} batches of notes on a table of {GROWN_TO} rows fetched {fetched} rows by index"
    );
}

/// Issue 14 (the notes' statement read 12 blocks a row in a profile at concurrency 64): a
/// result's delivery note is written beside its row on the same page (a heap-only tuple), not
/// as a new row version on another page with a new entry in each of the table's five indexes.
/// The results table leaves room on its pages for the notes of the rows stored there.
#[tokio::test]
async fn delivery_notes_update_results_in_place_without_new_index_entries() {
    const BATCHES: u32 = 20;
    const RESULTS_PER_BATCH: u32 = 16;
    let url = medai_testkit::fresh_postgres_database().await;
    let store = ResultsStore::connect(&url).await.expect("results store");
    let updated_before = results_table_statistic(&url, "n_tup_upd").await;
    let in_place_before = results_table_statistic(&url, "n_tup_hot_upd").await;
    for batch in 0..BATCHES {
        // A group commit's worth of results stored at once, then their notes, as the gateway
        // sends them.
        let indexes = batch * RESULTS_PER_BATCH..(batch + 1) * RESULTS_PER_BATCH;
        let stored = futures::future::join_all(indexes.clone().map(|index| {
            let store = store.clone();
            async move { store.insert(new_result(index, None)).await }
        }))
        .await;
        let notes: Vec<(String, i64)> = stored
            .into_iter()
            .zip(indexes)
            .map(|(stored, index)| (stored.expect("stored").0.result_id, i64::from(index) + 1))
            .collect();
        let answers = store.record_deliveries(&notes).await;
        for ((_, seq), answer) in notes.iter().zip(&answers) {
            assert_eq!(answer.as_ref().ok(), Some(seq));
        }
    }
    store.close().await.expect("close the pools");
    let updated = results_table_statistic(&url, "n_tup_upd").await - updated_before;
    let in_place = results_table_statistic(&url, "n_tup_hot_upd").await - in_place_before;
    assert_eq!(updated, i64::from(BATCHES * RESULTS_PER_BATCH));
    assert!(
        in_place * 10 >= updated * 9,
        "{in_place} of {updated} delivery notes were written in place"
    );
}
