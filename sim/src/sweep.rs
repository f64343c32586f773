//! Seed sweeps: many small faulty runs, each checked against the invariants.
//!
//! Seed `s` builds [`Scenario::faulty(s)`](Scenario::faulty) — a few agents,
//! a few dozen chunks, and a random mix of drops, partitions, crashes and
//! restarts, a malicious peer and manager restarts, with the agents declaring
//! their true rates, none or wrong ones (a third of the seeds each) and a
//! fifth of the seeds changing some uploads mid-job — and runs it to the end
//! with every invariant checked after every event. A failing seed is printed
//! with what broke; setting `BATON_SIM_SEED` to it replays exactly that run
//! (see [`replay_seed`]).

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::scenario::{Scenario, SweepSize};
use crate::simulation::{Outcome, Simulation, Stats};

/// The environment variable naming one seed to replay.
pub const SEED_VAR: &str = "BATON_SIM_SEED";

/// The seed `BATON_SIM_SEED` names, if it is set (and a number).
pub fn replay_seed() -> Option<u64> {
    std::env::var(SEED_VAR).ok()?.trim().parse().ok()
}

/// Runs the (small) faulty scenario of `seed`.
pub fn run_seed(seed: u64) -> Outcome {
    run_sized(seed, SweepSize::Small)
}

/// Runs the faulty scenario of `seed` with fleets of `size`.
pub fn run_sized(seed: u64, size: SweepSize) -> Outcome {
    Simulation::new(&Scenario::faulty_sized(seed, size)).run()
}

/// One failing seed.
#[derive(Clone, Debug)]
pub struct Failure {
    /// The seed.
    pub seed: u64,
    /// What broke.
    pub violations: Vec<String>,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "seed {} failed (replay: {}={} cargo run --release -p baton-sim -- --sweep 1 [--sweep-size medium] [--trace]):",
            self.seed, SEED_VAR, self.seed
        )?;
        for v in &self.violations {
            writeln!(f, "  {v}")?;
        }
        Ok(())
    }
}

/// What a sweep found.
#[derive(Clone, Debug, Default)]
pub struct SweepReport {
    /// Seeds run.
    pub seeds: u64,
    /// Events processed over all seeds.
    pub events: u64,
    /// Counters summed over all seeds (what the faults exercised).
    pub stats: Stats,
    /// Failing seeds, in seed order.
    pub failures: Vec<Failure>,
    /// Wall time.
    pub wall: Duration,
}

/// Runs seeds `first..first + count` (small fleets) on `threads` threads (each seed is one
/// deterministic run, so the result does not depend on the threading).
pub fn sweep(first: u64, count: u64, threads: usize) -> SweepReport {
    sweep_sized(first, count, threads, SweepSize::Small)
}

/// [`sweep`] with fleets of `size`.
pub fn sweep_sized(first: u64, count: u64, threads: usize, size: SweepSize) -> SweepReport {
    let started = Instant::now();
    let next = AtomicU64::new(0);
    let events = AtomicU64::new(0);
    let failures = Mutex::new(Vec::new());
    let stats = Mutex::new(Stats::default());
    std::thread::scope(|scope| {
        for _ in 0..threads.max(1) {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= count {
                        break;
                    }
                    let seed = first + i;
                    let out = run_sized(seed, size);
                    events.fetch_add(out.stats.events, Ordering::Relaxed);
                    stats
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .merge(&out.stats);
                    if !out.violations.is_empty() {
                        failures
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push(Failure {
                                seed,
                                violations: out.violations,
                            });
                    }
                }
            });
        }
    });
    let mut failures = failures.into_inner().unwrap_or_else(|e| e.into_inner());
    failures.sort_by_key(|f| f.seed);
    SweepReport {
        seeds: count,
        events: events.into_inner(),
        stats: stats.into_inner().unwrap_or_else(|e| e.into_inner()),
        failures,
        wall: started.elapsed(),
    }
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn a_few_seeds_pass_and_replay_identically() {
        let r = sweep(0, 8, 2);
        assert_eq!(r.seeds, 8);
        assert!(r.failures.is_empty(), "{}", r.failures[0]);
        let a = run_seed(5);
        let b = run_seed(5);
        assert_eq!(a.completion, b.completion);
        assert_eq!(a.stats.events, b.stats.events);
    }
}
