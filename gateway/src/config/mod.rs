//! The gateway's configuration: a TOML file (`--config`, schema in `gateway.example.toml`) or
//! the CLI shorthand for one route. Everything is validated once, at load, so workers never meet
//! a bad value and `--check-config` can name every mistake before a deploy.
#![forbid(unsafe_code)]

pub(crate) mod cli;
pub(crate) mod reload;

use std::collections::BTreeMap;
use std::fmt;
use std::net::{Ipv6Addr, SocketAddr, ToSocketAddrs};
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use codec::handshake::HeadLimits;
use serde::Deserialize;
use serde::de::{self, DeserializeOwned, Deserializer, IntoDeserializer as _, Visitor};

/// The upstream name that means the embedded echo; it cannot name an `[upstream.NAME]`.
pub(crate) const ECHO: &str = "echo";

// ---- Every default, in one table: the file's validator falls back to these and the CLI shows
// ---- them in `--help` (its flags feed the same validator), so the two cannot drift apart.

pub(crate) const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
pub(crate) const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
pub(crate) const DEFAULT_MAX_HEADER_BYTES: u64 = HeadLimits::DEFAULT.max_bytes as u64;
/// Both `max_message` and `max_frame`.
pub(crate) const DEFAULT_MAX_MESSAGE: u64 = codec::Limits::DEFAULT_MAX;
pub(crate) const DEFAULT_MAX_CONNECTIONS: u64 = 100_000;
/// 0: no per-IP limit. Behind an L4 balancer every client can share one address.
pub(crate) const DEFAULT_MAX_CONNECTIONS_PER_IP: u64 = 0;
pub(crate) const DEFAULT_WRITE_BUFFER: u64 = 64 << 10;
pub(crate) const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
pub(crate) const DEFAULT_CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// Zero: off.
pub(crate) const DEFAULT_IDLE_TIMEOUT: Duration = Duration::ZERO;
/// Zero: off.
pub(crate) const DEFAULT_PING_INTERVAL: Duration = Duration::ZERO;
pub(crate) const DEFAULT_PONG_TIMEOUT: Duration = Duration::from_secs(10);
pub(crate) const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_EJECT_AFTER: u32 = 3;
const DEFAULT_EJECT_FOR: Duration = Duration::from_secs(30);
const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(2);

/// No valid upgrade request fits in less (the mandatory headers alone take about 150 bytes),
/// so a smaller `max_header_bytes` is a typo that would refuse every client with 431.
const MIN_HEADER_BYTES: u64 = 256;
/// Pooled read buffers per core unless `server.read_buffers` says otherwise.
const DEFAULT_READ_BUFFERS: u16 = 64;
/// How long a read waits before it is parked unless `server.park_reads_after` says otherwise:
/// long enough that a connection exchanging messages is never parked, short enough to catch
/// the usual 20-30 s heartbeat of an idle one.
const DEFAULT_PARK_READS_AFTER: Duration = Duration::from_secs(5);
/// The relay reads at least this much at a time, so a smaller `write_buffer` could not be
/// honoured.
const MIN_WRITE_BUFFER: u64 = crate::conn::MIN_READ as u64;
/// The most `limits.write_buffer` may be: the relay keeps positions in its buffers in 4 bytes.
const MAX_WRITE_BUFFER: u64 = 1 << 30;
/// The sections a file may have, for the message about any other.
const SECTIONS: &str = "[server], [[listener]], [limits], [timeouts], [[route]], [upstream.NAME]";

/// A parsed `ws://` backend address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct BackendUrl {
    /// `host:port` as written, for the upstream `Host` header and logs.
    pub(crate) authority: String,
    /// The resolved socket address.
    pub(crate) addr: SocketAddr,
    /// Path prefix prepended to the client's request target ("" for none).
    pub(crate) path_prefix: String,
}

impl FromStr for BackendUrl {
    type Err = String;

    /// Errors read as "VALUE must be ..." so both clap and the config prefix them with the flag
    /// or field.
    fn from_str(url: &str) -> Result<Self, String> {
        let invalid = || {
            let hint = if url.starts_with("wss://") {
                " (wss:// backends are not supported)"
            } else {
                ""
            };
            format!("{url:?} must be ws://host:port[/path]{hint}")
        };
        let rest = url.strip_prefix("ws://").ok_or_else(invalid)?;
        let (authority, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        if url.contains(char::is_whitespace) || url.contains(['?', '#', '@']) {
            return Err(invalid());
        }
        // A port is whatever follows the last ':' unless that ':' sits inside an IPv6 literal.
        let (host, port) = match authority.rsplit_once(':') {
            Some((host, port)) if !authority.ends_with(']') => (host, Some(port)),
            _ => (authority, None),
        };
        if host.is_empty() {
            return Err(invalid());
        }
        let port = match port {
            None => 80,
            Some(p) => match p.parse::<u16>() {
                Ok(p) if p != 0 => p,
                _ => return Err(format!("{url:?}: port {p:?} must be 1 to 65535")),
            },
        };
        let with_port = format!("{host}:{port}");
        let addr = with_port
            .to_socket_addrs()
            .map_err(|e| format!("{url:?}: cannot resolve {with_port}: {e}"))?
            .next()
            .ok_or_else(|| format!("{url:?}: {with_port} resolves to no address"))?;
        Ok(Self {
            authority: authority.to_owned(),
            addr,
            path_prefix: path.trim_end_matches('/').to_owned(),
        })
    }
}

impl fmt::Display for BackendUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ws://{}{}", self.authority, self.path_prefix)
    }
}

/// Parses `250ms`, `10s`, `2m` (a bare number is seconds).
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(split);
    let parsed = number.parse::<u64>().ok().and_then(|n| match unit {
        "ms" => Some(Duration::from_millis(n)),
        "" | "s" => Some(Duration::from_secs(n)),
        "m" => n.checked_mul(60).map(Duration::from_secs),
        _ => None,
    });
    parsed.ok_or_else(|| format!("{text:?} is not a duration like 250ms, 10s or 2m"))
}

/// Why a configuration was refused; the message names the field, the value and the reason
/// (several lines when there are several problems).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ConfigError(String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why [`Config::load`] failed; the text starts with the file's path. Kept apart because an
/// unreadable file is the host's problem and an invalid one the operator's (the admin plane
/// answers 500 and 422).
#[derive(Debug)]
pub(crate) enum LoadError {
    /// The file could not be read (missing, unreadable).
    Unreadable(String),
    /// The file was read but does not parse or validate: every problem, named.
    Invalid(String),
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unreadable(why) | Self::Invalid(why) => f.write_str(why),
        }
    }
}

impl std::error::Error for ConfigError {}

/// Everything the gateway runs with; built once and shared read-only by all cores.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Config {
    pub(crate) server: Server,
    /// Addresses to accept clients on; every core binds each with `SO_REUSEPORT`.
    pub(crate) listeners: Vec<SocketAddr>,
    /// The `[limits]` section.
    pub(crate) global_limits: GlobalLimits,
    pub(crate) timeouts: Timeouts,
    /// In declaration order, so `route[i]` in error messages is `routes[i]`.
    pub(crate) routes: Vec<Route>,
    /// The declared `[upstream.NAME]` pools, sorted by name; [`Upstream::Pool`] indexes this.
    pub(crate) pools: Vec<Pool>,
}

/// The `[server]` section: process-wide settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Server {
    /// Worker threads; `None` means every available core (checked against the machine by main).
    pub(crate) cores: Option<usize>,
    /// The admin listener (`/metrics`, `/healthz`, `POST /reload`), off unless configured.
    pub(crate) admin: Option<SocketAddr>,
    /// When set, every admin endpoint but `/healthz` requires `Authorization: Bearer` it.
    pub(crate) admin_token: Option<crate::admin::AdminToken>,
    pub(crate) log_format: LogFormat,
    /// The data plane's I/O backend: io_uring, epoll, or io_uring where it can be set up.
    pub(crate) io_backend: crate::driver::IoBackend,
    /// After SIGTERM/SIGINT, how long open connections get to finish their close handshakes.
    pub(crate) drain_timeout: Duration,
    /// Pooled read buffers per core (a power of two): io_uring's provided-buffer ring, and
    /// the most free ones a core keeps.
    pub(crate) read_buffers: u16,
    /// On io_uring, a read waiting this long (up to twice it) is parked behind a poll, which
    /// holds less kernel memory; `None`: never.
    pub(crate) park_reads_after: Option<Duration>,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LogFormat {
    Text,
    Json,
}

/// The `[limits]` section: bounds that apply before a route is known, or to the whole process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct GlobalLimits {
    /// Time a client has to send a complete upgrade request.
    pub(crate) handshake_timeout: Duration,
    /// Bounds on the upgrade request head (larger ones get 431).
    pub(crate) head_limits: HeadLimits,
    /// Connections across all cores; more are refused with 429 before the upgrade.
    pub(crate) max_connections: usize,
    /// Connections from one client IP; more are refused with 429 before the upgrade
    /// (`usize::MAX` when the file says 0: no limit).
    pub(crate) max_connections_per_ip: usize,
    /// Bytes in flight on one leg before its reader is paused (backpressure).
    pub(crate) write_buffer: usize,
    /// The message and frame limits a route starts from; [`Route::limits`] is what applies.
    pub(crate) message: codec::Limits,
}

