//! The access log: one stderr line per finished connection, with the documented fields.

pub mod common;

use std::time::Duration;

use codec::frame::OpCode;
use common::{
    EchoBackend, Gateway, WsBackend, close_frame, connect, drain_to_end, echo_then_close, field,
    raw_client, within,
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
