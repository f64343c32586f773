//! Property tests: codecs round-trip, decoders refuse bad input without
//! panicking, Merkle proofs verify exactly when they should, sessions refuse
//! any altered or reordered frame, and both framings survive garbage.
//!
//! Case counts are kept moderate so the file runs well under a minute in a
//! debug build; raise the `with_cases` counts locally when hunting.

#![cfg(feature = "alloc")]

use baton_protocol::discovery::{self, Announcement, DiscoveryError};
use baton_protocol::frame::{self, CobsReader, FrameError, StreamReader};
use baton_protocol::identity::{AgentCert, Identity};
use baton_protocol::merkle::{
    MAX_DEPTH, MerkleTree, Proof, RootBuilder, VerifyError, leaf_hash, proof_len, verify_leaf,
};
use baton_protocol::message::{
    CHUNK_OVERHEAD, CodecError, FailReason, Holding, MAX_HOLDINGS, MAX_MEMBERS_PER_PAGE,
    MAX_PUBLISHERS, MAX_RECEIVED_PER_PROGRESS, MAX_SOURCES_PER_MESSAGE, Received, Refusal, Report,
    SegmentMember, SegmentReport, Source, SourceRange, Trouble,
};
use baton_protocol::session::{
    Handshake, Hello, MAX_HANDSHAKE_MSG, MAX_TOKEN_LEN, Role, SessionError, TAG_LEN, Transport,
};
use baton_protocol::types::{
    MAX_DELAYS, MAX_ID_LEN, MAX_LABEL_KEY, MAX_LABEL_VALUE, MAX_LABELS, MAX_NAME_LEN,
};
use baton_protocol::{
    AgentId, Delay, DelayTo, Digest, JobRef, KeyId, Label, LinkInfo, MAX_FRAME, MAX_PLAINTEXT,
    Manifest, Message, PeerAddr, PublicKey, manifest::MAX_CONTENT_NAME,
};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::Index;

// ---------------------------------------------------------------------------
// Strategies.

/// A string of at most `N` UTF-8 bytes, mostly ASCII with some multi-byte
/// characters, often filled up to the limit.
fn bounded_string<const N: usize>() -> impl Strategy<Value = heapless::String<N>> {
    let ch = prop_oneof![
        6 => proptest::char::range('a', 'z'),
        1 => Just('-'),
        2 => any::<char>(),
    ];
    vec(ch, 0..=N).prop_map(|chars| {
        let mut s = heapless::String::new();
        for c in chars {
            if s.push(c).is_err() {
                break;
            }
        }
        s
    })
}

/// A bounded list of up to `N` items.
fn bounded_vec<T: core::fmt::Debug, const N: usize>(
    item: impl Strategy<Value = T>,
) -> impl Strategy<Value = heapless::Vec<T, N>> {
    vec(item, 0..=N).prop_map(|items| items.into_iter().collect())
}

fn agent_id() -> impl Strategy<Value = AgentId> {
    bounded_string::<MAX_ID_LEN>()
}

fn job() -> impl Strategy<Value = JobRef> {
    (any::<u64>(), any::<u32>()).prop_map(|(id, epoch)| JobRef { id, epoch })
}

fn key() -> impl Strategy<Value = PublicKey> {
    any::<[u8; 32]>().prop_map(PublicKey)
}

fn sig() -> impl Strategy<Value = [u8; 64]> {
    (any::<[u8; 32]>(), any::<[u8; 32]>()).prop_map(|(a, b)| {
        let mut s = [0; 64];
        s[..32].copy_from_slice(&a);
        s[32..].copy_from_slice(&b);
        s
    })
}

fn peer_addr() -> impl Strategy<Value = PeerAddr> {
    prop_oneof![
        (any::<[u8; 4]>(), any::<u16>()).prop_map(|(ip, p)| PeerAddr::V4(ip, p)),
        (any::<[u8; 16]>(), any::<u16>()).prop_map(|(ip, p)| PeerAddr::V6(ip, p)),
    ]
}

fn source_range() -> impl Strategy<Value = SourceRange> {
    let source = prop_oneof![
        Just(Source::Manager),
        (agent_id(), peer_addr(), key()).prop_map(|(id, addr, key)| Source::Peer { id, addr, key }),
    ];
    (source, any::<u32>(), any::<u32>()).prop_map(|(source, first, end)| SourceRange {
        source,
        first,
        end,
    })
}

fn cert() -> impl Strategy<Value = AgentCert> {
    (
        agent_id(),
        key(),
        bounded_string::<MAX_NAME_LEN>(),
        any::<u32>(),
        any::<(u64, u64)>(),
        sig(),
    )
        .prop_map(
            |(id, key, segment, score, (serial, not_after), signature)| AgentCert {
                id,
                key,
                segment,
                score,
                serial,
                not_after,
                signature,
            },
        )
}

fn manifest() -> impl Strategy<Value = Manifest> {
    (
        bounded_string::<MAX_CONTENT_NAME>(),
        any::<(u64, u64, u64, u32)>(),
        any::<[u8; 32]>(),
        any::<[u8; 8]>(),
        sig(),
    )
        .prop_map(
            |(name, (version, expires, length, chunk_size), root, signer, signature)| Manifest {
                name,
                version,
                expires,
                length,
                chunk_size,
                root,
                signer: KeyId(signer),
                signature,
            },
        )
}

fn delay() -> impl Strategy<Value = Delay> {
    (
        prop_oneof![Just(DelayTo::Manager), agent_id().prop_map(DelayTo::Peer)],
        any::<u32>(),
    )
        .prop_map(|(to, rtt_us)| Delay { to, rtt_us })
}

fn link_info() -> impl Strategy<Value = LinkInfo> {
    any::<(u64, u64, u32, u64)>().prop_map(|(up_bps, down_bps, loss_ppm, uptime_s)| LinkInfo {
        up_bps,
        down_bps,
        loss_ppm,
        uptime_s,
    })
}

