//! The admin listener: `GET /metrics`, `GET /healthz`, `POST /reload`.
//!
//! It runs on plain std threads with blocking sockets, off the `io_uring` cores: scrapes and
//! reloads are rare and must never take time from relaying. One request per connection
//! (`Connection: close`). Each connection gets its own short-lived thread, at most
//! [`MAX_IN_FLIGHT`] at once, so a slow reload or a silent client does not hold up a health
//! check; past the cap the acceptor waits for a slot, leaving new connections in the
//! kernel's backlog. Reading and writing are bounded by timeouts, so a slot frees within
//! about [`TIMEOUT`] (plus however long a reload runs). Reloads run one at a time.
#![forbid(unsafe_code)]

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::metrics::{BackendRows, Metrics};

/// Time a client has to send its request head, and each write has to make progress.
const TIMEOUT: Duration = Duration::from_secs(2);
/// Largest request head; larger ones get 431.
const MAX_HEAD: usize = 8 * 1024;
/// Connections served at once.
const MAX_IN_FLIGHT: usize = 4;
/// Most bytes read (and discarded) after the response, waiting for the client to close.
const MAX_LINGER: usize = 64 * 1024;

/// Runs the gateway's reload; `Ok` and `Err` carry a message for the operator.
pub(crate) type Reload = dyn Fn() -> Result<String, String> + Send + Sync;

/// What the admin endpoints read and trigger.
#[derive(Clone)]
pub(crate) struct AdminState {
    /// Every core's counters.
    pub(crate) metrics: Arc<Metrics>,
    /// Lists the backends for the per-backend metrics.
    pub(crate) backends: Arc<BackendRows<'static>>,
    /// Called by `POST /reload`, on an admin thread.
    pub(crate) reload: Arc<Reload>,
    /// Set when the gateway drains: `/healthz` then answers 503 so load balancers move on.
    pub(crate) draining: Arc<AtomicBool>,
}

impl fmt::Debug for AdminState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdminState")
            .field("draining", &self.draining)
            .finish_non_exhaustive()
    }
}

/// Serves the admin endpoints on `listener` on a thread of its own, for the process lifetime.
pub(crate) fn spawn(listener: TcpListener, state: AdminState) -> io::Result<JoinHandle<()>> {
    spawn_with(listener, state, TIMEOUT)
}

fn spawn_with(
    listener: TcpListener,
    state: AdminState,
    timeout: Duration,
) -> io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("gateway-admin".to_owned())
        .spawn(move || {
            let shared = Arc::new(Shared {
                state,
                reloading: Mutex::new(()),
            });
            accept_loop(&listener, &shared, timeout);
        })
}

/// The state plus what the admin threads coordinate on.
struct Shared {
    state: AdminState,
    /// Held while the reload callback runs: two `POST /reload` never overlap.
    reloading: Mutex<()>,
}

/// Counts connections in flight; `acquire` blocks at the cap.
#[derive(Default)]
struct Slots {
    used: Mutex<usize>,
    freed: Condvar,
}

impl Slots {
    fn acquire(self: &Arc<Self>) -> Slot {
        let mut used = self.used.lock().unwrap_or_else(PoisonError::into_inner);
        while *used >= MAX_IN_FLIGHT {
            used = self
                .freed
                .wait(used)
                .unwrap_or_else(PoisonError::into_inner);
        }
        *used += 1;
        Slot(Arc::clone(self))
    }
}

/// A connection's place among the [`MAX_IN_FLIGHT`]; released on drop, even by a panic.
struct Slot(Arc<Slots>);

