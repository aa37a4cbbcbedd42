//! The HTTP/1.1 upgrade (RFC 6455 section 4) as the gateway and the load generator use it.

use codec::handshake::{
    ClientHandshake, HandshakeError, HeadLimits, ServerResponse, UpgradeRequest, accept_key,
    offers_permessage_deflate, parse_request, write_response,
};
use codec::target::{TargetError, normalize_path, normalize_target};
use proptest::prelude::*;

const RFC_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
const RFC_ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

/// What Chrome sends, give or take the cookie.
const BROWSER_REQUEST: &[u8] = b"GET /chat?room=1 HTTP/1.1\r\n\
Host: example.com:8080\r\n\
Connection: keep-alive, Upgrade\r\n\
Pragma: no-cache\r\n\
Cache-Control: no-cache\r\n\
User-Agent: Mozilla/5.0\r\n\
Upgrade: websocket\r\n\
Origin: https://example.com\r\n\
Sec-WebSocket-Version: 13\r\n\
Accept-Encoding: gzip, deflate, br\r\n\
Cookie: session=abc\r\n\
Sec-WebSocket-Key:  dGhlIHNhbXBsZSBub25jZQ==  \r\n\
Sec-WebSocket-Protocol: chat\r\n\
Sec-WebSocket-Protocol: superchat\r\n\
Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\
\r\n";

fn parse(bytes: &[u8]) -> Result<Option<(UpgradeRequest, usize)>, HandshakeError> {
    parse_request(bytes, &HeadLimits::default())
}

fn parse_err(bytes: &[u8]) -> HandshakeError {
    match parse(bytes) {
        Err(e) => e,
        other => panic!("expected an error, got {other:?}"),
    }
}

/// A head from a start line and header lines.
fn request_with(request_line: &str, headers: &[&str]) -> Vec<u8> {
    let mut s = format!("{request_line}\r\n");
    for h in headers {
        s.push_str(h);
        s.push_str("\r\n");
    }
    s.push_str("\r\n");
    s.into_bytes()
}

const GOOD: [&str; 5] = [
    "Host: h",
    "Upgrade: websocket",
    "Connection: Upgrade",
    "Sec-WebSocket-Version: 13",
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
];

