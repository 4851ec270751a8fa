//! How other threads reach a shard: a [`Mailbox`] per shard, holding a bounded queue of
//! [`Command`]s and the eventfd that wakes the shard, plus the few counters other threads
//! read and the shard's heartbeat. The shard drains the whole queue on each wake-up.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use super::metrics::Metrics;
use super::slab::ConnId;
use super::sys;
use crate::proto::{CloseCode, OpCode};

/// A request to a shard from another thread.
pub(crate) enum Command {
    /// Send a data message to one connection.
    Send {
        /// The connection; a stale identity finds nothing.
        id: ConnId,
        /// Text or binary.
        opcode: OpCode,
        /// The payload.
        payload: Bytes,
    },
    /// Start the closing handshake on one connection.
    Close {
        /// The connection; a stale identity finds nothing.
        id: ConnId,
        /// The close code to send.
        code: CloseCode,
        /// The close reason, at most 123 bytes.
        reason: String,
    },
    /// Deliver an encoded frame to every local subscriber of a topic.
    Publish {
        /// The topic.
        topic: Arc<str>,
        /// The frame, encoded once for every shard.
        frame: Bytes,
    },
    /// Deliver an encoded frame to every open connection.
    Broadcast {
        /// The frame, encoded once for every shard.
        frame: Bytes,
    },
    /// The deferred answer to a connection's upgrade request: a boxed
    /// `Verdict<State>` of the shard's application.
    Decide {
        /// The connection; a stale identity finds nothing.
        id: ConnId,
        /// The verdict.
        verdict: Box<dyn std::any::Any + Send>,
    },
    /// Copy the shard's counters to its mailbox now, then signal `done`.
    Report {
        /// Told when the copy is made.
        done: std::sync::mpsc::Sender<()>,
    },
    /// Graceful shutdown.
    Shutdown,
    /// Test hook: a panic in the shard's own code, as a ringsock bug would cause.
    InjectFault,
}

impl Command {
    /// Whether the queue bound applies: data does; shutdown, upgrade answers (one per
    /// connection), reports and test hooks always get in.
    fn bounded(&self) -> bool {
        !matches!(
            self,
            Command::Shutdown
                | Command::InjectFault
                | Command::Report { .. }
                | Command::Decide { .. }
        )
    }
}

/// What became of a posted command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Posted {
    /// Queued; the shard will take it.
    Queued,
    /// The queue is at its bound; the command was dropped.
    Full,
    /// The shard has stopped; the command was dropped.
    Stopped,
}

/// The part of a shard other threads may reach.
pub(crate) struct Mailbox {
    /// The shard's index.
    pub id: usize,
    queue: Mutex<Vec<Command>>,
    /// The most bounded commands the queue holds.
    capacity: usize,
    eventfd: RawFd,
    /// Live connections (handshaking, open and closing), as of the last batch.
    connections: AtomicUsize,
    /// Handler callbacks that panicked.
    handler_panics: AtomicU64,
    /// Commands refused because the queue was full.
    refused: AtomicU64,
    /// Publications skipped for subscribers over the hard cap.
    fanout_skipped: AtomicU64,
    /// The shard's counters as of its last copy (each timer tick, each `Report`, and at
    /// exit); `handler_panics` and `commands_refused` are kept in the atomics above instead.
    metrics: Mutex<Metrics>,
    /// The shard loop's `now` as of its last timer tick: a watchdog that sees it stand still
    /// for longer than a tick knows the loop is stuck.
    heartbeat: AtomicU64,
    stopped: AtomicBool,
    /// Why the shard failed, if it did (a ringsock bug, not a handler panic).
    failure: Mutex<Option<String>>,
}

impl Mailbox {
    /// A mailbox with a fresh eventfd, holding at most `capacity` bounded commands.
    ///
    /// # Errors
    /// No eventfd (descriptor limits).
    pub fn new(id: usize, capacity: usize) -> std::io::Result<Mailbox> {
        Ok(Mailbox {
            id,
            queue: Mutex::new(Vec::new()),
            capacity: capacity.max(1),
            eventfd: sys::eventfd()?,
            connections: AtomicUsize::new(0),
            handler_panics: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            fanout_skipped: AtomicU64::new(0),
            metrics: Mutex::new(Metrics::default()),
            heartbeat: AtomicU64::new(0),
            stopped: AtomicBool::new(false),
            failure: Mutex::new(None),
        })
    }

