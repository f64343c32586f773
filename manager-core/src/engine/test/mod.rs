//! Engine tests: the engine driven by a deterministic fleet of fake agents.
//!
//! A fake agent obeys its instructions: it fetches missing chunks in index
//! order from the source the latest matching range names (the manager always
//! has them; a peer only those it verified at the start of the step,
//! cut-through), reports `Progress`, `Have` + `NextPlease` when complete,
//! `PeerTrouble` for a bad or unreachable peer, and `NextPlease` when it is
//! stuck. Time advances 100 ms per step; timers fire when due.
//!
//! This module holds the fake fleet; the tests are grouped by topic: [`flow`]
//! (a job's normal course), [`faults`] (sources and participants that fail,
//! bad input, chaos), [`lifecycle`] (restart, cancel), [`policy`] (the
//! policy's rules) and [`trouble`] (who may report a peer, and what it costs).

use std::collections::{BTreeMap, HashMap};

use baton_protocol::Manifest;
use baton_protocol::identity::Identity;
use baton_protocol::message::{
    FailReason, MAX_SOURCES_PER_MESSAGE, Message, Received, Report, Source, SourceRange, Trouble,
};
use baton_protocol::types::{AgentId, Digest, JobRef, LinkInfo, Name, PeerAddr};

use super::*;

mod faults;
mod flow;
mod install;
mod lifecycle;
mod policy;
mod retry;
mod rollout;
mod trouble;

const CHUNK: u32 = 1024;
const ROOT: Digest = [5; 32];
const STALL_STEPS: u32 = 30;

fn id(s: &str) -> AgentId {
    AgentId::try_from(s).unwrap()
}

fn manifest(chunks: u32) -> Manifest {
    Manifest::sign(
        &Identity::from_seed([7; 32]),
        heapless_name("fw"),
        1,
        0,
        chunks as u64 * CHUNK as u64,
        CHUNK,
        ROOT,
    )
}

fn heapless_name<T: for<'a> TryFrom<&'a str>>(s: &str) -> T {
    T::try_from(s).ok().unwrap()
}

fn config() -> EngineConfig {
    EngineConfig {
        give_up_after: Duration::from_secs(10),
        progress_flush: Duration::from_millis(500),
        manager_up_bps: 10_000_000,
        ..EngineConfig::default()
    }
}

/// Everything the engine put out, in drain order.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
enum Output {
    Persist(Persist),
    Transmit(AgentId, Message<'static>),
    Event(EngineEvent),
}

#[derive(Debug)]
struct FakeAgent {
    id: AgentId,
    key: PublicKey,
    report: Report,
    online: bool,
    /// Serves corrupt chunks.
    bad: bool,
    job: Option<JobRef>,
    max_epoch: u32,
    have: Vec<bool>,
    sources: Vec<SourceRange>,
    next: Option<AgentId>,
    received: BTreeMap<Option<AgentId>, u64>,
    reported: Vec<AgentId>,
    /// Steps in which its effective source for a missing chunk was a peer it had reported.
    used_reported: u32,
    /// Peers whose `PeerTrouble` the engine has handled.
    troubled: Vec<AgentId>,
    /// Ranges naming a peer in `troubled` received afterwards.
    offered_troubled: u32,
    fetches: u32,
    done: u32,
    cancels: u32,
    confirmed_sent: bool,
    stalled: u32,
    /// When it last disconnected, and its longest time away so far.
    offline_since: Option<Duration>,
    longest_offline: Duration,
    /// Rate caps received with `Throttle`, in order.
    throttles: Vec<u64>,
}

impl FakeAgent {
    fn verified(&self) -> u32 {
        self.have.iter().filter(|&&h| h).count() as u32
    }

    fn complete(&self) -> bool {
        !self.have.is_empty() && self.have.iter().all(|&h| h)
    }

