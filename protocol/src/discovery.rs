//! Segment discovery: the signed UDP datagrams agents on one LAN exchange (claims 7, 9, 11).
//!
//! Agents broadcast a [`Announcement::Beacon`] on their segment, measure
//! round-trip times to each other with [`Announcement::Probe`] and
//! [`Announcement::Echo`], and send the elected leader their capabilities as
//! [`Announcement::Member`]. Datagrams travel outside any Noise session, so
//! each one carries its sender's manager-signed [`AgentCert`], a sequence
//! number that only grows (replays are dropped by the receiver), the time it
//! was sent on the manager's clock (stale datagrams are dropped), and the
//! sender's Ed25519 signature over everything before it. A receiver that pins
//! the manager's key therefore knows who sent a datagram and that nobody
//! changed it on the way.
//!
//! Checking costs two signature verifications, so [`decode`] only parses: the
//! receiver runs its cheap checks (segment, freshness, replay, rate) on the
//! [`Unverified`] datagram first and verifies last ([`Unverified::verify`]).
//!
//! Wire form: postcard of `(sender, seq, time_ms, body)` followed by the 64 signature bytes.

use serde::{Deserialize, Serialize};

use crate::identity::{self, AgentCert, Identity};
use crate::message::{CodecError, SegmentMember};
use crate::types::{AgentId, LinkInfo, Name, PeerAddr, PublicKey};

/// UDP port agents listen on for discovery unless configured otherwise.
pub const DEFAULT_DISCOVERY_PORT: u16 = 7790;
/// Largest discovery datagram, in bytes (fits one Ethernet frame with IP and UDP headers).
pub const MAX_DATAGRAM: usize = 1400;
/// Domain separation for datagram signatures (v2: datagrams carry `time_ms`).
const DATAGRAM_DOMAIN: &[u8] = b"baton discovery v2\0";
/// Bytes of an Ed25519 signature.
const SIGNATURE_LEN: usize = 64;

/// What one discovery datagram says.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Announcement {
    /// Broadcast on the segment: the sender is here, with this score, and follows this leader.
    Beacon {
        /// The segment the sender reports (receivers ignore other segments).
        segment: Name,
        /// The sender's capability score (higher leads; ties go to the larger id).
        score: u32,
        /// Where the sender serves peers, if it does.
        listen: Option<PeerAddr>,
        /// Whom the sender currently takes for leader.
        leader: Option<AgentId>,
    },
    /// Unicast to a member: echo this nonce, so the sender measures the round trip.
    Probe {
        /// Echoed back.
        nonce: u64,
    },
    /// Unicast answer to a [`Announcement::Probe`].
    Echo {
        /// The probe's nonce.
        nonce: u64,
    },
    /// Unicast to the leader: the member's capabilities and measured delays.
    Member(SegmentMember),
}

/// A discovery datagram whose certificate and signature have been checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Datagram {
    /// The sender's manager-signed certificate (its id and key).
    pub sender: AgentCert,
    /// The sender's sequence number; a receiver drops any not above the last it accepted.
    pub seq: u64,
    /// When it was sent, in Unix milliseconds on the manager's clock as the sender
    /// estimates it (the `Welcome`'s `unix_time` plus the time elapsed since).
    pub time_ms: u64,
    /// What the sender says.
    pub body: Announcement,
}

/// The signed part of a datagram, borrowed for encoding.
#[derive(Serialize)]
struct SignedRef<'a> {
    sender: &'a AgentCert,
    seq: u64,
    time_ms: u64,
    body: &'a Announcement,
}

/// The signed part of a datagram, owned for decoding.
#[derive(Deserialize)]
struct SignedOwned {
    sender: AgentCert,
    seq: u64,
    time_ms: u64,
    body: Announcement,
}

/// The highest score [`capability_score`] gives (serving, link class 64,
/// performance 1000, storage class 44: the bit length of `u64::MAX` bytes in MiB).
pub const MAX_CAPABILITY_SCORE: u32 = (1 << 24) | (64 << 16) | (1000 << 6) | 44;

/// Bit length of `v` (0 for 0, 64 for `u64::MAX`).
fn bit_length(v: u64) -> u32 {
    64 - v.leading_zeros()
}

/// The capability score the segment election compares (higher leads; ties go to the
/// larger id), from what an agent reports of itself. The manager computes it from an
/// agent's first report to record the score it certifies.
///
/// `score = can_serve · 2^24 + link_class · 2^16 + min(performance, 1000) · 2^6 + storage_class`
/// where `link_class` is the bit length of `min(up_bps, down_bps)` (0 when
/// unknown, at most 64) and `storage_class` the bit length of the free MiB
/// (at most 44). So an agent that serves peers always beats one that does not,
/// then a link twice as fast wins, then performance, then storage.
pub fn capability_score(
    can_serve: bool,
    link: &LinkInfo,
    performance: u32,
    free_storage: u64,
) -> u32 {
    let link_class = bit_length(link.up_bps.min(link.down_bps));
    let storage_class = bit_length(free_storage >> 20).min(63);
    (u32::from(can_serve) << 24) | (link_class << 16) | (performance.min(1000) << 6) | storage_class
}

