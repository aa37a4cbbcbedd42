//! One module per scenario; each connection is one task running the scenario's handler.
//! What they share lives here: opening a connection during the ramp (counting failures),
//! driving it to its end, and turning close-handshake outcomes into samples.

mod connect;
mod echo;
mod hold;

use std::rc::Rc;
use std::sync::atomic::Ordering;

use crate::closer::{Closed, Progress};
use crate::config::{Config, Scenario};
use crate::control::LiveSlot;
use crate::errors::ErrorKind;
use crate::frames::FrameParser;
use crate::session::{self, Handler, Step};
use crate::stats::Metric;
use crate::upgrade::{self, OpenError, Opened};
use crate::worker::ThreadCtx;

/// Runs global connection `index` of the configured scenario to completion.
pub(crate) async fn run(ctx: Rc<ThreadCtx>, index: usize) {
    match ctx.cfg().scenario {
        Scenario::Echo => echo::run(&ctx, index).await,
        Scenario::Close | Scenario::Idle => hold::run(&ctx, index).await,
        Scenario::Connect => connect::run(&ctx, index).await,
    }
}

/// Initial read buffer: one echo plus a control frame; grows only for larger frames.
fn read_capacity(cfg: &Config) -> usize {
    (cfg.size + 2 * 14 + 125).max(512)
}

/// Opens one connection, counting it (or its failure).
async fn open(ctx: &ThreadCtx) -> Option<Opened> {
    let cfg = ctx.cfg();
    let opened = upgrade::open(&cfg.target, cfg.connect_timeout, read_capacity(cfg)).await;
    match opened {
        Ok(o) => {
            ctx.shared.note_opened();
            ctx.stats.borrow_mut().counts.opened += 1;
            LiveSlot::bump(&ctx.live().open);
            Some(o)
        }
        Err(e) => {
            failed(ctx, e);
            None
        }
    }
}

/// Opens one connection as part of the ramp, bounded by `--ramp-concurrency`.
async fn open_in_ramp(ctx: &ThreadCtx) -> Option<Opened> {
    let slot = ctx.ramp.acquire().await;
    let opened = open(ctx).await;
    drop(slot);
    opened
}

fn failed(ctx: &ThreadCtx, e: OpenError) {
    if e.kind == ErrorKind::ConnectRefused {
        ctx.shared.note_refused();
    }
    ctx.error(e.kind);
    let mut stats = ctx.stats.borrow_mut();
    stats.counts.failed += 1;
    if let Some(status) = e.status {
        *stats.statuses.entry(status).or_default() += 1;
    }
}

/// Runs `handler` on an opened connection until it ends, counts a failure, and releases the
/// socket. Returns whether it ended cleanly.
async fn drive<H: Handler>(ctx: &ThreadCtx, opened: Opened, handler: &mut H) -> bool {
    let mut parser = FrameParser::new(ctx.cfg().max_frame());
    let ended = session::drive(
        &opened.conn,
        ctx.started(),
        &mut parser,
        opened.buf,
        handler,
        ctx.cfg().timeout,
    )
    .await;
    opened.conn.shutdown();
    ctx.live().open.fetch_sub(1, Ordering::Relaxed);
    match ended {
        Ok(()) => true,
        Err(kind) => {
            ctx.error(kind);
            false
        }
    }
}

/// Turns a close-handshake outcome into a step, recording its latencies when `record`.
fn settle(ctx: &ThreadCtx, progress: Progress, record: bool) -> Step {
    match progress {
        Progress::Pending => Step::Continue,
        Progress::Closed(Closed::Ours { reply, eof }) => {
            if record {
                ctx.record(Metric::CloseReply, reply);
                ctx.record(Metric::CloseEof, eof);
                LiveSlot::bump(&ctx.live().done);
            }
            ctx.stats.borrow_mut().counts.closes += 1;
            Step::Done
        }
        Progress::Closed(Closed::Theirs { eof }) => {
            if record {
                ctx.record(Metric::ServerCloseEof, eof);
            }
            Step::Done
        }
        Progress::Failed(kind) => Step::Fail(kind),
    }
}
