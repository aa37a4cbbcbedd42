//! The client side of the close handshake (RFC 6455 section 7): we send Close, the server
//! answers with Close and then drops TCP, because the server closes first (section 7.1.1).
//! Or the server starts: we answer and wait for it to drop TCP.
//!
//! Each step is timed, so the close scenario can report Close-to-Close and Close-to-EOF
//! latency; a server that stays silent past `--close-timeout` is a timeout, never a sample.

use std::time::{Duration, Instant};

use codec::CloseCode;

use crate::errors::ErrorKind;
use crate::frames;

/// Where the close handshake stands, named by what it awaits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CloseState {
    /// Not closing.
    Open,
    /// Our Close is queued; its write has not completed yet.
    Queued,
    /// Our Close was written by a write submitted at `sent`; awaiting the server's Close.
    ExpectClose {
        /// When the write of our Close was submitted.
        sent: Instant,
    },
    /// The server answered; awaiting its TCP close.
    ExpectEof {
        /// When the write of our Close was submitted.
        sent: Instant,
        /// When the server's Close arrived.
        answered: Instant,
    },
    /// The server sent Close first at `received` and we answered; awaiting its TCP close.
    PeerExpectEof {
        /// When the server's Close arrived.
        received: Instant,
    },
}

/// A finished close handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Closed {
    /// We started it.
    Ours {
        /// From our Close's write to the server's Close arriving.
        reply: Duration,
        /// From our Close's write to the server's TCP close.
        eof: Duration,
    },
    /// The server started it.
    Theirs {
        /// The server's Close arriving to its TCP close.
        eof: Duration,
    },
}

/// The outcome of one close-handshake event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Progress {
    /// Still waiting.
    Pending,
    /// Complete.
    Closed(Closed),
    /// Failed with this error.
    Failed(ErrorKind),
}

/// Runs one connection's close handshake.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Closer {
    state: CloseState,
    timeout: Duration,
}

/// Codes a server may close with without that being an error: normal, going away, or none.
fn expected(code: Option<CloseCode>) -> bool {
    matches!(code, None | Some(CloseCode::NORMAL | CloseCode::GOING_AWAY))
}

impl Closer {
    /// A closer for an open connection, with `--close-timeout`.
    pub(crate) fn new(timeout: Duration) -> Self {
        Self {
            state: CloseState::Open,
            timeout,
        }
    }

    /// Whether a close handshake has begun (either side).
    pub(crate) fn closing(&self) -> bool {
        self.state != CloseState::Open
    }

    /// Queues our Close (1000).
    pub(crate) fn start(&mut self, out: &mut Vec<u8>) {
        debug_assert_eq!(self.state, CloseState::Open, "close started twice");
        frames::encode_close(out, Some(CloseCode::NORMAL));
        self.state = CloseState::Queued;
    }

    /// Notes that everything queued was written, by a write submitted at `submitted`: our
    /// Close counts as sent from then.
    pub(crate) fn on_written(&mut self, submitted: Instant) {
        if self.state == CloseState::Queued {
            self.state = CloseState::ExpectClose { sent: submitted };
        }
    }

