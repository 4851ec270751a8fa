//! The client's side of the wire: the opening handshake (RFC 6455 §4.1), prebuilt masked client
//! frames (§5.2, §5.3), and a streaming reader that checks every echoed payload byte against what
//! was sent.
//!
//! This module never touches a socket; the generator feeds it bytes. It must never accept a server
//! frame that breaks the RFC (masked, RSV bits set, interleaved data) or an echo that differs from
//! the sent payload: each of those is an `Err` that fails the whole run.

use std::collections::VecDeque;
use std::time::Instant;

use base64::Engine as _;
use sha1::{Digest, Sha1};

/// RFC 6455 §1.3: the GUID appended to the client's key to derive `Sec-WebSocket-Accept`.
const GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Opcode of a continuation frame (RFC 6455 §5.2).
pub const OP_CONTINUATION: u8 = 0x0;
/// Opcode of a binary frame; every message the generator sends is binary, so the echo must be.
pub const OP_BINARY: u8 = 0x2;
/// Opcode of a close frame.
pub const OP_CLOSE: u8 = 0x8;

/// A small xorshift generator: masking keys, handshake keys and payload bytes need to vary, not
/// to be secret (the peer under test is on loopback).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator seeded with `seed` (zero is replaced, as xorshift would stay at zero).
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// The next 64 pseudo-random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

/// A fresh `Sec-WebSocket-Key`: 16 bytes, base64 (RFC 6455 §4.1, item 7).
pub fn new_key(rng: &mut Rng) -> String {
    let mut raw = [0u8; 16];
    raw[..8].copy_from_slice(&rng.next_u64().to_le_bytes());
    raw[8..].copy_from_slice(&rng.next_u64().to_le_bytes());
    base64::engine::general_purpose::STANDARD.encode(raw)
}

/// The `Sec-WebSocket-Accept` value a server must answer to `key` (RFC 6455 §4.2.2, item 5.4).
pub fn accept_for(key: &str) -> String {
    let mut sha = Sha1::new();
    sha.update(key.as_bytes());
    sha.update(GUID);
    base64::engine::general_purpose::STANDARD.encode(sha.finalize())
}

/// The client's upgrade request for `host` and `path` (RFC 6455 §4.1): no extensions, no
/// subprotocol.
pub fn request(host: &str, path: &str, key: &str) -> Vec<u8> {
    format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .into_bytes()
}

/// Checks the server's handshake response at the start of `buf`.
///
/// Returns `Ok(Some(n))` when a complete, valid `101` response occupies `buf[..n]`, `Ok(None)` when
/// more bytes are needed.
///
/// # Errors
///
/// Any response that is not a correct upgrade for `key`: another status, a missing or wrong
/// `Upgrade`/`Connection` header, a wrong `Sec-WebSocket-Accept` (RFC 6455 §4.1, client
/// requirements 1–4), or an extension the client did not offer (item 5).
pub fn check_response(buf: &[u8], key: &str) -> Result<Option<usize>, String> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut response = httparse::Response::new(&mut headers);
    let used = match response.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > 16 * 1024 => {
            return Err("handshake response longer than 16 KiB".into())
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(format!("malformed handshake response: {e}")),
    };
    if response.code != Some(101) {
        return Err(format!(
            "handshake answered with status {:?}",
            response.code
        ));
    }
    let header = |name: &str| {
        response
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).trim().to_string())
    };
    let upgrade = header("upgrade").unwrap_or_default();
    if !upgrade.eq_ignore_ascii_case("websocket") {
        return Err(format!("handshake Upgrade header is {upgrade:?}"));
    }
    let connection = header("connection").unwrap_or_default();
    if !connection
        .split(',')
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
    {
        return Err(format!("handshake Connection header is {connection:?}"));
    }
    let expected = accept_for(key);
    match header("sec-websocket-accept") {
        Some(accept) if accept == expected => {}
        other => {
            return Err(format!(
                "Sec-WebSocket-Accept {other:?}, expected {expected:?}"
            ))
        }
    }
    if let Some(ext) = header("sec-websocket-extensions") {
        return Err(format!(
            "server negotiated an extension that was not offered: {ext}"
        ));
    }
    Ok(Some(used))
}

