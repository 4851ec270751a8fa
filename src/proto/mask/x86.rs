//! x86-64 masking kernels: in place, AVX2 (runtime-detected) and SSE2 (part of the x86-64
//! baseline); while copying, AVX2 (without it the portable kernel).
//!
//! The kernel is chosen on the first call and cached in [`KERNEL`], so later calls cost one
//! relaxed load and a predictable branch. The kernels use unaligned loads and stores, so any
//! buffer works; the in-place ones first mask a short head to reach vector alignment on
//! buffers of [`ALIGN_FROM`] bytes or more, the copying one always aligns its stores, so the
//! main loops never split a cache line they write.

use std::arch::x86_64::{
    __m128i, __m256i, _mm256_loadu_si256, _mm256_storeu_si256, _mm256_stream_si256,
    _mm256_xor_si256, _mm_loadu_si128, _mm_sfence, _mm_storeu_si128, _mm_xor_si128,
};
use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicU8, Ordering};

use super::{mask_into_portable, mask_tail, rotate};

/// [`KERNEL`] before detection ran.
const UNDETECTED: u8 = 0;
/// [`KERNEL`] value: use [`apply_mask_sse2`].
const SSE2: u8 = 1;
/// [`KERNEL`] value: use [`apply_mask_avx2`]. Stored only after AVX2 was detected.
const AVX2: u8 = 2;

/// The kernel picked for this process. Relaxed ordering suffices: the value depends only on
/// the CPU, so a thread that reads a stale [`UNDETECTED`] simply detects again.
static KERNEL: AtomicU8 = AtomicU8::new(UNDETECTED);

/// Buffers at least this long get an alignment head; below it the head costs more than the
/// split cache lines it saves.
const ALIGN_FROM: usize = 256;

/// Buffers shorter than this take [`mask_small`] (in place, inlined into the caller) or the
/// portable kernel (copying): for them the call into an out-of-line `#[target_feature]`
/// kernel costs more than AVX2 saves.
const SMALL_BELOW: usize = 128;

/// Dispatches to [`mask_small`] or the detected kernel.
#[inline]
pub(super) fn apply_mask(buf: &mut [u8], mask: [u8; 4], phase: usize) -> usize {
    if buf.len() < SMALL_BELOW {
        return mask_small(buf, mask, phase);
    }
    if cfg!(target_feature = "avx2") {
        // SAFETY: the crate was compiled for CPUs with AVX2, so every CPU it runs on has it.
        return unsafe { apply_mask_avx2(buf, mask, phase) };
    }
    match KERNEL.load(Ordering::Relaxed) {
        // SAFETY: `AVX2` is stored in `KERNEL` only after `detect` saw the CPU support AVX2.
        AVX2 => unsafe { apply_mask_avx2(buf, mask, phase) },
        SSE2 => apply_mask_sse2_safe(buf, mask, phase),
        _ => {
            detect();
            apply_mask(buf, mask, phase)
        }
    }
}

/// Dispatches [`super::mask_into`]: AVX2 where the CPU has it, else the portable kernel
/// (the copying form has no SSE2 kernel; without AVX2 it is 8 bytes per step). With `stream`
/// the AVX2 kernel writes with non-temporal stores, which bypass the cache.
#[inline]
pub(super) fn mask_into(
    dst: &mut [MaybeUninit<u8>],
    src: &[u8],
    mask: [u8; 4],
    phase: usize,
    stream: bool,
) -> usize {
    if src.len() >= SMALL_BELOW
        && (cfg!(target_feature = "avx2")
            || KERNEL.load(Ordering::Relaxed) == AVX2
            || detect() == AVX2)
    {
        // SAFETY: AVX2 is compiled in or was detected just above.
        return unsafe {
            if stream {
                mask_into_avx2::<true>(dst, src, mask, phase)
            } else {
                mask_into_avx2::<false>(dst, src, mask, phase)
            }
        };
    }
    mask_into_portable(dst, src, mask, phase)
}

/// The name of the detected kernel.
pub(super) fn kernel_name() -> &'static str {
    if cfg!(target_feature = "avx2") || detect() == AVX2 {
        "avx2"
    } else {
        "sse2"
    }
}

/// Detects the CPU's features (once per process in practice) and caches the pick.
#[cold]
fn detect() -> u8 {
    let cached = KERNEL.load(Ordering::Relaxed);
    if cached != UNDETECTED {
        return cached;
    }
    let kernel = if std::is_x86_feature_detected!("avx2") {
        AVX2
    } else {
        SSE2
    };
    KERNEL.store(kernel, Ordering::Relaxed);
    kernel
}

