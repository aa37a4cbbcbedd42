//! The embedded echo as a state machine: with no backend configured, the gateway answers
//! the client itself, frame by frame (never buffering a message), validating like any leg.
//! Keepalive, drain, the write timeout and the close timeout work as on a proxied
//! connection.
#![forbid(unsafe_code)]

use std::net::Shutdown;
use std::time::Instant;

use codec::CloseCode;
use codec::frame::Role;

use super::leg::{
    Alarm, Flushed, Leg, Pump, Sending, arm, earliest, keepalive_check, keepalive_deadline,
};
use crate::conn::kept_settings as settings;
use crate::conn::{Closer, CoreCtx, Event, Io, Kept, Outcome, Status, Upgraded};
use crate::metrics::{CloseDirection, Direction};
use crate::policy::GatewayClose;
use crate::relay::forward::{Forwarder, Mode, Step};
use crate::relay::lifecycle::Side;

/// Each frame is counted both ways: in from the client, and echoed back.
const BOTH_WAYS: [Direction; 2] = [Direction::ClientToBackend, Direction::BackendToClient];

/// Where the echo loop stands.
#[derive(Debug)]
enum Stage {
    /// The buffer holds bytes to process.
    Process,
    /// A read is in flight.
    Reading,
    /// The output goes back to the client; then the step processing stopped on is handled.
    Flushing(Step),
    /// The reply to a close (the client's, echoed) or the gateway's close after a violation
    /// is being written.
    Replying {
        /// When the client's close came, if this reply completes its handshake.
        since: Option<Instant>,
        /// A violation: FIN and a bounded drain follow.
        violation: bool,
    },
    /// FIN sent after a violation: the client's bytes are discarded until it closes TCP or
    /// the close timeout passes at this instant.
    Draining(Instant),
    /// The echo is over.
    Done,
}

/// The watchdog's position.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Watch {
    /// Keepalive, drain and the write timeout.
    Open,
    /// The gateway's own close is being written, under the write timeout.
    Closing,
    /// The close timeout ends the connection at this instant.
    Waiting(Instant),
    /// The close timeout passed and the socket was shut.
    Over,
}

/// The gateway's own close of an echo connection, if it sent one first.
#[derive(Clone, Copy, Debug)]
struct GatewayClosed {
    /// Its code.
    code: CloseCode,
    /// Its reason text, for the access log.
    reason: &'static str,
    /// When it was decided: the start of the close handshake.
    since: Instant,
}

/// A client upgraded onto the embedded echo.
pub(crate) struct Echo {
    /// Settings, access log line, admission; taken (released) at the end.
    up: Option<Kept>,
    /// The client.
    leg: Leg,
    /// Client to client.
    pump: Pump,
    /// The echo loop.
    stage: Stage,
    /// The watchdog.
    watch: Watch,
    /// How the connection ended, for the access log.
    outcome: Outcome,
    /// The gateway's own close, if it sent one first.
    gateway_closed: Option<GatewayClosed>,
    /// The loop finished and the socket was shut: only completions are awaited.
    ended: bool,
}

impl Echo {
    /// Takes over an upgraded connection: echoes the bytes that came with the handshake,
    /// arms the read and the timer, and closes at once if the core is already draining.
    pub(crate) fn start(up: Upgraded, ctx: &CoreCtx, io: &mut dyn Io) -> (Self, Status) {
        let now = io.now();
        let Upgraded {
            client_input, kept, ..
        } = up;
        let s = *kept.settings;
        let fwd = Forwarder::new(Role::Server, s.limits, false, Mode::Echo);
        let pump = Pump::new(fwd, client_input, s.buffer);
        let mut echo = Self {
            up: Some(kept),
            leg: Leg::new(Side::Client, now),
            pump,
            stage: Stage::Process,
            watch: Watch::Open,
            outcome: Outcome::default(),
            gateway_closed: None,
            ended: false,
        };
        let mut status = echo.drive(ctx, io);
        if let Some(code) = ctx.draining.get() {
            echo.gateway_close(GatewayClose::Drain(code), now);
            status = echo.drive(ctx, io);
        }
        (echo, status)
    }

