//! A connection as a state machine: the loop in `crate::driver` delivers its [`Event`]s (an
//! operation completed, a deadline passed, a drain began) and carries out what it asks for
//! through [`Io`]. Nothing here touches a socket, a clock or a thread, so the same machines run
//! under io_uring, under epoll, and under the simulation tests' fake loop.
//!
//! A connection is [`crate::upgrade::Upgrade`] until its `101` (or its refusal), then
//! [`relay::Relay`] (to a backend) or [`echo::Echo`] (the embedded echo) until it ends.
#![forbid(unsafe_code)]

use std::cell::Cell;
use std::io;
use std::net::{Shutdown, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use codec::CloseCode;

use crate::config::reload::{Generation, Shared};
use crate::config::{Config, Route};
use crate::metrics::CoreMetrics;
use crate::relay::keepalive::{Keepalive, WriteTimeout};
use crate::relay::lifecycle::Side;
use crate::upgrade::admission::Admitted;
use crate::upstream::balance::ActiveGuard;

mod fake;
pub(crate) mod fuzzing;
#[cfg(test)]
mod sim;
pub(crate) mod stamp;
#[cfg(test)]
pub(crate) mod testio;

/// An operation a machine has in flight, per leg: at most one of each kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum OpKind {
    /// A read.
    Recv,
    /// A write.
    Send,
    /// The backend leg's connect.
    Connect,
}

/// What a connection machine may ask of its loop. Every operation comes back exactly once as
/// an [`Event`] (cancelled ones too, with `ECANCELED`), and a machine may only report
/// [`Status::Done`] once none of its operations is in flight.
pub(crate) trait Io {
    /// The time, as the loop last read it (once per loop turn).
    fn now(&self) -> Instant;
    /// One read from `side`, appended to `buf` with room for at least `len` bytes; comes back
    /// as [`Event::Received`]. An empty `buf` goes back to the loop's pool and the bytes come
    /// in a pool buffer taken only when they arrive (an empty `Vec` if none came), so a leg
    /// waiting for input holds no buffer.
    fn recv(&mut self, side: Side, buf: Vec<u8>, len: usize);
    /// Gives a buffer back to the loop's pool (one of another size is freed).
    fn recycle(&mut self, buf: Vec<u8>);
    /// One write of `buf[start..end]` to `side`; comes back as [`Event::Sent`], possibly short.
    /// `fin_next`: the machine shuts `side` for writing as soon as this write has completed
    /// whole, so the bytes may wait for that FIN and leave in one segment with it
    /// (`MSG_MORE`); a machine that says so and then does not shut the socket leaves them
    /// waiting until it closes.
    fn send(&mut self, side: Side, buf: Vec<u8>, start: usize, end: usize, fin_next: bool);
    /// Opens a new backend socket and connects it to `addr`; comes back as
    /// [`Event::Connected`]. A previous backend socket is closed first: none of its operations
    /// may be in flight. An error here is local (no socket could be made: EMFILE, ENOBUFS).
    fn connect(&mut self, addr: SocketAddr) -> io::Result<()>;
    /// Cancels `side`'s `kind` operation if it is in flight: it comes back with `ECANCELED`
    /// (or with its result, if it finished first).
    fn cancel(&mut self, side: Side, kind: OpKind);
    /// Shuts `side`'s socket down: a pending read ends with end of stream, a pending write with
    /// an error. Harmless on a socket already shut.
    ///
    /// The loop may send the FIN of a socket whose peer already ended its stream, with nothing
    /// in flight, at its next turn instead (before any later operation on it): nobody is
    /// waiting for that one.
    fn shutdown(&mut self, side: Side, how: Shutdown);
    /// Asks for an [`Event::Timer`] at `at` or soon after. An earlier request stands: a later
    /// `at` does not postpone it, so a machine re-asks for its next deadline when it fires.
    fn wake_at(&mut self, at: Instant);
}

