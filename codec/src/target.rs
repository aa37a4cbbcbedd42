//! The request target and `Host` of an upgrade request, made safe to route on.
//!
//! A proxy that routes on the raw path and forwards it unchanged can be bypassed: a backend
//! that normalises `/chat/../admin` or `/%61dmin` serves `/admin` although the proxy applied
//! the rules of `/`. So the path is normalised here once (RFC 3986 section 6.2.2: decode the
//! escapes of unreserved characters, upper-case the others, remove dot segments as section
//! 5.2.4 says) and repeated slashes are merged; the gateway routes on that path and sends the
//! backend that same path. Targets that no normalisation makes unambiguous (an encoded slash,
//! a backslash, NUL, a climb above the root) are refused instead.
#![forbid(unsafe_code)]

use std::fmt;
use std::net::Ipv6Addr;

/// Why a request target was refused; every one answers 400.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TargetError {
    /// Not origin-form (`/path[?query]`): `*`, absolute-form or authority-form.
    NotOriginForm,
    /// A fragment (`#`), which a request target never carries (RFC 7230 section 5.3).
    Fragment,
    /// A `%` not followed by two hex digits.
    BadEscape,
    /// `%2F`: backends disagree on whether it separates segments.
    EncodedSlash,
    /// `\` or `%5C`: some backends read it as `/`.
    Backslash,
    /// `%00`: C backends end the path there.
    Nul,
    /// A dot segment with parameters (`..;x`), which servlet containers read as `..`.
    DotSegmentParameters,
    /// `..` above the root, as in `/../x`.
    AboveRoot,
}

impl TargetError {
    /// A short, stable description for logs and the 400 body.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::NotOriginForm => "request target must be an absolute path (origin-form)",
            Self::Fragment => "request target holds a fragment (#)",
            Self::BadEscape => "request path holds a malformed percent-escape",
            Self::EncodedSlash => "request path holds an encoded slash (%2F)",
            Self::Backslash => "request path holds a backslash",
            Self::Nul => "request path holds an encoded NUL (%00)",
            Self::DotSegmentParameters => "request path holds a dot segment with parameters",
            Self::AboveRoot => "request path climbs above the root",
        }
    }
}

impl fmt::Display for TargetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::error::Error for TargetError {}

/// Normalises an origin-form request target: the path as [`normalize_path`] does, the query
/// (from the first `?`) kept exactly as it came, since its meaning is the application's.
pub fn normalize_target(target: &str) -> Result<String, TargetError> {
    if target.contains('#') {
        return Err(TargetError::Fragment);
    }
    let (path, query) = target.split_at(target.find('?').unwrap_or(target.len()));
    let mut out = normalize_path(path)?;
    out.push_str(query);
    Ok(out)
}

/// Normalises an absolute path (no query): unreserved escapes decoded, other escapes' hex in
/// upper case, repeated slashes merged, `.` and `..` segments removed (a trailing one leaves a
/// trailing slash, as RFC 3986 section 5.2.4 does). The result starts with `/`, never holds
/// `//` or a dot segment, is never longer than the input, and normalises to itself.
pub fn normalize_path(path: &str) -> Result<String, TargetError> {
    let Some(rest) = path.strip_prefix('/') else {
        return Err(TargetError::NotOriginForm);
    };
    let decoded = decode_unreserved(rest)?;
    // Byte offsets into `decoded` where each kept segment starts: `..` truncates to the last.
    let mut out = String::with_capacity(decoded.len() + 1);
    let mut starts: Vec<usize> = Vec::new();
    let mut trailing_slash = false;
    for segment in decoded.split('/') {
        // An empty segment is a repeated (or the trailing) slash.
        trailing_slash = matches!(segment, "" | "." | "..");
        match segment {
            "" | "." => {}
            ".." => match starts.pop() {
                Some(start) => out.truncate(start),
                None => return Err(TargetError::AboveRoot),
            },
            _ if is_dot_with_parameters(segment) => {
                return Err(TargetError::DotSegmentParameters);
            }
            _ => {
                starts.push(out.len());
                out.push('/');
                out.push_str(segment);
            }
        }
    }
    if out.is_empty() || trailing_slash {
        out.push('/');
    }
    Ok(out)
}

/// `.;x` or `..;x`: Tomcat and Jetty strip the parameters and then see a dot segment.
fn is_dot_with_parameters(segment: &str) -> bool {
    segment
        .split_once(';')
        .is_some_and(|(name, _)| matches!(name, "." | ".."))
}

/// Decodes `%XX` where it encodes an unreserved character, upper-cases the hex of the rest,
/// and refuses the escapes and bytes no backend agrees on.
fn decode_unreserved(path: &str) -> Result<String, TargetError> {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        // Copy the run up to the next `%` or `\` (both ASCII, so the cut is a char boundary).
        let run = bytes[i..]
            .iter()
            .position(|&b| b == b'%' || b == b'\\')
            .map_or(bytes.len(), |n| i + n);
        out.push_str(&path[i..run]);
        i = run;
        match bytes.get(i) {
            None => break,
            Some(b'\\') => return Err(TargetError::Backslash),
            Some(_) => {}
        }
        let (Some(hi), Some(lo)) = (
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) else {
            return Err(TargetError::BadEscape);
        };
        match (hi << 4) | lo {
            b'/' => return Err(TargetError::EncodedSlash),
            b'\\' => return Err(TargetError::Backslash),
            0 => return Err(TargetError::Nul),
            b if is_unreserved(b) => out.push(char::from(b)),
            b => {
                const HEX: &[u8; 16] = b"0123456789ABCDEF";
                out.push('%');
                out.push(char::from(HEX[usize::from(b >> 4)]));
                out.push(char::from(HEX[usize::from(b & 15)]));
            }
        }
        i += 3;
    }
    Ok(out)
}

