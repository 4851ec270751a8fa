//! Connection handles: [`Ws`], lent to callbacks on the shard thread, and [`Remote`], a
//! `Send + Clone` handle that reaches a connection from any thread.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;

use crate::proto::frame::OpCode;
use crate::proto::{encode_frame, CloseCode, Connection};
use crate::runtime::shard::{Ctx, Link};
use crate::runtime::{Command, ShardShared};
use crate::server::{Message, SendStatus};

/// A connection, lent to a [`crate::server::Handler`] callback.
///
/// Sends append to the connection's corked output buffer; the shard writes it out once per
/// batch of completions.
pub struct Ws<'a, S> {
    pub(crate) link: &'a mut Link,
    /// The protocol engine, when the callback does not borrow from it (it does in
    /// `on_message`, `on_ping`, `on_pong` and `on_close`).
    pub(crate) conn: Option<&'a mut Connection>,
    pub(crate) state: &'a mut S,
    pub(crate) ctx: &'a mut Ctx,
}

impl<S> Ws<'_, S> {
    /// Sends a text message.
    pub fn send_text(&mut self, text: &str) -> SendStatus {
        self.send_frame(OpCode::Text, text.as_bytes(), true)
    }

    /// Sends a binary message.
    pub fn send_binary(&mut self, bytes: &[u8]) -> SendStatus {
        self.send_frame(OpCode::Binary, bytes, true)
    }

    /// Sends a message of the same type.
    pub fn send(&mut self, msg: Message<'_>) -> SendStatus {
        self.send_with(msg, true)
    }

    /// Sends a message, choosing for this message whether permessage-deflate may compress
    /// it: `false` sends it uncompressed even where compression was negotiated (already
    /// compressed data, latency-critical small messages); `true` compresses it when
    /// compression was negotiated and the message is large enough to gain (the default of
    /// the other send methods).
    pub fn send_with(&mut self, msg: Message<'_>, compress: bool) -> SendStatus {
        match msg {
            Message::Text(text) => self.send_frame(OpCode::Text, text.as_bytes(), compress),
            Message::Binary(bytes) => self.send_frame(OpCode::Binary, bytes, compress),
        }
    }

    fn send_frame(&mut self, opcode: OpCode, payload: &[u8], compress: bool) -> SendStatus {
        let conn = self.conn.as_deref_mut();
        let limits = self.ctx.limits();
        let status = queue_message(self.link, conn, opcode, payload, compress, &limits);
        if status != SendStatus::Dropped {
            self.ctx.touch(self.link);
        }
        status
    }

    /// Sends a ping (at most 125 bytes, RFC 6455 §5.5).
    pub fn ping(&mut self, payload: &[u8]) -> SendStatus {
        if payload.len() > 125 || !self.link.open {
            return SendStatus::Dropped;
        }
        encode_frame(&mut self.link.out, true, false, OpCode::Ping, payload);
        self.ctx.touch(self.link);
        self.link.status(&self.ctx.limits())
    }

    /// Starts the closing handshake (RFC 6455 §7.1.2). The reason is cut to fit 123 bytes.
    /// Sends after this are dropped. Codes that may not be sent (1005, 1006, ...) become 1000.
    pub fn close(&mut self, code: CloseCode, reason: &str) {
        if !self.link.open {
            return;
        }
        let code = if code.is_valid_on_wire() {
            code
        } else {
            CloseCode::NORMAL
        };
        self.link.close_req = Some((code, truncate_reason(reason).to_owned()));
        self.link.open = false;
        self.ctx.touch(self.link);
    }

    /// The peer's address.
    pub fn peer_addr(&self) -> SocketAddr {
        self.link.peer
    }

    /// The connection's state.
    pub fn state(&self) -> &S {
        self.state
    }

    /// The connection's state, mutably.
    pub fn state_mut(&mut self) -> &mut S {
        self.state
    }

    /// Bytes queued for this connection and not yet written to the socket.
    pub fn buffered_amount(&self) -> usize {
        self.link.buffered()
    }

    /// Whether messages can still be sent (no close sent or requested).
    pub fn is_open(&self) -> bool {
        self.link.open
    }

    /// The index of the shard (thread) that owns this connection.
    pub fn shard(&self) -> usize {
        self.ctx.shard
    }

    /// Subscribes to a topic; returns `false` if already subscribed.
    pub fn subscribe(&mut self, topic: &str) -> bool {
        self.ctx.subscribe(self.link, topic)
    }

    /// Unsubscribes from a topic; returns `false` if not subscribed.
    pub fn unsubscribe(&mut self, topic: &str) -> bool {
        self.ctx.unsubscribe(self.link, topic)
    }

    /// Sends a message to every subscriber of `topic` on every shard (this connection
    /// included, if subscribed). The frame is encoded once and shared.
    pub fn publish(&mut self, topic: &str, msg: Message<'_>) {
        let frame = encode_shared(msg);
        self.ctx.publish(topic, frame);
    }

    /// A handle to reach this connection from other threads.
    pub fn remote(&self) -> Remote {
        Remote {
            shard: Arc::clone(&self.ctx.shards[self.ctx.shard]),
            slot: self.link.slot,
            gen: self.link.gen,
        }
    }
}

