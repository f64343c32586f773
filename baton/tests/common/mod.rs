//! Helpers for the integration tests: a real `baton serve` child process and fake agents.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use baton_agent_core::linux::link::{self, Limits, LinkError, LinkReader, LinkWriter};
use baton_manager::serve::ReadyInfo;
use baton_protocol::frame;
use baton_protocol::identity::{AgentCert, Identity};
use baton_protocol::message::{Message, Report};
use baton_protocol::session::{Handshake, Hello, MAX_HANDSHAKE_MSG, Role};
use baton_protocol::types::{AgentId, LinkInfo, PublicKey};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;

/// How long any single wait in these tests may take.
pub const BOUND: Duration = Duration::from_secs(20);

/// A running `baton serve`, killed when dropped.
pub struct Manager {
    pub child: Child,
    pub dir: PathBuf,
    pub info: ReadyInfo,
    _tmp: Option<tempfile::TempDir>,
}

impl Manager {
    pub fn start() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let mut m = Self::start_in(&dir);
        m._tmp = Some(tmp);
        m
    }

    pub fn start_in(dir: &Path) -> Self {
        Self::start_on(dir, "127.0.0.1:0")
    }

    /// Starts a manager whose agent port is `listen` (a fixed port survives a restart).
    pub fn start_on(dir: &Path, listen: &str) -> Self {
        let ready = dir.join("ready.json");
        let _ = std::fs::remove_file(&ready);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("serve.log"))
            .unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_baton"))
            .args(["serve", "--data-dir"])
            .arg(dir.join("data"))
            .args(["--listen", listen, "--http", "127.0.0.1:0"])
            .args(["--give-up", "5", "--ready-file"])
            .arg(&ready)
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start baton serve");
        let deadline = Instant::now() + BOUND;
        let info = loop {
            if let Ok(bytes) = std::fs::read(&ready) {
                break serde_json::from_slice::<ReadyInfo>(&bytes).expect("ready file is JSON");
            }
            if let Some(status) = child.try_wait().unwrap() {
                panic!("baton serve exited early ({status}); log:\n{}", log_of(dir));
            }
            assert!(
                Instant::now() < deadline,
                "no ready file; log:\n{}",
                log_of(dir)
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        Manager {
            child,
            dir: dir.to_path_buf(),
            info,
            _tmp: None,
        }
    }

    /// Stops the manager with SIGTERM and waits for it to exit.
    pub fn stop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + BOUND;
        while self.child.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "manager did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the manager (SIGKILL, no chance to clean up) and waits for it to exit.
    pub fn crash(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits until some participant of job `id` has verified a chunk.
    pub fn wait_job_started(&self, id: u64) {
        self.wait_job(id, BOUND, |j| {
            j["participants"]
                .as_array()
                .is_some_and(|p| p.iter().any(|p| p["verified"].as_u64().unwrap_or(0) > 0))
        });
    }

    /// The data directory (admin token, keys, database).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// Waits until every agent in `names` is connected.
    pub fn wait_connected(&self, names: &[&str]) {
        let deadline = Instant::now() + BOUND;
        loop {
            let (_, status) = self.api("GET", "/api/v1/status", None);
            let connected: Vec<&str> = status["connected"]
                .as_array()
                .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
                .unwrap_or_default();
            if names.iter().all(|n| connected.contains(n)) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "agents {names:?} not connected (connected: {connected:?}); log:\n{}",
                log_of(&self.dir)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Polls a job until `done` says so; returns the job's detail.
    pub fn wait_job(&self, job: u64, limit: Duration, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + limit;
        loop {
            let (status, detail) = self.api("GET", &format!("/api/v1/jobs/{job}"), None);
            assert_eq!(status, 200, "{detail}");
            if done(&detail) {
                return detail;
            }
            assert!(
                Instant::now() < deadline,
                "job {job} did not get there: {detail}; log:\n{}",
                log_of(&self.dir)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn agent_addr(&self) -> SocketAddr {
        self.info.agent_addr.parse().unwrap()
    }

    pub fn key(&self) -> PublicKey {
        let bytes: [u8; 32] = hex::decode(&self.info.manager_key)
            .unwrap()
            .try_into()
            .unwrap();
        PublicKey(bytes)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.info.http_addr)
    }

    /// An API request with the admin token; returns status and JSON body.
    pub fn api(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        self.api_with(method, path, body, Some(&self.info.admin_token))
    }

    pub fn api_with(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
        token: Option<&str>,
    ) -> (u16, Value) {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(BOUND))
            .build()
            .into();
        let auth = token.map(|t| format!("Bearer {t}"));
        let resp = match method {
            "GET" => {
                let mut r = agent.get(self.url(path));
                if let Some(a) = &auth {
                    r = r.header("Authorization", a);
                }
                r.call()
            }
            _ => {
                let mut r = agent.post(self.url(path));
                if let Some(a) = &auth {
                    r = r.header("Authorization", a);
                }
                r.send_json(body.unwrap_or(json!({})))
            }
        };
        let mut resp = resp.expect("HTTP request");
        let status = resp.status().as_u16();
        let text = resp.body_mut().read_to_string().unwrap();
        let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, value)
    }

    pub fn enrol(&self, id: &str, key: &PublicKey) {
        let (status, body) = self.api(
            "POST",
            "/api/v1/agents",
            Some(json!({ "id": id, "key": hex::encode(key.0) })),
        );
        assert!(status == 201 || status == 200, "enrol: {status} {body}");
    }
}

impl Drop for Manager {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn log_of(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("serve.log")).unwrap_or_default()
}

pub fn id(s: &str) -> AgentId {
    AgentId::try_from(s).unwrap()
}

pub fn report(agent: &str) -> Report {
    Report {
        id: id(agent),
        listen: None,
        site: "test".try_into().unwrap(),
        segment: "loopback".try_into().unwrap(),
        performance: 100,
        free_storage: 1 << 30,
        can_serve: false,
        max_chunk: 32 * 1024,
        max_sources: 4,
        max_peers: 0,
        link: LinkInfo::default(),
        delays: heapless::Vec::new(),
        labels: heapless::Vec::new(),
        holdings: heapless::Vec::new(),
    }
}

pub type Reader = LinkReader<ReadHalf<TcpStream>>;
pub type Writer = LinkWriter<WriteHalf<TcpStream>>;

/// What a fake agent learned from `Welcome`.
#[derive(Debug)]
pub struct Welcomed {
    pub publishers: Vec<PublicKey>,
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
                },
            ))
        }
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

