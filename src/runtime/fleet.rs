//! The shards of one server as a whole: starting their threads, asking them to stop,
//! waiting for them, and what happens when one fails.
//!
//! Each shard thread reports its start (ring up, or why not), runs its loop, then marks its
//! mailbox stopped with the reason it failed, if it did, and wakes whoever waits on the
//! fleet. A failed shard has already closed its listener and connections; under
//! [`ShardFailure::ShutDown`] it also asks every other shard to shut down, so the server
//! stops and [`Fleet::wait`] reports the failure.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};

use super::app::App;
use super::command::{Command, Mailbox, Posted};
use super::config::{ShardConfig, ShardFailure};
use super::fault;
use super::pubsub::Uplink;
use super::setup::RingGate;
use super::shard::{Listener, Shard};
use super::signal::SignalWatch;
use super::sys;

/// An eventfd that shard threads write when they exit; closed when the last owner drops it.
struct ExitSignal(RawFd);

impl Drop for ExitSignal {
    fn drop(&mut self) {
        sys::close(self.0);
    }
}

/// Marks a shard's end when its thread finishes, however it finishes: the mailbox is
/// stopped with the failure, if any; under [`ShardFailure::ShutDown`] a failure asks every
/// other shard to shut down; whoever waits on the fleet is woken.
struct Finish {
    policy: ShardFailure,
    all: Arc<[Arc<Mailbox>]>,
    index: usize,
    exited: Arc<ExitSignal>,
    failure: Option<String>,
}

impl Drop for Finish {
    fn drop(&mut self) {
        let failure = self.failure.take();
        let failed = failure.is_some();
        self.all[self.index].stop(failure);
        if failed && self.policy == ShardFailure::ShutDown {
            for other in self.all.iter() {
                other.post(Command::Shutdown);
            }
        }
        sys::wake(self.exited.0);
    }
}

/// A running server's shards.
pub(crate) struct Fleet {
    mailboxes: Arc<[Arc<Mailbox>]>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    exited: Arc<ExitSignal>,
    /// The shards' listening address.
    addr: Option<SocketAddr>,
    /// Shutdown was requested before (the accept-queue check is made once).
    shutdown_requested: AtomicBool,
    /// Copies of every shard's listeners (not when they are shared with a service manager),
    /// shut down one after another from one thread when shutdown is requested; see
    /// [`Fleet::request_shutdown`].
    listeners: Mutex<Vec<OwnedFd>>,
}

