//! The results store: one row per prediction made for the gateway, preliminary until a
//! clinician signs it. PostgreSQL in production, SQLite as the embedded default.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use sea_orm::{
    ColumnTrait, Condition, ConnectionTrait, DatabaseConnection, DbErr, EntityTrait, QueryFilter,
    QueryOrder, QuerySelect, SqlErr, TransactionTrait,
};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio::sync::{mpsc, oneshot};

use crate::error::InferenceError;

pub mod result_row {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "inference_results")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub result_id: String,
        pub model_name: String,
        pub model_version: String,
        pub model_sha256: String,
        pub image_sha256: String,
        /// Keyed hash from validation; never a patient identifier.
        pub patient_key: String,
        /// `[["label", probability], …]` in the model's label order.
        #[sea_orm(column_type = "Text")]
        pub probabilities_json: String,
        pub top_label: String,
        pub confidence: f64,
        pub decision_threshold: f64,
        pub decision: String,
        pub latency_ms: f64,
        /// Unix microseconds, UTC.
        pub created_at: i64,
        /// PRELIMINARY or SIGNED.
        pub status: String,
        /// Hex SHA-256 naming one logical request; repeated requests get this row back.
        #[sea_orm(unique)]
        pub idempotency_key: Option<String>,
        pub intended_use: String,
        /// See [`super::content_sha256`]; computed when the row is written.
        pub content_sha256: String,
        /// The ledger entry that recorded the delivery; 0 until noted.
        pub ledger_seq: i64,
        pub signer_subject: String,
        pub signer_name: String,
        pub signature_meaning: String,
        pub signature_reason: String,
        /// Unix microseconds; 0 until signed.
        pub signed_at: i64,
        pub signature_ledger_seq: i64,
        /// Which content hash rule `content_sha256` follows: 1 before uncertainty and flags
        /// were kept, 2 since (see [`super::content_sha256`]).
        pub content_hash_version: i32,
        /// Uncertainty (issue 18); see [`crate::decision_support`].
        pub normalized_entropy: f64,
        pub top2_margin: f64,
        pub temperature: f64,
        pub ood_score: f64,
        pub ood_threshold: f64,
        pub confidence_band_lower: Option<f64>,
        pub confidence_band_upper: Option<f64>,
        /// The unusual-case flag and its reasons (`["MODALITY_OUTSIDE_INTENDED_USE", …]`).
        pub unusual_case: bool,
        #[sea_orm(column_type = "Text")]
        pub unusual_case_reasons_json: String,
        /// ACTIVE, CANARY or SHADOW: which role of the model produced the row (rule 3).
        pub route: String,
        /// For a SHADOW row: the delivered result it ran beside, and AGREES or DISAGREES on the
        /// top label; empty otherwise.
        pub shadow_of_result_id: String,
        pub shadow_agreement: String,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// One delivered explanation of a result; rows are only ever added.
pub mod explanation_row {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "inference_explanations")]
    pub struct Model {
        /// The ledger entry that recorded the explanation's delivery.
        #[sea_orm(primary_key, auto_increment = false)]
        pub ledger_seq: i64,
        pub result_id: String,
        pub grid_rows: i32,
        pub grid_columns: i32,
        pub heatmap_sha256: String,
        /// Unix microseconds, UTC.
        pub created_at: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

pub use explanation_row::Model as StoredExplanation;

/// The content hash rule results are stored with now.
pub const CONTENT_HASH_VERSION: i32 = 3;

pub use result_row::Model as StoredResult;

/// What a signer supplies; the store adds it to the row in one conditional update.
#[derive(Clone, Debug, Default)]
pub struct Signature {
    pub signer_subject: String,
    pub signer_name: String,
    pub meaning: String,
    pub reason: String,
    /// Unix microseconds.
    pub signed_at: i64,
    pub ledger_seq: i64,
}

/// The content hash recomputed from a result as the API shows it, so a gateway, an auditor or
/// a test can check a signature's binding without the database.
pub fn content_sha256_of_message(result: &medai_proto::inference::v1::StoredResult) -> String {
    let probabilities: Vec<(String, f32)> = result
        .probabilities
        .iter()
        .map(|entry| (entry.label.clone(), entry.probability))
        .collect();
    let row = StoredResult {
        result_id: result.result_id.clone(),
        model_name: result.model_name.clone(),
        model_version: result.model_version.clone(),
        model_sha256: result.model_sha256.clone(),
        image_sha256: result.image_sha256.clone(),
        patient_key: result.patient_key.clone(),
        probabilities_json: serde_json::to_string(&probabilities).unwrap_or_default(),
        top_label: result.top_label.clone(),
        confidence: f64::from(result.confidence),
        decision_threshold: f64::from(result.decision_threshold),
        decision: result.decision.clone(),
        latency_ms: result.latency_ms,
        created_at: parse_timestamp(&result.created_at).unwrap_or_default(),
        status: result.status.clone(),
        idempotency_key: None,
        intended_use: result.intended_use.clone(),
        content_sha256: String::new(),
        ledger_seq: 0,
        signer_subject: String::new(),
        signer_name: String::new(),
        signature_meaning: String::new(),
        signature_reason: String::new(),
        signed_at: 0,
        signature_ledger_seq: 0,
        content_hash_version: i32::try_from(result.content_hash_version.max(1)).unwrap_or(1),
        normalized_entropy: 0.0,
        top2_margin: 0.0,
        temperature: 1.0,
        ood_score: 0.0,
        ood_threshold: 0.0,
        confidence_band_lower: None,
        confidence_band_upper: None,
        unusual_case: false,
        unusual_case_reasons_json: String::new(),
        route: result.route.clone(),
        shadow_of_result_id: result.shadow_of_result_id.clone(),
        shadow_agreement: result.shadow_agreement.clone(),
    };
    let row = StoredResult {
        unusual_case: result
            .unusual_case
            .as_ref()
            .is_some_and(|flag| flag.flagged),
        unusual_case_reasons_json: serde_json::to_string(
            &result
                .unusual_case
                .as_ref()
                .map(|flag| flag.reasons.clone())
                .unwrap_or_default(),
        )
        .unwrap_or_default(),
        ..match &result.uncertainty {
            Some(figures) => StoredResult {
                normalized_entropy: f64::from(figures.normalized_entropy),
                top2_margin: f64::from(figures.top2_margin),
                temperature: f64::from(figures.temperature),
                ood_score: f64::from(figures.ood_score),
                ood_threshold: f64::from(figures.ood_threshold),
                confidence_band_lower: figures.confidence_band.map(|band| f64::from(band.lower)),
                confidence_band_upper: figures.confidence_band.map(|band| f64::from(band.upper)),
                ..row
            },
            None => row,
        }
    };
    content_sha256(&row)
}

/// SHA-256 over a result's content, each field length-prefixed (u64 big-endian) in this
/// order: result_id, model_name, model_version, model_sha256, image_sha256, patient_key,
/// probabilities_json, top_label, decision, then confidence and decision_threshold as f64 and
/// created_at as i64, big-endian. Status, delivery and signature fields are not content.
///
/// Rule 2 (`content_hash_version` 2, every result stored since issue 18) goes on with the
/// decision support figures: normalized_entropy, top2_margin, temperature, ood_score and
/// ood_threshold as big-endian f64; one byte 1 and the confidence band's lower and upper as
/// f64, or one byte 0 when there is no band; one byte 1 or 0 for the unusual-case flag; and
/// unusual_case_reasons_json (the reasons as a compact JSON array) length-prefixed.
///
/// Rule 3 (`content_hash_version` 3, every result stored since model rollout) goes on with the
/// routing decision: route (ACTIVE, CANARY or SHADOW), shadow_of_result_id and
/// shadow_agreement, each length-prefixed (empty for a delivered result).
pub fn content_sha256(result: &StoredResult) -> String {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    for text in [
        &result.result_id,
        &result.model_name,
        &result.model_version,
        &result.model_sha256,
        &result.image_sha256,
        &result.patient_key,
        &result.probabilities_json,
        &result.top_label,
        &result.decision,
    ] {
        hasher.update((text.len() as u64).to_be_bytes());
        hasher.update(text.as_bytes());
    }
    hasher.update(result.confidence.to_be_bytes());
    hasher.update(result.decision_threshold.to_be_bytes());
    hasher.update(result.created_at.to_be_bytes());
    if result.content_hash_version >= 2 {
        for figure in [
            result.normalized_entropy,
            result.top2_margin,
            result.temperature,
            result.ood_score,
            result.ood_threshold,
        ] {
            hasher.update(figure.to_be_bytes());
        }
        match (result.confidence_band_lower, result.confidence_band_upper) {
            (Some(lower), Some(upper)) => {
                hasher.update([1u8]);
                hasher.update(lower.to_be_bytes());
                hasher.update(upper.to_be_bytes());
            }
            _ => hasher.update([0u8]),
        }
        hasher.update([u8::from(result.unusual_case)]);
        let reasons = &result.unusual_case_reasons_json;
        hasher.update((reasons.len() as u64).to_be_bytes());
        hasher.update(reasons.as_bytes());
    }
    if result.content_hash_version >= 3 {
        for text in [
            &result.route,
            &result.shadow_of_result_id,
            &result.shadow_agreement,
        ] {
            hasher.update((text.len() as u64).to_be_bytes());
            hasher.update(text.as_bytes());
        }
    }
    hex::encode(hasher.finalize())
}

/// What a retried request names, to be matched against the result its key stored.
#[derive(Clone, Copy, Debug)]
pub struct RetryFacts<'a> {
    pub image_sha256: &'a str,
    pub model_name: &'a str,
    /// Empty asks for the active version, which the stored result recorded as it resolved.
    pub model_version: &'a str,
}

