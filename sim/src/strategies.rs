//! Baselines to compare Baton with, on the same scenario, seed and link model.
//!
//! These are simple schedulers, not the engine: whole-file transfers pushed
//! chunk by chunk through [`Net`] (the same ports, latencies and fair sharing
//! as the Baton run, the same virtual chunk and frame sizes). Each transfer
//! keeps a few frames queued at its sender's upload, so concurrent transfers
//! from one sender share its upload evenly.
//!
//! - [`Strategy::Unicast`]: the manager sends the whole content to every agent
//!   at once. Closed form: `max(N·S/u_s, S/d_min)`.
//! - [`Strategy::ChainWholeFile`]: the literal claim-5 loop. The participants
//!   are ranked by the planner's own [`prioritize`]; the manager sends the
//!   content to the first; every participant that holds the *whole* content
//!   (and may serve) asks "next please" and is given the next participant on
//!   the list not yet served, one at a time, as is the manager. No closed form.
//! - [`Strategy::Binomial`]: whole-file doubling in synchronous rounds: in each
//!   round every holder (the manager and every agent that may serve and holds
//!   the content) sends it to one new agent, in id order; a round ends when
//!   its last transfer does. Closed form: the sum over rounds of the slowest
//!   transfer `S/min(u_from, d_to)` plus its latency.
//!
//! A scenario's rate change reaches the baselines' ports as it does Baton's
//! (the closed forms use the rates at the start); the chain's ranking uses the
//! rates the agents declare, as the planner would see them.

use std::time::Duration;

use baton_manager_core::planner::{Policy, Profile, prioritize};
use baton_protocol::{AgentId, LinkInfo, PeerAddr};

use crate::net::{MANAGER, Net, Route, Step};
use crate::queue::EventQueue;
use crate::report::StrategyResult;
use crate::scenario::{Built, Scenario, scaled};

/// Frames each transfer keeps queued at its sender's upload (enough to cover the latency
/// before the sender learns a frame has left).
const PUSH_WINDOW: u32 = 32;

/// A baseline strategy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Strategy {
    /// The manager sends to everyone.
    Unicast,
    /// Claim 5's loop, relaying only whole files.
    ChainWholeFile,
    /// Whole-file doubling in rounds.
    Binomial,
}

impl Strategy {
    /// Every baseline.
    pub const ALL: [Strategy; 3] = [
        Strategy::Unicast,
        Strategy::ChainWholeFile,
        Strategy::Binomial,
    ];

    /// The name used in reports and JSON.
    pub fn name(self) -> &'static str {
        match self {
            Strategy::Unicast => "unicast",
            Strategy::ChainWholeFile => "chain_whole_file",
            Strategy::Binomial => "binomial",
        }
    }
}

/// Wire bytes of one chunk frame: the virtual chunk plus a chunk message's header and proof.
pub fn frame_size(scenario: &Scenario) -> u64 {
    let chunks = scenario.chunks.max(1);
    let depth = u64::from(32 - (chunks - 1).leading_zeros());
    scenario.virtual_chunk() + 40 + 32 * depth
}

#[derive(Clone, Copy, Debug)]
enum Ev {
    Hop(u32),
    Deliver(u32),
    /// The scenario's rate change: the chosen agents' uploads take their new rate.
    RateChange,
}

#[derive(Debug)]
struct Flow {
    from: usize,
    to: usize,
    sent: u32,
    queued: u32,
    delivered: u32,
}

struct Frame {
    flow: u32,
    route: Route,
    left_sender: bool,
}

/// A run of one baseline.
struct Run<'a> {
    scenario: &'a Scenario,
    built: &'a Built,
    net: Net,
    queue: EventQueue<Ev>,
    now: Duration,
    frames: Vec<Option<Frame>>,
    free_frames: Vec<u32>,
    flows: Vec<Flow>,
    size: u64,
    chunks: u32,
    /// Per agent: completion time.
    done: Vec<Option<Duration>>,
    origin_frames: u64,
    events: u64,
}

