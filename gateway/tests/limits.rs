//! Admission limits end to end, from a config file: connections per client IP and in total
//! (429 before the upgrade, and a slot frees when a connection closes), the handshake timeout
//! that drops slowloris clients, and the request head limit (431).

pub mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use common::config::{ConfigGateway, FromClient, connect_from, preamble, refusal};
use common::{close_frame, drain_to_end, http_exchange, raw_client, recv_data, send, within};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

fn ip(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
}

fn echo_config(limits: &str) -> String {
    format!(
        "{}[limits]\n{limits}\n[[route]]\nupstream = \"echo\"\n",
        preamble(None, "")
    )
}

/// Opens a client from `from` that must be admitted, and checks it echoes.
async fn admitted(gw: &ConfigGateway, from: IpAddr) -> FromClient {
    let mut ws = connect_from(from, gw.addr, &gw.url("/"))
        .await
        .unwrap_or_else(|status| panic!("client from {from} refused with {status}"));
    send(&mut ws, Message::Text("ping".into())).await;
    assert_eq!(recv_data(&mut ws).await, Message::Text("ping".into()));
    ws
}

/// Closes a client cleanly and waits for the gateway to end the connection.
async fn close(mut ws: FromClient) {
    within("client close", ws.close(Some(close_frame(1000, ""))))
        .await
        .expect("send close");
    drain_to_end(&mut ws).await;
}

/// The gateway releases a slot when the connection's task ends, just after the client sees
/// the TCP close: retry (bounded) until it admits `from` again.
async fn admitted_soon(gw: &ConfigGateway, from: IpAddr) -> FromClient {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match connect_from(from, gw.addr, &gw.url("/")).await {
            Ok(ws) => return ws,
            Err(429) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(status) => panic!("client from {from} still refused ({status}) after a close"),
        }
    }
}

