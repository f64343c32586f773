//! The `baton` package's end-to-end tests on loopback, in one test binary: real
//! `baton serve` and `baton agent` processes, the client commands, fake agents
//! and a real browser. One binary links once (each would link tokio, axum and
//! rusqlite); its tests run on parallel threads, as tests in one file always did.
//!
//! The tests that need network namespaces (`segments.rs`) or hold a timing bound
//! that other tests' load could break (`segment_agents.rs`) stay separate binaries.

mod common;

mod attacks;
mod audit;
mod browser;
mod config;
mod fault_speed;
mod faults;
mod files;
mod flood;
mod groups;
mod hostile;
mod install;
mod loadgen;
mod postgres;
mod push;
mod revocation;
mod roles;
mod rollout;
mod serve;
mod standby;
mod trust;
mod web;
mod window;
