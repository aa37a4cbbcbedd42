//! `loadgen`: a thread-per-core io_uring WebSocket load generator whose latencies can be
//! trusted (open-loop with coordinated-omission correction, verified echoes, close-handshake
//! timing) and which stays out of the way of the server it measures.
//!
//! Rooms: [`cli`] and [`config`] (what to do), [`worker`] and [`io`] (threads and the
//! runtime), [`session`] (one connection's driver) and [`scenario`] (what each connection
//! does), [`frames`], [`upgrade`], [`closer`], [`payload`] and [`schedule`] (the protocol
//! and timing pieces), [`stats`], [`control`], [`progress`] and [`report`] (measuring and
//! telling).

mod cli;
mod closer;
mod config;
mod control;
mod duration;
mod errors;
mod fdlimit;
mod frames;
mod io;
mod machine;
mod payload;
mod progress;
mod report;
mod scenario;
mod schedule;
mod session;
mod stats;
mod target;
mod upgrade;
mod worker;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use clap::Parser as _;

use crate::cli::Args;
use crate::config::{Config, Scenario};
use crate::control::Shared;
use crate::fdlimit::FdLimit;
use crate::report::{Report, Timing};
use crate::stats::Recorder;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let args = Args::parse();
    let cfg = match Config::new(args, FdLimit::current().map(FdLimit::raised)) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("loadgen: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(note) = &cfg.limit_note {
        eprintln!("loadgen: {note}");
    }
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    if cfg.cores > cpus {
        eprintln!("loadgen: {} worker threads share {cpus} CPUs", cfg.cores);
    }

    let started_unix_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let launched = Instant::now();
    let shared = Arc::new(Shared::new(cfg));
    let workers = worker::spawn(&shared);
    if shared.cfg.scenario != Scenario::Connect {
        progress::ramp(&shared);
    }
    let windows = shared.start();
    progress::watch(&shared);

    let mut total = Recorder::default();
    let mut crashed = false;
    for worker in workers {
        match worker.join() {
            Ok(rec) => total.merge(&rec),
            Err(_) => crashed = true,
        }
    }
    let timing = Timing {
        started_unix_ms,
        ramp: windows.go - launched,
        run: windows.go.elapsed(),
    };
    let report = Report::new(&shared.cfg, &total, timing);
    print!("{}", report.text());

    // A run in which nothing could connect measured nothing, so --allow-errors does not apply.
    let refused = shared.all_refused();
    let mut failed = refused || crashed || (report.errors() > 0 && !shared.cfg.allow_errors);
    if refused {
        eprintln!(
            "loadgen: every connection to {} was refused: is the server listening there?",
            shared.cfg.target.addr
        );
    }
    if crashed {
        eprintln!("loadgen: a worker thread panicked; its measurements are missing");
    }
    if let Some(path) = &shared.cfg.json
        && let Err(e) = std::fs::write(path, report.json())
    {
        eprintln!("loadgen: cannot write {}: {e}", path.display());
        failed = true;
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
