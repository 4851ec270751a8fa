//! The io_uring seam: the ring, its feature probe, the provided-buffer ring for receives, the
//! registered (fixed) buffer pool for sends, and every buffer the kernel may touch.
//!
//! All `unsafe` of the ring lives here. The rule that keeps it sound: memory that an operation
//! in flight points at is owned by a type of this module ([`SendBuf`], [`RecvBuf`],
//! [`WordBuf`], [`TimerBuf`], [`BufRing`], [`FixedPool`]), is marked in flight when the SQE is
//! pushed, cannot be touched through the safe API until the completion checks it back in, and
//! is leaked rather than freed if dropped while still in flight. Pointers never leave this
//! module.
//!
//! The module knows nothing of WebSocket or of connections: callers give a `user_data` tag
//! and get plain completions ([`Cqe`]) back.

use std::alloc::{self, Layout};
use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::types::{BufRingEntry, CancelBuilder, Fd, Timespec};
use io_uring::{cqueue, opcode, squeue, IoUring};

/// What the kernel offered at start, and what the ring runs with.
#[derive(Clone, Copy, Debug, Default)]
#[allow(dead_code)] // read through Debug, in the startup log line
pub(crate) struct Features {
    /// The ring was set up with `IORING_SETUP_SINGLE_ISSUER`.
    pub single_issuer: bool,
    /// `IORING_SETUP_DEFER_TASKRUN` (6.1+): task work runs only when we wait.
    pub defer_taskrun: bool,
    /// `IORING_SETUP_COOP_TASKRUN` (5.19+): no IPI to interrupt us for task work.
    pub coop_taskrun: bool,
}

/// One completion, copied out of the CQ so the ring is free while it is handled.
///
/// Only [`Ring::reap`] creates these, so a `Cqe` always describes a real completion; the
/// provided-buffer ring relies on that (a buffer id in its flags was handed to us).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Cqe {
    user_data: u64,
    result: i32,
    flags: u32,
}

impl Cqe {
    /// The tag the operation was submitted with.
    pub fn user_data(&self) -> u64 {
        self.user_data
    }

    /// The result: bytes, a file descriptor, or `-errno`.
    pub fn result(&self) -> i32 {
        self.result
    }

    /// Whether a multishot operation stays armed (`IORING_CQE_F_MORE`).
    pub fn more(&self) -> bool {
        cqueue::more(self.flags)
    }

    /// The provided buffer this completion filled, if any.
    pub fn buffer_id(&self) -> Option<u16> {
        cqueue::buffer_select(self.flags)
    }
}

/// A shard's ring.
pub(crate) struct Ring {
    uring: IoUring,
    features: Features,
    cqes: Vec<Cqe>,
}

impl Ring {
    /// Sets up a ring with `entries` submission slots (and four times as many completion
    /// slots), with the best of SINGLE_ISSUER, DEFER_TASKRUN and COOP_TASKRUN the kernel takes.
    ///
    /// Must be called on the thread that will submit (SINGLE_ISSUER binds the ring to it).
    ///
    /// # Errors
    /// When even a plain ring cannot be set up, an error naming the likely cause.
    pub fn new(entries: u32) -> io::Result<Ring> {
        // Best first; the kernel answers EINVAL to flags it does not know.
        let attempts: [(bool, bool, bool); 4] = [
            (true, true, false),
            (true, false, true),
            (false, false, true),
            (false, false, false),
        ];
        let mut last_err = None;
        for (single, defer, coop) in attempts {
            let mut builder = IoUring::builder();
            builder.setup_cqsize(entries.saturating_mul(4));
            if single {
                builder.setup_single_issuer();
            }
            if defer {
                builder.setup_defer_taskrun();
            }
            if coop {
                builder.setup_coop_taskrun();
            }
            match builder.build(entries) {
                Ok(uring) => {
                    let features = Features {
                        single_issuer: single,
                        defer_taskrun: defer,
                        coop_taskrun: coop,
                    };
                    return Ok(Ring {
                        uring,
                        features,
                        cqes: Vec::with_capacity(1024),
                    });
                }
                Err(e) => last_err = Some(e),
            }
        }
        let err = last_err.unwrap_or_else(|| io::Error::from(io::ErrorKind::Unsupported));
        let hint = match err.raw_os_error() {
            Some(libc::ENOSYS) => "the kernel has no io_uring (needs Linux 5.19+)",
            Some(libc::EPERM) => {
                "io_uring is disabled for this process (sysctl kernel.io_uring_disabled, \
                 seccomp or a container policy)"
            }
            Some(libc::ENOMEM) => "not enough locked memory for the ring (ulimit -l)",
            _ => "io_uring_setup failed",
        };
        Err(io::Error::new(
            err.kind(),
            format!("io_uring unavailable: {hint}: {err}"),
        ))
    }

