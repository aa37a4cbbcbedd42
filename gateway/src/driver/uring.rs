//! The io_uring [`Backend`]: one ring per event loop, created on the loop's own thread.
//!
//! Every operation's buffer (and a connect's address) is kept here, in an in-flight table,
//! from its push until its last completion: the kernel holds raw pointers into them, so they
//! must neither move nor be freed in between. A `Vec<u8>` moved into the table keeps its heap
//! data where it was, and a connect's address is boxed for the same reason; the table slot is
//! freed only by the operation's final completion (or, when the ring is dropped with
//! operations still in flight, after they are cancelled, or never).
//!
//! Each ring's user data names a table slot (index and a generation, so a cancel aimed at a
//! slot that has since been reused cannot hit the newcomer); the slot remembers the loop's
//! own user data. Waiting is one `io_uring_enter` that submits and waits; nothing goes through
//! epoll.
//!
//! Pooled reads (`Sqe::RecvPooled`) go through a provided-buffer ring: the kernel takes a buffer
//! from it only when bytes arrive, so a connection waiting for input lends it none, and they
//! need no table slot either (their ring user data is the loop's own with [`SLOTLESS`] set,
//! as is a poll's, which lends nothing), so an idle connection costs this backend nothing.
//! Each buffer the ring names is owned by [`BufRing`] until a completion reports its id; then
//! it is handed out and the ring gets a fresh one in its place before the next submission. A
//! read that finds the ring empty (a burst larger than the ring between two reaps) completes
//! with `ENOBUFS`, which the loop answers by pushing it again: backpressure, never an error a
//! connection sees. `Sqe::RecvMulti` is the same read made multishot
//! (`IORING_OP_READ_MULTISHOT`): it stays in flight, with no table slot either, until a
//! completion without `IORING_CQE_F_MORE` ends it.
#![expect(
    unsafe_code,
    reason = "io_uring: the kernel reads and writes buffers through raw pointers in submission \
              entries, and hands accepted sockets back as raw fds; each block says why it is sound"
)]

use std::alloc::Layout;
use std::collections::VecDeque;
use std::io;
use std::marker::PhantomData;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use io_uring::{IoUring, cqueue, opcode, squeue, types};
use socket2::SockAddr;

use super::{Backend, BufPool, Cqe, POOL_BUF, Sqe};

/// Ring user data of the cancels this backend issues, whose completions are swallowed. No slot
/// has it (table keys keep the top bit clear), nor a slotless operation (loop slots stay far
/// below 2^31 - 1).
const CANCEL: u64 = u64::MAX;

/// Set in the ring user data of an operation that lends the kernel nothing of ours and so has
/// no table slot (a pooled read, a poll), which is otherwise the loop's own (whose top bit is
/// clear: see [`Sqe::RecvPooled`]); table keys have it clear.
const SLOTLESS: u64 = 1 << 63;

/// The generation bits of a table key (31, so that keys keep [`SLOTLESS`] clear).
const KEY_GENERATION: u32 = 0x7FFF_FFFF;

/// [`Uring::setup`] when the kernel took `SINGLE_ISSUER` and `DEFER_TASKRUN` (6.1 and later):
/// completion work runs only when this thread asks for completions.
const SETUP_DEFER: &str = "SINGLE_ISSUER|DEFER_TASKRUN";
/// [`Uring::setup`] when it took `COOP_TASKRUN` and `TASKRUN_FLAG` (5.19 and later):
/// completion work waits for this thread's next entry instead of interrupting it.
const SETUP_COOP: &str = "COOP_TASKRUN|TASKRUN_FLAG";
/// [`Uring::setup`] when it took no setup flags at all.
const SETUP_NONE: &str = "none";

/// How long dropping a ring with operations in flight waits for their cancellations before
/// leaking their buffers instead.
const DROP_GRACE: Duration = Duration::from_secs(1);

/// Buffers in a ring the tests set up with [`Uring::new`] (the gateway passes
/// `server.read_buffers` to [`Uring::with_bufs`]).
#[cfg(test)]
const RING_BUFS: u16 = 64;

/// The buffer group id of the provided-buffer ring (one per io_uring instance).
const BGID: u16 = 0;

/// An io_uring ring and the operations in flight on it.
pub(crate) struct Uring {
    /// The ring.
    ring: IoUring,
    /// The setup flags the kernel accepted, for the start log line.
    setup: &'static str,
    /// What each in-flight operation lends the kernel.
    slab: Slab,
    /// Entries that found the submission queue full and could not be submitted to make room;
    /// [`Backend::wait`] queues them (in order) before it waits.
    backlog: VecDeque<squeue::Entry>,
    /// The buffers pooled reads pick from.
    bufs: BufRing,
    /// Pooled reads (single and multishot) and polls in flight (they have no table slot).
    slotless: usize,
    /// `Sqe::RecvMulti` runs as a multishot read (`IORING_OP_READ_MULTISHOT`, Linux 6.7),
    /// which stays armed across reads; false where the kernel lacks it or it was turned off
    /// ([`Uring::single_shot`]), and then each runs as one pooled read.
    multishot: bool,
    /// Not `Send`: with `SINGLE_ISSUER` only the thread that created the ring may enter it.
    _thread: PhantomData<*const ()>,
}

