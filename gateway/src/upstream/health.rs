//! Active health checks: every `health_interval`, each backend of a pool that asks for it gets a
//! WebSocket upgrade probe; a backend that does not answer 101 in time is left out of
//! [`PoolState::candidates`] until a probe passes again.
//!
//! Probes run on their own std thread with blocking sockets and timeouts: a few requests per
//! second are no hot path, and keeping them off the io_uring cores means a slow backend can
//! never delay a client's connection.
#![forbid(unsafe_code)]

use std::io::{ErrorKind, Read as _, Write as _};
use std::net::{Shutdown, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use codec::CloseCode;
use codec::close::{MAX_CONTROL_PAYLOAD, write_close};
use codec::frame::{OpCode, write_frame};
use codec::handshake::{ClientHandshake, HeadLimits, ServerResponse};

use crate::config::{BackendUrl, HealthCheck, Pool};
use crate::metrics::BackendStats;
use crate::upstream::balance::PoolState;

/// The longest the thread sleeps before looking at `stop` again.
const STOP_POLL: Duration = Duration::from_millis(50);

/// A floor under `interval`, so a zero from a careless config cannot make a busy loop.
const MIN_INTERVAL: Duration = Duration::from_millis(10);

/// Probes in flight at once: one thread each, so a pool of hundreds of backends is probed in
/// batches rather than with hundreds of threads.
const MAX_PARALLEL: usize = 16;

/// How long a passed probe waits for the backend's answering close before hanging up.
const CLOSE_LINGER: Duration = Duration::from_millis(100);

/// A pool to probe, with the state the verdicts go to.
pub(crate) struct Probed {
    /// Where verdicts take backends out of rotation and back.
    pub(crate) state: Arc<PoolState>,
    /// The pool as configured (its `health` says whether and how to probe).
    pub(crate) pool: Pool,
    /// One per backend, in `pool.backends` order: counts the failed probes.
    pub(crate) stats: Vec<Arc<BackendStats>>,
}

/// One pool with a health check, and what the thread remembers about it.
struct Checked {
    state: Arc<PoolState>,
    pool: Pool,
    stats: Vec<Arc<BackendStats>>,
    /// When the next round of probes starts.
    due: Instant,
    /// The last verdict per backend, to log only transitions.
    healthy: Vec<bool>,
}

/// Starts the probe thread for the pools that have a health check; `None` if none has (or the
/// thread could not start, which is logged: the gateway still works, on passive ejection only).
///
/// The thread returns within about a probe timeout after `stop` is set: a probe in flight is
/// bounded by its pool's `health.timeout`, and sleeps are cut into short steps.
pub(crate) fn spawn(pools: Vec<Probed>, stop: Arc<AtomicBool>) -> Option<JoinHandle<()>> {
    let now = Instant::now();
    let checked: Vec<Checked> = pools
        .into_iter()
        .filter(|probed| probed.pool.health.is_some())
        .map(|Probed { state, pool, stats }| Checked {
            healthy: vec![true; pool.backends.len()],
            state,
            pool,
            stats,
            due: now,
        })
        .collect();
    if checked.is_empty() {
        return None;
    }
    std::thread::Builder::new()
        .name("gateway-health".to_owned())
        .spawn(move || run(checked, &stop))
        .map_err(|e| tracing::error!(why = %e, "cannot start the health check thread"))
        .ok()
}

fn run(mut pools: Vec<Checked>, stop: &AtomicBool) {
    while !stop.load(Relaxed) {
        for checked in &mut pools {
            let Some(check) = &checked.pool.health else {
                continue;
            };
            if checked.due > Instant::now() {
                continue;
            }
            let interval = check.interval.max(MIN_INTERVAL);
            probe_pool(checked, stop);
            // Start to start, without a burst of catch-up rounds after a slow one.
            checked.due = (checked.due + interval).max(Instant::now());
        }
        let Some(next) = pools.iter().map(|c| c.due).min() else {
            return;
        };
        while !stop.load(Relaxed) {
            let left = next.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            std::thread::sleep(left.min(STOP_POLL));
        }
    }
}

/// Probes every backend of one pool (in parallel batches) and applies the verdicts.
fn probe_pool(checked: &mut Checked, stop: &AtomicBool) {
    let Some(check) = &checked.pool.health else {
        return;
    };
    let mut verdicts = Vec::with_capacity(checked.pool.backends.len());
    for chunk in checked.pool.backends.chunks(MAX_PARALLEL) {
        if stop.load(Relaxed) {
            break;
        }
        std::thread::scope(|s| {
            let handles: Vec<_> = chunk
                .iter()
                .map(|backend| {
                    std::thread::Builder::new()
                        .name("gateway-probe".to_owned())
                        .spawn_scoped(s, || probe(backend, check))
                })
                .collect();
            for (handle, backend) in handles.into_iter().zip(chunk) {
                verdicts.push(match handle {
                    Ok(h) => h
                        .join()
                        .unwrap_or_else(|_| Err("probe panicked".to_owned())),
                    // No thread to spare: probe inline rather than skip the backend.
                    Err(_) => probe(backend, check),
                });
            }
        });
    }
    for (index, verdict) in verdicts.into_iter().enumerate() {
        apply(checked, index, verdict);
    }
}

/// Records one verdict (and counts a failure) and logs it if it changed the backend's
/// standing.
fn apply(checked: &mut Checked, index: usize, verdict: Result<(), String>) {
    let healthy = verdict.is_ok();
    checked.state.set_probe_result(index, healthy);
    if !healthy && let Some(stats) = checked.stats.get(index) {
        stats.probe_failure();
    }
    if std::mem::replace(&mut checked.healthy[index], healthy) == healthy {
        return;
    }
    let upstream = checked.pool.name.as_str();
    let backend = checked.pool.backends[index].to_string();
    match verdict {
        Ok(()) => tracing::info!(
            upstream,
            backend,
            healthy,
            "health probe passed: backend is back"
        ),
        Err(why) => tracing::warn!(
            upstream,
            backend,
            healthy,
            why,
            "health probe failed: backend taken out of rotation"
        ),
    }
}

/// One upgrade probe: connect, `GET {path_prefix}{path}`, and expect a valid 101 within
/// `check.timeout` in all. The backend's path prefix applies as it does to clients' requests,
/// so the probe reaches the application the clients reach. A passed probe closes politely
/// (1001) so the backend does not log an abnormal closure every interval.
fn probe(backend: &BackendUrl, check: &HealthCheck) -> Result<(), String> {
    let deadline = Instant::now() + check.timeout;
    let mut stream = TcpStream::connect_timeout(&backend.addr, check.timeout)
        .map_err(|e| format!("connect: {e}"))?;
    drop(stream.set_nodelay(true));
    let mut hs = ClientHandshake::new();
    let mut buf = Vec::with_capacity(512);
    let target = format!("{}{}", backend.path_prefix, check.path);
    hs.write_request(
        &mut buf,
        &backend.authority,
        &target,
        None,
        None,
        &[("User-Agent", b"wsgate-health")],
    );
    stream
        .set_write_timeout(Some(left(deadline)?))
        .and_then(|()| stream.write_all(&buf))
        .map_err(|e| format!("sending the upgrade: {}", io_reason(&e)))?;
    buf.clear();
    let limits = HeadLimits::default();
    let mut chunk = [0; 1024];
    loop {
        let n = stream
            .set_read_timeout(Some(left(deadline)?))
            .and_then(|()| stream.read(&mut chunk))
            .map_err(|e| format!("reading the answer: {}", io_reason(&e)))?;
        if n == 0 {
            return Err("closed before answering".to_owned());
        }
        buf.extend_from_slice(&chunk[..n]);
        match hs.parse_response(&buf, &limits) {
            Ok(None) => {}
            Ok(Some((ServerResponse::Upgraded { .. }, _))) => break,
            Ok(Some((ServerResponse::Rejected { status }, _))) => {
                return Err(format!("answered {status} instead of 101"));
            }
            Err(e) => return Err(e.as_str().to_owned()),
        }
    }
    close_politely(&mut stream);
    Ok(())
}

/// Sends a masked close 1001, then waits briefly for the backend's close and hang-up, so it
/// sees an orderly closure; errors no longer matter, the verdict is in.
fn close_politely(stream: &mut TcpStream) {
    let mut payload = [0; MAX_CONTROL_PAYLOAD];
    let len = write_close(&mut payload, CloseCode::GOING_AWAY, "");
    let mut frame = Vec::with_capacity(16);
    write_frame(
        &mut frame,
        true,
        OpCode::Close,
        Some(rand::random()),
        &payload[..len],
    );
    if stream.write_all(&frame).is_err() {
        return;
    }
    drop(stream.shutdown(Shutdown::Write));
    let until = Instant::now() + CLOSE_LINGER;
    let mut sink = [0; 256];
    while let Ok(left) = left(until)
        && stream.set_read_timeout(Some(left)).is_ok()
        && matches!(stream.read(&mut sink), Ok(1..))
    {}
}

/// Time left before `deadline`, or the timeout verdict (a zero timeout would mean "block").
fn left(deadline: Instant) -> Result<Duration, String> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        Err("timed out".to_owned())
    } else {
        Ok(left)
    }
}

