//! Publish/subscribe within a shard: which local connections subscribed to which topic, and
//! the fan-out of one encoded frame to them. Other shards get a publish as a command carrying
//! the same shared frame (see [`super::app::Ctx::publish`]).

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;

use super::app::Link;
use super::conn::Conn;
use super::slab::{ConnId, Slab};

/// A shard's subscriptions: topic → subscribers, and each connection keeps its own topics
/// (in its [`Link`]) so a closing connection unsubscribes from exactly those.
#[derive(Default)]
pub(crate) struct Topics {
    map: HashMap<Arc<str>, Vec<ConnId>>,
}

impl Topics {
    /// The shared key for `topic` (the existing one, so topic strings are not repeated).
    pub fn key(&self, topic: &str) -> Arc<str> {
        match self.map.get_key_value(topic) {
            Some((key, _)) => Arc::clone(key),
            None => Arc::from(topic),
        }
    }

    /// Subscribes `link`'s connection; `false` if it already was.
    pub fn subscribe(&mut self, link: &mut Link, topic: &str) -> bool {
        if link.topics.iter().any(|t| &**t == topic) {
            return false;
        }
        let key = self.key(topic);
        self.map.entry(Arc::clone(&key)).or_default().push(link.id);
        link.topics.push(key);
        true
    }

    /// Unsubscribes `link`'s connection; `false` if it was not subscribed.
    pub fn unsubscribe(&mut self, link: &mut Link, topic: &str) -> bool {
        let Some(index) = link.topics.iter().position(|t| &**t == topic) else {
            return false;
        };
        let key = link.topics.swap_remove(index);
        self.remove(&key, link.id);
        true
    }

    /// Unsubscribes a closing connection from all its topics.
    pub fn remove_all(&mut self, link: &mut Link) {
        for topic in std::mem::take(&mut link.topics) {
            self.remove(&topic, link.id);
        }
    }

    fn remove(&mut self, topic: &str, id: ConnId) {
        if let Some(subs) = self.map.get_mut(topic) {
            subs.retain(|&s| s != id);
            if subs.is_empty() {
                self.map.remove(topic);
            }
        }
    }

    /// The subscribers of `topic`.
    pub fn subscribers(&self, topic: &str) -> &[ConnId] {
        self.map.get(topic).map_or(&[], Vec::as_slice)
    }
}

/// Copies one shared frame into the output of every open subscriber of `topic` (every open
/// connection for `None`), skipping those over `max_buffered`; each one written to goes on
/// `touched`.
pub(crate) fn fan_out<S>(
    conns: &mut Slab<Conn<S>>,
    topics: &Topics,
    topic: Option<&str>,
    frame: &Bytes,
    max_buffered: usize,
    touched: &mut Vec<u32>,
) {
    let mut deliver = |c: &mut Conn<S>| {
        let link = &mut c.link;
        if link.open && link.buffered() <= max_buffered {
            link.out.extend_from_slice(frame);
            if !link.touched {
                link.touched = true;
                touched.push(link.id.slot);
            }
        }
    };
    match topic {
        Some(topic) => {
            for &id in topics.subscribers(topic) {
                if let Some(c) = conns.get(id) {
                    deliver(c);
                }
            }
        }
        None => {
            for slot in 0..conns.end() {
                if let Some(c) = conns.at(slot) {
                    deliver(c);
                }
            }
        }
    }
}