impl RetryFacts<'_> {
    /// The same image (by SHA-256), the same model and, if the retry names one, the same
    /// version: only then is the stored result the answer to this request.
    pub fn matches(&self, stored: &StoredResult) -> bool {
        self.image_sha256 == stored.image_sha256
            && self.model_name == stored.model_name
            && (self.model_version.is_empty() || self.model_version == stored.model_version)
    }
}

pub const PRELIMINARY: &str = "PRELIMINARY";
pub const SIGNED: &str = "SIGNED";
const DEFAULT_PAGE: u64 = 50;
const MAX_PAGE: u64 = 500;

/// Filters for [`ResultsStore::list`]; empty fields do not filter.
#[derive(Clone, Debug, Default)]
pub struct ResultFilter {
    pub model_name: String,
    pub status: String,
    pub patient_key: String,
    /// Unix microseconds, inclusive.
    pub created_from: Option<i64>,
    /// Unix microseconds, exclusive.
    pub created_until: Option<i64>,
    pub page_size: u32,
    pub page_token: String,
    pub delivered_only: bool,
}

#[derive(Clone)]
pub struct ResultsStore {
    connection: DatabaseConnection,
    /// The delivery notes' writer's (the same as `connection` on SQLite).
    notes_connection: DatabaseConnection,
    delivery_notes: mpsc::Sender<PendingNote>,
    note_commits: Arc<AtomicU64>,
    new_results: mpsc::Sender<PendingResult>,
    result_commits: Arc<AtomicU64>,
}

/// A new result in the writer's hands: its commit's outcome, once known.
pub struct HandedOver {
    answered: oneshot::Receiver<Result<(StoredResult, bool), InferenceError>>,
}

impl HandedOver {
    /// The row as stored (or the stored row its idempotency key names, with `true`), once its
    /// commit is made; [`InferenceError::Store`] if the commit failed or the writer stopped.
    pub async fn committed(self) -> Result<(StoredResult, bool), InferenceError> {
        self.answered.await.unwrap_or(Err(InferenceError::Store))
    }
}

/// A new result waiting for the writer's next commit, and where its answer goes.
struct PendingResult {
    row: StoredResult,
    answer: oneshot::Sender<Result<(StoredResult, bool), InferenceError>>,
}

/// Most new results one commit takes (38 bound values each, well under both databases'
/// limits on one statement's parameters).
const MAX_RESULTS_PER_COMMIT: usize = 128;

/// Writes new results as a group commit, like [`write_delivery_notes`]: a result that finds
/// the writer idle is committed at once, on its own; results that arrive while a commit runs
/// are stored together by the next one (one multi-row INSERT, one durable commit). Each
/// caller is answered only after the commit that holds its row (or the stored row its
/// idempotency key names), so a result answered is a result kept; a batch that fails fails
/// every caller in it.
async fn write_new_results(
    connection: DatabaseConnection,
    mut pending: mpsc::Receiver<PendingResult>,
    commits: Arc<AtomicU64>,
) {
    let mut batch = Vec::with_capacity(MAX_RESULTS_PER_COMMIT);
    let mut kept = medai_storage::KeptConnection::for_writer_on(&connection);
    while medai_storage::KeptConnection::await_work(
        kept.as_mut(),
        pending.recv_many(&mut batch, MAX_RESULTS_PER_COMMIT),
    )
    .await
        > 0
    {
        let written = insert_results(&connection, kept.as_mut(), &batch).await;
        commits.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("medai_inference_results_commits_total", "write" => "result")
            .increment(1);
        match written {
            Ok(answers) => {
                for (result, answer) in batch.drain(..).zip(answers) {
                    let _gone = result.answer.send(answer);
                }
            }
            Err(error) => {
                tracing::error!(error = %error, results = batch.len(), "results not stored");
                for result in batch.drain(..) {
                    let _gone = result.answer.send(Err(InferenceError::Store));
                }
            }
        }
    }
}

