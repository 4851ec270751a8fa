//! Does zero-copy send pay on loopback? One sender thread (core 0) writes 16 MiB messages to a
//! loopback TCP socket with io_uring, as `IORING_OP_SEND` or `IORING_OP_SEND_ZC` (each
//! waited for, notification included, before the next), while a reader thread (core 1)
//! reads them into a 1 MiB buffer. Prints each thread's CPU time and the wall time per
//! message. On loopback the sender's thread also runs the receiver's TCP input (softirq), so
//! its CPU time covers the whole send path.
//!
//! ```sh
//! cargo build --release -p ringsock-perf --bin sendzc
//! for i in 1 2 3; do target/release/sendzc send 100; target/release/sendzc zc 100; done
//! ```

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;

use io_uring::{cqueue, opcode, types, IoUring};

const SIZE: usize = 16 << 20;

fn pin(core: usize) {
    // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET and sched_setaffinity only read
    // and write that local set.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(core, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set);
    }
}

/// This thread's CPU time, in seconds.
fn thread_cpu() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

fn main() {
    let mut args = std::env::args().skip(1);
    let zc = match args.next().as_deref() {
        Some("zc") => true,
        Some("send") => false,
        _ => {
            eprintln!("usage: sendzc send|zc [MESSAGES]");
            std::process::exit(2);
        }
    };
    let msgs: usize = args.next().map_or(100, |s| s.parse().expect("a count"));
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("address");
    let reader = std::thread::spawn(move || {
        pin(1);
        let mut s = TcpStream::connect(addr).expect("connect");
        let mut buf = vec![0u8; 1 << 20];
        let (mut total, start) = (0, thread_cpu());
        while total < msgs * SIZE {
            match s.read(&mut buf).expect("read") {
                0 => break,
                n => total += n,
            }
        }
        thread_cpu() - start
    });
    pin(0);
    let (sock, _) = listener.accept().expect("accept");
    let fd = types::Fd(sock.as_raw_fd());
    let data = vec![7u8; SIZE];
    let mut ring = IoUring::new(64).expect("io_uring");
    let (wall, cpu) = (std::time::Instant::now(), thread_cpu());
    for _ in 0..msgs {
        let mut off = 0;
        while off < SIZE {
            let rest = &data[off..];
            let (ptr, len) = (rest.as_ptr(), rest.len() as u32);
            let sqe = if zc {
                opcode::SendZc::new(fd, ptr, len).build()
            } else {
                opcode::Send::new(fd, ptr, len).build()
            };
            // SAFETY: `data` outlives the operation: it is waited for below, and with SEND_ZC
            // until its notification says the kernel let go of the pages.
            unsafe { ring.submission().push(&sqe).expect("queue space") };
            let (mut sent, mut notif_pending) = (None, false);
            while sent.is_none() || notif_pending {
                ring.submit_and_wait(1).expect("enter");
                for c in ring.completion() {
                    if cqueue::notif(c.flags()) {
                        notif_pending = false;
                    } else {
                        sent = Some(c.result());
                        notif_pending = cqueue::more(c.flags());
                    }
                }
            }
            let sent = sent.unwrap_or(-1);
            assert!(sent > 0, "send failed: {sent}");
            off += sent as usize;
        }
    }
    let (cpu, wall) = (thread_cpu() - cpu, wall.elapsed().as_secs_f64());
    drop(sock);
    let reader_cpu = reader.join().expect("reader");
    let per = |s: f64| s * 1e3 / msgs as f64;
    println!(
        "{}: {msgs} x 16 MiB: sender CPU {:.3} ms/msg, reader CPU {:.3} ms/msg, wall {:.3} ms/msg",
        if zc { "SEND_ZC" } else { "SEND   " },
        per(cpu),
        per(reader_cpu),
        per(wall)
    );
}
