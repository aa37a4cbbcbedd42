//! The admin listener end to end: `GET /healthz` (200, and 503 while draining, answered at
//! once whatever else is connected), the cap on admin connections, the refusal of browsers
//! and foreign `Host` names, and `GET /metrics` after real traffic: upgrades by status, frame
//! and byte counters that move while a connection is still open, close frames by side,
//! direction and code (none for codes that never go on the wire), the active connection
//! gauge, the close-handshake histogram (proxied and echo connections alike), and the
//! per-backend connect failures, health and failed probes.

pub mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use codec::frame::OpCode;
use common::config::{
    ConfigGateway, TagBackend, admin_request, greeting, preamble, refusal, sample, scrape,
    wait_metric,
};
use common::{
    EchoBackend, WsClient, close_frame, connect, drain_to_end, free_addr, http_exchange,
    raw_client, recv_data, refusing_addr, send, within, within_for,
};
use tokio::io::AsyncReadExt as _;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

const ACTIVE: &str = "wsgate_active_connections{core=\"0\"}";
const HISTOGRAM_COUNT: &str = "wsgate_close_handshake_duration_seconds_count";
/// Admin connections served at once (the gateway's `MAX_IN_FLIGHT`).
const ADMIN_CAP: usize = 32;
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

fn close_frames(side: &str, direction: &str, code: impl std::fmt::Display) -> String {
    format!(
        "wsgate_close_frames_total{{side=\"{side}\",direction=\"{direction}\",code=\"{code}\"}}"
    )
}

fn backend_series(name: &str, pool: &str, backend: SocketAddr) -> String {
    format!("{name}{{upstream=\"{pool}\",backend=\"ws://{backend}\"}}")
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
    // Every connection's close handshake is timed, the echo's too.
    assert_eq!(delta(&done, &base, HISTOGRAM_COUNT), 3, "{done}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_connect_failures_and_health_gauge() {
    let live = TagBackend::start("live").await;
    let (dead, probed) = (refusing_addr(), refusing_addr());
    let (dead, probed) = (dead.addr, probed.addr);
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
    let probe_failures = |pool: &str, addr: SocketAddr| {
        format!(
            "wsgate_backend_probe_failures_total{{upstream=\"{pool}\",backend=\"ws://{addr}\"}}"
        )
    };

    let first = scrape(admin).await;
    assert_eq!(sample(&first, &failures("dead", dead)), 0, "{first}");
    assert_eq!(sample(&first, &healthy("dead", dead)), 1, "{first}");
    // The probe thread finds the probed pool's backend down without any traffic, and counts
    // every failed probe (one per 100 ms interval) against it.
    wait_metric(admin, &healthy("probed", probed), WAIT, |v| v == 0).await;
    let probing = wait_metric(admin, &probe_failures("probed", probed), WAIT, |v| v >= 2).await;
    // Pools without a health check are never probed.
    assert_eq!(
        sample(&probing, &probe_failures("dead", dead)),
        0,
        "{probing}"
    );

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

/// The echo answers an empty close with an empty close: counted as code "none" both ways,
/// never as 1005, and no series exists for a code that cannot go on the wire. Its close
/// handshakes are timed whichever side starts them (here the client, then the gateway's idle
/// timeout).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_close_handshakes_are_timed_and_empty_closes_have_no_code() {
    let routes = "[timeouts]\nidle = \"300ms\"\n\n[[route]]\nupstream = \"echo\"\n";
    let (gw, admin) = start(routes, "");
    let base = scrape(admin).await;
    for code in [1004, 1005, 1006, 1015] {
        assert!(
            !base.contains(&format!("code=\"{code}\"")),
            "{code}:\n{base}"
        );
    }
    assert_eq!(sample(&base, HISTOGRAM_COUNT), 0, "{base}");

    let (mut client, _) = raw_client(gw.addr, "/", "gw.test", &[]).await;
    client.send(true, OpCode::Close, b"").await;
    let reply = client.expect_close().await;
    assert!(reply.payload.is_empty(), "{reply:?}");
    client.expect_eof(WAIT).await;
    let text = wait_metric(admin, HISTOGRAM_COUNT, WAIT, |v| v == 1).await;
    assert_eq!(
        sample(&text, &close_frames("client", "received", "none")),
        1,
        "{text}"
    );
    assert_eq!(
        sample(&text, &close_frames("client", "sent", "none")),
        1,
        "{text}"
    );
    assert!(!text.contains("code=\"1005\""), "{text}");

    // The gateway closes an idle connection; the client's answer completes the handshake.
    let (mut idle, _) = raw_client(gw.addr, "/", "gw.test", &[]).await;
    assert_eq!(idle.expect_close().await.close_code(), Some(1001));
    idle.send_close(1001, "").await;
    idle.expect_eof(WAIT).await;
    let text = wait_metric(admin, HISTOGRAM_COUNT, WAIT, |v| v == 2).await;
    assert_eq!(
        sample(&text, &close_frames("client", "sent", 1001)),
        1,
        "{text}"
    );
    assert_eq!(
        sample(&text, &close_frames("client", "received", 1001)),
        1,
        "{text}"
    );
}

/// A Kubernetes probe times out after 1 s: silent clients on the admin port (more of them
/// than the old four slots) must not hold `/healthz` up, and it is answered while they are
/// still connected and unanswered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_answers_at_once_while_silent_connections_are_open() {
    let (_gw, admin) = start("[[route]]\nupstream = \"echo\"\n", "");
    assert_eq!(admin_request(admin, "GET", "/healthz").await.0, 200);
    let mut silent = Vec::new();
    for _ in 0..6 {
        silent.push(
            within("connect to admin", TcpStream::connect(admin))
                .await
                .unwrap(),
        );
    }
    let started = Instant::now();
    let (status, body) = admin_request(admin, "GET", "/healthz").await;
    let took = started.elapsed();
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    // Well under 10 ms on an idle machine; the bound leaves room for a loaded one.
    assert!(took < Duration::from_millis(200), "/healthz took {took:?}");
    for stream in &silent {
        let mut byte = [0; 1];
        match stream.try_read(&mut byte) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            other => panic!("a silent client was already answered or closed: {other:?}"),
        }
    }
}

