//! Shared harness for the gateway's end-to-end tests: the gateway process guard, independent
//! tokio-tungstenite peers (clients and backends), and raw TCP peers that speak RFC 6455 by hand
//! with the `codec` crate so tests can craft any frame and inspect every byte.
//!
//! Every wait here is bounded: a test that hangs is a failed test, never a stuck suite.

use std::fmt::Write as _;
use std::future::Future;
use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc as std_mpsc};
use std::time::{Duration, Instant};

use codec::frame::{Decoded, FrameHeader, OpCode, Role, write_frame};
use futures_util::{SinkExt as _, StreamExt as _};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::protocol::frame::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// The bound on a single step of a test (one read, one connect, one handshake).
pub const STEP: Duration = Duration::from_secs(5);

/// The bound on the gateway printing its `listen=` line.
const STARTUP: Duration = Duration::from_secs(10);

/// The largest message the echo tests move (16 MiB), with headroom for the limits below.
pub const BIG_LIMIT: usize = 64 << 20;

/// A tungstenite client connection through the gateway.
pub type WsClient = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A tungstenite server-side connection, as a backend sees it.
pub type WsServer = WebSocketStream<TcpStream>;

/// Awaits `fut` for at most `limit`, panicking with `what` if it takes longer.
pub async fn within_for<T>(limit: Duration, what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(limit, fut)
        .await
        .unwrap_or_else(|elapsed| panic!("timed out ({elapsed}) after {limit:?}: {what}"))
}

/// Awaits `fut` for at most [`STEP`], panicking with `what` if it takes longer.
pub async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    within_for(STEP, what, fut).await
}

// ---------------------------------------------------------------------------------------------
// The gateway process.
// ---------------------------------------------------------------------------------------------

/// A running `gateway` binary, killed when dropped; its stderr is captured line by line.
pub struct Gateway {
    child: Child,
    /// The first address the gateway reported in its `listen` field.
    pub addr: SocketAddr,
    /// Every address of the `listen` field, one per listener.
    pub addrs: Vec<SocketAddr>,
    lines: Arc<Mutex<Vec<String>>>,
}

/// The listener addresses in a startup line, text (`listen=a,b`) or JSON (`"listen":"a,b"`).
fn listen_addrs(line: &str) -> Option<Vec<SocketAddr>> {
    let parse = |value: &str| value.split(',').map(|a| a.parse().ok()).collect();
    if let Some(value) = field(line, "listen") {
        return parse(value);
    }
    let json = serde_json::from_str::<serde_json::Value>(line).ok()?;
    parse(json.get("listen")?.as_str()?)
}

impl Gateway {
    /// Starts the gateway with `--listen 127.0.0.1:0`, `--cores 1` (unless `args` names
    /// `--cores`) and `args`, and waits for its `listen=` line.
    #[must_use]
    pub fn start(args: &[&str]) -> Self {
        let mut all = vec!["--listen", "127.0.0.1:0"];
        if !args.contains(&"--cores") {
            all.extend(["--cores", "1"]);
        }
        all.extend(args);
        Self::start_exact(&all)
    }

