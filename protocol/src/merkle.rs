//! Chunk hashes, Merkle roots and per-chunk proofs.
//!
//! Content is cut into chunks of the manifest's chunk size (the last may be
//! shorter). Leaf `i` is `SHA-256(0x00 ‖ chunk_i)`; an inner node is
//! `SHA-256(0x01 ‖ left ‖ right)`. A level with an odd number of nodes passes
//! its last node up unchanged. The root of this tree is in the manifest.
//!
//! A chunk travels with its [`Proof`]: the sibling hashes from the leaf to the
//! root. Verifying needs only the chunk, the proof, the chunk's index, the leaf
//! count and the root — a few hundred bytes beyond the chunk itself, whatever
//! the content size. The leaf domain byte keeps a leaf from passing as a node.

use sha2::{Digest as _, Sha256};

use crate::types::Digest;

/// Deepest tree a proof may describe: 2^32 chunks.
pub const MAX_DEPTH: usize = 32;

/// Sibling hashes from a leaf to the root, lowest level first.
pub type Proof = heapless::Vec<Digest, MAX_DEPTH>;

/// Hash of one chunk's bytes: a Merkle leaf.
pub fn leaf_hash(chunk: &[u8]) -> Digest {
    let mut h = Sha256::new();
    h.update([0x00]);
    h.update(chunk);
    h.finalize().into()
}

/// Hash of two sibling nodes: their parent.
pub fn node_hash(left: &Digest, right: &Digest) -> Digest {
    let mut h = Sha256::new();
    h.update([0x01]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// Why a chunk failed verification.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum VerifyError {
    /// The index is not below the leaf count.
    IndexOutOfRange,
    /// The proof has more or fewer siblings than this position needs.
    ProofLength,
    /// The chunk's length is not the one its index implies.
    ChunkLength,
    /// The hashes do not lead to the root: the chunk or its proof is wrong.
    RootMismatch,
}

impl core::fmt::Display for VerifyError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            VerifyError::IndexOutOfRange => "chunk index out of range",
            VerifyError::ProofLength => "proof has the wrong number of hashes",
            VerifyError::ChunkLength => "chunk has the wrong length",
            VerifyError::RootMismatch => "chunk does not match the content root",
        })
    }
}

impl core::error::Error for VerifyError {}

/// Number of sibling hashes a proof for leaf `index` of `leaves` carries.
pub fn proof_len(index: u32, leaves: u32) -> usize {
    let (mut i, mut n, mut len) = (index as u64, leaves as u64, 0);
    while n > 1 {
        if i ^ 1 < n {
            len += 1;
        }
        i >>= 1;
        n = n.div_ceil(2);
    }
    len
}

/// Checks that `leaf` at `index` of a tree of `leaves` leaves leads to `root` via `proof`.
pub fn verify_leaf(
    root: &Digest,
    leaves: u32,
    index: u32,
    leaf: &Digest,
    proof: &[Digest],
) -> Result<(), VerifyError> {
    if index >= leaves {
        return Err(VerifyError::IndexOutOfRange);
    }
    if proof.len() != proof_len(index, leaves) {
        return Err(VerifyError::ProofLength);
    }
    let (mut i, mut n) = (index as u64, leaves as u64);
    let mut node = *leaf;
    let mut siblings = proof.iter();
    while n > 1 {
        if i ^ 1 < n {
            // The length check above guarantees a sibling is there.
            let sibling = siblings.next().ok_or(VerifyError::ProofLength)?;
            node = if i & 1 == 0 {
                node_hash(&node, sibling)
            } else {
                node_hash(sibling, &node)
            };
        }
        i >>= 1;
        n = n.div_ceil(2);
    }
    if node == *root {
        Ok(())
    } else {
        Err(VerifyError::RootMismatch)
    }
}

/// Root of a tree over `leaves`, computed with `O(log n)` memory.
///
/// Feed leaf hashes in order with [`RootBuilder::push`], then [`RootBuilder::finish`].
#[derive(Clone, Debug)]
pub struct RootBuilder {
    /// Pending left subtree roots, one slot per level (`None` where empty).
    stack: [Option<Digest>; MAX_DEPTH + 1],
    count: u64,
}

impl Default for RootBuilder {
    fn default() -> Self {
        RootBuilder {
            stack: [None; MAX_DEPTH + 1],
            count: 0,
        }
    }
}

impl RootBuilder {
    /// An empty builder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds the next leaf hash.
    ///
    /// # Panics
    /// If more than 2^32 leaves are pushed.
    pub fn push(&mut self, leaf: Digest) {
        assert!(self.count < 1 << MAX_DEPTH, "too many leaves");
        let mut node = leaf;
        let mut level = 0;
        while let Some(left) = self.stack[level].take() {
            node = node_hash(&left, &node);
            level += 1;
        }
        self.stack[level] = Some(node);
        self.count += 1;
    }

    /// Number of leaves pushed so far.
    pub fn leaves(&self) -> u64 {
        self.count
    }

    /// The root over every leaf pushed, or `None` if there were none.
    ///
    /// Odd nodes pass up unchanged, exactly as in [`verify_leaf`].
    pub fn finish(&self) -> Option<Digest> {
        // Complete subtrees sit at the levels of the set bits of `count`,
        // higher levels holding earlier leaves. Fold from the lowest level up:
        // a lone lower subtree is promoted until it meets a higher sibling.
        let mut acc: Option<Digest> = None;
        for slot in self.stack.iter() {
            match (slot, acc) {
                (Some(left), Some(right)) => acc = Some(node_hash(left, &right)),
                (Some(left), None) => acc = Some(*left),
                (None, _) => {}
            }
        }
        acc
    }
}