impl Uring {
    /// Sets up a ring with `entries` submission slots on the calling thread, which is the only
    /// one that may use it, with the best task-running mode the kernel accepts.
    #[cfg(test)]
    pub(crate) fn new(entries: u32) -> io::Result<Self> {
        Self::with_bufs(entries, RING_BUFS)
    }

    /// Sets up a ring as [`Uring::new`] does, with `bufs` (a power of two) buffers of
    /// [`POOL_BUF`] bytes in its provided-buffer ring, and as many kept free to refill it.
    /// Each is address space, resident only where reads touched it.
    pub(crate) fn with_bufs(entries: u32, bufs: u16) -> io::Result<Self> {
        Self::with_read_cap(entries, bufs, POOL_BUF)
    }

    /// Sets up a ring as [`Uring::with_bufs`] does, whose pooled reads take at most `cap`
    /// bytes (at least 1, at most [`POOL_BUF`]): a multishot read cannot be told a length per
    /// read, so the ring's buffers say it (`limits.write_buffer`, the most the relay reads at
    /// once).
    pub(crate) fn with_read_cap(entries: u32, bufs: u16, cap: usize) -> io::Result<Self> {
        let (ring, setup) = build(entries)?;
        if !ring.params().is_feature_ext_arg() {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "io_uring without IORING_FEAT_EXT_ARG (kernel before 5.11): no timed wait",
            ));
        }
        let bufs = BufRing::register(&ring, bufs, op_len(cap.clamp(1, POOL_BUF)))?;
        let mut probe = io_uring::Probe::new();
        let multishot = ring.submitter().register_probe(&mut probe).is_ok()
            && probe.is_supported(opcode::ReadMulti::CODE);
        Ok(Self {
            ring,
            setup,
            slab: Slab::default(),
            backlog: VecDeque::new(),
            bufs,
            slotless: 0,
            multishot,
            _thread: PhantomData,
        })
    }

    /// Runs every `Sqe::RecvMulti` as one pooled read, as on kernels without multishot reads
    /// (for comparisons, and to keep that path tested).
    pub(crate) fn single_shot(mut self) -> Self {
        self.multishot = false;
        self
    }

    /// The setup flags the kernel accepted, for the start log line.
    pub(crate) fn setup(&self) -> &'static str {
        self.setup
    }

    /// Queues `entry` behind anything already waiting in the backlog; when the submission
    /// queue is full, submits what is there first.
    fn queue(&mut self, entry: squeue::Entry) {
        if self.backlog.is_empty()
            && (sq_push(&mut self.ring, &entry)
                || (self.ring.submit().is_ok() && sq_push(&mut self.ring, &entry)))
        {
            return;
        }
        self.backlog.push_back(entry);
    }

    /// Moves the backlog into the submission queue, submitting whenever it fills; false if
    /// some entries are left because a submit failed.
    fn flush_backlog(&mut self) -> bool {
        while let Some(entry) = self.backlog.front() {
            if !sq_push(&mut self.ring, entry)
                && (self.ring.submit().is_err() || !sq_push(&mut self.ring, entry))
            {
                return false;
            }
            self.backlog.pop_front();
        }
        true
    }

    /// Cancels the in-flight operation pushed with `target` (at most one, by the loop's
    /// rules): a pooled read or a poll when `slotless` says so, else the one in the table
    /// (or, should it not be there, a pooled read or poll after all). A cancel that finds
    /// nothing, because its target completed already, does nothing.
    fn cancel(&mut self, target: u64, slotless: bool) {
        let mut found = false;
        if !slotless {
            for index in 0..self.slab.slots.len() {
                if let Some((key, user_data)) = self.slab.busy(index)
                    && user_data == target
                {
                    self.queue(opcode::AsyncCancel::new(key).build().user_data(CANCEL));
                    found = true;
                }
            }
        }
        if !found && self.slotless > 0 {
            let entry = opcode::AsyncCancel::new(target | SLOTLESS).build();
            self.queue(entry.user_data(CANCEL));
        }
    }

    /// Hands every completion in the completion queue to `out`, freeing finished slots, then
    /// refills the buffer ring.
    fn drain(&mut self, out: &mut Vec<Cqe>) {
        let Self {
            ring,
            slab,
            bufs,
            slotless,
            ..
        } = self;
        for cqe in ring.completion() {
            let (key, result) = (cqe.user_data(), cqe.result());
            if key == CANCEL {
                continue;
            }
            if key & SLOTLESS == 0 {
                if let Some(done) = slab.complete(key, result, cqe.flags()) {
                    out.push(done);
                }
                continue;
            }
            // A pooled read or a poll: only a read that read bytes comes with a buffer. A
            // multishot read stays in flight while its completions say `more`.
            let more = cqueue::more(cqe.flags());
            if !more {
                *slotless -= 1;
            }
            let mut done = Cqe {
                user_data: key & !SLOTLESS,
                result,
                buf: None,
                accepted: None,
                more,
            };
            if let Some(bid) = cqueue::buffer_select(cqe.flags()) {
                let buf = bufs.take(bid, usize::try_from(result).unwrap_or(0));
                if result > 0 {
                    done.buf = Some(buf);
                } else {
                    bufs.pool.put(buf);
                }
            }
            out.push(done);
        }
        self.bufs.publish();
    }
}