    /// Handles one event; `Done` once the connection ended with nothing in flight.
    pub(crate) fn on_event(&mut self, event: Event, ctx: &CoreCtx, io: &mut dyn Io) -> Status {
        if self.up.is_none() {
            return Status::Done;
        }
        let now = io.now();
        let limit = settings(self.up.as_ref()).buffer;
        match event {
            Event::Received { buf, result, .. } => {
                let more = self.pump.on_read(&mut self.leg, buf, &result, limit, now);
                match (&self.stage, more) {
                    (Stage::Reading, true) => self.stage = Stage::Process,
                    (Stage::Reading, false) => {
                        self.outcome.close_code = Some(CloseCode::ABNORMAL);
                        self.outcome.closed_by = Some(Closer::Client);
                        self.outcome.reason = Some("client went away");
                        self.stage = Stage::Done;
                    }
                    (Stage::Draining(_), true) => {}
                    (Stage::Draining(_), false) => self.stage = Stage::Done,
                    _ => unreachable!("a read is in flight only while reading or draining"),
                }
            }
            Event::Sent { buf, result, .. } => match self.leg.sending() {
                Sending::Control => self.leg.ctl_sent(io, buf, &result, &ctx.metrics, now),
                Sending::Data => match self.pump.on_write(&mut self.leg, buf, &result, io, now) {
                    Flushed::More => {}
                    Flushed::Done => {
                        let stage = std::mem::replace(&mut self.stage, Stage::Process);
                        let Stage::Flushing(step) = stage else {
                            unreachable!("the echo writes only while flushing")
                        };
                        self.after_step(step, ctx, io, now);
                    }
                    Flushed::Failed => self.stage = Stage::Done,
                },
                Sending::Idle => unreachable!("a write came back that was not in flight"),
            },
            Event::Timer => self.on_timer(io, now),
            Event::Drain(code) => self.gateway_close(GatewayClose::Drain(code), now),
            // The echo connects nowhere.
            Event::Connected(_) => {}
        }
        self.drive(ctx, io)
    }

    /// Moves everything along until nothing changes, then reports.
    fn drive(&mut self, ctx: &CoreCtx, io: &mut dyn Io) -> Status {
        let now = io.now();
        loop {
            let mut progress = self.step_echo(ctx, io, now);
            progress |= self.leg.pump_ctl(io, now);
            progress |= self.step_watch(io, now);
            if !self.ended && matches!(self.stage, Stage::Done) {
                self.leg.shutdown(io, Shutdown::Both);
                self.ended = true;
                progress = true;
            }
            if !progress {
                break;
            }
        }
        if self.ended && self.leg.in_flight() == 0 {
            self.finish();
            return Status::Done;
        }
        self.arm(io, now);
        Status::Running
    }

    /// One move of the echo loop; says whether anything changed.
    fn step_echo(&mut self, ctx: &CoreCtx, io: &mut dyn Io, now: Instant) -> bool {
        match &self.stage {
            Stage::Process => {
                let limit = settings(self.up.as_ref()).buffer;
                let (step, flush) = self.pump.process(limit, &ctx.metrics, &BOTH_WAYS);
                if flush {
                    self.stage = Stage::Flushing(step);
                } else {
                    self.after_step(step, ctx, io, now);
                }
                true
            }
            Stage::Flushing(_) => {
                if self.pump.buf.is_none() || self.leg.sending() != Sending::Idle {
                    return false;
                }
                if self.leg.close_decided() {
                    // The client was sent a close: nothing may follow it.
                    self.pump.done(None);
                    let stage = std::mem::replace(&mut self.stage, Stage::Process);
                    let Stage::Flushing(step) = stage else {
                        unreachable!("matched above")
                    };
                    self.after_step(step, ctx, io, now);
                } else if self.leg.write_shut() {
                    // The write would fail at once.
                    self.stage = Stage::Done;
                } else {
                    self.pump.write(&mut self.leg, io, now);
                }
                true
            }
            &Stage::Replying { since, violation } => {
                if !self.leg.settled() {
                    return false;
                }
                if let Some(since) = since {
                    // The echoed close completes the client's handshake.
                    ctx.metrics
                        .close_handshake(now.saturating_duration_since(since));
                }
                self.stage = if violation {
                    // We failed the connection: FIN after our close, then give the client a
                    // bounded moment to answer and close its side before the socket goes.
                    self.leg.shutdown(io, Shutdown::Write);
                    Stage::Draining(now + settings(self.up.as_ref()).close_timeout)
                } else {
                    Stage::Done
                };
                true
            }
            Stage::Draining(_) => {
                if self.pump.buf.is_none() {
                    false
                } else if self.leg.read_shut() {
                    self.stage = Stage::Done;
                    true
                } else {
                    self.pump.discard_read(&mut self.leg, io);
                    true
                }
            }
            Stage::Reading | Stage::Done => false,
        }
    }

