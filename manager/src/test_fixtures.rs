//! Values the unit tests of several modules build alike (compiled for tests only; below
//! every other module, so any of them may use it).

use baton_protocol::message::Report;
use baton_protocol::types::{AgentId, LinkInfo};

/// A small agent's first report: not serving, no site or segment, performance 10,
/// 16 MiB free, 4 KiB chunks, one source.
pub(crate) fn report(id: AgentId) -> Report {
    Report {
        id,
        listen: None,
        site: heapless::String::new(),
        segment: heapless::String::new(),
        performance: 10,
        free_storage: 1 << 24,
        can_serve: false,
        max_chunk: 4096,
        max_sources: 1,
        max_peers: 0,
        link: LinkInfo::default(),
        delays: heapless::Vec::new(),
        labels: heapless::Vec::new(),
        holdings: heapless::Vec::new(),
    }
}
