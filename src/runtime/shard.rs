//! One shard: a thread with its own ring, listener and connection slab, driving every
//! connection's state machine from completions.
//!
//! A loop iteration: submit and wait, reap every completion, dispatch each by its token
//! ([`Token`]: operation, slot, generation bits) — accepts here, receives in `input.rs`,
//! send and cancel completions here, commands from other threads here, the sweep timer in
//! `sweep.rs` — then settle every connection the batch touched (`output.rs`): at most one
//! send per connection, the half-close after the last byte, backpressure, and freeing
//! connections with no operation left in flight. Nothing here blocks or allocates per
//! message once buffers have grown to their working size.
//!
//! Faults: every application call runs under [`fault::guard`]; a panic costs its connection
//! (close 1011). Anything else that goes wrong inside the shard — a ring that cannot be
//! re-armed, a panic in ringsock itself — ends [`Shard::run`] with the reason, after the
//! listener has left the `SO_REUSEPORT` group and every connection is closed.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::panic::{self, AssertUnwindSafe};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::app::{App, Ctx, LentMessage, SendLimits, Session, Spares};
use super::command::{Command, Mailbox};
use super::config::{millis, ShardConfig};
use super::conn::{Conn, Phase, Recv};
use super::fault;
use super::metrics::Metrics;
use super::pubsub::{self, Topics, Uplink};
use super::ring::{Cqe, Ring, TimerBuf, WordBuf};
use super::setup::{self, RingGate};
use super::slab::{ConnId, Slab};
use super::sys;
use super::tls::TlsConn;
use super::token::{Op, Token};
use crate::proto::handshake;
use crate::proto::{self, CloseCode, OpCode};

/// How often re-arming the wake-up read or the timer is tried before the shard fails.
/// (`Ring::push` has already submitted and retried transient errors by then.)
const REARM_TRIES: u32 = 3;

/// How much input of one connection a round of the completion loop takes before it holds
/// the connection's further receives back to the next round (see [`Shard::over_budget`]):
/// receives are admitted while the KiB received in the round plus [`FRAME_COST_KIB`] per
/// frame parsed stay below 256 (the receive that crosses it is taken whole). A connection's
/// 16 pipelined 16 KiB messages (272 by that count) then go through in one round, or two
/// with a last sliver; a flood of tiny frames gets one receive (a 32 KiB buffer holds 4,681
/// frames of 7 bytes) per round.
///
/// Measured: with 64 KiB of bytes alone (the budget before frames were charged), 100
/// connections × 16 in flight of 16 KiB had a p99 of 13.2 ms against uWebSockets' 10.5 ms:
/// a message waited one to four rounds by its place in its connection's queue. Beside a
/// connection flooding 7-byte frames, another connection's echo p99 was 12–18 ms with 256 KiB
/// of bytes alone and 5–7 ms with 64 KiB.
const RECV_BUDGET_KIB: u16 = 256;

/// What one frame costs against [`RECV_BUDGET_KIB`], beyond its bytes: about what 1 KiB
/// of payload costs (echoed 100 × 16 in flight: ~370 ns of server CPU per 16 B message,
/// ~4.9 µs per 16 KiB one, so a message costs what ~1.3 KiB of payload does).
pub(super) const FRAME_COST_KIB: u32 = 1;

/// The longest publish linger: longer ones are cut to it (a deadline never overflows, and
/// the list of connections that lingered, which keeps those freed meanwhile until the
/// linger ends, stays short).
pub(super) const MAX_LINGER: Duration = Duration::from_secs(30);

/// Every connection's state and the shard-wide state callbacks reach: everything but the
/// ring, so the two can be borrowed apart.
pub(crate) struct Core<A: App> {
    /// The application.
    pub app: Arc<A>,
    /// Limits, timeouts, buffer sizing.
    pub config: Arc<ShardConfig>,
    /// This shard's mailbox (counters, failure).
    pub mailbox: Arc<Mailbox>,
    /// The engine's limits.
    pub proto_config: proto::Config,
    /// The request parser's limits.
    pub hs_limits: handshake::Limits,
    /// The connections.
    pub conns: Slab<Conn<A::State>>,
    /// What sessions reach: topics, publishes, the touched list.
    pub ctx: Ctx,
    /// Milliseconds since the shard started, as of this batch.
    pub now: u64,
    /// The close timeout in milliseconds.
    pub close_ms: u64,
    /// Graceful shutdown has begun.
    pub shutting_down: bool,
    /// When graceful shutdown forces the remaining connections closed.
    pub shutdown_deadline: u64,
    /// Receives are multishot into the buffer ring (else single-shot into each
    /// connection's buffer).
    pub multishot_recv: bool,
    /// Send and stash vectors above this size are freed when quiet.
    pub keep_capacity: usize,
    /// Connections that gave memory back (shrunk by the sweep, or freed) since the heap was
    /// last trimmed.
    pub gave_back: u64,
    /// When the heap was last trimmed (ms).
    pub trimmed_at: u64,
    /// Connections whose multishot receive ended for want of a provided buffer (`ENOBUFS`)
    /// in this batch, with when each last received data and its place in the batch:
    /// re-armed first, the longest waiting first, once the batch has given its buffers back
    /// (see [`Shard::rearm_starved`]).
    pub starved: Vec<(u64, usize, ConnId)>,
    /// The publish linger ([`Buffers::publish_linger`](super::Buffers::publish_linger), at
    /// most [`MAX_LINGER`]); zero for none.
    pub linger: Duration,
    /// When the publications lingering in subscribers' outputs go out: the linger after the
    /// first of them was queued; `None` while none linger.
    pub linger_until: Option<Instant>,
}

