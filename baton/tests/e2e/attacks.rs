//! The attacks on content trust (issue 13, "Must show"), one test each, against real
//! `baton serve` and `baton agent` processes on loopback: arbitrary content from a stolen
//! manager, rollback after eviction, a version reused with other content, a frozen
//! (expired) manifest, chunks of another manifest (mix-and-match), content longer than its
//! manifest (endless data), a publisher signing names it is not listed for, a publisher
//! removed by a newer trust document, and a root rotation that must be signed by the old
//! and the new roots. Each test asserts the specific refusal — the participant's failure
//! reason in the job's API view, or the CLI's error — and, in the same test, that the
//! valid counterpart is accepted.
//!
//! Keys, trust documents and manifests are made as an operator makes them: `baton keys
//! new`, `baton trust …`, `baton sign`, `baton push --manifest`. Where the manager itself
//! refuses what an attacker asks, a manager the attacker runs (the stolen data directory
//! with a database of its own, or a job created before the trust document changed and
//! delivered to an agent that was offline) shows that the agents refuse it too.
//! Enrolment tokens, roles and the data directory's secrets are tested in `trust.rs`,
//! `roles.rs` and `files.rs`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::common::*;
use crate::faults::{MALLORY, Mallory, Tamper, start_mallory};
use baton_manager::trust::{write_key_file, write_trust_file};
use baton_protocol::identity::Identity;
use baton_protocol::merkle::{self, MerkleTree};
use baton_protocol::trust::SignedTrust;
use baton_protocol::types::PublicKey;
use baton_test_support::manager::{BOUND, bytes_from, participant};
use baton_test_support::trust::{new_identity, signed_document};
use baton_test_support::{
    AgentProc, Manager, TrustKit, free_loopback_addr, pseudo_random, wait_for,
};
use serde_json::{Value, json};

/// The most any one test here may take.
const LIMIT: Duration = Duration::from_secs(60);
/// Chunk size of every content here: 16 KiB, so small contents have a few chunks.
const CHUNK: usize = 16 * 1024;

/// Writes `len` pseudo-random bytes (from `seed`) to `dir/name`; the path and the bytes.
fn content(dir: &Path, name: &str, len: usize, seed: u32) -> (PathBuf, Vec<u8>) {
    let bytes = pseudo_random(len, seed);
    let path = dir.join(name);
    std::fs::write(&path, &bytes).unwrap();
    (path, bytes)
}

/// Runs `baton args…` (no manager involved); its output.
fn offline(args: &[&str]) -> baton_test_support::Output {
    baton(args, BOUND)
}

/// Runs `baton args…`, which must succeed; its stdout.
fn offline_ok(args: &[&str]) -> String {
    let out = offline(args);
    assert!(
        out.success,
        "baton {args:?} failed:\n{}\n{}",
        out.stdout, out.stderr
    );
    out.stdout
}

/// Runs `baton args… --data-dir <m's>`, which must fail; its stderr.
fn refused(m: &Manager, args: &[&str]) -> String {
    let out = cli(m, args);
    assert!(
        !out.success,
        "baton {args:?} was expected to fail:\n{}",
        out.stdout
    );
    out.stderr
}

/// `baton sign FILE --key KEY --name NAME --version V --expires E`; the manifest's path.
fn sign(file: &Path, key: &Path, name: &str, version: u64, expires: &str) -> PathBuf {
    let out = PathBuf::from(format!("{}.{name}.v{version}.manifest", file.display()));
    offline_ok(&[
        "sign",
        file.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
        "--name",
        name,
        "--version",
        &version.to_string(),
        "--expires",
        expires,
        "--chunk-size",
        "16KiB",
        "--out",
        out.to_str().unwrap(),
    ]);
    out
}

/// A manager run by a thief in `dir` (a stolen data directory) on the real manager's
/// agent port `listen`, with a database of its own (`rogue.db`), a trust document of its
/// choosing (`trust`) and a publisher key to sign with online.
fn start_rogue(dir: &Path, listen: &str, trust: &Path, publisher_key: &Path) -> Manager {
    let rogue_db = dir.join("rogue.db");
    Manager::start_args_in(
        BATON,
        dir,
        listen,
        &[
            "--give-up",
            "5",
            "--db",
            rogue_db.to_str().unwrap(),
            "--trust",
            trust.to_str().unwrap(),
            "--publisher-key",
            publisher_key.to_str().unwrap(),
        ],
    )
}

