//! Policy rules (claim 9): ordering weights, peer limits, rate caps, segments and their WAN
//! entries, leaf-only agents, time windows, and warnings for rules that cannot be met.

use std::collections::{BTreeMap, HashMap};

use super::*;
use crate::planner::TimeWindow;

/// Puts agent `i` of `fleet` on `segment`.
fn on_segment(fleet: &mut Fleet, i: usize, segment: &str) {
    fleet.agents[i].report.segment = Name::try_from(segment).unwrap();
}

/// `segments` × `per` serving agents `s{seg}a{n}` with mixed uploads, each on its segment.
fn segmented_fleet(segments: usize, per: usize) -> Fleet {
    let mut fleet = Fleet::new(1);
    for seg in 0..segments {
        for n in 0..per {
            let i = fleet.add(
                &format!("s{seg}a{n}"),
                true,
                1_000_000 * (1 + (n as u64 % 3)),
                8,
            );
            on_segment(&mut fleet, i, &format!("seg-{seg}"));
        }
    }
    fleet
}

/// The segment of every agent of `fleet`, by id.
fn segment_of(fleet: &Fleet) -> HashMap<AgentId, Name> {
    fleet
        .agents
        .iter()
        .map(|a| (a.id.clone(), a.report.segment.clone()))
        .collect()
}

/// Per segment: the fetching participants whose sources include the manager or another segment.
fn wan_fetchers(fleet: &Fleet, job: u64) -> BTreeMap<Name, Vec<AgentId>> {
    let segs = segment_of(fleet);
    let mut out: BTreeMap<Name, Vec<AgentId>> = BTreeMap::new();
    for p in fleet.engine.job_status(job).unwrap().participants {
        if !matches!(p.state, ParticipantState::Fetching { .. }) {
            continue;
        }
        let mine = &segs[&p.agent];
        if p.sources
            .iter()
            .any(|s| s.as_ref().is_none_or(|peer| &segs[peer] != mine))
        {
            out.entry(mine.clone()).or_default().push(p.agent.clone());
        }
    }
    out
}

fn warnings(fleet: &Fleet) -> Vec<String> {
    fleet
        .events()
        .into_iter()
        .filter_map(|e| match e {
            EngineEvent::PolicyWarning { text, .. } => Some(text.clone()),
            _ => None,
        })
        .collect()
}

fn started_order(fleet: &Fleet, job: u64) -> Vec<AgentId> {
    fleet
        .log
        .iter()
        .find_map(|o| match o {
            Output::Persist(Persist::JobStarted { job: j, order, .. }) if *j == job => {
                Some(order.clone())
            }
            _ => None,
        })
        .unwrap()
}

#[test]
fn ordering_weights_change_the_order_of_the_list() {
    let mut fleet = Fleet::new(1);
    let near = fleet.add("near", true, 1_000_000, 8);
    let far = fleet.add("far", true, 1_000_000_000, 8);
    for (i, rtt) in [(near, 1_000), (far, 300_000)] {
        fleet.agents[i]
            .report
            .delays
            .push(baton_protocol::types::Delay {
                to: baton_protocol::types::DelayTo::Manager,
                rtt_us: rtt,
            })
            .unwrap();
    }
    fleet.connect_all();
    fleet.start(1, 10, Targets::All, Policy::default());
    assert_eq!(started_order(&fleet, 1), [id("far"), id("near")]);
    let by_delay = Policy {
        weights: crate::planner::Weights {
            up: 0.0,
            down: 0.0,
            delay: 10.0,
            ..Default::default()
        },
        ..Policy::default()
    };
    fleet.start(2, 10, Targets::All, by_delay);
    assert_eq!(started_order(&fleet, 2), [id("near"), id("far")]);
}

#[test]
fn no_source_serves_more_peers_than_max_peers_per_source() {
    let mut fleet = Fleet::with_agents(1, 24);
    fleet.connect_all();
    let policy = Policy {
        max_peers_per_source: 2,
        ..Policy::default()
    };
    fleet.start(1, 64, Targets::All, policy);
    let mut most = 0;
    for _ in 0..400 {
        if fleet.finished(1) {
            break;
        }
        let mut fetchers: HashMap<AgentId, usize> = HashMap::new();
        for p in fleet.engine.job_status(1).unwrap().participants {
            for s in p.sources.into_iter().flatten() {
                *fetchers.entry(s).or_default() += 1;
            }
        }
        for (source, n) in fetchers {
            most = most.max(n);
            assert!(n <= 2, "{source} serves {n} peers");
        }
        fleet.step(2);
    }
    assert!(fleet.finished(1));
    assert_eq!(most, 2, "the cap was never reached: the test shows nothing");
}

