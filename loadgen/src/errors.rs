//! What can go wrong on one connection, by kind, so every failure is counted and none is
//! silently turned into (or hidden among) latency samples.

/// One kind of failure; each connection reports at most one and then ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum ErrorKind {
    /// TCP connect refused (nothing listening, or the backlog overflowed).
    ConnectRefused,
    /// TCP connect failed otherwise (unreachable, out of ports, out of descriptors).
    ConnectFailed,
    /// TCP connect plus upgrade did not finish within `--connect-timeout`.
    ConnectTimeout,
    /// The server answered the upgrade with a status other than 101.
    HandshakeStatus,
    /// A 101 that is not a valid upgrade (bad accept key, malformed head).
    HandshakeInvalid,
    /// The server sent frames that violate RFC 6455.
    Protocol,
    /// The server sent a Close code other than 1000/1001 (or none).
    CloseCode,
    /// The server dropped TCP without a close handshake (what a client reports as 1006).
    Dropped,
    /// A read or write failed (connection reset, broken pipe).
    Io,
    /// An echoed message differs from what was sent, or arrived unasked.
    PayloadMismatch,
    /// No echo within `--timeout`, or a write stuck that long (the server stopped reading).
    Timeout,
    /// Our Close went unanswered for `--close-timeout`.
    CloseTimeout,
    /// The close frames were exchanged but the server kept TCP open past `--close-timeout`.
    EofTimeout,
}

impl ErrorKind {
    /// Every kind, in report order.
    pub(crate) const ALL: [Self; 13] = [
        Self::ConnectRefused,
        Self::ConnectFailed,
        Self::ConnectTimeout,
        Self::HandshakeStatus,
        Self::HandshakeInvalid,
        Self::Protocol,
        Self::CloseCode,
        Self::Dropped,
        Self::Io,
        Self::PayloadMismatch,
        Self::Timeout,
        Self::CloseTimeout,
        Self::EofTimeout,
    ];

    /// Position in [`Self::ALL`], for per-kind counter arrays.
    pub(crate) const fn index(self) -> usize {
        self as usize
    }

    /// Stable snake-case name used in the summary and as the JSON key.
    pub(crate) const fn name(self) -> &'static str {
        match self {
            Self::ConnectRefused => "connect_refused",
            Self::ConnectFailed => "connect_failed",
            Self::ConnectTimeout => "connect_timeout",
            Self::HandshakeStatus => "handshake_status",
            Self::HandshakeInvalid => "handshake_invalid",
            Self::Protocol => "protocol_error",
            Self::CloseCode => "unexpected_close_code",
            Self::Dropped => "dropped_without_close",
            Self::Io => "io_error",
            Self::PayloadMismatch => "payload_mismatch",
            Self::Timeout => "timeout",
            Self::CloseTimeout => "close_timeout",
            Self::EofTimeout => "eof_timeout",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indices_match_report_order_and_names_are_unique() {
        for (i, kind) in ErrorKind::ALL.iter().enumerate() {
            assert_eq!(kind.index(), i);
        }
        let mut names: Vec<_> = ErrorKind::ALL.iter().map(|k| k.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), ErrorKind::ALL.len());
    }
}
