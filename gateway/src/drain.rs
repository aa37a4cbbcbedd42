//! Graceful drain: the signal thread flips a process-wide phase; each core stops accepting,
//! asks its connections to close, and waits for them (bounded by the drain timeout).
#![forbid(unsafe_code)]

use std::cell::Cell;
use std::rc::Rc;

use codec::CloseCode;
use tokio::sync::Notify;

/// What the process as a whole is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Accepting and relaying.
    Running,
    /// Shutting down: connections get this close code (1001, or 1012 for a restart).
    Draining(CloseCode),
}

/// One core's view of the drain, shared by its connection actors (`!Send`: per core).
#[derive(Default)]
pub(crate) struct Drain {
    code: Cell<Option<CloseCode>>,
    started: Notify,
    active: Cell<usize>,
    empty: Notify,
}

impl Drain {
    /// Asks every connection on this core to close with `code`.
    pub(crate) fn start(&self, code: CloseCode) {
        self.code.set(Some(code));
        self.started.notify_waiters();
    }

    /// Whether a drain has begun.
    pub(crate) fn is_draining(&self) -> bool {
        self.code.get().is_some()
    }

    /// The close reason sent with a drain's `code`.
    pub(crate) fn reason(code: CloseCode) -> &'static str {
        if code == CloseCode::SERVICE_RESTART {
            "gateway restarting"
        } else {
            "gateway shutting down"
        }
    }

    /// Resolves with the close code once a drain begins (at once if it already has).
    pub(crate) async fn wait(&self) -> CloseCode {
        loop {
            if let Some(code) = self.code.get() {
                return code;
            }
            self.started.notified().await;
        }
    }

    /// Counts a connection as live until the guard drops.
    pub(crate) fn enter(self: &Rc<Self>) -> Live {
        self.active.set(self.active.get() + 1);
        Live(Rc::clone(self))
    }

    /// Live connections on this core.
    pub(crate) fn active(&self) -> usize {
        self.active.get()
    }

    /// Resolves when no connection is live.
    pub(crate) async fn all_closed(&self) {
        while self.active.get() > 0 {
            self.empty.notified().await;
        }
    }
}

/// A live connection, counted by its core's [`Drain`].
pub(crate) struct Live(Rc<Drain>);

impl Drop for Live {
    fn drop(&mut self) {
        let left = self.0.active.get() - 1;
        self.0.active.set(left);
        if left == 0 {
            self.0.empty.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_codes() {
        let drain = Rc::new(Drain::default());
        let a = drain.enter();
        let b = drain.enter();
        assert_eq!(drain.active(), 2);
        drop(a);
        assert_eq!(drain.active(), 1);
        assert!(!drain.is_draining());
        drain.start(CloseCode::SERVICE_RESTART);
        assert!(drain.is_draining());
        drop(b);
        assert_eq!(drain.active(), 0);
    }
}
