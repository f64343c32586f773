//! The provisioning block: identity and network settings read at boot.
//!
//! The host tool (`tools/provision`) writes one [`Config`] into the first
//! 512 bytes of the emulated flash file (PSRAM offset 0), so one firmware ELF
//! serves every device. The layout is fixed and little-endian:
//!
//! | offset | bytes | field |
//! |---|---|---|
//! | 0 | 8 | magic `BATONCF2` |
//! | 8 | 32 | identity seed (Ed25519 secret) |
//! | 40 | 32 | manager Ed25519 public key |
//! | 72 | 4 | device IPv4 address |
//! | 76 | 1 | prefix length |
//! | 77 | 4 | gateway IPv4 (`0.0.0.0` = none) |
//! | 81 | 4 | manager IPv4 |
//! | 85 | 2 | manager TCP port |
//! | 87 | 2 | peer listener TCP port (`0` = do not serve peers) |
//! | 89 | 1+32 | agent id (length, bytes; length 0 = derive from the MAC) |
//! | 122 | 1+64 | enrolment token (length 0 = none) |
//! | 187 | 1+128 | pinned root keys of content trust (count ≤ 4, then 32 bytes each) |
//! | 316 | 1+32 | site |
//! | 349 | 1+32 | segment |
//! | 382 | 1 | flags: bit 0 = reach the manager over UART0 ([`FLAG_SERIAL`]); bits 1, 2 = fault demonstrations ([`FLAG_DEMO_STACK_OVERFLOW`], [`FLAG_DEMO_CODE_WRITE`]); other bits 0 |
//! | 383 | 1 | how many of the root keys must sign a trust document (1 ..= count) |
//! | 504 | 8 | first 8 bytes of SHA-256 over bytes 0..504 |
//!
//! Format 2 replaced format 1's trusted publisher keys by root keys and a threshold: the
//! device trusts publishers only as a root-signed trust document lists them. A format-1
//! block reads as missing, so such a device must be provisioned again.
//!
//! A block with a wrong magic or checksum is ignored: the device then derives
//! its id from its MAC and has no manager to talk to (it logs that it needs
//! provisioning). This file is shared with the host tool (`#[path]` include),
//! so it depends only on `core` and `sha2`.

use sha2::{Digest as _, Sha256};

/// Bytes of the encoded block.
pub const CONFIG_LEN: usize = 512;
/// Magic at the start of a provisioning block (format 2).
pub const CONFIG_MAGIC: &[u8; 8] = b"BATONCF2";
/// `flags` bit: the manager session runs over UART0 (COBS-framed) instead of TCP;
/// the device then serves no peers (no listener).
pub const FLAG_SERIAL: u8 = 1;
/// `flags` bit (a test switch): right after boot the device recurses until its stack
/// overflows, to show the stack guard faults and logs `stack overflow` (src/board/mps2_an385/guard.rs).
pub const FLAG_DEMO_STACK_OVERFLOW: u8 = 2;
/// `flags` bit (a test switch): right after boot the device writes to its code memory, to
/// show the MPU stops it with a `MemManage fault at <address>` line (src/board/mps2_an385/guard.rs).
pub const FLAG_DEMO_CODE_WRITE: u8 = 4;
const CHECK_AT: usize = 504;

/// A bounded byte string with its length (ids, tokens, names).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bytes<const N: usize> {
    /// Used length.
    pub len: u8,
    /// Storage.
    pub buf: [u8; N],
}

impl<const N: usize> Bytes<N> {
    /// An empty string.
    pub const fn empty() -> Self {
        Bytes {
            len: 0,
            buf: [0; N],
        }
    }

    /// `s` if it fits.
    pub fn from_slice(s: &[u8]) -> Option<Self> {
        if s.len() > N || s.len() > 255 {
            return None;
        }
        let mut b = Self::empty();
        b.buf[..s.len()].copy_from_slice(s);
        b.len = s.len() as u8;
        Some(b)
    }

    /// The used bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.buf[..self.len as usize]
    }

    /// The used bytes as UTF-8, if they are.
    pub fn as_str(&self) -> Option<&str> {
        core::str::from_utf8(self.as_slice()).ok()
    }
}

/// What one device is told at provisioning time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Ed25519 secret seed of the device identity.
    pub seed: [u8; 32],
    /// The manager's Ed25519 public key (pinned in every manager handshake).
    pub manager_key: [u8; 32],
    /// Device IPv4 address.
    pub ip: [u8; 4],
    /// Prefix length of the device's subnet.
    pub prefix: u8,
    /// Default gateway, `0.0.0.0` for none.
    pub gateway: [u8; 4],
    /// Manager IPv4 address.
    pub manager_ip: [u8; 4],
    /// Manager TCP port.
    pub manager_port: u16,
    /// TCP port of the peer listener, 0 = do not serve peers.
    pub listen_port: u16,
    /// Agent id; empty = derive from the MAC.
    pub id: Bytes<32>,
    /// One-time enrolment token; empty = none.
    pub token: Bytes<64>,
    /// Pinned root keys of content trust (none: the device refuses every content).
    pub roots: [[u8; 32]; 4],
    /// How many of `roots` are set.
    pub root_count: u8,
    /// How many of the roots must sign a trust document.
    pub root_threshold: u8,
    /// Site name for reports.
    pub site: Bytes<32>,
    /// Segment name for reports.
    pub segment: Bytes<32>,
    /// Option bits: [`FLAG_SERIAL`], [`FLAG_DEMO_STACK_OVERFLOW`], [`FLAG_DEMO_CODE_WRITE`];
    /// the others are reserved (0).
    pub flags: u8,
}

