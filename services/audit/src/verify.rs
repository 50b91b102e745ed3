//! Verification of the stored ledger: every entry read back in order, every hash recomputed,
//! every stored checkpoint's signature and Merkle root checked against the recomputed chain.

use std::collections::VecDeque;

use medai_ledger::chain::{ChainVerifier, EntryContent, EntryDigest, Hash, StoredEntry};
use medai_ledger::checkpoint::Checkpoint;
use medai_ledger::export::{LedgerAudit, OfflineReport};
use sea_orm::sqlx::{self, Row};
use sea_orm::{
    ColumnTrait, DatabaseConnection, DatabaseConnectionType, DbErr, EntityTrait, QueryFilter,
    QueryOrder, QuerySelect, RuntimeErr,
};
use tokio_stream::StreamExt;

use crate::store::{ledger_checkpoint, ledger_entry};

const PAGE: u64 = 5000;

/// Reads every entry in seq order, page by page, handing each to `visit`.
pub async fn for_each_entry(
    connection: &DatabaseConnection,
    visit: impl FnMut(ledger_entry::Model),
) -> Result<(), DbErr> {
    for_each_entry_between(connection, 0, u64::MAX, visit).await
}

/// Reads the entries with `after < seq <= until` in seq order, page by page.
pub async fn for_each_entry_between(
    connection: &DatabaseConnection,
    after: u64,
    until: u64,
    mut visit: impl FnMut(ledger_entry::Model),
) -> Result<(), DbErr> {
    let mut last_seq = i64::try_from(after).unwrap_or(i64::MAX);
    let until = i64::try_from(until).unwrap_or(i64::MAX);
    loop {
        let page = ledger_entry::Entity::find()
            .filter(ledger_entry::Column::Seq.gt(last_seq))
            .filter(ledger_entry::Column::Seq.lte(until))
            .order_by_asc(ledger_entry::Column::Seq)
            .limit(PAGE)
            .all(connection)
            .await?;
        let Some(last) = page.last() else {
            return Ok(());
        };
        last_seq = last.seq;
        page.into_iter().for_each(&mut visit);
    }
}

pub async fn stored_checkpoints(connection: &DatabaseConnection) -> Result<Vec<Checkpoint>, DbErr> {
    let rows = ledger_checkpoint::Entity::find()
        .order_by_asc(ledger_checkpoint::Column::TreeSize)
        .all(connection)
        .await?;
    Ok(rows.into_iter().map(checkpoint_of).collect())
}

pub fn checkpoint_of(row: ledger_checkpoint::Model) -> Checkpoint {
    Checkpoint {
        tree_size: u64::try_from(row.tree_size).unwrap_or(u64::MAX),
        head_hash: row.head_hash,
        merkle_root: row.merkle_root,
        created_at: row.created_at,
        key_id: row.key_id,
        signature: row.signature,
    }
}

/// The chain and every stored checkpoint, judged against the checkpoint public key in one
/// streaming walk (the same [`LedgerAudit`] the offline verifier runs over an export). On
/// PostgreSQL the entries come as one streamed query, read in place from the rows and hashed
/// on the blocking pool in batches ([`RowDigester`]) while this task links them in order.
pub async fn verify_ledger(
    connection: &DatabaseConnection,
    public_key: &[u8],
) -> Result<OfflineReport, DbErr> {
    verify_ledger_in_batches(connection, public_key, ROWS_PER_BATCH).await
}

/// [`verify_ledger`] with `rows_per_batch` rows hashed per blocking task.
pub async fn verify_ledger_in_batches(
    connection: &DatabaseConnection,
    public_key: &[u8],
    rows_per_batch: usize,
) -> Result<OfflineReport, DbErr> {
    let Some(pool) = postgres_pool(connection) else {
        return verify_ledger_paged(connection, public_key).await;
    };
    let mut audit = LedgerAudit::new(public_key, stored_checkpoints(connection).await?);
    let mut digester = RowDigester::new(rows_per_batch);
    let mut rows = sqlx::query(SELECT_ENTRIES_IN_ORDER).fetch(pool);
    while let Some(row) = rows.next().await {
        let row = row.map_err(query_error)?;
        let (seq, encoding_version, fields) = stored_columns(&row)?;
        digester.batch.push(seq, encoding_version, fields);
        digester.batch_full(&mut audit).await?;
    }
    digester.finish(&mut audit).await?;
    Ok(audit.report())
}

/// The walk as it was before entries were streamed and hashed in parallel: pages of sea-orm
/// models, one entry after the other on this task. Serves SQLite, and is the reference (and
/// the bench's baseline) the streamed walk is held to.
pub async fn verify_ledger_paged(
    connection: &DatabaseConnection,
    public_key: &[u8],
) -> Result<OfflineReport, DbErr> {
    let mut audit = LedgerAudit::new(public_key, stored_checkpoints(connection).await?);
    for_each_entry(connection, |row| audit.add_entry(stored_entry(row))).await?;
    Ok(audit.report())
}

