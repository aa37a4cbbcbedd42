//! The upstream leg's request and its failures: the headers a backend receives, which
//! failures count against a backend (passive ejection) and which are the gateway's own.
//!
//! - `balance.rs`: the order a pool's backends are tried in, and passive ejection;
//! - `health.rs`: active health checks, on their own thread.
#![forbid(unsafe_code)]

pub(crate) mod balance;
pub(crate) mod health;

use std::io;
use std::net::SocketAddr;

use codec::handshake::{ClientHandshake, HandshakeError, UpgradeRequest};

use crate::config::reload::PoolRuntime;
use crate::config::{BackendUrl, Pool};
use crate::upstream::balance::Failure;

/// Client headers passed to the backend unchanged (the WebSocket ones travel separately).
const FORWARDED_HEADERS: [&str; 4] = ["Origin", "Cookie", "Authorization", "User-Agent"];

/// Largest non-101 answer (head and body) passed from a backend to the client.
pub(crate) const MAX_REJECTION: usize = 64 * 1024;

/// A backend connect that failed for want of the gateway's own resources: not the backend's
/// fault, so it neither counts toward ejecting the backend nor is worth trying on another.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum LocalError {
    /// EMFILE: this process holds as many descriptors as its limit allows.
    Emfile,
    /// ENFILE: the system holds as many open files as it allows.
    Enfile,
    /// ENOMEM: the kernel could not allocate memory for the socket.
    Enomem,
    /// ENOBUFS: the kernel had no buffer space for the socket.
    Enobufs,
    /// EADDRNOTAVAIL: no free local port (the ephemeral range is used up) or local address.
    Eaddrnotavail,
}

impl LocalError {
    /// Every variant, in the order of [`LocalError::index`].
    pub(crate) const ALL: [Self; 5] = [
        Self::Emfile,
        Self::Enfile,
        Self::Enomem,
        Self::Enobufs,
        Self::Eaddrnotavail,
    ];

    /// The local error behind `e`, if it is one (by its OS error number).
    pub(crate) fn of(e: &io::Error) -> Option<Self> {
        match e.raw_os_error()? {
            libc::EMFILE => Some(Self::Emfile),
            libc::ENFILE => Some(Self::Enfile),
            libc::ENOMEM => Some(Self::Enomem),
            libc::ENOBUFS => Some(Self::Enobufs),
            libc::EADDRNOTAVAIL => Some(Self::Eaddrnotavail),
            _ => None,
        }
    }

    /// Position in [`LocalError::ALL`] (for a table of counters).
    pub(crate) const fn index(self) -> usize {
        self as usize
    }

    /// The errno's name in lower case (a metric label).
    pub(crate) const fn as_str(self) -> &'static str {
        match self {
            Self::Emfile => "emfile",
            Self::Enfile => "enfile",
            Self::Enomem => "enomem",
            Self::Enobufs => "enobufs",
            Self::Eaddrnotavail => "eaddrnotavail",
        }
    }

    /// What the client is told (the body of its 503).
    pub(crate) const fn explain(self) -> &'static str {
        match self {
            Self::Emfile => "the gateway is out of file descriptors",
            Self::Enfile => "the system is out of file descriptors",
            Self::Enomem | Self::Enobufs => "the gateway is out of socket memory",
            Self::Eaddrnotavail => "the gateway is out of local ports",
        }
    }
}

/// Why no upstream leg could be established.
pub(crate) enum UpstreamError {
    /// No backend accepted a TCP connection in time (or none was available to try).
    Unreachable,
    /// The gateway could not open a connection for want of its own resources.
    Local {
        /// Which backend it was connecting to.
        backend: usize,
        /// Which resource ran out.
        why: LocalError,
        /// The OS error, for the log line.
        error: io::Error,
    },
    /// A backend answered with something that is not a valid 101.
    BadHandshake(usize, HandshakeError),
    /// A backend timed out or dropped the connection during its handshake.
    HandshakeFailed(usize),
    /// A backend refused the upgrade; its answer is passed on to the client verbatim.
    Rejected {
        /// Which backend.
        backend: usize,
        /// Its status code.
        status: u16,
        /// Its response head and as much of the body as arrived (at most 64 KiB).
        response: Vec<u8>,
    },
}