    /// Starts the gateway with exactly `args` (nothing added) and waits for its `listen`
    /// field (text or JSON logs).
    #[must_use]
    pub fn start_exact(args: &[&str]) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_gateway"));
        command.args(args);
        Self::spawn(command, args)
    }

    /// [`start_exact`](Self::start_exact) under a descriptor limit of `nofile` (soft and
    /// hard), set by the shell's `ulimit -n` just before it execs the gateway.
    #[must_use]
    pub fn start_with_nofile(nofile: u32, args: &[&str]) -> Self {
        let mut command = Command::new("sh");
        command
            .args(["-c", &format!("ulimit -n {nofile} && exec \"$0\" \"$@\"")])
            .arg(env!("CARGO_BIN_EXE_gateway"))
            .args(args);
        Self::spawn(command, args)
    }

    /// [`start_exact`](Self::start_exact) through `wrapper`, a program that runs its first
    /// argument (the gateway binary) with the rest (`args`), e.g. under a seccomp filter. The
    /// gateway chooses its I/O backend itself: `WSGATE_IO_BACKEND` is not passed on.
    #[must_use]
    pub fn start_wrapped(wrapper: &[&str], args: &[&str]) -> Self {
        let mut command = Command::new(wrapper[0]);
        command
            .env_remove("WSGATE_IO_BACKEND")
            .args(&wrapper[1..])
            .arg(env!("CARGO_BIN_EXE_gateway"))
            .args(args);
        Self::spawn(command, args)
    }

    /// Runs `command` (which becomes the gateway process) and waits for its `listen` field.
    fn spawn(mut command: Command, args: &[&str]) -> Self {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn the gateway binary");
        let stderr = child.stderr.take().expect("piped stderr");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std_mpsc::channel();
        let sink = Arc::clone(&lines);
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stderr);
            let mut raw = Vec::new();
            let mut tx = Some(tx);
            loop {
                raw.clear();
                match reader.read_until(b'\n', &mut raw) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                let line = String::from_utf8_lossy(&raw).trim_end().to_owned();
                let addrs = listen_addrs(&line);
                // Kept before the start is reported, so `lines()` has the listen line once
                // `start` returns.
                sink.lock().unwrap().push(line);
                if let Some(addrs) = addrs
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(addrs);
                }
            }
        });
        let mut gateway = Self {
            child,
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            addrs: Vec::new(),
            lines,
        };
        if let Ok(addrs) = rx.recv_timeout(STARTUP) {
            gateway.addr = addrs[0];
            gateway.addrs = addrs;
        } else {
            let status = gateway.child.try_wait().ok().flatten();
            panic!(
                "gateway {args:?} printed no listen field within {STARTUP:?} (exit status: \
                 {status:?}); stderr:\n{}",
                gateway.stderr()
            );
        }
        gateway
    }

    /// Every stderr line so far.
    #[must_use]
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// Waits (up to `limit`) until at least `n` stderr lines satisfy `pred`; returns the
    /// `n`-th.
    pub async fn wait_nth_line(
        &self,
        limit: Duration,
        n: usize,
        pred: impl Fn(&str) -> bool,
    ) -> Option<String> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(line) = self
                .lines
                .lock()
                .unwrap()
                .iter()
                .filter(|l| pred(l))
                .nth(n - 1)
            {
                return Some(line.clone());
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// `ws://ADDR{path}`.
    #[must_use]
    pub fn url(&self, path: &str) -> String {
        format!("ws://{}{path}", self.addr)
    }

    /// The names of the gateway process's threads (`/proc/PID/task/*/comm`).
    #[must_use]
    pub fn thread_names(&self) -> Vec<String> {
        let tasks = std::fs::read_dir(format!("/proc/{}/task", self.child.id())).expect("tasks");
        tasks
            .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
            .map(|name| name.trim_end().to_owned())
            .collect()
    }

    /// The gateway process's user+system CPU time so far (`/proc/PID/stat`).
    #[must_use]
    pub fn cpu_time(&self) -> Duration {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).expect("stat");
        // Fields after the parenthesised name: state is the 1st, utime the 12th, stime the 13th.
        let after = &stat[stat.rfind(')').expect("comm") + 2..];
        let fields: Vec<&str> = after.split(' ').collect();
        let ticks: u64 =
            fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
        // USER_HZ, the unit of these fields, is 100 on Linux.
        Duration::from_millis(ticks * 10)
    }

    /// Sends the gateway process a signal (`TERM`, `INT`, `HUP`, `USR2`).
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([format!("-{name}"), self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} failed");
    }

    /// Waits (up to `limit`) for the process to exit and returns its exit code.
    pub async fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status.code();
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Everything the gateway printed to stderr so far.
    #[must_use]
    pub fn stderr(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// Waits (up to `limit`) for a stderr line for which `pred` holds, and returns it.
    pub async fn wait_line(&self, limit: Duration, pred: impl Fn(&str) -> bool) -> Option<String> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(line) = self.lines.lock().unwrap().iter().find(|l| pred(l)) {
                return Some(line.clone());
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Gateway {
    /// Waits (at most `limit`) until `count` lines match `pred`; says whether they did. Log
    /// lines reach stderr through a writer thread, a moment after what they report.
    pub async fn wait_lines(
        &self,
        limit: Duration,
        count: usize,
        pred: impl Fn(&str) -> bool,
    ) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            if self
                .lines
                .lock()
                .unwrap()
                .iter()
                .filter(|l| pred(l))
                .count()
                >= count
            {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            // Give the reader thread a moment to collect the last lines.
            std::thread::sleep(Duration::from_millis(50));
            eprintln!(
                "---- gateway stderr ----\n{}\n------------------------",
                self.stderr()
            );
        }
    }
}

/// The value of `name=` in a log line (up to the next space, quotes stripped).
pub fn field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let pat = format!("{name}=");
    let mut from = 0;
    while let Some(at) = line[from..].find(&pat) {
        let start = from + at;
        // Only match whole field names (`listen=`, not `xlisten=` or `x_listen=`).
        let boundary = start == 0 || {
            let c = line.as_bytes()[start - 1];
            !(c.is_ascii_alphanumeric() || c == b'_')
        };
        if boundary {
            let rest = &line[start + pat.len()..];
            let value = if let Some(quoted) = rest.strip_prefix('"') {
                &quoted[..quoted.find('"').unwrap_or(quoted.len())]
            } else {
                &rest[..rest.find(char::is_whitespace).unwrap_or(rest.len())]
            };
            return Some(value.trim_end_matches(','));
        }
        from = start + pat.len();
    }
    None
}