fn segment_member() -> impl Strategy<Value = SegmentMember> {
    (
        agent_id(),
        any::<(u32, u32, u64, bool, u32)>(),
        proptest::option::of(peer_addr()),
        link_info(),
        bounded_vec::<_, MAX_DELAYS>(delay()),
    )
        .prop_map(
            |(
                id,
                (score, performance, free_storage, can_serve, last_heard_ms),
                listen,
                link,
                delays,
            )| {
                SegmentMember {
                    id,
                    score,
                    listen,
                    performance,
                    free_storage,
                    can_serve,
                    link,
                    delays,
                    last_heard_ms,
                }
            },
        )
}

fn segment_report() -> impl Strategy<Value = SegmentReport> {
    (
        bounded_string::<MAX_NAME_LEN>(),
        agent_id(),
        any::<(u32, u16, u16)>(),
        bounded_vec::<_, MAX_MEMBERS_PER_PAGE>(segment_member()),
    )
        .prop_map(
            |(segment, leader, (term, page, pages), members)| SegmentReport {
                segment,
                leader,
                term,
                page,
                pages,
                members,
            },
        )
}

fn announcement() -> impl Strategy<Value = Announcement> {
    prop_oneof![
        (
            bounded_string::<MAX_NAME_LEN>(),
            any::<u32>(),
            proptest::option::of(peer_addr()),
            proptest::option::of(agent_id()),
        )
            .prop_map(|(segment, score, listen, leader)| Announcement::Beacon {
                segment,
                score,
                listen,
                leader
            }),
        any::<u64>().prop_map(|nonce| Announcement::Probe { nonce }),
        any::<u64>().prop_map(|nonce| Announcement::Echo { nonce }),
        segment_member().prop_map(Announcement::Member),
    ]
}

fn report() -> impl Strategy<Value = Report> {
    let delay = delay();
    let label = (
        bounded_string::<MAX_LABEL_KEY>(),
        bounded_string::<MAX_LABEL_VALUE>(),
    )
        .prop_map(|(key, value)| Label { key, value });
    let holding =
        (any::<[u8; 32]>(), any::<u32>(), any::<bool>()).prop_map(|(root, verified, complete)| {
            Holding {
                root,
                verified,
                complete,
            }
        });
    let link = link_info();
    (
        (
            agent_id(),
            proptest::option::of(peer_addr()),
            bounded_string::<MAX_NAME_LEN>(),
            bounded_string::<MAX_NAME_LEN>(),
        ),
        any::<(u32, u64, bool, u32, u16, u16)>(),
        link,
        bounded_vec::<_, MAX_DELAYS>(delay),
        bounded_vec::<_, MAX_LABELS>(label),
        bounded_vec::<_, MAX_HOLDINGS>(holding),
    )
        .prop_map(
            |(
                (id, listen, site, segment),
                (performance, free_storage, can_serve, max_chunk, max_sources, max_peers),
                link,
                delays,
                labels,
                holdings,
            )| Report {
                id,
                listen,
                site,
                segment,
                performance,
                free_storage,
                can_serve,
                max_chunk,
                max_sources,
                max_peers,
                link,
                delays,
                labels,
                holdings,
            },
        )
}

fn hello() -> impl Strategy<Value = Hello> {
    (
        any::<(u16, u32, bool)>(),
        agent_id(),
        proptest::option::of(cert()),
        proptest::option::of(bounded_string::<MAX_TOKEN_LEN>()),
    )
        .prop_map(|((version, caps, agent), id, cert, token)| Hello {
            version,
            caps,
            role: if agent { Role::Agent } else { Role::Manager },
            id,
            cert,
            token,
        })
}

fn proof() -> impl Strategy<Value = Proof> {
    bounded_vec::<_, MAX_DEPTH>(any::<[u8; 32]>())
}

/// A message whose chunk data (if any) is held beside it, so the strategy can own it.
#[derive(Clone, Debug)]
struct Sample {
    /// The message; a `Chunk` has empty data here, see [`Sample::msg`].
    template: Message<'static>,
    data: Vec<u8>,
}

impl Sample {
    fn msg(&self) -> Message<'_> {
        match self.template.clone() {
            Message::Chunk {
                root, index, proof, ..
            } => Message::Chunk {
                root,
                index,
                proof,
                data: &self.data,
            },
            other => other,
        }
    }
}

