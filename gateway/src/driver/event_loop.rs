//! One core's event loop: a slab of connection state machines, the sockets they own, their
//! deadlines, and the backend that runs their operations.
//!
//! Each turn waits once in the backend (for io_uring, one `io_uring_enter` that submits what the
//! last turn queued and waits for completions), hands every completion to its connection, then
//! fires the deadlines that passed. A machine queues its next operation while it handles the
//! last one's completion, so read → forward → write → read costs one kernel entry per turn,
//! not one loop turn per step.
//!
//! An operation's `user_data` names its slot, the slot's generation and the operation (which
//! leg, which kind): a slot is reused only once every operation of its previous connection has
//! completed, so a completion always finds the connection that asked for it.
//!
//! Where the backend keeps multishot reads armed (io_uring on 6.7 and later), a socket's pooled
//! reads are all served from one (`stream.rs` decides each step): bytes that come while its
//! machine is not reading wait in the loop's stash, in order, and stop the read until it reads.
//!
//! On io_uring a sweep every `park_reads_after` parks the pooled reads it finds waiting for the
//! second time: each waits as a poll, which holds less kernel memory, until bytes come
//! (`park.rs` and `stream.rs` decide each step; the machines never see it).
#![forbid(unsafe_code)]

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::io::{self, Write};
use std::net::{Shutdown, SocketAddr, TcpListener};
use std::num::NonZeroU64;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use codec::CloseCode;

use crate::config::reload::Shared;
use crate::conn::{Conn, CoreCtx, Event, Io, OpKind};
use crate::driver::park::{Next, Park};
use crate::driver::stream::{Act, Served, Stream};
use crate::driver::{Backend, Cqe, POOL_BUF, Sqe};
use crate::relay::lifecycle::Side;

/// The slot of operations the loop runs for itself (accepts, the drain signal).
const LOOP_SLOT: u32 = u32::MAX;
/// Slot generations wrap within the 24 bits `user_data` keeps of them.
const GEN_MASK: u32 = 0x00FF_FFFF;

/// A connection's operations, one bit each in [`Slot::inflight`] and the low byte of `user_data`.
const CLIENT_RECV: u8 = 1;
const CLIENT_SEND: u8 = 1 << 1;
const BACKEND_RECV: u8 = 1 << 2;
const BACKEND_SEND: u8 = 1 << 3;
const CONNECT: u8 = 1 << 4;
/// The loop's own operations (in [`LOOP_SLOT`]; an accept's generation field is its listener).
const WAKE: u8 = 1;
const ACCEPT: u8 = 2;

/// After an accept fails (the descriptor limit), how long before accepting again.
const ACCEPT_RETRY: Duration = Duration::from_millis(10);

/// The longest a finished socket's teardown waits for the loop to be idle (see
/// [`EventLoop::tear_down`]); an idle loop does it sooner.
const TEARDOWN_DELAY: Duration = Duration::from_millis(1);

/// Asks `backend` to cancel the pooled read, multishot read or poll under `target` (which
/// then completes under its own user data).
fn cancel_pooled<B: Backend>(backend: &mut B, target: u64) {
    backend.push(
        u64::MAX,
        Sqe::Cancel {
            target,
            slotless: true,
        },
    );
}

fn user_data(slot: u32, generation: u32, op: u8) -> u64 {
    (u64::from(slot) << 32) | (u64::from(generation & GEN_MASK) << 8) | u64::from(op)
}

fn split(user_data: u64) -> (u32, u32, u8) {
    (
        (user_data >> 32) as u32,
        ((user_data >> 8) as u32) & GEN_MASK,
        user_data as u8,
    )
}

/// The operation bit for `side`'s `kind`.
fn op_bit(side: Side, kind: OpKind) -> u8 {
    match (side, kind) {
        (Side::Client, OpKind::Recv) => CLIENT_RECV,
        (Side::Client, OpKind::Send) => CLIENT_SEND,
        (Side::Backend, OpKind::Recv) => BACKEND_RECV,
        (Side::Backend, OpKind::Send) => BACKEND_SEND,
        (_, OpKind::Connect) => CONNECT,
    }
}

/// Index of `side` in [`Slot::parks`] and [`Slot::streams`].
fn side_ix(side: Side) -> usize {
    match side {
        Side::Client => 0,
        Side::Backend => 1,
    }
}

/// [`Slot::teardown`]: a read of the side's socket returned end of stream (the peer's FIN,
/// or our own shutdown).
const PEER_DONE: u8 = 1;
/// [`Slot::teardown`]: the side's shutdown waits for the teardowns ([`EventLoop::tear_down`]).
const SHUT_LATER: u8 = 1 << 2;
/// [`Slot::teardown`]: the side's last write was sent with `MSG_MORE`, so its bytes wait for
/// the shutdown that follows: that one never waits.
const MORE_SENT: u8 = 1 << 4;

/// `side`'s bits of the [`Slot::teardown`] flags `flag` (one or more, or-ed).
fn bit(flag: u8, side: Side) -> u8 {
    flag << side_ix(side)
}

/// Every operation bit of `side`'s socket.
fn side_ops(side: Side) -> u8 {
    match side {
        Side::Client => CLIENT_RECV | CLIENT_SEND,
        Side::Backend => BACKEND_RECV | BACKEND_SEND | CONNECT,
    }
}

/// A deadline in whole milliseconds since the loop's epoch, rounded up so that none fires
/// early: 8 bytes in a slot and 16 in a timer entry, where an `Instant` takes 16 and 24.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Tick(NonZeroU64);

