//! The sans-IO heart of the relay: turns the bytes one peer sent into the bytes the other
//! peer receives, frame by frame, validating as it goes.
//!
//! Data frames stream through in whatever pieces the socket delivers (never a whole
//! message in memory); control frames (at most 125 bytes) are collected whole so they can
//! be checked and acted on. Each outgoing data or control frame gets a fresh masking key when
//! it goes to a backend: the client's key is never forwarded.
#![forbid(unsafe_code)]

use codec::close::{self, CloseCode, MAX_CONTROL_PAYLOAD};
use codec::frame::{Decoded, FrameHeader, MAX_HEADER_LEN, OpCode, Role, write_frame};
use codec::message::{Limits, MessageValidator, PayloadKind};
use codec::{ProtocolError, mask};

use crate::leg::KEEPALIVE_PAYLOAD;

/// A validated control-frame payload (a close frame's code and reason, or ping data).
#[derive(Clone, Copy, Debug)]
pub(crate) struct ControlPayload {
    buf: [u8; MAX_CONTROL_PAYLOAD],
    len: u8,
}

impl ControlPayload {
    /// A close payload with `code` and `reason` (cut to fit).
    pub(crate) fn close(code: CloseCode, reason: &str) -> Self {
        let mut buf = [0; MAX_CONTROL_PAYLOAD];
        let len = close::write_close(&mut buf, code, reason) as u8;
        Self { buf, len }
    }

    /// The payload bytes.
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.buf[..usize::from(self.len)]
    }

    /// The close code, if this is a close payload that has one.
    pub(crate) fn close_code(&self) -> Option<CloseCode> {
        close::parse_close(self.bytes())
            .ok()
            .flatten()
            .map(|(code, _)| code)
    }
}

/// What [`Forwarder::process`] stopped on.
#[derive(Clone, Debug)]
pub(crate) enum Step {
    /// All complete input was consumed; read more (a partial header may be left over).
    NeedInput,
    /// A valid close frame arrived; nothing after it was consumed. Boxed: it happens once per
    /// connection, and inline it would enlarge every idle connection's future.
    Close(Box<ControlPayload>),
    /// The peer broke the protocol; the output holds only bytes that were valid.
    Violation(ProtocolError),
}

/// How control frames are treated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Relay to the other peer: pings and pongs pass through, masked if `mask_out`.
    Relay {
        /// The receiving peer is a server: every outgoing frame gets a fresh masking key.
        mask_out: bool,
    },
    /// Answer the sender itself (the embedded echo): pings get pongs, pongs are dropped.
    Echo,
}

/// Where the forwarder stands within the input stream.
#[derive(Clone, Copy, Debug)]
enum FrameState {
    /// The next input bytes are a frame header.
    Header,
    /// Streaming a data frame's payload; its header is already in the output.
    Data {
        /// Payload bytes still to come.
        remaining: u64,
        /// Payload bytes already streamed (the masking offset).
        offset: u64,
        /// The sender's masking key.
        in_key: Option<[u8; 4]>,
        /// The key we mask the output with.
        out_key: Option<[u8; 4]>,
        /// Uncompressed text: unmasked and UTF-8 checked before re-masking.
        text: bool,
    },
}

/// One direction of a relayed (or echoed) connection.
#[derive(Debug)]
pub(crate) struct Forwarder {
    validator: MessageValidator,
    mode: Mode,
    state: FrameState,
    /// Frames written to the output.
    pub(crate) frames: u64,
    /// Payload bytes written to the output.
    pub(crate) payload_bytes: u64,
    /// Where the current data frame's header sits in the caller's unflushed output, so a
    /// violation inside it can take the whole frame back.
    frame_start: Option<usize>,
}

impl Forwarder {
    /// A forwarder for frames received by an endpoint playing `role`.
    pub(crate) fn new(role: Role, limits: Limits, deflate: bool, mode: Mode) -> Self {
        Self {
            validator: MessageValidator::new(role, limits, deflate),
            mode,
            state: FrameState::Header,
            frames: 0,
            payload_bytes: 0,
            frame_start: None,
        }
    }

    /// Whether the caller should write `out` now: always at a frame boundary or when
    /// processing stopped; inside a frame only once `limit` bytes are held back (an incomplete
    /// frame waits so that a violation inside it can still be answered with a clean close).
    pub(crate) fn should_flush(&self, out: &[u8], limit: usize, step: &Step) -> bool {
        !out.is_empty()
            && (!self.output_mid_frame() || out.len() >= limit || !matches!(step, Step::NeedInput))
    }

    /// The caller wrote (and cleared) the output: a frame begun in it can no longer be
    /// taken back.
    pub(crate) fn flushed(&mut self) {
        self.frame_start = None;
    }