    /// The source the agent uses for chunk `idx`: the last range covering it, else the manager.
    fn source_for(&self, idx: u32) -> Source {
        self.sources
            .iter()
            .rev()
            .find(|r| r.first <= idx && idx < r.end)
            .map(|r| r.source.clone())
            .unwrap_or(Source::Manager)
    }
}

struct Fleet {
    engine: Engine,
    agents: Vec<FakeAgent>,
    by_id: HashMap<AgentId, usize>,
    now: Duration,
    log: Vec<Output>,
    /// What a store would hold: the latest state per participant.
    store: BTreeMap<AgentId, ParticipantState>,
    /// Log length once the first `PeerTrouble` was handled and its consequences drained.
    first_trouble: Option<usize>,
    /// Every `PeerTrouble` sent: the log length when it was handled, reporter and peer.
    troubles: Vec<(usize, AgentId, AgentId)>,
}

fn report(name: &str, serve: bool, up: u64, max_sources: u16, n: usize) -> Report {
    Report {
        id: id(name),
        listen: serve.then_some(PeerAddr::V4(
            [10, 0, (n / 250) as u8, (n % 250) as u8 + 1],
            7000,
        )),
        site: Name::try_from("lab").unwrap(),
        segment: Name::new(),
        performance: 100,
        free_storage: 1 << 30,
        can_serve: serve,
        max_chunk: 32 * 1024,
        max_sources,
        max_peers: 16,
        link: LinkInfo {
            up_bps: up,
            down_bps: 100_000_000,
            loss_ppm: 0,
            uptime_s: 1000,
        },
        delays: Default::default(),
        labels: Default::default(),
        holdings: Default::default(),
    }
}

impl Fleet {
    fn new(epoch: u32) -> Self {
        Fleet {
            engine: Engine::new(epoch, config()),
            agents: Vec::new(),
            by_id: HashMap::new(),
            now: Duration::from_secs(1),
            log: Vec::new(),
            store: BTreeMap::new(),
            first_trouble: None,
            troubles: Vec::new(),
        }
    }

    /// Adds a fake agent (not connected yet); returns its index.
    fn add(&mut self, name: &str, serve: bool, up: u64, max_sources: u16) -> usize {
        let n = self.agents.len();
        let mut seed = [0u8; 32];
        seed[..name.len()].copy_from_slice(name.as_bytes());
        self.agents.push(FakeAgent {
            id: id(name),
            key: Identity::from_seed(seed).public(),
            report: report(name, serve, up, max_sources, n),
            online: false,
            bad: false,
            job: None,
            max_epoch: 0,
            have: Vec::new(),
            sources: Vec::new(),
            next: None,
            received: BTreeMap::new(),
            reported: Vec::new(),
            used_reported: 0,
            troubled: Vec::new(),
            offered_troubled: 0,
            fetches: 0,
            done: 0,
            cancels: 0,
            confirmed_sent: false,
            stalled: 0,
            offline_since: None,
            longest_offline: Duration::ZERO,
            throttles: Vec::new(),
        });
        self.by_id.insert(id(name), n);
        n
    }

    /// `n` agents `a00`, `a01`, …: every fourth a leaf, the rest servers with mixed uploads.
    fn with_agents(epoch: u32, n: usize) -> Self {
        let mut fleet = Fleet::new(epoch);
        for i in 0..n {
            let serve = i % 4 != 3;
            let max_sources = if i % 5 == 4 { 2 } else { 8 };
            fleet.add(
                &format!("a{i:02}"),
                serve,
                1_000_000 * (1 + i as u64 % 3),
                max_sources,
            );
        }
        fleet
    }

    fn connect(&mut self, i: usize) {
        let a = &mut self.agents[i];
        a.online = true;
        if let Some(since) = a.offline_since.take() {
            a.longest_offline = a.longest_offline.max(self.now - since);
        }
        let (aid, key, report) = (a.id.clone(), a.key, a.report.clone());
        self.engine.agent_online(self.now, aid, key, report);
        self.drain();
    }

    fn connect_all(&mut self) {
        for i in 0..self.agents.len() {
            self.connect(i);
        }
    }

    fn disconnect(&mut self, i: usize) {
        self.agents[i].online = false;
        self.agents[i].offline_since = Some(self.now);
        let aid = self.agents[i].id.clone();
        self.engine.agent_offline(self.now, &aid);
        self.drain();
    }

    fn start(&mut self, job: u64, chunks: u32, targets: Targets, policy: Policy) {
        self.engine
            .start_job(
                self.now,
                JobSpec {
                    id: job,
                    manifest: manifest(chunks),
                    targets,
                    policy,
                },
            )
            .unwrap();
        self.drain();
    }

