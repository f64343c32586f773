//! `baton-sim`: a deterministic discrete-event simulator of a Baton fleet.
//!
//! It runs the *real* sans-IO agent state machines (`baton-agent-core`, built
//! without `std`) and the *real* manager sessions, engine and planner
//! (`baton-manager-core`) in one process, under a simulated clock and a
//! modelled network, so that a whole fleet — up to tens of thousands of agents
//! — can be distributed to in seconds of wall time, replayed exactly from a
//! seed, and put through faults with invariants checked after every event.
//!
//! - [`scenario`] — the fleet, its links and faults, what the agents declare
//!   of their rates (true, unknown or wrong) and mid-job upload changes, drawn
//!   from a seed.
//! - [`queue`] — the event queue (a radix heap over simulated time).
//! - [`net`] — the link model (per-node upload/download FIFO ports, WAN links in
//!   front of segments, latency, partitions).
//! - [`content`] — the ground-truth content (real 256-byte chunks, real Merkle
//!   proofs, a signed manifest) and its virtual size.
//! - [`store`] — a RAM [`ContentStore`](baton_agent_core::store::ContentStore)
//!   that checks every write against the truth.
//! - [`simulation`] — the Baton run itself — agents, manager, faults, invariants.
//! - [`strategies`] — the baselines (`unicast`, `chain_whole_file`, `binomial`)
//!   as simple schedulers over the same link model, with their closed forms.
//! - [`report`] — metrics (makespan, percentiles, the Kumar–Ross bound and
//!   ratios) and the JSON summary.
//! - [`sweep`] — seed sweeps with faults; a failing seed replays from
//!   `BATON_SIM_SEED`.
//!
//! What is modelled rather than real (details in [`simulation`], [`net`], [`content`]):
//!
//! - the Noise handshake and encryption are skipped: a connection is up 1.5
//!   round trips after it is asked for, and carries the real plaintext frames
//!   in order;
//! - a chunk is 256 real bytes, hashed and Merkle-verified by the agent, but
//!   the link model charges it at its *virtual* size (content size / chunks),
//!   so 32 MiB of content costs the simulator 256 KiB of hashing;
//! - the rates an agent declares (its `LinkInfo`) may differ from the rates
//!   its ports serve at (`--rates blind|wrong`, `--rate-change`); the bound
//!   `T*` always uses the true ones;
//! - links are FIFO ports (upload, download, WAN) with latency; loss delays a
//!   frame (and those behind it on its connection) by a retransmission timeout;
//!   a dropped frame breaks its connection (TCP) or, with serial semantics,
//!   breaks the session at the next frame; a partition holds frames until it
//!   heals and breaks connections that outlive the TCP user timeout;
//! - crashes keep the agent's store (a restart is a new `Agent` over it); the
//!   manager keeps the engine's persisted records (a restart is a new `Engine`
//!   with the next epoch that resumes the job from them).
//!
//! Soak (many more seeds than CI runs, in a release build):
//!
//! ```text
//! cargo run --release -p baton-sim -- --sweep 100000
//! BATON_SIM_SEED=1234 cargo run --release -p baton-sim -- --sweep 1   # replay one seed
//! ```

#![warn(missing_docs)]

pub mod content;
pub mod net;
pub mod queue;
pub mod report;
pub mod scenario;
pub mod simulation;
pub mod store;
pub mod strategies;
pub mod sweep;
pub mod units;
