//! Hardware-in-the-loop tests of the A/B firmware: a QEMU device that boots embassy-boot's
//! bootloader at `0x0`, runs the application from ACTIVE in its file-backed PSRAM and
//! updates itself with content named `firmware` relayed by the manager (see
//! `agent-firmware/README.md`, "A/B firmware").
//!
//! Run after `scripts/build-firmware.sh` (it builds the A/B application and the
//! bootloader), as root: `cargo test -p baton-hil-tests --release --test ab`. Images A, B
//! and C come from the one A/B build; the provisioning tool patches their header (version,
//! the never-confirm test flag).

use std::time::{Duration, Instant};

use baton_hil_tests::*;
use serde_json::Value;

/// ACTIVE's offset in the flash file and its size (`agent-firmware/src/board/mps2_an385/psram.rs`).
const ACTIVE: (usize, usize) = (0xF0_0000, 128 * 1024);
/// DFU's offset in the flash file and its size (ACTIVE's and the swap's spare page).
const DFU: (usize, usize) = (ACTIVE.0 + ACTIVE.1, ACTIVE.1 + ERASE_BLOCK);
/// Erase pages in ACTIVE: a swap has twice as many steps, one progress word each.
const PAGES: u32 = (ACTIVE.1 / ERASE_BLOCK) as u32;

/// The participant `id`'s entry of a job's detail.
fn participant<'a>(detail: &'a Value, id: &str) -> &'a Value {
    detail["participants"]
        .as_array()
        .expect("participants")
        .iter()
        .find(|p| p["agent"] == id)
        .unwrap_or_else(|| panic!("{id} is not a participant: {detail:#}"))
}

/// Asserts `id` confirmed the job's content and its install ended in `state`.
fn assert_install(detail: &Value, id: &str, state: &str) {
    let p = participant(detail, id);
    assert_eq!(p["state"], "confirmed", "{id} did not confirm: {detail:#}");
    assert_eq!(
        p["install"]["state"], state,
        "{id}'s install did not end {state}: {detail:#}"
    );
}

/// Asserts ACTIVE in the device's flash file holds `image` (erased after it).
fn assert_active_holds(dev: &Device, image: &[u8], what: &str) {
    let flash = std::fs::read(&dev.flash).expect("flash image");
    let active = &flash[ACTIVE.0..ACTIVE.0 + ACTIVE.1];
    assert!(
        active[..image.len()] == *image,
        "ACTIVE does not hold {what}"
    );
    assert!(
        active[image.len()..].iter().all(|&b| b == 0xFF),
        "ACTIVE holds more than {what}"
    );
}

/// Waits until the manager lists `firmware` v`version` running on `id` (`baton agents`, from
/// the device's `Running` message).
fn wait_running(lab: &Lab, m: &ManagerInfo, id: &str, version: u64) {
    let dir = m.data_dir.to_string_lossy().into_owned();
    wait_for(
        &format!("{id} reported firmware v{version} running"),
        BOUND,
        || lab.baton(&["agents", "--json", "--data-dir", &dir]),
        || {
            let list: Value =
                serde_json::from_str(&lab.baton(&["agents", "--json", "--data-dir", &dir])).ok()?;
            let agent = list.as_array()?.iter().find(|a| a["id"] == id)?;
            agent["running"]
                .as_array()?
                .iter()
                .any(|r| r["name"] == "firmware" && r["version"].as_u64() == Some(version))
                .then_some(())
        },
    );
}

/// Pushes `image` as content `firmware` at `version` to `dev` and waits for the job's end.
fn update(
    lab: &mut Lab,
    m: &ManagerInfo,
    dev: &Device,
    image: &std::path::Path,
    version: u64,
) -> (u64, Value) {
    let job = lab.push_as(m, image, &[&dev.id], "firmware", version);
    let detail = lab.wait_job(m, job, Duration::from_secs(90));
    (job, detail)
}

