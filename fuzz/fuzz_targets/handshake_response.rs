//! Arbitrary bytes as a backend's answer to our upgrade request: never panics.
#![no_main]

use codec::handshake::{ClientHandshake, HeadLimits};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut hs = ClientHandshake::new();
    let mut request = Vec::new();
    hs.write_request(
        &mut request,
        "h",
        "/",
        Some("chat"),
        Some("permessage-deflate"),
        &[],
    );
    if let Ok(Some((_, consumed))) = hs.parse_response(data, &HeadLimits::default()) {
        assert!(consumed <= data.len());
    }
});
