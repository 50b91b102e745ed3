//! Verification of the stored ledger: every entry read back in order, every hash recomputed,
//! every stored checkpoint's signature and Merkle root checked against the recomputed chain.

use medai_ledger::chain::{EntryContent, StoredEntry};
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
    mut visit: impl FnMut(ledger_entry::Model),
) -> Result<(), DbErr> {
    let mut last_seq: i64 = 0;
    loop {
        let page = ledger_entry::Entity::find()
            .filter(ledger_entry::Column::Seq.gt(last_seq))
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

/// The chain and every checkpoint, judged against the checkpoint public key.
pub async fn audit_ledger(connection: &DatabaseConnection) -> Result<LedgerAudit, DbErr> {
    let mut audit = LedgerAudit::new();
    for_each_entry(connection, |row| audit.add_entry(stored_entry(row))).await?;
    for checkpoint in stored_checkpoints(connection).await? {
        audit.add_checkpoint(checkpoint);
    }
    Ok(audit)
}

pub async fn verify_ledger(
    connection: &DatabaseConnection,
    public_key: &[u8],
) -> Result<OfflineReport, DbErr> {
    Ok(audit_ledger(connection).await?.report(public_key))
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
