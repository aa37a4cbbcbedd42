//! A trivial WebSocket echo server built on tokio-tungstenite, independent of `codec`, for
//! measuring loadgen against something that is not our own code.
//!
//! One current-thread runtime, optionally pinned to a core so it does not compete with
//! loadgen's threads:
//!
//! ```text
//! cargo run --release -p loadgen --example echo_server -- 127.0.0.1:9001 [core]
//! ```

use std::net::SocketAddr;

use futures_util::{SinkExt as _, StreamExt as _};
use tokio::net::{TcpListener, TcpStream};

async fn serve(stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
        return;
    };
    while let Some(Ok(message)) = ws.next().await {
        if (message.is_text() || message.is_binary()) && ws.send(message).await.is_err() {
            return;
        }
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let addr: SocketAddr = args
        .next()
        .unwrap_or_else(|| "127.0.0.1:9001".into())
        .parse()
        .expect("usage: echo_server [ADDR] [CORE]");
    if let Some(core) = args.next() {
        let id = core.parse().expect("CORE is a number");
        core_affinity::set_for_current(core_affinity::CoreId { id });
    }
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(async {
            let listener = TcpListener::bind(addr).await.expect("bind");
            eprintln!("echo_server listening on {addr}");
            loop {
                if let Ok((stream, _)) = listener.accept().await {
                    tokio::spawn(serve(stream));
                }
            }
        });
}
