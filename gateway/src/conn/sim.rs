//! Deterministic simulation of whole connections: the real machines ([`Conn`]) driven by a fake
//! loop whose completions proptest chooses. Reads and writes come back short, in any order
//! between the legs, late, failed (ECONNRESET, EPIPE), cancelled or not at all; the clock jumps;
//! drains arrive at any moment. Two scripted peers (a client and a backend, or the client alone
//! on the echo) speak real RFC 6455 through the codec.
//!
//! The invariants, checked after every event and at the end:
//! - no operation is asked for twice on one leg, and a connection ends only with nothing in
//!   flight (so no buffer is released while the kernel may be using it);
//! - every connection ends once its peers stop (a bounded number of loop turns, with time
//!   moving on);
//! - what each peer receives is a prefix of what the other sent, byte for byte (nothing lost
//!   in the middle, duplicated, reordered or corrupted), and all of it when nothing went wrong;
//! - every close code on the wire may be sent (never 1005, 1006 or 1015), and a clean run
//!   relays the client's close code to the backend and the backend's answer back.
#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::io;
use std::net::{Shutdown, SocketAddr};
use std::time::{Duration, Instant};

use codec::frame::{Decoded, FrameHeader, OpCode, Role, write_frame};
use codec::handshake::{ClientHandshake, HeadLimits, ServerResponse};
use proptest::prelude::*;

use super::{Conn, CoreCtx, Event, Io, OpKind};
use crate::config::Config;
use crate::lifecycle::Side;
use crate::reload::Shared;

/// An operation the machine has in flight.
#[derive(Debug)]
struct Pending {
    side: Side,
    kind: OpKind,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// The machine asked to cancel it.
    cancel: bool,
}

/// One scripted peer's socket, seen from the peer.
#[derive(Default, Debug)]
struct Peer {
    /// Bytes the peer sent that the gateway has not read.
    outbox: VecDeque<u8>,
    /// The peer shut its sending side once `outbox` drains.
    fin: bool,
    /// The peer reset the connection: reads and writes fail.
    reset: bool,
    /// Every byte the gateway wrote to the peer.
    inbox: Vec<u8>,
    /// The gateway shut its reading side of this socket.
    shut_read: bool,
    /// The gateway shut its writing side of this socket (the peer sees end of stream).
    shut_write: bool,
    /// Where the peer's frames start in `inbox` once the handshake part is parsed.
    frames_from: Option<usize>,
    /// Data payload bytes the peer sent, in order (what the other side should receive).
    sent_data: Vec<u8>,
    /// The peer sent a close frame (with this code, if any).
    sent_close: Option<Option<u16>>,
    /// Frames still to send.
    script: VecDeque<Vec<u8>>,
}