#[test]
fn an_agent_rate_cap_is_sent_as_throttle_after_each_fetch() {
    let mut fleet = Fleet::with_agents(1, 6);
    fleet.connect_all();
    let policy = Policy {
        agent_rate_cap_bps: 50_000,
        ..Policy::default()
    };
    fleet.start(1, 16, Targets::All, policy);
    for a in &fleet.agents {
        let kinds: Vec<&str> = fleet
            .messages_to(a.id.as_str())
            .iter()
            .map(|m| m.kind())
            .collect();
        assert_eq!(kinds[..2], ["Fetch", "Throttle"], "{}", a.id);
        assert_eq!(a.throttles, [50_000]);
    }
    // A reconnect gets a fresh Fetch and the cap again.
    fleet.disconnect(2);
    fleet.connect(2);
    assert_eq!(fleet.agents[2].throttles, [50_000, 50_000]);
    fleet.run(1, 4, 500);
}

#[test]
fn a_segment_rate_cap_is_split_over_the_agents_fetching_across_the_wan() {
    let mut fleet = segmented_fleet(3, 5);
    fleet.connect_all();
    let policy = Policy {
        segment_rate_cap_bps: 90_000,
        agent_rate_cap_bps: 40_000,
        ..Policy::default()
    };
    fleet.start(1, 64, Targets::All, policy);
    let across = wan_fetchers(&fleet, 1);
    assert_eq!(across.len(), 3);
    for (seg, list) in &across {
        let share = (90_000 / list.len() as u64).min(40_000);
        for a in &fleet.agents {
            if &a.report.segment != seg {
                continue;
            }
            let cap = a.throttles.last().copied().unwrap_or(0);
            if list.contains(&a.id) {
                assert_eq!(cap, share, "{} fetches across the WAN", a.id);
            } else {
                assert_eq!(cap, 40_000, "{} fetches inside its segment", a.id);
            }
        }
        let total: u64 = list
            .iter()
            .map(|i| {
                fleet.agents[fleet.by_id[i]]
                    .throttles
                    .last()
                    .copied()
                    .unwrap()
            })
            .sum();
        assert!(total <= 90_000, "{seg}: {total} B/s across the WAN");
    }
    fleet.run(1, 4, 800);
}

#[test]
fn at_most_m_agents_of_a_segment_fetch_from_outside_it() {
    for m in [1u16, 2] {
        let mut fleet = segmented_fleet(3, 6);
        // The elected leader of seg-1 is its slowest agent: it still enters first.
        fleet.connect_all();
        let leader = id("s1a3");
        let mut members = heapless::Vec::new();
        members
            .push(baton_protocol::message::SegmentMember {
                id: leader.clone(),
                score: 1,
                listen: None,
                performance: 1,
                free_storage: 0,
                can_serve: true,
                link: LinkInfo::default(),
                delays: Default::default(),
                last_heard_ms: 0,
            })
            .unwrap();
        let report = Message::SegmentReport(baton_protocol::message::SegmentReport {
            segment: Name::try_from("seg-1").unwrap(),
            leader: leader.clone(),
            term: 1,
            page: 0,
            pages: 1,
            members,
        });
        let i = fleet.by_id[&leader];
        fleet.send(i, report);
        let policy = Policy {
            max_wan_transfers_per_segment: m,
            ..Policy::default()
        };
        fleet.start(1, 96, Targets::All, policy);
        let across = wan_fetchers(&fleet, 1);
        for (seg, list) in &across {
            assert!(list.len() <= m as usize, "m={m}: {seg}: {list:?}");
        }
        assert!(across[&Name::try_from("seg-1").unwrap()].contains(&leader));
        // The job's list of segments and their entry nodes, leader first.
        let segments = fleet.engine.job_status(1).unwrap().segments;
        assert_eq!(segments.len(), 3);
        let seg1 = segments.iter().find(|s| s.segment == "seg-1").unwrap();
        assert_eq!(seg1.entries[0], leader);
        assert_eq!(seg1.entries.len(), m as usize);
        assert_eq!((seg1.fetchers, seg1.servers), (6, 6));
        for _ in 0..600 {
            if fleet.finished(1) {
                break;
            }
            for (seg, list) in wan_fetchers(&fleet, 1) {
                assert!(list.len() <= m as usize, "m={m}: {seg}: {list:?}");
            }
            fleet.step(4);
        }
        assert!(fleet.finished(1));
    }
}

