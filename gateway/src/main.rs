//! `gateway`: a thread-per-core WebSocket reverse proxy that parses and validates every frame
//! it relays. Everything lives in the library; see `lib.rs`.
#![forbid(unsafe_code)]

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    gateway::main()
}
