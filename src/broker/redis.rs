//! The Redis engine, on the `redis` crate's async API and the engine thread's tokio runtime.
//!
//! Plain pub/sub uses two connections, as Redis requires under RESP2: a dedicated pub/sub
//! connection for `SUBSCRIBE`/`UNSUBSCRIBE` and incoming messages, and a multiplexed one that
//! sends each batch of `PUBLISH`es as one pipeline. Sharded pub/sub (Redis Cluster) uses one
//! cluster connection over RESP3, which routes `SPUBLISH`/`SSUBSCRIBE` to the node that owns
//! each channel's slot and brings messages back as pushes.
//!
//! This engine owns reconnection: any failed request, timeout or closed connection ends the
//! session; the loop backs off, connects afresh, subscribes every live topic, and only then
//! reports the link up. It must never retry a publication (at-most-once).

use std::future::Future;

use ::redis::aio::{MultiplexedConnection, PubSubSink, PubSubStream};
use ::redis::cluster::ClusterClientBuilder;
use ::redis::cluster_async::ClusterConnection;
use ::redis::{
    AsyncConnectionConfig, Client, ErrorKind, Pipeline, ProtocolVersion, PushInfo, PushKind,
    RedisError, RedisResult, ServerErrorKind, Value,
};
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio::time::{timeout, Instant};

use super::engine::{Backoff, Change, Link, BATCH};
use super::{broker_log, invalid, redact, wire, BrokerConfig, Outbound};

/// Checks that the `redis` crate takes `url`.
pub(super) fn validate(url: &str, sharded: bool) -> std::io::Result<()> {
    let parsed = if sharded {
        ClusterClientBuilder::new(vec![url]).build().map(drop)
    } else {
        Client::open(url).map(drop)
    };
    parsed.map_err(|e| invalid(format!("invalid Redis URL {}: {e}", redact(url))))
}

/// Why a session ended or could not start.
enum Fault {
    Redis(RedisError),
    TimedOut(&'static str),
    Closed,
    /// The handle was dropped: the engine ends.
    Shutdown,
}

impl Fault {
    /// Whether the broker answered and refused us: wrong or missing credentials, or no
    /// permission. Everything else (refused connections, timeouts, a broker still loading)
    /// may pass by itself.
    fn is_refusal(&self) -> bool {
        let Fault::Redis(e) = self else { return false };
        matches!(
            e.kind(),
            ErrorKind::AuthenticationFailed | ErrorKind::Server(ServerErrorKind::NoPerm)
        ) || matches!(e.code(), Some("NOAUTH" | "WRONGPASS" | "NOPERM"))
    }
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fault::Redis(e) => write!(f, "{e}"),
            Fault::TimedOut(what) => write!(f, "{what} timed out"),
            Fault::Closed => f.write_str("connection closed"),
            Fault::Shutdown => f.write_str("shut down"),
        }
    }
}

impl From<RedisError> for Fault {
    fn from(e: RedisError) -> Fault {
        Fault::Redis(e)
    }
}

/// Connects, serves and reconnects until the handle is dropped.
pub(super) async fn run(config: BrokerConfig, url: String, sharded: bool, mut link: Link) {
    let shown = redact(&url);
    let mut backoff = Backoff::new(&config, link.node);
    let mut failing = false;
    loop {
        link.absorb_control();
        let attempt = Session::open(&config, &url, sharded, &link);
        let outcome = match timeout(config.connect_timeout, attempt).await {
            Ok(outcome) => outcome,
            Err(_) => Err(Fault::TimedOut("connecting")),
        };
        match outcome {
            Ok(session) => {
                link.started(Ok(()));
                failing = false;
                link.up();
                let since = Instant::now();
                let fault = session.serve(&config, &mut link).await;
                link.down();
                if let Fault::Shutdown = fault {
                    return;
                }
                broker_log!("lost {shown}: {fault}; reconnecting");
                // A session that lasted starts the delays afresh; one that ended at once (a
                // broker that takes connections and drops them) backs off like a failed attempt.
                if since.elapsed() >= config.retry_max {
                    backoff.reset();
                }
            }
            Err(fault) => {
                if fault.is_refusal() && link.is_starting() {
                    let message = format!("Redis at {shown} refused the connection: {fault}");
                    let refused =
                        std::io::Error::new(std::io::ErrorKind::PermissionDenied, message);
                    link.started(Err(refused));
                    return;
                }
                link.started(Ok(()));
                if !failing {
                    let most = config.retry_max;
                    broker_log!(
                        "cannot reach {shown}: {fault}; retrying with backoff up to {most:?}"
                    );
                    failing = true;
                }
            }
        }
        // Wait out the delay, keeping the live set current meanwhile.
        let until = Instant::now() + backoff.next_delay();
        while let Ok(Some(control)) = tokio::time::timeout_at(until, link.control.recv()).await {
            link.apply(control);
        }
    }
}

/// One connected session.
struct Session {
    inbound: Inbound,
    requests: Requests,
}