/// The entries with `after < seq <= until` in seq order, each as its [`EntryDigest`], until
/// `visit` answers `false`. On PostgreSQL one streamed query whose rows are digested where
/// they lie (no model and no owned text per row); elsewhere the paged walk.
pub async fn for_each_digest_between(
    connection: &DatabaseConnection,
    after: u64,
    until: u64,
    mut visit: impl FnMut(EntryDigest) -> bool,
) -> Result<(), DbErr> {
    let Some(pool) = postgres_pool(connection) else {
        let mut going = true;
        return for_each_entry_between(connection, after, until, |row| {
            if going {
                going = visit(EntryDigest::of_entry(&stored_entry(row)));
            }
        })
        .await;
    };
    let mut rows = sqlx::query(SELECT_ENTRIES_BETWEEN)
        .bind(i64::try_from(after).unwrap_or(i64::MAX))
        .bind(i64::try_from(until).unwrap_or(i64::MAX))
        .fetch(pool);
    let mut digested = 0_u64;
    while let Some(row) = rows.next().await {
        let row = row.map_err(query_error)?;
        let (seq, encoding_version, fields) = stored_columns(&row)?;
        // A negative seq or version can only come from tampering: the chain check refuses it.
        let digest = digest_of_stored(
            u64::try_from(seq).unwrap_or(u64::MAX),
            u32::try_from(encoding_version).unwrap_or(u32::MAX),
            fields,
        );
        if !visit(digest) {
            break;
        }
        // Rows arrive buffered, so this loop may not wait for long: every so often it lets
        // the appends sharing this worker thread run (a catch-up of a million entries hashes
        // for seconds).
        digested += 1;
        if digested.is_multiple_of(YIELD_EVERY_ROWS) {
            tokio::task::yield_now().await;
        }
    }
    Ok(())
}

/// Rows [`for_each_digest_between`] digests between two yields to the runtime.
const YIELD_EVERY_ROWS: u64 = 1024;

/// The entries with `$1 < seq <= $2` in seq order, columns as in [`SELECT_ENTRIES_IN_ORDER`].
const SELECT_ENTRIES_BETWEEN: &str = "SELECT seq, recorded_at, actor, action, resource, outcome, \
     context, prev_hash, hash, encoding_version FROM ledger_entries \
     WHERE seq > $1 AND seq <= $2 ORDER BY seq";

/// Every entry in seq order, the columns in the order [`RowBatch::push`] takes them.
const SELECT_ENTRIES_IN_ORDER: &str = "SELECT seq, recorded_at, actor, action, resource, outcome, \
     context, prev_hash, hash, encoding_version FROM ledger_entries ORDER BY seq";

/// The pool [`verify_ledger`] streams entries from: PostgreSQL's (`None` on SQLite, which is
/// walked in pages).
pub fn postgres_pool(connection: &DatabaseConnection) -> Option<&sqlx::PgPool> {
    match &connection.inner {
        DatabaseConnectionType::SqlxPostgresPoolConnection(_) => {
            Some(connection.get_postgres_connection_pool())
        }
        _ => None,
    }
}

/// A streamed row of [`SELECT_ENTRIES_IN_ORDER`]'s columns: seq, encoding version, and the
/// eight text columns in the order [`RowBatch::push`] takes them. Decoded without sqlx's
/// per-value type check (the types are the migration's: BIGINT, text, INTEGER), which cost as
/// much as the decoding itself; the query is prepared, so values come in PostgreSQL's binary
/// format, in which text is its bytes as stored: the bytes the chain hashes, taken without
/// checking them as UTF-8 first.
fn stored_columns(row: &sqlx::postgres::PgRow) -> Result<(i64, i32, [&[u8]; 8]), DbErr> {
    let text = |index: usize| {
        row.try_get_unchecked::<&[u8], _>(index)
            .map_err(query_error)
    };
    Ok((
        row.try_get_unchecked::<i64, _>(0).map_err(query_error)?,
        row.try_get_unchecked::<i32, _>(9).map_err(query_error)?,
        [
            text(1)?,
            text(2)?,
            text(3)?,
            text(4)?,
            text(5)?,
            text(6)?,
            text(7)?,
            text(8)?,
        ],
    ))
}

/// The digest of an entry from its stored text columns, in [`stored_columns`]' order.
fn digest_of_stored(
    seq: u64,
    encoding_version: u32,
    [
        recorded_at,
        actor,
        action,
        resource,
        outcome,
        context,
        prev_hash,
        hash,
    ]: [&[u8]; 8],
) -> EntryDigest {
    EntryDigest::of_fields(
        seq,
        encoding_version,
        [recorded_at, actor, action, resource, outcome, context],
        prev_hash,
        hash,
    )
}

fn query_error(error: sqlx::Error) -> DbErr {
    DbErr::Query(RuntimeErr::SqlxError(error.into()))
}

/// Rows per batch handed to the blocking pool.
const ROWS_PER_BATCH: usize = 4096;
/// Batches being hashed at once: enough for every core, a fixed memory however long the
/// ledger.
const BATCHES_IN_FLIGHT: usize = 4;

