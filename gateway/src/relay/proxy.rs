//! A proxied connection after both upgrades, as a state machine: frames relayed both ways,
//! the close handshake, keepalive, drain, the write timeout and the close timeout.
//!
//! Each direction is a [`Pump`] with one buffer: read from its source, rewritten in place by
//! its forwarder, written to its destination, and only then read again, so a slow reader
//! stalls only its own connection. [`Watch`] runs the timers (keepalive, drain, write and
//! close timeouts), moved by deadlines and by the lifecycle. `LIFECYCLE.md` says who gets
//! which close code; `crate::policy` names each of the gateway's own.
#![forbid(unsafe_code)]

use std::net::Shutdown;
use std::time::Instant;

use codec::CloseCode;
use codec::frame::Role;

use super::leg::{
    Alarm, Flushed, Leg, Pump, Sending, arm, earliest, keepalive_check, keepalive_deadline,
};
use crate::conn::kept_settings as settings;
use crate::conn::stamp::Stamp;
use crate::conn::{Closer, CoreCtx, Event, Io, Kept, Outcome, Status, Upgraded};
use crate::metrics::{CloseDirection, Direction};
use crate::policy::GatewayClose;
use crate::relay::forward::{ControlPayload, Forwarder, Mode, Step};
use crate::relay::lifecycle::{Lifecycle, OnClose, Side};

/// Index of a side's leg (and of the pump reading it).
const fn ix(side: Side) -> usize {
    match side {
        Side::Client => 0,
        Side::Backend => 1,
    }
}

/// Both sides, client first.
const SIDES: [Side; 2] = [Side::Client, Side::Backend];

/// Where one direction stands.
#[derive(Debug)]
enum Stage {
    /// The buffer holds bytes to process.
    Process,
    /// A read from the source is in flight.
    Reading,
    /// The output goes to the destination (waiting for it to be free, or in flight); then
    /// the step processing stopped on is handled.
    Flushing(Step),
    /// The direction stopped; it finishes its end once the closes it waits on settle.
    Ending(End),
    /// Reading and discarding until the source closes TCP (bounded by the close timeout).
    Draining,
    /// Finished: nothing more from this direction.
    Done,
}

/// Why a direction stopped, and what it still waits for.
#[derive(Clone, Copy, Debug)]
enum End {
    /// Its source sent a close frame. `relayed`: it went to the other peer, and must be
    /// written before the rest; `finished`: then the client's socket is shut.
    Close {
        /// The close was relayed to the other peer.
        relayed: bool,
        /// The handshake is complete (or the client answered the gateway's close).
        finished: bool,
    },
    /// Its source broke the protocol: both closes are written, then the source gets a FIN
    /// and is drained.
    Violation,
    /// `side` went away (or was given up on); `told`: the other peer was sent a close, which
    /// is written before `side`'s socket is shut.
    Gone {
        /// The peer that went.
        side: Side,
        /// The other peer was told.
        told: bool,
    },
}

/// The watchdog's position.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Watch {
    /// The connection is open: keepalive, drain and the write timeout.
    Open,
    /// The gateway's own close frames are being written, under the write timeout.
    Closing,
    /// The close handshake runs; the close timeout ends it at this instant.
    Waiting(Instant),
    /// The close timeout passed: the gateway answers this side's close itself (under the
    /// write timeout), then shuts both sockets.
    Replying(Side),
    /// Both sockets were shut on the close timeout: nothing more to time.
    Over,
}

/// A proxied connection after both upgrades.
pub(crate) struct Relay {
    /// Settings, access log line, admission and backend load; taken (released) at the end.
    up: Option<Kept>,
    /// The peers, by [`ix`].
    legs: [Leg; 2],
    /// The directions, by the [`ix`] of their source.
    pumps: [Pump; 2],
    /// Where each direction stands, by the [`ix`] of its source.
    stages: [Stage; 2],
    /// The close handshake.
    lifecycle: Lifecycle,
    /// The watchdog.
    watch: Watch,
    /// When the lifecycle left `Open`: the start of the close handshake.
    closing_since: Option<Stamp>,
    /// How the connection ended, for the access log.
    outcome: Outcome,
    /// Both directions finished and both sockets were shut: only completions are awaited.
    ended: bool,
}

/// Both legs mutably, `a`'s first.
fn pair(legs: &mut [Leg; 2], a: Side) -> (&mut Leg, &mut Leg) {
    let [client, backend] = legs;
    match a {
        Side::Client => (client, backend),
        Side::Backend => (backend, client),
    }
}

