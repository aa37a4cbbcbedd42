//! Arbitrary request targets: normalisation never panics, and what it returns is canonical.
#![no_main]

use codec::target::{normalize_path, normalize_target};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(raw) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(target) = normalize_target(raw) else {
        return;
    };
    let (path, query) = target.split_at(target.find('?').unwrap_or(target.len()));
    assert!(raw.ends_with(query), "the query is kept as sent");
    assert!(path.starts_with('/'));
    assert!(!path.contains("//"));
    assert!(!path.contains("/./") && !path.contains("/../"));
    assert!(!path.ends_with("/.") && !path.ends_with("/.."));
    assert!(!path.contains('\\'));
    assert!(target.len() <= raw.len());
    assert_eq!(normalize_path(path).as_deref(), Ok(path), "idempotent");
});
