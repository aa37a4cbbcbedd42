//! The configuration file end to end: routing by host and path prefix to different upstream
//! pools (exact host, wildcard, host-less, longest prefix on segment boundaries, 404), the
//! origin allow-list, per-route message limits, `--check-config`, startup refusal of a bad
//! file, and JSON access lines.

pub mod common;

use std::time::Duration;

use common::config::{ConfigGateway, TagBackend, TempConfig, greeting, preamble, refusal};
use common::{
    EchoBackend, close_frame, connect, drain_to_end, echo_then_close, expect_close, raw_client,
    recv_data, send, within,
};
use tokio_tungstenite::tungstenite::Message;

/// `[upstream.NAME]` with one backend.
fn pool(name: &str, backend: &TagBackend) -> String {
    format!("[upstream.{name}]\nbackends = [\"{}\"]\n\n", backend.url())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_by_host_then_longest_path_prefix() {
    let root = TagBackend::start("root").await;
    let chat = TagBackend::start("chat").await;
    let admin = TagBackend::start("admin").await;
    let exact = TagBackend::start("exact").await;
    let wild = TagBackend::start("wild").await;
    let eu = TagBackend::start("eu").await;
    let config = format!(
        "{}[[route]]\nupstream = \"root\"\n\n\
         [[route]]\npath_prefix = \"/chat\"\nupstream = \"chat\"\n\n\
         [[route]]\npath_prefix = \"/chat/admin/\"\nupstream = \"admin\"\n\n\
         [[route]]\nhost = \"exact.example.com\"\nupstream = \"exact\"\n\n\
         [[route]]\nhost = \"*.example.com\"\nupstream = \"wild\"\n\n\
         [[route]]\nhost = \"*.eu.example.com\"\nupstream = \"eu\"\n\n{}{}{}{}{}{}",
        preamble(None, ""),
        pool("root", &root),
        pool("chat", &chat),
        pool("admin", &admin),
        pool("exact", &exact),
        pool("wild", &wild),
        pool("eu", &eu),
    );
    let gw = ConfigGateway::start(&config);
    let cases = [
        // Host-less routes: the longest prefix that matches whole segments.
        ("other.org", "/", "root"),
        ("other.org", "/chat", "chat"),
        ("other.org", "/chat/", "chat"),
        ("other.org", "/chat/room/7", "chat"),
        ("other.org", "/chat?room=7", "chat"),
        ("other.org", "/chatter", "root"),
        ("other.org", "/Chat", "root"),
        ("other.org", "/chat/admin", "admin"),
        ("other.org", "/chat/admin/users?x=1", "admin"),
        ("other.org", "/chat/administrator", "chat"),
        // A matching host beats any host-less route, whatever the path.
        ("exact.example.com", "/", "exact"),
        ("exact.example.com", "/chat/admin", "exact"),
        ("EXACT.Example.COM:8080", "/x", "exact"),
        ("exact.example.com.", "/x", "exact"),
        // Exact beats wildcard; a longer wildcard beats a shorter one.
        ("feed.example.com", "/chat", "wild"),
        ("a.b.example.com", "/", "wild"),
        ("x.eu.example.com", "/", "eu"),
        // `*.example.com` needs a label before the suffix.
        ("example.com", "/chat", "chat"),
        ("notexample.com", "/", "root"),
    ];
    for (host, path, want) in cases {
        let got = greeting(gw.addr, path, host, &[]).await;
        assert_eq!(got, want, "Host: {host}, path {path}");
    }
    let count = |tag: &str| cases.iter().filter(|c| c.2 == tag).count();
    for backend in [
        (&root, "root"),
        (&chat, "chat"),
        (&admin, "admin"),
        (&exact, "exact"),
        (&wild, "wild"),
        (&eu, "eu"),
    ] {
        assert_eq!(
            backend.0.upgrades(),
            count(backend.1),
            "upgrades accepted by backend {}",
            backend.1
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_no_route_takes_gets_404() {
    let config = format!(
        "{}[[route]]\npath_prefix = \"/chat\"\nupstream = \"echo\"\n\n\
         [[route]]\nhost = \"only.example.com\"\nupstream = \"echo\"\n",
        preamble(None, "")
    );
    let gw = ConfigGateway::start(&config);
    for (host, path) in [
        ("gw.test", "/"),
        ("gw.test", "/chatter"),
        ("gw.test", "/other/chat"),
        ("example.com", "/"),
        ("x.only.example.com", "/"),
    ] {
        let (status, body) = refusal(gw.addr, path, host, &[]).await;
        assert_eq!(status, 404, "Host: {host}, path {path}: {body}");
        assert!(body.contains("no route"), "{body:?}");
    }
    // The routes that exist still upgrade.
    for (host, path) in [("gw.test", "/chat/x"), ("only.example.com", "/anything")] {
        let (mut ws, _) = raw_client(gw.addr, path, host, &[]).await;
        ws.send_close(1000, "").await;
        assert_eq!(ws.expect_close().await.close_code(), Some(1000));
    }
    let line = gw
        .wait_line(Duration::from_secs(2), |l| l.contains("no route"))
        .await
        .unwrap_or_else(|| panic!("no 'no route' line:\n{}", gw.stderr()));
    assert!(line.contains("host="), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_allow_list() {
    let config = format!(
        "{}[[route]]\npath_prefix = \"/app\"\nupstream = \"echo\"\n\
         origins = [\"https://app.example.com\", \"http://localhost:3000\"]\n\n\
         [[route]]\npath_prefix = \"/open\"\nupstream = \"echo\"\n",
        preamble(None, "")
    );
    let gw = ConfigGateway::start(&config);
    for origin in ["https://app.example.com", "http://localhost:3000"] {
        let (mut ws, _) = raw_client(gw.addr, "/app", "gw.test", &[("Origin", origin)]).await;
        ws.send(true, codec::frame::OpCode::Text, b"hi").await;
        assert_eq!(ws.read_frame().await.payload, b"hi", "echo for {origin}");
        ws.send_close(1000, "").await;
        assert_eq!(ws.expect_close().await.close_code(), Some(1000));
    }
    for origin in [
        Some("https://evil.example.com"),
        Some("https://app.example.com.evil.com"),
        Some("http://app.example.com"),
        Some("https://app.example.com:443"),
        Some("null"),
        None,
    ] {
        let extra: Vec<(&str, &str)> = origin.iter().map(|o| ("Origin", *o)).collect();
        let (status, body) = refusal(gw.addr, "/app", "gw.test", &extra).await;
        assert_eq!(status, 403, "Origin {origin:?}: {body}");
        assert!(body.contains("origin not allowed"), "{body:?}");
    }
    // A route without a list takes any origin, or none.
    for extra in [vec![("Origin", "https://evil.example.com")], vec![]] {
        let (mut ws, _) = raw_client(gw.addr, "/open", "gw.test", &extra).await;
        ws.send_close(1000, "").await;
        assert_eq!(ws.expect_close().await.close_code(), Some(1000));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_message_applies_per_route() {
    let config = format!(
        "{}[limits]\nmax_message = 4096\n\n\
         [[route]]\npath_prefix = \"/small\"\nupstream = \"echo\"\nmax_message = 1024\n\n\
         [[route]]\npath_prefix = \"/big\"\nupstream = \"echo\"\n",
        preamble(None, "")
    );
    let gw = ConfigGateway::start(&config);

    // The route's own limit: 1024 passes, 1025 closes with 1009.
    let mut small = connect(&gw.url("/small")).await;
    send(&mut small, Message::Binary(vec![7; 1024])).await;
    assert_eq!(recv_data(&mut small).await, Message::Binary(vec![7; 1024]));
    send(&mut small, Message::Binary(vec![8; 1025])).await;
    let close = expect_close(&mut small).await;
    assert_eq!(close.map(|c| c.0), Some(1009), "{}", gw.stderr());
    drain_to_end(&mut small).await;

    // The same size on a route without an override passes ([limits] applies: 4096).
    let mut big = connect(&gw.url("/big")).await;
    send(&mut big, Message::Binary(vec![8; 1025])).await;
    assert_eq!(recv_data(&mut big).await, Message::Binary(vec![8; 1025]));
    send(&mut big, Message::Binary(vec![9; 4096])).await;
    assert_eq!(recv_data(&mut big).await, Message::Binary(vec![9; 4096]));
    send(&mut big, Message::Binary(vec![9; 4097])).await;
    let close = expect_close(&mut big).await;
    assert_eq!(close.map(|c| c.0), Some(1009), "{}", gw.stderr());
    drain_to_end(&mut big).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_listeners_share_the_routes() {
    let config = "[server]\ncores = 1\n\n\
                  [[listener]]\naddress = \"127.0.0.1:0\"\n\n\
                  [[listener]]\naddress = \"127.0.0.1:0\"\n\n\
                  [[route]]\npath_prefix = \"/e\"\nupstream = \"echo\"\n";
    let gw = ConfigGateway::start(config);
    assert_eq!(gw.addrs.len(), 2, "listen field: {}", gw.stderr());
    assert_ne!(gw.addrs[0], gw.addrs[1]);
    for &addr in &gw.addrs {
        let (mut ws, _) = raw_client(addr, "/e", "gw.test", &[]).await;
        ws.send(true, codec::frame::OpCode::Text, b"ok").await;
        assert_eq!(ws.read_frame().await.payload, b"ok", "echo via {addr}");
        ws.send_close(1000, "").await;
        assert_eq!(ws.expect_close().await.close_code(), Some(1000));
        assert_eq!(refusal(addr, "/x", "gw.test", &[]).await.0, 404);
    }
}

// ---------------------------------------------------------------------------------------------
// Validation.
// ---------------------------------------------------------------------------------------------

/// Runs the gateway binary with `args` to its exit (killed after [`STEP`]: then the code is
/// `None`); returns (exit code, stdout, stderr).
fn run(args: &[&str]) -> (Option<i32>, String, String) {
    let exit = common::run_to_exit(args);
    (exit.code, exit.stdout, exit.stderr)
}

#[test]
fn check_config_accepts_the_example() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/gateway.example.toml");
    let (code, stdout, stderr) = run(&["--check-config", example]);
    assert_eq!(code, Some(0), "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(
        stdout.contains("ok (1 listeners, 3 routes, 2 upstreams)"),
        "{stdout}"
    );
}

#[test]
fn bad_configs_are_refused_naming_field_value_and_reason() {
    let base = preamble(None, "");
    let cases = [
        (
            format!(
                "{base}[[route]]\nupstream = \"chatt\"\n\n\
                 [upstream.chat]\nbackends = [\"ws://127.0.0.1:9\"]\n"
            ),
            vec![
                "route[0].upstream",
                "\"chatt\"",
                "is not a declared upstream (declared: chat)",
            ],
        ),
        (
            format!("{base}[[route]]\nupstream = \"echo\"\nupsteam = \"x\"\n"),
            vec!["unknown field `upsteam`", "line 9"],
        ),
        (
            format!("{base}[limits]\nmax_conections = 5\n[[route]]\nupstream = \"echo\"\n"),
            vec!["unknown field `max_conections`", "max_connections"],
        ),
        (
            format!(
                "{base}[[route]]\nupstream = \"echo\"\nhost = \"a.com:80\"\n\
                 [timeouts]\nclose = \"0s\"\n"
            ),
            vec![
                "2 problems:",
                "route[0].host: \"a.com:80\" must not include a port",
                "timeouts.close: \"0s\" must be more than 0",
            ],
        ),
    ];
    for (text, wants) in &cases {
        let file = TempConfig::new(text);
        let (code, stdout, stderr) = run(&["--check-config", file.arg()]);
        assert_ne!(code, Some(0), "accepted:\n{text}\nstdout: {stdout}");
        assert!(code.is_some(), "killed by a signal:\n{stderr}");
        assert!(
            stderr.starts_with(&format!("{}: ", file.arg())),
            "error does not start with the file name:\n{stderr}"
        );
        for want in wants {
            assert!(
                stderr.contains(want),
                "no {want:?} in:\n{stderr}\nfor:\n{text}"
            );
        }
        // Started with it, the gateway refuses to run, with the same message.
        let (code, _, run_stderr) = run(&["--config", file.arg()]);
        assert_eq!(code, Some(2), "{run_stderr}");
        assert!(run_stderr.contains(wants[0]), "{run_stderr}");
        assert!(!run_stderr.contains("listening"), "{run_stderr}");
    }
}

// ---------------------------------------------------------------------------------------------
// JSON access lines.
// ---------------------------------------------------------------------------------------------

/// Opens `path`, exchanges one message with the echoing backend, closes with 1000, and returns
/// the gateway's access line, parsed; checks every stderr line is one JSON object.
async fn json_access_line(gw: &ConfigGateway, path: &str) -> serde_json::Value {
    let mut ws = connect(&gw.url(path)).await;
    echo_then_close(&mut ws, "hello").await;
    let line = gw
        .wait_line(Duration::from_secs(3), |l| l.contains("\"closed_by\""))
        .await
        .unwrap_or_else(|| panic!("no access line:\n{}", gw.stderr()));
    for l in gw.lines() {
        let parsed: serde_json::Value =
            serde_json::from_str(&l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        assert!(parsed.is_object(), "{l}");
    }
    serde_json::from_str(&line).expect("the access line is JSON")
}

fn check_access_fields(line: &serde_json::Value, path: &str, backend: &str) {
    let text = |name: &str| {
        line.get(name)
            .and_then(serde_json::Value::as_str)
            .unwrap_or_else(|| panic!("no string field {name:?} in {line}"))
    };
    assert!(text("client").starts_with("127.0.0.1:"), "{line}");
    assert_eq!(text("path"), path, "{line}");
    assert_eq!(text("backend"), backend, "{line}");
    assert_eq!(text("closed_by"), "client", "{line}");
    assert_eq!(
        line.get("close_code").and_then(serde_json::Value::as_u64),
        Some(1000),
        "{line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_format_json_flag_writes_json_access_lines() {
    let backend = EchoBackend::start().await;
    let url = backend.url();
    let gw = ConfigGateway::start_args(&[
        "--listen",
        "127.0.0.1:0",
        "--cores",
        "1",
        "--log-format",
        "json",
        "--backend",
        &url,
    ]);
    let line = json_access_line(&gw, "/json?x=1").await;
    check_access_fields(&line, "/json?x=1", &url);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_format_json_in_the_config_file() {
    let backend = EchoBackend::start().await;
    let config = format!(
        "{}[[route]]\npath_prefix = \"/j\"\nupstream = \"echoes\"\n\n\
         [[route]]\npath_prefix = \"/e\"\nupstream = \"echo\"\n\n\
         [upstream.echoes]\nbackends = [\"{}\"]\n",
        preamble(None, "log_format = \"json\"\n"),
        backend.url()
    );
    let gw = ConfigGateway::start(&config);
    let line = json_access_line(&gw, "/j/room").await;
    check_access_fields(&line, "/j/room", &backend.url());
    // The embedded echo names itself as the backend.
    let mut ws = connect(&gw.url("/e")).await;
    within("client close", ws.close(Some(close_frame(1000, ""))))
        .await
        .expect("send close");
    drain_to_end(&mut ws).await;
    let line = gw
        .wait_nth_line(Duration::from_secs(3), 2, |l| l.contains("\"closed_by\""))
        .await
        .unwrap_or_else(|| panic!("no second access line:\n{}", gw.stderr()));
    let line: serde_json::Value = serde_json::from_str(&line).expect("JSON");
    check_access_fields(&line, "/e", "echo");
}
