//! Incremental, fail-fast UTF-8 validation (RFC 6455 §8.1) on simdutf8.
//!
//! A text message may arrive in many reads and fragments. [`Utf8Validator`] validates each
//! chunk as it arrives and reports an error as soon as the bytes seen so far cannot be the
//! start of valid UTF-8, not only at the end of the message: `F4 90` fails at the `90` (past
//! U+10FFFF), `ED A0` at the `A0` (a surrogate), `E0 80` at the `80` (overlong), and `C0`,
//! `C1` and `F5`..`FF` at once. At most 3 bytes of an unfinished code point are carried from
//! one chunk to the next.
//!
//! The byte ranges are those of RFC 3629 §4 (the `UTF8-octets` grammar); "valid" means what
//! [`std::str::from_utf8`] accepts, which the tests check exhaustively on short inputs.

/// The bytes are not valid UTF-8.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Utf8Error;

impl std::fmt::Display for Utf8Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("invalid UTF-8")
    }
}

impl std::error::Error for Utf8Error {}

/// Validates a whole buffer at once (the fast path for single-frame messages).
///
/// # Errors
/// If `bytes` is not valid UTF-8.
#[inline]
#[allow(unsafe_code)]
pub fn validate(bytes: &[u8]) -> Result<&str, Utf8Error> {
    // Short messages are the common case, and below 64 bytes simdutf8 defers to std's
    // byte-wise validator (~120 instructions for 16 unaligned bytes); a word-wise ASCII check
    // takes ~20. Measured with callgrind on a 16-byte text frame (benches/frame.rs).
    if bytes.len() < 64 && bytes.is_ascii() {
        // SAFETY: every byte is below 0x80, and a string of ASCII bytes is valid UTF-8.
        return Ok(unsafe { std::str::from_utf8_unchecked(bytes) });
    }
    simdutf8::basic::from_utf8(bytes).map_err(|_| Utf8Error)
}

/// Validates a stream of chunks, carrying an unfinished code point between them.
///
/// Call [`feed`](Self::feed) with each chunk in order, then [`finish`](Self::finish) at the
/// end of the message; [`reset`](Self::reset) (or `finish`) readies it for the next message.
/// After an error the validator's state is unspecified until `reset`.
#[derive(Clone, Debug, Default)]
pub struct Utf8Validator {
    /// The lead byte and continuation bytes so far of an unfinished code point.
    partial: [u8; 3],
    /// How many bytes of `partial` are in use (0 when the chunks so far end on a boundary).
    partial_len: u8,
}

impl Utf8Validator {
    /// A validator at the start of a message.
    pub const fn new() -> Self {
        Utf8Validator {
            partial: [0; 3],
            partial_len: 0,
        }
    }

    /// Forgets any carried bytes, for the next message.
    pub fn reset(&mut self) {
        self.partial_len = 0;
    }

    /// Whether the chunks so far ended on a code point boundary.
    pub fn is_complete(&self) -> bool {
        self.partial_len == 0
    }

    /// Validates the next chunk.
    ///
    /// The common case, a chunk that starts and ends on code point boundaries, costs one
    /// simdutf8 call and a look at the chunk's last byte.
    ///
    /// # Errors
    /// As soon as the bytes so far cannot begin a valid UTF-8 string.
    pub fn feed(&mut self, chunk: &[u8]) -> Result<(), Utf8Error> {
        let mut chunk = chunk;
        if self.partial_len > 0 {
            chunk = self.continue_partial(chunk)?;
            if self.partial_len > 0 {
                // `chunk` ran out before the code point did.
                return Ok(());
            }
        }
        let split = unfinished_tail_start(chunk);
        let (body, tail) = chunk.split_at(split);
        // `body` ends right before a lead byte or at the chunk's end, so valid UTF-8 splits
        // there into valid parts: if `body` is invalid, so is every extension of the stream.
        validate(body)?;
        if tail.is_empty() {
            return Ok(());
        }
        if !is_code_point_prefix(tail) {
            return Err(Utf8Error);
        }
        self.partial[..tail.len()].copy_from_slice(tail);
        self.partial_len = tail.len() as u8; // `tail` has at most 3 bytes
        Ok(())
    }

    /// Ends the message.
    ///
    /// # Errors
    /// If the message ended inside a code point.
    pub fn finish(&mut self) -> Result<(), Utf8Error> {
        let complete = self.is_complete();
        self.reset();
        if complete {
            Ok(())
        } else {
            Err(Utf8Error)
        }
    }

