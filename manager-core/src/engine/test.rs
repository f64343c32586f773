//! Engine tests: the engine driven by a deterministic fleet of fake agents.
//!
//! A fake agent obeys its instructions: it fetches missing chunks in index
//! order from the source the latest matching range names (the manager always
//! has them; a peer only those it verified at the start of the step,
//! cut-through), reports `Progress`, `Have` + `NextPlease` when complete,
//! `PeerTrouble` for a bad or unreachable peer, and `NextPlease` when it is
//! stuck. Time advances 100 ms per step; timers fire when due.

use std::collections::{BTreeMap, HashMap};

use baton_protocol::identity::Identity;
use baton_protocol::types::{Digest, LinkInfo, Name, PeerAddr};

use super::*;

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

#[test]
fn persist_comes_before_any_fetch_and_large_source_lists_are_split() {
    let mut fleet = Fleet::new(1);
    for i in 0..41 {
        let n = fleet.add(&format!("s{i:02}"), true, 1_000_000, 64);
        fleet.agents[n].report.max_peers = 64;
    }
    fleet.connect_all();
    let policy = Policy {
        max_stripes: 40,
        max_peers_per_source: 0,
        ..Policy::default()
    };
    fleet
        .engine
        .start_job(
            fleet.now,
            JobSpec {
                id: 7,
                manifest: manifest(400),
                targets: Targets::All,
                policy,
            },
        )
        .unwrap();
    // Nothing leaves before the plan is stored.
    assert!(fleet.engine.poll_transmit().is_none());
    let first = fleet.engine.poll_persist().unwrap();
    match &first {
        Persist::JobStarted { job, epoch, order } => {
            assert_eq!((*job, *epoch, order.len()), (7, 1, 41));
        }
        other => panic!("first record {other:?}"),
    }
    assert!(fleet.engine.poll_transmit().is_none());
    fleet.drain();
    let first_transmit = fleet
        .log
        .iter()
        .position(|o| matches!(o, Output::Transmit(..)))
        .unwrap();
    let rows = fleet.log[..first_transmit]
        .iter()
        .filter(|o| matches!(o, Output::Persist(Persist::Participant { .. })))
        .count();
    assert_eq!(rows, 41, "every participant row precedes the first Fetch");
    // 40 stripes: a fetcher has far more than 16 ranges; they follow in Sources messages.
    let msgs = fleet.messages_to("s40");
    let Message::Fetch { sources, next, .. } = msgs[0] else {
        panic!("first message {:?}", msgs[0]);
    };
    assert_eq!(sources.len(), MAX_SOURCES_PER_MESSAGE);
    assert!(next.is_none() || next.as_ref() != Some(&id("s40")));
    assert!(matches!(msgs[1], Message::Sources { .. }));
    let a = &fleet.agents[40];
    let mut covered = vec![false; 400];
    for r in &a.sources {
        for c in r.first..r.end {
            covered[c as usize] = true;
        }
    }
    assert!(covered.iter().all(|&c| c));
    assert!(a.sources.len() > MAX_SOURCES_PER_MESSAGE);
}

#[test]
fn a_whole_job_for_20_agents_confirms_everyone_and_sends_done_once() {
    let mut fleet = Fleet::with_agents(1, 20);
    fleet.connect_all();
    fleet.start(1, 64, Targets::All, Policy::default());
    // Claim 3: each Fetch names the next participant on the list.
    let order = match &fleet.log[0] {
        Output::Persist(Persist::JobStarted { order, .. }) => order.clone(),
        other => panic!("{other:?}"),
    };
    for (n, agent) in order.iter().enumerate() {
        let a = &fleet.agents[fleet.by_id[agent]];
        assert_eq!(a.fetches, 1);
        assert_eq!(a.next.as_ref(), order.get(n + 1));
    }
    let steps = fleet.run(1, 4, 500);
    for a in &fleet.agents {
        assert!(a.complete(), "{} incomplete", a.id);
        assert_eq!(a.done, 1, "{} got Done {} times", a.id, a.done);
        assert_eq!(fleet.state(1, &a.id), ParticipantState::Confirmed);
        assert_eq!(fleet.store[&a.id], ParticipantState::Confirmed);
    }
    assert!(fleet.log.contains(&Output::Persist(Persist::JobFinished {
        job: 1,
        confirmed: 20,
        failed: 0
    })));
    assert!(fleet.events().contains(&&EngineEvent::JobFinished {
        job: 1,
        confirmed: 20,
        failed: 0
    }));
    // Relaying happened: peers carried bytes, the manager sent well under 20 copies.
    let mut from_manager = 0;
    let mut from_peers = 0;
    for o in &fleet.log {
        if let Output::Persist(Persist::SourceBytes { from, bytes, .. }) = o {
            match from {
                None => from_manager += bytes,
                Some(_) => from_peers += bytes,
            }
        }
    }
    let content = 64 * CHUNK as u64;
    assert_eq!(from_manager + from_peers, 20 * content);
    assert!(from_manager < 8 * content, "manager sent {from_manager}");
    // Progress is batched: at most one record per flush interval (500 ms = 5 steps) plus one.
    let progress = fleet
        .log
        .iter()
        .filter(|o| matches!(o, Output::Persist(Persist::Progress { .. })))
        .count();
    assert!(
        progress <= steps / 5 + 2,
        "{progress} progress records in {steps} steps"
    );
    assert!(progress >= 1);
    // No agent was told to fetch from a leaf.
    for a in &fleet.agents {
        for p in fleet.peers_offered_to(&a.id) {
            assert!(fleet.agents[fleet.by_id[&p]].report.can_serve);
        }
    }
    assert_eq!(fleet.engine.poll_timeout(), None);
}