/// What happens to a connection.
#[derive(Debug)]
pub(crate) enum Event {
    /// A read finished: `Ok(0)` is end of stream; `buf` has the bytes appended.
    Received {
        /// The leg read from.
        side: Side,
        /// The buffer the read was given.
        buf: Vec<u8>,
        /// Bytes read, or why none.
        result: io::Result<usize>,
    },
    /// A write finished, perhaps short.
    Sent {
        /// The leg written to.
        side: Side,
        /// The buffer the write was given, unchanged.
        buf: Vec<u8>,
        /// Bytes written, or why none.
        result: io::Result<usize>,
    },
    /// The backend connect finished.
    Connected(io::Result<()>),
    /// A deadline asked for with [`Io::wake_at`] passed (it may come early or more than once:
    /// a machine checks its own deadlines).
    Timer,
    /// The process started draining: close with this code.
    Drain(CloseCode),
}

/// Whether a connection goes on after an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Status {
    /// It has work or operations in flight.
    Running,
    /// It ended and has no operation in flight: the loop closes its sockets and frees its slot.
    Done,
}

/// Per-core state the machines share (`!Send`: one core's).
pub(crate) struct CoreCtx {
    /// Configuration generations, admission and pools, process-wide.
    pub(crate) shared: Arc<Shared>,
    /// This core's counters.
    pub(crate) metrics: Arc<CoreMetrics>,
    /// This core's round-robin cursor (per core, so no atomics).
    pub(crate) cursor: Cell<usize>,
    /// Set once this core drains: the close code connections get.
    pub(crate) draining: Cell<Option<CloseCode>>,
}

/// Which relaying phase an upgraded connection enters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Phase {
    /// The embedded echo answers the client.
    Echo,
    /// Frames are relayed to the backend leg.
    Relay,
}

/// What the upgrade hands its relaying phase, with no operation in flight.
pub(crate) struct Upgraded {
    /// Echo or relay.
    pub(crate) phase: Phase,
    /// Bytes the client sent after its request.
    pub(crate) client_input: Vec<u8>,
    /// Bytes the backend sent after its `101` (empty for the echo).
    pub(crate) backend_input: Vec<u8>,
    /// What the relaying phase keeps until the connection ends.
    pub(crate) kept: Kept,
}

/// What a relaying machine keeps of its upgrade until the connection ends, inline in the
/// machine, so that an idle connection is one allocation.
pub(crate) struct Kept {
    /// The connection's settings (the route's limits, deflate as negotiated), shared with
    /// the route's other connections.
    pub(crate) settings: Arc<Settings>,
    /// For the access log line written when the connection ends.
    pub(crate) log: LogLine,
    /// The connection's admission slot, held until it ends.
    #[expect(
        dead_code,
        reason = "a guard: dropping it (with the connection) gives the slot back"
    )]
    pub(crate) admitted: Admitted,
    /// Counts the connection toward its backend's load until it ends (`None` for the echo).
    #[cfg_attr(
        not(test),
        expect(
            dead_code,
            reason = "a guard: dropping it (with the connection) ends the count"
        )
    )]
    pub(crate) active: Option<ActiveGuard>,
}

/// The settings of a relaying machine still running: it keeps its [`Kept`] until it reports
/// `Done`, and is not driven after that.
pub(crate) fn kept_settings(up: Option<&Kept>) -> &Settings {
    &up.expect("a machine is only driven until it reports Done")
        .settings
}

/// What an upgrade step came to.
pub(crate) enum UpgradeStep {
    /// Still upgrading.
    Running,
    /// Refused or gone; no operation in flight.
    Done,
    /// Upgraded: the relaying phase takes over.
    Upgraded(Box<Upgraded>),
}

/// A connection's machine, by phase.
pub(crate) enum Conn {
    /// Before the `101`: reading the request, choosing and reaching a backend, refusing.
    Upgrade(Box<crate::upgrade::Upgrade>),
    /// Served by the embedded echo.
    Echo(Box<crate::relay::echo::Echo>),
    /// Relayed to a backend.
    Relay(Box<crate::relay::Relay>),
}

impl Conn {
    /// Starts the machine of a connection just accepted from `client`; `None` if it ended at
    /// once (refused with nothing in flight).
    pub(crate) fn start(client: SocketAddr, ctx: &CoreCtx, io: &mut dyn Io) -> Option<Self> {
        let (upgrade, step) = crate::upgrade::Upgrade::start(client, ctx, io);
        Self::after_upgrade(Box::new(upgrade), step, ctx, io)
    }

