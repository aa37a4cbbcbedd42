//! Relays frames both ways between a client and a backend, and runs the close handshake.
//!
//! One pump per direction reads its peer, pushes the bytes through a [`Forwarder`] and
//! writes the result to the other peer. A pump holds the destination's write lock from the
//! start of a frame to its end, so a close frame or ping sent by another task never lands
//! inside a frame. Buffers are bounded per direction: a pump does not read again until its
//! last batch is written, so a slow reader stalls only its own connection. A watchdog beside
//! the pumps runs keepalive, drain, the write timeout and the close timeout; it never waits
//! behind a pump's write (a peer that stops reading blocks one for as long as it likes), and
//! its own writes are cut off by the write timeout too.
#![forbid(unsafe_code)]

use std::cell::Cell;
use std::net::Shutdown;
use std::sync::Arc;
use std::time::Instant;

use codec::CloseCode;
use codec::frame::Role;
use tokio::sync::Notify;

use crate::conn::{MIN_READ, Outcome, Settings};
use crate::drain::Drain;
use crate::forward::{ControlPayload, Forwarder, Mode, Step};
use crate::leg::{Alarm, Leg, Ticker, abort_stalled, bounded, keepalive_tick, last_poll};
use crate::lifecycle::{Lifecycle, OnClose, Side};
use crate::metrics::{CloseDirection, CoreMetrics, Direction};
use crate::uring::Stream;

/// Why the gateway closes a connection on its own (besides protocol violations).
#[derive(Clone, Copy, Debug)]
enum GatewayClose {
    /// A drain: both peers get this code.
    Drain(CloseCode),
    /// A keepalive tick found the connection idle or a peer dead.
    Keepalive(Alarm),
}

/// A proxied connection after both upgrades.
pub(crate) struct Relay {
    client: Leg,
    backend: Leg,
    /// Bytes that arrived with the client's handshake, until its pump takes them. Kept here
    /// rather than passed down: every future a by-value argument passes through keeps room for
    /// it for the connection's whole life.
    client_input: Cell<Vec<u8>>,
    /// Bytes that arrived with the backend's 101, until its pump takes them.
    backend_input: Cell<Vec<u8>>,
    settings: Settings,
    lifecycle: Cell<Lifecycle>,
    /// Signalled when the lifecycle leaves `Open`, which starts the close timeout.
    closing: Notify,
    /// When the lifecycle left `Open`: the start of the close handshake.
    closing_since: Cell<Option<Instant>>,
    outcome: Cell<Outcome>,
    metrics: Arc<CoreMetrics>,
}

impl Relay {
    /// `client_input` and `backend_input` hold bytes that arrived with the handshakes.
    pub(crate) fn new(
        (client, client_input): (Stream, Vec<u8>),
        (backend, backend_input): (Stream, Vec<u8>),
        settings: Settings,
        metrics: Arc<CoreMetrics>,
    ) -> Self {
        Self {
            client: Leg::new(client, Side::Client, Arc::clone(&metrics)),
            backend: Leg::new(backend, Side::Backend, Arc::clone(&metrics)),
            client_input: Cell::new(client_input),
            backend_input: Cell::new(backend_input),
            settings,
            lifecycle: Cell::new(Lifecycle::Open),
            closing: Notify::new(),
            closing_since: Cell::new(None),
            outcome: Cell::new(Outcome::default()),
            metrics,
        }
    }

    /// Both legs, for the watchdog's checks.
    fn legs(&self) -> [&Leg; 2] {
        [&self.client, &self.backend]
    }

    fn leg(&self, side: Side) -> &Leg {
        match side {
            Side::Client => &self.client,
            Side::Backend => &self.backend,
        }
    }

    fn set_lifecycle(&self, next: Lifecycle) {
        let previous = self.lifecycle.replace(next);
        if previous.is_open() && !next.is_open() {
            self.closing_since.set(Some(Instant::now()));
            self.closing.notify_one();
        }
        if next == Lifecycle::Closed
            && previous != Lifecycle::Closed
            && let Some(since) = self.closing_since.get()
        {
            self.metrics.close_handshake(since.elapsed());
        }
    }

    fn record_close(&self, code: Option<CloseCode>, by: &'static str, reason: &'static str) {
        let mut outcome = self.outcome.get();
        if outcome.closed_by.is_none() {
            outcome.close_code = code;
            outcome.closed_by = Some(by);
            outcome.reason = Some(reason);
            self.outcome.set(outcome);
        }
    }

