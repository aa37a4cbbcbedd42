//! The connection actor: client handshake, admission, routing, the upstream leg, the relay,
//! and the access log.
#![forbid(unsafe_code)]

use std::borrow::Cow;
use std::future::Future;
use std::net::{Shutdown, SocketAddr};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use codec::handshake::{
    self, HandshakeError, HeadLimits, UpgradeRequest, offers_permessage_deflate,
};

use crate::admission::{Admitted, Refusal};
use crate::balance::ActiveGuard;
use crate::config::{Route, Upstream};
use crate::conn::{LogLine, Settings, compact, plain, route_name, settings};
use crate::relay::Relay;
use crate::reload::Generation;
use crate::upstream::{Target, UpstreamError};
use crate::uring::Stream;
use crate::worker::Core;

/// Why the client handshake did not produce a request.
enum ClientHello {
    /// A valid upgrade request and the bytes that followed it.
    Request(UpgradeRequest, Vec<u8>),
    /// The request was refused with this error's status.
    Refused(HandshakeError),
    /// The client went away before sending a complete request.
    Gone(&'static str),
}

/// Serves one accepted connection to the end.
///
/// Two phases, each boxed and finished before the next begins: a task's future is as large as
/// its largest state, and a connection that sits idle for hours should hold only what relaying
/// needs, not the handshake's request, routing state and refusal paths.
pub(crate) async fn serve(stream: Stream, client: SocketAddr, core: Rc<Core>) {
    // The session moves into its phase's box inside this block, so this future keeps no room
    // for it while the phase runs.
    let phase: Pin<Box<dyn Future<Output = ()> + '_>> = {
        let Some(session) = Box::pin(upgrade(stream, client, &core)).await else {
            return;
        };
        match session {
            Session::Echo(echo) => Box::pin(echo.run(&core)),
            Session::Proxy(proxy) => Box::pin(proxy.run(&core)),
        }
    };
    phase.await;
}

/// An upgraded connection, with only what its relaying phase needs.
#[expect(clippy::large_enum_variant)] // short-lived: each moves into its phase's box at once
enum Session {
    /// Served by the embedded echo.
    Echo(EchoSession),
    /// Relayed to a backend.
    Proxy(ProxySession),
}

/// A client upgraded onto the embedded echo.
struct EchoSession {
    stream: Stream,
    input: Vec<u8>,
    settings: Settings,
    log: LogLine,
    /// Holds the connection's admission slot until it ends.
    admitted: Admitted,
}

impl EchoSession {
    // An `async move` block rather than an `async fn`: an `async fn` keeps a second copy of
    // its by-value arguments in its future. A block captures only the fields it names, so the
    // guards are released by name at the end: otherwise they would drop as soon as the future
    // is made.
    #[expect(clippy::manual_async_fn)] // see above
    fn run(self, core: &Core) -> impl Future<Output = ()> + '_ {
        async move {
            let outcome = crate::echo::serve(
                self.stream,
                self.input,
                self.settings,
                &core.drain,
                &core.metrics,
            )
            .await;
            self.log.write(&outcome);
            drop(self.admitted);
        }
    }
}

/// A client upgraded and relayed to a backend.
struct ProxySession {
    relay: Relay,
    log: LogLine,
    /// Counts the connection toward its backend's load until it ends.
    active: ActiveGuard,
    /// Holds the connection's admission slot until it ends.
    admitted: Admitted,
}

impl ProxySession {
    // `async move`, not `async fn`, and guards released by name: see `EchoSession::run`.
    #[expect(clippy::manual_async_fn)] // see `EchoSession::run`
    fn run(self, core: &Core) -> impl Future<Output = ()> + '_ {
        async move {
            let outcome = self.relay.run(&core.drain).await;
            self.log.write(&outcome);
            drop((self.active, self.admitted));
        }
    }
}

