//! The ledger's rules, shared by the audit service and by auditors' offline tools: the hash
//! chain and its canonical encoding, the RFC 9162 Merkle tree and its proofs, signed
//! checkpoints, and the export format with its verifier. compliance/ledger-encoding.md states
//! the same rules in prose.

pub mod chain;
pub mod checkpoint;
mod entry_line;
pub mod export;
pub mod merkle;
