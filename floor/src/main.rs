//! `floor`: the least a TCP proxy can do, as a benchmark baseline. One thread, edge-triggered
//! epoll (through mio), one backend connection per client, and bytes moved both ways through a
//! fixed buffer per direction: one `recv` and one `send` per message, nothing parsed. Whatever a
//! real proxy costs above this is its own path, not the kernel's.
//!
//! ```sh
//! floor --listen 127.0.0.1:8081 --backend 127.0.0.1:9001
//! ```
//!
//! It prints `floor listening on ADDR` on stdout once bound (port 0 picks a free one).
#![forbid(unsafe_code)]

use std::io::{self, Read as _, Write as _};
use std::net::{Shutdown, SocketAddr};
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};

/// The listener's token; connection `i` uses `2i` (client) and `2i + 1` (backend).
const LISTENER: Token = Token(usize::MAX);

/// Bare edge-triggered epoll TCP forwarder: the floor any proxy pays.
#[derive(Debug, Parser)]
#[command(name = "floor", version)]
struct Args {
    /// Where clients connect (port 0 picks a free port; the address is printed).
    #[arg(long)]
    listen: SocketAddr,
    /// Where each client's bytes go: one new connection per client.
    #[arg(long)]
    backend: SocketAddr,
    /// Bytes buffered per direction per connection; a side is not read again until its
    /// buffer has been written out in full.
    #[arg(long, default_value_t = 16 * 1024, value_parser = clap::value_parser!(u32).range(1..))]
    buffer: u32,
}

/// One direction of a connection: bytes read from one socket wait here until the other has
/// taken them all.
struct Pipe {
    buf: Box<[u8]>,
    /// Next byte to write.
    start: usize,
    /// End of the bytes read.
    end: usize,
    /// The source sent FIN.
    eof: bool,
    /// The FIN was passed on (after the buffer drained).
    shut: bool,
}

impl Pipe {
    fn new(size: usize) -> Self {
        Self {
            buf: vec![0; size].into_boxed_slice(),
            start: 0,
            end: 0,
            eof: false,
            shut: false,
        }
    }
}

/// A socket and the readiness epoll last reported for it that is not used up yet. Edge
/// triggering reports a change once, so the flags remember it until a `recv` or `send` shows
/// the space exhausted: `EAGAIN`, or a short count, which epoll(7) documents as equivalent
/// for stream sockets (so a message costs one `recv`, not a second one that says `EAGAIN`).
/// A FIN or reset that came in with the last data is the exception: no new edge follows it,
/// so once reported it keeps the socket readable until a `recv` returns it.
struct Side {
    stream: TcpStream,
    readable: bool,
    writable: bool,
    /// epoll reported the peer's FIN (`EPOLLRDHUP`) or an error.
    hung_up: bool,
}

impl Side {
    fn new(stream: TcpStream) -> Self {
        Self {
            stream,
            readable: false,
            writable: false,
            hung_up: false,
        }
    }
}

/// What one epoll event said about a socket.
#[derive(Debug, Clone, Copy)]
struct Readiness {
    readable: bool,
    writable: bool,
    hung_up: bool,
}

/// How a connection stands after some progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Bytes or FINs may still move.
    Open,
    /// Both directions carried their FIN: close both sockets.
    Finished,
}

/// A client and its backend connection.
struct Conn {
    client: Side,
    backend: Side,
    /// The backend's non-blocking connect has completed.
    connected: bool,
    /// Client to backend.
    up: Pipe,
    /// Backend to client.
    down: Pipe,
}

impl Conn {
    /// Moves what can move in both directions without blocking. Nothing moves before the
    /// backend is connected: the client's readiness waits in its flags.
    fn pump(&mut self) -> io::Result<State> {
        if !self.connected {
            return Ok(State::Open);
        }
        pump(&mut self.up, &mut self.client, &mut self.backend)?;
        pump(&mut self.down, &mut self.backend, &mut self.client)?;
        Ok(if self.up.shut && self.down.shut {
            State::Finished
        } else {
            State::Open
        })
    }

    /// Closes both sockets with a reset, so each peer learns that the other end failed
    /// rather than seeing an orderly close.
    fn abort(self) {
        for side in [&self.client, &self.backend] {
            let _ = socket2::SockRef::from(&side.stream).set_linger(Some(Duration::ZERO));
        }
    }
}