/// Reads the client's request and answers it: an upgraded session, or a refusal (then none).
async fn upgrade(stream: Stream, client: SocketAddr, core: &Core) -> Option<Session> {
    let started = Instant::now();
    // The generation current at accept time serves this connection to its end: a reload
    // never changes an established connection.
    let generation = core.shared.current();
    let cfg = &generation.config;
    let limits = &cfg.global_limits;
    // Admitted at accept, before a byte is read: a connection that never sends its request
    // holds a descriptor and a task like any other, so it takes a slot like any other, and a
    // flood of silent connections meets the limits instead of only the descriptor limit.
    // Both limits need only the address, so the per-IP one is checked here too: otherwise
    // one address could hold every global slot with silent connections.
    let admitted = core.shared.admission.admit(
        client.ip(),
        limits.max_connections,
        limits.max_connections_per_ip,
    );
    let admitted = match admitted {
        Ok(admitted) => admitted,
        Err(refusal) => {
            Box::pin(refuse_at_accept(&stream, client, core, refusal)).await;
            return None;
        }
    };
    drop(stream.set_nodelay());
    let hello = tokio::time::timeout(
        limits.handshake_timeout,
        Box::pin(read_request(&stream, &limits.head_limits)),
    );
    let (req, leftover) = match hello.await {
        Ok(ClientHello::Request(req, leftover)) => (req, leftover),
        Ok(ClientHello::Refused(e)) => {
            let mut out = Vec::new();
            e.write_response(&mut out);
            respond(&stream, core, e.http_status(), out).await;
            tracing::info!(%client, status = e.http_status(), why = e.as_str(), "handshake refused");
            return None;
        }
        Ok(ClientHello::Gone(why)) => {
            tracing::debug!(%client, why, "client left before upgrading");
            return None;
        }
        Err(_) => {
            tracing::info!(%client, "handshake timed out");
            stream.shutdown(Shutdown::Both);
            return None;
        }
    };
    if core.drain.is_draining() {
        // Accepted just before the drain began: refuse rather than start a WebSocket that
        // would be closed at once.
        let out = plain(
            503,
            "Service Unavailable",
            "the gateway is shutting down",
            "Retry-After: 1\r\n",
        );
        respond(&stream, core, 503, out).await;
        return None;
    }
    // `req.path` is already normalised (codec::target): the route matches the very path the
    // backend will be sent, so no spelling of `/admin` can take another route's rules.
    let Some(route) = cfg.route(&req.host, &req.path) else {
        tracing::info!(%client, host = req.host, path = req.path, "no route");
        let out = plain(404, "Not Found", "no route for this host and path", "");
        respond(&stream, core, 404, out).await;
        return None;
    };
    if !route.allows_origin(req.header("Origin")) {
        let origin = req
            .header("Origin")
            .map_or("none".into(), String::from_utf8_lossy);
        let upstream = cfg.upstream_name(route.upstream);
        tracing::info!(%client, path = req.path, upstream, origin = &*origin, "origin not allowed");
        let out = plain(403, "Forbidden", "origin not allowed", "");
        respond(&stream, core, 403, out).await;
        return None;
    }
    let settings = settings(&generation);
    let conn = Conn {
        stream,
        client,
        core,
        route,
        settings,
        started,
        req,
        leftover,
        admitted,
    };
    match route.upstream {
        Upstream::Echo => conn.echo().await,
        Upstream::Pool(pool) => Box::pin(conn.proxy(&generation, pool)).await,
    }
}

/// An upgraded-to-be connection with its route.
struct Conn<'a> {
    stream: Stream,
    client: SocketAddr,
    core: &'a Core,
    route: &'a Route,
    settings: Settings,
    started: Instant,
    req: UpgradeRequest,
    leftover: Vec<u8>,
    admitted: Admitted,
}