/// The arguments of `baton push FILE --manifest M --agents A…`.
fn push_args<'a>(file: &'a Path, manifest: &'a Path, agents: &'a str) -> Vec<&'a str> {
    vec![
        "push",
        file.to_str().unwrap(),
        "--manifest",
        manifest.to_str().unwrap(),
        "--agents",
        agents,
        "--json",
    ]
}

/// Publishes `file` with its offline-signed `manifest` to `agents`; the job's id.
fn push(m: &Manager, file: &Path, manifest: &Path, agents: &[&str]) -> u64 {
    let joined = agents.join(",");
    let created: Value = serde_json::from_str(ok(m, &push_args(file, manifest, &joined)).trim())
        .expect("JSON from baton push --json");
    created["id"].as_u64().expect("a job id")
}

/// The same push, which the manager must refuse; its error.
fn push_refused(m: &Manager, file: &Path, manifest: &Path, agents: &[&str]) -> String {
    let joined = agents.join(",");
    refused(m, &push_args(file, manifest, &joined))
}

/// Waits until `agent` confirmed or failed in `job`; its participant view and the job.
fn outcome(m: &Manager, job: u64, agent: &str, t: &Deadline) -> (Value, Value) {
    let done = m.wait_job(job, t.left(), |j| {
        j["participants"].as_array().is_some_and(|ps| {
            ps.iter().any(|p| {
                p["agent"] == agent && matches!(p["state"].as_str(), Some("confirmed" | "failed"))
            })
        })
    });
    (participant(&done, agent).clone(), done)
}

/// Asserts that `agent` refused `job` with `reason` (a `FailReason` name).
fn assert_refused(m: &Manager, job: u64, agent: &str, reason: &str, t: &Deadline) {
    let (p, done) = outcome(m, job, agent, t);
    assert_eq!(p["state"], "failed", "{agent} refused job {job}: {done}");
    let why = p["reason"].as_str().unwrap_or_default();
    assert!(
        why.contains(&format!("agent failed: {reason}")),
        "{agent} refused job {job} with {reason}, not {why:?}: {done}"
    );
    eprintln!("job {job}: {agent} refused it: {why}");
}

/// Asserts that `agent` confirmed `job` and exports `bytes`.
fn assert_accepted(m: &Manager, a: &AgentProc, job: u64, bytes: &[u8], t: &Deadline) {
    let (p, done) = outcome(m, job, &a.name, t);
    assert_eq!(
        p["state"],
        "confirmed",
        "{} accepted job {job}: {done}\nagent log:\n{}",
        a.name,
        tail(&a.log())
    );
    // The export is replaced once the content is complete (an earlier one may have its length).
    wait_for(
        &format!("{} exporting the content of job {job}", a.name),
        t.left(),
        || tail(&a.log()),
        || {
            std::fs::read(a.dir.join("out"))
                .ok()
                .filter(|got| got == bytes)
        },
    );
}

/// Waits until agent `a` logged that it refused a trust document not signed by the roots
/// it trusts.
fn assert_trust_refused(a: &AgentProc, t: &Deadline) {
    wait_for(
        &format!("{} refusing the trust document", a.name),
        t.left(),
        || tail(&a.log()),
        || {
            a.log()
                .lines()
                .any(|l| {
                    l.contains("trust document refused")
                        && l.contains("not signed by enough of the root keys trusted now")
                })
                .then_some(())
        },
    );
}

/// The last lines of a log.
fn tail(log: &str) -> String {
    baton_test_support::tail(log, 30)
}

/// Makes agent `name`'s identity under `root/name/data` and enrols it, without starting
/// it: jobs for it wait until it is started with [`AgentProc::spawn_enrolled`].
fn enrol_offline(m: &Manager, root: &Path, name: &str) {
    let data = root.join(name).join("data");
    std::fs::create_dir_all(root.join(name)).unwrap();
    let out = offline_ok(&[
        "agent",
        "--print-key",
        "--id",
        name,
        "--data-dir",
        data.to_str().unwrap(),
    ]);
    m.enrol(name, &key_of(out.trim()));
}