    /// Feeds bytes of `chunk` into the carried code point until it is complete or `chunk` is
    /// used up, checking each byte as it comes. Returns the rest of `chunk`.
    fn continue_partial<'a>(&mut self, chunk: &'a [u8]) -> Result<&'a [u8], Utf8Error> {
        let lead = self.partial[0];
        let width = sequence_width(lead);
        let mut rest = chunk;
        while let Some((&byte, after)) = rest.split_first() {
            let position = usize::from(self.partial_len);
            if !is_continuation_at(lead, position, byte) {
                return Err(Utf8Error);
            }
            rest = after;
            if position + 1 == width {
                self.partial_len = 0;
                break;
            }
            self.partial[position] = byte;
            self.partial_len += 1;
        }
        Ok(rest)
    }
}

/// Where an unfinished multi-byte sequence at the end of `chunk` starts, or `chunk.len()` if
/// the chunk does not end inside one. Looks at no more than the last 3 bytes: a lead byte
/// further back would need more than 4 bytes, which is invalid and left to the validator.
#[inline]
fn unfinished_tail_start(chunk: &[u8]) -> usize {
    let len = chunk.len();
    for start in (len.saturating_sub(3)..len).rev() {
        let byte = chunk[start];
        if !is_continuation(byte) {
            return if sequence_width(byte) > len - start {
                start
            } else {
                len
            };
        }
    }
    len
}

/// Whether `bytes` (a lead byte and continuation bytes, fewer than its sequence needs) can
/// still be completed to a valid code point.
fn is_code_point_prefix(bytes: &[u8]) -> bool {
    let Some((&lead, continuation)) = bytes.split_first() else {
        return true;
    };
    continuation
        .iter()
        .enumerate()
        .all(|(i, &byte)| is_continuation_at(lead, i + 1, byte))
}

/// Whether `byte` is a continuation byte (`10xxxxxx`).
#[inline]
fn is_continuation(byte: u8) -> bool {
    byte & 0xc0 == 0x80
}

/// How many bytes the sequence led by `lead` has: 2..=4 for valid multi-byte lead bytes,
/// 1 for ASCII and for bytes that cannot start a sequence (`80..=C1`, `F5..=FF`), which the
/// validator rejects as single bytes.
#[inline]
fn sequence_width(lead: u8) -> usize {
    match lead {
        0xc2..=0xdf => 2,
        0xe0..=0xef => 3,
        0xf0..=0xf4 => 4,
        _ => 1,
    }
}

/// Whether `byte` may stand at `position` (1..=3) in a sequence led by `lead`.
///
/// RFC 3629 §4: the second byte's range depends on the lead byte, excluding overlong forms
/// (`E0 80..9F`, `F0 80..8F`), surrogates (`ED A0..BF`) and code points past U+10FFFF
/// (`F4 90..BF`); later bytes are any continuation byte.
#[inline]
fn is_continuation_at(lead: u8, position: usize, byte: u8) -> bool {
    let range = match (position, lead) {
        (1, 0xe0) => 0xa0..=0xbf,
        (1, 0xed) => 0x80..=0x9f,
        (1, 0xf0) => 0x90..=0xbf,
        (1, 0xf4) => 0x80..=0x8f,
        _ => 0x80..=0xbf,
    };
    range.contains(&byte)
}

/// A byte buffer that validates text once, as it is appended, and then hands it out as
/// `&str` without a second pass.
///
/// Text enters only through [`push_masked`](Self::push_masked) with `text` set (validated
/// incrementally, failing fast) or [`check_text`](Self::check_text) (one whole-buffer pass
/// after the bytes were written by [`vec_mut`](Self::vec_mut), e.g. by an inflater); anything
/// else marks the contents as not text. [`as_str`](Self::as_str) relies on exactly that
/// invariant.
#[derive(Debug)]
pub struct Utf8Buf {
    bytes: Vec<u8>,
    utf8: Utf8Validator,
    /// Every byte since the last `clear` was validated by `push_masked` or `check_text`.
    text: bool,
}

impl Default for Utf8Buf {
    fn default() -> Self {
        Utf8Buf {
            bytes: Vec::new(),
            utf8: Utf8Validator::new(),
            text: true,
        }
    }
}

