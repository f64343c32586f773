//! The Linux agent's steps past delivery: install, health check, rollback, restart.
//!
//! Every shell command the agent runs (`--install`, `--health`, `--rollback` and the older
//! `--on-complete`) goes through [`run_hook`]: `sh -c CMD` in its own process group, killed
//! with the group after `--command-timeout`, its stdout and stderr kept only as their last
//! [`MAX_INSTALL_OUTPUT`] bytes (valid UTF-8, lossily).
//!
//! [`install`] runs once a job's content is complete and verified (and exported): it
//! reports `installing`, runs the install command, then either
//!
//! - exit 0: `installed`, then the health check until it passes (`running`) or its
//!   deadline passes (rollback);
//! - the restart exit code (75 unless configured): `installed`, the pending version is
//!   recorded in the data directory ([`PENDING_FILE`]) and the agent restarts (re-executes
//!   itself, or waits for the host); after the restart [`resume_pending`] runs the health
//!   check and reports `running` or rolls back;
//! - anything else: the rollback command if there is one (`rolled back` when it exits 0,
//!   else `failed`), or `failed`.
//!
//! What runs is kept per content name ([`RUNNING_FILE`]) and told to the manager right
//! after the first report of every session (`Running`). The updates go to the driver's central task, which sends
//! them on the manager session (or after the next `Welcome` if it is down).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use baton_protocol::JobRef;
use baton_protocol::message::{InstallState, MAX_INSTALL_OUTPUT};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;

/// Seconds a command may run unless `--command-timeout` says otherwise.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(600);
/// How long the health check may keep failing unless `--health-deadline` says otherwise.
pub const DEFAULT_HEALTH_DEADLINE: Duration = Duration::from_secs(60);
/// Time between health check attempts unless `--health-interval` says otherwise.
pub const DEFAULT_HEALTH_INTERVAL: Duration = Duration::from_secs(2);
/// The install exit code meaning "installed, restart pending" unless configured otherwise
/// (`EX_TEMPFAIL`).
pub const DEFAULT_RESTART_EXIT_CODE: i32 = 75;
/// The data directory's record of an install waiting for the agent's restart.
pub const PENDING_FILE: &str = "install-pending.json";
/// The data directory's record of the version running per content name.
pub const RUNNING_FILE: &str = "running.json";
/// Content names [`RUNNING_FILE`] keeps at most (the newest by install).
pub const MAX_RUNNING_NAMES: usize = baton_protocol::message::MAX_RUNNING;

/// How the agent installs content (`--install` and the flags around it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstallSettings {
    /// The install command.
    pub install: String,
    /// The health check command, if any.
    pub health: Option<String>,
    /// The rollback command, if any.
    pub rollback: Option<String>,
    /// How long the health check may keep failing.
    pub health_deadline: Duration,
    /// Time between health check attempts.
    pub health_interval: Duration,
    /// How long any one command may run before it is killed.
    pub command_timeout: Duration,
    /// The install exit code that means "restart pending".
    pub restart_exit_code: i32,
    /// Re-execute the agent itself on a restart-pending install.
    pub reexec: bool,
}

/// What one command did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HookResult {
    /// Its exit code; `None` if it was killed (time limit, signal) or did not start.
    pub exit_code: Option<i32>,
    /// The end of its output (stdout and stderr as they came), at most
    /// [`MAX_INSTALL_OUTPUT`] bytes, or why it did not start or was killed.
    pub tail: String,
}

impl HookResult {
    /// Whether it exited 0.
    pub fn ok(&self) -> bool {
        self.exit_code == Some(0)
    }
}

/// The last bytes of a command's output, at most `cap`.
#[derive(Debug)]
struct Tail {
    buf: std::collections::VecDeque<u8>,
    cap: usize,
}

impl Tail {
    fn new(cap: usize) -> Self {
        Tail {
            buf: std::collections::VecDeque::with_capacity(cap),
            cap,
        }
    }

    fn push(&mut self, bytes: &[u8]) {
        let bytes = &bytes[bytes.len().saturating_sub(self.cap)..];
        let over = (self.buf.len() + bytes.len()).saturating_sub(self.cap);
        self.buf.drain(..over);
        self.buf.extend(bytes);
    }

