//! A scripted [`Io`] for the machines' unit tests (the upgrade, the relay, the echo): it
//! holds what a machine submits until the test completes it with chosen results and bytes,
//! logs the requests that complete nothing, and keeps a fake clock. It checks the machines'
//! side of the contract: one operation of a kind per leg, no new backend socket while the old
//! one is busy. (`fake.rs` is the other fake: whole scripted peers, for simulation.)
#![forbid(unsafe_code)]

use std::io;
use std::net::{Shutdown, SocketAddr};
use std::time::{Duration, Instant};

use codec::frame::{OpCode, Role, write_frame};

use crate::conn::{CoreCtx, Event, Io, Kept, LogLine, OpKind, Phase, Settings, Upgraded};
use crate::relay::keepalive::{Keepalive, WriteTimeout};
use crate::relay::lifecycle::Side;

/// A write in flight: buffer and range.
pub(crate) type PendingSend = (Vec<u8>, usize, usize);

/// The fake loop's view of one connection.
pub(crate) struct FakeIo {
    /// The fake clock.
    pub(crate) now: Instant,
    /// A read in flight per side (client, backend).
    pub(crate) recvs: [Option<Vec<u8>>; 2],
    /// A write in flight per side.
    pub(crate) sends: [Option<PendingSend>; 2],
    /// Every shutdown asked for, in order.
    pub(crate) shutdowns: Vec<(Side, Shutdown)>,
    /// The earliest timer asked for and not yet fired.
    pub(crate) wake: Option<Instant>,
    /// Bytes each side was sent (completed writes).
    pub(crate) wire: [Vec<u8>; 2],
    /// The backend connect in flight: where to.
    pub(crate) connecting: Option<SocketAddr>,
    /// What `connect` fails with at once, if anything.
    pub(crate) connect_error: Option<io::Error>,
    /// Every request that completes nothing by itself, in order.
    pub(crate) calls: Vec<Call>,
    /// Per side: the latest write said a FIN follows it (`fin_next`).
    pub(crate) fin_next: [bool; 2],
    /// Per side: such a write completed whole and the machine owes the FIN.
    fin_owed: [bool; 2],
}

/// A request that completes nothing by itself.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Call {
    /// A new backend socket, connecting to this address.
    Connect(SocketAddr),
    /// A cancel of `side`'s operation of a kind.
    Cancel(Side, OpKind),
    /// A shutdown.
    Shutdown(Side, Shutdown),
    /// A deadline asked for.
    WakeAt(Instant),
}

/// Index of a side in the fake's arrays.
pub(crate) fn ix(side: Side) -> usize {
    match side {
        Side::Client => 0,
        Side::Backend => 1,
    }
}

impl Default for FakeIo {
    fn default() -> Self {
        Self {
            now: Instant::now(),
            recvs: [None, None],
            sends: [None, None],
            shutdowns: Vec::new(),
            wake: None,
            wire: [Vec::new(), Vec::new()],
            connecting: None,
            connect_error: None,
            calls: Vec::new(),
            fin_next: [false; 2],
            fin_owed: [false; 2],
        }
    }
}

impl Io for FakeIo {
    fn now(&self) -> Instant {
        self.now
    }
    fn recv(&mut self, side: Side, mut buf: Vec<u8>, len: usize) {
        assert!(len > 0, "a read needs room");
        buf.reserve(len);
        assert!(
            self.recvs[ix(side)].replace(buf).is_none(),
            "two reads on {side:?}"
        );
    }
    fn recycle(&mut self, _buf: Vec<u8>) {}

    fn send(&mut self, side: Side, buf: Vec<u8>, start: usize, end: usize, fin_next: bool) {
        assert!(
            start < end && end <= buf.len(),
            "bad write range {start}..{end}"
        );
        let old = self.sends[ix(side)].replace((buf, start, end));
        assert!(old.is_none(), "two writes on {side:?}");
        self.fin_next[ix(side)] = fin_next;
    }
    fn connect(&mut self, addr: SocketAddr) -> io::Result<()> {
        let backend = ix(Side::Backend);
        assert!(
            self.recvs[backend].is_none()
                && self.sends[backend].is_none()
                && self.connecting.is_none(),
            "a new backend socket while the old one has operations in flight"
        );
        self.calls.push(Call::Connect(addr));
        if let Some(e) = self.connect_error.take() {
            return Err(e);
        }
        self.connecting = Some(addr);
        Ok(())
    }
    fn cancel(&mut self, side: Side, kind: OpKind) {
        self.calls.push(Call::Cancel(side, kind));
    }
    fn shutdown(&mut self, side: Side, how: Shutdown) {
        if how != Shutdown::Read {
            self.fin_owed[ix(side)] = false;
        }
        self.shutdowns.push((side, how));
        self.calls.push(Call::Shutdown(side, how));
    }
    fn wake_at(&mut self, at: Instant) {
        self.wake = Some(self.wake.map_or(at, |w| w.min(at)));
        self.calls.push(Call::WakeAt(at));
    }
}

