//! The states past delivery with real processes: `baton agent --install/--health/--rollback`
//! reports installing → installed → running, failed (exit code and output tail) or rolled
//! back; the job completes when every participant is running, failed or rolled back; a
//! restart-pending install is reported running after the agent's restart; and the agent
//! updates itself through Baton (the install puts a new launcher in place, the agent
//! re-executes it, and the new process reports its version running).

use std::path::Path;
use std::time::Duration;

use baton_test_support::manager::participant;
use baton_test_support::{AgentProc, Manager, wait_for};
use serde_json::{Value, json};

use crate::common::{BATON, ok};

/// Each scenario's bound (agents start, fetch a small file, run shell commands).
const LIMIT: Duration = Duration::from_secs(40);
/// Chunk size of the test files (small, so several chunks).
const CHUNK: u64 = 4096;

/// A small content file under the system's temporary directory (a content directory).
fn content(dir: &Path, name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

fn install_of<'a>(job: &'a Value, agent: &str) -> &'a Value {
    &participant(job, agent)["install"]
}

/// The versions `agent` runs, as `GET /api/v1/agents/{id}` shows them: `name vN`.
fn running(m: &Manager, agent: &str) -> Vec<String> {
    let (status, a) = m.api("GET", &format!("/api/v1/agents/{agent}"), None);
    assert_eq!(status, 200, "{a}");
    a["running"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| format!("{} v{}", r["name"].as_str().unwrap_or("?"), r["version"]))
        .collect()
}

#[test]
fn installs_end_running_failed_or_rolled_back_and_the_job_completes() {
    let m = Manager::start(BATON);
    let root = tempfile::tempdir().unwrap();
    let files = tempfile::tempdir_in(std::env::temp_dir()).unwrap();
    let file = content(
        files.path(),
        "app.bin",
        &baton_test_support::pseudo_random(40_000, 5),
    );
    let ok_install = r#"cp "$BATON_CONTENT_PATH" "$BATON_CONTENT_PATH.installed" && echo "installed $BATON_CONTENT_NAME v$BATON_CONTENT_VERSION of job $BATON_JOB""#;
    let _agents = [
        AgentProc::spawn(
            &m,
            root.path(),
            "i-ok",
            &[
                "--install",
                ok_install,
                "--health",
                r#"test -f "$BATON_CONTENT_PATH.installed""#,
            ],
        ),
        AgentProc::spawn(
            &m,
            root.path(),
            "i-bad",
            &[
                "--install",
                "echo preparing; sleep 0.2; echo 'no space left on device' >&2; exit 4",
            ],
        ),
        AgentProc::spawn(
            &m,
            root.path(),
            "i-sick",
            &[
                "--install",
                "true",
                "--health",
                "echo unhealthy; exit 1",
                "--health-deadline",
                "1",
                "--health-interval",
                "1",
                "--rollback",
                "echo 'restored the previous version'",
            ],
        ),
        AgentProc::spawn(&m, root.path(), "plain", &[]),
    ];
    let names = ["i-ok", "i-bad", "i-sick", "plain"];
    m.wait_connected(&names);
    let job = m.create_job(
        &file,
        &names,
        json!({ "name": "app", "version": 3, "chunk_size": CHUNK }),
    );
    let detail = m.wait_job(job, LIMIT, |j| j["state"] == "finished");
    // Every participant confirmed (content held and verified), then went its own way.
    for name in names {
        assert_eq!(participant(&detail, name)["state"], "confirmed", "{detail}");
    }
    let ok_ = install_of(&detail, "i-ok");
    assert_eq!(ok_["state"], "running", "{detail}");
    let bad = install_of(&detail, "i-bad");
    assert_eq!(bad["state"], "failed", "{detail}");
    assert_eq!(bad["exit_code"], 4);
    let tail = bad["output"].as_str().unwrap();
    assert!(
        tail.contains("preparing") && tail.contains("no space left on device"),
        "{tail}"
    );
    let sick = install_of(&detail, "i-sick");
    assert_eq!(sick["state"], "rolled_back", "{detail}");
    assert_eq!(sick["exit_code"], 0);
    assert!(
        sick["output"]
            .as_str()
            .unwrap()
            .contains("restored the previous version"),
        "the rollback's output tail: {detail}"
    );
    // Content only: running as soon as it confirmed.
    assert_eq!(install_of(&detail, "plain")["state"], "running");
    assert_eq!(
        detail["install_counts"],
        json!({ "running": 2, "failed": 1, "rolled_back": 1 })
    );
    // The install command saw the content and its environment.
    let exported = root.path().join("i-ok/out.installed");
    assert_eq!(
        std::fs::read(&exported).unwrap(),
        std::fs::read(&file).unwrap()
    );
    assert_eq!(running(&m, "i-ok"), ["app v3"]);
    assert_eq!(running(&m, "plain"), ["app v3"]);
    assert!(running(&m, "i-bad").is_empty() && running(&m, "i-sick").is_empty());

    let shown = ok(&m, &["job", &job.to_string()]);
    for needle in [
        "installs: 1 failed, 1 rolled back, 2 running",
        "failed (exit 4)",
        "rolled back (exit 0)",
        "no space left on device",
        "restored the previous version",
    ] {
        assert!(
            shown.contains(needle),
            "`baton job` lacks {needle:?}:\n{shown}"
        );
    }
    let agents = ok(&m, &["agents"]);
    let line = agents.lines().find(|l| l.starts_with("i-ok")).unwrap();
    assert!(
        line.contains("app v3"),
        "`baton agents` shows the running version: {agents}"
    );

    let metrics = ureq::get(m.url("/metrics"))
        .header("Authorization", &format!("Bearer {}", m.info.admin_token))
        .call()
        .unwrap()
        .into_body()
        .read_to_string()
        .unwrap();
    for line in [
        "baton_participant_installs{state=\"running\"} 2",
        "baton_participant_installs{state=\"failed\"} 1",
        "baton_participant_installs{state=\"rolled_back\"} 1",
        "baton_participant_installs{state=\"pending\"} 0",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "{line} missing:\n{metrics}"
        );
    }
}

