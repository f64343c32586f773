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
    // A device serving another sends from a buffer of IN_TX bytes, so at most IN_TX bytes
    // are in flight: W/RTT bounds a device -> device transfer.
    let window = lab.firmware_buffer_size("baton_firmware::IN_TX");
    let rtt = lab.tcp_rtt(&devs[0].ip);
    eprintln!(
        "device -> device: send window {window} B, RTT {:.0} us -> W/RTT {:.0} B/s",
        rtt.as_secs_f64() * 1e6,
        window as f64 / rtt.as_secs_f64()
    );
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
    let status = |lab: &Lab| -> Value {
        let out = lab.baton(&[
            "status",
            "--json",
            "--data-dir",
            &m.data_dir.to_string_lossy(),
        ]);
        serde_json::from_str(&out).expect("status JSON")
    };
    let line_bytes = |s: &Value| {
        let n = |k: &str| s[k].as_u64().unwrap_or_else(|| panic!("{k} in {s:#}"));
        (n("serial_bytes_sent"), n("serial_bytes_received"))
    };
    let before = line_bytes(&status(&lab));
    let job = lab.push(&m, &file, &[&serial.id, &tcp.id]);
    let detail = lab.wait_job(&m, job, Duration::from_secs(180));
    let after = line_bytes(&status(&lab));
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
    // Content bytes per line byte over the whole job (both directions: COBS, framing, AEAD
    // tags, requests, reports and Merkle proofs all count as overhead).
    let (sent, received) = (after.0 - before.0, after.1 - before.1);
    let payload = size as f64 / (sent + received) as f64;
    eprintln!(
        "serial line: {size} content bytes in {} line bytes ({sent} to the device, {received} from it): {:.1} % payload ({} B chunks)",
        sent + received,
        payload * 100.0,
        CHUNK
    );
    assert!(
        payload >= 0.90,
        "the serial line carried {sent} + {received} bytes for {size} content bytes ({:.1} % payload, target 90 %)",
        payload * 100.0
    );
    eprintln!(
        "transfer rate into a QEMU device, {} KiB from the manager: serial (pty, COBS) {} B/s, TCP {} B/s",
        size / 1024,
        rates[0],
        rates[1]
    );
    // Over TCP, the most a window allows is W/RTT: the device's receive buffer for the
    // manager's link over the segment's round trip.
    let window = lab.firmware_buffer_size("baton_firmware::MANAGER_RX");
    let rtt = lab.tcp_rtt(&tcp.ip);
    let bound = window as f64 / rtt.as_secs_f64();
    eprintln!(
        "TCP into a device: {} B/s; window {window} B, RTT {:.0} us -> W/RTT {:.0} B/s: {:.0} % of it",
        rates[1],
        rtt.as_secs_f64() * 1e6,
        bound,
        rates[1] as f64 / bound * 100.0
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
    let (v2, other, v1, v3, v4) = (
        write("v2.bin"),
        write("other.bin"),
        write("v1.bin"),
        write("v3.bin"),
        write("v4.bin"),
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

    // Flash that decayed under the records fails closed: the device believes no stored
    // trust and refuses every manifest, until `baton-fw-provision --erase-records` resets
    // the area; then the refused v4 is taken.
    lab.power_cut(&mut dev);
    let damaged = damage_record_entries(&dev.flash);
    assert!(damaged > 1, "the record bank held {damaged} entries");
    lab.boot(&mut dev);
    dev.wait_log("welcomed by the manager", BOUND);
    lab.wait_connected(&m, &[&dev.id]);
    let job = lab.push_as(&m, &v4, &[&dev.id], "hil-fw", 4);
    let refused = failure_reason(&lab.wait_job(&m, job, Duration::from_secs(60)), &dev.id);
    assert!(
        refused.contains("NoTrust") || refused.contains("StorageError"),
        "v4 on damaged records failed for another reason: {refused}"
    );
    lab.power_cut(&mut dev);
    let flash = dev.flash.to_string_lossy().into_owned();
    let out = lab.run(
        &lab.env.provision,
        &["--flash", &flash, "--erase-records"],
        BOUND,
    );
    assert!(out.success, "--erase-records failed: {}", out.stderr);
    lab.boot(&mut dev);
    dev.wait_log("welcomed by the manager", BOUND);
    lab.wait_connected(&m, &[&dev.id]);
    let job = lab.push_as(&m, &v4, &[&dev.id], "hil-fw", 4);
    participants_confirmed(&lab.wait_job(&m, job, Duration::from_secs(60)), &[&dev.id]);
    eprintln!(
        "records: newest of {damaged} entries decayed -> v4 refused ({refused}); after --erase-records v4 accepted"
    );
}

/// Flips one payload bit of the newest committed entry of the live record bank in a
/// device's flash image (flash that decayed: a committed entry whose check fails); returns
/// how many entries the bank held. The layout is agent-core's `records`: a 16-byte header
/// (magic, sequence, its complement), one seal unit, then entries (length u16, kind, payload,
/// an 8-byte check, padded to the 4-byte unit), each followed by its commit unit.
fn damage_record_entries(flash: &std::path::Path) -> usize {
    const RECORDS: usize = 0x2000;
    const BANK: usize = 0x1000;
    let mut image = std::fs::read(flash).expect("flash image");
    let word = |image: &[u8], at: usize| u32::from_le_bytes(image[at..at + 4].try_into().unwrap());
    let live = [RECORDS, RECORDS + BANK]
        .into_iter()
        .filter(|&b| &image[b..b + 8] == b"BATONRC2" && word(&image, b + 16) == 0)
        .max_by_key(|&b| word(&image, b + 8))
        .expect("a sealed record bank");
    let (mut at, mut newest, mut entries) = (live + 20, None, 0);
    while at + 2 <= live + BANK {
        let len = u16::from_le_bytes([image[at], image[at + 1]]) as usize;
        if len == 0xFFFF {
            break;
        }
        let size = (3 + len + 8).div_ceil(4) * 4;
        if at + size + 4 > live + BANK {
            break;
        }
        if word(&image, at + size) == 0 {
            newest = Some(at);
            entries += 1;
        }
        at += size + 4;
    }
    let newest = newest.expect("a committed record entry");
    image[newest + 3] ^= 0x01;
    std::fs::write(flash, &image).expect("write the flash image");
    entries
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

/// A flash operation a power cut of [`g_power_cut_at_chosen_flash_operations`] lands in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CutPoint {
    /// Mid-erase of a block of the old content (the new content's first operations).
    Erase,
    /// Mid-write of a chunk's data: half of its words written.
    ChunkWrite,
    /// Right after the first verified flag is written.
    FlagWrite,
}

/// Chunks of the contents the cut test pushes (64 KiB).
const CUT_CHUNKS: u32 = 16;
/// The chunk whose data write the cut tears.
const CUT_CHUNK: u32 = 5;

/// The content partition of a device's flash image, mounted by agent-core's own store
/// (the code the firmware runs) on the host.
fn mount_image(
    flash: &std::path::Path,
) -> baton_agent_core::flash::FlashStore<baton_agent_core::flash::testing::RamFlash<4, 4096>> {
    use baton_agent_core::flash::{FlashStore, testing::RamFlash};
    let image = std::fs::read(flash).expect("flash image");
    let mut ram = RamFlash::<4, 4096>::new(0);
    ram.mem = image[CONTENT_OFFSET..].to_vec();
    let mut store = FlashStore::new_multiwrite(ram);
    store.mount().expect("mount the flash image");
    store
}

/// The chunks a mounted image holds as verified, each checked: its proof must lead to the
/// manifest's root and its bytes must be `content`'s (a chunk marked verified that does not
/// is a violation, and fails the test).
fn verified_chunks(
    store: &mut baton_agent_core::flash::FlashStore<
        baton_agent_core::flash::testing::RamFlash<4, 4096>,
    >,
    content: &[u8],
) -> Vec<u32> {
    use baton_agent_core::store::ContentStore as _;
    let Some((root, chunks)) = store.held_manifest().map(|m| (m.root, m.chunks())) else {
        return Vec::new();
    };
    let mut held = Vec::new();
    for i in 0..chunks {
        if !store.is_verified(&root, i).expect("flag readable") {
            continue;
        }
        let mut data = vec![0u8; CHUNK];
        let mut proof = baton_protocol::merkle::Proof::new();
        let n = store
            .read_chunk(&root, i, &mut data, &mut proof)
            .expect("verified chunk readable");
        let leaf = baton_protocol::merkle::leaf_hash(&data[..n]);
        baton_protocol::merkle::verify_leaf(&root, chunks, i, &leaf, &proof)
            .unwrap_or_else(|e| panic!("chunk {i} is marked verified but its proof fails: {e:?}"));
        assert_eq!(
            &data[..n],
            &content[i as usize * CHUNK..i as usize * CHUNK + n],
            "chunk {i} is marked verified but does not hold the content pushed"
        );
        held.push(i);
    }
    held
}

/// (g) Power cut at chosen points of flash operations, exactly: the test stops the board
/// with a write watchpoint of QEMU's gdbstub at a word it picks from the device's flash
/// (the layout agent-core's store reads from the content header: mid-erase of an old
/// content's block, half-way through a chunk's data write, right after the first verified
/// flag), checks the image at that instant (the erase and the write really are torn), kills
/// QEMU there and boots the device again. Each time the device mounts exactly the chunks
/// the image held verified (each checked against its proof and the content), fetches only
/// the others, each once, completes the content and confirms.
#[test]
fn g_power_cut_at_chosen_flash_operations() {
    use baton_hil_tests::gdb::Gdb;
    let _one = one_at_a_time();
    let mut lab = Lab::new("cutpoints", 1);
    let m = lab.start_manager(&[]);
    let mut dev = lab.device(&m, 1, false, false, "hil-cut");
    let socket = lab.dir.join("fw-1.gdb");
    dev.gdb = Some(socket.clone());
    lab.boot(&mut dev);
    dev.wait_log("welcomed by the manager", BOUND);
    lab.wait_connected(&m, &[&dev.id]);

    let size = CUT_CHUNKS as usize * CHUNK;
    // A first content, not cut: every next content of its size takes its layout.
    let (file, _, _) = write_content(&lab, size);
    let job = lab.push(&m, &file, &[&dev.id]);
    participants_confirmed(&lab.wait_job(&m, job, BOUND), &[&dev.id]);
    let r = mount_image(&dev.flash)
        .regions()
        .expect("the device's flash holds the first content");
    assert_eq!(r.chunks, CUT_CHUNKS, "{r:?}");
    assert!(r.bitmap, "the firmware's flash allows bitmap flags: {r:?}");
    // Offsets in the partition. The erase point: mid-way into the third block, which
    // holds old chunk data (random, so its words are not 0xFFFF_FFFF before the erase).
    let erase_at = 2 * ERASE_BLOCK as u32 + ERASE_BLOCK as u32 / 2;
    assert!(erase_at >= r.data_at, "{r:?}");
    let slot = r.data_at + CUT_CHUNK * r.data_stride;
    let points = [
        (CutPoint::Erase, erase_at),
        (CutPoint::ChunkWrite, slot + r.data_stride / 2),
        (CutPoint::FlagWrite, r.flags_at),
    ];
    for (point, offset) in points {
        let addr = PSRAM_BASE + CONTENT_OFFSET as u32 + offset;
        let mut gdb = Gdb::attach(&socket, BOUND);
        gdb.watch_writes(addr, 4);
        gdb.resume();
        let (file, content, want) = write_content(&lab, size);
        let job = lab.push(&m, &file, &[&dev.id]);
        // The erase writes 0xFFFF_FFFF over the watched word first; for the other points
        // the board goes on to the first write of something else there. At each stop the
        // store that hit is completed (one step), so the word shows what it wrote.
        let mut stops = 0;
        loop {
            let reply = gdb.wait_stop(BOUND);
            stops += 1;
            assert!(reply.contains("watch"), "{point:?}: stopped for {reply:?}");
            gdb.unwatch_writes(addr, 4);
            gdb.step();
            let word = gdb.read_word(addr);
            if point == CutPoint::Erase || word != 0xFFFF_FFFF {
                break;
            }
            assert!(
                stops < 8,
                "{point:?}: {stops} stops without a write that is not an erase"
            );
            gdb.watch_writes(addr, 4);
            gdb.resume();
        }
        lab.power_cut(&mut dev);
        drop(gdb);

        // The image at the instant of the cut.
        let image = std::fs::read(&dev.flash).expect("flash image");
        let word_at = |off: u32| {
            let a = CONTENT_OFFSET + off as usize;
            u32::from_le_bytes(image[a..a + 4].try_into().expect("a word"))
        };
        let mut store = mount_image(&dev.flash);
        let held = verified_chunks(&mut store, &content);
        match point {
            CutPoint::Erase => {
                assert_eq!(
                    word_at(erase_at),
                    0xFFFF_FFFF,
                    "the watched word was erased"
                );
                assert_ne!(
                    word_at(erase_at + 1024),
                    0xFFFF_FFFF,
                    "the cut must land mid-erase: the block's later words still hold old data"
                );
                assert!(
                    store.held_manifest().is_none(),
                    "the old content must be void before any of its blocks is erased"
                );
            }
            CutPoint::ChunkWrite => {
                let c = CUT_CHUNK as usize * CHUNK;
                let first = u32::from_le_bytes(content[c..c + 4].try_into().expect("a word"));
                assert_eq!(word_at(slot), first, "the chunk's first word was written");
                assert_eq!(
                    word_at(slot + r.data_stride - 4),
                    0xFFFF_FFFF,
                    "the cut must tear the chunk's write: its last word is still erased"
                );
                assert!(!held.contains(&CUT_CHUNK), "a torn chunk is never verified");
            }
            CutPoint::FlagWrite => {
                assert_eq!(
                    held.len(),
                    1,
                    "the cut follows the first flag written: one chunk verified, {held:?}"
                );
            }
        }
        drop(store);

        lab.boot(&mut dev);
        let line = dev.wait_log(" complete sha256=", Duration::from_secs(60));
        let after = dev.log();
        let c = completion(&line).expect("completion line");
        assert_eq!(
            c.sha256, want,
            "{point:?}: content read back from flash: {line}"
        );
        participants_confirmed(&lab.wait_job(&m, job, BOUND), &[&dev.id]);
        // Mounted at boot: exactly what the image held verified.
        let mounted = after
            .lines()
            .find(|l| l.contains("flash content: ") || l.contains("flash holds no content"))
            .unwrap_or_else(|| panic!("no flash mount line after the cut:\n{after}"));
        if held.is_empty() {
            assert!(
                mounted.contains("holds no content") || mounted.contains("flash content: 0 of"),
                "{point:?}: {mounted}"
            );
        } else {
            assert!(
                mounted.contains(&format!("flash content: {} of {CUT_CHUNKS}", held.len())),
                "{point:?}: the image held {held:?} verified; the device mounted: {mounted}"
            );
        }
        // After the reboot: every chunk not held, once; none of those held.
        let stored = stored_chunks(&after);
        let mut unique = stored.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(
            unique.len(),
            stored.len(),
            "{point:?}: a chunk stored twice: {stored:?}"
        );
        assert!(
            stored.iter().all(|k| !held.contains(k)),
            "{point:?}: a chunk held verified was fetched again: held {held:?}, stored {stored:?}"
        );
        assert_eq!(
            stored.len() as u32 + held.len() as u32,
            CUT_CHUNKS,
            "{point:?}: {stored:?}"
        );
        eprintln!(
            "power cut at {point:?} (offset {offset:#x}, {stops} watchpoint stops): {} chunks held verified at the cut, {} fetched after the reboot, sha256 ok",
            held.len(),
            stored.len()
        );
    }
}
