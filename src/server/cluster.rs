//! More than one node: the shards' [`Uplink`] over a [`Broker`]. A node subscribes upstream
//! when the first local subscriber of a topic appears on any shard and unsubscribes when the
//! last one leaves (a count of shards per topic, touched only on those transitions); every
//! local publication goes to the broker as the encoded frame; every frame that comes back
//! from another node goes, as one shared buffer, to the shards with subscribers of its topic.

use std::collections::HashMap;
use std::io;
use std::panic::{self, AssertUnwindSafe};
use std::sync::{Arc, Mutex, OnceLock};

use bytes::Bytes;

use crate::broker::{Broker, BrokerConfig, BrokerEvent, BrokerStats, NodeId};
use crate::proto::frame::{self, OpCode};
use crate::runtime::command::{Command, Mailbox};
use crate::runtime::pubsub::Uplink;
use crate::server::adapter::HandlerApp;
use crate::server::{BrokerNotice, Handler};

/// Which shards have local subscribers of which topic; where inbound frames go.
struct Routes {
    /// Topic → one flag per shard.
    topics: Mutex<HashMap<Arc<str>, Vec<bool>>>,
    /// The shards' mailboxes, once they run.
    mailboxes: OnceLock<Arc<[Arc<Mailbox>]>>,
    /// Frames from other nodes that were not a single data frame, dropped.
    malformed: std::sync::atomic::AtomicU64,
}

impl Routes {
    /// A frame from another node: to every shard with subscribers of its topic.
    fn deliver(&self, topic: Arc<str>, frame: Bytes) {
        if !is_data_frame(&frame) {
            self.malformed
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return;
        }
        let Some(mailboxes) = self.mailboxes.get() else {
            return;
        };
        // Copy the shard flags, so shards that (un)subscribe do not wait on our posts.
        let shards = {
            let topics = self.topics.lock().unwrap_or_else(|p| p.into_inner());
            match topics.get(&topic) {
                Some(shards) => shards.clone(),
                None => return,
            }
        };
        for (mailbox, _) in mailboxes.iter().zip(&shards).filter(|(_, &on)| on) {
            mailbox.post(Command::Publish {
                topic: Arc::clone(&topic),
                frame: frame.clone(),
            });
        }
    }
}

/// A server's link to the other nodes.
pub(crate) struct Cluster {
    broker: Broker,
    routes: Arc<Routes>,
    shards: usize,
}

impl Cluster {
    /// Starts the broker engine for a server of `shards` shards; broker notices go to
    /// `handler.on_broker` on the engine's thread.
    ///
    /// # Errors
    /// A bad broker configuration or refused credentials (see [`Broker::start`]).
    pub fn start<H: Handler>(
        config: BrokerConfig,
        shards: usize,
        app: Arc<HandlerApp<H>>,
    ) -> io::Result<Arc<Cluster>> {
        let routes = Arc::new(Routes {
            topics: Mutex::new(HashMap::new()),
            mailboxes: OnceLock::new(),
            malformed: std::sync::atomic::AtomicU64::new(0),
        });
        let inbound = Arc::clone(&routes);
        let on_event = move |event: BrokerEvent| {
            let notice = match event {
                BrokerEvent::Message { topic, payload } => {
                    inbound.deliver(topic, payload);
                    return;
                }
                BrokerEvent::Connected => BrokerNotice::Connected,
                BrokerEvent::Disconnected => BrokerNotice::Disconnected,
                BrokerEvent::Resubscribed { gap } => BrokerNotice::Resubscribed { gap },
            };
            let handler = &app.handler;
            if panic::catch_unwind(AssertUnwindSafe(|| handler.on_broker(notice))).is_err() {
                tracing::warn!(callback = "on_broker", ?notice, "handler panicked");
            }
        };
        let broker = Broker::start(config, NodeId::random(), Box::new(on_event))?;
        Ok(Arc::new(Cluster {
            broker,
            routes,
            shards,
        }))
    }

    /// Tells the routes where the shards are (once they run).
    pub fn attach(&self, mailboxes: &Arc<[Arc<Mailbox>]>) {
        let _ = self.routes.mailboxes.set(Arc::clone(mailboxes));
    }

    /// The broker's counters, with inbound frames dropped as malformed added.
    pub fn stats(&self) -> BrokerStats {
        let mut stats = self.broker.stats();
        stats.malformed += self
            .routes
            .malformed
            .load(std::sync::atomic::Ordering::Relaxed);
        stats
    }
}

impl Uplink for Cluster {
    fn joined(&self, shard: usize, topic: &Arc<str>) {
        let mut topics = self.routes.topics.lock().unwrap_or_else(|p| p.into_inner());
        let shards = topics
            .entry(Arc::clone(topic))
            .or_insert_with(|| vec![false; self.shards]);
        let first = !shards.iter().any(|&on| on);
        if let Some(on) = shards.get_mut(shard) {
            *on = true;
        }
        if first {
            self.broker.subscribe(topic);
        }
    }

    fn left(&self, shard: usize, topic: &Arc<str>) {
        let mut topics = self.routes.topics.lock().unwrap_or_else(|p| p.into_inner());
        let Some(shards) = topics.get_mut(topic) else {
            return;
        };
        if let Some(on) = shards.get_mut(shard) {
            *on = false;
        }
        if !shards.iter().any(|&on| on) {
            topics.remove(topic);
            self.broker.unsubscribe(topic);
        }
    }

    fn publish(&self, topic: &Arc<str>, frame: &Bytes) {
        // A full queue is counted by the broker (`BrokerStats::dropped`).
        let _ = self.broker.publish(topic, frame.clone());
    }
}

/// Whether `bytes` is exactly one final, unmasked text or binary frame without RSV bits
/// (what nodes publish), so a foreign publisher cannot make us send clients garbage. Text is
/// checked to be UTF-8 (RFC 6455 §8.1).
fn is_data_frame(bytes: &[u8]) -> bool {
    let Ok(Some(header)) = frame::parse_header(bytes) else {
        return false;
    };
    let payload = &bytes[header.header_len..];
    header.fin
        && !header.rsv1
        && !header.rsv23
        && header.mask.is_none()
        && payload.len() as u64 == header.payload_len
        && match header.opcode {
            OpCode::Text => simdutf8::basic::from_utf8(payload).is_ok(),
            OpCode::Binary => true,
            _ => false,
        }
}
