//! Relays frames both ways between a client and a backend, and runs the close handshake.
//!
//! One pump per direction reads its peer, pushes the bytes through a [`Forwarder`] and
//! writes the result to the other peer. A pump holds the destination's write lock from the
//! start of a frame to its end, so a close frame sent by the other pump (after a violation)
//! never lands inside a frame. Buffers are bounded per direction: a pump does not read again
//! until its last batch is written, so a slow reader stalls only its own connection.
#![forbid(unsafe_code)]

use std::cell::Cell;
use std::net::Shutdown;
use std::time::Duration;

use codec::CloseCode;
use codec::frame::{OpCode, write_frame};
use tokio::sync::Notify;

use crate::forward::{ControlPayload, Forwarder, Step};
use crate::lifecycle::{Lifecycle, OnClose, Side};
use crate::uring::Stream;

/// Reads start this small so an idle connection pins little memory under io_uring (a pending
/// read owns its buffer), and grow while reads keep filling them.
pub(crate) const MIN_READ: usize = 512;
/// The largest read buffer per direction.
pub(crate) const MAX_READ: usize = 64 * 1024;
/// Output held back while a data frame is incomplete; past it the frame streams on.
pub(crate) const HOLD: usize = 64 * 1024;

/// One peer's socket with what the relay needs to write to it safely.
pub(crate) struct Leg {
    stream: Stream,
    side: Side,
    /// A pump is writing a frame to this peer.
    busy: Cell<bool>,
    idle: Notify,
    /// A close frame was written to this peer: nothing more may follow it.
    close_sent: Cell<bool>,
    /// The bytes written to this peer stop inside a frame: a close frame cannot follow.
    partial: Cell<bool>,
}

impl Leg {
    pub(crate) fn new(stream: Stream, side: Side) -> Self {
        Self {
            stream,
            side,
            busy: Cell::new(false),
            idle: Notify::new(),
            close_sent: Cell::new(false),
            partial: Cell::new(false),
        }
    }

    async fn lock(&self) {
        while self.busy.get() {
            self.idle.notified().await;
        }
        self.busy.set(true);
    }

    fn unlock(&self) {
        self.busy.set(false);
        self.idle.notify_one();
    }

    /// Writes a close frame (masked toward a backend) unless one was already sent. If a
    /// frame to this peer is half-written, no frame can follow it: the peer gets a FIN.
    async fn send_close(&self, payload: &ControlPayload) {
        self.lock().await;
        if self.partial.get() {
            self.close_sent.set(true);
            self.stream.shutdown(Shutdown::Write);
        } else if !self.close_sent.replace(true) {
            let mask = (self.side == Side::Backend).then(rand::random);
            let mut frame = Vec::with_capacity(2 + 4 + payload.bytes().len());
            write_frame(&mut frame, true, OpCode::Close, mask, payload.bytes());
            // A peer that cannot take a close frame is gone; the pumps notice on their own.
            drop(self.stream.write_all(&mut frame).await);
        }
        self.unlock();
    }
}

/// How a connection ended, for the access log.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Outcome {
    /// The first close code on the wire, if any.
    pub(crate) close_code: Option<CloseCode>,
    /// Who sent it: "client", "backend" or "gateway".
    pub(crate) closed_by: Option<&'static str>,
    /// Payload bytes client to backend.
    pub(crate) bytes_in: u64,
    /// Payload bytes backend to client.
    pub(crate) bytes_out: u64,
    /// The close handshake did not finish within the close timeout.
    pub(crate) timed_out: bool,
}

/// A proxied connection after both upgrades.
pub(crate) struct Relay {
    client: Leg,
    backend: Leg,
    lifecycle: Cell<Lifecycle>,
    /// Signalled when the lifecycle leaves `Open`, which starts the close timeout.
    closing: Notify,
    outcome: Cell<Outcome>,
}

impl Relay {
    pub(crate) fn new(client: Stream, backend: Stream) -> Self {
        Self {
            client: Leg::new(client, Side::Client),
            backend: Leg::new(backend, Side::Backend),
            lifecycle: Cell::new(Lifecycle::Open),
            closing: Notify::new(),
            outcome: Cell::new(Outcome::default()),
        }
    }

    fn leg(&self, side: Side) -> &Leg {
        match side {
            Side::Client => &self.client,
            Side::Backend => &self.backend,
        }
    }

    fn set_lifecycle(&self, next: Lifecycle) {
        if self.lifecycle.replace(next).is_open() && !next.is_open() {
            self.closing.notify_one();
        }
    }

    fn record_close(&self, code: Option<CloseCode>, by: &'static str) {
        let mut outcome = self.outcome.get();
        if outcome.closed_by.is_none() {
            outcome.close_code = code;
            outcome.closed_by = Some(by);
            self.outcome.set(outcome);
        }
    }

