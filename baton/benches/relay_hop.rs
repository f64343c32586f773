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
//! 3. **Ceiling**: in this process, on one core, what the session cipher (the Noise
//!    transport's ChaCha20-Poly1305, sealing and opening each 32 KiB chunk frame) plus
//!    SHA-256 of every chunk (the receiver's verification) alone reach; the hop is printed
//!    as a share of it.
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

/// One core's throughput, bytes per second, of sealing, opening and hashing `len` bytes in
/// 32 KiB chunk frames through a real Noise session (the work a relay hop cannot avoid).
fn cipher_and_hash_ceiling(len: u64) -> f64 {
    use baton_protocol::identity::Identity;
    use baton_protocol::session::{Handshake, Hello, Role, TAG_LEN};
    use sha2_std::{Digest as _, Sha256};
    let (a, b) = (Identity::from_seed([1; 32]), Identity::from_seed([2; 32]));
    let id = |s: &str| baton_protocol::types::AgentId::try_from(s).unwrap();
    let all = baton_protocol::caps::ALL;
    let mut i = Handshake::initiator(
        &a,
        [3; 32],
        &b.public(),
        Hello::new(Role::Agent, id("a"), all, None),
    )
    .unwrap();
    let mut r =
        Handshake::responder(&b, [4; 32], Hello::new(Role::Manager, id("m"), all, None)).unwrap();
    let mut msg = vec![0u8; 4096];
    let n = i.write_message(&mut msg).unwrap();
    r.read_message(&msg[..n]).unwrap();
    let n = r.write_message(&mut msg).unwrap();
    i.read_message(&msg[..n]).unwrap();
    let n = i.write_message(&mut msg).unwrap();
    r.read_message(&msg[..n]).unwrap();
    let (mut sender, mut receiver) = (i.finish().unwrap(), r.finish().unwrap());
    let chunk = CHUNK as usize;
    let mut frame = vec![0x5au8; chunk + 64 + TAG_LEN];
    let plain = chunk + 64; // the chunk and its message header, generously
    let mut digest_xor = 0u8;
    let started = Instant::now();
    for _ in 0..len / CHUNK {
        let sealed = sender.encrypt(&mut frame, plain).unwrap();
        let opened = receiver.decrypt(&mut frame, sealed).unwrap();
        digest_xor ^= Sha256::digest(&frame[..opened.min(chunk)])[0];
    }
    std::hint::black_box(digest_xor);
    len as f64 / started.elapsed().as_secs_f64()
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
    // With the processes stopped, so they do not share the core.
    drop((a, b, c));
    let ceiling = cipher_and_hash_ceiling(len.min(256 << 20));

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
        "session cipher (seal + open) + SHA-256 of every chunk alone, one core: {:.1} MB/s; the hop is {:.0} % of it",
        ceiling / 1e6,
        100.0 * len as f64 / hop_secs / ceiling
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
