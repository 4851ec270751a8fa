//! More than one ringsock node on one broker: two or three nodes, each in its own process
//! (the test binary re-run as `node_process`, see `cluster/node.rs`), on a `redis-server` or
//! `nats-server` started by the test on a free loopback port, with WebSocket clients on every
//! node. Each scenario runs on each enabled engine (`redis::*`, `nats::*`; the first two also
//! on sharded pub/sub, `redis_cluster::*`).
//!
//! What is checked from outside: what the clients receive, the broker's own count of
//! subscriptions (`PUBSUB NUMSUB` for Redis, the monitoring endpoint's `/connz?subs=1` for
//! NATS), the nodes' `BROKER` notices and `ServerHandle::broker_stats`, and a node's resident
//! memory. Every wait has a deadline; every process is killed by PID when its guard drops.
//!
//! A missing broker binary skips the test with one line on stderr, except under `CI=true`,
//! where it fails.
#![cfg(any(feature = "redis", feature = "nats"))]

mod brokers;
#[path = "cluster/client.rs"]
mod client;
#[path = "cluster/node.rs"]
mod node;

use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use brokers::{config_for, eventually, BrokerServer, Kind, PATIENCE};
use client::{Client, Incoming};
use node::{NodeProcess, NodeSpec};
use ringsock::broker::Engine;
use ringsock::proto::handshake::{HttpError, Request};
use ringsock::server::{Builder, Decision, Handler, Upgrade};

/// The node process (see `cluster/node.rs`); a no-op unless a test spawned it.
#[test]
#[ignore = "helper process: run by the other tests through cluster/node.rs"]
fn node_process() {
    node::node_main();
}

// ---- scenarios ----

/// A publication on one node reaches every subscriber on every node exactly once, in the
/// order its node published: the local subscribers through local fan-out, the others through
/// the broker, never both. Two publishers on two nodes at once; subscribers on both shards of
/// each of three nodes. Every node receives each message from the broker once, however many
/// local subscribers it has.
fn publish_reaches_every_subscriber_on_every_node_once_in_order(kind: Kind) {
    const MESSAGES: usize = 100;
    let Some(broker) = BrokerServer::start(kind) else {
        return;
    };
    let spec = NodeSpec::new(kind, &broker.url());
    let mut nodes = start_nodes(&[("A", &spec), ("B", &spec), ("C", &spec)]);
    let mut subscribers: Vec<Client> = nodes
        .iter()
        .flat_map(|node| clients_on_both_shards(node, 3))
        .collect();
    for subscriber in &mut subscribers {
        subscriber.subscribe("room");
    }
    broker.await_subscriptions("room", 3);

    let mut publisher_a = Client::connect(nodes[0].addr, "A");
    let mut publisher_b = Client::connect(nodes[1].addr, "B");
    for i in 0..MESSAGES {
        publisher_a.publish("room", &format!("A-{i}"));
        publisher_b.publish("room", &format!("B-{i}"));
    }
    let expected =
        |from: &str| -> Vec<String> { (0..MESSAGES).map(|i| format!("{from}-{i}")).collect() };
    for subscriber in &mut subscribers {
        let got = subscriber.expect_texts(2 * MESSAGES, "the publications");
        for from in ["A", "B"] {
            let mine: Vec<String> = got
                .iter()
                .filter(|m| m.starts_with(&format!("{from}-")))
                .cloned()
                .collect();
            assert_eq!(
                mine,
                expected(from),
                "a subscriber on node {} got {from}'s messages otherwise than once each in order",
                subscriber.node
            );
        }
    }
    // A quiet period for any late duplicate or echo to show up.
    std::thread::sleep(Duration::from_millis(500));
    for client in subscribers
        .iter_mut()
        .chain([&mut publisher_a, &mut publisher_b])
    {
        client.expect_silence(Duration::from_millis(20), "after the quiet period");
    }

    for (node, received) in nodes.iter_mut().zip([MESSAGES, MESSAGES, 2 * MESSAGES]) {
        let stats = node.stats();
        assert_eq!(
            (stats.received, stats.dropped, stats.malformed),
            (received as u64, 0, 0),
            "node {}: one message from the broker per publication, {stats:?}",
            node.name
        );
    }
    for (index, name) in [(0, "A"), (1, "B")] {
        let stats = nodes[index].await_stats("every publication acknowledged", |s| {
            s.published == MESSAGES as u64
        });
        assert_eq!(stats.publishes, MESSAGES as u64, "node {name}: {stats:?}");
    }
}

