//! End-to-end relay tests: echo of every size class through the embedded echo upstream and a
//! tungstenite backend, fragmentation and pings relayed frame by frame, fresh masking keys
//! towards the backend, isolation of a slow client, and a multi-core gateway.

pub mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use codec::frame::OpCode;
use common::{
    EchoBackend, Event, Gateway, RawBackend, WsBackend, WsClient, assert_same, bytes_pattern,
    connect, raw_client, recv, recv_data, send, text_pattern, within, within_for,
};
use futures_util::{SinkExt as _, StreamExt as _};
use tokio_tungstenite::tungstenite::Message;

/// Sizes around every length-encoding boundary, plus big messages.
const SIZES: [usize; 8] = [0, 1, 125, 126, 65_535, 65_536, 1 << 20, 16 << 20];

/// The `--max-message` the echo tests run with (above the largest size).
const MAX_MESSAGE: &str = "67108864";

/// Sends `msg` and reads the echo at the same time: a streaming echo starts answering before a
/// big message is fully sent, so a client that only reads afterwards would deadlock on full
/// socket buffers.
async fn round_trip(ws: WsClient, msg: Message) -> (WsClient, Message) {
    let (mut tx, mut rx) = ws.split();
    let what = format!("echo of a {}-byte message", msg.len());
    let (sent, got) = within_for(Duration::from_secs(20), &what, async {
        tokio::join!(tx.send(msg), async {
            loop {
                match rx.next().await {
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                    Some(Ok(m)) => return m,
                    Some(Err(e)) => panic!("{what}: read failed: {e}"),
                    None => panic!("{what}: stream ended"),
                }
            }
        })
    })
    .await;
    sent.expect("send");
    let ws = tx.reunite(rx).expect("halves of one stream");
    (ws, got)
}

