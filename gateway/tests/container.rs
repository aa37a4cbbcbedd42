//! The gateway in a container whose seccomp profile denies io_uring (Docker's and containerd's
//! defaults do): by default it serves on epoll and says why on one line; asked for io_uring
//! alone, it says so and stops rather than report "listening".

pub mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Gateway, connect, echo_then_close, field};

const DENY: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/support/deny_io_uring.py"
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn io_uring_denied_by_seccomp_serves_on_epoll() {
    let gw = Gateway::start_wrapped(
        &["python3", DENY],
        &[
            "--listen",
            "127.0.0.1:0",
            "--cores",
            "1",
            "--io-backend",
            "auto",
        ],
    );
    let mut ws = connect(&gw.url("/")).await;
    echo_then_close(&mut ws, "served without io_uring").await;
    let lines = gw.lines();
    let why = lines
        .iter()
        .find(|l| l.contains("serving on epoll"))
        .unwrap_or_else(|| panic!("no line says why it serves on epoll: {lines:#?}"));
    assert!(
        why.contains("io_uring is unavailable") && why.contains("Operation not permitted"),
        "{why}"
    );
    let listening = lines
        .iter()
        .find(|l| l.contains("gateway listening"))
        .expect("listening line");
    assert_eq!(field(listening, "io_backend"), Some("epoll"), "{listening}");
}

#[test]
fn asked_for_io_uring_when_denied_is_a_clear_start_error() {
    let mut child = Command::new("python3")
        .arg(DENY)
        .arg(env!("CARGO_BIN_EXE_gateway"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--cores",
            "1",
            "--io-backend",
            "uring",
        ])
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 runs the seccomp wrapper");
    // Bounded: a gateway that starts anyway would wait for a signal forever.
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            child.kill().expect("kill");
            panic!("the gateway was still running 10 s after it was denied io_uring");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("output");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    assert!(
        stderr.contains("io_uring is unavailable") && stderr.contains("Operation not permitted"),
        "stderr: {stderr}"
    );
    assert!(
        !stderr.contains("gateway listening"),
        "it must not claim to listen: {stderr}"
    );
}
