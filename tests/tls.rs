//! wss:// end to end: a real TLS client (rustls in blocking mode, the frame helpers of
//! `tests/common`) against a self-signed certificate made in the test. Echo at every size,
//! fragmented and compressed; TLS 1.2 and 1.3 with ALPN; the closing handshake ending in
//! `close_notify` before the FIN; clients that misbehave at the TLS layer (plain HTTP, garbage
//! records, stalled handshakes, a dropped socket); a thousand connections at once; a plain and
//! a TLS listener in one server; `TlsConfig::from_pem_files` errors; metrics.

mod common;

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use common::{builder, masked_frame, parse_frame, start, wait_for, wait_idle, Frame, RawClient};
use ringsock::server::{Builder, Message, ServerHandle, TlsConfig};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{
    ClientConfig, ClientConnection, RootCertStore, StreamOwned, SupportedProtocolVersion,
};

/// The test's certificate authority of one: a self-signed certificate for `localhost`, its
/// key, and both as PEM files in a directory of the test's own.
struct Pki {
    cert: CertificateDer<'static>,
    cert_pem: String,
    key_pem: String,
    dir: PathBuf,
}

impl Pki {
    fn cert_file(&self) -> PathBuf {
        self.dir.join("cert.pem")
    }

    fn key_file(&self) -> PathBuf {
        self.dir.join("key.pem")
    }
}

/// Made once per test binary and shared by its tests; the PEM files go to a directory of this
/// process under Cargo's temporary directory for integration tests.
fn pki() -> &'static Pki {
    static PKI: OnceLock<Pki> = OnceLock::new();
    PKI.get_or_init(|| {
        let rcgen::CertifiedKey { cert, signing_key } =
            rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("certificate");
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("tls-certificate-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temporary directory");
        let pki = Pki {
            cert: cert.der().clone(),
            cert_pem: cert.pem(),
            key_pem: signing_key.serialize_pem(),
            dir,
        };
        std::fs::write(pki.cert_file(), &pki.cert_pem).expect("write the certificate");
        std::fs::write(pki.key_file(), &pki.key_pem).expect("write the key");
        pki
    })
}

/// The server side: the test certificate through `TlsConfig::from_pem_files`.
fn tls_config() -> TlsConfig {
    let pki = pki();
    TlsConfig::from_pem_files(pki.cert_file(), pki.key_file()).expect("TLS config")
}

/// A TLS server with the test handler on 127.0.0.1:0.
fn start_tls(builder: Builder) -> (ServerHandle, Arc<common::Probe>) {
    start(builder.tls(tls_config()))
}

/// A client configuration trusting only the test certificate, offering ALPN `http/1.1`.
fn client_config(versions: &[&'static SupportedProtocolVersion]) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots.add(pki().cert.clone()).expect("root certificate");
    let mut config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(versions)
            .expect("protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

/// Both versions, shared (so later connections may resume a session).
fn default_client_config() -> Arc<ClientConfig> {
    static CONFIG: OnceLock<Arc<ClientConfig>> = OnceLock::new();
    Arc::clone(
        CONFIG.get_or_init(|| client_config(&[&rustls::version::TLS13, &rustls::version::TLS12])),
    )
}

/// A scripted WebSocket client over TLS: blocking rustls on a TCP socket, frames built and
/// parsed by `tests/common`.
struct TlsClient {
    tls: StreamOwned<ClientConnection, TcpStream>,
    buf: Vec<u8>,
}

impl TlsClient {
    /// Connects and completes the TLS handshake, without the WebSocket upgrade.
    fn connect_tls(addr: SocketAddr, config: Arc<ClientConfig>) -> TlsClient {
        let sock = TcpStream::connect(addr).expect("connect");
        sock.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        sock.set_nodelay(true).unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        let conn = ClientConnection::new(config, name).expect("client connection");
        let mut tls = StreamOwned::new(conn, sock);
        while tls.conn.is_handshaking() {
            tls.conn.complete_io(&mut tls.sock).expect("TLS handshake");
        }
        TlsClient {
            tls,
            buf: Vec::new(),
        }
    }

    /// Connects, completes the TLS handshake and the WebSocket upgrade.
    fn connect(addr: SocketAddr) -> TlsClient {
        let mut c = TlsClient::connect_tls(addr, default_client_config());
        let head = c.request("/", "");
        assert!(head.starts_with("HTTP/1.1 101"), "handshake failed: {head}");
        c
    }

    /// Sends an upgrade request with extra header lines and returns the response head.
    fn request(&mut self, path: &str, extra: &str) -> String {
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Version: 13\r\n{extra}\r\n"
        );
        self.send(req.as_bytes());
        self.read_head()
    }

    /// Reads an HTTP response head (what follows it stays buffered).
    fn read_head(&mut self) -> String {
        loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head: Vec<u8> = self.buf.drain(..end + 4).collect();
                return String::from_utf8(head).unwrap();
            }
            self.fill();
        }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.tls.write_all(bytes).expect("TLS write");
        self.tls.flush().expect("TLS flush");
    }

    fn send_frame(&mut self, fin: bool, opcode: u8, payload: &[u8]) {
        self.send(&masked_frame(fin, opcode, payload));
    }

    fn fill(&mut self) {
        let mut chunk = vec![0u8; 1 << 16];
        let n = self.tls.read(&mut chunk).expect("TLS read");
        assert!(n > 0, "unexpected end of the TLS stream");
        self.buf.extend_from_slice(&chunk[..n]);
    }

    fn read_frame(&mut self) -> Frame {
        loop {
            if let Some((frame, used)) = parse_frame(&self.buf) {
                self.buf.drain(..used);
                return frame;
            }
            self.fill();
        }
    }

    /// Reads one whole message (its frames until FIN): the first frame's opcode and RSV1, and
    /// the payload.
    fn read_message(&mut self) -> (u8, bool, Vec<u8>) {
        let first = self.read_frame();
        let (opcode, rsv1, mut payload) = (first.opcode, first.rsv1, first.payload);
        let mut fin = first.fin;
        while !fin {
            let next = self.read_frame();
            assert_eq!(next.opcode, 0, "a continuation frame");
            payload.extend_from_slice(&next.payload);
            fin = next.fin;
        }
        (opcode, rsv1, payload)
    }

    /// Reads frames until a close frame, returning its code.
    fn read_close(&mut self) -> Option<u16> {
        loop {
            let frame = self.read_frame();
            if frame.opcode == 8 {
                return frame.close_code();
            }
        }
    }

    /// Reads to the end of the TLS stream: `Ok` if it ended with the server's `close_notify`
    /// (rustls reports a clean EOF), the read error otherwise (`UnexpectedEof` for a FIN
    /// without `close_notify`, an alert, a timeout).
    fn read_tls_end(&mut self) -> io::Result<()> {
        let mut chunk = [0u8; 4096];
        loop {
            match self.tls.read(&mut chunk) {
                Ok(0) => return Ok(()),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) => return Err(e),
            }
        }
    }

    /// After the TLS stream ended: whether the TCP stream ends too (the FIN follows the
    /// `close_notify`), within the read timeout.
    fn sees_tcp_eof(&mut self) -> bool {
        let mut chunk = [0u8; 4096];
        loop {
            match self.tls.sock.read(&mut chunk) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) => return e.kind() == io::ErrorKind::ConnectionReset,
            }
        }
    }
}

