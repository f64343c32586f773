//! `PeerTrouble` rules: a report is heard only from a fetcher assigned to the peer; one
//! report routes only the reporter around it; two retire it for everyone; a reporter whose
//! accusation is contradicted, or that accuses too many peers, is demoted.

use super::*;

/// The participants of job 1 as the engine reports them.
fn participants(fleet: &Fleet) -> Vec<ParticipantStatus> {
    fleet.engine.job_status(1).unwrap().participants
}

/// The current distinct peer sources of every participant of job 1, by name.
fn peer_sources(fleet: &Fleet) -> BTreeMap<AgentId, Vec<AgentId>> {
    participants(fleet)
        .into_iter()
        .map(|p| (p.agent, p.sources.into_iter().flatten().collect()))
        .collect()
}

/// The participants whose current sources name `peer`.
fn fetchers_of(fleet: &Fleet, peer: &AgentId) -> Vec<usize> {
    let sources = peer_sources(fleet);
    let mut out: Vec<usize> = sources
        .iter()
        .filter(|(_, s)| s.contains(peer))
        .map(|(a, _)| fleet.by_id[a])
        .collect();
    out.sort_unstable();
    out
}

/// Participant `name` of job 1.
fn participant(fleet: &Fleet, name: &AgentId) -> ParticipantStatus {
    participants(fleet)
        .into_iter()
        .find(|p| p.agent == *name)
        .unwrap()
}

/// `from` reports a bad chunk from `peer`: the first chunk it was told to fetch from it
/// (chunk 0 if none).
fn bad_chunk(fleet: &mut Fleet, from: usize, peer: &AgentId) {
    let job = fleet.agents[from].job.unwrap();
    let index = (0..48)
        .find(|&c| matches!(fleet.agents[from].source_for(c), Source::Peer { ref id, .. } if id == peer))
        .unwrap_or(0);
    fleet.send(
        from,
        Message::PeerTrouble {
            job,
            peer: peer.clone(),
            trouble: Trouble::BadChunk { index },
        },
    );
}

/// A fleet of 12 with job 1 planned and instructed, and the peer with the most fetchers.
fn planned() -> (Fleet, AgentId) {
    let mut fleet = Fleet::with_agents(1, 12);
    fleet.connect_all();
    fleet.start(1, 48, Targets::All, Policy::default());
    let peer = (0..12)
        .map(|i| fleet.agents[i].id.clone())
        .max_by_key(|p| (fetchers_of(&fleet, p).len(), std::cmp::Reverse(p.clone())))
        .unwrap();
    assert!(
        fetchers_of(&fleet, &peer).len() >= 3,
        "{peer} serves three fetchers or more: {:?}",
        peer_sources(&fleet)
    );
    (fleet, peer)
}

