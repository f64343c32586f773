//! What the end-to-end tests share that only they need: the `baton` executable cargo
//! built for them, its client commands, and a fake agent speaking the protocol itself.
//! Processes, polling and the manager's API are in `baton_test_support`.

use std::time::{Duration, Instant};

use baton_agent_core::linux::link::{self, Limits, LinkError, LinkReader, LinkWriter};
use baton_protocol::frame;
use baton_protocol::identity::{AgentCert, Identity};
use baton_protocol::message::Message;
use baton_protocol::session::{Handshake, Hello, MAX_HANDSHAKE_MSG, Role};
use baton_protocol::types::PublicKey;
use baton_test_support::manager::BOUND;
use baton_test_support::{Manager, Output};
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;

/// The end of a test's time; every wait takes what is left of it.
pub struct Deadline(Instant);

impl Deadline {
    /// A deadline `limit` from now.
    pub fn start(limit: Duration) -> Self {
        Deadline(Instant::now() + limit)
    }

    /// Time left (at least 1 ms, so a wait that is due fails with its own message).
    pub fn left(&self) -> Duration {
        self.0
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1))
    }
}

/// A small tokio runtime of its own for a test's fake agents and network helpers, so
/// that the test body can block (HTTP polls, sleeps) without starving them.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

/// A process's resident memory in bytes (`VmRSS` in `/proc/PID/status`).
pub fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("process status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in kB");
    kib * 1024
}

/// A process's open descriptors (entries of `/proc/PID/fd`).
pub fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("process descriptors")
        .count()
}

/// The `baton` executable under test.
pub const BATON: &str = env!("CARGO_BIN_EXE_baton");

/// Runs `baton args…` to completion within `limit` (stopped and failed past it).
pub fn baton(args: &[&str], limit: Duration) -> Output {
    let mut cmd = std::process::Command::new(BATON);
    cmd.args(args);
    baton_test_support::run(cmd, limit)
}

/// Adds the administrator `name` with `password` by `baton admin add` to the PostgreSQL
/// database `db` (the CLI writes to the database a manager serves from), and checks it did.
pub fn add_admin_on_postgresql(
    db: &baton_manager::store::test_database::TestDatabase,
    dir: &std::path::Path,
    name: &str,
    password: &str,
) {
    let password_file = db.password_file().unwrap().to_str().unwrap().to_string();
    let admin_password = dir.join(format!("{name}.password"));
    std::fs::write(&admin_password, format!("{password}\n")).unwrap();
    let out = baton(
        &[
            "admin",
            "add",
            name,
            "--password-file",
            admin_password.to_str().unwrap(),
            "--db",
            db.url(),
            "--db-password-file",
            &password_file,
        ],
        Duration::from_secs(30),
    );
    assert!(out.success, "{}\n{}", out.stdout, out.stderr);
}

pub use baton_test_support::fake::{id, report};

/// A fake agent's receiving half.
pub type Reader = LinkReader<ReadHalf<TcpStream>>;
/// A fake agent's sending half.
pub type Writer = LinkWriter<WriteHalf<TcpStream>>;

/// What a fake agent learned from `Welcome`.
#[derive(Debug)]
pub struct Welcomed {
    pub publishers: Vec<PublicKey>,
    /// The certificate the manager issued (peers check it).
    pub cert: AgentCert,
}

/// Connects as agent `name` with identity `me` (and a token), sends a report, awaits `Welcome`.
pub async fn join(
    m: &Manager,
    me: &Identity,
    name: &str,
    token: Option<&str>,
) -> Result<(Reader, Writer, Welcomed), LinkError> {
    let stream = TcpStream::connect(m.agent_addr()).await?;
    let mut hello = Hello::new(Role::Agent, id(name), baton_protocol::caps::RELAY_V1, None);
    if let Some(t) = token {
        // Enrolling: the hello carries the agent's self-signed certificate (SPEC §2).
        let own = AgentCert::issue(me, id(name), me.public());
        hello = Hello::new(
            Role::Agent,
            id(name),
            baton_protocol::caps::RELAY_V1,
            Some(own),
        )
        .with_token(t.try_into().unwrap());
    }
    let link = link::connect(stream, me, &m.key(), hello, &Limits::default()).await?;
    let (mut r, mut w) = link.split();
    // A refused agent may find its report already rejected by a closed socket.
    let _ = w.send(&Message::Report(report(name)).to_vec()).await;
    let bytes = tokio::time::timeout(BOUND, r.recv())
        .await
        .map_err(|_| LinkError::Timeout)??;
    match Message::decode(bytes) {
        Ok(Message::Welcome {
            cert, publishers, ..
        }) => {
            cert.verify(&m.key()).expect("cert signed by the manager");
            assert_eq!(cert.id, id(name));
            assert_eq!(
                baton_protocol::identity::x25519_of(&cert.key).unwrap(),
                me.x25519_public()
            );
            Ok((
                r,
                w,
                Welcomed {
                    publishers: publishers.to_vec(),
                    cert,
                },
            ))
        }
        // The manager refused this agent and said why.
        Ok(Message::NotAccepted { reason }) => Err(LinkError::Refused(reason.to_string())),
        other => panic!("expected Welcome, got {other:?}"),
    }
}

