//! (Un)masking of payloads (RFC 6455 §5.3), in place or while copying.
//!
//! [`apply_mask`] picks the fastest kernel once per process: AVX2 (runtime-detected) or SSE2
//! (the x86-64 baseline) on x86-64, NEON on aarch64, and the portable word-at-a-time
//! [`apply_mask_portable`] elsewhere. Under Miri it runs the byte-at-a-time
//! [`apply_mask_scalar`], the reference every other kernel is tested against.
//!
//! [`extend_masked`] is the copying form for payloads that are reassembled: it reads the masked
//! bytes once and writes the unmasked ones straight into the reassembly buffer, instead of
//! unmasking in place and copying after (two passes over bytes that are often out of cache by
//! then). Its kernels are AVX2 on x86-64 where the CPU has it, the portable one elsewhere.
//!
//! A frame's payload may arrive over several reads, so every function takes the mask `phase`
//! (the payload offset modulo 4 where `buf` starts) and returns the phase after `buf`.
//!
//! This is the only place in `proto` allowed `unsafe`: the SIMD kernels load and store through
//! raw pointers into `buf` and are `#[target_feature]` functions, and [`extend_masked`] writes
//! into a vector's spare capacity. Everything here works on the caller's slices only; it never
//! reads or writes outside them, and allocates only through [`Vec::reserve`].
#![deny(unsafe_op_in_unsafe_fn)]

use std::mem::MaybeUninit;

#[cfg(all(target_arch = "aarch64", target_feature = "neon", not(miri)))]
mod neon;
#[cfg(all(target_arch = "x86_64", not(miri)))]
mod x86;

/// XORs `buf` with `mask`, starting at mask byte `phase` (0..4). Returns the next phase.
///
/// Only `phase % 4` matters, so any payload offset may be passed. The result is the same as
/// [`apply_mask_scalar`]'s, just faster.
#[inline]
pub fn apply_mask(buf: &mut [u8], mask: [u8; 4], phase: usize) -> usize {
    #[cfg(miri)]
    {
        apply_mask_scalar(buf, mask, phase)
    }
    #[cfg(all(target_arch = "x86_64", not(miri)))]
    {
        x86::apply_mask(buf, mask, phase)
    }
    #[cfg(all(target_arch = "aarch64", target_feature = "neon", not(miri)))]
    {
        neon::apply_mask(buf, mask, phase)
    }
    #[cfg(not(any(
        miri,
        target_arch = "x86_64",
        all(target_arch = "aarch64", target_feature = "neon")
    )))]
    {
        apply_mask_portable(buf, mask, phase)
    }
}

/// Once a destination holds this much, [`extend_masked`] writes past it with non-temporal
/// stores where the CPU has them (AVX2). A message this large no longer fits a core's L2
/// cache, so the lines it writes are evicted before anything reads them again, and filling
/// them on the way in (a read of each line before it is written) is wasted memory traffic.
/// Measured on a 16 MiB echo: alternated A/B of `examples/echo`, five runs each, server CPU
/// per echo lower in every pair (median ratio 0.84); 1 MiB messages unchanged.
pub const STREAM_PAST: usize = 1 << 20;

/// Appends `src` unmasked with `mask` (starting at mask byte `phase`) to `dst`, in one pass.
/// Returns the next phase. The same bytes as `dst.extend_from_slice(src)` followed by
/// [`apply_mask`] on them. Past [`STREAM_PAST`] bytes the writes bypass the cache.
#[inline]
pub fn extend_masked(dst: &mut Vec<u8>, src: &[u8], mask: [u8; 4], phase: usize) -> usize {
    dst.reserve(src.len());
    let old = dst.len();
    let stream = old >= STREAM_PAST;
    let next = mask_into(
        &mut dst.spare_capacity_mut()[..src.len()],
        src,
        mask,
        phase,
        stream,
    );
    // SAFETY: `reserve` made room for `src.len()` more bytes, and `mask_into` initialised all
    // of `dst[old..old + src.len()]` (it writes every byte of the slice it is given).
    unsafe { dst.set_len(old + src.len()) };
    next
}

/// Writes `src` XORed with `mask` (from byte `phase`) to every byte of `dst`, which is as long
/// as `src`. Returns the next phase. `stream` asks for stores that bypass the cache, where
/// the kernel has them.
#[inline]
fn mask_into(
    dst: &mut [MaybeUninit<u8>],
    src: &[u8],
    mask: [u8; 4],
    phase: usize,
    stream: bool,
) -> usize {
    assert_eq!(dst.len(), src.len());
    #[cfg(all(target_arch = "x86_64", not(miri)))]
    {
        x86::mask_into(dst, src, mask, phase, stream)
    }
    #[cfg(not(all(target_arch = "x86_64", not(miri))))]
    {
        let _ = stream;
        mask_into_portable(dst, src, mask, phase)
    }
}