/// A payload of `len` bytes: ASCII for text, every byte value for binary.
fn payload(len: usize, text: bool) -> Vec<u8> {
    if text {
        (0..len).map(|i| b'a' + (i % 26) as u8).collect()
    } else {
        (0..len).map(|i| (i * 31 + i / 251) as u8).collect()
    }
}

/// Bytes that are not a valid TLS record (a small xorshift: no `rand` needed).
fn noise(len: usize, mut seed: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed as u8
        })
        .collect()
}

/// Reads a raw TCP socket until EOF, a reset or its read timeout; returns what came and
/// whether it ended (rather than timed out).
fn drain_raw(stream: &mut TcpStream) -> (Vec<u8>, bool) {
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => return (got, true),
            Ok(n) => got.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return (got, true),
            Err(_) => return (got, false),
        }
    }
}

/// Echoes one message of each kind on a fresh connection, proving the server still serves.
fn assert_serves(addr: SocketAddr) {
    let mut c = TlsClient::connect(addr);
    c.send_frame(true, 1, b"still here");
    assert_eq!(c.read_message(), (1, false, b"still here".to_vec()));
    c.send_frame(true, 8, &1000u16.to_be_bytes());
    assert_eq!(c.read_close(), Some(1000));
}

#[test]
fn echoes_every_size_over_tls_on_two_shards() {
    let (handle, _) = start_tls(builder().shards(2));
    let sizes = [0, 1, 125, 126, 65535, 65536, 1 << 20, 16 << 20];
    let mut shards = std::collections::BTreeSet::new();
    for text in [true, false] {
        for &size in &sizes {
            // A connection per message, so both shards take some.
            let mut c = TlsClient::connect(handle.local_addr());
            c.send_frame(true, 1, b"cmd:shard");
            let (_, _, shard) = c.read_message();
            shards.insert(String::from_utf8(shard).unwrap());
            let data = payload(size, text);
            let opcode = if text { 1 } else { 2 };
            c.send_frame(true, opcode, &data);
            let (got_opcode, rsv1, got) = c.read_message();
            assert_eq!((got_opcode, rsv1), (opcode, false), "size {size}");
            assert!(got == data, "echo of {size} bytes (text {text}) differs");
            c.send_frame(true, 8, &1000u16.to_be_bytes());
            assert_eq!(c.read_close(), Some(1000));
            c.read_tls_end().expect("close_notify");
        }
    }
    assert_eq!(shards.len(), 2, "both shards served: {shards:?}");
    wait_idle(&handle);
    handle.shutdown().expect("clean shutdown");
}

