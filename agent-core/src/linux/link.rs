//! Secure links over async byte streams: handshake, then encrypted frames.
//!
//! A link is one TCP connection (or any `AsyncRead + AsyncWrite` stream)
//! carrying the Noise XX handshake of [`baton_protocol::session`] in
//! length-prefixed frames ([`baton_protocol::frame`]), then one encrypted
//! [`baton_protocol::Message`] per frame. [`connect`] is the initiator (it
//! knows the key it expects), [`accept`] the responder (it decides about the
//! initiator in its `authorize` closure after message 3). [`Link::split`]
//! gives a [`LinkReader`] and a [`LinkWriter`] for separate tasks.
//!
//! Every length read from the wire is checked before the body is read: a
//! handshake frame may be at most [`MAX_HANDSHAKE_MSG`] bytes, a transport
//! frame at most [`LinkReader::set_max_frame`] (default [`MAX_FRAME`]).
//!
//! An idle link holds no frame buffer of its own: a manager keeps one link per agent, and
//! two buffers of [`MAX_FRAME`] each were 128 KiB per session. The writer seals each frame
//! in a buffer made for it and dropped after the write; the reader's buffer grows to the
//! frame it reads and is cut back to [`KEEP_READ_BUFFER`] when a frame that fits there
//! follows a larger one, so a stream of large frames (a transfer) reuses one buffer and
//! the control traffic after it does not keep it.
//! Each frame written waits for the upload [`RateLimiter`] and each frame read
//! for the download one, and both are counted in [`Limits`].
//!
//! The handshake has no fourth message, so when the responder's `authorize`
//! refuses, the initiator's [`connect`] has already returned: it learns of the
//! refusal as [`LinkError::Closed`] from its first [`LinkReader::recv`].

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use baton_protocol::frame::{self, FrameError, HEADER_LEN};
use baton_protocol::identity::Identity;
use baton_protocol::session::{
    Handshake, Hello, MAX_HANDSHAKE_MSG, Opener, Sealer, SessionError, TAG_LEN,
};
use baton_protocol::{MAX_FRAME, PublicKey};
use rand::RngCore as _;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};

use super::rate::RateLimiter;

/// The reader's buffer is cut back to this many bytes when a frame that fits follows a
/// larger one (see the module docs).
pub const KEEP_READ_BUFFER: usize = 1024;

/// How long a whole handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Rate limits and byte counters shared by the connections of a process.
#[derive(Clone, Default, Debug)]
pub struct Limits {
    /// Applied before each frame is written.
    pub up: Option<Arc<RateLimiter>>,
    /// Applied after each frame is read.
    pub down: Option<Arc<RateLimiter>>,
    /// Wire bytes written (frames including headers), process-wide.
    pub sent: Arc<AtomicU64>,
    /// Wire bytes read (frames including headers), process-wide.
    pub received: Arc<AtomicU64>,
}

/// Why a link failed.
#[derive(thiserror::Error, Debug)]
#[non_exhaustive]
pub enum LinkError {
    /// The stream failed.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// A frame header was zero or over the limit.
    #[error("bad frame: {0}")]
    Frame(#[from] FrameError),
    /// The handshake or a frame's authentication failed.
    #[error("session error: {0}")]
    Session(#[from] SessionError),
    /// The handshake did not finish within [`HANDSHAKE_TIMEOUT`] (or a listener's
    /// shorter bound, see [`super::admission`]).
    #[error("handshake timed out")]
    Timeout,
    /// The other side was not accepted.
    #[error("refused: {0}")]
    Refused(String),
    /// The other side closed the connection.
    #[error("connection closed")]
    Closed,
    /// A write made no progress for this long: the other side does not read.
    #[error("the other side read nothing for {0:?}")]
    Stalled(Duration),
}

/// An established link: the other side's hello, the stream and the session.
pub struct Link<S> {
    /// The other side's handshake hello (its id, role, capabilities, certificate).
    pub remote: Hello,
    stream: S,
    sealer: Sealer,
    opener: Opener,
    limits: Limits,
}

impl<S> std::fmt::Debug for Link<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("remote", &self.remote.id)
            .finish_non_exhaustive()
    }
}