impl Relay {
    /// Takes over an upgraded connection: processes the bytes that came with the handshakes,
    /// arms the reads and the timer, and closes at once if the core is already draining.
    pub(crate) fn start(up: Upgraded, ctx: &CoreCtx, io: &mut dyn Io) -> (Self, Status) {
        let now = io.now();
        let Upgraded {
            client_input,
            backend_input,
            kept,
            ..
        } = up;
        let s = *kept.settings;
        // Frames from the client are decoded as a server and re-masked for the backend;
        // frames from the backend are decoded as a client and go out unmasked.
        let pump = |role, mask_out, input| {
            let fwd = Forwarder::new(role, s.limits, s.deflate, Mode::Relay { mask_out });
            Pump::new(fwd, input, s.buffer)
        };
        let client = pump(Role::Server, true, client_input);
        let backend = pump(Role::Client, false, backend_input);
        let mut relay = Self {
            up: Some(kept),
            legs: [Leg::new(Side::Client, now), Leg::new(Side::Backend, now)],
            pumps: [client, backend],
            stages: [Stage::Process, Stage::Process],
            lifecycle: Lifecycle::Open,
            watch: Watch::Open,
            closing_since: None,
            outcome: Outcome::default(),
            ended: false,
        };
        // The pumps first: a drain then finds their writes started.
        let mut status = relay.drive(ctx, io);
        if let Some(code) = ctx.draining.get() {
            relay.gateway_close(GatewayClose::Drain(code), ctx, now);
            status = relay.drive(ctx, io);
        }
        (relay, status)
    }

    /// Handles one event; `Done` once the connection ended with nothing in flight.
    pub(crate) fn on_event(&mut self, event: Event, ctx: &CoreCtx, io: &mut dyn Io) -> Status {
        if self.up.is_none() {
            return Status::Done;
        }
        let now = io.now();
        match event {
            Event::Received { side, buf, result } => {
                self.on_received(side, buf, &result, ctx, io, now);
            }
            Event::Sent { side, buf, result } => {
                let i = ix(side);
                match self.legs[i].sending() {
                    Sending::Control => {
                        self.legs[i].ctl_sent(io, buf, &result, &ctx.metrics, now);
                    }
                    Sending::Data => {
                        let from = side.other();
                        let p = ix(from);
                        match self.pumps[p].on_write(&mut self.legs[i], buf, &result, io, now) {
                            Flushed::More => {}
                            Flushed::Done => {
                                let stage = std::mem::replace(&mut self.stages[p], Stage::Process);
                                let Stage::Flushing(step) = stage else {
                                    unreachable!("a pump writes only while flushing")
                                };
                                self.after_step(from, step, ctx, io, now);
                            }
                            Flushed::Failed => self.on_gone(from, side, ctx, now),
                        }
                    }
                    Sending::Idle => unreachable!("a write came back that was not in flight"),
                }
            }
            Event::Timer => self.on_timer(ctx, io, now),
            Event::Drain(code) => self.gateway_close(GatewayClose::Drain(code), ctx, now),
            // The backend connected before its 101: nothing of the relay's.
            Event::Connected(_) => {}
        }
        self.drive(ctx, io)
    }

    /// A read came back.
    fn on_received(
        &mut self,
        side: Side,
        buf: Vec<u8>,
        result: &std::io::Result<usize>,
        ctx: &CoreCtx,
        io: &mut dyn Io,
        now: Instant,
    ) {
        let i = ix(side);
        let limit = settings(self.up.as_ref()).buffer;
        match self.stages[i] {
            Stage::Reading => {
                if self.pumps[i].on_read(&mut self.legs[i], buf, result, limit, now) {
                    self.stages[i] = Stage::Process;
                } else {
                    self.on_gone(side, side, ctx, now);
                }
            }
            Stage::Draining => {
                let more = self.pumps[i].on_read(&mut self.legs[i], buf, result, limit, now);
                if !more {
                    self.legs[i].shutdown(io, Shutdown::Both);
                    self.stages[i] = Stage::Done;
                }
            }
            _ => unreachable!("a read is in flight only while reading or draining"),
        }
    }

    /// Moves everything along until nothing changes, then reports.
    fn drive(&mut self, ctx: &CoreCtx, io: &mut dyn Io) -> Status {
        let now = io.now();
        loop {
            let mut progress = false;
            for side in SIDES {
                progress |= self.step_pump(side, ctx, io, now);
            }
            for leg in &mut self.legs {
                progress |= leg.pump_ctl(io, now);
            }
            progress |= self.step_watch(io, now);
            if !self.ended && self.stages.iter().all(|s| matches!(s, Stage::Done)) {
                // Both pumps are done.
                for leg in &mut self.legs {
                    leg.shutdown(io, Shutdown::Both);
                }
                self.ended = true;
                progress = true;
            }
            if !progress {
                break;
            }
        }
        if self.ended && self.legs.iter().all(|l| l.in_flight() == 0) {
            self.finish();
            return Status::Done;
        }
        self.arm(io, now);
        Status::Running
    }

