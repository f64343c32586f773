//! End to end: a small fake manager (built on the link layer) pushes content
//! to two real `baton-agent` processes; the second fetches from the first
//! (cut-through relay), both export it, confirm, and exit after `Done`.

use std::collections::HashMap;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use baton_agent_core::linux::link::{self, Limits, LinkError};
use baton_protocol::identity::{AgentCert, Identity};
use baton_protocol::merkle::{MerkleTree, leaf_hash};
use baton_protocol::message::{Source, SourceRange};
use baton_protocol::session::{Hello, Role};
use baton_protocol::{AgentId, JobRef, Manifest, Message, PeerAddr, PublicKey, caps};
use tokio::net::TcpListener;
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

mod common;

const BIN: &str = env!("CARGO_BIN_EXE_baton-agent");

fn id(s: &str) -> AgentId {
    AgentId::try_from(s).unwrap()
}

fn print_key(dir: &Path) -> PublicKey {
    let out = std::process::Command::new(BIN)
        .args(["--print-key", "--data-dir"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    PublicKey(hex::decode(text.trim()).unwrap().try_into().unwrap())
}

fn spawn_agent(name: &str, dir: &Path, port: u16, manager: &Identity, extra: &[&str]) -> Child {
    let log = if std::env::var_os("BATON_TEST_LOG").is_some() {
        Stdio::inherit()
    } else {
        Stdio::null()
    };
    Command::new(BIN)
        .args(["--manager", &format!("127.0.0.1:{port}")])
        .args(["--manager-key", &hex::encode(manager.public().0)])
        .args(["--id", name, "--listen", "127.0.0.1:0", "--window", "4"])
        .args(common::root_args())
        .arg("--data-dir")
        .arg(dir)
        .arg("--export")
        .arg(dir.join("out.bin"))
        .arg("--status-file")
        .arg(dir.join("status.json"))
        .arg("--on-complete")
        .arg(format!(
            "echo \"$BATON_NAME $BATON_VERSION\" > {}",
            dir.join("hook.txt").display()
        ))
        .arg("--exit-when-done")
        .args(extra)
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manager_pushes_to_two_agents_that_relay_peer_to_peer() {
    let tmp = tempfile::tempdir().unwrap();
    let (d1, d2) = (tmp.path().join("a1"), tmp.path().join("a2"));
    let keys: HashMap<AgentId, PublicKey> =
        [(id("a1"), print_key(&d1)), (id("a2"), print_key(&d2))].into();
    // The key file persists: a second call prints the same key.
    assert_eq!(print_key(&d1), keys[&id("a1")]);

    let manager = Identity::from_seed([1; 32]);
    let publisher = Identity::from_seed([2; 32]);
    let data: Vec<u8> = (0..300_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let chunk = 4096u32;
    let tree = MerkleTree::from_leaves(data.chunks(chunk as usize).map(leaf_hash).collect());
    let manifest = Manifest::sign(
        &publisher,
        heapless::String::try_from("firmware").unwrap(),
        3,
        0,
        data.len() as u64,
        chunk,
        tree.root(),
    );
    let chunks = manifest.chunks();

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut a1 = spawn_agent("a1", &d1, port, &manager, &[]);
    // The relay target's download is capped so the relay is visible in time.
    let mut a2 = spawn_agent("a2", &d2, port, &manager, &["--down-bps", "2MiB"]);

    // Accept both agents, authenticating each by its enrolled key.
    let (frames_tx, mut frames) = mpsc::channel::<(AgentId, Vec<u8>)>(256);
    let mut writers = HashMap::new();
    for _ in 0..2 {
        let (stream, _) = tokio::time::timeout(Duration::from_secs(20), listener.accept())
            .await
            .expect("agents connect")
            .unwrap();
        let (link, who) = link::accept(
            stream,
            &manager,
            Hello::new(Role::Manager, id("manager"), caps::ALL, None),
            &Limits::default(),
            |hs| {
                let who = hs.remote_hello().unwrap().id.clone();
                let key = keys
                    .get(&who)
                    .ok_or_else(|| LinkError::Refused("not enrolled".into()))?;
                hs.remote_is(key)?;
                Ok(who)
            },
        )
        .await
        .unwrap();
        let (mut reader, writer) = link.split();
        writers.insert(who.clone(), writer);
        let tx = frames_tx.clone();
        tokio::spawn(async move {
            while let Ok(f) = reader.recv().await {
                if tx.send((who.clone(), f.to_vec())).await.is_err() {
                    break;
                }
            }
        });
    }

    let job = JobRef { id: 1, epoch: 1 };
    let mut listen: HashMap<AgentId, PeerAddr> = HashMap::new();
    let mut have: Vec<AgentId> = Vec::new();
    let mut from_peer = 0u64;
    let mut from_manager: HashMap<AgentId, u64> = HashMap::new();
    let mut fetched = false;
    let mut troubles = Vec::new();
    let run = async {
        while have.len() < 2 {
            let (who, frame) = frames.recv().await.expect("agent sessions stay up");
            let reply = match Message::decode(&frame).unwrap() {
                Message::Report(r) => {
                    assert_eq!(r.id, who);
                    listen.insert(who.clone(), r.listen.expect("agents report their listener"));
                    vec![
                        Message::Welcome {
                            cert: AgentCert::issue(&manager, who.clone(), keys[&who]),
                            unix_time: 1_700_000_000,
                            publishers: heapless::Vec::new(),
                        }
                        .to_vec(),
                        common::trust_message(&publisher),
                    ]
                }
                Message::ChunkRequest { root, index } => {
                    assert_eq!(root, manifest.root);
                    let start = (index * chunk) as usize;
                    let end = (start + chunk as usize).min(data.len());
                    vec![
                        Message::Chunk {
                            root,
                            index,
                            proof: tree.proof(index).unwrap(),
                            data: &data[start..end],
                        }
                        .to_vec(),
                    ]
                }
                Message::Progress { received, .. } => {
                    for r in received {
                        match r.from {
                            Some(p) => {
                                assert_eq!((who.as_str(), p.as_str()), ("a2", "a1"));
                                from_peer += r.bytes;
                            }
                            None => *from_manager.entry(who.clone()).or_default() += r.bytes,
                        }
                    }
                    vec![]
                }
                Message::Have { job: j, root } => {
                    assert_eq!((j, root), (job, manifest.root));
                    have.push(who.clone());
                    vec![]
                }
                Message::PeerTrouble { peer, trouble, .. } => {
                    troubles.push((who.clone(), peer, trouble));
                    vec![]
                }
                _ => vec![],
            };
            for r in reply {
                writers.get_mut(&who).unwrap().send(&r).await.unwrap();
            }
            if !fetched && listen.len() == 2 {
                fetched = true;
                let fetch_a1 = Message::Fetch {
                    job,
                    manifest: manifest.clone(),
                    sources: heapless::Vec::new(),
                    next: Some(id("a2")),
                };
                let from_a1 = SourceRange {
                    source: Source::Peer {
                        id: id("a1"),
                        addr: listen[&id("a1")],
                        key: keys[&id("a1")],
                    },
                    first: 0,
                    end: chunks,
                };
                let fetch_a2 = Message::Fetch {
                    job,
                    manifest: manifest.clone(),
                    sources: heapless::Vec::from_slice(&[from_a1]).unwrap(),
                    next: None,
                };
                writers
                    .get_mut(&id("a1"))
                    .unwrap()
                    .send(&fetch_a1.to_vec())
                    .await
                    .unwrap();
                writers
                    .get_mut(&id("a2"))
                    .unwrap()
                    .send(&fetch_a2.to_vec())
                    .await
                    .unwrap();
            }
        }
        for w in writers.values_mut() {
            w.send(&Message::Done { job }.to_vec()).await.unwrap();
        }
    };
    tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("both agents confirm within a minute");

    for (name, child, dir) in [("a1", &mut a1, &d1), ("a2", &mut a2, &d2)] {
        let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
            .await
            .expect("agent exits after Done")
            .unwrap();
        assert!(status.success(), "{name} exited with {status}");
        assert_eq!(std::fs::read(dir.join("out.bin")).unwrap(), data, "{name}");
        assert_eq!(
            std::fs::read_to_string(dir.join("hook.txt")).unwrap(),
            "firmware 3\n"
        );
        let status: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("status.json")).unwrap())
                .unwrap();
        let j = &status["jobs"][0];
        assert_eq!(j["state"], "done", "{name}: {status}");
        assert_eq!(j["verified"], chunks);
    }
    assert!(troubles.is_empty(), "{troubles:?}");
    // a2 fetched everything from a1, and a1 everything from the manager.
    assert_eq!(from_peer, data.len() as u64);
    assert_eq!(from_manager.get(&id("a1")), Some(&(data.len() as u64)));
    assert_eq!(from_manager.get(&id("a2")), None);
    let s1: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d1.join("status.json")).unwrap()).unwrap();
    assert_eq!(s1["jobs"][0]["bytes_served"], data.len() as u64);
}
