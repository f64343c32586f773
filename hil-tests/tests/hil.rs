//! Hardware-in-the-loop tests: firmware devices in QEMU (mps2-an385), Linux
//! agents and the manager on one bridged segment (see the crate docs).
//!
//! Run after `scripts/build-firmware.sh`, as root:
//! `cargo test -p baton-hil-tests --release`. The tests run one at a time
//! (they share QEMU and the CPU budget); each prints what it measured.

use std::io::{BufRead as _, BufReader, Write as _};
use std::process::Stdio;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use baton_hil_tests::*;
use baton_protocol::identity::Identity;
use serde_json::Value;

const SIZE: usize = 512 * 1024;

fn participants_confirmed(detail: &Value, ids: &[&str]) {
    let parts = detail["participants"].as_array().expect("participants");
    for id in ids {
        let p = parts
            .iter()
            .find(|p| p["agent"] == *id)
            .unwrap_or_else(|| panic!("{id} is not a participant: {detail:#}"));
        assert_eq!(p["state"], "confirmed", "{id} did not confirm: {detail:#}");
    }
}

fn write_content(lab: &Lab, size: usize) -> (std::path::PathBuf, Vec<u8>, String) {
    let content = random_bytes(size);
    let file = lab.dir.join("content.bin");
    std::fs::write(&file, &content).expect("content file");
    let sha = sha256_hex(&content);
    (file, content, sha)
}

/// (a) Three devices and two Linux agents receive 512 KiB; a device serves
/// another device; every device confirms with the SHA-256 it recomputed from
/// its flash.
#[test]
fn a_devices_and_linux_agents_relay() {
    let _one = one_at_a_time();
    let mut lab = Lab::new("relay", 3);
    let m = lab.start_manager(&[]);
    let mut devs: Vec<Device> = (1..=3)
        .map(|n| lab.device(&m, n, false, true, "hil-devices"))
        .collect();
    for d in devs.iter_mut() {
        lab.boot(d);
    }
    let agents: Vec<LinuxAgent> = (1..=2)
        .map(|n| lab.linux_agent(&m, &format!("lin-{n}"), "hil-linux"))
        .collect();
    for d in &devs {
        d.wait_log("welcomed by the manager", BOUND);
    }
    let dev_ids: Vec<&str> = devs.iter().map(|d| d.id.as_str()).collect();
    let mut ids = dev_ids.clone();
    ids.extend(agents.iter().map(|a| a.id.as_str()));
    lab.wait_connected(&m, &ids);

    let (file, content, want) = write_content(&lab, SIZE);
    let started = Instant::now();
    let job = lab.push(&m, &file, &ids);
    let detail = lab.wait_job(&m, job, Duration::from_secs(120));
    let took = started.elapsed();
    participants_confirmed(&detail, &ids);

    for d in &devs {
        let line = d.wait_log(" complete sha256=", BOUND);
        let c = completion(&line).expect("completion line");
        assert_eq!(
            c.sha256, want,
            "{} holds other content in flash: {line}",
            d.id
        );
        assert_eq!(c.length, SIZE as u64);
        d.wait_log(&format!("job {job} done"), BOUND);
        let f = assert_fits(d);
        eprintln!(
            "{}: sha256 from flash ok, fetched {} B in {} ms ({} B/s); peak stack {} of {} B \
             (boot {}, net {}, node {}), RAM {} of 65536 B",
            d.id,
            c.fetched,
            c.ms,
            c.rate,
            f.stack_peak,
            f.stack_size,
            f.per_task[0],
            f.per_task[1],
            f.per_task[2],
            f.ram_used()
        );
    }
    for a in &agents {
        let got = wait_for(
            &format!("{} exporting the content", a.id),
            BOUND,
            || tail(&read_text(&a.log), 30),
            || {
                std::fs::read(&a.export)
                    .ok()
                    .filter(|b| b.len() == content.len())
            },
        );
        assert!(got == content, "{} exported other bytes", a.id);
    }

    // Relay: the manager recorded verified bytes a device received from another device,
    // and the serving device logged that peer's connection.
    let relays: Vec<(String, String, u64)> = detail["source_bytes"]
        .as_array()
        .expect("source_bytes")
        .iter()
        .filter_map(|s| {
            let (to, from) = (s["agent"].as_str()?, s["from"].as_str()?);
            let bytes = s["bytes"].as_u64()?;
            (dev_ids.contains(&to) && dev_ids.contains(&from) && bytes > 0)
                .then(|| (to.to_string(), from.to_string(), bytes))
        })
        .collect();
    assert!(
        !relays.is_empty(),
        "no device served another device: source_bytes {:#}\n{}",
        detail["source_bytes"],
        lab.logs()
    );
    for (to, from, bytes) in &relays {
        let server = devs.iter().find(|d| d.id == *from).expect("a device");
        assert!(
            server
                .log()
                .contains(&format!("peer {to} connected (Incoming)")),
            "{from} served {bytes} B to {to} by the manager's record but logged no such peer:\n{}",
            tail(&server.log(), 40)
        );
        eprintln!("relay: {from} -> {to}: {bytes} B verified");
    }
    eprintln!(
        "job {job}: {} B to 3 devices and 2 Linux agents in {:.2} s; from the manager {} B, from peers {} B",
        SIZE,
        took.as_secs_f64(),
        detail["bytes_from_manager"],
        detail["bytes_from_peers"]
    );
}

