//! Shared test support: a scriptable handler that records what happened, a server starter,
//! and a raw-TCP WebSocket client with hand-built masked frames.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ringsock::proto::handshake::{HttpError, Request};
use ringsock::proto::CloseCode;
use ringsock::server::{
    Builder, Decision, Handler, HttpResponse, Message, Remote, SendStatus, ServerHandle, Upgrade,
    Ws,
};

/// Echoes every message and keeps nothing per connection (for tests that measure the server
/// itself: memory, allocations).
pub struct Echo;

impl Handler for Echo {
    type State = ();

    fn on_upgrade(&self, _req: &Request<'_>, _upgrade: &mut Upgrade<()>) -> Decision<()> {
        Decision::Accept(())
    }

    fn on_message(&self, ws: &mut Ws<'_, ()>, msg: Message<'_>) {
        ws.send(msg);
    }
}

/// What the handler saw.
#[derive(Default)]
pub struct Probe {
    pub opens: AtomicUsize,
    pub closes: Mutex<Vec<Option<u16>>>,
    pub drains: AtomicUsize,
    pub max_buffered: AtomicUsize,
    pub backpressure: AtomicUsize,
    pub dropped: AtomicUsize,
    pub remotes: Mutex<Vec<Remote>>,
}

impl Probe {
    pub fn close_codes(&self) -> Vec<Option<u16>> {
        self.closes.lock().unwrap().clone()
    }
}

/// Echoes messages; text messages starting with `cmd:` are commands:
/// `cmd:close` closes with 4000, `cmd:sub:T` subscribes to T and answers `subscribed`,
/// `cmd:pub:T:M` publishes M to T, `cmd:shard` answers `shard:N`,
/// `cmd:flood:N:SIZE` sends N binary messages of SIZE bytes, `cmd:pair` sends a large then a
/// small text message, `cmd:plain` sends the large one with compression declined.
pub struct TestHandler {
    pub probe: Arc<Probe>,
}

impl Handler for TestHandler {
    type State = u64;

    fn on_upgrade(&self, req: &Request<'_>, upgrade: &mut Upgrade<u64>) -> Decision<u64> {
        if req.path() == "/reject" {
            return Decision::from(HttpError::Forbidden);
        }
        if let Some(p) = req.subprotocols().next() {
            upgrade.protocol(p);
        }
        Decision::Accept(0)
    }

    fn on_open(&self, ws: &mut Ws<'_, u64>) {
        self.probe.opens.fetch_add(1, Ordering::SeqCst);
        self.probe.remotes.lock().unwrap().push(ws.remote());
    }

    fn on_message(&self, ws: &mut Ws<'_, u64>, msg: Message<'_>) {
        *ws.state_mut() += 1;
        if let Message::Text(text) = msg {
            if let Some(cmd) = text.strip_prefix("cmd:") {
                self.command(ws, cmd);
                return;
            }
        }
        let status = ws.send(msg);
        self.record(ws, status);
    }

    fn on_drain(&self, _ws: &mut Ws<'_, u64>) {
        self.probe.drains.fetch_add(1, Ordering::SeqCst);
    }

    fn on_close(&self, _ws: &mut Ws<'_, u64>, code: Option<CloseCode>, _reason: &str) {
        self.probe.closes.lock().unwrap().push(code.map(|c| c.0));
    }

    fn on_http(&self, req: &Request<'_>) -> Option<HttpResponse> {
        (req.path() == "/").then(|| HttpResponse::html("<h1>hi</h1>"))
    }
}

impl TestHandler {
    fn record(&self, ws: &mut Ws<'_, u64>, status: SendStatus) {
        self.probe
            .max_buffered
            .fetch_max(ws.buffered_amount(), Ordering::SeqCst);
        match status {
            SendStatus::Backpressure => self.probe.backpressure.fetch_add(1, Ordering::SeqCst),
            SendStatus::Dropped => self.probe.dropped.fetch_add(1, Ordering::SeqCst),
            SendStatus::Queued | SendStatus::Closed | SendStatus::QueueFull => 0,
        };
    }

    fn command(&self, ws: &mut Ws<'_, u64>, cmd: &str) {
        let parts: Vec<&str> = cmd.splitn(3, ':').collect();
        match parts.as_slice() {
            ["close"] => ws.close(CloseCode(4000), "bye"),
            ["sub", topic] => {
                ws.subscribe(topic);
                ws.send_text("subscribed");
            }
            ["pub", topic, msg] => ws.publish(topic, Message::Text(msg)),
            ["pair"] => {
                ws.send_text(&"compressible ".repeat(100));
                ws.send_text("small");
            }
            ["plain"] => {
                let text = "compressible ".repeat(100);
                ws.send_with(Message::Text(&text), false);
            }
            ["panic"] => panic!("asked to (test)"),
            ["sleep", ms] => {
                // Holds the shard: what arrives meanwhile is handled in one later round.
                std::thread::sleep(Duration::from_millis(ms.parse().unwrap()));
            }
            ["shard"] => {
                let shard = ws.shard();
                ws.send_text(&format!("shard:{shard}"));
            }
            ["flood", n, size] => {
                let payload = vec![7u8; size.parse().unwrap()];
                for _ in 0..n.parse::<usize>().unwrap() {
                    let status = ws.send_binary(&payload);
                    self.record(ws, status);
                }
            }
            _ => {
                ws.send_text("unknown command");
            }
        }
    }
}