/// A listening socket a shard accepts from, and whether its connections speak TLS.
pub(crate) struct Listener {
    /// The socket.
    pub fd: OwnedFd,
    /// TLS for every connection accepted here.
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

/// One of the shard's listeners and its accept operation.
struct Listening {
    /// The socket; `None` once closed (shutdown, exit).
    fd: Option<OwnedFd>,
    /// TLS for its connections.
    tls: Option<Arc<rustls::ServerConfig>>,
    accept: Acceptor,
}

/// A listener's accept operation.
#[derive(Default)]
struct Acceptor {
    /// The multishot accept is in flight.
    armed: bool,
    /// Re-arm at the next tick (out of descriptors, or a failed re-arm).
    retry: bool,
    /// Accept errors since the last log line.
    errors: u64,
    /// When the last accept error was logged (ms).
    last_log: Option<u64>,
}

/// A shard, ready to run on its own thread.
pub(crate) struct Shard<A: App> {
    // Field order is drop order: the ring goes first, and its Drop cancels every operation
    // still in flight before any memory they point at is dropped (or leaked).
    /// The shard's ring (and its provided-buffer ring).
    pub(super) ring: Ring,
    /// Connections and everything callbacks reach.
    pub(super) core: Core<A>,
    /// The listeners (one per address; the accept token's slot is the index).
    listeners: Vec<Listening>,
    /// The wake-up eventfd's read buffer.
    wake: WordBuf,
    /// The sweep timer.
    timer: TimerBuf,
    /// Commands taken from the mailbox (kept for its capacity).
    commands: Vec<Command>,
    /// When the shard started: `Core::now` counts from here.
    start: Instant,
    /// Test hook: re-arms still to fail on purpose.
    fail_rearms: u32,
    /// Receive completions held back from the last round, their connection over its
    /// budget (see [`Shard::over_budget`]); handled first in the next round.
    carried: Vec<Cqe>,
    /// Rounds of the completion loop so far (wrapping).
    round: u16,
}

impl<A: App> Shard<A> {
    /// Sets up the ring and buffers for shard `index` (on the thread that will run it).
    ///
    /// # Errors
    /// io_uring unavailable or too old.
    pub fn new(
        app: Arc<A>,
        config: Arc<ShardConfig>,
        mailboxes: Arc<[Arc<Mailbox>]>,
        index: usize,
        listeners: Vec<Listener>,
        gate: &RingGate,
        uplink: Option<Arc<dyn Uplink>>,
    ) -> io::Result<Shard<A>> {
        let ready = setup::open_ring(&config.buffers, index, gate)?;
        let t = config.timeouts;
        let mut shortest = t.handshake.min(t.close);
        if let Some(idle) = t.idle {
            shortest = shortest.min(idle / 2);
        }
        let mut tick = (shortest / 4).clamp(Duration::from_millis(10), Duration::from_millis(500));
        if let Some(max) = config.max_tick {
            tick = tick.min(max.max(Duration::from_millis(1)));
        }
        let b = config.buffers;
        let core = Core {
            app,
            mailbox: Arc::clone(&mailboxes[index]),
            proto_config: proto::Config {
                max_frame_size: config.limits.max_frame_size,
                max_message_size: config.limits.max_message_size,
                stream_messages: config.limits.stream_messages,
            },
            hs_limits: handshake::Limits {
                max_request_bytes: config.limits.max_request_bytes,
                max_headers: config.limits.max_headers,
            },
            conns: Slab::new(config.hooks.generation_stride),
            ctx: Ctx {
                shard: index,
                mailboxes,
                limits: SendLimits {
                    high_water_mark: b.high_water_mark,
                    max_buffered: b.max_buffered,
                },
                topics: Topics::new(index, uplink),
                publishes: Vec::new(),
                touched: Vec::new(),
                lingering: Vec::new(),
                metrics: Metrics {
                    buffer_ring_fallbacks: u64::from(!ready.ring.has_buf_ring()),
                    ..Metrics::default()
                },
                lent: LentMessage::default(),
                spares: Spares::default(),
            },
            now: 0,
            close_ms: millis(t.close),
            shutting_down: false,
            shutdown_deadline: 0,
            multishot_recv: ready.multishot_recv,
            keep_capacity: 64 * 1024,
            gave_back: 0,
            trimmed_at: 0,
            starved: Vec::new(),
            linger: config.buffers.publish_linger.min(MAX_LINGER),
            linger_until: None,
            config: Arc::clone(&config),
        };
        Ok(Shard {
            ring: ready.ring,
            core,
            listeners: listeners
                .into_iter()
                .map(|l| Listening {
                    fd: Some(l.fd),
                    tls: l.tls,
                    accept: Acceptor::default(),
                })
                .collect(),
            wake: WordBuf::new(),
            timer: TimerBuf::new(tick),
            commands: Vec::new(),
            start: Instant::now(),
            fail_rearms: config.hooks.fail_rearms,
            carried: Vec::new(),
            round: 0,
        })
    }