/// Where messages come in.
enum Inbound {
    Plain(PubSubStream),
    Cluster(mpsc::UnboundedReceiver<PushInfo>),
}

/// What became of a published batch.
struct Published {
    /// How many the broker took.
    sent: usize,
    /// Why it refused the others, when it did.
    refused: Option<RedisError>,
}

/// Where commands go out.
enum Requests {
    Plain {
        sink: PubSubSink,
        publisher: MultiplexedConnection,
    },
    Cluster(ClusterConnection),
}

impl Session {
    /// Connects and subscribes every live topic.
    async fn open(
        config: &BrokerConfig,
        url: &str,
        sharded: bool,
        link: &Link,
    ) -> Result<Session, Fault> {
        let channels: Vec<Vec<u8>> = link
            .live()
            .map(|t| wire::redis_channel(&config.prefix, t))
            .collect();
        if sharded {
            let (pushes, inbound) = mpsc::unbounded_channel();
            let client = ClusterClientBuilder::new(vec![url])
                .use_protocol(ProtocolVersion::RESP3)
                .push_sender(pushes)
                .connection_timeout(config.connect_timeout)
                .response_timeout(config.request_timeout)
                .build()?;
            let mut connection = client.get_async_connection().await?;
            // Asks for a reply from every primary, so refused credentials show here.
            ::redis::cmd("PING")
                .query_async::<Value>(&mut connection)
                .await?;
            // In a cluster, one SSUBSCRIBE may only name channels of one slot.
            for channel in &channels {
                connection.ssubscribe(channel).await?;
            }
            return Ok(Session {
                inbound: Inbound::Cluster(inbound),
                requests: Requests::Cluster(connection),
            });
        }
        let client = Client::open(url)?;
        let publisher_config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(config.connect_timeout))
            .set_response_timeout(Some(config.request_timeout));
        let mut publisher = client
            .get_multiplexed_async_connection_with_config(&publisher_config)
            .await?;
        // The first command: refused credentials or a missing password show here.
        ::redis::cmd("PING")
            .query_async::<Value>(&mut publisher)
            .await?;
        let (mut sink, stream) = client.get_async_pubsub().await?.split();
        for chunk in channels.chunks(512) {
            sink.subscribe(chunk).await?;
        }
        Ok(Session {
            inbound: Inbound::Plain(stream),
            requests: Requests::Plain { sink, publisher },
        })
    }

    /// Relays messages, subscription changes and publications until something fails.
    async fn serve(mut self, config: &BrokerConfig, link: &mut Link) -> Fault {
        let mut batch = Vec::with_capacity(BATCH);
        let mut ping =
            tokio::time::interval_at(Instant::now() + config.ping_interval, config.ping_interval);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut refusals = 0;
        loop {
            tokio::select! {
                message = self.inbound.next() => {
                    let (channel, payload) = match message {
                        Ok(Some(message)) => message,
                        Ok(None) => continue,
                        Err(fault) => return fault,
                    };
                    let name = wire::redis_topic(&config.prefix, &channel);
                    if let Some(topic) = name.and_then(|name| link.live_topic(name)) {
                        link.deliver(topic, payload);
                    }
                }
                Some(control) = link.control.recv() => {
                    let Some(change) = link.apply(control) else { continue };
                    let request = self.requests.change(&config.prefix, change);
                    match within("subscription change", config, request).await {
                        Ok(Ok(())) => {}
                        Ok(Err(refusal)) => log_refusal(&mut refusals, &refusal),
                        Err(fault) => return fault,
                    }
                }
                taken = link.queue.recv_many(&mut batch, BATCH) => {
                    if taken == 0 {
                        return Fault::Shutdown;
                    }
                    let request = self.requests.publish(&config.prefix, link, &batch);
                    match within("publish", config, request).await {
                        Ok(Ok(published)) => {
                            link.settle(&mut batch, published.sent);
                            if let Some(refusal) = published.refused {
                                log_refusal(&mut refusals, &refusal);
                            }
                        }
                        Ok(Err(refusal)) => {
                            link.settle(&mut batch, 0);
                            log_refusal(&mut refusals, &refusal);
                        }
                        Err(fault) => {
                            link.settle(&mut batch, 0);
                            return fault;
                        }
                    }
                }
                _ = ping.tick() => {
                    match within("ping", config, self.requests.ping()).await {
                        Ok(Ok(())) => {}
                        Ok(Err(refusal)) => log_refusal(&mut refusals, &refusal),
                        Err(fault) => return fault,
                    }
                }
            }
        }
    }
}

/// Awaits `request` for at most the request timeout. The outer error is the fault that ends
/// the session (a failed or silent connection); the inner one an error reply, the server
/// refusing this request (an ACL that denies the channel, say) on a connection that is fine.
async fn within<T>(
    what: &'static str,
    config: &BrokerConfig,
    request: impl Future<Output = RedisResult<T>>,
) -> Result<RedisResult<T>, Fault> {
    match timeout(config.request_timeout, request).await {
        Ok(Err(e)) if e.code().is_none() => Err(e.into()),
        Ok(answer) => Ok(answer),
        Err(_) => Err(Fault::TimedOut(what)),
    }
}

