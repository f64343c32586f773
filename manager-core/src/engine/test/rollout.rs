//! Staged rollouts: later waves wait and fetch from the earlier ones, failures pause or
//! abort, soak and approval gate the next wave, pause holds new instructions, and the
//! rollout's state survives a restart.

use super::*;
use crate::planner::{Rollout, Wave};
use baton_protocol::message::InstallState;

const JOB: u64 = 70;

fn staged(rollout: Rollout) -> Policy {
    Policy {
        rollout: Some(rollout),
        ..Policy::default()
    }
}

fn waves_10_50_100() -> Rollout {
    Rollout {
        waves: vec![Wave::Percent(10), Wave::Percent(50), Wave::Percent(100)],
        ..Rollout::default()
    }
}

/// `n` connected agents that all install what they receive (their reports come from
/// [`settle`]).
fn installing_fleet(n: usize) -> Fleet {
    let mut fleet = Fleet::with_agents(1, n);
    fleet.connect_all();
    for i in 0..n {
        fleet.send(
            i,
            Message::Running {
                install_step: true,
                versions: Default::default(),
            },
        );
    }
    fleet
}

/// The participants of each wave, in order (from the job's status and rollout state).
fn waves(fleet: &Fleet) -> Vec<Vec<AgentId>> {
    let status = fleet.engine.job_status(JOB).unwrap();
    let rollout = status.rollout.expect("a staged job");
    let mut out = vec![Vec::new(); rollout.ends.len()];
    for (pos, p) in status.participants.iter().enumerate() {
        out[rollout.wave_of(pos as u32)].push(p.agent.clone());
    }
    out
}

fn rollout(fleet: &Fleet) -> RolloutState {
    fleet.engine.rollout_state(JOB).unwrap().clone()
}

/// Reports an install result for every confirmed participant without one: failed for
/// those in `failing`, running for the others.
fn settle(fleet: &mut Fleet, failing: &[AgentId]) {
    let Some(status) = fleet.engine.job_status(JOB) else {
        return;
    };
    for p in status.participants {
        if p.state != ParticipantState::Confirmed || p.install.is_some() {
            continue;
        }
        let state = if failing.contains(&p.agent) {
            InstallState::Failed
        } else {
            InstallState::Running
        };
        let msg = Message::InstallStatus {
            job: JobRef { id: JOB, epoch: 1 },
            name: heapless_name("fw"),
            version: 1,
            state,
            exit_code: Some(if state == InstallState::Failed { 1 } else { 0 }),
            output: "",
        };
        fleet
            .engine
            .handle_message(fleet.now, &p.agent, &msg)
            .unwrap();
        fleet.drain();
    }
}

/// Steps (settling installs) until `done` holds; panics after `max_steps`.
fn until(fleet: &mut Fleet, failing: &[AgentId], max_steps: usize, done: impl Fn(&Fleet) -> bool) {
    for _ in 0..max_steps {
        if done(fleet) {
            return;
        }
        fleet.step(4);
        settle(fleet, failing);
    }
    panic!("condition not reached: {:?}", fleet.engine.job_status(JOB));
}

fn fetches_of(fleet: &Fleet, ids: &[AgentId]) -> u32 {
    ids.iter()
        .map(|a| fleet.agents[fleet.by_id[a]].fetches)
        .sum()
}

