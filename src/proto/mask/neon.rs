//! aarch64 masking kernel on NEON (Advanced SIMD).
//!
//! NEON is part of the aarch64 baseline (this module is compiled only when the target enables
//! it), so no runtime detection is needed. The kernel uses unaligned loads and stores, which
//! aarch64 performs at full speed, so it needs no alignment head.

use std::arch::aarch64::{veorq_u8, vld1q_u8, vst1q_u8};

use super::{mask_tail, rotate};

/// [`apply_mask_neon`] behind a safe signature: the target guarantees NEON.
#[inline]
pub(super) fn apply_mask(buf: &mut [u8], mask: [u8; 4], phase: usize) -> usize {
    // SAFETY: this module is compiled only with `target_feature = "neon"`, so every CPU the
    // crate runs on has NEON.
    unsafe { apply_mask_neon(buf, mask, phase) }
}

/// NEON kernel: 64 bytes per iteration in four 16-byte vectors.
///
/// # Safety
/// The CPU must support NEON.
#[target_feature(enable = "neon")]
unsafe fn apply_mask_neon(buf: &mut [u8], mask: [u8; 4], phase: usize) -> usize {
    let next = (phase + buf.len()) & 3;
    let word = rotate(mask, phase);
    // Built in memory and loaded bytewise, so lane order matches byte order on either
    // endianness.
    let pattern = [word; 4];
    let mut blocks = buf.chunks_exact_mut(64);
    for block in &mut blocks {
        // SAFETY: `block` is 64 bytes, so the four 16-byte accesses at `p`, `p + 16`, `p + 32`
        // and `p + 48` stay inside it; `pattern` is 16 bytes; `vld1q_u8`/`vst1q_u8` need only
        // byte alignment; the caller guarantees NEON.
        unsafe {
            let m = vld1q_u8(pattern.as_ptr().cast());
            let p = block.as_mut_ptr();
            let (a, b) = (vld1q_u8(p), vld1q_u8(p.add(16)));
            let (c, d) = (vld1q_u8(p.add(32)), vld1q_u8(p.add(48)));
            vst1q_u8(p, veorq_u8(a, m));
            vst1q_u8(p.add(16), veorq_u8(b, m));
            vst1q_u8(p.add(32), veorq_u8(c, m));
            vst1q_u8(p.add(48), veorq_u8(d, m));
        }
    }
    // Whole blocks leave the phase unchanged, so the rest continues with `word`.
    let mut vectors = blocks.into_remainder().chunks_exact_mut(16);
    for vector in &mut vectors {
        // SAFETY: `vector` and `pattern` are 16 bytes each; byte-aligned NEON loads and
        // stores; the caller guarantees NEON.
        unsafe {
            let p = vector.as_mut_ptr();
            let m = vld1q_u8(pattern.as_ptr().cast());
            vst1q_u8(p, veorq_u8(vld1q_u8(p), m));
        }
    }
    mask_tail(vectors.into_remainder(), word);
    next
}

#[cfg(test)]
mod tests {
    use super::super::tests::check_kernel;
    use super::*;

    #[test]
    fn neon_matches_scalar_at_every_length_offset_and_phase() {
        check_kernel("neon", (0..=300).chain([511, 512, 513, 1000]), apply_mask);
    }
}
