//! The export format (JSON Lines, one entry or checkpoint per line) and its offline verifier.
//! The verifier recomputes every hash and every Merkle root from the entries' content and
//! checks every checkpoint signature with a public key the auditor supplies; it believes no
//! hash, root or count the export merely states.

use std::io::{BufRead, Seek, SeekFrom};

use serde::{Deserialize, Serialize};

use crate::chain::{ChainVerifier, EntryContent, StoredEntry};
use crate::checkpoint::Checkpoint;
use crate::merkle;

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

/// Walks a ledger in one pass, entries in seq order, and judges it: every hash and every
/// Merkle root recomputed from content, every checkpoint signature checked with the auditor's
/// key. The checkpoints are given first, so each is judged the moment the walk reaches its
/// size: memory stays O(checkpoints + log entries) however long the ledger is. Used by the
/// service's Verify and by the offline verifier alike, so both name the same first bad seq.
pub struct LedgerAudit {
    public_key: Vec<u8>,
    verifier: ChainVerifier,
    frontier: merkle::MerkleFrontier,
    /// Checkpoints not judged yet, largest first (so the next one is `last()`).
    pending: Vec<Checkpoint>,
    chain_break: Option<(u64, String)>,
    checkpoint_break: Option<(u64, String)>,
    /// The size of the last checkpoint that held (0 before any).
    last_good_size: u64,
    checkpoints_verified: u64,
}

impl LedgerAudit {
    /// Starts a walk from genesis that will judge `checkpoints` (in any order) against
    /// `public_key`.
    pub fn new(public_key: &[u8], mut checkpoints: Vec<Checkpoint>) -> Self {
        checkpoints.sort_by_key(|checkpoint| std::cmp::Reverse(checkpoint.tree_size));
        let mut audit = Self {
            public_key: public_key.to_vec(),
            verifier: ChainVerifier::new(),
            frontier: merkle::MerkleFrontier::new(),
            pending: checkpoints,
            chain_break: None,
            checkpoint_break: None,
            last_good_size: 0,
            checkpoints_verified: 0,
        };
        audit.judge_checkpoints_at_frontier();
        audit
    }

    pub fn add_entry(&mut self, entry: StoredEntry) {
        if self.chain_break.is_some() {
            return;
        }
        match self.verifier.check(&entry) {
            Ok(()) => {
                self.frontier.push(&self.verifier.head());
                self.judge_checkpoints_at_frontier();
            }
            Err(broken) => self.chain_break = Some((broken.seq, broken.problem)),
        }
    }

    /// Entries verified so far (the chain up to the first break).
    pub fn entries_verified(&self) -> u64 {
        self.frontier.size()
    }

    /// Judges every pending checkpoint whose size the walk has reached.
    fn judge_checkpoints_at_frontier(&mut self) {
        while self.checkpoint_break.is_none()
            && self
                .pending
                .last()
                .is_some_and(|checkpoint| checkpoint.tree_size <= self.frontier.size())
        {
            let Some(checkpoint) = self.pending.pop() else {
                return;
            };
            self.judge(&checkpoint);
        }
    }

    /// Judges one checkpoint whose size the walk has reached (sizes beyond it are judged by
    /// [`Self::report`] as missing entries).
    fn judge(&mut self, checkpoint: &Checkpoint) {
        let first_unvouched = self.last_good_size + 1;
        if !checkpoint.signature_is_valid(&self.public_key) {
            self.checkpoint_break = Some((
                first_unvouched,
                format!(
                    "checkpoint at size {} is not signed by this key",
                    checkpoint.tree_size
                ),
            ));
            return;
        }
        let holds = checkpoint.tree_size == self.frontier.size()
            && Some(self.verifier.head()) == checkpoint.head()
            && Some(self.frontier.root()) == checkpoint.root();
        if !holds {
            self.checkpoint_break = Some((
                first_unvouched,
                format!(
                    "entries {first_unvouched}..={} differ from what the checkpoint at size {} signed; {}",
                    checkpoint.tree_size,
                    checkpoint.tree_size,
                    self.vouched_so_far(checkpoint.tree_size)
                ),
            ));
            return;
        }
        self.last_good_size = checkpoint.tree_size;
        self.checkpoints_verified += 1;
    }

    /// Where the change lies, as precisely as the checkpoints allow.
    fn vouched_so_far(&self, failing_size: u64) -> String {
        if self.last_good_size == 0 {
            format!("the change lies at or before seq {failing_size} (no earlier checkpoint holds)")
        } else {
            format!(
                "the change lies between the checkpoints at sizes {} (holds) and {failing_size} (does not)",
                self.last_good_size
            )
        }
    }

