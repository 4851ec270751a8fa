//! One shard: a thread with its own ring, listener, buffers and connection slab, driving every
//! connection's state machine from completions.
//!
//! A loop iteration: submit and wait, reap every completion, dispatch each by its `user_data`
//! (operation tag, slot, generation) to its connection, then settle every connection the
//! batch touched: load and submit at most one send per connection, half-close after the last
//! byte of a closing connection, apply backpressure (stop or resume receiving), and free
//! connections with no operation left in flight. Nothing here blocks or allocates per message
//! once buffers have grown to their working size.
//!
//! Connection life: accept → handshake (bytes accumulate until the request head parses) →
//! open (frames go through [`crate::proto::Connection`]) → closing (our close sent, or the
//! closing handshake done: flush, `shutdown(SHUT_WR)`, wait for the peer's FIN, bounded by
//! the close timeout) → freed. A dead connection (reset, EOF, timeout) is shut down both ways
//! so its operations complete, and freed once they have.

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::ring::{BufRing, Cqe, FixedPool, RecvBuf, Ring, SendBuf, TimerBuf, WordBuf};
use super::{debug_log, sys, warn_log, Command, RingGate, ShardShared};
use crate::proto::deflate::{self, Deflate};
use crate::proto::handshake::{self, HttpError};
use crate::proto::{self, CloseCode, Connection, Event, OpCode, State};
use crate::server::ws::{queue_message, SendLimits};
use crate::server::{Config, Handler, Message, SendStatus, Upgrade, Ws};

const TAG_ACCEPT: u8 = 1;
const TAG_RECV: u8 = 2;
const TAG_SEND: u8 = 3;
const TAG_CANCEL: u8 = 4;
const TAG_EVENT: u8 = 5;
const TAG_TIMER: u8 = 6;
const GEN_MASK: u32 = 0x00FF_FFFF;

/// `user_data` layout: tag (8 bits) | generation (24 bits) | slot (32 bits).
fn user_data(tag: u8, slot: u32, gen: u32) -> u64 {
    (u64::from(tag) << 56) | (u64::from(gen & GEN_MASK) << 32) | u64::from(slot)
}

/// Splits `user_data` into (tag, slot, generation).
fn split_user_data(ud: u64) -> (u8, u32, u32) {
    ((ud >> 56) as u8, ud as u32, ((ud >> 32) as u32) & GEN_MASK)
}

/// The per-connection part a [`Ws`] handle works on.
pub(crate) struct Link {
    pub slot: u32,
    pub gen: u32,
    pub peer: SocketAddr,
    /// Corked output: frames queued since the last send was loaded.
    pub out: Vec<u8>,
    /// Bytes loaded into the send buffer and not yet written.
    pub in_flight: usize,
    /// permessage-deflate was negotiated.
    pub compress: bool,
    pub min_compress: usize,
    /// Data messages may be sent (open, and no close sent or requested).
    pub open: bool,
    /// A close the handler asked for, applied after the callback.
    pub close_req: Option<(CloseCode, String)>,
    /// Messages queued while the engine was borrowed (payloads back to back).
    pub deferred: Vec<u8>,
    /// (opcode, length, compress) of each deferred message.
    pub deferred_msgs: Vec<(OpCode, usize, bool)>,
    pub topics: Vec<Arc<str>>,
    /// `on_close` was called.
    pub notified: bool,
    pub touched: bool,
}

impl Link {
    fn new(slot: u32, gen: u32, peer: SocketAddr) -> Link {
        Link {
            slot,
            gen,
            peer,
            out: Vec::new(),
            in_flight: 0,
            compress: false,
            min_compress: usize::MAX,
            open: false,
            close_req: None,
            deferred: Vec::new(),
            deferred_msgs: Vec::new(),
            topics: Vec::new(),
            notified: false,
            touched: false,
        }
    }

    /// Bytes queued and not yet written.
    pub fn buffered(&self) -> usize {
        self.out.len() + self.in_flight + self.deferred.len()
    }

    /// Queued or backpressure, by the high-water mark.
    pub fn status(&self, limits: &SendLimits) -> SendStatus {
        if self.buffered() >= limits.high_water_mark {
            SendStatus::Backpressure
        } else {
            SendStatus::Queued
        }
    }
}

/// Shard-wide state a [`Ws`] handle may reach.
pub(crate) struct Ctx {
    pub shard: usize,
    pub shards: Arc<[Arc<ShardShared>]>,
    high_water_mark: usize,
    max_buffered: usize,
    topics: HashMap<Arc<str>, Vec<(u32, u32)>>,
    publishes: Vec<(Arc<str>, Bytes)>,
    touched: Vec<u32>,
}

impl Ctx {
    pub fn limits(&self) -> SendLimits {
        SendLimits {
            high_water_mark: self.high_water_mark,
            max_buffered: self.max_buffered,
        }
    }

    /// Queues the connection for settling at the end of the batch.
    pub fn touch(&mut self, link: &mut Link) {
        if !link.touched {
            link.touched = true;
            self.touched.push(link.slot);
        }
    }

    pub fn subscribe(&mut self, link: &mut Link, topic: &str) -> bool {
        if link.topics.iter().any(|t| &**t == topic) {
            return false;
        }
        let key = match self.topics.get_key_value(topic) {
            Some((key, _)) => Arc::clone(key),
            None => Arc::from(topic),
        };
        self.topics
            .entry(Arc::clone(&key))
            .or_default()
            .push((link.slot, link.gen));
        link.topics.push(key);
        true
    }

    pub fn unsubscribe(&mut self, link: &mut Link, topic: &str) -> bool {
        let Some(index) = link.topics.iter().position(|t| &**t == topic) else {
            return false;
        };
        let key = link.topics.swap_remove(index);
        self.remove_subscriber(&key, link.slot);
        true
    }