    /// The agents sent a `Fetch` or `Sources` naming `peer` as a source since log index `mark`.
    fn offered_since(&self, mark: usize, peer: &AgentId) -> Vec<AgentId> {
        self.log[mark..]
            .iter()
            .filter_map(|o| match o {
                Output::Transmit(
                    to,
                    Message::Fetch { sources, .. } | Message::Sources { sources, .. },
                ) if sources
                    .iter()
                    .any(|r| matches!(&r.source, Source::Peer { id, .. } if id == peer)) =>
                {
                    Some(to.clone())
                }
                _ => None,
            })
            .collect()
    }

    /// Drains the engine in the driver's order, delivering messages to the fake agents.
    fn drain(&mut self) {
        loop {
            let mut any = false;
            while let Some(p) = self.engine.poll_persist() {
                any = true;
                match &p {
                    Persist::Participant { agent, state, .. } => {
                        self.store.insert(agent.clone(), *state);
                    }
                    Persist::Progress { updates, .. } => {
                        for (agent, verified) in updates {
                            if let Some(ParticipantState::Fetching { .. }) = self.store.get(agent) {
                                self.store.insert(
                                    agent.clone(),
                                    ParticipantState::Fetching {
                                        verified: *verified,
                                    },
                                );
                            }
                        }
                    }
                    _ => {}
                }
                self.log.push(Output::Persist(p));
            }
            while let Some((to, msg)) = self.engine.poll_transmit() {
                any = true;
                self.deliver(&to, &msg);
                self.log.push(Output::Transmit(to, msg));
            }
            while let Some(e) = self.engine.poll_event() {
                any = true;
                self.log.push(Output::Event(e));
            }
            if !any {
                break;
            }
        }
    }

    fn deliver(&mut self, to: &AgentId, msg: &Message<'static>) {
        let a = &mut self.agents[self.by_id[to]];
        assert!(a.online, "message to offline agent {to}: {msg:?}");
        if let Message::Fetch { sources, .. } | Message::Sources { sources, .. } = msg {
            for r in sources {
                if let Source::Peer { id, .. } = &r.source
                    && a.troubled.contains(id)
                {
                    a.offered_troubled += 1;
                }
            }
        }
        match msg {
            Message::Fetch {
                job,
                manifest,
                sources,
                next,
            } => {
                if job.epoch < a.max_epoch {
                    return;
                }
                a.max_epoch = job.epoch;
                a.job = Some(*job);
                let chunks = manifest.chunks() as usize;
                if a.have.len() != chunks {
                    a.have = vec![false; chunks];
                }
                a.sources = sources.to_vec();
                a.next = next.clone();
                a.fetches += 1;
                a.confirmed_sent = false;
                a.stalled = 0;
            }
            Message::Sources { job, sources } => {
                assert!(sources.len() <= MAX_SOURCES_PER_MESSAGE);
                if a.job == Some(*job) {
                    a.sources.extend(sources.iter().cloned());
                }
            }
            Message::Throttle {
                job,
                max_bytes_per_second,
            } => {
                assert_eq!(a.job, Some(*job), "Throttle before Fetch");
                a.throttles.push(*max_bytes_per_second);
            }
            Message::Done { .. } => a.done += 1,
            Message::Cancel { .. } => {
                a.cancels += 1;
                a.job = None;
            }
            other => panic!("unexpected message to an agent: {other:?}"),
        }
    }

    fn send(&mut self, from: usize, msg: Message<'static>) {
        let aid = self.agents[from].id.clone();
        self.engine.handle_message(self.now, &aid, &msg).unwrap();
        if let Message::PeerTrouble { peer, .. } = &msg {
            // Everything drained from here on was produced knowing of the trouble.
            self.agents[from].troubled.push(peer.clone());
            self.first_trouble.get_or_insert(self.log.len());
            self.troubles.push((self.log.len(), aid, peer.clone()));
        }
        self.drain();
    }

