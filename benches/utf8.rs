//! UTF-8 validation throughput (RFC 6455 §8.1) on ASCII and on mixed multibyte text.
//!
//! For each input: `std::str::from_utf8` as the baseline, `validate` (simdutf8, one call), the
//! incremental `Utf8Validator` fed the whole message at once, and the same fed in 1500-byte
//! chunks (about one Ethernet frame's payload per read), which on multibyte text splits code
//! points and exercises the carry path.
//!
//! Run: `cargo bench --bench utf8 -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ringsock::proto::utf8::{validate, Utf8Validator};

/// Short messages (16 B, 125 B) to bulk ones (64 KiB, 1 MiB).
const SIZES: [usize; 5] = [16, 125, 1024, 64 * 1024, 1024 * 1024];

/// Chunk size of the chunked validator runs.
const CHUNK: usize = 1500;

/// Latin, accented Latin, CJK, emoji: 1-, 2-, 3- and 4-byte code points.
const MIXED: &str = "Grüße aus Köln! 世界你好, ça va? 🦀🚀 Ünïcödé ünd ASCII mixed τέλος ";

/// `sample` repeated and cut to at most `size` bytes, on a code point boundary.
fn text(sample: &str, size: usize) -> Vec<u8> {
    let mut out = String::with_capacity(size + sample.len());
    while out.len() < size {
        out.push_str(sample);
    }
    let mut end = size;
    while !out.is_char_boundary(end) {
        end -= 1;
    }
    out.truncate(end);
    out.into_bytes()
}

fn bench_utf8(c: &mut Criterion) {
    let inputs = [
        ("ascii", "The quick brown fox jumps over the lazy dog. "),
        ("mixed", MIXED),
    ];
    for (kind, sample) in inputs {
        let mut group = c.benchmark_group(format!("utf8/{kind}"));
        for size in SIZES {
            let bytes = text(sample, size);
            group.throughput(Throughput::Bytes(bytes.len() as u64));
            group.bench_with_input(BenchmarkId::new("std", size), &bytes, |b, bytes| {
                b.iter(|| std::str::from_utf8(black_box(bytes)).is_ok())
            });
            group.bench_with_input(BenchmarkId::new("validate", size), &bytes, |b, bytes| {
                b.iter(|| validate(black_box(bytes)).is_ok())
            });
            group.bench_with_input(BenchmarkId::new("validator", size), &bytes, |b, bytes| {
                b.iter(|| {
                    let mut validator = Utf8Validator::new();
                    validator.feed(black_box(bytes)).is_ok() && validator.finish().is_ok()
                })
            });
            if bytes.len() > CHUNK {
                let id = BenchmarkId::new(format!("validator_{CHUNK}B_chunks"), size);
                group.bench_with_input(id, &bytes, |b, bytes| {
                    b.iter(|| {
                        let mut validator = Utf8Validator::new();
                        let fed = black_box(bytes)
                            .chunks(CHUNK)
                            .all(|c| validator.feed(c).is_ok());
                        fed && validator.finish().is_ok()
                    })
                });
            }
        }
        group.finish();
    }
}

criterion_group!(benches, bench_utf8);
criterion_main!(benches);