    /// The setup flags in force.
    pub fn features(&self) -> Features {
        self.features
    }

    /// Probes the opcodes the runtime needs (IORING_REGISTER_PROBE, 5.6+) and names those
    /// the kernel lacks. An empty list when probing itself is unsupported: the first
    /// submission will tell.
    pub fn missing_opcodes(&self) -> Vec<&'static str> {
        let mut probe = io_uring::Probe::new();
        if self.uring.submitter().register_probe(&mut probe).is_err() {
            return Vec::new();
        }
        [
            (opcode::AcceptMulti::CODE, "ACCEPT"),
            (opcode::Recv::CODE, "RECV"),
            (opcode::Send::CODE, "SEND"),
            (opcode::Read::CODE, "READ"),
            (opcode::Timeout::CODE, "TIMEOUT"),
            (opcode::AsyncCancel::CODE, "ASYNC_CANCEL"),
        ]
        .into_iter()
        .filter(|&(code, _)| !probe.is_supported(code))
        .map(|(_, name)| name)
        .collect()
    }

    /// Whether WRITE_FIXED is available (for the registered send pool).
    pub fn supports_write_fixed(&self) -> bool {
        let mut probe = io_uring::Probe::new();
        self.uring.submitter().register_probe(&mut probe).is_err()
            || probe.is_supported(opcode::WriteFixed::CODE)
    }

    fn push(&mut self, entry: squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: every entry built in this module points only at memory owned by a
            // buffer type of this module that was marked in flight before the push (see the
            // module docs), or at no memory at all.
            let pushed = unsafe { self.uring.submission().push(&entry) };
            if pushed.is_ok() {
                return Ok(());
            }
            // The SQ is full: hand what is there to the kernel and retry.
            self.uring.submit()?;
        }
    }

    /// Submits everything queued and waits for at least `want` completions.
    ///
    /// # Errors
    /// Ring failures other than EINTR/EBUSY (which return `Ok`).
    pub fn submit_and_wait(&mut self, want: usize) -> io::Result<()> {
        match self.uring.submit_and_wait(want) {
            Ok(_) => Ok(()),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EBUSY)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Copies every ready completion out and returns them; the slice stays valid until the
    /// next call.
    pub fn reap(&mut self) -> Vec<Cqe> {
        let mut cqes = std::mem::take(&mut self.cqes);
        cqes.clear();
        cqes.extend(self.uring.completion().map(|c| Cqe {
            user_data: c.user_data(),
            result: c.result(),
            flags: c.flags(),
        }));
        cqes
    }

    /// Returns the vector [`Ring::reap`] gave out, to keep its capacity.
    pub fn recycle_cqes(&mut self, cqes: Vec<Cqe>) {
        self.cqes = cqes;
    }

    /// Arms a multishot accept on a listening socket (5.19+). The accepted fds come back as
    /// results; they are opened with `SOCK_CLOEXEC`.
    pub fn accept_multi(&mut self, fd: RawFd, user_data: u64) -> io::Result<()> {
        let e = opcode::AcceptMulti::new(Fd(fd))
            .flags(libc::SOCK_CLOEXEC)
            .build();
        self.push(e.user_data(user_data))
    }

    /// Arms a multishot receive that takes buffers from provided-buffer group `group`.
    pub fn recv_multi(&mut self, fd: RawFd, group: u16, user_data: u64) -> io::Result<()> {
        let e = opcode::RecvMulti::new(Fd(fd), group).build();
        self.push(e.user_data(user_data))
    }

    /// Arms a single-shot receive into `buf` (the fallback without a buffer ring).
    ///
    /// # Panics
    /// If `buf` is already in flight (a driver bug).
    pub fn recv(&mut self, fd: RawFd, buf: &mut RecvBuf, user_data: u64) -> io::Result<()> {
        assert!(!buf.in_flight, "recv buffer submitted twice");
        let len = u32::try_from(buf.data.len()).unwrap_or(u32::MAX);
        let e = opcode::Recv::new(Fd(fd), buf.data.as_mut_ptr(), len).build();
        buf.in_flight = true;
        self.push(e.user_data(user_data))
            .inspect_err(|_| buf.in_flight = false)
    }

    /// Sends the unsent part of `buf`: WRITE_FIXED from `pool` for a registered slab, SEND
    /// otherwise.
    ///
    /// # Panics
    /// If `buf` is already in flight or has nothing to send (driver bugs).
    pub fn send(
        &mut self,
        fd: RawFd,
        buf: &mut SendBuf,
        pool: Option<&FixedPool>,
        user_data: u64,
    ) -> io::Result<()> {
        assert!(!buf.in_flight && buf.pos < buf.len, "bad send submission");
        let len = u32::try_from(buf.len - buf.pos).unwrap_or(u32::MAX);
        let e = match (buf.slab, pool) {
            (Some(index), Some(pool)) => {
                let ptr = pool.slab_ptr(index).wrapping_add(buf.pos);
                opcode::WriteFixed::new(Fd(fd), ptr, len, index).build()
            }
            _ => opcode::Send::new(Fd(fd), buf.heap[buf.pos..].as_ptr(), len)
                .flags(libc::MSG_NOSIGNAL)
                .build(),
        };
        buf.in_flight = true;
        self.push(e.user_data(user_data))
            .inspect_err(|_| buf.in_flight = false)
    }

    /// Arms an 8-byte read (an eventfd's counter) into `buf`.
    ///
    /// # Panics
    /// If `buf` is already in flight.
    pub fn read_word(&mut self, fd: RawFd, buf: &mut WordBuf, user_data: u64) -> io::Result<()> {
        assert!(!buf.in_flight, "word buffer submitted twice");
        let ptr = (&mut *buf.word as *mut u64).cast::<u8>();
        let e = opcode::Read::new(Fd(fd), ptr, 8).build();
        buf.in_flight = true;
        self.push(e.user_data(user_data))
            .inspect_err(|_| buf.in_flight = false)
    }

    /// Arms a one-shot timeout of `timer`'s duration.
    ///
    /// # Panics
    /// If `timer` is already in flight.
    pub fn timeout(&mut self, timer: &mut TimerBuf, user_data: u64) -> io::Result<()> {
        assert!(!timer.in_flight, "timer submitted twice");
        let e = opcode::Timeout::new(&*timer.spec as *const Timespec).build();
        timer.in_flight = true;
        self.push(e.user_data(user_data))
            .inspect_err(|_| timer.in_flight = false)
    }

    /// Asks the kernel to cancel the operation tagged `target`.
    pub fn cancel(&mut self, target: u64, user_data: u64) -> io::Result<()> {
        self.push(
            opcode::AsyncCancel::new(target)
                .build()
                .user_data(user_data),
        )
    }

    /// Cancels every submitted operation and waits for that synchronously (6.0+). Used at
    /// shard exit so no operation outlives the memory it points at.
    pub fn cancel_all(&mut self) -> io::Result<()> {
        let _ = self.uring.submit();
        let timeout = Timespec::new().sec(1);
        let cancel = CancelBuilder::any().all();
        match self
            .uring
            .submitter()
            .register_sync_cancel(Some(timeout), cancel)
        {
            // Nothing was in flight.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            other => other,
        }
    }

    /// Registers `pool`'s slabs as fixed buffers.
    ///
    /// # Errors
    /// ENOMEM/EPERM when the locked-memory limit is too low, EINVAL on old kernels.
    pub fn register_pool(&mut self, pool: &FixedPool) -> io::Result<()> {
        let iovecs: Vec<libc::iovec> = (0..pool.count)
            .map(|i| libc::iovec {
                iov_base: pool.slab_ptr(i).cast::<libc::c_void>(),
                iov_len: pool.slab_size,
            })
            .collect();
        // SAFETY: the iovecs cover `pool.mem`, which the pool owns and frees only in its Drop;
        // the pool is declared after the ring in every owner, so the ring (and with it the
        // registration) goes first. The kernel only reads registered buffers for our sends.
        unsafe { self.uring.submitter().register_buffers(&iovecs) }
    }

    /// Registers `bufs` as provided-buffer group `bufs.group()` and fills it.
    ///
    /// # Errors
    /// EINVAL when the kernel has no buffer rings (before 5.19).
    pub fn register_buf_ring(&mut self, bufs: &mut BufRing) -> io::Result<()> {
        // SAFETY: `bufs.ring` points at `entries` page-aligned, zeroed `BufRingEntry` slots
        // that the BufRing owns until its Drop, which follows the ring's (see register_pool).
        unsafe {
            self.uring.submitter().register_buf_ring_with_flags(
                bufs.ring as u64,
                bufs.entries,
                bufs.group,
                0,
            )?;
        }
        for bid in 0..bufs.entries {
            bufs.give_back(bid);
        }
        bufs.publish();
        Ok(())
    }
}