impl Utf8Buf {
    /// Appends a chunk of a masked payload unmasked, in one pass (see
    /// [`extend_masked`](super::mask::extend_masked)), validating it as text if `text`.
    ///
    /// # Errors
    /// As soon as the bytes so far cannot begin valid UTF-8; nothing is appended then.
    #[inline]
    pub fn push_masked(
        &mut self,
        chunk: &[u8],
        mask: [u8; 4],
        phase: usize,
        text: bool,
    ) -> Result<(), Utf8Error> {
        let old = self.bytes.len();
        super::mask::extend_masked(&mut self.bytes, chunk, mask, phase);
        if !text {
            self.text = false;
        } else if let Err(e) = self.utf8.feed(&self.bytes[old..]) {
            self.bytes.truncate(old);
            self.text = false;
            return Err(e);
        }
        Ok(())
    }

    /// The vector itself, for a writer such as an inflater; the contents count as text again
    /// only after [`check_text`](Self::check_text).
    pub fn vec_mut(&mut self) -> &mut Vec<u8> {
        self.text = false;
        self.utf8.reset();
        &mut self.bytes
    }

    /// Validates the whole contents once.
    ///
    /// # Errors
    /// If they are not valid UTF-8.
    pub fn check_text(&mut self) -> Result<(), Utf8Error> {
        validate(&self.bytes)?;
        self.utf8.reset();
        self.text = true;
        Ok(())
    }

    /// Whether the contents are text that ends on a code point boundary.
    #[inline]
    pub fn is_complete_text(&self) -> bool {
        self.text && self.utf8.is_complete()
    }

    /// The contents as text, if [`is_complete_text`](Self::is_complete_text).
    #[inline]
    #[allow(unsafe_code)]
    pub fn as_str(&self) -> Option<&str> {
        if !self.is_complete_text() {
            return None;
        }
        // SAFETY: `text` is true only if every byte since the last `clear` was appended by
        // `push_masked` with `text`, which fed it to `self.utf8` in order and kept only what it
        // accepted, or was checked whole by `check_text`; `utf8.is_complete()` says no code
        // point is left unfinished. So the bytes are valid UTF-8.
        Some(unsafe { std::str::from_utf8_unchecked(&self.bytes) })
    }

    /// The contents.
    #[inline]
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// The allocated capacity.
    pub fn capacity(&self) -> usize {
        self.bytes.capacity()
    }

    /// Reserves room for `additional` more bytes.
    pub fn reserve(&mut self, additional: usize) {
        self.bytes.reserve(additional);
    }

    /// Takes the bytes out (with their allocation), leaving it empty and without one.
    pub fn take_bytes(&mut self) -> Vec<u8> {
        let bytes = std::mem::take(&mut self.bytes);
        self.clear();
        bytes
    }

    /// Uses `buffer`'s allocation from now on (its contents are dropped), if it is empty and
    /// `buffer` is larger than its own; otherwise hands `buffer` back.
    pub fn adopt(&mut self, mut buffer: Vec<u8>) -> Option<Vec<u8>> {
        if !self.bytes.is_empty() || buffer.capacity() <= self.bytes.capacity() {
            return Some(buffer);
        }
        buffer.clear();
        self.bytes = buffer;
        self.clear();
        None
    }

    /// Empties it (keeping its capacity), ready for the next message.
    pub fn clear(&mut self) {
        self.bytes.clear();
        self.utf8.reset();
        self.text = true;
    }

