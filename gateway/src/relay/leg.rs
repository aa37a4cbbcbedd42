//! What the relay and the echo machines share: a peer's [`Leg`] (its operations in flight,
//! the gateway's own control frames to it, its keepalive and write-timeout stamps) and one
//! direction's [`Pump`] (its forwarder and its one buffer).
//!
//! A ping or a close never lands inside a frame: a control frame goes to a leg only while no
//! data write to it is in flight and its output stands at a frame boundary (`partial` false).
//! A close that must go to a leg stuck inside a frame becomes a FIN.
#![forbid(unsafe_code)]

use std::net::Shutdown;
use std::time::Instant;

use codec::CloseCode;
use codec::frame::{OpCode, write_frame};

use crate::conn::stamp::Stamp;
use crate::conn::{Io, MIN_READ};
use crate::metrics::{CloseDirection, CoreMetrics, Direction};
use crate::relay::forward::KEEPALIVE_PAYLOAD;
use crate::relay::forward::{ControlPayload, Forwarder, Step};
use crate::relay::keepalive::{Keepalive, Verdict, WriteTimeout};
use crate::relay::lifecycle::Side;

/// What a leg's write in flight carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Sending {
    /// No write is in flight.
    Idle,
    /// A pump's output (its direction's buffer).
    Data,
    /// The gateway's own ping or close (the leg's `ctl` buffer).
    Control,
}

/// Where the gateway's close frame to a leg stands.
#[derive(Debug)]
pub(crate) enum CloseState {
    /// None was decided.
    None,
    /// Decided; it goes once the leg's write in flight ends. Boxed: once per connection, and
    /// inline it would enlarge every idle connection.
    Pending(Box<ControlPayload>),
    /// Being written; the code is counted once the write succeeds.
    Writing(Option<CloseCode>),
    /// Written, replaced by a FIN, or the leg was given up on: nothing more goes to it.
    Sent,
}

/// One peer of a connection, as the machines see it.
#[derive(Debug)]
#[expect(
    clippy::struct_excessive_bools,
    reason = "independent facts about one socket; packed flags would only hide them"
)]
pub(crate) struct Leg {
    /// Which peer.
    pub(crate) side: Side,
    /// A read is in flight.
    recv: bool,
    /// What the write in flight carries.
    send: Sending,
    /// The gateway's close to this peer.
    pub(crate) close: CloseState,
    /// The control frame being written (empty while lent to the write, and between frames:
    /// its capacity is reused, so pings allocate once per leg).
    ctl: Vec<u8>,
    /// Bytes of `ctl` already written.
    ctl_sent: u8,
    /// The bytes written to this peer stop inside a frame: no control frame may follow.
    pub(crate) partial: bool,
    /// Reads were shut down: a read ends at once.
    shut_read: bool,
    /// Writes were shut down: nothing more can be written.
    shut_write: bool,
    /// The write timeout gave up on this peer.
    pub(crate) aborted: bool,
    /// Shut the socket down both ways once the close is settled (a dead peer).
    kill_after_close: bool,
    /// The machine shuts the socket for writing as soon as the close is written: the close
    /// frame may wait for that FIN and leave in one segment with it.
    fin_after_close: bool,
    /// When bytes last arrived from this peer (pongs included): liveness for keepalive.
    pub(crate) last_seen: Stamp,
    /// When the gateway last pinged this peer.
    pinged: Option<Stamp>,
    /// While a write is in flight: when it started or last moved bytes.
    write_since: Option<Stamp>,
}

impl Leg {
    /// A leg with nothing in flight, last heard from `now`.
    pub(crate) fn new(side: Side, now: Instant) -> Self {
        Self {
            side,
            recv: false,
            send: Sending::Idle,
            close: CloseState::None,
            ctl: Vec::new(),
            ctl_sent: 0,
            partial: false,
            shut_read: false,
            shut_write: false,
            aborted: false,
            kill_after_close: false,
            fin_after_close: false,
            last_seen: Stamp::at(now),
            pinged: None,
            write_since: None,
        }
    }

