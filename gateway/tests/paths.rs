//! Routing on the normalised path, and the `Host` a backend is told about: spellings of
//! `/admin` (dot segments, escapes, repeated slashes) take the `/admin` route and its Origin
//! allow-list rather than reaching `/`'s upstream, the backend receives the normalised path,
//! ambiguous paths and invalid `Host` values get 400, and the `Forwarded` header parses.

pub mod common;

use common::config::{ConfigGateway, preamble, refusal, upgrade_request};
use common::{EchoBackend, http_exchange, raw_client};

/// The only Origin the `/admin` route admits.
const ADMIN_ORIGIN: &str = "https://admin.example";

/// Paths that a normalising backend serves as `/admin`.
const ADMIN_SPELLINGS: [&str; 5] = [
    "/chat/../admin",
    "/chat/%2e%2e/admin",
    "/%61dmin",
    "//admin",
    "/./admin",
];

/// A gateway with `/admin` (Origin allow-list) on one upstream, `/` on another, and
/// `/api/v1` written un-normalised in the file, on a third.
struct Site {
    gw: ConfigGateway,
    admin: EchoBackend,
    root: EchoBackend,
    api: EchoBackend,
}

impl Site {
    async fn start() -> Self {
        let admin = EchoBackend::start().await;
        let root = EchoBackend::start().await;
        let api = EchoBackend::start().await;
        let config = format!(
            "{}[[route]]\npath_prefix = \"/admin\"\nupstream = \"admin\"\n\
             origins = [\"{ADMIN_ORIGIN}\"]\n\n\
             [[route]]\nupstream = \"root\"\n\n\
             [[route]]\npath_prefix = \"/%61pi//v1/./\"\nupstream = \"api\"\n\n\
             [upstream.admin]\nbackends = [\"{}\"]\n\n\
             [upstream.root]\nbackends = [\"{}\"]\n\n\
             [upstream.api]\nbackends = [\"{}\"]\n",
            preamble(None, ""),
            admin.url(),
            root.url(),
            api.url(),
        );
        Self {
            gw: ConfigGateway::start(&config),
            admin,
            root,
            api,
        }
    }

