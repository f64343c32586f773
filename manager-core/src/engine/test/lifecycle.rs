//! The administrator's commands over a job's life: resume after a restart under a new epoch,
//! and cancel.

use super::*;

/// Asserts that in the sources `fetching` were last given, no peer is to send more than twice
/// its upload-proportional share (among every agent and the manager) of the chunks they lack.
fn assert_fair_shares(fleet: &Fleet, fetching: &[AgentId]) {
    let mut served: HashMap<AgentId, u64> = HashMap::new();
    let mut total = 0u64;
    for a in fetching {
        let agent = &fleet.agents[fleet.by_id[a]];
        for r in &agent.sources {
            let missing = (r.first..r.end)
                .filter(|&c| !agent.have[c as usize])
                .count() as u64;
            total += missing;
            if let Source::Peer { id, .. } = &r.source {
                *served.entry(id.clone()).or_default() += missing;
            }
        }
    }
    let all_up: u64 = config().manager_up_bps
        + fleet
            .agents
            .iter()
            .map(|a| a.report.link.up_bps)
            .sum::<u64>();
    for (peer, chunks) in &served {
        let up = fleet.agents[fleet.by_id[peer]].report.link.up_bps;
        let share = total as f64 * up as f64 / all_up as f64;
        assert!(
            *chunks as f64 <= 2.0 * share,
            "{peer} ({up} B/s) is to send {chunks} of {total} missing chunks, share {share:.1}"
        );
    }
}

/// Runs a 16-agent job (4 of them fast) until a few confirm, and gives what a store holds
/// then: the participants in order with their states, and a second manager (epoch 2) whose
/// agents are offline and keep their chunks.
fn crashed_midway() -> (Fleet, Vec<(AgentId, ParticipantState)>, JobSpec) {
    let mut fleet = Fleet::new(1);
    for i in 0..16 {
        let up = if i < 4 { 40_000_000 } else { 10_000_000 };
        fleet.add(&format!("a{i:02}"), true, up, 16);
    }
    fleet.connect_all();
    fleet.start(1, 160, Targets::All, Policy::default());
    for _ in 0..400 {
        if fleet
            .store
            .values()
            .filter(|s| **s == ParticipantState::Confirmed)
            .count()
            >= 3
        {
            break;
        }
        fleet.step(1);
    }
    let stored: Vec<(AgentId, ParticipantState)> = match &fleet.log[0] {
        Output::Persist(Persist::JobStarted { order, .. }) => {
            order.iter().map(|a| (a.clone(), fleet.store[a])).collect()
        }
        other => panic!("{other:?}"),
    };
    let confirmed = stored
        .iter()
        .filter(|(_, s)| *s == ParticipantState::Confirmed)
        .count();
    assert!((3..16).contains(&confirmed), "{confirmed} confirmed");
    let spec = JobSpec {
        id: 1,
        manifest: manifest(160),
        targets: Targets::All,
        policy: Policy::default(),
    };
    let mut fleet2 = Fleet::new(2);
    fleet2.by_id = fleet.by_id.clone();
    fleet2.agents = std::mem::take(&mut fleet.agents);
    fleet2.now = fleet.now + Duration::from_secs(1);
    for a in &mut fleet2.agents {
        a.online = false;
        a.fetches = 0;
    }
    (fleet2, stored, spec)
}

#[test]
fn a_resumed_job_waits_for_its_participants_and_plans_them_together() {
    let (mut fleet, stored, spec) = crashed_midway();
    let fetching: Vec<AgentId> = stored
        .iter()
        .filter(|(_, s)| !s.is_terminal())
        .map(|(a, _)| a.clone())
        .collect();
    fleet.engine.resume_job(fleet.now, spec, stored, &[]);
    fleet.drain();
    // They come back one by one: nobody is instructed until the last is back.
    for i in 0..15 {
        fleet.now += Duration::from_millis(50);
        fleet.connect(i);
    }
    assert!(fleet.agents.iter().all(|a| a.fetches == 0));
    fleet.connect(15);
    // Then everyone not done gets one plan over what they hold: no peer is set to send more
    // than twice its upload-proportional share of the missing chunks (one plan for all, not
    // each newcomer hung on the first holder with room).
    for a in &fetching {
        assert_eq!(fleet.agents[fleet.by_id[a]].fetches, 1, "{a}");
    }
    assert_fair_shares(&fleet, &fetching);
    fleet.run(1, 2, 500);
    assert!(fleet.agents.iter().all(FakeAgent::complete));
}

#[test]
fn a_resumed_job_stops_waiting_for_the_missing_and_keeps_the_measured_rates() {
    let (mut fleet, stored, spec) = crashed_midway();
    // Rates measured before the crash: the fast four really are.
    let measured: Vec<(AgentId, u64)> = (0..4)
        .map(|i| (id(&format!("a{i:02}")), 40_000_000))
        .collect();
    let missing = stored
        .iter()
        .position(|(_, s)| !s.is_terminal())
        .expect("someone still fetching");
    fleet.engine.resume_job(fleet.now, spec, stored, &measured);
    fleet.drain();
    for i in (0..16).filter(|&i| i != missing) {
        fleet.connect(i);
    }
    assert!(fleet.agents.iter().all(|a| a.fetches == 0));
    // One is not back when the wait ends: the others are planned and instructed without it.
    let wait = fleet
        .engine
        .poll_timeout()
        .expect("the wait's end is a timeout");
    assert!(wait <= fleet.now + EngineConfig::default().regroup_wait);
    fleet.now = wait;
    fleet.engine.handle_timeout(fleet.now);
    fleet.drain();
    let instructed = fleet.agents.iter().filter(|a| a.fetches == 1).count();
    let done = fleet
        .agents
        .iter()
        .enumerate()
        .filter(|&(i, _)| {
            fleet.state(1, fleet.agents[i].id.as_str()) == ParticipantState::Confirmed
        })
        .count();
    assert_eq!(instructed + done + 1, 16);
    // The latecomer is placed when it comes, like a late joiner.
    fleet.connect(missing);
    assert_eq!(fleet.agents[missing].fetches, 1);
    fleet.run(1, 2, 500);
    assert!(fleet.agents.iter().all(FakeAgent::complete));
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
    fleet2
        .engine
        .resume_job(fleet2.now, spec, stored.clone(), &[]);
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