    /// Runs the completion loop until shutdown completes or the shard fails, then closes the
    /// listener and every connection. Returns why the shard failed, if it did.
    pub fn run(mut self) -> Option<String> {
        let shard = self.core.ctx.shard;
        let outcome = panic::catch_unwind(AssertUnwindSafe(|| self.serve()));
        let mut failure = match outcome {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(payload) => Some(format!("panicked: {}", fault::payload_message(&*payload))),
        };
        if let Some(why) = &failure {
            tracing::error!(
                shard,
                "shard failed: {why}; closing its listener and connections"
            );
        }
        if panic::catch_unwind(AssertUnwindSafe(|| self.exit())).is_err() {
            // What is left is closed by the drops: the ring cancels (or leaks) first.
            failure.get_or_insert_with(|| "panicked while closing".to_owned());
        }
        failure
    }

    fn serve(&mut self) -> io::Result<()> {
        self.arm_all()?;
        loop {
            let linger_left = self
                .core
                .linger_until
                .map(|until| until.saturating_duration_since(Instant::now()));
            match linger_left {
                // Receives held back from the last round are waiting, or the linger is
                // over: take what else is ready, without sleeping.
                _ if !self.carried.is_empty() => self.ring.submit_and_poll()?,
                Some(Duration::ZERO) => self.ring.submit_and_poll()?,
                Some(left) => self.ring.submit_and_wait_for(left)?,
                None => self.ring.submit_and_wait(1)?,
            }
            self.core.now = millis(self.start.elapsed());
            let mut cqes = self.ring.reap();
            if !self.carried.is_empty() {
                // What was held back comes first: it arrived first. (The two vectors swap,
                // both keeping their capacity.)
                self.carried.append(&mut cqes);
                std::mem::swap(&mut self.carried, &mut cqes);
            }
            self.round = self.round.wrapping_add(1);
            let mut result = Ok(());
            for cqe in cqes.drain(..) {
                if self.over_budget(&cqe) {
                    self.core.ctx.metrics.recvs_held_back += 1;
                    self.carried.push(cqe);
                    continue;
                }
                result = self.dispatch(cqe);
                if result.is_err() {
                    // The rest are dropped unhandled: their buffers stay marked in flight and
                    // are leaked, never freed, as the shard closes.
                    break;
                }
            }
            self.ring.recycle_cqes(cqes);
            result?;
            self.rearm_starved();
            self.end_linger();
            self.settle();
            if self.core.shutting_down {
                if self.core.conns.len() == 0 && !self.listeners.iter().any(|l| l.accept.armed) {
                    return Ok(());
                }
                if self.core.now > self.core.shutdown_deadline.saturating_add(2000) {
                    tracing::warn!(
                        shard = self.core.ctx.shard,
                        connections = self.core.conns.len(),
                        "forced exit after the shutdown timeout"
                    );
                    return Ok(());
                }
            }
        }
    }

