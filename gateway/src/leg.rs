//! One peer's socket, with what it takes for several tasks of a connection to write to it
//! without breaking frames apart, and for a watchdog to time those writes.
#![forbid(unsafe_code)]

use std::cell::Cell;
use std::future::Future;
use std::net::Shutdown;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Instant;

use codec::frame::{OpCode, write_frame};
use tokio::sync::Notify;
use tokio::time::Sleep;

use crate::conn::Settings;
use crate::forward::{ControlPayload, Forwarder};
use crate::keepalive::{Keepalive, Verdict, WriteTimeout, clock_ms, tick_period};
use crate::lifecycle::Side;
use crate::metrics::{CloseDirection, CoreMetrics};
use crate::uring::Stream;

/// The payload of the gateway's own keepalive pings; a pong carrying it answers the gateway,
/// so it is absorbed rather than relayed.
pub(crate) const KEEPALIVE_PAYLOAD: &[u8] = b"wsgate-keepalive";

/// `Leg::write_clock` when no write is pending.
const NOT_WRITING: u32 = 0;
/// `Leg::write_clock` once the leg was given up on (see [`Leg::abort`]).
const ABORTED: u32 = u32::MAX;

/// A peer of a connection.
pub(crate) struct Leg {
    pub(crate) stream: Stream,
    pub(crate) side: Side,
    /// A task is writing a frame to this peer.
    busy: Cell<bool>,
    idle: Notify,
    /// A close frame was written to this peer, or it was given up on: nothing more may
    /// follow.
    pub(crate) close_sent: Cell<bool>,
    /// The bytes written to this peer stop inside a frame: a close frame cannot follow.
    pub(crate) partial: Cell<bool>,
    /// When bytes last arrived from this peer (pongs included): liveness for keepalive.
    pub(crate) last_seen: Cell<Instant>,
    /// When the gateway last pinged this peer.
    pub(crate) pinged: Cell<Option<Instant>>,
    /// [`NOT_WRITING`], [`ABORTED`], or when the pending write last moved bytes (a
    /// [`clock_ms`] stamp). Four bytes, so the leg stays the size it was.
    write_clock: Cell<u32>,
    metrics: Arc<CoreMetrics>,
}

impl Leg {
    pub(crate) fn new(stream: Stream, side: Side, metrics: Arc<CoreMetrics>) -> Self {
        Self {
            stream,
            side,
            busy: Cell::new(false),
            idle: Notify::new(),
            close_sent: Cell::new(false),
            partial: Cell::new(false),
            last_seen: Cell::new(Instant::now()),
            pinged: Cell::new(None),
            write_clock: Cell::new(NOT_WRITING),
            metrics,
        }
    }

    /// When the pending write last moved bytes; `None` when no write is pending.
    fn write_stamp(&self) -> Option<u32> {
        Some(self.write_clock.get()).filter(|&c| c != NOT_WRITING && c != ABORTED)
    }

    /// Whether a write to this peer is in flight.
    pub(crate) fn write_pending(&self) -> bool {
        self.write_stamp().is_some()
    }

    /// Whether the write timeout gave up on this peer.
    pub(crate) fn aborted(&self) -> bool {
        self.write_clock.get() == ABORTED
    }

    /// Starts (or restarts) the pending write's clock, unless the peer was given up on.
    fn write_moved(&self) {
        if !self.aborted() {
            // The two reserved values are never a stamp; being 1 ms off does not matter.
            self.write_clock
                .set(clock_ms().clamp(NOT_WRITING + 1, ABORTED - 1));
        }
    }

    /// Gives up on this peer: its write made no progress for the write timeout, so it stopped
    /// reading. Nothing more is written to it, and shutting the socket down ends the blocked
    /// write (and any read) with an error, so whoever waits on them moves on. A write cannot
    /// simply be dropped instead: io_uring may still own its buffer.
    pub(crate) fn abort(&self) {
        self.write_clock.set(ABORTED);
        self.close_sent.set(true);
        self.stream.shutdown(Shutdown::Both);
    }