    /// Empties it and frees its memory if it holds more than `keep` bytes; returns the bytes
    /// freed.
    pub fn shrink(&mut self, keep: usize) -> usize {
        self.clear();
        let capacity = self.bytes.capacity();
        if capacity > keep {
            self.bytes = Vec::new();
            return capacity;
        }
        0
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// Whether the bytes can be extended to valid UTF-8, by `std`'s judgement: `std` reports
    /// `error_len() == None` exactly when the input ends inside a sequence that is valid so
    /// far.
    fn extendable(prefix: &[u8]) -> bool {
        match std::str::from_utf8(prefix) {
            Ok(_) => true,
            Err(e) => e.error_len().is_none(),
        }
    }

    /// Feeds `chunks` in order and checks the validator against `std`: the first chunk after
    /// which the stream so far is not extendable must fail, every earlier one must pass, and
    /// `finish` must succeed exactly when `std` accepts the whole.
    fn check_chunks(chunks: &[&[u8]]) {
        let mut validator = Utf8Validator::new();
        let mut seen = Vec::new();
        for (i, chunk) in chunks.iter().enumerate() {
            seen.extend_from_slice(chunk);
            let expected_ok = extendable(&seen);
            let result = validator.feed(chunk);
            assert_eq!(result.is_ok(), expected_ok, "chunk {i} of {chunks:02x?}");
            if !expected_ok {
                return;
            }
            let at_boundary = std::str::from_utf8(&seen).is_ok();
            assert_eq!(
                validator.is_complete(),
                at_boundary,
                "chunk {i} of {chunks:02x?}"
            );
        }
        let whole_ok = std::str::from_utf8(&seen).is_ok();
        assert_eq!(
            validator.finish().is_ok(),
            whole_ok,
            "finish of {chunks:02x?}"
        );
        assert!(validator.is_complete());
    }

    /// Checks `bytes` fed whole, byte by byte, and split in two at every point.
    fn check_splits(bytes: &[u8]) {
        check_chunks(&[bytes]);
        let singles: Vec<&[u8]> = bytes.chunks(1).collect();
        check_chunks(&singles);
        for cut in 0..=bytes.len() {
            let (a, b) = bytes.split_at(cut);
            check_chunks(&[a, b]);
        }
        assert_eq!(validate(bytes).is_ok(), std::str::from_utf8(bytes).is_ok());
    }

    #[test]
    fn std_treats_impossible_prefixes_as_errors_not_as_truncation() {
        // The oracle relies on this: std judges a truncated sequence by its bytes so far.
        for bad in [
            &[0xf4, 0x90][..],
            &[0xed, 0xa0],
            &[0xe0, 0x80],
            &[0xf0, 0x80],
            &[0xc0],
        ] {
            assert!(!extendable(bad), "{bad:02x?}");
        }
        for good in [
            &[0xf4, 0x8f][..],
            &[0xed, 0x9f],
            &[0xe0, 0xa0],
            &[0xf0, 0x90, 0x80],
        ] {
            assert!(extendable(good), "{good:02x?}");
        }
    }

    #[test]
    fn rejects_invalid_second_bytes_as_soon_as_they_arrive() {
        for bad in [
            [0xf4, 0x90],
            [0xed, 0xa0],
            [0xe0, 0x9f],
            [0xf0, 0x8f],
            [0xc2, 0x41],
        ] {
            let mut validator = Utf8Validator::new();
            assert_eq!(validator.feed(&bad[..1]), Ok(()), "{bad:02x?}");
            assert_eq!(validator.feed(&bad[1..]), Err(Utf8Error), "{bad:02x?}");
            assert_eq!(
                Utf8Validator::new().feed(&bad),
                Err(Utf8Error),
                "{bad:02x?}"
            );
        }
    }

    #[test]
    fn rejects_bytes_that_never_start_a_sequence_at_once() {
        for byte in [0xc0, 0xc1, 0xf5, 0xf8, 0xfe, 0xff, 0x80, 0xbf] {
            assert_eq!(
                Utf8Validator::new().feed(&[b'a', byte]),
                Err(Utf8Error),
                "{byte:02x}"
            );
            assert_eq!(
                Utf8Validator::new().feed(&[byte]),
                Err(Utf8Error),
                "{byte:02x}"
            );
        }
    }

    #[test]
    fn carries_a_code_point_split_across_chunks() {
        let text = "a€𝄞z".as_bytes();
        let mut validator = Utf8Validator::new();
        for byte in text {
            validator.feed(std::slice::from_ref(byte)).unwrap();
        }
        assert_eq!(validator.finish(), Ok(()));
    }

    #[test]
    fn finish_rejects_a_message_ending_inside_a_code_point() {
        let mut validator = Utf8Validator::new();
        assert_eq!(validator.feed(&[b'a', 0xe2, 0x82]), Ok(()));
        assert!(!validator.is_complete());
        assert_eq!(validator.finish(), Err(Utf8Error));
        assert!(
            validator.is_complete(),
            "finish resets for the next message"
        );
    }

    #[test]
    #[cfg_attr(miri, ignore = "exhaustive; too slow under Miri")]
    fn matches_std_on_every_string_of_up_to_two_bytes() {
        check_splits(&[]);
        for a in 0..=255u8 {
            check_splits(&[a]);
            for b in 0..=255u8 {
                check_splits(&[a, b]);
            }
        }
    }

    #[test]
    #[cfg_attr(miri, ignore = "exhaustive; too slow under Miri")]
    fn matches_std_on_every_boundary_byte_string_of_three_and_four_bytes() {
        // Every byte class edge of RFC 3629 §4, plus an ASCII byte.
        const EDGES: [u8; 22] = [
            0x41, 0x7f, 0x80, 0x8f, 0x90, 0x9f, 0xa0, 0xbf, 0xc0, 0xc1, 0xc2, 0xdf, 0xe0, 0xe1,
            0xed, 0xee, 0xef, 0xf0, 0xf1, 0xf4, 0xf5, 0xff,
        ];
        for a in EDGES {
            for b in EDGES {
                for c in EDGES {
                    check_splits(&[a, b, c]);
                    for d in EDGES {
                        check_splits(&[a, b, c, d]);
                    }
                }
            }
        }
    }

    /// Mostly valid text with a few stray bytes, so errors land anywhere, including late.
    fn text_with_noise() -> impl Strategy<Value = Vec<u8>> {
        let piece = prop_oneof![
            8 => any::<char>().prop_map(|c| c.to_string().into_bytes()),
            2 => "[a-z ]{1,40}".prop_map(String::into_bytes),
            1 => any::<u8>().prop_map(|b| vec![b]),
        ];
        prop::collection::vec(piece, 0..40).prop_map(|pieces| pieces.concat())
    }

    proptest! {
        #[test]
        #[cfg_attr(miri, ignore = "too slow under Miri")]
        fn matches_std_at_random_split_points(
            bytes in text_with_noise(),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..8),
        ) {
            let mut cuts: Vec<usize> = cuts.iter().map(|i| i.index(bytes.len() + 1)).collect();
            cuts.sort_unstable();
            let mut chunks = Vec::new();
            let mut start = 0;
            for cut in cuts {
                chunks.push(&bytes[start..cut]);
                start = cut;
            }
            chunks.push(&bytes[start..]);
            check_chunks(&chunks);
            prop_assert_eq!(validate(&bytes).is_ok(), std::str::from_utf8(&bytes).is_ok());
        }

        #[test]
        #[cfg_attr(miri, ignore = "too slow under Miri")]
        fn matches_std_on_random_bytes(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
            check_splits(&bytes);
        }
    }

