//! Payload masking (RFC 6455 section 5.3): payload byte `i` becomes `byte ^ key[i % 4]`.
//!
//! Every client-to-server payload byte passes through here, so it is one of the gateway's few
//! hot loops. [`apply_mask`] picks a path at run time (detected once, then cached), so one
//! release binary built without `-C target-cpu=native` still uses AVX2 where the CPU has it.
//!
//! A hand-written path is kept only where `benches/mask.rs` shows it beating the portable
//! [`MaskPath::Word`] loop, which LLVM already autovectorises for the baseline target
//! (numbers in `bench-results/codec.md`). So there is one:
//! - AVX2 (kept): 1.5x to 2x the Word loop's throughput from about 256 bytes up, since
//!   masking is bound by stores and AVX2 stores 32 bytes at a time where SSE2 stores 16;
//! - SSE2 and NEON (written, then dropped): they are the baseline vector sets of x86-64 and
//!   aarch64, and LLVM already compiles the Word loop to them (2x16 bytes a step). SSE2
//!   measured level with Word; NEON was judged from the generated code (same instructions),
//!   not measured, as no aarch64 machine was at hand;
//! - AVX-512 (written, measured, dropped): at most ~10% over AVX2 from 256 B to 4 KiB, level
//!   beyond (both hit the same store bandwidth), slower below 128 B (masked tail) and on
//!   unaligned 1 MiB; and its intrinsics need Rust 1.89, above the workspace MSRV.
//!
//! Large buffers are first aligned (see `ALIGN_FROM`) so that the main loop's loads and
//! stores never straddle a cache line.
//!
//! This is the one module of the crate allowed `unsafe`: raw-pointer vector loads and stores,
//! and calls into `#[target_feature]` functions after runtime detection.
#![expect(
    unsafe_code,
    reason = "SIMD masking: vector loads/stores through raw pointers and calls into \
              #[target_feature] functions, each guarded by runtime CPU detection"
)]

use std::sync::atomic::{AtomicU8, Ordering};

/// One implementation of the masking loop.
///
/// Which variants exist depends on the target architecture; [`available`] lists the ones the
/// running CPU supports, fastest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum MaskPath {
    /// x86-64 AVX2, detected at run time: 64 bytes a step, as two 32-byte vectors.
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// Portable safe code, a `u64` at a time, which LLVM autovectorises to the target's
    /// baseline vectors (SSE2 on x86-64, NEON on aarch64). Always available.
    Word,
}

impl MaskPath {
    /// Every path compiled for this target, in dispatch preference order.
    pub const ALL: &'static [Self] = &[
        #[cfg(target_arch = "x86_64")]
        Self::Avx2,
        Self::Word,
    ];

    /// Short lowercase name, for bench and log labels.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => "avx2",
            Self::Word => "word",
        }
    }

    /// Whether the running CPU can execute this path. `std` caches its feature detection,
    /// so this is cheap, but [`detected`] still caches the final choice.
    #[must_use]
    pub fn is_supported(self) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => std::arch::is_x86_feature_detected!("avx2"),
            Self::Word => true,
        }
    }
}

/// The paths this CPU supports, in dispatch preference order; never empty ([`MaskPath::Word`]
/// is always last).
pub fn available() -> impl Iterator<Item = MaskPath> {
    MaskPath::ALL
        .iter()
        .copied()
        .filter(|path| path.is_supported())
}

/// Index into [`MaskPath::ALL`] of the dispatched path; `u8::MAX` until first detection.
/// Racing first callers all compute and store the same value, so `Relaxed` suffices.
static DETECTED: AtomicU8 = AtomicU8::new(u8::MAX);

/// The path [`apply_mask`] and [`apply_mask_at`] use on this CPU: the first of [`available`].
#[must_use]
pub fn detected() -> MaskPath {
    match MaskPath::ALL.get(usize::from(DETECTED.load(Ordering::Relaxed))) {
        Some(&path) => path,
        None => detect_slow(),
    }
}

#[cold]
fn detect_slow() -> MaskPath {
    let (index, path) = MaskPath::ALL
        .iter()
        .copied()
        .enumerate()
        .find(|(_, path)| path.is_supported())
        .unwrap_or((MaskPath::ALL.len() - 1, MaskPath::Word));
    DETECTED.store(index as u8, Ordering::Relaxed);
    path
}

/// Masks (or unmasks: XOR is its own inverse) a whole payload in place.
#[inline]
pub fn apply_mask(buf: &mut [u8], key: [u8; 4]) {
    apply_mask_at(buf, key, 0);
}

