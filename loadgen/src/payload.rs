//! Echo payloads that prove they came back intact, to the right connection, in order.
//!
//! Each message starts with its sequence number in hex and continues with a pattern that
//! depends on the connection, so a corrupted byte, a stale or duplicated echo, or one that
//! belongs to another connection is a mismatch. Only ASCII is used, so the same bytes are a
//! valid text message. The buffer is built once per connection; a message rewrites only the
//! sequence digits, so the hot path does not allocate.

/// Hex digits that carry the sequence number (fewer when the payload is shorter).
const SEQ_DIGITS: usize = 16;

/// The expected content of a connection's current message.
#[derive(Clone, Debug)]
pub(crate) struct Payload {
    bytes: Vec<u8>,
}

impl Payload {
    /// A `size`-byte payload whose filler is specific to connection `connection`.
    pub(crate) fn new(size: usize, connection: usize) -> Self {
        let bytes = (0..size)
            .map(|i| b'a' + ((i + connection) % 26) as u8)
            .collect();
        Self { bytes }
    }

    /// Writes `seq` (hex, low digits last) into the leading bytes.
    pub(crate) fn stamp(&mut self, seq: u64) {
        let digits = self.bytes.len().min(SEQ_DIGITS);
        let mut v = seq;
        for b in self.bytes[..digits].iter_mut().rev() {
            *b = b"0123456789abcdef"[(v & 0xF) as usize];
            v >>= 4;
        }
    }

    /// The whole message.
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The message length.
    pub(crate) fn len(&self) -> usize {
        self.bytes.len()
    }
}

/// How the echo of the message in flight is progressing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Echoed {
    /// More fragments are due.
    Partial,
    /// The whole message came back intact.
    Complete,
    /// Wrong type, wrong bytes, wrong length, or a fragment nobody asked for.
    Mismatch,
}

/// Checks an echo fragment by fragment, so a server may re-fragment the message.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct EchoCheck {
    /// Bytes of the current echo already matched; `None` before its first frame.
    received: Option<usize>,
}

impl EchoCheck {
    /// Checks one data frame against `expected`: `continuation` is whether it is a continuation
    /// frame, `type_ok` whether a first frame has the message's type (text or binary).
    pub(crate) fn frame(
        &mut self,
        expected: &Payload,
        continuation: bool,
        type_ok: bool,
        fin: bool,
        chunk: &[u8],
    ) -> Echoed {
        let offset = match (self.received, continuation) {
            (None, false) if type_ok => 0,
            (Some(offset), true) => offset,
            _ => return Echoed::Mismatch,
        };
        let end = offset + chunk.len();
        if expected.bytes.get(offset..end) != Some(chunk) {
            return Echoed::Mismatch;
        }
        if !fin {
            self.received = Some(end);
            return Echoed::Partial;
        }
        self.received = None;
        if end == expected.len() {
            Echoed::Complete
        } else {
            Echoed::Mismatch
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamp_changes_only_the_sequence_digits() {
        let mut p = Payload::new(24, 1);
        p.stamp(0x1234);
        assert_eq!(&p.bytes()[..16], b"0000000000001234");
        assert_eq!(&p.bytes()[16..], b"rstuvwxy");
        let mut short = Payload::new(3, 0);
        short.stamp(0xABCD);
        assert_eq!(short.bytes(), b"bcd");
        assert!(std::str::from_utf8(p.bytes()).is_ok());
    }

    #[test]
    fn connections_differ_beyond_the_sequence() {
        let (mut a, mut b) = (Payload::new(20, 0), Payload::new(20, 1));
        a.stamp(7);
        b.stamp(7);
        assert_ne!(a.bytes(), b.bytes());
    }

    #[test]
    fn whole_and_fragmented_echoes_match() {
        let mut p = Payload::new(10, 0);
        p.stamp(1);
        let mut c = EchoCheck::default();
        assert_eq!(c.frame(&p, false, true, true, p.bytes()), Echoed::Complete);
        let (head, tail) = p.bytes().split_at(4);
        assert_eq!(c.frame(&p, false, true, false, head), Echoed::Partial);
        assert_eq!(c.frame(&p, true, true, true, tail), Echoed::Complete);
    }

    #[test]
    fn every_kind_of_wrong_echo_is_a_mismatch() {
        let mut p = Payload::new(10, 0);
        p.stamp(1);
        let mut corrupt = p.bytes().to_vec();
        corrupt[5] ^= 1;
        let cases: [(bool, bool, bool, &[u8]); 6] = [
            (false, true, true, &corrupt),        // flipped byte
            (false, true, true, &p.bytes()[..9]), // truncated
            (false, false, true, p.bytes()),      // wrong message type
            (true, true, true, p.bytes()),        // continuation without a start
            (false, true, true, b"0000000002"),   // another sequence number
            (false, true, true, &[]),             // empty
        ];
        for (continuation, type_ok, fin, chunk) in cases {
            let mut c = EchoCheck::default();
            assert_eq!(
                c.frame(&p, continuation, type_ok, fin, chunk),
                Echoed::Mismatch,
                "{chunk:?}"
            );
        }
        let mut c = EchoCheck::default();
        assert_eq!(
            c.frame(&p, false, true, false, &p.bytes()[..4]),
            Echoed::Partial
        );
        assert_eq!(c.frame(&p, false, true, true, p.bytes()), Echoed::Mismatch); // new message mid-echo
    }
}
