//! The export format (JSON Lines, one entry or checkpoint per line) and its offline verifier.
//! The verifier recomputes every hash and every Merkle root from the entries' content and
//! checks every checkpoint signature with a public key the auditor supplies; it believes no
//! hash, root or count the export merely states.

use std::io::BufRead;

use serde::{Deserialize, Serialize};

use crate::chain::{ChainVerifier, EntryContent, StoredEntry};
use crate::checkpoint::Checkpoint;
use crate::merkle::{self, Hash};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ExportRecord {
    Entry(ExportedEntry),
    Checkpoint(Checkpoint),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportedEntry {
    pub seq: u64,
    pub recorded_at: String,
    pub actor: String,
    pub action: String,
    pub resource: String,
    pub outcome: String,
    /// The canonical JSON text exactly as stored and hashed.
    pub context: String,
    pub prev_hash: String,
    pub hash: String,
    pub encoding_version: u32,
}

impl From<ExportedEntry> for StoredEntry {
    fn from(entry: ExportedEntry) -> Self {
        StoredEntry {
            content: EntryContent {
                seq: entry.seq,
                recorded_at: entry.recorded_at,
                actor: entry.actor,
                action: entry.action,
                resource: entry.resource,
                outcome: entry.outcome,
                context: entry.context,
            },
            encoding_version: entry.encoding_version,
            prev_hash_hex: entry.prev_hash,
            hash_hex: entry.hash,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OfflineReport {
    pub entries_verified: u64,
    pub checkpoints_verified: u64,
    /// `None` when everything verifies.
    pub first_bad_seq: Option<u64>,
    pub problem: String,
    pub head_hash: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("line {line}: {reason}")]
    Malformed { line: usize, reason: String },
    #[error("cannot read the export: {0}")]
    Read(#[from] std::io::Error),
}

/// Walks a ledger, entries in seq order then its checkpoints, and judges it: every hash and
/// every Merkle root recomputed from content, every checkpoint signature checked with the
/// auditor's key. Used by the service's Verify and by the offline verifier alike.
#[derive(Default)]
pub struct LedgerAudit {
    verifier: ChainVerifier,
    recomputed: Vec<Hash>,
    checkpoints: Vec<Checkpoint>,
    chain_break: Option<(u64, String)>,
}

impl LedgerAudit {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn add_entry(&mut self, entry: StoredEntry) {
        if self.chain_break.is_some() {
            return;
        }
        match self.verifier.check(&entry) {
            Ok(()) => self.recomputed.push(self.verifier.head()),
            Err(broken) => self.chain_break = Some((broken.seq, broken.problem)),
        }
    }

    pub fn add_checkpoint(&mut self, checkpoint: Checkpoint) {
        self.checkpoints.push(checkpoint);
    }

    /// The recomputed entry hashes so far (the chain up to the first break).
    pub fn recomputed_hashes(&self) -> &[Hash] {
        &self.recomputed
    }

    pub fn report(mut self, public_key: &[u8]) -> OfflineReport {
        self.checkpoints
            .sort_by_key(|checkpoint| checkpoint.tree_size);
        // One walk over the recomputed hashes; each checkpoint is judged when the frontier
        // reaches its size. The first that fails bounds where history was changed: after the
        // last good one.
        let mut frontier = merkle::MerkleFrontier::new();
        let mut hashes = self.recomputed.iter();
        let mut last_good_size = 0_u64;
        let mut checkpoint_break: Option<(u64, String)> = None;
        let mut checkpoints_verified = 0;
        for checkpoint in &self.checkpoints {
            let first_unvouched = last_good_size + 1;
            if !checkpoint.signature_is_valid(public_key) {
                checkpoint_break = Some((
                    first_unvouched,
                    format!(
                        "checkpoint at size {} is not signed by this key",
                        checkpoint.tree_size
                    ),
                ));
                break;
            }
            if checkpoint.tree_size > self.recomputed.len() as u64 {
                let seq = self.recomputed.len() as u64 + 1;
                checkpoint_break = Some((
                    seq,
                    format!(
                        "entries from seq {seq} are missing: a signed checkpoint vouches for {} entries",
                        checkpoint.tree_size
                    ),
                ));
                break;
            }
            while frontier.size() < checkpoint.tree_size {
                match hashes.next() {
                    Some(hash) => frontier.push(hash),
                    None => break,
                }
            }
            let size = usize::try_from(checkpoint.tree_size).unwrap_or(usize::MAX);
            let head = if size == 0 {
                crate::chain::genesis_hash()
            } else {
                self.recomputed[size - 1]
            };
            if Some(head) != checkpoint.head() || Some(frontier.root()) != checkpoint.root() {
                checkpoint_break = Some((
                    first_unvouched,
                    format!(
                        "entries {first_unvouched}..={} differ from what the checkpoint at size {} signed",
                        checkpoint.tree_size, checkpoint.tree_size
                    ),
                ));
                break;
            }
            last_good_size = checkpoint.tree_size;
            checkpoints_verified += 1;
        }
        let first = [self.chain_break, checkpoint_break]
            .into_iter()
            .flatten()
            .min_by_key(|(seq, _)| *seq);
        let (first_bad_seq, problem) = match first {
            Some((seq, problem)) => (Some(seq), problem),
            None => (None, String::new()),
        };
        OfflineReport {
            entries_verified: self.recomputed.len() as u64,
            checkpoints_verified,
            first_bad_seq,
            problem,
            head_hash: hex::encode(self.verifier.head()),
        }
    }
}

/// Verifies an export against the auditor's copy of the checkpoint public key.
pub fn verify_export(
    reader: impl BufRead,
    public_key: &[u8],
) -> Result<OfflineReport, ExportError> {
    let mut audit = LedgerAudit::new();
    for (index, line) in reader.lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let record: ExportRecord =
            serde_json::from_str(&line).map_err(|error| ExportError::Malformed {
                line: index + 1,
                reason: error.to_string(),
            })?;
        match record {
            ExportRecord::Entry(entry) => audit.add_entry(entry.into()),
            ExportRecord::Checkpoint(checkpoint) => audit.add_checkpoint(checkpoint),
        }
    }
    Ok(audit.report(public_key))
}