#[test]
fn a_source_killed_mid_job_is_routed_around_and_given_up() {
    let mut fleet = Fleet::with_agents(1, 20);
    fleet.connect_all();
    fleet.start(1, 64, Targets::All, Policy::default());
    for _ in 0..3 {
        fleet.step(2);
    }
    // Kill the agent that serves the most fetchers.
    let victim = (0..20)
        .max_by_key(|&i| {
            let name = fleet.agents[i].id.clone();
            fleet
                .agents
                .iter()
                .filter(|a| {
                    a.sources
                        .iter()
                        .any(|r| matches!(&r.source, Source::Peer { id, .. } if *id == name))
                })
                .count()
        })
        .unwrap();
    let victim_id = fleet.agents[victim].id.clone();
    let mark = fleet.log.len();
    fleet.disconnect(victim);
    // Its fetchers got replacement sources right away.
    let resent = fleet.log[mark..]
        .iter()
        .filter(|o| matches!(o, Output::Transmit(_, Message::Sources { .. })))
        .count();
    assert!(resent > 0);
    fleet.run(1, 4, 500);
    for (i, a) in fleet.agents.iter().enumerate() {
        if i == victim {
            assert_eq!(a.done, 0);
            continue;
        }
        assert!(a.complete());
        assert_eq!(a.done, 1);
        assert_eq!(a.used_reported, 0);
        assert_eq!(a.offered_troubled, 0);
    }
    assert_eq!(
        fleet.state(1, &victim_id),
        ParticipantState::Failed(FailCause::GaveUp)
    );
    assert!(fleet.log.contains(&Output::Persist(Persist::JobFinished {
        job: 1,
        confirmed: 19,
        failed: 1
    })));
    assert!(fleet.events().iter().any(|e| matches!(e,
        EngineEvent::ParticipantFailed { agent, .. } if *agent == victim_id)));
}

#[test]
fn a_bad_chunk_source_is_never_offered_again() {
    let mut fleet = Fleet::with_agents(1, 12);
    fleet.agents[0].bad = true;
    let bad_id = fleet.agents[0].id.clone();
    fleet.connect_all();
    fleet.start(1, 48, Targets::All, Policy::default());
    for _ in 0..100 {
        if fleet.first_trouble.is_some() {
            break;
        }
        fleet.step(3);
    }
    assert!(
        fleet.first_trouble.is_some(),
        "nobody fetched from the bad agent"
    );
    // Once one fetcher reported it, nobody still fetching is left with it as a source.
    for a in &fleet.agents {
        for c in 0..48 {
            if !a.have[c as usize] {
                assert!(
                    !matches!(a.source_for(c), Source::Peer { ref id, .. } if *id == bad_id),
                    "{} still fetches chunk {c} from the bad agent",
                    a.id
                );
            }
        }
    }
    fleet.run(1, 3, 500);
    let first_report = fleet
        .agents
        .iter()
        .filter(|a| a.reported.contains(&bad_id))
        .count();
    assert!(first_report >= 1, "nobody fetched from the bad agent");
    for a in &fleet.agents {
        assert!(a.complete(), "{} incomplete", a.id);
        assert_eq!(a.used_reported, 0, "{} kept a reported source", a.id);
        assert_eq!(
            a.offered_troubled, 0,
            "{} was offered a reported source",
            a.id
        );
    }
    // Retired for everyone after the first report: nobody was offered it afterwards.
    let mark = fleet.first_trouble.unwrap();
    for o in &fleet.log[mark..] {
        if let Output::Transmit(
            to,
            Message::Fetch { sources, .. } | Message::Sources { sources, .. },
        ) = o
        {
            assert!(
                sources
                    .iter()
                    .all(|r| !matches!(&r.source, Source::Peer { id, .. } if *id == bad_id)),
                "{to} was offered the bad source after it was reported"
            );
        }
    }
    for a in &fleet.agents {
        let cur: Vec<_> = (0..48).map(|c| a.source_for(c)).collect();
        assert!(
            cur.iter()
                .all(|s| !matches!(s, Source::Peer { id, .. } if *id == bad_id))
        );
    }
    assert!(fleet.log.contains(&Output::Persist(Persist::JobFinished {
        job: 1,
        confirmed: 12,
        failed: 0
    })));
}

#[test]
fn a_target_that_never_comes_is_given_up_after_the_timeout() {
    let mut fleet = Fleet::with_agents(1, 4);
    fleet.add("ghost", true, 1_000_000, 8);
    for i in 0..4 {
        fleet.connect(i);
    }
    let targets = Targets::Agents(fleet.agents.iter().map(|a| a.id.clone()).collect());
    let start = fleet.now;
    fleet.start(1, 16, targets, Policy::default());
    assert_eq!(fleet.state(1, "ghost"), ParticipantState::Waiting);
    assert_eq!(fleet.store[&id("ghost")], ParticipantState::Waiting);
    assert_eq!(
        fleet.engine.poll_timeout(),
        Some(start + config().give_up_after)
    );
    // The others finish quickly; the job waits for the ghost's deadline.
    for _ in 0..20 {
        fleet.step(4);
    }
    assert!(!fleet.finished(1));
    fleet.run(1, 4, 200);
    assert_eq!(
        fleet.state(1, "ghost"),
        ParticipantState::Failed(FailCause::GaveUp)
    );
    assert!(fleet.now >= start + config().give_up_after);
    assert!(fleet.log.contains(&Output::Persist(Persist::JobFinished {
        job: 1,
        confirmed: 4,
        failed: 1
    })));
    assert!(fleet.messages_to("ghost").is_empty());
}

#[test]
fn late_joiners_are_included() {
    let mut fleet = Fleet::with_agents(1, 6);
    fleet.add("late-listed", true, 1_000_000, 8);
    fleet.add("late-any", true, 2_000_000, 8);
    for i in 0..6 {
        fleet.connect(i);
    }
    // Job 1 for everyone (All), job 2 for a list that includes an offline agent.
    fleet.start(1, 32, Targets::All, Policy::default());
    for _ in 0..3 {
        fleet.step(2);
    }
    fleet.connect(7); // "late-any": joins job 1 as a late participant
    assert_eq!(fleet.agents[7].fetches, 1);
    assert_eq!(
        fleet.state(1, "late-any"),
        ParticipantState::Fetching { verified: 0 }
    );
    fleet.run(1, 2, 500);
    assert_eq!(fleet.state(1, "late-any"), ParticipantState::Confirmed);
    assert!(fleet.log.contains(&Output::Persist(Persist::JobFinished {
        job: 1,
        confirmed: 7,
        failed: 0
    })));

    let mut fleet = Fleet::with_agents(1, 6);
    fleet.add("late-listed", true, 1_000_000, 8);
    for i in 0..6 {
        fleet.connect(i);
    }
    let targets = Targets::Agents(fleet.agents.iter().map(|a| a.id.clone()).collect());
    fleet.start(2, 32, targets, Policy::default());
    for _ in 0..3 {
        fleet.step(2);
    }
    fleet.connect(6);
    assert_eq!(fleet.agents[6].fetches, 1);
    fleet.run(2, 2, 500);
    assert_eq!(fleet.state(2, "late-listed"), ParticipantState::Confirmed);
    assert_eq!(fleet.agents[6].done, 1);
}

