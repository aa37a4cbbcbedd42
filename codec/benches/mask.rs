//! Masking throughput per path, against the bytewise reference, `memcpy` (a ceiling: masking
//! reads and writes every byte once, like a copy) and peer crates' public masking functions.
//!
//! `cargo bench -p codec --bench mask`; results and the keep/drop decision per path are in
//! `bench-results/codec.md`. Only `fastwebsockets` exposes its masking function: tungstenite
//! (`protocol::frame::mask`) and tokio-websockets (`mask::frame`) keep theirs in private
//! modules, so they are not here.
#![expect(
    missing_docs,
    reason = "criterion_group! generates an undocumented `pub fn benches`"
)]

use std::hint::black_box;
use std::time::Duration;

use codec::mask::{self, MaskPath};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

/// Tiny control frame, the largest 7-bit length (a typical small message), and larger
/// messages from L1-resident up to well past L2.
const SIZES: [usize; 5] = [16, 125, 1024, 16 * 1024, 1024 * 1024];
const KEY: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// A zeroed buffer of `len + 128` bytes and the index in it whose address is `misalign`
/// bytes past a 64-byte boundary.
fn buffer(len: usize, misalign: usize) -> (Vec<u8>, usize) {
    let buf = vec![0; len + 128];
    let start = (64 - buf.as_ptr().addr() % 64) % 64 + misalign;
    (buf, start)
}

fn paths() -> Vec<MaskPath> {
    mask::available().collect()
}

/// Payload at a 64-byte boundary: every path, the dispatcher, the references and peers.
fn aligned(c: &mut Criterion) {
    let mut group = c.benchmark_group("mask");
    for size in SIZES {
        group.throughput(Throughput::Bytes(size as u64));
        let (mut buf, start) = buffer(size, 0);
        let buf = &mut buf[start..start + size];

        for path in paths() {
            group.bench_function(BenchmarkId::new(path.name(), size), |b| {
                b.iter(|| mask::apply_mask_with(path, black_box(&mut *buf), black_box(KEY), 0));
            });
        }
        group.bench_function(BenchmarkId::new("apply_mask", size), |b| {
            b.iter(|| mask::apply_mask(black_box(&mut *buf), black_box(KEY)));
        });
        group.bench_function(BenchmarkId::new("scalar", size), |b| {
            b.iter(|| mask::apply_mask_scalar(black_box(&mut *buf), black_box(KEY), 0));
        });
        group.bench_function(BenchmarkId::new("fastwebsockets", size), |b| {
            b.iter(|| fastwebsockets::unmask(black_box(&mut *buf), black_box(KEY)));
        });
        let src = vec![0x5a; size];
        group.bench_function(BenchmarkId::new("memcpy", size), |b| {
            b.iter(|| black_box(&mut *buf).copy_from_slice(black_box(&src)));
        });
    }
    group.finish();
}

/// Payload 6 bytes past a 64-byte boundary, where a server's read buffer puts it after a
/// 2-byte header and the 4-byte key: the hand-written paths must not rely on alignment.
fn unaligned(c: &mut Criterion) {
    let mut group = c.benchmark_group("mask_unaligned");
    for size in SIZES {
        group.throughput(Throughput::Bytes(size as u64));
        let (mut buf, start) = buffer(size, 6);
        let buf = &mut buf[start..start + size];
        for path in paths() {
            group.bench_function(BenchmarkId::new(path.name(), size), |b| {
                b.iter(|| mask::apply_mask_with(path, black_box(&mut *buf), black_box(KEY), 0));
            });
        }
        group.bench_function(BenchmarkId::new("apply_mask", size), |b| {
            b.iter(|| mask::apply_mask(black_box(&mut *buf), black_box(KEY)));
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2));
    targets = aligned, unaligned
}
criterion_main!(benches);