impl Tick {
    /// The first tick at or after `at`.
    fn at(epoch: Instant, at: Instant) -> Self {
        let ms = at
            .saturating_duration_since(epoch)
            .as_nanos()
            .div_ceil(1_000_000);
        Self(NonZeroU64::MIN.saturating_add(u64::try_from(ms).unwrap_or(u64::MAX)))
    }

    /// When the tick is.
    fn instant(self, epoch: Instant) -> Instant {
        epoch + Duration::from_millis(self.0.get() - 1)
    }
}

/// The timer heap: (when, slot, generation), earliest first.
type Timers = BinaryHeap<Reverse<(Tick, u32, u32)>>;

/// A completion's result as the machines see it.
fn to_result(result: i32) -> io::Result<usize> {
    usize::try_from(result).map_err(|_| io::Error::from_raw_os_error(-result))
}

/// The soft descriptor limit, read from /proc once (no unsafe getrlimit needed) and kept:
/// when it is reached, opening /proc/self/limits fails too.
pub(crate) fn nofile_limit() -> &'static str {
    static LIMIT: OnceLock<String> = OnceLock::new();
    LIMIT.get_or_init(|| {
        std::fs::read_to_string("/proc/self/limits")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("Max open files"))
                    .and_then(|l| l.split_whitespace().nth(3).map(str::to_owned))
            })
            .unwrap_or_else(|| "unreadable".to_owned())
    })
}

/// Tells a core's loop to drain, from the control plane's thread: the close code, then a byte
/// on a socket the loop always has a read pending on, so the loop never polls for it.
pub(crate) struct DrainSender {
    code: Arc<AtomicU16>,
    tx: UnixStream,
}

/// The loop's end of [`DrainSender`].
pub(crate) struct DrainReceiver {
    code: Arc<AtomicU16>,
    rx: UnixStream,
}

/// A connected pair of drain ends.
pub(crate) fn drain_channel() -> io::Result<(DrainSender, DrainReceiver)> {
    let (tx, rx) = UnixStream::pair()?;
    rx.set_nonblocking(true)?;
    let code = Arc::new(AtomicU16::new(0));
    Ok((
        DrainSender {
            code: Arc::clone(&code),
            tx,
        },
        DrainReceiver { code, rx },
    ))
}

impl DrainSender {
    /// Asks the loop to close its connections with `code` and stop.
    pub(crate) fn send(&self, code: CloseCode) {
        self.code.store(code.get(), Ordering::Release);
        // A full socket already holds a wake-up; a gone loop needs none.
        drop((&self.tx).write(&[1]));
    }
}

/// What a core's loop is started with.
pub(crate) struct LoopArgs {
    /// The core's number, for logs and metrics.
    pub(crate) index: usize,
    /// This core's `SO_REUSEPORT` listening sockets.
    pub(crate) listeners: Vec<TcpListener>,
    /// Process-wide state.
    pub(crate) shared: Arc<Shared>,
    /// Where the drain signal arrives.
    pub(crate) drain: DrainReceiver,
    /// How long connections get to close once the drain begins.
    pub(crate) drain_timeout: Duration,
    /// How long a pooled read waits before it is parked behind a poll (see `park.rs`);
    /// `None`: never.
    pub(crate) park_reads_after: Option<Duration>,
    /// Connections to reserve the slot table, free list and timer heap for. Grown by
    /// doubling instead, they would leave each old copy behind, resident: about 85 bytes per
    /// connection at 9,900 held (`scripts/measure-idle-memory`). Reserved is address space,
    /// resident only as slots are used; more connections than this still fit.
    pub(crate) reserve: usize,
}

/// One connection's place in the loop.
#[derive(Default)]
struct Slot {
    /// Bumped when the slot is freed, so late news for an old connection cannot reach a new one.
    generation: u32,
    /// The machine; `None` once it ended (its operations may still be completing) or when free.
    conn: Option<Conn>,
    /// The client's socket.
    client: Option<OwnedFd>,
    /// The backend's socket, once the machine asked for one.
    backend: Option<OwnedFd>,
    /// Operations in flight, one bit each.
    inflight: u8,
    /// Each side's pooled read, by [`side_ix`], as parking sees it.
    parks: [Park; 2],
    /// Each side's multishot read, by [`side_ix`], where the backend has them: all of the
    /// side's reads are served from it while it is active (see `stream.rs`).
    streams: [Stream; 2],
    /// The earliest deadline the machine asked for and has not been woken for.
    deadline: Option<Tick>,
    /// Where each side's teardown stands: [`PEER_DONE`], [`SHUT_LATER`] and [`MORE_SENT`],
    /// one bit per side each ([`bit`]).
    teardown: u8,
}

impl Slot {
    /// `side`'s socket, if it has one.
    fn fd(&self, side: Side) -> Option<&OwnedFd> {
        match side {
            Side::Client => self.client.as_ref(),
            Side::Backend => self.backend.as_ref(),
        }
    }

    /// Shuts `side`'s socket down now, which settles a shutdown left for later and the FIN a
    /// `MSG_MORE` write waits for.
    fn shut(&mut self, side: Side, how: Shutdown) {
        self.teardown &= !bit(SHUT_LATER | MORE_SENT, side);
        if let Some(fd) = self.fd(side) {
            drop(socket2::SockRef::from(fd).shutdown(how));
        }
    }
}

