//! Signed checkpoints: (tree size, head hash, Merkle root, time) signed with Ed25519, so an
//! auditor holding one can later prove the history up to it was not rewritten.
//!
//! Signed bytes, version 1: `"MEDAI-CHECKPOINT" 0x00 ‖ u32be(1) ‖ u64be(tree_size) ‖
//! head_hash(32) ‖ merkle_root(32) ‖ u32be(len(created_at)) ‖ created_at`.

use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use ring::rand::SystemRandom;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::merkle::Hash;

const TAG: &[u8] = b"MEDAI-CHECKPOINT\x00";
pub const CHECKPOINT_VERSION: u32 = 1;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub tree_size: u64,
    /// Hex hash of the entry at seq = tree_size (the genesis value for an empty ledger).
    pub head_hash: String,
    /// Hex RFC 9162 root over the first `tree_size` entry hashes.
    pub merkle_root: String,
    /// RFC 3339 UTC.
    pub created_at: String,
    /// First 16 hex digits of SHA-256 of the public key.
    pub key_id: String,
    /// Base64 Ed25519 signature over [`signed_bytes`].
    pub signature: String,
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointKeyError {
    #[error("cannot read or write the checkpoint key {path}: {reason}")]
    Io { path: String, reason: String },
    #[error("the checkpoint key {0} is not a valid Ed25519 PKCS#8 key")]
    Invalid(String),
}

pub fn signed_bytes(
    tree_size: u64,
    head_hash: &Hash,
    merkle_root: &Hash,
    created_at: &str,
) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(TAG.len() + 4 + 8 + 64 + 4 + created_at.len());
    bytes.extend_from_slice(TAG);
    bytes.extend_from_slice(&CHECKPOINT_VERSION.to_be_bytes());
    bytes.extend_from_slice(&tree_size.to_be_bytes());
    bytes.extend_from_slice(head_hash);
    bytes.extend_from_slice(merkle_root);
    bytes.extend_from_slice(
        &u32::try_from(created_at.len())
            .unwrap_or(u32::MAX)
            .to_be_bytes(),
    );
    bytes.extend_from_slice(created_at.as_bytes());
    bytes
}

pub fn key_id(public_key: &[u8]) -> String {
    hex::encode(&Sha256::digest(public_key)[..8])
}

/// The private key that signs checkpoints. It lives in a file outside the database, so
/// whoever can rewrite the ledger's tables cannot re-sign history.
pub struct CheckpointSigner {
    key_pair: Ed25519KeyPair,
}

impl CheckpointSigner {
    /// Loads the key from `path` (base64 PKCS#8), creating it (mode 0600) if absent.
    pub fn load_or_create(path: &Path) -> Result<Self, CheckpointKeyError> {
        let io = |error: std::io::Error| CheckpointKeyError::Io {
            path: path.display().to_string(),
            reason: error.to_string(),
        };
        let pkcs8 = if path.exists() {
            let text = std::fs::read_to_string(path).map_err(io)?;
            STANDARD
                .decode(text.trim())
                .map_err(|_| CheckpointKeyError::Invalid(path.display().to_string()))?
        } else {
            let document = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
                .map_err(|_| CheckpointKeyError::Invalid(path.display().to_string()))?;
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(io)?;
            }
            std::fs::write(path, STANDARD.encode(document.as_ref())).map_err(io)?;
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                    .map_err(io)?;
            }
            document.as_ref().to_vec()
        };
        let key_pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(&pkcs8)
            .map_err(|_| CheckpointKeyError::Invalid(path.display().to_string()))?;
        Ok(Self { key_pair })
    }

    /// The raw 32-byte public key.
    pub fn public_key(&self) -> &[u8] {
        self.key_pair.public_key().as_ref()
    }

    pub fn sign(
        &self,
        tree_size: u64,
        head_hash: &Hash,
        merkle_root: &Hash,
        created_at: &str,
    ) -> Checkpoint {
        let signature =
            self.key_pair
                .sign(&signed_bytes(tree_size, head_hash, merkle_root, created_at));
        Checkpoint {
            tree_size,
            head_hash: hex::encode(head_hash),
            merkle_root: hex::encode(merkle_root),
            created_at: created_at.to_owned(),
            key_id: key_id(self.public_key()),
            signature: STANDARD.encode(signature.as_ref()),
        }
    }
}

fn decode_hash(text: &str) -> Option<Hash> {
    hex::decode(text)
        .ok()
        .and_then(|bytes| Hash::try_from(bytes).ok())
}

impl Checkpoint {
    /// Whether `public_key` signed exactly these fields.
    pub fn signature_is_valid(&self, public_key: &[u8]) -> bool {
        let (Some(head), Some(root)) =
            (decode_hash(&self.head_hash), decode_hash(&self.merkle_root))
        else {
            return false;
        };
        let Ok(signature) = STANDARD.decode(&self.signature) else {
            return false;
        };
        UnparsedPublicKey::new(&ED25519, public_key)
            .verify(
                &signed_bytes(self.tree_size, &head, &root, &self.created_at),
                &signature,
            )
            .is_ok()
    }

    pub fn head(&self) -> Option<Hash> {
        decode_hash(&self.head_hash)
    }

    pub fn root(&self) -> Option<Hash> {
        decode_hash(&self.merkle_root)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_checkpoint_verifies_only_with_its_key_and_its_exact_fields() {
        let directory = std::env::temp_dir().join(format!("medai-ckpt-{}", std::process::id()));
        let signer = CheckpointSigner::load_or_create(&directory.join("key")).expect("key");
        let again = CheckpointSigner::load_or_create(&directory.join("key")).expect("same key");
        assert_eq!(signer.public_key(), again.public_key());
        let checkpoint = signer.sign(10, &[1; 32], &[2; 32], "2026-11-22T00:00:00.000000Z");
        assert!(checkpoint.signature_is_valid(signer.public_key()));
        let other = CheckpointSigner::load_or_create(&directory.join("other")).expect("other key");
        assert!(!checkpoint.signature_is_valid(other.public_key()));
        let mut moved = checkpoint.clone();
        moved.tree_size = 9;
        assert!(!moved.signature_is_valid(signer.public_key()));
        let _ = std::fs::remove_dir_all(directory);
    }
}