/// The receiving half of a link.
pub struct LinkReader<R> {
    reader: R,
    opener: Opener,
    buf: Vec<u8>,
    max_frame: usize,
    limits: Limits,
}

/// The sending half of a link.
pub struct LinkWriter<W> {
    writer: W,
    sealer: Sealer,
    limits: Limits,
    stall_timeout: Option<Duration>,
}

impl<R> std::fmt::Debug for LinkReader<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkReader")
            .field("max_frame", &self.max_frame)
            .finish_non_exhaustive()
    }
}

impl<W> std::fmt::Debug for LinkWriter<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkWriter").finish_non_exhaustive()
    }
}

fn ephemeral() -> [u8; 32] {
    let mut e = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut e);
    e
}

/// Reads a frame header and checks it against `max` before anything else is read.
async fn read_header<R: AsyncRead + Unpin>(r: &mut R, max: usize) -> Result<usize, LinkError> {
    let mut header = [0u8; HEADER_LEN];
    match r.read_exact(&mut header).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(LinkError::Closed),
        Err(e) => return Err(e.into()),
    }
    Ok(frame::parse_header(header, max)?)
}

async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut [u8],
    max: usize,
    limits: &Limits,
) -> Result<usize, LinkError> {
    let len = read_header(r, max.min(buf.len())).await?;
    read_body(r, &mut buf[..len], limits).await?;
    Ok(len)
}

/// Reads a frame body of `body.len()` bytes (its header already read and checked), counts
/// it and waits for the download limiter.
async fn read_body<R: AsyncRead + Unpin>(
    r: &mut R,
    body: &mut [u8],
    limits: &Limits,
) -> Result<(), LinkError> {
    let len = body.len();
    r.read_exact(body).await?;
    let wire = HEADER_LEN + len;
    limits.received.fetch_add(wire as u64, Ordering::Relaxed);
    if let Some(down) = &limits.down {
        down.acquire(wire).await;
    }
    Ok(())
}

/// Writes `buf[HEADER_LEN..HEADER_LEN + len]` as one frame (the header goes into `buf[..HEADER_LEN]`).
///
/// With a `stall` timeout, a write (or the flush) that takes no byte for that long fails
/// with [`LinkError::Stalled`]; the wait for the upload limiter does not count.
async fn write_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    buf: &mut [u8],
    len: usize,
    limits: &Limits,
    stall: Option<Duration>,
) -> Result<(), LinkError> {
    write_frame_after(w, buf, len, limits, stall, true).await
}

/// [`write_frame`], waiting for the upload limiter only if `limited` (otherwise the caller
/// took the frame's bytes from it already).
async fn write_frame_after<W: AsyncWrite + Unpin>(
    w: &mut W,
    buf: &mut [u8],
    len: usize,
    limits: &Limits,
    stall: Option<Duration>,
    limited: bool,
) -> Result<(), LinkError> {
    buf[..HEADER_LEN].copy_from_slice(&frame::header(len)?);
    let wire = HEADER_LEN + len;
    if limited && let Some(up) = &limits.up {
        up.acquire(wire).await;
    }
    match stall {
        None => {
            w.write_all(&buf[..wire]).await?;
            w.flush().await?;
        }
        Some(stall) => {
            let mut written = 0;
            while written < wire {
                let n = tokio::time::timeout(stall, w.write(&buf[written..wire]))
                    .await
                    .map_err(|_| LinkError::Stalled(stall))??;
                if n == 0 {
                    return Err(std::io::Error::from(std::io::ErrorKind::WriteZero).into());
                }
                written += n;
            }
            tokio::time::timeout(stall, w.flush())
                .await
                .map_err(|_| LinkError::Stalled(stall))??;
        }
    }
    limits.sent.fetch_add(wire as u64, Ordering::Relaxed);
    Ok(())
}

async fn handshake_send<S: AsyncWrite + Unpin>(
    stream: &mut S,
    hs: &mut Handshake,
    limits: &Limits,
) -> Result<(), LinkError> {
    let mut buf = [0u8; HEADER_LEN + MAX_HANDSHAKE_MSG];
    let n = hs.write_message(&mut buf[HEADER_LEN..])?;
    write_frame(stream, &mut buf, n, limits, None).await
}

