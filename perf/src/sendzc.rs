//! `sendzc`: does zero-copy send pay on loopback? One thread on core 0 writes 16 MiB messages
//! to a loopback TCP socket with io_uring, as `IORING_OP_SEND` or `IORING_OP_SEND_ZC` (each
//! waited for, notification included, before the next), while a reader thread on core 1
//! reads them into a 1 MiB buffer. Prints each thread's CPU time and the wall time per
//! message. On loopback the sending thread also runs the receiver's TCP input (softirq), so
//! its CPU time covers the whole send path.

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::time::Instant;

use io_uring::{cqueue, opcode, types, IoUring};

use crate::sys;

const SIZE: usize = 16 << 20;

/// `sendzc send|zc [MESSAGES]` (default 100).
pub fn run(argv: &[String]) -> Result<(), String> {
    let zc = match argv.first().map(String::as_str) {
        Some("zc") => true,
        Some("send") => false,
        _ => return Err("usage: ringsock-perf sendzc send|zc [MESSAGES]".into()),
    };
    let msgs: usize = match argv.get(1) {
        Some(n) => n.parse().map_err(|_| format!("not a count: {n}"))?,
        None => 100,
    };
    fn err(what: &'static str) -> impl Fn(std::io::Error) -> String {
        move |e| format!("{what}: {e}")
    }
    let listener = TcpListener::bind("127.0.0.1:0").map_err(err("bind"))?;
    let addr = listener.local_addr().map_err(err("address"))?;
    let reader = std::thread::spawn(move || -> std::io::Result<u64> {
        sys::pin_to_core(1)?;
        let mut s = TcpStream::connect(addr)?;
        let mut buf = vec![0u8; 1 << 20];
        let (mut total, start) = (0, sys::thread_cpu_ns());
        while total < msgs * SIZE {
            match s.read(&mut buf)? {
                0 => break,
                n => total += n,
            }
        }
        Ok(sys::thread_cpu_ns() - start)
    });
    sys::pin_to_core(0).map_err(err("pin"))?;
    let (sock, _) = listener.accept().map_err(err("accept"))?;
    let fd = types::Fd(sock.as_raw_fd());
    let data = vec![7u8; SIZE];
    let mut ring = IoUring::new(64).map_err(err("io_uring"))?;
    let (wall, cpu) = (Instant::now(), sys::thread_cpu_ns());
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
            unsafe { ring.submission().push(&sqe) }.map_err(|_| "submission queue full")?;
            let (mut sent, mut notif_pending) = (None, false);
            while sent.is_none() || notif_pending {
                ring.submit_and_wait(1).map_err(err("enter"))?;
                for c in ring.completion() {
                    if cqueue::notif(c.flags()) {
                        notif_pending = false;
                    } else {
                        sent = Some(c.result());
                        notif_pending = cqueue::more(c.flags());
                    }
                }
            }
            match sent {
                Some(n) if n > 0 => off += n as usize,
                other => return Err(format!("send failed: {other:?}")),
            }
        }
    }
    let (cpu, wall) = (sys::thread_cpu_ns() - cpu, wall.elapsed().as_nanos() as u64);
    drop(sock);
    let reader_cpu = reader
        .join()
        .map_err(|_| "reader panicked")?
        .map_err(err("reader"))?;
    let per = |ns: u64| ns as f64 / 1e6 / msgs as f64;
    println!(
        "{}: {msgs} x 16 MiB: sender CPU {:.3} ms/msg, reader CPU {:.3} ms/msg, wall {:.3} ms/msg",
        if zc { "SEND_ZC" } else { "SEND   " },
        per(cpu),
        per(reader_cpu),
        per(wall)
    );
    Ok(())
}
