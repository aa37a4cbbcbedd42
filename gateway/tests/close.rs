//! End-to-end close handling: codes relayed both ways, the gateway closing the client's TCP
//! after the close handshake, the close timeout, and a failing backend reported as 1014.

pub mod common;

use std::time::{Duration, Instant};

use codec::frame::OpCode;
use common::{
    EchoBackend, Gateway, RawBackend, WsBackend, close_frame, connect, drain_to_end, expect_close,
    raw_client, recv_data, send, within,
};
use tokio::io::AsyncWriteExt as _;
use tokio_tungstenite::tungstenite::Message;

/// The bound on the gateway closing a TCP connection once it may.
const EOF_BOUND: Duration = Duration::from_secs(2);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_close_code_reaches_backend_and_reply_comes_back() {
    let mut backend = EchoBackend::start().await;
    let gw = Gateway::start(&["--backend", &backend.url()]);
    let mut client = connect(&gw.url("/close")).await;
    send(&mut client, Message::Text("hi".into())).await;
    assert_eq!(recv_data(&mut client).await, Message::Text("hi".into()));
    let mut up = backend.accept().await;

    within("client close", client.close(Some(close_frame(4000, "bye"))))
        .await
        .expect("send close");
    assert_eq!(
        up.expect_close().await,
        Some((4000, "bye".to_owned())),
        "what the backend saw"
    );
    assert_eq!(
        expect_close(&mut client).await,
        Some((4000, "bye".to_owned())),
        "the backend's reply as the client saw it"
    );
    drain_to_end(&mut client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_close_code_reaches_client() {
    let mut backend = WsBackend::start(None).await;
    let gw = Gateway::start(&["--backend", &backend.url()]);
    let mut client = connect(&gw.url("/close")).await;
    let mut up = backend.accept().await;

    within(
        "backend close",
        up.ws.close(Some(close_frame(1001, "going away"))),
    )
    .await
    .expect("backend sends close");
    assert_eq!(
        expect_close(&mut client).await,
        Some((1001, "going away".to_owned()))
    );
    // tungstenite's client replies on its own; the reply reaches the backend.
    let ((), reply) = tokio::join!(drain_to_end(&mut client), expect_close(&mut up.ws));
    assert_eq!(
        reply,
        Some((1001, "going away".to_owned())),
        "the client's close reply as the backend saw it"
    );
}

/// Client-initiated close through the embedded echo: reply, then the gateway closes the TCP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_closes_client_tcp_after_client_close() {
    let gw = Gateway::start(&[]);
    let (mut client, _) = raw_client(gw.addr, "/", "gw.test", &[]).await;
    client.send(true, OpCode::Text, b"x").await;
    assert_eq!(client.read_frame().await.payload, b"x");
    client.send_close(1000, "done").await;
    let reply = client.expect_close().await;
    assert_eq!(reply.close_code(), Some(1000));
    client.expect_eof(EOF_BOUND).await;
}

/// Backend-initiated close: the client answers, then the gateway closes the TCP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_closes_client_tcp_after_backend_close() {
    let mut backend = WsBackend::start(None).await;
    let gw = Gateway::start(&["--backend", &backend.url()]);
    let (mut client, _) = raw_client(gw.addr, "/", "gw.test", &[]).await;
    let mut up = backend.accept().await;
    within("backend close", up.ws.close(Some(close_frame(1001, ""))))
        .await
        .expect("backend sends close");
    let close = client.expect_close().await;
    assert_eq!(close.close_code(), Some(1001));
    client.send_close(1001, "").await;
    let ((), reply) = tokio::join!(client.expect_eof(EOF_BOUND), expect_close(&mut up.ws));
    assert_eq!(
        reply.map(|c| c.0),
        Some(1001),
        "the client's reply at the backend"
    );
}

/// Once the backend has answered the client's close and ended its stream, the gateway sends
/// it the FIN it still owes: after the loop's next turn (so that a client on the same CPU reads
/// the reply first), which comes within a millisecond even when nothing else happens. Without
/// that bound the FIN would wait for the next unrelated wake-up (the read sweep, seconds).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_gets_its_fin_after_the_handshake_on_a_quiet_gateway() {
    let mut backend = RawBackend::start().await;
    let gw = Gateway::start(&["--backend", &backend.url()]);
    let (mut client, _) = raw_client(gw.addr, "/", "gw.test", &[]).await;
    let (_, mut up) = backend.accept().await;
    client.send_close(4000, "bye").await;
    assert_eq!(up.expect_close().await.close_code(), Some(4000));
    up.send_close(4000, "bye").await;
    up.stream.shutdown().await.expect("the backend's FIN");
    assert_eq!(client.expect_close().await.close_code(), Some(4000));
    client.expect_eof(EOF_BOUND).await;
    up.expect_eof(EOF_BOUND).await;
}

/// A client that never answers the backend's close is dropped after `--close-timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_timeout_drops_silent_client() {
    let mut backend = WsBackend::start(None).await;
    let gw = Gateway::start(&["--backend", &backend.url(), "--close-timeout", "500ms"]);
    let (mut client, _) = raw_client(gw.addr, "/", "gw.test", &[]).await;
    let mut up = backend.accept().await;
    within("backend close", up.ws.close(Some(close_frame(1000, ""))))
        .await
        .expect("backend sends close");
    let start = Instant::now();
    assert_eq!(client.expect_close().await.close_code(), Some(1000));
    // Never reply: the gateway must give up on its own.
    client.expect_eof(Duration::from_secs(4)).await;
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(300),
        "the TCP was closed after {waited:?}, before the client could answer the close"
    );
}

