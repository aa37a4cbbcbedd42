//! Per-thread measurements: one HdrHistogram per latency, error counts, counters. Each thread
//! owns its `Recorder` (no sharing on the hot path) and they are merged once at the end.

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;

use crate::errors::ErrorKind;

/// Largest latency a histogram holds exactly: one hour in microseconds (larger values saturate).
const MAX_US: u64 = 3_600_000_000;
/// Significant figures, as the issue asks: 0.1% value resolution.
const SIG_FIGS: u8 = 3;

/// A measured latency.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Metric {
    /// Echo round trip: from the intended send time (open loop; the actual one if earlier) or
    /// the send (closed loop) to the whole echo arriving.
    Echo,
    /// Open loop only: how late each message went out after its intended time (0 when the
    /// timer let it out early). It is part of [`Metric::Echo`], shown so that loadgen's own
    /// lag can be told apart from the server's.
    SendLag,
    /// TCP connect alone, from the attempt's actual start.
    Connect,
    /// TCP connect plus the HTTP upgrade, to the 101 being parsed, from the intended start
    /// (open loop; the actual one if earlier) or the actual one.
    Upgrade,
    /// Our Close frame written to the server's Close frame arriving.
    CloseReply,
    /// Our Close frame written to the server dropping TCP (EOF).
    CloseEof,
    /// A server-initiated Close arriving to the server dropping TCP after our answer.
    ServerCloseEof,
}

impl Metric {
    /// Every metric, in report order.
    pub(crate) const ALL: [Self; 7] = [
        Self::Echo,
        Self::SendLag,
        Self::Connect,
        Self::Upgrade,
        Self::CloseReply,
        Self::CloseEof,
        Self::ServerCloseEof,
    ];

    /// Position in [`Self::ALL`].
    pub(crate) const fn index(self) -> usize {
        self as usize
    }

    /// Stable name used in the summary and the JSON.
    pub(crate) const fn name(self) -> &'static str {
        match self {
            Self::Echo => "echo_rtt",
            Self::SendLag => "send_lag",
            Self::Connect => "tcp_connect",
            Self::Upgrade => "connect_upgrade",
            Self::CloseReply => "close_reply",
            Self::CloseEof => "close_eof",
            Self::ServerCloseEof => "server_close_eof",
        }
    }
}

/// A fresh histogram with the run's bounds (µs, 1 µs to 1 h, 3 significant figures).
pub(crate) fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_US, SIG_FIGS).expect("static histogram bounds are valid")
}

/// Event counts that are not latencies.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Counts {
    /// Connections that completed the upgrade (connect scenario: every cycle's).
    pub(crate) opened: u64,
    /// Connection attempts that failed before the upgrade completed.
    pub(crate) failed: u64,
    /// Echoes verified and counted inside the measured window.
    pub(crate) messages: u64,
    /// Payload bytes of those echoes (one direction).
    pub(crate) bytes: u64,
    /// Echoes verified outside the measured window: warmup, or exchanged before a close.
    pub(crate) unmeasured_messages: u64,
    /// Messages still awaiting their echo when their connection ended.
    pub(crate) unfinished: u64,
    /// Connect-scenario cycles (connect, upgrade, close) completed inside the window.
    pub(crate) cycles: u64,
    /// Close handshakes we started that completed (Close answered and TCP dropped).
    pub(crate) closes: u64,
    /// Close handshakes the server started.
    pub(crate) server_closes: u64,
}

impl Counts {
    fn add(&mut self, o: &Self) {
        self.opened += o.opened;
        self.failed += o.failed;
        self.messages += o.messages;
        self.bytes += o.bytes;
        self.unmeasured_messages += o.unmeasured_messages;
        self.unfinished += o.unfinished;
        self.cycles += o.cycles;
        self.closes += o.closes;
        self.server_closes += o.server_closes;
    }
}

/// One thread's measurements.
#[derive(Clone, Debug)]
pub(crate) struct Recorder {
    histograms: Vec<Histogram<u64>>,
    errors: [u64; ErrorKind::ALL.len()],
    /// Non-101 statuses seen, so `handshake_status` can say which.
    pub(crate) statuses: BTreeMap<u16, u64>,
    /// Event counters.
    pub(crate) counts: Counts,
}

impl Default for Recorder {
    fn default() -> Self {
        Self {
            histograms: Metric::ALL.iter().map(|_| new_histogram()).collect(),
            errors: [0; ErrorKind::ALL.len()],
            statuses: BTreeMap::new(),
            counts: Counts::default(),
        }
    }
}

/// Whole microseconds: the histograms' unit.
pub(crate) fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

impl Recorder {
    /// Records one latency sample.
    pub(crate) fn record(&mut self, metric: Metric, latency: Duration) {
        self.histograms[metric.index()].saturating_record(micros(latency));
    }

    /// Counts one failure.
    pub(crate) fn error(&mut self, kind: ErrorKind) {
        self.errors[kind.index()] += 1;
    }

    /// The histogram of `metric`.
    pub(crate) fn histogram(&self, metric: Metric) -> &Histogram<u64> {
        &self.histograms[metric.index()]
    }

    /// Failures of `kind`.
    pub(crate) fn errors(&self, kind: ErrorKind) -> u64 {
        self.errors[kind.index()]
    }

    /// All failures.
    pub(crate) fn total_errors(&self) -> u64 {
        self.errors.iter().sum()
    }

    /// Adds another thread's measurements into this one.
    pub(crate) fn merge(&mut self, other: &Self) {
        for (mine, theirs) in self.histograms.iter_mut().zip(&other.histograms) {
            mine.add(theirs).expect("histograms share bounds");
        }
        for (mine, theirs) in self.errors.iter_mut().zip(other.errors) {
            *mine += theirs;
        }
        for (status, n) in &other.statuses {
            *self.statuses.entry(*status).or_default() += n;
        }
        self.counts.add(&other.counts);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_adds_samples_errors_and_counts() {
        let mut a = Recorder::default();
        let mut b = Recorder::default();
        a.record(Metric::Echo, Duration::from_micros(100));
        b.record(Metric::Echo, Duration::from_millis(5));
        b.record(Metric::CloseReply, Duration::from_micros(7));
        b.error(ErrorKind::Timeout);
        b.counts.messages = 3;
        *b.statuses.entry(403).or_default() += 2;
        a.merge(&b);
        assert_eq!(a.histogram(Metric::Echo).len(), 2);
        assert_eq!(a.histogram(Metric::Echo).max(), 5_003); // 3 significant figures
        assert_eq!(a.histogram(Metric::CloseReply).len(), 1);
        assert_eq!(a.errors(ErrorKind::Timeout), 1);
        assert_eq!(a.total_errors(), 1);
        assert_eq!(a.counts.messages, 3);
        assert_eq!(a.statuses[&403], 2);
    }

    #[test]
    fn huge_latencies_saturate_instead_of_panicking() {
        let mut r = Recorder::default();
        r.record(Metric::Echo, Duration::from_secs(10 * 3600));
        assert_eq!(r.histogram(Metric::Echo).len(), 1);
        assert!(r.histogram(Metric::Echo).max() >= MAX_US);
    }
}