impl Fleet {
    /// Starts one shard per set of listeners (`listeners[i]`: shard `i`'s, one per address;
    /// `cpus[i]`: the CPU to pin shard `i` to), with the
    /// uplink to other nodes if one is given, and returns once each has its ring up.
    ///
    /// # Errors
    /// The first shard's start error (io_uring unavailable, ...); every shard that did start
    /// is stopped again first.
    pub fn start<A: App>(
        app: Arc<A>,
        config: ShardConfig,
        listeners: Vec<Vec<Listener>>,
        cpus: Vec<Option<usize>>,
        uplink: Option<Arc<dyn Uplink>>,
    ) -> io::Result<Fleet> {
        fault::install_hook();
        let count = listeners.len();
        // Copies for `request_shutdown` (a copy that cannot be made only loses the ordering).
        let copies = if config.shared_listener {
            Vec::new()
        } else {
            listeners
                .iter()
                .flatten()
                .filter_map(|l| l.fd.try_clone().ok())
                .collect()
        };
        let addr = listeners
            .first()
            .and_then(|l| l.first())
            .and_then(|l| sys::local_addr(l.fd.as_raw_fd()).ok());
        let capacity = config.buffers.command_queue;
        let mailboxes: Vec<Arc<Mailbox>> = (0..count)
            .map(|i| Mailbox::new(i, capacity).map(Arc::new))
            .collect::<io::Result<_>>()?;
        let mailboxes: Arc<[Arc<Mailbox>]> = mailboxes.into();
        let exited = Arc::new(ExitSignal(sys::eventfd()?));
        let config = Arc::new(config);
        let gate = Arc::new(RingGate::new(count));
        let (tx, rx) = mpsc::channel();
        let mut threads = Vec::with_capacity(count);
        let mut first_error = None;
        for (index, listener) in listeners.into_iter().enumerate() {
            if first_error.is_some() {
                gate.arrive(false);
                continue;
            }
            let uplink = uplink.clone();
            let (app, config, all, tx, ring_gate, exited) = (
                Arc::clone(&app),
                Arc::clone(&config),
                Arc::clone(&mailboxes),
                tx.clone(),
                Arc::clone(&gate),
                Arc::clone(&exited),
            );
            let cpu = cpus.get(index).copied().flatten();
            let spawned = thread::Builder::new()
                .name(format!("ringsock-{index}"))
                .spawn(move || {
                    if let Some(cpu) = cpu {
                        let _ = sys::pin_to_cpu(cpu);
                    }
                    // Reports the end of the thread on every path, a panic included.
                    let mut finish = Finish {
                        policy: config.on_failure,
                        all: Arc::clone(&all),
                        index,
                        exited,
                        failure: Some("the shard thread ended unexpectedly".to_owned()),
                    };
                    let shard = Shard::new(
                        app,
                        config,
                        Arc::clone(&all),
                        index,
                        listener,
                        &ring_gate,
                        uplink,
                    );
                    match shard {
                        Ok(shard) => {
                            let _ = tx.send(Ok(()));
                            drop(tx);
                            // `run` catches its own panics; this one also covers the drop
                            // of what is left of the shard.
                            let run = panic::catch_unwind(AssertUnwindSafe(move || shard.run()));
                            finish.failure = match run {
                                Ok(failure) => failure,
                                Err(payload) => {
                                    Some(format!("panicked: {}", fault::payload_message(&*payload)))
                                }
                            };
                        }
                        Err(e) => {
                            // Not started: `Fleet::start` reports it.
                            finish.failure = None;
                            let _ = tx.send(Err(e));
                        }
                    }
                });
            match spawned {
                Ok(thread) => threads.push(thread),
                Err(e) => {
                    gate.arrive(false);
                    mailboxes[index].stop(None);
                    first_error = Some(e);
                }
            }
        }
        drop(tx);
        // One report per started thread (a thread that died without one closes the channel).
        for _ in 0..threads.len() {
            match rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    first_error.get_or_insert(e);
                }
                Err(_) => {
                    first_error.get_or_insert(io::Error::other("a shard thread died at start"));
                    break;
                }
            }
        }
        let fleet = Fleet {
            mailboxes,
            threads: Mutex::new(threads),
            exited,
            addr,
            shutdown_requested: AtomicBool::new(false),
            listeners: Mutex::new(copies),
        };
        if let Some(e) = first_error {
            fleet.request_shutdown();
            let _ = fleet.wait();
            return Err(e);
        }
        Ok(fleet)
    }

    /// Every shard's mailbox.
    pub fn mailboxes(&self) -> &Arc<[Arc<Mailbox>]> {
        &self.mailboxes
    }

    /// Posts a command to every shard (built once per shard); how many took it.
    pub fn post_all(&self, mut make: impl FnMut() -> Command) -> usize {
        self.mailboxes
            .iter()
            .filter(|m| m.post(make()) == Posted::Queued)
            .count()
    }

    /// Asks every shard to shut down gracefully; returns at once.
    pub fn request_shutdown(&self) {
        if !self.shutdown_requested.swap(true, Ordering::Relaxed) {
            self.warn_if_queues_reset();
            // Leave the SO_REUSEPORT group one listener after another, from this thread. With
            // `tcp_migrate_req` each closing listener hands its queue to another of the group
            // — possibly one of ours that closes next — and a hand-over to a listener that is
            // closing at that instant on another shard's thread resets the connection; one at
            // a time, each queue moves on until it reaches a listener that stays (the new
            // process's). The shards then close their own descriptors.
            let listeners =
                std::mem::take(&mut *self.listeners.lock().unwrap_or_else(|p| p.into_inner()));
            for listener in &listeners {
                sys::shutdown(listener.as_raw_fd(), false);
            }
        }
        self.post_all(|| Command::Shutdown);
    }

    /// Logs once when other listeners share our address (a process taking over from this
    /// one) but the kernel will reset, not hand over, the connections waiting in our accept
    /// queues as the shards close their listeners: `net.ipv4.tcp_migrate_req` is 0.
    fn warn_if_queues_reset(&self) {
        let Some(addr) = self.addr else { return };
        if sys::migrate_req() != Some(false) {
            return;
        }
        let ours = self.mailboxes.iter().filter(|m| !m.is_stopped()).count();
        let Some(all) = sys::listeners_on(&addr) else {
            return;
        };
        if all > ours {
            tracing::warn!(
                %addr,
                others = all - ours,
                "other listeners share this address, but net.ipv4.tcp_migrate_req is 0: the \
                 connections waiting in this server's accept queues when it closes its \
                 listeners are reset instead of handed over to them. For restarts that lose \
                 nothing, set net.ipv4.tcp_migrate_req = 1 (a file in /etc/sysctl.d/)"
            );
        }
    }

    /// Waits for every shard thread to exit; an error names every shard that failed.
    ///
    /// # Errors
    /// When a shard failed (a ringsock bug, or a ring that broke): the server is not whole.
    pub fn wait(&self) -> io::Result<()> {
        // The lock is held across the joins, so a second waiter returns only once every
        // shard has exited too.
        let mut threads = self.threads.lock().unwrap_or_else(|p| p.into_inner());
        for thread in threads.drain(..) {
            let _ = thread.join();
        }
        drop(threads);
        self.failure()
    }

    /// The shards' failures so far, as one error.
    pub fn failure(&self) -> io::Result<()> {
        let failures: Vec<String> = self
            .mailboxes
            .iter()
            .filter_map(|m| {
                m.failure()
                    .map(|why| format!("shard {} failed: {why}", m.id))
            })
            .collect();
        if failures.is_empty() {
            Ok(())
        } else {
            Err(io::Error::other(failures.join("; ")))
        }
    }

    /// Whether every shard has stopped.
    pub fn is_stopped(&self) -> bool {
        self.mailboxes.iter().all(|m| m.is_stopped())
    }

    /// Serves until SIGINT or SIGTERM (then calls `on_signal` and shuts down gracefully) or
    /// until every shard has stopped, then waits for them.
    ///
    /// # Errors
    /// The signal handlers cannot be installed, or a shard failed.
    pub fn run_until_signal(&self, on_signal: impl FnOnce()) -> io::Result<()> {
        let watch = SignalWatch::register()?;
        while !self.is_stopped() {
            match sys::wait_readable(&[watch.fd(), self.exited.0])? {
                0 => {
                    on_signal();
                    self.request_shutdown();
                    break;
                }
                _ => sys::drain_eventfd(self.exited.0),
            }
        }
        drop(watch);
        self.wait()
    }
}
