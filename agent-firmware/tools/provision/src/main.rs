//! `baton-fw-provision`: writes a firmware device's provisioning block into its flash file.
//!
//! The firmware reads a 512-byte block at offset 0 of its emulated flash (the
//! 16 MiB file QEMU maps as PSRAM, see `run-qemu.sh`) at every boot: identity
//! seed, agent id, IPv4 settings, manager address and key. This tool creates
//! the file erased (`0xFF`) if it is missing, keeps an existing device's seed
//! unless told otherwise, writes the block and prints the id and the public
//! key to enrol at the manager (`baton enroll --id ID --key KEY`):
//!
//! ```text
//! baton-fw-provision --flash dev1.img --id dev1 --ip 10.77.0.11/24 \
//!     --manager 10.77.0.1:7300 --manager-key HEX --listen-port 7400
//! id=dev1
//! key=5f0c…
//! ```
//!
//! `--serial` makes the device reach the manager over UART0 (COBS-framed,
//! for `baton serve --serial PATH`) instead of `--manager`'s TCP address;
//! `--tcp` switches back. A serial device serves no peers.
//!
//! `--fault-demo stack-overflow|code-write` (a test switch, `off` clears it) makes the
//! device fault on purpose right after boot, to show its memory guards: the HIL tests
//! check the fault line it logs.
//!
//! `--image ELF` (the A/B build, linked to run from ACTIVE) writes the application into
//! ACTIVE of the flash file, the first image a device boots through the bootloader, and
//! erases embassy-boot's STATE, the install record and DFU (all of the old image's); with
//! `--image-out FILE` it writes the same bytes to FILE instead (content to publish as an
//! update, named `firmware`). `--image-version N` sets the version in the image header and
//! `--image-never-confirm` its test flag (an image that never marks itself booted, which the
//! bootloader must revert): images A, B and C from one build.
//!
//! `--show` prints what a file holds; `--erase-content` erases the content
//! partition (as after a factory reset). `--erase-records` erases the agent's
//! record area: the trust document it accepted, its version records and its
//! latest time (rollback protection then rests on the content the device still
//! holds: its version stays the floor for its name; other names start over).
//! It is the way back for a device whose record area was damaged: such a device
//! fails closed and refuses every manifest until then (HIL test (e) shows both). The block layout is in `src/config.rs` of the
//! firmware, which this tool compiles in unchanged.

use std::fs::OpenOptions;
use std::io::{Read as _, Seek as _, SeekFrom, Write as _};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::process::ExitCode;

use baton_protocol::identity::Identity;

#[path = "../../../src/config.rs"]
#[allow(dead_code)]
mod config;

use config::{
    Bytes, CONFIG_LEN, Config, FLAG_DEMO_CODE_WRITE, FLAG_DEMO_STACK_OVERFLOW, FLAG_SERIAL,
};

/// The firmware's serial-link encoder, compiled here for its tests.
#[cfg(test)]
#[path = "../../../src/cobs_tx.rs"]
mod cobs_tx;

/// Size of the flash file: QEMU's mps2 PSRAM.
const FLASH_SIZE: u64 = 16 * 1024 * 1024;
/// Where the content partition starts and ends (see the firmware's `src/board/mps2_an385/psram.rs`).
const CONTENT_OFFSET: u64 = 0x1_0000;
const CONTENT_END: u64 = 0xF0_0000;
/// Where the PSRAM is mapped on the board.
const PSRAM_BASE: u64 = 0x2100_0000;
/// ACTIVE, where an A/B application runs: offset in the flash file and size.
const ACTIVE: (u64, u64) = (0xF0_0000, 128 * 1024);
/// DFU, right after ACTIVE: an update waiting for the swap, and the swap's spare page.
const DFU: (u64, u64) = (ACTIVE.0 + ACTIVE.1, ACTIVE.1 + 4096);
/// embassy-boot's STATE (`0x4000`) and the A/B install record after it (`0x5000`).
const STATE_AND_INSTALL: (u64, u64) = (0x4000, 0x2000);
/// The A/B image header's magic (`src/board/mps2_an385/ab.rs`), and the flag of a test image
/// that never marks itself booted.
const IMAGE_MAGIC: &[u8; 4] = b"BTNI";
const IMAGE_FLAG_NEVER_CONFIRM: u32 = 1;
/// Where the agent's record area starts, and its size (see the firmware's `src/board/mps2_an385/psram.rs`).
const RECORDS: (u64, u64) = (0x2000, 0x2000);