async fn handshake_recv<S: AsyncRead + Unpin>(
    stream: &mut S,
    hs: &mut Handshake,
    limits: &Limits,
) -> Result<(), LinkError> {
    let mut buf = [0u8; MAX_HANDSHAKE_MSG];
    let n = read_frame(stream, &mut buf, MAX_HANDSHAKE_MSG, limits).await?;
    hs.read_message(&buf[..n])?;
    Ok(())
}

fn established<S>(stream: S, hs: Handshake, limits: &Limits) -> Result<Link<S>, LinkError> {
    let remote = hs
        .remote_hello()
        .cloned()
        .ok_or(LinkError::Session(SessionError::OutOfOrder))?;
    let (sealer, opener) = hs.finish()?.split();
    Ok(Link {
        remote,
        stream,
        sealer,
        opener,
        limits: limits.clone(),
    })
}

/// Opens a link as the initiator, expecting the responder's Ed25519 key `expected`.
///
/// Times out after [`HANDSHAKE_TIMEOUT`]; the ephemeral key is fresh from the OS RNG.
pub async fn connect<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    mut stream: S,
    me: &Identity,
    expected: &PublicKey,
    hello: Hello,
    limits: &Limits,
) -> Result<Link<S>, LinkError> {
    let mut hs = Handshake::initiator(me, ephemeral(), expected, hello)?;
    let run = async {
        handshake_send(&mut stream, &mut hs, limits).await?;
        handshake_recv(&mut stream, &mut hs, limits).await?;
        handshake_send(&mut stream, &mut hs, limits).await
    };
    tokio::time::timeout(HANDSHAKE_TIMEOUT, run)
        .await
        .map_err(|_| LinkError::Timeout)??;
    established(stream, hs, limits)
}

/// Accepts a link as the responder; `authorize` decides about the initiator after message 3.
///
/// What `authorize` returns is handed back with the link (e.g. the peer's
/// verified key). When it refuses, the stream is dropped unused.
pub async fn accept<S, T>(
    mut stream: S,
    me: &Identity,
    hello: Hello,
    limits: &Limits,
    authorize: impl FnOnce(&Handshake) -> Result<T, LinkError>,
) -> Result<(Link<S>, T), LinkError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut hs = Handshake::responder(me, ephemeral(), hello)?;
    let run = async {
        handshake_recv(&mut stream, &mut hs, limits).await?;
        handshake_send(&mut stream, &mut hs, limits).await?;
        handshake_recv(&mut stream, &mut hs, limits).await
    };
    tokio::time::timeout(HANDSHAKE_TIMEOUT, run)
        .await
        .map_err(|_| LinkError::Timeout)??;
    let t = authorize(&hs)?;
    Ok((established(stream, hs, limits)?, t))
}

impl<S: AsyncRead + AsyncWrite> Link<S> {
    /// Splits into a reader and a writer that can live in different tasks.
    pub fn split(self) -> (LinkReader<ReadHalf<S>>, LinkWriter<WriteHalf<S>>) {
        let (r, w) = tokio::io::split(self.stream);
        (
            LinkReader {
                reader: r,
                opener: self.opener,
                buf: Vec::new(),
                max_frame: MAX_FRAME,
                limits: self.limits.clone(),
            },
            LinkWriter {
                writer: w,
                sealer: self.sealer,
                limits: self.limits,
                stall_timeout: None,
            },
        )
    }
}

impl<R: AsyncRead + Unpin> LinkReader<R> {
    /// Lowers the largest frame this reader accepts (at most [`MAX_FRAME`]).
    pub fn set_max_frame(&mut self, max: usize) {
        self.max_frame = max.clamp(TAG_LEN + 1, MAX_FRAME);
    }

