//! The admin listener end to end: `GET /healthz` (200, and 503 while draining) and
//! `GET /metrics` after real traffic: upgrades by status, frame and byte counters that move
//! while a connection is still open, close frames by side, direction and code, the active
//! connection gauge, the close-handshake histogram, and the per-backend connect failures and
//! health.

pub mod common;

use std::net::SocketAddr;
use std::time::Duration;

use codec::frame::OpCode;
use common::config::{
    ConfigGateway, TagBackend, admin_request, greeting, preamble, refusal, sample, scrape,
    wait_metric,
};
use common::{
    EchoBackend, WsClient, close_frame, connect, drain_to_end, free_addr, raw_client, recv_data,
    send, within,
};
use tokio_tungstenite::tungstenite::Message;

const ACTIVE: &str = "wsgate_active_connections{core=\"0\"}";
const HISTOGRAM_COUNT: &str = "wsgate_close_handshake_duration_seconds_count";
const WAIT: Duration = Duration::from_secs(3);
/// Successful upgrades in the status counter test.
const N: usize = 3;

fn upgrades(status: &str) -> String {
    format!("wsgate_upgrades_total{{status=\"{status}\"}}")
}

fn frames(direction: &str) -> String {
    format!("wsgate_frames_total{{direction=\"{direction}\"}}")
}

fn payload_bytes(direction: &str) -> String {
    format!("wsgate_payload_bytes_total{{direction=\"{direction}\"}}")
}

fn close_frames(side: &str, direction: &str, code: u16) -> String {
    format!(
        "wsgate_close_frames_total{{side=\"{side}\",direction=\"{direction}\",code=\"{code}\"}}"
    )
}

fn backend_series(name: &str, pool: &str, backend: SocketAddr) -> String {
    format!("{name}{{pool=\"{pool}\",backend=\"ws://{backend}\"}}")
}

/// A gateway with an admin listener on a free port; returns it and the admin address.
fn start(routes: &str, server_extra: &str) -> (ConfigGateway, SocketAddr) {
    let admin = free_addr();
    let gw = ConfigGateway::start(&format!("{}{routes}", preamble(Some(admin), server_extra)));
    (gw, admin)
}

