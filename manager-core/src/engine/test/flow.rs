//! A job's normal course: plan, persist, instruct, progress, confirm, `Done`; late joiners,
//! returns, `NextPlease`, timers, large fleets.

use super::*;

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

/// Gives agent `i` of `fleet` the label `key=value`.
fn label(fleet: &mut Fleet, i: usize, key: &str, value: &str) {
    fleet.agents[i]
        .report
        .labels
        .push(baton_protocol::types::Label {
            key: key.try_into().unwrap(),
            value: value.try_into().unwrap(),
        })
        .unwrap();
}

#[test]
fn a_label_selector_job_takes_in_matching_agents_that_connect_while_it_runs() {
    let mut fleet = Fleet::with_agents(1, 4);
    for i in 0..4 {
        label(&mut fleet, i, "role", "edge");
    }
    label(&mut fleet, 3, "site", "fra");
    let newcomer = fleet.add("new-edge", true, 1_000_000, 8);
    label(&mut fleet, newcomer, "role", "edge");
    label(&mut fleet, newcomer, "site", "ams");
    let other = fleet.add("new-core", true, 1_000_000, 8);
    label(&mut fleet, other, "role", "core");
    let unlabelled = fleet.add("new-bare", true, 1_000_000, 8);
    for i in 0..4 {
        fleet.connect(i);
    }
    // The group's members when the job starts: a00..a03; the selector is role=edge.
    let members: Vec<AgentId> = (0..4).map(|i| fleet.agents[i].id.clone()).collect();
    let targets = Targets::Selected {
        agents: members,
        labels: [("role".to_string(), "edge".to_string())].into(),
    };
    fleet.start(1, 32, targets, Policy::default());
    for _ in 0..3 {
        fleet.step(2);
    }
    // Connecting while it runs: the agent carrying the label joins, the others do not.
    for i in [newcomer, other, unlabelled] {
        fleet.connect(i);
    }
    assert_eq!(fleet.agents[newcomer].fetches, 1);
    assert_eq!(fleet.agents[other].fetches, 0);
    assert_eq!(fleet.agents[unlabelled].fetches, 0);
    let status = fleet.engine.job_status(1).unwrap();
    assert_eq!(status.participants.len(), 5);
    fleet.run(1, 2, 500);
    assert_eq!(fleet.state(1, "new-edge"), ParticipantState::Confirmed);
    assert!(fleet.log.contains(&Output::Persist(Persist::JobFinished {
        job: 1,
        confirmed: 5,
        failed: 0
    })));
    // A selector with no labels takes nobody in.
    let none = Targets::Selected {
        agents: Vec::new(),
        labels: Default::default(),
    };
    assert!(!none.takes_in(&Profile::from(&fleet.agents[newcomer].report)));
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

#[test]
fn a_blind_job_is_planned_again_with_the_uploads_its_fetchers_measure() {
    // Eight servers that declared no rates: the first plan treats them alike.
    let mut fleet = Fleet::new(1);
    for i in 0..8 {
        fleet.add(&format!("b{i}"), true, 0, 8);
    }
    fleet.connect_all();
    fleet.start(1, 800, Targets::All, Policy::default());
    let plan = |fleet: &Fleet| fleet.engine.jobs[&1].plan.clone().unwrap();
    let served = |plan: &RelayPlan, i: u32| plan.served_chunks(crate::planner::Holder::Peer(i));
    let first = plan(&fleet);
    let sent_before = fleet.log.len();
    // What the fetchers report: b0..b3 deliver five times what b4..b7 do.
    let rate = |j: usize| if j < 4 { 500_000u64 } else { 100_000 };
    let job = JobRef { id: 1, epoch: 1 };
    // Every fetcher reports `share` of a window's worth from each of its 7 sources.
    let report = |fleet: &mut Fleet, verified: u32, share: u64| {
        for f in 0..8 {
            let mut received = heapless::Vec::new();
            for j in (0..8).filter(|&j| j != f) {
                let from = Some(fleet.agents[j].id.clone());
                let bytes = rate(j) / 7 / share;
                received.push(Received { from, bytes }).unwrap();
            }
            let progress = Message::Progress {
                job,
                verified,
                received,
            };
            fleet.send(f, progress);
        }
    };
    // Each window's bytes are verified chunks (the engine counts no more than that).
    for w in 0..=rates::MIN_WINDOWS as u32 {
        report(&mut fleet, 100 * (w + 1), 4);
        fleet.now += rates::RATE_WINDOW;
        fleet.engine.handle_timeout(fleet.now);
        fleet.drain();
    }
    let second = plan(&fleet);
    second.check().unwrap();
    assert_eq!(fleet.engine.jobs[&1].rates.replans, 1, "one re-plan");
    let fast = |p: &RelayPlan| (0..4).map(|i| served(p, i)).sum::<u64>();
    let slow = |p: &RelayPlan| (4..8).map(|i| served(p, i)).sum::<u64>();
    assert!(
        fast(&first) < 2 * slow(&first),
        "blind: about equal shares ({} vs {})",
        fast(&first),
        slow(&first)
    );
    assert!(
        fast(&second) > 3 * slow(&second),
        "measured: the fast sources serve most ({} vs {})",
        fast(&second),
        slow(&second)
    );
    let resent = fleet.log[sent_before..]
        .iter()
        .filter(|o| matches!(o, Output::Transmit(_, Message::Sources { .. })))
        .count();
    assert!(resent >= 4, "fetchers learn their new sources ({resent})");
    // Measured rates matching the plan call for nothing more.
    report(&mut fleet, 600, 2);
    fleet.now += rates::REPLAN_GAP;
    fleet.engine.handle_timeout(fleet.now);
    fleet.drain();
    assert_eq!(fleet.engine.jobs[&1].rates.replans, 1, "no churn");
}

#[test]
fn an_agent_fetching_one_content_in_two_jobs_keeps_fetching_it_when_one_is_cancelled() {
    // The driver stops a cancelled job's chunk answers per content root; it asks this first
    // (`Engine::fetches_root_elsewhere`), so a second job for the same content is not starved.
    let mut fleet = Fleet::with_agents(1, 3);
    fleet.connect_all();
    fleet.start(1, 32, Targets::All, Policy::default());
    fleet.start(2, 32, Targets::All, Policy::default());
    let a = fleet.agents[0].id.clone();
    assert!(fleet.engine.fetches_root_elsewhere(&a, &ROOT, 1));
    assert!(fleet.engine.fetches_root_elsewhere(&a, &ROOT, 2));
    fleet.engine.cancel_job(fleet.now, 2).unwrap();
    fleet.drain();
    assert!(
        fleet.engine.fetches_root_elsewhere(&a, &ROOT, 2),
        "job 1 still fetches the content"
    );
    assert!(
        !fleet.engine.fetches_root_elsewhere(&a, &ROOT, 1),
        "job 2 no longer runs"
    );
    assert!(!fleet.engine.fetches_root_elsewhere(&a, &[9; 32], 2));
}
