//! Command-line options.
#![forbid(unsafe_code)]

use std::path::PathBuf;

use clap::parser::ValueSource;
use clap::{CommandFactory as _, FromArgMatches as _, Parser};

use crate::config::{
    Config, ConfigError, DEFAULT_CLOSE_TIMEOUT, DEFAULT_CONNECT_TIMEOUT, DEFAULT_DRAIN_TIMEOUT,
    DEFAULT_HANDSHAKE_TIMEOUT, DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_CONNECTIONS_PER_IP, DEFAULT_MAX_HEADER_BYTES, DEFAULT_MAX_MESSAGE,
    DEFAULT_PING_INTERVAL, DEFAULT_PONG_TIMEOUT, DEFAULT_WRITE_BUFFER, DEFAULT_WRITE_TIMEOUT,
    DurationText, ECHO,
};

/// Where the shorthand listens unless told (a file must name its listeners).
const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// The pool name the CLI shorthand gives its `--backend` list (shows up in logs).
const SHORTHAND_POOL: &str = "default";

/// A WebSocket reverse proxy that parses and validates every frame.
///
/// With no --backend, connections are served by an embedded echo upstream, so
/// `gateway` alone shows the whole client path working.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
pub(crate) struct Args {
    /// Read listeners, routes, upstream pools, limits and timeouts from this TOML file
    /// (see gateway.example.toml) instead of the shorthand flags below, which it cannot be
    /// combined with. SIGHUP or `POST /reload` on the admin listener re-read it.
    #[arg(long, value_name = "FILE")]
    pub(crate) config: Option<PathBuf>,

    /// Validate a configuration file, print a summary or every mistake, and exit.
    #[arg(long, value_name = "FILE")]
    pub(crate) check_config: Option<PathBuf>,

    /// Admin listener: GET /metrics (Prometheus), GET /healthz, POST /reload.
    #[arg(long, value_name = "ADDR")]
    admin: Option<String>,

    /// Log format: one line of text per event, or one JSON object.
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormatArg,

    /// Address to accept WebSocket clients on, ip:port (each core binds it with `SO_REUSEPORT`).
    #[arg(long, value_name = "ADDR", default_value = DEFAULT_LISTEN)]
    listen: String,

    /// Upstream WebSocket server, as ws://host:port[/path]. Repeat for round-robin; on a
    /// connect failure the next one is tried. None: the embedded echo serves every connection.
    #[arg(long = "backend", value_name = "URL")]
    backends: Vec<String>,

    /// Worker threads, one pinned event loop each [default: all available cores].
    #[arg(long)]
    cores: Option<u64>,

    /// The data plane's I/O: `uring` (io_uring), `epoll`, or `auto` (io_uring where it can be
    /// set up, epoll where a seccomp profile, a sysctl or an old kernel denies it; then the
    /// environment variable `WSGATE_IO_BACKEND` may choose).
    #[arg(long, value_name = "BACKEND", default_value = "auto", value_parser = ["auto", "uring", "epoll"])]
    io_backend: String,

    /// Time a client has to send a complete upgrade request.
    #[arg(long, value_name = "DURATION", default_value_t = DEFAULT_HANDSHAKE_TIMEOUT.into())]
    handshake_timeout: DurationText,

    /// Time to connect to one backend (then the next is tried), and to get its 101.
    #[arg(long, value_name = "DURATION", default_value_t = DEFAULT_CONNECT_TIMEOUT.into())]
    connect_timeout: DurationText,

    /// Time a peer has to answer a close frame (or to close TCP) before it is dropped.
    #[arg(long, value_name = "DURATION", default_value_t = DEFAULT_CLOSE_TIMEOUT.into())]
    close_timeout: DurationText,

