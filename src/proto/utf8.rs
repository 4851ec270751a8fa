//! Incremental, fail-fast UTF-8 validation (RFC 6455 §8.1) on simdutf8.
//!
//! A text message may arrive in many reads and fragments. [`Utf8Validator`] validates each
//! chunk as it arrives and reports an error as soon as the bytes seen so far cannot be the
//! start of valid UTF-8, not only at the end of the message. At most 3 bytes of an unfinished
//! code point are carried from one chunk to the next.

use simdutf8::compat::from_utf8;

/// The bytes are not valid UTF-8.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Utf8Error;

/// Validates a whole buffer at once (the fast path for single-frame messages).
#[inline]
pub fn validate(bytes: &[u8]) -> Result<&str, Utf8Error> {
    simdutf8::basic::from_utf8(bytes).map_err(|_| Utf8Error)
}

/// Validates a stream of chunks, carrying an unfinished code point between them.
#[derive(Clone, Debug, Default)]
pub struct Utf8Validator {
    partial: [u8; 4],
    partial_len: u8,
}

impl Utf8Validator {
    /// A validator at the start of a message.
    pub const fn new() -> Self {
        Utf8Validator { partial: [0; 4], partial_len: 0 }
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
    /// # Errors
    /// As soon as the bytes so far cannot begin a valid UTF-8 string.
    pub fn feed(&mut self, mut chunk: &[u8]) -> Result<(), Utf8Error> {
        if self.partial_len > 0 {
            // Complete the carried code point byte by byte (at most 3 more bytes).
            while self.partial_len > 0 {
                let Some((&b, rest)) = chunk.split_first() else { return Ok(()) };
                let n = usize::from(self.partial_len);
                self.partial[n] = b;
                self.partial_len += 1;
                chunk = rest;
                match from_utf8(&self.partial[..n + 1]) {
                    Ok(_) => self.partial_len = 0,
                    Err(e) if e.error_len().is_none() => {}
                    Err(_) => return Err(Utf8Error),
                }
            }
        }
        match from_utf8(chunk) {
            Ok(_) => Ok(()),
            Err(e) => match e.error_len() {
                Some(_) => Err(Utf8Error),
                None => {
                    let tail = &chunk[e.valid_up_to()..];
                    self.partial[..tail.len()].copy_from_slice(tail);
                    self.partial_len = tail.len() as u8;
                    Ok(())
                }
            },
        }
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
}
