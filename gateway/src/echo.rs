//! The embedded echo upstream: with no backend configured, the gateway answers clients
//! itself, frame by frame (never buffering a message), validating like any leg.
//!
//! It is what `cargo run -p gateway` serves and what the client leg is benchmarked with.
//! Keepalive, drain, the write timeout and the close timeout work as on a proxied connection.
#![forbid(unsafe_code)]

use std::cell::Cell;
use std::net::Shutdown;
use std::sync::Arc;
use std::time::Instant;

use codec::CloseCode;
use codec::frame::Role;

use crate::conn::{MIN_READ, Outcome, Settings};
use crate::drain::Drain;
use crate::forward::{ControlPayload, Forwarder, Mode, Step};
use crate::leg::{Alarm, Leg, Ticker, abort_stalled, bounded, keepalive_tick, last_poll};
use crate::lifecycle::Side;
use crate::metrics::{CloseDirection, CoreMetrics, Direction};
use crate::uring::Stream;

/// Echoes until the client closes; `input` holds bytes that arrived with the handshake.
pub(crate) async fn serve(
    stream: Stream,
    input: Vec<u8>,
    settings: Settings,
    drain: &Drain,
    metrics: &Arc<CoreMetrics>,
) -> Outcome {
    let leg = Leg::new(stream, Side::Client, Arc::clone(metrics));
    // The gateway's own close, if it sent one first: its code, and when (the start of the
    // close handshake).
    let gateway_closed = Cell::new(None);
    let echo = echo(&leg, input, &settings, &gateway_closed, metrics);
    let watchdog = watchdog(&leg, &settings, drain, &gateway_closed);
    tokio::pin!(echo, watchdog);
    let mut outcome = tokio::select! {
        // The echo first: the watchdog's timer relies on seeing the writes it starts.
        biased;
        outcome = &mut echo => {
            last_poll(watchdog).await;
            outcome
        }
        () = &mut watchdog => {
            leg.stream.shutdown(Shutdown::Both);
            let mut outcome = echo.await;
            outcome.timed_out = true;
            outcome
        }
    };
    leg.stream.shutdown(Shutdown::Both);
    if let Some(closed) = gateway_closed.get() {
        outcome.close_code = Some(closed.code);
        outcome.closed_by = Some("gateway");
        outcome.reason = Some(closed.reason);
    } else if leg.aborted() {
        // The client stopped reading: no close frame could reach it (1006 in the log).
        outcome.close_code = None;
        outcome.closed_by = Some("gateway");
        outcome.reason = Some("client stopped reading");
    }
    outcome
}

/// The write timeout, keepalive and drain while the client is active, then the close timeout.
async fn watchdog(
    leg: &Leg,
    settings: &Settings,
    drain: &Drain,
    closed: &Cell<Option<GatewayClosed>>,
) {
    let (keepalive, write) = (&settings.keepalive, settings.write_timeout);
    let legs = [leg];
    let mut ticker = Ticker::default();
    let (code, reason) = loop {
        tokio::select! {
            code = drain.wait() => break (code, Drain::reason(code)),
            () = ticker.tick(settings, || leg.write_pending()) => {
                // A client given up on fails the echo's write or read, which ends it.
                if abort_stalled(&legs, write) || !keepalive.enabled() {
                    continue;
                }
                match Box::pin(bounded(&legs, write, keepalive_tick(&legs, keepalive))).await {
                    None => {}
                    Some(Alarm::Idle) => {
                        break (CloseCode::GOING_AWAY, "idle timeout");
                    }
                    Some(Alarm::Dead(_)) => {
                        break (CloseCode::GOING_AWAY, "ping timeout");
                    }
                }
            }
        }
    };
    if !leg.close_sent.get() {
        closed.set(Some(GatewayClosed {
            code,
            reason,
            since: Instant::now(),
        }));
        let close = ControlPayload::close(code, reason);
        Box::pin(bounded(&legs, write, leg.send_close(&close))).await;
    }
    tokio::time::sleep(settings.close_timeout).await;
}

