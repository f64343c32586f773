//! `PeerTrouble`: who may report a peer, what retires it, and when a reporter is demoted.
//!
//! A fetcher's report costs the reported peer nothing unless the manager can
//! check it, so that one participant cannot disable relaying for a job
//! (issue 14, item 4). The rules, per job:
//!
//! 1. **Only an assigned fetcher is heard.** A report naming a peer that is
//!    neither among the peers named in the reporter's latest instruction
//!    (`Fetch`/`Sources`, recorded when built) nor among the last
//!    [`RECENT_PEERS`] other peers named in its earlier ones (it may still be
//!    fetching from them when it reports) is ignored with a debug line and
//!    counted as *unfounded* for the reporter
//!    ([`ParticipantStatus::unfounded_reports`](super::ParticipantStatus::unfounded_reports)).
//!    After a manager restart a resumed job starts with no such memory: reports
//!    about the peers of the plan before the restart are unfounded until the
//!    reporter is instructed again (they only cost the reporter its ban).
//! 2. **The reporter is routed around the peer at once** (it is never offered
//!    that peer again: [`RelayPlan::ban`](crate::planner::RelayPlan::ban));
//!    that changes nobody else's sources.
//! 3. **A peer is retired for everyone only on evidence.** `BadChunk`: when
//!    [`EVIDENCE`] distinct reporters (each assigned to it) accused it.
//!    `Unreachable`: when the peer is gone from the manager too (the manager's own
//!    observation). `Refused`: never (the reporter's ban only). The manager cannot
//!    check a chunk itself: the protocol carries no chunk back to it.
//! 4. **A reporter whose accusation is contradicted is demoted.** It is
//!    contradicted when another fetcher (itself not demoted nor an accuser) whose
//!    latest instruction has it fetch the accused chunk from the accused peer
//!    reports verified bytes from that peer after the accusation, while the peer
//!    is not retired on evidence (bytes of other chunks say nothing about that
//!    one, so they contradict nothing); a reporter that
//!    accuses more than [`MAX_ACCUSED`] distinct peers in a job is demoted too.
//!    A demoted participant no longer serves anyone in the job (retired as a
//!    source: a liar is not trusted to relay), its later accusations count for
//!    nothing (they still route it around the peer, which costs nobody else), and
//!    [`EngineEvent::ReporterDemoted`] names it. Accusations it made before it was
//!    demoted stand: a peer it accused needs one more reporter to be retired.
//!
//! Why accusations stand: the manager cannot tell a liar from an honest fetcher
//! that a peer served a bad chunk to while serving good ones to others (a peer
//! that is selectively malicious, or one with a chunk gone bad on its disk).
//! Withdrawing the demoted reporter's vote would let such a peer demote every
//! fetcher it sends a bad chunk to, one after the other, and never be retired; with
//! the vote kept, it costs at most one honest relay before the next report retires
//! it. The same holds when a bad peer has an accomplice claim verified bytes
//! from it. A single liar still cannot retire anyone; two colluding reporters
//! can retire a peer (the "two independent reporters agree" rule of the issue).
//!
//! Memory is bounded per participant and job: the peers of its latest
//! instruction (at most its source count) and [`RECENT_PEERS`] before, at most
//! [`MAX_ACCUSED`]` + 1` peers it accused, at most [`EVIDENCE`] accusers, a
//! counter and two flags.

use baton_protocol::message::Trouble;
use tracing::{debug, info, warn};

use super::{Ctx, EngineEvent, Job};

/// Distinct assigned reporters whose `BadChunk` reports retire a peer for everyone.
pub(super) const EVIDENCE: usize = 2;

/// Distinct peers a reporter may accuse of bad chunks in one job; one more demotes it.
pub(super) const MAX_ACCUSED: usize = 3;

/// Peers named in a participant's earlier instructions that its reports may still name
/// (the most recent ones), besides those of its latest instruction.
pub(super) const RECENT_PEERS: usize = 16;

/// What the engine keeps per participant to judge the reports it makes and those about it.
#[derive(Clone, Debug, Default)]
pub(super) struct Standing {
    /// Peers named as its sources in its latest instruction.
    told: Vec<u32>,
    /// The chunk ranges of its latest instruction, per peer: `(peer, first, end)`.
    told_ranges: Vec<(u32, u32, u32)>,
    /// Peers named in earlier instructions and not in the latest, oldest first (at most
    /// `RECENT_PEERS`): it may still have been fetching from them when it reported.
    recent: Vec<u32>,
    /// Reports it made naming a peer it was not assigned to.
    pub(super) unfounded: u32,
    /// Distinct peers it accused of bad chunks (at most `MAX_ACCUSED + 1`).
    accused: Vec<u32>,
    /// Distinct participants that accused it of a bad chunk, with the chunk each named
    /// (at most `EVIDENCE`).
    accusers: Vec<(u32, u32)>,
    /// Its reports no longer count and it serves nobody in this job.
    pub(super) demoted: bool,
    /// Retired for everyone on the evidence of `EVIDENCE` reporters.
    condemned: bool,
}

