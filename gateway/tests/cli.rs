//! The command line end to end: `--config` and `--check-config` refuse the shorthand flags they
//! would ignore, the shorthand flags meet the file's validator (same bounds, messages naming
//! the flags), `--cores` is checked against the machine, and `--check-config` names every
//! mistake of a file in one run, unknown keys included.

pub mod common;

use common::config::{TempConfig, preamble, refusal};
use common::{Exit, Gateway, raw_client, run_to_exit};

/// A valid file: one core, a free port, one route to the echo.
fn valid_file() -> TempConfig {
    TempConfig::new(&format!(
        "{}[[route]]\nupstream = \"echo\"\n",
        preamble(None, "")
    ))
}

/// Runs `args`, which the gateway must refuse at startup: exit status 2, nothing served.
fn refused(args: &[&str]) -> String {
    let Exit {
        code,
        stdout,
        stderr,
    } = run_to_exit(args);
    assert_eq!(
        code,
        Some(2),
        "gateway {args:?} was not refused with status 2 (None: still running);\n\
         stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(!stderr.contains("listening"), "{stderr}");
    stderr
}

#[test]
fn config_refuses_the_shorthand_flags_naming_each() {
    let file = valid_file();
    let stderr = refused(&[
        "--config",
        file.arg(),
        "--listen",
        "127.0.0.1:0",
        "--cores",
        "1",
    ]);
    assert!(
        stderr.contains(
            "--config cannot be combined with --listen, --cores: put those settings in the file"
        ),
        "{stderr}"
    );
    // A flag given its default value was still given; flags are named in --help's order.
    let stderr = refused(&[
        "--log-format",
        "text",
        "--config",
        file.arg(),
        "--backend",
        "ws://127.0.0.1:9",
        "--max-message",
        "67108864",
    ]);
    assert!(
        stderr.contains("--config cannot be combined with --log-format, --backend, --max-message"),
        "{stderr}"
    );
    let stderr = refused(&["--check-config", file.arg(), "--admin", "127.0.0.1:9"]);
    assert!(
        stderr.contains("--check-config cannot be combined with --admin"),
        "{stderr}"
    );
    // Alone, each still works.
    let Exit { code, stdout, .. } = run_to_exit(&["--check-config", file.arg()]);
    assert_eq!(code, Some(0), "{stdout}");
    drop(Gateway::start_exact(&["--config", file.arg()]));
}

#[test]
fn shorthand_flags_meet_the_file_validator() {
    let cases: [(&[&str], &str); 7] = [
        (
            &["--max-header-bytes", "10"],
            "gateway: --max-header-bytes: 10 must be at least 256\n",
        ),
        (
            &["--max-message", "0"],
            "gateway: --max-message: 0 must be at least 1\n",
        ),
        (
            &["--write-buffer", "0"],
            "gateway: --write-buffer: 0 must be at least 128\n",
        ),
        (
            &["--handshake-timeout", "0s"],
            "gateway: --handshake-timeout: \"0s\" must be more than 0\n",
        ),
        (
            &["--admin", "localhost:9090"],
            "gateway: --admin: \"localhost:9090\": the host must be an IP address",
        ),
        (
            &["--backend", "http://127.0.0.1:9"],
            "gateway: --backend: \"http://127.0.0.1:9\" must be ws://host:port[/path]\n",
        ),
        (
            &[
                "--max-message",
                "0",
                "--cores",
                "0",
                "--ping-interval",
                "soon",
            ],
            "gateway: 3 problems:\n  \
             --cores: 0 must be at least 1 (omit it to use every available core)\n  \
             --max-message: 0 must be at least 1\n  \
             --ping-interval: \"soon\" is not a duration like 250ms, 10s or 2m\n",
        ),
    ];
    for (flags, expected) in cases {
        // A free port and one core, so that a gateway which accepts the flags starts (and is
        // then killed) rather than failing for another reason.
        let mut args = vec!["--listen", "127.0.0.1:0"];
        if !flags.contains(&"--cores") {
            args.extend(["--cores", "1"]);
        }
        args.extend(flags);
        let stderr = refused(&args);
        assert!(
            stderr.starts_with(expected),
            "gateway {flags:?}:\nexpected {expected:?}\ngot      {stderr:?}"
        );
    }
    // The file gets the same bounds, under its key paths.
    let file = TempConfig::new(&format!(
        "{}[limits]\nmax_header_bytes = 10\nwrite_buffer = 0\n[[route]]\nupstream = \"echo\"\n",
        preamble(None, "")
    ));
    let stderr = refused(&["--config", file.arg()]);
    assert!(
        stderr.contains(
            "2 problems:\n  limits.max_header_bytes: 10 must be at least 256\n  \
             limits.write_buffer: 0 must be at least 128\n"
        ),
        "{stderr}"
    );
}

#[test]
fn listen_needs_an_ip_address() {
    let stderr = refused(&["--listen", "localhost:8080", "--cores", "1"]);
    assert!(
        stderr.starts_with(
            "gateway: --listen: \"localhost:8080\": the host must be an IP address, like \
             \"0.0.0.0:8080\" (names such as localhost are not resolved"
        ),
        "{stderr}"
    );
    let file = TempConfig::new(
        "[[listener]]\naddress = \"localhost:0\"\n[[route]]\nupstream = \"echo\"\n",
    );
    let Exit { code, stderr, .. } = run_to_exit(&["--check-config", file.arg()]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("listener[0].address: \"localhost:0\": the host must be an IP address"),
        "{stderr}"
    );
}

#[test]
fn cores_beyond_the_machine_are_refused_naming_the_setting() {
    let stderr = refused(&["--listen", "127.0.0.1:0", "--cores", "100000"]);
    assert!(
        stderr.starts_with("gateway: --cores: 100000 must be at most "),
        "{stderr}"
    );
    assert!(
        stderr.contains("the cores this machine has available"),
        "{stderr}"
    );
    let file = TempConfig::new(
        "[server]\ncores = 100000\n[[listener]]\naddress = \"127.0.0.1:0\"\n\
         [[route]]\nupstream = \"echo\"\n",
    );
    let stderr = refused(&["--config", file.arg()]);
    assert!(
        stderr.starts_with(&format!(
            "gateway: {}: server.cores: 100000 must be at most ",
            file.arg()
        )),
        "{stderr}"
    );
    // --check-config judges the file, not this machine: it may be meant for a bigger one.
    let Exit { code, stdout, .. } = run_to_exit(&["--check-config", file.arg()]);
    assert_eq!(code, Some(0), "{stdout}");
}

#[test]
fn check_config_lists_every_mistake_unknown_keys_included() {
    let text = "\
[server]
cores = \"two\"
admn = \"127.0.0.1:9090\"

[[listener]]
address = \"127.0.0.1:0\"
port = 8080

[limits]
max_conections = 5
max_header_bytes = 10

[timeout]
connect = \"5s\"

[[route]]
upstream = \"chatt\"
origin = [\"https://a.example\"]

[upstream.chat]
backends = [\"ws://127.0.0.1:9\"]
balance = \"random\"
helth_interval = \"5s\"
";
    let file = TempConfig::new(text);
    let expected = [
        "server.cores (line 2): invalid type: string \"two\", expected a non-negative integer",
        "server.admn (line 3): unknown field `admn`, expected one of `cores`, `admin`",
        "listener[0].port (line 7): unknown field `port`, expected `address`",
        "limits.max_conections (line 10): unknown field `max_conections`, expected one of \
         `handshake_timeout`, `max_header_bytes`, `max_message`, `max_frame`, \
         `max_connections`,",
        "timeout (line 13): unknown section, expected one of [server], [[listener]], [limits], \
         [timeouts], [[route]], [upstream.NAME]",
        "route[0].origin (line 18): unknown field `origin`, expected one of `host`, \
         `path_prefix`, `upstream`, `origins`,",
        "upstream.chat.helth_interval (line 23): unknown field `helth_interval`",
        "limits.max_header_bytes: 10 must be at least 256",
        "upstream.chat.balance: \"random\" must be round-robin, least-connections or hash",
        "route[0].upstream: \"chatt\" is not a declared upstream (declared: chat)",
    ];
    let Exit {
        code,
        stdout,
        stderr,
    } = run_to_exit(&["--check-config", file.arg()]);
    assert_eq!(code, Some(1), "stdout:\n{stdout}\nstderr:\n{stderr}");
    let mut lines = stderr.lines();
    assert_eq!(
        lines.next(),
        Some(format!("{}: {} problems:", file.arg(), expected.len()).as_str()),
        "{stderr}"
    );
    let lines: Vec<&str> = lines.map(str::trim_start).collect();
    assert_eq!(lines.len(), expected.len(), "{stderr}");
    for want in expected {
        assert!(
            lines.iter().any(|l| l.starts_with(want)),
            "no line starting {want:?} in:\n{stderr}"
        );
    }
    // Started with it, the gateway refuses with the same list.
    let run_stderr = refused(&["--config", file.arg()]);
    assert!(
        run_stderr.contains(&format!("{} problems:", expected.len())),
        "{run_stderr}"
    );
    assert!(
        run_stderr.contains("timeout (line 13): unknown section"),
        "{run_stderr}"
    );
}

/// The smallest `--max-header-bytes` the validator allows still admits a plain upgrade, and
/// the flag is applied: a larger head gets 431.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smallest_max_header_bytes_still_upgrades() {
    let gw = Gateway::start(&["--max-header-bytes", "256"]);
    let (mut ws, _) = raw_client(gw.addr, "/", "gw.test", &[]).await;
    ws.send_close(1000, "").await;
    assert_eq!(ws.expect_close().await.close_code(), Some(1000));
    let pad = "a".repeat(256);
    let (status, body) = refusal(gw.addr, "/", "gw.test", &[("X-Pad", &pad)]).await;
    assert_eq!(status, 431, "{body}");
}
