//! Frame headers (RFC 6455 section 5.2): decoded from a byte slice without touching the
//! payload, encoded into a 14-byte stack buffer.
#![forbid(unsafe_code)]

use crate::error::ProtocolError;

/// Which end of the connection the decoding endpoint is; it decides which frames must be
/// masked (client to server) and which must not (server to client).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// We opened the connection: frames we receive are unmasked, frames we send are masked.
    Client,
    /// We accepted the connection: frames we receive are masked, frames we send are not.
    Server,
}

/// A frame's opcode; the reserved values are a decode error, never an `OpCode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OpCode {
    /// 0x0: the next fragment of a text or binary message.
    Continuation,
    /// 0x1: the first frame of a text message.
    Text,
    /// 0x2: the first frame of a binary message.
    Binary,
    /// 0x8: close.
    Close,
    /// 0x9: ping.
    Ping,
    /// 0xA: pong.
    Pong,
}

impl OpCode {
    /// The 4-bit wire value.
    #[must_use]
    pub const fn bits(self) -> u8 {
        match self {
            Self::Continuation => 0x0,
            Self::Text => 0x1,
            Self::Binary => 0x2,
            Self::Close => 0x8,
            Self::Ping => 0x9,
            Self::Pong => 0xA,
        }
    }

    /// Parses a 4-bit wire value.
    pub const fn from_bits(bits: u8) -> Result<Self, ProtocolError> {
        Ok(match bits {
            0x0 => Self::Continuation,
            0x1 => Self::Text,
            0x2 => Self::Binary,
            0x8 => Self::Close,
            0x9 => Self::Ping,
            0xA => Self::Pong,
            _ => return Err(ProtocolError::ReservedOpcode),
        })
    }

    /// Close, ping and pong: at most 125 bytes, never fragmented, allowed between fragments.
    #[must_use]
    pub const fn is_control(self) -> bool {
        matches!(self, Self::Close | Self::Ping | Self::Pong)
    }
}

/// RSV1: the permessage-deflate "compressed" bit.
pub const RSV1: u8 = 0x40;
/// RSV2: defined by no extension we support.
pub const RSV2: u8 = 0x20;
/// RSV3: defined by no extension we support.
pub const RSV3: u8 = 0x10;

/// The longest encoded header: 2 bytes, a 64-bit length and a masking key.
pub const MAX_HEADER_LEN: usize = 14;

/// A decoded frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    /// Final fragment of a message (always set on control frames).
    pub fin: bool,
    /// The RSV bits exactly as they sit in the first byte ([`RSV1`] | [`RSV2`] | [`RSV3`]).
    pub rsv: u8,
    /// The opcode.
    pub opcode: OpCode,
    /// The masking key, present on client-to-server frames.
    pub mask: Option<[u8; 4]>,
    /// The payload length (at most 2^63 - 1).
    pub payload_len: u64,
}

/// The outcome of [`FrameHeader::decode`] on a buffer that may hold only part of a header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decoded {
    /// The buffer ends inside the header: at least `needed` more bytes are required.
    Incomplete {
        /// Lower bound on the bytes still missing.
        needed: usize,
    },
    /// A complete, valid header occupying the first `len` bytes of the buffer.
    Header {
        /// The header.
        header: FrameHeader,
        /// Its encoded length (2 to 14 bytes); the payload starts right after.
        len: usize,
    },
}

impl FrameHeader {
    /// A header with no RSV bits.
    #[must_use]
    pub const fn new(fin: bool, opcode: OpCode, mask: Option<[u8; 4]>, payload_len: u64) -> Self {
        Self {
            fin,
            rsv: 0,
            opcode,
            mask,
            payload_len,
        }
    }