    /// Largest message, and largest frame, in bytes; larger ones close with 1009.
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_MAX_MESSAGE)]
    max_message: u64,

    /// Largest upgrade request head in bytes (at least 256); larger ones get 431.
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_MAX_HEADER_BYTES)]
    max_header_bytes: u64,

    /// Ping each leg this often; a leg that stays silent past --pong-timeout after a ping
    /// is dead and its connection closed (1001 to the client, 1011 if the backend died).
    /// 0 turns pings off.
    #[arg(long, value_name = "DURATION", default_value_t = DEFAULT_PING_INTERVAL.into())]
    ping_interval: DurationText,

    /// How long a pinged leg has to show life (any frame, a pong included).
    #[arg(long, value_name = "DURATION", default_value_t = DEFAULT_PONG_TIMEOUT.into())]
    pong_timeout: DurationText,

    /// A peer that takes no bytes for this long while a write to it is pending stopped
    /// reading: its socket is shut and the other peer told (1001 to the backend of a stuck
    /// client, 1011 to the client of a stuck backend). 0 turns it off.
    #[arg(long, value_name = "DURATION", default_value_t = DEFAULT_WRITE_TIMEOUT.into())]
    write_timeout: DurationText,

    /// Close connections (1001) on which neither side sent anything for this long; pongs
    /// count, so with pings on, quiet but healthy connections stay. 0 turns it off.
    #[arg(long, value_name = "DURATION", default_value_t = DEFAULT_IDLE_TIMEOUT.into())]
    idle_timeout: DurationText,

    /// On SIGTERM or SIGINT (close 1001) or SIGUSR2 (restart: close 1012): time the
    /// connections have to finish their close handshakes before the process exits.
    #[arg(long, value_name = "DURATION", default_value_t = DEFAULT_DRAIN_TIMEOUT.into())]
    drain_timeout: DurationText,

    /// Open connections across all cores; more get 429 before the upgrade.
    #[arg(long, default_value_t = DEFAULT_MAX_CONNECTIONS)]
    max_connections: u64,

    /// Open connections from one client IP; more get 429 before the upgrade. 0 = no limit
    /// (behind an L4 balancer every client may share one address).
    #[arg(long, default_value_t = DEFAULT_MAX_CONNECTIONS_PER_IP)]
    max_connections_per_ip: u64,

    /// Bytes buffered per direction per connection at most (read buffer, held-back frame).
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_WRITE_BUFFER)]
    write_buffer: u64,
}

/// `--log-format` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum LogFormatArg {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Each key path the shorthand writes, and the flag that set it, so that the validator's
/// messages name what was typed. A path also covers its elements (`backends[1]`).
const FLAGS: &[(&str, &str)] = &[
    ("server.cores", "--cores"),
    ("server.admin", "--admin"),
    ("server.log_format", "--log-format"),
    ("server.io_backend", "--io-backend"),
    ("server.drain_timeout", "--drain-timeout"),
    ("listener[0].address", "--listen"),
    ("limits.handshake_timeout", "--handshake-timeout"),
    ("limits.max_header_bytes", "--max-header-bytes"),
    ("limits.max_message", "--max-message"),
    ("limits.max_frame", "--max-message"),
    ("limits.max_connections", "--max-connections"),
    ("limits.max_connections_per_ip", "--max-connections-per-ip"),
    ("limits.write_buffer", "--write-buffer"),
    ("timeouts.connect", "--connect-timeout"),
    ("timeouts.close", "--close-timeout"),
    ("timeouts.idle", "--idle-timeout"),
    ("timeouts.ping_interval", "--ping-interval"),
    ("timeouts.pong_timeout", "--pong-timeout"),
    ("timeouts.write", "--write-timeout"),
    ("upstream.default.backends", "--backend"),
];

/// The flag behind a key path of the shorthand's configuration.
fn flag(path: &str) -> Option<&'static str> {
    FLAGS.iter().find_map(|&(key, flag)| {
        let rest = path.strip_prefix(key)?;
        (rest.is_empty() || rest.starts_with('[')).then_some(flag)
    })
}