#[test]
fn content_enters_each_segment_once() {
    let mut fleet = segmented_fleet(3, 8);
    fleet.connect_all();
    fleet.start(1, 128, Targets::All, Policy::default());
    fleet.run(1, 4, 1000);
    // Bytes each agent received from outside its segment, per segment, from the records.
    let segs = segment_of(&fleet);
    let mut into: BTreeMap<Name, u64> = BTreeMap::new();
    let mut per_agent: BTreeMap<AgentId, u64> = BTreeMap::new();
    for o in &fleet.log {
        if let Output::Persist(Persist::SourceBytes {
            agent, from, bytes, ..
        }) = o
        {
            *per_agent.entry(agent.clone()).or_default() += bytes;
            let mine = &segs[agent];
            if from.as_ref().is_none_or(|f| &segs[f] != mine) {
                *into.entry(mine.clone()).or_default() += bytes;
            }
        }
    }
    let content = 128 * CHUNK as u64;
    // The records carry every byte each agent got, from whom.
    for a in &fleet.agents {
        assert_eq!(per_agent[&a.id], content, "{}", a.id);
    }
    for (seg, bytes) in &into {
        eprintln!("{seg}: {bytes} bytes entered ({content} content)");
        assert!(
            *bytes <= content,
            "{seg}: {bytes} bytes crossed for {content}"
        );
    }
    assert_eq!(into.len(), 3);
}

#[test]
fn leaf_only_agents_by_id_label_and_upload_never_serve() {
    let mut fleet = Fleet::with_agents(1, 12);
    let labelled = fleet.add("sensor", true, 5_000_000, 8);
    fleet.agents[labelled]
        .report
        .labels
        .push(baton_protocol::types::Label {
            key: "role".try_into().unwrap(),
            value: "sensor".try_into().unwrap(),
        })
        .unwrap();
    fleet.add("weak", true, 5_000_000, 8);
    fleet.add("trickle", true, 1_000, 8);
    fleet.connect_all();
    let policy = Policy {
        leaf_only: vec![id("weak")],
        leaf_only_labels: [("role".to_string(), "sensor".to_string())].into(),
        leaf_below_up_bps: 10_000,
        ..Policy::default()
    };
    fleet.start(1, 48, Targets::All, policy);
    fleet.run(1, 3, 1000);
    let leaves = [id("sensor"), id("weak"), id("trickle")];
    let mut peers_offered = 0;
    for a in &fleet.agents {
        for p in fleet.peers_offered_to(a.id.as_str()) {
            peers_offered += 1;
            assert!(!leaves.contains(&p), "{p} offered to {}", a.id);
        }
    }
    assert!(peers_offered > 0);
    for l in &leaves {
        assert_eq!(fleet.state(1, l.as_str()), ParticipantState::Confirmed);
    }
}

