//! Feeds arbitrary bytes through header decoding and message validation, in the pieces a
//! socket might deliver, checking that a decoded header re-encodes to the same bytes.
#![no_main]

use codec::frame::{Decoded, FrameHeader, MAX_HEADER_LEN, Role};
use codec::message::{Limits, MessageValidator, PayloadKind};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, mut rest)) = data.split_first() else {
        return;
    };
    let role = if flags & 1 == 0 {
        Role::Server
    } else {
        Role::Client
    };
    let deflate = flags & 2 != 0;
    let mut validator = MessageValidator::new(role, Limits::new(1 << 16, 1 << 12), deflate);
    loop {
        let header = match FrameHeader::decode(rest, role, validator.allowed_rsv()) {
            Ok(Decoded::Header { header, len }) => {
                let mut buf = [0; MAX_HEADER_LEN];
                let n = header.encode(&mut buf);
                // Minimal-length encodings round-trip byte for byte.
                if n == len {
                    assert_eq!(&buf[..n], &rest[..n]);
                }
                rest = &rest[len..];
                header
            }
            Ok(Decoded::Incomplete { needed }) => {
                assert!(needed > 0);
                return;
            }
            Err(_) => return,
        };
        let kind = match validator.begin_frame(&header) {
            Ok(kind) => kind,
            Err(_) => return,
        };
        let len = (header.payload_len.min(rest.len() as u64)) as usize;
        let mut payload = rest[..len].to_vec();
        if let Some(key) = header.mask {
            codec::mask::apply_mask(&mut payload, key);
        }
        if kind == PayloadKind::Control && header.opcode == codec::OpCode::Close {
            let _ = codec::close::parse_close(&payload);
        }
        let (a, b) = payload.split_at(len / 2);
        if validator.payload(a).is_err() || validator.payload(b).is_err() {
            return;
        }
        if (len as u64) < header.payload_len || validator.end_frame().is_err() {
            return;
        }
        rest = &rest[len..];
    }
});
