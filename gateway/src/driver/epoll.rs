//! The readiness backend: io_uring's completion model emulated over epoll (through `mio`), for
//! hosts that deny io_uring (Docker's default seccomp profile, `kernel.io_uring_disabled`).
//!
//! The loop above is written for completions: it pushes an operation and later receives its
//! result. So an operation here is tried at once when its socket is believed ready (as io_uring
//! does), and parked when the kernel says `EAGAIN`; an edge-triggered readiness event for its
//! socket retries it. Every result, immediate or not, is queued and handed out by the next
//! [`Backend::wait`], never from inside [`Backend::push`], so the loop cannot tell the two
//! backends apart except by timing.
//!
//! Per socket this keeps, in a `Vec` indexed by the fd number, whether it is registered with
//! epoll, its last known readiness (true after an event, false after `EAGAIN`; a new socket
//! starts ready so its first operation is tried at once) and its parked operations, at most one
//! of each kind. Edge-triggered epoll loses no wake-up under this scheme: a socket is
//! registered before its first attempt, and epoll reports every readiness change after the
//! `EAGAIN` that parked an operation.
//!
//! The one `unsafe` need is operating on a socket the loop owns, by its raw number
//! ([`BorrowedFd::borrow_raw`]), and growing a read buffer by the bytes the kernel wrote.
#![expect(
    unsafe_code,
    reason = "sockets the loop owns are borrowed by their raw fd for each syscall, and a read \
              buffer's length grows by the bytes recv(2) initialised"
)]

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Registry, Token};
use socket2::{SockAddr, SockRef};

use super::{Backend, BufPool, Cqe, POOL_BUF, Sqe};

/// Readiness events taken from the kernel per `epoll_wait`; more stay queued for the next.
const EVENTS: usize = 1024;

/// The most bytes one recv or send moves, so that a count always fits a [`Cqe`]'s `i32`
/// result (io_uring's lengths are 32-bit too).
const MAX_IO: usize = i32::MAX as usize;

/// The epoll backend: a `mio` poller and the state of every socket it has seen.
pub(crate) struct Epoll {
    /// The epoll instance.
    poll: Poll,
    /// Reused buffer for the events of one `epoll_wait`.
    events: Events,
    /// Sockets, parked operations and queued completions.
    core: Core,
}

/// Everything but the poller, so that events can be handled while the event buffer is
/// borrowed.
struct Core {
    /// Per-socket state, indexed by fd number; grown on demand.
    fds: Vec<FdState>,
    /// Completions not yet handed out by `wait`.
    ready: Vec<Cqe>,
    /// The fd of every parked operation, by user data: how a cancel finds its target without
    /// scanning every socket.
    parked: HashMap<u64, RawFd, BuildHasherDefault<MixHasher>>,
    /// Buffers for pooled reads: taken for an attempt, kept only if it read bytes.
    pool: BufPool,
}

/// What is known of one socket.
#[expect(
    clippy::struct_excessive_bools,
    reason = "independent facts about one socket, as epoll reports them"
)]
struct FdState {
    /// Registered with epoll (for reading and writing, edge-triggered).
    registered: bool,
    /// No read-side syscall said `EAGAIN` since the last event that said readable.
    readable: bool,
    /// No write-side syscall said `EAGAIN` since the last event that said writable.
    writable: bool,
    /// An event reported the peer's end of stream, a hang-up or an error: those stay readable
    /// (and writable) for good, so a short read or write no longer means drained.
    ended: bool,
    /// A read waiting for data.
    recv: Option<RecvOp>,
    /// A write waiting for room.
    send: Option<SendOp>,
    /// The user data of a connect in progress (waiting for writability).
    connect: Option<u64>,
    /// The user data of an accept waiting for connections.
    accept: Option<u64>,
}

impl FdState {
    /// A socket not seen yet: unregistered, believed ready, nothing parked.
    const NEW: Self = Self {
        registered: false,
        readable: true,
        writable: true,
        ended: false,
        recv: None,
        send: None,
        connect: None,
        accept: None,
    };
}

/// A parked `Recv`, `RecvPooled` or `PollIn`.
struct RecvOp {
    /// What it was pushed with.
    user_data: u64,
    /// Where the bytes go (into its spare capacity); for a pooled read, empty and without
    /// capacity until an attempt takes a buffer from the pool; for a poll, empty.
    buf: Vec<u8>,
    /// Where its bytes go.
    into: ReadInto,
}

