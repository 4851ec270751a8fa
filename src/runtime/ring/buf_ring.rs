//! The provided-buffer ring: receive buffers the kernel picks from for multishot receives,
//! so receive memory follows the data in flight, not the number of connections.
//!
//! A buffer is either the kernel's (on the ring, past no published tail we hold) or checked
//! out to exactly one [`RecvBuffer`] guard, which gives it back when dropped.

use std::alloc::{self, Layout};
use std::io;
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::types::BufRingEntry;

use super::Cqe;

/// `entries` receive buffers of `size` bytes in one allocation, and the ring of
/// `BufRingEntry` slots that offers them to the kernel.
pub(crate) struct BufRing {
    ring: *mut BufRingEntry,
    ring_layout: Layout,
    mem: *mut u8,
    mem_layout: Layout,
    entries: u16,
    size: usize,
    group: u16,
    /// Local copy of the tail; published to the kernel by [`BufRing::publish`].
    tail: u16,
    /// Which buffers the application holds (handed out by a completion, not yet returned).
    checked_out: Vec<bool>,
    /// Which buffers a reaped completion handed over and nobody took yet: only these can be
    /// taken, once each.
    delivered: Vec<bool>,
}

impl BufRing {
    /// Allocates `entries` (a power of two, at most 32768) buffers of `size` bytes, all
    /// checked out until [`BufRing::offer_all`].
    ///
    /// # Errors
    /// InvalidInput for a bad count or a size product that overflows, OutOfMemory when
    /// allocation fails.
    pub fn new(entries: u16, size: usize, group: u16) -> io::Result<BufRing> {
        let invalid = || io::Error::new(io::ErrorKind::InvalidInput, "bad buffer ring size");
        if !entries.is_power_of_two() || entries > 32768 || size == 0 || size > u32::MAX as usize {
            return Err(invalid());
        }
        let ring_bytes = usize::from(entries)
            .checked_mul(std::mem::size_of::<BufRingEntry>())
            .ok_or_else(invalid)?;
        let mem_bytes = usize::from(entries).checked_mul(size).ok_or_else(invalid)?;
        let ring_layout = Layout::from_size_align(ring_bytes, 4096).map_err(|_| invalid())?;
        let mem_layout = Layout::from_size_align(mem_bytes, 64).map_err(|_| invalid())?;
        // SAFETY: both layouts have a non-zero size (entries >= 1, size >= 1).
        let (ring, mem) = unsafe { (alloc::alloc_zeroed(ring_layout), alloc::alloc(mem_layout)) };
        if ring.is_null() || mem.is_null() {
            // SAFETY: each non-null pointer came from `alloc*` with that layout.
            unsafe {
                if !ring.is_null() {
                    alloc::dealloc(ring, ring_layout);
                }
                if !mem.is_null() {
                    alloc::dealloc(mem, mem_layout);
                }
            }
            return Err(io::Error::from(io::ErrorKind::OutOfMemory));
        }
        Ok(BufRing {
            ring: ring.cast(),
            ring_layout,
            mem,
            mem_layout,
            entries,
            size,
            group,
            tail: 0,
            checked_out: vec![true; usize::from(entries)],
            delivered: vec![false; usize::from(entries)],
        })
    }

    /// The buffer group id.
    pub fn group(&self) -> u16 {
        self.group
    }

    /// The ring's address and entry count, for registration.
    pub(super) fn ring_addr(&self) -> (u64, u16) {
        (self.ring as u64, self.entries)
    }

    /// Offers every buffer to the kernel (after registration).
    pub(super) fn offer_all(&mut self) {
        for bid in 0..self.entries {
            self.give_back(bid);
        }
        self.publish();
    }

    /// A reaped completion handed buffer `bid` over (called by the ring as it reaps).
    pub(super) fn delivered(&mut self, bid: u16) {
        if let Some(flag) = self.delivered.get_mut(usize::from(bid)) {
            *flag = true;
        }
    }