async fn close_client(mut ws: WsClient) {
    within("client close", ws.close(Some(close_frame(1000, "bye"))))
        .await
        .expect("send close");
    drain_to_end(&mut ws).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_and_upgrades_counted_by_status() {
    let routes = "[[route]]\npath_prefix = \"/e\"\nupstream = \"echo\"\n\n\
                  [[route]]\npath_prefix = \"/o\"\nupstream = \"echo\"\n\
                  origins = [\"https://ok.example.com\"]\n";
    let (gw, admin) = start(routes, "");
    assert_eq!(
        admin_request(admin, "GET", "/healthz").await,
        (200, "ok\n".to_owned())
    );
    assert_eq!(admin_request(admin, "GET", "/nope").await.0, 404);
    assert_eq!(admin_request(admin, "POST", "/metrics").await.0, 405);

    let before = scrape(admin).await;
    assert!(
        before.contains("# TYPE wsgate_upgrades_total counter\n"),
        "{before}"
    );
    for status in ["101", "403", "404"] {
        assert_eq!(sample(&before, &upgrades(status)), 0, "{before}");
    }
    for _ in 0..N {
        let (mut ws, _) = raw_client(gw.addr, "/e", "gw.test", &[]).await;
        ws.send_close(1000, "").await;
        assert_eq!(ws.expect_close().await.close_code(), Some(1000));
    }
    for _ in 0..2 {
        assert_eq!(refusal(gw.addr, "/nowhere", "gw.test", &[]).await.0, 404);
    }
    let evil = [("Origin", "https://evil.example.com")];
    assert_eq!(refusal(gw.addr, "/o", "gw.test", &evil).await.0, 403);

    let after = scrape(admin).await;
    assert!(sample(&after, &upgrades("101")) >= N as u64, "{after}");
    assert_eq!(sample(&after, &upgrades("404")), 2, "{after}");
    assert_eq!(sample(&after, &upgrades("403")), 1, "{after}");
    assert_eq!(sample(&after, &upgrades("429")), 0, "{after}");
    assert_eq!(
        sample(&after, "wsgate_connections_total{core=\"0\"}"),
        (N + 3) as u64,
        "{after}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frame_counters_move_live_and_close_metrics_follow() {
    let backend = EchoBackend::start().await;
    let routes = format!(
        "[[route]]\npath_prefix = \"/p\"\nupstream = \"live\"\n\n\
         [[route]]\npath_prefix = \"/e\"\nupstream = \"echo\"\n\n\
         [upstream.live]\nbackends = [\"{}\"]\n",
        backend.url()
    );
    let (gw, admin) = start(&routes, "");
    let mut proxied = connect(&gw.url("/p")).await;
    let mut echo_a = connect(&gw.url("/e")).await;
    let echo_b = connect(&gw.url("/e")).await;
    wait_metric(admin, ACTIVE, WAIT, |v| v == 3).await;

    // Ten 16-byte messages through the backend, counted before the connection closes.
    let before = scrape(admin).await;
    for i in 0..10 {
        let text = format!("msg number {i:>5}");
        assert_eq!(text.len(), 16);
        send(&mut proxied, Message::Text(text.clone())).await;
        assert_eq!(recv_data(&mut proxied).await, Message::Text(text));
    }
    let live = scrape(admin).await;
    let delta = |text: &str, base: &str, series: &str| sample(text, series) - sample(base, series);
    for dir in ["client_to_backend", "backend_to_client"] {
        assert_eq!(delta(&live, &before, &frames(dir)), 10, "{dir}:\n{live}");
        assert_eq!(
            delta(&live, &before, &payload_bytes(dir)),
            160,
            "{dir}:\n{live}"
        );
    }
    assert_eq!(sample(&live, ACTIVE), 3, "{live}");

    // The embedded echo counts each frame both ways.
    for _ in 0..5 {
        send(&mut echo_a, Message::Binary(vec![1; 8])).await;
        assert_eq!(recv_data(&mut echo_a).await, Message::Binary(vec![1; 8]));
    }
    let echoed = scrape(admin).await;
    for dir in ["client_to_backend", "backend_to_client"] {
        assert_eq!(delta(&echoed, &live, &frames(dir)), 5, "{dir}:\n{echoed}");
        assert_eq!(
            delta(&echoed, &live, &payload_bytes(dir)),
            40,
            "{dir}:\n{echoed}"
        );
    }

    // A client-initiated 1000 close on the proxied connection: received from the client, sent
    // to the backend, answered by it, sent back to the client; one close handshake timed.
    let base = scrape(admin).await;
    close_client(proxied).await;
    let closed = wait_metric(admin, HISTOGRAM_COUNT, WAIT, |v| {
        v == sample(&base, HISTOGRAM_COUNT) + 1
    })
    .await;
    for (side, dir) in [
        ("client", "received"),
        ("backend", "sent"),
        ("backend", "received"),
        ("client", "sent"),
    ] {
        let series = close_frames(side, dir, 1000);
        assert_eq!(delta(&closed, &base, &series), 1, "{series}:\n{closed}");
    }
    assert_eq!(
        sample(
            &closed,
            "wsgate_close_handshake_duration_seconds_bucket{le=\"+Inf\"}"
        ),
        sample(&closed, HISTOGRAM_COUNT),
        "{closed}"
    );
    wait_metric(admin, ACTIVE, WAIT, |v| v == 2).await;

    close_client(echo_a).await;
    close_client(echo_b).await;
    let done = wait_metric(admin, ACTIVE, WAIT, |v| v == 0).await;
    assert_eq!(
        delta(&done, &base, &close_frames("client", "received", 1000)),
        3,
        "{done}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_connect_failures_and_health_gauge() {
    let live = TagBackend::start("live").await;
    let (dead, probed) = (free_addr(), free_addr());
    let routes = format!(
        "[[route]]\npath_prefix = \"/live\"\nupstream = \"live\"\n\n\
         [[route]]\npath_prefix = \"/dead\"\nupstream = \"dead\"\n\n\
         [upstream.live]\nbackends = [\"{}\"]\n\n\
         [upstream.dead]\nbackends = [\"ws://{dead}\"]\neject_after = 1\neject_for = \"1m\"\n\n\
         [upstream.probed]\nbackends = [\"ws://{probed}\"]\nhealth_interval = \"100ms\"\n\
         health_timeout = \"200ms\"\n",
        live.url()
    );
    let (gw, admin) = start(&routes, "");
    let failures = |pool, addr| backend_series("wsgate_backend_connect_failures_total", pool, addr);
    let healthy = |pool, addr| backend_series("wsgate_backend_healthy", pool, addr);

    let first = scrape(admin).await;
    assert_eq!(sample(&first, &failures("dead", dead)), 0, "{first}");
    assert_eq!(sample(&first, &healthy("dead", dead)), 1, "{first}");
    // The probe thread finds the probed pool's backend down without any traffic.
    wait_metric(admin, &healthy("probed", probed), WAIT, |v| v == 0).await;

    let (status, body) = refusal(gw.addr, "/dead", "gw.test", &[]).await;
    assert_eq!(status, 502, "{body}");
    let after = scrape(admin).await;
    assert_eq!(sample(&after, &failures("dead", dead)), 1, "{after}");
    assert_eq!(
        sample(&after, &healthy("dead", dead)),
        0,
        "ejected after one failure:\n{after}"
    );
    assert_eq!(sample(&after, &upgrades("502")), 1, "{after}");
    // Ejected: the next client gets 502 without another connect attempt.
    assert_eq!(refusal(gw.addr, "/dead", "gw.test", &[]).await.0, 502);
    let again = scrape(admin).await;
    assert_eq!(sample(&again, &failures("dead", dead)), 1, "{again}");
    assert_eq!(sample(&again, &upgrades("502")), 2, "{again}");

    assert_eq!(greeting(gw.addr, "/live", "gw.test", &[]).await, "live");
    let last = scrape(admin).await;
    assert_eq!(sample(&last, &healthy("live", live.addr)), 1, "{last}");
    assert_eq!(sample(&last, &failures("live", live.addr)), 0, "{last}");
    assert_eq!(sample(&last, &upgrades("101")), 1, "{last}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_answers_503_while_draining() {
    let routes = "[timeouts]\nclose = \"10s\"\n\n[[route]]\nupstream = \"echo\"\n";
    let (mut gw, admin) = start(routes, "drain_timeout = \"10s\"\n");
    let (mut client, _) = raw_client(gw.addr, "/", "gw.test", &[]).await;
    client.send(true, OpCode::Text, b"hi").await;
    assert_eq!(client.read_frame().await.payload, b"hi");
    assert_eq!(admin_request(admin, "GET", "/healthz").await.0, 200);

    gw.signal("TERM");
    // The client holds the drain open by not answering the gateway's close yet.
    let close = client.expect_close().await;
    assert_eq!(close.close_code(), Some(1001));
    let (status, body) = admin_request(admin, "GET", "/healthz").await;
    assert_eq!(
        (status, body.as_str()),
        (503, "draining\n"),
        "{}",
        gw.stderr()
    );
    // Metrics are still served while draining.
    let text = scrape(admin).await;
    assert_eq!(sample(&text, ACTIVE), 1, "{text}");

    client.send_close(1001, "").await;
    client.expect_eof(WAIT).await;
    assert_eq!(gw.wait_exit(WAIT).await, Some(0), "{}", gw.stderr());
}