#[test]
fn an_agent_that_drops_and_returns_gets_a_fresh_fetch_and_resumes() {
    let mut fleet = Fleet::with_agents(1, 8);
    fleet.connect_all();
    fleet.start(1, 40, Targets::All, Policy::default());
    for _ in 0..4 {
        fleet.step(2);
    }
    let before = fleet.agents[2].verified();
    assert!(before > 0);
    fleet.disconnect(2);
    for _ in 0..5 {
        fleet.step(2);
    }
    assert_eq!(
        fleet.agents[2].verified(),
        before,
        "offline agents do not fetch"
    );
    fleet.connect(2);
    assert_eq!(fleet.agents[2].fetches, 2);
    let Message::Fetch { job, .. } = fleet.messages_to("a02").last().copied().unwrap() else {
        panic!("the last message is not a Fetch");
    };
    assert_eq!(job.epoch, 1);
    fleet.run(1, 2, 500);
    assert_eq!(fleet.state(1, "a02"), ParticipantState::Confirmed);
    assert_eq!(fleet.agents[2].done, 1);
}

#[test]
fn a_failed_participant_is_routed_around() {
    let mut fleet = Fleet::with_agents(1, 10);
    fleet.connect_all();
    fleet.start(1, 40, Targets::All, Policy::default());
    fleet.step(2);
    // The first on the list relays for others; it runs out of storage.
    let first = match &fleet.log[0] {
        Output::Persist(Persist::JobStarted { order, .. }) => order[0].clone(),
        other => panic!("{other:?}"),
    };
    let i = fleet.by_id[&first];
    let job = fleet.agents[i].job.unwrap();
    fleet.agents[i].job = None; // it stops working on the job
    let mark = fleet.log.len();
    fleet.send(
        i,
        Message::Failed {
            job,
            reason: FailReason::StorageFull,
        },
    );
    assert_eq!(
        fleet.state(1, &first),
        ParticipantState::Failed(FailCause::Agent(FailReason::StorageFull))
    );
    assert!(
        fleet.log[mark..]
            .iter()
            .any(|o| matches!(o, Output::Transmit(_, Message::Sources { .. })))
    );
    fleet.run(1, 2, 500);
    for a in &fleet.agents {
        if a.id != first {
            assert!(a.complete());
            let cur: Vec<_> = (0..40).map(|c| a.source_for(c)).collect();
            assert!(
                cur.iter()
                    .all(|s| !matches!(s, Source::Peer { id, .. } if *id == first))
            );
        }
    }
    assert!(fleet.log.contains(&Output::Persist(Persist::JobFinished {
        job: 1,
        confirmed: 9,
        failed: 1
    })));
}

#[test]
fn next_please_gets_more_sources_then_the_manager() {
    let mut fleet = Fleet::with_agents(1, 6);
    fleet.connect_all();
    fleet.start(1, 30, Targets::All, Policy::default());
    let i = 5;
    let job = fleet.agents[i].job.unwrap();
    let mark = fleet.log.len();
    fleet.send(i, Message::NextPlease { job });
    let sources: Vec<_> = fleet.log[mark..]
        .iter()
        .filter(|o| matches!(o, Output::Transmit(to, Message::Sources { .. }) if *to == fleet.agents[i].id))
        .collect();
    assert_eq!(sources.len(), 1);
    // Asked again without progress: everything from the manager.
    fleet.send(i, Message::NextPlease { job });
    assert!((0..30).all(|c| fleet.agents[i].source_for(c) == Source::Manager));
    // A confirmed agent asking gets nothing until the list is exhausted.
    fleet.agents[i].have = vec![true; 30];
    fleet.step(1);
    let mark = fleet.log.len();
    fleet.send(i, Message::NextPlease { job });
    assert!(
        fleet.log[mark..]
            .iter()
            .all(|o| !matches!(o, Output::Transmit(..)))
    );
}

