//! `baton trust …`: build, co-sign, show and upload the root-signed trust document, and
//! `baton sign`: sign a manifest for a file with a publisher key — both offline, on the
//! host that holds the keys.
//!
//! A trust document names the root keys (k of n must sign it and its successor), the
//! publisher keys and the content names each may sign, a version and an expiry. Editing
//! commands change the file in place; the first edit after it was signed raises the version
//! by one and removes the signatures (one version per signing round), later edits before
//! the next `sign` keep that version. `baton trust sign` adds one root's signature; a
//! document that needs k roots is signed once with each of their keys (a root rotation: by
//! enough of the old roots and enough of the new ones). `baton trust push` gives it to the
//! manager, which only stores and relays it: agents judge it against the root keys they
//! pinned.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use baton_manager::http::api::{TrustView, trust_view};
use baton_manager::trust::{
    key_hex, key_id_hex, parse_key_hex, read_key_file, read_trust_file, write_manifest_file,
    write_trust_file,
};
use baton_protocol::Manifest;
use baton_protocol::manifest::MAX_CONTENT_NAME;
use baton_protocol::trust::{
    MAX_NAME_PATTERNS, MAX_ROOT_KEYS, MAX_TRUSTED_PUBLISHERS, NamePattern, PublisherGrant,
    SignedTrust, TrustDocument,
};
use baton_protocol::types::{KeyId, PublicKey};
use clap::{Args, Subcommand};
use serde_json::json;

use super::enroll::parse_duration_secs;
use super::{Client, ClientOpts, format_time};

/// `baton trust …`.
#[derive(Subcommand, Debug)]
pub enum TrustCommand {
    /// Start a trust document: version 1, these root keys, no publishers, unsigned.
    Init(InitArgs),
    /// List a publisher key for content names (replaces its names if it is listed). Edits
    /// raise the version once per signing round and remove the signatures.
    AddPublisher(AddPublisherArgs),
    /// Remove a publisher key (its manifests are refused once agents hold the new
    /// version). Edits raise the version once per signing round and remove the signatures.
    RemovePublisher(RemovePublisherArgs),
    /// Replace the root keys and threshold (a root rotation: sign the result with enough of
    /// the old roots and enough of the new ones). Edits raise the version once per signing
    /// round and remove the signatures.
    SetRoots(SetRootsArgs),
    /// Add one root key's signature (run once per root that must sign).
    Sign(SignTrustArgs),
    /// Print a trust document or a manifest file.
    Show(ShowArgs),
    /// Upload a signed trust document to the manager, which sends it to every agent.
    Push(PushTrustArgs),
}

/// Flags of `baton trust init`.
#[derive(Args, Debug)]
pub struct InitArgs {
    /// A root key (64 hex digits, as `baton keys new` prints it); repeat for k of n.
    #[arg(long = "root", value_name = "HEX", required = true)]
    pub roots: Vec<String>,
    /// How many root keys must sign this document and the next.
    #[arg(long, default_value_t = 1)]
    pub threshold: u8,
    /// How long the document is valid, e.g. `365d`, or `never`; agents refuse it after.
    #[arg(long, default_value = "365d")]
    pub expires: String,
    /// The document file to create (refused if it exists).
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
}

/// What every editing command may also change.
#[derive(Args, Debug)]
pub struct EditArgs {
    /// The trust document file, changed in place.
    pub file: PathBuf,
    /// A new validity from now, e.g. `365d`, or `never` (default: keep the expiry).
    #[arg(long)]
    pub expires: Option<String>,
}

/// Flags of `baton trust add-publisher`.
#[derive(Args, Debug)]
pub struct AddPublisherArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub edit: EditArgs,
    /// The publisher's public key (hex).
    #[arg(long, value_name = "HEX")]
    pub key: String,
    /// Content names it may sign, comma-separated: exact names, `prefix*`, or `*` (at most 4).
    #[arg(long, value_delimiter = ',', required = true)]
    pub names: Vec<String>,
}

/// Flags of `baton trust remove-publisher`.
#[derive(Args, Debug)]
pub struct RemovePublisherArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub edit: EditArgs,
    /// The publisher's public key (hex).
    #[arg(long, value_name = "HEX")]
    pub key: String,
}

