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

/// What one test echoes: `per_batch` masked binary frames of `len` bytes, written at once,
/// and the room to read their echoes into. Made before counting starts.
struct Load {
    len: usize,
    batch: Vec<u8>,
    reply: Vec<u8>,
}

impl Load {
    fn new(len: usize, per_batch: usize) -> Load {
        let mask = [1u8, 2, 3, 4];
        let mut frame = vec![0x82];
        if len < 126 {
            frame.push(0x80 | len as u8);
        } else {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&(len as u16).to_be_bytes());
        }
        frame.extend_from_slice(&mask);
        frame.extend((0..len).map(|i| (i as u8) ^ mask[i % 4]));
        let reply_header = if len < 126 { 2 } else { 4 };
        Load {
            len,
            batch: frame.repeat(per_batch),
            reply: vec![0; per_batch * (reply_header + len)],
        }
    }

    /// Writes batches until `count` frames went, reading every echo back.
    fn echo(&mut self, stream: &mut TcpStream, count: usize) {
        let per_batch = self.reply.len() / (self.len + if self.len < 126 { 2 } else { 4 });
        for _ in 0..count / per_batch {
            stream.write_all(&self.batch).unwrap();
            stream.read_exact(&mut self.reply).unwrap();
            assert_eq!(self.reply[0], 0x82);
            assert_eq!(self.reply[self.reply.len() - 1], (self.len - 1) as u8);
        }
    }
}

/// One test at a time: the count is process-wide.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Allocations per echoed message of `len` bytes, and the messages sent on without a copy.
fn per_message_allocations(
    len: usize,
    configure: impl FnOnce(&mut ringsock::server::Config),
) -> (f64, u64) {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
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
    let messages = if len < 1024 { 20_000 } else { 4_000 };
    let mut load = Load::new(len, if len < 1024 { 10 } else { 4 });
    load.echo(&mut stream, 2000); // warm up: buffers reach their working size
    let before = ALLOCATIONS.load(Ordering::SeqCst);
    load.echo(&mut stream, messages);
    let after = ALLOCATIONS.load(Ordering::SeqCst);
    let lent = handle.metrics().sent_lent;
    drop(stream);
    handle.shutdown().expect("clean shutdown");
    ((after - before) as f64 / messages as f64, lent)
}

#[test]
fn echo_path_does_not_allocate_per_message() {
    let (per_message, _) = per_message_allocations(100, |_| {});
    assert!(per_message < 0.01, "{per_message} allocations per message");
}

#[test]
fn fallback_paths_do_not_allocate_per_message_either() {
    let (per_message, _) = per_message_allocations(100, |c| {
        c.buffers.use_buffer_ring = false;
    });
    assert!(per_message < 0.01, "{per_message} allocations per message");
}

#[test]
fn messages_sent_on_without_a_copy_do_not_allocate_per_message() {
    // A message longer than a receive buffer spans two: each one is reassembled, and the
    // echo sends the reassembly buffer itself, which comes back once written.
    let len = ringsock::server::Config::default().buffers.recv_buffer_size + 8 * 1024;
    let (per_message, lent) = per_message_allocations(len, |_| {});
    assert!(
        lent >= 6000,
        "{lent} of 6,000 messages sent on without a copy"
    );
    assert!(per_message < 0.01, "{per_message} allocations per message");
}
