//! The [`Backend`] contract, checked the same way on each backend over loopback sockets: each
//! backend's tests call these with a fresh instance of itself.
#![forbid(unsafe_code)]

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use socket2::{Domain, SockRef, Socket, Type};

use super::{Backend, Cqe, POOL_BUF, Sqe};

/// How long a check waits for completions before it fails.
const PATIENCE: Duration = Duration::from_secs(10);

/// A connected loopback pair: a blocking std socket as the peer, and the backend's end,
/// non-blocking as the loop's sockets are.
pub(crate) fn pair() -> (TcpStream, OwnedFd) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let peer = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (ours, _) = listener.accept().unwrap();
    ours.set_nonblocking(true).unwrap();
    (peer, OwnedFd::from(ours))
}

/// Waits until `n` completions came; fails after [`PATIENCE`] or on more than `n`.
pub(crate) fn collect(b: &mut impl Backend, n: usize) -> Vec<Cqe> {
    let start = Instant::now();
    let mut out = Vec::new();
    while out.len() < n {
        assert!(
            start.elapsed() < PATIENCE,
            "{} of {n} completions came: {out:?}",
            out.len()
        );
        b.wait(Some(Duration::from_millis(100)), &mut out).unwrap();
    }
    assert_eq!(out.len(), n, "more completions than expected: {out:?}");
    out
}

/// The one completion of the one operation in flight.
pub(crate) fn one(b: &mut impl Backend) -> Cqe {
    collect(b, 1).pop().unwrap()
}

/// Cancels the operation pushed as `target`, a pooled read or a poll when `slotless` (a
/// cancel has no completion of its own).
pub(crate) fn cancel(b: &mut impl Backend, target: u64, slotless: bool) {
    b.push(u64::MAX, Sqe::Cancel { target, slotless });
}

/// A pooled read of `fd` under `user_data` that must hand over exactly `want`; its buffer goes
/// back to the pool.
pub(crate) fn read_pooled(b: &mut impl Backend, user_data: u64, fd: RawFd, want: &[u8]) {
    b.push(user_data, Sqe::RecvPooled { fd, len: 1024 });
    let cqe = one(b);
    assert_eq!(cqe.user_data, user_data);
    assert_eq!(cqe.buf.as_deref(), Some(want));
    b.recycle(cqe.buf.unwrap());
}

/// Fails if anything completes within `d`.
pub(crate) fn quiet(b: &mut impl Backend, d: Duration) {
    let mut out = Vec::new();
    b.wait(Some(d), &mut out).unwrap();
    assert!(out.is_empty(), "unexpected completions: {out:?}");
}

/// Recognisable bytes, not a short period, so misordered or lost chunks show.
pub(crate) fn pattern(len: usize) -> Vec<u8> {
    let mut x: u32 = 0x9e37_79b9;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// The `flags:` of an open fd, from procfs.
fn fd_flags(fd: &impl AsRawFd) -> i32 {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd())).unwrap();
    let line = info.lines().find_map(|l| l.strip_prefix("flags:")).unwrap();
    i32::from_str_radix(line.trim(), 8).unwrap()
}

/// A non-blocking TCP socket, not yet connected.
fn new_socket() -> OwnedFd {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    socket.set_nonblocking(true).unwrap();
    OwnedFd::from(socket)
}

