//! The [`Backend`] contract, checked the same way on each backend over loopback sockets: each
//! backend's tests call these with a fresh instance of itself.
#![forbid(unsafe_code)]

use std::io::Write;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

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

/// Fails if anything completes within `d`.
pub(crate) fn quiet(b: &mut impl Backend, d: Duration) {
    let mut out = Vec::new();
    b.wait(Some(d), &mut out).unwrap();
    assert!(out.is_empty(), "unexpected completions: {out:?}");
}

/// A pooled read waits without a buffer, then hands over a pool buffer holding exactly the
/// bytes that came, at most `len` of them; a recycled buffer serves the next read.
pub(crate) fn pooled_recv_hands_over_a_pool_buffer(b: &mut impl Backend) {
    let (mut peer, ours) = pair();
    let fd = ours.as_raw_fd();
    b.push(1, Sqe::RecvPooled { fd, len: 1024 });
    quiet(b, Duration::from_millis(20));
    peer.write_all(b"hello").unwrap();
    let cqe = collect(b, 1).pop().unwrap();
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
    let cqe = collect(b, 1).pop().unwrap();
    assert_eq!((cqe.user_data, cqe.result), (2, 60));
    let buf = cqe.buf.unwrap();
    assert_eq!(buf, [7; 60]);
    b.recycle(buf);
    b.push(3, Sqe::RecvPooled { fd, len: 1024 });
    let cqe = collect(b, 1).pop().unwrap();
    assert_eq!((cqe.user_data, cqe.result), (3, 40));
    let buf = cqe.buf.unwrap();
    assert_eq!(buf, [7; 40]);
    // Steady reads reuse buffers instead of allocating: the first one came back by now.
    let mut seen = vec![buf.as_ptr()];
    b.recycle(buf);
    for i in 0..8 {
        peer.write_all(&[i]).unwrap();
        b.push(10, Sqe::RecvPooled { fd, len: 1024 });
        let buf = collect(b, 1).pop().unwrap().buf.unwrap();
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
    let buf = collect(b, 1).pop().unwrap().buf.unwrap();
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
    b.push(2, Sqe::Cancel { target: 1 });
    let cqe = collect(b, 1).pop().unwrap();
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
    let cqe = collect(b, 1).pop().unwrap();
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
    let cqe = collect(b, 1).pop().unwrap();
    assert_eq!(cqe.user_data, 1);
    assert!(cqe.result > 0, "a poll mask: {cqe:?}");
    assert!(cqe.buf.is_none(), "a poll holds no buffer");
    // The bytes are all still there for the read that follows.
    b.push(2, Sqe::RecvPooled { fd, len: 1024 });
    let cqe = collect(b, 1).pop().unwrap();
    assert_eq!(cqe.buf.as_deref(), Some(&b"hello"[..]));
    b.recycle(cqe.buf.unwrap());

    b.push(3, Sqe::PollIn { fd });
    quiet(b, Duration::from_millis(20));
    b.push(4, Sqe::Cancel { target: 3 });
    let cqe = collect(b, 1).pop().unwrap();
    assert_eq!((cqe.user_data, cqe.result), (3, -libc::ECANCELED));
    assert!(cqe.buf.is_none());

    b.push(5, Sqe::PollIn { fd });
    quiet(b, Duration::from_millis(20));
    peer.shutdown(Shutdown::Write).unwrap();
    let cqe = collect(b, 1).pop().unwrap();
    assert_eq!(cqe.user_data, 5);
    assert!(cqe.result > 0, "end of stream is readable: {cqe:?}");
    b.push(6, Sqe::RecvPooled { fd, len: 1024 });
    let cqe = collect(b, 1).pop().unwrap();
    assert_eq!((cqe.user_data, cqe.result), (6, 0));
    b.close(ours);
}
