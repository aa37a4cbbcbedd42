//! End-to-end handshake tests: refused client handshakes (400, 405, 426, 431), unreachable and
//! refusing backends (502, failover, 403), round-robin, subprotocol choice, and the headers the
//! backend receives.

pub mod common;

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use codec::frame::{OpCode, RSV1};
use common::{
    EchoBackend, Gateway, HttpHead, RAW_KEY, RawBackend, StatusBackend, WsBackend, connect,
    http_exchange, raw_client, recv_data, refused_status, refusing_addr, send, within, within_for,
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

/// A valid upgrade request's header lines (no final blank line), with `method` and `version`.
fn upgrade_head(method: &str, version: &str) -> String {
    format!(
        "{method} /chat HTTP/1.1\r\nHost: gw.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {RAW_KEY}\r\nSec-WebSocket-Version: {version}\r\n"
    )
}

async fn refused(gw: &Gateway, request: &str, want: u16) -> HttpHead {
    let head = http_exchange(gw.addr, request.as_bytes()).await;
    assert_eq!(head.status(), want, "answer to {request:?}: {head:?}");
    head
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_request_gives_400() {
    let gw = Gateway::start(&[]);
    refused(&gw, "\x01\x02 garbage\r\n\r\n", 400).await;
    refused(
        &gw,
        &format!(
            "{}No colon in this header line\r\n\r\n",
            upgrade_head("GET", "13")
        ),
        400,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_get_gives_405_with_allow() {
    let gw = Gateway::start(&[]);
    let head = refused(&gw, &format!("{}\r\n", upgrade_head("POST", "13")), 405).await;
    assert_eq!(head.header("allow"), Some("GET"), "{head:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_get_gives_426_with_version() {
    let gw = Gateway::start(&[]);
    let head = refused(&gw, "GET / HTTP/1.1\r\nHost: gw.test\r\n\r\n", 426).await;
    assert_eq!(head.header("sec-websocket-version"), Some("13"), "{head:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_websocket_version_gives_426_with_version() {
    let gw = Gateway::start(&[]);
    let head = refused(&gw, &format!("{}\r\n", upgrade_head("GET", "8")), 426).await;
    assert_eq!(head.header("sec-websocket-version"), Some("13"), "{head:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_or_missing_key_gives_400() {
    let gw = Gateway::start(&[]);
    let missing = "GET / HTTP/1.1\r\nHost: gw.test\r\nUpgrade: websocket\r\n\
                   Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\r\n";
    refused(&gw, missing, 400).await;
    let short = missing.replace("\r\n\r\n", "\r\nSec-WebSocket-Key: c2hvcnQ=\r\n\r\n");
    refused(&gw, &short, 400).await;
    let junk = missing.replace(
        "\r\n\r\n",
        "\r\nSec-WebSocket-Key: !!!!!!!!!!!!!!!!!!!!!!==\r\n\r\n",
    );
    refused(&gw, &junk, 400).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_head_gives_431() {
    // Default limit (8 KiB).
    let gw = Gateway::start(&[]);
    let filler = "a".repeat(9 * 1024);
    let req = format!("{}X-Filler: {filler}\r\n\r\n", upgrade_head("GET", "13"));
    refused(&gw, &req, 431).await;
    // A configured limit.
    let small = Gateway::start(&["--max-header-bytes", "1024"]);
    let filler = "b".repeat(1200);
    let req = format!("{}X-Filler: {filler}\r\n\r\n", upgrade_head("GET", "13"));
    refused(&small, &req, 431).await;
    // Just under the configured limit still upgrades.
    let (mut ws, _) = raw_client(small.addr, "/", "gw.test", &[("X-Filler", "c")]).await;
    ws.send(true, OpCode::Text, b"still fine").await;
    assert_eq!(ws.read_frame().await.payload, b"still fine");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_headers_gives_431() {
    let gw = Gateway::start(&[]);
    let mut req = upgrade_head("GET", "13");
    for i in 0..200 {
        let _ = write!(req, "X-H{i}: {i}\r\n");
    }
    req.push_str("\r\n");
    assert!(req.len() < 4096, "the head must stay under the byte limit");
    refused(&gw, &req, 431).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_backend_gives_502() {
    let down = refusing_addr();
    let down = down.addr;
    let gw = Gateway::start(&[
        "--backend",
        &format!("ws://{down}"),
        "--connect-timeout",
        "2s",
    ]);
    assert_eq!(refused_status(&gw.url("/")).await, 502);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_backend_down_fails_over_to_second() {
    let down = refusing_addr();
    let down = down.addr;
    let mut backend = EchoBackend::start().await;
    let gw = Gateway::start(&[
        "--backend",
        &format!("ws://{down}"),
        "--backend",
        &backend.url(),
    ]);
    for i in 0..3 {
        let mut ws = connect(&gw.url("/failover")).await;
        let text = format!("via the second backend {i}");
        send(&mut ws, Message::Text(text.clone())).await;
        assert_eq!(recv_data(&mut ws).await, Message::Text(text));
        let _ = backend.accept().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_spreads_connections() {
    let mut a = EchoBackend::start().await;
    let mut b = EchoBackend::start().await;
    let gw = Gateway::start(&["--backend", &a.url(), "--backend", &b.url()]);
    let mut clients = Vec::new();
    for _ in 0..4 {
        let mut ws = connect(&gw.url("/rr")).await;
        send(&mut ws, Message::Text("x".into())).await;
        assert_eq!(recv_data(&mut ws).await, Message::Text("x".into()));
        clients.push(ws);
    }
    let (na, nb) = (a.pending(), b.pending());
    assert_eq!(na + nb, 4);
    assert!(
        na == 2 && nb == 2,
        "round-robin over two backends gave {na} and {nb}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_403_reaches_client() {
    let backend = StatusBackend::start(403).await;
    let gw = Gateway::start(&["--backend", &backend.url()]);
    assert_eq!(refused_status(&gw.url("/")).await, 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_chosen_subprotocol_reaches_client() {
    let mut backend = WsBackend::start(Some("b")).await;
    let gw = Gateway::start(&["--backend", &backend.url()]);
    let (mut client, head) = raw_client(
        gw.addr,
        "/sub",
        "gw.test",
        &[("Sec-WebSocket-Protocol", "a, b")],
    )
    .await;
    assert_eq!(head.header("sec-websocket-protocol"), Some("b"), "{head:?}");
    let protocol_headers = head
        .headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("sec-websocket-protocol"))
        .count();
    assert_eq!(protocol_headers, 1, "{head:?}");
    assert_eq!(head.header("sec-websocket-extensions"), None, "{head:?}");
    let mut up = backend.accept().await;
    let offered = up.header("sec-websocket-protocol").map(str::to_owned);
    assert_eq!(offered.as_deref(), Some("a, b"), "offer the backend saw");
    client.send(true, OpCode::Text, b"sub").await;
    assert_eq!(recv_data(&mut up.ws).await, Message::Text("sub".into()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_headers_reach_backend() {
    let mut backend = WsBackend::start(Some("chat.v1")).await;
    let gw = Gateway::start(&["--backend", &format!("{}/prefix", backend.url())]);
    let extra = [
        ("Sec-WebSocket-Protocol", "chat.v1"),
        ("Sec-WebSocket-Extensions", "x-test-ext; p=1"),
        ("Origin", "https://origin.test"),
        ("Cookie", "session=abc; theme=dark"),
        ("Authorization", "Bearer t0ken"),
        ("User-Agent", "gateway-e2e/1.0"),
    ];
    let (mut client, head) = raw_client(gw.addr, "/room/42?user=x&y=1", "front.test", &extra).await;
    assert_eq!(
        head.header("sec-websocket-protocol"),
        Some("chat.v1"),
        "{head:?}"
    );
    assert_eq!(head.header("sec-websocket-extensions"), None, "{head:?}");
    let up = within("backend handshake", backend.accept()).await;
    assert_eq!(
        up.path, "/prefix/room/42?user=x&y=1",
        "request target at the backend"
    );
    for (name, value) in extra {
        assert_eq!(
            up.header(name),
            Some(value),
            "{name} at the backend: {:?}",
            up.headers
        );
    }
    let expected = [
        ("X-Forwarded-For", "127.0.0.1"),
        ("X-Forwarded-Proto", "http"),
        ("X-Forwarded-Host", "front.test"),
    ];
    for (name, value) in expected {
        assert_eq!(
            up.header(name),
            Some(value),
            "{name} at the backend: {:?}",
            up.headers
        );
    }
    // RFC 7239 allows each value as a token or a quoted-string: compare the parsed pairs.
    let forwarded = up.header("forwarded").unwrap_or_default();
    let pairs: Vec<(String, &str)> = forwarded
        .split(';')
        .filter_map(|pair| pair.trim().split_once('='))
        .map(|(k, v)| (k.to_ascii_lowercase(), v.trim_matches('"')))
        .collect();
    let want = [
        ("for", "127.0.0.1"),
        ("host", "front.test"),
        ("proto", "http"),
    ];
    assert_eq!(
        pairs
            .iter()
            .map(|(k, v)| (k.as_str(), *v))
            .collect::<Vec<_>>(),
        want,
        "Forwarded at the backend: {forwarded:?}"
    );
    assert_ne!(
        up.header("sec-websocket-key"),
        None,
        "the upstream request has its own key"
    );
    client.send(true, OpCode::Text, b"after headers").await;
    let mut ws = up.ws;
    assert_eq!(
        recv_data(&mut ws).await,
        Message::Text("after headers".into())
    );
}

/// The extension the backend chose reaches the client verbatim, and frames of that extension
/// (RSV1 set) are then relayed as sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_chosen_extension_reaches_client() {
    let mut backend =
        RawBackend::start_with("Sec-WebSocket-Extensions: permessage-deflate\r\n").await;
    let gw = Gateway::start(&["--backend", &backend.url()]);
    let offer = "permessage-deflate; client_max_window_bits";
    let (mut client, head) = raw_client(
        gw.addr,
        "/ext",
        "gw.test",
        &[("Sec-WebSocket-Extensions", offer)],
    )
    .await;
    assert_eq!(
        head.header("sec-websocket-extensions"),
        Some("permessage-deflate"),
        "{head:?}"
    );
    let (up_head, mut up) = backend.accept().await;
    assert_eq!(
        up_head.header("sec-websocket-extensions"),
        Some(offer),
        "{up_head:?}"
    );
    // A "compressed" binary message each way: RSV1 is legal now and must survive the relay.
    client
        .send_rsv(true, RSV1, OpCode::Binary, b"\x01\x02\x03")
        .await;
    let f = up.read_frame().await;
    assert_eq!(
        (f.rsv, f.opcode, f.payload.as_slice()),
        (RSV1, OpCode::Binary, &b"\x01\x02\x03"[..])
    );
    up.send_rsv(true, RSV1, OpCode::Binary, b"\x04\x05").await;
    let f = client.read_frame().await;
    assert_eq!(
        (f.rsv, f.opcode, f.payload.as_slice()),
        (RSV1, OpCode::Binary, &b"\x04\x05"[..])
    );
}

/// A client that never finishes its handshake is dropped after `--handshake-timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_timeout_drops_slow_client() {
    let gw = Gateway::start(&["--handshake-timeout", "500ms"]);
    let mut stream = TcpStream::connect(gw.addr).await.expect("connect");
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: gw.test\r\n")
        .await
        .expect("partial head");
    let start = Instant::now();
    let mut sink = Vec::new();
    // Whatever the gateway says (a 408 or nothing), it must close the connection.
    let _ = within_for(
        Duration::from_secs(4),
        "the gateway dropping a stalled handshake",
        stream.read_to_end(&mut sink),
    )
    .await;
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(300),
        "dropped after {waited:?}, before the handshake timeout"
    );
}
