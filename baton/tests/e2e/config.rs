//! `baton serve --config FILE` as a real process: its settings come from the file, and
//! SIGHUP re-reads it — serial ports and the log filter change at once while an agent's
//! session goes on, other changes are named as waiting for a restart, and a file that
//! no longer parses leaves the running settings in place.

use std::time::Duration;

use crate::common::*;
use baton_test_support::{AgentProc, Manager, wait_for};

/// Sends SIGHUP to `pid`.
fn hang_up(pid: u32) {
    let status = std::process::Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -HUP {pid}");
}

/// Waits (at most 10 s) until the manager's log holds `text` after its first `from` bytes.
fn wait_logged(m: &Manager, from: usize, text: &str) {
    wait_for(
        &format!("manager log line {text:?}"),
        Duration::from_secs(10),
        || m.log()[from..].to_string(),
        || m.log()[from..].contains(text).then_some(()),
    );
}

#[test]
fn sighup_reloads_serial_ports_and_logging_without_dropping_sessions() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("manager.toml");
    let tty = dir.path().join("no-such-tty");
    // The test helper sets RUST_LOG=debug; the file's `log` wins over it.
    std::fs::write(&config, "log = \"warn\"\nmax-election-score = 40\n").unwrap();
    let m = Manager::start_args(
        BATON,
        &["--config", config.to_str().unwrap(), "--give-up", "5"],
    );
    let agent = AgentProc::spawn(&m, dir.path(), "edge-1", &[]);
    m.wait_connected(&["edge-1"]);
    assert!(
        !m.log().contains("manager ready"),
        "log = \"warn\" hides info lines:\n{}",
        m.log()
    );

    // Logging to info, a serial port added, and a setting that waits for a restart.
    let from = m.log().len();
    std::fs::write(
        &config,
        format!(
            "log = \"info\"\nmax-election-score = 41\nserial = [{:?}]\n",
            tty.to_str().unwrap()
        ),
    )
    .unwrap();
    hang_up(m.pid());
    wait_logged(&m, from, "SIGHUP: configuration reloaded");
    wait_logged(
        &m,
        from,
        "take effect at the next restart: max-election-score",
    );
    wait_logged(&m, from, "cannot open serial port");
    assert!(m.log()[from..].contains(tty.to_str().unwrap()));

    // The serial port removed again: its task ends, logged at info (still on).
    let from = m.log().len();
    std::fs::write(&config, "log = \"info\"\nmax-election-score = 41\n").unwrap();
    hang_up(m.pid());
    wait_logged(&m, from, "serial port closed (no longer configured)");

    // A file that no longer parses: refused, named, the manager runs on.
    let from = m.log().len();
    std::fs::write(&config, "log = \"info\"\nlistn = \"x\"\n").unwrap();
    hang_up(m.pid());
    wait_logged(&m, from, "configuration not reloaded");
    assert!(m.log()[from..].contains("listn"), "{}", &m.log()[from..]);

    // Through all three reloads the agent kept its one session.
    assert_eq!(m.connected(), ["edge-1"]);
    let sessions = agent.log().matches("welcomed by the manager").count();
    assert_eq!(sessions, 1, "the agent reconnected:\n{}", agent.log());
    assert!(!m.log().contains("agent disconnected"), "{}", m.log());
}
