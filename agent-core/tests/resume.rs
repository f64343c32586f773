//! End to end: a `baton-agent` killed mid-transfer resumes after restart and
//! fetches only the chunks it had not verified.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use baton_agent_core::linux::link::{self, Limits, LinkReader, LinkWriter};
use baton_protocol::identity::{AgentCert, Identity};
use baton_protocol::merkle::{MerkleTree, leaf_hash};
use baton_protocol::session::{Hello, Role};
use baton_protocol::{AgentId, JobRef, Manifest, Message, PublicKey, caps};
use tokio::io::{ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};

mod common;

const BIN: &str = env!("CARGO_BIN_EXE_baton-agent");

struct Fixture {
    manager: Identity,
    publisher: Identity,
    key: PublicKey,
    data: Vec<u8>,
    tree: MerkleTree,
    manifest: Manifest,
}

type Session = (
    LinkReader<ReadHalf<TcpStream>>,
    LinkWriter<WriteHalf<TcpStream>>,
);

fn spawn(dir: &Path, port: u16, manager: &Identity) -> Child {
    let log = if std::env::var_os("BATON_TEST_LOG").is_some() {
        Stdio::inherit()
    } else {
        Stdio::null()
    };
    Command::new(BIN)
        .args(["--manager", &format!("127.0.0.1:{port}")])
        .args(["--manager-key", &hex::encode(manager.public().0)])
        .args(["--id", "r1", "--listen", "127.0.0.1:0", "--window", "2"])
        .args(common::root_args())
        .args(["--down-bps", "256KiB", "--exit-when-done"])
        .arg("--data-dir")
        .arg(dir)
        .arg("--status-file")
        .arg(dir.join("status.json"))
        .arg("--export")
        .arg(dir.join("out.bin"))
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

async fn accept(f: &Fixture, listener: &TcpListener) -> Session {
    let (stream, _) = tokio::time::timeout(Duration::from_secs(20), listener.accept())
        .await
        .expect("agent connects")
        .unwrap();
    let key = f.key;
    let (link, ()) = link::accept(
        stream,
        &f.manager,
        Hello::new(
            Role::Manager,
            AgentId::try_from("m").unwrap(),
            caps::ALL,
            None,
        ),
        &Limits::default(),
        |hs| Ok(hs.remote_is(&key)?),
    )
    .await
    .unwrap();
    link.split()
}

/// Welcomes the agent (after its Report) and sends `Fetch`; returns the Report's verified count.
async fn welcome_and_fetch(f: &Fixture, s: &mut Session, epoch: u32) -> u32 {
    let report = s.0.recv().await.unwrap().to_vec();
    let Message::Report(r) = Message::decode(&report).unwrap() else {
        panic!("Report first");
    };
    let verified = r.holdings.first().map_or(0, |h| h.verified);
    let welcome = Message::Welcome {
        cert: AgentCert::issue(&f.manager, r.id.clone(), f.key),
        unix_time: 1_700_000_000,
        publishers: heapless::Vec::new(),
    };
    s.1.send(&welcome.to_vec()).await.unwrap();
    s.1.send(&common::trust_message(&f.publisher))
        .await
        .unwrap();
    let fetch = Message::Fetch {
        job: JobRef { id: 9, epoch },
        manifest: f.manifest.clone(),
        sources: heapless::Vec::new(),
        next: None,
    };
    s.1.send(&fetch.to_vec()).await.unwrap();
    verified
}

/// Serves chunk requests until `stop` says so; returns the indices requested.
async fn serve(
    f: &Fixture,
    s: &mut Session,
    mut stop: impl FnMut(&Message<'_>) -> bool,
) -> Vec<u32> {
    let mut asked = Vec::new();
    loop {
        let frame = s.0.recv().await.unwrap().to_vec();
        let msg = Message::decode(&frame).unwrap();
        if let Message::ChunkRequest { root, index } = msg {
            asked.push(index);
            let cs = f.manifest.chunk_size as usize;
            let start = index as usize * cs;
            let end = (start + cs).min(f.data.len());
            let chunk = Message::Chunk {
                root,
                index,
                proof: f.tree.proof(index).unwrap(),
                data: &f.data[start..end],
            };
            s.1.send(&chunk.to_vec()).await.unwrap();
        }
        if stop(&msg) {
            return asked;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_agent_resumes_from_its_verified_chunks() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("r1");
    let out = std::process::Command::new(BIN)
        .args(["--print-key", "--data-dir"])
        .arg(&dir)
        .output()
        .unwrap();
    let key = PublicKey(
        hex::decode(String::from_utf8(out.stdout).unwrap().trim())
            .unwrap()
            .try_into()
            .unwrap(),
    );
    let data: Vec<u8> = (0..1_000_000u32)
        .map(|i| ((i * 7) ^ (i >> 9)) as u8)
        .collect();
    let tree = MerkleTree::from_leaves(data.chunks(4096).map(leaf_hash).collect());
    let publisher = Identity::from_seed([2; 32]);
    let manifest = Manifest::sign(
        &publisher,
        heapless::String::try_from("bundle").unwrap(),
        1,
        0,
        data.len() as u64,
        4096,
        tree.root(),
    );
    let chunks = manifest.chunks();
    let f = Fixture {
        manager: Identity::from_seed([1; 32]),
        publisher,
        key,
        data,
        tree,
        manifest,
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();

    let test = async {
        // First run: killed once it reported 40 verified chunks.
        let mut agent = spawn(&dir, port, &f.manager);
        let mut s = accept(&f, &listener).await;
        assert_eq!(welcome_and_fetch(&f, &mut s, 1).await, 0);
        serve(
            &f,
            &mut s,
            |m| matches!(m, Message::Progress { verified, .. } if *verified >= 40),
        )
        .await;
        agent.kill().await.unwrap();
        drop(s);

        // Second run: the report lists what is held; only the rest is fetched.
        let mut agent = spawn(&dir, port, &f.manager);
        let mut s = accept(&f, &listener).await;
        let held = welcome_and_fetch(&f, &mut s, 2).await;
        assert!((40..chunks).contains(&held), "held {held}");
        let asked = serve(&f, &mut s, |m| matches!(m, Message::Have { .. })).await;
        assert_eq!(asked.len() as u32, chunks - held, "no chunk fetched twice");
        s.1.send(
            &Message::Done {
                job: JobRef { id: 9, epoch: 2 },
            }
            .to_vec(),
        )
        .await
        .unwrap();
        let status = tokio::time::timeout(Duration::from_secs(20), agent.wait())
            .await
            .expect("exits after Done")
            .unwrap();
        assert!(status.success());
        held
    };
    let held = tokio::time::timeout(Duration::from_secs(90), test)
        .await
        .expect("test finishes in time");
    assert_eq!(std::fs::read(dir.join("out.bin")).unwrap(), f.data);
    let status: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("status.json")).unwrap()).unwrap();
    assert_eq!(status["jobs"][0]["resumed"], held);
    assert_eq!(status["jobs"][0]["fetched"], chunks - held);
    assert_eq!(status["jobs"][0]["state"], "done");
}