#[test]
fn echoes_fragmented_messages_over_tls() {
    let (handle, _) = start_tls(builder());
    let mut c = TlsClient::connect(handle.local_addr());
    // A text message in three frames with a ping between them (RFC 6455 §5.4: control
    // frames may be injected in the middle of a fragmented message).
    c.send_frame(false, 1, b"frag");
    c.send_frame(false, 0, b"men");
    c.send_frame(true, 9, b"mid");
    c.send_frame(true, 0, b"ted");
    let pong = c.read_frame();
    assert_eq!((pong.opcode, pong.payload.as_slice()), (10, &b"mid"[..]));
    assert_eq!(c.read_message(), (1, false, b"fragmented".to_vec()));
    // A binary message of 1 MiB in fragments of 100 000 bytes, each across several records.
    let data = payload(1 << 20, false);
    let pieces: Vec<&[u8]> = data.chunks(100_000).collect();
    for (i, piece) in pieces.iter().enumerate() {
        let opcode = if i == 0 { 2 } else { 0 };
        c.send_frame(i + 1 == pieces.len(), opcode, piece);
    }
    let (opcode, _, got) = c.read_message();
    assert_eq!(opcode, 2);
    assert!(got == data, "the fragmented binary message is echoed whole");
    // Empty fragments, empty message.
    c.send_frame(false, 1, b"");
    c.send_frame(true, 0, b"");
    assert_eq!(c.read_message(), (1, false, Vec::new()));
    c.send_frame(true, 8, &1000u16.to_be_bytes());
    assert_eq!(c.read_close(), Some(1000));
    handle.shutdown().expect("clean shutdown");
}

/// A permessage-deflate payload (RFC 7692 §7.2.1): raw deflate, sync flushed, the trailing
/// `00 00 ff ff` removed.
fn deflate(data: &[u8]) -> Vec<u8> {
    let mut compress = flate2::Compress::new(flate2::Compression::default(), false);
    let mut out = Vec::with_capacity(data.len() + 1024);
    let status = compress
        .compress_vec(data, &mut out, flate2::FlushCompress::Sync)
        .expect("deflate");
    assert_eq!(status, flate2::Status::Ok);
    assert_eq!(
        compress.total_in(),
        data.len() as u64,
        "all input compressed"
    );
    assert!(
        out.ends_with(&[0, 0, 0xff, 0xff]),
        "a sync flush ends the output"
    );
    out.truncate(out.len() - 4);
    out
}

/// Inflates a permessage-deflate payload (RFC 7692 §7.2.2: the tail appended back).
fn inflate(payload: &[u8], len: usize) -> Vec<u8> {
    let mut input = payload.to_vec();
    input.extend_from_slice(&[0, 0, 0xff, 0xff]);
    let mut decompress = flate2::Decompress::new(false);
    let mut out = Vec::with_capacity(len + 1024);
    decompress
        .decompress_vec(&input, &mut out, flate2::FlushDecompress::Sync)
        .expect("inflate");
    out
}

