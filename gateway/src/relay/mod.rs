//! After the `101`: frames relayed both ways (or echoed), validated as they go, the close
//! handshake, keepalive and the write and close timeouts. `LIFECYCLE.md` beside this file says
//! who gets which close code.
//!
//! - `forward.rs`: the sans-IO heart, turning what one peer sent into what the other receives;
//! - `lifecycle.rs`: the close handshake's states;
//! - `keepalive.rs`: when to ping, when a peer is dead or a write stuck;
//! - `leg.rs`: one peer's leg and one direction's pump, shared by
//! - `proxy.rs` (a connection relayed to a backend) and `echo.rs` (the embedded echo).
#![forbid(unsafe_code)]

pub(crate) mod echo;
pub(crate) mod forward;
pub(crate) mod keepalive;
mod leg;
pub(crate) mod lifecycle;
mod proxy;

pub(crate) use proxy::Relay;