/// The `[timeouts]` section.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Timeouts {
    /// Per backend attempt, for the TCP connect and again for its 101.
    pub(crate) connect: Duration,
    /// A peer that does not answer a close frame in time is dropped.
    pub(crate) close: Duration,
    /// Close a connection with no frames either way for this long; `None` = never.
    pub(crate) idle: Option<Duration>,
    /// Ping each leg this often; `None` = never.
    pub(crate) ping_interval: Option<Duration>,
    /// A leg that does not answer a ping in time is dead.
    pub(crate) pong_timeout: Duration,
    /// A peer whose pending write moves no bytes for this long stopped reading and is given
    /// up on; `None` = never.
    pub(crate) write: Option<Duration>,
}

/// One `[[route]]`: which requests it takes and where they go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Route {
    /// `None` matches any host.
    pub(crate) host: Option<HostPattern>,
    /// `/` or a path without a trailing slash; matches whole segments (see [`Config::route`]).
    pub(crate) path_prefix: String,
    pub(crate) upstream: Upstream,
    /// Exact `Origin` values allowed; `None` allows any (or none).
    pub(crate) origins: Option<Vec<String>>,
    /// The route's own overrides, else `[limits]`.
    pub(crate) limits: codec::Limits,
}

impl Route {
    /// Whether a request with this `Origin` header may upgrade (else 403). With an allow-list,
    /// a request without `Origin` is refused too: the list is there to admit only those pages.
    pub(crate) fn allows_origin(&self, origin: Option<&[u8]>) -> bool {
        match (&self.origins, origin) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(list), Some(origin)) => list.iter().any(|o| o.as_bytes() == origin),
        }
    }

    /// `host` without its port.
    fn matches(&self, host: &str, path: &str) -> bool {
        self.host.as_ref().is_none_or(|p| p.matches(host))
            && prefix_matches(&self.path_prefix, path)
    }

    /// Higher wins: any host pattern beats none, exact beats wildcard, a longer wildcard suffix
    /// beats a shorter one, then the longer path prefix.
    fn specificity(&self) -> (u8, usize, usize) {
        let (class, len) = match &self.host {
            None => (0, 0),
            Some(HostPattern::Wildcard(suffix)) => (1, suffix.len()),
            Some(HostPattern::Exact(_)) => (2, 0),
        };
        (class, len, self.path_prefix.len())
    }
}

/// A route's `host`, compared case-insensitively with the request's `Host` minus its port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum HostPattern {
    /// `chat.example.com`, stored lowercase.
    Exact(String),
    /// `*.example.com`, stored as the lowercase suffix `.example.com`: one or more labels must
    /// precede it, so it does not match `example.com` itself.
    Wildcard(String),
}

impl HostPattern {
    fn parse(text: &str) -> Result<Self, String> {
        let lower = text.to_ascii_lowercase();
        let lower = lower.strip_suffix('.').unwrap_or(&lower);
        let (name, wildcard) = match lower.strip_prefix("*.") {
            Some(rest) => (rest, true),
            None => (lower, false),
        };
        if name.contains('*') {
            return Err(format!(
                "{text:?}: a wildcard may only be a leading \"*.\", as in \"*.example.com\""
            ));
        }
        let ipv6 = name
            .strip_prefix('[')
            .and_then(|n| n.strip_suffix(']'))
            .is_some_and(|n| n.parse::<Ipv6Addr>().is_ok());
        if !ipv6 && name.contains(':') {
            return Err(format!(
                "{text:?} must not include a port (the request's port is ignored when matching)"
            ));
        }
        let valid_name = !name.is_empty()
            && name.split('.').all(|label| {
                !label.is_empty()
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            });
        if !(valid_name || ipv6 && !wildcard) {
            return Err(format!(
                "{text:?} must be a host name like \"chat.example.com\" or \"*.example.com\""
            ));
        }
        Ok(if wildcard {
            Self::Wildcard(format!(".{name}"))
        } else {
            Self::Exact(name.to_owned())
        })
    }

    /// `host` is the request's host without its port.
    pub(crate) fn matches(&self, host: &str) -> bool {
        match self {
            Self::Exact(name) => host.eq_ignore_ascii_case(name),
            Self::Wildcard(suffix) => {
                let (host, suffix) = (host.as_bytes(), suffix.as_bytes());
                host.len() > suffix.len()
                    && host[host.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
            }
        }
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exact(name) => f.write_str(name),
            Self::Wildcard(suffix) => write!(f, "*{suffix}"),
        }
    }
}

/// Where a route's connections go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Upstream {
    /// The embedded echo upstream.
    Echo,
    /// An index into [`Config::pools`].
    Pool(usize),
}

/// One `[upstream.NAME]`: the backends a route balances over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Pool {
    pub(crate) name: String,
    /// At least one.
    pub(crate) backends: Vec<BackendUrl>,
    pub(crate) balance: Balance,
    /// Consecutive connect/upgrade failures before a backend is skipped; 0 = never skip.
    pub(crate) eject_after: u32,
    /// How long a backend stays skipped.
    pub(crate) eject_for: Duration,
    /// Periodic upgrade probes; `None` = off.
    pub(crate) health: Option<HealthCheck>,
}

/// How a pool picks the backend to try first (the others follow on failure).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Balance {
    RoundRobin,
    LeastConnections,
    /// The same key goes to the same backend while the pool is unchanged.
    Hash(HashKey),
}

/// What `balance = "hash"` hashes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum HashKey {
    ClientIp,
    /// A request header's value (name compared case-insensitively); absent or empty falls back to the client IP.
    Header(String),
    /// A cookie's value; absent or empty falls back to the client IP.
    Cookie(String),
}

/// A periodic WebSocket upgrade probe against each backend of a pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HealthCheck {
    pub(crate) interval: Duration,
    /// Request target of the probe.
    pub(crate) path: String,
    /// Time the probe has to get its 101.
    pub(crate) timeout: Duration,
}

impl Config {
    /// Parses and validates a configuration file's text. Past TOML syntax, every mistake is
    /// collected: unknown keys and values of the wrong type (with their line) as well as the
    /// validator's findings, so one `--check-config` run names them all.
    pub(crate) fn from_toml(text: &str) -> Result<Self, ConfigError> {
        // toml's own message carries the line, column and a snippet of the offending line.
        let doc = toml_edit::ImDocument::parse(text)
            .map_err(|e| ConfigError(e.to_string().trim_end().to_owned()))?;
        let mut p = Problems::default();
        let raw = RawConfig::read(doc.as_table(), text, &mut p);
        raw.validate(p)
    }

    /// Validates the configuration the CLI shorthand wrote in the file's shape, with the file's
    /// checks; `flag` names the flag that set a key path, for the messages.
    pub(crate) fn from_flags(
        table: &toml_edit::Table,
        flag: fn(&str) -> Option<&'static str>,
    ) -> Result<Self, ConfigError> {
        let mut p = Problems::naming(flag);
        let raw = RawConfig::read(table, "", &mut p);
        raw.validate(p)
    }

    /// [`Config::from_toml`] on a file; the error starts with the file's path.
    pub(crate) fn load(path: &Path) -> Result<Self, LoadError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| LoadError::Unreadable(format!("{}: cannot read: {e}", path.display())))?;
        Self::from_toml(&text)
            .map_err(|e| LoadError::Invalid(format!("{}: {}", path.display(), e.0)))
    }

    /// The route for a request: routes with a matching host pattern beat host-less ones (exact
    /// host beats wildcard, a longer wildcard beats a shorter one), then the longest matching
    /// path prefix wins; `None` -> the gateway answers 404.
    ///
    /// `host` is the `Host` header as sent (any port is ignored, case does not matter); `path`
    /// is the request target. A prefix matches whole segments: `/chat` takes `/chat`,
    /// `/chat/x`, `/chat;p` and `/chat?q`, not `/chatter`.
    pub(crate) fn route(&self, host: &str, path: &str) -> Option<&Route> {
        let host = strip_port(host);
        // Validation rejects routes with the same host and prefix, so there are no ties.
        self.routes
            .iter()
            .filter(|r| r.matches(host, path))
            .max_by_key(|r| r.specificity())
    }

    /// The name to log for an upstream: the pool's name, or "echo".
    pub(crate) fn upstream_name(&self, upstream: Upstream) -> &str {
        match upstream {
            Upstream::Echo => ECHO,
            Upstream::Pool(i) => &self.pools[i].name,
        }
    }

    fn assemble(
        server: Server,
        listeners: Vec<SocketAddr>,
        global_limits: GlobalLimits,
        timeouts: Timeouts,
        routes: Vec<Route>,
        pools: Vec<Pool>,
    ) -> Self {
        Self {
            server,
            listeners,
            global_limits,
            timeouts,
            routes,
            pools,
        }
    }
}

