//! Configuration reload under live traffic, by SIGHUP and by `POST /reload`: new connections
//! follow the new routes at once, established connections keep talking to the backend they
//! started with (no close, no error), and a file that does not validate leaves the running
//! configuration in place.

pub mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

use common::config::{
    ConfigGateway, TagBackend, admin_request, greeting, metric, preamble, refusal, sample, scrape,
    wait_until,
};
use common::{
    close_frame, connect, drain_to_end, expect_close, free_addr, recv_data, send, within,
};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;

/// Live clients held across the reload.
const CLIENTS: usize = 5;
/// Exchanges each live client completes after it learns of the reload.
const AFTER: usize = 50;
/// Pause between a client's exchanges.
const PACE: Duration = Duration::from_millis(20);
/// The bound on a reload taking effect (its log line, or the whole client run).
const WAIT: Duration = Duration::from_secs(5);

/// One route, `/` to pool `to`, over pools `a` and `b`.
fn config(
    admin: Option<SocketAddr>,
    server_extra: &str,
    a: &TagBackend,
    b: &TagBackend,
    to: &str,
) -> String {
    format!(
        "{}[[route]]\nupstream = \"{to}\"\n\n\
         [upstream.a]\nbackends = [\"{}\"]\n\n\
         [upstream.b]\nbackends = [\"{}\"]\n",
        preamble(admin, server_extra),
        a.url(),
        b.url()
    )
}

/// A file that does not validate: the route names a pool that does not exist.
const INVALID: &str = "[server]\ncores = 1\n[[listener]]\naddress = \"127.0.0.1:0\"\n\
                       [[route]]\nupstream = \"nowhere\"\n";

/// A client that connects, must be greeted by `A`, then exchanges a message every [`PACE`]
/// (every reply must come from `A`) until it has done [`AFTER`] exchanges after `reloaded`
/// turned true; then closes with 1000 and expects 1000 back. Returns its exchange count.
fn chatter(
    url: String,
    id: usize,
    warmed: Arc<AtomicUsize>,
    mut reloaded: watch::Receiver<bool>,
) -> JoinHandle<usize> {
    tokio::spawn(async move {
        let mut ws = connect(&url).await;
        assert_eq!(recv_data(&mut ws).await, Message::Text("A".into()));
        let (mut n, mut after) = (0, 0);
        loop {
            let text = format!("client {id} message {n}");
            send(&mut ws, Message::Text(text.clone())).await;
            match recv_data(&mut ws).await {
                Message::Text(reply) => {
                    assert_eq!(reply, format!("A:{text}"), "client {id} after {after}");
                }
                other => panic!("client {id}: unexpected {other:?}"),
            }
            n += 1;
            if n == 3 {
                warmed.fetch_add(1, Relaxed);
            }
            if *reloaded.borrow_and_update() {
                after += 1;
                if after == AFTER {
                    break;
                }
            }
            tokio::time::sleep(PACE).await;
        }
        within("client close", ws.close(Some(close_frame(1000, "done"))))
            .await
            .expect("send close");
        assert_eq!(expect_close(&mut ws).await.map(|c| c.0), Some(1000));
        drain_to_end(&mut ws).await;
        n
    })
}

/// Starts [`CLIENTS`] chatters and waits until each has exchanged a few messages.
async fn start_chatters(
    gw: &ConfigGateway,
    reloaded: &watch::Sender<bool>,
) -> Vec<JoinHandle<usize>> {
    let warmed = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|id| chatter(gw.url("/"), id, Arc::clone(&warmed), reloaded.subscribe()))
        .collect();
    wait_until(WAIT, "live clients warmed up", async || {
        warmed.load(Relaxed) == CLIENTS
    })
    .await;
    clients
}

/// Waits for every chatter to finish its exchanges cleanly.
async fn finish_chatters(clients: Vec<JoinHandle<usize>>) {
    for (id, client) in clients.into_iter().enumerate() {
        let n = within("live client finishes", client)
            .await
            .unwrap_or_else(|e| panic!("live client {id} failed: {e}"));
        assert!(n > AFTER, "client {id} made {n} exchanges");
    }
}

