//! The export format (JSON Lines, one entry or checkpoint per line) and its offline verifier.
//! The verifier recomputes every hash and every Merkle root from the entries' content and
//! checks every checkpoint signature with a public key the auditor supplies; it believes no
//! hash, root or count the export merely states.

use std::io::{BufRead, Read, Seek, SeekFrom};
use std::sync::mpsc;

use serde::{Deserialize, Serialize};

use crate::chain::{ChainVerifier, EntryContent, EntryDigest, StoredEntry};
use crate::checkpoint::Checkpoint;
use crate::entry_line::EntryLineReader;
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

    /// [`Self::add_entry`] for an entry digested on another thread ([`EntryDigest`]): the
    /// same verdict, with only the chain link and the Merkle frontier left to do here.
    pub fn add_digest(&mut self, entry: &EntryDigest) {
        if self.chain_break.is_some() {
            return;
        }
        match self.verifier.link(entry) {
            Ok(()) => {
                self.frontier.push_leaf(entry.leaf_hash);
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

/// The checkpoints in an export (or in a file of kept checkpoints), without holding entries:
/// read in large blocks, entry lines only recognised by their prefix, not parsed.
pub fn read_checkpoints(reader: impl BufRead) -> Result<Vec<Checkpoint>, ExportError> {
    let mut chunker = LineChunker::new(reader, CHECKPOINT_PASS_BYTES);
    let mut bytes = Vec::new();
    let mut checkpoints = Vec::new();
    let mut number = 0;
    loop {
        let read = chunker.next_batch(&mut bytes);
        for raw in lines(&bytes) {
            number += 1;
            let text = trimmed_line(raw).ok_or_else(not_utf8)?;
            if text.is_empty() || text.starts_with(ENTRY_LINE_PREFIX.as_bytes()) {
                continue;
            }
            if let ExportRecord::Checkpoint(checkpoint) = parse_record(text, number)? {
                checkpoints.push(checkpoint);
            }
        }
        read?;
        if bytes.is_empty() {
            return Ok(checkpoints);
        }
    }
}

/// The checkpoints as the one-thread reference reads them: line by line, every line checked.
fn read_checkpoints_line_by_line(reader: impl BufRead) -> Result<Vec<Checkpoint>, ExportError> {
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

/// The error `read_line` gives for a line that is not UTF-8.
fn not_utf8() -> ExportError {
    ExportError::Read(std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        "stream did not contain valid UTF-8",
    ))
}

/// The lines of `bytes`, each with its `\n` (the last one without, when it has none), as
/// `read_line` hands them out.
fn lines(bytes: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut start = 0;
    memchr::memchr_iter(b'\n', bytes)
        .map(Some)
        .chain(std::iter::once(None))
        .filter_map(move |newline| {
            let end = newline.map_or(bytes.len(), |newline| newline + 1);
            let line = &bytes[start..end];
            start = end;
            (!line.is_empty()).then_some(line)
        })
}

/// A line (with its `\n`) as `str::trim` leaves it; `None` when it is not UTF-8.
fn trimmed_line(raw: &[u8]) -> Option<&[u8]> {
    if byte_summary(raw).1 < 0x80 {
        // For ASCII, `str::trim` removes exactly these.
        let space = |byte: &u8| matches!(byte, 0x09..=0x0d | b' ');
        let start = raw
            .iter()
            .position(|byte| !space(byte))
            .unwrap_or(raw.len());
        let end = raw
            .iter()
            .rposition(|byte| !space(byte))
            .map_or(start, |last| last + 1);
        Some(&raw[start..end])
    } else {
        std::str::from_utf8(raw)
            .ok()
            .map(|text| text.trim().as_bytes())
    }
}

/// The lowest byte of `bytes` and all its bytes ORed together (below 0x80: ASCII), in one
/// pass the compiler vectorises.
fn byte_summary(bytes: &[u8]) -> (u8, u8) {
    bytes.iter().fold((u8::MAX, 0), |(lowest, all), byte| {
        (lowest.min(*byte), all | byte)
    })
}

/// A record parsed as the reference reader parses it (`text` is a trimmed UTF-8 line).
fn parse_record(text: &[u8], number: usize) -> Result<ExportRecord, ExportError> {
    let text = std::str::from_utf8(text).map_err(|_| not_utf8())?;
    serde_json::from_str(text).map_err(|error| ExportError::Malformed {
        line: number,
        reason: error.to_string(),
    })
}

/// Bytes read per block by the checkpoint pass.
const CHECKPOINT_PASS_BYTES: usize = 1024 * 1024;

/// Reads whole lines in large blocks (one `read` per block, no copy per line): each batch
/// ends at a line's end, the part of a line cut by the block carried to the next batch.
struct LineChunker<R> {
    reader: R,
    carry: Vec<u8>,
    at_end: bool,
    batch_bytes: usize,
}

impl<R: std::io::Read> LineChunker<R> {
    fn new(reader: R, batch_bytes: usize) -> Self {
        Self {
            reader,
            carry: Vec::new(),
            at_end: false,
            batch_bytes: batch_bytes.max(1),
        }
    }

    /// Refills `bytes` with the next whole lines (about `batch_bytes`; empty at the end). On
    /// a read error `bytes` keeps the whole lines read before it, the cut one dropped, as a
    /// line-by-line reader would have handed them out before failing.
    fn next_batch(&mut self, bytes: &mut Vec<u8>) -> Result<(), std::io::Error> {
        bytes.clear();
        bytes.append(&mut self.carry);
        if self.at_end {
            return Ok(());
        }
        loop {
            let want = self.batch_bytes.saturating_sub(bytes.len()).max(4096);
            match (&mut self.reader).take(want as u64).read_to_end(bytes) {
                Ok(0) => {
                    self.at_end = true;
                    return Ok(());
                }
                Ok(_) => {}
                Err(error) => {
                    bytes.truncate(memchr::memrchr(b'\n', bytes).map_or(0, |last| last + 1));
                    self.at_end = true;
                    return Err(error);
                }
            }
            if bytes.len() >= self.batch_bytes
                && let Some(last) = memchr::memrchr(b'\n', bytes)
            {
                self.carry.extend_from_slice(&bytes[last + 1..]);
                bytes.truncate(last + 1);
                return Ok(());
            }
        }
    }
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
/// number of entries. The second pass parses and hashes entries on every core
/// ([`audit_entry_lines`]); its verdict is the one [`verify_export_sequential`] gives.
pub fn verify_export_with_kept(
    reader: impl BufRead + Seek,
    kept: Vec<Checkpoint>,
    public_key: &[u8],
) -> Result<OfflineReport, ExportError> {
    verify_export_with_pipeline(reader, kept, public_key, LinePipeline::default())
}

/// [`verify_export_with_kept`] with the walk split as `pipeline` says.
pub fn verify_export_with_pipeline(
    mut reader: impl BufRead + Seek,
    mut kept: Vec<Checkpoint>,
    public_key: &[u8],
    pipeline: LinePipeline,
) -> Result<OfflineReport, ExportError> {
    kept.extend(read_checkpoints(&mut reader)?);
    reader.seek(SeekFrom::Start(0))?;
    let mut audit = LedgerAudit::new(public_key, kept);
    audit_entry_lines(reader, &mut audit, pipeline)?;
    Ok(audit.report())
}

/// The one-thread verifier: every line parsed into owned records and fed to
/// [`LedgerAudit::add_entry`] in order. The reference the parallel verifier is held to (same
/// report, same error), and the baseline the ledger bench measures it against.
pub fn verify_export_sequential(
    mut reader: impl BufRead + Seek,
    mut kept: Vec<Checkpoint>,
    public_key: &[u8],
) -> Result<OfflineReport, ExportError> {
    kept.extend(read_checkpoints_line_by_line(&mut reader)?);
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

/// What a worker made of one line of the export.
#[derive(Debug)]
enum LineOutcome {
    Entry(EntryDigest),
    /// A checkpoint: read by the first pass, nothing to do in the walk.
    Other,
    /// `line` counts from the start of its batch.
    Malformed {
        line: usize,
        reason: String,
    },
    /// The line is not UTF-8: the sequential reader fails here with an I/O error.
    NotUtf8,
}

/// Whole lines of the export and what a worker made of them.
#[derive(Default)]
struct LineBatch {
    bytes: Vec<u8>,
    /// Lines in `bytes` (when all are UTF-8).
    lines: usize,
    outcomes: Vec<LineOutcome>,
}

impl LineBatch {
    fn digest(&mut self, entry_lines: &mut EntryLineReader) {
        self.outcomes.clear();
        self.lines = 0;
        for raw in lines(&self.bytes) {
            self.lines += 1;
            // The common case: ASCII without control characters (JSON strings may not hold
            // one, so the fast reader need not look for them), where `str::trim` only has
            // spaces to remove.
            let content = raw.strip_suffix(b"\n").unwrap_or(raw);
            let (lowest, all) = byte_summary(content);
            if lowest >= 0x20 && all < 0x80 {
                let text = content.trim_ascii();
                if text.is_empty() {
                    continue;
                }
                if let Some(digest) = entry_lines.digest(text) {
                    self.outcomes.push(LineOutcome::Entry(digest));
                    continue;
                }
            }
            let Some(text) = trimmed_line(raw) else {
                self.outcomes.push(LineOutcome::NotUtf8);
                return;
            };
            if text.is_empty() {
                continue;
            }
            self.outcomes.push(match parse_record(text, self.lines) {
                Ok(ExportRecord::Entry(entry)) => {
                    LineOutcome::Entry(EntryDigest::of_entry(&entry.into()))
                }
                Ok(ExportRecord::Checkpoint(_)) => LineOutcome::Other,
                Err(ExportError::Malformed { line, reason }) => {
                    LineOutcome::Malformed { line, reason }
                }
                Err(ExportError::Read(_)) => LineOutcome::NotUtf8,
            });
        }
    }
}

/// How the walk over an export's lines is split: `workers` threads parse and digest batches
/// of about `batch_bytes` while the calling thread reads ahead and links the digests in order.
#[derive(Clone, Copy, Debug)]
pub struct LinePipeline {
    pub workers: usize,
    pub batch_bytes: usize,
}

impl Default for LinePipeline {
    /// One worker per core (the reading and linking thread is light), batches of 256 KiB.
    fn default() -> Self {
        Self {
            workers: std::thread::available_parallelism()
                .map_or(1, std::num::NonZeroUsize::get)
                .min(16),
            batch_bytes: 256 * 1024,
        }
    }
}

/// Batches in flight per worker: enough to keep every worker busy, few enough that memory is
/// a fixed number of batches however long the export.
const BATCHES_IN_FLIGHT_PER_WORKER: usize = 2;

/// The walk over an export's entry lines, in parallel: batch `n` goes to worker `n % workers`
/// and its digests are handed to `audit` in batch order, so every entry is linked in line order
/// and the first error (malformed line, unreadable input) is the one a sequential read meets
/// first.
pub fn audit_entry_lines(
    reader: impl BufRead,
    audit: &mut LedgerAudit,
    pipeline: LinePipeline,
) -> Result<(), ExportError> {
    let workers = pipeline.workers.max(1);
    let in_flight_limit = workers * BATCHES_IN_FLIGHT_PER_WORKER;
    let stopped = || ExportError::Read(std::io::Error::other("a verification worker stopped"));
    let mut chunker = LineChunker::new(reader, pipeline.batch_bytes);
    std::thread::scope(|scope| {
        let mut lanes = Vec::with_capacity(workers);
        for _ in 0..workers {
            let (to_worker, batches) = mpsc::channel::<LineBatch>();
            let (to_reader, digested) = mpsc::channel::<LineBatch>();
            scope.spawn(move || {
                let mut entry_lines = EntryLineReader::default();
                for mut batch in batches {
                    batch.digest(&mut entry_lines);
                    if to_reader.send(batch).is_err() {
                        return;
                    }
                }
            });
            lanes.push((to_worker, digested));
        }
        let mut spare: Vec<LineBatch> = Vec::new();
        let (mut sent, mut received, mut lines_before) = (0_usize, 0_usize, 0_usize);
        let mut read_error = None;
        let mut at_end = false;
        loop {
            while !at_end && sent - received < in_flight_limit {
                let mut batch = spare.pop().unwrap_or_default();
                if let Err(error) = chunker.next_batch(&mut batch.bytes) {
                    read_error = Some(error);
                    at_end = true;
                }
                if batch.bytes.is_empty() {
                    at_end = true;
                    break;
                }
                lanes[sent % workers].0.send(batch).map_err(|_| stopped())?;
                sent += 1;
            }
            if received == sent {
                break;
            }
            let batch = lanes[received % workers].1.recv().map_err(|_| stopped())?;
            received += 1;
            for outcome in &batch.outcomes {
                match outcome {
                    LineOutcome::Entry(digest) => audit.add_digest(digest),
                    LineOutcome::Other => {}
                    LineOutcome::Malformed { line, reason } => {
                        return Err(ExportError::Malformed {
                            line: lines_before + line,
                            reason: reason.clone(),
                        });
                    }
                    LineOutcome::NotUtf8 => return Err(not_utf8()),
                }
            }
            lines_before += batch.lines;
            spare.push(batch);
        }
        match read_error {
            Some(error) => Err(ExportError::Read(error)),
            None => Ok(()),
        }
    })
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

    /// A verdict in a comparable form: the whole report, or the error's kind, line and text.
    fn verdict(result: Result<OfflineReport, ExportError>) -> String {
        match result {
            Ok(report) => format!("{report:?}"),
            Err(ExportError::Malformed { line, reason }) => format!("malformed {line}: {reason}"),
            Err(ExportError::Read(error)) => format!("read {:?}: {error}", error.kind()),
        }
    }

    /// Splits: one line per batch, a few lines per batch (so batch ends fall before, on and
    /// after a tampered line), everything in one batch; one to three workers.
    fn pipelines() -> Vec<LinePipeline> {
        let mut pipelines = Vec::new();
        for workers in 1..=3 {
            for batch_bytes in [1, 1_700, 1 << 20] {
                pipelines.push(LinePipeline {
                    workers,
                    batch_bytes,
                });
            }
        }
        pipelines
    }

    /// Actors that need every escape JSON has (the short ones, read in place, and `\u`, read
    /// by serde) and raw non-ASCII text.
    fn escaped_actor(seq: u64) -> String {
        match seq {
            5 => "user:\u{8}\u{c}\n\r\t\"\\/".to_owned(),
            6 => "user:\u{1}\u{1f}".to_owned(),
            7 => "user:é€".to_owned(),
            _ => format!("user:{seq}"),
        }
    }

    /// The export of 40 entries with checkpoints at 10, 25 and 40, as lines.
    fn export_lines(signer: &CheckpointSigner) -> Vec<Vec<u8>> {
        let chain = entries(40, escaped_actor);
        let checkpoints = [10, 25, 40].map(|size| checkpoint(signer, &chain, size));
        export(&chain, &checkpoints)
            .split_inclusive(|byte| *byte == b'\n')
            .map(<[u8]>::to_vec)
            .collect()
    }

    fn replace(line: &[u8], from: &str, to: &str) -> Vec<u8> {
        let text = String::from_utf8(line.to_vec()).expect("utf-8");
        assert!(text.contains(from), "{from} not in {text}");
        text.replacen(from, to, 1).into_bytes()
    }

    fn field<'a>(line: &'a [u8], name: &str) -> &'a str {
        let text = std::str::from_utf8(line).expect("utf-8");
        let start = text.find(&format!("\"{name}\":\"")).expect("field") + name.len() + 4;
        &text[start..start + text[start..].find('"').expect("end")]
    }

    /// Every kind of tampering (and of harmless respelling), at the first entry, at entries
    /// that fall on and beside batch ends, and at the last: the parallel walk gives exactly
    /// the sequential verifier's report or error, for every split.
    #[test]
    fn the_parallel_walk_gives_the_sequential_verdict_for_every_tampering_and_split() {
        let signer = signer();
        let original = export_lines(&signer);
        type Tamper = fn(&mut Vec<Vec<u8>>, usize);
        let tampers: Vec<(&str, Tamper)> = vec![
            ("intact", |_, _| {}),
            ("changed actor", |lines, at| {
                lines[at] = replace(&lines[at], "\"actor\":\"user:", "\"actor\":\"mallory:")
            }),
            ("changed hash", |lines, at| {
                let hash = field(&lines[at], "hash").to_owned();
                lines[at] = replace(&lines[at], &hash, &"0".repeat(64));
            }),
            ("changed prev_hash", |lines, at| {
                let prev = field(&lines[at], "prev_hash").to_owned();
                lines[at] = replace(&lines[at], &prev, &"1".repeat(64));
            }),
            ("prev_hash not hex", |lines, at| {
                let prev = field(&lines[at], "prev_hash").to_owned();
                lines[at] = replace(&lines[at], &prev, &"z".repeat(64));
            }),
            ("prev_hash too short", |lines, at| {
                let prev = field(&lines[at], "prev_hash").to_owned();
                lines[at] = replace(&lines[at], &prev, &prev[..62]);
            }),
            ("hashes in upper case", |lines, at| {
                let (prev, hash) = (
                    field(&lines[at], "prev_hash").to_owned(),
                    field(&lines[at], "hash").to_owned(),
                );
                lines[at] = replace(&lines[at], &prev, &prev.to_uppercase());
                lines[at] = replace(&lines[at], &hash, &hash.to_uppercase());
            }),
            ("deleted", |lines, at| {
                lines.remove(at);
            }),
            ("duplicated", |lines, at| {
                let line = lines[at].clone();
                lines.insert(at, line);
            }),
            ("swapped with the next", |lines, at| lines.swap(at, at + 1)),
            ("unknown encoding version", |lines, at| {
                lines[at] = replace(
                    &lines[at],
                    "\"encoding_version\":1",
                    "\"encoding_version\":2",
                )
            }),
            ("seq with a leading zero", |lines, at| {
                lines[at] = replace(&lines[at], "\"seq\":", "\"seq\":0")
            }),
            ("seq as a float", |lines, at| {
                lines[at] = replace(&lines[at], ",\"recorded_at\"", ".0,\"recorded_at\"")
            }),
            ("seq beyond u64", |lines, at| {
                lines[at] = replace(&lines[at], "\"seq\":", "\"seq\":99999999999999999999")
            }),
            ("version beyond u32", |lines, at| {
                lines[at] = replace(
                    &lines[at],
                    "\"encoding_version\":1",
                    "\"encoding_version\":4294967297",
                )
            }),
            ("not json", |lines, at| lines[at] = b"{not json\n".to_vec()),
            ("cut short", |lines, at| {
                let half = lines[at].len() / 2;
                lines[at].truncate(half);
                lines[at].push(b'\n');
            }),
            ("not utf-8", |lines, at| {
                lines[at] = replace(&lines[at], "user:", "user:\u{1}");
                let position = lines[at]
                    .iter()
                    .position(|byte| *byte == 1)
                    .expect("marker");
                lines[at][position] = 0xff;
            }),
            ("control character in a string", |lines, at| {
                lines[at] = replace(&lines[at], "user:", "user:\t")
            }),
            ("duplicate field", |lines, at| {
                lines[at] = replace(&lines[at], "\"outcome\":", "\"outcome\":\"x\",\"outcome\":")
            }),
            ("unicode escapes and raw unicode", |lines, at| {
                lines[at] = replace(
                    &lines[at],
                    "\"action\":\"INFERENCE\"",
                    "\"action\":\"\\u0049NFERENCE\"",
                );
                lines[at] = replace(&lines[at], "user:", "usér\\/\\b:");
            }),
            (
                "respelled with spaces, other key order and an extra field",
                |lines, at| {
                    lines[at] = replace(
                        &lines[at],
                        "{\"type\":\"entry\",",
                        "{ \"extra\": [1, {}], \"type\" : \"entry\" , ",
                    );
                    lines[at] = replace(&lines[at], "\"seq\":", "\"seq\" :");
                },
            ),
            ("tag last", |lines, at| {
                lines[at] = replace(&lines[at], "{\"type\":\"entry\",", "{");
                lines[at] = replace(&lines[at], "}\n", ",\"type\":\"entry\"}\n");
            }),
            ("type checkpoint", |lines, at| {
                lines[at] = replace(&lines[at], "\"type\":\"entry\"", "\"type\":\"checkpoint\"")
            }),
            ("blank and indented lines, CRLF", |lines, at| {
                lines[at] = replace(&lines[at], "}\n", "}\r\n");
                lines[at].splice(0..0, *b" \t");
                lines.insert(at, b"  \n".to_vec());
                lines.insert(at, b"\n".to_vec());
            }),
            ("no final newline", |lines, _| {
                let last = lines.len() - 1;
                lines[last].pop();
            }),
            ("consistent rewrite from here", |lines, at| {
                let rewritten = entries(40, |seq| {
                    if seq as usize > at {
                        format!("mallory:{seq}")
                    } else {
                        escaped_actor(seq)
                    }
                });
                let text = export(&rewritten, &[]);
                for (line, new) in lines
                    .iter_mut()
                    .zip(text.split_inclusive(|byte| *byte == b'\n'))
                {
                    *line = new.to_vec();
                }
            }),
        ];
        // 0-based line indices: the first entry, the last, and a spread over the middle.
        let positions = [0, 4, 5, 6, 10, 17, 24, 38, 39];
        for (name, tamper) in &tampers {
            for &at in &positions {
                let mut lines = original.clone();
                tamper(&mut lines, at);
                let text = lines.concat();
                let expected = verdict(verify_export_sequential(
                    Cursor::new(&text),
                    Vec::new(),
                    signer.public_key(),
                ));
                for pipeline in pipelines() {
                    let found = verdict(verify_export_with_pipeline(
                        Cursor::new(&text),
                        Vec::new(),
                        signer.public_key(),
                        pipeline,
                    ));
                    assert_eq!(found, expected, "{name} at line {}, {pipeline:?}", at + 1);
                }
            }
        }
    }

    /// The fixture must not pass for want of tampering: the cases above reach every verdict.
    #[test]
    fn the_tampering_fixture_reaches_every_verdict() {
        let signer = signer();
        let mut lines = export_lines(&signer);
        lines[17] = replace(&lines[17], "\"actor\":\"user:", "\"actor\":\"mallory:");
        let report = verify_export_with_pipeline(
            Cursor::new(lines.concat()),
            Vec::new(),
            signer.public_key(),
            LinePipeline {
                workers: 2,
                batch_bytes: 1,
            },
        )
        .expect("readable");
        assert_eq!(report.first_bad_seq, Some(18), "{report:?}");
        assert_eq!(report.problem, "hash does not match the entry's content");
        assert_eq!(report.entries_verified, 17);
        let intact = verify_export_with_pipeline(
            Cursor::new(export_lines(&signer).concat()),
            Vec::new(),
            signer.public_key(),
            LinePipeline {
                workers: 3,
                batch_bytes: 900,
            },
        )
        .expect("readable");
        assert_eq!(
            (
                intact.first_bad_seq,
                intact.entries_verified,
                intact.checkpoints_verified
            ),
            (None, 40, 3)
        );
    }
}
