//! Segment discovery reports: checking and assembling the pages a segment's
//! leader sends (claims 7, 11).
//!
//! A leader sends `Message::SegmentReport` over its own manager session, in
//! pages of at most four members that share one `term`. [`Assembler`] refuses
//! a page whose `leader` is not the session's agent or whose segment is not
//! the one that agent reported itself in, keeps the pages of the newest term
//! of each leader, and hands back the whole report once every page arrived.
//! The caller stores it (replacing the segment's earlier view) with
//! the store's `replace_segment`. The assembler holds no clock:
//! the caller passes `now_ms`.

use std::collections::HashMap;

use baton_protocol::message::{SegmentMember, SegmentReport};
use baton_protocol::types::{AgentId, DelayTo};

use crate::records::{DelayRecord, LinkRecord, MemberRecord, SegmentRecord};

/// Most pages one report may have (4 members each: 4096 members).
pub const MAX_PAGES: u16 = 1024;
/// Most reports being assembled at once (one per leader); the oldest is dropped beyond.
pub const MAX_PENDING: usize = 256;

/// Why a segment report page was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    /// The page names a leader other than the agent whose session carried it.
    #[error("page names leader {claimed:?}, but came from agent {session:?}")]
    NotTheLeader {
        /// The agent of the session.
        session: String,
        /// The leader the page names.
        claimed: String,
    },
    /// The page is for a segment other than the one its sender reported itself in.
    #[error("page is for segment {claimed:?}, but its sender reported segment {reported:?}")]
    OtherSegment {
        /// The segment the sender reported (empty if it reported none).
        reported: String,
        /// The segment the page names.
        claimed: String,
    },
    /// `page`/`pages` are out of range.
    #[error("page {page} of {pages} is out of range (1 ..= {MAX_PAGES} pages)")]
    BadPage {
        /// The page index.
        page: u16,
        /// The page count.
        pages: u16,
    },
    /// A page of an older term than the one being assembled, or already stored.
    #[error("term {term} is older than term {newest} of this leader")]
    Stale {
        /// The page's term.
        term: u32,
        /// The newest term seen from this leader.
        newest: u32,
    },
}

/// The pages received so far of one leader's report.
#[derive(Debug)]
struct Pending {
    term: u32,
    pages: Vec<Option<Vec<SegmentMember>>>,
    started_ms: u64,
}

/// Assembles paged segment reports, one report per (segment, leader) at a time.
#[derive(Debug, Default)]
pub struct Assembler {
    pending: HashMap<(String, AgentId), Pending>,
    /// The newest complete term of each (segment, leader), to drop repeats and old pages.
    completed: HashMap<(String, AgentId), u32>,
}

impl Assembler {
    /// An assembler with nothing pending.
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes one page that `session` sent; `reported_segment` is the segment that agent named
    /// in its latest `Report`. Returns the members of the whole report once its last page
    /// arrived.
    pub fn handle_page(
        &mut self,
        session: &AgentId,
        reported_segment: Option<&str>,
        page: SegmentReport,
        now_ms: u64,
    ) -> Result<Option<Vec<SegmentMember>>, Refusal> {
        if page.leader != *session {
            return Err(Refusal::NotTheLeader {
                session: session.to_string(),
                claimed: page.leader.to_string(),
            });
        }
        let reported = reported_segment.unwrap_or("");
        if reported.is_empty() || reported != page.segment.as_str() {
            return Err(Refusal::OtherSegment {
                reported: reported.to_string(),
                claimed: page.segment.to_string(),
            });
        }
        if page.pages == 0 || page.pages > MAX_PAGES || page.page >= page.pages {
            return Err(Refusal::BadPage {
                page: page.page,
                pages: page.pages,
            });
        }
        let key = (page.segment.to_string(), page.leader.clone());
        if let Some(&done) = self.completed.get(&key)
            && page.term <= done
        {
            return Err(Refusal::Stale {
                term: page.term,
                newest: done,
            });
        }
        let fresh = |term| Pending {
            term,
            pages: vec![None; page.pages as usize],
            started_ms: now_ms,
        };
        if !self.pending.contains_key(&key) && self.pending.len() >= MAX_PENDING {
            self.drop_oldest();
        }
        let entry = self
            .pending
            .entry(key.clone())
            .or_insert_with(|| fresh(page.term));
        if page.term < entry.term {
            return Err(Refusal::Stale {
                term: page.term,
                newest: entry.term,
            });
        }
        if page.term > entry.term || entry.pages.len() != page.pages as usize {
            *entry = fresh(page.term);
        }
        entry.pages[page.page as usize] = Some(page.members.to_vec());
        if entry.pages.iter().any(Option::is_none) {
            return Ok(None);
        }
        let done = self.pending.remove(&key).expect("entry present");
        self.completed.insert(key, done.term);
        let mut members: Vec<SegmentMember> = done.pages.into_iter().flatten().flatten().collect();
        members.sort_by(|a, b| a.id.cmp(&b.id));
        members.dedup_by(|a, b| a.id == b.id);
        Ok(Some(members))
    }

    /// Forgets what `leader` sent (a new session: its term counter may start again).
    pub fn forget_leader(&mut self, leader: &AgentId) {
        self.pending.retain(|(_, l), _| l != leader);
        self.completed.retain(|(_, l), _| l != leader);
    }

    fn drop_oldest(&mut self) {
        if let Some(key) = self
            .pending
            .iter()
            .min_by_key(|(_, p)| p.started_ms)
            .map(|(k, _)| k.clone())
        {
            self.pending.remove(&key);
        }
    }
}

