//! A fake event loop for one connection, with two scripted peers that speak RFC 6455 through
//! the codec: what the simulation tests (`sim.rs`) and the fuzz target (`fuzzing.rs`) drive the
//! real machines with. It checks the machines' side of the [`Io`] contract as it goes: one
//! operation of a kind per leg, no operation on a socket never made, no new backend socket while
//! the old one is busy; and it panics on any frame the gateway writes that is not valid.
#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::io;
use std::net::{Shutdown, SocketAddr};
use std::time::{Duration, Instant};

use codec::frame::{Decoded, FrameHeader, OpCode, Role, write_frame};
use codec::handshake::{ClientHandshake, HeadLimits, ServerResponse};

use super::{Conn, CoreCtx, Event, Io, OpKind};
use crate::config::Config;
use crate::config::reload::Shared;
use crate::relay::lifecycle::Side;

/// Loop turns a connection gets to end in once its peers are calm.
const MAX_TURNS: usize = 20_000;

/// A core for one simulated connection, routing every request to the embedded echo or to a
/// one-backend pool (whose address is never dialled: the fake loop answers the connect).
pub(crate) fn core_ctx(echo: bool) -> CoreCtx {
    let upstream = if echo { "echo" } else { "app" };
    let config = Config::from_toml(&format!(
        "[[listener]]\naddress = \"127.0.0.1:0\"\n[[route]]\nupstream = \"{upstream}\"\n\
         [upstream.app]\nbackends = [\"ws://127.0.0.1:9\"]\n"
    ))
    .expect("the simulation's config is valid");
    let shared = Shared::new(config, None, 1);
    CoreCtx {
        metrics: shared.metrics.core(0),
        shared,
        cursor: std::cell::Cell::new(0),
        draining: std::cell::Cell::new(None),
    }
}

/// An operation the machine has in flight.
#[derive(Debug)]
pub(crate) struct Pending {
    pub(crate) side: Side,
    pub(crate) kind: OpKind,
    pub(crate) buf: Vec<u8>,
    pub(crate) start: usize,
    pub(crate) end: usize,
    /// The machine asked to cancel it.
    pub(crate) cancel: bool,
    /// A read that lends no buffer (the machine handed an empty one over), of at most this
    /// many bytes: as the loop's pooled reads, it gets a fresh buffer only if bytes came.
    pub(crate) pooled: Option<usize>,
    /// A write the machine follows with a FIN as soon as it completes whole (`fin_next`).
    pub(crate) fin_next: bool,
}

/// One thing a scripted peer says.
#[derive(Debug)]
pub(crate) struct Said {
    /// The bytes on the wire.
    pub(crate) wire: Vec<u8>,
    /// The data payload they carry (what the other side should receive).
    pub(crate) data: Vec<u8>,
    /// They are a close frame, with this code.
    pub(crate) close: Option<u16>,
}

/// One scripted peer's socket, seen from the peer.
#[derive(Default, Debug)]
#[expect(
    clippy::struct_excessive_bools,
    reason = "a socket's independent states, as the kernel keeps them"
)]
pub(crate) struct Peer {
    /// Bytes the peer sent that the gateway has not read.
    pub(crate) outbox: VecDeque<u8>,
    /// The peer shut its sending side once `outbox` drains.
    pub(crate) fin: bool,
    /// The peer reset the connection: reads and writes fail.
    pub(crate) reset: bool,
    /// Every byte the gateway wrote to the peer.
    pub(crate) inbox: Vec<u8>,
    /// The gateway shut its reading side of this socket.
    pub(crate) shut_read: bool,
    /// The gateway shut its writing side of this socket (the peer sees end of stream).
    pub(crate) shut_write: bool,
    /// Where the peer's frames start in `inbox` once the handshake part is parsed.
    pub(crate) frames_from: Option<usize>,
    /// Data payload bytes the peer put on the wire, in order (what the other side should
    /// receive).
    pub(crate) sent_data: Vec<u8>,
    /// The peer sent a close frame (with this code, if any).
    #[expect(
        clippy::option_option,
        reason = "not sent, sent without a code, sent with one: as the wire has it"
    )]
    pub(crate) sent_close: Option<Option<u16>>,
    /// Frames still to send.
    /// Each frame with the data payload it carries (counted in `sent_data` once spoken).
    pub(crate) script: VecDeque<Said>,
}

