//! Pooled read buffers end to end: a core with very few of them (`server.read_buffers = 2`)
//! still relays every message when many connections have bytes at once. On io_uring the
//! reads that find both buffers in use wait for one (and are counted); none fails, and no
//! connection notices.

pub mod common;

use std::time::Duration;

use common::config::{ConfigGateway, preamble, sample, scrape};
use common::{connect, field, free_addr, recv_data, send};
use tokio_tungstenite::tungstenite::Message;

/// Connections that each have a message waiting when the gateway next reads.
const CLIENTS: usize = 48;

/// A message no other client or round sends.
fn payload(round: usize, client: usize) -> Vec<u8> {
    let len = 100 + client * 37;
    (0..len)
        .map(|i| (i ^ client ^ (round << 4)) as u8)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_larger_than_the_read_buffers_waits_and_loses_nothing() {
    let admin = free_addr();
    let gw = ConfigGateway::start(&format!(
        "{}[[route]]\nupstream = \"echo\"\n",
        preamble(Some(admin), "read_buffers = 2\n")
    ));
    let mut clients = Vec::with_capacity(CLIENTS);
    for _ in 0..CLIENTS {
        clients.push(connect(&gw.url("/")).await);
    }
    for round in 0..3 {
        // Stopped, the gateway reads nothing: when it resumes, its next kernel entry finds
        // every client's message waiting and two buffers to read them into.
        gw.signal("STOP");
        for (i, ws) in clients.iter_mut().enumerate() {
            send(ws, Message::binary(payload(round, i))).await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        gw.signal("CONT");
        for (i, ws) in clients.iter_mut().enumerate() {
            let got = recv_data(ws).await;
            assert_eq!(
                got.into_data(),
                payload(round, i),
                "round {round}, client {i}"
            );
        }
    }
    let waits = sample(&scrape(admin).await, "wsgate_read_buffer_waits_total");
    let lines = gw.lines();
    let listening = lines
        .iter()
        .find(|l| l.contains("gateway listening"))
        .expect("listening line");
    match field(listening, "io_backend") {
        // 48 reads ready at once, two buffers: most of them waited.
        Some("io_uring") => assert!(waits > 0, "no read waited for a buffer"),
        // Epoll takes a buffer per attempt from a pool that allocates when it is empty.
        _ => assert_eq!(waits, 0),
    }
}