    /// The output stops inside a data frame: no other frame (a close) may be written yet.
    pub(crate) fn output_mid_frame(&self) -> bool {
        matches!(self.state, FrameState::Data { .. })
    }

    fn out_key(&self) -> Option<[u8; 4]> {
        match self.mode {
            Mode::Relay { mask_out: true } => Some(rand::random()),
            Mode::Relay { mask_out: false } | Mode::Echo => None,
        }
    }

    /// Consumes as much of `input` as possible, appending what the other side receives to
    /// `out`; returns the bytes consumed and why it stopped.
    pub(crate) fn process(&mut self, input: &[u8], out: &mut Vec<u8>) -> (usize, Step) {
        let mut pos = 0;
        loop {
            let rest = &input[pos..];
            let result = match self.state {
                FrameState::Header => self.begin_frame(rest, out),
                FrameState::Data { .. } => self.stream_data(rest, out),
            };
            match result {
                Ok(Flow::Advanced(used)) => pos += used,
                Ok(Flow::Starved) => return (pos, Step::NeedInput),
                Ok(Flow::Stop(used, step)) => return (pos + used, step),
                Err((used, e)) => return (pos + used, Step::Violation(e)),
            }
        }
    }

    /// Decodes and checks a header; data frame headers go to the output at once.
    fn begin_frame(&mut self, input: &[u8], out: &mut Vec<u8>) -> Progress {
        let role = self.validator.role();
        let (header, len) = match FrameHeader::decode(input, role, self.validator.allowed_rsv()) {
            Ok(Decoded::Header { header, len }) => (header, len),
            Ok(Decoded::Incomplete { .. }) => return Ok(Flow::Starved),
            Err(e) => return Err((0, e)),
        };
        if header.opcode.is_control() {
            // At most 2 + 4 + 125 bytes: wait until the whole frame is buffered, then act on
            // it in one piece (no per-connection buffer for partial control frames).
            let total = len + header.payload_len as usize;
            if input.len() < total {
                return Ok(Flow::Starved);
            }
            return self.control_frame(&header, &input[len..total], total, out);
        }
        match self.validator.begin_frame(&header) {
            Err(e) => return Err((len, e)),
            Ok(PayloadKind::Control) => unreachable!("control frames are handled above"),
            Ok(kind) => {
                let out_key = self.out_key();
                let mut head = [0; MAX_HEADER_LEN];
                let n = FrameHeader {
                    mask: out_key,
                    ..header
                }
                .encode(&mut head);
                self.frame_start = Some(out.len());
                out.extend_from_slice(&head[..n]);
                self.frames += 1;
                self.state = FrameState::Data {
                    remaining: header.payload_len,
                    offset: 0,
                    in_key: header.mask,
                    out_key,
                    text: kind == PayloadKind::Text,
                };
            }
        }
        Ok(Flow::Advanced(len))
    }

    /// Streams the available part of a data frame's payload to the output.
    fn stream_data(&mut self, input: &[u8], out: &mut Vec<u8>) -> Progress {
        let FrameState::Data {
            remaining,
            offset,
            in_key,
            out_key,
            text,
        } = &mut self.state
        else {
            unreachable!("stream_data outside a data frame")
        };
        if *remaining == 0 {
            self.state = FrameState::Header;
            let unflushed = self.frame_start.take();
            return match self.validator.end_frame() {
                Ok(()) => Ok(Flow::Advanced(0)),
                Err(e) => {
                    // Text ending inside a character: take the frame back if it has not left.
                    if let Some(frame) = unflushed {
                        out.truncate(frame);
                        self.frames -= 1;
                    }
                    Err((0, e))
                }
            };
        }
        let n = (*remaining).min(input.len() as u64) as usize;
        if n == 0 {
            return Ok(Flow::Starved);
        }
        let start = out.len();
        out.extend_from_slice(&input[..n]);
        let chunk = &mut out[start..];
        let at = *offset as usize;
        *remaining -= n as u64;
        *offset += n as u64;
        if *text {
            if let Some(key) = *in_key {
                mask::apply_mask_at(chunk, key, at);
            }
            let out_key = *out_key;
            if let Err(e) = self.validator.payload(chunk) {
                out.truncate(start);
                if let Some(frame) = self.frame_start.take() {
                    // Nothing of this frame has left yet: drop it whole, so the output ends
                    // on a frame boundary and a close frame can follow.
                    out.truncate(frame);
                    self.state = FrameState::Header;
                    self.frames -= 1;
                }
                return Err((n, e));
            }
            if let Some(key) = out_key {
                mask::apply_mask_at(&mut out[start..], key, at);
            }
        } else {
            // Binary or compressed: one pass with the two keys combined.
            let key = match (*in_key, *out_key) {
                (Some(a), Some(b)) => Some([a[0] ^ b[0], a[1] ^ b[1], a[2] ^ b[2], a[3] ^ b[3]]),
                (a, b) => a.or(b),
            };
            if let Some(key) = key {
                mask::apply_mask_at(chunk, key, at);
            }
        }
        self.payload_bytes += n as u64;
        Ok(Flow::Advanced(n))
    }

