//! The io_uring seam: the ring, its feature probe, and every operation that hands the kernel
//! a pointer. All `unsafe` that touches the ring lives in this module.
//!
//! The rule that keeps it sound: memory that an operation in flight points at is owned by a
//! type of this module — the [`BufRing`] (owned by the [`Ring`] itself), or one of the
//! per-operation buffers of [`buffers`] — which is marked in flight when the entry is pushed,
//! cannot be reached through its safe API until the completion checks it back in, and is
//! leaked rather than freed if dropped while still in flight. The ring's own `Drop` cancels
//! every operation synchronously and leaks the buffer ring if that fails. Pointers never
//! leave this module, and no safe function here takes a pointer or a length from its caller.
//!
//! The module knows nothing of WebSocket or connections: callers give a `user_data` and get
//! plain completions ([`Cqe`]) back.

mod buf_ring;
mod buffers;

use std::io;
use std::os::fd::RawFd;

use io_uring::types::{self, CancelBuilder, Fd, Timespec};
use io_uring::{cqueue, opcode, squeue, IoUring};

pub(crate) use self::buf_ring::{BufRing, RecvBuffer};
pub(crate) use self::buffers::{Piece, RecvBuf, SendBuf, TimerBuf, WordBuf};

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
/// Only [`Ring::reap`] creates these (and tests), so a `Cqe` describes a real completion.
/// It is neither `Copy` nor `Clone`: the buffer types check in with the completion itself
/// (consuming it), so each completion can release its operation's memory exactly once.
#[derive(Debug)]
pub(crate) struct Cqe {
    user_data: u64,
    result: i32,
    flags: u32,
}

impl Cqe {
    #[cfg(test)]
    pub(crate) fn new(user_data: u64, result: i32, flags: u32) -> Cqe {
        Cqe {
            user_data,
            result,
            flags,
        }
    }