/// Blocking socket timeouts surface as `WouldBlock` on Unix; say what they mean.
fn io_reason(e: &std::io::Error) -> String {
    match e.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => "timed out".to_owned(),
        _ => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;
    use std::sync::atomic::AtomicU16;
    use std::sync::mpsc;

    use codec::handshake::accept_key;

    use super::*;
    use crate::config::Balance;

    /// A blocking backend on its own thread: answers every request with the current `status`
    /// (101 done properly, 0 = never answer), and reports each request head and, after a 101,
    /// the first bytes the client sent.
    struct FakeBackend {
        url: BackendUrl,
        status: Arc<AtomicU16>,
        seen: mpsc::Receiver<(String, Vec<u8>)>,
    }

    impl FakeBackend {
        fn start(status: u16) -> Self {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let url = format!("ws://{}/app", listener.local_addr().unwrap())
                .parse()
                .unwrap();
            let status = Arc::new(AtomicU16::new(status));
            let (tx, seen) = mpsc::channel();
            let shared = Arc::clone(&status);
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    let Ok(stream) = stream else { return };
                    let (tx, status) = (tx.clone(), shared.load(Relaxed));
                    std::thread::spawn(move || serve(stream, status, &tx));
                }
            });
            Self { url, status, seen }
        }

        fn next(&self) -> (String, Vec<u8>) {
            self.seen.recv_timeout(Duration::from_secs(5)).unwrap()
        }
    }

    fn serve(mut stream: TcpStream, status: u16, tx: &mpsc::Sender<(String, Vec<u8>)>) {
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut buf = Vec::new();
        let mut chunk = [0; 1024];
        let end = loop {
            if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            match stream.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        let after = match status {
            0 => {
                std::thread::sleep(Duration::from_secs(2));
                Vec::new()
            }
            101 => {
                let key = head
                    .lines()
                    .find_map(|l| l.strip_prefix("Sec-WebSocket-Key: "))
                    .unwrap_or_default();
                let answer = format!(
                    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
                     Connection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
                    accept_key(key.as_bytes())
                );
                stream.write_all(answer.as_bytes()).unwrap();
                let mut rest = buf[end..].to_vec();
                while rest.len() < 8 {
                    match stream.read(&mut chunk) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => rest.extend_from_slice(&chunk[..n]),
                    }
                }
                rest
            }
            _ => {
                let answer = format!("HTTP/1.1 {status} Nope\r\nContent-Length: 0\r\n\r\n");
                drop(stream.write_all(answer.as_bytes()));
                Vec::new()
            }
        };
        drop(tx.send((head, after)));
    }

    fn check(timeout_ms: u64) -> HealthCheck {
        HealthCheck {
            interval: Duration::from_millis(50),
            path: "/health".to_owned(),
            timeout: Duration::from_millis(timeout_ms),
        }
    }

    fn pool(backends: Vec<BackendUrl>, health: Option<HealthCheck>) -> Pool {
        Pool {
            name: "probed".to_owned(),
            backends,
            balance: Balance::RoundRobin,
            eject_after: 0,
            eject_for: Duration::ZERO,
            health,
        }
    }

    #[test]
    fn a_101_passes_and_the_probe_closes_with_1001() {
        let backend = FakeBackend::start(101);
        assert_eq!(probe(&backend.url, &check(2000)), Ok(()));
        let (head, after) = backend.next();
        assert!(head.starts_with("GET /app/health HTTP/1.1\r\n"), "{head}");
        assert!(head.contains(&format!("\r\nHost: {}\r\n", backend.url.authority)));
        assert!(head.contains("\r\nUser-Agent: wsgate-health\r\n"), "{head}");
        // A masked close frame carrying 1001.
        assert_eq!(after.len(), 8, "{after:?}");
        assert_eq!(after[..2], [0x88, 0x82]);
        let code = [after[6] ^ after[2], after[7] ^ after[3]];
        assert_eq!(u16::from_be_bytes(code), 1001);
    }

    #[test]
    fn other_answers_silence_and_refusals_fail() {
        let backend = FakeBackend::start(503);
        let err = probe(&backend.url, &check(2000)).unwrap_err();
        assert!(err.contains("503"), "{err}");

        backend.status.store(0, Relaxed);
        let started = Instant::now();
        let err = probe(&backend.url, &check(200)).unwrap_err();
        assert!(err.contains("timed out"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(1));

        let closed = TcpListener::bind("127.0.0.1:0").unwrap();
        let url: BackendUrl = format!("ws://{}", closed.local_addr().unwrap())
            .parse()
            .unwrap();
        drop(closed);
        assert!(probe(&url, &check(200)).unwrap_err().starts_with("connect"));
    }

    #[test]
    fn no_health_check_means_no_thread() {
        let url: BackendUrl = "ws://127.0.0.1:9".parse().unwrap();
        let pools = vec![Probed {
            state: PoolState::new(1),
            pool: pool(vec![url], None),
            stats: vec![Arc::default()],
        }];
        assert!(spawn(pools, Arc::new(AtomicBool::new(false))).is_none());
        assert!(spawn(Vec::new(), Arc::new(AtomicBool::new(false))).is_none());
    }

    #[test]
    fn probes_take_a_backend_out_and_bring_it_back_then_stop() {
        let good = FakeBackend::start(101);
        let flaky = FakeBackend::start(101);
        let state = PoolState::new(2);
        let counters: Vec<Arc<BackendStats>> = vec![Arc::default(), Arc::default()];
        let pools = vec![Probed {
            state: Arc::clone(&state),
            pool: pool(vec![good.url.clone(), flaky.url.clone()], Some(check(500))),
            stats: counters.clone(),
        }];
        let stop = Arc::new(AtomicBool::new(false));
        let thread = spawn(pools, Arc::clone(&stop)).expect("a thread");
        let wait_for = |what: &str, cond: &dyn Fn() -> bool| {
            let until = Instant::now() + Duration::from_secs(5);
            while !cond() {
                assert!(Instant::now() < until, "timed out waiting for {what}");
                std::thread::sleep(Duration::from_millis(5));
            }
        };
        flaky.next();
        assert!(state.is_available(1));

        flaky.status.store(503, Relaxed);
        wait_for("the failing backend to be taken out", &|| {
            !state.is_available(1)
        });
        assert!(state.is_available(0));
        flaky.status.store(101, Relaxed);
        wait_for("the backend to come back", &|| state.is_available(1));
        // Each failed probe is counted against its backend, and only there.
        assert!(counters[1].row("p", "b").probe_failures >= 1);
        assert_eq!(counters[0].row("p", "b").probe_failures, 0);

        stop.store(true, Relaxed);
        let stopping = Instant::now();
        thread.join().unwrap();
        assert!(stopping.elapsed() < Duration::from_secs(1));
        // The fakes outlive the thread.
        drop((good, flaky));
    }
}