/// [`mask_into`] eight bytes per step without SIMD intrinsics; also the tail of the SIMD one.
/// Writes every byte of `dst` (as long as `src`).
fn mask_into_portable(
    dst: &mut [MaybeUninit<u8>],
    src: &[u8],
    mask: [u8; 4],
    phase: usize,
) -> usize {
    debug_assert_eq!(dst.len(), src.len());
    let next = (phase + src.len()) & 3;
    let word = rotate(mask, phase);
    let wide = widen(word);
    let mut to = dst.chunks_exact_mut(8);
    let mut from = src.chunks_exact(8);
    for (d, s) in (&mut to).zip(&mut from) {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(s);
        let masked = (u64::from_ne_bytes(bytes) ^ wide).to_ne_bytes();
        for (d, m) in d.iter_mut().zip(masked) {
            d.write(m);
        }
    }
    // Whole 8-byte words leave the phase unchanged, so the rest continues with `word`.
    let pattern = word.to_ne_bytes();
    for (i, (d, s)) in to
        .into_remainder()
        .iter_mut()
        .zip(from.remainder())
        .enumerate()
    {
        d.write(s ^ pattern[i & 3]);
    }
    next
}

/// The name of the kernel [`apply_mask`] uses on this machine: `"avx2"`, `"sse2"`, `"neon"`,
/// `"portable"` or `"scalar"` (under Miri). Detects the CPU features if not done yet.
///
/// Meant for benchmark labels and logs; the exact strings are not API.
pub fn kernel_name() -> &'static str {
    #[cfg(miri)]
    {
        "scalar"
    }
    #[cfg(all(target_arch = "x86_64", not(miri)))]
    {
        x86::kernel_name()
    }
    #[cfg(all(target_arch = "aarch64", target_feature = "neon", not(miri)))]
    {
        "neon"
    }
    #[cfg(not(any(
        miri,
        target_arch = "x86_64",
        all(target_arch = "aarch64", target_feature = "neon")
    )))]
    {
        "portable"
    }
}

/// The byte-at-a-time reference implementation.
pub fn apply_mask_scalar(buf: &mut [u8], mask: [u8; 4], phase: usize) -> usize {
    for (i, b) in buf.iter_mut().enumerate() {
        *b ^= mask[(phase + i) & 3];
    }
    (phase + buf.len()) & 3
}

/// Word-at-a-time masking without SIMD intrinsics (eight bytes per step).
pub fn apply_mask_portable(buf: &mut [u8], mask: [u8; 4], phase: usize) -> usize {
    let next = (phase + buf.len()) & 3;
    let word = rotate(mask, phase);
    let wide = widen(word);
    let mut chunks = buf.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(chunk);
        chunk.copy_from_slice(&(u64::from_ne_bytes(bytes) ^ wide).to_ne_bytes());
    }
    // Whole 8-byte words leave the phase unchanged, so the tail continues with `word`.
    mask_tail(chunks.into_remainder(), word);
    next
}

/// `mask` as seen from byte `phase`, as a native-endian word: its byte `i` in memory order is
/// the mask byte for the `i`-th next payload byte.
#[inline(always)]
fn rotate(mask: [u8; 4], phase: usize) -> u32 {
    let word = u32::from_ne_bytes(mask);
    let shift = 8 * (phase & 3) as u32;
    // Moving on by one byte drops the first byte in memory order: the low byte on
    // little-endian, the high byte on big-endian.
    if cfg!(target_endian = "little") {
        word.rotate_right(shift)
    } else {
        word.rotate_left(shift)
    }
}

/// `word` twice, for eight bytes at a time (both halves equal, so endianness does not matter).
#[inline(always)]
fn widen(word: u32) -> u64 {
    u64::from(word) * 0x1_0000_0001
}

