//! Multishot reads: one read armed on a socket serves all of its machine's reads, so that
//! read → forward → write → read submits nothing for the read and the kernel arms its poll once,
//! not once per read.
//!
//! An armed read completes whenever bytes arrive, wanted or not. A machine asks for its next
//! read only after it has written the last one's bytes, so what arrives in between is kept, in
//! order (the loop's stash), and handed over when it asks; and since a machine that does not
//! read must stop the bytes coming (backpressure), the first completion it did not want
//! cancels the read, which is armed again once the stash is empty and the machine reads. A
//! long-idle read is parked as a poll, as single reads are (`park.rs`), and armed again when
//! bytes come.
//!
//! Per socket the loop keeps a [`Stream`] and asks it what to do at each step; this module does
//! no I/O, so its rules are checked here against a model of the kernel.
#![forbid(unsafe_code)]

/// What runs in the kernel under the read's user data.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Kernel {
    /// Nothing.
    #[default]
    Nothing,
    /// The multishot read.
    Read,
    /// A poll in the read's place (it was parked).
    Poll,
}

/// [`Stream::flags`]: the machine has a read outstanding.
const WANT: u8 = 1;
/// The loop holds completions the machine has not taken yet (the stash).
const STASHED: u8 = 1 << 1;
/// A cancel is on its way to the kernel's operation, to pause or end it.
const STOPPING: u8 = 1 << 2;
/// A cancel is on its way to the read, to park it behind a poll.
const PARKING: u8 = 1 << 3;
/// A sweep saw the read waiting since it was armed or last read.
const AGED: u8 = 1 << 4;
/// The machine cancelled its read: it gets `-ECANCELED` (see [`Stream::abandon`]) and no
/// bytes until it reads again.
const ABANDONED: u8 = 1 << 5;

/// One socket's multishot read, as the loop sees it: two bytes in a connection's slot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Stream {
    kernel: Kernel,
    flags: u8,
}

/// What the loop does next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Act {
    /// Nothing yet.
    Wait,
    /// Push the multishot read (under the same user data).
    Arm,
    /// Push a poll in the read's place.
    Poll,
    /// Hand this completion to the machine as its read's.
    Deliver,
    /// Keep this completion, after any kept before it, for the machine's next read.
    Stash,
    /// Keep it, and cancel the read: the machine is not reading.
    StashAndCancel,
    /// Drop it (its buffer goes back to the pool): nobody reads it.
    Drop,
    /// At the loop's next turn, [`Stream::serve`] the machine's read.
    Serve,
}

/// What [`Stream::serve`] hands the machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Served {
    /// Nothing: its read was served or cancelled already.
    Nothing,
    /// The stash's first completion; `last`: the stash is empty after it.
    Stashed {
        /// No completion is left in the stash.
        last: bool,
    },
    /// A cancelled read (`-ECANCELED`, no bytes).
    Cancelled,
}

impl Stream {
    fn has(self, flag: u8) -> bool {
        self.flags & flag != 0
    }

    /// Whether the loop serves the socket's reads through this stream: an operation of its is
    /// in the kernel, or completions wait in the stash. A read into the machine's own buffer
    /// must then come from the stream too (never a second read of the socket).
    pub(crate) fn active(self) -> bool {
        self.kernel != Kernel::Nothing || self.has(STASHED)
    }

    /// Whether anything is outstanding: the machine's read, or an operation in the kernel.
    /// A slot is freed only when neither side's is.
    pub(crate) fn busy(self) -> bool {
        self.kernel != Kernel::Nothing || self.has(WANT)
    }

    /// Whether the machine has a read outstanding.
    pub(crate) fn wants(self) -> bool {
        self.has(WANT)
    }

    /// Whether a multishot read, or the poll it is parked behind, runs in the kernel.
    pub(crate) fn in_kernel(self) -> bool {
        self.kernel != Kernel::Nothing
    }

