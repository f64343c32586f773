//! `baton serve` as a real child process: its HTTP API, and fake agents on its agent port.
//!
//! Each test starts its own manager on loopback with ports chosen by the OS
//! and a temporary data directory, waits for the ready file, and talks to it
//! with the link layer (or raw bytes where the test needs malformed input).
//! Every wait is bounded.

use crate::common::*;
use baton_agent_core::linux::link::{self, Limits, LinkError};
use baton_protocol::frame;
use baton_protocol::identity::Identity;
use baton_protocol::merkle;
use baton_protocol::message::{Message, Refusal};
use baton_protocol::session::{Hello, Role};
use baton_test_support::{Manager, manager::log_of};
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

#[test]
fn api_refuses_requests_without_the_admin_token() {
    let m = Manager::start(BATON);
    for token in [None, Some("wrong")] {
        let (status, body) = m.api_with("GET", "/api/v1/status", None, token);
        assert_eq!(status, 401, "{body}");
        assert!(body["error"].as_str().unwrap().contains("token"));
        let (status, _) = m.api_with("POST", "/api/v1/agents", Some(json!({})), token);
        assert_eq!(status, 401);
        let (status, _) = m.api_with("GET", "/api/v1/nowhere", None, token);
        assert_eq!(status, 401);
    }
    let (status, body) = m.api("GET", "/api/v1/status", None);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["epoch"], 1);
    assert_eq!(body["manager_key"], m.info.manager_key.as_str());
    assert_eq!(body["connected_agents"], 0);
    let (status, body) = m.api("GET", "/api/v1/nowhere", None);
    assert_eq!(status, 404);
    assert!(body["error"].is_string());
    // The token file is private.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(m.dir.join("data/admin.token"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn enrolment_through_the_api() {
    let m = Manager::start(BATON);
    let key = Identity::from_seed([2; 32]).public();
    let body = json!({ "id": "edge-1", "key": hex::encode(key.0) });
    let (status, _) = m.api("POST", "/api/v1/agents", Some(body.clone()));
    assert_eq!(status, 201);
    let (status, _) = m.api("POST", "/api/v1/agents", Some(body));
    assert_eq!(status, 200);
    let other = Identity::from_seed([3; 32]).public();
    let (status, body) = m.api(
        "POST",
        "/api/v1/agents",
        Some(json!({ "id": "edge-1", "key": hex::encode(other.0) })),
    );
    assert_eq!(status, 409, "{body}");
    for bad in [
        json!({ "id": "edge-2", "key": "abcd" }),
        json!({ "id": "", "key": hex::encode(key.0) }),
        json!({ "id": "x".repeat(33), "key": hex::encode(key.0) }),
        json!({ "id": "edge-2" }),
    ] {
        let (status, body) = m.api("POST", "/api/v1/agents", Some(bad.clone()));
        assert_eq!(status, 400, "{bad} → {body}");
        assert!(body["error"].is_string());
    }
    let (status, agents) = m.api("GET", "/api/v1/agents", None);
    assert_eq!(status, 200);
    let agents = agents.as_array().unwrap();
    assert_eq!(agents.len(), 1);
    assert_eq!(agents[0]["id"], "edge-1");
    assert_eq!(agents[0]["key"], hex::encode(key.0));
    assert_eq!(agents[0]["connected"], false);
    let (status, _) = m.api("GET", "/api/v1/agents/edge-1", None);
    assert_eq!(status, 200);
    let (status, _) = m.api("GET", "/api/v1/agents/nobody", None);
    assert_eq!(status, 404);
    let (status, token) = m.api("POST", "/api/v1/enrolment-tokens", None);
    assert_eq!(status, 201);
    assert!(token["token"].as_str().unwrap().len() >= 16);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_are_authenticated_against_their_enrolled_keys() {
    let m = Manager::start(BATON);
    let good = Identity::from_seed([2; 32]);
    let impostor = Identity::from_seed([3; 32]);

    // Unknown id: refused, and told so.
    let err = join(&m, &good, "edge-1", None).await.unwrap_err();
    assert!(
        matches!(err, LinkError::Refused(ref why) if why.contains("\"edge-1\" is not enrolled")),
        "{err:?}"
    );

    m.enrol("edge-1", &good.public());
    // Known id, wrong key: refused, in the same words as an unknown id (a stranger
    // learns no enrolled id).
    let err = join(&m, &impostor, "edge-1", None).await.unwrap_err();
    assert!(
        matches!(err, LinkError::Refused(ref why) if why.contains("\"edge-1\" is not enrolled")),
        "{err:?}"
    );
    // A client that pins another manager key never gets a session.
    let stream = TcpStream::connect(m.agent_addr()).await.unwrap();
    let hello = Hello::new(Role::Agent, id("edge-1"), 0, None);
    let wrong_pin = Identity::from_seed([9; 32]).public();
    assert!(
        link::connect(stream, &good, &wrong_pin, hello, &Limits::default())
            .await
            .is_err()
    );

    // The enrolled key: welcome, naming no publisher (agents trust publishers through the
    // root-signed trust document only), then that document.
    let (mut r, mut w, welcomed) = join(&m, &good, "edge-1", None).await.unwrap();
    assert!(welcomed.publishers.is_empty(), "{:?}", welcomed.publishers);
    let trusted = recv_until(&mut r, |msg| match msg {
        Message::Trust { document } => {
            Some(baton_protocol::trust::SignedTrust::decode(document).unwrap())
        }
        _ => None,
    })
    .await;
    assert_eq!(
        trusted.document.publishers[0].key.0.to_vec(),
        hex::decode(m.info.publisher_key.as_deref().unwrap()).unwrap()
    );
    ping(&mut r, &mut w, 7).await;
    let (_, status) = m.api("GET", "/api/v1/status", None);
    assert_eq!(status["connected"], json!(["edge-1"]));
    let log = log_of(&m.dir);
    assert!(log.contains("unknown agent"), "refusal is logged");
    assert!(log.contains("not the one enrolled"), "refusal is logged");

    // Reconnecting with the same key takes the session over; the old one is closed.
    let (mut r2, mut w2, _) = join(&m, &good, "edge-1", None).await.unwrap();
    expect_closed(&mut r).await;
    ping(&mut r2, &mut w2, 8).await;
    let (_, status) = m.api("GET", "/api/v1/status", None);
    assert_eq!(status["connected"], json!(["edge-1"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_time_token_enrols_an_agent_once() {
    let m = Manager::start(BATON);
    let (_, token) = m.api("POST", "/api/v1/enrolment-tokens", None);
    let token = token["token"].as_str().unwrap().to_string();
    let a = Identity::from_seed([4; 32]);
    let b = Identity::from_seed([5; 32]);
    let (mut r, mut w, _) = join(&m, &a, "new-1", Some(&token)).await.unwrap();
    ping(&mut r, &mut w, 1).await;
    let err = join(&m, &b, "new-2", Some(&token)).await.unwrap_err();
    assert!(
        matches!(err, LinkError::Refused(ref why) if why.contains("agent \"new-1\" already used")),
        "{err:?}"
    );
    let (status, agent) = m.api("GET", "/api/v1/agents/new-1", None);
    assert_eq!(status, 200);
    assert_eq!(agent["connected"], true);
    let (status, _) = m.api("GET", "/api/v1/agents/new-2", None);
    assert_eq!(status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_close_only_their_own_connection() {
    let m = Manager::start(BATON);
    let a = Identity::from_seed([2; 32]);
    let b = Identity::from_seed([3; 32]);
    let c = Identity::from_seed([4; 32]);
    m.enrol("a", &a.public());
    m.enrol("b", &b.public());
    m.enrol("c", &c.public());
    let (mut br, mut bw, _) = join(&m, &b, "b", None).await.unwrap();

    // A frame that does not decrypt.
    let (mut s, mut t) = raw_session(&m, &a, "a").await;
    let mut buf = vec![0u8; 4096];
    let plain = Message::Report(report("a")).to_vec();
    buf[2..2 + plain.len()].copy_from_slice(&plain);
    let n = t.encrypt(&mut buf[2..], plain.len()).unwrap();
    buf[..2].copy_from_slice(&frame::header(n).unwrap());
    s.write_all(&buf[..2 + n]).await.unwrap();
    let garbage = [0u8, 40, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10];
    s.write_all(&garbage).await.unwrap();
    s.write_all(&[0u8; 32]).await.unwrap();
    raw_expect_closed(&mut s).await;

    // A frame whose header is over the manager's limit for agents.
    let (mut s, _t) = raw_session(&m, &a, "a").await;
    s.write_all(&[0xff, 0xff]).await.unwrap();
    raw_expect_closed(&mut s).await;

    // Authentic bytes that are not a message.
    let (mut cr, mut cw, _) = join(&m, &c, "c", None).await.unwrap();
    cw.send(&[0xff, 0xff, 0xff, 0xff]).await.unwrap();
    expect_closed(&mut cr).await;

    // The other agent never noticed.
    ping(&mut br, &mut bw, 42).await;
    let (_, status) = m.api("GET", "/api/v1/status", None);
    assert_eq!(status["connected"], json!(["b"]));
    let log = log_of(&m.dir);
    assert!(log.contains("malformed message"), "logged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_and_garbage_handshakes_are_refused() {
    let m = Manager::start(BATON);
    // A handshake header over the handshake limit: closed before any body is sent.
    let mut s = TcpStream::connect(m.agent_addr()).await.unwrap();
    s.write_all(&[0xff, 0xff]).await.unwrap();
    raw_expect_closed(&mut s).await;
    // A zero-length header.
    let mut s = TcpStream::connect(m.agent_addr()).await.unwrap();
    s.write_all(&[0, 0]).await.unwrap();
    raw_expect_closed(&mut s).await;
    // Not Noise at all.
    let mut s = TcpStream::connect(m.agent_addr()).await.unwrap();
    s.write_all(&[0, 8, 1, 2, 3, 4, 5, 6, 7, 8]).await.unwrap();
    raw_expect_closed(&mut s).await;
    // The manager still serves agents.
    let a = Identity::from_seed([2; 32]);
    m.enrol("a", &a.public());
    let (mut r, mut w, _) = join(&m, &a, "a", None).await.unwrap();
    ping(&mut r, &mut w, 3).await;
    let log = log_of(&m.dir);
    assert!(log.contains("handshake failed"), "logged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_content_is_served_with_proofs() {
    let m = Manager::start(BATON);
    let a = Identity::from_seed([2; 32]);
    m.enrol("a", &a.public());
    let file = m.dir.join("content.bin");
    let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&file, &data).unwrap();
    let (status, job) = m.api(
        "POST",
        "/api/v1/jobs",
        Some(json!({
            "path": file, "name": "fw", "chunk_size": 4096,
            "targets": { "agents": ["a"] }
        })),
    );
    assert_eq!(status, 201, "{job}");
    assert_eq!(
        (job["version"].as_u64(), job["chunks"].as_u64()),
        (Some(1), Some(25))
    );
    let root: [u8; 32] = hex::decode(job["root"].as_str().unwrap())
        .unwrap()
        .try_into()
        .unwrap();
    // "all" with nobody connected has no targets: refused, and recorded as such.
    let all = json!({ "path": file, "name": "fw", "chunk_size": 4096, "targets": { "all": true } });
    let (status, refused) = m.api("POST", "/api/v1/jobs", Some(all.clone()));
    assert_eq!(status, 409, "{refused}");
    assert!(refused["error"].as_str().unwrap().contains("no targets"));
    let (status, body) = m.api(
        "POST",
        "/api/v1/jobs",
        Some(json!({ "path": file, "targets": { "agents": ["ghost"] } })),
    );
    assert_eq!(status, 400, "{body}");
    let (status, body) = m.api(
        "POST",
        "/api/v1/jobs",
        Some(json!({ "path": "/no/such/file", "targets": { "all": true } })),
    );
    assert_eq!(status, 400, "{body}");

    let (mut r, mut w, _) = join(&m, &a, "a", None).await.unwrap();
    // The same file again keeps its version; a changed one gets the next.
    let (status, job2) = m.api("POST", "/api/v1/jobs", Some(all));
    assert_eq!(status, 201, "{job2}");
    assert_eq!(
        (job2["version"].as_u64(), &job2["root"]),
        (Some(1), &job["root"])
    );
    let mut changed = data.clone();
    changed[5] ^= 1;
    let file2 = m.dir.join("content2.bin");
    std::fs::write(&file2, &changed).unwrap();
    let (status, job3) = m.api(
        "POST",
        "/api/v1/jobs",
        Some(json!({ "path": file2, "name": "fw", "chunk_size": 4096, "targets": { "agents": ["a"] } })),
    );
    assert_eq!(status, 201, "{job3}");
    assert_eq!(job3["version"], 2);
    for index in [0u32, 13, 24] {
        w.send(&Message::ChunkRequest { root, index }.to_vec())
            .await
            .unwrap();
        let expected = &data[index as usize * 4096..((index as usize + 1) * 4096).min(data.len())];
        recv_until(&mut r, |msg| match msg {
            Message::Chunk {
                root: got,
                index: i,
                proof,
                data,
            } if got == root && i == index => {
                assert_eq!(data, expected);
                merkle::verify_leaf(&root, 25, index, &merkle::leaf_hash(data), &proof)
                    .expect("proof verifies");
                Some(())
            }
            _ => None,
        })
        .await;
    }
    for (root, index) in [(root, 25u32), ([0; 32], 0)] {
        w.send(&Message::ChunkRequest { root, index }.to_vec())
            .await
            .unwrap();
        recv_until(&mut r, |msg| match msg {
            Message::Refuse {
                root: got,
                index: i,
                reason,
            } if got == root && i == index => {
                assert_eq!(reason, Refusal::Unknown);
                Some(())
            }
            _ => None,
        })
        .await;
    }
    let (_, status) = m.api("GET", "/api/v1/status", None);
    assert!(
        status["bytes_sent"].as_u64().unwrap() > 2 * 4096 + 1696,
        "{status}"
    );
    let (status, jobs) = m.api("GET", "/api/v1/jobs", None);
    assert_eq!(status, 200);
    let states: Vec<&str> = jobs
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["state"].as_str().unwrap())
        .collect();
    assert_eq!(states.len(), 4, "{jobs}");
    assert_eq!(states[2], "refused", "{jobs}");
    let id = job["id"].as_u64().unwrap();
    let (status, detail) = m.api("GET", &format!("/api/v1/jobs/{id}"), None);
    assert_eq!(status, 200, "{detail}");
    assert_eq!(detail["content"]["name"], "fw");
    assert_eq!(detail["total_chunks"], 25);
    let (status, _) = m.api("GET", "/api/v1/jobs/999", None);
    assert_eq!(status, 404);

    // Cancelling: once; the agent is told; the job's record says so.
    let id3 = job3["id"].as_u64().unwrap();
    let (status, body) = m.api("POST", &format!("/api/v1/jobs/{id3}/cancel"), None);
    assert_eq!(status, 200, "{body}");
    recv_until(&mut r, |msg| match msg {
        Message::Cancel { job } if job.id == id3 => Some(()),
        _ => None,
    })
    .await;
    let (status, body) = m.api("POST", &format!("/api/v1/jobs/{id3}/cancel"), None);
    assert_eq!(status, 409, "{body}");
    let (_, detail) = m.api("GET", &format!("/api/v1/jobs/{id3}"), None);
    assert_eq!(detail["state"], "cancelled");
    let (status, _) = m.api("POST", "/api/v1/jobs/999/cancel", None);
    assert_eq!(status, 404);
}

#[test]
fn a_restart_keeps_keys_and_agents_and_starts_a_new_epoch() {
    let tmp = tempfile::tempdir().unwrap();
    let key = Identity::from_seed([2; 32]).public();
    let (first_key, token) = {
        let mut m = Manager::start_in(BATON, tmp.path());
        assert_eq!(m.info.epoch, 1);
        m.enrol("edge-1", &key);
        let k = m.info.manager_key.clone();
        let t = m.info.admin_token.clone();
        m.stop();
        (k, t)
    };
    let m = Manager::start_in(BATON, tmp.path());
    assert_eq!(m.info.epoch, 2);
    assert_eq!(m.info.manager_key, first_key);
    assert_eq!(m.info.admin_token, token);
    let (status, agent) = m.api("GET", "/api/v1/agents/edge-1", None);
    assert_eq!(status, 200);
    assert_eq!(agent["key"], hex::encode(key.0));
}