    /// One move of the direction reading `from`; says whether anything changed.
    fn step_pump(&mut self, from: Side, ctx: &CoreCtx, io: &mut dyn Io, now: Instant) -> bool {
        let (s, d) = (ix(from), ix(from.other()));
        match &self.stages[s] {
            Stage::Process => {
                let limit = settings(self.up.as_ref()).buffer;
                let dirs = [Direction::from(from)];
                let (step, flush) = self.pumps[s].process(limit, &ctx.metrics, &dirs);
                if flush {
                    self.stages[s] = Stage::Flushing(step);
                } else {
                    self.after_step(from, step, ctx, io, now);
                }
                true
            }
            Stage::Flushing(_) => {
                if self.pumps[s].buf.is_none() || self.legs[d].sending() != Sending::Idle {
                    return false;
                }
                // Once the gateway failed the connection, or the destination was sent a
                // close, nothing more is relayed to it.
                if self.lifecycle == Lifecycle::Failed || self.legs[d].close_decided() {
                    self.pumps[s].done(None);
                    let stage = std::mem::replace(&mut self.stages[s], Stage::Process);
                    let Stage::Flushing(step) = stage else {
                        unreachable!("matched above")
                    };
                    self.after_step(from, step, ctx, io, now);
                } else if self.legs[d].write_shut() {
                    // The write would fail at once.
                    self.on_gone(from, from.other(), ctx, now);
                } else {
                    self.pumps[s].write(&mut self.legs[d], io, now);
                }
                true
            }
            &Stage::Ending(end) => self.finish_end(from, end, io),
            Stage::Draining => {
                if self.pumps[s].buf.is_none() {
                    false
                } else if self.legs[s].read_shut() {
                    self.legs[s].shutdown(io, Shutdown::Both);
                    self.stages[s] = Stage::Done;
                    true
                } else {
                    self.pumps[s].discard_read(&mut self.legs[s], io);
                    true
                }
            }
            Stage::Reading | Stage::Done => false,
        }
    }

    /// Goes on after the output of a processing step went out (or was dropped).
    fn after_step(&mut self, from: Side, step: Step, ctx: &CoreCtx, io: &mut dyn Io, now: Instant) {
        let s = ix(from);
        match step {
            Step::NeedInput => {
                if self.legs[s].read_shut() {
                    self.on_gone(from, from, ctx, now);
                } else {
                    self.pumps[s].read(&mut self.legs[s], io);
                    self.stages[s] = Stage::Reading;
                }
            }
            Step::Close(payload) => self.on_close(from, payload, ctx, now),
            Step::Violation(e) => {
                let why = match from {
                    Side::Client => GatewayClose::ClientViolation(e),
                    Side::Backend => GatewayClose::BackendViolation(e),
                };
                self.record_close(Some(why.code()), Closer::Gateway, why.reason());
                self.set_lifecycle(Lifecycle::Failed, ctx, now);
                self.fail(from, why);
            }
        }
    }

    /// A close frame arrived from `from`.
    fn on_close(&mut self, from: Side, payload: Box<ControlPayload>, ctx: &CoreCtx, now: Instant) {
        let (next, action) = self.lifecycle.close_from(from);
        let code = payload.close_code();
        ctx.metrics
            .close_frame(from, CloseDirection::Received, code.map(CloseCode::get));
        self.set_lifecycle(next, ctx, now);
        let reason = match from {
            Side::Client => "client sent close",
            Side::Backend => "backend sent close",
        };
        self.record_close(code, Closer::from(from), reason);
        let relayed = action != OnClose::Absorb;
        let finished = match (action, from) {
            (OnClose::RelayAndFinish, _) | (OnClose::Absorb, Side::Client) => true,
            (OnClose::Relay | OnClose::Absorb, _) => false,
        };
        if relayed {
            let to = &mut self.legs[ix(from.other())];
            if finished && from == Side::Backend {
                // The backend's reply completes the handshake: the client's socket is shut
                // as soon as it is written (`finish_end`).
                to.queue_last_close(payload);
            } else {
                to.queue_close(payload);
            }
        }
        self.stages[ix(from)] = Stage::Ending(End::Close { relayed, finished });
    }

    /// `violator` broke the protocol: both peers get the policy's close frames (the violator
    /// its error's code; the other 1001 if the client went wrong, the client 1014 if the
    /// backend did).
    fn fail(&mut self, violator: Side, why: GatewayClose) {
        let (bad, other) = pair(&mut self.legs, violator);
        for (leg, side) in [(other, violator.other()), (bad, violator)] {
            if let Some(close) = why.to(side) {
                leg.queue_close(Box::new(close));
            }
        }
        self.stages[ix(violator)] = Stage::Ending(End::Violation);
    }