#[test]
fn records_cut_anywhere_and_many_to_a_receive_are_reassembled() {
    let (handle, _) = start_tls(builder());
    let mut c = TlsClient::connect(handle.local_addr());
    // One record of a small frame, written to the socket a few bytes at a time (each piece
    // its own receive: the record waits in the connection's buffer for the rest).
    let mut ciphertext = Vec::new();
    for step in [1, 2, 3, 7, 13] {
        let msg = format!("cut every {step} bytes");
        c.tls
            .conn
            .writer()
            .write_all(&masked_frame(true, 1, msg.as_bytes()))
            .unwrap();
        ciphertext.clear();
        c.tls.conn.write_tls(&mut ciphertext).unwrap();
        for piece in ciphertext.chunks(step) {
            c.tls.sock.write_all(piece).unwrap();
            thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(c.read_message().2, msg.as_bytes());
    }
    // 200 records of one frame each in one write, the last one cut in two around a pause.
    ciphertext.clear();
    for i in 0..200 {
        let msg = format!("record {i}");
        c.tls
            .conn
            .writer()
            .write_all(&masked_frame(true, 1, msg.as_bytes()))
            .unwrap();
        c.tls.conn.write_tls(&mut ciphertext).unwrap();
    }
    let (head, tail) = ciphertext.split_at(ciphertext.len() - 10);
    c.tls.sock.write_all(head).unwrap();
    thread::sleep(Duration::from_millis(20));
    c.tls.sock.write_all(tail).unwrap();
    for i in 0..200 {
        assert_eq!(c.read_message().2, format!("record {i}").as_bytes());
    }
    // A frame cut across records: each byte of it in a record of its own.
    let frame = masked_frame(true, 2, &payload(300, false));
    for byte in &frame {
        c.tls
            .conn
            .writer()
            .write_all(std::slice::from_ref(byte))
            .unwrap();
        c.tls.conn.write_tls(&mut c.tls.sock).unwrap();
    }
    assert!(c.read_message().2 == payload(300, false));
    handle.shutdown().expect("clean shutdown");
}

#[test]
fn upgrade_request_and_frames_in_one_record_are_all_answered() {
    let (handle, _) = start_tls(builder());
    let mut c = TlsClient::connect_tls(handle.local_addr(), default_client_config());
    let mut bytes = b"GET / HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n\
Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
Sec-WebSocket-Version: 13\r\n\r\n"
        .to_vec();
    bytes.extend(masked_frame(true, 1, b"early"));
    bytes.extend(masked_frame(true, 8, &1000u16.to_be_bytes()));
    c.send(&bytes);
    let head = c.read_head();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert_eq!(c.read_message().2, b"early");
    assert_eq!(c.read_close(), Some(1000));
    c.read_tls_end().expect("close_notify");
    handle.shutdown().expect("clean shutdown");
}

#[test]
fn backpressure_over_tls_holds_input_and_resumes() {
    let (handle, probe) = start_tls(builder());
    let mut c = TlsClient::connect(handle.local_addr());
    // 1.5 MiB of output, over the 1 MiB mark and under the 2 MiB cap, while the client
    // does not read and sends more.
    c.send_frame(true, 1, b"cmd:flood:24:65536");
    for i in 0..50 {
        c.send_frame(true, 1, format!("queued {i}").as_bytes());
    }
    for _ in 0..24 {
        let (opcode, _, data) = c.read_message();
        assert_eq!((opcode, data.len()), (2, 65536));
    }
    for i in 0..50 {
        assert_eq!(c.read_message().2, format!("queued {i}").as_bytes());
    }
    assert!(
        probe.backpressure.load(Ordering::SeqCst) > 0,
        "over the mark"
    );
    assert_eq!(probe.dropped.load(Ordering::SeqCst), 0, "under the cap");
    wait_for(5, "on_drain", || probe.drains.load(Ordering::SeqCst) > 0);
    c.send_frame(true, 8, &1000u16.to_be_bytes());
    assert_eq!(c.read_close(), Some(1000));
    c.read_tls_end().expect("close_notify");
    handle.shutdown().expect("clean shutdown");
}

#[test]
fn key_updates_from_the_client_are_followed() {
    let (handle, _) = start_tls(builder());
    let config = client_config(&[&rustls::version::TLS13]);
    let mut c = TlsClient::connect_tls(handle.local_addr(), config);
    let head = c.request("/", "");
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    for i in 0..5 {
        // A KeyUpdate asking the server to update too (RFC 8446 §4.6.3): its next record
        // must be under new keys, after its own KeyUpdate.
        c.tls.conn.refresh_traffic_keys().expect("key update");
        let msg = format!("after key update {i}");
        c.send_frame(true, 1, msg.as_bytes());
        assert_eq!(c.read_message().2, msg.as_bytes());
    }
    c.send_frame(true, 8, &1000u16.to_be_bytes());
    assert_eq!(c.read_close(), Some(1000));
    c.read_tls_end().expect("close_notify");
    handle.shutdown().expect("clean shutdown");
}

#[test]
fn lingering_publications_over_tls_are_encrypted_when_they_go() {
    // Held in the clear, encrypted once released: by the linger's end (1 s), by a reply (a
    // 30 s linger that only the echo can release in time), and by 64 KiB queued.
    let (handle, _) = start_tls(builder().publish_linger(Duration::from_secs(1)));
    let mut c = TlsClient::connect(handle.local_addr());
    c.send_frame(true, 1, b"cmd:sub:room");
    assert_eq!(c.read_message().2, b"subscribed");
    let big = payload(1024, false);
    let published = Instant::now();
    handle.publish("room", Message::Text("p0"));
    handle.publish("room", Message::Binary(&big));
    assert_eq!(c.read_message().2, b"p0");
    assert!(c.read_message().2 == big, "the 1 KiB publication");
    assert!(
        published.elapsed() >= Duration::from_secs(1),
        "held for the linger"
    );
    handle.shutdown().expect("clean shutdown");

    let (handle, _) = start_tls(builder().publish_linger(Duration::from_secs(30)));
    let mut c = TlsClient::connect(handle.local_addr());
    c.send_frame(true, 1, b"cmd:sub:room");
    assert_eq!(c.read_message().2, b"subscribed");
    handle.publish("room", Message::Text("p1"));
    wait_for(5, "the publication queued", || {
        handle.metrics().fanout_deliveries >= 1
    });
    c.send_frame(true, 1, b"echo me");
    assert_eq!(c.read_message().2, b"p1");
    assert_eq!(c.read_message().2, b"echo me");
    for _ in 0..100 {
        handle.publish("room", Message::Binary(&big));
    }
    for _ in 0..60 {
        assert!(c.read_message().2 == big, "released at 64 KiB");
    }
    handle.shutdown().expect("clean shutdown");
}

#[test]
fn shutdown_closes_tls_clients_with_1001_and_close_notify() {
    let (handle, probe) = start_tls(builder());
    let mut c = TlsClient::connect(handle.local_addr());
    wait_for(5, "open", || probe.opens.load(Ordering::SeqCst) == 1);
    let client = thread::spawn(move || {
        assert_eq!(c.read_close(), Some(1001));
        c.send_frame(true, 8, &1001u16.to_be_bytes());
        c.read_tls_end().expect("close_notify");
        assert!(c.sees_tcp_eof());
    });
    handle.shutdown().expect("clean shutdown");
    client.join().expect("client");
    assert_eq!(probe.close_codes(), vec![Some(1001)]);
}

#[test]
fn permessage_deflate_works_over_tls() {
    let (handle, _) = start_tls(builder());
    let mut c = TlsClient::connect_tls(handle.local_addr(), default_client_config());
    let head = c.request(
        "/",
        "Sec-WebSocket-Extensions: permessage-deflate; client_no_context_takeover; \
         server_no_context_takeover\r\n",
    );
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("permessage-deflate"),
        "{head}"
    );
    // Several messages, each compressed on its own (no context takeover either way); the
    // large one spans many records.
    let large = "compressible text over TLS, ".repeat(40_000);
    for text in ["compressible ".repeat(100), large, "ok".to_owned()] {
        let compressed = deflate(text.as_bytes());
        let mut frame = masked_frame(true, 1, &compressed);
        frame[0] |= 0x40; // RSV1: a compressed message (RFC 7692 §6)
        c.send(&frame);
        let (opcode, rsv1, got) = c.read_message();
        assert_eq!(opcode, 1);
        let echoed = if rsv1 {
            assert!(got.len() < text.len(), "the echo is smaller");
            inflate(&got, text.len())
        } else {
            // Below the server's minimum size the echo is sent as is.
            got
        };
        assert!(echoed == text.as_bytes(), "echo of {} bytes", text.len());
        assert_eq!(rsv1, text.len() >= 128, "compressed from 128 bytes on");
    }
    let m = handle.metrics();
    assert_eq!(m.received.compressed_messages, 3);
    c.send_frame(true, 8, &1000u16.to_be_bytes());
    assert_eq!(c.read_close(), Some(1000));
    handle.shutdown().expect("clean shutdown");
}

