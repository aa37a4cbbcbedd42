//! End to end: the real `loadgen` binary against independent servers (tokio-tungstenite, and
//! hand-rolled misbehaving ones) on loopback, judged by its JSON report and exit status.

use std::future::Future;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::Value;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

/// Longest a loadgen run may take before the test kills it and fails.
const RUN_LIMIT: Duration = Duration::from_secs(30);

/// Serves every connection on `127.0.0.1:<ephemeral>` with `handler`, on a thread of its own
/// that lives as long as the test process.
fn serve<F, Fut>(handler: F) -> SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = StdListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = TcpListener::from_std(listener).unwrap();
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(handler(stream));
            }
        });
    });
    addr
}

/// A correct echo server; `corrupt` flips one bit of every echoed message.
async fn echo(stream: TcpStream, corrupt: bool) {
    let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
        return;
    };
    while let Some(Ok(message)) = ws.next().await {
        let reply = match message {
            Message::Binary(mut data) if corrupt => {
                if let Some(last) = data.last_mut() {
                    *last ^= 1;
                }
                Message::Binary(data)
            }
            m @ (Message::Binary(_) | Message::Text(_)) => m,
            _ => continue,
        };
        if ws.send(reply).await.is_err() {
            return;
        }
    }
}

/// Reads an HTTP request head; returns its `Sec-WebSocket-Key`.
async fn read_head(stream: &mut TcpStream) -> Option<String> {
    let mut head = Vec::new();
    let mut byte = [0; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte).await.ok()? == 0 {
            return None;
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).ok()?;
    head.lines().find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.eq_ignore_ascii_case("sec-websocket-key")
            .then(|| value.trim().to_owned())
    })
}

/// Upgrades, then reads and ignores everything: a Close is never answered.
async fn deaf_to_close(mut stream: TcpStream) {
    let Some(key) = read_head(&mut stream).await else {
        return;
    };
    let accept = derive_accept_key(key.as_bytes());
    let response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {accept}\r\n\r\n"
    );
    if stream.write_all(response.as_bytes()).await.is_err() {
        return;
    }
    let mut sink = [0; 1024];
    while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
}

/// Upgrades, then never reads again: writes to it eventually block.
async fn never_reads(mut stream: TcpStream) {
    let Some(key) = read_head(&mut stream).await else {
        return;
    };
    let accept = derive_accept_key(key.as_bytes());
    let response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {accept}\r\n\r\n"
    );
    if stream.write_all(response.as_bytes()).await.is_ok() {
        tokio::time::sleep(RUN_LIMIT).await;
    }
}