/// A pooled read waits without a buffer, then hands over a pool buffer holding exactly the
/// bytes that came, at most `len` of them; a recycled buffer serves the next read.
pub(crate) fn pooled_recv_hands_over_a_pool_buffer(b: &mut impl Backend) {
    let (mut peer, ours) = pair();
    let fd = ours.as_raw_fd();
    b.push(1, Sqe::RecvPooled { fd, len: 1024 });
    quiet(b, Duration::from_millis(20));
    peer.write_all(b"hello").unwrap();
    let cqe = one(b);
    assert_eq!((cqe.user_data, cqe.result), (1, 5));
    let buf = cqe
        .buf
        .expect("a pooled read that read bytes hands over its buffer");
    assert_eq!(buf, b"hello");
    assert_eq!(buf.capacity(), POOL_BUF, "a pool buffer");
    let first = buf.as_ptr();
    b.recycle(buf);

    // At most `len` bytes per read; the rest waits for the next.
    peer.write_all(&[7; 100]).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    b.push(2, Sqe::RecvPooled { fd, len: 60 });
    let cqe = one(b);
    assert_eq!((cqe.user_data, cqe.result), (2, 60));
    let buf = cqe.buf.unwrap();
    assert_eq!(buf, [7; 60]);
    b.recycle(buf);
    b.push(3, Sqe::RecvPooled { fd, len: 1024 });
    let cqe = one(b);
    assert_eq!((cqe.user_data, cqe.result), (3, 40));
    let buf = cqe.buf.unwrap();
    assert_eq!(buf, [7; 40]);
    // Steady reads reuse buffers instead of allocating: the first one came back by now.
    let mut seen = vec![buf.as_ptr()];
    b.recycle(buf);
    for i in 0..8 {
        peer.write_all(&[i]).unwrap();
        b.push(10, Sqe::RecvPooled { fd, len: 1024 });
        let buf = one(b).buf.unwrap();
        assert_eq!(buf, [i]);
        seen.push(buf.as_ptr());
        b.recycle(buf);
    }
    assert!(
        seen.contains(&first),
        "recycled buffers are read into again"
    );

    // A buffer of another size is not kept (it is freed), and reads go on.
    b.recycle(Vec::with_capacity(100));
    peer.write_all(b"x").unwrap();
    b.push(11, Sqe::RecvPooled { fd, len: 1024 });
    let buf = one(b).buf.unwrap();
    assert_eq!((buf.as_slice(), buf.capacity()), (&b"x"[..], POOL_BUF));
    b.close(ours);
}

/// A pooled read that ends without bytes (end of stream, cancel) hands over no buffer.
pub(crate) fn pooled_recv_without_bytes_hands_over_nothing(b: &mut impl Backend) {
    let (peer, ours) = pair();
    b.push(
        1,
        Sqe::RecvPooled {
            fd: ours.as_raw_fd(),
            len: 512,
        },
    );
    quiet(b, Duration::from_millis(20));
    cancel(b, 1, true);
    let cqe = one(b);
    assert_eq!((cqe.user_data, cqe.result), (1, -libc::ECANCELED));
    assert!(cqe.buf.is_none(), "a cancelled pooled read holds no buffer");

    peer.shutdown(Shutdown::Write).unwrap();
    b.push(
        3,
        Sqe::RecvPooled {
            fd: ours.as_raw_fd(),
            len: 512,
        },
    );
    let cqe = one(b);
    assert_eq!((cqe.user_data, cqe.result), (3, 0));
    assert!(cqe.buf.is_none(), "end of stream hands over no buffer");
    b.close(ours);
}

/// More pooled reads with bytes waiting than the backend has buffers at hand: every one
/// completes with its own socket's bytes, pushed again (as the loop does) when it found no
/// buffer. Says how many times one did.
pub(crate) fn a_burst_of_pooled_reads_all_complete(b: &mut impl Backend, reads: usize) -> usize {
    let pairs: Vec<(TcpStream, OwnedFd)> = (0..reads).map(|_| pair()).collect();
    for (i, (peer, _)) in pairs.iter().enumerate() {
        (&*peer)
            .write_all(format!("message {i}").as_bytes())
            .unwrap();
    }
    std::thread::sleep(Duration::from_millis(20));
    for (i, (_, ours)) in pairs.iter().enumerate() {
        b.push(
            i as u64,
            Sqe::RecvPooled {
                fd: ours.as_raw_fd(),
                len: 4096,
            },
        );
    }
    // The reads hold their buffers until all are done: nothing is recycled meanwhile.
    let (mut done, mut starved) = (Vec::new(), 0);
    let start = Instant::now();
    while done.len() < reads {
        assert!(
            start.elapsed() < PATIENCE,
            "{} of {reads} reads came",
            done.len()
        );
        let mut out = Vec::new();
        b.wait(Some(Duration::from_millis(100)), &mut out).unwrap();
        for cqe in out {
            if cqe.result == -libc::ENOBUFS {
                starved += 1;
                let fd = pairs[cqe.user_data as usize].1.as_raw_fd();
                b.push(cqe.user_data, Sqe::RecvPooled { fd, len: 4096 });
            } else {
                done.push(cqe);
            }
        }
    }
    quiet(b, Duration::from_millis(20));
    done.sort_by_key(|cqe| cqe.user_data);
    for (i, cqe) in done.into_iter().enumerate() {
        assert_eq!(cqe.user_data, i as u64);
        assert_eq!(
            cqe.buf.as_deref(),
            Some(format!("message {i}").as_bytes()),
            "read {i}: {}",
            cqe.result
        );
    }
    for (_, ours) in pairs {
        b.close(ours);
    }
    starved
}

