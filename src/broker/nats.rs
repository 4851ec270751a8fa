//! The NATS engine, on `async-nats` and the engine thread's tokio runtime: core subjects, one
//! subscription per live topic, publications in queue order on one client.
//!
//! Unlike the Redis engine this one does not reconnect by itself: the `async-nats` client
//! reconnects with this module's backoff and replays its subscriptions (the `SUB`s are queued
//! before anything else on the new connection). The engine follows the client's events: on a
//! `Connected` after a loss it flushes those `SUB`s to the socket and reports
//! `Resubscribed { gap: true }`. The connection is opened with `no_echo`, so the server does
//! not even send this node's publications back; the node id check stays as a second line.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use async_nats::{ConnectErrorKind, ConnectOptions, Event, ServerAddr, Subscriber};
use bytes::Bytes;
use futures_util::stream::{SelectAll, Stream, StreamExt};
use tokio::sync::mpsc;
use tokio::time::timeout;

use super::engine::{self, Change, Link, BATCH};
use super::{broker_log, invalid, redact, wire, BrokerConfig};

/// Commands (publications, mostly) the `async-nats` client buffers before `publish` waits.
const CLIENT_CAPACITY: usize = 2 * BATCH;

/// Checks that `async-nats` takes every server in `url`.
pub(super) fn validate(url: &str) -> std::io::Result<()> {
    for server in url.split(',') {
        let server = server.trim();
        let parsed: ServerAddr = server
            .parse()
            .map_err(|e| invalid(format!("invalid NATS URL {}: {e}", redact(server))))?;
        if parsed.is_websocket() {
            return Err(invalid(format!(
                "NATS URL {}: WebSocket transport is not enabled; use nats:// or tls://",
                redact(server)
            )));
        }
    }
    Ok(())
}

/// Connects (in the background if the first attempt cannot reach the server) and relays until
/// the handle is dropped.
pub(super) async fn run(config: BrokerConfig, url: String, mut link: Link) {
    let shown = redact(&url);
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let servers: Vec<ServerAddr> = url
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let client = match options(&config, &servers, &link, events_tx.clone())
        .connect(servers.clone())
        .await
    {
        Ok(client) => client,
        Err(e) => {
            let refused = matches!(
                e.kind(),
                ConnectErrorKind::Authentication | ConnectErrorKind::AuthorizationViolation
            );
            if refused {
                let message = format!("NATS at {shown} refused the connection: {e}");
                link.started(Err(std::io::Error::new(
                    std::io::ErrorKind::PermissionDenied,
                    message,
                )));
                return;
            }
            broker_log!(
                "cannot reach {shown}: {e}; retrying with backoff up to {:?}",
                config.retry_max
            );
            let background =
                options(&config, &servers, &link, events_tx).retry_on_initial_connect();
            match background.connect(servers).await {
                Ok(client) => client,
                Err(e) => {
                    // Only an invalid option ends up here; `validate` has ruled those out.
                    broker_log!("cannot start the NATS client for {shown}: {e}");
                    link.started(Ok(()));
                    return;
                }
            }
        }
    };
    link.started(Ok(()));

    let mut topics: SelectAll<TopicStream> = SelectAll::new();
    let mut batch = Vec::with_capacity(BATCH);
    let mut connected = false;
    let mut quiet = false;
    loop {
        tokio::select! {
            Some(event) = events.recv() => match event {
                Event::Connected => {
                    if connected {
                        continue;
                    }
                    connected = true;
                    quiet = false;
                    // After a reconnect the client has queued a SUB for every subscription;
                    // put them on the wire before telling the application.
                    let _ = timeout(config.request_timeout, client.flush()).await;
                    link.up();
                }
                Event::Disconnected => {
                    connected = false;
                    link.down();
                    broker_log!("lost {shown}; reconnecting");
                }
                // The client reports each failed reconnect attempt: one line per outage.
                Event::ClientError(_) if !connected && quiet => {}
                Event::ClientError(e) => {
                    quiet = !connected;
                    broker_log!("{shown}: client error: {e}");
                }
                Event::SlowConsumer(_) => {
                    broker_log!("NATS client dropped incoming messages: the engine fell behind");
                }
                Event::ServerError(e) => broker_log!("{shown}: server error: {e}"),
                _ => {}
            },
            Some((topic, message)) = topics.next() => {
                // A topic unsubscribed meanwhile may still have messages buffered.
                if let Some(topic) = link.live_topic(&topic) {
                    link.deliver(topic, message);
                }
            }
            Some(control) = link.control.recv() => match link.apply(control) {
                Some(Change::Subscribe(topic)) => {
                    let subject = wire::nats_subject(&config.prefix, &topic);
                    match client.subscribe(subject).await {
                        Ok(subscriber) => topics.push(TopicStream { topic, subscriber }),
                        // Fails only once the client is closed, which ends with the engine.
                        Err(e) => broker_log!("cannot subscribe to {topic:?}: {e}"),
                    }
                }
                Some(Change::Unsubscribe(topic)) => {
                    for stream in topics.iter_mut().filter(|s| s.topic == topic) {
                        // Sends UNSUB and closes the stream, which then leaves `topics`.
                        let _ = stream.subscriber.unsubscribe().await;
                    }
                }
                None => {}
            },
            // While the link is down publications wait in the queue, up to its bounds, as
            // with Redis, rather than in the client's buffer.
            taken = link.queue.recv_many(&mut batch, BATCH), if connected => {
                if taken == 0 {
                    return;
                }
                let mut sent = 0;
                let publishing = async {
                    for message in &batch {
                        let subject = wire::nats_subject(&config.prefix, &message.topic);
                        let bytes = wire::encode(link.node, &message.payload);
                        // Fails for a message above the server's max_payload: that one is lost.
                        if client.publish(subject, bytes).await.is_ok() {
                            sent += 1;
                        }
                    }
                };
                // A full client buffer (the server stopped reading) stalls the batch; after
                // the timeout what is left of it is dropped.
                let _ = timeout(config.request_timeout, publishing).await;
                link.settle(&mut batch, sent);
            }
        }
    }
}

