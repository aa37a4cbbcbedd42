//! Peers that stop reading: the write timeout gives up on a peer whose pending write takes no
//! bytes for `[timeouts] write` (`--write-timeout`), shuts its socket, and tells the other
//! peer as of a dead one; a drain is not held up by such a connection; a slow but live reader
//! is left alone.

pub mod common;

use std::io::ErrorKind;
use std::time::{Duration, Instant};

use codec::frame::{OpCode, write_frame};
use common::config::{ConfigGateway, preamble};
use common::{
    Gateway, RawBackend, bytes_pattern, connect, drain_to_end, expect_close, field, fresh_key,
    raw_client, recv_data, send, within_for,
};
use tokio::io::AsyncReadExt as _;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

/// How long a writer may be refused every byte before the test takes the gateway for stuck.
const QUIET: Duration = Duration::from_millis(500);

/// `count` binary frames of 64 KiB back to back, masked when `masked` (client to gateway).
fn frames(count: usize, masked: bool) -> Vec<u8> {
    let payload = bytes_pattern(64 << 10, 7);
    let mut out = Vec::with_capacity(count * (payload.len() + 14));
    for _ in 0..count {
        let mask = masked.then(fresh_key);
        write_frame(&mut out, true, OpCode::Binary, mask, &payload);
    }
    out
}

/// Writes `frames` (whole frames) over and over until the peer has taken nothing for
/// [`QUIET`], or the connection fails (the gateway gave up on it first); returns the bytes
/// written. Bounded: panics if the peer keeps taking bytes for 20 s.
async fn write_until_blocked(stream: &TcpStream, frames: &[u8]) -> usize {
    within_for(
        Duration::from_secs(20),
        "filling the socket buffers",
        async {
            let (mut at, mut total) = (0, 0);
            loop {
                match tokio::time::timeout(QUIET, stream.writable()).await {
                    Err(_) | Ok(Err(_)) => return total,
                    Ok(Ok(())) => {}
                }
                match stream.try_write(&frames[at..]) {
                    Ok(n) => {
                        at = (at + n) % frames.len();
                        total += n;
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(_) => return total,
                }
            }
        },
    )
    .await
}

/// Reads until EOF or a reset, within `limit`; returns the bytes read. A gateway that still
/// holds the connection never lets this end.
async fn read_to_end(stream: &mut TcpStream, limit: Duration) -> usize {
    within_for(limit, "the gateway closing the connection", async {
        let mut chunk = vec![0; 256 << 10];
        let mut total = 0;
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return total,
                Ok(n) => total += n,
            }
        }
    })
    .await
}

