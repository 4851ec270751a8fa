//! Memory that one operation lends to the kernel: each type marks itself in flight when its
//! operation is pushed, offers no access to the memory through its safe API until the
//! completion checks it back in, and leaks the memory instead of freeing it if dropped while
//! still in flight (so a shard that dies with operations pending cannot free memory the
//! kernel may still write).

use io_uring::types::Timespec;

/// Bytes on their way to a socket. [`SendBuf::load`] takes a connection's corked output by
/// swapping vectors (no copy); once submitted the bytes stay untouched until
/// [`SendBuf::complete`] says how many were written.
#[derive(Default)]
pub(crate) struct SendBuf {
    pub(super) data: Vec<u8>,
    pub(super) pos: usize,
    pub(super) in_flight: bool,
}

impl SendBuf {
    /// Whether everything loaded was written (nothing to send, nothing in flight).
    pub fn is_idle(&self) -> bool {
        !self.in_flight && self.pos == self.data.len()
    }

    /// Whether a send is in flight.
    pub fn in_flight(&self) -> bool {
        self.in_flight
    }

    /// Bytes loaded but not yet written.
    pub fn remaining(&self) -> usize {
        self.data.len() - self.pos
    }

    /// Takes `out` (swapping vectors, so both keep their capacity); `out` is left empty.
    ///
    /// # Panics
    /// If this buffer still holds unsent bytes (a driver bug).
    pub fn load(&mut self, out: &mut Vec<u8>) {
        assert!(self.is_idle(), "send buffer loaded while busy");
        self.data.clear();
        std::mem::swap(&mut self.data, out);
        self.pos = 0;
    }

    /// Checks a completed send back in: `written` bytes went out (0 on error). Once all are
    /// out the vector is cleared, and dropped if it grew past `keep` bytes.
    pub fn complete(&mut self, written: usize, keep: usize) {
        self.in_flight = false;
        self.pos = self.pos.saturating_add(written).min(self.data.len());
        if self.pos == self.data.len() {
            self.data.clear();
            self.pos = 0;
            if self.data.capacity() > keep {
                self.data = Vec::new();
            }
        }
    }

    /// Frees the vector if nothing is loaded and it grew past `keep` bytes. Called for quiet
    /// connections only: between the messages of a busy one the vector is kept, so a stream
    /// of large messages does not fault in a fresh buffer for each.
    pub fn shrink(&mut self, keep: usize) {
        if self.is_idle() && self.data.capacity() > keep {
            self.data = Vec::new();
        }
    }

    /// Forgets unsent bytes (the connection is dead); a send in flight keeps its bytes.
    pub fn discard(&mut self) {
        if !self.in_flight {
            self.data.clear();
            self.pos = 0;
        }
    }
}

impl Drop for SendBuf {
    fn drop(&mut self) {
        if self.in_flight {
            // The kernel may still read it: leak instead of freeing.
            std::mem::forget(std::mem::take(&mut self.data));
        }
    }
}

/// A per-connection receive buffer for single-shot receives (the no-buffer-ring fallback).
pub(crate) struct RecvBuf {
    pub(super) data: Box<[u8]>,
    pub(super) in_flight: bool,
}

impl RecvBuf {
    /// A buffer of `size` bytes (at least one).
    pub fn new(size: usize) -> RecvBuf {
        RecvBuf {
            data: vec![0; size.max(1)].into_boxed_slice(),
            in_flight: false,
        }
    }

    /// Whether a receive is in flight.
    pub fn in_flight(&self) -> bool {
        self.in_flight
    }

    /// Checks the completed receive back in and returns the `n` bytes it filled.
    pub fn complete(&mut self, n: usize) -> &mut [u8] {
        self.in_flight = false;
        let n = n.min(self.data.len());
        &mut self.data[..n]
    }
}

impl Drop for RecvBuf {
    fn drop(&mut self) {
        if self.in_flight {
            std::mem::forget(std::mem::take(&mut self.data));
        }
    }
}

/// An 8-byte read target (an eventfd counter).
pub(crate) struct WordBuf {
    pub(super) word: Box<u64>,
    pub(super) in_flight: bool,
}

impl WordBuf {
    /// A zeroed word.
    pub fn new() -> WordBuf {
        WordBuf {
            word: Box::new(0),
            in_flight: false,
        }
    }

    /// Checks the completed read back in.
    pub fn complete(&mut self) -> u64 {
        self.in_flight = false;
        *self.word
    }
}

impl Drop for WordBuf {
    fn drop(&mut self) {
        if self.in_flight {
            std::mem::forget(std::mem::replace(&mut self.word, Box::new(0)));
        }
    }
}

/// The duration of a timeout operation, kept where the kernel can read it.
pub(crate) struct TimerBuf {
    pub(super) spec: Box<Timespec>,
    pub(super) in_flight: bool,
}

impl TimerBuf {
    /// A timer of `every`.
    pub fn new(every: std::time::Duration) -> TimerBuf {
        let spec = Timespec::new()
            .sec(every.as_secs())
            .nsec(every.subsec_nanos());
        TimerBuf {
            spec: Box::new(spec),
            in_flight: false,
        }
    }

    /// Checks the fired (or cancelled) timeout back in.
    pub fn complete(&mut self) {
        self.in_flight = false;
    }
}

impl Drop for TimerBuf {
    fn drop(&mut self) {
        if self.in_flight {
            std::mem::forget(std::mem::replace(&mut self.spec, Box::new(Timespec::new())));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn send_buf_takes_the_output_without_copying_and_keeps_both_capacities() {
        let mut buf = SendBuf::default();
        let mut out = Vec::with_capacity(4096);
        out.extend_from_slice(&[7u8; 40]);
        let ptr = out.as_ptr();
        buf.load(&mut out);
        assert!(out.is_empty());
        assert_eq!(buf.data.as_ptr(), ptr, "swapped, not copied");
        assert_eq!(buf.remaining(), 40);
        buf.complete(10, 1 << 16);
        assert_eq!(buf.remaining(), 30);
        buf.complete(30, 1 << 16);
        assert!(buf.is_idle());
        assert_eq!(buf.data.capacity(), 4096, "kept for the next load");
    }

    #[test]
    fn send_buf_drops_a_large_vector_once_written() {
        let mut buf = SendBuf::default();
        let mut out = vec![1u8; 100_000];
        buf.load(&mut out);
        buf.complete(100_000, 64 * 1024);
        assert_eq!(buf.data.capacity(), 0);
    }

    #[test]
    #[cfg_attr(miri, ignore)] // a deliberate leak, which Miri reports
    fn buffers_dropped_in_flight_are_leaked_not_freed() {
        let mut send = SendBuf::default();
        send.load(&mut vec![1, 2, 3]);
        send.in_flight = true;
        drop(send);
        let mut recv = RecvBuf::new(8);
        recv.in_flight = true;
        drop(recv);
    }
}
