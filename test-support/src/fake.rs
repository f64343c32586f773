//! Protocol values the tests' fake agents send: agent ids and a plain first report.
//!
//! A test that speaks the agent protocol itself (a rogue, a flooder, a fake agent)
//! starts from [`report`] and changes the fields it is about with struct update syntax.

use baton_protocol::message::Report;
use baton_protocol::types::{AgentId, LinkInfo};

/// The agent id `s` (a test's literal, so it must be valid).
pub fn id(s: &str) -> AgentId {
    AgentId::try_from(s).unwrap()
}

/// The report a fake agent sends after its handshake: site `test`, segment `loopback`,
/// not serving, no delays, labels or holdings.
pub fn report(agent: &str) -> Report {
    Report {
        id: id(agent),
        listen: None,
        site: "test".try_into().unwrap(),
        segment: "loopback".try_into().unwrap(),
        performance: 100,
        free_storage: 1 << 30,
        can_serve: false,
        max_chunk: 32 * 1024,
        max_sources: 4,
        max_peers: 0,
        link: LinkInfo::default(),
        delays: Default::default(),
        labels: Default::default(),
        holdings: Default::default(),
    }
}