/// An address on 127.0.0.1 that refuses connections for as long as this lives: a socket is
/// bound to it and never listens, so no other socket can take the port meanwhile. A port from
/// [`free_addr`] is free again at once: the next free port asked for, a gateway's own listener
/// among them, can be the same one, and a "dead" backend then answers.
pub struct Refusing {
    _socket: socket2::Socket,
    /// The address.
    pub addr: SocketAddr,
}

/// See [`Refusing`].
#[must_use]
pub fn refusing_addr() -> Refusing {
    let socket =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("a socket");
    let any: SocketAddr = "127.0.0.1:0".parse().expect("an address");
    socket.bind(&any.into()).expect("bind a refusing port");
    let addr = socket
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .expect("its address");
    Refusing {
        _socket: socket,
        addr,
    }
}

/// An address on 127.0.0.1 where nothing listens (bound, then released).
#[must_use]
pub fn free_addr() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a probe port");
    listener.local_addr().expect("probe address")
}

// ---------------------------------------------------------------------------------------------
// Payloads.
// ---------------------------------------------------------------------------------------------

/// `len` pseudo-random bytes, different for each `seed`.
#[must_use]
pub fn bytes_pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let take = (len - out.len()).min(8);
        out.extend_from_slice(&state.to_le_bytes()[..take]);
    }
    out
}

/// `len` pseudo-random printable ASCII characters (valid UTF-8 for text messages).
#[must_use]
pub fn text_pattern(len: usize, seed: u64) -> String {
    bytes_pattern(len, seed)
        .into_iter()
        .map(|b| char::from(b' ' + b % 95))
        .collect()
}

/// A fresh masking key for each call (no two calls in a process return the same key).
pub fn fresh_key() -> [u8; 4] {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let b = bytes_pattern(4, n);
    [b[0], b[1], b[2], b[3] | 1]
}

/// Panics unless the two payloads are equal, naming the first difference (never dumping
/// megabytes).
pub fn assert_same(what: &str, got: &[u8], want: &[u8]) {
    if got == want {
        return;
    }
    let first = got.iter().zip(want).position(|(a, b)| a != b);
    panic!(
        "{what}: payload differs: got {} bytes, want {} bytes, first differing index {first:?}",
        got.len(),
        want.len()
    );
}

// ---------------------------------------------------------------------------------------------
// tokio-tungstenite peers.
// ---------------------------------------------------------------------------------------------

/// Limits large enough for the 16 MiB echo tests on both independent peers.
#[must_use]
pub fn ws_config() -> WebSocketConfig {
    WebSocketConfig {
        max_message_size: Some(BIG_LIMIT),
        max_frame_size: None,
        ..WebSocketConfig::default()
    }
}

/// Connects a tungstenite client to `url` (through the gateway); panics on failure.
pub async fn connect(url: &str) -> WsClient {
    match try_connect(url).await {
        Ok(ws) => ws,
        Err(e) => panic!("WebSocket connect to {url} failed: {e}"),
    }
}

/// Connects a tungstenite client to `url`, returning the handshake error (e.g. an HTTP status).
pub async fn try_connect(url: &str) -> Result<WsClient, tungstenite::Error> {
    within(
        "tungstenite client handshake",
        tokio_tungstenite::connect_async_with_config(url, Some(ws_config()), true),
    )
    .await
    .map(|(ws, _)| ws)
}

/// The HTTP status of a refused tungstenite handshake; panics if it succeeded or failed
/// otherwise.
pub async fn refused_status(url: &str) -> u16 {
    match try_connect(url).await {
        Ok(_) => panic!("handshake to {url} unexpectedly succeeded"),
        Err(tungstenite::Error::Http(resp)) => resp.status().as_u16(),
        Err(e) => panic!("handshake to {url} failed without an HTTP status: {e}"),
    }
}

/// The next message on a tungstenite stream (any kind); panics on error, end or timeout.
pub async fn recv<S>(ws: &mut WebSocketStream<S>) -> Message
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    match within("tungstenite read", ws.next()).await {
        Some(Ok(msg)) => msg,
        Some(Err(e)) => panic!("tungstenite read failed: {e}"),
        None => panic!("tungstenite stream ended"),
    }
}