/// Masks `buf` as the part of a payload that starts at payload byte `offset`, so a payload
/// that arrives in pieces can be unmasked piece by piece as it is read.
#[inline]
pub fn apply_mask_at(buf: &mut [u8], key: [u8; 4], offset: usize) {
    let key = rotate_key(key, offset);
    if buf.len() < VECTOR_FROM {
        xor_words(buf, key);
        return;
    }
    let path = detected();
    // SAFETY: `detected` only returns a path whose `is_supported()` was true on this CPU.
    unsafe { mask_unchecked(path, buf, key) }
}

/// Masks with a chosen path, for tests and benches that compare paths. Unlike
/// [`apply_mask_at`] it runs that path at every length, even where the dispatcher would not.
///
/// # Panics
///
/// If `path` is not supported by this CPU ([`MaskPath::is_supported`]). It panics rather
/// than falling back so that a test forcing a path never silently checks another one.
pub fn apply_mask_with(path: MaskPath, buf: &mut [u8], key: [u8; 4], offset: usize) {
    assert!(
        path.is_supported(),
        "mask path {path:?} is not supported by this CPU"
    );
    // SAFETY: checked just above.
    unsafe { mask_unchecked(path, buf, rotate_key(key, offset)) }
}

/// The bytewise reference implementation that the fast paths are tested against.
pub fn apply_mask_scalar(buf: &mut [u8], key: [u8; 4], offset: usize) {
    for (i, byte) in buf.iter_mut().enumerate() {
        *byte ^= key[(offset + i) % 4];
    }
}

/// Below this many bytes [`apply_mask_at`] runs the word loop inline whatever the CPU: the
/// call into a `#[target_feature]` function (which cannot be inlined into its caller) and
/// the vector setup cost as much as they save (bench: 16 and 125 bytes).
const VECTOR_FROM: usize = 128;

/// From this many bytes on, every path first masks up to `ALIGN - 1` bytes so that its main
/// loop runs on `ALIGN`-aligned addresses: no load or store then straddles a cache line,
/// which is worth up to 1.5x on unaligned payloads (the usual case: a payload follows a
/// 6 to 14 byte header in the read buffer). Below it the extra head costs more than it saves.
const ALIGN_FROM: usize = 1024;
const ALIGN: usize = 32;

/// Splits `buf` at its first `ALIGN`-byte boundary when it is at least `ALIGN_FROM` long,
/// else returns it whole as the second half.
#[inline]
fn split_for_alignment(buf: &mut [u8]) -> (&mut [u8], &mut [u8]) {
    let head = if buf.len() >= ALIGN_FROM {
        // `align_offset` may in theory answer usize::MAX; `min` keeps that correct (only
        // slower).
        buf.as_ptr().align_offset(ALIGN).min(buf.len())
    } else {
        0
    };
    buf.split_at_mut(head)
}

/// The key as seen from payload byte `offset`: masking from `offset` with `key` is masking
/// from 0 with the rotated key, which lets every path assume its slice starts at phase 0.
#[inline]
const fn rotate_key(key: [u8; 4], offset: usize) -> [u8; 4] {
    let o = offset % 4;
    [key[o], key[(o + 1) % 4], key[(o + 2) % 4], key[(o + 3) % 4]]
}

/// Runs `path` on `buf`, with `key` already rotated to `buf`'s first byte.
///
/// # Safety
///
/// `path.is_supported()` must be true on this CPU.
#[inline]
unsafe fn mask_unchecked(path: MaskPath, buf: &mut [u8], key: [u8; 4]) {
    match path {
        // SAFETY: the caller guarantees that the CPU supports AVX2.
        #[cfg(target_arch = "x86_64")]
        MaskPath::Avx2 => unsafe { x86::mask_avx2(buf, key) },
        MaskPath::Word => mask_words(buf, key),
    }
}

/// The portable path: aligns large buffers, then [`xor_words`].
#[inline]
fn mask_words(buf: &mut [u8], key: [u8; 4]) {
    let (head, body) = split_for_alignment(buf);
    xor_words(head, key);
    xor_words(body, rotate_key(key, head.len()));
}