/// One core's loop over backend `B`.
pub(crate) struct EventLoop<B: Backend> {
    backend: B,
    ctx: CoreCtx,
    index: usize,
    slots: Vec<Slot>,
    free: Vec<u32>,
    /// Deadlines by time: (when, slot, generation). Entries a slot no longer waits for are
    /// skipped when they come up.
    timers: Timers,
    /// What [`Tick`]s count from.
    epoch: Instant,
    /// Connections with a slot (including those whose last operations are completing).
    live: usize,
    listeners: Vec<TcpListener>,
    /// Listeners whose accept ended on an error and waits for [`EventLoop::accept_retry`].
    accept_paused: Vec<usize>,
    accept_retry: Option<Instant>,
    last_accept_warning: Option<Instant>,
    drain: DrainReceiver,
    drain_timeout: Duration,
    drain_deadline: Option<Instant>,
    /// How long a pooled read waits before it is parked.
    park_reads_after: Option<Duration>,
    /// When the next sweep ages waiting reads and parks those it saw waiting before.
    next_sweep: Option<Instant>,
    /// Completions the loop makes itself (an operation on a socket that does not exist).
    synthetic: Vec<Cqe>,
    /// The backend keeps multishot reads armed: pooled reads are served from them.
    multishot: bool,
    /// Completions of multishot reads that came while their machine was not reading, by the
    /// read's user data, in order (see `stream.rs`: at most a few per read, since the first
    /// one stops the read).
    stash: HashMap<u64, VecDeque<Cqe>>,
    /// Machines' own buffers for reads served from a multishot read, by user data: its bytes
    /// are appended to them (only a frame left incomplete is copied this way).
    held: HashMap<u64, Vec<u8>>,
    /// Reads (user data) served from the stash, or cancelled, at the next turn.
    serve: Vec<u64>,
    /// Slots (index, generation) with a shutdown waiting for the teardowns.
    shut_later: Vec<(u32, u32)>,
    /// Sockets of freed slots, closed with the teardowns.
    closing: Vec<OwnedFd>,
    /// Reads (slot, generation, side) that ended machines left armed, cancelled with the
    /// teardowns: cancelled in the turn that ended the machine, the cancel would complete at
    /// once and cut short the wait that lets a peer on the same CPU read that turn's last
    /// write.
    cancel_later: Vec<(u32, u32, Side)>,
    /// When the teardowns waiting ([`EventLoop::tear_down`]) are done even if the loop is
    /// never idle: [`TEARDOWN_DELAY`] after the first of them.
    teardown_at: Option<Instant>,
    now: Instant,
}

impl<B: Backend> EventLoop<B> {
    /// A loop over `backend` serving `args`' listeners.
    pub(crate) fn new(backend: B, args: LoopArgs) -> Self {
        let LoopArgs {
            index,
            listeners,
            shared,
            drain,
            drain_timeout,
            park_reads_after,
            reserve,
        } = args;
        let now = Instant::now();
        let multishot = backend.multishot();
        Self {
            backend,
            ctx: CoreCtx {
                metrics: shared.metrics.core(index),
                shared,
                cursor: std::cell::Cell::new(index),
                draining: std::cell::Cell::new(None),
            },
            index,
            slots: Vec::with_capacity(reserve),
            free: Vec::with_capacity(reserve),
            timers: BinaryHeap::with_capacity(reserve),
            epoch: now,
            live: 0,
            listeners,
            accept_paused: Vec::new(),
            accept_retry: None,
            last_accept_warning: None,
            drain,
            drain_timeout,
            drain_deadline: None,
            park_reads_after,
            next_sweep: park_reads_after.map(|d| now + d),
            synthetic: Vec::new(),
            multishot,
            stash: HashMap::new(),
            held: HashMap::new(),
            serve: Vec::new(),
            shut_later: Vec::new(),
            closing: Vec::new(),
            cancel_later: Vec::new(),
            teardown_at: None,
            now,
        }
    }

    /// Serves until a drain completes or times out.
    pub(crate) fn run(mut self) {
        for index in 0..self.listeners.len() {
            self.arm_accept(index);
        }
        self.arm_drain(Vec::with_capacity(8));
        let mut cqes = Vec::with_capacity(256);
        loop {
            let timeout = self.next_timeout();
            if let Err(e) = self.backend.wait(timeout, &mut cqes) {
                tracing::error!(core = self.index, why = %e, "event loop wait failed");
                std::thread::sleep(ACCEPT_RETRY);
            }
            self.now = Instant::now();
            // Idle: the wait found nothing to do (it timed out), so no peer on this CPU is
            // waiting for this loop to yield.
            let idle = cqes.is_empty() && self.synthetic.is_empty() && self.serve.is_empty();
            if idle || self.teardown_at.is_some_and(|at| self.now >= at) {
                self.tear_down();
            }
            cqes.append(&mut self.synthetic);
            for cqe in cqes.drain(..) {
                self.complete(cqe);
            }
            self.serve_reads();
            self.fire_timers();
            if self.teardown_at.is_none()
                && !(self.shut_later.is_empty()
                    && self.closing.is_empty()
                    && self.cancel_later.is_empty())
            {
                self.teardown_at = Some(self.now + TEARDOWN_DELAY);
            }
            if let Some(deadline) = self.drain_deadline {
                let timed_out = self.now >= deadline;
                if self.live == 0 || timed_out {
                    self.tear_down();
                    tracing::info!(core = self.index, left = self.live, timed_out, "drained");
                    return;
                }
            }
        }
    }