impl Drop for Slot {
    fn drop(&mut self) {
        *self.0.used.lock().unwrap_or_else(PoisonError::into_inner) -= 1;
        self.0.freed.notify_one();
    }
}

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>, timeout: Duration) {
    let slots = Arc::new(Slots::default());
    loop {
        // Take a slot before accepting, so that past the cap connections wait in the backlog.
        let slot = slots.acquire();
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) => {
                // EMFILE and the like: back off rather than spin.
                tracing::warn!(error = %e, "admin accept failed");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let shared = Arc::clone(shared);
        let spawned = std::thread::Builder::new()
            .name("gateway-admin-conn".to_owned())
            .spawn(move || {
                let _slot = slot;
                handle(stream, &shared, timeout);
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start an admin connection thread");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// An HTTP response to write.
struct Response {
    status: u16,
    content_type: &'static str,
    extra_header: Option<&'static str>,
    body: String,
}

impl Response {
    fn text(status: u16, body: impl Into<String>) -> Self {
        Self {
            status,
            content_type: "text/plain; charset=utf-8",
            extra_header: None,
            body: body.into(),
        }
    }

    fn write(&self, stream: &mut TcpStream, head_only: bool) -> io::Result<()> {
        let mut out = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n",
            self.status,
            reason(self.status),
            self.content_type,
            self.body.len()
        );
        if let Some(header) = self.extra_header {
            out.push_str(header);
            out.push_str("\r\n");
        }
        out.push_str("\r\n");
        if !head_only {
            out.push_str(&self.body);
        }
        stream.write_all(out.as_bytes())
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// Serves one connection: read the head, answer, close.
fn handle(mut stream: TcpStream, shared: &Shared, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    if stream.set_write_timeout(Some(timeout)).is_err() {
        return;
    }
    let (response, head_only) = match read_head(&mut stream, deadline) {
        Head::Request { method, path } => {
            let head_only = method == "HEAD";
            (route(&method, &path, shared), head_only)
        }
        Head::Invalid(status, why) => (Response::text(status, format!("{why}\n")), false),
        Head::Gone => return,
    };
    if response.write(&mut stream, head_only).is_ok() {
        linger(&mut stream, deadline);
    }
}

/// What the client sent.
enum Head {
    Request { method: String, path: String },
    Invalid(u16, &'static str),
    Gone,
}

/// Reads until a complete request head, within the deadline and [`MAX_HEAD`].
fn read_head(stream: &mut TcpStream, deadline: Instant) -> Head {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        // A per-read timeout alone would let a client trickle bytes forever.
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            return Head::Invalid(408, "request timeout");
        }
        match stream.read(&mut chunk) {
            Ok(0) => return Head::Gone,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Head::Invalid(408, "request timeout");
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return Head::Gone,
        }
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf) {
            Ok(httparse::Status::Complete(len)) if len <= MAX_HEAD => {
                return Head::Request {
                    method: req.method.unwrap_or_default().to_owned(),
                    path: req.path.unwrap_or_default().to_owned(),
                };
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => {}
            Ok(_) | Err(httparse::Error::TooManyHeaders) => {
                return Head::Invalid(431, "request head too large");
            }
            Err(_) => return Head::Invalid(400, "malformed request"),
        }
    }
}

fn route(method: &str, target: &str, shared: &Shared) -> Response {
    let state = &shared.state;
    let path = target.split_once('?').map_or(target, |(path, _)| path);
    let (allow, get) = match path {
        "/metrics" | "/healthz" => ("Allow: GET, HEAD", true),
        "/reload" => ("Allow: POST", false),
        _ => return Response::text(404, "not found\n"),
    };
    let allowed = if get {
        matches!(method, "GET" | "HEAD")
    } else {
        method == "POST"
    };
    if !allowed {
        let mut response = Response::text(405, "method not allowed\n");
        response.extra_header = Some(allow);
        return response;
    }
    match path {
        "/metrics" => {
            let mut body = String::with_capacity(16 * 1024);
            state.metrics.render(&mut body, &*state.backends);
            Response {
                status: 200,
                content_type: "text/plain; version=0.0.4; charset=utf-8",
                extra_header: None,
                body,
            }
        }
        "/healthz" if state.draining.load(Ordering::Relaxed) => Response::text(503, "draining\n"),
        "/healthz" => Response::text(200, "ok\n"),
        _ => match reload(shared) {
            Ok(message) => {
                tracing::info!(%message, "reload via admin");
                Response::text(200, with_newline(message))
            }
            Err(error) => {
                tracing::warn!(%error, "reload via admin failed");
                Response::text(500, with_newline(error))
            }
        },
    }
}

fn reload(shared: &Shared) -> Result<String, String> {
    let _one_at_a_time = shared
        .reloading
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    (shared.state.reload)()
}

fn with_newline(mut text: String) -> String {
    if !text.ends_with('\n') {
        text.push('\n');
    }
    text
}

/// Closes gracefully: FIN first, then reads what the client still sends (a request body we
/// ignored) until it closes, so the close does not turn into a reset that could destroy the
/// response before the client has read it. Bounded by the deadline and [`MAX_LINGER`].
fn linger(stream: &mut TcpStream, deadline: Instant) {
    if stream.shutdown(Shutdown::Write).is_err() {
        return;
    }
    let mut sink = [0u8; 4096];
    let mut total = 0;
    while total < MAX_LINGER {
        // At least a moment, even past the deadline: a well-behaved client closes at once.
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(100));
        if stream.set_read_timeout(Some(left)).is_err() {
            return;
        }
        match stream.read(&mut sink) {
            Ok(0) | Err(_) => return,
            Ok(n) => total += n,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::atomic::AtomicUsize;

    use super::*;
    use crate::metrics::BackendRow;

    fn start(timeout: Duration) -> (SocketAddr, Arc<AtomicBool>, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let draining = Arc::new(AtomicBool::new(false));
        let reloads = Arc::new(AtomicUsize::new(0));
        let metrics = Metrics::new(2);
        metrics.core(1).upgrade(101);
        let counter = Arc::clone(&reloads);
        let state = AdminState {
            metrics,
            backends: Arc::new(|emit: &mut dyn FnMut(BackendRow<'_>)| {
                emit(BackendRow {
                    pool: "default",
                    backend: "ws://127.0.0.1:9001",
                    healthy: true,
                    connect_failures: 3,
                });
            }),
            reload: Arc::new(move || {
                if counter.fetch_add(1, Ordering::Relaxed) == 0 {
                    Ok("reloaded 2 pools".to_owned())
                } else {
                    Err("config.toml: line 3: bad url".to_owned())
                }
            }),
            draining: Arc::clone(&draining),
        };
        if timeout == TIMEOUT {
            spawn(listener, state).unwrap();
        } else {
            spawn_with(listener, state, timeout).unwrap();
        }
        (addr, draining, reloads)
    }

    /// Sends `request`, reads to EOF; returns (status, head, body).
    fn exchange(addr: SocketAddr, request: &str) -> (u16, String, String) {
        let mut stream = TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        stream.write_all(request.as_bytes()).unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        let (head, body) = response.split_once("\r\n\r\n").unwrap();
        let status = head[9..12].parse().unwrap();
        (status, head.to_owned(), body.to_owned())
    }

    fn get(addr: SocketAddr, path: &str) -> (u16, String, String) {
        exchange(addr, &format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n"))
    }

    #[test]
    fn metrics_endpoint() {
        let (addr, _, _) = start(TIMEOUT);
        let (status, head, body) = get(addr, "/metrics");
        assert_eq!(status, 200);
        assert!(head.contains("\r\nContent-Type: text/plain; version=0.0.4"));
        assert!(head.contains("\r\nConnection: close"));
        assert!(head.contains(&format!("\r\nContent-Length: {}", body.len())));
        assert!(body.contains("# TYPE wsgate_upgrades_total counter\n"));
        assert!(body.contains("\nwsgate_upgrades_total{status=\"101\"} 1\n"));
        assert!(body.contains(
            "\nwsgate_backend_connect_failures_total{pool=\"default\",\
             backend=\"ws://127.0.0.1:9001\"} 3\n"
        ));
        // A query string is ignored; HEAD gets the head alone.
        assert_eq!(get(addr, "/metrics?x=1").0, 200);
        let (status, head, body) = exchange(addr, "HEAD /metrics HTTP/1.1\r\n\r\n");
        assert_eq!(status, 200);
        assert!(!head.contains("Content-Length: 0\r"));
        assert!(body.is_empty());
    }

    #[test]
    fn healthz_and_draining() {
        let (addr, draining, _) = start(TIMEOUT);
        let (status, _, body) = get(addr, "/healthz");
        assert_eq!((status, body.as_str()), (200, "ok\n"));
        draining.store(true, Ordering::Relaxed);
        let (status, _, body) = get(addr, "/healthz");
        assert_eq!((status, body.as_str()), (503, "draining\n"));
    }

    #[test]
    fn reload_ok_then_error() {
        let (addr, _, reloads) = start(TIMEOUT);
        let post = "POST /reload HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello";
        let (status, _, body) = exchange(addr, post);
        assert_eq!((status, body.as_str()), (200, "reloaded 2 pools\n"));
        let (status, _, body) = exchange(addr, post);
        assert_eq!(
            (status, body.as_str()),
            (500, "config.toml: line 3: bad url\n")
        );
        assert_eq!(reloads.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn unknown_paths_and_wrong_methods() {
        let (addr, _, reloads) = start(TIMEOUT);
        assert_eq!(get(addr, "/").0, 404);
        assert_eq!(get(addr, "/metricsx").0, 404);
        let (status, head, _) = get(addr, "/reload");
        assert_eq!(status, 405);
        assert!(head.contains("\r\nAllow: POST"), "{head}");
        let (status, head, _) = exchange(addr, "POST /metrics HTTP/1.1\r\n\r\n");
        assert_eq!(status, 405);
        assert!(head.contains("\r\nAllow: GET, HEAD"), "{head}");
        assert_eq!(exchange(addr, "DELETE /healthz HTTP/1.1\r\n\r\n").0, 405);
        assert_eq!(reloads.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn bad_and_oversized_heads() {
        let (addr, _, _) = start(TIMEOUT);
        assert_eq!(exchange(addr, "GET\0 / HTTP/1.1\r\n\r\n").0, 400);
        let big = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(MAX_HEAD));
        assert_eq!(exchange(addr, &big).0, 431);
    }

    #[test]
    fn silent_client_does_not_block_others() {
        let timeout = Duration::from_secs(1);
        let (addr, _, _) = start(timeout);
        let started = Instant::now();
        let mut silent = TcpStream::connect(addr).unwrap();
        // Served alongside the silent one, long before its deadline.
        assert_eq!(get(addr, "/healthz").0, 200);
        assert!(started.elapsed() < timeout, "{:?}", started.elapsed());
        // The silent client itself is answered 408 at its deadline.
        let mut response = String::new();
        silent.read_to_string(&mut response).unwrap();
        assert!(response.starts_with("HTTP/1.1 408 "), "{response}");
        assert!(started.elapsed() >= timeout);
    }

    #[test]
    fn full_slots_wait_at_most_one_timeout() {
        let timeout = Duration::from_millis(400);
        let (addr, _, _) = start(timeout);
        let started = Instant::now();
        let silent: Vec<_> = (0..MAX_IN_FLIGHT)
            .map(|_| TcpStream::connect(addr).unwrap())
            .collect();
        assert_eq!(get(addr, "/healthz").0, 200);
        // Past the cap it waits for the first silent client's deadline, and no longer.
        let waited = started.elapsed();
        assert!(waited >= timeout && waited < timeout * 4, "{waited:?}");
        drop(silent);
    }
}