/// XORs a `u64` at a time (LLVM turns the loop into 2x16-byte SSE2 or NEON vectors), then
/// the last 0 to 7 bytes one by one. Also masks the heads and tails of the AVX2 path.
#[inline]
fn xor_words(buf: &mut [u8], key: [u8; 4]) {
    let key32 = u64::from(u32::from_ne_bytes(key));
    let key64 = key32 << 32 | key32;
    let mut words = buf.chunks_exact_mut(8);
    for word in &mut words {
        let mut bytes = [0; 8];
        bytes.copy_from_slice(word);
        word.copy_from_slice(&(u64::from_ne_bytes(bytes) ^ key64).to_ne_bytes());
    }
    // The remainder starts at a multiple of 8, so the key phase is unchanged.
    for (byte, k) in words.into_remainder().iter_mut().zip(key.iter().cycle()) {
        *byte ^= k;
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use core::arch::x86_64::{
        __m128i, __m256i, _mm_loadu_si128, _mm_storeu_si128, _mm_xor_si128, _mm256_castsi256_si128,
        _mm256_loadu_si256, _mm256_set1_epi32, _mm256_storeu_si256, _mm256_xor_si256,
    };

    use super::{rotate_key, split_for_alignment, xor_words};

    /// 64 bytes a step (two 32-byte vectors halve the loop overhead of one: 10-20% from 100
    /// to 512 bytes), then one 32- and one 16-byte step, then words.
    ///
    /// # Safety
    ///
    /// The CPU must support AVX2.
    #[expect(
        clippy::cast_ptr_alignment,
        reason = "the cast pointers only feed loadu/storeu"
    )]
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn mask_avx2(buf: &mut [u8], key: [u8; 4]) {
        let (head, body) = split_for_alignment(buf);
        xor_words(head, key);
        let key = rotate_key(key, head.len());
        let k = _mm256_set1_epi32(i32::from_ne_bytes(key));

        let mut blocks = body.chunks_exact_mut(64);
        for block in &mut blocks {
            let p = block.as_mut_ptr().cast::<__m256i>();
            // SAFETY: `block` is 64 exclusively borrowed bytes, so `p` and `p.add(1)` are its
            // two 32-byte halves, in bounds; `loadu`/`storeu` accept any alignment.
            unsafe {
                let (lo, hi) = (p, p.add(1));
                let (a, b) = (_mm256_loadu_si256(lo), _mm256_loadu_si256(hi));
                _mm256_storeu_si256(lo, _mm256_xor_si256(a, k));
                _mm256_storeu_si256(hi, _mm256_xor_si256(b, k));
            }
        }

        let mut rest = blocks.into_remainder();
        if rest.len() >= 32 {
            let (half, after) = core::mem::take(&mut rest).split_at_mut(32);
            let p = half.as_mut_ptr().cast::<__m256i>();
            // SAFETY: `half` is 32 exclusively borrowed bytes; `loadu`/`storeu` accept any
            // alignment.
            unsafe { _mm256_storeu_si256(p, _mm256_xor_si256(_mm256_loadu_si256(p), k)) };
            rest = after;
        }
        if rest.len() >= 16 {
            let (quarter, after) = core::mem::take(&mut rest).split_at_mut(16);
            let p = quarter.as_mut_ptr().cast::<__m128i>();
            let k = _mm256_castsi256_si128(k);
            // SAFETY: `quarter` is 16 exclusively borrowed bytes; `loadu`/`storeu` accept any
            // alignment.
            unsafe { _mm_storeu_si128(p, _mm_xor_si128(_mm_loadu_si128(p), k)) };
            rest = after;
        }
        // Everything before `rest` was a multiple of 16 bytes, so the key phase is unchanged.
        xor_words(rest, key);
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::{
        ALIGN_FROM, MaskPath, apply_mask, apply_mask_at, apply_mask_scalar, apply_mask_with,
        available, detected,
    };

    /// Lengths tested exhaustively: every length up to 512, and the lengths around
    /// `ALIGN_FROM`, where the paths start splitting off an alignment head.
    fn lengths() -> impl Iterator<Item = usize> {
        (0..=512).chain(ALIGN_FROM - 8..=ALIGN_FROM + 136)
    }
    const MAX_LEN: usize = ALIGN_FROM + 136;
    /// Untouched bytes checked on both sides of the slice: more than any vector width.
    const GUARD: usize = 64;
    const FILL: u8 = 0xa5;

    #[repr(align(64))]
    struct Aligned([u8; GUARD + MAX_LEN + 2 * GUARD]);

    /// Deterministic filler that does not repeat every 4 bytes, so a wrong key phase shows.
    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(151).wrapping_add(seed) ^ (i >> 8) as u8)
            .collect()
    }

    #[test]
    fn rfc_6455_example() {
        // RFC 6455 section 5.7: "Hello" masked with 0x37fa213d.
        let mut hello = *b"Hello";
        apply_mask_scalar(&mut hello, [0x37, 0xfa, 0x21, 0x3d], 0);
        assert_eq!(hello, [0x7f, 0x9f, 0x4d, 0x51, 0x58]);
        apply_mask(&mut hello, [0x37, 0xfa, 0x21, 0x3d]);
        assert_eq!(&hello, b"Hello");
    }

    #[test]
    fn available_and_detected_agree() {
        let paths: Vec<MaskPath> = available().collect();
        assert_eq!(paths.last(), Some(&MaskPath::Word));
        assert_eq!(paths.first(), Some(&detected()));
        assert!(paths.iter().all(|path| MaskPath::ALL.contains(path)));
    }

    /// Every path, every length in [`lengths`], every start alignment within a cache line,
    /// every key phase, against the bytewise reference; the bytes around the slice must stay
    /// untouched.
    #[test]
    fn every_path_matches_scalar_exhaustively() {
        let src = pattern(MAX_LEN, 7);
        let mut buf = Aligned([FILL; GUARD + MAX_LEN + 2 * GUARD]);
        for key in [[0x37, 0xfa, 0x21, 0x3d], [0x01, 0x80, 0xff, 0x5a]] {
            for key_offset in 0..4 {
                // Masking is per byte, so the reference for a prefix is a prefix of this.
                let mut expected = src.clone();
                apply_mask_scalar(&mut expected, key, key_offset);
                for path in available() {
                    for align in 0..64 {
                        let start = GUARD + align;
                        for len in lengths() {
                            let end = start + len;
                            buf.0[start..end].copy_from_slice(&src[..len]);
                            apply_mask_with(path, &mut buf.0[start..end], key, key_offset);
                            assert!(
                                buf.0[start..end] == expected[..len],
                                "{path:?} key {key:?}+{key_offset} at {align} len {len}"
                            );
                            assert!(
                                buf.0[start - GUARD..start].iter().all(|&b| b == FILL)
                                    && buf.0[end..end + GUARD].iter().all(|&b| b == FILL),
                                "{path:?} at {align} len {len}: wrote outside the slice"
                            );
                            buf.0[start..end].fill(FILL);
                        }
                    }
                }
            }
        }
    }

    /// The dispatcher's own thresholds (small inline loop, alignment head) against the
    /// reference, at every start alignment.
    #[test]
    fn dispatcher_matches_scalar() {
        let src = pattern(MAX_LEN, 3);
        let key = [0x9e, 0x37, 0x79, 0xb9];
        let mut buf = Aligned([FILL; GUARD + MAX_LEN + 2 * GUARD]);
        for key_offset in 0..4 {
            let mut expected = src.clone();
            apply_mask_scalar(&mut expected, key, key_offset);
            for align in 0..64 {
                let start = GUARD + align;
                for len in lengths().step_by(3) {
                    let slice = &mut buf.0[start..start + len];
                    slice.copy_from_slice(&src[..len]);
                    apply_mask_at(slice, key, key_offset);
                    assert!(
                        *slice == expected[..len],
                        "at {align} len {len}+{key_offset}"
                    );
                }
            }
        }
    }

    proptest! {
        /// Masking a payload in two pieces, the second continuing at its payload offset,
        /// equals masking it whole, for the dispatcher and every forced path.
        #[test]
        fn split_masking_equals_whole(
            key in any::<[u8; 4]>(),
            payload in proptest::collection::vec(any::<u8>(), 0..4096),
            split in any::<prop::sample::Index>(),
        ) {
            let split = split.index(payload.len() + 1);
            let mut whole = payload.clone();
            apply_mask_scalar(&mut whole, key, 0);

            let mut pieces = payload.clone();
            let (head, tail) = pieces.split_at_mut(split);
            apply_mask_at(head, key, 0);
            apply_mask_at(tail, key, split);
            prop_assert_eq!(&pieces, &whole);

            let mut dispatched = payload.clone();
            apply_mask(&mut dispatched, key);
            prop_assert_eq!(&dispatched, &whole);

            for path in available() {
                let mut pieces = payload.clone();
                let (head, tail) = pieces.split_at_mut(split);
                apply_mask_with(path, head, key, 0);
                apply_mask_with(path, tail, key, split);
                prop_assert_eq!(&pieces, &whole, "{:?}", path);
            }
        }
    }
}
