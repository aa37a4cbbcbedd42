//! `close` and `idle`: open a connection, optionally exchange a few verified messages, hold
//! it, then close it with a full close handshake. `close` closes at the start (or at
//! `--rate` closes/s) and records the handshake's latencies; `idle` holds until the run ends.
//! The connect scenario reuses the handler to close each connection right after the upgrade.

use std::time::{Duration, Instant};

use crate::closer::Closer;
use crate::config::Scenario;
use crate::control::LiveSlot;
use crate::errors::ErrorKind;
use crate::frames;
use crate::payload::{EchoCheck, Echoed, Payload};
use crate::session::{Handler, Incoming, Step, Wait};
use crate::worker::ThreadCtx;

use super::{drive, open_in_ramp, settle};

/// Runs close or idle connection `index`.
pub(super) async fn run(ctx: &ThreadCtx, index: usize) {
    let Some(opened) = open_in_ramp(ctx).await else {
        LiveSlot::bump(&ctx.live().attempted);
        return;
    };
    let cfg = ctx.cfg();
    let mut hold = if cfg.scenario == Scenario::Close {
        #[expect(
            clippy::cast_precision_loss,
            reason = "connection indices are far below 2^52"
        )]
        let offset = cfg.rate.map_or(Duration::ZERO, |rate| {
            Duration::from_secs_f64(index as f64 / rate)
        });
        Hold::new(
            ctx,
            index,
            CloseAt::AfterStart(offset),
            cfg.messages_before_close,
            true,
        )
    } else {
        Hold::new(ctx, index, CloseAt::End, 0, false)
    };
    if !hold.in_ramp() {
        LiveSlot::bump(&ctx.live().attempted);
    }
    drive(ctx, opened, &mut hold).await;
    if hold.in_ramp() {
        LiveSlot::bump(&ctx.live().attempted);
    }
}

/// When the connection is to be closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum CloseAt {
    /// At this instant (connect scenario: right away).
    Instant(Instant),
    /// This long after the run starts (close scenario).
    AfterStart(Duration),
    /// When the run ends (idle scenario).
    End,
}

/// Where the connection stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Exchanging `left` more messages, the current one sent at `sent` (`None`: not yet).
    Exchange { left: u64, sent: Option<Instant> },
    /// Waiting for the close time.
    Holding,
    /// The close handshake is under way.
    Closing,
}

/// The hold-then-close handler of one connection.
pub(super) struct Hold<'a> {
    ctx: &'a ThreadCtx,
    created: Instant,
    close_at: CloseAt,
    phase: Phase,
    closer: Closer,
    record: bool,
    payload: Payload,
    check: EchoCheck,
    seq: u64,
}

impl<'a> Hold<'a> {
    /// A handler that first exchanges `exchange` messages, closes at `close_at`, and records
    /// close latencies if `record`.
    pub(super) fn new(
        ctx: &'a ThreadCtx,
        index: usize,
        close_at: CloseAt,
        exchange: u64,
        record: bool,
    ) -> Self {
        let cfg = ctx.cfg();
        let phase = if exchange > 0 {
            Phase::Exchange {
                left: exchange,
                sent: None,
            }
        } else {
            Phase::Holding
        };
        Self {
            ctx,
            created: Instant::now(),
            close_at,
            phase,
            closer: Closer::new(cfg.close_timeout),
            record,
            payload: Payload::new(if exchange > 0 { cfg.size } else { 0 }, index),
            check: EchoCheck::default(),
            seq: 0,
        }
    }

    /// Whether the connection is still part of the ramp (its exchange is not over).
    pub(super) fn in_ramp(&self) -> bool {
        matches!(self.phase, Phase::Exchange { .. })
    }

    fn close_time(&self) -> Option<Instant> {
        match self.close_at {
            CloseAt::Instant(at) => Some(at),
            CloseAt::AfterStart(offset) => self.ctx.windows().map(|w| w.go + offset),
            CloseAt::End => self.ctx.windows().map(|w| w.end),
        }
    }

    fn send(&mut self, left: u64, now: Instant, out: &mut Vec<u8>) {
        self.seq += 1;
        self.payload.stamp(self.seq);
        frames::encode(out, self.ctx.cfg().opcode(), self.payload.bytes());
        self.phase = Phase::Exchange {
            left,
            sent: Some(now),
        };
    }
}

