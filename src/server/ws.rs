//! Connection handles: [`Ws`], lent to callbacks on the shard thread, and [`Remote`], a
//! `Send + Clone` handle that reaches a connection from any thread.

use std::net::SocketAddr;

use bytes::Bytes;

use crate::proto::frame::OpCode;
use crate::proto::{encode_frame, CloseCode};
use crate::runtime::app::{truncate_reason, ConnHandle, Session};
use crate::runtime::command::Command;
use crate::server::{Message, SendStatus};

/// A connection, lent to a [`crate::server::Handler`] callback.
///
/// Sends append to the connection's corked output buffer; the shard writes it out once per
/// batch of completions.
pub struct Ws<'a, S> {
    pub(crate) session: Session<'a, S>,
}

impl<S> Ws<'_, S> {
    /// Sends a text message.
    #[inline]
    pub fn send_text(&mut self, text: &str) -> SendStatus {
        self.session.send(OpCode::Text, text.as_bytes(), true)
    }

    /// Sends a binary message.
    #[inline]
    pub fn send_binary(&mut self, bytes: &[u8]) -> SendStatus {
        self.session.send(OpCode::Binary, bytes, true)
    }

    /// Sends a message of the same type.
    #[inline]
    pub fn send(&mut self, msg: Message<'_>) -> SendStatus {
        self.send_with(msg, true)
    }

    /// Sends a message, choosing for this message whether permessage-deflate may compress
    /// it: `false` sends it uncompressed even where compression was negotiated (already
    /// compressed data, latency-critical small messages); `true` compresses it when
    /// compression was negotiated and the message is large enough to gain (the default of
    /// the other send methods).
    #[inline]
    pub fn send_with(&mut self, msg: Message<'_>, compress: bool) -> SendStatus {
        match msg {
            Message::Text(text) => self.session.send(OpCode::Text, text.as_bytes(), compress),
            Message::Binary(bytes) => self.session.send(OpCode::Binary, bytes, compress),
        }
    }

    /// Sends a ping (at most 125 bytes, RFC 6455 §5.5; a longer one is `Dropped`).
    pub fn ping(&mut self, payload: &[u8]) -> SendStatus {
        self.session.ping(payload)
    }

    /// Starts the closing handshake (RFC 6455 §7.1.2). The reason is cut to fit 123 bytes.
    /// Sends after this report [`SendStatus::Closed`]; messages the peer sent before it saw
    /// our close are still delivered. Codes that may not be sent (1005, 1006, ...) become
    /// 1000.
    pub fn close(&mut self, code: CloseCode, reason: &str) {
        self.session.close(code, reason);
    }

    /// The peer's address.
    pub fn peer_addr(&self) -> SocketAddr {
        self.session.link.peer
    }

    /// The connection's state.
    pub fn state(&self) -> &S {
        self.session.state
    }

    /// The connection's state, mutably.
    pub fn state_mut(&mut self) -> &mut S {
        self.session.state
    }

    /// Bytes queued for this connection and not yet written to the socket.
    pub fn buffered_amount(&self) -> usize {
        self.session.link.buffered()
    }

    /// Whether messages can still be sent (no close sent or requested).
    pub fn is_open(&self) -> bool {
        self.session.link.open
    }

    /// The index of the shard (thread) that owns this connection.
    pub fn shard(&self) -> usize {
        self.session.ctx.shard
    }

    /// Subscribes to a topic; returns `false` if already subscribed.
    pub fn subscribe(&mut self, topic: &str) -> bool {
        self.session.subscribe(topic)
    }

    /// Unsubscribes from a topic; returns `false` if not subscribed.
    pub fn unsubscribe(&mut self, topic: &str) -> bool {
        self.session.unsubscribe(topic)
    }

    /// Sends a message to every subscriber of `topic` on every shard (this connection
    /// included, if subscribed). The frame is encoded once and shared.
    pub fn publish(&mut self, topic: &str, msg: Message<'_>) {
        let frame = encode_shared(msg);
        self.session.ctx.publish(topic, frame);
    }

    /// A handle to reach this connection from other threads.
    pub fn remote(&mut self) -> Remote {
        Remote {
            handle: self.session.handle(),
        }
    }
}

/// A `Send + Clone` handle to one connection, usable from any thread (e.g. a tokio task).
/// Requests travel to the owning shard as messages and are checked there against the
/// connection's 64-bit identity: a handle kept after its connection closed never reaches
/// another connection, whatever reused its slot.
#[derive(Clone)]
pub struct Remote {
    handle: ConnHandle,
}

impl Remote {
    /// Queues a text message: `Queued`, `Closed` (the connection is gone, or the server
    /// stopped) or `QueueFull` (the shard's command queue is full; try again later).
    /// `Queued` means the shard will take it: if the connection closes first, it is dropped
    /// there.
    pub fn send_text(&self, text: &str) -> SendStatus {
        self.send(OpCode::Text, Bytes::copy_from_slice(text.as_bytes()))
    }

    /// Queues a binary message (see [`Remote::send_text`]).
    pub fn send_binary(&self, bytes: &[u8]) -> SendStatus {
        self.send(OpCode::Binary, Bytes::copy_from_slice(bytes))
    }

    fn send(&self, opcode: OpCode, payload: Bytes) -> SendStatus {
        self.handle.post(|id| Command::Send {
            id,
            opcode,
            payload,
        })
    }

    /// Sends a message to every subscriber of `topic` on every shard, and on every other node
    /// with a broker configured (encoded once), as [`crate::server::ServerHandle::publish`]
    /// does; returns how many local shards took it (one with a full command queue misses
    /// it).
    pub fn publish(&self, topic: &str, msg: Message<'_>) -> usize {
        self.handle.node().publish(topic, encode_shared(msg))
    }

    /// Starts the closing handshake (see [`Remote::send_text`] for the result).
    pub fn close(&self, code: CloseCode, reason: &str) -> SendStatus {
        let reason = truncate_reason(reason).to_owned();
        self.handle.post(|id| Command::Close { id, code, reason })
    }
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Remote(shard {}, slot {})",
            self.handle.shard(),
            self.handle.slot()
        )
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoded_frames_are_unmasked_and_final() {
        let mut out = Vec::new();
        encode_frame(&mut out, true, false, OpCode::Text, b"hi");
        assert_eq!(out, [0x81, 0x02, b'h', b'i']);
        let shared = encode_shared(Message::Binary(&[0u8; 200]));
        assert_eq!(&shared[..4], &[0x82, 126, 0, 200]);
    }
}