/// The gateway's own close of an echo connection, if it sent one first.
#[derive(Clone, Copy)]
struct GatewayClosed {
    code: CloseCode,
    /// Its reason text, for the access log.
    reason: &'static str,
    /// When it was sent: the start of the close handshake.
    since: Instant,
}

/// The echo loop proper: what the client sends comes back, pings get pongs.
async fn echo(
    leg: &Leg,
    mut input: Vec<u8>,
    settings: &Settings,
    closed: &Cell<Option<GatewayClosed>>,
    metrics: &CoreMetrics,
) -> Outcome {
    let mut fwd = Forwarder::new(Role::Server, settings.limits, false, Mode::Echo);
    let (mut frames, mut bytes) = (0, 0);
    let mut holding = false;
    let limit = settings.buffer;
    let mut read_size = MIN_READ.min(limit);
    let mut outcome = Outcome::default();
    // When the client's close arrived.
    let mut client_close_at = None;
    let reply = loop {
        let step = fwd.process(&mut input);
        if fwd.frames != frames || fwd.payload_bytes != bytes {
            // Each frame is counted both ways: in from the client, and echoed back.
            let (df, db) = (fwd.frames - frames, fwd.payload_bytes - bytes);
            metrics.frames(Direction::ClientToBackend, df, db);
            metrics.frames(Direction::BackendToClient, df, db);
            (frames, bytes) = (fwd.frames, fwd.payload_bytes);
        }
        if fwd.should_flush(limit, &step)
            && leg
                .write_batch(&mut input, &mut fwd, &mut holding, false)
                .await
                .is_err()
        {
            break None;
        }
        match step {
            Step::NeedInput => {}
            Step::Close(payload) => {
                let code = payload.close_code();
                metrics.close_frame(
                    Side::Client,
                    CloseDirection::Received,
                    code.map(CloseCode::get),
                );
                outcome.close_code = code;
                outcome.closed_by = Some("client");
                outcome.reason = Some("client sent close");
                client_close_at = Some(Instant::now());
                // Echo the client's close payload back: the usual reply.
                break Some(payload);
            }
            Step::Violation(e) => {
                outcome.close_code = Some(e.close_code());
                outcome.closed_by = Some("gateway");
                outcome.reason = Some(e.as_str());
                break Some(Box::new(ControlPayload::close(e.close_code(), e.as_str())));
            }
        }
        match leg.stream.read_more(&mut input, read_size).await {
            Ok(0) | Err(_) => {
                outcome.close_code = Some(CloseCode::ABNORMAL);
                outcome.closed_by = Some("client");
                outcome.reason = Some("client went away");
                break None;
            }
            Ok(n) => {
                leg.last_seen.set(Instant::now());
                if n >= read_size && read_size < limit {
                    read_size = (read_size * 2).min(limit);
                }
            }
        }
    };
    if holding {
        leg.unlock();
    }
    if let Some(payload) = reply {
        let client_closed = outcome.closed_by == Some("client");
        match (client_close_at, closed.get()) {
            (Some(answered), Some(GatewayClosed { since, .. })) => {
                // The client answered the gateway's own close: the handshake is complete.
                metrics.close_handshake(answered.saturating_duration_since(since));
            }
            (Some(since), None) => {
                // The echoed close completes the client's handshake.
                leg.send_close(&payload).await;
                metrics.close_handshake(since.elapsed());
            }
            (None, _) => leg.send_close(&payload).await,
        }
        if !client_closed {
            // We failed the connection: FIN after our close, then give the client a bounded
            // moment to answer and close its side before the socket goes.
            leg.stream.shutdown(Shutdown::Write);
            let drain = async {
                input.clear();
                while let Ok(1..) = leg.stream.read_more(&mut input, MIN_READ).await {
                    input.clear();
                }
            };
            drop(tokio::time::timeout(settings.close_timeout, drain).await);
        }
    }
    leg.stream.shutdown(Shutdown::Both);
    outcome.bytes_in = fwd.payload_bytes;
    outcome.bytes_out = fwd.payload_bytes;
    outcome
}