    fn remove_subscriber(&mut self, topic: &str, slot: u32) {
        if let Some(subs) = self.topics.get_mut(topic) {
            subs.retain(|&(s, _)| s != slot);
            if subs.is_empty() {
                self.topics.remove(topic);
            }
        }
    }

    /// Local fan-out after the callback; other shards get the same frame by message.
    pub fn publish(&mut self, topic: &str, frame: Bytes) {
        let key = match self.topics.get_key_value(topic) {
            Some((key, _)) => Arc::clone(key),
            None => Arc::from(topic),
        };
        for peer in self.shards.iter().filter(|s| s.id != self.shard) {
            peer.post(Command::Publish {
                topic: Arc::clone(&key),
                frame: frame.clone(),
            });
        }
        self.publishes.push((key, frame));
    }
}

struct WsPart<S> {
    conn: Connection,
    state: S,
}

struct Conn<S> {
    fd: RawFd,
    link: Link,
    /// Request bytes so far, while the handshake is in progress.
    handshake: Option<Vec<u8>>,
    ws: Option<WsPart<S>>,
    send: SendBuf,
    recv_buf: Option<RecvBuf>,
    recv_armed: bool,
    recv_cancelling: bool,
    cancels: u32,
    /// Flush, then half-close and wait for the peer's FIN.
    close_after_flush: bool,
    wr_shut: bool,
    peer_eof: bool,
    dead: bool,
    over_mark: bool,
    /// Bytes received while over the high-water mark, not yet dispatched (see
    /// [`Core::on_received`]); `stash_pos` is how far they were fed back.
    stash: Vec<u8>,
    stash_pos: usize,
    /// When the idle ping was sent (ms), if one is outstanding.
    pinged_at: Option<u64>,
    last_rx: u64,
    /// Handshake or closing deadline (ms since shard start); 0 for none.
    deadline: u64,
}

struct Slot<S> {
    gen: u32,
    conn: Option<Conn<S>>,
}

/// Everything but the ring and the kernel-shared buffers, so both can be borrowed apart.
struct Core<H: Handler> {
    handler: Arc<H>,
    config: Arc<Config>,
    shared: Arc<ShardShared>,
    proto_config: proto::Config,
    hs_limits: handshake::Limits,
    slots: Vec<Slot<H::State>>,
    free: Vec<u32>,
    live: usize,
    ctx: Ctx,
    now: u64,
    close_ms: u64,
    shutting_down: bool,
    shutdown_deadline: u64,
    /// The kernel takes multishot receives.
    multishot_recv: bool,
    keep_send_capacity: usize,
}

/// A shard, ready to run on its own thread.
pub(crate) struct Shard<H: Handler> {
    // Field order is drop order: the ring goes before the memory it may point at.
    ring: Ring,
    bufs: Option<BufRing>,
    pool: Option<FixedPool>,
    core: Core<H>,
    listener: RawFd,
    accept_armed: bool,
    accept_retry: bool,
    event_buf: WordBuf,
    timer: TimerBuf,
    commands: Vec<Command>,
    start: Instant,
    accept_errors: u64,
    last_accept_log: u64,
}

fn kernel_at_least(major: u32, minor: u32) -> bool {
    let Ok(release) = std::fs::read_to_string("/proc/sys/kernel/osrelease") else {
        return true;
    };
    let mut parts = release.trim().split(|c: char| !c.is_ascii_digit());
    let maj: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    let min: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    (maj, min) >= (major, minor)
}

impl<H: Handler> Shard<H> {
    /// Sets up the ring and buffers for shard `index` (on the thread that will run it).
    ///
    /// # Errors
    /// io_uring unavailable, or buffers that cannot be allocated.
    pub fn new(
        handler: Arc<H>,
        config: Arc<Config>,
        shards: Arc<[Arc<ShardShared>]>,
        index: usize,
        listener: RawFd,
        gate: &RingGate,
    ) -> io::Result<Shard<H>> {
        let b = config.buffers;
        let ring = Ring::new(b.ring_entries.max(8));
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
        let multishot_recv = kernel_at_least(6, 0);
        let mut bufs = None;
        if b.use_buffer_ring && multishot_recv {
            let registered =
                BufRing::new(b.recv_buffers, b.recv_buffer_size, 0).and_then(|mut ring_bufs| {
                    ring.register_buf_ring(&mut ring_bufs).map(|()| ring_bufs)
                });
            match registered {
                Ok(ring_bufs) => bufs = Some(ring_bufs),
                Err(e) => warn_log!(
                    "shard {index}: no provided-buffer ring ({e}): using single-shot receives"
                ),
            }
        }
        let mut pool = None;
        if b.use_registered_buffers && ring.supports_write_fixed() {
            let mut count = b.send_slabs;
            let mut last_err = None;
            while count >= 4 {
                let candidate = match FixedPool::new(count, b.send_slab_size) {
                    Ok(candidate) => candidate,
                    Err(e) => {
                        last_err = Some(e);
                        count /= 2;
                        continue;
                    }
                };
                match ring.register_pool(&candidate) {
                    Ok(()) => {
                        pool = Some(candidate);
                        break;
                    }
                    Err(e) => last_err = Some(e),
                }
                count /= 2;
            }
            match (&pool, last_err) {
                // One line per shard that falls back: with a tight memlock limit the later
                // shards may fall back where the first did not.
                (None, Some(e)) => warn_log!(
                    "shard {index}: cannot register send buffers ({e}; raise `ulimit -l`): \
                     using heap sends"
                ),
                (Some(p), Some(e)) => warn_log!(
                    "shard {index}: registered a smaller send pool of {} KiB ({e})",
                    p.bytes() / 1024
                ),
                _ => {}
            }
        }
        let features = ring.features();
        debug_log!(
            "shard {index}: {features:?}, buffer ring {}, send pool {} KiB, multishot recv {}",
            bufs.is_some(),
            pool.as_ref().map_or(0, FixedPool::bytes) / 1024,
            multishot_recv && bufs.is_some()
        );
        let t = config.timeouts;
        let mut shortest = t.handshake.min(t.close);
        if let Some(idle) = t.idle {
            shortest = shortest.min(idle / 2);
        }
        let tick = (shortest / 4).clamp(Duration::from_millis(10), Duration::from_millis(500));
        let keep_send_capacity = b.send_slab_size.max(64 * 1024);
        let core = Core {
            handler,
            shared: Arc::clone(&shards[index]),
            proto_config: proto::Config {
                max_frame_size: config.limits.max_frame_size,
                max_message_size: config.limits.max_message_size,
                stream_messages: config.limits.stream_messages,
            },
            hs_limits: handshake::Limits {
                max_request_bytes: config.limits.max_request_bytes,
                max_headers: config.limits.max_headers,
            },
            slots: Vec::new(),
            free: Vec::new(),
            live: 0,
            ctx: Ctx {
                shard: index,
                shards,
                high_water_mark: b.high_water_mark,
                max_buffered: b.max_buffered,
                topics: HashMap::new(),
                publishes: Vec::new(),
                touched: Vec::new(),
            },
            now: 0,
            close_ms: t.close.as_millis() as u64,
            shutting_down: false,
            shutdown_deadline: 0,
            multishot_recv,
            keep_send_capacity,
            config,
        };
        Ok(Shard {
            ring,
            bufs,
            pool,
            core,
            listener,
            accept_armed: false,
            accept_retry: false,
            event_buf: WordBuf::new(),
            timer: TimerBuf::new(tick),
            commands: Vec::new(),
            start: Instant::now(),
            accept_errors: 0,
            last_accept_log: 0,
        })
    }