async fn served_by(gw: &ConfigGateway) -> String {
    greeting(gw.addr, "/", "gw.test", &[]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reroutes_new_connections_and_spares_live_ones() {
    let a = TagBackend::start("A").await;
    let b = TagBackend::start("B").await;
    let gw = ConfigGateway::start(&config(None, "", &a, &b, "a"));
    let (reloaded, _) = watch::channel(false);
    let clients = start_chatters(&gw, &reloaded).await;

    gw.config().write(&config(None, "", &a, &b, "b"));
    gw.signal("HUP");
    let line = gw
        .wait_line(WAIT, |l| l.contains("reloaded "))
        .await
        .unwrap_or_else(|| panic!("no reload line:\n{}", gw.stderr()));
    assert!(line.contains("1 routes, 2 upstreams"), "{line}");
    reloaded.send_replace(true);
    assert_eq!(served_by(&gw).await, "B");

    // A file that does not validate is refused; the running configuration stays.
    gw.config().write(INVALID);
    gw.signal("HUP");
    let line = gw
        .wait_line(WAIT, |l| l.contains("reload failed"))
        .await
        .unwrap_or_else(|| panic!("no reload failure line:\n{}", gw.stderr()));
    assert!(
        line.contains("\\\"nowhere\\\"") || line.contains("\"nowhere\""),
        "{line}"
    );
    assert_eq!(served_by(&gw).await, "B");

    finish_chatters(clients).await;
    assert_eq!(served_by(&gw).await, "B");
    assert_eq!(a.upgrades(), CLIENTS, "only the live clients reached A");
    assert_eq!(b.upgrades(), 3);
    let lines = gw.stderr();
    assert_eq!(lines.matches("reload failed").count(), 1, "{lines}");
    assert!(
        !lines.contains("closed_by=\"gateway\""),
        "a live connection was closed by the gateway:\n{lines}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_reload_reroutes_and_reports_errors() {
    let a = TagBackend::start("A").await;
    let b = TagBackend::start("B").await;
    let admin = free_addr();
    let gw = ConfigGateway::start(&config(Some(admin), "", &a, &b, "a"));
    let (reloaded, _) = watch::channel(false);
    let clients = start_chatters(&gw, &reloaded).await;

    gw.config().write(&config(Some(admin), "", &a, &b, "b"));
    let (status, body) = admin_request(admin, "POST", "/reload").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        format!(
            "reloaded {}: 1 routes, 2 upstreams\n",
            gw.config().path().display()
        )
    );
    reloaded.send_replace(true);
    // The reload is complete when POST answers: the very next connection goes to B.
    assert_eq!(served_by(&gw).await, "B");

    gw.config().write(INVALID);
    let (status, body) = admin_request(admin, "POST", "/reload").await;
    assert_eq!(status, 500, "{body}");
    assert!(
        body.contains(&format!("{}: ", gw.config().path().display()))
            && body.contains("route[0].upstream: \"nowhere\" is not a declared upstream"),
        "{body}"
    );
    assert_eq!(served_by(&gw).await, "B");

    // [server] settings are fixed at start; a reload says so rather than half-apply them.
    gw.config().write(&config(
        Some(admin),
        "drain_timeout = \"3s\"\n",
        &a,
        &b,
        "a",
    ));
    let (status, body) = admin_request(admin, "POST", "/reload").await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("[server] changes take effect on restart"),
        "{body}"
    );
    assert_eq!(served_by(&gw).await, "A");

    finish_chatters(clients).await;
    assert_eq!(a.upgrades(), CLIENTS + 1);
    assert_eq!(b.upgrades(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_reload_without_a_config_file_is_500() {
    let admin = free_addr();
    let admin_arg = admin.to_string();
    let gw = ConfigGateway::start_args(&[
        "--listen",
        "127.0.0.1:0",
        "--cores",
        "1",
        "--admin",
        &admin_arg,
    ]);
    let (status, body) = admin_request(admin, "POST", "/reload").await;
    assert_eq!(status, 500, "{body}");
    assert!(body.contains("no --config file"), "{body}");
    assert_eq!(admin_request(admin, "GET", "/reload").await.0, 405);
    // Still serving.
    let (mut ws, _) = common::raw_client(gw.addr, "/", "gw.test", &[]).await;
    ws.send_close(1000, "").await;
    assert_eq!(ws.expect_close().await.close_code(), Some(1000));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_applies_new_limits_to_new_connections() {
    let a = TagBackend::start("A").await;
    let b = TagBackend::start("B").await;
    let admin = free_addr();
    let gw = ConfigGateway::start(&config(Some(admin), "", &a, &b, "a"));
    let mut held = connect(&gw.url("/")).await;
    assert_eq!(recv_data(&mut held).await, Message::Text("A".into()));
    let limited = config(Some(admin), "", &a, &b, "a").replace(
        "[[route]]",
        "[limits]\nmax_connections_per_ip = 1\n\n[[route]]",
    );
    gw.config().write(&limited);
    assert_eq!(admin_request(admin, "POST", "/reload").await.0, 200);
    // The held connection counts against the new limit, and is itself untouched.
    assert_eq!(common::refused_status(&gw.url("/")).await, 429);
    send(&mut held, Message::Text("x".into())).await;
    assert_eq!(recv_data(&mut held).await, Message::Text("A:x".into()));
    within("client close", held.close(None))
        .await
        .expect("send close");
    drain_to_end(&mut held).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_keeps_the_state_of_unchanged_pools() {
    let (dead, other) = (free_addr(), free_addr());
    let admin = free_addr();
    let file = |route: &str, backend: SocketAddr| {
        format!(
            "{}[[route]]\npath_prefix = \"{route}\"\nupstream = \"dead\"\n\n\
             [upstream.dead]\nbackends = [\"ws://{backend}\"]\neject_after = 1\n\
             eject_for = \"1m\"\n",
            preamble(Some(admin), "")
        )
    };
    let failures = |backend: SocketAddr| {
        format!("wsgate_backend_connect_failures_total{{pool=\"dead\",backend=\"ws://{backend}\"}}")
    };
    let healthy = |backend: SocketAddr| {
        format!("wsgate_backend_healthy{{pool=\"dead\",backend=\"ws://{backend}\"}}")
    };
    let gw = ConfigGateway::start(&file("/", dead));
    assert_eq!(refusal(gw.addr, "/", "gw.test", &[]).await.0, 502);
    let text = scrape(admin).await;
    assert_eq!(sample(&text, &failures(dead)), 1, "{text}");
    assert_eq!(sample(&text, &healthy(dead)), 0, "{text}");

    // Same pool, other routes: the ejection and the counter survive the reload.
    gw.config().write(&file("/d", dead));
    assert_eq!(admin_request(admin, "POST", "/reload").await.0, 200);
    let text = scrape(admin).await;
    assert_eq!(sample(&text, &failures(dead)), 1, "{text}");
    assert_eq!(sample(&text, &healthy(dead)), 0, "{text}");
    assert_eq!(
        refusal(gw.addr, "/", "gw.test", &[]).await.0,
        404,
        "new routes apply"
    );
    let (status, _) = refusal(gw.addr, "/d", "gw.test", &[]).await;
    assert_eq!(status, 502);
    assert_eq!(
        sample(&scrape(admin).await, &failures(dead)),
        1,
        "still ejected: not tried again"
    );

    // Other backends: a new pool state, and the old rows are gone.
    gw.config().write(&file("/d", other));
    assert_eq!(admin_request(admin, "POST", "/reload").await.0, 200);
    let text = scrape(admin).await;
    assert_eq!(metric(&text, &failures(dead)), None, "{text}");
    assert_eq!(sample(&text, &failures(other)), 0, "{text}");
    assert_eq!(sample(&text, &healthy(other)), 1, "{text}");
}