    /// How long the next wait may last: until the earliest deadline, the teardowns' among
    /// them.
    fn next_timeout(&self) -> Option<Duration> {
        if !self.synthetic.is_empty() || !self.serve.is_empty() {
            return Some(Duration::ZERO);
        }
        let timer = self
            .timers
            .peek()
            .map(|Reverse((at, ..))| at.instant(self.epoch));
        [
            timer,
            self.accept_retry,
            self.drain_deadline,
            self.next_sweep,
            self.teardown_at,
        ]
        .into_iter()
        .flatten()
        .min()
        .map(|at| at.saturating_duration_since(Instant::now()))
    }

    /// Finishes the teardowns earlier turns left, once a wait found the loop idle or
    /// [`TEARDOWN_DELAY`] after the first: the shutdowns of sockets whose peer had ended its
    /// stream, the closes of freed slots' sockets, and the cancels of reads ended machines
    /// left armed.
    ///
    /// None is owed to anyone waiting: such a peer sent its FIN and only waits for ours
    /// to leave (its `TIME_WAIT`), the loop never closes a socket the other peer still
    /// waits on (that socket's shutdown went at once), and an abandoned read ends by itself
    /// with its peer's FIN. Sending that FIN, on loopback, runs the peer's side of the TCP
    /// teardown in the sender's time (about 14 µs, measured), each close about 4 µs more, and
    /// a cancel completes at once and so turns the loop again without a wait. Done in the
    /// turn that wrote a close reply, or in the next one when its wait returned at once (with
    /// the completion of a write made in that turn), all of it would run before a client on
    /// the same CPU could read the reply; once a wait has found nothing to do, the client has
    /// read it.
    fn tear_down(&mut self) {
        self.teardown_at = None;
        for (index, generation) in self.shut_later.drain(..) {
            let slot = &mut self.slots[index as usize];
            if slot.generation != generation {
                continue;
            }
            for side in [Side::Client, Side::Backend] {
                if slot.teardown & bit(SHUT_LATER, side) != 0 {
                    slot.shut(side, Shutdown::Both);
                }
            }
        }
        for fd in self.closing.drain(..) {
            self.backend.close(fd);
        }
        for (index, generation, side) in self.cancel_later.drain(..) {
            let slot = &self.slots[index as usize];
            // Not if the read ended meanwhile (and the slot was freed, or taken again).
            if slot.generation == generation && slot.streams[side_ix(side)].in_kernel() {
                let target = user_data(index, generation, op_bit(side, OpKind::Recv));
                cancel_pooled(&mut self.backend, target);
            }
        }
    }

    fn arm_accept(&mut self, listener: usize) {
        let fd = self.listeners[listener].as_raw_fd();
        self.backend.push(
            user_data(LOOP_SLOT, listener as u32, ACCEPT),
            Sqe::Accept { fd },
        );
    }

    fn arm_drain(&mut self, buf: Vec<u8>) {
        let fd = self.drain.rx.as_raw_fd();
        self.backend
            .push(user_data(LOOP_SLOT, 0, WAKE), Sqe::Recv { fd, buf });
    }

    fn complete(&mut self, cqe: Cqe) {
        let (slot, generation, op) = split(cqe.user_data);
        if slot == LOOP_SLOT {
            match op {
                ACCEPT => self.accepted(generation as usize, cqe),
                WAKE => self.woken(cqe),
                _ => {}
            }
            return;
        }
        let Some(s) = self.slots.get_mut(slot as usize) else {
            return;
        };
        if s.generation & GEN_MASK != generation || s.inflight & op == 0 {
            // Cannot happen: a slot is reused only once nothing of its connection is in flight.
            debug_assert!(false, "completion for a finished operation: {cqe:?}");
            return;
        }
        let side = if op & (CLIENT_RECV | CLIENT_SEND) != 0 {
            Side::Client
        } else {
            Side::Backend
        };
        let mut cqe = cqe;
        if op & (CLIENT_RECV | BACKEND_RECV) != 0 && s.streams[side_ix(side)].in_kernel() {
            return self.stream_completed(slot, side, op, cqe);
        }
        if op & (CLIENT_RECV | BACKEND_RECV) != 0 {
            let i = side_ix(side);
            let fd = s.fd(side).map(AsRawFd::as_raw_fd);
            let next = s.parks[i].complete(cqe.result);
            let sqe = match (next, fd) {
                (Next::Deliver, _) => None,
                (Next::Cancelled, _) => {
                    cqe.result = -libc::ECANCELED;
                    None
                }
                // The read found every buffer in use (the backend refills them before its next
                // submission), or waited long and was parked: it goes again, at most a pool
                // buffer (what a multishot read takes, too).
                (Next::Read, Some(fd)) => {
                    if cqe.result == -libc::ENOBUFS {
                        self.ctx.metrics.read_buffer_wait();
                    }
                    let len = u32::try_from(POOL_BUF).unwrap_or(u32::MAX);
                    Some(Sqe::RecvPooled { fd, len })
                }
                (Next::Poll, Some(fd)) => {
                    self.ctx.metrics.read_parked();
                    Some(Sqe::PollIn { fd })
                }
                // Cannot happen (a socket is kept while its read is in flight): end the read.
                (Next::Read | Next::Poll, None) => {
                    s.parks[i] = Park::default();
                    cqe.result = -libc::EBADF;
                    None
                }
            };
            if let Some(sqe) = sqe {
                self.backend.push(cqe.user_data, sqe);
                return;
            }
        }
        s.inflight &= !op;
        self.hand_over(slot, side, op, cqe);
    }

