//! The hash-chain rules of the ledger, as pure functions so the service, the verifier and an
//! offline tool share one definition. compliance/ledger-encoding.md states the same rules in
//! prose; a change here is a new `ENCODING_VERSION`, never an edit of version 1.
//!
//! Version 1: `hash = SHA-256(prev_hash ‖ encoding)` where `prev_hash` is the previous entry's
//! 32-byte hash (the genesis value for seq 1) and `encoding` is
//! `"MEDAI-LEDGER" 0x00 ‖ u32be(version) ‖ u64be(seq) ‖ field(recorded_at) ‖ field(actor) ‖
//! field(action) ‖ field(resource) ‖ field(outcome) ‖ field(context)`, with
//! `field(s) = u32be(len(utf8(s))) ‖ utf8(s)`.

use sha2::{Digest, Sha256};

pub const ENCODING_VERSION: u32 = 1;
const DOMAIN_TAG: &[u8] = b"MEDAI-LEDGER\x00";
/// The value the first entry chains from: SHA-256 of this text.
pub const GENESIS_SEED: &str = "medai-ledger-genesis-v1";

pub type Hash = [u8; 32];

pub fn genesis_hash() -> Hash {
    Sha256::digest(GENESIS_SEED.as_bytes()).into()
}

/// Every field of an entry that its hash covers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EntryContent {
    pub seq: u64,
    /// RFC 3339, UTC, microseconds, `Z` suffix.
    pub recorded_at: String,
    pub actor: String,
    pub action: String,
    pub resource: String,
    pub outcome: String,
    /// Canonical JSON (see [`canonical_json`]).
    pub context: String,
}

pub fn canonical_encoding(entry: &EntryContent) -> Vec<u8> {
    let fields = [
        &entry.recorded_at,
        &entry.actor,
        &entry.action,
        &entry.resource,
        &entry.outcome,
        &entry.context,
    ];
    let capacity =
        DOMAIN_TAG.len() + 12 + fields.iter().map(|field| 4 + field.len()).sum::<usize>();
    let mut encoding = Vec::with_capacity(capacity);
    encoding.extend_from_slice(DOMAIN_TAG);
    encoding.extend_from_slice(&ENCODING_VERSION.to_be_bytes());
    encoding.extend_from_slice(&entry.seq.to_be_bytes());
    for field in fields {
        // Fields are bounded far below 4 GiB when accepted (see the append limits).
        let length = u32::try_from(field.len()).unwrap_or(u32::MAX);
        encoding.extend_from_slice(&length.to_be_bytes());
        encoding.extend_from_slice(field.as_bytes());
    }
    encoding
}

impl EntryContent {
    /// The text fields in the order [`entry_hash_of_fields`] hashes them.
    pub fn hashed_fields(&self) -> [&[u8]; 6] {
        [
            self.recorded_at.as_bytes(),
            self.actor.as_bytes(),
            self.action.as_bytes(),
            self.resource.as_bytes(),
            self.outcome.as_bytes(),
            self.context.as_bytes(),
        ]
    }
}

pub fn entry_hash(prev_hash: &Hash, entry: &EntryContent) -> Hash {
    entry_hash_of_fields(prev_hash, entry.seq, entry.hashed_fields())
}

/// [`entry_hash`] over borrowed fields (UTF-8 bytes) (recorded_at, actor, action, resource, outcome, context,
/// in that order), so a verifier can hash text where it lies without building an entry.
pub fn entry_hash_of_fields(prev_hash: &Hash, seq: u64, fields: [&[u8]; 6]) -> Hash {
    // Streams the same bytes as `canonical_encoding` into the hasher, without building them.
    let mut hasher = Sha256::new();
    hasher.update(prev_hash);
    hasher.update(DOMAIN_TAG);
    hasher.update(ENCODING_VERSION.to_be_bytes());
    hasher.update(seq.to_be_bytes());
    for field in fields {
        hasher.update(u32::try_from(field.len()).unwrap_or(u32::MAX).to_be_bytes());
        hasher.update(field);
    }
    hasher.finalize().into()
}

/// What one stored entry says about itself, computed without the rest of the chain (so on any
/// thread, in any order): its own hash recomputed over its content and the prev_hash it
/// *stores*. [`ChainVerifier::link`] then only has to check, in seq order, that the stored
/// prev_hash is the previous entry's hash; when it is, the recomputed hash here is exactly the
/// one [`ChainVerifier::check`] computes from the chain's head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EntryDigest {
    pub seq: u64,
    pub encoding_version: u32,
    /// The stored prev_hash, `None` when it is not 64 hex digits.
    pub stored_prev_hash: Option<Hash>,
    /// Whether the stored hash is the hex form of `recomputed_hash`.
    pub stored_hash_matches: bool,
    /// SHA-256 over the stored prev_hash and the content (meaningless when `stored_prev_hash`
    /// is `None`).
    pub recomputed_hash: Hash,
    /// The RFC 9162 leaf hash of `recomputed_hash`.
    pub leaf_hash: Hash,
}