impl<'a> Run<'a> {
    fn new(scenario: &'a Scenario, built: &'a Built) -> Self {
        let net = built.network(scenario);
        let mut queue = EventQueue::new();
        if let Some(c) = &built.rate_change {
            queue.push(c.at, Ev::RateChange);
        }
        Run {
            scenario,
            built,
            net,
            queue,
            now: Duration::ZERO,
            frames: Vec::new(),
            free_frames: Vec::new(),
            flows: Vec::new(),
            size: frame_size(scenario),
            chunks: scenario.chunks.max(1),
            done: vec![None; built.agents.len()],
            origin_frames: 0,
            events: 0,
        }
    }

    /// Starts a whole-file transfer between nodes `from` and `to`.
    fn start(&mut self, from: usize, to: usize) {
        self.flows.push(Flow {
            from,
            to,
            sent: 0,
            queued: 0,
            delivered: 0,
        });
        let f = (self.flows.len() - 1) as u32;
        self.refill(f);
    }

    fn refill(&mut self, f: u32) {
        while self.flows[f as usize].queued < PUSH_WINDOW
            && self.flows[f as usize].sent < self.chunks
        {
            let flow = &mut self.flows[f as usize];
            flow.sent += 1;
            flow.queued += 1;
            let (from, to) = (flow.from, flow.to);
            if from == MANAGER {
                self.origin_frames += 1;
            }
            let (route, step) = self.net.send(self.now, from, to, self.size);
            let frame = Frame {
                flow: f,
                route,
                left_sender: false,
            };
            let i = match self.free_frames.pop() {
                Some(i) => {
                    self.frames[i as usize] = Some(frame);
                    i
                }
                None => {
                    self.frames.push(Some(frame));
                    (self.frames.len() - 1) as u32
                }
            };
            match step {
                Step::Hop(t) => self.queue.push(t, Ev::Hop(i)),
                Step::Deliver(t) => self.queue.push(t, Ev::Deliver(i)),
            }
        }
    }

    /// Runs until the queue is empty; `on_done(run, flow)` is called as each transfer completes.
    fn run(&mut self, mut on_done: impl FnMut(&mut Self, u32)) {
        while let Some((t, ev)) = self.queue.pop() {
            self.now = t;
            self.events += 1;
            match ev {
                Ev::Hop(i) => {
                    let size = self.size;
                    let frame = self.frames[i as usize].as_mut().expect("live frame");
                    let mut route = frame.route;
                    let step = self.net.advance(t, &mut route, size);
                    frame.route = route;
                    let first = !frame.left_sender;
                    frame.left_sender = true;
                    let f = frame.flow;
                    match step {
                        Step::Hop(at) => self.queue.push(at, Ev::Hop(i)),
                        Step::Deliver(at) => self.queue.push(at, Ev::Deliver(i)),
                    }
                    if first {
                        self.flows[f as usize].queued -= 1;
                        self.refill(f);
                    }
                }
                Ev::RateChange => {
                    let built = self.built;
                    if let Some(change) = &built.rate_change {
                        for &k in &change.agents {
                            let rate = scaled(self.net.link(k + 1).up, change.factor);
                            self.net.set_up_rate(k + 1, rate);
                        }
                    }
                }
                Ev::Deliver(i) => {
                    let frame = self.frames[i as usize].take().expect("live frame");
                    self.free_frames.push(i);
                    let f = frame.flow;
                    let flow = &mut self.flows[f as usize];
                    flow.delivered += 1;
                    if flow.delivered == self.chunks {
                        let to = flow.to;
                        self.done[to - 1] = Some(t);
                        on_done(self, f);
                    }
                }
            }
        }
    }

