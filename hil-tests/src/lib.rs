//! Hardware-in-the-loop harness: QEMU firmware devices, Linux agents and the
//! manager on one bridged Ethernet segment in a private network namespace.
//!
//! A [`Lab`] is one test's world: a network namespace of its own (a unique
//! name per test, `btl-<pid>-hil<n>` in the product lab's naming scheme, so
//! tests never see each other's bridge, taps or ports), a
//! bridge `br0` at `10.77.0.1/24` with one tap per QEMU device, and a
//! temporary directory for flash images, logs and the manager's data. Every
//! process it starts (`baton serve`, `baton agent`, QEMU through
//! `agent-firmware/run-qemu.sh`, helpers) leads its own process group inside
//! the namespace; dropping the lab, also while a failed test unwinds, kills
//! those groups and deletes the taps and the namespace. Namespaces left by a
//! test process that was itself killed are removed by the next run, or by the
//! next `baton lab` (they carry the dead process's pid, as the lab's own do).
//! Processes, namespaces and polling come from `baton-test-support`.
//!
//! What the tests need is checked once by [`Env::require`], which fails with
//! a clear message instead of skipping: root (namespaces, taps),
//! `qemu-system-arm`, `ip`, `defmt-print`, and the artefacts that
//! `scripts/build-firmware.sh` builds before `cargo test` runs (the
//! firmware ELF, its A/B build and bootloader, the provisioning tool and
//! `target/release/baton`). The
//! `baton` binary is found next to the test executable (`target/release/`,
//! the same target directory), or at `BATON_BIN`; the firmware ELF is the shipped
//! release build, or `BATON_FIRMWARE` (scripts/test.sh runs the suite again against an
//! opt-level "s" build); a binary or ELF older than
//! any source file its cargo dep-info lists is refused as stale, so a test
//! never runs yesterday's manager. (A test cannot get another package's
//! binary from cargo, and must not run a nested cargo.)
//!
//! Device logs are decoded defmt lines (`12.345 INFO  chunk 7 stored`), one
//! file per boot; [`Device::wait_log`] and the parsers below turn them into
//! facts the tests assert.

#![warn(missing_docs)]

pub mod gdb;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use baton_test_support::netns::Namespace;
pub use baton_test_support::{Output, Proc, read_text, tail, wait_for};
use serde_json::Value;
use sha2_std::{Digest as _, Sha256};

/// The bound on any single wait in these tests.
pub const BOUND: Duration = Duration::from_secs(30);
/// The manager's address on the segment (the bridge's address).
pub const MANAGER_IP: &str = "10.77.0.1";
/// The manager's agent port.
pub const MANAGER_PORT: u16 = 7700;
/// The peer port devices listen on.
pub const DEVICE_PORT: u16 = 7400;
/// Where the firmware's emulated flash (QEMU's PSRAM) is mapped (`agent-firmware/src/board/mps2_an385/psram.rs`).
pub const PSRAM_BASE: u32 = 0x2100_0000;
/// Offset of the content partition in the emulated flash (`agent-firmware/src/board/mps2_an385/psram.rs`).
pub const CONTENT_OFFSET: usize = 0x1_0000;
/// Offset of embassy-boot's STATE partition (A/B build): its magic word, then one progress
/// word per step of a swap (`agent-firmware/src/board/mps2_an385/psram.rs`).
pub const STATE_OFFSET: usize = 0x4000;
/// Erase block of the emulated flash.
pub const ERASE_BLOCK: usize = 4096;

/// Chunk size the devices take (their `max_chunk`).
pub const CHUNK: usize = 4096;

static HIL: Mutex<()> = Mutex::new(());

/// Serialises the HIL tests of a test binary: they share the CPU budget and QEMU.
pub fn one_at_a_time() -> MutexGuard<'static, ()> {
    HIL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Paths to what the tests run, checked once.
#[derive(Debug)]
pub struct Env {
    /// The workspace root.
    pub root: PathBuf,
    /// The manager and Linux agent binary.
    pub baton: PathBuf,
    /// The firmware ELF.
    pub firmware: PathBuf,
    /// The A/B build of the firmware (`--features ab`: linked to run from ACTIVE in the PSRAM).
    pub firmware_ab: PathBuf,
    /// The A/B bootloader (`agent-firmware/bootloader`), QEMU's `-kernel` for an A/B device.
    pub bootloader: PathBuf,
    /// The firmware provisioning tool.
    pub provision: PathBuf,
    /// `agent-firmware/run-qemu.sh`.
    pub run_qemu: PathBuf,
    /// `PATH` for child processes (with `defmt-print`'s directory).
    pub path: OsString,
}

