//! The io_uring runtime: one shard per core, each a thread with its own ring, its own
//! `SO_REUSEPORT` listener, its own provided-buffer ring and registered send pool, driving
//! per-connection state machines from completions (no futures on the hot path).
//!
//! * [`ring`]: every `unsafe` line that touches the ring or memory the kernel may touch.
//! * [`sys`]: cold-path system calls (listeners, eventfds, pinning, signals).
//! * [`shard`]: the completion loop and the connection slab.
//!
//! Shards share nothing mutable on the hot path. Cross-thread requests ([`Command`]) arrive
//! through a per-shard queue plus an eventfd the shard keeps a read armed on.

pub(crate) mod ring;
pub(crate) mod shard;
pub(crate) mod sys;

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};

use bytes::Bytes;

use crate::proto::{CloseCode, OpCode};

/// Whether `RINGSOCK_LOG=debug` asked for debug lines.
pub(crate) fn debug_enabled() -> bool {
    static ENABLED: OnceLock<bool> = OnceLock::new();
    *ENABLED.get_or_init(|| std::env::var("RINGSOCK_LOG").is_ok_and(|v| v == "debug"))
}

/// A warning line on stderr (the crate has no logging dependency).
macro_rules! warn_log {
    ($($arg:tt)*) => { eprintln!("ringsock: {}", format_args!($($arg)*)) };
}

/// A debug line on stderr, only with `RINGSOCK_LOG=debug`.
macro_rules! debug_log {
    ($($arg:tt)*) => {
        if $crate::runtime::debug_enabled() {
            eprintln!("ringsock[debug]: {}", format_args!($($arg)*))
        }
    };
}

pub(crate) use {debug_log, warn_log};

/// A request to a shard from another thread.
pub(crate) enum Command {
    /// Send a data message to one connection.
    Send {
        slot: u32,
        gen: u32,
        opcode: OpCode,
        payload: Bytes,
    },
    /// Start the closing handshake on one connection.
    Close {
        slot: u32,
        gen: u32,
        code: CloseCode,
        reason: String,
    },
    /// Deliver an encoded frame to every local subscriber of a topic.
    Publish { topic: Arc<str>, frame: Bytes },
    /// Deliver an encoded frame to every open connection.
    Broadcast { frame: Bytes },
    /// Graceful shutdown.
    Shutdown,
}

/// Holds each shard's optional locked memory (buffer ring, registered send pool) back until
/// every shard has created its ring: RLIMIT_MEMLOCK is one budget for all of them, and the
/// optional registrations (which fall back) must not take the room a later shard's ring
/// needs (which does not).
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

/// The part of a shard other threads may reach: its command queue, its wake-up eventfd and
/// its counters.
pub(crate) struct ShardShared {
    /// The shard's index.
    pub id: usize,
    queue: Mutex<Vec<Command>>,
    eventfd: RawFd,
    connections: AtomicUsize,
    stopped: AtomicBool,
}

impl ShardShared {
    /// A queue with a fresh eventfd.
    pub fn new(id: usize) -> std::io::Result<ShardShared> {
        Ok(ShardShared {
            id,
            queue: Mutex::new(Vec::new()),
            eventfd: sys::eventfd()?,
            connections: AtomicUsize::new(0),
            stopped: AtomicBool::new(false),
        })
    }

    /// Queues a command and wakes the shard. Returns `false` once the shard has stopped.
    pub fn post(&self, command: Command) -> bool {
        if self.stopped.load(Ordering::Acquire) {
            return false;
        }
        match self.queue.lock() {
            Ok(mut queue) => queue.push(command),
            Err(poisoned) => poisoned.into_inner().push(command),
        }
        sys::wake(self.eventfd);
        true
    }

    /// Takes every queued command.
    pub fn drain(&self, into: &mut Vec<Command>) {
        let mut queue = match self.queue.lock() {
            Ok(queue) => queue,
            Err(poisoned) => poisoned.into_inner(),
        };
        std::mem::swap(&mut *queue, into);
    }

    /// The eventfd the shard reads.
    pub fn eventfd(&self) -> RawFd {
        self.eventfd
    }

    /// Live connections on this shard.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }

    pub(crate) fn set_connections(&self, n: usize) {
        self.connections.store(n, Ordering::Relaxed);
    }

    /// Marks the shard stopped: later posts fail.
    pub(crate) fn set_stopped(&self) {
        self.stopped.store(true, Ordering::Release);
    }

    /// Whether the shard has stopped.
    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::Acquire)
    }
}

impl Drop for ShardShared {
    fn drop(&mut self) {
        sys::close(self.eventfd);
    }
}