/// `GOOD` with the header at `skip` removed (if any) and `add` appended.
fn headers(skip: Option<usize>, add: &[&'static str]) -> Vec<&'static str> {
    GOOD.iter()
        .enumerate()
        .filter(|&(i, _)| Some(i) != skip)
        .map(|(_, h)| *h)
        .chain(add.iter().copied())
        .collect()
}

fn written(e: HandshakeError) -> String {
    let mut out = Vec::new();
    e.write_response(&mut out);
    String::from_utf8(out).expect("error responses are ASCII")
}

#[test]
fn rfc_6455_example_accept_key() {
    assert_eq!(accept_key(RFC_KEY.as_bytes()), RFC_ACCEPT);
}

#[test]
fn browser_request_parses_and_trailing_frames_are_left() {
    let mut buf = BROWSER_REQUEST.to_vec();
    buf.extend_from_slice(&[0x81, 0x85, 1, 2, 3, 4, 5, 6, 7, 8, 9]);
    let (req, consumed) = parse(&buf).unwrap().expect("complete");
    assert_eq!(consumed, BROWSER_REQUEST.len());
    assert_eq!(req.path, "/chat?room=1");
    assert_eq!(req.host, "example.com:8080");
    assert_eq!(req.key, RFC_KEY);
    assert_eq!(req.protocols.as_deref(), Some("chat, superchat"));
    assert_eq!(
        req.extensions.as_deref(),
        Some("permessage-deflate; client_max_window_bits")
    );
    assert_eq!(req.headers.len(), 14);
    assert_eq!(req.headers[0].0, "Host");
    assert_eq!(req.header("ORIGIN"), Some(&b"https://example.com"[..]));
    assert_eq!(req.header("cookie"), Some(&b"session=abc"[..]));
    assert_eq!(req.header("x-missing"), None);
    assert!(offers_permessage_deflate(
        req.extensions.as_deref().unwrap()
    ));
}

#[test]
fn incomplete_at_every_split_point() {
    for i in 0..BROWSER_REQUEST.len() {
        assert_eq!(parse(&BROWSER_REQUEST[..i]), Ok(None), "split at {i}");
    }
    assert!(parse(BROWSER_REQUEST).unwrap().is_some());
}

#[test]
fn minimal_request_and_case_insensitivity() {
    let req = request_with(
        "GET / HTTP/1.1",
        &[
            "hOsT: h",
            "UPGRADE: WebSocket",
            "connection: UPGRADE",
            "sec-websocket-version:13",
            "SEC-WEBSOCKET-KEY: dGhlIHNhbXBsZSBub25jZQ==",
        ],
    );
    let (r, n) = parse(&req).unwrap().unwrap();
    assert_eq!(n, req.len());
    assert_eq!((r.path.as_str(), r.host.as_str()), ("/", "h"));
    assert_eq!((r.protocols, r.extensions), (None, None));
}

#[test]
fn method_not_allowed_is_405_with_allow() {
    let e = parse_err(&request_with("POST / HTTP/1.1", &GOOD));
    assert_eq!(e, HandshakeError::MethodNotAllowed);
    assert_eq!(e.http_status(), 405);
    let resp = written(e);
    assert!(resp.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"));
    assert!(resp.contains("\r\nAllow: GET\r\n"));
}

#[test]
fn request_side_400s() {
    let cases: Vec<(Vec<u8>, HandshakeError)> = vec![
        (
            b"\x16\x03\x01\x02\x00\x01\r\n\r\n".to_vec(),
            HandshakeError::Malformed,
        ),
        (
            b"GET / HTTP/2.0\r\n\r\n".to_vec(),
            HandshakeError::Malformed,
        ),
        (
            request_with("GET * HTTP/1.1", &GOOD),
            HandshakeError::BadTarget(TargetError::NotOriginForm),
        ),
        (
            request_with("GET / HTTP/1.0", &GOOD),
            HandshakeError::UnsupportedHttpVersion,
        ),
        (
            request_with("GET / HTTP/1.1", &headers(Some(0), &[])),
            HandshakeError::MissingHost,
        ),
        (
            request_with("GET / HTTP/1.1", &headers(Some(0), &["Host: "])),
            HandshakeError::MissingHost,
        ),
        (
            request_with("GET / HTTP/1.1", &headers(None, &["Host: h2"])),
            HandshakeError::Malformed,
        ),
        (
            request_with("GET / HTTP/1.1", &headers(Some(4), &[])),
            HandshakeError::BadKey,
        ),
        (
            request_with(
                "GET / HTTP/1.1",
                &headers(None, &["Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ=="]),
            ),
            HandshakeError::BadKey,
        ),
        (
            request_with(
                "GET / HTTP/1.1",
                &headers(Some(4), &["Sec-WebSocket-Key: not base64!"]),
            ),
            HandshakeError::BadKey,
        ),
        (
            // base64 of 15 bytes
            request_with(
                "GET / HTTP/1.1",
                &headers(Some(4), &["Sec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAA"]),
            ),
            HandshakeError::BadKey,
        ),
        (
            request_with("GET / HTTP/1.1", &headers(None, &["Content-Length: 5"])),
            HandshakeError::Malformed,
        ),
        (
            request_with(
                "GET / HTTP/1.1",
                &headers(None, &["Transfer-Encoding: chunked"]),
            ),
            HandshakeError::Malformed,
        ),
        (
            request_with(
                "GET / HTTP/1.1",
                &headers(None, &["Sec-WebSocket-Protocol: a b"]),
            ),
            HandshakeError::Malformed,
        ),
    ];
    for (req, want) in cases {
        let got = parse_err(&req);
        assert_eq!(got, want, "{}", String::from_utf8_lossy(&req));
        assert_eq!(got.http_status(), 400);
        assert!(written(got).starts_with("HTTP/1.1 400 Bad Request\r\n"));
    }
    // Non-UTF-8 in Host.
    let mut req = request_with("GET / HTTP/1.1", &headers(Some(0), &[]));
    let at = req.len() - 2;
    req.splice(at..at, b"Host: h\xff\xfe\r\n".iter().copied());
    assert_eq!(parse_err(&req), HandshakeError::BadHost);
    // Content-Length: 0 is harmless.
    let req = request_with("GET / HTTP/1.1", &headers(None, &["Content-Length: 0"]));
    assert!(parse(&req).unwrap().is_some());
}

#[test]
fn paths_come_back_normalised_with_the_query_as_sent() {
    let cases = [
        ("/chat/../admin", "/admin"),
        ("/chat/%2e%2e/admin", "/admin"),
        ("/%61dmin", "/admin"),
        ("//admin", "/admin"),
        ("/./admin", "/admin"),
        ("/room//7/./x/../?q=/../%2f%61#", "/room/7/?q=/../%2f%61#"),
        ("/%7euser/%3f?%7e", "/~user/%3F?%7e"),
    ];
    for (raw, want) in cases {
        if raw.contains('#') {
            // A fragment is refused wherever it is.
            let e = parse_err(&request_with(&format!("GET {raw} HTTP/1.1"), &GOOD));
            assert_eq!(e, HandshakeError::BadTarget(TargetError::Fragment), "{raw}");
            continue;
        }
        let req = request_with(&format!("GET {raw} HTTP/1.1"), &GOOD);
        let (r, _) = parse(&req).unwrap().expect("complete");
        assert_eq!(r.path, want, "{raw}");
    }
}

#[test]
fn ambiguous_targets_are_400_with_the_reason() {
    let cases = [
        ("/a%2Fb", TargetError::EncodedSlash, "encoded slash"),
        ("/a\\b", TargetError::Backslash, "backslash"),
        ("/a%5cb", TargetError::Backslash, "backslash"),
        ("/a%00", TargetError::Nul, "NUL"),
        ("/a%g0", TargetError::BadEscape, "percent-escape"),
        ("/../admin", TargetError::AboveRoot, "above the root"),
        (
            "/chat/../../admin",
            TargetError::AboveRoot,
            "above the root",
        ),
        (
            "/x/..;/admin",
            TargetError::DotSegmentParameters,
            "parameters",
        ),
        ("http://h/admin", TargetError::NotOriginForm, "origin-form"),
    ];
    for (raw, inner, reason) in cases {
        let e = parse_err(&request_with(&format!("GET {raw} HTTP/1.1"), &GOOD));
        assert_eq!(e, HandshakeError::BadTarget(inner), "{raw}");
        assert_eq!(e.http_status(), 400);
        let resp = written(e);
        assert!(resp.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{resp}");
        assert!(resp.contains(reason), "{raw}: {resp}");
    }
}

/// `GOOD` with `Host: host` in place of its own.
fn with_host(host: &str) -> Vec<u8> {
    let line = format!("Host: {host}");
    let mut fields = vec![line.as_str()];
    fields.extend(&GOOD[1..]);
    request_with("GET / HTTP/1.1", &fields)
}

#[test]
fn hosts_must_be_host_and_port() {
    for good in [
        "h",
        "h.example:8080",
        "127.0.0.1",
        "[::1]:9",
        "h.example.",
        "h:",
    ] {
        let (r, _) = parse(&with_host(good)).unwrap().expect("complete");
        assert_eq!(r.host, good);
    }
    for bad in [
        "weird\\", "\"h\"", "a b", "h:x", "h:70000", "[::1", "::1", "h/x", "h@x", ":80",
    ] {
        let e = parse_err(&with_host(bad));
        assert_eq!(e, HandshakeError::BadHost, "{bad}");
        assert_eq!(e.http_status(), 400);
        assert!(written(e).contains("invalid Host header"));
    }
}

#[test]
fn not_upgrade_and_bad_version_are_426_with_version_header() {
    let cases = [
        // Plain HTTP.
        (
            request_with("GET / HTTP/1.1", &["Host: h", "Accept: */*"]),
            HandshakeError::NotUpgrade,
        ),
        (
            request_with("GET / HTTP/1.1", &headers(Some(1), &[])),
            HandshakeError::NotUpgrade,
        ),
        (
            request_with("GET / HTTP/1.1", &headers(Some(1), &["Upgrade: h2c"])),
            HandshakeError::NotUpgrade,
        ),
        (
            request_with("GET / HTTP/1.1", &headers(Some(2), &[])),
            HandshakeError::NotUpgrade,
        ),
        (
            request_with(
                "GET / HTTP/1.1",
                &headers(Some(2), &["Connection: keep-alive"]),
            ),
            HandshakeError::NotUpgrade,
        ),
        (
            request_with("GET / HTTP/1.1", &headers(Some(3), &[])),
            HandshakeError::UnsupportedVersion,
        ),
        (
            request_with(
                "GET / HTTP/1.1",
                &headers(Some(3), &["Sec-WebSocket-Version: 8"]),
            ),
            HandshakeError::UnsupportedVersion,
        ),
        (
            request_with(
                "GET / HTTP/1.1",
                &headers(None, &["Sec-WebSocket-Version: 13"]),
            ),
            HandshakeError::UnsupportedVersion,
        ),
    ];
    for (req, want) in cases {
        let got = parse_err(&req);
        assert_eq!(got, want, "{}", String::from_utf8_lossy(&req));
        assert_eq!(got.http_status(), 426);
        let resp = written(got);
        assert!(resp.starts_with("HTTP/1.1 426 Upgrade Required\r\n"));
        assert!(resp.contains("\r\nSec-WebSocket-Version: 13\r\n"));
        assert!(resp.contains("\r\nUpgrade: websocket\r\n"));
    }
}

#[test]
fn head_too_large_and_too_many_headers_are_431() {
    let limits = HeadLimits {
        max_bytes: 64,
        max_headers: 64,
    };
    // No end of head within max_bytes.
    let long = request_with(
        "GET / HTTP/1.1",
        &headers(
            None,
            &["X-Pad: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"],
        ),
    );
    assert_eq!(
        parse_request(&long[..64], &limits),
        Err(HandshakeError::HeadTooLarge)
    );
    assert_eq!(parse_request(&long[..63], &limits), Ok(None));
    // A complete head longer than the limit is refused even when it arrived in one read.
    assert_eq!(
        parse_request(&long, &limits),
        Err(HandshakeError::HeadTooLarge)
    );
    // A head exactly max_bytes long is fine.
    let exact = HeadLimits {
        max_bytes: long.len(),
        max_headers: 64,
    };
    assert!(parse_request(&long, &exact).unwrap().is_some());

    let few = HeadLimits {
        max_bytes: 8192,
        max_headers: 5,
    };
    let req = request_with("GET / HTTP/1.1", &headers(None, &["X-Sixth: 1"]));
    assert_eq!(
        parse_request(&req, &few),
        Err(HandshakeError::TooManyHeaders)
    );
    assert!(
        parse_request(&request_with("GET / HTTP/1.1", &GOOD), &few)
            .unwrap()
            .is_some()
    );

    for e in [HandshakeError::HeadTooLarge, HandshakeError::TooManyHeaders] {
        assert_eq!(e.http_status(), 431);
        assert!(written(e).starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"));
    }
}

#[test]
fn error_response_is_complete_http() {
    let resp = written(HandshakeError::BadKey);
    let (head, body) = resp.split_once("\r\n\r\n").expect("blank line");
    assert!(head.contains("\r\nConnection: close"));
    assert!(head.contains("\r\nContent-Type: text/plain"));
    assert!(head.contains(&format!("\r\nContent-Length: {}", body.len())));
    assert_eq!(body, format!("{}\n", HandshakeError::BadKey));
    assert!(!head.contains("Allow:") && !head.contains("Sec-WebSocket-Version"));
    assert!(written(HandshakeError::ResponseBadAccept).starts_with("HTTP/1.1 502 Bad Gateway\r\n"));
    assert!(HandshakeError::ResponseBadAccept.is_response_side());
    assert!(!HandshakeError::BadKey.is_response_side());
}

/// Client request -> `parse_request` -> server `write_response` -> `parse_response`.
#[test]
fn round_trip_with_protocol_and_extensions() {
    let mut client = ClientHandshake::new();
    let mut req = Vec::new();
    client.write_request(
        &mut req,
        "backend:9000",
        "/ws?x=1",
        Some("chat, superchat"),
        Some("permessage-deflate; client_max_window_bits, x-webkit-deflate-frame"),
        &[
            ("Origin", b"https://example.com"),
            ("X-Forwarded-For", b"10.0.0.1"),
            // Ours to write: must not appear twice.
            ("Sec-WebSocket-Key", b"AAAAAAAAAAAAAAAAAAAAAA=="),
            // Not a token: dropped.
            ("Bad Name", b"x"),
        ],
    );
    let (parsed, n) = parse(&req).unwrap().expect("complete");
    assert_eq!(n, req.len());
    assert_eq!(parsed.path, "/ws?x=1");
    assert_eq!(parsed.host, "backend:9000");
    assert_eq!(parsed.key, client.key());
    assert_eq!(parsed.protocols.as_deref(), Some("chat, superchat"));
    assert_eq!(parsed.header("x-forwarded-for"), Some(&b"10.0.0.1"[..]));
    assert_eq!(parsed.header("bad name"), None);

    let mut resp = Vec::new();
    write_response(
        &mut resp,
        &parsed.key,
        Some("superchat"),
        Some("permessage-deflate; client_max_window_bits=15"),
    );
    assert!(resp.starts_with(b"HTTP/1.1 101 Switching Protocols\r\n"));
    resp.extend_from_slice(&[0x82, 0x00]);
    let (answer, head) = client
        .parse_response(&resp, &HeadLimits::default())
        .unwrap()
        .expect("complete");
    assert_eq!(head, resp.len() - 2);
    assert_eq!(
        answer,
        ServerResponse::Upgraded {
            protocol: Some("superchat".into()),
            extensions: Some("permessage-deflate; client_max_window_bits=15".into()),
        }
    );

    // Incomplete at every split point.
    for i in 0..head {
        assert_eq!(
            client.parse_response(&resp[..i], &HeadLimits::default()),
            Ok(None),
            "split at {i}"
        );
    }
}

#[test]
fn round_trip_without_options() {
    let mut client = ClientHandshake::default();
    let mut req = Vec::new();
    client.write_request(&mut req, "h", "", None, None, &[]);
    let (parsed, _) = parse(&req).unwrap().unwrap();
    assert_eq!(parsed.path, "/");
    let mut resp = Vec::new();
    write_response(&mut resp, &parsed.key, None, None);
    let (answer, _) = client
        .parse_response(&resp, &HeadLimits::default())
        .unwrap()
        .unwrap();
    assert_eq!(
        answer,
        ServerResponse::Upgraded {
            protocol: None,
            extensions: None
        }
    );
}

fn offered_client() -> ClientHandshake {
    let mut client = ClientHandshake::with_nonce(*b"the sample nonce");
    assert_eq!(client.key(), RFC_KEY);
    client.write_request(
        &mut Vec::new(),
        "h",
        "/",
        Some("chat"),
        Some("permessage-deflate"),
        &[],
    );
    client
}

fn response(lines: &[&str]) -> Vec<u8> {
    request_with("HTTP/1.1 101 Switching Protocols", lines)
}

fn response_err(client: &ClientHandshake, resp: &[u8]) -> HandshakeError {
    match client.parse_response(resp, &HeadLimits::default()) {
        Err(e) => {
            assert!(e.is_response_side());
            assert_eq!(e.http_status(), 502);
            e
        }
        other => panic!("expected an error, got {other:?}"),
    }
}

const ACCEPT: &str = "Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

#[test]
fn bad_responses_are_rejected() {
    let client = offered_client();
    let ok = response(&["Upgrade: websocket", "Connection: Upgrade", ACCEPT]);
    assert!(client.parse_response(&ok, &HeadLimits::default()).is_ok());

    let cases: [(&[&str], HandshakeError); 11] = [
        (
            &["Upgrade: websocket", "Connection: Upgrade"],
            HandshakeError::ResponseBadAccept,
        ),
        (
            &[
                "Upgrade: websocket",
                "Connection: Upgrade",
                "Sec-WebSocket-Accept: AAAAAAAAAAAAAAAAAAAAAAAAAAA=",
            ],
            HandshakeError::ResponseBadAccept,
        ),
        (
            &["Upgrade: websocket", "Connection: Upgrade", ACCEPT, ACCEPT],
            HandshakeError::ResponseBadAccept,
        ),
        (
            &["Connection: Upgrade", ACCEPT],
            HandshakeError::ResponseNotUpgrade,
        ),
        (
            &["Upgrade: websocket", ACCEPT],
            HandshakeError::ResponseNotUpgrade,
        ),
        (
            &[
                "Upgrade: websocket",
                "Connection: Upgrade",
                ACCEPT,
                "Sec-WebSocket-Protocol: superchat",
            ],
            HandshakeError::ResponseUnexpectedProtocol,
        ),
        (
            &[
                "Upgrade: websocket",
                "Connection: Upgrade",
                ACCEPT,
                "Sec-WebSocket-Protocol: chat",
                "Sec-WebSocket-Protocol: chat",
            ],
            HandshakeError::ResponseUnexpectedProtocol,
        ),
        (
            &[
                "Upgrade: websocket",
                "Connection: Upgrade",
                ACCEPT,
                "Sec-WebSocket-Protocol: chat, chat",
            ],
            HandshakeError::ResponseUnexpectedProtocol,
        ),
        (
            &[
                "Upgrade: websocket",
                "Connection: Upgrade",
                ACCEPT,
                "Sec-WebSocket-Extensions: x-webkit-deflate-frame",
            ],
            HandshakeError::ResponseUnexpectedExtension,
        ),
        (
            &[
                "Upgrade: websocket",
                "Connection: Upgrade",
                ACCEPT,
                "Sec-WebSocket-Extensions: permessage-deflate, permessage-deflate",
            ],
            HandshakeError::ResponseUnexpectedExtension,
        ),
        (
            &["Upgrade: websocket", "Connection: Upgrade", ACCEPT],
            HandshakeError::ResponseMalformed,
        ),
    ];
    for (i, (lines, want)) in cases.iter().enumerate() {
        let resp = if i == cases.len() - 1 {
            // 101 over HTTP/1.0.
            request_with("HTTP/1.0 101 Switching Protocols", lines)
        } else {
            response(lines)
        };
        assert_eq!(response_err(&client, &resp), *want, "case {i}");
    }
}

#[test]
fn non_http_and_unoffered_responses_are_rejected() {
    let client = offered_client();
    // Not HTTP at all.
    assert_eq!(
        response_err(&client, b"SSH-2.0-OpenSSH\r\n\r\n"),
        HandshakeError::ResponseMalformed
    );
    // A client that offered nothing accepts no protocol or extension.
    let bare = ClientHandshake::with_nonce(*b"the sample nonce");
    let resp = response(&[
        "Upgrade: websocket",
        "Connection: Upgrade",
        ACCEPT,
        "Sec-WebSocket-Protocol: chat",
    ]);
    assert_eq!(
        response_err(&bare, &resp),
        HandshakeError::ResponseUnexpectedProtocol
    );
}

#[test]
fn response_limits() {
    let client = offered_client();
    let resp = response(&["Upgrade: websocket", "Connection: Upgrade", ACCEPT]);
    let small = HeadLimits {
        max_bytes: 32,
        max_headers: 64,
    };
    assert_eq!(
        client.parse_response(&resp, &small),
        Err(HandshakeError::ResponseHeadTooLarge)
    );
    let few = HeadLimits {
        max_bytes: 8192,
        max_headers: 2,
    };
    assert_eq!(
        client.parse_response(&resp, &few),
        Err(HandshakeError::ResponseTooManyHeaders)
    );
}

#[test]
fn non_101_is_rejected_with_its_status() {
    let client = offered_client();
    let resp = b"HTTP/1.1 403 Forbidden\r\nContent-Length: 9\r\n\r\nforbidden";
    let (answer, head) = client
        .parse_response(resp, &HeadLimits::default())
        .unwrap()
        .unwrap();
    assert_eq!(answer, ServerResponse::Rejected { status: 403 });
    assert_eq!(&resp[head..], b"forbidden");
}

#[test]
fn permessage_deflate_detection() {
    assert!(offers_permessage_deflate("permessage-deflate"));
    assert!(offers_permessage_deflate(
        "x-foo; a=\"b,c\", PerMessage-Deflate ; server_no_context_takeover"
    ));
    assert!(!offers_permessage_deflate("permessage-deflate-x"));
    assert!(!offers_permessage_deflate("x; permessage-deflate"));
    assert!(!offers_permessage_deflate(""));
}

proptest! {
    #[test]
    fn parse_request_never_panics_and_is_bounded(
        bytes in proptest::collection::vec(any::<u8>(), 0..1024),
        max_bytes in 0_usize..1100,
        max_headers in 0_usize..200,
    ) {
        let limits = HeadLimits { max_bytes, max_headers };
        let got = parse_request(&bytes, &limits);
        if bytes.len() >= max_bytes {
            prop_assert!(!matches!(got, Ok(None)));
        }
        if let Ok(Some((_, consumed))) = got {
            prop_assert!(consumed <= bytes.len().min(max_bytes));
        }
    }

    #[test]
    fn mutated_requests_never_panic(
        cut in 0_usize..BROWSER_REQUEST.len(),
        insert in proptest::collection::vec(any::<u8>(), 0..16),
    ) {
        let mut req = BROWSER_REQUEST.to_vec();
        req.splice(cut..cut, insert);
        let limits = HeadLimits::default();
        let _ = parse_request(&req, &limits);
        let _ = offered_client().parse_response(&req, &limits);
    }

    #[test]
    fn parse_response_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let limits = HeadLimits { max_bytes: 256, max_headers: 8 };
        let got = offered_client().parse_response(&bytes, &limits);
        if bytes.len() >= limits.max_bytes {
            prop_assert!(!matches!(got, Ok(None)));
        }
    }
}

/// Pieces that build request paths near the normaliser's edge cases.
const PIECES: [&str; 24] = [
    "/", "/", "//", ".", "..", "%2e", "%2E", "%2e%2e", "a", "B", "%41", "%7e", "%7E", "%3f", "%3F",
    "~", ";", ";x", "%25", "%2f", "%5C", "%00", "\\", "\u{e9}",
];

fn path_strategy() -> impl Strategy<Value = String> {
    proptest::collection::vec(proptest::sample::select(&PIECES[..]), 0..24)
        .prop_map(|pieces| format!("/{}", pieces.concat()))
}

/// What every normalised path must look like.
fn assert_normal(path: &str) -> Result<(), TestCaseError> {
    prop_assert!(path.starts_with('/'), "{path}");
    prop_assert!(!path.contains("//"), "{path}");
    prop_assert!(!path.contains("/./") && !path.contains("/../"), "{path}");
    prop_assert!(!path.ends_with("/.") && !path.ends_with("/.."), "{path}");
    prop_assert!(!path.contains('\\'), "{path}");
    prop_assert_eq!(normalize_path(path), Ok(path.to_owned()), "not idempotent");
    Ok(())
}

proptest! {
    #[test]
    fn normalised_paths_are_canonical(raw in path_strategy()) {
        if let Ok(path) = normalize_path(&raw) {
            assert_normal(&path)?;
            prop_assert!(path.len() <= raw.len());
            // Percent-escapes left are upper-case and never encode an unreserved character.
            for (i, _) in path.match_indices('%') {
                let hex = &path[i + 1..i + 3];
                prop_assert_eq!(hex, hex.to_ascii_uppercase());
                let byte = u8::from_str_radix(hex, 16).unwrap();
                prop_assert!(!(byte.is_ascii_alphanumeric() || b"-._~".contains(&byte)));
            }
        }
    }

    #[test]
    fn any_string_normalises_or_is_refused(raw in "/[ -~]{0,40}") {
        if let Ok(target) = normalize_target(&raw) {
            let path = target.split('?').next().unwrap_or_default();
            assert_normal(path)?;
            prop_assert_eq!(normalize_target(&target), Ok(target.clone()));
        }
    }

    #[test]
    fn parsed_request_paths_are_normal(raw in path_strategy()) {
        let req = request_with(&format!("GET {raw} HTTP/1.1"), &GOOD);
        match parse(&req) {
            Ok(Some((r, _))) => assert_normal(&r.path)?,
            Ok(None) => prop_assert!(false, "complete request read as partial"),
            Err(e) => prop_assert_eq!(e.http_status(), 400),
        }
    }
}
