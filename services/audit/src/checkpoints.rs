//! Signing checkpoints: only over a chain that verifies, stored append-only.
//!
//! The checkpointer keeps the verified prefix in memory (the chain verifier's head and the
//! RFC 9162 Merkle frontier), so a checkpoint reads and verifies only the entries appended
//! since the last one: its cost does not grow with the ledger. It takes no lock that appends
//! wait for; committed entries always form a prefix (appends commit in seq order under the
//! writer lock), so it verifies up to the head it saw when it started.

use std::sync::Arc;
use std::time::Duration;

use medai_ledger::chain::{ChainVerifier, Hash};
use medai_ledger::checkpoint::{Checkpoint, CheckpointSigner};
use medai_ledger::merkle::MerkleFrontier;
use sea_orm::sea_query::OnConflict;
use sea_orm::{DatabaseConnection, DbErr, EntityTrait, QueryOrder, QuerySelect, Set};
use tokio::sync::Mutex;

use crate::anchor::{ChainAnchor, ChainHead, stored_hash_at};
use crate::appender::now_rfc3339_micros;
use crate::checkpoint_log::CheckpointLog;
use crate::store::{ledger_checkpoint, ledger_entry};
use crate::verify::{checkpoint_of, for_each_digest_between};

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("the ledger does not verify at seq {seq}; no checkpoint is signed over it: {problem}")]
    BrokenChain { seq: u64, problem: String },
    #[error(transparent)]
    Database(#[from] DbErr),
}

/// The prefix of the ledger already verified: entries 1..=size.
#[derive(Clone, Default)]
struct VerifiedPrefix {
    verifier: ChainVerifier,
    frontier: MerkleFrontier,
}

impl VerifiedPrefix {
    fn size(&self) -> u64 {
        self.frontier.size()
    }
}

/// What one checkpoint cost and produced.
#[derive(Clone, Debug)]
pub struct CheckpointOutcome {
    pub checkpoint: Checkpoint,
    /// Entries read and verified for this checkpoint (the new ones only).
    pub entries_read: u64,
}

pub struct Checkpointer {
    connection: DatabaseConnection,
    pub signer: Arc<CheckpointSigner>,
    anchor: Arc<ChainAnchor>,
    /// Held only while one checkpoint (or catch-up) runs; appends never wait for it.
    verified: Mutex<VerifiedPrefix>,
    /// The copy of every checkpoint kept outside the database, when there is one.
    log: Option<Arc<CheckpointLog>>,
}

impl Checkpointer {
    pub fn new(
        connection: DatabaseConnection,
        signer: Arc<CheckpointSigner>,
        anchor: Arc<ChainAnchor>,
    ) -> Self {
        Self {
            connection,
            signer,
            anchor,
            verified: Mutex::new(VerifiedPrefix::default()),
            log: None,
        }
    }

    /// Also appends every checkpoint signed or confirmed from now on to `log`.
    #[must_use]
    pub fn with_log(mut self, log: Arc<CheckpointLog>) -> Self {
        self.log = Some(log);
        self
    }

    /// Verifies the entries appended since the last verified seq, up to the head as it is
    /// now, and keeps the result; returns how many entries were read.
    pub async fn catch_up(&self) -> Result<u64, CheckpointError> {
        let mut verified = self.verified.lock().await;
        self.extend(&mut verified).await
    }

    async fn extend(&self, verified: &mut VerifiedPrefix) -> Result<u64, CheckpointError> {
        let extended = self.extend_unmetered(verified).await;
        if let Err(CheckpointError::BrokenChain { .. }) = &extended {
            metrics::counter!(crate::metric_catalog::CHAIN_VERIFICATION_FAILURES, "check" => "checkpoint")
                .increment(1);
        }
        extended
    }

