//! The thin embassy driver around agent-core's sans-IO [`Agent`].
//!
//! One task owns everything: the agent and its flash store, the TCP sockets,
//! one frame buffer, the one handshake in progress and the per-connection
//! session keys. It loops over
//!
//! 1. **service** each connection slot without blocking: connect/accept
//!    progress, read whole frames once they sit completely in the socket's
//!    receive buffer (2-byte length header, checked against the slot's limit
//!    before the body is read), drive the Noise XX handshake, decrypt frames
//!    and feed them to [`Agent::handle_frame`];
//! 2. **drain** the agent: `poll_transmit` (sealed into the transmit buffer
//!    and written to the slot's socket; a frame that does not fit yet stays
//!    pending, and nothing more is polled or read until it is out), then `poll_event`
//!    (peer connects, closes, job state, logged for the HIL tests);
//! 3. **sleep** until a socket changes, the agent's next deadline, a
//!    connection deadline, or (while a frame is only partly received) 1 ms.
//!
//! Slots: 0 = the manager session (initiator, pinned key, reconnects with
//! backoff), 1 = one outgoing peer connection (initiator, key from the
//! manager's `Source::Peer`), 2 = one incoming peer on the listener
//! (responder, must show a certificate signed by the manager). A `Connect`
//! the device has no free slot for is answered with `handle_connect_failed`,
//! so the manager routes those chunks elsewhere.
//!
//! Because a frame is only taken from a socket when it is complete, the
//! device needs one frame buffer in all rather than one per connection and
//! direction: the sockets' own buffers (the TCP windows) hold partial frames.
//! TCP windows are ≤ 4.5 KiB: QEMU's LAN9118 drops frames beyond ~10.5 KB of
//! backlog. Handshakes run one initiator and one responder at a time (a
//! connection whose turn has not come waits, TCP-connected, in
//! `State::Connected`). Two engines, not one: two devices dialling each
//! other at once would otherwise each wait for the other's responder.
//!
//! **Serial link.** A device provisioned with `FLAG_SERIAL` runs slot 0 over
//! UART0 instead of TCP ([`crate::board::serial`]): the same Noise handshake and
//! encrypted messages, each frame COBS-encoded and ended by `0x00` (SPEC §1).
//! Received bytes go through a `CobsReader` whose buffer is the manager
//! socket's receive buffer (unused then); a complete frame is copied into the
//! frame buffer and handled like a TCP frame. Outgoing frames are encoded
//! byte by byte from the frame buffer as the UART takes them
//! ([`crate::cobs_tx`]). A serial line has no connection state, so the slot
//! counts as up from the first handshake message and as lost when the
//! handshake stalls or the manager stays silent (the agent pings it every
//! 10 s); then a new handshake starts. Handshake messages begin with an extra
//! `0x00`, which ends whatever a cut-off frame left on the line.
//!
//! **A/B build** (feature `ab`, [`update`]): `Running` after each session's first report,
//! firmware images installed into DFU for the bootloader, confirmed after the welcome, the
//! watchdog fed once per loop.

use core::future::poll_fn;
use core::pin::pin;
use core::task::Poll;
use core::time::Duration as CoreDuration;

use baton_agent_core::agent::{Agent, AgentConfig, ConnId, Direction, Event, PeerInfo};

use baton_agent_core::store::ContentStore;
use baton_protocol::frame::{self, CobsReader};
use baton_protocol::identity::Identity;
use baton_protocol::merkle::Proof;
use baton_protocol::message::CHUNK_OVERHEAD;
use baton_protocol::session::{Handshake, Hello, MAX_TOKEN_LEN, Opener, Role, Sealer, TAG_LEN};
use baton_protocol::{AgentId, Digest, LinkInfo, PeerAddr, PublicKey, caps};
use embassy_futures::poll_once;
use embassy_net::tcp::{State as TcpState, TcpSocket};
use embassy_net::{IpEndpoint, Ipv4Address, Stack};
use embassy_time::{Duration, Instant, Timer};
use sha2::{Digest as _, Sha256};

use crate::board::{Store, serial};
use crate::cobs_tx::CobsWriter;
use crate::config::Config;
use crate::entropy::Entropy;

#[cfg(feature = "ab")]
mod update;

/// Largest chunk this device accepts (reported as `max_chunk`).
pub const MAX_CHUNK: u32 = 4096;
/// Deepest Merkle proof a chunk frame may carry: the content partition holds
/// at most 4080 chunks of 4 KiB (depth 12); smaller chunks give shallower
/// frames. Content that does not fit is refused before any chunk is asked for.
pub const MAX_PROOF_DEPTH: usize = 12;
/// Largest encrypted frame: a chunk message with the deepest proof, plus the tag.
pub const FRAME_MAX: usize = MAX_CHUNK as usize
    + (CHUNK_OVERHEAD - 32 * baton_protocol::merkle::MAX_DEPTH)
    + 32 * MAX_PROOF_DEPTH
    + TAG_LEN;
/// Peers served at once (reported as `max_peers`): one incoming slot fits the RAM budget.
pub const MAX_PEERS: u16 = 1;
/// Chunk requests in flight per source.
pub const WINDOW: u16 = 4;
/// Connection slots: manager, one outgoing peer, one incoming peer.
pub const SLOTS: usize = 3;
/// The agent's peer table: the incoming slot plus the outgoing one.
const PEER_TABLE: usize = 2;

/// The agent as this device runs it: one content, two peer connections.
pub type DeviceAgent = Agent<Store, 1, PEER_TABLE>;

