//! End to end: agent revocation and certificate terms against a real `baton serve` and real
//! `baton agent` processes on loopback.
//!
//! Peer handshakes are driven by the test with the real victim's credentials (its key from
//! its data directory, its certificate from its status file), so what a peer accepts or
//! refuses is observed directly: a session that answers a `Ping`, or one the peer closes.
//! Every wait is bounded; "within seconds" is 5 s (issue 13).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::common::*;
use baton_agent_core::linux::driver::load_or_create_identity;
use baton_agent_core::linux::link::{self, Limits};
use baton_protocol::identity::{AgentCert, Identity};
use baton_protocol::message::Message;
use baton_protocol::session::{Hello, Role};
use baton_protocol::types::PublicKey;
use baton_test_support::{AgentProc, Manager, manager::bytes_from, pseudo_random, wait_for};
use serde_json::{Value, json};
use tokio::net::TcpStream;

/// The most any one test here may take.
const LIMIT: Duration = Duration::from_secs(60);
/// "Within seconds".
const WITHIN: Duration = Duration::from_secs(5);
/// Each agent's status file, under its directory.
const STATUS: &str = "status.json";

/// Starts agent `name` with a status file.
fn agent(m: &Manager, name: &str, extra: &[&str]) -> AgentProc {
    let status = m.dir.join(name).join(STATUS);
    let mut args = vec!["--status-file", status.to_str().unwrap()];
    args.extend_from_slice(extra);
    AgentProc::spawn(m, &m.dir, name, &args)
}

/// The certificate in `a`'s status file, once it has one with a serial above `above`.
fn cert_of(a: &AgentProc, above: u64, limit: Duration) -> AgentCert {
    wait_for(
        &format!("{} holding a certificate above serial {above}", a.name),
        limit,
        || format!("status: {:?}\nlog:\n{}", a.status(STATUS), a.log()),
        || {
            let status = a.status(STATUS)?;
            let hex_cert = status["certificate"]["encoded"].as_str()?;
            let cert: AgentCert = postcard::from_bytes(&hex::decode(hex_cert).ok()?).ok()?;
            (cert.serial > above).then_some(cert)
        },
    )
}

/// Where agent `a` listens for peers, and its key (from the manager's API).
fn peer_of(m: &Manager, a: &AgentProc) -> (SocketAddr, PublicKey) {
    let listen = wait_for(
        &format!("{} listening", a.name),
        Duration::from_secs(10),
        || a.log(),
        || a.status(STATUS)?["listen"].as_str()?.parse().ok(),
    );
    let (status, view) = m.api("GET", &format!("/api/v1/agents/{}", a.name), None);
    assert_eq!(status, 200, "{view}");
    let key: [u8; 32] = hex::decode(view["key"].as_str().unwrap())
        .unwrap()
        .try_into()
        .unwrap();
    (listen, PublicKey(key))
}

/// The agent's own identity, read from its data directory.
fn identity_of(a: &AgentProc) -> Identity {
    load_or_create_identity(&a.dir.join("data")).expect("the agent's key")
}

/// Opens a peer session to `to` as agent `name` showing `cert`, and pings over it: `Ok` if
/// the peer answers, `Err` (why) if it refuses the handshake or closes the session.
async fn peer_session(
    me: &Identity,
    name: &str,
    cert: &AgentCert,
    to: SocketAddr,
    key: &PublicKey,
) -> Result<(Reader, Writer), String> {
    let stream = TcpStream::connect(to).await.map_err(|e| e.to_string())?;
    let hello = Hello::new(
        Role::Agent,
        id(name),
        baton_protocol::caps::ALL,
        Some(cert.clone()),
    );
    let link = link::connect(stream, me, key, hello, &Limits::default())
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let (mut r, mut w) = link.split();
    w.send(&Message::Ping { nonce: 7 }.to_vec())
        .await
        .map_err(|e| format!("send: {e}"))?;
    match tokio::time::timeout(Duration::from_secs(3), r.recv()).await {
        Ok(Ok(bytes)) => match Message::decode(bytes) {
            Ok(Message::Pong { nonce: 7 }) => Ok((r, w)),
            other => Err(format!("unexpected answer {other:?}")),
        },
        Ok(Err(e)) => Err(format!("closed by the peer: {e}")),
        Err(_) => Err("no answer".into()),
    }
}