    /// Valid UTF-8 (invalid bytes replaced), at most `cap` bytes: the start is cut at a
    /// character boundary if replacements made it longer.
    fn text(&self) -> String {
        let bytes: Vec<u8> = self.buf.iter().copied().collect();
        let text = String::from_utf8_lossy(&bytes).into_owned();
        last_bytes(&text, self.cap).to_string()
    }
}

/// The end of `text`, at most `max` bytes, starting at a character boundary.
pub fn last_bytes(text: &str, max: usize) -> &str {
    let mut start = text.len().saturating_sub(max);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

/// Runs `sh -c cmd` with `env` added, in its own process group; kills the group after
/// `timeout`. Output beyond the last [`MAX_INSTALL_OUTPUT`] bytes is dropped as it comes.
pub async fn run_hook(cmd: &str, env: &[(&str, String)], timeout: Duration) -> HookResult {
    let mut command = tokio::process::Command::new("sh");
    command
        .arg("-c")
        .arg(cmd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    for (k, v) in env {
        command.env(k, v);
    }
    let mut child = match command.spawn() {
        Ok(c) => c,
        Err(e) => {
            return HookResult {
                exit_code: None,
                tail: format!("cannot start `sh -c`: {e}"),
            };
        }
    };
    let mut out = child.stdout.take().expect("piped");
    let mut err = child.stderr.take().expect("piped");
    let mut tail = Tail::new(MAX_INSTALL_OUTPUT);
    let pgid = child.id();
    let run = async {
        let (mut a, mut b) = ([0u8; 4096], [0u8; 4096]);
        let (mut out_open, mut err_open) = (true, true);
        // Bounded by the pipes: each read either returns bytes or ends the pipe.
        while out_open || err_open {
            tokio::select! {
                r = out.read(&mut a), if out_open => match r {
                    Ok(0) | Err(_) => out_open = false,
                    Ok(n) => tail.push(&a[..n]),
                },
                r = err.read(&mut b), if err_open => match r {
                    Ok(0) | Err(_) => err_open = false,
                    Ok(n) => tail.push(&b[..n]),
                },
            }
        }
        child.wait().await
    };
    let status = tokio::time::timeout(timeout, run).await;
    match status {
        Ok(Ok(status)) => HookResult {
            exit_code: status.code(),
            tail: tail.text(),
        },
        Ok(Err(e)) => HookResult {
            exit_code: None,
            tail: format!("{}\nwaiting for the command failed: {e}", tail.text()),
        },
        Err(_) => {
            if let Some(pid) = pgid.and_then(|p| rustix::process::Pid::from_raw(p as i32)) {
                let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
            }
            let note = format!(
                "\n[killed after {} s: --command-timeout]",
                timeout.as_secs()
            );
            let text = tail.text() + &note;
            HookResult {
                exit_code: None,
                tail: last_bytes(&text, MAX_INSTALL_OUTPUT).to_string(),
            }
        }
    }
}

/// A change of an install's state, for the driver to send to the manager.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstallUpdate {
    /// The job whose content it is.
    pub job: JobRef,
    /// The content's name.
    pub name: String,
    /// The content's version.
    pub version: u64,
    /// The new state.
    pub state: InstallState,
    /// The deciding command's exit code.
    pub exit_code: Option<i32>,
    /// The end of its output.
    pub output: String,
    /// The agent is to re-execute itself once this is sent (a restart-pending install).
    pub reexec: bool,
}

/// What an install is about: the job, the content and where it was exported.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstallTarget {
    /// The job's id.
    pub job: u64,
    /// The job's epoch, as the manager sent it.
    pub epoch: u32,
    /// The content name.
    pub name: String,
    /// The content version.
    pub version: u64,
    /// The exported content.
    pub path: PathBuf,
    /// In [`PENDING_FILE`]: its rollback command had started (it may have restarted the
    /// host); after a restart this install is reported rolled back, never running.
    #[serde(default)]
    pub rolling_back: bool,
}

impl InstallTarget {
    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("BATON_CONTENT_PATH", self.path.display().to_string()),
            ("BATON_CONTENT_NAME", self.name.clone()),
            ("BATON_CONTENT_VERSION", self.version.to_string()),
            ("BATON_JOB", self.job.to_string()),
        ]
    }

    fn update(&self, state: InstallState, result: Option<&HookResult>) -> InstallUpdate {
        InstallUpdate {
            job: JobRef {
                id: self.job,
                epoch: self.epoch,
            },
            name: self.name.clone(),
            version: self.version,
            state,
            exit_code: result.and_then(|r| r.exit_code),
            output: result.map(|r| r.tail.clone()).unwrap_or_default(),
            reexec: false,
        }
    }
}

