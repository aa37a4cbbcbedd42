//! The HTTP/1.1 upgrade that opens a WebSocket connection (RFC 6455 section 4), both sides.
//!
//! The gateway is a server to its clients and a client to its backends, so both directions
//! live here: [`parse_request`] and [`write_response`] for the server side, [`ClientHandshake`]
//! for the client side. Nothing here reads or writes a socket: callers pass the bytes they have
//! and get back either a verdict or "read more".
#![forbid(unsafe_code)]

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use sha1::{Digest as _, Sha1};

use crate::target::{self, TargetError};

/// The fixed GUID that RFC 6455 appends to the key, so a non-WebSocket server cannot produce a
/// valid accept by accident.
const GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Header slots parsed on the stack; larger [`HeadLimits::max_headers`] values are clamped to
/// this so a misconfigured limit can never turn into an unbounded allocation.
pub const MAX_HEADERS: usize = 128;

/// Bounds on what a peer may make us buffer before the upgrade.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeadLimits {
    /// Bytes a head may span, final blank line included; browsers send well under 2 KiB.
    pub max_bytes: usize,
    /// Header fields a head may carry (at most [`MAX_HEADERS`] are honoured).
    pub max_headers: usize,
}

impl HeadLimits {
    /// 8 KiB and 64 headers: generous for browsers, small enough to bound idle connections.
    pub const DEFAULT: Self = Self {
        max_bytes: 8 * 1024,
        max_headers: 64,
    };

    const fn header_slots(&self) -> usize {
        if self.max_headers < MAX_HEADERS {
            self.max_headers
        } else {
            MAX_HEADERS
        }
    }
}

impl Default for HeadLimits {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// Which side of the gateway sent a bad handshake, and so which HTTP status answers it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum HandshakeError {
    /// The request is not parseable HTTP/1.x, or a field holds bytes it may not (400).
    Malformed,
    /// The method is not GET (405).
    MethodNotAllowed,
    /// HTTP/1.0: RFC 6455 requires at least HTTP/1.1 (400).
    UnsupportedHttpVersion,
    /// No usable `Host` header (400).
    MissingHost,
    /// `Host` is not `host[:port]` (RFC 3986 section 3.2.2), e.g. it holds a quote (400).
    BadHost,
    /// The request target cannot be routed safely; the inner error says why (400).
    BadTarget(TargetError),
    /// No `Upgrade: websocket` or no `upgrade` token in `Connection`, e.g. plain HTTP (426).
    NotUpgrade,
    /// `Sec-WebSocket-Version` is missing or not 13 (426).
    UnsupportedVersion,
    /// `Sec-WebSocket-Key` is missing, repeated, or not base64 of 16 bytes (400).
    BadKey,
    /// The head did not end within [`HeadLimits::max_bytes`] (431).
    HeadTooLarge,
    /// The head has more than [`HeadLimits::max_headers`] fields (431).
    TooManyHeaders,
    /// The backend's response is not parseable HTTP/1.x (502).
    ResponseMalformed,
    /// The backend's 101 lacks `Upgrade: websocket` or the `upgrade` connection token (502).
    ResponseNotUpgrade,
    /// The backend's `Sec-WebSocket-Accept` is missing, repeated or does not match our key (502).
    ResponseBadAccept,
    /// The backend chose a subprotocol we did not offer, or more than one (502).
    ResponseUnexpectedProtocol,
    /// The backend chose an extension we did not offer, or one twice (502).
    ResponseUnexpectedExtension,
    /// The backend's head did not end within [`HeadLimits::max_bytes`] (502).
    ResponseHeadTooLarge,
    /// The backend's head has more than [`HeadLimits::max_headers`] fields (502).
    ResponseTooManyHeaders,
}