/// [`apply_mask_sse2`] behind a safe signature: SSE2 is part of the x86-64 baseline.
#[inline]
pub(super) fn apply_mask_sse2_safe(buf: &mut [u8], mask: [u8; 4], phase: usize) -> usize {
    const _: () = assert!(cfg!(target_feature = "sse2"), "x86-64 always has SSE2");
    // SAFETY: every x86-64 CPU has SSE2 (asserted at compile time just above).
    unsafe { apply_mask_sse2(buf, mask, phase) }
}

/// Masks a short buffer with 16-byte SSE2 steps, without a call or an alignment head.
#[inline(always)]
fn mask_small(buf: &mut [u8], mask: [u8; 4], phase: usize) -> usize {
    const _: () = assert!(cfg!(target_feature = "sse2"), "x86-64 always has SSE2");
    let next = (phase + buf.len()) & 3;
    let word = rotate(mask, phase);
    let pattern = [word; 4];
    let mut vectors = buf.chunks_exact_mut(16);
    for vector in &mut vectors {
        // SAFETY: `vector` and `pattern` are 16 bytes each; the unaligned intrinsics need no
        // alignment; every x86-64 CPU has SSE2 (asserted at compile time above).
        unsafe {
            let p = vector.as_mut_ptr().cast::<__m128i>();
            let m = _mm_loadu_si128(pattern.as_ptr().cast());
            _mm_storeu_si128(p, _mm_xor_si128(_mm_loadu_si128(p), m));
        }
    }
    // Whole vectors leave the phase unchanged, so the rest continues with `word`.
    mask_tail(vectors.into_remainder(), word);
    next
}

/// Number of bytes before the first `align`-aligned address in `buf` (all of `buf` if none).
#[inline(always)]
fn head_len(buf: &[u8], align: usize) -> usize {
    ((buf.as_ptr() as usize).wrapping_neg() & (align - 1)).min(buf.len())
}

/// Masks fewer than 32 bytes with `word` applying from the first byte: one 16-byte step, then
/// [`mask_tail`].
///
/// # Safety
/// The CPU must support SSE2 (always true on x86-64).
#[inline]
#[target_feature(enable = "sse2")]
unsafe fn mask_short(buf: &mut [u8], word: u32) {
    let mut rest = buf;
    if rest.len() >= 16 {
        let (head, tail) = rest.split_at_mut(16);
        let pattern = [word; 4];
        // SAFETY: `head` and `pattern` are 16 bytes each, the unaligned load/store intrinsics
        // need no alignment, and SSE2 is available (caller's contract).
        unsafe {
            let p = head.as_mut_ptr().cast::<__m128i>();
            let m = _mm_loadu_si128(pattern.as_ptr().cast());
            _mm_storeu_si128(p, _mm_xor_si128(_mm_loadu_si128(p), m));
        }
        rest = tail;
    }
    mask_tail(rest, word);
}

/// SSE2 kernel: 64 bytes per iteration in four 16-byte vectors.
///
/// # Safety
/// The CPU must support SSE2 (always true on x86-64).
#[target_feature(enable = "sse2")]
pub(super) unsafe fn apply_mask_sse2(buf: &mut [u8], mask: [u8; 4], phase: usize) -> usize {
    let next = (phase + buf.len()) & 3;
    let mut phase = phase & 3;
    let mut rest = buf;
    if rest.len() >= ALIGN_FROM {
        let (head, tail) = rest.split_at_mut(head_len(rest, 16));
        // SAFETY: SSE2 is available (caller's contract).
        unsafe { mask_short(head, rotate(mask, phase)) };
        phase = (phase + head.len()) & 3;
        rest = tail;
    }
    let word = rotate(mask, phase);
    let pattern = [word; 4];
    let mut blocks = rest.chunks_exact_mut(64);
    for block in &mut blocks {
        // SAFETY: `block` is 64 bytes, so the four 16-byte accesses at `p..p + 4` stay inside
        // it; `pattern` is 16 bytes; unaligned intrinsics need no alignment; SSE2 is available.
        unsafe {
            let m = _mm_loadu_si128(pattern.as_ptr().cast());
            let p = block.as_mut_ptr().cast::<__m128i>();
            let (a, b) = (_mm_loadu_si128(p), _mm_loadu_si128(p.add(1)));
            let (c, d) = (_mm_loadu_si128(p.add(2)), _mm_loadu_si128(p.add(3)));
            _mm_storeu_si128(p, _mm_xor_si128(a, m));
            _mm_storeu_si128(p.add(1), _mm_xor_si128(b, m));
            _mm_storeu_si128(p.add(2), _mm_xor_si128(c, m));
            _mm_storeu_si128(p.add(3), _mm_xor_si128(d, m));
        }
    }
    // Whole blocks leave the phase unchanged, so the rest continues with `word`.
    let mut vectors = blocks.into_remainder().chunks_exact_mut(16);
    for vector in &mut vectors {
        // SAFETY: `vector` and `pattern` are 16 bytes each; unaligned intrinsics; SSE2.
        unsafe {
            let p = vector.as_mut_ptr().cast::<__m128i>();
            let m = _mm_loadu_si128(pattern.as_ptr().cast());
            _mm_storeu_si128(p, _mm_xor_si128(_mm_loadu_si128(p), m));
        }
    }
    mask_tail(vectors.into_remainder(), word);
    next
}

