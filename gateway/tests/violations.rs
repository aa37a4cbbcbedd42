//! Client protocol violations, crafted byte by byte: the client gets a close with 1002, 1007 or
//! 1009 and the backend is told 1001.

pub mod common;

use codec::frame::{FrameHeader, MAX_HEADER_LEN, OpCode, RSV1, write_frame};
use common::{EchoBackend, Event, Gateway, fresh_key, raw_client};
use tokio_tungstenite::tungstenite::Message;

/// The `--max-message` these tests run with.
const MAX_MESSAGE: usize = 1024;

/// One masked frame.
fn frame(fin: bool, opcode: OpCode, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    write_frame(&mut out, fin, opcode, Some(fresh_key()), payload);
    out
}

/// Opens a relay to a tungstenite echo backend, proves it works, sends `bad`, and checks the
/// close code the client gets (`want`) and the 1001 the backend gets.
async fn violation(bad: &[u8], want: u16) {
    let mut backend = EchoBackend::start().await;
    let max = MAX_MESSAGE.to_string();
    let gw = Gateway::start(&["--max-message", &max, "--backend", &backend.url()]);
    let (mut client, _) = raw_client(gw.addr, "/violation", "gw.test", &[]).await;
    client.send(true, OpCode::Text, b"hello").await;
    let echo = client.read_frame().await;
    assert_eq!(
        (echo.opcode, echo.payload.as_slice()),
        (OpCode::Text, &b"hello"[..])
    );
    let mut up = backend.accept().await;
    match up.next_event().await {
        Event::Msg(Message::Text(t)) if t == "hello" => {}
        other => panic!("backend saw {other:?} instead of hello"),
    }

    client.send_raw(bad).await;
    let close = client.expect_close().await;
    assert_eq!(
        close.close_code(),
        Some(want),
        "close code for client bytes {:x?}",
        &bad[..bad.len().min(32)]
    );
    assert_eq!(
        up.expect_close().await.map(|c| c.0),
        Some(1001),
        "close code the backend got"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserved_opcode_gives_1002() {
    let key = fresh_key();
    violation(&[0x83, 0x80, key[0], key[1], key[2], key[3]], 1002).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rsv_bits_without_extension_give_1002() {
    let mut header = FrameHeader::new(true, OpCode::Text, Some(fresh_key()), 2);
    header.rsv = RSV1;
    let mut head = [0; MAX_HEADER_LEN];
    let n = header.encode(&mut head);
    let mut bad = head[..n].to_vec();
    let mut payload = *b"hi";
    codec::mask::apply_mask(&mut payload, header.mask.unwrap_or_default());
    bad.extend_from_slice(&payload);
    violation(&bad, 1002).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmasked_frame_gives_1002() {
    let mut bad = Vec::new();
    write_frame(&mut bad, true, OpCode::Text, None, b"hi");
    violation(&bad, 1002).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fragmented_control_frame_gives_1002() {
    violation(&frame(false, OpCode::Ping, b"p"), 1002).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_frame_over_125_bytes_gives_1002() {
    violation(&frame(true, OpCode::Ping, &[b'p'; 126]), 1002).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn continuation_without_start_gives_1002() {
    violation(&frame(true, OpCode::Continuation, b"orphan"), 1002).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_message_inside_fragmented_one_gives_1002() {
    let mut bad = frame(false, OpCode::Text, b"first part");
    bad.extend(frame(true, OpCode::Binary, b"interloper"));
    violation(&bad, 1002).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_code_1005_gives_1002() {
    violation(&frame(true, OpCode::Close, &1005_u16.to_be_bytes()), 1002).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_code_999_gives_1002() {
    violation(&frame(true, OpCode::Close, &999_u16.to_be_bytes()), 1002).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_byte_close_payload_gives_1002() {
    violation(&frame(true, OpCode::Close, &[0x03]), 1002).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_utf8_text_gives_1007() {
    violation(&frame(true, OpCode::Text, b"bad \xC3\x28 text"), 1007).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_utf8_split_across_fragments_gives_1007() {
    // Each fragment alone could be a valid prefix; together the sequence is invalid.
    let mut bad = frame(false, OpCode::Text, b"ok \xE2\x82");
    bad.extend(frame(true, OpCode::Continuation, b"\x28 rest"));
    violation(&bad, 1007).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_utf8_close_reason_gives_1007() {
    violation(&frame(true, OpCode::Close, b"\x03\xE8\xFF\xFE"), 1007).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_over_max_message_gives_1009() {
    violation(&frame(true, OpCode::Binary, &[7; 2 * MAX_MESSAGE]), 1009).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fragmented_message_over_max_message_gives_1009() {
    let part = [7; MAX_MESSAGE / 2 + 10];
    let mut bad = frame(false, OpCode::Binary, &part);
    bad.extend(frame(false, OpCode::Continuation, &part));
    bad.extend(frame(true, OpCode::Continuation, &part));
    violation(&bad, 1009).await;
}
