//! The data plane's I/O: one event loop per core over one of two backends, io_uring or epoll,
//! behind the small [`Backend`] interface below.
//!
//! The loop (`event_loop.rs`) owns every socket and a slab of connection state machines
//! (`crate::conn`); it turns their requests into [`Sqe`]s and the backend's [`Cqe`]s back into
//! their events. A backend knows nothing of connections: it moves bytes between sockets and
//! buffers it is lent, and reports each operation once, with the `user_data` it was given.
//!
//! Ownership is what keeps this sound without `unsafe` outside the backends: an operation owns
//! its buffer (a `Vec<u8>`, moved in with the [`Sqe`]) until its [`Cqe`] hands it back, so the
//! kernel can never write into memory the rest of the gateway still uses or has freed.
#![deny(unsafe_code)] // not forbid: the backends (uring.rs, epoll.rs) opt out, with SAFETY comments

use std::io;
use std::os::fd::{OwnedFd, RawFd};
use std::time::Duration;

#[cfg(test)]
mod conformance;
pub(crate) mod epoll;
pub(crate) mod event_loop;
pub(crate) mod park;
pub(crate) mod stream;
pub(crate) mod uring;

/// An operation for a backend. Buffers move in with it and come back with its [`Cqe`].
#[derive(Debug)]
pub(crate) enum Sqe {
    /// Accepts connections on a listening socket until it fails or is cancelled: one
    /// completion per connection (the socket in [`Cqe::accepted`]), each with [`Cqe::more`]
    /// set while it keeps accepting.
    Accept {
        /// The listening socket.
        fd: RawFd,
    },
    /// One read into `buf`'s spare capacity (`buf.len()..buf.capacity()`); the completion's
    /// buffer has its length grown by the bytes read. 0 bytes read is end of stream.
    Recv {
        /// The socket.
        fd: RawFd,
        /// Where the bytes go; must have spare capacity.
        buf: Vec<u8>,
    },
    /// One read of at most `len` bytes into a buffer of the backend's [`BufPool`], taken only
    /// when the bytes arrive: a socket waiting for input holds no buffer. The completion hands
    /// the buffer over when bytes were read (`None` otherwise); it comes back to the pool
    /// through [`Backend::recycle`]. It may complete with `-ENOBUFS` when a burst found every
    /// buffer in use: push it again (the backend refills before its next submission). Its
    /// user data must have the top bit clear (io_uring marks pooled reads with it).
    RecvPooled {
        /// The socket.
        fd: RawFd,
        /// The most bytes to read (capped at [`POOL_BUF`]).
        len: u32,
    },
    /// Reads into buffers of the backend's [`BufPool`], each taken only when bytes arrive,
    /// again and again: one completion per read (with [`Cqe::more`] set while it goes on),
    /// each handing over its buffer as `RecvPooled`'s do, until one without `more` ends it
    /// (an end of stream, an error, `-ENOBUFS` when a burst found every buffer in use,
    /// `-ECANCELED`), which a backend may also do after any read. A read takes at most one
    /// pool buffer ([`POOL_BUF`]). Its user data must have the top bit clear, as a
    /// `RecvPooled`'s; it is cancelled like one (`slotless`).
    RecvMulti {
        /// The socket.
        fd: RawFd,
    },
    /// Waits until a read of `fd` would not wait (bytes, an end of stream or an error are
    /// there), reads nothing and completes with a positive poll mask. It takes a read's place
    /// (one of the two per socket) and is cancelled like one. A waiting read holds more of
    /// the kernel's memory than a poll does on io_uring: this is how a long-idle read waits
    /// cheaply (see `driver/park.rs`).
    PollIn {
        /// The socket.
        fd: RawFd,
    },
    /// One write of `buf[start..end]`; it may be short (the result says how much went).
    Send {
        /// The socket.
        fd: RawFd,
        /// Holds the bytes; comes back unchanged.
        buf: Vec<u8>,
        /// First byte to send.
        start: usize,
        /// One past the last byte to send.
        end: usize,
        /// `MSG_MORE`: a shutdown for writing follows at once, and the bytes may wait for it
        /// so that they and the FIN leave as one segment.
        more: bool,
    },
    /// Connects a non-blocking socket; result 0 once connected.
    Connect {
        /// The socket, made by the loop.
        fd: RawFd,
        /// Where to.
        addr: socket2::SockAddr,
    },
    /// Cancels the operation pushed with `target` as its user data: it completes with
    /// `-ECANCELED`, unless it completed already. The cancel itself has no completion.
    Cancel {
        /// The user data of the operation to cancel.
        target: u64,
        /// The target is a pooled read or a poll, which io_uring keeps no table slot for: it
        /// is cancelled without a search.
        slotless: bool,
    },
}

impl Sqe {
    /// The socket the operation works on; `None` for a cancel.
    pub(crate) fn fd(&self) -> Option<RawFd> {
        match self {
            Self::Accept { fd }
            | Self::Recv { fd, .. }
            | Self::RecvPooled { fd, .. }
            | Self::RecvMulti { fd }
            | Self::PollIn { fd }
            | Self::Send { fd, .. }
            | Self::Connect { fd, .. } => Some(*fd),
            Self::Cancel { .. } => None,
        }
    }
}

