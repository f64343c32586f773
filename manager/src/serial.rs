//! Serial-attached devices: the agent protocol over a UART (`baton serve --serial PATH`).
//!
//! A device on a serial line speaks the protocol it speaks over TCP (the
//! Noise XX handshake, then one encrypted message per frame), but each frame
//! is COBS-encoded and ends with `0x00` instead of carrying a 2-byte length
//! (SPEC §1). [`run_serial_port`] opens the port with the `serialport` crate
//! (raw mode, exclusive) and, for each session, gives the manager's ordinary
//! connection handler ([`AgentPort::handle`]) one end of an in-memory
//! stream; [`serve_line`] translates the other end to and from the line:
//! length-prefixed frames from the handler go out COBS-encoded, COBS frames
//! from the line go in length-prefixed. Authorization, the first `Report`,
//! `Welcome`, chunk answers, rate caps and byte counters are therefore exactly
//! those of a TCP agent.
//!
//! A serial line has no connection state. A session ends when the handler
//! ends it (for instance a frame that fails to decrypt because the device
//! rebooted and began a new handshake); the next session starts on the same
//! line with the next bytes that arrive and takes the next frame as a first
//! handshake message. So a line has one handshake in progress at most, and it
//! must end within the agent port's handshake timeout (`baton serve
//! --handshake-timeout`, counted from the session's first bytes: an idle
//! line holds no session); serial sessions do not count against the TCP
//! connection and handshake caps. The device starts a new handshake when its
//! own stalls (a few seconds). A
//! corrupt or oversized frame is dropped with a warning and the reader
//! resynchronises at the next `0x00`. If the port fails (the device went
//! away), it is opened again every second until shutdown.
//!
//! The `serialport` crate is blocking: one thread reads the port (with a
//! 100 ms timeout, so it notices when it is no longer wanted) and one writes
//! it; they meet the async side through a `tokio::io::duplex` pipe.

use std::future::Future;
use std::io::{Read as _, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use baton_protocol::MAX_FRAME;
use baton_protocol::frame::{self, CobsReader, HEADER_LEN};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream, ReadBuf};
use tracing::Instrument as _;

use crate::agent_port::AgentPort;

/// Line speed set on the port (devices and QEMU's UART model ignore it; a real UART needs it).
pub const SERIAL_BAUD: u32 = 115_200;
/// How often the port is tried again after it failed or could not be opened.
pub const REOPEN_EVERY: Duration = Duration::from_secs(1);
/// The address sessions on a serial line are registered with (they have none).
pub const SERIAL_ADDR: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 0);
/// Largest COBS encoding of a frame, delimiter excluded.
const COBS_MAX: usize = MAX_FRAME + MAX_FRAME / 254 + 1;
/// Bytes buffered between the port threads and the async side, per direction.
const LINE_BUF: usize = 64 * 1024;
/// Bytes buffered between a session and the line, per direction.
const SESSION_BUF: usize = 2 * (HEADER_LEN + MAX_FRAME);

/// Bytes on the serial lines, COBS encoding and delimiters included: what a UART carries.
#[derive(Debug)]
pub struct LineCounters {
    /// Bytes read from the lines.
    pub received: AtomicU64,
    /// Bytes written to the lines.
    pub sent: AtomicU64,
}

/// Every serial line's bytes since the process started (`/api/v1/status`, `/metrics`):
/// against the content delivered over a line, the share of the wire that is payload.
pub static LINE_BYTES: LineCounters = LineCounters {
    received: AtomicU64::new(0),
    sent: AtomicU64::new(0),
};

/// Why [`serve_line`] returned.
#[derive(Debug)]
#[non_exhaustive]
pub enum LineEnd {
    /// The shutdown future completed.
    Shutdown,
    /// The line reached end of file (the port's reader stopped).
    Closed,
    /// Reading or writing the line failed.
    Failed(std::io::Error),
}

impl std::fmt::Display for LineEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LineEnd::Shutdown => f.write_str("shutting down"),
            LineEnd::Closed => f.write_str("the line closed"),
            LineEnd::Failed(e) => write!(f, "the line failed: {e}"),
        }
    }
}

