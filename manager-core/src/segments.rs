//! Segment discovery reports: checking and assembling the pages a segment's
//! leader sends (claims 7, 11).
//!
//! A leader sends `Message::SegmentReport` over its own manager session, in
//! pages of at most four members that share one `term`. [`Assembler`] refuses
//! a page whose `leader` is not the session's agent or whose segment is not
//! the one that agent reported itself in, keeps the pages of the newest term
//! of each leader, and hands back the whole report once every page arrived.
//! It keeps at most one report in assembly per leader agent (a page of another
//! segment or a newer term from the same agent replaces that agent's own
//! pending report, never another's), drops a pending report
//! [`PENDING_EXPIRY_MS`] after its first page, and refuses a new leader's page
//! while [`MAX_PENDING`] other leaders' reports are being assembled.
//! The caller stores it (replacing the segment's earlier view) with
//! the store's `replace_segment`. The assembler holds no clock:
//! the caller passes `now_ms`.

use std::collections::HashMap;

use baton_protocol::message::{SegmentMember, SegmentReport};
use baton_protocol::types::{AgentId, DelayTo};

use crate::records::{DelayRecord, LinkRecord, MemberRecord, SegmentRecord};

/// Most pages one report may have (4 members each: 4096 members).
pub const MAX_PAGES: u16 = 1024;
/// Most reports being assembled at once (one per leader agent); a new leader's page is
/// refused beyond.
pub const MAX_PENDING: usize = 256;
/// A report still incomplete this long after its first page is dropped (milliseconds).
pub const PENDING_EXPIRY_MS: u64 = 30_000;

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
    /// [`MAX_PENDING`] other leaders' reports are being assembled.
    #[error("{MAX_PENDING} other leaders' reports are being assembled; try again later")]
    Busy,
}

/// The pages received so far of one leader's report.
#[derive(Debug)]
struct Pending {
    segment: String,
    term: u32,
    pages: Vec<Option<Vec<SegmentMember>>>,
    started_ms: u64,
}

