//! `echo`: each connection sends a message, awaits its echo, verifies it byte for byte, and
//! records the round trip. Closed loop (next message as soon as the echo is in) unless
//! `--rate` sets an open-loop schedule, in which case latency counts from each message's
//! intended send time (see [`crate::schedule`]). At the end the connection is closed with a
//! full close handshake.

use std::time::Instant;

use crate::closer::Closer;
use crate::control::{LiveSlot, Windows};
use crate::errors::ErrorKind;
use crate::frames;
use crate::payload::{EchoCheck, Echoed, Payload};
use crate::schedule::{self, Schedule};
use crate::session::{Handler, Incoming, Step, Wait};
use crate::stats::Metric;
use crate::worker::ThreadCtx;

use super::{drive, open_in_ramp, settle};

/// Runs echo connection `index`.
pub(super) async fn run(ctx: &ThreadCtx, index: usize) {
    let opened = open_in_ramp(ctx).await;
    // Built before the ramp counts this connection, so its setup is not charged to the run.
    let mut echo = Echo::new(ctx, index);
    LiveSlot::bump(&ctx.live().attempted);
    if let Some(opened) = opened {
        drive(ctx, opened, &mut echo).await;
    }
}

/// Where an echo connection stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Waiting for the run to start.
    AwaitStart,
    /// Open loop: wake at this instant for the next message.
    Paced(Instant),
    /// A message is out: due at `intended` (closed loop: when it was sent), its latency
    /// counting from `origin`, written at `sent`.
    InFlight {
        intended: Instant,
        origin: Instant,
        sent: Instant,
    },
    /// The run is over (or the server closed); the close handshake is under way.
    Closing,
}

/// The echo handler of one connection.
pub(super) struct Echo<'a> {
    ctx: &'a ThreadCtx,
    index: usize,
    payload: Payload,
    check: EchoCheck,
    seq: u64,
    windows: Option<Windows>,
    schedule: Option<Schedule>,
    phase: Phase,
    closer: Closer,
}

impl<'a> Echo<'a> {
    pub(super) fn new(ctx: &'a ThreadCtx, index: usize) -> Self {
        let cfg = ctx.cfg();
        Self {
            ctx,
            index,
            payload: Payload::new(cfg.size, index),
            check: EchoCheck::default(),
            seq: 0,
            windows: None,
            schedule: None,
            phase: Phase::AwaitStart,
            closer: Closer::new(cfg.close_timeout),
        }
    }

    /// Sends the next message if it is due, waits for it if it is not, or starts closing
    /// once the run is over.
    fn next(&mut self, now: Instant, out: &mut Vec<u8>) -> Step {
        let Some(windows) = self.windows else {
            return Step::Continue;
        };
        let intended = self.schedule.as_ref().map_or(now, Schedule::due);
        if intended >= windows.end {
            self.closer.start(out);
            self.phase = Phase::Closing;
            return Step::Continue;
        }
        if let Some(s) = &mut self.schedule {
            if !s.ready(now) {
                self.phase = Phase::Paced(s.wake_at());
                return Step::Continue;
            }
            s.advance();
            if windows.measures(intended) {
                self.ctx
                    .record(Metric::SendLag, now.saturating_duration_since(intended));
            }
        }
        self.seq += 1;
        self.payload.stamp(self.seq);
        frames::encode(out, self.ctx.cfg().opcode(), self.payload.bytes());
        self.phase = Phase::InFlight {
            intended,
            origin: schedule::origin(intended, now),
            sent: now,
        };
        Step::Continue
    }

    /// Counts a verified echo of a message due at `intended`, timed from `origin`.
    fn completed(&self, intended: Instant, origin: Instant, now: Instant) {
        let measured = self.windows.is_some_and(|w| w.measures(intended));
        let mut stats = self.ctx.stats.borrow_mut();
        if measured {
            stats.record(Metric::Echo, schedule::latency(origin, now));
            stats.counts.messages += 1;
            stats.counts.bytes += self.payload.len() as u64;
        } else {
            stats.counts.unmeasured_messages += 1;
        }
        LiveSlot::bump(&self.ctx.live().done);
    }

    /// Marks a message still awaiting its echo as lost with the connection.
    fn abandon(&self) {
        if matches!(self.phase, Phase::InFlight { .. }) {
            self.ctx.stats.borrow_mut().counts.unfinished += 1;
        }
    }
}

