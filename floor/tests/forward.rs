//! End to end: the real `floor` binary between std TCP clients and a std echo backend on
//! loopback: bytes both ways in order, under backpressure, FINs passed on one way at a time,
//! and resets passed on as resets.

use std::io::{BufRead as _, BufReader, ErrorKind, Read as _, Write as _};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver, Sender};
use std::thread;
use std::time::Duration;

/// Longest any read waits before the test fails instead of hanging.
const PATIENCE: Duration = Duration::from_secs(10);

/// A running `floor`, killed on drop.
struct Floor {
    child: Child,
    addr: SocketAddr,
}

impl Floor {
    fn start(backend: SocketAddr, buffer: &str) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_floor"))
            .args(["--listen", "127.0.0.1:0", "--backend"])
            .arg(backend.to_string())
            .args(["--buffer", buffer])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .strip_prefix("floor listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .parse()
            .unwrap();
        Self { child, addr }
    }

    fn connect(&self) -> TcpStream {
        connect(self.addr)
    }

    fn still_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Floor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A client connection whose reads fail after [`PATIENCE`] instead of hanging.
fn connect(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    stream
}

/// How a backend connection ended.
#[derive(Debug, PartialEq, Eq)]
enum Ended {
    /// The client's FIN arrived after this many bytes.
    Fin(u64),
    /// A read failed this way.
    Error(ErrorKind),
}

/// An echo server that, once the client's FIN arrives, sends `done <bytes echoed>` and closes;
/// every connection's end is reported on the channel.
fn echo_backend() -> (SocketAddr, Receiver<Ended>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            let tx: Sender<Ended> = tx.clone();
            thread::spawn(move || echo(stream, &tx));
        }
    });
    (addr, rx)
}

fn echo(mut stream: TcpStream, tx: &Sender<Ended>) {
    let mut buf = vec![0; 64 * 1024];
    let mut total = 0u64;
    loop {
        match stream.read(&mut buf) {
            Ok(0) => {
                let _ = stream.write_all(format!("done {total}").as_bytes());
                let _ = stream.shutdown(Shutdown::Write);
                let _ = tx.send(Ended::Fin(total));
                return;
            }
            Ok(n) => {
                if stream.write_all(&buf[..n]).is_err() {
                    return;
                }
                total += n as u64;
            }
            Err(e) => {
                let _ = tx.send(Ended::Error(e.kind()));
                return;
            }
        }
    }
}

/// The bytes of message `seq` of client `client`: a pattern no shifted copy matches.
fn message(client: u8, seq: usize, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ client ^ (seq as u8).wrapping_mul(7))
        .collect()
}

/// Reads exactly `len` bytes.
fn read_exact(stream: &mut TcpStream, len: usize) -> Vec<u8> {
    let mut got = vec![0; len];
    stream.read_exact(&mut got).unwrap();
    got
}

fn read_to_end(stream: &mut TcpStream) -> Vec<u8> {
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).unwrap();
    rest
}

/// Small and big messages (below, at and above the buffer), sent by one thread while another
/// reads, optionally only after `delay` so every buffer on the way fills up.
fn stream_both_ways(floor: SocketAddr, client: u8, delay: Duration) -> u64 {
    const SIZES: [usize; 8] = [1, 20, 125, 4096, 16 * 1024, 16 * 1024 + 1, 200_000, 1 << 20];
    let mut stream = connect(floor);
    let mut writer = stream.try_clone().unwrap();
    let sender = thread::spawn(move || {
        for (seq, &len) in SIZES.iter().cycle().take(3 * SIZES.len()).enumerate() {
            writer.write_all(&message(client, seq, len)).unwrap();
        }
        writer.shutdown(Shutdown::Write).unwrap();
    });
    thread::sleep(delay);
    let mut total = 0;
    for (seq, &len) in SIZES.iter().cycle().take(3 * SIZES.len()).enumerate() {
        assert!(
            read_exact(&mut stream, len) == message(client, seq, len),
            "client {client}: message {seq} ({len} B) came back changed"
        );
        total += len as u64;
    }
    sender.join().unwrap();
    assert_eq!(read_to_end(&mut stream), format!("done {total}").as_bytes());
    total
}

