//! Hostile clients and resource limits (issue 6): each test fails if the server crashes,
//! hangs, loses a message, exceeds its memory bound or stops serving well-behaved clients.
//!
//! Servers run in-process on `127.0.0.1:0`, or in a child process (see `hardening/child.rs`)
//! when the test needs the server's own memory, descriptor limit or stderr. Every server a
//! test starts is stopped by that test; every wait has a deadline.

#[path = "hardening/child.rs"]
mod child;
#[path = "common/mod.rs"]
mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use child::ChildServer;
use common::{builder, masked_frame, start, wait_for, wait_idle, RawClient};
use ringsock::server::ServerHandle;

/// The child-process server (see `hardening/child.rs`); a no-op unless a test spawned it.
#[test]
#[ignore = "helper process: run by other tests through hardening/child.rs"]
fn child_server() {
    child::child_main();
}

/// A raw client that completed the handshake, with a short read timeout.
fn open(addr: SocketAddr) -> RawClient {
    let c = RawClient::connect(addr);
    c.stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    c
}

/// One echo round trip; returns its duration.
fn echo_once(c: &mut RawClient, payload: &[u8]) -> Duration {
    let started = Instant::now();
    c.send_frame(true, 2, payload);
    let frame = c.read_frame();
    assert_eq!(
        (frame.opcode, frame.payload.as_slice()),
        (2, payload),
        "echo"
    );
    started.elapsed()
}

/// A fresh client gets an echo (the shard still serves).
fn still_serves(addr: SocketAddr) {
    let mut c = open(addr);
    echo_once(&mut c, b"still alive");
    c.send_frame(true, 8, &1000u16.to_be_bytes());
    assert_eq!(c.read_close(), Some(1000));
}

/// Sends `bytes` after a handshake and expects a close frame with `code`, then EOF.
fn expect_close(addr: SocketAddr, bytes: &[u8], code: u16, what: &str) {
    let mut c = open(addr);
    // The server may stop reading once it failed the connection: ignore write errors.
    let _ = c.stream.write_all(bytes);
    assert_eq!(c.read_close(), Some(code), "{what}");
    assert!(c.sees_eof(), "{what}: TCP closed after the close frame");
}

/// The `p`-th percentile of sorted durations.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p / 100.0).round() as usize;
    sorted[index]
}

fn stop(handle: ServerHandle) {
    wait_idle(&handle);
    handle.shutdown().expect("clean shutdown");
    assert!(handle.is_stopped());
}

// ---------------------------------------------------------------------------------------------
// Slowloris

#[test]
fn slowloris_connections_are_dropped_while_a_normal_client_keeps_echoing() {
    const SLOW: usize = 200;
    let timeout = Duration::from_secs(1);
    let (handle, _) = start(builder().handshake_timeout(timeout));
    let addr = handle.local_addr();
    let request = b"GET / HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n";
    let mut slow: Vec<TcpStream> = (0..SLOW)
        .map(|_| TcpStream::connect(addr).expect("connect"))
        .collect();
    for s in &slow {
        s.set_nonblocking(true).unwrap();
    }
    let started = Instant::now();
    let stop_dripping = Arc::new(AtomicBool::new(false));
    let stop_flag = Arc::clone(&stop_dripping);
    let dripper = std::thread::spawn(move || {
        // One byte per connection every 200 ms; record when each sees EOF or a reset.
        let mut ended: Vec<Option<Duration>> = vec![None; slow.len()];
        let mut pos = 0;
        while !stop_flag.load(Ordering::SeqCst) {
            for (i, s) in slow.iter_mut().enumerate() {
                if ended[i].is_some() {
                    continue;
                }
                let mut byte = [0u8; 64];
                match s.read(&mut byte) {
                    Ok(0) => ended[i] = Some(started.elapsed()),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Ok(_) => panic!("slowloris connection got an answer"),
                    Err(_) => ended[i] = Some(started.elapsed()),
                }
                if ended[i].is_none() && s.write(&request[pos % request.len()..][..1]).is_err() {
                    ended[i] = Some(started.elapsed());
                }
            }
            pos += 1;
            if ended.iter().all(Option::is_some) {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        ended
    });
    // A well-behaved client echoes throughout, before and after the timeouts fire.
    let mut c = open(addr);
    let mut rtts = Vec::new();
    while started.elapsed() < timeout * 2 + Duration::from_millis(500) {
        rtts.push(echo_once(&mut c, &[7u8; 64]));
        std::thread::sleep(Duration::from_millis(5));
    }
    stop_dripping.store(true, Ordering::SeqCst);
    let ended = dripper.join().unwrap();
    rtts.sort();
    let (p50, p99) = (percentile(&rtts, 50.0), percentile(&rtts, 99.0));
    eprintln!(
        "slowloris: {} round trips, p50 {p50:?}, p99 {p99:?}, max {:?}",
        rtts.len(),
        rtts.last().unwrap()
    );
    assert!(p99 < Duration::from_millis(50), "p99 {p99:?}");
    // Dropped at the timeout plus one sweep (a quarter of it) plus scheduling slack.
    let slack = timeout + timeout / 4 + Duration::from_millis(500);
    let late: Vec<_> = ended
        .iter()
        .filter(|e| e.map_or(true, |t| t > slack))
        .collect();
    assert!(
        late.is_empty(),
        "{} of {SLOW} not dropped by {slack:?}",
        late.len()
    );
    let first = ended.iter().flatten().min().unwrap();
    assert!(*first >= timeout, "dropped before the timeout: {first:?}");
    wait_for(5, "only the normal client left", || {
        handle.stats().total_connections() == 1
    });
    drop(c);
    stop(handle);
}

// ---------------------------------------------------------------------------------------------
// Oversized and malformed handshakes

/// Sends `request`, expects exactly `status_line`, then EOF once we stop sending.
fn expect_status(addr: SocketAddr, request: &[u8], status_line: &str) {
    let mut c = RawClient::connect_tcp(addr);
    c.stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut writer = c.stream.try_clone().unwrap();
    let body = request.to_vec();
    // Written from a thread: the server answers before reading all of a huge request.
    let write = std::thread::spawn(move || {
        let _ = writer.write_all(&body);
    });
    let head = c.read_head();
    let first = head.lines().next().unwrap_or("");
    assert_eq!(
        first,
        status_line,
        "request starting {:?}",
        String::from_utf8_lossy(&request[..request.len().min(40)])
    );
    write.join().unwrap();
    let _ = c.stream.shutdown(Shutdown::Write);
    assert!(c.sees_eof(), "connection closed after {status_line}");
}

fn upgrade_request(method: &str, version: &str, headers: &str) -> Vec<u8> {
    format!("{method} / {version}\r\nHost: localhost\r\n{headers}\r\n").into_bytes()
}

const UPGRADE: &str = "Upgrade: websocket\r\nConnection: Upgrade\r\n";
const KEY: &str = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";
const V13: &str = "Sec-WebSocket-Version: 13\r\n";

#[test]
fn malformed_and_oversized_handshakes_get_their_status_and_are_closed() {
    let (handle, probe) = start(builder());
    let addr = handle.local_addr();
    let too_large = "HTTP/1.1 431 Request Header Fields Too Large";
    let bad = "HTTP/1.1 400 Bad Request";
    let huge_header = format!("X-Big: {}\r\n", "a".repeat(9 * 1024));
    let many_headers: String = (0..5000).map(|i| format!("X-H{i}: v\r\n")).collect();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "one header over 8 KiB",
            upgrade_request(
                "GET",
                "HTTP/1.1",
                &format!("{UPGRADE}{KEY}{V13}{huge_header}"),
            ),
            too_large,
        ),
        (
            "5000 headers",
            upgrade_request(
                "GET",
                "HTTP/1.1",
                &format!("{UPGRADE}{KEY}{V13}{many_headers}"),
            ),
            too_large,
        ),
        (
            "a request line without end",
            format!("GET /{}", "a".repeat(16 * 1024)).into_bytes(),
            too_large,
        ),
        (
            "binary garbage",
            (0..200u32)
                .map(|i| (i * 37 % 256) as u8)
                .chain(*b"\r\n\r\n")
                .collect(),
            bad,
        ),
        (
            "HTTP/1.0",
            upgrade_request("GET", "HTTP/1.0", &format!("{UPGRADE}{KEY}{V13}")),
            bad,
        ),
        (
            "POST",
            upgrade_request("POST", "HTTP/1.1", &format!("{UPGRADE}{KEY}{V13}")),
            "HTTP/1.1 405 Method Not Allowed",
        ),
        (
            "no key",
            upgrade_request("GET", "HTTP/1.1", &format!("{UPGRADE}{V13}")),
            bad,
        ),
        (
            "a key that is not 16 bytes of base64",
            upgrade_request(
                "GET",
                "HTTP/1.1",
                &format!("{UPGRADE}Sec-WebSocket-Key: c2hvcnQ=\r\n{V13}"),
            ),
            bad,
        ),
        (
            "version 8",
            upgrade_request(
                "GET",
                "HTTP/1.1",
                &format!("{UPGRADE}{KEY}Sec-WebSocket-Version: 8\r\n"),
            ),
            "HTTP/1.1 426 Upgrade Required",
        ),
    ];
    for (what, request, status) in &cases {
        eprintln!("handshake case: {what}");
        expect_status(addr, request, status);
    }
    still_serves(addr);
    assert_eq!(
        probe.opens.load(Ordering::SeqCst),
        1,
        "only the good client opened"
    );
    stop(handle);
}