    /// Hands `event` to the machine; `None` once the connection ended.
    pub(crate) fn on_event(self, event: Event, ctx: &CoreCtx, io: &mut dyn Io) -> Option<Self> {
        match self {
            Self::Upgrade(mut upgrade) => {
                let step = upgrade.on_event(event, ctx, io);
                Self::after_upgrade(upgrade, step, ctx, io)
            }
            Self::Echo(mut echo) => {
                (echo.on_event(event, ctx, io) == Status::Running).then_some(Self::Echo(echo))
            }
            Self::Relay(mut relay) => {
                (relay.on_event(event, ctx, io) == Status::Running).then_some(Self::Relay(relay))
            }
        }
    }

    /// The phase an upgrade step leads to.
    fn after_upgrade(
        upgrade: Box<crate::upgrade::Upgrade>,
        step: UpgradeStep,
        ctx: &CoreCtx,
        io: &mut dyn Io,
    ) -> Option<Self> {
        match step {
            UpgradeStep::Running => Some(Self::Upgrade(upgrade)),
            UpgradeStep::Done => None,
            UpgradeStep::Upgraded(upgraded) => {
                // The request, routing state and refusal paths go now: an idle connection keeps
                // only what relaying needs.
                drop(upgrade);
                match upgraded.phase {
                    Phase::Echo => {
                        let (echo, status) = crate::relay::echo::Echo::start(*upgraded, ctx, io);
                        (status == Status::Running).then(|| Self::Echo(Box::new(echo)))
                    }
                    Phase::Relay => {
                        let (relay, status) = crate::relay::Relay::start(*upgraded, ctx, io);
                        (status == Status::Running).then(|| Self::Relay(Box::new(relay)))
                    }
                }
            }
        }
    }
}

/// Reads start this small and grow while reads keep filling them. Every read has at least
/// this much room beyond what is buffered, so a control frame the forwarder waits to have
/// whole (at most 131 bytes) always arrives within a read or two.
pub(crate) const MIN_READ: usize = 128;

/// Per-connection settings of the relay and the echo.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Settings {
    /// Time a peer has to answer a close frame.
    pub(crate) close_timeout: Duration,
    /// Pings, pong deadline, idle timeout.
    pub(crate) keepalive: Keepalive,
    /// A peer whose pending write moves no bytes for this long stopped reading: it is given
    /// up on.
    pub(crate) write_timeout: WriteTimeout,
    /// Bytes buffered per direction at most: the largest read, and the largest incomplete
    /// frame held back before it streams on.
    pub(crate) buffer: usize,
    /// Message and frame size limits (the route's).
    pub(crate) limits: codec::Limits,
    /// permessage-deflate was negotiated: RSV1 allowed, compressed text not UTF-8-checked.
    pub(crate) deflate: bool,
}

/// Who closed a connection first, for the access log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Closer {
    /// The client's close frame came first.
    Client,
    /// The backend's close frame came first.
    Backend,
    /// The gateway decided the close (a limit, a timeout, a drain, a violation).
    Gateway,
}

impl Closer {
    /// The log's spelling.
    pub(crate) const fn as_str(self) -> &'static str {
        match self {
            Self::Client => "client",
            Self::Backend => "backend",
            Self::Gateway => "gateway",
        }
    }
}

impl From<Side> for Closer {
    fn from(side: Side) -> Self {
        match side {
            Side::Client => Self::Client,
            Side::Backend => Self::Backend,
        }
    }
}

/// How a connection ended, for the access log.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Outcome {
    /// The first close code on the wire, if any.
    pub(crate) close_code: Option<CloseCode>,
    /// Who sent it: "client", "backend" or "gateway".
    pub(crate) closed_by: Option<Closer>,
    /// The close handshake did not finish within the close timeout.
    pub(crate) timed_out: bool,
    /// Why the connection ended, in words (the gateway's close reason, or which peer
    /// closed); `None`: the connection was lost without a close frame.
    pub(crate) reason: Option<&'static str>,
}