impl Args {
    /// Parses the command line, exiting with a usage error (status 2) when a file option is
    /// combined with shorthand flags: the file would silently win over them.
    pub(crate) fn parse_checked() -> Self {
        let matches = Self::command().get_matches();
        let args = Self::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
        let file_option = if args.check_config.is_some() {
            "--check-config"
        } else if args.config.is_some() {
            "--config"
        } else {
            return args;
        };
        let command = Self::command();
        let given: Vec<String> = command
            .get_arguments()
            .filter(|arg| !matches!(arg.get_id().as_str(), "config" | "check_config"))
            .filter(|arg| {
                matches.value_source(arg.get_id().as_str()) == Some(ValueSource::CommandLine)
            })
            .filter_map(|arg| arg.get_long().map(|long| format!("--{long}")))
            .collect();
        if given.is_empty() {
            return args;
        }
        let advice = if file_option == "--config" {
            "put those settings in the file"
        } else {
            "it checks the file alone"
        };
        Self::command()
            .error(
                clap::error::ErrorKind::ArgumentConflict,
                format!(
                    "{file_option} cannot be combined with {}: {advice}",
                    given.join(", ")
                ),
            )
            .exit()
    }

    /// The one-route configuration the shorthand flags describe: written in the file's
    /// shape and validated by the file's validator, with messages that name the flags.
    pub(crate) fn shorthand_config(&self) -> Result<Config, ConfigError> {
        Config::from_flags(&self.shorthand_table(), flag)
    }

