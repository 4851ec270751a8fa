//! Publish/subscribe across ringsock nodes on an existing broker: Redis pub/sub (cargo
//! feature `redis`) or NATS core subjects (feature `nats`). No home-made cluster protocol: each
//! engine drives the broker's own client crate (`redis`, `async-nats`).
//!
//! This module owns the broker seam: [`BrokerConfig`], the [`Broker`] handle with its bounded
//! outbound queue, and one engine thread per handle. It must never depend on the runtime or
//! the server, block a caller of [`Broker::publish`] (that call is one lock-free queue push, so
//! a shard thread may make it), or hold memory for publications without a bound.
//!
//! # Call protocol
//!
//! [`Broker::start`] spawns the engine thread and returns; the engine connects (and keeps
//! reconnecting) on its own. [`Broker::subscribe`] and [`Broker::unsubscribe`] are node-level:
//! the caller counts local subscribers across its shards and calls them on the first and the
//! last one, so a thousand sockets on one topic are one upstream subscription.
//! [`Broker::publish`] queues a message for every other node. Everything that comes back —
//! messages from other nodes and changes of the link — reaches the `on_event` callback, on the
//! engine thread, in order. The callback must not block for long: while it runs, the engine
//! neither reads nor publishes; if it panics, the engine thread ends (publications then fill
//! the queue and are dropped). Dropping the [`Broker`] stops and joins the engine thread.
//!
//! # Semantics
//!
//! What Redis pub/sub and NATS core give, and so all this layer promises:
//!
//! * **At most once.** A message is delivered to each other node that was subscribed when
//!   the broker routed it, once, or not at all (queue full, broker down, connection lost with
//!   the message in flight). Nothing is retried, so nothing is duplicated.
//! * **In order per publishing node**, for one topic: the engine publishes in queue order over
//!   one connection, and both brokers keep a connection's order. (Redis Cluster: as long as
//!   the topic's slot does not move.)
//! * **No history and no presence.** A node that subscribes gets what is published from then
//!   on; nothing tells it who else is subscribed.
//! * **No echo.** Every message carries the publishing node's [`NodeId`]; a node skips its own
//!   publications (its local subscribers are served by local fan-out).
//!
//! # Faults
//!
//! * **Broker down at start:** `start` succeeds; the engine retries with capped exponential
//!   backoff ([`BrokerConfig::retry_min`] doubling up to [`BrokerConfig::retry_max`], less up
//!   to a quarter of jitter) and reports [`BrokerEvent::Connected`] when the broker comes up.
//!   Publications wait in the queue meanwhile, up to its bound.
//! * **Broker restarted or connection lost:** [`BrokerEvent::Disconnected`], then after the
//!   reconnect every live topic is subscribed again and the engine reports
//!   [`BrokerEvent::Connected`] followed by [`BrokerEvent::Resubscribed`] `{ gap: true }`:
//!   messages published while the link was down are lost, and the application should resync
//!   whatever state it derives from them.
//! * **Slow broker, or one that stops reading:** the outbound queue is bounded in messages
//!   ([`BrokerConfig::max_queued_messages`]) and bytes ([`BrokerConfig::max_queued_bytes`]);
//!   a publication that does not fit is dropped and counted in [`BrokerStats::dropped`].
//!   Beyond the queue, only the client library's own bounded buffers (NATS: 512 commands)
//!   and the socket buffers hold data. A request that gets no answer within
//!   [`BrokerConfig::request_timeout`] counts as a lost connection (Redis) or drops the batch
//!   it was sending (NATS, whose client detects dead connections by its own pings). An error
//!   reply (an ACL that denies a channel, say) drops that batch or change, is logged, and
//!   keeps the connection.
//! * **Bad URL:** the [`BrokerConfig`] constructors and `start` return
//!   [`io::ErrorKind::InvalidInput`] naming the URL (with any password masked).
//! * **Refused authentication:** `start` makes the engine's first connection attempt
//!   synchronously, waiting at most [`BrokerConfig::connect_timeout`]. If the broker answers
//!   and refuses the credentials (or requires some and got none), `start` returns
//!   [`io::ErrorKind::PermissionDenied`] — a configuration mistake should stop a deployment at
//!   once, not hide in a retry loop. If the broker cannot be reached at all, `start` succeeds
//!   and the engine keeps retrying, as above. Waiting for that one attempt costs a round trip
//!   on a cold path; the alternative, an error event after `start` returned, would leave a
//!   misconfigured node serving without anyone being told. A refusal on a later reconnect is
//!   logged and retried (the operator may be rotating the password).
//!
//! # Message format (version 1)
//!
//! ```text
//! offset  size  field
//! 0       1     format version, 0x01
//! 1       8     NodeId of the publishing node, big-endian u64 (0 = not a ringsock node)
//! 9       ..    payload, opaque to this layer
//! ```
//!
//! The payload is what the caller of [`Broker::publish`] passed; ringsock's server passes a
//! complete encoded WebSocket frame, so a receiving node hands it to its shards as is. Another
//! service may publish to ringsock subscribers by putting the same 9 bytes, with node id 0, in
//! front of a frame. A message shorter than the header or with another version byte is
//! dropped and counted in [`BrokerStats::malformed`].
//!
//! # Topic names on the broker
//!
//! With the default [`BrokerConfig::prefix`] `ringsock`:
//!
//! * Redis: channel `ringsock:` followed by the topic's bytes verbatim (Redis channels are
//!   binary-safe). Topic `room 1` is channel `ringsock:room 1`.
//! * NATS: subject `ringsock.` followed by the topic escaped into one subject token: ASCII
//!   letters, digits, `-` and `_` stay; every other byte of the topic's UTF-8 (including `.`,
//!   space, `*`, `>` and `~`) becomes `~` and two uppercase hex digits; the empty topic is the
//!   token `~` alone. Topic `room 1` is `ringsock.room~201`, `a.b` is `ringsock.a~2Eb`. The
//!   mapping is reversible, and one NATS permission `ringsock.>` covers every topic.