/// A provided-buffer ring: `entries` receive buffers of `size` bytes that the kernel picks
/// from for multishot receives, so receive memory follows data in flight, not connections.
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
}

impl BufRing {
    /// Allocates `entries` (a power of two, at most 32768) buffers of `size` bytes.
    ///
    /// # Errors
    /// InvalidInput for a bad count, OutOfMemory when allocation fails.
    pub fn new(entries: u16, size: usize, group: u16) -> io::Result<BufRing> {
        if !entries.is_power_of_two() || entries > 32768 || size == 0 || size > u32::MAX as usize {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "bad buffer ring size",
            ));
        }
        let ring_layout = Layout::from_size_align(
            usize::from(entries) * std::mem::size_of::<BufRingEntry>(),
            4096,
        )
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let mem_layout = Layout::from_size_align(usize::from(entries) * size, 64)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
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
        })
    }

    /// The buffer group id.
    pub fn group(&self) -> u16 {
        self.group
    }

    /// Takes the buffer a receive completion filled, `len` bytes of it. Returns `None` if the
    /// completion names no buffer (or one already taken, which the kernel never does).
    /// The buffer goes back to the kernel when the returned guard drops.
    pub fn take(&mut self, cqe: &Cqe) -> Option<RecvBuffer<'_>> {
        let bid = cqe.buffer_id()?;
        let len = usize::try_from(cqe.result()).ok()?.min(self.size);
        let taken = self.checked_out.get_mut(usize::from(bid))?;
        if *taken {
            return None;
        }
        *taken = true;
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
        // SAFETY: both allocations were made in `new` with these layouts. The ring was torn
        // down (or every receive cancelled) before: owners drop the Ring first, and a shard
        // leaks its BufRing instead if cancellation did not complete.
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