/// (b) A serial-attached device (UART0 on a pty, `baton serve --serial`)
/// receives, verifies and confirms, next to a TCP device; both transfer rates
/// into a QEMU device are measured.
#[test]
fn b_serial_device_receives_and_confirms() {
    let _one = one_at_a_time();
    let mut lab = Lab::new("serial", 1);
    let tty = lab.dir.join("fw-s1.tty");
    let m = lab.start_manager(&["--serial", &tty.to_string_lossy()]);
    let mut serial = lab.device(&m, 1, true, false, "hil-serial");
    assert_eq!(serial.tty, tty);
    let mut tcp = lab.device(&m, 1, false, false, "hil-tcp");
    lab.boot(&mut serial);
    lab.boot(&mut tcp);
    serial.wait_log("welcomed by the manager", BOUND);
    tcp.wait_log("welcomed by the manager", BOUND);
    lab.wait_connected(&m, &[&serial.id, &tcp.id]);

    // What the serial device reported: no listener, cannot serve peers.
    let agents: Value = serde_json::from_str(&lab.baton(&[
        "agents",
        "--json",
        "--data-dir",
        &m.data_dir.to_string_lossy(),
    ]))
    .expect("agents JSON");
    let record = agents
        .as_array()
        .and_then(|a| a.iter().find(|r| r["id"] == serial.id.as_str()))
        .expect("serial device listed");
    assert_eq!(record["report"]["can_serve"], false, "{record:#}");
    assert!(record["report"]["listen"].is_null(), "{record:#}");

    let size = 256 * 1024;
    let (file, _, want) = write_content(&lab, size);
    let job = lab.push(&m, &file, &[&serial.id, &tcp.id]);
    let detail = lab.wait_job(&m, job, Duration::from_secs(180));
    participants_confirmed(&detail, &[&serial.id, &tcp.id]);
    let mut rates = Vec::new();
    for d in [&serial, &tcp] {
        let line = d.wait_log(" complete sha256=", BOUND);
        let c = completion(&line).expect("completion line");
        assert_eq!(c.sha256, want, "{}: {line}", d.id);
        assert_eq!(c.fetched, size as u64, "{}: {line}", d.id);
        d.wait_log(&format!("job {job} done"), BOUND);
        let f = assert_fits(d);
        eprintln!(
            "{}: peak stack {} of {} B after the job (boot {}, net {}, node {})",
            d.id, f.stack_peak, f.stack_size, f.per_task[0], f.per_task[1], f.per_task[2]
        );
        rates.push(c.rate);
    }
    // Everything the serial device got came from the manager, over the line.
    let from_manager: u64 = detail["source_bytes"]
        .as_array()
        .expect("source_bytes")
        .iter()
        .filter(|s| s["agent"] == serial.id.as_str() && s["from"].is_null())
        .filter_map(|s| s["bytes"].as_u64())
        .sum();
    assert_eq!(from_manager, size as u64, "{detail:#}");
    assert!(
        read_text(&m.log).contains("serial port open"),
        "manager log:\n{}",
        tail(&read_text(&m.log), 30)
    );
    eprintln!(
        "transfer rate into a QEMU device, {} KiB from the manager: serial (pty, COBS) {} B/s, TCP {} B/s",
        size / 1024,
        rates[0],
        rates[1]
    );
}

