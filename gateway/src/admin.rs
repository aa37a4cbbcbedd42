//! The admin listener: `GET /metrics`, `GET /healthz`, `POST /reload`.
//!
//! It runs on plain std threads with blocking sockets, off the `io_uring` cores: scrapes and
//! reloads are rare and must never take time from relaying. One request per connection
//! (`Connection: close`). Each connection gets its own short-lived thread, so a slow reload or
//! a silent client never holds up a health check. At most [`MAX_IN_FLIGHT`] are served at
//! once; past that a connection gets 503 at once rather than waiting. A client has
//! [`TIMEOUT`] to send its request head (then 408), and each write must progress within it,
//! so a silent client frees its place within about that long. Reloads run one at a time.
//!
//! The listener is for machines (Prometheus, probes, `curl`), never for browsers:
//!
//! - A request carrying `Origin` is refused with 403: browsers send it with every cross-site
//!   `POST`, so a web page cannot make a visitor's browser post `/reload`.
//! - `/metrics` and `/reload` answer only a `Host` that is this listener's own address as the
//!   client reached it (`ip:port`), `localhost:port`, or no `Host` at all; any other name gets
//!   403. This defeats DNS rebinding, where a page's own host name is re-pointed at the
//!   admin address so the browser treats the admin plane as same-origin. Scrape by address.
//! - With `admin_token` configured they also require `Authorization: Bearer TOKEN` (401 and
//!   `WWW-Authenticate` otherwise); the token is compared in constant time.
//! - `/healthz` stays open to every prober: no token, any `Host` (it tells nothing but
//!   "ok" or "draining").
#![forbid(unsafe_code)]

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::config::reload::ReloadError;
use crate::metrics::{BackendRows, Metrics};

/// Time a client has to send its request head, and each write has to make progress.
const TIMEOUT: Duration = Duration::from_secs(1);
/// Largest request head; larger ones get 431.
const MAX_HEAD: usize = 8 * 1024;
/// Connections served at once; more get 503 straight away.
const MAX_IN_FLIGHT: usize = 32;
/// Most bytes read (and discarded) after the response, waiting for the client to close.
const MAX_LINGER: usize = 64 * 1024;
/// Shortest `admin_token`: 16 characters leave nothing to guess in practice.
const MIN_TOKEN: usize = 16;
/// Sent with every 401.
const CHALLENGE: &str = "WWW-Authenticate: Bearer realm=\"wsgate admin\"";

/// Runs the gateway's reload; `Ok` carries a message for the operator.
pub(crate) type Reload = dyn Fn() -> Result<String, ReloadError> + Send + Sync;

/// The bearer token the admin endpoints but `/healthz` require when one is configured. Its
/// `Debug` hides the value, so printing a configuration never leaks it.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct AdminToken(String);

impl AdminToken {
    /// Accepts a token that an `Authorization: Bearer` header can carry as it is (RFC 6750's
    /// `b64token`) and that is long enough; the error never repeats the value.
    pub(crate) fn new(token: &str) -> Result<Self, String> {
        let body = token.trim_end_matches('=');
        let allowed = |c: char| c.is_ascii_alphanumeric() || "-._~+/".contains(c);
        if body.len() < MIN_TOKEN || !body.chars().all(allowed) {
            return Err(format!(
                "must be {MIN_TOKEN} or more of A-Z a-z 0-9 - . _ ~ + / (then optional '=' \
                 padding), e.g. the output of `openssl rand -hex 16`"
            ));
        }
        Ok(Self(token.to_owned()))
    }

    /// Whether `given` is the token, in time that depends only on the token's length.
    fn matches(&self, given: &[u8]) -> bool {
        let want = self.0.as_bytes();
        let mut diff = u8::from(want.len() != given.len());
        for (i, &w) in want.iter().enumerate() {
            diff |= w ^ given.get(i).copied().unwrap_or(0);
        }
        std::hint::black_box(diff) == 0
    }
}

impl fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AdminToken(..)")
    }
}

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
    /// Required by every endpoint but `/healthz` when set.
    pub(crate) token: Option<AdminToken>,
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