/// A raw upgrade from `from` that must be refused with 429; returns the body.
async fn refused_429(gw: &ConfigGateway, from: IpAddr) -> String {
    let status = connect_from(from, gw.addr, &gw.url("/")).await.err();
    assert_eq!(status, Some(429), "client from {from}:\n{}", gw.stderr());
    // The same once more by hand, to see the answer's headers and body.
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.bind(SocketAddr::new(from, 0)).expect("bind");
    let mut stream = within("connect", socket.connect(gw.addr))
        .await
        .expect("connect");
    stream
        .write_all(&common::config::upgrade_request("/", "gw.test", &[]))
        .await
        .expect("write request");
    let mut raw = Vec::new();
    within("read the refusal", stream.read_to_end(&mut raw))
        .await
        .expect("read the refusal");
    let text = String::from_utf8_lossy(&raw).into_owned();
    assert!(text.starts_with("HTTP/1.1 429 "), "{text}");
    assert!(text.contains("\r\nRetry-After: 1\r\n"), "{text}");
    text.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_ip_limit_refuses_the_third_connection_until_one_closes() {
    let gw = ConfigGateway::start(&echo_config("max_connections_per_ip = 2\n"));
    let first = admitted(&gw, ip(1)).await;
    let mut second = admitted(&gw, ip(1)).await;
    let body = refused_429(&gw, ip(1)).await;
    assert_eq!(body, "too many connections from this address\n");
    // Another address has slots of its own.
    let other = admitted(&gw, ip(2)).await;
    // The held connections are untouched by the refusals.
    send(&mut second, Message::Text("still here".into())).await;
    assert_eq!(
        recv_data(&mut second).await,
        Message::Text("still here".into())
    );
    close(first).await;
    let third = admitted_soon(&gw, ip(1)).await;
    // Full again.
    refused_429(&gw, ip(1)).await;
    for ws in [second, third, other] {
        close(ws).await;
    }
    let line = gw
        .wait_line(Duration::from_secs(2), |l| l.contains("upgrade refused"))
        .await
        .unwrap_or_else(|| panic!("no refusal logged:\n{}", gw.stderr()));
    assert!(line.contains("from this address"), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn global_limit_counts_connections_from_every_address() {
    let gw = ConfigGateway::start(&echo_config("max_connections = 3\n"));
    let a = admitted(&gw, ip(1)).await;
    let b = admitted(&gw, ip(1)).await;
    let c = admitted(&gw, ip(2)).await;
    // A fourth address, with no connection of its own, is still refused: the limit is global.
    let body = refused_429(&gw, ip(3)).await;
    assert_eq!(body, "too many connections\n");
    refused_429(&gw, ip(1)).await;
    close(b).await;
    let d = admitted_soon(&gw, ip(3)).await;
    refused_429(&gw, ip(4)).await;
    for ws in [a, c, d] {
        close(ws).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_is_dropped_at_the_handshake_timeout() {
    let gw = ConfigGateway::start(&echo_config("handshake_timeout = \"400ms\"\n"));
    let started = Instant::now();
    // One client trickles a head that never ends, one byte every 50 ms; one sends nothing.
    let trickling = async {
        let mut stream = TcpStream::connect(gw.addr).await.expect("connect");
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: gw.test\r\n")
            .await
            .expect("write");
        let mut byte = [0u8; 1];
        loop {
            if stream.write_all(b"X").await.is_err() {
                break;
            }
            match tokio::time::timeout(Duration::from_millis(50), stream.read(&mut byte)).await {
                Err(_) => {}
                Ok(Ok(0) | Err(_)) => break,
                Ok(Ok(_)) => panic!("the gateway answered a head that never ended"),
            }
        }
        started.elapsed()
    };
    let silent = async {
        let mut stream = TcpStream::connect(gw.addr).await.expect("connect");
        let mut buf = Vec::new();
        // EOF or a reset: either way dropped, and with no answer.
        let _ = stream.read_to_end(&mut buf).await;
        assert!(buf.is_empty(), "{:?}", String::from_utf8_lossy(&buf));
        started.elapsed()
    };
    let (trickled_for, silent_for) = within("both slow clients dropped", async {
        tokio::join!(trickling, silent)
    })
    .await;
    for (who, took) in [("trickling", trickled_for), ("silent", silent_for)] {
        assert!(
            took >= Duration::from_millis(350) && took < Duration::from_secs(2),
            "{who} client dropped after {took:?}, timeout 400ms"
        );
    }
    // The log line follows the drop: wait for both.
    let timed_out = |l: &str| l.contains("handshake timed out");
    gw.wait_nth_line(Duration::from_secs(2), 2, timed_out)
        .await
        .unwrap_or_else(|| panic!("not two timeout lines:\n{}", gw.stderr()));
    assert_eq!(gw.lines().iter().filter(|l| timed_out(l)).count(), 2);
    // A prompt client is served as usual.
    let (mut ws, _) = raw_client(gw.addr, "/", "gw.test", &[]).await;
    ws.send_close(1000, "").await;
    assert_eq!(ws.expect_close().await.close_code(), Some(1000));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_header_bytes_refuses_larger_heads_with_431() {
    let gw = ConfigGateway::start(&echo_config("max_header_bytes = 512\n"));
    // A head of about 300 bytes fits.
    let pad = "p".repeat(100);
    let (mut ws, _) = raw_client(gw.addr, "/", "gw.test", &[("X-Pad", &pad)]).await;
    ws.send_close(1000, "").await;
    assert_eq!(ws.expect_close().await.close_code(), Some(1000));
    // Just over, and far over (more than the gateway reads at once).
    for len in [400, 4000, 100_000] {
        let pad = "p".repeat(len);
        let (status, body) = refusal(gw.addr, "/", "gw.test", &[("X-Pad", &pad)]).await;
        assert_eq!(status, 431, "{len}-byte header: {body}");
    }
    // A head that trickles past the limit without ending is refused too, not waited on.
    let mut request = common::config::upgrade_request("/", "gw.test", &[]);
    request.truncate(request.len() - 2);
    request.extend_from_slice(format!("X-Pad: {}", "p".repeat(600)).as_bytes());
    let head = http_exchange(gw.addr, &request).await;
    assert_eq!(head.status(), 431, "{head:?}");
}
