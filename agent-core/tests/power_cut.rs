//! A power cut at every flash operation of a complete job, and of a run of record writes.
//!
//! The device is a content partition and a record area on one [`Power`] supply
//! ([`FaultFlash`], 4-byte words and 4 KiB erase blocks as on the firmware's flash). A job
//! replaces content version 1 with version 2 the way the agent does it: the version record
//! first, then the content opened (erase, header) and its chunks stored (data, proof, flag).
//! The uninterrupted job counts its flash operations, N. Then for every k < N, and for each
//! kind of cut (clean, torn in address order, torn anywhere), the job runs from the same
//! start until the power fails at operation k, the device "reboots" (a new store mounted
//! over the same cells), and the checks are:
//!
//! - every chunk the reopened store reports as verified reads back byte-identical to the
//!   content and verifies against the Merkle root, and the report's count is that set;
//! - no chunk whose write had finished is lost, and at most the one chunk being written at
//!   the cut is fetched again (the store writes one chunk at a time, flag last);
//! - the records read as before or after the write under way, never damaged or absent;
//! - resuming (fetching what the store says is missing) completes the content,
//!   byte-identical, and it is still complete after a further reboot.
//!
//! The record test does the same for a run of record writes through two compactions.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::Instant;

use baton_agent_core::flash::FlashStore;
use baton_agent_core::flash::testing::{Cut, FaultFlash, Power};
use baton_agent_core::records::RecordLog;
use baton_agent_core::store::{ContentStore, StoreError, StoredAnchor, VersionRecord};
use baton_protocol::identity::Identity;
use baton_protocol::merkle::{self, MerkleTree, Proof, leaf_hash};
use baton_protocol::trust::TrustAnchor;
use baton_protocol::{Manifest, PublicKey};

/// The firmware's flash geometry: 4-byte write words, 4 KiB erase blocks.
type Flash = FaultFlash<4, 4096>;
type Store = FlashStore<Flash, Flash>;

const CUTS: [Cut; 3] = [Cut::Clean, Cut::TornInOrder, Cut::TornScattered];
/// Chunks of the job's content (the last one short, so tail writes are covered).
const CHUNKS: u32 = 64;
/// The smallest chunk size a manifest allows: keeps the test quick.
const CHUNK: u32 = 256;
/// Bytes of the record area: two banks of one erase block, as on the firmware.
const RECORDS: usize = 2 * 4096;
/// The second cut of a double cut falls in the first this many operations after the reboot.
const RECOVERY_OPS: usize = 16;

/// One version of the content: its bytes, Merkle tree and signed manifest.
struct Content {
    data: Vec<u8>,
    tree: MerkleTree,
    manifest: Manifest,
}

impl Content {
    fn new(version: u64) -> Content {
        let len = (CHUNKS - 1) as usize * CHUNK as usize + 100;
        let data: Vec<u8> = (0..len)
            .map(|i| (i as u64 * 31 + version * 101 + (i as u64 >> 8)) as u8)
            .collect();
        let tree = MerkleTree::from_leaves(data.chunks(CHUNK as usize).map(leaf_hash).collect());
        let manifest = Manifest::sign(
            &Identity::from_seed([9; 32]),
            heapless::String::try_from("fw").unwrap(),
            version,
            0,
            len as u64,
            CHUNK,
            tree.root(),
        );
        Content {
            data,
            tree,
            manifest,
        }
    }

    fn chunk(&self, i: u32) -> &[u8] {
        let start = (i * CHUNK) as usize;
        &self.data[start..(start + CHUNK as usize).min(self.data.len())]
    }

    fn record(&self) -> VersionRecord {
        VersionRecord {
            version: self.manifest.version,
            root: self.manifest.root,
        }
    }
}

fn anchor(version: u64) -> StoredAnchor {
    let mut a = TrustAnchor::pinned(&[PublicKey([7; 32]), PublicKey([8; 32])], 2).unwrap();
    a.version = version;
    a.digest = [version as u8; 32];
    StoredAnchor {
        pin: [1; 32],
        anchor: a,
    }
}

