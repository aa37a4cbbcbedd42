//! Deterministic simulation of whole connections: the real machines ([`Conn`]) driven by a fake
//! loop whose completions proptest chooses. Reads and writes come back short, in any order
//! between the legs, late, failed (ECONNRESET, EPIPE), cancelled or not at all; the clock jumps;
//! drains arrive at any moment. Two scripted peers (a client and a backend, or the client alone
//! on the echo) speak real RFC 6455 through the codec.
//!
//! The invariants, checked after every event and at the end:
//! - no operation is asked for twice on one leg, and a connection ends only with nothing in
//!   flight (so no buffer is released while the kernel may be using it);
//! - every connection ends once its peers stop (a bounded number of loop turns, with time
//!   moving on);
//! - what each peer receives is a prefix of what the other sent, byte for byte (nothing lost
//!   in the middle, duplicated, reordered or corrupted), and all of it when nothing went wrong;
//! - every close code on the wire may be sent (never 1005, 1006 or 1015), and a clean run
//!   relays the client's close code to the backend and the backend's answer back.
#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::time::Duration;

use codec::frame::{OpCode, Role, write_frame};
use proptest::prelude::*;

use super::Event;
use super::fake::{Said, World, core_ctx, decode, received};
use crate::relay::lifecycle::Side;

/// A scripted message: text or binary, split into 1 to 3 frames.
#[derive(Clone, Debug)]
struct Message {
    text: bool,
    payload: Vec<u8>,
    frames: usize,
}

fn message() -> impl Strategy<Value = Message> {
    (
        any::<bool>(),
        prop::collection::vec(any::<u8>(), 0..300),
        1..=3usize,
    )
        .prop_map(|(text, payload, frames)| {
            // Text must be UTF-8: keep it ASCII so any split point is a character boundary.
            let payload = if text {
                payload.into_iter().map(|b| b'a' + b % 26).collect()
            } else {
                payload
            };
            Message {
                text,
                payload,
                frames,
            }
        })
}

/// The frames of `messages`, masked when the sender is a client.
fn script(messages: &[Message], masked: bool) -> VecDeque<Said> {
    let mut frames = VecDeque::new();
    for m in messages {
        let pieces = m.frames.min(m.payload.len().max(1));
        let step = m.payload.len().div_ceil(pieces).max(1);
        let chunks: Vec<&[u8]> = if m.payload.is_empty() {
            vec![&[]]
        } else {
            m.payload.chunks(step).collect()
        };
        for (i, chunk) in chunks.iter().enumerate() {
            let opcode = match (i, m.text) {
                (0, true) => OpCode::Text,
                (0, false) => OpCode::Binary,
                _ => OpCode::Continuation,
            };
            let mut frame = Vec::new();
            let key = masked.then(|| [1 + i as u8, 7, 13, 42]);
            write_frame(&mut frame, i + 1 == chunks.len(), opcode, key, chunk);
            frames.push_back(Said {
                wire: frame,
                data: chunk.to_vec(),
                close: None,
            });
        }
    }
    frames
}

/// What the test does next.
#[derive(Clone, Debug)]
enum Action {
    /// Complete `side`'s pending read with at most this many bytes (or its EOF, or nothing yet).
    Read(Side, usize),
    /// Complete `side`'s pending write, taking at most this many bytes.
    Write(Side, usize),
    /// A peer puts its next scripted frame on the wire.
    Speak(Side),
    /// Complete the backend connect.
    Connect,
    /// Complete a cancelled operation of `side` with ECANCELED.
    Cancelled(Side),
    /// Move the clock on (milliseconds).
    Advance(u64),
    /// A peer resets its connection.
    Reset(Side),
    /// The process drains.
    Drain,
}

fn side() -> impl Strategy<Value = Side> {
    prop_oneof![Just(Side::Client), Just(Side::Backend)]
}

fn action(faults: bool) -> BoxedStrategy<Action> {
    let calm = prop_oneof![
        4 => (side(), 1..4096usize).prop_map(|(s, n)| Action::Read(s, n)),
        4 => (side(), 1..4096usize).prop_map(|(s, n)| Action::Write(s, n)),
        4 => side().prop_map(Action::Speak),
        1 => Just(Action::Connect),
        1 => side().prop_map(Action::Cancelled),
        1 => (0..20u64).prop_map(Action::Advance),
    ];
    if faults {
        prop_oneof![
            20 => calm,
            1 => side().prop_map(Action::Reset),
            1 => Just(Action::Drain),
            2 => (0..40_000u64).prop_map(Action::Advance),
        ]
        .boxed()
    } else {
        calm.boxed()
    }
}