/// Every message variant, with chunk data of up to 32 KiB.
fn sample() -> impl Strategy<Value = Sample> {
    let plain = |s: BoxedStrategy<Message<'static>>| {
        s.prop_map(|template| Sample {
            template,
            data: Vec::new(),
        })
    };
    let fail = prop_oneof![
        Just(FailReason::StorageFull),
        Just(FailReason::StorageError),
        Just(FailReason::BadManifest),
        Just(FailReason::BadSignature),
        Just(FailReason::Expired),
        Just(FailReason::Downgrade),
        Just(FailReason::Busy),
        Just(FailReason::NoSource),
        Just(FailReason::ChunkTooLarge),
        Just(FailReason::NotListed),
        Just(FailReason::VersionReused),
        Just(FailReason::NoTrust),
    ];
    let trouble = prop_oneof![
        any::<u32>().prop_map(|index| Trouble::BadChunk { index }),
        Just(Trouble::Unreachable),
        Just(Trouble::Refused),
    ];
    let refusal = prop_oneof![
        Just(Refusal::NotYet),
        Just(Refusal::Busy),
        Just(Refusal::Unknown)
    ];
    let received = (proptest::option::of(agent_id()), any::<u64>())
        .prop_map(|(from, bytes)| Received { from, bytes });
    let sources = || bounded_vec::<_, MAX_SOURCES_PER_MESSAGE>(source_range());
    let chunk = (
        any::<[u8; 32]>(),
        any::<u32>(),
        proof(),
        prop_oneof![
            vec(any::<u8>(), 0..=64),
            vec(any::<u8>(), 0..=32 * 1024),
            Just(vec![0x5a; 32 * 1024]),
        ],
    )
        .prop_map(|(root, index, proof, data)| Sample {
            template: Message::Chunk {
                root,
                index,
                proof,
                data: &[],
            },
            data,
        });
    prop_oneof![
        plain(report().prop_map(Message::Report).boxed()),
        plain(
            (
                job(),
                any::<u32>(),
                bounded_vec::<_, MAX_RECEIVED_PER_PROGRESS>(received)
            )
                .prop_map(|(job, verified, received)| Message::Progress {
                    job,
                    verified,
                    received
                })
                .boxed()
        ),
        plain(
            (job(), any::<[u8; 32]>())
                .prop_map(|(job, root)| Message::Have { job, root })
                .boxed()
        ),
        plain(
            (job(), fail)
                .prop_map(|(job, reason)| Message::Failed { job, reason })
                .boxed()
        ),
        plain(job().prop_map(|job| Message::NextPlease { job }).boxed()),
        plain(
            (job(), agent_id(), trouble)
                .prop_map(|(job, peer, trouble)| Message::PeerTrouble { job, peer, trouble })
                .boxed()
        ),
        plain(
            (
                cert(),
                any::<u64>(),
                bounded_vec::<_, MAX_PUBLISHERS>(key())
            )
                .prop_map(|(cert, unix_time, publishers)| Message::Welcome {
                    cert,
                    unix_time,
                    publishers
                })
                .boxed()
        ),
        plain(
            (
                job(),
                manifest(),
                sources(),
                proptest::option::of(agent_id())
            )
                .prop_map(|(job, manifest, sources, next)| Message::Fetch {
                    job,
                    manifest,
                    sources,
                    next
                })
                .boxed()
        ),
        plain(
            (job(), sources())
                .prop_map(|(job, sources)| Message::Sources { job, sources })
                .boxed()
        ),
        plain(job().prop_map(|job| Message::Done { job }).boxed()),
        plain(job().prop_map(|job| Message::Cancel { job }).boxed()),
        plain(
            (any::<[u8; 32]>(), any::<u32>())
                .prop_map(|(root, index)| Message::ChunkRequest { root, index })
                .boxed()
        ),
        chunk,
        plain(
            (any::<[u8; 32]>(), any::<u32>(), refusal)
                .prop_map(|(root, index, reason)| Message::Refuse {
                    root,
                    index,
                    reason
                })
                .boxed()
        ),
        plain(
            any::<u64>()
                .prop_map(|nonce| Message::Ping { nonce })
                .boxed()
        ),
        plain(
            any::<u64>()
                .prop_map(|nonce| Message::Pong { nonce })
                .boxed()
        ),
        plain(segment_report().prop_map(Message::SegmentReport).boxed()),
        plain(
            (job(), any::<u64>())
                .prop_map(|(job, max_bytes_per_second)| Message::Throttle {
                    job,
                    max_bytes_per_second
                })
                .boxed()
        ),
        plain(
            prop_oneof![
                Just(""),
                Just("agent \"edge-1\" offered a revoked enrolment token"),
                Just("ünïcode ✓"),
            ]
            .prop_map(|reason| Message::NotAccepted { reason })
            .boxed()
        ),
        plain(
            prop_oneof![
                Just(&[][..]),
                Just(&[1u8, 2, 3][..]),
                Just(&[0xff; 300][..])
            ]
            .prop_map(|document| Message::Trust { document })
            .boxed()
        ),
        plain(
            prop_oneof![Just(&[][..]), Just(&[7u8; 80][..])]
                .prop_map(|list| Message::Revocations { list })
                .boxed()
        ),
        plain(
            cert()
                .prop_map(|cert| Message::CertRenewed { cert })
                .boxed()
        ),
    ]
}

