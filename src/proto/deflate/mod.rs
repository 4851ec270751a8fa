//! permessage-deflate (RFC 7692): negotiation and the per-message codec.
//!
//! Owns the `Sec-WebSocket-Extensions` offer parser and answer ([`negotiate`]) and the
//! transformation of one message payload ([`Deflate`]). Frame-level rules (RSV1, fragmentation,
//! the close codes) belong to [`conn`](super::conn); this module never sees a frame header.
//!
//! # Two modes per direction, chosen at negotiation
//!
//! * **No context takeover** (the default, both ways): every message is a self-contained
//!   DEFLATE stream. Compression and inflation use libdeflate on whole buffers, through one
//!   compressor and one decompressor per thread (a shard is a thread), so a connection keeps
//!   no codec memory between messages: [`Deflate`] is a few words.
//! * **Context takeover** ([`DeflateConfig::server_context_takeover`],
//!   [`DeflateConfig::client_context_takeover`]): the LZ77 window survives between messages,
//!   which needs a streaming codec (libdeflate has none), so that direction uses zlib-rs through
//!   flate2, allocated per connection on first use.
//!
//! Measured on x86_64 (glibc `mallinfo2` deltas; `benches/deflate.rs` prints them again):
//!
//! | state                                   | where           | bytes      |
//! |-----------------------------------------|-----------------|------------|
//! | [`Deflate`] itself                      | per connection  | 40         |
//! | libdeflate compressor, level 1          | per thread      | 200 KiB    |
//! | libdeflate compressor, level 2..=9      | per thread      | ~656 KiB   |
//! | libdeflate compressor, level 10..=12    | per thread      | ~8.6 MiB   |
//! | libdeflate decompressor                 | per thread      | ~11 KiB    |
//! | inflate input copy (kept if <= 256 KiB) | per thread      | 0-256 KiB  |
//! | zlib-rs deflate, window 15 (takeover)   | per connection  | ~371 KiB   |
//! | zlib-rs deflate, window 9 (takeover)    | per connection  | ~245 KiB   |
//! | zlib-rs inflate, any window (takeover)  | per connection  | ~46 KiB    |
//!
//! So without takeover a connection costs 40 bytes of codec state, and a thread ~211 KiB
//! however many connections it serves; with takeover both ways, ~417 KiB more per connection
//! once it has sent and received a compressed message.
//!
//! A per-connection libdeflate compressor would cost its 200 KiB on every connection, hence the
//! per-thread sharing (a thread-local cache, not a thread: the core still spawns nothing).

mod negotiate;
mod oneshot;
mod stream;

pub use negotiate::negotiate;

use negotiate::MAX_WINDOW_BITS;

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
    /// The compression level (libdeflate: 1..=12; the takeover compressor caps it at 9).
    pub level: i32,
    /// Messages shorter than this are sent uncompressed.
    pub min_compress_size: usize,
    /// The largest server LZ77 window to agree to, 8..=15. Below 15 it is named in the answer
    /// even if the client did not ask (RFC 7692 §7.1.2.1). It only saves memory with
    /// server context takeover; without it, smaller windows just mean fewer messages
    /// compressed. Default 15.
    pub server_max_window_bits: u8,
    /// The largest client LZ77 window to accept with client context takeover, 8..=15. Below 15
    /// it needs the client to have offered `client_max_window_bits` (RFC 7692 §7.1.2.2);
    /// otherwise the answer asks for `client_no_context_takeover`. Default 15.
    pub client_max_window_bits: u8,
}