impl EntryDigest {
    /// Digests one stored entry given as borrowed text: `fields` in the order of
    /// [`entry_hash_of_fields`], the hashes as stored (hex, either case).
    pub fn of_fields(
        seq: u64,
        encoding_version: u32,
        fields: [&[u8]; 6],
        prev_hash_hex: &[u8],
        hash_hex: &[u8],
    ) -> Self {
        let stored_prev_hash = crate::entry_line::decode_hex_hash(prev_hash_hex);
        let (recomputed_hash, stored_hash_matches) = match &stored_prev_hash {
            Some(prev_hash) => {
                let recomputed = entry_hash_of_fields(prev_hash, seq, fields);
                let stored = crate::entry_line::decode_hex_hash(hash_hex);
                (recomputed, stored == Some(recomputed))
            }
            None => ([0; 32], false),
        };
        Self {
            seq,
            encoding_version,
            stored_prev_hash,
            stored_hash_matches,
            recomputed_hash,
            leaf_hash: crate::merkle::leaf_hash(&recomputed_hash),
        }
    }

    pub fn of_entry(entry: &StoredEntry) -> Self {
        let content = &entry.content;
        Self::of_fields(
            content.seq,
            entry.encoding_version,
            content.hashed_fields(),
            entry.prev_hash_hex.as_bytes(),
            entry.hash_hex.as_bytes(),
        )
    }
}

/// Whether `hex_text` is the hex form of `hash`, without allocating.
fn hex_equals(hex_text: &str, hash: &Hash) -> bool {
    let mut decoded = [0u8; 32];
    hex::decode_to_slice(hex_text, &mut decoded).is_ok() && &decoded == hash
}

/// Serialises JSON deterministically: object keys sorted by their UTF-8 bytes, no
/// insignificant whitespace, serde_json's number and string escaping.
pub fn canonical_json(value: &serde_json::Value) -> String {
    let mut out = String::new();
    write_canonical(value, &mut out);
    out
}

