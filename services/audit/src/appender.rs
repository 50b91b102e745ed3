//! `LedgerAppender`: the one writer of the chain in this process. Appends queue up and a single
//! task commits everything waiting in one transaction (group commit), answering each caller
//! only after that transaction is durable. On PostgreSQL a transaction-scoped advisory lock
//! serialises writers across replicas, so several audit replicas still build one chain.
//! Before each group the stored head is checked against the [`ChainAnchor`]: a chain that is
//! shorter than what was committed or signed, or does not pass through it, gets no append.

use sea_orm::{
    ConnectionTrait, DatabaseBackend, DatabaseConnection, DbErr, EntityTrait, QueryOrder, Set,
    SqlErr, TransactionTrait,
};
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;

use crate::anchor::{self, AnchorViolation, ChainAnchor, ChainHead, CheckError};
use crate::store::ledger_entry;
use medai_ledger::chain;

/// A group stops taking more once it holds this many entries (a batch is never split, so a
/// group holds at most `MAX_GROUP - 1 + MAX_BATCH` entries).
const MAX_GROUP: usize = 512;
/// The most events one batch (`append_all`) may hold; the gRPC edge refuses larger ones.
pub const MAX_BATCH: usize = 512;
/// Appends (single events or batches) waiting for the writer; beyond this, callers wait
/// (backpressure).
const QUEUE_DEPTH: usize = 4096;
/// Any fixed 64-bit number distinct from other advisory locks in the same database.
pub(crate) const LEDGER_LOCK_KEY: i64 = 0x4d45_4441_494c_4447; // "MEDAILDG"

/// What a caller asks to record.
#[derive(Clone, Debug)]
pub struct NewEvent {
    pub actor: String,
    pub action: String,
    pub resource: String,
    pub outcome: String,
    /// Already canonical JSON.
    pub context: String,
}

/// What the ledger answers once the event is durable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppendReceipt {
    pub seq: u64,
    pub hash: String,
    pub recorded_at: String,
}

#[derive(Debug, thiserror::Error, Clone)]
pub enum AppendError {
    #[error("the ledger could not record the event: {0}")]
    Storage(String),
    #[error("the ledger writer has stopped")]
    Stopped,
    #[error("the ledger does not extend its last committed head or signed checkpoint: {0}")]
    AnchorViolation(AnchorViolation),
}

/// A run of events to store consecutively, who waits for their receipts, and the span they
/// were appended in (its group commit's span hangs under the first such span and follows from
/// the others).
type Pending = (
    Vec<NewEvent>,
    oneshot::Sender<Result<Vec<AppendReceipt>, AppendError>>,
    tracing::Span,
);

#[derive(Clone)]
pub struct LedgerAppender {
    queue: mpsc::Sender<Pending>,
}

impl LedgerAppender {
    /// Starts the writer task on `connection`, appending only to chains that extend `anchor`.
    pub fn start(connection: DatabaseConnection, anchor: Arc<ChainAnchor>) -> Self {
        let (queue, receiver) = mpsc::channel(QUEUE_DEPTH);
        tokio::spawn(run_writer(connection, anchor, receiver));
        Self { queue }
    }

    pub async fn append(&self, event: NewEvent) -> Result<AppendReceipt, AppendError> {
        self.append_all(vec![event])
            .await?
            .pop()
            .ok_or(AppendError::Stopped)
    }

    /// Appends `events` as consecutive entries in one transaction (all durable or none), one
    /// receipt per event in order. At most [`MAX_BATCH`] events: the caller bounds them.
    pub async fn append_all(
        &self,
        events: Vec<NewEvent>,
    ) -> Result<Vec<AppendReceipt>, AppendError> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let (reply, receipts) = oneshot::channel();
        self.queue
            .send((events, reply, tracing::Span::current()))
            .await
            .map_err(|_| AppendError::Stopped)?;
        receipts.await.map_err(|_| AppendError::Stopped)?
    }
}

/// Waits for the next append, then takes what else is already waiting, whole batches only,
/// until the group holds [`MAX_GROUP`] entries. Returns the number of entries; `None` once
/// every sender is gone.
async fn next_group(
    receiver: &mut mpsc::Receiver<Pending>,
    group: &mut Vec<Pending>,
) -> Option<usize> {
    let first = receiver.recv().await?;
    let mut entries = first.0.len();
    group.push(first);
    while entries < MAX_GROUP {
        match receiver.try_recv() {
            Ok(next) => {
                entries += next.0.len();
                group.push(next);
            }
            Err(_) => break,
        }
    }
    Some(entries)
}