/// AVX2 kernel: 128 bytes per iteration in four 32-byte vectors.
///
/// # Safety
/// The CPU must support AVX2.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn apply_mask_avx2(buf: &mut [u8], mask: [u8; 4], phase: usize) -> usize {
    let next = (phase + buf.len()) & 3;
    let mut phase = phase & 3;
    let mut rest = buf;
    if rest.len() >= ALIGN_FROM {
        let (head, tail) = rest.split_at_mut(head_len(rest, 32));
        // SAFETY: AVX2 implies SSE2, and the caller guarantees AVX2.
        unsafe { mask_short(head, rotate(mask, phase)) };
        phase = (phase + head.len()) & 3;
        rest = tail;
    }
    let word = rotate(mask, phase);
    let pattern = [word; 8];
    let mut blocks = rest.chunks_exact_mut(128);
    for block in &mut blocks {
        // SAFETY: `block` is 128 bytes, so the four 32-byte accesses at `p..p + 4` stay inside
        // it; `pattern` is 32 bytes; unaligned intrinsics need no alignment; the caller
        // guarantees AVX2.
        unsafe {
            let m = _mm256_loadu_si256(pattern.as_ptr().cast());
            let p = block.as_mut_ptr().cast::<__m256i>();
            let (a, b) = (_mm256_loadu_si256(p), _mm256_loadu_si256(p.add(1)));
            let (c, d) = (_mm256_loadu_si256(p.add(2)), _mm256_loadu_si256(p.add(3)));
            _mm256_storeu_si256(p, _mm256_xor_si256(a, m));
            _mm256_storeu_si256(p.add(1), _mm256_xor_si256(b, m));
            _mm256_storeu_si256(p.add(2), _mm256_xor_si256(c, m));
            _mm256_storeu_si256(p.add(3), _mm256_xor_si256(d, m));
        }
    }
    // Whole blocks leave the phase unchanged, so the rest continues with `word`.
    let mut vectors = blocks.into_remainder().chunks_exact_mut(32);
    for vector in &mut vectors {
        // SAFETY: `vector` and `pattern` are 32 bytes each; unaligned intrinsics; AVX2.
        unsafe {
            let p = vector.as_mut_ptr().cast::<__m256i>();
            let m = _mm256_loadu_si256(pattern.as_ptr().cast());
            _mm256_storeu_si256(p, _mm256_xor_si256(_mm256_loadu_si256(p), m));
        }
    }
    // SAFETY: AVX2 implies SSE2, and the caller guarantees AVX2.
    unsafe { mask_short(vectors.into_remainder(), word) };
    next
}

