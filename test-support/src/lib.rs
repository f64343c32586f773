//! What Baton's tests share: the `baton` package's end-to-end tests and bench, and the
//! hardware-in-the-loop tests (`hil-tests`).
//!
//! Those tests run real processes — `baton serve`, `baton agent`, QEMU, chromedriver —
//! so they need the same few things, each kept here once:
//!
//! - [`process`]: a child as the leader of its own process group ([`Proc`]), stopped
//!   with SIGTERM then SIGKILL to the whole group, and cleaned up when dropped; a
//!   command run to completion within a time limit ([`run`]).
//! - [`wait`]: [`wait_for`], the one bounded polling loop, and log-file helpers.
//! - [`net`]: loopback ports free right now.
//! - [`netns`]: network namespaces named and cleaned up as the product's lab
//!   ([`baton::lab::netns`]) names them, so one stale clean-up removes both.
//! - [`manager`] and [`agent`]: `baton serve` and `baton agent` as processes, with the
//!   HTTP API calls the tests make. The executable is a parameter: only the `baton`
//!   package's own tests and benches know it (`env!("CARGO_BIN_EXE_baton")`).
//! - [`trust`]: a test fleet's root and publisher keys and its signed trust document
//!   ([`TrustKit`]), which managers and agents started here are given.
//! - [`webdriver`]: a small W3C WebDriver client for the browser tests.
//! - [`fake`]: agent ids and the plain report of tests that speak the agent protocol
//!   themselves.
//!
//! Not published; a dev-dependency of the packages whose tests use it.

#![warn(missing_docs)]

pub mod agent;
pub mod fake;
pub mod manager;
pub mod net;
pub mod netns;
pub mod process;
pub mod trust;
pub mod wait;
pub mod webdriver;

pub use agent::AgentProc;
pub use manager::Manager;
pub use net::{free_loopback_addr, free_tcp_port, free_udp_port};
pub use process::{Output, Proc, run};
pub use trust::TrustKit;
pub use wait::{read_text, tail, wait_for};

/// Deterministic pseudo-random content of `len` bytes (xorshift from `seed`).
pub fn pseudo_random(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).max(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn pseudo_random_content_is_reproducible() {
        assert_eq!(pseudo_random(64, 7), pseudo_random(64, 7));
        assert_ne!(pseudo_random(64, 7), pseudo_random(64, 8));
        assert_eq!(pseudo_random(1000, 1).len(), 1000);
    }
}