/// First, plain content (another name) runs as delivered on an A/B device.
/// (e) A device updates from image A to image B through the relay: the image arrives as
/// verified content, goes into DFU (checked again as read back), the bootloader swaps it in,
/// and B marks itself booted only after the manager welcomed it; the job shows B running.
/// (f) Then image C, which never confirms (it hangs after the welcome, with interrupts
/// masked; the manager lists v3 running during its trial): the watchdog resets the board,
/// the bootloader reverts to B, B reports the job rolled back and runs on. Last, an image
/// whose header version is not the signed manifest's, and C again (a version rolled back
/// before), are refused before the swap is requested: the jobs show failed, no reset.
#[test]
fn ab_e_update_a_to_b_and_f_revert_an_image_that_never_confirms() {
    let _one = one_at_a_time();
    let mut lab = Lab::new("ab-update", 1);
    let m = lab.start_manager(&[]);
    let mut dev = lab.device_ab(&m, 1, "hil-ab");
    lab.boot(&mut dev);
    dev.wait_log("welcomed by the manager", BOUND);
    lab.wait_connected(&m, &[&dev.id]);
    wait_running(&lab, &m, &dev.id, 1);
    assert!(
        dev.log().contains("image v1 (Normal)"),
        "image A boots normally:\n{}",
        dev.log()
    );

    // Content with another name has no install step: running as soon as it is complete.
    let data = lab.dir.join("data.bin");
    std::fs::write(&data, random_bytes(16 * 1024)).expect("content file");
    let job = lab.push_as(&m, &data, &[&dev.id], "site-data", 1);
    let detail = lab.wait_job(&m, job, BOUND);
    assert_install(&detail, &dev.id, "running");

    // (e) A → B.
    let b = lab.ab_image(2, false);
    let b_bytes = std::fs::read(&b).expect("image B");
    let t = Instant::now();
    let (job_b, detail) = update(&mut lab, &m, &dev, &b, 2);
    let took_b = t.elapsed();
    assert_install(&detail, &dev.id, "running");
    let log = dev.log();
    for line in [
        "image v2 in DFU, verified, marked for update",
        "baton-boot: state swap",
        "baton-boot: swapped; trial boot of the update",
        "image v2 (Trial)",
        "image v2 confirmed: marked booted",
    ] {
        assert!(
            log.contains(line),
            "(e) no {line:?} in the log:\n{}",
            tail(&log, 60)
        );
    }
    assert_active_holds(&dev, &b_bytes, "image B");
    wait_running(&lab, &m, &dev.id, 2);
    let swap_steps = log.matches("baton-boot: erase ").count();
    assert_eq!(
        swap_steps,
        2 * PAGES as usize,
        "one erase per swap step:\n{log}"
    );
    eprintln!(
        "(e) A -> B: job {job_b} running after {:.1} s ({} bytes, swap of {swap_steps} page steps)",
        took_b.as_secs_f64(),
        b_bytes.len()
    );

    // (f) B → C, which never confirms: reverted to B.
    let c = lab.ab_image(3, true);
    let t = Instant::now();
    let job_c = lab.push_as(&m, &c, &[&dev.id], "firmware", 3);
    // C's trial reports v3 (its `Running` follows its `Report`) before it hangs: the manager
    // lists v3, so the v2 it lists after the revert is B's new report, not the old entry.
    dev.wait_log("test image v3: never confirming", Duration::from_secs(90));
    wait_running(&lab, &m, &dev.id, 3);
    let detail = lab.wait_job(&m, job_c, Duration::from_secs(90));
    let took_c = t.elapsed();
    assert_install(&detail, &dev.id, "rolled_back");
    let log = dev.log();
    for line in [
        "image v3 (Trial)",
        "test image v3: never confirming",
        "watchdog expired",
        "baton-boot: reverted to the previous image",
        "image v2 (RolledBack)",
        "rolled back: image v2 runs again",
    ] {
        assert!(
            log.contains(line),
            "(f) no {line:?} in the log:\n{}",
            tail(&log, 80)
        );
    }
    assert_active_holds(&dev, &b_bytes, "image B again");
    // B runs on: the manager keeps its session and B does not reset again.
    dev.wait_log_nth("welcomed by the manager", 4, BOUND);
    lab.wait_connected(&m, &[&dev.id]);
    wait_running(&lab, &m, &dev.id, 2);
    eprintln!(
        "(f) B -> C (never confirms): job {job_c} rolled back after {:.1} s, B runs again",
        took_c.as_secs_f64()
    );
    // Neither refusal below resets the board or ends the session.
    let welcomes = dev.count_log("welcomed by the manager");
    let boots = dev.count_log("baton-boot: state ");
    // The rolled-back C again (the same signed content, which the device still holds, so the
    // job completes at once; agent-core takes the same version and root again): refused, no
    // install-and-revert loop. (First: after v4 below agent-core itself refuses v3.)
    let (job_c2, detail) = update(&mut lab, &m, &dev, &c, 3);
    assert_install(&detail, &dev.id, "failed");
    dev.wait_log("image v3 refused: rolled back before", BOUND);
    // An image whose header does not carry the signed manifest's version (image B published
    // as version 4) is refused before any swap is asked for: failed, B runs on.
    let (job_d, detail) = update(&mut lab, &m, &dev, &b, 4);
    assert_install(&detail, &dev.id, "failed");
    dev.wait_log("image v4 refused: not installed", BOUND);
    let log = dev.log();
    assert_eq!(
        dev.count_log("baton-boot: state "),
        boots,
        "no reset:\n{}",
        tail(&log, 30)
    );
    assert_eq!(
        dev.count_log("welcomed by the manager"),
        welcomes,
        "no new session"
    );
    assert_active_holds(&dev, &b_bytes, "image B still");
    eprintln!(
        "(f') rolled-back C again: job {job_c2} failed; image B published as v4: job {job_d} failed; both before any swap, B runs on"
    );

    // Every boot's footprint (one second after boot, and after each job) fits 64 KiB.
    let prints: Vec<Footprint> = log
        .lines()
        .filter(|l| l.contains("footprint: "))
        .filter_map(footprint)
        .collect();
    assert!(prints.len() >= 3, "footprints logged:\n{}", tail(&log, 80));
    let peak = prints.iter().map(|f| f.stack_peak).max().unwrap_or(0);
    for f in &prints {
        assert!(
            f.stack_peak < f.stack_size && f.data + f.bss + f.stack_size <= 64 * 1024,
            "{f:?} does not fit 64 KiB of RAM"
        );
    }
    eprintln!(
        "(e, f) A/B build: static {} + stack region {} bytes of RAM, deepest stack {peak} over {} footprint lines",
        prints[0].data + prints[0].bss,
        prints[0].stack_size,
        prints.len()
    );
}