/// A pool of registered send slabs (`IORING_REGISTER_BUFFERS`) written with WRITE_FIXED, so
/// the kernel does not pin pages on every send.
pub(crate) struct FixedPool {
    mem: *mut u8,
    layout: Layout,
    slab_size: usize,
    count: u16,
    free: Vec<u16>,
}

impl FixedPool {
    /// Allocates `count` slabs of `slab_size` bytes (not registered yet).
    ///
    /// # Errors
    /// InvalidInput for zero sizes, OutOfMemory.
    pub fn new(count: u16, slab_size: usize) -> io::Result<FixedPool> {
        if count == 0 || slab_size == 0 || slab_size > u32::MAX as usize {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "bad send pool size",
            ));
        }
        let layout = Layout::from_size_align(usize::from(count) * slab_size, 4096)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: non-zero size checked above.
        let mem = unsafe { alloc::alloc(layout) };
        if mem.is_null() {
            return Err(io::Error::from(io::ErrorKind::OutOfMemory));
        }
        Ok(FixedPool {
            mem,
            layout,
            slab_size,
            count,
            free: (0..count).rev().collect(),
        })
    }

    /// Total bytes.
    pub fn bytes(&self) -> usize {
        self.layout.size()
    }

    fn slab_ptr(&self, index: u16) -> *mut u8 {
        self.mem.wrapping_add(usize::from(index) * self.slab_size)
    }
}