fn write_canonical(value: &serde_json::Value, out: &mut String) {
    match value {
        serde_json::Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (index, key) in keys.into_iter().enumerate() {
                if index > 0 {
                    out.push(',');
                }
                out.push_str(&serde_json::Value::String(key.clone()).to_string());
                out.push(':');
                write_canonical(&map[key], out);
            }
            out.push('}');
        }
        serde_json::Value::Array(items) => {
            out.push('[');
            for (index, item) in items.iter().enumerate() {
                if index > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

/// A stored entry as the verifier reads it back.
#[derive(Clone, Debug)]
pub struct StoredEntry {
    pub content: EntryContent,
    pub encoding_version: u32,
    pub prev_hash_hex: String,
    pub hash_hex: String,
}

/// Why an entry breaks the chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChainBreak {
    /// The first sequence number that is wrong (for a missing entry, the one that is missing).
    pub seq: u64,
    pub problem: String,
}

/// Walks a chain from genesis, one entry at a time, recomputing every hash.
#[derive(Clone, Debug)]
pub struct ChainVerifier {
    expected_seq: u64,
    head: Hash,
}

impl Default for ChainVerifier {
    fn default() -> Self {
        Self {
            expected_seq: 1,
            head: genesis_hash(),
        }
    }
}

impl ChainVerifier {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn entries_checked(&self) -> u64 {
        self.expected_seq - 1
    }

    pub fn head(&self) -> Hash {
        self.head
    }

    /// The break at the expected position: what `check` and `link` both report.
    fn break_here(&self, problem: String) -> Result<(), ChainBreak> {
        Err(ChainBreak {
            seq: self.expected_seq,
            problem,
        })
    }

    /// The entry's seq and encoding version, checked first by `check` and `link` alike.
    fn check_place(&self, seq: u64, encoding_version: u32) -> Result<(), ChainBreak> {
        if seq != self.expected_seq {
            return self.break_here(format!(
                "expected seq {} but found seq {seq}",
                self.expected_seq
            ));
        }
        if encoding_version != ENCODING_VERSION {
            return self.break_here(format!("unknown encoding version {encoding_version}"));
        }
        Ok(())
    }

    pub fn check(&mut self, entry: &StoredEntry) -> Result<(), ChainBreak> {
        self.check_place(entry.content.seq, entry.encoding_version)?;
        if !hex_equals(&entry.prev_hash_hex, &self.head) {
            return self
                .break_here("prev_hash does not match the previous entry's hash".to_owned());
        }
        let recomputed = entry_hash(&self.head, &entry.content);
        if !hex_equals(&entry.hash_hex, &recomputed) {
            return self.break_here("hash does not match the entry's content".to_owned());
        }
        self.head = recomputed;
        self.expected_seq += 1;
        Ok(())
    }

    /// [`Self::check`] for an entry already digested on its own: the same checks in the same
    /// order with the same verdict, but no hashing here (the sequential part of a parallel
    /// verification).
    pub fn link(&mut self, entry: &EntryDigest) -> Result<(), ChainBreak> {
        self.check_place(entry.seq, entry.encoding_version)?;
        if entry.stored_prev_hash != Some(self.head) {
            return self
                .break_here("prev_hash does not match the previous entry's hash".to_owned());
        }
        // The stored prev_hash is the head, so the digest's hash is the one `check` computes.
        if !entry.stored_hash_matches {
            return self.break_here("hash does not match the entry's content".to_owned());
        }
        self.head = entry.recomputed_hash;
        self.expected_seq += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn content(seq: u64, actor: &str) -> EntryContent {
        EntryContent {
            seq,
            recorded_at: "2026-11-22T00:00:00.000000Z".to_owned(),
            actor: actor.to_owned(),
            action: "INFERENCE".to_owned(),
            resource: "result/1".to_owned(),
            outcome: "SUCCESS".to_owned(),
            context: "{}".to_owned(),
        }
    }

    fn chain(actors: &[&str]) -> Vec<StoredEntry> {
        let mut head = genesis_hash();
        actors
            .iter()
            .enumerate()
            .map(|(index, actor)| {
                let content = content(index as u64 + 1, actor);
                let hash = entry_hash(&head, &content);
                let entry = StoredEntry {
                    content,
                    encoding_version: ENCODING_VERSION,
                    prev_hash_hex: hex::encode(head),
                    hash_hex: hex::encode(hash),
                };
                head = hash;
                entry
            })
            .collect()
    }

    fn first_break(entries: &[StoredEntry]) -> Option<ChainBreak> {
        let mut verifier = ChainVerifier::new();
        entries.iter().find_map(|entry| verifier.check(entry).err())
    }

    #[test]
    fn genesis_and_encoding_are_fixed() {
        // Pinned so an accidental change of the rules fails here, not in an auditor's tool.
        assert_eq!(
            hex::encode(genesis_hash()),
            hex::encode(Sha256::digest(b"medai-ledger-genesis-v1"))
        );
        let encoding = canonical_encoding(&content(1, "a"));
        assert!(
            encoding
                .starts_with(b"MEDAI-LEDGER\x00\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00\x01")
        );
    }

    #[test]
    fn an_intact_chain_verifies() {
        assert_eq!(first_break(&chain(&["a", "b", "c"])), None);
    }

    #[test]
    fn a_changed_field_is_named_by_seq() {
        let mut entries = chain(&["a", "b", "c"]);
        entries[1].content.actor = "mallory".to_owned();
        assert_eq!(first_break(&entries).map(|b| b.seq), Some(2));
    }

    #[test]
    fn a_deleted_entry_names_the_missing_seq() {
        let mut entries = chain(&["a", "b", "c", "d"]);
        entries.remove(2);
        assert_eq!(first_break(&entries).map(|b| b.seq), Some(3));
    }

    #[test]
    fn the_streamed_hash_equals_the_hash_of_the_documented_encoding() {
        let entry = content(7, "user:x");
        let mut documented = Sha256::new();
        documented.update(genesis_hash());
        documented.update(canonical_encoding(&entry));
        assert_eq!(
            entry_hash(&genesis_hash(), &entry),
            <[u8; 32]>::from(documented.finalize())
        );
    }

    #[test]
    fn field_boundaries_cannot_be_shifted() {
        let mut moved = content(1, "ab");
        moved.action = "cINFERENCE".to_owned();
        let mut original = content(1, "abc");
        original.action = "INFERENCE".to_owned();
        assert_ne!(
            entry_hash(&genesis_hash(), &moved),
            entry_hash(&genesis_hash(), &original)
        );
    }

    #[test]
    fn canonical_json_sorts_keys_and_drops_whitespace() {
        let value: serde_json::Value =
            serde_json::from_str(r#"{ "b": [1, {"z": true, "a": null}], "a": "x\"y" }"#)
                .expect("json");
        assert_eq!(
            canonical_json(&value),
            r#"{"a":"x\"y","b":[1,{"a":null,"z":true}]}"#
        );
    }
}