/// Held for the whole of an install or a resumed pending install: one at a time, so two
/// jobs' commands never overlap and the records of [`PENDING_FILE`] and [`RUNNING_FILE`]
/// are read and written by one at a time.
static ONE_INSTALL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Installs `target` as `settings` say, sending each state to `updates` (after any install
/// under way has ended).
pub async fn install(
    settings: &InstallSettings,
    data_dir: &Path,
    target: InstallTarget,
    updates: &mpsc::Sender<InstallUpdate>,
) {
    let _one = ONE_INSTALL.lock().await;
    let send = |u: InstallUpdate| async move {
        let _ = updates.send(u).await;
    };
    send(target.update(InstallState::Installing, None)).await;
    let env = target.env();
    let result = run_hook(&settings.install, &env, settings.command_timeout).await;
    match result.exit_code {
        Some(0) => {
            tracing::info!(name = %target.name, version = target.version, "installed");
            send(target.update(InstallState::Installed, Some(&result))).await;
            check_health(settings, data_dir, &target, updates, None).await;
        }
        Some(code) if code == settings.restart_exit_code => {
            tracing::info!(name = %target.name, version = target.version, "installed; restart pending");
            if let Err(e) = write_json(&data_dir.join(PENDING_FILE), &target) {
                let mut failed = result.clone();
                failed.tail = format!("{}\ncannot record the pending install: {e}", failed.tail);
                send(target.update(InstallState::Failed, Some(&failed))).await;
                return;
            }
            let mut update = target.update(InstallState::Installed, Some(&result));
            update.reexec = settings.reexec;
            send(update).await;
        }
        _ => {
            tracing::warn!(name = %target.name, version = target.version, code = ?result.exit_code, "install failed");
            roll_back(settings, &target, result, updates, None).await;
        }
    }
}

/// After a restart: the install recorded as pending, if any, is checked and reported.
pub async fn resume_pending(
    settings: &InstallSettings,
    data_dir: &Path,
    updates: &mpsc::Sender<InstallUpdate>,
) {
    let _one = ONE_INSTALL.lock().await;
    let path = data_dir.join(PENDING_FILE);
    let target: InstallTarget = match std::fs::read(&path) {
        Ok(bytes) => match serde_json::from_slice(&bytes) {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(path = %path.display(), "pending install record unreadable, dropped: {e}");
                let _ = std::fs::remove_file(&path);
                return;
            }
        },
        Err(_) => return,
    };
    if target.rolling_back {
        // The rollback command restarted the host (as a RAUC-style one may): what runs now
        // is the old version, whatever a health check would say.
        tracing::warn!(name = %target.name, version = target.version, job = target.job, "back from a restart during a rollback: reported rolled back");
        let result = HookResult {
            exit_code: None,
            tail: "the host restarted during the rollback command".into(),
        };
        let _ = updates
            .send(target.update(InstallState::RolledBack, Some(&result)))
            .await;
        let _ = std::fs::remove_file(&path);
        return;
    }
    tracing::info!(name = %target.name, version = target.version, job = target.job, "back from a restart with an install pending");
    check_health(settings, data_dir, &target, updates, Some(&path)).await;
    let _ = std::fs::remove_file(&path);
}

/// Runs the health check until it passes or its deadline passes; reports running (and
/// records the version), or rolls back (`pending`: the install's [`PENDING_FILE`], marked
/// before the rollback command runs).
async fn check_health(
    settings: &InstallSettings,
    data_dir: &Path,
    target: &InstallTarget,
    updates: &mpsc::Sender<InstallUpdate>,
    pending: Option<&Path>,
) {
    let mut last = None;
    if let Some(health) = &settings.health {
        let env = target.env();
        let deadline = tokio::time::Instant::now() + settings.health_deadline;
        // Bounded by the deadline (each attempt by the command timeout).
        loop {
            let r = run_hook(health, &env, settings.command_timeout).await;
            if r.ok() {
                last = Some(r);
                break;
            }
            if tokio::time::Instant::now() + settings.health_interval > deadline {
                tracing::warn!(name = %target.name, version = target.version, code = ?r.exit_code, "health check failed until its deadline");
                roll_back(settings, target, r, updates, pending).await;
                return;
            }
            tokio::time::sleep(settings.health_interval).await;
        }
    }
    if let Err(e) = record_running(data_dir, &target.name, target.version) {
        tracing::error!("cannot record the running version: {e}");
    }
    tracing::info!(name = %target.name, version = target.version, "running");
    let _ = updates
        .send(target.update(InstallState::Running, last.as_ref()))
        .await;
}