/// Decodes `bytes`; if that succeeds, the value must survive a re-encoding.
/// (The re-encoding may be shorter: postcard accepts non-minimal varints.)
fn decode_is_consistent(bytes: &[u8]) -> Result<(), TestCaseError> {
    if let Ok(msg) = Message::decode(bytes) {
        let again = msg.to_vec();
        prop_assert!(again.len() <= bytes.len());
        prop_assert_eq!(Message::decode(&again), Ok(msg));
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Message codec.

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn every_message_round_trips(s in sample()) {
        let msg = s.msg();
        let mut buf = vec![0u8; MAX_PLAINTEXT];
        // Every message fits one frame's plaintext.
        let encoded = msg.encode(&mut buf).expect("fits one frame").to_vec();
        prop_assert_eq!(&encoded, &msg.to_vec());
        prop_assert_eq!(Message::decode(&encoded), Ok(msg.clone()));
        if let Message::Chunk { data, .. } = &msg {
            prop_assert!(encoded.len() <= CHUNK_OVERHEAD + data.len());
        }
        // One byte too few for the buffer is refused, not truncated.
        let mut small = vec![0u8; encoded.len() - 1];
        prop_assert_eq!(msg.encode(&mut small), Err(CodecError::BufferFull));
    }

    #[test]
    fn trailing_bytes_are_refused(s in sample(), extra in vec(any::<u8>(), 1..16)) {
        let mut bytes = s.msg().to_vec();
        bytes.extend_from_slice(&extra);
        prop_assert_eq!(Message::decode(&bytes), Err(CodecError::TrailingBytes));
    }

    #[test]
    fn truncated_messages_are_refused(s in sample(), cut in any::<Index>()) {
        let bytes = s.msg().to_vec();
        let cut = cut.index(bytes.len());
        prop_assert_eq!(Message::decode(&bytes[..cut]), Err(CodecError::Malformed));
    }

    #[test]
    fn mutated_messages_never_panic(
        s in sample(),
        edits in vec((any::<Index>(), any::<u8>()), 1..6),
    ) {
        let mut bytes = s.msg().to_vec();
        for (at, value) in edits {
            let at = at.index(bytes.len());
            bytes[at] = value;
        }
        decode_is_consistent(&bytes)?;
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in vec(any::<u8>(), 0..2048)) {
        decode_is_consistent(&bytes)?;
    }

    #[test]
    fn hello_round_trips(h in hello()) {
        let mut buf = [0u8; 512];
        let encoded = postcard::to_slice(&h, &mut buf).expect("a hello fits 512 bytes");
        prop_assert_eq!(postcard::from_bytes::<Hello>(encoded), Ok(h));
    }
}

// ---------------------------------------------------------------------------
// Discovery datagrams.

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Any announcement seals into one datagram that opens to the same sender, seq and body
    /// under the manager's key, and under no other.
    #[test]
    fn datagrams_round_trip(
        body in announcement(),
        seq in any::<u64>(),
        time_ms in any::<u64>(),
        name in agent_id(),
        segment in agent_id(),
        score in any::<u32>(),
    ) {
        let manager = Identity::from_seed([1; 32]);
        let agent = Identity::from_seed([2; 32]);
        let segment = heapless::String::try_from(segment.as_str()).unwrap();
        let cert = AgentCert::issue_certified(&manager, name, agent.public(), segment, score);
        let mut buf = [0u8; discovery::MAX_DATAGRAM];
        let n = discovery::seal(&agent, &cert, seq, time_ms, &body, &mut buf)
            .expect("fits a datagram");
        let dg = discovery::open(&buf[..n], &manager.public()).expect("opens");
        prop_assert_eq!(dg.sender, cert);
        prop_assert_eq!(dg.seq, seq);
        prop_assert_eq!(dg.time_ms, time_ms);
        prop_assert_eq!(dg.body, body);
        prop_assert_eq!(
            discovery::open(&buf[..n], &Identity::from_seed([9; 32]).public()),
            Err(DiscoveryError::BadCert)
        );
    }

    /// Changing any byte of a datagram makes it refused (never opened as something else).
    #[test]
    fn altered_datagrams_are_refused(
        body in announcement(),
        at in any::<Index>(),
        flip in 1u8..=255,
    ) {
        let manager = Identity::from_seed([1; 32]);
        let agent = Identity::from_seed([2; 32]);
        let cert = AgentCert::issue(&manager, AgentId::try_from("edge-1").unwrap(), agent.public());
        let mut buf = [0u8; discovery::MAX_DATAGRAM];
        let n = discovery::seal(&agent, &cert, 1, 1, &body, &mut buf).unwrap();
        let at = at.index(n);
        buf[at] ^= flip;
        prop_assert!(discovery::open(&buf[..n], &manager.public()).is_err());
    }

    /// Arbitrary bytes never panic the datagram decoder.
    #[test]
    fn arbitrary_datagrams_never_panic(bytes in vec(any::<u8>(), 0..1500)) {
        let manager = Identity::from_seed([1; 32]);
        let _ = discovery::open(&bytes, &manager.public());
    }
}

#[test]
fn over_limit_lists_and_strings_are_refused() {
    // Progress with 17 `received` entries: one over the limit.
    let mut bytes = vec![1, 0, 0, 0, 17];
    for _ in 0..17 {
        bytes.extend_from_slice(&[0, 1]);
    }
    assert_eq!(Message::decode(&bytes), Err(CodecError::Malformed));
    bytes[4] = 16;
    bytes.truncate(bytes.len() - 2);
    assert!(Message::decode(&bytes).is_ok());
    // PeerTrouble with a 33-byte peer id.
    let mut bytes = vec![5, 0, 0, 33];
    bytes.extend_from_slice(&[b'a'; 33]);
    bytes.push(1);
    assert_eq!(Message::decode(&bytes), Err(CodecError::Malformed));
    // The same with invalid UTF-8 in a 32-byte id.
    let mut bytes = vec![5, 0, 0, 32];
    bytes.extend_from_slice(&[0xff; 32]);
    bytes.push(1);
    assert_eq!(Message::decode(&bytes), Err(CodecError::Malformed));
    // A proof of 33 hashes.
    let mut bytes = vec![12];
    bytes.extend_from_slice(&[0; 32]);
    bytes.extend_from_slice(&[0, 33]);
    bytes.extend_from_slice(&[0; 33 * 32]);
    bytes.push(0);
    assert_eq!(Message::decode(&bytes), Err(CodecError::Malformed));
    // A bool or option byte other than 0/1 (Holding.complete = 2).
    // Variant 0 and sixteen zero/empty fields, then one holding.
    let mut bytes = vec![0u8; 17];
    bytes.push(1);
    bytes.extend_from_slice(&[0; 32]);
    bytes.extend_from_slice(&[0, 2]);
    assert_eq!(Message::decode(&bytes), Err(CodecError::Malformed));
    let last = bytes.len() - 1;
    bytes[last] = 1;
    assert!(Message::decode(&bytes).is_ok());
}

// ---------------------------------------------------------------------------
// Merkle proofs.