#[test]
fn negotiates_tls12_and_tls13_with_alpn_http11() {
    let (handle, _) = start_tls(builder());
    for (version, wanted) in [
        (&rustls::version::TLS12, rustls::ProtocolVersion::TLSv1_2),
        (&rustls::version::TLS13, rustls::ProtocolVersion::TLSv1_3),
    ] {
        let mut c = TlsClient::connect_tls(handle.local_addr(), client_config(&[version]));
        assert_eq!(c.tls.conn.protocol_version(), Some(wanted));
        assert_eq!(c.tls.conn.alpn_protocol(), Some(&b"http/1.1"[..]));
        let head = c.request("/", "");
        assert!(head.starts_with("HTTP/1.1 101"), "{wanted:?}: {head}");
        let data = payload(100_000, false);
        c.send_frame(true, 2, &data);
        assert!(c.read_message().2 == data, "{wanted:?}: echo");
        c.send_frame(true, 8, &1000u16.to_be_bytes());
        assert_eq!(c.read_close(), Some(1000));
        c.read_tls_end()
            .unwrap_or_else(|e| panic!("{wanted:?}: close_notify expected, got {e}"));
        assert!(c.sees_tcp_eof(), "{wanted:?}: FIN after close_notify");
    }
    handle.shutdown().expect("clean shutdown");
}

#[test]
fn client_close_is_answered_then_close_notify_then_fin() {
    let (handle, probe) = start_tls(builder());
    let mut c = TlsClient::connect(handle.local_addr());
    c.send_frame(true, 1, b"hello");
    assert_eq!(c.read_message().2, b"hello");
    c.send_frame(true, 8, &1000u16.to_be_bytes());
    assert_eq!(c.read_close(), Some(1000));
    // rustls reports a clean end only after `close_notify`; a FIN first would be
    // `UnexpectedEof`.
    c.read_tls_end().expect("close_notify before the FIN");
    assert!(c.buf.is_empty(), "nothing after the close frame");
    assert!(c.sees_tcp_eof(), "the FIN follows");
    drop(c);
    wait_idle(&handle);
    assert_eq!(probe.close_codes(), vec![Some(1000)]);
    handle.shutdown().expect("clean shutdown");
}

#[test]
fn close_frame_and_close_notify_together_are_answered_with_both() {
    let (handle, probe) = start_tls(builder());
    let mut c = TlsClient::connect(handle.local_addr());
    // The client ends its side of TLS right after its close frame, in the same flight.
    c.tls
        .conn
        .writer()
        .write_all(&masked_frame(true, 8, &1000u16.to_be_bytes()))
        .unwrap();
    c.tls.conn.send_close_notify();
    c.tls.flush().unwrap();
    assert_eq!(c.read_close(), Some(1000));
    c.read_tls_end().expect("close_notify");
    assert!(c.sees_tcp_eof());
    wait_idle(&handle);
    assert_eq!(probe.close_codes(), vec![Some(1000)]);
    handle.shutdown().expect("clean shutdown");
}

#[test]
fn close_notify_without_a_close_frame_is_answered_with_close_notify() {
    let (handle, probe) = start_tls(builder());
    for version in [&rustls::version::TLS12, &rustls::version::TLS13] {
        let mut c = TlsClient::connect_tls(handle.local_addr(), client_config(&[version]));
        let head = c.request("/", "");
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        c.send_frame(true, 1, b"bye");
        assert_eq!(c.read_message().2, b"bye");
        // The client ends TLS without the WebSocket closing handshake. RFC 5246 §7.2.1: the
        // other party MUST respond with a close_notify of its own; RFC 8446 §6.1: each party
        // MUST send one before closing its write side.
        c.tls.conn.send_close_notify();
        c.tls.flush().unwrap();
        c.read_tls_end()
            .unwrap_or_else(|e| panic!("{version:?}: close_notify expected, got {e}"));
        assert!(c.sees_tcp_eof());
    }
    wait_idle(&handle);
    assert_eq!(probe.close_codes(), vec![Some(1006); 2]);
    handle.shutdown().expect("clean shutdown");
}

#[test]
fn failed_tls_handshakes_are_freed() {
    let (handle, _) = start_tls(builder());
    let addr = handle.local_addr();
    // A client that does not trust the certificate (it sends an alert and leaves), and one
    // that offers only ALPN h2 (RFC 7301 §3.2: refused with no_application_protocol).
    let untrusting = Arc::new(
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(RootCertStore::empty())
            .with_no_client_auth(),
    );
    let mut h2_only = (*client_config(&[&rustls::version::TLS13])).clone();
    h2_only.alpn_protocols = vec![b"h2".to_vec()];
    for (what, config) in [("untrusting", untrusting), ("h2 only", Arc::new(h2_only))] {
        let sock = TcpStream::connect(addr).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        let mut tls = StreamOwned::new(ClientConnection::new(config, name).unwrap(), sock);
        let failed = loop {
            if !tls.conn.is_handshaking() {
                break None;
            }
            if let Err(e) = tls.conn.complete_io(&mut tls.sock) {
                break Some(e);
            }
        };
        let e = failed.unwrap_or_else(|| panic!("{what}: the handshake fails"));
        assert_ne!(e.kind(), io::ErrorKind::WouldBlock, "{what}: {e}");
    }
    wait_idle(&handle);
    assert_serves(addr);
    handle.shutdown().expect("clean shutdown");
}

