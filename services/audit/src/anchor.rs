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

/// Why a chain does not extend the anchor; names seqs and hashes only.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct AnchorViolation(pub String);

#[derive(Default)]
struct AnchorState {
    /// The head this process last committed (or found at start and accepted).
    committed: Option<ChainHead>,
    /// The newest signed checkpoint this process knows of.
    checkpoint: Option<ChainHead>,
    violation: Option<AnchorViolation>,
}

#[derive(Default)]
pub struct ChainAnchor {
    state: Mutex<AnchorState>,
}

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

    /// The furthest point the chain must pass through, and what it is.
    fn furthest(&self) -> Option<(ChainHead, &'static str)> {
        let state = self.state();
        let committed = state
            .committed
            .map(|head| (head, "the head this process committed,"));
        let checkpoint = state
            .checkpoint
            .map(|head| (head, "the newest signed checkpoint,"));
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
        let found = match stored {
            None if anchor.seq > 0 => Some(format!(
                "the ledger is empty, but {} must still be in it",
                described(kind, anchor)
            )),
            None => None,
            Some(head) if head.seq < anchor.seq => Some(format!(
                "the ledger ends at seq {}, shorter than {}",
                head.seq,
                described(kind, anchor)
            )),
            Some(head) if head.seq == anchor.seq => (head.hash != anchor.hash).then(|| {
                format!(
                    "the entry at seq {} has hash {}, not {}",
                    head.seq,
                    hex::encode(head.hash),
                    described(kind, anchor)
                )
            }),
            Some(_) => match stored_hash_at(connection, anchor.seq).await? {
                Some(hash) if hash == anchor.hash => None,
                Some(hash) => Some(format!(
                    "the entry at seq {} has hash {}, not {}",
                    anchor.seq,
                    hex::encode(hash),
                    described(kind, anchor)
                )),
                None => Some(format!(
                    "the entry at seq {} is gone: {}",
                    anchor.seq,
                    described(kind, anchor)
                )),
            },
        };
        match found {
            None => Ok(()),
            Some(problem) => {
                let violation = AnchorViolation(problem);
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