/// A public key from its hex.
fn key_of(hex_key: &str) -> PublicKey {
    PublicKey(hex::decode(hex_key).unwrap().try_into().unwrap())
}

/// The public key of running agent `a`.
fn agent_key(a: &AgentProc) -> PublicKey {
    let data = a.dir.join("data");
    key_of(
        offline_ok(&[
            "agent",
            "--print-key",
            "--id",
            &a.name,
            "--data-dir",
            data.to_str().unwrap(),
        ])
        .trim(),
    )
}

/// Writes `signed` to `dir/name` and uploads it with `baton trust push`; the output.
fn trust_push(
    m: &Manager,
    dir: &Path,
    name: &str,
    signed: &SignedTrust,
) -> baton_test_support::Output {
    let path = dir.join(name);
    write_trust_file(&path, signed).unwrap();
    cli(m, &["trust", "push", path.to_str().unwrap()])
}

/// A new key file `dir/name`; its identity.
fn key_file(dir: &Path, name: &str) -> (Identity, PathBuf) {
    let key = new_identity();
    let path = dir.join(name);
    write_key_file(&path, &key).unwrap();
    (key, path)
}

/// The kit of a manager started with the fleet's defaults.
fn kit(m: &Manager) -> &TrustKit {
    m.kit
        .as_ref()
        .expect("a manager started with the fleet's trust kit")
}

#[test]
fn arbitrary_content_signed_by_a_stolen_manager_key_is_refused() {
    let t = Deadline::start(LIMIT);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let kit = TrustKit::in_dir(&dir.join("keys"));
    let listen = free_loopback_addr();
    let trust = kit.trust_file();
    // The manager has the trust document but no publisher key.
    let mut m = Manager::start_args_in(
        BATON,
        dir,
        &listen,
        &["--give-up", "5", "--trust", trust.to_str().unwrap()],
    );
    let root_hex = kit.root_hex();
    let a = AgentProc::spawn(&m, dir, "s1", &["--root-key", &root_hex]);
    m.wait_connected(&["s1"]);

    // Without --publisher-key the manager signs nothing.
    let (good, good_bytes) = content(dir, "good.bin", 40_000, 1);
    let why = refused(&m, &["push", good.to_str().unwrap(), "--agents", "s1"]);
    assert!(
        why.contains("no publisher key") && why.contains("sign it offline"),
        "{why}"
    );
    // The listed publisher's offline-signed manifest is accepted.
    let manifest = sign(&good, &kit.publisher_key_file(), "fw", 1, "90d");
    let job = push(&m, &good, &manifest, &["s1"]);
    assert_accepted(&m, &a, job, &good_bytes, &t);

    // A manifest signed with the manager's own key (from its data directory): the manager
    // refuses to publish it...
    let manager_key = m.data_dir().join("manager.key");
    let (evil, _) = content(dir, "evil.bin", 40_000, 2);
    let evil_manifest = sign(&evil, &manager_key, "fw", 2, "90d");
    let why = push_refused(&m, &evil, &evil_manifest, &["s1"]);
    assert!(
        why.contains("is not a publisher in trust document version 1"),
        "{why}"
    );

    // ...and a manager run by the thief from the stolen data directory, with a database
    // and a trust document of its own making that lists the manager's key, gets nothing
    // accepted: the agent refuses the forged document and then the content.
    m.crash();
    let (thief, _) = key_file(dir, "thief.key");
    let stolen = baton_manager::trust::read_key_file(&manager_key).unwrap();
    let forged = signed_document(2, &[&thief], 1, &[(&stolen, &["*"])], &[&thief]);
    let forged_file = dir.join("forged.bin");
    write_trust_file(&forged_file, &forged).unwrap();
    let rogue = start_rogue(dir, &listen, &forged_file, &manager_key);
    rogue.enrol("s1", &agent_key(&a));
    rogue.wait_connected(&["s1"]);
    let job = rogue.create_job(&evil, &["s1"], json!({ "name": "fw", "chunk_size": CHUNK }));
    assert_refused(&rogue, job, "s1", "BadSignature", &t);
    assert_trust_refused(&a, &t);
    assert_eq!(
        std::fs::read(a.dir.join("out")).unwrap(),
        good_bytes,
        "the agent still exports the good content"
    );
}

