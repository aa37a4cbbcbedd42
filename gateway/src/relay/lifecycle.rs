//! The close handshake of a proxied connection, as an explicit state machine.
//!
//! Who sends which close code is spelled out in `LIFECYCLE.md` beside this file.
#![forbid(unsafe_code)]

/// One peer of a proxied connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Side {
    /// The WebSocket client that connected to the gateway.
    Client,
    /// The upstream server the gateway connected to.
    Backend,
}

impl Side {
    /// The other peer.
    pub(crate) const fn other(self) -> Self {
        match self {
            Self::Client => Self::Backend,
            Self::Backend => Self::Client,
        }
    }

    /// Lower-case name for logs.
    pub(crate) const fn as_str(self) -> &'static str {
        match self {
            Self::Client => "client",
            Self::Backend => "backend",
        }
    }
}

/// Where a proxied connection's close handshake stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Lifecycle {
    /// Both directions carry messages.
    Open,
    /// This side's close frame was relayed to the other peer, whose reply is awaited.
    Closing(Side),
    /// Both close frames were relayed: the handshake completed end to end.
    Closed,
    /// The gateway ended the connection itself (a violation, a dead peer, a timeout) and
    /// sent its own close frames; nothing more is relayed.
    Failed,
}

/// What a pump does with a close frame it has read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum OnClose {
    /// Relay it to the other peer, whose reply is still to come.
    Relay,
    /// Relay it: it answers the other peer's close, so the handshake is complete.
    RelayAndFinish,
    /// Consume it: the gateway already closed the other peer itself.
    Absorb,
}

impl Lifecycle {
    /// The transition for a close frame read from `side`.
    pub(crate) fn close_from(self, side: Side) -> (Self, OnClose) {
        match self {
            Self::Open => (Self::Closing(side), OnClose::Relay),
            Self::Closing(first) if first != side => (Self::Closed, OnClose::RelayAndFinish),
            // A pump stops reading after its peer's close, so a second close from the same
            // side cannot be read; absorbing it is the safe answer if it ever were.
            Self::Closing(_) | Self::Closed | Self::Failed => (self, OnClose::Absorb),
        }
    }

    /// Whether the gateway still relays data frames.
    pub(crate) const fn is_open(self) -> bool {
        matches!(self, Self::Open)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_initiated_handshake() {
        let (s, a) = Lifecycle::Open.close_from(Side::Client);
        assert_eq!((s, a), (Lifecycle::Closing(Side::Client), OnClose::Relay));
        let (s, a) = s.close_from(Side::Backend);
        assert_eq!((s, a), (Lifecycle::Closed, OnClose::RelayAndFinish));
    }

    #[test]
    fn backend_initiated_handshake() {
        let (s, _) = Lifecycle::Open.close_from(Side::Backend);
        assert_eq!(
            s.close_from(Side::Client),
            (Lifecycle::Closed, OnClose::RelayAndFinish)
        );
    }

    #[test]
    fn after_failure_closes_are_absorbed() {
        assert_eq!(
            Lifecycle::Failed.close_from(Side::Client),
            (Lifecycle::Failed, OnClose::Absorb)
        );
        assert_eq!(
            Lifecycle::Closing(Side::Client).close_from(Side::Client).1,
            OnClose::Absorb
        );
        assert!(!Lifecycle::Failed.is_open());
    }
}