/// The next text or binary message, skipping pings and pongs.
pub async fn recv_data<S>(ws: &mut WebSocketStream<S>) -> Message
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    loop {
        match recv(ws).await {
            Message::Ping(_) | Message::Pong(_) => {}
            msg => return msg,
        }
    }
}

/// Sends one message; panics on error or timeout.
pub async fn send<S>(ws: &mut WebSocketStream<S>, msg: Message)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    within("tungstenite send", ws.send(msg))
        .await
        .expect("tungstenite send");
}

/// The code and reason of a close message (`None` for a close without a status).
#[must_use]
pub fn close_of(msg: &Message) -> Option<Option<(u16, String)>> {
    match msg {
        Message::Close(frame) => Some(
            frame
                .as_ref()
                .map(|f| (u16::from(f.code), f.reason.to_string())),
        ),
        _ => None,
    }
}

/// Reads until a close message arrives (skipping everything else) and returns its code.
pub async fn expect_close<S>(ws: &mut WebSocketStream<S>) -> Option<(u16, String)>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    loop {
        let msg = recv(ws).await;
        if let Some(close) = close_of(&msg) {
            return close;
        }
    }
}

/// Drives a tungstenite stream until it ends (after a close), within [`STEP`]; read errors
/// after the close (such as a reset) count as the end.
pub async fn drain_to_end<S>(ws: &mut WebSocketStream<S>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    within("tungstenite stream end", async {
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
}

/// Sends `text`, checks it comes back, closes with 1000 and reads until the stream ends: one
/// complete, clean connection (for access-log tests).
pub async fn echo_then_close<S>(ws: &mut WebSocketStream<S>, text: &str)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    send(ws, Message::Text(text.into())).await;
    assert_eq!(recv_data(ws).await, Message::Text(text.into()));
    within("client close", ws.close(Some(close_frame(1000, "done"))))
        .await
        .expect("send close");
    drain_to_end(ws).await;
}

/// A close frame with `code` and `reason`.
#[must_use]
pub fn close_frame(code: u16, reason: &str) -> CloseFrame<'static> {
    CloseFrame {
        code: code.into(),
        reason: reason.to_owned().into(),
    }
}

/// One accepted backend connection: what the gateway asked for and the live socket.
pub struct BackendConn {
    /// The request target (path and query) the gateway sent.
    pub path: String,
    /// The request headers, names lowercased, in order.
    pub headers: Vec<(String, String)>,
    /// The established WebSocket.
    pub ws: WsServer,
}

impl BackendConn {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        header_in(&self.headers, name)
    }
}

fn header_in<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// A tungstenite backend whose accepted connections are handed to the test to drive.
pub struct WsBackend {
    /// Where it listens.
    pub addr: SocketAddr,
    conns: mpsc::UnboundedReceiver<BackendConn>,
    task: JoinHandle<()>,
}

impl WsBackend {
    /// Listens on 127.0.0.1; when `protocol` is given, answers every handshake with that
    /// subprotocol.
    pub async fn start(protocol: Option<&'static str>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind backend");
        let addr = listener.local_addr().expect("backend address");
        let (tx, conns) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let tx = tx.clone();
                tokio::spawn(async move {
                    if let Some(conn) = accept_ws(stream, protocol).await {
                        let _ = tx.send(conn);
                    }
                });
            }
        });
        Self { addr, conns, task }
    }

    /// `ws://ADDR`.
    #[must_use]
    pub fn url(&self) -> String {
        format!("ws://{}", self.addr)
    }

    /// The next upgraded connection; panics after [`STEP`].
    pub async fn accept(&mut self) -> BackendConn {
        within("backend accept", self.conns.recv())
            .await
            .expect("backend accept loop ended")
    }
}