#[test]
fn restart_resumes_with_a_new_epoch_and_ignores_the_old_one() {
    let mut fleet = Fleet::with_agents(1, 10);
    fleet.connect_all();
    fleet.start(1, 40, Targets::All, Policy::default());
    // Run until someone confirms, then the manager "crashes".
    for _ in 0..200 {
        if fleet
            .store
            .values()
            .any(|s| *s == ParticipantState::Confirmed)
        {
            break;
        }
        fleet.step(2);
    }
    let stored: Vec<(AgentId, ParticipantState)> = match &fleet.log[0] {
        Output::Persist(Persist::JobStarted { order, .. }) => {
            order.iter().map(|a| (a.clone(), fleet.store[a])).collect()
        }
        other => panic!("{other:?}"),
    };
    let confirmed: Vec<AgentId> = stored
        .iter()
        .filter(|(_, s)| *s == ParticipantState::Confirmed)
        .map(|(a, _)| a.clone())
        .collect();
    assert!(!confirmed.is_empty());
    assert!(confirmed.len() < 10);
    let spec = JobSpec {
        id: 1,
        manifest: manifest(40),
        targets: Targets::All,
        policy: Policy::default(),
    };

    // A new manager run: epoch 2. Agents keep their chunks and reconnect.
    let old_agents = std::mem::take(&mut fleet.agents);
    let mut fleet2 = Fleet::new(2);
    fleet2.by_id = fleet.by_id.clone();
    fleet2.agents = old_agents;
    fleet2.now = fleet.now + Duration::from_secs(5);
    for a in &mut fleet2.agents {
        a.online = false;
        a.fetches = 0;
    }
    fleet2.engine.resume_job(fleet2.now, spec, stored.clone());
    fleet2.drain();
    match &fleet2.log[0] {
        Output::Persist(Persist::JobStarted { epoch, order, .. }) => {
            assert_eq!(*epoch, 2);
            assert_eq!(order.len(), 10);
        }
        other => panic!("{other:?}"),
    }
    fleet2.connect_all();
    for a in &fleet2.agents {
        if confirmed.contains(&a.id) {
            assert_eq!(a.fetches, 0, "{} was confirmed and needs no Fetch", a.id);
            assert_eq!(fleet2.state(1, &a.id), ParticipantState::Confirmed);
        } else {
            assert_eq!(a.fetches, 1);
            assert_eq!(a.job.unwrap().epoch, 2);
        }
    }
    // A message from the old epoch changes nothing.
    let laggard = fleet2
        .agents
        .iter()
        .position(|a| !confirmed.contains(&a.id))
        .unwrap();
    let lag_id = fleet2.agents[laggard].id.clone();
    let before = fleet2.state(1, &lag_id);
    let mark = fleet2.log.len();
    for msg in [
        Message::Have {
            job: JobRef { id: 1, epoch: 1 },
            root: ROOT,
        },
        Message::Failed {
            job: JobRef { id: 1, epoch: 1 },
            reason: FailReason::Busy,
        },
        Message::Progress {
            job: JobRef { id: 1, epoch: 1 },
            verified: 39,
            received: Default::default(),
        },
    ] {
        fleet2
            .engine
            .handle_message(fleet2.now, &lag_id, &msg)
            .unwrap();
    }
    fleet2.drain();
    assert_eq!(fleet2.state(1, &lag_id), before);
    assert_eq!(fleet2.log.len(), mark, "stale messages produced output");

    fleet2.run(1, 2, 500);
    for a in &fleet2.agents {
        assert!(a.complete());
        assert_eq!(fleet2.state(1, &a.id), ParticipantState::Confirmed);
        assert_eq!(a.done, 1, "{} Done count", a.id);
    }
    assert!(fleet2.log.contains(&Output::Persist(Persist::JobFinished {
        job: 1,
        confirmed: 10,
        failed: 0
    })));
    // Every instruction of the new run carries epoch 2.
    for o in &fleet2.log {
        if let Output::Transmit(_, m) = o {
            let jr = match m {
                Message::Fetch { job, .. }
                | Message::Sources { job, .. }
                | Message::Done { job } => job,
                other => panic!("{other:?}"),
            };
            assert_eq!(jr.epoch, 2);
        }
    }
}

#[test]
fn cancel_sends_cancel_and_ends_the_job() {
    let mut fleet = Fleet::with_agents(1, 5);
    fleet.connect_all();
    fleet.start(3, 30, Targets::All, Policy::default());
    fleet.step(2);
    fleet.engine.cancel_job(fleet.now, 3).unwrap();
    fleet.drain();
    for a in &fleet.agents {
        assert_eq!(a.cancels, 1);
        assert_eq!(a.done, 0);
    }
    assert!(
        fleet
            .log
            .iter()
            .any(|o| matches!(o, Output::Persist(Persist::JobFinished { job: 3, .. })))
    );
    assert_eq!(
        fleet.engine.job_status(3).unwrap().outcome,
        JobOutcome::Cancelled
    );
    assert_eq!(
        fleet.engine.cancel_job(fleet.now, 3),
        Err(EngineError::JobEnded(3))
    );
    assert_eq!(fleet.engine.poll_timeout(), None);
    assert!(fleet.engine.forget_job(3));
    assert!(fleet.engine.job_status(3).is_none());
}

#[test]
fn bad_input_is_refused_without_changing_anything() {
    let mut fleet = Fleet::with_agents(3, 3);
    fleet.connect_all();
    fleet.start(1, 10, Targets::All, Policy::default());
    let before = fleet.engine.job_status(1);
    let log_len = fleet.log.len();
    let job = JobRef { id: 1, epoch: 3 };
    let a0 = id("a00");
    let e = &mut fleet.engine;
    let now = fleet.now;
    let fetch = Message::Fetch {
        job,
        manifest: manifest(10),
        sources: Default::default(),
        next: None,
    };
    assert_eq!(
        e.handle_message(now, &a0, &fetch),
        Err(EngineError::Unexpected { kind: "Fetch" })
    );
    assert_eq!(
        e.handle_message(
            now,
            &a0,
            &Message::ChunkRequest {
                root: ROOT,
                index: 0
            }
        ),
        Err(EngineError::Unexpected {
            kind: "ChunkRequest"
        })
    );
    assert_eq!(
        e.handle_message(
            now,
            &a0,
            &Message::NextPlease {
                job: JobRef { id: 9, epoch: 3 }
            }
        ),
        Err(EngineError::UnknownJob(9))
    );
    assert_eq!(
        e.handle_message(now, &id("stranger"), &Message::NextPlease { job }),
        Err(EngineError::NotParticipant {
            job: 1,
            agent: id("stranger")
        })
    );
    assert_eq!(
        e.handle_message(now, &a0, &Message::Have { job, root: [1; 32] }),
        Err(EngineError::RootMismatch {
            job: 1,
            agent: a0.clone()
        })
    );
    assert_eq!(
        e.handle_message(
            now,
            &a0,
            &Message::NextPlease {
                job: JobRef { id: 1, epoch: 4 }
            }
        ),
        Err(EngineError::FutureEpoch {
            job: 1,
            epoch: 4,
            current: 3
        })
    );
    assert_eq!(
        e.handle_message(now, &a0, &Message::Pong { nonce: 1 }),
        Ok(())
    );
    let spec = |id, targets| JobSpec {
        id,
        manifest: manifest(10),
        targets,
        policy: Policy::default(),
    };
    assert_eq!(
        e.start_job(now, spec(1, Targets::All)),
        Err(EngineError::DuplicateJob(1))
    );
    assert_eq!(
        e.start_job(now, spec(2, Targets::Agents(vec![]))),
        Err(EngineError::NoTargets(2))
    );
    let mut broken = spec(3, Targets::All);
    broken.manifest.chunk_size = 10;
    assert!(matches!(
        e.start_job(now, broken),
        Err(EngineError::InvalidManifest { job: 3, .. })
    ));
    assert_eq!(e.cancel_job(now, 9), Err(EngineError::UnknownJob(9)));
    assert!(!e.forget_job(1), "a running job is not forgotten");
    fleet.drain();
    assert_eq!(fleet.engine.job_status(1), before);
    assert_eq!(fleet.log.len(), log_len);
    assert!(
        EngineError::UnknownJob(9)
            .to_string()
            .contains("unknown job 9")
    );
}