impl HandshakeError {
    /// The status to answer with; the single mapping so the gateway and tests cannot disagree.
    #[must_use]
    pub const fn http_status(self) -> u16 {
        match self {
            Self::Malformed
            | Self::UnsupportedHttpVersion
            | Self::MissingHost
            | Self::BadHost
            | Self::BadTarget(_)
            | Self::BadKey => 400,
            Self::MethodNotAllowed => 405,
            Self::NotUpgrade | Self::UnsupportedVersion => 426,
            Self::HeadTooLarge | Self::TooManyHeaders => 431,
            Self::ResponseMalformed
            | Self::ResponseNotUpgrade
            | Self::ResponseBadAccept
            | Self::ResponseUnexpectedProtocol
            | Self::ResponseUnexpectedExtension
            | Self::ResponseHeadTooLarge
            | Self::ResponseTooManyHeaders => 502,
        }
    }

    /// A short, stable description, used for logs, metrics labels and error bodies.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Malformed => "malformed HTTP request",
            Self::MethodNotAllowed => "method not allowed: WebSocket upgrades use GET",
            Self::UnsupportedHttpVersion => "WebSocket upgrades require HTTP/1.1",
            Self::MissingHost => "missing Host header",
            Self::BadHost => "invalid Host header: expected host[:port]",
            Self::BadTarget(e) => e.as_str(),
            Self::NotUpgrade => "not a WebSocket upgrade request",
            Self::UnsupportedVersion => "unsupported Sec-WebSocket-Version: only 13 is supported",
            Self::BadKey => "invalid Sec-WebSocket-Key",
            Self::HeadTooLarge => "request head too large",
            Self::TooManyHeaders => "too many request headers",
            Self::ResponseMalformed => "backend sent a malformed handshake response",
            Self::ResponseNotUpgrade => "backend 101 response is not a WebSocket upgrade",
            Self::ResponseBadAccept => "backend sent a wrong Sec-WebSocket-Accept",
            Self::ResponseUnexpectedProtocol => "backend chose a subprotocol that was not offered",
            Self::ResponseUnexpectedExtension => "backend chose an extension that was not offered",
            Self::ResponseHeadTooLarge => "backend response head too large",
            Self::ResponseTooManyHeaders => "too many backend response headers",
        }
    }

    /// True when the backend, not the client, is at fault (the gateway answers 502).
    #[must_use]
    pub const fn is_response_side(self) -> bool {
        matches!(
            self,
            Self::ResponseMalformed
                | Self::ResponseNotUpgrade
                | Self::ResponseBadAccept
                | Self::ResponseUnexpectedProtocol
                | Self::ResponseUnexpectedExtension
                | Self::ResponseHeadTooLarge
                | Self::ResponseTooManyHeaders
        )
    }

    /// Appends a complete HTTP/1.1 error response that closes the connection.
    ///
    /// 426 carries `Upgrade: websocket` and `Sec-WebSocket-Version: 13` so a client can retry
    /// correctly (RFC 7230 section 6.7, RFC 6455 section 4.4); 405 carries `Allow: GET`.
    pub fn write_response(self, out: &mut Vec<u8>) {
        let status = self.http_status();
        let body = self.as_str();
        out.extend_from_slice(b"HTTP/1.1 ");
        out.extend_from_slice(status.to_string().as_bytes());
        out.push(b' ');
        out.extend_from_slice(reason_phrase(status).as_bytes());
        if status == 426 {
            // An `Upgrade` field must be announced in `Connection` (RFC 7230 section 6.7).
            out.extend_from_slice(b"\r\nConnection: Upgrade, close");
            out.extend_from_slice(b"\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13");
        } else {
            out.extend_from_slice(b"\r\nConnection: close");
        }
        if status == 405 {
            out.extend_from_slice(b"\r\nAllow: GET");
        }
        out.extend_from_slice(b"\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: ");
        out.extend_from_slice((body.len() + 1).to_string().as_bytes());
        out.extend_from_slice(b"\r\n\r\n");
        out.extend_from_slice(body.as_bytes());
        out.push(b'\n');
    }
}

impl fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::error::Error for HandshakeError {}

