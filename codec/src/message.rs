//! Per-direction message validation, frame by frame, without buffering messages.
//!
//! The relay decodes a header, calls [`MessageValidator::begin_frame`], streams the unmasked
//! payload through [`MessageValidator::payload`] in whatever pieces the socket delivers, and
//! calls [`MessageValidator::end_frame`] when the frame is complete. Control-frame payloads
//! (at most 125 bytes) are buffered whole by the caller and checked there (close payloads with
//! [`crate::close::parse_close`]).
#![forbid(unsafe_code)]

use crate::error::ProtocolError;
use crate::frame::{FrameHeader, OpCode, RSV1, Role};
use crate::utf8::Utf8Validator;

/// Size bounds for one direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Limits {
    /// Largest message (sum of its fragments' payloads), checked on each frame header before
    /// any of its payload is accepted. Default 64 MiB.
    pub max_message: u64,
    /// Largest single frame payload. Default 64 MiB (no tighter than the message limit).
    pub max_frame: u64,
}

impl Limits {
    /// 64 MiB, tokio-websockets' and most browsers' ballpark.
    pub const DEFAULT_MAX: u64 = 64 << 20;

    /// Limits with both bounds set to `max` bytes.
    #[must_use]
    pub const fn new(max_message: u64, max_frame: u64) -> Self {
        Self {
            max_message,
            max_frame,
        }
    }

    /// No limits at all (for test peers and the load generator).
    #[must_use]
    pub const fn unlimited() -> Self {
        Self {
            max_message: u64::MAX,
            max_frame: u64::MAX,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self::new(Self::DEFAULT_MAX, Self::DEFAULT_MAX)
    }
}

/// Where the direction stands between frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MessageState {
    /// No data message in progress: the next data frame must be text or binary.
    Idle,
    /// A fragmented text or binary message is in progress: the next data frame must be a
    /// continuation.
    Fragmented {
        /// The message's opcode (text or binary).
        opcode: OpCode,
        /// Its first frame had RSV1 (permessage-deflate): payloads are compressed.
        compressed: bool,
    },
}

/// What kind of payload the current frame carries, which decides how it is checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PayloadKind {
    /// Uncompressed text: UTF-8-checked as it streams.
    Text,
    /// Binary, or compressed text (opaque to the gateway).
    Opaque,
    /// A control frame's payload, buffered whole by the caller.
    Control,
}

/// Validates one direction of a connection (client to us, or backend to us).
#[derive(Clone, Debug)]
pub struct MessageValidator {
    role: Role,
    deflate: bool,
    limits: Limits,
    state: MessageState,
    /// Payload bytes of the current message seen in earlier frames plus the current header.
    message_len: u64,
    /// The frame being streamed: its payload kind and whether it ends the message.
    current: Option<(PayloadKind, bool)>,
    utf8: Utf8Validator,
}

impl MessageValidator {
    /// A validator for frames received by an endpoint playing `role`, with permessage-deflate
    /// negotiated or not.
    #[must_use]
    pub const fn new(role: Role, limits: Limits, deflate: bool) -> Self {
        Self {
            role,
            deflate,
            limits,
            state: MessageState::Idle,
            message_len: 0,
            current: None,
            utf8: Utf8Validator::new(),
        }
    }

    /// The role frames are decoded for.
    #[must_use]
    pub const fn role(&self) -> Role {
        self.role
    }

    /// The RSV bits [`FrameHeader::decode`] should accept on this direction.
    #[must_use]
    pub const fn allowed_rsv(&self) -> u8 {
        if self.deflate { RSV1 } else { 0 }
    }

    /// The state between frames.
    #[must_use]
    pub const fn state(&self) -> MessageState {
        self.state
    }

    /// Checks a decoded header against the message in progress and the limits; returns how
    /// its payload must be streamed.
    pub fn begin_frame(&mut self, header: &FrameHeader) -> Result<PayloadKind, ProtocolError> {
        debug_assert!(self.current.is_none(), "begin_frame inside a frame");
        if header.rsv & !self.allowed_rsv() != 0 {
            return Err(ProtocolError::ReservedBits);
        }
        if header.opcode.is_control() {
            if header.rsv != 0 {
                return Err(ProtocolError::ReservedBits);
            }
            self.current = Some((PayloadKind::Control, true));
            return Ok(PayloadKind::Control);
        }
        let (opcode, compressed) = match (self.state, header.opcode) {
            (MessageState::Idle, OpCode::Continuation) => {
                return Err(ProtocolError::UnexpectedContinuation);
            }
            (MessageState::Idle, opcode) => {
                self.message_len = 0;
                (opcode, header.rsv & RSV1 != 0)
            }
            (MessageState::Fragmented { .. }, OpCode::Text | OpCode::Binary) => {
                return Err(ProtocolError::ExpectedContinuation);
            }
            (MessageState::Fragmented { opcode, compressed }, _) => {
                // RSV1 belongs on the first frame of a compressed message only (RFC 7692 6.1).
                if header.rsv != 0 {
                    return Err(ProtocolError::ReservedBits);
                }
                (opcode, compressed)
            }
        };
        if header.payload_len > self.limits.max_frame {
            return Err(ProtocolError::FrameTooBig);
        }
        self.message_len = self.message_len.saturating_add(header.payload_len);
        if self.message_len > self.limits.max_message {
            return Err(ProtocolError::MessageTooBig);
        }
        self.state = if header.fin {
            MessageState::Idle
        } else {
            MessageState::Fragmented { opcode, compressed }
        };
        let kind = if opcode == OpCode::Text && !compressed {
            PayloadKind::Text
        } else {
            PayloadKind::Opaque
        };
        self.current = Some((kind, header.fin));
        Ok(kind)
    }

