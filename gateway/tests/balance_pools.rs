//! End-to-end load balancing and health: least-connections, sticky hashing across gateway
//! instances, passive ejection and its cool-down, active health probes, and the immediate 502
//! of a pool with no usable backend. Each gateway runs from a `--config` file; each backend
//! greets every client with its name, so a test sees which backend served which client.

pub mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

use common::config::ConfigGateway;
use common::{RAW_KEY, WsClient, recv_data, within, within_for};
use futures_util::{SinkExt as _, StreamExt as _};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::{self, Message};

/// Backend mode: complete the upgrade (anything else is the status to refuse with).
const UPGRADE: u16 = 101;
/// Backend mode: read the request, say nothing for [`HANG`], then hang up.
const SILENT: u16 = 0;
/// How long a [`SILENT`] backend holds a connection: long enough that a connection attempt
/// to it cannot pass for an immediate answer.
const HANG: Duration = Duration::from_millis(300);

/// A one-route configuration sending every path to `[upstream.pool]` over `backends`, with
/// `extra` lines for the pool table.
fn config(backends: &[&TestBackend], extra: &str) -> String {
    let list: Vec<String> = backends
        .iter()
        .map(|b| format!("\"{}\"", b.url()))
        .collect();
    format!(
        "[server]\ncores = 1\n\n[[listener]]\naddress = \"127.0.0.1:0\"\n\n\
         [[route]]\npath_prefix = \"/\"\nupstream = \"pool\"\n\n\
         [upstream.pool]\nbackends = [{}]\n{extra}\n",
        list.join(", ")
    )
}

// ---------------------------------------------------------------------------------------------
// A backend that counts what reaches it.
// ---------------------------------------------------------------------------------------------

/// What one backend saw. Health probes are told apart by their `User-Agent: wsgate-health`.
#[derive(Debug, Default)]
struct Stats {
    /// TCP connections accepted (clients and probes).
    accepts: AtomicUsize,
    /// Upgrade requests relayed for clients.
    client_requests: AtomicUsize,
    /// Probes answered 101.
    probe_passes: AtomicUsize,
    /// Probes refused or left unanswered.
    probe_failures: AtomicUsize,
    /// Upgraded client connections still open.
    live: AtomicUsize,
}

/// A backend whose behaviour a test switches at run time (`mode`: [`UPGRADE`], [`SILENT`] or
/// a status to refuse with). Upgraded clients first get a text message with the backend's
/// name; then the connection stays open until the client closes it.
struct TestBackend {
    name: &'static str,
    addr: SocketAddr,
    mode: Arc<AtomicU16>,
    stats: Arc<Stats>,
    task: JoinHandle<()>,
}

impl TestBackend {
    async fn start(name: &'static str, mode: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind backend");
        let addr = listener.local_addr().expect("backend address");
        let mode = Arc::new(AtomicU16::new(mode));
        let stats = Arc::new(Stats::default());
        let (m, s) = (Arc::clone(&mode), Arc::clone(&stats));
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                s.accepts.fetch_add(1, Relaxed);
                tokio::spawn(serve(stream, name, m.load(Relaxed), Arc::clone(&s)));
            }
        });
        Self {
            name,
            addr,
            mode,
            stats,
            task,
        }
    }

    fn url(&self) -> String {
        format!("ws://{}", self.addr)
    }

    fn set_mode(&self, mode: u16) {
        self.mode.store(mode, Relaxed);
    }

    fn client_requests(&self) -> usize {
        self.stats.client_requests.load(Relaxed)
    }
}

