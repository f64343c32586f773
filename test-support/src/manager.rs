//! `baton serve` as a child process on loopback, and the HTTP API calls tests make to it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use baton_manager::serve::ReadyInfo;
use baton_protocol::types::PublicKey;
use serde_json::{Value, json};

use crate::process::Proc;
use crate::trust::TrustKit;
use crate::wait::{read_text, wait_for};

/// How long any single wait on a manager or its agents may take.
pub const BOUND: Duration = Duration::from_secs(20);

/// A running `baton serve` (its own process group), killed when dropped.
#[derive(Debug)]
pub struct Manager {
    /// The `baton` executable it runs (agents started for it run the same one).
    pub exe: PathBuf,
    /// Its directory: `serve.log`, `ready.json` and the data directory `data`.
    pub dir: PathBuf,
    /// What it wrote to its ready file.
    pub info: ReadyInfo,
    /// The fleet's keys and trust document (in `dir/trust`), unless the test gave its own
    /// `--trust`: the manager was started with them, agents pin its root.
    pub kit: Option<TrustKit>,
    proc: Proc,
    _tmp: Option<tempfile::TempDir>,
}

/// A `baton` command that exits when the test process does (its stdin pipe closes).
pub(crate) fn tied_command(exe: &Path) -> Command {
    let mut cmd = Command::new(exe);
    cmd.arg("--die-with-parent").stdin(Stdio::piped());
    cmd
}

impl Manager {
    /// Starts `exe serve` in a fresh temporary directory (`--give-up 5`).
    pub fn start(exe: impl AsRef<Path>) -> Self {
        Self::start_args(exe, &["--give-up", "5"])
    }

    /// Starts `exe serve` in `dir` (`--give-up 5`).
    pub fn start_in(exe: impl AsRef<Path>, dir: &Path) -> Self {
        Self::start_on(exe, dir, "127.0.0.1:0")
    }

    /// Starts a manager whose agent port is `listen` (a fixed port survives a restart).
    pub fn start_on(exe: impl AsRef<Path>, dir: &Path, listen: &str) -> Self {
        Self::start_args_in(exe, dir, listen, &["--give-up", "5"])
    }