impl Peer {
    /// The peer's state in a line, for a failure message.
    fn summary(&self) -> String {
        format!(
            "outbox {} B, fin {}, reset {}, inbox {} B, shut read {} write {}, frames from {:?}, \
             sent close {:?}, {} frames to say",
            self.outbox.len(),
            self.fin,
            self.reset,
            self.inbox.len(),
            self.shut_read,
            self.shut_write,
            self.frames_from,
            self.sent_close,
            self.script.len()
        )
    }
}

/// Decoded frames of a byte stream: (opcode, fin, unmasked payload), and whether the stream
/// ends inside a frame.
pub(crate) fn decode(mut bytes: &[u8], role: Role) -> (Vec<(OpCode, bool, Vec<u8>)>, bool) {
    let mut frames = Vec::new();
    while !bytes.is_empty() {
        match FrameHeader::decode(bytes, role, codec::frame::RSV1) {
            Ok(Decoded::Header { header, len }) => {
                let end = len + header.payload_len as usize;
                if bytes.len() < end {
                    return (frames, true);
                }
                let mut payload = bytes[len..end].to_vec();
                if let Some(key) = header.mask {
                    codec::mask::apply_mask(&mut payload, key);
                }
                frames.push((header.opcode, header.fin, payload));
                bytes = &bytes[end..];
            }
            Ok(Decoded::Incomplete { .. }) => return (frames, true),
            Err(e) => panic!("the gateway wrote an invalid frame: {e:?}"),
        }
    }
    (frames, false)
}

/// What a peer received after its handshake part: data payload bytes, and the close codes.
pub(crate) fn received(frames: &[(OpCode, bool, Vec<u8>)]) -> (Vec<u8>, Vec<Option<u16>>) {
    let mut data = Vec::new();
    let mut closes = Vec::new();
    for (opcode, _, payload) in frames {
        match opcode {
            OpCode::Text | OpCode::Binary | OpCode::Continuation => {
                data.extend_from_slice(payload);
            }
            OpCode::Close => closes
                .push((payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]))),
            OpCode::Ping | OpCode::Pong => {}
        }
    }
    (data, closes)
}

/// The fake loop: one connection, two peers, a clock.
pub(crate) struct World {
    /// The fake clock.
    pub(crate) now: Instant,
    /// The earliest deadline the machine asked for.
    pub(crate) wake: Option<Instant>,
    /// Operations in flight.
    pub(crate) pending: Vec<Pending>,
    /// The client's socket.
    pub(crate) client: Peer,
    /// The backend's socket (a new one per connect).
    pub(crate) backend: Peer,
    /// A backend socket exists (the machine asked to connect).
    pub(crate) backend_open: bool,
    /// Whether the connect succeeds when completed.
    pub(crate) connect_ok: bool,
    /// The client's side of the upgrade, to check the `101` it gets.
    pub(crate) handshake: ClientHandshake,
    /// The route goes to the embedded echo: no backend.
    pub(crate) echo: bool,
    /// Read sizes the calm ending cycles through (none: whole reads).
    pub(crate) cuts: Vec<usize>,
    next_cut: usize,
    /// A write that said a FIN follows completed whole on this side: once the machine has
    /// handled that completion, the side must be shut for writing.
    fin_owed: Option<Side>,
}

impl Io for World {
    fn now(&self) -> Instant {
        self.now
    }

    fn recv(&mut self, side: Side, mut buf: Vec<u8>, len: usize) {
        assert!(len > 0, "a read with no room");
        let pooled = buf.is_empty().then_some(len);
        if pooled.is_some() {
            buf = Vec::new();
        } else {
            buf.reserve(len);
        }
        self.add(side, OpKind::Recv, buf, 0, 0);
        self.pending.last_mut().expect("just added").pooled = pooled;
    }

    fn recycle(&mut self, _buf: Vec<u8>) {}