    /// Runs the completion loop until shutdown completes.
    pub fn run(mut self) {
        if let Err(e) = self.arm_all() {
            warn_log!("shard {}: cannot arm the ring: {e}", self.core.ctx.shard);
            self.exit();
            return;
        }
        loop {
            if let Err(e) = self.ring.submit_and_wait(1) {
                warn_log!("shard {}: ring failure, stopping: {e}", self.core.ctx.shard);
                break;
            }
            self.core.now = self.start.elapsed().as_millis() as u64;
            let cqes = self.ring.reap();
            for cqe in &cqes {
                self.dispatch(cqe);
            }
            self.ring.recycle_cqes(cqes);
            self.settle();
            if self.core.shutting_down {
                if self.core.live == 0 && !self.accept_armed {
                    break;
                }
                if self.core.now > self.core.shutdown_deadline + 2000 {
                    warn_log!(
                        "shard {}: forced exit after shutdown timeout",
                        self.core.ctx.shard
                    );
                    break;
                }
            }
        }
        self.exit();
    }

    fn arm_all(&mut self) -> io::Result<()> {
        self.ring
            .accept_multi(self.listener, user_data(TAG_ACCEPT, 0, 0))?;
        self.accept_armed = true;
        let eventfd = self.core.shared.eventfd();
        self.ring
            .read_word(eventfd, &mut self.event_buf, user_data(TAG_EVENT, 0, 0))?;
        self.ring
            .timeout(&mut self.timer, user_data(TAG_TIMER, 0, 0))
    }

    fn exit(mut self) {
        self.core.shared.set_stopped();
        if self.listener >= 0 {
            sys::close(self.listener);
            self.listener = -1;
        }
        let cancelled = self.ring.cancel_all();
        let _ = self.ring.submit_and_wait(0);
        for cqe in self.ring.reap() {
            let (tag, slot, gen) = split_user_data(cqe.user_data());
            match tag {
                TAG_EVENT => {
                    self.event_buf.complete();
                }
                TAG_TIMER => self.timer.complete(),
                TAG_SEND => {
                    if let Some(c) = conn_at(&mut self.core.slots, slot, gen) {
                        c.send.complete(0, self.pool.as_mut(), 0);
                    }
                }
                TAG_RECV => {
                    if let Some(c) = conn_at(&mut self.core.slots, slot, gen) {
                        if let Some(rb) = c.recv_buf.as_mut() {
                            rb.complete(0);
                        }
                    }
                }
                _ => {}
            }
        }
        for slot in 0..self.core.slots.len() as u32 {
            if let Some(c) = self.core.slots[slot as usize].conn.as_mut() {
                c.dead = true;
                c.recv_armed = false;
                c.cancels = 0;
            }
            if self.core.slots[slot as usize].conn.is_some() {
                self.core.free_slot(slot, self.pool.as_mut());
            }
        }
        if cancelled.is_err() {
            // Operations may still point into the receive buffers: leak them rather than
            // risk the kernel writing freed memory.
            std::mem::forget(self.bufs.take());
        }
        self.core.shared.set_connections(self.core.live);
    }

    fn dispatch(&mut self, cqe: &Cqe) {
        let (tag, slot, gen) = split_user_data(cqe.user_data());
        match tag {
            TAG_ACCEPT => self.on_accept(cqe),
            TAG_RECV => self.on_recv(cqe, slot, gen),
            TAG_SEND => {
                let core = &mut self.core;
                let Some(c) = conn_at(&mut core.slots, slot, gen) else {
                    return;
                };
                let res = cqe.result();
                // Large vectors are kept while the connection is busy; `on_tick` frees them
                // once it is quiet (see `shrink_quiet`).
                c.send
                    .complete(res.max(0) as usize, self.pool.as_mut(), usize::MAX);
                c.link.in_flight = c.send.remaining();
                if res < 0 && !c.dead {
                    debug_log!("send failed: {}", io::Error::from_raw_os_error(-res));
                    kill(c);
                } else if res == 0 && c.send.remaining() > 0 && !c.dead {
                    kill(c);
                }
                core.ctx.touch(&mut c.link);
            }
            TAG_CANCEL => {
                let core = &mut self.core;
                if let Some(c) = conn_at(&mut core.slots, slot, gen) {
                    c.cancels = c.cancels.saturating_sub(1);
                    core.ctx.touch(&mut c.link);
                }
            }
            TAG_EVENT => {
                self.event_buf.complete();
                self.on_commands();
                let eventfd = self.core.shared.eventfd();
                let ud = user_data(TAG_EVENT, 0, 0);
                if let Err(e) = self.ring.read_word(eventfd, &mut self.event_buf, ud) {
                    warn_log!("cannot re-arm the wake-up read: {e}");
                }
            }
            TAG_TIMER => {
                self.timer.complete();
                self.on_tick();
                if let Err(e) = self
                    .ring
                    .timeout(&mut self.timer, user_data(TAG_TIMER, 0, 0))
                {
                    warn_log!("cannot re-arm the timer: {e}");
                }
            }
            _ => {}
        }
    }