impl Drop for WsBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept_ws(stream: TcpStream, protocol: Option<&'static str>) -> Option<BackendConn> {
    let _ = stream.set_nodelay(true);
    let mut seen = None;
    #[expect(
        clippy::result_large_err,
        reason = "the callback's signature is tungstenite's `Callback` trait"
    )]
    let callback = |req: &Request, mut resp: Response| {
        let headers = req
            .headers()
            .iter()
            .map(|(n, v)| {
                (
                    n.as_str().to_owned(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect::<Vec<_>>();
        let path = req
            .uri()
            .path_and_query()
            .map_or_else(|| req.uri().to_string(), ToString::to_string);
        seen = Some((path, headers));
        if let Some(p) = protocol {
            resp.headers_mut()
                .insert("Sec-WebSocket-Protocol", HeaderValue::from_static(p));
        }
        Ok(resp)
    };
    let ws = tokio::time::timeout(
        STEP,
        tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(ws_config())),
    )
    .await
    .ok()?
    .ok()?;
    let (path, headers) = seen?;
    Some(BackendConn { path, headers, ws })
}

/// What an echo backend connection observed, in order.
#[derive(Debug)]
pub enum Event {
    /// A message (data, ping, pong or close) as tungstenite delivered it.
    Msg(Message),
    /// A read or write error, after which the connection was dropped.
    Error(String),
    /// The stream ended (after a close handshake or a TCP close).
    End,
}

/// One echo backend connection: its request and the stream of what it observed.
pub struct EchoConn {
    /// The request target the gateway sent.
    pub path: String,
    /// The request headers, names lowercased.
    pub headers: Vec<(String, String)>,
    events: mpsc::UnboundedReceiver<Event>,
}

impl EchoConn {
    /// The next observed event; panics after [`STEP`].
    pub async fn next_event(&mut self) -> Event {
        within("echo backend event", self.events.recv())
            .await
            .unwrap_or(Event::End)
    }

    /// Skips data until a close arrives and returns its code and reason; panics if the
    /// connection ends or fails first.
    pub async fn expect_close(&mut self) -> Option<(u16, String)> {
        loop {
            match self.next_event().await {
                Event::Msg(msg) => {
                    if let Some(close) = close_of(&msg) {
                        return close;
                    }
                }
                other => panic!("echo backend saw {other:?} before any close frame"),
            }
        }
    }
}

/// A tungstenite backend that echoes every data message and records what it sees.
pub struct EchoBackend {
    /// Where it listens.
    pub addr: SocketAddr,
    conns: mpsc::UnboundedReceiver<EchoConn>,
    task: JoinHandle<()>,
}

impl EchoBackend {
    /// Listens on 127.0.0.1.
    pub async fn start() -> Self {
        let mut inner = WsBackend::start(None).await;
        let addr = inner.addr;
        let (tx, conns) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            while let Some(conn) = inner.conns.recv().await {
                let (etx, events) = mpsc::unbounded_channel();
                let _ = tx.send(EchoConn {
                    path: conn.path,
                    headers: conn.headers,
                    events,
                });
                tokio::spawn(echo_loop(conn.ws, etx));
            }
        });
        Self { addr, conns, task }
    }

    /// `ws://ADDR`.
    #[must_use]
    pub fn url(&self) -> String {
        format!("ws://{}", self.addr)
    }

    /// The next upgraded connection; panics after [`STEP`].
    pub async fn accept(&mut self) -> EchoConn {
        within("echo backend accept", self.conns.recv())
            .await
            .expect("echo backend accept loop ended")
    }

    /// How many connections were accepted and not yet taken by [`accept`](Self::accept).
    pub fn pending(&mut self) -> usize {
        let mut n = 0;
        while self.conns.try_recv().is_ok() {
            n += 1;
        }
        n
    }
}

impl Drop for EchoBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn echo_loop(mut ws: WsServer, events: mpsc::UnboundedSender<Event>) {
    while let Some(item) = ws.next().await {
        match item {
            Ok(msg) => {
                let echo =
                    matches!(msg, Message::Text(_) | Message::Binary(_)).then(|| msg.clone());
                let _ = events.send(Event::Msg(msg));
                if let Some(echo) = echo
                    && let Err(e) = ws.send(echo).await
                {
                    let _ = events.send(Event::Error(e.to_string()));
                    return;
                }
            }
            Err(e) => {
                let _ = events.send(Event::Error(e.to_string()));
                return;
            }
        }
    }
    let _ = events.send(Event::End);
}

// ---------------------------------------------------------------------------------------------
// Raw peers.
// ---------------------------------------------------------------------------------------------

/// A parsed HTTP/1.1 head (request or response).
#[derive(Clone, Debug)]
pub struct HttpHead {
    /// The start line (`HTTP/1.1 101 Switching Protocols` or `GET / HTTP/1.1`).
    pub start: String,
    /// The header fields, in order, as sent.
    pub headers: Vec<(String, String)>,
    /// Everything after the head that arrived with it (e.g. an error body).
    pub rest: Vec<u8>,
}

impl HttpHead {
    fn parse(head: &[u8], rest: Vec<u8>) -> Self {
        let text = String::from_utf8_lossy(head);
        let mut lines = text.split("\r\n");
        let start = lines.next().unwrap_or_default().to_owned();
        let headers = lines
            .filter(|l| !l.is_empty())
            .map(|l| match l.split_once(':') {
                Some((n, v)) => (n.trim().to_owned(), v.trim().to_owned()),
                None => (l.to_owned(), String::new()),
            })
            .collect();
        Self {
            start,
            headers,
            rest,
        }
    }