#[test]
fn rollback_after_eviction_is_refused() {
    let t = Deadline::start(LIMIT);
    let m = Manager::start(BATON);
    let root = m.dir.clone();
    let publisher = kit(&m).publisher_key_file();
    let mut a = AgentProc::spawn(&m, &root, "r1", &[]);
    m.wait_connected(&["r1"]);
    let (old, old_bytes) = content(&root, "fw-1.bin", 40_000, 3);
    let (new, new_bytes) = content(&root, "fw-2.bin", 40_000, 4);
    let v1 = sign(&old, &publisher, "fw", 1, "90d");
    let v2 = sign(&new, &publisher, "fw", 2, "90d");
    let job = push(&m, &new, &v2, &["r1"]);
    assert_accepted(&m, &a, job, &new_bytes, &t);

    // The content is evicted: the agent's content slots are gone (its records stay).
    a.kill();
    let slots = a.dir.join("data").join("content");
    let removed = std::fs::read_dir(&slots)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter(|e| std::fs::remove_file(e.path()).is_ok())
                .count()
        })
        .unwrap_or(0);
    assert!(
        removed > 0,
        "content slots removed from {}",
        slots.display()
    );
    let a = AgentProc::spawn_enrolled(&m, &root, "r1", &[]);
    m.wait_connected(&["r1"]);

    // The old version is refused although nothing of the name is held any more...
    let job = push(&m, &old, &v1, &["r1"]);
    assert_refused(&m, job, "r1", "Downgrade", &t);
    // ...and a deliberate rollback — the old content signed again, higher — is accepted.
    let v3 = sign(&old, &publisher, "fw", 3, "90d");
    let job = push(&m, &old, &v3, &["r1"]);
    assert_accepted(&m, &a, job, &old_bytes, &t);
}

#[test]
fn same_version_with_another_root_is_refused() {
    let t = Deadline::start(LIMIT);
    let m = Manager::start(BATON);
    let root = m.dir.clone();
    let publisher = kit(&m).publisher_key_file();
    let a = AgentProc::spawn(&m, &root, "v1", &[]);
    m.wait_connected(&["v1"]);
    let (first, first_bytes) = content(&root, "a.bin", 40_000, 5);
    let (second, second_bytes) = content(&root, "b.bin", 40_000, 6);
    let job = push(
        &m,
        &first,
        &sign(&first, &publisher, "fw", 5, "90d"),
        &["v1"],
    );
    assert_accepted(&m, &a, job, &first_bytes, &t);
    // Other content under the version accepted: refused.
    let job = push(
        &m,
        &second,
        &sign(&second, &publisher, "fw", 5, "90d"),
        &["v1"],
    );
    assert_refused(&m, job, "v1", "VersionReused", &t);
    // Under the next version: accepted.
    let job = push(
        &m,
        &second,
        &sign(&second, &publisher, "fw", 6, "90d"),
        &["v1"],
    );
    assert_accepted(&m, &a, job, &second_bytes, &t);
}

