//! Where the administrator placed each agent: its segment and its highest election score.
//!
//! An agent's discovery claims are its own; the manager trusts only what the
//! administrator decided, or, until the administrator decides, what the agent
//! declared when it first reported after enrolment (a [`Placement`]).
//! The placement goes into the agent's certificate (`AgentCert.segment` and
//! `score`, capped by the manager's `max_election_score`), so its peers check
//! it too, and the manager uses it here to check segment reports:
//! [`authorize_page`] refuses a page whose leader is placed in another
//! segment, and drops the members placed in another segment and the delays
//! to peers placed elsewhere, before the page reaches report assembly.

use baton_protocol::discovery::capability_score;
use baton_protocol::message::{Report, SegmentReport};
use baton_protocol::types::{AgentId, DelayTo, Name};

/// The segment an agent is placed in and the highest election score it may claim.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    /// The segment (empty: none).
    pub segment: String,
    /// The highest election score (capped again by the manager's maximum when certified).
    pub score: u32,
}

impl Placement {
    /// The placement recorded at enrolment: the segment the agent declares in its first
    /// report, and the capability score of that report, capped at `max_score`.
    pub fn at_enrolment(report: &Report, max_score: u32) -> Self {
        Placement {
            segment: report.segment.to_string(),
            score: capability_score(
                report.can_serve,
                &report.link,
                report.performance,
                report.free_storage,
            )
            .min(max_score),
        }
    }

    /// The segment as the wire's name type (a stored name too long for it certifies none).
    pub fn segment_name(&self) -> Name {
        Name::try_from(self.segment.as_str()).unwrap_or_default()
    }

    /// The score a certificate carries: the placement's, capped at `max_score`.
    pub fn certified_score(&self, max_score: u32) -> u32 {
        self.score.min(max_score)
    }
}

/// Why a segment report page was refused before assembly.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PlacementRefusal {
    /// The leader is placed in another segment (or in none) than the page names.
    #[error("leader {leader} reports segment {claimed:?} but is placed in {placed:?}")]
    LeaderElsewhere {
        /// The leader.
        leader: String,
        /// The segment the page names.
        claimed: String,
        /// The segment the leader is placed in (empty: none).
        placed: String,
    },
}

/// What [`authorize_page`] removed from an accepted page.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Dropped {
    /// Members placed in another segment.
    pub members: usize,
    /// Delays to peers placed in another segment.
    pub delays: usize,
}

/// Checks a page against the placements before assembly: refuses it if its leader is not
/// placed in the page's segment; otherwise removes the members that are enrolled but
/// placed elsewhere, and the delays to such peers. `placed(id)` is `None` for an agent the
/// manager did not enrol (kept, and stored as unknown), else its placement's segment.
pub fn authorize_page(
    page: &mut SegmentReport,
    leader_placed: Option<&str>,
    placed: impl Fn(&AgentId) -> Option<String>,
) -> Result<Dropped, PlacementRefusal> {
    let claimed = page.segment.as_str();
    if leader_placed != Some(claimed) || claimed.is_empty() {
        return Err(PlacementRefusal::LeaderElsewhere {
            leader: page.leader.to_string(),
            claimed: claimed.to_string(),
            placed: leader_placed.unwrap_or("").to_string(),
        });
    }
    let elsewhere = |id: &AgentId| placed(id).is_some_and(|s| s != claimed);
    let mut dropped = Dropped::default();
    let before = page.members.len();
    page.members.retain(|m| !elsewhere(&m.id));
    dropped.members = before - page.members.len();
    for m in page.members.iter_mut() {
        let before = m.delays.len();
        m.delays.retain(|d| match &d.to {
            DelayTo::Manager => true,
            DelayTo::Peer(p) => !elsewhere(p),
        });
        dropped.delays += before - m.delays.len();
    }
    Ok(dropped)
}

#[cfg(test)]
mod test {
    use super::*;
    use crate::test_fixtures::member;
    use baton_protocol::message::SegmentMember;
    use baton_protocol::types::LinkInfo;

    fn id(s: &str) -> AgentId {
        AgentId::try_from(s).unwrap()
    }

    fn page(leader: &str, segment: &str, members: Vec<SegmentMember>) -> SegmentReport {
        SegmentReport {
            segment: segment.try_into().unwrap(),
            leader: id(leader),
            term: 1,
            page: 0,
            pages: 1,
            members: members.into_iter().collect(),
        }
    }

    /// Placements: l, a, b in lan-1; x in lan-2; u not enrolled.
    fn placed(id: &AgentId) -> Option<String> {
        match id.as_str() {
            "l" | "a" | "b" => Some("lan-1".into()),
            "x" => Some("lan-2".into()),
            _ => None,
        }
    }

    #[test]
    fn a_leader_placed_elsewhere_is_refused() {
        let mut p = page("x", "lan-1", vec![member("x", &[])]);
        assert_eq!(
            authorize_page(&mut p, Some("lan-2"), placed),
            Err(PlacementRefusal::LeaderElsewhere {
                leader: "x".into(),
                claimed: "lan-1".into(),
                placed: "lan-2".into(),
            })
        );
        // Nor unplaced, nor for the empty segment.
        let mut p = page("x", "lan-1", vec![]);
        assert!(authorize_page(&mut p, None, placed).is_err());
        let mut p = page("x", "", vec![]);
        assert!(authorize_page(&mut p, Some(""), placed).is_err());
    }

    #[test]
    fn members_and_delays_placed_elsewhere_are_dropped() {
        let mut p = page(
            "l",
            "lan-1",
            vec![
                member("l", &["a", "x"]),
                member("a", &["x", "u"]),
                member("x", &["a"]),
                member("u", &[]),
            ],
        );
        let dropped = authorize_page(&mut p, Some("lan-1"), placed).unwrap();
        assert_eq!(
            dropped,
            Dropped {
                members: 1,
                delays: 2
            }
        );
        let ids: Vec<&str> = p.members.iter().map(|m| m.id.as_str()).collect();
        assert_eq!(ids, ["l", "a", "u"], "x dropped, the unenrolled u kept");
        assert_eq!(p.members[0].delays.len(), 2, "manager and a");
        assert_eq!(p.members[1].delays.len(), 2, "manager and u");
    }

    #[test]
    fn the_enrolment_placement_is_the_first_report_capped() {
        let mut report = Report {
            id: id("a"),
            listen: None,
            site: Name::new(),
            segment: "lan-1".try_into().unwrap(),
            performance: 1000,
            free_storage: u64::MAX,
            can_serve: true,
            max_chunk: 1,
            max_sources: 1,
            max_peers: 1,
            link: LinkInfo {
                up_bps: u64::MAX,
                down_bps: u64::MAX,
                loss_ppm: 0,
                uptime_s: 0,
            },
            delays: heapless::Vec::new(),
            labels: heapless::Vec::new(),
            holdings: heapless::Vec::new(),
        };
        let max = baton_protocol::discovery::MAX_CAPABILITY_SCORE;
        assert_eq!(
            Placement::at_enrolment(&report, u32::MAX),
            Placement {
                segment: "lan-1".into(),
                score: max
            }
        );
        assert_eq!(Placement::at_enrolment(&report, 77).score, 77);
        report.can_serve = false;
        let p = Placement::at_enrolment(&report, u32::MAX);
        assert!(p.score < 1 << 24);
        assert_eq!(p.certified_score(5), 5);
        assert_eq!(p.segment_name().as_str(), "lan-1");
    }
}
