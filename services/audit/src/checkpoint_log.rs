//! `CheckpointLog`: every signed checkpoint is also appended to a file OUTSIDE the database
//! (JSON Lines, one `{"type":"checkpoint",…}` record a line, the export's own format), next to
//! the signing key. A database restored from an older backup carries only the older
//! checkpoints; the log still holds the newest one this key signed, so at start the audit
//! service can tell that the restored chain lost acknowledged entries and name the range
//! ([`crate::anchor`] refuses appends with `LEDGER_BEHIND_CHECKPOINT`).
//!
//! The file is opened for appending only and each record is flushed to disk before the
//! checkpoint counts as logged. A torn last line (a crash mid-write) or a record this key did
//! not sign is skipped when reading: only a checkpoint whose signature verifies can hold the
//! ledger back. `medai audit verify --export … --checkpoints <log>` checks an export against it.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use medai_ledger::checkpoint::Checkpoint;
use medai_ledger::export::ExportRecord;

/// Counts checkpoints signed but not written to the log (alert on any increase).
pub const LOG_FAILURE_COUNTER: &str = "medai_audit_checkpoint_log_failures_total";

/// Where the log lives for a key file: `audit-checkpoint.key` → `audit-checkpoint.checkpoints.jsonl`.
pub fn path_beside_key(key_file: &Path) -> PathBuf {
    key_file.with_extension("checkpoints.jsonl")
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointLogError {
    #[error("cannot read the checkpoint log {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot append to the checkpoint log {path}: {source}")]
    Append {
        path: String,
        source: std::io::Error,
    },
}

pub struct CheckpointLog {
    path: PathBuf,
    /// The largest tree size already in the file; smaller or equal ones are not written again.
    newest_logged: Mutex<u64>,
}

impl CheckpointLog {
    /// Opens (creating it, mode 0600) the log at `path` for appending; returns it with the
    /// newest checkpoint in it that `public_key` signed.
    pub fn open(
        path: &Path,
        public_key: &[u8],
    ) -> Result<(Self, Option<Checkpoint>), CheckpointLogError> {
        let appendable = open_for_append(path).map_err(|source| CheckpointLogError::Append {
            path: path.display().to_string(),
            source,
        })?;
        // A crash mid-write may have left a torn last line; the next record starts afresh.
        if ends_without_newline(path) {
            let mut file = appendable;
            file.write_all(b"\n")
                .and_then(|()| file.sync_data())
                .map_err(|source| CheckpointLogError::Append {
                    path: path.display().to_string(),
                    source,
                })?;
        } else {
            drop(appendable);
        }
        let newest = newest_signed(path, public_key)?;
        let log = Self {
            path: path.to_path_buf(),
            newest_logged: Mutex::new(newest.as_ref().map_or(0, |c| c.tree_size)),
        };
        Ok((log, newest))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `checkpoint` (durably) unless the log already holds one as large.
    pub fn append(&self, checkpoint: &Checkpoint) -> Result<(), CheckpointLogError> {
        let mut newest = self
            .newest_logged
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if checkpoint.tree_size <= *newest {
            return Ok(());
        }
        let failed = |source| CheckpointLogError::Append {
            path: self.path.display().to_string(),
            source,
        };
        let mut line = serde_json::to_string(&ExportRecord::Checkpoint(checkpoint.clone()))
            .map_err(|error| failed(std::io::Error::other(error)))?;
        line.push('\n');
        let mut file = open_for_append(&self.path).map_err(failed)?;
        file.write_all(line.as_bytes()).map_err(failed)?;
        file.sync_data().map_err(failed)?;
        *newest = checkpoint.tree_size;
        Ok(())
    }
}

fn ends_without_newline(path: &Path) -> bool {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut file) = std::fs::File::open(path) else {
        return false;
    };
    let mut last = [0u8; 1];
    file.seek(SeekFrom::End(-1)).is_ok() && file.read_exact(&mut last).is_ok() && last[0] != b'\n'
}

fn open_for_append(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)
}

/// The newest checkpoint `public_key` signed in any checkpoint log (`*.checkpoints.jsonl`) of
/// the folder holding `path`: replicas that share one volume each write their own file, and
/// what any of them logged is what the ledger must not fall behind.
pub fn newest_signed_in_folder(
    path: &Path,
    public_key: &[u8],
) -> Result<Option<Checkpoint>, CheckpointLogError> {
    let folder = match path.parent() {
        Some(folder) if !folder.as_os_str().is_empty() => folder,
        _ => Path::new("."),
    };
    let read_failed = |source| CheckpointLogError::Read {
        path: folder.display().to_string(),
        source,
    };
    let mut newest: Option<Checkpoint> = None;
    for entry in std::fs::read_dir(folder).map_err(read_failed)? {
        let entry = entry.map_err(read_failed)?;
        if !entry
            .file_name()
            .to_string_lossy()
            .ends_with(".checkpoints.jsonl")
        {
            continue;
        }
        if let Some(checkpoint) = newest_signed(&entry.path(), public_key)?
            && newest
                .as_ref()
                .is_none_or(|known| checkpoint.tree_size > known.tree_size)
        {
            newest = Some(checkpoint);
        }
    }
    Ok(newest)
}