impl Backend for Uring {
    fn name(&self) -> &'static str {
        "io_uring"
    }

    fn push(&mut self, user_data: u64, sqe: Sqe) {
        let op = match sqe {
            Sqe::Cancel { target, slotless } => return self.cancel(target, slotless),
            Sqe::RecvPooled { fd, len } => {
                debug_assert_eq!(user_data & SLOTLESS, 0, "a pooled read's user data");
                let len = len.clamp(1, op_len(POOL_BUF));
                // A read rather than a recv, as for `Op::Recv` (half the kernel state).
                let entry = opcode::Read::new(types::Fd(fd), std::ptr::null_mut(), len)
                    .buf_group(BGID)
                    .build()
                    .flags(squeue::Flags::BUFFER_SELECT)
                    .user_data(user_data | SLOTLESS);
                self.slotless += 1;
                return self.queue(entry);
            }
            Sqe::RecvMulti { fd } if self.multishot => {
                debug_assert_eq!(user_data & SLOTLESS, 0, "a multishot read's user data");
                // A read, not a recv, for the smaller kernel state, as for `Op::Recv`. Length
                // 0: each read fills at most one ring buffer.
                let entry = opcode::ReadMulti::new(types::Fd(fd), 0, BGID)
                    .build()
                    .user_data(user_data | SLOTLESS);
                self.slotless += 1;
                return self.queue(entry);
            }
            Sqe::RecvMulti { fd } => {
                let len = op_len(POOL_BUF);
                return self.push(user_data, Sqe::RecvPooled { fd, len });
            }
            Sqe::PollIn { fd } => {
                debug_assert_eq!(user_data & SLOTLESS, 0, "a poll's user data");
                // Oneshot: it holds only its request while it waits, where a read also holds
                // its read state and an internal poll entry.
                let mask = u32::try_from(libc::POLLIN | libc::POLLRDHUP).unwrap_or(0);
                let entry = opcode::PollAdd::new(types::Fd(fd), mask)
                    .build()
                    .user_data(user_data | SLOTLESS);
                self.slotless += 1;
                return self.queue(entry);
            }
            Sqe::Accept { fd } => Op::Accept { fd },
            Sqe::Recv { fd, buf } => {
                debug_assert!(buf.capacity() > buf.len(), "a recv needs spare capacity");
                Op::Recv { fd, buf }
            }
            Sqe::Send {
                fd,
                buf,
                start,
                end,
                more,
            } => Op::Send {
                fd,
                buf,
                start,
                end,
                more,
            },
            Sqe::Connect { fd, addr } => Op::Connect {
                fd,
                addr: Box::new(addr),
            },
        };
        let (key, op) = self.slab.insert(user_data, op);
        let entry = op.prepare().user_data(key);
        self.queue(entry);
    }

    fn wait(&mut self, timeout: Option<Duration>, out: &mut Vec<Cqe>) -> io::Result<()> {
        // With entries still in the backlog, only reap: waiting could wait on them.
        let timeout = if self.flush_backlog() {
            timeout
        } else {
            Some(Duration::ZERO)
        };
        let submitter = self.ring.submitter();
        let entered = match timeout {
            None => submitter.submit_and_wait(1),
            Some(timeout) => {
                let ts = types::Timespec::from(timeout);
                submitter.submit_with_args(1, &types::SubmitArgs::new().timespec(&ts))
            }
        };
        if let Err(e) = entered {
            match e.raw_os_error() {
                // The timeout passed, or a signal came: reap what is there.
                // EBUSY/EAGAIN: the kernel wants completions reaped (older kernels with an
                // overflowed completion queue) or is short of memory: reap, the loop comes back.
                Some(libc::ETIME | libc::EINTR | libc::EBUSY | libc::EAGAIN) => {}
                _ => return Err(e),
            }
        }
        self.drain(out);
        Ok(())
    }

    fn close(&mut self, fd: OwnedFd) {
        drop(fd);
    }

    fn recycle(&mut self, buf: Vec<u8>) {
        self.bufs.pool.put(buf);
    }

    fn multishot(&self) -> bool {
        self.multishot
    }
}

impl Drop for Uring {
    /// Cancels what is still in flight and waits (briefly) for it, so that no buffer is freed
    /// while the kernel may still write into it; what does not come back in time is leaked.
    fn drop(&mut self) {
        let in_flight = |ring: &Self| ring.slab.in_flight() + ring.slotless;
        if in_flight(self) == 0 {
            drop(self.ring.submitter().unregister_buf_ring(BGID));
            return;
        }
        let any = types::CancelBuilder::any();
        self.queue(opcode::AsyncCancel2::new(any).build().user_data(CANCEL));
        let deadline = Instant::now() + DROP_GRACE;
        let mut out = Vec::new();
        while in_flight(self) > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || self.wait(Some(left), &mut out).is_err() {
                break;
            }
            out.clear();
        }
        if in_flight(self) > 0 {
            // The kernel may still reach these buffers after the ring is closed.
            std::mem::forget(std::mem::take(&mut self.slab.slots));
            self.bufs.leak();
        } else {
            // Nothing can pick a buffer any more: the ring's memory may go.
            drop(self.ring.submitter().unregister_buf_ring(BGID));
        }
    }
}