/// One statement storing every result of `batch` whose idempotency key is not stored yet
/// (the unique key decides, also against other replicas and against an earlier row of the
/// same batch); returns, per result, what [`ResultsStore::insert`] answers. The INSERT commits
/// on its own (one statement is atomic): no BEGIN and COMMIT round trips around it (issue 14).
/// A key it did not store belongs to a row already committed, which the look-up then reads.
async fn insert_results(
    connection: &DatabaseConnection,
    kept: Option<&mut medai_storage::KeptConnection>,
    batch: &[PendingResult],
) -> Result<Vec<Result<(StoredResult, bool), InferenceError>>, DbErr> {
    use result_row::Column;
    use sea_orm::QueryTrait;
    use sea_orm::sea_query::OnConflict;
    use std::collections::{HashMap, HashSet};
    // Only the first row of the batch with a given key is offered; a later one is answered
    // from whatever that key stores once the INSERT has run.
    let mut keys_offered = HashSet::new();
    let offered: Vec<result_row::ActiveModel> = batch
        .iter()
        .filter(|pending| {
            pending
                .row
                .idempotency_key
                .as_deref()
                .is_none_or(|key| keys_offered.insert(key))
        })
        .map(|pending| pending.row.clone().into())
        .collect();
    let mut statement = result_row::Entity::insert_many(offered).into_query();
    statement
        .on_conflict(
            OnConflict::column(Column::IdempotencyKey)
                .do_nothing()
                .to_owned(),
        )
        .returning_col(Column::ResultId);
    let inserted: HashSet<String> = match kept {
        Some(kept) => {
            use sea_orm::sqlx::Row;
            kept.fetch_all(&statement)
                .await
                .and_then(|rows| {
                    rows.iter()
                        .map(|row| row.try_get::<String, _>("result_id"))
                        .collect()
                })
                .map_err(medai_storage::statement_error)?
        }
        None => connection
            .query_all(&statement)
            .await?
            .iter()
            .map(|row| row.try_get::<String>("", "result_id"))
            .collect::<Result<_, _>>()?,
    };
    let mut stored_under: HashMap<String, StoredResult> = HashMap::new();
    let missing: Vec<&str> = batch
        .iter()
        .filter(|pending| !inserted.contains(&pending.row.result_id))
        .filter_map(|pending| pending.row.idempotency_key.as_deref())
        .collect();
    if !missing.is_empty() {
        for stored in result_row::Entity::find()
            .filter(Column::IdempotencyKey.is_in(missing))
            .all(connection)
            .await?
        {
            if let Some(key) = stored.idempotency_key.clone() {
                stored_under.insert(key, stored);
            }
        }
    }
    Ok(batch
        .iter()
        .map(|pending| {
            let result = &pending.row;
            if inserted.contains(&result.result_id) {
                return Ok((result.clone(), false));
            }
            let Some(stored) = result
                .idempotency_key
                .as_deref()
                .and_then(|key| stored_under.get(key))
            else {
                // Not stored and no key to answer from: its result id was taken.
                tracing::error!("result not stored: its id is stored already");
                return Err(InferenceError::Store);
            };
            let retry = RetryFacts {
                image_sha256: &result.image_sha256,
                model_name: &result.model_name,
                model_version: &result.model_version,
            };
            if retry.matches(stored) {
                Ok((stored.clone(), true))
            } else {
                Err(InferenceError::IdempotencyKeyReused)
            }
        })
        .collect())
}

/// A delivery note waiting for the writer's next commit, and where its answer goes.
struct PendingNote {
    result_id: String,
    seq: i64,
    answer: oneshot::Sender<Result<i64, InferenceError>>,
}

/// Most notes one commit takes.
const MAX_NOTES_PER_COMMIT: usize = 256;

/// Writes delivery notes as a group commit: a note that finds the writer idle is committed at
/// once, on its own; notes that arrive while a commit runs wait for it and are committed
/// together by the next one (one transaction). Every caller is answered only after the commit
/// that holds its note, so a note answered is a note every reader sees.
///
/// On PostgreSQL the commit does not wait for its WAL to reach the disk (`synchronous_commit`
/// off in the notes' own session, [`NOTE_SESSION_SETTINGS`]; the WAL writer flushes it within
/// `wal_writer_delay`): a note is an index of a ledger record that is durable already, and a
/// note lost with the database is the state a gateway killed between the record and the note
/// leaves, which every read of the result heals from the ledger. Issue 14: at concurrency 1
/// the note's own flush was a third fsync per prediction, queued ahead of the next
/// prediction's two durable commits.
async fn write_delivery_notes(
    connection: DatabaseConnection,
    mut pending: mpsc::Receiver<PendingNote>,
    commits: Arc<AtomicU64>,
) {
    let mut batch = Vec::with_capacity(MAX_NOTES_PER_COMMIT);
    let mut kept = medai_storage::KeptConnection::for_writer_on(&connection);
    while medai_storage::KeptConnection::await_work(
        kept.as_mut(),
        pending.recv_many(&mut batch, MAX_NOTES_PER_COMMIT),
    )
    .await
        > 0
    {
        let notes: Vec<(&str, i64)> = batch
            .iter()
            .map(|note| (note.result_id.as_str(), note.seq))
            .collect();
        let written = note_deliveries(&connection, kept.as_mut(), &notes).await;
        commits.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("medai_inference_results_commits_total", "write" => "delivery_notes")
            .increment(1);
        metrics::counter!("medai_inference_delivery_notes_total").increment(notes.len() as u64);
        drop(notes);
        match written {
            Ok(answers) => {
                for (note, answer) in batch.drain(..).zip(answers) {
                    let _gone = note.answer.send(answer);
                }
            }
            Err(error) => {
                tracing::error!(error = %error, notes = batch.len(), "delivery notes not written");
                for note in batch.drain(..) {
                    let _gone = note.answer.send(Err(InferenceError::Store));
                }
            }
        }
    }
}

/// Notes every delivery of `notes` (each unless one is noted already) in one commit; returns,
/// per note, the seq that stands.
async fn note_deliveries(
    connection: &DatabaseConnection,
    kept: Option<&mut medai_storage::KeptConnection>,
    notes: &[(&str, i64)],
) -> Result<Vec<Result<i64, InferenceError>>, DbErr> {
    if let Some(kept) = kept {
        return note_deliveries_in_one_statement(connection, kept, notes).await;
    }
    use result_row::Column;
    let transaction = connection.begin().await?;
    let mut answers = Vec::with_capacity(notes.len());
    for (result_id, seq) in notes {
        let updated = result_row::Entity::update_many()
            .col_expr(Column::LedgerSeq, sea_orm::sea_query::Expr::value(*seq))
            .filter(Column::ResultId.eq(*result_id))
            .filter(Column::LedgerSeq.eq(0))
            .filter(Column::Status.eq(PRELIMINARY))
            .exec(&transaction)
            .await?;
        if updated.rows_affected == 1 {
            answers.push(Ok(*seq));
            continue;
        }
        let standing = stored_delivery(&transaction, result_id).await?;
        answers
            .push(standing.ok_or_else(|| InferenceError::ResultNotFound((*result_id).to_owned())));
    }
    transaction.commit().await?;
    Ok(answers)
}