impl Default for DeflateConfig {
    fn default() -> Self {
        DeflateConfig {
            enabled: true,
            // Per-message compression: no codec memory per connection (see the module docs).
            server_context_takeover: false,
            client_context_takeover: false,
            // libdeflate level 1 on 64 KiB of JSON-like text: 0.186 of the size in 87 µs, vs
            // zlib-rs level 1 0.267 in 77 µs and level 6 0.170 in 498 µs.
            level: 1,
            // libdeflate pays a fixed ~3.5 µs of CPU per compressed message up to ~1 KiB (it
            // clears its hash table) and the receiver ~1.5 µs (Huffman tables), while JSON-like
            // text shrinks by nothing at 64 B, ~7% at 96 B, ~27% at 128 B, ~50% at 256 B
            // (`benches/deflate.rs`).
            min_compress_size: 128,
            server_max_window_bits: MAX_WINDOW_BITS,
            client_max_window_bits: MAX_WINDOW_BITS,
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

/// Why a compressed message could not be inflated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum InflateError {
    /// The message would inflate past the limit (close 1009).
    TooBig,
    /// The data is not valid DEFLATE, or refers back past the start of the message (a client
    /// that kept its context after agreeing not to). The connection must be failed
    /// (RFC 6455 §7.1.7); RFC 7692 names no close code.
    Invalid,
}

/// The largest inflate ratio used for a first output buffer guess. Text inflates 3-10x; one
/// message of a single repeated byte (up to 1032x) must not make every later message start with
/// a buffer of `max_len`, which the caller may keep per connection. A message above the cap
/// costs a restart or two.
const MAX_GUESS_RATIO: u8 = 16;

/// The per-connection codec.
///
/// Call protocol: one [`Deflate::compress`] per outgoing data message, one
/// [`Deflate::decompress`] per incoming message whose first frame had RSV1 set, with all of
/// its frames' payloads concatenated. Without context takeover the calls are independent;
/// with it, they must follow the message order on the wire in each direction.
pub struct Deflate {
    params: DeflateParams,
    /// The libdeflate level (and, capped at 9, the zlib level).
    level: u8,
    /// Messages shorter than this go uncompressed.
    min_compress_size: usize,
    /// Without server context takeover, the longest message that may be compressed: with a
    /// window of 2^N bytes only messages up to 2^N bytes are sure to keep every back-reference
    /// inside it (RFC 7692 §7.1.2.1).
    max_oneshot_len: usize,
    /// Whether the server takes over its context (then `max_oneshot_len` is unused).
    server_takeover: bool,
    /// Inflated bytes per compressed byte in the last message, rounded up and capped at
    /// [`MAX_GUESS_RATIO`]: the next message's first output buffer guess, since libdeflate
    /// restarts on a buffer that is too small.
    inflate_ratio: u8,
    /// The server-to-client compressor with server context takeover, made on first use.
    compressor: Option<Box<flate2::Compress>>,
    /// The client-to-server inflater with client context takeover, made on first use.
    inflater: Option<Box<flate2::Decompress>>,
}

impl Deflate {
    /// A codec for the agreed parameters and policy.
    pub fn new(params: DeflateParams, config: &DeflateConfig) -> Self {
        let level = config.level.clamp(1, 12) as u8;
        let server_bits = params.server_max_window_bits.clamp(8, MAX_WINDOW_BITS);
        // zlib cannot deflate with a 256-byte window (it silently uses 512); the sender may
        // always reset its context instead (RFC 7692 §7.1.1.1 binds only the other way).
        let server_takeover = !params.server_no_context_takeover && server_bits >= 9;
        let max_oneshot_len = if server_bits >= MAX_WINDOW_BITS {
            usize::MAX
        } else {
            1usize << server_bits
        };
        Deflate {
            params: DeflateParams {
                server_max_window_bits: server_bits,
                ..params
            },
            level,
            min_compress_size: config.min_compress_size,
            max_oneshot_len,
            server_takeover,
            // JSON-like text inflates 4-6x; starting higher saves a restart and costs only
            // zero-filling a buffer that is at most max_len anyway.
            inflate_ratio: 8,
            compressor: None,
            inflater: None,
        }
    }

    /// The agreed parameters.
    pub fn params(&self) -> DeflateParams {
        self.params
    }

    /// Compresses one message payload into `out` (cleared first), without the trailing
    /// `00 00 ff ff` (RFC 7692 §7.2.1). Returns `false` if the message should go uncompressed
    /// (too small, too large for the agreed window, or it would not shrink).
    ///
    /// With server context takeover a message that reached the compressor is always sent
    /// compressed, since the peer's window must see what ours saw.
    pub fn compress(&mut self, payload: &[u8], out: &mut Vec<u8>) -> bool {
        if payload.len() < self.min_compress_size
            || (!self.server_takeover && payload.len() > self.max_oneshot_len)
        {
            out.clear();
            return false;
        }
        if self.server_takeover {
            let (level, bits) = (self.level, self.params.server_max_window_bits);
            let compressor = self
                .compressor
                .get_or_insert_with(|| stream::compressor(level, bits));
            out.clear();
            stream::compress(compressor, payload, out);
            return true;
        }
        // Not cleared: libdeflate overwrites it, and keeping the old length saves zero-filling.
        oneshot::compress(self.level, payload, out)
    }

    /// Inflates one message's compressed payload (all its frames' data concatenated) into
    /// `out` (cleared first), producing at most `max_len` bytes.
    ///
    /// Without client context takeover, `out` never grows past `max_len` bytes of capacity
    /// beyond what it already had, however far the data would inflate.
    ///
    /// # Errors
    /// [`InflateError::TooBig`] past `max_len`, [`InflateError::Invalid`] for bad data.
    pub fn decompress(
        &mut self,
        input: &[u8],
        max_len: usize,
        out: &mut Vec<u8>,
    ) -> Result<(), InflateError> {
        // Not DEFLATE even with the tail appended, but zlib receivers take it as an empty
        // message (they wait for more input), so it is one; a takeover inflater must not
        // see it, or the tail would leave it mid-block.
        if input.is_empty() {
            out.clear();
            return Ok(());
        }
        if self.params.client_no_context_takeover {
            let ratio = usize::from(self.inflate_ratio);
            let result = oneshot::decompress(input, max_len, ratio, out);
            if result.is_ok() {
                let ratio = out.len().div_ceil(input.len());
                self.inflate_ratio = ratio.clamp(1, MAX_GUESS_RATIO.into()) as u8;
            }
            return result;
        }
        out.clear();
        let bits = self.params.client_max_window_bits;
        let inflater = self.inflater.get_or_insert_with(|| stream::inflater(bits));
        let result = stream::decompress(inflater, input, max_len, out);
        if result.is_err() {
            out.clear();
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

    use super::*;

    const SYNC_TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

    /// Parameters as the default policy agrees them, with the given server window.
    fn no_takeover(server_bits: u8) -> DeflateParams {
        DeflateParams {
            server_no_context_takeover: true,
            client_no_context_takeover: true,
            server_max_window_bits: server_bits,
            client_max_window_bits: 15,
        }
    }

    fn takeover() -> DeflateParams {
        DeflateParams {
            server_no_context_takeover: false,
            client_no_context_takeover: false,
            server_max_window_bits: 15,
            client_max_window_bits: 15,
        }
    }

    fn codec(params: DeflateParams) -> Deflate {
        let config = DeflateConfig {
            min_compress_size: 0,
            ..DeflateConfig::default()
        };
        Deflate::new(params, &config)
    }

    /// xorshift64: deterministic noise without a rand dependency.
    fn noise(len: usize, mut seed: u64) -> Vec<u8> {
        (0..len)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect()
    }

    /// JSON-like text with varying numbers, so it compresses like real traffic.
    fn json_like(len: usize) -> Vec<u8> {
        let mut text = Vec::with_capacity(len + 128);
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        while text.len() < len {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let side = if state >> 63 == 0 { "buy" } else { "sell" };
            let item = format!(
                r#"{{"id":{},"symbol":"BTC-USD","price":"{}.{:02}","qty":"0.{:04}","side":"{}"}},"#,
                state >> 40,
                40000 + (state >> 20) % 5000,
                (state >> 8) % 100,
                (state >> 12) % 10000,
                side
            );
            text.extend_from_slice(item.as_bytes());
        }
        text.truncate(len);
        text
    }

    /// A zlib receiver as RFC 7692 §7.2.2 describes it (Python's zlib in Autobahn, most
    /// servers): append `00 00 ff ff`, inflate with a sync flush, stop at stream end.
    fn zlib_receive(inflater: &mut Decompress, payload: &[u8]) -> Result<Vec<u8>, String> {
        let mut input = payload.to_vec();
        input.extend_from_slice(&SYNC_TAIL);
        let mut out = Vec::with_capacity(1024);
        let start = inflater.total_in();
        loop {
            let taken = (inflater.total_in() - start) as usize;
            let before = (inflater.total_in(), out.len());
            out.reserve(4096);
            let status = inflater
                .decompress_vec(&input[taken..], &mut out, FlushDecompress::Sync)
                .map_err(|error| error.to_string())?;
            if status == Status::StreamEnd || (inflater.total_in(), out.len()) == before {
                return Ok(out);
            }
        }
    }

    /// A browser receiver (Chromium, WebKit): one inflater for the whole connection; a BFINAL
    /// block resets it and inflation goes on with whatever input follows.
    fn browser_receive(inflater: &mut Decompress, payload: &[u8]) -> Result<Vec<u8>, String> {
        let mut out = Vec::new();
        for part in [payload, &SYNC_TAIL[..]] {
            let mut taken = 0;
            loop {
                out.reserve(4096);
                let (in_before, out_before) = (inflater.total_in(), out.len());
                let status = inflater
                    .decompress_vec(&part[taken..], &mut out, FlushDecompress::Sync)
                    .map_err(|error| error.to_string())?;
                let took = (inflater.total_in() - in_before) as usize;
                taken += took;
                if status == Status::StreamEnd {
                    inflater.reset(false);
                    continue;
                }
                if (took == 0 && out.len() == out_before) || taken == part.len() {
                    if taken == part.len() && out.capacity() == out.len() {
                        continue;
                    }
                    break;
                }
            }
        }
        Ok(out)
    }

    /// A reference inflater (after zlib's `puff.c`, written for these tests) that reports the
    /// longest back-reference distance, which zlib and zlib-rs do not check against a window
    /// smaller than 32 KiB. Stops after the BFINAL block or where the input ends at a block
    /// boundary.
    fn inflate_with_max_distance(data: &[u8]) -> Result<(Vec<u8>, usize), &'static str> {
        struct Bits<'a> {
            data: &'a [u8],
            pos: usize,
            buffer: u64,
            count: u32,
        }
        impl Bits<'_> {
            fn take(&mut self, n: u32) -> Result<usize, &'static str> {
                while self.count < n {
                    let byte = *self.data.get(self.pos).ok_or("truncated")?;
                    self.buffer |= u64::from(byte) << self.count;
                    self.pos += 1;
                    self.count += 8;
                }
                let value = self.buffer & ((1 << n) - 1);
                self.buffer >>= n;
                self.count -= n;
                Ok(value as usize)
            }
        }
        /// Canonical Huffman code: symbols by code length, decoded bit by bit (RFC 1951 §3.2.2).
        struct Code {
            counts: [usize; 16],
            symbols: Vec<usize>,
        }
        fn code(lengths: &[u8]) -> Code {
            let mut counts = [0; 16];
            lengths
                .iter()
                .for_each(|&len| counts[usize::from(len)] += 1);
            counts[0] = 0;
            let mut symbols: Vec<usize> = (0..lengths.len()).filter(|&s| lengths[s] > 0).collect();
            symbols.sort_by_key(|&s| lengths[s]);
            Code { counts, symbols }
        }
        fn decode(bits: &mut Bits<'_>, code: &Code) -> Result<usize, &'static str> {
            let (mut value, mut first, mut index) = (0usize, 0usize, 0usize);
            for len in 1..16 {
                value |= bits.take(1)?;
                let count = code.counts[len];
                if value < first + count {
                    return Ok(code.symbols[index + value - first]);
                }
                index += count;
                first = (first + count) << 1;
                value <<= 1;
            }
            Err("bad code")
        }
        const LEN_BASE: [usize; 29] = [
            3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 15, 17, 19, 23, 27, 31, 35, 43, 51, 59, 67, 83, 99,
            115, 131, 163, 195, 227, 258,
        ];
        const LEN_EXTRA: [u32; 29] = [
            0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0,
        ];
        const DIST_BASE: [usize; 30] = [
            1, 2, 3, 4, 5, 7, 9, 13, 17, 25, 33, 49, 65, 97, 129, 193, 257, 385, 513, 769, 1025,
            1537, 2049, 3073, 4097, 6145, 8193, 12289, 16385, 24577,
        ];
        const DIST_EXTRA: [u32; 30] = [
            0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12,
            12, 13, 13,
        ];
        const ORDER: [usize; 19] = [
            16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15,
        ];

        let mut bits = Bits {
            data,
            pos: 0,
            buffer: 0,
            count: 0,
        };
        let (mut out, mut max_distance) = (Vec::new(), 0);
        loop {
            if bits.pos == data.len() && bits.count < 3 {
                return Ok((out, max_distance));
            }
            let last = bits.take(1)? == 1;
            let (lit, dist) = match bits.take(2)? {
                0 => {
                    bits.buffer = 0;
                    bits.count = 0;
                    let len = bits.take(16)?;
                    if bits.take(16)? != !len & 0xffff {
                        return Err("stored lengths");
                    }
                    let end = bits.pos + len;
                    out.extend_from_slice(data.get(bits.pos..end).ok_or("truncated")?);
                    bits.pos = end;
                    if last {
                        return Ok((out, max_distance));
                    }
                    continue;
                }
                1 => {
                    let mut lengths = [8u8; 288];
                    lengths[144..256].fill(9);
                    lengths[256..280].fill(7);
                    (code(&lengths), code(&[5; 30]))
                }
                2 => {
                    let nlen = bits.take(5)? + 257;
                    let ndist = bits.take(5)? + 1;
                    let ncode = bits.take(4)? + 4;
                    let mut code_lengths = [0u8; 19];
                    for &symbol in &ORDER[..ncode] {
                        code_lengths[symbol] = bits.take(3)? as u8;
                    }
                    let length_code = code(&code_lengths);
                    let mut lengths = Vec::with_capacity(nlen + ndist);
                    while lengths.len() < nlen + ndist {
                        let (value, repeat) = match decode(&mut bits, &length_code)? {
                            symbol @ 0..=15 => (symbol as u8, 1),
                            16 => (*lengths.last().ok_or("repeat")?, 3 + bits.take(2)?),
                            17 => (0, 3 + bits.take(3)?),
                            _ => (0, 11 + bits.take(7)?),
                        };
                        lengths.extend(std::iter::repeat_n(value, repeat));
                    }
                    (code(&lengths[..nlen]), code(&lengths[nlen..nlen + ndist]))
                }
                _ => return Err("reserved block type"),
            };
            loop {
                let symbol = decode(&mut bits, &lit)?;
                if symbol < 256 {
                    out.push(symbol as u8);
                    continue;
                }
                if symbol == 256 {
                    break;
                }
                let index = symbol - 257;
                let len = LEN_BASE[index] + bits.take(LEN_EXTRA[index])?;
                let index = decode(&mut bits, &dist)?;
                let distance = DIST_BASE[index] + bits.take(DIST_EXTRA[index])?;
                if distance > out.len() {
                    return Err("distance before the start");
                }
                max_distance = max_distance.max(distance);
                for _ in 0..len {
                    out.push(out[out.len() - distance]);
                }
            }
            if last {
                return Ok((out, max_distance));
            }
        }
    }

    /// A zlib sender: raw deflate, sync flush, trailing `00 00 ff ff` removed (§7.2.1).
    fn zlib_send(compressor: &mut Compress, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(payload.len() + 1024);
        compressor
            .compress_vec(payload, &mut out, FlushCompress::Sync)
            .unwrap();
        assert!(out.ends_with(&SYNC_TAIL));
        out.truncate(out.len() - 4);
        out
    }

    fn payloads() -> Vec<Vec<u8>> {
        let mut payloads: Vec<Vec<u8>> = [
            3,
            64,
            100,
            128,
            255,
            256,
            1000,
            4096,
            65_536,
            300_000,
            1 << 20,
        ]
        .iter()
        .map(|&len| json_like(len))
        .collect();
        payloads.push(vec![b'a'; 70_000]);
        payloads.push(b"Hello Hello Hello Hello Hello Hello".to_vec());
        // Mostly noise with repeats: exercises every padding-bit count at the stream end.
        for len in 40..80 {
            let mut mixed = noise(len, len as u64);
            mixed.extend_from_within(..len / 2);
            payloads.push(mixed);
        }
        payloads
    }

    #[test]
    fn compressed_messages_inflate_exactly_in_a_zlib_receiver() {
        let mut deflate = codec(no_takeover(15));
        let mut compressed_count = 0;
        for payload in payloads() {
            let mut wire = Vec::new();
            if !deflate.compress(&payload, &mut wire) {
                continue;
            }
            compressed_count += 1;
            assert!(wire.len() < payload.len());
            // server_no_context_takeover: a fresh inflater per message, as Autobahn does.
            let mut inflater = Decompress::new(false);
            assert_eq!(zlib_receive(&mut inflater, &wire).unwrap(), payload);
        }
        assert!(
            compressed_count > 30,
            "only {compressed_count} payloads compressed"
        );
    }

    #[test]
    fn compressed_messages_inflate_in_a_browser_style_receiver_across_messages() {
        let mut deflate = codec(no_takeover(15));
        let mut inflater = Decompress::new(false);
        for payload in payloads() {
            let mut wire = Vec::new();
            if deflate.compress(&payload, &mut wire) {
                assert_eq!(browser_receive(&mut inflater, &wire).unwrap(), payload);
            }
        }
    }

    #[test]
    fn compressed_messages_round_trip_through_decompress() {
        let mut deflate = codec(no_takeover(15));
        let (mut wire, mut back) = (Vec::new(), Vec::new());
        for payload in payloads() {
            if deflate.compress(&payload, &mut wire) {
                deflate.decompress(&wire, payload.len(), &mut back).unwrap();
                assert_eq!(back, payload);
            }
        }
    }

    #[test]
    fn bfinal_stream_gets_the_rfc_7692_wire_form() {
        // RFC 7692 §7.2.3.4: "Hello" in a BFINAL block then an empty stored block, stripped.
        let mut compressor = Compress::new(Compression::default(), false);
        let mut stream = Vec::with_capacity(64);
        compressor
            .compress_vec(b"Hello", &mut stream, FlushCompress::Finish)
            .unwrap();
        assert_eq!(stream, [0xf3, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00]);
        oneshot::final_stream_to_wire(&mut stream);
        assert_eq!(stream, [0xf3, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00, 0x00]);
    }

    #[test]
    fn small_and_incompressible_messages_go_uncompressed() {
        let mut deflate = Deflate::new(no_takeover(15), &DeflateConfig::default());
        let mut wire = vec![1, 2, 3];
        let small = json_like(DeflateConfig::default().min_compress_size - 1);
        assert!(!deflate.compress(&small, &mut wire));
        assert!(wire.is_empty());
        assert!(!deflate.compress(&noise(10_000, 7), &mut wire));
        assert!(wire.is_empty());
        assert!(deflate.compress(&json_like(1000), &mut wire));
        assert!(!wire.is_empty());
    }

    #[test]
    fn window_limited_compression_keeps_every_reference_inside_the_window() {
        for bits in 8..=14u8 {
            let window = 1usize << bits;
            let mut deflate = codec(no_takeover(bits));
            for len in [window / 2, window - 1, window] {
                let payload = json_like(len);
                let mut wire = Vec::new();
                assert!(
                    deflate.compress(&payload, &mut wire),
                    "bits {bits} len {len}"
                );
                let (out, max_distance) = inflate_with_max_distance(&wire).unwrap();
                assert_eq!(out, payload, "bits {bits} len {len}");
                assert!(
                    max_distance > 0 && max_distance <= window,
                    "bits {bits} len {len}"
                );
            }
            let mut wire = Vec::new();
            assert!(
                !deflate.compress(&json_like(window + 1), &mut wire),
                "bits {bits}"
            );
        }
    }

    #[test]
    fn reference_inflater_sees_references_past_a_small_window() {
        // The check above can fail: a repeat 1000 bytes back needs a 1024-byte window.
        let mut payload = noise(1000, 3);
        payload.extend_from_within(..);
        let mut wire = Vec::new();
        assert!(codec(no_takeover(15)).compress(&payload, &mut wire));
        assert_eq!(inflate_with_max_distance(&wire).unwrap(), (payload, 1000));
    }

    #[test]
    fn reference_inflater_agrees_with_zlib() {
        let mut deflate = codec(no_takeover(15));
        for payload in payloads() {
            let mut wire = Vec::new();
            if deflate.compress(&payload, &mut wire) {
                assert_eq!(inflate_with_max_distance(&wire).unwrap().0, payload);
            }
        }
    }

    #[test]
    fn inflates_the_rfc_7692_examples() {
        let hello = b"Hello".to_vec();
        let examples: [&[u8]; 4] = [
            // §7.2.3.1: one compressed frame.
            &[0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00],
            // §7.2.3.3: DEFLATE block with no compression.
            &[
                0x00, 0x05, 0x00, 0xfa, 0xff, 0x48, 0x65, 0x6c, 0x6c, 0x6f, 0x00,
            ],
            // §7.2.3.4: BFINAL set to 1.
            &[0xf3, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00, 0x00],
            // §7.2.3.5: two DEFLATE blocks in one message.
            &[
                0xf2, 0x48, 0x05, 0x00, 0x00, 0x00, 0xff, 0xff, 0xca, 0xc9, 0xc9, 0x07, 0x00,
            ],
        ];
        for params in [no_takeover(15), takeover()] {
            let mut deflate = codec(params);
            for example in examples {
                let mut out = Vec::new();
                deflate.decompress(example, 1000, &mut out).unwrap();
                assert_eq!(out, hello, "{example:02x?} with {params:?}");
            }
        }
    }

    #[test]
    fn takeover_inflater_follows_the_rfc_7692_shared_window_example() {
        // §7.2.3.2: the second "Hello" is a back-reference into the first message.
        let second: &[u8] = &[0xf2, 0x00, 0x11, 0x00, 0x00];
        let mut deflate = codec(takeover());
        let mut out = Vec::new();
        deflate
            .decompress(&[0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00], 100, &mut out)
            .unwrap();
        deflate.decompress(second, 100, &mut out).unwrap();
        assert_eq!(out, b"Hello");
        // Without takeover the reference has nothing to point at.
        let mut deflate = codec(no_takeover(15));
        assert_eq!(
            deflate.decompress(second, 100, &mut out),
            Err(InflateError::Invalid)
        );
        assert!(out.is_empty());
    }

    #[test]
    fn inflates_zlib_client_messages_with_and_without_bfinal() {
        let mut deflate = codec(no_takeover(15));
        let mut out = Vec::new();
        for payload in payloads() {
            // client_no_context_takeover: a fresh compressor per message.
            let mut compressor = Compress::new(Compression::new(6), false);
            let wire = zlib_send(&mut compressor, &payload);
            deflate.decompress(&wire, payload.len(), &mut out).unwrap();
            assert_eq!(out, payload);

            let mut compressor = Compress::new(Compression::new(1), false);
            let mut wire = Vec::with_capacity(payload.len() + 1024);
            compressor
                .compress_vec(&payload, &mut wire, FlushCompress::Finish)
                .unwrap();
            deflate.decompress(&wire, payload.len(), &mut out).unwrap();
            assert_eq!(out, payload);
        }
    }

    #[test]
    fn empty_messages_inflate_to_nothing() {
        let mut compressor = Compress::new(Compression::new(6), false);
        let zlib_empty = zlib_send(&mut compressor, b"");
        for params in [no_takeover(15), takeover()] {
            let mut deflate = codec(params);
            let mut out = vec![1];
            for wire in [&zlib_empty[..], &[0x00], &[]] {
                deflate.decompress(wire, 0, &mut out).unwrap();
                assert!(out.is_empty(), "{wire:02x?}");
            }
        }
    }

    #[test]
    fn takeover_compressor_shares_its_window_with_a_persistent_receiver() {
        let mut deflate = codec(takeover());
        let mut inflater = Decompress::new(false);
        let message = json_like(2000);
        let mut sizes = Vec::new();
        for _ in 0..5 {
            let mut wire = Vec::new();
            assert!(deflate.compress(&message, &mut wire));
            assert_eq!(zlib_receive(&mut inflater, &wire).unwrap(), message);
            sizes.push(wire.len());
        }
        // Every repeat is one back-reference into the previous message.
        assert!(sizes[1] < sizes[0] / 10, "{sizes:?}");
        // A message below the threshold never reaches the compressor.
        let mut deflate = Deflate::new(takeover(), &DeflateConfig::default());
        assert!(!deflate.compress(b"tiny", &mut Vec::new()));
    }

    #[test]
    fn takeover_inflater_follows_a_context_keeping_client() {
        let mut deflate = codec(takeover());
        let mut compressor = Compress::new(Compression::new(6), false);
        let mut out = Vec::new();
        for payload in payloads() {
            let wire = zlib_send(&mut compressor, &payload);
            deflate.decompress(&wire, payload.len(), &mut out).unwrap();
            assert_eq!(out, payload);
        }
    }

    /// 100 MiB of zeros in ~100 KiB: the same sync-flushed 1 MiB chunk a hundred times.
    fn bomb() -> Vec<u8> {
        let mut compressor = Compress::new(Compression::new(9), false);
        let chunk = zlib_send(&mut compressor, &vec![0; 1 << 20]);
        // Each chunk but the last keeps its sync-flush marker, so they concatenate.
        let mut bomb = [&chunk[..], &SYNC_TAIL].concat().repeat(99);
        bomb.extend_from_slice(&chunk);
        bomb
    }

    #[test]
    fn bomb_stops_at_the_limit_without_allocating_past_it() {
        let bomb = bomb();
        assert!(bomb.len() < 200 * 1024, "{}", bomb.len());
        let max_len = 16 << 20;
        for params in [no_takeover(15), takeover()] {
            let mut deflate = codec(params);
            let mut out = Vec::new();
            assert_eq!(
                deflate.decompress(&bomb, max_len, &mut out),
                Err(InflateError::TooBig)
            );
            assert!(
                out.capacity() <= max_len + 1,
                "{} with {params:?}",
                out.capacity()
            );
        }
    }

    #[test]
    fn limit_is_inclusive() {
        let payload = json_like(5000);
        let mut compressor = Compress::new(Compression::new(6), false);
        let wire = zlib_send(&mut compressor, &payload);
        for params in [no_takeover(15), takeover()] {
            let mut out = Vec::new();
            codec(params).decompress(&wire, 5000, &mut out).unwrap();
            assert_eq!(out, payload);
            let result = codec(params).decompress(&wire, 4999, &mut out);
            assert_eq!(result, Err(InflateError::TooBig), "{params:?}");
        }
    }

    #[test]
    fn invalid_data_is_rejected() {
        let payload = json_like(5000);
        let mut compressor = Compress::new(Compression::new(6), false);
        let wire = zlib_send(&mut compressor, &payload);
        let mut corrupt = wire.clone();
        corrupt[wire.len() / 2] ^= 0x5a;
        let garbage: [&[u8]; 3] = [
            // BTYPE 11 is reserved (RFC 1951 §3.2.3).
            &[0xff, 0xff, 0xff],
            // A stored block whose NLEN is not the complement of LEN.
            &[0x00, 0x05, 0x00, 0x00, 0x00, b'H', b'e', b'l', b'l', b'o'],
            // A back-reference before the start of the message.
            &[0xf2, 0x00, 0x11, 0x00, 0x00],
        ];
        for params in [no_takeover(15), takeover()] {
            for input in garbage {
                let mut out = Vec::new();
                let result = codec(params).decompress(input, 1 << 20, &mut out);
                assert_eq!(
                    result,
                    Err(InflateError::Invalid),
                    "{input:02x?} {params:?}"
                );
            }
        }
        // Corruption in the middle: either detected, or at least never the original.
        let mut out = Vec::new();
        let result = codec(no_takeover(15)).decompress(&corrupt, 1 << 20, &mut out);
        assert!(result.is_err() || out != payload);
    }

    #[test]
    fn first_output_guess_follows_the_last_message() {
        let mut deflate = codec(no_takeover(15));
        let mut out = Vec::new();
        let cases = [
            (json_like(50_000), 6),
            (vec![b'a'; 100_000], 16),
            (noise(5000, 9), 1),
        ];
        for (payload, ratio) in cases {
            let wire = zlib_send(&mut Compress::new(Compression::new(6), false), &payload);
            deflate.decompress(&wire, 1 << 20, &mut out).unwrap();
            assert_eq!(out, payload);
            assert_eq!(deflate.inflate_ratio, ratio);
        }
    }

    /// Few distinct bytes, so that random payloads compress.
    const ALPHABET: &[u8] = b"ab{}\":,0123 \xff";

    proptest::proptest! {
        #[test]
        fn any_payload_round_trips(
            payload in proptest::collection::vec(proptest::sample::select(ALPHABET), 0..3000),
            bits in 8u8..=15,
        ) {
            let mut deflate = codec(no_takeover(bits));
            let (mut wire, mut back) = (Vec::new(), Vec::new());
            if deflate.compress(&payload, &mut wire) {
                proptest::prop_assert!(wire.len() < payload.len());
                deflate.decompress(&wire, payload.len(), &mut back).unwrap();
                proptest::prop_assert_eq!(&back, &payload);
                let (out, max_distance) = inflate_with_max_distance(&wire).unwrap();
                proptest::prop_assert_eq!(out, payload);
                proptest::prop_assert!(max_distance <= 1 << bits);
            }
        }

        #[test]
        fn arbitrary_input_never_inflates_past_the_limit(
            input in proptest::collection::vec(proptest::num::u8::ANY, 0..200),
            max_len in 0usize..5000,
        ) {
            for params in [no_takeover(15), takeover()] {
                let mut out = Vec::new();
                match codec(params).decompress(&input, max_len, &mut out) {
                    Ok(()) => proptest::prop_assert!(out.len() <= max_len),
                    Err(_) => proptest::prop_assert!(out.is_empty()),
                }
                proptest::prop_assert!(out.capacity() <= max_len.max(1024) + 1);
            }
        }
    }

    #[test]
    fn codec_is_send() {
        fn assert_send<T: Send>() {}
        assert_send::<Deflate>();
    }

    #[test]
    fn codec_state_per_connection_stays_small() {
        assert!(
            std::mem::size_of::<Deflate>() <= 48,
            "{}",
            std::mem::size_of::<Deflate>()
        );
        // No takeover: nothing allocated per connection, even after use.
        let mut deflate = codec(no_takeover(15));
        let mut wire = Vec::new();
        assert!(deflate.compress(&json_like(4096), &mut wire));
        deflate.decompress(&wire, 4096, &mut Vec::new()).unwrap();
        assert!(deflate.compressor.is_none() && deflate.inflater.is_none());
    }
}