/// Flags of `baton trust set-roots`.
#[derive(Args, Debug)]
pub struct SetRootsArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub edit: EditArgs,
    /// The new root keys (hex); repeat.
    #[arg(long = "root", value_name = "HEX", required = true)]
    pub roots: Vec<String>,
    /// How many of the new roots must sign this document and the next.
    #[arg(long)]
    pub threshold: u8,
}

/// Flags of `baton trust sign`.
#[derive(Args, Debug)]
pub struct SignTrustArgs {
    /// The trust document file, signed in place.
    pub file: PathBuf,
    /// A root key file (`baton keys new`).
    #[arg(long, value_name = "FILE")]
    pub key: PathBuf,
}

/// Flags of `baton trust show`.
#[derive(Args, Debug)]
pub struct ShowArgs {
    /// A trust document or a manifest file.
    pub file: PathBuf,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Flags of `baton trust push`.
#[derive(Args, Debug)]
pub struct PushTrustArgs {
    /// The signed trust document file.
    pub file: PathBuf,
    /// Print the manager's answer as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub client: ClientOpts,
}

/// Flags of `baton sign`.
#[derive(Args, Debug)]
pub struct SignArgs {
    /// The content file.
    pub file: PathBuf,
    /// The publisher key file (`baton keys new`); the trust document must list it for --name.
    #[arg(long, value_name = "FILE")]
    pub key: PathBuf,
    /// The content name agents know it by (versions compare within a name).
    #[arg(long)]
    pub name: String,
    /// The version. Default: the current Unix time in seconds, so that every signing —
    /// on any host, with no record of the last version — is newer than the ones before
    /// (agents refuse a lower version of a name than they accepted, and the same version
    /// with other content). A deliberate rollback is the old file signed again: it gets a
    /// new, higher version.
    #[arg(long)]
    pub version: Option<u64>,
    /// How long agents accept the manifest, e.g. `90d`, or `never` (a frozen or
    /// held-back manifest goes stale).
    #[arg(long, default_value = "90d")]
    pub expires: String,
    /// Chunk size, e.g. `32KiB` (256 B ..= 32 KiB).
    #[arg(long, value_parser = super::parse_size, default_value = "32KiB")]
    pub chunk_size: u64,
    /// The manifest file to write (default: FILE.manifest; replaced if it exists).
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
}

/// Now, in Unix seconds.
fn unix_now() -> u64 {
    baton_manager::registry::unix_now()
}

/// Unix time `text` (a duration, or `never` = 0) from now.
fn expiry(text: &str) -> anyhow::Result<u64> {
    if text.trim() == "never" {
        return Ok(0);
    }
    let secs = parse_duration_secs(text)?;
    if secs == 0 {
        bail!("an expiry of 0 would be already expired; give a duration or `never`");
    }
    Ok(unix_now().saturating_add(secs))
}

fn parse_key(text: &str, flag: &str) -> anyhow::Result<PublicKey> {
    parse_key_hex(text).map_err(|e| anyhow::anyhow!("{flag}: {e}"))
}

fn roots_of(texts: &[String]) -> anyhow::Result<heapless::Vec<PublicKey, MAX_ROOT_KEYS>> {
    let mut roots = heapless::Vec::new();
    for t in texts {
        let key = parse_key(t, "--root")?;
        if roots.contains(&key) {
            bail!("--root {t} is given twice");
        }
        roots
            .push(key)
            .map_err(|_| anyhow::anyhow!("at most {MAX_ROOT_KEYS} root keys"))?;
    }
    Ok(roots)
}

fn check_threshold(threshold: u8, roots: usize) -> anyhow::Result<()> {
    if threshold == 0 || usize::from(threshold) > roots {
        bail!(
            "--threshold {threshold}: give 1..={roots} (how many of the {roots} root keys must sign)"
        );
    }
    Ok(())
}

fn read(path: &Path) -> anyhow::Result<SignedTrust> {
    read_trust_file(path)
        .with_context(|| format!("cannot read the trust document {}", path.display()))
}

fn write(path: &Path, signed: &SignedTrust) -> anyhow::Result<()> {
    write_trust_file(path, signed).with_context(|| format!("cannot write {}", path.display()))
}

/// Applies an edit: the first edit after a signing round raises the version and removes
/// the signatures; a new expiry if asked.
fn edit(
    args: &EditArgs,
    change: impl FnOnce(&mut TrustDocument) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let mut signed = read(&args.file)?;
    let before = signed.document.clone();
    change(&mut signed.document)?;
    if let Some(e) = &args.expires {
        signed.document.expires = expiry(e)?;
    }
    if signed.document == before {
        println!(
            "{}: unchanged (version {})",
            args.file.display(),
            before.version
        );
        return Ok(());
    }
    if !signed.signatures.is_empty() {
        signed.document.version = before
            .version
            .checked_add(1)
            .context("the version cannot grow further")?;
        signed.signatures.clear();
    }
    signed
        .document
        .check_shape()
        .map_err(|e| anyhow::anyhow!("the edited document would be invalid: {e}"))?;
    write(&args.file, &signed)?;
    println!(
        "{}: version {}, unsigned — sign it with `baton trust sign {} --key ROOT.key`",
        args.file.display(),
        signed.document.version,
        args.file.display()
    );
    Ok(())
}

fn pattern(name: &str) -> anyhow::Result<NamePattern> {
    let name = name.trim();
    if name.is_empty() {
        bail!("--names: an empty name");
    }
    if name[..name.len() - 1].contains('*') {
        bail!("--names {name:?}: `*` may only end a pattern (`prefix*`, or `*` for every name)");
    }
    NamePattern::try_from(name)
        .map_err(|_| anyhow::anyhow!("--names {name:?}: at most {MAX_CONTENT_NAME} bytes"))
}

/// Runs `baton trust …`.
pub fn run(cmd: TrustCommand) -> anyhow::Result<()> {
    match cmd {
        TrustCommand::Init(args) => {
            if args.out.exists() {
                bail!(
                    "{} exists; `baton trust init` never replaces a file",
                    args.out.display()
                );
            }
            let roots = roots_of(&args.roots)?;
            check_threshold(args.threshold, roots.len())?;
            let signed = SignedTrust::new(TrustDocument {
                version: 1,
                expires: expiry(&args.expires)?,
                threshold: args.threshold,
                roots,
                publishers: heapless::Vec::new(),
            });
            write(&args.out, &signed)?;
            println!(
                "{}: version 1, {} root(s), threshold {}, no publishers, unsigned",
                args.out.display(),
                signed.document.roots.len(),
                args.threshold
            );
        }
        TrustCommand::AddPublisher(args) => {
            let key = parse_key(&args.key, "--key")?;
            let mut names = heapless::Vec::<NamePattern, MAX_NAME_PATTERNS>::new();
            for n in &args.names {
                names.push(pattern(n)?).map_err(|_| {
                    anyhow::anyhow!("--names: at most {MAX_NAME_PATTERNS} patterns")
                })?;
            }
            edit(&args.edit, |doc| {
                if let Some(g) = doc.publishers.iter_mut().find(|g| g.key == key) {
                    g.names = names;
                    return Ok(());
                }
                doc.publishers
                    .push(PublisherGrant { key, names })
                    .map_err(|_| {
                        anyhow::anyhow!(
                            "a trust document lists at most {MAX_TRUSTED_PUBLISHERS} publishers"
                        )
                    })
            })?;
        }
        TrustCommand::RemovePublisher(args) => {
            let key = parse_key(&args.key, "--key")?;
            edit(&args.edit, |doc| {
                let before = doc.publishers.len();
                doc.publishers.retain(|g| g.key != key);
                if doc.publishers.len() == before {
                    bail!("{} is not a publisher of this document", args.key);
                }
                Ok(())
            })?;
        }
        TrustCommand::SetRoots(args) => {
            let roots = roots_of(&args.roots)?;
            check_threshold(args.threshold, roots.len())?;
            edit(&args.edit, |doc| {
                doc.roots = roots;
                doc.threshold = args.threshold;
                Ok(())
            })?;
        }
        TrustCommand::Sign(args) => {
            let mut signed = read(&args.file)?;
            let root = read_key_file(&args.key)
                .with_context(|| format!("cannot read the root key {}", args.key.display()))?;
            signed
                .sign(&root)
                .map_err(|e| anyhow::anyhow!("cannot sign: {e}"))?;
            write(&args.file, &signed)?;
            let own = signed.signed_by(&signed.document.roots);
            let note = if signed.document.roots.contains(&root.public()) {
                ""
            } else {
                " (this key is not one of the document's roots: right for the old roots of a rotation)"
            };
            println!(
                "{}: version {} signed by {}{note}; {own} of its {} root(s) signed, {} needed",
                args.file.display(),
                signed.document.version,
                key_hex(&root.public()),
                signed.document.roots.len(),
                signed.document.threshold
            );
        }
        TrustCommand::Show(args) => show(&args)?,
        TrustCommand::Push(args) => {
            let signed = read(&args.file)?;
            let own = signed.signed_by(&signed.document.roots);
            if own < usize::from(signed.document.threshold) {
                bail!(
                    "{}: signed by {own} of its roots, {} needed — `baton trust sign {} --key ROOT.key` first",
                    args.file.display(),
                    signed.document.threshold,
                    args.file.display()
                );
            }
            let bytes = baton_manager::trust::encode_trust(&signed);
            let client = Client::new(&args.client)?;
            let answer: TrustView =
                client.put("/api/v1/trust", &json!({ "document": hex::encode(bytes) }))?;
            if args.json {
                println!("{}", serde_json::to_string(&answer)?);
            } else if answer.stored == Some(false) {
                println!(
                    "the manager holds trust document version {} already",
                    answer.version
                );
            } else {
                println!(
                    "trust document version {} stored; the manager sends it to every agent",
                    answer.version
                );
            }
        }
    }
    Ok(())
}

fn expiry_text(expires: u64) -> String {
    if expires == 0 {
        "never".into()
    } else {
        format!("{} UTC", format_time(expires))
    }
}

/// `baton trust show`: a trust document, or else a manifest.
fn show(args: &ShowArgs) -> anyhow::Result<()> {
    if let Ok(signed) = read_trust_file(&args.file) {
        let view = trust_view(&signed);
        if args.json {
            println!("{}", serde_json::to_string_pretty(&view)?);
            return Ok(());
        }
        let doc = &signed.document;
        println!("trust document version {}", doc.version);
        println!("expires:    {}", expiry_text(doc.expires));
        println!(
            "threshold:  {} of {} root(s)",
            doc.threshold,
            doc.roots.len()
        );
        for r in &doc.roots {
            println!("root:       {}", key_hex(r));
        }
        for p in &doc.publishers {
            let names: Vec<&str> = p.names.iter().map(|n| n.as_str()).collect();
            println!("publisher:  {} for {}", key_hex(&p.key), names.join(","));
        }
        if doc.publishers.is_empty() {
            println!("publisher:  none (add one with `baton trust add-publisher`)");
        }
        for s in &signed.signatures {
            let root = doc.roots.iter().find(|r| KeyId::of(r) == s.signer);
            match root {
                Some(r) => println!("signed by:  {}", key_hex(r)),
                None => println!(
                    "signed by:  key id {} (not a root of this version)",
                    key_id_hex(&s.signer)
                ),
            }
        }
        let own = signed.signed_by(&doc.roots);
        println!(
            "signatures: {own} of the {} needed from its own roots",
            doc.threshold
        );
        return Ok(());
    }
    let manifest = baton_manager::trust::read_manifest_file(&args.file).with_context(|| {
        format!(
            "{} is neither a trust document nor a manifest",
            args.file.display()
        )
    })?;
    let view = json!({
        "name": manifest.name.as_str(),
        "version": manifest.version,
        "expires": manifest.expires,
        "length": manifest.length,
        "chunk_size": manifest.chunk_size,
        "root": hex::encode(manifest.root),
        "signer": key_id_hex(&manifest.signer),
    });
    if args.json {
        println!("{}", serde_json::to_string_pretty(&view)?);
    } else {
        println!("manifest {} version {}", manifest.name, manifest.version);
        println!("expires:    {}", expiry_text(manifest.expires));
        println!(
            "length:     {} bytes in chunks of {}",
            manifest.length, manifest.chunk_size
        );
        println!("root:       {}", hex::encode(manifest.root));
        println!("signer:     key id {}", key_id_hex(&manifest.signer));
    }
    Ok(())
}

/// Runs `baton sign`: hashes the file, signs its manifest, writes it.
pub fn sign(args: SignArgs) -> anyhow::Result<()> {
    let publisher = read_key_file(&args.key)
        .with_context(|| format!("cannot read the publisher key {}", args.key.display()))?;
    let name = baton_manager::content::check_name(&args.name)?;
    let version = args.version.unwrap_or_else(unix_now);
    if version > i64::MAX as u64 {
        bail!("--version must be at most {}", i64::MAX);
    }
    let expires = expiry(&args.expires)?;
    let chunk = baton_manager::content::check_chunk_size(args.chunk_size)?;
    let hashed = baton_manager::content::hash_file(&args.file, chunk)
        .with_context(|| format!("cannot read {}", args.file.display()))?;
    let manifest = Manifest::sign(
        &publisher,
        name,
        version,
        expires,
        hashed.length,
        hashed.chunk_size,
        hashed.tree.root(),
    );
    let out = args.out.clone().unwrap_or_else(|| {
        let mut p = args.file.clone().into_os_string();
        p.push(".manifest");
        PathBuf::from(p)
    });
    write_manifest_file(&out, &manifest)
        .with_context(|| format!("cannot write {}", out.display()))?;
    println!(
        "{}: {} version {version}, {} bytes, root {}, expires {}",
        out.display(),
        args.name,
        hashed.length,
        hex::encode(&manifest.root[..8]),
        expiry_text(expires)
    );
    Ok(())
}

#[cfg(test)]
mod test {
    use super::*;
    use baton_protocol::identity::Identity;

