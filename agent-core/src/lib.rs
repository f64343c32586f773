//! Baton's agent: the participant that fetches, verifies, stores and relays content.
//!
//! The core of this crate is `no_std` and allocation-free: a sans-IO state
//! machine that is fed connection events, decrypted frames and timer expiries,
//! and that hands back frames to send, events and the next deadline. The same
//! core runs on a Cortex-M3 (driven by embassy) and on Linux (driven by tokio
//! under the `std` feature, see `linux`).
//!
//! - [`agent`]: the state machine (SPEC.md §5): reports, manifest checks,
//!   windowed fetching from the manager and peers, verification before
//!   storing, progress and confirmation, cut-through serving, resume.
//! - [`revocation`]: the checks of revoked and expired peer certificates, revocation
//!   lists and renewed certificates, shared by every driver.
//! - [`store`]: the [`store::ContentStore`] trait the agent stores through.
//! - [`flash`]: [`flash::FlashStore`], one content in a NOR flash partition,
//!   safe against power cuts (any `embedded_storage` NOR flash).
//! - [`records`]: [`records::RecordLog`], the agent's records (trust anchor,
//!   version per content name, latest time) in a small NOR flash area.
//! - [`trust_wire`]: decoding a signed trust document in place (small stack).
//! - `linux` (feature `std`): the link layer (secure framed TCP), rate
//!   limits, file-backed flash, the directory store, the tokio driver and the
//!   settings of the `baton-agent` binary.

#![cfg_attr(not(feature = "std"), no_std)]
#![warn(missing_docs)]

#[cfg(feature = "std")]
pub mod linux;

pub mod agent;
pub mod flash;
pub mod inbound;
pub mod records;
pub mod revocation;
pub mod segment;
pub mod store;
pub mod trust_wire;