    /// Hands slot `index`'s machine the completion of its `op` on `side`, whose in-flight bit
    /// the caller has settled: a read's bytes go after those of the machine's own buffer, if
    /// the loop holds one for it.
    fn hand_over(&mut self, index: u32, side: Side, op: u8, cqe: Cqe) {
        let result = to_result(cqe.result);
        let event = if op & (CLIENT_RECV | BACKEND_RECV) != 0 {
            if cqe.result == 0 {
                self.slots[index as usize].teardown |= bit(PEER_DONE, side);
            }
            // Almost always empty: skip hashing on every read.
            let held = if self.held.is_empty() {
                None
            } else {
                self.held.remove(&cqe.user_data)
            };
            let buf = match (held, cqe.buf) {
                (Some(mut mine), Some(read)) => {
                    mine.extend_from_slice(&read);
                    self.backend.recycle(read);
                    mine
                }
                (Some(mine), None) => mine,
                (None, buf) => buf.unwrap_or_default(),
            };
            Event::Received { side, buf, result }
        } else if op & (CLIENT_SEND | BACKEND_SEND) != 0 {
            let buf = cqe.buf.unwrap_or_default();
            Event::Sent { side, buf, result }
        } else {
            Event::Connected(result.map(drop))
        };
        self.deliver(index, event);
    }

    /// A completion of slot `index`'s multishot read on `side` (or of the poll it is parked
    /// behind): does what its [`Stream`] says.
    fn stream_completed(&mut self, index: u32, side: Side, op: u8, mut cqe: Cqe) {
        let s = &mut self.slots[index as usize];
        let stream = &mut s.streams[side_ix(side)];
        let act = stream.complete(cqe.result, cqe.more);
        let busy = stream.busy();
        let fd = s.fd(side).map(AsRawFd::as_raw_fd);
        if !busy {
            s.inflight &= !op;
        }
        match act {
            Act::Arm | Act::Poll => {
                if cqe.result == -libc::ENOBUFS {
                    self.ctx.metrics.read_buffer_wait();
                }
                let sqe = match (act, fd) {
                    (Act::Arm, Some(fd)) => Sqe::RecvMulti { fd },
                    (_, Some(fd)) => {
                        self.ctx.metrics.read_parked();
                        Sqe::PollIn { fd }
                    }
                    // Cannot happen (a socket is kept while its read is armed): the read ends.
                    (_, None) => {
                        cqe.result = -libc::EBADF;
                        cqe.more = false;
                        self.synthetic.push(cqe);
                        return;
                    }
                };
                if let Some(buf) = cqe.buf.take() {
                    self.backend.recycle(buf);
                }
                self.backend.push(cqe.user_data, sqe);
            }
            Act::Deliver => self.hand_over(index, side, op, cqe),
            Act::Stash | Act::StashAndCancel => {
                let target = cqe.user_data;
                self.stash.entry(target).or_default().push_back(cqe);
                if act == Act::StashAndCancel {
                    // The machine is not reading: stop the bytes until it does.
                    cancel_pooled(&mut self.backend, target);
                }
            }
            Act::Drop | Act::Wait | Act::Serve => {
                if let Some(buf) = cqe.buf {
                    self.backend.recycle(buf);
                }
                if !busy {
                    self.maybe_free(index);
                }
            }
        }
    }

    /// Serves the reads that [`Stream`]s asked for at this turn: from the stash, or cancelled.
    fn serve_reads(&mut self) {
        for data in std::mem::take(&mut self.serve) {
            let (index, generation, op) = split(data);
            let Some(s) = self.slots.get_mut(index as usize) else {
                continue;
            };
            if s.generation & GEN_MASK != generation || s.conn.is_none() {
                continue;
            }
            let side = if op == CLIENT_RECV {
                Side::Client
            } else {
                Side::Backend
            };
            let stream = &mut s.streams[side_ix(side)];
            let queued = self.stash.get(&data).map_or(0, VecDeque::len);
            let cqe = match stream.serve(queued) {
                Served::Nothing => continue,
                Served::Cancelled => Cqe {
                    user_data: data,
                    result: -libc::ECANCELED,
                    buf: None,
                    accepted: None,
                    more: false,
                },
                Served::Stashed { last } => {
                    let Some(cqe) = self.stash.get_mut(&data).and_then(VecDeque::pop_front) else {
                        continue;
                    };
                    if last {
                        self.stash.remove(&data);
                    }
                    cqe
                }
            };
            if !stream.busy() {
                s.inflight &= !op;
            }
            self.hand_over(index, side, op, cqe);
        }
    }

    /// Hands `event` to slot `index`'s machine and frees the slot once it ended and nothing
    /// of it is in flight.
    fn deliver(&mut self, index: u32, event: Event) {
        let slot = &mut self.slots[index as usize];
        let Some(conn) = slot.conn.take() else {
            // Ended already: this was one of its last operations completing.
            self.maybe_free(index);
            return;
        };
        self.run_machine(index, |ctx, io| conn.on_event(event, ctx, io));
    }