/// The notes of one commit as one statement on PostgreSQL, committing on its own on the
/// notes' own connection ([`NOTE_SESSION_SETTINGS`]): one round trip, where BEGIN, SET LOCAL,
/// an UPDATE per note and COMMIT took one each (issue 14). Only the first note of a result in
/// the batch is offered, so the first seq stands as it did when the notes were applied one
/// after the other.
const NOTE_DELIVERIES: &str = "UPDATE inference_results AS r SET ledger_seq = n.seq \
    FROM unnest($1::text[], $2::int8[]) AS n(result_id, seq) \
    WHERE r.result_id = n.result_id AND r.ledger_seq = 0 AND r.status = $3 \
    RETURNING r.result_id";

/// The session of the connection that writes delivery notes on PostgreSQL, which runs nothing
/// else:
/// - its commits do not wait for the WAL flush (see [`write_delivery_notes`]);
/// - its statements are planned once per connection (a generic plan, kept), and the only plan
///   the planner may make for the notes' statement finds each note's row by key: no sequential
///   scan, hash or merge join, or materialised inner side, any of which may be the cheapest on a
///   table of a few rows and reads the whole table once it has grown (the plan is kept).
///   Issue 14: kept prepared on a shared connection, the cached plan was a sequential scan of
///   the whole grown table at each batch; planned afresh at each run instead, the planning cost
///   0.24 ms a run, 60 % of the statement's time at concurrency 1 (`pg_stat_statements` in
///   `versus_monolith`).
pub const NOTE_SESSION_SETTINGS: [(&str, &str); 6] = [
    ("synchronous_commit", "off"),
    ("plan_cache_mode", "force_generic_plan"),
    ("enable_seqscan", "off"),
    ("enable_hashjoin", "off"),
    ("enable_mergejoin", "off"),
    ("enable_material", "off"),
];

async fn note_deliveries_in_one_statement(
    connection: &DatabaseConnection,
    kept: &mut medai_storage::KeptConnection,
    notes: &[(&str, i64)],
) -> Result<Vec<Result<i64, InferenceError>>, DbErr> {
    use std::collections::{HashMap, HashSet};
    let mut offered_ids = HashSet::new();
    let (ids, seqs): (Vec<&str>, Vec<i64>) = notes
        .iter()
        .filter(|(result_id, _)| offered_ids.insert(*result_id))
        .copied()
        .unzip();
    // Prepared and kept on the notes' connection, whose session plans no sequential scan
    // where the key's index serves (see [`NOTE_SESSION_SETTINGS`]).
    let outcome = sea_orm::sqlx::query_scalar::<_, String>(NOTE_DELIVERIES)
        .bind(&ids)
        .bind(&seqs)
        .bind(PRELIMINARY)
        .fetch_all(
            kept.connection()
                .await
                .map_err(medai_storage::statement_error)?,
        )
        .await;
    let noted: HashSet<String> = kept
        .outcome(outcome)
        .map_err(medai_storage::statement_error)?
        .into_iter()
        .collect();
    // A note its UPDATE did not take (noted already, a later note of the same result, or no
    // such result) is answered with the seq that stands.
    let mut first_of = HashSet::new();
    let taken: Vec<bool> = notes
        .iter()
        .map(|(result_id, _)| first_of.insert(*result_id) && noted.contains(*result_id))
        .collect();
    let unnoted: Vec<&str> = notes
        .iter()
        .zip(&taken)
        .filter(|(_, taken)| !**taken)
        .map(|((result_id, _), _)| *result_id)
        .collect();
    let mut standing: HashMap<String, i64> = HashMap::new();
    if !unnoted.is_empty() {
        // The notes' pool holds one connection: the one kept.
        kept.give_back();
        for row in result_row::Entity::find()
            .filter(result_row::Column::ResultId.is_in(unnoted))
            .all(connection)
            .await?
        {
            standing.insert(row.result_id, row.ledger_seq);
        }
    }
    Ok(notes
        .iter()
        .zip(taken)
        .map(|((result_id, seq), taken)| {
            if taken {
                return Ok(*seq);
            }
            standing
                .get(*result_id)
                .copied()
                .ok_or_else(|| InferenceError::ResultNotFound((*result_id).to_owned()))
        })
        .collect())
}

async fn stored_delivery(
    connection: &impl ConnectionTrait,
    result_id: &str,
) -> Result<Option<i64>, DbErr> {
    Ok(result_row::Entity::find_by_id(result_id.to_owned())
        .one(connection)
        .await?
        .map(|row| row.ledger_seq))
}

impl ResultsStore {
    pub async fn connect(database_url: &str) -> Result<Self, DbErr> {
        Self::connect_with(database_url, true).await
    }

    /// Connects; migrates first when `run_migrations`, else refuses a schema that lacks a
    /// migration (see `medai_storage::prepare_schema`).
    pub async fn connect_with(database_url: &str, run_migrations: bool) -> Result<Self, DbErr> {
        let connection = medai_storage::connect(database_url).await?;
        medai_storage::prepare_schema::<Migrator>(&connection, run_migrations).await?;
        // One connection of its own for the notes' writer on PostgreSQL (one statement at a
        // time), with the session its statement needs (see [`NOTE_SESSION_SETTINGS`]).
        let notes_connection =
            if connection.get_database_backend() == sea_orm::DatabaseBackend::Postgres {
                medai_storage::connect_with_max_connections(
                    &medai_storage::with_session_settings(database_url, &NOTE_SESSION_SETTINGS),
                    1,
                )
                .await?
            } else {
                connection.clone()
            };
        let (delivery_notes, pending) = mpsc::channel(4 * MAX_NOTES_PER_COMMIT);
        let note_commits = Arc::new(AtomicU64::new(0));
        // Ends when the last clone of this store is dropped.
        tokio::spawn(write_delivery_notes(
            notes_connection.clone(),
            pending,
            note_commits.clone(),
        ));
        let (new_results, pending) = mpsc::channel(4 * MAX_RESULTS_PER_COMMIT);
        let result_commits = Arc::new(AtomicU64::new(0));
        tokio::spawn(write_new_results(
            connection.clone(),
            pending,
            result_commits.clone(),
        ));
        Ok(Self {
            connection,
            notes_connection,
            delivery_notes,
            note_commits,
            new_results,
            result_commits,
        })
    }

    /// Commits the new-result writer made so far (each holds one or more results).
    pub fn result_commits(&self) -> u64 {
        self.result_commits.load(Ordering::Relaxed)
    }

    /// Commits the delivery-note writer made so far (each holds one or more notes).
    pub fn delivery_note_commits(&self) -> u64 {
        self.note_commits.load(Ordering::Relaxed)
    }

    /// `medai-inference --migrate`: brings the schema up to date and closes the connection.
    pub async fn migrate(database_url: String) -> Result<(), DbErr> {
        Self::connect(&database_url).await?.close().await
    }

    /// Closes the store's connections (its writers then fail what they are still given).
    pub async fn close(self) -> Result<(), DbErr> {
        self.notes_connection.close_by_ref().await?;
        self.connection.close().await
    }

    /// The connection, for the lifecycle store that shares this database and its migrations.
    pub fn connection(&self) -> DatabaseConnection {
        self.connection.clone()
    }

