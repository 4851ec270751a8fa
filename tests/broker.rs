//! The broker engines against real servers: `redis-server` and `nats-server`, started by each
//! test on free loopback ports and killed by PID when it ends. Each scenario runs on every
//! enabled engine (`redis::*`, `nats::*`), with two or three `Broker` handles standing in for
//! ringsock nodes. The servers come from `brokers/mod.rs`, shared with `tests/cluster.rs`.
//!
//! A missing server binary skips the test with one line on stderr, except under `CI=true`,
//! where it fails: CI installs both (`.ci/run`).
#![cfg(any(feature = "redis", feature = "nats"))]

mod brokers;

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use brokers::{
    config_for, eventually, free_port, rss_bytes, BrokerServer as Server, Kind, PATIENCE,
};
use bytes::Bytes;
use ringsock::broker::{Broker, BrokerConfig, BrokerEvent, NodeId};

/// A node on a broker server.
trait StartNode {
    /// A node on this server that records its events.
    fn node(&self) -> Node;
}

impl StartNode for Server {
    fn node(&self) -> Node {
        Node::start(self.config())
    }
}

/// A broker handle and what its callback saw.
struct Node {
    broker: Broker,
    events: Recorder,
}

impl Node {
    fn start(config: BrokerConfig) -> Node {
        let events = Recorder::default();
        let broker = Broker::start(config, NodeId::random(), events.callback()).expect("start");
        Node { broker, events }
    }

    fn await_connected(&self) {
        self.events
            .wait("Connected", |e| e.contains(&BrokerEvent::Connected));
    }
}

/// Every event one node's callback got, with a way to wait for them.
#[derive(Clone, Default)]
struct Recorder(Arc<(Mutex<Vec<BrokerEvent>>, Condvar)>);

impl Recorder {
    fn callback(&self) -> Box<dyn FnMut(BrokerEvent) + Send> {
        let recorder = self.clone();
        Box::new(move |event| {
            recorder.0 .0.lock().unwrap().push(event);
            recorder.0 .1.notify_all();
        })
    }

    fn events(&self) -> Vec<BrokerEvent> {
        self.0 .0.lock().unwrap().clone()
    }

    /// Waits until `done` holds for the events so far; fails after [`PATIENCE`].
    fn wait(&self, what: &str, done: impl Fn(&[BrokerEvent]) -> bool) {
        let deadline = Instant::now() + PATIENCE;
        let mut events = self.0 .0.lock().unwrap();
        while !done(&events) {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "timed out waiting for {what}; events: {:?}",
                *events
            );
            events = self.0 .1.wait_timeout(events, left).unwrap().0;
        }
    }

    /// The payloads received on `topic`, in order.
    fn messages(&self, topic: &str) -> Vec<Bytes> {
        self.events()
            .into_iter()
            .filter_map(|e| match e {
                BrokerEvent::Message { topic: t, payload } if &*t == topic => Some(payload),
                _ => None,
            })
            .collect()
    }

    fn count(&self, event: &BrokerEvent) -> usize {
        self.events().iter().filter(|e| *e == event).count()
    }
}

// ---- scenarios ----

/// One publish from node 1 reaches nodes 2 and 3 exactly once each, in order, and never comes
/// back to node 1.
fn publish_reaches_every_other_node_once(kind: Kind) {
    let Some(server) = Server::start(kind) else {
        return;
    };
    let nodes = [server.node(), server.node(), server.node()];
    for node in &nodes {
        node.await_connected();
        node.broker.subscribe("room");
    }
    server.await_subscriptions("room", 3);

    let sent: Vec<Bytes> = (0..50)
        .map(|i| Bytes::from(format!("message {i}")))
        .collect();
    for payload in &sent {
        assert!(nodes[0].broker.publish("room", payload.clone()));
    }
    for node in &nodes[1..] {
        node.events.wait("50 messages", |e| {
            e.iter()
                .filter(|e| matches!(e, BrokerEvent::Message { .. }))
                .count()
                >= 50
        });
    }
    // A moment for any duplicate or echo to show up.
    std::thread::sleep(Duration::from_millis(300));
    for node in &nodes[1..] {
        assert_eq!(node.events.messages("room"), sent);
        assert_eq!(node.broker.stats().received, 50);
    }
    assert!(
        nodes[0].events.messages("room").is_empty(),
        "own publications come back"
    );
    let stats = nodes[0].broker.stats();
    assert_eq!(
        (stats.published, stats.dropped, stats.received),
        (50, 0, 0),
        "{stats:?}"
    );
    assert!(stats.connected);
}

