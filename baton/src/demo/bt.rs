//! `baton lab --baseline bt`: the same job by a BitTorrent swarm, to compare against.
//!
//! On the lab Baton has just used — the same namespaces, shaped and delayed links and
//! file — an `opentracker` and an `aria2c` seed run in the manager's namespace (behind
//! its shaped uplink) and one `aria2c` leecher in each agent's namespace. The seed starts
//! first and checks its copy; then every leecher starts at once, and each goes on seeding
//! until the run ends. Nobody is told a rate: like blind Baton, the swarm learns its
//! links by using them. A leecher is done when aria2c runs its download-complete hook
//! (polled every 50 ms, as Baton's confirmations are); its copy is checked against the
//! source's SHA-256. DHT and local peer discovery are off (the tracker is the only way in);
//! peer exchange and every other aria2c setting keep their defaults, 256 KiB pieces as
//! `mktorrent` makes them.
//!
//! The tools are Debian packages installed by a bench set-up (`scripts/bench-setup-bt.sh`:
//! `aria2`, `opentracker`, `mktorrent`), not dependencies of Baton. Debian's opentracker
//! serves only the info hashes of its whitelist, so the torrent's is written to one. The
//! leechers start once a scrape of the tracker counts the seed. opentracker cannot be
//! tied to this process as aria2c is (`--stop-with-process`): if the lab is SIGKILLed it
//! stays until killed by hand.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use baton::lab::Lab;

use super::{INTERRUPTED, sha256_file};

/// The tracker's TCP and UDP port in the manager's namespace.
const TRACKER_PORT: u16 = 6969;
/// How long the seed may take to check its copy and start seeding.
const SEED_START: Duration = Duration::from_secs(60);
/// How often completion is looked for.
const POLL: Duration = Duration::from_millis(50);
/// The programs the swarm needs.
const TOOLS: [&str; 3] = ["aria2c", "opentracker", "mktorrent"];

/// What the swarm did.
#[derive(Debug)]
pub struct SwarmRun {
    /// Per agent: seconds from the leechers' start to its download-complete hook.
    pub completion: Vec<Option<f64>>,
    /// Leechers whose copy matched the source's SHA-256.
    pub confirmed: usize,
    /// CPU seconds (user + system) the seed, the tracker and every leecher used.
    pub cpu_seconds: f64,
}

/// The swarm's processes; killed when dropped.
struct Swarm(Vec<Child>);

