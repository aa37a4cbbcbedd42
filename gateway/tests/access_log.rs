//! The access log: one stderr line per finished connection, with the documented fields.

pub mod common;

use std::io::{BufRead as _, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use codec::frame::OpCode;
use common::{
    EchoBackend, Gateway, WsBackend, close_frame, connect, drain_to_end, echo_then_close, field,
    raw_client, within, within_for,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_line_for_finished_connection() {
    let mut backend = EchoBackend::start().await;
    let gw = Gateway::start(&["--backend", &backend.url()]);
    let mut ws = connect(&gw.url("/logged?q=1")).await;
    echo_then_close(&mut ws, "hello").await;
    let _ = backend.accept().await;

    let line = gw
        .wait_line(Duration::from_secs(3), |l| l.contains("closed_by="))
        .await
        .unwrap_or_else(|| panic!("no access line; stderr:\n{}", gw.stderr()));
    for name in [
        "client",
        "path",
        "backend",
        "duration_ms",
        "bytes_in",
        "bytes_out",
        "close_code",
        "closed_by",
        "route",
        "close_reason",
    ] {
        assert!(field(&line, name).is_some(), "no {name}= in {line:?}");
    }
    let get = |name| field(&line, name).unwrap_or_default();
    assert!(get("client").starts_with("127.0.0.1"), "{line}");
    assert!(get("path").starts_with("/logged"), "{line}");
    assert!(
        get("backend").contains(&backend.addr.port().to_string()),
        "backend= does not name {}: {line}",
        backend.addr
    );
    get("duration_ms")
        .parse::<f64>()
        .unwrap_or_else(|e| panic!("duration_ms not a number ({e}): {line}"));
    for name in ["bytes_in", "bytes_out"] {
        let n: u64 = get(name)
            .parse()
            .unwrap_or_else(|e| panic!("{name} not a number ({e}): {line}"));
        assert!(n >= 5, "{name}={n} is less than the 5-byte message: {line}");
    }
    assert_eq!(get("close_code"), "1000", "{line}");
    assert_eq!(get("closed_by"), "client", "{line}");
    assert_eq!(get("route"), "/", "{line}");
    assert_eq!(get("close_reason"), "client sent close", "{line}");
    let count = gw
        .stderr()
        .lines()
        .filter(|l| l.contains("closed_by="))
        .count();
    assert_eq!(
        count,
        1,
        "one connection, {count} access lines:\n{}",
        gw.stderr()
    );
}

/// Waits for the single access line and returns it.
async fn access_line(gw: &Gateway) -> String {
    gw.wait_line(Duration::from_secs(3), |l| l.contains("closed_by="))
        .await
        .unwrap_or_else(|| panic!("no access line; stderr:\n{}", gw.stderr()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_line_names_backend_as_closer() {
    let mut backend = WsBackend::start(None).await;
    let gw = Gateway::start(&["--backend", &backend.url()]);
    let mut ws = connect(&gw.url("/by-backend")).await;
    let mut up = backend.accept().await;
    within(
        "backend close",
        up.ws.close(Some(close_frame(4001, "server done"))),
    )
    .await
    .expect("backend close");
    let ((), ()) = tokio::join!(drain_to_end(&mut ws), drain_to_end(&mut up.ws));
    // A server closes its TCP once the close handshake is done; the gateway (a client to the
    // backend) waits for that FIN, up to the close timeout, before it logs.
    drop(up);
    let line = access_line(&gw).await;
    assert_eq!(field(&line, "close_code"), Some("4001"), "{line}");
    assert_eq!(field(&line, "closed_by"), Some("backend"), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_line_names_gateway_as_closer_on_violation() {
    let gw = Gateway::start(&[]);
    let (mut client, _) = raw_client(gw.addr, "/by-gateway", "gw.test", &[]).await;
    client.send(true, OpCode::Text, b"\xFF").await;
    assert_eq!(client.expect_close().await.close_code(), Some(1007));
    client.send_close(1007, "").await;
    client.expect_eof(Duration::from_secs(2)).await;
    // Close our side too: the gateway waits (up to the close timeout) for the client's FIN.
    drop(client);
    let line = access_line(&gw).await;
    assert_eq!(field(&line, "close_code"), Some("1007"), "{line}");
    assert_eq!(field(&line, "closed_by"), Some("gateway"), "{line}");
}

/// How long the start line may take.
const STARTUP_LINE: Duration = Duration::from_secs(5);

/// A gateway process killed however the test ends.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        drop(self.0.kill());
        drop(self.0.wait());
    }
}

/// Nobody reads the gateway's stderr (a stalled log shipper, a full pipe): logging must not
/// stall the connections, so lines are queued and, past the queue, dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unread_stderr_never_stalls_connections() {
    let addr = common::free_addr();
    let mut child = Killed(
        Command::new(env!("CARGO_BIN_EXE_gateway"))
            .args(["--listen", &addr.to_string(), "--cores", "1"])
            .stderr(Stdio::piped())
            .spawn()
            .expect("gateway starts"),
    );
    // Read up to the start line, then never again: the pipe (64 KiB) fills after a few hundred
    // access lines.
    let mut stderr = BufReader::new(child.0.stderr.take().expect("stderr"));
    let mut line = String::new();
    while !line.contains("gateway listening") {
        line.clear();
        assert!(
            stderr.read_line(&mut line).expect("read stderr") > 0,
            "the gateway exited before listening"
        );
    }
    let url = format!("ws://{addr}/");
    within_for(
        Duration::from_secs(60),
        "1,500 connections with nobody reading stderr",
        Box::pin(async {
            for i in 0..1500 {
                let mut ws = connect(&url).await;
                echo_then_close(&mut ws, &format!("message {i}")).await;
            }
        }),
    )
    .await;
    drop(child);
    drop(stderr);
}

/// Log fields are plain text: no Rust `Debug` rendering (`Some(..)`, `[..]`) in the start line,
/// and the JSON form's list fields are strings of comma-separated values, not `"[]"`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_line_has_no_debug_text() {
    let backend = EchoBackend::start().await;
    let admin = common::free_addr().to_string();
    let gw = Gateway::start(&["--backend", &backend.url(), "--admin", &admin]);
    let line = gw
        .wait_line(STARTUP_LINE, |l| l.contains("gateway listening"))
        .await
        .unwrap_or_else(|| panic!("no start line; stderr:\n{}", gw.stderr()));
    assert!(!line.contains("Some("), "{line}");
    assert!(!line.contains('['), "{line}");
    assert_eq!(field(&line, "admin"), Some(admin.as_str()), "{line}");
    assert_eq!(
        field(&line, "backends"),
        Some(backend.url().as_str()),
        "{line}"
    );
    let limit = field(&line, "nofile_limit").unwrap_or_default();
    assert!(
        limit.parse::<u64>().is_ok() || limit == "unlimited",
        "{line}"
    );

    let json = Gateway::start(&["--log-format", "json"]);
    let line = json
        .wait_line(STARTUP_LINE, |l| l.contains("gateway listening"))
        .await
        .unwrap_or_else(|| panic!("no start line; stderr:\n{}", json.stderr()));
    let value: serde_json::Value = serde_json::from_str(&line).expect("a JSON line");
    assert_eq!(value["backends"], "", "{line}");
    assert_eq!(value["admin"], "off", "{line}");
}