/// Unsubscribing removes the upstream subscription (in the broker's own view) and stops
/// delivery of that topic, not of others.
fn unsubscribe_removes_the_upstream_subscription(kind: Kind) {
    let Some(server) = Server::start(kind) else {
        return;
    };
    let (publisher, subscriber) = (server.node(), server.node());
    publisher.await_connected();
    subscriber.await_connected();
    subscriber.broker.subscribe("a");
    subscriber.broker.subscribe("b");
    server.await_subscriptions("a", 1);
    server.await_subscriptions("b", 1);

    subscriber.broker.unsubscribe("a");
    server.await_subscriptions("a", 0);
    assert_eq!(server.upstream_subscriptions("b"), 1);

    publisher
        .broker
        .publish("a", Bytes::from_static(b"to nobody"));
    publisher.broker.publish("b", Bytes::from_static(b"to b"));
    subscriber.events.wait("the message on b", |e| {
        e.iter().any(|e| matches!(e, BrokerEvent::Message { .. }))
    });
    std::thread::sleep(Duration::from_millis(200));
    assert!(subscriber.events.messages("a").is_empty());
    assert_eq!(
        subscriber.events.messages("b"),
        [Bytes::from_static(b"to b")]
    );
}

/// A broker killed and restarted on the same port: both nodes report the loss, reconnect,
/// resubscribe (the broker sees the subscription again), report the gap, and delivery resumes.
fn broker_restart_resubscribes_and_reports_the_gap(kind: Kind) {
    let Some(mut server) = Server::start(kind) else {
        return;
    };
    let (publisher, subscriber) = (server.node(), server.node());
    publisher.await_connected();
    subscriber.await_connected();
    subscriber.broker.subscribe("room");
    server.await_subscriptions("room", 1);
    publisher
        .broker
        .publish("room", Bytes::from_static(b"before"));
    subscriber.events.wait("the first message", |e| {
        e.iter().any(|e| matches!(e, BrokerEvent::Message { .. }))
    });

    server.kill();
    for node in [&publisher, &subscriber] {
        node.events
            .wait("Disconnected", |e| e.contains(&BrokerEvent::Disconnected));
        assert!(!node.broker.stats().connected);
    }
    std::thread::sleep(Duration::from_millis(300));
    server.spawn();
    for node in [&publisher, &subscriber] {
        node.events.wait("Resubscribed", |e| {
            e.contains(&BrokerEvent::Resubscribed { gap: true })
        });
        assert_eq!(node.events.count(&BrokerEvent::Connected), 2);
        assert_eq!(node.broker.stats().reconnects, 1);
        assert!(node.broker.stats().connected);
    }
    // The order of the events: Connected, Disconnected, Connected, Resubscribed.
    let links: Vec<BrokerEvent> = subscriber
        .events
        .events()
        .into_iter()
        .filter(|e| !matches!(e, BrokerEvent::Message { .. }))
        .collect();
    assert_eq!(
        links,
        [
            BrokerEvent::Connected,
            BrokerEvent::Disconnected,
            BrokerEvent::Connected,
            BrokerEvent::Resubscribed { gap: true }
        ]
    );
    server.await_subscriptions("room", 1);
    publisher
        .broker
        .publish("room", Bytes::from_static(b"after"));
    subscriber
        .events
        .wait("the message after the restart", |e| {
            e.contains(&BrokerEvent::Message {
                topic: "room".into(),
                payload: Bytes::from_static(b"after"),
            })
        });
    assert_eq!(
        subscriber.events.messages("room"),
        [&b"before"[..], b"after"]
    );
}

