//! permessage-deflate (RFC 7692): negotiation and the per-message codec.
//!
//! API CONTRACT (stubs to be filled in; signatures are what conn.rs and the runtime build on).

/// Server policy for permessage-deflate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeflateConfig {
    /// Whether to accept permessage-deflate offers at all.
    pub enabled: bool,
    /// Allow the server to keep its compression window between messages (needs a streaming
    /// compressor and its memory per connection). Off by default.
    pub server_context_takeover: bool,
    /// Allow the client to keep its window between messages (needs a streaming inflater).
    /// Off by default: the answer carries `client_no_context_takeover`.
    pub client_context_takeover: bool,
    /// The compression level (libdeflate: 1..=12).
    pub level: i32,
    /// Messages shorter than this are sent uncompressed.
    pub min_compress_size: usize,
}

impl Default for DeflateConfig {
    fn default() -> Self {
        DeflateConfig {
            enabled: true,
            server_context_takeover: false,
            client_context_takeover: false,
            level: 1,
            min_compress_size: 64,
        }
    }
}

/// The parameters agreed on one connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeflateParams {
    /// The server resets its compressor after each message.
    pub server_no_context_takeover: bool,
    /// The client resets its compressor after each message.
    pub client_no_context_takeover: bool,
    /// The server's LZ77 window, 8..=15.
    pub server_max_window_bits: u8,
    /// The client's LZ77 window, 8..=15.
    pub client_max_window_bits: u8,
}

/// Picks the first acceptable offer among the `Sec-WebSocket-Extensions` header values and
/// returns the agreed parameters and the response header value, or `None` to decline.
pub fn negotiate<'a>(
    offers: impl IntoIterator<Item = &'a [u8]>,
    config: &DeflateConfig,
) -> Option<(DeflateParams, String)> {
    let _ = (offers.into_iter().count(), config);
    None
}

/// Why a compressed message could not be inflated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InflateError {
    /// The message would inflate past the limit (close 1009).
    TooBig,
    /// The data is not valid DEFLATE (close 1007 per RFC 7692 §8... or 1002).
    Invalid,
}

/// The per-connection codec.
pub struct Deflate {
    params: DeflateParams,
}

impl Deflate {
    /// A codec for the agreed parameters and policy.
    pub fn new(params: DeflateParams, config: &DeflateConfig) -> Self {
        let _ = config;
        Deflate { params }
    }

    /// The agreed parameters.
    pub fn params(&self) -> DeflateParams {
        self.params
    }

    /// Compresses one message payload into `out` (cleared first), without the trailing
    /// `00 00 ff ff` (RFC 7692 §7.2.1). Returns `false` if the message should go uncompressed
    /// (too small, too large for the agreed window, or it would not shrink).
    pub fn compress(&mut self, payload: &[u8], out: &mut Vec<u8>) -> bool {
        let _ = (payload, out);
        false
    }

    /// Inflates one message's compressed payload (all its frames' data concatenated) into
    /// `out` (cleared first), producing at most `max_len` bytes.
    ///
    /// # Errors
    /// [`InflateError::TooBig`] past `max_len`, [`InflateError::Invalid`] for bad data.
    pub fn decompress(
        &mut self,
        input: &[u8],
        max_len: usize,
        out: &mut Vec<u8>,
    ) -> Result<(), InflateError> {
        let _ = (input, max_len, out);
        Err(InflateError::Invalid)
    }
}
