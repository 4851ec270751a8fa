//! The seam between the shards and the application: the [`App`] trait a shard calls (the
//! server layer implements it over the user's `Handler`), and the [`Session`] a call gets to
//! act on its connection: send, close, subscribe, publish, hand out a [`ConnHandle`].
//!
//! Sends append to the connection's corked output ([`Link::out`]); the shard writes it once
//! per batch of completions.

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;

use super::command::{Command, Mailbox, Posted};
use super::metrics::Metrics;
use super::pubsub::{Topics, Uplink};
use super::ring::{Piece, SendBuf};
use super::slab::ConnId;
use crate::proto::handshake::Request;
use crate::proto::{encode_frame, CloseCode, Connection, OpCode};

/// What a shard asks of the application. Each call runs under `catch_unwind`: a panic
/// closes that connection (1011, or HTTP 500 before the upgrade) and nothing else.
pub(crate) trait App: Send + Sync + 'static {
    /// Per-connection state, made at the upgrade.
    type State: Send + 'static;

    /// Decides on a validated upgrade request: now, or later from any thread through
    /// `defer` (then it returns [`Verdict::Defer`]).
    fn upgrade(&self, req: &Request<'_>, defer: DeferKey) -> Verdict<Self::State>;

    /// Answers a request that is not an upgrade (its body is in `req`), writing one whole
    /// HTTP response into `out`. With `keep_alive` the connection may stay open for more
    /// requests; returns whether it should (else the response said `Connection: close`).
    fn http(&self, req: &Request<'_>, keep_alive: bool, out: &mut Vec<u8>) -> bool;

    /// The connection is open (the 101 answer is queued).
    fn open(&self, session: Session<'_, Self::State>);

    /// Something arrived: a message, a piece of one, a ping or a pong.
    fn deliver(&self, session: Session<'_, Self::State>, delivery: Delivery<'_>);

    /// The output fell below the high-water mark after being above it.
    fn drain(&self, session: Session<'_, Self::State>);

    /// The connection is closing or gone (once, last).
    fn close(&self, session: Session<'_, Self::State>, code: Option<CloseCode>, reason: &str);
}

/// An accepted upgrade.
pub(crate) struct Accept<S> {
    /// The connection's state.
    pub state: S,
    /// The subprotocol to answer with.
    pub protocol: Option<String>,
    /// Whether permessage-deflate may be negotiated.
    pub compress: bool,
    /// More header lines for the 101 answer (valid names and values).
    pub headers: Vec<(String, String)>,
}

/// The application's answer to an upgrade request.
pub(crate) enum Verdict<S> {
    /// Upgrade.
    Accept(Accept<S>),
    /// Answer with this whole HTTP response, then close.
    Reject(Vec<u8>),
    /// The answer comes later through the [`DeferKey`].
    Defer,
}

/// The way back to a connection whose upgrade was deferred: [`DeferKey::answer`] from any
/// thread. The handshake timeout keeps running meanwhile.
pub(crate) struct DeferKey {
    mailbox: Arc<Mailbox>,
    id: ConnId,
}

impl DeferKey {
    /// A key for connection `id` on the shard of `mailbox`.
    pub(crate) fn new(mailbox: Arc<Mailbox>, id: ConnId) -> DeferKey {
        DeferKey { mailbox, id }
    }

    /// Delivers the answer to the shard; `false` if the shard has stopped (the connection
    /// itself may be gone too, which the shard notices).
    pub fn answer<S: Send + 'static>(self, verdict: Verdict<S>) -> bool {
        let command = Command::Decide {
            id: self.id,
            verdict: Box::new(verdict),
        };
        self.mailbox.post(command) == Posted::Queued
    }
}

/// What [`App::deliver`] hands over; borrowed from the receive or reassembly buffer.
pub(crate) enum Delivery<'a> {
    /// A whole text message.
    Text(&'a str),
    /// A whole binary message.
    Binary(&'a [u8]),
    /// A piece of a streamed message.
    Fragment {
        /// Text (else binary).
        text: bool,
        /// The piece.
        data: &'a [u8],
        /// The message's first piece.
        first: bool,
        /// The message's last piece.
        last: bool,
    },
    /// A ping (its pong is queued already).
    Ping(&'a [u8]),
    /// A pong.
    Pong(&'a [u8]),
}

/// What became of a send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SendStatus {
    /// Queued; the connection's output is below the high-water mark.
    Queued,
    /// Queued, but the output is at or above the high-water mark: the shard stops reading
    /// from this connection until it drains, and `on_drain` will fire.
    Backpressure,
    /// Not queued: the connection's output is over the hard limit
    /// ([`Buffers::max_buffered`](super::Buffers::max_buffered)).
    Dropped,
    /// Not queued: the connection is closing or gone (our close was sent or asked for, or
    /// the peer's arrived), or the server has stopped.
    Closed,
    /// Not queued: the shard's queue of requests from other threads is full
    /// ([`Buffers::command_queue`](super::Buffers::command_queue)); only sends from other
    /// threads (`Remote`) report this.
    QueueFull,
}

/// The per-connection part a [`Session`] works on.
///
/// Kept small for idle connections: the output and everything rarely used live behind
/// pointers allocated on first need ([`Output`], [`LinkExtra`]), which the idle sweep gives
/// back.
pub(crate) struct Link {
    /// The connection's identity.
    pub id: ConnId,
    /// The peer's address.
    pub peer: SocketAddr,
    /// Frames queued and the send in flight, once there was output.
    pub output: Option<Box<Output>>,
    /// Messages at least this long go out compressed when asked; `usize::MAX` without
    /// permessage-deflate.
    pub min_compress: usize,
    /// Data messages may be sent (open, and no close sent or asked for).
    pub open: bool,
    /// `close` was called on the application (it is called once).
    pub notified: bool,
    /// The connection is on the shard's list to settle after this batch.
    pub touched: bool,
    /// The connection is on the shard's list of subscribers with publications lingering
    /// ([`Buffers::publish_linger`](super::Buffers::publish_linger)), settled when the
    /// linger ends. Until then its output is held while all that is queued is publications
    /// ([`Output::only_publications`]): anything else queued (the 101, a message, a ping or
    /// a pong) takes them along. Not held either with [`Link::send_now`] set, or once the
    /// connection is closing or the peer has finished sending.
    pub lingering: bool,
    /// Send what is queued at the next settling even if only publications are: the output
    /// reached [`LINGER_FLUSH`](super::pubsub::LINGER_FLUSH), or the linger ended. Cleared
    /// when the output is next loaded.
    pub send_now: bool,
    /// Output may include pieces sent from where they are (not on TLS, which encrypts its
    /// own stream).
    pub shares: bool,
    /// What few connections use: subscriptions, handles, a requested close, deferred
    /// compressed sends.
    pub extra: Option<Box<LinkExtra>>,
}

/// A connection's output: frames corked since the last send was loaded, and the send.
#[derive(Default)]
pub(crate) struct Output {
    /// Corked frames, written once per batch.
    pub corked: Vec<u8>,
    /// Pieces sent from where they are: frames shared with other connections (publications)
    /// and a received message sent on as it is. Each goes out after `corked[..offset]`.
    pub pieces: Vec<(usize, Piece)>,
    /// The bytes of `pieces`, and of a lent message announced but not yet placed
    /// ([`Output::lend`]).
    pub pieces_len: usize,
    /// How many of the queued bytes (`corked` and `pieces`) are publications queued while
    /// nothing else was; all of them while only publications wait (see
    /// [`Output::only_publications`]). Zeroed when the queued bytes are loaded.
    pub published: usize,
    /// The bytes on their way to the socket.
    pub send: SendBuf,
    /// A send was loaded since the sweep last looked: the output is in use, not to be
    /// freed.
    pub recent: bool,
}

impl Output {
    /// Bytes queued and not yet written.
    pub fn buffered(&self) -> usize {
        self.corked.len() + self.pieces_len + self.send.remaining()
    }

    /// Whether nothing is queued, loaded or in flight.
    pub fn is_idle(&self) -> bool {
        self.corked.is_empty() && self.pieces.is_empty() && self.send.is_idle()
    }

    /// Whether frames wait to be loaded into the send.
    pub fn has_queued(&self) -> bool {
        !self.corked.is_empty() || !self.pieces.is_empty()
    }

    /// Bytes queued and not yet loaded into the send.
    pub fn queued(&self) -> usize {
        self.corked.len() + self.pieces_len
    }

    /// Whether all that is queued is publications (or nothing is): every other writer
    /// queues bytes that [`Output::published`] does not count, so a lingering subscriber's
    /// output is held only while this holds, without each writer having to say so.
    pub fn only_publications(&self) -> bool {
        self.queued() == self.published
    }

    /// Queues a frame shared with other connections, by reference.
    pub fn share(&mut self, frame: &Rc<Bytes>) {
        self.pieces
            .push((self.corked.len(), Piece::Shared(Rc::clone(frame))));
        self.pieces_len += frame.len();
    }

    /// Places a lent message at `offset` of the corked bytes, where its frame header ends.
    /// Its length was counted in `pieces_len` when the header was written. Returns `false`,
    /// placing nothing, if a piece already queued lies past `offset` (pieces must be in the
    /// order of their offsets; nothing queues one during a callback, see `settle`).
    pub fn lend(&mut self, offset: usize, message: Vec<u8>) -> bool {
        let in_order = self.pieces.last().map_or(true, |(at, _)| *at <= offset);
        let placed = in_order && offset <= self.corked.len();
        if placed {
            self.pieces.push((offset, Piece::Lent(message)));
        }
        placed
    }

    /// Loads the queued frames into the send (which must be idle).
    pub fn load(&mut self) {
        self.recent = true;
        if self.pieces.is_empty() {
            self.send.load(&mut self.corked);
        } else {
            self.send.load_pieces(&mut self.corked, &mut self.pieces);
            self.pieces_len = 0;
        }
    }
}

/// The rarely used part of a [`Link`].
#[derive(Default)]
pub(crate) struct LinkExtra {
    /// A close the application asked for, applied after the callback.
    pub close_req: Option<(CloseCode, String)>,
    /// Messages to compress that were queued while the engine was borrowed (payloads back
    /// to back); see [`queue_message`].
    pub deferred: Vec<u8>,
    /// (opcode, length, compress) of each deferred message.
    pub deferred_msgs: Vec<(OpCode, usize, bool)>,
    /// Topics this connection subscribed to.
    pub topics: Vec<Arc<str>>,
    /// Set when the connection is freed; shared with every [`ConnHandle`] given out, so a
    /// handle kept after the close answers [`SendStatus::Closed`] at once. Made on the first
    /// [`Session::handle`] only.
    pub gone: Option<Arc<AtomicBool>>,
}

impl LinkExtra {
    /// Whether it holds nothing (and may be freed).
    fn is_empty(&self) -> bool {
        self.close_req.is_none()
            && self.deferred.capacity() == 0
            && self.deferred_msgs.capacity() == 0
            && self.topics.is_empty()
            && self.gone.is_none()
    }
}

impl Link {
    /// A link for a freshly accepted connection.
    pub fn new(id: ConnId, peer: SocketAddr) -> Link {
        Link {
            id,
            peer,
            output: None,
            min_compress: usize::MAX,
            open: false,
            notified: false,
            touched: false,
            lingering: false,
            send_now: false,
            shares: true,
            extra: None,
        }
    }

    /// The corked output, allocated on first use.
    #[inline]
    pub fn out(&mut self) -> &mut Vec<u8> {
        &mut self.output.get_or_insert_with(Box::default).corked
    }

    /// Puts the connection on `touched` (the shard's list to settle after this batch) once;
    /// [`Ctx::touch`] where the context is not borrowed apart.
    pub fn touch(&mut self, touched: &mut Vec<u32>) {
        if !self.touched {
            self.touched = true;
            touched.push(self.id.slot);
        }
    }

    /// The rarely used part, allocated on first use.
    pub fn extra(&mut self) -> &mut LinkExtra {
        self.extra.get_or_insert_with(Box::default)
    }

    /// Bytes queued and not yet written.
    #[inline]
    pub fn buffered(&self) -> usize {
        let deferred = self.extra.as_ref().map_or(0, |e| e.deferred.len());
        self.output.as_ref().map_or(0, |o| o.buffered()) + deferred
    }

    /// Whether compressed sends were deferred during the callback.
    fn has_deferred(&self) -> bool {
        self.extra
            .as_ref()
            .is_some_and(|e| !e.deferred_msgs.is_empty())
    }

    /// Queued or backpressure, by the high-water mark.
    pub fn status(&self, limits: &SendLimits) -> SendStatus {
        if self.buffered() >= limits.high_water_mark {
            SendStatus::Backpressure
        } else {
            SendStatus::Queued
        }
    }

    /// Frees the output and the rarely used part if they hold nothing (a quiet connection),
    /// and the corked vector if it grew past `keep` bytes. Returns whether a part was freed.
    pub fn shrink(&mut self, keep: usize) -> bool {
        let parts = usize::from(self.output.is_some()) + usize::from(self.extra.is_some());
        // An output that sent since the last sweep is in use (a subscriber that only
        // receives looks quiet by its input): kept, and looked at again next time.
        let recent = self
            .output
            .as_mut()
            .is_some_and(|o| std::mem::take(&mut o.recent));
        if !recent && self.output.as_ref().is_some_and(|o| o.is_idle()) {
            self.output = None;
        } else if let Some(output) = self.output.as_deref_mut() {
            if output.corked.is_empty() && output.corked.capacity() > keep {
                output.corked = Vec::new();
            }
            output.send.shrink(keep);
        }
        if let Some(extra) = self.extra.as_deref_mut() {
            if extra.deferred_msgs.is_empty() {
                extra.deferred = Vec::new();
                extra.deferred_msgs = Vec::new();
            }
            if extra.is_empty() {
                self.extra = None;
            }
        }
        parts > usize::from(self.output.is_some()) + usize::from(self.extra.is_some())
    }
}

/// Backpressure marks as the send path needs them.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SendLimits {
    /// Above this, `Backpressure` and reads stop.
    pub high_water_mark: usize,
    /// Above this, sends are dropped.
    pub max_buffered: usize,
}

/// Messages at least this long that were reassembled (or inflated) are sent on without a
/// copy when a callback sends the message it was handed: its buffer goes to the output
/// whole and, once written, back to an engine (its own, or through [`Spares`] the next one
/// that lends). Shorter ones are copied. 8 KiB, down from 64 KiB: a 16 KiB echo (every one
/// then spanned two 16 KiB receive buffers) cost 17% less server CPU (100 connections x 16
/// in flight, 3 alternated runs, medians 20.2 vs 16.6 µs per message).
pub(crate) const LEND_FROM: usize = 8 * 1024;

/// Buffers of lent messages that came back once written while their connection's engine had
/// a buffer again: the next engine that lends its own gets one of them at once, so a stream
/// of lent messages allocates nothing. Taken last in, first out (the warmest in cache).
/// Bounded: at most [`Spares::MAX`] buffers of at most [`Spares::MAX_CAPACITY`] bytes; the
/// sweep frees them all once a sweep interval passed without one taken.
#[derive(Default)]
pub(crate) struct Spares {
    buffers: Vec<Vec<u8>>,
    /// One was taken since the last sweep.
    taken: bool,
}

impl Spares {
    /// The most buffers kept.
    pub const MAX: usize = 64;
    /// The largest buffer kept (larger ones are freed: they came from rare large messages).
    pub const MAX_CAPACITY: usize = 64 * 1024;

    /// Keeps `buffer` for the next lend, or frees it if full or too large.
    pub fn put(&mut self, buffer: Vec<u8>) {
        if self.buffers.len() < Self::MAX && buffer.capacity() <= Self::MAX_CAPACITY {
            self.buffers.push(buffer);
        }
    }

    /// A buffer for an engine that just lent its own.
    pub fn take(&mut self) -> Option<Vec<u8>> {
        self.taken = true;
        self.buffers.pop()
    }

    /// The sweep: frees every buffer if none was taken since the last sweep. Returns how
    /// many it freed.
    pub fn sweep(&mut self) -> usize {
        if std::mem::take(&mut self.taken) {
            return 0;
        }
        std::mem::take(&mut self.buffers).len()
    }
}

/// The message being delivered, when it sits in a buffer of the engine's that may be sent on
/// as it is (see [`LEND_FROM`]).
#[derive(Default)]
pub(crate) struct LentMessage {
    /// The message's address and length, while its delivery runs and until it is sent.
    pub at: Option<(usize, usize)>,
    /// Where its frame header ends in the corked output, once it was sent.
    pub offset: Option<usize>,
}

impl LentMessage {
    /// Whether `payload` is the lent message itself.
    #[inline]
    fn is(&self, payload: &[u8]) -> bool {
        self.at == Some((payload.as_ptr() as usize, payload.len()))
    }
}

/// Shard-wide state a [`Session`] may reach.
pub(crate) struct Ctx {
    /// The shard's index.
    pub shard: usize,
    /// Every shard's mailbox (for publishes and handles).
    pub mailboxes: Arc<[Arc<Mailbox>]>,
    /// Backpressure marks.
    pub limits: SendLimits,
    /// Local subscriptions.
    pub topics: Topics,
    /// Publishes made during callbacks, fanned out locally after them.
    pub publishes: Vec<(Arc<str>, Bytes)>,
    /// Connections to settle after this batch.
    pub touched: Vec<u32>,
    /// Subscribers with publications lingering, to settle when the linger ends; empty
    /// without a linger.
    pub lingering: Vec<ConnId>,
    /// The shard's counters.
    pub metrics: Metrics,
    /// The message being delivered, if it may be sent on without a copy.
    pub lent: LentMessage,
    /// Buffers of lent messages, for engines that lend theirs.
    pub spares: Spares,
}

impl Ctx {
    /// Queues the connection for settling at the end of the batch.
    pub fn touch(&mut self, link: &mut Link) {
        link.touch(&mut self.touched);
    }

    /// Publishes a ready frame: other nodes through the uplink, other shards by message,
    /// local subscribers after the callback.
    pub fn publish(&mut self, topic: &str, frame: Bytes) {
        let key = self.topics.key(topic);
        if let Some(uplink) = self.topics.uplink() {
            uplink.publish(&key, &frame);
        }
        for mailbox in self.mailboxes.iter().filter(|m| m.id != self.shard) {
            mailbox.post(Command::Publish {
                topic: Arc::clone(&key),
                frame: frame.clone(),
            });
        }
        self.publishes.push((key, frame));
    }
}

/// One connection, lent to an [`App`] call.
pub(crate) struct Session<'a, S> {
    /// The connection's link.
    pub link: &'a mut Link,
    /// The protocol engine, when the call does not borrow from it (deliveries do).
    pub engine: Option<&'a mut Connection>,
    /// The application's per-connection state.
    pub state: &'a mut S,
    /// The shard.
    pub ctx: &'a mut Ctx,
}

impl<S> Session<'_, S> {
    /// Queues a data message (see [`queue_message`]).
    #[inline]
    pub fn send(&mut self, opcode: OpCode, payload: &[u8], compress: bool) -> SendStatus {
        let engine = self.engine.as_deref_mut();
        let status = send_counted(self.link, engine, opcode, payload, compress, self.ctx);
        if matches!(status, SendStatus::Queued | SendStatus::Backpressure) {
            self.ctx.touch(self.link);
        }
        status
    }

    /// Queues a ping (at most 125 bytes).
    pub fn ping(&mut self, payload: &[u8]) -> SendStatus {
        if !self.link.open {
            return SendStatus::Closed;
        }
        if payload.len() > 125 {
            return SendStatus::Dropped;
        }
        encode_frame(self.link.out(), true, false, OpCode::Ping, payload);
        self.ctx.touch(self.link);
        self.link.status(&self.ctx.limits)
    }

    /// Asks for the closing handshake, applied after the call. Codes that may not be sent
    /// become 1000; the reason is cut to 123 bytes.
    pub fn close(&mut self, code: CloseCode, reason: &str) {
        if !self.link.open {
            return;
        }
        let code = if code.is_valid_on_wire() {
            code
        } else {
            CloseCode::NORMAL
        };
        self.link.extra().close_req = Some((code, truncate_reason(reason).to_owned()));
        self.link.open = false;
        self.ctx.touch(self.link);
    }

    /// Subscribes to a topic; `false` if already subscribed.
    pub fn subscribe(&mut self, topic: &str) -> bool {
        self.ctx.topics.subscribe(self.link, topic)
    }

    /// Unsubscribes from a topic; `false` if not subscribed.
    pub fn unsubscribe(&mut self, topic: &str) -> bool {
        self.ctx.topics.unsubscribe(self.link, topic)
    }

    /// A handle for other threads.
    pub fn handle(&mut self) -> ConnHandle {
        let id = self.link.id;
        let gone = self
            .link
            .extra()
            .gone
            .get_or_insert_with(|| Arc::new(AtomicBool::new(false)));
        ConnHandle {
            mailbox: Arc::clone(&self.ctx.mailboxes[self.ctx.shard]),
            id,
            gone: Arc::clone(gone),
            node: Node {
                mailboxes: Arc::clone(&self.ctx.mailboxes),
                uplink: self.ctx.topics.uplink().cloned(),
            },
        }
    }
}

/// A `Send + Clone` way to one connection from any thread: requests travel to its shard as
/// commands, checked there against the connection's full 64-bit identity.
#[derive(Clone)]
pub(crate) struct ConnHandle {
    mailbox: Arc<Mailbox>,
    id: ConnId,
    gone: Arc<AtomicBool>,
    node: Node,
}

/// The whole node, for publishing from any thread: every shard's mailbox, and the uplink to
/// other nodes if a broker is configured.
#[derive(Clone)]
pub(crate) struct Node {
    mailboxes: Arc<[Arc<Mailbox>]>,
    uplink: Option<Arc<dyn Uplink>>,
}

impl Node {
    /// Publishes a ready frame to every subscriber of `topic`: other nodes through the
    /// uplink, every local shard by command. Returns how many local shards took it.
    pub fn publish(&self, topic: &str, frame: Bytes) -> usize {
        let topic: Arc<str> = Arc::from(topic);
        if let Some(uplink) = &self.uplink {
            uplink.publish(&topic, &frame);
        }
        self.mailboxes
            .iter()
            .filter(|m| {
                m.post(Command::Publish {
                    topic: Arc::clone(&topic),
                    frame: frame.clone(),
                }) == Posted::Queued
            })
            .count()
    }
}

impl ConnHandle {
    /// Posts a command for this connection: `Closed` if it is known to be gone (or the
    /// shard stopped), `QueueFull` if the shard's queue is full, else `Queued` (the shard may
    /// still find it closed by then, and drop the request).
    pub fn post(&self, make: impl FnOnce(ConnId) -> Command) -> SendStatus {
        if self.gone.load(Ordering::Acquire) {
            return SendStatus::Closed;
        }
        match self.mailbox.post(make(self.id)) {
            Posted::Queued => SendStatus::Queued,
            Posted::Full => SendStatus::QueueFull,
            Posted::Stopped => SendStatus::Closed,
        }
    }

    /// The node this connection is on.
    pub fn node(&self) -> &Node {
        &self.node
    }

    /// The owning shard's index.
    pub fn shard(&self) -> usize {
        self.mailbox.id
    }

    /// The connection's slot on its shard (for debugging output).
    pub fn slot(&self) -> u32 {
        self.id.slot
    }
}

/// Queues one data message on a connection, compressed if `allow_compress`, compression was
/// negotiated and the message is large enough. Compressed messages need the engine; when it
/// is borrowed (during a delivery) they are copied aside and encoded after the call.
#[inline]
pub(crate) fn queue_message(
    link: &mut Link,
    engine: Option<&mut Connection>,
    opcode: OpCode,
    payload: &[u8],
    allow_compress: bool,
    limits: &SendLimits,
) -> SendStatus {
    if !link.open {
        return SendStatus::Closed;
    }
    if link.buffered() > limits.max_buffered {
        return SendStatus::Dropped;
    }
    let compress = allow_compress && payload.len() >= link.min_compress;
    match engine {
        Some(engine) if compress => {
            if engine.send(link.out(), opcode, payload, true).is_err() {
                return SendStatus::Closed;
            }
        }
        // Keep order behind messages already deferred in this call.
        None if compress || link.has_deferred() => {
            let extra = link.extra();
            extra.deferred.extend_from_slice(payload);
            extra.deferred_msgs.push((opcode, payload.len(), compress));
        }
        _ => encode_frame(link.out(), true, false, opcode, payload),
    }
    link.status(limits)
}

/// [`queue_message`] with the outcome counted in the shard's metrics: a message sent
/// (compressed as `queue_message` decided), or one dropped over the hard cap. Out of line, so
/// that the callers (inlined into the handler's callbacks) stay small.
#[inline(never)]
pub(crate) fn send_counted(
    link: &mut Link,
    engine: Option<&mut Connection>,
    opcode: OpCode,
    payload: &[u8],
    allow_compress: bool,
    ctx: &mut Ctx,
) -> SendStatus {
    let status = if ctx.lent.is(payload) && engine.is_none() {
        send_lent(link, opcode, payload, allow_compress, ctx)
    } else {
        queue_message(link, engine, opcode, payload, allow_compress, &ctx.limits)
    };
    let (metrics, len) = (&mut ctx.metrics, payload.len());
    match status {
        SendStatus::Queued | SendStatus::Backpressure => {
            let compressed = allow_compress && len >= link.min_compress;
            metrics.sent.count(len, compressed);
        }
        SendStatus::Dropped => metrics.dropped_over_cap += 1,
        SendStatus::Closed | SendStatus::QueueFull => {}
    }
    status
}

/// Sends on the message being delivered without copying it: only its frame header goes into
/// the corked output; the message's buffer is placed after it once the callback returns (see
/// `on_frames`). Sent the usual way (a copy) if it is to be compressed or must queue behind
/// deferred compressed messages. Out of line: large messages only.
#[cold]
#[inline(never)]
fn send_lent(
    link: &mut Link,
    opcode: OpCode,
    payload: &[u8],
    allow_compress: bool,
    ctx: &mut Ctx,
) -> SendStatus {
    let limits = &ctx.limits;
    let compress = allow_compress && payload.len() >= link.min_compress;
    if !link.open || link.buffered() > limits.max_buffered || compress || link.has_deferred() {
        return queue_message(link, None, opcode, payload, allow_compress, limits);
    }
    let mut header = [0u8; crate::proto::frame::MAX_HEADER_LEN];
    let n =
        crate::proto::frame::encode_header(&mut header, true, false, opcode, payload.len(), None);
    let output = link.output.get_or_insert_with(Box::default);
    output.corked.extend_from_slice(&header[..n]);
    output.pieces_len += payload.len();
    ctx.lent.offset = Some(output.corked.len());
    // Once: a second send of the same message is a copy.
    ctx.lent.at = None;
    link.status(limits)
}

/// The longest prefix of `reason` that fits a close frame (125 - 2 code bytes), cut at a
/// character boundary (RFC 6455 §5.5: control payloads are at most 125 bytes).
pub(crate) fn truncate_reason(reason: &str) -> &str {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    &reason[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_cut_to_123_bytes_at_a_char_boundary() {
        let long = "é".repeat(100);
        let cut = truncate_reason(&long);
        assert!(cut.len() <= 123);
        assert_eq!(cut.len() % 2, 0);
        assert_eq!(truncate_reason("bye"), "bye");
    }

    #[test]
    fn sends_on_a_closing_connection_report_closed_and_over_the_cap_dropped() {
        let id = ConnId { slot: 0, gen: 0 };
        let mut link = Link::new(id, SocketAddr::from(([127, 0, 0, 1], 1)));
        let limits = SendLimits {
            high_water_mark: 8,
            max_buffered: 16,
        };
        let send =
            |link: &mut Link| queue_message(link, None, OpCode::Text, b"hello", true, &limits);
        assert_eq!(send(&mut link), SendStatus::Closed, "not open yet");
        link.open = true;
        assert_eq!(send(&mut link), SendStatus::Queued);
        assert_eq!(send(&mut link), SendStatus::Backpressure);
        link.out().extend_from_slice(&[0; 16]);
        assert_eq!(send(&mut link), SendStatus::Dropped);
        link.open = false;
        assert_eq!(send(&mut link), SendStatus::Closed);
    }
}
