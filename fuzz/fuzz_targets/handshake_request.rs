//! Arbitrary bytes as a client's upgrade request: never panics, never waits past the limit.
#![no_main]

use codec::handshake::{HeadLimits, parse_request};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let limits = HeadLimits::default();
    match parse_request(data, &limits) {
        Ok(Some((_, consumed))) => assert!(consumed <= data.len()),
        Ok(None) => assert!(data.len() < limits.max_bytes),
        Err(e) => {
            let mut out = Vec::new();
            e.write_response(&mut out);
            assert!(out.starts_with(b"HTTP/1.1 "));
        }
    }
});