    fn on_accept(&mut self, cqe: &Cqe) {
        if !cqe.more() {
            self.accept_armed = false;
        }
        let res = cqe.result();
        if res >= 0 {
            self.core.on_accept(res);
        } else {
            let errno = -res;
            if errno != libc::ECANCELED {
                self.accept_errors += 1;
                let now = self.core.now;
                if now >= self.last_accept_log + 1000 || self.last_accept_log == 0 {
                    warn_log!(
                        "shard {}: accept failed ({} since last report): {}",
                        self.core.ctx.shard,
                        self.accept_errors,
                        io::Error::from_raw_os_error(errno)
                    );
                    self.accept_errors = 0;
                    self.last_accept_log = now.max(1);
                }
            }
            if !self.accept_armed && matches!(errno, libc::EMFILE | libc::ENFILE | libc::ENOMEM) {
                // Out of descriptors: retry at the next tick instead of spinning.
                self.accept_retry = true;
                return;
            }
        }
        if !self.accept_armed && !self.core.shutting_down && self.listener >= 0 {
            self.rearm_accept();
        }
    }

    fn rearm_accept(&mut self) {
        match self
            .ring
            .accept_multi(self.listener, user_data(TAG_ACCEPT, 0, 0))
        {
            Ok(()) => self.accept_armed = true,
            Err(e) => {
                warn_log!("cannot re-arm accept: {e}");
                self.accept_retry = true;
            }
        }
    }

    fn on_recv(&mut self, cqe: &Cqe, slot: u32, gen: u32) {
        let have_bufs = self.bufs.is_some();
        // Take the provided buffer first, even for a stale completion, so it is recycled.
        let mut guard = match self.bufs.as_mut() {
            Some(bufs) if cqe.buffer_id().is_some() => bufs.take(cqe),
            _ => None,
        };
        let core = &mut self.core;
        let now = core.now;
        let Some(c) = conn_at(&mut core.slots, slot, gen) else {
            return;
        };
        if !cqe.more() {
            c.recv_armed = false;
            c.recv_cancelling = false;
        }
        let res = cqe.result();
        if res > 0 {
            c.last_rx = now;
            c.pinged_at = None;
            if let Some(guard) = guard.as_mut() {
                core.on_received(slot, guard.bytes());
            } else if let Some(mut buf) = c.recv_buf.take() {
                core.on_received(slot, buf.complete(res as usize));
                if let Some(c) = conn_at(&mut core.slots, slot, gen) {
                    c.recv_buf = Some(buf);
                }
            }
        } else {
            if let Some(buf) = c.recv_buf.as_mut() {
                if buf.in_flight() {
                    buf.complete(0);
                }
            }
            match -res {
                0 => {
                    // The peer's FIN. Input stashed over the high-water mark is still owed
                    // processing, and replies to it still go out (a half-closed peer reads):
                    // `settle_one` ends the connection once both are done, bounded by the
                    // close timeout.
                    c.peer_eof = true;
                    if c.deadline == 0 {
                        c.deadline = now + core.close_ms;
                    }
                }
                libc::ENOBUFS | libc::ECANCELED => {} // settled below: re-armed if wanted
                libc::EINVAL if core.multishot_recv && have_bufs => {
                    warn_log!("multishot receive refused by the kernel: single-shot receives");
                    core.multishot_recv = false;
                }
                errno => {
                    debug_log!("recv failed: {}", io::Error::from_raw_os_error(errno));
                    kill(c);
                }
            }
        }
        drop(guard);
        if let Some(c) = conn_at(&mut self.core.slots, slot, gen) {
            self.core.ctx.touch(&mut c.link);
        }
    }

    fn on_commands(&mut self) {
        self.core.shared.drain(&mut self.commands);
        let mut commands = std::mem::take(&mut self.commands);
        for command in commands.drain(..) {
            match command {
                Command::Send {
                    slot,
                    gen,
                    opcode,
                    payload,
                } => {
                    self.core.send_to(slot, gen, opcode, &payload);
                }
                Command::Close {
                    slot,
                    gen,
                    code,
                    reason,
                } => {
                    let core = &mut self.core;
                    let (now, close_ms) = (core.now, core.close_ms);
                    if let Some(c) = conn_at(&mut core.slots, slot, gen) {
                        start_close(c, code, &reason, now, close_ms);
                        core.ctx.touch(&mut c.link);
                    }
                }
                Command::Publish { topic, frame } => self.core.fan_out(Some(&topic), &frame),
                Command::Broadcast { frame } => self.core.fan_out(None, &frame),
                Command::Shutdown => self.begin_shutdown(),
            }
        }
        self.commands = commands;
        if sys::signalled() && !self.core.shutting_down {
            self.begin_shutdown();
        }
    }