/// Where a read's bytes go.
#[derive(Clone, Copy)]
enum ReadInto {
    /// Into its buffer's spare capacity (`Recv`).
    Buf,
    /// Into a pool buffer, at most this many bytes (`RecvPooled`).
    Pool(u32),
    /// Nowhere: it only waits until a read would not (`PollIn`).
    Nothing,
}

impl RecvOp {
    /// The read `sqe` is, or `sqe` back if it is none.
    #[expect(
        clippy::result_large_err,
        reason = "the operation moves on at once to the caller's other arms, never stored"
    )]
    fn of(user_data: u64, sqe: Sqe) -> Result<Self, Sqe> {
        let (buf, into) = match sqe {
            Sqe::Recv { buf, .. } => (buf, ReadInto::Buf),
            Sqe::RecvPooled { len, .. } => (Vec::new(), ReadInto::Pool(len.max(1))),
            // One read ends a multishot read here (its contract allows it; see `multishot`).
            Sqe::RecvMulti { .. } => {
                let len = u32::try_from(POOL_BUF).unwrap_or(u32::MAX);
                (Vec::new(), ReadInto::Pool(len))
            }
            Sqe::PollIn { .. } => (Vec::new(), ReadInto::Nothing),
            other => return Err(other),
        };
        Ok(Self {
            user_data,
            buf,
            into,
        })
    }

    /// One attempt: reads into the op's buffer, or into one from `pool` (kept only if bytes
    /// came), or only looks; also says how many bytes it asked for (0 for a look, which
    /// leaves the socket as readable as it was).
    fn attempt(&mut self, fd: RawFd, pool: &mut BufPool) -> (Attempt, usize) {
        match self.into {
            ReadInto::Buf => {
                let room = self.buf.capacity() - self.buf.len();
                (recv(fd, &mut self.buf, room), room)
            }
            ReadInto::Pool(len) => {
                let room = (len as usize).min(POOL_BUF);
                self.buf = pool.take();
                let attempt = recv(fd, &mut self.buf, room);
                if !matches!(attempt, Attempt::Done(n) if n > 0) {
                    pool.put(std::mem::take(&mut self.buf));
                }
                (attempt, room)
            }
            ReadInto::Nothing => (peek(fd), 0),
        }
    }

    /// The buffer its completion hands back: none for a pooled read that read nothing, nor
    /// for a poll.
    fn into_buf(self) -> Option<Vec<u8>> {
        match self.into {
            ReadInto::Buf => Some(self.buf),
            ReadInto::Pool(_) => (self.buf.capacity() > 0).then_some(self.buf),
            ReadInto::Nothing => None,
        }
    }
}

/// A parked `Send`.
struct SendOp {
    /// What it was pushed with.
    user_data: u64,
    /// Holds the bytes.
    buf: Vec<u8>,
    /// First byte to send.
    start: usize,
    /// One past the last byte to send.
    end: usize,
    /// With `MSG_MORE` (a FIN follows).
    more: bool,
}

/// What one attempt at an operation came to.
enum Attempt {
    /// It finished with this result (bytes moved, or a negative errno).
    Done(i32),
    /// The kernel said `EAGAIN`: it waits for the next readiness event.
    Again,
}

/// Whether a read or write that moved `res` of `asked` bytes left the socket drained (nothing
/// more to read, no room to write). A stream socket that moved fewer bytes than asked had no
/// more at that moment, so the next attempt would only meet `EAGAIN`: it waits for the next
/// edge instead, which the kernel raises for anything that arrives (or frees up) later. Not
/// after an end of stream or an error an event already reported (`FdState::ended`): those
/// raise no new edge, and the next attempt must meet them.
fn drained(res: i32, asked: usize) -> bool {
    usize::try_from(res).is_ok_and(|n| n > 0 && n < asked)
}

impl Epoll {
    /// Opens an epoll instance whose read pool keeps up to 64 free buffers.
    #[cfg(test)]
    pub(crate) fn new() -> io::Result<Self> {
        Self::with_pool(64)
    }

    /// Opens an epoll instance whose read pool keeps up to `keep` free buffers.
    pub(crate) fn with_pool(keep: usize) -> io::Result<Self> {
        Ok(Self {
            poll: Poll::new()?,
            events: Events::with_capacity(EVENTS),
            core: Core {
                fds: Vec::new(),
                ready: Vec::new(),
                parked: HashMap::default(),
                pool: BufPool::new(keep),
            },
        })
    }
}

