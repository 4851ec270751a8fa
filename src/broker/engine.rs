//! What both engines share on the engine thread: the [`Link`] to the handle (queue, control
//! messages, live topics, counters, the event callback) and the reconnect [`Backoff`].
//!
//! The link keeps the event protocol in one place: `Connected` on every link up, followed by
//! `Resubscribed { gap: true }` when it is a reconnect; `Disconnected` once per loss.

use std::collections::HashSet;
use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;

use super::{wire, BrokerConfig, BrokerEvent, Control, Engine, NodeId, Outbound, Shared};

/// The most publications an engine takes from the queue for one batch (one Redis pipeline).
pub(super) const BATCH: usize = 256;

/// Runs the configured engine until the handle is dropped (or, at start, until the broker
/// refuses the credentials).
pub(super) async fn run(config: BrokerConfig, link: Link) {
    match config.engine.clone() {
        #[cfg(feature = "redis")]
        Engine::Redis { url, sharded } => super::redis::run(config, url, sharded, link).await,
        #[cfg(feature = "nats")]
        Engine::Nats { url } => super::nats::run(config, url, link).await,
    }
}

/// A change to the live set that the broker must hear about.
pub(super) enum Change {
    Subscribe(Arc<str>),
    Unsubscribe(Arc<str>),
}

/// The engine's end of a [`super::Broker`].
pub(super) struct Link {
    pub node: NodeId,
    shared: Arc<Shared>,
    /// Publications, in order.
    pub queue: mpsc::Receiver<Outbound>,
    /// Subscription changes, in order.
    pub control: mpsc::UnboundedReceiver<Control>,
    /// The topics this node is subscribed to, as the handle last said.
    live: HashSet<Arc<str>>,
    on_event: Box<dyn FnMut(BrokerEvent) + Send>,
    /// Until the first connection attempt is over: where `Broker::start` waits for it.
    started: Option<std::sync::mpsc::Sender<io::Result<()>>>,
    /// Whether the link has been up before (the next `up` is a reconnect).
    was_up: bool,
}

impl Link {
    pub fn new(
        node: NodeId,
        shared: Arc<Shared>,
        queue: mpsc::Receiver<Outbound>,
        control: mpsc::UnboundedReceiver<Control>,
        on_event: Box<dyn FnMut(BrokerEvent) + Send>,
        started: std::sync::mpsc::Sender<io::Result<()>>,
    ) -> Link {
        Link {
            node,
            shared,
            queue,
            control,
            live: HashSet::new(),
            on_event,
            started: Some(started),
            was_up: false,
        }
    }

    /// Whether `Broker::start` is still waiting for the first attempt.
    #[cfg(feature = "redis")]
    pub fn is_starting(&self) -> bool {
        self.started.is_some()
    }

    /// Ends `Broker::start`'s wait: `Ok` lets it return the handle, `Err` makes it fail.
    pub fn started(&mut self, outcome: io::Result<()>) {
        if let Some(started) = self.started.take() {
            let _ = started.send(outcome);
        }
    }

    /// Applies a control message to the live set; the change, when it is one.
    pub fn apply(&mut self, control: Control) -> Option<Change> {
        match control {
            Control::Subscribe(topic) => self
                .live
                .insert(topic.clone())
                .then_some(Change::Subscribe(topic)),
            Control::Unsubscribe(topic) => self
                .live
                .remove(&topic)
                .then_some(Change::Unsubscribe(topic)),
        }
    }

    /// Applies every control message already waiting (while the link is down, when the
    /// changes only need to reach the live set).
    #[cfg(feature = "redis")]
    pub fn absorb_control(&mut self) {
        while let Ok(control) = self.control.try_recv() {
            self.apply(control);
        }
    }

    /// The live topics.
    #[cfg(feature = "redis")]
    pub fn live(&self) -> impl Iterator<Item = &Arc<str>> {
        self.live.iter()
    }

    /// The live topic named `name`, shared.
    pub fn live_topic(&self, name: &str) -> Option<Arc<str>> {
        self.live.get(name).cloned()
    }