    /// The `user_data` the operation was submitted with.
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

/// How many times a submission that the kernel answers with EINTR, EAGAIN or EBUSY is retried
/// before the error is returned: each retry first moves ready completions aside, which is
/// what EBUSY asks for.
const SUBMIT_RETRIES: u32 = 1000;

/// A shard's ring, and the provided-buffer ring registered with it.
pub(crate) struct Ring {
    // Field order is drop order: the ring (and its registrations) before the buffer memory.
    uring: IoUring,
    /// The registered provided-buffer ring, if any (see [`Ring::register_buf_ring`]).
    bufs: Option<BufRing>,
    features: Features,
    /// Completions moved out of the CQ while submitting; [`Ring::reap`] returns them first.
    backlog: Vec<Cqe>,
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
        let cq_entries = entries
            .checked_mul(4)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "ring_entries too large"))?;
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
            builder.setup_cqsize(cq_entries);
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
                        bufs: None,
                        features,
                        backlog: Vec::new(),
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

    /// Queues one entry, submitting what is queued first when the SQ is full.
    ///
    /// # Safety
    /// Every pointer in `entry` must stay valid for what the operation does with it (and,
    /// for memory the kernel writes, not be read or written by us) until the operation's
    /// completion arrives, or, if the ring is dropped first, forever.
    unsafe fn push(&mut self, entry: squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: forwarded from this function's contract.
            if unsafe { self.uring.submission().push(&entry) }.is_ok() {
                return Ok(());
            }
            self.submit(0)?;
        }
    }

    /// Submits everything queued and waits for at least `want` completions. EINTR, EAGAIN
    /// and EBUSY are retried (ready completions are moved to the backlog first, which is what
    /// EBUSY asks for); with `want > 0` an EINTR returns `Ok` so the caller reaps and loops.
    fn submit(&mut self, want: usize) -> io::Result<()> {
        let mut tries = 0;
        loop {
            let err = match self.uring.submit_and_wait(want) {
                Ok(_) => return Ok(()),
                Err(e) => e,
            };
            match err.raw_os_error() {
                Some(libc::EINTR) if want > 0 => return Ok(()),
                Some(libc::EINTR | libc::EAGAIN | libc::EBUSY) if tries < SUBMIT_RETRIES => {
                    tries += 1;
                    let before = self.backlog.len();
                    self.drain_cq_into_backlog();
                    if want > 0 && self.backlog.len() > before {
                        return Ok(());
                    }
                    if self.backlog.len() == before && tries > 1 {
                        std::thread::yield_now();
                    }
                }
                _ => return Err(err),
            }
        }
    }

    fn drain_cq_into_backlog(&mut self) {
        Self::collect(&mut self.uring, self.bufs.as_mut(), &mut self.backlog);
    }

    /// Submits everything queued and waits for at least `want` completions (none if the
    /// backlog already holds some).
    ///
    /// # Errors
    /// Ring failures other than EINTR/EAGAIN/EBUSY.
    pub fn submit_and_wait(&mut self, want: usize) -> io::Result<()> {
        let want = if self.backlog.is_empty() { want } else { 0 };
        self.submit(want)
    }

    /// Submits everything queued and waits for one completion or until `timeout` has passed,
    /// whichever is first (one enter with `IORING_ENTER_EXT_ARG`, 5.11+; no timeout entry on
    /// the ring). Returns at once if the backlog already holds completions.
    ///
    /// # Errors
    /// Ring failures other than EINTR/EAGAIN/EBUSY.
    pub fn submit_and_wait_for(&mut self, timeout: std::time::Duration) -> io::Result<()> {
        if !self.backlog.is_empty() {
            return self.submit(0);
        }
        let ts = Timespec::from(timeout);
        let args = types::SubmitArgs::new().timespec(&ts);
        match self.uring.submitter().submit_with_args(1, &args) {
            Ok(_) => Ok(()),
            Err(e) => match e.raw_os_error() {
                // ETIME: the time passed with nothing completed.
                Some(libc::ETIME | libc::EINTR) => Ok(()),
                Some(libc::EAGAIN | libc::EBUSY) => self.submit(0),
                _ => Err(e),
            },
        }
    }

    /// Submits everything queued and lets the kernel post what is ready (with
    /// `DEFER_TASKRUN`, completions of data that arrived meanwhile are only posted by an
    /// enter that asks for events), without waiting for any.
    ///
    /// This is one enter with GETEVENTS and a minimum of zero completions: the kernel runs
    /// the deferred work and returns. (A zero timeout with a minimum of one, as this was
    /// before, arms and cancels a high-resolution timer on every call; in a VM each arming
    /// traps to the hypervisor, and the 16 MiB echo spent 10% of the server's CPU there.)
    ///
    /// # Errors
    /// Ring failures other than EINTR/EAGAIN/EBUSY.
    pub fn submit_and_poll(&mut self) -> io::Result<()> {
        if !self.backlog.is_empty() {
            return self.submit(0);
        }
        let queued = self.uring.submission().len() as u32;
        let flags = io_uring::EnterFlags::GETEVENTS.bits();
        // SAFETY: `queued` entries are in the submission queue (each pushed under `push`'s
        // contract); no argument is passed, so the size given for it is never read.
        let entered = unsafe {
            self.uring
                .submitter()
                .enter::<libc::sigset_t>(queued, 0, flags, None)
        };
        match entered {
            Ok(_) => Ok(()),
            Err(e) => match e.raw_os_error() {
                Some(libc::EINTR) => Ok(()),
                Some(libc::EAGAIN | libc::EBUSY) => self.submit(0),
                _ => Err(e),
            },
        }
    }

    /// Copies every ready completion out (the backlog first) and returns them; give the
    /// vector back with [`Ring::recycle_cqes`] to keep its capacity.
    pub fn reap(&mut self) -> Vec<Cqe> {
        let mut cqes = std::mem::take(&mut self.cqes);
        cqes.clear();
        cqes.append(&mut self.backlog);
        Self::collect(&mut self.uring, self.bufs.as_mut(), &mut cqes);
        cqes
    }

    /// Moves the CQ's completions into `into`, noting each provided buffer the kernel
    /// handed over (only such a buffer can be taken, once).
    fn collect(uring: &mut IoUring, mut bufs: Option<&mut BufRing>, into: &mut Vec<Cqe>) {
        for c in uring.completion() {
            let cqe = Cqe {
                user_data: c.user_data(),
                result: c.result(),
                flags: c.flags(),
            };
            if let (Some(bufs), Some(bid)) = (bufs.as_deref_mut(), cqe.buffer_id()) {
                bufs.delivered(bid);
            }
            into.push(cqe);
        }
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
        // SAFETY: an accept carries no pointer (no peer address is asked for).
        unsafe { self.push(e.user_data(user_data)) }
    }

    /// Whether a provided-buffer ring is registered (multishot receives possible).
    pub fn has_buf_ring(&self) -> bool {
        self.bufs.is_some()
    }

    /// Arms a multishot receive that takes buffers from the registered buffer ring.
    ///
    /// # Errors
    /// `Unsupported` when no buffer ring is registered; push failures.
    pub fn recv_multi(&mut self, fd: RawFd, user_data: u64) -> io::Result<()> {
        let Some(group) = self.bufs.as_ref().map(BufRing::group) else {
            return Err(io::Error::from(io::ErrorKind::Unsupported));
        };
        let e = opcode::RecvMulti::new(Fd(fd), group).build();
        // SAFETY: the entry holds no pointer; the kernel writes only buffers it takes from
        // the registered ring, which `self.bufs` owns for as long as the ring lives (the
        // ring's Drop cancels every operation first, and leaks the BufRing if it cannot).
        unsafe { self.push(e.user_data(user_data)) }
    }

    /// Takes the provided buffer a receive completion filled (see [`BufRing::take`]).
    pub fn take_buffer(&mut self, cqe: &Cqe) -> Option<RecvBuffer<'_>> {
        self.bufs.as_mut()?.take(cqe)
    }

    /// Arms a single-shot receive into `buf` (the fallback without a buffer ring).
    ///
    /// # Panics
    /// If `buf` is already in flight (a driver bug).
    pub fn recv(&mut self, fd: RawFd, buf: &mut RecvBuf, user_data: u64) -> io::Result<()> {
        assert!(!buf.in_flight, "recv buffer submitted twice");
        let len = u32::try_from(buf.len).unwrap_or(u32::MAX);
        let e = opcode::Recv::new(Fd(fd), buf.ptr.as_ptr(), len).build();
        buf.in_flight = true;
        buf.user_data = user_data;
        // SAFETY: `buf.ptr` is an allocation of at least `len` bytes owned by `buf`, now
        // marked in flight: RecvBuf gives no access to it until this operation's completion
        // checks it in, and leaks it if dropped before.
        unsafe { self.push(e.user_data(user_data)) }.inspect_err(|_| buf.in_flight = false)
    }

    /// Sends the unsent part of `buf` (`MSG_NOSIGNAL`: a reset peer is an error result,
    /// never a SIGPIPE).
    ///
    /// # Panics
    /// If `buf` is already in flight or has nothing to send (driver bugs).
    pub fn send(&mut self, fd: RawFd, buf: &mut SendBuf, user_data: u64) -> io::Result<()> {
        assert!(!buf.in_flight && buf.remaining() > 0, "bad send submission");
        let e = if let Some(unsent) = buf.contiguous_unsent() {
            let len = u32::try_from(unsent.len()).unwrap_or(u32::MAX);
            opcode::Send::new(Fd(fd), unsent.as_ptr(), len)
                .flags(libc::MSG_NOSIGNAL)
                .build()
        } else {
            let msg = buf.prepare_vectored();
            opcode::SendMsg::new(Fd(fd), msg)
                .flags(libc::MSG_NOSIGNAL as u32)
                .build()
        };
        buf.in_flight = true;
        buf.user_data = user_data;
        // SAFETY: the bytes sent are inside `buf.data` and `buf.pieces` (frames held by
        // reference), and a vectored send's header and vectors inside `buf.vectored`: all
        // owned by `buf` (heap allocations that do not move with it) and now marked in
        // flight. SendBuf does not touch them until this send's completion checks it in, and
        // leaks them if dropped before.
        unsafe { self.push(e.user_data(user_data)) }.inspect_err(|_| buf.in_flight = false)
    }

    /// Arms an 8-byte read (an eventfd's counter) into `buf`.
    ///
    /// # Panics
    /// If `buf` is already in flight.
    pub fn read_word(&mut self, fd: RawFd, buf: &mut WordBuf, user_data: u64) -> io::Result<()> {
        assert!(!buf.in_flight, "word buffer submitted twice");
        let ptr = buf.word.as_ptr().cast::<u8>();
        let e = opcode::Read::new(Fd(fd), ptr, 8).build();
        buf.in_flight = true;
        buf.user_data = user_data;
        // SAFETY: `ptr` is the u64 allocation owned by `buf`, now marked in flight (see
        // `recv`).
        unsafe { self.push(e.user_data(user_data)) }.inspect_err(|_| buf.in_flight = false)
    }

    /// Arms a one-shot timeout of `timer`'s duration.
    ///
    /// # Panics
    /// If `timer` is already in flight.
    pub fn timeout(&mut self, timer: &mut TimerBuf, user_data: u64) -> io::Result<()> {
        assert!(!timer.in_flight, "timer submitted twice");
        let e = opcode::Timeout::new(timer.spec.as_ptr().cast_const()).build();
        timer.in_flight = true;
        timer.user_data = user_data;
        // SAFETY: the timespec allocation is owned by `timer`, now marked in flight (see
        // `recv`); the kernel only reads it.
        unsafe { self.push(e.user_data(user_data)) }.inspect_err(|_| timer.in_flight = false)
    }

    /// Asks the kernel to cancel the operation submitted with `target`.
    pub fn cancel(&mut self, target: u64, user_data: u64) -> io::Result<()> {
        let e = opcode::AsyncCancel::new(target).build();
        // SAFETY: a cancellation carries no pointer.
        unsafe { self.push(e.user_data(user_data)) }
    }

    /// Cancels every submitted operation and waits for that synchronously (6.0+), so no
    /// operation outlives the memory it points at; their completions are then ready to reap.
    ///
    /// # Errors
    /// When the kernel cannot cancel synchronously (before 6.0) or in time.
    pub fn cancel_all(&mut self) -> io::Result<()> {
        let _ = self.submit(0);
        let timeout = Timespec::new().sec(1);
        let cancel = CancelBuilder::any().all();
        let cancelled = match self
            .uring
            .submitter()
            .register_sync_cancel(Some(timeout), cancel)
        {
            // Nothing was in flight.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            other => other,
        };
        self.flush_completions();
        cancelled
    }

    /// Makes the kernel post every completion it has ready (with DEFER_TASKRUN they wait for
    /// us to ask) and moves them to the backlog, without blocking.
    fn flush_completions(&mut self) {
        let zero = Timespec::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
        while std::time::Instant::now() < deadline {
            let before = self.backlog.len();
            let args = types::SubmitArgs::new().timespec(&zero);
            // ETIME (nothing more ready) and EINTR are expected; others leave what we have.
            let _ = self.uring.submitter().submit_with_args(1, &args);
            self.drain_cq_into_backlog();
            if self.backlog.len() == before {
                break;
            }
        }
    }

    /// Registers `bufs` as provided-buffer group `bufs.group()`, offers its buffers to the
    /// kernel, and keeps it for as long as the ring lives.
    ///
    /// # Errors
    /// EINVAL when the kernel has no buffer rings (before 5.19), ENOMEM/EPERM over the
    /// locked-memory limit; `AlreadyExists` if one is registered.
    pub fn register_buf_ring(&mut self, mut bufs: BufRing) -> io::Result<()> {
        if self.bufs.is_some() {
            return Err(io::Error::from(io::ErrorKind::AlreadyExists));
        }
        let (addr, entries) = bufs.ring_addr();
        // SAFETY: `addr` points at `entries` page-aligned, zeroed `BufRingEntry` slots that
        // `bufs` owns; `bufs` moves into `self.bufs`, which the ring's Drop keeps alive (or
        // leaks) until no operation can use it.
        unsafe {
            self.uring
                .submitter()
                .register_buf_ring_with_flags(addr, entries, bufs.group(), 0)?;
        }
        bufs.offer_all();
        self.bufs = Some(bufs);
        Ok(())
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        if let Err(e) = self.cancel_all() {
            if let Some(bufs) = self.bufs.take() {
                tracing::warn!(
                    error = %e,
                    "ring: in-flight operations could not be cancelled: leaking the receive \
                     buffers they may still write"
                );
                std::mem::forget(bufs);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    fn write_all(fd: RawFd, bytes: &[u8]) {
        // SAFETY: writes from a live slice to our own socket.
        let written = unsafe { libc::write(fd, bytes.as_ptr().cast(), bytes.len()) };
        assert_eq!(written, bytes.len() as isize);
    }

    #[test]
    fn multishot_receive_fills_provided_buffers_from_a_socket() {
        let mut ring = Ring::new(8).unwrap();
        ring.register_buf_ring(BufRing::new(4, 16, 7).unwrap())
            .unwrap();
        let (a, b) = socketpair();
        ring.recv_multi(a, 1).unwrap();
        for round in 0..6u8 {
            // More rounds than buffers: each comes back to the ring after use.
            let msg = [round; 5];
            write_all(b, &msg);
            let cqe = wait_for(&mut ring, 1);
            assert!(cqe.more(), "multishot stays armed");
            let mut guard = ring.take_buffer(&cqe).expect("a provided buffer");
            assert_eq!(guard.bytes(), &msg);
            drop(guard);
            assert!(
                ring.take_buffer(&cqe).is_none(),
                "taken once per completion"
            );
        }
        crate::runtime::sys::close(b);
        let eof = wait_for(&mut ring, 1);
        assert_eq!((eof.result(), eof.more()), (0, false));
        crate::runtime::sys::close(a);
    }

    #[test]
    fn polling_posts_what_is_ready_without_waiting() {
        let mut ring = Ring::new(8).unwrap();
        ring.register_buf_ring(BufRing::new(4, 16, 7).unwrap())
            .unwrap();
        let (a, b) = socketpair();
        // The receive is submitted by the poll itself; nothing has arrived, so it returns
        // with nothing to reap rather than waiting.
        ring.recv_multi(a, 1).unwrap();
        ring.submit_and_poll().unwrap();
        assert!(ring.reap().is_empty(), "nothing was ready");
        // Data arriving leaves deferred work in the kernel; the poll must run it and post
        // the receive's completion (under DEFER_TASKRUN only an enter asking for events
        // does), still without waiting.
        write_all(b, b"ready");
        ring.submit_and_poll().unwrap();
        let cqes = ring.reap();
        assert_eq!(cqes.len(), 1, "the receive was posted by the poll");
        let mut guard = ring.take_buffer(&cqes[0]).expect("a provided buffer");
        assert_eq!(guard.bytes(), b"ready");
        drop(guard);
        crate::runtime::sys::close(a);
        crate::runtime::sys::close(b);
    }

    #[test]
    fn sends_write_everything_in_order() {
        let mut ring = Ring::new(8).unwrap();
        let (a, b) = socketpair();
        let mut send = SendBuf::default();
        let mut expected = Vec::new();
        for (i, size) in [100usize, 10_000, 4096, 1].into_iter().enumerate() {
            let mut out = vec![i as u8; size];
            expected.extend_from_slice(&out);
            send.load(&mut out);
            while send.remaining() > 0 {
                ring.send(a, &mut send, 2).unwrap();
                let cqe = wait_for(&mut ring, 2);
                assert!(cqe.result() > 0, "send failed: {}", cqe.result());
                send.complete(cqe, 1 << 16);
            }
        }
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
    fn vectored_sends_write_owned_bytes_and_shared_frames_in_order() {
        let mut ring = Ring::new(8).unwrap();
        let (a, b) = socketpair();
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            let mut buf = [0u8; 65536];
            loop {
                // SAFETY: reads into `buf`, which outlives the call.
                let n = unsafe { libc::read(b, buf.as_mut_ptr().cast(), buf.len()) };
                if n <= 0 {
                    break got;
                }
                got.extend_from_slice(&buf[..n as usize]);
            }
        });
        // 3,001 pieces, more than one send takes (1,024 vectors): owned bytes between shared
        // frames, ending with owned bytes.
        let frame = std::rc::Rc::new(bytes::Bytes::from(vec![0xAB; 1000]));
        let (mut out, mut shared, mut expected) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..1500u32 {
            out.extend_from_slice(&i.to_be_bytes()[1..]);
            expected.extend_from_slice(&i.to_be_bytes()[1..]);
            shared.push((out.len(), super::Piece::Shared(frame.clone())));
            expected.extend_from_slice(&frame[..]);
        }
        out.extend_from_slice(b"end");
        expected.extend_from_slice(b"end");
        let mut send = SendBuf::default();
        send.load_pieces(&mut out, &mut shared);
        assert!(out.is_empty() && shared.is_empty());
        assert_eq!(send.remaining(), expected.len());
        let mut sends = 0;
        while send.remaining() > 0 {
            ring.send(a, &mut send, 2).unwrap();
            let cqe = wait_for(&mut ring, 2);
            assert!(cqe.result() > 0, "send failed: {}", cqe.result());
            send.complete(cqe, 1 << 16);
            sends += 1;
        }
        assert!(sends >= 3, "{sends} sends for 3,001 pieces");
        assert!(send.is_idle() && send.pieces.is_empty(), "frames released");
        crate::runtime::sys::close(a);
        let got = reader.join().unwrap();
        assert_eq!(got.len(), expected.len());
        assert!(got == expected, "bytes out of order");
    }

    #[test]
    fn a_lone_piece_goes_out_whole_with_a_plain_send() {
        let mut ring = Ring::new(8).unwrap();
        let (a, b) = socketpair();
        let frame = std::rc::Rc::new(bytes::Bytes::from(vec![0xCD; 3000]));
        let mut shared = vec![(0, super::Piece::Shared(frame.clone()))];
        let mut send = SendBuf::default();
        send.load_pieces(&mut Vec::new(), &mut shared);
        assert!(send.contiguous_unsent().is_some(), "one slice");
        ring.send(a, &mut send, 2).unwrap();
        let cqe = wait_for(&mut ring, 2);
        assert_eq!(cqe.result(), 3000);
        send.complete(cqe, 1 << 16);
        assert!(send.is_idle() && send.pieces.is_empty(), "frame released");
        let mut got = vec![0u8; 3000];
        // SAFETY: reads into `got`, which outlives the call.
        let n = unsafe { libc::read(b, got.as_mut_ptr().cast(), got.len()) };
        assert_eq!(n, 3000);
        assert!(got[..] == frame[..]);
        crate::runtime::sys::close(a);
        crate::runtime::sys::close(b);
    }

    #[test]
    fn a_send_to_a_closed_peer_is_an_error_not_a_sigpipe() {
        // SAFETY: restores the default SIGPIPE action (Rust's runtime ignores it), as an
        // embedding in a C program would have it; this test binary sends to no other pipe.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
        let mut ring = Ring::new(8).unwrap();
        let (a, b) = socketpair();
        crate::runtime::sys::close(b);
        let mut send = SendBuf::default();
        send.load(&mut vec![1u8; 64]);
        ring.send(a, &mut send, 3).unwrap();
        let cqe = wait_for(&mut ring, 3);
        assert_eq!(cqe.result(), -libc::EPIPE);
        send.complete(cqe, 1 << 16);
        // SAFETY: as above.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
        crate::runtime::sys::close(a);
    }

    #[test]
    fn more_entries_than_the_queues_hold_all_complete() {
        // 8 SQ and 32 CQ slots, 500 operations pushed without reaping: pushes submit when the
        // SQ is full, and completions that do not fit the CQ are moved aside, not lost.
        let mut ring = Ring::new(8).unwrap();
        for i in 0..500u64 {
            // SAFETY: a no-op carries no pointer.
            unsafe { ring.push(opcode::Nop::new().build().user_data(i)) }.unwrap();
        }
        let mut seen = vec![false; 500];
        let mut count = 0;
        while count < 500 {
            ring.submit_and_wait(1).unwrap();
            let cqes = ring.reap();
            for cqe in &cqes {
                assert!(!seen[cqe.user_data() as usize], "completed twice");
                seen[cqe.user_data() as usize] = true;
                count += 1;
            }
            ring.recycle_cqes(cqes);
        }
    }

    #[test]
    fn cancel_all_completes_every_operation_in_flight() {
        let mut ring = Ring::new(8).unwrap();
        ring.register_buf_ring(BufRing::new(4, 16, 0).unwrap())
            .unwrap();
        let (a, b) = socketpair();
        ring.recv_multi(a, 1).unwrap();
        let mut word = WordBuf::new();
        ring.read_word(a, &mut word, 2).unwrap();
        let mut timer = TimerBuf::new(std::time::Duration::from_secs(60));
        ring.timeout(&mut timer, 3).unwrap();
        ring.submit_and_wait(0).unwrap();
        ring.cancel_all().unwrap();
        let mut done: Vec<Cqe> = ring.reap();
        done.sort_unstable_by_key(Cqe::user_data);
        assert_eq!(
            done.iter().map(Cqe::user_data).collect::<Vec<_>>(),
            [1, 2, 3],
            "each operation completed (cancelled)"
        );
        let mut done = done.into_iter().skip(1);
        word.complete(done.next().unwrap());
        timer.complete(done.next().unwrap());
        crate::runtime::sys::close(a);
        crate::runtime::sys::close(b);
    }
}