#[test]
fn poll_timeout_is_the_earliest_of_flush_and_give_up() {
    let mut fleet = Fleet::with_agents(1, 3);
    fleet.add("away", true, 1_000_000, 8);
    for i in 0..3 {
        fleet.connect(i);
    }
    let t0 = fleet.now;
    let targets = Targets::Agents(fleet.agents.iter().map(|a| a.id.clone()).collect());
    fleet.start(1, 100, targets, Policy::default());
    let give_up = t0 + config().give_up_after;
    assert_eq!(fleet.engine.poll_timeout(), Some(give_up));
    // First progress flushes at once; the next within the interval waits for the flush timer.
    fleet.step(1);
    let t1 = fleet.now;
    fleet.step(1);
    let due = fleet.engine.poll_timeout().unwrap();
    assert!(due < give_up);
    assert!(due <= t1 + config().progress_flush);
    let records = |f: &Fleet| {
        f.log
            .iter()
            .filter(|o| matches!(o, Output::Persist(Persist::Progress { .. })))
            .count()
    };
    let n = records(&fleet);
    fleet.engine.handle_timeout(due);
    fleet.drain();
    assert_eq!(records(&fleet), n + 1);
    // Per-source byte deltas went out with it.
    assert!(
        fleet.log.iter().any(
            |o| matches!(o, Output::Persist(Persist::SourceBytes { bytes, .. }) if *bytes > 0)
        )
    );
    assert!(
        fleet
            .events()
            .iter()
            .any(|e| matches!(e, EngineEvent::Progress { total: 100, .. }))
    );
}

/// Start a job for 100 000 connected agents and drain every output (run with
/// `--release --ignored --nocapture`).
#[test]
#[ignore]
fn starts_a_job_for_100k_agents_fast() {
    // Flat, and on 2,000 segments of 50.
    for segments in [false, true] {
        let mut engine = Engine::new(1, config());
        let mut fleet = Fleet::new(1);
        for i in 0..100_000usize {
            let name = format!("n{i:06}");
            let serve = i % 4 != 3;
            let mut r = report(&name, serve, 1_000_000 + (i as u64 % 7) * 500_000, 8, i);
            if segments {
                r.segment = Name::try_from(format!("seg-{}", i / 50).as_str()).unwrap();
            }
            engine.agent_online(fleet.now, id(&name), PublicKey([1; 32]), r);
        }
        fleet.now += Duration::from_secs(1);
        let start = std::time::Instant::now();
        engine
            .start_job(
                fleet.now,
                JobSpec {
                    id: 1,
                    manifest: manifest(32_768),
                    targets: Targets::All,
                    policy: Policy::default(),
                },
            )
            .unwrap();
        let planned = start.elapsed();
        let (mut records, mut messages) = (0, 0);
        while engine.poll_persist().is_some() {
            records += 1;
        }
        while engine.poll_transmit().is_some() {
            messages += 1;
        }
        let drained = start.elapsed();
        eprintln!(
            "start_job(100k, segments: {segments}): planned in {planned:?}, drained {records} records and {messages} messages by {drained:?}"
        );
        assert!(messages >= 100_000);
        assert!(planned < Duration::from_secs(1), "{planned:?}");
    }
}

#[test]
fn fail_causes_round_trip_through_text() {
    for cause in [
        FailCause::GaveUp,
        FailCause::Agent(FailReason::StorageFull),
        FailCause::Agent(FailReason::ChunkTooLarge),
    ] {
        assert_eq!(cause.to_string().parse::<FailCause>(), Ok(cause));
    }
    assert!("bored".parse::<FailCause>().is_err());
}

#[test]
fn a_report_update_that_stops_serving_moves_its_fetchers() {
    let mut fleet = Fleet::with_agents(1, 8);
    fleet.connect_all();
    fleet.start(1, 40, Targets::All, Policy::default());
    let served = |f: &Fleet, name: &AgentId| {
        f.agents
            .iter()
            .filter(|a| {
                (0..40)
                    .any(|c| matches!(a.source_for(c), Source::Peer { ref id, .. } if id == name))
            })
            .count()
    };
    let busy = (0..8)
        .max_by_key(|&i| served(&fleet, &fleet.agents[i].id))
        .unwrap();
    let busy_id = fleet.agents[busy].id.clone();
    assert!(served(&fleet, &busy_id) > 0);
    fleet.agents[busy].report.can_serve = false;
    fleet.connect(busy); // the same connection, a new report
    assert_eq!(served(&fleet, &busy_id), 0);
    assert_eq!(
        fleet.agents[busy].fetches, 1,
        "no new Fetch for a report update"
    );
    fleet.run(1, 2, 500);
}