impl Drop for FixedPool {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout; see `Ring::register_pool` for order.
        unsafe { alloc::dealloc(self.mem, self.layout) }
    }
}

/// Bytes on their way to a socket: either a registered slab of the pool or a heap vector.
/// Once submitted they stay untouched until [`SendBuf::complete`] says how much was written.
#[derive(Default)]
pub(crate) struct SendBuf {
    heap: Vec<u8>,
    slab: Option<u16>,
    pos: usize,
    len: usize,
    in_flight: bool,
}

impl SendBuf {
    /// Whether everything loaded was written (nothing to send, nothing in flight).
    pub fn is_idle(&self) -> bool {
        !self.in_flight && self.pos == self.len
    }

    /// Whether a send is in flight.
    pub fn in_flight(&self) -> bool {
        self.in_flight
    }

    /// Bytes loaded but not yet written.
    pub fn remaining(&self) -> usize {
        self.len - self.pos
    }

    /// Moves `out` into this buffer: copied into a free registered slab when it fits, else by
    /// swapping vectors (no copy). `out` is left empty.
    ///
    /// # Panics
    /// If this buffer still holds unsent bytes (a driver bug).
    pub fn load(&mut self, out: &mut Vec<u8>, pool: Option<&mut FixedPool>) {
        assert!(self.is_idle(), "send buffer loaded while busy");
        self.release(None);
        if let Some(pool) = pool {
            if out.len() <= pool.slab_size {
                if let Some(index) = pool.free.pop() {
                    // SAFETY: slab `index` was on the free list, so no send reads it and no
                    // other SendBuf holds it; `out.len() <= slab_size` keeps the copy inside.
                    unsafe {
                        std::ptr::copy_nonoverlapping(out.as_ptr(), pool.slab_ptr(index), out.len())
                    };
                    self.slab = Some(index);
                    self.pos = 0;
                    self.len = out.len();
                    out.clear();
                    return;
                }
            }
        }
        std::mem::swap(&mut self.heap, out);
        self.pos = 0;
        self.len = self.heap.len();
    }

    /// Checks a completed send back in: `written` bytes went out (0 on error). When all bytes
    /// are out the slab returns to the pool and the vector is cleared, and dropped if it grew
    /// past `keep` bytes so idle connections do not hold large buffers.
    pub fn complete(&mut self, written: usize, pool: Option<&mut FixedPool>, keep: usize) {
        self.in_flight = false;
        self.pos = (self.pos + written).min(self.len);
        if self.pos == self.len {
            self.release(pool);
            if self.heap.capacity() > keep {
                self.heap = Vec::new();
            }
        }
    }