    /// Runs `step` on slot `index` with the loop as the machine's [`Io`], then settles the
    /// slot with the machine's next state.
    fn run_machine(
        &mut self,
        index: u32,
        step: impl FnOnce(&CoreCtx, &mut dyn Io) -> Option<Conn>,
    ) {
        let mut io = SlotIo {
            backend: &mut self.backend,
            timers: &mut self.timers,
            epoch: self.epoch,
            synthetic: &mut self.synthetic,
            multishot: self.multishot,
            held: &mut self.held,
            serve: &mut self.serve,
            shut_later: &mut self.shut_later,
            slot: &mut self.slots[index as usize],
            index,
            now: self.now,
        };
        let next = step(&self.ctx, &mut io);
        self.settle(index, next);
    }

    /// Stores the machine's next state; frees the slot if it ended.
    fn settle(&mut self, index: u32, next: Option<Conn>) {
        let slot = &mut self.slots[index as usize];
        if next.is_none() {
            // A multishot read outlives the machine's last read: stop it (with the teardowns,
            // see `cancel_later`), and free the slot once it has ended.
            for side in [Side::Client, Side::Backend] {
                let stream = &mut slot.streams[side_ix(side)];
                if stream.in_kernel() && !stream.wants() {
                    let (_, cancel) = stream.abandon();
                    if cancel {
                        self.cancel_later.push((index, slot.generation, side));
                    }
                }
            }
        }
        // What only the reads stopped above still hold.
        let stopping = [Side::Client, Side::Backend]
            .into_iter()
            .filter(|&side| {
                let stream = slot.streams[side_ix(side)];
                stream.in_kernel() && !stream.wants()
            })
            .fold(0, |bits, side| bits | op_bit(side, OpKind::Recv));
        if next.is_none() && slot.inflight & !stopping != 0 {
            // The machines' contract says this never happens; if it did, the slot waits for
            // the operations rather than free buffers the kernel may still use.
            tracing::error!(
                core = self.index,
                inflight = slot.inflight,
                "connection ended with operations in flight"
            );
        }
        slot.conn = next;
        self.maybe_free(index);
    }

    fn maybe_free(&mut self, index: u32) {
        let slot = &mut self.slots[index as usize];
        if slot.conn.is_some() || slot.inflight != 0 || slot.client.is_none() {
            return;
        }
        // Closing also sends a FIN still owed (`SHUT_LATER`).
        self.closing.extend(
            [slot.client.take(), slot.backend.take()]
                .into_iter()
                .flatten(),
        );
        if slot.streams != [Stream::default(); 2] {
            // Bytes that came after the machine's last read, and its stream's last state.
            slot.streams = [Stream::default(); 2];
            for op in [CLIENT_RECV, BACKEND_RECV] {
                let data = user_data(index, slot.generation, op);
                for cqe in self.stash.remove(&data).into_iter().flatten() {
                    if let Some(buf) = cqe.buf {
                        self.backend.recycle(buf);
                    }
                }
                self.held.remove(&data);
            }
        }
        slot.generation = slot.generation.wrapping_add(1);
        slot.deadline = None;
        slot.teardown = 0;
        self.free.push(index);
        self.live -= 1;
        self.ctx.metrics.connection_closed();
    }

    fn fire_timers(&mut self) {
        if let (Some(at), Some(every)) = (self.next_sweep, self.park_reads_after)
            && at <= self.now
        {
            self.sweep();
            self.next_sweep = Some(self.now + every);
        }
        if self.accept_retry.is_some_and(|at| at <= self.now) {
            self.accept_retry = None;
            if self.drain_deadline.is_none() {
                for listener in std::mem::take(&mut self.accept_paused) {
                    self.arm_accept(listener);
                }
            }
        }
        while let Some(&Reverse((at, index, generation))) = self.timers.peek() {
            if at.instant(self.epoch) > self.now {
                break;
            }
            self.timers.pop();
            let slot = &mut self.slots[index as usize];
            if slot.generation != generation || slot.deadline != Some(at) {
                continue;
            }
            slot.deadline = None;
            self.deliver(index, Event::Timer);
        }
    }

    /// Ages every waiting pooled read, and parks those the last sweep saw waiting already:
    /// each is cancelled, to wait as a poll (see `park.rs`). One pass over the slots per
    /// `park_reads_after`.
    fn sweep(&mut self) {
        for (index, slot) in self.slots.iter_mut().enumerate() {
            if slot.inflight & (CLIENT_RECV | BACKEND_RECV) == 0 {
                continue;
            }
            for side in [Side::Client, Side::Backend] {
                let op = op_bit(side, OpKind::Recv);
                let i = side_ix(side);
                if slot.inflight & op == 0 {
                    continue;
                }
                let park = if slot.streams[i].in_kernel() {
                    slot.streams[i].sweep()
                } else {
                    slot.parks[i].sweep()
                };
                if park {
                    let target = user_data(index as u32, slot.generation, op);
                    cancel_pooled(&mut self.backend, target);
                }
            }
        }
    }