    async fn extend_unmetered(
        &self,
        verified: &mut VerifiedPrefix,
    ) -> Result<u64, CheckpointError> {
        // The prefix verified earlier must still be there as it was.
        let size = verified.size();
        let head = verified.verifier.head();
        if stored_hash_at(&self.connection, size).await? != Some(head) {
            return Err(CheckpointError::BrokenChain {
                seq: size.max(1),
                problem: format!("the entry at seq {size}, verified earlier, has changed or gone"),
            });
        }
        let target = stored_head_seq(&self.connection).await?;
        if target <= size {
            return Ok(0);
        }
        let mut extended = verified.clone();
        let mut broken = None;
        // Each entry digested as it streams in, then linked: the verdict `check` gives.
        for_each_digest_between(&self.connection, size, target, |digest| {
            match extended.verifier.link(&digest) {
                Ok(()) => {
                    extended.frontier.push_leaf(digest.leaf_hash);
                    true
                }
                Err(chain_break) => {
                    broken = Some(chain_break);
                    false
                }
            }
        })
        .await?;
        if let Some(chain_break) = broken {
            return Err(CheckpointError::BrokenChain {
                seq: chain_break.seq,
                problem: chain_break.problem,
            });
        }
        if extended.size() < target {
            let seq = extended.size() + 1;
            return Err(CheckpointError::BrokenChain {
                seq,
                problem: format!("entry {seq} is missing below the head at seq {target}"),
            });
        }
        let read = extended.size() - size;
        *verified = extended;
        metrics::counter!("medai_ledger_checkpoint_entries_verified_total").increment(read);
        Ok(read)
    }

    /// Signs a checkpoint of the ledger as it is now; if the newest checkpoint already covers
    /// every entry, returns it.
    pub async fn create(&self) -> Result<CheckpointOutcome, CheckpointError> {
        let mut verified = self.verified.lock().await;
        let entries_read = self.extend(&mut verified).await?;
        let size = verified.size();
        let head = verified.verifier.head();
        let root = verified.frontier.root();
        drop(verified);

        let stored = ledger_checkpoint::Entity::find_by_id(to_key(size))
            .one(&self.connection)
            .await?;
        let checkpoint = match stored {
            Some(stored) => self.existing(checkpoint_of(stored), size, &head)?,
            None => self.sign(size, &head, &root).await?,
        };
        self.anchor.record_checkpoint(ChainHead {
            seq: size,
            hash: head,
        });
        if let Some(log) = &self.log
            && let Err(error) = log.append(&checkpoint)
        {
            // The checkpoint is stored and signed; only its outside copy is missing.
            tracing::error!(error = %error, tree_size = size, "checkpoint not written to the checkpoint log");
            metrics::counter!(crate::checkpoint_log::LOG_FAILURE_COUNTER).increment(1);
        }
        Ok(CheckpointOutcome {
            checkpoint,
            entries_read,
        })
    }

    /// A checkpoint already stored for `size` must name the head just verified.
    fn existing(
        &self,
        checkpoint: Checkpoint,
        size: u64,
        head: &Hash,
    ) -> Result<Checkpoint, CheckpointError> {
        if checkpoint.head() == Some(*head)
            && checkpoint.signature_is_valid(self.signer.public_key())
        {
            return Ok(checkpoint);
        }
        Err(CheckpointError::BrokenChain {
            seq: size.max(1),
            problem: format!(
                "the stored checkpoint at size {size} does not match the verified chain or this key"
            ),
        })
    }