/// A node holds one upstream subscription per topic, in the broker's own view: it appears
/// with the first local subscriber (on either shard), stays while any is left, and goes when
/// the last one leaves, by unsubscribing or by closing its connection. A node without it
/// no longer receives the topic.
fn upstream_subscription_follows_first_and_last_local_subscriber(kind: Kind) {
    let Some(broker) = BrokerServer::start(kind) else {
        return;
    };
    let spec = NodeSpec::new(kind, &broker.url());
    let mut nodes = start_nodes(&[("A", &spec), ("B", &spec)]);
    let mut on_a = clients_on_both_shards(&nodes[0], 2);
    let mut second = on_a.pop().unwrap();
    let mut first = on_a.remove(0);
    assert_ne!(first.shard(), second.shard());
    let mut publisher = Client::connect(nodes[1].addr, "B");
    assert_eq!(broker.upstream_subscriptions("news"), 0);

    first.subscribe("news");
    broker.await_subscriptions("news", 1);
    second.subscribe("news");
    holds("one upstream subscription for two shards", || {
        broker.upstream_subscriptions("news") == 1
    });
    first.unsubscribe("news");
    holds("the subscription while a subscriber is left", || {
        broker.upstream_subscriptions("news") == 1
    });
    publisher.publish("news", "one");
    assert_eq!(second.expect_text("the message"), "one");
    first.expect_silence(Duration::from_millis(300), "after unsubscribing");

    second.close();
    broker.await_subscriptions("news", 0);
    publisher.publish("news", "two");
    std::thread::sleep(Duration::from_millis(300));
    first.expect_silence(Duration::from_millis(20), "with no subscription");
    let stats = nodes[0].stats();
    assert_eq!(stats.received, 1, "node A still hears the topic: {stats:?}");
}

/// Hundreds of sockets on one topic on one node are one upstream subscription, and one
/// message from the broker reaches all of them.
fn many_sockets_on_one_topic_are_one_upstream_subscription(kind: Kind) {
    const SOCKETS: usize = 200;
    let Some(broker) = BrokerServer::start(kind) else {
        return;
    };
    let spec = NodeSpec::new(kind, &broker.url());
    let mut nodes = start_nodes(&[("A", &spec), ("B", &spec)]);
    let mut crowd: Vec<Client> = (0..SOCKETS)
        .map(|_| {
            let mut client = Client::connect(nodes[0].addr, "A");
            client.subscribe("crowd");
            client
        })
        .collect();
    let mut on_b = Client::connect(nodes[1].addr, "B");
    on_b.subscribe("crowd");
    broker.await_subscriptions("crowd", 2);
    holds("one upstream subscription per node", || {
        broker.upstream_subscriptions("crowd") == 2
    });

    let mut publisher = Client::connect(nodes[1].addr, "B");
    publisher.publish("crowd", "hello");
    for client in crowd.iter_mut().chain([&mut on_b]) {
        assert_eq!(client.expect_text("the message"), "hello");
    }
    std::thread::sleep(Duration::from_millis(200));
    for client in &mut crowd {
        client.expect_silence(Duration::from_millis(1), "after the one message");
    }
    let stats = nodes[0].stats();
    assert_eq!(stats.received, 1, "{stats:?}");

    // All but one leave (their connections end): the node keeps its subscription.
    let last = crowd.pop().unwrap();
    drop(crowd);
    nodes[0].await_stats("the connections to close", |s| s.connections == 1);
    assert_eq!(broker.upstream_subscriptions("crowd"), 2);
    last.close();
    broker.await_subscriptions("crowd", 1);
}