/// The access log line of the first connection that ended.
async fn access_line(gw: &Gateway, limit: Duration) -> Option<String> {
    gw.wait_line(limit, |l| l.contains("connection closed"))
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_that_stops_reading_is_cut_off_and_its_backend_gets_1001() {
    let mut backend = RawBackend::start().await;
    let gw = Gateway::start(&["--backend", &backend.url(), "--write-timeout", "1s"]);
    let (mut client, _) = raw_client(gw.addr, "/stream", "gw.test", &[]).await;
    let (_head, mut up) = backend.accept().await;
    // The backend streams; the client reads nothing, so every buffer on the way fills.
    let sent = write_until_blocked(&up.stream, &frames(16, false)).await;
    let stuck = Instant::now();
    assert!(
        sent > 1 << 20,
        "only {sent} bytes went out before the stall"
    );
    let close = up.expect_close().await;
    assert_eq!(close.close_code(), Some(1001), "{}", gw.stderr());
    assert_eq!(&close.payload[2..], b"client stopped reading");
    let took = stuck.elapsed();
    assert!(took < Duration::from_secs(3), "backend told after {took:?}");
    let line = access_line(&gw, Duration::from_secs(2))
        .await
        .unwrap_or_else(|| panic!("no access log line:\n{}", gw.stderr()));
    assert_eq!(field(&line, "close_code"), Some("1001"), "{line}");
    assert_eq!(field(&line, "closed_by"), Some("gateway"), "{line}");
    // The client's socket was shut: what was buffered for it drains, then it ends.
    read_to_end(&mut client.stream, Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_that_stops_reading_is_cut_off_and_its_client_gets_1011() {
    let mut backend = RawBackend::start().await;
    let gw = Gateway::start(&["--backend", &backend.url(), "--write-timeout", "1s"]);
    let (mut client, _) = raw_client(gw.addr, "/upload", "gw.test", &[]).await;
    // The backend takes the upgrade and then reads nothing.
    let (_head, _deaf) = backend.accept().await;
    let sent = write_until_blocked(&client.stream, &frames(16, true)).await;
    let stuck = Instant::now();
    assert!(
        sent > 1 << 20,
        "only {sent} bytes went out before the stall"
    );
    let close = client.expect_close().await;
    assert_eq!(close.close_code(), Some(1011), "{}", gw.stderr());
    assert_eq!(&close.payload[2..], b"backend stopped reading");
    let took = stuck.elapsed();
    assert!(took < Duration::from_secs(3), "client told after {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_still_finds_a_dead_backend_while_the_client_write_is_blocked() {
    // No write timeout: the client's blocked write stays blocked, and the watchdog must not
    // wait behind it to ping the backend.
    let mut backend = RawBackend::start().await;
    let gw = Gateway::start(&[
        "--backend",
        &backend.url(),
        "--write-timeout",
        "0s",
        "--ping-interval",
        "200ms",
        "--pong-timeout",
        "300ms",
    ]);
    let (_stuck_client, _) = raw_client(gw.addr, "/stream", "gw.test", &[]).await;
    let (_head, mut up) = backend.accept().await;
    // The backend fills every buffer toward the client, then goes silent and never answers
    // a ping.
    write_until_blocked(&up.stream, &frames(16, false)).await;
    let silent = Instant::now();
    let close = within_for(Duration::from_secs(3), "the backend found dead", async {
        loop {
            let frame = up.read_frame().await;
            if frame.opcode == OpCode::Close {
                break frame;
            }
            assert_eq!(frame.opcode, OpCode::Ping, "{frame:?}");
        }
    })
    .await;
    assert_eq!(close.close_code(), Some(1001), "{}", gw.stderr());
    assert_eq!(&close.payload[2..], b"ping timeout");
    let took = silent.elapsed();
    assert!(
        took < Duration::from_millis(1500),
        "dead backend found after {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_client_that_sends_without_reading_is_cut_off() {
    let gw = Gateway::start(&["--write-timeout", "1s"]);
    let (mut client, _) = raw_client(gw.addr, "/echo", "gw.test", &[]).await;
    // The echo answers every frame; the client never reads the answers.
    let sent = write_until_blocked(&client.stream, &frames(16, true)).await;
    let stuck = Instant::now();
    assert!(
        sent > 1 << 20,
        "only {sent} bytes went out before the stall"
    );
    let line = access_line(&gw, Duration::from_secs(3))
        .await
        .unwrap_or_else(|| panic!("the echo never gave up on the client:\n{}", gw.stderr()));
    let took = stuck.elapsed();
    assert!(took < Duration::from_secs(3), "cut off after {took:?}");
    // No close frame can reach a client that does not read: 1006 in the log, by the gateway.
    assert_eq!(field(&line, "close_code"), Some("1006"), "{line}");
    assert_eq!(field(&line, "closed_by"), Some("gateway"), "{line}");
    read_to_end(&mut client.stream, Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_does_not_wait_for_a_client_that_stopped_reading() {
    let mut backend = RawBackend::start().await;
    let config = format!(
        "{}[timeouts]\nwrite = \"1s\"\n\n[[route]]\npath_prefix = \"/stream\"\n\
         upstream = \"raw\"\n\n[[route]]\nupstream = \"echo\"\n\n\
         [upstream.raw]\nbackends = [\"{}\"]\n",
        preamble(None, "drain_timeout = \"60s\"\n"),
        backend.url()
    );
    let mut gw = ConfigGateway::start(&config);
    let mut healthy = Vec::new();
    for i in 0..3 {
        let mut c = connect(&gw.url("/chat")).await;
        send(&mut c, Message::Text(format!("hello {i}"))).await;
        assert_eq!(recv_data(&mut c).await, Message::Text(format!("hello {i}")));
        healthy.push(c);
    }
    let (_stuck_client, _) = raw_client(gw.addr, "/stream", "gw.test", &[]).await;
    let (_head, mut up) = backend.accept().await;
    write_until_blocked(&up.stream, &frames(16, false)).await;
    let started = Instant::now();
    gw.signal("TERM");
    for c in &mut healthy {
        let got = expect_close(c).await;
        assert_eq!(got.map(|(c, _)| c), Some(1001), "{}", gw.stderr());
    }
    let told = started.elapsed();
    assert!(
        told < Duration::from_secs(1),
        "healthy clients told after {told:?}"
    );
    for c in &mut healthy {
        // Reading on flushes tungstenite's close reply; the gateway then closes TCP.
        drain_to_end(c).await;
    }
    // The stuck connection's backend hears of the drain at once too.
    let close = up.expect_close().await;
    assert_eq!(close.close_code(), Some(1001));
    assert_eq!(&close.payload[2..], b"gateway shutting down");
    // Exit within the write timeout (and a tick), not the 60 s drain timeout.
    let exit = gw.wait_exit(Duration::from_secs(4)).await;
    assert_eq!(exit, Some(0), "{}", gw.stderr());
    let took = started.elapsed();
    assert!(took < Duration::from_millis(2500), "drain took {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_but_live_reader_is_not_cut_off() {
    let mut backend = RawBackend::start().await;
    let gw = Gateway::start(&["--backend", &backend.url(), "--write-timeout", "1s"]);
    let (mut client, _) = raw_client(gw.addr, "/slow", "gw.test", &[]).await;
    let (_head, up) = backend.accept().await;
    let (mut from_gateway, to_gateway) = up.stream.into_split();
    let frames = frames(16, false);
    let writer = tokio::spawn(async move {
        // Streams flat out for as long as the gateway takes bytes.
        let mut at = 0;
        loop {
            to_gateway.writable().await.expect("writable");
            match to_gateway.try_write(&frames[at..]) {
                Ok(n) => at = (at + n) % frames.len(),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(_) => return,
            }
        }
    });
    // Reads 512 KiB every 200 ms for 3 s: far slower than the backend writes, so the
    // gateway's writes to the client block again and again, each time for less than the
    // write timeout. (Linux wakes a blocked writer only once a third of its send buffer is
    // free, up to 1.4 MB, so a reader much slower than that per write timeout does count as
    // stopped: hence timeouts in seconds.)
    let mut chunk = vec![0; 512 << 10];
    let mut total = 0;
    for _ in 0..15 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let n = within_for(
            Duration::from_secs(1),
            "a slow read",
            client.stream.read(&mut chunk),
        )
        .await
        .unwrap_or_else(|e| panic!("the slow reader was cut off: {e}\n{}", gw.stderr()));
        assert_ne!(n, 0, "the slow reader was cut off:\n{}", gw.stderr());
        total += n;
    }
    assert!(total > 2 << 20, "read only {total} bytes");
    assert!(
        access_line(&gw, Duration::ZERO).await.is_none(),
        "{}",
        gw.stderr()
    );
    // And the backend heard nothing: no close frame came its way.
    let mut buf = [0; 64];
    let heard = tokio::time::timeout(Duration::from_millis(100), from_gateway.read(&mut buf)).await;
    assert!(heard.is_err(), "the backend heard {heard:?}");
    writer.abort();
}