    /// Starts a manager in a fresh temporary directory with these extra `serve` flags
    /// (`--give-up` is not preset: give it in `extra`, else the manager's default applies).
    pub fn start_args(exe: impl AsRef<Path>, extra: &[&str]) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let mut m = Self::start_args_in(exe, &dir, "127.0.0.1:0", extra);
        m._tmp = Some(tmp);
        m
    }

    /// Starts a manager in `dir` whose agent port is `listen`, with these extra `serve` flags.
    /// Unless `extra` gives a `--content-dir`, the system's temporary directory is one (the
    /// tests' files are there; the data directory inside stays refused). Unless `extra`
    /// gives `--trust`, the fleet's [`TrustKit`] in `dir/trust` (made on first use) is given
    /// as `--trust` and `--publisher-key`.
    pub fn start_args_in(exe: impl AsRef<Path>, dir: &Path, listen: &str, extra: &[&str]) -> Self {
        let ready = dir.join("ready.json");
        let _ = std::fs::remove_file(&ready);
        let log = dir.join("serve.log");
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let exe = exe.as_ref();
        let mut cmd = tied_command(exe);
        cmd.args(["serve", "--data-dir"])
            .arg(dir.join("data"))
            .args(["--listen", listen, "--http", "127.0.0.1:0", "--ready-file"])
            .arg(&ready)
            .args(extra)
            .env("RUST_LOG", "debug")
            .stdout(Stdio::null())
            .stderr(out);
        if !extra.contains(&"--content-dir") {
            cmd.arg("--content-dir").arg(std::env::temp_dir());
        }
        let kit = (!extra.contains(&"--trust")).then(|| TrustKit::in_dir(&dir.join("trust")));
        if let Some(kit) = &kit {
            cmd.arg("--trust").arg(kit.trust_file());
            if !extra.contains(&"--publisher-key") {
                cmd.arg("--publisher-key").arg(kit.publisher_key_file());
            }
        }
        let mut proc = Proc::spawn_with("baton serve", cmd, Some(&log));
        let info = wait_for(
            "manager ready file",
            BOUND,
            || log_of(dir),
            || {
                proc.assert_running("starting");
                let bytes = std::fs::read(&ready).ok()?;
                Some(serde_json::from_slice::<ReadyInfo>(&bytes).expect("ready file is JSON"))
            },
        );
        Manager {
            exe: exe.to_path_buf(),
            dir: dir.to_path_buf(),
            info,
            kit,
            proc,
            _tmp: None,
        }
    }

    /// Stops the manager with SIGTERM and waits for it to exit (within [`BOUND`]).
    pub fn stop(&mut self) {
        assert!(self.proc.stop(BOUND), "manager did not stop on SIGTERM");
    }

    /// Kills the manager (SIGKILL, no chance to clean up) and waits for it to exit.
    pub fn crash(&mut self) {
        self.proc.kill_group();
    }

    /// Waits until some participant of job `id` has verified a chunk.
    pub fn wait_job_started(&self, id: u64) {
        self.wait_job(id, BOUND, |j| {
            j["participants"]
                .as_array()
                .is_some_and(|p| p.iter().any(|p| p["verified"].as_u64().unwrap_or(0) > 0))
        });
    }

    /// How the manager exited, if it did (it is not waited for).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.proc.exited()
    }

    /// The manager's process id (for `/proc/PID/…`).
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// The data directory (admin token, keys, database).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// The agent ids the manager lists as connected.
    pub fn connected(&self) -> Vec<String> {
        let (_, status) = self.api("GET", "/api/v1/status", None);
        status["connected"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Waits until every agent in `names` is connected.
    pub fn wait_connected(&self, names: &[&str]) {
        wait_for(
            &format!("agents {names:?} connected"),
            BOUND,
            || format!("connected: {:?}; log:\n{}", self.connected(), self.log()),
            || {
                let connected = self.connected();
                names
                    .iter()
                    .all(|n| connected.iter().any(|c| c == n))
                    .then_some(())
            },
        );
    }

    /// Polls a job until `done` says so; returns the job's detail.
    pub fn wait_job(&self, job: u64, limit: Duration, done: impl Fn(&Value) -> bool) -> Value {
        wait_for(
            &format!("job {job} getting there"),
            limit,
            || format!("{}; log:\n{}", self.job(job), self.log()),
            || Some(self.job(job)).filter(|detail| done(detail)),
        )
    }

    /// The manager's agent port.
    pub fn agent_addr(&self) -> SocketAddr {
        self.info.agent_addr.parse().unwrap()
    }

    /// The manager's public key, which agents pin.
    pub fn key(&self) -> PublicKey {
        let bytes: [u8; 32] = hex::decode(&self.info.manager_key)
            .unwrap()
            .try_into()
            .unwrap();
        PublicKey(bytes)
    }

    /// The URL of `path` on the manager's HTTP server.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.info.http_addr)
    }

    /// An API request with the admin token; returns status and JSON body.
    pub fn api(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        self.api_with(method, path, body, Some(&self.info.admin_token))
    }

    /// An API request (`GET`, else `POST` with `body`) with bearer `token`; returns status
    /// and JSON body (a string if the body is not JSON).
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

    /// Enrols agent `id` with public key `key` over the API.
    pub fn enrol(&self, id: &str, key: &PublicKey) {
        let (status, body) = self.api(
            "POST",
            "/api/v1/agents",
            Some(json!({ "id": id, "key": hex::encode(key.0) })),
        );
        assert!(status == 201 || status == 200, "enrol: {status} {body}");
    }

    /// A fresh one-time enrolment token.
    pub fn enrolment_token(&self) -> String {
        let (status, token) = self.api("POST", "/api/v1/enrolment-tokens", None);
        assert_eq!(status, 201, "{token}");
        token["token"].as_str().expect("a token").to_string()
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

/// The log of the manager that ran in `dir`.
pub fn log_of(dir: &Path) -> String {
    read_text(&dir.join("serve.log"))
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
