//! The per-message path allocates nothing once buffers reached their working size: a counting
//! global allocator watches a shard echo thousands of messages (server and client share the
//! process, so the client below is written not to allocate either).

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::Echo;
use ringsock::server::Builder;

struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards every call to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const PAYLOAD: usize = 100;

/// One masked binary frame of PAYLOAD bytes, as a client sends it.
fn client_frame() -> Vec<u8> {
    let mask = [1u8, 2, 3, 4];
    let mut frame = vec![0x82, 0x80 | PAYLOAD as u8];
    frame.extend_from_slice(&mask);
    frame.extend((0..PAYLOAD).map(|i| (i as u8) ^ mask[i % 4]));
    frame
}

/// Sends `count` frames in batches of 10 and reads every echo back into a fixed buffer.
fn echo(stream: &mut TcpStream, frame: &[u8], count: usize) {
    let mut batch = [0u8; 10 * (6 + PAYLOAD)];
    for chunk in batch.chunks_mut(frame.len()) {
        chunk.copy_from_slice(frame);
    }
    let reply_len = 2 + PAYLOAD;
    let mut reply = [0u8; 10 * (2 + PAYLOAD)];
    for _ in 0..count / 10 {
        stream.write_all(&batch).unwrap();
        stream.read_exact(&mut reply).unwrap();
        assert_eq!(&reply[..2], &[0x82, PAYLOAD as u8]);
        assert_eq!(reply[reply_len - 1], (PAYLOAD - 1) as u8);
    }
}

fn per_message_allocations(configure: impl FnOnce(&mut ringsock::server::Config)) -> f64 {
    let handle = Builder::new()
        .addr("127.0.0.1:0")
        .shards(1)
        .pin_threads(false)
        .configure(configure)
        .build(Echo)
        .start()
        .unwrap();
    let mut stream = TcpStream::connect(handle.local_addr()).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.set_nodelay(true).unwrap();
    stream
        .write_all(
            b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        )
        .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8];
    while !head.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"));
    let frame = client_frame();
    echo(&mut stream, &frame, 2000); // warm up: buffers reach their working size
    let before = ALLOCATIONS.load(Ordering::SeqCst);
    let messages = 20_000;
    echo(&mut stream, &frame, messages);
    let after = ALLOCATIONS.load(Ordering::SeqCst);
    drop(stream);
    handle.shutdown().expect("clean shutdown");
    (after - before) as f64 / messages as f64
}

#[test]
fn echo_path_does_not_allocate_per_message() {
    let per_message = per_message_allocations(|_| {});
    assert!(per_message < 0.01, "{per_message} allocations per message");
}

#[test]
fn fallback_paths_do_not_allocate_per_message_either() {
    let per_message = per_message_allocations(|c| {
        c.buffers.use_buffer_ring = false;
    });
    assert!(per_message < 0.01, "{per_message} allocations per message");
}
