//! Arbitrary bytes as a client's upgrade request: never panics, never waits past the limit, and
//! an accepted request's path is normalised.
#![no_main]

use codec::handshake::{HeadLimits, parse_request};
use codec::target::{is_valid_host, normalize_target};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let limits = HeadLimits::default();
    match parse_request(data, &limits) {
        Ok(Some((req, consumed))) => {
            assert!(consumed <= data.len());
            assert_eq!(
                normalize_target(&req.path).as_deref(),
                Ok(req.path.as_str())
            );
            assert!(!req.path.contains("//") && !req.path.contains("/../"));
            assert!(is_valid_host(req.host.as_bytes()));
        }
        Ok(None) => assert!(data.len() < limits.max_bytes),
        Err(e) => {
            let mut out = Vec::new();
            e.write_response(&mut out);
            assert!(out.starts_with(b"HTTP/1.1 "));
        }
    }
});