/// A `Send + Clone` handle to one connection, usable from any thread (e.g. a tokio task).
/// Requests travel to the owning shard as messages; a request for a connection that has gone
/// since is ignored.
#[derive(Clone)]
pub struct Remote {
    pub(crate) shard: Arc<ShardShared>,
    pub(crate) slot: u32,
    pub(crate) gen: u32,
}

impl Remote {
    /// Queues a text message. Returns `false` if the server has stopped.
    pub fn send_text(&self, text: &str) -> bool {
        self.send(OpCode::Text, Bytes::copy_from_slice(text.as_bytes()))
    }

    /// Queues a binary message. Returns `false` if the server has stopped.
    pub fn send_binary(&self, bytes: &[u8]) -> bool {
        self.send(OpCode::Binary, Bytes::copy_from_slice(bytes))
    }

    fn send(&self, opcode: OpCode, payload: Bytes) -> bool {
        self.shard.post(Command::Send {
            slot: self.slot,
            gen: self.gen,
            opcode,
            payload,
        })
    }

    /// Starts the closing handshake. Returns `false` if the server has stopped.
    pub fn close(&self, code: CloseCode, reason: &str) -> bool {
        let reason = truncate_reason(reason).to_owned();
        self.shard.post(Command::Close {
            slot: self.slot,
            gen: self.gen,
            code,
            reason,
        })
    }
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Remote(shard {}, slot {})", self.shard.id, self.slot)
    }
}

/// Backpressure marks as the send path needs them.
pub(crate) struct SendLimits {
    pub high_water_mark: usize,
    pub max_buffered: usize,
}

/// Queues one data message on a connection, compressed if `allow_compress`, compression was
/// negotiated and the message is large enough. Compressed messages need the engine; when it
/// is borrowed (inside `on_message`) they are copied aside and encoded after the callback.
pub(crate) fn queue_message(
    link: &mut Link,
    conn: Option<&mut Connection>,
    opcode: OpCode,
    payload: &[u8],
    allow_compress: bool,
    limits: &SendLimits,
) -> SendStatus {
    if !link.open || link.buffered() > limits.max_buffered {
        return SendStatus::Dropped;
    }
    let compress = allow_compress && link.compress && payload.len() >= link.min_compress;
    match conn {
        Some(conn) if compress => {
            if conn.send(&mut link.out, opcode, payload, true).is_err() {
                return SendStatus::Dropped;
            }
        }
        // Keep order behind messages already deferred in this callback.
        None if compress || !link.deferred_msgs.is_empty() => {
            link.deferred.extend_from_slice(payload);
            link.deferred_msgs.push((opcode, payload.len(), compress));
        }
        _ => encode_frame(&mut link.out, true, false, opcode, payload),
    }
    link.status(limits)
}

/// One frame for many receivers (publish, broadcast).
pub(crate) fn encode_shared(msg: Message<'_>) -> Bytes {
    let (opcode, payload) = match msg {
        Message::Text(text) => (OpCode::Text, text.as_bytes()),
        Message::Binary(bytes) => (OpCode::Binary, bytes),
    };
    let mut buf = Vec::new();
    encode_frame(&mut buf, true, false, opcode, payload);
    Bytes::from(buf)
}

/// The longest prefix of `reason` that fits a close frame (125 - 2 code bytes), cut at a
/// character boundary (RFC 6455 §5.5: control payloads are at most 125 bytes).
pub(crate) fn truncate_reason(reason: &str) -> &str {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    &reason[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_cut_to_123_bytes_at_a_char_boundary() {
        let long = "é".repeat(100);
        let cut = truncate_reason(&long);
        assert!(cut.len() <= 123);
        assert_eq!(cut.len() % 2, 0);
        assert_eq!(truncate_reason("bye"), "bye");
    }

    #[test]
    fn encoded_frames_are_unmasked_and_final() {
        let mut out = Vec::new();
        encode_frame(&mut out, true, false, OpCode::Text, b"hi");
        assert_eq!(out, [0x81, 0x02, b'h', b'i']);
        let shared = encode_shared(Message::Binary(&[0u8; 200]));
        assert_eq!(&shared[..4], &[0x82, 126, 0, 200]);
    }
}