/// Assembles paged segment reports, one report per leader agent at a time.
#[derive(Debug, Default)]
pub struct Assembler {
    pending: HashMap<AgentId, Pending>,
    /// The segment and newest complete term of each leader, to drop repeats and old pages.
    completed: HashMap<AgentId, (String, u32)>,
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
        let key = page.leader.clone();
        let segment = page.segment.as_str();
        if let Some((seg, done)) = self.completed.get(&key)
            && seg == segment
            && page.term <= *done
        {
            return Err(Refusal::Stale {
                term: page.term,
                newest: *done,
            });
        }
        self.expire(now_ms);
        if !self.pending.contains_key(&key) && self.pending.len() >= MAX_PENDING {
            return Err(Refusal::Busy);
        }
        let fresh = |term| Pending {
            segment: segment.to_string(),
            term,
            pages: vec![None; page.pages as usize],
            started_ms: now_ms,
        };
        let entry = self
            .pending
            .entry(key.clone())
            .or_insert_with(|| fresh(page.term));
        if entry.segment == segment && page.term < entry.term {
            return Err(Refusal::Stale {
                term: page.term,
                newest: entry.term,
            });
        }
        // Another segment (the agent reported a new one), a newer term or another page
        // count: the agent's own pending report is replaced.
        if entry.segment != segment
            || page.term > entry.term
            || entry.pages.len() != page.pages as usize
        {
            *entry = fresh(page.term);
        }
        entry.pages[page.page as usize] = Some(page.members.to_vec());
        if entry.pages.iter().any(Option::is_none) {
            return Ok(None);
        }
        let done = self.pending.remove(&key).expect("entry present");
        self.completed.insert(key, (done.segment, done.term));
        let mut members: Vec<SegmentMember> = done.pages.into_iter().flatten().flatten().collect();
        members.sort_by(|a, b| a.id.cmp(&b.id));
        members.dedup_by(|a, b| a.id == b.id);
        Ok(Some(members))
    }

    /// Forgets what `leader` sent (a new session: its term counter may start again).
    pub fn forget_leader(&mut self, leader: &AgentId) {
        self.pending.remove(leader);
        self.completed.remove(leader);
    }

    /// Reports being assembled now.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Drops the reports whose first page came [`PENDING_EXPIRY_MS`] or more before `now_ms`.
    fn expire(&mut self, now_ms: u64) {
        self.pending
            .retain(|_, p| now_ms < p.started_ms.saturating_add(PENDING_EXPIRY_MS));
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

    fn id(s: &str) -> AgentId {
        AgentId::try_from(s).unwrap()
    }

    /// A member heard at the manager in 900 µs, with a small score.
    fn member(name: &str) -> SegmentMember {
        SegmentMember {
            score: 10,
            performance: 100,
            free_storage: 1 << 20,
            ..crate::test_fixtures::member(name, &[])
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

    /// A page of `leader`'s report for `segment`.
    fn page_in(segment: &str, leader: &str, term: u32, p: u16, pages: u16) -> SegmentReport {
        SegmentReport {
            segment: segment.try_into().unwrap(),
            ..page(leader, term, p, pages, &[leader])
        }
    }

    #[test]
    fn an_agent_changing_its_segment_between_pages_keeps_one_pending_report_and_evicts_nobody() {
        let mut a = Assembler::new();
        // An honest leader's report waits for its second page.
        let honest = id("honest");
        assert_eq!(
            a.handle_page(&honest, Some("lan-1"), page("honest", 3, 0, 2, &["b"]), 0),
            Ok(None)
        );
        // A hostile agent reports a new segment before each page of a 1,024-page report.
        let hostile = id("hostile");
        for n in 0..1000u32 {
            let seg = format!("seg-{n}");
            let p = page_in(&seg, "hostile", 1, 0, MAX_PAGES);
            assert_eq!(
                a.handle_page(&hostile, Some(&seg), p, 1 + u64::from(n)),
                Ok(None)
            );
            assert_eq!(a.pending(), 2, "one pending report per agent");
        }
        assert_eq!(a.completed.len(), 0);
        // The honest leader's report completes with its second page.
        let all = a
            .handle_page(
                &honest,
                Some("lan-1"),
                page("honest", 3, 1, 2, &["c"]),
                2000,
            )
            .unwrap()
            .expect("the honest report was kept");
        assert_eq!(all.len(), 2);
        assert_eq!(a.pending(), 1);
    }

    #[test]
    fn a_new_leader_is_refused_while_the_pending_reports_are_full_and_evicts_nobody() {
        let mut a = Assembler::new();
        for n in 0..MAX_PENDING {
            let name = format!("l{n}");
            let p = page(&name, 1, 0, 2, &[&name]);
            assert_eq!(a.handle_page(&id(&name), Some("lan-1"), p, 10), Ok(None));
        }
        let late = id("late");
        assert_eq!(
            a.handle_page(&late, Some("lan-1"), page("late", 1, 0, 1, &["late"]), 20),
            Err(Refusal::Busy)
        );
        assert_eq!(a.pending(), MAX_PENDING);
        // Every earlier leader completes its report.
        for n in 0..MAX_PENDING {
            let name = format!("l{n}");
            let p = page(&name, 1, 1, 2, &["x"]);
            assert!(
                a.handle_page(&id(&name), Some("lan-1"), p, 30)
                    .unwrap()
                    .is_some()
            );
        }
        assert_eq!(a.pending(), 0);
    }

    #[test]
    fn a_pending_report_expires_after_thirty_seconds() {
        let mut a = Assembler::new();
        let l = id("l");
        let seg = Some("lan-1");
        assert_eq!(
            a.handle_page(&l, seg, page("l", 1, 0, 2, &["a"]), 1_000),
            Ok(None)
        );
        // Another leader's page just before the expiry keeps it.
        let o = id("o");
        let before = 1_000 + PENDING_EXPIRY_MS - 1;
        assert_eq!(
            a.handle_page(&o, seg, page("o", 1, 0, 2, &["o"]), before),
            Ok(None)
        );
        assert_eq!(a.pending(), 2);
        // At the expiry it is gone: its second page alone does not complete it.
        let at = 1_000 + PENDING_EXPIRY_MS;
        assert_eq!(
            a.handle_page(&l, seg, page("l", 1, 1, 2, &["b"]), at),
            Ok(None)
        );
        assert_eq!(
            a.pending(),
            2,
            "l's report started again with page 1; o's is kept"
        );
        // o's own report expires 30 s after its first page.
        let later = before + PENDING_EXPIRY_MS;
        assert_eq!(
            a.handle_page(&l, seg, page("l", 2, 0, 2, &["a"]), later),
            Ok(None)
        );
        assert_eq!(a.pending(), 1);
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