/// (g) Power cuts (SIGKILL of QEMU) in the middle of the bootloader's swap, at steps chosen
/// from its log (each step erases one page, logged as `baton-boot: erase ACTIVE|DFU page N`,
/// then copies it and writes one progress word to STATE): QEMU's gdbstub stops the board
/// right after step K's progress word is written, QEMU is killed there, and the device
/// boots again from what the flash file holds. Each time the bootloader resumes the swap
/// where its progress says and the device boots a whole image: after a cut inside the swap
/// the update boots, confirms and runs (ACTIVE holds it); after a cut right after the last
/// step the swap is complete but the update never ran, which embassy-boot cannot tell from
/// an update that ran and never confirmed: it reverts, and the job shows rolled back
/// (ACTIVE holds the previous image again).
#[test]
fn ab_g_power_cuts_during_the_swap() {
    use baton_hil_tests::gdb::Gdb;
    let _one = one_at_a_time();
    let mut lab = Lab::new("ab-cut", 1);
    let m = lab.start_manager(&[]);
    let mut dev = lab.device_ab(&m, 1, "hil-ab");
    let socket = lab.dir.join("fw-1.gdb");
    // First step, the middle of the swap (ACTIVE half new, half old), the last step.
    let cuts = [0, PAGES - 1, 2 * PAGES - 1];
    let mut running =
        std::fs::read(&dev.flash).expect("flash image")[ACTIVE.0..ACTIVE.0 + ACTIVE.1].to_vec();
    while running.last() == Some(&0xFF) {
        running.pop();
    }
    for (i, step) in cuts.into_iter().enumerate() {
        let version = 2 + i as u32;
        dev.gdb = Some(socket.clone());
        lab.boot(&mut dev);
        dev.wait_log("welcomed by the manager", BOUND);
        lab.wait_connected(&m, &[&dev.id]);
        let addr = PSRAM_BASE + (STATE_OFFSET + 4 * (2 + step as usize)) as u32;
        let mut gdb = Gdb::attach(&socket, BOUND);
        gdb.watch_writes(addr, 4);
        gdb.resume();
        let image = lab.ab_image(version, false);
        let bytes = std::fs::read(&image).expect("image");
        let t = Instant::now();
        let job = lab.push_as(&m, &image, &[&dev.id], "firmware", version.into());
        // The app's erase of STATE (marking the update) writes 0xFFFF_FFFF there first.
        let mut stops = 0;
        loop {
            let reply = gdb.wait_stop(Duration::from_secs(60));
            stops += 1;
            assert!(
                reply.contains("watch"),
                "step {step}: stopped for {reply:?}"
            );
            gdb.unwatch_writes(addr, 4);
            gdb.step();
            if gdb.read_word(addr) != 0xFFFF_FFFF {
                break;
            }
            assert!(
                stops < 8,
                "step {step}: {stops} stops, no progress word written"
            );
            gdb.watch_writes(addr, 4);
            gdb.resume();
        }
        lab.power_cut(&mut dev);
        drop(gdb);
        // The cut lands after the (step+1)th erase the bootloader logged in this swap.
        let log = dev.log();
        let swap = log
            .rfind("baton-boot: state swap")
            .unwrap_or_else(|| panic!("step {step}: no swap started:\n{}", tail(&log, 40)));
        let erases: Vec<&str> = log[swap..]
            .lines()
            .filter(|l| l.contains("baton-boot: erase "))
            .collect();
        assert_eq!(
            erases.len(),
            step as usize + 1,
            "step {step}: the log shows the swap's steps up to the cut: {erases:?}"
        );
        let last = erases.last().copied().unwrap_or_default().to_string();

        dev.gdb = None;
        lab.boot(&mut dev);
        let line = dev.wait_log("baton-boot: starting the application", BOUND);
        let completed = step == 2 * PAGES - 1;
        let outcome = if completed {
            // Swap complete at the cut: the next boot finds it swapped and unconfirmed.
            dev.wait_log("rolled back: image v", Duration::from_secs(60));
            let detail = lab.wait_job(&m, job, Duration::from_secs(60));
            assert_install(&detail, &dev.id, "rolled_back");
            assert_active_holds(&dev, &running, "the previous image");
            assert_eq!(
                dev.count_log("baton-boot: erase "),
                2 * PAGES as usize,
                "step {step}: a whole revert"
            );
            "reverted to the previous image, job rolled back"
        } else {
            let confirmed = format!("image v{version} confirmed: marked booted");
            dev.wait_log(&confirmed, Duration::from_secs(60));
            let detail = lab.wait_job(&m, job, Duration::from_secs(60));
            assert_install(&detail, &dev.id, "running");
            assert_active_holds(&dev, &bytes, &format!("image v{version}"));
            assert_eq!(
                dev.count_log("baton-boot: erase "),
                2 * PAGES as usize - step as usize - 1,
                "step {step}: the bootloader redid only the steps after the cut"
            );
            running = bytes;
            "swap resumed, update confirmed, job running"
        };
        eprintln!(
            "(g) cut after swap step {step} ({last}; {stops} watchpoint stops): {line}; {outcome}, {:.1} s after the push",
            t.elapsed().as_secs_f64()
        );
        lab.power_cut(&mut dev);
    }
}

