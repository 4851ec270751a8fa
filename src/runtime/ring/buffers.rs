//! Memory that one operation lends to the kernel: each type marks itself in flight (and
//! records the operation's `user_data`) when its operation is pushed, offers no access to the
//! memory through its safe API until that operation's own completion is handed back — a
//! [`Cqe`] is neither `Copy` nor `Clone`, so each completion checks in exactly once — and
//! leaks the memory instead of freeing it if dropped while still in flight (so a shard that
//! dies with operations pending cannot free memory the kernel may still write).

use std::ptr::NonNull;
use std::rc::Rc;

use bytes::Bytes;
use io_uring::types::Timespec;

use super::Cqe;

/// Bytes sent from where they are, between a connection's corked bytes.
pub(crate) enum Piece {
    /// A frame shared with the shard's other connections (a publication). Counted with `Rc`,
    /// not `Bytes`' atomic count: a publication to 1,000 subscribers is 1,000 clones, and
    /// the atomic ones cost 10% of the server's CPU at 2,000 publications/s (`perf record`).
    /// Queued frames never leave their shard's thread.
    Shared(Rc<Bytes>),
    /// A buffer handed over whole (a received message sent on as it is), given back once
    /// written ([`SendBuf::take_reclaimed`]).
    Lent(Vec<u8>),
}

impl Piece {
    /// Its bytes.
    pub fn bytes(&self) -> &[u8] {
        match self {
            Piece::Shared(frame) => frame,
            Piece::Lent(buffer) => buffer,
        }
    }
}

/// Bytes on their way to a socket. [`SendBuf::load`] takes a connection's corked output by
/// swapping vectors (no copy); [`SendBuf::load_pieces`] also takes pieces sent from where
/// they are (shared frames, a lent message) with a vectored send, or a plain one when the
/// unsent bytes are one slice ([`SendBuf::contiguous_unsent`]). Once submitted the bytes
/// stay untouched until the send's own completion is handed to [`SendBuf::complete`].
#[derive(Default)]
pub(crate) struct SendBuf {
    pub(super) data: Vec<u8>,
    /// Pieces sent from where they are, each after `data[..offset]`, in order.
    pub(super) pieces: Vec<(usize, Piece)>,
    /// Lent buffers written out, until taken back.
    pub(super) reclaimed: Vec<Vec<u8>>,
    /// Bytes of `data` and `pieces` together.
    pub(super) total: usize,
    /// Bytes of `data` and `pieces` written.
    pub(super) pos: usize,
    /// The message header and I/O vectors of a vectored send (made on the first one).
    pub(super) vectored: Option<Box<Vectored>>,
    pub(super) in_flight: bool,
    /// The `user_data` of the send in flight.
    pub(super) user_data: u64,
}

/// What a vectored send lends the kernel besides the bytes: the `msghdr` and its vectors.
pub(crate) struct Vectored {
    pub(super) msg: libc::msghdr,
    pub(super) iov: Vec<libc::iovec>,
}

// SAFETY: the raw pointers in `msghdr` and `iovec` point into the `SendBuf` that owns this
// (its vectors and shared frames, all `Send`); they are only read by the kernel for that
// buffer's send, on the thread that owns the buffer.
unsafe impl Send for Vectored {}

/// The most vectors one send takes (the kernel's `UIO_MAXIOV`); the rest goes in the next.
const MAX_IOV: usize = 1024;

impl SendBuf {
    /// Whether everything loaded was written (nothing to send, nothing in flight).
    pub fn is_idle(&self) -> bool {
        !self.in_flight && self.pos == self.total
    }

    /// Whether a send is in flight.
    pub fn in_flight(&self) -> bool {
        self.in_flight
    }

    /// Bytes loaded but not yet written.
    pub fn remaining(&self) -> usize {
        self.total - self.pos
    }

    /// Takes `out` (swapping vectors, so both keep their capacity); `out` is left empty.
    ///
    /// # Panics
    /// If this buffer still holds unsent bytes (a driver bug).
    pub fn load(&mut self, out: &mut Vec<u8>) {
        assert!(self.is_idle(), "send buffer loaded while busy");
        self.data.clear();
        self.pieces.clear();
        std::mem::swap(&mut self.data, out);
        self.pos = 0;
        self.total = self.data.len();
    }

    /// Takes `out` and the pieces placed in it (each after `out[..offset]`, offsets in
    /// order); both are left empty.
    ///
    /// # Panics
    /// If this buffer still holds unsent bytes (a driver bug).
    pub fn load_pieces(&mut self, out: &mut Vec<u8>, pieces: &mut Vec<(usize, Piece)>) {
        self.load(out);
        std::mem::swap(&mut self.pieces, pieces);
        self.total += self
            .pieces
            .iter()
            .map(|(_, piece)| piece.bytes().len())
            .sum::<usize>();
    }

