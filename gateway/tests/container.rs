//! The gateway in a container whose seccomp profile denies io_uring (Docker's and containerd's
//! defaults do): it must say so and stop, not report "listening" and then abort in a worker.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn io_uring_denied_by_seccomp_is_a_clear_start_error() {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/support/deny_io_uring.py"
    );
    let mut child = Command::new("python3")
        .arg(script)
        .arg(env!("CARGO_BIN_EXE_gateway"))
        .args(["--listen", "127.0.0.1:0", "--cores", "1"])
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