#[test]
fn expired_manifest_is_refused() {
    let t = Deadline::start(LIMIT);
    // The agent stays offline for the manifest's 5 s: the manager must not give it up
    // meanwhile (the default test give-up, 5 s, raced the expiry).
    let m = Manager::start_args(BATON, &["--give-up", "30"]);
    let root = m.dir.clone();
    let publisher = kit(&m).publisher_key_file();
    // The agent is offline while a short-lived manifest is published for it: the manager
    // holds it back (a freeze) until after it expired.
    enrol_offline(&m, &root, "e1");
    let (stale, _) = content(&root, "stale.bin", 40_000, 7);
    let signed_at = Instant::now();
    let manifest = sign(&stale, &publisher, "fw", 1, "4s");
    let job = push(&m, &stale, &manifest, &["e1"]);
    let expired = signed_at + Duration::from_secs(5);
    std::thread::sleep(expired.saturating_duration_since(Instant::now()));
    let a = AgentProc::spawn_enrolled(&m, &root, "e1", &[]);
    m.wait_connected(&["e1"]);
    assert_refused(&m, job, "e1", "Expired", &t);
    // The manager refuses a manifest that has expired already, naming it.
    let why = push_refused(&m, &stale, &manifest, &["e1"]);
    assert!(why.contains("manifest has expired"), "{why}");
    // A manifest valid for 90 days is accepted.
    let (fresh, fresh_bytes) = content(&root, "fresh.bin", 40_000, 8);
    let job = push(
        &m,
        &fresh,
        &sign(&fresh, &publisher, "fw", 2, "90d"),
        &["e1"],
    );
    assert_accepted(&m, &a, job, &fresh_bytes, &t);
}

/// Every chunk of `bytes` (chunks of [`CHUNK`]) with its proof in their Merkle tree.
fn chunks_with_proofs(
    bytes: &[u8],
) -> std::collections::HashMap<u32, (Vec<u8>, baton_protocol::merkle::Proof)> {
    let chunks: Vec<&[u8]> = bytes.chunks(CHUNK).collect();
    let tree = MerkleTree::from_leaves(chunks.iter().map(|c| merkle::leaf_hash(c)).collect());
    chunks
        .iter()
        .enumerate()
        .map(|(i, c)| (i as u32, (c.to_vec(), tree.proof(i as u32).unwrap())))
        .collect()
}

/// A fleet of two honest agents and Mallory, a source that serves falsified chunks
/// (`tamper`): every honest agent is sent to Mallory, refuses each falsified chunk, and
/// completes the content from others. Returns nothing; asserts it all.
fn falsified_chunks_are_refused(tamper: Tamper, seed: u32) {
    let t = Deadline::start(LIMIT);
    let m = Manager::start_args(BATON, &["--give-up", "10"]);
    let root = m.dir.clone();
    let rt = runtime();
    let state = Arc::new(Mallory {
        tamper,
        ..Mallory::default()
    });
    let honest = ["c1", "c2"];
    start_mallory(&m, &rt, &state, honest.len());
    let agents: Vec<AgentProc> = honest
        .iter()
        .map(|n| {
            let status = root.join(n).join("status.json");
            AgentProc::spawn(
                &m,
                &root,
                n,
                &[
                    "--up-bps",
                    "1MiB",
                    "--status-file",
                    status.to_str().unwrap(),
                ],
            )
        })
        .collect();
    m.wait_connected(&[MALLORY, "c1", "c2"]);
    let (file, bytes) = content(&root, "content.bin", 256 * 1024, seed);
    let job = m.create_job(
        &file,
        &[MALLORY, "c1", "c2"],
        json!({ "chunk_size": CHUNK }),
    );
    let done = m.wait_job(job, t.left(), |j| j["state"] == "finished");
    let corrupted = state.corrupted.lock().unwrap().clone();
    let errors = state.errors.lock().unwrap().clone();
    assert!(state.confirmed.load(Ordering::SeqCst), "errors: {errors:?}");
    for a in &agents {
        assert!(
            corrupted.iter().any(|(who, _)| *who == a.name),
            "{} was served falsified chunks: {corrupted:?}; errors: {errors:?}; {done}",
            a.name
        );
        assert_eq!(participant(&done, &a.name)["state"], "confirmed", "{done}");
        assert_eq!(bytes_from(&done, &a.name, Some(MALLORY)), 0, "{done}");
        a.wait_export(&bytes);
        let s = wait_for(
            "status file shows the job done",
            t.left(),
            || a.log(),
            || {
                a.job_status("status.json", job)
                    .filter(|s| s["state"] == "done")
            },
        );
        assert!(s["bad_chunks"].as_u64().unwrap() >= 1, "{}: {s}", a.name);
        eprintln!("{}: refused {} falsified chunks", a.name, s["bad_chunks"]);
    }
    drop(rt);
}