/// No broker when the nodes start: `start` succeeds at once, the engines keep trying, and
/// once the broker is up they connect, subscribe what was asked meanwhile, and deliver.
fn broker_absent_at_start_connects_later(kind: Kind) {
    let Some(mut server) = Server::reserve(kind) else {
        return;
    };
    let started = Instant::now();
    let (publisher, subscriber) = (server.node(), server.node());
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "start waited {:?}",
        started.elapsed()
    );
    subscriber.broker.subscribe("room");
    assert!(publisher
        .broker
        .publish("room", Bytes::from_static(b"queued while down")));
    std::thread::sleep(Duration::from_millis(600));
    assert!(!subscriber.broker.stats().connected);
    assert!(subscriber.events.events().is_empty());

    server.spawn();
    publisher.await_connected();
    subscriber.await_connected();
    server.await_subscriptions("room", 1);
    // The first connection is not a reconnect: no gap is reported.
    assert_eq!(
        subscriber
            .events
            .count(&BrokerEvent::Resubscribed { gap: true }),
        0
    );
    publisher
        .broker
        .publish("room", Bytes::from_static(b"hello"));
    subscriber.events.wait("the message", |e| {
        e.contains(&BrokerEvent::Message {
            topic: "room".into(),
            payload: Bytes::from_static(b"hello"),
        })
    });
}

/// A broker that stops reading (SIGSTOP): publications beyond the queue's bound are dropped
/// and counted, the queue and the process's memory stay bounded, and after SIGCONT delivery
/// resumes.
fn stalled_broker_drops_beyond_the_bound_and_recovers(kind: Kind) {
    const SIZE: usize = 16 * 1024;
    const OFFERED: usize = 20_000; // 320 MiB if nothing were dropped.
    let Some(server) = Server::start(kind) else {
        return;
    };
    let mut config = server.config();
    config.max_queued_messages = 1_000;
    config.max_queued_bytes = 64 << 20;
    // Long enough that the stall does not end in a reconnect; this test is about the queue.
    config.request_timeout = Duration::from_secs(60);
    let publisher = Node::start(config);
    let subscriber = server.node();
    publisher.await_connected();
    subscriber.await_connected();
    subscriber.broker.subscribe("room");
    subscriber.broker.subscribe("recovered");
    server.await_subscriptions("room", 1);
    server.await_subscriptions("recovered", 1);

    let rss_before = rss_bytes();
    server.signal("STOP");
    let mut accepted = 0;
    for i in 0..OFFERED {
        // A fresh allocation per message, so memory would grow if the queue did not bound it.
        let payload = Bytes::from(vec![(i % 251) as u8; SIZE]);
        if publisher.broker.publish("room", payload) {
            accepted += 1;
        }
        if i % 1000 == 999 {
            std::thread::sleep(Duration::from_millis(10)); // let the engine fill what it can
        }
    }
    let stats = publisher.broker.stats();
    let rss_growth = rss_bytes().saturating_sub(rss_before);
    eprintln!(
        "stalled broker: accepted {accepted} of {OFFERED}, {stats:?}, RSS +{} MiB",
        rss_growth >> 20
    );
    assert_eq!(stats.dropped as usize, OFFERED - accepted);
    assert!(stats.dropped > 10_000, "too little dropped: {stats:?}");
    assert!(stats.queued_messages <= 1_000, "{stats:?}");
    assert!(stats.queued_bytes <= 64 << 20, "{stats:?}");
    assert!(
        rss_growth < 200 << 20,
        "RSS grew by {} MiB",
        rss_growth >> 20
    );

    server.signal("CONT");
    // What was queued drains first; then a fresh message must come through.
    eventually("delivery after SIGCONT", || {
        publisher
            .broker
            .publish("recovered", Bytes::from_static(b"x"));
        !subscriber.events.messages("recovered").is_empty()
    });
    let received = subscriber.events.messages("room").len();
    assert!(
        received <= accepted,
        "received {received} of {accepted} accepted"
    );
    let stats = publisher.broker.stats();
    assert_eq!(stats.reconnects, 0, "{stats:?}");
}

