//! (filled by its own change)
#![forbid(unsafe_code)]