    /// Writes the first `len` bytes of `buf` with the write clock running: it starts now and
    /// restarts whenever bytes go out; the caller stops it with [`Self::write_ended`]. Not an
    /// `async fn`: another layer of future would take room in every relay direction.
    fn write_timed<'a>(
        &'a self,
        buf: &'a mut Vec<u8>,
        len: usize,
    ) -> impl Future<Output = std::io::Result<()>> + 'a {
        self.write_moved();
        self.stream.write_prefix(buf, len, || self.write_moved())
    }

    /// Stops the write clock started by [`Self::write_timed`].
    fn write_ended(&self) {
        if !self.aborted() {
            self.write_clock.set(NOT_WRITING);
        }
    }

    /// Takes the right to write whole frames to this peer.
    pub(crate) async fn lock(&self) {
        while self.busy.get() {
            self.idle.notified().await;
        }
        self.busy.set(true);
    }

    /// Gives the right back (at a frame boundary).
    pub(crate) fn unlock(&self) {
        self.busy.set(false);
        self.idle.notify_one();
    }

    /// Whether a task is writing to this peer right now.
    pub(crate) fn is_busy(&self) -> bool {
        self.busy.get()
    }

    /// Writes a forwarder's output (the front of `buf`) to this peer and removes it, with the
    /// input it came from, from `buf`. The write lock is taken at the start of a frame and
    /// kept until a batch ends on a frame boundary (`holding` carries that across batches),
    /// so no other task writes inside a frame. With `discard`, or once this peer was sent a
    /// close, the output is dropped instead. The lock is released on error.
    pub(crate) async fn write_batch(
        &self,
        buf: &mut Vec<u8>,
        fwd: &mut Forwarder,
        holding: &mut bool,
        discard: bool,
    ) -> std::io::Result<()> {
        if !*holding {
            self.lock().await;
            *holding = true;
        }
        if !discard && !self.close_sent.get() {
            let written = self.write_timed(buf, fwd.output_len()).await;
            self.write_ended();
            if let Err(e) = written {
                self.unlock();
                *holding = false;
                return Err(e);
            }
        }
        buf.drain(..fwd.flushed());
        self.partial.set(fwd.output_mid_frame());
        if !fwd.output_mid_frame() {
            self.unlock();
            *holding = false;
        }
        Ok(())
    }

    /// Writes a close frame (masked toward a backend) unless one was already sent. If a
    /// frame to this peer is half-written, no frame can follow it: the peer gets a FIN.
    pub(crate) async fn send_close(&self, payload: &ControlPayload) {
        self.lock().await;
        if self.partial.get() {
            self.close_sent.set(true);
            self.stream.shutdown(Shutdown::Write);
        } else if !self.close_sent.replace(true) {
            // A peer that cannot take a close frame is gone; the pumps notice on their own.
            if self
                .write_control(OpCode::Close, payload.bytes())
                .await
                .is_ok()
            {
                let code = payload.close_code().map(codec::CloseCode::get);
                self.metrics
                    .close_frame(self.side, CloseDirection::Sent, code);
            }
        }
        self.unlock();
    }

    /// Sends the gateway's keepalive ping, unless the peer was already sent a close. While
    /// a frame is being written to the peer, the ping waits for a later tick rather than
    /// behind that frame, which may never end (the write timeout deals with that).
    pub(crate) async fn send_ping(&self) {
        if self.is_busy() {
            return;
        }
        self.pinged.set(Some(Instant::now()));
        self.lock().await;
        if !self.close_sent.get() && !self.partial.get() {
            drop(self.write_control(OpCode::Ping, KEEPALIVE_PAYLOAD).await);
        }
        self.unlock();
    }

    async fn write_control(&self, opcode: OpCode, payload: &[u8]) -> std::io::Result<()> {
        let mask = (self.side == Side::Backend).then(rand::random);
        let mut frame = Vec::with_capacity(2 + 4 + payload.len());
        write_frame(&mut frame, true, opcode, mask, payload);
        let len = frame.len();
        let written = self.write_timed(&mut frame, len).await;
        self.write_ended();
        written
    }
}

/// Gives up on each of `legs` whose pending write moved no bytes for the write timeout (see
/// [`Leg::abort`]); says whether it gave up on any. What the other peer is told is up to the
/// code that finds the leg gone (`Relay::on_gone`).
pub(crate) fn abort_stalled(legs: &[&Leg], write: WriteTimeout) -> bool {
    if !write.enabled() {
        return false;
    }
    let now = clock_ms();
    let mut any = false;
    for leg in legs {
        if leg
            .write_stamp()
            .is_some_and(|stamp| write.expired(now, stamp))
        {
            leg.abort();
            any = true;
        }
    }
    any
}