/// A fault resets the board in the A/B build (instead of ending QEMU), and ACTIVE is
/// read-only under the MPU: an A/B device provisioned with the code-write fault demo writes
/// to its own reset handler in ACTIVE, faults at that address, logs it, resets, and the
/// bootloader starts it again.
#[test]
fn ab_h_a_fault_resets_the_board_and_active_is_read_only() {
    let _one = one_at_a_time();
    let mut lab = Lab::new("ab-fault", 1);
    let m = lab.start_manager(&[]);
    let mut dev = lab.device_ab(&m, 1, "hil-ab");
    let flash = dev.flash.to_string_lossy().into_owned();
    let out = lab.run(
        &lab.env.provision,
        &["--flash", &flash, "--fault-demo", "code-write"],
        BOUND,
    );
    assert!(out.success, "{}", out.stderr);
    let t = Instant::now();
    lab.boot(&mut dev);
    let fault = dev.wait_log("MemManage fault at 0x21f", BOUND);
    dev.wait_log("resetting the board", BOUND);
    dev.wait_log_nth("baton-boot: starting the application", 2, BOUND);
    dev.wait_log_nth("MemManage fault at 0x21f", 2, BOUND);
    eprintln!(
        "(h) A/B fault demo: {fault}; reset and started again by the bootloader within {:.1} s",
        t.elapsed().as_secs_f64()
    );
}

