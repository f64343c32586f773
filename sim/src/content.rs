//! The content under distribution, as the simulator knows it: the ground truth.
//!
//! [`Truth`] holds the real bytes of every chunk (small: [`REAL_CHUNK`] bytes
//! each), the whole Merkle tree, and the manifest signed by a publisher key.
//! A root key signs the trust document that lists the publisher (agents pin the
//! root; the simulated manager sends the document after `Welcome`).
//! The manager serves chunks from it, and the invariant checks compare every
//! stored or relayed chunk against it. The link model charges each chunk at
//! its *virtual* size ([`Truth::virtual_chunk`]) instead: the simulated
//! content is `chunks × virtual_chunk` bytes long, while hashing and
//! verification run on the real 256-byte chunks.

use baton_protocol::identity::Identity;
use baton_protocol::merkle::{MerkleTree, Proof, leaf_hash};
use baton_protocol::{Digest, MIN_CHUNK_SIZE, Manifest, Message};
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The `Trust` message of a document (version 1, no expiry) listing `publisher` for every
/// name, signed by `root`.
fn trust_message(root: &Identity, publisher: &Identity) -> Vec<u8> {
    use baton_protocol::trust::{NamePattern, PublisherGrant, SignedTrust, TrustDocument};
    let grant = PublisherGrant {
        key: publisher.public(),
        names: [NamePattern::try_from("*").expect("short pattern")]
            .into_iter()
            .collect(),
    };
    let mut signed = SignedTrust::new(TrustDocument {
        version: 1,
        expires: 0,
        threshold: 1,
        roots: [root.public()].into_iter().collect(),
        publishers: [grant].into_iter().collect(),
    });
    signed.sign(root).expect("room for one signature");
    let mut buf = vec![0u8; baton_protocol::trust::MAX_TRUST_BYTES];
    let document = signed.encode(&mut buf).expect("fits its bound");
    Message::Trust { document }.to_vec()
}

/// Real bytes per chunk: the protocol's smallest chunk size.
pub const REAL_CHUNK: u32 = MIN_CHUNK_SIZE;

/// The content of a simulated job and everything needed to check it.
#[derive(Debug)]
pub struct Truth {
    data: Vec<u8>,
    tree: MerkleTree,
    manifest: Manifest,
    publisher: Identity,
    root_key: Identity,
    /// The encoded `Message::Trust` carrying the trust document.
    trust: Vec<u8>,
    virtual_chunk: u64,
}

