//! The CI seed sweep: at least a thousand small faulty runs, every invariant checked after
//! every event.
//!
//! `BATON_SIM_SEED=S cargo test -p baton-sim --test sweep` replays seed `S` alone (with its
//! scenario and counters printed); `BATON_SIM_SEEDS=N` changes how many seeds run (the soak
//! runs many more in a release build: `cargo run --release -p baton-sim -- --sweep 100000`).

use baton_sim::sweep::{SEED_VAR, replay_seed, run_seed, sweep};

#[test]
fn a_thousand_faulty_seeds_keep_every_invariant() {
    if let Some(seed) = replay_seed() {
        eprintln!("{SEED_VAR}={seed}: replaying one seed");
        eprintln!("{:#?}", baton_sim::scenario::Scenario::faulty(seed).build());
        let out = run_seed(seed);
        eprintln!("{:#?}", out.stats);
        assert!(
            out.violations.is_empty(),
            "seed {seed}: {:#?}",
            out.violations
        );
        return;
    }
    let count: u64 = std::env::var("BATON_SIM_SEEDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let r = sweep(0, count, threads);
    for f in &r.failures {
        eprint!("{f}");
    }
    eprintln!(
        "{} seeds, {} events in {:.1} s; exercised {} crashes, {} partitions, {} manager restarts, \
         {} dropped frames, {} bad chunks caught",
        r.seeds,
        r.events,
        r.wall.as_secs_f64(),
        r.stats.crashes,
        r.stats.partitions,
        r.stats.manager_restarts,
        r.stats.dropped,
        r.stats.bad_chunks
    );
    assert!(
        r.failures.is_empty(),
        "{} of {} seeds failed; replay one with {SEED_VAR}=<seed>",
        r.failures.len(),
        r.seeds
    );
    // The sweep must actually exercise the faults it claims to.
    assert!(r.stats.crashes > 0 && r.stats.partitions > 0 && r.stats.manager_restarts > 0);
    assert!(r.stats.bad_chunks > 0 && r.stats.dropped > 0);
}

/// Medium fleets (13–64 agents) name enough sources over a faulty run to fill an agent's
/// source table. Seeds 482 and 507 (and 881, 1640, 1778, 2549, 2665 further on) used to stall
/// for good when agent-core overlaid each `Sources` on the ranges it already had: a range whose
/// new source did not fit its nine source slots was dropped and the agent kept asking an older
/// source that itself waited on it (`Refuse(NotYet)` forever, never reported). A hundred seeds
/// around those two run here; the soak runs the rest:
/// `cargo run --release -p baton-sim -- --sweep 3000 --sweep-size medium`.
#[test]
fn medium_faulty_fleets_keep_every_invariant() {
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let r =
        baton_sim::sweep::sweep_sized(450, 100, threads, baton_sim::scenario::SweepSize::Medium);
    for f in &r.failures {
        eprint!("{f}");
    }
    assert!(
        r.failures.is_empty(),
        "{} of {} seeds failed",
        r.failures.len(),
        r.seeds
    );
}
