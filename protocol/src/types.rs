//! Small value types shared by messages: identifiers, keys, addresses.
//!
//! Every bounded string or list here has its limit in the type, so a decoder
//! can never be asked to hold more than the limit says (see `SPEC.md`).

use core::fmt;

use serde::{Deserialize, Serialize};

/// Longest agent id, in bytes.
pub const MAX_ID_LEN: usize = 32;
/// Longest site or segment name, in bytes.
pub const MAX_NAME_LEN: usize = 32;
/// Most labels one agent reports.
pub const MAX_LABELS: usize = 8;
/// Longest label key, in bytes.
pub const MAX_LABEL_KEY: usize = 16;
/// Longest label value, in bytes.
pub const MAX_LABEL_VALUE: usize = 32;
/// Most delay measurements one report carries.
pub const MAX_DELAYS: usize = 8;

/// An agent's identifier, chosen at enrolment (e.g. `edge-07`).
pub type AgentId = heapless::String<MAX_ID_LEN>;
/// A short name: a site or a segment.
pub type Name = heapless::String<MAX_NAME_LEN>;

/// A SHA-256 digest: chunk hashes, Merkle nodes, content roots.
pub type Digest = [u8; 32];

/// An Ed25519 public key (32 bytes): an agent's, the manager's or a publisher's identity.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct PublicKey(pub [u8; 32]);

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey(")?;
        for b in &self.0[..8] {
            write!(f, "{b:02x}")?;
        }
        write!(f, "…)")
    }
}

/// Short id of a signing key: the first 8 bytes of SHA-256 over the public key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct KeyId(pub [u8; 8]);

impl KeyId {
    /// The key id of `key`.
    pub fn of(key: &PublicKey) -> Self {
        use sha2::Digest as _;
        let hash = sha2::Sha256::digest(key.0);
        let mut id = [0; 8];
        id.copy_from_slice(&hash[..8]);
        KeyId(id)
    }
}

/// A job and the manager epoch it was instructed in.
///
/// The epoch grows each time the manager restarts; an agent ignores an
/// instruction whose epoch is older than one it has already seen for the job.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct JobRef {
    /// The job's id, unique at one manager.
    pub id: u64,
    /// The manager epoch this instruction belongs to.
    pub epoch: u32,
}

/// A network address a peer listens on (IPv4 or IPv6 and a TCP port).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum PeerAddr {
    /// IPv4 address and port.
    V4([u8; 4], u16),
    /// IPv6 address and port.
    V6([u8; 16], u16),
}

impl PeerAddr {
    /// The port of this address.
    pub fn port(&self) -> u16 {
        match *self {
            PeerAddr::V4(_, p) | PeerAddr::V6(_, p) => p,
        }
    }
}

impl From<core::net::SocketAddr> for PeerAddr {
    fn from(addr: core::net::SocketAddr) -> Self {
        match addr {
            core::net::SocketAddr::V4(a) => PeerAddr::V4(a.ip().octets(), a.port()),
            core::net::SocketAddr::V6(a) => PeerAddr::V6(a.ip().octets(), a.port()),
        }
    }
}

impl From<PeerAddr> for core::net::SocketAddr {
    fn from(addr: PeerAddr) -> Self {
        match addr {
            PeerAddr::V4(ip, port) => core::net::SocketAddr::from((ip, port)),
            PeerAddr::V6(ip, port) => core::net::SocketAddr::from((ip, port)),
        }
    }
}

impl fmt::Display for PeerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        core::net::SocketAddr::from(*self).fmt(f)
    }
}

/// A `key=value` label from an agent's configuration, used by content-group selectors.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Label {
    /// Label key, e.g. `role`.
    pub key: heapless::String<MAX_LABEL_KEY>,
    /// Label value, e.g. `edge`.
    pub value: heapless::String<MAX_LABEL_VALUE>,
}

/// What an agent knows of its network link.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct LinkInfo {
    /// Upload capacity in bytes per second (configured cap, or measured).
    pub up_bps: u64,
    /// Download capacity in bytes per second (configured cap, or measured).
    pub down_bps: u64,
    /// Observed loss in parts per million (retransmits or failed exchanges).
    pub loss_ppm: u32,
    /// Seconds since the agent (re)started: a proxy for link and host stability.
    pub uptime_s: u64,
}

/// The other end of a delay measurement.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum DelayTo {
    /// The manager.
    Manager,
    /// Another agent, by id.
    Peer(AgentId),
}

/// One measured round-trip time.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Delay {
    /// Who the delay was measured to.
    pub to: DelayTo,
    /// Round-trip time in microseconds.
    pub rtt_us: u32,
}
