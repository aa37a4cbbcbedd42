//! Client-side framing over `codec`: whole frames parsed out of the read buffer, and masked
//! frames appended to the write buffer. Sans-IO, so the connection driver and the unit tests
//! share it.

use codec::close::{self, CloseCode, MAX_CONTROL_PAYLOAD};
use codec::frame::{self, Decoded, FrameHeader, OpCode, Role};
use codec::message::{Limits, MessageValidator};
use codec::{PayloadKind, ProtocolError};

/// A complete frame from the server, borrowed from the read buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Frame<'a> {
    /// Its opcode (continuation frames keep `Continuation`).
    pub(crate) opcode: OpCode,
    /// Whether it ends its message.
    pub(crate) fin: bool,
    /// The payload (server frames are unmasked).
    pub(crate) payload: &'a [u8],
}

/// The outcome of looking for a frame at the front of the read buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Parsed<'a> {
    /// A frame occupying the first `len` bytes.
    Frame {
        /// The frame.
        frame: Frame<'a>,
        /// Its encoded length, to drop from the buffer once handled.
        len: usize,
    },
    /// The buffer must hold at least `total` bytes before the next frame is complete.
    Incomplete {
        /// Bytes from the front of the buffer that the frame needs (a lower bound while the
        /// header itself is incomplete).
        total: usize,
    },
}

/// Parses and validates the server-to-client direction, one whole frame at a time.
#[derive(Clone, Debug)]
pub(crate) struct FrameParser {
    validator: MessageValidator,
    max_frame: u64,
}

impl FrameParser {
    /// A parser that refuses frames (and messages) longer than `max_frame` bytes, which also
    /// bounds how far the read buffer may grow.
    pub(crate) fn new(max_frame: u64) -> Self {
        Self {
            validator: MessageValidator::new(
                Role::Client,
                Limits::new(max_frame, max_frame),
                false,
            ),
            max_frame,
        }
    }

    /// Looks for one complete frame at the front of `buf`. A frame is validated (opcode
    /// sequence, limits, UTF-8 of text) only once all its bytes are there, so a partial frame
    /// is never re-checked.
    pub(crate) fn parse<'a>(&mut self, buf: &'a [u8]) -> Result<Parsed<'a>, ProtocolError> {
        let (header, head_len) = match FrameHeader::decode(buf, Role::Client, 0)? {
            Decoded::Incomplete { needed } => {
                return Ok(Parsed::Incomplete {
                    total: buf.len() + needed,
                });
            }
            Decoded::Header { header, len } => (header, len),
        };
        if header.payload_len > self.max_frame {
            return Err(ProtocolError::FrameTooBig);
        }
        let total = head_len + header.payload_len as usize;
        if buf.len() < total {
            return Ok(Parsed::Incomplete { total });
        }
        let payload = &buf[head_len..total];
        let kind = self.validator.begin_frame(&header)?;
        if kind == PayloadKind::Control {
            if header.opcode == OpCode::Close {
                close::parse_close(payload)?;
            }
        } else {
            self.validator.payload(payload)?;
        }
        self.validator.end_frame()?;
        Ok(Parsed::Frame {
            frame: Frame {
                opcode: header.opcode,
                fin: header.fin,
                payload,
            },
            len: total,
        })
    }
}

/// Appends one unfragmented frame, masked with a fresh random key as RFC 6455 requires of a
/// client (codec's SIMD masking). Allocation-free once `out` has grown to a message.
pub(crate) fn encode(out: &mut Vec<u8>, opcode: OpCode, payload: &[u8]) {
    frame::write_frame(out, true, opcode, Some(rand::random()), payload);
}

/// Appends a Close frame carrying `code` (none: an empty Close).
pub(crate) fn encode_close(out: &mut Vec<u8>, code: Option<CloseCode>) {
    let mut body = [0; MAX_CONTROL_PAYLOAD];
    let len = code.map_or(0, |c| close::write_close(&mut body, c, ""));
    encode(out, OpCode::Close, &body[..len]);
}