/// Appends one masked client frame to `out` (RFC 6455 §5.2 layout, §5.3 masking).
pub fn push_frame(out: &mut Vec<u8>, fin: bool, opcode: u8, payload: &[u8], mask: [u8; 4]) {
    push_header(out, fin, opcode, payload.len(), mask);
    let start = out.len();
    out.extend_from_slice(payload);
    for (i, b) in out[start..].iter_mut().enumerate() {
        *b ^= mask[i & 3];
    }
}

/// Appends the header of a masked client frame with a `len`-byte payload, mask key included;
/// the caller appends the payload masked with `mask` (RFC 6455 §5.2, §5.3).
pub fn push_header(out: &mut Vec<u8>, fin: bool, opcode: u8, len: usize, mask: [u8; 4]) {
    out.push(if fin { 0x80 } else { 0 } | opcode);
    if len < 126 {
        out.push(0x80 | len as u8);
    } else if len <= 0xFFFF {
        out.push(0x80 | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(&mask);
}

/// The wire image of one binary message carrying `payload`: a single frame when `fragment` is 0
/// or not smaller than the payload, otherwise frames of `fragment` payload bytes (RFC 6455 §5.4).
pub fn message_wire(payload: &[u8], fragment: usize, rng: &mut Rng) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 14);
    if fragment == 0 || fragment >= payload.len() {
        push_frame(&mut out, true, OP_BINARY, payload, mask_key(rng));
        return out;
    }
    let count = payload.len().div_ceil(fragment);
    for (i, chunk) in payload.chunks(fragment).enumerate() {
        let opcode = if i == 0 { OP_BINARY } else { OP_CONTINUATION };
        push_frame(&mut out, i + 1 == count, opcode, chunk, mask_key(rng));
    }
    out
}

/// The wire image of a client close frame with status 1000 (RFC 6455 §5.5.1, §7.4.1).
pub fn close_wire(rng: &mut Rng) -> Vec<u8> {
    let mut out = Vec::with_capacity(8);
    push_frame(
        &mut out,
        true,
        OP_CLOSE,
        &1000u16.to_be_bytes(),
        mask_key(rng),
    );
    out
}

/// A fresh, non-zero masking key (RFC 6455 §5.3).
pub fn mask_key(rng: &mut Rng) -> [u8; 4] {
    (rng.next_u64() as u32 | 1).to_le_bytes()
}

/// The messages one run sends: `variants` distinct payloads of `size` bytes, each prebuilt and
/// masked once, so the hot loop only copies references.
///
/// Payload `k` is `pattern[k..k + size]`, so consecutive messages on a connection differ and an
/// echo delivered out of order or duplicated fails verification.
#[derive(Debug)]
pub struct Pool {
    pattern: Vec<u8>,
    size: usize,
    wires: Vec<Vec<u8>>,
}

impl Pool {
    /// Builds the pool; `fragment` as in [`message_wire`]. The variant count shrinks for big
    /// messages so the prebuilt images stay under about 64 MiB.
    pub fn new(size: usize, fragment: usize, seed: u64) -> Self {
        let variants = (64 << 20) / (size + 14).max(1);
        let variants = variants.clamp(1, 16);
        let mut rng = Rng::new(seed);
        let mut pattern = vec![0u8; size + variants];
        for chunk in pattern.chunks_mut(8) {
            let r = rng.next_u64().to_le_bytes();
            chunk.copy_from_slice(&r[..chunk.len()]);
        }
        let wires = (0..variants)
            .map(|k| message_wire(&pattern[k..k + size], fragment, &mut rng))
            .collect();
        Pool {
            pattern,
            size,
            wires,
        }
    }

    /// How many distinct messages the pool holds.
    pub fn variants(&self) -> usize {
        self.wires.len()
    }