/// Largest COBS encoding of a frame (delimiter not included).
const COBS_MAX: usize = FRAME_MAX + FRAME_MAX / 254 + 1;
/// Receive buffer of the manager and outgoing-peer sockets (also the TCP
/// window): one whole chunk frame with its length header. On a serial device
/// the manager's buffer holds one COBS-encoded frame instead.
pub const BIG_RX: usize = if COBS_MAX > frame::HEADER_LEN + FRAME_MAX {
    COBS_MAX
} else {
    frame::HEADER_LEN + FRAME_MAX
}
.next_multiple_of(64);
/// Receive buffer of an incoming-peer socket (handshake and requests only).
pub const SMALL_RX: usize = 384;
/// Transmit buffer of the manager socket (reports, progress; written in parts if larger).
pub const MANAGER_TX: usize = 512;
/// Transmit buffer of the outgoing-peer socket (requests only).
pub const OUT_TX: usize = 256;
/// Transmit buffer of an incoming-peer socket (chunks, written in parts).
///
/// More than one MSS (1460), so a chunk goes out in at least two segments
/// and the receiver acknowledges at once instead of after its delayed-ACK
/// timer (10 ms in smoltcp, up to 40 ms on Linux): 1 KiB gave ~120 KB/s to a
/// peer, 2 KiB ~670 KB/s, a whole frame (4.5 KiB) ~940 KB/s but leaves only
/// 3 KB of stack margin.
pub const IN_TX: usize = 2048;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const SEND_STALL: Duration = Duration::from_secs(20);
const SOCKET_TIMEOUT: Duration = Duration::from_secs(30);
const KEEPALIVE: Duration = Duration::from_secs(10);
const CLOSE_GRACE: Duration = Duration::from_millis(200);
/// A serial handshake answers within this (QEMU's pty backend may take ~1 s to notice a reader).
const SERIAL_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(4);
/// A serial session with nothing from the manager for this long is started again
/// (the agent pings the manager every 10 s, so a live manager is never this quiet).
const SERIAL_SILENCE: Duration = Duration::from_secs(25);
/// How long a handshake message may wait for the UART.
const SERIAL_WRITE_LIMIT: Duration = Duration::from_millis(200);

/// What a slot is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, defmt::Format)]
enum Kind {
    Manager,
    Outgoing,
    Incoming,
}

/// Where a slot's connection stands.
enum State {
    /// Nothing; `retry` says when the manager slot dials again.
    Idle { retry: Option<Instant> },
    /// TCP connect in progress.
    Connecting { deadline: Instant },
    /// Listening for a peer (incoming slots).
    Listening,
    /// TCP up; waiting for the (single) handshake engine to be free.
    Connected { deadline: Instant },
    /// This slot owns its kind's engine in [`Node::hs`]: Noise handshake in progress.
    Handshake { deadline: Instant },
    /// Session up: frames flow.
    Up {
        seal: Sealer,
        open: Opener,
        conn: ConnId,
    },
    /// Aborted; waiting for the reset to leave before the socket is reused.
    Closing { until: Instant },
}

/// One connection slot: its socket, state and frame-header progress.
struct Slot {
    sock: TcpSocket<'static>,
    kind: Kind,
    state: State,
    header: [u8; frame::HEADER_LEN],
    have_header: usize,
    want: usize,
    max_frame: usize,
    /// Outgoing: the peer being dialled (id and expected key).
    peer: Option<(AgentId, PublicKey)>,
}

/// A sealed frame waiting for room in its socket.
#[derive(Clone, Copy)]
struct Pending {
    slot: usize,
    off: usize,
    end: usize,
    since: Instant,
}

/// The one frame buffer: a length header, then one encrypted frame.
///
/// Received frames are read into it (after the header position), decrypted
/// in place and handed to the agent; the agent then encodes its next frame
/// into the same place, which is sealed and written out. While a sealed frame
/// waits for room in its socket no frame is read.
pub type FrameBuf = [u8; frame::HEADER_LEN + FRAME_MAX];

/// The manager session's serial line (slot 0 on a serial device).
struct SerialLink {
    /// Decodes received bytes; its buffer is the manager socket's receive buffer.
    rx: CobsReader<'static>,
    /// Progress of the pending frame on the line.
    tx: CobsWriter,
    /// When the last frame came in (liveness).
    last_rx: Instant,
}

/// When the current job started, for the transfer rate in the completion log.
#[derive(Clone, Copy)]
struct JobClock {
    job: u64,
    started: Instant,
}

/// The node: agent, sockets and session state.
pub struct Node {
    agent: &'static mut DeviceAgent,
    slots: [Slot; SLOTS],
    buf: &'static mut FrameBuf,
    /// The handshakes in progress: [initiator (manager or outgoing peer), responder],
    /// each owned by the slot of that kind in `State::Handshake`.
    hs: [Option<Handshake>; 2],
    identity: Identity,
    entropy: Entropy,
    manager_key: Option<PublicKey>,
    manager: Option<IpEndpoint>,
    token: Option<heapless::String<MAX_TOKEN_LEN>>,
    listen_port: u16,
    pending: Option<Pending>,
    next_conn: u32,
    backoff: Duration,
    clock: Option<JobClock>,
    serial: Option<SerialLink>,
    /// The A/B build's update state (see [`Ab`]).
    #[cfg(feature = "ab")]
    ab: Ab,
}

/// The A/B build's update state: how this boot came about, and the messages due.
#[cfg(feature = "ab")]
struct Ab {
    /// Trial of an update, rolled back, or normal (from embassy-boot's STATE at boot).
    boot: crate::board::ab::Boot,
    /// The manager session is new: `Running` follows its first `Report`.
    running_due: bool,
    /// That first report went out: send `Running` next.
    send_running: bool,
    /// An update is in DFU and marked: reset at this time (the install report is out).
    reset_at: Option<Instant>,
}

/// The agent's time: milliseconds since boot.
fn agent_now() -> CoreDuration {
    CoreDuration::from_millis(Instant::now().as_millis())
}

fn instant_of(d: CoreDuration) -> Instant {
    Instant::from_millis(d.as_millis() as u64)
}

/// Writes the lowercase hex of `bytes` into `out`; returns it as a string.
pub fn hex<'a>(bytes: &[u8], out: &'a mut [u8]) -> &'a str {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let n = bytes.len().min(out.len() / 2);
    for (i, b) in bytes[..n].iter().enumerate() {
        out[2 * i] = DIGITS[(b >> 4) as usize];
        out[2 * i + 1] = DIGITS[(b & 15) as usize];
    }
    core::str::from_utf8(&out[..2 * n]).unwrap_or("")
}

