//! The embedded echo upstream: with no backend configured, the gateway answers clients
//! itself, frame by frame (never buffering a message), validating like any leg.
//!
//! It is what `cargo run -p gateway` serves and what the client leg is benchmarked with.
#![forbid(unsafe_code)]

use std::net::Shutdown;
use std::time::Duration;

use codec::frame::{OpCode, Role, write_frame};
use codec::{CloseCode, Limits};

use crate::forward::{Forwarder, Mode, Step};
use crate::relay::{HOLD, MAX_READ, MIN_READ, Outcome};
use crate::uring::Stream;

/// Echoes until the client closes; `input` holds bytes that arrived with the handshake.
pub(crate) async fn serve(
    stream: &Stream,
    mut input: Vec<u8>,
    limits: Limits,
    close_timeout: Duration,
) -> Outcome {
    let mut fwd = Forwarder::new(Role::Server, limits, false, Mode::Echo);
    let mut out = Vec::new();
    let mut read_size = MIN_READ;
    let mut outcome = Outcome::default();
    let mut reply = loop {
        let (used, step) = fwd.process(&input, &mut out);
        input.drain(..used);
        // Hold an incomplete frame back (as the relay does) so a violation inside it can
        // still be answered with a close frame.
        let flush = !out.is_empty()
            && (!fwd.output_mid_frame() || out.len() >= HOLD || !matches!(step, Step::NeedInput));
        if flush {
            if stream.write_all(&mut out).await.is_err() {
                break None;
            }
            fwd.flushed();
        }
        match step {
            Step::NeedInput => {}
            Step::Close(payload) => {
                outcome.close_code = payload.close_code();
                outcome.closed_by = Some("client");
                // Echo the client's close payload back: the usual reply.
                break Some(payload);
            }
            Step::Violation(e) => {
                outcome.close_code = Some(e.close_code());
                outcome.closed_by = Some("gateway");
                break Some(crate::forward::ControlPayload::close(
                    e.close_code(),
                    e.as_str(),
                ));
            }
        }
        match stream.read_more(&mut input, read_size).await {
            Ok(0) | Err(_) => {
                outcome.close_code = Some(CloseCode::ABNORMAL);
                outcome.closed_by = Some("client");
                break None;
            }
            Ok(n) => {
                if n >= read_size && read_size < MAX_READ {
                    read_size *= 2;
                }
            }
        }
    };
    if fwd.output_mid_frame() {
        // A frame is half-written: no close frame can follow it, only a FIN.
        reply = None;
    }
    if let Some(payload) = reply {
        let client_closed = outcome.closed_by == Some("client");
        write_frame(&mut out, true, OpCode::Close, None, payload.bytes());
        if stream.write_all(&mut out).await.is_ok() && !client_closed {
            // We failed the connection: FIN after our close, then give the client a bounded
            // moment to answer and close its side before the socket goes.
            stream.shutdown(Shutdown::Write);
            let drain = async {
                input.clear();
                while let Ok(1..) = stream.read_more(&mut input, MIN_READ).await {
                    input.clear();
                }
            };
            drop(tokio::time::timeout(close_timeout, drain).await);
        }
    }
    stream.shutdown(Shutdown::Both);
    outcome.bytes_in = fwd.payload_bytes;
    outcome.bytes_out = fwd.payload_bytes;
    outcome
}