/// Seeded chaos: agents drop and return, some never return, one serves bad chunks, one runs
/// out of storage. After every step the plan's invariants hold; in the end every agent that
/// stayed is confirmed, and nobody gets `Done` twice.
#[test]
fn chaos_keeps_invariants_and_finishes() {
    for seed in 1..=16u64 {
        let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let mut rand = move |n: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % n
        };
        let n = 10 + rand(20) as usize;
        let mut fleet = Fleet::new(1);
        for i in 0..n {
            let serve = rand(4) != 0;
            fleet.add(
                &format!("c{i:02}"),
                serve,
                (1 + rand(4)) * 1_000_000,
                1 + rand(8) as u16,
            );
        }
        for a in &mut fleet.agents {
            a.report.segment = Name::try_from(format!("seg{}", rand(4)).as_str()).unwrap();
        }
        fleet.agents[rand(n as u64) as usize].bad = true;
        let dead = rand(n as u64) as usize; // leaves mid-job and never returns
        let full = rand(n as u64) as usize; // runs out of storage
        for i in 0..n {
            if rand(3) != 0 {
                fleet.connect(i);
            }
        }
        if !fleet.agents.iter().any(|a| a.online) {
            fleet.connect(0);
        }
        let policy = Policy {
            max_stripes: 1 + rand(10) as u16,
            max_peers_per_source: 1 + rand(6) as u16,
            ..Policy::default()
        };
        fleet.start(1, 150 + rand(250) as u32, Targets::All, policy);
        let check = |f: &Fleet, when: &str| {
            if let Some(plan) = f.engine.jobs.get(&1).and_then(|j| j.plan.as_ref()) {
                plan.check()
                    .unwrap_or_else(|e| panic!("seed {seed} {when}: {e}"));
            }
        };
        for step in 0..150 {
            let i = rand(n as u64) as usize;
            match rand(10) {
                0 if fleet.agents[i].online => fleet.disconnect(i),
                1 if !fleet.agents[i].online && i != dead => fleet.connect(i),
                2 if i == full && fleet.agents[i].online && fleet.agents[i].job.is_some() => {
                    let job = fleet.agents[i].job.take().unwrap();
                    fleet.send(
                        i,
                        Message::Failed {
                            job,
                            reason: FailReason::StorageFull,
                        },
                    );
                }
                _ => {}
            }
            if step == 40 && fleet.agents[dead].online {
                fleet.disconnect(dead);
            }
            fleet.step(1 + rand(2) as u32);
            check(&fleet, &format!("step {step}"));
        }
        for i in 0..n {
            if !fleet.agents[i].online && i != dead {
                fleet.connect(i);
            }
        }
        for _ in 0..3000 {
            if fleet.finished(1) {
                break;
            }
            fleet.step(3);
            check(&fleet, "settling");
        }
        let status = fleet.engine.job_status(1).unwrap();
        assert_eq!(
            status.outcome,
            JobOutcome::Finished,
            "seed {seed}: {status:?}"
        );
        for (i, a) in fleet.agents.iter().enumerate() {
            assert!(
                a.done <= 1,
                "seed {seed}: {} got Done {} times",
                a.id,
                a.done
            );
            let Some(p) = status.participants.iter().find(|p| p.agent == a.id) else {
                // Came online only after the job had finished: not a participant.
                assert_eq!(a.fetches, 0);
                continue;
            };
            if i == dead || i == full {
                continue;
            }
            if p.state == ParticipantState::Failed(FailCause::GaveUp) {
                // Given up only after being away at least the give-up time.
                assert!(
                    a.longest_offline >= config().give_up_after,
                    "seed {seed}: {}",
                    a.id
                );
                continue;
            }
            assert_eq!(
                p.state,
                ParticipantState::Confirmed,
                "seed {seed}: {}",
                a.id
            );
            assert!(a.complete());
            assert_eq!(a.done, 1, "seed {seed}: {}", a.id);
            assert_eq!(a.offered_troubled, 0, "seed {seed}: {}", a.id);
        }
    }
}

// ---- policy rules (claim 9) ----

/// Puts agent `i` of `fleet` on `segment`.
fn on_segment(fleet: &mut Fleet, i: usize, segment: &str) {
    fleet.agents[i].report.segment = Name::try_from(segment).unwrap();
}

/// `segments` × `per` serving agents `s{seg}a{n}` with mixed uploads, each on its segment.
fn segmented_fleet(segments: usize, per: usize) -> Fleet {
    let mut fleet = Fleet::new(1);
    for seg in 0..segments {
        for n in 0..per {
            let i = fleet.add(
                &format!("s{seg}a{n}"),
                true,
                1_000_000 * (1 + (n as u64 % 3)),
                8,
            );
            on_segment(&mut fleet, i, &format!("seg-{seg}"));
        }
    }
    fleet
}

/// The segment of every agent of `fleet`, by id.
fn segment_of(fleet: &Fleet) -> HashMap<AgentId, Name> {
    fleet
        .agents
        .iter()
        .map(|a| (a.id.clone(), a.report.segment.clone()))
        .collect()
}

/// Per segment: the fetching participants whose sources include the manager or another segment.
fn wan_fetchers(fleet: &Fleet, job: u64) -> BTreeMap<Name, Vec<AgentId>> {
    let segs = segment_of(fleet);
    let mut out: BTreeMap<Name, Vec<AgentId>> = BTreeMap::new();
    for p in fleet.engine.job_status(job).unwrap().participants {
        if !matches!(p.state, ParticipantState::Fetching { .. }) {
            continue;
        }
        let mine = &segs[&p.agent];
        if p.sources
            .iter()
            .any(|s| s.as_ref().is_none_or(|peer| &segs[peer] != mine))
        {
            out.entry(mine.clone()).or_default().push(p.agent.clone());
        }
    }
    out
}

fn warnings(fleet: &Fleet) -> Vec<String> {
    fleet
        .events()
        .into_iter()
        .filter_map(|e| match e {
            EngineEvent::PolicyWarning { text, .. } => Some(text.clone()),
            _ => None,
        })
        .collect()
}

fn started_order(fleet: &Fleet, job: u64) -> Vec<AgentId> {
    fleet
        .log
        .iter()
        .find_map(|o| match o {
            Output::Persist(Persist::JobStarted { job: j, order, .. }) if *j == job => {
                Some(order.clone())
            }
            _ => None,
        })
        .unwrap()
}

#[test]
fn ordering_weights_change_the_order_of_the_list() {
    let mut fleet = Fleet::new(1);
    let near = fleet.add("near", true, 1_000_000, 8);
    let far = fleet.add("far", true, 1_000_000_000, 8);
    for (i, rtt) in [(near, 1_000), (far, 300_000)] {
        fleet.agents[i]
            .report
            .delays
            .push(baton_protocol::types::Delay {
                to: baton_protocol::types::DelayTo::Manager,
                rtt_us: rtt,
            })
            .unwrap();
    }
    fleet.connect_all();
    fleet.start(1, 10, Targets::All, Policy::default());
    assert_eq!(started_order(&fleet, 1), [id("far"), id("near")]);
    let by_delay = Policy {
        weights: crate::planner::Weights {
            up: 0.0,
            down: 0.0,
            delay: 10.0,
            ..Default::default()
        },
        ..Policy::default()
    };
    fleet.start(2, 10, Targets::All, by_delay);
    assert_eq!(started_order(&fleet, 2), [id("near"), id("far")]);
}