    fn accepted(&mut self, listener: usize, cqe: Cqe) {
        if !cqe.more && self.drain_deadline.is_none() {
            if cqe.result < 0 {
                // EMFILE/ENFILE: the descriptor limit is reached. Say so (once a second at
                // most), back off briefly, and keep serving the connections we have.
                if self
                    .last_accept_warning
                    .is_none_or(|t| t.elapsed() > Duration::from_secs(1))
                {
                    let e = io::Error::from_raw_os_error(-cqe.result);
                    let limit = nofile_limit();
                    tracing::warn!(why = %e, nofile_limit = limit, "accept failed");
                    self.last_accept_warning = Some(self.now);
                }
                self.accept_paused.push(listener);
                self.accept_retry = Some(self.now + ACCEPT_RETRY);
            } else {
                self.arm_accept(listener);
            }
        }
        let Some(fd) = cqe.accepted else {
            return;
        };
        let sock = socket2::SockRef::from(&fd);
        let Some(client) = sock.peer_addr().ok().and_then(|a| a.as_socket()) else {
            // Reset before we got to it.
            self.backend.close(fd);
            return;
        };
        // TCP_NODELAY came with the socket: the listener has it (`bind_reuseport`).
        self.open(fd, client);
    }

    /// Gives an accepted connection a slot and starts its machine.
    fn open(&mut self, fd: OwnedFd, client: SocketAddr) {
        let index = self.free.pop().unwrap_or_else(|| {
            self.slots.push(Slot::default());
            (self.slots.len() - 1) as u32
        });
        self.live += 1;
        self.ctx.metrics.connection_opened();
        self.slots[index as usize].client = Some(fd);
        self.run_machine(index, |ctx, io| Conn::start(client, ctx, io));
    }

    fn woken(&mut self, cqe: Cqe) {
        let mut buf = cqe.buf.unwrap_or_default();
        if cqe.result <= 0 {
            // The control thread is gone (or the socket failed): no drain can come.
            return;
        }
        buf.clear();
        self.arm_drain(buf);
        let code = self.drain.code.load(Ordering::Acquire);
        if code == 0 || self.drain_deadline.is_some() {
            return;
        }
        let code = CloseCode::new(code);
        self.ctx.draining.set(Some(code));
        self.drain_deadline = Some(self.now + self.drain_timeout);
        // Shutting the listeners down ends their accepts and stops the kernel queueing new
        // connections on this core.
        for listener in &self.listeners {
            drop(socket2::SockRef::from(listener).shutdown(Shutdown::Both));
        }
        tracing::info!(
            core = self.index,
            connections = self.live,
            close_code = code.get(),
            "draining"
        );
        for index in 0..self.slots.len() as u32 {
            if self.slots[index as usize].conn.is_some() {
                self.deliver(index, Event::Drain(code));
            }
        }
    }
}

/// A connection's view of the loop while it handles one event.
struct SlotIo<'a, B: Backend> {
    backend: &'a mut B,
    timers: &'a mut Timers,
    epoch: Instant,
    synthetic: &'a mut Vec<Cqe>,
    multishot: bool,
    held: &'a mut HashMap<u64, Vec<u8>>,
    serve: &'a mut Vec<u64>,
    shut_later: &'a mut Vec<(u32, u32)>,
    slot: &'a mut Slot,
    index: u32,
    now: Instant,
}

impl<B: Backend> SlotIo<'_, B> {
    /// Queues `sqe` as `op` of this slot, or completes it at once with EBADF when `side` has
    /// no socket (a machine bug, kept from reaching the kernel).
    fn push(&mut self, op: u8, side: Side, sqe: impl FnOnce(i32) -> Sqe) {
        debug_assert_eq!(
            self.slot.inflight & op,
            0,
            "one operation of a kind per leg"
        );
        self.push_op(op, side, sqe);
    }

    /// [`SlotIo::push`] without its check: a multishot read is armed again while its
    /// in-flight bit stays set.
    fn push_op(&mut self, op: u8, side: Side, sqe: impl FnOnce(i32) -> Sqe) {
        if self.slot.teardown & bit(SHUT_LATER, side) != 0 {
            // An operation on a socket shut down for later: it finds the socket shut, as the
            // machine expects.
            self.slot.shut(side, Shutdown::Both);
        }
        self.slot.inflight |= op;
        let data = user_data(self.index, self.slot.generation, op);
        if let Some(fd) = self.slot.fd(side).map(AsRawFd::as_raw_fd) {
            self.backend.push(data, sqe(fd));
        } else {
            let buf = match sqe(-1) {
                Sqe::Recv { buf, .. } | Sqe::Send { buf, .. } => Some(buf),
                _ => None,
            };
            self.synthetic.push(Cqe {
                user_data: data,
                result: -libc::EBADF,
                buf,
                accepted: None,
                more: false,
            });
        }
    }
}