impl Standing {
    /// It was just told to fetch chunks `first..end` from `peer` for each `(peer, first,
    /// end)` of `ranges` (the peer ranges of one `Fetch`/`Sources` list).
    pub(super) fn told(&mut self, ranges: Vec<(u32, u32, u32)>) {
        let mut peers: Vec<u32> = Vec::new();
        for &(peer, _, _) in &ranges {
            if !peers.contains(&peer) {
                peers.push(peer);
            }
        }
        self.told_ranges = ranges;
        let old = std::mem::replace(&mut self.told, peers);
        self.recent.retain(|p| !self.told.contains(p));
        for p in old {
            if !self.told.contains(&p) {
                self.recent.retain(|&q| q != p);
                self.recent.push(p);
            }
        }
        if self.recent.len() > RECENT_PEERS {
            self.recent.drain(..self.recent.len() - RECENT_PEERS);
        }
    }

    /// Whether `peer` was named in its latest instruction or is among the recent others.
    pub(super) fn assigned(&self, peer: u32) -> bool {
        self.told.contains(&peer) || self.recent.contains(&peer)
    }

    /// Whether its latest instruction has it fetch chunk `index` from `peer`.
    fn fetches_from(&self, peer: u32, index: u32) -> bool {
        self.told_ranges
            .iter()
            .any(|&(p, first, end)| p == peer && (first..end).contains(&index))
    }
}

/// Why a reporter was demoted.
#[derive(Clone, Copy, Debug)]
enum Demotion {
    /// `by` verified bytes from `peer`, which it had accused.
    Contradicted { peer: u32, by: u32 },
    /// It accused more than `MAX_ACCUSED` distinct peers.
    TooMany,
}

impl Job {
    /// Participant `idx` reported `trouble` with participant `peer`.
    pub(super) fn on_trouble(
        &mut self,
        cx: &mut Ctx<'_>,
        job_id: u64,
        idx: u32,
        peer: u32,
        trouble: Trouble,
    ) {
        let (reporter, named) = (&self.parts[idx as usize], &self.parts[peer as usize]);
        if peer == idx || !reporter.standing.assigned(peer) {
            let unfounded = reporter.standing.unfounded.saturating_add(1);
            debug!(
                job = job_id,
                agent = %reporter.id,
                peer = %named.id,
                ?trouble,
                unfounded,
                "trouble report about a peer the reporter was not assigned to, ignored"
            );
            self.parts[idx as usize].standing.unfounded = unfounded;
            return;
        }
        debug!(job = job_id, agent = %reporter.id, peer = %named.id, ?trouble, "peer trouble");
        let plan = self.plan.as_mut().expect("running jobs have a plan");
        let mut changed = Vec::new();
        if plan.ban(idx, peer) {
            changed.push(idx);
        }
        match trouble {
            Trouble::BadChunk { index } => {
                changed.extend(self.accuse(cx, job_id, idx, peer, index))
            }
            // A peer still connected to the manager that one fetcher cannot reach is a path
            // or a queue on the way (handshakes and ARP time out behind seconds of queue on a
            // saturated link), not a dead peer: the ban above routes this fetcher around it.
            // Only a peer that is gone from the manager too stops serving everyone.
            Trouble::Unreachable if !self.parts[peer as usize].online => {
                let plan = self.plan.as_mut().expect("running jobs have a plan");
                changed.extend(plan.retire(peer, false))
            }
            _ => {}
        }
        self.resend_sources(cx, job_id, &changed);
    }

    /// `idx` (assigned to `peer`) accused it of a bad chunk `index`; returns the fetchers
    /// whose sources changed (the peer's, once the evidence is in; the reporter's, if it is
    /// demoted).
    fn accuse(
        &mut self,
        cx: &mut Ctx<'_>,
        job_id: u64,
        idx: u32,
        peer: u32,
        index: u32,
    ) -> Vec<u32> {
        let (reporter, accused) = (&self.parts[idx as usize], &self.parts[peer as usize]);
        if reporter.standing.demoted || accused.standing.condemned {
            debug!(
                job = job_id,
                agent = %reporter.id,
                peer = %accused.id,
                demoted = reporter.standing.demoted,
                "bad chunk report counts for nothing more"
            );
            return Vec::new();
        }
        let s = &mut self.parts[idx as usize].standing;
        if !s.accused.contains(&peer) {
            s.accused.push(peer);
        }
        if s.accused.len() > MAX_ACCUSED {
            return self.demote(cx, job_id, idx, Demotion::TooMany);
        }
        let accusers = &mut self.parts[peer as usize].standing.accusers;
        if !accusers.iter().any(|&(a, _)| a == idx) {
            accusers.push((idx, index));
        }
        if accusers.len() < EVIDENCE {
            return Vec::new();
        }
        let accused = &mut self.parts[peer as usize];
        accused.standing.condemned = true;
        info!(job = job_id, agent = %accused.id, reporters = EVIDENCE, "bad chunks confirmed by independent reporters: retired as a source");
        let plan = self.plan.as_mut().expect("running jobs have a plan");
        plan.retire(peer, true)
    }