    fn send(&mut self, side: Side, buf: Vec<u8>, start: usize, end: usize, fin_next: bool) {
        assert!(
            start < end && end <= buf.len(),
            "send {start}..{end} of {}",
            buf.len()
        );
        self.add(side, OpKind::Send, buf, start, end);
        self.pending.last_mut().expect("just added").fin_next = fin_next;
    }

    fn connect(&mut self, _addr: SocketAddr) -> io::Result<()> {
        assert!(
            !self.pending.iter().any(|p| p.side == Side::Backend),
            "a new backend socket while the old one has operations in flight"
        );
        self.backend_open = true;
        self.backend = Peer {
            script: std::mem::take(&mut self.backend.script),
            sent_data: std::mem::take(&mut self.backend.sent_data),
            ..Peer::default()
        };
        self.add(Side::Backend, OpKind::Connect, Vec::new(), 0, 0);
        Ok(())
    }

    fn cancel(&mut self, side: Side, kind: OpKind) {
        if let Some(p) = self
            .pending
            .iter_mut()
            .find(|p| p.side == side && p.kind == kind)
        {
            p.cancel = true;
        }
    }

    fn shutdown(&mut self, side: Side, how: Shutdown) {
        let peer = self.peer(side);
        if matches!(how, Shutdown::Read | Shutdown::Both) {
            peer.shut_read = true;
        }
        if matches!(how, Shutdown::Write | Shutdown::Both) {
            peer.shut_write = true;
        }
    }

    fn wake_at(&mut self, at: Instant) {
        if self.wake.is_none_or(|w| at < w) {
            self.wake = Some(at);
        }
    }
}

impl World {
    /// A world whose client has written its upgrade request and waits; scripts are empty.
    pub(crate) fn new(echo: bool, connect_ok: bool) -> Self {
        let mut handshake = ClientHandshake::with_nonce([7; 16]);
        let mut request = Vec::new();
        handshake.write_request(&mut request, "gw.test", "/chat", None, None, &[]);
        Self {
            now: Instant::now(),
            wake: None,
            pending: Vec::new(),
            client: Peer {
                outbox: request.into(),
                ..Peer::default()
            },
            backend: Peer::default(),
            backend_open: false,
            connect_ok,
            handshake,
            echo,
            cuts: Vec::new(),
            next_cut: 0,
            fin_owed: None,
        }
    }

    /// Accepts the client: starts its machine.
    pub(crate) fn start(&mut self, ctx: &CoreCtx) -> Option<Conn> {
        let client: SocketAddr = ([127, 0, 0, 1], 5555).into();
        Conn::start(client, ctx, self)
    }

    /// Hands `event` to the machine; an error if it ended with an operation in flight.
    pub(crate) fn deliver(
        &mut self,
        conn: Option<Conn>,
        event: Event,
        ctx: &CoreCtx,
    ) -> Result<Option<Conn>, String> {
        let Some(conn) = conn else {
            return Ok(None);
        };
        let next = conn.on_event(event, ctx, self);
        if next.is_none() && !self.pending.is_empty() {
            return Err(format!("ended with {:?} in flight", self.pending));
        }
        if let Some(side) = self.fin_owed.take()
            && !self.peer(side).shut_write
        {
            return Err(format!(
                "a write to the {side:?} said a FIN follows, and the socket was not shut"
            ));
        }
        Ok(next)
    }

    /// Moves the clock on; the timer event, if a deadline passed.
    #[cfg(test)]
    pub(crate) fn advance(&mut self, by: Duration) -> Option<Event> {
        self.now += by;
        self.wake.filter(|&w| w <= self.now).map(|_| {
            self.wake = None;
            Event::Timer
        })
    }

