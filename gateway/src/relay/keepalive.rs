//! Keepalive, idle and write-timeout decisions: when to ping a leg, when a leg is dead, when
//! a connection is idle, when a blocked write means its peer is gone. Pure functions of
//! timestamps, so the policy is testable without sockets.
#![forbid(unsafe_code)]

use std::time::{Duration, Instant};

/// The keepalive settings of a connection (zero durations switch a feature off).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Keepalive {
    /// How often the gateway pings each leg.
    pub(crate) ping_interval: Duration,
    /// How long a pinged leg has to show life (any bytes, a pong included).
    pub(crate) pong_timeout: Duration,
    /// How long a leg may send nothing before the connection is closed as idle.
    pub(crate) idle: Duration,
}

/// What the keepalive timer decided for one leg.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Nothing to do.
    Fine,
    /// Send a ping now.
    Ping,
    /// Pinged, and silent past the pong deadline: the peer is gone (half-open TCP).
    Dead,
}

impl Keepalive {
    /// Whether any timer is needed at all.
    pub(crate) fn enabled(&self) -> bool {
        !self.ping_interval.is_zero() || !self.idle.is_zero()
    }

    /// How often the timer should wake: often enough to honour every deadline within a
    /// quarter of the shortest one.
    pub(crate) fn tick(&self) -> Duration {
        [self.ping_interval, self.pong_timeout, self.idle]
            .into_iter()
            .filter(|d| !d.is_zero())
            .min()
            .map_or(Duration::from_secs(1), |d| {
                (d / 4).max(Duration::from_millis(10))
            })
    }

    /// Decides whether a leg, last heard from at `last_seen` and last pinged at `pinged`,
    /// needs a ping or is dead.
    pub(crate) fn verdict(
        &self,
        now: Instant,
        last_seen: Instant,
        pinged: Option<Instant>,
    ) -> Verdict {
        if self.ping_interval.is_zero() {
            return Verdict::Fine;
        }
        match pinged {
            // Pinged, nothing heard since: dead once the deadline passes.
            Some(at) if at >= last_seen => {
                if now.saturating_duration_since(at) >= self.pong_timeout {
                    Verdict::Dead
                } else {
                    Verdict::Fine
                }
            }
            // Heard from since the last ping (or never pinged): ping when quiet long enough.
            _ if now.saturating_duration_since(last_seen) >= self.ping_interval => Verdict::Ping,
            _ => Verdict::Fine,
        }
    }

    /// Whether a connection whose legs were last heard from at `latest` (the later of the
    /// two) has been silent both ways past the idle timeout.
    pub(crate) fn is_idle(&self, now: Instant, latest: Instant) -> bool {
        !self.idle.is_zero() && now.saturating_duration_since(latest) >= self.idle
    }
}

/// How long a write may move no bytes before its peer is taken for dead (it stopped reading):
/// whole milliseconds, 0 = never. Four bytes rather than a `Duration`: every connection keeps
/// a copy in its settings, where it fits in padding.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct WriteTimeout(u32);

impl WriteTimeout {
    /// `timeout`, to the millisecond, at most `u32::MAX` ms (49 days); zero means never.
    pub(crate) fn new(timeout: Duration) -> Self {
        Self(u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX))
    }

    /// Whether writes are timed at all.
    pub(crate) fn enabled(self) -> bool {
        self.0 != 0
    }

    /// Whether a write that has moved no bytes for `stalled` has been stuck for the timeout.
    pub(crate) fn expired(self, stalled: Duration) -> bool {
        self.enabled() && stalled.as_millis() >= u128::from(self.0)
    }

    /// The timeout itself.
    pub(crate) fn duration(self) -> Duration {
        Duration::from_millis(u64::from(self.0))
    }

    /// A quarter of the timeout (at least 10 ms): how soon a deadline that came due is looked
    /// at again.
    pub(crate) fn tick(self) -> Duration {
        (Duration::from_millis(u64::from(self.0)) / 4).max(Duration::from_millis(10))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn ping_then_dead_then_alive_again() {
        let ka = Keepalive {
            ping_interval: 10 * S,
            pong_timeout: 5 * S,
            idle: Duration::ZERO,
        };
        let t0 = Instant::now();
        assert_eq!(ka.verdict(t0 + 9 * S, t0, None), Verdict::Fine);
        assert_eq!(ka.verdict(t0 + 10 * S, t0, None), Verdict::Ping);
        let pinged = Some(t0 + 10 * S);
        assert_eq!(ka.verdict(t0 + 14 * S, t0, pinged), Verdict::Fine);
        assert_eq!(ka.verdict(t0 + 15 * S, t0, pinged), Verdict::Dead);
        // A pong (any bytes) after the ping keeps it alive; the next ping waits an interval.
        assert_eq!(ka.verdict(t0 + 15 * S, t0 + 11 * S, pinged), Verdict::Fine);
        assert_eq!(ka.verdict(t0 + 21 * S, t0 + 11 * S, pinged), Verdict::Ping);
    }

    #[test]
    fn idle_without_pings_and_pongs_count_as_life() {
        let idle_only = Keepalive {
            idle: 30 * S,
            ..Keepalive::default()
        };
        let t0 = Instant::now();
        assert!(!idle_only.is_idle(t0 + 29 * S, t0));
        assert!(idle_only.is_idle(t0 + 30 * S, t0));
        assert_eq!(idle_only.verdict(t0 + 60 * S, t0, None), Verdict::Fine);
        // With pings every 10 s, a peer that pongs is never silent for 30 s.
        let both = Keepalive {
            ping_interval: 10 * S,
            pong_timeout: 5 * S,
            idle: 30 * S,
        };
        assert_eq!(
            both.verdict(t0 + 30 * S, t0 + 21 * S, Some(t0 + 20 * S)),
            Verdict::Fine
        );
        assert!(!both.is_idle(t0 + 31 * S, t0 + 21 * S));
        assert!(both.enabled() && !Keepalive::default().enabled());
        assert_eq!(both.tick(), Duration::from_millis(1250));
    }

    #[test]
    fn write_timeout_counts_from_the_last_progress() {
        let wt = WriteTimeout::new(Duration::from_secs(2));
        let ms = Duration::from_millis;
        assert!(!wt.expired(ms(1_999)) && wt.expired(ms(2_000)) && wt.expired(Duration::MAX));
        let never = WriteTimeout::new(Duration::ZERO);
        assert!(!never.enabled() && !never.expired(Duration::MAX));
        assert_eq!(WriteTimeout::new(Duration::MAX), WriteTimeout(u32::MAX));
        assert_eq!(wt.tick(), Duration::from_millis(500));
    }
}