/// Serves the device on the serial port `path` until `shutdown` completes,
/// opening the port again whenever it fails or cannot be opened.
pub async fn run_serial_port(
    path: PathBuf,
    server: Arc<AgentPort>,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let label = path.display().to_string();
    let mut warned = false;
    loop {
        match open_port(&path) {
            Ok(line) => {
                warned = false;
                tracing::info!(port = %label, "serial port open");
                match serve_line(line, &label, server.clone(), &mut shutdown).await {
                    LineEnd::Shutdown => return,
                    end => tracing::warn!(port = %label, "serial port: {end}; opening it again"),
                }
            }
            Err(e) if !warned => {
                warned = true;
                tracing::warn!(port = %label, "cannot open serial port: {e}; trying every {REOPEN_EVERY:?}");
            }
            Err(_) => {}
        }
        tokio::select! {
            _ = &mut shutdown => return,
            _ = tokio::time::sleep(REOPEN_EVERY) => {}
        }
    }
}

/// Runs agent sessions over `line` (COBS-framed) one after another, until the
/// line ends or `shutdown` completes. `label` names the line in logs.
pub async fn serve_line<L, F>(
    line: L,
    label: &str,
    server: Arc<AgentPort>,
    shutdown: &mut Pin<&mut F>,
) -> LineEnd
where
    L: AsyncRead + AsyncWrite + Unpin,
    F: Future<Output = ()>,
{
    let (mut line_rx, mut line_tx) = tokio::io::split(line);
    let mut bytes = LineBytes {
        buf: vec![0u8; 4096],
        start: 0,
        end: 0,
    };
    let mut cobs_buf = vec![0u8; COBS_MAX];
    let mut cobs = CobsReader::new(&mut cobs_buf);
    let mut encoded = vec![0u8; COBS_MAX + 1];
    let mut frame = vec![0u8; MAX_FRAME];
    for session_no in 0u64.. {
        if session_no > 0 {
            // A delimiter ends whatever a frame cut off with the last session
            // left on the line, so the device's reader is in step again.
            if let Err(e) = line_tx.write_all(&[0]).await {
                return LineEnd::Failed(e);
            }
            LINE_BYTES.sent.fetch_add(1, Ordering::Relaxed);
        }
        // The session starts with the line's next bytes: its handshake deadline
        // runs from there, and an idle line holds no session.
        if bytes.start == bytes.end {
            let read = tokio::select! {
                _ = shutdown.as_mut() => return LineEnd::Shutdown,
                r = line_rx.read(&mut bytes.buf) => r,
            };
            match read {
                Ok(0) => return LineEnd::Closed,
                Ok(n) => {
                    LINE_BYTES.received.fetch_add(n as u64, Ordering::Relaxed);
                    bytes.start = 0;
                    bytes.end = n;
                }
                Err(e) => return LineEnd::Failed(e),
            }
        }
        let (ours, theirs) = tokio::io::duplex(SESSION_BUF);
        let span = tracing::info_span!("serial", port = %label);
        let session = tokio::spawn(
            server
                .clone()
                .handle(theirs, SERIAL_ADDR, None)
                .instrument(span),
        );
        let (mut from_session, mut to_session) = tokio::io::split(ours);
        let end = tokio::select! {
            _ = shutdown.as_mut() => Some(LineEnd::Shutdown),
            e = inbound(&mut line_rx, &mut bytes, &mut cobs, &mut to_session) => e,
            e = outbound(&mut from_session, &mut line_tx, &mut frame, &mut encoded) => e,
        };
        // Whatever ended, this session is over: closing its stream ends the handler.
        drop((from_session, to_session));
        if tokio::time::timeout(Duration::from_secs(5), session)
            .await
            .is_err()
        {
            tracing::debug!(port = %label, "session handler did not finish in time");
        }
        match end {
            Some(end) => return end,
            None => tracing::debug!(port = %label, "session over; the next frame starts a new one"),
        }
    }
    LineEnd::Closed
}