/// An image older than the one that runs is refused before DFU is touched, although
/// agent-core holds no version record for `firmware` yet (a new device, or one whose records
/// were erased): image A runs as v5, a signed v3 ends failed ("downgrade"), the board does
/// not reset and DFU is not written. The version that runs, pushed again, reports running
/// at once, without a swap.
#[test]
fn ab_i_an_older_image_is_refused() {
    let _one = one_at_a_time();
    let mut lab = Lab::new("ab-downgrade", 1);
    let m = lab.start_manager(&[]);
    let mut dev = lab.device_ab(&m, 1, "hil-ab");
    let (flash, elf) = (
        dev.flash.to_string_lossy().into_owned(),
        lab.env.firmware_ab.to_string_lossy().into_owned(),
    );
    let out = lab.run(
        &lab.env.provision,
        &["--flash", &flash, "--image", &elf, "--image-version", "5"],
        BOUND,
    );
    assert!(out.success, "image A as v5: {}", out.stderr);
    lab.boot(&mut dev);
    dev.wait_log("welcomed by the manager", BOUND);
    lab.wait_connected(&m, &[&dev.id]);
    wait_running(&lab, &m, &dev.id, 5);
    let dfu = |dev: &Device| {
        std::fs::read(&dev.flash).expect("flash image")[DFU.0..DFU.0 + DFU.1].to_vec()
    };
    let dfu_before = dfu(&dev);

    let t = Instant::now();
    let older = lab.ab_image(3, false);
    let (job, detail) = update(&mut lab, &m, &dev, &older, 3);
    assert_install(&detail, &dev.id, "failed");
    dev.wait_log("image v3 refused: downgrade", BOUND);
    let took = t.elapsed();
    let same = lab.ab_image(5, false);
    let (job_same, detail) = update(&mut lab, &m, &dev, &same, 5);
    assert_install(&detail, &dev.id, "running");
    let log = dev.log();
    assert_eq!(
        dev.count_log("baton-boot: state "),
        1,
        "no reset:\n{}",
        tail(&log, 40)
    );
    assert!(
        !log.contains("marked for update"),
        "no swap asked for:\n{}",
        tail(&log, 40)
    );
    assert_eq!(
        dev.count_log("welcomed by the manager"),
        1,
        "no new session"
    );
    assert!(dfu(&dev) == dfu_before, "DFU untouched");
    eprintln!(
        "(i) v5 runs: v3 refused as a downgrade (job {job} failed after {:.1} s, no reset, DFU untouched); v5 again: job {job_same} running without a swap",
        took.as_secs_f64()
    );
}

