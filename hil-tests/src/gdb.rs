//! A small client of QEMU's gdbstub (the GDB remote serial protocol on a unix
//! socket, `run-qemu.sh --gdb SOCKET`): enough to stop a device at an exact
//! write to its flash and read its memory there, so that a power cut
//! (SIGKILL of QEMU) lands at a chosen point of a flash operation.
//!
//! Attaching pauses the board (QEMU stops the machine when a debugger
//! connects); [`Gdb::resume`] lets it run and [`Gdb::wait_stop`] waits until a watchpoint hits.
//! QEMU stops an Arm board before the store that hit a write watchpoint;
//! [`Gdb::unwatch_writes`] then [`Gdb::step`] complete it, so the watched word
//! holds what was written.
//! Every wait is bounded; protocol errors panic with what QEMU answered.

use std::io::{Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// Longest packet taken from QEMU (its replies here are a few dozen bytes).
const MAX_PACKET: usize = 4096;

/// A debugger session with one QEMU board.
#[derive(Debug)]
pub struct Gdb {
    stream: UnixStream,
    pending: Vec<u8>,
}

impl Gdb {
    /// Attaches to the gdbstub at `socket` (waiting up to `limit` for it); the board pauses.
    pub fn attach(socket: &Path, limit: Duration) -> Gdb {
        let deadline = Instant::now() + limit;
        let stream = loop {
            match UnixStream::connect(socket) {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline => {
                    panic!("gdbstub at {}: {e}", socket.display())
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        let mut gdb = Gdb {
            stream,
            pending: Vec::new(),
        };
        // Asking why the target stopped makes sure it has (attaching stops it).
        let why = gdb.command("?", limit);
        assert!(
            why.starts_with('S') || why.starts_with('T'),
            "gdbstub did not report a stopped board: {why:?}"
        );
        gdb
    }

    /// Stops the board at the next write to any byte of `addr..addr + len`.
    pub fn watch_writes(&mut self, addr: u32, len: u32) {
        let reply = self.command(&format!("Z2,{addr:x},{len:x}"), Duration::from_secs(5));
        assert_eq!(reply, "OK", "QEMU refused a write watchpoint at {addr:#x}");
    }

    /// Removes the watchpoint [`Gdb::watch_writes`] set.
    pub fn unwatch_writes(&mut self, addr: u32, len: u32) {
        let reply = self.command(&format!("z2,{addr:x},{len:x}"), Duration::from_secs(5));
        assert_eq!(
            reply, "OK",
            "QEMU refused to remove the watchpoint at {addr:#x}"
        );
    }

    /// Lets the board run (until a watchpoint stops it: see [`Gdb::wait_stop`]).
    pub fn resume(&mut self) {
        self.send("c");
    }

    /// Waits at most `limit` for the running board to stop; returns the stop reply
    /// (e.g. `T05thread:01;watch:21012800;`).
    pub fn wait_stop(&mut self, limit: Duration) -> String {
        let reply = self.receive(limit);
        assert!(
            reply.starts_with('T') || reply.starts_with('S'),
            "unexpected answer to continue: {reply:?}"
        );
        reply
    }

    /// Executes one instruction of the paused board (interrupts held off, QEMU's default).
    ///
    /// QEMU stops an Arm board *before* the store that hit a write watchpoint; removing
    /// the watchpoint and stepping completes that store (with the watchpoint in place the
    /// step stops at the same store again).
    pub fn step(&mut self) {
        let reply = self.command("s", Duration::from_secs(5));
        assert!(
            reply.starts_with('T') || reply.starts_with('S'),
            "unexpected answer to a step: {reply:?}"
        );
    }

    /// Reads the little-endian word at `addr` of the paused board.
    pub fn read_word(&mut self, addr: u32) -> u32 {
        let reply = self.command(&format!("m{addr:x},4"), Duration::from_secs(5));
        let bytes = hex::decode(&reply)
            .unwrap_or_else(|_| panic!("memory read at {addr:#x} answered {reply:?}"));
        u32::from_le_bytes(
            bytes
                .try_into()
                .unwrap_or_else(|b| panic!("memory read at {addr:#x} gave {b:?}")),
        )
    }

    /// Sends `data` and returns the reply packet.
    fn command(&mut self, data: &str, limit: Duration) -> String {
        self.send(data);
        self.receive(limit)
    }

    /// Sends one packet and waits for QEMU's acknowledgement.
    fn send(&mut self, data: &str) {
        let sum = data.bytes().fold(0u8, |a, b| a.wrapping_add(b));
        let packet = format!("${data}#{sum:02x}");
        for _ in 0..3 {
            self.stream
                .write_all(packet.as_bytes())
                .expect("write to the gdbstub");
            // QEMU may send a stop packet of its own first (it does when a debugger
            // attaches): take it and go on waiting for the acknowledgement.
            for _ in 0..4 {
                match self.next_byte(Duration::from_secs(5)) {
                    b'+' => return,
                    b'-' => break,
                    b'$' => {
                        self.packet_body(Instant::now() + Duration::from_secs(5));
                    }
                    other => panic!("gdbstub answered {other:#x} instead of an acknowledgement"),
                }
            }
        }
        panic!("gdbstub refused the packet {packet:?} three times");
    }

    /// Receives one packet (acknowledging it) within `limit`.
    fn receive(&mut self, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if self.next_byte(left) != b'$' {
                continue; // stray acknowledgements
            }
            if let Some(data) = self.packet_body(deadline) {
                return data;
            }
        }
    }

    /// Reads a packet's body after its `$` and acknowledges it; `None` (and a request
    /// to send it again) if its checksum is wrong.
    fn packet_body(&mut self, deadline: Instant) -> Option<String> {
        let mut data = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_byte(left) {
                b'#' => break,
                b => data.push(b),
            }
            assert!(data.len() <= MAX_PACKET, "gdbstub packet too long");
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let check = [self.next_byte(left), self.next_byte(left)];
        let sum = data.iter().fold(0u8, |a, &b| a.wrapping_add(b));
        if std::str::from_utf8(&check).ok() != Some(&format!("{sum:02x}")) {
            self.stream.write_all(b"-").expect("write to the gdbstub");
            return None;
        }
        self.stream.write_all(b"+").expect("write to the gdbstub");
        Some(String::from_utf8_lossy(&data).into_owned())
    }

    /// The next byte from QEMU, waiting at most `limit`.
    fn next_byte(&mut self, limit: Duration) -> u8 {
        if self.pending.is_empty() {
            let limit = limit.max(Duration::from_millis(1));
            self.stream
                .set_read_timeout(Some(limit))
                .expect("gdbstub socket timeout");
            let mut buf = [0u8; 512];
            let n = match self.stream.read(&mut buf) {
                Ok(0) => panic!("the gdbstub closed the connection"),
                Ok(n) => n,
                Err(e) => panic!("no answer from the gdbstub within {limit:?}: {e}"),
            };
            self.pending.extend(buf[..n].iter().rev());
        }
        self.pending.pop().expect("a byte read")
    }
}