    /// The pump reading `from` found `side` gone (EOF or an I/O error), or the write timeout
    /// gave up on it: then the other peer hears of it as of a dead peer.
    fn on_gone(&mut self, from: Side, side: Side, ctx: &CoreCtx, now: Instant) {
        let lifecycle = self.lifecycle;
        let other_waits = matches!(lifecycle, Lifecycle::Closing(waiting) if waiting != side);
        let told = lifecycle.is_open() || other_waits;
        if told {
            self.set_lifecycle(Lifecycle::Failed, ctx, now);
            let why = match (side, self.legs[ix(side)].aborted) {
                (Side::Client, false) => GatewayClose::ClientGone,
                (Side::Backend, false) => GatewayClose::BackendGone,
                (Side::Client, true) => GatewayClose::ClientStoppedReading,
                (Side::Backend, true) => GatewayClose::BackendStoppedReading,
            };
            self.record_close(Some(why.code()), Closer::Gateway, why.reason());
            if let Some(close) = why.to(side.other()) {
                self.legs[ix(side.other())].queue_close(Box::new(close));
            }
        }
        self.stages[ix(from)] = Stage::Ending(End::Gone { side, told });
    }

    /// Finishes a direction's end once what it waits for is settled.
    fn finish_end(&mut self, from: Side, end: End, io: &mut dyn Io) -> bool {
        let (s, d) = (ix(from), ix(from.other()));
        match end {
            End::Close { relayed, finished } => {
                if relayed && !self.legs[d].settled() {
                    return false;
                }
                if finished {
                    // The handshake is complete (or the client answered the gateway's own
                    // close): the server side closes TCP first, so the gateway closes the
                    // client's socket.
                    self.legs[ix(Side::Client)].shutdown(io, Shutdown::Both);
                }
                // The backend, as the server, closes TCP first: wait for it (bounded by the
                // close timeout) rather than leave TIME_WAIT sockets on the gateway.
                self.stages[s] = match from {
                    Side::Backend => Stage::Draining,
                    Side::Client => Stage::Done,
                };
            }
            End::Violation => {
                if !(self.legs[d].settled() && self.legs[s].settled()) {
                    return false;
                }
                // FIN after the close frame, then wait for the violator to close (bounded).
                self.legs[s].shutdown(io, Shutdown::Write);
                self.stages[s] = Stage::Draining;
            }
            End::Gone { side, told } => {
                if told && !self.legs[ix(side.other())].settled() {
                    return false;
                }
                self.legs[ix(side)].shutdown(io, Shutdown::Both);
                self.stages[s] = Stage::Done;
            }
        }
        true
    }

    /// One move of the watchdog; says whether anything changed.
    fn step_watch(&mut self, io: &mut dyn Io, now: Instant) -> bool {
        let close_timeout = settings(self.up.as_ref()).close_timeout;
        match self.watch {
            Watch::Open if !self.lifecycle.is_open() => {
                self.watch = Watch::Waiting(now + close_timeout);
            }
            Watch::Closing if self.legs.iter().all(Leg::settled) => {
                self.watch = Watch::Waiting(now + close_timeout);
            }
            Watch::Waiting(deadline) if now >= deadline => {
                if self.lifecycle != Lifecycle::Closed {
                    // Only an unfinished handshake counts; a peer slow to drop TCP after a
                    // completed one is merely cut off.
                    self.outcome.timed_out = true;
                }
                match self.lifecycle {
                    Lifecycle::Closing(side) if !self.legs[ix(side)].busy() => {
                        // The other peer never answered `side`'s close: answer it ourselves,
                        // so it still sees a clean handshake.
                        if let Some(reply) = GatewayClose::CloseTimeout(side).to(side) {
                            self.legs[ix(side)].queue_close(Box::new(reply));
                        }
                        self.watch = Watch::Replying(side);
                    }
                    _ => self.shut_both(io),
                }
            }
            Watch::Replying(side) if self.legs[ix(side)].settled() => self.shut_both(io),
            _ => return false,
        }
        true
    }

    /// The close timeout's end: operations in flight complete (with EOF or an error) once
    /// the sockets are shut, and the directions end on their own.
    fn shut_both(&mut self, io: &mut dyn Io) {
        for leg in &mut self.legs {
            leg.shutdown(io, Shutdown::Both);
        }
        self.watch = Watch::Over;
    }

    /// A timer fired: the write timeout, then keepalive (the close timeout is the
    /// watchdog's, in [`Self::step_watch`]).
    fn on_timer(&mut self, ctx: &CoreCtx, io: &mut dyn Io, now: Instant) {
        let s = *settings(self.up.as_ref());
        let mut aborted = false;
        if matches!(
            self.watch,
            Watch::Open | Watch::Closing | Watch::Replying(_)
        ) {
            for leg in &mut self.legs {
                if leg.stalled(now, s.write_timeout) {
                    // Its operations now fail; the pump that finds it gone tells the other
                    // peer.
                    leg.abort(io);
                    aborted = true;
                }
            }
        }
        if self.watch == Watch::Open
            && self.lifecycle.is_open()
            && !aborted
            && let Some(alarm) = keepalive_check(&mut self.legs, &s.keepalive, io, now)
        {
            let why = match alarm {
                Alarm::Idle => GatewayClose::Idle,
                Alarm::Dead(Side::Client) => GatewayClose::ClientDead,
                Alarm::Dead(Side::Backend) => GatewayClose::BackendDead,
            };
            self.gateway_close(why, ctx, now);
        }
    }

