//! A connection before its `101`: admission, the client's request, routing, the backend's
//! connect and upgrade, and every refusal, as an explicit state machine driven by [`Event`]s.
//!
//! It does what the async `connection::upgrade` and `upstream::open` do, step for step: the same
//! answers, log lines, metrics, passive-ejection bookkeeping and timeouts. Each state has at
//! most one operation in flight per leg, and the machine ends ([`UpgradeStep::Done`]) or hands
//! over ([`UpgradeStep::Upgraded`]) only once none is.
#![forbid(unsafe_code)]

use std::borrow::Cow;
use std::io;
use std::net::{Shutdown, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use codec::handshake::{
    self, ClientHandshake, HandshakeError, ServerResponse, UpgradeRequest,
    offers_permessage_deflate,
};

use crate::config::reload::{Generation, PoolRuntime};
use crate::config::{Balance, Config, Route, Upstream};
use crate::conn::stamp::Stamp;
use crate::conn::{
    CoreCtx, Event, Io, Kept, LogLine, OpKind, Phase, UpgradeStep, Upgraded, compact, unpool,
};
use crate::metrics::CoreMetrics;
use crate::policy::Refusal;
use crate::relay::lifecycle::Side;
use crate::upgrade::admission::Admitted;
use crate::upstream::balance::{ActiveGuard, HashInput, hash_input};
use crate::upstream::{LocalError, MAX_REJECTION, UpstreamError, backend_failed};

/// How long a connection refused at accept is kept to take in what the client sent, at most.
const REFUSAL_LINGER: Duration = Duration::from_millis(500);

/// Room each read of a request or response head reserves (as the async reads did), and the
/// size of the buffer a refused client's input is drained through.
const HEAD_READ: usize = 1024;

/// Room each read of a backend rejection's body reserves.
const BODY_READ: usize = 4096;

/// Bytes of a client refused at accept that are read and thrown away, at most.
const LINGER_BYTES: usize = 64 * 1024;

/// How long a backend's rejection body is read for, at most, before it is passed on.
const REJECTION_BODY: Duration = Duration::from_millis(200);

/// One connection until its `101` or its refusal.
pub(crate) struct Upgrade {
    /// What every state shares.
    conn: Conn,
    /// Where the upgrade stands.
    state: State,
}

/// What stays fixed from accept to the end of the upgrade.
struct Conn {
    /// The client's address.
    client: SocketAddr,
    /// When the connection was accepted (the access log's start).
    started: Instant,
    /// The generation current at accept: a reload never changes a connection under way.
    generation: Arc<Generation>,
}

/// Where an upgrade stands; the comment says what is in flight.
enum State {
    /// Over a limit at accept: the 429 is being written (a send on the client).
    Refusing(Writing),
    /// The 429 went out and the client's write side is shut: its input is read and thrown
    /// away until it closes, 64 KiB have come or the linger deadline passes, so closing the
    /// socket sends no reset that could destroy the answer (a read on the client).
    Lingering {
        /// Bytes thrown away so far.
        taken: usize,
        /// The end of the linger.
        deadline: Deadline,
    },
    /// Reading the client's request until the handshake deadline (a read on the client).
    Reading {
        /// The connection's slot, taken at accept.
        admitted: Admitted,
        /// The handshake timeout.
        deadline: Deadline,
    },
    /// Writing a refusal; then the client is shut down, `then` is logged, and the connection
    /// is done (a send on the client).
    Responding {
        /// The refusal.
        write: Writing,
        /// The log line that follows the answer.
        then: Then,
        /// The connection's slot, held until the answer is out (none at accept).
        admitted: Option<Admitted>,
    },
    /// Connecting to one candidate backend under the connect timeout (the backend's connect).
    Connecting {
        /// The request and the backends left to try.
        attempt: Attempt,
        /// The candidate.
        leg: Leg,
        /// The connect timeout.
        deadline: Deadline,
    },
    /// Writing the upstream request to a connected backend, under the connect timeout once
    /// more (a send on the backend).
    Requesting {
        /// The request and the backends left to try.
        attempt: Attempt,
        /// The backend.
        leg: Leg,
        /// Checks the backend's answer against what was offered.
        hs: ClientHandshake,
        /// The upstream request.
        write: Writing,
        /// The upgrade timeout, covering this write and the answer's read.
        deadline: Deadline,
    },
    /// Reading the backend's answer under the same deadline (a read on the backend).
    Answering {
        /// The request and the backends left to try.
        attempt: Attempt,
        /// The backend.
        leg: Leg,
        /// Checks the backend's answer against what was offered.
        hs: ClientHandshake,
        /// The upgrade timeout.
        deadline: Deadline,
    },
    /// The backend refused the upgrade: its body is read for a moment, to be passed on to the
    /// client with its head (a read on the backend).
    Rejected {
        /// The request (no other backend is tried).
        attempt: Attempt,
        /// The backend.
        leg: Leg,
        /// The backend's status.
        status: u16,
        /// The end of the body's read.
        deadline: Deadline,
    },
    /// Writing the `101` to the client; then the relaying phase takes over (a send on the
    /// client).
    Accepting {
        /// The request.
        routed: Routed,
        /// The upgraded backend leg; `None` for the echo.
        backend: Option<Accepted>,
        /// The `101`.
        write: Writing,
    },
    /// Finished, refused or handed over: nothing in flight, no event expected.
    Done,
}

/// An admitted, parsed and routed request.
struct Routed {
    /// The client's request.
    req: UpgradeRequest,
    /// Bytes the client sent after it.
    leftover: Vec<u8>,
    /// The connection's slot.
    admitted: Admitted,
    /// Its route, an index into the generation's routes.
    route: usize,
}

/// A proxied request's way through its pool's balancing order.
struct Attempt {
    /// The request.
    routed: Routed,
    /// The pool, an index into the generation's pools.
    pool: usize,
    /// Backends to try, in the balancing order taken when the attempt started.
    candidates: Vec<usize>,
    /// The next candidate to try.
    next: usize,
}

/// The backend being tried.
struct Leg {
    /// Its index in the pool.
    index: usize,
    /// Counts it toward its load from the attempt's start, so least-connections sees
    /// handshakes in flight.
    active: ActiveGuard,
}

/// A backend that accepted the upgrade.
struct Accepted {
    /// The pool, an index into the generation's pools.
    pool: usize,
    /// The backend's index in the pool.
    index: usize,
    /// Bytes the backend sent after its `101`.
    leftover: Vec<u8>,
    /// Counts the connection toward the backend's load until it ends.
    active: ActiveGuard,
    /// permessage-deflate was negotiated.
    deflate: bool,
}

/// A whole buffer on its way to one leg, one possibly short send at a time; the buffer
/// itself is in flight.
#[derive(Clone, Copy, Debug)]
struct Writing {
    /// Bytes written so far.
    written: usize,
    /// Bytes to write.
    len: usize,
}

/// How one send's completion left a [`Writing`].
enum Wrote {
    /// The rest was sent again.
    Pending,
    /// Everything went; the buffer is back.
    Whole(Vec<u8>),
    /// The leg failed (or took nothing).
    Failed,
}

impl Writing {
    /// Starts writing all of `buf` to `side`.
    fn start(io: &mut dyn Io, side: Side, buf: Vec<u8>) -> Self {
        let len = buf.len();
        io.send(side, buf, 0, len, false);
        Self { written: 0, len }
    }

    /// Takes one send's completion: sends the rest, or says how the write ended.
    fn on_sent(
        &mut self,
        io: &mut dyn Io,
        side: Side,
        buf: Vec<u8>,
        result: &io::Result<usize>,
    ) -> Wrote {
        match result {
            Ok(n @ 1..) => {
                self.written += n;
                if self.written >= self.len {
                    Wrote::Whole(buf)
                } else {
                    io.send(side, buf, self.written, self.len, false);
                    Wrote::Pending
                }
            }
            // A write that moves nothing would never finish (`WriteZero`).
            Ok(0) | Err(_) => Wrote::Failed,
        }
    }
}

/// A time an operation in flight must finish by. Once it passes, the operation is cancelled
/// and its completion (which comes whatever happens) ends the state.
#[derive(Clone, Copy, Debug)]
struct Deadline {
    /// When.
    at: Instant,
    /// It passed, and the operation was cancelled.
    passed: bool,
}

impl Deadline {
    /// A deadline `after` from now, with a wake-up asked for it.
    fn after(io: &mut dyn Io, after: Duration) -> Self {
        let at = io.now() + after;
        Self::at(io, at)
    }

    /// A deadline at `at`, with a wake-up asked for it.
    fn at(io: &mut dyn Io, at: Instant) -> Self {
        io.wake_at(at);
        Self { at, passed: false }
    }

    /// On a timer event: true the first time the deadline is found passed (the caller then
    /// cancels its operation); else the wake-up is asked for again, since timers may come
    /// early.
    fn expired(&mut self, io: &mut dyn Io) -> bool {
        if self.passed {
            return false;
        }
        if io.now() >= self.at {
            self.passed = true;
            return true;
        }
        io.wake_at(self.at);
        false
    }
}

/// How a backend's upgrade went wrong.
#[derive(Clone, Copy, Debug)]
enum Failed {
    /// It answered with something that is not a valid `101`.
    Bad(HandshakeError),
    /// It closed the connection, or a read or write on it failed.
    Lost,
    /// No answer within the connect timeout.
    TimedOut,
}

impl Failed {
    /// Why, for the backend's failure log line.
    fn why(self) -> &'static str {
        match self {
            Self::Bad(e) => e.as_str(),
            Self::Lost => "connection lost during the upgrade",
            Self::TimedOut => "upgrade timed out",
        }
    }

    /// What the client's answer is made from.
    fn error(self, backend: usize) -> UpstreamError {
        match self {
            Self::Bad(e) => UpstreamError::BadHandshake(backend, e),
            Self::Lost | Self::TimedOut => UpstreamError::HandshakeFailed(backend),
        }
    }
}