    /// The unmasked payload of message `k`.
    pub fn payload(&self, k: usize) -> &[u8] {
        &self.pattern[k..k + self.size]
    }

    /// The masked wire image of message `k`.
    pub fn wire(&self, k: usize) -> &[u8] {
        &self.wires[k]
    }
}

/// A server frame's header: final bit, opcode, payload length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    /// FIN: the last frame of its message.
    pub fin: bool,
    /// The opcode (low four bits of the first byte).
    pub opcode: u8,
    /// Payload length.
    pub len: u64,
}

/// Collects a server frame's header bytes across reads (2 to 10 bytes; 14 with a mask, which
/// [`HeadBuf::parse`] then refuses).
#[derive(Debug, Default)]
pub struct HeadBuf {
    bytes: [u8; 14],
    len: usize,
}

impl HeadBuf {
    /// Accumulates header bytes; returns how many bytes of `data` completed the header, or
    /// `None` when `data` ran out first (everything was consumed).
    pub fn take(&mut self, data: &[u8]) -> Option<usize> {
        let mut used = 0;
        loop {
            let need = if self.len < 2 {
                2
            } else {
                let ext = match self.bytes[1] & 0x7F {
                    126 => 2,
                    127 => 8,
                    _ => 0,
                };
                let mask = if self.bytes[1] & 0x80 != 0 { 4 } else { 0 };
                2 + ext + mask
            };
            if self.len == need {
                return Some(used);
            }
            let take = (need - self.len).min(data.len() - used);
            if take == 0 {
                return None;
            }
            self.bytes[self.len..self.len + take].copy_from_slice(&data[used..used + take]);
            self.len += take;
            used += take;
        }
    }

    /// Decodes the complete header [`HeadBuf::take`] collected and empties the buffer for the
    /// next one.
    ///
    /// # Errors
    ///
    /// RSV bits set (no extension was negotiated, RFC 6455 §5.2) or a masked frame (§5.1).
    pub fn parse(&mut self) -> Result<Head, String> {
        let [b0, b1] = [self.bytes[0], self.bytes[1]];
        self.len = 0;
        if b0 & 0x70 != 0 {
            // RFC 6455 §5.2: RSV bits must be 0 unless an extension was negotiated (none was).
            return Err(format!("server frame has RSV bits set: {b0:#04x}"));
        }
        if b1 & 0x80 != 0 {
            // RFC 6455 §5.1: a server must not mask frames it sends.
            return Err("server sent a masked frame".into());
        }
        let len = match b1 & 0x7F {
            126 => u16::from_be_bytes([self.bytes[2], self.bytes[3]]) as u64,
            127 => u64::from_be_bytes(self.bytes[2..10].try_into().unwrap_or([0xFF; 8])),
            n => n as u64,
        };
        Ok(Head {
            fin: b0 & 0x80 != 0,
            opcode: b0 & 0x0F,
            len,
        })
    }
}

/// A message sent and not yet echoed back.
#[derive(Debug, Clone, Copy)]
pub struct Pending {
    /// Which pool variant was sent.
    pub variant: usize,
    /// When it was queued for writing.
    pub sent: Instant,
}

/// Streaming reader of the server's frames on one connection: verifies each payload byte as it
/// arrives, so a 16 MiB echo needs no reassembly buffer.
#[derive(Debug, Default)]
pub struct Reader {
    head: HeadBuf,
    in_frame: bool,
    fin: bool,
    control: bool,
    remaining: u64,
    in_message: bool,
    offset: usize,
}