/// The request's host without its port (`[::1]:80` keeps its brackets) or a trailing dot.
fn strip_port(host: &str) -> &str {
    let host = if host.starts_with('[') {
        host.find(']').map_or(host, |i| &host[..=i])
    } else {
        match host.rsplit_once(':') {
            Some((name, _)) if !name.contains(':') => name,
            _ => host,
        }
    };
    host.strip_suffix('.').unwrap_or(host)
}

/// A `;` ends the segment too: servlet containers serve `/admin;x` as `/admin`.
fn prefix_matches(prefix: &str, path: &str) -> bool {
    prefix == "/"
        || path
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with(['/', '?', ';']))
}

// ---- The file as written: every key optional here, so that defaults and error messages are
// ---- decided in one place (`validate`) rather than split between serde and the checks. The
// ---- CLI shorthand writes its flags into the same TOML shape, so it meets the same checks.

/// The sections; [`RawConfig::read`] fills them key by key, so that one mistake cannot hide
/// the others.
#[derive(Default)]
struct RawConfig {
    server: RawServer,
    listener: Vec<RawListener>,
    limits: RawLimits,
    timeouts: RawTimeouts,
    route: Vec<RawRoute>,
    upstream: BTreeMap<String, RawUpstream>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawServer {
    cores: Option<u64>,
    admin: Option<String>,
    admin_token: Option<String>,
    log_format: Option<String>,
    io_backend: Option<String>,
    drain_timeout: Option<DurationText>,
    read_buffers: Option<u64>,
    park_reads_after: Option<DurationText>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawListener {
    address: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawLimits {
    handshake_timeout: Option<DurationText>,
    max_header_bytes: Option<u64>,
    max_message: Option<u64>,
    max_frame: Option<u64>,
    max_connections: Option<u64>,
    max_connections_per_ip: Option<u64>,
    write_buffer: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawTimeouts {
    connect: Option<DurationText>,
    close: Option<DurationText>,
    idle: Option<DurationText>,
    ping_interval: Option<DurationText>,
    pong_timeout: Option<DurationText>,
    write: Option<DurationText>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawRoute {
    host: Option<String>,
    path_prefix: Option<String>,
    upstream: Option<String>,
    origins: Option<Vec<String>>,
    max_message: Option<u64>,
    max_frame: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawUpstream {
    backends: Vec<String>,
    balance: Option<String>,
    hash_key: Option<String>,
    eject_after: Option<u32>,
    eject_for: Option<DurationText>,
    health_interval: Option<DurationText>,
    health_path: Option<String>,
    health_timeout: Option<DurationText>,
}

/// Reads one document into the raw sections, reporting what does not fit.
struct Reader<'a> {
    text: &'a str,
    p: &'a mut Problems,
}

impl Reader<'_> {
    /// The 1-based line a span starts on.
    fn line(&self, span: Option<std::ops::Range<usize>>) -> Option<usize> {
        let start = span?.start;
        Some(self.text.get(..start)?.matches('\n').count() + 1)
    }

    /// A `[section]` (or an inline table), read key by key: each key is deserialized on its
    /// own, so every unknown key and every value of the wrong type is reported, not only the
    /// first; they are left out of what is returned.
    fn section<T: DeserializeOwned + Default>(
        &mut self,
        item: &toml_edit::Item,
        at: &str,
        line: Option<usize>,
    ) -> T {
        let Some(table) = item.as_table_like() else {
            self.p.add_at(at, line, format!("must be a table: [{at}]"));
            return T::default();
        };
        self.keys(table, at, line)
    }

    /// [`Reader::section`] on a table known to be one.
    fn keys<T: DeserializeOwned + Default>(
        &mut self,
        table: &dyn toml_edit::TableLike,
        at: &str,
        line: Option<usize>,
    ) -> T {
        let mut fitting = toml_edit::InlineTable::new();
        for (key, item) in table.iter() {
            let Ok(value) = item.clone().into_value() else {
                continue;
            };
            let mut alone = toml_edit::InlineTable::new();
            alone.insert(key, value.clone());
            match T::deserialize(toml_edit::Value::InlineTable(alone).into_deserializer()) {
                Ok(_) => {
                    fitting.insert(key, value);
                }
                Err(e) => {
                    let line = self.line(table.get_key_value(key).and_then(|(k, _)| k.span()));
                    let field = format!("{at}.{}", toml_key(key));
                    self.p.add_at(field, line, plain_serde_message(e.message()));
                }
            }
        }
        // Each key fits on its own and every field is optional, so together they fit too.
        T::deserialize(toml_edit::Value::InlineTable(fitting).into_deserializer()).unwrap_or_else(
            |e| {
                self.p.add_at(at, line, plain_serde_message(e.message()));
                T::default()
            },
        )
    }

    /// A `[[section]]` list (or an array of inline tables), each entry read as a section
    /// named `at[i]`.
    fn array<T: DeserializeOwned + Default>(
        &mut self,
        item: &toml_edit::Item,
        at: &str,
        line: Option<usize>,
    ) -> Vec<T> {
        if let Some(tables) = item.as_array_of_tables() {
            return tables
                .iter()
                .enumerate()
                .map(|(i, table)| {
                    let line = self.line(table.span()).or(line);
                    self.keys(table, &format!("{at}[{i}]"), line)
                })
                .collect();
        }
        if let Some(array) = item.as_array()
            && array.iter().all(toml_edit::Value::is_inline_table)
        {
            return array
                .iter()
                .filter_map(toml_edit::Value::as_inline_table)
                .enumerate()
                .map(|(i, table)| self.keys(table, &format!("{at}[{i}]"), line))
                .collect();
        }
        self.p.add_at(
            at,
            line,
            format!("must be a list of tables: write [[{at}]], not [{at}]"),
        );
        Vec::new()
    }
}

/// A key as it is written in a key path: bare when it can be, else quoted.
fn toml_key(key: &str) -> String {
    if is_bare_name(key) {
        key.to_owned()
    } else {
        format!("{key:?}")
    }
}

/// serde's words for integer types, in the file's terms.
fn plain_serde_message(message: &str) -> String {
    message
        .replace("expected u64", "expected a non-negative integer")
        .replace("expected u32", "expected a non-negative integer")
}

/// A duration as written: a string for [`parse_duration`], or a bare integer (seconds). The
/// CLI passes its duration flags through as these, so they are checked where the file's are.
#[derive(Clone, Debug)]
pub(crate) struct DurationText(String);

impl From<Duration> for DurationText {
    /// `10s`, `0s`, or `250ms` for a fraction of a second (whole milliseconds: the defaults).
    fn from(d: Duration) -> Self {
        if d.subsec_nanos() == 0 {
            Self(format!("{}s", d.as_secs()))
        } else {
            Self(format!("{}ms", d.as_millis()))
        }
    }
}

impl FromStr for DurationText {
    type Err = std::convert::Infallible;

    /// Any text; [`parse_duration`] judges it during validation.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Ok(Self(text.to_owned()))
    }
}

impl fmt::Display for DurationText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for DurationText {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Text;
        impl Visitor<'_> for Text {
            type Value = DurationText;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration like \"250ms\", \"10s\" or \"2m\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<DurationText, E> {
                Ok(DurationText(v.to_owned()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<DurationText, E> {
                Ok(DurationText(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<DurationText, E> {
                u64::try_from(v)
                    .map(|v| DurationText(v.to_string()))
                    .map_err(|_| E::invalid_value(de::Unexpected::Signed(v), &self))
            }
        }
        deserializer.deserialize_any(Text)
    }
}

/// Collects every problem, so one `--check-config` run reports them all.
struct Problems {
    lines: Vec<String>,
    /// The fields already reported. One problem per field, the first: a later one is its
    /// consequence (a value of the wrong type is left out, then found missing).
    fields: Vec<String>,
    /// How messages name a key path: as itself for a file, as the flag that set it for the
    /// CLI shorthand (`None`: as itself).
    name: fn(&str) -> Option<&'static str>,
}

impl Default for Problems {
    fn default() -> Self {
        Self::naming(|_| None)
    }
}

impl Problems {
    /// Problems whose fields `name` renames (the CLI's flags).
    fn naming(name: fn(&str) -> Option<&'static str>) -> Self {
        Self {
            lines: Vec::new(),
            fields: Vec::new(),
            name,
        }
    }

    fn add(&mut self, field: impl fmt::Display, why: impl fmt::Display) {
        self.add_at(field, None, why);
    }

    /// A problem with the line of the file it is on, where known.
    fn add_at(&mut self, field: impl fmt::Display, line: Option<usize>, why: impl fmt::Display) {
        let field = field.to_string();
        let field = (self.name)(&field).map_or(field, str::to_owned);
        if self.fields.contains(&field) {
            return;
        }
        self.lines.push(match line {
            Some(n) => format!("{field} (line {n}): {why}"),
            None => format!("{field}: {why}"),
        });
        self.fields.push(field);
    }

    fn duration(
        &mut self,
        field: &str,
        value: Option<&DurationText>,
        default: Duration,
    ) -> Duration {
        let Some(DurationText(text)) = value else {
            return default;
        };
        parse_duration(text).unwrap_or_else(|e| {
            self.add(field, e);
            default
        })
    }

    /// A duration that must not be zero (a zero timeout would fail every attempt).
    fn positive(
        &mut self,
        field: &str,
        value: Option<&DurationText>,
        default: Duration,
    ) -> Duration {
        let d = self.duration(field, value, default);
        if d.is_zero() {
            let text = value.map_or("0", |t| &t.0);
            self.add(field, format!("{text:?} must be more than 0"));
            return default;
        }
        d
    }

    /// A duration where 0 means off.
    fn optional(
        &mut self,
        field: &str,
        value: Option<&DurationText>,
        default: Duration,
    ) -> Option<Duration> {
        Some(self.duration(field, value, default)).filter(|d| !d.is_zero())
    }

    fn at_least(&mut self, field: &str, value: Option<u64>, default: u64, min: u64) -> u64 {
        match value {
            Some(v) if v < min => {
                self.add(field, format!("{v} must be at least {min}"));
                default
            }
            Some(v) => v,
            None => default,
        }
    }

    fn finish<T>(self, value: T) -> Result<T, ConfigError> {
        let mut lines = self.lines;
        match lines.len() {
            0 => Ok(value),
            1 => Err(ConfigError(lines.remove(0))),
            n => Err(ConfigError(format!(
                "{n} problems:\n  {}",
                lines.join("\n  ")
            ))),
        }
    }
}

impl RawConfig {
    /// Reads a document's sections: what does not fit (an unknown section or key, a value of
    /// the wrong type, a section of the wrong shape) is reported with its key path and line and
    /// left out, and the rest is read. `text` is the document's source, for line numbers.
    fn read(doc: &toml_edit::Table, text: &str, p: &mut Problems) -> Self {
        let mut r = Reader { text, p };
        let mut raw = Self::default();
        for (key, item) in doc {
            let line = r.line(doc.key(key).and_then(toml_edit::Key::span));
            match key {
                "server" => raw.server = r.section(item, key, line),
                "limits" => raw.limits = r.section(item, key, line),
                "timeouts" => raw.timeouts = r.section(item, key, line),
                "listener" => raw.listener = r.array(item, key, line),
                "route" => raw.route = r.array(item, key, line),
                "upstream" => {
                    let Some(pools) = item.as_table_like() else {
                        r.p.add_at(key, line, "must be tables like [upstream.NAME]");
                        continue;
                    };
                    for (name, pool) in pools.iter() {
                        let line = r.line(pools.get_key_value(name).and_then(|(k, _)| k.span()));
                        let pool = r.section(pool, &upstream_field(name), line);
                        raw.upstream.insert(name.to_owned(), pool);
                    }
                }
                _ if item.is_table_like() => r.p.add_at(
                    toml_key(key),
                    line,
                    format!("unknown section, expected one of {SECTIONS}"),
                ),
                _ => r.p.add_at(
                    toml_key(key),
                    line,
                    format!("unknown key outside any section; keys belong in {SECTIONS}"),
                ),
            }
        }
        raw
    }

    /// Validates everything, adding to the problems `read` found.
    fn validate(self, mut p: Problems) -> Result<Config, ConfigError> {
        let server = self.server.validate(&mut p);
        let listeners = validate_listeners(&self.listener, server.admin, &mut p);
        let global_limits = self.limits.validate(&mut p);
        let timeouts = self.timeouts.validate(&mut p);
        let pools: Vec<Pool> = self
            .upstream
            .iter()
            .map(|(name, raw)| raw.validate(name, &mut p))
            .collect();
        let routes = validate_routes(&self.route, &pools, global_limits.message, &mut p);
        p.finish(Config::assemble(
            server,
            listeners,
            global_limits,
            timeouts,
            routes,
            pools,
        ))
    }
}

impl RawServer {
    fn validate(&self, p: &mut Problems) -> Server {
        let cores = self.cores.map(|n| {
            if n == 0 {
                p.add(
                    "server.cores",
                    "0 must be at least 1 (omit it to use every available core)",
                );
            }
            n as usize
        });
        let admin = self.admin.as_deref().and_then(|a| {
            bind_address(a, "127.0.0.1:9090")
                .map_err(|e| p.add("server.admin", e))
                .ok()
        });
        // The value is a secret: the message never repeats it.
        let admin_token = self.admin_token.as_deref().and_then(|t| {
            crate::admin::AdminToken::new(t)
                .map_err(|why| p.add("server.admin_token", why))
                .ok()
        });
        let log_format = match self.log_format.as_deref() {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => {
                p.add(
                    "server.log_format",
                    format!("{other:?} must be \"text\" or \"json\""),
                );
                LogFormat::Text
            }
        };
        let io_backend = match self.io_backend.as_deref() {
            None => crate::driver::IoBackend::default(),
            Some(name) => crate::driver::IoBackend::parse(name).unwrap_or_else(|| {
                p.add(
                    "server.io_backend",
                    format!("{name:?} must be \"auto\", \"uring\" or \"epoll\""),
                );
                crate::driver::IoBackend::default()
            }),
        };
        let drain_timeout = p.duration(
            "server.drain_timeout",
            self.drain_timeout.as_ref(),
            DEFAULT_DRAIN_TIMEOUT,
        );
        let read_buffers = match self.read_buffers {
            None => DEFAULT_READ_BUFFERS,
            Some(n) => u16::try_from(n)
                .ok()
                .filter(|n| n.is_power_of_two() && *n <= 1 << 15)
                .unwrap_or_else(|| {
                    p.add(
                        "server.read_buffers",
                        format!("{n} must be a power of two from 1 to 32768"),
                    );
                    DEFAULT_READ_BUFFERS
                }),
        };
        let park_reads_after = p.optional(
            "server.park_reads_after",
            self.park_reads_after.as_ref(),
            DEFAULT_PARK_READS_AFTER,
        );
        Server {
            cores,
            admin,
            admin_token,
            log_format,
            io_backend,
            drain_timeout,
            read_buffers,
            park_reads_after,
        }
    }
}

fn validate_listeners(
    raw: &[RawListener],
    admin: Option<SocketAddr>,
    p: &mut Problems,
) -> Vec<SocketAddr> {
    if raw.is_empty() {
        p.add(
            "listener",
            "none declared; add at least one [[listener]] with an address",
        );
    }
    let mut listeners: Vec<SocketAddr> = Vec::with_capacity(raw.len());
    for (i, l) in raw.iter().enumerate() {
        let field = format!("listener[{i}].address");
        let Some(text) = l.address.as_deref() else {
            p.add(field, "missing; give an ip:port like \"0.0.0.0:8080\"");
            continue;
        };
        let addr = match bind_address(text, "0.0.0.0:8080") {
            Ok(addr) => addr,
            Err(e) => {
                p.add(field, e);
                continue;
            }
        };
        if let Some(j) = listeners.iter().position(|&other| overlaps(addr, other)) {
            p.add(
                field,
                format!("{text:?} overlaps listener[{j}] ({})", listeners[j]),
            );
        }
        listeners.push(addr);
    }
    if let Some(admin) = admin
        && let Some(j) = listeners.iter().position(|&l| overlaps(admin, l))
    {
        p.add(
            "server.admin",
            format!("\"{admin}\" overlaps listener[{j}] ({})", listeners[j]),
        );
    }
    listeners
}

/// An address to bind, `ip:port`. A host name is refused rather than resolved: it may name
/// several addresses (`localhost` is `127.0.0.1` and `::1`) or change, and a listener binds one
/// local address, so the file should say which.
fn bind_address(text: &str, example: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = text.parse() {
        return Ok(addr);
    }
    let named_host = text.rsplit_once(':').is_some_and(|(host, port)| {
        !host.is_empty() && !host.contains(':') && port.parse::<u16>().is_ok()
    });
    Err(if named_host {
        format!(
            "{text:?}: the host must be an IP address, like {example:?} (names such as \
             localhost are not resolved: say which address to bind)"
        )
    } else {
        format!("{text:?} must be an ip:port address like {example:?}")
    })
}

/// Two listeners that would share a port: with `SO_REUSEPORT` the second bind succeeds
/// silently and the kernel splits clients between them, so catch it here. Port 0 never
/// overlaps (each gets its own ephemeral port).
fn overlaps(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() != 0
        && a.port() == b.port()
        && a.is_ipv4() == b.is_ipv4()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

impl RawLimits {
    fn validate(&self, p: &mut Problems) -> GlobalLimits {
        let default = DEFAULT_MAX_MESSAGE;
        let handshake_timeout = p.positive(
            "limits.handshake_timeout",
            self.handshake_timeout.as_ref(),
            DEFAULT_HANDSHAKE_TIMEOUT,
        );
        let max_bytes = p.at_least(
            "limits.max_header_bytes",
            self.max_header_bytes,
            DEFAULT_MAX_HEADER_BYTES,
            MIN_HEADER_BYTES,
        );
        let max_message = p.at_least("limits.max_message", self.max_message, default, 1);
        let max_frame = p.at_least("limits.max_frame", self.max_frame, default, 1);
        let max_connections = p.at_least(
            "limits.max_connections",
            self.max_connections,
            DEFAULT_MAX_CONNECTIONS,
            1,
        );
        let max_connections_per_ip = p.at_least(
            "limits.max_connections_per_ip",
            self.max_connections_per_ip,
            DEFAULT_MAX_CONNECTIONS_PER_IP,
            0,
        );
        let mut write_buffer = p.at_least(
            "limits.write_buffer",
            self.write_buffer,
            DEFAULT_WRITE_BUFFER,
            MIN_WRITE_BUFFER,
        );
        if write_buffer > MAX_WRITE_BUFFER {
            p.add(
                "limits.write_buffer",
                format!("{write_buffer} must be at most {MAX_WRITE_BUFFER}"),
            );
            write_buffer = DEFAULT_WRITE_BUFFER;
        }
        GlobalLimits {
            handshake_timeout,
            head_limits: HeadLimits {
                max_bytes: max_bytes as usize,
                ..HeadLimits::DEFAULT
            },
            max_connections: max_connections as usize,
            max_connections_per_ip: per_ip_limit(max_connections_per_ip),
            write_buffer: write_buffer as usize,
            message: codec::Limits::new(max_message, max_frame),
        }
    }
}

impl RawTimeouts {
    fn validate(&self, p: &mut Problems) -> Timeouts {
        Timeouts {
            connect: p.positive(
                "timeouts.connect",
                self.connect.as_ref(),
                DEFAULT_CONNECT_TIMEOUT,
            ),
            close: p.positive("timeouts.close", self.close.as_ref(), DEFAULT_CLOSE_TIMEOUT),
            idle: p.optional("timeouts.idle", self.idle.as_ref(), DEFAULT_IDLE_TIMEOUT),
            ping_interval: p.optional(
                "timeouts.ping_interval",
                self.ping_interval.as_ref(),
                DEFAULT_PING_INTERVAL,
            ),
            pong_timeout: p.positive(
                "timeouts.pong_timeout",
                self.pong_timeout.as_ref(),
                DEFAULT_PONG_TIMEOUT,
            ),
            write: Some(p.duration("timeouts.write", self.write.as_ref(), DEFAULT_WRITE_TIMEOUT))
                .filter(|d| !d.is_zero()),
        }
    }
}

/// `upstream.NAME` as a TOML key path (quoted when the name is not a bare key).
fn upstream_field(name: &str) -> String {
    format!("upstream.{}", toml_key(name))
}

/// Pool names show up in logs and metric labels, so keep them to TOML's bare-key characters.
fn is_bare_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl RawUpstream {
    fn validate(&self, name: &str, p: &mut Problems) -> Pool {
        let at = upstream_field(name);
        if name.eq_ignore_ascii_case(ECHO) {
            p.add(
                &at,
                format!("the name {name:?} is reserved for the embedded echo upstream"),
            );
        } else if !is_bare_name(name) {
            p.add(&at, "the name must be letters, digits, '-' or '_'");
        }
        if self.backends.is_empty() {
            p.add(
                format!("{at}.backends"),
                "empty; list at least one ws://host:port[/path]",
            );
        }
        let mut backends: Vec<BackendUrl> = Vec::with_capacity(self.backends.len());
        for (i, text) in self.backends.iter().enumerate() {
            let field = format!("{at}.backends[{i}]");
            match text.parse::<BackendUrl>() {
                Ok(b) => {
                    if let Some(j) = backends.iter().position(|o| o.to_string() == b.to_string()) {
                        p.add(field, format!("{text:?} repeats backends[{j}]"));
                    }
                    backends.push(b);
                }
                Err(e) => p.add(field, e),
            }
        }
        let balance = self.balance(&at, p);
        let eject_after = self.eject_after.unwrap_or(DEFAULT_EJECT_AFTER);
        let eject_for = if eject_after == 0 {
            p.duration(
                &format!("{at}.eject_for"),
                self.eject_for.as_ref(),
                DEFAULT_EJECT_FOR,
            )
        } else {
            p.positive(
                &format!("{at}.eject_for"),
                self.eject_for.as_ref(),
                DEFAULT_EJECT_FOR,
            )
        };
        let interval = p.optional(
            &format!("{at}.health_interval"),
            self.health_interval.as_ref(),
            Duration::ZERO,
        );
        let path = self.health_path.clone().unwrap_or_else(|| "/".to_owned());
        if !path.starts_with('/') || path.contains(char::is_whitespace) {
            p.add(
                format!("{at}.health_path"),
                format!("{path:?} must be a request target starting with /"),
            );
        }
        let timeout = p.positive(
            &format!("{at}.health_timeout"),
            self.health_timeout.as_ref(),
            DEFAULT_HEALTH_TIMEOUT,
        );
        Pool {
            name: name.to_owned(),
            backends,
            balance,
            eject_after,
            eject_for,
            health: interval.map(|interval| HealthCheck {
                interval,
                path,
                timeout,
            }),
        }
    }

    fn balance(&self, at: &str, p: &mut Problems) -> Balance {
        let written = self.balance.as_deref().unwrap_or("round-robin");
        let balance = match written {
            "round-robin" => Balance::RoundRobin,
            "least-connections" => Balance::LeastConnections,
            "hash" => {
                let key = self
                    .hash_key
                    .as_deref()
                    .map_or(Ok(HashKey::ClientIp), parse_hash_key);
                Balance::Hash(key.unwrap_or_else(|e| {
                    p.add(format!("{at}.hash_key"), e);
                    HashKey::ClientIp
                }))
            }
            other => {
                p.add(
                    format!("{at}.balance"),
                    format!("{other:?} must be round-robin, least-connections or hash"),
                );
                return Balance::RoundRobin;
            }
        };
        if let Some(key) = &self.hash_key
            && !matches!(balance, Balance::Hash(_))
        {
            p.add(
                format!("{at}.hash_key"),
                format!("{key:?} needs balance = \"hash\" (balance is {written:?})"),
            );
        }
        balance
    }
}

fn parse_hash_key(text: &str) -> Result<HashKey, String> {
    let invalid = || format!("{text:?} must be \"ip\", \"header:NAME\" or \"cookie:NAME\"");
    if text == "ip" {
        return Ok(HashKey::ClientIp);
    }
    let (kind, name) = text.split_once(':').ok_or_else(invalid)?;
    if name.is_empty() || !name.bytes().all(is_token_byte) {
        return Err(format!("{text:?}: {name:?} is not a valid {kind} name"));
    }
    match kind {
        "header" => Ok(HashKey::Header(name.to_owned())),
        "cookie" => Ok(HashKey::Cookie(name.to_owned())),
        _ => Err(invalid()),
    }
}

/// RFC 9110 `tchar`: what a header or cookie name may contain.
fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn validate_routes(
    raw: &[RawRoute],
    pools: &[Pool],
    global: codec::Limits,
    p: &mut Problems,
) -> Vec<Route> {
    if raw.is_empty() {
        p.add(
            "route",
            "none declared; add at least one [[route]] (upstream = \"echo\" for the embedded echo)",
        );
    }
    let mut routes: Vec<Route> = Vec::with_capacity(raw.len());
    for (i, r) in raw.iter().enumerate() {
        let at = format!("route[{i}]");
        let host = r.host.as_deref().and_then(|h| {
            HostPattern::parse(h)
                .map_err(|e| p.add(format!("{at}.host"), e))
                .ok()
        });
        let path_prefix = r.path_prefix.as_deref().map_or_else(
            || "/".to_owned(),
            |text| {
                path_prefix(text).unwrap_or_else(|e| {
                    p.add(format!("{at}.path_prefix"), e);
                    "/".to_owned()
                })
            },
        );
        let upstream = match r.upstream.as_deref() {
            None => {
                p.add(
                    format!("{at}.upstream"),
                    "missing; name an [upstream.NAME] or \"echo\"",
                );
                Upstream::Echo
            }
            Some(ECHO) => Upstream::Echo,
            Some(name) => {
                if let Some(index) = pools.iter().position(|pool| pool.name == name) {
                    Upstream::Pool(index)
                } else {
                    let declared = if pools.is_empty() {
                        "none".to_owned()
                    } else {
                        let names: Vec<&str> =
                            pools.iter().map(|pool| pool.name.as_str()).collect();
                        names.join(", ")
                    };
                    p.add(
                        format!("{at}.upstream"),
                        format!("{name:?} is not a declared upstream (declared: {declared})"),
                    );
                    Upstream::Echo
                }
            }
        };
        if let Some(origins) = &r.origins {
            if origins.is_empty() {
                p.add(
                    format!("{at}.origins"),
                    "[] would refuse every client; omit the key to allow any origin",
                );
            }
            for (j, origin) in origins.iter().enumerate() {
                if let Err(e) = check_origin(origin) {
                    p.add(format!("{at}.origins[{j}]"), e);
                }
            }
        }
        let limits = codec::Limits::new(
            p.at_least(
                &format!("{at}.max_message"),
                r.max_message,
                global.max_message,
                1,
            ),
            p.at_least(&format!("{at}.max_frame"), r.max_frame, global.max_frame, 1),
        );
        let route = Route {
            host,
            path_prefix,
            upstream,
            origins: r.origins.clone(),
            limits,
        };
        if let Some(j) = routes
            .iter()
            .position(|o| o.host == route.host && o.path_prefix == route.path_prefix)
        {
            let host = route
                .host
                .as_ref()
                .map_or("any".to_owned(), ToString::to_string);
            p.add(
                at,
                format!(
                    "host {host} and path_prefix {:?} repeat route[{j}], which would always win",
                    route.path_prefix
                ),
            );
        }
        routes.push(route);
    }
    routes
}

/// `/chat/` is stored as `/chat`: prefixes match whole segments either way.
fn path_prefix(text: &str) -> Result<String, String> {
    if !text.starts_with('/') {
        return Err(format!("{text:?} must start with /"));
    }
    if text.contains(['?', '#']) || text.contains(char::is_whitespace) {
        return Err(format!(
            "{text:?} must be a plain path (no query, fragment or spaces)"
        ));
    }
    // Requests are matched on their normalised path, so a prefix is normalised the same way
    // (`/%61dmin` is `/admin`); one no request could ever match is an error.
    let normal = codec::target::normalize_path(text).map_err(|e| format!("{text:?}: {e}"))?;
    let trimmed = normal.trim_end_matches('/');
    Ok(if trimmed.is_empty() { "/" } else { trimmed }.to_owned())
}

/// An allow-list entry that can never equal a browser's `Origin` header is a mistake to report.
fn check_origin(origin: &str) -> Result<(), String> {
    if origin == "null" {
        return Ok(());
    }
    let well_formed = origin.split_once("://").is_some_and(|(scheme, authority)| {
        !scheme.is_empty()
            && !authority.is_empty()
            && !authority.contains(['/', '?', '#'])
            && !origin.contains(char::is_whitespace)
    });
    if !well_formed {
        return Err(format!(
            "{origin:?} must be scheme://host[:port] with no path, as browsers send it"
        ));
    }
    if origin.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(format!(
            "{origin:?} must be lowercase: browsers send origins lowercased, so it never matches"
        ));
    }
    Ok(())
}

/// `max_connections_per_ip = 0` means no per-IP limit.
fn per_ip_limit(configured: u64) -> usize {
    if configured == 0 {
        usize::MAX
    } else {
        configured as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../../gateway.example.toml");

    fn err(text: &str) -> String {
        Config::from_toml(text).unwrap_err().to_string()
    }

    /// A valid config plus `extra`, so each error test changes one thing.
    fn with(extra: &str) -> String {
        format!("[[listener]]\naddress = \"127.0.0.1:8080\"\n{extra}")
    }

    const ECHO_ROUTE: &str = "[[route]]\nupstream = \"echo\"\n";
    const CHAT: &str = "[upstream.chat]\nbackends = [\"ws://127.0.0.1:1\"]\n";

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(60) * 2));
        assert!(parse_duration("2h").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration(&format!("{}m", u64::MAX)).is_err());
    }

    #[test]
    fn backend_urls() {
        let b: BackendUrl = "ws://127.0.0.1:9001/chat/".parse().unwrap();
        assert_eq!(b.addr, "127.0.0.1:9001".parse().unwrap());
        assert_eq!(b.path_prefix, "/chat");
        assert_eq!(b.authority, "127.0.0.1:9001");
        assert_eq!(b.to_string(), "ws://127.0.0.1:9001/chat");
        let b: BackendUrl = "ws://127.0.0.1".parse().unwrap();
        assert_eq!(b.addr.port(), 80);
        let b: BackendUrl = "ws://[::1]:9002".parse().unwrap();
        assert_eq!(b.addr, "[::1]:9002".parse().unwrap());
        assert_eq!(
            "http://x".parse::<BackendUrl>(),
            Err("\"http://x\" must be ws://host:port[/path]".to_owned())
        );
        assert!(
            "wss://x"
                .parse::<BackendUrl>()
                .unwrap_err()
                .contains("wss://")
        );
        assert!("ws://:9001".parse::<BackendUrl>().is_err());
        assert!("ws://h/p?q".parse::<BackendUrl>().is_err());
        assert!(
            "ws://127.0.0.1:99999"
                .parse::<BackendUrl>()
                .unwrap_err()
                .contains("port")
        );
    }

    #[test]
    fn example_file_parses_and_says_what_it_means() {
        let c = Config::from_toml(EXAMPLE).unwrap();
        assert_eq!(
            c.server,
            Server {
                cores: Some(2),
                admin: Some("127.0.0.1:9090".parse().unwrap()),
                admin_token: None,
                log_format: LogFormat::Text,
                io_backend: crate::driver::IoBackend::Auto,
                drain_timeout: Duration::from_secs(10),
                read_buffers: 64,
                park_reads_after: Some(Duration::from_secs(5)),
            }
        );
        assert_eq!(c.listeners, vec!["0.0.0.0:8080".parse().unwrap()]);
        let l = c.global_limits;
        assert_eq!(l.handshake_timeout, Duration::from_secs(10));
        assert_eq!(l.head_limits.max_bytes, 8192);
        assert_eq!(l.message, codec::Limits::new(64 << 20, 64 << 20));
        assert_eq!(
            (l.max_connections, l.max_connections_per_ip, l.write_buffer),
            (10_000, 256, 65_536)
        );
        assert_eq!(
            c.timeouts,
            Timeouts {
                connect: Duration::from_secs(5),
                close: Duration::from_secs(5),
                idle: None,
                ping_interval: None,
                pong_timeout: Duration::from_secs(10),
                write: Some(Duration::from_secs(30)),
            }
        );

        let names: Vec<_> = c.pools.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["chat", "feed"]);
        let chat = &c.pools[0];
        assert_eq!(chat.backends.len(), 2);
        assert_eq!(chat.backends[1].to_string(), "ws://10.0.0.2:9001/prefix");
        assert_eq!(chat.balance, Balance::RoundRobin);
        assert_eq!(
            (chat.eject_after, chat.eject_for),
            (3, Duration::from_secs(30))
        );
        assert_eq!(chat.health, None);
        let feed = &c.pools[1];
        assert_eq!(
            feed.balance,
            Balance::Hash(HashKey::Header("X-User-Id".to_owned()))
        );
        assert_eq!(
            feed.health,
            Some(HealthCheck {
                interval: Duration::from_secs(15),
                path: "/health".to_owned(),
                timeout: Duration::from_secs(2),
            })
        );

        assert_eq!(c.routes.len(), 3);
        let chat_route = &c.routes[0];
        assert_eq!(
            chat_route.host,
            Some(HostPattern::Exact("chat.example.com".to_owned()))
        );
        assert_eq!(chat_route.path_prefix, "/chat");
        assert_eq!(chat_route.upstream, Upstream::Pool(0));
        assert_eq!(
            chat_route.origins.as_deref(),
            Some(&["https://chat.example.com".to_owned()][..])
        );
        assert_eq!(chat_route.limits, codec::Limits::new(1 << 20, 1 << 20));
        assert_eq!(c.routes[1].upstream, Upstream::Pool(1));
        assert_eq!(c.routes[1].limits, l.message);
        assert_eq!(c.routes[2].upstream, Upstream::Echo);
        assert_eq!(c.upstream_name(c.routes[1].upstream), "feed");
        assert_eq!(c.upstream_name(c.routes[2].upstream), "echo");

        let to = |host, path| c.route(host, path).map(|r| c.upstream_name(r.upstream));
        assert_eq!(to("chat.example.com", "/chat/room?id=1"), Some("chat"));
        assert_eq!(to("live.example.com:443", "/feed"), Some("feed"));
        assert_eq!(to("anything", "/echo"), Some("echo"));
        assert_eq!(to("chat.example.com", "/chatter"), None);
    }

    #[test]
    fn minimal_config_gets_every_default() {
        let c = Config::from_toml(&with(ECHO_ROUTE)).unwrap();
        assert_eq!(c.server.cores, None);
        assert_eq!(c.server.admin, None);
        let l = c.global_limits;
        assert_eq!(l.handshake_timeout, DEFAULT_HANDSHAKE_TIMEOUT);
        assert_eq!(l.head_limits, HeadLimits::DEFAULT);
        assert_eq!(l.message, codec::Limits::default());
        assert_eq!(l.max_connections_per_ip, usize::MAX);
        assert_eq!(l.write_buffer, 64 << 10);
        assert_eq!(
            c.timeouts,
            Timeouts {
                connect: DEFAULT_CONNECT_TIMEOUT,
                close: DEFAULT_CLOSE_TIMEOUT,
                idle: None,
                ping_interval: None,
                pong_timeout: DEFAULT_PONG_TIMEOUT,
                write: Some(DEFAULT_WRITE_TIMEOUT),
            }
        );
        assert_eq!(c.server.log_format, LogFormat::Text);
        assert_eq!(c.server.drain_timeout, Duration::from_secs(10));
        assert_eq!(c.global_limits.max_connections, 100_000);
        assert_eq!(c.timeouts.pong_timeout, Duration::from_secs(10));
        assert_eq!(c.routes[0].path_prefix, "/");
        assert_eq!(c.routes[0].limits, codec::Limits::default());
        assert!(c.routes[0].allows_origin(None));
    }

    #[test]
    fn pool_defaults_and_integer_durations() {
        let c = Config::from_toml(&with(
            "[[route]]\nupstream = \"a\"\n[upstream.a]\nbackends = [\"ws://127.0.0.1:1\"]\n\
             eject_after = 0\n[upstream.unused]\nbackends = [\"ws://127.0.0.1:2\"]\n\
             [timeouts]\nconnect = 7\nidle = \"90s\"\nping_interval = \"250ms\"\nwrite = \"0s\"\n",
        ))
        .unwrap();
        let a = &c.pools[0];
        assert_eq!(a.balance, Balance::RoundRobin);
        assert_eq!(a.eject_after, 0, "0 = never eject, allowed");
        assert_eq!(a.health, None);
        assert_eq!(c.pools[1].name, "unused", "unused pools are allowed");
        assert_eq!(c.timeouts.connect, Duration::from_secs(7));
        assert_eq!(c.timeouts.idle, Some(Duration::from_secs(90)));
        assert_eq!(c.timeouts.ping_interval, Some(Duration::from_millis(250)));
        assert_eq!(c.timeouts.write, None, "0 = never");
    }

    #[test]
    fn errors_name_field_value_and_reason() {
        let pools = "[upstream.chat]\nbackends = [\"ws://127.0.0.1:1\"]\n\
                     [upstream.feed]\nbackends = [\"ws://127.0.0.1:2\"]\n";
        let cases = [
            (
                format!(
                    "{ECHO_ROUTE}[[route]]\npath_prefix = \"/x\"\nupstream = \"chatt\"\n{pools}"
                ),
                "route[1].upstream: \"chatt\" is not a declared upstream (declared: chat, feed)",
            ),
            (
                format!("{ECHO_ROUTE}[upstream.chat]\nbackends = [\"http://x\"]\n"),
                "upstream.chat.backends[0]: \"http://x\" must be ws://host:port[/path]",
            ),
            (
                format!("{ECHO_ROUTE}[limits]\nmax_message = 0\n"),
                "limits.max_message: 0 must be at least 1",
            ),
            (
                format!("{ECHO_ROUTE}[[listener]]\naddress = \"127.0.0.1:8080\"\n"),
                "listener[1].address: \"127.0.0.1:8080\" overlaps listener[0] (127.0.0.1:8080)",
            ),
            (
                format!("{ECHO_ROUTE}[[listener]]\naddress = \"0.0.0.0:8080\"\n"),
                "listener[1].address: \"0.0.0.0:8080\" overlaps listener[0] (127.0.0.1:8080)",
            ),
            (
                format!("{ECHO_ROUTE}[upstream.chat]\nbackends = []\n"),
                "upstream.chat.backends: empty; list at least one ws://host:port[/path]",
            ),
            (
                format!("{ECHO_ROUTE}{CHAT}hash_key = \"ip\"\n"),
                r#"upstream.chat.hash_key: "ip" needs balance = "hash" (balance is "round-robin")"#,
            ),
            (
                format!("{ECHO_ROUTE}{CHAT}balance = \"hash\"\nhash_key = \"user\"\n"),
                r#"upstream.chat.hash_key: "user" must be "ip", "header:NAME" or "cookie:NAME""#,
            ),
            (
                format!("{ECHO_ROUTE}{CHAT}balance = \"random\"\n"),
                "upstream.chat.balance: \"random\" must be round-robin, least-connections or hash",
            ),
            (
                format!("{ECHO_ROUTE}[upstream.echo]\nbackends = [\"ws://127.0.0.1:1\"]\n"),
                "upstream.echo: the name \"echo\" is reserved for the embedded echo upstream",
            ),
            (
                format!("{ECHO_ROUTE}[server]\ncores = 0\n"),
                "server.cores: 0 must be at least 1 (omit it to use every available core)",
            ),
            (
                format!("{ECHO_ROUTE}[server]\nlog_format = \"xml\"\n"),
                "server.log_format: \"xml\" must be \"text\" or \"json\"",
            ),
            (
                format!("{ECHO_ROUTE}[server]\nio_backend = \"kqueue\"\n"),
                "server.io_backend: \"kqueue\" must be \"auto\", \"uring\" or \"epoll\"",
            ),
            (
                format!("{ECHO_ROUTE}[timeouts]\nconnect = \"5x\"\n"),
                "timeouts.connect: \"5x\" is not a duration like 250ms, 10s or 2m",
            ),
            (
                format!("{ECHO_ROUTE}[timeouts]\nclose = \"0s\"\n"),
                "timeouts.close: \"0s\" must be more than 0",
            ),
            (
                format!("{ECHO_ROUTE}{ECHO_ROUTE}"),
                "route[1]: host any and path_prefix \"/\" repeat route[0], which would always win",
            ),
        ];
        for (text, expected) in &cases {
            assert_eq!(err(&with(text)), *expected, "for:\n{text}");
        }
        // Several problems are reported together, one per line.
        let many = err(
            "[[route]]\nupstream = \"echo\"\nhost = \"a.com:80\"\norigins = [\"https://a.com/\"]\n",
        );
        assert_eq!(
            many,
            "3 problems:\n  \
             listener: none declared; add at least one [[listener]] with an address\n  \
             route[0].host: \"a.com:80\" must not include a port (the request's port is \
             ignored when matching)\n  \
             route[0].origins[0]: \"https://a.com/\" must be scheme://host[:port] with no \
             path, as browsers send it"
        );
    }

    #[test]
    fn more_field_errors() {
        let e = err(&with(
            "[[route]]\nupstream = \"echo\"\npath_prefix = \"chat\"\n",
        ));
        assert_eq!(e, "route[0].path_prefix: \"chat\" must start with /");
        let e = err(&with(
            "[[route]]\nupstream = \"echo\"\nhost = \"a.*.com\"\n",
        ));
        assert!(
            e.starts_with("route[0].host: \"a.*.com\": a wildcard"),
            "{e}"
        );
        let e = err(&with("[[route]]\nupstream = \"echo\"\norigins = []\n"));
        assert!(e.starts_with("route[0].origins: [] would refuse"), "{e}");
        let e = err(&with("[[route]]\nupstream = \"echo\"\nmax_frame = 0\n"));
        assert_eq!(e, "route[0].max_frame: 0 must be at least 1");
        let e = err(&with("[[route]]\nupstream = \"nope\"\n"));
        assert_eq!(
            e,
            "route[0].upstream: \"nope\" is not a declared upstream (declared: none)"
        );
        let e = err("[[listener]]\naddress = \"localhost\"\n[[route]]\nupstream = \"echo\"\n");
        assert!(
            e.starts_with("listener[0].address: \"localhost\" must be an ip:port"),
            "{e}"
        );
        let e = err(&with(&format!(
            "{ECHO_ROUTE}[server]\nadmin = \"127.0.0.1:8080\"\n"
        )));
        assert!(
            e.starts_with("server.admin: \"127.0.0.1:8080\" overlaps listener[0]"),
            "{e}"
        );
        let e = err(&with(&format!(
            "{ECHO_ROUTE}[limits]\nmax_header_bytes = 100\n"
        )));
        assert_eq!(e, "limits.max_header_bytes: 100 must be at least 256");
        let e = err(&with(&format!(
            "{ECHO_ROUTE}[upstream.a]\nbackends = [\"ws://127.0.0.1:1\", \"ws://127.0.0.1:1/\"]\n"
        )));
        assert_eq!(
            e,
            "upstream.a.backends[1]: \"ws://127.0.0.1:1/\" repeats backends[0]"
        );
        let e = err(&with(&format!(
            "{ECHO_ROUTE}[upstream.a]\nbackends = [\"ws://127.0.0.1:1\"]\neject_for = \"0s\"\n"
        )));
        assert_eq!(e, "upstream.a.eject_for: \"0s\" must be more than 0");
        let e = err(&with(&format!(
            "{ECHO_ROUTE}[upstream.a]\nbackends = [\"ws://127.0.0.1:1\"]\nbalance = \"hash\"\n\
             hash_key = \"header:X User\"\n"
        )));
        assert_eq!(
            e,
            "upstream.a.hash_key: \"header:X User\": \"X User\" is not a valid header name"
        );
    }

    #[test]
    fn hash_keys() {
        assert_eq!(parse_hash_key("ip"), Ok(HashKey::ClientIp));
        assert_eq!(
            parse_hash_key("header:X-User-Id"),
            Ok(HashKey::Header("X-User-Id".to_owned()))
        );
        assert_eq!(
            parse_hash_key("cookie:session"),
            Ok(HashKey::Cookie("session".to_owned()))
        );
        assert!(parse_hash_key("cookie:").is_err());
        assert!(parse_hash_key("query:x").is_err());
        let c = Config::from_toml(&with(
            "[[route]]\nupstream = \"a\"\n[upstream.a]\nbackends = [\"ws://127.0.0.1:1\"]\n\
             balance = \"hash\"\n",
        ))
        .unwrap();
        assert_eq!(c.pools[0].balance, Balance::Hash(HashKey::ClientIp));
    }

    #[test]
    fn toml_errors_name_key_and_line() {
        let e = err(&with("[[route]]\nupstream = \"echo\"\nupsteam = \"x\"\n"));
        assert_eq!(
            e,
            "route[0].upsteam (line 5): unknown field `upsteam`, expected one of `host`, \
             `path_prefix`, `upstream`, `origins`, `max_message`, `max_frame`"
        );
        let e = err(&with(&format!(
            "{ECHO_ROUTE}[limits]\nmax_message = \"big\"\n"
        )));
        assert_eq!(
            e,
            "limits.max_message (line 6): invalid type: string \"big\", expected a \
             non-negative integer"
        );
        // Syntax errors stop the parse; toml's message has the line, column and a snippet.
        let e = err("[[listener]\n");
        assert!(e.contains("line 1, column"), "{e}");
        let e = err(&with(&format!("{ECHO_ROUTE}[timeouts]\nconnect = -1\n")));
        assert!(
            e.starts_with("timeouts.connect (line 6): invalid value: integer `-1`")
                && e.contains("a duration like"),
            "{e}"
        );
        let e = err(&with(&format!("{ECHO_ROUTE}[sever]\ncores = 1\n")));
        assert_eq!(
            e,
            format!("sever (line 5): unknown section, expected one of {SECTIONS}")
        );
        let e = err(&with("[route]\nupstream = \"echo\"\n"));
        assert_eq!(
            e,
            "route (line 3): must be a list of tables: write [[route]], not [route]"
        );
    }

    /// Inline tables are the same TOML as sections, and are read (and checked) the same way.
    #[test]
    fn inline_tables_read_like_sections() {
        let c = Config::from_toml(
            "listener = [{ address = \"127.0.0.1:1\" }]\nroute = [{ upstream = \"echo\" }]\n\
             limits = { max_message = 10 }\n",
        )
        .unwrap();
        assert_eq!(c.listeners, vec!["127.0.0.1:1".parse().unwrap()]);
        assert_eq!(
            c.routes[0].limits,
            codec::Limits::new(10, DEFAULT_MAX_MESSAGE)
        );
        let e =
            err("listener = [{ adress = \"127.0.0.1:1\" }]\nroute = [{ upstream = \"echo\" }]\n");
        assert_eq!(
            e,
            "2 problems:\n  \
             listener[0].adress (line 1): unknown field `adress`, expected `address`\n  \
             listener[0].address: missing; give an ip:port like \"0.0.0.0:8080\""
        );
    }

    /// Past syntax, one run reports every mistake: unknown keys anywhere, wrong types, bad
    /// values, each once, with its key path.
    #[test]
    fn every_mistake_in_one_run() {
        let e = err(&with(
            "cores = 2\n\
             [server]\ncores = \"two\"\nadmn = \"127.0.0.1:9\"\n\
             [limits]\nmax_conections = 5\nwrite_buffer = 0\n\
             [[route]]\nupstream = 5\norigin = [\"https://a.com\"]\n\
             [upstream.a]\nbackends = [\"ws://127.0.0.1:1\"]\nhealth = \"1s\"\n\
             [upstream.b]\nbackend = [\"ws://127.0.0.1:1\"]\n",
        ));
        let top = err(&format!("cores = 2\n{}", with(ECHO_ROUTE)));
        assert_eq!(
            top,
            format!("cores (line 1): unknown key outside any section; keys belong in {SECTIONS}")
        );
        let lines: Vec<&str> = e.lines().collect();
        assert_eq!(lines[0], "10 problems:", "{e}");
        let expected = [
            // `with` starts with a [[listener]], so this key lands in it.
            "listener[0].cores (line 3): unknown field `cores`, expected `address`",
            "server.cores (line 5): invalid type: string \"two\", expected a non-negative",
            "server.admn (line 6): unknown field `admn`, expected one of `cores`, `admin`",
            "limits.max_conections (line 8): unknown field `max_conections`",
            "route[0].upstream (line 11): invalid type: integer `5`, expected a string",
            "route[0].origin (line 12): unknown field `origin`",
            "upstream.a.health (line 15): unknown field `health`",
            "upstream.b.backend (line 17): unknown field `backend`",
            "limits.write_buffer: 0 must be at least 128",
        ];
        for want in expected {
            assert!(
                lines.iter().any(|l| l.trim_start().starts_with(want)),
                "no line starting {want:?} in:\n{e}"
            );
        }
        // The wrong-typed upstream is reported once, not again as missing; [upstream.b] lost
        // its only key, so its backends are empty.
        assert!(!e.contains("route[0].upstream: missing"), "{e}");
        assert!(e.contains("upstream.b.backends: empty"), "{e}");
    }

    #[test]
    fn load_names_the_file() {
        let path = std::env::temp_dir().join(format!("gateway-config-{}.toml", std::process::id()));
        std::fs::write(&path, with("[limits]\nmax_message = 0\n") + ECHO_ROUTE).unwrap();
        let e = Config::load(&path).unwrap_err().to_string();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(
            e,
            format!(
                "{}: limits.max_message: 0 must be at least 1",
                path.display()
            )
        );
        let e = Config::load(&path).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!("{}: cannot read: ", path.display())),
            "{e}"
        );
    }

    fn routes(list: &[(Option<&str>, &str)]) -> Config {
        let mut text = with("");
        for (host, prefix) in list {
            text += "[[route]]\n";
            if let Some(host) = host {
                text = text + "host = \"" + host + "\"\n";
            }
            text = text + "path_prefix = \"" + prefix + "\"\nupstream = \"echo\"\n";
        }
        Config::from_toml(&text).unwrap()
    }

    /// The index of the route chosen for `host` and `path`.
    fn pick(c: &Config, host: &str, path: &str) -> Option<usize> {
        c.route(host, path)
            .map(|r| c.routes.iter().position(|o| std::ptr::eq(o, r)).unwrap())
    }

    #[test]
    fn host_specificity_beats_path_length() {
        let c = routes(&[
            (None, "/chat/room"),
            (Some("*.example.com"), "/"),
            (Some("chat.example.com"), "/"),
            (Some("*.eu.example.com"), "/"),
        ]);
        assert_eq!(pick(&c, "chat.example.com", "/chat/room"), Some(2));
        assert_eq!(pick(&c, "feed.example.com", "/chat/room"), Some(1));
        assert_eq!(
            pick(&c, "a.eu.example.com", "/"),
            Some(3),
            "longer wildcard wins"
        );
        assert_eq!(
            pick(&c, "example.com", "/chat/room"),
            Some(0),
            "*. needs a label"
        );
        assert_eq!(pick(&c, "other.org", "/chat/room"), Some(0));
        assert_eq!(pick(&c, "other.org", "/"), None);
    }

    #[test]
    fn host_matching_ignores_case_port_and_trailing_dot() {
        let c = routes(&[
            (Some("Chat.Example.COM"), "/"),
            (Some("*.Example.com"), "/w"),
        ]);
        assert_eq!(pick(&c, "chat.example.com", "/"), Some(0));
        assert_eq!(pick(&c, "CHAT.EXAMPLE.COM:8443", "/"), Some(0));
        assert_eq!(pick(&c, "chat.example.com.", "/"), Some(0));
        assert_eq!(pick(&c, "A.B.EXAMPLE.COM:80", "/w"), Some(1));
        assert_eq!(pick(&c, "chat.example.org", "/"), None);
        let c = routes(&[(Some("[::1]"), "/")]);
        assert_eq!(pick(&c, "[::1]:8080", "/"), Some(0));
        assert_eq!(pick(&c, "[::2]:8080", "/"), None);
    }

    #[test]
    fn longest_prefix_on_segment_boundaries() {
        let c = routes(&[(None, "/"), (None, "/chat"), (None, "/chat/admin/")]);
        assert_eq!(
            c.routes[2].path_prefix, "/chat/admin",
            "trailing slash is dropped"
        );
        assert_eq!(pick(&c, "h", "/chat"), Some(1));
        assert_eq!(pick(&c, "h", "/chat/"), Some(1));
        assert_eq!(pick(&c, "h", "/chat/x"), Some(1));
        assert_eq!(pick(&c, "h", "/chat?q=1"), Some(1));
        assert_eq!(pick(&c, "h", "/chatter"), Some(0));
        assert_eq!(pick(&c, "h", "/chat/admin"), Some(2));
        assert_eq!(pick(&c, "h", "/chat/admin?x"), Some(2));
        assert_eq!(pick(&c, "h", "/chat/administrator"), Some(1));
        assert_eq!(pick(&c, "h", "/Chat"), Some(0), "paths are case-sensitive");
        let c = routes(&[(None, "/chat")]);
        assert_eq!(pick(&c, "h", "/"), None);
        assert_eq!(pick(&c, "h", "/chatter"), None);
    }

    #[test]
    fn origins() {
        let c = Config::from_toml(&with(
            r#"[[route]]
upstream = "echo"
origins = ["https://a.com", "http://b.com:8080"]
"#,
        ))
        .unwrap();
        let r = &c.routes[0];
        assert!(r.allows_origin(Some(b"https://a.com")));
        assert!(r.allows_origin(Some(b"http://b.com:8080")));
        assert!(!r.allows_origin(Some(b"https://evil.com")));
        assert!(!r.allows_origin(Some(b"https://a.com.evil.com")));
        assert!(!r.allows_origin(None));
        assert!(
            check_origin("https://A.com")
                .unwrap_err()
                .contains("lowercase")
        );
    }
}