/// The cells of both flash areas: what survives a power cut.
#[derive(Clone)]
struct Cells {
    content: Vec<u8>,
    records: Vec<u8>,
    /// Whether the content flash allows a unit to be written more than once (bitmap flags);
    /// otherwise it refuses that (unit flags and spare slots).
    multiwrite: bool,
}

/// A device booted over `cells` on `power` (its content store mounted).
fn boot(cells: &Cells, power: &Rc<RefCell<Power>>) -> Store {
    power.borrow_mut().restore();
    let mut content = Flash::new(0, power.clone());
    content.mem = cells.content.clone();
    content.strict = !cells.multiwrite;
    let mut records = Flash::new(0, power.clone());
    records.mem = cells.records.clone();
    // The record log never writes a unit twice: strict flash checks that.
    records.strict = true;
    let store = if cells.multiwrite {
        FlashStore::new_multiwrite(content)
    } else {
        FlashStore::new(content)
    };
    let mut store = store.with_records(records);
    store.mount().expect("mount after power is back");
    store
}

fn cells_of(store: Store) -> Cells {
    let (content, records) = store.into_parts();
    Cells {
        multiwrite: !content.strict,
        content: content.mem,
        records: records.unwrap().mem,
    }
}

/// What a job had done when it stopped.
#[derive(Default)]
struct Progress {
    /// Chunks whose `write_chunk` returned `Ok`.
    done: Vec<u32>,
    /// The chunk whose write was under way when the job stopped.
    in_flight: Option<u32>,
}

/// The job as the agent runs it: version record, open, then every missing chunk (each
/// checked against the root first, as the agent verifies before it stores).
fn run_job(store: &mut Store, c: &Content, p: &mut Progress) -> Result<(), StoreError> {
    let want = c.record();
    if store.version_record("fw")? != Some(want) {
        store.put_version_record("fw", &want)?;
    }
    store.open(&c.manifest)?;
    let root = c.manifest.root;
    for i in 0..CHUNKS {
        if store.is_verified(&root, i)? {
            continue;
        }
        let proof = c.tree.proof(i).unwrap();
        merkle::verify_leaf(&root, CHUNKS, i, &leaf_hash(c.chunk(i)), &proof).unwrap();
        p.in_flight = Some(i);
        store.write_chunk(&root, i, c.chunk(i), &proof)?;
        p.in_flight = None;
        p.done.push(i);
    }
    Ok(())
}

/// The chunks the store reports as verified for whichever version it holds, each checked
/// (byte-identical, verifies against the root); problems go to `bad`.
fn held_chunks(store: &mut Store, versions: [&Content; 2], bad: &mut Vec<String>) -> Vec<u32> {
    let Some(m) = store.held_manifest().cloned() else {
        return Vec::new();
    };
    let Some(c) = versions.iter().find(|c| c.manifest == m) else {
        bad.push("mounted a manifest that was never written".into());
        return Vec::new();
    };
    let root = m.root;
    let mut held = Vec::new();
    let mut buf = vec![0u8; CHUNK as usize];
    let mut proof = Proof::new();
    for i in 0..CHUNKS {
        if !store.is_verified(&root, i).unwrap() {
            continue;
        }
        held.push(i);
        match store.read_chunk(&root, i, &mut buf, &mut proof) {
            Ok(n) => {
                let leaf = leaf_hash(&buf[..n]);
                if &buf[..n] != c.chunk(i)
                    || merkle::verify_leaf(&root, CHUNKS, i, &leaf, &proof).is_err()
                {
                    bad.push(format!(
                        "v{} chunk {i} reported held but does not verify",
                        m.version
                    ));
                }
            }
            Err(e) => bad.push(format!(
                "v{} chunk {i} reported held, read: {e:?}",
                m.version
            )),
        }
    }
    let reported = store.held(0).map(|h| h.verified);
    if reported != Some(held.len() as u32) {
        bad.push(format!(
            "report says {reported:?} verified, flags say {}",
            held.len()
        ));
    }
    held
}