    /// The flags as a configuration file's table: one listener, one route "/" to the
    /// `--backend` pool (round-robin, no health check) or to echo; everything else as given
    /// or at its default.
    fn shorthand_table(&self) -> toml_edit::Table {
        use toml_edit::{Array, ArrayOfTables, Item, Table, value};
        // TOML integers are i64; a larger count is out of any range the validator accepts
        // as meaningful, and saturating keeps it large.
        let int = |n: u64| value(i64::try_from(n).unwrap_or(i64::MAX));
        let text = |d: &DurationText| value(d.to_string());
        let one = |table: Table| {
            let mut list = ArrayOfTables::new();
            list.push(table);
            Item::ArrayOfTables(list)
        };

        let mut server = Table::new();
        if let Some(cores) = self.cores {
            server["cores"] = int(cores);
        }
        if let Some(admin) = &self.admin {
            server["admin"] = value(admin.as_str());
        }
        server["log_format"] = value(match self.log_format {
            LogFormatArg::Text => "text",
            LogFormatArg::Json => "json",
        });
        server["io_backend"] = value(self.io_backend.as_str());
        server["drain_timeout"] = text(&self.drain_timeout);

        let mut listener = Table::new();
        listener["address"] = value(self.listen.as_str());

        let mut limits = Table::new();
        limits["handshake_timeout"] = text(&self.handshake_timeout);
        limits["max_header_bytes"] = int(self.max_header_bytes);
        limits["max_message"] = int(self.max_message);
        limits["max_frame"] = int(self.max_message);
        limits["max_connections"] = int(self.max_connections);
        limits["max_connections_per_ip"] = int(self.max_connections_per_ip);
        limits["write_buffer"] = int(self.write_buffer);

        let mut timeouts = Table::new();
        timeouts["connect"] = text(&self.connect_timeout);
        timeouts["close"] = text(&self.close_timeout);
        timeouts["idle"] = text(&self.idle_timeout);
        timeouts["ping_interval"] = text(&self.ping_interval);
        timeouts["pong_timeout"] = text(&self.pong_timeout);
        timeouts["write"] = text(&self.write_timeout);

        let mut route = Table::new();
        let mut doc = Table::new();
        if self.backends.is_empty() {
            route["upstream"] = value(ECHO);
        } else {
            route["upstream"] = value(SHORTHAND_POOL);
            let mut pool = Table::new();
            pool["backends"] = value(self.backends.iter().collect::<Array>());
            let mut upstream = Table::new();
            upstream[SHORTHAND_POOL] = Item::Table(pool);
            doc["upstream"] = Item::Table(upstream);
        }
        doc["server"] = Item::Table(server);
        doc["listener"] = one(listener);
        doc["limits"] = Item::Table(limits);
        doc["timeouts"] = Item::Table(timeouts);
        doc["route"] = one(route);
        doc
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Args {
        Args::try_parse_from(std::iter::once("gateway").chain(list.iter().copied())).unwrap()
    }

    fn err(list: &[&str]) -> String {
        args(list).shorthand_config().unwrap_err().to_string()
    }

    /// The flags' defaults and the file's are the same table: no flags means what a minimal
    /// file means.
    #[test]
    fn no_flags_mean_the_minimal_file() {
        let file = Config::from_toml(&format!(
            "[[listener]]\naddress = \"{DEFAULT_LISTEN}\"\n[[route]]\nupstream = \"echo\"\n"
        ))
        .unwrap();
        assert_eq!(args(&[]).shorthand_config().unwrap(), file);
    }

    #[test]
    fn flags_set_what_they_name() {
        let c = args(&[
            "--listen",
            "127.0.0.1:9",
            "--backend",
            "ws://127.0.0.1:1",
            "--backend",
            "ws://127.0.0.1:2/p",
            "--cores",
            "1",
            "--admin",
            "127.0.0.1:10",
            "--log-format",
            "json",
            "--max-message",
            "1000",
            "--max-header-bytes",
            "4096",
            "--write-buffer",
            "4096",
            "--max-connections-per-ip",
            "0",
            "--ping-interval",
            "250ms",
            "--idle-timeout",
            "0",
            "--drain-timeout",
            "0s",
        ])
        .shorthand_config()
        .unwrap();
        assert_eq!(c.listeners, vec!["127.0.0.1:9".parse().unwrap()]);
        assert_eq!(c.server.cores, Some(1));
        assert_eq!(c.server.admin, Some("127.0.0.1:10".parse().unwrap()));
        assert_eq!(c.server.log_format, crate::config::LogFormat::Json);
        assert_eq!(c.server.drain_timeout, std::time::Duration::ZERO);
        assert_eq!(c.pools.len(), 1);
        assert_eq!(c.pools[0].name, SHORTHAND_POOL);
        assert_eq!(c.pools[0].backends.len(), 2);
        assert_eq!(c.pools[0].backends[1].to_string(), "ws://127.0.0.1:2/p");
        let route = c.route("any", "/x").unwrap();
        assert_eq!(c.upstream_name(route.upstream), SHORTHAND_POOL);
        assert_eq!(route.limits, codec::Limits::new(1000, 1000));
        let l = c.global_limits;
        assert_eq!((l.head_limits.max_bytes, l.write_buffer), (4096, 4096));
        assert_eq!(l.max_connections_per_ip, usize::MAX);
        assert_eq!(
            c.timeouts.ping_interval,
            Some(std::time::Duration::from_millis(250))
        );
        assert_eq!(c.timeouts.idle, None);
    }

    #[test]
    fn problems_name_the_flags_once_each() {
        assert_eq!(
            err(&["--max-message", "0"]),
            "--max-message: 0 must be at least 1"
        );
        assert_eq!(
            err(&[
                "--max-header-bytes",
                "10",
                "--cores",
                "0",
                "--pong-timeout",
                "x"
            ]),
            "3 problems:\n  \
             --cores: 0 must be at least 1 (omit it to use every available core)\n  \
             --max-header-bytes: 10 must be at least 256\n  \
             --pong-timeout: \"x\" is not a duration like 250ms, 10s or 2m"
        );
        assert_eq!(
            err(&["--backend", "http://x"]),
            "--backend: \"http://x\" must be ws://host:port[/path]"
        );
        assert!(
            err(&["--listen", "localhost:8080"])
                .starts_with("--listen: \"localhost:8080\": the host must be an IP address"),
        );
    }

    #[test]
    fn every_flag_in_the_table_exists() {
        let command = Args::command();
        for &(path, name) in FLAGS {
            let long = name.strip_prefix("--").unwrap();
            assert!(
                command.get_arguments().any(|a| a.get_long() == Some(long)),
                "{path} names {name}, which is not a flag"
            );
        }
        assert_eq!(flag("upstream.default.backends[3]"), Some("--backend"));
        assert_eq!(flag("limits.max_connections"), Some("--max-connections"));
        assert_eq!(flag("limits.max_connections_x"), None);
    }
}
