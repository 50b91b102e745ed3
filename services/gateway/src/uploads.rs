//! Resumable uploads: the bytes of an unfinished `UploadImage` with an upload id are held here,
//! per caller, so a client whose stream broke continues from the last byte received instead
//! of starting again. Bounded in count, in bytes held (all uploads together) and in time
//! (an upload that receives nothing for `idle_seconds` is dropped). Held in this gateway's
//! memory: with several replicas a resume that reaches another one is told UPLOAD_UNKNOWN and
//! starts again (its idempotency key still yields one prediction and one ledger record).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::GatewayError;
use medai_runtime::config::from_str_or_native;

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UploadSettings {
    /// Unfinished resumable uploads held at once (all callers).
    #[serde(
        default = "default_max_uploads",
        deserialize_with = "from_str_or_native"
    )]
    pub max_uploads: usize,
    /// Bytes held for unfinished uploads at once (all callers).
    #[serde(
        default = "default_max_held_bytes",
        deserialize_with = "from_str_or_native"
    )]
    pub max_held_bytes: usize,
    /// An unfinished upload that receives nothing for this long is dropped.
    #[serde(
        default = "default_idle_seconds",
        deserialize_with = "from_str_or_native"
    )]
    pub idle_seconds: u64,
}

fn default_max_uploads() -> usize {
    32
}
fn default_max_held_bytes() -> usize {
    256 * 1024 * 1024
}
fn default_idle_seconds() -> u64 {
    600
}

impl Default for UploadSettings {
    fn default() -> Self {
        Self {
            max_uploads: default_max_uploads(),
            max_held_bytes: default_max_held_bytes(),
            idle_seconds: default_idle_seconds(),
        }
    }
}

/// What a resumed stream must repeat: the upload is one image for one model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UploadTerms {
    pub model_name: String,
    pub model_version: String,
    pub format: i32,
    pub declared_size: u64,
    pub idempotency_key: String,
}

/// The bytes received so far and their running hash.
pub struct Received {
    pub bytes: Vec<u8>,
    pub hasher: Sha256,
}

struct Held {
    terms: UploadTerms,
    /// `None` while a stream is writing to it (the stream holds the bytes).
    received: Option<Received>,
    /// Bytes received, also while a stream holds them.
    length: u64,
    last_activity: Instant,
}

/// Unfinished uploads by (caller subject, upload id).
pub struct PartialUploads {
    settings: UploadSettings,
    held: Mutex<HashMap<(String, String), Held>>,
}

/// What GetUploadStatus reports.
pub struct UploadStatus {
    pub received_bytes: u64,
    pub declared_size: u64,
    pub in_use: bool,
    pub expires_in: Duration,
}

impl PartialUploads {
    pub fn new(settings: UploadSettings) -> Arc<Self> {
        Arc::new(Self {
            settings,
            held: Mutex::default(),
        })
    }

    fn idle(&self) -> Duration {
        Duration::from_secs(self.settings.idle_seconds)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), Held>> {
        self.held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Drops uploads idle for too long (a stream writing to one keeps it alive).
    fn sweep(&self, held: &mut HashMap<(String, String), Held>) {
        let idle = self.idle();
        held.retain(|_, upload| upload.received.is_none() || upload.last_activity.elapsed() < idle);
    }

    fn held_bytes(held: &HashMap<(String, String), Held>) -> u64 {
        held.values().map(|upload| upload.length).sum()
    }

    pub fn status(&self, subject: &str, upload_id: &str) -> Result<UploadStatus, GatewayError> {
        let mut held = self.lock();
        self.sweep(&mut held);
        let upload = held
            .get(&(subject.to_owned(), upload_id.to_owned()))
            .ok_or(GatewayError::UploadUnknown)?;
        Ok(UploadStatus {
            received_bytes: upload.length,
            declared_size: upload.terms.declared_size,
            in_use: upload.received.is_none(),
            expires_in: self.idle().saturating_sub(upload.last_activity.elapsed()),
        })
    }

    /// Starts (offset 0, not held) or resumes (offset = bytes held) an upload; the returned
    /// lease holds its bytes until it is finished or dropped.
    pub fn open(
        self: &Arc<Self>,
        subject: &str,
        upload_id: &str,
        offset: u64,
        terms: UploadTerms,
    ) -> Result<UploadLease, GatewayError> {
        let key = (subject.to_owned(), upload_id.to_owned());
        let mut held = self.lock();
        self.sweep(&mut held);
        let received = match held.get_mut(&key) {
            Some(upload) => {
                if upload.received.is_none() {
                    return Err(GatewayError::UploadInUse);
                }
                if upload.terms != terms {
                    return Err(GatewayError::UploadHeaderMismatch);
                }
                if offset != upload.length {
                    return Err(GatewayError::UploadOffsetMismatch {
                        expected: upload.length,
                        given: offset,
                    });
                }
                upload.last_activity = Instant::now();
                upload.received.take().unwrap_or(Received {
                    bytes: Vec::new(),
                    hasher: Sha256::new(),
                })
            }
            None if offset > 0 => return Err(GatewayError::UploadUnknown),
            None => {
                if held.len() >= self.settings.max_uploads {
                    return Err(GatewayError::UploadsFull);
                }
                held.insert(
                    key.clone(),
                    Held {
                        terms,
                        received: None,
                        length: 0,
                        last_activity: Instant::now(),
                    },
                );
                Received {
                    bytes: Vec::new(),
                    hasher: Sha256::new(),
                }
            }
        };
        Ok(UploadLease {
            uploads: self.clone(),
            key,
            received: Some(received),
        })
    }

    /// Room for `more` bytes among everything held; refreshes the upload's activity.
    fn reserve(&self, key: &(String, String), more: u64) -> Result<(), GatewayError> {
        let mut held = self.lock();
        let total = Self::held_bytes(&held);
        if total + more > self.settings.max_held_bytes as u64 {
            return Err(GatewayError::UploadsFull);
        }
        if let Some(upload) = held.get_mut(key) {
            upload.length += more;
            upload.last_activity = Instant::now();
        }
        Ok(())
    }

    pub fn uploads_held(&self) -> usize {
        self.lock().len()
    }
}

/// One stream's hold on an upload. Dropped unfinished (the stream broke, was refused, or its
/// call was cancelled), it gives the bytes back for a resume.
pub struct UploadLease {
    uploads: Arc<PartialUploads>,
    key: (String, String),
    received: Option<Received>,
}

impl UploadLease {
    pub fn received_bytes(&self) -> u64 {
        self.received
            .as_ref()
            .map_or(0, |received| received.bytes.len() as u64)
    }