/// Cell state of the device before the job: version 1 complete, records written, and the
/// record bank so full that the job's version record compacts it.
fn device_before_job(power: &Rc<RefCell<Power>>, v1: &Content, multiwrite: bool) -> Cells {
    let size = Store::required_size(&v1.manifest, multiwrite) as usize;
    let cells = Cells {
        content: vec![0xFF; size],
        records: vec![0xFF; RECORDS],
        multiwrite,
    };
    let mut store = boot(&cells, power);
    store.save_anchor(&anchor(3)).unwrap();
    store.put_version_record("fw", &v1.record()).unwrap();
    let mut p = Progress::default();
    run_job(&mut store, v1, &mut p).unwrap();
    // Time records until the next one would compact (seen as an erase): undo that one.
    let mut cells = cells_of(store);
    for t in 0..1_000u64 {
        let mut store = boot(&cells, power);
        let erases_before = power.borrow().erases.len();
        store.save_latest_time(1_000 + t).unwrap();
        if power.borrow().erases.len() > erases_before {
            return cells;
        }
        cells = cells_of(store);
    }
    panic!("the record bank never filled");
}

/// The job's fixed parts: the two versions, the device before the job, the time record.
struct Job {
    power: Rc<RefCell<Power>>,
    v1: Content,
    v2: Content,
    start: Cells,
    last_time: Option<u64>,
}

/// Figures summed over the cut points.
#[derive(Default)]
struct Tally {
    held_at_reboot: usize,
    fetched_again: usize,
}

/// One power cut: at which operation (counted from the boot), what it does to it, and for a
/// torn erase which of its blocks is left partly erased (`None`: one at random).
#[derive(Clone, Copy, Debug)]
struct CutAt {
    op: usize,
    cut: Cut,
    torn_block: Option<usize>,
}

