//! Command-line options and the validated configuration the workers share.
#![forbid(unsafe_code)]

use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::str::FromStr;
use std::time::Duration;

use clap::Parser;

/// A WebSocket reverse proxy that parses and validates every frame.
///
/// With no --backend, connections are served by an embedded echo upstream, so
/// `gateway` alone shows the whole client path working.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
pub(crate) struct Args {
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
}

/// A parsed `ws://` backend address.
#[derive(Clone, Debug)]
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

    fn from_str(url: &str) -> Result<Self, String> {
        let rest = url
            .strip_prefix("ws://")
            .ok_or_else(|| format!("{url:?}: only ws:// backends are supported"))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        let with_port = if authority
            .rsplit_once(':')
            .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        {
            authority.to_owned()
        } else {
            format!("{authority}:80")
        };
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
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 10s"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "" | "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(format!("{text:?}: unit must be ms, s or m")),
    }
}

/// What every connection actor needs to know; shared read-only by all cores.
#[derive(Debug)]
pub(crate) struct Config {
    pub(crate) backends: Vec<BackendUrl>,
    pub(crate) handshake_timeout: Duration,
    pub(crate) connect_timeout: Duration,
    pub(crate) close_timeout: Duration,
    pub(crate) limits: codec::Limits,
    pub(crate) head_limits: codec::handshake::HeadLimits,
}

impl Config {
    pub(crate) fn from_args(args: &Args) -> Self {
        Self {
            backends: args.backends.clone(),
            handshake_timeout: args.handshake_timeout,
            connect_timeout: args.connect_timeout,
            close_timeout: args.close_timeout,
            limits: codec::Limits::new(args.max_message, args.max_message),
            head_limits: codec::handshake::HeadLimits {
                max_bytes: args.max_header_bytes,
                ..codec::handshake::HeadLimits::default()
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("2h").is_err());
        assert!(parse_duration("s").is_err());
    }

    #[test]
    fn backend_urls() {
        let b: BackendUrl = "ws://127.0.0.1:9001/chat/".parse().unwrap();
        assert_eq!(b.addr, "127.0.0.1:9001".parse().unwrap());
        assert_eq!(b.path_prefix, "/chat");
        assert_eq!(b.authority, "127.0.0.1:9001");
        let b: BackendUrl = "ws://127.0.0.1".parse().unwrap();
        assert_eq!(b.addr.port(), 80);
        assert!("http://x".parse::<BackendUrl>().is_err());
    }
}