    /// Decodes a header sent to an endpoint playing `role`.
    ///
    /// `allowed_rsv` is the set of RSV bits negotiated extensions define (0, or [`RSV1`] with
    /// permessage-deflate); which frames may carry them is the message validator's business.
    /// Errors are checked in wire order, so the earliest problem is the one reported.
    pub fn decode(buf: &[u8], role: Role, allowed_rsv: u8) -> Result<Decoded, ProtocolError> {
        let [b0, b1, ..] = *buf else {
            return Ok(Decoded::Incomplete {
                needed: 2 - buf.len(),
            });
        };
        let fin = b0 & 0x80 != 0;
        let rsv = b0 & (RSV1 | RSV2 | RSV3);
        if rsv & !allowed_rsv != 0 {
            return Err(ProtocolError::ReservedBits);
        }
        let opcode = OpCode::from_bits(b0 & 0x0F)?;
        let masked = b1 & 0x80 != 0;
        match (role, masked) {
            (Role::Server, false) => return Err(ProtocolError::UnmaskedFrame),
            (Role::Client, true) => return Err(ProtocolError::MaskedFrame),
            _ => {}
        }
        let short_len = b1 & 0x7F;
        if opcode.is_control() {
            if !fin {
                return Err(ProtocolError::FragmentedControlFrame);
            }
            if short_len > 125 {
                return Err(ProtocolError::ControlFrameTooLong);
            }
        }
        let len_bytes = match short_len {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        let len = 2 + len_bytes + if masked { 4 } else { 0 };
        if buf.len() < len {
            return Ok(Decoded::Incomplete {
                needed: len - buf.len(),
            });
        }
        let payload_len = match short_len {
            126 => u64::from(u16::from_be_bytes([buf[2], buf[3]])),
            127 => {
                let mut be = [0; 8];
                be.copy_from_slice(&buf[2..10]);
                let n = u64::from_be_bytes(be);
                if n >> 63 != 0 {
                    return Err(ProtocolError::InvalidPayloadLength);
                }
                n
            }
            n => u64::from(n),
        };
        let mask = masked.then(|| {
            let at = 2 + len_bytes;
            [buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]
        });
        Ok(Decoded::Header {
            header: Self {
                fin,
                rsv,
                opcode,
                mask,
                payload_len,
            },
            len,
        })
    }

    /// The length [`encode`](Self::encode) will produce.
    #[must_use]
    pub const fn encoded_len(&self) -> usize {
        let len = match self.payload_len {
            0..=125 => 2,
            126..=0xFFFF => 4,
            _ => 10,
        };
        if self.mask.is_some() { len + 4 } else { len }
    }

    /// Encodes the header (minimal length encoding) and returns its length.
    pub fn encode(&self, out: &mut [u8; MAX_HEADER_LEN]) -> usize {
        debug_assert!(self.payload_len >> 63 == 0, "payload length out of range");
        out[0] = u8::from(self.fin) << 7 | self.rsv | self.opcode.bits();
        let mask_bit = if self.mask.is_some() { 0x80 } else { 0 };
        let mut at = match self.payload_len {
            n @ 0..=125 => {
                out[1] = mask_bit | n as u8;
                2
            }
            n @ 126..=0xFFFF => {
                out[1] = mask_bit | 0x7E;
                out[2..4].copy_from_slice(&(n as u16).to_be_bytes());
                4
            }
            n => {
                out[1] = mask_bit | 0x7F;
                out[2..10].copy_from_slice(&n.to_be_bytes());
                10
            }
        };
        if let Some(key) = self.mask {
            out[at..at + 4].copy_from_slice(&key);
            at += 4;
        }
        at
    }
}

/// Appends a whole frame (header, then the payload masked with `mask` if given) to `out`.
///
/// For small frames built in one piece (control frames, the load generator's messages); the
/// relay streams large payloads instead.
pub fn write_frame(
    out: &mut Vec<u8>,
    fin: bool,
    opcode: OpCode,
    mask: Option<[u8; 4]>,
    payload: &[u8],
) {
    let header = FrameHeader::new(fin, opcode, mask, payload.len() as u64);
    let mut head = [0; MAX_HEADER_LEN];
    let n = header.encode(&mut head);
    out.extend_from_slice(&head[..n]);
    let start = out.len();
    out.extend_from_slice(payload);
    if let Some(key) = mask {
        crate::mask::apply_mask(&mut out[start..], key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(buf: &[u8], role: Role) -> Result<Decoded, ProtocolError> {
        FrameHeader::decode(buf, role, 0)
    }

    #[test]
    fn rfc_examples() {
        // A single-frame unmasked text message "Hello" (RFC 6455 5.7).
        let d = decode(&[0x81, 0x05, b'H'], Role::Client).unwrap();
        assert_eq!(
            d,
            Decoded::Header {
                header: FrameHeader::new(true, OpCode::Text, None, 5),
                len: 2
            }
        );
        // The masked version.
        let d = decode(&[0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f], Role::Server).unwrap();
        assert_eq!(
            d,
            Decoded::Header {
                header: FrameHeader::new(true, OpCode::Text, Some([0x37, 0xfa, 0x21, 0x3d]), 5),
                len: 6
            }
        );
        // 256 bytes binary, 16-bit length.
        let d = decode(&[0x82, 0x7E, 0x01, 0x00], Role::Client).unwrap();
        assert!(matches!(d, Decoded::Header { header, len: 4 } if header.payload_len == 256));
    }

    #[test]
    fn rfc_examples_fragments_control_and_long() {
        // A fragmented unmasked text message: "Hel" then "lo".
        let d = decode(&[0x01, 0x03, b'H', b'e', b'l'], Role::Client).unwrap();
        assert_eq!(
            d,
            Decoded::Header {
                header: FrameHeader::new(false, OpCode::Text, None, 3),
                len: 2
            }
        );
        let d = decode(&[0x80, 0x02, b'l', b'o'], Role::Client).unwrap();
        assert_eq!(
            d,
            Decoded::Header {
                header: FrameHeader::new(true, OpCode::Continuation, None, 2),
                len: 2
            }
        );
        // Unmasked ping "Hello", and the masked pong that answers it.
        let d = decode(&[0x89, 0x05, b'H'], Role::Client).unwrap();
        assert!(matches!(d, Decoded::Header { header, len: 2 } if header.opcode == OpCode::Ping));
        let pong = [
            0x8a, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
        ];
        let Ok(Decoded::Header { header, len }) = decode(&pong, Role::Server) else {
            panic!("pong did not decode")
        };
        assert_eq!(
            (header.opcode, header.payload_len, len),
            (OpCode::Pong, 5, 6)
        );
        let mut payload = pong[len..].to_vec();
        crate::mask::apply_mask(&mut payload, header.mask.unwrap());
        assert_eq!(payload, b"Hello");
        // 64 KiB binary message in a single unmasked frame: 64-bit length.
        let d = decode(&[0x82, 0x7F, 0, 0, 0, 0, 0, 1, 0, 0], Role::Client).unwrap();
        assert!(matches!(d, Decoded::Header { header, len: 10 } if header.payload_len == 65536));
    }

    #[test]
    fn incomplete_reports_needed() {
        assert_eq!(
            decode(&[], Role::Client),
            Ok(Decoded::Incomplete { needed: 2 })
        );
        assert_eq!(
            decode(&[0x82], Role::Client),
            Ok(Decoded::Incomplete { needed: 1 })
        );
        assert_eq!(
            decode(&[0x82, 0x7F, 0], Role::Client),
            Ok(Decoded::Incomplete { needed: 7 })
        );
        assert_eq!(
            decode(&[0x82, 0xFE, 0, 1], Role::Server),
            Ok(Decoded::Incomplete { needed: 4 })
        );
    }

    #[test]
    fn violations() {
        assert_eq!(
            decode(&[0x83, 0x80], Role::Server),
            Err(ProtocolError::ReservedOpcode)
        );
        assert_eq!(
            decode(&[0x8B, 0x80], Role::Server),
            Err(ProtocolError::ReservedOpcode)
        );
        assert_eq!(
            decode(&[0xC1, 0x80], Role::Server),
            Err(ProtocolError::ReservedBits)
        );
        assert!(FrameHeader::decode(&[0xC1, 0x80], Role::Server, RSV1).is_ok());
        assert_eq!(
            decode(&[0xA1, 0x80], Role::Server),
            Err(ProtocolError::ReservedBits)
        );
        assert_eq!(
            decode(&[0x09, 0x80], Role::Server),
            Err(ProtocolError::FragmentedControlFrame)
        );
        assert_eq!(
            decode(&[0x89, 0xFE], Role::Server),
            Err(ProtocolError::ControlFrameTooLong)
        );
        assert_eq!(
            decode(&[0x81, 0x00], Role::Server),
            Err(ProtocolError::UnmaskedFrame)
        );
        assert_eq!(
            decode(&[0x81, 0x80], Role::Client),
            Err(ProtocolError::MaskedFrame)
        );
        let mut big = [0x82, 0x7F, 0x80, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(
            decode(&big, Role::Client),
            Err(ProtocolError::InvalidPayloadLength)
        );
        big[2] = 0x7F;
        assert!(decode(&big, Role::Client).is_ok());
    }

    #[test]
    fn encode_round_trip_boundaries() {
        for len in [0, 1, 125, 126, 127, 0xFFFF, 0x1_0000, (1 << 63) - 1] {
            for mask in [None, Some([1, 2, 3, 4])] {
                let header = FrameHeader::new(false, OpCode::Binary, mask, len);
                let mut buf = [0; MAX_HEADER_LEN];
                let n = header.encode(&mut buf);
                assert_eq!(n, header.encoded_len());
                let role = if mask.is_some() {
                    Role::Server
                } else {
                    Role::Client
                };
                assert_eq!(
                    decode(&buf[..n], role),
                    Ok(Decoded::Header { header, len: n })
                );
            }
        }
    }

    #[test]
    fn write_frame_masks_payload() {
        let mut out = Vec::new();
        write_frame(
            &mut out,
            true,
            OpCode::Text,
            Some([0x37, 0xfa, 0x21, 0x3d]),
            b"Hello",
        );
        assert_eq!(
            out,
            [
                0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58
            ]
        );
    }
}