/// A provided-buffer ring: entries the kernel reads to pick a pooled read's buffer, and the
/// buffers they name.
struct BufRing {
    /// The entries: `mask + 1` of them, page-aligned, registered with the kernel (which reads
    /// them up to the tail, kept in the first entry's reserved field).
    entries: NonNull<types::BufRingEntry>,
    /// Index mask: entries are a power of two.
    mask: u16,
    /// The most bytes a read puts in a buffer (the length each entry gives the kernel).
    cap: u32,
    /// The tail as written so far; [`BufRing::publish`] hands it to the kernel.
    tail: u16,
    /// The buffer each id names while the ring lends it (empty while handed out).
    lent: Vec<Vec<u8>>,
    /// Free buffers that refill the ring.
    pool: BufPool,
    /// The entries were leaked (the kernel may still read them): never freed.
    leaked: bool,
}

impl BufRing {
    /// The entries' allocation for `count` of them.
    fn layout(count: u16) -> Layout {
        let size = usize::from(count) * size_of::<types::BufRingEntry>();
        Layout::from_size_align(size.max(4096), 4096).expect("a page-aligned layout")
    }

    /// Allocates `count` (a power of two) entries, fills each with a buffer and registers
    /// them as group [`BGID`] of `ring`.
    fn register(ring: &IoUring, count: u16, cap: u32) -> io::Result<Self> {
        assert!(
            count.is_power_of_two(),
            "a buffer ring holds a power of two"
        );
        let layout = Self::layout(count);
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        #[expect(
            clippy::cast_ptr_alignment,
            reason = "the layout is page-aligned, more than an entry needs"
        )]
        let entries = raw.cast::<types::BufRingEntry>();
        let Some(entries) = NonNull::new(entries) else {
            std::alloc::handle_alloc_error(layout);
        };
        let mut bufs = Self {
            entries,
            mask: count - 1,
            cap,
            tail: 0,
            lent: (0..count).map(|_| Vec::new()).collect(),
            pool: BufPool::new(usize::from(count)),
            leaked: false,
        };
        // SAFETY: `entries` is a zeroed, page-aligned allocation of `count` entries that lives
        // until after the group is unregistered (`Uring`'s drop) or is leaked with the ring.
        unsafe {
            ring.submitter().register_buf_ring_with_flags(
                entries.as_ptr() as u64,
                count,
                BGID,
                0,
            )?;
        }
        for bid in 0..count {
            let buf = bufs.pool.take();
            bufs.provide(bid, buf);
        }
        bufs.publish();
        Ok(bufs)
    }

    /// Writes an entry naming `buf` as buffer `bid` at the tail (published later).
    fn provide(&mut self, bid: u16, mut buf: Vec<u8>) {
        debug_assert!(buf.is_empty() && buf.capacity() == POOL_BUF);
        let at = usize::from(self.tail & self.mask);
        // SAFETY: `at` is within the allocation. The kernel reads only entries between its
        // head and the published tail; the entry at our unpublished tail is not among them,
        // since at most `mask` published entries are unconsumed (every id in the ring is
        // distinct and `bid` was consumed). Writing through the raw pointer leaves the
        // reserved field (the tail, in entry 0) alone.
        let entry = unsafe { &mut *self.entries.as_ptr().add(at) };
        entry.set_addr(buf.as_mut_ptr() as u64);
        entry.set_len(self.cap.min(op_len(buf.capacity())));
        entry.set_bid(bid);
        self.lent[usize::from(bid)] = buf;
        self.tail = self.tail.wrapping_add(1);
    }

    /// Hands the entries written so far to the kernel.
    fn publish(&self) {
        // SAFETY: `entries` is the ring's first entry, initialised (zeroed) at allocation, and
        // its reserved field is the shared tail, which the kernel only reads: an atomic store
        // with release ordering makes the entries written before it visible first.
        unsafe {
            let tail = types::BufRingEntry::tail(self.entries.as_ptr()).cast::<AtomicU16>();
            (*tail).store(self.tail, Ordering::Release);
        }
    }

    /// Takes the buffer the kernel filled with `len` bytes as id `bid` and puts a fresh one
    /// in its place.
    fn take(&mut self, bid: u16, len: usize) -> Vec<u8> {
        let mut buf = std::mem::take(&mut self.lent[usize::from(bid)]);
        assert!(
            len <= buf.capacity(),
            "the kernel read more than a ring buffer holds"
        );
        // SAFETY: the completion says the kernel wrote `len` bytes at the start of this
        // buffer, which the ring lent it; the assert keeps them within its capacity.
        unsafe { buf.set_len(len) };
        let fresh = self.pool.take();
        self.provide(bid, fresh);
        buf
    }

    /// Gives up the entries and buffers for good: the kernel may still use them.
    fn leak(&mut self) {
        self.leaked = true;
        std::mem::forget(std::mem::take(&mut self.lent));
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        if !self.leaked {
            // SAFETY: allocated in `register` with this layout; the group was unregistered
            // (or the ring closed) with nothing in flight, so the kernel reads it no more.
            unsafe {
                std::alloc::dealloc(self.entries.as_ptr().cast(), Self::layout(self.mask + 1));
            }
        }
    }
}

