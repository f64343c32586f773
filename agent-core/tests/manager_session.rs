//! The manager session is closed and re-established when the manager sends a
//! frame that decrypts but is not a message (as peer sessions are closed on
//! malformed frames): a fake manager on the link layer and a real `baton-agent`.

use std::process::Stdio;
use std::time::Duration;

use baton_agent_core::linux::link::{self, Limits, LinkError};
use baton_protocol::identity::Identity;
use baton_protocol::session::{Hello, Role};
use baton_protocol::{AgentId, Message, caps};
use tokio::net::TcpListener;
use tokio::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_baton-agent");
const BOUND: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_frame_from_the_manager_closes_and_reopens_the_session() {
    let tmp = tempfile::tempdir().unwrap();
    let manager = Identity::from_seed([1; 32]);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let _agent = Command::new(BIN)
        .args(["--manager", &format!("127.0.0.1:{port}")])
        .args(["--manager-key", &hex::encode(manager.public().0)])
        .args([
            "--id",
            "a1",
            "--listen",
            "127.0.0.1:0",
            "--discovery-port",
            "0",
        ])
        .arg("--data-dir")
        .arg(tmp.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();

    let accept = || async {
        let (stream, _) = tokio::time::timeout(BOUND, listener.accept())
            .await
            .expect("the agent connects")
            .unwrap();
        let (link, ()) = link::accept(
            stream,
            &manager,
            Hello::new(
                Role::Manager,
                AgentId::try_from("mgr").unwrap(),
                caps::ALL,
                None,
            ),
            &Limits::default(),
            |_| Ok(()),
        )
        .await
        .unwrap();
        let (mut reader, writer) = link.split();
        let first = tokio::time::timeout(BOUND, reader.recv())
            .await
            .expect("a first frame")
            .unwrap();
        assert!(matches!(Message::decode(first), Ok(Message::Report(_))));
        (reader, writer)
    };

    let (mut reader, mut writer) = accept().await;
    // Variant 200 does not exist: the frame decrypts, the message does not decode.
    writer.send(&[200, 1]).await.unwrap();
    let closed = tokio::time::timeout(BOUND, async {
        loop {
            match reader.recv().await {
                Ok(_) => continue, // a ping may still come first
                Err(e) => return e,
            }
        }
    })
    .await
    .expect("the agent closes the session");
    assert!(
        matches!(closed, LinkError::Closed | LinkError::Io(_)),
        "{closed:?}"
    );
    // It comes back on its own with a new session and a new report.
    let _second = accept().await;
}