/// The broker killed and restarted on the same port mid-run: every node reports the loss,
/// keeps serving its local subscribers meanwhile, reconnects, resubscribes and reports the
/// gap; then delivery across nodes resumes on the same client connections.
fn broker_restart_reports_the_gap_and_delivery_resumes(kind: Kind) {
    let Some(mut broker) = BrokerServer::start(kind) else {
        return;
    };
    let spec = NodeSpec::new(kind, &broker.url());
    let mut nodes = start_nodes(&[("A", &spec), ("B", &spec)]);
    let mut local = Client::connect(nodes[0].addr, "A");
    local.subscribe("room");
    let mut remote = clients_on_both_shards(&nodes[1], 2);
    for client in &mut remote {
        client.subscribe("room");
    }
    let mut publisher = Client::connect(nodes[0].addr, "A");
    broker.await_subscriptions("room", 2);
    publisher.publish("room", "before");
    for client in remote.iter_mut().chain([&mut local]) {
        assert_eq!(client.expect_text("the first message"), "before");
    }
    let connections: Vec<u64> = nodes.iter_mut().map(|n| n.stats().connections).collect();

    broker.kill();
    for node in &nodes {
        node.await_notice("Disconnected", 1);
    }
    // Local traffic does not need the broker.
    publisher.publish("room", "during");
    assert_eq!(local.expect_text("a local message"), "during");

    std::thread::sleep(Duration::from_millis(300));
    broker.spawn();
    let expected = [
        "Connected",
        "Disconnected",
        "Connected",
        "Resubscribed { gap: true }",
    ];
    for node in &mut nodes {
        node.await_notice("Resubscribed { gap: true }", 1);
        assert_eq!(node.notices(), expected, "node {}", node.name);
        let stats = node.stats();
        assert!(stats.connected && stats.reconnects == 1, "{stats:?}");
    }
    broker.await_subscriptions("room", 2);
    publisher.publish("room", "after");
    assert_eq!(local.expect_text("the message after the restart"), "after");
    for client in &mut remote {
        // "during" waited in node A's queue while the link was down: it may have reached the
        // broker after node B resubscribed, or not (at most once), but only before "after".
        let mut got = client.expect_text("the message after the restart");
        if got == "during" {
            got = client.expect_text("the message after the restart");
        }
        assert_eq!(got, "after", "node {}", client.node);
    }
    std::thread::sleep(Duration::from_millis(300));
    for client in remote.iter_mut().chain([&mut local]) {
        client.expect_silence(Duration::from_millis(20), "after the restart");
    }
    let now: Vec<u64> = nodes.iter_mut().map(|n| n.stats().connections).collect();
    assert_eq!(now, connections, "clients reconnected");
}

