//! The gateway's connection machines (upgrade, relay, echo) fed arbitrary bytes from both
//! peers after real handshakes, on a fake loop that cuts the reads: they never panic, never
//! break the event loop's contract, never write an invalid frame, and always end.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // [flags, split, cuts x 8, bytes...]: bit 0 of flags picks the echo; `split` divides the
    // rest between the client and the backend.
    let Some((&[flags, split], rest)) = data.split_first_chunk::<2>() else {
        return;
    };
    let (cuts, rest) = rest.split_at(rest.len().min(8));
    let at = rest.len() * usize::from(split) / 255;
    let (client, backend) = rest.split_at(at);
    gateway::fuzzing::relay(client, backend, cuts, flags & 1 == 1);
});
