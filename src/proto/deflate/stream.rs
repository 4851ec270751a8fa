//! Compression and inflation with context takeover: zlib-rs streams (through flate2) that keep
//! their LZ77 window from one message to the next.
//!
//! libdeflate only works on whole buffers, so it cannot carry a window across messages; these
//! streams can, at the price of their memory per connection (~371 KiB to deflate with a
//! 32 KiB window, ~46 KiB to inflate). Owns nothing but the per-message framing of the streams.

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

use super::InflateError;

/// The empty stored block a sync flush ends with, stripped on the wire (RFC 7692 §7.2.1) and
/// appended again before inflating (§7.2.2).
const SYNC_TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// Spare output room kept before each deflate call: zlib asks for more than six bytes so a
/// sync flush is not split (zlib.h, `deflate`).
const MIN_ROOM: usize = 64;

/// The smallest output buffer the inflater starts with.
const MIN_FIRST_GUESS: usize = 1024;

/// A raw-DEFLATE compressor for the agreed server window, `bits` in 9..=15.
pub(super) fn compressor(level: u8, bits: u8) -> Box<Compress> {
    // zlib levels stop at 9; the caller never passes window 8, which zlib would widen to 9.
    let level = Compression::new(u32::from(level.min(9)));
    Box::new(Compress::new_with_window_bits(
        level,
        false,
        bits.clamp(9, 15),
    ))
}

/// A raw-DEFLATE inflater for the agreed client window. flate2 accepts 9..=15; a stream made
/// with an 8-bit window inflates fine with a 9-bit one.
pub(super) fn inflater(bits: u8) -> Box<Decompress> {
    Box::new(Decompress::new_with_window_bits(false, bits.clamp(9, 15)))
}

/// Compresses one message with a sync flush, keeping the window, into `out` (empty on entry)
/// without the trailing `00 00 ff ff` (RFC 7692 §7.2.1).
pub(super) fn compress(compressor: &mut Compress, payload: &[u8], out: &mut Vec<u8>) {
    out.reserve(payload.len() / 2 + MIN_ROOM);
    let start = compressor.total_in();
    loop {
        if out.capacity() - out.len() < MIN_ROOM {
            out.reserve(out.capacity().max(MIN_ROOM));
        }
        // The consumed count never exceeds `payload.len()`, a usize.
        let consumed = (compressor.total_in() - start) as usize;
        // Invariant: zlib-rs deflate only fails on a corrupted stream state or zero output
        // room; we own the state and always leave room, so this cannot fail.
        compressor
            .compress_vec(&payload[consumed..], out, FlushCompress::Sync)
            .expect("zlib-rs deflate with output room does not fail");
        // zlib: the flush is complete once all input is taken and output room is left over.
        let consumed = (compressor.total_in() - start) as usize;
        if consumed == payload.len() && out.len() < out.capacity() {
            break;
        }
    }
    debug_assert!(out.ends_with(&SYNC_TAIL));
    out.truncate(out.len().saturating_sub(SYNC_TAIL.len()));
}

/// Inflates one message with the window kept from the previous ones into `out` (empty on
/// entry), at most `max_len` bytes. The output buffer grows by doubling and never past
/// `max_len + 1` bytes, so a bomb stops at the limit.
///
/// A BFINAL block ends a DEFLATE stream; as browsers do, the inflater is then reset and goes on
/// with the rest of the input (RFC 7692 §7.2.3.4 lets a sender end messages that way).
pub(super) fn decompress(
    inflater: &mut Decompress,
    input: &[u8],
    max_len: usize,
    out: &mut Vec<u8>,
) -> Result<(), InflateError> {
    let limit = max_len.saturating_add(1);
    out.reserve_exact(
        input
            .len()
            .saturating_mul(4)
            .max(MIN_FIRST_GUESS)
            .min(limit),
    );
    for part in [input, &SYNC_TAIL[..]] {
        let mut taken = 0;
        loop {
            if out.len() == out.capacity() {
                if out.len() >= limit {
                    return Err(InflateError::TooBig);
                }
                let grown = out.capacity().saturating_mul(2).min(limit);
                out.reserve_exact(grown - out.len());
            }
            let (in_before, out_before) = (inflater.total_in(), out.len());
            let status = inflater
                .decompress_vec(&part[taken..], out, FlushDecompress::Sync)
                .map_err(|_| InflateError::Invalid)?;
            // Bounded by `part.len()`, a usize.
            let took = (inflater.total_in() - in_before) as usize;
            taken += took;
            if out.len() > max_len {
                return Err(InflateError::TooBig);
            }
            if status == Status::StreamEnd {
                inflater.reset(false);
                continue;
            }
            let stalled = took == 0 && out.len() == out_before;
            let drained = taken == part.len() && out.len() < out.capacity();
            if drained || stalled {
                break;
            }
        }
    }
    Ok(())
}
