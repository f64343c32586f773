//! `hil-fake-manager`: a manager stand-in that serves one device one corrupted chunk.
//!
//! The HIL test for claim "a corrupted chunk is rejected before it is written
//! to flash" runs this inside its network namespace. It accepts one device
//! over the real link layer (`baton_agent_core::linux::link`: Noise XX,
//! length-prefixed frames), authenticates it by its enrolled key, answers its
//! `Report` with a `Welcome`, then (with `--root-seed`) the trust document that
//! root key signed, listing the publisher for every name (devices pin the root,
//! not the publisher), and sends `Fetch` for the content (every chunk from the
//! manager). It answers `ChunkRequest`s from
//! the file, except that the first answer for chunk `--corrupt K` has one
//! data byte flipped (the Merkle proof is the genuine one).
//!
//! It talks to the test over its standard streams, one line per event:
//! `listening`, `connected`, `corrupted K`, then `rerequest K` when the device
//! asks for chunk K again, after which it waits for a line `go` on standard
//! input before it sends the genuine chunk (the test inspects the device
//! meanwhile); `have` when the device confirms, `done` after answering its
//! `NextPlease` with `Done`. It exits when the device disconnects or standard
//! input closes.
//!
//! Usage: `hil-fake-manager --listen ADDR --seed HEX --publisher-seed HEX
//! [--root-seed HEX] --device-id ID --device-key HEX --content FILE --corrupt K`
//! (chunks of 4 KiB).

use std::io::BufRead as _;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use baton_agent_core::linux::link::{self, Limits, LinkError};
use baton_protocol::identity::{AgentCert, Identity};
use baton_protocol::merkle::{MerkleTree, leaf_hash};
use baton_protocol::message::Message;
use baton_protocol::session::{Hello, Role};
use baton_protocol::types::{AgentId, JobRef, PublicKey};
use baton_protocol::{Manifest, caps};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

const CHUNK: usize = 4096;

struct Args {
    listen: String,
    seed: [u8; 32],
    publisher_seed: [u8; 32],
    root_seed: Option<[u8; 32]>,
    device_id: AgentId,
    device_key: PublicKey,
    content: Vec<u8>,
    corrupt: u32,
}

fn hex32(s: &str) -> anyhow::Result<[u8; 32]> {
    hex::decode(s)?
        .try_into()
        .map_err(|_| anyhow!("a key or seed is 32 bytes of hex"))
}

fn parse_args() -> anyhow::Result<Args> {
    let mut it = std::env::args().skip(1);
    let (mut listen, mut seed, mut publisher_seed, mut device_id, mut device_key) =
        (None, None, None, None, None);
    let (mut content, mut corrupt, mut root_seed) = (None, None, None);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--listen" => listen = Some(value),
            "--seed" => seed = Some(hex32(&value)?),
            "--publisher-seed" => publisher_seed = Some(hex32(&value)?),
            "--root-seed" => root_seed = Some(hex32(&value)?),
            "--device-id" => {
                device_id =
                    Some(AgentId::try_from(value.as_str()).map_err(|_| anyhow!("bad device id"))?)
            }
            "--device-key" => device_key = Some(PublicKey(hex32(&value)?)),
            "--content" => content = Some(std::fs::read(&value)?),
            "--corrupt" => corrupt = Some(value.parse()?),
            other => bail!("unknown flag {other}"),
        }
    }
    let need = |what: &str| anyhow!("--{what} is required");
    Ok(Args {
        listen: listen.ok_or_else(|| need("listen"))?,
        seed: seed.ok_or_else(|| need("seed"))?,
        publisher_seed: publisher_seed.ok_or_else(|| need("publisher-seed"))?,
        root_seed,
        device_id: device_id.ok_or_else(|| need("device-id"))?,
        device_key: device_key.ok_or_else(|| need("device-key"))?,
        content: content.ok_or_else(|| need("content"))?,
        corrupt: corrupt.ok_or_else(|| need("corrupt"))?,
    })
}

/// The `Trust` message: version 1, no expiry, `publisher` listed for every name, signed
/// by `root`.
fn trust_message(root: &Identity, publisher: &Identity) -> anyhow::Result<Vec<u8>> {
    use baton_protocol::trust::{NamePattern, PublisherGrant, SignedTrust, TrustDocument};
    let all = NamePattern::try_from("*").map_err(|_| anyhow!("pattern"))?;
    let mut signed = SignedTrust::new(TrustDocument {
        version: 1,
        expires: 0,
        threshold: 1,
        roots: [root.public()].into_iter().collect(),
        publishers: [PublisherGrant {
            key: publisher.public(),
            names: [all].into_iter().collect(),
        }]
        .into_iter()
        .collect(),
    });
    signed.sign(root).map_err(|e| anyhow!("{e}"))?;
    let mut buf = vec![0u8; baton_protocol::trust::MAX_TRUST_BYTES];
    let document = signed.encode(&mut buf).map_err(|e| anyhow!("{e}"))?;
    Ok(Message::Trust { document }.to_vec())
}