    fn edit_args(file: &Path) -> EditArgs {
        EditArgs {
            file: file.to_path_buf(),
            expires: None,
        }
    }

    #[test]
    fn edits_raise_the_version_once_per_signing_round_and_clear_the_signatures() {
        let dir = tempfile::tempdir().unwrap();
        let root = Identity::from_seed([1; 32]);
        let root_file = dir.path().join("root.key");
        baton_manager::trust::write_key_file(&root_file, &root).unwrap();
        let file = dir.path().join("trust.bin");
        run(TrustCommand::Init(InitArgs {
            roots: vec![key_hex(&root.public())],
            threshold: 1,
            expires: "365d".into(),
            out: file.clone(),
        }))
        .unwrap();
        let add = |key: u8, names: &str| {
            run(TrustCommand::AddPublisher(AddPublisherArgs {
                edit: edit_args(&file),
                key: key_hex(&Identity::from_seed([key; 32]).public()),
                names: names.split(',').map(String::from).collect(),
            }))
        };
        add(2, "fw-*,config").unwrap();
        assert_eq!(
            read(&file).unwrap().document.version,
            1,
            "unsigned: same round"
        );
        run(TrustCommand::Sign(SignTrustArgs {
            file: file.clone(),
            key: root_file.clone(),
        }))
        .unwrap();
        let signed = read(&file).unwrap();
        assert_eq!(signed.signed_by(&signed.document.roots), 1);
        add(3, "*").unwrap();
        let edited = read(&file).unwrap();
        assert_eq!(edited.document.version, 2, "the first edit after signing");
        assert!(edited.signatures.is_empty());
        run(TrustCommand::RemovePublisher(RemovePublisherArgs {
            edit: edit_args(&file),
            key: key_hex(&Identity::from_seed([2; 32]).public()),
        }))
        .unwrap();
        let edited = read(&file).unwrap();
        assert_eq!(
            edited.document.version, 2,
            "later edits keep the round's version"
        );
        assert_eq!(edited.document.publishers.len(), 1);
        assert!(add(4, "a*b").is_err(), "`*` only at the end");
        assert!(
            run(TrustCommand::Init(InitArgs {
                roots: vec![key_hex(&root.public())],
                threshold: 1,
                expires: "365d".into(),
                out: file.clone(),
            }))
            .is_err(),
            "init never replaces a file"
        );
    }
}