#[test]
fn later_waves_wait_for_the_earlier_and_fetch_from_them() {
    let mut fleet = installing_fleet(20);
    fleet.start(JOB, 64, Targets::All, staged(waves_10_50_100()));
    let w = waves(&fleet);
    assert_eq!([w[0].len(), w[1].len(), w[2].len()], [2, 8, 10]);
    assert_eq!(fetches_of(&fleet, &w[0]), 2);
    assert_eq!(fetches_of(&fleet, &w[1]) + fetches_of(&fleet, &w[2]), 0);
    // Wave 2 opens only once wave 1 runs the content; wave 3 once wave 2 does.
    until(&mut fleet, &[], 400, |f| rollout(f).opened == 2);
    for a in &w[0] {
        assert_eq!(fleet.state(JOB, a), ParticipantState::Confirmed);
    }
    assert_eq!(fetches_of(&fleet, &w[2]), 0, "wave 3 is held");
    until(&mut fleet, &[], 400, |f| rollout(f).opened == 3);
    until(&mut fleet, &[], 400, |f| f.finished(JOB));
    assert_eq!(rollout(&fleet).name(), "complete");
    // Wave 3 fetched from the holders of waves 1 and 2, not from the manager or each other.
    let earlier: Vec<&AgentId> = w[0].iter().chain(&w[1]).collect();
    let (mut from_earlier, mut total) = (0u64, 0u64);
    for o in &fleet.log {
        if let Output::Persist(Persist::SourceBytes {
            agent, from, bytes, ..
        }) = o
            && w[2].contains(agent)
        {
            total += bytes;
            if from.as_ref().is_some_and(|f| earlier.contains(&f)) {
                from_earlier += bytes;
            }
        }
    }
    assert!(total > 0);
    assert!(
        from_earlier * 100 >= total * 90,
        "wave 3 got {from_earlier} of {total} bytes from waves 1-2"
    );
}

#[test]
fn failures_beyond_the_threshold_pause_and_resume_accepts_them() {
    let mut fleet = installing_fleet(20);
    let rules = Rollout {
        pause_after_failures: Some(1),
        ..waves_10_50_100()
    };
    fleet.start(JOB, 32, Targets::All, staged(rules));
    let w = waves(&fleet);
    let failing = vec![w[1][1].clone(), w[1][5].clone()];
    until(&mut fleet, &failing, 600, |f| rollout(f).paused.is_some());
    let state = rollout(&fleet);
    assert_eq!(state.opened, 2);
    assert!(
        state
            .paused
            .as_deref()
            .unwrap()
            .contains("wave 2: 2 participants failed")
    );
    // Paused: wave 3 hears nothing, however long it waits (the rest of wave 2 finishes).
    for _ in 0..200 {
        fleet.step(4);
        settle(&mut fleet, &failing);
    }
    assert_eq!(fetches_of(&fleet, &w[2]), 0, "wave 3 is held while paused");
    assert!(!fleet.finished(JOB));
    assert!(fleet.events().iter().any(|e| matches!(e,
        EngineEvent::Rollout { text, .. } if text.contains("rollout paused"))));
    // Approve is no way around a pause; resume opens wave 3 (its wave 2 succeeded).
    assert!(matches!(
        fleet.engine.approve_wave(fleet.now, JOB),
        Err(EngineError::Rollout { .. })
    ));
    fleet.engine.resume_rollout(fleet.now, JOB).unwrap();
    fleet.drain();
    assert_eq!(rollout(&fleet).opened, 3);
    assert_eq!(rollout(&fleet).accepted_failures[1], 2);
    assert!(fetches_of(&fleet, &w[2]) >= 10);
    until(&mut fleet, &failing, 600, |f| f.finished(JOB));
    let status = fleet.engine.job_status(JOB).unwrap();
    let running = status
        .participants
        .iter()
        .filter(|p| p.install == Some(InstallState::Running))
        .count();
    assert_eq!(running, 18);
    assert!(matches!(
        fleet.engine.resume_rollout(fleet.now, JOB),
        Err(EngineError::JobEnded(_))
    ));
}

#[test]
fn soak_and_approval_gate_the_next_wave() {
    let mut fleet = installing_fleet(4);
    let rules = Rollout {
        waves: vec![Wave::Percent(50), Wave::Percent(100)],
        soak_secs: 30,
        approval: true,
        ..Rollout::default()
    };
    fleet.start(JOB, 16, Targets::All, staged(rules));
    let w = waves(&fleet);
    until(&mut fleet, &[], 300, |f| rollout(f).soak_until.is_some());
    let soak_started = fleet.now;
    assert_eq!(rollout(&fleet).name(), "soaking");
    assert!(matches!(
        fleet.engine.approve_wave(fleet.now, JOB),
        Err(EngineError::Rollout { reason, .. }) if reason.contains("soaking")
    ));
    until(&mut fleet, &[], 400, |f| rollout(f).awaiting_approval);
    assert!(fleet.now - soak_started >= Duration::from_secs(30));
    assert_eq!(
        fetches_of(&fleet, &w[1]),
        0,
        "wave 2 waits for the soak, then approval"
    );
    for _ in 0..50 {
        fleet.step(4);
    }
    assert_eq!(fetches_of(&fleet, &w[1]), 0);
    assert_eq!(rollout(&fleet).name(), "awaiting_approval");
    fleet.engine.approve_wave(fleet.now, JOB).unwrap();
    fleet.drain();
    assert_eq!(fetches_of(&fleet, &w[1]), 2);
    until(&mut fleet, &[], 300, |f| f.finished(JOB));
}

