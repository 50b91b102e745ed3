//! `ChainAnchor`: what this process knows the chain must extend. The database refuses UPDATE,
//! DELETE and TRUNCATE, but a superuser can switch that off; then a truncated ledger would
//! quietly restart from genesis and a deleted last row would have its seq reused. So the
//! writer remembers the head it last committed and the newest signed checkpoint, and refuses
//! to append to any chain that is shorter than either or does not pass through it.
//!
//! A violation is sticky for the life of the process: appends stay refused (FAILED_PRECONDITION,
//! `LEDGER_ANCHOR_VIOLATION`) until an operator has looked, repaired and restarted, and a
//! restart checks the stored head against the newest checkpoint again. Reads, Verify and
//! Export keep working so the damage can be examined.

use std::sync::Mutex;

use medai_ledger::chain::Hash;
use sea_orm::{ConnectionTrait, DbErr, EntityTrait};

use crate::store::ledger_entry;

/// Counts refused appends (one per refused group); alert on any increase.
pub const VIOLATION_COUNTER: &str = "medai_audit_chain_anchor_violation_total";
/// 1 while this process refuses appends because the chain no longer extends its anchor.
pub const VIOLATION_GAUGE: &str = "medai_audit_chain_anchor_violated";

/// One point of the chain: the entry at `seq` has hash `hash` (seq 0 is genesis).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChainHead {
    pub seq: u64,
    pub hash: Hash,
}

/// 1 while this process refuses appends because the stored chain ends before a checkpoint it
/// signed (a restore from an older backup); see [`MISSING_ENTRIES_GAUGE`].
pub const BEHIND_CHECKPOINT_GAUGE: &str = "medai_audit_ledger_behind_checkpoint";
/// How many entries a signed checkpoint covers that the stored chain does not hold.
pub const MISSING_ENTRIES_GAUGE: &str = "medai_audit_ledger_missing_entries";
/// The readiness dependency that is gone while appends are refused (health NOT_SERVING).
pub const READINESS_DEPENDENCY: &str = "ledger chain extends its anchor";

/// Why a chain does not extend the anchor; names seqs and hashes only.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{problem}")]
pub struct AnchorViolation {
    pub problem: String,
    /// Entries `first..=last` that a signed checkpoint covers and the stored chain lacks:
    /// the chain is behind a checkpoint (restored from an older backup, or cut).
    pub missing_below_checkpoint: Option<(u64, u64)>,
}

impl AnchorViolation {
    /// A chain that does not pass through the anchor (no range can be named).
    pub fn diverged(problem: String) -> Self {
        Self {
            problem,
            missing_below_checkpoint: None,
        }
    }
}

#[derive(Default)]
struct AnchorState {
    /// The head this process last committed (or found at start and accepted).
    committed: Option<ChainHead>,
    /// The newest signed checkpoint this process knows of.
    checkpoint: Option<ChainHead>,
    violation: Option<AnchorViolation>,
}

pub struct ChainAnchor {
    state: Mutex<AnchorState>,
    /// The process's readiness, captured where the service started (spawned tasks do not
    /// inherit it): a violation makes health NOT_SERVING with [`READINESS_DEPENDENCY`].
    readiness: medai_runtime::health::Readiness,
}

impl Default for ChainAnchor {
    fn default() -> Self {
        Self {
            state: Mutex::default(),
            readiness: medai_runtime::health::Readiness::of_this_process(),
        }
    }
}

const COMMITTED: &str = "the head this process committed,";
const CHECKPOINT: &str = "the newest signed checkpoint,";

/// Where the anchor came from, for the log line and the refusal.
fn described(kind: &str, head: ChainHead) -> String {
    format!("{kind} seq {} (hash {})", head.seq, hex::encode(head.hash))
}

impl ChainAnchor {
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, AnchorState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The violation that stops appends, if one was found.
    pub fn violation(&self) -> Option<AnchorViolation> {
        self.state().violation.clone()
    }

    pub fn record_committed(&self, head: ChainHead) {
        self.state().committed = Some(head);
    }

    /// Remembers a signed checkpoint; a smaller one than already known changes nothing.
    pub fn record_checkpoint(&self, head: ChainHead) {
        let mut state = self.state();
        if state.checkpoint.is_none_or(|known| known.seq < head.seq) {
            state.checkpoint = Some(head);
        }
    }

    /// The head this process committed last, when nothing else constrains the next append:
    /// no violation, and no newer signed checkpoint. A group may then be appended after it in
    /// one statement that checks the stored head is still exactly this one.
    pub fn committed_head_to_extend(&self) -> Option<ChainHead> {
        let state = self.state();
        if state.violation.is_some() {
            return None;
        }
        let committed = state.committed.filter(|head| head.seq > 0)?;
        state
            .checkpoint
            .is_none_or(|checkpoint| checkpoint.seq <= committed.seq)
            .then_some(committed)
    }

    /// The furthest point the chain must pass through, and what it is.
    fn furthest(&self) -> Option<(ChainHead, &'static str)> {
        let state = self.state();
        let committed = state.committed.map(|head| (head, COMMITTED));
        let checkpoint = state.checkpoint.map(|head| (head, CHECKPOINT));
        match (committed, checkpoint) {
            (Some(committed), Some(checkpoint)) if checkpoint.0.seq > committed.0.seq => {
                Some(checkpoint)
            }
            (Some(committed), _) => Some(committed),
            (None, checkpoint) => checkpoint,
        }
    }