    /// Once the publish linger is over, every subscriber with publications lingering is
    /// settled with this round's connections.
    fn end_linger(&mut self) {
        match self.core.linger_until {
            Some(until) if Instant::now() >= until => {}
            _ => return,
        }
        self.core.linger_until = None;
        let Core { conns, ctx, .. } = &mut self.core;
        for id in ctx.lingering.drain(..) {
            // A connection freed meanwhile is gone (its slot's generation moved on).
            if let Some(c) = conns.get(id) {
                c.link.lingering = false;
                // Sent in this round even if publications made in it linger again.
                c.link.send_now = true;
                c.link.touch(&mut ctx.touched);
            }
        }
    }

    fn arm_all(&mut self) -> io::Result<()> {
        for (index, listening) in self.listeners.iter_mut().enumerate() {
            if let Some(fd) = &listening.fd {
                self.ring
                    .accept_multi(fd.as_raw_fd(), accept_token(index))?;
                listening.accept.armed = true;
            }
        }
        self.rearm(Op::Wake)?;
        self.rearm(Op::Timer)
    }

    /// Arms the wake-up read or the timer, retrying; an error fails the shard, since without
    /// either it could no longer be told to stop or notice a timeout.
    fn rearm(&mut self, op: Op) -> io::Result<()> {
        let token = Token::shard(op).raw();
        let what = if op == Op::Wake {
            "wake-up read"
        } else {
            "timer"
        };
        let mut last = None;
        for _ in 0..REARM_TRIES {
            let armed = if self.fail_rearms > 0 {
                self.fail_rearms -= 1;
                Err(io::Error::other("injected failure"))
            } else if op == Op::Wake {
                let eventfd = self.core.mailbox.eventfd();
                self.ring.read_word(eventfd, &mut self.wake, token)
            } else {
                self.ring.timeout(&mut self.timer, token)
            };
            match armed {
                Ok(()) => return Ok(()),
                Err(e) => {
                    tracing::warn!(
                        shard = self.core.ctx.shard,
                        error = %e,
                        "cannot re-arm the {what}, retrying"
                    );
                    last = Some(e);
                }
            }
        }
        let e = last.unwrap_or_else(|| io::Error::other("no attempt"));
        Err(io::Error::new(
            e.kind(),
            format!("cannot re-arm the {what}: {e}"),
        ))
    }

    /// Closes the listener (leaving the `SO_REUSEPORT` group), cancels every operation,
    /// checks their buffers back in, and frees every connection (`on_close` 1006 for those
    /// that were open).
    fn exit(&mut self) {
        // Shut the listener down first: that takes it out of the SO_REUSEPORT group even if
        // the accept in flight (which holds a reference) could not be cancelled. (A shared
        // listener is only closed; its accept ends with the ring.)
        self.close_listener();
        let cancelled = self.ring.cancel_all();
        let mut cqes = std::mem::take(&mut self.carried);
        cqes.append(&mut self.ring.reap());
        for cqe in cqes.drain(..) {
            let token = Token::from_raw(cqe.user_data());
            match token.op() {
                Some(Op::Wake) => {
                    self.wake.complete(cqe);
                }
                Some(Op::Timer) => self.timer.complete(cqe),
                Some(Op::Accept) if cqe.result() >= 0 => {
                    // SAFETY: a successful accept's result is a new descriptor that nothing
                    // else owns; each completion is handled once. Dropping it closes it.
                    drop(unsafe { OwnedFd::from_raw_fd(cqe.result()) });
                }
                Some(Op::Send) => {
                    if let Some(c) = self.core.conns.by_token(token) {
                        if let Some(output) = c.link.output.as_deref_mut() {
                            output.send.complete(cqe, 0);
                        }
                    }
                }
                Some(Op::Recv) => {
                    drop(self.ring.take_buffer(&cqe));
                    if let Some(c) = self.core.conns.by_token(token) {
                        if !cqe.more() {
                            c.recv = Recv::Idle;
                        }
                        let extra = c.extra.as_deref_mut();
                        let buf = extra.and_then(|e| e.recv_buf.as_mut());
                        if let Some(buf) = buf.filter(|b| b.in_flight()) {
                            buf.complete(cqe);
                        }
                    }
                }
                Some(Op::Cancel) => {
                    if let Some(c) = self.core.conns.by_token(token) {
                        c.cancels = c.cancels.saturating_sub(1);
                    }
                }
                _ => {}
            }
        }
        self.ring.recycle_cqes(cqes);
        if cancelled.is_err() {
            tracing::warn!(
                shard = self.core.ctx.shard,
                "operations could not be cancelled at exit; their buffers are leaked"
            );
        }
        for slot in 0..self.core.conns.end() {
            if let Some(c) = self.core.conns.at(slot) {
                c.kill();
            }
            // A buffer still marked in flight (cancellation failed) is leaked by its Drop.
            self.core.free(slot);
        }
        self.core.mailbox.set_connections(0);
        self.core.publish_metrics();
    }