const fn reason_phrase(status: u16) -> &'static str {
    match status {
        400 => "Bad Request",
        405 => "Method Not Allowed",
        426 => "Upgrade Required",
        431 => "Request Header Fields Too Large",
        502 => "Bad Gateway",
        _ => "Error",
    }
}

/// A validated upgrade request, owned so it can outlive the read buffer it came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpgradeRequest {
    /// Request target in origin-form: the path normalised by [`target::normalize_target`]
    /// (what routes match and what the backend receives), the query as sent.
    pub path: String,
    /// `Host`, trimmed; checked to be `host[:port]` ([`target::is_valid_host`]).
    pub host: String,
    /// `Sec-WebSocket-Key`, trimmed; already checked to be base64 of 16 bytes.
    pub key: String,
    /// `Sec-WebSocket-Protocol`, comma-joined if repeated.
    pub protocols: Option<String>,
    /// `Sec-WebSocket-Extensions`, comma-joined if repeated.
    pub extensions: Option<String>,
    /// Every header as received (names as sent), so a proxy can forward the subset it chooses.
    pub headers: Vec<(String, Vec<u8>)>,
}

impl UpgradeRequest {
    /// The first header with this name, compared case-insensitively as HTTP requires.
    #[must_use]
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }
}

/// Parses and validates a client's upgrade request.
///
/// `Ok(None)` means the head is incomplete and the caller should read more; that answer is
/// only given while `buf.len() < limits.max_bytes`, so a slow or hostile client cannot make us
/// buffer without bound. `Ok(Some((request, consumed)))` gives the head length: bytes after it
/// already belong to the WebSocket stream.
///
/// Requests framing a body (`Content-Length` other than 0, or `Transfer-Encoding`) are
/// `Malformed`: the bytes after the head would otherwise be read as frames. The path comes
/// back normalised, or the request is refused with [`HandshakeError::BadTarget`].
pub fn parse_request(
    buf: &[u8],
    limits: &HeadLimits,
) -> Result<Option<(UpgradeRequest, usize)>, HandshakeError> {
    let head = &buf[..buf.len().min(limits.max_bytes)];
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut slots[..limits.header_slots()]);
    let consumed = match req.parse(head) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() >= limits.max_bytes => {
            return Err(HandshakeError::HeadTooLarge);
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HandshakeError::TooManyHeaders),
        Err(_) => return Err(HandshakeError::Malformed),
    };
    validate_request(&req).map(|r| Some((r, consumed)))
}

fn validate_request(req: &httparse::Request<'_, '_>) -> Result<UpgradeRequest, HandshakeError> {
    if req.method != Some("GET") {
        return Err(HandshakeError::MethodNotAllowed);
    }
    if req.version != Some(1) {
        return Err(HandshakeError::UnsupportedHttpVersion);
    }
    let path = target::normalize_target(req.path.unwrap_or_default())
        .map_err(HandshakeError::BadTarget)?;

    let mut host = None;
    let mut hosts = 0_usize;
    let mut upgrade = false;
    let mut connection = false;
    let mut version = None;
    let mut versions = 0_usize;
    let mut key = None;
    let mut keys = 0_usize;
    let mut protocols: Option<String> = None;
    let mut extensions: Option<String> = None;
    let mut has_body = false;
    for h in &*req.headers {
        let name = h.name;
        let value = h.value.trim_ascii();
        if name.eq_ignore_ascii_case("host") {
            hosts += 1;
            host = Some(value);
        } else if name.eq_ignore_ascii_case("upgrade") {
            upgrade |= has_token(value, b"websocket");
        } else if name.eq_ignore_ascii_case("connection") {
            connection |= has_token(value, b"upgrade");
        } else if name.eq_ignore_ascii_case("sec-websocket-version") {
            versions += 1;
            version = Some(value);
        } else if name.eq_ignore_ascii_case("sec-websocket-key") {
            keys += 1;
            key = Some(value);
        } else if name.eq_ignore_ascii_case("sec-websocket-protocol") {
            if !ListItems(value).all(is_token) {
                return Err(HandshakeError::Malformed);
            }
            append_list(&mut protocols, value)?;
        } else if name.eq_ignore_ascii_case("sec-websocket-extensions") {
            append_list(&mut extensions, value)?;
        } else if name.eq_ignore_ascii_case("content-length") {
            has_body |= value != b"0";
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            has_body = true;
        }
    }

    let host = match host {
        _ if hosts > 1 => return Err(HandshakeError::Malformed),
        None | Some(b"") => return Err(HandshakeError::MissingHost),
        Some(h) if target::is_valid_host(h) => h,
        Some(_) => return Err(HandshakeError::BadHost),
    };
    if !upgrade || !connection {
        return Err(HandshakeError::NotUpgrade);
    }
    if versions != 1 || version != Some(b"13") {
        return Err(HandshakeError::UnsupportedVersion);
    }
    let key = match key {
        Some(k) if keys == 1 && is_valid_key(k) => k,
        _ => return Err(HandshakeError::BadKey),
    };
    if has_body {
        return Err(HandshakeError::Malformed);
    }

    Ok(UpgradeRequest {
        path,
        host: ascii_string(host),
        key: ascii_string(key),
        protocols,
        extensions,
        headers: req
            .headers
            .iter()
            .map(|h| (h.name.to_owned(), h.value.to_vec()))
            .collect(),
    })
}

