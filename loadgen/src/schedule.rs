//! The open-loop send schedule and the latency it implies.
//!
//! With `--rate`, every connection owes messages at fixed instants (wrk2's constant
//! throughput). A connection keeps one message in flight: if the echo of message k comes back
//! after message k+1 was due, k+1 goes out late, and its latency is still counted from the
//! instant it was *due*. A server that stalls for a second therefore shows a second of latency
//! on every message that should have been sent during the stall, instead of on one sample
//! (the coordinated omission that closed-loop tools suffer).
//!
//! The timer wheel only promises to wake a task within its 1 ms tick, which on loopback is
//! ten times a round trip. So a message may go out up to [`EARLY`] ahead of its time, and its
//! latency counts from the earlier of its intended and actual send times: lateness (ours or
//! the server's) is always counted, and earliness never shortens a sample below the real
//! round trip.

use std::time::{Duration, Instant};

/// How far ahead of its intended time a message may be sent: one timer tick.
pub(crate) const EARLY: Duration = Duration::from_millis(1);

/// Evenly spaced intended send times for one connection.
#[derive(Clone, Debug)]
pub(crate) struct Schedule {
    first: Instant,
    interval_ns: u64,
    next: u64,
}

impl Schedule {
    /// The schedule of connection `index` out of `connections` sharing `total_rate` per second,
    /// starting at `origin`. Connections are phase-shifted by `1 / total_rate` so that the
    /// aggregate is a smooth stream rather than bursts of `connections` messages.
    pub(crate) fn new(origin: Instant, total_rate: f64, connections: usize, index: usize) -> Self {
        #[expect(
            clippy::cast_precision_loss,
            reason = "connection counts are far below 2^52"
        )]
        let (connections, index) = (connections as f64, index as f64);
        let gap = 1e9 / total_rate;
        #[expect(
            clippy::cast_sign_loss,
            clippy::cast_possible_truncation,
            reason = "rates are validated positive and finite; nanosecond rounding is intended"
        )]
        let (interval_ns, offset_ns) = (
            (gap * connections).round().max(1.0) as u64,
            (gap * index).round() as u64,
        );
        Self {
            first: origin + Duration::from_nanos(offset_ns),
            interval_ns,
            next: 0,
        }
    }

    /// When the next message is due.
    pub(crate) fn due(&self) -> Instant {
        self.first + Duration::from_nanos(self.interval_ns.saturating_mul(self.next))
    }

    /// When to wake for the next message: one [`EARLY`] tick before it is due.
    pub(crate) fn wake_at(&self) -> Instant {
        self.due().checked_sub(EARLY).unwrap_or(self.first)
    }

    /// Whether the next message may go out at `now`.
    pub(crate) fn ready(&self, now: Instant) -> bool {
        self.due() <= now + EARLY
    }

    /// Marks the message that was due as sent; the following one is due one interval later,
    /// whatever time it is now (falling behind never shifts the schedule).
    pub(crate) fn advance(&mut self) {
        self.next += 1;
    }
}

/// Where a message's latency starts: its intended send time, or its actual one if it went out
/// early (closed loop: the two coincide).
pub(crate) fn origin(intended: Instant, sent: Instant) -> Instant {
    intended.min(sent)
}

/// A message's latency: from its [`origin`] to the arrival of its echo.
pub(crate) fn latency(origin: Instant, received: Instant) -> Duration {
    received.saturating_duration_since(origin)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_split_the_rate_and_interleave() {
        let t0 = Instant::now();
        // 1000 msg/s over 4 connections: each sends every 4 ms, offset by 1 ms from the last.
        let mut schedules: Vec<_> = (0..4).map(|i| Schedule::new(t0, 1000.0, 4, i)).collect();
        let mut all = Vec::new();
        for s in &mut schedules {
            for _ in 0..3 {
                all.push(s.due() - t0);
                s.advance();
            }
        }
        all.sort();
        let expected: Vec<_> = (0..12).map(Duration::from_millis).collect();
        assert_eq!(all, expected);
    }

    #[test]
    fn falling_behind_does_not_move_the_schedule() {
        let t0 = Instant::now();
        let mut s = Schedule::new(t0, 100.0, 1, 0);
        s.advance();
        s.advance();
        // However late the previous echo was, message 2 was due at 20 ms.
        assert_eq!(s.due() - t0, Duration::from_millis(20));
        assert_eq!(
            latency(s.due(), t0 + Duration::from_millis(500)),
            Duration::from_millis(480)
        );
        // An echo can never be "early" relative to a due time in the future.
        assert_eq!(latency(s.due(), t0), Duration::ZERO);
    }

    #[test]
    fn timer_slack_never_hides_lateness_nor_shortens_a_round_trip() {
        let t0 = Instant::now();
        let us = Duration::from_micros;
        let s = Schedule::new(t0 + us(10_000), 1.0, 1, 0);
        let due = s.due();
        assert_eq!(due, t0 + us(10_000));
        assert_eq!(s.wake_at(), t0 + us(9_000));
        assert!(!s.ready(t0 + us(8_999)));
        assert!(s.ready(t0 + us(9_000)));
        // Sent 600 µs early, echoed 100 µs later: the sample is the 100 µs round trip.
        let sent = t0 + us(9_400);
        assert_eq!(latency(origin(due, sent), sent + us(100)), us(100));
        // Sent 5 ms late: the 5 ms count too.
        let sent = t0 + us(15_000);
        assert_eq!(latency(origin(due, sent), sent + us(100)), us(5_100));
    }
}