/// Sets up a ring the way [`Uring::new`] does, for the gateway's start-up check: fails where
/// io_uring is denied (seccomp, `kernel.io_uring_disabled`) or lacks what this backend uses
/// (timed waits; multishot accept, which came in 5.19 with `COOP_TASKRUN`, so a kernel that
/// refuses both task-running modes is too old).
pub(crate) fn probe() -> io::Result<()> {
    let ring = Uring::with_bufs(8, 1)?;
    if ring.setup() == SETUP_NONE {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "io_uring refuses COOP_TASKRUN (kernel before 5.19): no multishot accept",
        ));
    }
    Ok(())
}

/// Builds a ring with `SINGLE_ISSUER|DEFER_TASKRUN`, else `COOP_TASKRUN|TASKRUN_FLAG`, else
/// no flags, stepping down only when the kernel refuses the flags (`EINVAL`).
fn build(entries: u32) -> io::Result<(IoUring, &'static str)> {
    let refused = |e: &io::Error| e.raw_os_error() == Some(libc::EINVAL);
    match IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .build(entries)
    {
        Ok(ring) => return Ok((ring, SETUP_DEFER)),
        Err(e) if !refused(&e) => return Err(e),
        Err(_) => {}
    }
    match IoUring::builder()
        .setup_coop_taskrun()
        .setup_taskrun_flag()
        .build(entries)
    {
        Ok(ring) => return Ok((ring, SETUP_COOP)),
        Err(e) if !refused(&e) => return Err(e),
        Err(_) => {}
    }
    Ok((IoUring::new(entries)?, SETUP_NONE))
}

/// Puts `entry` in the submission queue; false if it is full.
fn sq_push(ring: &mut IoUring, entry: &squeue::Entry) -> bool {
    // SAFETY: every entry this backend builds either points at nothing (cancels) or into
    // memory its table slot owns: a `Vec`'s heap buffer or a boxed address, neither of which
    // moves when the slot (or the table) does, and neither of which is freed or touched until
    // the operation's final completion frees the slot.
    unsafe { ring.submission().push(entry).is_ok() }
}

/// A length the kernel takes as `u32`: longer buffers make a short operation.
fn op_len(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}

/// An in-flight operation and what it lends the kernel.
#[derive(Debug)]
enum Op {
    /// A multishot accept on a listening socket: lends nothing.
    Accept {
        /// The listening socket.
        fd: RawFd,
    },
    /// A recv into `buf`'s spare capacity.
    Recv {
        /// The socket.
        fd: RawFd,
        /// The kernel writes past its length.
        buf: Vec<u8>,
    },
    /// A send of `buf[start..end]`.
    Send {
        /// The socket.
        fd: RawFd,
        /// The kernel reads from it.
        buf: Vec<u8>,
        /// First byte to send.
        start: usize,
        /// One past the last.
        end: usize,
        /// With `MSG_MORE` (a FIN follows).
        more: bool,
    },
    /// A connect.
    Connect {
        /// The socket.
        fd: RawFd,
        /// The kernel reads it; boxed so it stays put when the table grows.
        addr: Box<SockAddr>,
    },
}

impl Op {
    /// The submission entry for this operation, pointing into what it owns.
    fn prepare(&mut self) -> squeue::Entry {
        match self {
            Self::Accept { fd } => opcode::AcceptMulti::new(types::Fd(*fd))
                .flags(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC)
                .build(),
            Self::Recv { fd, buf } => {
                // A read, not a recv: the same on a stream socket, and while it waits the
                // kernel keeps 256 bytes of state for it instead of a recv's 512.
                let spare = buf.spare_capacity_mut();
                opcode::Read::new(
                    types::Fd(*fd),
                    spare.as_mut_ptr().cast(),
                    op_len(spare.len()),
                )
                .build()
            }
            Self::Send {
                fd,
                buf,
                start,
                end,
                more,
            } => {
                let bytes = &buf[*start..*end];
                let more = if *more { libc::MSG_MORE } else { 0 };
                opcode::Send::new(types::Fd(*fd), bytes.as_ptr(), op_len(bytes.len()))
                    .flags(libc::MSG_NOSIGNAL | more)
                    .build()
            }
            Self::Connect { fd, addr } => {
                opcode::Connect::new(types::Fd(*fd), addr.as_ptr(), addr.len()).build()
            }
        }
    }
}

/// An operation the kernel has not finished.
#[derive(Debug)]
struct InFlight {
    /// The loop's user data for it.
    user_data: u64,
    /// The operation and what it lends.
    op: Op,
}

/// One place in the in-flight table.
#[derive(Debug, Default)]
struct Slot {
    /// Counts the slot's uses, so a ring user data names one use of it.
    generation: u32,
    /// The operation using it; `None` while the slot is on the free list.
    op: Option<InFlight>,
}

/// The in-flight table: slots reused through a free list, so a steady loop allocates nothing.
#[derive(Debug, Default)]
struct Slab {
    /// Every slot ever used.
    slots: Vec<Slot>,
    /// Indices of the free slots.
    free: Vec<u32>,
}