    /// The status code of a response head; panics on a request head.
    #[must_use]
    pub fn status(&self) -> u16 {
        self.start
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no status code in {:?}", self.start))
    }

    /// The request target of a request head.
    #[must_use]
    pub fn target(&self) -> &str {
        self.start.split_whitespace().nth(1).unwrap_or_default()
    }

    /// The first value of header `name` (case-insensitive).
    #[must_use]
    pub fn header(&self, name: &str) -> Option<&str> {
        header_in(&self.headers, name)
    }
}

/// Reads from `stream` into `buf` until a full head (`\r\n\r\n`) is buffered; returns the head
/// and leaves what follows in `buf`. `Err` carries what arrived before EOF or an error.
async fn read_head(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Result<HttpHead, String> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = buf[..end].to_vec();
            buf.drain(..end + 4);
            return Ok(HttpHead::parse(&head, Vec::new()));
        }
        let mut chunk = [0; 4096];
        match stream.read(&mut chunk).await {
            Ok(0) => {
                return Err(format!(
                    "EOF before the end of the head; got {:?}",
                    String::from_utf8_lossy(buf)
                ));
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => {
                return Err(format!(
                    "{e} before the end of the head; got {:?}",
                    String::from_utf8_lossy(buf)
                ));
            }
        }
    }
}

/// Sends `request` verbatim to `addr` and returns the response head (and whatever body
/// arrived before the gateway closed or [`STEP`] passed).
pub async fn http_exchange(addr: SocketAddr, request: &[u8]) -> HttpHead {
    within("raw HTTP exchange", async {
        let mut stream = TcpStream::connect(addr).await.expect("connect to gateway");
        // The gateway may answer (and close) before reading everything; a failed write is
        // judged by the response, not here.
        let _ = stream.write_all(request).await;
        let mut buf = Vec::new();
        let mut head = match read_head(&mut stream, &mut buf).await {
            Ok(h) => h,
            Err(e) => panic!("no HTTP response from the gateway: {e}"),
        };
        // Collect the body until EOF, an error, or a short quiet period.
        let mut chunk = [0; 4096];
        while let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_millis(300), stream.read(&mut chunk)).await
        {
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        head.rest = buf;
        head
    })
    .await
}

/// One WebSocket frame as read off the wire, payload already unmasked.
#[derive(Clone, Debug)]
pub struct RawFrame {
    /// FIN bit.
    pub fin: bool,
    /// RSV bits as on the wire.
    pub rsv: u8,
    /// The opcode.
    pub opcode: OpCode,
    /// The masking key the sender used, if any.
    pub mask: Option<[u8; 4]>,
    /// The unmasked payload.
    pub payload: Vec<u8>,
}

impl RawFrame {
    /// The close code of a close frame (`None` for an empty close payload).
    #[must_use]
    pub fn close_code(&self) -> Option<u16> {
        assert_eq!(self.opcode, OpCode::Close, "not a close frame: {self:?}");
        (self.payload.len() >= 2).then(|| u16::from_be_bytes([self.payload[0], self.payload[1]]))
    }
}

/// A WebSocket over a plain `TcpStream`, framed by hand with the `codec` crate.
pub struct RawWs {
    /// The socket.
    pub stream: TcpStream,
    buf: Vec<u8>,
    /// Which end we are: decides the masking we expect on reads and apply on writes.
    role: Role,
}

impl RawWs {
    /// Writes `bytes` verbatim.
    pub async fn send_raw(&mut self, bytes: &[u8]) {
        within("raw write", self.stream.write_all(bytes))
            .await
            .expect("raw write");
    }

    /// Writes one frame, masked with a fresh key when we are the client.
    pub async fn send(&mut self, fin: bool, opcode: OpCode, payload: &[u8]) {
        let mask = (self.role == Role::Client).then(fresh_key);
        let mut out = Vec::with_capacity(payload.len() + 14);
        write_frame(&mut out, fin, opcode, mask, payload);
        self.send_raw(&out).await;
    }

    /// Writes one frame masked with exactly `key`.
    pub async fn send_masked(&mut self, fin: bool, opcode: OpCode, key: [u8; 4], payload: &[u8]) {
        let mut out = Vec::with_capacity(payload.len() + 14);
        write_frame(&mut out, fin, opcode, Some(key), payload);
        self.send_raw(&out).await;
    }