    /// Goes on after the output of a processing step went out (or was dropped).
    fn after_step(&mut self, step: Step, ctx: &CoreCtx, io: &mut dyn Io, now: Instant) {
        match step {
            Step::NeedInput => {
                if self.leg.read_shut() {
                    self.outcome.close_code = Some(CloseCode::ABNORMAL);
                    self.outcome.closed_by = Some(Closer::Client);
                    self.outcome.reason = Some("client went away");
                    self.stage = Stage::Done;
                } else {
                    self.pump.read(&mut self.leg, io);
                    self.stage = Stage::Reading;
                }
            }
            Step::Close(payload) => {
                let code = payload.close_code();
                ctx.metrics.close_frame(
                    Side::Client,
                    CloseDirection::Received,
                    code.map(CloseCode::get),
                );
                self.outcome.close_code = code;
                self.outcome.closed_by = Some(Closer::Client);
                self.outcome.reason = Some("client sent close");
                if let Some(closed) = self.gateway_closed {
                    // The client answered the gateway's own close: the handshake is complete.
                    ctx.metrics
                        .close_handshake(now.saturating_duration_since(closed.since));
                    self.stage = Stage::Done;
                } else {
                    // Echo the client's close payload back: the usual reply, and the FIN
                    // follows it at once (the `Replying` stage).
                    self.leg.queue_last_close(payload);
                    self.stage = Stage::Replying {
                        since: Some(now),
                        violation: false,
                    };
                }
            }
            Step::Violation(e) => {
                self.outcome.close_code = Some(e.close_code());
                self.outcome.closed_by = Some(Closer::Gateway);
                self.outcome.reason = Some(e.as_str());
                let close = GatewayClose::ClientViolation(e).to(Side::Client);
                self.leg
                    .queue_close(Box::new(close.expect("a violator gets its close")));
                self.stage = Stage::Replying {
                    since: None,
                    violation: true,
                };
            }
        }
    }

    /// One move of the watchdog; says whether anything changed.
    fn step_watch(&mut self, io: &mut dyn Io, now: Instant) -> bool {
        match self.watch {
            Watch::Closing if self.leg.settled() => {
                self.watch = Watch::Waiting(now + settings(self.up.as_ref()).close_timeout);
            }
            Watch::Waiting(at) if now >= at => {
                self.leg.shutdown(io, Shutdown::Both);
                if !self.ended {
                    self.outcome.timed_out = true;
                }
                self.watch = Watch::Over;
            }
            _ => return false,
        }
        true
    }

    /// A timer fired: the write timeout, keepalive, and the drain's bound after a violation
    /// (the close timeout is the watchdog's, in [`Self::step_watch`]).
    fn on_timer(&mut self, io: &mut dyn Io, now: Instant) {
        let s = *settings(self.up.as_ref());
        let mut aborted = false;
        if matches!(self.watch, Watch::Open | Watch::Closing)
            && self.leg.stalled(now, s.write_timeout)
        {
            // The client stopped reading: its write or read now fails, which ends the echo.
            self.leg.abort(io);
            aborted = true;
        }
        if self.watch == Watch::Open && !aborted {
            match keepalive_check(std::slice::from_mut(&mut self.leg), &s.keepalive, io, now) {
                None => {}
                Some(Alarm::Idle) => self.gateway_close(GatewayClose::Idle, now),
                Some(Alarm::Dead(_)) => self.gateway_close(GatewayClose::ClientDead, now),
            }
        }
        if let Stage::Draining(until) = self.stage
            && now >= until
        {
            // The client did not close in time: the read in flight ends with the socket.
            self.leg.shutdown(io, Shutdown::Both);
        }
    }

    /// Asks for the next deadline, unless an earlier request stands.
    fn arm(&mut self, io: &mut dyn Io, now: Instant) {
        let s = settings(self.up.as_ref());
        let mut next = None;
        if matches!(self.watch, Watch::Open | Watch::Closing) {
            next = self.leg.write_check(now, s.write_timeout);
        }
        if self.watch == Watch::Open {
            let legs = std::slice::from_ref(&self.leg);
            next = earliest(next, keepalive_deadline(legs, &s.keepalive, now));
        }
        if let Watch::Waiting(at) = self.watch {
            next = earliest(next, Some(at));
        }
        if let Stage::Draining(until) = self.stage
            && !self.leg.read_shut()
        {
            next = earliest(next, Some(until));
        }
        arm(io, next);
    }