    /// Relays until both directions are done or the close timeout expires.
    ///
    /// Arguments stay allocated in the future for its whole life, so they are kept small: each
    /// pump builds its own forwarder.
    pub(crate) async fn run(&self, drain: &Drain) -> Outcome {
        let pumps = async { tokio::join!(self.pump(Side::Client), self.pump(Side::Backend)) };
        let watchdog = self.watchdog(drain);
        tokio::pin!(pumps, watchdog);
        let (a, b) = tokio::select! {
            // Pumps first: the watchdog's timer relies on seeing the writes they start.
            biased;
            done = &mut pumps => {
                last_poll(watchdog).await;
                done
            }
            () = &mut watchdog => {
                // Reads and writes in flight complete (with EOF or EPIPE) once the sockets
                // are shut down; the pumps then end on their own.
                self.client.stream.shutdown(Shutdown::Both);
                self.backend.stream.shutdown(Shutdown::Both);
                pumps.await
            }
        };
        self.client.stream.shutdown(Shutdown::Both);
        self.backend.stream.shutdown(Shutdown::Both);
        let mut outcome = self.outcome.get();
        outcome.bytes_in = a;
        outcome.bytes_out = b;
        outcome
    }

    /// While the connection is open: the write timeout, keepalive pings and verdicts, and the
    /// drain signal. Once it is closing: the close timeout, after which a peer still waiting
    /// for a reply gets one from the gateway. Returns when the sockets should be shut down.
    async fn watchdog(&self, drain: &Drain) {
        // Locals here live in every idle connection: the timer is the only one.
        let mut ticker = Ticker::default();
        while self.lifecycle.get().is_open() {
            tokio::select! {
                () = self.closing.notified() => {}
                code = drain.wait() => Box::pin(self.gateway_close(GatewayClose::Drain(code))).await,
                () = ticker.tick(&self.settings, || self.legs().iter().any(|l| l.write_pending())) => {
                    let (legs, write) = (self.legs(), self.settings.write_timeout);
                    let keepalive = &self.settings.keepalive;
                    // A leg given up on fails its pumps' reads and writes: `on_gone` tells the
                    // other peer.
                    if abort_stalled(&legs, write) || !keepalive.enabled() {
                        continue;
                    }
                    let alarm = Box::pin(bounded(&legs, write, keepalive_tick(&legs, keepalive)));
                    if let Some(alarm) = alarm.await {
                        Box::pin(self.gateway_close(GatewayClose::Keepalive(alarm))).await;
                    }
                }
            }
        }
        tokio::time::sleep(self.settings.close_timeout).await;
        if self.lifecycle.get() != Lifecycle::Closed {
            // Only an unfinished handshake counts; a peer slow to drop TCP after a
            // completed one is merely cut off.
            let mut outcome = self.outcome.get();
            outcome.timed_out = true;
            self.outcome.set(outcome);
        }
        if let Lifecycle::Closing(side) = self.lifecycle.get() {
            // The other peer never answered `side`'s close: answer it ourselves if the
            // socket is free, so it still sees a clean handshake.
            let leg = self.leg(side);
            if !leg.is_busy() {
                let reply = ControlPayload::close(CloseCode::BAD_GATEWAY, "close timeout");
                let write = self.settings.write_timeout;
                Box::pin(bounded(&self.legs(), write, leg.send_close(&reply))).await;
            }
        }
    }