    /// One tick: every online agent fetches up to `rate` chunks and reports; time advances.
    fn step(&mut self, rate: u32) {
        let have: Vec<Vec<bool>> = self.agents.iter().map(|a| a.have.clone()).collect();
        let online: Vec<bool> = self.agents.iter().map(|a| a.online).collect();
        let bad: Vec<bool> = self.agents.iter().map(|a| a.bad).collect();
        let mut outgoing: Vec<(usize, Message<'static>)> = Vec::new();
        for i in 0..self.agents.len() {
            let by_id = &self.by_id;
            let a = &mut self.agents[i];
            let Some(job) = a.job else { continue };
            if !a.online {
                continue;
            }
            if a.complete() {
                if !a.confirmed_sent {
                    a.confirmed_sent = true;
                    outgoing.push((i, Message::Have { job, root: ROOT }));
                    outgoing.push((i, Message::NextPlease { job }));
                }
                continue;
            }
            let chunks = a.have.len() as u32;
            if (0..chunks).any(|c| {
                !a.have[c as usize]
                    && matches!(a.source_for(c), Source::Peer { ref id, .. } if a.reported.contains(id))
            }) {
                a.used_reported += 1;
            }
            let mut got = 0;
            for c in 0..chunks {
                if got == rate {
                    break;
                }
                if a.have[c as usize] {
                    continue;
                }
                let from = match a.source_for(c) {
                    Source::Manager => None,
                    Source::Peer { id: peer, .. } => {
                        let p = by_id[&peer];
                        if a.reported.contains(&peer) {
                            continue;
                        }
                        if !online[p] {
                            a.reported.push(peer.clone());
                            outgoing.push((
                                i,
                                Message::PeerTrouble {
                                    job,
                                    peer,
                                    trouble: Trouble::Unreachable,
                                },
                            ));
                            continue;
                        }
                        if have[p].get(c as usize) != Some(&true) {
                            continue; // not there yet: cut-through, ask again later
                        }
                        if bad[p] {
                            a.reported.push(peer.clone());
                            outgoing.push((
                                i,
                                Message::PeerTrouble {
                                    job,
                                    peer,
                                    trouble: Trouble::BadChunk { index: c },
                                },
                            ));
                            continue;
                        }
                        Some(peer)
                    }
                };
                a.have[c as usize] = true;
                *a.received.entry(from).or_default() += CHUNK as u64;
                got += 1;
            }
            if got > 0 {
                a.stalled = 0;
                let received = std::mem::take(&mut a.received)
                    .into_iter()
                    .map(|(from, bytes)| Received { from, bytes })
                    .collect();
                outgoing.push((
                    i,
                    Message::Progress {
                        job,
                        verified: a.verified(),
                        received,
                    },
                ));
            } else {
                a.stalled += 1;
                if a.stalled >= STALL_STEPS {
                    a.stalled = 0;
                    outgoing.push((i, Message::NextPlease { job }));
                }
            }
        }
        for (i, msg) in outgoing {
            if self.agents[i].online {
                self.send(i, msg);
            }
        }
        self.now += Duration::from_millis(100);
        if self.engine.poll_timeout().is_some_and(|t| t <= self.now) {
            self.engine.handle_timeout(self.now);
            self.drain();
        }
    }

    fn finished(&self, job: u64) -> bool {
        self.log
            .iter()
            .any(|o| matches!(o, Output::Persist(Persist::JobFinished { job: j, .. }) if *j == job))
    }

    /// Steps until `job` is finished; panics after `max_steps`.
    fn run(&mut self, job: u64, rate: u32, max_steps: usize) -> usize {
        for n in 0..max_steps {
            if self.finished(job) {
                return n;
            }
            self.step(rate);
        }
        panic!(
            "job {job} not finished after {max_steps} steps: {:?}",
            self.engine.job_status(job)
        );
    }

    fn state(&self, job: u64, name: &str) -> ParticipantState {
        self.engine
            .job_status(job)
            .unwrap()
            .participants
            .iter()
            .find(|p| p.agent.as_str() == name)
            .unwrap()
            .state
    }

    fn messages_to(&self, name: &str) -> Vec<&Message<'static>> {
        self.log
            .iter()
            .filter_map(|o| match o {
                Output::Transmit(to, m) if to.as_str() == name => Some(m),
                _ => None,
            })
            .collect()
    }

    /// Every peer named as a source in any message to `name`.
    fn peers_offered_to(&self, name: &str) -> Vec<AgentId> {
        let mut out = Vec::new();
        for m in self.messages_to(name) {
            let ranges = match m {
                Message::Fetch { sources, .. } | Message::Sources { sources, .. } => sources,
                _ => continue,
            };
            for r in ranges {
                if let Source::Peer { id, .. } = &r.source {
                    out.push(id.clone());
                }
            }
        }
        out
    }

    fn events(&self) -> Vec<&EngineEvent> {
        self.log
            .iter()
            .filter_map(|o| match o {
                Output::Event(e) => Some(e),
                _ => None,
            })
            .collect()
    }
}