    /// Queues a command and wakes the shard (one wake-up per batch of posts: a post to a
    /// non-empty queue finds the wake-up of the first one still pending, since the shard
    /// drains the queue only after reading its eventfd).
    pub fn post(&self, command: Command) -> Posted {
        if self.is_stopped() {
            return Posted::Stopped;
        }
        let was_empty = {
            let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
            // Checked again under the lock: `stop` clears the queue under it.
            if self.is_stopped() {
                return Posted::Stopped;
            }
            if command.bounded() && queue.len() >= self.capacity {
                drop(queue);
                self.refused.fetch_add(1, Ordering::Relaxed);
                return Posted::Full;
            }
            queue.push(command);
            queue.len() == 1
        };
        if was_empty {
            sys::wake(self.eventfd);
        }
        Posted::Queued
    }

    /// Takes every queued command (swapping vectors, so both keep their capacity).
    pub fn drain(&self, into: &mut Vec<Command>) {
        let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
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

    /// Updates the live connection count (a store only when it changed: the cache line is
    /// shared with threads that post).
    pub fn set_connections(&self, n: usize) {
        if self.connections.load(Ordering::Relaxed) != n {
            self.connections.store(n, Ordering::Relaxed);
        }
    }

    /// Publishes the shard's count of publications skipped for subscribers over the hard cap
    /// (a store only when it changed).
    pub fn set_fanout_skipped(&self, n: u64) {
        if self.fanout_skipped.load(Ordering::Relaxed) != n {
            self.fanout_skipped.store(n, Ordering::Relaxed);
        }
    }

    /// Publications skipped for subscribers over the hard cap so far.
    pub fn fanout_skipped(&self) -> u64 {
        self.fanout_skipped.load(Ordering::Relaxed)
    }

    /// Stores a copy of the shard's counters (from its own thread; never per message).
    pub fn publish_metrics(&self, metrics: &Metrics) {
        self.metrics
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone_from(metrics);
    }

    /// The shard's counters as of its last copy, with the ones kept in atomics.
    pub fn metrics(&self) -> Metrics {
        let mut metrics = self
            .metrics
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        metrics.handler_panics = self.handler_panics();
        metrics.commands_refused = self.refused();
        metrics
    }

    /// Counts a handler panic.
    pub fn count_panic(&self) {
        self.handler_panics.fetch_add(1, Ordering::Relaxed);
    }

    /// Handler panics so far.
    pub fn handler_panics(&self) -> u64 {
        self.handler_panics.load(Ordering::Relaxed)
    }

    /// Records the loop's `now` (once per timer tick, never per message: the cache line is
    /// shared with threads that post).
    pub fn beat(&self, now: u64) {
        self.heartbeat.store(now, Ordering::Relaxed);
    }

    /// The loop's `now` as of its last timer tick (0 before the first).
    pub fn heartbeat(&self) -> u64 {
        self.heartbeat.load(Ordering::Relaxed)
    }

    /// Commands refused so far because the queue was full.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Marks the shard stopped (later posts fail), with the reason if it failed. Queued
    /// commands are dropped.
    pub fn stop(&self, failure: Option<String>) {
        if let Some(why) = failure {
            *self.failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
        }
        let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        self.stopped.store(true, Ordering::Release);
        queue.clear();
    }

    /// Whether the shard has stopped.
    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::Acquire)
    }

    /// Why the shard failed, if it did.
    pub fn failure(&self) -> Option<String> {
        self.failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl Drop for Mailbox {
    fn drop(&mut self) {
        sys::close(self.eventfd);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_queue_refuses_data_but_not_shutdown() {
        let mailbox = Mailbox::new(0, 2).unwrap();
        let broadcast = || Command::Broadcast {
            frame: Bytes::from_static(b"x"),
        };
        assert_eq!(mailbox.post(broadcast()), Posted::Queued);
        assert_eq!(mailbox.post(broadcast()), Posted::Queued);
        assert_eq!(mailbox.post(broadcast()), Posted::Full);
        assert_eq!(mailbox.refused(), 1);
        assert_eq!(mailbox.post(Command::Shutdown), Posted::Queued);
        let mut taken = Vec::new();
        mailbox.drain(&mut taken);
        assert_eq!(taken.len(), 3);
        assert_eq!(mailbox.post(broadcast()), Posted::Queued, "room again");
        mailbox.stop(Some("test".into()));
        assert_eq!(mailbox.post(broadcast()), Posted::Stopped);
        assert_eq!(mailbox.failure().as_deref(), Some("test"));
    }
}