    /// Takes the buffer a receive completion filled, `len` bytes of it. Returns `None` if the
    /// completion names no buffer, or one not handed over by a reaped completion, or one
    /// already taken. The buffer goes back to the kernel when the returned guard drops.
    pub fn take(&mut self, cqe: &Cqe) -> Option<RecvBuffer<'_>> {
        let bid = cqe.buffer_id()?;
        let index = usize::from(bid);
        let delivered = self.delivered.get_mut(index)?;
        if !*delivered || self.checked_out[index] {
            return None;
        }
        *delivered = false;
        self.checked_out[index] = true;
        let len = usize::try_from(cqe.result()).unwrap_or(0).min(self.size);
        Some(RecvBuffer {
            ring: self,
            bid,
            len,
        })
    }

    /// Puts buffer `bid` at the tail (not yet visible to the kernel).
    fn give_back(&mut self, bid: u16) {
        let index = usize::from(bid);
        if index >= self.checked_out.len() || !self.checked_out[index] {
            return;
        }
        self.checked_out[index] = false;
        let slot = usize::from(self.tail & (self.entries - 1));
        // SAFETY: `slot < entries`, so the entry lies inside the ring allocation; the kernel
        // reads entries only up to the published tail, and this one is past it until
        // `publish`. The buffer address is inside `mem` (bid < entries).
        unsafe {
            let entry = &mut *self.ring.add(slot);
            entry.set_addr(self.mem.add(index * self.size) as u64);
            entry.set_len(self.size as u32);
            entry.set_bid(bid);
        }
        self.tail = self.tail.wrapping_add(1);
    }

    /// Makes every buffer given back so far visible to the kernel.
    fn publish(&mut self) {
        // SAFETY: the tail field overlays `resv` of entry 0, inside the allocation, aligned
        // for u16; the kernel reads it concurrently, hence the atomic release store, which
        // also orders the entry writes before it.
        unsafe {
            let tail = BufRingEntry::tail(self.ring).cast_mut();
            AtomicU16::from_ptr(tail).store(self.tail, Ordering::Release);
        }
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        // SAFETY: both allocations were made in `new` with these layouts. Only a `Ring` hands
        // this memory to the kernel, and a `Ring` whose in-flight receives could not be
        // cancelled leaks its BufRing instead of dropping it (see `Ring`'s Drop).
        unsafe {
            alloc::dealloc(self.ring.cast(), self.ring_layout);
            alloc::dealloc(self.mem, self.mem_layout);
        }
    }
}

/// One received buffer checked out of a [`BufRing`]; returned to the kernel on drop.
pub(crate) struct RecvBuffer<'a> {
    ring: &'a mut BufRing,
    bid: u16,
    len: usize,
}

impl RecvBuffer<'_> {
    /// The received bytes, writable so frames can be unmasked in place.
    pub fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: the completion handed buffer `bid` to us and `checked_out[bid]` stays set
        // until this guard drops, so the kernel does not write it and no other guard exists;
        // `len <= size` keeps the slice inside this buffer's part of `mem`.
        unsafe {
            std::slice::from_raw_parts_mut(
                self.ring.mem.add(usize::from(self.bid) * self.ring.size),
                self.len,
            )
        }
    }
}

impl Drop for RecvBuffer<'_> {
    fn drop(&mut self) {
        self.ring.give_back(self.bid);
        self.ring.publish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_counts_that_are_not_powers_of_two_and_empty_buffers() {
        assert!(BufRing::new(3, 1024, 0).is_err());
        assert!(BufRing::new(4, 1024, 0).is_ok());
        assert!(BufRing::new(4, 0, 0).is_err());
    }

    #[test]
    fn hands_each_buffer_out_once_and_takes_it_back() {
        let mut bufs = BufRing::new(4, 64, 0).unwrap();
        bufs.offer_all();
        let flags = (2u32 << 16) | 1; // IORING_CQE_F_BUFFER with buffer id 2
        let cqe = Cqe::new(0, 10, flags);
        assert!(
            bufs.take(&cqe).is_none(),
            "not handed over by a reaped completion"
        );
        bufs.delivered(2);
        let mut guard = bufs.take(&cqe).expect("buffer 2 is handed out");
        assert_eq!(guard.bytes().len(), 10);
        guard.bytes().fill(7);
        drop(guard);
        assert!(!bufs.checked_out[2], "returned on drop");
        assert_eq!(bufs.tail, 5, "and queued at the tail");
        assert!(
            bufs.take(&cqe).is_none(),
            "a completion takes its buffer once"
        );
        assert!(bufs.take(&Cqe::new(0, 10, 0)).is_none(), "no buffer flag");
        bufs.delivered(2);
        let too_long = Cqe::new(0, 1000, flags);
        assert_eq!(
            bufs.take(&too_long).unwrap().bytes().len(),
            64,
            "capped at the size"
        );
    }
}