/// One line to the test, at once.
fn say(line: &str) {
    println!("{line}");
}

async fn run(args: Args) -> anyhow::Result<()> {
    let manager = Identity::from_seed(args.seed);
    let publisher = Identity::from_seed(args.publisher_seed);
    let chunks: Vec<&[u8]> = args.content.chunks(CHUNK).collect();
    let tree = MerkleTree::from_leaves(chunks.iter().map(|c| leaf_hash(c)).collect());
    let manifest = Manifest::sign(
        &publisher,
        "hil-corrupt".try_into().map_err(|_| anyhow!("name"))?,
        1,
        0,
        args.content.len() as u64,
        CHUNK as u32,
        tree.root(),
    );
    let root = manifest.root;
    let job = JobRef { id: 1, epoch: 1 };
    let trust = args
        .root_seed
        .map(|seed| trust_message(&Identity::from_seed(seed), &publisher))
        .transpose()?;

    // The test's "go" lines.
    let (go_tx, mut go_rx) = mpsc::unbounded_channel::<()>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if line.trim() == "go" && go_tx.send(()).is_err() {
                break;
            }
        }
    });

    let listener = TcpListener::bind(&args.listen).await?;
    say("listening");
    let (stream, _) = tokio::time::timeout(Duration::from_secs(60), listener.accept())
        .await
        .map_err(|_| anyhow!("no device connected within 60 s"))??;
    stream.set_nodelay(true)?;
    let hello = Hello::new(
        Role::Manager,
        AgentId::try_from("manager").map_err(|_| anyhow!("id"))?,
        caps::RELAY_V1 | caps::SERVE,
        None,
    );
    let (device_id, device_key) = (args.device_id.clone(), args.device_key);
    let (link, ()) = link::accept(stream, &manager, hello, &Limits::default(), |hs| {
        let id_ok = hs.remote_hello().is_some_and(|h| h.id == device_id);
        if id_ok && hs.remote_is(&device_key).is_ok() {
            Ok(())
        } else {
            Err(LinkError::Refused("not the enrolled device".into()))
        }
    })
    .await?;
    let (mut reader, mut writer) = link.split();
    say("connected");

    let mut corrupted_sent = false;
    let mut have = false;
    loop {
        let bytes = match tokio::time::timeout(Duration::from_secs(60), reader.recv()).await {
            Err(_) => bail!("the device went quiet for 60 s"),
            Ok(Err(LinkError::Closed)) => return Ok(()),
            Ok(Err(e)) => return Err(e.into()),
            Ok(Ok(b)) => b.to_vec(),
        };
        let reply = match Message::decode(&bytes)? {
            Message::Report(r) => {
                let welcome = Message::Welcome {
                    cert: AgentCert::issue(&manager, r.id.clone(), args.device_key),
                    unix_time: 0,
                    publishers: heapless::Vec::new(),
                };
                writer.send(&welcome.to_vec()).await?;
                if let Some(t) = &trust {
                    writer.send(t).await?;
                }
                if have {
                    continue;
                }
                Message::Fetch {
                    job,
                    manifest: manifest.clone(),
                    sources: heapless::Vec::new(),
                    next: None,
                }
                .to_vec()
            }
            Message::ChunkRequest { root: r, index } if r == root => {
                let Some(data) = chunks.get(index as usize) else {
                    bail!("request for chunk {index} past the end");
                };
                let proof = tree.proof(index).context("proof of a chunk in range")?;
                let mut data = data.to_vec();
                if index == args.corrupt {
                    if corrupted_sent {
                        say(&format!("rerequest {index}"));
                        tokio::time::timeout(Duration::from_secs(60), go_rx.recv())
                            .await
                            .map_err(|_| anyhow!("no go from the test within 60 s"))?
                            .context("the test closed standard input")?;
                    } else {
                        data[100] ^= 0x01;
                        corrupted_sent = true;
                        say(&format!("corrupted {index}"));
                    }
                }
                Message::Chunk {
                    root,
                    index,
                    proof,
                    data: &data,
                }
                .to_vec()
            }
            Message::Ping { nonce } => Message::Pong { nonce }.to_vec(),
            Message::Have { .. } => {
                have = true;
                say("have");
                continue;
            }
            Message::NextPlease { .. } if have => {
                writer.send(&Message::Done { job }.to_vec()).await?;
                say("done");
                continue;
            }
            _ => continue,
        };
        writer.send(&reply).await?;
    }
}

fn main() -> ExitCode {
    let result = parse_args().and_then(|args| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(run(args))
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hil-fake-manager: {e:#}");
            ExitCode::FAILURE
        }
    }
}
