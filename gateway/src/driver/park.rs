//! Parking long-idle reads: a pooled read that has waited for a while is swapped for a poll,
//! and read again once the poll says bytes are there.
//!
//! On io_uring a waiting read holds its request, its read state and an internal poll entry in
//! the kernel (about 600 bytes, measured in `/proc/slabinfo`); a waiting poll holds only its
//! request (256). Most of a gateway's connections are idle most of the time, so each idle
//! connection's two reads are worth parking; a busy one is never parked, because its reads
//! complete before a sweep finds them waiting twice. The machines never see a parked read: its
//! completion is the read's, whatever happened in between.
//!
//! Per read, the loop keeps a [`Park`] and asks it what to do at each step; this module does
//! no I/O, so its rules are checked here against a model of the kernel.
#![forbid(unsafe_code)]

/// Where one pooled read stands. The machine's cancel is remembered in every stage
/// (`abandoned`), so a read it gave up is never read again behind its back.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Park {
    stage: Stage,
    /// The machine cancelled the read: it ends without bytes at the next completion.
    abandoned: bool,
}

/// A pooled read's stage.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Stage {
    /// No pooled read in flight (none, or a read into the machine's own buffer).
    #[default]
    Off,
    /// The read waits in the kernel; `aged` once a sweep has seen it waiting.
    Waiting { aged: bool },
    /// A sweep asked the kernel to cancel the read, to wait with a poll instead.
    Cancelling,
    /// A poll waits in the read's place.
    Polling,
}

/// What the loop does with a completion under a read's user data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Next {
    /// Hand it to the machine as the read's completion.
    Deliver,
    /// Hand the machine a cancelled read (`-ECANCELED`, no bytes): it cancelled it.
    Cancelled,
    /// Push a poll in the read's place (same user data).
    Poll,
    /// Push the read again (same user data and length).
    Read,
}

impl Park {
    /// A pooled read was pushed for the machine.
    pub(crate) fn read() -> Self {
        Self {
            stage: Stage::Waiting { aged: false },
            abandoned: false,
        }
    }

    /// Whether a pooled read (or the poll in its place) is in flight.
    pub(crate) fn pooled(self) -> bool {
        self.stage != Stage::Off
    }

    /// A sweep passes: true when the read has now waited through two sweeps and should be
    /// cancelled, to be replaced by a poll.
    pub(crate) fn sweep(&mut self) -> bool {
        match self.stage {
            Stage::Waiting { aged: false } => {
                self.stage = Stage::Waiting { aged: true };
                false
            }
            Stage::Waiting { aged: true } if !self.abandoned => {
                self.stage = Stage::Cancelling;
                true
            }
            _ => false,
        }
    }

    /// The machine cancels its read: true when the loop should ask the kernel to cancel what
    /// runs under the read's user data (no need while the sweep's cancel is on its way, nor
    /// twice).
    pub(crate) fn cancel(&mut self) -> bool {
        let first = !self.abandoned;
        if self.stage != Stage::Off {
            self.abandoned = true;
        }
        first && self.stage != Stage::Cancelling
    }

    /// What runs under the read's user data completed with `result`: what to do with it.
    pub(crate) fn complete(&mut self, result: i32) -> Next {
        let next = match (self.stage, result) {
            // The ring ran out of buffers: read again, unless the machine gave the read up.
            (Stage::Waiting { .. }, r) if r == -libc::ENOBUFS => Next::Read,
            // Cancelled as asked (or it found no buffer): wait with a poll, unless the
            // machine gave the read up meanwhile.
            (Stage::Cancelling, r) if r == -libc::ECANCELED || r == -libc::ENOBUFS => Next::Poll,
            // The poll saw bytes, an end of stream or an error: read them.
            (Stage::Polling, r) if r > 0 => Next::Read,
            // The read's own completion (a cancelling read's too, when it completed before the
            // cancel reached it), or the poll's failure, which ends the read.
            _ => Next::Deliver,
        };
        let next = match next {
            Next::Read | Next::Poll if self.abandoned => Next::Cancelled,
            next => next,
        };
        *self = match next {
            Next::Read => Self::read(),
            Next::Poll => Self {
                stage: Stage::Polling,
                abandoned: false,
            },
            Next::Deliver | Next::Cancelled => Self::default(),
        };
        next
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// What the model kernel runs under the read's user data.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Kernel {
        Nothing,
        Read,
        Poll,
    }