/// A 16-byte nonce in canonical padded base64 is exactly 24 characters.
fn is_valid_key(key: &[u8]) -> bool {
    let mut nonce = [0_u8; 18];
    key.len() == 24 && matches!(STANDARD.decode_slice(key, &mut nonce), Ok(16))
}

/// Callers pass ASCII-checked bytes or their own offers; for the latter a replaced byte only
/// means that offer can never match an answer.
fn ascii_string(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Joins repeated list headers with ", " (RFC 7230 section 3.2.2); the value must be printable
/// ASCII because it is forwarded into another request verbatim.
fn append_list(acc: &mut Option<String>, value: &[u8]) -> Result<(), HandshakeError> {
    if !value
        .iter()
        .all(|&b| b == b' ' || b == b'\t' || b.is_ascii_graphic())
    {
        return Err(HandshakeError::Malformed);
    }
    let value = ascii_string(value);
    match acc {
        Some(s) => {
            s.push_str(", ");
            s.push_str(&value);
        }
        None => *acc = Some(value),
    }
    Ok(())
}

/// An RFC 7230 `token`: what subprotocol and extension names must be.
fn is_token(s: &[u8]) -> bool {
    !s.is_empty()
        && s.iter()
            .all(|&b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Whether a comma-separated header value holds `token`, case-insensitively.
fn has_token(value: &[u8], token: &[u8]) -> bool {
    ListItems(value).any(|t| t.eq_ignore_ascii_case(token))
}

/// The name of one extension element (`name; param=value`).
fn extension_name(item: &[u8]) -> &[u8] {
    item.split(|&b| b == b';')
        .next()
        .unwrap_or_default()
        .trim_ascii()
}

/// Non-empty, trimmed elements of an HTTP list; commas inside quoted strings (extension
/// parameters) do not split.
struct ListItems<'a>(&'a [u8]);

impl<'a> Iterator for ListItems<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        while !self.0.is_empty() {
            let (mut quoted, mut escaped) = (false, false);
            let mut end = self.0.len();
            for (i, &b) in self.0.iter().enumerate() {
                if escaped {
                    escaped = false;
                } else if quoted {
                    match b {
                        b'\\' => escaped = true,
                        b'"' => quoted = false,
                        _ => {}
                    }
                } else if b == b'"' {
                    quoted = true;
                } else if b == b',' {
                    end = i;
                    break;
                }
            }
            let (item, rest) = self.0.split_at(end);
            self.0 = rest.get(1..).unwrap_or_default();
            let item = item.trim_ascii();
            if !item.is_empty() {
                return Some(item);
            }
        }
        None
    }
}