async fn run_writer(
    connection: DatabaseConnection,
    anchor: Arc<ChainAnchor>,
    mut receiver: mpsc::Receiver<Pending>,
) {
    let mut group: Vec<Pending> = Vec::with_capacity(MAX_GROUP);
    // The one-statement path runs on a connection this writer keeps (no pool round trip, and
    // no ping as it goes back to the pool, after each group).
    let mut kept = medai_storage::KeptConnection::for_writer_on(&connection);
    while let Some(entries) = medai_storage::KeptConnection::await_work(
        kept.as_mut(),
        next_group(&mut receiver, &mut group),
    )
    .await
    {
        let events: Vec<&NewEvent> = group.iter().flat_map(|(events, _, _)| events).collect();
        let commit = tracing::info_span!(parent: &group[0].2, "audit.group_commit", entries);
        for (_, _, caller) in &group[1..] {
            commit.follows_from(caller);
        }
        let outcome = commit_group(&connection, kept.as_mut(), &anchor, &events)
            .instrument(commit)
            .await;
        metrics::histogram!("medai_ledger_group_commit_size").record(entries as f64);
        match outcome {
            Ok((receipts, _path)) => {
                if let Some(last) = receipts.last()
                    && let Some(hash) = anchor::decode_hash(&last.hash)
                {
                    anchor.record_committed(ChainHead {
                        seq: last.seq,
                        hash,
                    });
                }
                // Receipts come back in the order of `events`: each caller takes its run.
                let mut receipts = receipts.into_iter();
                for (events, reply, _) in group.drain(..) {
                    let own: Vec<AppendReceipt> = receipts.by_ref().take(events.len()).collect();
                    let _caller_gone = reply.send(Ok(own));
                }
            }
            Err(CheckError::Violation(violation)) => {
                metrics::counter!(anchor::VIOLATION_COUNTER).increment(entries as u64);
                tracing::error!(problem = %violation, entries, "ledger append refused: the chain does not extend its anchor");
                let error = AppendError::AnchorViolation(violation);
                for (_, reply, _) in group.drain(..) {
                    let _caller_gone = reply.send(Err(error.clone()));
                }
            }
            Err(CheckError::Database(error)) => {
                tracing::error!(error = %error, entries, "ledger group commit failed");
                metrics::counter!("medai_ledger_append_failures_total").increment(entries as u64);
                let error = AppendError::Storage(error.to_string());
                for (_, reply, _) in group.drain(..) {
                    let _caller_gone = reply.send(Err(error.clone()));
                }
            }
        }
    }
}

/// How a group reached the ledger.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CommitPath {
    /// One statement after the head this process committed last (PostgreSQL).
    Extended,
    /// A transaction under the ledger's lock that reads and checks the stored head first.
    Locked,
}

/// A group ready to store: `events` chained after the entry at `head_seq` (whose hash is
/// `hex[0]`), all recorded at one instant. `hex[i + 1]` is the hash of `events[i]`, so
/// `hex[i]` is its prev_hash. The events' text is hashed and bound where it lies.
struct ChainedGroup<'a> {
    events: &'a [&'a NewEvent],
    head_seq: u64,
    recorded_at: String,
    hex: Vec<String>,
    last_hash: chain::Hash,
}

/// Chains `events` after (`seq`, `prev_hash`), all recorded at one instant.
fn chain_after<'a>(
    seq: u64,
    mut prev_hash: chain::Hash,
    events: &'a [&'a NewEvent],
) -> ChainedGroup<'a> {
    let recorded_at = now_rfc3339_micros();
    let mut hex = Vec::with_capacity(events.len() + 1);
    hex.push(hex::encode(prev_hash));
    for (offset, event) in (1..).zip(events) {
        prev_hash = chain::entry_hash_of_fields(
            &prev_hash,
            seq + offset,
            [
                recorded_at.as_bytes(),
                event.actor.as_bytes(),
                event.action.as_bytes(),
                event.resource.as_bytes(),
                event.outcome.as_bytes(),
                event.context.as_bytes(),
            ],
        );
        hex.push(hex::encode(prev_hash));
    }
    ChainedGroup {
        events,
        head_seq: seq,
        recorded_at,
        hex,
        last_hash: prev_hash,
    }
}