/// The newest checkpoint in the log at `path` whose signature `public_key` verifies (`None`
/// when the file is absent or holds none). Unreadable lines are skipped with a warning.
pub fn newest_signed(
    path: &Path,
    public_key: &[u8],
) -> Result<Option<Checkpoint>, CheckpointLogError> {
    let file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(CheckpointLogError::Read {
                path: path.display().to_string(),
                source,
            });
        }
    };
    let mut newest: Option<Checkpoint> = None;
    for (number, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|source| CheckpointLogError::Read {
            path: path.display().to_string(),
            source,
        })?;
        if line.trim().is_empty() {
            continue;
        }
        let checkpoint = match serde_json::from_str::<ExportRecord>(&line) {
            Ok(ExportRecord::Checkpoint(checkpoint)) => checkpoint,
            Ok(ExportRecord::Entry(_)) => continue,
            Err(_) => {
                tracing::warn!(
                    line = number + 1,
                    "checkpoint log: skipping an unreadable line"
                );
                continue;
            }
        };
        if !checkpoint.signature_is_valid(public_key) || checkpoint.head().is_none() {
            tracing::warn!(
                line = number + 1,
                tree_size = checkpoint.tree_size,
                "checkpoint log: skipping a checkpoint this key did not sign"
            );
            continue;
        }
        if newest
            .as_ref()
            .is_none_or(|known| known.tree_size < checkpoint.tree_size)
        {
            newest = Some(checkpoint);
        }
    }
    Ok(newest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use medai_ledger::checkpoint::CheckpointSigner;

    #[test]
    fn the_newest_validly_signed_checkpoint_is_the_one_read_back() {
        let directory = tempfile::tempdir().expect("tempdir");
        let signer =
            CheckpointSigner::load_or_create(&directory.path().join("k.key")).expect("key");
        let stranger =
            CheckpointSigner::load_or_create(&directory.path().join("other.key")).expect("key");
        let path = path_beside_key(&directory.path().join("k.key"));
        assert_eq!(path.file_name().unwrap(), "k.checkpoints.jsonl");
        let (log, newest) = CheckpointLog::open(&path, signer.public_key()).expect("open");
        assert!(newest.is_none());
        let at = |size: u64, by: &CheckpointSigner| {
            by.sign(size, &[size as u8; 32], &[1; 32], "2026-01-01T00:00:00Z")
        };
        log.append(&at(3, &signer)).expect("append");
        log.append(&at(7, &signer)).expect("append");
        log.append(&at(5, &signer)).expect("smaller: skipped");
        // A forged line (another key) and a torn last line do not count.
        log.append(&at(9, &stranger)).expect("append");
        let mut file = open_for_append(&path).expect("open");
        file.write_all(b"{\"type\":\"checkpoint\",\"tree_si")
            .expect("torn");
        drop(file);
        let text = std::fs::read_to_string(&path).expect("read");
        assert_eq!(text.lines().count(), 4, "{text}");
        let newest = newest_signed(&path, signer.public_key())
            .expect("read")
            .expect("one");
        assert_eq!(newest.tree_size, 7);
        let (log, reopened) = CheckpointLog::open(&path, signer.public_key()).expect("reopen");
        assert_eq!(reopened.map(|c| c.tree_size), Some(7));
        // After the torn line, the next record is on a line of its own and reads back.
        log.append(&at(11, &signer)).expect("append");
        let newest = newest_signed(&path, signer.public_key()).expect("read");
        assert_eq!(newest.map(|c| c.tree_size), Some(11));
    }

    /// Replicas on one shared volume each write their own file; the newest checkpoint any of
    /// them logged (signed by the key) is what a replica starting there is held to, whatever
    /// file it writes itself. Files of another kind and forged lines are not read as logs.
    #[test]
    fn the_newest_checkpoint_of_every_replica_file_in_the_folder_counts() {
        let directory = tempfile::tempdir().expect("tempdir");
        let signer =
            CheckpointSigner::load_or_create(&directory.path().join("k.key")).expect("key");
        let stranger =
            CheckpointSigner::load_or_create(&directory.path().join("other.key")).expect("key");
        let shared = directory.path().join("shared");
        std::fs::create_dir(&shared).expect("folder");
        let at = |size: u64, by: &CheckpointSigner| {
            by.sign(size, &[size as u8; 32], &[1; 32], "2026-01-01T00:00:00Z")
        };
        let first = shared.join("medai-audit-7d9f-a.checkpoints.jsonl");
        let second = shared.join("medai-audit-7d9f-b.checkpoints.jsonl");
        let (log, _) = CheckpointLog::open(&first, signer.public_key()).expect("open");
        log.append(&at(4, &signer)).expect("append");
        let (log, _) = CheckpointLog::open(&second, signer.public_key()).expect("open");
        log.append(&at(9, &signer)).expect("append");
        log.append(&at(30, &stranger)).expect("a forged record");
        std::fs::write(
            shared.join("notes.jsonl"),
            serde_json::to_string(&ExportRecord::Checkpoint(at(40, &signer))).expect("json"),
        )
        .expect("another file");
        let third = shared.join("medai-audit-7d9f-c.checkpoints.jsonl");
        let newest = newest_signed_in_folder(&third, signer.public_key())
            .expect("read")
            .expect("one");
        assert_eq!(newest.tree_size, 9);
        assert!(
            newest_signed_in_folder(&third, stranger.public_key())
                .expect("read")
                .is_some_and(|checkpoint| checkpoint.tree_size == 30)
        );
    }
}
