//! The incremental validator agrees with `std::str::from_utf8` for any split into pieces.
#![no_main]

use codec::utf8::Utf8Validator;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&step, bytes)) = data.split_first() else {
        return;
    };
    let step = usize::from(step).max(1);
    let mut v = Utf8Validator::new();
    let ok = bytes.chunks(step).all(|c| v.feed(c).is_ok()) && v.finish().is_ok();
    assert_eq!(ok, std::str::from_utf8(bytes).is_ok());
});