impl ChainedGroup<'_> {
    /// The group's rows as sea-orm models (the locked path).
    fn active_models(&self) -> Vec<ledger_entry::ActiveModel> {
        (1..)
            .zip(self.events)
            .zip(self.hex.windows(2))
            .map(|((offset, event), hashes)| ledger_entry::ActiveModel {
                seq: Set((self.head_seq + offset) as i64),
                recorded_at: Set(self.recorded_at.clone()),
                actor: Set(event.actor.clone()),
                action: Set(event.action.clone()),
                resource: Set(event.resource.clone()),
                outcome: Set(event.outcome.clone()),
                context: Set(event.context.clone()),
                prev_hash: Set(hashes[0].clone()),
                hash: Set(hashes[1].clone()),
                encoding_version: Set(chain::ENCODING_VERSION as i32),
            })
            .collect()
    }

    /// One receipt per event, in order, and the group's last entry as the new head.
    fn into_receipts(self) -> (Vec<AppendReceipt>, ChainHead) {
        let head = ChainHead {
            seq: self.head_seq + self.events.len() as u64,
            hash: self.last_hash,
        };
        let recorded_at = self.recorded_at;
        let receipts = (self.head_seq + 1..)
            .zip(self.hex.into_iter().skip(1))
            .map(|(seq, hash)| AppendReceipt {
                seq,
                hash,
                recorded_at: recorded_at.clone(),
            })
            .collect();
        (receipts, head)
    }
}

async fn commit_group(
    connection: &DatabaseConnection,
    kept: Option<&mut medai_storage::KeptConnection>,
    anchor: &ChainAnchor,
    events: &[&NewEvent],
) -> Result<(Vec<AppendReceipt>, CommitPath), CheckError> {
    if let Some(violation) = anchor.violation() {
        return Err(CheckError::Violation(violation));
    }
    // The common case costs one round trip instead of five (BEGIN, lock, head, insert, COMMIT):
    // the group goes in only if the stored head is still the one this process committed.
    if let Some(kept) = kept {
        if let Some(head) = anchor.committed_head_to_extend() {
            let group = chain_after(head.seq, head.hash, events);
            match extend_committed_head(kept, &group).await {
                Ok(true) => return Ok((group.into_receipts().0, CommitPath::Extended)),
                // The stored head moved (another replica appended, or the chain was cut): the
                // locked path reads it and judges it against the anchor.
                Ok(false) => {}
                // Another replica stored these seqs first.
                Err(error)
                    if matches!(error.sql_err(), Some(SqlErr::UniqueConstraintViolation(_))) => {}
                Err(error) => return Err(error.into()),
            }
        }
        // The locked path takes its transaction from the pool, which may hold no other.
        kept.give_back();
    }
    commit_locked(connection, anchor, events)
        .await
        .map(|receipts| (receipts, CommitPath::Locked))
}

/// Takes the ledger's lock, then inserts the group's rows only if the stored chain ends exactly
/// at seq $2 with hash $3. The rows come as binary arrays (one per varying column: actor,
/// action, resource, outcome, context, prev_hash, hash), their seqs numbered on from $2, their
/// instant ($4) and encoding version ($5) given once. The head is read as "the last row by seq"
/// so that every plan, generic ones for this prepared statement included, walks the primary
/// key backwards one row: a `seq > $2` probe is planned as a full scan when the value is not
/// known.
pub(crate) const EXTEND_COMMITTED_HEAD: &str = "WITH writer AS MATERIALIZED (SELECT pg_advisory_xact_lock($1)) \
    INSERT INTO ledger_entries \
    (seq, recorded_at, actor, action, resource, outcome, context, prev_hash, hash, encoding_version) \
    SELECT $2 + r.n, $4, r.actor, r.action, r.resource, r.outcome, r.context, r.prev_hash, \
    r.hash, $5 \
    FROM writer, unnest($6::text[], $7::text[], $8::text[], $9::text[], $10::text[], \
    $11::text[], $12::text[]) WITH ORDINALITY \
    AS r(actor, action, resource, outcome, context, prev_hash, hash, n) \
    WHERE EXISTS (SELECT 1 FROM (SELECT e.seq, e.hash FROM ledger_entries e ORDER BY e.seq DESC LIMIT 1) head \
    WHERE head.seq = $2 AND head.hash = $3)";

