//! Sans-IO RFC 6455 codec shared by the gateway and the load generator.
//!
//! Everything here is a pure function or a small state struct over byte slices: no runtime,
//! no sockets. Callers push bytes in and get decisions (headers, validation verdicts, bytes
//! to write) back, the way rustls and tokio-websockets' protocol layer are built.
//!
//! Rooms, one concept each:
//! - [`mask`]: payload masking with runtime CPU dispatch (the only `unsafe` in the crate);
//! - [`frame`]: frame header decode and encode;
//! - [`utf8`]: incremental UTF-8 validation across frames and partial reads;
//! - [`message`]: per-direction message validation (fragmentation, limits, UTF-8);
//! - [`close`]: close codes and close-frame payloads;
//! - [`handshake`]: the HTTP/1.1 upgrade, both sides;
//! - [`target`]: the request path and `Host` normalised and checked before routing;
//! - [`error`]: the one protocol error type and its mapping to close codes.
#![deny(unsafe_code)]

pub mod close;
pub mod error;
pub mod frame;
pub mod handshake;
pub mod mask;
pub mod message;
pub mod target;
pub mod utf8;

pub use close::CloseCode;
pub use error::ProtocolError;
pub use frame::{Decoded, FrameHeader, OpCode, Role};
pub use message::{Limits, MessageValidator, PayloadKind};