    /// The calm ending: peers read and write everything (reads cut by [`World::cuts`]) and
    /// speak their scripts; when nothing else can happen, a client that has not closed hangs
    /// up, then time moves on to the next deadline. An error if the connection never ends.
    pub(crate) fn finish(&mut self, mut conn: Option<Conn>, ctx: &CoreCtx) -> Result<(), String> {
        let mut turns = 0;
        while conn.is_some() {
            turns += 1;
            if turns > MAX_TURNS {
                return Err(format!(
                    "the connection never ended; in flight: {:?}\nclient: {}\nbackend: {}",
                    self.pending,
                    self.client.summary(),
                    self.backend.summary()
                ));
            }
            self.react();
            let spoke = self.speak(Side::Client) | self.speak(Side::Backend);
            let cut = self.cut();
            let event = self
                .cancelled(Side::Client)
                .or_else(|| self.cancelled(Side::Backend))
                .or_else(|| self.connected())
                .or_else(|| self.write(Side::Client, usize::MAX))
                .or_else(|| self.write(Side::Backend, usize::MAX))
                .or_else(|| self.read(Side::Client, cut))
                .or_else(|| self.read(Side::Backend, cut));
            let event = match event {
                Some(event) => event,
                None if spoke => continue,
                None if self.client.sent_close.is_none() && !self.client.fin => {
                    self.client.fin = true;
                    continue;
                }
                None => {
                    // Nothing to do but wait: jump to the next deadline (or a second on).
                    self.now = self
                        .wake
                        .unwrap_or(self.now + Duration::from_secs(1))
                        .max(self.now);
                    self.wake = None;
                    Event::Timer
                }
            };
            conn = self.deliver(conn, event, ctx)?;
        }
        Ok(())
    }

    /// The next read size of the calm ending.
    fn cut(&mut self) -> usize {
        if self.cuts.is_empty() {
            return usize::MAX;
        }
        self.next_cut = (self.next_cut + 1) % self.cuts.len();
        self.cuts[self.next_cut].max(1)
    }

    fn add(&mut self, side: Side, kind: OpKind, buf: Vec<u8>, start: usize, end: usize) {
        assert!(
            !self
                .pending
                .iter()
                .any(|p| p.side == side && p.kind == kind),
            "two {kind:?} operations on the {side:?} leg"
        );
        if side == Side::Backend && kind != OpKind::Connect {
            assert!(
                self.backend_open,
                "an operation on a backend socket never made"
            );
        }
        self.pending.push(Pending {
            side,
            kind,
            buf,
            start,
            end,
            cancel: false,
            pooled: None,
            fin_next: false,
        });
    }

    pub(crate) fn peer(&mut self, side: Side) -> &mut Peer {
        match side {
            Side::Client => &mut self.client,
            Side::Backend => &mut self.backend,
        }
    }

    fn take(&mut self, side: Side, kind: OpKind) -> Option<Pending> {
        let i = self
            .pending
            .iter()
            .position(|p| p.side == side && p.kind == kind)?;
        Some(self.pending.swap_remove(i))
    }

    /// Completes `side`'s read if the peer has something to say; the event, if any.
    pub(crate) fn read(&mut self, side: Side, max: usize) -> Option<Event> {
        let pending = self
            .pending
            .iter()
            .position(|p| p.side == side && p.kind == OpKind::Recv)?;
        let peer = self.peer(side);
        let result = if peer.reset {
            Err(io::Error::from_raw_os_error(libc::ECONNRESET))
        } else if peer.shut_read || (peer.outbox.is_empty() && peer.fin) {
            Ok(0)
        } else if peer.outbox.is_empty() {
            return None;
        } else {
            Ok(usize::MAX)
        };
        let mut p = self.pending.swap_remove(pending);
        let result = result.map(|n| {
            if n == 0 {
                return 0;
            }
            if let Some(len) = p.pooled {
                p.buf = Vec::with_capacity(len);
            }
            let peer = self.peer(side);
            let room = p.buf.capacity() - p.buf.len();
            let n = max.min(room).min(peer.outbox.len());
            p.buf.extend(peer.outbox.drain(..n));
            n
        });
        Some(Event::Received {
            side,
            buf: p.buf,
            result,
        })
    }

    pub(crate) fn write(&mut self, side: Side, max: usize) -> Option<Event> {
        let p = self.take(side, OpKind::Send)?;
        let peer = self.peer(side);
        let result = if peer.reset || peer.shut_write {
            Err(io::Error::from_raw_os_error(libc::EPIPE))
        } else {
            let n = max.clamp(1, p.end - p.start);
            peer.inbox.extend_from_slice(&p.buf[p.start..p.start + n]);
            Ok(n)
        };
        if p.fin_next && matches!(result, Ok(n) if n == p.end - p.start) {
            self.fin_owed = Some(side);
        }
        Some(Event::Sent {
            side,
            buf: p.buf,
            result,
        })
    }

