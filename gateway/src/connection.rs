//! The connection actor: client handshake, admission, routing, the upstream leg, the relay,
//! and the access log.
#![forbid(unsafe_code)]

use std::net::{Shutdown, SocketAddr};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use codec::handshake::{
    self, HandshakeError, HeadLimits, UpgradeRequest, offers_permessage_deflate,
};

use crate::config::{Route, Upstream};
use crate::keepalive::Keepalive;
use crate::relay::{MIN_READ, Outcome, Relay, Settings};
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
pub(crate) async fn serve(stream: Stream, client: SocketAddr, core: Rc<Core>) {
    let started = Instant::now();
    drop(stream.set_nodelay());
    // The generation current at accept time serves this connection to its end: a reload
    // never changes an established connection.
    let generation = core.shared.current();
    let cfg = &generation.config;
    let limits = &cfg.global_limits;
    let hello = tokio::time::timeout(
        limits.handshake_timeout,
        Box::pin(read_request(&stream, &limits.head_limits)),
    );
    let (req, leftover) = match hello.await {
        Ok(ClientHello::Request(req, leftover)) => (req, leftover),
        Ok(ClientHello::Refused(e)) => {
            let mut out = Vec::new();
            e.write_response(&mut out);
            respond(&stream, &core, e.http_status(), out).await;
            tracing::info!(%client, status = e.http_status(), error = e.as_str(), "handshake refused");
            return;
        }
        Ok(ClientHello::Gone(why)) => {
            tracing::debug!(%client, why, "client left before upgrading");
            return;
        }
        Err(_) => {
            tracing::info!(%client, "handshake timed out");
            stream.shutdown(Shutdown::Both);
            return;
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
        return respond(&stream, &core, 503, out).await;
    }
    let admitted = core.shared.admission.admit(
        client.ip(),
        limits.max_connections,
        limits.max_connections_per_ip,
    );
    let _admitted = match admitted {
        Ok(admitted) => admitted,
        Err(refusal) => {
            tracing::info!(%client, path = req.path, why = refusal.as_str(), "upgrade refused");
            let out = plain(
                429,
                "Too Many Requests",
                refusal.as_str(),
                "Retry-After: 1\r\n",
            );
            return respond(&stream, &core, 429, out).await;
        }
    };
    let Some(route) = cfg.route(&req.host, &req.path) else {
        tracing::info!(%client, host = req.host, path = req.path, "no route");
        let out = plain(404, "Not Found", "no route for this host and path", "");
        return respond(&stream, &core, 404, out).await;
    };
    if !route.allows_origin(req.header("Origin")) {
        let origin = req.header("Origin").map(String::from_utf8_lossy);
        let upstream = cfg.upstream_name(route.upstream);
        tracing::info!(%client, path = req.path, upstream, origin = ?origin, "origin not allowed");
        let out = plain(403, "Forbidden", "origin not allowed", "");
        return respond(&stream, &core, 403, out).await;
    }
    let settings = settings(&generation);
    let conn = Conn {
        stream,
        client,
        core: &core,
        route,
        settings,
        started,
        req,
        leftover,
    };
    match route.upstream {
        // Each phase is boxed: a task's future is as large as its largest state, and every
        // idle connection pays for it.
        Upstream::Echo => Box::pin(conn.echo()).await,
        Upstream::Pool(pool) => Box::pin(conn.proxy(&generation, pool)).await,
    }
}

/// The per-connection settings a generation implies.
fn settings(generation: &Generation) -> Settings {
    let t = &generation.config.timeouts;
    Settings {
        close_timeout: t.close,
        keepalive: Keepalive {
            ping_interval: t.ping_interval.unwrap_or(Duration::ZERO),
            pong_timeout: t.pong_timeout,
            idle: t.idle.unwrap_or(Duration::ZERO),
        },
        buffer: generation.config.global_limits.write_buffer.max(MIN_READ),
        limits: generation.config.global_limits.message,
        deflate: false,
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
}

impl Conn<'_> {
    /// Upgrades the client and serves it from the embedded echo.
    async fn echo(self) {
        let mut out = Vec::new();
        handshake::write_response(&mut out, &self.req.key, None, None);
        self.core.metrics.upgrade(101);
        if self.stream.write_all(&mut out).await.is_err() {
            return;
        }
        let path = {
            let req = self.req;
            req.path
        };
        let outcome = crate::echo::serve(
            self.stream,
            compact(self.leftover),
            Settings {
                limits: self.route.limits,
                ..self.settings
            },
            &self.core.drain,
            &self.core.metrics,
        )
        .await;
        access_log(self.client, &path, "echo", self.started, &outcome);
    }

    /// Connects the backend leg and relays.
    async fn proxy(self, generation: &Generation, pool_index: usize) {
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
            Err(e) => return self.refuse(pool, e).await,
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
            return;
        }
        let deflate = up
            .extensions
            .as_deref()
            .is_some_and(offers_permessage_deflate);
        let backend_name = pool.backends[up.backend].to_string();
        // Keep only what the access log needs: the rest of the request (its headers) is
        // dropped here rather than live as long as the connection.
        let path = {
            let req = self.req;
            req.path
        };
        let _active = up.active;
        let settings = Settings {
            limits: self.route.limits,
            deflate,
            ..self.settings
        };
        let relay = Relay::new(
            self.stream,
            up.stream,
            settings,
            Arc::clone(&self.core.metrics),
        );
        let outcome = relay
            .run(
                compact(self.leftover),
                compact(up.leftover),
                &self.core.drain,
            )
            .await;
        access_log(self.client, &path, &backend_name, self.started, &outcome);
    }

    /// Answers a client whose upgrade no backend took: 502, or the backend's own refusal.
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
        let (backend, why, out) = match e {
            UpstreamError::Unreachable => (None, "no backend available", bad_gateway()),
            UpstreamError::BadHandshake(i, e) => (Some(i), e.as_str(), bad_gateway()),
            UpstreamError::HandshakeFailed(i) => (
                Some(i),
                "backend handshake failed or timed out",
                bad_gateway(),
            ),
            UpstreamError::Rejected {
                backend, response, ..
            } => (Some(backend), "backend refused the upgrade", response),
        };
        respond(&self.stream, self.core, status, out).await;
        let backend = backend.map(|i| pool.backends[i].to_string());
        tracing::info!(
            client = %self.client,
            path = self.req.path,
            pool = pool.name,
            backend,
            status,
            why,
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

/// Handshake buffers become the relay's first read buffers: trim them to the idle size, since
/// every idle connection keeps its pending reads' buffers.
fn compact(mut buf: Vec<u8>) -> Vec<u8> {
    buf.shrink_to(MIN_READ);
    buf
}

/// A small plain-text HTTP answer that closes the connection.
fn plain(status: u16, reason: &str, body: &str, extra_headers: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status} {reason}\r\nConnection: close\r\n{extra_headers}Content-Type: \
         text/plain; charset=utf-8\r\nContent-Length: {}\r\n\r\n{body}\n",
        body.len() + 1
    )
    .into_bytes()
}

fn access_log(client: SocketAddr, path: &str, backend: &str, started: Instant, o: &Outcome) {
    tracing::info!(
        %client,
        path,
        backend,
        duration_ms = started.elapsed().as_millis() as u64,
        bytes_in = o.bytes_in,
        bytes_out = o.bytes_out,
        close_code = o.close_code.map_or(1006, codec::CloseCode::get),
        closed_by = o.closed_by.unwrap_or("gateway"),
        close_timeout = o.timed_out,
        "connection closed"
    );
}