    /// Receives the next frame and returns its decrypted plaintext.
    ///
    /// The header's length is checked before the body is read. Any error means
    /// the link can no longer be trusted: drop it.
    pub async fn recv(&mut self) -> Result<&mut [u8], LinkError> {
        let n = read_header(&mut self.reader, self.max_frame).await?;
        if self.buf.len() < n {
            self.buf.resize(n, 0);
        } else if n <= KEEP_READ_BUFFER && self.buf.len() > KEEP_READ_BUFFER {
            // Back to control traffic after large frames: the large buffer goes.
            self.buf.truncate(KEEP_READ_BUFFER);
            self.buf.shrink_to_fit();
        }
        read_body(&mut self.reader, &mut self.buf[..n], &self.limits).await?;
        let m = self.opener.decrypt(&mut self.buf, n)?;
        Ok(&mut self.buf[..m])
    }

    /// Bytes this reader's frame buffer holds now (it follows the frames read, see the
    /// module docs).
    pub fn buffer_capacity(&self) -> usize {
        self.buf.capacity()
    }
}

impl<W: AsyncWrite + Unpin> LinkWriter<W> {
    /// Largest plaintext one [`LinkWriter::send`] takes.
    pub const MAX_PLAINTEXT: usize = MAX_FRAME - TAG_LEN;

    /// Encrypts `plaintext` into one frame and writes it (after the upload limiter).
    pub async fn send(&mut self, plaintext: &[u8]) -> Result<(), LinkError> {
        self.send_frame(plaintext, true).await
    }

    /// Takes the frame that [`LinkWriter::send_reserved`] will send for `plaintext_len`
    /// bytes from the upload limiter now; returns how long it should wait for the cap
    /// (`None`: at once, or no cap). A writer can send urgent frames meanwhile: their bytes
    /// are taken the same way and delay what follows.
    pub fn reserve_upload(&self, plaintext_len: usize) -> Option<Duration> {
        let up = self.limits.up.as_ref()?;
        up.reserve_now(HEADER_LEN + plaintext_len + TAG_LEN)
    }

    /// [`LinkWriter::send`] of a frame whose bytes were taken with
    /// [`LinkWriter::reserve_upload`]: it does not wait for the upload limiter.
    pub async fn send_reserved(&mut self, plaintext: &[u8]) -> Result<(), LinkError> {
        self.send_frame(plaintext, false).await
    }

    async fn send_frame(&mut self, plaintext: &[u8], limited: bool) -> Result<(), LinkError> {
        if plaintext.len() > Self::MAX_PLAINTEXT {
            return Err(LinkError::Frame(FrameError::TooLarge {
                len: plaintext.len() + TAG_LEN,
                max: MAX_FRAME,
            }));
        }
        // A buffer for this frame only: an idle link keeps none.
        let mut buf = vec![0u8; HEADER_LEN + plaintext.len() + TAG_LEN];
        buf[HEADER_LEN..HEADER_LEN + plaintext.len()].copy_from_slice(plaintext);
        let n = self
            .sealer
            .encrypt(&mut buf[HEADER_LEN..], plaintext.len())?;
        write_frame_after(
            &mut self.writer,
            &mut buf,
            n,
            &self.limits,
            self.stall_timeout,
            limited,
        )
        .await
    }

    /// Makes [`LinkWriter::send`] fail with [`LinkError::Stalled`] when the other side takes
    /// no byte for `timeout` (it does not read); without it a send waits as long as it takes.
    pub fn set_stall_timeout(&mut self, timeout: Duration) {
        self.stall_timeout = Some(timeout);
    }

    /// Shuts the write side down (the other side's reader sees [`LinkError::Closed`]).
    pub async fn close(&mut self) -> Result<(), LinkError> {
        self.writer.shutdown().await?;
        Ok(())
    }
}