#[test]
fn a_closed_window_holds_the_job_until_it_opens() {
    let mut fleet = Fleet::with_agents(1, 6);
    fleet.add("late", true, 1_000_000, 8);
    for i in 0..6 {
        fleet.connect(i);
    }
    // 12:00 UTC; the window is 22:00-06:00 (wraps midnight).
    let noon = 20_000 * 86_400 + 12 * 3600;
    fleet.engine.set_wall_clock(fleet.now, noon);
    let policy = Policy {
        windows: vec![TimeWindow::daily_utc(22 * 60, 6 * 60)],
        ..Policy::default()
    };
    fleet.start(1, 32, Targets::All, policy.clone());
    assert_eq!(
        warnings(&fleet),
        ["window 22:00-06:00 UTC is closed; the job waits 10 h"]
    );
    let status = fleet.engine.job_status(1).unwrap();
    assert_eq!(status.warnings.len(), 1);
    let opens = status.opens_at.unwrap();
    assert_eq!(opens, fleet.now + Duration::from_secs(10 * 3600));
    assert_eq!(fleet.engine.poll_timeout(), Some(opens));
    // Nobody is instructed, a late agent neither, and nobody is given up while it waits.
    fleet.connect(6);
    assert!(fleet.agents.iter().all(|a| a.fetches == 0));
    fleet.disconnect(5);
    fleet.now = opens - Duration::from_secs(1);
    fleet.engine.handle_timeout(fleet.now);
    fleet.drain();
    assert!(fleet.agents.iter().all(|a| a.fetches == 0));
    assert_eq!(fleet.state(1, "a05"), ParticipantState::Waiting);
    // The window opens: every connected participant gets its Fetch; the absent one's timer starts.
    fleet.now = opens;
    fleet.engine.handle_timeout(fleet.now);
    fleet.drain();
    for (i, a) in fleet.agents.iter().enumerate() {
        assert_eq!(a.fetches, (i != 5) as u32, "{}", a.id);
    }
    fleet.connect(5);
    fleet.run(1, 4, 500);

    // Inside the window (23:30) a job starts at once.
    let mut fleet = Fleet::with_agents(1, 3);
    fleet.connect_all();
    fleet
        .engine
        .set_wall_clock(fleet.now, noon + 11 * 3600 + 1800);
    fleet.start(2, 8, Targets::All, policy);
    assert!(warnings(&fleet).is_empty());
    assert!(fleet.agents.iter().all(|a| a.fetches == 1));
}

/// 2026-12-07 10:00 UTC, a Monday.
const TEN: u64 = 1_796_637_600;

/// Two windows a minute apart: 10:00-10:01 and 10:02-10:30 UTC.
fn minute_gap_policy() -> Policy {
    Policy {
        windows: vec![
            TimeWindow::daily_utc(600, 601),
            TimeWindow::daily_utc(602, 630),
        ],
        ..Policy::default()
    }
}

/// Chunks each fake agent holds, by index.
fn holdings(fleet: &Fleet) -> Vec<u32> {
    fleet.agents.iter().map(FakeAgent::verified).collect()
}

#[test]
fn a_window_closing_mid_job_stops_transfers_and_resumes_them_at_the_next_opening() {
    let mut fleet = Fleet::with_agents(1, 6);
    fleet.connect_all();
    // 10:00:50: the first window closes in 10 s.
    fleet.engine.set_wall_clock(fleet.now, TEN + 50);
    let started = fleet.now;
    fleet.start(1, 400, Targets::All, minute_gap_policy());
    assert!(warnings(&fleet).is_empty(), "{:?}", warnings(&fleet));
    let status = fleet.engine.job_status(1).unwrap();
    let close = started + Duration::from_secs(10);
    assert_eq!(status.closes_at, Some(close));
    assert!(fleet.engine.poll_timeout().unwrap() <= close);
    while fleet.now < close {
        fleet.step(1);
    }
    // At the close every participant still fetching got `Cancel`, and nothing moves.
    let held = holdings(&fleet);
    assert!(held.iter().all(|&v| v > 0 && v < 400), "{held:?}");
    for a in &fleet.agents {
        assert_eq!((a.cancels, a.job), (1, None), "{}", a.id);
    }
    let status = fleet.engine.job_status(1).unwrap();
    assert_eq!(status.opens_at, Some(close + Duration::from_secs(60)));
    assert_eq!(status.closes_at, None);
    assert_eq!(
        status.warnings,
        [
            "window closed at 10:01:00 UTC: transfers of 6 participants stopped; they resume at 10:02:00 UTC (in 1 min)"
        ]
    );
    // While closed: nobody is given up (10 s), one that reconnects is told to stop again
    // and not instructed.
    fleet.disconnect(2);
    for _ in 0..150 {
        fleet.step(1);
    }
    assert_eq!(holdings(&fleet), held);
    assert!(fleet.agents.iter().all(|a| a.fetches == 1));
    assert!(matches!(
        fleet.state(1, "a02"),
        ParticipantState::Fetching { .. }
    ));
    fleet.connect(2);
    assert_eq!((fleet.agents[2].cancels, fleet.agents[2].fetches), (2, 1));
    // The next window opens: everyone is instructed again and resumes from what it holds.
    while fleet.now < close + Duration::from_secs(60) {
        fleet.step(1);
    }
    assert!(fleet.agents.iter().all(|a| a.fetches == 2));
    let status = fleet.engine.job_status(1).unwrap();
    assert_eq!(
        status.warnings[1],
        "window opened at 10:02:00 UTC: transfers resume until 10:30:00 UTC"
    );
    assert_eq!(status.closes_at, Some(close + Duration::from_secs(29 * 60)));
    fleet.run(1, 1, 2000);
    assert!(fleet.agents.iter().all(FakeAgent::complete));
}

