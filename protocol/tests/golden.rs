//! Golden vectors: the exact bytes of every message on the wire.
//!
//! Each test builds one value from fixed inputs, checks that it encodes to the
//! bytes written out below field by field, and that those bytes decode back to
//! the value. The expected bytes were written from postcard's wire format
//! (see `SPEC.md` §4), not copied from an encoder run:
//!
//! - unsigned integers (`u16`, `u32`, `u64`) and lengths are varints: 7 bits per
//!   byte, least significant group first, high bit set on all but the last byte
//!   (`1000` = `e8 07`, `7000` = `d8 36`);
//! - `u8`, `bool` and fixed arrays (`[u8; N]`, keys, roots, signatures) are raw bytes;
//! - strings and lists are a varint length (bytes for strings) then the items;
//! - `Option` is `00` or `01` then the value; enums are a varint variant index
//!   then the variant's fields in declaration order.
//!
//! Keys and signatures come from fixed Ed25519 seeds (Ed25519 is
//! deterministic). They were cross-checked with an independent Ed25519
//! implementation signing the byte strings `SPEC.md` defines
//! (`"baton agent cert v3\0" ‖ postcard(id, key, segment, score, serial, not_after)`,
//! `"baton trust v1\0"` and `"baton revocations v1\0"` hashed with SHA-256 before signing, and
//! `"baton manifest v1\0" ‖ postcard(name, …, signer)`), so these vectors also
//! pin the signed bytes.
//!
//! Every field holds a value distinct from its neighbours, so adding,
//! removing or reordering a field changes the bytes and fails a test.
//!
//! # Changing a golden vector deliberately
//!
//! A failing test here means the wire format changed, and every deployed
//! agent will misread the new bytes. If that is intended:
//!
//! 1. Add new `Message` variants (and new variants of the enums inside it)
//!    **at the end only**: existing indices must never move. New fields are a
//!    protocol break: bump `PROTOCOL_VERSION` and say so in `SPEC.md`.
//! 2. Update `SPEC.md` first, then write the new expected bytes here by hand
//!    from the spec, one commented line per field, as below; do not paste the
//!    encoder's output, or the test checks nothing.
//! 3. Add a test for a new variant and an arm in [`variant_index`], which is
//!    an exhaustive `match` precisely so that a new variant fails to compile
//!    until its golden vector exists.