impl UpstreamError {
    /// The status the client sees (a rejection keeps the backend's own).
    pub(crate) fn status(&self) -> u16 {
        match self {
            Self::Rejected { status, .. } => *status,
            // Not a bad gateway: this one is briefly overloaded, and the backends are fine.
            Self::Local { .. } => 503,
            Self::Unreachable | Self::BadHandshake(..) | Self::HandshakeFailed(_) => 502,
        }
    }
}

/// The headers the backend receives besides the WebSocket ones.
fn upstream_headers(req: &UpgradeRequest, client: SocketAddr) -> Vec<(&'static str, Vec<u8>)> {
    let mut headers: Vec<(&'static str, Vec<u8>)> = FORWARDED_HEADERS
        .iter()
        .filter_map(|&name| req.header(name).map(|v| (name, v.to_vec())))
        .collect();
    let ip = client.ip().to_string();
    let xff = match req.header("X-Forwarded-For") {
        Some(prior) => [prior, b", ", ip.as_bytes()].concat(),
        None => ip.clone().into_bytes(),
    };
    headers.push(("X-Forwarded-For", xff));
    headers.push(("X-Forwarded-Proto", b"http".to_vec()));
    headers.push(("X-Forwarded-Host", req.host.clone().into_bytes()));
    let node = if client.is_ipv6() {
        format!("[{ip}]")
    } else {
        ip
    };
    let mut forwarded = String::from("for=");
    forwarded_value(&mut forwarded, &node);
    forwarded.push_str(";host=");
    forwarded_value(&mut forwarded, &req.host);
    forwarded.push_str(";proto=http");
    headers.push(("Forwarded", forwarded.into_bytes()));
    headers
}

/// Appends a `Forwarded` value as RFC 7239 section 4 writes it: a token as it is, anything else
/// (an IPv6 node, a host with a port) as a quoted-string with `"` and `\` escaped (RFC 7230
/// quoted-pair). Controls other than tab cannot be quoted and are dropped; `parse_request` has
/// already refused them in `Host`.
fn forwarded_value(out: &mut String, value: &str) {
    let tchar = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    if !value.is_empty() && value.chars().all(tchar) {
        out.push_str(value);
        return;
    }
    out.push('"');
    for c in value.chars().filter(|&c| c == '\t' || !c.is_control()) {
        if matches!(c, '"' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
}

/// Counts a failure of backend `index` during `stage` (`connect` or `upgrade`) toward its
/// ejection and logs it with `why`; when it ejects the backend, says so on a line of its own,
/// with the last error, the failures in a row and the cool-down.
pub(crate) fn backend_failed(
    pool: &Pool,
    runtime: &PoolRuntime,
    index: usize,
    stage: &str,
    why: &str,
) {
    let backend = &pool.backends[index];
    let failure = runtime.state.record_failure(index, pool);
    let failures = match failure {
        Failure::Counted(n) | Failure::Ejected(n) => n,
        // Late news of an attempt begun before the ejection: the streak restarted there.
        Failure::Extended => 0,
    };
    tracing::warn!(upstream = pool.name, backend = %backend, why, failures, "backend {stage} failed");
    if let Failure::Ejected(failures) = failure {
        tracing::warn!(
            upstream = pool.name,
            backend = %backend,
            why,
            failures,
            eject_for_ms = u64::try_from(pool.eject_for.as_millis()).unwrap_or(u64::MAX),
            "backend ejected"
        );
    }
}

/// The upgrade request for `backend` on behalf of `req`'s client, and the client side of the
/// handshake that checks the backend's answer.
pub(crate) fn request(
    backend: &BackendUrl,
    req: &UpgradeRequest,
    client: SocketAddr,
    capacity: usize,
) -> (ClientHandshake, Vec<u8>) {
    let mut hs = ClientHandshake::new();
    let headers = upstream_headers(req, client);
    let extra: Vec<(&str, &[u8])> = headers.iter().map(|(n, v)| (*n, v.as_slice())).collect();
    let path = format!("{}{}", backend.path_prefix, req.path);
    let mut buf = Vec::with_capacity(capacity);
    hs.write_request(
        &mut buf,
        &backend.authority,
        &path,
        req.protocols.as_deref(),
        req.extensions.as_deref(),
        &extra,
    );
    (hs, buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_errors_are_told_by_errno() {
        for (i, why) in LocalError::ALL.into_iter().enumerate() {
            assert_eq!(why.index(), i);
        }
        let os = |n| io::Error::from_raw_os_error(n);
        assert_eq!(LocalError::of(&os(libc::EMFILE)), Some(LocalError::Emfile));
        assert_eq!(LocalError::of(&os(libc::ENFILE)), Some(LocalError::Enfile));
        assert_eq!(LocalError::of(&os(libc::ENOMEM)), Some(LocalError::Enomem));
        assert_eq!(
            LocalError::of(&os(libc::ENOBUFS)),
            Some(LocalError::Enobufs)
        );
        assert_eq!(
            LocalError::of(&os(libc::EADDRNOTAVAIL)),
            Some(LocalError::Eaddrnotavail)
        );
        // The backend's side of things: refused, unreachable, reset, timed out.
        for n in [
            libc::ECONNREFUSED,
            libc::EHOSTUNREACH,
            libc::ENETUNREACH,
            libc::ECONNRESET,
        ] {
            assert_eq!(LocalError::of(&os(n)), None, "errno {n}");
        }
        let timeout = io::Error::new(io::ErrorKind::TimedOut, "connect timed out");
        assert_eq!(LocalError::of(&timeout), None);
    }

    #[test]
    fn forwarding_headers() {
        let raw = b"GET /chat?x=1 HTTP/1.1\r\nHost: example.com\r\nUpgrade: websocket\r\n\
            Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
            Sec-WebSocket-Version: 13\r\nOrigin: http://example.com\r\nCookie: a=b\r\n\
            X-Forwarded-For: 10.0.0.1\r\nX-Secret: no\r\n\r\n";
        let (req, _) =
            codec::handshake::parse_request(raw, &codec::handshake::HeadLimits::default())
                .unwrap()
                .unwrap();
        let headers = upstream_headers(&req, "192.0.2.7:5555".parse().unwrap());
        let get = |name: &str| {
            headers
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
        };
        assert_eq!(get("Origin").as_deref(), Some("http://example.com"));
        assert_eq!(get("Cookie").as_deref(), Some("a=b"));
        assert_eq!(
            get("X-Forwarded-For").as_deref(),
            Some("10.0.0.1, 192.0.2.7")
        );
        assert_eq!(get("X-Forwarded-Host").as_deref(), Some("example.com"));
        assert_eq!(
            get("Forwarded").as_deref(),
            Some("for=192.0.2.7;host=example.com;proto=http")
        );
        assert_eq!(get("X-Secret"), None);
        let v6 = upstream_headers(&req, "[::1]:5555".parse().unwrap());
        assert!(
            v6.iter()
                .any(|(n, v)| *n == "Forwarded" && v.starts_with(b"for=\"[::1]\""))
        );
    }

    #[test]
    fn forwarded_values_are_tokens_or_quoted_strings() {
        let cases = [
            ("example.com", "example.com"),
            ("example.com:8080", "\"example.com:8080\""),
            ("[::1]:8080", "\"[::1]:8080\""),
            ("a;b,c=d", "\"a;b,c=d\""),
            // Values parse_request refuses, in case a caller ever passes one.
            ("weird\\", "\"weird\\\\\""),
            ("say \"hi\"", "\"say \\\"hi\\\"\""),
            ("a\r\nb", "\"ab\""),
            ("", "\"\""),
        ];
        for (value, want) in cases {
            let mut out = String::new();
            forwarded_value(&mut out, value);
            assert_eq!(out, want, "{value:?}");
        }
    }
}
