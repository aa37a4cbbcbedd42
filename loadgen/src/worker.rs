//! Thread-per-core: one pinned OS thread per `--cores`, each with its own io_uring runtime,
//! its own connections and its own [`Recorder`], merged by the main thread at the end.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread;
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::control::{LiveSlot, Shared, Windows};
use crate::errors::ErrorKind;
use crate::io::{self, Limiter, Signal};
use crate::scenario;
use crate::stats::{Metric, Recorder};

/// How often a waiting worker looks for the start, and how often it publishes progress.
const START_POLL: Duration = Duration::from_millis(1);
const PUBLISH_EVERY: Duration = Duration::from_millis(100);

/// What every connection task of one worker shares (single-threaded, hence `Cell`/`RefCell`).
pub(crate) struct ThreadCtx {
    /// State shared with the other threads.
    pub(crate) shared: Arc<Shared>,
    /// This worker's number.
    pub(crate) thread: usize,
    /// This worker's measurements.
    pub(crate) stats: RefCell<Recorder>,
    /// Bounds this worker's share of in-flight connection attempts.
    pub(crate) ramp: Limiter,
    windows: Cell<Option<Windows>>,
    started: Signal,
    finished: Cell<bool>,
}

impl ThreadCtx {
    fn new(shared: Arc<Shared>, thread: usize) -> Self {
        let ramp = Limiter::new(shared.cfg.ramp_concurrency.div_ceil(shared.cfg.cores));
        Self {
            shared,
            thread,
            stats: RefCell::default(),
            ramp,
            windows: Cell::new(None),
            started: Signal::default(),
            finished: Cell::new(false),
        }
    }

    /// The configuration.
    pub(crate) fn cfg(&self) -> &Config {
        &self.shared.cfg
    }

    /// This worker's progress slot.
    pub(crate) fn live(&self) -> &LiveSlot {
        &self.shared.slots[self.thread]
    }

    /// The run's phases, once the run has started.
    pub(crate) fn windows(&self) -> Option<Windows> {
        self.windows.get()
    }

    /// Raised when the run starts.
    pub(crate) fn started(&self) -> &Signal {
        &self.started
    }

    /// Counts a failure.
    pub(crate) fn error(&self, kind: ErrorKind) {
        self.stats.borrow_mut().error(kind);
        LiveSlot::bump(&self.live().errors);
    }

    /// Records a latency sample.
    pub(crate) fn record(&self, metric: Metric, latency: Duration) {
        self.stats.borrow_mut().record(metric, latency);
    }

    /// A worker context for unit tests of handlers, configured by command-line `args`.
    #[cfg(test)]
    pub(crate) fn for_tests(args: &[&str]) -> Self {
        use clap::Parser as _;
        let command_line = ["loadgen", "ws://127.0.0.1:9/"].iter().chain(args);
        let cli = crate::cli::Args::try_parse_from(command_line).expect("valid test arguments");
        let cfg = Config::new(cli, None).expect("valid test configuration");
        Self::new(Arc::new(Shared::new(cfg)), 0)
    }

    /// Starts the run now, as the ticker would; returns the start instant.
    #[cfg(test)]
    pub(crate) fn start_for_tests(&self) -> Instant {
        let windows = self.shared.start();
        self.windows.set(Some(windows));
        windows.go
    }

    /// Copies the headline histogram where the progress printer can see it.
    fn publish(&self) {
        let headline = self.cfg().scenario.headline();
        let mut snapshot = self.live().snapshot.lock().expect("snapshot lock poisoned");
        snapshot.reset();
        snapshot
            .add(self.stats.borrow().histogram(headline))
            .expect("histograms share bounds");
    }
}

/// Starts the workers; each returns its measurements.
pub(crate) fn spawn(shared: &Arc<Shared>) -> Vec<thread::JoinHandle<Recorder>> {
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    (0..shared.cfg.cores)
        .map(|t| {
            let shared = Arc::clone(shared);
            let core = (!cores.is_empty()).then(|| cores[t % cores.len()]);
            thread::Builder::new()
                .name(format!("loadgen-{t}"))
                .spawn(move || {
                    if let Some(core) = core {
                        core_affinity::set_for_current(core);
                    }
                    let recorder = io::run(run(Arc::clone(&shared), t));
                    shared.slots[t].finished.store(true, Ordering::Release);
                    recorder
                })
                .expect("spawning a worker thread")
        })
        .collect()
}

async fn run(shared: Arc<Shared>, thread: usize) -> Recorder {
    let ctx = Rc::new(ThreadCtx::new(shared, thread));
    let ticker = io::spawn(tick(Rc::clone(&ctx)));
    let tasks: Vec<_> = ctx
        .cfg()
        .indices(thread)
        .map(|i| io::spawn(scenario::run(Rc::clone(&ctx), i)))
        .collect();
    for task in tasks {
        task.join().await;
    }
    ctx.finished.set(true);
    ticker.join().await;
    ctx.publish();
    ctx.stats.take()
}

/// Relays the start from the main thread to this worker's connections, then publishes
/// progress until the connections are done.
async fn tick(ctx: Rc<ThreadCtx>) {
    while ctx.windows.get().is_none() {
        if ctx.finished.get() {
            return;
        }
        if let Some(w) = ctx.shared.windows() {
            ctx.windows.set(Some(w));
            ctx.started.raise();
            break;
        }
        io::sleep_until(Instant::now() + START_POLL).await;
    }
    while !ctx.finished.get() {
        ctx.publish();
        io::sleep_until(Instant::now() + PUBLISH_EVERY).await;
    }
}