// ---------------------------------------------------------------------------------------------
// Frame attacks

/// A masked frame header announcing `len` bytes with the 64-bit length form.
fn header64(opcode: u8, len: u64) -> Vec<u8> {
    let mut out = vec![0x80 | opcode, 0x80 | 127];
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&[1, 2, 3, 4]);
    out
}

#[test]
fn frame_lengths_over_the_limit_close_1009_and_top_bit_lengths_close_1002() {
    let (handle, _) = start(builder().max_frame_size(1 << 20).max_message_size(4 << 20));
    let addr = handle.local_addr();
    // 2^63 - 1 has the top bit clear: legal framing, over the frame limit (RFC 6455 §5.2, §7.4.1).
    expect_close(addr, &header64(2, (1 << 63) - 1), 1009, "length 2^63-1");
    // Top bit set: the frame is malformed.
    expect_close(addr, &header64(2, 1 << 63), 1002, "length 2^63");
    expect_close(addr, &header64(2, u64::MAX), 1002, "length 2^64-1");
    expect_close(
        addr,
        &header64(2, (1 << 20) + 1),
        1009,
        "one byte over the frame limit",
    );
    still_serves(addr);
    stop(handle);
}

#[test]
fn endless_continuation_frames_are_cut_at_the_message_limit_with_1009() {
    let limit = 256 * 1024;
    let (handle, _) = start(builder().max_frame_size(64 * 1024).max_message_size(limit));
    let mut c = open(handle.local_addr());
    let mut writer = c.stream.try_clone().unwrap();
    writer
        .set_write_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let closed = Arc::new(AtomicBool::new(false));
    let seen = Arc::clone(&closed);
    let sent = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&sent);
    let write = std::thread::spawn(move || {
        let _ = writer.write_all(&masked_frame(false, 2, &[1u8; 4096]));
        let frame = masked_frame(false, 0, &[1u8; 4096]);
        // Endless, until the server's close is seen (or TCP is gone).
        while !seen.load(Ordering::SeqCst) && writer.write_all(&frame).is_ok() {
            counter.fetch_add(4096, Ordering::SeqCst);
        }
    });
    assert_eq!(c.read_close(), Some(1009));
    let at_close = sent.load(Ordering::SeqCst);
    closed.store(true, Ordering::SeqCst);
    write.join().unwrap();
    // What was written when the close arrived: the limit plus what the socket buffers hold.
    eprintln!(
        "continuations: close 1009 after {} KiB written",
        at_close / 1024
    );
    assert!(
        at_close < limit + (24 << 20),
        "close came after {at_close} bytes"
    );
    assert!(
        c.sees_eof(),
        "TCP closed (at the latest after the close timeout)"
    );
    still_serves(handle.local_addr());
    stop(handle);
}

#[test]
fn control_frames_over_125_bytes_close_1002() {
    let (handle, _) = start(builder());
    let addr = handle.local_addr();
    for (opcode, name) in [(9u8, "ping"), (10, "pong"), (8, "close")] {
        for len in [126usize, 200, 65536] {
            let mut payload = vec![b'x'; len];
            if opcode == 8 {
                payload[..2].copy_from_slice(&1000u16.to_be_bytes());
            }
            expect_close(addr, &masked_frame(true, opcode, &payload), 1002, name);
        }
    }
    still_serves(addr);
    stop(handle);
}