/// Refuses every upgrade with 403.
async fn forbid(mut stream: TcpStream) {
    if read_head(&mut stream).await.is_some() {
        let _ = stream
            .write_all(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            .await;
    }
}

/// The outcome of one loadgen run.
struct Run {
    code: Option<i32>,
    report: Value,
    stdout: String,
    stderr: String,
}

impl Run {
    fn summary(&self, key: &str) -> u64 {
        self.report["summary"][key]
            .as_u64()
            .unwrap_or_else(|| panic!("summary.{key} missing:\n{}", self.stdout))
    }

    fn errors(&self, kind: &str) -> u64 {
        self.report["summary"]["errors"][kind].as_u64().unwrap()
    }

    /// `(count, p50)` of a histogram, `None` if the report has none by that name.
    fn histogram(&self, name: &str) -> Option<(u64, u64)> {
        let h = self.report["histograms"].get(name)?;
        let p50 = h["percentiles"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["percentile"] == 50.0)
            .unwrap()["value_us"]
            .as_u64()
            .unwrap();
        assert!(!h["hdr_v2_deflate_base64"].as_str().unwrap().is_empty());
        Some((h["count"].as_u64().unwrap(), p50))
    }
}

/// Runs loadgen against `addr` with `args`, killing it after [`RUN_LIMIT`].
fn loadgen(addr: SocketAddr, args: &[&str]) -> Run {
    let json = std::env::temp_dir().join(format!(
        "loadgen-test-{}-{}.json",
        std::process::id(),
        addr.port()
    ));
    let mut child = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .arg(format!("ws://{addr}/test"))
        .args(args)
        .arg("--quiet")
        .arg("--json")
        .arg(&json)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > RUN_LIMIT {
            let _ = child.kill();
            panic!("loadgen {args:?} ran longer than {RUN_LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let report = std::fs::read_to_string(&json).map_or(Value::Null, |s| {
        let _ = std::fs::remove_file(&json);
        serde_json::from_str(&s).unwrap()
    });
    assert!(
        report.is_object(),
        "no JSON report; stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    Run {
        code: out.status.code(),
        report,
        stdout,
        stderr,
    }
}

/// An address nothing listens on: a port the kernel handed out and that was closed again.
fn closed_port() -> SocketAddr {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

#[test]
fn echo_closed_loop_verifies_and_measures_every_message() {
    let addr = serve(|s| echo(s, false));
    let run = loadgen(addr, &["-c", "8", "-d", "1s", "--warmup", "200ms"]);
    assert_eq!(run.code, Some(0), "{}", run.stdout);
    let messages = run.summary("messages");
    assert!(messages > 200, "{}", run.stdout);
    assert!(
        run.summary("unmeasured_messages") > 0,
        "warmup echoes are not samples"
    );
    assert_eq!(run.summary("errors_total"), 0);
    assert_eq!(run.summary("connections_opened"), 8);
    assert_eq!(
        run.summary("closes"),
        8,
        "each connection ends with a close handshake"
    );
    let (count, p50) = run.histogram("echo_rtt").unwrap();
    assert_eq!(count, messages);
    assert!(p50 > 0 && p50 < 1_000_000, "{p50}");
    assert!(run.report["summary"]["messages_per_s"].as_f64().unwrap() > 200.0);
    assert!(run.report["machine"]["cpus"].as_u64().unwrap() >= 1);
    assert_eq!(run.report["parameters"]["mode"], "closed-loop");
}

#[test]
fn echo_open_loop_holds_the_asked_rate() {
    let addr = serve(|s| echo(s, false));
    let run = loadgen(
        addr,
        &[
            "-c", "4", "-d", "1s", "--warmup", "0s", "--rate", "1000", "--text",
        ],
    );
    assert_eq!(run.code, Some(0), "{}", run.stdout);
    let messages = run.summary("messages");
    assert!(
        (900..=1000).contains(&messages),
        "{messages}\n{}",
        run.stdout
    );
    let (count, _) = run.histogram("echo_rtt").unwrap();
    assert_eq!(count, messages);
    let (lag_count, _) = run.histogram("send_lag").unwrap();
    assert_eq!(lag_count, messages);
    assert_eq!(run.report["parameters"]["message_type"], "text");
}

#[test]
fn close_scenario_times_every_close_handshake() {
    let addr = serve(|s| echo(s, false));
    let run = loadgen(
        addr,
        &[
            "--scenario",
            "close",
            "-c",
            "16",
            "--messages-before-close",
            "2",
            "--rate",
            "200",
        ],
    );
    assert_eq!(run.code, Some(0), "{}", run.stdout);
    assert_eq!(run.summary("closes"), 16);
    assert_eq!(run.summary("unmeasured_messages"), 32);
    let (replies, reply_p50) = run.histogram("close_reply").unwrap();
    let (eofs, eof_p50) = run.histogram("close_eof").unwrap();
    assert_eq!((replies, eofs), (16, 16));
    assert!(eof_p50 >= reply_p50, "the server drops TCP after its Close");
    // 16 closes at 200/s are spread over 75 ms.
    assert!(run.report["summary"]["elapsed_s"].as_f64().unwrap() >= 0.075);
}

#[test]
fn connect_scenario_loops_full_handshakes() {
    let addr = serve(|s| echo(s, false));
    let run = loadgen(
        addr,
        &[
            "--scenario",
            "connect",
            "-c",
            "2",
            "-d",
            "1s",
            "--warmup",
            "100ms",
        ],
    );
    assert_eq!(run.code, Some(0), "{}", run.stdout);
    let cycles = run.summary("handshakes");
    assert!(cycles > 20, "{}", run.stdout);
    let (upgrades, p50) = run.histogram("connect_upgrade").unwrap();
    assert!(upgrades >= cycles && p50 > 0);
    assert!(run.histogram("tcp_connect").is_some());
    assert!(run.report["summary"]["handshakes_per_s"].as_f64().unwrap() > 20.0);
}

#[test]
fn idle_scenario_holds_connections_then_closes_them() {
    let addr = serve(|s| echo(s, false));
    let run = loadgen(
        addr,
        &["--scenario", "idle", "-c", "40", "--cores", "2", "-d", "1s"],
    );
    assert_eq!(run.code, Some(0), "{}", run.stdout);
    assert_eq!(run.summary("connections_opened"), 40);
    assert_eq!(run.summary("closes"), 40);
    assert!(run.report["summary"]["elapsed_s"].as_f64().unwrap() >= 1.0);
}

#[test]
fn a_corrupted_echo_is_an_error_never_a_sample() {
    let addr = serve(|s| echo(s, true));
    let run = loadgen(addr, &["-c", "3", "-d", "500ms", "--warmup", "0s"]);
    assert_eq!(run.code, Some(1), "{}", run.stdout);
    assert_eq!(run.errors("payload_mismatch"), 3, "{}", run.stdout);
    assert_eq!(run.summary("messages"), 0);
    assert!(run.histogram("echo_rtt").is_none());
    assert!(run.stdout.contains("payload_mismatch 3"), "{}", run.stdout);
    let allowed = loadgen(addr, &["-c", "1", "-d", "200ms", "--allow-errors"]);
    assert_eq!(allowed.code, Some(0));
    assert_eq!(allowed.errors("payload_mismatch"), 1);
}

#[test]
fn an_unanswered_close_is_a_timeout_not_a_latency() {
    let addr = serve(deaf_to_close);
    let run = loadgen(
        addr,
        &["--scenario", "close", "-c", "4", "--close-timeout", "300ms"],
    );
    assert_eq!(run.code, Some(1), "{}", run.stdout);
    assert_eq!(run.errors("close_timeout"), 4, "{}", run.stdout);
    assert_eq!(run.summary("closes"), 0);
    assert!(run.histogram("close_reply").is_none());
    assert!(run.histogram("close_eof").is_none());
}

#[test]
fn a_server_that_stops_reading_is_a_timeout_not_a_hang() {
    let addr = serve(never_reads);
    // 32 MiB cannot fit in the loopback socket buffers, so the write itself blocks.
    let size = (32 << 20).to_string();
    let run = loadgen(
        addr,
        &[
            "-c",
            "1",
            "-d",
            "2s",
            "--warmup",
            "0s",
            "--size",
            &size,
            "--timeout",
            "500ms",
        ],
    );
    assert_eq!(run.code, Some(1), "{}", run.stdout);
    assert_eq!(run.errors("timeout"), 1, "{}", run.stdout);
}

#[test]
fn refused_and_rejected_connections_are_counted_by_kind() {
    let free = closed_port();
    let run = loadgen(free, &["-c", "3", "-d", "200ms"]);
    assert_eq!(run.code, Some(1));
    assert_eq!(run.errors("connect_refused"), 3, "{}", run.stdout);
    assert_eq!(run.summary("connections_failed"), 3);

    let addr = serve(forbid);
    let run = loadgen(addr, &["-c", "2", "-d", "200ms"]);
    assert_eq!(run.code, Some(1));
    assert_eq!(run.errors("handshake_status"), 2, "{}", run.stdout);
    assert_eq!(run.report["summary"]["handshake_statuses"]["403"], 2);
}

#[test]
fn every_connection_refused_says_so_and_stops_at_once() {
    let free = closed_port();
    for scenario in ["echo", "connect", "close", "idle"] {
        let started = Instant::now();
        // A bare duration is seconds, as the gateway reads it; 20 s is never waited out.
        let run = loadgen(
            free,
            &[
                "--scenario",
                scenario,
                "-c",
                "4",
                "-d",
                "20",
                "--allow-errors",
            ],
        );
        let took = started.elapsed();
        assert!(took < Duration::from_secs(5), "{scenario}: took {took:?}");
        assert_eq!(run.code, Some(1), "{scenario}: {}", run.stdout);
        assert!(
            run.stderr
                .contains(&format!("every connection to {free} was refused")),
            "{scenario}: {}",
            run.stderr
        );
        assert_eq!(run.report["parameters"]["duration_s"], 20.0);
        assert!(run.errors("connect_refused") >= 4, "{}", run.stdout);
        assert_eq!(run.summary("connections_opened"), 0);
        let measured = run.report["summary"]["measured_s"].as_f64().unwrap();
        assert!(measured < 5.0, "{scenario}: claims {measured} s measured");
    }
}

#[test]
fn bad_arguments_exit_2_without_running() {
    let out = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(["wss://127.0.0.1:1/", "-d", "1s"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("wss:// is not supported"));
}