impl Backend for Epoll {
    fn name(&self) -> &'static str {
        "epoll"
    }

    fn push(&mut self, user_data: u64, sqe: Sqe) {
        self.core.push(self.poll.registry(), user_data, sqe);
    }

    fn wait(&mut self, timeout: Option<Duration>, out: &mut Vec<Cqe>) -> io::Result<()> {
        // When the first poll returns only events that complete nothing (a retry that met
        // EAGAIN), poll again until the deadline, as io_uring would still be waiting.
        let deadline = match timeout {
            Some(t) if !t.is_zero() && self.core.ready.is_empty() => Instant::now().checked_add(t),
            _ => None,
        };
        let mut next = timeout;
        let result = loop {
            let t = if self.core.ready.is_empty() {
                next
            } else {
                Some(Duration::ZERO)
            };
            match self.poll.poll(&mut self.events, t) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => break Ok(()),
                Err(e) => break Err(e),
            }
            for event in &self.events {
                self.core.on_event(event);
            }
            if !self.core.ready.is_empty() {
                break Ok(());
            }
            next = match (timeout, deadline) {
                (Some(_), Some(at)) => match at.checked_duration_since(Instant::now()) {
                    Some(left) if !left.is_zero() => Some(left),
                    _ => break Ok(()),
                },
                (Some(t), None) if t.is_zero() => break Ok(()),
                // No limit, or one too long to have a deadline (no limit, in effect).
                (None, _) | (Some(_), None) => None,
            };
        };
        out.append(&mut self.core.ready);
        result
    }

    fn close(&mut self, fd: OwnedFd) {
        self.core.close(self.poll.registry(), fd.as_raw_fd());
        drop(fd);
    }

    fn recycle(&mut self, buf: Vec<u8>) {
        self.core.pool.put(buf);
    }
}

impl Core {
    /// Tries `sqe` at once where its socket is believed ready, else parks it.
    fn push(&mut self, registry: &Registry, user_data: u64, sqe: Sqe) {
        let Some(fd) = sqe.fd() else {
            if let Sqe::Cancel { target, .. } = sqe {
                self.cancel(target);
            }
            return;
        };
        let Some(i) = self.slot(fd) else {
            let errno = if fd < 0 { libc::EBADF } else { libc::ENOMEM };
            self.fail(user_data, sqe, errno);
            return;
        };
        if let Err(e) = self.register(registry, fd, i) {
            self.fail(user_data, sqe, errno(&e));
            return;
        }
        let sqe = match RecvOp::of(user_data, sqe) {
            Ok(op) => {
                if self.push_recv(fd, i, op) {
                    self.parked.insert(user_data, fd);
                }
                return;
            }
            Err(sqe) => sqe,
        };
        let st = &mut self.fds[i];
        match sqe {
            Sqe::Send {
                buf,
                start,
                end,
                more,
                ..
            } => {
                if st.send.is_some() {
                    debug_assert!(false, "a second Send on fd {fd}");
                    self.ready.push(cqe(user_data, -libc::EBUSY, Some(buf)));
                    return;
                }
                let op = SendOp {
                    user_data,
                    buf,
                    start,
                    end,
                    more,
                };
                if st.writable {
                    match send(fd, &op) {
                        Attempt::Done(res) => {
                            st.writable = st.ended || !drained(res, op.end - op.start);
                            self.ready.push(cqe(user_data, res, Some(op.buf)));
                            return;
                        }
                        Attempt::Again => st.writable = false,
                    }
                }
                st.send = Some(op);
            }
            Sqe::Connect { addr, .. } => {
                if st.connect.is_some() {
                    debug_assert!(false, "a second Connect on fd {fd}");
                    self.ready.push(cqe(user_data, -libc::EBUSY, None));
                    return;
                }
                // A connect is always tried: it is what makes the socket writable.
                match connect(fd, &addr) {
                    Attempt::Done(res) => {
                        self.ready.push(cqe(user_data, res, None));
                        return;
                    }
                    Attempt::Again => st.writable = false,
                }
                st.connect = Some(user_data);
            }
            Sqe::Accept { .. } => {
                if st.accept.is_some() {
                    debug_assert!(false, "a second Accept on fd {fd}");
                    self.ready.push(cqe(user_data, -libc::EBUSY, None));
                    return;
                }
                if st.readable {
                    match accept(fd, user_data, &mut self.ready) {
                        Attempt::Done(_) => return,
                        Attempt::Again => st.readable = false,
                    }
                }
                st.accept = Some(user_data);
            }
            Sqe::Cancel { .. }
            | Sqe::Recv { .. }
            | Sqe::RecvPooled { .. }
            | Sqe::RecvMulti { .. }
            | Sqe::PollIn { .. } => {
                unreachable!("handled above")
            }
        }
        self.parked.insert(user_data, fd);
    }