#[test]
fn invalid_utf8_at_every_position_closes_1007() {
    let (handle, _) = start(builder());
    let addr = handle.local_addr();
    let text = "héllo, wörld ✓".as_bytes();
    for pos in 0..text.len() {
        let mut bad = text.to_vec();
        bad[pos] = 0xff;
        expect_close(
            addr,
            &masked_frame(true, 1, &bad),
            1007,
            &format!("0xff at {pos}"),
        );
        // The same, split into two fragments right at the bad byte.
        let mut split = masked_frame(false, 1, &bad[..pos]);
        split.extend(masked_frame(true, 0, &bad[pos..]));
        expect_close(addr, &split, 1007, &format!("fragmented, 0xff at {pos}"));
    }
    // A truncated sequence at the end of the message.
    expect_close(
        addr,
        &masked_frame(true, 1, b"ok\xe2\x9c"),
        1007,
        "truncated ✓",
    );
    still_serves(addr);
    stop(handle);
}

/// 64 MiB of zeros, deflated (about 64 KiB).
fn deflate_bomb() -> Vec<u8> {
    let zeros = vec![0u8; 64 << 20];
    let mut compressor = libdeflater::Compressor::new(libdeflater::CompressionLvl::best());
    let mut bomb = vec![0u8; compressor.deflate_compress_bound(zeros.len())];
    let n = compressor.deflate_compress(&zeros, &mut bomb).unwrap();
    bomb.truncate(n);
    bomb
}

#[test]
fn deflate_bombs_close_1009() {
    let limit = 1 << 20;
    let bomb = deflate_bomb();
    eprintln!(
        "deflate bomb: {} bytes inflating to 64 MiB, limit {limit}",
        bomb.len()
    );
    // Per-message inflation (libdeflate), and the streaming inflater that client context
    // takeover needs.
    for takeover in [false, true] {
        let (handle, _) = start(builder().max_message_size(limit).configure(|c| {
            c.deflate.client_context_takeover = takeover;
        }));
        // One compressed frame, and the same stream cut into 16 fragments.
        for fragments in [1usize, 16] {
            let mut c = RawClient::connect_tcp(handle.local_addr());
            c.stream
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            let head = c.request("/", "Sec-WebSocket-Extensions: permessage-deflate\r\n");
            assert!(head.starts_with("HTTP/1.1 101"), "{head}");
            assert!(
                head.to_ascii_lowercase().contains("permessage-deflate"),
                "{head}"
            );
            // RFC 7692 §7.2.1 drops the 00 00 ff ff tail of a sync flush, which a final
            // block does not have, so the stream is sent as it is.
            let chunk = bomb.len().div_ceil(fragments);
            let mut bytes = Vec::new();
            for (i, part) in bomb.chunks(chunk).enumerate() {
                let last = (i + 1) * chunk >= bomb.len();
                let mut frame = masked_frame(last, if i == 0 { 2 } else { 0 }, part);
                if i == 0 {
                    frame[0] |= 0x40; // RSV1 on the first frame: compressed (RFC 7692 §6)
                }
                bytes.extend(frame);
            }
            let _ = c.stream.write_all(&bytes);
            let what = format!("takeover {takeover}, {fragments} fragments");
            assert_eq!(c.read_close(), Some(1009), "{what}");
            assert!(c.sees_eof(), "{what}");
        }
        still_serves(handle.local_addr());
        stop(handle);
    }
}

/// Sets SO_LINGER to zero, so closing the socket sends a reset.
fn set_linger_zero(stream: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket and a `linger` struct of the size given.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_LINGER");
}

// ---------------------------------------------------------------------------------------------
// Peer vanishing

#[test]
fn reset_mid_message_frees_the_connection_as_1006() {
    let (handle, probe) = start(builder());
    let mut c = open(handle.local_addr());
    wait_for(5, "open", || probe.opens.load(Ordering::SeqCst) == 1);
    let frame = masked_frame(true, 2, &[3u8; 1000]);
    c.send(&frame[..300]);
    std::thread::sleep(Duration::from_millis(50));
    set_linger_zero(&c.stream);
    drop(c);
    wait_idle(&handle);
    assert_eq!(probe.close_codes(), vec![Some(1006)]);
    still_serves(handle.local_addr());
    stop(handle);
}

#[test]
fn resets_with_output_in_flight_free_every_connection() {
    // The server is blocked sending 3 x 2 MiB echoes to peers that do not read, then every
    // peer resets: the sends fail, and every connection (slabs, stash) is freed.
    let (handle, probe) = start(builder().high_water_mark(256 * 1024));
    let payload = vec![9u8; 2 << 20];
    let clients: Vec<RawClient> = (0..20)
        .map(|_| {
            let mut c = open(handle.local_addr());
            c.stream
                .set_write_timeout(Some(Duration::from_secs(2)))
                .unwrap();
            // Once the server stops reading, the socket buffers fill and a write may time out.
            for _ in 0..3 {
                let _ = c.stream.write_all(&masked_frame(true, 2, &payload));
            }
            c
        })
        .collect();
    wait_for(10, "backpressure on every connection", || {
        probe.backpressure.load(Ordering::SeqCst) >= 20
    });
    for c in clients {
        set_linger_zero(&c.stream);
    }
    wait_idle(&handle);
    assert_eq!(probe.close_codes(), vec![Some(1006); 20]);
    still_serves(handle.local_addr());
    stop(handle);
}

#[test]
fn peers_that_reset_under_our_sends_never_raise_sigpipe() {
    // A process with SIGPIPE's default action dies on the first send to a reset peer that
    // lacks MSG_NOSIGNAL. Peers reset while 2 MiB echoes are being written to them.
    let mut child = ChildServer::start("shards=2,sigpipe=default");
    let addr = child.addr;
    for _ in 0..3 {
        let clients: Vec<RawClient> = (0..8)
            .map(|_| {
                let mut c = open(addr);
                c.stream
                    .set_write_timeout(Some(Duration::from_secs(2)))
                    .unwrap();
                let _ = c
                    .stream
                    .write_all(&masked_frame(true, 2, &vec![5u8; 2 << 20]));
                c
            })
            .collect();
        std::thread::sleep(Duration::from_millis(100));
        for c in clients {
            set_linger_zero(&c.stream);
        }
    }
    child.wait_connections(0, 10);
    still_serves(addr);
    let log = child.stderr();
    assert!(child.stop().success(), "the server survived: {log}");
}

#[test]
fn half_close_mid_message_frees_the_connection() {
    let (handle, probe) = start(builder());
    let mut c = open(handle.local_addr());
    let frame = masked_frame(false, 1, &[b'a'; 1000]);
    c.send(&frame[..500]);
    c.stream.shutdown(Shutdown::Write).unwrap();
    assert!(c.sees_eof(), "server closes its side after our FIN");
    wait_idle(&handle);
    assert_eq!(probe.close_codes(), vec![Some(1006)]);
    still_serves(handle.local_addr());
    stop(handle);
}