/// Stored entries copied out of their rows into one buffer: seq, version and the end offsets
/// of recorded_at, actor, action, resource, outcome, context, prev_hash and hash.
#[derive(Default)]
pub struct RowBatch {
    text: Vec<u8>,
    rows: Vec<(u64, u32, [usize; 8])>,
}

impl RowBatch {
    /// Adds one row: `fields` are recorded_at, actor, action, resource, outcome, context,
    /// prev_hash and hash as stored. A negative seq or version can only come from tampering;
    /// as in [`stored_entry`] it becomes one the chain check refuses.
    pub fn push(&mut self, seq: i64, encoding_version: i32, fields: [&[u8]; 8]) {
        let mut ends = [0; 8];
        for (end, field) in ends.iter_mut().zip(fields) {
            self.text.extend_from_slice(field);
            *end = self.text.len();
        }
        self.rows.push((
            u64::try_from(seq).unwrap_or(u64::MAX),
            u32::try_from(encoding_version).unwrap_or(u32::MAX),
            ends,
        ));
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    fn clear(&mut self) {
        self.text.clear();
        self.rows.clear();
    }

    /// Each row's [`EntryDigest`], in order (the part of the check that needs no other row).
    pub fn digests(&self, digests: &mut Vec<EntryDigest>) {
        digests.clear();
        let mut start = 0;
        for (seq, encoding_version, ends) in &self.rows {
            let mut fields: [&[u8]; 8] = [&[]; 8];
            for (field, end) in fields.iter_mut().zip(ends) {
                *field = &self.text[start..*end];
                start = *end;
            }
            digests.push(digest_of_stored(*seq, *encoding_version, fields));
        }
    }
}

/// Hashes full [`RowBatch`]es on the blocking pool, up to [`BATCHES_IN_FLIGHT`] at once, and
/// hands their digests to the audit in batch order.
pub struct RowDigester {
    pub batch: RowBatch,
    rows_per_batch: usize,
    in_flight: VecDeque<tokio::task::JoinHandle<(RowBatch, Vec<EntryDigest>)>>,
    spare: Vec<(RowBatch, Vec<EntryDigest>)>,
}

impl RowDigester {
    pub fn new(rows_per_batch: usize) -> Self {
        Self {
            batch: RowBatch::default(),
            rows_per_batch: rows_per_batch.max(1),
            in_flight: VecDeque::new(),
            spare: Vec::new(),
        }
    }

    /// Sends the batch off once it is full, first linking the oldest when too many are out.
    pub async fn batch_full(&mut self, audit: &mut LedgerAudit) -> Result<(), DbErr> {
        if self.batch.len() < self.rows_per_batch {
            return Ok(());
        }
        if self.in_flight.len() >= BATCHES_IN_FLIGHT {
            self.link_oldest(audit).await?;
        }
        self.send();
        Ok(())
    }

    /// Sends what is left and links everything.
    pub async fn finish(mut self, audit: &mut LedgerAudit) -> Result<(), DbErr> {
        if !self.batch.is_empty() {
            self.send();
        }
        while !self.in_flight.is_empty() {
            self.link_oldest(audit).await?;
        }
        Ok(())
    }

    fn send(&mut self) {
        let (mut next, digests) = self.spare.pop().unwrap_or_default();
        next.clear();
        let batch = std::mem::replace(&mut self.batch, next);
        self.in_flight
            .push_back(tokio::task::spawn_blocking(move || {
                let mut digests = digests;
                batch.digests(&mut digests);
                (batch, digests)
            }));
    }

    async fn link_oldest(&mut self, audit: &mut LedgerAudit) -> Result<(), DbErr> {
        let Some(oldest) = self.in_flight.pop_front() else {
            return Ok(());
        };
        let (batch, digests) = oldest
            .await
            .map_err(|error| DbErr::Custom(format!("a verification task failed: {error}")))?;
        for digest in &digests {
            audit.add_digest(digest);
        }
        self.spare.push((batch, digests));
        Ok(())
    }
}

/// The recomputed entry hashes of the chain up to its first break, for proofs: never the
/// stored ones.
pub async fn verified_hashes(connection: &DatabaseConnection) -> Result<Vec<Hash>, DbErr> {
    let mut verifier = ChainVerifier::new();
    let mut hashes = Vec::new();
    let mut broken = false;
    for_each_entry(connection, |row| {
        if broken {
            return;
        }
        match verifier.check(&stored_entry(row)) {
            Ok(()) => hashes.push(verifier.head()),
            Err(_) => broken = true,
        }
    })
    .await?;
    Ok(hashes)
}

pub fn stored_entry(row: ledger_entry::Model) -> StoredEntry {
    StoredEntry {
        content: EntryContent {
            // A negative seq can only come from tampering; it will fail the sequence check.
            seq: u64::try_from(row.seq).unwrap_or(u64::MAX),
            recorded_at: row.recorded_at,
            actor: row.actor,
            action: row.action,
            resource: row.resource,
            outcome: row.outcome,
            context: row.context,
        },
        encoding_version: u32::try_from(row.encoding_version).unwrap_or(u32::MAX),
        prev_hash_hex: row.prev_hash,
        hash_hex: row.hash,
    }
}