/// The log line written once a refusal's answer is out.
enum Then {
    /// None (it was written when the refusal was decided, or there is none).
    Nothing,
    /// The client's request was refused.
    HandshakeRefused(HandshakeError),
    /// No backend took the upgrade.
    UpgradeFailed {
        /// The request's path.
        path: String,
        /// The pool, an index into the generation's pools.
        pool: usize,
        /// The backend that answered or failed last, if one was tried.
        backend: Option<usize>,
        /// The client's status.
        status: u16,
        /// Why, in words.
        why: Cow<'static, str>,
    },
}

/// What a transition leads to.
#[expect(
    clippy::large_enum_variant,
    reason = "a return value, moved into the machine at once"
)]
enum Next {
    /// On to this state, with its operations in flight.
    Wait(State),
    /// The connection is done: nothing in flight.
    Finished,
    /// The relaying phase takes over: nothing in flight.
    Upgraded(Box<Upgraded>),
}

impl Upgrade {
    /// Takes a connection just accepted from `client`: admits it and starts reading its
    /// request, or refuses it with 429 (the limits need only the address, and a connection
    /// that never sends its request holds a descriptor like any other).
    pub(crate) fn start(client: SocketAddr, ctx: &CoreCtx, io: &mut dyn Io) -> (Self, UpgradeStep) {
        let conn = Conn {
            client,
            started: io.now(),
            generation: ctx.shared.current(),
        };
        let limits = &conn.generation.config.global_limits;
        let admitted = ctx.shared.admission.admit(
            client.ip(),
            limits.max_connections,
            limits.max_connections_per_ip,
        );
        let state = match admitted {
            Ok(admitted) => {
                let deadline = Deadline::at(io, conn.started + limits.handshake_timeout);
                io.recv(Side::Client, Vec::new(), HEAD_READ);
                State::Reading { admitted, deadline }
            }
            Err(refusal) => {
                tracing::info!(%client, why = refusal.as_str(), "upgrade refused");
                let refusal = Refusal::OverLimit(refusal);
                ctx.metrics.upgrade(refusal.status().0);
                State::Refusing(Writing::start(io, Side::Client, refusal.response()))
            }
        };
        let mut upgrade = Self {
            conn,
            state: State::Done,
        };
        let step = upgrade.settle(Next::Wait(state));
        (upgrade, step)
    }

    /// Takes one event: a completion of an operation this machine asked for, a timer, or a
    /// drain (which changes nothing here: a request parsed while the core drains gets 503).
    pub(crate) fn on_event(&mut self, event: Event, ctx: &CoreCtx, io: &mut dyn Io) -> UpgradeStep {
        let state = std::mem::replace(&mut self.state, State::Done);
        let next = match event {
            Event::Received { side, buf, result } => {
                let buf = unpool(io, buf);
                self.conn.received(state, side, buf, &result, ctx, io)
            }
            Event::Sent { side, buf, result } => self.conn.sent(state, side, buf, &result, ctx, io),
            Event::Connected(result) => self.conn.connected(state, result, ctx, io),
            Event::Timer => Next::Wait(self.conn.timer(state, io)),
            Event::Drain(_) => Next::Wait(state),
        };
        self.settle(next)
    }

    /// Keeps the next state and says what the loop is to do.
    fn settle(&mut self, next: Next) -> UpgradeStep {
        match next {
            Next::Wait(state) => {
                self.state = state;
                UpgradeStep::Running
            }
            Next::Finished => UpgradeStep::Done,
            Next::Upgraded(upgraded) => UpgradeStep::Upgraded(upgraded),
        }
    }
}

/// An event the state has no operation for: the loop broke its contract. The state stays as
/// it was (a stray buffer is dropped).
fn stray(state: State, what: &str) -> Next {
    debug_assert!(false, "upgrade: {what} with no such operation in flight");
    Next::Wait(state)
}

impl Conn {
    /// The configuration this connection runs under.
    fn config(&self) -> &Config {
        &self.generation.config
    }

    /// A read finished.
    fn received(
        &self,
        state: State,
        side: Side,
        mut buf: Vec<u8>,
        result: &io::Result<usize>,
        ctx: &CoreCtx,
        io: &mut dyn Io,
    ) -> Next {
        match (state, side) {
            (State::Reading { admitted, deadline }, Side::Client) => {
                self.request_read(admitted, deadline, buf, result, ctx, io)
            }
            (State::Lingering { taken, deadline }, Side::Client) => match result {
                Ok(n @ 1..) if !deadline.passed => {
                    let taken = taken + n;
                    if taken >= LINGER_BYTES || io.now() >= deadline.at {
                        return Next::Finished;
                    }
                    buf.clear();
                    io.recv(Side::Client, buf, HEAD_READ);
                    Next::Wait(State::Lingering { taken, deadline })
                }
                _ => Next::Finished,
            },
            (
                State::Answering {
                    attempt,
                    leg,
                    hs,
                    deadline,
                },
                Side::Backend,
            ) => {
                let limits = &self.config().global_limits.head_limits;
                let answer = if deadline.passed {
                    Err(Failed::TimedOut)
                } else if matches!(result, Ok(1..)) {
                    hs.parse_response(&buf, limits).map_err(Failed::Bad)
                } else {
                    Err(Failed::Lost)
                };
                match answer {
                    Ok(None) => {
                        io.recv(Side::Backend, buf, HEAD_READ);
                        Next::Wait(State::Answering {
                            attempt,
                            leg,
                            hs,
                            deadline,
                        })
                    }
                    Ok(Some((
                        ServerResponse::Upgraded {
                            protocol,
                            extensions,
                        },
                        head,
                    ))) => {
                        self.runtime(attempt.pool).state.record_success(leg.index);
                        buf.drain(..head);
                        let negotiated = (protocol.as_deref(), extensions.as_deref());
                        accept(attempt, leg, buf, negotiated, ctx, io)
                    }
                    Ok(Some((ServerResponse::Rejected { status }, _))) => {
                        self.rejected(attempt, leg, status, buf, ctx, io)
                    }
                    Err(failed) => self.upgrade_failed(attempt, leg, failed, ctx, io),
                }
            }
            (
                State::Rejected {
                    attempt,
                    leg,
                    status,
                    deadline,
                },
                Side::Backend,
            ) => {
                if matches!(result, Ok(1..)) && !deadline.passed && io.now() < deadline.at {
                    rejection_body(attempt, leg, status, deadline, buf, ctx, io)
                } else {
                    pass_rejection(attempt, leg, status, buf, ctx, io)
                }
            }
            (state, _) => stray(state, "a read finished"),
        }
    }