    /// Whether a completion is a receive of a connection that has had its share of this
    /// round ([`RECV_BUDGET_KIB`]), to be held back to the next; counts the bytes of those
    /// that are not (their frames are counted as they are parsed, in `on_frames`). Once one
    /// is held back, so is every later receive of that connection in the round, so its bytes
    /// stay in order.
    ///
    /// One connection can have up to the whole provided-buffer ring filled for it in one
    /// round, and every other connection's reply waits for all of it: measured beside one
    /// connection flooding 7-byte frames, rounds of about 1 MiB of them took 12 ms and
    /// another connection's echo took 15 ms (p50; p99 25 ms). Held back, the rest waits
    /// in its buffers (which the kernel then cannot fill again: the connection gets
    /// `ENOBUFS`, and is re-armed after those that waited longer) while the round's replies
    /// go out and the next round takes what else arrived.
    fn over_budget(&mut self, cqe: &Cqe) -> bool {
        let token = Token::from_raw(cqe.user_data());
        if token.op() != Some(Op::Recv) {
            return false;
        }
        let Some(c) = self.core.conns.by_token(token) else {
            return false;
        };
        if c.recv_round != self.round {
            c.recv_round = self.round;
            c.recv_kib = 0;
        }
        if c.recv_kib >= RECV_BUDGET_KIB {
            return true;
        }
        // Counted in KiB, rounded up (a receive is at most a provided buffer).
        let bytes = u32::try_from(cqe.result()).unwrap_or(0);
        let kib = u16::try_from(bytes.div_ceil(1024)).unwrap_or(u16::MAX);
        c.recv_kib = c.recv_kib.saturating_add(kib);
        false
    }

    fn dispatch(&mut self, cqe: Cqe) -> io::Result<()> {
        let token = Token::from_raw(cqe.user_data());
        match token.op() {
            Some(Op::Accept) => self.on_accept(&cqe),
            Some(Op::Recv) => self.on_recv(cqe),
            Some(Op::Send) => self.core.on_sent(token, cqe),
            Some(Op::Cancel) => {
                let core = &mut self.core;
                if let Some(c) = core.conns.by_token(token) {
                    c.cancels = c.cancels.saturating_sub(1);
                    core.ctx.touch(&mut c.link);
                }
            }
            Some(Op::Wake) => {
                self.wake.complete(cqe);
                self.on_commands();
                self.rearm(Op::Wake)?;
            }
            Some(Op::Timer) => {
                self.timer.complete(cqe);
                self.on_tick();
                self.rearm(Op::Timer)?;
            }
            None => {}
        }
        Ok(())
    }

    fn on_accept(&mut self, cqe: &Cqe) {
        let index = Token::from_raw(cqe.user_data()).slot() as usize;
        let Some(listening) = self.listeners.get_mut(index) else {
            return;
        };
        let accept = &mut listening.accept;
        if !cqe.more() {
            accept.armed = false;
        }
        let res = cqe.result();
        if res >= 0 {
            // SAFETY: a successful accept's result is a new descriptor that nothing else
            // owns; each completion is dispatched once.
            let socket = unsafe { OwnedFd::from_raw_fd(res) };
            self.core.on_accept(socket, listening.tls.as_ref());
        } else {
            let errno = -res;
            if matches!(
                errno,
                libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM
            ) {
                self.core.ctx.metrics.refused_no_descriptors += 1;
            }
            // `EINVAL`: the socket no longer listens, shut down under the accept (at shutdown
            // the fleet does so before the shard hears of it). Not a failure, and re-arming
            // would only fail again.
            if errno == libc::EINVAL {
                tracing::debug!(shard = self.core.ctx.shard, "listener shut down");
                return;
            }
            if errno != libc::ECANCELED {
                accept.errors += 1;
                let now = self.core.now;
                if accept.last_log.map_or(true, |at| now >= at + 1000) {
                    tracing::warn!(
                        shard = self.core.ctx.shard,
                        errors = accept.errors,
                        error = %io::Error::from_raw_os_error(errno),
                        "accept failed"
                    );
                    accept.errors = 0;
                    accept.last_log = Some(now);
                }
            }
            if !accept.armed && matches!(errno, libc::EMFILE | libc::ENFILE | libc::ENOMEM) {
                // Out of descriptors: retry at the next tick instead of spinning.
                accept.retry = true;
                return;
            }
        }
        let armed = self.listeners[index].accept.armed;
        if !armed && !self.core.shutting_down {
            self.rearm_accept(index);
        }
    }