use baton_protocol::discovery::{self, Announcement, DiscoveryError};
use baton_protocol::identity::{AgentCert, Identity};
use baton_protocol::message::{
    CodecError, FailReason, Holding, InstallState, Received, Refusal, Report, RunningVersion,
    SegmentMember, SegmentReport, Source, SourceRange, Trouble,
};
use baton_protocol::revocation::{RevocationList, Revoked};
use baton_protocol::session::{Hello, Role};
use baton_protocol::trust::{PublisherGrant, SignedTrust, TrustAnchor, TrustDocument};
use baton_protocol::{
    AgentId, Delay, DelayTo, JobRef, Label, LinkInfo, Manifest, Message, PeerAddr, PublicKey, caps,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

// ---------------------------------------------------------------------------
// Fixed inputs and their encodings.

/// Ed25519 public key of seed `[1; 32]` (the manager).
const PK_MANAGER: &str = "8a88e3dd7409f195fd52db2d3cba5d72ca6709bf1d94121bf3748801b40f6f5c";
/// Ed25519 public key of seed `[2; 32]` (agent `edge-1`).
const PK_EDGE1: &str = "8139770ea87d175f56a35466c34c7ecccb8d8a91b4ee37a25df60f5b8fc9b394";
/// Ed25519 public key of seed `[3; 32]` (agent `edge-2`).
const PK_EDGE2: &str = "ed4928c628d1c2c6eae90338905995612959273a5c63f93636c14614ac8737d1";
/// Ed25519 public key of seed `[4; 32]` (the publisher).
const PK_PUBLISHER: &str = "ca93ac1705187071d67b83c7ff0efe8108e8ec4530575d7726879333dbdabe7c";
/// First 8 bytes of SHA-256 over the publisher's key.
const KEYID_PUBLISHER: &str = "c5b940ed3f65c391";
/// The manager's signature over
/// `"baton agent cert v3\0" 06 "edge-1" PK_EDGE1 0c "fra-2/rack-4" f0a204 9221 80a4a7da06`.
const CERT_SIG: &str = concat!(
    "fb373d586b5f340b51cfb1250e6f29e81986f8461a688c69fd0a13badfd5afb2",
    "bdbf7bcd52bd5fdc60a7bfdc1fc8e5da6eb231646c82deb014f8e13e661c4902",
);
/// The certified segment `"fra-2/rack-4"`, score 70 000 (varint `f0 a2 04`), serial 4242
/// (`92 21`) and expiry 1 800 000 000 (`80 a4 a7 da 06`).
const CERT_SEGMENT_SCORE: &str = "0c 6672612d322f7261636b2d34 f0a204 9221 80a4a7da06";
/// The publisher's signature over `"baton manifest v1\0"` and the manifest fields.
const MANIFEST_SIG: &str = concat!(
    "c09b895032c624319e353fc5caf798ddb13afba4cfcef28c4d17ac5d937cac53",
    "9139c4921ca612dbfc2edc10a632cdef961873ba03ac1622ec6b3d800fc7dc02",
);

/// `JobRef { id: 1000, epoch: 3 }`: varint 1000 = `e8 07`, then `03`.
const JOB: JobRef = JobRef { id: 1000, epoch: 3 };
const JOB_HEX: &str = "e807 03";

/// A content root: 32 × `5a`, written out by [`rep`].
const ROOT: [u8; 32] = [0x5a; 32];

/// `"edge-1"`, `"edge-2"`, `"edge-3"` as postcard strings: length 6, then UTF-8.
const EDGE1: &str = "06 656467652d31";
const EDGE2: &str = "06 656467652d32";
const EDGE3: &str = "06 656467652d33";

fn id(s: &str) -> AgentId {
    AgentId::try_from(s).expect("test id fits")
}

fn identity(seed: u8) -> Identity {
    Identity::from_seed([seed; 32])
}

fn key(seed: u8) -> PublicKey {
    identity(seed).public()
}

/// `hex` repeated `n` times (for fixed arrays of one byte value).
fn rep(hex: &str, n: usize) -> String {
    hex.repeat(n)
}

/// The manager's certificate for `edge-1`, placed in `fra-2/rack-4` with score 70 000,
/// serial 4242, valid until Unix second 1 800 000 000.
fn cert() -> AgentCert {
    AgentCert::issue_with_term(
        &identity(1),
        id("edge-1"),
        key(2),
        heapless::String::try_from("fra-2/rack-4").unwrap(),
        70_000,
        4242,
        1_800_000_000,
    )
}

fn cert_hex() -> String {
    [EDGE1, PK_EDGE1, CERT_SEGMENT_SCORE, CERT_SIG].concat()
}

/// A manifest for `router-fw` v300: 10 000 000 bytes in 611 chunks of 16 KiB.
fn manifest() -> Manifest {
    Manifest::sign(
        &identity(4),
        heapless::String::try_from("router-fw").unwrap(),
        300,
        1_700_000_000,
        10_000_000,
        16_384,
        ROOT,
    )
}

fn manifest_hex() -> String {
    [
        "09 726f757465722d6677", // name "router-fw"
        "ac02",                  // version 300
        "80e2cfaa06",            // expires 1 700 000 000
        "80ade204",              // length 10 000 000
        "808001",                // chunk_size 16 384
        &rep("5a", 32),          // root
        KEYID_PUBLISHER,         // signer
        MANIFEST_SIG,            // signature: 64 raw bytes
    ]
    .concat()
}

/// A report with every option set and every list non-empty.
fn report() -> Report {
    Report {
        id: id("edge-1"),
        listen: Some(PeerAddr::V4([10, 0, 0, 7], 7000)),
        site: heapless::String::try_from("zürich-1").unwrap(),
        segment: heapless::String::try_from("fra-2/rack-4").unwrap(),
        performance: 250,
        free_storage: 1 << 33,
        can_serve: true,
        max_chunk: 32_768,
        max_sources: 4,
        max_peers: 8,
        link: LinkInfo {
            up_bps: 12_500_000,
            down_bps: 125_000_000,
            loss_ppm: 150,
            uptime_s: 86_400,
        },
        delays: heapless::Vec::from_slice(&[
            Delay {
                to: DelayTo::Manager,
                rtt_us: 1500,
            },
            Delay {
                to: DelayTo::Peer(id("edge-2")),
                rtt_us: 250,
            },
        ])
        .unwrap(),
        labels: heapless::Vec::from_slice(&[
            Label {
                key: heapless::String::try_from("role").unwrap(),
                value: heapless::String::try_from("edge").unwrap(),
            },
            Label {
                key: heapless::String::try_from("zone").unwrap(),
                value: heapless::String::try_from("eu-west").unwrap(),
            },
        ])
        .unwrap(),
        holdings: heapless::Vec::from_slice(&[
            Holding {
                root: [0x11; 32],
                verified: 12,
                complete: false,
            },
            Holding {
                root: [0x22; 32],
                verified: 611,
                complete: true,
            },
        ])
        .unwrap(),
    }
}

fn report_hex() -> String {
    [
        EDGE1,                           // id
        "01 00 0a000007 d836",           // listen: Some, V4 (0), 10.0.0.7, port 7000
        "09 7ac3bc726963682d31",         // site "zürich-1": 9 bytes (ü is 2)
        "0c 6672612d322f7261636b2d34",   // segment "fra-2/rack-4"
        "fa01",                          // performance 250
        "8080808020",                    // free_storage 2^33
        "01",                            // can_serve true
        "808002",                        // max_chunk 32 768
        "04",                            // max_sources 4
        "08",                            // max_peers 8
        "a0f8fa05",                      // link.up_bps 12 500 000
        "c0b2cd3b",                      // link.down_bps 125 000 000
        "9601",                          // link.loss_ppm 150
        "80a305",                        // link.uptime_s 86 400
        "02",                            // delays: 2
        "00 dc0b",                       //   Manager (0), rtt 1500
        "01",                            //   Peer (1)
        EDGE2,                           //     "edge-2"
        "fa01",                          //     rtt 250
        "02",                            // labels: 2
        "04 726f6c65 04 65646765",       //   "role" = "edge"
        "04 7a6f6e65 07 65752d77657374", //   "zone" = "eu-west"
        "02",                            // holdings: 2
        &rep("11", 32),                  //   root
        "0c 00",                         //   verified 12, complete false
        &rep("22", 32),                  //   root
        "e304 01",                       //   verified 611, complete true
    ]
    .concat()
}

// ---------------------------------------------------------------------------
// Checks.

/// Joins hex parts (spaces allowed for readability) into bytes.
fn bytes_of(parts: &[&str]) -> Vec<u8> {
    let joined: String = parts.concat().split_whitespace().collect();
    hex::decode(joined).expect("golden vector is valid hex")
}

/// Encodes `msg` both ways (into a slice and into a vector), compares with the
/// golden bytes, and decodes the golden bytes back into `msg`.
fn check_message(msg: &Message<'_>, parts: &[&str]) {
    let golden = bytes_of(parts);
    let mut buf = [0u8; 4096];
    let encoded = msg.encode(&mut buf).expect("message fits 4 KiB");
    assert_eq!(
        hex::encode(&*encoded),
        hex::encode(&golden),
        "{} encodes to other bytes than the golden vector",
        msg.kind()
    );
    #[cfg(feature = "alloc")]
    assert_eq!(msg.to_vec(), golden, "to_vec and encode disagree");
    assert_eq!(
        golden[0],
        variant_index(msg),
        "first byte is the variant index"
    );
    let decoded = Message::decode(&golden).expect("golden vector decodes");
    assert_eq!(&decoded, msg);
    // The bytes are exactly one message: one byte less or more is refused.
    assert!(Message::decode(&golden[..golden.len() - 1]).is_err());
    let mut longer = golden.clone();
    longer.push(0);
    assert_eq!(
        Message::decode(&longer),
        Err(baton_protocol::message::CodecError::TrailingBytes)
    );
}

/// Same as [`check_message`] for a value that is not a `Message`.
fn check_value<T>(value: &T, parts: &[&str])
where
    T: Serialize + DeserializeOwned + PartialEq + core::fmt::Debug,
{
    let golden = bytes_of(parts);
    let mut buf = [0u8; 4096];
    let encoded = postcard::to_slice(value, &mut buf).expect("value fits 4 KiB");
    assert_eq!(hex::encode(&*encoded), hex::encode(&golden));
    let decoded: T = postcard::from_bytes(&golden).expect("golden vector decodes");
    assert_eq!(&decoded, value);
}

/// The variant index of each message, as `SPEC.md` §4 numbers them.
///
/// Exhaustive on purpose: a new variant does not compile until it is listed
/// here (at the end) and has a golden test below.
fn variant_index(msg: &Message<'_>) -> u8 {
    match msg {
        Message::Report(_) => 0,
        Message::Progress { .. } => 1,
        Message::Have { .. } => 2,
        Message::Failed { .. } => 3,
        Message::NextPlease { .. } => 4,
        Message::PeerTrouble { .. } => 5,
        Message::Welcome { .. } => 6,
        Message::Fetch { .. } => 7,
        Message::Sources { .. } => 8,
        Message::Done { .. } => 9,
        Message::Cancel { .. } => 10,
        Message::ChunkRequest { .. } => 11,
        Message::Chunk { .. } => 12,
        Message::Refuse { .. } => 13,
        Message::Ping { .. } => 14,
        Message::Pong { .. } => 15,
        Message::SegmentReport(_) => 16,
        Message::Throttle { .. } => 17,
        Message::NotAccepted { .. } => 18,
        Message::Trust { .. } => 19,
        Message::Revocations { .. } => 20,
        Message::CertRenewed { .. } => 21,
        Message::InstallStatus { .. } => 22,
        Message::Running { .. } => 23,
    }
}

// ---------------------------------------------------------------------------
// Values inside messages.

#[test]
fn agent_cert() {
    let cert = cert();
    cert.verify(&key(1)).expect("pinned certificate verifies");
    check_value(&cert, &[&cert_hex()]);
}

#[test]
fn manifest_with_signature() {
    let m = manifest();
    m.verify_signature(&key(4))
        .expect("pinned manifest verifies");
    m.check_limits(Some(1_600_000_000)).unwrap();
    assert_eq!(m.chunks(), 611);
    check_value(&m, &[&manifest_hex()]);
}

#[test]
fn report_with_every_field() {
    check_value(&report(), &[&report_hex()]);
}

#[test]
fn hello_with_cert_and_token() {
    let hello = Hello::new(Role::Agent, id("edge-1"), caps::ALL, Some(cert()))
        .with_token(heapless::String::try_from("enrol-4242").unwrap());
    check_value(
        &hello,
        &[
            "01",                         // version 1
            "07",                         // caps RELAY_V1 | SERVE | SERIAL
            "01",                         // role Agent (1)
            EDGE1,                        // id
            "01",                         // cert: Some
            &cert_hex(),                  //   id, key, signature
            "01 0a 656e726f6c2d34323432", // token: Some("enrol-4242")
        ],
    );
}

#[test]
fn hello_of_manager_without_options() {
    let hello = Hello::new(Role::Manager, id("mgr"), caps::RELAY_V1, None);
    check_value(
        &hello,
        &[
            "01",        // version 1
            "01",        // caps RELAY_V1
            "00",        // role Manager (0)
            "03 6d6772", // id "mgr"
            "00",        // cert: None
            "00",        // token: None
        ],
    );
}

#[test]
fn peer_addr_v6() {
    let addr = PeerAddr::V6([0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2], 443);
    check_value(&addr, &["01", "fd000000000000000000000000000002", "bb03"]);
}

/// The indices of every enum inside messages. These enums are
/// `#[non_exhaustive]`: a new variant must be appended and added here.
#[test]
fn enum_variant_indices() {
    let fail = [
        FailReason::StorageFull,
        FailReason::StorageError,
        FailReason::BadManifest,
        FailReason::BadSignature,
        FailReason::Expired,
        FailReason::Downgrade,
        FailReason::Busy,
        FailReason::NoSource,
        FailReason::ChunkTooLarge,
        FailReason::NotListed,
        FailReason::VersionReused,
        FailReason::NoTrust,
    ];
    for (i, reason) in fail.iter().enumerate() {
        check_value(reason, &[&format!("{i:02x}")]);
    }
    check_value(&Trouble::BadChunk { index: 300 }, &["00 ac02"]);
    check_value(&Trouble::Unreachable, &["01"]);
    check_value(&Trouble::Refused, &["02"]);
    check_value(&Refusal::NotYet, &["00"]);
    check_value(&Refusal::Busy, &["01"]);
    check_value(&Refusal::Unknown, &["02"]);
    check_value(&Role::Manager, &["00"]);
    check_value(&Role::Agent, &["01"]);
    check_value(&DelayTo::Manager, &["00"]);
    check_value(&DelayTo::Peer(id("edge-2")), &["01", EDGE2]);
    check_value(&Source::Manager, &["00"]);
}

// ---------------------------------------------------------------------------
// One test per message variant, in variant order.

#[test]
fn v00_report() {
    check_message(&Message::Report(report()), &["00", &report_hex()]);
}

#[test]
fn v01_progress() {
    let msg = Message::Progress {
        job: JOB,
        verified: 37,
        received: heapless::Vec::from_slice(&[
            Received {
                from: None,
                bytes: 65_536,
            },
            Received {
                from: Some(id("edge-2")),
                bytes: 131_072,
            },
        ])
        .unwrap(),
    };
    check_message(
        &msg,
        &[
            "01",     // variant 1: Progress
            JOB_HEX,  // job
            "25",     // verified 37
            "02",     // received: 2
            "00",     //   from: None (the manager)
            "808004", //   bytes 65 536
            "01",     //   from: Some
            EDGE2,    //     "edge-2"
            "808008", //   bytes 131 072
        ],
    );
}

#[test]
fn v02_have() {
    let msg = Message::Have {
        job: JOB,
        root: ROOT,
    };
    check_message(&msg, &["02", JOB_HEX, &rep("5a", 32)]);
}

#[test]
fn v03_failed() {
    let msg = Message::Failed {
        job: JOB,
        reason: FailReason::ChunkTooLarge,
    };
    check_message(&msg, &["03", JOB_HEX, "08"]);
}

#[test]
fn v04_next_please() {
    check_message(&Message::NextPlease { job: JOB }, &["04", JOB_HEX]);
}

#[test]
fn v05_peer_trouble() {
    let msg = Message::PeerTrouble {
        job: JOB,
        peer: id("edge-2"),
        trouble: Trouble::BadChunk { index: 300 },
    };
    check_message(
        &msg,
        &[
            "05",    // variant 5: PeerTrouble
            JOB_HEX, // job
            EDGE2,   // peer
            "00",    // trouble: BadChunk (0)
            "ac02",  //   index 300
        ],
    );
}

#[test]
fn v06_welcome() {
    let msg = Message::Welcome {
        cert: cert(),
        unix_time: 1_700_000_000,
        publishers: heapless::Vec::from_slice(&[key(4), key(1)]).unwrap(),
    };
    check_message(
        &msg,
        &[
            "06",         // variant 6: Welcome
            &cert_hex(),  // cert
            "80e2cfaa06", // unix_time 1 700 000 000
            "02",         // publishers: 2
            PK_PUBLISHER, //   32 raw bytes each
            PK_MANAGER,
        ],
    );
}

#[test]
fn v07_fetch() {
    let msg = Message::Fetch {
        job: JOB,
        manifest: manifest(),
        sources: heapless::Vec::from_slice(&[
            SourceRange {
                source: Source::Manager,
                first: 0,
                end: 10,
            },
            SourceRange {
                source: Source::Peer {
                    id: id("edge-2"),
                    addr: PeerAddr::V6([0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2], 7001),
                    key: key(3),
                },
                first: 10,
                end: 611,
            },
        ])
        .unwrap(),
        next: Some(id("edge-3")),
    };
    check_message(
        &msg,
        &[
            "07",                                  // variant 7: Fetch
            JOB_HEX,                               // job
            &manifest_hex(),                       // manifest
            "02",                                  // sources: 2
            "00",                                  //   Manager (0)
            "00 0a",                               //   first 0, end 10
            "01",                                  //   Peer (1)
            EDGE2,                                 //     id
            "01 fd000000000000000000000000000002", //     addr V6 (1) fd00::2
            "d936",                                //       port 7001
            PK_EDGE2,                              //     key
            "0a e304",                             //   first 10, end 611
            "01",                                  // next: Some
            EDGE3,                                 //   "edge-3"
        ],
    );
}

#[test]
fn v08_sources() {
    let msg = Message::Sources {
        job: JOB,
        sources: heapless::Vec::from_slice(&[SourceRange {
            source: Source::Peer {
                id: id("edge-2"),
                addr: PeerAddr::V4([192, 168, 1, 20], 7002),
                key: key(3),
            },
            first: 300,
            end: 611,
        }])
        .unwrap(),
    };
    check_message(
        &msg,
        &[
            "08",               // variant 8: Sources
            JOB_HEX,            // job
            "01",               // sources: 1
            "01",               //   Peer (1)
            EDGE2,              //     id
            "00 c0a80114 da36", //     addr V4 (0) 192.168.1.20, port 7002
            PK_EDGE2,           //     key
            "ac02 e304",        //   first 300, end 611
        ],
    );
}

#[test]
fn v09_done() {
    check_message(&Message::Done { job: JOB }, &["09", JOB_HEX]);
}

#[test]
fn v10_cancel() {
    check_message(&Message::Cancel { job: JOB }, &["0a", JOB_HEX]);
}

#[test]
fn v11_chunk_request() {
    let msg = Message::ChunkRequest {
        root: ROOT,
        index: 610,
    };
    check_message(&msg, &["0b", &rep("5a", 32), "e204"]);
}

#[test]
fn v12_chunk() {
    let data = [0xc3u8; 200];
    let msg = Message::Chunk {
        root: ROOT,
        index: 5,
        proof: heapless::Vec::from_slice(&[[0x01; 32], [0x02; 32], [0x03; 32]]).unwrap(),
        data: &data,
    };
    check_message(
        &msg,
        &[
            "0c",           // variant 12: Chunk
            &rep("5a", 32), // root
            "05",           // index 5
            "03",           // proof: 3 hashes of 32 raw bytes
            &rep("01", 32),
            &rep("02", 32),
            &rep("03", 32),
            "c801",          // data: 200 bytes
            &rep("c3", 200), //   the bytes
        ],
    );
    // The decoded chunk borrows its data from the frame.
    let mut buf = [0u8; 512];
    let golden = &*msg.encode(&mut buf).unwrap();
    let Ok(Message::Chunk { data: borrowed, .. }) = Message::decode(golden) else {
        panic!("chunk decodes");
    };
    assert!(golden.as_ptr_range().contains(&borrowed.as_ptr()));
}

#[test]
fn v13_refuse() {
    let msg = Message::Refuse {
        root: ROOT,
        index: 9,
        reason: Refusal::NotYet,
    };
    check_message(&msg, &["0d", &rep("5a", 32), "09", "00"]);
    let msg = Message::Refuse {
        root: ROOT,
        index: 9,
        reason: Refusal::Unknown,
    };
    check_message(&msg, &["0d", &rep("5a", 32), "09", "02"]);
}

#[test]
fn v14_ping() {
    let msg = Message::Ping {
        nonce: 0x0123_4567_89ab_cdef,
    };
    check_message(&msg, &["0e", "ef9bafcdf8acd19101"]);
}

#[test]
fn v15_pong() {
    let msg = Message::Pong { nonce: u64::MAX };
    // u64::MAX takes the longest varint: nine bytes of 7 set bits, then 01.
    check_message(&msg, &["0f", "ffffffffffffffffff01"]);
}

#[test]
fn unknown_variant_is_refused() {
    assert_eq!(
        Message::decode(&[22]),
        Err(baton_protocol::message::CodecError::Malformed)
    );
}

/// A segment member with every option set and every list non-empty.
fn segment_member() -> SegmentMember {
    SegmentMember {
        id: id("edge-2"),
        score: 1234,
        listen: Some(PeerAddr::V4([10, 0, 0, 8], 7001)),
        performance: 300,
        free_storage: 1_000_000,
        can_serve: false,
        link: LinkInfo {
            up_bps: 1_000,
            down_bps: 2_000,
            loss_ppm: 3,
            uptime_s: 4,
        },
        delays: heapless::Vec::from_slice(&[
            Delay {
                to: DelayTo::Manager,
                rtt_us: 900,
            },
            Delay {
                to: DelayTo::Peer(id("edge-3")),
                rtt_us: 120,
            },
        ])
        .unwrap(),
        last_heard_ms: 450,
    }
}

fn segment_member_hex() -> String {
    [
        EDGE2,                 // id
        "d209",                // score 1234
        "01 00 0a000008 d936", // listen: Some, V4 (0), 10.0.0.8, port 7001
        "ac02",                // performance 300
        "c0843d",              // free_storage 1 000 000
        "00",                  // can_serve false
        "e807",                // link.up_bps 1 000
        "d00f",                // link.down_bps 2 000
        "03",                  // link.loss_ppm 3
        "04",                  // link.uptime_s 4
        "02",                  // delays: 2
        "00 8407",             //   Manager (0), rtt 900
        "01",                  //   Peer (1)
        EDGE3,                 //     "edge-3"
        "78",                  //     rtt 120
        "c203",                // last_heard_ms 450
    ]
    .concat()
}

#[test]
fn v16_segment_report() {
    let msg = Message::SegmentReport(SegmentReport {
        segment: heapless::String::try_from("fra-2/rack-4").unwrap(),
        leader: id("edge-1"),
        term: 7,
        page: 1,
        pages: 3,
        members: heapless::Vec::from_slice(&[segment_member()]).unwrap(),
    });
    check_message(
        &msg,
        &[
            "10",                          // variant 16: SegmentReport
            "0c 6672612d322f7261636b2d34", // segment "fra-2/rack-4"
            EDGE1,                         // leader
            "07",                          // term 7
            "01",                          // page 1
            "03",                          // pages 3
            "01",                          // members: 1
            &segment_member_hex(),         //   the member
        ],
    );
}

#[test]
fn v17_throttle() {
    let msg = Message::Throttle {
        job: JOB,
        max_bytes_per_second: 1 << 20,
    };
    // 2^20: groups of 7 bits from the least significant: 0, 0, 64.
    check_message(&msg, &["11", JOB_HEX, "808040"]);
    let lift = Message::Throttle {
        job: JOB,
        max_bytes_per_second: 0,
    };
    check_message(&lift, &["11", JOB_HEX, "00"]);
}

#[test]
fn v18_not_accepted() {
    let msg = Message::NotAccepted {
        reason: "token expired",
    };
    // The reason: its length (13), then its UTF-8 bytes.
    check_message(&msg, &["12", "0d", "746f6b656e2065787069726564"]);
}

/// Ed25519 public key of seed `[5; 32]` (the root key).
const PK_ROOT: &str = "6e7a1cdd29b0b78fd13af4c5598feff4ef2a97166e3ca6f2e4fbfccd80505bf1";
/// First 8 bytes of SHA-256 over the root key.
const KEYID_ROOT: &str = "7599776c3085e3f9";
/// SHA-256 over `"baton trust v1\0"` and the document's encoding ([`trust_document_hex`]).
const TRUST_DIGEST: &str = "ff0453a6f2130f281c233e510462e59ed2f58d5fac1dd6ede29e8a59f73e9e74";
/// The root's signature over [`TRUST_DIGEST`].
const TRUST_SIG: &str = concat!(
    "322de8d13fc1fc82a09038930a9aeb478245e5e6480cfc32cfb156de5cf35e21",
    "2874abf4becec19a5661c725568d44dae9153b4199e0c1890905a81d4392e504",
);

/// Trust document v2: root `[5; 32]` (1 of 1) lists the publisher for `router-*` and `config`.
fn trust() -> SignedTrust {
    let mut signed = SignedTrust::new(TrustDocument {
        version: 2,
        expires: 1_800_000_000,
        threshold: 1,
        roots: heapless::Vec::from_slice(&[key(5)]).unwrap(),
        publishers: heapless::Vec::from_slice(&[PublisherGrant {
            key: key(4),
            names: heapless::Vec::from_slice(&[
                heapless::String::try_from("router-*").unwrap(),
                heapless::String::try_from("config").unwrap(),
            ])
            .unwrap(),
        }])
        .unwrap(),
    });
    signed.sign(&identity(5)).unwrap();
    signed
}

fn trust_document_hex() -> String {
    [
        "02",                  // version 2
        "80a4a7da06",          // expires 1 800 000 000
        "01",                  // threshold 1
        "01",                  // roots: 1
        PK_ROOT,               //   the root key
        "01",                  // publishers: 1
        PK_PUBLISHER,          //   key
        "02",                  //   names: 2
        "08 726f757465722d2a", //     "router-*"
        "06 636f6e666967",     //     "config"
    ]
    .concat()
}

fn trust_hex() -> String {
    [
        &trust_document_hex() as &str,
        "01",       // signatures: 1
        KEYID_ROOT, //   signer
        TRUST_SIG,  //   signature: 64 raw bytes
    ]
    .concat()
}

#[test]
fn signed_trust_document() {
    let t = trust();
    assert_eq!(hex::encode(t.document.digest()), TRUST_DIGEST);
    let anchor = TrustAnchor::pinned(&[key(5)], 1).unwrap();
    let held = anchor.accept(&t).expect("golden trust verifies");
    assert_eq!(held.version, 2);
    assert_eq!(t.document.verify_manifest(&manifest()), Ok(()));
    check_value(&t, &[&trust_hex()]);
}

#[test]
fn v19_trust() {
    let bytes = bytes_of(&[&trust_hex()]);
    let msg = Message::Trust { document: &bytes };
    // The document's bytes: their length (163 = varint a3 01), then the bytes.
    check_message(&msg, &["13", "a301", &trust_hex()]);
    assert_eq!(SignedTrust::decode(&bytes), Ok(trust()));
}

/// The manager's signature over SHA-256(`"baton revocations v1\0"` ‖ 03 80e2cfaa06 01 EDGE2 9221).
const REVOCATION_SIG: &str = concat!(
    "e148e88a6ab25a964adb18855668c3083ae987e5bc09db553b0bc3ddf46a2a76",
    "0fe1769763658267da4c648fcee134c136cc36c3652fe01cdb20656995bbc908",
);

fn revocations_hex() -> String {
    [
        "03",         // version 3
        "80e2cfaa06", // issued 1 700 000 000
        "01",         // entries: 1
        EDGE2,        //   id
        "9221",       //   up to serial 4242
        REVOCATION_SIG,
    ]
    .concat()
}

#[test]
fn v20_revocations() {
    let list = RevocationList::sign(
        &identity(1),
        3,
        1_700_000_000,
        heapless::Vec::from_slice(&[Revoked {
            id: id("edge-2"),
            up_to_serial: 4242,
        }])
        .unwrap(),
    );
    list.verify(&key(1)).expect("golden list verifies");
    check_value(&list, &[&revocations_hex()]);
    let bytes = bytes_of(&[&revocations_hex()]);
    // 80 bytes: varint 50.
    check_message(
        &Message::Revocations { list: &bytes },
        &["14", "50", &revocations_hex()],
    );
    assert_eq!(RevocationList::decode(&bytes), Some(list));
}

#[test]
fn v21_cert_renewed() {
    check_message(&Message::CertRenewed { cert: cert() }, &["15", &cert_hex()]);
}

#[test]
fn install_states() {
    // A unit enum: its variant index alone.
    for (state, hex) in [
        (InstallState::Installing, "00"),
        (InstallState::Installed, "01"),
        (InstallState::Running, "02"),
        (InstallState::Failed, "03"),
        (InstallState::RolledBack, "04"),
    ] {
        check_value(&state, &[hex]);
    }
}

#[test]
fn v22_install_status() {
    let msg = Message::InstallStatus {
        job: JOB,
        name: "app".try_into().unwrap(),
        version: 7,
        state: InstallState::RolledBack,
        exit_code: Some(-3),
        output: "bad",
    };
    check_message(
        &msg,
        &[
            "16",        // variant 22: InstallStatus
            JOB_HEX,     // job
            "03 617070", // name "app"
            "07",        // version 7
            "04",        // state: RolledBack
            "01 05",     // exit code Some(-3): zigzag varint ((-3 << 1) ^ (-3 >> 31)) = 5
            "03 626164", // output "bad"
        ],
    );
    let first = Message::InstallStatus {
        job: JOB,
        name: "app".try_into().unwrap(),
        version: 7,
        state: InstallState::Installing,
        exit_code: None,
        output: "",
    };
    check_message(
        &first,
        &["16", JOB_HEX, "03 617070", "07", "00", "00", "00"],
    );
}

#[test]
fn v23_running() {
    let msg = Message::Running {
        install_step: true,
        versions: heapless::Vec::from_slice(&[
            RunningVersion {
                name: "app".try_into().unwrap(),
                version: 7,
            },
            RunningVersion {
                name: "fw".try_into().unwrap(),
                version: 300,
            },
        ])
        .unwrap(),
    };
    check_message(
        &msg,
        &[
            "17",        // variant 23: Running
            "01",        // install_step: true
            "02",        // versions: 2
            "03 617070", //   name "app"
            "07",        //   version 7
            "02 6677",   //   name "fw"
            "ac02",      //   version 300: 0x2c | 0x80, then 2
        ],
    );
    let none = Message::Running {
        install_step: false,
        versions: heapless::Vec::new(),
    };
    check_message(&none, &["17", "00", "00"]);
}

// ---------------------------------------------------------------------------
// Discovery datagrams (SPEC.md §7).

/// Edge-1's signature over `"baton discovery v2\0" ‖ cert ‖ seq ‖ time_ms ‖ beacon`
/// (cross-checked with an independent Ed25519 implementation).
const BEACON_SIG: &str = concat!(
    "ca538553f7ba53d5572eab0a886116481f3bfc24b6bf78daa10600462795bab3",
    "de43139570ca3d2665c845c1ec06a672c32202673489ada6a2bff8364391ae08",
);
/// The beacon's send time: Unix ms 1 700 000 000 123.
const BEACON_TIME_MS: u64 = 1_700_000_000_123;

fn beacon() -> Announcement {
    Announcement::Beacon {
        segment: heapless::String::try_from("fra-2/rack-4").unwrap(),
        score: 5000,
        listen: Some(PeerAddr::V4([10, 0, 0, 7], 7000)),
        leader: Some(id("edge-2")),
    }
}

fn beacon_datagram_hex() -> String {
    [
        &cert_hex() as &str, // sender: id, key, segment, score, serial, expiry, manager's signature
        "05",                // seq 5
        "fbd095ffbc31",      // time_ms 1 700 000 000 123
        "00",                // body: Beacon (0)
        "0c 6672612d322f7261636b2d34", //   segment "fra-2/rack-4"
        "8827",              //   score 5000
        "01 00 0a000007 d836", //   listen: Some, V4, 10.0.0.7, port 7000
        "01",                //   leader: Some
        EDGE2,               //     "edge-2"
        BEACON_SIG,          // signature: 64 raw bytes
    ]
    .concat()
}

#[test]
fn discovery_beacon_datagram() {
    let golden = bytes_of(&[&beacon_datagram_hex()]);
    let mut buf = [0u8; discovery::MAX_DATAGRAM];
    let n = discovery::seal(
        &identity(2),
        &cert(),
        5,
        BEACON_TIME_MS,
        &beacon(),
        &mut buf,
    )
    .unwrap();
    assert_eq!(hex::encode(&buf[..n]), hex::encode(&golden));
    let dg = discovery::open(&golden, &key(1)).expect("golden datagram opens");
    assert_eq!(dg.sender, cert());
    assert_eq!(dg.seq, 5);
    assert_eq!(dg.time_ms, BEACON_TIME_MS);
    assert_eq!(dg.body, beacon());
}

#[test]
fn discovery_announcement_variants() {
    check_value(
        &beacon(),
        &[
            "00 0c 6672612d322f7261636b2d34 8827 01 00 0a000007 d836 01",
            EDGE2,
        ],
    );
    check_value(
        &Announcement::Beacon {
            segment: heapless::String::new(),
            score: 0,
            listen: None,
            leader: None,
        },
        &["00 00 00 00 00"],
    );
    check_value(&Announcement::Probe { nonce: 300 }, &["01 ac02"]);
    check_value(&Announcement::Echo { nonce: 300 }, &["02 ac02"]);
    check_value(
        &Announcement::Member(segment_member()),
        &["03", &segment_member_hex()],
    );
}

#[test]
fn discovery_open_refuses_tampering() {
    let golden = bytes_of(&[&beacon_datagram_hex()]);
    // Another manager's key: the certificate does not verify.
    assert_eq!(
        discovery::open(&golden, &key(4)),
        Err(DiscoveryError::BadCert)
    );
    // Any flipped byte is refused: in the certificate, the signed fields or the signature.
    for at in 0..golden.len() {
        let mut bad = golden.clone();
        bad[at] ^= 0x01;
        assert!(
            discovery::open(&bad, &key(1)).is_err(),
            "flipped byte {at} accepted"
        );
    }
    // A flipped bit in the body (score) is a bad signature, not a bad certificate.
    let score_at = bytes_of(&[&cert_hex()]).len() + 1 + 6 + 1 + 13;
    let mut bad = golden.clone();
    bad[score_at] ^= 0x01;
    assert_eq!(
        discovery::open(&bad, &key(1)),
        Err(DiscoveryError::BadSignature)
    );
    // A flipped bit in the signature.
    let mut bad = golden.clone();
    *bad.last_mut().unwrap() ^= 0x80;
    assert_eq!(
        discovery::open(&bad, &key(1)),
        Err(DiscoveryError::BadSignature)
    );
    // Trailing bytes before the signature (the signed part does not end where the body does).
    let body_end = golden.len() - 64;
    let mut longer = golden[..body_end].to_vec();
    longer.push(0);
    longer.extend_from_slice(&golden[body_end..]);
    assert_eq!(
        discovery::open(&longer, &key(1)),
        Err(DiscoveryError::Codec(CodecError::TrailingBytes))
    );
    // A byte appended after the signature: the signature no longer lines up.
    let mut appended = golden.clone();
    appended.push(0);
    assert!(discovery::open(&appended, &key(1)).is_err());
    // Every truncation is refused.
    for len in 0..golden.len() {
        assert!(
            discovery::open(&golden[..len], &key(1)).is_err(),
            "truncation to {len} accepted"
        );
    }
    // Oversized input is refused before decoding.
    let huge = vec![0u8; discovery::MAX_DATAGRAM + 1];
    assert_eq!(
        discovery::open(&huge, &key(1)),
        Err(DiscoveryError::Codec(CodecError::Malformed))
    );
}

#[test]
fn discovery_seal_refuses_a_small_buffer() {
    let mut small = [0u8; 100];
    assert_eq!(
        discovery::seal(
            &identity(2),
            &cert(),
            5,
            BEACON_TIME_MS,
            &beacon(),
            &mut small
        ),
        Err(DiscoveryError::Codec(CodecError::BufferFull))
    );
    // A datagram signed with a key other than the certificate's fails to open.
    let mut buf = [0u8; discovery::MAX_DATAGRAM];
    let n = discovery::seal(
        &identity(3),
        &cert(),
        5,
        BEACON_TIME_MS,
        &beacon(),
        &mut buf,
    )
    .unwrap();
    assert_eq!(
        discovery::open(&buf[..n], &key(1)),
        Err(DiscoveryError::BadSignature)
    );
}

/// The whole Noise handshake and the first frame each way, from fixed keys.
///
/// The expected bytes come from an independent Noise implementation of
/// `Noise_XX_25519_ChaChaPoly_SHA256` with prologue `baton`, static keys the
/// X25519 form of the Ed25519 seeds (first half of SHA-512(seed)) and the
/// ephemeral secrets below. A change of pattern, prologue, key derivation or
/// hello layout fails here.
#[test]
fn handshake_transcript() {
    use baton_protocol::session::{Handshake, MAX_HANDSHAKE_MSG};

    let mut i = Handshake::initiator(
        &identity(2),
        [10; 32],
        &key(1),
        Hello::new(Role::Agent, id("edge-1"), caps::ALL, None),
    )
    .unwrap();
    let mut r = Handshake::responder(
        &identity(1),
        [11; 32],
        Hello::new(Role::Manager, id("mgr"), caps::RELAY_V1, None),
    )
    .unwrap();
    let mut buf = [0u8; MAX_HANDSHAKE_MSG];

    let n = i.write_message(&mut buf).unwrap();
    assert_eq!(
        hex::encode(&buf[..n]),
        // e: the initiator's ephemeral public key; empty payload, no tag yet.
        "f77ff4b10788bfdca62ca0bb160d427cf5762d85f2b5cad6807ec9c3febbde09"
    );
    r.read_message(&buf[..n]).unwrap();

    let n = r.write_message(&mut buf).unwrap();
    let m2 = bytes_of(&[
        // e
        "73b2d8b76aa9b53660032bc8f5d8bee3a3ae4e3b3a7fd49ade81f7347a34aa68",
        // s, encrypted (32 + 16)
        "a59924100ef3cdf45cc8d3fba8e2999ca9d53ae7b8cc5668cd21561cfff10106",
        "3485bbee836921afe3125677c719eff2",
        // Hello { 1, RELAY_V1, Manager, "mgr", None, None }, encrypted (9 + 16)
        "6684d95897858dfdab9b6931a90a9bd409c2518e121cd37a50",
    ]);
    assert_eq!(hex::encode(&buf[..n]), hex::encode(m2));
    i.read_message(&buf[..n]).unwrap();

    let n = i.write_message(&mut buf).unwrap();
    let m3 = bytes_of(&[
        // s, encrypted (32 + 16)
        "67500a00aeae91a6b07ab1308ef696f7f717ef8ed5240deddc26c05032df3299",
        "402ac8ddaa77f02a7c0759d164d70793",
        // Hello { 1, ALL, Agent, "edge-1", None, None }, encrypted (12 + 16)
        "9633225775bd387a3d583b9c40d64609ac09489e53380daac2829b34",
    ]);
    assert_eq!(hex::encode(&buf[..n]), hex::encode(m3));
    r.read_message(&buf[..n]).unwrap();

    let (mut ti, mut tr) = (i.finish().unwrap(), r.finish().unwrap());
    let mut frame = [0u8; 64];
    frame[..5].copy_from_slice(b"hello");
    let n = ti.encrypt(&mut frame, 5).unwrap();
    assert_eq!(
        hex::encode(&frame[..n]),
        "c9f776277e3237afbd3326f48a2bacea56475ceec6"
    );
    assert_eq!(tr.decrypt(&mut frame, n), Ok(5));
    frame[..3].copy_from_slice(b"ack");
    let n = tr.encrypt(&mut frame, 3).unwrap();
    assert_eq!(
        hex::encode(&frame[..n]),
        "59615e34494ea0a7aae650e67a0132868ac0c2"
    );
    assert_eq!(ti.decrypt(&mut frame, n), Ok(3));
}