#[test]
fn client_that_never_answers_our_close_is_dropped_after_the_close_timeout() {
    let close = Duration::from_millis(500);
    let (handle, _) = start(builder().close_timeout(close));
    let mut c = open(handle.local_addr());
    c.send_frame(true, 1, b"cmd:close");
    assert_eq!(c.read_close(), Some(4000));
    let started = Instant::now();
    // Silent: no close reply, no FIN.
    assert!(c.sees_eof(), "dropped after the close timeout");
    let took = started.elapsed();
    assert!(
        took >= close - Duration::from_millis(150) && took < close * 3,
        "dropped after {took:?}"
    );
    wait_idle(&handle);
    still_serves(handle.local_addr());
    stop(handle);
}

#[test]
fn client_that_sends_close_but_never_fins_is_dropped() {
    let close = Duration::from_millis(500);
    let (handle, _) = start(builder().close_timeout(close));
    let mut c = open(handle.local_addr());
    c.send_frame(true, 8, &1000u16.to_be_bytes());
    assert_eq!(c.read_close(), Some(1000));
    // We keep TCP open: the server half-closes and waits for our FIN at most `close`.
    assert!(c.sees_eof());
    wait_idle(&handle);
    stop(handle);
}

// ---------------------------------------------------------------------------------------------
// Resource limits

#[test]
fn connection_limit_answers_503_and_leaves_open_connections_alone() {
    let (handle, _) = start(builder().max_connections_per_shard(3));
    let addr = handle.local_addr();
    let mut open_clients: Vec<RawClient> = (0..3).map(|_| open(addr)).collect();
    for _ in 0..5 {
        let mut extra = RawClient::connect_tcp(addr);
        extra
            .stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let head = extra.read_head();
        assert_eq!(
            head.lines().next(),
            Some("HTTP/1.1 503 Service Unavailable")
        );
        assert!(extra.sees_eof());
    }
    for c in &mut open_clients {
        echo_once(c, b"unaffected");
    }
    drop(open_clients.pop());
    wait_for(5, "a free place", || {
        handle.stats().total_connections() == 2
    });
    let mut c = open(addr);
    echo_once(&mut c, b"room again");
    drop(c);
    drop(open_clients);
    stop(handle);
}

