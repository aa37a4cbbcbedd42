//! What the main thread and the worker threads share: the configuration, the start instant,
//! and one live-progress slot per worker.
//!
//! Each worker writes only its own cache-line-aligned slot, so progress reporting adds no
//! cross-core contention to the hot path; the main thread sums the slots once a second.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::config::{Config, Scenario};
use crate::stats::new_histogram;

/// Live counters of one worker; written by it, read by the progress printer.
#[repr(align(128))]
pub(crate) struct LiveSlot {
    /// Connection attempts finished (upgraded or failed, exchange included for `close`).
    pub(crate) attempted: AtomicU64,
    /// Connections currently upgraded and not yet closed.
    pub(crate) open: AtomicU64,
    /// Completed units of work: echoes, connect cycles or close handshakes.
    pub(crate) done: AtomicU64,
    /// Failures so far.
    pub(crate) errors: AtomicU64,
    /// The worker's runtime has returned.
    pub(crate) finished: AtomicBool,
    /// A copy of the worker's main latency histogram, refreshed once a second.
    pub(crate) snapshot: Mutex<Histogram<u64>>,
}

impl LiveSlot {
    fn new() -> Self {
        Self {
            attempted: AtomicU64::new(0),
            open: AtomicU64::new(0),
            done: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            finished: AtomicBool::new(false),
            snapshot: Mutex::new(new_histogram()),
        }
    }

    /// Adds one to a counter this worker owns.
    pub(crate) fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// The phases of a run, fixed once every connection is open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Windows {
    /// Sending starts (all connections opened).
    pub(crate) go: Instant,
    /// Warmup ends: samples from here on count.
    pub(crate) measure_from: Instant,
    /// No new work starts from here on.
    pub(crate) end: Instant,
}

impl Windows {
    /// The windows of a run started at `go`. `idle` holds for `--duration` with no warmup (it
    /// measures nothing); `close` has no end (it stops once every connection has closed).
    pub(crate) fn new(cfg: &Config, go: Instant) -> Self {
        let warmup = match cfg.scenario {
            Scenario::Echo | Scenario::Connect => cfg.warmup,
            Scenario::Close | Scenario::Idle => Duration::ZERO,
        };
        let measure_from = go + warmup;
        Self {
            go,
            measure_from,
            end: measure_from + cfg.duration,
        }
    }

    /// Whether work that started (or was due) at `t` is a sample.
    pub(crate) fn measures(&self, t: Instant) -> bool {
        t >= self.measure_from && t < self.end
    }
}

/// Shared by every thread for the whole run.
pub(crate) struct Shared {
    /// The validated configuration.
    pub(crate) cfg: Config,
    go: OnceLock<Windows>,
    /// Connection attempts refused before any connection opened.
    refused: AtomicU64,
    /// Some connection completed its upgrade.
    opened: AtomicBool,
    /// One slot per worker.
    pub(crate) slots: Box<[LiveSlot]>,
}

impl Shared {
    /// State for a run of `cfg`.
    pub(crate) fn new(cfg: Config) -> Self {
        let slots = (0..cfg.cores).map(|_| LiveSlot::new()).collect();
        Self {
            cfg,
            go: OnceLock::new(),
            refused: AtomicU64::new(0),
            opened: AtomicBool::new(false),
            slots,
        }
    }

    /// Notes that a connection opened: the server is there, refusals are now mere errors.
    pub(crate) fn note_opened(&self) {
        self.opened.store(true, Ordering::Relaxed);
    }

    /// Notes a refused connection attempt.
    pub(crate) fn note_refused(&self) {
        if !self.opened.load(Ordering::Relaxed) {
            self.refused.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Whether as many attempts as there are connections were refused and none opened:
    /// nothing listens at the target, so the run measures nothing and should stop now.
    pub(crate) fn all_refused(&self) -> bool {
        !self.opened.load(Ordering::Relaxed)
            && self.refused.load(Ordering::Relaxed) >= self.cfg.connections as u64
    }

    /// Starts the run now (called once, by the main thread, when the ramp is over).
    pub(crate) fn start(&self) -> Windows {
        *self
            .go
            .get_or_init(|| Windows::new(&self.cfg, Instant::now()))
    }

    /// The run's windows, once started.
    pub(crate) fn windows(&self) -> Option<Windows> {
        self.go.get().copied()
    }

    /// Sum of one counter over all workers.
    pub(crate) fn sum(&self, counter: impl Fn(&LiveSlot) -> &AtomicU64) -> u64 {
        self.slots
            .iter()
            .map(|s| counter(s).load(Ordering::Relaxed))
            .sum()
    }

    /// Whether every worker has returned.
    pub(crate) fn all_finished(&self) -> bool {
        self.slots
            .iter()
            .all(|s| s.finished.load(Ordering::Acquire))
    }
}