impl Env {
    /// The checked environment; panics with what is missing and how to get it.
    pub fn require() -> &'static Env {
        static ENV: OnceLock<Result<Env, String>> = OnceLock::new();
        match ENV.get_or_init(Env::probe) {
            Ok(env) => env,
            Err(why) => panic!("HIL tests cannot run:\n{why}"),
        }
    }

    fn probe() -> Result<Env, String> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("hil-tests sits in the workspace")
            .to_path_buf();
        let mut problems = Vec::new();
        if effective_uid() != Some(0) {
            problems.push(
                "- not root: the tests create network namespaces, bridges and taps (run them as root)"
                    .to_string(),
            );
        }
        let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).collect())
            .unwrap_or_default();
        // cargo-installed tools (defmt-print) even when ~/.cargo/bin is not on PATH.
        if let Some(home) = std::env::var_os("CARGO_HOME") {
            dirs.push(PathBuf::from(home).join("bin"));
        }
        if let Some(home) = std::env::var_os("HOME") {
            dirs.push(PathBuf::from(home).join(".cargo/bin"));
        }
        let find = |tool: &str| dirs.iter().map(|d| d.join(tool)).find(|p| p.is_file());
        for (tool, how) in [
            ("qemu-system-arm", "apt-get install qemu-system-arm"),
            ("ip", "apt-get install iproute2"),
            ("kill", "apt-get install procps"),
            ("defmt-print", "cargo install defmt-print --locked"),
        ] {
            if find(tool).is_none() {
                problems.push(format!("- {tool} is not installed ({how})"));
            }
        }
        let path = std::env::join_paths(&dirs).unwrap_or_default();
        let build = "run scripts/build-firmware.sh first";
        let fw_dir = root.join("agent-firmware");
        // BATON_FIRMWARE picks another build of the ELF (scripts/test.sh runs the suite
        // against the "z" and the "s" build).
        let firmware = std::env::var_os("BATON_FIRMWARE")
            .map(PathBuf::from)
            .unwrap_or_else(|| fw_dir.join("target/thumbv7m-none-eabi/release/baton-firmware"));
        check_fresh(&firmware, "the firmware ELF", build, &mut problems);
        let firmware_ab = fw_dir.join("target/ab/thumbv7m-none-eabi/release/baton-firmware");
        check_fresh(&firmware_ab, "the A/B firmware ELF", build, &mut problems);
        let bootloader =
            fw_dir.join("target/bootloader/thumbv7m-none-eabi/release/baton-bootloader");
        check_fresh(&bootloader, "the A/B bootloader", build, &mut problems);
        let provision = std::fs::read_dir(fw_dir.join("target/host"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path().join("release/baton-fw-provision"))
            .find(|p| p.is_file())
            .unwrap_or_else(|| fw_dir.join("target/host/<host>/release/baton-fw-provision"));
        check_fresh(&provision, "the provisioning tool", build, &mut problems);
        let baton = match std::env::var_os("BATON_BIN") {
            Some(p) => PathBuf::from(p),
            None => std::env::current_exe()
                .ok()
                .and_then(|exe| Some(exe.parent()?.parent()?.join("baton")))
                .unwrap_or_else(|| root.join("target/release/baton")),
        };
        check_fresh(
            &baton,
            "the baton binary",
            "run scripts/build-firmware.sh (it builds it into the same target directory), or set BATON_BIN",
            &mut problems,
        );
        if !problems.is_empty() {
            return Err(problems.join("\n"));
        }
        Ok(Env {
            run_qemu: fw_dir.join("run-qemu.sh"),
            root,
            baton,
            firmware,
            firmware_ab,
            bootloader,
            provision,
            path,
        })
    }
}

/// The effective user id, from `/proc/self/status`.
fn effective_uid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

/// Checks that `artifact` exists and is newer than every source its cargo
/// dep-info (`<artifact>.d`) lists.
fn check_fresh(artifact: &Path, what: &str, how: &str, problems: &mut Vec<String>) {
    let Ok(built) = std::fs::metadata(artifact).and_then(|m| m.modified()) else {
        problems.push(format!(
            "- {what} is missing at {} ({how})",
            artifact.display()
        ));
        return;
    };
    let dep_info = artifact.with_extension("d");
    let Ok(deps) = std::fs::read_to_string(&dep_info) else {
        return; // no dep-info: nothing to compare with
    };
    if let Some((newest, changed)) = dep_info_sources(&deps)
        .filter_map(|p| Some((std::fs::metadata(&p).ok()?.modified().ok()?, p)))
        .max_by_key(|(t, _)| *t)
        && newest > built
    {
        problems.push(format!(
            "- {what} at {} is older than {} ({how})",
            artifact.display(),
            changed.display()
        ));
    }
}

/// The source paths in a makefile-style dep-info file (`out: a b\ c`).
fn dep_info_sources(text: &str) -> impl Iterator<Item = PathBuf> + '_ {
    text.lines()
        .filter_map(|l| l.split_once(": "))
        .flat_map(|(_, deps)| {
            let mut out = Vec::new();
            let mut cur = String::new();
            let mut chars = deps.chars();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => cur.extend(chars.next()),
                    ' ' => {
                        if !cur.is_empty() {
                            out.push(PathBuf::from(std::mem::take(&mut cur)));
                        }
                    }
                    c => cur.push(c),
                }
            }
            if !cur.is_empty() {
                out.push(PathBuf::from(cur));
            }
            out
        })
}