    /// Relays until both directions are done or the close timeout expires.
    pub(crate) async fn run(
        &self,
        client_fwd: Forwarder,
        client_leftover: Vec<u8>,
        backend_fwd: Forwarder,
        backend_leftover: Vec<u8>,
        close_timeout: Duration,
    ) -> Outcome {
        let pumps = async {
            tokio::join!(
                self.pump(Side::Client, client_fwd, client_leftover),
                self.pump(Side::Backend, backend_fwd, backend_leftover)
            )
        };
        tokio::pin!(pumps);
        let (a, b) = tokio::select! {
            done = &mut pumps => done,
            () = self.close_watchdog(close_timeout) => {
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

    /// Waits for the close handshake to start, then for the close timeout; a peer still
    /// waiting for a reply then gets one from the gateway.
    async fn close_watchdog(&self, timeout: Duration) {
        if self.lifecycle.get().is_open() {
            self.closing.notified().await;
        }
        tokio::time::sleep(timeout).await;
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
            if !leg.busy.get() {
                let reply = ControlPayload::close(CloseCode::BAD_GATEWAY, "close timeout");
                leg.send_close(&reply).await;
            }
        }
    }

    /// Pumps frames from `from` to the other side; returns the payload bytes forwarded.
    async fn pump(&self, from: Side, mut fwd: Forwarder, mut input: Vec<u8>) -> u64 {
        let src = self.leg(from);
        let dst = self.leg(from.other());
        let mut out = Vec::new();
        let mut holding = false;
        let mut read_size = MIN_READ;
        let end = loop {
            let (used, step) = fwd.process(&input, &mut out);
            input.drain(..used);
            // A frame still arriving is held back (up to HOLD bytes) so that a violation
            // inside it can still be answered with a clean close frame.
            let flush = !out.is_empty()
                && (!fwd.output_mid_frame()
                    || out.len() >= HOLD
                    || !matches!(step, Step::NeedInput));
            if flush {
                if !holding {
                    dst.lock().await;
                    holding = true;
                }
                if dst.close_sent.get() || self.lifecycle.get() == Lifecycle::Failed {
                    // The gateway already closed this peer: drop what was meant for it.
                    out.clear();
                } else if dst.stream.write_all(&mut out).await.is_err() {
                    dst.unlock();
                    holding = false;
                    break End::Gone(from.other());
                }
                fwd.flushed();
                dst.partial.set(fwd.output_mid_frame());
                if !fwd.output_mid_frame() {
                    dst.unlock();
                    holding = false;
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
                    if n >= read_size && read_size < MAX_READ {
                        read_size *= 2;
                    }
                }
            }
        };
        if holding {
            dst.unlock();
        }
        match end {
            End::Close(payload) => self.on_close(from, &payload).await,
            End::Violation(e) => {
                self.record_close(Some(e.close_code()), "gateway");
                self.set_lifecycle(Lifecycle::Failed);
                self.fail(from, e.close_code(), e.as_str()).await;
            }
            End::Gone(side) => self.on_gone(side).await,
        }
        fwd.payload_bytes
    }

    /// A close frame arrived from `from`.
    async fn on_close(&self, from: Side, payload: &ControlPayload) {
        let (next, action) = self.lifecycle.get().close_from(from);
        self.set_lifecycle(next);
        self.record_close(payload.close_code(), from.as_str());
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
            self.drain(Side::Backend).await;
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
        self.drain(violator).await;
    }

    /// `side` went away (EOF or an I/O error) without a close frame.
    async fn on_gone(&self, side: Side) {
        let lifecycle = self.lifecycle.get();
        let other_waits = matches!(lifecycle, Lifecycle::Closing(waiting) if waiting != side);
        if lifecycle.is_open() || other_waits {
            self.set_lifecycle(Lifecycle::Failed);
            let (code, reason) = match side {
                Side::Client => (CloseCode::GOING_AWAY, "client went away"),
                Side::Backend => (CloseCode::BAD_GATEWAY, "backend went away"),
            };
            self.record_close(Some(code), "gateway");
            self.leg(side.other())
                .send_close(&ControlPayload::close(code, reason))
                .await;
        }
        self.leg(side).stream.shutdown(Shutdown::Both);
    }

    /// Reads and discards until `side` closes TCP (or the watchdog shuts the socket).
    async fn drain(&self, side: Side) {
        let leg = self.leg(side);
        let mut sink = Vec::with_capacity(MIN_READ);
        while let Ok(1..) = leg.stream.read_more(&mut sink, MIN_READ).await {
            sink.clear();
        }
        leg.stream.shutdown(Shutdown::Both);
    }
}

/// Why a pump stopped reading.
enum End {
    /// Its peer sent a valid close frame.
    Close(ControlPayload),
    /// Its peer broke the protocol.
    Violation(codec::ProtocolError),
    /// This peer's socket hit EOF or an error.
    Gone(Side),
}