/// The client options: credentials from the URL, this node's name, no echo, the configured
/// timeouts and backoff, and the client's events into `events`.
fn options(
    config: &BrokerConfig,
    servers: &[ServerAddr],
    link: &Link,
    events: mpsc::UnboundedSender<Event>,
) -> ConnectOptions {
    let (min, max, seed) = (config.retry_min, config.retry_max, link.node.get());
    let mut options = ConnectOptions::new();
    // async-nats does not take credentials from the URL: pass the first ones given.
    if let Some(server) = servers.iter().find(|s| s.username().is_some()) {
        let user = percent_decode(server.username().unwrap_or_default());
        options = match server.password() {
            Some(password) => options.user_and_password(user, percent_decode(password)),
            None => options.token(user),
        };
    }
    options
        .name(format!("ringsock-{}", link.node))
        .no_echo()
        .connection_timeout(config.connect_timeout)
        .ping_interval(config.ping_interval)
        .max_reconnects(None)
        // The client's own command buffer, beyond this engine's bounded queue: small, so the
        // queue's bounds are what a stalled server meets (the default is 2048 messages).
        .client_capacity(CLIENT_CAPACITY)
        .reconnect_delay_callback(move |attempts| {
            // `attempts` counts from 1; the first reconnect waits `min`.
            let attempt = u32::try_from(attempts.saturating_sub(1)).unwrap_or(u32::MAX);
            engine::delay(min, max, attempt, seed)
        })
        .event_callback(move |event| {
            let events = events.clone();
            async move {
                let _ = events.send(event);
            }
        })
}

/// `%XX` escapes in a URL's user or password, decoded (others are left as they are).
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok());
        match hex
            .filter(|_| bytes[i] == b'%')
            .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            Some(byte) => {
                out.push(byte);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One live topic's subscription, yielding (topic, wire bytes).
struct TopicStream {
    topic: Arc<str>,
    subscriber: Subscriber,
}

impl Stream for TopicStream {
    type Item = (Arc<str>, Bytes);

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let topic = self.topic.clone();
        self.subscriber
            .poll_next_unpin(cx)
            .map(|m| m.map(|m| (topic, m.payload)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_percent_escapes_in_credentials() {
        assert_eq!(percent_decode("p%40ss%3Aw%2fd"), "p@ss:w/d");
        assert_eq!(percent_decode("plain"), "plain");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
    }
}