mod engine;
#[cfg(feature = "nats")]
mod nats;
#[cfg(feature = "redis")]
mod redis;
mod wire;

use std::fmt;
use std::io::{self, Read};
use std::num::NonZeroU64;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

/// A warning about the link to the broker, through `tracing` like the rest of the crate (target
/// `ringsock::broker`).
macro_rules! broker_log {
    ($($arg:tt)*) => { tracing::warn!(target: "ringsock::broker", $($arg)*) };
}
pub(crate) use broker_log;

/// A node's identity on the broker: 64 random bits, never 0 (which marks publishers that are
/// not ringsock nodes). It travels in every message so a node can skip its own publications.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct NodeId(NonZeroU64);

impl NodeId {
    /// A fresh random id (from `/dev/urandom`; from the standard library's hash seeds, the
    /// clock and the process id if that cannot be read). Two processes collide with odds of
    /// about one in 2^64.
    pub fn random() -> NodeId {
        let mut bytes = [0u8; 8];
        let seeded = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes));
        let mut id = u64::from_ne_bytes(bytes);
        if seeded.is_err() || id == 0 {
            use std::hash::{BuildHasher, Hasher};
            let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
            hasher.write_u32(std::process::id());
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
            hasher.write_u128(now.map_or(0, |d| d.as_nanos()));
            id = hasher.finish();
        }
        NodeId::new(id).unwrap_or(NodeId(NonZeroU64::MIN))
    }

    /// The id `id`, or `None` for 0.
    pub fn new(id: u64) -> Option<NodeId> {
        NonZeroU64::new(id).map(NodeId)
    }

    /// The id as a number.
    pub fn get(self) -> u64 {
        self.0.get()
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.get())
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({self})")
    }
}

/// Which broker, and where.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Engine {
    /// Redis pub/sub. `url` as the `redis` crate takes it:
    /// `redis://[[user]:password@]host[:port][/db]`, `redis+unix:///path`. With `sharded`, the
    /// URL names one node of a Redis Cluster (7.0+) and the engine uses sharded pub/sub,
    /// `SPUBLISH`/`SSUBSCRIBE`, over RESP3.
    #[cfg(feature = "redis")]
    Redis {
        /// The server's URL.
        url: String,
        /// Redis Cluster with sharded pub/sub.
        sharded: bool,
    },
    /// NATS core subjects. `url`: `nats://[user:password@]host[:port]` or `tls://…`; several
    /// servers of one cluster may be given separated by commas.
    #[cfg(feature = "nats")]
    Nats {
        /// The server's URL (or URLs).
        url: String,
    },
}

