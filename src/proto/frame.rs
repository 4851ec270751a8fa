//! Frame headers (RFC 6455 §5.2): parsing, validation of the header-only rules, encoding.
//!
//! This module knows nothing of messages or connection state; [`crate::proto::conn`] applies
//! the rules that need them (fragmentation, extensions, limits).

use super::error::ProtocolError;

/// The largest header a frame can have: 2 bytes, 8 bytes of extended length, 4 bytes of mask.
pub const MAX_HEADER_LEN: usize = 14;

/// A frame opcode (RFC 6455 §5.2, §11.8).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OpCode {
    /// 0x0: continues a fragmented message.
    Continuation,
    /// 0x1: a UTF-8 text message.
    Text,
    /// 0x2: a binary message.
    Binary,
    /// 0x8: close.
    Close,
    /// 0x9: ping.
    Ping,
    /// 0xA: pong.
    Pong,
}

impl OpCode {
    /// Decodes the low nibble of the first header byte.
    ///
    /// # Errors
    /// [`ProtocolError::ReservedOpCode`] for 0x3–0x7 and 0xB–0xF.
    pub fn from_u8(value: u8) -> Result<OpCode, ProtocolError> {
        match value {
            0x0 => Ok(OpCode::Continuation),
            0x1 => Ok(OpCode::Text),
            0x2 => Ok(OpCode::Binary),
            0x8 => Ok(OpCode::Close),
            0x9 => Ok(OpCode::Ping),
            0xA => Ok(OpCode::Pong),
            _ => Err(ProtocolError::ReservedOpCode),
        }
    }

    /// The wire value.
    pub fn as_u8(self) -> u8 {
        match self {
            OpCode::Continuation => 0x0,
            OpCode::Text => 0x1,
            OpCode::Binary => 0x2,
            OpCode::Close => 0x8,
            OpCode::Ping => 0x9,
            OpCode::Pong => 0xA,
        }
    }

    /// Close, ping and pong (opcodes with the high bit set, §5.5).
    pub fn is_control(self) -> bool {
        self.as_u8() & 0x8 != 0
    }
}

/// A parsed frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// The FIN bit: this is the last frame of its message.
    pub fin: bool,
    /// RSV1 (permessage-deflate's "compressed" bit).
    pub rsv1: bool,
    /// RSV2 and RSV3, which no extension of ours defines.
    pub rsv23: bool,
    /// The opcode.
    pub opcode: OpCode,
    /// The masking key, if the frame is masked.
    pub mask: Option<[u8; 4]>,
    /// The payload length.
    pub payload_len: u64,
    /// The length of the header itself (2..=14).
    pub header_len: usize,
}

/// The structure of a frame header, before any rule is applied: enough to find where the
/// frame ends, which is what a connection that already failed needs to skip frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawHeader {
    /// The first header byte: FIN, RSV1–3 and the raw opcode.
    pub b0: u8,
    /// The masking key, if the frame is masked.
    pub mask: Option<[u8; 4]>,
    /// The payload length.
    pub payload_len: u64,
    /// The length of the header itself (2..=14).
    pub header_len: usize,
}

/// Parses the structure of a header from the start of `buf`; `Ok(None)` if incomplete.
///
/// # Errors
/// [`ProtocolError::InvalidLength`] for a 64-bit length with its top bit set (§5.2): after it,
/// frame boundaries can no longer be trusted.
#[inline]
pub fn parse_raw(buf: &[u8]) -> Result<Option<RawHeader>, ProtocolError> {
    let (b0, b1) = match buf {
        [b0, b1, ..] => (*b0, *b1),
        _ => return Ok(None),
    };
    let (payload_len, mut pos) = match b1 & 0x7F {
        126 => match buf.get(2..4) {
            Some(b) => (u64::from(u16::from_be_bytes([b[0], b[1]])), 4),
            None => return Ok(None),
        },
        127 => match buf.get(2..10) {
            Some(b) => {
                let mut len = [0u8; 8];
                len.copy_from_slice(b);
                let len = u64::from_be_bytes(len);
                // RFC 6455 §5.2: the most significant bit MUST be 0.
                if len >> 63 != 0 {
                    return Err(ProtocolError::InvalidLength);
                }
                (len, 10)
            }
            None => return Ok(None),
        },
        n => (u64::from(n), 2),
    };
    let mask = if b1 & 0x80 != 0 {
        let m = match buf.get(pos..pos + 4) {
            Some(m) => [m[0], m[1], m[2], m[3]],
            None => return Ok(None),
        };
        pos += 4;
        Some(m)
    } else {
        None
    };
    Ok(Some(RawHeader {
        b0,
        mask,
        payload_len,
        header_len: pos,
    }))
}

/// Parses a frame header from the start of `buf` and applies the rules that need only the
/// header: reserved opcodes, the 64-bit length's top bit (§5.2), control frames that are
/// fragmented or longer than 125 bytes (§5.5). RSV bits and masking depend on the connection
/// and are checked there.
///
/// Returns `Ok(None)` if `buf` does not yet hold the whole header.
///
/// # Errors
/// [`ProtocolError::ReservedOpCode`], [`ProtocolError::InvalidLength`],
/// [`ProtocolError::FragmentedControlFrame`], [`ProtocolError::ControlFrameTooLong`].
#[inline]
pub fn parse_header(buf: &[u8]) -> Result<Option<Header>, ProtocolError> {
    if let [b0, ..] = buf {
        // Fail on a reserved opcode as soon as the first byte is in.
        OpCode::from_u8(b0 & 0x0F)?;
    }
    let Some(raw) = parse_raw(buf)? else {
        return Ok(None);
    };
    let opcode = OpCode::from_u8(raw.b0 & 0x0F)?;
    let fin = raw.b0 & 0x80 != 0;
    if opcode.is_control() {
        // RFC 6455 §5.5: control frames are never fragmented and carry at most 125 bytes.
        if !fin {
            return Err(ProtocolError::FragmentedControlFrame);
        }
        if raw.payload_len > 125 {
            return Err(ProtocolError::ControlFrameTooLong);
        }
    }
    Ok(Some(Header {
        fin,
        rsv1: raw.b0 & 0x40 != 0,
        rsv23: raw.b0 & 0x30 != 0,
        opcode,
        mask: raw.mask,
        payload_len: raw.payload_len,
        header_len: raw.header_len,
    }))
}