    /// `idx` reported verified bytes from `source`: an open accusation of `source` about a
    /// chunk `idx` was told to fetch from it is contradicted, and its maker is demoted.
    /// Returns the fetchers whose sources changed.
    pub(super) fn verified_from(
        &mut self,
        cx: &mut Ctx<'_>,
        job_id: u64,
        idx: u32,
        source: u32,
    ) -> Vec<u32> {
        let accused = &self.parts[source as usize].standing;
        if accused.accusers.is_empty() || accused.condemned || source == idx {
            return Vec::new();
        }
        let witness = &self.parts[idx as usize].standing;
        if witness.demoted
            || !witness.assigned(source)
            || accused.accusers.iter().any(|&(a, _)| a == idx)
        {
            return Vec::new();
        }
        let mut changed = Vec::new();
        for (a, index) in accused.accusers.clone() {
            let witness = &self.parts[idx as usize].standing;
            if witness.fetches_from(source, index) && !self.parts[a as usize].standing.demoted {
                let why = Demotion::Contradicted {
                    peer: source,
                    by: idx,
                };
                changed.extend(self.demote(cx, job_id, a, why));
            }
        }
        changed
    }

    /// Demotes `idx`: its reports stop counting and it stops serving. Returns its fetchers.
    fn demote(&mut self, cx: &mut Ctx<'_>, job_id: u64, idx: u32, why: Demotion) -> Vec<u32> {
        self.parts[idx as usize].standing.demoted = true;
        let reason = match why {
            Demotion::Contradicted { peer, by } => format!(
                "its bad chunk report about {} was contradicted ({} verified chunks from it)",
                self.parts[peer as usize].id, self.parts[by as usize].id
            ),
            Demotion::TooMany => {
                format!("it reported bad chunks from more than {MAX_ACCUSED} peers")
            }
        };
        let agent = self.parts[idx as usize].id.clone();
        warn!(job = job_id, agent = %agent, "trouble reporter demoted: {reason}; it no longer relays and its reports no longer count");
        cx.out.events.push_back(EngineEvent::ReporterDemoted {
            job: job_id,
            agent,
            reason,
        });
        let plan = self.plan.as_mut().expect("running jobs have a plan");
        plan.retire(idx, true)
    }
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn a_reporter_is_assigned_to_its_latest_and_recent_peers_only() {
        let mut s = Standing::default();
        assert!(!s.assigned(0));
        let peers = |ps: &[u32]| ps.iter().map(|&p| (p, 0, 1)).collect::<Vec<_>>();
        s.told(peers(&[0, 1]));
        s.told(peers(&[1, 2]));
        // 0 left the list but is recent; 1 and 2 are current.
        assert!(s.assigned(0) && s.assigned(1) && s.assigned(2));
        for p in 3..3 + RECENT_PEERS as u32 {
            s.told(peers(&[p]));
        }
        // Each list pushed the previous one into the recent peers: 0 and 1, the oldest, are gone.
        assert!(!s.assigned(0) && !s.assigned(1));
        assert!(s.assigned(2 + RECENT_PEERS as u32));
        assert_eq!(s.recent.len(), RECENT_PEERS);
        // A peer named again is current, and listed once.
        s.told(peers(&[5]));
        s.told(peers(&[6]));
        assert_eq!(s.recent.iter().filter(|&&p| p == 5).count(), 1);
        assert!(s.recent.len() <= RECENT_PEERS);
    }

    #[test]
    fn a_witness_speaks_only_for_the_chunks_it_fetches_from_the_peer() {
        let mut s = Standing::default();
        s.told(vec![(3, 0, 10), (4, 10, 20), (3, 30, 40)]);
        assert!(s.fetches_from(3, 0) && s.fetches_from(3, 9) && s.fetches_from(3, 35));
        assert!(!s.fetches_from(3, 10) && !s.fetches_from(3, 20) && !s.fetches_from(4, 5));
        assert!(s.assigned(3) && s.assigned(4));
        // A new instruction replaces the ranges; the old peer stays assigned (recent).
        s.told(vec![(4, 0, 40)]);
        assert!(!s.fetches_from(3, 0) && s.fetches_from(4, 0));
        assert!(s.assigned(3));
    }
}