impl Reader {
    /// Consumes `data`, checking it against the oldest entries of `pending`; calls `done` with
    /// each message that has been echoed completely and correctly.
    ///
    /// # Errors
    ///
    /// A protocol violation by the server or an echo that differs from the sent payload.
    pub fn feed(
        &mut self,
        mut data: &[u8],
        pool: &Pool,
        pending: &mut VecDeque<Pending>,
        mut done: impl FnMut(Pending),
    ) -> Result<(), String> {
        loop {
            if !self.in_frame {
                match self.head.take(data) {
                    Some(used) => data = &data[used..],
                    None => return Ok(()),
                }
                self.start_frame(pool, pending)?;
            }
            let take = (self.remaining.min(data.len() as u64)) as usize;
            let (chunk, rest) = data.split_at(take);
            data = rest;
            if !self.control {
                // `start_frame` checked that the frame fits in the expected payload.
                let Some(front) = pending.front() else {
                    return Err("echo data with no message outstanding".into());
                };
                let expected = &pool.payload(front.variant)[self.offset..self.offset + take];
                if chunk != expected {
                    let at = chunk
                        .iter()
                        .zip(expected)
                        .position(|(a, b)| a != b)
                        .unwrap_or(0);
                    return Err(format!(
                        "echo payload mismatch at byte {} of a {}-byte message: got {:#04x}, \
                         sent {:#04x}",
                        self.offset + at,
                        pool.size,
                        chunk[at],
                        expected[at]
                    ));
                }
                self.offset += take;
            }
            self.remaining -= take as u64;
            if self.remaining > 0 {
                return Ok(());
            }
            self.in_frame = false;
            if !self.control && self.fin {
                if self.offset != pool.size {
                    return Err(format!(
                        "echo ended after {} of {} bytes",
                        self.offset, pool.size
                    ));
                }
                self.in_message = false;
                self.offset = 0;
                // The front exists: data was verified against it above or the message is empty,
                // in which case `start_frame` checked it.
                if let Some(p) = pending.pop_front() {
                    done(p);
                }
            }
            if data.is_empty() {
                return Ok(());
            }
        }
    }