impl Handler for Echo<'_> {
    fn wait(&self) -> Wait {
        match self.phase {
            Phase::AwaitStart => self
                .ctx
                .windows()
                .map_or(Wait::Start, |w| Wait::Until(w.go)),
            Phase::Paced(at) => Wait::Until(at),
            Phase::InFlight { sent, .. } => Wait::Until(sent + self.ctx.cfg().timeout),
            Phase::Closing => self.closer.deadline().map_or(Wait::Frames, Wait::Until),
        }
    }

    fn on_wake(&mut self, now: Instant, out: &mut Vec<u8>) -> Step {
        match self.phase {
            Phase::AwaitStart => {
                let Some(windows) = self.ctx.windows() else {
                    return Step::Continue;
                };
                let cfg = self.ctx.cfg();
                self.windows = Some(windows);
                self.schedule = cfg
                    .rate
                    .map(|rate| Schedule::new(windows.go, rate, cfg.connections, self.index));
                self.next(now, out)
            }
            Phase::Paced(_) => self.next(now, out),
            Phase::InFlight { sent, .. } if now >= sent + self.ctx.cfg().timeout => {
                Step::Fail(ErrorKind::Timeout)
            }
            Phase::InFlight { .. } => Step::Continue,
            Phase::Closing => settle(self.ctx, self.closer.on_timer(now), false),
        }
    }

    fn on_incoming(&mut self, event: Incoming<'_>, now: Instant, out: &mut Vec<u8>) -> Step {
        match event {
            Incoming::Data(frame) => match self.phase {
                Phase::InFlight {
                    intended, origin, ..
                } => {
                    let continuation = frame.opcode == codec::OpCode::Continuation;
                    let type_ok = frame.opcode == self.ctx.cfg().opcode();
                    match self.check.frame(
                        &self.payload,
                        continuation,
                        type_ok,
                        frame.fin,
                        frame.payload,
                    ) {
                        Echoed::Partial => Step::Continue,
                        Echoed::Complete => {
                            self.completed(intended, origin, now);
                            self.next(now, out)
                        }
                        Echoed::Mismatch => Step::Fail(ErrorKind::PayloadMismatch),
                    }
                }
                // Late frames of a message cut short by the server's Close.
                Phase::Closing => Step::Continue,
                Phase::AwaitStart | Phase::Paced(_) => Step::Fail(ErrorKind::PayloadMismatch),
            },
            Incoming::Close(code) => {
                if !self.closer.closing() {
                    self.ctx.stats.borrow_mut().counts.server_closes += 1;
                    self.abandon();
                }
                self.phase = Phase::Closing;
                settle(self.ctx, self.closer.on_close(code, now, out), false)
            }
            Incoming::Eof => {
                self.abandon();
                settle(self.ctx, self.closer.on_eof(now), false)
            }
        }
    }

    fn on_written(&mut self, submitted: Instant) {
        self.closer.on_written(submitted);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use codec::frame::{Decoded, FrameHeader, OpCode, Role};
    use codec::mask::apply_mask;

    use super::*;
    use crate::frames::Frame;
    use crate::worker::ThreadCtx;

    /// The unmasked payloads of the frames the handler queued, and whether one was a Close.
    fn sent(out: &mut Vec<u8>) -> (Vec<Vec<u8>>, bool) {
        let (mut messages, mut close) = (Vec::new(), false);
        let mut at = 0;
        while at < out.len() {
            let Ok(Decoded::Header { header, len }) =
                FrameHeader::decode(&out[at..], Role::Server, 0)
            else {
                panic!("handler wrote a broken frame")
            };
            let start = at + len;
            let end = start + header.payload_len as usize;
            let mut payload = out[start..end].to_vec();
            apply_mask(&mut payload, header.mask.expect("client frames are masked"));
            match header.opcode {
                OpCode::Close => close = true,
                _ => messages.push(payload),
            }
            at = end;
        }
        out.clear();
        (messages, close)
    }

    /// Runs one open-loop connection against a simulated echo server that answers after
    /// `service` except during `stall` (from, to), when answers wait until the stall ends.
    /// Returns (p50, p99, messages measured) in µs.
    fn simulate(stall: Option<(Duration, Duration)>) -> (u64, u64, u64) {
        let service = Duration::from_micros(100);
        let ctx = ThreadCtx::for_tests(&[
            "--rate",
            "100",
            "-c",
            "1",
            "-d",
            "2s",
            "--warmup",
            "0s",
            "--timeout",
            "10s",
        ]);
        let go = ctx.start_for_tests();
        let mut echo = Echo::new(&ctx, 0);
        let (mut out, mut now, mut in_flight) = (Vec::new(), go, None::<Vec<u8>>);
        loop {
            // Deliver the echo of the message in flight, else let the handler's deadline pass.
            let step = if let Some(message) = in_flight.take() {
                now = match stall {
                    Some((from, to)) if (go + from..go + to).contains(&now) => go + to + service,
                    _ => now + service,
                };
                let frame = Frame {
                    opcode: OpCode::Binary,
                    fin: true,
                    payload: &message,
                };
                echo.on_incoming(Incoming::Data(frame), now, &mut out)
            } else {
                let Wait::Until(t) = echo.wait() else {
                    panic!("an open-loop connection always has a deadline")
                };
                now = now.max(t);
                echo.on_wake(now, &mut out)
            };
            assert_eq!(step, Step::Continue);
            echo.on_written(now);
            let (mut messages, close) = sent(&mut out);
            if close {
                let normal = Incoming::Close(Some(codec::CloseCode::NORMAL));
                assert_eq!(echo.on_incoming(normal, now, &mut out), Step::Continue);
                assert_eq!(echo.on_incoming(Incoming::Eof, now, &mut out), Step::Done);
                break;
            }
            assert!(messages.len() <= 1, "one message in flight per connection");
            in_flight = messages.pop();
        }
        let stats = ctx.stats.borrow();
        let h = stats.histogram(Metric::Echo);
        (
            h.value_at_quantile(0.5),
            h.value_at_quantile(0.99),
            stats.counts.messages,
        )
    }

    #[test]
    fn steady_server_shows_its_service_time() {
        let (p50, p99, n) = simulate(None);
        assert_eq!(n, 200);
        assert!(
            (99..=101).contains(&p50) && (99..=101).contains(&p99),
            "{p50} {p99}"
        );
    }

    #[test]
    fn a_stalled_server_shows_up_at_the_tail() {
        // 200 ms stall at 1 s: 20 messages were due during it, each late by the rest of it.
        let (p50, p99, n) = simulate(Some((Duration::from_secs(1), Duration::from_millis(1200))));
        assert_eq!(
            n, 200,
            "the schedule does not shrink when the server stalls"
        );
        assert!((99..=101).contains(&p50), "median unaffected: {p50}");
        assert!(
            p99 > 150_000,
            "a closed-loop view would report ~100µs; got {p99}"
        );
    }
}