#[test]
fn a_restart_pending_install_is_reported_running_after_the_restart() {
    let m = Manager::start(BATON);
    let root = tempfile::tempdir().unwrap();
    let files = tempfile::tempdir_in(std::env::temp_dir()).unwrap();
    let file = content(
        files.path(),
        "os.img",
        &baton_test_support::pseudo_random(20_000, 9),
    );
    let flags = [
        "--install",
        r#"echo "staged $BATON_CONTENT_NAME v$BATON_CONTENT_VERSION for the next boot"; exit 75"#,
        "--health",
        "true",
    ];
    let mut agent = AgentProc::spawn(&m, root.path(), "r1", &flags);
    let _other = AgentProc::spawn(&m, root.path(), "r2", &[]);
    m.wait_connected(&["r1", "r2"]);
    let job = m.create_job(
        &file,
        &["r1", "r2"],
        json!({ "name": "os", "version": 7, "chunk_size": CHUNK }),
    );
    let detail = m.wait_job(job, LIMIT, |j| install_of(j, "r1")["state"] == "installed");
    assert_eq!(
        detail["state"], "running",
        "not complete while r1 restarts: {detail}"
    );
    assert!(
        install_of(&detail, "r1")["output"]
            .as_str()
            .unwrap()
            .contains("staged os v7 for the next boot")
    );
    let pending = root.path().join("r1/data/install-pending.json");
    assert!(pending.exists(), "the pending version is recorded");
    // The restart: the host stops the agent and starts it again.
    agent.kill();
    let _agent = AgentProc::spawn_enrolled(&m, root.path(), "r1", &flags);
    let detail = m.wait_job(job, LIMIT, |j| j["state"] == "finished");
    assert_eq!(install_of(&detail, "r1")["state"], "running", "{detail}");
    assert_eq!(install_of(&detail, "r2")["state"], "running");
    assert!(!pending.exists(), "the pending record is done with");
    assert_eq!(running(&m, "r1"), ["os v7"]);
}

#[test]
fn the_agent_updates_itself_through_baton_and_reports_the_new_version_running() {
    let m = Manager::start(BATON);
    let root = tempfile::tempdir().unwrap();
    // The agent runs from a launcher of the `baton` binary that names its version; the new
    // agent is the same launcher naming version 2 (a copy of the 200 MB debug binary would
    // only make the test slow).
    let bin = root.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let launcher =
        |version: u64| format!("#!/bin/sh\nBATON_AGENT_VERSION={version} exec {BATON} \"$@\"\n");
    let exe = bin.join("baton-agent");
    std::fs::write(&exe, launcher(1)).unwrap();
    set_executable(&exe);
    let files = tempfile::tempdir_in(std::env::temp_dir()).unwrap();
    let new_agent = content(files.path(), "baton-agent-2", launcher(2).as_bytes());
    let exe_text = exe.to_str().unwrap();
    let install = format!(
        r#"cp "$BATON_CONTENT_PATH" "{exe_text}.new" && chmod 755 "{exe_text}.new" && mv "{exe_text}.new" "{exe_text}" && echo "agent v$BATON_CONTENT_VERSION in place" && exit 75"#
    );
    let health = format!(r#"grep -q "BATON_AGENT_VERSION=$BATON_CONTENT_VERSION " "{exe_text}""#);
    let agent = AgentProc::spawn_exe(
        &m,
        &exe,
        root.path(),
        "self",
        &m.agent_addr().to_string(),
        true,
        &[
            "--install",
            &install,
            "--health",
            &health,
            "--reexec-on-restart",
            "--agent-exe",
            exe_text,
        ],
        &[],
    );
    m.wait_connected(&["self"]);
    wait_for(
        "the agent reporting its own version",
        LIMIT,
        || m.log(),
        || (running(&m, "self") == ["baton-agent v1"]).then_some(()),
    );
    let pid = agent.pid();
    let job = m.create_job(
        &new_agent,
        &["self"],
        json!({ "name": "baton-agent", "version": 2 }),
    );
    let detail = m.wait_job(job, LIMIT, |j| j["state"] == "finished");
    let install = install_of(&detail, "self");
    assert_eq!(install["state"], "running", "{detail}");
    assert_eq!(running(&m, "self"), ["baton-agent v2"]);
    // The same process (no supervisor) now runs the new launcher's agent.
    let environ = std::fs::read(format!("/proc/{pid}/environ")).expect("the agent still runs");
    assert!(
        environ
            .split(|&b| b == 0)
            .any(|v| v == b"BATON_AGENT_VERSION=2"),
        "process {pid} runs the new agent"
    );
    assert!(
        agent.log().contains("re-executing the agent"),
        "{}",
        agent.log()
    );
}

fn set_executable(path: &Path) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}