#[test]
fn a_restart_while_the_window_is_closed_keeps_the_job_waiting() {
    let mut fleet = Fleet::with_agents(1, 4);
    fleet.connect_all();
    fleet.engine.set_wall_clock(fleet.now, TEN + 55);
    fleet.start(1, 200, Targets::All, minute_gap_policy());
    for _ in 0..20 {
        fleet.step(1);
    }
    // The manager stops at 10:00:57 and is back (epoch 2) at 10:01:10, inside the gap;
    // its agents kept fetching from each other meanwhile, under epoch 1.
    let stored: Vec<(AgentId, ParticipantState)> =
        fleet.store.iter().map(|(a, s)| (a.clone(), *s)).collect();
    let mut fleet2 = Fleet::new(2);
    fleet2.by_id = fleet.by_id.clone();
    fleet2.agents = std::mem::take(&mut fleet.agents);
    fleet2.now = fleet.now + Duration::from_secs(13);
    for a in &mut fleet2.agents {
        a.online = false;
        a.fetches = 0;
    }
    let mut fleet = fleet2;
    fleet.engine.set_wall_clock(fleet.now, TEN + 70);
    let spec = JobSpec {
        id: 1,
        manifest: manifest(200),
        targets: Targets::All,
        policy: minute_gap_policy(),
    };
    fleet.engine.resume_job(fleet.now, spec, stored, &[]);
    fleet.drain();
    // Agents reconnecting are told to stop, and nobody is instructed until 10:02.
    fleet.connect_all();
    for a in &fleet.agents {
        assert_eq!((a.cancels, a.fetches, a.job), (1, 0, None), "{}", a.id);
    }
    let held = holdings(&fleet);
    let opens = fleet.engine.job_status(1).unwrap().opens_at.unwrap();
    assert_eq!(opens, fleet.now + Duration::from_secs(50));
    while fleet.now < opens {
        fleet.step(1);
    }
    assert_eq!(holdings(&fleet), held);
    fleet.run(1, 1, 2000);
    assert!(fleet.agents.iter().all(FakeAgent::complete));
    assert!(fleet.agents.iter().all(|a| a.fetches == 1));
}

#[test]
fn rules_that_cannot_be_met_are_reported() {
    let mut fleet = segmented_fleet(2, 3);
    // Every member of seg-1 is a leaf (by label).
    for i in 3..6 {
        fleet.agents[i]
            .report
            .labels
            .push(baton_protocol::types::Label {
                key: "class".try_into().unwrap(),
                value: "meter".try_into().unwrap(),
            })
            .unwrap();
    }
    fleet.connect_all();
    let policy = Policy {
        leaf_only_labels: [("class".to_string(), "meter".to_string())].into(),
        agent_rate_cap_bps: 1024,
        segment_rate_cap_bps: 512,
        max_wan_transfers_per_segment: 2,
        ..Policy::default()
    };
    // 32 MiB of 1 KiB chunks.
    fleet.start(1, 32 * 1024, Targets::All, policy);
    let w = warnings(&fleet);
    assert_eq!(
        w,
        [
            "segment seg-1 has no agent allowed to relay: every member fetches across the WAN (3 agents); max_wan_transfers_per_segment 2 cannot hold there",
            "agent rate cap 1 KiB/s would take 9 h 6 min for 32 MiB per agent",
            "segment rate cap 512 B/s would take 18 h 12 min for 32 MiB to enter segment seg-0, seg-1",
        ]
    );
    assert_eq!(fleet.engine.job_status(1).unwrap().warnings, w);
    // Each text once per job.
    fleet.engine.cancel_job(fleet.now, 1).unwrap();
    fleet.drain();
    assert_eq!(warnings(&fleet).len(), 3);
}