impl Truth {
    /// Random content of `chunks` real chunks (from `seed`), each standing for `virtual_chunk` bytes.
    ///
    /// # Panics
    /// If `chunks` is 0.
    pub fn new(seed: u64, chunks: u32, virtual_chunk: u64) -> Self {
        assert!(chunks > 0, "content needs at least one chunk");
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xC0_47E7);
        let mut data = vec![0u8; chunks as usize * REAL_CHUNK as usize];
        rng.fill_bytes(&mut data);
        let leaves = data.chunks(REAL_CHUNK as usize).map(leaf_hash).collect();
        let tree = MerkleTree::from_leaves(leaves);
        let publisher = Identity::from_seed([0x9B; 32]);
        let manifest = Manifest::sign(
            &publisher,
            "sim-content".try_into().expect("short name"),
            1,
            0,
            data.len() as u64,
            REAL_CHUNK,
            tree.root(),
        );
        let root_key = Identity::from_seed([0x52; 32]);
        let trust = trust_message(&root_key, &publisher);
        Truth {
            data,
            tree,
            manifest,
            publisher,
            root_key,
            trust,
            virtual_chunk: virtual_chunk.max(1),
        }
    }

    /// The root key agents pin: it signed the trust document.
    pub fn root_key(&self) -> &Identity {
        &self.root_key
    }

    /// The `Trust` message the manager sends after `Welcome` (encoded).
    pub fn trust_message(&self) -> &[u8] {
        &self.trust
    }

    /// The signed manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The Merkle root (the content's id on the wire).
    pub fn root(&self) -> &Digest {
        &self.manifest.root
    }

    /// The publisher identity that signed the manifest.
    pub fn publisher(&self) -> &Identity {
        &self.publisher
    }

    /// Number of chunks.
    pub fn chunks(&self) -> u32 {
        self.tree.leaves()
    }

    /// Bytes each chunk stands for in the link model.
    pub fn virtual_chunk(&self) -> u64 {
        self.virtual_chunk
    }

    /// Virtual content size `S` in bytes (what the lower bound and the link model use).
    pub fn virtual_size(&self) -> u64 {
        self.virtual_chunk * self.chunks() as u64
    }

    /// The real bytes of chunk `index`.
    pub fn chunk(&self, index: u32) -> &[u8] {
        let start = index as usize * REAL_CHUNK as usize;
        &self.data[start..start + REAL_CHUNK as usize]
    }

    /// The true proof of chunk `index`.
    pub fn proof(&self, index: u32) -> Proof {
        self.tree.proof(index).unwrap_or_default()
    }

    /// Encodes `Chunk { index }` as the manager sends it into `buf`; returns its length.
    pub fn encode_chunk(&self, index: u32, buf: &mut [u8]) -> usize {
        let msg = Message::Chunk {
            root: *self.root(),
            index,
            proof: self.proof(index),
            data: self.chunk(index),
        };
        msg.encode(buf).map(|b| b.len()).unwrap_or(0)
    }

    /// If `frame` is an encoded `Chunk` of this content, its index and data.
    ///
    /// A cheap parse for the hot path: the variant byte, the root, the index varint, and the
    /// data (the last `REAL_CHUNK` bytes; the content is a whole number of chunks).
    pub fn parse_chunk<'f>(&self, frame: &'f [u8]) -> Option<(u32, &'f [u8])> {
        const CHUNK_VARIANT: u8 = 12;
        if frame.len() < 34 + REAL_CHUNK as usize || frame[0] != CHUNK_VARIANT {
            return None;
        }
        if frame[1..33] != self.root()[..] {
            return None;
        }
        let mut index: u32 = 0;
        for (k, &b) in frame[33..].iter().take(5).enumerate() {
            index |= ((b & 0x7F) as u32) << (7 * k);
            if b & 0x80 == 0 {
                return Some((index, &frame[frame.len() - REAL_CHUNK as usize..]));
            }
        }
        None
    }
}

#[cfg(test)]
mod test {
    use super::*;
    use baton_protocol::merkle::verify_leaf;

    #[test]
    fn chunks_verify_and_parse() {
        let t = Truth::new(1, 37, 32 * 1024);
        assert_eq!(t.chunks(), 37);
        assert_eq!(t.virtual_size(), 37 * 32 * 1024);
        let mut buf = vec![0u8; 4096];
        for i in [0, 1, 17, 36] {
            let proof = t.proof(i);
            verify_leaf(t.root(), 37, i, &leaf_hash(t.chunk(i)), &proof).unwrap();
            let n = t.encode_chunk(i, &mut buf);
            let (idx, data) = t.parse_chunk(&buf[..n]).unwrap();
            assert_eq!(idx, i);
            assert_eq!(data, t.chunk(i));
            match Message::decode(&buf[..n]).unwrap() {
                Message::Chunk { index, data, .. } => {
                    assert_eq!(index, i);
                    assert_eq!(data, t.chunk(i));
                }
                other => panic!("not a chunk: {other:?}"),
            }
        }
        let req = Message::ChunkRequest {
            root: *t.root(),
            index: 3,
        };
        let n = req.encode(&mut buf).unwrap().len();
        assert!(t.parse_chunk(&buf[..n]).is_none());
    }

    #[test]
    fn same_seed_same_content() {
        assert_eq!(Truth::new(5, 8, 1).root(), Truth::new(5, 8, 1).root());
        assert_ne!(Truth::new(5, 8, 1).root(), Truth::new(6, 8, 1).root());
    }
}