    /// Frees the heap vector if nothing is loaded and it grew past `keep` bytes. Called for
    /// quiet connections only: between the messages of a busy one the vector is kept, so a
    /// stream of large messages does not fault in a fresh buffer for each.
    pub fn shrink(&mut self, keep: usize) -> usize {
        let capacity = self.heap.capacity();
        if self.is_idle() && capacity > keep {
            self.heap = Vec::new();
            return capacity;
        }
        0
    }

    /// Forgets unsent bytes (the connection is dead) and returns the slab.
    pub fn discard(&mut self, pool: Option<&mut FixedPool>) {
        if !self.in_flight {
            self.pos = self.len;
            self.release(pool);
        }
    }

    fn release(&mut self, pool: Option<&mut FixedPool>) {
        if let Some(index) = self.slab.take() {
            if let Some(pool) = pool {
                pool.free.push(index);
            }
        }
        self.heap.clear();
        self.pos = 0;
        self.len = 0;
    }
}

impl Drop for SendBuf {
    fn drop(&mut self) {
        if self.in_flight {
            // The kernel may still read it: leak instead of freeing.
            std::mem::forget(std::mem::take(&mut self.heap));
        }
    }
}

/// A per-connection receive buffer for single-shot receives (the no-buffer-ring fallback).
pub(crate) struct RecvBuf {
    data: Box<[u8]>,
    in_flight: bool,
}

impl RecvBuf {
    /// A buffer of `size` bytes.
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
    word: Box<u64>,
    in_flight: bool,
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
    spec: Box<Timespec>,
    in_flight: bool,
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
    fn send_buf_uses_a_slab_when_the_output_fits_and_returns_it() {
        let mut pool = FixedPool::new(2, 64).unwrap();
        let mut buf = SendBuf::default();
        let mut out = vec![7u8; 40];
        buf.load(&mut out, Some(&mut pool));
        assert!(out.is_empty());
        assert_eq!((buf.slab, buf.remaining()), (Some(0), 40));
        assert_eq!(pool.free.len(), 1);
        buf.complete(10, Some(&mut pool), 1024);
        assert_eq!(buf.remaining(), 30);
        buf.complete(30, Some(&mut pool), 1024);
        assert!(buf.is_idle());
        assert_eq!(pool.free.len(), 2);
    }

    #[test]
    fn send_buf_swaps_vectors_when_the_output_is_larger_than_a_slab() {
        let mut pool = FixedPool::new(2, 16).unwrap();
        let mut buf = SendBuf::default();
        let mut out = vec![1u8; 100];
        buf.load(&mut out, Some(&mut pool));
        assert_eq!((buf.slab, buf.remaining(), out.len()), (None, 100, 0));
        assert_eq!(pool.free.len(), 2);
    }

    #[test]
    fn buf_ring_refuses_a_count_that_is_not_a_power_of_two() {
        assert!(BufRing::new(3, 1024, 0).is_err());
        assert!(BufRing::new(4, 1024, 0).is_ok());
    }