    fn begin_shutdown(&mut self) {
        if self.core.shutting_down {
            return;
        }
        debug_log!("shard {}: shutting down", self.core.ctx.shard);
        let core = &mut self.core;
        core.shutting_down = true;
        core.shutdown_deadline = core.now + core.close_ms;
        if self.accept_armed {
            let _ = self
                .ring
                .cancel(user_data(TAG_ACCEPT, 0, 0), user_data(0, 0, 0));
        }
        if self.listener >= 0 {
            // The accept in flight holds its own reference; new connections are refused now.
            sys::close(self.listener);
            self.listener = -1;
        }
        let (now, close_ms) = (core.now, core.close_ms);
        for slot in &mut core.slots {
            let Some(c) = slot.conn.as_mut() else {
                continue;
            };
            if c.ws.is_some() {
                start_close(
                    c,
                    CloseCode::GOING_AWAY,
                    "server shutting down",
                    now,
                    close_ms,
                );
            } else if c.handshake.is_some() {
                kill(c);
            }
            core.ctx.touch(&mut c.link);
        }
    }

    fn on_tick(&mut self) {
        if self.accept_retry && !self.core.shutting_down && self.listener >= 0 {
            self.accept_retry = false;
            if !self.accept_armed {
                self.rearm_accept();
            }
        }
        let core = &mut self.core;
        let now = core.now;
        let t = core.config.timeouts;
        let idle = t.idle.map(|d| d.as_millis() as u64);
        let force = core.shutting_down && now >= core.shutdown_deadline;
        for slot in &mut core.slots {
            let Some(c) = slot.conn.as_mut() else {
                continue;
            };
            if c.dead {
                continue;
            }
            if force || (c.deadline != 0 && now >= c.deadline) {
                debug_log!("connection {} timed out", c.link.slot);
                kill(c);
                core.ctx.touch(&mut c.link);
                continue;
            }
            if now.saturating_sub(c.last_rx) >= SHRINK_AFTER_MS {
                shrink_quiet(c, core.keep_send_capacity);
            }
            let (Some(idle), true) = (idle, c.link.open) else {
                continue;
            };
            // With auto ping: ping after half the idle time, close if the other half passes
            // without anything received (a pong resets both). Without: close after idle.
            let quiet = now.saturating_sub(c.last_rx);
            let expired = match (t.auto_ping, c.pinged_at) {
                (true, Some(at)) => now.saturating_sub(at) >= idle - idle / 2,
                (true, None) => {
                    if quiet >= idle / 2 {
                        c.pinged_at = Some(now);
                        proto::encode_frame(&mut c.link.out, true, false, OpCode::Ping, b"");
                        core.ctx.touch(&mut c.link);
                    }
                    false
                }
                (false, _) => quiet >= idle,
            };
            if expired {
                start_close(c, CloseCode::GOING_AWAY, "idle timeout", now, core.close_ms);
                core.ctx.touch(&mut c.link);
            }
        }
    }

    /// Settles every touched connection (see the module docs).
    fn settle(&mut self) {
        loop {
            let publishes = std::mem::take(&mut self.core.ctx.publishes);
            for (topic, frame) in &publishes {
                self.core.fan_out(Some(topic), frame);
            }
            if self.core.ctx.publishes.is_empty() {
                self.core.ctx.publishes = publishes;
                self.core.ctx.publishes.clear();
            }
            let Some(slot) = self.core.ctx.touched.pop() else {
                if self.core.ctx.publishes.is_empty() {
                    break;
                }
                continue;
            };
            self.settle_one(slot);
        }
        self.core.shared.set_connections(self.core.live);
    }

    fn settle_one(&mut self, slot: u32) {
        let Shard {
            ring,
            bufs,
            pool,
            core,
            ..
        } = self;
        let now = core.now;
        let Some(c) = live_conn(&mut core.slots, slot) else {
            return;
        };
        c.link.touched = false;
        let gen = c.link.gen;
        if c.dead {
            if !c.recv_armed && !c.send.in_flight() && c.cancels == 0 {
                core.free_slot(slot, pool.as_mut());
            }
            return;
        }
        if !c.send.in_flight() {
            if c.send.remaining() == 0 && !c.link.out.is_empty() {
                c.send.load(&mut c.link.out, pool.as_mut());
            }
            if c.send.remaining() > 0 {
                if let Err(e) = ring.send(
                    c.fd,
                    &mut c.send,
                    pool.as_ref(),
                    user_data(TAG_SEND, slot, gen),
                ) {
                    warn_log!("cannot submit a send: {e}");
                    kill(c);
                    core.ctx.touch(&mut c.link);
                    return;
                }
            }
            c.link.in_flight = c.send.remaining();
        }
        let flushed = c.send.is_idle() && c.link.out.is_empty() && c.link.deferred.is_empty();
        if c.close_after_flush && flushed && !c.wr_shut {
            if c.peer_eof {
                kill(c);
                core.ctx.touch(&mut c.link);
                return;
            }
            // RFC 6455 §7.1.1: the server closes TCP first; half-close and wait for the FIN.
            sys::shutdown(c.fd, true);
            c.wr_shut = true;
            c.deadline = now + core.close_ms;
        }
        let buffered = c.link.buffered();
        let mark = core.ctx.high_water_mark;
        if c.over_mark && buffered < mark {
            c.over_mark = false;
            core.call(slot, |h, ws| h.on_drain(ws));
        } else if !c.over_mark && buffered >= mark {
            c.over_mark = true;
        }
        let Some(c) = live_conn(&mut core.slots, slot) else {
            return;
        };
        if !c.over_mark && c.stash_pos < c.stash.len() {
            core.feed_stash(slot);
        }
        let Some(c) = live_conn(&mut core.slots, slot) else {
            return;
        };
        let stashed = c.stash_pos < c.stash.len();
        let flushed = c.send.is_idle() && c.link.out.is_empty() && c.link.deferred.is_empty();
        if c.peer_eof && !stashed && flushed {
            // The peer's FIN, and everything received before it was processed and every reply
            // written (after a closing handshake, or without one: 1006): nothing is lost by
            // ending the connection now.
            kill(c);
            core.ctx.touch(&mut c.link);
            return;
        }
        let want_read = !c.over_mark && !stashed && !c.peer_eof && !c.dead;
        if want_read && !c.recv_armed {
            let ud = user_data(TAG_RECV, slot, gen);
            let armed = match bufs.as_ref() {
                Some(b) if core.multishot_recv => ring.recv_multi(c.fd, b.group(), ud),
                _ => {
                    let size = core.config.buffers.recv_buffer_size;
                    let buf = c.recv_buf.get_or_insert_with(|| RecvBuf::new(size));
                    ring.recv(c.fd, buf, ud)
                }
            };
            match armed {
                Ok(()) => c.recv_armed = true,
                Err(e) => {
                    warn_log!("cannot arm a receive: {e}");
                    kill(c);
                    core.ctx.touch(&mut c.link);
                }
            }
        } else if !want_read && c.recv_armed && !c.recv_cancelling && !c.dead {
            let target = user_data(TAG_RECV, slot, gen);
            if ring
                .cancel(target, user_data(TAG_CANCEL, slot, gen))
                .is_ok()
            {
                c.recv_cancelling = true;
                c.cancels += 1;
            }
        }
    }
}