#[cfg(test)]
mod test {
    use baton_protocol::AgentId;
    use baton_protocol::session::Role;
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    fn hello(role: Role, id: &str) -> Hello {
        Hello::new(
            role,
            AgentId::try_from(id).unwrap(),
            baton_protocol::caps::ALL,
            None,
        )
    }

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (c, s) = tokio::join!(TcpStream::connect(addr), l.accept());
        (c.unwrap(), s.unwrap().0)
    }

    /// The agent's and the manager's ends of a link set up over `(c, s)` with the test
    /// identities (the manager admits anyone), each side with its own limits.
    async fn linked(
        c: TcpStream,
        s: TcpStream,
        agent_limits: &Limits,
        manager_limits: &Limits,
    ) -> (Link<TcpStream>, Link<TcpStream>) {
        let manager = Identity::from_seed([1; 32]);
        let agent = Identity::from_seed([2; 32]);
        let manager_pub = manager.public();
        let (client, server) = tokio::join!(
            connect(
                c,
                &agent,
                &manager_pub,
                hello(Role::Agent, "a1"),
                agent_limits
            ),
            accept(
                s,
                &manager,
                hello(Role::Manager, "m"),
                manager_limits,
                |_| Ok(())
            ),
        );
        (client.unwrap(), server.unwrap().0)
    }

    #[tokio::test]
    async fn frames_both_ways_over_loopback() {
        let (c, s) = pair().await;
        let manager = Identity::from_seed([1; 32]);
        let agent = Identity::from_seed([2; 32]);
        let limits = Limits::default();
        let agent_pub = agent.public();
        let manager_pub = manager.public();
        let (client, server) = tokio::join!(
            connect(c, &agent, &manager_pub, hello(Role::Agent, "a1"), &limits),
            accept(s, &manager, hello(Role::Manager, "m"), &limits, |hs| {
                hs.remote_is(&agent_pub)?;
                Ok(hs.remote_hello().unwrap().id.clone())
            }),
        );
        let client = client.unwrap();
        let (server, who) = server.unwrap();
        assert_eq!(who.as_str(), "a1");
        assert_eq!(client.remote.id.as_str(), "m");
        let (mut cr, mut cw) = client.split();
        let (mut sr, mut sw) = server.split();
        cw.send(b"report").await.unwrap();
        assert_eq!(sr.recv().await.unwrap(), b"report");
        let big = vec![7u8; LinkWriter::<WriteHalf<TcpStream>>::MAX_PLAINTEXT];
        sw.send(&big).await.unwrap();
        sw.send(b"welcome").await.unwrap();
        assert_eq!(cr.recv().await.unwrap(), &big[..]);
        assert_eq!(cr.recv().await.unwrap(), b"welcome");
        let sent = limits.sent.load(Ordering::Relaxed);
        assert_eq!(sent, limits.received.load(Ordering::Relaxed));
        assert!(sent > big.len() as u64);
        cw.close().await.unwrap();
        assert!(matches!(sr.recv().await, Err(LinkError::Closed)));
    }

    #[tokio::test]
    async fn an_idle_link_holds_no_large_buffer() {
        let (c, s) = pair().await;
        let limits = Limits::default();
        let (client, server) = linked(c, s, &limits, &limits).await;
        let (_cr, mut cw) = client.split();
        let (mut sr, _sw) = server.split();
        assert_eq!(sr.buffer_capacity(), 0, "no buffer before the first frame");
        let big = vec![3u8; 40_000];
        cw.send(&big).await.unwrap();
        cw.send(&big).await.unwrap();
        cw.send(b"small").await.unwrap();
        assert_eq!(sr.recv().await.unwrap().len(), big.len());
        assert!(sr.buffer_capacity() >= big.len());
        assert_eq!(sr.recv().await.unwrap(), &big[..]);
        assert_eq!(sr.recv().await.unwrap(), b"small");
        assert!(
            sr.buffer_capacity() <= KEEP_READ_BUFFER,
            "the large buffer was kept: {}",
            sr.buffer_capacity()
        );
    }

    #[tokio::test]
    async fn wrong_expected_key_is_refused() {
        let (c, s) = pair().await;
        let manager = Identity::from_seed([1; 32]);
        let impostor = Identity::from_seed([3; 32]);
        let agent = Identity::from_seed([2; 32]);
        let limits = Limits::default();
        let manager_pub = manager.public();
        let (client, server) = tokio::join!(
            connect(c, &agent, &manager_pub, hello(Role::Agent, "a1"), &limits),
            accept(s, &impostor, hello(Role::Manager, "m"), &limits, |_| Ok(())),
        );
        assert!(matches!(
            client,
            Err(LinkError::Session(SessionError::WrongPeerKey))
        ));
        // The initiator stopped after message 2, so the responder sees the stream end.
        assert!(server.is_err());
    }

    #[tokio::test]
    async fn refusal_in_authorize_fails_both_sides() {
        let (c, s) = pair().await;
        let manager = Identity::from_seed([1; 32]);
        let agent = Identity::from_seed([2; 32]);
        let limits = Limits::default();
        let manager_pub = manager.public();
        let (client, server) = tokio::join!(
            connect(c, &agent, &manager_pub, hello(Role::Agent, "a1"), &limits),
            accept(s, &manager, hello(Role::Manager, "m"), &limits, |_| {
                Err::<(), _>(LinkError::Refused("not enrolled".into()))
            }),
        );
        assert!(matches!(server, Err(LinkError::Refused(ref r)) if r == "not enrolled"));
        let (mut r, _w) = client.unwrap().split();
        assert!(matches!(r.recv().await, Err(LinkError::Closed)));
    }

    /// What the test proxy does to the client's third frame (its first transport frame).
    #[derive(Clone, Copy)]
    enum Tamper {
        FlipBodyByte,
        ZeroHeader,
    }

    /// Relays client → server frame by frame, tampering with the third frame.
    async fn tampering_proxy<R, W>(mut from: R, mut to: W, tamper: Tamper)
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let mut n = 0;
        loop {
            let mut header = [0u8; 2];
            if from.read_exact(&mut header).await.is_err() {
                return;
            }
            let len = u16::from_be_bytes(header) as usize;
            let mut body = vec![0u8; len];
            if from.read_exact(&mut body).await.is_err() {
                return;
            }
            n += 1;
            if n == 3 {
                match tamper {
                    Tamper::FlipBodyByte => body[len / 2] ^= 0x20,
                    Tamper::ZeroHeader => header = [0, 0],
                }
            }
            if to.write_all(&header).await.is_err() || to.write_all(&body).await.is_err() {
                return;
            }
        }
    }

    /// Runs a handshake through a tampering proxy, sends one frame; returns the server's recv error.
    async fn tampered(tamper: Tamper) -> LinkError {
        let (c, p_in) = pair().await;
        let (p_out, s) = pair().await;
        let (p_in_r, mut p_in_w) = p_in.into_split();
        let (mut p_out_r, p_out_w) = p_out.into_split();
        tokio::spawn(async move {
            let _ = tokio::io::copy(&mut p_out_r, &mut p_in_w).await;
        });
        tokio::spawn(tampering_proxy(p_in_r, p_out_w, tamper));
        let limits = Limits::default();
        let (client, server) = linked(c, s, &limits, &limits).await;
        let (_cr, mut cw) = client.split();
        let (mut sr, _sw) = server.split();
        cw.send(b"a frame worth tampering with").await.unwrap();
        let err = tokio::time::timeout(Duration::from_secs(5), sr.recv())
            .await
            .expect("recv must fail, not hang")
            .unwrap_err();
        // The session is unusable afterwards: the next frame fails too.
        err
    }

    #[tokio::test]
    async fn tampered_frame_fails_recv() {
        assert!(matches!(
            tampered(Tamper::FlipBodyByte).await,
            LinkError::Session(SessionError::BadFrame)
        ));
    }

    #[tokio::test]
    async fn zero_header_after_handshake_is_refused() {
        assert!(matches!(
            tampered(Tamper::ZeroHeader).await,
            LinkError::Frame(FrameError::Empty)
        ));
    }

    #[tokio::test]
    async fn oversize_and_zero_handshake_headers_are_refused_before_the_body() {
        for (header, want_empty) in [([0x08u8, 0x00], false), ([0, 0], true)] {
            let (mut c, s) = pair().await;
            // Only the header: a reader that waited for the body would hang.
            c.write_all(&header).await.unwrap();
            let manager = Identity::from_seed([1; 32]);
            let res = tokio::time::timeout(
                Duration::from_secs(5),
                accept(
                    s,
                    &manager,
                    hello(Role::Manager, "m"),
                    &Limits::default(),
                    |_| Ok(()),
                ),
            )
            .await
            .expect("refused at once");
            match res {
                Err(LinkError::Frame(FrameError::Empty)) => assert!(want_empty),
                Err(LinkError::Frame(FrameError::TooLarge { len: 2048, max })) => {
                    assert!(!want_empty);
                    assert_eq!(max, MAX_HANDSHAKE_MSG);
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn transport_frame_over_the_readers_limit_is_refused() {
        let (c, s) = pair().await;
        let limits = Limits::default();
        let (client, server) = linked(c, s, &limits, &limits).await;
        let (_cr, mut cw) = client.split();
        let (mut sr, _sw) = server.split();
        sr.set_max_frame(100);
        cw.send(&[1u8; 200]).await.unwrap();
        assert!(matches!(
            sr.recv().await,
            Err(LinkError::Frame(FrameError::TooLarge {
                len: 216,
                max: 100
            }))
        ));
    }

    #[tokio::test]
    async fn a_send_to_a_side_that_never_reads_fails_after_the_stall_timeout() {
        let (c, s) = pair().await;
        let limits = Limits::default();
        let (client, server) = linked(c, s, &limits, &limits).await;
        let (_cr, mut cw) = client.split();
        // The server's reader is kept but never read.
        let (_sr, _sw) = server.split();
        let stall = Duration::from_millis(300);
        cw.set_stall_timeout(stall);
        let big = vec![1u8; 32 * 1024];
        let started = tokio::time::Instant::now();
        let mut sent = 0usize;
        let err = loop {
            // Socket buffers hold a few MiB at most; 4096 frames are 128 MiB.
            assert!(sent < 4096, "sends kept succeeding");
            match cw.send(&big).await {
                Ok(()) => sent += 1,
                Err(e) => break e,
            }
        };
        assert!(matches!(err, LinkError::Stalled(d) if d == stall), "{err}");
        eprintln!("stalled after {sent} frames in {:?}", started.elapsed());
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    /// Sends `secs` seconds' worth of data at `bps` and returns the rate the receiver saw.
    async fn measured_rate(bps: u64, secs: f64, up: bool) -> f64 {
        let (c, s) = pair().await;
        let limiter = Some(Arc::new(RateLimiter::new(bps)));
        let capped = Limits {
            up: if up { limiter.clone() } else { None },
            down: if up { None } else { limiter },
            ..Limits::default()
        };
        let free = Limits::default();
        // The capped side sends (upload) or receives (download).
        let (client_limits, server_limits) = if up {
            (&capped, &free)
        } else {
            (&free, &capped)
        };
        let (client, server) = linked(c, s, client_limits, server_limits).await;
        let (_cr, mut cw) = client.split();
        let (mut sr, _sw) = server.split();
        let frame = 16 * 1024;
        let frames = (bps as f64 * secs / frame as f64) as usize;
        let sender = tokio::spawn(async move {
            let data = vec![0x5a; frame];
            for _ in 0..frames {
                cw.send(&data).await.unwrap();
            }
            cw
        });
        sr.recv().await.unwrap();
        let first = tokio::time::Instant::now();
        let mut bytes = 0u64;
        for _ in 1..frames {
            bytes += sr.recv().await.unwrap().len() as u64;
        }
        let took = first.elapsed().as_secs_f64();
        sender.await.unwrap();
        // Wire bytes per frame: header + tag on top of the plaintext.
        let per_frame = (frame + TAG_LEN + HEADER_LEN) as f64 / frame as f64;
        bytes as f64 * per_frame / took
    }

    #[tokio::test]
    async fn upload_cap_is_held_within_three_percent() {
        let cap = 2_000_000;
        let rate = measured_rate(cap, 2.5, true).await;
        let err = (rate - cap as f64).abs() / cap as f64;
        eprintln!("cap {cap} achieved {rate:.0}");
        assert!(err < 0.03, "achieved {rate:.0} B/s for a cap of {cap}");
    }

    #[tokio::test]
    async fn download_cap_is_held_within_three_percent() {
        let cap = 2_000_000;
        let rate = measured_rate(cap, 2.5, false).await;
        let err = (rate - cap as f64).abs() / cap as f64;
        eprintln!("cap {cap} achieved {rate:.0}");
        assert!(err < 0.03, "achieved {rate:.0} B/s for a cap of {cap}");
    }
}