/// Receives messages until `pick` returns something; other messages are skipped.
pub async fn recv_until<T>(r: &mut Reader, mut pick: impl FnMut(Message<'_>) -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + BOUND;
    for _ in 0..10_000 {
        let bytes = tokio::time::timeout_at(deadline, r.recv())
            .await
            .expect("message in time")
            .expect("link alive");
        if let Some(t) = pick(Message::decode(bytes).expect("decodes")) {
            return t;
        }
    }
    panic!("too many unrelated messages");
}

/// Pings and expects the pong: the connection is alive and served.
pub async fn ping(r: &mut Reader, w: &mut Writer, nonce: u64) {
    w.send(&Message::Ping { nonce }.to_vec()).await.unwrap();
    recv_until(r, |m| match m {
        Message::Pong { nonce: n } if n == nonce => Some(()),
        _ => None,
    })
    .await;
}

/// Waits until the connection is closed by the manager.
pub async fn expect_closed(r: &mut Reader) {
    let deadline = tokio::time::Instant::now() + BOUND;
    for _ in 0..1000 {
        match tokio::time::timeout_at(deadline, r.recv())
            .await
            .expect("closed in time")
        {
            Ok(_) => continue,
            Err(_) => return,
        }
    }
    panic!("connection stayed open");
}

/// Runs the agent side of a handshake over a raw stream; returns the stream and the session.
pub async fn raw_session(
    m: &Manager,
    me: &Identity,
    name: &str,
) -> (TcpStream, baton_protocol::session::Transport) {
    let mut s = TcpStream::connect(m.agent_addr()).await.unwrap();
    let mut hs = Handshake::initiator(
        me,
        [77; 32],
        &m.key(),
        Hello::new(Role::Agent, id(name), 0, None),
    )
    .unwrap();
    let mut buf = [0u8; 2 + MAX_HANDSHAKE_MSG];
    for step in 0..3 {
        if step == 1 {
            let mut header = [0u8; 2];
            s.read_exact(&mut header).await.unwrap();
            let n = frame::parse_header(header, MAX_HANDSHAKE_MSG).unwrap();
            s.read_exact(&mut buf[..n]).await.unwrap();
            hs.read_message(&buf[..n]).unwrap();
        } else {
            let n = hs.write_message(&mut buf[2..]).unwrap();
            buf[..2].copy_from_slice(&frame::header(n).unwrap());
            s.write_all(&buf[..2 + n]).await.unwrap();
        }
    }
    (s, hs.finish().unwrap())
}

/// Reads until the peer closes (EOF or reset); panics if it does not within the bound.
pub async fn raw_expect_closed(s: &mut TcpStream) {
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + BOUND;
    for _ in 0..10_000 {
        match tokio::time::timeout_at(deadline, s.read(&mut buf))
            .await
            .expect("closed in time")
        {
            Ok(0) | Err(_) => return,
            Ok(_) => continue,
        }
    }
    panic!("connection stayed open");
}

/// Runs `baton args… --data-dir <m's data dir>` (the admin token is read from there
/// unless `args` give `--admin-token`).
pub fn cli(m: &baton_test_support::Manager, args: &[&str]) -> baton_test_support::Output {
    let data = m.data_dir();
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["--data-dir", data.to_str().unwrap()]);
    baton(&all, Duration::from_secs(60))
}

/// Runs a `baton` client command that must succeed; returns its stdout.
pub fn ok(m: &baton_test_support::Manager, args: &[&str]) -> String {
    let out = cli(m, args);
    assert!(
        out.success,
        "baton {args:?} failed:\n{}\n{}\nmanager log:\n{}",
        out.stdout,
        out.stderr,
        m.log()
    );
    out.stdout
}