async fn echo_all_sizes(gw: &Gateway) {
    let mut ws = connect(&gw.url("/echo")).await;
    for (i, &size) in SIZES.iter().enumerate() {
        let seed = i as u64 + 1;
        let text = text_pattern(size, seed);
        let (back, got) = round_trip(ws, Message::Text(text.clone())).await;
        ws = back;
        match got {
            Message::Text(got) => assert_same(
                &format!("text echo of {size} bytes"),
                got.as_bytes(),
                text.as_bytes(),
            ),
            other => panic!("text echo of {size} bytes: got {other:?}"),
        }
        let bin = bytes_pattern(size, seed + 100);
        let (back, got) = round_trip(ws, Message::Binary(bin.clone())).await;
        ws = back;
        match got {
            Message::Binary(got) => {
                assert_same(&format!("binary echo of {size} bytes"), &got, &bin);
            }
            other => panic!("binary echo of {size} bytes: got {other:?}"),
        }
    }
    within("client close", ws.close(None)).await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_sizes_through_embedded_echo() {
    let gw = Gateway::start(&["--max-message", MAX_MESSAGE]);
    echo_all_sizes(&gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_sizes_through_tungstenite_backend() {
    let backend = EchoBackend::start().await;
    let gw = Gateway::start(&["--max-message", MAX_MESSAGE, "--backend", &backend.url()]);
    echo_all_sizes(&gw).await;
}

/// Three fragments with a ping between them arrive at the backend as one message, and the
/// backend's pong comes back to the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fragmented_message_with_interleaved_ping() {
    let mut backend = EchoBackend::start().await;
    let gw = Gateway::start(&["--backend", &backend.url()]);
    let (mut client, _) = raw_client(gw.addr, "/frag", "gw.test", &[]).await;
    let euro = "€".as_bytes();
    let mut second = b"wor".to_vec();
    second.extend_from_slice(&euro[..2]); // a code point split across fragments is valid
    let mut third = euro[2..].to_vec();
    third.extend_from_slice(b"ld");
    client.send(false, OpCode::Text, b"Hello, ").await;
    client.send(true, OpCode::Ping, b"mid-ping").await;
    client.send(false, OpCode::Continuation, &second).await;
    client.send(true, OpCode::Continuation, &third).await;

    let mut conn = backend.accept().await;
    let mut saw_ping = false;
    loop {
        match conn.next_event().await {
            Event::Msg(Message::Ping(p)) => {
                assert_eq!(p, b"mid-ping");
                saw_ping = true;
            }
            Event::Msg(Message::Text(t)) => {
                assert_eq!(t, "Hello, wor€ld");
                break;
            }
            other => panic!("backend saw {other:?} instead of the reassembled message"),
        }
    }
    assert!(
        saw_ping,
        "the ping did not reach the backend before the message completed"
    );

    let (mut pong, mut echo) = (false, false);
    while !(pong && echo) {
        let frame = client.read_frame().await;
        match frame.opcode {
            OpCode::Pong => {
                assert_eq!(frame.payload, b"mid-ping");
                pong = true;
            }
            OpCode::Text | OpCode::Continuation => {
                // The backend sends one frame; the gateway must not re-fragment it.
                assert!(frame.fin, "echo arrived fragmented: {frame:?}");
                assert_eq!(frame.payload, "Hello, wor€ld".as_bytes());
                echo = true;
            }
            _ => panic!("unexpected frame {frame:?}"),
        }
    }
}

/// Fragment boundaries and the interleaved ping are preserved frame by frame.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fragments_are_relayed_frame_by_frame() {
    let mut backend = RawBackend::start().await;
    let gw = Gateway::start(&["--backend", &backend.url()]);
    let (mut client, _) = raw_client(gw.addr, "/", "gw.test", &[]).await;
    let sent: [(bool, OpCode, &[u8]); 4] = [
        (false, OpCode::Binary, b"one"),
        (true, OpCode::Ping, b"p"),
        (false, OpCode::Continuation, b"two"),
        (true, OpCode::Continuation, b"three"),
    ];
    for (fin, op, payload) in sent {
        client.send(fin, op, payload).await;
    }
    let (_, mut up) = backend.accept().await;
    for (fin, op, payload) in sent {
        let f = up.read_frame().await;
        assert_eq!((f.fin, f.opcode, f.payload.as_slice()), (fin, op, payload));
        assert!(f.mask.is_some(), "frame to the backend is not masked");
    }
    // And the other way: the backend's fragments reach the client as sent.
    let back: [(bool, OpCode, &[u8]); 3] = [
        (false, OpCode::Text, b"ab"),
        (true, OpCode::Pong, b"q"),
        (true, OpCode::Continuation, b"cd"),
    ];
    for (fin, op, payload) in back {
        up.send(fin, op, payload).await;
    }
    for (fin, op, payload) in back {
        let f = client.read_frame().await;
        assert_eq!((f.fin, f.opcode, f.payload.as_slice()), (fin, op, payload));
        assert!(f.mask.is_none(), "frame to the client is masked");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_pong_both_directions() {
    let mut backend = WsBackend::start(None).await;
    let gw = Gateway::start(&["--backend", &backend.url()]);
    let mut client = connect(&gw.url("/pp")).await;
    let mut up = backend.accept().await;

    // Client -> backend: tungstenite's backend answers the ping itself.
    send(&mut client, Message::Ping(b"from-client".to_vec())).await;
    let backend_side = tokio::spawn(async move {
        let msg = recv(&mut up.ws).await;
        assert_eq!(msg, Message::Ping(b"from-client".to_vec()));
        // tungstenite queues its automatic pong until the next read, write or flush.
        within("backend flush", up.ws.flush())
            .await
            .expect("flush the pong");
        up
    });
    assert_eq!(
        recv(&mut client).await,
        Message::Pong(b"from-client".to_vec())
    );
    let mut up = within("backend task", backend_side)
        .await
        .expect("backend task");

    // Backend -> client: tungstenite's client answers the ping itself.
    send(&mut up.ws, Message::Ping(b"from-backend".to_vec())).await;
    assert_eq!(
        recv(&mut client).await,
        Message::Ping(b"from-backend".to_vec())
    );
    within("client flush", client.flush())
        .await
        .expect("flush the pong");
    assert_eq!(
        recv(&mut up.ws).await,
        Message::Pong(b"from-backend".to_vec())
    );

    // Unsolicited pongs pass too.
    send(&mut client, Message::Pong(b"unsolicited".to_vec())).await;
    assert_eq!(
        recv(&mut up.ws).await,
        Message::Pong(b"unsolicited".to_vec())
    );
}

/// The backend never sees the client's masking key: every frame is re-masked with a fresh key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_never_sees_client_masking_key() {
    const KEY: [u8; 4] = [0x5A, 0xA5, 0x3C, 0xC3];
    let mut backend = RawBackend::start().await;
    let gw = Gateway::start(&["--backend", &backend.url()]);
    let (mut client, _) = raw_client(gw.addr, "/mask", "gw.test", &[]).await;
    let payloads: Vec<Vec<u8>> = (0..50)
        .map(|i| bytes_pattern(1 + i * 37, i as u64))
        .collect();
    for p in &payloads {
        client.send_masked(true, OpCode::Binary, KEY, p).await;
    }
    let (_, mut up) = backend.accept().await;
    let mut keys = Vec::new();
    for (i, p) in payloads.iter().enumerate() {
        let f = up.read_frame().await;
        assert_eq!((f.fin, f.opcode), (true, OpCode::Binary), "frame {i}");
        assert_same(&format!("frame {i}"), &f.payload, p);
        let key = f
            .mask
            .unwrap_or_else(|| panic!("frame {i} reached the backend unmasked"));
        assert_ne!(key, KEY, "frame {i} reused the client's masking key");
        keys.push(key);
    }
    for (i, pair) in keys.windows(2).enumerate() {
        assert_ne!(
            pair[0],
            pair[1],
            "frames {i} and {} share a masking key",
            i + 1
        );
    }
    let mut distinct = keys.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert!(
        distinct.len() >= 49,
        "only {} distinct keys in 50 frames",
        distinct.len()
    );
}

/// A client that never reads while the backend echoes 64 MiB at it must not stall another
/// client on the same core.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_client_does_not_stall_others() {
    let backend = EchoBackend::start().await;
    let gw = Gateway::start(&["--max-message", MAX_MESSAGE, "--backend", &backend.url()]);
    slow_and_fast_clients(&gw).await;
}

/// The same with the embedded echo upstream, which shares the gateway's core with both clients.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_client_does_not_stall_others_embedded_echo() {
    let gw = Gateway::start(&["--max-message", MAX_MESSAGE]);
    slow_and_fast_clients(&gw).await;
}

