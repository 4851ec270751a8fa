//! Errors of the protocol core and the close codes they map to (RFC 6455 §7.4).

use std::fmt;

/// A close status code (RFC 6455 §7.4.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CloseCode(pub u16);

impl CloseCode {
    /// 1000: normal closure.
    pub const NORMAL: CloseCode = CloseCode(1000);
    /// 1001: the endpoint is going away (server shutdown).
    pub const GOING_AWAY: CloseCode = CloseCode(1001);
    /// 1002: protocol error.
    pub const PROTOCOL: CloseCode = CloseCode(1002);
    /// 1003: a data type the endpoint cannot accept.
    pub const UNSUPPORTED: CloseCode = CloseCode(1003);
    /// 1005: no status code was present (never sent on the wire).
    pub const NO_STATUS: CloseCode = CloseCode(1005);
    /// 1006: abnormal closure (never sent on the wire).
    pub const ABNORMAL: CloseCode = CloseCode(1006);
    /// 1007: payload data inconsistent with the message type (invalid UTF-8).
    pub const INVALID_PAYLOAD: CloseCode = CloseCode(1007);
    /// 1008: policy violation.
    pub const POLICY: CloseCode = CloseCode(1008);
    /// 1009: message too big.
    pub const TOO_BIG: CloseCode = CloseCode(1009);
    /// 1011: internal server error.
    pub const INTERNAL: CloseCode = CloseCode(1011);
    /// 1013: try again later.
    pub const TRY_AGAIN_LATER: CloseCode = CloseCode(1013);

    /// Whether a peer may send this code in a close frame (RFC 6455 §7.4.1, §7.4.2 and the
    /// IANA registry): 1000–1003, 1007–1014 and 3000–4999.
    pub fn is_valid_on_wire(self) -> bool {
        matches!(self.0, 1000..=1003 | 1007..=1014 | 3000..=4999)
    }
}

impl fmt::Display for CloseCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A fault of the peer. Each maps to the close code the RFC names for it; the connection has
/// queued that close frame by the time the error is returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProtocolError {
    /// A client frame was not masked (RFC 6455 §5.1), or a server frame was.
    UnmaskedFrame,
    /// A server received a masked frame where none is allowed (client role).
    MaskedFrame,
    /// An RSV bit was set that no negotiated extension defines (§5.2).
    ReservedBits,
    /// An opcode reserved for future use (§5.2).
    ReservedOpCode,
    /// A 64-bit payload length with its most significant bit set (§5.2).
    InvalidLength,
    /// A control frame longer than 125 bytes (§5.5).
    ControlFrameTooLong,
    /// A fragmented control frame (§5.5).
    FragmentedControlFrame,
    /// A continuation frame with no message to continue (§5.4).
    UnexpectedContinuation,
    /// A new data frame while a fragmented message was still open (§5.4).
    ExpectedContinuation,
    /// A close frame with a one-byte payload (§5.5.1).
    InvalidClosePayload,
    /// A close code that may not be sent on the wire (§7.4).
    InvalidCloseCode,
    /// Text (or a close reason) that is not valid UTF-8 (§8.1).
    InvalidUtf8,
    /// A frame larger than the configured maximum frame size.
    FrameTooBig,
    /// A message larger than the configured maximum message size (also after inflation).
    MessageTooBig,
    /// A compressed payload that does not inflate (RFC 7692 §7.2.2).
    InvalidCompressedData,
}

impl ProtocolError {
    /// How many kinds there are.
    pub const KINDS: usize = 15;

    /// Every kind, in declaration order.
    pub const ALL: [ProtocolError; ProtocolError::KINDS] = [
        ProtocolError::UnmaskedFrame,
        ProtocolError::MaskedFrame,
        ProtocolError::ReservedBits,
        ProtocolError::ReservedOpCode,
        ProtocolError::InvalidLength,
        ProtocolError::ControlFrameTooLong,
        ProtocolError::FragmentedControlFrame,
        ProtocolError::UnexpectedContinuation,
        ProtocolError::ExpectedContinuation,
        ProtocolError::InvalidClosePayload,
        ProtocolError::InvalidCloseCode,
        ProtocolError::InvalidUtf8,
        ProtocolError::FrameTooBig,
        ProtocolError::MessageTooBig,
        ProtocolError::InvalidCompressedData,
    ];