    /// Upgrades `path` (with `extra` headers), checks which backend took it and the path it
    /// was sent, and closes cleanly.
    async fn upgrade_to(&mut self, path: &str, extra: &[(&str, &str)], want: (&str, &str)) {
        let (mut ws, _) = raw_client(self.gw.addr, path, "gw.test", extra).await;
        let (name, backend) = match want.0 {
            "admin" => ("admin", &mut self.admin),
            "root" => ("root", &mut self.root),
            _ => ("api", &mut self.api),
        };
        let conn = backend.accept().await;
        assert_eq!(conn.path, want.1, "{path} at the {name} backend");
        ws.send_close(1000, "").await;
        assert_eq!(ws.expect_close().await.close_code(), Some(1000), "{path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spellings_of_admin_without_origin_are_refused_not_routed_to_root() {
    let mut site = Site::start().await;
    let spellings = ADMIN_SPELLINGS
        .iter()
        .chain(&["/admin;jsessionid=1", "/chat/%2E%2E//./admin/x?y=1"]);
    for path in spellings {
        let (status, body) = refusal(site.gw.addr, path, "gw.test", &[]).await;
        assert_eq!(status, 403, "{path} without an Origin: {body}");
        assert!(body.contains("origin not allowed"), "{path}: {body}");
    }
    // `/` still works, and its backend saw only this connection.
    site.upgrade_to("/chat", &[], ("root", "/chat")).await;
    assert_eq!(
        site.root.pending(),
        0,
        "the / upstream saw an /admin spelling"
    );
    assert_eq!(site.admin.pending(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backends_receive_the_normalised_path_and_the_query_as_sent() {
    let mut site = Site::start().await;
    let origin = [("Origin", ADMIN_ORIGIN)];
    for path in ADMIN_SPELLINGS {
        site.upgrade_to(path, &origin, ("admin", "/admin")).await;
    }
    let cases = [
        (
            "/chat/./room//7/../8?q=/../%2e",
            "root",
            "/chat/room/8?q=/../%2e",
        ),
        ("/%7euser/%41%2a/", "root", "/~user/A%2A/"),
        ("/chat/..", "root", "/"),
        ("/api/v1/x", "api", "/api/v1/x"),
        ("/%61pi/./v1", "api", "/api/v1"),
        ("/api//v1;v=2", "api", "/api/v1;v=2"),
    ];
    for (path, backend, want) in cases {
        site.upgrade_to(path, &[], (backend, want)).await;
    }
    assert_eq!(
        site.root.pending() + site.admin.pending() + site.api.pending(),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambiguous_paths_are_400_with_the_reason() {
    let mut site = Site::start().await;
    let cases = [
        ("/a%2Fb", "encoded slash"),
        ("/admin%2f..%2fchat", "encoded slash"),
        ("/a%5cb", "backslash"),
        ("/chat\\..\\admin", "backslash"),
        ("/a%00b", "encoded NUL"),
        ("/../admin", "climbs above the root"),
        ("/chat/../../admin", "climbs above the root"),
        ("/chat/..;/admin", "dot segment with parameters"),
        ("/a%zz", "malformed percent-escape"),
        ("/a#frag", "fragment"),
        ("http://gw.test/admin", "origin-form"),
    ];
    for (path, reason) in cases {
        let (status, body) = refusal(site.gw.addr, path, "gw.test", &[]).await;
        assert_eq!(status, 400, "{path}: {body}");
        assert!(body.contains(reason), "{path}: {body}");
    }
    site.upgrade_to("/", &[], ("root", "/")).await;
    assert_eq!(site.root.pending(), 0, "the / upstream saw a refused path");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_that_are_not_host_and_port_are_400() {
    let mut site = Site::start().await;
    for host in [
        "weird\\",
        "\"quoted\"",
        "a b",
        "gw.test:http",
        "gw.test:65536",
        "[::1",
        "gw.test/admin",
        "user@gw.test",
        "ex%61mple.com",
    ] {
        let (status, body) = refusal(site.gw.addr, "/", host, &[]).await;
        assert_eq!(status, 400, "Host: {host}: {body}");
        assert!(body.contains("invalid Host header"), "Host: {host}: {body}");
    }
    site.upgrade_to("/", &[], ("root", "/")).await;
    assert_eq!(site.root.pending(), 0, "a bad Host reached the backend");
}

/// Parses a `Forwarded` value holding one element (RFC 7239 section 4): `;`-separated
/// `token=value` pairs, each value a token or a quoted-string with quoted-pairs. `None` if it
/// does not parse.
fn parse_forwarded(text: &str) -> Option<Vec<(String, String)>> {
    let tchar = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    let mut chars = text.chars().peekable();
    let mut pairs = Vec::new();
    loop {
        let mut name = String::new();
        while let Some(&c) = chars.peek().filter(|&&c| tchar(c)) {
            name.push(c);
            chars.next();
        }
        if name.is_empty() || chars.next() != Some('=') {
            return None;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            loop {
                match chars.next()? {
                    '"' => break,
                    '\\' => value.push(chars.next().filter(|c| !c.is_control())?),
                    c if c.is_control() && c != '\t' => return None,
                    c => value.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek().filter(|&&c| tchar(c)) {
                value.push(c);
                chars.next();
            }
            if value.is_empty() {
                return None;
            }
        }
        pairs.push((name.to_ascii_lowercase(), value));
        match chars.next() {
            None => return Some(pairs),
            Some(';') => {}
            Some(_) => return None,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_header_parses_at_a_tungstenite_backend() {
    let mut site = Site::start().await;
    let hosts = [
        "gw.test",
        "GW.test.:8080",
        "gw.test:",
        "127.0.0.1:9",
        "[::1]:8080",
        "a!$&'()*+,;=b.test",
        // Refused (400); before, it reached the backend inside an unterminated quoted-string.
        "weird\\",
    ];
    for host in hosts {
        let head = http_exchange(site.gw.addr, &upgrade_request("/f", host, &[])).await;
        if head.status() != 101 {
            assert_eq!(head.status(), 400, "Host: {host}");
            continue;
        }
        let conn = site.root.accept().await;
        let header = |name: &str| {
            conn.headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        };
        let forwarded = header("forwarded").unwrap_or_default();
        let pairs = parse_forwarded(forwarded)
            .unwrap_or_else(|| panic!("Host: {host}: unparseable Forwarded: {forwarded:?}"));
        let want = [("for", "127.0.0.1"), ("host", host), ("proto", "http")];
        assert_eq!(
            pairs
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect::<Vec<_>>(),
            want,
            "Host: {host}: Forwarded {forwarded:?}"
        );
        assert_eq!(header("x-forwarded-host"), Some(host), "Host: {host}");
    }
    assert_eq!(site.root.pending(), 0);
}

#[test]
fn the_forwarded_parser_refuses_what_it_should() {
    assert_eq!(
        parse_forwarded("for=\"[::1]\";host=\"a\\\"b\";proto=http"),
        Some(vec![
            ("for".into(), "[::1]".into()),
            ("host".into(), "a\"b".into()),
            ("proto".into(), "http".into()),
        ])
    );
    for bad in [
        "for=127.0.0.1;host=\"weird\\\";proto=http",
        "host=a:b",
        "host=",
        "=x",
        "for=a,for=b",
        "host=\"unterminated",
    ] {
        assert_eq!(parse_forwarded(bad), None, "{bad}");
    }
}