/// The status a Close frame carries; only call on payloads [`FrameParser`] accepted.
pub(crate) fn close_code(payload: &[u8]) -> Option<CloseCode> {
    close::parse_close(payload)
        .ok()
        .flatten()
        .map(|(code, _)| code)
}

#[cfg(test)]
mod tests {
    use codec::mask::apply_mask;

    use super::*;

    fn server_frame(fin: bool, opcode: OpCode, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        frame::write_frame(&mut out, fin, opcode, None, payload);
        out
    }

    #[test]
    fn parses_back_to_back_frames_and_reports_what_is_missing() {
        let mut bytes = server_frame(true, OpCode::Binary, b"hello");
        bytes.extend(server_frame(true, OpCode::Ping, b"p"));
        let mut p = FrameParser::new(1 << 20);
        let Parsed::Frame { frame, len } = p.parse(&bytes).unwrap() else {
            panic!("expected a frame")
        };
        assert_eq!(
            (frame.opcode, frame.fin, frame.payload),
            (OpCode::Binary, true, &b"hello"[..])
        );
        assert_eq!(len, 7);
        let rest = &bytes[len..];
        assert!(
            matches!(p.parse(rest), Ok(Parsed::Frame { frame, .. }) if frame.opcode == OpCode::Ping)
        );
        assert_eq!(p.parse(&rest[..1]), Ok(Parsed::Incomplete { total: 2 }));
        let big = server_frame(true, OpCode::Binary, &[7; 300]);
        assert_eq!(p.parse(&big[..10]), Ok(Parsed::Incomplete { total: 304 }));
    }

    #[test]
    fn rejects_what_a_server_may_not_send() {
        let mut p = FrameParser::new(16);
        assert_eq!(
            p.parse(&server_frame(true, OpCode::Binary, &[0; 17])),
            Err(ProtocolError::FrameTooBig)
        );
        let mut masked = Vec::new();
        frame::write_frame(&mut masked, true, OpCode::Text, Some([1, 2, 3, 4]), b"x");
        assert_eq!(p.parse(&masked), Err(ProtocolError::MaskedFrame));
        assert_eq!(
            p.parse(&server_frame(true, OpCode::Text, &[0xFF])),
            Err(ProtocolError::InvalidUtf8)
        );
        assert_eq!(
            FrameParser::new(16).parse(&server_frame(true, OpCode::Close, &[3, 0xEC])),
            Err(ProtocolError::InvalidCloseCode)
        );
        let mut p = FrameParser::new(16);
        assert!(p.parse(&server_frame(false, OpCode::Text, b"a")).is_ok());
        assert_eq!(
            p.parse(&server_frame(true, OpCode::Text, b"b")),
            Err(ProtocolError::ExpectedContinuation)
        );
    }

    #[test]
    fn encodes_masked_frames_with_fresh_keys() {
        let mut out = Vec::new();
        encode(&mut out, OpCode::Text, b"abcd");
        encode(&mut out, OpCode::Text, b"abcd");
        let Decoded::Header { header, len } = FrameHeader::decode(&out, Role::Server, 0).unwrap()
        else {
            panic!("incomplete")
        };
        let mut payload = out[len..len + 4].to_vec();
        apply_mask(&mut payload, header.mask.unwrap());
        assert_eq!(payload, b"abcd");
        // Two frames with the same payload almost surely differ on the wire (2^-32 chance).
        assert_ne!(out[..len + 4], out[len + 4..]);
    }

    #[test]
    fn close_frames_round_trip_their_code() {
        let mut out = Vec::new();
        encode_close(&mut out, Some(CloseCode::NORMAL));
        let Decoded::Header { header, len } = FrameHeader::decode(&out, Role::Server, 0).unwrap()
        else {
            panic!("incomplete")
        };
        let mut payload = out[len..].to_vec();
        apply_mask(&mut payload, header.mask.unwrap());
        assert_eq!(close_code(&payload), Some(CloseCode::NORMAL));
        out.clear();
        encode_close(&mut out, None);
        assert_eq!(out.len(), 6); // 2-byte header, 4-byte key, no body
    }
}