    /// Shuts the listener down (new connections go to the other shards' listeners; the
    /// multishot accept ends) and closes it. A shared listener is only closed: shutting the
    /// socket down would stop the other holders' accepts too, and leave a socket a service
    /// manager keeps for the next start unusable. Its accept in flight ends by cancellation.
    fn close_listener(&mut self) {
        for listening in &mut self.listeners {
            if let Some(fd) = listening.fd.take() {
                if !self.core.config.shared_listener {
                    sys::shutdown(fd.as_raw_fd(), false);
                }
            }
        }
    }

    /// Re-arms the accepts at a tick after descriptor exhaustion or a failed re-arm.
    pub(super) fn retry_accept(&mut self) {
        if self.core.shutting_down {
            return;
        }
        for index in 0..self.listeners.len() {
            let accept = &mut self.listeners[index].accept;
            if accept.retry {
                accept.retry = false;
                if !accept.armed {
                    self.rearm_accept(index);
                }
            }
        }
    }

    fn rearm_accept(&mut self, index: usize) {
        let listening = &mut self.listeners[index];
        let Some(fd) = &listening.fd else {
            return;
        };
        match self.ring.accept_multi(fd.as_raw_fd(), accept_token(index)) {
            Ok(()) => listening.accept.armed = true,
            Err(e) => {
                tracing::warn!(shard = self.core.ctx.shard, error = %e, "cannot re-arm accept");
                listening.accept.retry = true;
            }
        }
    }

    fn on_commands(&mut self) {
        self.core.mailbox.drain(&mut self.commands);
        let mut commands = std::mem::take(&mut self.commands);
        for command in commands.drain(..) {
            match command {
                Command::Send {
                    id,
                    opcode,
                    payload,
                } => self.core.send_to(id, opcode, &payload),
                Command::Close { id, code, reason } => {
                    let core = &mut self.core;
                    let (now, close_ms) = (core.now, core.close_ms);
                    if let Some(c) = core.conns.get(id) {
                        c.start_close(code, &reason, now, close_ms);
                        core.ctx.touch(&mut c.link);
                    }
                }
                Command::Publish { topic, frame } => self.core.fan_out(Some(&topic), &frame),
                Command::Broadcast { frame } => self.core.fan_out(None, &frame),
                Command::Decide { id, verdict } => self.core.on_decide(id, verdict),
                Command::Report { done } => {
                    self.core.publish_metrics();
                    let _ = done.send(());
                }
                Command::Shutdown => self.begin_shutdown(),
                Command::InjectFault => panic!("injected fault (test hook)"),
            }
        }
        self.commands = commands;
    }

    fn begin_shutdown(&mut self) {
        if self.core.shutting_down {
            return;
        }
        tracing::debug!(shard = self.core.ctx.shard, "shutting down");
        for (index, listening) in self.listeners.iter().enumerate() {
            if listening.accept.armed {
                let _ = self.ring.cancel(accept_token(index), 0);
            }
        }
        // Out of the SO_REUSEPORT group now, though the accept in flight holds a reference.
        self.close_listener();
        let core = &mut self.core;
        core.shutting_down = true;
        core.shutdown_deadline = core.now.saturating_add(core.close_ms);
        let (now, close_ms) = (core.now, core.close_ms);
        // Open connections get 1001. Those still in their handshake keep their handshake
        // deadline: their upgrade is answered, then closed with 1001 (`Core::going_away`), so
        // the client reconnects to the process that replaces this one instead of seeing a
        // reset. Everything is bounded by `shutdown_deadline` (the sweep).
        for slot in 0..core.conns.end() {
            let Some(c) = core.conns.at(slot) else {
                continue;
            };
            let request = c.extra.as_ref().map_or(0, |e| e.request.len());
            match c.phase {
                Phase::Ws => {
                    c.start_close(CloseCode::GOING_AWAY, "server shutting down", now, close_ms);
                    core.ctx.touch(&mut c.link);
                }
                // An HTTP keep-alive connection between requests: idle ones are closed (HTTP
                // clients retry on a connection closed while idle); answers still queued are
                // written first.
                Phase::Handshake if c.kept_alive && request == 0 => {
                    if c.is_flushed() && !c.stash_pending() {
                        c.kill();
                    } else {
                        c.flush_then_close();
                    }
                    core.ctx.touch(&mut c.link);
                }
                _ => {}
            }
        }
    }
}

impl<A: App> Core<A> {
    /// A new connection: handshake, or 503 over the connection limit. During shutdown too:
    /// the connection was in the accept queue (its accept completed before the cancel, or
    /// the kernel moved it here from another listener of the group that closed), its client
    /// has done nothing wrong, and dropping the socket would reset it. Its upgrade is
    /// answered and closed with 1001 (`Core::going_away`).
    fn on_accept(&mut self, socket: OwnedFd, tls: Option<&Arc<rustls::ServerConfig>>) {
        self.ctx.metrics.accepted += 1;
        if tls.is_some() && self.conns.len() >= self.config.limits.max_connections_per_shard {
            // No 503 before a TLS handshake: the connection is closed.
            self.ctx.metrics.refused_at_limit += 1;
            return;
        }
        let tls = match tls.map(|config| TlsConn::new(Arc::clone(config))) {
            None => None,
            Some(Ok(tls)) => Some(Box::new(tls)),
            Some(Err(e)) => {
                tracing::warn!(shard = self.ctx.shard, error = %e, "cannot start TLS");
                return; // dropping the socket closes it
            }
        };
        let fd = socket.as_raw_fd();
        sys::set_nodelay(fd);
        let peer = sys::peer_addr(fd).unwrap_or_else(|_| ([0, 0, 0, 0], 0).into());
        let reject = self.conns.len() >= self.config.limits.max_connections_per_shard;
        let (now, deadline) = (
            self.now,
            self.now
                .saturating_add(millis(self.config.timeouts.handshake)),
        );
        let id = self.conns.insert_with(|id| {
            let phase = if reject {
                Phase::Flushing
            } else {
                Phase::Handshake
            };
            let mut conn = Conn::new(
                socket,
                super::app::Link::new(id, peer),
                phase,
                now,
                deadline,
            );
            conn.link.shares = tls.is_none();
            conn.tls = tls;
            conn
        });
        let Some(c) = self.conns.get(id) else { return };
        if reject {
            self.ctx.metrics.refused_at_limit += 1;
            tracing::debug!(shard = self.ctx.shard, %peer, "connection limit reached: 503");
            handshake::HttpError::ServiceUnavailable.write_response(c.link.out());
        }
        self.ctx.touch(&mut c.link);
    }

