//! The only module that names tokio-uring: sockets, the per-core runtime and task spawning.
//!
//! io_uring operations own their buffers while in flight, so reads and writes here take a
//! `&mut Vec<u8>` and hand it back filled or drained; the rest of the gateway sees ordinary
//! byte vectors. A dropped read or write loses its buffer (the kernel may still be using it),
//! so callers only drop them when the whole connection is being torn down.
#![forbid(unsafe_code)]

use std::future::Future;
use std::io;
use std::net::{Shutdown, SocketAddr};
use std::time::Duration;

use tokio_uring::buf::BoundedBuf;

/// Runs `future` to completion on a fresh io_uring runtime on the calling thread.
///
/// `COOP_TASKRUN`: completions are handed to this thread when it next enters the kernel
/// instead of by interrupting it, which suits one thread that owns its ring and enters the
/// kernel on every loop anyway.
pub(crate) fn run<F: Future>(future: F) -> F::Output {
    tokio_uring::builder()
        .entries(1024)
        .uring_builder(&ring_builder())
        .start(future)
}

/// The workers' ring setup.
fn ring_builder() -> io_uring_06::Builder {
    let mut ring = tokio_uring::uring_builder();
    ring.setup_coop_taskrun();
    ring
}

/// Sets up (and drops) one ring like the workers', so that a kernel, sysctl or seccomp
/// profile that denies io_uring stops the gateway at start with the reason, rather than a
/// worker aborting inside the runtime once it is already "listening".
pub(crate) fn probe() -> io::Result<()> {
    ring_builder().build(8).map(drop)
}

/// Spawns a task on the current core's runtime; it never migrates to another thread.
pub(crate) fn spawn<F: Future + 'static>(future: F) {
    drop(tokio_uring::spawn(future));
}

/// Binds a listening socket with `SO_REUSEPORT`, so each core binds its own and the kernel
/// spreads incoming connections across them.
pub(crate) fn bind_reuseport(addr: SocketAddr, backlog: i32) -> io::Result<std::net::TcpListener> {
    let domain = socket2::Domain::for_address(addr);
    let socket = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.bind(&addr.into())?;
    socket.listen(backlog)?;
    Ok(socket.into())
}

/// A per-core listener.
pub(crate) struct Listener(tokio_uring::net::TcpListener);

impl Listener {
    /// Adopts a socket bound by [`bind_reuseport`] (on the thread that will accept on it).
    pub(crate) fn from_std(listener: std::net::TcpListener) -> Self {
        Self(tokio_uring::net::TcpListener::from_std(listener))
    }

    /// Waits for the next connection.
    pub(crate) async fn accept(&self) -> io::Result<(Stream, SocketAddr)> {
        let (stream, addr) = self.0.accept().await?;
        Ok((Stream(stream), addr))
    }
}

/// A connected TCP socket driven by io_uring.
pub(crate) struct Stream(tokio_uring::net::TcpStream);

impl Stream {
    /// Connects, giving up after `timeout`.
    pub(crate) async fn connect(addr: SocketAddr, timeout: Duration) -> io::Result<Self> {
        match tokio::time::timeout(timeout, tokio_uring::net::TcpStream::connect(addr)).await {
            Ok(stream) => Ok(Self(stream?)),
            Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out")),
        }
    }

    /// Disables Nagle: frames are written whole and should leave at once.
    pub(crate) fn set_nodelay(&self) -> io::Result<()> {
        self.0.set_nodelay(true)
    }

    /// Reads into the spare capacity of `buf` (reserving `min_spare` first) and appends;
    /// returns the number of bytes read, 0 at end of stream.
    pub(crate) async fn read_more(&self, buf: &mut Vec<u8>, min_spare: usize) -> io::Result<usize> {
        buf.reserve(min_spare);
        let owned = std::mem::take(buf);
        let start = owned.len();
        let end = owned.capacity();
        let (result, slice) = self.0.read(owned.slice(start..end)).await;
        *buf = slice.into_inner();
        result
    }

    /// Writes all of `buf`, then clears it (keeping its capacity for the next batch).
    pub(crate) async fn write_all(&self, buf: &mut Vec<u8>) -> io::Result<()> {
        let result = self.write_prefix(buf, buf.len(), || {}).await;
        buf.clear();
        result
    }

    /// Writes the first `len` bytes of `buf`, leaving `buf` as it was; `on_progress` runs
    /// after each single write that moved bytes (the relay's write timeout counts from it).
    ///
    /// A loop of single writes rather than tokio-uring's `write_all`: its nested futures are
    /// about 200 bytes larger, and every relay direction keeps room for one.
    pub(crate) async fn write_prefix(
        &self,
        buf: &mut Vec<u8>,
        len: usize,
        mut on_progress: impl FnMut(),
    ) -> io::Result<()> {
        let mut owned = std::mem::take(buf);
        let mut written = 0;
        let result = loop {
            if written == len {
                break Ok(());
            }
            let (result, slice) = self.0.write(owned.slice(written..len)).submit().await;
            owned = slice.into_inner();
            match result {
                Ok(0) => break Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    written += n;
                    on_progress();
                }
                Err(e) => break Err(e),
            }
        };
        *buf = owned;
        result
    }

    /// Shuts down one or both directions; errors (already closed) are not interesting.
    pub(crate) fn shutdown(&self, how: Shutdown) {
        drop(self.0.shutdown(how));
    }
}