/// Starts a test server on 127.0.0.1:0 with the given builder settings.
pub fn start(builder: Builder) -> (ServerHandle, Arc<Probe>) {
    let probe = Arc::new(Probe::default());
    let handle = builder
        .addr("127.0.0.1:0")
        .pin_threads(false)
        .build(TestHandler {
            probe: Arc::clone(&probe),
        })
        .start()
        .expect("server starts");
    (handle, probe)
}

/// A builder with one shard and short timeouts.
pub fn builder() -> Builder {
    Builder::new()
        .shards(1)
        .close_timeout(Duration::from_secs(2))
}

/// Waits until `f` holds, or panics after `secs`.
pub fn wait_for(secs: u64, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits for every connection of the server to be freed.
pub fn wait_idle(handle: &ServerHandle) {
    wait_for(10, "connection count to reach zero", || {
        handle.stats().total_connections() == 0
    });
}

/// A scripted client over a plain TCP socket.
pub struct RawClient {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

/// One frame as read from the server.
#[derive(Debug, PartialEq, Eq)]
pub struct Frame {
    pub fin: bool,
    pub rsv1: bool,
    pub opcode: u8,
    pub payload: Vec<u8>,
}

impl Frame {
    /// The close code of a close frame.
    pub fn close_code(&self) -> Option<u16> {
        (self.opcode == 8 && self.payload.len() >= 2)
            .then(|| u16::from_be_bytes([self.payload[0], self.payload[1]]))
    }
}

/// A masked client frame (RFC 6455 §5.2, §5.3).
pub fn masked_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    let mut out = vec![(u8::from(fin) << 7) | opcode];
    let len = payload.len();
    if len < 126 {
        out.push(0x80 | len as u8);
    } else if len < 65536 {
        out.push(0x80 | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

impl RawClient {
    /// Connects without the handshake.
    pub fn connect_tcp(addr: SocketAddr) -> RawClient {
        let stream = TcpStream::connect(addr).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        stream.set_nodelay(true).unwrap();
        RawClient {
            stream,
            buf: Vec::new(),
        }
    }

    /// Connects and completes the opening handshake.
    pub fn connect(addr: SocketAddr) -> RawClient {
        let mut c = RawClient::connect_tcp(addr);
        let head = c.request("/", "");
        assert!(head.starts_with("HTTP/1.1 101"), "handshake failed: {head}");
        c
    }

    /// Sends an upgrade request for `path` with extra header lines and returns the response
    /// head.
    pub fn request(&mut self, path: &str, extra: &str) -> String {
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Version: 13\r\n{extra}\r\n"
        );
        self.stream.write_all(req.as_bytes()).unwrap();
        self.read_head()
    }

    /// Reads an HTTP response head.
    pub fn read_head(&mut self) -> String {
        loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head: Vec<u8> = self.buf.drain(..end + 4).collect();
                return String::from_utf8(head).unwrap();
            }
            self.fill();
        }
    }

    /// Reads everything until EOF.
    pub fn read_to_end(&mut self) -> Vec<u8> {
        let mut rest = std::mem::take(&mut self.buf);
        let _ = self.stream.read_to_end(&mut rest);
        rest
    }

    fn fill(&mut self) {
        let mut chunk = [0u8; 65536];
        let n = self.stream.read(&mut chunk).expect("read");
        assert!(n > 0, "unexpected EOF");
        self.buf.extend_from_slice(&chunk[..n]);
    }

    /// Reads exactly `n` bytes (a response body).
    pub fn read_bytes(&mut self, n: usize) -> Vec<u8> {
        while self.buf.len() < n {
            self.fill();
        }
        self.buf.drain(..n).collect()
    }

    /// Reads one HTTP response: its head, and a body of `Content-Length` bytes.
    pub fn read_response(&mut self) -> (String, Vec<u8>) {
        let head = self.read_head();
        let len = head
            .lines()
            .find_map(|l| {
                let (name, value) = l.split_once(':')?;
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse::<usize>().ok())?
            })
            .unwrap_or(0);
        (head, self.read_bytes(len))
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    pub fn send_frame(&mut self, fin: bool, opcode: u8, payload: &[u8]) {
        self.send(&masked_frame(fin, opcode, payload));
    }

    pub fn read_frame(&mut self) -> Frame {
        loop {
            if let Some((frame, used)) = parse_frame(&self.buf) {
                self.buf.drain(..used);
                return frame;
            }
            self.fill();
        }
    }

    /// Reads frames until a close frame, returning its code.
    pub fn read_close(&mut self) -> Option<u16> {
        loop {
            let frame = self.read_frame();
            if frame.opcode == 8 {
                return frame.close_code();
            }
        }
    }

    /// Whether the server closed TCP (EOF) within the read timeout.
    pub fn sees_eof(&mut self) -> bool {
        let mut chunk = [0u8; 4096];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
    }
}

/// Parses one unmasked server frame.
pub fn parse_frame(buf: &[u8]) -> Option<(Frame, usize)> {
    if buf.len() < 2 {
        return None;
    }
    assert_eq!(buf[1] & 0x80, 0, "server frames are never masked");
    let (len, mut pos) = match buf[1] & 0x7f {
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
    let payload = buf.get(pos..pos + len)?.to_vec();
    pos += len;
    let frame = Frame {
        fin: buf[0] & 0x80 != 0,
        rsv1: buf[0] & 0x40 != 0,
        opcode: buf[0] & 0x0f,
        payload,
    };
    Some((frame, pos))
}