    /// Writes one frame with RSV bits `rsv`, masked with a fresh key when we are the client.
    pub async fn send_rsv(&mut self, fin: bool, rsv: u8, opcode: OpCode, payload: &[u8]) {
        let mask = (self.role == Role::Client).then(fresh_key);
        let mut header = FrameHeader::new(fin, opcode, mask, payload.len() as u64);
        header.rsv = rsv;
        let mut head = [0; codec::frame::MAX_HEADER_LEN];
        let n = header.encode(&mut head);
        let mut out = head[..n].to_vec();
        let start = out.len();
        out.extend_from_slice(payload);
        if let Some(key) = mask {
            codec::mask::apply_mask(&mut out[start..], key);
        }
        self.send_raw(&out).await;
    }

    /// Writes a close frame with `code` and `reason`.
    pub async fn send_close(&mut self, code: u16, reason: &str) {
        let mut payload = code.to_be_bytes().to_vec();
        payload.extend_from_slice(reason.as_bytes());
        self.send(true, OpCode::Close, &payload).await;
    }

    /// Reads the next frame. `Ok(None)` on a clean EOF between frames; `Err` describes an
    /// I/O error, EOF inside a frame, or a frame that breaks the masking rule for our role.
    pub async fn try_read_frame(&mut self) -> Result<Option<RawFrame>, String> {
        loop {
            match FrameHeader::decode(&self.buf, self.role, 0x70) {
                Err(e) => return Err(format!("undecodable frame header: {e:?}")),
                Ok(Decoded::Header { header, len }) => {
                    let total = len + header.payload_len as usize;
                    if self.buf.len() >= total {
                        let mut payload = self.buf[len..total].to_vec();
                        self.buf.drain(..total);
                        if let Some(key) = header.mask {
                            codec::mask::apply_mask(&mut payload, key);
                        }
                        return Ok(Some(RawFrame {
                            fin: header.fin,
                            rsv: header.rsv,
                            opcode: header.opcode,
                            mask: header.mask,
                            payload,
                        }));
                    }
                }
                Ok(Decoded::Incomplete { .. }) => {}
            }
            let mut chunk = vec![0; 64 * 1024];
            match self.stream.read(&mut chunk).await {
                Ok(0) if self.buf.is_empty() => return Ok(None),
                Ok(0) => return Err(format!("EOF inside a frame ({} bytes)", self.buf.len())),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) => return Err(format!("read error: {e}")),
            }
        }
    }

    /// Reads the next frame; panics on EOF, error or after [`STEP`].
    pub async fn read_frame(&mut self) -> RawFrame {
        match within("raw frame read", self.try_read_frame()).await {
            Ok(Some(f)) => f,
            Ok(None) => panic!("connection closed while waiting for a frame"),
            Err(e) => panic!("reading a frame: {e}"),
        }
    }

    /// Reads frames until a close frame, skipping anything else, and returns it.
    pub async fn expect_close(&mut self) -> RawFrame {
        loop {
            let frame = self.read_frame().await;
            if frame.opcode == OpCode::Close {
                return frame;
            }
        }
    }

    /// Expects the peer to close the TCP connection within `limit`, with no further frames.
    /// A reset counts as closed.
    pub async fn expect_eof(&mut self, limit: Duration) {
        let res = within_for(limit, "TCP close by the peer", self.try_read_frame()).await;
        match res {
            Ok(None) => {}
            Err(e) if e.starts_with("read error") => {}
            Ok(Some(f)) => panic!("expected EOF, got a frame {f:?}"),
            Err(e) => panic!("expected EOF, got {e}"),
        }
    }
}

/// The key every raw client sends (a valid 16-byte nonce).
pub const RAW_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// Opens a raw WebSocket through the gateway: `GET path` with `Host: host`, the usual upgrade
/// fields and `extra` header lines; panics unless the answer is a valid 101.
pub async fn raw_client(
    addr: SocketAddr,
    path: &str,
    host: &str,
    extra: &[(&str, &str)],
) -> (RawWs, HttpHead) {
    let mut req = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {RAW_KEY}\r\nSec-WebSocket-Version: 13\r\n"
    );
    for (n, v) in extra {
        let _ = write!(req, "{n}: {v}\r\n");
    }
    req.push_str("\r\n");
    within("raw client handshake", async {
        let mut stream = TcpStream::connect(addr).await.expect("connect to gateway");
        stream.set_nodelay(true).expect("nodelay");
        stream
            .write_all(req.as_bytes())
            .await
            .expect("write request");
        let mut buf = Vec::new();
        let head = read_head(&mut stream, &mut buf)
            .await
            .unwrap_or_else(|e| panic!("raw client handshake: {e}"));
        assert_eq!(head.status(), 101, "raw client handshake refused: {head:?}");
        assert_eq!(
            head.header("sec-websocket-accept"),
            Some(codec::handshake::accept_key(RAW_KEY.as_bytes()).as_str()),
            "wrong Sec-WebSocket-Accept in {head:?}"
        );
        let ws = RawWs {
            stream,
            buf,
            role: Role::Client,
        };
        (ws, head)
    })
    .await
}