/// The root and index of a `Chunk` message (variant 12: root, then a varint index).
fn chunk_index(plain: &[u8]) -> Option<(Digest, u32)> {
    if plain.len() < 34 || plain[0] != 12 {
        return None;
    }
    let mut root = [0u8; 32];
    root.copy_from_slice(&plain[1..33]);
    let mut v: u32 = 0;
    for (i, &b) in plain[33..].iter().take(5).enumerate() {
        v |= ((b & 0x7F) as u32) << (7 * i);
        if b & 0x80 == 0 {
            return Some((root, v));
        }
    }
    None
}

const H: usize = frame::HEADER_LEN;

/// Which handshake engine a slot uses: 0 = initiator, 1 = responder.
fn engine(kind: Kind) -> usize {
    (kind == Kind::Incoming) as usize
}

impl Node {
    /// A node over `stack`; the sockets use the statically allocated buffers given.
    pub fn new(
        stack: Stack<'static>,
        cfg: Option<&Config>,
        identity: Identity,
        entropy: Entropy,
        agent: &'static mut DeviceAgent,
        buf: &'static mut FrameBuf,
        sockets: SocketBuffers,
    ) -> Self {
        let SocketBuffers {
            manager,
            outgoing,
            incoming,
            serial,
        } = sockets;
        let slot = |(rx, tx): SocketBuf, kind: Kind| {
            let sock = TcpSocket::new(stack, rx, tx);
            let max_frame = sock.recv_capacity().min(FRAME_MAX);
            Slot {
                sock,
                kind,
                state: State::Idle {
                    retry: Some(Instant::now()),
                },
                header: [0; H],
                have_header: 0,
                want: 0,
                max_frame,
                peer: None,
            }
        };
        let slots = [
            slot(manager, Kind::Manager),
            slot(outgoing, Kind::Outgoing),
            slot(incoming, Kind::Incoming),
        ];
        let manager = cfg
            .filter(|c| c.manager_port != 0)
            .map(|c| IpEndpoint::new(Ipv4Address::from(c.manager_ip).into(), c.manager_port));
        Node {
            agent,
            slots,
            buf,
            hs: [None, None],
            identity,
            entropy,
            manager_key: cfg.map(|c| PublicKey(c.manager_key)),
            manager,
            token: cfg
                .and_then(|c| c.token.as_str())
                .filter(|t| !t.is_empty())
                .and_then(|t| heapless::String::try_from(t).ok()),
            listen_port: if serial.is_some() {
                0
            } else {
                cfg.map_or(0, |c| c.listen_port)
            },
            pending: None,
            next_conn: 1,
            backoff: Duration::from_millis(250),
            clock: None,
            #[cfg(feature = "ab")]
            ab: Ab {
                boot: crate::board::ab::boot(),
                running_due: false,
                send_running: false,
                reset_at: None,
            },
            serial: serial.map(|buf| SerialLink {
                rx: CobsReader::new(buf),
                tx: CobsWriter::new(),
                last_rx: Instant::now(),
            }),
        }
    }

    /// Whether slot `i` runs over the serial line.
    fn on_serial(&self, i: usize) -> bool {
        i == 0 && self.serial.is_some()
    }

    /// Runs the node forever.
    pub async fn run(&mut self) -> ! {
        if (self.manager.is_none() && self.serial.is_none()) || self.manager_key.is_none() {
            defmt::warn!("not provisioned: no manager address or key");
        }
        if self.serial.is_some() {
            defmt::info!("manager link: serial (UART0, COBS)");
        }
        let mut boot_report = true;
        loop {
            if boot_report && Instant::now().as_millis() >= 1000 {
                boot_report = false;
                self.log_footprint();
            }
            // Service every slot and drain the agent until nothing moves (bounded),
            // each at this level so their stack frames do not nest.
            for _ in 0..64 {
                let mut moved = false;
                for i in 0..SLOTS {
                    moved |= self.service(i);
                }
                self.drain();
                if !moved {
                    break;
                }
            }
            self.wait().await;
            self.timeouts();
            #[cfg(feature = "ab")]
            self.ab_tick();
        }
    }

    /// Calls the agent's `handle_timeout` when its deadline has passed.
    #[inline(never)]
    fn timeouts(&mut self) {
        if self
            .agent
            .poll_timeout()
            .is_some_and(|t| instant_of(t) <= Instant::now())
        {
            self.agent.handle_timeout(agent_now());
        }
    }

    // ------------------------------------------------------------ slots

    fn conn_slot(&self, conn: ConnId) -> Option<usize> {
        self.slots
            .iter()
            .position(|s| matches!(s.state, State::Up { conn: c, .. } if c == conn))
    }

    /// Aborts slot `i`'s connection, telling the agent what it needs to know.
    fn close(&mut self, i: usize, why: defmt::Str) {
        let s = &mut self.slots[i];
        let was = core::mem::replace(
            &mut s.state,
            State::Closing {
                until: Instant::now() + CLOSE_GRACE,
            },
        );
        s.sock.abort();
        s.have_header = 0;
        s.want = 0;
        let peer = s.peer.take();
        let kind = s.kind;
        if self.pending.is_some_and(|p| p.slot == i) {
            self.pending = None;
        }
        if matches!(was, State::Handshake { .. }) {
            self.hs[engine(kind)] = None;
        }
        let now = agent_now();
        match was {
            State::Up { conn, .. } => {
                defmt::info!("slot {} ({}) closed: {=istr}", i, kind, why);
                self.agent.handle_disconnected(now, conn);
            }
            State::Idle { .. } | State::Closing { .. } => {}
            _ => {
                defmt::warn!("slot {} ({}) failed: {=istr}", i, kind, why);
                if let Some((id, _)) = peer {
                    self.agent.handle_connect_failed(now, &id);
                }
            }
        }
        if kind == Kind::Manager {
            self.backoff = (self.backoff * 2).min(Duration::from_secs(5));
        }
    }

