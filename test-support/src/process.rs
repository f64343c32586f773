//! Child processes that cannot outlive their test.
//!
//! Every child is the leader of a process group of its own, so that whatever it starts
//! (QEMU's log decoder, Chromium under chromedriver, the agents of `baton demo`) is
//! signalled with it. [`Proc`] stops its group when dropped, also while a failed test
//! unwinds; [`run`] bounds a command that should finish by itself.

use std::fs::{File, OpenOptions};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal};

use crate::wait::{read_text, tail};

/// How long [`run`] lets an overdue command unwind after SIGTERM before SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(10);

/// A child process leading its own process group; the group is killed when this is dropped.
#[derive(Debug)]
pub struct Proc {
    /// What it is, for messages.
    pub label: String,
    /// The file its output goes to, if it has one.
    pub log: Option<PathBuf>,
    child: Child,
}

impl Proc {
    /// Starts `cmd` as a group leader: stdin closed, stdout and stderr appended to `log`.
    pub fn spawn(label: &str, mut cmd: Command, log: &Path) -> Proc {
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap_or_else(|e| panic!("log file {}: {e}", log.display()));
        let err = out.try_clone().expect("log file");
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        Self::spawn_with(label, cmd, Some(log))
    }

    /// Starts `cmd` as a group leader with the standard streams the caller set; `log` is the
    /// file the caller sent its output to, if any.
    pub fn spawn_with(label: &str, mut cmd: Command, log: Option<&Path>) -> Proc {
        cmd.process_group(0);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {label} ({cmd:?}): {e}"));
        Proc {
            label: label.to_string(),
            log: log.map(Path::to_path_buf),
            child,
        }
    }

    /// Its pid, which is also its process group id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The child, for its piped standard streams.
    pub fn child(&mut self) -> &mut Child {
        &mut self.child
    }

    /// Its exit status if it has exited (the group's other members may still run).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("wait for a child")
    }

    /// Whether it is still running.
    pub fn running(&mut self) -> bool {
        self.exited().is_none()
    }

    /// Its log so far (empty without one).
    pub fn log(&self) -> String {
        self.log.as_deref().map(read_text).unwrap_or_default()
    }

    /// Panics with its log's last lines if it has exited: `while` says what the test was
    /// doing meanwhile.
    pub fn assert_running(&mut self, while_: &str) {
        if let Some(status) = self.exited() {
            panic!(
                "{} exited ({status}) while {while_}; its log:\n{}",
                self.label,
                tail(&self.log(), 40)
            );
        }
    }

    /// SIGTERM to the group, so the leader can unwind (a `demo` removes its namespaces);
    /// SIGKILL to the group if the leader has not exited after `grace`. Returns whether it
    /// exited within the grace period.
    pub fn stop(&mut self, grace: Duration) -> bool {
        signal_group(self.pid(), Signal::TERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if self.exited().is_some() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        self.kill_group();
        false
    }

    /// SIGKILL to the leader only (a power cut for QEMU), then waits up to 5 s until the
    /// rest of its group (a log decoder) has drained its output and exited.
    pub fn kill_leader(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let deadline = Instant::now() + Duration::from_secs(5);
        while group_alive(self.pid()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// SIGKILL to the whole group (no chance to clean up), then reaps the leader.
    pub fn kill_group(&mut self) {
        signal_group(self.pid(), Signal::KILL);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill_group();
    }
}

/// Sends `signal` to process group `pgid`; false if there is no such group.
fn signal_group(pgid: u32, signal: Signal) -> bool {
    group(pgid).is_some_and(|g| rustix::process::kill_process_group(g, signal).is_ok())
}

/// Whether process group `pgid` still has a member.
fn group_alive(pgid: u32) -> bool {
    group(pgid).is_some_and(|g| rustix::process::test_kill_process_group(g).is_ok())
}

/// The group of a child we started: never 0 or 1 (`kill(-1)` would reach every process).
fn group(pgid: u32) -> Option<Pid> {
    i32::try_from(pgid)
        .ok()
        .filter(|&p| p > 1)
        .and_then(Pid::from_raw)
}

/// What a command that ran to completion printed.
#[derive(Debug)]
pub struct Output {
    /// Whether it exited with status 0.
    pub success: bool,
    /// Its exit code (`None` when a signal ended it).
    pub code: Option<i32>,
    /// Its process id (namespaces a `baton demo` creates carry it).
    pub pid: u32,
    /// Its standard output.
    pub stdout: String,
    /// Its standard error.
    pub stderr: String,
}

/// Runs `cmd` to completion within `limit`, as a group leader with stdin closed; past the
/// limit its group is stopped ([`Proc::stop`], [`STOP_GRACE`]) and the test fails.
pub fn run(mut cmd: Command, limit: Duration) -> Output {
    let dir = tempfile::tempdir().expect("temporary directory");
    let (out, err) = (dir.path().join("out"), dir.path().join("err"));
    cmd.stdin(Stdio::null())
        .stdout(File::create(&out).expect("output file"))
        .stderr(File::create(&err).expect("output file"));
    let what = format!("{cmd:?}");
    let mut proc = Proc::spawn_with(&what, cmd, Some(&err));
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = proc.exited() {
            break status;
        }
        if Instant::now() > deadline {
            proc.stop(STOP_GRACE);
            panic!(
                "{what} did not finish within {limit:?}; stderr:\n{}",
                read_text(&err)
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Output {
        success: status.success(),
        code: status.code(),
        pid: proc.pid(),
        stdout: read_text(&out),
        stderr: read_text(&err),
    }
}

#[cfg(test)]
mod test {
    use super::*;

    fn sh(script: &str) -> Command {
        let mut c = Command::new("sh");
        c.args(["-c", script]);
        c
    }

    #[test]
    fn run_captures_output_and_status() {
        let out = run(
            sh("echo out; echo err >&2; exit 3"),
            Duration::from_secs(10),
        );
        assert_eq!(
            (
                out.success,
                out.code,
                out.stdout.as_str(),
                out.stderr.as_str()
            ),
            (false, Some(3), "out\n", "err\n")
        );
    }

    #[test]
    #[should_panic(expected = "did not finish within")]
    fn run_stops_an_overdue_command() {
        run(sh("sleep 30"), Duration::from_millis(100));
    }

    #[test]
    fn dropping_kills_the_whole_group() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        // The shell starts a grandchild in its group and reports its pid.
        let p = Proc::spawn("sh", sh("sleep 30 & echo $!; wait"), &log);
        let pgid = p.pid();
        let grandchild: u32 = crate::wait_for(
            "the grandchild's pid",
            Duration::from_secs(5),
            || read_text(&log),
            || read_text(&log).trim().parse().ok(),
        );
        assert!(Path::new(&format!("/proc/{grandchild}")).exists());
        drop(p);
        crate::wait_for(
            "the group gone",
            Duration::from_secs(5),
            String::new,
            || (!group_alive(pgid)).then_some(()),
        );
    }

    #[test]
    fn stop_lets_the_leader_unwind_first() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let mut p = Proc::spawn(
            "sh",
            sh("trap 'echo unwound; exit 0' TERM; echo ready; while :; do sleep 0.01; done"),
            &log,
        );
        crate::wait_for("ready", Duration::from_secs(5), String::new, || {
            p.log().contains("ready").then_some(())
        });
        assert!(p.stop(Duration::from_secs(5)));
        assert!(p.log().contains("unwound"), "{}", p.log());
        assert!(!p.running());
    }
}