    /// Closes both peers on the gateway's own initiative; their replies are absorbed. The two
    /// close frames go out side by side, so a peer that stopped reading (cut off by the write
    /// timeout) does not hold up the other's.
    async fn gateway_close(&self, why: GatewayClose) {
        if !self.lifecycle.get().is_open() {
            return;
        }
        let (to_client, to_backend) = match why {
            GatewayClose::Drain(code) => (
                ControlPayload::close(code, Drain::reason(code)),
                ControlPayload::close(code, Drain::reason(code)),
            ),
            GatewayClose::Keepalive(Alarm::Dead(Side::Client)) => (
                ControlPayload::close(CloseCode::GOING_AWAY, "ping timeout"),
                ControlPayload::close(CloseCode::GOING_AWAY, "client stopped answering"),
            ),
            GatewayClose::Keepalive(Alarm::Dead(Side::Backend)) => (
                ControlPayload::close(CloseCode::INTERNAL_ERROR, "backend stopped answering"),
                ControlPayload::close(CloseCode::GOING_AWAY, "ping timeout"),
            ),
            GatewayClose::Keepalive(Alarm::Idle) => (
                ControlPayload::close(CloseCode::GOING_AWAY, "idle timeout"),
                ControlPayload::close(CloseCode::GOING_AWAY, "idle timeout"),
            ),
        };
        let reason = match why {
            GatewayClose::Drain(code) => Drain::reason(code),
            GatewayClose::Keepalive(Alarm::Dead(Side::Client)) => "client stopped answering",
            GatewayClose::Keepalive(Alarm::Dead(Side::Backend)) => "backend stopped answering",
            GatewayClose::Keepalive(Alarm::Idle) => "idle timeout",
        };
        self.record_close(to_client.close_code(), "gateway", reason);
        self.set_lifecycle(Lifecycle::Failed);
        let dead = match why {
            GatewayClose::Keepalive(Alarm::Dead(side)) => Some(side),
            GatewayClose::Drain(_) | GatewayClose::Keepalive(Alarm::Idle) => None,
        };
        let both = async {
            tokio::join!(
                close_leg(&self.client, &to_client, dead),
                close_leg(&self.backend, &to_backend, dead)
            )
        };
        bounded(&self.legs(), self.settings.write_timeout, both).await;
    }

    /// Pumps frames from `from` to the other side; returns the payload bytes forwarded.
    ///
    /// The close paths are boxed: they run once per connection, and inline they would make
    /// every idle connection's future as large as the largest of them.
    async fn pump(&self, from: Side) -> u64 {
        // Frames from the client are decoded as a server and re-masked for the backend;
        // frames from the backend are decoded as a client and go out unmasked.
        let (role, mask_out) = match from {
            Side::Client => (Role::Server, true),
            Side::Backend => (Role::Client, false),
        };
        let mut fwd = Forwarder::new(
            role,
            self.settings.limits,
            self.settings.deflate,
            Mode::Relay { mask_out },
        );
        let src = self.leg(from);
        let dst = self.leg(from.other());
        let mut input = match from {
            Side::Client => self.client_input.take(),
            Side::Backend => self.backend_input.take(),
        };
        let limit = self.settings.buffer;
        let mut holding = false;
        let mut read_size = MIN_READ.min(limit);
        let direction = Direction::from(from);
        let (mut frames, mut bytes) = (0, 0);
        let end = loop {
            let step = fwd.process(&mut input);
            if fwd.frames != frames || fwd.payload_bytes != bytes {
                // Live counters: per batch, not per connection close.
                self.metrics
                    .frames(direction, fwd.frames - frames, fwd.payload_bytes - bytes);
                (frames, bytes) = (fwd.frames, fwd.payload_bytes);
            }
            if fwd.should_flush(limit, &step) {
                // Once the gateway failed the connection, nothing more is relayed.
                let discard = self.lifecycle.get() == Lifecycle::Failed;
                if dst
                    .write_batch(&mut input, &mut fwd, &mut holding, discard)
                    .await
                    .is_err()
                {
                    break End::Gone(from.other());
                }
            }
            match step {
                Step::NeedInput => {}
                Step::Close(payload) => break End::Close(payload),
                Step::Violation(e) => break End::Violation(e),
            }
            match src.stream.read_more(&mut input, read_size).await {
                Ok(0) | Err(_) => break End::Gone(from),
                Ok(n) => {
                    src.last_seen.set(Instant::now());
                    if n >= read_size && read_size < limit {
                        read_size = (read_size * 2).min(limit);
                    }
                }
            }
        };
        if holding {
            dst.unlock();
        }
        match end {
            End::Close(payload) => Box::pin(self.on_close(from, &payload)).await,
            End::Violation(e) => {
                self.record_close(Some(e.close_code()), "gateway", e.as_str());
                self.set_lifecycle(Lifecycle::Failed);
                Box::pin(self.fail(from, e.close_code(), e.as_str())).await;
            }
            End::Gone(side) => Box::pin(self.on_gone(side)).await,
        }
        fwd.payload_bytes
    }