/// Logs the 1st, 2nd, 4th, 8th… refusal of a session, so a denied channel cannot flood the log.
fn log_refusal(refusals: &mut u64, refusal: &RedisError) {
    *refusals += 1;
    if refusals.is_power_of_two() {
        broker_log!("the broker refused a request ({refusals} so far): {refusal}");
    }
}

impl Inbound {
    /// The next message as (channel, wire bytes); `Ok(None)` for a push that is not one.
    async fn next(&mut self) -> Result<Option<(Vec<u8>, Bytes)>, Fault> {
        match self {
            Inbound::Plain(stream) => {
                let message = stream.next().await.ok_or(Fault::Closed)?;
                let channel = message.get_channel::<Vec<u8>>()?;
                Ok(Some((
                    channel,
                    Bytes::copy_from_slice(message.get_payload_bytes()),
                )))
            }
            Inbound::Cluster(pushes) => {
                let push = pushes.recv().await.ok_or(Fault::Closed)?;
                match push.kind {
                    PushKind::SMessage | PushKind::Message => {
                        let mut data = push.data.into_iter();
                        match (data.next(), data.next()) {
                            (
                                Some(Value::BulkString(channel)),
                                Some(Value::BulkString(payload)),
                            ) => Ok(Some((channel, Bytes::from(payload)))),
                            _ => Ok(None),
                        }
                    }
                    PushKind::Disconnection => Err(Fault::Closed),
                    _ => Ok(None),
                }
            }
        }
    }
}

impl Requests {
    /// Tells the broker about one subscription change.
    async fn change(&mut self, prefix: &str, change: Change) -> Result<(), RedisError> {
        match (self, change) {
            (Requests::Plain { sink, .. }, Change::Subscribe(topic)) => {
                sink.subscribe(wire::redis_channel(prefix, &topic)).await
            }
            (Requests::Plain { sink, .. }, Change::Unsubscribe(topic)) => {
                sink.unsubscribe(wire::redis_channel(prefix, &topic)).await
            }
            (Requests::Cluster(connection), Change::Subscribe(topic)) => {
                connection
                    .ssubscribe(wire::redis_channel(prefix, &topic))
                    .await
            }
            (Requests::Cluster(connection), Change::Unsubscribe(topic)) => {
                connection
                    .sunsubscribe(wire::redis_channel(prefix, &topic))
                    .await
            }
        }
    }

    /// Publishes a batch in order: one pipeline on a plain connection. A cluster connection
    /// takes a pipeline only within one slot, and reorders concurrent requests, so there each
    /// topic's share of the batch is one pipeline, and the topics' pipelines go concurrently.
    async fn publish(
        &mut self,
        prefix: &str,
        link: &Link,
        batch: &[Outbound],
    ) -> Result<Published, RedisError> {
        let add = |pipe: &mut Pipeline, command: &str, message: &Outbound| {
            let channel = wire::redis_channel(prefix, &message.topic);
            pipe.cmd(command)
                .arg(channel)
                .arg(&wire::encode(link.node, &message.payload)[..]);
        };
        // Every command's own result, so one refused command does not hide the others.
        let replies: Vec<RedisResult<Value>> = match self {
            Requests::Plain { publisher, .. } => {
                let mut pipe = ::redis::pipe();
                for message in batch {
                    add(&mut pipe, "PUBLISH", message);
                }
                pipe.ignore_errors().query_async(publisher).await?
            }
            Requests::Cluster(connection) => {
                let mut pipes: Vec<(&str, Pipeline)> = Vec::new();
                for message in batch {
                    let known = pipes
                        .iter()
                        .position(|(topic, _)| *topic == &*message.topic);
                    let i = known.unwrap_or_else(|| {
                        pipes.push((&message.topic, ::redis::pipe()));
                        pipes.len() - 1
                    });
                    add(&mut pipes[i].1, "SPUBLISH", message);
                }
                let requests = pipes.iter_mut().map(|(_, pipe)| {
                    let mut connection = connection.clone();
                    async move { pipe.ignore_errors().query_async(&mut connection).await }
                });
                let replies: Vec<Vec<RedisResult<Value>>> =
                    futures_util::future::try_join_all(requests).await?;
                replies.into_iter().flatten().collect()
            }
        };
        let sent = replies.iter().filter(|reply| reply.is_ok()).count();
        Ok(Published {
            sent,
            refused: replies.into_iter().find_map(Result::err),
        })
    }

    /// Checks that the broker still answers, on the connection that receives.
    async fn ping(&mut self) -> Result<(), RedisError> {
        match self {
            Requests::Plain { sink, .. } => sink.ping::<Value>().await.map(drop),
            Requests::Cluster(connection) => ::redis::cmd("PING")
                .query_async::<Value>(connection)
                .await
                .map(drop),
        }
    }
}
