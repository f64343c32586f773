//! The Linux side of the agent (feature `std`): link layer, rate limits,
//! sizes, data directories, file-backed flash, the directory store and the
//! tokio driver, the install steps past delivery ([`install`]), and the admission caps of
//! listeners.
//!
//! Everything here is IO around the sans-IO [`crate::agent::Agent`]; no
//! protocol decisions are made in this module. The manager reuses the link
//! layer, the rate limits, the admission caps ([`admission`]), the spaced
//! warnings ([`spaced`]) and the data directory rules ([`datadir`]).

pub mod admission;
pub mod args;
pub mod datadir;
pub mod discovery;
pub mod driver;
pub mod flash;
pub mod install;
pub mod link;
pub mod meter;
pub mod rate;
pub mod size;
pub mod spaced;
pub mod store;

pub use args::AgentArgs;
pub use driver::{AgentRunError, run};
