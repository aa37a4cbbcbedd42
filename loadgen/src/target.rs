//! The server under test: a `ws://` URL resolved once, before any thread starts, so name
//! resolution never lands inside a latency measurement.

use std::net::{SocketAddr, ToSocketAddrs as _};

/// Where to connect and what to put in the upgrade request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Target {
    /// The URL as given, for the report.
    pub(crate) url: String,
    /// The first address the host resolved to.
    pub(crate) addr: SocketAddr,
    /// The `Host` header: the URL's authority, port included when it was written.
    pub(crate) host: String,
    /// Path and query, `/` when the URL has none.
    pub(crate) path: String,
}

/// The pieces of a `ws://` URL before resolution.
#[derive(Debug, PartialEq, Eq)]
struct Parts<'a> {
    authority: &'a str,
    host: &'a str,
    port: u16,
    path: &'a str,
}

fn split(url: &str) -> Result<Parts<'_>, String> {
    let Some(rest) = url.strip_prefix("ws://") else {
        return Err(if url.starts_with("wss://") {
            "wss:// is not supported: loadgen speaks plain ws:// (put TLS in front)".into()
        } else {
            format!("`{url}` is not a ws:// URL")
        });
    };
    let (authority, path) = match rest.find(['/', '?']) {
        Some(i) if rest.as_bytes()[i] == b'/' => (&rest[..i], &rest[i..]),
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.contains('@') {
        return Err("user info in the URL is not supported".into());
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let end = v6.find(']').ok_or("unterminated IPv6 address in URL")?;
        let after = &v6[end + 1..];
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p),
            None if after.is_empty() => None,
            None => return Err(format!("unexpected `{after}` after IPv6 address")),
        };
        (&v6[..end], port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err(format!("`{url}` has no host"));
    }
    let port = match port {
        Some(p) => p.parse().map_err(|_| format!("`{p}` is not a port"))?,
        None => 80,
    };
    Ok(Parts {
        authority,
        host,
        port,
        path,
    })
}

impl Target {
    /// Parses and resolves `url`.
    pub(crate) fn resolve(url: &str) -> Result<Self, String> {
        let parts = split(url)?;
        let addr = (parts.host, parts.port)
            .to_socket_addrs()
            .map_err(|e| format!("cannot resolve `{}`: {e}", parts.host))?
            .next()
            .ok_or_else(|| format!("`{}` resolved to no address", parts.host))?;
        let path = if parts.path.starts_with('?') {
            format!("/{}", parts.path)
        } else {
            parts.path.to_owned()
        };
        Ok(Self {
            url: url.to_owned(),
            addr,
            host: parts.authority.to_owned(),
            path,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_host_port_and_path() {
        assert_eq!(
            split("ws://127.0.0.1:8080/echo?x=1").unwrap(),
            Parts {
                authority: "127.0.0.1:8080",
                host: "127.0.0.1",
                port: 8080,
                path: "/echo?x=1",
            }
        );
        let p = split("ws://localhost").unwrap();
        assert_eq!((p.host, p.port, p.path), ("localhost", 80, "/"));
        let p = split("ws://[::1]:9000/").unwrap();
        assert_eq!((p.host, p.port, p.authority), ("::1", 9000, "[::1]:9000"));
    }

    #[test]
    fn rejects_what_it_cannot_speak() {
        assert!(split("wss://x/").unwrap_err().contains("not supported"));
        assert!(split("http://x/").is_err());
        assert!(split("ws://:80/").is_err());
        assert!(split("ws://h:port/").is_err());
        assert!(split("ws://[::1/").is_err());
    }

    #[test]
    fn resolves_loopback_and_normalises_query_only_paths() {
        let t = Target::resolve("ws://127.0.0.1:9?q").unwrap();
        assert_eq!(t.addr, "127.0.0.1:9".parse().unwrap());
        assert_eq!(t.path, "/?q");
        assert_eq!(t.host, "127.0.0.1:9");
    }
}
