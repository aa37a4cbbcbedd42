//! The sans-IO heart of the relay: turns the bytes one peer sent into the bytes the other
//! peer receives, frame by frame, validating as it goes.
//!
//! Data frames stream through in whatever pieces the socket delivers (never a whole
//! message in memory); control frames (at most 125 bytes) are collected whole so they can
//! be checked and acted on. Each outgoing data or control frame gets a fresh masking key when
//! it goes to a backend: the client's key is never forwarded.
#![forbid(unsafe_code)]

use codec::close::{self, CloseCode, MAX_CONTROL_PAYLOAD};
use codec::frame::{Decoded, FrameHeader, MAX_HEADER_LEN, OpCode, Role};
use codec::message::{Limits, MessageValidator, PayloadKind};
use codec::{ProtocolError, mask};

/// The payload of the gateway's own keepalive pings; a pong carrying it answers the gateway,
/// so it is absorbed rather than relayed.
pub(crate) const KEEPALIVE_PAYLOAD: &[u8] = b"wsgate-keepalive";

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
        /// Payload bytes already streamed, modulo 4: the masking offset (keys repeat every
        /// four bytes).
        offset: u8,
        /// The sender's masking key.
        in_key: Option<[u8; 4]>,
        /// The key we mask the output with.
        out_key: Option<[u8; 4]>,
        /// Uncompressed text: unmasked and UTF-8 checked before re-masking.
        text: bool,
    },
}

/// [`Forwarder::frame_start`] when no data frame's header is in the unflushed output.
const NO_FRAME: u32 = u32::MAX;

/// A position in a direction's buffer, kept in 4 bytes: a buffer holds at most
/// `limits.write_buffer` (1 GiB at most) plus one frame header.
fn pos(at: usize) -> u32 {
    u32::try_from(at).expect("buffer positions stay below 4 GiB")
}

