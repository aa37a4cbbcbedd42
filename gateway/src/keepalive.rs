//! Keepalive and idle decisions: when to ping a leg, when a leg is dead, when a connection
//! is idle. Pure functions of timestamps, so the policy is testable without sockets.
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

    /// Waits one tick; never ends when keepalive is off. The timer is boxed and made only
    /// when needed: inline, it would take room in every idle connection's watchdog.
    pub(crate) async fn next_tick(&self) {
        if self.enabled() {
            Box::pin(tokio::time::sleep(self.tick())).await;
        } else {
            std::future::pending::<()>().await;
        }
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
}