    #[test]
    fn utf8_buf_hands_out_text_only_when_every_byte_was_validated() {
        // Unmasked input: a zero mask.
        fn push(buf: &mut Utf8Buf, bytes: &[u8], text: bool) -> Result<(), Utf8Error> {
            buf.push_masked(bytes, [0; 4], 0, text)
        }
        let mut buf = Utf8Buf::default();
        push(&mut buf, "héllo ".as_bytes(), true).unwrap();
        let euro = "€".as_bytes();
        push(&mut buf, &euro[..1], true).unwrap();
        assert_eq!(buf.as_str(), None, "ends inside a code point");
        push(&mut buf, &euro[1..], true).unwrap();
        assert_eq!(buf.as_str(), Some("héllo €"));
        assert!(push(&mut buf, &[0xC0], true).is_err());
        assert_eq!(buf.as_str(), None, "a failed push poisons it until clear");
        assert_eq!(buf.as_bytes(), "héllo €".as_bytes(), "and appends nothing");
        buf.clear();
        // A masked chunk comes out unmasked.
        assert_eq!(
            buf.push_masked(&[b'a' ^ 1, b'b' ^ 2, b'c' ^ 3], [1, 2, 3, 4], 0, false),
            Ok(())
        );
        assert_eq!(buf.as_bytes(), b"abc");
        assert_eq!(buf.as_str(), None, "unvalidated bytes are not text");
        buf.vec_mut().extend_from_slice(b"def");
        assert_eq!(buf.as_str(), None);
        buf.check_text().unwrap();
        assert_eq!(buf.as_str(), Some("abcdef"));
        buf.vec_mut().push(0xFF);
        assert!(buf.check_text().is_err());
        assert_eq!(buf.as_str(), None);
        let capacity = buf.capacity();
        assert_eq!(buf.shrink(0), capacity);
        assert_eq!(
            (buf.capacity(), buf.as_str()),
            (0, Some("")),
            "empty is text again"
        );
    }
}