/// Lowercase hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// `n` random bytes.
pub fn random_bytes(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut v);
    v
}

/// The value after `key=` in a log line (up to the next space).
pub fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let pat = format!("{key}=");
    let at = line.find(&pat)? + pat.len();
    Some(line[at..].split_whitespace().next().unwrap_or(""))
}

/// Indices of the `chunk K stored` lines in a device log, in log order.
pub fn stored_chunks(log: &str) -> Vec<u32> {
    log.lines()
        .filter_map(|l| {
            let rest = l.split("chunk ").nth(1)?;
            let (k, tail) = rest.split_once(' ')?;
            (tail.trim() == "stored").then(|| k.parse().ok())?
        })
        .collect()
}

/// What a device logged when a job completed (SHA-256 recomputed from flash).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Completion {
    /// The job.
    pub job: u64,
    /// SHA-256 of the content read back from flash.
    pub sha256: String,
    /// Content length.
    pub length: u64,
    /// Bytes fetched in this boot.
    pub fetched: u64,
    /// Milliseconds from `Fetch` to the last chunk.
    pub ms: u64,
    /// `fetched` per second.
    pub rate: u64,
}

/// The device's `job J complete ...` line, if it logged one.
pub fn completion(log: &str) -> Option<Completion> {
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains(" complete sha256="))?;
    let num = |k: &str| field(line, k)?.trim_end_matches("B/s").parse::<u64>().ok();
    let job = line.split("job ").nth(1)?.split(' ').next()?.parse().ok()?;
    Some(Completion {
        job,
        sha256: field(line, "sha256")?.to_string(),
        length: num("length")?,
        fetched: num("fetched")?,
        ms: num("ms")?,
        rate: num("rate")?,
    })
}

/// A device's RAM use as it logged it (`footprint: stack_peak=P stack_size=S data=D bss=B
/// stack_boot=.. stack_net=.. stack_node=..`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Footprint {
    /// Deepest stack use since boot (painted high-water mark), bytes.
    pub stack_peak: u64,
    /// The stack region: RAM left after static data, bytes.
    pub stack_size: u64,
    /// Initialised statics, bytes.
    pub data: u64,
    /// Zeroed statics, bytes.
    pub bss: u64,
    /// Deepest stack use of boot, the network task and the node task, bytes.
    pub per_task: [u64; 3],
}

impl Footprint {
    /// Static data plus the deepest stack: what the device needed of its RAM.
    pub fn ram_used(&self) -> u64 {
        self.data + self.bss + self.stack_peak
    }
}

/// The device's last `footprint:` line.
pub fn footprint(log: &str) -> Option<Footprint> {
    let line = log.lines().rev().find(|l| l.contains("footprint: "))?;
    let num = |k: &str| field(line, k)?.parse::<u64>().ok();
    Some(Footprint {
        stack_peak: num("stack_peak")?,
        stack_size: num("stack_size")?,
        data: num("data")?,
        bss: num("bss")?,
        per_task: [num("stack_boot")?, num("stack_net")?, num("stack_node")?],
    })
}

/// Asserts that a device's logged footprint fits its 64 KiB of RAM with the
/// stack inside its region; returns it.
pub fn assert_fits(dev: &Device) -> Footprint {
    let log = dev.log();
    let f = footprint(&log)
        .unwrap_or_else(|| panic!("{} logged no footprint:\n{}", dev.id, tail(&log, 20)));
    assert!(
        f.stack_peak < f.stack_size && f.data + f.bss + f.stack_size <= 64 * 1024,
        "{}: {f:?} does not fit 64 KiB of RAM",
        dev.id
    );
    f
}

/// The manager the lab runs (`baton serve`).
#[derive(Debug, Clone)]
pub struct ManagerInfo {
    /// Its data directory (the CLI finds it through this).
    pub data_dir: PathBuf,
    /// Its Ed25519 public key, hex.
    pub key: String,
    /// The lab's root key (hex), which devices pin: it signed the trust document the
    /// manager was started with (`--trust`), listing the manager's `--publisher-key` for
    /// every name.
    pub root_key: String,
    /// Its log file.
    pub log: PathBuf,
    /// Index of its process in the lab.
    pub proc: usize,
}

/// A firmware device: its flash image and how it is attached.
#[derive(Debug)]
pub struct Device {
    /// Agent id.
    pub id: String,
    /// Ed25519 public key (hex), enrolled at the manager.
    pub key: String,
    /// Its number in the lab (1-based; its tap, MAC and IP derive from it).
    pub n: u8,
    /// IPv4 address on the segment.
    pub ip: String,
    /// The 16 MiB flash image (QEMU's file-backed PSRAM).
    pub flash: PathBuf,
    /// Talks to the manager over UART0 (a pty) instead of TCP.
    pub serial: bool,
    /// For a serial device: the stable path the manager opens (a symlink to the pty).
    pub tty: PathBuf,
    /// Boots so far.
    pub boots: u32,
    /// Where QEMU's gdbstub listens (`run-qemu.sh --gdb`), if the test wants one at boot.
    pub gdb: Option<PathBuf>,
    /// An A/B device: QEMU boots the bootloader, which starts the A/B build from ACTIVE.
    pub ab: bool,
    dir: PathBuf,
    proc: Option<usize>,
}