const USAGE: &str =
    "usage: baton-fw-provision --flash FILE [--show] [--erase-content] [--erase-records]
    [--id ID] [--seed HEX | --new-seed] [--ip A.B.C.D/PREFIX] [--gateway A.B.C.D]
    [--manager A.B.C.D:PORT] [--manager-key HEX] [--listen-port N] [--token TOKEN]
    [--root-key HEX]... [--root-threshold N] [--site NAME] [--segment NAME] [--serial | --tcp]
    [--fault-demo stack-overflow|code-write|off]
    [--image ELF [--image-version N] [--image-never-confirm] [--image-out FILE]]";

fn parse_hex32(s: &str, what: &str) -> Result<[u8; 32], String> {
    let s = s.trim();
    if s.len() != 64 {
        return Err(format!("{what} must be 64 hex digits"));
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16)
            .map_err(|_| format!("{what} must be 64 hex digits"))?;
    }
    Ok(out)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn bytes<const N: usize>(s: &str, what: &str) -> Result<Bytes<N>, String> {
    Bytes::from_slice(s.as_bytes()).ok_or_else(|| format!("{what} is longer than {N} bytes"))
}

fn random_seed() -> Result<[u8; 32], String> {
    let mut seed = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut seed))
        .map_err(|e| format!("reading /dev/urandom: {e}"))?;
    Ok(seed)
}

fn empty_config() -> Config {
    Config {
        seed: [0; 32],
        manager_key: [0; 32],
        ip: [10, 0, 2, 15],
        prefix: 24,
        gateway: [0; 4],
        manager_ip: [0; 4],
        manager_port: 0,
        listen_port: 0,
        id: Bytes::empty(),
        token: Bytes::empty(),
        roots: [[0; 32]; 4],
        root_count: 0,
        root_threshold: 0,
        site: Bytes::empty(),
        segment: Bytes::empty(),
        flags: 0,
    }
}

fn show(c: &Config) {
    let id = Identity::from_seed(c.seed);
    println!("id={}", c.id.as_str().unwrap_or("<derived from MAC>"));
    println!("key={}", hex(&id.public().0));
    println!("ip={}/{}", Ipv4Addr::from(c.ip), c.prefix);
    println!("gateway={}", Ipv4Addr::from(c.gateway));
    println!(
        "manager={}",
        SocketAddrV4::new(Ipv4Addr::from(c.manager_ip), c.manager_port)
    );
    println!("manager_key={}", hex(&c.manager_key));
    println!("link={}", if c.serial() { "serial" } else { "tcp" });
    if c.flags & (FLAG_DEMO_STACK_OVERFLOW | FLAG_DEMO_CODE_WRITE) != 0 {
        println!(
            "fault_demo={}",
            if c.flags & FLAG_DEMO_STACK_OVERFLOW != 0 {
                "stack-overflow"
            } else {
                "code-write"
            }
        );
    }
    println!("listen_port={}", c.listen_port);
    println!("site={}", c.site.as_str().unwrap_or(""));
    println!("segment={}", c.segment.as_str().unwrap_or(""));
    for p in &c.roots[..c.root_count as usize] {
        println!("root_key={}", hex(p));
    }
    println!("root_threshold={}", c.root_threshold);
}