impl Slab {
    /// Stores `op` in a free slot; returns the ring user data naming this use of it, and the
    /// stored operation.
    fn insert(&mut self, user_data: u64, op: Op) -> (u64, &mut Op) {
        let index = self.free.pop().unwrap_or_else(|| {
            // Invariant: fewer than u32::MAX operations are ever in flight (each holds a
            // socket), so indices fit and none collides with `CANCEL`.
            let index = u32::try_from(self.slots.len())
                .ok()
                .filter(|&i| i < u32::MAX)
                .expect("in-flight table full");
            self.slots.push(Slot::default());
            index
        });
        let slot = &mut self.slots[index as usize];
        slot.generation = slot.generation.wrapping_add(1) & KEY_GENERATION;
        let key = (u64::from(slot.generation) << 32) | u64::from(index);
        let stored = slot.op.insert(InFlight { user_data, op });
        (key, &mut stored.op)
    }

    /// The ring and loop user data of the operation in slot `index`, if one is there.
    fn busy(&self, index: usize) -> Option<(u64, u64)> {
        let slot = &self.slots[index];
        let op = slot.op.as_ref()?;
        Some((
            (u64::from(slot.generation) << 32) | index as u64,
            op.user_data,
        ))
    }

    /// The slot `key` names, if it is still that use of it.
    fn slot(&mut self, key: u64) -> Option<&mut Slot> {
        let slot = self.slots.get_mut((key & u64::from(u32::MAX)) as usize)?;
        (slot.op.is_some() && u64::from(slot.generation) == key >> 32).then_some(slot)
    }

    /// How many operations are in flight.
    fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Turns the kernel's completion of `key` into the loop's, freeing the slot unless the
    /// operation goes on (a multishot accept with `more`).
    fn complete(&mut self, key: u64, result: i32, flags: u32) -> Option<Cqe> {
        let more = cqueue::more(flags);
        let Some(slot) = self.slot(key) else {
            debug_assert!(false, "completion for no operation: {key:#x}");
            return None;
        };
        let accepting = matches!(
            slot.op,
            Some(InFlight {
                op: Op::Accept { .. },
                ..
            })
        );
        // `slot` holds an operation (`Slab::slot` checked), so neither `?` below returns.
        let (user_data, op) = if accepting && more {
            (slot.op.as_ref()?.user_data, None)
        } else {
            let InFlight { user_data, op } = slot.op.take()?;
            self.free.push((key & u64::from(u32::MAX)) as u32);
            (user_data, Some(op))
        };
        let mut cqe = Cqe {
            user_data,
            result,
            buf: None,
            accepted: None,
            more: false,
        };
        match op {
            None | Some(Op::Accept { .. }) => {
                if result >= 0 {
                    // SAFETY: a non-negative accept result is a socket the kernel has just
                    // created for this completion; nothing else owns it or will close it.
                    cqe.accepted = Some(unsafe { OwnedFd::from_raw_fd(result) });
                    cqe.result = 0;
                }
                cqe.more = more;
            }
            Some(Op::Recv { mut buf, .. }) => {
                if let Ok(read) = usize::try_from(result) {
                    assert!(
                        read <= buf.capacity() - buf.len(),
                        "the kernel read more than the recv lent it"
                    );
                    // SAFETY: the kernel wrote exactly `read` bytes at `buf.len()..`, the spare
                    // capacity this recv lent it, so the first `len + read` bytes are
                    // initialised, and the assert above keeps them within the capacity.
                    unsafe { buf.set_len(buf.len() + read) };
                }
                cqe.buf = Some(buf);
            }
            Some(Op::Send { buf, .. }) => cqe.buf = Some(buf),
            Some(Op::Connect { .. }) => {}
        }
        Some(cqe)
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsRawFd;

    use super::*;
    use crate::driver::conformance::{self, collect, one, pair, quiet};

    #[test]
    fn setup_takes_flags_and_probe_passes() {
        let ring = Uring::new(8).unwrap();
        eprintln!("io_uring setup: {}", ring.setup());
        assert!([SETUP_DEFER, SETUP_COOP, SETUP_NONE].contains(&ring.setup()));
        probe().unwrap();
    }

    #[test]
    fn multishot_accept_gets_each_connection_until_cancelled() {
        let mut ring = Uring::new(16).unwrap();
        conformance::multishot_accept_gets_each_connection_until_cancelled(&mut ring);
        assert_eq!((ring.slab.in_flight(), ring.slotless), (0, 0));
    }

    #[test]
    fn recv_appends_after_existing_bytes_then_eof_is_zero() {
        conformance::recv_appends_after_existing_bytes_then_eof_is_zero(
            &mut Uring::new(8).unwrap(),
        );
    }

    #[test]
    fn short_send_sends_the_range_and_returns_the_buffer() {
        let (mut peer, ours) = pair();
        let mut ring = Uring::new(8).unwrap();
        let buf = b"0123456789".to_vec();
        ring.push(
            9,
            Sqe::Send {
                fd: ours.as_raw_fd(),
                buf,
                start: 2,
                end: 7,
                more: false,
            },
        );
        let cqe = one(&mut ring);
        assert_eq!((cqe.user_data, cqe.result), (9, 5));
        assert_eq!(cqe.buf.unwrap(), b"0123456789");
        let mut got = [0; 5];
        peer.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"23456");
    }

