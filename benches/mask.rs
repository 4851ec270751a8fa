//! Unmasking throughput (RFC 6455 §5.3) across payload sizes.
//!
//! For each size: the dispatcher (`apply_mask`, whatever kernel this CPU gets; from 64 KiB
//! also on a buffer one byte off alignment), the byte-at-a-time reference, the portable
//! word-at-a-time loop, and a plain `copy_from_slice` of the same size as the memory-bandwidth
//! yardstick. The target is that the dispatcher stays
//! within 1.2x of the memcpy time from 64 KiB up.
//!
//! tokio-websockets and tungstenite are not compared: both keep their masking functions in a
//! private `mask` module (tokio-websockets `src/lib.rs` `mod mask;`, tungstenite
//! `protocol/frame/mod.rs` `mod mask;`), so they cannot be called from here.
//!
//! Run: `cargo bench --bench mask -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ringsock::proto::mask::{apply_mask, apply_mask_portable, apply_mask_scalar, kernel_name};

/// 16 B and 125 B are typical short messages (125 is the largest control payload); 1 KiB
/// to 1 MiB cover bulk messages from L1-resident to beyond L2.
const SIZES: [usize; 5] = [16, 125, 1024, 64 * 1024, 1024 * 1024];

const MASK: [u8; 4] = [0x6d, 0xb6, 0xb2, 0x80];

fn bench_mask(c: &mut Criterion) {
    let mut group = c.benchmark_group("mask");
    for size in SIZES {
        group.throughput(Throughput::Bytes(size as u64));
        let mut buf: Vec<u8> = (0..size).map(|i| i as u8).collect();
        let label = format!("apply_mask/{}", kernel_name());
        group.bench_with_input(BenchmarkId::new(label, size), &size, |b, _| {
            b.iter(|| apply_mask(black_box(&mut buf), black_box(MASK), black_box(0)))
        });
        group.bench_with_input(BenchmarkId::new("scalar", size), &size, |b, _| {
            b.iter(|| apply_mask_scalar(black_box(&mut buf), black_box(MASK), black_box(0)))
        });
        group.bench_with_input(BenchmarkId::new("portable", size), &size, |b, _| {
            b.iter(|| apply_mask_portable(black_box(&mut buf), black_box(MASK), black_box(0)))
        });
        if size >= 64 * 1024 {
            // The same work starting one byte past the allocation's alignment.
            let mut shifted = vec![0u8; size + 1];
            let label = format!("apply_mask_offset1/{}", kernel_name());
            group.bench_with_input(BenchmarkId::new(label, size), &size, |b, _| {
                let buf = &mut shifted[1..];
                b.iter(|| apply_mask(black_box(&mut *buf), black_box(MASK), black_box(0)))
            });
        }
        let src = buf.clone();
        group.bench_with_input(BenchmarkId::new("memcpy", size), &size, |b, _| {
            b.iter(|| black_box(&mut buf[..]).copy_from_slice(black_box(&src[..])))
        });
    }
    group.finish();
}

criterion_group!(benches, bench_mask);
criterion_main!(benches);
