//! Operations end to end: graceful drain on SIGTERM/SIGINT/SIGUSR2, keepalive pings that find
//! a dead backend, and the idle timeout that spares quiet but healthy connections.

pub mod common;

use std::time::{Duration, Instant};

use common::{
    EchoBackend, Gateway, RawBackend, close_frame, connect, drain_to_end, expect_close, raw_client,
    recv_data, send, within, within_for,
};
use futures_util::StreamExt;
use tokio_tungstenite::tungstenite::Message;

async fn drain_with(signal: &str, code: u16) {
    let mut gw = Gateway::start(&["--drain-timeout", "3s"]);
    let mut clients = Vec::new();
    for i in 0..3 {
        let mut c = connect(&gw.url("/drain")).await;
        send(&mut c, Message::Text(format!("hello {i}"))).await;
        assert_eq!(recv_data(&mut c).await, Message::Text(format!("hello {i}")));
        clients.push(c);
    }
    let started = Instant::now();
    gw.signal(signal);
    for c in &mut clients {
        // tungstenite answers the close on its own while reading.
        let got = expect_close(c).await;
        assert_eq!(got.map(|(c, _)| c), Some(code), "{}", gw.stderr());
    }
    for c in &mut clients {
        // Reading on flushes tungstenite's queued close reply; the gateway then closes TCP.
        drain_to_end(c).await;
    }
    let exit = gw.wait_exit(Duration::from_secs(5)).await;
    assert_eq!(exit, Some(0), "{}", gw.stderr());
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "drain took {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_every_client_with_1001_and_exits_0() {
    drain_with("TERM", 1001).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_drains_like_sigterm() {
    drain_with("INT", 1001).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr2_drains_as_a_restart_with_1012() {
    drain_with("USR2", 1012).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_closes_both_legs_of_proxied_connections() {
    let mut backend = EchoBackend::start().await;
    let mut gw = Gateway::start(&["--backend", &backend.url(), "--drain-timeout", "3s"]);
    let mut client = connect(&gw.url("/p")).await;
    send(&mut client, Message::Binary(vec![1, 2, 3])).await;
    assert_eq!(recv_data(&mut client).await, Message::Binary(vec![1, 2, 3]));
    let mut up = backend.accept().await;
    gw.signal("TERM");
    assert_eq!(expect_close(&mut client).await.map(|(c, _)| c), Some(1001));
    assert_eq!(up.expect_close().await.map(|(c, _)| c), Some(1001));
    assert_eq!(
        gw.wait_exit(Duration::from_secs(5)).await,
        Some(0),
        "{}",
        gw.stderr()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_with_a_client_that_never_answers_ends_at_the_deadline() {
    let mut gw = Gateway::start(&["--drain-timeout", "1s", "--close-timeout", "5s"]);
    // A raw client that never reads or answers.
    let (_silent, _) = raw_client(gw.addr, "/", "gw.test", &[]).await;
    let started = Instant::now();
    gw.signal("TERM");
    assert_eq!(
        gw.wait_exit(Duration::from_secs(4)).await,
        Some(0),
        "{}",
        gw.stderr()
    );
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "{took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_finds_a_dead_backend_and_closes_its_client_with_1011() {
    // The raw backend completes the upgrade and then neither reads nor writes: half-open.
    let mut backend = RawBackend::start().await;
    let gw = Gateway::start(&[
        "--backend",
        &backend.url(),
        "--ping-interval",
        "200ms",
        "--pong-timeout",
        "300ms",
    ]);
    let (mut client, _) = raw_client(gw.addr, "/ka", "gw.test", &[]).await;
    let (_head, _dead) = backend.accept().await;
    let started = Instant::now();
    // The client answers the gateway's pings, so only the backend is found dead.
    let close = within_for(Duration::from_secs(3), "close after dead backend", async {
        loop {
            let frame = client.read_frame().await;
            match frame.opcode {
                codec::frame::OpCode::Ping => {
                    client
                        .send(true, codec::frame::OpCode::Pong, &frame.payload)
                        .await;
                }
                codec::frame::OpCode::Close => break frame,
                other => panic!("unexpected {other:?}"),
            }
        }
    })
    .await;
    assert_eq!(close.close_code(), Some(1011), "{}", gw.stderr());
    let took = started.elapsed();
    assert!(
        took < Duration::from_millis(1500),
        "dead backend found after {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_but_healthy_connections_survive_the_idle_timeout() {
    let mut backend = EchoBackend::start().await;
    let gw = Gateway::start(&[
        "--backend",
        &backend.url(),
        "--ping-interval",
        "150ms",
        "--pong-timeout",
        "500ms",
        "--idle-timeout",
        "600ms",
    ]);
    let mut client = connect(&gw.url("/quiet")).await;
    let _up = backend.accept().await;
    // Read (which answers pings) for 1.5 s without sending a message: pongs count as life.
    let quiet = tokio::time::timeout(Duration::from_millis(1500), async {
        loop {
            match client.next().await {
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                other => break other,
            }
        }
    })
    .await;
    assert!(
        quiet.is_err(),
        "connection ended while quiet: {quiet:?}\n{}",
        gw.stderr()
    );
    send(&mut client, Message::Text("still here".into())).await;
    assert_eq!(
        recv_data(&mut client).await,
        Message::Text("still here".into())
    );
    within("close", client.close(Some(close_frame(1000, ""))))
        .await
        .expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_with_1001() {
    let gw = Gateway::start(&["--idle-timeout", "400ms"]);
    let mut client = connect(&gw.url("/idle")).await;
    let started = Instant::now();
    let close = expect_close(&mut client).await;
    assert_eq!(
        close,
        Some((1001, "idle timeout".to_owned())),
        "{}",
        gw.stderr()
    );
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(350) && took < Duration::from_secs(2),
        "{took:?}"
    );
}
