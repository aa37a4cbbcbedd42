//! Opening a WebSocket connection: TCP connect, then the HTTP/1.1 upgrade (codec's client
//! handshake), each step timed.

use std::io;
use std::time::{Duration, Instant};

use codec::handshake::{ClientHandshake, HeadLimits, ServerResponse};

use crate::errors::ErrorKind;
use crate::io::{Conn, timeout_at};
use crate::target::Target;

/// An upgraded connection.
pub(crate) struct Opened {
    /// The socket.
    pub(crate) conn: Conn,
    /// Bytes that followed the 101 (frames already sent by the server), with room to read.
    pub(crate) buf: Vec<u8>,
    /// When TCP was connected.
    pub(crate) connected: Instant,
    /// When the 101 was parsed.
    pub(crate) upgraded: Instant,
}

/// Why a connection could not be opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct OpenError {
    /// The kind to count.
    pub(crate) kind: ErrorKind,
    /// The HTTP status, for [`ErrorKind::HandshakeStatus`].
    pub(crate) status: Option<u16>,
}

impl From<ErrorKind> for OpenError {
    fn from(kind: ErrorKind) -> Self {
        Self { kind, status: None }
    }
}

fn connect_error(e: &io::Error) -> ErrorKind {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => ErrorKind::ConnectRefused,
        io::ErrorKind::TimedOut => ErrorKind::ConnectTimeout,
        _ => ErrorKind::ConnectFailed,
    }
}

/// Connects to `target` and upgrades, all within `timeout`. The read buffer starts with
/// `capacity` bytes.
pub(crate) async fn open(
    target: &Target,
    timeout: Duration,
    capacity: usize,
) -> Result<Opened, OpenError> {
    let deadline = Instant::now() + timeout;
    let conn = Conn::connect(target.addr, deadline)
        .await
        .map_err(|e| OpenError::from(connect_error(&e)))?;
    let connected = Instant::now();
    let result = upgrade(&conn, target, deadline, capacity).await;
    match result {
        Ok(buf) => Ok(Opened {
            conn,
            buf,
            connected,
            upgraded: Instant::now(),
        }),
        Err(e) => {
            conn.shutdown();
            Err(e)
        }
    }
}

async fn upgrade(
    conn: &Conn,
    target: &Target,
    deadline: Instant,
    capacity: usize,
) -> Result<Vec<u8>, OpenError> {
    let mut handshake = ClientHandshake::new();
    let mut request = Vec::with_capacity(256);
    handshake.write_request(&mut request, &target.host, &target.path, None, None, &[]);
    let (written, _) = timeout_at(deadline, conn.write_all(request))
        .await
        .ok_or(ErrorKind::ConnectTimeout)?;
    written.map_err(|_| ErrorKind::Io)?;

    let limits = HeadLimits::default();
    let mut buf = Vec::with_capacity(capacity.max(512));
    loop {
        if buf.len() == buf.capacity() {
            buf.reserve(buf.capacity());
        }
        let (read, b) = timeout_at(deadline, conn.read_more(buf))
            .await
            .ok_or(ErrorKind::ConnectTimeout)?;
        buf = b;
        match read {
            Err(_) => return Err(ErrorKind::Io.into()),
            Ok(0) => return Err(ErrorKind::HandshakeInvalid.into()),
            Ok(_) => {}
        }
        match handshake.parse_response(&buf, &limits) {
            Ok(None) => {}
            Ok(Some((ServerResponse::Upgraded { .. }, head))) => {
                buf.drain(..head);
                return Ok(buf);
            }
            Ok(Some((ServerResponse::Rejected { status }, _))) => {
                return Err(OpenError {
                    kind: ErrorKind::HandshakeStatus,
                    status: Some(status),
                });
            }
            Err(_) => return Err(ErrorKind::HandshakeInvalid.into()),
        }
    }
}