    /// Operations in flight on this leg.
    pub(crate) fn in_flight(&self) -> usize {
        usize::from(self.recv) + usize::from(self.send != Sending::Idle)
    }

    /// What the write in flight carries.
    pub(crate) fn sending(&self) -> Sending {
        self.send
    }

    /// Whether a close was decided for this peer (or it was given up on): its data output is
    /// dropped from now on.
    pub(crate) fn close_decided(&self) -> bool {
        !matches!(self.close, CloseState::None)
    }

    /// Whether no close to this peer is waiting or being written.
    pub(crate) fn settled(&self) -> bool {
        matches!(self.close, CloseState::None | CloseState::Sent)
    }

    /// Whether writes to this peer were shut down.
    pub(crate) fn write_shut(&self) -> bool {
        self.shut_write
    }

    /// Whether reads from this peer were shut down.
    pub(crate) fn read_shut(&self) -> bool {
        self.shut_read
    }

    /// Whether a write to this peer is in flight or it stands inside a frame: the async
    /// code's write lock was held.
    pub(crate) fn busy(&self) -> bool {
        self.send != Sending::Idle || self.partial
    }

    /// Decides a close for this peer, unless one was already (`Leg::send_close`'s
    /// `close_sent`); [`Leg::pump_ctl`] sends it.
    pub(crate) fn queue_close(&mut self, payload: Box<ControlPayload>) {
        if matches!(self.close, CloseState::None) {
            self.close = CloseState::Pending(payload);
        }
    }

    /// As [`Leg::queue_close`], for a close the machine follows with a FIN as soon as it is
    /// written (the last bytes of a finished close handshake).
    pub(crate) fn queue_last_close(&mut self, payload: Box<ControlPayload>) {
        if matches!(self.close, CloseState::None) {
            self.fin_after_close = true;
        }
        self.queue_close(payload);
    }

    /// Shuts the socket down once this peer's close is settled (a dead peer: nothing will
    /// come back from it).
    pub(crate) fn kill_after_close(&mut self) {
        self.kill_after_close = true;
    }

    /// Shuts the socket down `how`, unless it already is.
    pub(crate) fn shutdown(&mut self, io: &mut dyn Io, how: Shutdown) {
        let (read, write) = match how {
            Shutdown::Read => (true, false),
            Shutdown::Write => (false, true),
            Shutdown::Both => (true, true),
        };
        if (read && !self.shut_read) || (write && !self.shut_write) {
            io.shutdown(self.side, how);
        }
        self.shut_read |= read;
        self.shut_write |= write;
    }

    /// Gives up on this peer: its write moved no bytes for the write timeout. Nothing more is
    /// written to it, and shutting it down ends its operations in flight (a close being
    /// written is counted only if it completes anyway).
    pub(crate) fn abort(&mut self, io: &mut dyn Io) {
        self.aborted = true;
        if !matches!(self.close, CloseState::Writing(_)) {
            self.close = CloseState::Sent;
        }
        self.shutdown(io, Shutdown::Both);
    }

    /// Starts a read of up to `len` bytes (or more, into room `buf` already has) after `buf`'s
    /// bytes.
    pub(crate) fn recv(&mut self, io: &mut dyn Io, buf: Vec<u8>, len: usize) {
        debug_assert!(!self.recv, "one read per leg");
        self.recv = true;
        io.recv(self.side, buf, len);
    }

    /// A read came back: `n` bytes (0 or an error: none) arrived at `now`.
    pub(crate) fn received(&mut self, got_bytes: bool, now: Instant) {
        self.recv = false;
        if got_bytes {
            self.last_seen = Stamp::at(now);
        }
    }

    /// Starts a write of `buf[start..end]`; its clock starts now.
    pub(crate) fn send(
        &mut self,
        io: &mut dyn Io,
        what: Sending,
        buf: Vec<u8>,
        (start, end): (usize, usize),
        now: Instant,
    ) {
        debug_assert!(self.send == Sending::Idle, "one write per leg");
        self.send = what;
        self.write_since = Some(Stamp::at(now));
        let fin_next = what == Sending::Control
            && self.fin_after_close
            && matches!(self.close, CloseState::Writing(_));
        io.send(self.side, buf, start, end, fin_next);
    }

