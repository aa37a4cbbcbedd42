//! [`Stamp`]: an instant in 8 bytes, for the times a connection keeps (when a peer was last
//! heard from, pinged, began a write or a close). An `Instant` takes 16 and an
//! `Option<Instant>` 16 too; an idle connection keeps half a dozen of them.
#![forbid(unsafe_code)]

use std::num::NonZeroU64;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// An instant as nanoseconds since the process's epoch, plus one (so `Option<Stamp>` is
/// 8 bytes too). Converting an instant and back gives the same instant exactly, for any
/// instant after the epoch: a day before the first stamp was made.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Stamp(NonZeroU64);

/// What stamps count from: a day before the first one, so that no instant this process works
/// with (its start, a test's `Instant::now()` taken before the first stamp) comes before it.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(|| {
        let now = Instant::now();
        now.checked_sub(Duration::from_secs(86_400)).unwrap_or(now)
    })
}

impl Stamp {
    /// `at` as a stamp (an instant before the epoch, which none is, as the epoch).
    pub(crate) fn at(at: Instant) -> Self {
        let nanos = at.saturating_duration_since(epoch()).as_nanos();
        Self(NonZeroU64::MIN.saturating_add(u64::try_from(nanos).unwrap_or(u64::MAX)))
    }

    /// The instant stamped.
    pub(crate) fn instant(self) -> Instant {
        epoch() + Duration::from_nanos(self.0.get() - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_instant_round_trips_exactly_in_eight_bytes() {
        let before = Instant::now();
        for at in [
            before,
            Instant::now(),
            before + Duration::from_nanos(1),
            before + Duration::from_secs(400 * 86_400),
        ] {
            assert_eq!(Stamp::at(at).instant(), at);
        }
        assert!(Stamp::at(before) < Stamp::at(before + Duration::from_nanos(1)));
        assert_eq!(size_of::<Option<Stamp>>(), 8);
    }
}