/// The connection in `slot`, if any (callers that hold a slot taken from a live connection).
fn live_conn<S>(slots: &mut [Slot<S>], slot: u32) -> Option<&mut Conn<S>> {
    slots.get_mut(slot as usize).and_then(|s| s.conn.as_mut())
}

/// The live connection in `slot` if its generation matches (stale completions get `None`).
fn conn_at<S>(slots: &mut [Slot<S>], slot: u32, gen: u32) -> Option<&mut Conn<S>> {
    slots
        .get_mut(slot as usize)
        .filter(|s| s.gen == gen)
        .and_then(|s| s.conn.as_mut())
}

/// A connection with nothing received for this long gives back its large buffers.
const SHRINK_AFTER_MS: u64 = 1000;

/// Frees the large buffers of a quiet connection: the engine's reassembly, inflate and
/// compression buffers and the send vectors, each above `keep` bytes and not in use.
fn shrink_quiet<S>(c: &mut Conn<S>, keep: usize) {
    if let Some(ws) = c.ws.as_mut() {
        ws.conn.shrink_buffers();
    }
    c.send.shrink(keep);
    if c.link.out.is_empty() && c.link.out.capacity() > keep {
        c.link.out = Vec::new();
    }
}

/// Marks a connection dead and shuts its socket down both ways, so every operation in flight
/// completes; it is freed once they have.
fn kill<S>(c: &mut Conn<S>) {
    if !c.dead {
        c.dead = true;
        c.link.open = false;
        sys::shutdown(c.fd, false);
    }
}

/// Starts the closing handshake from our side (RFC 6455 §7.1.2), after any queued output.
fn start_close<S>(c: &mut Conn<S>, code: CloseCode, reason: &str, now: u64, close_ms: u64) {
    let Some(ws) = c.ws.as_mut() else { return };
    c.link.open = false;
    c.link.close_req = None;
    if ws.conn.state() == State::Open {
        let _ = ws.conn.close(&mut c.link.out, code, reason);
    }
    after_close_step(c, now, close_ms);
}

/// Follows the engine's closing state: deadline while our close waits for the peer's, and
/// flush-then-close once both were exchanged.
fn after_close_step<S>(c: &mut Conn<S>, now: u64, close_ms: u64) {
    let Some(ws) = c.ws.as_ref() else { return };
    match ws.conn.state() {
        State::Open => {}
        State::CloseSent => {
            c.link.open = false;
            if c.deadline == 0 {
                c.deadline = now + close_ms;
            }
        }
        State::Closed => {
            c.link.open = false;
            c.close_after_flush = true;
            if c.deadline == 0 {
                c.deadline = now + close_ms;
            }
        }
    }
}

/// Applies what a callback left behind: deferred (compressed) sends, then a requested close.
fn settle_callback<S>(c: &mut Conn<S>, now: u64, close_ms: u64) {
    let Some(ws) = c.ws.as_mut() else { return };
    if !c.link.deferred_msgs.is_empty() {
        let mut start = 0;
        for &(opcode, len, compress) in &c.link.deferred_msgs {
            let payload = &c.link.deferred[start..start + len];
            start += len;
            if compress {
                let _ = ws.conn.send(&mut c.link.out, opcode, payload, true);
            } else {
                proto::encode_frame(&mut c.link.out, true, false, opcode, payload);
            }
        }
        c.link.deferred_msgs.clear();
        c.link.deferred.clear();
    }
    if let Some((code, reason)) = c.link.close_req.take() {
        start_close(c, code, &reason, now, close_ms);
    } else {
        after_close_step(c, now, close_ms);
    }
}