fn hex(b: u8) -> Option<u8> {
    char::from(b).to_digit(16).map(|d| d as u8)
}

/// RFC 3986 `unreserved`: the characters whose escaped and literal forms are equivalent.
const fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Whether a `Host` value is `host[:port]` by RFC 3986 section 3.2.2: a reg-name (which
/// includes IPv4 addresses) or a bracketed IPv6 address, then an optional decimal port.
///
/// Stricter than the RFC in one way: a reg-name may not hold percent-escapes, so no spelling
/// of a name can slip past a route that names the host (no HTTP client sends one; IDNs travel
/// as punycode).
#[must_use]
pub fn is_valid_host(host: &[u8]) -> bool {
    let (name, port) = if let Some(rest) = host.strip_prefix(b"[") {
        let Some(end) = rest.iter().position(|&b| b == b']') else {
            return false;
        };
        let ipv6 = std::str::from_utf8(&rest[..end]).is_ok_and(|a| a.parse::<Ipv6Addr>().is_ok());
        if !ipv6 {
            return false;
        }
        match &rest[end + 1..] {
            [] => return true,
            [b':', port @ ..] => (None, port),
            _ => return false,
        }
    } else {
        match host.iter().rposition(|&b| b == b':') {
            Some(colon) => (Some(&host[..colon]), &host[colon + 1..]),
            None => (Some(host), &[][..]),
        }
    };
    let name_ok = name.is_none_or(|n| {
        !n.is_empty()
            && n.iter()
                .all(|&b| is_unreserved(b) || b"!$&'()*+,;=".contains(&b))
    });
    // RFC 3986 allows an empty port (`host:`); a present one must fit 16 bits.
    let port_ok = port.len() <= 5
        && port.iter().all(u8::is_ascii_digit)
        && port
            .iter()
            .fold(0_u32, |n, &d| n * 10 + u32::from(d - b'0'))
            <= 65_535;
    name_ok && port_ok
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attack_paths_normalise_to_admin() {
        for raw in [
            "/chat/../admin",
            "/chat/%2e%2e/admin",
            "/chat/%2E%2E/admin",
            "/chat/.%2e/admin",
            "/%61dmin",
            "//admin",
            "/./admin",
            "/%2e/admin",
            "///chat//..//admin",
        ] {
            assert_eq!(normalize_path(raw).as_deref(), Ok("/admin"), "{raw}");
        }
    }

    #[test]
    fn normal_forms() {
        let cases = [
            ("/", "/"),
            ("//", "/"),
            ("/.", "/"),
            ("/a/..", "/"),
            ("/a/b/..", "/a/"),
            ("/a/.", "/a/"),
            ("/a/", "/a/"),
            ("/a//", "/a/"),
            ("/a/b/../c/./d", "/a/c/d"),
            ("/%7euser/%41%2a%3f", "/~user/A%2A%3F"),
            ("/a%25b", "/a%25b"),
            ("/a.b/..c/c../...", "/a.b/..c/c../..."),
            ("/a;x/b;.", "/a;x/b;."),
            ("/caf\u{e9}", "/caf\u{e9}"),
        ];
        for (raw, want) in cases {
            assert_eq!(normalize_path(raw).as_deref(), Ok(want), "{raw}");
        }
        assert_eq!(
            normalize_target("/a/../b?x=/../%2f&y").as_deref(),
            Ok("/b?x=/../%2f&y")
        );
        assert_eq!(normalize_target("/?").as_deref(), Ok("/?"));
    }

    #[test]
    fn ambiguous_paths_are_refused() {
        use TargetError as E;
        let cases = [
            ("*", E::NotOriginForm),
            ("http://h/admin", E::NotOriginForm),
            ("", E::NotOriginForm),
            ("/a#b", E::Fragment),
            ("/a?b#c", E::Fragment),
            ("/a%2fb", E::EncodedSlash),
            ("/a%2Fb", E::EncodedSlash),
            ("/a\\b", E::Backslash),
            ("/a%5cb", E::Backslash),
            ("/a%00b", E::Nul),
            ("/a%", E::BadEscape),
            ("/a%4", E::BadEscape),
            ("/a%zz", E::BadEscape),
            ("/a%+1", E::BadEscape),
            ("/../x", E::AboveRoot),
            ("/..", E::AboveRoot),
            ("/a/../../x", E::AboveRoot),
            ("/%2e%2e", E::AboveRoot),
            ("/chat/..;/admin", E::DotSegmentParameters),
            ("/.;x/admin", E::DotSegmentParameters),
        ];
        for (raw, want) in cases {
            assert_eq!(normalize_target(raw), Err(want), "{raw}");
        }
    }

    #[test]
    fn hosts() {
        for good in [
            "h",
            "example.com",
            "example.com.",
            "example.com:8080",
            "example.com:",
            "127.0.0.1:80",
            "[::1]",
            "[::1]:8080",
            "[2001:db8::7]:65535",
            "a-b_c~d!$&'()*+,;=",
        ] {
            assert!(is_valid_host(good.as_bytes()), "{good}");
        }
        for bad in [
            "",
            "weird\\",
            "\"q\"",
            "a b",
            "a\tb",
            ":80",
            "h:port",
            "h:65536",
            "h:123456",
            "h:8080:1",
            "::1",
            "[::1",
            "[::1]x",
            "[::1]:x",
            "[zz]",
            "[v1.x]",
            "ex%61mple.com",
            "a/b",
            "a@b",
            "a?b",
            "caf\u{e9}",
        ] {
            assert!(!is_valid_host(bad.as_bytes()), "{bad}");
        }
    }
}
