//! Drives one upgraded connection for a scenario's [`Handler`].
//!
//! A read is always in flight, so pings are answered and server-initiated closes are seen at
//! any time, even while the handler waits for a timer or for the run to start. The read is
//! never cancelled: the timer and the start signal are raced against it and it stays pinned
//! across iterations (dropping an io_uring read would lose the bytes it lands). Writes are
//! submitted while that read stays armed, so one `io_uring_enter` carries both. Per message
//! nothing is allocated: both buffers are reused and every future lives on this task's stack.

use std::future::{Future, poll_fn};
use std::io;
use std::pin::{Pin, pin};
use std::task::Poll;
use std::time::{Duration, Instant};

use codec::CloseCode;
use codec::frame::OpCode;

use crate::errors::ErrorKind;
use crate::frames::{self, Frame, FrameParser, Parsed};
use crate::io::{Conn, Signal, Timer};

/// What the server did, as a handler sees it (pings are answered here and never reach it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Incoming<'a> {
    /// A text, binary or continuation frame.
    Data(Frame<'a>),
    /// A Close frame with its status, if it carried one.
    Close(Option<CloseCode>),
    /// The server closed TCP (read returned end of stream).
    Eof,
}

/// What a handler waits for besides frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Wait {
    /// Only frames.
    Frames,
    /// The run's start (the main thread ends the ramp).
    Start,
    /// A deadline.
    Until(Instant),
}

/// A handler's verdict after each event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// Keep going.
    Continue,
    /// The connection's work is over (its close handshake included).
    Done,
    /// The connection failed; the driver stops after flushing what is queued.
    Fail(ErrorKind),
}