fn run() -> Result<(), String> {
    let mut args = std::env::args().skip(1);
    let mut flash = None;
    let mut show_only = false;
    let mut erase = false;
    let mut erase_records = false;
    let mut new_seed = false;
    let mut seed = None;
    let mut sets: Vec<(String, String)> = Vec::new();
    let mut roots = Vec::new();
    let mut root_threshold = None;
    let mut link = None;
    let mut demo = None;
    let mut image = None;
    let mut image_version = None;
    let mut never_confirm = false;
    let mut image_out = None;
    while let Some(a) = args.next() {
        let mut value = || {
            args.next()
                .ok_or_else(|| format!("{a} needs a value\n{USAGE}"))
        };
        match a.as_str() {
            "--flash" => flash = Some(value()?),
            "--show" => show_only = true,
            "--image" => image = Some(value()?),
            "--image-out" => image_out = Some(value()?),
            "--image-never-confirm" => never_confirm = true,
            "--image-version" => {
                let v = value()?;
                image_version = Some(
                    v.parse::<u32>()
                        .map_err(|_| format!("--image-version {v}: not a number"))?,
                )
            }
            "--erase-content" => erase = true,
            "--erase-records" => erase_records = true,
            "--new-seed" => new_seed = true,
            "--serial" => link = Some(true),
            "--tcp" => link = Some(false),
            "--fault-demo" => {
                let v = value()?;
                demo = Some(match v.as_str() {
                    "stack-overflow" => FLAG_DEMO_STACK_OVERFLOW,
                    "code-write" => FLAG_DEMO_CODE_WRITE,
                    "off" => 0,
                    _ => {
                        return Err(format!(
                            "--fault-demo {v}: stack-overflow, code-write or off"
                        ));
                    }
                })
            }
            "--seed" => seed = Some(parse_hex32(&value()?, "--seed")?),
            "--root-key" => roots.push(parse_hex32(&value()?, "--root-key")?),
            "--root-threshold" => {
                let v = value()?;
                root_threshold = Some(
                    v.parse::<u8>()
                        .map_err(|_| format!("--root-threshold {v}: not a number"))?,
                )
            }
            "--publisher-key" => {
                return Err(
                    "--publisher-key is gone: devices pin root keys (--root-key HEX) \
                     and trust the publishers a root-signed trust document lists"
                        .into(),
                );
            }
            "--id" | "--ip" | "--gateway" | "--manager" | "--manager-key" | "--listen-port"
            | "--token" | "--site" | "--segment" => {
                let v = value()?;
                sets.push((a, v));
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            _ => return Err(format!("unknown argument {a}\n{USAGE}")),
        }
    }
    let image = match image {
        Some(elf) => {
            let bytes = std::fs::read(&elf).map_err(|e| format!("{elf}: {e}"))?;
            let mut bin = image_from_elf(&bytes).map_err(|e| format!("{elf}: {e}"))?;
            patch_header(&mut bin, image_version, never_confirm)
                .map_err(|e| format!("{elf}: {e}"))?;
            if let Some(out) = &image_out {
                std::fs::write(out, &bin).map_err(|e| format!("{out}: {e}"))?;
                println!("image={out} bytes={}", bin.len());
                if flash.is_none() {
                    return Ok(());
                }
                None
            } else {
                Some(bin)
            }
        }
        None if image_out.is_some() || image_version.is_some() || never_confirm => {
            return Err(format!(
                "--image-out, --image-version and --image-never-confirm need --image ELF\n{USAGE}"
            ));
        }
        None => None,
    };
    let path = flash.ok_or_else(|| format!("--flash is required\n{USAGE}"))?;
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| format!("{path}: {e}"))?;
    let len = file.metadata().map_err(|e| format!("{path}: {e}"))?.len();
    if len == 0 {
        // A new device: erased NOR flash reads 0xFF.
        let block = vec![0xFFu8; 1024 * 1024];
        for _ in 0..FLASH_SIZE / block.len() as u64 {
            file.write_all(&block).map_err(|e| format!("{path}: {e}"))?;
        }
    } else if len != FLASH_SIZE {
        return Err(format!(
            "{path} is {len} bytes; a flash file is exactly 16 MiB"
        ));
    }
    let mut block = [0u8; CONFIG_LEN];
    file.seek(SeekFrom::Start(0))
        .and_then(|_| file.read_exact(&mut block))
        .map_err(|e| format!("{path}: {e}"))?;
    let existing = Config::decode(&block).ok();
    if show_only {
        match &existing {
            Some(c) => show(c),
            None => println!("{path}: no provisioning block"),
        }
        return Ok(());
    }
    let mut c = existing.clone().unwrap_or_else(empty_config);
    c.seed = match (seed, new_seed, &existing) {
        (Some(s), _, _) => s,
        (None, false, Some(e)) => e.seed,
        _ => random_seed()?,
    };
    for (k, v) in &sets {
        match k.as_str() {
            "--id" => c.id = bytes(v, "--id")?,
            "--ip" => {
                let (ip, prefix) = v.split_once('/').unwrap_or((v, "24"));
                c.ip = ip
                    .parse::<Ipv4Addr>()
                    .map_err(|e| format!("--ip {v}: {e}"))?
                    .octets();
                c.prefix = prefix
                    .parse::<u8>()
                    .ok()
                    .filter(|p| *p <= 32)
                    .ok_or_else(|| format!("--ip {v}: bad prefix length"))?;
            }
            "--gateway" => {
                c.gateway = v
                    .parse::<Ipv4Addr>()
                    .map_err(|e| format!("--gateway {v}: {e}"))?
                    .octets()
            }
            "--manager" => {
                let a: SocketAddrV4 = v.parse().map_err(|e| format!("--manager {v}: {e}"))?;
                c.manager_ip = a.ip().octets();
                c.manager_port = a.port();
            }
            "--manager-key" => c.manager_key = parse_hex32(v, "--manager-key")?,
            "--listen-port" => {
                c.listen_port = v.parse().map_err(|e| format!("--listen-port {v}: {e}"))?
            }
            "--token" => c.token = bytes(v, "--token")?,
            "--site" => c.site = bytes(v, "--site")?,
            "--segment" => c.segment = bytes(v, "--segment")?,
            _ => unreachable!("only the options matched above are collected"),
        }
    }
    match link {
        Some(true) => c.flags |= FLAG_SERIAL,
        Some(false) => c.flags &= !FLAG_SERIAL,
        None => {}
    }
    if let Some(bit) = demo {
        c.flags = (c.flags & !(FLAG_DEMO_STACK_OVERFLOW | FLAG_DEMO_CODE_WRITE)) | bit;
    }
    if !roots.is_empty() {
        if roots.len() > 4 {
            return Err("at most 4 --root-key".into());
        }
        c.roots = [[0; 32]; 4];
        c.roots[..roots.len()].copy_from_slice(&roots);
        c.root_count = roots.len() as u8;
        c.root_threshold = c.root_threshold.clamp(1, c.root_count);
    }
    if let Some(t) = root_threshold {
        if t == 0 || t > c.root_count {
            return Err(format!(
                "--root-threshold {t}: must be 1 ..= the number of root keys ({})",
                c.root_count
            ));
        }
        c.root_threshold = t;
    }
    file.seek(SeekFrom::Start(0))
        .and_then(|_| file.write_all(&c.encode()))
        .map_err(|e| format!("{path}: {e}"))?;
    if erase {
        erase_range(&mut file, CONTENT_OFFSET, CONTENT_END - CONTENT_OFFSET)
            .map_err(|e| format!("{path}: {e}"))?;
    }
    if erase_records {
        erase_range(&mut file, RECORDS.0, RECORDS.1).map_err(|e| format!("{path}: {e}"))?;
        eprintln!(
            "record area erased: the device forgets its trust document, version records and latest time"
        );
    }
    if let Some(bin) = image {
        write_image(&mut file, &bin).map_err(|e| format!("{path}: {e}"))?;
        println!(
            "image bytes={} in ACTIVE (STATE, install record and DFU erased)",
            bin.len()
        );
    }
    file.sync_all().map_err(|e| format!("{path}: {e}"))?;
    let id = Identity::from_seed(c.seed);
    println!("id={}", c.id.as_str().unwrap_or(""));
    println!("key={}", hex(&id.public().0));
    Ok(())
}