/// Puts `image` into DFU of `dev`'s flash file and sets embassy-boot's STATE to swap (magic
/// `0xF0`, progress erased), as if the application had asked for the swap.
fn stage_swap(dev: &Device, image: &[u8]) {
    let mut flash = std::fs::read(&dev.flash).expect("flash image");
    flash[DFU.0..DFU.0 + DFU.1].fill(0xFF);
    flash[DFU.0..DFU.0 + image.len()].copy_from_slice(image);
    flash[STATE_OFFSET..STATE_OFFSET + ERASE_BLOCK].fill(0xFF);
    flash[STATE_OFFSET..STATE_OFFSET + 4].fill(0xF0);
    std::fs::write(&dev.flash, flash).expect("write the flash image");
}

/// The bootloader's side of a trial: an update swapped in that has no vector table, or that
/// hangs before its own start-up (before the application starts the watchdog), is reset —
/// at once by the bootloader, or by the watchdog it started before the jump — and the next
/// boot reverts it: image A runs again. The update is staged directly in the flash file
/// (DFU, STATE = swap): the application would never ask for a swap of such an image, it
/// checks DFU the same way.
#[test]
fn ab_j_a_trial_without_vector_table_or_hanging_early_is_reverted() {
    let _one = one_at_a_time();
    let mut lab = Lab::new("ab-boot", 1);
    let m = lab.start_manager(&[]);
    let mut dev = lab.device_ab(&m, 1, "hil-ab");
    let mut a =
        std::fs::read(&dev.flash).expect("flash image")[ACTIVE.0..ACTIVE.0 + ACTIVE.1].to_vec();
    while a.last() == Some(&0xFF) {
        a.pop();
    }
    let b = std::fs::read(lab.ab_image(2, false)).expect("image B");

    // No vector table (stack pointer and reset vector zero).
    let mut bad = b.clone();
    bad[..8].fill(0);
    stage_swap(&dev, &bad);
    let t = Instant::now();
    lab.boot(&mut dev);
    dev.wait_log("baton-boot: resetting to revert the update", BOUND);
    dev.wait_log("baton-boot: reverted to the previous image", BOUND);
    dev.wait_log("rolled back: image v1 runs again", BOUND);
    let took_bad = t.elapsed();
    assert!(
        !dev.log().contains("image v2 ("),
        "the update never started"
    );
    assert_active_holds(&dev, &a, "image A again");
    lab.power_cut(&mut dev);

    // A reset vector that points at `b .` (an endless loop) right after the image's code.
    let mut hang = b.clone();
    let at = hang.len().next_multiple_of(4);
    hang.resize(at + 4, 0xFF);
    hang[at..at + 2].copy_from_slice(&[0xFE, 0xE7]);
    let reset = (PSRAM_BASE + ACTIVE.0 as u32 + at as u32) | 1;
    hang[4..8].copy_from_slice(&reset.to_le_bytes());
    stage_swap(&dev, &hang);
    let t = Instant::now();
    lab.boot(&mut dev);
    dev.wait_log("baton-boot: swapped; trial boot of the update", BOUND);
    dev.wait_log("baton-boot: reverted to the previous image", BOUND);
    dev.wait_log("rolled back: image v1 runs again", BOUND);
    let took_hang = t.elapsed();
    let log = dev.log();
    assert!(
        !log.contains("image v2 ("),
        "the update never started:\n{log}"
    );
    assert_active_holds(&dev, &a, "image A again");
    eprintln!(
        "(j) trial without a vector table: reset by the bootloader, reverted, A runs after {:.1} s; trial hanging before its start-up: reset by the watchdog, reverted, A runs after {:.1} s",
        took_bad.as_secs_f64(),
        took_hang.as_secs_f64()
    );
}