/// (c) Power cut mid-transfer: QEMU is killed (SIGKILL) right after the device
/// logged a stored chunk, and booted again from the same flash file. It
/// resumes from flash: it fetches exactly the chunks it had not stored, each once.
#[test]
fn c_power_cut_resumes_from_flash() {
    let _one = one_at_a_time();
    let mut lab = Lab::new("powercut", 1);
    // A capped manager makes 512 KiB take about half a second, so the cut lands mid-transfer.
    let m = lab.start_manager(&["--up-bps", "1MiB"]);
    let mut dev = lab.device(&m, 1, false, false, "hil-power");
    lab.boot(&mut dev);
    dev.wait_log("welcomed by the manager", BOUND);
    lab.wait_connected(&m, &[&dev.id]);

    let (file, _, want) = write_content(&lab, SIZE);
    let chunks = (SIZE / CHUNK) as u32;
    let job = lab.push(&m, &file, &[&dev.id]);
    const TRIGGER: usize = 16;
    wait_for(
        &format!("{} storing {TRIGGER} chunks", dev.id),
        BOUND,
        || tail(&dev.log(), 30),
        || (stored_chunks(&dev.log()).len() >= TRIGGER).then_some(()),
    );
    lab.power_cut(&mut dev);
    let before = dev.log();
    let stored_before = stored_chunks(&before);
    assert!(
        completion(&before).is_none() && (stored_before.len() as u32) < chunks,
        "the transfer finished before the power cut:\n{}",
        tail(&before, 20)
    );

    lab.boot(&mut dev);
    let line = dev.wait_log(" complete sha256=", Duration::from_secs(60));
    let after = dev.log();
    let detail = lab.wait_job(&m, job, Duration::from_secs(60));
    participants_confirmed(&detail, &[&dev.id]);

    let c = completion(&line).expect("completion line");
    assert_eq!(c.sha256, want, "content read back from flash: {line}");
    // What the flash held at boot: at least every chunk logged as stored before
    // the cut, and at most one more (stored, cut before its log line).
    let held_line = after
        .lines()
        .find(|l| l.contains("flash content: "))
        .unwrap_or_else(|| panic!("no flash content line after reboot:\n{after}"));
    let held: u32 = held_line
        .split("flash content: ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|v| v.parse().ok())
        .expect("verified count");
    let logged = stored_before.len() as u32;
    assert!(
        held >= logged && held <= logged + 1,
        "flash held {held} chunks after the cut, {logged} were logged as stored"
    );
    let resumed: u32 = field(
        &dev.wait_log(&format!("job {job} started"), BOUND),
        "resumed",
    )
    .and_then(|v| v.parse().ok())
    .expect("resumed count");
    assert_eq!(resumed, held, "the job resumed from what flash held");
    // After the reboot: only the missing chunks, none of those stored before, each once.
    let stored_after = stored_chunks(&after);
    assert!(
        stored_after.iter().all(|k| !stored_before.contains(k)),
        "a chunk stored before the cut was fetched again: before {stored_before:?}, after {stored_after:?}"
    );
    let mut unique = stored_after.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique.len(), stored_after.len(), "a chunk stored twice");
    assert_eq!(stored_after.len() as u32, chunks - held);
    assert_eq!(
        c.fetched,
        (chunks - held) as u64 * CHUNK as u64,
        "bytes fetched after the reboot: {line}"
    );
    eprintln!(
        "power cut after {logged} chunks logged as stored ({held} in flash); after reboot fetched {} chunks ({} B), sha256 from flash ok",
        stored_after.len(),
        c.fetched
    );
}

