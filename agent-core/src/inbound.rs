//! The messages an agent takes, decoded without linking the decoders of the others.
//!
//! [`Message`] also has the variants only a manager receives (`Report`, `Progress`, `Have`,
//! `Failed`, `NextPlease`, `PeerTrouble`, `SegmentReport`). Decoding the whole enum puts
//! their decoders (reports with their bounded lists) into every agent: about 5 KB of a
//! device's 128 KiB of flash. [`Inbound`] lists the same variants in the same order
//! (postcard writes a variant as its index), with the same fields for those an agent takes;
//! the others carry [`NotForAgents`], which refuses without reading, and [`decode`] answers
//! them by their index before decoding anything. The test `inbound_matches_message`
//! decodes every variant of [`Message`] both ways and matches on it exhaustively, so a
//! variant appended to `Message` fails it until it is added here.

use baton_protocol::identity::AgentCert;
use baton_protocol::manifest::Manifest;
use baton_protocol::merkle::Proof;
use baton_protocol::message::{CodecError, MAX_PUBLISHERS, MAX_SOURCES_PER_MESSAGE};
use baton_protocol::message::{Refusal, SourceRange};
use baton_protocol::{AgentId, Digest, JobRef, PublicKey};
use serde::{Deserialize, Deserializer};

/// The payload of a variant agents never take: its decoding fails without reading.
#[derive(Debug, PartialEq, Eq)]
pub enum NotForAgents {}

impl<'de> Deserialize<'de> for NotForAgents {
    fn deserialize<D: Deserializer<'de>>(_: D) -> Result<Self, D::Error> {
        Err(serde::de::Error::custom("not a message for agents"))
    }
}

/// A [`Message`] as an agent decodes it (see the module docs); field meanings as there.
#[allow(missing_docs, clippy::large_enum_variant)]
#[derive(Debug, PartialEq, Eq, Deserialize)]
pub enum Inbound<'a> {
    Report(NotForAgents),
    Progress(NotForAgents),
    Have(NotForAgents),
    Failed(NotForAgents),
    NextPlease(NotForAgents),
    PeerTrouble(NotForAgents),
    Welcome {
        cert: AgentCert,
        unix_time: u64,
        publishers: heapless::Vec<PublicKey, MAX_PUBLISHERS>,
    },
    Fetch {
        job: JobRef,
        manifest: Manifest,
        sources: heapless::Vec<SourceRange, MAX_SOURCES_PER_MESSAGE>,
        next: Option<AgentId>,
    },
    Sources {
        job: JobRef,
        sources: heapless::Vec<SourceRange, MAX_SOURCES_PER_MESSAGE>,
    },
    Done {
        job: JobRef,
    },
    Cancel {
        job: JobRef,
    },
    ChunkRequest {
        root: Digest,
        index: u32,
    },
    Chunk {
        root: Digest,
        index: u32,
        proof: Proof,
        data: &'a [u8],
    },
    Refuse {
        root: Digest,
        index: u32,
        reason: Refusal,
    },
    Ping {
        nonce: u64,
    },
    Pong {
        nonce: u64,
    },
    SegmentReport(NotForAgents),
    Throttle {
        job: JobRef,
        max_bytes_per_second: u64,
    },
    NotAccepted {
        reason: &'a str,
    },
    Trust {
        document: &'a [u8],
    },
    Revocations {
        list: &'a [u8],
    },
    CertRenewed {
        cert: AgentCert,
    },
    InstallStatus(NotForAgents),
    Running(NotForAgents),
}

/// The variants an agent never takes, by their index on the wire, with [`Message::kind`]'s names.
///
/// [`Message::kind`]: baton_protocol::Message::kind
const NOT_FOR_AGENTS: [(u8, &str); 9] = [
    (0, "Report"),
    (1, "Progress"),
    (2, "Have"),
    (3, "Failed"),
    (4, "NextPlease"),
    (5, "PeerTrouble"),
    (16, "SegmentReport"),
    (22, "InstallStatus"),
    (23, "Running"),
];

/// Why a frame was not decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InboundError {
    /// A message agents never take (its [`baton_protocol::Message::kind`]).
    NotForAgents(&'static str),
    /// Not a message.
    Codec(CodecError),
}

/// Decodes one whole message an agent takes; leftover bytes are an error.
pub fn decode(bytes: &[u8]) -> Result<Inbound<'_>, InboundError> {
    if let Some(&(_, kind)) = NOT_FOR_AGENTS
        .iter()
        .find(|(index, _)| bytes.first() == Some(index))
    {
        return Err(InboundError::NotForAgents(kind));
    }
    let (msg, rest) =
        postcard::take_from_bytes(bytes).map_err(|_| InboundError::Codec(CodecError::Malformed))?;
    if rest.is_empty() {
        Ok(msg)
    } else {
        Err(InboundError::Codec(CodecError::TrailingBytes))
    }
}

impl Inbound<'_> {
    /// The variant's name, as [`baton_protocol::Message::kind`] gives it.
    pub fn kind(&self) -> &'static str {
        match self {
            Inbound::Report(_) => "Report",
            Inbound::Progress(_) => "Progress",
            Inbound::Have(_) => "Have",
            Inbound::Failed(_) => "Failed",
            Inbound::NextPlease(_) => "NextPlease",
            Inbound::PeerTrouble(_) => "PeerTrouble",
            Inbound::Welcome { .. } => "Welcome",
            Inbound::Fetch { .. } => "Fetch",
            Inbound::Sources { .. } => "Sources",
            Inbound::Done { .. } => "Done",
            Inbound::Cancel { .. } => "Cancel",
            Inbound::ChunkRequest { .. } => "ChunkRequest",
            Inbound::Chunk { .. } => "Chunk",
            Inbound::Refuse { .. } => "Refuse",
            Inbound::Ping { .. } => "Ping",
            Inbound::Pong { .. } => "Pong",
            Inbound::SegmentReport(_) => "SegmentReport",
            Inbound::Throttle { .. } => "Throttle",
            Inbound::NotAccepted { .. } => "NotAccepted",
            Inbound::Trust { .. } => "Trust",
            Inbound::Revocations { .. } => "Revocations",
            Inbound::CertRenewed { .. } => "CertRenewed",
            Inbound::InstallStatus(_) => "InstallStatus",
            Inbound::Running(_) => "Running",
        }
    }
}

