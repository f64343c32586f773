//! Faults: sources that die or serve bad chunks, targets that never come, failures, bad
//! input, and a seeded chaos run.

use super::*;

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
fn a_bad_chunk_source_is_retired_once_two_fetchers_reported_it() {
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
    // The first reporter is routed around it at once.
    let first = fleet
        .agents
        .iter()
        .position(|a| a.reported.contains(&bad_id))
        .unwrap();
    let a = &fleet.agents[first];
    for c in 0..48 {
        if !a.have[c as usize] {
            assert!(
                !matches!(a.source_for(c), Source::Peer { ref id, .. } if *id == bad_id),
                "{} still fetches chunk {c} from the bad agent it reported",
                a.id
            );
        }
    }
    fleet.run(1, 3, 500);
    let reporters = fleet
        .agents
        .iter()
        .filter(|a| a.reported.contains(&bad_id))
        .count();
    assert!(
        reporters >= crate::engine::trouble::EVIDENCE,
        "{reporters} fetchers reported the bad agent"
    );
    for a in &fleet.agents {
        assert!(a.complete(), "{} incomplete", a.id);
        assert_eq!(a.used_reported, 0, "{} kept a reported source", a.id);
        assert_eq!(
            a.offered_troubled, 0,
            "{} was offered a reported source",
            a.id
        );
    }
    // Retired for everyone once the second fetcher reported it: nobody was offered it afterwards.
    let mut reporters_seen: Vec<&AgentId> = Vec::new();
    let mut retired_at = None;
    for (at, from, peer) in &fleet.troubles {
        if *peer == bad_id && !reporters_seen.contains(&from) {
            reporters_seen.push(from);
            if reporters_seen.len() == crate::engine::trouble::EVIDENCE {
                retired_at = Some(*at);
                break;
            }
        }
    }
    let mark = retired_at.expect("two fetchers reported the bad agent");
    let offered = fleet.offered_since(mark, &bad_id);
    assert!(
        offered.is_empty(),
        "{offered:?} were offered the bad source after two fetchers reported it"
    );
    let status = fleet.engine.job_status(1).unwrap();
    assert!(status.participants.iter().all(|p| !p.demoted), "{status:?}");
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

/// A `Progress` claiming impossible byte counts (the most a `u64` holds, from the reporter
/// itself and from a peer) neither overflows a counter nor stops the job.
#[test]
fn hostile_byte_counts_in_progress_are_bounded() {
    let mut fleet = Fleet::with_agents(1, 4);
    fleet.connect_all();
    fleet.start(1, 40, Targets::All, Policy::default());
    let job = fleet.agents[0].job.expect("instructed");
    let mut received = heapless::Vec::new();
    for from in [fleet.agents[0].id.clone(), fleet.agents[1].id.clone()] {
        let _ = received.push(Received {
            from: Some(from),
            bytes: u64::MAX,
        });
    }
    for _ in 0..3 {
        fleet.send(
            0,
            Message::Progress {
                job,
                verified: 0,
                received: received.clone(),
            },
        );
    }
    fleet.run(1, 2, 500);
    assert!(fleet.agents.iter().all(FakeAgent::complete));
}

#[test]
fn received_bytes_count_only_for_assigned_sources_and_verified_chunks() {
    let mut fleet = Fleet::with_agents(1, 8);
    fleet.connect_all();
    fleet.start(1, 400, Targets::All, Policy::default());
    let job = fleet.agents[0].job.expect("instructed");
    let index =
        |fleet: &Fleet, id: &AgentId| fleet.agents.iter().position(|a| &a.id == id).unwrap() as u32;
    // Agent 0's sources, and an agent it was never told to fetch from.
    let assigned: Vec<u32> = (0..400)
        .filter_map(|c| match fleet.agents[0].source_for(c) {
            Source::Peer { id, .. } => Some(index(&fleet, &id)),
            _ => None,
        })
        .collect();
    let source = *assigned.first().expect("agent 0 fetches from a peer");
    let stranger = (1..8u32)
        .find(|i| !assigned.contains(i))
        .expect("8 agents: one is not among agent 0's sources");
    let claim = |from: u32, verified: u32| Message::Progress {
        job,
        verified,
        received: heapless::Vec::from_slice(&[Received {
            from: Some(fleet.agents[from as usize].id.clone()),
            bytes: 1 << 40,
        }])
        .unwrap(),
    };
    let (to_stranger, to_source) = (claim(stranger, 0), claim(source, 4));
    fleet.send(0, to_stranger);
    fleet.send(0, to_source);
    let rates = &fleet.engine.jobs[&1].rates;
    assert_eq!(rates.open_bytes(stranger), 0, "not assigned: no credit");
    // The stranger's claim used up the slack; four verified chunks are all that is left.
    let most = (4 + crate::engine::RECEIVED_SLACK_CHUNKS) * u64::from(CHUNK);
    assert!(
        rates.open_bytes(source) <= most,
        "{} > {most}",
        rates.open_bytes(source)
    );
    fleet.run(1, 2, 500);
    assert!(fleet.agents.iter().all(FakeAgent::complete));
}