impl fmt::Debug for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            #[cfg(feature = "redis")]
            Engine::Redis { url, sharded } => f
                .debug_struct("Redis")
                .field("url", &redact(url))
                .field("sharded", sharded)
                .finish(),
            #[cfg(feature = "nats")]
            Engine::Nats { url } => f.debug_struct("Nats").field("url", &redact(url)).finish(),
        }
    }
}

/// How a node reaches its broker, and the bounds it keeps. Build one with
/// [`BrokerConfig::from_url`], [`BrokerConfig::redis`], [`BrokerConfig::redis_cluster`] or
/// [`BrokerConfig::nats`], then adjust the public fields.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct BrokerConfig {
    /// The broker.
    pub engine: Engine,
    /// What every channel or subject name starts with (see the module docs): tokens of ASCII
    /// letters, digits, `-` and `_` separated by `.`. Default `ringsock`, so ringsock traffic
    /// is easy to find, permit and keep apart from other users of the same broker; two
    /// applications sharing a broker give themselves different prefixes.
    pub prefix: String,
    /// The most publications waiting to go to the broker; more are dropped and counted.
    /// Default 10 000: a second of traffic at 10 000 msg/s, enough to ride out a short stall
    /// or reconnect, small enough that what is delivered late is still recent.
    pub max_queued_messages: usize,
    /// The most payload and topic bytes waiting or in flight to the broker; more are dropped
    /// and counted. Default 16 MiB, so the message bound does not turn into gigabytes when
    /// messages are large; a single publication larger than this is always dropped.
    pub max_queued_bytes: usize,
    /// How long one connection attempt may take, and how long [`Broker::start`] waits for the
    /// first one. Default 2 s: generous for a broker on the same network, short enough not to
    /// hold up a node's start.
    pub connect_timeout: Duration,
    /// How long a publish batch, subscribe or ping may wait for the broker before the engine
    /// gives up on it. Default 5 s: far above any healthy broker's answer, so only a broker
    /// that has stopped working trips it.
    pub request_timeout: Duration,
    /// How often an idle link is checked with a ping. Default 10 s: a broker that vanished
    /// without closing its connections is noticed within 10-15 s.
    pub ping_interval: Duration,
    /// The first reconnect delay. Default 100 ms: a broker restart is usually over quickly.
    pub retry_min: Duration,
    /// The longest reconnect delay. Default 5 s: a broker that is down for long is still
    /// found within seconds of coming back, without every node hammering it meanwhile.
    pub retry_max: Duration,
}

impl BrokerConfig {
    /// A configuration for `url`, with the engine chosen by its scheme: `redis://`,
    /// `rediss://`, `redis+unix://` and `unix://` for Redis (not sharded), `nats://` and
    /// `tls://` for NATS.
    ///
    /// # Errors
    ///
    /// [`io::ErrorKind::InvalidInput`] for a scheme no enabled engine takes, or a URL its
    /// engine rejects.
    pub fn from_url(url: &str) -> io::Result<BrokerConfig> {
        let scheme = url.split_once("://").map_or("", |(scheme, _)| scheme);
        match scheme {
            #[cfg(feature = "redis")]
            "redis" | "rediss" | "redis+unix" | "unix" => BrokerConfig::redis(url),
            #[cfg(feature = "nats")]
            "nats" | "tls" => BrokerConfig::nats(url),
            _ => Err(invalid(format!(
                "broker URL {}: expected one of {} (the schemes of the enabled engines)",
                redact(url),
                schemes()
            ))),
        }
    }

    /// Redis pub/sub (`PUBLISH`/`SUBSCRIBE`) at `url`.
    ///
    /// # Errors
    ///
    /// [`io::ErrorKind::InvalidInput`] when the `redis` crate cannot parse `url`.
    #[cfg(feature = "redis")]
    pub fn redis(url: &str) -> io::Result<BrokerConfig> {
        BrokerConfig::with_engine(Engine::Redis {
            url: url.to_owned(),
            sharded: false,
        })
    }

    /// Redis Cluster sharded pub/sub (`SPUBLISH`/`SSUBSCRIBE`, Redis 7.0+) through the cluster
    /// node at `url`.
    ///
    /// # Errors
    ///
    /// [`io::ErrorKind::InvalidInput`] when the `redis` crate cannot parse `url`.
    #[cfg(feature = "redis")]
    pub fn redis_cluster(url: &str) -> io::Result<BrokerConfig> {
        BrokerConfig::with_engine(Engine::Redis {
            url: url.to_owned(),
            sharded: true,
        })
    }