/// A server that wants a password: a wrong one, or none, fails `start` with PermissionDenied
/// and a message that names the server but not the password; the right one connects.
fn refused_credentials_fail_start(kind: Kind) {
    let extra: &[&str] = match kind {
        #[cfg(feature = "redis")]
        Kind::Redis | Kind::RedisCluster => &["--requirepass", "s3cret"],
        #[cfg(feature = "nats")]
        Kind::Nats => &["--user", "ringsock", "--pass", "s3cret"],
    };
    let Some(server) = Server::start_with(kind, extra) else {
        return;
    };
    let port = server.port;
    let (wrong, none, right) = match kind {
        #[cfg(feature = "redis")]
        Kind::Redis | Kind::RedisCluster => (
            format!("redis://:wrong@127.0.0.1:{port}"),
            format!("redis://127.0.0.1:{port}"),
            format!("redis://:s3cret@127.0.0.1:{port}"),
        ),
        #[cfg(feature = "nats")]
        Kind::Nats => (
            format!("nats://ringsock:wrong@127.0.0.1:{port}"),
            format!("nats://127.0.0.1:{port}"),
            format!("nats://ringsock:s3cret@127.0.0.1:{port}"),
        ),
    };
    for url in [&wrong, &none] {
        let started = Instant::now();
        let err =
            Broker::start(config_for(kind, url), NodeId::random(), Box::new(|_| {})).unwrap_err();
        eprintln!("{url}: {err}");
        assert_eq!(
            err.kind(),
            std::io::ErrorKind::PermissionDenied,
            "{url}: {err}"
        );
        assert!(
            err.to_string().contains(&format!("127.0.0.1:{port}")),
            "{err}"
        );
        assert!(
            !err.to_string().contains("wrong"),
            "the password leaks: {err}"
        );
        assert!(started.elapsed() < Duration::from_secs(3));
    }
    let node = Node::start(config_for(kind, &right));
    node.await_connected();
}

/// With no broker to drain it, the queue takes publications up to its byte bound and its
/// message bound, whichever comes first, and drops and counts the rest. (Neither engine takes
/// from the queue while its link is down.)
fn queue_bounds_messages_and_bytes_while_the_broker_is_down(kind: Kind) {
    let url = match kind {
        #[cfg(feature = "redis")]
        Kind::Redis | Kind::RedisCluster => format!("redis://127.0.0.1:{}", free_port()),
        #[cfg(feature = "nats")]
        Kind::Nats => format!("nats://127.0.0.1:{}", free_port()),
    };
    let mut config = config_for(kind, &url);
    config.max_queued_messages = 100;
    config.max_queued_bytes = 10_000;
    let broker = Broker::start(config, NodeId::random(), Box::new(|_| {})).unwrap();
    // 1 + 999 bytes each: 10 fit the byte bound.
    let big: Vec<bool> = (0..20)
        .map(|_| broker.publish("t", Bytes::from(vec![0; 999])))
        .collect();
    assert!(
        big[..10].iter().all(|&ok| ok) && big[10..].iter().all(|&ok| !ok),
        "{big:?}"
    );
    let stats = broker.stats();
    assert_eq!(
        (stats.queued_messages, stats.queued_bytes, stats.dropped),
        (10, 10_000, 10)
    );
    assert!(
        !broker.publish("t", Bytes::from_static(b"x")),
        "one byte over the bound"
    );

    let mut config = config_for(kind, &url);
    config.max_queued_messages = 100;
    let broker = Broker::start(config, NodeId::random(), Box::new(|_| {})).unwrap();
    let accepted = (0..150)
        .filter(|_| broker.publish("t", Bytes::from_static(b"small")))
        .count();
    let stats = broker.stats();
    assert_eq!(
        (accepted, stats.queued_messages, stats.dropped),
        (100, 100, 50)
    );
    assert_eq!(stats.queued_bytes, 600);
}

// ---- each scenario on each enabled engine ----

macro_rules! on_engine {
    ($module:ident, $kind:expr, [$($scenario:ident),* $(,)?]) => {
        mod $module {
            $(
                #[test]
                fn $scenario() {
                    super::$scenario($kind)
                }
            )*
        }
    };
}

#[cfg(feature = "redis")]
on_engine!(
    redis,
    super::Kind::Redis,
    [
        publish_reaches_every_other_node_once,
        unsubscribe_removes_the_upstream_subscription,
        broker_restart_resubscribes_and_reports_the_gap,
        broker_absent_at_start_connects_later,
        stalled_broker_drops_beyond_the_bound_and_recovers,
        refused_credentials_fail_start,
        queue_bounds_messages_and_bytes_while_the_broker_is_down,
    ]
);

#[cfg(feature = "redis")]
on_engine!(
    redis_cluster,
    super::Kind::RedisCluster,
    [
        publish_reaches_every_other_node_once,
        unsubscribe_removes_the_upstream_subscription,
        broker_restart_resubscribes_and_reports_the_gap,
    ]
);

#[cfg(feature = "nats")]
on_engine!(
    nats,
    super::Kind::Nats,
    [
        publish_reaches_every_other_node_once,
        unsubscribe_removes_the_upstream_subscription,
        broker_restart_resubscribes_and_reports_the_gap,
        broker_absent_at_start_connects_later,
        stalled_broker_drops_beyond_the_bound_and_recovers,
        refused_credentials_fail_start,
        queue_bounds_messages_and_bytes_while_the_broker_is_down,
    ]
);