    /// Copies the counters to the mailbox for readers, with the gauges filled in.
    pub(super) fn publish_metrics(&mut self) {
        let mut queued = 0;
        for slot in 0..self.conns.end() {
            if let Some(c) = self.conns.at(slot) {
                queued += c.link.buffered() as u64;
            }
        }
        let metrics = &mut self.ctx.metrics;
        metrics.connections_open = self.conns.len() as u64;
        metrics.queued_output_bytes = queued;
        self.mailbox.publish_metrics(metrics);
    }

    /// A send completed: check the buffer back in; an error or a zero-byte write ends the
    /// connection.
    fn on_sent(&mut self, token: Token, cqe: Cqe) {
        let Some(c) = self.conns.by_token(token) else {
            return;
        };
        // Large vectors are kept while the connection is busy; the sweep frees them once it
        // is quiet (see `Conn::shrink`).
        let Some(output) = c.link.output.as_deref_mut() else {
            // Cannot happen: the output is kept while its send is in flight.
            self.ctx.touch(&mut c.link);
            return;
        };
        let res = output.send.complete(cqe, usize::MAX);
        let unsent = output.send.remaining();
        while let Some(buffer) = output.send.take_reclaimed() {
            // A message sent on as it was received: its buffer reassembles the next one, here
            // or, if this engine has one again, on the next connection that lends its own.
            let unused = match c.ws.as_mut() {
                Some(ws) => ws.engine.recycle(buffer),
                None => Some(buffer),
            };
            if let Some(buffer) = unused {
                self.ctx.spares.put(buffer);
            }
        }
        if res < 0 && !c.is_dead() {
            tracing::debug!(
                peer = %c.link.peer,
                error = %io::Error::from_raw_os_error(-res),
                "send failed"
            );
            c.kill();
        } else if res == 0 && unsent > 0 {
            c.kill();
        }
        self.ctx.touch(&mut c.link);
    }