    /// NATS core subjects at `url`.
    ///
    /// # Errors
    ///
    /// [`io::ErrorKind::InvalidInput`] when `async-nats` cannot parse `url`, or for a
    /// WebSocket URL (`ws://`, `wss://`: not enabled).
    #[cfg(feature = "nats")]
    pub fn nats(url: &str) -> io::Result<BrokerConfig> {
        BrokerConfig::with_engine(Engine::Nats {
            url: url.to_owned(),
        })
    }

    fn with_engine(engine: Engine) -> io::Result<BrokerConfig> {
        let config = BrokerConfig {
            engine,
            prefix: "ringsock".to_owned(),
            max_queued_messages: 10_000,
            max_queued_bytes: 16 << 20,
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(5),
            ping_interval: Duration::from_secs(10),
            retry_min: Duration::from_millis(100),
            retry_max: Duration::from_secs(5),
        };
        config.validate()?;
        Ok(config)
    }

    /// Checks the URL and every bound; [`Broker::start`] calls it too.
    ///
    /// # Errors
    ///
    /// [`io::ErrorKind::InvalidInput`] naming the first problem.
    pub fn validate(&self) -> io::Result<()> {
        match &self.engine {
            #[cfg(feature = "redis")]
            Engine::Redis { url, sharded } => redis::validate(url, *sharded)?,
            #[cfg(feature = "nats")]
            Engine::Nats { url } => nats::validate(url)?,
        }
        if !wire::is_valid_prefix(&self.prefix) {
            return Err(invalid(format!(
                "broker prefix {:?}: expected tokens of ASCII letters, digits, '-' and '_' \
                 separated by '.'",
                self.prefix
            )));
        }
        let positive = [
            ("max_queued_messages", self.max_queued_messages > 0),
            ("max_queued_bytes", self.max_queued_bytes > 0),
            ("connect_timeout", !self.connect_timeout.is_zero()),
            ("request_timeout", !self.request_timeout.is_zero()),
            ("ping_interval", !self.ping_interval.is_zero()),
            ("retry_min", !self.retry_min.is_zero()),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, ok)| !ok) {
            return Err(invalid(format!("broker {name} must be above zero")));
        }
        if self.retry_max < self.retry_min {
            return Err(invalid(
                "broker retry_max must not be below retry_min".to_owned(),
            ));
        }
        Ok(())
    }
}

/// What the engine reports to the `on_event` callback.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum BrokerEvent {
    /// A message another node published to a topic this node is subscribed to. Own
    /// publications and messages for topics no longer subscribed are not reported.
    Message {
        /// The topic.
        topic: Arc<str>,
        /// The payload as the publishing node passed it (the header is stripped; the bytes
        /// share the received buffer).
        payload: Bytes,
    },
    /// The link to the broker is up (the first time, and after every reconnect).
    Connected,
    /// The link to the broker is down; the engine is reconnecting.
    Disconnected,
    /// After a reconnect (right after its [`BrokerEvent::Connected`]): every live topic is
    /// subscribed again.
    Resubscribed {
        /// Whether messages may have been missed while the link was down. Always `true` for
        /// Redis pub/sub and NATS core, which keep no history; an engine with replay could say
        /// `false`.
        gap: bool,
    },
}

/// Counters of one [`Broker`], read with [`Broker::stats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct BrokerStats {
    /// Publications handed to the broker (Redis: acknowledged; NATS: handed to the client,
    /// which writes them in order).
    pub published: u64,
    /// Publications that never reached the broker: refused by the full queue, too large for
    /// it, or lost with a failed connection or batch.
    pub dropped: u64,
    /// Messages from other nodes reported as [`BrokerEvent::Message`].
    pub received: u64,
    /// Received messages without a valid header, dropped.
    pub malformed: u64,
    /// Successful reconnects after a lost link (each reported with
    /// [`BrokerEvent::Resubscribed`]).
    pub reconnects: u64,
    /// Publications waiting in the queue now.
    pub queued_messages: usize,
    /// Bytes waiting in the queue or in flight now (payloads and topics).
    pub queued_bytes: usize,
    /// Whether the link is up.
    pub connected: bool,
}

