//! Configuration reload under live traffic, by SIGHUP and by `POST /reload`: new connections
//! follow the new routes at once, established connections keep talking to the backend they
//! started with (no close, no error), and a file that does not validate leaves the running
//! configuration in place (422 on the admin plane). Every reload logs exactly one line, in
//! Display text, naming how it was asked for. `POST /reload` refuses browsers (`Origin`),
//! foreign `Host` names, and, with `admin_token` set, requests without the bearer token.

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
    STEP, close_frame, connect, drain_to_end, expect_close, field, free_addr, http_exchange,
    recv_data, refusing_addr, send, within,
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

/// A file that does not validate, twice over: the route names a pool that does not exist, and
/// a timeout is zero.
const INVALID: &str = "[server]\ncores = 1\n[[listener]]\naddress = \"127.0.0.1:0\"\n\
                       [timeouts]\nclose = \"0s\"\n[[route]]\nupstream = \"nowhere\"\n";
/// The two problems [`INVALID`] has, as the gateway words them.
const PROBLEMS: [&str; 2] = [
    "route[0].upstream: \"nowhere\" is not a declared upstream",
    "timeouts.close: \"0s\" must be more than 0",
];

/// Checks a failed reload's log line: `via`, and every problem in plain Display text on the
/// one line (no Debug quoting or escapes).
fn assert_failure_line(line: &str, via: &str) {
    assert_eq!(field(line, "via"), Some(via), "{line}");
    assert!(
        line.contains(" why=/") && line.contains(".toml: 2 problems: "),
        "{line}"
    );
    for problem in PROBLEMS {
        assert!(line.contains(problem), "{problem}:\n{line}");
    }
    assert!(
        !line.contains("\\\"") && !line.contains("\\n"),
        "Debug text: {line}"
    );
}

/// Sends `POST /reload` with `headers` (each ending in CRLF) and an empty body.
async fn post_reload(admin: SocketAddr, headers: &str) -> common::HttpHead {
    let request = format!("POST /reload HTTP/1.1\r\n{headers}Content-Length: 0\r\n\r\n");
    http_exchange(admin, request.as_bytes()).await
}

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
    assert_eq!(field(&line, "via"), Some("sighup"), "{line}");
    reloaded.send_replace(true);
    assert_eq!(served_by(&gw).await, "B");

    // A file that does not validate is refused; the running configuration stays.
    gw.config().write(INVALID);
    gw.signal("HUP");
    let line = gw
        .wait_line(WAIT, |l| l.contains("reload failed"))
        .await
        .unwrap_or_else(|| panic!("no reload failure line:\n{}", gw.stderr()));
    assert_failure_line(&line, "sighup");
    assert_eq!(served_by(&gw).await, "B");

    finish_chatters(clients).await;
    assert_eq!(served_by(&gw).await, "B");
    assert_eq!(a.upgrades(), CLIENTS, "only the live clients reached A");
    assert_eq!(b.upgrades(), 3);
    let lines = gw.stderr();
    assert_eq!(lines.matches("reload failed").count(), 1, "{lines}");
    assert_eq!(
        lines.matches("nowhere").count(),
        1,
        "one line per failure:\n{lines}"
    );
    assert_eq!(lines.matches("reloaded ").count(), 1, "{lines}");
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
    // One log line per reload, naming how it was asked for (the log writer may lag a loaded
    // machine: wait for it, then check there is only the one).
    let reloaded_line = format!("reloaded {}", gw.config().path().display());
    gw.wait_lines(STEP, 1, |l| l.contains(&reloaded_line)).await;
    let lines = gw.lines();
    let done: Vec<_> = lines
        .iter()
        .filter(|l| l.contains(&reloaded_line))
        .collect();
    assert_eq!(done.len(), 1, "{lines:#?}");
    assert_eq!(field(done[0], "via"), Some("admin"), "{}", done[0]);

    // A file that does not validate: 422 naming every problem; the running configuration
    // stays.
    gw.config().write(INVALID);
    let (status, body) = admin_request(admin, "POST", "/reload").await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body.starts_with(&format!("{}: 2 problems:\n", gw.config().path().display())),
        "{body}"
    );
    for problem in PROBLEMS {
        assert!(body.contains(problem), "{problem}:\n{body}");
    }
    assert_eq!(served_by(&gw).await, "B");
    let line = gw
        .wait_line(WAIT, |l| l.contains("reload failed"))
        .await
        .unwrap_or_else(|| panic!("no reload failure line:\n{}", gw.stderr()));
    assert_failure_line(&line, "admin");
    let lines = gw.stderr();
    assert_eq!(
        lines.matches("nowhere").count(),
        1,
        "one line per failure:\n{lines}"
    );

    // A file that cannot be read is the host's problem, not the request's: 500.
    std::fs::remove_file(gw.config().path()).expect("remove the config file");
    let (status, body) = admin_request(admin, "POST", "/reload").await;
    assert_eq!(status, 500, "{body}");
    assert!(body.contains("cannot read"), "{body}");
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
    assert_eq!(b.upgrades(), 3);
}