    /// Moves slot `i` one step forward without waiting; returns whether it moved.
    #[inline(never)]
    fn service(&mut self, i: usize) -> bool {
        let now = Instant::now();
        let s = &mut self.slots[i];
        match s.state {
            State::Idle { retry } => match s.kind {
                Kind::Manager => {
                    if retry.is_none_or(|r| r > now) || self.manager_key.is_none() {
                        return false;
                    }
                    if let Some(ser) = &mut self.serial {
                        // No connection to make: the handshake starts at once.
                        ser.last_rx = now;
                        s.state = State::Connected {
                            deadline: now + SERIAL_HANDSHAKE_TIMEOUT,
                        };
                        return true;
                    }
                    match self.manager {
                        Some(ep) => {
                            self.dial(i, ep);
                            true
                        }
                        None => false,
                    }
                }
                Kind::Incoming if self.listen_port != 0 => {
                    let port = self.listen_port;
                    match poll_once(s.sock.accept(port)) {
                        Poll::Ready(Ok(())) | Poll::Pending => s.state = State::Listening,
                        Poll::Ready(Err(e)) => {
                            defmt::error!("listen on port {} failed: {}", port, e);
                            s.state = State::Idle { retry: None };
                        }
                    }
                    true
                }
                _ => false,
            },
            State::Connecting { deadline } => match s.sock.state() {
                TcpState::Established => {
                    s.state = State::Connected {
                        deadline: now + HANDSHAKE_TIMEOUT,
                    };
                    true
                }
                TcpState::SynSent | TcpState::SynReceived if now < deadline => false,
                TcpState::SynSent | TcpState::SynReceived => {
                    self.close(i, defmt::intern!("connect timed out"));
                    true
                }
                _ => {
                    self.close(i, defmt::intern!("connection refused"));
                    true
                }
            },
            State::Listening => match s.sock.state() {
                TcpState::Listen | TcpState::SynReceived => false,
                TcpState::Established => {
                    s.state = State::Connected {
                        deadline: now + HANDSHAKE_TIMEOUT,
                    };
                    true
                }
                _ => {
                    self.close(i, defmt::intern!("listener reset"));
                    true
                }
            },
            State::Connected { deadline } => {
                // A serial line has no connection that could have dropped.
                let line_up = (i == 0 && self.serial.is_some()) || s.sock.may_send();
                if now >= deadline || !line_up {
                    self.close(i, defmt::intern!("handshake never started"));
                    true
                } else if self.hs[engine(s.kind)].is_none() {
                    s.state = State::Handshake { deadline };
                    self.start_handshake(i);
                    true
                } else {
                    false
                }
            }
            State::Handshake { deadline } if now >= deadline => {
                self.close(i, defmt::intern!("handshake timed out"));
                true
            }
            State::Up { .. }
                if self
                    .serial
                    .as_ref()
                    .is_some_and(|ser| i == 0 && now > ser.last_rx + SERIAL_SILENCE) =>
            {
                self.close(i, defmt::intern!("manager silent on the serial line"));
                true
            }
            State::Handshake { .. } | State::Up { .. } => self.read_frame(i),
            State::Closing { until } => {
                let rst_pending =
                    s.sock.state() == TcpState::Closed && s.sock.remote_endpoint().is_some();
                if !rst_pending || now >= until {
                    let retry = (s.kind == Kind::Manager).then(|| now + self.backoff);
                    s.state = State::Idle { retry };
                    return true;
                }
                false
            }
        }
    }

    fn dial(&mut self, i: usize, ep: IpEndpoint) {
        let s = &mut self.slots[i];
        s.state = State::Connecting {
            deadline: Instant::now() + CONNECT_TIMEOUT,
        };
        if let Poll::Ready(Err(e)) = poll_once(s.sock.connect(ep)) {
            defmt::warn!("slot {}: connect to {} failed: {}", i, ep, e);
            self.close(i, defmt::intern!("cannot connect"));
        }
    }

    fn peer_hello(&self) -> Hello {
        let mut caps = caps::RELAY_V1;
        if self.listen_port != 0 {
            caps |= caps::SERVE;
        }
        Hello::new(
            Role::Agent,
            self.agent.config().id.clone(),
            caps,
            self.agent.cert().cloned(),
        )
    }

    /// Creates the handshake for slot `i` (now in `State::Handshake`) and sends message 1.
    #[inline(never)]
    fn start_handshake(&mut self, i: usize) {
        let eph = self.entropy.ephemeral();
        let hello = self.peer_hello();
        let hs = match self.slots[i].kind {
            Kind::Manager => {
                let caps = if self.serial.is_some() {
                    hello.caps | caps::SERIAL
                } else {
                    hello.caps
                };
                let mut hello = Hello::new(Role::Agent, hello.id, caps, None);
                if let Some(t) = &self.token {
                    hello = hello.with_token(t.clone());
                }
                match &self.manager_key {
                    Some(key) => Handshake::initiator(&self.identity, eph, key, hello),
                    None => return self.close(i, defmt::intern!("no manager key")),
                }
            }
            Kind::Outgoing => match &self.slots[i].peer {
                Some((_, key)) => Handshake::initiator(&self.identity, eph, key, hello),
                None => return self.close(i, defmt::intern!("no peer to dial")),
            },
            Kind::Incoming => Handshake::responder(&self.identity, eph, hello),
        };
        let s = &mut self.slots[i];
        s.sock.set_timeout(Some(SOCKET_TIMEOUT));
        s.sock.set_keep_alive(Some(KEEPALIVE));
        s.sock.set_nagle_enabled(false);
        s.have_header = 0;
        s.want = 0;
        match hs {
            Ok(hs) => {
                self.hs[engine(self.slots[i].kind)] = Some(hs);
                self.handshake_step(i);
            }
            Err(e) => {
                defmt::warn!("slot {}: handshake setup failed: {}", i, e);
                self.close(i, defmt::intern!("bad key"));
            }
        }
    }

