//! The Baton manager: it ranks agents, instructs them, and records who holds what.
//!
//! Layers, from the inside out:
//! - [`engine`]: the sans-IO job state machine (claims 1, 3, 5): events in,
//!   instructions, persistence records and timers out. No sockets, no clock.
//! - [`planner`]: scores agents from their reports and the policy and builds
//!   the relay plan (claims 2, 4, 9).
//!
//! With the default `server` feature, the IO around them:
//! - [`store`]: the database (SQLite by default) behind the [`store::Store`] trait;
//! - [`content`]: the manager's keys, publishing files and serving their chunks;
//! - [`registry`]: enrolled agents and live sessions, handshake authorization;
//! - [`segments`]: checking and assembling leaders' segment discovery reports;
//! - [`admin_api`]: segments, content groups and named policies over HTTP;
//! - [`net`]: the TCP agent server and the task that drives the engine;
//! - [`serial`]: serial-attached devices (COBS-framed sessions over a UART);
//! - [`http`]: the HTTP server: the authenticated JSON API under `/api/v1`, its
//!   OpenAPI document, `/metrics`, HTTPS;
//! - [`web`]: the administrators' web UI, logins, sessions and API tokens;
//! - [`lab`]: network namespaces for demos and tests (segments, router, shaped and delayed links);
//! - [`server`]: everything above wired together, as `baton serve` runs it.

#![warn(missing_docs)]


pub mod admin_api;
pub mod content;
pub mod http;
pub mod net;
pub mod registry;
pub mod serial;
pub mod server;
pub mod store;
pub mod web;