    fn socketpair() -> (RawFd, RawFd) {
        let mut fds = [0; 2];
        // SAFETY: `fds` is a two-element array on this frame, as socketpair(2) wants.
        let rc = unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM, 0, fds.as_mut_ptr()) };
        assert_eq!(rc, 0);
        (fds[0], fds[1])
    }

    fn wait_for(ring: &mut Ring, user_data: u64) -> Cqe {
        loop {
            ring.submit_and_wait(1).unwrap();
            if let Some(cqe) = ring.reap().into_iter().find(|c| c.user_data() == user_data) {
                return cqe;
            }
        }
    }

    #[test]
    fn buf_ring_hands_each_buffer_out_once_and_takes_it_back() {
        let mut bufs = BufRing::new(4, 64, 0).unwrap();
        for bid in 0..4 {
            bufs.give_back(bid);
        }
        let flags = (2u32 << 16) | 1; // IORING_CQE_F_BUFFER with buffer id 2
        let cqe = Cqe {
            user_data: 0,
            result: 10,
            flags,
        };
        let mut guard = bufs.take(&cqe).expect("buffer 2 is handed out");
        assert_eq!(guard.bytes().len(), 10);
        drop(guard);
        assert!(!bufs.checked_out[2], "returned on drop");
        assert_eq!(bufs.tail, 5, "and queued at the tail");
        let no_buffer = Cqe {
            user_data: 0,
            result: 10,
            flags: 0,
        };
        assert!(bufs.take(&no_buffer).is_none());
    }

    #[test]
    fn multishot_receive_fills_provided_buffers_from_a_socket() {
        let mut ring = Ring::new(8).unwrap();
        let mut bufs = BufRing::new(4, 16, 7).unwrap();
        ring.register_buf_ring(&mut bufs).unwrap();
        let (a, b) = socketpair();
        ring.recv_multi(a, bufs.group(), 1).unwrap();
        for round in 0..6u8 {
            // More rounds than buffers: each comes back to the ring after use.
            let msg = [round; 5];
            // SAFETY: writes 5 bytes from a local array to our socket.
            assert_eq!(unsafe { libc::write(b, msg.as_ptr().cast(), 5) }, 5);
            let cqe = wait_for(&mut ring, 1);
            assert!(cqe.more(), "multishot stays armed");
            let mut guard = bufs.take(&cqe).expect("a provided buffer");
            assert_eq!(guard.bytes(), &msg);
        }
        crate::runtime::sys::close(b);
        let eof = wait_for(&mut ring, 1);
        assert_eq!((eof.result(), eof.more()), (0, false));
        crate::runtime::sys::close(a);
    }

    #[test]
    fn fixed_and_heap_sends_write_everything_in_order() {
        let mut ring = Ring::new(8).unwrap();
        let mut pool = FixedPool::new(4, 4096).unwrap();
        ring.register_pool(&pool).unwrap();
        let (a, b) = socketpair();
        let mut send = SendBuf::default();
        let mut expected = Vec::new();
        for (i, size) in [100usize, 10_000, 4096, 1].into_iter().enumerate() {
            let mut out = vec![i as u8; size];
            expected.extend_from_slice(&out);
            send.load(&mut out, Some(&mut pool));
            assert_eq!(send.slab.is_some(), size <= 4096, "slab only when it fits");
            while send.remaining() > 0 {
                ring.send(a, &mut send, Some(&pool), 2).unwrap();
                let cqe = wait_for(&mut ring, 2);
                assert!(cqe.result() > 0, "send failed: {}", cqe.result());
                send.complete(cqe.result() as usize, Some(&mut pool), 1 << 16);
            }
        }
        assert_eq!(pool.free.len(), 4, "every slab is back");
        let mut got = vec![0u8; expected.len()];
        let mut filled = 0;
        while filled < got.len() {
            // SAFETY: reads into the unfilled tail of `got`.
            let n = unsafe { libc::read(b, got[filled..].as_mut_ptr().cast(), got.len() - filled) };
            assert!(n > 0);
            filled += n as usize;
        }
        assert_eq!(got, expected);
        crate::runtime::sys::close(a);
        crate::runtime::sys::close(b);
    }

    #[test]
    fn user_space_ring_round_trip_with_a_nop() {
        let mut ring = match Ring::new(8) {
            Ok(r) => r,
            Err(e) => panic!("{e}"),
        };
        ring.push(opcode::Nop::new().build().user_data(42)).unwrap();
        ring.submit_and_wait(1).unwrap();
        let cqes = ring.reap();
        assert_eq!(cqes.len(), 1);
        assert_eq!((cqes[0].user_data(), cqes[0].result()), (42, 0));
    }
}
