//! `baton serve --config FILE` as a real process: its settings come from the file, and
//! SIGHUP re-reads it — serial ports, the log filter and the agent port caps change at once while an agent's
//! session goes on, so do the HTTP caps and the upload cap; other changes are named as
//! waiting for a restart, and a file that
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

/// Whether the manager closed `conn` at once (read gives end of file within `within`),
/// rather than holding it open waiting for a handshake.
fn closed_at_once(conn: &mut std::net::TcpStream, within: std::time::Duration) -> bool {
    use std::io::Read as _;
    conn.set_read_timeout(Some(within)).unwrap();
    let mut byte = [0u8; 1];
    match conn.read(&mut byte) {
        Ok(0) => true,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        Ok(_) => false,
    }
}

#[test]
fn sighup_applies_the_agent_port_caps_to_the_next_connections() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("manager.toml");
    std::fs::write(&config, "max-handshakes-per-address = 8\n").unwrap();
    let m = Manager::start_args(
        BATON,
        &["--config", config.to_str().unwrap(), "--give-up", "5"],
    );
    let agent = AgentProc::spawn(&m, dir.path(), "edge-1", &[]);
    m.wait_connected(&["edge-1"]);
    let quick = std::time::Duration::from_millis(300);

    // Before: two idle connections from one address are both held for their handshake.
    let mut first = std::net::TcpStream::connect(m.agent_addr()).unwrap();
    let mut second = std::net::TcpStream::connect(m.agent_addr()).unwrap();
    assert!(
        !closed_at_once(&mut first, quick),
        "the cap of 8 closed the first"
    );
    assert!(
        !closed_at_once(&mut second, quick),
        "the cap of 8 closed the second"
    );
    drop((first, second));

    // Reloaded to one handshake per address: the next second connection is closed at once.
    let from = m.log().len();
    std::fs::write(&config, "max-handshakes-per-address = 1\n").unwrap();
    hang_up(m.pid());
    wait_logged(&m, from, "agent port caps reloaded");
    assert!(
        !m.log()[from..].contains("take effect at the next restart"),
        "the cap waited for a restart:\n{}",
        &m.log()[from..]
    );
    // The closed pair's handshake places are given back when the manager sees them end.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let (mut held, mut refused) = loop {
        let mut held = std::net::TcpStream::connect(m.agent_addr()).unwrap();
        let mut extra = std::net::TcpStream::connect(m.agent_addr()).unwrap();
        if !closed_at_once(&mut held, quick) {
            break (held, extra);
        }
        let _ = closed_at_once(&mut extra, quick);
        assert!(
            std::time::Instant::now() < deadline,
            "no handshake place came free:\n{}",
            m.log()
        );
    };
    assert!(
        closed_at_once(&mut refused, std::time::Duration::from_secs(2)),
        "a second idle connection from one address was not refused after the reload"
    );
    assert!(!closed_at_once(&mut held, quick), "the first was dropped");

    // The agent kept its one session through the reload.
    assert_eq!(m.connected(), ["edge-1"]);
    let sessions = agent.log().matches("welcomed by the manager").count();
    assert_eq!(sessions, 1, "the agent reconnected:\n{}", agent.log());
}

/// Sends a keep-alive request on `conn` and reads the start of its answer within `within`.
fn served_and_kept(mut conn: &std::net::TcpStream, within: Duration) -> bool {
    use std::io::{Read as _, Write as _};
    conn.set_read_timeout(Some(within)).unwrap();
    if conn
        .write_all(b"GET /api/v1/openapi.json HTTP/1.1\r\nHost: x\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut head = [0u8; 12];
    conn.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.1 200")
}

#[test]
fn sighup_applies_the_http_caps_and_the_upload_cap() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("manager.toml");
    std::fs::write(&config, "max-http-connections-per-address = 8\n").unwrap();
    let m = Manager::start_args(
        BATON,
        &["--config", config.to_str().unwrap(), "--give-up", "5"],
    );
    let agent = AgentProc::spawn(&m, dir.path(), "edge-1", &[]);
    m.wait_connected(&["edge-1"]);
    let (_, status) = m.api("GET", "/api/v1/status", None);
    assert_eq!(status["up_bps"], 0, "{status}");
    let http: std::net::SocketAddr = status["http_addr"].as_str().unwrap().parse().unwrap();
    // Idle connections from an address of their own, so the API calls keep theirs.
    let connect = || {
        let socket =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        socket
            .bind(&std::net::SocketAddr::from(([127, 0, 9, 1], 0)).into())
            .unwrap();
        socket.connect(&http.into()).unwrap();
        std::net::TcpStream::from(socket)
    };
    let held: Vec<_> = (0..3).map(|_| connect()).collect();
    for conn in &held {
        assert!(
            served_and_kept(conn, Duration::from_secs(5)),
            "the cap of 8 refused one of 3"
        );
    }
    drop(held);

    // Reloaded: two HTTP connections per address, and an upload cap of 512 KiB/s.
    let from = m.log().len();
    std::fs::write(
        &config,
        "max-http-connections-per-address = 2\nup-bps = \"512KiB\"\n",
    )
    .unwrap();
    hang_up(m.pid());
    wait_logged(&m, from, "HTTP caps reloaded");
    wait_logged(&m, from, "manager upload cap reloaded");
    assert!(
        !m.log()[from..].contains("take effect at the next restart"),
        "a cap waited for a restart:\n{}",
        &m.log()[from..]
    );
    // The dropped three give their places back when the manager sees them end; two are
    // then served (a keep-alive request answered, the connection kept), a third refused.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let (kept, mut third) = loop {
        let kept = vec![connect(), connect()];
        if kept
            .iter()
            .all(|c| served_and_kept(c, Duration::from_secs(5)))
        {
            break (kept, connect());
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no two HTTP places came free:\n{}",
            m.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        closed_at_once(&mut third, Duration::from_secs(5)),
        "a third connection from one address was not refused after the reload"
    );
    drop(kept);

    // The upload cap: shown by the API and pacing the next transfer (1 MiB from the
    // manager, the only source, at 512 KiB/s: at least 2 s less the 20 ms burst).
    let (_, status) = m.api("GET", "/api/v1/status", None);
    assert_eq!(status["up_bps"], 512 * 1024, "{status}");
    let file = dir.path().join("one-mib.bin");
    std::fs::write(&file, vec![7u8; 1 << 20]).unwrap();
    let started = std::time::Instant::now();
    let job = m.create_job(&file, &["edge-1"], serde_json::json!({ "name": "paced" }));
    m.wait_job(job, Duration::from_secs(30), |j| j["state"] == "finished");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1_800),
        "1 MiB at 512 KiB/s took only {took:?}"
    );
    assert_eq!(m.connected(), ["edge-1"], "{}", agent.log());
}
