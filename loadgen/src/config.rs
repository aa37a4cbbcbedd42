//! The validated run configuration, derived once from the command line.

use std::path::PathBuf;
use std::time::Duration;

use clap::ValueEnum;
use codec::OpCode;

use crate::cli::Args;
use crate::fdlimit::FdLimit;
use crate::stats::Metric;
use crate::target::Target;

/// Largest `--size`: the codec's default message limit (64 MiB).
const MAX_SIZE: usize = 64 << 20;

/// What a run measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum Scenario {
    /// Send messages and verify each echo; echo round-trip latency and throughput.
    Echo,
    /// Open connections, then close them; close-handshake latency.
    Close,
    /// Connect, upgrade and close in a loop; connect+upgrade latency and handshake rate.
    Connect,
    /// Open connections and hold them for --duration.
    Idle,
}

impl Scenario {
    /// The name on the command line and in reports.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Echo => "echo",
            Self::Close => "close",
            Self::Connect => "connect",
            Self::Idle => "idle",
        }
    }

    /// The latency shown in live progress.
    pub(crate) fn headline(self) -> Metric {
        match self {
            Self::Echo => Metric::Echo,
            Self::Close => Metric::CloseReply,
            Self::Connect | Self::Idle => Metric::Upgrade,
        }
    }
}

/// Everything a run needs, checked.
#[derive(Clone, Debug)]
pub(crate) struct Config {
    /// The server.
    pub(crate) target: Target,
    /// What to measure.
    pub(crate) scenario: Scenario,
    /// Connections (or connect loops) actually used.
    pub(crate) connections: usize,
    /// Connections asked for; more than `connections` when the descriptor limit stopped us.
    pub(crate) connections_requested: usize,
    /// Why `connections` is below `connections_requested`.
    pub(crate) limit_note: Option<String>,
    /// Worker threads.
    pub(crate) cores: usize,
    /// Measured time, or idle hold time.
    pub(crate) duration: Duration,
    /// Discarded time before measuring.
    pub(crate) warmup: Duration,
    /// Payload bytes per message.
    pub(crate) size: usize,
    /// Send text (else binary).
    pub(crate) text: bool,
    /// Open-loop total rate per second.
    pub(crate) rate: Option<f64>,
    /// Messages exchanged before closing (close scenario).
    pub(crate) messages_before_close: u64,
    /// Connect plus upgrade timeout.
    pub(crate) connect_timeout: Duration,
    /// Echo timeout.
    pub(crate) timeout: Duration,
    /// Close handshake timeout.
    pub(crate) close_timeout: Duration,
    /// Connection attempts in flight at once, over all threads.
    pub(crate) ramp_concurrency: usize,
    /// JSON output path.
    pub(crate) json: Option<PathBuf>,
    /// No progress output.
    pub(crate) quiet: bool,
    /// Exit 0 despite errors.
    pub(crate) allow_errors: bool,
}