    fn result(&self, strategy: Strategy) -> StrategyResult {
        let completion: Vec<Option<f64>> = self
            .done
            .iter()
            .map(|d| d.map(|t| t.as_secs_f64()))
            .collect();
        let origin = self.origin_frames * self.scenario.virtual_chunk();
        let mut r = StrategyResult::new(strategy.name(), &completion, origin);
        r.closed_form = closed_form(strategy, self.scenario, self.built, &self.net, self.size);
        r
    }
}

/// Runs `strategy` on `scenario` (as drawn in `built`); also returns the events processed.
pub fn run(strategy: Strategy, scenario: &Scenario, built: &Built) -> (StrategyResult, u64) {
    let mut r = Run::new(scenario, built);
    let n = built.agents.len();
    match strategy {
        Strategy::Unicast => {
            for k in 0..n {
                r.start(MANAGER, k + 1);
            }
            r.run(|_, _| {});
        }
        Strategy::ChainWholeFile => {
            let list = ranked(scenario, built);
            let mut next = 0usize;
            let serves = |k: usize| built.agents[k].serves;
            if next < list.len() {
                r.start(MANAGER, list[next] + 1);
                next += 1;
            }
            r.run(|run, f| {
                let (from, to) = (run.flows[f as usize].from, run.flows[f as usize].to);
                // The sender asks for its next participant; so does the new holder.
                for holder in [from, to] {
                    if holder != MANAGER && !serves(holder - 1) {
                        continue;
                    }
                    if next < list.len() {
                        run.start(holder, list[next] + 1);
                        next += 1;
                    }
                }
            });
        }
        Strategy::Binomial => {
            let mut holders = vec![MANAGER];
            let mut next = 0usize;
            let mut in_round = 0usize;
            let mut round: Vec<usize> = Vec::new();
            let start_round = |run: &mut Run<'_>,
                               holders: &[usize],
                               next: &mut usize,
                               in_round: &mut usize,
                               round: &mut Vec<usize>| {
                round.clear();
                for &h in holders {
                    if *next >= n {
                        break;
                    }
                    run.start(h, *next + 1);
                    round.push(*next + 1);
                    *next += 1;
                    *in_round += 1;
                }
            };
            start_round(&mut r, &holders, &mut next, &mut in_round, &mut round);
            r.run(|run, f| {
                let _ = f;
                in_round -= 1;
                if in_round == 0 {
                    for &a in &round {
                        if built.agents[a - 1].serves {
                            holders.push(a);
                        }
                    }
                    start_round(run, &holders, &mut next, &mut in_round, &mut round);
                }
            });
        }
    }
    let events = r.events;
    (r.result(strategy), events)
}

/// Agents in the order of the planner's prioritized list (best first), as agent indices.
fn ranked(scenario: &Scenario, built: &Built) -> Vec<usize> {
    let ids: Vec<AgentId> = (0..built.agents.len())
        .map(|k| AgentId::try_from(format!("a{k:05}").as_str()).expect("short id"))
        .collect();
    let profiles: Vec<Profile> = built
        .agents
        .iter()
        .enumerate()
        .map(|(k, a)| Profile {
            listen: a.serves.then_some(PeerAddr::V4(
                [10, (k >> 16) as u8, (k >> 8) as u8, k as u8],
                7000,
            )),
            can_serve: a.serves,
            max_sources: 9,
            max_peers: scenario.max_peers,
            performance: 100,
            link: LinkInfo {
                up_bps: a.declared_up,
                down_bps: a.declared_down,
                loss_ppm: (a.loss * 1e6) as u32,
                uptime_s: 0,
            },
            ..Profile::default()
        })
        .collect();
    let list = prioritize(ids.iter().zip(profiles.iter()), &Policy::default());
    list.into_iter()
        .map(|(id, _)| id[1..].parse::<usize>().expect("our ids"))
        .collect()
}

