//! One place that says what each refusal and each close the gateway decides on its own puts on
//! the wire, in the log and in the metrics: the HTTP status and body before the `101`, the close
//! code and reason each peer gets after it. The machines decide *that* something happened; this
//! module decides what it is called. `LIFECYCLE.md` is the table in words.
#![forbid(unsafe_code)]

use codec::{CloseCode, ProtocolError};

use crate::relay::forward::ControlPayload;
use crate::relay::lifecycle::Side;
use crate::upstream::LocalError;

/// The close reason sent with a drain's `code`: 1012 says the gateway restarts (clients may
/// reconnect at once), anything else that it shuts down.
pub(crate) fn drain_reason(code: CloseCode) -> &'static str {
    if code == CloseCode::SERVICE_RESTART {
        "gateway restarting"
    } else {
        "gateway shutting down"
    }
}

/// Why an upgrade request is answered with something other than `101`.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Refusal {
    /// Over a connection limit, at accept.
    OverLimit(crate::upgrade::admission::Refusal),
    /// The core is draining.
    Draining,
    /// No route takes the host and path.
    NoRoute,
    /// The route's origin allow-list refuses the request's `Origin`.
    OriginRefused,
    /// No backend took the connection (connect failures, bad or missing `101`s).
    NoBackend,
    /// The gateway itself lacked a descriptor, memory or a port to reach the backend.
    Local(LocalError),
}

impl Refusal {
    /// The status, and the reason phrase that goes with it.
    pub(crate) fn status(self) -> (u16, &'static str) {
        match self {
            Self::OverLimit(_) => (429, "Too Many Requests"),
            Self::Draining | Self::Local(_) => (503, "Service Unavailable"),
            Self::NoRoute => (404, "Not Found"),
            Self::OriginRefused => (403, "Forbidden"),
            Self::NoBackend => (502, "Bad Gateway"),
        }
    }

    /// The body (and the log line's `why`).
    pub(crate) fn why(self) -> &'static str {
        match self {
            Self::OverLimit(refusal) => refusal.as_str(),
            Self::Draining => "the gateway is shutting down",
            Self::NoRoute => "no route for this host and path",
            Self::OriginRefused => "origin not allowed",
            Self::NoBackend => "no backend could take the connection",
            Self::Local(why) => why.explain(),
        }
    }

    /// The whole answer: a small plain-text response that closes the connection, with
    /// `Retry-After` where trying again soon can work.
    pub(crate) fn response(self) -> Vec<u8> {
        let (status, phrase) = self.status();
        let retry = match self {
            Self::OverLimit(_) | Self::Draining | Self::Local(_) => "Retry-After: 1\r\n",
            Self::NoRoute | Self::OriginRefused | Self::NoBackend => "",
        };
        crate::conn::plain(status, phrase, self.why(), retry)
    }
}

/// Why the gateway ends a relayed connection on its own, rather than relaying a peer's close.
#[derive(Clone, Copy, Debug)]
pub(crate) enum GatewayClose {
    /// The client broke the protocol.
    ClientViolation(ProtocolError),
    /// The backend broke the protocol.
    BackendViolation(ProtocolError),
    /// The client's TCP connection ended without a close frame.
    ClientGone,
    /// The backend's TCP connection ended without a close frame.
    BackendGone,
    /// A write to the client moved no bytes for the write timeout.
    ClientStoppedReading,
    /// A write to the backend moved no bytes for the write timeout.
    BackendStoppedReading,
    /// The client did not answer a keepalive ping within the pong timeout.
    ClientDead,
    /// The backend did not answer a keepalive ping within the pong timeout.
    BackendDead,
    /// Neither peer sent anything for the idle timeout.
    Idle,
    /// The process drains with this code (1001, or 1012 for a restart).
    Drain(CloseCode),
    /// `Side` sent a close that its peer did not answer within the close timeout.
    CloseTimeout(Side),
}

