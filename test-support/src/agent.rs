//! `baton agent` as a child process on loopback, for a [`Manager`].

use std::path::{Path, PathBuf};
use std::process::Stdio;

use serde_json::Value;

use crate::manager::{BOUND, Manager, tied_command};
use crate::process::Proc;
use crate::wait::{read_text, wait_for};

/// A `baton agent` child process (its own process group), killed when dropped.
#[derive(Debug)]
pub struct AgentProc {
    /// Its directory: `agent.log`, the data directory `data`, the export `out`.
    pub dir: PathBuf,
    /// Its agent id.
    pub name: String,
    proc: Proc,
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

    /// Starts agent `name` under `root/name`, enrolling with a fresh one-time token. Agents
    /// pin the root of the manager's [`crate::TrustKit`] (`--root-key`) unless `extra` gives one.
    pub fn spawn(m: &Manager, root: &Path, name: &str, extra: &[&str]) -> Self {
        Self::spawn_custom(m, root, name, &m.agent_addr().to_string(), true, extra)
    }

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
        Self::spawn_with_env(m, root, name, manager, enrol, extra, &[])
    }

    /// [`Self::spawn_custom`] with these environment variables set for the agent.
    pub fn spawn_with_env(
        m: &Manager,
        root: &Path,
        name: &str,
        manager: &str,
        enrol: bool,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        Self::spawn_exe(m, &m.exe, root, name, manager, enrol, extra, env)
    }

    /// [`Self::spawn_with_env`] started as `exe` (e.g. a launcher of `baton` that a
    /// self-update replaces) rather than the manager's executable.
    #[allow(clippy::too_many_arguments)]
    pub fn spawn_exe(
        m: &Manager,
        exe: &Path,
        root: &Path,
        name: &str,
        manager: &str,
        enrol: bool,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("agent.log");
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let mut cmd = tied_command(exe);
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
            cmd.args(["--token", &m.enrolment_token()]);
        }
        // Agents pin the fleet's root key, unless the test gives its own.
        if let Some(kit) = &m.kit
            && !extra.contains(&"--root-key")
        {
            cmd.args(["--root-key", &kit.root_hex()]);
        }
        cmd.args(extra)
            .envs(env.iter().copied())
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(out);
        AgentProc {
            proc: Proc::spawn_with(&format!("baton agent {name}"), cmd, Some(&log)),
            dir,
            name: name.to_string(),
        }
    }

    /// The agent's process id (for `/proc/PID/…`).
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Waits until the agent exported content equal to `expected`.
    pub fn wait_export(&self, expected: &[u8]) {
        let got = wait_for(
            &format!("{} exporting the content", self.name),
            BOUND,
            || format!("log:\n{}", self.log()),
            || {
                std::fs::read(self.dir.join("out"))
                    .ok()
                    .filter(|got| got.len() == expected.len())
            },
        );
        assert!(got == expected, "{} exported other bytes", self.name);
    }

    /// Kills the process with SIGKILL (no chance to clean up) and reaps it.
    pub fn kill(&mut self) {
        self.proc.kill_group();
    }

    /// The agent's log so far.
    pub fn log(&self) -> String {
        read_text(&self.dir.join("agent.log"))
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