/// A running broker engine: a handle other threads use to publish and to change this node's
/// subscriptions. `Broker` is `Send + Sync`; share it behind an `Arc`. Dropping it stops the
/// engine and joins its thread (do not drop it from inside the `on_event` callback, which runs
/// on that thread; if that happens the thread is left to finish by itself).
pub struct Broker {
    node: NodeId,
    shared: Arc<Shared>,
    queue: mpsc::Sender<Outbound>,
    control: mpsc::UnboundedSender<Control>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Broker {
    /// Starts the engine for `config` on its own thread; `on_event` is called there with every
    /// [`BrokerEvent`]. Waits for the first connection attempt, at most
    /// `config.connect_timeout` (see "Faults" in the module docs), then returns whether or not
    /// the broker was reachable.
    ///
    /// # Errors
    ///
    /// [`io::ErrorKind::InvalidInput`] for an invalid configuration,
    /// [`io::ErrorKind::PermissionDenied`] when the broker refused the credentials, or the
    /// error from creating the thread or its runtime.
    pub fn start(
        config: BrokerConfig,
        node: NodeId,
        on_event: Box<dyn FnMut(BrokerEvent) + Send>,
    ) -> io::Result<Broker> {
        config.validate()?;
        let shared = Arc::new(Shared::new(config.max_queued_bytes));
        let (queue_tx, queue_rx) = mpsc::channel(config.max_queued_messages);
        let (control_tx, control_rx) = mpsc::unbounded_channel();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let link = engine::Link::new(
            node,
            shared.clone(),
            queue_rx,
            control_rx,
            on_event,
            started_tx,
        );
        let wait = config.connect_timeout + Duration::from_millis(250);
        let thread = std::thread::Builder::new()
            .name("ringsock-broker".to_owned())
            .spawn(move || {
                runtime.block_on(async move {
                    tokio::select! {
                        () = engine::run(config, link) => {}
                        _ = stop_rx => {}
                    }
                });
                // Dropping the runtime here cancels the client libraries' tasks on this
                // thread, so nothing of the engine outlives the join in `Drop`.
                drop(runtime);
            })?;
        let broker = Broker {
            node,
            shared,
            queue: queue_tx,
            control: control_tx,
            stop: Some(stop_tx),
            thread: Some(thread),
        };
        match started_rx.recv_timeout(wait) {
            Ok(Err(refused)) => Err(refused), // `broker` drops here and joins the ended engine.
            _ => Ok(broker),
        }
    }

    /// This node's id, as it goes on the wire.
    pub fn node_id(&self) -> NodeId {
        self.node
    }

    /// Queues `payload` for every other node subscribed to `topic`. Never blocks, never takes
    /// a lock: one allocation (the topic) and a push into a lock-free bounded queue, so a shard
    /// thread may call it. Returns `false`, and counts the message in
    /// [`BrokerStats::dropped`], when the queue is full (in messages or bytes) or the engine
    /// has stopped.
    pub fn publish(&self, topic: &str, payload: Bytes) -> bool {
        let size = topic.len() + payload.len();
        let queued = self.shared.queued_bytes.fetch_add(size, Ordering::Relaxed);
        if queued + size > self.shared.max_queued_bytes {
            self.shared.queued_bytes.fetch_sub(size, Ordering::Relaxed);
            self.shared.dropped.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        let message = Outbound {
            topic: topic.into(),
            payload,
        };
        if self.queue.try_send(message).is_err() {
            self.shared.queued_bytes.fetch_sub(size, Ordering::Relaxed);
            self.shared.dropped.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// Subscribes this node to `topic` upstream (call it for the first local subscriber). The
    /// subscription is made as soon as the link is up, and made again after every reconnect
    /// until [`Broker::unsubscribe`].
    pub fn subscribe(&self, topic: &str) {
        // A send fails only once the engine has stopped, when there is nothing left to do.
        let _ = self.control.send(Control::Subscribe(topic.into()));
    }

    /// Removes this node's upstream subscription to `topic` (call it when the last local
    /// subscriber leaves). Messages for it that arrive later are not reported.
    pub fn unsubscribe(&self, topic: &str) {
        let _ = self.control.send(Control::Unsubscribe(topic.into()));
    }

    /// The counters now.
    pub fn stats(&self) -> BrokerStats {
        let s = &self.shared;
        BrokerStats {
            published: s.published.load(Ordering::Relaxed),
            dropped: s.dropped.load(Ordering::Relaxed),
            received: s.received.load(Ordering::Relaxed),
            malformed: s.malformed.load(Ordering::Relaxed),
            reconnects: s.reconnects.load(Ordering::Relaxed),
            queued_messages: self.queue.max_capacity() - self.queue.capacity(),
            queued_bytes: s.queued_bytes.load(Ordering::Relaxed),
            connected: s.connected.load(Ordering::Relaxed),
        }
    }
}

impl fmt::Debug for Broker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Broker")
            .field("node", &self.node)
            .field("stats", &self.stats())
            .finish()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        // Dropping the sender wakes the engine thread's `select!`, which drops the engine.
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            if thread.thread().id() != std::thread::current().id() {
                let _ = thread.join();
            }
        }
    }
}

/// State the handle and the engine share: the counters and the byte bound.
struct Shared {
    max_queued_bytes: usize,
    queued_bytes: AtomicUsize,
    published: AtomicU64,
    dropped: AtomicU64,
    received: AtomicU64,
    malformed: AtomicU64,
    reconnects: AtomicU64,
    connected: AtomicBool,
}

impl Shared {
    fn new(max_queued_bytes: usize) -> Shared {
        Shared {
            max_queued_bytes,
            queued_bytes: AtomicUsize::new(0),
            published: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            received: AtomicU64::new(0),
            malformed: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            connected: AtomicBool::new(false),
        }
    }
}

/// A publication waiting in the queue.
struct Outbound {
    topic: Box<str>,
    payload: Bytes,
}

impl Outbound {
    /// What it counts against [`BrokerConfig::max_queued_bytes`].
    fn size(&self) -> usize {
        self.topic.len() + self.payload.len()
    }
}

/// A change of this node's subscriptions.
enum Control {
    Subscribe(Arc<str>),
    Unsubscribe(Arc<str>),
}

/// The URL schemes the enabled engines take, for error messages.
fn schemes() -> String {
    let mut schemes = Vec::new();
    if cfg!(feature = "redis") {
        schemes.push("redis://, rediss://, redis+unix://, unix://");
    }
    if cfg!(feature = "nats") {
        schemes.push("nats://, tls://");
    }
    schemes.join(", ")
}

/// An [`io::ErrorKind::InvalidInput`] error.
fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, message)
}

