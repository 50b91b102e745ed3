//! The Merkle tree of RFC 9162 (Certificate Transparency v2), section 2.1, over the ledger's
//! entry hashes: leaf = SHA-256(0x00 ‖ entry hash), node = SHA-256(0x01 ‖ left ‖ right).
//! Inclusion and consistency proofs are generated and verified exactly as the RFC describes,
//! so any RFC 9162 verifier can check them.

use sha2::{Digest, Sha256};

pub type Hash = [u8; 32];

pub fn leaf_hash(entry_hash: &Hash) -> Hash {
    let mut hasher = Sha256::new();
    hasher.update([0x00]);
    hasher.update(entry_hash);
    hasher.finalize().into()
}

pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut hasher = Sha256::new();
    hasher.update([0x01]);
    hasher.update(left);
    hasher.update(right);
    hasher.finalize().into()
}

/// The hash of an empty tree: SHA-256 of the empty string.
pub fn empty_root() -> Hash {
    Sha256::digest([]).into()
}

/// The largest power of two strictly smaller than `n` (n ≥ 2).
fn split(n: usize) -> usize {
    let mut k = 1;
    while k << 1 < n {
        k <<= 1;
    }
    k
}

/// The right edge of a growing tree: the roots of its perfect subtrees, largest first. Gives
/// MTH of every prefix in one pass, O(log n) per leaf, so checking many checkpoints costs one
/// walk over the entries instead of one walk per checkpoint.
#[derive(Clone, Debug, Default)]
pub struct MerkleFrontier {
    subtrees: Vec<(u64, Hash)>,
    size: u64,
}

impl MerkleFrontier {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn push(&mut self, entry_hash: &Hash) {
        self.push_leaf(leaf_hash(entry_hash));
    }

    /// [`Self::push`] with the leaf hash (`leaf_hash(entry_hash)`) already computed, for
    /// verifiers that hash leaves on other threads.
    pub fn push_leaf(&mut self, leaf: Hash) {
        let mut carry = (1_u64, leaf);
        while let Some(&(size, left)) = self.subtrees.last() {
            if size != carry.0 {
                break;
            }
            self.subtrees.pop();
            carry = (size * 2, node_hash(&left, &carry.1));
        }
        self.subtrees.push(carry);
        self.size += 1;
    }

    /// MTH of the leaves pushed so far.
    pub fn root(&self) -> Hash {
        let mut subtrees = self.subtrees.iter().rev();
        let Some(&(_, mut root)) = subtrees.next() else {
            return empty_root();
        };
        for (_, left) in subtrees {
            root = node_hash(left, &root);
        }
        root
    }
}

/// MTH over already-hashed leaves.
fn root_of_leaves(leaves: &[Hash]) -> Hash {
    match leaves.len() {
        0 => empty_root(),
        1 => leaves[0],
        n => {
            let k = split(n);
            node_hash(&root_of_leaves(&leaves[..k]), &root_of_leaves(&leaves[k..]))
        }
    }
}

/// MTH(D[n]) over the entry hashes.
pub fn root(entry_hashes: &[Hash]) -> Hash {
    let leaves: Vec<Hash> = entry_hashes.iter().map(leaf_hash).collect();
    root_of_leaves(&leaves)
}

/// PATH(m, D[n]): the audit path for leaf `index` (0-based) in a tree of the given entries.
pub fn inclusion_proof(entry_hashes: &[Hash], index: usize) -> Option<Vec<Hash>> {
    if index >= entry_hashes.len() {
        return None;
    }
    let leaves: Vec<Hash> = entry_hashes.iter().map(leaf_hash).collect();
    Some(path(index, &leaves))
}

fn path(m: usize, leaves: &[Hash]) -> Vec<Hash> {
    let n = leaves.len();
    if n <= 1 {
        return Vec::new();
    }
    let k = split(n);
    if m < k {
        let mut proof = path(m, &leaves[..k]);
        proof.push(root_of_leaves(&leaves[k..]));
        proof
    } else {
        let mut proof = path(m - k, &leaves[k..]);
        proof.push(root_of_leaves(&leaves[..k]));
        proof
    }
}

/// PROOF(m, D[n]): proves the tree of the first `old_size` entries is a prefix of the tree of
/// all of them.
pub fn consistency_proof(entry_hashes: &[Hash], old_size: usize) -> Option<Vec<Hash>> {
    let n = entry_hashes.len();
    if old_size == 0 || old_size > n {
        return None;
    }
    let leaves: Vec<Hash> = entry_hashes.iter().map(leaf_hash).collect();
    Some(subproof(old_size, &leaves, true))
}

fn subproof(m: usize, leaves: &[Hash], complete: bool) -> Vec<Hash> {
    let n = leaves.len();
    if m == n {
        return if complete {
            Vec::new()
        } else {
            vec![root_of_leaves(leaves)]
        };
    }
    let k = split(n);
    if m <= k {
        let mut proof = subproof(m, &leaves[..k], complete);
        proof.push(root_of_leaves(&leaves[k..]));
        proof
    } else {
        let mut proof = subproof(m - k, &leaves[k..], false);
        proof.push(root_of_leaves(&leaves[..k]));
        proof
    }
}