#[test]
fn server_close_ends_with_close_notify() {
    let (handle, probe) = start_tls(builder());
    let mut c = TlsClient::connect(handle.local_addr());
    c.send_frame(true, 1, b"cmd:close");
    assert_eq!(c.read_close(), Some(4000));
    c.send_frame(true, 8, &4000u16.to_be_bytes());
    c.read_tls_end().expect("close_notify before the FIN");
    assert!(c.sees_tcp_eof(), "the FIN follows");
    drop(c);
    wait_idle(&handle);
    assert_eq!(probe.close_codes(), vec![Some(4000)]);
    handle.shutdown().expect("clean shutdown");
}

#[test]
fn client_dropping_tcp_without_close_notify_is_freed() {
    let (handle, probe) = start_tls(builder());
    let addr = handle.local_addr();
    // After the upgrade, idle.
    let c = TlsClient::connect(addr);
    wait_for(5, "open", || probe.opens.load(Ordering::SeqCst) == 1);
    drop(c);
    // In the middle of a message (half a frame sent).
    let mut c = TlsClient::connect(addr);
    let frame = masked_frame(true, 2, &payload(50_000, false));
    c.send(&frame[..20_000]);
    drop(c);
    // After the TLS handshake, before the upgrade request.
    drop(TlsClient::connect_tls(addr, default_client_config()));
    // In the middle of a TLS record: its header and part of its body, then the FIN.
    let mut c = TlsClient::connect(addr);
    c.tls
        .sock
        .write_all(&[0x17, 0x03, 0x03, 0x01, 0x00, 1, 2, 3])
        .unwrap();
    drop(c);
    wait_idle(&handle);
    wait_for(5, "closes", || probe.close_codes().len() == 3);
    assert_eq!(probe.close_codes(), vec![Some(1006); 3]);
    assert_serves(addr);
    handle.shutdown().expect("clean shutdown");
}

#[test]
fn plain_http_on_the_tls_port_is_closed_promptly() {
    // A long handshake timeout: the close must come from the TLS failure, not the timer.
    let (handle, _) = start_tls(builder().handshake_timeout(Duration::from_secs(10)));
    let addr = handle.local_addr();
    let mut other = TlsClient::connect(addr);
    for request in [
        "GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    ] {
        let mut c = RawClient::connect_tcp(addr);
        let started = Instant::now();
        c.send(request.as_bytes());
        let (got, ended) = drain_raw(&mut c.stream);
        assert!(ended, "closed, not left hanging");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "closed promptly, took {:?}",
            started.elapsed()
        );
        // At most an alert record (content type 21), never an HTTP answer in clear text.
        assert!(
            got.is_empty() || got[0] == 0x15,
            "an alert or nothing: {got:?}"
        );
    }
    other.send_frame(true, 1, b"unaffected");
    assert_eq!(other.read_message().2, b"unaffected");
    wait_for(5, "the plain clients freed", || {
        handle.stats().total_connections() == 1
    });
    handle.shutdown().expect("clean shutdown");
}