    /// A close frame arrived from `from`.
    async fn on_close(&self, from: Side, payload: &ControlPayload) {
        let (next, action) = self.lifecycle.get().close_from(from);
        let code = payload.close_code().map(CloseCode::get);
        self.metrics
            .close_frame(from, CloseDirection::Received, code);
        self.set_lifecycle(next);
        let reason = match from {
            Side::Client => "client sent close",
            Side::Backend => "backend sent close",
        };
        self.record_close(payload.close_code(), from.as_str(), reason);
        if action != OnClose::Absorb {
            self.leg(from.other()).send_close(payload).await;
        }
        let finished = match (action, from) {
            (OnClose::RelayAndFinish, _) | (OnClose::Absorb, Side::Client) => true,
            (OnClose::Relay | OnClose::Absorb, _) => false,
        };
        if finished {
            // The handshake is complete (or the client answered the gateway's own close):
            // the server side closes TCP first, so the gateway closes the client's socket.
            self.client.stream.shutdown(Shutdown::Both);
        }
        if from == Side::Backend {
            // The backend, as the server, closes TCP first: wait for it (bounded by the
            // close timeout) rather than leave TIME_WAIT sockets on the gateway.
            self.drain_socket(Side::Backend).await;
        }
    }

    /// `violator` broke the protocol: it gets `code`; the other peer gets 1001 (a client
    /// went wrong) or the client gets 1014 (the backend went wrong).
    async fn fail(&self, violator: Side, code: CloseCode, reason: &str) {
        let to_other = match violator {
            Side::Client => ControlPayload::close(CloseCode::GOING_AWAY, "client protocol error"),
            Side::Backend => {
                ControlPayload::close(CloseCode::BAD_GATEWAY, "backend protocol error")
            }
        };
        self.leg(violator.other()).send_close(&to_other).await;
        let leg = self.leg(violator);
        leg.send_close(&ControlPayload::close(code, reason)).await;
        // FIN after the close frame, then wait for the violator to close (bounded).
        leg.stream.shutdown(Shutdown::Write);
        self.drain_socket(violator).await;
    }

    /// `side` went away (EOF or an I/O error) without a close frame, or the write timeout
    /// gave up on it (it stopped reading): then the other peer hears of it as of a dead peer.
    async fn on_gone(&self, side: Side) {
        let lifecycle = self.lifecycle.get();
        let other_waits = matches!(lifecycle, Lifecycle::Closing(waiting) if waiting != side);
        if lifecycle.is_open() || other_waits {
            self.set_lifecycle(Lifecycle::Failed);
            let (code, reason) = match (side, self.leg(side).aborted()) {
                (Side::Client, false) => (CloseCode::GOING_AWAY, "client went away"),
                (Side::Backend, false) => (CloseCode::BAD_GATEWAY, "backend went away"),
                (Side::Client, true) => (CloseCode::GOING_AWAY, "client stopped reading"),
                (Side::Backend, true) => (CloseCode::INTERNAL_ERROR, "backend stopped reading"),
            };
            self.record_close(Some(code), "gateway", reason);
            self.leg(side.other())
                .send_close(&ControlPayload::close(code, reason))
                .await;
        }
        self.leg(side).stream.shutdown(Shutdown::Both);
    }

    /// Reads and discards until `side` closes TCP (or the watchdog shuts the socket).
    async fn drain_socket(&self, side: Side) {
        let leg = self.leg(side);
        let mut sink = Vec::with_capacity(MIN_READ);
        while let Ok(1..) = leg.stream.read_more(&mut sink, MIN_READ).await {
            sink.clear();
        }
        leg.stream.shutdown(Shutdown::Both);
    }
}

/// Sends `leg` the gateway's close; shuts its socket after it if it is the `dead` one.
async fn close_leg(leg: &Leg, payload: &ControlPayload, dead: Option<Side>) {
    leg.send_close(payload).await;
    if dead == Some(leg.side) {
        // Half-open: nothing will come back from it.
        leg.stream.shutdown(Shutdown::Both);
    }
}

/// Why a pump stopped reading.
enum End {
    /// Its peer sent a valid close frame.
    Close(Box<ControlPayload>),
    /// Its peer broke the protocol.
    Violation(codec::ProtocolError),
    /// This peer's socket hit EOF or an error.
    Gone(Side),
}
