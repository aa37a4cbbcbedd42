//! Process signals: SIGTERM/SIGINT drain with 1001, SIGUSR2 drains with 1012 (a restart),
//! SIGHUP reloads. Handled on the main thread with a small tokio runtime of its own, so the
//! io_uring cores never see them.
#![forbid(unsafe_code)]

use std::io;

use codec::CloseCode;
use tokio::signal::unix::{Signal, SignalKind, signal};

/// The installed handlers and the runtime that drives them.
pub(crate) struct Signals {
    runtime: tokio::runtime::Runtime,
    term: Signal,
    int: Signal,
    usr2: Signal,
    hup: Signal,
}

impl Signals {
    /// Installs the handlers (from now on these signals no longer kill the process).
    pub(crate) fn new() -> io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let _guard = runtime.enter();
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            usr2: signal(SignalKind::user_defined2())?,
            hup: signal(SignalKind::hangup())?,
            runtime,
        })
    }

    /// Blocks until a drain is requested and returns its close code; `reload` runs on each
    /// SIGHUP in between.
    pub(crate) fn wait(mut self, reload: &dyn Fn()) -> CloseCode {
        let Self {
            runtime,
            term,
            int,
            usr2,
            hup,
        } = &mut self;
        runtime.block_on(async {
            loop {
                tokio::select! {
                    _ = term.recv() => break CloseCode::GOING_AWAY,
                    _ = int.recv() => break CloseCode::GOING_AWAY,
                    _ = usr2.recv() => break CloseCode::SERVICE_RESTART,
                    _ = hup.recv() => reload(),
                }
            }
        })
    }
}
