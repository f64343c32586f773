//! Relay benchmark, with real processes: one relay hop's throughput on loopback without
//! caps, and the Linux agent's peak memory while relaying 1 GiB.
//!
//! A `baton serve` and three `baton agent`s (A, B, C) run as child processes of the
//! `baton` executable on loopback, no rate caps, 32 KiB chunks, content of 1 GiB:
//!
//! 1. **Relay**: a job for A and B whose policy makes B a leaf (`leaf_only`), so A is
//!    the only agent that serves: the plan has one stripe, A fetches it from the
//!    manager and B fetches all of it from A, cut-through (the manager sends one copy
//!    by plan, `manager_max_copies = 1`). B's throughput is that of the two-hop pipeline
//!    manager → A → B; A's peak resident set (`VmHWM` in `/proc/PID/status`) is the
//!    agent's memory while relaying 1 GiB.
//! 2. **One hop**: a second job for the same content, for A (which holds it all and
//!    confirms at once) and the fresh agent C (a leaf): C fetches everything from A,
//!    so C's throughput is one relay hop, agent → agent, alone. A's peak is reset first
//!    (`/proc/PID/clear_refs`), so its second figure is the memory of serving 1 GiB.
//!
//! Every agent's bytes per source are checked in the manager's API, so a figure is
//! never printed for a transfer that did not take the path it names.
//!
//! `cargo bench -p baton --bench relay_hop`; `RELAY_HOP_MIB=N` changes the
//! size. Without `--bench` (e.g. `cargo test --benches`) it runs once with 8 MiB as a
//! smoke test.

use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use baton_test_support::manager::{bytes_from, participant};
use baton_test_support::{Manager, Proc, read_text, wait_for};
use serde_json::{Value, json};

/// The `baton` executable under test.
const BATON: &str = env!("CARGO_BIN_EXE_baton");

/// The longest any one phase may take before the bench gives up.
const PHASE_LIMIT: Duration = Duration::from_secs(120);
const CHUNK: u64 = 32 * 1024;
const MIB: f64 = 1024.0 * 1024.0;

/// A `baton agent` child: dies with the bench (`--die-with-parent`), its group killed when
/// dropped.
struct Agent {
    proc: Proc,
    name: String,
    dir: std::path::PathBuf,
}

impl Agent {
    fn spawn(m: &Manager, root: &Path, name: &str) -> Self {
        let token = m.enrolment_token();
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("agent.log");
        let mut cmd = Command::new(BATON);
        cmd.args(["agent", "--die-with-parent"])
            .args(["--manager", &m.agent_addr().to_string()])
            .args(["--manager-key", &m.info.manager_key])
            .args([
                "--root-key",
                &m.kit.as_ref().expect("the fleet's keys").root_hex(),
            ])
            .args(["--id", name, "--listen", "127.0.0.1:0"])
            .args(["--token", &token])
            .arg("--data-dir")
            .arg(dir.join("data"))
            .arg("--status-file")
            .arg(dir.join("status.json"))
            .env("RUST_LOG", "warn")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        Agent {
            proc: Proc::spawn_with(name, cmd, Some(&log)),
            name: name.into(),
            dir,
        }
    }

    /// A field of `/proc/PID/status` in KiB (`VmHWM`, `VmRSS`).
    fn proc_kib(&self, field: &str) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.proc.pid())).ok()?;
        status
            .lines()
            .find(|l| l.starts_with(field))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    }

    /// Resets the peak resident set (`VmHWM`) to the current one; false if not possible.
    fn reset_peak(&self) -> bool {
        std::fs::write(format!("/proc/{}/clear_refs", self.proc.pid()), "5").is_ok()
    }

    fn log(&self) -> String {
        read_text(&self.dir.join("agent.log"))
    }
}

/// Writes `len` pseudo-random bytes to `path` (fast: 8 bytes per step).
fn write_content(path: &Path, len: u64) {
    let mut f = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path).unwrap());
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut buf = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        for word in buf.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            word.copy_from_slice(&x.to_le_bytes());
        }
        let n = left.min(buf.len() as u64) as usize;
        f.write_all(&buf[..n]).unwrap();
        left -= n as u64;
    }
    f.flush().unwrap();
}

fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// Creates a job for `agents` with `leaf` as a leaf; returns its id and when it was created.
fn start_job(m: &Manager, file: &Path, agents: &[&str], leaf: &str) -> (u64, Instant) {
    let job = m.create_job(
        file,
        agents,
        json!({ "chunk_size": CHUNK, "policy": { "leaf_only": [leaf] } }),
    );
    (job, Instant::now())
}