/// Past the cap a connection is refused with 503 at once instead of queueing behind silent
/// ones; the places free as those go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_connections_past_the_cap_get_503_at_once() {
    let (_gw, admin) = start("[[route]]\nupstream = \"echo\"\n", "");
    let mut silent = Vec::new();
    for _ in 0..ADMIN_CAP {
        silent.push(
            within("connect to admin", TcpStream::connect(admin))
                .await
                .unwrap(),
        );
    }
    let mut extra = within("connect to admin", TcpStream::connect(admin))
        .await
        .unwrap();
    let mut answer = Vec::new();
    within_for(
        Duration::from_secs(1),
        "the 503",
        extra.read_to_end(&mut answer),
    )
    .await
    .expect("read the refusal");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 503 "), "{answer}");
    assert!(answer.contains("\r\nRetry-After: 1\r\n"), "{answer}");
    drop(silent);
    common::config::wait_until(WAIT, "a free admin place", async || {
        admin_request(admin, "GET", "/healthz").await.0 == 200
    })
    .await;
}

/// The admin plane is for machines: a browser's request (it carries `Origin`) is refused, and
/// so is a `Host` other than the listener's own address or `localhost:PORT` (DNS rebinding);
/// `/healthz` takes any `Host` for probes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_refuse_browsers_and_foreign_hosts() {
    let (_gw, admin) = start("[[route]]\nupstream = \"echo\"\n", "");
    let port = admin.port();
    let get = async |path: &str, headers: &str| {
        let request = format!("GET {path} HTTP/1.1\r\n{headers}\r\n");
        http_exchange(admin, request.as_bytes()).await
    };
    for host in [format!("localhost:{port}"), admin.to_string()] {
        let head = get("/metrics", &format!("Host: {host}\r\n")).await;
        assert_eq!(head.status(), 200, "{host}");
    }
    // No Host at all (an HTTP/1.0 client).
    let head = http_exchange(admin, b"GET /metrics HTTP/1.0\r\n\r\n").await;
    assert_eq!(head.status(), 200);
    for host in [
        format!("rebound.example:{port}"),
        format!("localhost:{}", port + 1),
    ] {
        let head = get("/metrics", &format!("Host: {host}\r\n")).await;
        assert_eq!(head.status(), 403, "{host}");
        let body = String::from_utf8_lossy(&head.rest);
        assert!(body.contains(&format!("Host must be {admin}")), "{body}");
        assert_eq!(
            get("/healthz", &format!("Host: {host}\r\n")).await.status(),
            200
        );
    }
    let browser = format!("Host: {admin}\r\nOrigin: http://{admin}\r\n");
    assert_eq!(get("/metrics", &browser).await.status(), 403);
}