/// `len` pseudo-random bytes from `seed` (splitmix64): chunks of 16 bytes or
/// more are all distinct, so no two subtrees share a hash.
fn content(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed;
    let mut out = Vec::with_capacity(len + 8);
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

/// The sides (0 = left, 1 = right) leaf `index` takes at each level where it
/// has a sibling: two positions with the same sides hash their proofs alike.
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

struct Content {
    data: Vec<u8>,
    chunk: usize,
    tree: MerkleTree,
}

impl Content {
    fn new(len: usize, chunk: usize, seed: u64) -> Self {
        let data = content(len, seed);
        let tree = MerkleTree::from_leaves(data.chunks(chunk).map(leaf_hash).collect());
        Content { data, chunk, tree }
    }

    fn chunk(&self, i: u32) -> &[u8] {
        self.data.chunks(self.chunk).nth(i as usize).unwrap()
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn every_chunk_proof_verifies(
        len in 1usize..=96 * 1024,
        chunk in 16usize..=4096,
        seed in any::<u64>(),
    ) {
        let c = Content::new(len, chunk, seed);
        let n = c.tree.leaves();
        prop_assert_eq!(n as usize, len.div_ceil(chunk));
        let root = c.tree.root();
        let mut builder = RootBuilder::new();
        for (i, data) in c.data.chunks(chunk).enumerate() {
            let i = i as u32;
            let leaf = leaf_hash(data);
            prop_assert_eq!(c.tree.leaf(i), Some(&leaf));
            builder.push(leaf);
            let proof = c.tree.proof(i).unwrap();
            prop_assert_eq!(proof.len(), proof_len(i, n));
            prop_assert_eq!(verify_leaf(&root, n, i, &leaf, &proof), Ok(()));
        }
        prop_assert_eq!(builder.leaves(), n as u64);
        prop_assert_eq!(builder.finish(), Some(root));
        prop_assert!(c.tree.proof(n).is_none());
        prop_assert!(c.tree.leaf(n).is_none());
    }

    #[test]
    fn a_flipped_data_or_proof_bit_fails(
        len in 1usize..=64 * 1024,
        chunk in 16usize..=4096,
        seed in any::<u64>(),
        pick in any::<Index>(),
        bit in any::<Index>(),
    ) {
        let c = Content::new(len, chunk, seed);
        let (n, root) = (c.tree.leaves(), c.tree.root());
        let i = pick.index(n as usize) as u32;
        let proof = c.tree.proof(i).unwrap();

        let mut data = c.chunk(i).to_vec();
        let b = bit.index(data.len() * 8);
        data[b / 8] ^= 1 << (b % 8);
        prop_assert_eq!(
            verify_leaf(&root, n, i, &leaf_hash(&data), &proof),
            Err(VerifyError::RootMismatch)
        );

        if !proof.is_empty() {
            let mut bad = proof.clone();
            let b = bit.index(bad.len() * 256);
            bad[b / 256][(b % 256) / 8] ^= 1 << (b % 8);
            prop_assert_eq!(
                verify_leaf(&root, n, i, &leaf_hash(c.chunk(i)), &bad),
                Err(VerifyError::RootMismatch)
            );
        }
    }

    #[test]
    fn a_flipped_index_bit_fails(
        len in 1usize..=64 * 1024,
        chunk in 16usize..=4096,
        seed in any::<u64>(),
        pick in any::<Index>(),
        bit in 0u32..32,
    ) {
        let c = Content::new(len, chunk, seed);
        let (n, root) = (c.tree.leaves(), c.tree.root());
        let i = pick.index(n as usize) as u32;
        let leaf = leaf_hash(c.chunk(i));
        let proof = c.tree.proof(i).unwrap();
        let other = i ^ (1 << bit);
        let result = verify_leaf(&root, n, other, &leaf, &proof);
        if other >= n {
            prop_assert_eq!(result, Err(VerifyError::IndexOutOfRange));
        } else if proof_len(other, n) != proof.len() {
            prop_assert_eq!(result, Err(VerifyError::ProofLength));
        } else {
            prop_assert_eq!(result, Err(VerifyError::RootMismatch));
        }
    }

    /// The proof does not commit to the leaf count (the signed manifest's
    /// length does): a wrong count is refused unless it gives the leaf exactly
    /// the same path, in which case the same hashes are computed.
    #[test]
    fn a_flipped_leaf_count_bit_fails_unless_the_path_is_the_same(
        len in 1usize..=64 * 1024,
        chunk in 16usize..=4096,
        seed in any::<u64>(),
        pick in any::<Index>(),
        bit in 0u32..32,
    ) {
        let c = Content::new(len, chunk, seed);
        let (n, root) = (c.tree.leaves(), c.tree.root());
        let i = pick.index(n as usize) as u32;
        let leaf = leaf_hash(c.chunk(i));
        let proof = c.tree.proof(i).unwrap();
        let count = n ^ (1 << bit);
        let result = verify_leaf(&root, count, i, &leaf, &proof);
        if i >= count {
            prop_assert_eq!(result, Err(VerifyError::IndexOutOfRange));
        } else if path_sides(i, count) == path_sides(i, n) {
            prop_assert_eq!(result, Ok(()));
        } else if proof_len(i, count) != proof.len() {
            prop_assert_eq!(result, Err(VerifyError::ProofLength));
        } else {
            prop_assert_eq!(result, Err(VerifyError::RootMismatch));
        }
    }

    #[test]
    fn large_trees_of_random_leaves(
        n in 1u32..=100_000,
        seed in any::<u64>(),
        picks in vec(any::<Index>(), 1..8),
    ) {
        let bytes = content(n as usize * 32, seed);
        let leaves: Vec<Digest> = bytes
            .chunks(32)
            .map(|c| c.try_into().unwrap())
            .collect();
        let tree = MerkleTree::from_leaves(leaves.clone());
        let mut builder = RootBuilder::new();
        for leaf in &leaves {
            builder.push(*leaf);
        }
        prop_assert_eq!(builder.finish(), Some(tree.root()));
        for pick in picks {
            let i = pick.index(n as usize) as u32;
            let proof = tree.proof(i).unwrap();
            prop_assert_eq!(verify_leaf(&tree.root(), n, i, &leaves[i as usize], &proof), Ok(()));
        }
    }

    #[test]
    fn proof_length_is_bounded(index in any::<u32>(), leaves in 1u32..=u32::MAX) {
        let len = proof_len(index % leaves, leaves);
        prop_assert!(len <= MAX_DEPTH);
        // The leftmost leaf has a sibling at every level: ⌈log2 n⌉ of them.
        let depth = (32 - (leaves - 1).leading_zeros()) as usize;
        prop_assert_eq!(proof_len(0, leaves), depth);
    }
}

#[test]
fn empty_and_degenerate_trees() {
    assert_eq!(RootBuilder::new().finish(), None);
    let leaf = leaf_hash(b"only");
    let tree = MerkleTree::from_leaves(vec![leaf]);
    assert_eq!(tree.root(), leaf);
    assert_eq!(verify_leaf(&leaf, 1, 0, &leaf, &[]), Ok(()));
    assert_eq!(
        verify_leaf(&leaf, 0, 0, &leaf, &[]),
        Err(VerifyError::IndexOutOfRange)
    );
    assert_eq!(
        verify_leaf(&leaf, 1, 0, &leaf, &[leaf]),
        Err(VerifyError::ProofLength)
    );
}

// ---------------------------------------------------------------------------
// Sessions.

fn hello_of(role: Role, id: &str) -> Hello {
    Hello::new(role, AgentId::try_from(id).unwrap(), 0, None)
}

/// Runs a handshake between fixed identities with the given ephemeral keys.
fn establish(ei: [u8; 32], er: [u8; 32]) -> (Transport, Transport) {
    let agent = Identity::from_seed([2; 32]);
    let manager = Identity::from_seed([1; 32]);
    let mut i = Handshake::initiator(
        &agent,
        ei,
        &manager.public(),
        hello_of(Role::Agent, "edge-1"),
    )
    .unwrap();
    let mut r = Handshake::responder(&manager, er, hello_of(Role::Manager, "mgr")).unwrap();
    let mut buf = [0u8; MAX_HANDSHAKE_MSG];
    let n = i.write_message(&mut buf).unwrap();
    r.read_message(&buf[..n]).unwrap();
    let n = r.write_message(&mut buf).unwrap();
    i.read_message(&buf[..n]).unwrap();
    let n = i.write_message(&mut buf).unwrap();
    r.read_message(&buf[..n]).unwrap();
    (i.finish().unwrap(), r.finish().unwrap())
}

/// Encrypts each plaintext with `t`, returning the ciphertexts in order.
fn seal_all(t: &mut Transport, plaintexts: &[Vec<u8>]) -> Vec<Vec<u8>> {
    plaintexts
        .iter()
        .map(|p| {
            let mut buf = p.clone();
            buf.resize(p.len() + TAG_LEN, 0);
            let n = t.encrypt(&mut buf, p.len()).unwrap();
            assert_eq!(n, p.len() + TAG_LEN);
            buf
        })
        .collect()
}

/// Decrypts one frame, returning the plaintext.
fn open(t: &mut Transport, frame: &[u8]) -> Result<Vec<u8>, SessionError> {
    let mut buf = frame.to_vec();
    let n = t.decrypt(&mut buf, frame.len())?;
    buf.truncate(n);
    Ok(buf)
}

fn plaintexts() -> impl Strategy<Value = Vec<Vec<u8>>> {
    vec(vec(any::<u8>(), 0..1500), 1..8)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn frames_pass_in_order_both_ways(
        ei in any::<[u8; 32]>(),
        er in any::<[u8; 32]>(),
        msgs in plaintexts(),
    ) {
        let (mut i, mut r) = establish(ei, er);
        for (frame, plain) in seal_all(&mut i, &msgs).iter().zip(&msgs) {
            prop_assert_eq!(&open(&mut r, frame)?, plain);
        }
        for (frame, plain) in seal_all(&mut r, &msgs).iter().zip(&msgs) {
            prop_assert_eq!(&open(&mut i, frame)?, plain);
        }
    }

    #[test]
    fn a_corrupted_frame_is_refused(
        ei in any::<[u8; 32]>(),
        msgs in plaintexts(),
        which in any::<Index>(),
        bit in any::<Index>(),
        truncate in any::<bool>(),
    ) {
        let (mut i, mut r) = establish(ei, [11; 32]);
        let mut frames = seal_all(&mut i, &msgs);
        let j = which.index(frames.len());
        if truncate {
            let keep = bit.index(frames[j].len());
            frames[j].truncate(keep);
        } else {
            let b = bit.index(frames[j].len() * 8);
            frames[j][b / 8] ^= 1 << (b % 8);
        }
        for (k, frame) in frames.iter().enumerate() {
            let result = open(&mut r, frame);
            if k < j {
                prop_assert_eq!(&result?, &msgs[k]);
            } else {
                prop_assert_eq!(result, Err(SessionError::BadFrame));
                break;
            }
        }
    }

    #[test]
    fn reordered_dropped_or_replayed_frames_are_refused(
        ei in any::<[u8; 32]>(),
        msgs in vec(vec(any::<u8>(), 0..64), 2..8),
        order in any::<u64>(),
        how in 0u8..3,
    ) {
        let (mut i, mut r) = establish(ei, [11; 32]);
        let frames = seal_all(&mut i, &msgs);
        let n = frames.len();
        // A delivery order that is not 0, 1, 2, …
        let mut delivery: Vec<usize> = (0..n).collect();
        match how {
            0 => {
                // A rotation of a suffix: some frame comes early.
                let at = (order as usize) % (n - 1);
                delivery[at..].rotate_left(1);
            }
            1 => {
                // A frame is dropped.
                delivery.remove((order as usize) % (n - 1));
            }
            _ => {
                // A frame is delivered twice.
                let at = (order as usize) % n;
                delivery.insert(at + 1, at);
            }
        }
        let first_bad = delivery
            .iter()
            .enumerate()
            .position(|(pos, &k)| pos != k)
            .expect("the order differs somewhere");
        for (pos, &k) in delivery.iter().enumerate() {
            let result = open(&mut r, &frames[k]);
            if pos < first_bad {
                prop_assert_eq!(&result?, &msgs[k]);
            } else {
                prop_assert_eq!(result, Err(SessionError::BadFrame));
                break;
            }
        }
    }

    #[test]
    fn a_frame_from_another_session_is_refused(
        e1 in any::<[u8; 32]>(),
        e2 in any::<[u8; 32]>(),
        msg in vec(any::<u8>(), 0..256),
    ) {
        prop_assume!(e1 != e2);
        let (mut i1, _) = establish(e1, [11; 32]);
        let (_, mut r2) = establish(e2, [11; 32]);
        let frame = &seal_all(&mut i1, core::slice::from_ref(&msg))[0];
        prop_assert_eq!(open(&mut r2, frame), Err(SessionError::BadFrame));
    }

    /// Flipping any bit of any handshake message makes the handshake fail.
    #[test]
    fn a_corrupted_handshake_message_fails(
        which in 0usize..3,
        bit in any::<Index>(),
        ei in any::<[u8; 32]>(),
    ) {
        let agent = Identity::from_seed([2; 32]);
        let manager = Identity::from_seed([1; 32]);
        let mut i = Handshake::initiator(&agent, ei, &manager.public(), hello_of(Role::Agent, "a"))
            .unwrap();
        let mut r = Handshake::responder(&manager, [11; 32], hello_of(Role::Manager, "m")).unwrap();
        let mut outcome = Ok(());
        let mut buf = [0u8; MAX_HANDSHAKE_MSG];
        for step in 0..3 {
            let (writer, reader) = if step == 1 { (&mut r, &mut i) } else { (&mut i, &mut r) };
            let n = match writer.write_message(&mut buf) {
                Ok(n) => n,
                Err(e) => {
                    outcome = Err(e);
                    break;
                }
            };
            if step == which {
                let b = bit.index(n * 8);
                buf[b / 8] ^= 1 << (b % 8);
            }
            outcome = reader.read_message(&buf[..n]);
            if outcome.is_err() {
                break;
            }
        }
        prop_assert!(outcome.is_err(), "handshake completed despite a flipped bit in message {}", which + 1);
    }

    /// A responder fed arbitrary message 1 and message 3 bytes never panics.
    #[test]
    fn responder_survives_arbitrary_handshake_input(
        m1 in vec(any::<u8>(), 0..200),
        m3 in vec(any::<u8>(), 0..400),
    ) {
        let manager = Identity::from_seed([1; 32]);
        let mut r = Handshake::responder(&manager, [11; 32], hello_of(Role::Manager, "m")).unwrap();
        let mut buf = [0u8; MAX_HANDSHAKE_MSG];
        let first = r.read_message(&m1);
        prop_assert_eq!(first.is_ok(), m1.len() == 32, "message 1 is exactly an ephemeral key");
        if first.is_ok() && r.write_message(&mut buf).is_ok() {
            prop_assert!(r.read_message(&m3).is_err());
            prop_assert!(r.finish().is_err());
        }
    }
}

#[test]
fn oversized_plaintext_and_short_frames_are_refused() {
    let (mut i, mut r) = establish([10; 32], [11; 32]);
    let mut buf = vec![0u8; MAX_FRAME + 1];
    assert_eq!(
        i.encrypt(&mut buf, MAX_PLAINTEXT + 1),
        Err(SessionError::Size)
    );
    assert_eq!(i.encrypt(&mut buf, MAX_PLAINTEXT), Ok(MAX_FRAME));
    assert_eq!(r.decrypt(&mut buf, MAX_FRAME), Ok(MAX_PLAINTEXT));
    assert_eq!(r.decrypt(&mut buf, MAX_FRAME + 1), Err(SessionError::Size));
    // A buffer without room for the tag.
    let mut small = [0u8; 20];
    assert_eq!(i.encrypt(&mut small, 5), Err(SessionError::Size));
    assert_eq!(
        r.decrypt(&mut small, TAG_LEN - 1),
        Err(SessionError::BadFrame)
    );
}

// ---------------------------------------------------------------------------
// Framing.

/// Cuts `wire` at the given points (sorted, deduplicated) into pieces.
fn pieces<'w>(wire: &'w [u8], cuts: &[Index]) -> Vec<&'w [u8]> {
    let mut at: Vec<usize> = cuts.iter().map(|c| c.index(wire.len() + 1)).collect();
    at.sort_unstable();
    at.dedup();
    let mut out = Vec::new();
    let mut start = 0;
    for cut in at {
        out.push(&wire[start..cut]);
        start = cut;
    }
    out.push(&wire[start..]);
    out
}

