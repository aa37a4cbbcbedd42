//! Criterion benchmarks for the per-frame work besides masking: header decode and encode,
//! and incremental UTF-8 validation (whole and split into pieces).
#![expect(
    missing_docs,
    reason = "criterion_group! generates an undocumented `pub fn benches`"
)]

use std::hint::black_box;
use std::time::Duration;

use codec::frame::{Decoded, FrameHeader, MAX_HEADER_LEN, OpCode, Role};
use codec::utf8::Utf8Validator;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

fn header_decode(c: &mut Criterion) {
    let mut group = c.benchmark_group("frame_header");
    group.throughput(Throughput::Elements(1));
    for (name, len, mask) in [
        ("decode_7bit_masked", 20u64, Some([1, 2, 3, 4])),
        ("decode_16bit_masked", 16 * 1024, Some([1, 2, 3, 4])),
        ("decode_64bit_unmasked", 1 << 20, None),
    ] {
        let header = FrameHeader::new(true, OpCode::Binary, mask, len);
        let mut buf = [0; MAX_HEADER_LEN];
        let n = header.encode(&mut buf);
        let role = if mask.is_some() {
            Role::Server
        } else {
            Role::Client
        };
        group.bench_function(name, |b| {
            b.iter(|| {
                let d = FrameHeader::decode(black_box(&buf[..n]), role, 0);
                assert!(matches!(d, Ok(Decoded::Header { .. })));
                d
            });
        });
    }
    group.bench_function("encode_16bit_masked", |b| {
        let header = FrameHeader::new(true, OpCode::Text, Some([9, 9, 9, 9]), 4096);
        let mut buf = [0; MAX_HEADER_LEN];
        b.iter(|| black_box(&header).encode(&mut buf));
    });
    group.finish();
}

fn utf8(c: &mut Criterion) {
    let mut group = c.benchmark_group("utf8");
    for size in [20usize, 1024, 16 * 1024, 1 << 20] {
        // Mixed-width text: ASCII with 2-, 3- and 4-byte characters.
        let text: String = "héllo wörld € 𝄞 plain ascii text "
            .chars()
            .cycle()
            .take(size)
            .collect();
        let bytes = text.as_bytes();
        group.throughput(Throughput::Bytes(bytes.len() as u64));
        group.bench_function(format!("whole/{size}"), |b| {
            b.iter(|| {
                let mut v = Utf8Validator::new();
                v.feed(black_box(bytes)).unwrap();
                v.finish().unwrap();
            });
        });
        group.bench_function(format!("split_1500/{size}"), |b| {
            b.iter(|| {
                let mut v = Utf8Validator::new();
                for piece in black_box(bytes).chunks(1500) {
                    v.feed(piece).unwrap();
                }
                v.finish().unwrap();
            });
        });
        group.bench_function(format!("std_from_utf8/{size}"), |b| {
            b.iter(|| std::str::from_utf8(black_box(bytes)).unwrap().len());
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(1));
    targets = header_decode, utf8
}
criterion_main!(benches);