/// (d) A chunk with one flipped byte (genuine proof) is rejected before it
/// reaches flash: no `chunk K stored`, its bytes are nowhere in the flash
/// image, the device asks again and completes with the genuine chunk.
#[test]
fn d_corrupted_chunk_never_reaches_flash() {
    let _one = one_at_a_time();
    let mut lab = Lab::new("corrupt", 1);
    let seed = [0x4d; 32];
    let root_seed = [0x52; 32];
    let publisher_seed = [0x50; 32];
    let manager_key = hex::encode(Identity::from_seed(seed).public().0);
    // The device pins the fake manager's key; nothing to enrol (there is no real manager).
    let flash = lab.dir.join("fw-1.img");
    let out = lab.run(
        &lab.env.provision,
        &[
            "--flash",
            &flash.to_string_lossy(),
            "--id",
            "fw-1",
            "--ip",
            "10.77.0.11/24",
            "--manager",
            &format!("{MANAGER_IP}:{MANAGER_PORT}"),
            "--manager-key",
            &manager_key,
            "--listen-port",
            "0",
            "--root-key",
            &hex::encode(Identity::from_seed(root_seed).public().0),
        ],
        BOUND,
    );
    assert!(out.success, "provisioning failed: {}", out.stderr);
    let device_key = out
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("key="))
        .expect("device key")
        .to_string();

    let (file, content, want) = write_content(&lab, SIZE);
    const CORRUPT: u32 = 5;
    let k = CORRUPT as usize;
    let genuine = content[k * CHUNK..(k + 1) * CHUNK].to_vec();
    let mut corrupted = genuine.clone();
    corrupted[100] ^= 0x01;

    let fake = std::path::PathBuf::from(env!("CARGO_BIN_EXE_hil-fake-manager"));
    let log = lab.dir.join("fake-manager.log");
    let mut cmd = lab.command(&fake);
    cmd.args(["--listen", &format!("{MANAGER_IP}:{MANAGER_PORT}")])
        .args(["--seed", &hex::encode(seed)])
        .args(["--root-seed", &hex::encode(root_seed)])
        .args(["--publisher-seed", &hex::encode(publisher_seed)])
        .args(["--device-id", "fw-1", "--device-key", &device_key])
        .arg("--content")
        .arg(&file)
        .args(["--corrupt", &CORRUPT.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).expect("log"));
    let fake_proc = lab.spawn_with("hil-fake-manager", cmd, &log);
    let (mut go, events) = {
        let child = lab.proc(fake_proc).child();
        let stdin = child.stdin.take().expect("stdin");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel::<String>();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        (stdin, rx)
    };
    let expect = |what: &str| {
        let line = events.recv_timeout(BOUND).unwrap_or_else(|_| {
            panic!(
                "fake manager did not say {what:?}; its log:\n{}",
                read_text(&log)
            )
        });
        assert_eq!(line, what, "fake manager log:\n{}", read_text(&log));
    };
    expect("listening");

    let mut dev = Device::detached("fw-1", &device_key, 1, &flash, &lab.dir);
    lab.boot(&mut dev);
    expect("connected");
    expect(&format!("corrupted {CORRUPT}"));
    expect(&format!("rerequest {CORRUPT}"));
    // The device has seen the corrupted chunk and asked again: it must not have stored it.
    let log_now = dev.log();
    assert!(
        !stored_chunks(&log_now).contains(&CORRUPT),
        "the corrupted chunk was stored:\n{}",
        tail(&log_now, 30)
    );
    let image = std::fs::read(&dev.flash).expect("flash image");
    assert!(
        find(&image, &corrupted).is_none(),
        "the corrupted chunk's bytes are in the flash image"
    );
    writeln!(go, "go").expect("tell the fake manager to go on");

    let line = dev.wait_log(" complete sha256=", Duration::from_secs(60));
    let c = completion(&line).expect("completion line");
    assert_eq!(c.sha256, want, "content read back from flash: {line}");
    let stored = stored_chunks(&dev.log());
    assert_eq!(
        stored.iter().filter(|&&i| i == CORRUPT).count(),
        1,
        "chunk {CORRUPT} stored once, after the genuine copy"
    );
    let image = std::fs::read(&dev.flash).expect("flash image");
    assert!(
        find(&image, &corrupted).is_none(),
        "corrupted bytes in flash"
    );
    assert!(
        find(&image, &genuine).is_some(),
        "the genuine chunk is in flash"
    );
    expect("have");
    eprintln!(
        "corrupted chunk {CORRUPT} refused before flash; genuine copy stored; sha256 from flash ok"
    );
    drop(go);
}