    /// Writes our next handshake message if it is our turn; finishes when done.
    #[inline(never)]
    fn handshake_step(&mut self, i: usize) {
        let Some(hs) = &mut self.hs[engine(self.slots[i].kind)] else {
            return;
        };
        if hs.is_my_turn() {
            let mut msg = [0u8; H + 512];
            let n = match hs.write_message(&mut msg[H..]) {
                Ok(n) => n,
                Err(e) => {
                    defmt::warn!("slot {}: handshake write: {}", i, e);
                    return self.close(i, defmt::intern!("handshake failed"));
                }
            };
            let Ok(h) = frame::header(n) else {
                return self.close(i, defmt::intern!("handshake message too large"));
            };
            msg[..H].copy_from_slice(&h);
            let written = if i == 0 && self.serial.is_some() {
                serial_write(&msg[H..H + n])
            } else {
                write_now(&mut self.slots[i].sock, &msg[..H + n])
            };
            if !written {
                return self.close(i, defmt::intern!("no room for a handshake message"));
            }
        }
        if hs.is_finished() {
            self.handshake_finish(i);
        }
    }

    #[inline(never)]
    fn handshake_finish(&mut self, i: usize) {
        let kind = self.slots[i].kind;
        let Some(hs) = self.hs[engine(kind)].take() else {
            return;
        };
        // The responder decides about the initiator now, before the session is used; both
        // sides refuse a peer whose certificate is revoked or expired (agent-core's check).
        let peer_id = match kind {
            Kind::Manager => None,
            Kind::Outgoing | Kind::Incoming => {
                let Some(manager) = self.manager_key else {
                    return self.close(i, defmt::intern!("no manager key to check certificates"));
                };
                if let Err(e) = hs.verify_peer_cert(&manager) {
                    defmt::warn!("slot {}: peer refused: {}", i, e);
                    return self.close(i, defmt::intern!("bad certificate"));
                }
                if let Some(cert) = hs.remote_hello().and_then(|h| h.cert.as_ref())
                    && let Err(e) = self.agent.peer_cert_acceptable(cert, agent_now())
                {
                    defmt::warn!("slot {}: peer refused: {}", i, e);
                    return self.close(i, defmt::intern!("revoked or expired certificate"));
                }
                if kind == Kind::Outgoing {
                    self.slots[i].peer.as_ref().map(|p| p.0.clone())
                } else {
                    hs.remote_hello().map(|h| h.id.clone())
                }
            }
        };
        let (seal, open) = match hs.finish() {
            Ok(t) => t.split(),
            Err(e) => {
                defmt::warn!("slot {}: handshake finish: {}", i, e);
                return self.close(i, defmt::intern!("handshake failed"));
            }
        };
        let now = agent_now();
        let conn = if kind == Kind::Manager {
            ConnId::MANAGER
        } else {
            self.next_conn += 1;
            ConnId(self.next_conn - 1)
        };
        self.slots[i].state = State::Up { seal, open, conn };
        if kind == Kind::Manager {
            defmt::info!("manager connected");
            #[cfg(feature = "ab")]
            {
                self.ab.running_due = true;
            }
            self.backoff = Duration::from_millis(250);
            self.agent.handle_manager_connected(now);
            return;
        }
        let Some(id) = peer_id else {
            return self.close(i, defmt::intern!("peer without id"));
        };
        let direction = if kind == Kind::Outgoing {
            Direction::Outgoing
        } else {
            Direction::Incoming
        };
        defmt::info!(
            "peer {=str} connected ({}) on slot {}",
            id.as_str(),
            kind,
            i
        );
        if let Err(e) = self
            .agent
            .handle_connected(now, conn, PeerInfo { id, direction })
        {
            defmt::warn!("peer refused by the agent: {}", e);
            self.slots[i].state = State::Closing {
                until: Instant::now() + CLOSE_GRACE,
            };
            self.slots[i].sock.abort();
        }
    }

    /// Takes one complete frame out of slot `i`'s socket and handles it;
    /// returns whether it did (more may follow).
    fn read_frame(&mut self, i: usize) -> bool {
        if self.pending.is_some() {
            return false;
        }
        match self.next_frame(i) {
            Ok(Some(n)) => {
                if matches!(self.slots[i].state, State::Handshake { .. }) {
                    self.on_handshake_frame(i, n);
                } else {
                    self.on_session_frame(i, n);
                }
                true
            }
            Ok(None) => {
                let s = &self.slots[i];
                if !self.on_serial(i) && !s.sock.may_recv() && s.sock.recv_queue() == 0 {
                    self.close(i, defmt::intern!("closed by the other side"));
                    return true;
                }
                false
            }
            Err(why) => {
                self.close(i, why);
                true
            }
        }
    }

    /// Reads one frame into the frame buffer if it is completely in the socket.
    fn next_frame(&mut self, i: usize) -> Result<Option<usize>, defmt::Str> {
        if i == 0
            && let Some(ser) = &mut self.serial
        {
            return Ok(serial_frame(ser, self.buf));
        }
        let s = &mut self.slots[i];
        while s.have_header < H && s.sock.recv_queue() > 0 {
            let (have, hdr) = (s.have_header, &mut s.header);
            match poll_once(s.sock.read(&mut hdr[have..])) {
                Poll::Ready(Ok(n)) if n > 0 => s.have_header += n,
                Poll::Pending => return Ok(None),
                Poll::Ready(_) => return Err(defmt::intern!("read failed")),
            }
            if s.have_header == H {
                s.want = frame::parse_header(s.header, s.max_frame)
                    .map_err(|_| defmt::intern!("frame header over the limit"))?;
            }
        }
        if s.have_header < H || s.sock.recv_queue() < s.want {
            return Ok(None);
        }
        let want = s.want;
        let mut got = 0;
        while got < want {
            match poll_once(s.sock.read(&mut self.buf[H + got..H + want])) {
                Poll::Ready(Ok(n)) if n > 0 => got += n,
                _ => return Err(defmt::intern!("read failed")),
            }
        }
        s.have_header = 0;
        s.want = 0;
        Ok(Some(want))
    }