    /// Tries a read at once where `fd` (state index `i`) is believed readable; true if it
    /// was parked.
    fn push_recv(&mut self, fd: RawFd, i: usize, mut op: RecvOp) -> bool {
        let st = &mut self.fds[i];
        if st.recv.is_some() {
            debug_assert!(false, "a second Recv on fd {fd}");
            self.ready
                .push(cqe(op.user_data, -libc::EBUSY, op.into_buf()));
            return false;
        }
        if st.readable {
            match op.attempt(fd, &mut self.pool) {
                (Attempt::Done(res), room) => {
                    st.readable = st.ended || !drained(res, room);
                    self.ready.push(cqe(op.user_data, res, op.into_buf()));
                    return false;
                }
                (Attempt::Again, _) => st.readable = false,
            }
        }
        st.recv = Some(op);
        true
    }

    /// Completes an operation that could not start with `-errno`, handing its buffer back.
    fn fail(&mut self, user_data: u64, sqe: Sqe, errno: i32) {
        let buf = match sqe {
            Sqe::Recv { buf, .. } | Sqe::Send { buf, .. } => Some(buf),
            Sqe::RecvPooled { .. }
            | Sqe::RecvMulti { .. }
            | Sqe::PollIn { .. }
            | Sqe::Accept { .. }
            | Sqe::Connect { .. }
            | Sqe::Cancel { .. } => None,
        };
        self.ready.push(cqe(user_data, -errno, buf));
    }

    /// The state index of `fd`, growing the table to hold it; `None` for a negative fd or
    /// one beyond what a table can hold.
    fn slot(&mut self, fd: RawFd) -> Option<usize> {
        let i = usize::try_from(fd).ok()?;
        if i >= self.fds.len() {
            self.fds.try_reserve(i + 1 - self.fds.len()).ok()?;
            self.fds.resize_with(i + 1, || FdState::NEW);
        }
        Some(i)
    }

    /// Registers `fd` (state index `i`) with epoll unless it is already.
    fn register(&mut self, registry: &Registry, fd: RawFd, i: usize) -> io::Result<()> {
        let st = &mut self.fds[i];
        if !st.registered {
            registry.register(
                &mut SourceFd(&fd),
                Token(i),
                Interest::READABLE | Interest::WRITABLE,
            )?;
            st.registered = true;
        }
        Ok(())
    }

    /// Marks the readiness an event reports and retries the operations it may let finish.
    fn on_event(&mut self, event: &mio::event::Event) {
        let i = event.token().0;
        let Some(st) = self.fds.get_mut(i) else {
            return;
        };
        if !st.registered {
            return;
        }
        // Token = fd, so it fits a RawFd back.
        let Ok(fd) = RawFd::try_from(i) else { return };
        // An error or hang-up wakes both sides: the retried syscall reports it.
        let error = event.is_error();
        if event.is_read_closed() || event.is_write_closed() || error {
            st.ended = true;
        }
        if event.is_readable() || event.is_read_closed() || error {
            st.readable = true;
            if let Some(mut op) = st.recv.take() {
                match op.attempt(fd, &mut self.pool) {
                    (Attempt::Done(res), room) => {
                        st.readable = st.ended || !drained(res, room);
                        self.parked.remove(&op.user_data);
                        self.ready.push(cqe(op.user_data, res, op.into_buf()));
                    }
                    (Attempt::Again, _) => {
                        st.readable = false;
                        st.recv = Some(op);
                    }
                }
            }
            if let Some(user_data) = st.accept {
                match accept(fd, user_data, &mut self.ready) {
                    Attempt::Done(_) => {
                        st.accept = None;
                        self.parked.remove(&user_data);
                    }
                    Attempt::Again => st.readable = false,
                }
            }
        }
        if event.is_writable() || event.is_write_closed() || error {
            st.writable = true;
            if let Some(user_data) = st.connect {
                match connected(fd) {
                    Attempt::Done(res) => {
                        st.connect = None;
                        self.parked.remove(&user_data);
                        self.ready.push(cqe(user_data, res, None));
                    }
                    Attempt::Again => st.writable = false,
                }
            }
            if let Some(op) = st.send.take() {
                match send(fd, &op) {
                    Attempt::Done(res) => {
                        st.writable = st.ended || !drained(res, op.end - op.start);
                        self.parked.remove(&op.user_data);
                        self.ready.push(cqe(op.user_data, res, Some(op.buf)));
                    }
                    Attempt::Again => {
                        st.writable = false;
                        st.send = Some(op);
                    }
                }
            }
        }
    }