    /// The kind's position in [`ProtocolError::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// A short label for metrics and logs, e.g. `invalid_utf8`.
    pub fn kind(self) -> &'static str {
        match self {
            ProtocolError::UnmaskedFrame => "unmasked_frame",
            ProtocolError::MaskedFrame => "masked_frame",
            ProtocolError::ReservedBits => "reserved_bits",
            ProtocolError::ReservedOpCode => "reserved_opcode",
            ProtocolError::InvalidLength => "invalid_length",
            ProtocolError::ControlFrameTooLong => "control_frame_too_long",
            ProtocolError::FragmentedControlFrame => "fragmented_control_frame",
            ProtocolError::UnexpectedContinuation => "unexpected_continuation",
            ProtocolError::ExpectedContinuation => "expected_continuation",
            ProtocolError::InvalidClosePayload => "invalid_close_payload",
            ProtocolError::InvalidCloseCode => "invalid_close_code",
            ProtocolError::InvalidUtf8 => "invalid_utf8",
            ProtocolError::FrameTooBig => "frame_too_big",
            ProtocolError::MessageTooBig => "message_too_big",
            ProtocolError::InvalidCompressedData => "invalid_compressed_data",
        }
    }

    /// The close code this error is answered with.
    pub fn close_code(self) -> CloseCode {
        match self {
            ProtocolError::InvalidUtf8 => CloseCode::INVALID_PAYLOAD,
            ProtocolError::FrameTooBig | ProtocolError::MessageTooBig => CloseCode::TOO_BIG,
            _ => CloseCode::PROTOCOL,
        }
    }
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = match self {
            ProtocolError::UnmaskedFrame => "unmasked client frame",
            ProtocolError::MaskedFrame => "masked server frame",
            ProtocolError::ReservedBits => "reserved bits set",
            ProtocolError::ReservedOpCode => "reserved opcode",
            ProtocolError::InvalidLength => "payload length with the top bit set",
            ProtocolError::ControlFrameTooLong => "control frame longer than 125 bytes",
            ProtocolError::FragmentedControlFrame => "fragmented control frame",
            ProtocolError::UnexpectedContinuation => "continuation frame without a message",
            ProtocolError::ExpectedContinuation => "data frame inside a fragmented message",
            ProtocolError::InvalidClosePayload => "close frame with a one-byte payload",
            ProtocolError::InvalidCloseCode => "invalid close code",
            ProtocolError::InvalidUtf8 => "invalid UTF-8",
            ProtocolError::FrameTooBig => "frame too big",
            ProtocolError::MessageTooBig => "message too big",
            ProtocolError::InvalidCompressedData => "invalid compressed data",
        };
        f.write_str(text)
    }
}

impl std::error::Error for ProtocolError {}

/// Misuse of the sending API: the connection can no longer send that frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SendError {
    /// A close frame was already sent; no data or control frame may follow it (§5.5.1).
    Closed,
    /// A control frame payload (or close reason) longer than 125 bytes.
    ControlTooLong,
    /// A close code that may not be sent (for example 1005 or 1006).
    InvalidCloseCode,
    /// An opcode the call cannot send (a control opcode as data, or continuation alone).
    InvalidOpCode,
}

impl fmt::Display for SendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = match self {
            SendError::Closed => "connection is closing",
            SendError::ControlTooLong => "control payload longer than 125 bytes",
            SendError::InvalidCloseCode => "invalid close code",
            SendError::InvalidOpCode => "opcode not allowed here",
        };
        f.write_str(text)
    }
}

impl std::error::Error for SendError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_code_validity_follows_rfc_and_registry() {
        for code in 0..6000u16 {
            let valid = CloseCode(code).is_valid_on_wire();
            let expected = (1000..=1003).contains(&code)
                || (1007..=1014).contains(&code)
                || (3000..=4999).contains(&code);
            assert_eq!(valid, expected, "code {code}");
        }
    }

    #[test]
    fn errors_map_to_rfc_close_codes() {
        assert_eq!(ProtocolError::InvalidUtf8.close_code(), CloseCode(1007));
        assert_eq!(ProtocolError::MessageTooBig.close_code(), CloseCode(1009));
        assert_eq!(ProtocolError::FrameTooBig.close_code(), CloseCode(1009));
        assert_eq!(ProtocolError::ReservedOpCode.close_code(), CloseCode(1002));
    }
}