    /// A read of the client's request finished: reads on until the request is whole, then
    /// answers it; or refuses it, or lets a client go that left.
    fn request_read(
        &self,
        admitted: Admitted,
        deadline: Deadline,
        mut buf: Vec<u8>,
        result: &io::Result<usize>,
        ctx: &CoreCtx,
        io: &mut dyn Io,
    ) -> Next {
        if deadline.passed {
            // Logged, shut down and cancelled at the deadline.
            return Next::Finished;
        }
        let why = match result {
            Ok(0) => "eof",
            Err(_) => "read error",
            Ok(_) => {
                let limits = &self.config().global_limits.head_limits;
                return match handshake::parse_request(&buf, limits) {
                    Ok(None) => {
                        io.recv(Side::Client, buf, HEAD_READ);
                        Next::Wait(State::Reading { admitted, deadline })
                    }
                    Ok(Some((req, consumed))) => {
                        buf.drain(..consumed);
                        self.route(req, buf, admitted, ctx, io)
                    }
                    Err(e) => {
                        let mut out = Vec::new();
                        e.write_response(&mut out);
                        let then = Then::HandshakeRefused(e);
                        respond(ctx, io, e.http_status(), out, then, Some(admitted))
                    }
                };
            }
        };
        tracing::debug!(client = %self.client, why, "client left before upgrading");
        Next::Finished
    }

    /// The backend refused the upgrade with `status`: a 4xx is the application's answer, a
    /// 5xx the backend failing. Its body is read for a moment, to be passed on.
    fn rejected(
        &self,
        attempt: Attempt,
        leg: Leg,
        status: u16,
        response: Vec<u8>,
        ctx: &CoreCtx,
        io: &mut dyn Io,
    ) -> Next {
        if status >= 500 {
            let why = format!("answered {status}");
            self.count_failure(attempt.pool, leg.index, "upgrade", &why);
        } else {
            self.runtime(attempt.pool).state.record_success(leg.index);
        }
        let deadline = Deadline::after(io, REJECTION_BODY);
        rejection_body(attempt, leg, status, deadline, response, ctx, io)
    }

    /// A write finished, perhaps short.
    fn sent(
        &self,
        state: State,
        side: Side,
        buf: Vec<u8>,
        result: &io::Result<usize>,
        ctx: &CoreCtx,
        io: &mut dyn Io,
    ) -> Next {
        match (state, side) {
            (State::Refusing(mut write), Side::Client) => {
                match write.on_sent(io, side, buf, result) {
                    Wrote::Pending => Next::Wait(State::Refusing(write)),
                    Wrote::Failed => Next::Finished,
                    Wrote::Whole(_) => {
                        // A FIN after the answer, so the client reads it and an EOF at once.
                        io.shutdown(Side::Client, Shutdown::Write);
                        let deadline = Deadline::after(io, REFUSAL_LINGER);
                        io.recv(Side::Client, Vec::new(), HEAD_READ);
                        Next::Wait(State::Lingering { taken: 0, deadline })
                    }
                }
            }
            (
                State::Responding {
                    mut write,
                    then,
                    admitted,
                },
                Side::Client,
            ) => match write.on_sent(io, side, buf, result) {
                Wrote::Pending => Next::Wait(State::Responding {
                    write,
                    then,
                    admitted,
                }),
                Wrote::Whole(_) | Wrote::Failed => {
                    io.shutdown(Side::Client, Shutdown::Both);
                    self.log(then);
                    drop(admitted);
                    Next::Finished
                }
            },
            (
                State::Requesting {
                    attempt,
                    leg,
                    hs,
                    mut write,
                    deadline,
                },
                Side::Backend,
            ) => {
                if deadline.passed {
                    return self.upgrade_failed(attempt, leg, Failed::TimedOut, ctx, io);
                }
                match write.on_sent(io, side, buf, result) {
                    Wrote::Pending => Next::Wait(State::Requesting {
                        attempt,
                        leg,
                        hs,
                        write,
                        deadline,
                    }),
                    Wrote::Failed => self.upgrade_failed(attempt, leg, Failed::Lost, ctx, io),
                    Wrote::Whole(mut buf) => {
                        // The request's buffer takes the answer.
                        buf.clear();
                        io.recv(Side::Backend, buf, HEAD_READ);
                        Next::Wait(State::Answering {
                            attempt,
                            leg,
                            hs,
                            deadline,
                        })
                    }
                }
            }
            (
                State::Accepting {
                    routed,
                    backend,
                    mut write,
                },
                Side::Client,
            ) => match write.on_sent(io, side, buf, result) {
                Wrote::Pending => Next::Wait(State::Accepting {
                    routed,
                    backend,
                    write,
                }),
                Wrote::Failed => {
                    if backend.is_some() {
                        io.shutdown(Side::Backend, Shutdown::Both);
                    }
                    Next::Finished
                }
                Wrote::Whole(_) => Next::Upgraded(self.handover(routed, backend)),
            },
            (state, _) => stray(state, "a write finished"),
        }
    }