#[test]
fn http_requests_and_refusals_over_tls_end_with_close_notify() {
    let (handle, _) = start_tls(builder());
    let addr = handle.local_addr();
    // Plain HTTP inside TLS: answered, kept alive, then closed on request.
    let mut c = TlsClient::connect_tls(addr, default_client_config());
    c.send(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n");
    let head = c.read_head();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    c.buf.clear();
    c.send(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    let head = c.read_head();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    c.read_tls_end()
        .expect("close_notify after the last answer");
    assert!(String::from_utf8_lossy(&c.buf).contains("<h1>hi</h1>"));
    assert!(c.sees_tcp_eof());
    // A refused upgrade: the answer, then close_notify.
    let mut c = TlsClient::connect_tls(addr, default_client_config());
    let head = c.request("/reject", "");
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    c.read_tls_end().expect("close_notify after the refusal");
    assert!(c.sees_tcp_eof());
    wait_idle(&handle);
    assert_eq!(handle.metrics().handshakes_failed.total(), 1);
    handle.shutdown().expect("clean shutdown");
}

#[test]
fn tls_connections_over_the_limit_are_closed_before_the_handshake() {
    let (handle, _) = start_tls(builder().max_connections_per_shard(1));
    let addr = handle.local_addr();
    let mut first = TlsClient::connect(addr);
    let sock = TcpStream::connect(addr).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let conn = ClientConnection::new(default_client_config(), name).unwrap();
    let mut second = StreamOwned::new(conn, sock);
    let refused = loop {
        if !second.conn.is_handshaking() {
            break false;
        }
        if let Err(e) = second.conn.complete_io(&mut second.sock) {
            assert_ne!(
                e.kind(),
                io::ErrorKind::WouldBlock,
                "closed, not left waiting"
            );
            break true;
        }
    };
    assert!(refused, "no TLS session over the limit");
    first.send_frame(true, 1, b"first");
    assert_eq!(first.read_message().2, b"first");
    assert_eq!(handle.metrics().refused_at_limit, 1);
    handle.shutdown().expect("clean shutdown");
}

#[test]
fn garbage_records_after_the_handshake_close_the_connection() {
    let (handle, probe) = start_tls(builder().handshake_timeout(Duration::from_secs(10)));
    let addr = handle.local_addr();
    let mut other = TlsClient::connect(addr);
    let cases: [(&str, Vec<u8>); 3] = [
        ("random bytes", noise(3000, 7)),
        // A well-formed application data record whose body does not decrypt (bad MAC).
        ("an undecryptable record", {
            let mut record = vec![0x17, 0x03, 0x03, 0x01, 0x00];
            record.extend(noise(256, 11));
            record
        }),
        // A record header claiming more than TLS allows (RFC 8446 §5.2: 2^14 + 256).
        (
            "an oversized record",
            vec![0x17, 0x03, 0x03, 0xff, 0xff, 0, 0, 0, 0],
        ),
    ];
    for (what, garbage) in cases {
        let mut c = TlsClient::connect(addr);
        c.send_frame(true, 1, b"before");
        assert_eq!(c.read_message().2, b"before");
        let started = Instant::now();
        c.tls.sock.write_all(&garbage).unwrap();
        match c.read_tls_end() {
            // The alert (rustls reports it as an error) or an end of stream.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                panic!("{what}: the connection hangs")
            }
            Err(_) | Ok(()) => {}
        }
        assert!(c.sees_tcp_eof(), "{what}: closed");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{what}: closed promptly, took {:?}",
            started.elapsed()
        );
    }
    other.send_frame(true, 1, b"unaffected");
    assert_eq!(other.read_message().2, b"unaffected");
    wait_for(5, "the broken connections freed", || {
        handle.stats().total_connections() == 1
    });
    assert_eq!(probe.close_codes(), vec![Some(1006); 3]);
    assert_serves(addr);
    handle.shutdown().expect("clean shutdown");
}

#[test]
fn stalled_handshakes_are_closed_by_the_handshake_timeout() {
    let timeout = Duration::from_millis(300);
    let (handle, _) = start_tls(builder().handshake_timeout(timeout));
    let addr = handle.local_addr();
    // A ClientHello, of which only half is sent.
    let mut hello = Vec::new();
    let mut conn = ClientConnection::new(
        default_client_config(),
        ServerName::try_from("localhost").unwrap(),
    )
    .unwrap();
    conn.write_tls(&mut hello).unwrap();
    assert_eq!(hello[0], 0x16, "a handshake record");
    let cases: [(&str, &[u8]); 3] = [
        ("nothing sent", b""),
        ("half a ClientHello", &hello[..hello.len() / 2]),
        ("a record header only", &hello[..5]),
    ];
    let started = Instant::now();
    let mut clients = Vec::new();
    for (what, bytes) in cases {
        let mut c = RawClient::connect_tcp(addr);
        c.send(bytes);
        clients.push((what, c));
    }
    // The TLS handshake done, and no upgrade request.
    let mut quiet = TlsClient::connect_tls(addr, default_client_config());
    for (what, mut c) in clients {
        let (got, ended) = drain_raw(&mut c.stream);
        assert!(ended, "{what}: closed");
        assert!(got.is_empty() || got[0] == 0x15, "{what}: {got:?}");
    }
    assert!(quiet.sees_tcp_eof(), "no upgrade request: closed");
    let took = started.elapsed();
    assert!(
        took >= timeout - Duration::from_millis(50) && took < Duration::from_secs(3),
        "closed by the timeout, took {took:?}"
    );
    wait_idle(&handle);
    assert_serves(addr);
    handle.shutdown().expect("clean shutdown");
}

/// Raises this process's descriptor limit to `want` (within the hard limit).
fn raise_nofile(want: u64) {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `rl` is a valid rlimit for both calls.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl), 0);
        rl.rlim_cur = rl.rlim_max.min(want as libc::rlim_t).max(rl.rlim_cur);
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &rl), 0);
    }
    assert!(
        rl.rlim_cur >= want,
        "descriptor limit {} below the {want} needed",
        rl.rlim_cur
    );
}