/// Runs the job from the start until the power fails at `cuts[0]`, reboots and checks;
/// resumes until it fails at `cuts[1]` (if any), reboots and checks, and so on; then resumes
/// without a cut and checks that the content is complete. Returns the violations found.
fn cut_run(job: &Job, cuts: &[CutAt], t: &mut Tally) -> Vec<String> {
    let (power, v1, v2) = (&job.power, &job.v1, &job.v2);
    let mut violations = Vec::new();
    let mut cells = job.start.clone();
    // Every chunk write started, in order; the ones cut short; the ones finished.
    let mut attempts: Vec<u32> = Vec::new();
    let mut in_flight: Vec<u32> = Vec::new();
    let mut done: Vec<u32> = Vec::new();
    for (phase, c) in cuts.iter().enumerate() {
        let mut store = boot(&cells, power);
        {
            let mut pw = power.borrow_mut();
            pw.cut_at = Some((c.op, c.cut));
            pw.torn_block = c.torn_block;
            pw.seed = (c.op as u64 + 1) * 0x9E37_79B9
                + c.cut as u64
                + 64 * c.torn_block.unwrap_or(0) as u64
                + 4096 * phase as u64;
        }
        let mut p = Progress::default();
        // The first cut falls inside the job (its operations were counted); a later one may
        // fall after the recovery finished.
        if (run_job(&mut store, v2, &mut p).is_ok() || !power.borrow().off) && phase == 0 {
            violations.push(format!("{c:?}: the job did not reach the cut"));
        }
        attempts.extend(p.done.iter().chain(&p.in_flight));
        done.extend(&p.done);
        in_flight.extend(p.in_flight);
        // Reboot.
        cells = cells_of(store);
        let mut store = boot(&cells, power);
        let held = held_chunks(&mut store, [v1, v2], &mut violations);
        let mounted = store.held_manifest().map(|m| m.version);
        let record = store.version_record("fw");
        if record != Ok(Some(v1.record())) && record != Ok(Some(v2.record())) {
            violations.push(format!("version record {record:?}"));
        }
        if mounted == Some(2) && record != Ok(Some(v2.record())) {
            violations.push("content 2 opened but its version record is not there".into());
        }
        if store.load_anchor() != Ok(Some(anchor(3))) {
            violations.push(format!("anchor {:?}", store.load_anchor()));
        }
        if store.load_latest_time() != Ok(job.last_time) {
            violations.push(format!("latest time {:?}", store.load_latest_time()));
        }
        if !done.is_empty() && mounted != Some(2) {
            violations.push(format!(
                "{} finished chunks lost with the header",
                done.len()
            ));
        }
        if mounted == Some(2) {
            t.held_at_reboot += held.len();
            for i in &done {
                if !held.contains(i) {
                    violations.push(format!("finished chunk {i} lost"));
                }
            }
            for i in &held {
                if !done.contains(i) && !in_flight.contains(i) {
                    violations.push(format!("chunk {i} held but never written"));
                }
            }
        }
        cells = cells_of(store);
    }
    // Resume: fetch what the store says is missing.
    let mut store = boot(&cells, power);
    let mut again = Progress::default();
    if let Err(e) = run_job(&mut store, v2, &mut again) {
        violations.push(format!("resume failed: {e:?}"));
    }
    attempts.extend(&again.done);
    // Fetched again: only chunks whose write a cut interrupted, each once per later boot.
    let mut fetched_again = 0;
    for (n, i) in attempts.iter().enumerate() {
        if attempts[..n].contains(i) {
            fetched_again += 1;
            if !in_flight.contains(i) {
                violations.push(format!("chunk {i} fetched again, its write had finished"));
            }
        }
    }
    if fetched_again > cuts.len() {
        violations.push(format!(
            "{fetched_again} chunks fetched again after {} cuts",
            cuts.len()
        ));
    }
    t.fetched_again += fetched_again;
    // Complete, and still complete after one more reboot.
    let cells = cells_of(store);
    let mut store = boot(&cells, power);
    let held = held_chunks(&mut store, [v1, v2], &mut violations);
    if store.held_manifest() != Some(&v2.manifest) || held.len() != CHUNKS as usize {
        violations.push(format!("not complete after resume: {} chunks", held.len()));
    }
    let root = v2.manifest.root;
    let mut whole = Vec::new();
    let mut buf = vec![0u8; CHUNK as usize];
    let mut proof = Proof::new();
    for i in 0..CHUNKS {
        if let Ok(len) = store.read_chunk(&root, i, &mut buf, &mut proof) {
            whole.extend_from_slice(&buf[..len]);
        }
    }
    if whole != v2.data {
        violations.push("completed content differs".into());
    }
    violations
}

#[test]
fn a_power_cut_at_every_flash_operation_of_a_job_loses_nothing_verified() {
    every_cut(true, 1);
}

#[test]
fn the_same_on_flash_that_writes_a_unit_only_once() {
    // Second cuts at every fourth operation only: the spare-slot paths they reach are the
    // same, and the test stays quick.
    every_cut(false, 4);
}