/// Waits until `agent` has confirmed `job`; returns the seconds since `t0` and the job.
fn wait_confirmed(m: &Manager, job: u64, agent: &Agent, t0: Instant) -> (f64, Value) {
    let secs = wait_for(
        &format!("{} confirms job {job}", agent.name),
        PHASE_LIMIT,
        || format!("{}\n{}", m.log(), agent.log()),
        || {
            let j = m.job(job);
            (participant(&j, &agent.name)["state"] == "confirmed")
                .then(|| t0.elapsed().as_secs_f64())
        },
    );
    let done = wait_for(
        &format!("job {job} finishes"),
        PHASE_LIMIT,
        || m.log(),
        || Some(m.job(job)).filter(|j| j["state"] == "finished"),
    );
    (secs, done)
}

/// Checks that `agent` got every byte from `from` (`None` = the manager) and none elsewhere.
fn check_path(done: &Value, agent: &str, from: Option<&str>, len: u64) {
    let got = bytes_from(done, agent, from);
    let total: u64 = done["source_bytes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["agent"] == agent)
        .map(|s| s["bytes"].as_u64().unwrap())
        .sum();
    assert!(
        got == len && total == len,
        "{agent} should have fetched everything from {}: {done}",
        from.unwrap_or("the manager")
    );
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let mib: u64 = match std::env::var("RELAY_HOP_MIB") {
        Ok(v) => v.parse().expect("RELAY_HOP_MIB is a number of MiB"),
        Err(_) if bench => 1024,
        Err(_) => 8,
    };
    let len = mib << 20;
    let load_before = load();
    let started = Instant::now();

    let m = Manager::start_args(BATON, &["--give-up", "60"]);
    let root = m.dir.clone();
    let file = root.join("content.bin");
    write_content(&file, len);
    let a = Agent::spawn(&m, &root, "a");
    let b = Agent::spawn(&m, &root, "b");
    let c = Agent::spawn(&m, &root, "c");
    m.wait_connected(&["a", "b", "c"]);

    // 1. Relay: manager → A → B, B a leaf.
    let (job, t0) = start_job(&m, &file, &["a", "b"], "b");
    let (relay_secs, done) = wait_confirmed(&m, job, &b, t0);
    check_path(&done, "b", Some("a"), len);
    check_path(&done, "a", None, len);
    let a_relay_kib = a.proc_kib("VmHWM").unwrap_or(0);
    let b_kib = b.proc_kib("VmHWM").unwrap_or(0);

    // 2. One hop: A holds the content; C fetches it all from A.
    let reset = a.reset_peak();
    let (job, t0) = start_job(&m, &file, &["a", "c"], "c");
    let (hop_secs, done) = wait_confirmed(&m, job, &c, t0);
    check_path(&done, "c", Some("a"), len);
    let a_serve_kib = a.proc_kib("VmHWM").unwrap_or(0);
    let c_kib = c.proc_kib("VmHWM").unwrap_or(0);
    let load_after = load();

    let size = len as f64 / MIB;
    let rate = |secs: f64| (len as f64 / secs / 1e6, len as f64 / secs / MIB);
    let (relay_mb, relay_mib) = rate(relay_secs);
    let (hop_mb, hop_mib) = rate(hop_secs);
    println!(
        "relay_hop: {size:.0} MiB content, {} KiB chunks, loopback, no caps; {} CPUs; load average before {load_before}, after {load_after}",
        CHUNK / 1024,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    );
    println!(
        "one relay hop (A holds the content, C fetches all of it from A): {hop_secs:.2} s = {hop_mb:.1} MB/s ({hop_mib:.1} MiB/s)"
    );
    println!(
        "relay pipeline (manager -> A -> B, cut-through): {relay_secs:.2} s = {relay_mb:.1} MB/s ({relay_mib:.1} MiB/s)"
    );
    println!(
        "agent A peak RSS (VmHWM) relaying {size:.0} MiB (fetching from the manager, serving B): {:.1} MiB",
        a_relay_kib as f64 / 1024.0
    );
    if reset {
        println!(
            "agent A peak RSS serving {size:.0} MiB from its store to C: {:.1} MiB",
            a_serve_kib as f64 / 1024.0
        );
    }
    println!(
        "receiving agents' peak RSS: B {:.1} MiB, C {:.1} MiB; whole bench {:.1} s",
        b_kib as f64 / 1024.0,
        c_kib as f64 / 1024.0,
        started.elapsed().as_secs_f64()
    );
}