#[test]
fn a_pause_holds_new_instructions_and_abort_ends_the_job() {
    let mut fleet = Fleet::with_agents(1, 6);
    for i in 0..5 {
        fleet.connect(i);
    }
    fleet.start(JOB, 64, Targets::All, Policy::default());
    fleet.step(1);
    fleet.engine.pause_job(fleet.now, JOB).unwrap();
    fleet.drain();
    assert!(
        fleet.engine.pause_job(fleet.now, JOB).is_err(),
        "paused already"
    );
    // A late joiner and a participant that comes back are not instructed while paused;
    // those instructed go on fetching.
    fleet.connect(5);
    fleet.disconnect(0);
    fleet.connect(0);
    assert_eq!(fleet.agents[5].fetches, 0);
    assert_eq!(fleet.agents[0].fetches, 1, "only its first Fetch");
    let verified_before = fleet.agents[1].verified();
    fleet.step(2);
    assert!(fleet.agents[1].verified() > verified_before);
    fleet.engine.resume_rollout(fleet.now, JOB).unwrap();
    fleet.drain();
    assert_eq!(fleet.agents[5].fetches, 1);
    assert_eq!(fleet.agents[0].fetches, 2);
    // Abort: the job ends, its connected participants get Cancel.
    fleet.engine.abort_job(fleet.now, JOB).unwrap();
    fleet.drain();
    assert!(fleet.finished(JOB));
    assert_eq!(
        fleet.engine.job_status(JOB).unwrap().outcome,
        JobOutcome::Cancelled
    );
    assert_eq!(rollout(&fleet).name(), "aborted");
    assert!(fleet.agents.iter().all(|a| a.cancels == 1));
}

#[test]
fn failures_beyond_the_abort_threshold_abort_and_later_waves_never_hear() {
    let mut fleet = installing_fleet(10);
    let rules = Rollout {
        waves: vec![Wave::Percent(30), Wave::Percent(100)],
        abort_after_failures: Some(0),
        ..Rollout::default()
    };
    fleet.start(JOB, 16, Targets::All, staged(rules));
    let w = waves(&fleet);
    let failing = vec![w[0][0].clone()];
    until(&mut fleet, &failing, 300, |f| f.finished(JOB));
    let state = rollout(&fleet);
    assert!(
        state
            .aborted
            .as_deref()
            .unwrap()
            .contains("wave 1: 1 participants failed")
    );
    assert_eq!(fetches_of(&fleet, &w[1]), 0);
    assert!(
        w[1].iter()
            .all(|a| fleet.agents[fleet.by_id[a]].cancels == 0)
    );
}