impl FakeIo {
    /// Operations in flight.
    pub(crate) fn in_flight(&self) -> usize {
        self.recvs.iter().flatten().count()
            + self.sends.iter().flatten().count()
            + usize::from(self.connecting.is_some())
    }

    /// A side whose write said a FIN follows it, completed whole, and was not shut for
    /// writing: checked once the machine has handled the completion.
    pub(crate) fn fin_owed(&self) -> Option<Side> {
        [Side::Client, Side::Backend]
            .into_iter()
            .find(|&side| self.fin_owed[ix(side)])
    }

    /// Whether the machine asked to cancel anything (the relaying machines never do).
    pub(crate) fn cancelled(&self) -> bool {
        self.calls.iter().any(|c| matches!(c, Call::Cancel(..)))
    }

    /// Whether `side` was shut down for reading (`Read` or `Both`).
    pub(crate) fn read_shut(&self, side: Side) -> bool {
        self.shutdowns
            .iter()
            .any(|&(s, how)| s == side && how != Shutdown::Write)
    }

    /// Whether `side` was shut down for writing.
    pub(crate) fn write_shut(&self, side: Side) -> bool {
        self.shutdowns
            .iter()
            .any(|&(s, how)| s == side && how != Shutdown::Read)
    }

    /// Completes `side`'s read with as much of `bytes` as fits its spare room; returns
    /// the event and how many bytes went.
    pub(crate) fn read(&mut self, side: Side, bytes: &[u8]) -> (Event, usize) {
        let mut buf = self.recvs[ix(side)]
            .take()
            .unwrap_or_else(|| panic!("no read on {side:?}"));
        let n = bytes.len().min(buf.capacity() - buf.len());
        buf.extend_from_slice(&bytes[..n]);
        let event = Event::Received {
            side,
            buf,
            result: Ok(n),
        };
        (event, n)
    }

    /// Completes `side`'s read with end of stream.
    pub(crate) fn eof(&mut self, side: Side) -> Event {
        let buf = self.recvs[ix(side)]
            .take()
            .unwrap_or_else(|| panic!("no read on {side:?}"));
        Event::Received {
            side,
            buf,
            result: Ok(0),
        }
    }

    /// Completes `side`'s write with at most `max` bytes (the peer takes them); fails it
    /// if the socket was shut for writing.
    pub(crate) fn write(&mut self, side: Side, max: usize) -> Event {
        if self.write_shut(side) {
            return self.fail_write(side);
        }
        let (buf, start, end) = self.sends[ix(side)]
            .take()
            .unwrap_or_else(|| panic!("no write on {side:?}"));
        let n = (end - start).min(max);
        self.wire[ix(side)].extend_from_slice(&buf[start..start + n]);
        self.fin_owed[ix(side)] = self.fin_next[ix(side)] && n == end - start;
        Event::Sent {
            side,
            buf,
            result: Ok(n),
        }
    }

    /// Fails `side`'s write (broken pipe).
    pub(crate) fn fail_write(&mut self, side: Side) -> Event {
        let (buf, ..) = self.sends[ix(side)]
            .take()
            .unwrap_or_else(|| panic!("no write on {side:?}"));
        Event::Sent {
            side,
            buf,
            result: Err(io::Error::from(io::ErrorKind::BrokenPipe)),
        }
    }

    /// The completion a shut socket owes next: a read on a side shut for reading ends
    /// with end of stream, a write on a side shut for writing with an error.
    pub(crate) fn owed(&mut self) -> Option<Event> {
        for side in [Side::Client, Side::Backend] {
            if self.recvs[ix(side)].is_some() && self.read_shut(side) {
                return Some(self.eof(side));
            }
            if self.sends[ix(side)].is_some() && self.write_shut(side) {
                return Some(self.fail_write(side));
            }
        }
        None
    }

