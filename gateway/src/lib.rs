//! `gateway`: a thread-per-core WebSocket reverse proxy that parses and validates every frame
//! it relays. A library so the simulation tests and `fuzz/` reach the sans-IO relay code; the
//! binary (`main.rs`) only calls [`main`].
// `unsafe` is denied crate-wide (workspace lints); the two `driver` backends alone opt out, per block.
#![deny(unsafe_code)]

// The architecture, by folder: `driver/` (the per-core event loop and its io_uring and epoll
// backends), `conn/` (a connection as a state machine, and the interface the loop drives it
// through), `upgrade/` (before the 101), `relay/` (after it), `upstream/` (reaching and choosing
// backends), `config/` (the file, the flags, reloads).
mod admin;
mod config;
mod conn;
mod driver;
mod metrics;
mod policy;
mod relay;
mod signals;
mod upgrade;
mod upstream;

/// Entry points for the fuzz targets in `fuzz/` (not an API).
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::conn::fuzzing::relay;
}

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::config::cli::Args;
use crate::config::reload::{Shared, Trigger};
use crate::config::{Config, LogFormat};

/// Listen backlog per core.
const BACKLOG: i32 = 4096;

/// Turns transparent huge pages off for this process. The allocator asks for them, so any
/// 2 MiB region a read buffer or a connection touched would become resident whole: idle
/// connections and the read pool would cost several times what they use. Memory per
/// connection is what a gateway holding many idle ones is sized by. Measured against the
/// build before: CPU per 20 B message the same within noise; about 0.4 more minor page
/// faults per connection under connection churn, with no change in CPU.
fn no_huge_pages() {
    if let Err(e) = rustix::thread::disable_transparent_huge_pages(true) {
        tracing::debug!(why = %e, "transparent huge pages stay on");
    }
}

/// The `gateway` binary: parses the command line, runs until drained, and says how it ended.
#[must_use]
pub fn main() -> ExitCode {
    let args = Args::parse_checked();
    if let Some(path) = &args.check_config {
        return match Config::load(path) {
            Ok(config) => {
                println!(
                    "{}: ok ({} listeners, {} routes, {} upstreams)",
                    path.display(),
                    config.listeners.len(),
                    config.routes.len(),
                    config.pools.len()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        };
    }
    let loaded = match &args.config {
        Some(path) => Config::load(path).map_err(|e| e.to_string()),
        None => args.shorthand_config().map_err(|e| e.to_string()),
    };
    let config = match loaded.and_then(|config| check_cores(&args, config)) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("gateway: {e}");
            return ExitCode::from(2);
        }
    };
    let _flush_logs = init_logs(config.server.log_format);
    no_huge_pages();
    match run(&args, config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("gateway: {message}");
            ExitCode::from(2)
        }
    }
}

/// Refuses more workers than this process may run on, naming the setting. Checked at startup
/// rather than by the validator, so that `--check-config` can vet a file for another machine.
fn check_cores(args: &Args, config: Config) -> Result<Config, String> {
    let available = core_affinity::get_core_ids().map_or(1, |ids| ids.len().max(1));
    match config.server.cores {
        Some(n) if n > available => {
            let field = match &args.config {
                Some(path) => format!("{}: server.cores", path.display()),
                None => "--cores".to_owned(),
            };
            Err(format!(
                "{field}: {n} must be at most {available}, the cores this machine has available"
            ))
        }
        _ => Ok(config),
    }
}

/// Log lines queued for stderr before new ones are dropped: a slow
/// terminal or a full pipe must never stall a data-plane thread.
const LOG_QUEUE_LINES: usize = 64 * 1024;

/// Logs go through a queue to a writer thread, so a data-plane thread never blocks on stderr.
/// The returned guard flushes what is queued when `main` returns.
fn init_logs(format: LogFormat) -> tracing_appender::non_blocking::WorkerGuard {
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(LOG_QUEUE_LINES)
        .thread_name("gateway-log")
        .finish(std::io::stderr());
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_writer(writer)
        .with_env_filter(filter);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
    guard
}

