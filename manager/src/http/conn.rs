//! What one HTTP connection may hold once accepted: time for its request
//! bodies and time for its responses to be read.
//!
//! Hyper bounds the time to a request's headers; after them, a client could
//! trickle or withhold a body (a `POST /login` announcing a large
//! `Content-Length`, then nothing) or never read a response, and hold its
//! connection, a permit of the connection cap, forever. Two wrappers close
//! those gaps:
//! - [`PacedBody`]: a request body must keep arriving. It fails when no byte
//!   came for the body timeout, and when it runs behind a minimum average rate
//!   (with the body timeout as a head start), as Apache's `mod_reqtimeout`
//!   does: a client sending one byte every few seconds is cut off too.
//! - [`WriteDeadline`]: a write that cannot make progress for the write timeout
//!   (the client stopped reading) fails the connection.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// The error a request body ends with when its client is too slow.
#[derive(Debug, thiserror::Error)]
#[error("request body too slow: {0}")]
pub struct SlowBody(&'static str);

/// A request body that must arrive at a minimum pace (see the module doc).
pub struct PacedBody<B> {
    inner: B,
    start: Instant,
    idle: Duration,
    min_rate: u64,
    received: u64,
    last_frame: Instant,
    deadline: Pin<Box<Sleep>>,
}

impl<B> PacedBody<B> {
    /// `inner`, failing after `idle` without a byte or when its average rate, after a head
    /// start of `idle`, falls below `min_rate` bytes per second.
    pub fn new(inner: B, idle: Duration, min_rate: u64) -> Self {
        let start = Instant::now();
        PacedBody {
            inner,
            start,
            idle,
            min_rate: min_rate.max(1),
            received: 0,
            last_frame: start,
            deadline: Box::pin(tokio::time::sleep_until(start + idle)),
        }
    }

    /// When the body fails unless more of it arrives: the earlier of `idle` from now
    /// and the time by which the bytes so far were due at the minimum rate.
    fn next_deadline(&self, now: Instant) -> Instant {
        let earned = Duration::from_secs_f64(self.received as f64 / self.min_rate as f64);
        (self.start + self.idle + earned).min(now + self.idle)
    }
}

impl<B> Body for PacedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<axum::BoxError>,
{
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let now = Instant::now();
                    self.received = self.received.saturating_add(data.len() as u64);
                    self.last_frame = now;
                    let next = self.next_deadline(now);
                    self.deadline.as_mut().reset(next);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => match self.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    let why = if self.last_frame.elapsed() >= self.idle {
                        "silent"
                    } else {
                        "below the minimum rate"
                    };
                    Poll::Ready(Some(Err(SlowBody(why).into())))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A connection whose writes fail once one has made no progress for a time.
pub struct WriteDeadline<T> {
    inner: T,
    timeout: Duration,
    stalled: Option<Pin<Box<Sleep>>>,
}

impl<T> WriteDeadline<T> {
    /// `inner`, whose writes (and flushes) fail after `timeout` without progress.
    pub fn new(inner: T, timeout: Duration) -> Self {
        WriteDeadline {
            inner,
            timeout,
            stalled: None,
        }
    }

    /// Passes a finished write on (and forgets the stall); fails a pending one that has
    /// waited `timeout`.
    fn bound<R>(&mut self, cx: &mut Context<'_>, poll: Poll<io::Result<R>>) -> Poll<io::Result<R>> {
        if poll.is_ready() {
            self.stalled = None;
            return poll;
        }
        let timeout = self.timeout;
        let stalled = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        match stalled.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client did not read the response",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for WriteDeadline<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for WriteDeadline<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.bound(cx, poll)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.bound(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_flush(cx);
        self.bound(cx, poll)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.bound(cx, poll)
    }
}

#[cfg(test)]
mod test {
    use super::*;
    use http_body_util::BodyExt as _;
    use tokio::io::AsyncWriteExt as _;

    /// A body whose frames a test sends by hand.
    type HandBody = http_body_util::StreamBody<
        futures_util::stream::BoxStream<'static, Result<Frame<Bytes>, io::Error>>,
    >;

    /// A body fed by hand: frames sent on a channel.
    fn channel_body() -> (tokio::sync::mpsc::Sender<Bytes>, HandBody) {
        use futures_util::StreamExt as _;
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            let b = rx.recv().await?;
            Some((Ok(Frame::data(b)), rx))
        })
        .boxed();
        (tx, http_body_util::StreamBody::new(stream))
    }

    const MS: Duration = Duration::from_millis(1);

    #[tokio::test]
    async fn a_silent_body_fails_after_the_idle_time() {
        let (_tx, body) = channel_body();
        let mut body = PacedBody::new(body, 200 * MS, 1000);
        let t0 = Instant::now();
        let err = body.frame().await.unwrap().unwrap_err();
        assert!(err.to_string().contains("silent"), "{err}");
        assert!(
            t0.elapsed() >= 200 * MS && t0.elapsed() < 2000 * MS,
            "{:?}",
            t0.elapsed()
        );
    }

    #[tokio::test]
    async fn a_trickling_body_fails_when_it_falls_below_the_rate() {
        let (tx, body) = channel_body();
        let mut body = PacedBody::new(body, 300 * MS, 10_000);
        let t0 = Instant::now();
        // 10 bytes every 100 ms: 100 B/s against a minimum of 10,000 B/s. Each frame
        // arrives well within the idle time, yet the body fails soon after its head start.
        tokio::spawn(async move {
            for _ in 0..100 {
                tokio::time::sleep(100 * MS).await;
                if tx.send(Bytes::from(vec![0; 10])).await.is_err() {
                    return;
                }
            }
        });
        let err = loop {
            match body.frame().await.unwrap() {
                Ok(_) => continue,
                Err(e) => break e,
            }
        };
        assert!(err.to_string().contains("minimum rate"), "{err}");
        assert!(t0.elapsed() < 2000 * MS, "{:?}", t0.elapsed());
    }

    #[tokio::test]
    async fn a_body_at_the_rate_arrives_whole() {
        let (tx, body) = channel_body();
        let body = PacedBody::new(body, 300 * MS, 10_000);
        // 2000 bytes every 100 ms (20,000 B/s) for 1.5 s: above the rate, past the head start.
        tokio::spawn(async move {
            for _ in 0..15 {
                tokio::time::sleep(100 * MS).await;
                tx.send(Bytes::from(vec![1; 2000])).await.unwrap();
            }
        });
        let all = body.collect().await.unwrap().to_bytes();
        assert_eq!(all.len(), 30_000);
    }

    #[tokio::test]
    async fn a_write_nobody_reads_fails_after_the_timeout() {
        let (client, server) = tokio::io::duplex(1024);
        let mut server = WriteDeadline::new(server, 200 * MS);
        let t0 = Instant::now();
        let err = server.write_all(&[0; 1 << 20]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(
            t0.elapsed() >= 200 * MS && t0.elapsed() < 2000 * MS,
            "{:?}",
            t0.elapsed()
        );
        drop(client);
    }

    #[tokio::test]
    async fn a_slow_but_reading_client_is_not_cut_off() {
        use tokio::io::AsyncReadExt as _;
        let (mut client, server) = tokio::io::duplex(1024);
        let mut server = WriteDeadline::new(server, 300 * MS);
        // Reads 1 KiB every 50 ms: slow, but every write makes progress within the timeout.
        let reader = tokio::spawn(async move {
            let mut buf = [0; 1024];
            let mut total = 0;
            while total < 16 * 1024 {
                tokio::time::sleep(50 * MS).await;
                total += client.read(&mut buf).await.unwrap();
            }
            total
        });
        server.write_all(&[0; 16 * 1024]).await.unwrap();
        assert_eq!(reader.await.unwrap(), 16 * 1024);
    }
}
