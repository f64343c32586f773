//! Throughput of the per-chunk work on the receive path.
//!
//! - `chunk_verify/<size>`: leaf hash + Merkle proof check of one chunk of a
//!   64 MiB content, for 4, 16 and 32 KiB chunks (the proof has 14, 12 and 11
//!   hashes). After the criterion runs, one pass over the whole content prints
//!   its MB/s.
//! - `session/encrypt_decrypt_32KiB`: ChaCha20-Poly1305 seal and open of a
//!   32 KiB frame through a real Noise transport pair.
//! - `receive_path/32KiB`: seal and open a frame, decode the `Chunk` message
//!   and verify it: the whole per-chunk cost of a link.
//!
//! Run: `cargo bench -p baton-protocol --features alloc --bench verify`.

#[cfg(feature = "alloc")]
mod benches {
    use std::hint::black_box;
    use std::time::{Duration, Instant};

    use baton_protocol::identity::Identity;
    use baton_protocol::merkle::{MerkleTree, Proof, leaf_hash, verify_leaf};
    use baton_protocol::session::{Handshake, Hello, MAX_HANDSHAKE_MSG, Role, TAG_LEN, Transport};
    use baton_protocol::{AgentId, Digest, Message};
    use criterion::{BenchmarkId, Criterion, Throughput};

    const CONTENT: usize = 64 * 1024 * 1024;
    const FRAME: usize = 32 * 1024;

    /// Pseudo-random content (splitmix64), the same on every run.
    fn content(len: usize) -> Vec<u8> {
        let mut state = 0x5eed_u64;
        let mut out = Vec::with_capacity(len);
        while out.len() < len {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
        }
        out.truncate(len);
        out
    }

    struct Tree {
        chunk: usize,
        root: Digest,
        leaves: u32,
        proofs: Vec<Proof>,
    }

    fn tree(data: &[u8], chunk: usize) -> Tree {
        let tree = MerkleTree::from_leaves(data.chunks(chunk).map(leaf_hash).collect());
        let proofs = (0..tree.leaves()).map(|i| tree.proof(i).unwrap()).collect();
        Tree {
            chunk,
            root: tree.root(),
            leaves: tree.leaves(),
            proofs,
        }
    }

    fn verify_chunk(t: &Tree, data: &[u8], i: u32) {
        let chunk = &data[i as usize * t.chunk..][..t.chunk];
        let leaf = leaf_hash(chunk);
        verify_leaf(&t.root, t.leaves, i, &leaf, &t.proofs[i as usize]).expect("genuine chunk");
    }

    fn transports() -> (Transport, Transport) {
        let agent = Identity::from_seed([2; 32]);
        let manager = Identity::from_seed([1; 32]);
        let id = |s: &str| AgentId::try_from(s).unwrap();
        let mut i = Handshake::initiator(
            &agent,
            [10; 32],
            &manager.public(),
            Hello::new(Role::Agent, id("edge-1"), 0, None),
        )
        .unwrap();
        let mut r = Handshake::responder(
            &manager,
            [11; 32],
            Hello::new(Role::Manager, id("m"), 0, None),
        )
        .unwrap();
        let mut buf = [0u8; MAX_HANDSHAKE_MSG];
        let n = i.write_message(&mut buf).unwrap();
        r.read_message(&buf[..n]).unwrap();
        let n = r.write_message(&mut buf).unwrap();
        i.read_message(&buf[..n]).unwrap();
        let n = i.write_message(&mut buf).unwrap();
        r.read_message(&buf[..n]).unwrap();
        (i.finish().unwrap(), r.finish().unwrap())
    }

    fn mb_per_s(bytes: usize, elapsed: Duration) -> f64 {
        bytes as f64 / 1e6 / elapsed.as_secs_f64()
    }

    pub fn all() {
        let mut c = Criterion::default()
            .warm_up_time(Duration::from_secs(1))
            .measurement_time(Duration::from_secs(3))
            .configure_from_args();
        let data = content(CONTENT);
        let trees: Vec<Tree> = [4096, 16 * 1024, 32 * 1024]
            .into_iter()
            .map(|chunk| tree(&data, chunk))
            .collect();

        let mut group = c.benchmark_group("chunk_verify");
        for t in &trees {
            group.throughput(Throughput::Bytes(t.chunk as u64));
            let mut i = 0;
            group.bench_function(
                BenchmarkId::from_parameter(format!("{}KiB", t.chunk / 1024)),
                |b| {
                    b.iter(|| {
                        verify_chunk(t, black_box(&data), i);
                        i = (i + 1) % t.leaves;
                    })
                },
            );
        }
        group.finish();

        let (mut sealer, mut opener) = transports();
        let mut group = c.benchmark_group("session");
        group.throughput(Throughput::Bytes(FRAME as u64));
        let mut frame = vec![0x42u8; FRAME + TAG_LEN];
        group.bench_function("encrypt_decrypt_32KiB", |b| {
            b.iter(|| {
                let n = sealer.encrypt(black_box(&mut frame), FRAME).unwrap();
                opener.decrypt(&mut frame, n).unwrap()
            })
        });
        group.finish();

        // Seal, open, decode and verify one 32 KiB chunk, as a link does per chunk.
        let t = &trees[2];
        let frames: Vec<Vec<u8>> = (0..64u32)
            .map(|i| {
                Message::Chunk {
                    root: t.root,
                    index: i,
                    proof: t.proofs[i as usize].clone(),
                    data: &data[i as usize * FRAME..][..FRAME],
                }
                .to_vec()
            })
            .collect();
        let mut group = c.benchmark_group("receive_path");
        group.throughput(Throughput::Bytes(FRAME as u64));
        let mut buf = vec![0u8; FRAME + 2048];
        let mut k = 0;
        group.bench_function("32KiB", |b| {
            b.iter(|| {
                let plain = &frames[k % frames.len()];
                k += 1;
                buf[..plain.len()].copy_from_slice(plain);
                let n = sealer.encrypt(&mut buf, plain.len()).unwrap();
                let n = opener.decrypt(&mut buf, n).unwrap();
                let Ok(Message::Chunk {
                    root,
                    index,
                    proof,
                    data,
                }) = Message::decode(&buf[..n])
                else {
                    panic!("a chunk");
                };
                verify_leaf(&root, t.leaves, index, &leaf_hash(data), &proof).unwrap();
            })
        });
        group.finish();

        // One pass over the whole 64 MiB content per chunk size.
        println!();
        for t in &trees {
            let start = Instant::now();
            for i in 0..t.leaves {
                verify_chunk(t, &data, i);
            }
            println!(
                "verify all of 64 MiB in {:>2} KiB chunks: {:>7.0} MB/s",
                t.chunk / 1024,
                mb_per_s(CONTENT, start.elapsed())
            );
        }
        let start = Instant::now();
        let rounds = 2048;
        for _ in 0..rounds {
            let n = sealer.encrypt(&mut frame, FRAME).unwrap();
            opener.decrypt(&mut frame, n).unwrap();
        }
        println!(
            "session encrypt+decrypt, 32 KiB frames:  {:>7.0} MB/s",
            mb_per_s(rounds * FRAME, start.elapsed())
        );
        c.final_summary();
    }
}

#[cfg(feature = "alloc")]
fn main() {
    benches::all();
}

#[cfg(not(feature = "alloc"))]
fn main() {
    eprintln!("the verify bench needs `--features alloc` (MerkleTree)");
}