#[test]
fn chunks_from_another_manifest_are_refused() {
    // Mallory serves, for each index, the chunk of other content with that content's
    // genuine proof: valid under another manifest, not under this one.
    let other = pseudo_random(256 * 1024, 99);
    falsified_chunks_are_refused(Tamper::OtherContent(chunks_with_proofs(&other)), 9);
}

#[test]
fn content_longer_than_its_manifest_is_refused() {
    // Mallory serves each genuine chunk with its genuine proof and 4 KiB more: more data
    // than the manifest says the chunk has.
    falsified_chunks_are_refused(Tamper::Longer(4096), 10);
}

#[test]
fn a_publisher_cannot_sign_names_it_is_not_listed_for() {
    let t = Deadline::start(LIMIT);
    let m = Manager::start(BATON);
    let root = m.dir.clone();
    let k = kit(&m);
    let (narrow, narrow_file) = key_file(&root, "narrow.key");
    // Version 2 lists the second publisher for every name; a job signed by it for
    // `config` is created while that holds, for an agent that is offline.
    let v2 = signed_document(
        2,
        &[&k.root],
        1,
        &[(&k.publisher, &["*"]), (&narrow, &["*"])],
        &[&k.root],
    );
    assert!(trust_push(&m, &root, "v2.bin", &v2).success);
    enrol_offline(&m, &root, "n1");
    let (config, _) = content(&root, "config.bin", 20_000, 11);
    let job = push(
        &m,
        &config,
        &sign(&config, &narrow_file, "config", 1, "90d"),
        &["n1"],
    );
    // Version 3 lists it for `fw-*` only: the agent, which gets version 3 first, refuses.
    let v3 = signed_document(
        3,
        &[&k.root],
        1,
        &[(&k.publisher, &["*"]), (&narrow, &["fw-*"])],
        &[&k.root],
    );
    assert!(trust_push(&m, &root, "v3.bin", &v3).success);
    let a = AgentProc::spawn_enrolled(&m, &root, "n1", &[]);
    m.wait_connected(&["n1"]);
    assert_refused(&m, job, "n1", "NotListed", &t);
    // The manager refuses it too now, naming why.
    let why = push_refused(
        &m,
        &config,
        &sign(&config, &narrow_file, "config", 2, "90d"),
        &["n1"],
    );
    assert!(why.contains("is not listed for \"config\""), "{why}");
    // A name it is listed for is accepted.
    let (fw, fw_bytes) = content(&root, "fw-a.bin", 20_000, 12);
    let job = push(&m, &fw, &sign(&fw, &narrow_file, "fw-a", 1, "90d"), &["n1"]);
    assert_accepted(&m, &a, job, &fw_bytes, &t);
}