    #[test]
    fn a_large_send_to_a_slow_reader_arrives_whole() {
        conformance::a_large_send_to_a_slow_reader_arrives_whole(&mut Uring::new(8).unwrap());
    }

    #[test]
    fn connect_succeeds_to_a_listener_and_is_refused_by_a_closed_port() {
        conformance::connect_succeeds_to_a_listener_and_is_refused_by_a_closed_port(
            &mut Uring::new(8).unwrap(),
        );
    }

    #[test]
    fn cancel_completes_a_waiting_recv_once() {
        let mut ring = Uring::new(8).unwrap();
        conformance::cancel_completes_a_waiting_recv_once(&mut ring, |ring| {
            assert_eq!(ring.slab.in_flight(), 1, "the recv holds a table slot");
        });
        assert_eq!((ring.slab.in_flight(), ring.slotless), (0, 0));
    }

    #[test]
    fn cancel_in_the_same_batch_as_its_recv() {
        let (_peer, ours) = pair();
        let mut ring = Uring::new(8).unwrap();
        ring.push(
            7,
            Sqe::Recv {
                fd: ours.as_raw_fd(),
                buf: Vec::with_capacity(8),
            },
        );
        conformance::cancel(&mut ring, 7, false);
        let cqe = one(&mut ring);
        assert_eq!((cqe.user_data, cqe.result), (7, -libc::ECANCELED));
        quiet(&mut ring, Duration::from_millis(50));
    }

    #[test]
    fn wait_with_nothing_ready_returns_after_the_timeout() {
        conformance::wait_with_nothing_ready_returns_after_the_timeout(&mut Uring::new(8).unwrap());
    }

    #[test]
    fn bytes_sent_with_more_leave_with_the_fin() {
        conformance::bytes_sent_with_more_leave_with_the_fin(&mut Uring::new(8).unwrap());
    }

    #[test]
    fn shutdown_completes_a_waiting_recv_with_end_of_stream() {
        conformance::shutdown_completes_a_waiting_recv_with_end_of_stream(
            &mut Uring::new(8).unwrap(),
        );
    }

    #[test]
    fn a_full_submission_queue_is_submitted_to_make_room() {
        let pairs: Vec<(TcpStream, OwnedFd)> = (0..8).map(|_| pair()).collect();
        let mut ring = Uring::new(2).unwrap();
        for (i, (peer, ours)) in pairs.iter().enumerate() {
            (&*peer)
                .write_all(format!("message {i}").as_bytes())
                .unwrap();
            ring.push(
                i as u64,
                Sqe::Recv {
                    fd: ours.as_raw_fd(),
                    buf: Vec::with_capacity(64),
                },
            );
        }
        let mut done = collect(&mut ring, 8);
        done.sort_by_key(|cqe| cqe.user_data);
        for (i, cqe) in done.into_iter().enumerate() {
            assert_eq!(cqe.user_data, i as u64);
            assert_eq!(cqe.buf.unwrap(), format!("message {i}").as_bytes());
        }
    }

    #[test]
    fn pooled_recv_hands_over_a_pool_buffer() {
        let mut ring = Uring::with_bufs(8, 2).unwrap();
        conformance::pooled_recv_hands_over_a_pool_buffer(&mut ring);
    }

    #[test]
    fn pooled_recv_without_bytes_hands_over_nothing() {
        let mut ring = Uring::with_bufs(8, 2).unwrap();
        conformance::pooled_recv_without_bytes_hands_over_nothing(&mut ring);
    }

    #[test]
    fn many_polls_each_complete_once() {
        conformance::many_polls_each_complete_once(&mut Uring::new(8).unwrap());
    }

    #[test]
    fn a_socket_polls_again_after_each_poll() {
        conformance::a_socket_polls_again_after_each_poll(&mut Uring::new(8).unwrap());
    }

    #[test]
    fn poll_in_waits_and_reads_nothing() {
        let mut ring = Uring::new(8).unwrap();
        conformance::poll_in_waits_and_reads_nothing(&mut ring);
        assert_eq!((ring.slab.in_flight(), ring.slotless), (0, 0));
    }

    #[test]
    fn a_burst_larger_than_the_buffer_ring_waits_for_buffers() {
        let mut ring = Uring::with_bufs(32, 2).unwrap();
        let starved = conformance::a_burst_of_pooled_reads_all_complete(&mut ring, 9);
        assert!(starved > 0, "no read found the ring empty");
        assert_eq!((ring.slab.in_flight(), ring.slotless), (0, 0));
    }

    #[test]
    fn a_multishot_read_completes_once_per_read_until_cancelled() {
        let mut ring = Uring::new(8).unwrap();
        assert!(ring.multishot(), "this kernel has READ_MULTISHOT (6.7)");
        let (mut peer, ours) = pair();
        ring.push(
            4,
            Sqe::RecvMulti {
                fd: ours.as_raw_fd(),
            },
        );
        quiet(&mut ring, Duration::from_millis(20));
        for word in [&b"one"[..], b"two", b"three"] {
            peer.write_all(word).unwrap();
            let cqe = one(&mut ring);
            assert_eq!((cqe.user_data, cqe.more), (4, true));
            assert_eq!(cqe.buf.as_deref(), Some(word));
            ring.recycle(cqe.buf.unwrap());
        }
        assert_eq!(ring.slotless, 1, "still armed");
        conformance::cancel(&mut ring, 4, true);
        let cqe = one(&mut ring);
        assert_eq!((cqe.result, cqe.more), (-libc::ECANCELED, false));
        assert!(cqe.buf.is_none());
        assert_eq!((ring.slab.in_flight(), ring.slotless), (0, 0));
    }

