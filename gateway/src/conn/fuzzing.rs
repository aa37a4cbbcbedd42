//! The connection machines for `fuzz/`: arbitrary bytes from both peers, after real
//! handshakes, through the upgrade and the relay (or the echo), on the fake loop of `fake.rs`.
#![forbid(unsafe_code)]

use super::fake::{Said, World, core_ctx};

/// Runs one connection whose client sends `client` and whose backend sends `backend` once
/// upgraded (the echo ignores `backend`), read in pieces of the sizes in `cuts`.
///
/// Panics when a machine breaks its contract (two operations of a kind on one leg, an
/// operation on a socket it never opened, an end with an operation in flight), when the
/// gateway writes a frame that is not valid RFC 6455, or when the connection never ends.
pub fn relay(client: &[u8], backend: &[u8], cuts: &[u8], echo: bool) {
    let ctx = core_ctx(echo);
    let mut world = World::new(echo, true);
    for (peer, bytes) in [(&mut world.client, client), (&mut world.backend, backend)] {
        peer.script.push_back(Said {
            wire: bytes.to_vec(),
            data: Vec::new(),
            close: None,
        });
    }
    world.cuts = cuts.iter().map(|&c| usize::from(c) * 7 + 1).collect();
    let conn = world.start(&ctx);
    if let Err(e) = world.finish(conn, &ctx) {
        panic!("{e}");
    }
}