/// A poll waits for bytes and reads none of them; one at end of stream completes too; one
/// cancelled completes with `-ECANCELED`. None hands over a buffer.
pub(crate) fn poll_in_waits_and_reads_nothing(b: &mut impl Backend) {
    let (mut peer, ours) = pair();
    let fd = ours.as_raw_fd();
    b.push(1, Sqe::PollIn { fd });
    quiet(b, Duration::from_millis(20));
    peer.write_all(b"hello").unwrap();
    let cqe = one(b);
    assert_eq!(cqe.user_data, 1);
    assert!(cqe.result > 0, "a poll mask: {cqe:?}");
    assert!(cqe.buf.is_none(), "a poll holds no buffer");
    // The bytes are all still there for the read that follows.
    read_pooled(b, 2, fd, b"hello");

    b.push(3, Sqe::PollIn { fd });
    quiet(b, Duration::from_millis(20));
    cancel(b, 3, true);
    let cqe = one(b);
    assert_eq!((cqe.user_data, cqe.result), (3, -libc::ECANCELED));
    assert!(cqe.buf.is_none());

    b.push(5, Sqe::PollIn { fd });
    quiet(b, Duration::from_millis(20));
    peer.shutdown(Shutdown::Write).unwrap();
    let cqe = one(b);
    assert_eq!(cqe.user_data, 5);
    assert!(cqe.result > 0, "end of stream is readable: {cqe:?}");
    b.push(6, Sqe::RecvPooled { fd, len: 1024 });
    let cqe = one(b);
    assert_eq!((cqe.user_data, cqe.result), (6, 0));
    b.close(ours);
}

/// Polls on many sockets at once each complete once when their bytes come, and the read
/// that follows each finds them.
pub(crate) fn many_polls_each_complete_once(b: &mut impl Backend) {
    let pairs: Vec<(TcpStream, OwnedFd)> = (0..150).map(|_| pair()).collect();
    for (i, (_, ours)) in pairs.iter().enumerate() {
        b.push(
            i as u64,
            Sqe::PollIn {
                fd: ours.as_raw_fd(),
            },
        );
    }
    quiet(b, Duration::from_millis(20));
    for (i, (peer, _)) in pairs.iter().enumerate() {
        (&*peer).write_all(format!("to {i}").as_bytes()).unwrap();
    }
    let mut done = collect(b, pairs.len());
    done.sort_by_key(|cqe| cqe.user_data);
    for (i, cqe) in done.iter().enumerate() {
        assert_eq!(cqe.user_data, i as u64);
        assert!(cqe.result > 0, "a poll mask: {cqe:?}");
    }
    quiet(b, Duration::from_millis(20));
    for (i, (_, ours)) in pairs.iter().enumerate() {
        read_pooled(b, i as u64, ours.as_raw_fd(), format!("to {i}").as_bytes());
    }
    for (_, ours) in pairs {
        b.close(ours);
    }
}

/// A socket polls again after each poll completed, whatever followed: the read, a cancel
/// that came after the poll had completed (which adds no completion), or nothing at all.
pub(crate) fn a_socket_polls_again_after_each_poll(b: &mut impl Backend) {
    let (mut peer, ours) = pair();
    let fd = ours.as_raw_fd();
    // Completed, then the read: the next poll waits for new bytes.
    b.push(1, Sqe::PollIn { fd });
    peer.write_all(b"one").unwrap();
    assert!(one(b).result > 0);
    read_pooled(b, 2, fd, b"one");
    b.push(3, Sqe::PollIn { fd });
    quiet(b, Duration::from_millis(20));
    peer.write_all(b"two").unwrap();
    assert_eq!(one(b).user_data, 3);
    // Completed, then cancelled: no second completion.
    cancel(b, 3, true);
    quiet(b, Duration::from_millis(20));
    // Nothing followed the last poll: a new one sees the bytes still there.
    b.push(4, Sqe::PollIn { fd });
    assert_eq!(one(b).user_data, 4);
    read_pooled(b, 5, fd, b"two");
    b.close(ours);
}