/// Decoded frames of a byte stream: (opcode, fin, unmasked payload), and whether the stream
/// ends inside a frame.
fn decode(mut bytes: &[u8], role: Role) -> (Vec<(OpCode, bool, Vec<u8>)>, bool) {
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
fn received(frames: &[(OpCode, bool, Vec<u8>)]) -> (Vec<u8>, Vec<Option<u16>>) {
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

/// A scripted message: text or binary, split into 1 to 3 frames.
#[derive(Clone, Debug)]
struct Message {
    text: bool,
    payload: Vec<u8>,
    frames: usize,
}

fn message() -> impl Strategy<Value = Message> {
    (
        any::<bool>(),
        prop::collection::vec(any::<u8>(), 0..300),
        1..=3usize,
    )
        .prop_map(|(text, payload, frames)| {
            // Text must be UTF-8: keep it ASCII so any split point is a character boundary.
            let payload = if text {
                payload.into_iter().map(|b| b'a' + b % 26).collect()
            } else {
                payload
            };
            Message {
                text,
                payload,
                frames,
            }
        })
}

/// The frames of `messages`, masked when the sender is a client.
fn script(messages: &[Message], masked: bool) -> (VecDeque<Vec<u8>>, Vec<u8>) {
    let mut frames = VecDeque::new();
    let mut data = Vec::new();
    for m in messages {
        let pieces = m.frames.min(m.payload.len().max(1));
        let step = m.payload.len().div_ceil(pieces).max(1);
        let chunks: Vec<&[u8]> = if m.payload.is_empty() {
            vec![&[]]
        } else {
            m.payload.chunks(step).collect()
        };
        for (i, chunk) in chunks.iter().enumerate() {
            let opcode = match (i, m.text) {
                (0, true) => OpCode::Text,
                (0, false) => OpCode::Binary,
                _ => OpCode::Continuation,
            };
            let mut frame = Vec::new();
            let key = masked.then(|| [1 + i as u8, 7, 13, 42]);
            write_frame(&mut frame, i + 1 == chunks.len(), opcode, key, chunk);
            frames.push_back(frame);
        }
        data.extend_from_slice(&m.payload);
    }
    (frames, data)
}

/// What the test does next.
#[derive(Clone, Debug)]
enum Action {
    /// Complete `side`'s pending read with at most this many bytes (or its EOF, or nothing yet).
    Read(Side, usize),
    /// Complete `side`'s pending write, taking at most this many bytes.
    Write(Side, usize),
    /// A peer puts its next scripted frame on the wire.
    Speak(Side),
    /// Complete the backend connect.
    Connect,
    /// Complete a cancelled operation of `side` with ECANCELED.
    Cancelled(Side),
    /// Move the clock on (milliseconds).
    Advance(u64),
    /// A peer resets its connection.
    Reset(Side),
    /// The process drains.
    Drain,
}

fn side() -> impl Strategy<Value = Side> {
    prop_oneof![Just(Side::Client), Just(Side::Backend)]
}

fn action(faults: bool) -> BoxedStrategy<Action> {
    let calm = prop_oneof![
        4 => (side(), 1..4096usize).prop_map(|(s, n)| Action::Read(s, n)),
        4 => (side(), 1..4096usize).prop_map(|(s, n)| Action::Write(s, n)),
        4 => side().prop_map(Action::Speak),
        1 => Just(Action::Connect),
        1 => side().prop_map(Action::Cancelled),
        1 => (0..20u64).prop_map(Action::Advance),
    ];
    if faults {
        prop_oneof![
            20 => calm,
            1 => side().prop_map(Action::Reset),
            1 => Just(Action::Drain),
            2 => (0..40_000u64).prop_map(Action::Advance),
        ]
        .boxed()
    } else {
        calm.boxed()
    }
}

/// The fake loop: one connection, two peers, a clock.
struct World {
    now: Instant,
    wake: Option<Instant>,
    pending: Vec<Pending>,
    client: Peer,
    backend: Peer,
    /// A backend socket exists (the machine asked to connect).
    backend_open: bool,
    /// Whether the connect succeeds when completed.
    connect_ok: bool,
    handshake: ClientHandshake,
    echo: bool,
}

impl Io for World {
    fn now(&self) -> Instant {
        self.now
    }

    fn recv(&mut self, side: Side, buf: Vec<u8>) {
        assert!(buf.capacity() > buf.len(), "a read with no room");
        self.add(side, OpKind::Recv, buf, 0, 0);
    }

    fn send(&mut self, side: Side, buf: Vec<u8>, start: usize, end: usize) {
        assert!(
            start < end && end <= buf.len(),
            "send {start}..{end} of {}",
            buf.len()
        );
        self.add(side, OpKind::Send, buf, start, end);
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
        });
    }

    fn peer(&mut self, side: Side) -> &mut Peer {
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
    fn read(&mut self, side: Side, max: usize) -> Option<Event> {
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

    fn write(&mut self, side: Side, max: usize) -> Option<Event> {
        let p = self.take(side, OpKind::Send)?;
        let peer = self.peer(side);
        let result = if peer.reset || peer.shut_write {
            Err(io::Error::from_raw_os_error(libc::EPIPE))
        } else {
            let n = max.clamp(1, p.end - p.start);
            peer.inbox.extend_from_slice(&p.buf[p.start..p.start + n]);
            Ok(n)
        };
        Some(Event::Sent {
            side,
            buf: p.buf,
            result,
        })
    }

    fn connected(&mut self) -> Option<Event> {
        self.take(Side::Backend, OpKind::Connect)?;
        Some(Event::Connected(if self.connect_ok {
            Ok(())
        } else {
            Err(io::Error::from_raw_os_error(libc::ECONNREFUSED))
        }))
    }

    fn cancelled(&mut self, side: Side) -> Option<Event> {
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
    fn react(&mut self) {
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
    fn speak(&mut self, side: Side) -> bool {
        let ready = match side {
            Side::Client => self.client.frames_from.is_some(),
            Side::Backend => self.backend.frames_from.is_some() && !self.echo,
        };
        let peer = self.peer(side);
        if !ready || peer.fin || peer.reset || peer.sent_close.is_some() {
            return false;
        }
        let Some(frame) = peer.script.pop_front() else {
            return false;
        };
        if frame.first().is_some_and(|b| b & 0x0F == 0x8) {
            // Only the client's scripted close exists, with code 4000.
            peer.sent_close = Some(Some(4000));
        }
        peer.outbox.extend(frame);
        true
    }
}

/// Runs one connection: `actions` first, then a calm ending where every operation completes
/// whole and time moves on, until the machine ends.
fn run(
    echo: bool,
    client_messages: &[Message],
    backend_messages: &[Message],
    client_closes: bool,
    connect_ok: bool,
    actions: &[Action],
) -> Result<(), TestCaseError> {
    let upstream = if echo { "echo" } else { "app" };
    let config = Config::from_toml(&format!(
        "[[listener]]\naddress = \"127.0.0.1:0\"\n[[route]]\nupstream = \"{upstream}\"\n\
         [upstream.app]\nbackends = [\"ws://127.0.0.1:9\"]\n"
    ))
    .expect("the simulation's config");
    let shared = Shared::new(config, None, 1);
    let ctx = CoreCtx {
        metrics: shared.metrics.core(0),
        shared,
        cursor: std::cell::Cell::new(0),
        draining: std::cell::Cell::new(None),
    };
    let base = Instant::now();
    let mut handshake = ClientHandshake::with_nonce([7; 16]);
    let mut request = Vec::new();
    handshake.write_request(&mut request, "gw.test", "/chat", None, None, &[]);
    let (mut client_script, client_data) = script(client_messages, true);
    if client_closes {
        let mut close = Vec::new();
        write_frame(
            &mut close,
            true,
            OpCode::Close,
            Some([3, 1, 4, 1]),
            &4000u16.to_be_bytes(),
        );
        client_script.push_back(close);
    }
    let (backend_script, backend_data) = script(backend_messages, false);
    let mut world = World {
        now: base,
        wake: None,
        pending: Vec::new(),
        client: Peer {
            outbox: request.into(),
            script: client_script,
            sent_data: client_data,
            ..Peer::default()
        },
        backend: Peer {
            script: backend_script,
            sent_data: backend_data,
            ..Peer::default()
        },
        backend_open: false,
        connect_ok,
        handshake,
        echo,
    };
    let client: SocketAddr = "127.0.0.1:5555".parse().expect("address");
    let mut conn = Conn::start(client, &ctx, &mut world);
    let mut faulty = !connect_ok;
    for action in actions {
        if conn.is_none() {
            break;
        }
        world.react();
        let event = match action.clone() {
            Action::Read(side, n) => world.read(side, n),
            Action::Write(side, n) => world.write(side, n),
            Action::Speak(side) => {
                world.speak(side);
                None
            }
            Action::Connect => world.connected(),
            Action::Cancelled(side) => world.cancelled(side),
            Action::Advance(ms) => {
                world.now += Duration::from_millis(ms);
                if ms > 1000 {
                    faulty = true;
                }
                world.wake.filter(|&w| w <= world.now).map(|_| {
                    world.wake = None;
                    Event::Timer
                })
            }
            Action::Reset(side) => {
                faulty = true;
                world.peer(side).reset = true;
                None
            }
            Action::Drain => {
                faulty = true;
                let code = codec::CloseCode::GOING_AWAY;
                ctx.draining.set(Some(code));
                Some(Event::Drain(code))
            }
        };
        if let Some(event) = event {
            conn = conn.and_then(|c| c.on_event(event, &ctx, &mut world));
            if conn.is_none() {
                prop_assert!(
                    world.pending.is_empty(),
                    "ended with {:?} in flight",
                    world.pending
                );
            }
        }
    }
    // The calm ending: peers read and write everything and speak their scripts; when nothing
    // else can happen, a client that has not closed hangs up, then time moves on.
    let mut turns = 0;
    while let Some(c) = conn.take() {
        turns += 1;
        prop_assert!(
            turns < 5_000,
            "the connection never ended; in flight: {:?}",
            world.pending
        );
        world.react();
        let spoke = world.speak(Side::Client) | world.speak(Side::Backend);
        let event = world
            .cancelled(Side::Client)
            .or_else(|| world.cancelled(Side::Backend))
            .or_else(|| world.connected())
            .or_else(|| world.write(Side::Client, usize::MAX))
            .or_else(|| world.write(Side::Backend, usize::MAX))
            .or_else(|| world.read(Side::Client, usize::MAX))
            .or_else(|| world.read(Side::Backend, usize::MAX));
        let event = match event {
            Some(event) => event,
            None if spoke => {
                conn = Some(c);
                continue;
            }
            None if world.client.sent_close.is_none() && !world.client.fin => {
                world.client.fin = true;
                conn = Some(c);
                continue;
            }
            None => {
                // Nothing to do but wait: jump to the next deadline (or a second on).
                world.now = world
                    .wake
                    .unwrap_or(world.now + Duration::from_secs(1))
                    .max(world.now);
                world.wake = None;
                Event::Timer
            }
        };
        conn = c.on_event(event, &ctx, &mut world);
        if conn.is_none() {
            prop_assert!(
                world.pending.is_empty(),
                "ended with {:?} in flight",
                world.pending
            );
        }
    }
    check_delivery(&world, echo, faulty, client_closes)
}

/// The delivery invariants once the connection ended.
fn check_delivery(
    world: &World,
    echo: bool,
    faulty: bool,
    client_closes: bool,
) -> Result<(), TestCaseError> {
    let (to_client, closes_to_client, cut_client) = match world.client.frames_from {
        Some(from) => {
            let (frames, cut) = decode(&world.client.inbox[from..], Role::Client);
            let (data, closes) = received(&frames);
            (data, closes, cut)
        }
        None => (Vec::new(), Vec::new(), false),
    };
    let expected_to_client = if echo {
        &world.client.sent_data
    } else {
        &world.backend.sent_data
    };
    prop_assert!(
        expected_to_client.starts_with(&to_client),
        "the client got bytes the other side never sent (or in another order)"
    );
    for code in closes_to_client.iter().flatten() {
        prop_assert!(
            codec::CloseCode::new(*code).is_sendable(),
            "close code {code} on the wire"
        );
    }
    if !echo && let Some(from) = world.backend.frames_from {
        let (frames, cut) = decode(&world.backend.inbox[from..], Role::Server);
        let (data, closes) = received(&frames);
        prop_assert!(
            world.client.sent_data.starts_with(&data),
            "the backend got bytes the client never sent (or in another order)"
        );
        for code in closes.iter().flatten() {
            prop_assert!(
                codec::CloseCode::new(*code).is_sendable(),
                "close code {code} on the wire"
            );
        }
        if !faulty && client_closes {
            prop_assert!(!cut, "the backend's stream ends inside a frame");
            prop_assert_eq!(
                &data,
                &world.client.sent_data,
                "the backend missed client data"
            );
            prop_assert_eq!(
                closes.first().copied(),
                Some(Some(4000)),
                "the client's close code"
            );
        }
    }
    if !faulty && client_closes && world.client.frames_from.is_some() {
        prop_assert!(!cut_client, "the client's stream ends inside a frame");
        prop_assert_eq!(&to_client, expected_to_client, "the client missed data");
        prop_assert_eq!(
            closes_to_client.first().copied(),
            Some(Some(4000)),
            "the close answer"
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Relayed connections under arbitrary completion orders, short I/O and faults.
    #[test]
    fn relay_survives_any_completion_order(
        client in prop::collection::vec(message(), 0..6),
        backend in prop::collection::vec(message(), 0..6),
        client_closes in any::<bool>(),
        connect_ok in prop::bool::weighted(0.9),
        actions in any::<bool>().prop_flat_map(|f| prop::collection::vec(action(f), 0..200)),
    ) {
        run(false, &client, &backend, client_closes, connect_ok, &actions)?;
    }

    /// The embedded echo under the same treatment.
    #[test]
    fn echo_survives_any_completion_order(
        client in prop::collection::vec(message(), 0..6),
        client_closes in any::<bool>(),
        actions in any::<bool>().prop_flat_map(|f| prop::collection::vec(action(f), 0..200)),
    ) {
        run(true, &client, &[], client_closes, true, &actions)?;
    }

    /// Without faults, every message arrives whole and the close handshake completes.
    #[test]
    fn calm_relay_delivers_everything(
        client in prop::collection::vec(message(), 0..6),
        backend in prop::collection::vec(message(), 0..6),
        actions in prop::collection::vec(action(false), 0..200),
    ) {
        run(false, &client, &backend, true, true, &actions)?;
    }
}
