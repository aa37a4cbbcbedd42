//! Live output on stderr: a progress bar while connections open, then one line a second
//! (rate, p99 so far, open connections, errors). Read from the workers' slots only, so it
//! costs the hot path nothing.

use std::thread;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

use crate::config::Scenario;
use crate::control::Shared;
use crate::duration::format_us;
use crate::stats::new_histogram;

/// How often the ramp bar and the end-of-run check look at the slots.
const POLL: Duration = Duration::from_millis(20);
/// How often a progress line is printed.
const LINE_EVERY: Duration = Duration::from_secs(1);

/// Waits until every connection attempt of the ramp has finished, showing a bar unless quiet.
pub(crate) fn ramp(shared: &Shared) {
    let total = shared.cfg.connections as u64;
    let bar = if shared.cfg.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(total)
    };
    bar.set_style(
        ProgressStyle::with_template("opening {bar:40} {pos}/{len} {msg} ({elapsed})")
            .expect("static template"),
    );
    loop {
        let attempted = shared.sum(|s| &s.attempted);
        let open = shared.sum(|s| &s.open);
        let errors = shared.sum(|s| &s.errors);
        bar.set_position(attempted);
        bar.set_message(format!("open {open}, failed {errors}"));
        if attempted >= total || shared.all_finished() {
            break;
        }
        thread::sleep(POLL);
    }
    bar.finish_and_clear();
}

/// Prints a line a second until every worker has returned.
pub(crate) fn watch(shared: &Shared) {
    let quiet = shared.cfg.quiet;
    let mut merged = new_histogram();
    let mut last_done = shared.sum(|s| &s.done);
    let mut last_line = Instant::now();
    while !shared.all_finished() {
        thread::sleep(POLL);
        if quiet || last_line.elapsed() < LINE_EVERY {
            continue;
        }
        let done = shared.sum(|s| &s.done);
        let interval = last_line.elapsed();
        last_line = Instant::now();
        #[expect(clippy::cast_precision_loss, reason = "display only")]
        let rate = (done - last_done) as f64 / interval.as_secs_f64();
        last_done = done;
        merged.reset();
        for slot in &shared.slots {
            let snapshot = slot.snapshot.lock().expect("snapshot lock poisoned");
            merged.add(&*snapshot).expect("histograms share bounds");
        }
        let p99 = if merged.is_empty() {
            "-".to_owned()
        } else {
            format_us(merged.value_at_quantile(0.99))
        };
        let open = shared.sum(|s| &s.open);
        let errors = shared.sum(|s| &s.errors);
        let Some(w) = shared.windows() else { continue };
        let now = Instant::now();
        let t = now.saturating_duration_since(w.go).as_secs();
        let phase = if now < w.measure_from {
            " (warmup)"
        } else {
            ""
        };
        let line = match shared.cfg.scenario {
            Scenario::Echo => format!("{rate:>9.0} msg/s  p99 {p99:>8}  open {open}"),
            Scenario::Connect => format!("{rate:>7.0} handshakes/s  p99 {p99:>8}"),
            Scenario::Close => format!("closed {done}  p99 {p99:>8}  open {open}"),
            Scenario::Idle => {
                let left = w.end.saturating_duration_since(now).as_secs_f64().ceil();
                format!("holding {open} open, {left}s left")
            }
        };
        eprintln!("[{t:>4}s] {line}  errors {errors}{phase}");
    }
}
