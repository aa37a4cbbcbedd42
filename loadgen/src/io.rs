//! The only module that knows the runtime: tokio-uring sockets and tasks, and the tokio timer
//! and notification primitives its current-thread runtime runs on.
//!
//! Everything else sees owned-buffer reads and writes (`Vec<u8>` in, `Vec<u8>` back, as
//! io_uring's completion model requires), [`Timer`], [`Signal`] and [`Limiter`].

use std::future::Future;
use std::io;
use std::net::{Shutdown, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use tokio::sync::{Notify, Semaphore, SemaphorePermit};
use tokio_uring::buf::BoundedBuf as _;
use tokio_uring::net::TcpStream;

/// Submission queue size: deep enough that thousands of connections' reads and writes batch
/// into few `io_uring_enter` calls.
const RING_ENTRIES: u32 = 4096;

/// Runs `future` on a fresh io_uring runtime on the current thread (one per pinned core).
pub(crate) fn run<F: Future>(future: F) -> F::Output {
    tokio_uring::builder().entries(RING_ENTRIES).start(future)
}

/// A task on the current thread's runtime.
pub(crate) struct Task<T>(tokio::task::JoinHandle<T>);

/// Starts `future` as a task on the current thread's runtime.
pub(crate) fn spawn<F: Future + 'static>(future: F) -> Task<F::Output> {
    Task(tokio_uring::spawn(future))
}

impl<T> Task<T> {
    /// Waits for the task; `None` if it panicked.
    pub(crate) async fn join(self) -> Option<T> {
        self.0.await.ok()
    }
}

/// Sleeps until `at`.
pub(crate) async fn sleep_until(at: Instant) {
    tokio::time::sleep_until(at.into()).await;
}

/// Runs `future` until `deadline`; `None` if the deadline came first (the future is dropped).
pub(crate) async fn timeout_at<F: Future>(deadline: Instant, future: F) -> Option<F::Output> {
    tokio::time::timeout_at(deadline.into(), future).await.ok()
}

/// A reusable deadline for racing against I/O without cancelling it.
pub(crate) struct Timer(Pin<Box<tokio::time::Sleep>>);

impl Timer {
    /// A timer (not armed until [`Timer::poll_until`] is first called).
    pub(crate) fn new() -> Self {
        Self(Box::pin(tokio::time::sleep_until(Instant::now().into())))
    }

    /// Ready once `at` has passed, or possibly earlier: an armed deadline before `at` is kept
    /// rather than moved, so a per-message timeout that only ever moves later costs one timer
    /// wheel update per timeout period instead of one per message. Callers re-check the time.
    pub(crate) fn poll_until(&mut self, at: Instant, cx: &mut Context<'_>) -> Poll<()> {
        let at = tokio::time::Instant::from_std(at);
        if self.0.deadline() > at || self.0.is_elapsed() {
            self.0.as_mut().reset(at);
        }
        self.0.as_mut().poll(cx)
    }
}

/// A one-to-many wake-up on the current thread (e.g. "the run has started").
#[derive(Default)]
pub(crate) struct Signal(Notify);

impl Signal {
    /// Wakes every current waiter.
    pub(crate) fn raise(&self) {
        self.0.notify_waiters();
    }

    /// Resolves at the next [`Signal::raise`]; waits counted from creation, not first poll.
    pub(crate) fn wait(&self) -> impl Future<Output = ()> + '_ {
        self.0.notified()
    }
}

/// Bounds how many connection attempts are in flight at once, so a ramp does not overflow the
/// server's accept backlog and turn into SYN retransmits measured as connect latency.
pub(crate) struct Limiter(Semaphore);

/// A held [`Limiter`] slot, released on drop.
pub(crate) struct Slot<'a>(#[expect(dead_code, reason = "held for its Drop")] SemaphorePermit<'a>);

impl Limiter {
    /// A limiter with `n` slots.
    pub(crate) fn new(n: usize) -> Self {
        Self(Semaphore::new(n.max(1)))
    }

    /// Waits for a slot.
    pub(crate) async fn acquire(&self) -> Slot<'_> {
        Slot(self.0.acquire().await.expect("the limiter is never closed"))
    }
}

/// A TCP connection on io_uring.
pub(crate) struct Conn(TcpStream);

impl Conn {
    /// Connects with Nagle off (every frame is latency-sensitive), giving up at `deadline`.
    pub(crate) async fn connect(addr: SocketAddr, deadline: Instant) -> io::Result<Self> {
        let stream = tokio::time::timeout_at(deadline.into(), TcpStream::connect(addr))
            .await
            .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??;
        stream.set_nodelay(true)?;
        Ok(Self(stream))
    }

    /// Reads into `buf`'s spare capacity, appending after its current contents (which must
    /// leave room: a read into zero bytes would look like end of stream).
    pub(crate) fn read_more(
        &self,
        buf: Vec<u8>,
    ) -> impl Future<Output = (io::Result<usize>, Vec<u8>)> + '_ {
        debug_assert!(buf.len() < buf.capacity(), "read buffer has no spare room");
        async move {
            let start = buf.len();
            let (res, slice) = self.0.read(buf.slice(start..)).await;
            (res, slice.into_inner())
        }
    }

    /// Writes all of `buf`.
    pub(crate) fn write_all(
        &self,
        buf: Vec<u8>,
    ) -> impl Future<Output = (io::Result<()>, Vec<u8>)> + '_ {
        self.0.write_all(buf)
    }

    /// Shuts both directions down: a read still in flight completes (with end of stream) and
    /// releases its buffer, so the descriptor can close when the `Conn` drops.
    pub(crate) fn shutdown(&self) {
        // ENOTCONN after the peer already closed is expected and harmless.
        let _ = self.0.shutdown(Shutdown::Both);
    }
}
