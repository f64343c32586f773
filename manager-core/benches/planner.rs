#![allow(missing_docs)] // criterion_group! generates undocumented functions.
//! Planner and engine benchmarks: ranking and relay planning for large fleets, and
//! starting a job for 100 000 connected agents (the design target: well under a second).

use std::hint::black_box;
use std::time::Duration;

use baton_manager_core::engine::{Engine, EngineConfig, JobSpec, Targets};
use baton_manager_core::planner::{NodeInfo, Policy, Profile, RelayPlan, Seed, prioritize};
use baton_protocol::Manifest;
use baton_protocol::identity::Identity;
use baton_protocol::message::Report;
use baton_protocol::types::{AgentId, LinkInfo, PeerAddr, PublicKey};
use criterion::{BatchSize, Criterion, criterion_group, criterion_main};

/// Agent `i` of a synthetic fleet: every fourth a leaf, uploads between 1 and 4 MB/s.
fn report(i: usize) -> Report {
    Report {
        id: AgentId::try_from(format!("n{i:06}").as_str()).unwrap(),
        listen: (i % 4 != 3).then_some(PeerAddr::V4(
            [10, (i >> 16) as u8, (i >> 8) as u8, i as u8],
            7000,
        )),
        site: Default::default(),
        segment: heapless_name(&format!("seg-{}", i / 50)),
        performance: 100 + (i % 900) as u32,
        free_storage: 1 << 30,
        can_serve: i % 4 != 3,
        max_chunk: 32 * 1024,
        max_sources: 8,
        max_peers: 16,
        link: LinkInfo {
            up_bps: 1_000_000 + (i as u64 % 7) * 500_000,
            down_bps: 10_000_000,
            loss_ppm: (i % 100) as u32,
            uptime_s: i as u64,
        },
        delays: Default::default(),
        labels: Default::default(),
        holdings: Default::default(),
    }
}

fn seeds(n: usize) -> Vec<Seed> {
    (0..n)
        .map(|i| Seed {
            info: Some(NodeInfo {
                up_bps: 1_000_000 + (i as u64 % 7) * 500_000,
                server: i % 4 != 3,
                capacity: if i % 4 != 3 { 16 } else { 0 },
                max_sources: 8,
                segment: (i / 50) as u32,
                leader: false,
            }),
            ..Seed::default()
        })
        .collect()
}

fn manifest() -> Manifest {
    Manifest::sign(
        &Identity::from_seed([7; 32]),
        heapless_name("bench"),
        1,
        0,
        1 << 30,
        32 * 1024,
        [5; 32],
    )
}

fn heapless_name<T: for<'a> TryFrom<&'a str>>(s: &str) -> T {
    T::try_from(s).ok().unwrap()
}

fn bench_planner(c: &mut Criterion) {
    let policy = Policy::default();
    for n in [1_000, 10_000, 100_000] {
        let s = seeds(n);
        c.bench_function(&format!("relay_plan_build_{n}"), |b| {
            b.iter(|| RelayPlan::build(32_768, 50_000_000, &policy, black_box(&s)))
        });
    }
    // The same fleet without segments (one flat pool: the striped Kumar–Ross plan).
    let flat: Vec<Seed> = seeds(100_000)
        .into_iter()
        .map(|mut s| {
            if let Some(info) = &mut s.info {
                info.segment = 0;
            }
            s
        })
        .collect();
    c.bench_function("relay_plan_build_flat_100000", |b| {
        b.iter(|| RelayPlan::build(32_768, 50_000_000, &policy, black_box(&flat)))
    });
    let reports: Vec<Report> = (0..100_000).map(report).collect();
    let profiles: Vec<(AgentId, Profile)> = reports
        .iter()
        .map(|r| (r.id.clone(), Profile::from(r)))
        .collect();
    c.bench_function("prioritize_100000", |b| {
        b.iter(|| prioritize(profiles.iter().map(|(id, p)| (id, p)), &policy))
    });
}

fn bench_engine(c: &mut Criterion) {
    let mut group = c.benchmark_group("engine");
    group.sample_size(10);
    // Default policy, and one with rate caps per agent and per segment and at most two
    // agents per segment fetching across the WAN (every participant also gets a Throttle).
    let capped = Policy {
        agent_rate_cap_bps: 5_000_000,
        segment_rate_cap_bps: 20_000_000,
        max_wan_transfers_per_segment: 2,
        ..Policy::default()
    };
    for (name, policy) in [
        ("start_job_100000", Policy::default()),
        ("start_job_100000_caps", capped),
    ] {
        group.bench_function(name, |b| {
            b.iter_batched(
                || {
                    let mut engine = Engine::new(1, EngineConfig::default());
                    for i in 0..100_000 {
                        let r = report(i);
                        engine.agent_online(Duration::ZERO, r.id.clone(), PublicKey([1; 32]), r);
                    }
                    engine
                },
                |mut engine| {
                    let spec = JobSpec {
                        id: 1,
                        manifest: manifest(),
                        targets: Targets::All,
                        policy: policy.clone(),
                    };
                    engine.start_job(Duration::from_secs(1), spec).unwrap();
                    while engine.poll_persist().is_some() {}
                    while engine.poll_transmit().is_some() {}
                    engine
                },
                BatchSize::PerIteration,
            )
        });
    }
    group.finish();
}

criterion_group!(benches, bench_planner, bench_engine);
criterion_main!(benches);