impl Config {
    /// Checks `args`, resolves the target and fits the connection count under `fd_limit`.
    pub(crate) fn new(args: Args, fd_limit: Option<FdLimit>) -> Result<Self, String> {
        let target = Target::resolve(&args.url)?;
        if args.connections == 0 {
            return Err("--connections must be at least 1".into());
        }
        if args.cores == 0 {
            return Err("--cores must be at least 1".into());
        }
        if args.size > MAX_SIZE {
            return Err(format!("--size must be at most {MAX_SIZE} bytes"));
        }
        if let Some(rate) = args.rate
            && !(rate.is_finite() && rate > 0.0)
        {
            return Err("--rate must be a positive number".into());
        }
        if args.duration.is_zero() && args.scenario != Scenario::Close {
            return Err("--duration must be more than 0".into());
        }
        for (name, d) in [
            ("--connect-timeout", args.connect_timeout),
            ("--timeout", args.timeout),
            ("--close-timeout", args.close_timeout),
        ] {
            if d.is_zero() {
                return Err(format!("{name} must be more than 0"));
            }
        }
        let cap = fd_limit.map(|l| (l, l.max_connections(args.cores)));
        let (connections, limit_note) = match cap {
            Some((l, cap)) if (args.connections as u64) > cap => (
                cap as usize,
                Some(format!(
                    "descriptor limit: RLIMIT_NOFILE is {} (hard {}), so this process can hold \
                     {cap} connections; the ramp stops at {cap} of the {} requested",
                    l.soft, l.hard, args.connections
                )),
            ),
            _ => (args.connections, None),
        };
        if connections == 0 {
            return Err(limit_note.unwrap_or_default());
        }
        let cores = args.cores.min(connections);
        Ok(Self {
            target,
            scenario: args.scenario,
            connections,
            connections_requested: args.connections,
            limit_note,
            cores,
            duration: args.duration,
            warmup: args.warmup,
            size: args.size,
            text: args.text,
            rate: args.rate,
            messages_before_close: args.messages_before_close,
            connect_timeout: args.connect_timeout,
            timeout: args.timeout,
            close_timeout: args.close_timeout,
            ramp_concurrency: args.ramp_concurrency.max(1),
            json: args.json,
            quiet: args.quiet,
            allow_errors: args.allow_errors,
        })
    }

    /// The opcode of our messages.
    pub(crate) fn opcode(&self) -> OpCode {
        if self.text {
            OpCode::Text
        } else {
            OpCode::Binary
        }
    }

    /// The largest frame the server may send us: our own message echoed, or a control frame.
    pub(crate) fn max_frame(&self) -> u64 {
        self.size.max(4096) as u64
    }

    /// Connections handled by worker `thread`: every `cores`-th global index.
    pub(crate) fn indices(&self, thread: usize) -> impl Iterator<Item = usize> + use<> {
        (thread..self.connections).step_by(self.cores)
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    fn args(extra: &[&str]) -> Args {
        let mut v = vec!["loadgen", "ws://127.0.0.1:9/"];
        v.extend_from_slice(extra);
        Args::try_parse_from(v).unwrap()
    }

    #[test]
    fn descriptor_limit_caps_connections_and_says_so() {
        let limit = FdLimit {
            soft: 1000,
            hard: 1000,
        };
        let cfg = Config::new(args(&["-c", "5000", "--cores", "2"]), Some(limit)).unwrap();
        assert_eq!(cfg.connections, 1000 - 64 - 32);
        assert_eq!(cfg.connections_requested, 5000);
        let note = cfg.limit_note.unwrap();
        assert!(
            note.contains("RLIMIT_NOFILE is 1000") && note.contains("of the 5000"),
            "{note}"
        );
        let cfg = Config::new(args(&["-c", "10"]), Some(limit)).unwrap();
        assert_eq!((cfg.connections, cfg.limit_note), (10, None));
    }

    #[test]
    fn rejects_nonsense() {
        for bad in [
            &["-c", "0"][..],
            &["--cores", "0"],
            &["--rate", "0"],
            &["--rate=-5"],
            &["--rate", "inf"],
            &["--timeout", "0s"],
            &["-d", "0s"],
        ] {
            assert!(Config::new(args(bad), None).is_err(), "{bad:?}");
        }
        assert!(Config::new(args(&["--scenario", "close", "-d", "0s"]), None).is_ok());
    }

    #[test]
    fn spreads_connections_round_robin_over_threads() {
        let cfg = Config::new(args(&["-c", "5", "--cores", "2"]), None).unwrap();
        assert_eq!(cfg.indices(0).collect::<Vec<_>>(), [0, 2, 4]);
        assert_eq!(cfg.indices(1).collect::<Vec<_>>(), [1, 3]);
        // More cores than connections: idle threads are not started.
        assert_eq!(
            Config::new(args(&["-c", "2", "--cores", "4"]), None)
                .unwrap()
                .cores,
            2
        );
    }
}