    /// The backend connect finished.
    fn connected(
        &self,
        state: State,
        result: io::Result<()>,
        ctx: &CoreCtx,
        io: &mut dyn Io,
    ) -> Next {
        let State::Connecting {
            attempt,
            leg,
            deadline,
        } = state
        else {
            return stray(state, "a connect finished");
        };
        let result = match result {
            Err(e) if deadline.passed && e.raw_os_error() == Some(libc::ECANCELED) => {
                Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))
            }
            // A connect that finished before its cancel counts as what it was.
            other => other,
        };
        match result {
            Ok(()) => {
                let backend = &self.config().pools[attempt.pool].backends[leg.index];
                let (hs, buf) =
                    crate::upstream::request(backend, &attempt.routed.req, self.client, HEAD_READ);
                let deadline = Deadline::after(io, self.config().timeouts.connect);
                let write = Writing::start(io, Side::Backend, buf);
                Next::Wait(State::Requesting {
                    attempt,
                    leg,
                    hs,
                    write,
                    deadline,
                })
            }
            Err(error) => match self.connect_failed(attempt.pool, leg, error) {
                Some(e) => refuse(attempt.routed, attempt.pool, e, ctx, io),
                None => self.next_candidate(attempt, ctx, io),
            },
        }
    }

    /// A timer fired: cancels the operation whose deadline passed (its completion then ends
    /// the state), or asks again for a deadline still ahead. States without one ignore it
    /// (a wake-up asked for by an earlier state).
    fn timer(&self, mut state: State, io: &mut dyn Io) -> State {
        match &mut state {
            State::Reading { deadline, .. } => {
                if deadline.expired(io) {
                    tracing::info!(client = %self.client, "handshake timed out");
                    io.shutdown(Side::Client, Shutdown::Both);
                    io.cancel(Side::Client, OpKind::Recv);
                }
            }
            State::Lingering { deadline, .. } => {
                if deadline.expired(io) {
                    io.cancel(Side::Client, OpKind::Recv);
                }
            }
            State::Connecting { deadline, .. } => {
                if deadline.expired(io) {
                    io.cancel(Side::Backend, OpKind::Connect);
                }
            }
            State::Requesting { deadline, .. } => {
                if deadline.expired(io) {
                    io.cancel(Side::Backend, OpKind::Send);
                }
            }
            State::Answering { deadline, .. } | State::Rejected { deadline, .. } => {
                if deadline.expired(io) {
                    io.cancel(Side::Backend, OpKind::Recv);
                }
            }
            State::Refusing(_)
            | State::Responding { .. }
            | State::Accepting { .. }
            | State::Done => {}
        }
        state
    }

    /// Answers a parsed request: 503 while draining, 404 without a route, 403 for an origin
    /// the route does not allow; else the echo's `101`, or the proxy attempt.
    fn route(
        &self,
        req: UpgradeRequest,
        leftover: Vec<u8>,
        admitted: Admitted,
        ctx: &CoreCtx,
        io: &mut dyn Io,
    ) -> Next {
        if ctx.draining.get().is_some() {
            // Accepted just before the drain began: refuse rather than start a WebSocket that
            // would be closed at once.
            return refuse_with(Refusal::Draining, ctx, io, Some(admitted));
        }
        let cfg = self.config();
        // `req.path` is already normalised (codec::target): the route matches the very path
        // the backend will be sent.
        let Some(route) = cfg.route(&req.host, &req.path) else {
            tracing::info!(client = %self.client, host = req.host, path = req.path, "no route");
            return refuse_with(Refusal::NoRoute, ctx, io, Some(admitted));
        };
        if !route.allows_origin(req.header("Origin")) {
            let origin = req
                .header("Origin")
                .map_or("none".into(), String::from_utf8_lossy);
            let upstream = cfg.upstream_name(route.upstream);
            tracing::info!(
                client = %self.client,
                path = req.path,
                upstream,
                origin = &*origin,
                "origin not allowed"
            );
            return refuse_with(Refusal::OriginRefused, ctx, io, Some(admitted));
        }
        let routed = Routed {
            route: route_index(cfg, route),
            req,
            leftover,
            admitted,
        };
        match route.upstream {
            Upstream::Echo => {
                let mut out = Vec::new();
                handshake::write_response(&mut out, &routed.req.key, None, None);
                ctx.metrics.upgrade(101);
                let write = Writing::start(io, Side::Client, out);
                Next::Wait(State::Accepting {
                    routed,
                    backend: None,
                    write,
                })
            }
            Upstream::Pool(pool) => {
                let attempt = self.attempt(routed, pool, ctx);
                self.next_candidate(attempt, ctx, io)
            }
        }
    }

    /// Starts a proxy attempt: the pool's balancing order for this request, taken once.
    fn attempt(&self, routed: Routed, pool: usize, ctx: &CoreCtx) -> Attempt {
        let config = &self.config().pools[pool];
        let ip = self.client.ip();
        let key = match &config.balance {
            Balance::Hash(key) => hash_input(key, ip, &routed.req),
            Balance::RoundRobin | Balance::LeastConnections => HashInput {
                client_ip: ip,
                header: None,
            },
        };
        let candidates = self
            .runtime(pool)
            .state
            .candidates(config, &key, &ctx.cursor);
        Attempt {
            routed,
            pool,
            candidates,
            next: 0,
        }
    }

    /// Connects to the attempt's next candidate, or answers 502 when none is left (503 when a
    /// socket could not even be made).
    fn next_candidate(&self, mut attempt: Attempt, ctx: &CoreCtx, io: &mut dyn Io) -> Next {
        while let Some(&index) = attempt.candidates.get(attempt.next) {
            attempt.next += 1;
            let leg = Leg {
                index,
                // Counted from the attempt's start, so least-connections sees handshakes in
                // flight and a burst of clients does not all pick the same idle backend.
                active: self.runtime(attempt.pool).state.connected(index),
            };
            let addr = self.config().pools[attempt.pool].backends[index].addr;
            match io.connect(addr) {
                Ok(()) => {
                    let deadline = Deadline::after(io, self.config().timeouts.connect);
                    return Next::Wait(State::Connecting {
                        attempt,
                        leg,
                        deadline,
                    });
                }
                Err(error) => {
                    if let Some(e) = self.connect_failed(attempt.pool, leg, error) {
                        return refuse(attempt.routed, attempt.pool, e, ctx, io);
                    }
                }
            }
        }
        refuse(
            attempt.routed,
            attempt.pool,
            UpstreamError::Unreachable,
            ctx,
            io,
        )
    }

    /// A connect that failed. A [`LocalError`] ends the attempt (the next backend would need
    /// the same descriptor, memory or port) and leaves the backend's record alone; any other
    /// counts toward the backend's ejection, and the next candidate is tried (`None`).
    fn connect_failed(&self, pool: usize, leg: Leg, error: io::Error) -> Option<UpstreamError> {
        let Leg { index, active } = leg;
        drop(active);
        let backend = &self.config().pools[pool].backends[index];
        if let Some(why) = LocalError::of(&error) {
            tracing::warn!(
                upstream = self.config().pools[pool].name,
                backend = %backend,
                why = &*error.to_string(),
                "local connect failure, not held against the backend"
            );
            return Some(UpstreamError::Local {
                backend: index,
                why,
                error,
            });
        }
        self.runtime(pool).stats[index].connect_failure();
        self.count_failure(pool, index, "connect", &error.to_string());
        None
    }

    /// A connected backend's upgrade failed: counted against it, and the client answered
    /// (no other backend is tried once one was reached).
    fn upgrade_failed(
        &self,
        attempt: Attempt,
        leg: Leg,
        failed: Failed,
        ctx: &CoreCtx,
        io: &mut dyn Io,
    ) -> Next {
        self.count_failure(attempt.pool, leg.index, "upgrade", failed.why());
        let error = failed.error(leg.index);
        drop(leg);
        io.shutdown(Side::Backend, Shutdown::Both);
        refuse(attempt.routed, attempt.pool, error, ctx, io)
    }

    /// Counts a failure of a pool's backend toward its ejection, and logs it.
    fn count_failure(&self, pool: usize, index: usize, stage: &str, why: &str) {
        let runtime = self.runtime(pool);
        backend_failed(&self.config().pools[pool], runtime, index, stage, why);
    }

    /// A pool's live state.
    fn runtime(&self, pool: usize) -> &PoolRuntime {
        &self.generation.pools[pool]
    }

    /// Writes a refusal's log line, once its answer is out.
    fn log(&self, then: Then) {
        let client = self.client;
        match then {
            Then::Nothing => {}
            Then::HandshakeRefused(e) => {
                tracing::info!(%client, status = e.http_status(), why = e.as_str(), "handshake refused");
            }
            Then::UpgradeFailed {
                path,
                pool,
                backend,
                status,
                why,
            } => {
                let pool = &self.config().pools[pool];
                let backend = backend.map(|i| pool.backends[i].to_string());
                tracing::info!(
                    %client,
                    path,
                    upstream = pool.name,
                    backend,
                    status,
                    why = &*why,
                    "upgrade failed"
                );
            }
        }
    }

    /// What the relaying phase takes over once the `101` is out.
    fn handover(&self, routed: Routed, backend: Option<Accepted>) -> Box<Upgraded> {
        let (phase, backend_input, name, deflate, active) = match backend {
            None => (Phase::Echo, Vec::new(), None, false, None),
            Some(b) => (
                Phase::Relay,
                compact(b.leftover),
                Some((b.pool as u32, b.index as u32)),
                b.deflate,
                Some(b.active),
            ),
        };
        Box::new(Upgraded {
            phase,
            client_input: compact(routed.leftover),
            backend_input,
            kept: Kept {
                settings: self.generation.settings(routed.route, deflate),
                log: LogLine {
                    client: self.client,
                    path: routed.req.path.into_boxed_str(),
                    generation: Arc::clone(&self.generation),
                    route: routed.route as u32,
                    backend: name,
                    started: Stamp::at(self.started),
                },
                admitted: routed.admitted,
                active,
            },
        })
    }
}

/// Starts writing a refusal to the client, counted by its status.
fn respond(
    ctx: &CoreCtx,
    io: &mut dyn Io,
    status: u16,
    out: Vec<u8>,
    then: Then,
    admitted: Option<Admitted>,
) -> Next {
    ctx.metrics.upgrade(status);
    let write = Writing::start(io, Side::Client, out);
    Next::Wait(State::Responding {
        write,
        then,
        admitted,
    })
}

/// Reads more of a backend rejection's body, or passes the rejection on once it has 64
/// KiB.
fn rejection_body(
    attempt: Attempt,
    leg: Leg,
    status: u16,
    deadline: Deadline,
    buf: Vec<u8>,
    ctx: &CoreCtx,
    io: &mut dyn Io,
) -> Next {
    if buf.len() >= MAX_REJECTION {
        return pass_rejection(attempt, leg, status, buf, ctx, io);
    }
    io.recv(Side::Backend, buf, BODY_READ);
    Next::Wait(State::Rejected {
        attempt,
        leg,
        status,
        deadline,
    })
}