    /// Checks the next unmasked piece of the current frame's payload.
    pub fn payload(&mut self, chunk: &[u8]) -> Result<(), ProtocolError> {
        match self.current {
            Some((PayloadKind::Text, _)) => self.utf8.feed(chunk),
            _ => Ok(()),
        }
    }

    /// Ends the current frame; at the end of a text message, an unfinished character is an
    /// error.
    pub fn end_frame(&mut self) -> Result<(), ProtocolError> {
        match self.current.take() {
            Some((PayloadKind::Text, true)) => self.utf8.finish(),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(fin: bool, opcode: OpCode, len: u64) -> FrameHeader {
        FrameHeader::new(fin, opcode, Some([0; 4]), len)
    }

    fn frame(
        v: &mut MessageValidator,
        fin: bool,
        op: OpCode,
        payload: &[u8],
    ) -> Result<(), ProtocolError> {
        v.begin_frame(&header(fin, op, payload.len() as u64))?;
        v.payload(payload)?;
        v.end_frame()
    }

    #[test]
    fn fragmentation_rules() {
        let mut v = MessageValidator::new(Role::Server, Limits::default(), false);
        assert_eq!(
            frame(&mut v, true, OpCode::Continuation, b""),
            Err(ProtocolError::UnexpectedContinuation)
        );
        let mut v = MessageValidator::new(Role::Server, Limits::default(), false);
        frame(&mut v, false, OpCode::Text, "ab".as_bytes()).unwrap();
        frame(&mut v, true, OpCode::Ping, b"x").unwrap();
        assert_eq!(
            frame(&mut v, true, OpCode::Binary, b""),
            Err(ProtocolError::ExpectedContinuation)
        );
        let mut v = MessageValidator::new(Role::Server, Limits::default(), false);
        frame(&mut v, false, OpCode::Text, &[0xE2, 0x82]).unwrap();
        frame(&mut v, true, OpCode::Pong, b"").unwrap();
        frame(&mut v, true, OpCode::Continuation, &[0xAC]).unwrap();
        assert_eq!(v.state(), MessageState::Idle);
        frame(&mut v, true, OpCode::Binary, &[0xFF]).unwrap();
    }

    #[test]
    fn text_must_end_on_a_character() {
        let mut v = MessageValidator::new(Role::Server, Limits::default(), false);
        assert_eq!(
            frame(&mut v, true, OpCode::Text, &[0xE2, 0x82]),
            Err(ProtocolError::InvalidUtf8)
        );
    }

    #[test]
    fn limits() {
        let mut v = MessageValidator::new(Role::Server, Limits::new(10, 6), false);
        assert_eq!(
            v.begin_frame(&header(true, OpCode::Binary, 7)),
            Err(ProtocolError::FrameTooBig)
        );
        let mut v = MessageValidator::new(Role::Server, Limits::new(10, 6), false);
        frame(&mut v, false, OpCode::Binary, &[0; 6]).unwrap();
        assert_eq!(
            v.begin_frame(&header(true, OpCode::Continuation, 5)),
            Err(ProtocolError::MessageTooBig)
        );
        assert_eq!(ProtocolError::MessageTooBig.close_code().get(), 1009);
    }

    #[test]
    fn deflate_rsv1() {
        let compressed = |fin, op, len| FrameHeader {
            rsv: RSV1,
            ..header(fin, op, len)
        };
        let mut plain = MessageValidator::new(Role::Server, Limits::default(), false);
        assert_eq!(
            plain.begin_frame(&compressed(true, OpCode::Text, 1)),
            Err(ProtocolError::ReservedBits)
        );
        let mut v = MessageValidator::new(Role::Server, Limits::default(), true);
        // Compressed text is not UTF-8 checked.
        assert_eq!(
            v.begin_frame(&compressed(false, OpCode::Text, 1)),
            Ok(PayloadKind::Opaque)
        );
        v.payload(&[0xFF]).unwrap();
        v.end_frame().unwrap();
        assert_eq!(
            v.begin_frame(&compressed(true, OpCode::Continuation, 1)),
            Err(ProtocolError::ReservedBits)
        );
        let mut v = MessageValidator::new(Role::Server, Limits::default(), true);
        assert_eq!(
            v.begin_frame(&compressed(true, OpCode::Ping, 1)),
            Err(ProtocolError::ReservedBits)
        );
    }
}
