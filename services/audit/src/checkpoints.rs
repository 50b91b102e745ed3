//! Signing checkpoints: only over a chain that verifies, serialised with appends across
//! replicas, stored append-only.

use std::sync::Arc;
use std::time::Duration;

use medai_ledger::checkpoint::{Checkpoint, CheckpointSigner};
use medai_ledger::merkle;
use sea_orm::{
    ConnectionTrait, DatabaseBackend, DatabaseConnection, DbErr, EntityTrait, QueryOrder, Set,
    TransactionTrait,
};

use crate::appender::{LEDGER_LOCK_KEY, now_rfc3339_micros};
use crate::store::ledger_checkpoint;
use crate::verify::{audit_ledger, checkpoint_of};

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("the ledger does not verify at seq {seq}; no checkpoint is signed over it: {problem}")]
    BrokenChain { seq: u64, problem: String },
    #[error(transparent)]
    Database(#[from] DbErr),
}

pub struct Checkpointer {
    pub connection: DatabaseConnection,
    pub signer: Arc<CheckpointSigner>,
}

impl Checkpointer {
    /// Signs a checkpoint of the whole ledger as it is now; if the newest checkpoint already
    /// covers every entry, returns it.
    pub async fn create(&self) -> Result<Checkpoint, CheckpointError> {
        let transaction = self.connection.begin().await?;
        if transaction.get_database_backend() == DatabaseBackend::Postgres {
            // Appends wait meanwhile, so the checkpoint describes a settled prefix.
            transaction
                .execute_unprepared(&format!("SELECT pg_advisory_xact_lock({LEDGER_LOCK_KEY})"))
                .await?;
        }
        let audit = audit_ledger(&self.connection).await?;
        let hashes = audit.recomputed_hashes().to_vec();
        let report = audit.report(self.signer.public_key());
        if let Some(seq) = report.first_bad_seq {
            return Err(CheckpointError::BrokenChain {
                seq,
                problem: report.problem,
            });
        }
        let latest = ledger_checkpoint::Entity::find()
            .order_by_desc(ledger_checkpoint::Column::TreeSize)
            .one(&transaction)
            .await?;
        if let Some(latest) =
            latest.filter(|latest| latest.tree_size as u64 == report.entries_verified)
        {
            return Ok(checkpoint_of(latest));
        }
        // Over the recomputed chain, which the report proved matches the stored hashes.
        let head = hashes
            .last()
            .copied()
            .unwrap_or_else(medai_ledger::chain::genesis_hash);
        let checkpoint = self.signer.sign(
            hashes.len() as u64,
            &head,
            &merkle::root(&hashes),
            &now_rfc3339_micros(),
        );
        ledger_checkpoint::Entity::insert(ledger_checkpoint::ActiveModel {
            tree_size: Set(checkpoint.tree_size as i64),
            head_hash: Set(checkpoint.head_hash.clone()),
            merkle_root: Set(checkpoint.merkle_root.clone()),
            created_at: Set(checkpoint.created_at.clone()),
            key_id: Set(checkpoint.key_id.clone()),
            signature: Set(checkpoint.signature.clone()),
        })
        .exec(&transaction)
        .await?;
        transaction.commit().await?;
        tracing::info!(tree_size = checkpoint.tree_size, root = %checkpoint.merkle_root, "checkpoint signed");
        metrics::counter!("medai_ledger_checkpoints_total").increment(1);
        Ok(checkpoint)
    }

    /// Signs a checkpoint every `period` until the task is aborted.
    pub async fn run_periodically(self: Arc<Self>, period: Duration) {
        let mut ticks = tokio::time::interval(period);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks.tick().await;
        loop {
            ticks.tick().await;
            if let Err(error) = self.create().await {
                tracing::error!(error = %error, "periodic checkpoint failed");
            }
        }
    }
}