impl Drop for Swarm {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Swarm {
    /// CPU seconds the processes used so far (each `ip netns exec` became its program),
    /// by `cpu_of` (a pid's CPU seconds).
    fn cpu_seconds(&self, cpu_of: impl Fn(&str) -> Option<f64>) -> f64 {
        self.0
            .iter()
            .filter_map(|c| cpu_of(&c.id().to_string()))
            .sum()
    }
}

/// Fails with what to install when a tool is missing.
fn require_tools() -> anyhow::Result<()> {
    let missing: Vec<&str> = TOOLS
        .into_iter()
        .filter(|tool| {
            !Command::new("sh")
                .args(["-c", &format!("command -v {tool} >/dev/null")])
                .status()
                .is_ok_and(|s| s.success())
        })
        .collect();
    if !missing.is_empty() {
        bail!(
            "--baseline bt needs {} (Debian packages aria2, opentracker, mktorrent): run scripts/bench-setup-bt.sh",
            missing.join(", ")
        );
    }
    Ok(())
}

/// Runs `program` (in namespace `ns`) to completion; fails with its stderr.
fn run_tool(mut cmd: Command, what: &str) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("cannot run {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Starts `cmd` with its output in `log`.
fn spawn_logged(mut cmd: Command, log: &Path, what: &str) -> anyhow::Result<Child> {
    let out =
        std::fs::File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
    let err = out.try_clone()?;
    cmd.stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .with_context(|| format!("cannot start {what}"))
}

/// The aria2c settings every peer shares: the tracker the only way to find peers, no
/// preallocation, no console output, seeding until stopped, gone with this process.
fn aria2c(ns: &str, dir: &Path, port: u16) -> Command {
    let mut cmd = Lab::command(ns, "aria2c");
    cmd.args([
        "--enable-dht=false",
        "--enable-dht6=false",
        "--bt-enable-lpd=false",
        "--disable-ipv6=true",
        "--file-allocation=none",
        "--summary-interval=0",
        "--console-log-level=warn",
        "--seed-ratio=0.0",
        "--auto-file-renaming=false",
        "--allow-overwrite=true",
        // No configuration file of the user's, and every piece on disk when it completes
        // (the copies are checked after the peers are killed).
        "--no-conf=true",
        "--disk-cache=0",
        &format!("--stop-with-process={}", std::process::id()),
        &format!("--listen-port={port}"),
    ])
    .arg(format!("--dir={}", dir.display()));
    cmd
}

/// The info hash's 20 bytes percent-encoded, as a tracker's query takes them.
fn url_encoded_hash(hex_hash: &str) -> anyhow::Result<String> {
    let bytes = hex::decode(hex_hash).context("aria2c printed an info hash that is not hex")?;
    if bytes.len() != 20 {
        bail!("info hash {hex_hash:?} is not 20 bytes");
    }
    Ok(bytes.iter().map(|b| format!("%{b:02X}")).collect())
}

/// How many complete peers (seeds) the tracker at `addr` counts for the torrent of
/// `path_and_query` (a scrape); 0 when it cannot be asked.
fn seeds_counted(addr: &str, path_and_query: &str) -> u64 {
    use std::io::{Read as _, Write as _};
    let Ok(mut conn) = std::net::TcpStream::connect(addr) else {
        return 0;
    };
    let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
    let request = format!("GET {path_and_query} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    if conn.write_all(request.as_bytes()).is_err() {
        return 0;
    }
    let mut answer = Vec::new();
    let _ = conn.take(64 * 1024).read_to_end(&mut answer);
    // The bencoded answer holds `8:completei<N>e`.
    let text = String::from_utf8_lossy(&answer);
    text.split_once("8:completei")
        .and_then(|(_, rest)| rest.split_once('e'))
        .and_then(|(n, _)| n.parse().ok())
        .unwrap_or(0)
}

/// Runs the swarm on `lab` for `content` (whose SHA-256 is `source_sha`), in `dir`; gives
/// up after `timeout`; `cpu_of` reads a process's CPU seconds by its pid.
pub fn run_swarm(
    lab: &Lab,
    content: &Path,
    source_sha: &[u8; 32],
    dir: &Path,
    timeout: Duration,
    cpu_of: impl Fn(&str) -> Option<f64>,
) -> anyhow::Result<SwarmRun> {
    require_tools()?;
    let bt = dir.join("bt");
    let seed_dir = bt.join("seed");
    std::fs::create_dir_all(&seed_dir)?;
    let name = "content.bin";
    let seeded = seed_dir.join(name);
    if std::fs::hard_link(content, &seeded).is_err() {
        std::fs::copy(content, &seeded).context("cannot copy the content for the seed")?;
    }
    let manager_ip = lab.manager.ip;
    let torrent = bt.join("content.torrent");
    let mut mk = Command::new("mktorrent");
    mk.arg(format!(
        "--announce=http://{manager_ip}:{TRACKER_PORT}/announce"
    ))
    .arg(format!("--output={}", torrent.display()))
    .arg(&seeded);
    run_tool(mk, "mktorrent")?;
    let mut show = Command::new("aria2c");
    show.arg("--show-files").arg(&torrent);
    let info_hash = run_tool(show, "aria2c --show-files")?
        .lines()
        .find_map(|l| {
            l.strip_prefix("Info Hash: ")
                .map(str::trim)
                .map(String::from)
        })
        .context("aria2c --show-files printed no info hash")?;
    let whitelist = bt.join("whitelist");
    std::fs::write(&whitelist, format!("{info_hash}\n"))?;
    // opentracker reads it as the user nobody.
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&bt, std::fs::Permissions::from_mode(0o755))?;
    std::fs::set_permissions(&whitelist, std::fs::Permissions::from_mode(0o644))?;
    let hook = bt.join("done.sh");
    std::fs::write(&hook, "#!/bin/sh\n: > \"$BATON_BT_DONE\"\n")?;
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755))?;

    let mut swarm = Swarm(Vec::new());
    let mut tracker = Lab::command(&lab.manager.ns, "opentracker");
    tracker
        .args(["-i", &manager_ip.to_string()])
        .args([
            "-p",
            &TRACKER_PORT.to_string(),
            "-P",
            &TRACKER_PORT.to_string(),
        ])
        .arg("-w")
        .arg(&whitelist);
    swarm.0.push(spawn_logged(
        tracker,
        &bt.join("tracker.log"),
        "opentracker",
    )?);
    let seed_log = bt.join("seed.log");
    let mut seed = aria2c(&lab.manager.ns, &seed_dir, 6881);
    seed.arg("--check-integrity=true")
        .arg(format!("--log={}", seed_log.display()))
        .arg("--log-level=notice")
        .arg(&torrent);
    swarm
        .0
        .push(spawn_logged(seed, &bt.join("seed.out"), "the aria2c seed")?);
    // The seed is in the swarm once the tracker counts it complete (this process runs in
    // the manager's namespace, see `DemoProcesses::start_in_lab`).
    let started = Instant::now();
    let scrape = format!("/scrape?info_hash={}", url_encoded_hash(&info_hash)?);
    loop {
        if INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst) {
            bail!("interrupted");
        }
        for (k, what) in [(0, "opentracker"), (1, "the aria2c seed")] {
            if let Some(status) = swarm.0[k].try_wait()? {
                bail!("{what} exited ({status}); see the logs in {}", bt.display());
            }
        }
        if seeds_counted(&format!("{manager_ip}:{TRACKER_PORT}"), &scrape) >= 1 {
            break;
        }
        if started.elapsed() > SEED_START {
            bail!(
                "the tracker did not count the seed within {SEED_START:?} (see {} and {})",
                seed_log.display(),
                bt.join("tracker.log").display()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }

    let leechers: Vec<(PathBuf, PathBuf)> = (0..lab.agents.len())
        .map(|i| {
            let d = bt.join(format!("agent-{i:02}"));
            (d.join(name), d.join("done"))
        })
        .collect();
    let start = Instant::now();
    for (node, (file, done)) in lab.agents.iter().zip(&leechers) {
        let leecher_dir = file.parent().unwrap_or(&bt);
        std::fs::create_dir_all(leecher_dir)?;
        let mut cmd = aria2c(&node.ns, leecher_dir, 6881);
        cmd.env("BATON_BT_DONE", done)
            .arg(format!("--on-bt-download-complete={}", hook.display()))
            .arg(&torrent);
        swarm.0.push(spawn_logged(
            cmd,
            &leecher_dir.join("aria2c.out"),
            "an aria2c leecher",
        )?);
    }
    let mut completion: Vec<Option<f64>> = vec![None; leechers.len()];
    while completion.iter().any(Option::is_none) {
        if INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst) {
            bail!("interrupted");
        }
        if start.elapsed() > timeout {
            let left = completion.iter().filter(|c| c.is_none()).count();
            bail!("the swarm left {left} agents without the file after {timeout:?}");
        }
        let now = start.elapsed().as_secs_f64();
        for (slot, (_, done)) in completion.iter_mut().zip(&leechers) {
            if slot.is_none() && done.exists() {
                *slot = Some(now);
            }
        }
        for (i, child) in swarm.0.iter_mut().enumerate() {
            if let Some(status) = child.try_wait()? {
                bail!(
                    "a swarm process (#{i}) exited ({status}); see the logs in {}",
                    bt.display()
                );
            }
        }
        std::thread::sleep(POLL);
    }
    let cpu_seconds = swarm.cpu_seconds(cpu_of);
    drop(swarm);
    let mut confirmed = 0;
    for (file, _) in &leechers {
        if sha256_file(file)? == *source_sha {
            confirmed += 1;
        }
    }
    Ok(SwarmRun {
        completion,
        confirmed,
        cpu_seconds,
    })
}