    /// The gateway closes the client on its own (drain, idle, dead client), unless it was
    /// already sent a close; then the close timeout runs.
    fn gateway_close(&mut self, why: GatewayClose, now: Instant) {
        if self.watch != Watch::Open {
            return;
        }
        if self.leg.close_decided() {
            self.watch = Watch::Waiting(now + settings(self.up.as_ref()).close_timeout);
            return;
        }
        let close = why
            .to(Side::Client)
            .expect("the echo's client gets the gateway's close");
        self.gateway_closed = Some(GatewayClosed {
            code: why.code(),
            reason: why.reason(),
            since: now,
        });
        self.leg.queue_close(Box::new(close));
        self.watch = Watch::Closing;
    }

    /// Writes the access log line and releases the admission slot.
    fn finish(&mut self) {
        if let Some(closed) = self.gateway_closed {
            self.outcome.close_code = Some(closed.code);
            self.outcome.closed_by = Some(Closer::Gateway);
            self.outcome.reason = Some(closed.reason);
        } else if self.leg.aborted {
            // The client stopped reading: no close frame could reach it (1006 in the log).
            self.outcome.close_code = None;
            self.outcome.closed_by = Some(Closer::Gateway);
            self.outcome.reason = Some("client stopped reading");
        }
        if let Some(up) = self.up.take() {
            up.log.write(&self.outcome, self.bytes());
        }
        self.pump.buf = None;
    }

    /// How the connection ended (complete once it reported `Done`).
    #[cfg(test)]
    pub(crate) fn outcome(&self) -> Outcome {
        self.outcome
    }