fn demotions(fleet: &Fleet) -> Vec<AgentId> {
    fleet
        .events()
        .into_iter()
        .filter_map(|e| match e {
            EngineEvent::ReporterDemoted { agent, .. } => Some(agent.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn a_report_about_a_peer_the_reporter_was_not_assigned_to_is_ignored_and_counted() {
    let (mut fleet, _) = planned();
    // A peer that serves some but not all.
    let (peer, stranger) = (0..12)
        .filter_map(|p| {
            let peer = fleet.agents[p].id.clone();
            let fetchers = fetchers_of(&fleet, &peer);
            let stranger = (0..12).find(|&i| i != p && !fetchers.contains(&i))?;
            (!fetchers.is_empty()).then_some((peer, stranger))
        })
        .next()
        .expect("a peer that someone does not fetch from");
    let fetchers = fetchers_of(&fleet, &peer);
    let before = peer_sources(&fleet);
    let mark = fleet.log.len();
    bad_chunk(&mut fleet, stranger, &peer);
    let job = fleet.agents[stranger].job.unwrap();
    fleet.send(
        stranger,
        Message::PeerTrouble {
            job,
            peer: peer.clone(),
            trouble: Trouble::Unreachable,
        },
    );
    fleet.send(
        stranger,
        Message::PeerTrouble {
            job,
            peer: id("nobody"),
            trouble: Trouble::BadChunk { index: 1 },
        },
    );
    // Nothing changed: no message, no record, no event.
    assert_eq!(fleet.log.len(), mark, "{:?}", &fleet.log[mark..]);
    assert_eq!(peer_sources(&fleet), before);
    let status = participant(&fleet, &fleet.agents[stranger].id.clone());
    assert_eq!(status.unfounded_reports, 3);
    assert!(!status.demoted);
    // Many unfounded reports from many strangers still retire nobody.
    for i in 0..12 {
        if fleet.agents[i].id != peer && !fetchers.contains(&i) {
            bad_chunk(&mut fleet, i, &peer);
        }
    }
    assert_eq!(fetchers_of(&fleet, &peer), fetchers);
    fleet.run(1, 3, 500);
    assert!(demotions(&fleet).is_empty());
}

#[test]
fn one_report_routes_only_the_reporter_around_the_peer() {
    let (mut fleet, peer) = planned();
    let fetchers = fetchers_of(&fleet, &peer);
    let reporter = fetchers[0];
    let mark = fleet.log.len();
    bad_chunk(&mut fleet, reporter, &peer);
    // The reporter gets new sources without the peer; the others keep it.
    let rid = fleet.agents[reporter].id.clone();
    assert!(
        fleet.log[mark..]
            .iter()
            .any(|o| matches!(o, Output::Transmit(to, Message::Sources { .. }) if *to == rid))
    );
    assert!(!peer_sources(&fleet)[&rid].contains(&peer));
    for &f in &fetchers[1..] {
        assert!(
            peer_sources(&fleet)[&fleet.agents[f].id].contains(&peer),
            "{} still fetches from {peer}",
            fleet.agents[f].id
        );
    }
    // The same reporter again, even many times, is one reporter.
    for _ in 0..5 {
        bad_chunk(&mut fleet, reporter, &peer);
    }
    for &f in &fetchers[1..] {
        assert!(peer_sources(&fleet)[&fleet.agents[f].id].contains(&peer));
    }
    fleet.run(1, 3, 500);
    assert!(fleet.agents.iter().all(FakeAgent::complete));
    // The reporter was never offered the peer again.
    let offered_after = fleet.log[mark..].iter().any(|o| {
        matches!(o, Output::Transmit(to, Message::Fetch { sources, .. } | Message::Sources { sources, .. })
            if *to == rid && sources.iter().any(|r| matches!(&r.source, Source::Peer { id, .. } if *id == peer)))
    });
    assert!(!offered_after, "{rid} was offered {peer} again");
    // The peer went on serving the others.
    assert!(fleet.log[mark..].iter().any(|o| matches!(o,
        Output::Persist(Persist::SourceBytes { agent, from: Some(from), bytes, .. })
            if *from == peer && *agent != rid && *bytes > 0)));
}

#[test]
fn two_reporters_retire_the_peer_for_everyone() {
    let (mut fleet, peer) = planned();
    let fetchers = fetchers_of(&fleet, &peer);
    bad_chunk(&mut fleet, fetchers[0], &peer);
    assert_eq!(fetchers_of(&fleet, &peer), fetchers[1..].to_vec());
    let mark = fleet.log.len();
    bad_chunk(&mut fleet, fetchers[1], &peer);
    assert!(
        fetchers_of(&fleet, &peer).is_empty(),
        "{:?}",
        peer_sources(&fleet)
    );
    // Everyone that fetched from it was told at once.
    for &f in &fetchers[1..] {
        let to = fleet.agents[f].id.clone();
        assert!(
            fleet.log[mark..]
                .iter()
                .any(|o| matches!(o, Output::Transmit(t, Message::Sources { .. }) if *t == to)),
            "{to} was sent new sources"
        );
    }
    fleet.run(1, 3, 500);
    let offered = fleet.offered_since(mark, &peer);
    assert!(
        offered.is_empty(),
        "{offered:?} were offered {peer} after two reports"
    );
    assert!(demotions(&fleet).is_empty());
    assert!(fleet.agents.iter().all(FakeAgent::complete));
}

#[test]
fn a_contradicted_reporter_is_demoted_and_its_later_reports_count_for_nothing() {
    let (mut fleet, peer) = planned();
    let fetchers = fetchers_of(&fleet, &peer);
    let (liar, witness) = (fetchers[0], fetchers[1]);
    let liar_id = fleet.agents[liar].id.clone();
    bad_chunk(&mut fleet, liar, &peer);
    assert!(demotions(&fleet).is_empty());
    // Another fetcher of the peer verifies bytes from it: the accusation is contradicted.
    let job = fleet.agents[witness].job.unwrap();
    let verified = fleet.agents[witness].verified();
    let mut received = heapless::Vec::new();
    received
        .push(Received {
            from: Some(peer.clone()),
            bytes: CHUNK as u64,
        })
        .unwrap();
    let mark = fleet.log.len();
    fleet.send(
        witness,
        Message::Progress {
            job,
            verified,
            received,
        },
    );
    assert_eq!(demotions(&fleet), vec![liar_id.clone()]);
    assert!(participant(&fleet, &liar_id).demoted);
    // It relays for nobody any more; its fetchers were told at once.
    let sources = peer_sources(&fleet);
    assert!(
        sources.values().all(|s| !s.contains(&liar_id)),
        "{sources:?}"
    );
    let reason = fleet.events().into_iter().find_map(|e| match e {
        EngineEvent::ReporterDemoted { reason, .. } => Some(reason.clone()),
        _ => None,
    });
    assert!(
        reason.as_deref().is_some_and(|r| r.contains(peer.as_str())),
        "{reason:?}"
    );
    assert!(
        fleet.log[mark..]
            .iter()
            .any(|o| matches!(o, Output::Event(_)))
    );
    // The peer still serves everyone else it served.
    assert_eq!(fetchers_of(&fleet, &peer), fetchers[1..].to_vec());
    // Its later reports count for nothing: with another reporter, still one vote short.
    let other = (0..12)
        .map(|i| fleet.agents[i].id.clone())
        .filter(|p| *p != peer && *p != liar_id)
        .find(|p| {
            let f = fetchers_of(&fleet, p);
            f.contains(&liar) && f.len() >= 3
        })
        .unwrap_or_else(|| panic!("another source of the liar's: {:?}", peer_sources(&fleet)));
    let f: Vec<usize> = fetchers_of(&fleet, &other)
        .into_iter()
        .filter(|&f| f != liar)
        .collect();
    bad_chunk(&mut fleet, liar, &other);
    // The liar itself is routed around it (that costs nobody else).
    assert!(!peer_sources(&fleet)[&liar_id].contains(&other));
    assert_eq!(fetchers_of(&fleet, &other), f);
    bad_chunk(&mut fleet, f[0], &other);
    assert_eq!(
        fetchers_of(&fleet, &other),
        f[1..].to_vec(),
        "{other} was not retired on one vote and a demoted reporter's"
    );
    // The honest peers and everyone else finish; the liar too, from others. The second
    // false report is contradicted in turn once others verify chunks from its peer.
    fleet.run(1, 3, 500);
    assert!(fleet.agents.iter().all(FakeAgent::complete));
    assert_eq!(
        demotions(&fleet),
        vec![liar_id, fleet.agents[f[0]].id.clone()]
    );
}

#[test]
fn a_reporter_accusing_more_peers_than_the_limit_is_demoted() {
    let mut fleet = Fleet::with_agents(1, 20);
    let leaf = fleet.add("leaf", false, 1_000_000, 8);
    fleet.connect_all();
    let policy = Policy {
        max_stripes: 8,
        ..Policy::default()
    };
    fleet.start(1, 64, Targets::All, policy);
    let leaf_id = fleet.agents[leaf].id.clone();
    let accused: Vec<AgentId> = peer_sources(&fleet)[&leaf_id].clone();
    assert!(
        accused.len() > crate::engine::trouble::MAX_ACCUSED,
        "the leaf fetches from {accused:?}"
    );
    let accused: Vec<AgentId> = accused
        .into_iter()
        .take(crate::engine::trouble::MAX_ACCUSED + 1)
        .collect();
    let others: Vec<Vec<usize>> = accused
        .iter()
        .map(|p| {
            let mut f = fetchers_of(&fleet, p);
            f.retain(|&f| f != leaf);
            f
        })
        .collect();
    for (n, p) in accused.iter().enumerate() {
        assert!(demotions(&fleet).is_empty(), "demoted after {n} reports");
        bad_chunk(&mut fleet, leaf, p);
    }
    assert_eq!(demotions(&fleet), vec![leaf_id.clone()]);
    assert!(participant(&fleet, &leaf_id).demoted);
    // Nobody it accused was retired: each still serves its other fetchers.
    for (p, before) in accused.iter().zip(&others) {
        assert_eq!(&fetchers_of(&fleet, p), before, "{p} still serves");
    }
    fleet.run(1, 3, 500);
    assert!(fleet.agents.iter().all(FakeAgent::complete));
}