    /// Completes the parked operation pushed with `target` with `-ECANCELED`; nothing if it
    /// finished already.
    fn cancel(&mut self, target: u64) {
        let Some(fd) = self.parked.remove(&target) else {
            return;
        };
        let Some(st) = usize::try_from(fd).ok().and_then(|i| self.fds.get_mut(i)) else {
            return;
        };
        let cancelled = if st.recv.as_ref().is_some_and(|op| op.user_data == target) {
            st.recv.take().and_then(RecvOp::into_buf)
        } else if st.send.as_ref().is_some_and(|op| op.user_data == target) {
            st.send.take().map(|op| op.buf)
        } else if st.connect == Some(target) {
            st.connect = None;
            None
        } else if st.accept == Some(target) {
            st.accept = None;
            None
        } else {
            return;
        };
        self.ready.push(cqe(target, -libc::ECANCELED, cancelled));
    }

    /// Forgets `fd`: deregisters it and resets its state, so that a later socket with the
    /// same number starts afresh.
    fn close(&mut self, registry: &Registry, fd: RawFd) {
        let Some(st) = usize::try_from(fd).ok().and_then(|i| self.fds.get_mut(i)) else {
            return;
        };
        let st = std::mem::replace(st, FdState::NEW);
        if st.registered
            && let Err(e) = registry.deregister(&mut SourceFd(&fd))
        {
            tracing::debug!(fd, error = %e, "epoll: deregister failed");
        }
        // The loop closes a socket only once none of its operations is in flight; should one
        // be parked anyway, it still completes exactly once.
        debug_assert!(
            st.recv.is_none() && st.send.is_none() && st.connect.is_none() && st.accept.is_none(),
            "fd {fd} closed with an operation in flight"
        );
        let parked = [
            st.recv.map(|op| (op.user_data, op.into_buf())),
            st.send.map(|op| (op.user_data, Some(op.buf))),
            st.connect.map(|u| (u, None)),
            st.accept.map(|u| (u, None)),
        ];
        for (user_data, buf) in parked.into_iter().flatten() {
            self.parked.remove(&user_data);
            self.ready.push(cqe(user_data, -libc::ECANCELED, buf));
        }
    }
}

/// A completion.
fn cqe(user_data: u64, result: i32, buf: Option<Vec<u8>>) -> Cqe {
    Cqe {
        user_data,
        result,
        buf,
        accepted: None,
        more: false,
    }
}