/// A raw backend: completes each upgrade by hand and hands the socket to the test.
pub struct RawBackend {
    /// Where it listens.
    pub addr: SocketAddr,
    conns: mpsc::UnboundedReceiver<(HttpHead, RawWs)>,
    task: JoinHandle<()>,
}

impl RawBackend {
    /// Listens on 127.0.0.1.
    pub async fn start() -> Self {
        Self::start_with("").await
    }

    /// Listens on 127.0.0.1 and adds `extra` (complete `Name: value\r\n` lines) to every 101.
    pub async fn start_with(extra: &'static str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind raw backend");
        let addr = listener.local_addr().expect("raw backend address");
        let (tx, conns) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let _ = stream.set_nodelay(true);
                let mut buf = Vec::new();
                let Ok(head) = read_head(&mut stream, &mut buf).await else {
                    continue;
                };
                let key = head.header("sec-websocket-key").unwrap_or_default();
                let resp = format!(
                    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
                     Connection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n{extra}\r\n",
                    codec::handshake::accept_key(key.as_bytes())
                );
                if stream.write_all(resp.as_bytes()).await.is_err() {
                    continue;
                }
                let ws = RawWs {
                    stream,
                    buf,
                    role: Role::Server,
                };
                let _ = tx.send((head, ws));
            }
        });
        Self { addr, conns, task }
    }

    /// `ws://ADDR`.
    #[must_use]
    pub fn url(&self) -> String {
        format!("ws://{}", self.addr)
    }

    /// The next upgraded connection and its request head; panics after [`STEP`].
    pub async fn accept(&mut self) -> (HttpHead, RawWs) {
        within("raw backend accept", self.conns.recv())
            .await
            .expect("raw backend accept loop ended")
    }
}

impl Drop for RawBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A backend that answers every request with a fixed HTTP status and closes.
pub struct StatusBackend {
    /// Where it listens.
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl StatusBackend {
    /// Listens on 127.0.0.1 and answers `status` (e.g. 403).
    pub async fn start(status: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind status backend");
        let addr = listener.local_addr().expect("status backend address");
        let reason = StatusCode::from_u16(status)
            .ok()
            .and_then(|s| s.canonical_reason())
            .unwrap_or("Status");
        let resp = format!(
            "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\nContent-Length: 7\r\n\
             Connection: close\r\n\r\nnope!\r\n"
        );
        let task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let resp = resp.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    if read_head(&mut stream, &mut buf).await.is_ok() {
                        let _ = stream.write_all(resp.as_bytes()).await;
                        let _ = stream.shutdown().await;
                        // Linger until the gateway closes, so our close cannot race the answer.
                        let mut sink = [0; 256];
                        let _ = tokio::time::timeout(STEP, stream.read(&mut sink)).await;
                    }
                });
            }
        });
        Self { addr, task }
    }

    /// `ws://ADDR`.
    #[must_use]
    pub fn url(&self) -> String {
        format!("ws://{}", self.addr)
    }
}

impl Drop for StatusBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub mod config;

// ---------------------------------------------------------------------------------------------
// A gateway run expected to exit on its own.
// ---------------------------------------------------------------------------------------------

/// How a gateway run that was expected to exit ended.
pub struct Exit {
    /// The exit code; `None` if a signal ended it, or if it was still running after [`STEP`]
    /// and was killed.
    pub code: Option<i32>,
    /// Everything it printed to stdout.
    pub stdout: String,
    /// Everything it printed to stderr.
    pub stderr: String,
}

/// Runs the gateway binary with `args` to its exit (killed after [`STEP`], which a refusal
/// must not take).
#[must_use]
pub fn run_to_exit(args: &[&str]) -> Exit {
    let mut child = Command::new(env!("CARGO_BIN_EXE_gateway"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the gateway binary");
    let deadline = Instant::now() + STEP;
    let mut exited = false;
    while Instant::now() < deadline {
        if child.try_wait().expect("try_wait").is_some() {
            exited = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    if !exited {
        let _ = child.kill();
    }
    let out = child.wait_with_output().expect("collect output");
    Exit {
        code: if exited { out.status.code() } else { None },
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}