/// A finished operation.
#[derive(Debug)]
pub(crate) struct Cqe {
    /// What the operation was pushed with.
    pub(crate) user_data: u64,
    /// Bytes moved (0 for a connect); for an accept, 0 and the socket in `accepted`; a
    /// negative errno on failure.
    pub(crate) result: i32,
    /// The buffer a `Recv` or `Send` was lent, or the pool's buffer a `RecvPooled` filled.
    pub(crate) buf: Option<Vec<u8>>,
    /// An accepted socket, non-blocking and close-on-exec.
    pub(crate) accepted: Option<OwnedFd>,
    /// A multishot operation (`Accept`) goes on after this completion.
    pub(crate) more: bool,
}

/// What an event loop needs of its I/O: queue operations, wait for their completions.
///
/// At most one `Recv` and one `Send` are in flight per socket, and a socket is only closed
/// (through [`Backend::close`]) once none of its operations is.
pub(crate) trait Backend {
    /// The backend's name for logs and metrics: `"io_uring"` or `"epoll"`.
    fn name(&self) -> &'static str;

    /// Queues an operation, submitted at the next [`Backend::wait`] at the latest. Its
    /// completion is only ever reported by `wait`, never from inside `push`.
    fn push(&mut self, user_data: u64, sqe: Sqe);

    /// Submits what is queued, then waits until at least one completion is ready or `timeout`
    /// passes (`None`: no limit; zero: don't wait), and appends every ready completion to
    /// `out`. Interrupted waits (EINTR) return `Ok` with whatever is ready.
    fn wait(&mut self, timeout: Option<Duration>, out: &mut Vec<Cqe>) -> io::Result<()>;

    /// Closes a socket none of whose operations is in flight (the epoll backend forgets it
    /// first).
    fn close(&mut self, fd: OwnedFd);

    /// Whether `RecvMulti` goes on after a read, so that the loop serves a socket's reads
    /// from one armed operation; false where each would end after one read (then the loop
    /// uses `RecvPooled`, which is no worse there).
    fn multishot(&self) -> bool {
        false
    }

    /// Takes back a buffer for the read pool: one a `RecvPooled` handed out, or any other of
    /// the pool's size. Others are freed.
    fn recycle(&mut self, buf: Vec<u8>);
}

/// The size of a pooled read buffer: `limits.write_buffer`'s default, the most the relay reads
/// at once by default. Only the pages a read touches become resident.
pub(crate) const POOL_BUF: usize = 64 << 10;

/// One core's free read buffers, each [`POOL_BUF`] bytes: reads that wait for input take one
/// only when bytes arrive, and machines give them back once their bytes are written, so
/// steady traffic allocates nothing and an idle connection holds no buffer.
#[derive(Debug)]
pub(crate) struct BufPool {
    /// Empty buffers of [`POOL_BUF`] capacity.
    free: Vec<Vec<u8>>,
    /// The most free buffers kept (`server.read_buffers`): enough for a burst of reads to
    /// find buffers without allocating; more are freed when they come back.
    keep: usize,
}

impl BufPool {
    /// A pool that keeps up to `keep` free buffers.
    pub(crate) fn new(keep: usize) -> Self {
        Self {
            free: Vec::new(),
            keep,
        }
    }

    /// An empty buffer of [`POOL_BUF`] capacity.
    pub(crate) fn take(&mut self) -> Vec<u8> {
        self.free
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(POOL_BUF))
    }

    /// Keeps `buf` for a later read if it is one of the pool's and the pool has room.
    pub(crate) fn put(&mut self, mut buf: Vec<u8>) {
        if buf.capacity() == POOL_BUF && self.free.len() < self.keep {
            buf.clear();
            self.free.push(buf);
        }
    }
}

/// Which backend runs the data plane.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub(crate) enum IoBackend {
    /// io_uring where it can be set up, epoll where it cannot (a seccomp profile that denies
    /// it, `kernel.io_uring_disabled`, an old kernel).
    #[default]
    Auto,
    /// io_uring, or refuse to start.
    Uring,
    /// epoll, even where io_uring works.
    Epoll,
}

impl IoBackend {
    /// The configuration's spelling: `auto`, `uring` or `epoll`.
    pub(crate) fn parse(name: &str) -> Option<Self> {
        match name {
            "auto" => Some(Self::Auto),
            "uring" => Some(Self::Uring),
            "epoll" => Some(Self::Epoll),
            _ => None,
        }
    }
}

/// Binds a listening socket with `SO_REUSEPORT`, so each core binds its own and the kernel
/// spreads incoming connections across them.
pub(crate) fn bind_reuseport(
    addr: std::net::SocketAddr,
    backlog: i32,
) -> io::Result<std::net::TcpListener> {
    let domain = socket2::Domain::for_address(addr);
    let socket = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    // Accepted sockets inherit it (one setsockopt per listener instead of per connection):
    // relayed frames go out at once, never held back by Nagle.
    socket.set_nodelay(true)?;
    socket.bind(&addr.into())?;
    socket.listen(backlog)?;
    // Non-blocking for the epoll backend's accepts (io_uring does not mind).
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

#[cfg(test)]
mod tests {
    #[test]
    fn accepted_sockets_inherit_nodelay_from_the_listener() {
        let listener = super::bind_reuseport("127.0.0.1:0".parse().unwrap(), 8).unwrap();
        let _client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let accepted = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                Err(e) => panic!("accept: {e}"),
            }
        };
        assert!(accepted.nodelay().unwrap());
    }
}