    /// Stops appends: logs once, raises the gauge. Sticky until restart.
    pub fn raise(&self, violation: AnchorViolation) {
        let mut state = self.state();
        if state.violation.is_none() {
            tracing::error!(
                problem = %violation,
                "LEDGER ANCHOR VIOLATION: the stored chain does not extend what was committed or signed; appends are refused until an operator repairs the ledger and restarts"
            );
            metrics::gauge!(VIOLATION_GAUGE).set(1.0);
            if let Some((first, last)) = violation.missing_below_checkpoint {
                tracing::error!(
                    missing_from_seq = first,
                    missing_to_seq = last,
                    "LEDGER BEHIND CHECKPOINT: entries a signed checkpoint covers are not in the database; restore a backup that holds them"
                );
                metrics::gauge!(BEHIND_CHECKPOINT_GAUGE).set(1.0);
                metrics::gauge!(MISSING_ENTRIES_GAUGE).set((last + 1 - first) as f64);
            }
            self.readiness.set_dependency(READINESS_DEPENDENCY, false);
            state.violation = Some(violation);
        }
    }

    /// Checks the stored head (`stored`, `None` for an empty table) against the anchor, reading
    /// one row by key when the chain has grown past it (another replica appended). Call with
    /// the ledger's write lock held.
    pub async fn check(
        &self,
        connection: &impl ConnectionTrait,
        stored: Option<ChainHead>,
    ) -> Result<(), CheckError> {
        if let Some(violation) = self.violation() {
            return Err(CheckError::Violation(violation));
        }
        let Some((anchor, kind)) = self.furthest() else {
            return Ok(());
        };
        let behind = |first: u64| (kind == CHECKPOINT).then_some((first, anchor.seq));
        let found = match stored {
            None if anchor.seq > 0 => Some(AnchorViolation {
                problem: format!(
                    "the ledger is empty, but {} must still be in it: entries 1..={} are missing",
                    described(kind, anchor),
                    anchor.seq
                ),
                missing_below_checkpoint: behind(1),
            }),
            None => None,
            Some(head) if head.seq < anchor.seq => Some(AnchorViolation {
                problem: format!(
                    "the ledger ends at seq {}, shorter than {}: entries {}..={} are missing",
                    head.seq,
                    described(kind, anchor),
                    head.seq + 1,
                    anchor.seq
                ),
                missing_below_checkpoint: behind(head.seq + 1),
            }),
            Some(head) if head.seq == anchor.seq => (head.hash != anchor.hash).then(|| {
                AnchorViolation::diverged(format!(
                    "the entry at seq {} has hash {}, not {}",
                    head.seq,
                    hex::encode(head.hash),
                    described(kind, anchor)
                ))
            }),
            Some(_) => match stored_hash_at(connection, anchor.seq).await? {
                Some(hash) if hash == anchor.hash => None,
                Some(hash) => Some(AnchorViolation::diverged(format!(
                    "the entry at seq {} has hash {}, not {}",
                    anchor.seq,
                    hex::encode(hash),
                    described(kind, anchor)
                ))),
                None => Some(AnchorViolation::diverged(format!(
                    "the entry at seq {} is gone: {}",
                    anchor.seq,
                    described(kind, anchor)
                ))),
            },
        };
        match found {
            None => Ok(()),
            Some(violation) => {
                self.raise(violation.clone());
                Err(CheckError::Violation(violation))
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error(transparent)]
    Violation(AnchorViolation),
    #[error(transparent)]
    Database(#[from] DbErr),
}

/// The stored hash of the entry at `seq` (`Some(genesis)` for seq 0), if there is one.
pub async fn stored_hash_at(
    connection: &impl ConnectionTrait,
    seq: u64,
) -> Result<Option<Hash>, DbErr> {
    if seq == 0 {
        return Ok(Some(medai_ledger::chain::genesis_hash()));
    }
    let Ok(key) = i64::try_from(seq) else {
        return Ok(None);
    };
    let row = ledger_entry::Entity::find_by_id(key)
        .one(connection)
        .await?;
    // A malformed stored hash cannot equal any anchor: all ones stands for "unreadable".
    Ok(row.map(|row| decode_hash(&row.hash).unwrap_or([0xff; 32])))
}

pub fn decode_hash(hex_text: &str) -> Option<Hash> {
    let mut hash = [0; 32];
    hex::decode_to_slice(hex_text, &mut hash).ok()?;
    Some(hash)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_furthest_anchor_is_the_one_checked() {
        let anchor = ChainAnchor::new();
        assert!(anchor.furthest().is_none());
        anchor.record_committed(ChainHead {
            seq: 5,
            hash: [5; 32],
        });
        anchor.record_checkpoint(ChainHead {
            seq: 3,
            hash: [3; 32],
        });
        assert_eq!(anchor.furthest().map(|(head, _)| head.seq), Some(5));
        anchor.record_checkpoint(ChainHead {
            seq: 9,
            hash: [9; 32],
        });
        anchor.record_checkpoint(ChainHead {
            seq: 7,
            hash: [7; 32],
        });
        assert_eq!(anchor.furthest().map(|(head, _)| head.seq), Some(9));
    }
}