impl Handler for Hold<'_> {
    fn wait(&self) -> Wait {
        match self.phase {
            Phase::Exchange { sent: None, .. } => Wait::Until(self.created),
            Phase::Exchange { sent: Some(s), .. } => Wait::Until(s + self.ctx.cfg().timeout),
            Phase::Holding => self.close_time().map_or(Wait::Start, Wait::Until),
            Phase::Closing => self.closer.deadline().map_or(Wait::Frames, Wait::Until),
        }
    }

    fn on_wake(&mut self, now: Instant, out: &mut Vec<u8>) -> Step {
        match self.phase {
            Phase::Exchange { left, sent: None } => {
                self.send(left, now, out);
                Step::Continue
            }
            Phase::Exchange { sent: Some(s), .. } if now >= s + self.ctx.cfg().timeout => {
                Step::Fail(ErrorKind::Timeout)
            }
            Phase::Exchange { .. } => Step::Continue,
            Phase::Holding => {
                if self.close_time().is_some_and(|t| t <= now) {
                    self.closer.start(out);
                    self.phase = Phase::Closing;
                }
                Step::Continue
            }
            Phase::Closing => settle(self.ctx, self.closer.on_timer(now), self.record),
        }
    }

    fn on_incoming(&mut self, event: Incoming<'_>, now: Instant, out: &mut Vec<u8>) -> Step {
        match event {
            Incoming::Data(frame) => match self.phase {
                Phase::Exchange {
                    left,
                    sent: Some(_),
                } => {
                    let continuation = frame.opcode == codec::OpCode::Continuation;
                    let type_ok = frame.opcode == self.ctx.cfg().opcode();
                    let echoed = self.check.frame(
                        &self.payload,
                        continuation,
                        type_ok,
                        frame.fin,
                        frame.payload,
                    );
                    match echoed {
                        Echoed::Partial => Step::Continue,
                        Echoed::Mismatch => Step::Fail(ErrorKind::PayloadMismatch),
                        Echoed::Complete => {
                            self.ctx.stats.borrow_mut().counts.unmeasured_messages += 1;
                            if left > 1 {
                                self.send(left - 1, now, out);
                            } else {
                                self.phase = Phase::Holding;
                                LiveSlot::bump(&self.ctx.live().attempted);
                            }
                            Step::Continue
                        }
                    }
                }
                Phase::Closing => Step::Continue,
                // Nobody asked for this message.
                Phase::Exchange { sent: None, .. } | Phase::Holding => {
                    Step::Fail(ErrorKind::PayloadMismatch)
                }
            },
            Incoming::Close(code) => {
                if !self.closer.closing() {
                    self.ctx.stats.borrow_mut().counts.server_closes += 1;
                }
                self.phase = Phase::Closing;
                settle(self.ctx, self.closer.on_close(code, now, out), self.record)
            }
            Incoming::Eof => settle(self.ctx, self.closer.on_eof(now), self.record),
        }
    }

    fn on_written(&mut self, submitted: Instant) {
        self.closer.on_written(submitted);
    }
}

#[cfg(test)]
mod tests {
    use codec::CloseCode;

    use super::*;
    use crate::stats::Metric;

    #[test]
    fn close_scenario_records_both_latencies_from_the_write() {
        let ctx = ThreadCtx::for_tests(&["--scenario", "close", "--rate", "10"]);
        let mut hold = Hold::new(
            &ctx,
            3,
            CloseAt::AfterStart(Duration::from_millis(300)),
            0,
            true,
        );
        assert_eq!(hold.wait(), Wait::Start);
        let go = ctx.start_for_tests();
        let close_at = go + Duration::from_millis(300);
        assert_eq!(hold.wait(), Wait::Until(close_at));
        let mut out = Vec::new();
        assert_eq!(hold.on_wake(close_at, &mut out), Step::Continue);
        assert!(!out.is_empty(), "our Close is queued");
        let written = close_at + Duration::from_micros(10);
        hold.on_written(written);
        let ms = Duration::from_millis;
        let close = Incoming::Close(Some(CloseCode::NORMAL));
        assert_eq!(
            hold.on_incoming(close, written + ms(2), &mut out),
            Step::Continue
        );
        assert_eq!(
            hold.on_incoming(Incoming::Eof, written + ms(7), &mut out),
            Step::Done
        );
        let stats = ctx.stats.borrow();
        let (reply, eof) = (
            stats.histogram(Metric::CloseReply),
            stats.histogram(Metric::CloseEof),
        );
        assert!(reply.equivalent(reply.max(), 2_000), "{}", reply.max());
        assert!(eof.equivalent(eof.max(), 7_000), "{}", eof.max());
        assert_eq!(stats.counts.closes, 1);
    }

    #[test]
    fn an_unanswered_close_is_a_timeout_and_no_sample() {
        let ctx = ThreadCtx::for_tests(&["--scenario", "close", "--close-timeout", "1s"]);
        let go = ctx.start_for_tests();
        let mut hold = Hold::new(&ctx, 0, CloseAt::AfterStart(Duration::ZERO), 0, true);
        let mut out = Vec::new();
        hold.on_wake(go, &mut out);
        hold.on_written(go);
        let Wait::Until(deadline) = hold.wait() else {
            panic!("a close in flight has a deadline")
        };
        assert_eq!(deadline, go + Duration::from_secs(1));
        assert_eq!(
            hold.on_wake(deadline, &mut out),
            Step::Fail(ErrorKind::CloseTimeout)
        );
        assert!(ctx.stats.borrow().histogram(Metric::CloseReply).is_empty());
    }

    #[test]
    fn exchange_then_server_initiated_close() {
        let ctx = ThreadCtx::for_tests(&["--scenario", "close", "--size", "8"]);
        let mut hold = Hold::new(&ctx, 0, CloseAt::End, 2, true);
        let now = Instant::now();
        let mut out = Vec::new();
        for _ in 0..2 {
            assert!(hold.in_ramp());
            hold.on_wake(now, &mut out);
            out.clear();
            let frame = frames::Frame {
                opcode: codec::OpCode::Binary,
                fin: true,
                payload: hold.payload.bytes(),
            };
            let echo = frame.payload.to_vec();
            let frame = frames::Frame {
                payload: &echo,
                ..frame
            };
            assert_eq!(
                hold.on_incoming(Incoming::Data(frame), now, &mut out),
                Step::Continue
            );
        }
        assert!(!hold.in_ramp());
        assert_eq!(ctx.stats.borrow().counts.unmeasured_messages, 2);
        let away = Incoming::Close(Some(CloseCode::GOING_AWAY));
        assert_eq!(hold.on_incoming(away, now, &mut out), Step::Continue);
        assert!(!out.is_empty(), "the server's Close is answered");
        assert_eq!(hold.on_incoming(Incoming::Eof, now, &mut out), Step::Done);
        let stats = ctx.stats.borrow();
        assert_eq!((stats.counts.server_closes, stats.counts.closes), (1, 0));
        assert_eq!(stats.histogram(Metric::ServerCloseEof).len(), 1);
    }
}