    /// The machine reads (a pooled read, or into its own buffer while the stream is active).
    pub(crate) fn want(&mut self) -> Act {
        debug_assert!(!self.has(WANT), "one read at a time");
        self.flags = (self.flags | WANT) & !ABANDONED;
        if self.has(STASHED) {
            return Act::Serve;
        }
        match self.kernel {
            Kernel::Nothing => self.arm(),
            Kernel::Read | Kernel::Poll => Act::Wait,
        }
    }

    /// The loop's next turn serves the read [`Stream::want`] or [`Stream::abandon`] asked it
    /// to serve, if it still waits.
    pub(crate) fn serve(&mut self, stash_len: usize) -> Served {
        if !self.has(WANT) {
            return Served::Nothing;
        }
        self.flags &= !WANT;
        if self.has(ABANDONED) {
            return Served::Cancelled;
        }
        debug_assert!(
            self.has(STASHED) && stash_len > 0,
            "served from an empty stash"
        );
        let last = stash_len <= 1;
        if last {
            self.flags &= !STASHED;
        }
        Served::Stashed { last }
    }

    /// Whether a completion that comes now goes straight to the machine.
    fn reading(self) -> bool {
        self.flags & (WANT | STASHED | ABANDONED) == WANT
    }

    fn arm(&mut self) -> Act {
        self.kernel = Kernel::Read;
        self.flags &= !(AGED | STOPPING | PARKING);
        Act::Arm
    }

    /// Arms the read again if the machine reads; else its next read will.
    fn arm_if_reading(&mut self) -> Act {
        if self.reading() {
            self.arm()
        } else {
            Act::Drop
        }
    }

    /// Hands a completion that ends things to the machine if it reads, else keeps it for its
    /// next read; drops it if the machine gave its read up.
    fn deliver_or_stash(&mut self) -> Act {
        if self.has(ABANDONED) {
            Act::Drop
        } else if self.reading() {
            self.flags &= !WANT;
            Act::Deliver
        } else {
            self.flags |= STASHED;
            Act::Stash
        }
    }

    /// What runs under the read's user data completed with `result`; `more`: the multishot
    /// read goes on.
    pub(crate) fn complete(&mut self, result: i32, more: bool) -> Act {
        match self.kernel {
            Kernel::Nothing => {
                debug_assert!(false, "a completion with nothing in the kernel");
                Act::Drop
            }
            Kernel::Poll => {
                self.kernel = Kernel::Nothing;
                let stopping = self.has(STOPPING);
                self.flags &= !(STOPPING | PARKING | AGED);
                if result > 0 || (result == -libc::ECANCELED && stopping) {
                    // Bytes are there (or the poll was stopped): read them if the machine
                    // reads, else its next read arms the read.
                    self.arm_if_reading()
                } else {
                    self.deliver_or_stash()
                }
            }
            Kernel::Read if more => {
                self.flags &= !AGED;
                match self.deliver_or_stash() {
                    // The machine is not reading: the first bytes it leaves stop the read.
                    Act::Stash if self.flags & (STOPPING | PARKING) == 0 => {
                        self.flags |= STOPPING;
                        Act::StashAndCancel
                    }
                    act => act,
                }
            }
            Kernel::Read => {
                self.kernel = Kernel::Nothing;
                let (stopping, parking) = (self.has(STOPPING), self.has(PARKING));
                self.flags &= !(STOPPING | PARKING | AGED);
                let stopped = result == -libc::ECANCELED || result == -libc::ENOBUFS;
                if stopped && parking && !self.has(ABANDONED) {
                    self.kernel = Kernel::Poll;
                    Act::Poll
                } else if (stopped && (stopping || parking)) || result == -libc::ENOBUFS {
                    // Paused, ended, or out of buffers (which the backend refills before its
                    // next submission): armed again if the machine reads.
                    self.arm_if_reading()
                } else {
                    // Bytes as the read ended, the end of the stream, or an error.
                    self.deliver_or_stash()
                }
            }
        }
    }