/// A connection's place among the [`MAX_IN_FLIGHT`]; released on drop, even by a panic.
struct Slot(Arc<AtomicUsize>);

impl Slot {
    /// A place if one is free.
    fn take(in_flight: &Arc<AtomicUsize>) -> Option<Self> {
        in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_IN_FLIGHT).then_some(n + 1)
            })
            .ok()
            .map(|_| Self(Arc::clone(in_flight)))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>, timeout: Duration) {
    let in_flight = Arc::new(AtomicUsize::new(0));
    loop {
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) => {
                // EMFILE and the like: back off rather than spin.
                tracing::warn!(why = %e, "admin accept failed");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let Some(slot) = Slot::take(&in_flight) else {
            refuse_busy(stream);
            continue;
        };
        let shared = Arc::clone(shared);
        let spawned = std::thread::Builder::new()
            .name("gateway-admin-conn".to_owned())
            .spawn(move || {
                let _slot = slot;
                handle(stream, &shared, timeout);
            });
        if let Err(e) = spawned {
            // The closure, stream included, is gone: the client sees the connection close.
            tracing::warn!(why = %e, "cannot start an admin connection thread");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Answers 503 without blocking the acceptor: whatever the client already sent is read
/// first, so the close is a FIN rather than a reset that could destroy the answer.
fn refuse_busy(mut stream: TcpStream) {
    if stream.set_nonblocking(true).is_err() {
        return;
    }
    let mut sink = [0u8; 1024];
    let mut read = 0;
    while read < MAX_HEAD {
        match stream.read(&mut sink) {
            Ok(n @ 1..) => read += n,
            _ => break,
        }
    }
    let mut response = Response::text(503, "too many admin connections; retry shortly\n");
    response.extra_header = Some("Retry-After: 1");
    // A fresh socket's send buffer takes this small answer whole.
    if response.write(&mut stream, false).is_ok() {
        drop(stream.shutdown(Shutdown::Write));
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
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        422 => "Unprocessable Content",
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
    let Ok(local) = stream.local_addr() else {
        return;
    };
    let (response, head_only) = match read_head(&mut stream, deadline) {
        Head::Request(request) => {
            let head_only = request.method == "HEAD";
            (route(&request, local, shared), head_only)
        }
        Head::Invalid(status, why) => (Response::text(status, format!("{why}\n")), false),
        Head::Gone => return,
    };
    if response.write(&mut stream, head_only).is_ok() {
        linger(&mut stream, deadline);
    }
}

/// The parts of a request head the endpoints look at.
struct Request {
    method: String,
    target: String,
    /// The `Host` value; `None` when absent or empty.
    host: Option<String>,
    /// Whether an `Origin` header came (a browser's request).
    origin: bool,
    /// The raw `Authorization` value.
    authorization: Option<Vec<u8>>,
}

/// What the client sent.
enum Head {
    /// A complete, well-formed head.
    Request(Request),
    /// Answered with this status and reason instead.
    Invalid(u16, &'static str),
    /// The client left before sending a complete head.
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
            Ok(httparse::Status::Complete(len)) if len <= MAX_HEAD => return parsed(&req),
            Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => {}
            Ok(_) | Err(httparse::Error::TooManyHeaders) => {
                return Head::Invalid(431, "request head too large");
            }
            Err(_) => return Head::Invalid(400, "malformed request"),
        }
    }
}

/// Picks the headers out of a complete head.
fn parsed(req: &httparse::Request<'_, '_>) -> Head {
    let mut request = Request {
        method: req.method.unwrap_or_default().to_owned(),
        target: req.path.unwrap_or_default().to_owned(),
        host: None,
        origin: false,
        authorization: None,
    };
    let mut hosts = 0;
    for header in req.headers.iter() {
        if header.name.eq_ignore_ascii_case("host") {
            hosts += 1;
            let value = String::from_utf8_lossy(header.value).trim().to_owned();
            request.host = Some(value).filter(|v| !v.is_empty());
        } else if header.name.eq_ignore_ascii_case("origin") {
            request.origin = true;
        } else if header.name.eq_ignore_ascii_case("authorization") {
            request.authorization = Some(header.value.to_vec());
        }
    }
    if hosts > 1 {
        return Head::Invalid(400, "more than one Host header");
    }
    Head::Request(request)
}

/// Whether `host` names this listener as the client reached it (`local`): its address, or
/// `localhost` with its port. A missing `Host` passes (HTTP/1.0 clients, simple probes).
fn host_allowed(host: Option<&str>, local: SocketAddr) -> bool {
    let Some(host) = host else {
        return true;
    };
    host.eq_ignore_ascii_case(&local.to_string())
        || host.rsplit_once(':').is_some_and(|(name, port)| {
            name.eq_ignore_ascii_case("localhost") && port == local.port().to_string()
        })
}

/// Whether `authorization` carries `Bearer <token>` (the scheme in any case).
fn bearer_ok(token: &AdminToken, authorization: Option<&[u8]>) -> bool {
    let Some(value) = authorization else {
        return false;
    };
    let value = value.trim_ascii();
    let Some((scheme, credentials)) = value.split_at_checked(6) else {
        return false;
    };
    scheme.eq_ignore_ascii_case(b"bearer")
        && credentials.first() == Some(&b' ')
        && token.matches(credentials.trim_ascii_start())
}

fn route(request: &Request, local: SocketAddr, shared: &Shared) -> Response {
    let state = &shared.state;
    if request.origin {
        return Response::text(403, "requests from browsers (with Origin) are refused\n");
    }
    let target = request.target.as_str();
    let path = target.split_once('?').map_or(target, |(path, _)| path);
    let (allow, get) = match path {
        "/metrics" | "/healthz" => ("Allow: GET, HEAD", true),
        "/reload" => ("Allow: POST", false),
        _ => return Response::text(404, "not found\n"),
    };
    if path != "/healthz" {
        if !host_allowed(request.host.as_deref(), local) {
            return Response::text(
                403,
                format!("Host must be {local} or localhost:{}\n", local.port()),
            );
        }
        if let Some(token) = &state.token
            && !bearer_ok(token, request.authorization.as_deref())
        {
            let mut response =
                Response::text(401, "a valid Authorization: Bearer token is required\n");
            response.extra_header = Some(CHALLENGE);
            return response;
        }
    }
    let method = request.method.as_str();
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
        // The reload logs its own outcome.
        _ => match reload(shared) {
            Ok(message) => Response::text(200, with_newline(message)),
            Err(error) => {
                let status = match error {
                    // The request is fine; the way the gateway was started rules it out.
                    ReloadError::NoFile => 409,
                    ReloadError::Unreadable(_) => 500,
                    ReloadError::Invalid(_) => 422,
                };
                Response::text(status, with_newline(error.to_string()))
            }
        },
    }
}

fn reload(shared: &Shared) -> Result<String, ReloadError> {
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

    const TOKEN: &str = "0123456789abcdef";

    fn start(
        timeout: Duration,
        token: Option<&str>,
    ) -> (SocketAddr, Arc<AtomicBool>, Arc<AtomicUsize>) {
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
                    probe_failures: 0,
                });
            }),
            reload: Arc::new(move || match counter.fetch_add(1, Ordering::Relaxed) {
                0 => Ok("reloaded 2 pools".to_owned()),
                1 => Err(ReloadError::Invalid(
                    "config.toml: line 3: bad url".to_owned(),
                )),
                2 => Err(ReloadError::Unreadable(
                    "config.toml: cannot read".to_owned(),
                )),
                _ => Err(ReloadError::NoFile),
            }),
            draining: Arc::clone(&draining),
            token: token.map(|t| AdminToken::new(t).unwrap()),
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
        exchange(
            addr,
            &format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n"),
        )
    }

    #[test]
    fn metrics_endpoint() {
        let (addr, _, _) = start(TIMEOUT, None);
        let (status, head, body) = get(addr, "/metrics");
        assert_eq!(status, 200);
        assert!(head.contains("\r\nContent-Type: text/plain; version=0.0.4"));
        assert!(head.contains("\r\nConnection: close"));
        assert!(head.contains(&format!("\r\nContent-Length: {}", body.len())));
        assert!(body.contains("# TYPE wsgate_upgrades_total counter\n"));
        assert!(body.contains("\nwsgate_upgrades_total{status=\"101\"} 1\n"));
        assert!(body.contains(
            "\nwsgate_backend_connect_failures_total{upstream=\"default\",\
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
        let (addr, draining, _) = start(TIMEOUT, None);
        let (status, _, body) = get(addr, "/healthz");
        assert_eq!((status, body.as_str()), (200, "ok\n"));
        draining.store(true, Ordering::Relaxed);
        let (status, _, body) = get(addr, "/healthz");
        assert_eq!((status, body.as_str()), (503, "draining\n"));
    }

    #[test]
    fn reload_outcomes_map_to_statuses() {
        let (addr, _, reloads) = start(TIMEOUT, None);
        let post =
            format!("POST /reload HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 5\r\n\r\nhello");
        let (status, _, body) = exchange(addr, &post);
        assert_eq!((status, body.as_str()), (200, "reloaded 2 pools\n"));
        let (status, _, body) = exchange(addr, &post);
        assert_eq!(
            (status, body.as_str()),
            (422, "config.toml: line 3: bad url\n")
        );
        assert_eq!(exchange(addr, &post).0, 500);
        let (status, _, body) = exchange(addr, &post);
        assert_eq!(status, 409);
        assert!(body.contains("no --config file"), "{body}");
        assert_eq!(reloads.load(Ordering::Relaxed), 4);
    }

    #[test]
    fn unknown_paths_and_wrong_methods() {
        let (addr, _, reloads) = start(TIMEOUT, None);
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
        let (addr, _, _) = start(TIMEOUT, None);
        assert_eq!(exchange(addr, "GET\0 / HTTP/1.1\r\n\r\n").0, 400);
        let big = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(MAX_HEAD));
        assert_eq!(exchange(addr, &big).0, 431);
        let two = "GET /metrics HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n";
        assert_eq!(exchange(addr, two).0, 400);
    }

    #[test]
    fn hosts_and_origins() {
        let (addr, _, reloads) = start(TIMEOUT, None);
        let req = |method: &str, path: &str, headers: &str| {
            exchange(addr, &format!("{method} {path} HTTP/1.1\r\n{headers}\r\n")).0
        };
        let port = addr.port();
        assert_eq!(
            req("GET", "/metrics", &format!("Host: localhost:{port}\r\n")),
            200
        );
        assert_eq!(
            req("GET", "/metrics", &format!("Host: LOCALHOST:{port}\r\n")),
            200
        );
        assert_eq!(req("GET", "/metrics", "Host: \r\n"), 200);
        for host in [
            format!("evil.example:{port}"),
            "localhost".to_owned(),
            format!("localhost:{}", port.wrapping_add(1)),
            format!("127.0.0.2:{port}"),
        ] {
            let headers = format!("Host: {host}\r\n");
            assert_eq!(req("GET", "/metrics", &headers), 403, "{host}");
            assert_eq!(req("POST", "/reload", &headers), 403, "{host}");
            // Probes may name the service: /healthz takes any Host.
            assert_eq!(req("GET", "/healthz", &headers), 200, "{host}");
        }
        let origin = format!("Host: {addr}\r\nOrigin: http://{addr}\r\n");
        for (method, path) in [
            ("POST", "/reload"),
            ("GET", "/metrics"),
            ("GET", "/healthz"),
        ] {
            assert_eq!(req(method, path, &origin), 403, "{method} {path}");
        }
        assert_eq!(reloads.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn token_guards_all_but_healthz() {
        let (addr, _, reloads) = start(TIMEOUT, Some(TOKEN));
        let req = |method: &str, path: &str, auth: &str| {
            exchange(
                addr,
                &format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}\r\n"),
            )
        };
        for auth in [
            String::new(),
            "Authorization: Bearer\r\n".to_owned(),
            "Authorization: Bearer 0123456789abcdeF\r\n".to_owned(),
            "Authorization: Bearer 0123456789abcde\r\n".to_owned(),
            format!("Authorization: Bearer {TOKEN}0\r\n"),
            format!("Authorization: Basic {TOKEN}\r\n"),
            format!("Authorization: {TOKEN}\r\n"),
        ] {
            let (status, head, _) = req("GET", "/metrics", &auth);
            assert_eq!(status, 401, "{auth}");
            assert!(
                head.contains("\r\nWWW-Authenticate: Bearer realm="),
                "{head}"
            );
            assert_eq!(req("POST", "/reload", &auth).0, 401, "{auth}");
        }
        assert_eq!(reloads.load(Ordering::Relaxed), 0);
        assert_eq!(req("GET", "/healthz", "").0, 200);
        for auth in [
            format!("Authorization: Bearer {TOKEN}\r\n"),
            format!("authorization: bearer  {TOKEN} \r\n"),
        ] {
            assert_eq!(req("GET", "/metrics", &auth).0, 200, "{auth}");
        }
        let auth = format!("Authorization: Bearer {TOKEN}\r\n");
        assert_eq!(req("POST", "/reload", &auth).0, 200);
        assert_eq!(reloads.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn tokens_must_be_long_and_header_safe() {
        for bad in [
            "",
            "short",
            "0123456789abcde",
            "0123456789 abcdef",
            "0123456789abcdef\"",
            "é123456789abcdefg",
            "====0123456789abcdef",
        ] {
            let err = AdminToken::new(bad).unwrap_err();
            // The message never repeats the secret.
            assert!(bad.is_empty() || !err.contains(bad), "{err}");
        }
        for good in [
            TOKEN,
            "AbC-._~+/0123456789==",
            "0123456789abcdef0123456789abcdef",
        ] {
            assert!(AdminToken::new(good).is_ok(), "{good}");
        }
        assert_eq!(
            format!("{:?}", AdminToken::new(TOKEN).unwrap()),
            "AdminToken(..)"
        );
        let token = AdminToken::new(TOKEN).unwrap();
        assert!(token.matches(TOKEN.as_bytes()));
        assert!(!token.matches(b""));
        assert!(!token.matches(&TOKEN.as_bytes()[..15]));
        assert!(!token.matches(format!("{TOKEN}x").as_bytes()));
    }

    #[test]
    fn silent_clients_do_not_block_others() {
        let timeout = Duration::from_secs(1);
        let (addr, _, _) = start(timeout, None);
        let started = Instant::now();
        let mut silent: Vec<_> = (0..8).map(|_| TcpStream::connect(addr).unwrap()).collect();
        // Served alongside the silent ones, long before their deadline.
        assert_eq!(get(addr, "/healthz").0, 200);
        assert!(started.elapsed() < timeout / 2, "{:?}", started.elapsed());
        // The silent clients themselves are answered 408 at their deadline.
        for stream in &mut silent {
            let mut response = String::new();
            stream.read_to_string(&mut response).unwrap();
            assert!(response.starts_with("HTTP/1.1 408 "), "{response}");
        }
        assert!(started.elapsed() >= timeout);
    }

    #[test]
    fn past_the_cap_connections_get_503_at_once() {
        let (addr, _, _) = start(Duration::from_secs(2), None);
        let silent: Vec<_> = (0..MAX_IN_FLIGHT)
            .map(|_| TcpStream::connect(addr).unwrap())
            .collect();
        let started = Instant::now();
        let mut extra = TcpStream::connect(addr).unwrap();
        extra
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut response = String::new();
        extra.read_to_string(&mut response).unwrap();
        assert!(response.starts_with("HTTP/1.1 503 "), "{response}");
        assert!(response.contains("\r\nRetry-After: 1\r\n"), "{response}");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
        // A place frees as soon as a connection ends.
        drop(silent);
        let until = Instant::now() + Duration::from_secs(5);
        while get(addr, "/healthz").0 != 200 {
            assert!(Instant::now() < until, "no place freed");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