    /// Stores a new result (its content hash is computed here) and answers once it is
    /// committed; results stored at the same time share a commit (see [`write_new_results`]).
    /// A result whose idempotency key is already stored is not written (the unique key decides
    /// between racing writers, on every replica): the stored one is returned with `true` if it
    /// answers the same image, model and version, and [`InferenceError::IdempotencyKeyReused`]
    /// otherwise.
    pub async fn insert(
        &self,
        result: StoredResult,
    ) -> Result<(StoredResult, bool), InferenceError> {
        self.hand_over(result).await?.committed().await
    }

    /// Hands a new result to the writer (its content hash is computed here) without waiting
    /// for its commit: [`HandedOver::committed`] answers as [`Self::insert`] does. Lets a
    /// caller answer with the prediction while its row commits (issue 14), and tell the row's
    /// outcome after.
    pub async fn hand_over(&self, mut result: StoredResult) -> Result<HandedOver, InferenceError> {
        result.content_sha256 = content_sha256(&result);
        let (answer, answered) = oneshot::channel();
        let pending = PendingResult {
            row: result,
            answer,
        };
        if self.new_results.send(pending).await.is_err() {
            tracing::error!("the results writer has stopped");
            return Err(InferenceError::Store);
        }
        Ok(HandedOver { answered })
    }

    /// The stored answer to a retry: the result stored under `key`, if any, provided it
    /// answered the same request; a key reused for another request is refused.
    pub async fn find_retry(
        &self,
        key: &str,
        retry: RetryFacts<'_>,
    ) -> Result<Option<StoredResult>, InferenceError> {
        match self.find_by_idempotency_key(key).await? {
            Some(stored) if !retry.matches(&stored) => Err(InferenceError::IdempotencyKeyReused),
            found => Ok(found),
        }
    }

    pub async fn find_by_idempotency_key(
        &self,
        key: &str,
    ) -> Result<Option<StoredResult>, InferenceError> {
        result_row::Entity::find()
            .filter(result_row::Column::IdempotencyKey.eq(key))
            .one(&self.connection)
            .await
            .map_err(store_error)
    }

    /// Notes the ledger entry of the delivery, unless one is noted already; returns the seq
    /// that stands, once it is committed. Notes made at the same time share a commit (see
    /// [`write_delivery_notes`]).
    pub async fn record_delivery(&self, result_id: &str, seq: i64) -> Result<i64, InferenceError> {
        let (answer, answered) = oneshot::channel();
        let note = PendingNote {
            result_id: result_id.to_owned(),
            seq,
            answer,
        };
        if self.delivery_notes.send(note).await.is_err() {
            tracing::error!("the delivery-note writer has stopped");
            return Err(InferenceError::Store);
        }
        answered.await.unwrap_or(Err(InferenceError::Store))
    }

    /// Notes many deliveries (see [`Self::record_delivery`]), all queued for the writer at
    /// once so they share its next commit; answers per note, in order.
    pub async fn record_deliveries(
        &self,
        notes: &[(String, i64)],
    ) -> Vec<Result<i64, InferenceError>> {
        let mut answers = Vec::with_capacity(notes.len());
        for (result_id, seq) in notes {
            let (answer, answered) = oneshot::channel();
            let note = PendingNote {
                result_id: result_id.clone(),
                seq: *seq,
                answer,
            };
            if self.delivery_notes.send(note).await.is_err() {
                tracing::error!("the delivery-note writer has stopped");
                answers.push(None);
            } else {
                answers.push(Some(answered));
            }
        }
        let mut noted = Vec::with_capacity(answers.len());
        for answer in answers {
            noted.push(match answer {
                Some(answered) => answered.await.unwrap_or(Err(InferenceError::Store)),
                None => Err(InferenceError::Store),
            });
        }
        noted
    }

    /// Signs a delivered, preliminary result whose content is still what `expected_content`
    /// names. Exactly one signature can ever succeed.
    pub async fn sign(
        &self,
        result_id: &str,
        expected_content: &str,
        signature: Signature,
    ) -> Result<StoredResult, InferenceError> {
        use result_row::Column;
        use sea_orm::sea_query::Expr;
        let current = self.get(result_id).await?;
        if current.ledger_seq == 0 {
            return Err(InferenceError::ResultNotFound(result_id.to_owned()));
        }
        if current.status == SIGNED {
            return Err(InferenceError::ResultAlreadySigned);
        }
        if content_sha256(&current) != current.content_sha256
            || current.content_sha256 != expected_content
        {
            return Err(InferenceError::ResultContentChanged);
        }
        let updated = result_row::Entity::update_many()
            .col_expr(Column::Status, Expr::value(SIGNED))
            .col_expr(Column::SignerSubject, Expr::value(signature.signer_subject))
            .col_expr(Column::SignerName, Expr::value(signature.signer_name))
            .col_expr(Column::SignatureMeaning, Expr::value(signature.meaning))
            .col_expr(Column::SignatureReason, Expr::value(signature.reason))
            .col_expr(Column::SignedAt, Expr::value(signature.signed_at))
            .col_expr(
                Column::SignatureLedgerSeq,
                Expr::value(signature.ledger_seq),
            )
            .filter(Column::ResultId.eq(result_id))
            .filter(Column::Status.eq(PRELIMINARY))
            .filter(Column::ContentSha256.eq(expected_content))
            .exec(&self.connection)
            .await
            .map_err(store_error)?;
        if updated.rows_affected != 1 {
            // Someone else signed between the read and the update.
            return Err(InferenceError::ResultAlreadySigned);
        }
        self.get(result_id).await
    }

    /// Notes a delivered explanation; noting the same ledger entry again changes nothing.
    pub async fn record_explanation(
        &self,
        explanation: StoredExplanation,
    ) -> Result<(), InferenceError> {
        self.get(&explanation.result_id).await?;
        let row: explanation_row::ActiveModel = explanation.into();
        match explanation_row::Entity::insert(row)
            .exec(&self.connection)
            .await
        {
            Ok(_) => Ok(()),
            Err(error) if matches!(error.sql_err(), Some(SqlErr::UniqueConstraintViolation(_))) => {
                Ok(())
            }
            Err(error) => Err(store_error(error)),
        }
    }

    /// The explanations delivered for a result, oldest first.
    pub async fn explanations(
        &self,
        result_id: &str,
    ) -> Result<Vec<StoredExplanation>, InferenceError> {
        explanation_row::Entity::find()
            .filter(explanation_row::Column::ResultId.eq(result_id))
            .order_by_asc(explanation_row::Column::LedgerSeq)
            .all(&self.connection)
            .await
            .map_err(store_error)
    }

    pub async fn get(&self, result_id: &str) -> Result<StoredResult, InferenceError> {
        result_row::Entity::find_by_id(result_id.to_owned())
            .one(&self.connection)
            .await
            .map_err(store_error)?
            .ok_or_else(|| InferenceError::ResultNotFound(result_id.to_owned()))
    }