    /// A lent buffer whose bytes were all written, to reuse (one per call, until `None`).
    pub fn take_reclaimed(&mut self) -> Option<Vec<u8>> {
        self.reclaimed.pop()
    }

    /// The unsent bytes if they are one contiguous slice: the corked bytes alone, or one
    /// piece alone (a publication to an otherwise idle subscriber, a large message sent on).
    /// A plain send takes those; a vectored one costs the kernel a copy of its header and an
    /// import of its vectors on every send (~4% of the server's CPU in `perf record` at 100
    /// publications/s of 1 KiB to 1,000 subscribers, one publication a send).
    pub(super) fn contiguous_unsent(&self) -> Option<&[u8]> {
        // The spans in order: corked bytes before each piece, the piece, the corked rest.
        let tail = self.pieces.last().map_or(0, |(offset, _)| *offset);
        let mut from = 0;
        let spans = self
            .pieces
            .iter()
            .flat_map(move |(offset, piece)| {
                let before = &self.data[from..*offset];
                from = *offset;
                [before, piece.bytes()]
            })
            .chain(std::iter::once(&self.data[tail..]));
        let (mut skip, mut found) = (self.pos, None);
        for span in spans {
            if skip >= span.len() {
                skip -= span.len();
            } else if found.is_some() {
                return None;
            } else {
                found = Some(&span[skip..]);
                skip = 0;
            }
        }
        found
    }

    /// Fills the I/O vectors with the unsent bytes (at most [`MAX_IOV`] pieces) and returns
    /// the message header that names them.
    pub(super) fn prepare_vectored(&mut self) -> *const libc::msghdr {
        let vectored = self.vectored.get_or_insert_with(|| {
            Box::new(Vectored {
                // SAFETY: msghdr is plain data; all zeroes is a valid empty header.
                msg: unsafe { std::mem::zeroed() },
                iov: Vec::new(),
            })
        });
        let iov = &mut vectored.iov;
        iov.clear();
        let mut skip = self.pos;
        let mut push = |piece: &[u8]| {
            if skip >= piece.len() {
                skip -= piece.len();
                return;
            }
            let piece = &piece[skip..];
            skip = 0;
            if iov.len() < MAX_IOV {
                iov.push(libc::iovec {
                    iov_base: piece.as_ptr().cast_mut().cast(),
                    iov_len: piece.len(),
                });
            }
        };
        let mut from = 0;
        for (offset, piece) in &self.pieces {
            push(&self.data[from..*offset]);
            push(piece.bytes());
            from = *offset;
        }
        push(&self.data[from..]);
        vectored.msg.msg_iov = iov.as_mut_ptr();
        // At most MAX_IOV: fits the field's type on every C library.
        vectored.msg.msg_iovlen = iov.len() as _;
        &vectored.msg
    }

    /// Checks the send back in with its completion and returns the result (bytes written or
    /// `-errno`). Once all bytes are out the vectors are cleared (the shared frames released),
    /// and the owned one dropped if it grew past `keep` bytes.
    ///
    /// # Panics
    /// If `cqe` is not the completion of this buffer's send in flight (a driver bug).
    pub fn complete(&mut self, cqe: Cqe, keep: usize) -> i32 {
        assert!(
            self.in_flight && cqe.user_data == self.user_data,
            "send buffer checked in with another operation's completion"
        );
        self.in_flight = false;
        let written = usize::try_from(cqe.result).unwrap_or(0);
        self.pos = self.pos.saturating_add(written).min(self.total);
        if self.pos == self.total {
            self.data.clear();
            for (_, piece) in self.pieces.drain(..) {
                if let Piece::Lent(buffer) = piece {
                    self.reclaimed.push(buffer);
                }
            }
            self.pos = 0;
            self.total = 0;
            if self.data.capacity() > keep {
                self.data = Vec::new();
            }
        }
        cqe.result
    }

    /// Frees the vectors if nothing is loaded and they grew past `keep` bytes. Called for
    /// quiet connections only: between the messages of a busy one the vector is kept, so a
    /// stream of large messages does not fault in a fresh buffer for each.
    pub fn shrink(&mut self, keep: usize) {
        if self.is_idle() {
            if self.data.capacity() > keep {
                self.data = Vec::new();
            }
            self.pieces = Vec::new();
            self.vectored = None;
            self.reclaimed = Vec::new();
        }
    }

    /// Forgets unsent bytes (the connection is dead); a send in flight keeps its bytes.
    pub fn discard(&mut self) {
        if !self.in_flight {
            self.data.clear();
            self.pieces.clear();
            self.pos = 0;
            self.total = 0;
        }
    }
}