/// Bytes read from the line and not yet decoded: they survive the end of a
/// session, so the next session gets them.
struct LineBytes {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

/// Moves frames from the line into the session, length-prefixed. Returns
/// `None` when the session stopped taking them, else why the line ended.
async fn inbound<R, W>(
    line: &mut R,
    bytes: &mut LineBytes,
    cobs: &mut CobsReader<'_>,
    session: &mut W,
) -> Option<LineEnd>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    loop {
        if bytes.start == bytes.end {
            // Positions change only once the read is done: this future may be
            // dropped at the `await` (the session ended), and the next session
            // must then find the buffer as it was.
            let n = match line.read(&mut bytes.buf).await {
                Ok(0) => return Some(LineEnd::Closed),
                Ok(n) => n,
                Err(e) => return Some(LineEnd::Failed(e)),
            };
            LINE_BYTES.received.fetch_add(n as u64, Ordering::Relaxed);
            bytes.start = 0;
            bytes.end = n;
        }
        while bytes.start < bytes.end {
            let b = bytes.buf[bytes.start];
            bytes.start += 1;
            let len = match cobs.push(b) {
                None => continue,
                Some(Ok(len)) => len,
                Some(Err(e)) => {
                    tracing::warn!("serial frame dropped: {e}");
                    continue;
                }
            };
            let Ok(header) = frame::header(len) else {
                tracing::warn!(len, "serial frame over the frame limit dropped");
                continue;
            };
            let frame = &cobs.frame()[..len];
            if session.write_all(&header).await.is_err()
                || session.write_all(frame).await.is_err()
                || session.flush().await.is_err()
            {
                return None;
            }
        }
    }
}

/// Moves the session's length-prefixed frames onto the line, COBS-encoded.
/// Returns `None` when the session ended, else why the line ended.
async fn outbound<R, W>(
    session: &mut R,
    line: &mut W,
    frame: &mut [u8],
    encoded: &mut [u8],
) -> Option<LineEnd>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    loop {
        let mut header = [0u8; HEADER_LEN];
        if session.read_exact(&mut header).await.is_err() {
            return None;
        }
        let Ok(len) = frame::parse_header(header, frame.len()) else {
            return None;
        };
        if session.read_exact(&mut frame[..len]).await.is_err() {
            return None;
        }
        let n = match frame::cobs_encode(&frame[..len], encoded) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!("cannot encode a frame for the serial line: {e}");
                return None;
            }
        };
        if let Err(e) = line.write_all(&encoded[..n]).await {
            return Some(LineEnd::Failed(e));
        }
        LINE_BYTES.sent.fetch_add(n as u64, Ordering::Relaxed);
        if let Err(e) = line.flush().await {
            return Some(LineEnd::Failed(e));
        }
    }
}

/// An open serial port as an async byte stream (see the module docs).
#[derive(Debug)]
pub struct SerialLine {
    io: DuplexStream,
    closed: Arc<AtomicBool>,
}

impl Drop for SerialLine {
    fn drop(&mut self) {
        // Tells the port threads to stop at their next timeout.
        self.closed.store(true, Ordering::Release);
    }
}