/// `base64(SHA-1(key + GUID))`: what proves the server understood the WebSocket request.
#[must_use]
pub fn accept_key(key: &[u8]) -> String {
    let mut sha = Sha1::new();
    sha.update(key);
    sha.update(GUID);
    STANDARD.encode(sha.finalize())
}

/// Server side: appends the `101 Switching Protocols` answer to a request carrying `key`.
///
/// `protocol` and `extensions` are what the server chose, written only when given. CR, LF and
/// NUL are dropped from every value so a caller can never split the response.
pub fn write_response(
    out: &mut Vec<u8>,
    key: &str,
    protocol: Option<&str>,
    extensions: Option<&str>,
) {
    out.extend_from_slice(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n",
    );
    put_header(
        out,
        "Sec-WebSocket-Accept",
        accept_key(key.as_bytes()).as_bytes(),
    );
    if let Some(p) = protocol {
        put_header(out, "Sec-WebSocket-Protocol", p.as_bytes());
    }
    if let Some(e) = extensions {
        put_header(out, "Sec-WebSocket-Extensions", e.as_bytes());
    }
    out.extend_from_slice(b"\r\n");
}

/// Writes `name: value\r\n`, dropping the bytes that would end the line early.
fn put_header(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    put_field(out, value);
    out.extend_from_slice(b"\r\n");
}

fn put_field(out: &mut Vec<u8>, value: &[u8]) {
    out.extend(
        value
            .iter()
            .filter(|&&b| !matches!(b, b'\r' | b'\n' | b'\0')),
    );
}

/// Headers [`ClientHandshake::write_request`] writes itself; an `extra` copy would duplicate
/// them (a repeated key is fatal) or smuggle a body in front of the frames.
const OWN_HEADERS: [&str; 9] = [
    "host",
    "upgrade",
    "connection",
    "sec-websocket-key",
    "sec-websocket-version",
    "sec-websocket-protocol",
    "sec-websocket-extensions",
    "content-length",
    "transfer-encoding",
];

/// Client side of the handshake: remembers the key and the offers so the answer can be checked.
#[derive(Clone, Debug)]
pub struct ClientHandshake {
    key: String,
    accept: String,
    offered_protocols: Vec<String>,
    offered_extensions: Vec<String>,
}

impl Default for ClientHandshake {
    fn default() -> Self {
        Self::new()
    }
}

impl ClientHandshake {
    /// A handshake with a fresh random key, as RFC 6455 requires for every connection.
    #[must_use]
    pub fn new() -> Self {
        Self::with_nonce(rand::random())
    }

    /// A handshake with a chosen nonce, for reproducible tests and fuzzing only: a predictable
    /// key lets caches and intermediaries replay answers.
    #[must_use]
    pub fn with_nonce(nonce: [u8; 16]) -> Self {
        let key = STANDARD.encode(nonce);
        Self {
            accept: accept_key(key.as_bytes()),
            key,
            offered_protocols: Vec::new(),
            offered_extensions: Vec::new(),
        }
    }

