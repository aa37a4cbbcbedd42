//! Incremental UTF-8 validation of text that arrives in pieces (fragments, partial reads).
//!
//! Fails at the first chunk holding an invalid byte rather than at the end of the message:
//! a proxy must not forward what it already knows is broken (Autobahn section 6.4).
#![forbid(unsafe_code)]

use crate::error::ProtocolError;

/// Validator state: at most three bytes of a character split across chunks.
#[derive(Clone, Copy, Debug, Default)]
pub struct Utf8Validator {
    partial: [u8; 4],
    partial_len: u8,
}

/// The full length of the sequence a valid lead byte starts.
const fn sequence_len(lead: u8) -> usize {
    match lead {
        0xC0..=0xDF => 2,
        0xE0..=0xEF => 3,
        _ => 4,
    }
}

impl Utf8Validator {
    /// A validator at the start of a message.
    #[must_use]
    pub const fn new() -> Self {
        Self {
            partial: [0; 4],
            partial_len: 0,
        }
    }

    /// Checks the next chunk; an error means the text can never become valid.
    pub fn feed(&mut self, mut chunk: &[u8]) -> Result<(), ProtocolError> {
        if self.partial_len > 0 {
            let have = usize::from(self.partial_len);
            let want = sequence_len(self.partial[0]);
            let take = (want - have).min(chunk.len());
            self.partial[have..have + take].copy_from_slice(&chunk[..take]);
            let filled = have + take;
            match simdutf8::compat::from_utf8(&self.partial[..filled]) {
                Ok(_) => self.partial_len = 0,
                Err(e) if e.error_len().is_none() && filled < want => {
                    self.partial_len = filled as u8;
                    return Ok(());
                }
                Err(_) => return Err(ProtocolError::InvalidUtf8),
            }
            chunk = &chunk[take..];
        }
        match simdutf8::compat::from_utf8(chunk) {
            Ok(_) => Ok(()),
            Err(e) if e.error_len().is_none() => {
                let tail = &chunk[e.valid_up_to()..];
                self.partial[..tail.len()].copy_from_slice(tail);
                self.partial_len = tail.len() as u8;
                Ok(())
            }
            Err(_) => Err(ProtocolError::InvalidUtf8),
        }
    }

    /// Ends the message: a character left unfinished is an error. Resets for the next message.
    pub fn finish(&mut self) -> Result<(), ProtocolError> {
        let complete = self.partial_len == 0;
        self.partial_len = 0;
        if complete {
            Ok(())
        } else {
            Err(ProtocolError::InvalidUtf8)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split_check(bytes: &[u8]) -> bool {
        let expected = std::str::from_utf8(bytes).is_ok();
        for i in 0..=bytes.len() {
            for j in i..=bytes.len() {
                let mut v = Utf8Validator::new();
                let ok = v.feed(&bytes[..i]).is_ok()
                    && v.feed(&bytes[i..j]).is_ok()
                    && v.feed(&bytes[j..]).is_ok()
                    && v.finish().is_ok();
                assert_eq!(ok, expected, "{bytes:x?} split at {i},{j}");
            }
        }
        expected
    }

    #[test]
    fn splits_agree_with_std() {
        assert!(split_check("κόσμε-€-𝄞-a".as_bytes()));
        assert!(!split_check(&[
            0xCE, 0xBA, 0xE1, 0xBD, 0xB9, 0xCF, 0x83, 0xCE, 0xBC, 0xCE, 0xB5, 0xED, 0xA0, 0x80
        ]));
        assert!(!split_check(&[0xF4, 0x90, 0x80, 0x80]));
        assert!(!split_check(&[0xE2, 0x82]));
        assert!(!split_check(&[0xC0, 0xAF]));
    }

    #[test]
    fn fails_fast_before_the_end() {
        // Autobahn 6.4.1: the invalid byte arrives in the second fragment of three.
        let mut v = Utf8Validator::new();
        v.feed(&[
            0xCE, 0xBA, 0xE1, 0xBD, 0xB9, 0xCF, 0x83, 0xCE, 0xBC, 0xCE, 0xB5,
        ])
        .unwrap();
        assert_eq!(
            v.feed(&[0xF4, 0x90, 0x80, 0x80]),
            Err(ProtocolError::InvalidUtf8)
        );
        // A split lead byte that can never complete is rejected as soon as it is seen.
        let mut v = Utf8Validator::new();
        v.feed(&[b'a', 0xF4]).unwrap();
        assert_eq!(v.feed(&[0x90]), Err(ProtocolError::InvalidUtf8));
    }
}
