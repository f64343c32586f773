//! The Baton manager server: the IO around the sans-IO core (`baton-manager-core`).
//!
//! Layers, from the bottom up; a module imports only modules below it:
//! - [`roles`]: what each role may do (the one table of routes and roles);
//! - [`store`]: the database behind the [`store::Store`] trait (SQLite by
//!   default); one list of migrations owns every table;
//! - [`lease`]: several managers on one PostgreSQL database: the lease kept by the
//!   active one, waited for by the standbys;
//! - [`content`]: the manager's keys, publishing files and serving their chunks;
//! - [`trust`]: key and trust document files, the chain of root-signed trust
//!   documents, and the checks a manifest passes before it is published;
//! - [`registry`]: enrolled agents and live sessions, handshake authorization,
//!   segment reports;
//! - [`audit`]: recording changes in the audit log (used by [`http`] and `baton admin`);
//! - [`engine_task`]: the task that owns the engine: persists, then instructs;
//! - [`agent_port`]: the TCP agent port, one handler per connection;
//!   [`serial`]: serial-attached devices, handed to the same handler;
//! - [`service`]: [`service::Manager`], what the HTTP API asks of the manager:
//!   publishing, jobs, groups and policies, reading the database;
//! - [`http`]: the HTTP server: the JSON API under `/api/v1` and its OpenAPI
//!   document, the administrators' part, `/metrics`, HTTPS, the web UI;
//! - [`serve`]: everything above wired together, as `baton serve` runs it.

#![warn(missing_docs)]

pub mod agent_port;
pub mod audit;
pub mod content;
pub mod engine_task;
pub mod http;
pub mod lease;
pub mod registry;
pub mod revocation;
pub mod roles;
pub mod serial;
pub mod serve;
pub mod service;
pub mod store;
#[cfg(test)]
mod test_fixtures;
pub mod trust;
