//! Fuzzes a whole server connection, runtime included: one in-process server (one shard,
//! small limits) started lazily, and per input a loopback TCP connection that completes the
//! handshake, then sends the input's bytes and half-closes.
//!
//! The first input byte picks the mode: bit 0 offers permessage-deflate; bit 1 frames the
//! rest (`b0, len, payload...` records become masked frames, so the fuzzer reaches message
//! logic without learning masking); otherwise the rest is sent raw. Asserted on every input:
//! - the server answers 101, then only complete, unmasked server frames, nothing after a
//!   close frame, and closes TCP within 5 s of our FIN (no hang, no crash);
//! - every 64 inputs, a fresh client gets an echo and the server's connection count returns
//!   to zero (the shard still serves and frees every connection).
#![no_main]

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use ringsock::proto::handshake::Request;
use ringsock::server::{Builder, Decision, Handler, Message, ServerHandle, Upgrade, Ws};

struct Echo;

impl Handler for Echo {
    type State = ();

    fn on_upgrade(&self, _: &Request<'_>, _: &mut Upgrade<()>) -> Decision<()> {
        Decision::Accept(())
    }

    fn on_message(&self, ws: &mut Ws<'_, ()>, msg: Message<'_>) {
        ws.send(msg);
    }
}

fn server() -> &'static ServerHandle {
    static SERVER: OnceLock<ServerHandle> = OnceLock::new();
    SERVER.get_or_init(|| {
        Builder::new()
            .addr("127.0.0.1:0")
            .shards(1)
            .pin_threads(false)
            .max_frame_size(64 * 1024)
            .max_message_size(256 * 1024)
            .handshake_timeout(Duration::from_secs(2))
            .idle_timeout(None, false)
            .close_timeout(Duration::from_millis(500))
            .build(Echo)
            .start()
            .expect("fuzz server starts")
    })
}

const MASK: [u8; 4] = [0x12, 0x34, 0x56, 0x78];

/// Turns `b0, len, payload...` records into masked frames (lengths 126/127 take 2/8 more
/// bytes as the wire does; the payload is cut to what the input holds).
fn frame_records(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let [b0, len, rest @ ..] = data {
        let (len, rest) = match len & 0x7f {
            126 if rest.len() >= 2 => (
                usize::from(u16::from_be_bytes([rest[0], rest[1]])),
                &rest[2..],
            ),
            127 if rest.len() >= 2 => (
                usize::from(u16::from_be_bytes([rest[0], rest[1]])) * 4,
                &rest[2..],
            ),
            n => (usize::from(n.min(125)), rest),
        };
        let payload = &rest[..len.min(rest.len())];
        out.push(*b0);
        match payload.len() {
            n if n < 126 => out.push(0x80 | n as u8),
            n if n < 65536 => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&MASK);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ MASK[i % 4]));
        data = &rest[payload.len()..];
    }
    out
}

fn connect(addr: SocketAddr, deflate: bool) -> (TcpStream, Vec<u8>) {
    let mut stream = TcpStream::connect(addr).expect("server accepts");
    stream.set_nodelay(true).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream
        .set_write_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let extension = if deflate {
        "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
    } else {
        ""
    };
    let request = format!(
        "GET / HTTP/1.1\r\nHost: fuzz\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extension}\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .expect("send the request");
    let mut received = Vec::new();
    let mut chunk = [0u8; 4096];
    let end = loop {
        if let Some(end) = received.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
        let n = stream.read(&mut chunk).expect("response head");
        assert!(n > 0, "EOF before the response head");
        received.extend_from_slice(&chunk[..n]);
    };
    assert!(received.starts_with(b"HTTP/1.1 101 "), "not upgraded");
    (stream, received.split_off(end))
}

/// Checks the server's bytes: complete unmasked frames, nothing after a close. After a reset
/// the tail may be missing.
fn check_output(bytes: &[u8], reset: bool) {
    let mut pos = 0;
    while pos < bytes.len() {
        let rest = &bytes[pos..];
        let header_len = match rest.get(1).map(|b| b & 0x7f) {
            Some(126) => 4,
            Some(127) => 10,
            Some(_) => 2,
            None => 2,
        };
        if reset && rest.len() < header_len {
            return;
        }
        assert!(rest.len() >= header_len, "truncated frame header");
        assert_eq!(rest[1] & 0x80, 0, "server frames are never masked");
        let (len, header) = match rest[1] & 0x7f {
            126 => (u64::from(u16::from_be_bytes([rest[2], rest[3]])), 4),
            127 => (u64::from_be_bytes(rest[2..10].try_into().unwrap()), 10),
            n => (u64::from(n), 2),
        };
        let end = pos + header + len as usize;
        if reset && end > bytes.len() {
            return;
        }
        assert!(end <= bytes.len(), "truncated frame");
        pos = end;
        if rest[0] & 0x0f == 8 {
            assert_eq!(pos, bytes.len(), "bytes after the close frame");
        }
    }
}

/// A fresh client is echoed and the connection count returns to zero.
fn check_liveness(handle: &ServerHandle) {
    let (mut stream, rest) = connect(handle.local_addr(), false);
    assert!(rest.is_empty());
    let mut frame = vec![0x82, 0x84];
    frame.extend_from_slice(&MASK);
    frame.extend(b"live".iter().enumerate().map(|(i, b)| b ^ MASK[i % 4]));
    stream.write_all(&frame).unwrap();
    let mut echo = [0u8; 6];
    stream.read_exact(&mut echo).expect("echo");
    assert_eq!(&echo, b"\x82\x04live");
    drop(stream);
    let deadline = Instant::now() + Duration::from_secs(5);
    while handle.stats().total_connections() != 0 {
        assert!(
            Instant::now() < deadline,
            "connections not freed: {:?}",
            handle.stats()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

fuzz_target!(|data: &[u8]| {
    static INPUTS: AtomicU64 = AtomicU64::new(0);
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let handle = server();
    let (mut stream, mut received) = connect(handle.local_addr(), mode & 1 == 1);
    let bytes = if mode & 2 == 2 {
        frame_records(rest)
    } else {
        rest.to_vec()
    };
    // The server may fail the connection and stop reading early: writes may fail.
    let _ = stream.write_all(&bytes);
    let _ = stream.shutdown(Shutdown::Write);
    let started = Instant::now();
    let mut chunk = [0u8; 65536];
    let reset = loop {
        match stream.read(&mut chunk) {
            Ok(0) => break false,
            Ok(n) => received.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break true,
            Err(e) => panic!("no EOF {:?} after our FIN: {e}", started.elapsed()),
        }
    };
    check_output(&received, reset);
    if INPUTS.fetch_add(1, Ordering::Relaxed).is_multiple_of(64) {
        check_liveness(handle);
    }
});