    pub fn report(mut self) -> OfflineReport {
        // Checkpoints beyond the verified chain: entries they vouch for are missing (or broken).
        while self.checkpoint_break.is_none() {
            let Some(checkpoint) = self.pending.pop() else {
                break;
            };
            if !checkpoint.signature_is_valid(&self.public_key) {
                self.judge(&checkpoint);
                break;
            }
            let seq = self.frontier.size() + 1;
            self.checkpoint_break = Some((
                seq,
                format!(
                    "entries from seq {seq} are missing: a signed checkpoint vouches for {} entries; {}",
                    checkpoint.tree_size,
                    self.vouched_so_far(checkpoint.tree_size)
                ),
            ));
        }
        let first = [self.chain_break, self.checkpoint_break]
            .into_iter()
            .flatten()
            .min_by_key(|(seq, _)| *seq);
        let (first_bad_seq, problem) = match first {
            Some((seq, problem)) => (Some(seq), problem),
            None => (None, String::new()),
        };
        OfflineReport {
            entries_verified: self.frontier.size(),
            checkpoints_verified: self.checkpoints_verified,
            first_bad_seq,
            problem,
            head_hash: hex::encode(self.verifier.head()),
        }
    }
}

/// Reads an export line by line with one reused buffer, handing each record (and its line
/// number) to `visit`. Lines for which `skip` is true are not parsed.
fn for_each_record(
    mut reader: impl BufRead,
    mut skip: impl FnMut(&str) -> bool,
    mut visit: impl FnMut(ExportRecord),
) -> Result<(), ExportError> {
    let mut line = String::new();
    let mut number = 0;
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        number += 1;
        let text = line.trim();
        if text.is_empty() || skip(text) {
            continue;
        }
        let record: ExportRecord =
            serde_json::from_str(text).map_err(|error| ExportError::Malformed {
                line: number,
                reason: error.to_string(),
            })?;
        visit(record);
    }
}

/// How `medai audit export` writes an entry line (serde puts the tag first); such lines hold
/// no checkpoint, so the first pass need not parse them. Any other spelling is parsed.
const ENTRY_LINE_PREFIX: &str = r#"{"type":"entry","#;

/// The checkpoints in an export (or in a file of kept checkpoints), without holding entries.
pub fn read_checkpoints(reader: impl BufRead) -> Result<Vec<Checkpoint>, ExportError> {
    let mut checkpoints = Vec::new();
    for_each_record(
        reader,
        |line| line.starts_with(ENTRY_LINE_PREFIX),
        |record| {
            if let ExportRecord::Checkpoint(checkpoint) = record {
                checkpoints.push(checkpoint);
            }
        },
    )?;
    Ok(checkpoints)
}

/// Verifies an export against the auditor's copy of the checkpoint public key.
pub fn verify_export(
    reader: impl BufRead + Seek,
    public_key: &[u8],
) -> Result<OfflineReport, ExportError> {
    verify_export_with_kept(reader, Vec::new(), public_key)
}