/// Runs `fut`, a write the watchdog makes itself (a ping, a close), while still holding `legs`
/// to the write timeout: a stuck write is ended by giving up on its leg, so the watchdog never
/// waits behind one for longer than the timeout.
pub(crate) async fn bounded<F: Future>(legs: &[&Leg], write: WriteTimeout, fut: F) -> F::Output {
    let guard = async {
        let (mut ticker, off) = (Ticker::default(), Keepalive::default());
        loop {
            let writing = || legs.iter().any(|leg| leg.write_pending());
            std::future::poll_fn(|cx| ticker.poll_tick(cx, &off, write, writing())).await;
            abort_stalled(legs, write);
        }
    };
    tokio::select! {
        biased;
        out = fut => out,
        () = guard => unreachable!("the guard loops forever"),
    }
}

/// Gives a watchdog that lost the race one last poll before it is dropped. Connections poll
/// their relaying code before their watchdog (see [`Ticker`]), so when both had completions in
/// the same wake-up, the watchdog never saw its own: a close frame it sent is counted only when
/// its write completes, and would go uncounted.
pub(crate) async fn last_poll<F: Future>(watchdog: Pin<&mut F>) {
    let mut watchdog = Some(watchdog);
    std::future::poll_fn(|cx| {
        if let Some(w) = watchdog.take() {
            let _still_waiting = w.poll(cx);
        }
        Poll::Ready(())
    })
    .await;
}

/// A watchdog's timer, armed only while something needs it: keepalive, or a write pending on
/// one of the legs. An idle connection without keepalive holds no timer at all.
///
/// Unarmed, a tick is `Pending` without arranging a wake-up. That is sound because a write
/// starts while its connection's task is being polled, and every watchdog is polled after the
/// code that writes (the `biased` selects in `Relay::run`, `echo::serve` and [`bounded`]):
/// the poll that starts a write finds it pending and arms the timer. Once armed, the timer
/// stays until it fires with nothing left to time, so a busy connection does not make a timer
/// per write.
#[derive(Default)]
pub(crate) struct Ticker(Option<Pin<Box<Sleep>>>);

impl Ticker {
    /// Waits for the next tick; `writing` says whether a write to one of the connection's legs
    /// is pending. Kept to three references: it is part of every idle watchdog.
    pub(crate) fn tick<'a>(
        &'a mut self,
        settings: &'a Settings,
        writing: impl Fn() -> bool + 'a,
    ) -> impl Future<Output = ()> + 'a {
        std::future::poll_fn(move |cx| {
            self.poll_tick(cx, &settings.keepalive, settings.write_timeout, writing())
        })
    }

    fn poll_tick(
        &mut self,
        cx: &mut Context<'_>,
        keepalive: &Keepalive,
        write: WriteTimeout,
        writing: bool,
    ) -> Poll<()> {
        let Some(period) = tick_period(keepalive, write, writing) else {
            // Nothing to time: let an armed timer run out, then drop it.
            if let Some(sleep) = &mut self.0
                && sleep.as_mut().poll(cx).is_ready()
            {
                self.0 = None;
            }
            return Poll::Pending;
        };
        let sleep = self
            .0
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(period)));
        if writing && keepalive.enabled() && period < keepalive.tick() {
            // Armed for keepalive's longer period before this write began.
            let soon = tokio::time::Instant::now() + period;
            if sleep.deadline() > soon {
                sleep.as_mut().reset(soon);
            }
        }
        ready!(sleep.as_mut().poll(cx));
        sleep.as_mut().reset(tokio::time::Instant::now() + period);
        Poll::Ready(())
    }
}

/// Why a keepalive tick ends a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Alarm {
    /// No leg sent anything for the idle timeout.
    Idle,
    /// This leg was pinged and stayed silent past the pong deadline.
    Dead(Side),
}

/// One keepalive tick over a connection's legs (two for a relay, one for the echo): pings
/// the legs that are due, and says whether the connection is idle or a leg is dead.
pub(crate) async fn keepalive_tick(legs: &[&Leg], keepalive: &Keepalive) -> Option<Alarm> {
    let now = Instant::now();
    let latest = legs.iter().map(|leg| leg.last_seen.get()).max()?;
    if keepalive.is_idle(now, latest) {
        return Some(Alarm::Idle);
    }
    for leg in legs {
        match keepalive.verdict(now, leg.last_seen.get(), leg.pinged.get()) {
            Verdict::Fine => {}
            Verdict::Ping => leg.send_ping().await,
            Verdict::Dead => return Some(Alarm::Dead(leg.side)),
        }
    }
    None
}