impl Drop for SendBuf {
    fn drop(&mut self) {
        if self.in_flight {
            // The kernel may still read them: leak instead of freeing.
            std::mem::forget(std::mem::take(&mut self.data));
            std::mem::forget(std::mem::take(&mut self.pieces));
            std::mem::forget(self.vectored.take());
        }
    }
}

/// A per-connection receive buffer for single-shot receives (the no-buffer-ring fallback).
/// The memory is held as a raw allocation, so moving the `RecvBuf` (the connection slab
/// grows) never asserts unique access to bytes the kernel is writing.
pub(crate) struct RecvBuf {
    pub(super) ptr: NonNull<u8>,
    pub(super) len: usize,
    pub(super) in_flight: bool,
    /// The `user_data` of the receive in flight.
    pub(super) user_data: u64,
}

// SAFETY: RecvBuf owns its allocation like a Box<[u8]> does; it is only ever used by the
// thread that owns it.
unsafe impl Send for RecvBuf {}

impl RecvBuf {
    /// A zeroed buffer of `size` bytes (at least one).
    pub fn new(size: usize) -> RecvBuf {
        let boxed: Box<[u8]> = vec![0; size.max(1)].into_boxed_slice();
        let len = boxed.len();
        let ptr = NonNull::from(Box::leak(boxed)).cast::<u8>();
        RecvBuf {
            ptr,
            len,
            in_flight: false,
            user_data: 0,
        }
    }

    /// Whether a receive is in flight.
    pub fn in_flight(&self) -> bool {
        self.in_flight
    }

    /// Checks the receive back in with its completion and returns the bytes it filled
    /// (none for an error or EOF).
    ///
    /// # Panics
    /// If `cqe` is not the completion of this buffer's receive in flight (a driver bug).
    pub fn complete(&mut self, cqe: Cqe) -> &mut [u8] {
        assert!(
            self.in_flight && cqe.user_data == self.user_data,
            "receive buffer checked in with another operation's completion"
        );
        self.in_flight = false;
        let n = usize::try_from(cqe.result).unwrap_or(0).min(self.len);
        // SAFETY: `ptr` owns `len` initialized bytes (zeroed at allocation); the receive that
        // wrote into them has completed (its own completion was just checked), so nothing
        // else accesses them while the returned borrow of `self` lives.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), n) }
    }
}

impl Drop for RecvBuf {
    fn drop(&mut self) {
        if !self.in_flight {
            // SAFETY: `ptr`/`len` came from a leaked Box<[u8]> in `new` and are freed once,
            // here; no receive is in flight. (In flight, the memory is leaked instead.)
            unsafe {
                drop(Box::from_raw(std::ptr::slice_from_raw_parts_mut(
                    self.ptr.as_ptr(),
                    self.len,
                )));
            }
        }
    }
}

/// An 8-byte read target (an eventfd counter), held as a raw allocation (see [`RecvBuf`]).
pub(crate) struct WordBuf {
    pub(super) word: NonNull<u64>,
    pub(super) in_flight: bool,
    /// The `user_data` of the read in flight.
    pub(super) user_data: u64,
}

impl WordBuf {
    /// A zeroed word.
    pub fn new() -> WordBuf {
        WordBuf {
            word: NonNull::from(Box::leak(Box::new(0u64))),
            in_flight: false,
            user_data: 0,
        }
    }

    /// Checks the read back in with its completion and returns the word.
    ///
    /// # Panics
    /// If `cqe` is not the completion of this buffer's read in flight (a driver bug).
    pub fn complete(&mut self, cqe: Cqe) -> u64 {
        assert!(
            self.in_flight && cqe.user_data == self.user_data,
            "word buffer checked in with another operation's completion"
        );
        self.in_flight = false;
        // SAFETY: the read that targeted the word has completed; `word` is a live Box
        // allocation owned by `self`.
        unsafe { *self.word.as_ptr() }
    }
}

impl Drop for WordBuf {
    fn drop(&mut self) {
        if !self.in_flight {
            // SAFETY: from Box::leak in `new`, freed once, with no read in flight.
            unsafe { drop(Box::from_raw(self.word.as_ptr())) }
        }
    }
}

/// The duration of a timeout operation, kept where the kernel can read it (a raw
/// allocation, see [`RecvBuf`]).
pub(crate) struct TimerBuf {
    pub(super) spec: NonNull<Timespec>,
    pub(super) in_flight: bool,
    /// The `user_data` of the timeout in flight.
    pub(super) user_data: u64,
}

impl TimerBuf {
    /// A timer of `every`.
    pub fn new(every: std::time::Duration) -> TimerBuf {
        let spec = Timespec::new()
            .sec(every.as_secs())
            .nsec(every.subsec_nanos());
        TimerBuf {
            spec: NonNull::from(Box::leak(Box::new(spec))),
            in_flight: false,
            user_data: 0,
        }
    }

