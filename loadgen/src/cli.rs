//! The command line. Every option's doc comment is its `--help` text.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::config::Scenario;
use crate::duration;

/// Thread-per-core io_uring WebSocket load generator with honest latency.
///
/// Scenarios: `echo` sends messages and verifies each echo; `close` measures close-handshake
/// latency; `connect` measures connect+upgrade latency and the handshake rate; `idle` opens
/// connections and holds them (for server memory-per-connection measurements).
///
/// Durations: 500ms, 30s, 2m; a bare number is seconds, as in the gateway. The exit status is 1 if any error was counted
/// (unless --allow-errors) or if every connection was refused, 2 for bad arguments.
#[derive(Debug, Parser)]
#[command(name = "loadgen", version, verbatim_doc_comment)]
#[expect(
    clippy::struct_excessive_bools,
    reason = "independent command-line switches"
)]
pub(crate) struct Args {
    /// Server URL: `ws://host[:port][/path][?query]` (plain ws only).
    pub(crate) url: String,

    /// What to measure.
    #[arg(long, value_enum, default_value_t = Scenario::Echo)]
    pub(crate) scenario: Scenario,

    /// Concurrent connections (connect: concurrent connect/close loops).
    #[arg(short, long, default_value_t = 100)]
    pub(crate) connections: usize,

    /// Worker threads, one io_uring runtime each, pinned to cores 0..N-1. Connections are
    /// spread round-robin.
    #[arg(long, default_value_t = 1)]
    pub(crate) cores: usize,

    /// Measured time (echo, connect), or how long idle connections are held.
    #[arg(short, long, default_value = "30s", value_parser = duration::parse)]
    pub(crate) duration: Duration,

    /// Time before measuring starts, after all connections are open; its samples are
    /// discarded (echo, connect).
    #[arg(long, default_value = "5s", value_parser = duration::parse)]
    pub(crate) warmup: Duration,

    /// Payload bytes per message. Each carries a sequence number and a per-connection pattern,
    /// and every echo is compared byte for byte.
    #[arg(short, long, default_value_t = 32)]
    pub(crate) size: usize,

    /// Send text messages.
    #[arg(long, conflicts_with = "binary")]
    pub(crate) text: bool,

    /// Send binary messages (the default).
    #[arg(long)]
    pub(crate) binary: bool,

    /// Open-loop rate, total over all connections: messages/s (echo), closes/s (close) or
    /// handshakes/s (connect). Latency then counts from each message's intended send time, so
    /// server stalls show in full (coordinated-omission correction, as wrk2 does). Without it,
    /// echo runs closed-loop at maximum throughput and close closes everything at once.
    #[arg(short, long)]
    pub(crate) rate: Option<f64>,

    /// Close: echo messages each connection exchanges (closed-loop, verified, not measured)
    /// before it is closed.
    #[arg(long, default_value_t = 0)]
    pub(crate) messages_before_close: u64,

    /// Give up on a TCP connect plus upgrade after this long.
    #[arg(long, default_value = "10s", value_parser = duration::parse)]
    pub(crate) connect_timeout: Duration,

    /// Give up on an echo, or on a write the server does not read, after this long (a timeout
    /// error, never a sample).
    #[arg(long, default_value = "10s", value_parser = duration::parse)]
    pub(crate) timeout: Duration,

    /// Give up on the server's Close answer, then on its TCP close, after this long from our
    /// Close (a timeout error, never a sample).
    #[arg(long, default_value = "5s", value_parser = duration::parse)]
    pub(crate) close_timeout: Duration,

    /// Connection attempts in flight at once while opening connections.
    #[arg(long, default_value_t = 128)]
    pub(crate) ramp_concurrency: usize,

    /// Also write the parameters, machine, summary and histograms (percentiles and base64
    /// HdrHistogram V2+deflate) as JSON to this file (by convention under bench-results/).
    #[arg(long)]
    pub(crate) json: Option<PathBuf>,

    /// No live progress and no progress bar on stderr; the summary is still printed.
    #[arg(short, long)]
    pub(crate) quiet: bool,

    /// Exit 0 even if errors were counted.
    #[arg(long)]
    pub(crate) allow_errors: bool,
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::*;

    #[test]
    fn help_is_consistent_and_defaults_parse() {
        Args::command().debug_assert();
        let a = Args::try_parse_from(["loadgen", "ws://127.0.0.1:1/"]).unwrap();
        assert_eq!(a.scenario, Scenario::Echo);
        assert_eq!(a.duration, Duration::from_secs(30));
        assert_eq!(a.warmup, Duration::from_secs(5));
        assert!(!a.text && a.rate.is_none());
        let a = Args::try_parse_from([
            "loadgen",
            "ws://h/",
            "--scenario",
            "close",
            "-d",
            "500ms",
            "--rate",
            "100",
            "--text",
        ])
        .unwrap();
        assert_eq!(
            (a.scenario, a.duration, a.rate),
            (Scenario::Close, Duration::from_millis(500), Some(100.0))
        );
        assert!(Args::try_parse_from(["loadgen", "ws://h/", "--text", "--binary"]).is_err());
        let a = Args::try_parse_from(["loadgen", "ws://h/", "-d", "30"]).unwrap();
        assert_eq!(a.duration, Duration::from_secs(30));
        assert!(Args::try_parse_from(["loadgen", "ws://h/", "-d", "30d"]).is_err());
    }
}