    /// Asks for the next deadline, unless an earlier request stands.
    fn arm(&mut self, io: &mut dyn Io, now: Instant) {
        let s = settings(self.up.as_ref());
        let mut next = None;
        if matches!(
            self.watch,
            Watch::Open | Watch::Closing | Watch::Replying(_)
        ) {
            for leg in &self.legs {
                next = earliest(next, leg.write_check(now, s.write_timeout));
            }
        }
        if self.watch == Watch::Open && self.lifecycle.is_open() {
            next = earliest(next, keepalive_deadline(&self.legs, &s.keepalive, now));
        }
        if let Watch::Waiting(at) = self.watch {
            next = earliest(next, Some(at));
        }
        arm(io, next);
    }

    /// Closes both peers on the gateway's own initiative; their replies are absorbed. The two
    /// close frames go out side by side, so a peer that stopped reading (cut off by the write
    /// timeout) does not hold up the other's.
    fn gateway_close(&mut self, why: GatewayClose, ctx: &CoreCtx, now: Instant) {
        if !self.lifecycle.is_open() {
            return;
        }
        let close = |side| Box::new(why.to(side).expect("both peers get the gateway's close"));
        let (to_client, to_backend) = (close(Side::Client), close(Side::Backend));
        self.record_close(Some(why.code()), Closer::Gateway, why.reason());
        self.set_lifecycle(Lifecycle::Failed, ctx, now);
        self.legs[ix(Side::Client)].queue_close(to_client);
        self.legs[ix(Side::Backend)].queue_close(to_backend);
        let dead = match why {
            GatewayClose::ClientDead => Some(Side::Client),
            GatewayClose::BackendDead => Some(Side::Backend),
            _ => None,
        };
        if let Some(side) = dead {
            // Half-open: nothing will come back from it.
            self.legs[ix(side)].kill_after_close();
        }
        self.watch = Watch::Closing;
    }

    /// Moves the lifecycle on, timing the close handshake.
    fn set_lifecycle(&mut self, next: Lifecycle, ctx: &CoreCtx, now: Instant) {
        let previous = std::mem::replace(&mut self.lifecycle, next);
        if previous.is_open() && !next.is_open() {
            self.closing_since = Some(Stamp::at(now));
        }
        if next == Lifecycle::Closed
            && previous != Lifecycle::Closed
            && let Some(since) = self.closing_since
        {
            ctx.metrics
                .close_handshake(now.saturating_duration_since(since.instant()));
        }
    }

    /// Records the first close of the connection for the access log.
    fn record_close(&mut self, code: Option<CloseCode>, by: Closer, reason: &'static str) {
        if self.outcome.closed_by.is_none() {
            self.outcome.close_code = code;
            self.outcome.closed_by = Some(by);
            self.outcome.reason = Some(reason);
        }
    }

    /// Writes the access log line and releases the admission slot and the backend's load.
    fn finish(&mut self) {
        if let Some(up) = self.up.take() {
            up.log.write(&self.outcome, self.bytes());
        }
        for pump in &mut self.pumps {
            pump.buf = None;
        }
    }

    /// How the connection ended (complete once it reported `Done`).
    #[cfg(test)]
    pub(crate) fn outcome(&self) -> Outcome {
        self.outcome
    }