/// Malformed URLs and unknown schemes are refused before anything starts, with the URL (not
/// its password) in the message.
#[test]
fn bad_urls_are_clear_errors() {
    let mut bad = vec!["ftp://user:hunter2@example.com", "127.0.0.1:6379", ""];
    #[cfg(feature = "redis")]
    bad.extend(["redis://:hunter2@127.0.0.1:notaport", "redis://"]);
    #[cfg(feature = "nats")]
    bad.extend([
        "nats://user:hunter2@127.0.0.1:99999",
        "nats://127.0.0.1:4222 x",
    ]);
    for url in bad {
        let err = BrokerConfig::from_url(url).unwrap_err();
        eprintln!("{url:?}: {err}");
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput, "{url}");
        assert!(
            !err.to_string().contains("hunter2"),
            "the password leaks: {err}"
        );
    }
    #[cfg(feature = "nats")]
    assert!(BrokerConfig::nats("ws://127.0.0.1:8080")
        .unwrap_err()
        .to_string()
        .contains("WebSocket"));

    #[cfg(feature = "redis")]
    let mut config = BrokerConfig::from_url("redis://127.0.0.1:1").unwrap();
    #[cfg(not(feature = "redis"))]
    let mut config = BrokerConfig::from_url("nats://127.0.0.1:1").unwrap();
    config.prefix = "has space".to_owned();
    let err = Broker::start(config, NodeId::random(), Box::new(|_| {})).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
    assert!(err.to_string().contains("prefix"), "{err}");
}

/// A channel the broker's ACL denies: that publication is refused and counted as dropped, the
/// link stays up (no reconnect), and publications to allowed channels go on.
#[cfg(feature = "redis")]
#[test]
fn redis_acl_refusal_drops_the_publication_and_keeps_the_link() {
    let Some(server) = Server::start(Kind::Redis) else {
        return;
    };
    let _: () = ::redis::cmd("ACL")
        .arg(&["SETUSER", "default", "resetchannels", "&ringsock:allowed"])
        .query(&mut server.redis())
        .expect("ACL SETUSER");
    let (publisher, subscriber) = (server.node(), server.node());
    publisher.await_connected();
    subscriber.await_connected();
    subscriber.broker.subscribe("allowed");
    server.await_subscriptions("allowed", 1);

    publisher
        .broker
        .publish("denied", Bytes::from_static(b"refused"));
    eventually("the refusal to be counted", || {
        publisher.broker.stats().dropped == 1
    });
    publisher
        .broker
        .publish("allowed", Bytes::from_static(b"delivered"));
    subscriber.events.wait("the allowed message", |e| {
        e.iter().any(|e| matches!(e, BrokerEvent::Message { .. }))
    });
    assert_eq!(
        subscriber.events.messages("allowed"),
        [Bytes::from_static(b"delivered")]
    );
    // The subscriber may have it before the publisher has the broker's reply.
    eventually("the publication to be counted", || {
        publisher.broker.stats().published == 1
    });
    let stats = publisher.broker.stats();
    assert_eq!(
        (stats.published, stats.dropped, stats.reconnects),
        (1, 1, 0),
        "{stats:?}"
    );
    assert_eq!(publisher.events.events(), [BrokerEvent::Connected]);
}

/// Dropping a handle stops its engine thread even while the broker is unreachable.
#[test]
fn drop_joins_the_engine_thread() {
    #[cfg(feature = "redis")]
    let url = format!("redis://127.0.0.1:{}", free_port());
    #[cfg(not(feature = "redis"))]
    let url = format!("nats://127.0.0.1:{}", free_port());
    let threads = || std::fs::read_dir("/proc/self/task").unwrap().count();
    let before = threads();
    let broker = Broker::start(
        BrokerConfig::from_url(&url).unwrap(),
        NodeId::random(),
        Box::new(|_| {}),
    )
    .unwrap();
    broker.subscribe("t");
    broker.publish("t", Bytes::from_static(b"x"));
    std::thread::sleep(Duration::from_millis(200));
    let started = Instant::now();
    drop(broker);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "drop took {:?}",
        started.elapsed()
    );
    // Other tests start and stop threads meanwhile, so allow for them.
    eventually("the engine thread to be gone", || threads() <= before + 2);
}