#[test]
fn io_uring_unavailable_fails_start_naming_the_cause() {
    // Deny io_uring_setup to this thread and the shard threads it spawns (seccomp filters
    // are per thread and inherited).
    let result = std::thread::spawn(|| {
        let rules = [child::SeccompRule {
            syscall: libc::SYS_io_uring_setup,
            arg1: None,
            errno: libc::EPERM,
        }];
        if let Err(e) = child::install_seccomp(&rules) {
            return Err(format!("seccomp unavailable: {e}"));
        }
        let started = ringsock::server::Builder::new()
            .addr("127.0.0.1:0")
            .shards(1)
            .pin_threads(false)
            .build(common::TestHandler {
                probe: Default::default(),
            })
            .start();
        match started {
            Ok(handle) => {
                handle.shutdown().expect("clean shutdown");
                Ok(None)
            }
            Err(e) => Ok(Some(e.to_string())),
        }
    })
    .join()
    .unwrap();
    match result {
        Err(skip) => eprintln!("skipped: {skip}"),
        Ok(None) => panic!("the server started without io_uring"),
        Ok(Some(message)) => {
            eprintln!("start error: {message}");
            assert!(message.contains("io_uring unavailable"), "{message}");
            assert!(message.contains("disabled for this process"), "{message}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Memory bounds, measured on a server in a child process

/// Connects to a child server and completes the handshake.
fn open_child(child: &ChildServer) -> RawClient {
    open(child.addr)
}

#[test]
fn announced_lengths_do_not_allocate() {
    let mut child = ChildServer::start("max_frame=16777216,max_message=16777216");
    still_serves(child.addr);
    let before = child.rss_kib();
    // 50 connections announce frames over the limit; 50 more announce 16 MiB frames (within
    // the limit) and send 1 KiB of them. Memory must follow the data, not the announcements.
    for len in [(16u64 << 20) + 1, 1 << 40, (1 << 63) - 1] {
        for _ in 0..50 {
            expect_close(child.addr, &header64(2, len), 1009, "over the frame limit");
        }
    }
    let mut partial: Vec<RawClient> = (0..50).map(|_| open_child(&child)).collect();
    for c in &mut partial {
        let mut bytes = header64(2, 16 << 20);
        bytes.extend_from_slice(&[0u8; 1024]);
        c.send(&bytes);
    }
    still_serves(child.addr);
    let peak = child.peak_rss_kib();
    eprintln!("announced lengths: RSS {before} KiB before, peak {peak} KiB");
    assert!(
        peak < before + 32 * 1024,
        "peak RSS {peak} KiB from {before} KiB: announced lengths were allocated"
    );
    drop(partial);
    child.wait_connections(0, 10);
    assert!(child.stop().success());
}

#[test]
fn ping_flood_from_a_client_that_never_reads_is_bounded_by_the_high_water_mark() {
    let mark = 256 * 1024;
    let mut child = ChildServer::start(&format!("hwm={mark}"));
    still_serves(child.addr);
    let before = child.rss_kib();
    let c = open_child(&child);
    let mut writer = c.stream.try_clone().unwrap();
    writer
        .set_write_timeout(Some(Duration::from_secs(1)))
        .unwrap();
    let ping = masked_frame(true, 9, &[b'p'; 125]);
    let batch: Vec<u8> = ping
        .iter()
        .copied()
        .cycle()
        .take(ping.len() * 512)
        .collect();
    let started = Instant::now();
    let mut written = 0usize;
    let mut stalled = false;
    while written < 50 << 20 {
        match writer.write(&batch) {
            Ok(n) => written += n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                stalled = true;
                break;
            }
            Err(e) => panic!("flood write failed: {e}"),
        }
    }
    let peak = child.peak_rss_kib();
    eprintln!(
        "ping flood: {} KiB written in {:?} before the server stopped reading; \
         server RSS {before} KiB before, peak {peak} KiB",
        written / 1024,
        started.elapsed()
    );
    assert!(
        stalled,
        "the server read 50 MB of pings without its peer reading pongs"
    );
    assert!(
        peak < before + 64 * 1024,
        "peak RSS {peak} KiB from {before} KiB"
    );
    // Others are served meanwhile.
    still_serves(child.addr);
    drop(writer);
    drop(c);
    child.wait_connections(0, 10);
    assert!(child.stop().success());
}

#[test]
fn subscriber_that_never_reads_is_bounded_and_readers_get_every_message_in_order() {
    let (mark, max_buffered) = (64 * 1024, 1 << 20);
    let mut child = ChildServer::start(&format!("hwm={mark},max_buffered={max_buffered}"));
    let addr = child.addr;
    let subscribe = |c: &mut RawClient| {
        c.send_frame(true, 1, b"sub:feed");
        assert_eq!(c.read_frame().payload, b"subscribed");
    };
    let mut sleeper = open(addr);
    subscribe(&mut sleeper);
    let mut readers: Vec<RawClient> = (0..3).map(|_| open(addr)).collect();
    readers.iter_mut().for_each(subscribe);
    let before = child.rss_kib();
    const COUNT: usize = 20_000;
    let body = "x".repeat(1000);
    let progress: Arc<Vec<AtomicUsize>> = Arc::new((0..3).map(|_| AtomicUsize::new(0)).collect());
    let threads: Vec<_> = readers
        .into_iter()
        .enumerate()
        .map(|(i, mut r)| {
            let progress = Arc::clone(&progress);
            std::thread::spawn(move || {
                for seq in 0..COUNT {
                    let frame = r.read_frame();
                    let text = String::from_utf8(frame.payload).unwrap();
                    let (n, _) = text.split_once(' ').unwrap();
                    assert_eq!(
                        n.parse::<usize>().unwrap(),
                        seq,
                        "reader {i}: in order, no gap"
                    );
                    progress[i].store(seq + 1, Ordering::SeqCst);
                }
                r
            })
        })
        .collect();
    let mut publisher = open(addr);
    for seq in 0..COUNT {
        // A well-behaved publisher: at most 1 MiB ahead of the slowest reader.
        let slowest = || {
            progress
                .iter()
                .map(|p| p.load(Ordering::SeqCst))
                .min()
                .unwrap()
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while seq > slowest() + 1000 {
            assert!(
                Instant::now() < deadline,
                "readers stalled at {}",
                slowest()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        publisher.send_frame(true, 1, format!("pub:feed:{seq} {body}").as_bytes());
    }
    for t in threads {
        t.join().expect("reader got every message in order");
    }
    let peak = child.peak_rss_kib();
    eprintln!(
        "slow subscriber: {COUNT} x 1 KiB published; server RSS {before} KiB before, peak \
         {peak} KiB"
    );
    assert!(
        peak < before + 64 * 1024,
        "peak RSS {peak} KiB from {before} KiB"
    );
    let skipped = child.stats().publish_skipped;
    assert!(
        skipped > 0 && skipped < COUNT,
        "the sleeper's publications past the cap are skipped and counted: {skipped}"
    );
    // Direct sends to a peer that does not read: past the hard cap they are Dropped.
    let mut other = open(addr);
    other.send_frame(true, 1, b"stream:2000:16384");
    let deadline = Instant::now() + Duration::from_secs(10);
    let stats = loop {
        let stats = child.stats();
        if stats.queued + stats.backpressure + stats.dropped >= 2004 {
            break stats;
        }
        assert!(Instant::now() < deadline, "stream not sent: {stats:?}");
        std::thread::sleep(Duration::from_millis(20));
    };
    let peak = child.peak_rss_kib();
    eprintln!("stream of 2000 x 16 KiB to a non-reader: {stats:?}, peak RSS {peak} KiB");
    assert!(stats.dropped > 0 && stats.backpressure > 0, "{stats:?}");
    assert!(
        peak < before + 64 * 1024,
        "peak RSS {peak} KiB from {before} KiB"
    );
    drop((sleeper, other, publisher));
    child.wait_connections(0, 10);
    assert!(child.stop().success());
}

// ---------------------------------------------------------------------------------------------
// Resource exhaustion in a child process

#[test]
fn descriptor_exhaustion_is_logged_and_serving_resumes() {
    let mut child = ChildServer::start("nofile=64");
    let addr = child.addr;
    let mut held = Vec::new();
    let exhausted_at = loop {
        assert!(held.len() < 200, "64 descriptors never ran out");
        let mut c = RawClient::connect_tcp(addr);
        c.stream
            .set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let request = "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                       Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
        c.send(request.as_bytes());
        let mut head = [0u8; 12];
        let answered = c.stream.read_exact(&mut head).is_ok();
        held.push(c);
        if !answered {
            break held.len();
        }
        assert_eq!(&head, b"HTTP/1.1 101");
    };
    // Keep it exhausted for a while: the error is logged, rate-limited, and nothing spins.
    std::thread::sleep(Duration::from_millis(2500));
    let log = child.stderr();
    let lines = log.lines().filter(|l| l.contains("accept failed")).count();
    eprintln!("fd exhaustion: after {exhausted_at} connections; {lines} log lines:\n{log}");
    assert!(lines >= 1, "accept failure logged");
    assert!(log.contains("Too many open files"), "{log}");
    assert!(lines <= 5, "logging is rate-limited");
    drop(held);
    child.wait_connections(0, 10);
    still_serves(addr);
    assert!(child.stop().success());
}

#[test]
fn unavailable_provided_buffers_fall_back_with_one_log_line_per_shard() {
    let mut child = ChildServer::start("shards=2,deny=register_buffers+pbuf_ring");
    let mut c = open_child(&child);
    for size in [10usize, 100_000, 1 << 20] {
        let payload: Vec<u8> = (0..size).map(|i| i as u8).collect();
        echo_once(&mut c, &payload);
    }
    drop(c);
    child.wait_connections(0, 10);
    let log = child.stderr();
    eprintln!("fallback log:\n{log}");
    assert_eq!(
        log.matches("no provided-buffer ring").count(),
        2,
        "one line per shard for the receive ring: {log}"
    );
    assert!(child.stop().success());
}

// ---------------------------------------------------------------------------------------------
// Graceful shutdown under load

/// Echo that counts what it accepted, what it queued, and what it could not send.
struct CountingEcho {
    accepted: AtomicUsize,
    queued: AtomicUsize,
    dropped: AtomicUsize,
}

impl ringsock::server::Handler for CountingEcho {
    type State = ();

    fn on_upgrade(
        &self,
        _: &ringsock::proto::handshake::Request<'_>,
        _: &mut ringsock::server::Upgrade<()>,
    ) -> ringsock::server::Decision<()> {
        ringsock::server::Decision::Accept(())
    }

    fn on_message(
        &self,
        ws: &mut ringsock::server::Ws<'_, ()>,
        msg: ringsock::server::Message<'_>,
    ) {
        use ringsock::server::SendStatus;
        self.accepted.fetch_add(1, Ordering::SeqCst);
        match ws.send(msg) {
            SendStatus::Queued | SendStatus::Backpressure => {
                self.queued.fetch_add(1, Ordering::SeqCst);
            }
            // After our 1001 the peer's messages are still delivered; replies are refused.
            SendStatus::Closed => {}
            SendStatus::Dropped | SendStatus::QueueFull => {
                self.dropped.fetch_add(1, Ordering::SeqCst);
            }
        }
    }
}

#[test]
fn graceful_shutdown_under_load_delivers_everything_sent_and_echoes_what_came_before_1001() {
    const CLIENTS: usize = 8;
    let counts = Arc::new(CountingEcho {
        accepted: AtomicUsize::new(0),
        queued: AtomicUsize::new(0),
        dropped: AtomicUsize::new(0),
    });
    struct Shared(Arc<CountingEcho>);
    impl ringsock::server::Handler for Shared {
        type State = ();
        fn on_upgrade(
            &self,
            r: &ringsock::proto::handshake::Request<'_>,
            u: &mut ringsock::server::Upgrade<()>,
        ) -> ringsock::server::Decision<()> {
            self.0.on_upgrade(r, u)
        }
        fn on_message(
            &self,
            ws: &mut ringsock::server::Ws<'_, ()>,
            msg: ringsock::server::Message<'_>,
        ) {
            self.0.on_message(ws, msg)
        }
    }
    let handle = ringsock::server::Builder::new()
        .addr("127.0.0.1:0")
        .shards(2)
        .pin_threads(false)
        .close_timeout(Duration::from_secs(3))
        .build(Shared(Arc::clone(&counts)))
        .start()
        .expect("server starts");
    let addr = handle.local_addr();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let c = open(addr);
            let mut writer = c.stream.try_clone().unwrap();
            let done = Arc::new(AtomicBool::new(false));
            let stop_writing = Arc::clone(&done);
            let write = std::thread::spawn(move || {
                let mut seq = 0u64;
                while !stop_writing.load(Ordering::SeqCst) {
                    let frame = masked_frame(true, 2, &seq.to_be_bytes());
                    if writer.write_all(&frame).is_err() {
                        break;
                    }
                    seq += 1;
                    if seq % 64 == 0 {
                        std::thread::sleep(Duration::from_micros(200));
                    }
                }
                // Answer the server's close (RFC 6455 §5.5.1), then stop.
                let _ = writer.write_all(&masked_frame(true, 8, &1001u16.to_be_bytes()));
                seq
            });
            let read = std::thread::spawn(move || {
                let mut c = c;
                let mut next = 0u64;
                loop {
                    let frame = c.read_frame();
                    if frame.opcode == 8 {
                        done.store(true, Ordering::SeqCst);
                        let eof = c.sees_eof();
                        return (next, frame.close_code(), eof);
                    }
                    let seq = u64::from_be_bytes(frame.payload.try_into().unwrap());
                    assert_eq!(seq, next, "echoes in order without a gap");
                    next += 1;
                }
            });
            (write, read)
        })
        .collect();
    std::thread::sleep(Duration::from_millis(700));
    let started = Instant::now();
    handle.shutdown().expect("clean shutdown");
    let took = started.elapsed();
    let mut echoed = 0u64;
    let mut sent = 0u64;
    for (write, read) in clients {
        let (received, code, eof) = read.join().expect("reader");
        sent += write.join().unwrap();
        assert_eq!(code, Some(1001), "every client gets 1001");
        assert!(eof, "TCP closed after the closing handshake");
        assert!(received > 0);
        echoed += received;
    }
    let accepted = counts.accepted.load(Ordering::SeqCst) as u64;
    let queued = counts.queued.load(Ordering::SeqCst) as u64;
    eprintln!(
        "shutdown under load: {sent} sent, {accepted} delivered, {queued} echoes queued, \
         {echoed} echoed, shutdown took {took:?}"
    );
    assert_eq!(counts.dropped.load(Ordering::SeqCst), 0);
    assert_eq!(
        accepted, sent,
        "every message sent before the client's close was delivered"
    );
    assert_eq!(
        echoed, queued,
        "every echo queued before our 1001 was written before it"
    );
    assert!(took < Duration::from_secs(3), "shutdown took {took:?}");
    assert!(handle.is_stopped());
}

#[test]
fn endless_empty_continuations_keep_memory_flat_and_others_served() {
    // Empty fragments never reach the message limit: what bounds them is memory staying flat
    // (nothing is kept per frame) and the shard staying fair to others.
    let mut child = ChildServer::start("");
    still_serves(child.addr);
    let before = child.rss_kib();
    let c = open_child(&child);
    let mut writer = c.stream.try_clone().unwrap();
    let stop_flag = Arc::new(AtomicBool::new(false));
    let stop_writing = Arc::clone(&stop_flag);
    let flood = std::thread::spawn(move || {
        let _ = writer.write_all(&masked_frame(false, 1, b""));
        let batch: Vec<u8> = masked_frame(false, 0, b"").repeat(10_000);
        let mut frames = 0u64;
        while !stop_writing.load(Ordering::SeqCst) && writer.write_all(&batch).is_ok() {
            frames += 10_000;
        }
        frames
    });
    let mut other = open_child(&child);
    let mut rtts = Vec::new();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(2) {
        rtts.push(echo_once(&mut other, b"fair share"));
        std::thread::sleep(Duration::from_millis(10));
    }
    stop_flag.store(true, Ordering::SeqCst);
    let frames = flood.join().unwrap();
    rtts.sort();
    let peak = child.peak_rss_kib();
    eprintln!(
        "empty continuations: {frames} frames in 2 s; other client p50 {:?} p99 {:?}; server \
         RSS {before} KiB before, peak {peak} KiB",
        percentile(&rtts, 50.0),
        percentile(&rtts, 99.0)
    );
    assert!(frames > 100_000, "the flood ran");
    // A connection may fill the whole provided-buffer ring (4 MiB by default) with frames
    // that take the longest to parse; others wait behind that much work per batch. Measured:
    // p99 20-45 ms in release, about 600 ms unoptimized (2 busy cores).
    let bound = if cfg!(debug_assertions) {
        Duration::from_secs(2)
    } else {
        Duration::from_millis(200)
    };
    let p99 = percentile(&rtts, 99.0);
    assert!(
        p99 < bound,
        "p99 {p99:?} for a client sharing the shard with the flood"
    );
    assert!(
        peak < before + 16 * 1024,
        "peak RSS {peak} KiB from {before} KiB"
    );
    drop((c, other));
    child.wait_connections(0, 10);
    assert!(child.stop().success());
}

#[test]
fn shutdown_with_a_stuck_client_over_the_mark_is_bounded_by_the_close_timeout() {
    // The client's output is over the high-water mark with a send blocked in the kernel:
    // our 1001 close can never be flushed, so the close timeout must end it.
    let close = Duration::from_millis(500);
    let (handle, probe) = start(builder().high_water_mark(64 * 1024).close_timeout(close));
    let mut stuck = open(handle.local_addr());
    stuck.send_frame(true, 1, b"cmd:flood:200:65536");
    wait_for(5, "backpressure", || {
        probe.backpressure.load(Ordering::SeqCst) > 0
    });
    let mut fine = open(handle.local_addr());
    echo_once(&mut fine, b"before shutdown");
    let started = Instant::now();
    handle.request_shutdown();
    assert_eq!(fine.read_close(), Some(1001));
    fine.send_frame(true, 8, &1001u16.to_be_bytes());
    assert!(fine.sees_eof());
    handle.wait().expect("clean exit");
    let took = started.elapsed();
    eprintln!("shutdown with a stuck client took {took:?}");
    assert!(took < close * 2 + Duration::from_millis(2500), "{took:?}");
    assert!(handle.is_stopped());
    assert_eq!(handle.stats().total_connections(), 0);
    drop(stuck);
}

#[test]
fn common_locked_memory_limit_starts_every_shard_with_fallbacks() {
    // 8 MiB is the usual default `ulimit -l`; root is held to it too (CAP_IPC_LOCK dropped).
    // 16 rings fit in it easily; the optional registered memory must not take their room.
    let started = ChildServer::try_start("shards=16,memlock=8388608");
    let mut child = match started {
        Ok(child) => child,
        Err((why, stderr)) => panic!("did not start: {why}\n{stderr}"),
    };
    let mut clients: Vec<RawClient> = (0..64).map(|_| open_child(&child)).collect();
    for c in &mut clients {
        echo_once(c, b"served");
    }
    drop(clients);
    eprintln!("memlock 8 MiB, 16 shards:\n{}", child.stderr());
    child.wait_connections(0, 10);
    assert!(child.stop().success());
}

#[test]
fn locked_memory_too_small_for_a_ring_fails_start_naming_the_cause() {
    let Err((why, _)) = ChildServer::try_start("memlock=0") else {
        panic!("started without locked memory for its ring");
    };
    assert!(why.contains("io_uring unavailable"), "{why}");
    assert!(why.contains("locked memory"), "{why}");
}

// ---------------------------------------------------------------------------------------------
// Fairness: a connection that floods does not starve the others

/// Connections that each send `frames` (whole masked frames, back to back) as fast as the
/// server takes them and read everything echoed, from threads of their own; stopped and
/// joined by [`Flood::stop`], which returns the bytes echoed to them.
struct Flood {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<u64>>,
}

impl Flood {
    fn start(addr: SocketAddr, conns: usize, frames: &[u8]) -> Flood {
        let stop = Arc::new(AtomicBool::new(false));
        let frames: Arc<[u8]> = frames.into();
        let mut threads = Vec::new();
        for _ in 0..conns {
            let c = open(addr);
            let mut writer = c.stream.try_clone().unwrap();
            let mut reader = c.stream;
            reader
                .set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            let (stop_w, stop_r, frames) = (Arc::clone(&stop), Arc::clone(&stop), frames.clone());
            threads.push(std::thread::spawn(move || {
                while !stop_w.load(Ordering::SeqCst) && writer.write_all(&frames).is_ok() {}
                let _ = writer.shutdown(Shutdown::Write);
                0
            }));
            threads.push(std::thread::spawn(move || {
                let mut chunk = vec![0u8; 256 * 1024];
                let mut echoed = 0u64;
                loop {
                    match reader.read(&mut chunk) {
                        Ok(0) => break,
                        Ok(n) => echoed += n as u64,
                        Err(e)
                            if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) =>
                        {
                            if stop_r.load(Ordering::SeqCst) {
                                break;
                            }
                        }
                        Err(_) => break,
                    }
                }
                echoed
            }));
        }
        Flood { stop, threads }
    }

    fn stop(self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        self.threads.into_iter().map(|t| t.join().unwrap()).sum()
    }
}

/// Echo round trips of a small message on a connection of its own while `flooders`
/// connections flood with `frames`, on a server started from `builder`: (p50, p99, max) of
/// 50 echoes, 20 ms apart. (A starved echo fails the test at the 5 s read timeout.)
fn echoes_beside_a_flood(
    what: &str,
    builder: ringsock::server::Builder,
    flooders: usize,
    frames: &[u8],
) -> [Duration; 3] {
    let (handle, _) = start(builder);
    let addr = handle.local_addr();
    let mut victim = open(addr);
    echo_once(&mut victim, b"before the flood");
    let flood = Flood::start(addr, flooders, frames);
    // Let the flood fill the socket buffers and the provided-buffer ring first.
    std::thread::sleep(Duration::from_millis(300));
    let mut rtts: Vec<Duration> = (0..50)
        .map(|_| {
            std::thread::sleep(Duration::from_millis(20));
            echo_once(&mut victim, b"fair share")
        })
        .collect();
    let echoed = flood.stop();
    rtts.sort();
    let figures = [
        percentile(&rtts, 50.0),
        percentile(&rtts, 99.0),
        *rtts.last().unwrap(),
    ];
    eprintln!(
        "{what}: {} MiB echoed to {flooders} flooding connection(s); the other's echo p50 {:?} \
         p99 {:?} max {:?}",
        echoed >> 20,
        figures[0],
        figures[1],
        figures[2]
    );
    assert!(echoed > 1 << 20, "{what}: the flood ran");
    drop(victim);
    stop(handle);
    figures
}

/// The bound on the p99 of the echoes beside a flood: generous, so a loaded 2-core machine
/// does not make it flake; `perf/` gives the precise figure.
fn fair_bound() -> Duration {
    if cfg!(debug_assertions) {
        Duration::from_secs(1)
    } else {
        Duration::from_millis(200)
    }
}

// Against the code before the fairness work these did not fail (p99 21-28 ms beside tiny
// frames, 2-10 ms beside 1 MiB messages, release): they guard against starvation, not the
// few milliseconds the receive budget saves, which `perf/` measures. The small-ring variant
// failed (an echo starved for over 5 s) with receives re-armed in completion order.

#[test]
fn a_connection_flooding_tiny_frames_does_not_starve_another() {
    let frames = masked_frame(true, 2, b"x").repeat(8192);
    let [_, p99, _] = echoes_beside_a_flood("tiny frames", builder(), 1, &frames);
    assert!(
        p99 < fair_bound(),
        "p99 {p99:?} beside a flood of tiny frames"
    );
}

#[test]
fn a_connection_flooding_tiny_frames_into_a_small_buffer_ring_does_not_starve_another() {
    // 32 buffers: the flood takes every one in each round and ends with ENOBUFS before the
    // other connection's receive does; re-armed in the wrong order, the other never gets one.
    let small = builder().configure(|c| c.buffers.recv_buffers = 32);
    let frames = masked_frame(true, 2, b"x").repeat(8192);
    let [_, p99, _] = echoes_beside_a_flood("tiny frames, 32 buffers", small, 1, &frames);
    assert!(
        p99 < fair_bound(),
        "p99 {p99:?} beside a flood of tiny frames"
    );
}

#[test]
fn a_connection_flooding_large_messages_does_not_starve_another() {
    let frames = masked_frame(true, 2, &vec![0x5a; 1 << 20]);
    let [_, p99, _] = echoes_beside_a_flood("1 MiB messages", builder(), 1, &frames);
    assert!(
        p99 < fair_bound(),
        "p99 {p99:?} beside a flood of 1 MiB messages"
    );
}

/// Holds the shard for 500 ms (`cmd:sleep`), writes `frames` meanwhile so they wait in the
/// socket and arrive as several 32 KiB receives in one round, reads their `echoed` bytes
/// back, and returns how many receives the shard held back to a later round.
fn receives_held_back(frames: &[u8], echoed: usize) -> u64 {
    let (handle, _) = start(builder());
    let mut c = open(handle.local_addr());
    // Read before the shard sleeps: it answers for its metrics between rounds.
    let before = handle.metrics().recvs_held_back;
    c.send_frame(true, 1, b"cmd:sleep:500");
    std::thread::sleep(Duration::from_millis(50));
    // The write may block until the shard reads again; the shard wakes by itself.
    c.stream.write_all(frames).expect("frames written");
    let mut chunk = vec![0u8; 64 * 1024];
    let mut got = 0;
    while got < echoed {
        let n = c.stream.read(&mut chunk).expect("echoes read");
        assert!(n > 0, "closed before every echo");
        got += n;
    }
    assert_eq!(got, echoed, "exactly the echoes");
    let held = handle.metrics().recvs_held_back - before;
    drop(c);
    stop(handle);
    held
}

#[test]
fn the_receive_budget_counts_frames_as_well_as_bytes() {
    // 96 KiB is well under the round's 256 KiB of bytes. In 7-byte frames it is 14,043
    // frames, each charged as 1 KiB: the first 32 KiB receive uses up the round and the
    // rest of the connection's receives wait for the next. With bytes alone (the budget
    // before `46a2821`), none would.
    let tiny = masked_frame(true, 2, b"x");
    let n = 96 * 1024 / tiny.len();
    let held = receives_held_back(&tiny.repeat(n), n * 3);
    assert!(held > 0, "receives of {n} tiny frames held back: {held}");
    // The same bytes in six 16 KiB messages cost 102 of the 256: nothing waits.
    let large = masked_frame(true, 2, &vec![0x5a; 16 * 1024 - 14]);
    let held = receives_held_back(&large.repeat(6), 6 * (16 * 1024 - 10));
    assert_eq!(held, 0, "receives of six 16 KiB messages held back");
}

/// `conns` connections, each sending `burst` binary messages of `size` bytes at a time and
/// waiting for all their echoes before the next burst, for `for_how_long`: the round-trip
/// time of every burst, sorted.
fn pipelined_bursts(
    addr: SocketAddr,
    conns: usize,
    burst: usize,
    size: usize,
    for_how_long: Duration,
) -> Vec<Duration> {
    let frames = masked_frame(true, 2, &vec![0x5a; size]).repeat(burst);
    let header = if size < 126 {
        2
    } else if size < 65536 {
        4
    } else {
        10
    };
    let echoed = (header + size) * burst;
    let frames: Arc<[u8]> = frames.into();
    let clients: Vec<RawClient> = (0..conns).map(|_| open(addr)).collect();
    let threads: Vec<_> = clients
        .into_iter()
        .map(|c| {
            let frames = Arc::clone(&frames);
            std::thread::spawn(move || {
                let mut stream = c.stream;
                let mut chunk = vec![0u8; 256 * 1024];
                let mut rtts = Vec::new();
                let started = Instant::now();
                while started.elapsed() < for_how_long {
                    let sent = Instant::now();
                    stream.write_all(&frames).expect("burst written");
                    let mut got = 0;
                    while got < echoed {
                        let n = stream.read(&mut chunk).expect("echoes read");
                        assert!(n > 0, "connection closed mid-burst");
                        got += n;
                    }
                    assert_eq!(got, echoed, "exactly the echoes of the burst");
                    rtts.push(sent.elapsed());
                }
                rtts
            })
        })
        .collect();
    let mut rtts: Vec<Duration> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    rtts.sort();
    rtts
}

#[test]
fn many_connections_with_pipelined_16_kib_messages_are_served_in_turn() {
    // 100 connections x 16 messages of 16 KiB in flight: 25 MiB, six times what the
    // provided-buffer ring holds, so receives end with ENOBUFS and are re-armed. Every
    // connection must get its turn at the buffers: no burst may wait far longer than the
    // typical one. Before the fairness work (re-arms in the order of a stack) this failed:
    // max 2.9-3.0 s, p99 0.76-1.05 s, p50 13-15 ms (release); after, max 87-200 ms.
    let (handle, _) = start(builder());
    let rtts = pipelined_bursts(
        handle.local_addr(),
        100,
        16,
        16 * 1024,
        Duration::from_secs(3),
    );
    let (p50, p99, max) = (
        percentile(&rtts, 50.0),
        percentile(&rtts, 99.0),
        *rtts.last().unwrap(),
    );
    eprintln!(
        "100 x 16 x 16 KiB: {} bursts, round trip p50 {p50:?} p99 {p99:?} max {max:?}",
        rtts.len()
    );
    assert!(rtts.len() >= 100, "every connection completed a burst");
    let bound = if cfg!(debug_assertions) {
        Duration::from_secs(2)
    } else {
        Duration::from_millis(300)
    };
    assert!(
        max < bound,
        "a burst waited {max:?} (p50 {p50:?}, p99 {p99:?})"
    );
    stop(handle);
}