/// A `baton agent` child process, killed when dropped.
pub struct AgentProc {
    pub child: Child,
    pub dir: PathBuf,
    pub name: String,
}

impl AgentProc {
    /// Starts agents `names` with slow (256 KiB/s) downloads, so that a job is still running
    /// when the test interrupts it; waits until all are connected.
    pub fn spawn_slow(m: &Manager, root: &Path, names: &[&str]) -> Vec<Self> {
        let agents = names
            .iter()
            .map(|n| Self::spawn(m, root, n, &["--down-bps", "256KiB"]))
            .collect();
        m.wait_connected(names);
        agents
    }

    /// Starts agent `name` under `root/name`, enrolling with a fresh one-time token.
    pub fn spawn(m: &Manager, root: &Path, name: &str, extra: &[&str]) -> Self {
        Self::spawn_custom(m, root, name, &m.agent_addr().to_string(), true, extra)
    }

    /// Waits until the agent exported content equal to `expected`.
    pub fn wait_export(&self, expected: &[u8]) {
        let deadline = Instant::now() + BOUND;
        loop {
            if let Ok(got) = std::fs::read(self.dir.join("out"))
                && got.len() == expected.len()
            {
                assert!(got == expected, "{} exported other bytes", self.name);
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{} exported nothing; log:\n{}",
                self.name,
                std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a finished `baton` client command printed.
pub struct Output {
    pub success: bool,
    /// The child's process id (namespaces a `demo` creates carry it).
    pub pid: u32,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// Stops an overdue child: SIGTERM first, so that a `demo` or `lab` unwinds and removes its
/// namespaces; SIGKILL if it has not exited 10 s later.
fn stop(child: &mut Child) {
    let _ = Command::new("kill")
        .args(["-s", "TERM", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Runs `baton args…` to completion within `limit` (stopped and failed past it).
pub fn baton(args: &[&str], limit: Duration) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let out = std::fs::File::create(dir.path().join("out")).unwrap();
    let err = std::fs::File::create(dir.path().join("err")).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_baton"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .expect("start baton");
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            stop(&mut child);
            panic!(
                "baton {args:?} did not finish in {limit:?}; stderr:\n{}",
                std::fs::read_to_string(dir.path().join("err")).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        success: status.success(),
        pid: child.id(),
        code: status.code(),
        stdout: std::fs::read_to_string(dir.path().join("out")).unwrap(),
        stderr: std::fs::read_to_string(dir.path().join("err")).unwrap(),
    }
}

// Helpers for `faults.rs` and the `relay_hop` bench: managers with chosen flags, agents
// restarted in place, status files, bounded polling.

/// Polls `probe` every 20 ms until it returns `Some`; panics with `what` (and `context()`) past `limit`.
pub fn wait_for<T>(
    what: &str,
    limit: Duration,
    context: impl Fn() -> String,
    mut probe: impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(t) = probe() {
            return t;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not within {limit:?}\n{}",
            context()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A loopback address with a port free now, for a manager that must keep its address across
/// a restart.
pub fn free_loopback_addr() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    format!("127.0.0.1:{}", listener.local_addr().unwrap().port())
}

/// Deterministic pseudo-random content of `len` bytes.
pub fn pseudo_random(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).max(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

impl Manager {
    /// Starts a manager in a fresh temporary directory with these extra `serve` flags
    /// (`--give-up` is not preset: give it in `extra`, else the manager's default applies).
    pub fn start_args(extra: &[&str]) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let mut m = Self::start_args_in(&dir, "127.0.0.1:0", extra);
        m._tmp = Some(tmp);
        m
    }

    /// Starts a manager in `dir` whose agent port is `listen`, with these extra `serve` flags.
    pub fn start_args_in(dir: &Path, listen: &str, extra: &[&str]) -> Self {
        let ready = dir.join("ready.json");
        let _ = std::fs::remove_file(&ready);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("serve.log"))
            .unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_baton"))
            .args(["serve", "--data-dir"])
            .arg(dir.join("data"))
            .args(["--listen", listen, "--http", "127.0.0.1:0", "--ready-file"])
            .arg(&ready)
            .args(extra)
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start baton serve");
        let info = wait_for(
            "manager ready file",
            BOUND,
            || log_of(dir),
            || {
                if let Some(status) = child.try_wait().unwrap() {
                    panic!("baton serve exited early ({status}); log:\n{}", log_of(dir));
                }
                let bytes = std::fs::read(&ready).ok()?;
                Some(serde_json::from_slice::<ReadyInfo>(&bytes).expect("ready file is JSON"))
            },
        );
        Manager {
            child,
            dir: dir.to_path_buf(),
            info,
            _tmp: None,
        }
    }

    /// The manager's log so far.
    pub fn log(&self) -> String {
        log_of(&self.dir)
    }

    /// A job's detail from the API.
    pub fn job(&self, job: u64) -> Value {
        let (status, detail) = self.api("GET", &format!("/api/v1/jobs/{job}"), None);
        assert_eq!(status, 200, "{detail}");
        detail
    }

    /// Creates a job for `path` over the API (`extra` fields merged into the body); returns its id.
    pub fn create_job(&self, path: &Path, agents: &[&str], extra: Value) -> u64 {
        let mut body = json!({ "path": path, "targets": { "agents": agents } });
        if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                b.insert(k.clone(), v.clone());
            }
        }
        let (status, job) = self.api("POST", "/api/v1/jobs", Some(body));
        assert_eq!(status, 201, "{job}");
        job["id"].as_u64().unwrap()
    }
}

/// One participant of a job's detail, by agent id.
pub fn participant<'a>(job: &'a Value, agent: &str) -> &'a Value {
    job["participants"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["agent"] == agent))
        .unwrap_or_else(|| panic!("{agent} is not a participant: {job}"))
}

/// Verified bytes `agent` received from `from` (`None` = the manager) in a job's detail.
pub fn bytes_from(job: &Value, agent: &str, from: Option<&str>) -> u64 {
    job["source_bytes"]
        .as_array()
        .map(|all| {
            all.iter()
                .filter(|s| s["agent"] == agent && s["from"].as_str() == from)
                .filter_map(|s| s["bytes"].as_u64())
                .sum()
        })
        .unwrap_or(0)
}

impl AgentProc {
    /// Starts agent `name` under `root/name`, already enrolled (no token): a restart.
    pub fn spawn_enrolled(m: &Manager, root: &Path, name: &str, extra: &[&str]) -> Self {
        Self::spawn_custom(m, root, name, &m.agent_addr().to_string(), false, extra)
    }

    /// Starts agent `name` under `root/name` that reaches the manager at `manager` (e.g. a
    /// proxy), enrolling with a fresh one-time token if `enrol`; the log is appended to.
    pub fn spawn_custom(
        m: &Manager,
        root: &Path,
        name: &str,
        manager: &str,
        enrol: bool,
        extra: &[&str],
    ) -> Self {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("agent.log"))
            .unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_baton"));
        cmd.arg("agent")
            .args(["--manager", manager])
            .args(["--manager-key", &m.info.manager_key])
            .args(["--id", name])
            .arg("--data-dir")
            .arg(dir.join("data"))
            .args(["--listen", "127.0.0.1:0"])
            .arg("--export")
            .arg(dir.join("out"));
        if enrol {
            let (status, token) = m.api("POST", "/api/v1/enrolment-tokens", None);
            assert_eq!(status, 201);
            cmd.args(["--token", token["token"].as_str().unwrap()]);
        }
        let child = cmd
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start baton agent");
        AgentProc {
            child,
            dir,
            name: name.to_string(),
        }
    }

    /// Kills the process with SIGKILL (no chance to clean up) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The agent's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    /// The agent's status file `file` (under its directory), if written yet.
    pub fn status(&self, file: &str) -> Option<Value> {
        let text = std::fs::read_to_string(self.dir.join(file)).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// Job `job` in the status file `file`, if listed.
    pub fn job_status(&self, file: &str, job: u64) -> Option<Value> {
        self.status(file)?["jobs"]
            .as_array()?
            .iter()
            .find(|j| j["job"] == job)
            .cloned()
    }
}