    /// The `Sec-WebSocket-Key` this handshake sends.
    #[must_use]
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Appends the upgrade request and records what it offers.
    ///
    /// `extra` headers (Origin, Cookie, Authorization, `X-Forwarded-*`...) are written verbatim
    /// after ours, except those whose name is not a token or that we write ourselves (Host,
    /// Upgrade, Connection, `Sec-WebSocket-*`, body framing). CR, LF and NUL are dropped from
    /// values so no argument can split the request.
    pub fn write_request(
        &mut self,
        out: &mut Vec<u8>,
        host: &str,
        path: &str,
        protocols: Option<&str>,
        extensions: Option<&str>,
        extra: &[(&str, &[u8])],
    ) {
        out.extend_from_slice(b"GET ");
        if path.is_empty() {
            out.push(b'/');
        } else {
            put_field(out, path.as_bytes());
        }
        out.extend_from_slice(b" HTTP/1.1\r\n");
        put_header(out, "Host", host.as_bytes());
        out.extend_from_slice(b"Upgrade: websocket\r\nConnection: Upgrade\r\n");
        put_header(out, "Sec-WebSocket-Key", self.key.as_bytes());
        out.extend_from_slice(b"Sec-WebSocket-Version: 13\r\n");

        self.offered_protocols.clear();
        self.offered_extensions.clear();
        if let Some(p) = protocols {
            put_header(out, "Sec-WebSocket-Protocol", p.as_bytes());
            self.offered_protocols
                .extend(ListItems(p.as_bytes()).map(ascii_string));
        }
        if let Some(e) = extensions {
            put_header(out, "Sec-WebSocket-Extensions", e.as_bytes());
            self.offered_extensions
                .extend(ListItems(e.as_bytes()).map(|i| ascii_string(extension_name(i))));
        }
        for &(name, value) in extra {
            let own = OWN_HEADERS.iter().any(|o| o.eq_ignore_ascii_case(name));
            if !own && is_token(name.as_bytes()) {
                put_header(out, name, value);
            }
        }
        out.extend_from_slice(b"\r\n");
    }

    /// Parses and checks the server's answer to [`write_request`](Self::write_request).
    ///
    /// `Ok(None)` means incomplete, with the same bound as [`parse_request`]. A status other
    /// than 101 is the backend's own verdict, not a codec error: it comes back as
    /// [`ServerResponse::Rejected`] so a proxy can relay it (e.g. 403). The returned length is
    /// that of the head; after a 101 the following bytes are WebSocket frames.
    pub fn parse_response(
        &self,
        buf: &[u8],
        limits: &HeadLimits,
    ) -> Result<Option<(ServerResponse, usize)>, HandshakeError> {
        let head = &buf[..buf.len().min(limits.max_bytes)];
        let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut res = httparse::Response::new(&mut slots[..limits.header_slots()]);
        let consumed = match res.parse(head) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) if buf.len() >= limits.max_bytes => {
                return Err(HandshakeError::ResponseHeadTooLarge);
            }
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => {
                return Err(HandshakeError::ResponseTooManyHeaders);
            }
            Err(_) => return Err(HandshakeError::ResponseMalformed),
        };
        match res.code {
            Some(101) if res.version == Some(1) => self
                .validate_upgrade(res.headers)
                .map(|r| Some((r, consumed))),
            Some(101) | None => Err(HandshakeError::ResponseMalformed),
            Some(status) => Ok(Some((ServerResponse::Rejected { status }, consumed))),
        }
    }

    fn validate_upgrade(
        &self,
        headers: &[httparse::Header<'_>],
    ) -> Result<ServerResponse, HandshakeError> {
        let (mut upgrade, mut connection) = (false, false);
        let mut accepts = headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case("sec-websocket-accept"));
        let mut protocol = None;
        let mut extensions: Option<String> = None;
        let mut chosen: Vec<&[u8]> = Vec::new();
        for h in headers {
            let value = h.value.trim_ascii();
            if h.name.eq_ignore_ascii_case("upgrade") {
                upgrade |= has_token(value, b"websocket");
            } else if h.name.eq_ignore_ascii_case("connection") {
                connection |= has_token(value, b"upgrade");
            } else if h.name.eq_ignore_ascii_case("sec-websocket-protocol") {
                let offered = self.offered_protocols.iter().any(|p| p.as_bytes() == value);
                if protocol.is_some() || !offered {
                    return Err(HandshakeError::ResponseUnexpectedProtocol);
                }
                protocol = Some(ascii_string(value));
            } else if h.name.eq_ignore_ascii_case("sec-websocket-extensions") {
                for item in ListItems(value) {
                    let name = extension_name(item);
                    let offered = self
                        .offered_extensions
                        .iter()
                        .any(|o| o.as_bytes().eq_ignore_ascii_case(name));
                    let repeated = chosen.iter().any(|c| c.eq_ignore_ascii_case(name));
                    if !offered || repeated {
                        return Err(HandshakeError::ResponseUnexpectedExtension);
                    }
                    chosen.push(name);
                }
                append_list(&mut extensions, value)
                    .map_err(|_| HandshakeError::ResponseMalformed)?;
            }
        }
        if !upgrade || !connection {
            return Err(HandshakeError::ResponseNotUpgrade);
        }
        match (accepts.next(), accepts.next()) {
            (Some(a), None) if a.value.trim_ascii() == self.accept.as_bytes() => {}
            _ => return Err(HandshakeError::ResponseBadAccept),
        }
        Ok(ServerResponse::Upgraded {
            protocol,
            extensions,
        })
    }
}