    /// Payload bytes client to backend and back, as the forwarders counted them.
    fn bytes(&self) -> [u64; 2] {
        self.pumps.each_ref().map(|p| p.fwd.payload_bytes)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use codec::frame::OpCode;

    use super::*;
    use crate::conn::testio::{
        FakeIo, admitted, client_frame, close_payload, code_of, ctx, ix, server_frame, settings,
        upgraded,
    };
    use crate::conn::{Phase, Settings};
    use crate::relay::forward::KEEPALIVE_PAYLOAD;
    use crate::relay::keepalive::Keepalive;

    /// A relay under test with its fake loop.
    struct T {
        ctx: CoreCtx,
        io: FakeIo,
        relay: Relay,
        status: Status,
    }

    impl T {
        fn new(settings: Settings) -> Self {
            let ctx = ctx();
            let mut io = FakeIo::default();
            let up = upgraded(&ctx, Phase::Relay, settings, Vec::new(), Vec::new());
            let (relay, status) = Relay::start(*up, &ctx, &mut io);
            assert_eq!(status, Status::Running);
            assert_eq!(admitted(&ctx), 1);
            Self {
                ctx,
                io,
                relay,
                status,
            }
        }

        fn ev(&mut self, event: Event) {
            assert_eq!(self.status, Status::Running, "an event after Done");
            self.status = self.relay.on_event(event, &self.ctx, &mut self.io);
            assert!(!self.io.cancelled(), "the relay never cancels");
            assert_eq!(
                self.io.fin_owed(),
                None,
                "a write said a FIN follows; none did"
            );
            if self.status == Status::Done {
                assert_eq!(self.io.in_flight(), 0, "Done with operations in flight");
                assert_eq!(admitted(&self.ctx), 0, "Done without releasing admission");
            }
        }

        /// `from` sends `bytes`, `chunk` bytes per read; writes the gateway makes meanwhile
        /// are taken whole.
        fn send(&mut self, from: Side, bytes: &[u8], chunk: usize) {
            let mut rest = bytes;
            while !rest.is_empty() {
                self.flush();
                let (event, n) = self.io.read(from, &rest[..chunk.min(rest.len())]);
                rest = &rest[n..];
                self.ev(event);
            }
            self.flush();
        }

        /// Completes every write in flight, taking all its bytes, until none is left.
        fn flush(&mut self) {
            while self.status == Status::Running {
                let Some(side) = SIDES.into_iter().find(|&s| self.io.sends[ix(s)].is_some()) else {
                    return;
                };
                let event = self.io.write(side, usize::MAX);
                self.ev(event);
            }
        }

        /// Completes what shut sockets owe and flushes writes, until nothing changes.
        fn settle(&mut self) {
            loop {
                self.flush();
                if self.status == Status::Done {
                    return;
                }
                match self.io.owed() {
                    Some(event) => self.ev(event),
                    None => return,
                }
            }
        }

        /// Lets `d` pass in 10 ms steps, firing timers as they fall due.
        fn sleep(&mut self, d: Duration) {
            let step = Duration::from_millis(10);
            let mut left = d;
            while !left.is_zero() && self.status == Status::Running {
                let s = step.min(left);
                left -= s;
                if let Some(event) = self.io.advance(s) {
                    self.ev(event);
                }
            }
        }

        /// `from` sends `bytes` in one read; writes are left in flight.
        fn feed(&mut self, from: Side, bytes: &[u8]) {
            let (event, n) = self.io.read(from, bytes);
            assert_eq!(n, bytes.len());
            self.ev(event);
        }

        fn eof(&mut self, side: Side) {
            let event = self.io.eof(side);
            self.ev(event);
        }

        fn done(&self) -> Outcome {
            assert_eq!(self.status, Status::Done);
            self.relay.outcome()
        }
    }

    fn close(code: u16, reason: &str) -> (OpCode, Vec<u8>) {
        (OpCode::Close, close_payload(code, reason))
    }

    #[test]
    fn relays_both_ways_in_short_reads() {
        let mut t = T::new(settings());
        let text = b"hello, relayed world";
        t.send(Side::Client, &client_frame(OpCode::Text, text), 3);
        assert_eq!(
            t.io.take_frames(Side::Backend),
            [(OpCode::Text, text.to_vec())]
        );
        let reply = b"and back again";
        t.send(Side::Backend, &server_frame(OpCode::Binary, reply), 4);
        assert_eq!(
            t.io.take_frames(Side::Client),
            [(OpCode::Binary, reply.to_vec())]
        );
        // The client goes away: the backend hears 1001, then closes TCP itself.
        t.eof(Side::Client);
        t.flush();
        assert_eq!(
            t.io.take_frames(Side::Backend),
            [close(1001, "client went away")]
        );
        t.eof(Side::Backend);
        t.settle();
        let o = t.done();
        assert_eq!(t.relay.bytes(), [text.len() as u64, reply.len() as u64]);
        assert_eq!(o.close_code, Some(CloseCode::GOING_AWAY));
        assert_eq!(o.closed_by, Some(Closer::Gateway));
    }

    #[test]
    fn client_initiated_close_handshake() {
        let mut t = T::new(settings());
        let bye = close_payload(1000, "bye");
        t.send(Side::Client, &client_frame(OpCode::Close, &bye), 2);
        assert_eq!(
            t.io.take_frames(Side::Backend),
            [(OpCode::Close, bye.clone())]
        );
        assert!(
            t.io.shutdowns.is_empty(),
            "nothing is shut before the reply"
        );
        assert!(
            !t.io.fin_next[ix(Side::Backend)],
            "no FIN to the backend yet"
        );
        t.send(Side::Backend, &server_frame(OpCode::Close, &bye), 100);
        assert_eq!(t.io.take_frames(Side::Client), [(OpCode::Close, bye)]);
        assert!(
            t.io.fin_next[ix(Side::Client)],
            "the reply and the FIN after it may leave as one segment"
        );
        assert!(
            t.io.read_shut(Side::Client),
            "the client's TCP is closed once relayed"
        );
        // The gateway waits for the backend's FIN.
        assert!(t.io.recvs[ix(Side::Backend)].is_some());
        t.eof(Side::Backend);
        t.settle();
        let o = t.done();
        assert_eq!(o.close_code, Some(CloseCode::NORMAL));
        assert_eq!((o.closed_by, o.timed_out), (Some(Closer::Client), false));
    }

    #[test]
    fn backend_initiated_close_handshake() {
        let mut t = T::new(settings());
        let bye = close_payload(4000, "restart");
        t.send(Side::Backend, &server_frame(OpCode::Close, &bye), 5);
        assert_eq!(
            t.io.take_frames(Side::Client),
            [(OpCode::Close, bye.clone())]
        );
        assert!(
            !t.io.fin_next[ix(Side::Client)],
            "the client has yet to answer"
        );
        t.send(Side::Client, &client_frame(OpCode::Close, &bye), 100);
        assert_eq!(t.io.take_frames(Side::Backend), [(OpCode::Close, bye)]);
        assert!(t.io.read_shut(Side::Client));
        t.eof(Side::Backend);
        t.settle();
        let o = t.done();
        assert_eq!(o.close_code, Some(CloseCode::new(4000)));
        assert_eq!(o.closed_by, Some(Closer::Backend));
    }

    #[test]
    fn client_violation_closes_both_with_their_codes() {
        let mut t = T::new(settings());
        // An unmasked frame from a client breaks the protocol.
        t.send(Side::Client, &server_frame(OpCode::Text, b"x"), 100);
        let to_client = t.io.take_frames(Side::Client);
        assert_eq!(to_client.len(), 1);
        assert_eq!(code_of(&to_client[0].1), 1002);
        assert_eq!(
            t.io.take_frames(Side::Backend),
            [close(1001, "client protocol error")]
        );
        assert!(t.io.write_shut(Side::Client), "FIN after the close");
        // The backend's reply is absorbed; both then close TCP.
        t.send(
            Side::Backend,
            &server_frame(OpCode::Close, &close_payload(1001, "")),
            100,
        );
        assert!(t.io.take_frames(Side::Client).is_empty());
        t.eof(Side::Backend);
        t.eof(Side::Client);
        t.settle();
        let o = t.done();
        assert_eq!(o.close_code, Some(CloseCode::PROTOCOL_ERROR));
        assert_eq!(o.closed_by, Some(Closer::Gateway));
    }

    /// Found by the `relay_machine` fuzz target: a text frame counted when its header
    /// arrived, then taken back when its payload turned out not to be UTF-8, made the live
    /// frame counter subtract past zero.
    #[test]
    fn a_frame_taken_back_after_it_was_counted() {
        let mut t = T::new(settings());
        let frame = client_frame(OpCode::Text, b"ok \xff\xfe");
        // The header and the valid start in one read, the bad bytes in the next.
        t.send(Side::Client, &frame[..frame.len() - 2], 100);
        t.send(Side::Client, &frame[frame.len() - 2..], 100);
        assert_eq!(
            t.io.take_frames(Side::Client),
            [close(1007, "invalid utf-8")]
        );
        assert!(
            t.io.take_frames(Side::Backend)
                .iter()
                .all(|(op, _)| *op == OpCode::Close)
        );
    }

    #[test]
    fn backend_eof_gets_the_client_1014() {
        let mut t = T::new(settings());
        t.eof(Side::Backend);
        t.flush();
        assert_eq!(
            t.io.take_frames(Side::Client),
            [close(1014, "backend went away")]
        );
        assert!(t.io.read_shut(Side::Backend));
        // The client's reply is absorbed and its socket closed.
        t.send(
            Side::Client,
            &client_frame(OpCode::Close, &close_payload(1014, "")),
            100,
        );
        assert!(t.io.read_shut(Side::Client));
        t.settle();
        let o = t.done();
        assert_eq!(o.close_code, Some(CloseCode::BAD_GATEWAY));
        assert_eq!(o.reason, Some("backend went away"));
    }

    #[test]
    fn drain_closes_both_with_its_code() {
        let mut t = T::new(settings());
        t.ev(Event::Drain(CloseCode::GOING_AWAY));
        t.flush();
        let shutting = close(1001, "gateway shutting down");
        assert_eq!(
            t.io.take_frames(Side::Client),
            std::slice::from_ref(&shutting)
        );
        assert_eq!(t.io.take_frames(Side::Backend), [shutting]);
        t.send(
            Side::Client,
            &client_frame(OpCode::Close, &close_payload(1001, "")),
            100,
        );
        t.send(
            Side::Backend,
            &server_frame(OpCode::Close, &close_payload(1001, "")),
            100,
        );
        assert!(
            t.io.take_frames(Side::Client).is_empty(),
            "replies are absorbed"
        );
        assert!(
            t.io.take_frames(Side::Backend).is_empty(),
            "replies are absorbed"
        );
        t.eof(Side::Backend);
        t.settle();
        let o = t.done();
        assert_eq!(o.close_code, Some(CloseCode::GOING_AWAY));
        assert_eq!((o.closed_by, o.timed_out), (Some(Closer::Gateway), false));
    }

    #[test]
    fn a_core_already_draining_closes_at_once() {
        let ctx = ctx();
        ctx.draining.set(Some(CloseCode::SERVICE_RESTART));
        let mut io = FakeIo::default();
        let up = upgraded(&ctx, Phase::Relay, settings(), Vec::new(), Vec::new());
        let (_relay, status) = Relay::start(*up, &ctx, &mut io);
        assert_eq!(status, Status::Running);
        for side in SIDES {
            let event = io.write(side, usize::MAX);
            drop(event);
            assert_eq!(io.take_frames(side), [close(1012, "gateway restarting")]);
        }
    }

    #[test]
    fn a_client_that_stops_reading_is_given_up_on() {
        let mut t = T::new(settings());
        t.feed(Side::Backend, &server_frame(OpCode::Text, b"unread"));
        // The client never takes the write.
        assert!(t.io.sends[ix(Side::Client)].is_some());
        t.sleep(Duration::from_millis(2_600));
        assert!(t.io.read_shut(Side::Client), "the stuck client is shut");
        t.settle();
        assert_eq!(
            t.io.take_frames(Side::Backend),
            [close(1001, "client stopped reading")]
        );
        assert!(
            t.io.wire[ix(Side::Client)].is_empty(),
            "no close to a stuck client"
        );
        // Both directions found the client gone: the connection ends with the close sent.
        let o = t.done();
        assert_eq!(o.close_code, Some(CloseCode::GOING_AWAY));
        assert_eq!(o.reason, Some("client stopped reading"));
    }

    #[test]
    fn a_backend_that_stops_reading_is_given_up_on() {
        let mut t = T::new(settings());
        t.feed(Side::Client, &client_frame(OpCode::Text, b"unread"));
        let before = t.io.wake;
        assert!(before.is_some(), "a pending write is timed");
        // Not yet: the write is timed from its start.
        t.sleep(Duration::from_millis(1_900));
        assert!(!t.io.read_shut(Side::Backend));
        t.sleep(Duration::from_millis(700));
        assert!(t.io.read_shut(Side::Backend));
        t.settle();
        assert_eq!(
            t.io.take_frames(Side::Client),
            [close(1011, "backend stopped reading")]
        );
        let o = t.done();
        assert_eq!(o.close_code, Some(CloseCode::INTERNAL_ERROR));
        assert_eq!(o.reason, Some("backend stopped reading"));
    }

    #[test]
    fn keepalive_pings_and_declares_a_silent_client_dead() {
        let mut s = settings();
        s.keepalive = Keepalive {
            ping_interval: Duration::from_secs(10),
            pong_timeout: Duration::from_secs(5),
            idle: Duration::ZERO,
        };
        let mut t = T::new(s);
        assert!(t.io.wake.is_some(), "keepalive arms a timer");
        t.sleep(Duration::from_millis(9_900));
        assert!(
            t.io.sends.iter().all(Option::is_none),
            "no ping before the interval"
        );
        t.sleep(Duration::from_millis(200));
        t.flush();
        let ping = (OpCode::Ping, KEEPALIVE_PAYLOAD.to_vec());
        assert_eq!(t.io.take_frames(Side::Client), std::slice::from_ref(&ping));
        assert_eq!(t.io.take_frames(Side::Backend), [ping]);
        // The backend answers; its pong is the gateway's, not the client's.
        t.send(
            Side::Backend,
            &server_frame(OpCode::Pong, KEEPALIVE_PAYLOAD),
            100,
        );
        assert!(t.io.take_frames(Side::Client).is_empty());
        t.sleep(Duration::from_secs(5));
        t.flush();
        assert_eq!(
            t.io.take_frames(Side::Client),
            [close(1001, "ping timeout")]
        );
        assert_eq!(
            t.io.take_frames(Side::Backend),
            [close(1001, "client stopped answering")]
        );
        assert!(t.io.read_shut(Side::Client), "the dead client is shut");
        t.settle();
        t.send(
            Side::Backend,
            &server_frame(OpCode::Close, &close_payload(1001, "")),
            100,
        );
        t.eof(Side::Backend);
        t.settle();
        let o = t.done();
        assert_eq!(o.close_code, Some(CloseCode::GOING_AWAY));
        assert_eq!(o.reason, Some("client stopped answering"));
    }

    #[test]
    fn an_unanswered_close_gets_1014_at_the_close_timeout() {
        let mut t = T::new(settings());
        let bye = close_payload(1000, "");
        t.send(Side::Client, &client_frame(OpCode::Close, &bye), 100);
        assert_eq!(t.io.take_frames(Side::Backend), [(OpCode::Close, bye)]);
        t.sleep(Duration::from_millis(1_100));
        t.settle();
        assert_eq!(
            t.io.take_frames(Side::Client),
            [close(1014, "close timeout")]
        );
        let o = t.done();
        assert!(o.timed_out);
    }

    #[test]
    fn an_idle_connection_without_keepalive_needs_no_timer() {
        let t = T::new(settings());
        assert_eq!(t.io.wake, None);
    }

    #[test]
    fn an_idle_relay_fits_the_allocators_640_byte_class() {
        // An idle proxied connection is this one allocation (plus its path and the loop's
        // slot): the next size class down is 512 bytes, the next up 768.
        let size = size_of::<Relay>();
        assert!(size <= 640, "Relay is {size} bytes");
    }
}