impl<H: Handler> Core<H> {
    /// Runs a callback with the engine available (not borrowed by an event).
    fn call(&mut self, slot: u32, f: impl FnOnce(&H, &mut Ws<'_, H::State>)) {
        let Some(c) = live_conn(&mut self.slots, slot) else {
            return;
        };
        let Some(part) = c.ws.as_mut() else { return };
        let mut ws = Ws {
            link: &mut c.link,
            conn: Some(&mut part.conn),
            state: &mut part.state,
            ctx: &mut self.ctx,
        };
        f(&self.handler, &mut ws);
        settle_callback(c, self.now, self.close_ms);
        self.ctx.touch(&mut c.link);
    }

    fn on_accept(&mut self, fd: RawFd) {
        if self.shutting_down {
            sys::close(fd);
            return;
        }
        sys::set_nodelay(fd);
        let peer = sys::peer_addr(fd).unwrap_or(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)));
        let slot = match self.free.pop() {
            Some(slot) => slot,
            None => {
                self.slots.push(Slot { gen: 0, conn: None });
                (self.slots.len() - 1) as u32
            }
        };
        let reject = self.live >= self.config.limits.max_connections_per_shard;
        let gen = self.slots[slot as usize].gen;
        let mut c = Conn {
            fd,
            link: Link::new(slot, gen, peer),
            handshake: (!reject).then(Vec::new),
            ws: None,
            send: SendBuf::default(),
            recv_buf: None,
            recv_armed: false,
            recv_cancelling: false,
            cancels: 0,
            close_after_flush: reject,
            wr_shut: false,
            peer_eof: false,
            dead: false,
            over_mark: false,
            stash: Vec::new(),
            stash_pos: 0,
            pinged_at: None,
            last_rx: self.now,
            deadline: self.now + self.config.timeouts.handshake.as_millis() as u64,
        };
        if reject {
            debug_log!("connection limit reached: 503");
            HttpError::ServiceUnavailable.write_response(&mut c.link.out);
        }
        self.ctx.touch(&mut c.link);
        self.slots[slot as usize].conn = Some(c);
        self.live += 1;
    }

    fn free_slot(&mut self, slot: u32, pool: Option<&mut FixedPool>) {
        let Some(entry) = self.slots.get_mut(slot as usize) else {
            return;
        };
        let Some(mut c) = entry.conn.take() else {
            return;
        };
        entry.gen = (entry.gen + 1) & GEN_MASK;
        c.link.open = false;
        if let Some(part) = c.ws.as_mut() {
            if !c.link.notified {
                c.link.notified = true;
                let mut ws = Ws {
                    link: &mut c.link,
                    conn: Some(&mut part.conn),
                    state: &mut part.state,
                    ctx: &mut self.ctx,
                };
                self.handler
                    .on_close(&mut ws, Some(CloseCode::ABNORMAL), "");
            }
        }
        for topic in std::mem::take(&mut c.link.topics) {
            self.ctx.remove_subscriber(&topic, slot);
        }
        c.send.discard(pool);
        sys::close(c.fd);
        self.free.push(slot);
        self.live -= 1;
    }

    /// Received bytes: dispatched at once, or stashed while the connection's output is over
    /// the high-water mark (the receive is being cancelled, but completions already in the
    /// queue still arrive). So output stays within the mark plus one receive buffer's worth
    /// of replies, and the peer's excess waits in its own socket buffers.
    fn on_received(&mut self, slot: u32, data: &mut [u8]) {
        let mark = self.ctx.high_water_mark;
        let Some(c) = live_conn(&mut self.slots, slot) else {
            return;
        };
        if c.over_mark || c.stash_pos < c.stash.len() {
            c.stash.extend_from_slice(data);
            return;
        }
        self.on_bytes(slot, data);
        if let Some(c) = live_conn(&mut self.slots, slot) {
            if c.link.buffered() >= mark {
                c.over_mark = true;
            }
        }
    }

    /// Feeds stashed bytes back, one receive buffer's worth at a time, until the output is
    /// over the mark again or the stash is empty.
    fn feed_stash(&mut self, slot: u32) {
        let mark = self.ctx.high_water_mark;
        let chunk = self.config.buffers.recv_buffer_size.max(1);
        loop {
            let Some(c) = live_conn(&mut self.slots, slot) else {
                return;
            };
            if c.dead || c.over_mark || c.stash_pos >= c.stash.len() {
                if c.stash_pos >= c.stash.len() {
                    c.stash_pos = 0;
                    c.stash.clear();
                    if c.stash.capacity() > self.keep_send_capacity {
                        c.stash = Vec::new();
                    }
                }
                return;
            }
            let mut stash = std::mem::take(&mut c.stash);
            let start = c.stash_pos;
            let end = stash.len().min(start + chunk);
            c.stash_pos = end;
            self.on_bytes(slot, &mut stash[start..end]);
            let Some(c) = live_conn(&mut self.slots, slot) else {
                return;
            };
            c.stash = stash;
            if c.link.buffered() >= mark {
                c.over_mark = true;
            }
        }
    }

    /// Received bytes for a connection, by phase.
    fn on_bytes(&mut self, slot: u32, data: &mut [u8]) {
        let Some(c) = live_conn(&mut self.slots, slot) else {
            return;
        };
        if c.dead {
            return;
        }
        if c.handshake.is_some() {
            self.on_handshake_bytes(slot, data);
        } else if c.ws.is_some() {
            self.on_frames(slot, data);
        }
        // Otherwise (an HTTP answer or a refusal is being flushed) the bytes are discarded.
    }

    fn on_handshake_bytes(&mut self, slot: u32, data: &[u8]) {
        let Some(c) = live_conn(&mut self.slots, slot) else {
            return;
        };
        let Some(mut buf) = c.handshake.take() else {
            return;
        };
        buf.extend_from_slice(data);
        let head = match handshake::parse_request(&buf, &self.hs_limits) {
            Ok(None) => {
                c.handshake = Some(buf);
                return;
            }
            Err(e) => {
                debug_log!("bad request: {e}");
                e.write_response(&mut c.link.out);
                c.close_after_flush = true;
                return;
            }
            Ok(Some((req, head))) => {
                if !req.is_upgrade() {
                    match self.handler.on_http(&req) {
                        Some(r) => handshake::write_response(
                            &mut c.link.out,
                            r.status,
                            r.reason,
                            r.content_type,
                            &r.body,
                        ),
                        None => HttpError::UpgradeRequired.write_response(&mut c.link.out),
                    }
                    c.close_after_flush = true;
                    return;
                }
                let refuse = |c: &mut Conn<H::State>, e: HttpError| {
                    debug_log!("upgrade refused: {e}");
                    e.write_response(&mut c.link.out);
                    c.close_after_flush = true;
                };
                let key = match req.websocket_key() {
                    Ok(key) => key,
                    Err(e) => return refuse(c, e),
                };
                if self.shutting_down {
                    return refuse(c, HttpError::ServiceUnavailable);
                }
                let mut upgrade = Upgrade::default();
                let state = match self.handler.on_upgrade(&req, &mut upgrade) {
                    Ok(state) => state,
                    Err(e) => return refuse(c, e),
                };
                let dcfg = &self.config.deflate;
                let negotiated = if dcfg.enabled && !upgrade.no_compression {
                    deflate::negotiate(req.extension_offers(), dcfg)
                } else {
                    None
                };
                handshake::write_accept(
                    &mut c.link.out,
                    key,
                    upgrade.protocol.as_deref(),
                    negotiated.as_ref().map(|(_, header)| header.as_str()),
                );
                let deflate = negotiated.map(|(params, _)| Deflate::new(params, dcfg));
                c.link.compress = deflate.is_some();
                c.link.min_compress = dcfg.min_compress_size;
                let conn = Connection::new(self.proto_config, deflate);
                c.ws = Some(WsPart { conn, state });
                c.link.open = true;
                c.deadline = 0;
                c.last_rx = self.now;
                head
            }
        };
        self.call(slot, |h, ws| h.on_open(ws));
        if head < buf.len() {
            self.on_frames(slot, &mut buf[head..]);
        }
    }

    fn on_frames(&mut self, slot: u32, data: &mut [u8]) {
        let (now, close_ms) = (self.now, self.close_ms);
        let Some(c) = live_conn(&mut self.slots, slot) else {
            return;
        };
        let handler = &*self.handler;
        let mut pos = 0;
        while let Some(part) = c.ws.as_mut() {
            if c.dead {
                break;
            }
            let WsPart { conn, state } = part;
            let progress = conn.handle_read(&mut data[pos..], &mut c.link.out);
            pos += progress.consumed;
            let Some(event) = progress.event else { break };
            let mut ws = Ws {
                link: &mut c.link,
                conn: None,
                state,
                ctx: &mut self.ctx,
            };
            let failed = matches!(event, Event::Error(_));
            match event {
                // After a close was sent or asked for, data is read but not delivered.
                Event::Text(text) if ws.link.open => {
                    handler.on_message(&mut ws, Message::Text(text));
                }
                Event::Binary(bytes) if ws.link.open => {
                    handler.on_message(&mut ws, Message::Binary(bytes));
                }
                Event::Fragment {
                    opcode,
                    data,
                    first,
                    last,
                } if ws.link.open => {
                    let text = opcode == OpCode::Text;
                    handler.on_fragment(&mut ws, text, data, first, last);
                }
                Event::Ping(payload) => handler.on_ping(&mut ws, payload),
                Event::Pong(payload) => handler.on_pong(&mut ws, payload),
                Event::Close { code, reason } if !ws.link.notified => {
                    ws.link.notified = true;
                    ws.link.open = false;
                    handler.on_close(&mut ws, code, reason);
                }
                Event::Error(e) if !ws.link.notified => {
                    debug_log!("protocol error from {}: {e}", ws.link.peer);
                    ws.link.notified = true;
                    ws.link.open = false;
                    handler.on_close(&mut ws, Some(e.close_code()), &e.to_string());
                }
                _ => {}
            }
            settle_callback(c, now, close_ms);
            if failed {
                // RFC 6455 §7.1.7: failing the connection closes it; after our close frame
                // the server closes TCP first (§7.1.1) and reads on only until the peer's FIN.
                c.close_after_flush = true;
            }
            if pos >= data.len()
                && c.ws
                    .as_ref()
                    .is_some_and(|w| w.conn.state() == State::Closed)
            {
                break;
            }
        }
        self.ctx.touch(&mut c.link);
    }

    fn send_to(&mut self, slot: u32, gen: u32, opcode: OpCode, payload: &[u8]) {
        let limits = self.ctx.limits();
        let Some(c) = conn_at(&mut self.slots, slot, gen) else {
            return;
        };
        let Some(part) = c.ws.as_mut() else { return };
        if queue_message(
            &mut c.link,
            Some(&mut part.conn),
            opcode,
            payload,
            true,
            &limits,
        ) != SendStatus::Dropped
        {
            self.ctx.touch(&mut c.link);
        }
    }

    /// Copies one shared frame into the output of every open subscriber (or every open
    /// connection for `None`), skipping those over the hard limit.
    fn fan_out(&mut self, topic: Option<&str>, frame: &Bytes) {
        let max = self.ctx.max_buffered;
        let deliver = |c: &mut Conn<H::State>, touched: &mut Vec<u32>| {
            if c.link.open && c.link.buffered() <= max {
                c.link.out.extend_from_slice(frame);
                if !c.link.touched {
                    c.link.touched = true;
                    touched.push(c.link.slot);
                }
            }
        };
        match topic {
            Some(topic) => {
                let Some(subs) = self.ctx.topics.get(topic) else {
                    return;
                };
                for &(slot, gen) in subs {
                    let Some(entry) = self.slots.get_mut(slot as usize) else {
                        continue;
                    };
                    if entry.gen != gen {
                        continue;
                    }
                    if let Some(c) = entry.conn.as_mut() {
                        deliver(c, &mut self.ctx.touched);
                    }
                }
            }
            None => {
                for entry in &mut self.slots {
                    if let Some(c) = entry.conn.as_mut() {
                        deliver(c, &mut self.ctx.touched);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_data_round_trips_tag_slot_and_generation() {
        let ud = user_data(TAG_SEND, 123_456, 0x00AB_CDEF);
        assert_eq!(split_user_data(ud), (TAG_SEND, 123_456, 0x00AB_CDEF));
        let ud = user_data(TAG_RECV, u32::MAX, 0xFFFF_FFFF);
        assert_eq!(split_user_data(ud), (TAG_RECV, u32::MAX, GEN_MASK));
    }
}