/// Encodes an unmasked (server-to-client) frame header into `out`, returning its length.
///
/// Uses the shortest length form, as §5.2 requires.
pub fn encode_header(
    out: &mut [u8; MAX_HEADER_LEN],
    fin: bool,
    rsv1: bool,
    opcode: OpCode,
    payload_len: usize,
    mask: Option<[u8; 4]>,
) -> usize {
    out[0] = (u8::from(fin) << 7) | (u8::from(rsv1) << 6) | opcode.as_u8();
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    let mut pos = if payload_len < 126 {
        // Fits in 7 bits by the branch condition.
        out[1] = mask_bit | payload_len as u8;
        2
    } else if let Ok(len) = u16::try_from(payload_len) {
        out[1] = mask_bit | 126;
        out[2..4].copy_from_slice(&len.to_be_bytes());
        4
    } else {
        out[1] = mask_bit | 127;
        out[2..10].copy_from_slice(&(payload_len as u64).to_be_bytes());
        10
    };
    if let Some(key) = mask {
        out[pos..pos + 4].copy_from_slice(&key);
        pos += 4;
    }
    pos
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(bytes: &[u8]) -> Result<Option<Header>, ProtocolError> {
        parse_header(bytes)
    }

    #[test]
    fn parses_all_three_length_forms() {
        let h = header(&[0x81, 0x85, 1, 2, 3, 4]).unwrap().unwrap();
        assert_eq!(
            (h.payload_len, h.header_len, h.mask),
            (5, 6, Some([1, 2, 3, 4]))
        );
        let h = header(&[0x82, 0xFE, 0x01, 0x00, 0, 0, 0, 0])
            .unwrap()
            .unwrap();
        assert_eq!((h.payload_len, h.header_len), (256, 8));
        let h = header(&[0x82, 0xFF, 0, 0, 0, 1, 0, 0, 0, 0, 9, 9, 9, 9])
            .unwrap()
            .unwrap();
        assert_eq!((h.payload_len, h.header_len), (1 << 32, 14));
    }

    #[test]
    fn raw_parse_finds_the_extent_of_invalid_frames() {
        let raw = parse_raw(&[0x83, 0xFE, 0x01, 0x00, 1, 2, 3, 4])
            .unwrap()
            .unwrap();
        assert_eq!((raw.b0, raw.payload_len, raw.header_len), (0x83, 256, 8));
    }

    #[test]
    fn incomplete_headers_ask_for_more() {
        let full = [0x82, 0xFF, 0, 0, 0, 1, 0, 0, 0, 0, 9, 9, 9, 9];
        for n in 0..full.len() {
            assert_eq!(header(&full[..n]), Ok(None), "prefix {n}");
        }
    }

    #[test]
    fn rejects_64_bit_length_with_top_bit_set() {
        let bytes = [0x82, 0xFF, 0x80, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4];
        assert_eq!(header(&bytes), Err(ProtocolError::InvalidLength));
    }

    #[test]
    fn rejects_reserved_opcodes() {
        for op in [3u8, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF] {
            assert_eq!(header(&[0x80 | op]), Err(ProtocolError::ReservedOpCode));
            assert_eq!(
                header(&[0x80 | op, 0x80]),
                Err(ProtocolError::ReservedOpCode)
            );
        }
    }

    #[test]
    fn rejects_fragmented_or_long_control_frames() {
        assert_eq!(
            header(&[0x09, 0x80, 1, 2, 3, 4]),
            Err(ProtocolError::FragmentedControlFrame)
        );
        assert_eq!(
            header(&[0x89, 0xFE, 0, 126, 1, 2, 3, 4]),
            Err(ProtocolError::ControlFrameTooLong)
        );
        assert!(header(&[0x89, 0xFD, 1, 2, 3, 4]).unwrap().is_some());
    }

    #[test]
    fn encodes_the_shortest_length_form_and_round_trips() {
        for len in [0usize, 1, 125, 126, 127, 65535, 65536, 1 << 24] {
            let mut buf = [0u8; MAX_HEADER_LEN];
            let n = encode_header(&mut buf, true, false, OpCode::Binary, len, None);
            let expected = if len < 126 {
                2
            } else if len < 65536 {
                4
            } else {
                10
            };
            assert_eq!(n, expected);
            let h = parse_header(&buf[..n]).unwrap().unwrap();
            assert_eq!((h.payload_len, h.header_len, h.fin), (len as u64, n, true));
            let n = encode_header(&mut buf, false, true, OpCode::Text, len, Some([1, 2, 3, 4]));
            let h = parse_header(&buf[..n]).unwrap().unwrap();
            assert_eq!((h.mask, h.rsv1, h.fin), (Some([1, 2, 3, 4]), true, false));
        }
    }
}