impl Device {
    /// A TCP device whose flash image the caller provisioned (`n` gives its tap and MAC).
    pub fn detached(id: &str, key: &str, n: u8, flash: &Path, dir: &Path) -> Device {
        Device {
            id: id.to_string(),
            key: key.to_string(),
            n,
            ip: format!("10.77.0.{}", 10 + n as u32),
            flash: flash.to_path_buf(),
            serial: false,
            tty: dir.join(format!("{id}.tty")),
            boots: 0,
            gdb: None,
            ab: false,
            dir: dir.to_path_buf(),
            proc: None,
        }
    }

    /// The decoded log of boot `boot` (1-based).
    pub fn log_path(&self, boot: u32) -> PathBuf {
        self.dir.join(format!("{}.boot{boot}.log", self.id))
    }

    /// The log of the current (last) boot.
    pub fn log(&self) -> String {
        read_text(&self.log_path(self.boots))
    }

    /// Waits until the current boot's log has `n` lines containing `pat` (an A/B device
    /// resets within one QEMU process, so its log repeats lines); returns the `n`th.
    pub fn wait_log_nth(&self, pat: &str, n: usize, limit: Duration) -> String {
        wait_for(
            &format!("{} logging {pat:?} {n} times", self.id),
            limit,
            || format!("{} log:\n{}", self.id, tail(&self.log(), 60)),
            || {
                self.log()
                    .lines()
                    .filter(|l| l.contains(pat))
                    .nth(n - 1)
                    .map(str::to_string)
            },
        )
    }

    /// Lines of the current boot's log containing `pat`.
    pub fn count_log(&self, pat: &str) -> usize {
        self.log().lines().filter(|l| l.contains(pat)).count()
    }

    /// Waits until the current boot's log has a line containing `pat`; returns it.
    pub fn wait_log(&self, pat: &str, limit: Duration) -> String {
        wait_for(
            &format!("{} logging {pat:?}", self.id),
            limit,
            || format!("{} log:\n{}", self.id, tail(&self.log(), 40)),
            || {
                self.log()
                    .lines()
                    .find(|l| l.contains(pat))
                    .map(str::to_string)
            },
        )
    }
}

/// A Linux agent (`baton agent`) on the segment.
#[derive(Debug)]
pub struct LinuxAgent {
    /// Agent id.
    pub id: String,
    /// Where it exports completed content.
    pub export: PathBuf,
    /// Its log.
    pub log: PathBuf,
}

/// One test's network namespace, processes and files (see the crate docs).
pub struct Lab {
    /// What the tests run.
    pub env: &'static Env,
    /// The namespace (unique per test); deleted after the processes, when the lab drops.
    pub ns: Namespace,
    /// Files of this test (flash images, logs, data directories).
    pub dir: PathBuf,
    tmp: Option<tempfile::TempDir>,
    procs: Vec<Option<Proc>>,
}