    /// Payload bytes in and out: the echo's are the same.
    fn bytes(&self) -> [u64; 2] {
        [self.pump.fwd.payload_bytes; 2]
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use codec::frame::OpCode;

    use super::*;
    use crate::conn::Phase;
    use crate::conn::testio::{
        FakeIo, admitted, client_frame, close_payload, code_of, ctx, ix, settings, upgraded,
    };

    /// Starts an echo with `input` already received.
    fn start(input: Vec<u8>) -> (CoreCtx, FakeIo, Echo, Status) {
        let ctx = ctx();
        let mut io = FakeIo::default();
        let up = upgraded(&ctx, Phase::Echo, settings(), input, Vec::new());
        let (echo, status) = Echo::start(*up, &ctx, &mut io);
        (ctx, io, echo, status)
    }

    /// Delivers an event; Done must come with nothing in flight and admission released.
    fn ev(echo: &mut Echo, event: Event, ctx: &CoreCtx, io: &mut FakeIo) -> Status {
        let status = echo.on_event(event, ctx, io);
        assert!(!io.cancelled(), "the echo never cancels");
        assert_eq!(io.fin_owed(), None, "a write said a FIN follows; none did");
        if status == Status::Done {
            assert_eq!(io.in_flight(), 0, "Done with operations in flight");
            assert_eq!(admitted(ctx), 0, "Done without releasing admission");
        }
        status
    }

    #[test]
    fn echoes_a_message_answers_a_ping_and_echoes_the_close() {
        let mut input = client_frame(OpCode::Text, b"hello");
        input.extend(client_frame(OpCode::Ping, b"p"));
        let (ctx, mut io, mut echo, status) = start(input);
        assert_eq!(status, Status::Running);
        let event = io.write(Side::Client, 3);
        assert_eq!(ev(&mut echo, event, &ctx, &mut io), Status::Running);
        let event = io.write(Side::Client, usize::MAX);
        assert_eq!(ev(&mut echo, event, &ctx, &mut io), Status::Running);
        assert_eq!(
            io.take_frames(Side::Client),
            [
                (OpCode::Text, b"hello".to_vec()),
                (OpCode::Pong, b"p".to_vec())
            ]
        );
        let bye = close_payload(1000, "bye");
        let frame = client_frame(OpCode::Close, &bye);
        let (event, n) = io.read(Side::Client, &frame[..4]);
        assert_eq!(n, 4);
        assert_eq!(ev(&mut echo, event, &ctx, &mut io), Status::Running);
        let (event, _) = io.read(Side::Client, &frame[4..]);
        assert_eq!(ev(&mut echo, event, &ctx, &mut io), Status::Running);
        let event = io.write(Side::Client, usize::MAX);
        assert_eq!(ev(&mut echo, event, &ctx, &mut io), Status::Done);
        assert_eq!(io.take_frames(Side::Client), [(OpCode::Close, bye)]);
        assert!(io.read_shut(Side::Client), "the gateway closes TCP at once");
        assert!(
            io.fin_next[ix(Side::Client)],
            "the reply and the FIN after it may leave as one segment"
        );
        let o = echo.outcome();
        assert_eq!(o.close_code, Some(CloseCode::NORMAL));
        assert_eq!((o.closed_by, echo.bytes()), (Some(Closer::Client), [5, 5]));
    }

    #[test]
    fn a_violation_gets_a_close_a_fin_and_a_bounded_wait() {
        let (ctx, mut io, mut echo, _) = start(Vec::new());
        let mut unmasked = Vec::new();
        codec::frame::write_frame(&mut unmasked, true, OpCode::Text, None, b"x");
        let (event, _) = io.read(Side::Client, &unmasked);
        assert_eq!(ev(&mut echo, event, &ctx, &mut io), Status::Running);
        let event = io.write(Side::Client, usize::MAX);
        assert_eq!(ev(&mut echo, event, &ctx, &mut io), Status::Running);
        let frames = io.take_frames(Side::Client);
        assert_eq!(code_of(&frames[0].1), 1002);
        assert!(io.write_shut(Side::Client) && !io.read_shut(Side::Client));
        // The client never closes: the close timeout ends the wait.
        let timer = io.advance(Duration::from_millis(1_001));
        assert!(matches!(timer, Some(Event::Timer)));
        let timer = timer.expect("checked");
        assert_eq!(ev(&mut echo, timer, &ctx, &mut io), Status::Running);
        let owed = io.owed().expect("the shut socket ends the read");
        assert_eq!(ev(&mut echo, owed, &ctx, &mut io), Status::Done);
        assert_eq!(echo.outcome().close_code, Some(CloseCode::PROTOCOL_ERROR));
    }

    #[test]
    fn drain_closes_the_client_and_its_reply_completes_the_handshake() {
        let (ctx, mut io, mut echo, _) = start(Vec::new());
        let status = ev(
            &mut echo,
            Event::Drain(CloseCode::GOING_AWAY),
            &ctx,
            &mut io,
        );
        assert_eq!(status, Status::Running);
        let event = io.write(Side::Client, usize::MAX);
        assert_eq!(ev(&mut echo, event, &ctx, &mut io), Status::Running);
        assert_eq!(
            io.take_frames(Side::Client),
            [(OpCode::Close, close_payload(1001, "gateway shutting down"))]
        );
        let (event, _) = io.read(Side::Client, &client_frame(OpCode::Close, &[3, 0xe9]));
        assert_eq!(ev(&mut echo, event, &ctx, &mut io), Status::Done);
        assert!(io.take_frames(Side::Client).is_empty(), "no second close");
        let o = echo.outcome();
        assert_eq!(
            (o.close_code, o.closed_by),
            (Some(CloseCode::GOING_AWAY), Some(Closer::Gateway))
        );
    }

    #[test]
    fn a_client_that_stops_reading_is_given_up_on() {
        let (ctx, mut io, mut echo, _) = start(client_frame(OpCode::Binary, b"never read"));
        assert!(io.sends[0].is_some());
        let mut status = Status::Running;
        for _ in 0..300 {
            if let Some(timer) = io.advance(Duration::from_millis(10)) {
                status = ev(&mut echo, timer, &ctx, &mut io);
            }
            if io.read_shut(Side::Client) {
                break;
            }
        }
        assert_eq!(status, Status::Running);
        assert!(io.read_shut(Side::Client));
        let owed = io.owed().expect("the write fails once shut");
        assert_eq!(ev(&mut echo, owed, &ctx, &mut io), Status::Done);
        let o = echo.outcome();
        assert_eq!(
            (o.close_code, o.reason),
            (None, Some("client stopped reading"))
        );
    }

    #[test]
    fn an_idle_echo_fits_the_allocators_512_byte_class() {
        // An idle echoed connection is this one allocation (plus its path and the loop's
        // slot): the next size class up is 640 bytes.
        let size = size_of::<Echo>();
        assert!(size <= 512, "Echo is {size} bytes");
    }
}
