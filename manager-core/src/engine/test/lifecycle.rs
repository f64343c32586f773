//! The administrator's commands over a job's life: resume after a restart under a new epoch,
//! and cancel.

use super::*;

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
    fleet2.engine.resume_job(fleet2.now, spec, stored.clone());
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