    /// A write came back (the caller goes on with its buffer).
    pub(crate) fn sent(&mut self) {
        self.send = Sending::Idle;
        self.write_since = None;
    }

    /// Whether the write in flight moved no bytes for the write timeout.
    pub(crate) fn stalled(&self, now: Instant, write: WriteTimeout) -> bool {
        self.write_since
            .is_some_and(|since| write.expired(now.saturating_duration_since(since.instant())))
    }

    /// When the write in flight times out if it moves no more bytes: one wake-up per timeout
    /// (progress meanwhile moves the deadline, and the wake-up re-asks for it). A deadline
    /// already past (the caller found the write stalled) is looked at again a tick later.
    pub(crate) fn write_check(&self, now: Instant, write: WriteTimeout) -> Option<Instant> {
        let since = self.write_since.filter(|_| write.enabled())?;
        let at = since.instant() + write.duration();
        Some(if at > now { at } else { now + write.tick() })
    }

    /// Moves the gateway's control frames along: a decided close goes once no write is in
    /// flight (a FIN instead if the peer stands inside a frame or cannot be written to); a
    /// dead peer is shut once its close is settled. Says whether anything changed.
    pub(crate) fn pump_ctl(&mut self, io: &mut dyn Io, now: Instant) -> bool {
        let mut progress = false;
        if matches!(self.close, CloseState::Pending(_)) && self.send == Sending::Idle {
            let CloseState::Pending(payload) = std::mem::replace(&mut self.close, CloseState::Sent)
            else {
                unreachable!("matched above")
            };
            if self.partial || self.shut_write {
                self.shutdown(io, Shutdown::Write);
            } else {
                self.close = CloseState::Writing(payload.close_code());
                self.write_control(io, OpCode::Close, payload.bytes(), now);
            }
            progress = true;
        }
        if self.kill_after_close && matches!(self.close, CloseState::Sent) {
            self.kill_after_close = false;
            self.shutdown(io, Shutdown::Both);
            progress = true;
        }
        progress
    }

    /// Keepalive's ping, as `Leg::send_ping` did: skipped while the leg is busy (a later
    /// deadline retries), and only recorded once the peer was sent a close.
    pub(crate) fn ping(&mut self, io: &mut dyn Io, now: Instant) {
        if self.busy() {
            return;
        }
        self.pinged = Some(Stamp::at(now));
        if !self.close_decided() && !self.shut_write {
            self.write_control(io, OpCode::Ping, KEEPALIVE_PAYLOAD, now);
        }
    }

    /// Writes one control frame (masked toward a backend) from the leg's own buffer.
    fn write_control(&mut self, io: &mut dyn Io, opcode: OpCode, payload: &[u8], now: Instant) {
        let mask = (self.side == Side::Backend).then(rand::random);
        let mut frame = std::mem::take(&mut self.ctl);
        frame.clear();
        write_frame(&mut frame, true, opcode, mask, payload);
        let len = frame.len();
        self.ctl_sent = 0;
        self.send(io, Sending::Control, frame, (0, len), now);
    }

    /// A control frame's write came back.
    pub(crate) fn ctl_sent(
        &mut self,
        io: &mut dyn Io,
        buf: Vec<u8>,
        result: &std::io::Result<usize>,
        metrics: &CoreMetrics,
        now: Instant,
    ) {
        self.sent();
        self.ctl = buf;
        let ok = match result {
            &Ok(n) if n > 0 => {
                let done = usize::from(self.ctl_sent) + n;
                if done < self.ctl.len() {
                    // At most 131 bytes: the count fits.
                    self.ctl_sent = done as u8;
                    let (frame, len) = (std::mem::take(&mut self.ctl), done);
                    let end = frame.len();
                    self.send(io, Sending::Control, frame, (len, end), now);
                    return;
                }
                true
            }
            Ok(_) | Err(_) => false,
        };
        self.ctl.clear();
        self.ctl_sent = 0;
        if let CloseState::Writing(code) = self.close {
            if ok {
                metrics.close_frame(self.side, CloseDirection::Sent, code.map(CloseCode::get));
            }
            self.close = CloseState::Sent;
        }
    }