/// A scenario's per-connection logic, sans-IO: events in, frames appended to `out`.
pub(crate) trait Handler {
    /// What to wait for next.
    fn wait(&self) -> Wait;
    /// The run started or the deadline may have passed (wake-ups can come early: re-check).
    fn on_wake(&mut self, now: Instant, out: &mut Vec<u8>) -> Step;
    /// Something arrived from the server at `now`; after [`Incoming::Eof`] only `Done` or
    /// `Fail` make sense.
    fn on_incoming(&mut self, event: Incoming<'_>, now: Instant, out: &mut Vec<u8>) -> Step;
    /// Everything queued in `out` was written, by a write submitted at `submitted`: what
    /// answers it is timed from there, not from the write's completion, which a busy CPU can
    /// report after the answer is already in (the server runs between the two on one CPU).
    fn on_written(&mut self, submitted: Instant);
}

type ReadResult = (io::Result<usize>, Vec<u8>);

/// The state of the one read this connection keeps armed.
struct ReadSlot {
    /// The pinned read future is running (not finished).
    live: bool,
    /// A read that finished while a write was in progress, not yet handled.
    ready: Option<ReadResult>,
}

/// What woke the driver.
enum Wake {
    Read(ReadResult),
    Deadline,
}

/// Runs `handler` on `conn` until it is done or fails. `buf` holds bytes that arrived after
/// the 101 and its capacity is the initial read size; it grows to fit a frame, up to what the
/// parser allows. A write that cannot complete within `write_timeout` (a server that stopped
/// reading) is a [`ErrorKind::Timeout`].
pub(crate) async fn drive<H: Handler>(
    conn: &Conn,
    started: &Signal,
    parser: &mut FrameParser,
    mut buf: Vec<u8>,
    handler: &mut H,
    write_timeout: Duration,
) -> Result<(), ErrorKind> {
    let mut out = Vec::with_capacity(buf.capacity());
    let mut timer = Timer::new();

    let mut step = process(&mut buf, parser, handler, &mut out, Instant::now());
    let read = conn.read_more(buf);
    let mut read = pin!(read);
    // The read is created above only so that its type is known; it starts when first polled.
    let mut slot = ReadSlot {
        live: step == Step::Continue,
        ready: None,
    };
    loop {
        out = flush(
            conn,
            out,
            read.as_mut(),
            &mut slot,
            handler,
            &mut timer,
            write_timeout,
        )
        .await?;
        match step {
            Step::Continue => {}
            Step::Done => return Ok(()),
            Step::Fail(kind) => return Err(kind),
        }
        let wake = match slot.ready.take() {
            Some(result) => Wake::Read(result),
            None => wait(read.as_mut(), handler.wait(), &mut timer, started).await,
        };
        let now = Instant::now();
        step = match wake {
            Wake::Read((result, mut buf)) => {
                slot.live = false;
                match result {
                    Err(_) => return Err(ErrorKind::Io),
                    Ok(0) => handler.on_incoming(Incoming::Eof, now, &mut out),
                    Ok(_) => {
                        let step = process(&mut buf, parser, handler, &mut out, now);
                        if step == Step::Continue {
                            read.set(conn.read_more(buf));
                            slot.live = true;
                        }
                        step
                    }
                }
            }
            Wake::Deadline => handler.on_wake(now, &mut out),
        };
        if !slot.live && step == Step::Continue {
            debug_assert!(false, "handler continued after end of stream");
            step = Step::Fail(ErrorKind::Dropped);
        }
    }
}

/// Waits for the read, or for the handler's deadline or start signal, whichever comes first;
/// the read keeps running when it loses.
async fn wait<F: Future<Output = ReadResult>>(
    mut read: Pin<&mut F>,
    wait: Wait,
    timer: &mut Timer,
    started: &Signal,
) -> Wake {
    let signal = started.wait();
    let mut signal = pin!(signal);
    poll_fn(|cx| {
        // A deadline already due goes first, so a server that never stops sending cannot starve
        // a timeout, and skips the timer wheel, which would round up to its next tick.
        if let Wait::Until(at) = wait
            && at <= Instant::now()
        {
            return Poll::Ready(Wake::Deadline);
        }
        if let Poll::Ready(result) = read.as_mut().poll(cx) {
            return Poll::Ready(Wake::Read(result));
        }
        let woke = match wait {
            Wait::Frames => false,
            Wait::Start => signal.as_mut().poll(cx).is_ready(),
            Wait::Until(at) => timer.poll_until(at, cx).is_ready(),
        };
        if woke {
            Poll::Ready(Wake::Deadline)
        } else {
            Poll::Pending
        }
    })
    .await
}

/// Writes `out` (if anything is queued) while keeping the read armed; a read that completes
/// meanwhile is parked in the slot. Gives up after `limit`.
async fn flush<F: Future<Output = ReadResult>, H: Handler>(
    conn: &Conn,
    out: Vec<u8>,
    mut read: Pin<&mut F>,
    slot: &mut ReadSlot,
    handler: &mut H,
    timer: &mut Timer,
    limit: Duration,
) -> Result<Vec<u8>, ErrorKind> {
    if out.is_empty() {
        return Ok(out);
    }
    let submitted = Instant::now();
    let deadline = submitted + limit;
    let write = conn.write_all(out);
    let mut write = pin!(write);
    let written = poll_fn(|cx| {
        if slot.live
            && slot.ready.is_none()
            && let Poll::Ready(r) = read.as_mut().poll(cx)
        {
            slot.ready = Some(r);
        }
        if let Poll::Ready(w) = write.as_mut().poll(cx) {
            return Poll::Ready(Some(w));
        }
        // The timer may fire early (see `Timer::poll_until`); re-arm until really due.
        while timer.poll_until(deadline, cx).is_ready() {
            if Instant::now() >= deadline {
                return Poll::Ready(None);
            }
        }
        Poll::Pending
    })
    .await;
    let (result, mut out) = written.ok_or(ErrorKind::Timeout)?;
    result.map_err(|_| ErrorKind::Io)?;
    out.clear();
    handler.on_written(submitted);
    Ok(out)
}

/// Hands every complete frame in `buf` to the handler, answers pings, drops what was
/// handled, and makes room for the rest of a partial frame.
fn process<H: Handler>(
    buf: &mut Vec<u8>,
    parser: &mut FrameParser,
    handler: &mut H,
    out: &mut Vec<u8>,
    now: Instant,
) -> Step {
    let mut consumed = 0;
    let mut needed = 0;
    let mut step = Step::Continue;
    while step == Step::Continue {
        match parser.parse(&buf[consumed..]) {
            Err(e) => {
                // Tell the server why, as an endpoint must (RFC 6455 7.1.7).
                frames::encode_close(out, Some(e.close_code()));
                step = Step::Fail(ErrorKind::Protocol);
            }
            Ok(Parsed::Incomplete { total }) => {
                needed = total;
                break;
            }
            Ok(Parsed::Frame { frame, len }) => {
                consumed += len;
                step = match frame.opcode {
                    OpCode::Ping => {
                        frames::encode(out, OpCode::Pong, frame.payload);
                        Step::Continue
                    }
                    OpCode::Pong => Step::Continue,
                    OpCode::Close => handler.on_incoming(
                        Incoming::Close(frames::close_code(frame.payload)),
                        now,
                        out,
                    ),
                    _ => handler.on_incoming(Incoming::Data(frame), now, out),
                };
            }
        }
    }
    buf.drain(..consumed);
    if needed > buf.capacity() {
        buf.reserve(needed - buf.len());
    }
    step
}