#[cfg(test)]
mod test {
    use super::*;
    use baton_protocol::Message;
    use baton_protocol::message::{FailReason, InstallState, Source, Trouble};

    /// Whether agents take `m`: an exhaustive match, so a variant appended to `Message`
    /// stops this compiling until it is sorted here and in [`Inbound`].
    fn agents_take(m: &Message<'_>) -> bool {
        match m {
            Message::Report(_)
            | Message::Progress { .. }
            | Message::Have { .. }
            | Message::Failed { .. }
            | Message::NextPlease { .. }
            | Message::PeerTrouble { .. }
            | Message::SegmentReport(_)
            | Message::InstallStatus { .. }
            | Message::Running { .. } => false,
            Message::Welcome { .. }
            | Message::Fetch { .. }
            | Message::Sources { .. }
            | Message::Done { .. }
            | Message::Cancel { .. }
            | Message::ChunkRequest { .. }
            | Message::Chunk { .. }
            | Message::Refuse { .. }
            | Message::Ping { .. }
            | Message::Pong { .. }
            | Message::Throttle { .. }
            | Message::NotAccepted { .. }
            | Message::Trust { .. }
            | Message::Revocations { .. }
            | Message::CertRenewed { .. } => true,
        }
    }

    #[test]
    fn inbound_matches_message() {
        let job = JobRef { id: 7, epoch: 3 };
        let root = [9u8; 32];
        let mut proof = Proof::new();
        proof.push([1; 32]).unwrap();
        let mut sources = heapless::Vec::new();
        sources
            .push(SourceRange {
                source: Source::Manager,
                first: 0,
                end: 4,
            })
            .unwrap();
        let data = [5u8; 40];
        let samples = [
            Message::Progress {
                job,
                verified: 2,
                received: heapless::Vec::new(),
            },
            Message::Have { job, root },
            Message::Failed {
                job,
                reason: FailReason::StorageFull,
            },
            Message::NextPlease { job },
            Message::PeerTrouble {
                job,
                peer: AgentId::try_from("p").unwrap(),
                trouble: Trouble::Unreachable,
            },
            Message::Sources {
                job,
                sources: sources.clone(),
            },
            Message::Done { job },
            Message::Cancel { job },
            Message::ChunkRequest { root, index: 3 },
            Message::Chunk {
                root,
                index: 3,
                proof: proof.clone(),
                data: &data,
            },
            Message::Refuse {
                root,
                index: 3,
                reason: Refusal::Busy,
            },
            Message::Ping { nonce: 11 },
            Message::Pong { nonce: 12 },
            Message::Throttle {
                job,
                max_bytes_per_second: 1000,
            },
            Message::NotAccepted { reason: "no" },
            Message::Trust { document: &data },
            Message::Revocations { list: &data },
            Message::InstallStatus {
                job,
                name: heapless::String::try_from("fw").unwrap(),
                version: 2,
                state: InstallState::RolledBack,
                exit_code: Some(3),
                output: "health check failed",
            },
            Message::Running {
                install_step: true,
                versions: heapless::Vec::new(),
            },
        ];
        let mut buf = [0u8; 512];
        for m in &samples {
            let bytes = m.encode(&mut buf).unwrap();
            let got = decode(bytes);
            if agents_take(m) {
                let got = got.unwrap_or_else(|e| panic!("{}: {e:?}", m.kind()));
                assert_eq!(got.kind(), m.kind());
                // Fields decode as in `Message`.
                match (&got, m) {
                    (
                        Inbound::Sources { job: a, sources: s },
                        Message::Sources { job: b, sources: t },
                    ) => {
                        assert_eq!((a, s), (b, t))
                    }
                    (
                        Inbound::Chunk {
                            root: a,
                            index: i,
                            proof: p,
                            data: d,
                        },
                        Message::Chunk {
                            root: b,
                            index: j,
                            proof: q,
                            data: e,
                        },
                    ) => assert_eq!((a, i, p, d), (b, j, q, e)),
                    (
                        Inbound::Throttle {
                            max_bytes_per_second: a,
                            ..
                        },
                        Message::Throttle {
                            max_bytes_per_second: b,
                            ..
                        },
                    ) => {
                        assert_eq!(a, b)
                    }
                    (Inbound::NotAccepted { reason: a }, Message::NotAccepted { reason: b }) => {
                        assert_eq!(a, b)
                    }
                    _ => {}
                }
                // A frame cut short or with a byte too many is refused.
                assert!(decode(&bytes[..bytes.len() - 1]).is_err(), "{}", m.kind());
            } else {
                assert_eq!(got, Err(InboundError::NotForAgents(m.kind())));
            }
        }
        // The table's names are `Message::kind`'s for those indices (Report, SegmentReport
        // included, whose samples are long to build): checked on the wire's first byte.
        for (index, kind) in NOT_FOR_AGENTS {
            assert_eq!(
                decode(&[index, 0, 0]),
                Err(InboundError::NotForAgents(kind))
            );
        }
        assert_eq!(NOT_FOR_AGENTS[6], (16, "SegmentReport"));
        assert!(matches!(decode(&[200, 1]), Err(InboundError::Codec(_))));
    }
}
