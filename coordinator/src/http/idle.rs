//! Connections of the HTTP face that go quiet, or trickle, are closed.
//!
//! The HTTP server (axum on hyper) has no timeout of its own: a client that opens a
//! connection and sends nothing, or stops half-way through its headers, or keeps a
//! connection open between requests, would hold a file descriptor for ever, and
//! enough of them would leave none for the gRPC port either. [`Idle`] wraps each
//! accepted connection so that once the clock runs out, its next read fails and
//! hyper drops it. The clock starts again at every byte the coordinator writes, and
//! at the first byte the client sends after that; later bytes of the same request do
//! not push it out. So a request must arrive within the timeout of its first byte (a
//! client sending one byte a second cannot keep a connection for ever), and an answer
//! being written is never cut; no handler of the HTTP face waits long before it
//! answers.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// How long an HTTP connection may stay silent both ways (the default of
/// `--http-idle-timeout`).
pub const HTTP_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// A listener whose connections close after `timeout` without a byte either way.
#[derive(Debug)]
pub struct Idle<L> {
    inner: L,
    timeout: Duration,
}

impl<L> Idle<L> {
    pub fn new(inner: L, timeout: Duration) -> Idle<L> {
        Idle { inner, timeout }
    }
}

impl<L: axum::serve::Listener> axum::serve::Listener for Idle<L> {
    type Io = IdleIo<L::Io>;
    type Addr = L::Addr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let (io, addr) = self.inner.accept().await;
        (IdleIo::new(io, self.timeout), addr)
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// A connection with an idle deadline, pushed out by every byte written and by the
/// first byte read after one.
#[derive(Debug)]
pub struct IdleIo<S> {
    io: S,
    timeout: Duration,
    deadline: Pin<Box<Sleep>>,
    /// The client has sent something since the coordinator last wrote: the clock
    /// runs from its first byte.
    heard: bool,
}

impl<S> IdleIo<S> {
    fn new(io: S, timeout: Duration) -> IdleIo<S> {
        IdleIo {
            io,
            timeout,
            deadline: Box::pin(tokio::time::sleep(timeout)),
            heard: false,
        }
    }

    fn restart_clock(&mut self) {
        let next = Instant::now() + self.timeout;
        self.deadline.as_mut().reset(next);
    }

    fn read_some(&mut self) {
        if !self.heard {
            self.heard = true;
            self.restart_clock();
        }
    }

    fn wrote_some(&mut self) {
        self.heard = false;
        self.restart_clock();
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for IdleIo<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.io).poll_read(cx, buf) {
            Poll::Ready(result) => {
                if buf.filled().len() > before {
                    self.read_some();
                }
                Poll::Ready(result)
            }
            Poll::Pending => match self.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the connection was idle, or its request took, too long",
                ))),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for IdleIo<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.io).poll_write(cx, data);
        if matches!(written, Poll::Ready(Ok(n)) if n > 0) {
            self.wrote_some();
        }
        written
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.io).poll_write_vectored(cx, data);
        if matches!(written, Poll::Ready(Ok(n)) if n > 0) {
            self.wrote_some();
        }
        written
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