    pub(crate) fn connected(&mut self) -> Option<Event> {
        self.take(Side::Backend, OpKind::Connect)?;
        Some(Event::Connected(if self.connect_ok {
            Ok(())
        } else {
            Err(io::Error::from_raw_os_error(libc::ECONNREFUSED))
        }))
    }

    pub(crate) fn cancelled(&mut self, side: Side) -> Option<Event> {
        let i = self
            .pending
            .iter()
            .position(|p| p.side == side && p.cancel)?;
        let p = self.pending.swap_remove(i);
        let error = || Err(io::Error::from_raw_os_error(libc::ECANCELED));
        Some(match p.kind {
            OpKind::Recv => Event::Received {
                side,
                buf: p.buf,
                result: error(),
            },
            OpKind::Send => Event::Sent {
                side,
                buf: p.buf,
                result: error(),
            },
            OpKind::Connect => Event::Connected(error().map(drop)),
        })
    }

    /// The peers react to what they received: the backend answers the upgrade request and
    /// echoes close frames; both answer a close and then close TCP, and close on end of stream.
    pub(crate) fn react(&mut self) {
        // The backend: parse the request, answer 101, then queue its messages.
        if !self.echo && self.backend_open && self.backend.frames_from.is_none() {
            let limits = HeadLimits::default();
            if let Ok(Some((req, used))) =
                codec::handshake::parse_request(&self.backend.inbox, &limits)
            {
                self.backend.frames_from = Some(used);
                let mut answer = Vec::new();
                codec::handshake::write_response(&mut answer, &req.key, None, None);
                self.backend.outbox.extend(answer);
            }
        }
        if self.client.frames_from.is_none() {
            let limits = HeadLimits::default();
            match self.handshake.parse_response(&self.client.inbox, &limits) {
                Ok(Some((ServerResponse::Upgraded { .. }, used))) => {
                    self.client.frames_from = Some(used);
                }
                Ok(Some(_)) | Err(_) => {
                    // Refused: the client hangs up.
                    self.client.fin = true;
                    self.client.script.clear();
                }
                Ok(None) => {}
            }
        }
        for side in [Side::Client, Side::Backend] {
            let role = match side {
                Side::Client => Role::Client,
                Side::Backend => Role::Server,
            };
            let peer = self.peer(side);
            let Some(from) = peer.frames_from else {
                continue;
            };
            let (frames, _) = decode(&peer.inbox[from..], role);
            let (_, closes) = received(&frames);
            if let Some(&code) = closes.first() {
                if peer.sent_close.is_none() {
                    // Answer the close with its code; nothing after it.
                    peer.script.clear();
                    let mut frame = Vec::new();
                    let payload = code.map(u16::to_be_bytes);
                    let key = (side == Side::Client).then_some([9, 9, 9, 9]);
                    write_frame(
                        &mut frame,
                        true,
                        OpCode::Close,
                        key,
                        payload.as_ref().map_or(&[][..], |p| &p[..]),
                    );
                    peer.outbox.extend(frame);
                    peer.sent_close = Some(code);
                }
                peer.fin = true;
            }
            if peer.shut_write {
                // End of stream: this peer closes too.
                peer.script.clear();
                peer.fin = true;
            }
        }
    }

    /// A peer puts its next frame on the wire (the client's close last, once its messages are
    /// out); whether it had one to send.
    pub(crate) fn speak(&mut self, side: Side) -> bool {
        let ready = match side {
            Side::Client => self.client.frames_from.is_some(),
            Side::Backend => self.backend.frames_from.is_some() && !self.echo,
        };
        let peer = self.peer(side);
        if !ready || peer.fin || peer.reset || peer.sent_close.is_some() {
            return false;
        }
        let Some(said) = peer.script.pop_front() else {
            return false;
        };
        if let Some(code) = said.close {
            peer.sent_close = Some(Some(code));
        }
        peer.outbox.extend(said.wire);
        peer.sent_data.extend_from_slice(&said.data);
        true
    }
}