    /// The most recent `window` results of one version, newest first, as (route, top label,
    /// confidence, latency ms, shadow agreement): what a model report is computed from.
    pub async fn version_figures(
        &self,
        model_name: &str,
        model_version: &str,
        window: u64,
    ) -> Result<Vec<(String, String, f64, f64, String)>, InferenceError> {
        use result_row::Column;
        result_row::Entity::find()
            .select_only()
            .column(Column::Route)
            .column(Column::TopLabel)
            .column(Column::Confidence)
            .column(Column::LatencyMs)
            .column(Column::ShadowAgreement)
            .filter(Column::ModelName.eq(model_name))
            .filter(Column::ModelVersion.eq(model_version))
            .order_by_desc(Column::CreatedAt)
            .limit(window)
            .into_tuple()
            .all(&self.connection)
            .await
            .map_err(store_error)
    }

    /// Newest first; returns the page and the token of the next one (empty on the last).
    pub async fn list(
        &self,
        filter: &ResultFilter,
    ) -> Result<(Vec<StoredResult>, String), InferenceError> {
        use result_row::Column;
        let page_size = match u64::from(filter.page_size) {
            0 => DEFAULT_PAGE,
            size if size <= MAX_PAGE => size,
            _ => {
                return Err(InferenceError::QueryInvalid(format!(
                    "page_size must lie in 1..={MAX_PAGE}"
                )));
            }
        };
        let mut condition = Condition::all();
        if !filter.model_name.is_empty() {
            condition = condition.add(Column::ModelName.eq(filter.model_name.clone()));
        }
        if !filter.status.is_empty() {
            if filter.status != PRELIMINARY && filter.status != SIGNED {
                return Err(InferenceError::QueryInvalid(
                    "status must be PRELIMINARY or SIGNED".to_owned(),
                ));
            }
            condition = condition.add(Column::Status.eq(filter.status.clone()));
        }
        if !filter.patient_key.is_empty() {
            condition = condition.add(Column::PatientKey.eq(filter.patient_key.clone()));
        }
        if let Some(from) = filter.created_from {
            condition = condition.add(Column::CreatedAt.gte(from));
        }
        if let Some(until) = filter.created_until {
            condition = condition.add(Column::CreatedAt.lt(until));
        }
        if filter.delivered_only {
            condition = condition.add(Column::LedgerSeq.gt(0));
        }
        if !filter.page_token.is_empty() {
            let (created_at, result_id) = parse_page_token(&filter.page_token)?;
            condition = condition.add(
                Condition::any().add(Column::CreatedAt.lt(created_at)).add(
                    Condition::all()
                        .add(Column::CreatedAt.eq(created_at))
                        .add(Column::ResultId.lt(result_id)),
                ),
            );
        }
        let mut rows = result_row::Entity::find()
            .filter(condition)
            .order_by_desc(Column::CreatedAt)
            .order_by_desc(Column::ResultId)
            .limit(page_size + 1)
            .all(&self.connection)
            .await
            .map_err(store_error)?;
        let next_page_token = if rows.len() as u64 > page_size {
            rows.truncate(page_size as usize);
            rows.last()
                .map(|last| format!("{}/{}", last.created_at, last.result_id))
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok((rows, next_page_token))
    }
}

fn parse_page_token(token: &str) -> Result<(i64, String), InferenceError> {
    let invalid = || InferenceError::QueryInvalid("page_token is not one this service gave".into());
    let (created_at, result_id) = token.split_once('/').ok_or_else(invalid)?;
    Ok((
        created_at.parse().map_err(|_| invalid())?,
        result_id.to_owned(),
    ))
}

fn store_error(error: DbErr) -> InferenceError {
    tracing::error!(error = %error, "results store failed");
    InferenceError::Store
}

/// Unix microseconds of `text` (RFC 3339).
pub fn parse_timestamp(text: &str) -> Result<i64, InferenceError> {
    let moment = OffsetDateTime::parse(text, &Rfc3339)
        .map_err(|_| InferenceError::QueryInvalid(format!("{text} is not an RFC 3339 time")))?;
    <i64 as TryFrom<i128>>::try_from(moment.unix_timestamp_nanos() / 1000)
        .map_err(|_| InferenceError::QueryInvalid(format!("{text} is out of range")))
}

/// RFC 3339 UTC of unix microseconds.
pub fn format_timestamp(micros: i64) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(micros) * 1000)
        .ok()
        .and_then(|moment| moment.format(&Rfc3339).ok())
        .unwrap_or_default()
}

pub fn now_micros() -> i64 {
    <i64 as TryFrom<i128>>::try_from(OffsetDateTime::now_utc().unix_timestamp_nanos() / 1000)
        .unwrap_or(i64::MAX)
}

pub use migration::Migrator;

mod migration {
    use sea_orm_migration::prelude::*;

    pub struct Migrator;

    /// Adds `columns` to the results table, one statement each: SQLite alters one at a time.
    async fn add_result_columns(
        manager: &SchemaManager<'_>,
        columns: impl IntoIterator<Item = ColumnDef>,
    ) -> Result<(), DbErr> {
        for column in columns {
            manager
                .alter_table(
                    Table::alter()
                        .table(InferenceResults::Table)
                        .add_column(column)
                        .to_owned(),
                )
                .await?;
        }
        Ok(())
    }

    #[async_trait::async_trait]
    impl MigratorTrait for Migrator {
        fn migrations() -> Vec<Box<dyn MigrationTrait>> {
            vec![
                Box::new(CreateResults),
                Box::new(crate::lifecycle_store::migration::CreateModelLifecycle),
                Box::new(AddDecisionSupport),
                Box::new(AddModelRollout),
                Box::new(RoomForDeliveryNotes),
            ]
        }

        fn migration_table_name() -> DynIden {
            "inference_schema_migrations".into_iden()
        }
    }

    #[derive(DeriveIden)]
    enum InferenceResults {
        Table,
        ResultId,
        ModelName,
        ModelVersion,
        ModelSha256,
        ImageSha256,
        PatientKey,
        ProbabilitiesJson,
        TopLabel,
        Confidence,
        DecisionThreshold,
        Decision,
        LatencyMs,
        CreatedAt,
        Status,
        IdempotencyKey,
        IntendedUse,
        ContentSha256,
        LedgerSeq,
        SignerSubject,
        SignerName,
        SignatureMeaning,
        SignatureReason,
        SignedAt,
        SignatureLedgerSeq,
    }

    struct CreateResults;

    #[derive(DeriveIden)]
    enum DecisionSupportColumns {
        ContentHashVersion,
        NormalizedEntropy,
        Top2Margin,
        Temperature,
        OodScore,
        OodThreshold,
        ConfidenceBandLower,
        ConfidenceBandUpper,
        UnusualCase,
        UnusualCaseReasonsJson,
    }

    #[derive(DeriveIden)]
    enum InferenceExplanations {
        Table,
        LedgerSeq,
        ResultId,
        GridRows,
        GridColumns,
        HeatmapSha256,
        CreatedAt,
    }

    #[derive(DeriveIden)]
    enum RolloutColumns {
        Route,
        ShadowOfResultId,
        ShadowAgreement,
    }

    /// Canary and shadow (issue 18, rollout): the routing decision of each result, and the
    /// rollout roles in the lifecycle table. Rows stored before keep their content hash rule.
    struct AddModelRollout;