/// Passes a backend's rejection (its head and as much body as came) on to the client.
fn pass_rejection(
    attempt: Attempt,
    leg: Leg,
    status: u16,
    mut response: Vec<u8>,
    ctx: &CoreCtx,
    io: &mut dyn Io,
) -> Next {
    response.truncate(MAX_REJECTION);
    let backend = leg.index;
    drop(leg);
    io.shutdown(Side::Backend, Shutdown::Both);
    let error = UpstreamError::Rejected {
        backend,
        status,
        response,
    };
    refuse(attempt.routed, attempt.pool, error, ctx, io)
}

/// Answers with one of the gateway's own refusals (the policy's status and body).
fn refuse_with(
    refusal: Refusal,
    ctx: &CoreCtx,
    io: &mut dyn Io,
    admitted: Option<Admitted>,
) -> Next {
    let status = refusal.status().0;
    respond(ctx, io, status, refusal.response(), Then::Nothing, admitted)
}

/// Answers a client whose upgrade no backend took: 502, 503 when the gateway itself ran
/// out of a resource, or the backend's own refusal.
fn refuse(routed: Routed, pool: usize, e: UpstreamError, ctx: &CoreCtx, io: &mut dyn Io) -> Next {
    let status = e.status();
    let (backend, why, out) = upstream_refusal(e, &ctx.metrics);
    let then = Then::UpgradeFailed {
        path: routed.req.path,
        pool,
        backend,
        status,
        why,
    };
    respond(ctx, io, status, out, then, Some(routed.admitted))
}

/// A backend upgraded: the client gets its `101`, with the protocol and extensions the
/// backend chose.
fn accept(
    attempt: Attempt,
    leg: Leg,
    leftover: Vec<u8>,
    (protocol, extensions): (Option<&str>, Option<&str>),
    ctx: &CoreCtx,
    io: &mut dyn Io,
) -> Next {
    let mut out = Vec::new();
    handshake::write_response(&mut out, &attempt.routed.req.key, protocol, extensions);
    ctx.metrics.upgrade(101);
    let write = Writing::start(io, Side::Client, out);
    let backend = Accepted {
        pool: attempt.pool,
        index: leg.index,
        leftover,
        active: leg.active,
        deflate: extensions.is_some_and(offers_permessage_deflate),
    };
    Next::Wait(State::Accepting {
        routed: attempt.routed,
        backend: Some(backend),
        write,
    })
}