/// No broker when the nodes start: they start at once and serve publish/subscribe locally;
/// once the broker is up they connect (no gap notice: it is not a reconnect), subscribe what
/// their clients asked for meanwhile, and deliver across nodes.
fn broker_absent_at_start_nodes_serve_locally_then_connect(kind: Kind) {
    let Some(mut broker) = BrokerServer::reserve(kind) else {
        return;
    };
    let spec = NodeSpec::new(kind, &broker.url());
    let started = Instant::now();
    let mut nodes = start_nodes(&[("A", &spec), ("B", &spec)]);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the nodes took {:?} to start",
        started.elapsed()
    );
    let mut on_a = Client::connect(nodes[0].addr, "A");
    let mut on_b = Client::connect(nodes[1].addr, "B");
    on_a.subscribe("room");
    on_b.subscribe("room");
    let mut publisher_a = Client::connect(nodes[0].addr, "A");
    publisher_a.publish("room", "local");
    assert_eq!(on_a.expect_text("a local message"), "local");
    on_b.expect_silence(Duration::from_millis(300), "with no broker");
    for node in &mut nodes {
        assert!(node.notices().is_empty(), "{:?}", node.notices());
        assert!(!node.stats().connected);
    }

    broker.spawn();
    for node in &nodes {
        node.await_notice("Connected", 1);
    }
    broker.await_subscriptions("room", 2);
    publisher_a.publish("room", "across");
    assert_eq!(on_a.expect_text("the message"), "across");
    // "local" waited in node A's queue: it may have gone out once node A connected, and
    // reached node B if B had subscribed by then (at most once), but only before "across".
    let mut got = on_b.expect_text("the message");
    if got == "local" {
        got = on_b.expect_text("the message");
    }
    assert_eq!(got, "across");
    let mut publisher_b = Client::connect(nodes[1].addr, "B");
    publisher_b.publish("room", "back");
    assert_eq!(on_a.expect_text("the message from B"), "back");
    assert_eq!(on_b.expect_text("the message from B"), "back");
    for node in &nodes {
        assert_eq!(node.notices(), ["Connected"], "node {}", node.name);
    }
}

/// A broker that stops reading (SIGSTOP) while a node publishes far more than its queue
/// holds: the node's memory stays bounded, what does not fit is dropped and counted, its
/// local subscribers still get every message in order, and after SIGCONT delivery across
/// nodes resumes without a reconnect. In the end every publication is either published or
/// dropped.
fn stalled_broker_keeps_memory_bounded_counts_drops_and_recovers(kind: Kind) {
    const SIZE: usize = 64 * 1024;
    const OFFERED: usize = 3_000; // 188 MiB
    const QUEUE_BYTES: usize = 8 << 20;
    const GROWTH_LIMIT_KIB: u64 = 96 << 10;
    /// Publications the local subscriber may lag behind, well below a connection's cap.
    const WINDOW: usize = 8;
    let Some(broker) = BrokerServer::start(kind) else {
        return;
    };
    let spec = NodeSpec::new(kind, &broker.url());
    let mut spec_a = spec.clone();
    spec_a.max_queued_bytes = Some(QUEUE_BYTES);
    // Long enough that the stall does not end in a reconnect: this test is about the queue.
    spec_a.request_timeout = Some(Duration::from_secs(60));
    let mut nodes = start_nodes(&[("A", &spec_a), ("B", &spec)]);
    let mut local = Client::connect(nodes[0].addr, "A");
    local.subscribe("flood");
    let mut remote = Client::connect(nodes[1].addr, "B");
    remote.subscribe("flood");
    remote.subscribe("marker");
    broker.await_subscriptions("flood", 2);
    broker.await_subscriptions("marker", 1);
    let local = Collector::start(local);
    let remote = Collector::start(remote);

    let mut publisher = Client::connect(nodes[0].addr, "A");
    let mut seq = 0;
    let mut publish_next = |publisher: &mut Client| {
        let mut message = format!("pub:flood:{seq:08}").into_bytes();
        message.resize(SIZE, b'.');
        publisher.send_binary(&message);
        seq += 1;
    };
    // Warm up through the running broker, so the baseline has the buffers this traffic uses.
    for _ in 0..20 {
        publish_next(&mut publisher);
    }
    eventually("the warm-up messages", || {
        local.count() == 20 && remote.count() == 20
    });
    let rss_before = nodes[0].rss_kib();

    broker.signal("STOP");
    let mut rss_max = rss_before;
    let started = Instant::now();
    for i in 0..OFFERED {
        let deadline = Instant::now() + PATIENCE;
        while (20 + i).saturating_sub(local.count()) > WINDOW {
            assert!(Instant::now() < deadline, "the local subscriber stalled");
            std::thread::sleep(Duration::from_micros(200));
        }
        publish_next(&mut publisher);
        if i % 100 == 0 {
            rss_max = rss_max.max(nodes[0].rss_kib());
        }
    }
    eventually("every message at the local subscriber", || {
        local.count() == 20 + OFFERED
    });
    rss_max = rss_max.max(nodes[0].rss_kib());
    let stats = nodes[0].stats();
    let growth = rss_max.saturating_sub(rss_before);
    eprintln!(
        "{kind:?}: offered {OFFERED} x {} KiB in {:?} to a stopped broker: {stats:?}, \
         RSS +{} MiB",
        SIZE >> 10,
        started.elapsed(),
        growth >> 10
    );
    assert!(
        stats.dropped as usize > OFFERED / 2,
        "too little dropped: {stats:?}"
    );
    assert!(stats.queued_bytes as usize <= QUEUE_BYTES, "{stats:?}");
    assert!(
        growth < GROWTH_LIMIT_KIB,
        "RSS grew by {} MiB for {} MiB offered",
        growth >> 10,
        (OFFERED * SIZE) >> 20
    );
    assert_eq!(
        local.sequence(),
        (0..20 + OFFERED).collect::<Vec<_>>(),
        "the local subscriber missed or reordered messages"
    );

    broker.signal("CONT");
    // What was queued drains first; then a fresh message must come through.
    let mut markers = 0;
    eventually("delivery across nodes after SIGCONT", || {
        publisher.publish("marker", &format!("m{markers}"));
        markers += 1;
        remote.texts().iter().any(|t| t.starts_with('m'))
    });
    // The last marker may still be on its way through node A: wait for it too.
    let stats = nodes[0].await_stats("every publication published or dropped", |s| {
        s.queued_messages == 0 && s.queued_bytes == 0 && s.published + s.dropped == s.publishes
    });
    assert_eq!(stats.reconnects, 0, "{stats:?}");
    let across = remote.sequence();
    assert!(
        across.windows(2).all(|w| w[0] < w[1]),
        "messages across nodes out of order or twice"
    );
    assert!(across.len() as u64 <= stats.published, "{stats:?}");
}

