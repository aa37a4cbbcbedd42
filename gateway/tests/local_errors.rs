//! The gateway's own limits, end to end: running out of descriptors is answered 503 and not
//! held against a healthy backend, and connections count against the connection limits from
//! accept, so silent connections that never send a request cannot pile up past them.

pub mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use common::config::{
    ConfigGateway, TagBackend, TempConfig, connect_from, preamble, sample, scrape, upgrade_request,
    wait_metric,
};
use common::{
    Gateway, STEP, field, free_addr, raw_client, refused_status, refusing_addr, try_connect, within,
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite;

/// The gateway's descriptor limit in the exhaustion test: about 20 above what it holds idle.
/// The test runs at this limit and one above, which ends the gateway in each of the two
/// states it can reach (see `exhaust`).
const NOFILE: u32 = 40;
/// Local failures provoked; more than the pool's `eject_after`, so a gateway that blamed the
/// backend would eject it.
const LOCAL_FAILURES: usize = 3;
/// How long a client waits for an answer before concluding that the gateway did not accept
/// its connection (it answers an accepted one within milliseconds).
const UNANSWERED: Duration = Duration::from_secs(1);
/// The bound on "at once" for a connection refused at accept.
const PROMPT: Duration = Duration::from_secs(1);
const ACTIVE: &str = "wsgate_active_connections{core=\"0\"}";

fn ip(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
}

/// What the gateway said to one upgrade request.
enum Answer {
    /// 101: the live connection, held so that its descriptors stay in use.
    Upgraded(TcpStream),
    /// Anything else: the whole answer, up to the gateway's close.
    Refused(String),
    /// Nothing yet: the connection, on which the answer may still come.
    Unanswered(TcpStream),
}

/// Reads the gateway's answer on `stream`, if it begins within `wait`.
async fn answer(mut stream: TcpStream, wait: Duration) -> Answer {
    let mut buf = Vec::new();
    let mut chunk = [0; 4096];
    loop {
        let limit = if buf.is_empty() { wait } else { STEP };
        match tokio::time::timeout(limit, stream.read(&mut chunk)).await {
            Err(_) if buf.is_empty() => return Answer::Unanswered(stream),
            Err(elapsed) => panic!(
                "{elapsed}: partial answer {:?}",
                String::from_utf8_lossy(&buf)
            ),
            Ok(Ok(0) | Err(_)) => break,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        }
        if buf.starts_with(b"HTTP/1.1 101 ") && buf.windows(4).any(|w| w == b"\r\n\r\n") {
            return Answer::Upgraded(stream);
        }
    }
    Answer::Refused(String::from_utf8_lossy(&buf).into_owned())
}

/// Sends an upgrade request to `addr` and waits up to `wait` for the answer to begin.
async fn attempt(addr: SocketAddr, wait: Duration) -> Answer {
    let mut stream = within("connect", TcpStream::connect(addr))
        .await
        .expect("connect to the gateway");
    stream
        .write_all(&upgrade_request("/", "gw.test", &[]))
        .await
        .expect("write the request");
    answer(stream, wait).await
}

/// Asserts a refusal is the 503 of a gateway out of descriptors.
fn assert_local_503(text: &str) {
    assert!(text.starts_with("HTTP/1.1 503 "), "not a 503: {text:?}");
    assert!(text.contains("\r\nRetry-After: 1\r\n"), "{text:?}");
    assert!(
        text.ends_with("\r\n\r\nthe gateway is out of file descriptors\n"),
        "{text:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn descriptor_exhaustion_answers_503_and_does_not_eject_the_backend() {
    let waited = [exhaust(NOFILE).await, exhaust(NOFILE + 1).await];
    assert!(
        waited[0] != waited[1],
        "one of the two limits must leave a client waiting to be accepted: {waited:?}"
    );
}

/// Runs a gateway out of descriptors under limit `nofile` and checks what follows; says
/// whether a client had to wait for the gateway to accept it.
async fn exhaust(nofile: u32) -> bool {
    let backend = TagBackend::start("B").await;
    let admin = free_addr();
    let file = TempConfig::new(&format!(
        "{}[limits]\nhandshake_timeout = \"30s\"\n\n\
         [[route]]\npath_prefix = \"/\"\nupstream = \"pool\"\n\n\
         [upstream.pool]\nbackends = [\"{}\"]\neject_after = 2\neject_for = \"30s\"\n",
        preamble(Some(admin), ""),
        backend.url()
    ));
    let gw = Gateway::start_with_nofile(nofile, &["--config", file.arg()]);
    let (held, refusals, waited) = run_out(&gw, nofile).await;
    for text in &refusals {
        assert_local_503(text);
    }
    assert_eq!(
        backend.upgrades(),
        held.len(),
        "a failed connect reached the backend"
    );

    // Everything closed, the backend is still in: once the gateway has let go of the held
    // connections (their descriptors are back), the next client is upgraded at once.
    let held_count = held.len();
    drop(held);
    assert!(
        gw.wait_lines(STEP, held_count, |l| l.contains("connection closed"))
            .await,
        "the held connections were not closed:\n{}",
        gw.stderr()
    );
    match try_connect(&gw.url("/")).await {
        Ok(_) => {}
        Err(tungstenite::Error::Http(resp)) => panic!(
            "refused with {} after the descriptors came back:\n{}",
            resp.status(),
            gw.stderr()
        ),
        Err(e) => panic!("{e}"),
    }
    assert_counted(&gw, admin, &backend).await;
    waited
}

/// Opens connections through `gw` until its backend connects fail for want of a descriptor,
/// and [`LOCAL_FAILURES`] clients have been answered so. Returns the upgraded connections,
/// still open, the answers to the failed clients, and whether one had to wait to be accepted.
async fn run_out(gw: &Gateway, nofile: u32) -> (Vec<TcpStream>, Vec<String>, bool) {
    // A proxied connection holds two descriptors and a silent one holds one, so depending on
    // the parity of what is left, the gateway ends with one descriptor free (the next client
    // is accepted and its backend connect fails with EMFILE) or none (the next client waits
    // in the listen queue); then closing the silent connection frees the one descriptor.
    let mut silent = Some(TcpStream::connect(gw.addr).await.expect("connect"));
    let mut held = Vec::new();
    let mut refusals = Vec::new();
    for _ in 0..nofile {
        match attempt(gw.addr, UNANSWERED).await {
            Answer::Upgraded(stream) => held.push(stream),
            Answer::Refused(text) => {
                refusals.push(text);
                break;
            }
            Answer::Unanswered(pending) => {
                assert!(silent.is_some(), "a client stuck twice:\n{}", gw.stderr());
                drop(silent.take());
                match answer(pending, STEP).await {
                    Answer::Refused(text) => refusals.push(text),
                    Answer::Upgraded(_) => panic!("upgraded with no descriptor to spare"),
                    Answer::Unanswered(_) => {
                        panic!("no answer once a descriptor was free:\n{}", gw.stderr())
                    }
                }
                break;
            }
        }
    }
    assert!(
        held.len() >= 5,
        "only {} connections before the limit",
        held.len()
    );
    // The gateway closes each refused client, freeing its descriptor for the next, which
    // fails the same way.
    while refusals.len() < LOCAL_FAILURES {
        match attempt(gw.addr, STEP).await {
            Answer::Refused(text) => refusals.push(text),
            Answer::Upgraded(_) => panic!("upgraded with no descriptor to spare"),
            Answer::Unanswered(_) => panic!("unanswered:\n{}", gw.stderr()),
        }
    }
    (held, refusals, silent.is_none())
}

/// Checks the metrics and the log of a gateway that ran out of descriptors: local errors
/// counted as such, nothing held against `backend`.
async fn assert_counted(gw: &Gateway, admin: SocketAddr, backend: &TagBackend) {
    let text = scrape(admin).await;
    let count = LOCAL_FAILURES as u64;
    assert_eq!(
        sample(&text, "wsgate_local_errors_total{why=\"emfile\"}"),
        count
    );
    assert_eq!(
        sample(&text, "wsgate_local_errors_total{why=\"enfile\"}"),
        0
    );
    assert_eq!(
        sample(&text, "wsgate_upgrades_total{status=\"503\"}"),
        count
    );
    assert_eq!(sample(&text, "wsgate_upgrades_total{status=\"502\"}"), 0);
    let series = format!(
        "wsgate_backend_connect_failures_total{{upstream=\"pool\",backend=\"{}\"}}",
        backend.url()
    );
    assert_eq!(sample(&text, &series), 0, "counted against the backend");

    gw.wait_lines(STEP, LOCAL_FAILURES, |l| l.contains("upgrade failed"))
        .await;
    let lines = gw.lines();
    let failed: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("upgrade failed"))
        .collect();
    assert_eq!(failed.len(), LOCAL_FAILURES, "{lines:#?}");
    for line in failed {
        assert_eq!(field(line, "status"), Some("503"), "{line}");
        assert_eq!(
            field(line, "why"),
            Some("Too many open files (os error 24)"),
            "{line}"
        );
    }
    assert!(
        !lines.iter().any(|l| l.contains("backend ejected")),
        "{lines:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ejection_is_logged_with_its_reason() {
    let dead = refusing_addr();
    let dead = dead.addr;
    let gw = ConfigGateway::start(&format!(
        "{}[[route]]\nupstream = \"pool\"\n\n\
         [upstream.pool]\nbackends = [\"ws://{dead}\"]\neject_after = 2\neject_for = \"45s\"\n",
        preamble(None, "")
    ));
    for _ in 0..2 {
        assert_eq!(refused_status(&gw.url("/")).await, 502);
    }
    let line = gw
        .wait_line(STEP, |l| l.contains("backend ejected"))
        .await
        .unwrap_or_else(|| panic!("no ejection logged:\n{}", gw.stderr()));
    let want = [
        ("upstream", "pool"),
        ("why", "Connection refused (os error 111)"),
        ("failures", "2"),
        ("eject_for_ms", "45000"),
    ];
    for (name, value) in want {
        assert_eq!(field(&line, name), Some(value), "{name} in {line}");
    }
    assert_eq!(
        field(&line, "backend"),
        Some(format!("ws://{dead}").as_str())
    );
    // One line per ejection, and the connect failures before it say how far the streak got.
    let failed: Vec<String> = gw
        .lines()
        .into_iter()
        .filter(|l| l.contains("backend connect failed"))
        .collect();
    let streak: Vec<Option<&str>> = failed.iter().map(|l| field(l, "failures")).collect();
    assert_eq!(streak, [Some("1"), Some("2")], "{failed:#?}");
    assert_eq!(refused_status(&gw.url("/")).await, 502);
    assert_eq!(
        gw.lines()
            .iter()
            .filter(|l| l.contains("backend ejected"))
            .count(),
        1
    );
}

/// A TCP connection from `from` that never sends a byte.
async fn silent_from(from: IpAddr, addr: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind(SocketAddr::new(from, 0))
        .unwrap_or_else(|e| panic!("bind {from}: {e}"));
    within("connect", socket.connect(addr))
        .await
        .expect("connect to the gateway")
}

/// Expects `stream`, which sent nothing, to be answered 429 with `body` and closed at once.
async fn refused_at_once(mut stream: TcpStream, body: &str) {
    let started = Instant::now();
    let mut raw = Vec::new();
    let read = tokio::time::timeout(PROMPT, stream.read_to_end(&mut raw)).await;
    let text = String::from_utf8_lossy(&raw);
    assert!(
        matches!(read, Ok(Ok(_))),
        "not closed within {PROMPT:?} ({read:?}); got {text:?}"
    );
    assert!(text.starts_with("HTTP/1.1 429 "), "{text:?}");
    assert!(text.contains("\r\nRetry-After: 1\r\n"), "{text:?}");
    assert!(text.ends_with(&format!("\r\n\r\n{body}\n")), "{text:?}");
    assert!(started.elapsed() < PROMPT);
}

/// Upgrades from `from`, retrying (bounded) while the gateway has yet to notice a close;
/// says how many tries were refused with 429 first (each counted as a refusal).
async fn upgraded_soon(gw: &ConfigGateway, from: IpAddr) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut refused = 0;
    loop {
        match connect_from(from, gw.addr, &gw.url("/")).await {
            Ok(_) => return refused,
            Err(429) if Instant::now() < deadline => {
                refused += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(status) => panic!("refused ({status}) after a silent connection closed"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_count_against_max_connections_from_accept() {
    const K: u64 = 3;
    let admin = free_addr();
    let gw = ConfigGateway::start(&format!(
        "{}[limits]\nmax_connections = {K}\nhandshake_timeout = \"30s\"\n\n\
         [[route]]\nupstream = \"echo\"\n",
        preamble(Some(admin), "")
    ));
    // From several addresses: the global limit is what is at stake.
    let mut silent = Vec::new();
    for n in 0..K {
        silent.push(silent_from(ip(n as u8 + 1), gw.addr).await);
    }
    wait_metric(admin, ACTIVE, STEP, |n| n == K).await;
    refused_at_once(silent_from(ip(9), gw.addr).await, "too many connections").await;
    // A client with a request is refused the same way, without the request being read.
    let mut eager = silent_from(ip(9), gw.addr).await;
    eager
        .write_all(&upgrade_request("/", "gw.test", &[]))
        .await
        .expect("write the request");
    refused_at_once(eager, "too many connections").await;

    drop(silent.pop());
    let retries = upgraded_soon(&gw, ip(9)).await;

    let text = scrape(admin).await;
    assert_eq!(
        sample(&text, "wsgate_upgrades_total{status=\"429\"}"),
        2 + retries
    );
    let refused = gw
        .wait_line(STEP, |l| l.contains("upgrade refused"))
        .await
        .unwrap_or_else(|| panic!("no refusal logged:\n{}", gw.stderr()));
    assert!(
        refused.contains("why=\"too many connections\""),
        "{refused}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_count_against_the_per_ip_limit_from_accept() {
    let admin = free_addr();
    let gw = ConfigGateway::start(&format!(
        "{}[limits]\nmax_connections_per_ip = 2\nhandshake_timeout = \"30s\"\n\n\
         [[route]]\nupstream = \"echo\"\n",
        preamble(Some(admin), "")
    ));
    let mut silent = vec![
        silent_from(ip(2), gw.addr).await,
        silent_from(ip(2), gw.addr).await,
    ];
    wait_metric(admin, ACTIVE, STEP, |n| n == 2).await;
    refused_at_once(
        silent_from(ip(2), gw.addr).await,
        "too many connections from this address",
    )
    .await;
    // Another address (raw clients connect from 127.0.0.1) has slots of its own.
    let (mut ws, _) = raw_client(gw.addr, "/", "gw.test", &[]).await;
    ws.send_close(1000, "").await;
    assert_eq!(ws.expect_close().await.close_code(), Some(1000));

    drop(silent.pop());
    upgraded_soon(&gw, ip(2)).await;
}