/// The failure reason the manager recorded for `id` in a finished job.
fn failure_reason(detail: &Value, id: &str) -> String {
    let parts = detail["participants"].as_array().expect("participants");
    let p = parts
        .iter()
        .find(|p| p["agent"] == id)
        .unwrap_or_else(|| panic!("{id} is not a participant: {detail:#}"));
    assert_eq!(p["state"], "failed", "{id} did not fail: {detail:#}");
    p["reason"].as_str().unwrap_or_default().to_string()
}

/// (e) Rollback protection on the device: it accepted `hil-fw` v2, then other content
/// replaced it in the device's content slot; `hil-fw` v1 is refused as a downgrade, and
/// again after a reboot (the version record is in flash, not in the evicted content);
/// v3 is accepted (the positive control).
#[test]
fn e_device_refuses_rollback_after_replacement_and_reboot() {
    let _one = one_at_a_time();
    let mut lab = Lab::new("rollback", 1);
    let m = lab.start_manager(&[]);
    let mut dev = lab.device(&m, 1, false, false, "hil-rollback");
    lab.boot(&mut dev);
    dev.wait_log("welcomed by the manager", BOUND);
    lab.wait_connected(&m, &[&dev.id]);
    const SMALL: usize = 64 * 1024;
    let write = |name: &str| {
        let file = lab.dir.join(name);
        std::fs::write(&file, random_bytes(SMALL)).expect("content file");
        file
    };
    let (v2, other, v1, v3) = (
        write("v2.bin"),
        write("other.bin"),
        write("v1.bin"),
        write("v3.bin"),
    );

    let job = lab.push_as(&m, &v2, &[&dev.id], "hil-fw", 2);
    participants_confirmed(&lab.wait_job(&m, job, Duration::from_secs(60)), &[&dev.id]);
    let job = lab.push_as(&m, &other, &[&dev.id], "hil-other", 1);
    participants_confirmed(&lab.wait_job(&m, job, Duration::from_secs(60)), &[&dev.id]);

    // The genuine v1, signed by the listed publisher, replayed (offline-signed manifests are
    // not judged by version at the manager: the device must refuse it itself).
    let job = lab.push_signed_offline(&m, &v1, &[&dev.id], "hil-fw", 1);
    let detail = lab.wait_job(&m, job, Duration::from_secs(60));
    let reason = failure_reason(&detail, &dev.id);
    assert!(
        reason.contains("Downgrade"),
        "v1 after v2 (evicted) failed for another reason: {reason}"
    );

    lab.power_cut(&mut dev);
    lab.boot(&mut dev);
    dev.wait_log("welcomed by the manager", BOUND);
    lab.wait_connected(&m, &[&dev.id]);
    let job = lab.push_signed_offline(&m, &v1, &[&dev.id], "hil-fw", 1);
    let detail = lab.wait_job(&m, job, Duration::from_secs(60));
    let after_reboot = failure_reason(&detail, &dev.id);
    assert!(
        after_reboot.contains("Downgrade"),
        "v1 after a reboot failed for another reason: {after_reboot}"
    );

    let job = lab.push_as(&m, &v3, &[&dev.id], "hil-fw", 3);
    participants_confirmed(&lab.wait_job(&m, job, Duration::from_secs(60)), &[&dev.id]);
    eprintln!(
        "rollback: v1 refused after v2 was replaced ({reason}), again after a reboot; v3 accepted"
    );
}

