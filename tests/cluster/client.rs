//! A small blocking WebSocket client for the cluster tests: the opening handshake, masked
//! frames out, whole unfragmented frames in, and every read bounded by a deadline.
#![allow(dead_code)]

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crate::brokers::PATIENCE;

/// One message from the server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Incoming {
    Text(String),
    Binary(Vec<u8>),
}

/// A client connection.
pub struct Client {
    stream: TcpStream,
    buf: Vec<u8>,
    /// Where unread bytes start in `buf`.
    start: usize,
    /// Which node it is connected to, for messages.
    pub node: String,
}

impl Client {
    /// Connects to `addr` and completes the opening handshake.
    pub fn connect(addr: SocketAddr, node: &str) -> Client {
        let stream = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        stream.set_nodelay(true).unwrap();
        let mut client = Client {
            stream,
            buf: Vec::new(),
            start: 0,
            node: node.to_owned(),
        };
        let request = "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n\
                       Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
                       Sec-WebSocket-Version: 13\r\n\r\n";
        client.stream.write_all(request.as_bytes()).unwrap();
        let deadline = Instant::now() + PATIENCE;
        let end = loop {
            if let Some(end) = client.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break end + 4;
            }
            assert!(
                client.fill(deadline),
                "node {node}: no handshake answer from {addr}"
            );
        };
        let head = String::from_utf8_lossy(&client.buf[..end]).into_owned();
        assert!(head.starts_with("HTTP/1.1 101"), "handshake: {head}");
        client.start = end;
        client
    }

    /// Sends a text message.
    pub fn send_text(&mut self, text: &str) {
        self.send_frame(0x1, text.as_bytes());
    }

    /// Sends a binary message.
    pub fn send_binary(&mut self, bytes: &[u8]) {
        self.send_frame(0x2, bytes);
    }

    /// Sends `text` and waits for `expected` as the answer.
    pub fn command(&mut self, text: &str, expected: &str) {
        self.send_text(text);
        let answer = self.expect_text(&format!("the answer to {text}"));
        assert_eq!(answer, expected, "node {}: answer to {text}", self.node);
    }

    /// The shard that owns this connection (`shard` command).
    pub fn shard(&mut self) -> usize {
        self.send_text("shard");
        let answer = self.expect_text("the shard");
        answer
            .strip_prefix("shard:")
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("node {}: shard answer {answer}", self.node))
    }

    /// Subscribes to `topic` and waits for the confirmation.
    pub fn subscribe(&mut self, topic: &str) {
        self.command(&format!("sub:{topic}"), &format!("subscribed:{topic}"));
    }

    /// Unsubscribes from `topic` and waits for the confirmation.
    pub fn unsubscribe(&mut self, topic: &str) {
        self.command(&format!("unsub:{topic}"), &format!("unsubscribed:{topic}"));
    }

    /// Publishes `payload` to `topic` through the node (`pub:` command).
    pub fn publish(&mut self, topic: &str, payload: &str) {
        self.send_text(&format!("pub:{topic}:{payload}"));
    }

    /// A masked frame. The masking key is zero, which a server must take like any other
    /// (RFC 6455 §5.3); it spares the debug-built client the XOR of large payloads.
    fn send_frame(&mut self, opcode: u8, payload: &[u8]) {
        let mut head = Vec::with_capacity(14);
        head.push(0x80 | opcode);
        let len = payload.len();
        if len < 126 {
            head.push(0x80 | len as u8);
        } else if len < 65536 {
            head.push(0x80 | 126);
            head.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            head.push(0x80 | 127);
            head.extend_from_slice(&(len as u64).to_be_bytes());
        }
        head.extend_from_slice(&[0; 4]);
        self.stream
            .write_all(&head)
            .and_then(|()| self.stream.write_all(payload))
            .unwrap_or_else(|e| panic!("node {}: send: {e}", self.node));
    }

    /// The next message, or `None` if none arrives within `wait`.
    pub fn recv_within(&mut self, wait: Duration) -> Option<Incoming> {
        self.recv_until(Instant::now() + wait)
    }

    /// The next message, or `None` if none arrives by `deadline`. Panics on a close frame
    /// or a closed connection: no test expects the node to drop a client.
    pub fn recv_until(&mut self, deadline: Instant) -> Option<Incoming> {
        loop {
            if let Some(message) = self.parse() {
                return Some(message);
            }
            if !self.fill(deadline) {
                return None;
            }
        }
    }

    /// The next message, which must be text and arrive within [`PATIENCE`].
    pub fn expect_text(&mut self, what: &str) -> String {
        match self.recv_within(PATIENCE) {
            Some(Incoming::Text(text)) => text,
            other => panic!("node {}: waiting for {what}, got {other:?}", self.node),
        }
    }

    /// The next `n` text messages, each within [`PATIENCE`].
    pub fn expect_texts(&mut self, n: usize, what: &str) -> Vec<String> {
        (0..n).map(|_| self.expect_text(what)).collect()
    }

    /// Asserts that nothing arrives within `quiet`.
    pub fn expect_silence(&mut self, quiet: Duration, what: &str) {
        if let Some(message) = self.recv_within(quiet) {
            panic!("node {}: {what}: unexpected {message:?}", self.node);
        }
    }

    /// Closes the connection with a close frame (1000) and waits for the server's close.
    pub fn close(mut self) {
        self.send_frame(0x8, &1000u16.to_be_bytes());
        let deadline = Instant::now() + PATIENCE;
        loop {
            match self.parse_frame() {
                Some((0x8, _)) => return,
                Some(_) => continue,
                None => {
                    if !self.fill(deadline) {
                        panic!("node {}: no close answer", self.node);
                    }
                }
            }
        }
    }

    /// One data message out of the buffer, if a whole frame is there.
    fn parse(&mut self) -> Option<Incoming> {
        let (opcode, payload) = self.parse_frame()?;
        match opcode {
            0x1 => Some(Incoming::Text(
                String::from_utf8(payload).expect("text is UTF-8"),
            )),
            0x2 => Some(Incoming::Binary(payload)),
            0x8 => panic!("node {}: the server closed: {payload:?}", self.node),
            // Pings and pongs (the server answers pings itself): not messages.
            _ => self.parse(),
        }
    }

    /// One frame out of the buffer: opcode and payload.
    fn parse_frame(&mut self) -> Option<(u8, Vec<u8>)> {
        let buf = &self.buf[self.start..];
        if buf.len() < 2 {
            return None;
        }
        assert_eq!(buf[0] & 0x80, 0x80, "the server sent a fragment");
        assert_eq!(buf[1] & 0x80, 0, "server frames are not masked");
        let (len, head) = match buf[1] & 0x7f {
            126 => (
                u16::from_be_bytes(buf.get(2..4)?.try_into().unwrap()) as usize,
                4,
            ),
            127 => (
                u64::from_be_bytes(buf.get(2..10)?.try_into().unwrap()) as usize,
                10,
            ),
            n => (n as usize, 2),
        };
        let payload = buf.get(head..head + len)?.to_vec();
        let opcode = buf[0] & 0x0f;
        self.start += head + len;
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        Some((opcode, payload))
    }

    /// Reads what is there, waiting until `deadline`; `false` on timeout.
    fn fill(&mut self, deadline: Instant) -> bool {
        if self.start > 0 && self.start * 2 > self.buf.len() {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        self.stream.set_read_timeout(Some(left)).unwrap();
        let mut chunk = [0u8; 65536];
        match self.stream.read(&mut chunk) {
            Ok(0) => panic!("node {}: the server closed the connection", self.node),
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                Instant::now() < deadline
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => true,
            Err(e) => panic!("node {}: read: {e}", self.node),
        }
    }
}
