//! One peer's socket, with what it takes for several tasks of a connection to write to it
//! without breaking frames apart.
#![forbid(unsafe_code)]

use std::cell::Cell;
use std::net::Shutdown;
use std::sync::Arc;
use std::time::Instant;

use codec::frame::{OpCode, write_frame};
use tokio::sync::Notify;

use crate::forward::{ControlPayload, Forwarder};
use crate::keepalive::{Keepalive, Verdict};
use crate::lifecycle::Side;
use crate::metrics::{CloseDirection, CoreMetrics};
use crate::uring::Stream;

/// The payload of the gateway's own keepalive pings; a pong carrying it answers the gateway,
/// so it is absorbed rather than relayed.
pub(crate) const KEEPALIVE_PAYLOAD: &[u8] = b"wsgate-keepalive";

/// A peer of a connection.
pub(crate) struct Leg {
    pub(crate) stream: Stream,
    pub(crate) side: Side,
    /// A task is writing a frame to this peer.
    busy: Cell<bool>,
    idle: Notify,
    /// A close frame was written to this peer: nothing more may follow it.
    pub(crate) close_sent: Cell<bool>,
    /// The bytes written to this peer stop inside a frame: a close frame cannot follow.
    pub(crate) partial: Cell<bool>,
    /// When bytes last arrived from this peer (pongs included): liveness for keepalive.
    pub(crate) last_seen: Cell<Instant>,
    /// When the gateway last pinged this peer.
    pub(crate) pinged: Cell<Option<Instant>>,
    metrics: Arc<CoreMetrics>,
}

impl Leg {
    pub(crate) fn new(stream: Stream, side: Side, metrics: Arc<CoreMetrics>) -> Self {
        Self {
            stream,
            side,
            busy: Cell::new(false),
            idle: Notify::new(),
            close_sent: Cell::new(false),
            partial: Cell::new(false),
            last_seen: Cell::new(Instant::now()),
            pinged: Cell::new(None),
            metrics,
        }
    }

    /// Takes the right to write whole frames to this peer.
    pub(crate) async fn lock(&self) {
        while self.busy.get() {
            self.idle.notified().await;
        }
        self.busy.set(true);
    }

    /// Gives the right back (at a frame boundary).
    pub(crate) fn unlock(&self) {
        self.busy.set(false);
        self.idle.notify_one();
    }

    /// Whether a task is writing to this peer right now.
    pub(crate) fn is_busy(&self) -> bool {
        self.busy.get()
    }

    /// Writes a forwarder's output (the front of `buf`) to this peer and removes it, with the
    /// input it came from, from `buf`. The write lock is taken at the start of a frame and
    /// kept until a batch ends on a frame boundary (`holding` carries that across batches),
    /// so no other task writes inside a frame. With `discard`, or once this peer was sent a
    /// close, the output is dropped instead. The lock is released on error.
    pub(crate) async fn write_batch(
        &self,
        buf: &mut Vec<u8>,
        fwd: &mut Forwarder,
        holding: &mut bool,
        discard: bool,
    ) -> std::io::Result<()> {
        if !*holding {
            self.lock().await;
            *holding = true;
        }
        if !discard
            && !self.close_sent.get()
            && let Err(e) = self.stream.write_prefix(buf, fwd.output_len()).await
        {
            self.unlock();
            *holding = false;
            return Err(e);
        }
        buf.drain(..fwd.flushed());
        self.partial.set(fwd.output_mid_frame());
        if !fwd.output_mid_frame() {
            self.unlock();
            *holding = false;
        }
        Ok(())
    }

    /// Writes a close frame (masked toward a backend) unless one was already sent. If a
    /// frame to this peer is half-written, no frame can follow it: the peer gets a FIN.
    pub(crate) async fn send_close(&self, payload: &ControlPayload) {
        self.lock().await;
        if self.partial.get() {
            self.close_sent.set(true);
            self.stream.shutdown(Shutdown::Write);
        } else if !self.close_sent.replace(true) {
            // A peer that cannot take a close frame is gone; the pumps notice on their own.
            if self
                .write_control(OpCode::Close, payload.bytes())
                .await
                .is_ok()
            {
                let code = payload.close_code().map(codec::CloseCode::get);
                self.metrics
                    .close_frame(self.side, CloseDirection::Sent, code);
            }
        }
        self.unlock();
    }

    /// Sends the gateway's keepalive ping, unless the peer was already sent a close.
    pub(crate) async fn send_ping(&self) {
        self.pinged.set(Some(Instant::now()));
        self.lock().await;
        if !self.close_sent.get() && !self.partial.get() {
            drop(self.write_control(OpCode::Ping, KEEPALIVE_PAYLOAD).await);
        }
        self.unlock();
    }

    async fn write_control(&self, opcode: OpCode, payload: &[u8]) -> std::io::Result<()> {
        let mask = (self.side == Side::Backend).then(rand::random);
        let mut frame = Vec::with_capacity(2 + 4 + payload.len());
        write_frame(&mut frame, true, opcode, mask, payload);
        self.stream.write_all(&mut frame).await
    }
}

/// Why a keepalive tick ends a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Alarm {
    /// No leg sent anything for the idle timeout.
    Idle,
    /// This leg was pinged and stayed silent past the pong deadline.
    Dead(Side),
}

/// One keepalive tick over a connection's legs (two for a relay, one for the echo): pings
/// the legs that are due, and says whether the connection is idle or a leg is dead.
pub(crate) async fn keepalive_tick(legs: &[&Leg], keepalive: &Keepalive) -> Option<Alarm> {
    let now = Instant::now();
    let latest = legs.iter().map(|leg| leg.last_seen.get()).max()?;
    if keepalive.is_idle(now, latest) {
        return Some(Alarm::Idle);
    }
    for leg in legs {
        match keepalive.verdict(now, leg.last_seen.get(), leg.pinged.get()) {
            Verdict::Fine => {}
            Verdict::Ping => leg.send_ping().await,
            Verdict::Dead => return Some(Alarm::Dead(leg.side)),
        }
    }
    None
}