/// The stored form of one reported member; `known` says whether the manager enrolled it.
pub fn member_record(m: &SegmentMember, known: bool) -> MemberRecord {
    MemberRecord {
        id: m.id.to_string(),
        score: m.score,
        listen: m.listen.map(|a| a.to_string()),
        performance: m.performance,
        free_storage: m.free_storage,
        can_serve: m.can_serve,
        link: LinkRecord {
            up_bps: m.link.up_bps,
            down_bps: m.link.down_bps,
            loss_ppm: m.link.loss_ppm,
            uptime_s: m.link.uptime_s,
        },
        delays: m
            .delays
            .iter()
            .map(|d| DelayRecord {
                to: match &d.to {
                    DelayTo::Manager => None,
                    DelayTo::Peer(p) => Some(p.to_string()),
                },
                rtt_us: d.rtt_us,
            })
            .collect(),
        last_heard_ms: m.last_heard_ms,
        known,
    }
}

/// The stored form of a complete report.
pub fn segment_record(
    segment: &str,
    leader: &AgentId,
    term: u32,
    members: &[SegmentMember],
    now_ms: u64,
    is_known: impl Fn(&AgentId) -> bool,
) -> SegmentRecord {
    SegmentRecord {
        name: segment.to_string(),
        leader: leader.to_string(),
        term,
        reported_at_ms: now_ms,
        members: members
            .iter()
            .map(|m| member_record(m, is_known(&m.id)))
            .collect(),
    }
}

#[cfg(test)]
mod test {
    use super::*;
    use baton_protocol::types::{Delay, LinkInfo};

    fn id(s: &str) -> AgentId {
        AgentId::try_from(s).unwrap()
    }

    fn member(name: &str) -> SegmentMember {
        let mut delays = heapless::Vec::new();
        delays
            .push(Delay {
                to: DelayTo::Manager,
                rtt_us: 900,
            })
            .unwrap();
        SegmentMember {
            id: id(name),
            score: 10,
            listen: None,
            performance: 100,
            free_storage: 1 << 20,
            can_serve: true,
            link: LinkInfo::default(),
            delays,
            last_heard_ms: 5,
        }
    }

    fn page(leader: &str, term: u32, page: u16, pages: u16, names: &[&str]) -> SegmentReport {
        SegmentReport {
            segment: "lan-1".try_into().unwrap(),
            leader: id(leader),
            term,
            page,
            pages,
            members: names.iter().map(|n| member(n)).collect(),
        }
    }

    #[test]
    fn pages_of_one_term_assemble_in_any_order() {
        let mut a = Assembler::new();
        let l = id("l");
        let seg = Some("lan-1");
        assert_eq!(
            a.handle_page(&l, seg, page("l", 1, 1, 2, &["e", "f"]), 1),
            Ok(None)
        );
        let all = a
            .handle_page(&l, seg, page("l", 1, 0, 2, &["l", "b", "c", "d"]), 2)
            .unwrap()
            .unwrap();
        let ids: Vec<&str> = all.iter().map(|m| m.id.as_str()).collect();
        assert_eq!(ids, ["b", "c", "d", "e", "f", "l"]);
        // The same term again is a repeat.
        assert!(matches!(
            a.handle_page(&l, seg, page("l", 1, 0, 1, &["l"]), 3),
            Err(Refusal::Stale { .. })
        ));
    }

    #[test]
    fn a_newer_term_replaces_an_unfinished_one_and_older_pages_are_refused() {
        let mut a = Assembler::new();
        let l = id("l");
        let seg = Some("lan-1");
        assert_eq!(
            a.handle_page(&l, seg, page("l", 4, 0, 2, &["l"]), 1),
            Ok(None)
        );
        assert_eq!(
            a.handle_page(&l, seg, page("l", 5, 0, 2, &["l", "x"]), 2),
            Ok(None)
        );
        assert!(matches!(
            a.handle_page(&l, seg, page("l", 4, 1, 2, &["y"]), 3),
            Err(Refusal::Stale { term: 4, newest: 5 })
        ));
        let all = a
            .handle_page(&l, seg, page("l", 5, 1, 2, &["z"]), 4)
            .unwrap()
            .unwrap();
        assert_eq!(all.len(), 3);
    }

    #[test]
    fn wrong_leader_segment_or_page_numbers_are_refused() {
        let mut a = Assembler::new();
        let me = id("me");
        assert!(matches!(
            a.handle_page(&me, Some("lan-1"), page("other", 1, 0, 1, &["me"]), 1),
            Err(Refusal::NotTheLeader { .. })
        ));
        assert!(matches!(
            a.handle_page(&me, Some("lan-2"), page("me", 1, 0, 1, &["me"]), 1),
            Err(Refusal::OtherSegment { .. })
        ));
        assert!(matches!(
            a.handle_page(&me, None, page("me", 1, 0, 1, &["me"]), 1),
            Err(Refusal::OtherSegment { .. })
        ));
        for (p, n) in [(0, 0), (2, 2), (0, MAX_PAGES + 1)] {
            assert!(matches!(
                a.handle_page(&me, Some("lan-1"), page("me", 1, p, n, &["me"]), 1),
                Err(Refusal::BadPage { .. })
            ));
        }
        // Nothing refused was kept: a good one-page report completes at once.
        assert!(
            a.handle_page(&me, Some("lan-1"), page("me", 1, 0, 1, &["me"]), 2)
                .unwrap()
                .is_some()
        );
    }

    #[test]
    fn records_flag_unknown_members_and_name_the_manager_as_none() {
        let rec = segment_record("lan-1", &id("l"), 3, &[member("l"), member("q")], 77, |m| {
            m.as_str() == "l"
        });
        assert_eq!(rec.reported_at_ms, 77);
        assert!(rec.members[0].known);
        assert!(!rec.members[1].known);
        assert_eq!(rec.members[0].delays[0].to, None);
        assert_eq!(rec.members[0].delays[0].rtt_us, 900);
    }
}