/// AVX2 copying kernel: reads `src` once and writes it unmasked to `dst` (as long as `src`),
/// 128 bytes per iteration in four 32-byte vectors, after a head that aligns the stores.
/// With `STREAM` the aligned stores are non-temporal, and a store fence ends the call, so
/// whatever reads `dst` next sees them as ordinary writes.
///
/// # Safety
/// The CPU must support AVX2.
#[target_feature(enable = "avx2")]
unsafe fn mask_into_avx2<const STREAM: bool>(
    dst: &mut [MaybeUninit<u8>],
    src: &[u8],
    mask: [u8; 4],
    phase: usize,
) -> usize {
    assert_eq!(dst.len(), src.len());
    let next = (phase + src.len()) & 3;
    let head = ((dst.as_ptr() as usize).wrapping_neg() & 31).min(src.len());
    let (dst_head, dst) = dst.split_at_mut(head);
    let (src_head, src) = src.split_at(head);
    let phase = mask_into_portable(dst_head, src_head, mask, phase);
    let word = rotate(mask, phase);
    let pattern = [word; 8];
    let mut to = dst.chunks_exact_mut(128);
    let mut from = src.chunks_exact(128);
    for (d, s) in (&mut to).zip(&mut from) {
        // SAFETY: `d` and `s` are 128 bytes each, so the four 32-byte accesses at `p..p + 4`
        // and `q..q + 4` stay inside them; `pattern` is 32 bytes; unaligned intrinsics need no
        // alignment, and the streaming stores get the 32 they need (`d` starts after the head
        // and steps by 128); storing to `MaybeUninit<u8>` memory initialises it; the caller
        // guarantees AVX2.
        unsafe {
            let m = _mm256_loadu_si256(pattern.as_ptr().cast());
            let q = s.as_ptr().cast::<__m256i>();
            let p = d.as_mut_ptr().cast::<__m256i>();
            let (a, b) = (_mm256_loadu_si256(q), _mm256_loadu_si256(q.add(1)));
            let (c, e) = (_mm256_loadu_si256(q.add(2)), _mm256_loadu_si256(q.add(3)));
            if STREAM {
                _mm256_stream_si256(p, _mm256_xor_si256(a, m));
                _mm256_stream_si256(p.add(1), _mm256_xor_si256(b, m));
                _mm256_stream_si256(p.add(2), _mm256_xor_si256(c, m));
                _mm256_stream_si256(p.add(3), _mm256_xor_si256(e, m));
            } else {
                _mm256_storeu_si256(p, _mm256_xor_si256(a, m));
                _mm256_storeu_si256(p.add(1), _mm256_xor_si256(b, m));
                _mm256_storeu_si256(p.add(2), _mm256_xor_si256(c, m));
                _mm256_storeu_si256(p.add(3), _mm256_xor_si256(e, m));
            }
        }
    }
    if STREAM {
        // Non-temporal stores are weakly ordered: the fence orders them before every later
        // access to `dst`, by this thread or by one it hands the buffer to (SAFETY of the
        // intrinsic: https://doc.rust-lang.org/core/arch/x86_64/fn._mm256_stream_si256.html).
        _mm_sfence();
    }
    // Whole blocks leave the phase unchanged, so the rest continues from `phase`.
    mask_into_portable(to.into_remainder(), from.remainder(), mask, phase);
    next
}

#[cfg(test)]
mod tests {
    use super::super::tests::{check_into_kernel, check_kernel};
    use super::*;

    #[test]
    fn sse2_matches_scalar_at_every_length_offset_and_phase() {
        check_kernel(
            "sse2",
            (0..=300).chain([511, 512, 513, 1000]),
            apply_mask_sse2_safe,
        );
    }

    #[test]
    fn avx2_matches_scalar_at_every_length_offset_and_phase() {
        if !std::is_x86_feature_detected!("avx2") {
            eprintln!("skipping: this CPU has no AVX2");
            return;
        }
        check_kernel(
            "avx2",
            (0..=300).chain([511, 512, 513, 1000]),
            |buf, mask, phase| {
                // SAFETY: AVX2 was detected just above.
                unsafe { apply_mask_avx2(buf, mask, phase) }
            },
        );
    }

    #[test]
    fn avx2_mask_into_matches_scalar_at_every_length_and_offset() {
        if !std::is_x86_feature_detected!("avx2") {
            eprintln!("skipping: this CPU has no AVX2");
            return;
        }
        check_into_kernel(
            "avx2 into",
            (0..=300).chain([511, 512, 513, 1000]),
            [0, 1, 3, 17, 31].into_iter(),
            |dst, src, mask, phase| {
                // SAFETY: AVX2 was detected just above.
                unsafe { mask_into_avx2::<false>(dst, src, mask, phase) }
            },
        );
        check_into_kernel(
            "avx2 streaming into",
            (0..=300).chain([511, 512, 513, 1000]),
            [0, 1, 3, 17, 31].into_iter(),
            |dst, src, mask, phase| {
                // SAFETY: AVX2 was detected just above.
                unsafe { mask_into_avx2::<true>(dst, src, mask, phase) }
            },
        );
    }

    #[test]
    fn dispatcher_picks_avx2_when_the_cpu_has_it() {
        let expected = if std::is_x86_feature_detected!("avx2") {
            "avx2"
        } else {
            "sse2"
        };
        assert_eq!(kernel_name(), expected);
    }
}
