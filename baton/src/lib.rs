//! The `baton` package's library part: the network lab.
//!
//! The `baton` command (`src/main.rs`, with its `cli` and `demo` modules) runs
//! the manager, the agent and the clients; what it shares with this package's
//! tests is [`lab`]: network namespaces with shaped and delayed links, on which
//! `baton demo --segments` and `baton lab` run whole fleets.

#![warn(missing_docs)]

pub mod lab;