/// The strategy's closed-form makespan on this scenario (seconds), where it has one.
fn closed_form(
    strategy: Strategy,
    scenario: &Scenario,
    built: &Built,
    net: &Net,
    frame: u64,
) -> Option<f64> {
    let wire = frame as f64 * scenario.chunks.max(1) as f64;
    let n = built.agents.len();
    match strategy {
        Strategy::Unicast => {
            let d_min = built.agents.iter().map(|a| a.down).min()? as f64;
            Some((n as f64 * wire / scenario.manager_up.max(1) as f64).max(wire / d_min))
        }
        Strategy::ChainWholeFile => None,
        Strategy::Binomial => {
            let up = |x: usize| net.link(x).up as f64;
            let down = |x: usize| net.link(x).down as f64;
            let mut holders = vec![MANAGER];
            let mut next = 0;
            let mut total = 0.0;
            while next < n {
                let mut round: f64 = 0.0;
                let mut new = Vec::new();
                for &h in &holders {
                    if next >= n {
                        break;
                    }
                    let to = next + 1;
                    let t = wire / up(h).min(down(to)) + net.latency(h, to).as_secs_f64();
                    round = round.max(t);
                    new.push(to);
                    next += 1;
                }
                holders.extend(new.into_iter().filter(|&a| built.agents[a - 1].serves));
                total += round;
            }
            Some(total)
        }
    }
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn unicast_meets_its_closed_form() {
        let mut s = Scenario::new(20, 3);
        s.chunks = 128;
        s.content_bytes = 128 * 32 * 1024;
        let b = s.build();
        let (r, _) = run(Strategy::Unicast, &s, &b);
        assert_eq!(r.completed, 20);
        let cf = r.closed_form.unwrap();
        assert!(
            (r.makespan / cf - 1.0).abs() < 0.05,
            "{} vs {cf}",
            r.makespan
        );
        assert_eq!(r.origin_bytes, 20 * s.content_bytes);
    }

    #[test]
    fn binomial_meets_its_closed_form() {
        let mut s = Scenario::new(13, 3);
        s.chunks = 128;
        s.content_bytes = 128 * 32 * 1024;
        let b = s.build();
        let (r, _) = run(Strategy::Binomial, &s, &b);
        assert_eq!(r.completed, 13);
        let cf = r.closed_form.unwrap();
        assert!(
            (r.makespan / cf - 1.0).abs() < 0.05,
            "{} vs {cf}",
            r.makespan
        );
    }

    #[test]
    fn homogeneous_fleet_meets_the_textbook_forms() {
        // Every upload 2 MB/s (the manager's too), fast downloads, 1 ms latency.
        let mut s = Scenario::new(15, 7);
        s.chunks = 128;
        s.content_bytes = 128 * 32 * 1024;
        (s.up_min, s.up_max, s.manager_up) = (2_000_000, 2_000_000, 2_000_000);
        (s.down_min, s.down_max) = (20_000_000, 20_000_000);
        s.latency_min = Duration::from_millis(1);
        s.latency_max = s.latency_min;
        let b = s.build();
        let file = (frame_size(&s) * 128) as f64 / 2e6;
        // Unicast: N·S/u_s.
        let (r, _) = run(Strategy::Unicast, &s, &b);
        assert!(
            (r.makespan / (15.0 * file) - 1.0).abs() < 0.05,
            "{}",
            r.makespan
        );
        // Binomial: ⌈log2(N + 1)⌉ rounds of S/u.
        let (r, _) = run(Strategy::Binomial, &s, &b);
        assert!(
            (r.makespan / (4.0 * file) - 1.0).abs() < 0.05,
            "{}",
            r.makespan
        );
    }

    #[test]
    fn chain_serves_everyone_in_list_order() {
        let mut s = Scenario::new(9, 4);
        s.chunks = 16;
        s.content_bytes = 16 * 32 * 1024;
        let b = s.build();
        let (r, _) = run(Strategy::ChainWholeFile, &s, &b);
        assert_eq!(r.completed, 9);
        let mut list = ranked(&s, &b);
        list.sort_unstable();
        assert_eq!(list, (0..9).collect::<Vec<_>>());
        assert!(r.makespan > 0.0);
    }
}