/// A broker URL its engine cannot take fails `Server::start` with `InvalidInput`, naming the
/// URL without its password, and leaves the address free.
fn bad_broker_url_fails_server_start(kind: Kind) {
    let (bad, masked) = match kind {
        #[cfg(feature = "redis")]
        Kind::Redis | Kind::RedisCluster => (
            "redis://:hunter2@127.0.0.1:notaport",
            "redis://***@127.0.0.1:notaport",
        ),
        #[cfg(feature = "nats")]
        Kind::Nats => (
            "nats://user:hunter2@127.0.0.1:99999",
            "nats://***@127.0.0.1:99999",
        ),
    };
    let mut config = config_for(kind, &broker_url(kind, 1));
    config.engine = match kind {
        #[cfg(feature = "redis")]
        Kind::Redis | Kind::RedisCluster => Engine::Redis {
            url: bad.to_owned(),
            sharded: false,
        },
        #[cfg(feature = "nats")]
        Kind::Nats => Engine::Nats {
            url: bad.to_owned(),
        },
    };
    let port = port_no_client_takes();
    let err = Builder::new()
        .addr(("127.0.0.1", port))
        .shards(1)
        .pin_threads(false)
        .broker(config)
        .build(Refuse)
        .start()
        .map(|_| ())
        .unwrap_err();
    eprintln!("{bad}: {err}");
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput, "{err}");
    assert!(err.to_string().contains(masked), "{err}");
    assert!(!err.to_string().contains("hunter2"), "the password leaks");
    // Free once the server's listeners are closed. Other tests in this binary spawn processes
    // meanwhile: a child between its fork and its exec briefly holds a copy of every
    // descriptor (close-on-exec ones included), so allow a moment.
    let deadline = Instant::now() + Duration::from_secs(2);
    while let Err(e) = TcpListener::bind(("127.0.0.1", port)) {
        assert!(
            Instant::now() < deadline,
            "the address is free after the failure: {e}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A broker that refuses the credentials fails `Server::start` with `PermissionDenied`, at
/// once, naming the broker but not the password.
fn refused_credentials_fail_server_start(kind: Kind) {
    let extra: &[&str] = match kind {
        #[cfg(feature = "redis")]
        Kind::Redis | Kind::RedisCluster => &["--requirepass", "s3cret"],
        #[cfg(feature = "nats")]
        Kind::Nats => &["--user", "ringsock", "--pass", "s3cret"],
    };
    let Some(broker) = BrokerServer::start_with(kind, extra) else {
        return;
    };
    let wrong = match kind {
        #[cfg(feature = "redis")]
        Kind::Redis | Kind::RedisCluster => format!("redis://:wrong@127.0.0.1:{}", broker.port),
        #[cfg(feature = "nats")]
        Kind::Nats => format!("nats://ringsock:wrong@127.0.0.1:{}", broker.port),
    };
    let started = Instant::now();
    let err = Builder::new()
        .addr("127.0.0.1:0")
        .shards(1)
        .pin_threads(false)
        .broker(config_for(kind, &wrong))
        .build(Refuse)
        .start()
        .map(|_| ())
        .unwrap_err();
    eprintln!("{wrong}: {err}");
    assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied, "{err}");
    assert!(
        err.to_string()
            .contains(&format!("127.0.0.1:{}", broker.port)),
        "{err}"
    );
    assert!(!err.to_string().contains("wrong"), "the password leaks");
    assert!(started.elapsed() < Duration::from_secs(3));
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
        publish_reaches_every_subscriber_on_every_node_once_in_order,
        upstream_subscription_follows_first_and_last_local_subscriber,
        many_sockets_on_one_topic_are_one_upstream_subscription,
        broker_restart_reports_the_gap_and_delivery_resumes,
        broker_absent_at_start_nodes_serve_locally_then_connect,
        stalled_broker_keeps_memory_bounded_counts_drops_and_recovers,
        bad_broker_url_fails_server_start,
        refused_credentials_fail_server_start,
    ]
);

