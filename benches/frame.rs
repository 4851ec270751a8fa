//! The per-message cost of the protocol core: a small client frame parsed, unmasked,
//! validated and handed out ([`Connection::handle_read`]), and a small server frame encoded
//! ([`Connection::send`]).
//!
//! Target (issue 2): a 16-byte text frame parsed, unmasked and validated in under 20 ns.
//! The read benches use an all-zero masking key so the buffer stays valid across iterations:
//! the unmasking still runs over every byte, XOR with zero is no cheaper than XOR with any
//! other key. tokio-websockets and tungstenite parse frames only inside their stream types
//! (no public frame-level decoder), so there is no peer row here; their end-to-end cost is in
//! `perf/`.
//!
//! Run: `cargo bench --bench frame -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ringsock::proto::frame::{encode_header, MAX_HEADER_LEN};
use ringsock::proto::{Config, Connection, Event, OpCode};

/// A masked client frame with an all-zero key.
fn client_frame(opcode: OpCode, fin: bool, payload: &[u8]) -> Vec<u8> {
    let mut header = [0u8; MAX_HEADER_LEN];
    let n = encode_header(&mut header, fin, false, opcode, payload.len(), Some([0; 4]));
    let mut frame = header[..n].to_vec();
    frame.extend_from_slice(payload);
    frame
}

/// Feeds one read and counts the message bytes delivered.
fn read_all(conn: &mut Connection, read: &mut [u8], out: &mut Vec<u8>) -> usize {
    let mut pos = 0;
    let mut delivered = 0;
    loop {
        let progress = conn.handle_read(&mut read[pos..], out);
        pos += progress.consumed;
        match progress.event {
            Some(Event::Text(t)) => delivered += t.len(),
            Some(Event::Binary(b)) => delivered += b.len(),
            Some(_) => {}
            None => return delivered,
        }
    }
}

fn bench_read(c: &mut Criterion) {
    let mut group = c.benchmark_group("read");
    for size in [16usize, 125, 1024] {
        let text = "a".repeat(size);
        let mut frame = client_frame(OpCode::Text, true, text.as_bytes());
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_with_input(BenchmarkId::new("text_frame", size), &size, |b, _| {
            let mut conn = Connection::new(Config::default(), None);
            let mut out = Vec::new();
            b.iter(|| read_all(&mut conn, black_box(&mut frame), &mut out))
        });
    }
    // 64 small text messages in one read: what a pipelining client's batch looks like.
    let one = client_frame(OpCode::Text, true, b"0123456789abcdef");
    let mut batch: Vec<u8> = one.iter().copied().cycle().take(one.len() * 64).collect();
    group.throughput(Throughput::Elements(64));
    group.bench_function("text_16B_x64_one_read", |b| {
        let mut conn = Connection::new(Config::default(), None);
        let mut out = Vec::new();
        b.iter(|| read_all(&mut conn, black_box(&mut batch), &mut out))
    });
    // A text message in three fragments: the reassembly path with incremental validation.
    let mut fragmented = [
        client_frame(OpCode::Text, false, &[b'x'; 100]),
        client_frame(OpCode::Continuation, false, &[b'y'; 100]),
        client_frame(OpCode::Continuation, true, &[b'z'; 100]),
    ]
    .concat();
    group.throughput(Throughput::Bytes(300));
    group.bench_function("text_300B_in_3_fragments", |b| {
        let mut conn = Connection::new(Config::default(), None);
        let mut out = Vec::new();
        b.iter(|| read_all(&mut conn, black_box(&mut fragmented), &mut out))
    });
    group.finish();
}

fn bench_encode(c: &mut Criterion) {
    let mut group = c.benchmark_group("encode");
    for size in [16usize, 125, 1024] {
        let payload = vec![b'a'; size];
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_with_input(BenchmarkId::new("text_frame", size), &size, |b, _| {
            let mut conn = Connection::new(Config::default(), None);
            let mut out = Vec::with_capacity(2048);
            b.iter(|| {
                out.clear();
                conn.send(&mut out, OpCode::Text, black_box(&payload), false)
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench_read, bench_encode);
criterion_main!(benches);