    /// The machine cancels its read, or ends with the stream active: returns whether the
    /// machine is owed a cancelled read (then [`Act::Serve`] it at the next turn) and whether
    /// to ask the kernel to cancel what runs.
    pub(crate) fn abandon(&mut self) -> (bool, bool) {
        let owed = self.has(WANT);
        self.flags |= ABANDONED;
        let cancel = self.kernel != Kernel::Nothing && self.flags & (STOPPING | PARKING) == 0;
        if cancel {
            self.flags |= STOPPING;
        }
        (owed, cancel)
    }

    /// A sweep passes: true when the read has now waited through two sweeps and should be
    /// cancelled, to be parked behind a poll.
    pub(crate) fn sweep(&mut self) -> bool {
        if self.kernel != Kernel::Read || self.flags & (STOPPING | PARKING | ABANDONED) != 0 {
            return false;
        }
        if !self.has(AGED) {
            self.flags |= AGED;
            return false;
        }
        self.flags |= PARKING;
        true
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use proptest::prelude::*;

    use super::*;

    /// What the model kernel runs under the read's user data.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Op {
        Nothing,
        Read,
        Poll,
    }

    /// One step of the world around a stream.
    #[derive(Clone, Copy, Debug)]
    enum Step {
        /// The machine reads, if it has no read outstanding.
        Read,
        /// Bytes arrive from the peer.
        Bytes,
        /// The peer ends its stream.
        End,
        /// The ring has no buffer for the next read.
        NoBuffer,
        /// The kernel processes the cancels asked for (a submission; each turn starts with
        /// one).
        CancelsLand,
        /// A sweep passes.
        Sweep,
        /// The loop's next turn (serves what it was asked to).
        Turn,
        /// The machine cancels its read, if it has one.
        Cancel,
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            4 => Just(Step::Read),
            4 => Just(Step::Bytes),
            1 => Just(Step::End),
            1 => Just(Step::NoBuffer),
            3 => Just(Step::CancelsLand),
            2 => Just(Step::Sweep),
            3 => Just(Step::Turn),
            1 => Just(Step::Cancel),
        ]
    }

    /// A completion: bytes (numbered in the order the peer sent them), an end of stream or an
    /// error.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Got {
        Bytes(u32),
        End,
        Cancelled,
    }

    /// The model: the loop's [`Stream`], its stash and serve list, the kernel, and what the
    /// machine got.
    #[expect(
        clippy::struct_excessive_bools,
        reason = "a model's independent facts, each a yes or no"
    )]
    struct Model {
        stream: Stream,
        op: Op,
        /// Bytes sent by the peer and not yet read by the kernel (numbered).
        socket: VecDeque<u32>,
        /// The peer ended its stream after the bytes in `socket`.
        ended: bool,
        /// The kernel's next read finds no buffer.
        no_buffer: bool,
        cancels: u32,
        stash: VecDeque<Got>,
        serve: bool,
        /// The machine has a read outstanding.
        reading: bool,
        got: Vec<Got>,
        next_byte: u32,
    }

    impl Model {
        fn new() -> Self {
            Self {
                stream: Stream::default(),
                op: Op::Nothing,
                socket: VecDeque::new(),
                ended: false,
                no_buffer: false,
                cancels: 0,
                stash: VecDeque::new(),
                serve: false,
                reading: false,
                got: Vec::new(),
                next_byte: 0,
            }
        }

        /// The loop carries out `act` for completion `got` (`None`: no completion, e.g. after
        /// a poll).
        fn act(&mut self, act: Act, got: Option<Got>) -> Result<(), TestCaseError> {
            match act {
                Act::Wait => {}
                Act::Arm => {
                    prop_assert_eq!(self.op, Op::Nothing, "armed over a running operation");
                    // Cancels asked for before this submission land before it.
                    self.cancels = 0;
                    self.op = Op::Read;
                }
                Act::Poll => {
                    prop_assert_eq!(self.op, Op::Nothing);
                    self.cancels = 0;
                    self.op = Op::Poll;
                }
                Act::Deliver => {
                    prop_assert!(self.reading, "delivered to a machine not reading");
                    prop_assert!(self.stash.is_empty(), "delivered past the stash");
                    self.reading = false;
                    self.got.push(got.expect("a completion to deliver"));
                }
                Act::Stash => self.stash.push_back(got.expect("a completion to stash")),
                Act::StashAndCancel => {
                    self.stash.push_back(got.expect("a completion to stash"));
                    self.cancels += 1;
                }
                Act::Drop => {
                    if let Some(Got::Bytes(_) | Got::End) = got {
                        prop_assert!(
                            self.stream.has(ABANDONED),
                            "bytes dropped that the machine still wants: {:?}",
                            got
                        );
                    }
                }
                Act::Serve => self.serve = true,
            }
            Ok(())
        }

        /// The kernel's operation completes with `result` (`more`: it goes on).
        fn complete(
            &mut self,
            result: i32,
            more: bool,
            got: Option<Got>,
        ) -> Result<(), TestCaseError> {
            if !more {
                self.op = Op::Nothing;
            }
            let act = self.stream.complete(result, more);
            self.act(act, got)
        }

        fn step(&mut self, step: Step) -> Result<(), TestCaseError> {
            match step {
                Step::Read => {
                    if !self.reading {
                        self.reading = true;
                        let act = self.stream.want();
                        self.act(act, None)?;
                    }
                }
                Step::Bytes => {
                    if !self.ended {
                        self.socket.push_back(self.next_byte);
                        self.next_byte += 1;
                    }
                }
                Step::End => self.ended = true,
                Step::NoBuffer => self.no_buffer = true,
                Step::CancelsLand => {
                    if self.cancels > 0 && self.op != Op::Nothing {
                        self.complete(-libc::ECANCELED, false, Some(Got::Cancelled))?;
                    }
                    self.cancels = 0;
                }
                Step::Sweep => {
                    if self.stream.sweep() {
                        prop_assert_eq!(self.op, Op::Read, "only a read is parked");
                        self.cancels += 1;
                    }
                }
                Step::Turn => {
                    // The loop's wait submits the cancels asked for, then the kernel reads
                    // what is there, then the loop turns.
                    self.step(Step::CancelsLand)?;
                    self.kernel_runs()?;
                    if std::mem::take(&mut self.serve) {
                        match self.stream.serve(self.stash.len()) {
                            Served::Nothing => {}
                            Served::Cancelled => {
                                prop_assert!(self.reading);
                                self.reading = false;
                                self.got.push(Got::Cancelled);
                            }
                            Served::Stashed { last } => {
                                prop_assert!(self.reading);
                                let got = self.stash.pop_front().expect("a stashed completion");
                                prop_assert_eq!(last, self.stash.is_empty());
                                self.reading = false;
                                self.got.push(got);
                            }
                        }
                    }
                }
                Step::Cancel => {
                    if self.reading {
                        let (owed, cancel) = self.stream.abandon();
                        prop_assert!(owed);
                        if cancel {
                            self.cancels += 1;
                        }
                        self.serve = true;
                    }
                }
            }
            Ok(())
        }

        /// The kernel's operation sees what the socket holds.
        fn kernel_runs(&mut self) -> Result<(), TestCaseError> {
            let readable = !self.socket.is_empty() || self.ended;
            match self.op {
                Op::Poll if readable => self.complete(1, false, None)?,
                Op::Nothing | Op::Poll => {}
                Op::Read if readable && std::mem::take(&mut self.no_buffer) => {
                    self.complete(-libc::ENOBUFS, false, None)?;
                }
                Op::Read => {
                    if let Some(byte) = self.socket.pop_front() {
                        self.complete(1, true, Some(Got::Bytes(byte)))?;
                    } else if self.ended {
                        self.complete(0, false, Some(Got::End))?;
                    }
                }
            }
            Ok(())
        }

        /// The machine reads until the end of the stream, with the world quiet, then ends as
        /// the loop ends a machine: what is still in the kernel is cancelled.
        fn finish(&mut self) -> Result<(), TestCaseError> {
            self.ended = true;
            for _ in 0..10_000 {
                let done = self.got.last() == Some(&Got::End);
                if done && !self.reading {
                    if self.op == Op::Nothing {
                        return Ok(());
                    }
                    let (owed, cancel) = self.stream.abandon();
                    prop_assert!(!owed);
                    if cancel {
                        self.cancels += 1;
                    }
                } else if !done {
                    self.step(Step::Read)?;
                }
                self.step(Step::Turn)?;
            }
            prop_assert!(false, "the stream never ended: {:?}", self.stream);
            Ok(())
        }
    }

    proptest! {
        /// Whatever the order of reads, bytes, buffer shortages, sweeps, cancels and turns:
        /// the machine gets each byte once and in order (none lost unless it cancelled its
        /// read, none after it cancelled and before it read again), one completion per read;
        /// the kernel runs one operation at most under the read's user data; the stash is
        /// bounded (a machine that does not read stops the read); and once the machine reads
        /// on, the stream ends with the peer's, with nothing left in the kernel.
        #[test]
        fn each_byte_arrives_once_in_order(steps in proptest::collection::vec(step(), 0..80)) {
            let mut m = Model::new();
            for step in steps {
                m.step(step)?;
                // One completion per read may wait in the kernel's batch, one cancel's worth.
                prop_assert!(m.stash.len() <= 2, "the stash grows: {:?}", m.stash);
            }
            m.finish()?;
            prop_assert_eq!(m.op, Op::Nothing, "nothing left in the kernel");
            prop_assert!(!m.stream.busy(), "{:?}", m.stream);
            prop_assert!(m.stash.is_empty());
            // Bytes in order, each once; only a cancel may skip some.
            let mut last = None;
            let mut cancelled = false;
            for got in &m.got {
                match *got {
                    Got::Bytes(b) => {
                        if let Some(l) = last {
                            prop_assert!(b > l, "byte {} after {}: {:?}", b, l, m.got);
                            prop_assert!(b == l + 1 || cancelled, "bytes lost: {:?}", m.got);
                        }
                        last = Some(b);
                    }
                    Got::Cancelled => cancelled = true,
                    Got::End => {}
                }
            }
            if !cancelled {
                let sent: Vec<u32> = (0..m.next_byte).collect();
                let read: Vec<u32> = m.got.iter().filter_map(|g| match g {
                    Got::Bytes(b) => Some(*b),
                    _ => None,
                }).collect();
                prop_assert_eq!(read, sent, "every byte, in order");
            }
        }
    }

    #[test]
    fn a_busy_stream_submits_nothing_per_read() {
        let mut s = Stream::default();
        assert_eq!(s.want(), Act::Arm);
        for _ in 0..10 {
            assert_eq!(s.complete(5, true), Act::Deliver);
            assert_eq!(s.want(), Act::Wait);
        }
    }

    #[test]
    fn bytes_nobody_reads_stop_the_read_until_the_machine_reads_them() {
        let mut s = Stream::default();
        assert_eq!(s.want(), Act::Arm);
        assert_eq!(s.complete(5, true), Act::Deliver);
        assert_eq!(s.complete(5, true), Act::StashAndCancel);
        assert_eq!(s.complete(5, true), Act::Stash, "one cancel is enough");
        assert_eq!(s.complete(-libc::ECANCELED, false), Act::Drop);
        assert!(!s.in_kernel());
        assert_eq!(s.want(), Act::Serve);
        assert_eq!(s.serve(2), Served::Stashed { last: false });
        assert_eq!(s.want(), Act::Serve);
        assert_eq!(s.serve(1), Served::Stashed { last: true });
        assert_eq!(s.want(), Act::Arm, "armed again once the stash is empty");
    }

    #[test]
    fn an_idle_read_is_parked_and_armed_again_on_bytes() {
        let mut s = Stream::default();
        assert_eq!(s.want(), Act::Arm);
        assert!(!s.sweep());
        assert!(s.sweep());
        assert_eq!(s.complete(-libc::ECANCELED, false), Act::Poll);
        assert!(!s.sweep(), "a poll is not parked again");
        assert_eq!(s.complete(1, false), Act::Arm);
        assert_eq!(s.complete(7, true), Act::Deliver);
    }
}
