//! The one error type for a frame stream, and the close code each error earns.
//!
//! It does not say which leg failed: the gateway wraps it with the side (client or backend),
//! because the same violation earns the same code whichever peer commits it.
#![forbid(unsafe_code)]

use std::fmt;

use crate::close::CloseCode;

/// A violation of RFC 6455 (or of a configured limit) by the peer that sent the frames.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ProtocolError {
    /// An opcode the RFC reserves (0x3-0x7, 0xB-0xF).
    ReservedOpcode,
    /// An RSV bit that no negotiated extension defines, or RSV1 where deflate does not allow it.
    ReservedBits,
    /// A control frame (close, ping, pong) without FIN.
    FragmentedControlFrame,
    /// A control frame whose payload is longer than 125 bytes.
    ControlFrameTooLong,
    /// A 64-bit payload length with its most significant bit set.
    InvalidPayloadLength,
    /// An unmasked frame sent to a server.
    UnmaskedFrame,
    /// A masked frame sent to a client.
    MaskedFrame,
    /// A continuation frame with no fragmented message in progress.
    UnexpectedContinuation,
    /// A text or binary frame while a fragmented message is still in progress.
    ExpectedContinuation,
    /// Text that is not UTF-8 (a message, or a close reason).
    InvalidUtf8,
    /// A close frame whose payload is one byte long (a code needs two).
    InvalidClosePayload,
    /// A close code that may not appear on the wire (1004-1006, 1015, unassigned ranges).
    InvalidCloseCode,
    /// A frame longer than the configured frame limit.
    FrameTooBig,
    /// A message longer than the configured message limit.
    MessageTooBig,
}

impl ProtocolError {
    /// Short, stable, human-readable description (used in logs and close reasons).
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::ReservedOpcode => "reserved opcode",
            Self::ReservedBits => "reserved bits set",
            Self::FragmentedControlFrame => "fragmented control frame",
            Self::ControlFrameTooLong => "control frame longer than 125 bytes",
            Self::InvalidPayloadLength => "invalid payload length",
            Self::UnmaskedFrame => "unmasked frame from client",
            Self::MaskedFrame => "masked frame from server",
            Self::UnexpectedContinuation => "continuation without a message",
            Self::ExpectedContinuation => "new message inside a fragmented message",
            Self::InvalidUtf8 => "invalid utf-8",
            Self::InvalidClosePayload => "invalid close payload",
            Self::InvalidCloseCode => "invalid close code",
            Self::FrameTooBig => "frame too big",
            Self::MessageTooBig => "message too big",
        }
    }

    /// The close code the offending peer receives: the one mapping from errors to codes.
    #[must_use]
    pub const fn close_code(self) -> CloseCode {
        match self {
            Self::InvalidUtf8 => CloseCode::INVALID_PAYLOAD,
            Self::FrameTooBig | Self::MessageTooBig => CloseCode::MESSAGE_TOO_BIG,
            Self::ReservedOpcode
            | Self::ReservedBits
            | Self::FragmentedControlFrame
            | Self::ControlFrameTooLong
            | Self::InvalidPayloadLength
            | Self::UnmaskedFrame
            | Self::MaskedFrame
            | Self::UnexpectedContinuation
            | Self::ExpectedContinuation
            | Self::InvalidClosePayload
            | Self::InvalidCloseCode => CloseCode::PROTOCOL_ERROR,
        }
    }
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::error::Error for ProtocolError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes() {
        assert_eq!(ProtocolError::InvalidUtf8.close_code().get(), 1007);
        assert_eq!(ProtocolError::MessageTooBig.close_code().get(), 1009);
        assert_eq!(ProtocolError::FrameTooBig.close_code().get(), 1009);
        assert_eq!(ProtocolError::ReservedBits.close_code().get(), 1002);
        assert_eq!(
            ProtocolError::InvalidCloseCode.to_string(),
            "invalid close code"
        );
    }
}