/// RFC 9162 2.1.3.2: verifies that `entry_hash` is leaf `index` of the tree of `tree_size`
/// leaves whose root is `root`.
pub fn verify_inclusion(
    entry_hash: &Hash,
    index: u64,
    tree_size: u64,
    proof: &[Hash],
    root: &Hash,
) -> bool {
    if index >= tree_size {
        return false;
    }
    let (mut fn_, mut sn) = (index, tree_size - 1);
    let mut r = leaf_hash(entry_hash);
    for p in proof {
        if sn == 0 {
            return false;
        }
        if fn_ & 1 == 1 || fn_ == sn {
            r = node_hash(p, &r);
            if fn_ & 1 == 0 {
                while fn_ & 1 == 0 && fn_ != 0 {
                    fn_ >>= 1;
                    sn >>= 1;
                }
            }
        } else {
            r = node_hash(&r, p);
        }
        fn_ >>= 1;
        sn >>= 1;
    }
    sn == 0 && &r == root
}

/// RFC 9162 2.1.4.2: verifies that the tree of `old_size` leaves with `old_root` is a prefix of
/// the tree of `new_size` leaves with `new_root`.
pub fn verify_consistency(
    old_size: u64,
    new_size: u64,
    proof: &[Hash],
    old_root: &Hash,
    new_root: &Hash,
) -> bool {
    if old_size == 0 || old_size > new_size {
        return false;
    }
    if old_size == new_size {
        return proof.is_empty() && old_root == new_root;
    }
    let mut path: Vec<Hash> = proof.to_vec();
    if old_size.is_power_of_two() {
        path.insert(0, *old_root);
    }
    let Some((first, rest)) = path.split_first() else {
        return false;
    };
    let (mut fn_, mut sn) = (old_size - 1, new_size - 1);
    while fn_ & 1 == 1 {
        fn_ >>= 1;
        sn >>= 1;
    }
    let (mut fr, mut sr) = (*first, *first);
    for c in rest {
        if sn == 0 {
            return false;
        }
        if fn_ & 1 == 1 || fn_ == sn {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            if fn_ & 1 == 0 {
                while fn_ & 1 == 0 && fn_ != 0 {
                    fn_ >>= 1;
                    sn >>= 1;
                }
            }
        } else {
            sr = node_hash(&sr, c);
        }
        fn_ >>= 1;
        sn >>= 1;
    }
    sn == 0 && &fr == old_root && &sr == new_root
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(n: usize) -> Vec<Hash> {
        (0..n)
            .map(|index| Sha256::digest((index as u64).to_be_bytes()).into())
            .collect()
    }

    #[test]
    fn small_trees_follow_the_rfc_shape() {
        let e = entries(3);
        let expected = node_hash(
            &node_hash(&leaf_hash(&e[0]), &leaf_hash(&e[1])),
            &leaf_hash(&e[2]),
        );
        assert_eq!(root(&e), expected);
        assert_eq!(root(&e[..1]), leaf_hash(&e[0]));
        assert_eq!(root(&[]), empty_root());
    }

    #[test]
    fn the_frontier_gives_the_root_of_every_prefix() {
        let e = entries(70);
        let mut frontier = MerkleFrontier::new();
        assert_eq!(frontier.root(), empty_root());
        for n in 1..=e.len() {
            frontier.push(&e[n - 1]);
            assert_eq!(frontier.root(), root(&e[..n]), "n={n}");
        }
    }

    #[test]
    fn every_inclusion_proof_verifies_and_a_wrong_one_does_not() {
        for n in 1..=33 {
            let e = entries(n);
            let tree_root = root(&e);
            for index in 0..n {
                let proof = inclusion_proof(&e, index).expect("proof");
                assert!(
                    verify_inclusion(&e[index], index as u64, n as u64, &proof, &tree_root),
                    "n={n} i={index}"
                );
                let other = entries(n + 1)[n];
                assert!(!verify_inclusion(
                    &other,
                    index as u64,
                    n as u64,
                    &proof,
                    &tree_root
                ));
            }
        }
    }

    #[test]
    fn every_consistency_proof_verifies_and_a_forked_tree_does_not() {
        for n in 1..=33 {
            let e = entries(n);
            for m in 1..=n {
                let proof = consistency_proof(&e, m).expect("proof");
                assert!(
                    verify_consistency(m as u64, n as u64, &proof, &root(&e[..m]), &root(&e)),
                    "m={m} n={n}"
                );
                if m < n {
                    // The same sizes, but history rewritten inside the old tree.
                    let mut forked = e.clone();
                    forked[m - 1] = [7; 32];
                    let forked_proof = consistency_proof(&forked, m).expect("proof");
                    assert!(!verify_consistency(
                        m as u64,
                        n as u64,
                        &forked_proof,
                        &root(&e[..m]),
                        &root(&forked)
                    ));
                }
            }
        }
    }
}