async fn slow_and_fast_clients(gw: &Gateway) {
    let mut slow = connect(&gw.url("/slow")).await;
    let blob = bytes_pattern(1 << 20, 7);
    let sent = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&sent);
    let flood = tokio::spawn(async move {
        for _ in 0..64 {
            if slow.send(Message::Binary(blob.clone())).await.is_err() {
                break;
            }
            counter.fetch_add(1, Ordering::Relaxed);
        }
        // Keep the connection open (and unread) until the test ends.
        tokio::time::sleep(Duration::from_secs(30)).await;
        drop(slow);
    });
    tokio::time::sleep(Duration::from_millis(500)).await;

    let mut fast = connect(&gw.url("/fast")).await;
    let start = Instant::now();
    within_for(
        Duration::from_secs(5),
        "100 round trips of the fast client",
        async {
            for i in 0..100 {
                let text = format!("round trip {i}");
                send(&mut fast, Message::Text(text.clone())).await;
                assert_eq!(recv_data(&mut fast).await, Message::Text(text));
            }
        },
    )
    .await;
    let took = start.elapsed();
    let sent = sent.load(Ordering::Relaxed);
    flood.abort();
    // The premise: the slow client's direction is backed up (its sends are blocked).
    assert!(
        sent < 64,
        "the slow client sent all {sent} MiB: nothing backed up"
    );
    eprintln!("slow client had {sent} of 64 MiB accepted; fast client took {took:?}");
    assert!(
        took < Duration::from_secs(5),
        "100 round trips took {took:?}"
    );
}

/// `--cores 2` starts and serves concurrent connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_cores_serve_concurrent_connections() {
    let gw = Gateway::start(&["--cores", "2"]);
    let mut tasks = Vec::new();
    for c in 0..16_u64 {
        let url = gw.url(&format!("/c{c}"));
        tasks.push(tokio::spawn(async move {
            let mut ws = connect(&url).await;
            for i in 0..20 {
                let bin = bytes_pattern(1000 + i, c * 100 + i as u64);
                send(&mut ws, Message::Binary(bin.clone())).await;
                match recv_data(&mut ws).await {
                    Message::Binary(got) => assert_same("echo on --cores 2", &got, &bin),
                    other => panic!("connection {c}: got {other:?}"),
                }
            }
            within("close", ws.close(None)).await.expect("close");
            while let Some(Ok(_)) = within("close handshake", ws.next()).await {}
        }));
    }
    for t in tasks {
        within_for(Duration::from_secs(10), "concurrent client", t)
            .await
            .expect("client task panicked");
    }
}
