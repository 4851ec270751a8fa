//! Behaviour the runtime rewrite must provide, pinned down against the public API:
//!
//! * **Handler panics are isolated.** A panic in any callback affects only its connection: a
//!   WebSocket gets close 1011 (a panic in `on_close` lets the close in progress complete), an
//!   HTTP request a `500`. The shard keeps serving its other connections and new ones, and
//!   frees the panicking one.
//! * **Messages around close are delivered.** Messages that arrive after our close frame
//!   (asked for by the handler, the idle timeout or a graceful shutdown) but before the peer's
//!   close still reach `on_message`, all of them before `on_close`.
//! * **A `Remote` outlives its connection harmlessly.** It never reaches a later connection
//!   that reuses the slot.
//!
//! Per-server signal handling is tested in `tests/signals.rs` (signals are process-wide).
//! Every wait is bounded, so a shard that dies or stalls fails a test instead of hanging it.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::ops::Deref;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{masked_frame, parse_frame, wait_for, Frame, Probe, TestHandler};
use ringsock::proto::handshake::Request;
use ringsock::proto::CloseCode;
use ringsock::server::{
    Builder, Decision, Handler, HttpResponse, Message, SendStatus, ServerHandle, Upgrade, Ws,
};

/// How long a client waits for any one answer.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Messages the client pipelines around a close.
const PIPELINED: usize = 50;

/// A running server, shut down when dropped (so a failing test stops its server too).
struct Running(ServerHandle);

impl Deref for Running {
    type Target = ServerHandle;

    fn deref(&self) -> &ServerHandle {
        &self.0
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.shutdown();
    }
}

/// Starts `handler` on 127.0.0.1:0, unpinned, with the builder's other settings.
fn serve<H: Handler>(builder: Builder, handler: H) -> Running {
    let handle = builder
        .addr("127.0.0.1:0")
        .pin_threads(false)
        .build(handler)
        .start()
        .expect("server starts");
    Running(handle)
}

/// A raw WebSocket client (hand-built masked frames) whose reads fail after
/// [`READ_TIMEOUT`] with a message naming what it waited for.
struct Client {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Client {
    /// Connects without a handshake.
    fn connect(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect(addr).expect("connect");
        stream.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
        stream.set_nodelay(true).unwrap();
        Client {
            stream,
            buf: Vec::new(),
        }
    }

    /// Sends an upgrade request for `path` and returns the response head.
    fn request(&mut self, path: &str) -> String {
        self.send(
            format!(
                "GET {path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n\
                 Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
                 Sec-WebSocket-Version: 13\r\n\r\n"
            )
            .as_bytes(),
        );
        self.read_head(&format!("the answer to the upgrade of {path}"))
    }

    /// Connects and completes the opening handshake for `path`.
    fn open(addr: SocketAddr, path: &str) -> Client {
        let mut client = Client::connect(addr);
        let head = client.request(path);
        assert!(head.starts_with("HTTP/1.1 101"), "upgrade refused: {head}");
        client
    }

    fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("write to the server");
    }

    fn send_frame(&mut self, fin: bool, opcode: u8, payload: &[u8]) {
        self.send(&masked_frame(fin, opcode, payload));
    }

    /// Sends a close frame with this code and reason.
    fn send_close(&mut self, code: u16, reason: &str) {
        let mut payload = code.to_be_bytes().to_vec();
        payload.extend_from_slice(reason.as_bytes());
        self.send_frame(true, 8, &payload);
    }