    /// A handshake message arrived on slot `i` (in the frame buffer).
    #[inline(never)]
    fn on_handshake_frame(&mut self, i: usize, n: usize) {
        let s = &self.slots[i];
        let Some(hs) = &mut self.hs[engine(s.kind)] else {
            return self.close(i, defmt::intern!("no handshake"));
        };
        if let Err(e) = hs.read_message(&self.buf[H..H + n]) {
            defmt::warn!("slot {} ({}): handshake refused: {}", i, s.kind, e);
            return self.close(i, defmt::intern!("handshake failed"));
        }
        if s.kind == Kind::Outgoing
            && let (Some(remote), Some((want, _))) = (hs.remote_hello(), &s.peer)
            && remote.id != *want
        {
            return self.close(i, defmt::intern!("peer presented another id"));
        }
        self.handshake_step(i);
    }

    /// An encrypted frame arrived on slot `i`'s session: decrypt it and feed the agent.
    #[inline(never)]
    fn on_session_frame(&mut self, i: usize, n: usize) {
        let State::Up { open, conn, .. } = &mut self.slots[i].state else {
            return;
        };
        let conn = *conn;
        let plain = match open.decrypt(&mut self.buf[H..], n) {
            Ok(p) => p,
            Err(e) => {
                defmt::warn!("slot {}: {}", i, e);
                return self.close(i, defmt::intern!("frame failed to decrypt"));
            }
        };
        let msg = &self.buf[H..H + plain];
        let chunk = chunk_index(msg);
        let before = chunk.and_then(|(root, _)| self.agent.store().verified(&root));
        if let Err(e) = self.agent.handle_frame(agent_now(), conn, msg) {
            defmt::warn!("slot {}: frame refused: {}", i, e);
            if e.must_close() && conn != ConnId::MANAGER {
                return self.close(i, defmt::intern!("bad frame"));
            }
        }
        if let Some((root, index)) = chunk
            && self.agent.store().verified(&root) > before
        {
            defmt::info!("chunk {} stored", index);
        }
    }

    // ----------------------------------------------------------- outputs

    /// Writes as much of the pending frame as fits; returns whether it is out.
    fn flush_pending(&mut self) -> bool {
        let Some(mut p) = self.pending else {
            return true;
        };
        if p.slot == 0
            && let Some(ser) = &mut self.serial
        {
            let frame = &self.buf[p.off..p.end];
            while serial::tx_ready() {
                match ser.tx.next_byte(frame) {
                    Some(b) => serial::write(b),
                    None => {
                        self.pending = None;
                        return true;
                    }
                }
            }
            if Instant::now().saturating_duration_since(p.since) > SEND_STALL {
                self.pending = None;
                self.close(p.slot, defmt::intern!("serial line stalled"));
            }
            return self.pending.is_none();
        }
        let s = &mut self.slots[p.slot];
        while p.off < p.end {
            match poll_once(s.sock.write(&self.buf[p.off..p.end])) {
                Poll::Ready(Ok(n)) if n > 0 => p.off += n,
                Poll::Pending => break,
                Poll::Ready(_) => {
                    self.pending = None;
                    self.close(p.slot, defmt::intern!("write failed"));
                    return true;
                }
            }
        }
        if p.off == p.end {
            self.pending = None;
            true
        } else if Instant::now().saturating_duration_since(p.since) > SEND_STALL {
            self.pending = None;
            self.close(p.slot, defmt::intern!("peer stopped reading"));
            true
        } else {
            self.pending = Some(p);
            false
        }
    }

    /// Drains the agent: frames to send, then events, until both are empty.
    #[inline(never)]
    fn drain(&mut self) {
        for _ in 0..256 {
            if !self.flush_pending() {
                return;
            }
            let cap = self.buf.len() - TAG_LEN;
            #[cfg(feature = "ab")]
            if core::mem::take(&mut self.ab.send_running) {
                self.send_running();
                continue;
            }
            if let Some(t) = self.agent.poll_transmit(agent_now(), &mut self.buf[H..cap]) {
                // The session's first report (variant 0) is followed by `Running`.
                #[cfg(feature = "ab")]
                if t.conn == ConnId::MANAGER && self.buf[H] == 0 {
                    self.ab.send_running = core::mem::take(&mut self.ab.running_due);
                }
                self.seal(t.conn, t.len);
                continue;
            }
            match self.agent.poll_event() {
                Some(ev) => self.on_event(ev),
                None => return,
            }
        }
    }

    fn seal(&mut self, conn: ConnId, len: usize) {
        let Some(i) = self.conn_slot(conn) else {
            return; // closed meanwhile: the frame is dropped
        };
        let State::Up { seal, .. } = &mut self.slots[i].state else {
            return;
        };
        let n = match seal.encrypt(&mut self.buf[H..], len) {
            Ok(n) => n,
            Err(e) => {
                defmt::error!("seal failed: {}", e);
                return;
            }
        };
        if i == 0
            && let Some(ser) = &mut self.serial
        {
            // COBS-encoded on the way out, from the frame buffer.
            ser.tx = CobsWriter::new();
            self.pending = Some(Pending {
                slot: i,
                off: H,
                end: H + n,
                since: Instant::now(),
            });
            return;
        }
        let Ok(h) = frame::header(n) else {
            return;
        };
        self.buf[..H].copy_from_slice(&h);
        self.pending = Some(Pending {
            slot: i,
            off: 0,
            end: H + n,
            since: Instant::now(),
        });
    }