#[test]
fn many_messages_both_ways_big_and_small_under_backpressure() {
    let (backend, ended) = echo_backend();
    let mut floor = Floor::start(backend, "16384");
    // One round trip at a time: each message is one recv and one send each way, and a lost
    // edge would hang here (until PATIENCE).
    let mut stream = floor.connect();
    for seq in 0..500 {
        let sent = message(0, seq, 20 + seq % 200);
        stream.write_all(&sent).unwrap();
        assert_eq!(
            read_exact(&mut stream, sent.len()),
            sent,
            "round trip {seq}"
        );
    }
    drop(stream);
    // Concurrent streams; two read only after every buffer on the way has filled, so the
    // forwarder's writes come out partial and it must stop reading their other sides.
    let clients: Vec<_> = (1..=6u8)
        .map(|client| {
            let addr = floor.addr;
            let delay = Duration::from_millis(if client <= 2 { 300 } else { 0 });
            thread::spawn(move || stream_both_ways(addr, client, delay))
        })
        .collect();
    let mut totals: Vec<u64> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    let mut fins: Vec<u64> = (0..7)
        .map(|_| match ended.recv_timeout(PATIENCE).unwrap() {
            Ended::Fin(n) => n,
            other @ Ended::Error(_) => panic!("backend connection ended with {other:?}"),
        })
        .collect();
    // The round-trip connection was closed by the client after 500 messages.
    totals.push((0..500).map(|seq| 20 + seq % 200).sum::<usize>() as u64);
    totals.sort_unstable();
    fins.sort_unstable();
    assert_eq!(fins, totals);
    assert!(floor.still_running());
}

#[test]
fn a_half_close_passes_the_fin_and_keeps_the_other_way_open() {
    let (backend, ended) = echo_backend();
    // A tiny buffer: "hello world" takes three recv/send rounds.
    let floor = Floor::start(backend, "4");
    let mut stream = floor.connect();
    stream.write_all(b"hello world").unwrap();
    stream.shutdown(Shutdown::Write).unwrap();
    // The backend answers only after it has seen our FIN, over the half still open.
    assert_eq!(read_to_end(&mut stream), b"hello worlddone 11");
    assert_eq!(ended.recv_timeout(PATIENCE).unwrap(), Ended::Fin(11));
}

#[test]
fn a_client_reset_resets_the_backend_connection() {
    let (backend, ended) = echo_backend();
    let mut floor = Floor::start(backend, "16384");
    let mut stream = floor.connect();
    stream.write_all(b"x").unwrap();
    assert_eq!(read_exact(&mut stream, 1), b"x");
    socket2::SockRef::from(&stream)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(stream);
    assert_eq!(
        ended.recv_timeout(PATIENCE).unwrap(),
        Ended::Error(ErrorKind::ConnectionReset)
    );
    assert!(floor.still_running());
}

#[test]
fn a_backend_reset_or_refusal_resets_the_client() {
    // A backend that resets each connection once it has read something.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let resetting = listener.local_addr().unwrap();
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let _ = stream.read(&mut [0; 16]);
            let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
        }
    });
    let mut floor = Floor::start(resetting, "16384");
    let mut stream = floor.connect();
    stream.write_all(b"x").unwrap();
    let err = stream.read(&mut [0; 16]).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ConnectionReset);
    assert!(floor.still_running());

    // Nothing listens at the backend: the client is reset, the forwarder carries on.
    let closed = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut floor = Floor::start(closed, "16384");
    for _ in 0..3 {
        let err = floor.connect().read(&mut [0; 16]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::ConnectionReset);
    }
    assert!(floor.still_running());
}
