//! `connect`: each slot loops connect, upgrade, close, as fast as it can (or at `--rate`
//! handshakes/s in total, open loop). Records connect+upgrade latency (with `--rate`, from
//! the intended start, see [`crate::schedule`]) and counts the cycles that completed cleanly: the sustainable
//! handshake rate.

use std::time::{Duration, Instant};

use crate::control::LiveSlot;
use crate::io;
use crate::schedule::{self, Schedule};
use crate::stats::Metric;
use crate::worker::ThreadCtx;

use super::hold::{CloseAt, Hold};
use super::{drive, open};

/// Pause after a failed attempt in closed loop, so a refusing server is not hammered in a
/// tight loop that only measures how fast errors come back.
const RETRY_PAUSE: Duration = Duration::from_millis(10);

/// Runs connect slot `index` until the run ends.
pub(super) async fn run(ctx: &ThreadCtx, index: usize) {
    LiveSlot::bump(&ctx.live().attempted);
    let windows = loop {
        if let Some(w) = ctx.windows() {
            break w;
        }
        ctx.started().wait().await;
    };
    let cfg = ctx.cfg();
    let mut schedule = cfg
        .rate
        .map(|rate| Schedule::new(windows.go, rate, cfg.connections, index));
    loop {
        let intended = schedule.as_ref().map_or_else(Instant::now, Schedule::due);
        if intended >= windows.end {
            break;
        }
        if let Some(s) = &mut schedule {
            if !s.ready(Instant::now()) {
                io::sleep_until(s.wake_at()).await;
            }
            s.advance();
        }
        let start = Instant::now();
        let Some(opened) = open(ctx).await else {
            if ctx.shared.all_refused() {
                break;
            }
            if schedule.is_none() {
                io::sleep_until(Instant::now() + RETRY_PAUSE).await;
            }
            continue;
        };
        let measured = windows.measures(intended);
        if measured {
            ctx.record(Metric::Connect, opened.connected - start);
            ctx.record(
                Metric::Upgrade,
                opened.upgraded - schedule::origin(intended, start),
            );
        }
        let mut hold = Hold::new(ctx, index, CloseAt::Instant(opened.upgraded), 0, false);
        if drive(ctx, opened, &mut hold).await {
            LiveSlot::bump(&ctx.live().done);
            if measured {
                ctx.stats.borrow_mut().counts.cycles += 1;
            }
        }
    }
}