/// Appends `group` in one statement that takes the ledger's lock and inserts nothing unless
/// the stored chain still ends exactly at the group's head. Returns whether the rows went in.
/// A statement that checked the head before another replica's commit collides with that
/// replica's rows on the primary key and fails whole (a unique violation).
async fn extend_committed_head(
    kept: &mut medai_storage::KeptConnection,
    group: &ChainedGroup<'_>,
) -> Result<bool, DbErr> {
    let head_seq = i64::try_from(group.head_seq).map_err(|_| malformed_head())?;
    let column = |field: fn(&NewEvent) -> &str| -> Vec<&str> {
        group.events.iter().map(|event| field(event)).collect()
    };
    let count = group.events.len();
    let connection = kept
        .connection()
        .await
        .map_err(medai_storage::statement_error)?;
    let outcome = sea_orm::sqlx::query(EXTEND_COMMITTED_HEAD)
        .bind(LEDGER_LOCK_KEY)
        .bind(head_seq)
        .bind(&group.hex[0])
        .bind(&group.recorded_at)
        .bind(chain::ENCODING_VERSION as i32)
        .bind(column(|event| &event.actor))
        .bind(column(|event| &event.action))
        .bind(column(|event| &event.resource))
        .bind(column(|event| &event.outcome))
        .bind(column(|event| &event.context))
        .bind(&group.hex[..count])
        .bind(&group.hex[1..])
        .execute(connection)
        .await;
    let inserted = kept
        .outcome(outcome)
        .map_err(medai_storage::statement_error)?
        .rows_affected();
    match usize::try_from(inserted) {
        Ok(0) => Ok(false),
        Ok(stored) if stored == count => Ok(true),
        _ => Err(DbErr::Custom(format!(
            "the ledger stored {inserted} of a group of {count}"
        ))),
    }
}

/// The general path: under the ledger's lock, reads the stored head, checks it against the
/// anchor, and appends after it.
async fn commit_locked(
    connection: &DatabaseConnection,
    anchor: &ChainAnchor,
    events: &[&NewEvent],
) -> Result<Vec<AppendReceipt>, CheckError> {
    let transaction = connection.begin().await?;
    if transaction.get_database_backend() == DatabaseBackend::Postgres {
        transaction
            .execute_unprepared(&format!("SELECT pg_advisory_xact_lock({LEDGER_LOCK_KEY})"))
            .await?;
    }
    let head = ledger_entry::Entity::find()
        .order_by_desc(ledger_entry::Column::Seq)
        .one(&transaction)
        .await?;
    let (seq, prev_hash) = match head {
        Some(entry) => (
            u64::try_from(entry.seq).map_err(|_| malformed_head())?,
            anchor::decode_hash(&entry.hash).ok_or_else(malformed_head)?,
        ),
        None => (0, chain::genesis_hash()),
    };
    let stored_head = (seq > 0).then_some(ChainHead {
        seq,
        hash: prev_hash,
    });
    anchor.check(&transaction, stored_head).await?;
    let group = chain_after(seq, prev_hash, events);
    ledger_entry::Entity::insert_many(group.active_models())
        .exec(&transaction)
        .await?;
    transaction.commit().await?;
    Ok(group.into_receipts().0)
}

fn malformed_head() -> DbErr {
    DbErr::Custom("the ledger head holds a malformed seq or hash".to_owned())
}