/// Masks a remainder shorter than 16 bytes with `word` applying from its first byte: one
/// 8-byte step, one 4-byte step, then up to 3 single bytes.
#[inline(always)]
fn mask_tail(buf: &mut [u8], word: u32) {
    debug_assert!(buf.len() < 16);
    let mut rest = buf;
    if rest.len() >= 8 {
        let (head, tail) = rest.split_at_mut(8);
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(head);
        head.copy_from_slice(&(u64::from_ne_bytes(bytes) ^ widen(word)).to_ne_bytes());
        rest = tail;
    }
    if rest.len() >= 4 {
        let (head, tail) = rest.split_at_mut(4);
        let mut bytes = [0u8; 4];
        bytes.copy_from_slice(head);
        head.copy_from_slice(&(u32::from_ne_bytes(bytes) ^ word).to_ne_bytes());
        rest = tail;
    }
    for (b, m) in rest.iter_mut().zip(word.to_ne_bytes()) {
        *b ^= m;
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A 64-byte aligned buffer, so `offset` below really is the address modulo 64.
    #[repr(C, align(64))]
    struct Aligned([u8; 1024 + 128]);

    const MASK: [u8; 4] = [0x12, 0x34, 0xa6, 0xf8];

    /// Checks `kernel` against [`apply_mask_scalar`] in place at every length in `lengths`,
    /// every address offset 0..=63 and every phase 0..4, and that no byte outside the slice
    /// changes.
    pub(crate) fn check_kernel(
        name: &str,
        lengths: impl Iterator<Item = usize> + Clone,
        kernel: impl Fn(&mut [u8], [u8; 4], usize) -> usize,
    ) {
        let mut actual = Box::new(Aligned([0; 1024 + 128]));
        let mut expected = Box::new(Aligned([0; 1024 + 128]));
        let pattern: Vec<u8> = (0..actual.0.len()).map(|i| (i * 7 + 3) as u8).collect();
        for len in lengths {
            assert!(
                len + 64 <= actual.0.len(),
                "test buffer too small for {len}"
            );
            for offset in 0..=63 {
                for phase in 0..4 {
                    actual.0.copy_from_slice(&pattern);
                    expected.0.copy_from_slice(&pattern);
                    let pa = kernel(&mut actual.0[offset..offset + len], MASK, phase);
                    let pe = apply_mask_scalar(&mut expected.0[offset..offset + len], MASK, phase);
                    assert!(
                        pa == pe && actual.0 == expected.0,
                        "{name}: len {len} offset {offset} phase {phase}"
                    );
                }
            }
        }
    }

    #[test]
    #[cfg_attr(miri, ignore = "exhaustive; too slow under Miri")]
    fn dispatcher_matches_scalar_at_every_length_offset_and_phase() {
        check_kernel(kernel_name(), 0..=300, apply_mask);
    }

    #[test]
    #[cfg_attr(miri, ignore = "exhaustive; too slow under Miri")]
    fn dispatcher_matches_scalar_on_long_buffers() {
        check_kernel(
            kernel_name(),
            (512..=1024).step_by(97).chain([1021, 1023]),
            apply_mask,
        );
    }

    #[test]
    #[cfg_attr(miri, ignore = "exhaustive; too slow under Miri")]
    fn portable_matches_scalar_at_every_length_offset_and_phase() {
        check_kernel("portable", 0..=300, apply_mask_portable);
    }

    /// Checks `kernel`, writing into uninitialised memory, against [`apply_mask_scalar`] at
    /// every length in `lengths`, every source offset in `offsets`, every destination offset
    /// in `0..32` (so source and destination alignments vary independently) and every
    /// phase: each output byte is right, and the bytes after the output are untouched.
    pub(crate) fn check_into_kernel(
        name: &str,
        lengths: impl Iterator<Item = usize> + Clone,
        offsets: impl Iterator<Item = usize> + Clone,
        kernel: impl Fn(&mut [MaybeUninit<u8>], &[u8], [u8; 4], usize) -> usize,
    ) {
        let mut source = Box::new(Aligned([0; 1024 + 128]));
        for (i, b) in source.0.iter_mut().enumerate() {
            *b = (i * 7 + 3) as u8;
        }
        // Room for the 64-byte alignment, 32 offsets, the longest length and 64 bytes after.
        let mut dst = Box::new([MaybeUninit::<u8>::uninit(); 64 + 32 + 1024 + 64]);
        // 64-byte aligned, like `Aligned`.
        let base = dst.as_ptr().align_offset(64);
        for len in lengths {
            for offset in offsets.clone() {
                let src = &source.0[offset..offset + len];
                for at in (0..32).map(|d| base + d) {
                    for phase in 0..4 {
                        let mut expected = src.to_vec();
                        let pe = apply_mask_scalar(&mut expected, MASK, phase);
                        // Twice, over two different fillers, so a byte the kernel skipped
                        // shows whatever it holds.
                        for filler in [0x00, 0xFF] {
                            dst.fill(MaybeUninit::new(filler));
                            let pa = kernel(&mut dst[at..at + len], src, MASK, phase);
                            // SAFETY: every byte of `dst` was initialised by `fill` just above
                            // (and the kernel only writes initialised bytes over them).
                            let out: Vec<u8> = dst[at..at + len + 64]
                                .iter()
                                .map(|b| unsafe { b.assume_init() })
                                .collect();
                            assert!(
                                pa == pe && out[..len] == expected[..],
                                "{name}: len {len} offset {offset} at {at} phase {phase}"
                            );
                            assert!(
                                out[len..].iter().all(|&b| b == filler),
                                "{name}: wrote past"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    #[cfg_attr(miri, ignore = "exhaustive; too slow under Miri")]
    fn mask_into_matches_scalar_at_every_length_offset_and_phase() {
        for stream in [false, true] {
            check_into_kernel(
                "dispatcher",
                0..=300,
                [0, 1, 3, 17, 31].into_iter(),
                |dst, src, mask, phase| mask_into(dst, src, mask, phase, stream),
            );
        }
        check_into_kernel(
            "portable",
            0..=300,
            [0, 1, 3, 17, 31].into_iter(),
            mask_into_portable,
        );
    }

    #[test]
    #[cfg_attr(miri, ignore = "exhaustive; too slow under Miri")]
    fn mask_into_matches_scalar_on_long_buffers() {
        let lengths = (512..=1024).step_by(97).chain([1021, 1023]);
        for stream in [false, true] {
            check_into_kernel(
                "dispatcher",
                lengths.clone(),
                [0, 1, 31, 33].into_iter(),
                |dst, src, mask, phase| mask_into(dst, src, mask, phase, stream),
            );
        }
    }

    #[test]
    fn extend_masked_appends_what_masking_in_place_gives() {
        let data: Vec<u8> = (0..700u32).map(|i| (i * 13 + 1) as u8).collect();
        let mut whole = data.clone();
        apply_mask_scalar(&mut whole, MASK, 1);
        // From phase 1: cuts 2 and 302 start the rest at phase 3.
        for cut in [0, 1, 2, 3, 31, 64, 255, 300, 302, 699] {
            let mut out = b"head".to_vec();
            let phase = extend_masked(&mut out, &data[..cut], MASK, 1);
            let phase = extend_masked(&mut out, &data[cut..], MASK, phase);
            assert_eq!(phase, (1 + data.len()) & 3);
            assert_eq!(&out[..4], b"head");
            assert_eq!(out[4..], whole[..], "cut {cut}");
        }
    }

    #[test]
    #[cfg_attr(miri, ignore = "a megabyte and more is too slow under Miri")]
    fn extend_masked_is_exact_past_the_streaming_mark() {
        // Chunks of odd sizes from odd offsets, so the streamed part starts unaligned and at
        // every phase; the destination crosses STREAM_PAST partway through a chunk.
        let len = STREAM_PAST + 70_001;
        let data: Vec<u8> = (0..len as u32).map(|i| (i * 13 + 1) as u8).collect();
        let mut whole = data.clone();
        apply_mask_scalar(&mut whole, MASK, 2);
        let mut out = vec![7u8; 3];
        let (mut at, mut phase, mut step) = (0, 2, 16_381);
        while at < len {
            let end = (at + step).min(len);
            phase = extend_masked(&mut out, &data[at..end], MASK, phase);
            at = end;
            step = step * 7 % 40_000 + 1;
        }
        assert_eq!(phase, (2 + len) & 3);
        assert_eq!(out[..3], [7, 7, 7]);
        assert!(out[3..] == whole[..], "streamed bytes differ");
    }

    #[test]
    fn phase_carries_across_split_buffers() {
        let data: Vec<u8> = (0..700u32).map(|i| (i * 13 + 1) as u8).collect();
        let mut whole = data.clone();
        apply_mask_scalar(&mut whole, MASK, 1);
        for cut_a in [0, 1, 2, 3, 5, 31, 33, 64, 255, 300] {
            for cut_b in [cut_a, cut_a + 1, cut_a + 7, cut_a + 290] {
                let mut parts = data.clone();
                let (a, rest) = parts.split_at_mut(cut_a);
                let (b, c) = rest.split_at_mut(cut_b - cut_a);
                let phase = apply_mask(a, MASK, 1);
                let phase = apply_mask(b, MASK, phase);
                let phase = apply_mask(c, MASK, phase);
                assert_eq!(phase, (1 + data.len()) & 3);
                assert_eq!(parts, whole, "cuts {cut_a} {cut_b}");
            }
        }
    }

    #[test]
    fn phase_is_taken_modulo_four() {
        let mut a = *b"hello, masked world";
        let mut b = a;
        assert_eq!(
            apply_mask(&mut a, MASK, 6),
            apply_mask_scalar(&mut b, MASK, 2)
        );
        assert_eq!(a, b);
    }

    #[test]
    fn masks_the_rfc_example() {
        // RFC 6455 §5.7: a masked "Hello" from client to server.
        let mut payload = [0x7f, 0x9f, 0x4d, 0x51, 0x58];
        assert_eq!(apply_mask(&mut payload, [0x37, 0xfa, 0x21, 0x3d], 0), 1);
        assert_eq!(&payload, b"Hello");
    }
}
