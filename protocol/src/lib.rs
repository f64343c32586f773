//! Baton's wire protocol, shared by every participant.
//!
//! This crate is the bottom layer of Baton: it knows how bytes look on the
//! wire and nothing about sockets, clocks or files. It is `no_std` and does not
//! allocate (the `alloc` feature adds a few heap-backed helpers for the std
//! side), so the same code runs on a Cortex-M3 device and on a Linux server.
//!
//! - [`message`]: every message exchanged after a session is established
//!   (reports, instructions, confirmations, chunk requests and responses).
//! - [`manifest`]: what identifies content, signed by a publisher key.
//! - [`merkle`]: chunk hashes, the Merkle root and per-chunk proofs, so a chunk
//!   can be verified with a few hundred bytes of RAM whatever the content size.
//! - [`identity`]: Ed25519 identities, their X25519 form for the handshake, and
//!   the manager-signed certificates that let two agents trust each other.
//! - [`trust`]: the root-signed trust document naming the publisher keys and their names.
//! - [`revocation`]: the manager-signed list of revoked agent certificates.
//! - [`session`]: the mutually authenticated Noise XX handshake and the
//!   encrypted transport that follows it.
//! - [`discovery`]: the signed UDP datagrams of segment discovery and leader election.
//! - [`frame`]: length-prefixed framing for streams and COBS framing for serial.
//!
//! `SPEC.md` beside this crate lists every message, field and limit.

#![no_std]
#![warn(missing_docs)]

#[cfg(feature = "alloc")]
extern crate alloc;

pub mod discovery;
pub mod frame;
pub mod identity;
pub mod manifest;
pub mod merkle;
pub mod message;
pub mod revocation;
pub mod session;
pub mod trust;
pub mod types;

pub use manifest::Manifest;
pub use message::Message;
pub use types::*;

/// Version of the protocol spoken by this build; exchanged in the handshake.
pub const PROTOCOL_VERSION: u16 = 1;

/// Capability bits a side announces in its handshake [`session::Hello`].
pub mod caps {
    /// Speaks the relay protocol of version 1 (chunks with Merkle proofs).
    pub const RELAY_V1: u32 = 1 << 0;
    /// Can serve chunks to peers (has a listener).
    pub const SERVE: u32 = 1 << 1;
    /// Talks over a serial link (COBS framing) rather than a stream socket.
    pub const SERIAL: u32 = 1 << 2;
    /// Everything this build understands.
    pub const ALL: u32 = RELAY_V1 | SERVE | SERIAL;
}

/// Largest chunk a manifest may declare (bytes). Fits one Noise message with its proof.
pub const MAX_CHUNK_SIZE: u32 = 32 * 1024;
/// Smallest chunk a manifest may declare (bytes).
pub const MIN_CHUNK_SIZE: u32 = 256;
/// Largest content length (bytes): chunk offsets must fit the `u32` flash address space.
pub const MAX_CONTENT_LEN: u64 = 3 * 1024 * 1024 * 1024;
/// Largest encrypted frame on any link (a Noise message), in bytes.
pub const MAX_FRAME: usize = 65_535;
/// Largest plaintext inside one frame: [`MAX_FRAME`] less the 16-byte AEAD tag.
pub const MAX_PLAINTEXT: usize = MAX_FRAME - 16;