fn run(args: &Args, config: Config) -> Result<(), String> {
    let core_ids = core_affinity::get_core_ids().unwrap_or_default();
    let available = core_ids.len().max(1);
    let cores = config.server.cores.unwrap_or(available);
    if cores == 0 || cores > available {
        return Err(format!(
            "cores = {cores}: this machine has {available} core(s) available"
        ));
    }
    let backend = choose_backend(config.server.io_backend)?;
    // Take the signals before anything starts, so an early SIGTERM drains instead of killing.
    let signals =
        signals::Signals::new().map_err(|e| format!("cannot install signal handlers: {e}"))?;
    let listeners = bind(&config.listeners, cores)?;
    let bound: Vec<String> = listeners[0]
        .iter()
        .map(|l| l.local_addr().map(|a| a.to_string()).unwrap_or_default())
        .collect();
    let drain_timeout = config.server.drain_timeout;
    let read_buffers = config.server.read_buffers;
    let read_cap = config.global_limits.write_buffer;
    let park_reads_after = config.server.park_reads_after;
    let reserve = per_core_reserve(config.global_limits.max_connections, cores);
    let admin_addr = config.server.admin;
    let upstreams: Vec<String> = config.pools.iter().map(|p| p.name.clone()).collect();
    let echo = config.pools.is_empty();
    let backends: Vec<String> = config
        .pools
        .iter()
        .flat_map(|p| p.backends.iter().map(ToString::to_string))
        .collect();
    let shared = Shared::new(config, args.config.clone(), cores);
    if let Some(addr) = admin_addr {
        start_admin(addr, &shared)?;
    }
    let mut drains = Vec::with_capacity(cores);
    let mut workers = Vec::with_capacity(cores);
    let mut setups = Vec::with_capacity(cores);
    for (index, listeners) in listeners.into_iter().enumerate() {
        let (drain, receiver) = driver::event_loop::drain_channel()
            .map_err(|e| format!("cannot make a drain channel: {e}"))?;
        drains.push(drain);
        let args = driver::event_loop::LoopArgs {
            index,
            listeners,
            shared: Arc::clone(&shared),
            drain: receiver,
            drain_timeout,
            park_reads_after,
            reserve,
        };
        let core = core_ids.get(index).copied();
        let (setup_tx, setup_rx) = std::sync::mpsc::channel();
        setups.push(setup_rx);
        let worker = std::thread::Builder::new()
            .name(format!("gateway-core-{index}"))
            .spawn(move || {
                if let Some(core) = core {
                    core_affinity::set_for_current(core);
                }
                serve_core(backend, (read_buffers, read_cap), args, &setup_tx);
            })
            .map_err(|e| format!("cannot start worker thread: {e}"))?;
        workers.push(worker);
    }
    // Each core sets its ring up on its own thread (io_uring's single-issuer mode wants the
    // thread that submits to be the one that made the ring); any failure stops the start.
    let setup = setups.into_iter().try_fold(("", "", ""), |_, rx| {
        rx.recv()
            .map_err(|_| "a worker thread died during setup".to_owned())?
    })?;
    let admin = admin_addr.map_or_else(|| "off".to_owned(), |a| a.to_string());
    tracing::info!(
        listen = %bound.join(","),
        cores,
        backends = %backends.join(","),
        upstreams = %upstreams.join(","),
        admin = %admin,
        nofile_limit = driver::event_loop::nofile_limit(),
        io_backend = setup.0,
        io_setup = setup.1,
        io_reads = setup.2,
        "gateway listening"
    );
    if echo {
        tracing::info!("no backend configured: serving the embedded echo upstream");
    }
    // `reload` logs its outcome itself, one line whichever way it was asked for.
    let code = signals.wait(&|| drop(shared.reload(Trigger::Signal)));
    shared.draining.store(true, Ordering::Relaxed);
    tracing::info!(
        close_code = code.get(),
        drain_timeout_ms = u64::try_from(drain_timeout.as_millis()).unwrap_or(u64::MAX),
        "draining"
    );
    // Workers exit once their connections are closed or the drain timeout passes.
    for drain in &drains {
        drain.send(code);
    }
    for worker in workers {
        worker
            .join()
            .map_err(|_| "a worker thread panicked".to_owned())?;
    }
    tracing::info!("drained, exiting");
    Ok(())
}

/// io_uring ring entries per core: submissions queued per loop turn before an early submit.
const RING_ENTRIES: u32 = 1024;

/// The backend every core will run.
#[derive(Clone, Copy, Debug)]
enum Chosen {
    Uring,
    Epoll,
}

/// Overrides `auto` (and only `auto`): lets a container's environment, or a test run, pick the
/// backend of every gateway it starts without editing a file or a command line.
const IO_BACKEND_ENV: &str = "WSGATE_IO_BACKEND";

/// `single` makes io_uring serve each read with a read of its own instead of one multishot
/// read per socket, as on kernels before 6.7: for comparisons, and to keep that path tested.
const URING_READS_ENV: &str = "WSGATE_URING_READS";

/// Decides the backend from the setting: `auto` takes io_uring when a ring can be set up, and
/// says on one line why it serves on epoll when not.
fn choose_backend(mut setting: driver::IoBackend) -> Result<Chosen, String> {
    if setting == driver::IoBackend::Auto
        && let Ok(name) = std::env::var(IO_BACKEND_ENV)
    {
        setting = driver::IoBackend::parse(&name).ok_or_else(|| {
            format!("{IO_BACKEND_ENV}={name:?} must be \"auto\", \"uring\" or \"epoll\"")
        })?;
    }
    let why = |e: &std::io::Error| {
        format!(
            "io_uring is unavailable: {e} (denied by a container's seccomp profile or by \
             kernel.io_uring_disabled, or a kernel older than 5.19; see Troubleshooting in the \
             README)"
        )
    };
    match setting {
        driver::IoBackend::Epoll => Ok(Chosen::Epoll),
        driver::IoBackend::Uring => driver::uring::probe()
            .map(|()| Chosen::Uring)
            .map_err(|e| format!("{} and io_backend = \"uring\" was asked for", why(&e))),
        driver::IoBackend::Auto => match driver::uring::probe() {
            Ok(()) => Ok(Chosen::Uring),
            Err(e) => {
                tracing::warn!(io_backend = "epoll", why = why(&e), "serving on epoll");
                Ok(Chosen::Epoll)
            }
        },
    }
}