    /// Appends a chunk once the bytes held by every upload leave room for it.
    pub fn append(&mut self, chunk: &[u8]) -> Result<(), GatewayError> {
        self.uploads.reserve(&self.key, chunk.len() as u64)?;
        if let Some(received) = self.received.as_mut() {
            received.hasher.update(chunk);
            received.bytes.extend_from_slice(chunk);
        }
        Ok(())
    }

    /// The whole image: the upload is no longer held (a resend starts again).
    pub fn finish(mut self) -> Received {
        self.uploads.lock().remove(&self.key);
        self.received.take().unwrap_or(Received {
            bytes: Vec::new(),
            hasher: Sha256::new(),
        })
    }
}

impl Drop for UploadLease {
    fn drop(&mut self) {
        let Some(received) = self.received.take() else {
            return;
        };
        let mut held = self.uploads.lock();
        if let Some(upload) = held.get_mut(&self.key) {
            upload.length = received.bytes.len() as u64;
            upload.received = Some(received);
            upload.last_activity = Instant::now();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn terms(size: u64) -> UploadTerms {
        UploadTerms {
            model_name: "m".to_owned(),
            model_version: String::new(),
            format: 0,
            declared_size: size,
            idempotency_key: String::new(),
        }
    }

    #[test]
    fn a_broken_stream_leaves_its_bytes_for_a_resume_at_exactly_that_offset() {
        let uploads = PartialUploads::new(UploadSettings::default());
        let mut lease = uploads.open("alice", "u1", 0, terms(10)).expect("open");
        lease.append(b"hello").expect("append");
        assert!(uploads.status("alice", "u1").expect("held").in_use);
        assert!(matches!(
            uploads.open("alice", "u1", 5, terms(10)),
            Err(GatewayError::UploadInUse)
        ));
        drop(lease);
        let status = uploads.status("alice", "u1").expect("held");
        assert_eq!((status.received_bytes, status.in_use), (5, false));
        assert!(matches!(
            uploads.open("alice", "u1", 3, terms(10)),
            Err(GatewayError::UploadOffsetMismatch {
                expected: 5,
                given: 3
            })
        ));
        assert!(matches!(
            uploads.open("alice", "u1", 5, terms(11)),
            Err(GatewayError::UploadHeaderMismatch)
        ));
        // Another identity never sees it; an unknown id with an offset is unknown.
        assert!(matches!(
            uploads.status("bob", "u1"),
            Err(GatewayError::UploadUnknown)
        ));
        assert!(matches!(
            uploads.open("bob", "u1", 5, terms(10)),
            Err(GatewayError::UploadUnknown)
        ));
        let mut resumed = uploads.open("alice", "u1", 5, terms(10)).expect("resume");
        resumed.append(b"world").expect("append");
        let whole = resumed.finish();
        assert_eq!(whole.bytes, b"helloworld");
        assert_eq!(
            hex::encode(whole.hasher.finalize()),
            hex::encode(Sha256::digest(b"helloworld"))
        );
        assert!(matches!(
            uploads.status("alice", "u1"),
            Err(GatewayError::UploadUnknown)
        ));
    }

    #[test]
    fn uploads_are_bounded_in_count_bytes_and_idle_time() {
        let uploads = PartialUploads::new(UploadSettings {
            max_uploads: 2,
            max_held_bytes: 8,
            idle_seconds: 0,
        });
        let mut first = uploads.open("alice", "a", 0, terms(10)).expect("first");
        let _second = uploads.open("alice", "b", 0, terms(10)).expect("second");
        assert!(matches!(
            uploads.open("alice", "c", 0, terms(10)),
            Err(GatewayError::UploadsFull)
        ));
        first.append(b"12345678").expect("within the bytes bound");
        assert!(matches!(first.append(b"9"), Err(GatewayError::UploadsFull)));
        drop(first);
        // Idle for 0 s once released: swept at the next look.
        assert!(matches!(
            uploads.status("alice", "a"),
            Err(GatewayError::UploadUnknown)
        ));
        assert_eq!(uploads.uploads_held(), 1, "the one still in use stays");
    }
}