    /// Runs an application call on an open connection, with the engine available.
    pub(super) fn call(
        &mut self,
        slot: u32,
        what: &'static str,
        f: impl FnOnce(&A, Session<'_, A::State>),
    ) {
        let (now, close_ms) = (self.now, self.close_ms);
        let Some(c) = self.conns.at(slot) else {
            return;
        };
        let Some(ws) = c.ws.as_mut() else { return };
        // After a panic only on_close; after on_close nothing (it comes last).
        if ws.poisoned || c.link.notified {
            return;
        }
        let session = Session {
            link: &mut c.link,
            engine: Some(&mut ws.engine),
            state: &mut ws.state,
            ctx: &mut self.ctx,
        };
        let app = &*self.app;
        if let Err(message) = fault::guard(|| f(app, session)) {
            handler_panicked(c, &self.mailbox, what, &message, now, close_ms);
        }
        c.after_callback(now, close_ms);
        self.ctx.touch(&mut c.link);
    }

    /// Frees a connection's slot (once it has no operation in flight): `on_close` with 1006
    /// if the application was not told yet, unsubscribe, close the socket.
    pub(super) fn free(&mut self, slot: u32) {
        let Some(mut c) = self.conns.remove(slot) else {
            return;
        };
        self.gave_back += 1;
        c.link.open = false;
        if let Some(gone) = c.link.extra.as_ref().and_then(|e| e.gone.as_ref()) {
            gone.store(true, std::sync::atomic::Ordering::Release);
        }
        if let Some(mut ws) = c.ws.take() {
            let closes = ws.engine.closes();
            let metrics = &mut self.ctx.metrics;
            if let Some(code) = closes.sent {
                metrics.closes_sent.count(code);
            }
            if let Some(code) = closes.received {
                metrics.closes_received.count(code);
            }
            if !c.link.notified {
                c.link.notified = true;
                let session = Session {
                    link: &mut c.link,
                    engine: Some(&mut ws.engine),
                    state: &mut ws.state,
                    ctx: &mut self.ctx,
                };
                let app = &*self.app;
                let closed = fault::guard(|| app.close(session, Some(CloseCode::ABNORMAL), ""));
                if let Err(message) = closed {
                    self.report_panic("on_close", &c.link, &message);
                }
            }
            // The application's state is dropped here too: its Drop is application code.
            if let Err(message) = fault::guard(move || drop(ws)) {
                self.report_panic("the drop of its state", &c.link, &message);
            }
        }
        self.ctx.topics.remove_all(&mut c.link);
        if let Some(output) = c.link.output.as_deref_mut() {
            output.send.discard();
        }
        // Dropping `c` closes the socket.
    }

    /// Counts and logs a handler panic on a connection that is going away anyway.
    fn report_panic(&self, what: &str, link: &super::app::Link, message: &str) {
        self.mailbox.count_panic();
        tracing::warn!(
            shard = self.ctx.shard,
            peer = %link.peer,
            callback = what,
            "handler panicked: {message}"
        );
    }

    /// A message from another thread for one connection.
    fn send_to(&mut self, id: ConnId, opcode: OpCode, payload: &[u8]) {
        let Some(c) = self.conns.get(id) else {
            return;
        };
        let Some(ws) = c.ws.as_mut() else { return };
        let status = super::app::send_counted(
            &mut c.link,
            Some(&mut ws.engine),
            opcode,
            payload,
            true,
            &mut self.ctx,
        );
        if matches!(
            status,
            super::app::SendStatus::Queued | super::app::SendStatus::Backpressure
        ) {
            self.ctx.touch(&mut c.link);
        }
    }

    /// Copies a shared frame into every open subscriber's output (all open connections for
    /// `None`).
    pub(super) fn fan_out(&mut self, topic: Option<&str>, frame: &Bytes) {
        let lingers = !self.linger.is_zero();
        pubsub::fan_out(
            &mut self.conns,
            &self.ctx.topics,
            topic,
            frame,
            self.ctx.limits.max_buffered,
            &mut self.ctx.touched,
            lingers.then_some(&mut self.ctx.lingering),
            &mut self.ctx.metrics,
        );
        if lingers && self.linger_until.is_none() && !self.ctx.lingering.is_empty() {
            self.linger_until = Some(Instant::now() + self.linger);
        }
    }
}

/// The `user_data` of listener `index`'s accept.
fn accept_token(index: usize) -> u64 {
    let id = ConnId {
        slot: index as u32,
        gen: 0,
    };
    Token::conn(Op::Accept, id).raw()
}

/// A handler callback panicked: count and log it once, stop delivering to the connection,
/// and close it with 1011 (RFC 6455 §7.4.1: an unexpected condition).
pub(super) fn handler_panicked<S>(
    c: &mut Conn<S>,
    mailbox: &Mailbox,
    callback: &str,
    message: &str,
    now: u64,
    close_ms: u64,
) {
    mailbox.count_panic();
    tracing::warn!(
        shard = mailbox.id,
        peer = %c.link.peer,
        callback,
        "handler panicked: {message}; closing the connection with 1011"
    );
    if let Some(ws) = c.ws.as_mut() {
        ws.poisoned = true;
    }
    if let Some(extra) = c.link.extra.as_deref_mut() {
        extra.deferred.clear();
        extra.deferred_msgs.clear();
    }
    c.start_close(CloseCode::INTERNAL, "internal error", now, close_ms);
}
