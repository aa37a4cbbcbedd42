//! `gateway`: a thread-per-core io_uring WebSocket reverse proxy that parses and validates
//! every frame it relays.
#![forbid(unsafe_code)]

mod admin;
mod balance;
mod cli;
mod config;
mod connection;
mod drain;
mod echo;
mod forward;
mod health;
mod keepalive;
mod leg;
mod lifecycle;
mod metrics;
mod relay;
mod signals;
mod upstream;
mod uring;
mod worker;

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;

use crate::cli::Args;
use crate::config::Config;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Listen backlog per core.
const BACKLOG: i32 = 4096;

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("gateway: {message}");
            ExitCode::from(2)
        }
    }
}

fn run(args: &Args) -> Result<(), String> {
    let core_ids = core_affinity::get_core_ids().unwrap_or_default();
    let available = core_ids.len().max(1);
    let cores = args.cores.unwrap_or(available);
    if cores == 0 || cores > available {
        return Err(format!(
            "--cores {cores}: this machine has {available} core(s) available"
        ));
    }
    // Take the signals before anything starts, so an early SIGTERM drains instead of killing.
    let signals =
        signals::Signals::new().map_err(|e| format!("cannot install signal handlers: {e}"))?;
    // Bind every core's listener up front, so errors surface before anything starts and a
    // `:0` port resolves once for all cores.
    let first = uring::bind_reuseport(args.listen, BACKLOG)
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    let addr = first.local_addr().map_err(|e| e.to_string())?;
    let mut listeners = vec![first];
    for _ in 1..cores {
        listeners.push(
            uring::bind_reuseport(addr, BACKLOG)
                .map_err(|e| format!("cannot listen on {addr}: {e}"))?,
        );
    }
    let backends: Vec<String> = args.backends.iter().map(ToString::to_string).collect();
    tracing::info!(listen = %addr, cores, backends = ?backends, "gateway listening");
    if backends.is_empty() {
        tracing::info!("no --backend given: serving the embedded echo upstream");
    }
    let config = Arc::new(Config::from_args(args));
    let settings = relay::Settings {
        close_timeout: args.close_timeout,
        keepalive: keepalive::Keepalive {
            ping_interval: args.ping_interval,
            pong_timeout: args.pong_timeout,
            idle: args.idle_timeout,
        },
        buffer: args.write_buffer.max(relay::MIN_READ),
    };
    let (phase, phase_rx) = tokio::sync::watch::channel(drain::Phase::Running);
    let workers: Vec<_> = listeners
        .into_iter()
        .enumerate()
        .map(|(index, listener)| {
            let worker = worker::WorkerArgs {
                index,
                listener,
                config: Arc::clone(&config),
                settings,
                phase: phase_rx.clone(),
                drain_timeout: args.drain_timeout,
            };
            let core = core_ids.get(index).copied();
            std::thread::Builder::new()
                .name(format!("gateway-core-{index}"))
                .spawn(move || {
                    if let Some(core) = core {
                        core_affinity::set_for_current(core);
                    }
                    worker::run(worker);
                })
                .map_err(|e| format!("cannot start worker thread: {e}"))
        })
        .collect::<Result<_, _>>()?;
    let code = signals.wait(&|| tracing::warn!("SIGHUP: reload needs --config; nothing to reload"));
    tracing::info!(close_code = code.get(), drain_timeout = ?args.drain_timeout, "draining");
    // Workers exit once their connections are closed or the drain timeout passes.
    phase.send_replace(drain::Phase::Draining(code));
    for worker in workers {
        worker
            .join()
            .map_err(|_| "a worker thread panicked".to_owned())?;
    }
    tracing::info!("drained, exiting");
    Ok(())
}
