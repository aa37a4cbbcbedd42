//! One worker per core: its own io_uring runtime, its own `SO_REUSEPORT` listener, and the
//! connection actors it accepted, none of which ever leave the core.
#![forbid(unsafe_code)]

use std::marker::PhantomData;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::upstream::RoundRobin;
use crate::uring::{self, Listener};

/// Per-core state. `!Send` on purpose: it belongs to one core's runtime.
pub(crate) struct Core {
    pub(crate) config: Arc<Config>,
    pub(crate) round_robin: RoundRobin,
    _not_send: PhantomData<Rc<()>>,
}

/// Accepts and serves connections on this thread until the process exits.
pub(crate) fn run(listener: std::net::TcpListener, config: Arc<Config>) {
    uring::run(async move {
        let listener = Listener::from_std(listener);
        let core = Rc::new(Core {
            config,
            round_robin: RoundRobin::default(),
            _not_send: PhantomData,
        });
        let mut last_warning: Option<Instant> = None;
        loop {
            match listener.accept().await {
                Ok((stream, client)) => {
                    uring::spawn(crate::connection::serve(stream, client, Rc::clone(&core)));
                }
                Err(e) => {
                    // EMFILE/ENFILE: the descriptor limit is reached. Say so (once a second at
                    // most), back off briefly, and keep serving the connections we have.
                    if last_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(1)) {
                        let limit = nofile_limit();
                        tracing::warn!(error = %e, nofile_limit = limit, "accept failed (descriptor limit?)");
                        last_warning = Some(Instant::now());
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    });
}

/// The soft descriptor limit, read from /proc (no unsafe getrlimit needed).
fn nofile_limit() -> String {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3).map(str::to_owned))
        })
        .unwrap_or_else(|| "unknown".to_owned())
}