/// A backend whose TCP dies after the first message (no close frame): the client gets 1014.
///
/// The client is raw because tungstenite 0.24 does not know 1014 and reports it as 1002.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_dying_mid_stream_gives_1014() {
    let mut backend = WsBackend::start(None).await;
    let gw = Gateway::start(&["--backend", &backend.url()]);
    let (mut client, _) = raw_client(gw.addr, "/die", "gw.test", &[]).await;
    let mut up = backend.accept().await;
    client.send(true, OpCode::Text, b"first").await;
    assert_eq!(
        recv_data(&mut up.ws).await,
        Message::Text("first".into()),
        "the backend got the first message"
    );
    drop(up); // drops the TCP stream without a close frame
    assert_eq!(client.expect_close().await.close_code(), Some(1014));
    client.send_close(1014, "").await;
    client.expect_eof(EOF_BOUND).await;
}

async fn backend_violation_gives_1014(bad: &[u8]) {
    let mut backend = RawBackend::start().await;
    let gw = Gateway::start(&["--backend", &backend.url()]);
    let (mut client, _) = raw_client(gw.addr, "/", "gw.test", &[]).await;
    let (_, mut up) = backend.accept().await;
    // A good frame first, so the relay is known to be up.
    up.send(true, OpCode::Text, b"ok").await;
    let f = client.read_frame().await;
    assert_eq!((f.opcode, f.payload.as_slice()), (OpCode::Text, &b"ok"[..]));
    up.send_raw(bad).await;
    let close = client.expect_close().await;
    assert_eq!(
        close.close_code(),
        Some(1014),
        "client close after backend sent {bad:x?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_masked_frame_gives_1014() {
    let mut masked = Vec::new();
    codec::frame::write_frame(
        &mut masked,
        true,
        OpCode::Text,
        Some([1, 2, 3, 4]),
        b"masked",
    );
    backend_violation_gives_1014(&masked).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_bad_opcode_gives_1014() {
    backend_violation_gives_1014(&[0x83, 0x01, b'x']).await;
}

/// One connection through `gw` that has message `i` echoed, then leaves: with a close
/// handshake (answered with 1000, then the gateway's FIN) if `close`, else gone without one.
async fn echo_then_leave(gw: &Gateway, i: usize, close: bool) {
    let mut client = connect(&gw.url("/")).await;
    let text = format!("message {i}");
    send(&mut client, Message::text(text.clone())).await;
    assert_eq!(recv_data(&mut client).await, Message::text(text));
    if !close {
        drop(client);
        return;
    }
    within("client close", client.close(Some(close_frame(1000, "bye"))))
        .await
        .expect("send close");
    assert_eq!(
        expect_close(&mut client).await.map(|(code, _)| code),
        Some(1000)
    );
    drain_to_end(&mut client).await;
}

/// The data plane never hands work to io_uring's worker threads (`iou-wrk-*`): each of its
/// operations completes inline or when its socket is ready. One that does not (a linked
/// `IORING_OP_SHUTDOWN` does not, measured: a worker hand-off and 3% more proxy CPU per
/// connection) costs a thread switch per use; this guards the path every connection takes:
/// upgrade, messages, a close handshake or a vanished client, relayed or echoed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_never_wake_io_uring_worker_threads() {
    let backend = EchoBackend::start().await;
    let relay = Gateway::start(&["--backend", &backend.url()]);
    let echo = Gateway::start(&[]);
    for gw in [&relay, &echo] {
        for i in 0..10 {
            echo_then_leave(gw, i, i % 3 != 2).await;
        }
        // Workers linger for seconds once started: any started by now are still there.
        let workers: Vec<String> = gw
            .thread_names()
            .into_iter()
            .filter(|name| name.starts_with("iou-wrk"))
            .collect();
        assert!(workers.is_empty(), "io_uring worker threads: {workers:?}");
    }
}

/// Once its connections have closed, the gateway sleeps: the teardowns they left (the FINs to
/// peers that ended first, the closes, the cancels of reads left armed) wait for the loop to be
/// idle or for their deadline, and neither may turn into a loop that never waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_connections_leave_the_loop_asleep() {
    let backend = EchoBackend::start().await;
    let relay = Gateway::start(&["--backend", &backend.url()]);
    let echo = Gateway::start(&[]);
    for gw in [&relay, &echo] {
        for i in 0..20 {
            echo_then_leave(gw, i, i % 2 == 0).await;
        }
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = [relay.cpu_time(), echo.cpu_time()];
    tokio::time::sleep(Duration::from_secs(1)).await;
    for (gw, before) in [&relay, &echo].into_iter().zip(before) {
        let spent = gw.cpu_time().saturating_sub(before);
        // A loop that never waits spends the whole second; an idle one, nothing.
        assert!(
            spent < Duration::from_millis(300),
            "{spent:?} of CPU in 1 s idle"
        );
    }
}