/// Why a block was not accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(target_os = "none", derive(defmt::Format))]
#[non_exhaustive]
pub enum ConfigError {
    /// No block: the magic is missing (erased or never provisioned).
    Missing,
    /// The checksum does not match (torn or damaged write).
    BadChecksum,
    /// A length field is out of range.
    BadField,
}

impl core::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            ConfigError::Missing => "no provisioning block",
            ConfigError::BadChecksum => "provisioning block checksum mismatch",
            ConfigError::BadField => "provisioning block field out of range",
        })
    }
}

impl core::error::Error for ConfigError {}

fn take<const N: usize>(b: &[u8], at: usize) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&b[at..at + N]);
    out
}

fn take_str<const N: usize>(b: &[u8], at: usize) -> Result<Bytes<N>, ConfigError> {
    let len = b[at] as usize;
    if len > N {
        return Err(ConfigError::BadField);
    }
    Bytes::from_slice(&b[at + 1..at + 1 + len]).ok_or(ConfigError::BadField)
}

#[cfg_attr(target_os = "none", allow(dead_code))]
fn put_str<const N: usize>(b: &mut [u8], at: usize, s: &Bytes<N>) {
    b[at] = s.len;
    b[at + 1..at + 1 + N].copy_from_slice(&s.buf);
}

fn checksum(b: &[u8]) -> [u8; 8] {
    take(&Sha256::digest(&b[..CHECK_AT]), 0)
}

impl Config {
    /// Whether the manager is reached over UART0 rather than TCP.
    pub fn serial(&self) -> bool {
        self.flags & FLAG_SERIAL != 0
    }

    /// Decodes a block (see the module docs for the layout).
    pub fn decode(b: &[u8; CONFIG_LEN]) -> Result<Config, ConfigError> {
        if &b[..8] != CONFIG_MAGIC {
            return Err(ConfigError::Missing);
        }
        if b[CHECK_AT..] != checksum(b) {
            return Err(ConfigError::BadChecksum);
        }
        let root_count = b[187];
        let root_threshold = b[383];
        if root_count > 4 || root_threshold > root_count || (root_count > 0 && root_threshold == 0)
        {
            return Err(ConfigError::BadField);
        }
        let mut roots = [[0u8; 32]; 4];
        for (i, p) in roots.iter_mut().enumerate() {
            *p = take(b, 188 + 32 * i);
        }
        Ok(Config {
            seed: take(b, 8),
            manager_key: take(b, 40),
            ip: take(b, 72),
            prefix: b[76],
            gateway: take(b, 77),
            manager_ip: take(b, 81),
            manager_port: u16::from_le_bytes(take(b, 85)),
            listen_port: u16::from_le_bytes(take(b, 87)),
            id: take_str(b, 89)?,
            token: take_str(b, 122)?,
            roots,
            root_count,
            root_threshold,
            site: take_str(b, 316)?,
            segment: take_str(b, 349)?,
            flags: b[382],
        })
    }

    /// Encodes the block, checksum included (used by the host tool).
    #[cfg_attr(target_os = "none", allow(dead_code))]
    pub fn encode(&self) -> [u8; CONFIG_LEN] {
        let mut b = [0u8; CONFIG_LEN];
        b[..8].copy_from_slice(CONFIG_MAGIC);
        b[8..40].copy_from_slice(&self.seed);
        b[40..72].copy_from_slice(&self.manager_key);
        b[72..76].copy_from_slice(&self.ip);
        b[76] = self.prefix;
        b[77..81].copy_from_slice(&self.gateway);
        b[81..85].copy_from_slice(&self.manager_ip);
        b[85..87].copy_from_slice(&self.manager_port.to_le_bytes());
        b[87..89].copy_from_slice(&self.listen_port.to_le_bytes());
        put_str(&mut b, 89, &self.id);
        put_str(&mut b, 122, &self.token);
        b[187] = self.root_count.min(4);
        for (i, p) in self.roots.iter().enumerate() {
            b[188 + 32 * i..220 + 32 * i].copy_from_slice(p);
        }
        put_str(&mut b, 316, &self.site);
        put_str(&mut b, 349, &self.segment);
        b[382] = self.flags;
        b[383] = self.root_threshold;
        let c = checksum(&b);
        b[CHECK_AT..].copy_from_slice(&c);
        b
    }
}