#[test]
fn no_source_serves_more_peers_than_max_peers_per_source() {
    let mut fleet = Fleet::with_agents(1, 24);
    fleet.connect_all();
    let policy = Policy {
        max_peers_per_source: 2,
        ..Policy::default()
    };
    fleet.start(1, 64, Targets::All, policy);
    let mut most = 0;
    for _ in 0..400 {
        if fleet.finished(1) {
            break;
        }
        let mut fetchers: HashMap<AgentId, usize> = HashMap::new();
        for p in fleet.engine.job_status(1).unwrap().participants {
            for s in p.sources.into_iter().flatten() {
                *fetchers.entry(s).or_default() += 1;
            }
        }
        for (source, n) in fetchers {
            most = most.max(n);
            assert!(n <= 2, "{source} serves {n} peers");
        }
        fleet.step(2);
    }
    assert!(fleet.finished(1));
    assert_eq!(most, 2, "the cap was never reached: the test shows nothing");
}

#[test]
fn an_agent_rate_cap_is_sent_as_throttle_after_each_fetch() {
    let mut fleet = Fleet::with_agents(1, 6);
    fleet.connect_all();
    let policy = Policy {
        agent_rate_cap_bps: 50_000,
        ..Policy::default()
    };
    fleet.start(1, 16, Targets::All, policy);
    for a in &fleet.agents {
        let kinds: Vec<&str> = fleet
            .messages_to(a.id.as_str())
            .iter()
            .map(|m| m.kind())
            .collect();
        assert_eq!(kinds[..2], ["Fetch", "Throttle"], "{}", a.id);
        assert_eq!(a.throttles, [50_000]);
    }
    // A reconnect gets a fresh Fetch and the cap again.
    fleet.disconnect(2);
    fleet.connect(2);
    assert_eq!(fleet.agents[2].throttles, [50_000, 50_000]);
    fleet.run(1, 4, 500);
}

#[test]
fn a_segment_rate_cap_is_split_over_the_agents_fetching_across_the_wan() {
    let mut fleet = segmented_fleet(3, 5);
    fleet.connect_all();
    let policy = Policy {
        segment_rate_cap_bps: 90_000,
        agent_rate_cap_bps: 40_000,
        ..Policy::default()
    };
    fleet.start(1, 64, Targets::All, policy);
    let across = wan_fetchers(&fleet, 1);
    assert_eq!(across.len(), 3);
    for (seg, list) in &across {
        let share = (90_000 / list.len() as u64).min(40_000);
        for a in &fleet.agents {
            if &a.report.segment != seg {
                continue;
            }
            let cap = a.throttles.last().copied().unwrap_or(0);
            if list.contains(&a.id) {
                assert_eq!(cap, share, "{} fetches across the WAN", a.id);
            } else {
                assert_eq!(cap, 40_000, "{} fetches inside its segment", a.id);
            }
        }
        let total: u64 = list
            .iter()
            .map(|i| {
                fleet.agents[fleet.by_id[i]]
                    .throttles
                    .last()
                    .copied()
                    .unwrap()
            })
            .sum();
        assert!(total <= 90_000, "{seg}: {total} B/s across the WAN");
    }
    fleet.run(1, 4, 800);
}

#[test]
fn at_most_m_agents_of_a_segment_fetch_from_outside_it() {
    for m in [1u16, 2] {
        let mut fleet = segmented_fleet(3, 6);
        // The elected leader of seg-1 is its slowest agent: it still enters first.
        fleet.connect_all();
        let leader = id("s1a3");
        let mut members = heapless::Vec::new();
        members
            .push(baton_protocol::message::SegmentMember {
                id: leader.clone(),
                score: 1,
                listen: None,
                performance: 1,
                free_storage: 0,
                can_serve: true,
                link: LinkInfo::default(),
                delays: Default::default(),
                last_heard_ms: 0,
            })
            .unwrap();
        let report = Message::SegmentReport(baton_protocol::message::SegmentReport {
            segment: Name::try_from("seg-1").unwrap(),
            leader: leader.clone(),
            term: 1,
            page: 0,
            pages: 1,
            members,
        });
        let i = fleet.by_id[&leader];
        fleet.send(i, report);
        let policy = Policy {
            max_wan_transfers_per_segment: m,
            ..Policy::default()
        };
        fleet.start(1, 96, Targets::All, policy);
        let across = wan_fetchers(&fleet, 1);
        for (seg, list) in &across {
            assert!(list.len() <= m as usize, "m={m}: {seg}: {list:?}");
        }
        assert!(across[&Name::try_from("seg-1").unwrap()].contains(&leader));
        // The job's list of segments and their entry nodes, leader first.
        let segments = fleet.engine.job_status(1).unwrap().segments;
        assert_eq!(segments.len(), 3);
        let seg1 = segments.iter().find(|s| s.segment == "seg-1").unwrap();
        assert_eq!(seg1.entries[0], leader);
        assert_eq!(seg1.entries.len(), m as usize);
        assert_eq!((seg1.fetchers, seg1.servers), (6, 6));
        for _ in 0..600 {
            if fleet.finished(1) {
                break;
            }
            for (seg, list) in wan_fetchers(&fleet, 1) {
                assert!(list.len() <= m as usize, "m={m}: {seg}: {list:?}");
            }
            fleet.step(4);
        }
        assert!(fleet.finished(1));
    }
}