    impl MigrationName for AddModelRollout {
        fn name(&self) -> &str {
            "m0004_model_rollout"
        }
    }

    #[async_trait::async_trait]
    impl MigrationTrait for AddModelRollout {
        async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
            use RolloutColumns as C;
            let columns = [
                ColumnDef::new(C::Route)
                    .string()
                    .not_null()
                    .default("ACTIVE")
                    .to_owned(),
                ColumnDef::new(C::ShadowOfResultId)
                    .string()
                    .not_null()
                    .default("")
                    .to_owned(),
                ColumnDef::new(C::ShadowAgreement)
                    .string()
                    .not_null()
                    .default("")
                    .to_owned(),
            ];
            add_result_columns(manager, columns).await?;
            manager
                .alter_table(
                    Table::alter()
                        .table(Alias::new("model_lifecycle"))
                        .add_column(crate::lifecycle_store::migration::rollout_column())
                        .to_owned(),
                )
                .await?;
            manager
                .create_index(
                    Index::create()
                        .name("inference_results_by_version")
                        .table(InferenceResults::Table)
                        .col(InferenceResults::ModelName)
                        .col(InferenceResults::ModelVersion)
                        .col(InferenceResults::CreatedAt)
                        .to_owned(),
                )
                .await
        }
    }

    /// Issue 14: every result row is updated once soon after it is stored (its delivery note
    /// sets `ledger_seq`, which no index covers). On pages filled to the brim the new row
    /// version goes to another page, and every one of the table's five indexes gets an entry
    /// for it; with room left on each page PostgreSQL writes it beside the old one as a
    /// heap-only tuple and touches no index (and prunes the old version later). Only rows
    /// written from now on leave that room; PostgreSQL only (SQLite has no fill factor).
    struct RoomForDeliveryNotes;

    /// The share of each results page new rows fill; the rest is room for their notes.
    const RESULTS_FILL_FACTOR: u32 = 50;

    impl MigrationName for RoomForDeliveryNotes {
        fn name(&self) -> &str {
            "m0005_room_for_delivery_notes"
        }
    }

    #[async_trait::async_trait]
    impl MigrationTrait for RoomForDeliveryNotes {
        async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
            if manager.get_database_backend() == sea_orm::DatabaseBackend::Postgres {
                manager
                    .get_connection()
                    .execute_unprepared(&format!(
                        "ALTER TABLE inference_results SET (fillfactor = {RESULTS_FILL_FACTOR})"
                    ))
                    .await?;
            }
            Ok(())
        }
    }

    /// Uncertainty, the unusual-case flag and delivered explanations (issue 18). Rows stored
    /// before keep content hash rule 1, so their hashes and signatures still verify.
    struct AddDecisionSupport;

    impl MigrationName for AddDecisionSupport {
        fn name(&self) -> &str {
            "m0003_decision_support"
        }
    }

    #[async_trait::async_trait]
    impl MigrationTrait for AddDecisionSupport {
        async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
            use DecisionSupportColumns as C;
            let columns = [
                ColumnDef::new(C::ContentHashVersion)
                    .integer()
                    .not_null()
                    .default(1)
                    .to_owned(),
                ColumnDef::new(C::NormalizedEntropy)
                    .double()
                    .not_null()
                    .default(0.0)
                    .to_owned(),
                ColumnDef::new(C::Top2Margin)
                    .double()
                    .not_null()
                    .default(0.0)
                    .to_owned(),
                ColumnDef::new(C::Temperature)
                    .double()
                    .not_null()
                    .default(1.0)
                    .to_owned(),
                ColumnDef::new(C::OodScore)
                    .double()
                    .not_null()
                    .default(0.0)
                    .to_owned(),
                ColumnDef::new(C::OodThreshold)
                    .double()
                    .not_null()
                    .default(0.0)
                    .to_owned(),
                ColumnDef::new(C::ConfidenceBandLower)
                    .double()
                    .null()
                    .to_owned(),
                ColumnDef::new(C::ConfidenceBandUpper)
                    .double()
                    .null()
                    .to_owned(),
                ColumnDef::new(C::UnusualCase)
                    .boolean()
                    .not_null()
                    .default(false)
                    .to_owned(),
                ColumnDef::new(C::UnusualCaseReasonsJson)
                    .text()
                    .not_null()
                    .default("[]")
                    .to_owned(),
            ];
            add_result_columns(manager, columns).await?;
            use InferenceExplanations as E;
            manager
                .create_table(
                    Table::create()
                        .table(E::Table)
                        .col(
                            ColumnDef::new(E::LedgerSeq)
                                .big_integer()
                                .not_null()
                                .primary_key(),
                        )
                        .col(ColumnDef::new(E::ResultId).string().not_null())
                        .col(ColumnDef::new(E::GridRows).integer().not_null())
                        .col(ColumnDef::new(E::GridColumns).integer().not_null())
                        .col(ColumnDef::new(E::HeatmapSha256).string().not_null())
                        .col(ColumnDef::new(E::CreatedAt).big_integer().not_null())
                        .to_owned(),
                )
                .await?;
            manager
                .create_index(
                    Index::create()
                        .name("inference_explanations_by_result")
                        .table(E::Table)
                        .col(E::ResultId)
                        .to_owned(),
                )
                .await
        }
    }

    impl MigrationName for CreateResults {
        fn name(&self) -> &str {
            "m0001_create_inference_results"
        }
    }

    #[async_trait::async_trait]
    impl MigrationTrait for CreateResults {
        async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
            use InferenceResults as R;
            let text = |column: R| ColumnDef::new(column).string().not_null().to_owned();
            manager
                .create_table(
                    Table::create()
                        .table(R::Table)
                        .col(text(R::ResultId).primary_key())
                        .col(text(R::ModelName))
                        .col(text(R::ModelVersion))
                        .col(text(R::ModelSha256))
                        .col(text(R::ImageSha256))
                        .col(text(R::PatientKey))
                        .col(ColumnDef::new(R::ProbabilitiesJson).text().not_null())
                        .col(text(R::TopLabel))
                        .col(ColumnDef::new(R::Confidence).double().not_null())
                        .col(ColumnDef::new(R::DecisionThreshold).double().not_null())
                        .col(text(R::Decision))
                        .col(ColumnDef::new(R::LatencyMs).double().not_null())
                        .col(ColumnDef::new(R::CreatedAt).big_integer().not_null())
                        .col(text(R::Status))
                        .col(
                            ColumnDef::new(R::IdempotencyKey)
                                .string()
                                .null()
                                .unique_key(),
                        )
                        .col(text(R::IntendedUse))
                        .col(text(R::ContentSha256))
                        .col(ColumnDef::new(R::LedgerSeq).big_integer().not_null())
                        .col(text(R::SignerSubject))
                        .col(text(R::SignerName))
                        .col(text(R::SignatureMeaning))
                        .col(text(R::SignatureReason))
                        .col(ColumnDef::new(R::SignedAt).big_integer().not_null())
                        .col(
                            ColumnDef::new(R::SignatureLedgerSeq)
                                .big_integer()
                                .not_null(),
                        )
                        .to_owned(),
                )
                .await?;
            manager
                .create_index(
                    Index::create()
                        .name("inference_results_by_time")
                        .table(R::Table)
                        .col(R::CreatedAt)
                        .col(R::ResultId)
                        .to_owned(),
                )
                .await?;
            manager
                .create_index(
                    Index::create()
                        .name("inference_results_by_patient")
                        .table(R::Table)
                        .col(R::PatientKey)
                        .to_owned(),
                )
                .await?;
            let triggers = match manager.get_database_backend() {
                sea_orm::DatabaseBackend::Postgres => POSTGRES_SIGNED_IS_FINAL,
                _ => SQLITE_SIGNED_IS_FINAL,
            };
            manager
                .get_connection()
                .execute_unprepared(triggers)
                .await?;
            Ok(())
        }
    }

    /// A signed result never changes and is never deleted, whoever connects (21 CFR 11.10(e)).
    const POSTGRES_SIGNED_IS_FINAL: &str = r#"