/// The job of version 2 with a cut at every one of its flash operations (see the module
/// docs), on multiwrite flash (bitmap flags, as shipped) or on flash that refuses writing a
/// unit twice (unit flags, spare slots); a second cut during the recovery follows the first
/// one at every `second_every`-th operation.
fn every_cut(multiwrite: bool, second_every: usize) {
    let started = Instant::now();
    let power = Power::new(0x5eed);
    let (v1, v2) = (Content::new(1), Content::new(2));
    let start = device_before_job(&power, &v1, multiwrite);
    let last_time = boot(&start, &power).load_latest_time().unwrap();
    assert!(last_time.is_some());
    let job = Job {
        power,
        v1,
        v2,
        start,
        last_time,
    };

    // The uninterrupted job: N operations, two of them erases (the record compaction and
    // the content partition, several blocks each).
    let mut store = boot(&job.start, &job.power);
    run_job(&mut store, &job.v2, &mut Progress::default()).unwrap();
    let n = job.power.borrow().ops;
    let erases = job.power.borrow().erases.clone();
    assert_eq!(
        erases.len(),
        3,
        "the job compacts the records and erases the partition"
    );
    assert!(erases.iter().all(|&(_, blocks)| blocks >= 1));
    assert!(erases.iter().any(|&(_, blocks)| blocks >= 4), "{erases:?}");
    assert!(n > 3 * CHUNKS as usize, "N = {n}");

    let mut bad: Vec<String> = Vec::new();
    let mut cut_points = BTreeMap::new();
    let mut torn_erase_points = 0;
    let mut t = Tally::default();
    let mut double_cuts = 0;
    for cut in CUTS {
        for k in 0..n {
            let first = CutAt {
                op: k,
                cut,
                torn_block: None,
            };
            let v = cut_run(&job, &[first], &mut t);
            bad.extend(v.into_iter().map(|v| format!("{first:?}: {v}")));
            *cut_points.entry(format!("{cut:?}")).or_insert(0usize) += 1;
            // A torn erase: also with each of its blocks as the one left partly erased.
            if let Some(&(_, blocks)) = erases.iter().find(|e| e.0 == k)
                && cut != Cut::Clean
            {
                for b in 0..blocks {
                    let at = CutAt {
                        torn_block: Some(b),
                        ..first
                    };
                    let v = cut_run(&job, &[at], &mut t);
                    bad.extend(v.into_iter().map(|v| format!("{at:?}: {v}")));
                    torn_erase_points += 1;
                }
            }
            // And a second cut while the device recovers: at one of the first operations
            // after the reboot (records, voiding, erase, header, the interrupted chunk).
            if k % second_every != 0 {
                continue;
            }
            let second = CutAt {
                op: k % RECOVERY_OPS,
                cut: CUTS[(k / RECOVERY_OPS) % CUTS.len()],
                torn_block: None,
            };
            let v = cut_run(&job, &[first, second], &mut t);
            bad.extend(
                v.into_iter()
                    .map(|v| format!("{first:?} then {second:?}: {v}")),
            );
            double_cuts += 1;
        }
    }
    let elapsed = started.elapsed();
    println!(
        "power cut per flash operation (multiwrite {multiwrite}): N = {n} operations (erases at {erases:?}) in a job of \
         {CHUNKS} chunks; cut points {cut_points:?}, {torn_erase_points} torn-erase block \
         points, {double_cuts} second cuts during recovery; chunks held at reboot {}, \
         fetched again {}; violations {}; {:.2?}",
        t.held_at_reboot,
        t.fetched_again,
        bad.len(),
        elapsed
    );
    for (cut, points) in &cut_points {
        assert_eq!(*points, n, "{cut}: one cut point per operation");
    }
    assert_eq!(cut_points.len(), CUTS.len());
    assert!(
        bad.is_empty(),
        "{} violations, first: {:#?}",
        bad.len(),
        &bad[..bad.len().min(10)]
    );
}

/// A record key of the run: the anchor, the latest time, or one content name's version.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Key {
    Anchor,
    Time,
    Name(usize),
}

const NAMES: [&str; 4] = ["fw", "config", "model", "never-written"];

/// The `i`-th write of the run: mostly times, a version record every 5th, an anchor every 7th.
fn write_of(i: u64) -> (Key, u64) {
    if i % 7 == 3 {
        (Key::Anchor, i)
    } else if i % 5 == 1 {
        (Key::Name((i / 5 % 3) as usize), i)
    } else {
        (Key::Time, i)
    }
}

fn apply(log: &mut RecordLog<Flash>, (key, v): (Key, u64)) -> Result<(), StoreError> {
    match key {
        Key::Anchor => log.save_anchor(&anchor(v)),
        Key::Time => log.save_latest_time(v),
        Key::Name(n) => log.put_version_record(
            NAMES[n],
            &VersionRecord {
                version: v,
                root: [v as u8; 32],
            },
        ),
    }
}

