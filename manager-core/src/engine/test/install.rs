//! The states past delivery: content-only participants run at once, others wait for their
//! agent's install report (forward moves only, a deadline), and the job ends when all settle.

use super::*;
use baton_protocol::message::InstallState;

const JOB: u64 = 40;

/// A fleet of `n` agents; those in `installers` say they install what they receive.
fn fleet(n: usize, installers: &[usize]) -> Fleet {
    let mut fleet = Fleet::with_agents(1, n);
    fleet.connect_all();
    for &i in installers {
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

/// Steps until every participant confirmed; panics after `max_steps`.
fn until_confirmed(fleet: &mut Fleet, max_steps: usize) {
    for _ in 0..max_steps {
        let status = fleet.engine.job_status(JOB).unwrap();
        if status.confirmed as usize == status.participants.len() {
            return;
        }
        fleet.step(4);
    }
    panic!("not all confirmed: {:?}", fleet.engine.job_status(JOB));
}

fn status(name: &str, job: u64, state: InstallState, exit_code: Option<i32>) -> Message<'static> {
    Message::InstallStatus {
        job: JobRef { id: job, epoch: 1 },
        name: heapless_name(name),
        version: 1,
        state,
        exit_code,
        output: "tail",
    }
}

fn report(fleet: &mut Fleet, i: usize, state: InstallState) -> Result<(), EngineError> {
    let aid = fleet.agents[i].id.clone();
    let r = fleet
        .engine
        .handle_message(fleet.now, &aid, &status("fw", JOB, state, Some(0)));
    fleet.drain();
    r
}

fn install_of(fleet: &Fleet, name: &str) -> Option<InstallState> {
    let s = fleet.engine.job_status(JOB).unwrap();
    s.participants
        .iter()
        .find(|p| p.agent.as_str() == name)
        .unwrap()
        .install
}

#[test]
fn content_only_participants_run_as_soon_as_they_confirm() {
    let mut fleet = fleet(3, &[]);
    fleet.start(JOB, 16, Targets::All, Policy::default());
    fleet.run(JOB, 4, 200);
    let running: Vec<&AgentId> = fleet
        .log
        .iter()
        .filter_map(|o| match o {
            Output::Persist(Persist::Install {
                agent,
                state: Some(InstallState::Running),
                ..
            }) => Some(agent),
            _ => None,
        })
        .collect();
    assert_eq!(running.len(), 3, "each confirmation is running at once");
    assert!(fleet.log.iter().any(|o| matches!(o,
        Output::Persist(Persist::Running { agent, versions, .. }) if agent.as_str() == "a00" && versions == &[("fw".to_string(), 1)])));
}

#[test]
fn a_job_with_an_installer_ends_only_once_its_install_is_final() {
    let mut fleet = fleet(3, &[1]);
    fleet.start(JOB, 16, Targets::All, Policy::default());
    until_confirmed(&mut fleet, 200);
    assert!(!fleet.finished(JOB), "a01 has not installed yet");
    assert_eq!(install_of(&fleet, "a01"), None);
    assert_eq!(install_of(&fleet, "a00"), Some(InstallState::Running));
    assert_eq!(
        fleet.agents[1].done, 0,
        "no Done before the installs settle"
    );
    report(&mut fleet, 1, InstallState::Installing).unwrap();
    report(&mut fleet, 1, InstallState::Installed).unwrap();
    assert!(!fleet.finished(JOB));
    report(&mut fleet, 1, InstallState::Running).unwrap();
    assert!(fleet.finished(JOB), "every participant is settled");
    assert!(fleet.agents.iter().all(|a| a.done == 1));
}

#[test]
fn install_states_move_only_forward_and_never_leave_a_final_one() {
    let mut fleet = fleet(2, &[0, 1]);
    fleet.start(JOB, 8, Targets::All, Policy::default());
    until_confirmed(&mut fleet, 200);
    report(&mut fleet, 0, InstallState::Installed).unwrap();
    // Backwards: installed → installing.
    assert!(matches!(
        report(&mut fleet, 0, InstallState::Installing),
        Err(EngineError::InstallRefused { .. })
    ));
    report(&mut fleet, 0, InstallState::Running).unwrap();
    let persisted = fleet.log.len();
    // A repeat of the final state is accepted and changes nothing.
    report(&mut fleet, 0, InstallState::Running).unwrap();
    assert_eq!(fleet.log.len(), persisted);
    // Out of a final state: running → installing, running → rolled back.
    for next in [InstallState::Installing, InstallState::RolledBack] {
        assert!(matches!(
            report(&mut fleet, 0, next),
            Err(EngineError::InstallRefused { .. })
        ));
    }
    assert_eq!(install_of(&fleet, "a00"), Some(InstallState::Running));
    // Another content's name is refused; so is a newer epoch.
    let aid = fleet.agents[1].id.clone();
    let other = status("other", JOB, InstallState::Running, Some(0));
    assert!(matches!(
        fleet.engine.handle_message(fleet.now, &aid, &other),
        Err(EngineError::InstallRefused { .. })
    ));
    let future = Message::InstallStatus {
        job: JobRef { id: JOB, epoch: 9 },
        name: heapless_name("fw"),
        version: 1,
        state: InstallState::Running,
        exit_code: None,
        output: "",
    };
    assert!(matches!(
        fleet.engine.handle_message(fleet.now, &aid, &future),
        Err(EngineError::FutureEpoch { .. })
    ));
    assert_eq!(install_of(&fleet, "a01"), None);
    report(&mut fleet, 1, InstallState::RolledBack).unwrap();
    assert!(fleet.finished(JOB));
}

#[test]
fn an_install_report_before_the_confirmation_is_refused() {
    let mut fleet = fleet(2, &[0]);
    fleet.start(JOB, 64, Targets::All, Policy::default());
    fleet.step(1);
    assert!(matches!(
        report(&mut fleet, 0, InstallState::Installing),
        Err(EngineError::InstallRefused { .. })
    ));
}

#[test]
fn an_install_that_never_finishes_fails_at_the_deadline() {
    let mut fleet = fleet(2, &[1]);
    fleet.start(JOB, 8, Targets::All, Policy::default());
    until_confirmed(&mut fleet, 200);
    report(&mut fleet, 1, InstallState::Installed).unwrap();
    // The agent restarts to finish its install and never comes back.
    fleet.disconnect(1);
    fleet.now += DEFAULT_INSTALL_DEADLINE;
    fleet.engine.handle_timeout(fleet.now);
    fleet.drain();
    assert_eq!(install_of(&fleet, "a01"), Some(InstallState::Failed));
    assert!(fleet.log.iter().any(|o| matches!(o,
        Output::Persist(Persist::Install { state: Some(InstallState::Failed), output, .. })
            if output.contains("last: installed"))));
    assert!(fleet.finished(JOB));
}

#[test]
fn a_resumed_job_waits_for_the_installs_the_store_kept_pending() {
    let mut fleet = fleet(2, &[]);
    let spec = JobSpec {
        id: JOB,
        manifest: manifest(8),
        targets: Targets::All,
        policy: Policy::default(),
    };
    let stored = vec![
        (id("a00"), ParticipantState::Confirmed),
        (id("a01"), ParticipantState::Confirmed),
    ];
    fleet.engine.resume_job_with_installs(
        fleet.now,
        spec,
        stored,
        &[],
        &[(id("a01"), Some(InstallState::Installed))],
    );
    fleet.drain();
    assert!(!fleet.finished(JOB), "a01 is still installing");
    assert_eq!(install_of(&fleet, "a00"), Some(InstallState::Running));
    assert_eq!(install_of(&fleet, "a01"), Some(InstallState::Installed));
    report(&mut fleet, 1, InstallState::Running).unwrap();
    assert!(fleet.finished(JOB));
}

#[test]
fn whether_an_agent_installs_is_forgotten_when_it_goes_offline() {
    let mut fleet = fleet(2, &[0]);
    let (a, b) = (fleet.agents[0].id.clone(), fleet.agents[1].id.clone());
    assert!(fleet.engine.agents[&a].installs);
    assert!(!fleet.engine.agents[&b].installs);
    fleet.engine.agent_offline(fleet.now, &a);
    assert!(
        !fleet.engine.agents[&a].installs,
        "a stale flag would hold its confirmations for an install report that never comes"
    );
}
