//! Verification of the stored ledger: every entry read back in order, every hash recomputed,
//! every stored checkpoint's signature and Merkle root checked against the recomputed chain.

use medai_ledger::chain::{ChainVerifier, EntryContent, Hash, StoredEntry};
use medai_ledger::checkpoint::Checkpoint;
use medai_ledger::export::{LedgerAudit, OfflineReport};
use sea_orm::{
    ColumnTrait, DatabaseConnection, DbErr, EntityTrait, QueryFilter, QueryOrder, QuerySelect,
};

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
/// streaming walk (the same [`LedgerAudit`] the offline verifier runs over an export).
pub async fn verify_ledger(
    connection: &DatabaseConnection,
    public_key: &[u8],
) -> Result<OfflineReport, DbErr> {
    let mut audit = LedgerAudit::new(public_key, stored_checkpoints(connection).await?);
    for_each_entry(connection, |row| audit.add_entry(stored_entry(row))).await?;
    Ok(audit.report())
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