/// Moves bytes from `src` through `pipe` to `dst` until one of them would block: reads only
/// into an empty buffer, so a peer that does not read stops its source being read.
fn pump(pipe: &mut Pipe, src: &mut Side, dst: &mut Side) -> io::Result<()> {
    loop {
        if pipe.start < pipe.end {
            if !dst.writable {
                return Ok(());
            }
            match dst.stream.write(&pipe.buf[pipe.start..pipe.end]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    pipe.start += n;
                    if pipe.start < pipe.end {
                        dst.writable = false;
                        return Ok(());
                    }
                    pipe.start = 0;
                    pipe.end = 0;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    dst.writable = false;
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        } else if pipe.eof {
            if !pipe.shut {
                dst.stream.shutdown(Shutdown::Write)?;
                pipe.shut = true;
            }
            return Ok(());
        } else {
            if !src.readable {
                return Ok(());
            }
            match src.stream.read(&mut pipe.buf) {
                Ok(0) => {
                    pipe.eof = true;
                    src.readable = false;
                }
                Ok(n) => {
                    pipe.end = n;
                    if n < pipe.buf.len() {
                        src.readable = src.hung_up;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    src.readable = false;
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// Whether a backend's non-blocking connect has finished: `Ok(false)` while it is under way
/// (a spurious wake-up), an error if it failed.
fn connect_done(stream: &TcpStream) -> io::Result<bool> {
    if let Some(e) = stream.take_error()? {
        return Err(e);
    }
    match stream.peer_addr() {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(false),
        Err(e) => Err(e),
    }
}

/// Every connection, indexed by token / 2, with a free list so tokens are reused.
struct Table {
    conns: Vec<Option<Conn>>,
    free: Vec<usize>,
}

impl Table {
    fn insert(&mut self, conn: Conn) -> usize {
        if let Some(i) = self.free.pop() {
            self.conns[i] = Some(conn);
            i
        } else {
            self.conns.push(Some(conn));
            self.conns.len() - 1
        }
    }

    fn remove(&mut self, i: usize) -> Option<Conn> {
        let conn = self.conns.get_mut(i)?.take()?;
        self.free.push(i);
        Some(conn)
    }
}

/// The forwarder's whole state.
struct Floor {
    poll: Poll,
    listener: TcpListener,
    backend: SocketAddr,
    buffer: usize,
    table: Table,
}

impl Floor {
    /// Accepts every pending client, each with a new backend connection.
    fn accept(&mut self) {
        loop {
            let client = match self.listener.accept() {
                Ok((client, _)) => client,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    eprintln!("floor: accept failed why={e}");
                    return;
                }
            };
            let backend = match TcpStream::connect(self.backend) {
                Ok(backend) => backend,
                Err(e) => {
                    eprintln!("floor: connect failed backend={} why={e}", self.backend);
                    continue;
                }
            };
            let _ = client.set_nodelay(true);
            let _ = backend.set_nodelay(true);
            let i = self.table.insert(Conn {
                client: Side::new(client),
                backend: Side::new(backend),
                connected: false,
                up: Pipe::new(self.buffer),
                down: Pipe::new(self.buffer),
            });
            let conn = self.table.conns[i].as_mut().expect("just inserted");
            let both = Interest::READABLE | Interest::WRITABLE;
            let registry = self.poll.registry();
            let registered = registry
                .register(&mut conn.client.stream, Token(2 * i), both)
                .and_then(|()| registry.register(&mut conn.backend.stream, Token(2 * i + 1), both));
            if let Err(e) = registered {
                eprintln!("floor: epoll registration failed why={e}");
                self.table.remove(i);
            }
        }
    }

    /// Handles readiness of one connection's socket.
    fn ready(&mut self, token: Token, ready: Readiness) {
        let (i, is_backend) = (token.0 / 2, token.0 % 2 == 1);
        let Some(Some(conn)) = self.table.conns.get_mut(i) else {
            return;
        };
        if is_backend && !conn.connected {
            match connect_done(&conn.backend.stream) {
                Ok(false) => return,
                Ok(true) => conn.connected = true,
                Err(e) => {
                    eprintln!("floor: connect failed backend={} why={e}", self.backend);
                    if let Some(conn) = self.table.remove(i) {
                        conn.abort();
                    }
                    return;
                }
            }
        }
        let side = if is_backend {
            &mut conn.backend
        } else {
            &mut conn.client
        };
        side.readable |= ready.readable;
        side.writable |= ready.writable;
        side.hung_up |= ready.hung_up;
        match conn.pump() {
            Ok(State::Open) => {}
            Ok(State::Finished) => {
                self.table.remove(i);
            }
            Err(_) => {
                if let Some(conn) = self.table.remove(i) {
                    conn.abort();
                }
            }
        }
    }

    fn run(&mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(1024);
        loop {
            match self.poll.poll(&mut events, None) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            for event in &events {
                if event.token() == LISTENER {
                    self.accept();
                } else {
                    // An error or hang-up shows up in the next recv or send.
                    let failed = event.is_error();
                    let ready = Readiness {
                        readable: event.is_readable() || event.is_read_closed() || failed,
                        writable: event.is_writable() || event.is_write_closed() || failed,
                        hung_up: event.is_read_closed() || failed,
                    };
                    self.ready(event.token(), ready);
                }
            }
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let started = Poll::new().and_then(|poll| {
        let mut listener = TcpListener::bind(args.listen)?;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        Ok((poll, listener))
    });
    let (poll, listener) = match started {
        Ok(started) => started,
        Err(e) => {
            eprintln!("floor: cannot listen on {} why={e}", args.listen);
            return ExitCode::FAILURE;
        }
    };
    match listener.local_addr() {
        Ok(addr) => println!("floor listening on {addr}"),
        Err(e) => {
            eprintln!("floor: no local address why={e}");
            return ExitCode::FAILURE;
        }
    }
    let mut floor = Floor {
        poll,
        listener,
        backend: args.backend,
        buffer: args.buffer as usize,
        table: Table {
            conns: Vec::new(),
            free: Vec::new(),
        },
    };
    if let Err(e) = floor.run() {
        eprintln!("floor: epoll failed why={e}");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