/// Whether the peer closes `r` within `limit`.
async fn closed_within(r: &mut Reader, limit: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    for _ in 0..1000 {
        match tokio::time::timeout_at(deadline, r.recv()).await {
            Err(_) => return false,
            Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
        }
    }
    false
}

/// Writes `len` pseudo-random bytes to `name` under the manager's directory.
fn content(m: &Manager, name: &str, len: usize, seed: u32) -> std::path::PathBuf {
    let path = m.dir.join(name);
    std::fs::write(&path, pseudo_random(len, seed)).unwrap();
    path
}

/// Bytes agents of `names` verified from each other in a job's detail.
fn relayed(job: &Value, names: &[&str]) -> u64 {
    names
        .iter()
        .flat_map(|to| names.iter().map(move |from| (to, from)))
        .filter(|(to, from)| to != from)
        .map(|(to, from)| bytes_from(job, to, Some(from)))
        .sum()
}

/// A status counter of agent `a` (0 before its status file is written).
fn counter(a: &AgentProc, field: &str) -> u64 {
    a.status(STATUS)
        .and_then(|s| s[field].as_u64())
        .unwrap_or(0)
}

#[test]
fn a_revoked_agent_is_refused_by_manager_and_peers_within_seconds() {
    let started = Instant::now();
    let rt = runtime();
    // The manager's upload is capped, so the agents relay to each other.
    let m = Manager::start_args(BATON, &["--give-up", "5", "--up-bps", "1MiB"]);
    let names = ["r1", "r2", "r3", "victim"];
    let agents: Vec<AgentProc> = names.iter().map(|n| agent(&m, n, &[])).collect();
    m.wait_connected(&names);
    let victim = &agents[3];
    let (r1_addr, r1_key) = peer_of(&m, &agents[0]);

    // Before: the victim's certificate opens a peer session with r1 (positive control),
    // which stays open until the revocation.
    let victim_id = identity_of(victim);
    let victim_cert = cert_of(victim, 0, WITHIN);
    let (mut held_open, _w) = rt
        .block_on(peer_session(
            &victim_id,
            "victim",
            &victim_cert,
            r1_addr,
            &r1_key,
        ))
        .expect("r1 accepts the victim before the revocation");

    // Revoke it over the API.
    let revoked_at = Instant::now();
    let (status, done) = m.api("POST", "/api/v1/agents/victim/revoke", Some(json!({})));
    assert_eq!(status, 200, "{done}");
    assert_eq!(done["was_connected"], true, "{done}");
    assert!(
        done["up_to_serial"].as_u64().unwrap() >= victim_cert.serial,
        "{done}"
    );
    let version = done["list_version"].as_u64().expect("a list was signed");
    assert!(done["sent_to"].as_u64().unwrap() >= 3, "{done}");

    // Manager: its session ended, it is not in the fleet views, and it cannot come back
    // (told why).
    wait_for(
        "the victim's session ended",
        WITHIN,
        || m.log(),
        || (!m.connected().contains(&"victim".to_string())).then_some(()),
    );
    let (_, listed) = m.api("GET", "/api/v1/agents", None);
    let ids: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|a| a["id"].as_str())
        .collect();
    assert!(!ids.contains(&"victim"), "left the fleet view: {ids:?}");
    assert_eq!(
        m.api("GET", "/api/v1/agents/victim", None).0,
        404,
        "not found"
    );
    let out = ok(&m, &["agents"]);
    assert!(!out.contains("victim"), "not in `baton agents`: {out}");
    let refused = rt.block_on(join(&m, &victim_id, "victim", None));
    match refused {
        Err(baton_agent_core::linux::link::LinkError::Refused(reason)) => {
            assert!(reason.contains("revoked"), "{reason}")
        }
        Err(e) => panic!("the victim must be refused with a reason, got {e}"),
        Ok(_) => panic!("the revoked victim was welcomed"),
    }
    wait_for(
        "the running victim told it is revoked",
        WITHIN,
        || victim.log(),
        || {
            victim
                .log()
                .contains("was revoked by the administrator")
                .then_some(())
        },
    );

    // Peers: every other agent holds the new list; r1 closed the session it had with the
    // victim, and refuses a new one.
    for a in &agents[..3] {
        wait_for(
            &format!("{} holding revocation list {version}", a.name),
            WITHIN.saturating_sub(revoked_at.elapsed()),
            || a.log(),
            || (counter(a, "revocation_list") >= version).then_some(()),
        );
    }
    assert!(
        rt.block_on(closed_within(
            &mut held_open,
            WITHIN.saturating_sub(revoked_at.elapsed())
        )),
        "r1 closes its session with the revoked victim"
    );
    let before = counter(&agents[0], "peer_certs_refused");
    let again = rt.block_on(peer_session(
        &victim_id,
        "victim",
        &victim_cert,
        r1_addr,
        &r1_key,
    ));
    assert!(again.is_err(), "r1 refuses the victim's handshake");
    wait_for(
        "r1 counting the refused certificate",
        WITHIN,
        || agents[0].log(),
        || (counter(&agents[0], "peer_certs_refused") > before).then_some(()),
    );
    assert!(
        agents[0]
            .log()
            .contains("peer refused: the peer's certificate is revoked"),
        "{}",
        agents[0].log()
    );
    let within = revoked_at.elapsed();
    assert!(within < WITHIN, "refused everywhere within {within:?}");

    // A later job to every agent does not use the victim; the others relay to each
    // other and complete (positive control).
    let file = content(&m, "after.bin", 1_500_000, 13);
    let (status, job) = m.api(
        "POST",
        "/api/v1/jobs",
        Some(json!({ "path": file, "targets": { "all": true }, "chunk_size": 16384 })),
    );
    assert_eq!(status, 201, "{job}");
    let job = job["id"].as_u64().unwrap();
    let done = m.wait_job(job, LIMIT.saturating_sub(started.elapsed()), |j| {
        j["state"] == "finished"
    });
    let participants: Vec<&str> = done["participants"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["agent"].as_str())
        .collect();
    assert_eq!(participants.len(), 3, "{done}");
    assert!(!participants.contains(&"victim"), "{done}");
    let others = &names[..3];
    assert!(
        relayed(&done, others) > 0,
        "the others relay to each other: {}",
        done["source_bytes"]
    );
    for n in others {
        assert_eq!(bytes_from(&done, n, Some("victim")), 0, "{done}");
    }
    // History keeps it: the audit log names the revocation.
    let (_, audit) = m.api("GET", "/api/v1/audit", None);
    assert!(
        audit["entries"].as_array().is_some_and(|es| es
            .iter()
            .any(|e| e["action"] == "agent.revoke" && e["target"] == "victim")),
        "{audit}"
    );
    eprintln!(
        "revoked and refused everywhere within {within:?}; test took {:?}",
        started.elapsed()
    );
    drop(rt);
}

