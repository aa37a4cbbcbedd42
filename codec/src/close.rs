//! Close codes and close-frame payloads (RFC 6455 sections 5.5.1 and 7.4).
#![forbid(unsafe_code)]

use std::fmt;

use crate::error::ProtocolError;

/// A close status code. Any `u16` can be held (to report what a peer sent); only
/// [`CloseCode::is_sendable`] codes may appear on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CloseCode(u16);

impl CloseCode {
    /// 1000: the purpose of the connection is fulfilled.
    pub const NORMAL: Self = Self(1000);
    /// 1001: the endpoint is going away (server shutdown, drain, browser navigation).
    pub const GOING_AWAY: Self = Self(1001);
    /// 1002: the peer violated the protocol.
    pub const PROTOCOL_ERROR: Self = Self(1002);
    /// 1003: a data type the endpoint cannot accept.
    pub const UNSUPPORTED_DATA: Self = Self(1003);
    /// 1005: no code was present. Reported locally, never sent.
    pub const NO_STATUS: Self = Self(1005);
    /// 1006: the connection dropped without a close frame. Reported locally, never sent.
    pub const ABNORMAL: Self = Self(1006);
    /// 1007: data inconsistent with the message type (invalid UTF-8 in text).
    pub const INVALID_PAYLOAD: Self = Self(1007);
    /// 1008: a policy was violated.
    pub const POLICY_VIOLATION: Self = Self(1008);
    /// 1009: a frame or message exceeds the configured size limit.
    pub const MESSAGE_TOO_BIG: Self = Self(1009);
    /// 1010: the client needed an extension the server did not negotiate.
    pub const MANDATORY_EXTENSION: Self = Self(1010);
    /// 1011: the server hit an unexpected condition.
    pub const INTERNAL_ERROR: Self = Self(1011);
    /// 1012: the service is restarting; reconnecting later is expected to work.
    pub const SERVICE_RESTART: Self = Self(1012);
    /// 1013: try again later (overload, connection limits).
    pub const TRY_AGAIN_LATER: Self = Self(1013);
    /// 1014: a gateway could not reach or lost its upstream.
    pub const BAD_GATEWAY: Self = Self(1014);

    /// Wraps a raw code without checking it.
    #[must_use]
    pub const fn new(code: u16) -> Self {
        Self(code)
    }

    /// The numeric value.
    #[must_use]
    pub const fn get(self) -> u16 {
        self.0
    }

    /// Whether the code may appear in a close frame: the registered codes except the
    /// local-only 1004/1005/1006/1015, and the 3000-4999 ranges for libraries and applications.
    #[must_use]
    pub const fn is_sendable(self) -> bool {
        matches!(self.0, 1000..=1003 | 1007..=1014 | 3000..=4999)
    }
}

impl fmt::Display for CloseCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The largest control-frame payload, and so the largest close payload.
pub const MAX_CONTROL_PAYLOAD: usize = 125;

/// Validates a close frame's payload (already unmasked).
///
/// Returns `None` for an empty payload (no status, which the receiver reports as 1005), or
/// the code and the reason.
pub fn parse_close(payload: &[u8]) -> Result<Option<(CloseCode, &str)>, ProtocolError> {
    match payload {
        [] => Ok(None),
        [_] => Err(ProtocolError::InvalidClosePayload),
        [hi, lo, reason @ ..] => {
            let code = CloseCode(u16::from_be_bytes([*hi, *lo]));
            if !code.is_sendable() {
                return Err(ProtocolError::InvalidCloseCode);
            }
            let reason =
                simdutf8::basic::from_utf8(reason).map_err(|_| ProtocolError::InvalidUtf8)?;
            Ok(Some((code, reason)))
        }
    }
}

/// Writes a close payload (code, then as much of `reason` as fits in 123 bytes, cut on a
/// character boundary) and returns its length.
pub fn write_close(out: &mut [u8; MAX_CONTROL_PAYLOAD], code: CloseCode, reason: &str) -> usize {
    out[..2].copy_from_slice(&code.get().to_be_bytes());
    let mut end = reason.len().min(MAX_CONTROL_PAYLOAD - 2);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    out[2..2 + end].copy_from_slice(&reason.as_bytes()[..end]);
    2 + end
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sendable_codes() {
        for code in [
            1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014,
        ] {
            assert!(CloseCode::new(code).is_sendable(), "{code}");
        }
        for code in [
            0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535,
        ] {
            assert!(!CloseCode::new(code).is_sendable(), "{code}");
        }
        assert!(CloseCode::new(3000).is_sendable());
        assert!(CloseCode::new(4999).is_sendable());
    }

    #[test]
    fn parse() {
        assert_eq!(parse_close(&[]), Ok(None));
        assert_eq!(parse_close(&[3]), Err(ProtocolError::InvalidClosePayload));
        assert_eq!(parse_close(&[3, 0xe8]), Ok(Some((CloseCode::NORMAL, ""))));
        assert_eq!(
            parse_close(&[3, 0xe8, b'o', b'k']),
            Ok(Some((CloseCode::NORMAL, "ok")))
        );
        assert_eq!(
            parse_close(&[3, 0xed]),
            Err(ProtocolError::InvalidCloseCode)
        );
        assert_eq!(
            parse_close(&[3, 0xe8, 0xff]),
            Err(ProtocolError::InvalidUtf8)
        );
    }

    #[test]
    fn write_truncates_on_char_boundary() {
        let mut out = [0; MAX_CONTROL_PAYLOAD];
        let reason = "é".repeat(100);
        let n = write_close(&mut out, CloseCode::GOING_AWAY, &reason);
        assert!(n <= MAX_CONTROL_PAYLOAD);
        let (code, text) = parse_close(&out[..n]).unwrap().unwrap();
        assert_eq!(code, CloseCode::GOING_AWAY);
        assert_eq!(text.len(), 122);
    }
}