/// Runs one core's loop on the chosen backend, with `(server.read_buffers,
/// limits.write_buffer)` (the most bytes one read takes); reports the backend's setup (or why
/// it could not be set up) on `setup` before serving.
fn serve_core(
    backend: Chosen,
    (read_buffers, read_cap): (u16, usize),
    args: driver::event_loop::LoopArgs,
    setup: &std::sync::mpsc::Sender<Result<(&'static str, &'static str, &'static str), String>>,
) {
    use driver::Backend as _;
    use driver::event_loop::EventLoop;
    let ring = || driver::uring::Uring::with_read_cap(RING_ENTRIES, read_buffers, read_cap);
    match backend {
        Chosen::Uring => match ring() {
            Ok(ring) => {
                let single = std::env::var(URING_READS_ENV).is_ok_and(|v| v == "single");
                let ring = if single { ring.single_shot() } else { ring };
                let reads = if ring.multishot() {
                    "multishot"
                } else {
                    "single"
                };
                drop(setup.send(Ok((ring.name(), ring.setup(), reads))));
                EventLoop::new(ring, args).run();
            }
            Err(e) => drop(setup.send(Err(format!("cannot set up io_uring: {e}")))),
        },
        Chosen::Epoll => match driver::epoll::Epoll::with_pool(usize::from(read_buffers)) {
            Ok(epoll) => {
                drop(setup.send(Ok((epoll.name(), "edge-triggered", "single"))));
                // A read waiting on epoll is only its socket's registration: nothing to park.
                let args = driver::event_loop::LoopArgs {
                    park_reads_after: None,
                    ..args
                };
                EventLoop::new(epoll, args).run();
            }
            Err(e) => drop(setup.send(Err(format!("cannot set up epoll: {e}")))),
        },
    }
}

/// How many connections each core's loop reserves room for: its share of what the process can
/// hold (`limits.max_connections`, and the descriptor limit, a descriptor or two each), at most
/// [`MAX_RESERVE`].
fn per_core_reserve(max_connections: usize, cores: usize) -> usize {
    let descriptors = driver::event_loop::nofile_limit()
        .parse::<usize>()
        .unwrap_or(usize::MAX);
    max_connections
        .min(descriptors)
        .div_ceil(cores.max(1))
        .min(MAX_RESERVE)
}

/// The most connections a core reserves room for up front (68 MiB of address space): a
/// configured limit far above what one core serves must not become one huge allocation.
const MAX_RESERVE: usize = 1 << 20;

/// Binds every listener once per core, up front, so errors surface before anything starts
/// and a `:0` port resolves once for all cores.
fn bind(
    addrs: &[std::net::SocketAddr],
    cores: usize,
) -> Result<Vec<Vec<std::net::TcpListener>>, String> {
    let mut per_core: Vec<Vec<std::net::TcpListener>> = (0..cores).map(|_| Vec::new()).collect();
    for &addr in addrs {
        let first = driver::bind_reuseport(addr, BACKLOG)
            .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
        let resolved = first.local_addr().map_err(|e| e.to_string())?;
        per_core[0].push(first);
        for listeners in &mut per_core[1..] {
            listeners.push(
                driver::bind_reuseport(resolved, BACKLOG)
                    .map_err(|e| format!("cannot listen on {resolved}: {e}"))?,
            );
        }
    }
    Ok(per_core)
}

fn start_admin(addr: std::net::SocketAddr, shared: &Arc<Shared>) -> Result<(), String> {
    let listener = std::net::TcpListener::bind(addr)
        .map_err(|e| format!("cannot listen on admin address {addr}: {e}"))?;
    let rows = Arc::clone(shared);
    let reload = Arc::clone(shared);
    let state = admin::AdminState {
        metrics: Arc::clone(&shared.metrics),
        backends: Arc::new(move |row: &mut dyn FnMut(metrics::BackendRow<'_>)| {
            rows.backend_rows(row);
        }),
        reload: Arc::new(move || reload.reload(Trigger::Admin)),
        draining: Arc::clone(&shared.draining),
        // [server] is fixed at start (a reload keeps it), so the token is too.
        token: shared.current().config.server.admin_token.clone(),
    };
    admin::spawn(listener, state).map_err(|e| format!("cannot start the admin thread: {e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn each_core_reserves_its_share_of_what_the_process_can_hold() {
        let descriptors: usize = crate::driver::event_loop::nofile_limit()
            .parse()
            .unwrap_or(usize::MAX);
        let few = descriptors.min(1_000);
        assert_eq!(super::per_core_reserve(few, 4), few.div_ceil(4));
        assert_eq!(super::per_core_reserve(few, 1), few);
        // The descriptor limit binds when it is lower than max_connections, and the cap when
        // both are far above it.
        let most = super::per_core_reserve(usize::MAX, 2);
        assert!(most <= descriptors.div_ceil(2) && most <= super::MAX_RESERVE);
    }
}