    #[test]
    fn a_multishot_read_ends_with_the_stream() {
        let mut ring = Uring::new(8).unwrap();
        let (mut peer, ours) = pair();
        ring.push(
            4,
            Sqe::RecvMulti {
                fd: ours.as_raw_fd(),
            },
        );
        peer.write_all(b"last").unwrap();
        drop(peer);
        let done = collect_until_final(&mut ring);
        let bytes: Vec<u8> = done
            .iter()
            .flat_map(|c| c.buf.clone().unwrap_or_default())
            .collect();
        assert_eq!(bytes, b"last");
        let last = done.last().unwrap();
        assert_eq!((last.result, last.more), (0, false));
        assert_eq!(ring.slotless, 0);
    }

    #[test]
    fn a_multishot_read_ends_when_the_ring_runs_out_of_buffers() {
        // Two ring buffers and three sockets with bytes at once: one read finds none, and its
        // multishot read ends there; the others go on.
        let mut ring = Uring::with_bufs(8, 2).unwrap();
        let pairs: Vec<(TcpStream, OwnedFd)> = (0..3).map(|_| pair()).collect();
        for (i, (_, ours)) in pairs.iter().enumerate() {
            ring.push(
                i as u64,
                Sqe::RecvMulti {
                    fd: ours.as_raw_fd(),
                },
            );
        }
        quiet(&mut ring, Duration::from_millis(20));
        for (peer, _) in &pairs {
            (&*peer).write_all(b"x").unwrap();
        }
        std::thread::sleep(Duration::from_millis(20));
        let done = collect(&mut ring, 3);
        let starved: Vec<&Cqe> = done.iter().filter(|c| !c.more).collect();
        assert_eq!(starved.len(), 1, "{done:?}");
        assert_eq!(starved[0].result, -libc::ENOBUFS);
        assert_eq!(ring.slotless, 2);
    }

    #[test]
    fn a_capped_ring_reads_at_most_its_cap() {
        let mut ring = Uring::with_read_cap(8, 4, 5).unwrap();
        let (mut peer, ours) = pair();
        peer.write_all(b"0123456789ab").unwrap();
        std::thread::sleep(Duration::from_millis(20));
        ring.push(
            4,
            Sqe::RecvMulti {
                fd: ours.as_raw_fd(),
            },
        );
        let mut got = Vec::new();
        let start = Instant::now();
        while got.len() < 12 {
            assert!(start.elapsed() < Duration::from_secs(5), "{got:?}");
            let mut out = Vec::new();
            ring.wait(Some(Duration::from_millis(100)), &mut out)
                .unwrap();
            for cqe in out {
                let buf = cqe.buf.unwrap();
                assert!(buf.len() <= 5, "{} bytes", buf.len());
                got.extend_from_slice(&buf);
                ring.recycle(buf);
            }
        }
        assert_eq!(got, b"0123456789ab");
    }

    #[test]
    fn single_shot_runs_a_multishot_read_as_one_read() {
        let mut ring = Uring::new(8).unwrap().single_shot();
        let (mut peer, ours) = pair();
        ring.push(
            4,
            Sqe::RecvMulti {
                fd: ours.as_raw_fd(),
            },
        );
        peer.write_all(b"once").unwrap();
        let cqe = one(&mut ring);
        assert_eq!((cqe.result, cqe.more), (4, false));
        assert_eq!(cqe.buf.as_deref(), Some(&b"once"[..]));
        assert_eq!(ring.slotless, 0);
    }

    /// Completions until one without `more`.
    fn collect_until_final(ring: &mut Uring) -> Vec<Cqe> {
        let mut out = Vec::new();
        let start = Instant::now();
        while out.last().is_none_or(|c: &Cqe| c.more) {
            assert!(start.elapsed() < Duration::from_secs(5), "{out:?}");
            ring.wait(Some(Duration::from_millis(100)), &mut out)
                .unwrap();
        }
        out
    }

    #[test]
    fn dropping_the_ring_cancels_what_is_in_flight() {
        let (_peer, ours) = pair();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut ring = Uring::new(8).unwrap();
        ring.push(
            1,
            Sqe::Accept {
                fd: listener.as_raw_fd(),
            },
        );
        ring.push(
            2,
            Sqe::Recv {
                fd: ours.as_raw_fd(),
                buf: Vec::with_capacity(16),
            },
        );
        // And a pooled read, which has no table slot: the drop waits for it all the same.
        let (_peer, pooled) = pair();
        ring.push(
            3,
            Sqe::RecvPooled {
                fd: pooled.as_raw_fd(),
                len: 64,
            },
        );
        quiet(&mut ring, Duration::ZERO);
        let start = Instant::now();
        drop(ring);
        // Under the grace period: every operation came back, none was leaked.
        assert!(
            start.elapsed() < DROP_GRACE,
            "drop waited {:?}",
            start.elapsed()
        );
    }
}