impl<B: Backend> Io for SlotIo<'_, B> {
    fn now(&self) -> Instant {
        self.now
    }

    fn recv(&mut self, side: Side, mut buf: Vec<u8>, len: usize) {
        let op = op_bit(side, OpKind::Recv);
        let i = side_ix(side);
        if self.multishot && (buf.is_empty() || self.slot.streams[i].active()) {
            // Served from the side's multishot read: armed now if it is not yet.
            let data = user_data(self.index, self.slot.generation, op);
            if buf.is_empty() {
                self.backend.recycle(buf);
            } else {
                self.held.insert(data, buf);
            }
            self.slot.inflight |= op;
            match self.slot.streams[i].want() {
                Act::Arm => self.push_op(op, side, |fd| Sqe::RecvMulti { fd }),
                Act::Serve => self.serve.push(data),
                _ => {}
            }
            return;
        }
        if buf.is_empty() {
            // Nothing to append to: the read takes a pool buffer when bytes arrive.
            self.backend.recycle(buf);
            let len = u32::try_from(len).unwrap_or(u32::MAX);
            self.slot.parks[side_ix(side)] = Park::read();
            self.push(op, side, |fd| Sqe::RecvPooled { fd, len });
        } else {
            buf.reserve(len.max(1));
            self.slot.parks[side_ix(side)] = Park::default();
            self.push(op, side, |fd| Sqe::Recv { fd, buf });
        }
    }

    fn recycle(&mut self, buf: Vec<u8>) {
        self.backend.recycle(buf);
    }

    fn send(&mut self, side: Side, buf: Vec<u8>, start: usize, end: usize, fin_next: bool) {
        if fin_next {
            self.slot.teardown |= bit(MORE_SENT, side);
        }
        self.push(op_bit(side, OpKind::Send), side, |fd| Sqe::Send {
            fd,
            buf,
            start,
            end,
            more: fin_next,
        });
    }

    fn connect(&mut self, addr: SocketAddr) -> io::Result<()> {
        use socket2::{Domain, Protocol, Socket, Type};
        debug_assert_eq!(
            self.slot.inflight & (BACKEND_RECV | BACKEND_SEND | CONNECT),
            0,
            "the old backend socket is idle"
        );
        let socket = Socket::new(
            Domain::for_address(addr),
            Type::STREAM.nonblocking().cloexec(),
            Some(Protocol::TCP),
        )?;
        drop(socket.set_nodelay(true));
        if let Some(old) = self.slot.backend.take() {
            self.backend.close(old);
        }
        self.slot.teardown &= !bit(PEER_DONE | SHUT_LATER | MORE_SENT, Side::Backend);
        self.slot.backend = Some(socket.into());
        self.push(CONNECT, Side::Backend, |fd| Sqe::Connect {
            fd,
            addr: addr.into(),
        });
        Ok(())
    }

    fn cancel(&mut self, side: Side, kind: OpKind) {
        let op = op_bit(side, kind);
        let stream = &mut self.slot.streams[side_ix(side)];
        if kind == OpKind::Recv && stream.wants() {
            // A read served from a multishot read: it comes back cancelled at the next turn,
            // and the multishot read is stopped.
            let (_, cancel) = stream.abandon();
            let target = user_data(self.index, self.slot.generation, op);
            if cancel {
                cancel_pooled(self.backend, target);
            }
            self.serve.push(target);
            return;
        }
        // A parked read may have its own cancel on the way already, or none to cancel.
        let park = &mut self.slot.parks[side_ix(side)];
        let slotless = kind == OpKind::Recv && park.pooled();
        let ask = kind != OpKind::Recv || park.cancel();
        if self.slot.inflight & op != 0 && ask {
            let target = user_data(self.index, self.slot.generation, op);
            self.backend
                .push(u64::MAX, Sqe::Cancel { target, slotless });
        }
    }

    fn shutdown(&mut self, side: Side, how: Shutdown) {
        let t = self.slot.teardown;
        if how == Shutdown::Both
            && t & bit(PEER_DONE, side) != 0
            && t & bit(MORE_SENT, side) == 0
            && self.slot.inflight & side_ops(side) == 0
        {
            // The peer has ended its stream and nothing of ours waits on the socket: nobody
            // waits for this shutdown but the peer's `TIME_WAIT` (see `EventLoop::tear_down`).
            if t & (bit(SHUT_LATER, Side::Client) | bit(SHUT_LATER, Side::Backend)) == 0 {
                self.shut_later.push((self.index, self.slot.generation));
            }
            self.slot.teardown |= bit(SHUT_LATER, side);
            return;
        }
        self.slot.shut(side, how);
    }

    fn wake_at(&mut self, at: Instant) {
        let at = Tick::at(self.epoch, at);
        if self.slot.deadline.is_none_or(|d| at < d) {
            self.slot.deadline = Some(at);
            self.timers
                .push(Reverse((at, self.index, self.slot.generation)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_data_round_trips() {
        for (slot, generation, op) in [
            (0, 0, CLIENT_RECV),
            (7, GEN_MASK, CONNECT),
            (LOOP_SLOT, 3, ACCEPT),
        ] {
            assert_eq!(
                split(user_data(slot, generation, op)),
                (slot, generation, op)
            );
        }
        // Generations wrap within their bits.
        assert_eq!(split(user_data(1, GEN_MASK + 2, WAKE)).1, 1);
    }

    #[test]
    fn ticks_never_come_early() {
        let epoch = Instant::now();
        for ns in [0, 1, 999_999, 1_000_000, 1_000_001, 7_300_000_000] {
            let at = epoch + Duration::from_nanos(ns);
            let tick = Tick::at(epoch, at);
            assert!(tick.instant(epoch) >= at, "{ns} ns");
            assert!(
                tick.instant(epoch) < at + Duration::from_millis(1),
                "{ns} ns"
            );
        }
        // Before the epoch is the epoch.
        let early = Tick::at(epoch + Duration::from_secs(1), epoch);
        assert_eq!(
            early.instant(epoch + Duration::from_secs(1)),
            epoch + Duration::from_secs(1)
        );
    }

    #[test]
    fn a_slot_stays_small() {
        // One per connection, in a vector that grows by doubling.
        assert!(
            size_of::<Slot>() <= 48,
            "Slot is {} bytes",
            size_of::<Slot>()
        );
    }

    #[test]
    fn results_map_to_errors() {
        assert_eq!(to_result(5).unwrap(), 5);
        assert_eq!(
            to_result(-libc::ECONNRESET).unwrap_err().raw_os_error(),
            Some(libc::ECONNRESET)
        );
    }
}