/// Why a discovery datagram was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum DiscoveryError {
    /// The bytes are not a datagram (or the buffer was too small to encode one).
    Codec(CodecError),
    /// The sender's certificate is not signed by the manager this agent trusts.
    BadCert,
    /// The datagram's signature does not match the sender's key.
    BadSignature,
}

impl core::fmt::Display for DiscoveryError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            DiscoveryError::Codec(e) => write!(f, "discovery datagram: {e}"),
            DiscoveryError::BadCert => {
                f.write_str("discovery datagram: certificate not signed by our manager")
            }
            DiscoveryError::BadSignature => f.write_str("discovery datagram: bad signature"),
        }
    }
}

impl core::error::Error for DiscoveryError {}

/// Signs and encodes a datagram into `buf`, returning its length.
///
/// `identity` must be the key named in `cert`; `seq` must grow with every datagram sent;
/// `time_ms` is the sender's estimate of the manager's clock (Unix milliseconds).
pub fn seal(
    identity: &Identity,
    cert: &AgentCert,
    seq: u64,
    time_ms: u64,
    body: &Announcement,
    buf: &mut [u8],
) -> Result<usize, DiscoveryError> {
    let signed = SignedRef {
        sender: cert,
        seq,
        time_ms,
        body,
    };
    let domain = DATAGRAM_DOMAIN.len();
    if buf.len() < domain {
        return Err(DiscoveryError::Codec(CodecError::BufferFull));
    }
    // Encode after the domain prefix, sign prefix and encoding together, then drop the prefix.
    buf[..domain].copy_from_slice(DATAGRAM_DOMAIN);
    let len = postcard::to_slice(&signed, &mut buf[domain..])
        .map_err(|e| match e {
            postcard::Error::SerializeBufferFull => DiscoveryError::Codec(CodecError::BufferFull),
            _ => DiscoveryError::Codec(CodecError::Malformed),
        })?
        .len();
    if buf.len() < len + SIGNATURE_LEN || len + SIGNATURE_LEN > MAX_DATAGRAM {
        return Err(DiscoveryError::Codec(CodecError::BufferFull));
    }
    let signature = identity.sign(&buf[..domain + len]);
    buf.copy_within(domain..domain + len, 0);
    buf[len..len + SIGNATURE_LEN].copy_from_slice(&signature);
    Ok(len + SIGNATURE_LEN)
}

/// A datagram that decoded but whose certificate and signature are not checked yet.
#[derive(Clone, Debug)]
pub struct Unverified<'a> {
    datagram: Datagram,
    signed: &'a [u8],
    signature: &'a [u8; SIGNATURE_LEN],
}

impl Unverified<'_> {
    /// What the datagram says, not yet authenticated: use it only to decide whether to verify.
    pub fn claimed(&self) -> &Datagram {
        &self.datagram
    }

    /// Checks the certificate against `manager` and the signature against the
    /// certificate's key (two Ed25519 verifications; the second is skipped when the
    /// first fails).
    pub fn verify(self, manager: &PublicKey) -> Result<Datagram, DiscoveryError> {
        self.datagram
            .sender
            .verify(manager)
            .map_err(|_| DiscoveryError::BadCert)?;
        let mut message = [0u8; MAX_DATAGRAM + DATAGRAM_DOMAIN.len()];
        let domain = DATAGRAM_DOMAIN.len();
        message[..domain].copy_from_slice(DATAGRAM_DOMAIN);
        message[domain..domain + self.signed.len()].copy_from_slice(self.signed);
        identity::verify(
            &self.datagram.sender.key,
            &message[..domain + self.signed.len()],
            self.signature,
        )
        .map_err(|_| DiscoveryError::BadSignature)?;
        Ok(self.datagram)
    }
}

/// Decodes a datagram without checking any signature (cheap: size and decoding only).
pub fn decode(bytes: &[u8]) -> Result<Unverified<'_>, DiscoveryError> {
    if bytes.len() > MAX_DATAGRAM || bytes.len() <= SIGNATURE_LEN {
        return Err(DiscoveryError::Codec(CodecError::Malformed));
    }
    let (signed_bytes, signature) = bytes.split_at(bytes.len() - SIGNATURE_LEN);
    let (signed, rest): (SignedOwned, _) = postcard::take_from_bytes(signed_bytes)
        .map_err(|_| DiscoveryError::Codec(CodecError::Malformed))?;
    if !rest.is_empty() {
        return Err(DiscoveryError::Codec(CodecError::TrailingBytes));
    }
    Ok(Unverified {
        datagram: Datagram {
            sender: signed.sender,
            seq: signed.seq,
            time_ms: signed.time_ms,
            body: signed.body,
        },
        signed: signed_bytes,
        signature: signature.try_into().expect("split at the signature length"),
    })
}

/// Decodes a datagram and checks its certificate against `manager` and its signature.
pub fn open(bytes: &[u8], manager: &PublicKey) -> Result<Datagram, DiscoveryError> {
    decode(bytes)?.verify(manager)
}