/// Verifies an export, streaming: a first pass collects its checkpoints (entry lines are not
/// parsed), a second walks the entries once, judging every checkpoint (the export's and the
/// auditor's `kept` ones) when the walk reaches its size. Memory does not grow with the
/// number of entries.
pub fn verify_export_with_kept(
    mut reader: impl BufRead + Seek,
    mut kept: Vec<Checkpoint>,
    public_key: &[u8],
) -> Result<OfflineReport, ExportError> {
    kept.extend(read_checkpoints(&mut reader)?);
    reader.seek(SeekFrom::Start(0))?;
    let mut audit = LedgerAudit::new(public_key, kept);
    for_each_record(
        reader,
        |_| false,
        |record| {
            if let ExportRecord::Entry(entry) = record {
                audit.add_entry(entry.into());
            }
        },
    )?;
    Ok(audit.report())
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use super::*;
    use crate::chain::{self, EntryContent};
    use crate::checkpoint::CheckpointSigner;

    fn entries(count: u64, actor: impl Fn(u64) -> String) -> Vec<ExportedEntry> {
        let mut head = chain::genesis_hash();
        (1..=count)
            .map(|seq| {
                let content = EntryContent {
                    seq,
                    recorded_at: "2026-11-22T00:00:00.000000Z".to_owned(),
                    actor: actor(seq),
                    action: "INFERENCE".to_owned(),
                    resource: format!("result/{seq}"),
                    outcome: "SUCCESS".to_owned(),
                    context: "{}".to_owned(),
                };
                let hash = chain::entry_hash(&head, &content);
                let entry = ExportedEntry {
                    seq,
                    recorded_at: content.recorded_at,
                    actor: content.actor,
                    action: content.action,
                    resource: content.resource,
                    outcome: content.outcome,
                    context: content.context,
                    prev_hash: hex::encode(head),
                    hash: hex::encode(hash),
                    encoding_version: chain::ENCODING_VERSION,
                };
                head = hash;
                entry
            })
            .collect()
    }

    fn checkpoint(signer: &CheckpointSigner, entries: &[ExportedEntry], size: u64) -> Checkpoint {
        let hashes: Vec<merkle::Hash> = entries[..size as usize]
            .iter()
            .map(|entry| {
                let mut hash = [0; 32];
                hex::decode_to_slice(&entry.hash, &mut hash).expect("hex");
                hash
            })
            .collect();
        let head = hashes.last().copied().unwrap_or_else(chain::genesis_hash);
        signer.sign(
            size,
            &head,
            &merkle::root(&hashes),
            "2026-11-22T00:00:00.000000Z",
        )
    }

    fn export(entries: &[ExportedEntry], checkpoints: &[Checkpoint]) -> Vec<u8> {
        let mut text = String::new();
        let records = entries
            .iter()
            .cloned()
            .map(ExportRecord::Entry)
            .chain(checkpoints.iter().cloned().map(ExportRecord::Checkpoint));
        for record in records {
            text.push_str(&serde_json::to_string(&record).expect("json"));
            text.push('\n');
        }
        text.into_bytes()
    }

    fn signer() -> CheckpointSigner {
        let directory = std::env::temp_dir().join(format!("medai-export-{}", std::process::id()));
        CheckpointSigner::load_or_create(&directory.join("key")).expect("key")
    }

    #[test]
    fn checkpoints_after_the_entries_are_judged_in_one_streaming_walk() {
        let signer = signer();
        let chain = entries(40, |_| "user:a".to_owned());
        let checkpoints = [10, 25, 40].map(|size| checkpoint(&signer, &chain, size));
        let report = verify_export(
            Cursor::new(export(&chain, &checkpoints)),
            signer.public_key(),
        )
        .expect("readable");
        assert_eq!(
            (
                report.first_bad_seq,
                report.entries_verified,
                report.checkpoints_verified
            ),
            (None, 40, 3),
            "{report:?}"
        );
    }

    #[test]
    fn a_consistent_rewrite_is_placed_between_the_checkpoints_that_bound_it() {
        let signer = signer();
        let original = entries(40, |_| "user:a".to_owned());
        let checkpoints = [10, 25, 40].map(|size| checkpoint(&signer, &original, size));
        // Every hash recomputed after seq 17: the chain itself is intact again.
        let rewritten = entries(40, |seq| {
            if seq >= 17 { "user:mallory" } else { "user:a" }.to_owned()
        });
        let report = verify_export(
            Cursor::new(export(&rewritten, &checkpoints)),
            signer.public_key(),
        )
        .expect("readable");
        assert_eq!(report.first_bad_seq, Some(11), "{report:?}");
        assert_eq!(report.checkpoints_verified, 1);
        assert!(
            report
                .problem
                .contains("between the checkpoints at sizes 10 (holds) and 25 (does not)"),
            "{}",
            report.problem
        );
        // The auditor's kept checkpoints count as much as the export's own.
        let report = verify_export_with_kept(
            Cursor::new(export(&rewritten, &[])),
            checkpoints.to_vec(),
            signer.public_key(),
        )
        .expect("readable");
        assert_eq!(report.first_bad_seq, Some(11), "{report:?}");
    }

    #[test]
    fn entries_missing_under_a_checkpoint_are_named_by_the_first_missing_seq() {
        let signer = signer();
        let chain = entries(30, |_| "user:a".to_owned());
        let checkpoints = [checkpoint(&signer, &chain, 30)];
        let report = verify_export(
            Cursor::new(export(&chain[..22], &checkpoints)),
            signer.public_key(),
        )
        .expect("readable");
        assert_eq!(report.first_bad_seq, Some(23), "{report:?}");
        assert!(report.problem.contains("missing"), "{}", report.problem);
    }

    #[test]
    fn a_malformed_line_is_named_by_its_number_in_either_pass() {
        let signer = signer();
        let chain = entries(3, |_| "user:a".to_owned());
        let mut text = export(&chain, &[]);
        text.extend_from_slice(b"{not json\n");
        let error = verify_export(Cursor::new(text), signer.public_key()).expect_err("malformed");
        assert!(
            matches!(error, ExportError::Malformed { line: 4, .. }),
            "{error}"
        );
        let mut text = export(&chain, &[]);
        text.splice(
            0..0,
            br#"{"type":"entry","seq":"#.iter().copied().chain(*b"\n"),
        );
        let error = verify_export(Cursor::new(text), signer.public_key()).expect_err("malformed");
        assert!(
            matches!(error, ExportError::Malformed { line: 1, .. }),
            "{error}"
        );
    }
}
