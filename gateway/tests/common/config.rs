//! Helpers for the tests that run the gateway from a `--config` file: a temporary config file
//! that a test can rewrite (for reloads), the gateway process started from it (its own guard,
//! since it must find the `listen` field in text and in JSON logs), a backend that tags every
//! reply with its name, the admin plane's HTTP endpoints, and the Prometheus text they serve.
//!
//! Every wait here is bounded, like the rest of the harness.

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::ops::{Deref, DerefMut};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

use futures_util::{SinkExt as _, StreamExt as _};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::JoinHandle;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::{self, Message};

use super::{Gateway, STEP, http_exchange, raw_client, within, within_for, ws_config};

// ---------------------------------------------------------------------------------------------
// The configuration file.
// ---------------------------------------------------------------------------------------------

/// A configuration file under the temp dir with a unique name (pid and counter), removed when
/// dropped.
pub struct TempConfig {
    path: PathBuf,
}

impl TempConfig {
    /// Writes `text` to a fresh file.
    #[must_use]
    pub fn new(text: &str) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "wsgate-e2e-{}-{}.toml",
            std::process::id(),
            NEXT.fetch_add(1, Relaxed)
        ));
        let file = Self { path };
        file.write(text);
        file
    }

    /// Where the file lives.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The path as a command-line argument.
    #[must_use]
    pub fn arg(&self) -> &str {
        self.path.to_str().expect("a UTF-8 temp path")
    }

    /// Replaces the contents atomically (a sibling file renamed over it), so a reload can
    /// never read a half-written file.
    pub fn write(&self, text: &str) {
        let tmp = self.path.with_extension("toml.tmp");
        std::fs::write(&tmp, text).expect("write the config file");
        std::fs::rename(&tmp, &self.path).expect("move the config file into place");
    }
}

impl Drop for TempConfig {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        let _ = std::fs::remove_file(self.path.with_extension("toml.tmp"));
    }
}

/// The `[server]` and `[[listener]]` sections every test config starts with: one core, one
/// listener on a free port, the admin listener on `admin` if given, and `extra` lines for
/// `[server]`.
#[must_use]
pub fn preamble(admin: Option<SocketAddr>, extra: &str) -> String {
    let admin = admin.map_or_else(String::new, |a| format!("admin = \"{a}\"\n"));
    format!("[server]\ncores = 1\n{admin}{extra}\n[[listener]]\naddress = \"127.0.0.1:0\"\n\n")
}

// ---------------------------------------------------------------------------------------------
// The gateway process.
// ---------------------------------------------------------------------------------------------

/// A gateway started from a config file (or from exact arguments); it owns the file, which
/// outlives the process. Everything else is [`Gateway`]'s.
pub struct ConfigGateway {
    gateway: Gateway,
    file: Option<TempConfig>,
}

impl ConfigGateway {
    /// Writes `config` to a temp file, starts `gateway --config FILE`, and waits for its
    /// `listen` field.
    #[must_use]
    pub fn start(config: &str) -> Self {
        let file = TempConfig::new(config);
        let gateway = Gateway::start_exact(&["--config", file.arg()]);
        Self {
            gateway,
            file: Some(file),
        }
    }

    /// Starts `gateway` with exactly `args` (nothing added) and waits for its `listen` field.
    #[must_use]
    pub fn start_args(args: &[&str]) -> Self {
        Self {
            gateway: Gateway::start_exact(args),
            file: None,
        }
    }

    /// The config file this gateway was started from.
    #[must_use]
    pub fn config(&self) -> &TempConfig {
        self.file.as_ref().expect("started from a config file")
    }
}

impl Deref for ConfigGateway {
    type Target = Gateway;

    fn deref(&self) -> &Gateway {
        &self.gateway
    }
}

impl DerefMut for ConfigGateway {
    fn deref_mut(&mut self) -> &mut Gateway {
        &mut self.gateway
    }
}

// ---------------------------------------------------------------------------------------------
// Raw requests.
// ---------------------------------------------------------------------------------------------

/// A complete upgrade request for `path` with `Host: host` and `extra` header lines.
#[must_use]
pub fn upgrade_request(path: &str, host: &str, extra: &[(&str, &str)]) -> Vec<u8> {
    let mut req = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {}\r\nSec-WebSocket-Version: 13\r\n",
        super::RAW_KEY
    );
    for (n, v) in extra {
        let _ = write!(req, "{n}: {v}\r\n");
    }
    req.push_str("\r\n");
    req.into_bytes()
}

/// Sends an upgrade request that the gateway is expected to refuse; returns the status and
/// the body.
pub async fn refusal(
    addr: SocketAddr,
    path: &str,
    host: &str,
    extra: &[(&str, &str)],
) -> (u16, String) {
    let head = http_exchange(addr, &upgrade_request(path, host, extra)).await;
    (
        head.status(),
        String::from_utf8_lossy(&head.rest).into_owned(),
    )
}

/// Upgrades a raw client with `Host: host`, reads the first frame (a [`TagBackend`]'s
/// greeting), closes cleanly, and returns the greeting.
pub async fn greeting(addr: SocketAddr, path: &str, host: &str, extra: &[(&str, &str)]) -> String {
    let (mut ws, _) = raw_client(addr, path, host, extra).await;
    let frame = ws.read_frame().await;
    let tag = String::from_utf8(frame.payload).expect("a text greeting");
    ws.send_close(1000, "").await;
    let close = ws.expect_close().await;
    assert_eq!(
        close.close_code(),
        Some(1000),
        "close reply for {host}{path}"
    );
    tag
}