CREATE FUNCTION inference_results_signed_is_final() RETURNS trigger AS $$
BEGIN
  IF OLD.status = 'SIGNED' THEN
    RAISE EXCEPTION 'signed results are final';
  END IF;
  IF TG_OP = 'DELETE' THEN
    RETURN OLD;
  END IF;
  RETURN NEW;
END;
$$ LANGUAGE plpgsql;
CREATE TRIGGER inference_results_signed_is_final
  BEFORE UPDATE OR DELETE ON inference_results
  FOR EACH ROW EXECUTE FUNCTION inference_results_signed_is_final();
"#;

    const SQLITE_SIGNED_IS_FINAL: &str = r#"
CREATE TRIGGER inference_results_signed_no_update BEFORE UPDATE ON inference_results
  WHEN OLD.status = 'SIGNED'
  BEGIN SELECT RAISE(ABORT, 'signed results are final'); END;
CREATE TRIGGER inference_results_signed_no_delete BEFORE DELETE ON inference_results
  WHEN OLD.status = 'SIGNED'
  BEGIN SELECT RAISE(ABORT, 'signed results are final'); END;
"#;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(version: i32) -> StoredResult {
        StoredResult {
            result_id: "4f7b8a52-2f3c-4c55-9d2e-0a4c1b2d3e4f".to_owned(),
            model_name: "brain-mri-tumor".to_owned(),
            model_version: "1".to_owned(),
            model_sha256: "ab".repeat(32),
            image_sha256: "cd".repeat(32),
            patient_key: String::new(),
            probabilities_json: r#"[["glioma",0.7],["notumor",0.3]]"#.to_owned(),
            top_label: "glioma".to_owned(),
            confidence: 0.7,
            decision_threshold: 0.5,
            decision: "ABOVE_THRESHOLD".to_owned(),
            latency_ms: 1.0,
            created_at: 1_700_000_000_000_000,
            status: PRELIMINARY.to_owned(),
            idempotency_key: None,
            intended_use: String::new(),
            content_sha256: String::new(),
            ledger_seq: 0,
            signer_subject: String::new(),
            signer_name: String::new(),
            signature_meaning: String::new(),
            signature_reason: String::new(),
            signed_at: 0,
            signature_ledger_seq: 0,
            content_hash_version: version,
            normalized_entropy: 0.6,
            top2_margin: 0.4,
            temperature: 1.0,
            ood_score: 0.3,
            ood_threshold: 0.6,
            confidence_band_lower: None,
            confidence_band_upper: None,
            unusual_case: true,
            unusual_case_reasons_json: r#"["MODALITY_OUTSIDE_INTENDED_USE"]"#.to_owned(),
            route: "ACTIVE".to_owned(),
            shadow_of_result_id: String::new(),
            shadow_agreement: String::new(),
        }
    }

    #[test]
    fn rule_three_binds_the_routing_decision_and_earlier_rules_ignore_it() {
        // Under rules 1 and 2 the routing columns (defaulted by m0004) are not content, so
        // results stored before keep their hashes.
        for version in [1, 2] {
            let canary = StoredResult {
                route: "CANARY".to_owned(),
                ..row(version)
            };
            assert_eq!(content_sha256(&canary), content_sha256(&row(version)));
        }
        let base = content_sha256(&row(3));
        assert_ne!(base, content_sha256(&row(2)));
        let changes: [fn(&mut StoredResult); 3] = [
            |row| row.route = "CANARY".to_owned(),
            |row| row.shadow_of_result_id = "x".to_owned(),
            |row| row.shadow_agreement = "AGREES".to_owned(),
        ];
        for change in changes {
            let mut changed = row(3);
            change(&mut changed);
            assert_ne!(content_sha256(&changed), base);
        }
        // Length prefixes: moving text between the routing fields changes the hash.
        let shifted = StoredResult {
            route: "ACTIVEA".to_owned(),
            shadow_of_result_id: "GREES".to_owned(),
            ..row(3)
        };
        let split = StoredResult {
            route: "ACTIVE".to_owned(),
            shadow_of_result_id: "AGREES".to_owned(),
            ..row(3)
        };
        assert_ne!(content_sha256(&shifted), content_sha256(&split));
    }

    #[test]
    fn rule_two_binds_uncertainty_and_flags_and_rule_one_hashes_are_unchanged() {
        // Rule 1 as it was before issue 18, written out: results stored then still verify.
        let old = row(1);
        let mut hasher = sha2::Sha256::new();
        use sha2::Digest;
        for text in [
            &old.result_id,
            &old.model_name,
            &old.model_version,
            &old.model_sha256,
            &old.image_sha256,
            &old.patient_key,
            &old.probabilities_json,
            &old.top_label,
            &old.decision,
        ] {
            hasher.update((text.len() as u64).to_be_bytes());
            hasher.update(text.as_bytes());
        }
        hasher.update(old.confidence.to_be_bytes());
        hasher.update(old.decision_threshold.to_be_bytes());
        hasher.update(old.created_at.to_be_bytes());
        assert_eq!(content_sha256(&old), hex::encode(hasher.finalize()));
        let unflagged_old = StoredResult {
            unusual_case: false,
            ..row(1)
        };
        assert_eq!(content_sha256(&unflagged_old), content_sha256(&old));

        // Rule 2: each decision support field is content.
        let base = content_sha256(&row(2));
        assert_ne!(base, content_sha256(&old));
        let changes: [fn(&mut StoredResult); 7] = [
            |row| row.normalized_entropy = 0.5,
            |row| row.top2_margin = 0.1,
            |row| row.temperature = 2.0,
            |row| row.ood_score = 0.9,
            |row| row.confidence_band_lower = Some(0.1),
            |row| row.unusual_case = false,
            |row| row.unusual_case_reasons_json = "[]".to_owned(),
        ];
        for change in changes {
            let mut changed = row(2);
            change(&mut changed);
            if changed.confidence_band_lower.is_some() {
                changed.confidence_band_upper = Some(0.2);
            }
            assert_ne!(content_sha256(&changed), base);
        }
    }
}
