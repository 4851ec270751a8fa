//! Per-message compression and inflation without context takeover, on libdeflate.
//!
//! Owns the per-thread libdeflate objects, made on first use and shared by every connection
//! the thread serves: a compressor per level used (200 KiB at level 1, ~656 KiB at 2..=9), one
//! decompressor (~11 KiB) and a scratch buffer for the inflater's input. Nothing here outlives
//! a call in a connection's state. The thread-local borrow is held only around libdeflate
//! calls, which call nothing back.

use std::cell::RefCell;

use libdeflater::{CompressionLvl, Compressor, DecompressionError, Decompressor};

use super::InflateError;

/// Appended to a received message before inflating it (RFC 7692 §7.2.2): `00 00 ff ff`
/// restores the stripped empty stored block, then `01 00 00 ff ff` is an empty *final* stored
/// block, since libdeflate wants a stream that ends with BFINAL and senders that sync-flush
/// (zlib style) end their messages with a non-final block. A message that already ends in a
/// BFINAL block stops the inflater there and the tail is ignored.
const INFLATE_TAIL: [u8; 9] = [0x00, 0x00, 0xff, 0xff, 0x01, 0x00, 0x00, 0xff, 0xff];

/// The smallest first output buffer guess.
const MIN_FIRST_GUESS: usize = 1024;
/// How much the output buffer grows after libdeflate runs out of space. Each retry restarts
/// the inflation from the beginning, so the growth is steep: the wasted work is at most a
/// third of the final run.
const GROWTH: usize = 4;
/// The scratch input buffer is freed after a call if it grew past this, so one huge message
/// does not pin its size on the thread.
const SCRATCH_KEEP: usize = 256 * 1024;

/// The per-thread libdeflate state.
#[derive(Default)]
struct Shared {
    /// One compressor per libdeflate level 1..=12, index `level - 1`.
    compressors: [Option<Compressor>; 12],
    decompressor: Option<Decompressor>,
    /// The received payload followed by [`INFLATE_TAIL`].
    scratch: Vec<u8>,
}

thread_local! {
    static SHARED: RefCell<Shared> = RefCell::new(Shared::default());
}

/// Compresses `payload` as one self-contained DEFLATE stream into `out` (whose old contents are
/// overwritten), in the RFC 7692 §7.2.1 wire form. `false` (and `out` empty) if the result
/// would not be shorter than `payload`.
///
/// libdeflate ends its stream with a BFINAL block, which RFC 7692 §7.2.3.4 allows. §7.2.1 then
/// appends an empty stored block (3 zero header bits, zero padding to the byte boundary,
/// `00 00 ff ff`) and strips the `00 00 ff ff`. Where the header bits land depends on how many
/// padding bits libdeflate left in its last byte, which it does not report: with 3 or more, the
/// §7.2.1 form is libdeflate's output itself; with fewer, it is that plus one `00` byte. We
/// always append the `00` byte. Receivers stop at the BFINAL block (zlib) and ignore it, or
/// reset and go on inflating what follows (Chromium, WebKit, libsoup): then the byte-aligned
/// `00` plus the `00 00 ff ff` they append is a valid empty stored block, which the bare
/// libdeflate output would not give in the 3-or-more case.
pub(super) fn compress(level: u8, payload: &[u8], out: &mut Vec<u8>) -> bool {
    // Worth sending compressed only if the stream plus its `00` byte is shorter than the
    // payload: the stream gets at most `len - 2` bytes.
    let Some(room) = payload.len().checked_sub(2) else {
        out.clear();
        return false;
    };
    let index = usize::from(level.clamp(1, 12) - 1);
    let written = SHARED.with_borrow_mut(|shared| {
        let compressor = shared.compressors[index].get_or_insert_with(|| {
            // `index + 1` is in 1..=12, which libdeflate accepts.
            let level = CompressionLvl::new(index as i32 + 1).unwrap_or_default();
            Compressor::new(level)
        });
        out.resize(room, 0);
        compressor.deflate_compress(payload, out).ok()
    });
    match written {
        Some(len) => {
            out.truncate(len);
            final_stream_to_wire(out);
            true
        }
        None => {
            out.clear();
            false
        }
    }
}

/// Turns a DEFLATE stream that ends with a BFINAL block into the payload [`compress`]
/// sends: the stream and one `00` byte (see there why).
pub(super) fn final_stream_to_wire(stream: &mut Vec<u8>) {
    stream.push(0x00);
}

/// Inflates one self-contained message into `out`, at most `max_len` bytes.
///
/// libdeflate inflates into a fixed buffer and restarts from scratch when it is too small, so
/// the first size matters: `ratio` is the expected inflated size per compressed byte (the
/// caller's estimate from earlier messages), given 25% headroom. On a miss the buffer grows
/// [`GROWTH`]-fold, up to `max_len`; a message that needs more is [`InflateError::TooBig`].
/// Capacity `out` already has is reused; past it, the old buffer is freed before a larger one
/// is allocated, so a decompression bomb costs at most `max_len` bytes of output buffer
/// (libdeflate itself allocates nothing here).
///
/// `out`'s old contents are overwritten, not cleared first, so reusing a buffer of similar
/// size skips zero-filling it.
pub(super) fn decompress(
    input: &[u8],
    max_len: usize,
    ratio: usize,
    out: &mut Vec<u8>,
) -> Result<(), InflateError> {
    SHARED.with_borrow_mut(|shared| {
        let Shared {
            decompressor,
            scratch,
            ..
        } = shared;
        let decompressor = decompressor.get_or_insert_with(Decompressor::new);
        scratch.clear();
        scratch.reserve(input.len() + INFLATE_TAIL.len());
        scratch.extend_from_slice(input);
        scratch.extend_from_slice(&INFLATE_TAIL);

        let expected = input.len().saturating_mul(ratio);
        let guess = expected.saturating_add(expected / 4).max(MIN_FIRST_GUESS);
        let mut size = guess.min(max_len);
        let result = loop {
            if size > out.capacity() {
                // Free first: the old contents are garbage, and keeping them through a
                // reallocation would double the peak.
                *out = Vec::new();
                out.reserve_exact(size);
            }
            out.resize(size, 0);
            match decompressor.deflate_decompress(scratch, out) {
                Ok(len) => {
                    out.truncate(len);
                    break Ok(());
                }
                Err(DecompressionError::BadData) => break Err(InflateError::Invalid),
                Err(DecompressionError::InsufficientSpace) if size >= max_len => {
                    break Err(InflateError::TooBig)
                }
                Err(DecompressionError::InsufficientSpace) => {
                    size = size.saturating_mul(GROWTH).min(max_len);
                }
            }
        };
        if result.is_err() {
            out.clear();
        }
        if scratch.capacity() > SCRATCH_KEEP {
            *scratch = Vec::new();
        }
        result
    })
}
