//! Command-line options.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::config::{BackendUrl, Config, LogFormat, parse_duration};

/// A WebSocket reverse proxy that parses and validates every frame.
///
/// With no --backend, connections are served by an embedded echo upstream, so
/// `gateway` alone shows the whole client path working.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
pub(crate) struct Args {
    /// Read listeners, routes, upstream pools, limits and timeouts from this TOML file
    /// (see gateway.example.toml); the shorthand flags below are then ignored. SIGHUP or
    /// `POST /reload` on the admin listener re-read it.
    #[arg(long, value_name = "FILE")]
    pub(crate) config: Option<PathBuf>,

    /// Validate a configuration file, print a summary or every mistake, and exit.
    #[arg(long, value_name = "FILE")]
    pub(crate) check_config: Option<PathBuf>,

    /// Admin listener: GET /metrics (Prometheus), GET /healthz, POST /reload.
    #[arg(long, value_name = "ADDR")]
    pub(crate) admin: Option<SocketAddr>,

    /// Log format: one line of text per event, or one JSON object.
    #[arg(long, value_enum, default_value = "text")]
    pub(crate) log_format: LogFormatArg,

    /// Address to accept WebSocket clients on (each core binds it with `SO_REUSEPORT`).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub(crate) listen: SocketAddr,

    /// Upstream WebSocket server, as ws://host:port[/path]. Repeat for round-robin; on a
    /// connect failure the next one is tried. None: the embedded echo serves every connection.
    #[arg(long = "backend", value_name = "URL")]
    pub(crate) backends: Vec<BackendUrl>,

    /// Worker threads, one pinned io_uring runtime each [default: all available cores].
    #[arg(long)]
    pub(crate) cores: Option<usize>,

    /// Time a client has to send a complete upgrade request.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub(crate) handshake_timeout: Duration,

    /// Time to connect to one backend (then the next is tried), and to get its 101.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub(crate) connect_timeout: Duration,

    /// Time a peer has to answer a close frame (or to close TCP) before it is dropped.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub(crate) close_timeout: Duration,

    /// Largest message, and largest frame, in bytes; larger ones close with 1009.
    #[arg(long, default_value_t = codec::Limits::DEFAULT_MAX)]
    pub(crate) max_message: u64,

    /// Largest upgrade request head in bytes; larger ones get 431.
    #[arg(long, default_value_t = 8192)]
    pub(crate) max_header_bytes: usize,

    /// Ping each leg this often; a leg that stays silent past --pong-timeout after a ping
    /// is dead and its connection closed (1001 to the client, 1011 if the backend died).
    /// 0 turns pings off.
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    pub(crate) ping_interval: Duration,

    /// How long a pinged leg has to show life (any frame, a pong included).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub(crate) pong_timeout: Duration,

    /// A peer that takes no bytes for this long while a write to it is pending stopped
    /// reading: its socket is shut and the other peer told (1001 to the backend of a stuck
    /// client, 1011 to the client of a stuck backend). 0 turns it off.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub(crate) write_timeout: Duration,

    /// Close connections (1001) on which neither side sent anything for this long; pongs
    /// count, so with pings on, quiet but healthy connections stay. 0 turns it off.
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    pub(crate) idle_timeout: Duration,

    /// On SIGTERM or SIGINT (close 1001) or SIGUSR2 (restart: close 1012): time the
    /// connections have to finish their close handshakes before the process exits.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub(crate) drain_timeout: Duration,

    /// Open connections across all cores; more get 429 before the upgrade.
    #[arg(long, default_value_t = 100_000)]
    pub(crate) max_connections: usize,

    /// Open connections from one client IP; more get 429 before the upgrade. 0 = no limit
    /// (behind an L4 balancer every client may share one address).
    #[arg(long, default_value_t = 0)]
    pub(crate) max_connections_per_ip: usize,

    /// Bytes buffered per direction per connection at most (read buffer, held-back frame).
    #[arg(long, default_value_t = crate::relay::DEFAULT_BUFFER)]
    pub(crate) write_buffer: usize,
}

/// `--log-format` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum LogFormatArg {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

impl Args {
    /// The one-route configuration the shorthand flags describe.
    pub(crate) fn shorthand_config(&self) -> Config {
        let mut config = Config::shorthand(
            self.listen,
            self.backends.clone(),
            self.cores,
            self.handshake_timeout,
            self.connect_timeout,
            self.close_timeout,
            self.max_message,
            self.max_header_bytes,
        );
        let nonzero = |d: Duration| (!d.is_zero()).then_some(d);
        config.timeouts.ping_interval = nonzero(self.ping_interval);
        config.timeouts.pong_timeout = self.pong_timeout;
        config.timeouts.idle = nonzero(self.idle_timeout);
        config.timeouts.write = nonzero(self.write_timeout);
        config.server.drain_timeout = self.drain_timeout;
        config.server.admin = self.admin;
        config.server.log_format = self.log_format();
        config.global_limits.write_buffer = self.write_buffer;
        config.global_limits.max_connections = self.max_connections;
        config.global_limits.max_connections_per_ip = match self.max_connections_per_ip {
            0 => usize::MAX,
            n => n,
        };
        config
    }

    /// The log format asked for on the command line.
    pub(crate) fn log_format(&self) -> LogFormat {
        match self.log_format {
            LogFormatArg::Text => LogFormat::Text,
            LogFormatArg::Json => LogFormat::Json,
        }
    }
}