/// A tungstenite client connection over a socket bound to `ip` (any 127.0.0.0/8 address is
/// local on Linux), so a test can play several client addresses.
pub type FromClient = WebSocketStream<TcpStream>;

/// Connects from `ip` and upgrades to `url`; `Err` carries the HTTP status of a refusal.
pub async fn connect_from(ip: IpAddr, addr: SocketAddr, url: &str) -> Result<FromClient, u16> {
    within("client handshake from a chosen address", async {
        let socket = TcpSocket::new_v4().expect("socket");
        socket
            .bind(SocketAddr::new(ip, 0))
            .unwrap_or_else(|e| panic!("bind {ip}: {e}"));
        let stream = socket.connect(addr).await.expect("connect to gateway");
        match tokio_tungstenite::client_async_with_config(url, stream, Some(ws_config())).await {
            Ok((ws, _)) => Ok(ws),
            Err(tungstenite::Error::Http(resp)) => Err(resp.status().as_u16()),
            Err(e) => panic!("handshake from {ip} failed without a status: {e}"),
        }
    })
    .await
}

/// Polls `cond` every 10 ms for up to `limit`, panicking with `what` if it never holds.
pub async fn wait_until(limit: Duration, what: &str, mut cond: impl AsyncFnMut() -> bool) {
    within_for(limit, what, async {
        while !cond().await {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// A backend that names itself.
// ---------------------------------------------------------------------------------------------

/// A tungstenite backend that greets every upgraded client with a text message holding its
/// tag, answers each text message `m` with `"{tag}:{m}"`, echoes binary messages, and counts
/// the upgrades it completed.
pub struct TagBackend {
    /// Where it listens.
    pub addr: SocketAddr,
    upgrades: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl TagBackend {
    /// Listens on 127.0.0.1.
    pub async fn start(tag: &'static str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind tag backend");
        let addr = listener.local_addr().expect("tag backend address");
        let upgrades = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&upgrades);
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve_tagged(stream, tag, Arc::clone(&count)));
            }
        });
        Self {
            addr,
            upgrades,
            task,
        }
    }

    /// `ws://ADDR`.
    #[must_use]
    pub fn url(&self) -> String {
        format!("ws://{}", self.addr)
    }

    /// Upgrades completed so far.
    #[must_use]
    pub fn upgrades(&self) -> usize {
        self.upgrades.load(Relaxed)
    }
}

impl Drop for TagBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve_tagged(stream: TcpStream, tag: &'static str, upgrades: Arc<AtomicUsize>) {
    let _ = stream.set_nodelay(true);
    let accepted = tokio::time::timeout(
        STEP,
        tokio_tungstenite::accept_async_with_config(stream, Some(ws_config())),
    )
    .await;
    let Ok(Ok(mut ws)) = accepted else {
        return;
    };
    upgrades.fetch_add(1, Relaxed);
    if ws.send(Message::Text(tag.to_owned())).await.is_err() {
        return;
    }
    // tungstenite answers a close on its own while reading; the loop ends after it.
    while let Some(Ok(msg)) = ws.next().await {
        let reply = match msg {
            Message::Text(text) => Message::Text(format!("{tag}:{text}")),
            Message::Binary(data) => Message::Binary(data),
            _ => continue,
        };
        if ws.send(reply).await.is_err() {
            return;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The admin plane.
// ---------------------------------------------------------------------------------------------

/// Sends `METHOD path` to the admin listener (with its own address as `Host`, which it
/// requires) and reads the answer to its end; returns the status and the body.
pub async fn admin_request(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    within("admin request", async {
        let mut stream = TcpStream::connect(addr).await.expect("connect to admin");
        let request =
            format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\n\r\n");
        stream
            .write_all(request.as_bytes())
            .await
            .expect("write admin request");
        let mut raw = Vec::new();
        stream
            .read_to_end(&mut raw)
            .await
            .expect("read admin response");
        let text = String::from_utf8(raw).expect("a UTF-8 admin response");
        let (head, body) = text
            .split_once("\r\n\r\n")
            .unwrap_or_else(|| panic!("no complete head in {text:?}"));
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no status in {head:?}"));
        (status, body.to_owned())
    })
    .await
}

/// `GET /metrics`, which must answer 200; returns the exposition text.
pub async fn scrape(admin: SocketAddr) -> String {
    let (status, body) = admin_request(admin, "GET", "/metrics").await;
    assert_eq!(status, 200, "GET /metrics: {body}");
    body
}

/// The value of the sample `series` (the metric name with its labels exactly as rendered,
/// e.g. `wsgate_upgrades_total{status="101"}`), if present. Counters and gauges here are
/// whole numbers (a fraction, such as a histogram's `_sum`, panics).
#[must_use]
pub fn metric(text: &str, series: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let value = line.strip_prefix(series)?.strip_prefix(' ')?;
        Some(
            value
                .parse()
                .unwrap_or_else(|e| panic!("{series}: bad value {value:?}: {e}")),
        )
    })
}

/// [`metric`], panicking if the series is missing.
#[must_use]
pub fn sample(text: &str, series: &str) -> u64 {
    metric(text, series).unwrap_or_else(|| panic!("no sample {series} in:\n{text}"))
}

/// Scrapes until `series` satisfies `pred` (up to `limit`); returns that scrape.
pub async fn wait_metric(
    admin: SocketAddr,
    series: &str,
    limit: Duration,
    pred: impl Fn(u64) -> bool,
) -> String {
    let deadline = Instant::now() + limit;
    loop {
        let text = scrape(admin).await;
        if metric(&text, series).is_some_and(&pred) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "{series} never reached the expected value within {limit:?}; last scrape:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