#[test]
fn a_revoked_publisher_key_is_refused_after_rotation() {
    let t = Deadline::start(LIMIT);
    let m = Manager::start(BATON);
    let root = m.dir.clone();
    let k = kit(&m);
    let old_key = k.publisher_key_file();
    // A job signed by the publisher while version 1 lists it, for an agent that is offline.
    enrol_offline(&m, &root, "p1");
    let (before, _) = content(&root, "before.bin", 20_000, 13);
    let job = push(
        &m,
        &before,
        &sign(&before, &old_key, "fw", 1, "90d"),
        &["p1"],
    );
    // The operator rotates the publisher key with the CLI: remove it, list a new one,
    // sign, push (version 2).
    let doc = root.join("rotated.bin");
    std::fs::copy(k.trust_file(), &doc).unwrap();
    let doc_s = doc.to_str().unwrap();
    let new_key = root.join("publisher-2.key");
    let new_hex = offline_ok(&["keys", "new", "--out", new_key.to_str().unwrap()]);
    let old_hex = hex::encode(k.publisher.public().0);
    let said = offline_ok(&["trust", "remove-publisher", doc_s, "--key", &old_hex]);
    assert!(said.contains("version 2, unsigned"), "{said}");
    let said = offline_ok(&[
        "trust",
        "add-publisher",
        doc_s,
        "--key",
        new_hex.trim(),
        "--names",
        "*",
    ]);
    assert!(
        said.contains("version 2, unsigned"),
        "one version per signing round: {said}"
    );
    offline_ok(&[
        "trust",
        "sign",
        doc_s,
        "--key",
        k.root_key_file().to_str().unwrap(),
    ]);
    let shown = offline_ok(&["trust", "show", doc_s, "--json"]);
    let shown: Value = serde_json::from_str(&shown).unwrap();
    assert_eq!(shown["version"], 2, "{shown}");
    assert_eq!(shown["publishers"][0]["key"], new_hex.trim(), "{shown}");
    ok(&m, &["trust", "push", doc_s]);

    // The agent gets version 2 before the job: the removed key's manifest is refused.
    let a = AgentProc::spawn_enrolled(&m, &root, "p1", &[]);
    m.wait_connected(&["p1"]);
    assert_refused(&m, job, "p1", "BadSignature", &t);
    // The manager refuses the removed key's new manifests.
    let (later, _) = content(&root, "later.bin", 20_000, 14);
    let why = push_refused(&m, &later, &sign(&later, &old_key, "fw", 2, "90d"), &["p1"]);
    assert!(
        why.contains("is not a publisher in trust document version 2"),
        "{why}"
    );
    // The new publisher's manifest is accepted.
    let job = push(&m, &later, &sign(&later, &new_key, "fw", 2, "90d"), &["p1"]);
    let later_bytes = std::fs::read(&later).unwrap();
    assert_accepted(&m, &a, job, &later_bytes, &t);
}

#[test]
fn root_rotation_needs_both_thresholds() {
    let t = Deadline::start(LIMIT);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let listen = free_loopback_addr();
    let mut m = Manager::start_on(BATON, dir, &listen);
    let (r1, p1) = {
        let k = kit(&m);
        (
            Identity::from_seed(k.root.seed()),
            Identity::from_seed(k.publisher.seed()),
        )
    };
    let a = AgentProc::spawn(&m, dir, "q1", &[]);
    m.wait_connected(&["q1"]);
    let (r2, _) = key_file(dir, "root-2.key");
    let (p2, p2_file) = key_file(dir, "publisher-2.key");
    let rotated = |signers: &[&Identity]| signed_document(2, &[&r2], 1, &[(&p2, &["*"])], signers);

    // Signed by the new root only: the manager refuses it...
    let out = trust_push(&m, dir, "only-new.bin", &rotated(&[&r2]));
    assert!(
        !out.success
            && out
                .stderr
                .contains("not signed by enough of the root keys trusted now"),
        "{}",
        out.stderr
    );
    // ...and so does the agent when a manager that took it (its own database) sends it:
    // the new root's publisher is not trusted.
    m.crash();
    let only_new = dir.join("only-new.bin");
    let mut rogue = start_rogue(dir, &listen, &only_new, &p2_file);
    rogue.enrol("q1", &agent_key(&a));
    rogue.wait_connected(&["q1"]);
    let (file, bytes) = content(dir, "fw.bin", 40_000, 15);
    let job = rogue.create_job(&file, &["q1"], json!({ "name": "fw", "chunk_size": CHUNK }));
    assert_refused(&rogue, job, "q1", "BadSignature", &t);
    assert_trust_refused(&a, &t);
    rogue.stop();

    // Signed by the old root and the new one: accepted, and the new publisher with it.
    let m = Manager::start_on(BATON, dir, &listen);
    m.wait_connected(&["q1"]);
    let out = trust_push(&m, dir, "both.bin", &rotated(&[&r1, &r2]));
    assert!(out.success, "{}\n{}", out.stdout, out.stderr);
    let job = push(&m, &file, &sign(&file, &p2_file, "fw", 1, "90d"), &["q1"]);
    assert_accepted(&m, &a, job, &bytes, &t);
    // From now on the old root alone signs nothing.
    let by_old = signed_document(3, &[&r1], 1, &[(&p1, &["*"])], &[&r1]);
    let out = trust_push(&m, dir, "old-only.bin", &by_old);
    assert!(
        !out.success
            && out
                .stderr
                .contains("not signed by enough of the root keys trusted now"),
        "{}",
        out.stderr
    );
}
