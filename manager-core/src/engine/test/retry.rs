//! Retries of failed participants: a failed delivery or install is instructed again after
//! the policy's delay, up to its limit; then the failure stays, and the job ends.

use super::*;
use baton_protocol::message::InstallState;

fn retrying(max_retries: u32) -> Policy {
    Policy {
        max_retries,
        retry_after_secs: 5,
        ..Policy::default()
    }
}

/// Steps for `secs` seconds.
fn wait(fleet: &mut Fleet, secs: u64, rate: u32) {
    let until = fleet.now + Duration::from_secs(secs);
    while fleet.now < until {
        fleet.step(rate);
    }
}

/// Agent `i` says its delivery failed (storage full) and stops.
fn fail_delivery(fleet: &mut Fleet, i: usize) {
    let job = fleet.agents[i].job.take().expect("instructed");
    fleet.send(
        i,
        Message::Failed {
            job,
            reason: FailReason::StorageFull,
        },
    );
}

#[test]
fn a_failed_delivery_is_retried_after_the_delay_and_completes() {
    let mut fleet = Fleet::with_agents(1, 4);
    fleet.connect_all();
    fleet.start(1, 64, Targets::All, retrying(1));
    fleet.step(1);
    fail_delivery(&mut fleet, 2);
    let failed = ParticipantState::Failed(FailCause::Agent(FailReason::StorageFull));
    assert_eq!(fleet.state(1, "a02"), failed);
    let status = fleet.engine.job_status(1).unwrap();
    assert_eq!(
        status.warnings,
        ["a02: agent failed: StorageFull; retry 1 of 1 in 5 s"]
    );
    // Everyone else finishes; the job waits for the retry.
    wait(&mut fleet, 4, 8);
    assert!(!fleet.finished(1));
    assert_eq!(fleet.agents[2].fetches, 1);
    wait(&mut fleet, 1, 8);
    assert_eq!(fleet.agents[2].fetches, 2, "retried with a fresh Fetch");
    fleet.run(1, 8, 300);
    assert!(fleet.agents.iter().all(FakeAgent::complete));
    assert_eq!(fleet.engine.job_status(1).unwrap().failed, 0);
}

#[test]
fn retries_stop_at_the_limit_and_the_failure_stays() {
    let mut fleet = Fleet::with_agents(1, 3);
    fleet.connect_all();
    fleet.start(1, 400, Targets::All, retrying(2));
    fleet.step(1);
    for round in 1..=3 {
        fail_delivery(&mut fleet, 1);
        wait(&mut fleet, 6, 1);
        let fetches = fleet.agents[1].fetches;
        assert_eq!(fetches, round.min(2) + 1, "round {round}");
    }
    let failed = ParticipantState::Failed(FailCause::Agent(FailReason::StorageFull));
    assert_eq!(fleet.state(1, "a01"), failed);
    let warnings = fleet.engine.job_status(1).unwrap().warnings;
    assert_eq!(warnings.len(), 2, "{warnings:?}");
    assert!(warnings[1].ends_with("retry 2 of 2 in 5 s"), "{warnings:?}");
    fleet.run(1, 8, 500);
    let s = fleet.engine.job_status(1).unwrap();
    assert_eq!((s.confirmed, s.failed), (2, 1));
}

#[test]
fn without_retries_a_failure_is_final_at_once() {
    let mut fleet = Fleet::with_agents(1, 3);
    fleet.connect_all();
    fleet.start(1, 64, Targets::All, Policy::default());
    fleet.step(1);
    fail_delivery(&mut fleet, 0);
    fleet.run(1, 8, 200);
    assert_eq!(fleet.agents[0].fetches, 1);
    assert!(fleet.engine.job_status(1).unwrap().warnings.is_empty());
}

#[test]
fn content_the_agent_refuses_is_not_retried() {
    let mut fleet = Fleet::with_agents(1, 3);
    fleet.connect_all();
    fleet.start(1, 64, Targets::All, retrying(3));
    fleet.step(1);
    let job = fleet.agents[0].job.take().expect("instructed");
    fleet.send(
        0,
        Message::Failed {
            job,
            reason: FailReason::Downgrade,
        },
    );
    fleet.run(1, 8, 400);
    assert_eq!(
        fleet.agents[0].fetches, 1,
        "a downgrade fails the same way again"
    );
    assert_eq!(
        fleet.state(1, "a00"),
        ParticipantState::Failed(FailCause::Agent(FailReason::Downgrade))
    );
    assert!(fleet.engine.job_status(1).unwrap().warnings.is_empty());
}

#[test]
fn a_failed_install_is_run_again_and_may_succeed() {
    let mut fleet = Fleet::with_agents(1, 2);
    fleet.connect_all();
    fleet.send(
        1,
        Message::Running {
            install_step: true,
            versions: Default::default(),
        },
    );
    fleet.start(7, 16, Targets::All, retrying(1));
    for _ in 0..100 {
        if fleet.engine.job_status(7).unwrap().confirmed == 2 {
            break;
        }
        fleet.step(4);
    }
    let aid = fleet.agents[1].id.clone();
    let install = |state| Message::InstallStatus {
        job: JobRef { id: 7, epoch: 1 },
        name: heapless_name("fw"),
        version: 1,
        state,
        exit_code: Some(3),
        output: "tail",
    };
    fleet
        .engine
        .handle_message(fleet.now, &aid, &install(InstallState::Failed))
        .unwrap();
    fleet.drain();
    assert!(!fleet.finished(7));
    wait(&mut fleet, 5, 4);
    // The agent dropped the job (`Cancel`) and got it again (`Fetch`): it confirms again
    // and its install step runs anew.
    let a = &fleet.agents[1];
    assert_eq!((a.cancels, a.fetches), (1, 2));
    wait(&mut fleet, 1, 4);
    let s = fleet.engine.job_status(7).unwrap();
    let p = s.participants.iter().find(|p| p.agent == aid).unwrap();
    assert_eq!((p.state, p.install), (ParticipantState::Confirmed, None));
    fleet
        .engine
        .handle_message(fleet.now, &aid, &install(InstallState::Running))
        .unwrap();
    fleet.drain();
    assert!(fleet.finished(7));
    let s = fleet.engine.job_status(7).unwrap();
    assert_eq!((s.confirmed, s.failed), (2, 0));
}