impl Drop for TestBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(mut stream: TcpStream, name: &'static str, mode: u16, stats: Arc<Stats>) {
    let _ = stream.set_nodelay(true);
    let Some(head) = read_head(&mut stream).await else {
        return;
    };
    let probe = head
        .lines()
        .any(|l| l.eq_ignore_ascii_case("user-agent: wsgate-health"));
    if !probe {
        stats.client_requests.fetch_add(1, Relaxed);
    }
    match mode {
        UPGRADE => {
            let key = head
                .lines()
                .find_map(|l| {
                    let (n, v) = l.split_once(':')?;
                    n.eq_ignore_ascii_case("sec-websocket-key")
                        .then(|| v.trim())
                })
                .unwrap_or_default();
            let answer = format!(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                 Sec-WebSocket-Accept: {}\r\n\r\n",
                codec::handshake::accept_key(key.as_bytes())
            );
            if stream.write_all(answer.as_bytes()).await.is_err() {
                return;
            }
            let mut ws = WebSocketStream::from_raw_socket(stream, Role::Server, None).await;
            if probe {
                stats.probe_passes.fetch_add(1, Relaxed);
            } else {
                stats.live.fetch_add(1, Relaxed);
                let _ = ws.send(Message::Text(name.to_owned())).await;
            }
            // Answers the close (tungstenite does) and ends when the peer goes.
            while let Some(Ok(_)) = ws.next().await {}
            if !probe {
                stats.live.fetch_sub(1, Relaxed);
            }
        }
        SILENT => {
            if probe {
                stats.probe_failures.fetch_add(1, Relaxed);
            }
            tokio::time::sleep(HANG).await;
        }
        refusal => {
            if probe {
                stats.probe_failures.fetch_add(1, Relaxed);
            }
            let answer = format!(
                "HTTP/1.1 {refusal} Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
            let _ = stream.write_all(answer.as_bytes()).await;
            let _ = stream.shutdown().await;
            let mut sink = [0; 256];
            let _ = tokio::time::timeout(Duration::from_secs(1), stream.read(&mut sink)).await;
        }
    }
}

/// The head up to its blank line (whatever follows is dropped), or `None` if the peer left
/// first.
async fn read_head(stream: &mut TcpStream) -> Option<String> {
    let mut buf = Vec::new();
    let mut chunk = [0; 1024];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            buf.truncate(end + 4);
            break;
        }
        let n = tokio::time::timeout(common::STEP, stream.read(&mut chunk))
            .await
            .ok()?
            .ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Some(String::from_utf8_lossy(&buf).into_owned())
}

// ---------------------------------------------------------------------------------------------
// Clients.
// ---------------------------------------------------------------------------------------------

/// Opens a client (with `X-User: user` if given). `Ok` carries the connection and the name of
/// the backend that greeted it; `Err` the HTTP status of a refused upgrade.
async fn open(gw: &ConfigGateway, user: Option<&str>) -> Result<(WsClient, String), u16> {
    let mut req = gw.url("/").into_client_request().expect("client request");
    if let Some(user) = user {
        req.headers_mut()
            .insert("X-User", HeaderValue::from_str(user).expect("header value"));
    }
    match within("client handshake", tokio_tungstenite::connect_async(req)).await {
        Ok((mut ws, _)) => match recv_data(&mut ws).await {
            Message::Text(name) => Ok((ws, name)),
            other => panic!("expected the backend's name, got {other:?}"),
        },
        Err(tungstenite::Error::Http(resp)) => Err(resp.status().as_u16()),
        Err(e) => panic!("client handshake failed without a status: {e}"),
    }
}

/// [`open`], then close at once; returns the backend's name.
async fn served_by(gw: &ConfigGateway, user: Option<&str>) -> String {
    let (ws, name) = open(gw, user)
        .await
        .unwrap_or_else(|status| panic!("upgrade refused with {status}"));
    close(ws).await;
    name
}

async fn close(mut ws: WsClient) {
    let _ = within("client close", ws.close(None)).await;
    within("client stream end", async {
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
}

/// Sends a raw upgrade request; returns the answer's status and how long it took to arrive.
async fn timed_status(addr: SocketAddr) -> (u16, Duration) {
    let request = format!(
        "GET / HTTP/1.1\r\nHost: gw.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {RAW_KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    within("raw upgrade answer", async {
        let started = Instant::now();
        let mut stream = TcpStream::connect(addr).await.expect("connect to gateway");
        stream.write_all(request.as_bytes()).await.expect("write");
        let head = read_head(&mut stream).await.expect("a response head");
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no status in {head:?}"));
        (status, started.elapsed())
    })
    .await
}

/// Polls `cond` every 10 ms for up to `limit`; returns how long it took, or panics.
async fn wait_until(limit: Duration, what: &str, cond: impl Fn() -> bool) -> Duration {
    let started = Instant::now();
    within_for(limit, what, async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    started.elapsed()
}

// ---------------------------------------------------------------------------------------------
// The hash, as documented in gateway/src/balance.rs, re-implemented independently.
// ---------------------------------------------------------------------------------------------

fn fnv1a(mut state: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        state ^= u64::from(b);
        state = state.wrapping_mul(0x0000_0100_0000_01b3);
    }
    state
}

/// `splitmix64(fnv1a64(key ‖ 0xFF ‖ url))`.
fn score(key: &[u8], url: &str) -> u64 {
    let state = fnv1a(fnv1a(0xcbf2_9ce4_8422_2325, key), &[0xFF]);
    let mut z = fnv1a(state, url.as_bytes());
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The backend a key lives on: the highest score (the lowest index on a tie).
fn home<'a>(key: &[u8], backends: &[&'a TestBackend]) -> &'a str {
    let mut best: Option<(u64, &TestBackend)> = None;
    for &b in backends {
        let s = score(key, &b.url());
        if best.is_none_or(|(top, _)| s > top) {
            best = Some((s, b));
        }
    }
    best.expect("at least one backend").1.name
}