    /// Validates and acts on a whole control frame (`consumed` bytes of input, header
    /// included): close stops processing, pings and pongs are relayed or answered.
    fn control_frame(
        &mut self,
        header: &FrameHeader,
        payload: &[u8],
        consumed: usize,
        out: &mut Vec<u8>,
    ) -> Progress {
        self.validator
            .begin_frame(header)
            .map_err(|e| (consumed, e))?;
        self.validator.end_frame().map_err(|e| (consumed, e))?;
        let mut control = ControlPayload {
            buf: [0; MAX_CONTROL_PAYLOAD],
            len: payload.len() as u8,
        };
        control.buf[..payload.len()].copy_from_slice(payload);
        if let Some(key) = header.mask {
            mask::apply_mask(&mut control.buf[..payload.len()], key);
        }
        match (header.opcode, self.mode) {
            (OpCode::Close, _) => {
                close::parse_close(control.bytes()).map_err(|e| (consumed, e))?;
                return Ok(Flow::Stop(consumed, Step::Close(Box::new(control))));
            }
            (OpCode::Ping, Mode::Echo) => {
                write_frame(out, true, OpCode::Pong, None, control.bytes());
                self.frames += 1;
            }
            (OpCode::Pong, Mode::Echo) => {}
            // The answer to the gateway's own keepalive ping: not the other peer's business.
            (OpCode::Pong, Mode::Relay { .. }) if control.bytes() == KEEPALIVE_PAYLOAD => {}
            (opcode, Mode::Relay { .. }) => {
                write_frame(out, true, opcode, self.out_key(), control.bytes());
                self.frames += 1;
            }
            (_, Mode::Echo) => unreachable!("control opcodes are close, ping, pong"),
        }
        Ok(Flow::Advanced(consumed))
    }
}

/// What one step of [`Forwarder::process`] achieved.
enum Flow {
    /// Consumed this many bytes (possibly 0, as when a frame ends) and can go on.
    Advanced(usize),
    /// Needs more input to go on.
    Starved,
    /// Consumed this many bytes and must stop here.
    Stop(usize, Step),
}

/// A step's progress, or the bytes consumed up to a violation.
type Progress = Result<Flow, (usize, ProtocolError)>;

#[cfg(test)]
mod tests {
    use super::*;

    fn client_frame(fin: bool, opcode: OpCode, key: [u8; 4], payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        write_frame(&mut out, fin, opcode, Some(key), payload);
        out
    }

    /// A decoded frame: opcode, fin, mask, unmasked payload.
    type Frame = (OpCode, bool, Option<[u8; 4]>, Vec<u8>);

    fn frames(mut bytes: &[u8], role: Role) -> Vec<Frame> {
        let mut found = Vec::new();
        while !bytes.is_empty() {
            let Ok(Decoded::Header { header, len }) = FrameHeader::decode(bytes, role, 0) else {
                panic!("bad frame in {bytes:?}")
            };
            let end = len + header.payload_len as usize;
            let mut payload = bytes[len..end].to_vec();
            if let Some(key) = header.mask {
                mask::apply_mask(&mut payload, key);
            }
            found.push((header.opcode, header.fin, header.mask, payload));
            bytes = &bytes[end..];
        }
        found
    }

    #[test]
    fn remasks_with_fresh_keys_byte_by_byte() {
        let key = [1, 2, 3, 4];
        let mut input = client_frame(false, OpCode::Text, key, "héllo ".as_bytes());
        input.extend(client_frame(true, OpCode::Ping, key, b"p"));
        input.extend(client_frame(
            true,
            OpCode::Continuation,
            key,
            "wörld".as_bytes(),
        ));
        let mut fwd = Forwarder::new(
            Role::Server,
            Limits::default(),
            false,
            Mode::Relay { mask_out: true },
        );
        let mut out = Vec::new();
        // Feed one byte at a time: every split point of headers and payloads.
        let mut pending = Vec::new();
        for &b in &input {
            pending.push(b);
            let (used, step) = fwd.process(&pending, &mut out);
            assert!(matches!(step, Step::NeedInput));
            pending.drain(..used);
        }
        assert!(pending.is_empty());
        let got = frames(&out, Role::Server);
        assert_eq!(got.len(), 3);
        assert_eq!(got[0].3, "héllo ".as_bytes());
        assert_eq!((got[1].0, got[1].3.as_slice()), (OpCode::Ping, &b"p"[..]));
        assert_eq!((got[2].0, got[2].1), (OpCode::Continuation, true));
        assert_eq!(got[2].3, "wörld".as_bytes());
        assert!(got.iter().all(|f| f.2.is_some() && f.2 != Some(key)));
        assert_eq!(fwd.payload_bytes, 12 + 1);
    }