    /// A message received for the live `topic`: reported unless it is our own or malformed.
    pub fn deliver(&mut self, topic: Arc<str>, message: Bytes) {
        match wire::decode(message) {
            None => {
                self.shared.malformed.fetch_add(1, Ordering::Relaxed);
            }
            Some((node, _)) if node == self.node.get() => {}
            Some((_, payload)) => {
                self.shared.received.fetch_add(1, Ordering::Relaxed);
                (self.on_event)(BrokerEvent::Message { topic, payload });
            }
        }
    }

    /// The link is up and every live topic is subscribed.
    pub fn up(&mut self) {
        self.shared.connected.store(true, Ordering::Relaxed);
        (self.on_event)(BrokerEvent::Connected);
        if std::mem::replace(&mut self.was_up, true) {
            self.shared.reconnects.fetch_add(1, Ordering::Relaxed);
            (self.on_event)(BrokerEvent::Resubscribed { gap: true });
        }
    }

    /// The link is down (reported once however often it is called).
    pub fn down(&mut self) {
        if self.shared.connected.swap(false, Ordering::Relaxed) {
            (self.on_event)(BrokerEvent::Disconnected);
        }
    }

    /// A batch taken from the queue is done with: `sent` of it reached the broker, the rest
    /// was lost. Releases its bytes from the queue's bound.
    pub fn settle(&self, batch: &mut Vec<Outbound>, sent: usize) {
        let bytes: usize = batch.iter().map(Outbound::size).sum();
        self.shared.queued_bytes.fetch_sub(bytes, Ordering::Relaxed);
        self.shared
            .published
            .fetch_add(sent as u64, Ordering::Relaxed);
        self.shared
            .dropped
            .fetch_add((batch.len() - sent) as u64, Ordering::Relaxed);
        batch.clear();
    }
}

/// Capped exponential reconnect delays with jitter, for an engine that reconnects by itself
/// (the NATS client takes [`delay`] as its callback instead).
#[cfg(feature = "redis")]
pub(super) struct Backoff {
    min: Duration,
    max: Duration,
    seed: u64,
    attempt: u32,
}

#[cfg(feature = "redis")]
impl Backoff {
    pub fn new(config: &BrokerConfig, node: NodeId) -> Backoff {
        Backoff {
            min: config.retry_min,
            max: config.retry_max,
            seed: node.get(),
            attempt: 0,
        }
    }

    /// The delay before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        let delay = delay(self.min, self.max, self.attempt, self.seed);
        self.attempt = self.attempt.saturating_add(1);
        delay
    }

    /// Back to the shortest delay (after a successful connection).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// The delay before reconnect attempt `attempt` (0-based): `min * 2^attempt` capped at `max`,
/// less up to a quarter, so nodes that lost the same broker do not come back in lockstep. The
/// jitter is a hash of `seed` (the node id) and the attempt: deterministic, different per node.
pub(super) fn delay(min: Duration, max: Duration, attempt: u32, seed: u64) -> Duration {
    let base = min.saturating_mul(1u32 << attempt.min(20)).min(max);
    // splitmix64 finalizer.
    let mut x = seed ^ u64::from(attempt).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^= x >> 31;
    let quarter_permille = (x % 250) as u32;
    base - base * quarter_permille / 1000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap_with_bounded_jitter() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(5));
        for seed in [1, 2, 0xdead_beef] {
            let delays: Vec<Duration> = (0..40).map(|a| delay(min, max, a, seed)).collect();
            for (attempt, d) in delays.iter().enumerate() {
                let base = min.saturating_mul(1 << attempt.min(20)).min(max);
                assert!(*d <= base && *d >= base * 3 / 4, "attempt {attempt}: {d:?}");
            }
            assert!(delays[39] > max * 3 / 4 - Duration::from_millis(1));
        }
        assert_ne!(delay(min, max, 3, 1), delay(min, max, 3, 2));
    }
}