    #[inline(never)]
    fn on_event(&mut self, ev: Event) {
        match ev {
            Event::Connect { peer, addr, key } => {
                let free = self.slots.iter().position(|s| {
                    s.kind == Kind::Outgoing && matches!(s.state, State::Idle { .. })
                });
                match (free, addr) {
                    (Some(i), PeerAddr::V4(ip, port)) => {
                        defmt::info!("connecting to peer {=str}", peer.as_str());
                        self.slots[i].peer = Some((peer, key));
                        let ep = IpEndpoint::new(Ipv4Address::from(ip).into(), port);
                        self.dial(i, ep);
                    }
                    _ => {
                        defmt::warn!("no slot for peer {=str}", peer.as_str());
                        self.agent.handle_connect_failed(agent_now(), &peer);
                    }
                }
            }
            Event::Close { conn } => {
                if let Some(i) = self.conn_slot(conn) {
                    self.close(i, defmt::intern!("not needed any more"));
                }
            }
            Event::Welcomed => {
                defmt::info!("welcomed by the manager");
                #[cfg(feature = "ab")]
                self.ab_welcomed();
            }
            Event::JobStarted {
                job,
                chunks,
                resumed,
                ..
            } => {
                defmt::info!(
                    "job {} started: chunks={} resumed={}",
                    job.id,
                    chunks,
                    resumed
                );
                self.clock = Some(JobClock {
                    job: job.id,
                    started: Instant::now(),
                });
            }
            Event::JobComplete { job, root } => {
                self.job_complete(job.id, &root);
                #[cfg(feature = "ab")]
                self.ab_install(job, &root);
            }
            Event::JobDone { job, .. } => {
                defmt::info!("job {} done", job.id);
                self.log_footprint();
            }
            Event::JobCancelled { job } => defmt::info!("job {} cancelled", job.id),
            Event::JobFailed { job, reason } => {
                defmt::error!("job {} failed: {}", job.id, reason)
            }
            Event::PeerTrouble { peer, trouble, .. } => {
                defmt::warn!("peer {=str} trouble: {}", peer.as_str(), trouble)
            }
            Event::Ignored { what } => defmt::debug!("ignored: {=str}", what),
            // The manager sends its trust documents once per session: a few lines at most.
            Event::TrustAccepted { version, newer } => {
                defmt::info!("trust document v{} accepted (newer: {})", version, newer)
            }
            Event::TrustRefused { version, reason } => {
                defmt::warn!("trust document v{} refused: {}", version, reason)
            }
            Event::RecordFailed { what, error } => {
                defmt::error!("{=str} failed: {}", what, error)
            }
            Event::CertRenewed { serial, .. } => {
                defmt::info!("certificate renewed (serial {})", serial)
            }
            Event::Revocations { version, entries } => {
                defmt::info!("revocation list {} ({} entries)", version, entries)
            }
            _ => {}
        }
    }

    /// Hashes the stored content back from flash and logs it with the transfer rate.
    #[inline(never)]
    fn job_complete(&mut self, job: u64, root: &Digest) {
        let Some(m) = self.agent.store().manifest(root).cloned() else {
            return;
        };
        let bytes = self.agent.job_stats(job).map_or(0, |s| s.bytes_received);
        let ms = match self.clock {
            Some(c) if c.job == job => Instant::now()
                .saturating_duration_since(c.started)
                .as_millis()
                .max(1),
            _ => 1,
        };
        let t0 = Instant::now();
        let mut h = Sha256::new();
        let mut proof = Proof::new();
        for i in 0..m.chunks() {
            // Hashing megabytes back from flash takes longer than the watchdog waits.
            #[cfg(feature = "ab")]
            crate::board::ab::watchdog_feed();
            let store = self.agent.store_mut();
            match store.read_chunk(root, i, &mut self.buf[..], &mut proof) {
                Ok(n) => h.update(&self.buf[..n]),
                Err(e) => {
                    defmt::error!("reading chunk {} back from flash failed: {}", i, e);
                    return;
                }
            }
        }
        let digest: [u8; 32] = h.finalize().into();
        let mut text = [0u8; 64];
        defmt::info!(
            "job {} complete sha256={=str} length={} fetched={} ms={} rate={}B/s hash_ms={}",
            job,
            hex(&digest, &mut text),
            m.length,
            bytes,
            ms,
            bytes * 1000 / ms,
            t0.elapsed().as_millis()
        );
        self.log_footprint();
    }

    /// Logs the deepest stack use (all, and per task: boot, network, node) and the
    /// static RAM sizes.
    pub fn log_footprint(&self) {
        use crate::stack::{Part, measure, peaks};
        measure(Part::Node);
        let [boot, net, node] = peaks();
        let ram = crate::board::ram_layout();
        defmt::info!(
            "footprint: stack_peak={} stack_size={} data={} bss={} stack_boot={} stack_net={} stack_node={}",
            boot.max(net).max(node),
            ram.stack,
            ram.data,
            ram.bss,
            boot,
            net,
            node
        );
    }

    // -------------------------------------------------------------- wait