    #[test]
    fn echo_answers_pings_and_stops_at_close() {
        let key = [9, 8, 7, 6];
        let mut input = client_frame(true, OpCode::Binary, key, &[0xFF; 300]);
        input.extend(client_frame(true, OpCode::Ping, key, b"hi"));
        input.extend(client_frame(true, OpCode::Pong, key, b""));
        input.extend(client_frame(true, OpCode::Close, key, &[0x03, 0xE8, b'x']));
        input.extend(client_frame(true, OpCode::Text, key, b"after close"));
        let mut fwd = Forwarder::new(Role::Server, Limits::default(), false, Mode::Echo);
        let mut out = Vec::new();
        let (used, step) = fwd.process(&input, &mut out);
        let Step::Close(payload) = step else {
            panic!("{step:?}")
        };
        assert_eq!(payload.close_code(), Some(CloseCode::NORMAL));
        assert_eq!(used, input.len() - 17);
        let got = frames(&out, Role::Client);
        assert_eq!(got.len(), 2);
        assert_eq!((got[0].0, got[0].3.len()), (OpCode::Binary, 300));
        assert_eq!((got[1].0, got[1].3.as_slice()), (OpCode::Pong, &b"hi"[..]));
    }

    #[test]
    fn invalid_utf8_is_not_forwarded() {
        let key = [5, 5, 5, 5];
        let input = client_frame(true, OpCode::Text, key, &[b'o', b'k', 0xFF]);
        let mut fwd = Forwarder::new(
            Role::Server,
            Limits::default(),
            false,
            Mode::Relay { mask_out: true },
        );
        let mut out = Vec::new();
        let (_, step) = fwd.process(&input[..8], &mut out);
        assert!(matches!(step, Step::NeedInput));
        let flushed = out.len();
        fwd.flushed();
        let (_, step) = fwd.process(&input[8..], &mut out);
        assert!(matches!(step, Step::Violation(ProtocolError::InvalidUtf8)));
        // The header and "ok" were flushed: the frame cannot be taken back.
        assert!(fwd.output_mid_frame());
        assert_eq!(out.len(), flushed);
        // Unflushed, the whole frame is taken back and a close frame may follow.
        let mut fwd = Forwarder::new(Role::Server, Limits::default(), false, Mode::Echo);
        let mut out = vec![0xAA];
        let (_, step) = fwd.process(&input, &mut out);
        assert!(matches!(step, Step::Violation(ProtocolError::InvalidUtf8)));
        assert!(!fwd.output_mid_frame());
        assert_eq!(out, [0xAA]);
    }

    #[test]
    fn text_ending_mid_character_is_taken_back() {
        let input = client_frame(true, OpCode::Text, [1, 2, 3, 4], &[b'a', 0xDF]);
        let mut fwd = Forwarder::new(Role::Server, Limits::default(), false, Mode::Echo);
        let mut out = Vec::new();
        let (_, step) = fwd.process(&input, &mut out);
        assert!(matches!(step, Step::Violation(ProtocolError::InvalidUtf8)));
        assert!(out.is_empty() && !fwd.output_mid_frame());
    }

    #[test]
    fn violations_and_limits() {
        let key = [0; 4];
        let cases: [(Vec<u8>, ProtocolError); 4] = [
            (vec![0x81, 0x00], ProtocolError::UnmaskedFrame),
            (
                client_frame(true, OpCode::Continuation, key, b""),
                ProtocolError::UnexpectedContinuation,
            ),
            (
                client_frame(true, OpCode::Close, key, &[0x03, 0xED]),
                ProtocolError::InvalidCloseCode,
            ),
            (
                client_frame(true, OpCode::Binary, key, &[0; 11]),
                ProtocolError::FrameTooBig,
            ),
        ];
        for (input, expected) in cases {
            let mut fwd = Forwarder::new(Role::Server, Limits::new(10, 10), false, Mode::Echo);
            let (_, step) = fwd.process(&input, &mut Vec::new());
            assert!(
                matches!(step, Step::Violation(e) if e == expected),
                "{step:?}"
            );
        }
    }
}
