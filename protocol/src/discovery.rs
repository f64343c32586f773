//! Segment discovery: the signed UDP datagrams agents on one LAN exchange (claims 7, 9, 11).
//!
//! Agents broadcast a [`Announcement::Beacon`] on their segment, measure
//! round-trip times to each other with [`Announcement::Probe`] and
//! [`Announcement::Echo`], and send the elected leader their capabilities as
//! [`Announcement::Member`]. Datagrams travel outside any Noise session, so
//! each one carries its sender's manager-signed [`AgentCert`], a sequence
//! number that only grows (replays are dropped by the receiver), and the
//! sender's Ed25519 signature over everything before it. A receiver that pins
//! the manager's key therefore knows who sent a datagram and that nobody
//! changed it on the way.
//!
//! Wire form: postcard of `(sender, seq, body)` followed by the 64 signature bytes.

use serde::{Deserialize, Serialize};

use crate::identity::{self, AgentCert, Identity};
use crate::message::{CodecError, SegmentMember};
use crate::types::{AgentId, Name, PeerAddr, PublicKey};

/// UDP port agents listen on for discovery unless configured otherwise.
pub const DEFAULT_DISCOVERY_PORT: u16 = 7790;
/// Largest discovery datagram, in bytes (fits one Ethernet frame with IP and UDP headers).
pub const MAX_DATAGRAM: usize = 1400;
/// Domain separation for datagram signatures.
const DATAGRAM_DOMAIN: &[u8] = b"baton discovery v1\0";
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
    /// What the sender says.
    pub body: Announcement,
}

/// The signed part of a datagram, borrowed for encoding.
#[derive(Serialize)]
struct SignedRef<'a> {
    sender: &'a AgentCert,
    seq: u64,
    body: &'a Announcement,
}

/// The signed part of a datagram, owned for decoding.
#[derive(Deserialize)]
struct SignedOwned {
    sender: AgentCert,
    seq: u64,
    body: Announcement,
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
/// `identity` must be the key named in `cert`; `seq` must grow with every datagram sent.
pub fn seal(
    identity: &Identity,
    cert: &AgentCert,
    seq: u64,
    body: &Announcement,
    buf: &mut [u8],
) -> Result<usize, DiscoveryError> {
    let signed = SignedRef {
        sender: cert,
        seq,
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

/// Decodes a datagram and checks its certificate against `manager` and its signature.
pub fn open(bytes: &[u8], manager: &PublicKey) -> Result<Datagram, DiscoveryError> {
    if bytes.len() > MAX_DATAGRAM || bytes.len() <= SIGNATURE_LEN {
        return Err(DiscoveryError::Codec(CodecError::Malformed));
    }
    let (signed_bytes, signature) = bytes.split_at(bytes.len() - SIGNATURE_LEN);
    let (signed, rest): (SignedOwned, _) = postcard::take_from_bytes(signed_bytes)
        .map_err(|_| DiscoveryError::Codec(CodecError::Malformed))?;
    if !rest.is_empty() {
        return Err(DiscoveryError::Codec(CodecError::TrailingBytes));
    }
    signed
        .sender
        .verify(manager)
        .map_err(|_| DiscoveryError::BadCert)?;
    let signature: &[u8; SIGNATURE_LEN] =
        signature.try_into().expect("split at the signature length");
    let mut message = [0u8; MAX_DATAGRAM + DATAGRAM_DOMAIN.len()];
    let domain = DATAGRAM_DOMAIN.len();
    message[..domain].copy_from_slice(DATAGRAM_DOMAIN);
    message[domain..domain + signed_bytes.len()].copy_from_slice(signed_bytes);
    identity::verify(
        &signed.sender.key,
        &message[..domain + signed_bytes.len()],
        signature,
    )
    .map_err(|_| DiscoveryError::BadSignature)?;
    Ok(Datagram {
        sender: signed.sender,
        seq: signed.seq,
        body: signed.body,
    })
}
