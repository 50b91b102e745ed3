//! Reading the ledger: filtered, paginated queries and the JSON Lines export.

use medai_ledger::export::{ExportRecord, ExportedEntry};
use sea_orm::{
    ColumnTrait, Condition, DatabaseConnection, DbErr, EntityTrait, QueryFilter, QueryOrder,
    QuerySelect,
};

use crate::store::ledger_entry;
use crate::verify::{for_each_entry, stored_checkpoints};

#[derive(Clone, Debug, Default)]
pub struct EventFilter {
    pub recorded_from: Option<String>,
    pub recorded_to: Option<String>,
    pub actor: Option<String>,
    pub action: Option<String>,
    pub resource: Option<String>,
}

pub const MAX_PAGE: u64 = 1000;

/// Up to `page_size` entries after seq `after`, matching `filter`, and whether more may follow.
pub async fn query_events(
    connection: &DatabaseConnection,
    filter: &EventFilter,
    after: i64,
    page_size: u64,
) -> Result<(Vec<ledger_entry::Model>, bool), DbErr> {
    let mut condition = Condition::all().add(ledger_entry::Column::Seq.gt(after));
    // recorded_at is fixed-width RFC 3339 UTC, so text order is time order.
    if let Some(from) = &filter.recorded_from {
        condition = condition.add(ledger_entry::Column::RecordedAt.gte(from.as_str()));
    }
    if let Some(to) = &filter.recorded_to {
        condition = condition.add(ledger_entry::Column::RecordedAt.lte(to.as_str()));
    }
    if let Some(actor) = &filter.actor {
        condition = condition.add(ledger_entry::Column::Actor.eq(actor.as_str()));
    }
    if let Some(action) = &filter.action {
        condition = condition.add(ledger_entry::Column::Action.eq(action.as_str()));
    }
    if let Some(resource) = &filter.resource {
        condition = condition.add(ledger_entry::Column::Resource.eq(resource.as_str()));
    }
    let mut rows = ledger_entry::Entity::find()
        .filter(condition)
        .order_by_asc(ledger_entry::Column::Seq)
        .limit(page_size + 1)
        .all(connection)
        .await?;
    let more = rows.len() as u64 > page_size;
    rows.truncate(page_size as usize);
    Ok((rows, more))
}

pub fn exported(row: ledger_entry::Model) -> ExportedEntry {
    ExportedEntry {
        seq: u64::try_from(row.seq).unwrap_or(u64::MAX),
        recorded_at: row.recorded_at,
        actor: row.actor,
        action: row.action,
        resource: row.resource,
        outcome: row.outcome,
        context: row.context,
        prev_hash: row.prev_hash,
        hash: row.hash,
        encoding_version: u32::try_from(row.encoding_version).unwrap_or(u32::MAX),
    }
}

/// The whole ledger as JSON Lines: every entry in seq order, then every checkpoint, in chunks
/// of about `chunk_bytes`.
pub async fn export_chunks(
    connection: &DatabaseConnection,
    chunk_bytes: usize,
) -> Result<Vec<String>, DbErr> {
    let mut chunks = Vec::new();
    let mut current = String::new();
    let push = |record: ExportRecord, current: &mut String, chunks: &mut Vec<String>| {
        if let Ok(line) = serde_json::to_string(&record) {
            current.push_str(&line);
            current.push('\n');
        }
        if current.len() >= chunk_bytes {
            chunks.push(std::mem::take(current));
        }
    };
    for_each_entry(connection, |row| {
        push(
            ExportRecord::Entry(exported(row)),
            &mut current,
            &mut chunks,
        )
    })
    .await?;
    for checkpoint in stored_checkpoints(connection).await? {
        push(
            ExportRecord::Checkpoint(checkpoint),
            &mut current,
            &mut chunks,
        );
    }
    if !current.is_empty() {
        chunks.push(current);
    }
    Ok(chunks)
}