pub(crate) fn now_rfc3339_micros() -> String {
    let format = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z"
    );
    time::OffsetDateTime::now_utc()
        .format(&format)
        .unwrap_or_else(|_| "1970-01-01T00:00:00.000000Z".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use sea_orm::Statement;

    fn event(number: usize) -> NewEvent {
        NewEvent {
            actor: "service:gateway".to_owned(),
            action: "INFERENCE".to_owned(),
            resource: format!("result/{number}"),
            outcome: "SUCCESS".to_owned(),
            context: r#"{"model":"light","note":"ünïcode \"quoted\" \\ slash"}"#.to_owned(),
        }
    }

    /// The connection a writer task on `connection` keeps.
    fn kept(connection: &DatabaseConnection) -> medai_storage::KeptConnection {
        medai_storage::KeptConnection::for_writer_on(connection).expect("PostgreSQL")
    }

    /// Commits a group as the writer task does, remembering its head; the seqs and the path.
    async fn commit(
        connection: &DatabaseConnection,
        kept: &mut medai_storage::KeptConnection,
        anchor: &ChainAnchor,
        numbers: std::ops::RangeInclusive<usize>,
    ) -> (Vec<u64>, CommitPath) {
        let events: Vec<NewEvent> = numbers.map(event).collect();
        let events: Vec<&NewEvent> = events.iter().collect();
        // The locked path's transaction comes from a pool that may hold no other connection
        // than the kept one: a commit that waits for a connection fails here, not hangs.
        let (receipts, path) = tokio::time::timeout(
            std::time::Duration::from_secs(30),
            commit_group(connection, Some(kept), anchor, &events),
        )
        .await
        .expect("the commit got a connection")
        .expect("commit");
        let last = receipts.last().expect("a receipt");
        anchor.record_committed(ChainHead {
            seq: last.seq,
            hash: anchor::decode_hash(&last.hash).expect("hash"),
        });
        (receipts.iter().map(|receipt| receipt.seq).collect(), path)
    }

    async fn stored_rows(connection: &DatabaseConnection) -> Vec<ledger_entry::Model> {
        ledger_entry::Entity::find()
            .order_by_asc(ledger_entry::Column::Seq)
            .all(connection)
            .await
            .expect("rows")
    }

    #[tokio::test]
    async fn groups_after_this_writer_s_own_head_take_one_statement_and_others_take_the_lock() {
        let url = medai_testkit::fresh_postgres_database().await;
        crate::store::connect(&url, true).await.expect("migrate");
        // Pools of one connection: each writer's kept connection is all its pool has.
        let connection = medai_storage::connect_with_max_connections(&url, 1)
            .await
            .expect("connect");
        let mut our_writer = kept(&connection);
        let ours = ChainAnchor::new();
        // Another audit replica on the same database.
        let their_connection = medai_storage::connect_with_max_connections(&url, 1)
            .await
            .expect("connect");
        let mut their_writer = kept(&their_connection);
        let theirs = ChainAnchor::new();

        assert_eq!(
            commit(&connection, &mut our_writer, &ours, 1..=2).await,
            (vec![1, 2], CommitPath::Locked)
        );
        assert_eq!(
            commit(&connection, &mut our_writer, &ours, 3..=5).await,
            (vec![3, 4, 5], CommitPath::Extended)
        );
        assert_eq!(
            commit(&their_connection, &mut their_writer, &theirs, 6..=6).await,
            (vec![6], CommitPath::Locked)
        );
        // Our head (5) is no longer the stored one: the one statement inserts nothing and the
        // locked path appends after the other replica's entry.
        assert_eq!(
            commit(&connection, &mut our_writer, &ours, 7..=8).await,
            (vec![7, 8], CommitPath::Locked)
        );
        assert_eq!(
            commit(&connection, &mut our_writer, &ours, 9..=9).await,
            (vec![9], CommitPath::Extended)
        );

        // Every row is stored as hashed (context byte for byte) and the chain verifies whole
        // (read on the pool, to which the writer gives its connection back when idle).
        our_writer.give_back();
        let rows = stored_rows(&connection).await;
        assert_eq!(rows.len(), 9);
        for (index, row) in rows.iter().enumerate() {
            assert_eq!(row.resource, format!("result/{}", index + 1));
            assert_eq!(row.context, event(1).context);
        }
        let verified = crate::verify::verified_hashes(&connection)
            .await
            .expect("verify");
        assert_eq!(verified.len(), 9);
        assert_eq!(hex::encode(verified[8]), rows[8].hash);
    }

    #[tokio::test]
    async fn a_group_that_checked_the_head_before_another_replica_committed_goes_in_after_it() {
        let url = medai_testkit::fresh_postgres_database().await;
        let connection = crate::store::connect(&url, true).await.expect("connect");
        let ours = ChainAnchor::new();
        assert_eq!(
            commit(&connection, &mut kept(&connection), &ours, 1..=1)
                .await
                .0,
            vec![1]
        );

        // Another replica holds the ledger's lock with seq 2 written but not committed.
        let other = sea_orm::Database::connect(url.as_str())
            .await
            .expect("connect");
        let held = other.begin().await.expect("begin");
        held.execute_unprepared(&format!("SELECT pg_advisory_xact_lock({LEDGER_LOCK_KEY})"))
            .await
            .expect("lock");
        let head = ours.committed_head_to_extend().expect("our head");
        let second = event(2);
        let row = chain_after(head.seq, head.hash, &[&second])
            .active_models()
            .remove(0);
        ledger_entry::Entity::insert(row)
            .exec(&held)
            .await
            .expect("insert 2");

        // Our group's one statement waits on the lock, then collides with seq 2 once it is
        // committed, and the group goes in after it under the lock.
        let ours = Arc::new(ours);
        let appending = {
            let (connection, ours) = (connection.clone(), ours.clone());
            tokio::spawn(async move {
                let mut writer = kept(&connection);
                commit(&connection, &mut writer, &ours, 3..=4).await
            })
        };
        let waiting =
            "SELECT count(*) AS n FROM pg_locks WHERE locktype = 'advisory' AND NOT granted";
        loop {
            let row = other
                .query_one_raw(Statement::from_string(DatabaseBackend::Postgres, waiting))
                .await
                .expect("pg_locks")
                .expect("row");
            if row.try_get::<i64>("", "n").expect("n") > 0 {
                break;
            }
            assert!(
                !appending.is_finished(),
                "the group did not wait for the lock"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        held.commit().await.expect("commit 2");

        assert_eq!(
            appending.await.expect("task"),
            (vec![3, 4], CommitPath::Locked)
        );
        let rows = stored_rows(&connection).await;
        let resources: Vec<&str> = rows.iter().map(|row| row.resource.as_str()).collect();
        assert_eq!(resources, ["result/1", "result/2", "result/3", "result/4"]);
        let verified = crate::verify::verified_hashes(&connection)
            .await
            .expect("verify");
        assert_eq!(verified.len(), 4);
    }

    #[tokio::test]
    async fn the_one_statement_reads_the_head_by_the_primary_key_whatever_the_plan() {
        let url = medai_testkit::fresh_postgres_database().await;
        let connection = crate::store::connect(&url, true).await.expect("connect");
        connection
            .execute_unprepared(
                "INSERT INTO ledger_entries SELECT g, '2026-11-30T00:00:00.000000Z', 'a', 'b', \
                 'r/' || g, 'SUCCESS', '{}', repeat('0', 64), repeat('1', 64), 1 \
                 FROM generate_series(1, 300000) g; ANALYZE ledger_entries",
            )
            .await
            .expect("fill");
        // The statement is prepared once per connection and reused, so PostgreSQL may plan
        // it once for any parameter values: that generic plan must not scan the table.
        let session = connection.begin().await.expect("begin");
        session
            .execute_unprepared(&format!(
                "SET LOCAL plan_cache_mode = force_generic_plan; \
                 PREPARE extend(bigint, bigint, text, text, integer, text[], text[], text[], \
                 text[], text[], text[], text[]) AS {EXTEND_COMMITTED_HEAD}"
            ))
            .await
            .expect("prepare");
        let plan: Vec<String> = session
            .query_all_raw(Statement::from_string(
                DatabaseBackend::Postgres,
                format!(
                    "EXPLAIN EXECUTE extend({LEDGER_LOCK_KEY}, 300000, 'x', 't', 1, \
                     '{{}}', '{{}}', '{{}}', '{{}}', '{{}}', '{{}}', '{{}}')"
                ),
            ))
            .await
            .expect("explain")
            .iter()
            .map(|row| row.try_get::<String>("", "QUERY PLAN").expect("plan line"))
            .collect();
        let plan = plan.join("\n");
        assert!(!plan.contains("Seq Scan on ledger_entries"), "{plan}");
        assert!(
            plan.contains("Index Scan Backward using ledger_entries_pkey"),
            "{plan}"
        );
        session.rollback().await.expect("rollback");
    }
}