// Sharded pub/sub on a one-node Redis Cluster: delivery and node-level subscriptions.
#[cfg(feature = "redis")]
on_engine!(
    redis_cluster,
    super::Kind::RedisCluster,
    [
        publish_reaches_every_subscriber_on_every_node_once_in_order,
        upstream_subscription_follows_first_and_last_local_subscriber,
    ]
);

#[cfg(feature = "nats")]
on_engine!(
    nats,
    super::Kind::Nats,
    [
        publish_reaches_every_subscriber_on_every_node_once_in_order,
        upstream_subscription_follows_first_and_last_local_subscriber,
        many_sockets_on_one_topic_are_one_upstream_subscription,
        broker_restart_reports_the_gap_and_delivery_resumes,
        broker_absent_at_start_nodes_serve_locally_then_connect,
        stalled_broker_keeps_memory_bounded_counts_drops_and_recovers,
        bad_broker_url_fails_server_start,
        refused_credentials_fail_server_start,
    ]
);

// ---- helpers ----

/// A handler for servers that must not start.
struct Refuse;

impl Handler for Refuse {
    type State = ();

    fn on_upgrade(&self, _: &Request<'_>, _: &mut Upgrade<()>) -> Decision<()> {
        Decision::from(HttpError::Forbidden)
    }
}

/// A URL of `kind` on `port`.
fn broker_url(kind: Kind, port: u16) -> String {
    match kind {
        #[cfg(feature = "redis")]
        Kind::Redis | Kind::RedisCluster => format!("redis://127.0.0.1:{port}"),
        #[cfg(feature = "nats")]
        Kind::Nats => format!("nats://127.0.0.1:{port}"),
    }
}

