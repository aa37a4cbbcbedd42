//! Arbitrary close payloads: accepted ones carry a sendable code and re-encode identically.
#![no_main]

use codec::close::{MAX_CONTROL_PAYLOAD, parse_close, write_close};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((code, reason))) = parse_close(data) {
        assert!(code.is_sendable());
        if data.len() <= MAX_CONTROL_PAYLOAD {
            let mut out = [0; MAX_CONTROL_PAYLOAD];
            let n = write_close(&mut out, code, reason);
            assert_eq!(&out[..n], data);
        }
    }
});