/// What the server answered to a [`ClientHandshake`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServerResponse {
    /// A valid 101: the connection now speaks WebSocket with these negotiated options.
    Upgraded {
        /// The subprotocol the server chose, one of ours.
        protocol: Option<String>,
        /// The extensions the server accepted, with their parameters, comma-joined.
        extensions: Option<String>,
    },
    /// Any other status, for the proxy to relay; the body (if any) follows the head.
    Rejected {
        /// The server's status code, e.g. 403.
        status: u16,
    },
}

/// Whether an extensions header (offer or answer) names permessage-deflate, so the proxy knows
/// whether RSV1 may be set; parameters are ignored.
#[must_use]
pub fn offers_permessage_deflate(extensions: &str) -> bool {
    ListItems(extensions.as_bytes())
        .any(|i| extension_name(i).eq_ignore_ascii_case(b"permessage-deflate"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_items_respect_quotes_and_skip_empties() {
        let items: Vec<&[u8]> = ListItems(b" a, ,b; x=\"1,2\" ,, c\\,").collect();
        assert_eq!(items, [&b"a"[..], b"b; x=\"1,2\"", b"c\\"]);
        assert_eq!(ListItems(b"\"unterminated, x").count(), 1);
        assert_eq!(ListItems(b"").count(), 0);
    }

    #[test]
    fn tokens() {
        assert!(has_token(b"keep-alive, Upgrade", b"upgrade"));
        assert!(!has_token(b"keep-alive, upgraded", b"upgrade"));
        assert!(is_token(b"chat.v2"));
        assert!(!is_token(b"a b"));
        assert!(!is_token(b""));
    }

    #[test]
    fn key_validation() {
        assert!(is_valid_key(b"dGhlIHNhbXBsZSBub25jZQ=="));
        assert!(!is_valid_key(b"dGhlIHNhbXBsZSBub25jZQ"));
        assert!(!is_valid_key(b"dGhlIHNhbXBsZSBub25jZXh4")); // 18 bytes
        assert!(!is_valid_key(b"dGhlIHNhbXBsZSBub25jZQ=!"));
        assert!(!is_valid_key(b""));
    }

    #[test]
    fn statuses_and_sides_agree() {
        use HandshakeError as E;
        let all = [
            E::Malformed,
            E::MethodNotAllowed,
            E::UnsupportedHttpVersion,
            E::MissingHost,
            E::BadHost,
            E::BadTarget(TargetError::AboveRoot),
            E::NotUpgrade,
            E::UnsupportedVersion,
            E::BadKey,
            E::HeadTooLarge,
            E::TooManyHeaders,
            E::ResponseMalformed,
            E::ResponseNotUpgrade,
            E::ResponseBadAccept,
            E::ResponseUnexpectedProtocol,
            E::ResponseUnexpectedExtension,
            E::ResponseHeadTooLarge,
            E::ResponseTooManyHeaders,
        ];
        for e in all {
            assert_eq!(e.is_response_side(), e.http_status() == 502, "{e:?}");
            assert_ne!(reason_phrase(e.http_status()), "Error", "{e:?}");
        }
    }

    #[test]
    fn header_slots_are_clamped() {
        let l = HeadLimits {
            max_bytes: 1,
            max_headers: usize::MAX,
        };
        assert_eq!(l.header_slots(), MAX_HEADERS);
    }
}
