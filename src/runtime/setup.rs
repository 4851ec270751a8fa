//! Bringing a shard's ring up: the kernel checks, the optional provided-buffer ring with its
//! fallback, and the [`RingGate`] that keeps the shards' optional locked memory from taking
//! the room a later shard's ring needs.

use std::io;
use std::sync::{Condvar, Mutex};

use super::config::Buffers;
use super::ring::{BufRing, Ring};

/// Holds each shard's optional locked memory (its buffer ring) back until every shard has
/// created its ring: RLIMIT_MEMLOCK is one budget for all of them, and the optional
/// registration (which falls back) must not take the room a later shard's ring needs (which
/// does not).
pub(crate) struct RingGate {
    pending: Mutex<usize>,
    all_in: Condvar,
}

impl RingGate {
    /// A gate for `shards` shards.
    pub fn new(shards: usize) -> RingGate {
        RingGate {
            pending: Mutex::new(shards),
            all_in: Condvar::new(),
        }
    }

    /// One shard has its ring (or never will, `wait` false); with `wait`, blocks until every
    /// shard got that far.
    pub fn arrive(&self, wait: bool) {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        *pending = pending.saturating_sub(1);
        if *pending == 0 {
            self.all_in.notify_all();
        }
        while wait && *pending > 0 {
            pending = self.all_in.wait(pending).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// Whether the running kernel is at least `major.minor` (true when it cannot be read: the
/// operations themselves will tell).
pub(crate) fn kernel_at_least(major: u32, minor: u32) -> bool {
    let Ok(release) = std::fs::read_to_string("/proc/sys/kernel/osrelease") else {
        return true;
    };
    let mut parts = release.trim().split(|c: char| !c.is_ascii_digit());
    let maj: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    let min: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    (maj, min) >= (major, minor)
}

/// A shard's ring, ready: whether its receives can be multishot (6.0+ and a registered
/// buffer ring).
pub(crate) struct Ready {
    /// The ring, with its buffer ring registered if that worked.
    pub ring: Ring,
    /// Multishot receives into the buffer ring.
    pub multishot_recv: bool,
}

/// Sets up shard `index`'s ring (on the thread that will run it), passing `gate` once the
/// ring exists.
///
/// # Errors
/// io_uring unavailable or too old (the message names the cause).
pub(crate) fn open_ring(buffers: &Buffers, index: usize, gate: &RingGate) -> io::Result<Ready> {
    let ring = Ring::new(buffers.ring_entries.max(8));
    gate.arrive(ring.is_ok());
    let mut ring = ring?;
    let missing = ring.missing_opcodes();
    if !missing.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!("io_uring lacks {} (needs Linux 5.19+)", missing.join(", ")),
        ));
    }
    if !kernel_at_least(5, 19) {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "io_uring too old: ringsock needs Linux 5.19+ (multishot accept)",
        ));
    }
    let mut multishot_recv = kernel_at_least(6, 0);
    if buffers.use_buffer_ring && multishot_recv {
        let registered = BufRing::new(buffers.recv_buffers, buffers.recv_buffer_size, 0)
            .and_then(|bufs| ring.register_buf_ring(bufs));
        if let Err(e) = registered {
            // One line per shard that falls back: with a tight memlock limit the later
            // shards may fall back where the first did not.
            tracing::warn!(shard = index, error = %e, "no provided-buffer ring: using single-shot receives");
        }
    }
    multishot_recv &= ring.has_buf_ring();
    tracing::debug!(
        shard = index,
        features = ?ring.features(),
        buffer_ring = ring.has_buf_ring(),
        multishot_recv,
        "ring ready"
    );
    Ok(Ready {
        ring,
        multishot_recv,
    })
}