/// A multishot accept completes once per connection with 0, `more` set and a socket that is
/// non-blocking, close-on-exec and connected to that client; a cancel ends it with
/// `-ECANCELED`, no socket and `more` clear, and it accepts no more.
pub(crate) fn multishot_accept_gets_each_connection_until_cancelled(b: &mut impl Backend) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    b.push(
        1,
        Sqe::Accept {
            fd: listener.as_raw_fd(),
        },
    );
    let clients: Vec<TcpStream> = (0..3).map(|_| TcpStream::connect(addr).unwrap()).collect();
    let (mut sockets, mut peers) = (Vec::new(), Vec::new());
    for (i, cqe) in collect(b, 3).into_iter().enumerate() {
        assert_eq!((cqe.user_data, cqe.result, cqe.more), (1, 0, true));
        let socket = cqe.accepted.expect("an accepted socket");
        let flags = fd_flags(&socket);
        assert_ne!(
            flags & libc::O_NONBLOCK,
            0,
            "accepted sockets are non-blocking"
        );
        assert_ne!(
            flags & libc::O_CLOEXEC,
            0,
            "accepted sockets are close-on-exec"
        );
        let socket = TcpStream::from(socket);
        assert_eq!(
            (&socket).read(&mut [0]).unwrap_err().kind(),
            ErrorKind::WouldBlock,
            "nothing to read yet"
        );
        // Connected to the client at its peer address: that client's byte comes through.
        let peer = socket.peer_addr().unwrap();
        let mut client = clients
            .iter()
            .find(|c| c.local_addr().unwrap() == peer)
            .unwrap();
        client.write_all(&[i as u8]).unwrap();
        let socket = OwnedFd::from(socket);
        b.push(
            2,
            Sqe::Recv {
                fd: socket.as_raw_fd(),
                buf: Vec::with_capacity(4),
            },
        );
        let cqe = one(b);
        assert_eq!((cqe.user_data, cqe.result), (2, 1));
        assert_eq!(cqe.buf.unwrap(), [i as u8]);
        peers.push(peer);
        sockets.push(socket);
    }
    let mut want: Vec<SocketAddr> = clients.iter().map(|c| c.local_addr().unwrap()).collect();
    peers.sort();
    want.sort();
    assert_eq!(peers, want, "each connection accepted once");

    cancel(b, 1, false);
    let cqe = one(b);
    assert_eq!(
        (cqe.user_data, cqe.result, cqe.more),
        (1, -libc::ECANCELED, false)
    );
    assert!(cqe.accepted.is_none());
    // A cancelled accept accepts no more, and the cancel has no completion of its own.
    let _late = TcpStream::connect(addr).unwrap();
    quiet(b, Duration::from_millis(100));
    for socket in sockets {
        b.close(socket);
    }
    b.close(OwnedFd::from(listener));
}

/// A recv appends what it reads after the bytes its buffer holds, whether they were waiting
/// or come while it waits, and keeps the buffer's capacity; at end of stream it reads 0 bytes
/// and hands the buffer back as it was.
pub(crate) fn recv_appends_after_existing_bytes_then_eof_is_zero(b: &mut impl Backend) {
    let (mut peer, ours) = pair();
    let fd = ours.as_raw_fd();
    let mut buf = Vec::with_capacity(64);
    buf.extend_from_slice(b"head:");
    peer.write_all(b"hello").unwrap();
    std::thread::sleep(Duration::from_millis(20));
    b.push(1, Sqe::Recv { fd, buf });
    let cqe = one(b);
    assert_eq!((cqe.user_data, cqe.result, cqe.more), (1, 5, false));
    let buf = cqe.buf.unwrap();
    assert_eq!(buf, b"head:hello");

    b.push(2, Sqe::Recv { fd, buf });
    quiet(b, Duration::from_millis(20));
    peer.write_all(b" world").unwrap();
    let cqe = one(b);
    assert_eq!((cqe.user_data, cqe.result, cqe.more), (2, 6, false));
    let buf = cqe.buf.unwrap();
    assert_eq!(
        (buf.as_slice(), buf.capacity()),
        (&b"head:hello world"[..], 64)
    );

    peer.shutdown(Shutdown::Write).unwrap();
    b.push(3, Sqe::Recv { fd, buf });
    let cqe = one(b);
    assert_eq!((cqe.user_data, cqe.result), (3, 0));
    assert_eq!(cqe.buf.unwrap(), b"head:hello world");
    b.close(ours);
}