/// Feeds `pieces` to a stream reader with a `cap`-byte buffer; returns the
/// frames read and the first error, if any.
fn read_stream(pieces: &[&[u8]], cap: usize) -> (Vec<Vec<u8>>, Option<FrameError>) {
    let mut buf = vec![0u8; cap];
    let mut reader = StreamReader::new(&mut buf);
    let mut frames = Vec::new();
    for piece in pieces {
        let mut rest = *piece;
        // Each round consumes a byte or completes a frame (at least a 1-byte body).
        for _ in 0..=2 * piece.len() + 1 {
            if rest.is_empty() {
                break;
            }
            match reader.push(rest) {
                Ok((used, done)) => {
                    assert!(used <= rest.len());
                    if let Some(n) = done {
                        assert!(
                            (1..=cap).contains(&n),
                            "frame of {n} bytes from a {cap}-byte reader"
                        );
                        frames.push(reader.frame()[..n].to_vec());
                    } else {
                        assert_eq!(used, rest.len(), "an incomplete frame consumes all input");
                    }
                    rest = &rest[used..];
                }
                Err(e) => return (frames, Some(e)),
            }
        }
        assert!(rest.is_empty(), "reader stalled");
    }
    (frames, None)
}

fn frames() -> impl Strategy<Value = Vec<Vec<u8>>> {
    vec(vec(any::<u8>(), 1..3000), 1..10)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn stream_frames_round_trip_at_any_split(
        frames in frames(),
        cuts in vec(any::<Index>(), 0..24),
        slack in 0usize..100,
    ) {
        let mut wire = Vec::new();
        for f in &frames {
            wire.extend_from_slice(&frame::header(f.len()).unwrap());
            wire.extend_from_slice(f);
        }
        let cap = frames.iter().map(Vec::len).max().unwrap() + slack;
        let (got, err) = read_stream(&pieces(&wire, &cuts), cap);
        prop_assert_eq!(err, None);
        prop_assert_eq!(got, frames);
    }

    #[test]
    fn stream_frame_over_the_buffer_is_refused_at_its_header(
        len in 2usize..=MAX_FRAME,
        cap in any::<Index>(),
    ) {
        let cap = cap.index(len);
        let header = frame::header(len).unwrap();
        let (got, err) = read_stream(&[&header], cap);
        prop_assert!(got.is_empty());
        prop_assert_eq!(err, Some(FrameError::TooLarge { len, max: cap }));
    }

    #[test]
    fn stream_garbage_never_panics(
        garbage in vec(any::<u8>(), 0..4096),
        cuts in vec(any::<Index>(), 0..16),
        cap in 0usize..600,
    ) {
        let (_, err) = read_stream(&pieces(&garbage, &cuts), cap);
        if let Some(e) = err {
            prop_assert!(
                matches!(e, FrameError::Empty | FrameError::TooLarge { .. }),
                "unexpected error {:?}",
                e
            );
        }
    }

    #[test]
    fn cobs_frames_round_trip(frames in frames(), idle in vec(0usize..3, 10)) {
        let mut wire = Vec::new();
        let mut cap = 0;
        for (k, f) in frames.iter().enumerate() {
            // Idle delimiters between frames are ignored.
            wire.extend(core::iter::repeat_n(0u8, idle[k % idle.len()]));
            let mut out = vec![0u8; cobs::max_encoding_length(f.len()) + 1];
            let n = frame::cobs_encode(f, &mut out).unwrap();
            prop_assert!(!out[..n - 1].contains(&0));
            prop_assert_eq!(out[n - 1], 0);
            cap = cap.max(n - 1);
            wire.extend_from_slice(&out[..n]);
        }
        let mut buf = vec![0u8; cap];
        let mut reader = CobsReader::new(&mut buf);
        let mut got = Vec::new();
        for &b in &wire {
            if let Some(result) = reader.push(b) {
                let n = result.expect("a well-formed frame decodes");
                got.push(reader.frame()[..n].to_vec());
            }
        }
        prop_assert_eq!(got, frames);
    }

    #[test]
    fn cobs_garbage_never_panics_and_the_reader_resynchronises(
        garbage in vec(any::<u8>(), 0..4096),
        good in vec(any::<u8>(), 1..512),
        cap in 0usize..700,
    ) {
        let mut buf = vec![0u8; cap.max(cobs::max_encoding_length(good.len()))];
        let cap = buf.len();
        let mut reader = CobsReader::new(&mut buf);
        for &b in &garbage {
            if let Some(Ok(n)) = reader.push(b) {
                prop_assert!((1..=cap).contains(&n));
            }
        }
        let mut enc = vec![0u8; cobs::max_encoding_length(good.len()) + 1];
        let n = frame::cobs_encode(&good, &mut enc).unwrap();
        let mut last = None;
        for &b in core::iter::once(&0u8).chain(&enc[..n]) {
            if let Some(result) = reader.push(b) {
                last = Some(result);
            }
        }
        prop_assert_eq!(last, Some(Ok(good.len())));
        prop_assert_eq!(&reader.frame()[..good.len()], &good[..]);
    }

    #[test]
    fn cobs_encode_needs_room_for_overhead_and_delimiter(f in vec(any::<u8>(), 1..2000)) {
        let need = cobs::max_encoding_length(f.len()) + 1;
        let mut out = vec![0u8; need];
        prop_assert!(frame::cobs_encode(&f, &mut out).is_ok());
        let mut short = vec![0u8; need - 1];
        prop_assert_eq!(
            frame::cobs_encode(&f, &mut short),
            Err(FrameError::TooLarge { len: need, max: need - 1 })
        );
    }
}

#[test]
fn largest_frames_pass_both_framings() {
    let big: Vec<u8> = content(MAX_FRAME, 7);
    let mut wire = frame::header(MAX_FRAME).unwrap().to_vec();
    wire.extend_from_slice(&big);
    let (got, err) = read_stream(&[&wire], MAX_FRAME);
    assert_eq!(err, None);
    assert_eq!(got, vec![big.clone()]);

    let mut enc = vec![0u8; cobs::max_encoding_length(MAX_FRAME) + 1];
    let n = frame::cobs_encode(&big, &mut enc).unwrap();
    let mut buf = vec![0u8; n - 1];
    let mut reader = CobsReader::new(&mut buf);
    let results: Vec<_> = enc[..n].iter().filter_map(|&b| reader.push(b)).collect();
    assert_eq!(results, vec![Ok(MAX_FRAME)]);
    assert_eq!(&reader.frame()[..MAX_FRAME], &big[..]);
    assert_eq!(frame::cobs_encode(&[], &mut enc), Err(FrameError::Empty));
}