impl AsyncRead for SerialLine {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for SerialLine {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Opens the serial port at `path` (raw, exclusive, [`SERIAL_BAUD`]) and starts its
/// reader and writer threads. Must be called inside a tokio runtime.
pub fn open_port(path: &Path) -> Result<SerialLine, serialport::Error> {
    let port = serialport::new(path.to_string_lossy(), SERIAL_BAUD)
        .timeout(Duration::from_millis(100))
        .open_native()?;
    let mut reader = port.try_clone_native()?;
    let mut writer = port;
    let (ours, theirs) = tokio::io::duplex(LINE_BUF);
    let (mut from_line, mut to_line) = tokio::io::split(theirs);
    let closed = Arc::new(AtomicBool::new(false));
    let runtime = tokio::runtime::Handle::current();
    let label = path.display().to_string();

    let (stop, rt) = (closed.clone(), runtime.clone());
    let name = label.clone();
    std::thread::Builder::new()
        .name("serial-rx".into())
        .spawn(move || {
            let mut buf = [0u8; 4096];
            while !stop.load(Ordering::Acquire) {
                match reader.read(&mut buf) {
                    Ok(0) => {}
                    Ok(n) => {
                        if rt.block_on(to_line.write_all(&buf[..n])).is_err() {
                            break;
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                    Err(e) => {
                        tracing::debug!(port = %name, "serial read failed: {e}");
                        break;
                    }
                }
            }
        })
        .map_err(|e| serialport::Error::new(serialport::ErrorKind::Io(e.kind()), e.to_string()))?;

    let stop = closed.clone();
    std::thread::Builder::new()
        .name("serial-tx".into())
        .spawn(move || {
            let mut buf = [0u8; 4096];
            'outer: loop {
                let n = match runtime.block_on(from_line.read(&mut buf)) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let mut off = 0;
                while off < n {
                    match writer.write(&buf[off..n]) {
                        Ok(w) => off += w,
                        // The device is not taking bytes yet (flow control): wait, unless closed.
                        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                        Err(e) => {
                            tracing::debug!(port = %label, "serial write failed: {e}");
                            break 'outer;
                        }
                    }
                    if stop.load(Ordering::Acquire) {
                        break 'outer;
                    }
                }
            }
        })
        .map_err(|e| serialport::Error::new(serialport::ErrorKind::Io(e.kind()), e.to_string()))?;
    Ok(SerialLine { io: ours, closed })
}

/// The serial ports a manager serves, each with its own stop signal, so a reload of the
/// configuration (`SIGHUP`) can open new ports and close removed ones while every other
/// session goes on.
pub struct SerialPorts {
    server: Arc<AgentPort>,
    /// Set once: the manager is shutting down, every port stops.
    shutdown: tokio::sync::watch::Receiver<bool>,
    /// Each served port's own stop signal and task.
    running: std::collections::BTreeMap<
        PathBuf,
        (
            tokio::sync::watch::Sender<bool>,
            tokio::task::JoinHandle<()>,
        ),
    >,
    /// Tasks of removed ports, awaited (bounded) at shutdown.
    stopping: Vec<tokio::task::JoinHandle<()>>,
}

impl SerialPorts {
    /// No ports yet; `shutdown` turning true stops them all.
    pub fn new(server: Arc<AgentPort>, shutdown: tokio::sync::watch::Receiver<bool>) -> Self {
        SerialPorts {
            server,
            shutdown,
            running: Default::default(),
            stopping: Vec::new(),
        }
    }

    /// Serves exactly `wanted` from now on: starts the ports not served yet and stops those
    /// not wanted any more (ending the session on that line). Returns (started, stopped).
    pub fn set(&mut self, wanted: &[PathBuf]) -> (Vec<PathBuf>, Vec<PathBuf>) {
        let removed: Vec<PathBuf> = self
            .running
            .keys()
            .filter(|p| !wanted.contains(p))
            .cloned()
            .collect();
        for path in &removed {
            if let Some((stop, task)) = self.running.remove(path) {
                let _ = stop.send(true);
                tracing::info!(port = %path.display(), "serial port closed (no longer configured)");
                self.stopping.push(task);
            }
        }
        let mut added = Vec::new();
        for path in wanted {
            if self.running.contains_key(path) {
                continue;
            }
            let (stop, own) = tokio::sync::watch::channel(false);
            let all = self.shutdown.clone();
            let stopped = async move {
                let (mut own, mut all) = (own, all);
                tokio::select! {
                    _ = own.wait_for(|s| *s) => {}
                    _ = all.wait_for(|s| *s) => {}
                }
            };
            let task = tokio::spawn(run_serial_port(path.clone(), self.server.clone(), stopped));
            self.running.insert(path.clone(), (stop, task));
            added.push(path.clone());
        }
        (added, removed)
    }

    /// Waits for every port's task to end, at most `grace` for each (after shutdown was set).
    pub async fn join(self, grace: Duration) {
        let tasks = self.running.into_values().map(|(_, task)| task);
        for task in tasks.chain(self.stopping) {
            let _ = tokio::time::timeout(grace, task).await;
        }
    }
}

#[cfg(test)]
mod test {
    use std::sync::Mutex;

    use baton_agent_core::linux::admission::{Admission, AdmissionLimits};
    use baton_agent_core::linux::link::Limits;
    use baton_manager_core::session::SessionConfig;
    use baton_protocol::identity::Identity;
    use baton_protocol::message::Message;
    use baton_protocol::session::{Handshake, Hello, Role, Transport};
    use baton_protocol::types::AgentId;
    use tokio::sync::mpsc;

    use super::*;
    use crate::content::Library;
    use crate::engine_task::EngineInput;
    use crate::registry::{Registry, SharedStore};
    use crate::store::{SqliteStore, Store};
    use crate::test_fixtures::report;

    const BOUND: Duration = Duration::from_secs(10);
    /// The handshake timeout of the test's agent port.
    const HANDSHAKE_TIMEOUT: Duration = Duration::from_millis(400);

    fn cobs(frame: &[u8]) -> Vec<u8> {
        let mut out = vec![0u8; frame.len() + frame.len() / 254 + 2];
        let n = frame::cobs_encode(frame, &mut out).unwrap();
        out.truncate(n);
        out
    }

    /// Reads one length-prefixed frame.
    async fn read_prefixed(r: &mut (impl AsyncRead + Unpin)) -> Vec<u8> {
        let mut header = [0u8; HEADER_LEN];
        tokio::time::timeout(BOUND, r.read_exact(&mut header))
            .await
            .expect("a frame in time")
            .unwrap();
        let len = frame::parse_header(header, MAX_FRAME).unwrap();
        let mut body = vec![0u8; len];
        r.read_exact(&mut body).await.unwrap();
        body
    }

    /// Reads one COBS frame from a line.
    async fn read_cobs(r: &mut (impl AsyncRead + Unpin)) -> Vec<u8> {
        let mut buf = vec![0u8; COBS_MAX];
        let mut reader = CobsReader::new(&mut buf);
        loop {
            let mut b = [0u8; 1];
            tokio::time::timeout(BOUND, r.read_exact(&mut b))
                .await
                .expect("a frame in time")
                .unwrap();
            if let Some(res) = reader.push(b[0]) {
                let n = res.expect("valid COBS");
                return reader.frame()[..n].to_vec();
            }
        }
    }

    fn line_bytes() -> LineBytes {
        LineBytes {
            buf: vec![0u8; 4096],
            start: 0,
            end: 0,
        }
    }

    #[tokio::test]
    async fn inbound_passes_good_frames_and_drops_bad_ones() {
        let (mut device, line) = tokio::io::duplex(1 << 20);
        let (mut line_rx, _line_tx) = tokio::io::split(line);
        let (mut session_r, mut session_w) = tokio::io::duplex(1 << 20);
        let mut wire = vec![0x05, 0x01, 0x00]; // a code promising more bytes than follow
        wire.extend(cobs(b"first\0frame"));
        wire.extend(std::iter::repeat_n(7u8, COBS_MAX + 10)); // oversized
        wire.push(0);
        wire.extend([0, 0]); // idle delimiters
        wire.extend(cobs(&[0u8; 300]));
        device.write_all(&wire).await.unwrap();
        let mut bytes = line_bytes();
        let mut cobs_buf = vec![0u8; COBS_MAX];
        let mut reader = CobsReader::new(&mut cobs_buf);
        let pump = inbound(&mut line_rx, &mut bytes, &mut reader, &mut session_w);
        let check = async {
            assert_eq!(read_prefixed(&mut session_r).await, b"first\0frame");
            assert_eq!(read_prefixed(&mut session_r).await, vec![0u8; 300]);
        };
        tokio::select! {
            end = pump => panic!("the pump stopped: {end:?}"),
            () = check => {}
        }
    }

    #[tokio::test]
    async fn bytes_after_a_session_ends_go_to_the_next_one() {
        let (mut device, line) = tokio::io::duplex(1 << 20);
        let (mut line_rx, _line_tx) = tokio::io::split(line);
        let mut wire = cobs(b"one");
        wire.extend(cobs(b"two"));
        device.write_all(&wire).await.unwrap();
        let mut bytes = line_bytes();
        let mut cobs_buf = vec![0u8; COBS_MAX];
        let mut reader = CobsReader::new(&mut cobs_buf);
        // The first session is gone before its frame arrives: the frame is lost with it.
        let (gone, mut first) = tokio::io::duplex(64);
        drop(gone);
        let end = inbound(&mut line_rx, &mut bytes, &mut reader, &mut first).await;
        assert!(end.is_none(), "{end:?}");
        // The next session gets what followed.
        let (mut session_r, mut second) = tokio::io::duplex(64);
        tokio::select! {
            end = inbound(&mut line_rx, &mut bytes, &mut reader, &mut second) => panic!("{end:?}"),
            got = read_prefixed(&mut session_r) => assert_eq!(got, b"two"),
        }
        // A line that ends is reported as closed.
        drop(device);
        let end = inbound(&mut line_rx, &mut bytes, &mut reader, &mut second).await;
        assert!(matches!(end, Some(LineEnd::Closed)), "{end:?}");
    }

    #[tokio::test]
    async fn outbound_cobs_encodes_the_sessions_frames() {
        let (mut session_w, mut session_r) = tokio::io::duplex(1 << 20);
        let (mut line, mut device) = tokio::io::duplex(1 << 20);
        let frames: Vec<Vec<u8>> = vec![vec![0; 10], (0..=255).cycle().take(5000).collect()];
        for f in &frames {
            session_w
                .write_all(&frame::header(f.len()).unwrap())
                .await
                .unwrap();
            session_w.write_all(f).await.unwrap();
        }
        drop(session_w);
        let mut frame_buf = vec![0u8; MAX_FRAME];
        let mut encoded = vec![0u8; COBS_MAX + 1];
        let sent_before = LINE_BYTES.sent.load(Ordering::Relaxed);
        let end = outbound(&mut session_r, &mut line, &mut frame_buf, &mut encoded).await;
        assert!(end.is_none(), "the session's end ends it: {end:?}");
        drop(line);
        let mut wire = Vec::new();
        device.read_to_end(&mut wire).await.unwrap();
        // The line counter counts what went on the line (other tests may add to it too).
        let counted = LINE_BYTES.sent.load(Ordering::Relaxed) - sent_before;
        assert!(counted >= wire.len() as u64, "{counted} < {}", wire.len());
        let mut device = &wire[..];
        for f in &frames {
            assert_eq!(&read_cobs(&mut device).await, f);
        }
    }

    /// A manager's agent port over an in-memory store; `engine` receives its engine inputs.
    fn server() -> (Arc<AgentPort>, mpsc::Receiver<EngineInput>) {
        let store: SharedStore = Arc::new(Mutex::new(
            Box::new(SqliteStore::in_memory().unwrap()) as Box<dyn Store>
        ));
        let (engine, inputs) = crate::engine_task::channel();
        let server = AgentPort {
            session: Arc::new(SessionConfig::new(
                Identity::from_seed([1; 32]),
                [Identity::from_seed([2; 32]).public()],
            )),
            registry: Arc::new(Registry::load(store).unwrap()),
            library: Arc::new(Library::new()),
            limits: Limits::default(),
            engine,
            admission: Admission::new(
                "test agent port",
                AdmissionLimits {
                    max_connections: 10,
                    max_handshakes: 10,
                    max_handshakes_per_address: 10,
                    handshake_timeout: HANDSHAKE_TIMEOUT,
                },
            ),
        };
        (Arc::new(server), inputs)
    }

    /// A line the agent port serves in a task of its own until [`LineTask::shut_down`].
    struct LineTask {
        stop: tokio::sync::oneshot::Sender<()>,
        served: tokio::task::JoinHandle<LineEnd>,
    }

    impl LineTask {
        /// Serves the manager's end of a new in-memory line with `server`; returns the
        /// device's end and the task.
        fn start(server: Arc<AgentPort>) -> (tokio::io::DuplexStream, LineTask) {
            let (device, line) = tokio::io::duplex(1 << 16);
            let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
            let served = tokio::spawn(async move {
                let shutdown = async {
                    let _ = stop_rx.await;
                };
                tokio::pin!(shutdown);
                serve_line(line, "test", server, &mut shutdown).await
            });
            (device, LineTask { stop, served })
        }

        /// Shuts the line's task down and checks that it ended for that reason, within `BOUND`.
        async fn shut_down(self) {
            self.stop.send(()).unwrap();
            let end = tokio::time::timeout(BOUND, self.served)
                .await
                .unwrap()
                .unwrap();
            assert!(matches!(end, LineEnd::Shutdown), "{end}");
        }
    }

    /// The device side of a handshake over a COBS line.
    async fn device_handshake(
        line: &mut (impl AsyncRead + AsyncWrite + Unpin),
        me: &Identity,
        manager: &Identity,
        id: &AgentId,
    ) -> Transport {
        let hello = Hello::new(Role::Agent, id.clone(), baton_protocol::caps::SERIAL, None);
        let mut hs = Handshake::initiator(me, [9; 32], &manager.public(), hello).unwrap();
        let mut buf = vec![0u8; 2048];
        let n = hs.write_message(&mut buf).unwrap();
        line.write_all(&cobs(&buf[..n])).await.unwrap();
        let msg2 = read_cobs(line).await;
        hs.read_message(&msg2).unwrap();
        let n = hs.write_message(&mut buf).unwrap();
        line.write_all(&cobs(&buf[..n])).await.unwrap();
        hs.finish().unwrap()
    }

    /// The device's first handshake message as agent `id`, and nothing more: a handshake
    /// the device abandons (it starts over) or stalls.
    async fn first_handshake_message(
        line: &mut (impl AsyncWrite + Unpin),
        me: &Identity,
        manager: &Identity,
        id: &AgentId,
    ) {
        let hello = Hello::new(Role::Agent, id.clone(), 0, None);
        let mut hs = Handshake::initiator(me, [8; 32], &manager.public(), hello).unwrap();
        let mut buf = vec![0u8; 256];
        let n = hs.write_message(&mut buf).unwrap();
        line.write_all(&cobs(&buf[..n])).await.unwrap();
    }

    async fn send(line: &mut (impl AsyncWrite + Unpin), t: &mut Transport, msg: &Message<'_>) {
        let mut buf = vec![0u8; 4096];
        let plain = msg.encode(&mut buf).unwrap().len();
        let n = t.encrypt(&mut buf, plain).unwrap();
        line.write_all(&cobs(&buf[..n])).await.unwrap();
    }

    async fn recv(line: &mut (impl AsyncRead + Unpin), t: &mut Transport) -> Vec<u8> {
        let mut frame = read_cobs(line).await;
        let n = frame.len();
        let plain = t.decrypt(&mut frame, n).unwrap();
        frame.truncate(plain);
        frame
    }

    /// A device on a serial line: handshake, report, welcome, ping; then it
    /// "reboots" mid-session and its new handshake on the same line is served.
    #[tokio::test]
    async fn a_device_on_a_line_is_served_like_a_tcp_agent_and_can_start_over() {
        let (server, mut inputs) = server();
        let manager = Identity::from_seed([1; 32]);
        let me = Identity::from_seed([3; 32]);
        let id = AgentId::try_from("fw-serial").unwrap();
        server.registry.enrol(&id, &me.public()).unwrap();
        let (mut device, served) = LineTask::start(server);

        for round in 0..2u64 {
            let mut t = device_handshake(&mut device, &me, &manager, &id).await;
            send(&mut device, &mut t, &Message::Report(report(id.clone()))).await;
            let welcome = recv(&mut device, &mut t).await;
            match Message::decode(&welcome).unwrap() {
                Message::Welcome { cert, .. } => assert_eq!(cert.id, id),
                other => panic!("expected Welcome, got {other:?}"),
            }
            let online = tokio::time::timeout(BOUND, async {
                loop {
                    match inputs.recv().await.expect("engine input") {
                        EngineInput::Online {
                            id: who, report, ..
                        } => return (who, report),
                        _ => continue,
                    }
                }
            })
            .await
            .expect("the engine hears of the device");
            assert_eq!(online.0, id);
            assert!(!online.1.can_serve);
            send(&mut device, &mut t, &Message::Ping { nonce: round }).await;
            let pong = recv(&mut device, &mut t).await;
            assert_eq!(
                Message::decode(&pong).unwrap(),
                Message::Pong { nonce: round }
            );
            // Round 0 ends like a power cut: the device starts over with a new
            // handshake, whose first message the old session cannot decrypt.
            // That ends the session; the device's retry meets a new one.
            if round == 0 {
                first_handshake_message(&mut device, &me, &manager, &id).await;
                // The abandoned attempt gets no answer; the device times out and retries.
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        served.shut_down().await;
    }

    /// A device that stalls mid-handshake holds its line for the handshake
    /// timeout and no longer: that session ends (a delimiter on the line says
    /// so), and the device's next handshake on the line is served.
    #[tokio::test]
    async fn a_handshake_stalled_on_a_line_ends_at_the_timeout_and_the_next_is_served() {
        let (server, _inputs) = server();
        let manager = Identity::from_seed([1; 32]);
        let me = Identity::from_seed([3; 32]);
        let id = AgentId::try_from("fw-stall").unwrap();
        server.registry.enrol(&id, &me.public()).unwrap();
        let (mut device, served) = LineTask::start(server);
        // An idle line holds no session: nothing times out while nobody talks.
        tokio::time::sleep(HANDSHAKE_TIMEOUT * 2).await;

        let started = tokio::time::Instant::now();
        first_handshake_message(&mut device, &me, &manager, &id).await;
        let msg2 = read_cobs(&mut device).await;
        assert!(!msg2.is_empty(), "the manager answers message 1");
        // The device sends nothing more; the session's end puts a delimiter on the line.
        let mut b = [0u8; 1];
        for _ in 0..16 {
            tokio::time::timeout(BOUND, device.read_exact(&mut b))
                .await
                .expect("the stalled session ends")
                .unwrap();
            if b[0] == 0 {
                break;
            }
        }
        assert_eq!(b[0], 0, "a delimiter ends the stalled session");
        let held = started.elapsed();
        assert!(
            held >= HANDSHAKE_TIMEOUT && held < HANDSHAKE_TIMEOUT + Duration::from_secs(3),
            "the stalled handshake held the line for {held:?}"
        );

        let mut t = device_handshake(&mut device, &me, &manager, &id).await;
        send(&mut device, &mut t, &Message::Report(report(id.clone()))).await;
        let welcome = recv(&mut device, &mut t).await;
        assert!(
            matches!(Message::decode(&welcome).unwrap(), Message::Welcome { .. }),
            "the next handshake is served"
        );
        served.shut_down().await;
    }

    /// `open_port` moves bytes both ways through a real tty (a pseudo-terminal pair).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn open_port_bridges_a_pseudo_terminal() {
        use serialport::SerialPort as _;
        let (mut master, slave) = serialport::TTYPort::pair().expect("a pseudo-terminal pair");
        let path = PathBuf::from(slave.name().expect("the slave's path"));
        // Kept open (closing a pty's last slave descriptor hangs it up for a
        // moment); it holds no lock, so the port can still be opened by path.
        let mut line = open_port(&path).expect("open the slave");
        let out = cobs(&[1, 0, 2, 3]);
        let back = cobs(b"ab\0");
        line.write_all(&out).await.unwrap();
        let got = tokio::task::spawn_blocking(move || {
            let mut got = vec![0u8; out.len()];
            master.set_timeout(Duration::from_secs(5)).expect("timeout");
            master.read_exact(&mut got).expect("bytes from the line");
            master.write_all(&back).expect("bytes to the line");
            // The master stays open until the bytes are through: a pty whose
            // master closes reports a hang-up before its unread input.
            (got, out, master)
        })
        .await
        .unwrap();
        assert_eq!(got.0, got.1);
        assert_eq!(read_cobs(&mut line).await, b"ab\0");
        drop((got.2, slave));
    }
}