#[test]
fn a_thousand_concurrent_tls_connections_echo() {
    const CONNECTIONS: usize = 1000;
    const THREADS: usize = 8;
    // Both ends of every connection live in this process.
    raise_nofile(2 * CONNECTIONS as u64 + 256);
    let started = Instant::now();
    let (handle, probe) = start_tls(builder().shards(2));
    let addr = handle.local_addr();
    let opened = Arc::new(Barrier::new(THREADS + 1));
    let echoed = Arc::new(AtomicUsize::new(0));
    let threads: Vec<_> = (0..THREADS)
        .map(|t| {
            let (opened, echoed) = (Arc::clone(&opened), Arc::clone(&echoed));
            thread::spawn(move || {
                let mut clients: Vec<TlsClient> = (0..CONNECTIONS / THREADS)
                    .map(|_| TlsClient::connect(addr))
                    .collect();
                opened.wait();
                for (i, c) in clients.iter_mut().enumerate() {
                    let msg = format!("thread {t} connection {i}");
                    c.send_frame(true, 1, msg.as_bytes());
                    assert_eq!(c.read_message().2, msg.as_bytes());
                    echoed.fetch_add(1, Ordering::SeqCst);
                }
                for c in &mut clients {
                    c.send_frame(true, 8, &1000u16.to_be_bytes());
                }
                for c in &mut clients {
                    assert_eq!(c.read_close(), Some(1000));
                }
            })
        })
        .collect();
    opened.wait();
    assert_eq!(handle.stats().total_connections(), CONNECTIONS);
    assert_eq!(probe.opens.load(Ordering::SeqCst), CONNECTIONS);
    for t in threads {
        t.join().expect("client thread");
    }
    assert_eq!(echoed.load(Ordering::SeqCst), CONNECTIONS);
    wait_idle(&handle);
    assert_eq!(handle.metrics().upgrades, CONNECTIONS as u64);
    let took = started.elapsed();
    eprintln!("{CONNECTIONS} TLS connections opened, echoed and closed in {took:?}");
    assert!(took < Duration::from_secs(20), "took {took:?}");
    handle.shutdown().expect("clean shutdown");
}

#[test]
fn plain_and_tls_listeners_in_one_server_both_echo() {
    let (handle, _) = start(builder().shards(2).tls_addr("127.0.0.1:0", tls_config()));
    let tls_addr = handle.tls_addr().expect("a TLS address");
    assert_ne!(tls_addr.port(), 0);
    assert_ne!(tls_addr, handle.local_addr());
    let mut plain = RawClient::connect(handle.local_addr());
    let mut secure = TlsClient::connect(tls_addr);
    plain.send_frame(true, 1, b"ws://");
    secure.send_frame(true, 1, b"wss://");
    assert_eq!(plain.read_frame().payload, b"ws://");
    assert_eq!(secure.read_message().2, b"wss://");
    // Each port speaks only its own: plain HTTP on the TLS one is closed.
    let mut wrong = RawClient::connect_tcp(tls_addr);
    wrong.send(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n");
    assert!(wrong.sees_eof());
    plain.send_frame(true, 8, &1000u16.to_be_bytes());
    secure.send_frame(true, 8, &1000u16.to_be_bytes());
    assert_eq!(plain.read_close(), Some(1000));
    assert_eq!(secure.read_close(), Some(1000));
    secure.read_tls_end().expect("close_notify");
    assert!(plain.sees_eof());
    wait_idle(&handle);
    assert_eq!(handle.metrics().upgrades, 2);
    handle.shutdown().expect("clean shutdown");
}

/// A directory of the test's own, removed at the end.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir =
            Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn write(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, contents).unwrap();
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The error of `from_pem_files`, which must name `path`.
fn pem_error(cert: &Path, key: &Path, path: &Path) -> String {
    let e = TlsConfig::from_pem_files(cert, key).expect_err("a bad PEM file");
    let text = e.to_string();
    assert!(
        text.contains(&path.display().to_string()),
        "the error names {}: {text}",
        path.display()
    );
    text
}

#[test]
fn from_pem_files_errors_name_the_file() {
    let pki = pki();
    let dir = TempDir::new("pem-errors");
    let (cert, key) = (pki.cert_file(), pki.key_file());
    let missing = dir.0.join("missing.pem");
    let text = pem_error(&missing, &key, &missing);
    assert!(text.contains("certificate"), "{text}");
    let text = pem_error(&cert, &missing, &missing);
    assert!(text.contains("key"), "{text}");
    // A certificate file holding only a key, or no PEM at all.
    let text = pem_error(&key, &key, &key);
    assert!(text.contains("certificate"), "{text}");
    let junk = dir.write("junk.pem", "not a PEM file\n");
    pem_error(&junk, &key, &junk);
    // A key file holding only a certificate.
    let text = pem_error(&cert, &cert, &cert);
    assert!(text.contains("key"), "{text}");
    // A key of another certificate.
    let other = rcgen::KeyPair::generate().unwrap();
    let other_key = dir.write("other-key.pem", &other.serialize_pem());
    let text = pem_error(&cert, &other_key, &other_key);
    assert!(text.contains("does not fit"), "{text}");
    // The good pair works.
    TlsConfig::from_pem_files(&cert, &key).expect("the matching pair");
}

#[test]
fn metrics_count_tls_connections() {
    let (handle, _) = start_tls(builder());
    let mut clients: Vec<TlsClient> = (0..3)
        .map(|_| TlsClient::connect(handle.local_addr()))
        .collect();
    assert_eq!(handle.stats().total_connections(), 3);
    for c in &mut clients {
        c.send_frame(true, 2, &[1, 2, 3]);
        assert_eq!(c.read_message().2, [1, 2, 3]);
    }
    let m = handle.metrics();
    assert_eq!(m.accepted, 3);
    assert_eq!(m.upgrades, 3);
    assert_eq!(m.connections_open, 3);
    assert_eq!((m.received.messages, m.received.bytes), (3, 9));
    assert_eq!((m.sent.messages, m.sent.bytes), (3, 9));
    for c in &mut clients {
        c.send_frame(true, 8, &1000u16.to_be_bytes());
        assert_eq!(c.read_close(), Some(1000));
    }
    drop(clients);
    wait_idle(&handle);
    let text = handle.metrics_text();
    assert!(text.contains("upgrades_total 3"), "{text}");
    handle.shutdown().expect("clean shutdown");
}