impl Conn<'_> {
    /// Upgrades the client onto the embedded echo.
    async fn echo(self) -> Option<Session> {
        let mut out = Vec::new();
        handshake::write_response(&mut out, &self.req.key, None, None);
        self.core.metrics.upgrade(101);
        if self.stream.write_all(&mut out).await.is_err() {
            return None;
        }
        Some(Session::Echo(EchoSession {
            stream: self.stream,
            input: compact(self.leftover),
            settings: Settings {
                limits: self.route.limits,
                ..self.settings
            },
            log: LogLine {
                client: self.client,
                route: route_name(self.route),
                path: self.req.path,
                backend: String::from("echo"),
                started: self.started,
            },
            admitted: self.admitted,
        }))
    }

    /// Connects the backend leg and upgrades the client (or refuses it: then none).
    async fn proxy(self, generation: &Generation, pool_index: usize) -> Option<Session> {
        let cfg = &generation.config;
        let pool = &cfg.pools[pool_index];
        let target = Target {
            pool,
            runtime: &generation.pools[pool_index],
            cursor: &self.core.cursor,
            connect_timeout: cfg.timeouts.connect,
            head_limits: &cfg.global_limits.head_limits,
        };
        let up = match Box::pin(crate::upstream::open(&target, &self.req, self.client)).await {
            Ok(up) => up,
            Err(e) => {
                Box::pin(self.refuse(pool, e)).await;
                return None;
            }
        };
        let mut out = Vec::new();
        handshake::write_response(
            &mut out,
            &self.req.key,
            up.protocol.as_deref(),
            up.extensions.as_deref(),
        );
        self.core.metrics.upgrade(101);
        if self.stream.write_all(&mut out).await.is_err() {
            up.stream.shutdown(Shutdown::Both);
            return None;
        }
        let deflate = up
            .extensions
            .as_deref()
            .is_some_and(offers_permessage_deflate);
        let settings = Settings {
            limits: self.route.limits,
            deflate,
            ..self.settings
        };
        // The request's headers end here: only the path lives on, for the access log.
        Some(Session::Proxy(ProxySession {
            relay: Relay::new(
                (self.stream, compact(self.leftover)),
                (up.stream, compact(up.leftover)),
                settings,
                Arc::clone(&self.core.metrics),
            ),
            log: LogLine {
                client: self.client,
                route: route_name(self.route),
                path: self.req.path,
                backend: pool.backends[up.backend].to_string(),
                started: self.started,
            },
            active: up.active,
            admitted: self.admitted,
        }))
    }

    /// Answers a client whose upgrade no backend took: 502, 503 when the gateway itself ran
    /// out of a resource, or the backend's own refusal.
    async fn refuse(self, pool: &crate::config::Pool, e: UpstreamError) {
        let status = e.status();
        let bad_gateway = || {
            plain(
                502,
                "Bad Gateway",
                "no backend could take the connection",
                "",
            )
        };
        let (backend, why, out): (_, Cow<'static, str>, _) = match e {
            UpstreamError::Unreachable => (None, "no backend available".into(), bad_gateway()),
            UpstreamError::Local {
                backend,
                why,
                error,
            } => {
                self.core.metrics.local_error(why);
                let out = plain(
                    503,
                    "Service Unavailable",
                    why.explain(),
                    "Retry-After: 1\r\n",
                );
                // The OS's words (`Too many open files (os error 24)`): the operator's clue.
                (Some(backend), error.to_string().into(), out)
            }
            UpstreamError::BadHandshake(i, e) => (Some(i), e.as_str().into(), bad_gateway()),
            UpstreamError::HandshakeFailed(i) => (
                Some(i),
                "backend handshake failed or timed out".into(),
                bad_gateway(),
            ),
            UpstreamError::Rejected {
                backend, response, ..
            } => (
                Some(backend),
                "backend refused the upgrade".into(),
                response,
            ),
        };
        respond(&self.stream, self.core, status, out).await;
        let backend = backend.map(|i| pool.backends[i].to_string());
        tracing::info!(
            client = %self.client,
            path = self.req.path,
            upstream = pool.name,
            backend,
            status,
            why = &*why,
            "upgrade failed"
        );
    }
}

/// Writes a whole HTTP answer, counts it, and closes the connection.
async fn respond(stream: &Stream, core: &Core, status: u16, mut out: Vec<u8>) {
    core.metrics.upgrade(status);
    drop(stream.write_all(&mut out).await);
    stream.shutdown(Shutdown::Both);
}

/// How long a connection refused at accept is kept to take in what the client sent, at most.
pub(crate) const REFUSAL_LINGER: Duration = Duration::from_millis(500);

/// Refuses a connection over a limit as soon as it is accepted: answers 429 at once without
/// reading the request (the limits need only the address), and lets go of it.
///
/// An answer rather than a bare close, so a client that asked in good faith learns why and
/// when to retry (`Retry-After`); it costs one small write. Closing a socket with unread input
/// makes the kernel send a reset, which can destroy the answer on its way: so the answer is
/// followed by a FIN (the client reads it and an EOF at once), and the input is drained until
/// the client closes, for at most [`REFUSAL_LINGER`]. The connection holds no slot meanwhile.
async fn refuse_at_accept(stream: &Stream, client: SocketAddr, core: &Core, refusal: Refusal) {
    tracing::info!(%client, why = refusal.as_str(), "upgrade refused");
    core.metrics.upgrade(429);
    let mut out = plain(
        429,
        "Too Many Requests",
        refusal.as_str(),
        "Retry-After: 1\r\n",
    );
    if stream.write_all(&mut out).await.is_err() {
        return;
    }
    stream.shutdown(Shutdown::Write);
    let drain = async {
        let mut sink = Vec::with_capacity(1024);
        let mut taken = 0;
        while taken < 64 * 1024 {
            sink.clear();
            match stream.read_more(&mut sink, 1024).await {
                Ok(n @ 1..) => taken += n,
                _ => break,
            }
        }
    };
    drop(tokio::time::timeout(REFUSAL_LINGER, drain).await);
}

/// Reads until a complete upgrade request (or a reason to refuse it) has arrived.
async fn read_request(stream: &Stream, limits: &HeadLimits) -> ClientHello {
    let mut buf = Vec::with_capacity(1024);
    loop {
        match stream.read_more(&mut buf, 1024).await {
            Ok(0) => return ClientHello::Gone("eof"),
            Err(_) => return ClientHello::Gone("read error"),
            Ok(_) => {}
        }
        match handshake::parse_request(&buf, limits) {
            Ok(None) => {}
            Ok(Some((req, consumed))) => {
                buf.drain(..consumed);
                return ClientHello::Request(req, buf);
            }
            Err(e) => return ClientHello::Refused(e),
        }
    }
}