    fn fill(&mut self, what: &str) {
        let mut chunk = [0u8; 65536];
        match self.stream.read(&mut chunk) {
            Ok(0) => panic!("connection closed while waiting for {what}"),
            Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                panic!("nothing within {READ_TIMEOUT:?} while waiting for {what}")
            }
            Err(e) => panic!("{e} while waiting for {what}"),
        }
    }

    fn read_head(&mut self, what: &str) -> String {
        loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head: Vec<u8> = self.buf.drain(..end + 4).collect();
                return String::from_utf8(head).expect("an ASCII response head");
            }
            self.fill(what);
        }
    }

    fn read_frame(&mut self, what: &str) -> Frame {
        loop {
            if let Some((frame, used)) = parse_frame(&self.buf) {
                self.buf.drain(..used);
                return frame;
            }
            self.fill(what);
        }
    }

    /// Reads frames until a close frame and returns its code (0 for none).
    fn read_close(&mut self, what: &str) -> u16 {
        loop {
            let frame = self.read_frame(what);
            if frame.opcode == 8 {
                return frame.close_code().unwrap_or(0);
            }
        }
    }

    /// Sends a text message and checks that the next frame is its echo.
    fn echo(&mut self, text: &str) {
        self.send_frame(true, 1, text.as_bytes());
        let frame = self.read_frame(&format!("the echo of {text:?}"));
        assert_eq!(
            (frame.opcode, frame.payload.as_slice()),
            (1, text.as_bytes()),
            "expected the echo of {text:?}, got {frame:?}"
        );
    }

    /// Reads until the server closes TCP.
    fn expect_eof(&mut self, what: &str) {
        let mut chunk = [0u8; 4096];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => return,
                Ok(_) => continue,
                Err(e) if e.kind() == ErrorKind::ConnectionReset => return,
                Err(e) => panic!("{e} while waiting for {what}"),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Handler panics are isolated.
// ---------------------------------------------------------------------------------------

/// Which callbacks panicked, in order.
type Panics = Arc<Mutex<Vec<&'static str>>>;

/// Echoes, and panics where a test asks it to: `on_upgrade` for `/boom-upgrade`, `on_http`
/// for `/boom-http`, `on_open` for `/boom-open`, `on_drain` for `/boom-drain` (whose
/// `on_open` floods the output over the high-water mark), `on_message` for the text `boom`,
/// `on_fragment` for a streamed message starting with `boom`, and `on_close` for the close
/// reason `boom`. Every other connection is served normally.
struct Boom {
    panics: Panics,
}

impl Boom {
    fn panic(&self, callback: &'static str) -> ! {
        self.panics.lock().unwrap().push(callback);
        panic!("test panic in {callback}");
    }
}

impl Handler for Boom {
    /// The request path.
    type State = String;

    fn on_upgrade(&self, req: &Request<'_>, _upgrade: &mut Upgrade<String>) -> Decision<String> {
        if req.path() == "/boom-upgrade" {
            self.panic("on_upgrade");
        }
        Decision::Accept(req.path().to_owned())
    }

    fn on_open(&self, ws: &mut Ws<'_, String>) {
        match ws.state().as_str() {
            "/boom-open" => self.panic("on_open"),
            "/boom-drain" => {
                for _ in 0..64 {
                    ws.send_binary(&[7u8; 16 * 1024]);
                }
            }
            _ => {}
        }
    }

    fn on_message(&self, ws: &mut Ws<'_, String>, msg: Message<'_>) {
        if msg == Message::Text("boom") {
            self.panic("on_message");
        }
        ws.send(msg);
    }

    fn on_fragment(
        &self,
        _ws: &mut Ws<'_, String>,
        _text: bool,
        data: &[u8],
        first: bool,
        _last: bool,
    ) {
        if first && data.starts_with(b"boom") {
            self.panic("on_fragment");
        }
    }

    fn on_drain(&self, ws: &mut Ws<'_, String>) {
        if ws.state() == "/boom-drain" {
            self.panic("on_drain");
        }
    }

    fn on_close(&self, _ws: &mut Ws<'_, String>, _code: Option<CloseCode>, reason: &str) {
        if reason == "boom" {
            self.panic("on_close");
        }
    }

    fn on_http(&self, req: &Request<'_>) -> Option<HttpResponse> {
        if req.path() == "/boom-http" {
            self.panic("on_http");
        }
        None
    }
}

/// A two-shard [`Boom`] server (messages streamed, a 16 KiB high-water mark) and eight
/// connections opened before anything panics, likely spread over both shards.
fn start_boom() -> (Running, Panics, Vec<Client>) {
    let panics = Panics::default();
    let server = serve(
        Builder::new()
            .shards(2)
            .stream_messages(true)
            .high_water_mark(16 * 1024)
            .close_timeout(Duration::from_secs(2)),
        Boom {
            panics: Arc::clone(&panics),
        },
    );
    let bystanders = (0..8)
        .map(|_| Client::open(server.local_addr(), "/"))
        .collect();
    (server, panics, bystanders)
}

/// Waits until `callback` has panicked (proves the trigger worked).
fn wait_panicked(panics: &Panics, callback: &str) {
    wait_for(5, &format!("{callback} to panic"), || {
        panics.lock().unwrap().contains(&callback)
    });
}

/// Reads the 1011 close a connection gets after its handler panicked, and answers it.
fn expect_internal_error_close(mut victim: Client, callback: &str) {
    let what = format!("close 1011 after the panic in {callback}");
    assert_eq!(victim.read_close(&what), 1011, "{what}");
    victim.send_close(1011, "");
}

/// The server took no harm: the connections opened before the panic still echo, 200 new
/// connections each complete an echo, and every connection is freed afterwards.
fn assert_still_serving(server: &Running, bystanders: Vec<Client>) {
    for (i, mut client) in bystanders.into_iter().enumerate() {
        client.echo(&format!("bystander {i} still here"));
    }
    for i in 0..200 {
        Client::open(server.local_addr(), "/").echo(&format!("new connection {i}"));
    }
    wait_for(10, "every connection to be freed", || {
        server.stats().total_connections() == 0
    });
}

#[test]
fn panic_in_on_message_closes_only_that_connection_with_1011() {
    let (server, panics, bystanders) = start_boom();
    let mut victim = Client::open(server.local_addr(), "/");
    victim.send_frame(true, 1, b"boom");
    wait_panicked(&panics, "on_message");
    expect_internal_error_close(victim, "on_message");
    assert_still_serving(&server, bystanders);
}

#[test]
fn panic_in_on_open_closes_only_that_connection_with_1011() {
    let (server, panics, bystanders) = start_boom();
    let mut victim = Client::connect(server.local_addr());
    let head = victim.request("/boom-open");
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    wait_panicked(&panics, "on_open");
    expect_internal_error_close(victim, "on_open");
    assert_still_serving(&server, bystanders);
}

#[test]
fn panic_in_on_fragment_closes_only_that_connection_with_1011() {
    let (server, panics, bystanders) = start_boom();
    let mut victim = Client::open(server.local_addr(), "/");
    // The first frame of a message whose rest never comes: streamed to on_fragment.
    victim.send_frame(false, 1, b"boom, the first half");
    wait_panicked(&panics, "on_fragment");
    expect_internal_error_close(victim, "on_fragment");
    assert_still_serving(&server, bystanders);
}

#[test]
fn panic_in_on_drain_closes_only_that_connection_with_1011() {
    let (server, panics, bystanders) = start_boom();
    // on_open queues 1 MiB over a 16 KiB mark; on_drain fires (and panics) as it drains.
    let victim = Client::open(server.local_addr(), "/boom-drain");
    expect_internal_error_close(victim, "on_drain");
    wait_panicked(&panics, "on_drain");
    assert_still_serving(&server, bystanders);
}

#[test]
fn panic_in_on_close_lets_the_closing_handshake_complete() {
    let (server, panics, bystanders) = start_boom();
    let mut victim = Client::open(server.local_addr(), "/");
    victim.send_close(1000, "boom");
    wait_panicked(&panics, "on_close");
    assert_eq!(victim.read_close("the echo of our close"), 1000);
    victim.expect_eof("TCP close after the closing handshake");
    drop(victim);
    assert_still_serving(&server, bystanders);
}

#[test]
fn panic_in_on_upgrade_answers_500() {
    let (server, panics, bystanders) = start_boom();
    let mut victim = Client::connect(server.local_addr());
    let head = victim.request("/boom-upgrade");
    wait_panicked(&panics, "on_upgrade");
    assert!(head.starts_with("HTTP/1.1 500"), "{head}");
    drop(victim);
    assert_still_serving(&server, bystanders);
}

#[test]
fn panic_in_on_http_answers_500() {
    let (server, panics, bystanders) = start_boom();
    let mut victim = Client::connect(server.local_addr());
    victim.send(b"GET /boom-http HTTP/1.1\r\nHost: localhost\r\n\r\n");
    let head = victim.read_head("the answer to GET /boom-http");
    wait_panicked(&panics, "on_http");
    assert!(head.starts_with("HTTP/1.1 500"), "{head}");
    drop(victim);
    assert_still_serving(&server, bystanders);
}

// ---------------------------------------------------------------------------------------
// Messages around close are delivered.
// ---------------------------------------------------------------------------------------

/// What a [`Recorder`] saw.
#[derive(Default)]
struct Log {
    messages: Mutex<Vec<String>>,
    /// How many messages had arrived when `on_close` ran.
    at_close: Mutex<Option<usize>>,
}

/// Records every text message; `close-me` makes it close the connection (1000).
struct Recorder {
    log: Arc<Log>,
}

impl Handler for Recorder {
    type State = ();

    fn on_upgrade(&self, _req: &Request<'_>, _upgrade: &mut Upgrade<()>) -> Decision<()> {
        Decision::Accept(())
    }

    fn on_message(&self, ws: &mut Ws<'_, ()>, msg: Message<'_>) {
        if let Message::Text(text) = msg {
            self.log.messages.lock().unwrap().push(text.to_owned());
            if text == "close-me" {
                ws.close(CloseCode::NORMAL, "asked to");
            }
        }
    }

    fn on_close(&self, _ws: &mut Ws<'_, ()>, _code: Option<CloseCode>, _reason: &str) {
        let seen = self.log.messages.lock().unwrap().len();
        *self.log.at_close.lock().unwrap() = Some(seen);
    }
}

/// A one-shard [`Recorder`] server with `builder`'s timeouts.
fn start_recorder(builder: Builder) -> (Running, Arc<Log>) {
    let log = Arc::new(Log::default());
    let server = serve(
        builder.shards(1),
        Recorder {
            log: Arc::clone(&log),
        },
    );
    (server, log)
}

/// The [`PIPELINED`] messages a client writes around the close: their texts, and their
/// frames back to back for one write.
fn pipelined() -> (Vec<String>, Vec<u8>) {
    let texts: Vec<String> = (0..PIPELINED).map(|i| format!("message {i}")).collect();
    let frames = texts
        .iter()
        .flat_map(|text| masked_frame(true, 1, text.as_bytes()))
        .collect();
    (texts, frames)
}

/// Reads the server's close (expecting `code`), answers it, and checks that `on_message`
/// got exactly `expected`, in order, all before `on_close`.
fn finish_close_and_check(client: &mut Client, code: u16, log: &Log, expected: &[String]) {
    assert_eq!(
        client.read_close(&format!("the server's close {code}")),
        code
    );
    client.send_close(code, "");
    wait_for(5, "on_close", || log.at_close.lock().unwrap().is_some());
    let at_close = log.at_close.lock().unwrap().unwrap();
    let messages = log.messages.lock().unwrap().clone();
    assert_eq!(
        at_close,
        expected.len(),
        "on_close came after {at_close} of {} messages (received: {messages:?})",
        expected.len()
    );
    assert_eq!(messages, expected);
}

#[test]
fn messages_pipelined_behind_a_handler_close_reach_on_message_before_on_close() {
    let (server, log) = start_recorder(Builder::new().close_timeout(Duration::from_secs(5)));
    let mut client = Client::open(server.local_addr(), "/");
    let (texts, frames) = pipelined();
    let mut burst = masked_frame(true, 1, b"close-me");
    burst.extend_from_slice(&frames);
    client.send(&burst);
    let mut expected = vec!["close-me".to_owned()];
    expected.extend(texts);
    finish_close_and_check(&mut client, 1000, &log, &expected);
}

#[test]
fn messages_sent_after_an_idle_timeout_close_reach_on_message_before_on_close() {
    let (server, log) = start_recorder(
        Builder::new()
            .idle_timeout(Some(Duration::from_millis(300)), false)
            .close_timeout(Duration::from_secs(5)),
    );
    let mut client = Client::open(server.local_addr(), "/");
    // Idle past the timeout without reading: the server's 1001 close is on its way.
    std::thread::sleep(Duration::from_secs(1));
    let (texts, frames) = pipelined();
    client.send(&frames);
    finish_close_and_check(&mut client, 1001, &log, &texts);
}

#[test]
fn messages_sent_during_graceful_shutdown_reach_on_message_before_on_close() {
    let (server, log) = start_recorder(Builder::new().close_timeout(Duration::from_secs(5)));
    let mut client = Client::open(server.local_addr(), "/");
    server.request_shutdown();
    std::thread::sleep(Duration::from_millis(200));
    let (texts, frames) = pipelined();
    client.send(&frames);
    finish_close_and_check(&mut client, 1001, &log, &texts);
}

// ---------------------------------------------------------------------------------------
// A Remote outlives its connection harmlessly.
// ---------------------------------------------------------------------------------------

#[test]
fn remote_of_a_closed_connection_does_not_reach_the_next_one_in_its_slot() {
    let probe = Arc::new(Probe::default());
    // Each reuse moves the slot's generation by 2^24, as 2^24 reuses would: a 24-bit
    // generation would make the second connection's identity equal the first one's.
    let server = serve(
        Builder::new()
            .shards(1)
            .close_timeout(Duration::from_secs(2))
            .configure(|c| c.testing.generation_stride = 1 << 24),
        TestHandler {
            probe: Arc::clone(&probe),
        },
    );
    let mut first = Client::open(server.local_addr(), "/");
    wait_for(5, "the first open", || {
        probe.opens.load(Ordering::SeqCst) == 1
    });
    let stale = probe.remotes.lock().unwrap()[0].clone();
    first.send_close(1000, "");
    assert_eq!(first.read_close("the echo of our close"), 1000);
    first.expect_eof("TCP close after the closing handshake");
    drop(first);
    wait_for(5, "the first connection to be freed", || {
        server.stats().total_connections() == 0
    });
    // One shard and no other connection: the second takes the first one's slot.
    let mut second = Client::open(server.local_addr(), "/");
    wait_for(5, "the second open", || {
        probe.opens.load(Ordering::SeqCst) == 2
    });
    assert_eq!(stale.send_text("leak"), SendStatus::Closed);
    assert_eq!(
        stale.close(CloseCode(4000), "stale close"),
        SendStatus::Closed
    );
    std::thread::sleep(Duration::from_millis(500));
    // The stale requests were handled long before this echo: it must be the first frame.
    second.echo("only this");
}