    /// Validates a complete header and sets up the frame's payload state.
    fn start_frame(&mut self, pool: &Pool, pending: &VecDeque<Pending>) -> Result<(), String> {
        let Head { fin, opcode, len } = self.head.parse()?;
        self.fin = fin;
        self.remaining = len;
        self.in_frame = true;
        self.control = opcode >= 0x8;
        match opcode {
            OP_CLOSE => {
                return Err(format!(
                    "server sent a close frame ({len} payload bytes) mid-run"
                ))
            }
            0x9 | 0xA => {
                // RFC 6455 §5.5: control frames are not fragmented, carry <= 125 bytes, and may
                // be interleaved with a fragmented message. Pings are not expected from an echo
                // server; their payload is skipped.
                if !self.fin || len > 125 {
                    return Err(format!(
                        "invalid control frame: opcode {opcode}, {len} bytes"
                    ));
                }
                return Ok(());
            }
            OP_BINARY if !self.in_message => self.in_message = true,
            OP_CONTINUATION if self.in_message => {}
            _ => {
                return Err(format!(
                    "unexpected opcode {opcode:#x} (in a message: {})",
                    self.in_message
                ))
            }
        }
        if pending.is_empty() {
            return Err("echo frame with no message outstanding".into());
        }
        if self.offset as u64 + len > pool.size as u64 {
            return Err(format!(
                "echo longer than sent: frame of {len} bytes at offset {} of {}",
                self.offset, pool.size
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
/// A server's (unmasked) frame, for feeding the reader.
pub(crate) fn server_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![if fin { 0x80 } else { 0 } | opcode];
    if payload.len() < 126 {
        out.push(payload.len() as u8);
    } else if payload.len() <= 0xFFFF {
        out.push(126);
        out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    } else {
        out.push(127);
        out.extend_from_slice(&(payload.len() as u64).to_be_bytes());
    }
    out.extend_from_slice(payload);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(variants: &[usize]) -> VecDeque<Pending> {
        let now = Instant::now();
        variants
            .iter()
            .map(|&variant| Pending { variant, sent: now })
            .collect()
    }

    #[test]
    fn accept_matches_rfc_example() {
        // RFC 6455 §1.3 worked example.
        assert_eq!(
            accept_for("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn check_response_accepts_valid_upgrade_and_rejects_wrong_accept() {
        let key = "dGhlIHNhbXBsZSBub25jZQ==";
        let ok = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: \
                  Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\nXY";
        assert_eq!(check_response(ok.as_bytes(), key), Ok(Some(ok.len() - 2)));
        assert_eq!(check_response(&ok.as_bytes()[..40], key), Ok(None));
        let bad = ok.replace("s3pP", "AAAA");
        assert!(check_response(bad.as_bytes(), key).is_err());
        let status = ok.replace("101 Switching Protocols", "200 OK");
        assert!(check_response(status.as_bytes(), key).is_err());
    }

    #[test]
    fn masked_frame_unmasks_to_payload() {
        let mut rng = Rng::new(7);
        let payload: Vec<u8> = (0..300u32).map(|i| i as u8).collect();
        let wire = message_wire(&payload, 0, &mut rng);
        assert_eq!(wire[0], 0x82);
        assert_eq!(wire[1], 0x80 | 126);
        assert_eq!(u16::from_be_bytes([wire[2], wire[3]]), 300);
        let mask = &wire[4..8];
        let unmasked: Vec<u8> = wire[8..]
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ mask[i & 3])
            .collect();
        assert_eq!(unmasked, payload);
    }

    #[test]
    fn fragmented_wire_has_continuations_and_one_fin() {
        let mut rng = Rng::new(1);
        let wire = message_wire(&[9u8; 10], 4, &mut rng);
        // Three frames of 4, 4, 2 payload bytes, each with a 2-byte header and 4-byte mask.
        assert_eq!(wire.len(), 3 * 6 + 10);
        assert_eq!(wire[0], 0x02);
        assert_eq!(wire[10], 0x00);
        assert_eq!(wire[20], 0x80);
    }

    #[test]
    fn reader_verifies_echo_split_at_every_byte() {
        let pool = Pool::new(200, 0, 3);
        let mut wire = server_frame(true, OP_BINARY, pool.payload(0));
        wire.extend(server_frame(false, OP_BINARY, &pool.payload(1)[..50]));
        wire.extend(server_frame(true, 0x9, b"hi"));
        wire.extend(server_frame(true, OP_CONTINUATION, &pool.payload(1)[50..]));
        for split in 0..wire.len() {
            let mut reader = Reader::default();
            let mut queue = pending(&[0, 1]);
            let mut seen = Vec::new();
            for part in [&wire[..split], &wire[split..]] {
                reader
                    .feed(part, &pool, &mut queue, |p| seen.push(p.variant))
                    .unwrap();
            }
            assert_eq!(seen, vec![0, 1], "split at {split}");
            assert!(queue.is_empty());
        }
    }

    #[test]
    fn reader_rejects_corrupted_reordered_and_masked_echoes() {
        let pool = Pool::new(64, 0, 5);
        let mut corrupt = server_frame(true, OP_BINARY, pool.payload(0));
        corrupt[40] ^= 1;
        let reordered = server_frame(true, OP_BINARY, pool.payload(1));
        let mut masked = server_frame(true, OP_BINARY, pool.payload(0));
        masked[1] |= 0x80;
        let short = server_frame(true, OP_BINARY, &pool.payload(0)[..63]);
        for wire in [corrupt, reordered, masked, short] {
            let mut queue = pending(&[0, 1]);
            let result = Reader::default().feed(&wire, &pool, &mut queue, |_| {});
            assert!(result.is_err());
        }
    }

    #[test]
    fn reader_accepts_empty_messages() {
        let pool = Pool::new(0, 0, 5);
        let wire = [
            server_frame(true, OP_BINARY, &[]),
            server_frame(true, OP_BINARY, &[]),
        ]
        .concat();
        let mut queue = pending(&[0, 0]);
        let mut count = 0;
        Reader::default()
            .feed(&wire, &pool, &mut queue, |_| count += 1)
            .unwrap();
        assert_eq!(count, 2);
    }
}