    /// Sleeps until a socket changes state or has data, or the next deadline.
    async fn wait(&mut self) {
        let now = Instant::now();
        let mut deadline = now + Duration::from_secs(1);
        let reading = self.pending.is_none();
        {
            let mut at = |t: Instant| deadline = deadline.min(t);
            if let Some(t) = self.agent.poll_timeout() {
                at(instant_of(t));
            }
            if let Some(p) = self.pending {
                at(p.since + SEND_STALL);
            }
            if let Some(ser) = &self.serial {
                if matches!(self.slots[0].state, State::Up { .. }) {
                    at(ser.last_rx + SERIAL_SILENCE);
                }
                // Bytes left in the ring after a frame was taken: look again soon.
                if reading && serial::rx_queued() > 0 {
                    at(now + Duration::from_millis(1));
                }
            }
            for s in &self.slots {
                match s.state {
                    State::Idle { retry: Some(r) } if s.kind == Kind::Manager => at(r),
                    State::Connecting { deadline }
                    | State::Connected { deadline }
                    | State::Handshake { deadline } => at(deadline),
                    State::Closing { until } => at(until),
                    _ => {}
                }
                // A frame partly in the socket: no waker fires until more bytes
                // come, which they will shortly; look again in a millisecond.
                let up = matches!(s.state, State::Up { .. } | State::Handshake { .. });
                if reading && up && s.sock.recv_queue() > 0 {
                    at(now + Duration::from_millis(1));
                }
            }
        }
        let pending_slot = self.pending.map(|p| p.slot);
        // What each socket held when we decided to sleep: new bytes end the sleep.
        let mut queued = [0usize; SLOTS];
        for (q, s) in queued.iter_mut().zip(&self.slots) {
            *q = s.sock.recv_queue();
        }
        let slots = &self.slots;
        let serial = self.serial.is_some();
        let mut timer = pin!(Timer::at(deadline));
        poll_fn(|cx| {
            if timer.as_mut().poll(cx).is_ready() {
                return Poll::Ready(());
            }
            for (i, s) in slots.iter().enumerate() {
                let (read, write) = match s.state {
                    State::Up { .. } | State::Handshake { .. } => {
                        (reading, pending_slot == Some(i))
                    }
                    State::Connecting { .. } | State::Listening => (false, true),
                    _ => (false, false),
                };
                if serial && i == 0 {
                    // The UART, not the (unused) manager socket.
                    if (read && serial::poll_rx(cx)) || (write && serial::poll_tx(cx)) {
                        return Poll::Ready(());
                    }
                    continue;
                }
                if read {
                    if s.sock.recv_queue() != queued[i] {
                        return Poll::Ready(());
                    }
                    // With bytes already queued the waker cannot be registered
                    // (the future is ready at once); the 1 ms deadline covers it.
                    if queued[i] == 0 && pin!(s.sock.wait_read_ready()).poll(cx).is_ready() {
                        return Poll::Ready(());
                    }
                }
                if write && pin!(s.sock.wait_write_ready()).poll(cx).is_ready() {
                    return Poll::Ready(());
                }
            }
            Poll::Pending
        })
        .await
    }
}

/// Writes all of `bytes` if the socket has room for them now.
fn write_now(sock: &mut TcpSocket<'static>, bytes: &[u8]) -> bool {
    if sock.send_capacity() - sock.send_queue() < bytes.len() {
        return false;
    }
    let mut off = 0;
    while off < bytes.len() {
        match poll_once(sock.write(&bytes[off..])) {
            Poll::Ready(Ok(n)) if n > 0 => off += n,
            _ => return false,
        }
    }
    true
}

/// Writes one handshake message to the serial line (a leading delimiter, then
/// the COBS frame), waiting for the UART at most [`SERIAL_WRITE_LIMIT`].
fn serial_write(msg: &[u8]) -> bool {
    let mut enc = CobsWriter::new();
    let give_up = Instant::now() + SERIAL_WRITE_LIMIT;
    let mut lead = true;
    loop {
        if !serial::tx_ready() {
            if Instant::now() > give_up {
                return false;
            }
            continue;
        }
        let b = if lead {
            lead = false;
            0
        } else {
            match enc.next_byte(msg) {
                Some(b) => b,
                None => return true,
            }
        };
        serial::write(b);
    }
}

/// Feeds received serial bytes to the COBS reader until a frame is complete;
/// copies it into the frame buffer and returns its length. A corrupt or
/// oversized frame is dropped (the reader resynchronises at the next `0x00`).
fn serial_frame(ser: &mut SerialLink, buf: &mut FrameBuf) -> Option<usize> {
    while let Some(b) = serial::pop() {
        match ser.rx.push(b) {
            None => {}
            Some(Ok(n)) if n <= FRAME_MAX => {
                buf[H..H + n].copy_from_slice(&ser.rx.frame()[..n]);
                ser.last_rx = Instant::now();
                return Some(n);
            }
            Some(Ok(n)) => defmt::warn!("serial: {}-byte frame over the limit dropped", n),
            Some(Err(e)) => defmt::warn!("serial: frame dropped: {}", e),
        }
    }
    None
}

/// Receive and transmit buffers of one socket.
pub type SocketBuf = (&'static mut [u8], &'static mut [u8]);

/// The buffers of every socket.
pub struct SocketBuffers {
    /// Manager session.
    pub manager: SocketBuf,
    /// Outgoing peer.
    pub outgoing: SocketBuf,
    /// Incoming peer.
    pub incoming: SocketBuf,
    /// On a serial device: the serial line's receive buffer (one COBS frame).
    pub serial: Option<&'static mut [u8]>,
}

/// The agent's configuration for this device.
pub fn agent_config(cfg: Option<&Config>, id: AgentId, ip: [u8; 4]) -> AgentConfig {
    let mut c = AgentConfig::new(id);
    // A serial device serves no peers: it has no listener to report.
    let listen = cfg.filter(|c| !c.serial()).map_or(0, |c| c.listen_port);
    c.listen = (listen != 0).then_some(PeerAddr::V4(ip, listen));
    c.can_serve = listen != 0;
    c.max_chunk = MAX_CHUNK;
    c.max_peers = MAX_PEERS;
    // The manager plus the one outgoing peer connection this device has room for.
    c.max_sources = 2;
    c.window = WINDOW;
    c.performance = 10;
    c.link = LinkInfo::default();
    if let Some(cfg) = cfg {
        if let Some(s) = cfg.site.as_str() {
            c.site = heapless::String::try_from(s).unwrap_or_default();
        }
        if let Some(s) = cfg.segment.as_str() {
            c.segment = heapless::String::try_from(s).unwrap_or_default();
        }
        // The provisioning block's pinned root keys and how many of them must sign.
        for k in &cfg.roots[..cfg.root_count as usize] {
            let _ = c.roots.push(PublicKey(*k));
        }
        c.root_threshold = cfg.root_threshold.max(1);
        // Checks the manager's revocation lists and renewed certificates.
        c.manager_key = Some(PublicKey(cfg.manager_key));
    }
    c
}
