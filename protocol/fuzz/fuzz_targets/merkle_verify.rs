//! Merkle proofs: `verify_leaf` on arbitrary proof, index, leaf count and
//! root never panics; on a real tree, a genuine proof verifies and a
//! fuzz-chosen alteration is refused exactly when it should be.
//!
//! Input: a selector byte, then either raw verification arguments or a tree
//! description and an alteration.

#![no_main]

use baton_protocol::Digest;
use baton_protocol::merkle::{
    MAX_DEPTH, MerkleTree, RootBuilder, VerifyError, leaf_hash, proof_len, verify_leaf,
};
use libfuzzer_sys::fuzz_target;

fn digest(bytes: &[u8]) -> Digest {
    let mut d = [0u8; 32];
    let n = bytes.len().min(32);
    d[..n].copy_from_slice(&bytes[..n]);
    d
}

/// Sides taken at each level where leaf `index` of `leaves` has a sibling.
fn path_sides(index: u32, leaves: u32) -> Vec<u64> {
    let (mut i, mut n, mut sides) = (index as u64, leaves as u64, Vec::new());
    while n > 1 {
        if i ^ 1 < n {
            sides.push(i & 1);
        }
        i >>= 1;
        n = n.div_ceil(2);
    }
    sides
}

fn u32_at(data: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    for (k, v) in b.iter_mut().enumerate() {
        *v = data.get(at + k).copied().unwrap_or(0);
    }
    u32::from_le_bytes(b)
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, data)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        // Raw: leaves, index, root, leaf, then up to 40 proof hashes.
        let (leaves, index) = (u32_at(data, 0), u32_at(data, 4));
        let root = digest(data.get(8..).unwrap_or(&[]));
        let leaf = digest(data.get(40..).unwrap_or(&[]));
        let proof: Vec<Digest> = data
            .get(72..)
            .unwrap_or(&[])
            .chunks(32)
            .take(40)
            .map(digest)
            .collect();
        let result = verify_leaf(&root, leaves, index, &leaf, &proof);
        if index >= leaves {
            assert_eq!(result, Err(VerifyError::IndexOutOfRange));
        } else {
            assert!(proof_len(index, leaves) <= MAX_DEPTH);
            if proof.len() != proof_len(index, leaves) {
                assert_eq!(result, Err(VerifyError::ProofLength));
            }
        }
        return;
    }

    // A real tree of 1..=512 distinct leaves, one genuine proof, one alteration.
    let n = u32_at(data, 0) % 512 + 1;
    let index = u32_at(data, 4) % n;
    let what = data.get(8).copied().unwrap_or(0);
    let bit = u32_at(data, 9);
    let salt = data.get(13..).unwrap_or(&[]);
    let leaves: Vec<Digest> = (0..n)
        .map(|i| {
            let mut chunk = i.to_le_bytes().to_vec();
            chunk.extend_from_slice(salt);
            leaf_hash(&chunk)
        })
        .collect();
    let tree = MerkleTree::from_leaves(leaves.clone());
    let root = tree.root();
    let mut builder = RootBuilder::new();
    leaves.iter().for_each(|l| builder.push(*l));
    assert_eq!(builder.finish(), Some(root));
    let leaf = leaves[index as usize];
    let proof = tree.proof(index).unwrap();
    assert_eq!(proof.len(), proof_len(index, n));
    assert_eq!(verify_leaf(&root, n, index, &leaf, &proof), Ok(()));

    match what % 5 {
        0 => {
            let mut bad = leaf;
            bad[(bit as usize / 8) % 32] ^= 1 << (bit % 8);
            assert_eq!(
                verify_leaf(&root, n, index, &bad, &proof),
                Err(VerifyError::RootMismatch)
            );
        }
        1 if !proof.is_empty() => {
            let mut bad = proof.clone();
            let b = bit as usize % (bad.len() * 256);
            bad[b / 256][(b % 256) / 8] ^= 1 << (b % 8);
            assert_eq!(
                verify_leaf(&root, n, index, &leaf, &bad),
                Err(VerifyError::RootMismatch)
            );
        }
        2 => {
            let other = index ^ (1 << (bit % 32));
            let result = verify_leaf(&root, n, other, &leaf, &proof);
            if other >= n {
                assert_eq!(result, Err(VerifyError::IndexOutOfRange));
            } else if proof_len(other, n) != proof.len() {
                assert_eq!(result, Err(VerifyError::ProofLength));
            } else {
                assert_eq!(result, Err(VerifyError::RootMismatch));
            }
        }
        3 => {
            // The count is not committed by the proof (the signed manifest is).
            let count = n ^ (1 << (bit % 32));
            let result = verify_leaf(&root, count, index, &leaf, &proof);
            if index >= count {
                assert_eq!(result, Err(VerifyError::IndexOutOfRange));
            } else if path_sides(index, count) == path_sides(index, n) {
                assert_eq!(result, Ok(()));
            } else {
                assert!(result.is_err());
            }
        }
        _ => {
            // A proof with one hash more or fewer.
            let mut bad = proof.clone();
            if bit & 1 == 0 || bad.is_empty() {
                let _ = bad.push(root);
            } else {
                bad.pop();
            }
            if bad.len() != proof.len() {
                assert_eq!(
                    verify_leaf(&root, n, index, &leaf, &bad),
                    Err(VerifyError::ProofLength)
                );
            }
        }
    }
});