/// Runs one connection: `actions` first, then a calm ending where every operation completes
/// whole and time moves on, until the machine ends.
fn run(
    echo: bool,
    client_messages: &[Message],
    backend_messages: &[Message],
    client_closes: bool,
    connect_ok: bool,
    actions: &[Action],
) -> Result<(), TestCaseError> {
    let ctx = core_ctx(echo);
    let mut client_script = script(client_messages, true);
    if client_closes {
        let mut close = Vec::new();
        write_frame(
            &mut close,
            true,
            OpCode::Close,
            Some([3, 1, 4, 1]),
            &4000u16.to_be_bytes(),
        );
        client_script.push_back(Said {
            wire: close,
            data: Vec::new(),
            close: Some(4000),
        });
    }
    let backend_script = script(backend_messages, false);
    let mut world = World::new(echo, connect_ok);
    world.client.script = client_script;
    world.backend.script = backend_script;
    let mut conn = world.start(&ctx);
    let mut faulty = !connect_ok;
    for action in actions {
        if conn.is_none() {
            break;
        }
        world.react();
        let event = match action.clone() {
            Action::Read(side, n) => world.read(side, n),
            Action::Write(side, n) => world.write(side, n),
            Action::Speak(side) => {
                world.speak(side);
                None
            }
            Action::Connect => world.connected(),
            Action::Cancelled(side) => world.cancelled(side),
            Action::Advance(ms) => {
                if ms > 1000 {
                    faulty = true;
                }
                world.advance(Duration::from_millis(ms))
            }
            Action::Reset(side) => {
                faulty = true;
                world.peer(side).reset = true;
                None
            }
            Action::Drain => {
                faulty = true;
                let code = codec::CloseCode::GOING_AWAY;
                ctx.draining.set(Some(code));
                Some(Event::Drain(code))
            }
        };
        if let Some(event) = event {
            conn = world
                .deliver(conn, event, &ctx)
                .map_err(TestCaseError::fail)?;
        }
    }
    world.finish(conn, &ctx).map_err(TestCaseError::fail)?;
    check_delivery(&world, echo, faulty, client_closes)
}

/// The delivery invariants once the connection ended.
fn check_delivery(
    world: &World,
    echo: bool,
    faulty: bool,
    client_closes: bool,
) -> Result<(), TestCaseError> {
    let (to_client, closes_to_client, cut_client) = match world.client.frames_from {
        Some(from) => {
            let (frames, cut) = decode(&world.client.inbox[from..], Role::Client);
            let (data, closes) = received(&frames);
            (data, closes, cut)
        }
        None => (Vec::new(), Vec::new(), false),
    };
    let expected_to_client = if echo {
        &world.client.sent_data
    } else {
        &world.backend.sent_data
    };
    prop_assert!(
        expected_to_client.starts_with(&to_client),
        "the client got bytes the other side never sent (or in another order)"
    );
    for code in closes_to_client.iter().flatten() {
        prop_assert!(
            codec::CloseCode::new(*code).is_sendable(),
            "close code {code} on the wire"
        );
    }
    if !echo && let Some(from) = world.backend.frames_from {
        let (frames, cut) = decode(&world.backend.inbox[from..], Role::Server);
        let (data, closes) = received(&frames);
        prop_assert!(
            world.client.sent_data.starts_with(&data),
            "the backend got bytes the client never sent (or in another order)"
        );
        for code in closes.iter().flatten() {
            prop_assert!(
                codec::CloseCode::new(*code).is_sendable(),
                "close code {code} on the wire"
            );
        }
        if !faulty && client_closes {
            prop_assert!(!cut, "the backend's stream ends inside a frame");
            prop_assert_eq!(
                &data,
                &world.client.sent_data,
                "the backend missed client data"
            );
            prop_assert_eq!(
                closes.first().copied(),
                Some(Some(4000)),
                "the client's close code"
            );
        }
    }
    if !faulty && client_closes && world.client.frames_from.is_some() {
        prop_assert!(!cut_client, "the client's stream ends inside a frame");
        prop_assert_eq!(&to_client, expected_to_client, "the client missed data");
        prop_assert_eq!(
            closes_to_client.first().copied(),
            Some(Some(4000)),
            "the close answer"
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Relayed connections under arbitrary completion orders, short I/O and faults.
    #[test]
    fn relay_survives_any_completion_order(
        client in prop::collection::vec(message(), 0..6),
        backend in prop::collection::vec(message(), 0..6),
        client_closes in any::<bool>(),
        connect_ok in prop::bool::weighted(0.9),
        actions in any::<bool>().prop_flat_map(|f| prop::collection::vec(action(f), 0..200)),
    ) {
        run(false, &client, &backend, client_closes, connect_ok, &actions)?;
    }

    /// The embedded echo under the same treatment.
    #[test]
    fn echo_survives_any_completion_order(
        client in prop::collection::vec(message(), 0..6),
        client_closes in any::<bool>(),
        actions in any::<bool>().prop_flat_map(|f| prop::collection::vec(action(f), 0..200)),
    ) {
        run(true, &client, &[], client_closes, true, &actions)?;
    }

    /// Without faults, every message arrives whole and the close handshake completes.
    #[test]
    fn calm_relay_delivers_everything(
        client in prop::collection::vec(message(), 0..6),
        backend in prop::collection::vec(message(), 0..6),
        actions in prop::collection::vec(action(false), 0..200),
    ) {
        run(false, &client, &backend, true, true, &actions)?;
    }
}
