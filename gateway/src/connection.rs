//! The connection actor: client handshake, upstream leg, relay, access log.
#![forbid(unsafe_code)]

use std::net::{Shutdown, SocketAddr};
use std::rc::Rc;
use std::time::Instant;

use codec::frame::Role;
use codec::handshake::{self, HandshakeError, UpgradeRequest, offers_permessage_deflate};

use crate::forward::{Forwarder, Mode};
use crate::relay::{Outcome, Relay};
use crate::upstream::UpstreamError;
use crate::uring::Stream;
use crate::worker::Core;

/// Why the client handshake did not produce a request.
enum ClientHello {
    /// A valid upgrade request and the bytes that followed it.
    Request(UpgradeRequest, Vec<u8>),
    /// The request was refused with this error's status.
    Refused(HandshakeError),
    /// The client went away or the handshake timed out.
    Gone(&'static str),
}

/// Serves one accepted connection to the end.
pub(crate) async fn serve(stream: Stream, client: SocketAddr, core: Rc<Core>) {
    let started = Instant::now();
    drop(stream.set_nodelay());
    let cfg = &core.config;
    let hello = tokio::time::timeout(cfg.handshake_timeout, read_request(&stream, &core));
    let (req, leftover) = match hello.await {
        Ok(ClientHello::Request(req, leftover)) => (req, leftover),
        Ok(ClientHello::Refused(e)) => {
            let mut out = Vec::new();
            e.write_response(&mut out);
            drop(stream.write_all(&mut out).await);
            stream.shutdown(Shutdown::Both);
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
        // Accepted just before the drain began: refuse the upgrade rather than start a
        // WebSocket that would be closed at once.
        let mut out = unavailable();
        drop(stream.write_all(&mut out).await);
        stream.shutdown(Shutdown::Both);
        return;
    }

    if cfg.backends.is_empty() {
        return serve_echo(stream, client, req, leftover, &core, started).await;
    }

    let upstream = crate::upstream::open(
        &cfg.backends,
        &core.round_robin,
        &req,
        client,
        cfg.connect_timeout,
        &cfg.head_limits,
    )
    .await;
    let up = match upstream {
        Ok(up) => up,
        Err(e) => return refuse(&stream, client, &req, &core, e).await,
    };

    let mut out = Vec::new();
    handshake::write_response(
        &mut out,
        &req.key,
        up.protocol.as_deref(),
        up.extensions.as_deref(),
    );
    if stream.write_all(&mut out).await.is_err() {
        up.stream.shutdown(Shutdown::Both);
        return;
    }
    let deflate = up
        .extensions
        .as_deref()
        .is_some_and(offers_permessage_deflate);
    let client_fwd = Forwarder::new(
        Role::Server,
        cfg.limits,
        deflate,
        Mode::Relay { mask_out: true },
    );
    let backend_fwd = Forwarder::new(
        Role::Client,
        cfg.limits,
        deflate,
        Mode::Relay { mask_out: false },
    );
    let backend_name = cfg.backends[up.backend].to_string();
    // Keep only what the access log needs: the request's headers would otherwise live as
    // long as the connection.
    let path = req.path;
    let relay = Relay::new(stream, up.stream, core.settings);
    let outcome = relay
        .run(
            (client_fwd, compact(leftover)),
            (backend_fwd, compact(up.leftover)),
            &core.drain,
        )
        .await;
    access_log(client, &path, &backend_name, started, &outcome);
}

/// Upgrades the client and serves it from the embedded echo.
async fn serve_echo(
    stream: Stream,
    client: SocketAddr,
    req: UpgradeRequest,
    leftover: Vec<u8>,
    core: &Core,
    started: Instant,
) {
    let mut out = Vec::new();
    handshake::write_response(&mut out, &req.key, None, None);
    if stream.write_all(&mut out).await.is_err() {
        return;
    }
    let path = req.path;
    let limits = core.config.limits;
    let outcome = crate::echo::serve(
        stream,
        compact(leftover),
        limits,
        core.settings,
        &core.drain,
    )
    .await;
    access_log(client, &path, "echo", started, &outcome);
}

/// Answers a client whose upgrade no backend took: 502, or the backend's own refusal.
async fn refuse(
    stream: &Stream,
    client: SocketAddr,
    req: &UpgradeRequest,
    core: &Core,
    e: UpstreamError,
) {
    let status = e.status();
    let (backend, why, mut out) = match e {
        UpstreamError::Unreachable => (None, "no backend reachable", bad_gateway()),
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
    drop(stream.write_all(&mut out).await);
    stream.shutdown(Shutdown::Both);
    let backend = backend.map(|i| core.config.backends[i].to_string());
    tracing::info!(%client, path = req.path, backend, status, why, "upgrade failed");
}

/// Reads until a complete upgrade request (or a reason to refuse it) has arrived.
async fn read_request(stream: &Stream, core: &Core) -> ClientHello {
    let limits = &core.config.head_limits;
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
    buf.shrink_to(crate::relay::MIN_READ);
    buf
}

fn unavailable() -> Vec<u8> {
    let body = "the gateway is shutting down\n";
    format!(
        "HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nRetry-After: 1\r\n\
         Content-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn bad_gateway() -> Vec<u8> {
    let body = "no backend could take the connection\n";
    format!(
        "HTTP/1.1 502 Bad Gateway\r\nConnection: close\r\nContent-Type: text/plain; \
         charset=utf-8\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
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