/// The errno of a failed syscall (`EIO` should one come without).
fn errno(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

/// A byte count as a [`Cqe`] result; every count is at most [`MAX_IO`].
fn count(n: usize) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

/// Runs `f` on the socket `fd`, borrowed for the call.
fn with_socket<R>(fd: RawFd, f: impl FnOnce(&SockRef<'_>) -> R) -> R {
    // SAFETY: `Backend`'s contract: the loop keeps a socket open while any of its operations
    // is in flight and closes it only through `Backend::close`, which forgets its parked
    // operations first; so `fd` (never -1: it indexed the state table) is open for this
    // borrow, which ends with the call.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    f(&SockRef::from(&borrowed))
}

/// One read of at most `max` bytes into `buf`'s spare capacity, appended after its bytes.
fn recv(fd: RawFd, buf: &mut Vec<u8>, max: usize) -> Attempt {
    loop {
        let spare = buf.spare_capacity_mut();
        let room = spare.len().min(max).min(MAX_IO);
        match with_socket(fd, |s| s.recv(&mut spare[..room])) {
            Ok(n) => {
                // SAFETY: recv(2) initialised the first `n` bytes of the spare capacity, and
                // `n <= room` fits it.
                unsafe { buf.set_len(buf.len() + n) };
                return Attempt::Done(count(n));
            }
            Err(e) => match e.kind() {
                io::ErrorKind::Interrupted => {}
                io::ErrorKind::WouldBlock => return Attempt::Again,
                _ => return Attempt::Done(-errno(&e)),
            },
        }
    }
}

/// Whether a read would not wait, without reading: `POLLIN` for bytes or an end of stream,
/// `POLLERR` for a pending error (the read that follows reports it).
fn peek(fd: RawFd) -> Attempt {
    let mut byte = [std::mem::MaybeUninit::uninit(); 1];
    loop {
        match with_socket(fd, |s| s.peek(&mut byte)) {
            Ok(_) => return Attempt::Done(i32::from(libc::POLLIN)),
            Err(e) => match e.kind() {
                io::ErrorKind::Interrupted => {}
                io::ErrorKind::WouldBlock => return Attempt::Again,
                _ => return Attempt::Done(i32::from(libc::POLLERR)),
            },
        }
    }
}

/// One write of `op.buf[op.start..op.end]`; `SIGPIPE` is never raised (`EPIPE` instead).
fn send(fd: RawFd, op: &SendOp) -> Attempt {
    let Some(bytes) = op.buf.get(op.start..op.end) else {
        debug_assert!(
            false,
            "send range {}..{} of {} bytes",
            op.start,
            op.end,
            op.buf.len()
        );
        return Attempt::Done(-libc::EINVAL);
    };
    let bytes = &bytes[..bytes.len().min(MAX_IO)];
    let more = if op.more { libc::MSG_MORE } else { 0 };
    loop {
        match with_socket(fd, |s| s.send_with_flags(bytes, libc::MSG_NOSIGNAL | more)) {
            Ok(n) => return Attempt::Done(count(n)),
            Err(e) => match e.kind() {
                io::ErrorKind::Interrupted => {}
                io::ErrorKind::WouldBlock => return Attempt::Again,
                _ => return Attempt::Done(-errno(&e)),
            },
        }
    }
}

/// Starts a non-blocking connect: `Again` while it is in progress.
fn connect(fd: RawFd, addr: &SockAddr) -> Attempt {
    match with_socket(fd, |s| s.connect(addr)) {
        Ok(()) => Attempt::Done(0),
        // An interrupted connect goes on in the background, as one in progress does.
        Err(e) if matches!(e.raw_os_error(), Some(libc::EINPROGRESS | libc::EINTR)) => {
            Attempt::Again
        }
        Err(e) => Attempt::Done(-errno(&e)),
    }
}

/// How a connect in progress ended, once its socket reported writable or an error: its
/// `SO_ERROR`, and, when that is clear, whether it has a peer (`Again` if not yet).
fn connected(fd: RawFd) -> Attempt {
    match with_socket(fd, |s| s.take_error()) {
        Ok(Some(e)) | Err(e) => Attempt::Done(-errno(&e)),
        Ok(None) => match with_socket(fd, |s| s.peer_addr()) {
            Ok(_) => Attempt::Done(0),
            Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => Attempt::Again,
            Err(e) => Attempt::Done(-errno(&e)),
        },
    }
}

/// Accepts until `EAGAIN` (`Again`: the accept stays parked), one completion each with
/// `more` set; a hard error ends the accept with its completion (`Done`).
fn accept(fd: RawFd, user_data: u64, ready: &mut Vec<Cqe>) -> Attempt {
    loop {
        match with_socket(fd, |s| s.accept4(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC)) {
            Ok((socket, _)) => ready.push(Cqe {
                user_data,
                result: 0,
                buf: None,
                accepted: Some(OwnedFd::from(socket)),
                more: true,
            }),
            Err(e) => match e.kind() {
                io::ErrorKind::Interrupted => {}
                io::ErrorKind::WouldBlock => return Attempt::Again,
                _ => {
                    let result = -errno(&e);
                    ready.push(cqe(user_data, result, None));
                    return Attempt::Done(result);
                }
            },
        }
    }
}

/// The hasher of the parked-operation map: one multiply (as rustc's `FxHasher`), since user
/// data are the loop's own numbers, not attacker-chosen keys, and a cancel or park should
/// cost a few nanoseconds.
#[derive(Default)]
struct MixHasher(u64);

impl Hasher for MixHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::net::TcpStream;
    use std::os::fd::{AsRawFd, OwnedFd};
    use std::thread;
    use std::time::Duration;

    use socket2::{Domain, Socket, Type};

    use super::{Backend, Epoll, Sqe};
    use crate::driver::conformance::{self, one, pair, pattern, quiet};

    #[test]
    fn pooled_recv_hands_over_a_pool_buffer() {
        conformance::pooled_recv_hands_over_a_pool_buffer(&mut Epoll::new().unwrap());
    }

    #[test]
    fn pooled_recv_without_bytes_hands_over_nothing() {
        conformance::pooled_recv_without_bytes_hands_over_nothing(&mut Epoll::new().unwrap());
    }

    #[test]
    fn many_polls_each_complete_once() {
        conformance::many_polls_each_complete_once(&mut Epoll::new().unwrap());
    }

    #[test]
    fn a_socket_polls_again_after_each_poll() {
        conformance::a_socket_polls_again_after_each_poll(&mut Epoll::new().unwrap());
    }

    #[test]
    fn poll_in_waits_and_reads_nothing() {
        conformance::poll_in_waits_and_reads_nothing(&mut Epoll::new().unwrap());
    }

    #[test]
    fn a_burst_of_pooled_reads_all_complete() {
        let starved =
            conformance::a_burst_of_pooled_reads_all_complete(&mut Epoll::new().unwrap(), 9);
        assert_eq!(
            starved, 0,
            "epoll takes a buffer per attempt: none runs short"
        );
    }

    #[test]
    fn multishot_accept_gets_each_connection_until_cancelled() {
        conformance::multishot_accept_gets_each_connection_until_cancelled(
            &mut Epoll::new().unwrap(),
        );
    }

    #[test]
    fn accept_on_a_socket_that_does_not_listen_ends_with_its_error() {
        let mut ep = Epoll::new().unwrap();
        let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        socket.set_nonblocking(true).unwrap();
        ep.push(
            3,
            Sqe::Accept {
                fd: socket.as_raw_fd(),
            },
        );
        let c = one(&mut ep);
        assert_eq!((c.user_data, c.result, c.more), (3, -libc::EINVAL, false));
        ep.close(OwnedFd::from(socket));
    }

    #[test]
    fn recv_appends_after_existing_bytes_then_eof_is_zero() {
        conformance::recv_appends_after_existing_bytes_then_eof_is_zero(&mut Epoll::new().unwrap());
    }

    #[test]
    fn recv_of_waiting_data_is_tried_at_once_and_completes_at_the_next_zero_wait() {
        let mut ep = Epoll::new().unwrap();
        let (mut peer, fd) = pair();
        peer.write_all(b"ping").unwrap();
        // A blocking peek waits until the bytes are there, so the backend's first attempt
        // finds them.
        let ours = TcpStream::from(fd);
        ours.set_nonblocking(false).unwrap();
        assert_eq!(ours.peek(&mut [0; 4]).unwrap(), 4);
        ours.set_nonblocking(true).unwrap();
        let fd = OwnedFd::from(ours);

        ep.push(
            9,
            Sqe::Recv {
                fd: fd.as_raw_fd(),
                buf: Vec::with_capacity(16),
            },
        );
        assert_eq!(
            ep.core.ready.len(),
            1,
            "the recv was tried at once and its result queued"
        );
        assert!(ep.core.parked.is_empty());
        let mut out = Vec::new();
        ep.wait(Some(Duration::ZERO), &mut out).unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!((out[0].user_data, out[0].result), (9, 4));
        assert_eq!(out[0].buf.as_deref(), Some(&b"ping"[..]));
        ep.close(fd);
    }

    #[test]
    fn recv_matches_what_a_std_socket_sent() {
        let mut ep = Epoll::new().unwrap();
        let (mut peer, fd) = pair();
        let data = pattern(1 << 20);
        let sent = data.clone();
        let writer = thread::spawn(move || {
            // Uneven chunks, with pauses, so reads both find data and wait for it.
            let mut at = 0;
            let mut step = 1;
            while at < sent.len() {
                let end = (at + step * 997).min(sent.len());
                peer.write_all(&sent[at..end]).unwrap();
                at = end;
                step = step % 50 + 1;
                if step % 10 == 0 {
                    thread::sleep(Duration::from_millis(1));
                }
            }
        });
        let mut got = Vec::new();
        let mut buf = Vec::with_capacity(4000);
        loop {
            ep.push(
                5,
                Sqe::Recv {
                    fd: fd.as_raw_fd(),
                    buf,
                },
            );
            let c = one(&mut ep);
            assert_eq!(c.user_data, 5);
            buf = c.buf.unwrap();
            let n = usize::try_from(c.result).expect("recv succeeds");
            assert_eq!(n, buf.len());
            if c.result == 0 {
                break;
            }
            got.extend_from_slice(&buf);
            buf.clear();
        }
        writer.join().unwrap();
        assert_eq!(got.len(), data.len());
        assert!(
            got == data,
            "the bytes differ from what the std socket sent"
        );
        ep.close(fd);
    }

    #[test]
    fn a_large_send_to_a_slow_reader_arrives_whole() {
        conformance::a_large_send_to_a_slow_reader_arrives_whole(&mut Epoll::new().unwrap());
    }

    #[test]
    fn connect_succeeds_to_a_listener_and_is_refused_by_a_closed_port() {
        conformance::connect_succeeds_to_a_listener_and_is_refused_by_a_closed_port(
            &mut Epoll::new().unwrap(),
        );
    }

    #[test]
    fn cancel_completes_a_waiting_recv_once() {
        let mut ep = Epoll::new().unwrap();
        conformance::cancel_completes_a_waiting_recv_once(&mut ep, |ep| {
            assert!(
                ep.core.parked.contains_key(&1),
                "no data: the recv is parked"
            );
        });
        assert!(ep.core.parked.is_empty());
    }

    #[test]
    fn cancel_of_a_parked_send_hands_its_buffer_back() {
        let mut ep = Epoll::new().unwrap();
        let (_peer, fd) = pair();
        // Fill the socket until a send parks: the peer never reads.
        let buf = pattern(1 << 20);
        let mut parked = false;
        let mut buf = Some(buf);
        for round in 0..64_u64 {
            let b = buf.take().unwrap();
            let end = b.len();
            ep.push(
                round,
                Sqe::Send {
                    fd: fd.as_raw_fd(),
                    buf: b,
                    start: 0,
                    end,
                    more: false,
                },
            );
            if ep.core.parked.contains_key(&round) {
                conformance::cancel(&mut ep, round, false);
                let c = one(&mut ep);
                assert_eq!((c.user_data, c.result), (round, -libc::ECANCELED));
                assert!(c.buf.unwrap() == pattern(1 << 20));
                parked = true;
                break;
            }
            buf = one(&mut ep).buf;
        }
        assert!(parked, "a peer that never reads fills the socket");
        ep.close(fd);
    }

    #[test]
    fn wait_with_nothing_ready_returns_after_the_timeout() {
        conformance::wait_with_nothing_ready_returns_after_the_timeout(&mut Epoll::new().unwrap());
    }

    #[test]
    fn bytes_sent_with_more_leave_with_the_fin() {
        conformance::bytes_sent_with_more_leave_with_the_fin(&mut Epoll::new().unwrap());
    }

    #[test]
    fn shutdown_completes_a_waiting_recv_with_end_of_stream() {
        conformance::shutdown_completes_a_waiting_recv_with_end_of_stream(
            &mut Epoll::new().unwrap(),
        );
    }

    #[test]
    fn a_reset_peer_fails_recv_with_econnreset_then_send_with_epipe() {
        let mut ep = Epoll::new().unwrap();
        let (peer, fd) = pair();
        ep.push(
            1,
            Sqe::Recv {
                fd: fd.as_raw_fd(),
                buf: Vec::with_capacity(8),
            },
        );
        quiet(&mut ep, Duration::from_millis(20));
        // Closing with unread bytes makes the peer reset the connection.
        ep.push(
            2,
            Sqe::Send {
                fd: fd.as_raw_fd(),
                buf: b"unread".to_vec(),
                start: 0,
                end: 6,
                more: false,
            },
        );
        assert_eq!(one(&mut ep).result, 6);
        let mut wait_for_bytes = [0; 6];
        assert_eq!(peer.peek(&mut wait_for_bytes).unwrap(), 6);
        drop(peer);
        let c = one(&mut ep);
        assert_eq!((c.user_data, c.result), (1, -libc::ECONNRESET));

        ep.push(
            3,
            Sqe::Send {
                fd: fd.as_raw_fd(),
                buf: b"more".to_vec(),
                start: 0,
                end: 4,
                more: false,
            },
        );
        let c = one(&mut ep);
        assert_eq!((c.user_data, c.result), (3, -libc::EPIPE));
        assert_eq!(c.buf.unwrap(), b"more");
        ep.close(fd);
    }

    #[test]
    fn a_bad_fd_fails_through_wait() {
        let mut ep = Epoll::new().unwrap();
        ep.push(
            1,
            Sqe::Recv {
                fd: -1,
                buf: Vec::with_capacity(8),
            },
        );
        let c = one(&mut ep);
        assert_eq!((c.user_data, c.result), (1, -libc::EBADF));
        assert_eq!(c.buf.unwrap().capacity(), 8);
    }

    #[test]
    fn close_forgets_a_socket() {
        let mut ep = Epoll::new().unwrap();
        let (mut peer, fd) = pair();
        let raw = fd.as_raw_fd();
        peer.write_all(b"x").unwrap();
        ep.push(
            1,
            Sqe::Recv {
                fd: raw,
                buf: Vec::with_capacity(8),
            },
        );
        assert_eq!(one(&mut ep).result, 1);
        let i = usize::try_from(raw).unwrap();
        assert!(ep.core.fds[i].registered);
        ep.close(fd);
        let st = &ep.core.fds[i];
        assert!(!st.registered && st.readable && st.writable);
        // The peer's end of stream comes to no one.
        drop(peer);
        quiet(&mut ep, Duration::from_millis(20));
    }
}