/// Reads `key`: its value, `None` if absent, or the error.
fn read(log: &mut RecordLog<Flash>, key: Key) -> Result<Option<u64>, StoreError> {
    match key {
        Key::Anchor => Ok(log.load_anchor()?.map(|a| {
            assert_eq!(a, anchor(a.anchor.version), "anchor read back altered");
            a.anchor.version
        })),
        Key::Time => log.load_latest_time(),
        Key::Name(n) => Ok(log.version_record(NAMES[n])?.map(|r| {
            assert_eq!(
                r.root, [r.version as u8; 32],
                "version record read back altered"
            );
            r.version
        })),
    }
}

fn record_log(mem: &[u8], power: &Rc<RefCell<Power>>, strict: bool) -> RecordLog<Flash> {
    power.borrow_mut().restore();
    let mut flash = Flash::new(0, power.clone());
    flash.mem = mem.to_vec();
    flash.strict = strict;
    RecordLog::new(flash)
}

#[test]
fn a_power_cut_at_every_record_write_leaves_the_old_or_the_new_value() {
    let started = Instant::now();
    const WRITES: u64 = 240;
    let power = Power::new(0xc0ffee);
    let keys = [
        Key::Anchor,
        Key::Time,
        Key::Name(0),
        Key::Name(1),
        Key::Name(2),
        Key::Name(3),
    ];
    let mut report = Vec::new();
    // Strict flash: the log never writes a unit twice, and this checks it.
    for strict in [true] {
        // The uninterrupted run: its operation count and erases (compactions).
        let mut log = record_log(&vec![0xFF; RECORDS], &power, strict);
        for i in 0..WRITES {
            apply(&mut log, write_of(i)).unwrap();
        }
        let n = power.borrow().ops;
        let compactions = power.borrow().erases.len();
        assert!(
            compactions >= 2,
            "the run compacts at least twice: {compactions}"
        );
        let mut bad = Vec::new();
        let mut points = 0;
        for cut in CUTS {
            for k in 0..n {
                let mut log = record_log(&vec![0xFF; RECORDS], &power, strict);
                {
                    let mut pw = power.borrow_mut();
                    pw.cut_at = Some((k, cut));
                    pw.seed = (k as u64 + 7) * 0x2545_F491 + cut as u64;
                }
                let mut committed: BTreeMap<Key, u64> = BTreeMap::new();
                let mut pending = None;
                for i in 0..WRITES {
                    let w = write_of(i);
                    if apply(&mut log, w).is_err() {
                        pending = Some(w);
                        break;
                    }
                    committed.insert(w.0, w.1);
                }
                points += 1;
                if pending.is_none() {
                    bad.push(format!("{cut:?} at op {k}: the run did not reach the cut"));
                }
                let mem = log.into_inner().mem;
                let mut log = record_log(&mem, &power, strict);
                for key in keys {
                    let got = read(&mut log, key);
                    let old = committed.get(&key).copied();
                    let new = pending.filter(|p| p.0 == key).map(|p| p.1);
                    if got != Ok(old) && (new.is_none() || got != Ok(new)) {
                        bad.push(format!(
                            "{cut:?} at op {k} (strict {strict}): {key:?} read {got:?}, \
                             committed {old:?}, being written {new:?}"
                        ));
                    }
                }
                // The area still takes writes after the reboot.
                let next = (Key::Name(0), WRITES + 1);
                if apply(&mut log, next).is_err() || read(&mut log, next.0) != Ok(Some(next.1)) {
                    bad.push(format!("{cut:?} at op {k}: no write after the reboot"));
                }
            }
        }
        assert_eq!(
            points,
            CUTS.len() * n,
            "one cut point per operation and cut kind"
        );
        report.push(format!(
            "strict {strict}: N = {n} operations ({compactions} compactions), {points} cut \
             points, {} violations",
            bad.len()
        ));
        assert!(
            bad.is_empty(),
            "{} violations, first: {:#?}",
            bad.len(),
            &bad[..bad.len().min(10)]
        );
    }
    println!(
        "power cut per record-log operation: {}; {:.2?}",
        report.join("; "),
        started.elapsed()
    );
}