impl std::fmt::Debug for Lab {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lab")
            .field("ns", &self.ns)
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl Lab {
    /// A namespace with a bridge at `10.77.0.1/24` and `taps` taps on it (`tap1`..).
    pub fn new(test: &str, taps: u8) -> Lab {
        let env = Env::require();
        let tmp = tempfile::Builder::new()
            .prefix(&format!("baton-hil-{test}-"))
            .tempdir()
            .expect("temporary directory");
        // Removes stale namespaces first; from here on, a failure unwinds through `Drop`,
        // which removes what exists.
        let lab = Lab {
            env,
            dir: tmp.path().to_path_buf(),
            tmp: Some(tmp),
            ns: Namespace::create("hil"),
            procs: Vec::new(),
        };
        lab.ip(&["link", "add", "br0", "type", "bridge"]);
        lab.ip(&["addr", "add", &format!("{MANAGER_IP}/24"), "dev", "br0"]);
        lab.ip(&["link", "set", "br0", "up"]);
        for i in 1..=taps {
            let tap = format!("tap{i}");
            lab.ip(&["tuntap", "add", "dev", &tap, "mode", "tap"]);
            lab.ip(&["link", "set", &tap, "master", "br0", "up"]);
        }
        lab
    }

    /// Keeps the files after the test (printed path) instead of deleting them.
    pub fn keep_files(&mut self) {
        if let Some(tmp) = self.tmp.take() {
            let path = tmp.keep();
            eprintln!("HIL files kept in {}", path.display());
        }
    }

    /// Runs `ip -n <ns> args…`, panicking on failure.
    pub fn ip(&self, args: &[&str]) {
        self.ns.ip(args);
    }

    /// A command that runs `program` inside the namespace.
    pub fn command(&self, program: &Path) -> Command {
        let mut c = self.ns.command(program);
        c.env("PATH", &self.env.path);
        c
    }

    /// Starts `cmd` as a process group leader, stdout and stderr into `log`; returns its index.
    pub fn spawn(&mut self, label: &str, cmd: Command, log: &Path) -> usize {
        self.procs.push(Some(Proc::spawn(label, cmd, log)));
        self.procs.len() - 1
    }

    /// Starts `cmd` (stdio as the caller set it) as a process group leader; returns its index.
    pub fn spawn_with(&mut self, label: &str, cmd: Command, log: &Path) -> usize {
        self.procs
            .push(Some(Proc::spawn_with(label, cmd, Some(log))));
        self.procs.len() - 1
    }

    /// The process at `index` (panics if it was removed).
    pub fn proc(&mut self, index: usize) -> &mut Proc {
        self.procs[index].as_mut().expect("process still owned")
    }

    /// Runs `program args…` in the namespace to completion within `limit`.
    pub fn run(&self, program: &Path, args: &[&str], limit: Duration) -> Output {
        let mut cmd = self.command(program);
        cmd.args(args);
        baton_test_support::run(cmd, limit)
    }

    /// Runs `baton args…` in the namespace; panics unless it succeeds; returns its stdout.
    pub fn baton(&self, args: &[&str]) -> String {
        let out = self.run(&self.env.baton, args, BOUND);
        assert!(
            out.success,
            "baton {args:?} failed:\n{}\n{}",
            out.stdout, out.stderr
        );
        out.stdout
    }

    /// Bytes of the buffer the firmware's static cell `symbol` (demangled, e.g.
    /// `baton_firmware::MANAGER_RX`) holds: its size as `nm` reads it from the ELF under
    /// test, less the cell's one-byte "taken" flag.
    pub fn firmware_buffer_size(&self, symbol: &str) -> u64 {
        let out = std::process::Command::new("nm")
            .args(["-S", "-C", "--radix=d"])
            .arg(&self.env.firmware)
            .output()
            .expect("run nm (binutils) on the firmware");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.len() == 4 && f[3] == symbol).then(|| f[1].parse::<u64>().ok())?
            })
            .unwrap_or_else(|| panic!("no symbol {symbol} with a size in the firmware ELF"))
            - 1
    }

    /// The least round-trip time to `ip` on the segment over 20 TCP connection attempts to
    /// a port nobody listens on (the device answers the SYN with a RST), timed from inside
    /// the lab's namespace. Panics if no attempt is answered within 100 ms.
    pub fn tcp_rtt(&self, ip: &str) -> Duration {
        let addr: std::net::SocketAddr = format!("{ip}:9").parse().expect("an address");
        let rtt = self.ns.run_inside(|| {
            (0..20)
                .map(|_| {
                    let t = Instant::now();
                    let _ = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1));
                    let rtt = t.elapsed();
                    std::thread::sleep(Duration::from_millis(5));
                    rtt
                })
                .min()
                .expect("20 attempts")
        });
        assert!(
            rtt < Duration::from_millis(100),
            "{ip} answered no connection attempt within 100 ms (least {rtt:?})"
        );
        rtt
    }

    /// Starts `baton serve` on `10.77.0.1:7700` (HTTP on the namespace's loopback),
    /// publishing from the lab's directory (where the tests write their content), with the
    /// lab's root and publisher keys and trust document (`lab/trust`, made on first use) as
    /// `--trust` and `--publisher-key`.
    pub fn start_manager(&mut self, extra: &[&str]) -> ManagerInfo {
        let kit = baton_test_support::TrustKit::in_dir(&self.dir.join("trust"));
        let data_dir = self.dir.join("manager");
        let ready = self.dir.join("ready.json");
        let log = self.dir.join("manager.log");
        let mut cmd = self.command(&self.env.baton.clone());
        cmd.arg("serve")
            .arg("--data-dir")
            .arg(&data_dir)
            .args(["--listen", &format!("{MANAGER_IP}:{MANAGER_PORT}")])
            .args(["--http", "127.0.0.1:7780", "--give-up", "20"])
            .arg("--content-dir")
            .arg(&self.dir)
            .arg("--ready-file")
            .arg(&ready)
            .arg("--trust")
            .arg(kit.trust_file())
            .arg("--publisher-key")
            .arg(kit.publisher_key_file())
            .args(extra)
            .env("RUST_LOG", "info");
        let proc = self.spawn("baton serve", cmd, &log);
        let info: Value = {
            let lab = &mut *self;
            wait_for(
                "the manager's ready file",
                BOUND,
                || format!("manager log:\n{}", tail(&read_text(&log), 40)),
                || {
                    assert!(
                        lab.proc(proc).running(),
                        "baton serve exited; log:\n{}",
                        read_text(&log)
                    );
                    serde_json::from_slice(&std::fs::read(&ready).ok()?).ok()
                },
            )
        };
        ManagerInfo {
            key: info["manager_key"]
                .as_str()
                .expect("manager key")
                .to_string(),
            root_key: kit.root_hex(),
            data_dir,
            log,
            proc,
        }
    }

    /// Enrols `id` with `key` at the manager.
    pub fn enroll(&self, m: &ManagerInfo, id: &str, key: &str) {
        let dir = m.data_dir.to_string_lossy();
        self.baton(&["enroll", "--data-dir", &dir, "--id", id, "--key", key]);
    }

    /// Provisions device `n` (flash image, identity, address) and enrols it.
    ///
    /// TCP devices use `tap<n>`, MAC `52:54:00:77:00:<n>`, IP `10.77.0.<10+n>`
    /// and listen for peers on [`DEVICE_PORT`] when `serve` is set; a serial
    /// device talks to the manager over a pty instead and serves no peers.
    pub fn device(
        &self,
        m: &ManagerInfo,
        n: u8,
        serial: bool,
        serve: bool,
        segment: &str,
    ) -> Device {
        let id = if serial {
            format!("fw-s{n}")
        } else {
            format!("fw-{n}")
        };
        let ip = format!("10.77.0.{}", 10 + n as u32);
        let flash = self.dir.join(format!("{id}.img"));
        let listen = if serve && !serial {
            DEVICE_PORT.to_string()
        } else {
            "0".into()
        };
        let manager = format!("{MANAGER_IP}:{MANAGER_PORT}");
        let flash_arg = flash.to_string_lossy().into_owned();
        let mut args = vec![
            "--flash",
            &flash_arg,
            "--id",
            &id,
            "--manager-key",
            &m.key,
            "--listen-port",
            &listen,
            "--segment",
            segment,
            "--site",
            "hil",
            "--root-key",
            &m.root_key,
        ];
        let ip_arg = format!("{ip}/24");
        if serial {
            args.push("--serial");
        } else {
            args.extend(["--ip", &ip_arg, "--manager", &manager, "--tcp"]);
        }
        let out = self.run(&self.env.provision, &args, BOUND);
        assert!(out.success, "provisioning {id} failed: {}", out.stderr);
        let key = out
            .stdout
            .lines()
            .find_map(|l| l.strip_prefix("key="))
            .expect("the tool prints the key")
            .to_string();
        self.enroll(m, &id, &key);
        Device {
            tty: self.dir.join(format!("{id}.tty")),
            id,
            key,
            n,
            ip,
            flash,
            serial,
            boots: 0,
            gdb: None,
            ab: false,
            dir: self.dir.clone(),
            proc: None,
        }
    }

    /// Provisions an A/B device `n` (as [`Lab::device`], TCP, serving no peers) with image
    /// version 1 of the A/B build in ACTIVE.
    pub fn device_ab(&self, m: &ManagerInfo, n: u8, segment: &str) -> Device {
        let mut dev = self.device(m, n, false, false, segment);
        let flash = dev.flash.to_string_lossy().into_owned();
        let elf = self.env.firmware_ab.to_string_lossy().into_owned();
        let out = self.run(
            &self.env.provision,
            &["--flash", &flash, "--image", &elf, "--image-version", "1"],
            BOUND,
        );
        assert!(out.success, "writing image A failed: {}", out.stderr);
        dev.ab = true;
        dev
    }

    /// Writes an update image of the A/B build with `version` in its header (and the test
    /// flag of an image that never confirms) to a file; returns its path.
    pub fn ab_image(&self, version: u32, never_confirm: bool) -> PathBuf {
        let path = self.dir.join(format!("image-v{version}.bin"));
        let elf = self.env.firmware_ab.to_string_lossy().into_owned();
        let (v, out_arg) = (version.to_string(), path.to_string_lossy().into_owned());
        let mut args = vec![
            "--image",
            &elf,
            "--image-version",
            &v,
            "--image-out",
            &out_arg,
        ];
        if never_confirm {
            args.push("--image-never-confirm");
        }
        let out = self.run(&self.env.provision, &args, BOUND);
        assert!(
            out.success,
            "writing image v{version} failed: {}",
            out.stderr
        );
        path
    }

    /// Boots `dev` in QEMU (a new log file per boot); waits for its `ready` line.
    /// A serial device's pty is linked at `dev.tty` for the manager.
    pub fn boot(&mut self, dev: &mut Device) {
        assert!(dev.proc.is_none(), "{} is already running", dev.id);
        dev.boots += 1;
        let log = dev.log_path(dev.boots);
        let mut cmd = self.command(&self.env.run_qemu.clone());
        cmd.arg("--flash")
            .arg(&dev.flash)
            .args(["--mac", &format!("52:54:00:77:00:{:02x}", dev.n)]);
        let pty_file = self.dir.join(format!("{}.pty", dev.id));
        if dev.serial {
            let _ = std::fs::remove_file(&pty_file);
            cmd.args(["--serial", "pty", "--pty-file"]).arg(&pty_file);
        } else {
            cmd.args(["--tap", &format!("tap{}", dev.n)]);
        }
        if let Some(socket) = &dev.gdb {
            let _ = std::fs::remove_file(socket);
            cmd.arg("--gdb").arg(socket);
        }
        if dev.ab {
            cmd.arg("--boot").arg(&self.env.bootloader);
            cmd.arg(&self.env.firmware_ab);
        } else {
            cmd.arg(&self.env.firmware);
        }
        let label = format!("QEMU {}", dev.id);
        dev.proc = Some(self.spawn(&label, cmd, &log));
        dev.wait_log("ready id=", BOUND);
        if dev.serial {
            let pty = wait_for(
                "QEMU's pty",
                BOUND,
                || tail(&dev.log(), 20),
                || {
                    let p = read_text(&pty_file);
                    let p = p.trim();
                    (!p.is_empty()).then(|| p.to_string())
                },
            );
            let _ = std::fs::remove_file(&dev.tty);
            std::os::unix::fs::symlink(&pty, &dev.tty).expect("link the pty");
        }
    }

    /// Cuts `dev`'s power: SIGKILL to QEMU, mid-whatever it was doing. Its log
    /// is complete once this returns (the decoder drained what QEMU wrote).
    pub fn power_cut(&mut self, dev: &mut Device) {
        let index = dev.proc.take().expect("device is running");
        if let Some(mut p) = self.procs[index].take() {
            p.kill_leader();
        }
    }

    /// Starts a Linux agent `id` on the segment (listening on the bridge's address) and enrols it.
    pub fn linux_agent(&mut self, m: &ManagerInfo, id: &str, segment: &str) -> LinuxAgent {
        let data = self.dir.join(id);
        let key = self
            .baton(&[
                "agent",
                "--data-dir",
                &data.to_string_lossy(),
                "--print-key",
            ])
            .trim()
            .to_string();
        self.enroll(m, id, &key);
        let export = self.dir.join(format!("{id}.out"));
        let log = self.dir.join(format!("{id}.log"));
        let mut cmd = self.command(&self.env.baton.clone());
        cmd.arg("agent")
            .args(["--manager", &format!("{MANAGER_IP}:{MANAGER_PORT}")])
            .args(["--manager-key", &m.key, "--id", id])
            .args(["--root-key", &m.root_key])
            .arg("--data-dir")
            .arg(&data)
            .args(["--listen", &format!("{MANAGER_IP}:0")])
            .args(["--segment", segment, "--site", "hil"])
            .arg("--export")
            .arg(&export)
            .env("RUST_LOG", "info");
        self.spawn(&format!("baton agent {id}"), cmd, &log);
        LinuxAgent {
            id: id.to_string(),
            export,
            log,
        }
    }

    /// Waits until the manager lists every agent in `ids` as connected.
    pub fn wait_connected(&self, m: &ManagerInfo, ids: &[&str]) {
        let dir = m.data_dir.to_string_lossy().into_owned();
        wait_for(
            &format!("agents {ids:?} connected"),
            BOUND,
            || format!("manager log:\n{}", tail(&read_text(&m.log), 30)),
            || {
                let out = self.run(
                    &self.env.baton,
                    &["agents", "--json", "--data-dir", &dir],
                    BOUND,
                );
                let list: Value = serde_json::from_str(&out.stdout).ok()?;
                let up: Vec<&str> = list
                    .as_array()?
                    .iter()
                    .filter(|a| a["connected"].as_bool() == Some(true))
                    .filter_map(|a| a["id"].as_str())
                    .collect();
                ids.iter().all(|id| up.contains(id)).then_some(())
            },
        );
    }

    /// Publishes `file` (4 KiB chunks) and starts a job for `agents`; returns the job id.
    pub fn push(&self, m: &ManagerInfo, file: &Path, agents: &[&str]) -> u64 {
        self.push_with(m, file, agents, &["--chunk-size", &CHUNK.to_string()])
    }

    /// Pushes `file` to `agents` as content `name` at `version` (signed by the lab's
    /// publisher key, which the lab's trust document lists for every name); returns the job id.
    pub fn push_as(
        &self,
        m: &ManagerInfo,
        file: &Path,
        agents: &[&str],
        name: &str,
        version: u64,
    ) -> u64 {
        self.push_with(
            m,
            file,
            agents,
            &[
                "--chunk-size",
                &CHUNK.to_string(),
                "--name",
                name,
                "--version",
                &version.to_string(),
            ],
        )
    }

    /// Pushes `file` to `agents` with a manifest signed offline (`baton sign`) by the lab's
    /// publisher key as content `name` at `version`: the manager relays it whatever versions
    /// it published before (only agents judge rollback), as a replayed genuine old manifest
    /// would be.
    pub fn push_signed_offline(
        &self,
        m: &ManagerInfo,
        file: &Path,
        agents: &[&str],
        name: &str,
        version: u64,
    ) -> u64 {
        let kit = baton_test_support::TrustKit::in_dir(&self.dir.join("trust"));
        let manifest = file.with_extension("manifest");
        self.baton(&[
            "sign",
            &file.to_string_lossy(),
            "--key",
            &kit.publisher_key_file().to_string_lossy(),
            "--name",
            name,
            "--version",
            &version.to_string(),
            "--chunk-size",
            &CHUNK.to_string(),
            "--out",
            &manifest.to_string_lossy(),
        ]);
        self.push_with(
            m,
            file,
            agents,
            &["--manifest", &manifest.to_string_lossy()],
        )
    }

    fn push_with(&self, m: &ManagerInfo, file: &Path, agents: &[&str], extra: &[&str]) -> u64 {
        let file = file.to_string_lossy();
        let agents = agents.join(",");
        let data_dir = m.data_dir.to_string_lossy();
        let mut args = vec![
            "push",
            &file,
            "--agents",
            &agents,
            "--json",
            "--data-dir",
            &data_dir,
        ];
        args.extend_from_slice(extra);
        let out = self.baton(&args);
        let created: Value = serde_json::from_str(out.trim()).expect("push prints JSON");
        created["id"].as_u64().expect("job id")
    }

    /// The job's detail (`baton job N --json`).
    pub fn job(&self, m: &ManagerInfo, job: u64) -> Value {
        let out = self.baton(&[
            "job",
            &job.to_string(),
            "--json",
            "--data-dir",
            &m.data_dir.to_string_lossy(),
        ]);
        serde_json::from_str(&out).expect("job JSON")
    }

    /// Waits until the job is over (every participant confirmed or failed); returns its detail.
    /// A lab process that dies meanwhile (a device's QEMU after a lockup, the manager, an
    /// agent) fails at once with its log, instead of when the time is up.
    pub fn wait_job(&mut self, m: &ManagerInfo, job: u64, limit: Duration) -> Value {
        let deadline = Instant::now() + limit;
        loop {
            let detail = self.job(m, job);
            if !matches!(detail["state"].as_str(), Some("pending" | "running")) {
                return detail;
            }
            for p in self.procs.iter_mut().flatten() {
                if let Some(status) = p.exited()
                    && !status.success()
                {
                    panic!(
                        "{} exited ({status}) while job {job} ran; its log:\n{}",
                        p.label,
                        tail(&p.log(), 30)
                    );
                }
            }
            assert!(
                Instant::now() < deadline,
                "job {job} still {} after {limit:?}: {detail}\nmanager log:\n{}",
                detail["state"],
                tail(&read_text(&m.log), 40)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Everything the lab's processes logged, for a failure message.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for p in self.procs.iter().flatten() {
            let path = p.log.as_deref().unwrap_or(Path::new("-"));
            out.push_str(&format!(
                "---- {} ({})\n{}\n",
                p.label,
                path.display(),
                tail(&p.log(), 30)
            ));
        }
        out
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Processes first (they hold the taps); the namespace and its devices go when the
        // `ns` field drops, after this.
        for p in self.procs.iter_mut().filter_map(Option::take) {
            drop(p);
        }
        if std::thread::panicking() && std::env::var_os("HIL_KEEP").is_some() {
            self.keep_files();
        }
    }
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn parses_device_log_lines() {
        let log = "0.010 INFO  chunk 3 stored\n0.011 INFO  chunk 12 stored\n\
                   0.012 WARN  chunk 4 refused\n\
                   0.140 INFO  job 1 complete sha256=abcd length=524288 fetched=8192 ms=134 rate=61134B/s hash_ms=10\n";
        assert_eq!(stored_chunks(log), vec![3, 12]);
        let c = completion(log).unwrap();
        assert_eq!(
            c,
            Completion {
                job: 1,
                sha256: "abcd".into(),
                length: 524288,
                fetched: 8192,
                ms: 134,
                rate: 61134
            }
        );
        assert_eq!(completion("nothing"), None);
        let f = footprint(
            "1.0 INFO  footprint: stack_peak=100 stack_size=200 data=28 bss=300 stack_boot=100 stack_net=9 stack_node=50\n\
             2.0 INFO  footprint: stack_peak=150 stack_size=200 data=28 bss=300 stack_boot=100 stack_net=9 stack_node=150\n",
        )
        .unwrap();
        assert_eq!((f.stack_peak, f.ram_used()), (150, 478));
        assert_eq!(f.per_task, [100, 9, 150]);
    }

    #[test]
    fn reads_dep_info_paths_with_escaped_spaces() {
        let d = "/t/baton: /src/a.rs /src/my\\ file.rs\n\n/src/a.rs:\n";
        let paths: Vec<PathBuf> = dep_info_sources(d).collect();
        assert_eq!(
            paths,
            vec![PathBuf::from("/src/a.rs"), PathBuf::from("/src/my file.rs")]
        );
    }
}