    /// Moves the clock on by `d`; returns the timer event if a requested one is now due.
    pub(crate) fn advance(&mut self, d: Duration) -> Option<Event> {
        self.now += d;
        match self.wake {
            Some(at) if at <= self.now => {
                self.wake = None;
                Some(Event::Timer)
            }
            _ => None,
        }
    }

    /// The frames `side` was sent since the last call, decoded as that side's role would
    /// (masked toward a backend): (opcode, unmasked payload).
    pub(crate) fn take_frames(&mut self, side: Side) -> Vec<(OpCode, Vec<u8>)> {
        let role = match side {
            Side::Client => Role::Client,
            Side::Backend => Role::Server,
        };
        let bytes = std::mem::take(&mut self.wire[ix(side)]);
        frames(&bytes, role)
    }
}

/// Decodes whole frames (panics on a partial or bad one): (opcode, unmasked payload).
pub(crate) fn frames(bytes: &[u8], role: Role) -> Vec<(OpCode, Vec<u8>)> {
    let (frames, partial) = super::fake::decode(bytes, role);
    assert!(!partial, "a partial frame in {bytes:?}");
    frames
        .into_iter()
        .map(|(op, _, payload)| (op, payload))
        .collect()
}

/// A frame as a client sends it (masked).
pub(crate) fn client_frame(opcode: OpCode, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    write_frame(&mut out, true, opcode, Some([1, 2, 3, 4]), payload);
    out
}

/// A frame as a server sends it.
pub(crate) fn server_frame(opcode: OpCode, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    write_frame(&mut out, true, opcode, None, payload);
    out
}

/// A close payload: the code, then the reason.
pub(crate) fn close_payload(code: u16, reason: &str) -> Vec<u8> {
    let mut out = code.to_be_bytes().to_vec();
    out.extend_from_slice(reason.as_bytes());
    out
}

/// The code of a close payload.
pub(crate) fn code_of(payload: &[u8]) -> u16 {
    u16::from_be_bytes([payload[0], payload[1]])
}

/// A core context over the minimal (echo) configuration.
pub(crate) fn ctx() -> CoreCtx {
    let config = crate::config::Config::from_toml(
        "[[listener]]\naddress = \"127.0.0.1:0\"\n[[route]]\nupstream = \"echo\"\n",
    )
    .expect("the minimal configuration is valid");
    let shared = crate::config::reload::Shared::new(config, None, 1);
    CoreCtx {
        metrics: shared.metrics.core(0),
        shared,
        cursor: std::cell::Cell::new(0),
        draining: std::cell::Cell::new(None),
    }
}

/// Settings for tests: 1 s close timeout, 2 s write timeout, no keepalive, 4 KiB buffers.
pub(crate) fn settings() -> Settings {
    Settings {
        close_timeout: Duration::from_secs(1),
        keepalive: Keepalive::default(),
        write_timeout: WriteTimeout::new(Duration::from_secs(2)),
        buffer: 4096,
        limits: codec::Limits::new(1 << 20, 1 << 20),
        deflate: false,
    }
}

/// An upgraded connection as the upgrade hands it over, admitted in `ctx`.
pub(crate) fn upgraded(
    ctx: &CoreCtx,
    phase: Phase,
    settings: Settings,
    client_input: Vec<u8>,
    backend_input: Vec<u8>,
) -> Box<Upgraded> {
    let client: SocketAddr = "127.0.0.1:40000".parse().expect("an address");
    let admitted = ctx
        .shared
        .admission
        .admit(client.ip(), 100, 100)
        .expect("room for a test connection");
    let active =
        (phase == Phase::Relay).then(|| crate::upstream::balance::PoolState::new(1).connected(0));
    Box::new(Upgraded {
        phase,
        client_input,
        backend_input,
        kept: Kept {
            settings: std::sync::Arc::new(settings),
            log: LogLine {
                client,
                path: Box::from("/"),
                generation: ctx.shared.current(),
                route: 0,
                backend: None,
                started: crate::conn::stamp::Stamp::at(Instant::now()),
            },
            admitted,
            active,
        },
    })
}

/// Connections `ctx` holds admitted.
pub(crate) fn admitted(ctx: &CoreCtx) -> usize {
    ctx.shared.admission.total()
}
