//! `LedgerAppender`: the one writer of the chain in this process. Appends queue up and a single
//! task commits everything waiting in one transaction (group commit), answering each caller
//! only after that transaction is durable. On PostgreSQL a transaction-scoped advisory lock
//! serialises writers across replicas, so several audit replicas still build one chain.
//! Before each group the stored head is checked against the [`ChainAnchor`]: a chain that is
//! shorter than what was committed or signed, or does not pass through it, gets no append.

use sea_orm::{
    ConnectionTrait, DatabaseBackend, DatabaseConnection, DbErr, EntityTrait, QueryOrder, Set,
    TransactionTrait,
};
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;

use crate::anchor::{self, AnchorViolation, ChainAnchor, ChainHead, CheckError};
use crate::store::ledger_entry;
use medai_ledger::chain::{self, EntryContent};

/// The most entries one transaction commits.
const MAX_GROUP: usize = 512;
/// Appends waiting for the writer; beyond this, callers wait (backpressure).
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

/// An event, who waits for its receipt, and the span it was appended in (its group commit's
/// span hangs under the first such span and follows from the others).
type Pending = (
    NewEvent,
    oneshot::Sender<Result<AppendReceipt, AppendError>>,
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
        let (reply, receipt) = oneshot::channel();
        self.queue
            .send((event, reply, tracing::Span::current()))
            .await
            .map_err(|_| AppendError::Stopped)?;
        receipt.await.map_err(|_| AppendError::Stopped)?
    }
}

async fn run_writer(
    connection: DatabaseConnection,
    anchor: Arc<ChainAnchor>,
    mut receiver: mpsc::Receiver<Pending>,
) {
    let mut group: Vec<Pending> = Vec::with_capacity(MAX_GROUP);
    while receiver.recv_many(&mut group, MAX_GROUP).await > 0 {
        let events: Vec<&NewEvent> = group.iter().map(|(event, _, _)| event).collect();
        let commit =
            tracing::info_span!(parent: &group[0].2, "audit.group_commit", entries = group.len());
        for (_, _, caller) in &group[1..] {
            commit.follows_from(caller);
        }
        let outcome = commit_group(&connection, &anchor, &events)
            .instrument(commit)
            .await;
        metrics::histogram!("medai_ledger_group_commit_size").record(group.len() as f64);
        match outcome {
            Ok(receipts) => {
                if let Some(last) = receipts.last()
                    && let Some(hash) = anchor::decode_hash(&last.hash)
                {
                    anchor.record_committed(ChainHead {
                        seq: last.seq,
                        hash,
                    });
                }
                for ((_, reply, _), receipt) in group.drain(..).zip(receipts) {
                    let _caller_gone = reply.send(Ok(receipt));
                }
            }
            Err(CheckError::Violation(violation)) => {
                metrics::counter!(anchor::VIOLATION_COUNTER).increment(group.len() as u64);
                tracing::error!(problem = %violation, entries = group.len(), "ledger append refused: the chain does not extend its anchor");
                let error = AppendError::AnchorViolation(violation);
                for (_, reply, _) in group.drain(..) {
                    let _caller_gone = reply.send(Err(error.clone()));
                }
            }
            Err(CheckError::Database(error)) => {
                tracing::error!(error = %error, entries = group.len(), "ledger group commit failed");
                metrics::counter!("medai_ledger_append_failures_total")
                    .increment(group.len() as u64);
                let error = AppendError::Storage(error.to_string());
                for (_, reply, _) in group.drain(..) {
                    let _caller_gone = reply.send(Err(error.clone()));
                }
            }
        }
    }
}

async fn commit_group(
    connection: &DatabaseConnection,
    anchor: &ChainAnchor,
    events: &[&NewEvent],
) -> Result<Vec<AppendReceipt>, CheckError> {
    if let Some(violation) = anchor.violation() {
        return Err(CheckError::Violation(violation));
    }
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
    let (mut seq, mut prev_hash) = match head {
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
    let recorded_at = now_rfc3339_micros();
    let mut rows = Vec::with_capacity(events.len());
    let mut receipts = Vec::with_capacity(events.len());
    for event in events {
        seq += 1;
        let content = EntryContent {
            seq,
            recorded_at: recorded_at.clone(),
            actor: event.actor.clone(),
            action: event.action.clone(),
            resource: event.resource.clone(),
            outcome: event.outcome.clone(),
            context: event.context.clone(),
        };
        let hash = chain::entry_hash(&prev_hash, &content);
        let hash_hex = hex::encode(hash);
        rows.push(ledger_entry::ActiveModel {
            seq: Set(seq as i64),
            recorded_at: Set(content.recorded_at),
            actor: Set(content.actor),
            action: Set(content.action),
            resource: Set(content.resource),
            outcome: Set(content.outcome),
            context: Set(content.context),
            prev_hash: Set(hex::encode(prev_hash)),
            hash: Set(hash_hex.clone()),
            encoding_version: Set(chain::ENCODING_VERSION as i32),
        });
        receipts.push(AppendReceipt {
            seq,
            hash: hash_hex,
            recorded_at: recorded_at.clone(),
        });
        prev_hash = hash;
    }
    ledger_entry::Entity::insert_many(rows)
        .exec(&transaction)
        .await?;
    transaction.commit().await?;
    Ok(receipts)
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
