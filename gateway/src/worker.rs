//! One worker per core: its own io_uring runtime, its own `SO_REUSEPORT` listeners, and the
//! connection actors it accepted, none of which ever leave the core.
#![forbid(unsafe_code)]

use std::cell::Cell;
use std::marker::PhantomData;
use std::rc::Rc;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::drain::{Drain, Phase};
use crate::metrics::CoreMetrics;
use crate::reload::Shared;
use crate::uring::{self, Listener};

/// Per-core state. `!Send` on purpose: it belongs to one core's runtime.
pub(crate) struct Core {
    pub(crate) shared: Arc<Shared>,
    pub(crate) metrics: Arc<CoreMetrics>,
    /// This core's round-robin cursor (per core, so no atomics).
    pub(crate) cursor: Cell<usize>,
    pub(crate) drain: Rc<Drain>,
    _not_send: PhantomData<Rc<()>>,
}

/// What every worker is started with.
pub(crate) struct WorkerArgs {
    pub(crate) index: usize,
    pub(crate) listeners: Vec<std::net::TcpListener>,
    pub(crate) shared: Arc<Shared>,
    pub(crate) phase: watch::Receiver<Phase>,
    pub(crate) drain_timeout: Duration,
}

/// Accepts and serves connections on this thread until a drain completes.
pub(crate) fn run(args: WorkerArgs) {
    let WorkerArgs {
        index,
        listeners,
        shared,
        mut phase,
        drain_timeout,
    } = args;
    // Second handles on the listening sockets: shutting them down on drain wakes the pending
    // accepts and stops the kernel queueing new connections here.
    let controls: Vec<_> = listeners
        .iter()
        .filter_map(|l| l.try_clone().ok())
        .collect();
    uring::run(async move {
        let core = Rc::new(Core {
            metrics: shared.metrics.core(index),
            shared,
            cursor: Cell::new(index),
            drain: Rc::new(Drain::default()),
            _not_send: PhantomData,
        });
        for listener in listeners {
            uring::spawn(accept_loop(Listener::from_std(listener), Rc::clone(&core)));
        }
        let close_code = draining(&mut phase).await;
        let live = core.drain.active();
        core.drain.start(close_code);
        for control in &controls {
            drop(socket2::SockRef::from(control).shutdown(std::net::Shutdown::Both));
        }
        tracing::info!(
            core = index,
            connections = live,
            close_code = close_code.get(),
            "draining"
        );
        let done = tokio::time::timeout(drain_timeout, core.drain.all_closed()).await;
        tracing::info!(
            core = index,
            left = core.drain.active(),
            timed_out = done.is_err(),
            "drained"
        );
    });
}

/// Resolves with the close code when the process starts draining.
async fn draining(phase: &mut watch::Receiver<Phase>) -> codec::CloseCode {
    loop {
        if let Phase::Draining(code) = *phase.borrow_and_update() {
            return code;
        }
        if phase.changed().await.is_err() {
            // The controller is gone: nobody can ask for a drain any more.
            std::future::pending::<()>().await;
        }
    }
}

async fn accept_loop(listener: Listener, core: Rc<Core>) {
    let mut last_warning: Option<Instant> = None;
    loop {
        match listener.accept().await {
            Ok((stream, client)) => {
                let live = core.drain.enter();
                let core = Rc::clone(&core);
                uring::spawn(async move {
                    core.metrics.connection_opened();
                    crate::connection::serve(stream, client, Rc::clone(&core)).await;
                    core.metrics.connection_closed();
                    drop(live);
                });
            }
            Err(_) if core.drain.is_draining() => return,
            Err(e) => {
                // EMFILE/ENFILE: the descriptor limit is reached. Say so (once a second at
                // most), back off briefly, and keep serving the connections we have.
                if last_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(1)) {
                    let limit = nofile_limit();
                    tracing::warn!(why = %e, nofile_limit = limit, "accept failed");
                    last_warning = Some(Instant::now());
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// The soft descriptor limit, read from /proc once (no unsafe getrlimit needed) and kept:
/// when it is reached, opening /proc/self/limits fails too.
pub(crate) fn nofile_limit() -> &'static str {
    static LIMIT: OnceLock<String> = OnceLock::new();
    LIMIT.get_or_init(|| {
        std::fs::read_to_string("/proc/self/limits")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("Max open files"))
                    .and_then(|l| l.split_whitespace().nth(3).map(str::to_owned))
            })
            .unwrap_or_else(|| "unreadable".to_owned())
    })
}
