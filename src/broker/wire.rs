//! What a node puts on the broker: the message header, and how a topic becomes a Redis channel
//! or a NATS subject. Pure functions, no I/O; the formats are documented in the parent module
//! ("Message format", "Topic names on the broker").

use bytes::{BufMut, Bytes, BytesMut};

use super::NodeId;

/// The format version this build writes and accepts.
pub(crate) const VERSION: u8 = 1;

/// Bytes in front of the payload.
pub(crate) const HEADER_LEN: usize = 9;

/// The bytes to publish for `payload` from `node`.
pub(crate) fn encode(node: NodeId, payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(HEADER_LEN + payload.len());
    out.put_u8(VERSION);
    out.put_u64(node.get());
    out.put_slice(payload);
    out.freeze()
}

/// The publishing node's id (0 for other publishers) and the payload of a received message, or
/// `None` when it is not a version 1 message. The payload shares `wire`'s allocation.
pub(crate) fn decode(wire: Bytes) -> Option<(u64, Bytes)> {
    if wire.len() < HEADER_LEN || wire[0] != VERSION {
        return None;
    }
    let mut id = [0u8; 8];
    id.copy_from_slice(&wire[1..HEADER_LEN]);
    Some((u64::from_be_bytes(id), wire.slice(HEADER_LEN..)))
}

/// Whether `prefix` may start channel and subject names: one or more non-empty tokens of ASCII
/// letters, digits, `-` and `_`, separated by `.` (valid as a NATS subject prefix, and plain in
/// Redis).
pub(crate) fn is_valid_prefix(prefix: &str) -> bool {
    !prefix.is_empty()
        && prefix.split('.').all(|token| {
            !token.is_empty()
                && token
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// The Redis channel of `topic`: `{prefix}:{topic}`.
#[cfg(feature = "redis")]
pub(crate) fn redis_channel(prefix: &str, topic: &str) -> Vec<u8> {
    let mut channel = Vec::with_capacity(prefix.len() + 1 + topic.len());
    channel.extend_from_slice(prefix.as_bytes());
    channel.push(b':');
    channel.extend_from_slice(topic.as_bytes());
    channel
}

/// The topic of a Redis channel, when it is one of ours.
#[cfg(feature = "redis")]
pub(crate) fn redis_topic<'a>(prefix: &str, channel: &'a [u8]) -> Option<&'a str> {
    let rest = channel
        .strip_prefix(prefix.as_bytes())?
        .strip_prefix(b":")?;
    std::str::from_utf8(rest).ok()
}

/// The NATS subject of `topic`: `{prefix}.{escaped topic}` (see the module docs).
#[cfg(any(feature = "nats", test))]
pub(crate) fn nats_subject(prefix: &str, topic: &str) -> String {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut subject = String::with_capacity(prefix.len() + 1 + topic.len());
    subject.push_str(prefix);
    subject.push('.');
    if topic.is_empty() {
        subject.push('~');
    }
    for b in topic.bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
            subject.push(b as char);
        } else {
            subject.push('~');
            subject.push(HEX[usize::from(b >> 4)] as char);
            subject.push(HEX[usize::from(b & 15)] as char);
        }
    }
    subject
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The inverse of `nats_subject`, to show the mapping is reversible.
    fn nats_topic(prefix: &str, subject: &str) -> Option<String> {
        let token = subject.strip_prefix(prefix)?.strip_prefix('.')?;
        if token == "~" {
            return Some(String::new());
        }
        let bytes = token.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b'~' {
                let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            } else {
                out.push(bytes[i]);
                i += 1;
            }
        }
        String::from_utf8(out).ok()
    }

    #[test]
    fn header_round_trips_and_shares_the_payload() {
        let wire = encode(NodeId::new(0x0102_0304_0506_0708).unwrap(), b"hello");
        assert_eq!(&wire[..HEADER_LEN], &[1, 1, 2, 3, 4, 5, 6, 7, 8]);
        let (node, payload) = decode(wire.clone()).unwrap();
        assert_eq!(node, 0x0102_0304_0506_0708);
        assert_eq!(&payload[..], b"hello");
        assert_eq!(payload.as_ptr(), wire[HEADER_LEN..].as_ptr());
    }

    #[test]
    fn rejects_short_and_foreign_messages() {
        assert!(decode(Bytes::from_static(b"")).is_none());
        assert!(decode(Bytes::from_static(&[1, 0, 0, 0, 0, 0, 0, 0])).is_none());
        assert!(decode(Bytes::from_static(&[2, 0, 0, 0, 0, 0, 0, 0, 0, 9])).is_none());
        let (node, payload) = decode(Bytes::from_static(&[1, 0, 0, 0, 0, 0, 0, 0, 0])).unwrap();
        assert_eq!((node, payload.len()), (0, 0));
    }

    #[test]
    fn nats_subjects_escape_everything_but_plain_token_bytes() {
        assert_eq!(nats_subject("ringsock", "room-1_a"), "ringsock.room-1_a");
        assert_eq!(nats_subject("ringsock", "room 1"), "ringsock.room~201");
        assert_eq!(nats_subject("ringsock", "a.b"), "ringsock.a~2Eb");
        assert_eq!(nats_subject("ringsock", "*"), "ringsock.~2A");
        assert_eq!(nats_subject("ringsock", ">"), "ringsock.~3E");
        assert_eq!(nats_subject("ringsock", "~"), "ringsock.~7E");
        assert_eq!(nats_subject("ringsock", ""), "ringsock.~");
        assert_eq!(nats_subject("app.ws", "é"), "app.ws.~C3~A9");
    }

    #[test]
    fn nats_subjects_are_reversible_and_valid() {
        let topics = [
            "",
            "~",
            "~~7E",
            "a",
            "a.b",
            "..",
            " *> \t\r\n",
            "é☃",
            "x~2Ey",
            "~",
        ];
        let mut seen = std::collections::HashSet::new();
        for topic in topics {
            let subject = nats_subject("ringsock", topic);
            assert_eq!(nats_topic("ringsock", &subject).as_deref(), Some(topic));
            let token = subject.strip_prefix("ringsock.").unwrap();
            assert!(!token.is_empty() && !token.contains(['.', ' ', '*', '>', '\t', '\r', '\n']));
            if !seen.insert(subject.clone()) {
                assert_eq!(topic, "~", "only the repeated topic repeats its subject");
            }
        }
    }

    #[cfg(feature = "redis")]
    #[test]
    fn redis_channels_are_prefixed_verbatim() {
        assert_eq!(redis_channel("ringsock", "room 1"), b"ringsock:room 1");
        assert_eq!(redis_topic("ringsock", b"ringsock:room 1"), Some("room 1"));
        assert_eq!(redis_topic("ringsock", b"ringsock:"), Some(""));
        assert_eq!(redis_topic("ringsock", b"other:room"), None);
        assert_eq!(redis_topic("ringsock", b"ringsockroom"), None);
    }

    #[test]
    fn prefixes_are_plain_tokens() {
        assert!(is_valid_prefix("ringsock"));
        assert!(is_valid_prefix("app.ws-1"));
        for bad in ["", ".", "a.", ".a", "a..b", "a b", "a*", "a>", "a:b"] {
            assert!(!is_valid_prefix(bad), "{bad:?}");
        }
    }
}