    /// When the current wait times out.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        match self.state {
            CloseState::Open | CloseState::Queued => None,
            CloseState::ExpectClose { sent } | CloseState::ExpectEof { sent, .. } => {
                Some(sent + self.timeout)
            }
            CloseState::PeerExpectEof { received } => Some(received + self.timeout),
        }
    }

    /// The deadline passed.
    pub(crate) fn on_timer(&mut self, now: Instant) -> Progress {
        match (self.state, self.deadline()) {
            (CloseState::ExpectClose { .. }, Some(d)) if now >= d => {
                Progress::Failed(ErrorKind::CloseTimeout)
            }
            (CloseState::ExpectEof { .. } | CloseState::PeerExpectEof { .. }, Some(d))
                if now >= d =>
            {
                Progress::Failed(ErrorKind::EofTimeout)
            }
            _ => Progress::Pending,
        }
    }

    /// The server's Close arrived at `now`; an answer is queued if the server started.
    pub(crate) fn on_close(
        &mut self,
        code: Option<CloseCode>,
        now: Instant,
        out: &mut Vec<u8>,
    ) -> Progress {
        match self.state {
            CloseState::Open => {
                // Echo the status back, as RFC 6455 5.5.1 suggests.
                frames::encode_close(out, code.or(Some(CloseCode::NORMAL)));
                self.state = CloseState::PeerExpectEof { received: now };
            }
            // The server answered before our write completed: it was on the wire.
            CloseState::Queued => {
                self.state = CloseState::ExpectEof {
                    sent: now,
                    answered: now,
                };
            }
            CloseState::ExpectClose { sent } => {
                self.state = CloseState::ExpectEof {
                    sent,
                    answered: now,
                };
            }
            // A second Close is a protocol violation (RFC 6455 5.5.1: send at most one).
            CloseState::ExpectEof { .. } | CloseState::PeerExpectEof { .. } => {
                return Progress::Failed(ErrorKind::Protocol);
            }
        }
        if expected(code) {
            Progress::Pending
        } else {
            Progress::Failed(ErrorKind::CloseCode)
        }
    }

    /// The server closed TCP at `now`.
    pub(crate) fn on_eof(&mut self, now: Instant) -> Progress {
        match self.state {
            CloseState::Open | CloseState::Queued | CloseState::ExpectClose { .. } => {
                Progress::Failed(ErrorKind::Dropped)
            }
            CloseState::ExpectEof { sent, answered } => Progress::Closed(Closed::Ours {
                reply: answered - sent,
                eof: now - sent,
            }),
            CloseState::PeerExpectEof { received } => Progress::Closed(Closed::Theirs {
                eof: now - received,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn our_close_is_timed_from_the_write() {
        let t0 = Instant::now();
        let mut c = Closer::new(ms(100));
        let mut out = Vec::new();
        c.start(&mut out);
        assert!(!out.is_empty() && c.closing());
        assert_eq!(c.deadline(), None);
        c.on_written(t0);
        assert_eq!(c.deadline(), Some(t0 + ms(100)));
        assert_eq!(
            c.on_close(Some(CloseCode::NORMAL), t0 + ms(3), &mut out),
            Progress::Pending
        );
        assert_eq!(
            c.on_eof(t0 + ms(5)),
            Progress::Closed(Closed::Ours {
                reply: ms(3),
                eof: ms(5)
            })
        );
    }

    #[test]
    fn silence_is_a_timeout_not_a_sample() {
        let t0 = Instant::now();
        let mut c = Closer::new(ms(100));
        c.start(&mut Vec::new());
        c.on_written(t0);
        assert_eq!(c.on_timer(t0 + ms(99)), Progress::Pending);
        assert_eq!(
            c.on_timer(t0 + ms(100)),
            Progress::Failed(ErrorKind::CloseTimeout)
        );
        // Answered, but TCP is never closed.
        let mut c = Closer::new(ms(100));
        c.start(&mut Vec::new());
        c.on_written(t0);
        c.on_close(None, t0 + ms(1), &mut Vec::new());
        assert_eq!(
            c.on_timer(t0 + ms(100)),
            Progress::Failed(ErrorKind::EofTimeout)
        );
    }

    #[test]
    fn server_initiated_close_is_answered_and_timed() {
        let t0 = Instant::now();
        let mut c = Closer::new(ms(100));
        let mut out = Vec::new();
        assert_eq!(
            c.on_close(Some(CloseCode::GOING_AWAY), t0, &mut out),
            Progress::Pending
        );
        assert_eq!(out.len(), 2 + 4 + 2, "a masked Close with a status");
        assert_eq!(
            c.on_eof(t0 + ms(2)),
            Progress::Closed(Closed::Theirs { eof: ms(2) })
        );
    }

    #[test]
    fn bad_endings_are_errors() {
        let t0 = Instant::now();
        let mut out = Vec::new();
        let mut c = Closer::new(ms(100));
        assert_eq!(c.on_eof(t0), Progress::Failed(ErrorKind::Dropped));
        let mut c = Closer::new(ms(100));
        assert_eq!(
            c.on_close(Some(CloseCode::INTERNAL_ERROR), t0, &mut out),
            Progress::Failed(ErrorKind::CloseCode)
        );
        let mut c = Closer::new(ms(100));
        c.start(&mut out);
        c.on_written(t0);
        assert_eq!(c.on_eof(t0), Progress::Failed(ErrorKind::Dropped));
        c.on_close(None, t0, &mut out);
        assert_eq!(
            c.on_close(None, t0, &mut out),
            Progress::Failed(ErrorKind::Protocol)
        );
    }
}