// ---------------------------------------------------------------------------------------------
// Tests.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_connections_sends_new_clients_to_the_idle_backend() {
    let a = TestBackend::start("A", UPGRADE).await;
    let b = TestBackend::start("B", UPGRADE).await;
    let gw = ConfigGateway::start(&config(&[&a, &b], "balance = \"least-connections\""));

    // Four held connections: each new one goes to the less loaded backend, so 2 and 2.
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(open(&gw, None).await.expect("upgrade"));
    }
    let on = |name: &str, held: &[(WsClient, String)]| held.iter().filter(|h| h.1 == name).count();
    assert_eq!((on("A", &held), on("B", &held)), (2, 2));

    // Close B's two; A keeps its two open, so the next two clients must both go to B (round
    // robin would split them).
    let (on_a, on_b): (Vec<_>, Vec<_>) = held.into_iter().partition(|h| h.1 == "A");
    for (ws, _) in on_b {
        close(ws).await;
    }
    wait_until(common::STEP, "B's connections to end", || {
        b.stats.live.load(Relaxed) == 0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await; // the gateway's side of the close
    let mut fresh = Vec::new();
    for _ in 0..2 {
        fresh.push(open(&gw, None).await.expect("upgrade"));
    }
    let names: Vec<&str> = fresh.iter().map(|h| h.1.as_str()).collect();
    assert_eq!(names, ["B", "B"]);
    assert_eq!(a.stats.live.load(Relaxed), 2);
    for (ws, _) in on_a.into_iter().chain(fresh) {
        close(ws).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_hash_is_sticky_and_gateway_instances_agree() {
    let a = TestBackend::start("A", UPGRADE).await;
    let b = TestBackend::start("B", UPGRADE).await;
    let c = TestBackend::start("C", UPGRADE).await;
    let backends = [&a, &b, &c];
    let cfg = config(
        &backends,
        "balance = \"hash\"\nhash_key = \"header:X-User\"",
    );
    let first = ConfigGateway::start(&cfg);
    let second = ConfigGateway::start(&cfg);

    let mut homes = BTreeSet::new();
    for i in 0..12 {
        let user = format!("user-{i}");
        let want = home(user.as_bytes(), &backends);
        // Ten connections, alternating between the two instances.
        for n in 0..10 {
            let gw = if n % 2 == 0 { &first } else { &second };
            let got = served_by(gw, Some(&user)).await;
            assert_eq!(got, want, "{user}, connection {n}");
        }
        homes.insert(want);
    }
    assert!(homes.len() >= 2, "12 users all hashed to {homes:?}");

    // No header: the client IP (127.0.0.1 for every test client) is the key.
    let want = home(&[127, 0, 0, 1], &backends);
    for n in 0..4 {
        let gw = if n % 2 == 0 { &first } else { &second };
        assert_eq!(served_by(gw, None).await, want, "no X-User, connection {n}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_upgrades_eject_a_backend_until_its_cool_down_ends() {
    let cool_down = Duration::from_secs(1);
    let a = TestBackend::start("A", UPGRADE).await;
    let b = TestBackend::start("B", 503).await;
    let gw = ConfigGateway::start(&config(&[&a, &b], "eject_after = 2\neject_for = \"1s\""));

    // Round-robin reaches B every other client; its second 503 ejects it. (A client routed to
    // B sees the 503, or A's 101 if the gateway retries.)
    for _ in 0..10 {
        if b.client_requests() >= 2 {
            break;
        }
        match open(&gw, None).await {
            Ok((ws, name)) => {
                assert_eq!(name, "A");
                close(ws).await;
            }
            Err(status) => assert_eq!(status, 503),
        }
    }
    assert_eq!(
        b.client_requests(),
        2,
        "B was not tried twice in 10 clients"
    );
    let ejected = Instant::now();

    for n in 0..6 {
        assert_eq!(
            served_by(&gw, None).await,
            "A",
            "client {n} during the cool-down"
        );
    }
    assert!(
        ejected.elapsed() < cool_down,
        "the clients took longer than the cool-down; the test proves nothing on this machine"
    );
    assert_eq!(b.client_requests(), 2, "an ejected backend was tried");

    // After the cool-down B is tried again.
    tokio::time::sleep((cool_down + Duration::from_millis(200)).saturating_sub(ejected.elapsed()))
        .await;
    for _ in 0..4 {
        if b.client_requests() > 2 {
            break;
        }
        if let Ok((ws, _)) = open(&gw, None).await {
            close(ws).await;
        }
    }
    assert_eq!(
        b.client_requests(),
        3,
        "B was not tried again after its cool-down"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_probes_take_a_backend_out_and_passing_ones_bring_it_back() {
    let interval = Duration::from_millis(200);
    let a = TestBackend::start("A", UPGRADE).await;
    let b = TestBackend::start("B", UPGRADE).await;
    // eject_after = 0: only the probes decide.
    let gw = ConfigGateway::start(&config(
        &[&a, &b],
        "eject_after = 0\nhealth_interval = \"200ms\"\nhealth_timeout = \"500ms\"",
    ));
    wait_until(common::STEP, "a first passing probe of B", || {
        b.stats.probe_passes.load(Relaxed) > 0
    })
    .await;
    let mut seen = BTreeSet::new();
    for _ in 0..4 {
        seen.insert(served_by(&gw, None).await);
    }
    assert_eq!(
        seen.len(),
        2,
        "round-robin over two healthy backends: {seen:?}"
    );

    b.set_mode(503);
    let took = wait_until(common::STEP, "a failing probe of B", || {
        b.stats.probe_failures.load(Relaxed) > 0
    })
    .await;
    assert!(
        took < 2 * interval + Duration::from_millis(300),
        "the first failing probe came {took:?} after B started failing"
    );
    tokio::time::sleep(Duration::from_millis(100)).await; // the verdict reaching the pool
    let before = b.client_requests();
    for n in 0..8 {
        assert_eq!(
            served_by(&gw, None).await,
            "A",
            "client {n} while B fails its probes"
        );
    }
    assert_eq!(
        b.client_requests(),
        before,
        "a client was sent to a backend failing probes"
    );

    let passes = b.stats.probe_passes.load(Relaxed);
    b.set_mode(UPGRADE);
    wait_until(common::STEP, "a passing probe of B again", || {
        b.stats.probe_passes.load(Relaxed) > passes
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut back = false;
    for _ in 0..4 {
        back |= served_by(&gw, None).await == "B";
    }
    assert!(back, "B passes its probes again but gets no clients");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_with_every_backend_ejected_answers_502_at_once() {
    // Silent backends: a connection attempt to either costs HANG before the gateway gives up,
    // so a fast 502 proves nobody was tried.
    let a = TestBackend::start("A", SILENT).await;
    let b = TestBackend::start("B", SILENT).await;
    let gw = ConfigGateway::start(&config(&[&a, &b], "eject_after = 1\neject_for = \"30s\""));
    let accepts = || (a.stats.accepts.load(Relaxed), b.stats.accepts.load(Relaxed));

    for _ in 0..6 {
        let (tried_a, tried_b) = accepts();
        if tried_a > 0 && tried_b > 0 {
            break;
        }
        let (status, _) = timed_status(gw.addr).await;
        assert_eq!(status, 502);
    }
    let tried = accepts();
    assert!(
        tried.0 > 0 && tried.1 > 0,
        "both backends should have failed once: {tried:?}"
    );

    for n in 0..5 {
        let (status, took) = timed_status(gw.addr).await;
        assert_eq!(status, 502, "request {n}");
        assert!(
            took < Duration::from_millis(100),
            "request {n} took {took:?}"
        );
    }
    assert_eq!(accepts(), tried, "a backend was connected to while ejected");
}