/// The answer, the log's backend and its reason for an attempt that failed, counting a local
/// error.
fn upstream_refusal(
    e: UpstreamError,
    metrics: &CoreMetrics,
) -> (Option<usize>, Cow<'static, str>, Vec<u8>) {
    let bad_gateway = || Refusal::NoBackend.response();
    match e {
        UpstreamError::Unreachable => (None, "no backend available".into(), bad_gateway()),
        UpstreamError::Local {
            backend,
            why,
            error,
        } => {
            metrics.local_error(why);
            let out = Refusal::Local(why).response();
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
    }
}

/// The upstream request for `backend`, in a buffer that then takes the answer, and the
/// The index of a route [`Config::route`] returned.
fn route_index(cfg: &Config, route: &Route) -> usize {
    cfg.routes
        .iter()
        .position(|r| std::ptr::eq(r, route))
        .expect("Config::route returns one of the config's routes")
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::sync::Mutex;

    use super::*;
    use crate::config::reload::Shared;
    use crate::conn::testio::{Call, FakeIo, ix};
    use crate::metrics::{BackendRow, LOCAL_ERRORS, UPGRADES};

    /// Routes for every test: the echo (with its own message limit), a pool of two
    /// backends, and an echo route with an origin allow-list.
    const CONFIG: &str = r#"
[[listener]]
address = "127.0.0.1:8080"

[[route]]
path_prefix = "/echo"
upstream = "echo"
max_message = 4096

[[route]]
path_prefix = "/chat"
upstream = "chat"

[[route]]
path_prefix = "/private"
upstream = "echo"
origins = ["https://ok.example"]

[upstream.chat]
backends = ["ws://127.0.0.1:9001/app", "ws://127.0.0.1:9002/app"]
"#;

    const CLIENT: &str = "192.0.2.7:5555";
    const BACKEND_0: &str = "127.0.0.1:9001";
    const BACKEND_1: &str = "127.0.0.1:9002";
    /// RFC 6455's sample key and its accept value.
    const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
    const ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

    /// An upgrade request for `path` with `extra` header lines (each ending in CRLF).
    fn request(path: &str, extra: &str) -> Vec<u8> {
        format!(
            "GET {path} HTTP/1.1\r\nHost: gw.example\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\n\
             Sec-WebSocket-Version: 13\r\n{extra}\r\n"
        )
        .into_bytes()
    }

    fn text(bytes: &[u8]) -> String {
        String::from_utf8_lossy(bytes).into_owned()
    }

    fn os_error(errno: i32) -> io::Error {
        io::Error::from_raw_os_error(errno)
    }

    /// Captured log output.
    #[derive(Clone, Default)]
    struct Logs(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Logs {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// One connection's machine, its fake loop, its core and its logs.
    struct Harness {
        ctx: CoreCtx,
        io: FakeIo,
        up: Option<Upgrade>,
        logs: Logs,
        _logging: tracing::subscriber::DefaultGuard,
    }

    impl Harness {
        /// A core running [`CONFIG`] plus `extra` sections.
        fn new(extra: &str) -> Self {
            let logs = Logs::default();
            let writer = logs.clone();
            let subscriber = tracing_subscriber::fmt()
                .with_writer(move || writer.clone())
                .with_ansi(false)
                .with_max_level(tracing::Level::DEBUG)
                .finish();
            let logging = tracing::subscriber::set_default(subscriber);
            let config = Config::from_toml(&format!("{CONFIG}{extra}")).unwrap();
            let shared = Shared::new(config, None, 1);
            let ctx = CoreCtx {
                metrics: shared.metrics.core(0),
                shared,
                cursor: Cell::new(0),
                draining: Cell::new(None),
            };
            let io = FakeIo::default();
            Self {
                ctx,
                io,
                up: None,
                logs,
                _logging: logging,
            }
        }

        /// Accepts the client.
        fn start(&mut self) -> UpgradeStep {
            let (up, step) = Upgrade::start(CLIENT.parse().unwrap(), &self.ctx, &mut self.io);
            self.up = Some(up);
            self.check(&step);
            step
        }

        /// A harness with the client accepted and its request read in one piece.
        fn requested(extra: &str, request: &[u8]) -> (Self, UpgradeStep) {
            let mut h = Self::new(extra);
            assert!(running(&h.start()));
            let step = h.recv(Side::Client, request);
            (h, step)
        }

        fn check(&self, step: &UpgradeStep) {
            if !running(step) {
                assert_eq!(self.io.in_flight(), 0, "finished with operations in flight");
            }
        }

        fn feed(&mut self, event: Event) -> UpgradeStep {
            let up = self.up.as_mut().expect("started");
            let step = up.on_event(event, &self.ctx, &mut self.io);
            self.check(&step);
            step
        }

        /// Completes the pending read on `side` with `bytes`.
        fn recv(&mut self, side: Side, bytes: &[u8]) -> UpgradeStep {
            let mut buf = self.io.recvs[ix(side)]
                .take()
                .unwrap_or_else(|| panic!("no read on {side:?}"));
            assert!(
                bytes.len() <= buf.capacity() - buf.len(),
                "more than the read's room"
            );
            buf.extend_from_slice(bytes);
            let result = Ok(bytes.len());
            self.feed(Event::Received { side, buf, result })
        }

        /// Completes the pending read on `side` with no bytes: `result` is 0 or an error.
        fn recv_none(&mut self, side: Side, result: io::Result<usize>) -> UpgradeStep {
            let buf = self.io.recvs[ix(side)]
                .take()
                .unwrap_or_else(|| panic!("no read on {side:?}"));
            self.feed(Event::Received { side, buf, result })
        }

        /// Completes the pending write on `side`, `n` bytes of it (all: `None`); returns the
        /// bytes written.
        fn sent(&mut self, side: Side, n: Option<usize>) -> (Vec<u8>, UpgradeStep) {
            let (buf, start, end) = self.io.sends[ix(side)]
                .take()
                .unwrap_or_else(|| panic!("no write on {side:?}"));
            let n = n.unwrap_or(end - start);
            let bytes = buf[start..start + n].to_vec();
            let step = self.feed(Event::Sent {
                side,
                buf,
                result: Ok(n),
            });
            (bytes, step)
        }

        /// Completes the pending write on `side` with an error.
        fn send_failed(&mut self, side: Side) -> UpgradeStep {
            let (buf, ..) = self.io.sends[ix(side)]
                .take()
                .unwrap_or_else(|| panic!("no write on {side:?}"));
            let result = Err(os_error(libc::EPIPE));
            self.feed(Event::Sent { side, buf, result })
        }

        /// Completes the pending connect.
        fn connected(&mut self, result: io::Result<()>) -> UpgradeStep {
            assert!(self.io.connecting.take().is_some(), "no connect in flight");
            self.feed(Event::Connected(result))
        }

        /// Moves the clock on and fires a timer.
        fn tick(&mut self, by: Duration) -> UpgradeStep {
            self.io.now += by;
            self.feed(Event::Timer)
        }

        /// What the machine asked besides operations, since the last call.
        fn calls(&mut self) -> Vec<Call> {
            std::mem::take(&mut self.io.calls)
        }

        /// The pending write on `side`, whole, without completing it.
        fn pending_send(&self, side: Side) -> String {
            let (buf, start, end) = self.io.sends[ix(side)]
                .as_ref()
                .unwrap_or_else(|| panic!("no write on {side:?}"));
            text(&buf[*start..*end])
        }

        /// The connect address of the pending connect.
        fn connecting_to(&self) -> Option<SocketAddr> {
            self.io.connecting
        }

        /// Completes the client's write of a refusal: the client is shut down and the
        /// connection done. Returns the answer.
        fn refusal(&mut self) -> String {
            let (answer, step) = self.sent(Side::Client, None);
            assert!(done(&step));
            assert!(
                self.calls()
                    .contains(&Call::Shutdown(Side::Client, Shutdown::Both))
            );
            text(&answer)
        }

        /// The `/metrics` text.
        fn metrics(&self) -> String {
            let mut out = String::new();
            self.ctx
                .shared
                .metrics
                .render(&mut out, &|_: &mut dyn FnMut(BackendRow<'_>)| {});
            out
        }

        /// Upgrades answered with `status`.
        fn upgrades(&self, status: u16) -> u64 {
            self.counter(&format!("{UPGRADES}{{status=\"{status}\"}} "))
        }

        fn counter(&self, prefix: &str) -> u64 {
            let metrics = self.metrics();
            let line = metrics
                .lines()
                .find(|l| l.starts_with(prefix))
                .unwrap_or_else(|| panic!("no {prefix} in {metrics}"));
            line[prefix.len()..].parse().unwrap()
        }

        /// The chat pool's backend `i`: connect failures and load.
        fn backend(&self, i: usize) -> (u64, u32) {
            let generation = self.ctx.shared.current();
            let runtime = &generation.pools[0];
            let failures = runtime.stats[i].row("chat", "b").connect_failures;
            (failures, runtime.state.active(i))
        }

        fn logged(&self) -> String {
            text(&self.logs.0.lock().unwrap())
        }

        /// Takes the backend through its upgrade up to its `101` (or other answer): returns
        /// the upstream request.
        fn backend_request(&mut self) -> String {
            let (sent, step) = self.sent(Side::Backend, None);
            assert!(running(&step));
            text(&sent)
        }
    }

    fn running(step: &UpgradeStep) -> bool {
        matches!(step, UpgradeStep::Running)
    }

    fn done(step: &UpgradeStep) -> bool {
        matches!(step, UpgradeStep::Done)
    }

    fn upgraded(step: UpgradeStep) -> Box<Upgraded> {
        match step {
            UpgradeStep::Upgraded(u) => u,
            UpgradeStep::Running => panic!("still running"),
            UpgradeStep::Done => panic!("done, not upgraded"),
        }
    }

    /// The backend's `101` to an upstream request, with `extra` header lines.
    fn backend_101(upstream_request: &str, extra: &str) -> String {
        let key = upstream_request
            .lines()
            .find_map(|l| l.strip_prefix("Sec-WebSocket-Key: "))
            .expect("a key in the upstream request");
        format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: {}\r\n{extra}\r\n",
            handshake::accept_key(key.as_bytes())
        )
    }

    #[test]
    fn echo_upgrade_hands_over_the_client_leftover() {
        let mut h = Harness::new("");
        assert!(running(&h.start()));
        let started = h.io.now;
        assert_eq!(
            h.calls(),
            [Call::WakeAt(started + Duration::from_secs(10))],
            "the default handshake timeout"
        );
        let mut bytes = request("/echo/x", "");
        let frame = [0x81, 0x80, 1, 2, 3, 4];
        bytes.extend_from_slice(&frame);
        // The request arrives in two reads.
        assert!(running(&h.recv(Side::Client, &bytes[..20])));
        assert!(running(&h.recv(Side::Client, &bytes[20..])));
        let answer = h.pending_send(Side::Client);
        assert!(
            answer.starts_with("HTTP/1.1 101 Switching Protocols\r\n"),
            "{answer}"
        );
        assert!(answer.contains(&format!("Sec-WebSocket-Accept: {ACCEPT}\r\n")));
        // A short write goes on from where it stopped.
        let (first, step) = h.sent(Side::Client, Some(10));
        assert!(running(&step));
        let (rest, step) = h.sent(Side::Client, None);
        assert_eq!(text(&[first, rest].concat()), answer);
        let up = upgraded(step);
        assert_eq!(up.phase, Phase::Echo);
        assert_eq!(up.client_input, frame);
        assert!(up.backend_input.is_empty());
        assert!(up.kept.active.is_none());
        assert_eq!(
            up.kept.settings.limits.max_message, 4096,
            "the route's limits"
        );
        assert!(!up.kept.settings.deflate);
        assert_eq!(
            (
                &*up.kept.log.path,
                &*up.kept.log.route_name(),
                &*up.kept.log.backend_name()
            ),
            ("/echo/x", "/echo", "echo")
        );
        assert_eq!(up.kept.log.started.instant(), started);
        assert_eq!(h.ctx.shared.admission.total(), 1, "the slot goes with it");
        assert_eq!(h.upgrades(101), 1);
        drop(up);
        assert_eq!(h.ctx.shared.admission.total(), 0);
    }

    #[test]
    fn a_bad_request_gets_400_and_is_logged_after_the_answer() {
        let (mut h, step) = Harness::requested("", b"GET /echo HTTP/1.1\r\nHost: gw\r\n\r\n");
        assert!(running(&step));
        assert!(!h.logged().contains("handshake refused"));
        let answer = h.refusal();
        assert!(answer.starts_with("HTTP/1.1 426 "), "{answer}");
        assert_eq!(h.upgrades(426), 1);

        let bad_key = text(&request("/echo", "")).replace(KEY, "short");
        let (mut h, _) = Harness::requested("", bad_key.as_bytes());
        let answer = h.refusal();
        assert!(
            answer.starts_with("HTTP/1.1 400 Bad Request\r\n"),
            "{answer}"
        );
        assert!(answer.ends_with("invalid Sec-WebSocket-Key\n"), "{answer}");
        assert_eq!(h.upgrades(400), 1);
        let logged = h.logged();
        assert!(
            logged.contains("handshake refused")
                && logged.contains("status=400")
                && logged.contains("client=192.0.2.7:5555"),
            "{logged}"
        );
        assert_eq!(h.ctx.shared.admission.total(), 0);
    }

    #[test]
    fn no_route_gets_404() {
        let (mut h, step) = Harness::requested("", &request("/elsewhere", ""));
        assert!(running(&step));
        let answer = h.refusal();
        assert!(answer.starts_with("HTTP/1.1 404 Not Found\r\n"), "{answer}");
        assert!(answer.ends_with("no route for this host and path\n"));
        assert_eq!(h.upgrades(404), 1);
        assert!(h.logged().contains("no route"));
    }

    #[test]
    fn an_origin_the_route_does_not_allow_gets_403() {
        let bytes = request("/private", "Origin: https://evil.example\r\n");
        let (mut h, _) = Harness::requested("", &bytes);
        let answer = h.refusal();
        assert!(answer.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{answer}");
        assert!(answer.ends_with("origin not allowed\n"));
        assert_eq!(h.upgrades(403), 1);
        let logged = h.logged();
        assert!(
            logged.contains("origin not allowed") && logged.contains("https://evil.example"),
            "{logged}"
        );
        // The allowed origin upgrades.
        let bytes = request("/private", "Origin: https://ok.example\r\n");
        let (mut h, _) = Harness::requested("", &bytes);
        assert!(h.pending_send(Side::Client).starts_with("HTTP/1.1 101 "));
        drop(upgraded(h.sent(Side::Client, None).1));
    }

    #[test]
    fn a_draining_core_answers_503_and_a_drain_changes_nothing_before() {
        let mut h = Harness::new("");
        assert!(running(&h.start()));
        h.calls();
        assert!(running(&h.feed(Event::Drain(codec::CloseCode::GOING_AWAY))));
        assert!(
            h.calls().is_empty() && h.io.in_flight() == 1,
            "nothing new asked"
        );
        h.ctx.draining.set(Some(codec::CloseCode::GOING_AWAY));
        assert!(running(&h.recv(Side::Client, &request("/echo", ""))));
        let answer = h.refusal();
        assert!(
            answer.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
            "{answer}"
        );
        assert!(answer.contains("Retry-After: 1\r\n"));
        assert_eq!(h.upgrades(503), 1);
    }

    #[test]
    fn over_the_limit_gets_429_then_lingers_then_done() {
        let mut h = Harness::new("[limits]\nmax_connections = 1\n");
        let ip = CLIENT.parse::<SocketAddr>().unwrap().ip();
        let held = h.ctx.shared.admission.admit(ip, 1, usize::MAX).unwrap();
        assert!(running(&h.start()));
        assert!(
            h.calls().is_empty(),
            "no read, no deadline before the answer"
        );
        let answer = h.pending_send(Side::Client);
        assert!(
            answer.starts_with("HTTP/1.1 429 Too Many Requests\r\n"),
            "{answer}"
        );
        assert!(
            answer.contains("Retry-After: 1\r\n") && answer.ends_with("too many connections\n")
        );
        assert_eq!(h.upgrades(429), 1);
        assert!(h.logged().contains("upgrade refused"));

        let (_, step) = h.sent(Side::Client, None);
        assert!(running(&step));
        let linger_end = h.io.now + REFUSAL_LINGER;
        assert_eq!(
            h.calls(),
            [
                Call::Shutdown(Side::Client, Shutdown::Write),
                Call::WakeAt(linger_end)
            ]
        );
        // What the client sends is read and dropped.
        assert!(running(&h.recv(Side::Client, b"GET / HTTP/1.1\r\n")));
        assert!(running(&h.tick(Duration::from_millis(300))));
        assert_eq!(h.calls(), [Call::WakeAt(linger_end)], "early: asked again");
        assert!(running(&h.tick(Duration::from_millis(200))));
        assert_eq!(h.calls(), [Call::Cancel(Side::Client, OpKind::Recv)]);
        assert!(running(&h.tick(Duration::from_millis(10))), "one cancel");
        assert!(h.calls().is_empty());
        assert!(done(
            &h.recv_none(Side::Client, Err(os_error(libc::ECANCELED)))
        ));
        assert_eq!(h.ctx.shared.admission.total(), 1, "never admitted");
        drop(held);

        // A client that closes ends the linger at once; so does 64 KiB.
        for closes in [true, false] {
            let mut h = Harness::new("[limits]\nmax_connections = 1\n");
            let _held = h.ctx.shared.admission.admit(ip, 1, usize::MAX).unwrap();
            h.start();
            h.sent(Side::Client, None);
            if closes {
                assert!(done(&h.recv_none(Side::Client, Ok(0))));
                continue;
            }
            let chunk = [b'x'; HEAD_READ];
            for _ in 0..LINGER_BYTES / HEAD_READ - 1 {
                assert!(running(&h.recv(Side::Client, &chunk)));
            }
            assert!(done(&h.recv(Side::Client, &chunk)));
        }
    }

    #[test]
    fn the_handshake_times_out() {
        let mut h = Harness::new("[limits]\nhandshake_timeout = \"1s\"\n");
        h.start();
        let deadline = h.io.now + Duration::from_secs(1);
        assert_eq!(h.calls(), [Call::WakeAt(deadline)]);
        assert!(running(&h.recv(Side::Client, b"GET /echo HTTP/1.1\r\n")));
        assert!(running(&h.tick(Duration::from_millis(999))));
        assert_eq!(h.calls(), [Call::WakeAt(deadline)]);
        assert!(!h.logged().contains("handshake timed out"));
        assert!(running(&h.tick(Duration::from_millis(1))));
        assert_eq!(
            h.calls(),
            [
                Call::Shutdown(Side::Client, Shutdown::Both),
                Call::Cancel(Side::Client, OpKind::Recv)
            ]
        );
        assert!(h.logged().contains("handshake timed out"));
        assert!(done(
            &h.recv_none(Side::Client, Err(os_error(libc::ECANCELED)))
        ));
        assert_eq!(h.ctx.shared.admission.total(), 0);
        assert_eq!(h.metrics().matches(" 1\n").count(), 0, "no upgrade counted");

        // A client that leaves is let go without an answer.
        let mut h = Harness::new("");
        h.start();
        assert!(done(&h.recv_none(Side::Client, Ok(0))));
        assert!(h.logged().contains("client left before upgrading"));
    }

    /// A pool request: a subprotocol and permessage-deflate offered, frames after the head.
    fn chat_request() -> Vec<u8> {
        let mut bytes = request(
            "/chat/room?x=1",
            "Sec-WebSocket-Protocol: chat\r\n\
             Sec-WebSocket-Extensions: permessage-deflate\r\n\
             Cookie: a=b\r\n",
        );
        bytes.extend_from_slice(&[0x89, 0x80, 9, 9, 9, 9]);
        bytes
    }

    #[test]
    fn a_pool_upgrade_relays_the_backend_101() {
        let (mut h, step) = Harness::requested("", &chat_request());
        assert!(running(&step));
        let now = h.io.now;
        assert_eq!(h.connecting_to(), Some(BACKEND_0.parse().unwrap()));
        let calls = h.calls();
        assert!(
            calls.contains(&Call::WakeAt(now + Duration::from_secs(5))),
            "{calls:?}"
        );
        assert_eq!(h.backend(0), (0, 1), "counted from the attempt's start");

        assert!(running(&h.connected(Ok(()))));
        let upstream = h.backend_request();
        assert!(
            upstream.starts_with("GET /app/chat/room?x=1 HTTP/1.1\r\n"),
            "{upstream}"
        );
        for line in [
            "Host: 127.0.0.1:9001\r\n",
            "Sec-WebSocket-Protocol: chat\r\n",
            "Sec-WebSocket-Extensions: permessage-deflate\r\n",
            "Cookie: a=b\r\n",
            "X-Forwarded-For: 192.0.2.7\r\n",
            "Forwarded: for=192.0.2.7;host=gw.example;proto=http\r\n",
        ] {
            assert!(upstream.contains(line), "{line:?} in {upstream}");
        }

        let mut answer = backend_101(
            &upstream,
            "Sec-WebSocket-Protocol: chat\r\nSec-WebSocket-Extensions: permessage-deflate\r\n",
        )
        .into_bytes();
        let greeting = [0x81, 0x02, b'h', b'i'];
        answer.extend_from_slice(&greeting);
        assert!(running(&h.recv(Side::Backend, &answer)));
        let to_client = h.pending_send(Side::Client);
        assert!(to_client.starts_with("HTTP/1.1 101 "), "{to_client}");
        for line in [
            format!("Sec-WebSocket-Accept: {ACCEPT}\r\n"),
            "Sec-WebSocket-Protocol: chat\r\n".to_owned(),
            "Sec-WebSocket-Extensions: permessage-deflate\r\n".to_owned(),
        ] {
            assert!(to_client.contains(&line), "{line:?} in {to_client}");
        }
        let up = upgraded(h.sent(Side::Client, None).1);
        assert_eq!(up.phase, Phase::Relay);
        assert_eq!(up.backend_input, greeting);
        assert_eq!(up.client_input, [0x89, 0x80, 9, 9, 9, 9]);
        assert!(up.kept.settings.deflate);
        assert_eq!(up.kept.log.backend_name(), "ws://127.0.0.1:9001/app");
        assert_eq!(up.kept.log.route_name(), "/chat");
        assert_eq!(&*up.kept.log.path, "/chat/room?x=1");
        assert!(up.kept.active.is_some());
        assert_eq!(h.backend(0), (0, 1));
        assert_eq!(h.upgrades(101), 1);
        drop(up);
        assert_eq!(h.backend(0), (0, 0));
        assert_eq!(h.ctx.shared.admission.total(), 0);
    }

    #[test]
    fn a_refused_connect_tries_the_next_candidate() {
        let (mut h, _) = Harness::requested("", &chat_request());
        assert!(running(&h.connected(Err(os_error(libc::ECONNREFUSED)))));
        assert_eq!(h.connecting_to(), Some(BACKEND_1.parse().unwrap()));
        assert_eq!(
            h.backend(0),
            (1, 0),
            "counted against it, and its load given back"
        );
        assert_eq!(h.backend(1), (0, 1));
        assert!(h.logged().contains("backend connect failed"));
        assert!(running(&h.connected(Ok(()))));
        let upstream = h.backend_request();
        assert!(upstream.contains("Host: 127.0.0.1:9002\r\n"), "{upstream}");
        // Its upgrade fails: the client gets 502 and the backend is not tried again.
        assert!(running(&h.recv_none(Side::Backend, Ok(0))));
        assert!(
            h.calls()
                .contains(&Call::Shutdown(Side::Backend, Shutdown::Both))
        );
        assert!(h.connecting_to().is_none());
        assert_eq!(h.backend(1), (0, 0));
        let answer = h.refusal();
        assert!(
            answer.starts_with("HTTP/1.1 502 Bad Gateway\r\n"),
            "{answer}"
        );
        assert_eq!(h.upgrades(502), 1);
        let logged = h.logged();
        assert!(
            logged.contains("backend upgrade failed")
                && logged.contains("connection lost during the upgrade")
                && logged.contains("upgrade failed")
                && logged.contains("backend=ws://127.0.0.1:9002/app"),
            "{logged}"
        );

        // Both refused: 502 without a backend.
        let (mut h, _) = Harness::requested("", &chat_request());
        h.connected(Err(os_error(libc::ECONNREFUSED)));
        assert!(running(&h.connected(Err(os_error(libc::ECONNREFUSED)))));
        let answer = h.refusal();
        assert!(answer.starts_with("HTTP/1.1 502 "), "{answer}");
        assert!(h.logged().contains("no backend available"));
    }

    #[test]
    fn a_local_error_ends_the_attempt_with_503() {
        let mut h = Harness::new("");
        h.start();
        h.io.connect_error = Some(os_error(libc::EMFILE));
        assert!(running(&h.recv(Side::Client, &chat_request())));
        assert!(h.connecting_to().is_none(), "no other backend tried");
        assert_eq!(h.backend(0), (0, 0), "not held against the backend");
        let answer = h.refusal();
        assert!(
            answer.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
            "{answer}"
        );
        assert!(answer.ends_with("the gateway is out of file descriptors\n"));
        assert_eq!(h.counter(&format!("{LOCAL_ERRORS}{{why=\"emfile\"}} ")), 1);
        assert!(h.logged().contains("local connect failure"));

        // From the connect's completion too (no local port).
        let (mut h, _) = Harness::requested("", &chat_request());
        h.connected(Err(os_error(libc::EADDRNOTAVAIL)));
        assert!(h.connecting_to().is_none());
        assert!(h.refusal().starts_with("HTTP/1.1 503 "));
    }

    #[test]
    fn a_connect_timeout_cancels_then_tries_the_next_candidate() {
        let (mut h, _) = Harness::requested("[timeouts]\nconnect = \"2s\"\n", &chat_request());
        h.calls();
        assert!(running(&h.tick(Duration::from_secs(2))));
        assert_eq!(h.calls(), [Call::Cancel(Side::Backend, OpKind::Connect)]);
        assert_eq!(
            h.connecting_to(),
            Some(BACKEND_0.parse().unwrap()),
            "the next connect waits for the cancelled one"
        );
        assert!(running(&h.connected(Err(os_error(libc::ECANCELED)))));
        assert_eq!(h.connecting_to(), Some(BACKEND_1.parse().unwrap()));
        assert_eq!(h.backend(0), (1, 0));
        assert!(h.logged().contains("connect timed out"));
        // The next candidate gets its own deadline.
        let calls = h.calls();
        assert_eq!(
            calls,
            [
                Call::Connect(BACKEND_1.parse().unwrap()),
                Call::WakeAt(h.io.now + Duration::from_secs(2))
            ]
        );
    }

    #[test]
    fn a_silent_backend_times_out_its_upgrade() {
        let (mut h, _) = Harness::requested("[timeouts]\nconnect = \"2s\"\n", &chat_request());
        h.connected(Ok(()));
        h.backend_request();
        h.calls();
        assert!(running(&h.tick(Duration::from_secs(2))));
        assert_eq!(h.calls(), [Call::Cancel(Side::Backend, OpKind::Recv)]);
        assert!(running(
            &h.recv_none(Side::Backend, Err(os_error(libc::ECANCELED)))
        ));
        assert!(h.refusal().starts_with("HTTP/1.1 502 "));
        assert!(h.logged().contains("upgrade timed out"));
    }

    #[test]
    fn a_backend_rejection_is_passed_on() {
        let (mut h, _) = Harness::requested("", &chat_request());
        h.connected(Ok(()));
        h.backend_request();
        h.calls();
        let head = "HTTP/1.1 403 Forbidden\r\nContent-Length: 4\r\n\r\nno";
        assert!(running(&h.recv(Side::Backend, head.as_bytes())));
        let body_end = h.io.now + REJECTION_BODY;
        assert_eq!(h.calls(), [Call::WakeAt(body_end)]);
        assert!(running(&h.recv(Side::Backend, b"pe")));
        // The body's read ends at 200 ms.
        assert!(running(&h.tick(REJECTION_BODY)));
        assert_eq!(h.calls(), [Call::Cancel(Side::Backend, OpKind::Recv)]);
        assert!(running(
            &h.recv_none(Side::Backend, Err(os_error(libc::ECANCELED)))
        ));
        assert!(
            h.calls()
                .contains(&Call::Shutdown(Side::Backend, Shutdown::Both))
        );
        let answer = h.refusal();
        assert_eq!(answer, format!("{head}pe"));
        assert_eq!(h.upgrades(403), 1);
        assert_eq!(h.backend(0), (0, 0));
        assert!(
            !h.logged().contains("backend upgrade failed"),
            "a 4xx is not the backend failing"
        );
        assert!(h.logged().contains("backend refused the upgrade"));

        // A 5xx counts against the backend; its body ends at the backend's EOF.
        let (mut h, _) = Harness::requested("", &chat_request());
        h.connected(Ok(()));
        h.backend_request();
        assert!(running(
            &h.recv(Side::Backend, b"HTTP/1.1 503 Busy\r\n\r\n")
        ));
        assert!(h.logged().contains("answered 503"));
        assert!(running(&h.recv_none(Side::Backend, Ok(0))));
        assert!(h.refusal().starts_with("HTTP/1.1 503 Busy"));
    }

    #[test]
    fn a_client_gone_before_its_101_ends_the_backend_too() {
        let (mut h, _) = Harness::requested("", &chat_request());
        h.connected(Ok(()));
        let upstream = h.backend_request();
        h.recv(Side::Backend, backend_101(&upstream, "").as_bytes());
        h.calls();
        assert!(done(&h.send_failed(Side::Client)));
        assert_eq!(h.calls(), [Call::Shutdown(Side::Backend, Shutdown::Both)]);
        assert_eq!(h.backend(0), (0, 0));
        assert_eq!(h.ctx.shared.admission.total(), 0);
    }
}