/// Where `needle` occurs in `hay`.
fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    let first = *needle.first()?;
    (0..=hay.len().checked_sub(needle.len())?)
        .find(|&i| hay[i] == first && &hay[i..i + needle.len()] == needle)
}

/// The value after `prefix` in a log line, as a `0x…` hex number.
fn hex_after(line: &str, prefix: &str) -> Option<u32> {
    let rest = &line[line.find(prefix)? + prefix.len()..];
    let digits = rest.strip_prefix("0x")?;
    let end = digits
        .find(|c: char| !c.is_ascii_hexdigit())
        .unwrap_or(digits.len());
    u32::from_str_radix(&digits[..end], 16).ok()
}

/// Boots a device provisioned with `--fault-demo demo` (no network needed: slirp) and
/// returns its log; the device must fault and QEMU exit with status 1 within 10 s.
fn fault_demo(demo: &str) -> String {
    let env = Env::require();
    let dir = tempfile::tempdir().expect("temporary directory");
    let flash = dir.path().join("dev.img");
    let mut cmd = std::process::Command::new(&env.provision);
    cmd.arg("--flash")
        .arg(&flash)
        .args(["--id", "fw-guard", "--fault-demo", demo]);
    let out = baton_test_support::run(cmd, BOUND);
    assert!(out.success, "provisioning failed: {}", out.stderr);
    let mut cmd = std::process::Command::new(&env.run_qemu);
    cmd.env("PATH", &env.path)
        .arg("--flash")
        .arg(&flash)
        .arg(&env.firmware);
    let started = Instant::now();
    let out = baton_test_support::run(cmd, Duration::from_secs(10));
    assert_eq!(
        out.code,
        Some(1),
        "QEMU must exit with the firmware's failure status after the {demo} fault:\n{}\n{}",
        out.stdout,
        out.stderr
    );
    eprintln!(
        "fault demo {demo}: QEMU exited after {:?}: {}",
        started.elapsed(),
        out.stdout.lines().last().unwrap_or("")
    );
    out.stdout
}

/// (f) The memory guards, shown on the image under test: a device that recurses without end
/// faults as its stack reaches the guard below it and logs `stack overflow` with an address
/// below the stack region (nothing in the statics above was touched); a write to the code
/// memory raises a MemManage fault naming the address written.
#[test]
fn f_stack_overflow_and_code_write_fault_at_once() {
    let _one = one_at_a_time();

    let log = fault_demo("stack-overflow");
    let start = log
        .lines()
        .find(|l| l.contains("fault demo: recursing until the stack ("))
        .unwrap_or_else(|| panic!("no demo start line:\n{log}"));
    let bottom = hex_after(start, "the stack (").expect("stack bottom in the demo line");
    let line = log
        .lines()
        .find(|l| l.contains("ERROR stack overflow: fault at 0x"))
        .unwrap_or_else(|| panic!("no stack overflow line:\n{log}"));
    let at = hex_after(line, "fault at ").expect("fault address");
    assert!(
        at < bottom && bottom - at <= 32 + 4096,
        "the overflow must fault just below the stack's bottom {bottom:#x}: {line}"
    );
    assert!(
        !log.contains("recursion returned"),
        "the recursion must not survive its overflow:\n{log}"
    );

    let log = fault_demo("code-write");
    let start = log
        .lines()
        .find(|l| l.contains("fault demo: writing to code at 0x"))
        .unwrap_or_else(|| panic!("no demo start line:\n{log}"));
    let target = hex_after(start, "code at ").expect("target address in the demo line");
    let line = log
        .lines()
        .find(|l| l.contains("ERROR MemManage fault at 0x"))
        .unwrap_or_else(|| panic!("no MemManage fault line:\n{log}"));
    assert_eq!(
        hex_after(line, "fault at "),
        Some(target),
        "the fault must name the address written: {line}"
    );
    assert!(
        !log.contains("went through"),
        "the write to code must not land:\n{log}"
    );
}