#[test]
fn content_enters_each_segment_once() {
    let mut fleet = segmented_fleet(3, 8);
    fleet.connect_all();
    fleet.start(1, 128, Targets::All, Policy::default());
    fleet.run(1, 4, 1000);
    // Bytes each agent received from outside its segment, per segment, from the records.
    let segs = segment_of(&fleet);
    let mut into: BTreeMap<Name, u64> = BTreeMap::new();
    let mut per_agent: BTreeMap<AgentId, u64> = BTreeMap::new();
    for o in &fleet.log {
        if let Output::Persist(Persist::SourceBytes {
            agent, from, bytes, ..
        }) = o
        {
            *per_agent.entry(agent.clone()).or_default() += bytes;
            let mine = &segs[agent];
            if from.as_ref().is_none_or(|f| &segs[f] != mine) {
                *into.entry(mine.clone()).or_default() += bytes;
            }
        }
    }
    let content = 128 * CHUNK as u64;
    // The records carry every byte each agent got, from whom.
    for a in &fleet.agents {
        assert_eq!(per_agent[&a.id], content, "{}", a.id);
    }
    for (seg, bytes) in &into {
        eprintln!("{seg}: {bytes} bytes entered ({content} content)");
        assert!(
            *bytes <= content,
            "{seg}: {bytes} bytes crossed for {content}"
        );
    }
    assert_eq!(into.len(), 3);
}

#[test]
fn leaf_only_agents_by_id_label_and_upload_never_serve() {
    let mut fleet = Fleet::with_agents(1, 12);
    let labelled = fleet.add("sensor", true, 5_000_000, 8);
    fleet.agents[labelled]
        .report
        .labels
        .push(baton_protocol::types::Label {
            key: "role".try_into().unwrap(),
            value: "sensor".try_into().unwrap(),
        })
        .unwrap();
    fleet.add("weak", true, 5_000_000, 8);
    fleet.add("trickle", true, 1_000, 8);
    fleet.connect_all();
    let policy = Policy {
        leaf_only: vec![id("weak")],
        leaf_only_labels: [("role".to_string(), "sensor".to_string())].into(),
        leaf_below_up_bps: 10_000,
        ..Policy::default()
    };
    fleet.start(1, 48, Targets::All, policy);
    fleet.run(1, 3, 1000);
    let leaves = [id("sensor"), id("weak"), id("trickle")];
    let mut peers_offered = 0;
    for a in &fleet.agents {
        for p in fleet.peers_offered_to(a.id.as_str()) {
            peers_offered += 1;
            assert!(!leaves.contains(&p), "{p} offered to {}", a.id);
        }
    }
    assert!(peers_offered > 0);
    for l in &leaves {
        assert_eq!(fleet.state(1, l.as_str()), ParticipantState::Confirmed);
    }
}

#[test]
fn a_closed_window_holds_the_job_until_it_opens() {
    let mut fleet = Fleet::with_agents(1, 6);
    fleet.add("late", true, 1_000_000, 8);
    for i in 0..6 {
        fleet.connect(i);
    }
    // 12:00 UTC; the window is 22:00-06:00 (wraps midnight).
    let noon = 20_000 * 86_400 + 12 * 3600;
    fleet.engine.set_wall_clock(fleet.now, noon);
    let policy = Policy {
        window: Some(crate::planner::TimeWindow {
            start_minute: 22 * 60,
            end_minute: 6 * 60,
        }),
        ..Policy::default()
    };
    fleet.start(1, 32, Targets::All, policy.clone());
    assert_eq!(
        warnings(&fleet),
        ["window 22:00-06:00 UTC is closed; the job waits 10 h"]
    );
    let status = fleet.engine.job_status(1).unwrap();
    assert_eq!(status.warnings.len(), 1);
    let opens = status.opens_at.unwrap();
    assert_eq!(opens, fleet.now + Duration::from_secs(10 * 3600));
    assert_eq!(fleet.engine.poll_timeout(), Some(opens));
    // Nobody is instructed, a late agent neither, and nobody is given up while it waits.
    fleet.connect(6);
    assert!(fleet.agents.iter().all(|a| a.fetches == 0));
    fleet.disconnect(5);
    fleet.now = opens - Duration::from_secs(1);
    fleet.engine.handle_timeout(fleet.now);
    fleet.drain();
    assert!(fleet.agents.iter().all(|a| a.fetches == 0));
    assert_eq!(fleet.state(1, "a05"), ParticipantState::Waiting);
    // The window opens: every connected participant gets its Fetch; the absent one's timer starts.
    fleet.now = opens;
    fleet.engine.handle_timeout(fleet.now);
    fleet.drain();
    for (i, a) in fleet.agents.iter().enumerate() {
        assert_eq!(a.fetches, (i != 5) as u32, "{}", a.id);
    }
    fleet.connect(5);
    fleet.run(1, 4, 500);

    // Inside the window (23:30) a job starts at once.
    let mut fleet = Fleet::with_agents(1, 3);
    fleet.connect_all();
    fleet
        .engine
        .set_wall_clock(fleet.now, noon + 11 * 3600 + 1800);
    fleet.start(2, 8, Targets::All, policy);
    assert!(warnings(&fleet).is_empty());
    assert!(fleet.agents.iter().all(|a| a.fetches == 1));
}

#[test]
fn rules_that_cannot_be_met_are_reported() {
    let mut fleet = segmented_fleet(2, 3);
    // Every member of seg-1 is a leaf (by label).
    for i in 3..6 {
        fleet.agents[i]
            .report
            .labels
            .push(baton_protocol::types::Label {
                key: "class".try_into().unwrap(),
                value: "meter".try_into().unwrap(),
            })
            .unwrap();
    }
    fleet.connect_all();
    let policy = Policy {
        leaf_only_labels: [("class".to_string(), "meter".to_string())].into(),
        agent_rate_cap_bps: 1024,
        segment_rate_cap_bps: 512,
        max_wan_transfers_per_segment: 2,
        ..Policy::default()
    };
    // 32 MiB of 1 KiB chunks.
    fleet.start(1, 32 * 1024, Targets::All, policy);
    let w = warnings(&fleet);
    assert_eq!(
        w,
        [
            "segment seg-1 has no agent allowed to relay: every member fetches across the WAN (3 agents); max_wan_transfers_per_segment 2 cannot hold there",
            "agent rate cap 1 KiB/s would take 9 h 6 min for 32 MiB per agent",
            "segment rate cap 512 B/s would take 18 h 12 min for 32 MiB to enter segment seg-0, seg-1",
        ]
    );
    assert_eq!(fleet.engine.job_status(1).unwrap().warnings, w);
    // Each text once per job.
    fleet.engine.cancel_job(fleet.now, 1).unwrap();
    fleet.drain();
    assert_eq!(warnings(&fleet).len(), 3);
}