#[test]
fn certificates_are_renewed_over_the_session_and_an_expired_one_is_refused() {
    let started = Instant::now();
    let rt = runtime();
    // Certificates of 4 s, renewed every 2 s.
    let m = Manager::start_args(BATON, &["--cert-lifetime-secs", "4"]);
    let a1 = agent(&m, "a1", &[]);
    let a2 = agent(&m, "a2", &[]);
    m.wait_connected(&["a1", "a2"]);
    let (a2_addr, a2_key) = peer_of(&m, &a2);
    let me = identity_of(&a1);

    let first = cert_of(&a1, 0, WITHIN);
    assert!(first.not_after > 0, "certificates expire");
    // Renewed over the live session: a higher serial, a later expiry.
    let renewed = cert_of(&a1, first.serial, Duration::from_secs(4));
    assert!(renewed.not_after >= first.not_after, "{renewed:?}");
    assert!(
        m.connected().contains(&"a1".to_string()),
        "the same session"
    );
    rt.block_on(peer_session(&me, "a1", &renewed, a2_addr, &a2_key))
        .expect("a peer accepts the renewed certificate");

    // The first certificate, held past its expiry (as by an agent kept offline), is
    // refused; the current one is still accepted.
    let wait = Duration::from_secs(first.not_after)
        .saturating_sub(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap(),
        )
        .min(Duration::from_secs(5))
        + Duration::from_millis(1100);
    std::thread::sleep(wait);
    let expired = rt.block_on(peer_session(&me, "a1", &first, a2_addr, &a2_key));
    assert!(expired.is_err(), "an expired certificate is refused");
    assert!(
        a2.log()
            .contains("peer refused: the peer's certificate expired"),
        "{}",
        a2.log()
    );
    let current = cert_of(&a1, renewed.serial - 1, WITHIN);
    rt.block_on(peer_session(&me, "a1", &current, a2_addr, &a2_key))
        .expect("the current certificate is accepted");
    eprintln!("test took {:?}", started.elapsed());
    drop(rt);
}