/// One direction of a relayed (or echoed) connection.
///
/// It works in place on the direction's one buffer: the bytes read from the sender are
/// rewritten where they lie into what the receiver gets, which collects at the front of the
/// buffer. Output is never longer than the input it came from (a relayed frame keeps its
/// header and length; an echoed one loses its mask), so the write position never passes the
/// read position, and a relayed payload is never copied: only re-masked where it lies.
#[derive(Debug)]
pub(crate) struct Forwarder {
    validator: MessageValidator,
    mode: Mode,
    state: FrameState,
    /// Frames written to the output.
    pub(crate) frames: u64,
    /// Payload bytes written to the output.
    pub(crate) payload_bytes: u64,
    /// The first unprocessed byte of the buffer.
    read: u32,
    /// The end of the output at the front of the buffer.
    written: u32,
    /// Where the current data frame's header sits in the unflushed output, so a violation
    /// inside it can take the whole frame back.
    /// ([`NO_FRAME`] when none is: a sentinel, not an `Option`, keeps an idle connection in
    /// the allocator's smaller size class.)
    frame_start: u32,
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
            read: 0,
            written: 0,
            frame_start: NO_FRAME,
        }
    }

    /// Where the current data frame's header sits in the unflushed output, if it does;
    /// forgets it.
    fn take_frame_start(&mut self) -> Option<usize> {
        let at = std::mem::replace(&mut self.frame_start, NO_FRAME);
        (at != NO_FRAME).then_some(at as usize)
    }

    /// The bytes at the front of the buffer that go to the other side.
    pub(crate) fn output_len(&self) -> usize {
        self.written as usize
    }

    /// Whether the caller should write the output now: always at a frame boundary or when
    /// processing stopped; inside a frame only once `limit` bytes are held back (an incomplete
    /// frame waits so that a violation inside it can still be answered with a clean close).
    pub(crate) fn should_flush(&self, limit: usize, step: &Step) -> bool {
        self.written > 0
            && (!self.output_mid_frame()
                || self.written as usize >= limit
                || !matches!(step, Step::NeedInput))
    }

    /// The caller wrote the output: returns how many bytes to remove from the front of the
    /// buffer (the output and the input it consumed), after which the buffer starts with
    /// unprocessed bytes. A frame begun in the output can no longer be taken back.
    pub(crate) fn flushed(&mut self) -> usize {
        let consumed = self.read as usize;
        self.read = 0;
        self.written = 0;
        self.frame_start = NO_FRAME;
        consumed
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

    /// Processes the unprocessed bytes of `buf` as far as possible, appending to the output
    /// at its front; returns why it stopped. Bytes after a close frame or a violation stay
    /// unprocessed.
    pub(crate) fn process(&mut self, buf: &mut [u8]) -> Step {
        loop {
            let result = match self.state {
                FrameState::Header => self.begin_frame(buf),
                FrameState::Data { .. } => self.stream_data(buf),
            };
            match result {
                Ok(Flow::Advanced) => {}
                Ok(Flow::Starved) => return Step::NeedInput,
                Ok(Flow::Stop(step)) => return step,
                Err(e) => return Step::Violation(e),
            }
        }
    }

    /// Decodes and checks a header; data frame headers go to the output at once.
    fn begin_frame(&mut self, buf: &mut [u8]) -> Progress {
        let role = self.validator.role();
        let read = self.read as usize;
        let input = &buf[read..];
        let (header, len) = match FrameHeader::decode(input, role, self.validator.allowed_rsv()) {
            Ok(Decoded::Header { header, len }) => (header, len),
            Ok(Decoded::Incomplete { .. }) => return Ok(Flow::Starved),
            Err(e) => return Err(e),
        };
        if header.opcode.is_control() {
            // At most 2 + 4 + 125 bytes: wait until the whole frame is buffered, then act on
            // it in one piece (no per-connection buffer for partial control frames).
            let total = len + header.payload_len as usize;
            if input.len() < total {
                return Ok(Flow::Starved);
            }
            return self.control_frame(&header, len, total, buf);
        }
        match self.validator.begin_frame(&header)? {
            PayloadKind::Control => unreachable!("control frames are handled above"),
            kind => {
                let out_key = self.out_key();
                let at = self.written as usize;
                let n = match self.mode {
                    // The sender's header as it came (same length, same flags), with our key
                    // in place of the sender's: the payload then stays where it is.
                    Mode::Relay { .. } => {
                        buf.copy_within(read..read + len, at);
                        if let Some(key) = out_key {
                            buf[at + len - 4..at + len].copy_from_slice(&key);
                        }
                        len
                    }
                    Mode::Echo => {
                        let mut head = [0; MAX_HEADER_LEN];
                        let n = FrameHeader {
                            mask: None,
                            ..header
                        }
                        .encode(&mut head);
                        buf[at..at + n].copy_from_slice(&head[..n]);
                        n
                    }
                };
                self.frame_start = pos(at);
                self.written = pos(at + n);
                self.read = pos(read + len);
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
        Ok(Flow::Advanced)
    }

    /// Passes the available part of a data frame's payload to the output.
    fn stream_data(&mut self, buf: &mut [u8]) -> Progress {
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
            let unflushed = self.take_frame_start();
            return match self.validator.end_frame() {
                Ok(()) => Ok(Flow::Advanced),
                Err(e) => {
                    // Text ending inside a character: take the frame back if it has not left.
                    if let Some(frame) = unflushed {
                        self.written = pos(frame);
                        self.frames -= 1;
                    }
                    Err(e)
                }
            };
        }
        let (read, start) = (self.read as usize, self.written as usize);
        let n = (*remaining).min((buf.len() - read) as u64) as usize;
        if n == 0 {
            return Ok(Flow::Starved);
        }
        if start != read {
            // Output fell behind (a header shrank, a frame was absorbed): move the payload up.
            buf.copy_within(read..read + n, start);
        }
        let chunk = &mut buf[start..start + n];
        let at = usize::from(*offset);
        if *text {
            if let Some(key) = *in_key {
                mask::apply_mask_at(chunk, key, at);
            }
            if let Err(e) = self.validator.payload(chunk) {
                if let Some(frame) = self.take_frame_start() {
                    // Nothing of this frame has left yet: drop it whole, so the output ends
                    // on a frame boundary and a close frame can follow.
                    self.written = pos(frame);
                    self.state = FrameState::Header;
                    self.frames -= 1;
                }
                return Err(e);
            }
            if let Some(key) = *out_key {
                mask::apply_mask_at(chunk, key, at);
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
        *remaining -= n as u64;
        *offset = ((usize::from(*offset) + n) % 4) as u8;
        self.read = pos(read + n);
        self.written = pos(start + n);
        self.payload_bytes += n as u64;
        Ok(Flow::Advanced)
    }

    /// Validates and acts on a whole control frame (`header_len` + payload = `total` bytes
    /// at the read position): close stops processing, pings and pongs are relayed or
    /// answered.
    fn control_frame(
        &mut self,
        header: &FrameHeader,
        header_len: usize,
        total: usize,
        buf: &mut [u8],
    ) -> Progress {
        self.validator.begin_frame(header)?;
        self.validator.end_frame()?;
        let read = self.read as usize;
        let payload = &buf[read + header_len..read + total];
        let mut control = ControlPayload {
            buf: [0; MAX_CONTROL_PAYLOAD],
            len: payload.len() as u8,
        };
        control.buf[..payload.len()].copy_from_slice(payload);
        if let Some(key) = header.mask {
            mask::apply_mask(&mut control.buf[..payload.len()], key);
        }
        let reply = match (header.opcode, self.mode) {
            (OpCode::Close, _) => {
                close::parse_close(control.bytes())?;
                self.read = pos(read + total);
                return Ok(Flow::Stop(Step::Close(Box::new(control))));
            }
            (OpCode::Ping, Mode::Echo) => Some((OpCode::Pong, None)),
            (OpCode::Pong, Mode::Echo) => None,
            // The answer to the gateway's own keepalive ping: not the other peer's business.
            (OpCode::Pong, Mode::Relay { .. }) if control.bytes() == KEEPALIVE_PAYLOAD => None,
            (opcode, Mode::Relay { .. }) => Some((opcode, self.out_key())),
            (_, Mode::Echo) => unreachable!("control opcodes are close, ping, pong"),
        };
        if let Some((opcode, key)) = reply {
            // Re-encoded with the minimal header, so never longer than the frame it answers
            // or relays: it fits behind the read position (the payload is already copied).
            let body = control.bytes();
            let mut head = [0; MAX_HEADER_LEN];
            let head_len = FrameHeader::new(true, opcode, key, body.len() as u64).encode(&mut head);
            let at = self.written as usize;
            buf[at..at + head_len].copy_from_slice(&head[..head_len]);
            let out = &mut buf[at + head_len..at + head_len + body.len()];
            out.copy_from_slice(body);
            if let Some(key) = key {
                mask::apply_mask(out, key);
            }
            self.written = pos(at + head_len + body.len());
            self.frames += 1;
        }
        self.read = pos(read + total);
        Ok(Flow::Advanced)
    }
}

/// What one step of [`Forwarder::process`] achieved.
enum Flow {
    /// Went on (possibly without consuming anything, as when a frame ends).
    Advanced,
    /// Needs more input to go on.
    Starved,
    /// Must stop here.
    Stop(Step),
}

/// A step's progress, or the violation it ran into.
type Progress = Result<Flow, ProtocolError>;

#[cfg(test)]
mod tests {
    use codec::frame::write_frame;

    use super::*;

    fn client_frame(fin: bool, opcode: OpCode, key: [u8; 4], payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        write_frame(&mut out, fin, opcode, Some(key), payload);
        out
    }

    fn server_frame(opcode: OpCode, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        write_frame(&mut out, true, opcode, None, payload);
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

    /// What a pump does on a flush: takes the output, drops what it consumed.
    fn flush(fwd: &mut Forwarder, buf: &mut Vec<u8>) -> Vec<u8> {
        let out = buf[..fwd.output_len()].to_vec();
        buf.drain(..fwd.flushed());
        out
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
        let mut buf = Vec::new();
        for &b in &input {
            buf.push(b);
            let step = fwd.process(&mut buf);
            assert!(matches!(step, Step::NeedInput));
            out.extend(flush(&mut fwd, &mut buf));
        }
        assert!(buf.is_empty());
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
    fn relays_in_place_and_cuts_out_keepalive_pongs() {
        // Backend to client: the bytes leave exactly as they came, where they lie, except
        // the pong that answers the gateway's own ping.
        let mut input = server_frame(OpCode::Binary, &[7; 1000]);
        input.extend(server_frame(OpCode::Pong, KEEPALIVE_PAYLOAD));
        input.extend(server_frame(OpCode::Text, "after the pong".as_bytes()));
        input.extend(server_frame(OpCode::Pong, b"the client's"));
        let mut fwd = Forwarder::new(
            Role::Client,
            Limits::default(),
            false,
            Mode::Relay { mask_out: false },
        );
        let mut buf = input.clone();
        assert!(matches!(fwd.process(&mut buf), Step::NeedInput));
        let pong = server_frame(OpCode::Pong, KEEPALIVE_PAYLOAD).len();
        let mut expected = input[..1004].to_vec();
        expected.extend(&input[1004 + pong..]);
        assert_eq!(flush(&mut fwd, &mut buf), expected);
        assert!(buf.is_empty());
        assert_eq!(fwd.frames, 3);
    }

    #[test]
    fn holds_an_incomplete_frame_until_the_limit() {
        let key = [3; 4];
        let input = client_frame(true, OpCode::Binary, key, &[1; 100]);
        let mut fwd = Forwarder::new(
            Role::Server,
            Limits::default(),
            false,
            Mode::Relay { mask_out: true },
        );
        let mut buf = input[..60].to_vec();
        let step = fwd.process(&mut buf);
        assert!(fwd.output_mid_frame() && !fwd.should_flush(64, &step));
        buf.extend(&input[60..80]);
        let step = fwd.process(&mut buf);
        assert!(fwd.should_flush(64, &step));
        let mut out = flush(&mut fwd, &mut buf);
        buf.extend(&input[80..]);
        let step = fwd.process(&mut buf);
        assert!(!fwd.output_mid_frame() && fwd.should_flush(64, &step));
        out.extend(flush(&mut fwd, &mut buf));
        let got = frames(&out, Role::Server);
        assert_eq!((got.len(), got[0].3.as_slice()), (1, &[1; 100][..]));
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
        let mut buf = input.clone();
        let step = fwd.process(&mut buf);
        let Step::Close(payload) = step else {
            panic!("{step:?}")
        };
        assert_eq!(payload.close_code(), Some(CloseCode::NORMAL));
        let out = flush(&mut fwd, &mut buf);
        assert_eq!(buf, &input[input.len() - 17..]);
        let got = frames(&out, Role::Client);
        assert_eq!(got.len(), 2);
        assert_eq!(
            (got[0].0, got[0].3.as_slice()),
            (OpCode::Binary, &[0xFF; 300][..])
        );
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
        let mut buf = input[..8].to_vec();
        assert!(matches!(fwd.process(&mut buf), Step::NeedInput));
        assert_eq!(flush(&mut fwd, &mut buf).len(), 8);
        buf.extend(&input[8..]);
        let step = fwd.process(&mut buf);
        assert!(matches!(step, Step::Violation(ProtocolError::InvalidUtf8)));
        // The header and "ok" were flushed: the frame cannot be taken back.
        assert!(fwd.output_mid_frame());
        assert_eq!(fwd.output_len(), 0);
        // Unflushed, the whole frame is taken back and a close frame may follow.
        let mut ok = client_frame(true, OpCode::Binary, key, b"fine");
        let mut fwd = Forwarder::new(Role::Server, Limits::default(), false, Mode::Echo);
        ok.extend(&input);
        let mut buf = ok;
        let step = fwd.process(&mut buf);
        assert!(matches!(step, Step::Violation(ProtocolError::InvalidUtf8)));
        assert!(!fwd.output_mid_frame());
        let got = frames(&buf[..fwd.output_len()], Role::Client);
        assert_eq!((got.len(), got[0].3.as_slice()), (1, &b"fine"[..]));
    }

    #[test]
    fn text_ending_mid_character_is_taken_back() {
        let input = client_frame(true, OpCode::Text, [1, 2, 3, 4], &[b'a', 0xDF]);
        let mut fwd = Forwarder::new(Role::Server, Limits::default(), false, Mode::Echo);
        let step = fwd.process(&mut input.clone());
        assert!(matches!(step, Step::Violation(ProtocolError::InvalidUtf8)));
        assert!(fwd.output_len() == 0 && !fwd.output_mid_frame());
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
        for (mut input, expected) in cases {
            let mut fwd = Forwarder::new(Role::Server, Limits::new(10, 10), false, Mode::Echo);
            let step = fwd.process(&mut input);
            assert!(
                matches!(step, Step::Violation(e) if e == expected),
                "{step:?}"
            );
        }
    }
}