/// A connect to a listener completes with 0 and no buffer, the socket connected from its own
/// address, and carries bytes; one to a closed port fails with `-ECONNREFUSED`.
pub(crate) fn connect_succeeds_to_a_listener_and_is_refused_by_a_closed_port(b: &mut impl Backend) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let ours = new_socket();
    let fd = ours.as_raw_fd();
    b.push(
        1,
        Sqe::Connect {
            fd,
            addr: addr.into(),
        },
    );
    let cqe = one(b);
    assert_eq!((cqe.user_data, cqe.result, cqe.buf.is_none()), (1, 0, true));
    let (mut accepted, peer) = listener.accept().unwrap();
    let local = SockRef::from(&ours).local_addr().unwrap();
    assert_eq!(Some(peer), local.as_socket());
    b.push(
        2,
        Sqe::Send {
            fd,
            buf: b"ping".to_vec(),
            start: 0,
            end: 4,
            more: false,
        },
    );
    let cqe = one(b);
    assert_eq!((cqe.user_data, cqe.result), (2, 4));
    let mut got = [0; 4];
    accepted.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"ping");
    b.close(ours);

    drop(listener);
    let ours = new_socket();
    b.push(
        3,
        Sqe::Connect {
            fd: ours.as_raw_fd(),
            addr: addr.into(),
        },
    );
    let cqe = one(b);
    assert_eq!((cqe.user_data, cqe.result), (3, -libc::ECONNREFUSED));
    b.close(ours);
}

/// A cancel of a waiting recv completes it once, with `-ECANCELED` and its buffer as it was;
/// neither that cancel nor a second one has a completion of its own, and bytes that come later
/// wait for the next recv. `waiting` looks at the backend while the recv (user data 1) waits.
pub(crate) fn cancel_completes_a_waiting_recv_once<B: Backend>(
    b: &mut B,
    waiting: impl FnOnce(&B),
) {
    let (mut peer, ours) = pair();
    let fd = ours.as_raw_fd();
    let mut buf = Vec::with_capacity(32);
    buf.extend_from_slice(b"keep");
    b.push(1, Sqe::Recv { fd, buf });
    quiet(b, Duration::from_millis(20));
    waiting(b);

    cancel(b, 1, false);
    let cqe = one(b);
    assert_eq!((cqe.user_data, cqe.result), (1, -libc::ECANCELED));
    let buf = cqe.buf.unwrap();
    assert_eq!((buf.as_slice(), buf.capacity()), (&b"keep"[..], 32));

    peer.write_all(b"late").unwrap();
    cancel(b, 1, false);
    quiet(b, Duration::from_millis(50));

    b.push(4, Sqe::Recv { fd, buf });
    let cqe = one(b);
    assert_eq!((cqe.user_data, cqe.result), (4, 4));
    assert_eq!(cqe.buf.unwrap(), b"keeplate");
    b.close(ours);
}

/// A wait with nothing ready returns nothing once its timeout has passed, and not much later,
/// with nothing in flight as with a recv waiting; a zero timeout returns at once.
pub(crate) fn wait_with_nothing_ready_returns_after_the_timeout(b: &mut impl Backend) {
    fn times_out(b: &mut impl Backend) {
        let mut out = Vec::new();
        let start = Instant::now();
        b.wait(Some(Duration::from_millis(150)), &mut out).unwrap();
        let took = start.elapsed();
        assert!(out.is_empty(), "unexpected completions: {out:?}");
        assert!(
            took >= Duration::from_millis(150),
            "returned early: {took:?}"
        );
        assert!(took < Duration::from_secs(1), "returned late: {took:?}");
        let start = Instant::now();
        b.wait(Some(Duration::ZERO), &mut out).unwrap();
        let took = start.elapsed();
        assert!(out.is_empty(), "unexpected completions: {out:?}");
        // Generous: a loaded machine may deschedule the thread, but never for a whole wait.
        assert!(
            took < Duration::from_millis(250),
            "a zero wait waited {took:?}"
        );
    }
    times_out(b);
    let (_peer, ours) = pair();
    b.push(
        1,
        Sqe::Recv {
            fd: ours.as_raw_fd(),
            buf: Vec::with_capacity(8),
        },
    );
    times_out(b);
    cancel(b, 1, false);
    assert_eq!(one(b).result, -libc::ECANCELED);
    b.close(ours);
}

