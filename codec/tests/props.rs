//! Property tests for the codec's invariants.

use codec::frame::{Decoded, FrameHeader, MAX_HEADER_LEN, OpCode, RSV1, Role};
use codec::message::{Limits, MessageValidator};
use codec::utf8::Utf8Validator;
use proptest::prelude::*;

fn opcode() -> impl Strategy<Value = OpCode> {
    prop_oneof![
        Just(OpCode::Continuation),
        Just(OpCode::Text),
        Just(OpCode::Binary),
        Just(OpCode::Close),
        Just(OpCode::Ping),
        Just(OpCode::Pong),
    ]
}

fn valid_header() -> impl Strategy<Value = FrameHeader> {
    (
        any::<bool>(),
        opcode(),
        proptest::option::of(any::<[u8; 4]>()),
        0u64..(1 << 63),
        any::<bool>(),
    )
        .prop_map(|(fin, opcode, mask, len, rsv1)| {
            let control = opcode.is_control();
            FrameHeader {
                fin: fin || control,
                rsv: if rsv1 && !control { RSV1 } else { 0 },
                opcode,
                mask,
                payload_len: if control { len % 126 } else { len },
            }
        })
}

proptest! {
    #[test]
    fn header_round_trips_and_prefixes_are_incomplete(header in valid_header()) {
        let mut buf = [0; MAX_HEADER_LEN];
        let n = header.encode(&mut buf);
        let role = if header.mask.is_some() { Role::Server } else { Role::Client };
        prop_assert_eq!(FrameHeader::decode(&buf[..n], role, RSV1), Ok(Decoded::Header { header, len: n }));
        for cut in 0..n {
            match FrameHeader::decode(&buf[..cut], role, RSV1) {
                Ok(Decoded::Incomplete { needed }) => prop_assert!(needed > 0 && cut + needed <= n),
                other => prop_assert!(false, "prefix {} of {}: {:?}", cut, n, other),
            }
        }
    }

    #[test]
    fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..20), client in any::<bool>()) {
        let role = if client { Role::Client } else { Role::Server };
        if let Ok(Decoded::Header { header, len }) = FrameHeader::decode(&bytes, role, 0) {
            prop_assert!(len <= bytes.len());
            prop_assert_eq!(header.encoded_len() <= len, true);
        }
    }

    #[test]
    fn utf8_any_split_agrees_with_std(
        bytes in prop_oneof![
            any::<String>().prop_map(String::into_bytes),
            proptest::collection::vec(any::<u8>(), 0..64),
        ],
        cuts in proptest::collection::vec(any::<proptest::sample::Index>(), 0..4),
    ) {
        let mut points: Vec<usize> = cuts.iter().map(|c| c.index(bytes.len() + 1)).collect();
        points.sort_unstable();
        let mut v = Utf8Validator::new();
        let mut start = 0;
        let mut ok = true;
        for p in points.into_iter().chain([bytes.len()]) {
            ok &= v.feed(&bytes[start..p]).is_ok();
            start = p;
            if !ok { break; }
        }
        ok = ok && v.finish().is_ok();
        prop_assert_eq!(ok, std::str::from_utf8(&bytes).is_ok());
    }

    /// A valid text message split into any number of fragments, each delivered in pieces,
    /// passes; the same with one byte corrupted into 0xFF fails (0xFF is never UTF-8).
    #[test]
    fn fragmented_text_validates(text in any::<String>(), frags in 1usize..5, corrupt in any::<Option<proptest::sample::Index>>()) {
        let mut bytes = text.into_bytes();
        let corrupted = match corrupt {
            Some(i) if !bytes.is_empty() => { let i = i.index(bytes.len()); bytes[i] = 0xFF; true }
            _ => false,
        };
        let mut v = MessageValidator::new(Role::Server, Limits::default(), false);
        let size = bytes.len().div_ceil(frags).max(1);
        let chunks: Vec<&[u8]> = if bytes.is_empty() { vec![&[][..]] } else { bytes.chunks(size).collect() };
        let mut result = Ok(());
        for (i, chunk) in chunks.iter().enumerate() {
            let op = if i == 0 { OpCode::Text } else { OpCode::Continuation };
            let header = FrameHeader::new(i + 1 == chunks.len(), op, Some([0; 4]), chunk.len() as u64);
            result = v.begin_frame(&header).map(|_| ());
            if result.is_err() { break; }
            let (a, b) = chunk.split_at(chunk.len() / 2);
            result = v.payload(a).and_then(|()| v.payload(b)).and_then(|()| v.end_frame());
            if result.is_err() { break; }
        }
        prop_assert_eq!(result.is_err(), corrupted);
    }
}