/// A whole tree kept in memory: the manager and std agents use it to answer proofs quickly.
#[cfg(feature = "alloc")]
#[derive(Clone, Debug)]
pub struct MerkleTree {
    /// `levels[0]` are the leaves; the last level holds the root alone.
    levels: alloc::vec::Vec<alloc::vec::Vec<Digest>>,
}

#[cfg(feature = "alloc")]
impl MerkleTree {
    /// Builds the tree over leaf hashes (at least one).
    ///
    /// # Panics
    /// If `leaves` is empty.
    pub fn from_leaves(leaves: alloc::vec::Vec<Digest>) -> Self {
        assert!(!leaves.is_empty(), "a Merkle tree needs at least one leaf");
        let mut levels = alloc::vec![leaves];
        while levels.last().map_or(0, |l| l.len()) > 1 {
            let below = levels.last().expect("non-empty");
            let above = below
                .chunks(2)
                .map(|pair| match pair {
                    [l, r] => node_hash(l, r),
                    [only] => *only,
                    _ => unreachable!("chunks(2) yields one or two"),
                })
                .collect();
            levels.push(above);
        }
        MerkleTree { levels }
    }

    /// The root hash.
    pub fn root(&self) -> Digest {
        self.levels.last().expect("non-empty")[0]
    }

    /// Number of leaves.
    pub fn leaves(&self) -> u32 {
        self.levels[0].len() as u32
    }

    /// Leaf hash `index`, if in range.
    pub fn leaf(&self, index: u32) -> Option<&Digest> {
        self.levels[0].get(index as usize)
    }

    /// The proof for leaf `index`, if in range.
    pub fn proof(&self, index: u32) -> Option<Proof> {
        if index >= self.leaves() {
            return None;
        }
        let mut proof = Proof::new();
        let mut i = index as usize;
        for level in &self.levels[..self.levels.len() - 1] {
            if let Some(sibling) = level.get(i ^ 1) {
                proof.push(*sibling).ok()?;
            }
            i >>= 1;
        }
        Some(proof)
    }
}

#[cfg(test)]
mod test {
    use super::*;

    fn leaves(n: u32) -> [Digest; 64] {
        let mut out = [[0u8; 32]; 64];
        for (i, leaf) in out.iter_mut().enumerate().take(n as usize) {
            *leaf = leaf_hash(&(i as u32).to_le_bytes());
        }
        out
    }

    /// Reference root by recursion over a slice (independent of both builders).
    fn reference_root(level: &[Digest]) -> Digest {
        if level.len() == 1 {
            return level[0];
        }
        let mut next = heapless::Vec::<Digest, 64>::new();
        for pair in level.chunks(2) {
            let node = if pair.len() == 2 {
                node_hash(&pair[0], &pair[1])
            } else {
                pair[0]
            };
            next.push(node).unwrap();
        }
        reference_root(&next)
    }

    /// Proof by walking the reference levels.
    fn reference_proof(all: &[Digest], mut index: usize) -> Proof {
        let mut proof = Proof::new();
        let mut level: heapless::Vec<Digest, 64> = all.iter().copied().collect();
        while level.len() > 1 {
            if let Some(s) = level.get(index ^ 1) {
                proof.push(*s).unwrap();
            }
            let mut next = heapless::Vec::<Digest, 64>::new();
            for pair in level.chunks(2) {
                next.push(if pair.len() == 2 {
                    node_hash(&pair[0], &pair[1])
                } else {
                    pair[0]
                })
                .unwrap();
            }
            level = next;
            index >>= 1;
        }
        proof
    }

    #[test]
    fn builder_matches_reference_for_every_size() {
        for n in 1..=64u32 {
            let all = leaves(n);
            let mut b = RootBuilder::new();
            for l in &all[..n as usize] {
                b.push(*l);
            }
            assert_eq!(
                b.finish(),
                Some(reference_root(&all[..n as usize])),
                "n={n}"
            );
        }
    }

    #[test]
    fn every_proof_verifies_and_a_flipped_bit_fails() {
        for n in 1..=40u32 {
            let all = leaves(n);
            let root = reference_root(&all[..n as usize]);
            for i in 0..n {
                let proof = reference_proof(&all[..n as usize], i as usize);
                assert_eq!(proof.len(), proof_len(i, n));
                verify_leaf(&root, n, i, &all[i as usize], &proof).unwrap();
                let mut bad = all[i as usize];
                bad[5] ^= 1;
                assert_eq!(
                    verify_leaf(&root, n, i, &bad, &proof),
                    Err(VerifyError::RootMismatch)
                );
                if n > 1 {
                    // The right chunk at the wrong index must fail too.
                    let other = (i + 1) % n;
                    assert!(verify_leaf(&root, n, other, &all[i as usize], &proof).is_err());
                }
            }
        }
    }

    #[test]
    fn proof_of_wrong_length_is_refused() {
        let all = leaves(8);
        let root = reference_root(&all[..8]);
        let mut proof = reference_proof(&all[..8], 3);
        proof.pop();
        assert_eq!(
            verify_leaf(&root, 8, 3, &all[3], &proof),
            Err(VerifyError::ProofLength)
        );
        assert_eq!(
            verify_leaf(&root, 8, 8, &all[3], &proof),
            Err(VerifyError::IndexOutOfRange)
        );
    }

    #[cfg(feature = "alloc")]
    #[test]
    fn whole_tree_agrees_with_reference() {
        for n in 1..=33u32 {
            let all = leaves(n);
            let tree = MerkleTree::from_leaves(all[..n as usize].to_vec());
            assert_eq!(tree.root(), reference_root(&all[..n as usize]));
            for i in 0..n {
                assert_eq!(
                    tree.proof(i).unwrap(),
                    reference_proof(&all[..n as usize], i as usize)
                );
            }
        }
    }
}
