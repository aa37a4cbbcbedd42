//! Parked reads end to end (`server.park_reads_after`): on io_uring a read that waited through
//! two sweeps is swapped for a poll, and read again when bytes come. The connection must not
//! notice: every message after a park arrives whole, a close still closes, and a read the
//! gateway itself gives up while parked (a handshake that timed out) ends its connection.
//! Epoll parks nothing (a waiting read there is only a registration).

pub mod common;

use std::time::{Duration, Instant};

use common::config::{ConfigGateway, TagBackend, preamble, sample, scrape, wait_metric};
use common::{
    bytes_pattern, close_frame, connect, expect_close, field, free_addr, recv_data, send, within,
};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

const PARKED: &str = "wsgate_parked_reads_total";
const ACTIVE: &str = "wsgate_active_connections{core=\"0\"}";
/// Sweeps run this often; a read is parked at its second.
const PARK: &str = "park_reads_after = \"50ms\"\n";

async fn backend_name(gw: &ConfigGateway) -> String {
    let listening = gw
        .wait_line(Duration::from_secs(5), |l| l.contains("gateway listening"))
        .await
        .expect("listening line");
    field(&listening, "io_backend").unwrap_or("").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_reads_wake_for_the_next_message_and_lose_nothing() {
    let backend = TagBackend::start("T").await;
    let admin = free_addr();
    let gw = ConfigGateway::start(&format!(
        "{}[[route]]\nupstream = \"t\"\n\n[upstream.t]\nbackends = [\"{}\"]\n",
        preamble(Some(admin), PARK),
        backend.url()
    ));
    let uring = backend_name(&gw).await == "io_uring";
    let mut clients = Vec::new();
    for _ in 0..3 {
        let mut ws = connect(&gw.url("/")).await;
        assert_eq!(recv_data(&mut ws).await, Message::text("T"), "the greeting");
        clients.push(ws);
    }
    let mut parked = 0;
    for round in 0..4u64 {
        // Idle: both reads of every connection wait through two sweeps at least.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = sample(&scrape(admin).await, PARKED);
        if uring {
            // Each connection's client and backend reads.
            assert!(
                now >= parked + 6,
                "round {round}: {parked} parked, then {now}"
            );
        } else {
            assert_eq!(now, 0, "epoll parks nothing");
        }
        parked = now;
        // The first message after a park wakes both directions: the client's read, then the
        // backend's for the echo. Sizes from one byte to several pool buffers' worth of reads.
        for (i, ws) in clients.iter_mut().enumerate() {
            let len = [1, 125, 70_000, 300_000][round as usize] + i;
            let payload = bytes_pattern(len, round * 10 + i as u64);
            send(ws, Message::binary(payload.clone())).await;
            let got = recv_data(ws).await.into_data();
            assert!(got == payload, "round {round}, client {i}: {len} bytes");
        }
    }
    // A parked read still sees the close.
    tokio::time::sleep(Duration::from_millis(200)).await;
    for mut ws in clients {
        send(&mut ws, Message::Close(Some(close_frame(1000, "bye")))).await;
        let echoed = expect_close(&mut ws).await;
        assert_eq!(echoed.map(|(code, _)| code), Some(1000));
    }
    wait_metric(admin, ACTIVE, Duration::from_secs(5), |n| n == 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_that_times_out_while_its_read_is_parked_ends() {
    let admin = free_addr();
    let gw = ConfigGateway::start(&format!(
        "{}[limits]\nhandshake_timeout = \"400ms\"\n\n[[route]]\nupstream = \"echo\"\n",
        preamble(Some(admin), PARK)
    ));
    let uring = backend_name(&gw).await == "io_uring";
    let started = Instant::now();
    let mut silent = TcpStream::connect(gw.addr).await.expect("connect");
    let mut buf = Vec::new();
    // The gateway gives the parked read up at the timeout: dropped, with no answer.
    within("the silent client is dropped", silent.read_to_end(&mut buf))
        .await
        .ok();
    let took = started.elapsed();
    assert!(buf.is_empty(), "{:?}", String::from_utf8_lossy(&buf));
    assert!(
        took >= Duration::from_millis(350) && took < Duration::from_secs(3),
        "dropped after {took:?}, timeout 400ms"
    );
    let text = wait_metric(admin, ACTIVE, Duration::from_secs(5), |n| n == 0).await;
    if uring {
        assert!(
            sample(&text, PARKED) >= 1,
            "the silent client's read was not parked"
        );
    }
    // And the core goes on serving.
    let mut ws = connect(&gw.url("/")).await;
    send(&mut ws, Message::text("after")).await;
    assert_eq!(recv_data(&mut ws).await, Message::text("after"));
}
