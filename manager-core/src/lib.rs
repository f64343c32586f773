//! The Baton manager's logic, without IO: what to decide, never how to carry it out.
//!
//! Everything here is a plain state machine or a pure function. Nothing opens a
//! socket, reads a clock, touches a file or a database: time comes in as a
//! value (`now`, the time since the driver's origin, as a [`core::time::Duration`]),
//! and what must happen outside comes back out as values to carry out. The
//! server (`baton-manager`) drives these parts over TCP, serial lines and
//! SQLite; the simulator (`baton-sim`) drives the same parts over modelled links.
//!
//! - [`engine`]: the job state machine: events in, instructions, records to
//!   persist and timers out.
//! - [`planner`]: scores agents from their reports and the policy and builds the
//!   relay plan.
//! - [`session`]: one agent connection's rules (first report, `Welcome`, where
//!   each message goes), driven per connection by the server and the simulator.
//! - [`segments`]: checks and assembles the pages of a segment leader's report.
//! - [`placement`]: the segment and election score the administrator placed each
//!   agent in (certified to its peers), and the check of report pages against them.
//! - [`definitions`]: content groups and named policies: names, policy fields, group members.
//! - [`records`]: the plain records the store keeps and the parts above exchange.
//! - [`login_limit`]: the back-off that slows password guessing.
//! - [`rate_limit`]: token buckets for the messages an agent session may send.

#![warn(missing_docs)]

pub mod definitions;
pub mod engine;
pub mod login_limit;
pub mod placement;
pub mod planner;
pub mod rate_limit;
pub mod records;
pub mod segments;
pub mod session;
#[cfg(test)]
mod test_fixtures;