    async fn sign(
        &self,
        size: u64,
        head: &Hash,
        root: &Hash,
    ) -> Result<Checkpoint, CheckpointError> {
        let checkpoint = self.signer.sign(size, head, root, &now_rfc3339_micros());
        // Another replica may sign the same size at the same moment; the first row stays.
        let inserted = ledger_checkpoint::Entity::insert(ledger_checkpoint::ActiveModel {
            tree_size: Set(to_key(checkpoint.tree_size)),
            head_hash: Set(checkpoint.head_hash.clone()),
            merkle_root: Set(checkpoint.merkle_root.clone()),
            created_at: Set(checkpoint.created_at.clone()),
            key_id: Set(checkpoint.key_id.clone()),
            signature: Set(checkpoint.signature.clone()),
        })
        .on_conflict(
            OnConflict::column(ledger_checkpoint::Column::TreeSize)
                .do_nothing()
                .to_owned(),
        )
        .exec_without_returning(&self.connection)
        .await?;
        if inserted == 0 {
            let stored = ledger_checkpoint::Entity::find_by_id(to_key(size))
                .one(&self.connection)
                .await?
                .ok_or_else(|| DbErr::RecordNotFound("the checkpoint just stored".to_owned()))?;
            return self.existing(checkpoint_of(stored), size, head);
        }
        tracing::info!(tree_size = checkpoint.tree_size, root = %checkpoint.merkle_root, "checkpoint signed");
        metrics::counter!("medai_ledger_checkpoints_total").increment(1);
        Ok(checkpoint)
    }

    /// Signs a checkpoint every `period` until the task is aborted; verifies what is already
    /// stored first, so later checkpoints only read new entries.
    pub async fn run_periodically(self: Arc<Self>, period: Duration) {
        if let Err(error) = self.catch_up().await {
            tracing::error!(error = %error, "the stored ledger does not verify at start");
        }
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

fn to_key(size: u64) -> i64 {
    i64::try_from(size).unwrap_or(i64::MAX)
}

/// The highest stored seq (0 for an empty ledger).
async fn stored_head_seq(connection: &DatabaseConnection) -> Result<u64, DbErr> {
    let head: Option<i64> = ledger_entry::Entity::find()
        .select_only()
        .column(ledger_entry::Column::Seq)
        .order_by_desc(ledger_entry::Column::Seq)
        .limit(1)
        .into_tuple()
        .one(connection)
        .await?;
    Ok(head.and_then(|seq| u64::try_from(seq).ok()).unwrap_or(0))
}

/// At start: the newest signed checkpoint must be in the stored chain (signed by this key,
/// its entry still there with its hash), whether it is the newest one stored in the database
/// or `kept_outside` (the newest from the checkpoint log, which a database restored from an
/// older backup does not hold). Anything else stops appends through the anchor.
pub async fn check_head_at_start(
    connection: &DatabaseConnection,
    anchor: &ChainAnchor,
    public_key: &[u8],
    kept_outside: Option<&Checkpoint>,
) -> Result<(), DbErr> {
    let newest = ledger_checkpoint::Entity::find()
        .order_by_desc(ledger_checkpoint::Column::TreeSize)
        .one(connection)
        .await?
        .map(checkpoint_of);
    if let Some(newest) = newest {
        let (Some(head), true) = (newest.head(), newest.signature_is_valid(public_key)) else {
            anchor.raise(crate::anchor::AnchorViolation::diverged(format!(
                "the newest stored checkpoint (size {}) is not signed by this service's key",
                newest.tree_size
            )));
            return Ok(());
        };
        anchor.record_checkpoint(ChainHead {
            seq: newest.tree_size,
            hash: head,
        });
    }
    if let Some(outside) = kept_outside
        && let Some(head) = outside.head()
        && outside.signature_is_valid(public_key)
    {
        anchor.record_checkpoint(ChainHead {
            seq: outside.tree_size,
            hash: head,
        });
    }
    let stored_seq = stored_head_seq(connection).await?;
    let stored = match stored_seq {
        0 => None,
        seq => stored_hash_at(connection, seq)
            .await?
            .map(|hash| ChainHead { seq, hash }),
    };
    match anchor.check(connection, stored).await {
        Ok(()) | Err(crate::anchor::CheckError::Violation(_)) => Ok(()),
        Err(crate::anchor::CheckError::Database(error)) => Err(error),
    }
}