/// The install or its health check failed with `failure`: rolls back if a rollback command
/// is configured, and reports the outcome. A pending install's record (`pending`) is marked
/// rolling back first: a rollback command that restarts the host does not leave it saying
/// the new version is pending.
async fn roll_back(
    settings: &InstallSettings,
    target: &InstallTarget,
    failure: HookResult,
    updates: &mpsc::Sender<InstallUpdate>,
    pending: Option<&Path>,
) {
    let update = match &settings.rollback {
        None => target.update(InstallState::Failed, Some(&failure)),
        Some(rollback) => {
            if let Some(path) = pending {
                let marked = InstallTarget {
                    rolling_back: true,
                    ..target.clone()
                };
                if let Err(e) = write_json(path, &marked) {
                    // Removed instead: after a restart nothing is reported running.
                    tracing::error!(path = %path.display(), "cannot mark the pending install as rolling back: {e}");
                    let _ = std::fs::remove_file(path);
                }
            }
            let r = run_hook(rollback, &target.env(), settings.command_timeout).await;
            if r.ok() {
                tracing::info!(name = %target.name, version = target.version, "rolled back");
                target.update(InstallState::RolledBack, Some(&r))
            } else {
                tracing::error!(name = %target.name, version = target.version, code = ?r.exit_code, "rollback failed");
                target.update(InstallState::Failed, Some(&r))
            }
        }
    };
    let _ = updates.send(update).await;
}