/// The bytes an A/B application ELF puts into ACTIVE: its loadable segments at their load
/// (physical) addresses, from ACTIVE's start to the end of the last one, gaps erased (`0xFF`).
/// Refuses an ELF that is not a 32-bit little-endian ARM executable or loads anything outside
/// ACTIVE (a build without the `ab` feature, linked for code memory at 0x0).
fn image_from_elf(elf: &[u8]) -> Result<Vec<u8>, String> {
    let u16_at = |o: usize| -> Result<u16, String> {
        elf.get(o..o + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .ok_or_else(|| "truncated ELF".to_string())
    };
    let u32_at = |o: usize| -> Result<u32, String> {
        elf.get(o..o + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .ok_or_else(|| "truncated ELF".to_string())
    };
    // ELFCLASS32, ELFDATA2LSB, EM_ARM.
    if elf.get(..6) != Some(&[0x7F, b'E', b'L', b'F', 1, 1][..]) || u16_at(18)? != 40 {
        return Err("not a 32-bit little-endian ARM ELF".into());
    }
    let (phoff, phentsize, phnum) = (u32_at(28)? as usize, u16_at(42)? as usize, u16_at(44)?);
    let (base, end) = (PSRAM_BASE + ACTIVE.0, PSRAM_BASE + ACTIVE.0 + ACTIVE.1);
    let mut image = Vec::new();
    for i in 0..phnum as usize {
        let ph = phoff + i * phentsize;
        // PT_LOAD with bytes in the file.
        let (kind, offset, paddr, filesz) = (
            u32_at(ph)?,
            u32_at(ph + 4)?,
            u32_at(ph + 12)?,
            u32_at(ph + 16)?,
        );
        if kind != 1 || filesz == 0 {
            continue;
        }
        let (start, len) = (u64::from(paddr), u64::from(filesz));
        if start < base || start + len > end {
            return Err(format!(
                "a segment loads at {paddr:#x}, outside ACTIVE ({base:#x}..{end:#x}): not an A/B build (--features ab)"
            ));
        }
        let at = (start - base) as usize;
        let data = elf
            .get(offset as usize..offset as usize + filesz as usize)
            .ok_or("truncated ELF segment")?;
        if image.len() < at + data.len() {
            image.resize(at + data.len(), 0xFF);
        }
        image[at..at + data.len()].copy_from_slice(data);
    }
    if image.is_empty() {
        return Err("no loadable segment".into());
    }
    Ok(image)
}

/// Sets the version and the never-confirm flag in the image header (in the first 1 KiB,
/// after the vector table).
fn patch_header(image: &mut [u8], version: Option<u32>, never_confirm: bool) -> Result<(), String> {
    let at = (0..image.len().min(1024).saturating_sub(16))
        .step_by(4)
        .find(|&i| &image[i..i + 4] == IMAGE_MAGIC)
        .ok_or("no image header (BTNI) in the image's first 1 KiB")?;
    if let Some(v) = version {
        image[at + 4..at + 8].copy_from_slice(&v.to_le_bytes());
    }
    if never_confirm {
        let flags = u32::from_le_bytes(image[at + 8..at + 12].try_into().expect("4 bytes"));
        image[at + 8..at + 12].copy_from_slice(&(flags | IMAGE_FLAG_NEVER_CONFIRM).to_le_bytes());
    }
    Ok(())
}

/// Writes `bin` into ACTIVE as the image the device boots next, and erases what belonged to
/// the image that ran before: embassy-boot's STATE (a pending swap or a trial would swap or
/// revert over the new image), the install record (the old image's install, which the new
/// image would report, and whose version would count as rolled back) and DFU (an update
/// of the old image, or the image a revert restores).
fn write_image(
    file: &mut (impl std::io::Write + std::io::Seek),
    bin: &[u8],
) -> std::io::Result<()> {
    erase_range(file, STATE_AND_INSTALL.0, STATE_AND_INSTALL.1)?;
    erase_range(file, DFU.0, DFU.1)?;
    erase_range(file, ACTIVE.0, ACTIVE.1)?;
    file.seek(SeekFrom::Start(ACTIVE.0))?;
    file.write_all(bin)
}

/// Sets `len` bytes of `file` from `offset` to `0xFF`, as erased NOR flash reads.
fn erase_range(
    file: &mut (impl std::io::Write + std::io::Seek),
    offset: u64,
    len: u64,
) -> std::io::Result<()> {
    file.seek(SeekFrom::Start(offset))?;
    let block = vec![0xFFu8; 64 * 1024];
    let mut left = len;
    while left > 0 {
        let n = left.min(block.len() as u64) as usize;
        file.write_all(&block[..n])?;
        left -= n as u64;
    }
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("baton-fw-provision: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn erasing_the_records_touches_only_the_record_area() {
        let mut image = std::io::Cursor::new(vec![0x5Au8; 0x2_0000]);
        erase_range(&mut image, RECORDS.0, RECORDS.1).unwrap();
        let image = image.into_inner();
        let (start, end) = (RECORDS.0 as usize, (RECORDS.0 + RECORDS.1) as usize);
        assert!(image[start..end].iter().all(|&b| b == 0xFF));
        assert!(
            image[..start].iter().all(|&b| b == 0x5A),
            "provisioning and boot log kept"
        );
        assert!(image[end..].iter().all(|&b| b == 0x5A), "content kept");
        assert!(
            end as u64 <= CONTENT_OFFSET,
            "the record area ends before the content"
        );
    }

    #[test]
    fn block_round_trips_and_detects_damage() {
        let mut c = empty_config();
        c.seed = [7; 32];
        c.id = Bytes::from_slice(b"dev-1").unwrap();
        c.manager_port = 7300;
        c.root_count = 1;
        c.roots[0] = [9; 32];
        c.root_threshold = 1;
        let mut b = c.encode();
        assert_eq!(Config::decode(&b), Ok(c));
        b[100] ^= 1;
        assert_eq!(Config::decode(&b), Err(config::ConfigError::BadChecksum));
        assert_eq!(
            Config::decode(&[0xFF; CONFIG_LEN]),
            Err(config::ConfigError::Missing)
        );
    }

    #[test]
    fn root_threshold_must_fit_the_root_count() {
        let mut c = empty_config();
        c.root_count = 2;
        c.roots[0] = [1; 32];
        c.roots[1] = [2; 32];
        c.root_threshold = 2;
        assert_eq!(Config::decode(&c.encode()), Ok(c.clone()));
        for bad in [0, 3] {
            c.root_threshold = bad;
            assert_eq!(
                Config::decode(&c.encode()),
                Err(config::ConfigError::BadField),
                "threshold {bad} of 2 roots"
            );
        }
        // No roots and threshold 0: a device without content trust (it refuses content).
        let none = empty_config();
        assert_eq!(Config::decode(&none.encode()), Ok(none));
    }

    #[test]
    fn serial_flag_round_trips() {
        let mut c = empty_config();
        assert!(!Config::decode(&c.encode()).unwrap().serial());
        c.flags |= FLAG_SERIAL;
        assert!(Config::decode(&c.encode()).unwrap().serial());
    }

    /// The encoding `CobsWriter` produces, byte by byte.
    fn stream(frame: &[u8]) -> Vec<u8> {
        let mut w = cobs_tx::CobsWriter::new();
        let mut out = Vec::new();
        while let Some(b) = w.next_byte(frame) {
            out.push(b);
            assert!(
                out.len() <= frame.len() + frame.len() / 254 + 2,
                "runs away"
            );
        }
        assert_eq!(w.next_byte(frame), None, "stays finished");
        out
    }

    #[test]
    fn cobs_writer_round_trips_through_the_protocol_reader() {
        use baton_protocol::frame::CobsReader;
        let mut cases: Vec<Vec<u8>> = vec![
            vec![0],
            vec![0, 0],
            vec![1],
            vec![0x11, 0, 0x22],
            vec![0x11, 0x22, 0],
            vec![1; 253],
            vec![1; 254],
            vec![1; 255],
            vec![1; 508],
            vec![1; 509],
        ];
        let mut with_zero = vec![1u8; 600];
        with_zero[254] = 0;
        cases.push(with_zero);
        // Pseudo-random frames of every length up to a chunk frame, sparse and dense zeros.
        let mut x: u32 = 12345;
        for len in (1..4600).step_by(97) {
            let frame: Vec<u8> = (0..len)
                .map(|_| {
                    x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                    let b = (x >> 16) as u8;
                    if len % 2 == 0 { b } else { b | 1 }
                })
                .collect();
            cases.push(frame);
        }
        let mut buf = vec![0u8; 8192];
        for frame in &cases {
            let wire = stream(frame);
            assert_eq!(*wire.last().unwrap(), 0, "ends with the delimiter");
            assert!(!wire[..wire.len() - 1].contains(&0), "no zero inside");
            // The protocol's decoder gets the frame back.
            let mut r = CobsReader::new(&mut buf);
            let mut got = None;
            for &b in &wire {
                if let Some(res) = r.push(b) {
                    got = Some(res.expect("decodes"));
                }
            }
            let n = got.expect("one frame");
            assert_eq!(&r.frame()[..n], &frame[..], "len {}", frame.len());
        }
    }

    #[test]
    fn cobs_writer_writes_what_the_protocol_encoder_writes() {
        let mut out = vec![0u8; 8192];
        let mut x: u32 = 99;
        let mut cases: Vec<Vec<u8>> = [0usize, 1, 253, 254, 255, 508, 509, 4540]
            .iter()
            .map(|&n| vec![1u8; n.max(1)])
            .collect();
        cases.push(vec![5, 0, 7, 0, 0, 9]);
        cases.push([vec![0], vec![1; 254]].concat());
        for len in (1..4600).step_by(131) {
            cases.push(
                (0..len)
                    .map(|_| {
                        x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                        (x >> 16) as u8 | (len % 3 != 0) as u8
                    })
                    .collect(),
            );
        }
        for frame in &cases {
            let n = baton_protocol::frame::cobs_encode(frame, &mut out).unwrap();
            assert_eq!(stream(frame), &out[..n], "len {}", frame.len());
        }
    }

    /// A minimal 32-bit little-endian ARM ELF with the given program headers
    /// (type, load address, bytes in the file, bytes in memory).
    fn elf(segments: &[(u32, u32, Vec<u8>, u32)]) -> Vec<u8> {
        let phoff = 52u32;
        let mut data_at = phoff + 32 * segments.len() as u32;
        let mut out = vec![0u8; 52];
        out[..6].copy_from_slice(&[0x7F, b'E', b'L', b'F', 1, 1]);
        out[18..20].copy_from_slice(&40u16.to_le_bytes());
        out[28..32].copy_from_slice(&phoff.to_le_bytes());
        out[42..44].copy_from_slice(&32u16.to_le_bytes());
        out[44..46].copy_from_slice(&(segments.len() as u16).to_le_bytes());
        let mut data = Vec::new();
        for (kind, paddr, bytes, memsz) in segments {
            for v in [
                *kind,
                data_at,
                *paddr,
                *paddr,
                bytes.len() as u32,
                *memsz,
                5,
                4,
            ] {
                out.extend_from_slice(&v.to_le_bytes());
            }
            data.extend_from_slice(bytes);
            data_at += bytes.len() as u32;
        }
        out.extend_from_slice(&data);
        out
    }

    #[test]
    fn an_image_is_the_loadable_segments_at_their_place_in_active() {
        let base = (PSRAM_BASE + ACTIVE.0) as u32;
        let image = image_from_elf(&elf(&[
            (1, base, vec![1, 2, 3, 4, 5, 6, 7, 8], 8),
            (1, 0x2000_0000, vec![], 64), // .bss: nothing in the file
            (1, base + 16, vec![9, 9, 9, 9], 4),
            (4, 0, vec![0xAA; 4], 4), // not PT_LOAD
        ]))
        .unwrap();
        assert_eq!(
            image,
            [&[1, 2, 3, 4, 5, 6, 7, 8][..], &[0xFF; 8], &[9; 4]].concat()
        );
    }

    #[test]
    fn an_elf_that_loads_outside_active_is_refused() {
        let e = image_from_elf(&elf(&[(1, 0, vec![1; 8], 8)])).unwrap_err();
        assert!(e.contains("not an A/B build"), "{e}");
        let end = (PSRAM_BASE + ACTIVE.0 + ACTIVE.1) as u32;
        assert!(image_from_elf(&elf(&[(1, end - 4, vec![1; 8], 8)])).is_err());
        assert!(
            image_from_elf(b"\x7fELF\x02\x01").is_err(),
            "64-bit refused"
        );
        assert!(image_from_elf(&elf(&[])).is_err(), "nothing to load");
    }

    #[test]
    fn writing_an_image_erases_state_install_record_and_dfu() {
        let mut flash = std::io::Cursor::new(vec![0x5Au8; FLASH_SIZE as usize]);
        let bin = vec![0x11u8; 1000];
        write_image(&mut flash, &bin).unwrap();
        let flash = flash.into_inner();
        let range = |(at, len): (u64, u64)| at as usize..(at + len) as usize;
        let erased = |r: std::ops::Range<usize>| flash[r].iter().all(|&b| b == 0xFF);
        let active = range(ACTIVE);
        assert_eq!(flash[active.start..active.start + bin.len()], bin[..]);
        assert!(
            erased(active.start + bin.len()..active.end),
            "the rest of ACTIVE"
        );
        assert!(
            erased(range(STATE_AND_INSTALL)),
            "STATE and the install record"
        );
        assert!(erased(range(DFU)), "DFU");
        assert_eq!(DFU.0 + DFU.1, 0xF4_1000, "DFU ends where psram.rs says");
        // Everything else is kept: provisioning block, boot log, records, content, the rest.
        let kept = |r: std::ops::Range<usize>| flash[r].iter().all(|&b| b == 0x5A);
        assert!(
            kept(0..STATE_AND_INSTALL.0 as usize),
            "provisioning, boot log, records"
        );
        assert!(kept(
            (STATE_AND_INSTALL.0 + STATE_AND_INSTALL.1) as usize..ACTIVE.0 as usize
        ));
        assert!(kept((DFU.0 + DFU.1) as usize..flash.len()));
    }

    #[test]
    fn the_header_version_and_never_confirm_flag_are_patched() {
        let mut image = vec![0u8; 0x100];
        image[0xC0..0xC4].copy_from_slice(IMAGE_MAGIC);
        image[0xC4..0xC8].copy_from_slice(&1u32.to_le_bytes());
        let before = image.clone();
        patch_header(&mut image, None, false).unwrap();
        assert_eq!(image, before, "nothing asked, nothing changed");
        patch_header(&mut image, Some(7), true).unwrap();
        assert_eq!(image[0xC4..0xC8], 7u32.to_le_bytes());
        assert_eq!(image[0xC8..0xCC], IMAGE_FLAG_NEVER_CONFIRM.to_le_bytes());
        assert_eq!(image[..0xC4], before[..0xC4]);
        assert_eq!(image[0xCC..], before[0xCC..]);
        assert!(patch_header(&mut vec![0u8; 0x100], Some(2), false).is_err());
    }
}