    /// What keepalive says of this leg at `now`.
    pub(crate) fn verdict(&self, keepalive: &Keepalive, now: Instant) -> Verdict {
        keepalive.verdict(
            now,
            self.last_seen.instant(),
            self.pinged.map(Stamp::instant),
        )
    }

    /// When this leg's keepalive verdict can next change.
    pub(crate) fn keepalive_deadline(&self, keepalive: &Keepalive) -> Option<Instant> {
        if keepalive.ping_interval.is_zero() {
            return None;
        }
        Some(match self.pinged {
            Some(at) if at >= self.last_seen => at.instant() + keepalive.pong_timeout,
            _ => self.last_seen.instant() + keepalive.ping_interval,
        })
    }
}

/// The next keepalive deadline of a connection's legs: the idle timeout and each leg's ping
/// or pong deadline. One already past (a ping skipped on a busy leg) is retried a tick later.
pub(crate) fn keepalive_deadline(
    legs: &[Leg],
    keepalive: &Keepalive,
    now: Instant,
) -> Option<Instant> {
    if !keepalive.enabled() {
        return None;
    }
    let latest = legs.iter().map(|leg| leg.last_seen).max()?.instant();
    let idle = (!keepalive.idle.is_zero()).then(|| latest + keepalive.idle);
    let next = legs
        .iter()
        .filter_map(|leg| leg.keepalive_deadline(keepalive))
        .chain(idle)
        .min()?;
    Some(if next > now {
        next
    } else {
        now + keepalive.tick()
    })
}

/// Why a keepalive check ends a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Alarm {
    /// No leg sent anything for the idle timeout.
    Idle,
    /// This leg was pinged and stayed silent past the pong deadline.
    Dead(Side),
}

/// One keepalive check over a connection's legs : pings the
/// legs that are due, and says whether the connection is idle or a leg is dead.
pub(crate) fn keepalive_check(
    legs: &mut [Leg],
    keepalive: &Keepalive,
    io: &mut dyn Io,
    now: Instant,
) -> Option<Alarm> {
    let latest = legs.iter().map(|leg| leg.last_seen).max()?.instant();
    if keepalive.is_idle(now, latest) {
        return Some(Alarm::Idle);
    }
    for leg in legs {
        match leg.verdict(keepalive, now) {
            Verdict::Fine => {}
            Verdict::Ping => leg.ping(io, now),
            Verdict::Dead => return Some(Alarm::Dead(leg.side)),
        }
    }
    None
}

/// Asks for a timer at `next` (the loop keeps the earliest request standing, so asking
/// again after every event costs a comparison).
pub(crate) fn arm(io: &mut dyn Io, next: Option<Instant>) {
    if let Some(next) = next {
        io.wake_at(next);
    }
}

/// The earlier of two optional deadlines.
pub(crate) fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// One direction: the forwarder and the one buffer it works in (`None` while lent to a read
/// or a write).
#[derive(Debug)]
pub(crate) struct Pump {
    /// Rewrites the sender's frames in place into what the receiver gets.
    pub(crate) fwd: Forwarder,
    /// The direction's buffer.
    pub(crate) buf: Option<Vec<u8>>,
    /// The next read's size: doubles while reads fill it, up to the buffer limit.
    read_size: u32,
    /// Bytes of the output written so far in the current flush.
    sent: u32,
}

/// How a pump's write came back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Flushed {
    /// Short: the rest was submitted.
    More,
    /// All of the output went; the buffer is back and holds only unprocessed bytes.
    Done,
    /// The peer cannot be written to; the buffer is back.
    Failed,
}

impl Pump {
    /// A pump over `input` (bytes that came with a handshake).
    pub(crate) fn new(fwd: Forwarder, input: Vec<u8>, limit: usize) -> Self {
        Self {
            fwd,
            buf: Some(input),
            read_size: u32::try_from(MIN_READ.min(limit)).unwrap_or(u32::MAX),
            sent: 0,
        }
    }

