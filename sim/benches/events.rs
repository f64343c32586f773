#![allow(missing_docs)] // criterion_group! generates undocumented functions.
//! Simulator throughput: events per second for a fault-free fleet and for the faulty sweep.
//!
//! Criterion reports each run's time and its throughput in events (`elem/s`); a plain line
//! with events per second is printed too. Run with `cargo bench -p baton-sim --bench events`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use baton_sim::scenario::Scenario;
use baton_sim::simulation::Simulation;
use baton_sim::sweep::run_seed;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

/// 500 agents, 128 chunks: big enough that agents' state falls out of cache as in large runs.
fn fleet_scenario() -> Scenario {
    let mut s = Scenario::new(500, 1);
    s.chunks = 128;
    s.content_bytes = 128 * 32 * 1024;
    s
}

fn events_per_second(name: &str, events: u64, run: impl Fn() -> u64) {
    let started = Instant::now();
    let mut total = 0;
    let mut runs = 0;
    while runs < 3 || started.elapsed().as_secs_f64() < 2.0 {
        total += run();
        runs += 1;
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{name}: {events} events per run, {:.0} simulator events per second",
        total as f64 / secs
    );
}

fn bench_events(c: &mut Criterion) {
    let s = fleet_scenario();
    let events = Simulation::new(&s).run().stats.events;
    events_per_second("fleet_500x128", events, || {
        Simulation::new(&s).run().stats.events
    });
    let mut g = c.benchmark_group("simulator");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(15));
    g.throughput(Throughput::Elements(events));
    g.bench_function("fleet_500x128", |b| {
        b.iter(|| black_box(Simulation::new(black_box(&s)).run().stats.events))
    });
    let seeds = 0..50u64;
    let sweep_events: u64 = seeds.clone().map(|s| run_seed(s).stats.events).sum();
    events_per_second("faulty_seeds_0_50", sweep_events, || {
        seeds.clone().map(|s| run_seed(s).stats.events).sum()
    });
    g.throughput(Throughput::Elements(sweep_events));
    g.bench_function("faulty_seeds_0_50", |b| {
        b.iter(|| {
            black_box(
                seeds
                    .clone()
                    .map(|s| run_seed(black_box(s)).stats.events)
                    .sum::<u64>(),
            )
        })
    });
    g.finish();
}

criterion_group!(benches, bench_events);
criterion_main!(benches);