/// The versions recorded as running, per content name.
pub fn running_versions(data_dir: &Path) -> BTreeMap<String, u64> {
    std::fs::read(data_dir.join(RUNNING_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice::<Vec<(String, u64)>>(&b).ok())
        .map(|list| list.into_iter().collect())
        .unwrap_or_default()
}

/// Records `version` of `name` as running (newest first; at most [`MAX_RUNNING_NAMES`]).
fn record_running(data_dir: &Path, name: &str, version: u64) -> std::io::Result<()> {
    let path = data_dir.join(RUNNING_FILE);
    let mut list: Vec<(String, u64)> = std::fs::read(&path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    list.retain(|(n, _)| n != name);
    list.insert(0, (name.to_string(), version));
    list.truncate(MAX_RUNNING_NAMES);
    write_json(&path, &list)
}

/// Replaces `path` with `value` as JSON: owner-only, synced, renamed into place.
fn write_json<T: Serialize>(path: &Path, value: &T) -> std::io::Result<()> {
    let bytes = serde_json::to_vec(value).map_err(std::io::Error::other)?;
    super::store::write_atomic(path, &bytes)
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn the_tail_keeps_the_last_bytes_as_valid_utf8() {
        let mut t = Tail::new(8);
        t.push(b"0123456789");
        t.push(b"ab");
        assert_eq!(t.text(), "456789ab");
        // An invalid byte becomes U+FFFD (3 bytes): the text is cut to stay within the cap.
        let mut t = Tail::new(8);
        t.push(b"abcdefg\xff");
        let text = t.text();
        assert!(text.len() <= 8 && text.ends_with('\u{FFFD}'), "{text:?}");
        assert_eq!(last_bytes("héllo", 4), "llo");
    }

    #[tokio::test]
    async fn a_rollback_that_restarts_the_host_is_reported_rolled_back_after_the_restart() {
        let dir = tempfile::tempdir().unwrap();
        let mut settings = InstallSettings {
            install: "true".into(),
            health: Some("exit 1".into()),
            // Stands for a rollback that restarts the host: the agent never sees it end.
            rollback: Some("sleep 30".into()),
            health_deadline: Duration::ZERO,
            health_interval: Duration::from_millis(10),
            command_timeout: Duration::from_secs(60),
            restart_exit_code: DEFAULT_RESTART_EXIT_CODE,
            reexec: false,
        };
        let target = InstallTarget {
            job: 5,
            epoch: 1,
            name: "os".into(),
            version: 9,
            path: dir.path().join("os-9"),
            rolling_back: false,
        };
        write_json(&dir.path().join(PENDING_FILE), &target).unwrap();
        let (tx, mut rx) = mpsc::channel(64);
        // The "restart": the agent is stopped once the rollback is under way (recorded in
        // the pending file), however long the health check took to fail on a busy machine.
        let pending = dir.path().join(PENDING_FILE);
        let rolling_back = || {
            std::fs::read(&pending).is_ok_and(|b| {
                serde_json::from_slice::<InstallTarget>(&b).is_ok_and(|t| t.rolling_back)
            })
        };
        let cut = tokio::time::timeout(Duration::from_secs(20), async {
            tokio::select! {
                _ = resume_pending(&settings, dir.path(), &tx) => false,
                _ = async {
                    while !rolling_back() {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    // The rollback command has started, or is about to.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                } => true,
            }
        })
        .await;
        assert_eq!(cut, Ok(true), "the rollback was still running");
        // After the restart the new version's health check would pass: it is not running.
        settings.health = Some("true".into());
        resume_pending(&settings, dir.path(), &tx).await;
        drop(tx);
        let mut states = Vec::new();
        while let Some(u) = rx.recv().await {
            states.push(u.state);
        }
        assert_eq!(states, [InstallState::RolledBack]);
        assert!(running_versions(dir.path()).is_empty());
        assert!(!dir.path().join(PENDING_FILE).exists());
    }

    #[tokio::test]
    async fn installs_run_one_at_a_time_and_their_records_are_private() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display();
        // An install that notes when another runs beside it.
        let settings = InstallSettings {
            install: format!(
                "if [ -e {d}/busy ]; then touch {d}/overlap; fi; touch {d}/busy; sleep 0.3; rm {d}/busy"
            ),
            health: None,
            rollback: None,
            health_deadline: Duration::from_secs(5),
            health_interval: Duration::from_millis(100),
            command_timeout: Duration::from_secs(20),
            restart_exit_code: DEFAULT_RESTART_EXIT_CODE,
            reexec: false,
        };
        let (tx, mut rx) = mpsc::channel(64);
        let target = |job: u64, name: &str| InstallTarget {
            job,
            epoch: 1,
            name: name.into(),
            version: job,
            path: dir.path().join(name),
            rolling_back: false,
        };
        let started = std::time::Instant::now();
        tokio::join!(
            install(&settings, dir.path(), target(1, "a"), &tx),
            install(&settings, dir.path(), target(2, "b"), &tx),
            install(&settings, dir.path(), target(3, "c"), &tx),
        );
        assert!(started.elapsed() < Duration::from_secs(15));
        assert!(
            !dir.path().join("overlap").exists(),
            "two installs ran at once"
        );
        let running = running_versions(dir.path());
        assert_eq!(running.len(), 3, "no record lost: {running:?}");
        let mode = std::fs::metadata(dir.path().join(RUNNING_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "{mode:o}");
        drop(tx);
        let mut n = 0;
        while rx.recv().await.is_some() {
            n += 1;
        }
        assert_eq!(n, 9, "installing, installed, running for each");
    }

    #[tokio::test]
    async fn a_hook_reports_its_exit_code_and_output_tail_and_is_killed_at_its_time_limit() {
        let r = run_hook(
            "head -c 5000 /dev/zero | tr '\\0' x; echo; echo \"$GREETING\" >&2; exit 3",
            &[("GREETING", "bye".into())],
            Duration::from_secs(20),
        )
        .await;
        assert_eq!(r.exit_code, Some(3));
        assert!(r.tail.len() <= MAX_INSTALL_OUTPUT);
        // Both streams are kept; which of two pipes is read first is the scheduler's choice,
        // so stdout's last newline may come after stderr's line.
        let tail_end = &r.tail[r.tail.len() - 20..];
        assert!(
            tail_end.ends_with("bye\n") || tail_end.ends_with("bye\n\n"),
            "{tail_end:?}"
        );
        assert!(r.tail.contains("xxxxxxxxxx"), "{tail_end:?}");
        let started = std::time::Instant::now();
        let r = run_hook("echo started; sleep 30", &[], Duration::from_millis(300)).await;
        assert!(started.elapsed() < Duration::from_secs(5), "killed in time");
        assert_eq!(r.exit_code, None);
        assert!(
            r.tail.starts_with("started") && r.tail.contains("killed after"),
            "{}",
            r.tail
        );
    }
}