    /// Processes the buffer; counts new frames in `dirs`; says why it stopped and whether
    /// the output should be written now.
    pub(crate) fn process(
        &mut self,
        limit: usize,
        metrics: &CoreMetrics,
        dirs: &[Direction],
    ) -> (Step, bool) {
        let buf = self
            .buf
            .as_mut()
            .expect("a pump processes only a buffer it holds");
        // The forwarder's counts change only while it processes.
        let (frames, bytes) = (self.fwd.frames, self.fwd.payload_bytes);
        let step = self.fwd.process(buf);
        if self.fwd.frames != frames || self.fwd.payload_bytes != bytes {
            // Live counters: per batch, not per connection close. A frame the forwarder takes
            // back (a violation inside it, before it left) was counted when it began: it did
            // arrive, so it stays counted, and the count never goes backwards.
            let (df, db) = (
                self.fwd.frames.saturating_sub(frames),
                self.fwd.payload_bytes.saturating_sub(bytes),
            );
            for &dir in dirs {
                metrics.frames(dir, df, db);
            }
        }
        let flush = self.fwd.should_flush(limit, &step);
        (step, flush)
    }

    /// Starts reading `src` into the buffer.
    pub(crate) fn read(&mut self, src: &mut Leg, io: &mut dyn Io) {
        let buf = self.buf.take().expect("a pump reads only with its buffer");
        src.recv(io, buf, self.read_size as usize);
    }

    /// A read came back with `buf`: says whether bytes arrived (else the peer is gone),
    /// growing the next read while reads fill it.
    pub(crate) fn on_read(
        &mut self,
        src: &mut Leg,
        buf: Vec<u8>,
        result: &std::io::Result<usize>,
        limit: usize,
        now: Instant,
    ) -> bool {
        self.buf = Some(buf);
        let n = match result {
            Ok(n) => *n,
            Err(_) => 0,
        };
        src.received(n > 0, now);
        let size = self.read_size as usize;
        if n >= size && size < limit {
            self.read_size = u32::try_from((size * 2).min(limit)).unwrap_or(u32::MAX);
        }
        n > 0
    }

    /// Writes the output (what remains of it) to `dst`.
    pub(crate) fn write(&mut self, dst: &mut Leg, io: &mut dyn Io, now: Instant) {
        let buf = self.buf.take().expect("a pump writes only with its buffer");
        let end = self.fwd.output_len();
        dst.send(io, Sending::Data, buf, (self.sent as usize, end), now);
    }

    /// A write to `dst` came back with `buf`.
    pub(crate) fn on_write(
        &mut self,
        dst: &mut Leg,
        buf: Vec<u8>,
        result: &std::io::Result<usize>,
        io: &mut dyn Io,
        now: Instant,
    ) -> Flushed {
        dst.sent();
        self.buf = Some(buf);
        match result {
            Ok(n) if *n > 0 => {
                // At most the output, whose length fits (see `forward::pos`).
                let sent = (self.sent as usize + n).min(self.fwd.output_len());
                self.sent = u32::try_from(sent).unwrap_or(u32::MAX);
                if sent < self.fwd.output_len() {
                    self.write(dst, io, now);
                    return Flushed::More;
                }
                self.done(Some(dst));
                Flushed::Done
            }
            Ok(_) | Err(_) => {
                self.sent = 0;
                Flushed::Failed
            }
        }
    }

    /// The output was written (to `dst`) or dropped (`None`): removes it and the input it came
    /// from. Dropped output leaves the peer's view where it was, inside a frame or not.
    pub(crate) fn done(&mut self, dst: Option<&mut Leg>) {
        let buf = self
            .buf
            .as_mut()
            .expect("a pump flushes only a buffer it holds");
        buf.drain(..self.fwd.flushed());
        self.sent = 0;
        if let Some(dst) = dst {
            dst.partial = self.fwd.output_mid_frame();
        }
    }

    /// Starts a read whose bytes are thrown away (waiting for the peer to close TCP).
    pub(crate) fn discard_read(&mut self, src: &mut Leg, io: &mut dyn Io) {
        let mut buf = self.buf.take().expect("a pump reads only with its buffer");
        buf.clear();
        src.recv(io, buf, MIN_READ);
    }
}