/// Without a file there is nothing to reload: 409, the request conflicting with how the
/// gateway was started (not a server error).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_reload_without_a_config_file_is_409() {
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
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("no --config file"), "{body}");
    let line = gw
        .wait_line(WAIT, |l| l.contains("reload failed"))
        .await
        .unwrap_or_else(|| panic!("no reload failure line:\n{}", gw.stderr()));
    assert_eq!(field(&line, "via"), Some("admin"), "{line}");
    assert!(line.contains(" why=no --config file to reload"), "{line}");
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
    let (dead, other) = (refusing_addr(), refusing_addr());
    let (dead, other) = (dead.addr, other.addr);
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
        format!(
            "wsgate_backend_connect_failures_total{{upstream=\"dead\",backend=\"ws://{backend}\"}}"
        )
    };
    let healthy = |backend: SocketAddr| {
        format!("wsgate_backend_healthy{{upstream=\"dead\",backend=\"ws://{backend}\"}}")
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

/// A web page cannot make a browser reload the gateway: a cross-site form post carries
/// `Origin`, and a DNS-rebound page names its own host; both get 403 and change nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_reload_refuses_browsers_and_foreign_hosts() {
    let a = TagBackend::start("A").await;
    let b = TagBackend::start("B").await;
    let admin = free_addr();
    let gw = ConfigGateway::start(&config(Some(admin), "", &a, &b, "a"));
    gw.config().write(&config(Some(admin), "", &a, &b, "b"));
    let form = format!(
        "Host: {admin}\r\nOrigin: https://evil.example\r\n\
         Content-Type: application/x-www-form-urlencoded\r\n"
    );
    assert_eq!(post_reload(admin, &form).await.status(), 403);
    let rebound = format!("Host: evil.example:{}\r\n", admin.port());
    assert_eq!(post_reload(admin, &rebound).await.status(), 403);
    assert_eq!(served_by(&gw).await, "A", "a refused request reloaded");
    assert!(!gw.stderr().contains("reloaded "), "{}", gw.stderr());

    let local = format!("Host: localhost:{}\r\n", admin.port());
    assert_eq!(post_reload(admin, &local).await.status(), 200);
    assert_eq!(served_by(&gw).await, "B");
}

/// With `admin_token` set, `/metrics` and `/reload` need `Authorization: Bearer TOKEN` (401
/// with a challenge otherwise, and nothing happens); `/healthz` stays open for probes. A token
/// too weak to use is refused at load without being echoed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_token_guards_metrics_and_reload() {
    const TOKEN: &str = "s3cret-token-0123456789";
    let a = TagBackend::start("A").await;
    let b = TagBackend::start("B").await;
    let admin = free_addr();
    let extra = format!("admin_token = \"{TOKEN}\"\n");
    let gw = ConfigGateway::start(&config(Some(admin), &extra, &a, &b, "a"));
    gw.config().write(&config(Some(admin), &extra, &a, &b, "b"));
    let host = format!("Host: {admin}\r\n");
    for auth in [
        String::new(),
        format!("Authorization: Bearer {}\r\n", &TOKEN[1..]),
        format!("Authorization: Bearer {TOKEN}x\r\n"),
        format!("Authorization: Basic {TOKEN}\r\n"),
    ] {
        let head = post_reload(admin, &format!("{host}{auth}")).await;
        assert_eq!(head.status(), 401, "{auth}");
        let challenge = head.header("WWW-Authenticate").unwrap_or_default();
        assert!(challenge.starts_with("Bearer "), "{challenge}");
        let (status, _) = admin_request(admin, "GET", "/metrics").await;
        assert_eq!(status, 401);
    }
    assert_eq!(
        served_by(&gw).await,
        "A",
        "an unauthorized request reloaded"
    );
    assert_eq!(
        admin_request(admin, "GET", "/healthz").await,
        (200, "ok\n".to_owned())
    );

    let auth = format!("{host}Authorization: Bearer {TOKEN}\r\n");
    assert_eq!(post_reload(admin, &auth).await.status(), 200);
    assert_eq!(served_by(&gw).await, "B");
    let scrape = format!("GET /metrics HTTP/1.1\r\n{auth}\r\n");
    let head = http_exchange(admin, scrape.as_bytes()).await;
    assert_eq!(head.status(), 200);
    assert!(String::from_utf8_lossy(&head.rest).contains("wsgate_upgrades_total"));

    let weak = common::config::TempConfig::new(&config(
        Some(admin),
        "admin_token = \"hunter2\"\n",
        &a,
        &b,
        "a",
    ));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gateway"))
        .args(["--check-config", weak.arg()])
        .output()
        .expect("run gateway --check-config");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("server.admin_token: must be 16 or more"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("hunter2"),
        "the token was echoed: {stderr}"
    );
}