/// `url` with any user and password replaced by `***`, for messages and logs.
fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.split('@').next_back().unwrap_or(url).to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}://***{}", &rest[at..]),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_is_shared_across_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Broker>();
        send_sync::<BrokerEvent>();
    }

    #[test]
    fn redacts_credentials_only() {
        assert_eq!(
            redact("redis://127.0.0.1:6379/0"),
            "redis://127.0.0.1:6379/0"
        );
        assert_eq!(redact("redis://:secret@h:1/0"), "redis://***@h:1/0");
        assert_eq!(redact("nats://u:p@h:4222"), "nats://***@h:4222");
        assert_eq!(redact("nats://u:p@a@h"), "nats://***@h");
        assert_eq!(redact("u:p@h"), "h");
        assert_eq!(redact("redis://h/x@y"), "redis://h/x@y");
    }

    #[test]
    fn node_ids_are_random_and_nonzero() {
        let (a, b) = (NodeId::random(), NodeId::random());
        assert_ne!(a, b);
        assert_ne!(a.get(), 0);
        assert_eq!(NodeId::new(0), None);
        assert_eq!(NodeId::new(7).unwrap().to_string(), "0000000000000007");
    }

    #[test]
    fn rejects_unknown_schemes_and_bad_bounds() {
        let err = BrokerConfig::from_url("http://u:pw@example.com").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert!(err.to_string().contains("http://***@example.com"), "{err}");
        assert!(!err.to_string().contains("pw"), "{err}");
        assert!(BrokerConfig::from_url("").is_err());

        #[cfg(feature = "redis")]
        let url = "redis://127.0.0.1:1";
        #[cfg(not(feature = "redis"))]
        let url = "nats://127.0.0.1:1";
        let mut config = BrokerConfig::from_url(url).unwrap();
        config.max_queued_messages = 0;
        assert!(config
            .validate()
            .unwrap_err()
            .to_string()
            .contains("max_queued_messages"));
        config.max_queued_messages = 1;
        config.prefix = "a b".to_owned();
        assert!(config
            .validate()
            .unwrap_err()
            .to_string()
            .contains("prefix"));
        config.prefix = "app.ws".to_owned();
        config.retry_max = Duration::from_millis(1);
        assert!(config
            .validate()
            .unwrap_err()
            .to_string()
            .contains("retry_max"));
    }
}