    /// Checks the fired (or cancelled) timeout back in with its completion.
    ///
    /// # Panics
    /// If `cqe` is not the completion of this timer's timeout (a driver bug).
    pub fn complete(&mut self, cqe: Cqe) {
        assert!(
            self.in_flight && cqe.user_data == self.user_data,
            "timer checked in with another operation's completion"
        );
        self.in_flight = false;
    }
}

impl Drop for TimerBuf {
    fn drop(&mut self) {
        if !self.in_flight {
            // SAFETY: from Box::leak in `new`, freed once, with no timeout in flight.
            unsafe { drop(Box::from_raw(self.spec.as_ptr())) }
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
        buf.in_flight = true;
        buf.complete(Cqe::new(0, 10, 0), 1 << 16);
        assert_eq!(buf.remaining(), 30);
        buf.in_flight = true;
        buf.complete(Cqe::new(0, 30, 0), 1 << 16);
        assert!(buf.is_idle());
        assert_eq!(buf.data.capacity(), 4096, "kept for the next load");
    }

    #[test]
    fn unsent_bytes_in_one_slice_are_found_wherever_they_are() {
        let frame = Rc::new(Bytes::from_static(b"shared"));
        let load = |data: &[u8], pieces: &[usize]| {
            let mut buf = SendBuf::default();
            let mut out = data.to_vec();
            let mut placed = pieces
                .iter()
                .map(|&offset| (offset, Piece::Shared(frame.clone())))
                .collect();
            buf.load_pieces(&mut out, &mut placed);
            buf
        };
        // Corked bytes alone, a piece alone.
        assert_eq!(load(b"abc", &[]).contiguous_unsent(), Some(&b"abc"[..]));
        assert_eq!(load(b"", &[0]).contiguous_unsent(), Some(&b"shared"[..]));
        // Corked bytes and a piece: two slices, until the first is written.
        let mut buf = load(b"ab", &[2]);
        assert_eq!(buf.contiguous_unsent(), None);
        buf.pos = 1;
        assert_eq!(buf.contiguous_unsent(), None);
        buf.pos = 2;
        assert_eq!(buf.contiguous_unsent(), Some(&b"shared"[..]));
        buf.pos = 5;
        assert_eq!(buf.contiguous_unsent(), Some(&b"red"[..]));
        // A piece with bytes after it, then the bytes after it alone.
        let mut buf = load(b"xyz", &[0]);
        assert_eq!(buf.contiguous_unsent(), None);
        buf.pos = 6;
        assert_eq!(buf.contiguous_unsent(), Some(&b"xyz"[..]));
        buf.pos = 8;
        assert_eq!(buf.contiguous_unsent(), Some(&b"z"[..]));
        // Two pieces back to back, then the second alone.
        let mut buf = load(b"", &[0, 0]);
        assert_eq!(buf.contiguous_unsent(), None);
        buf.pos = 3;
        assert_eq!(
            buf.contiguous_unsent(),
            None,
            "the rest of the first, and the second"
        );
        buf.pos = 6;
        assert_eq!(buf.contiguous_unsent(), Some(&b"shared"[..]));
        // Nothing loaded: nothing to send.
        assert_eq!(load(b"", &[]).contiguous_unsent(), None);
    }

    #[test]
    fn send_buf_drops_a_large_vector_once_written() {
        let mut buf = SendBuf::default();
        let mut out = vec![1u8; 100_000];
        buf.load(&mut out);
        buf.in_flight = true;
        buf.complete(Cqe::new(0, 100_000, 0), 64 * 1024);
        assert_eq!(buf.data.capacity(), 0);
    }

    #[test]
    #[should_panic(expected = "another operation's completion")]
    fn a_completion_of_another_operation_is_refused() {
        let mut send = SendBuf::default();
        send.load(&mut vec![1, 2, 3]);
        send.in_flight = true;
        send.user_data = 7;
        send.complete(Cqe::new(8, 3, 0), 0);
    }

    #[test]
    fn receive_word_and_timer_buffers_check_in_with_their_own_completion() {
        let mut recv = RecvBuf::new(8);
        recv.in_flight = true;
        recv.user_data = 1;
        assert_eq!(recv.complete(Cqe::new(1, 5, 0)).len(), 5);
        recv.in_flight = true;
        assert_eq!(
            recv.complete(Cqe::new(1, -104, 0)).len(),
            0,
            "an error fills nothing"
        );
        let mut word = WordBuf::new();
        word.in_flight = true;
        word.user_data = 2;
        assert_eq!(word.complete(Cqe::new(2, 8, 0)), 0);
        let mut timer = TimerBuf::new(std::time::Duration::from_millis(5));
        timer.in_flight = true;
        timer.user_data = 3;
        timer.complete(Cqe::new(3, -62, 0));
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