/// What the access log line of a connection needs. Route and backend are named through the
/// configuration generation that routed the connection, at the end, so that an idle
/// connection keeps indices instead of strings.
pub(crate) struct LogLine {
    /// The client's address.
    pub(crate) client: SocketAddr,
    /// The request's (normalised) path.
    pub(crate) path: Box<str>,
    /// The configuration the connection was routed by.
    pub(crate) generation: Arc<Generation>,
    /// The route that took the request, in `generation`.
    pub(crate) route: u32,
    /// The backend, as (pool, backend) indices in `generation`; `None` for the echo.
    pub(crate) backend: Option<(u32, u32)>,
    /// When the connection was accepted.
    pub(crate) started: stamp::Stamp,
}

/// The per-connection settings a configuration implies for `route`, with permessage-deflate
/// negotiated or not. Built once per route and generation, and shared by its connections.
pub(crate) fn settings(config: &Config, route: &Route, deflate: bool) -> Settings {
    let t = &config.timeouts;
    Settings {
        close_timeout: t.close,
        keepalive: Keepalive {
            ping_interval: t.ping_interval.unwrap_or(Duration::ZERO),
            pong_timeout: t.pong_timeout,
            idle: t.idle.unwrap_or(Duration::ZERO),
        },
        write_timeout: WriteTimeout::new(t.write.unwrap_or(Duration::ZERO)),
        buffer: config.global_limits.write_buffer.max(MIN_READ),
        limits: route.limits,
        deflate,
    }
}

/// Handshake buffers become the relay's first read buffers. An empty one stays as it is (the
/// relay's first read gives it back to the loop's pool); one holding early frames is trimmed
/// to them, so it does not pin a pool buffer's size.
pub(crate) fn compact(mut buf: Vec<u8>) -> Vec<u8> {
    if !buf.is_empty() {
        buf.shrink_to(MIN_READ);
    }
    buf
}

/// Trades a pool buffer a read handed over for an exact copy of its bytes, giving the pool
/// buffer back at once: for bytes that stay a while (a request head being parsed), so that
/// connections in their handshake hold no pool buffers.
pub(crate) fn unpool(io: &mut dyn Io, buf: Vec<u8>) -> Vec<u8> {
    if buf.capacity() != crate::driver::POOL_BUF {
        return buf;
    }
    let copy = buf.as_slice().to_vec();
    io.recycle(buf);
    copy
}

/// A small plain-text HTTP answer that closes the connection.
pub(crate) fn plain(status: u16, reason: &str, body: &str, extra_headers: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status} {reason}\r\nConnection: close\r\n{extra_headers}Content-Type: \
         text/plain; charset=utf-8\r\nContent-Length: {}\r\n\r\n{body}\n",
        body.len() + 1
    )
    .into_bytes()
}

/// The close code the access log shows, with RFC 6455's names for what has none on the
/// wire: 1005 for a close frame without a code, 1006 for no close frame at all.
fn log_close_code(o: &Outcome) -> u16 {
    match (o.close_code, o.closed_by) {
        (Some(code), _) => code.get(),
        (None, Some(Closer::Client | Closer::Backend)) => 1005,
        (None, _) => 1006,
    }
}

impl LogLine {
    /// The route, as the log line names it: `host/path_prefix`, or `path_prefix` for any
    /// host.
    pub(crate) fn route_name(&self) -> String {
        let route = &self.generation.config.routes[self.route as usize];
        match &route.host {
            Some(host) => format!("{host}{}", route.path_prefix),
            None => route.path_prefix.clone(),
        }
    }

    /// The backend's address, or `echo`.
    pub(crate) fn backend_name(&self) -> String {
        match self.backend {
            Some((pool, i)) => {
                self.generation.config.pools[pool as usize].backends[i as usize].to_string()
            }
            None => String::from("echo"),
        }
    }

    /// Writes the connection's access log line; `bytes` are the payload bytes relayed client
    /// to backend and back (the forwarders count them: the outcome does not repeat them).
    pub(crate) fn write(&self, o: &Outcome, [bytes_in, bytes_out]: [u64; 2]) {
        tracing::info!(
            client = %self.client,
            path = &*self.path,
            backend = self.backend_name(),
            duration_ms = self.started.instant().elapsed().as_millis() as u64,
            bytes_in,
            bytes_out,
            route = self.route_name(),
            close_code = log_close_code(o),
            closed_by = o.closed_by.unwrap_or(Closer::Gateway).as_str(),
            close_reason = o.reason.unwrap_or("connection lost"),
            close_timeout = o.timed_out,
            "connection closed"
        );
    }
}