impl GatewayClose {
    /// The close frame `side` gets; `None`: it gets none (it is gone, or not reading).
    pub(crate) fn to(self, side: Side) -> Option<ControlPayload> {
        let close = |code, reason| Some(ControlPayload::close(code, reason));
        match (self, side) {
            (Self::ClientViolation(e), Side::Client)
            | (Self::BackendViolation(e), Side::Backend) => close(e.close_code(), e.as_str()),
            (Self::ClientViolation(_), Side::Backend) => {
                close(CloseCode::GOING_AWAY, "client protocol error")
            }
            (Self::BackendViolation(_), Side::Client) => {
                close(CloseCode::BAD_GATEWAY, "backend protocol error")
            }
            (Self::ClientGone | Self::ClientStoppedReading, Side::Client)
            | (Self::BackendGone | Self::BackendStoppedReading, Side::Backend) => None,
            (Self::ClientGone | Self::ClientStoppedReading | Self::ClientDead, Side::Backend)
            | (Self::BackendGone | Self::BackendStoppedReading | Self::BackendDead, Side::Client) => {
                close(self.code(), self.reason())
            }
            (Self::ClientDead, Side::Client) | (Self::BackendDead, Side::Backend) => {
                close(CloseCode::GOING_AWAY, "ping timeout")
            }
            (Self::Idle, _) => close(CloseCode::GOING_AWAY, "idle timeout"),
            (Self::Drain(code), _) => close(code, drain_reason(code)),
            (Self::CloseTimeout(waiting), side) => (waiting == side)
                .then(|| ControlPayload::close(CloseCode::BAD_GATEWAY, "close timeout")),
        }
    }

    /// The close code the access log records for it (the first one on the wire).
    pub(crate) fn code(self) -> CloseCode {
        match self {
            Self::ClientViolation(e) | Self::BackendViolation(e) => e.close_code(),
            Self::ClientGone | Self::ClientStoppedReading | Self::ClientDead | Self::Idle => {
                CloseCode::GOING_AWAY
            }
            Self::BackendGone | Self::CloseTimeout(_) => CloseCode::BAD_GATEWAY,
            Self::BackendStoppedReading | Self::BackendDead => CloseCode::INTERNAL_ERROR,
            Self::Drain(code) => code,
        }
    }

    /// The access log's `close_reason`.
    pub(crate) fn reason(self) -> &'static str {
        match self {
            Self::ClientViolation(e) | Self::BackendViolation(e) => e.as_str(),
            Self::ClientGone => "client went away",
            Self::BackendGone => "backend went away",
            Self::ClientStoppedReading => "client stopped reading",
            Self::BackendStoppedReading => "backend stopped reading",
            Self::ClientDead => "client stopped answering",
            Self::BackendDead => "backend stopped answering",
            Self::Idle => "idle timeout",
            Self::Drain(code) => drain_reason(code),
            Self::CloseTimeout(_) => "close timeout",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(p: Option<ControlPayload>) -> Option<u16> {
        p.and_then(|p| p.close_code()).map(CloseCode::get)
    }

    /// LIFECYCLE.md's table, row by row: (case, client's code, backend's code).
    #[test]
    fn lifecycle_table() {
        let e = ProtocolError::InvalidUtf8;
        let rows = [
            (GatewayClose::ClientViolation(e), Some(1007), Some(1001)),
            (GatewayClose::BackendViolation(e), Some(1014), Some(1007)),
            (GatewayClose::ClientGone, None, Some(1001)),
            (GatewayClose::BackendGone, Some(1014), None),
            (GatewayClose::ClientStoppedReading, None, Some(1001)),
            (GatewayClose::BackendStoppedReading, Some(1011), None),
            (GatewayClose::ClientDead, Some(1001), Some(1001)),
            (GatewayClose::BackendDead, Some(1011), Some(1001)),
            (GatewayClose::Idle, Some(1001), Some(1001)),
            (
                GatewayClose::Drain(CloseCode::SERVICE_RESTART),
                Some(1012),
                Some(1012),
            ),
            (GatewayClose::CloseTimeout(Side::Client), Some(1014), None),
        ];
        for (why, client, backend) in rows {
            assert_eq!(code(why.to(Side::Client)), client, "{why:?} to the client");
            assert_eq!(
                code(why.to(Side::Backend)),
                backend,
                "{why:?} to the backend"
            );
            let wire = [client, backend].into_iter().flatten().collect::<Vec<_>>();
            for c in wire {
                assert!(CloseCode::new(c).is_sendable(), "{why:?}: {c}");
            }
        }
        assert_eq!(
            GatewayClose::BackendDead.reason(),
            "backend stopped answering"
        );
    }

    #[test]
    fn refusals() {
        let over = Refusal::OverLimit(crate::upgrade::admission::Refusal::PerIp);
        assert_eq!(over.status().0, 429);
        let text = String::from_utf8(over.response()).unwrap();
        assert!(
            text.starts_with("HTTP/1.1 429 Too Many Requests\r\n"),
            "{text}"
        );
        assert!(text.contains("Retry-After: 1\r\n"), "{text}");
        let text = String::from_utf8(Refusal::NoRoute.response()).unwrap();
        assert!(text.starts_with("HTTP/1.1 404 Not Found\r\n"), "{text}");
        assert!(!text.contains("Retry-After"), "{text}");
        assert_eq!(Refusal::NoBackend.status().0, 502);
        assert_eq!(Refusal::Local(LocalError::Emfile).status().0, 503);
    }
}