    /// One step of the world around a read.
    #[derive(Clone, Copy, Debug)]
    enum Step {
        /// A sweep passes.
        Sweep,
        /// The machine cancels its read (only while it has one).
        Cancel,
        /// Bytes (or an end of stream) arrive: a waiting read or poll completes.
        Bytes,
        /// The kernel processes the cancels it was asked for.
        CancelsLand,
        /// The ring has no buffer when the read looks for one.
        NoBuffer,
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            3 => Just(Step::Sweep),
            1 => Just(Step::Cancel),
            2 => Just(Step::Bytes),
            2 => Just(Step::CancelsLand),
            1 => Just(Step::NoBuffer),
        ]
    }

    /// The model: the read's [`Park`], what the kernel runs under its user data, the cancels
    /// asked for and not yet processed, and what the machine was handed.
    struct Model {
        park: Park,
        kernel: Kernel,
        cancels: u32,
        cancelled_by_machine: bool,
        delivered: Vec<i32>,
    }

    impl Model {
        /// The kernel's operation completed with `result`; the loop does what `Park` says.
        fn complete(&mut self, result: i32) -> Result<(), TestCaseError> {
            self.kernel = Kernel::Nothing;
            match self.park.complete(result) {
                Next::Deliver => self.delivered.push(result),
                Next::Cancelled => self.delivered.push(-libc::ECANCELED),
                next @ (Next::Poll | Next::Read) => {
                    prop_assert!(
                        !self.cancelled_by_machine,
                        "a read the machine cancelled goes on in the kernel"
                    );
                    // Completions come only after a submission, which processes the cancels
                    // asked for before it, in order: none is left to hit the new operation
                    // but one the machine asks for now (and a machine's cancel asked for in
                    // the same turn, before this completion, made `Park` answer Cancelled).
                    self.cancels = 0;
                    self.kernel = if next == Next::Poll {
                        Kernel::Poll
                    } else {
                        Kernel::Read
                    };
                }
            }
            Ok(())
        }

        fn step(&mut self, step: Step) -> Result<(), TestCaseError> {
            match step {
                Step::Sweep => {
                    if self.park.sweep() {
                        prop_assert_eq!(self.kernel, Kernel::Read, "only a read is parked");
                        self.cancels += 1;
                    }
                }
                Step::Cancel => {
                    self.cancelled_by_machine = true;
                    if self.park.cancel() {
                        self.cancels += 1;
                    }
                }
                Step::Bytes => match self.kernel {
                    Kernel::Read => self.complete(5)?,
                    Kernel::Poll => self.complete(1)?,
                    Kernel::Nothing => {}
                },
                Step::NoBuffer => {
                    if self.kernel == Kernel::Read {
                        self.complete(-libc::ENOBUFS)?;
                    }
                }
                Step::CancelsLand => {
                    // A cancel that finds nothing does nothing.
                    if self.cancels > 0 && self.kernel != Kernel::Nothing {
                        self.complete(-libc::ECANCELED)?;
                    }
                    self.cancels = 0;
                }
            }
            Ok(())
        }
    }

    proptest! {
        /// Whatever the order of sweeps, cancels, bytes and buffer shortages: the machine gets
        /// exactly one completion for its read, with the bytes or (only if it cancelled)
        /// empty; the kernel runs one operation at most under the read's user data, and
        /// nothing once the read ended; and a read ends even if no bytes ever come, once the
        /// machine cancels it.
        #[test]
        fn a_read_ends_once_whatever_happens(steps in proptest::collection::vec(step(), 0..40)) {
            let mut m = Model {
                park: Park::read(),
                kernel: Kernel::Read,
                cancels: 0,
                cancelled_by_machine: false,
                delivered: Vec::new(),
            };
            let end = [Step::CancelsLand, Step::Cancel, Step::CancelsLand];
            for step in steps.into_iter().chain(end) {
                if !m.delivered.is_empty() {
                    prop_assert_eq!(m.kernel, Kernel::Nothing, "nothing left in the kernel");
                    break;
                }
                m.step(step)?;
            }
            prop_assert_eq!(m.delivered.len(), 1, "one completion: {:?}", m.delivered);
            prop_assert_eq!(m.kernel, Kernel::Nothing, "nothing left in the kernel");
            prop_assert_eq!(m.park, Park::default());
            let result = m.delivered[0];
            prop_assert!(result == 5 || result == -libc::ECANCELED, "{}", result);
            if result == -libc::ECANCELED {
                prop_assert!(m.cancelled_by_machine, "only the machine's cancel ends it empty");
            }
        }
    }

    #[test]
    fn a_busy_read_is_never_parked() {
        // Each read completes before a second sweep sees it.
        let mut park = Park::read();
        for _ in 0..10 {
            assert!(!park.sweep());
            assert_eq!(park.complete(5), Next::Deliver);
            park = Park::read();
        }
    }

    #[test]
    fn an_idle_read_is_parked_at_its_second_sweep_and_read_again_on_bytes() {
        let mut park = Park::read();
        assert!(!park.sweep());
        assert!(park.sweep());
        assert_eq!(park.stage, Stage::Cancelling);
        assert_eq!(park.complete(-libc::ECANCELED), Next::Poll);
        assert!(!park.sweep(), "a poll is not parked again");
        assert_eq!(park.complete(1), Next::Read);
        assert_eq!(park, Park::read());
        assert_eq!(park.complete(7), Next::Deliver);
    }
}