/// A free port below the ephemeral range, so that no outgoing connection of a test running
/// meanwhile (the nodes' to their brokers, the clients') is given it.
fn port_no_client_takes() -> u16 {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range");
    let low: u16 = range
        .ok()
        .and_then(|r| r.split_whitespace().next().and_then(|n| n.parse().ok()))
        .unwrap_or(32768);
    // Tests in this binary run in parallel: each call starts past the ports handed out
    // before, so two tests never both find the same port free and race for it.
    static HANDED_OUT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);
    let offset = HANDED_OUT.fetch_add(50, std::sync::atomic::Ordering::Relaxed);
    let start = 10_000 + (std::process::id() % 5_000) as u16 + offset;
    (start..low)
        .find(|&port| TcpListener::bind(("127.0.0.1", port)).is_ok())
        .expect("a free port below the ephemeral range")
}

/// Starts the named nodes at once and waits until each listens.
fn start_nodes(specs: &[(&str, &NodeSpec)]) -> Vec<NodeProcess> {
    let starting: Vec<NodeProcess> = specs
        .iter()
        .map(|&(name, spec)| NodeProcess::spawn(name, spec))
        .collect();
    starting.into_iter().map(NodeProcess::listening).collect()
}

/// At least `min` clients of `node`, on both of its shards.
fn clients_on_both_shards(node: &NodeProcess, min: usize) -> Vec<Client> {
    let mut clients = Vec::new();
    let mut shards = [false; 2];
    for _ in 0..64 {
        let mut client = Client::connect(node.addr, &node.name);
        shards[client.shard()] = true;
        clients.push(client);
        if clients.len() >= min && shards == [true, true] {
            // The last one is on a shard none of the others is on.
            return clients;
        }
    }
    panic!("node {}: 64 connections all landed on one shard", node.name);
}

/// Asserts that `condition` holds now and keeps holding for a while.
fn holds(what: &str, condition: impl Fn() -> bool) {
    let until = Instant::now() + Duration::from_millis(300);
    while Instant::now() < until {
        assert!(condition(), "{what}: no longer holds");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Reads a client's messages on a thread of its own, so that the test can publish meanwhile:
/// text messages whole, binary ones (`pub:T:` publications of `NNNNNNNN....`) by their
/// sequence number.
struct Collector {
    texts: Arc<Mutex<Vec<String>>>,
    sequence: Arc<Mutex<Vec<usize>>>,
    count: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Collector {
    fn start(mut client: Client) -> Collector {
        let texts = Arc::new(Mutex::new(Vec::new()));
        let sequence = Arc::new(Mutex::new(Vec::new()));
        let count = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (texts, sequence, count, stop) = (
                Arc::clone(&texts),
                Arc::clone(&sequence),
                Arc::clone(&count),
                Arc::clone(&stop),
            );
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match client.recv_within(Duration::from_millis(50)) {
                        Some(Incoming::Text(text)) => texts.lock().unwrap().push(text),
                        Some(Incoming::Binary(bytes)) => {
                            let seq = std::str::from_utf8(&bytes[..8])
                                .ok()
                                .and_then(|s| s.parse().ok())
                                .expect("a sequence number");
                            sequence.lock().unwrap().push(seq);
                            count.fetch_add(1, Ordering::Relaxed);
                        }
                        None => {}
                    }
                }
            })
        };
        Collector {
            texts,
            sequence,
            count,
            stop,
            thread: Some(thread),
        }
    }

    /// Binary messages so far.
    fn count(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    /// The sequence numbers of the binary messages so far.
    fn sequence(&self) -> Vec<usize> {
        self.sequence.lock().unwrap().clone()
    }

    /// The text messages so far.
    fn texts(&self) -> Vec<String> {
        self.texts.lock().unwrap().clone()
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            // A reader that panicked already failed the test through its message.
            let _ = thread.join();
        }
    }
}