/// A shutdown of the socket, of its read side or both, completes its waiting recv with end
/// of stream (0) and the buffer as it was.
pub(crate) fn shutdown_completes_a_waiting_recv_with_end_of_stream(b: &mut impl Backend) {
    for (user_data, how) in [(1, Shutdown::Read), (2, Shutdown::Both)] {
        let (_peer, ours) = pair();
        let mut buf = Vec::with_capacity(16);
        buf.push(b'x');
        b.push(
            user_data,
            Sqe::Recv {
                fd: ours.as_raw_fd(),
                buf,
            },
        );
        quiet(b, Duration::from_millis(20));
        SockRef::from(&ours).shutdown(how).unwrap();
        let cqe = one(b);
        assert_eq!(
            (cqe.user_data, cqe.result),
            (user_data, 0),
            "after shutdown({how:?})"
        );
        assert_eq!(cqe.buf.unwrap(), b"x");
        b.close(ours);
    }
}

/// A send marked `more` (a FIN follows) completes whole but its bytes wait: they leave with
/// the shutdown for writing that follows, and the peer reads them, then end of stream. Should
/// no shutdown come, closing the socket still delivers them.
pub(crate) fn bytes_sent_with_more_leave_with_the_fin(b: &mut impl Backend) {
    for shut_first in [true, false] {
        let (mut peer, ours) = pair();
        b.push(
            1,
            Sqe::Send {
                fd: ours.as_raw_fd(),
                buf: b"bye".to_vec(),
                start: 0,
                end: 3,
                more: true,
            },
        );
        let cqe = one(b);
        assert_eq!((cqe.user_data, cqe.result), (1, 3));
        peer.set_read_timeout(Some(Duration::from_millis(30)))
            .unwrap();
        let mut got = [0; 8];
        let waited = peer.read(&mut got).unwrap_err().kind();
        assert!(
            matches!(waited, ErrorKind::WouldBlock | ErrorKind::TimedOut),
            "the bytes waited for the FIN ({waited:?})"
        );
        if shut_first {
            SockRef::from(&ours).shutdown(Shutdown::Write).unwrap();
        }
        b.close(ours);
        peer.set_read_timeout(None).unwrap();
        let mut all = Vec::new();
        peer.read_to_end(&mut all).unwrap();
        assert_eq!(all, b"bye", "shut first: {shut_first}");
    }
}

/// A send larger than the socket takes at once, to a slow reader, goes in several short sends,
/// each of at most what was asked and handing the buffer back unchanged; the reader gets every
/// byte, in order.
pub(crate) fn a_large_send_to_a_slow_reader_arrives_whole(b: &mut impl Backend) {
    const LEN: usize = 4 << 20;
    let (mut peer, ours) = pair();
    // Small buffers (no autotuning) so that 4 MiB cannot fit in flight at once.
    SockRef::from(&peer).set_recv_buffer_size(64 << 10).unwrap();
    SockRef::from(&ours).set_send_buffer_size(64 << 10).unwrap();
    let reader = std::thread::spawn(move || {
        let mut got = Vec::with_capacity(LEN);
        let mut chunk = vec![0; 64 << 10];
        loop {
            let n = peer.read(&mut chunk).unwrap();
            if n == 0 {
                return got;
            }
            got.extend_from_slice(&chunk[..n]);
            std::thread::sleep(Duration::from_millis(1));
        }
    });
    let data = pattern(LEN);
    let mut buf = data.clone();
    let (mut start, mut sends) = (0, 0);
    while start < LEN {
        b.push(
            1,
            Sqe::Send {
                fd: ours.as_raw_fd(),
                buf,
                start,
                end: LEN,
                more: false,
            },
        );
        let cqe = one(b);
        assert_eq!(cqe.user_data, 1);
        let n = usize::try_from(cqe.result).expect("send succeeds");
        assert!(n > 0 && n <= LEN - start, "send: {n} of {}", LEN - start);
        start += n;
        sends += 1;
        buf = cqe.buf.unwrap();
        assert_eq!(buf.len(), LEN);
    }
    assert!(
        sends > 1,
        "a slow reader takes 4 MiB in several sends, not {sends}"
    );
    assert!(buf == data, "a send hands its buffer back unchanged");
    b.close(ours);
    let got = reader.join().unwrap();
    assert_eq!(got.len(), LEN);
    assert!(got == data, "the reader got other bytes than were sent");
}