#[test]
fn the_wave_plan_and_a_pause_survive_a_restart() {
    let mut fleet = installing_fleet(10);
    let rules = Rollout {
        waves: vec![Wave::Percent(20), Wave::Percent(100)],
        ..Rollout::default()
    };
    let policy = staged(rules);
    fleet.start(JOB, 32, Targets::All, policy.clone());
    let w = waves(&fleet);
    fleet.engine.pause_job(fleet.now, JOB).unwrap();
    fleet.drain();
    until(&mut fleet, &[], 300, |f| {
        w[0].iter()
            .all(|a| f.state(JOB, a) == ParticipantState::Confirmed)
    });
    // What the store holds: the order, the states, the installs, the rollout's last state.
    let stored: Vec<(AgentId, ParticipantState)> = fleet
        .engine
        .job_status(JOB)
        .unwrap()
        .participants
        .iter()
        .map(|p| (p.agent.clone(), fleet.store[&p.agent]))
        .collect();
    let kept = fleet
        .log
        .iter()
        .rev()
        .find_map(|o| match o {
            Output::Persist(Persist::Rollout { state, .. }) => Some(state.clone()),
            _ => None,
        })
        .unwrap();
    assert!(kept.paused.is_some());
    let installs: Vec<(AgentId, Option<InstallState>)> = w[0]
        .iter()
        .map(|a| (a.clone(), Some(InstallState::Running)))
        .collect();

    let old_agents = std::mem::take(&mut fleet.agents);
    let mut fleet2 = Fleet::new(2);
    fleet2.by_id = fleet.by_id.clone();
    fleet2.agents = old_agents;
    fleet2.now = fleet.now + Duration::from_secs(5);
    for a in &mut fleet2.agents {
        a.online = false;
        a.fetches = 0;
    }
    let spec = JobSpec {
        id: JOB,
        manifest: manifest(32),
        targets: Targets::All,
        policy,
    };
    fleet2
        .engine
        .resume_staged_job(fleet2.now, spec, stored, &[], &installs, Some(kept));
    fleet2.drain();
    fleet2.connect_all();
    for _ in 0..100 {
        fleet2.step(4);
    }
    assert_eq!(
        fetches_of(&fleet2, &w[1]),
        0,
        "still paused after the restart"
    );
    assert_eq!(fleet2.engine.rollout_state(JOB).unwrap().opened, 1);
    fleet2.engine.resume_rollout(fleet2.now, JOB).unwrap();
    fleet2.drain();
    assert_eq!(fleet2.engine.rollout_state(JOB).unwrap().opened, 2);
    assert_eq!(fetches_of(&fleet2, &w[1]), 8);
}

/// Reports `state` as the install result of `agent` if it confirmed and has none yet;
/// returns whether it did.
fn settle_one(fleet: &mut Fleet, agent: &AgentId, state: InstallState) -> bool {
    let waiting = fleet.engine.job_status(JOB).is_some_and(|s| {
        s.participants.iter().any(|p| {
            p.agent == *agent && p.state == ParticipantState::Confirmed && p.install.is_none()
        })
    });
    if !waiting {
        return false;
    }
    let msg = Message::InstallStatus {
        job: JobRef { id: JOB, epoch: 1 },
        name: heapless_name("fw"),
        version: 1,
        state,
        exit_code: Some(i32::from(state == InstallState::Failed)),
        output: "",
    };
    fleet.engine.handle_message(fleet.now, agent, &msg).unwrap();
    fleet.drain();
    true
}

/// Steps until `agent` confirmed and then reports `state` for it; panics after `max_steps`.
fn step_and_settle(fleet: &mut Fleet, agent: &AgentId, state: InstallState, max_steps: usize) {
    for _ in 0..max_steps {
        if settle_one(fleet, agent, state) {
            return;
        }
        fleet.step(4);
    }
    panic!("{agent} never waited for its install report");
}

#[test]
fn a_failure_that_was_retried_still_counts_towards_the_threshold() {
    let mut fleet = installing_fleet(20);
    let rules = Rollout {
        pause_after_failures: Some(1),
        ..waves_10_50_100()
    };
    let policy = Policy {
        max_retries: 3,
        retry_after_secs: 1,
        ..staged(rules)
    };
    fleet.start(JOB, 32, Targets::All, policy);
    let w = waves(&fleet);
    // Wave 1 runs; wave 2 opens.
    until(&mut fleet, &[], 600, |f| rollout(f).opened >= 2);
    let (first, second) = (w[1][1].clone(), w[1][5].clone());
    // The first fails alone (one failure: no pause), is retried and then runs.
    step_and_settle(&mut fleet, &first, InstallState::Failed, 600);
    assert!(rollout(&fleet).paused.is_none());
    step_and_settle(&mut fleet, &first, InstallState::Running, 600);
    // The second fails later: two failures in the wave, though the first was mended.
    step_and_settle(&mut fleet, &second, InstallState::Failed, 600);
    let paused = rollout(&fleet).paused;
    assert!(
        paused
            .as_deref()
            .is_some_and(|p| p.contains("wave 2: 2 participants failed")),
        "{paused:?}"
    );
}
