//! A ringsock node in a child process, connected to a broker: what `tests/cluster.rs` runs two
//! or three of, so that each node has its own process, its own broker link and its own memory.
//!
//! The child is the test binary itself, re-run with `--exact node_process --ignored` and its
//! settings in `RINGSOCK_CLUSTER_NODE` (`key=value` pairs separated by commas; see
//! [`node_main`]). It prints `LISTENING <addr>` once it serves, `BROKER <notice>` for every
//! [`BrokerNotice`] (as `{:?}`: `Connected`, `Disconnected`, `Resubscribed { gap: true }`),
//! answers `stats` on stdin with one `STATS key=value ...` line, and shuts down gracefully
//! when its stdin closes. A failed start prints `FAILED <error>`.
//!
//! The node's handler, for text messages:
//!
//! * `sub:T` subscribes the connection to topic `T` and answers `subscribed:T`;
//! * `unsub:T` unsubscribes it and answers `unsubscribed:T`;
//! * `pub:T:payload` publishes `payload` (text) to `T`, and answers nothing;
//! * `shard` answers `shard:N`, the shard that owns the connection;
//! * anything else is echoed.
//!
//! A binary message that starts with `pub:T:` publishes the rest as a binary message (large
//! payloads without UTF-8 checks); any other binary message is echoed.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use ringsock::proto::handshake::Request;
use ringsock::server::{BrokerNotice, Builder, Decision, Handler, Message, Upgrade, Ws};

use crate::brokers::{config_for, Kind, PATIENCE};

/// The environment variable carrying a node's settings.
pub const NODE_ENV: &str = "RINGSOCK_CLUSTER_NODE";

/// A node's settings, written into [`NODE_ENV`].
#[derive(Clone, Debug)]
pub struct NodeSpec {
    pub kind: Kind,
    pub url: String,
    pub shards: usize,
    /// `BrokerConfig::max_queued_bytes`, if not the default.
    pub max_queued_bytes: Option<usize>,
    /// `BrokerConfig::request_timeout`, if not the default.
    pub request_timeout: Option<Duration>,
}

impl NodeSpec {
    /// Two shards on the broker at `url`, with the broker defaults the tests' `config_for`
    /// gives (quick reconnects).
    pub fn new(kind: Kind, url: &str) -> NodeSpec {
        NodeSpec {
            kind,
            url: url.to_owned(),
            shards: 2,
            max_queued_bytes: None,
            request_timeout: None,
        }
    }

    fn encode(&self) -> String {
        let mut spec = format!(
            "kind={},url={},shards={}",
            kind_name(self.kind),
            self.url,
            self.shards
        );
        if let Some(bytes) = self.max_queued_bytes {
            spec.push_str(&format!(",max_queued_bytes={bytes}"));
        }
        if let Some(timeout) = self.request_timeout {
            spec.push_str(&format!(",request_timeout_ms={}", timeout.as_millis()));
        }
        spec
    }
}

fn kind_name(kind: Kind) -> &'static str {
    match kind {
        #[cfg(feature = "redis")]
        Kind::Redis => "redis",
        #[cfg(feature = "redis")]
        Kind::RedisCluster => "redis-cluster",
        #[cfg(feature = "nats")]
        Kind::Nats => "nats",
    }
}

fn kind_from_name(name: &str) -> Kind {
    match name {
        #[cfg(feature = "redis")]
        "redis" => Kind::Redis,
        #[cfg(feature = "redis")]
        "redis-cluster" => Kind::RedisCluster,
        #[cfg(feature = "nats")]
        "nats" => Kind::Nats,
        other => panic!("unknown broker kind {other}"),
    }
}

/// What a node reports on `stats`: its connection count, its broker link's counters
/// (`ServerHandle::broker_stats`) and how many `pub:` commands its handler carried out.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeStats {
    pub connections: u64,
    pub published: u64,
    pub dropped: u64,
    pub received: u64,
    pub malformed: u64,
    pub reconnects: u64,
    pub queued_messages: u64,
    pub queued_bytes: u64,
    pub connected: bool,
    /// Publications the handler made (`pub:` commands).
    pub publishes: u64,
}

/// Everything a node printed, with a way to wait for lines.
#[derive(Default)]
struct Output {
    lines: Mutex<Vec<String>>,
    changed: Condvar,
    /// Whether stdout reached its end (the node exited).
    closed: Mutex<bool>,
}

/// A running node process, killed (SIGKILL, by PID) when dropped.
pub struct NodeProcess {
    child: Child,
    stdin: Option<ChildStdin>,
    output: Arc<Output>,
    stderr: Arc<Mutex<String>>,
    /// Where it listens.
    pub addr: SocketAddr,
    /// A name for messages (`A`, `B`, ...).
    pub name: String,
}

impl NodeProcess {
    /// Starts a node and waits until it listens; panics (with its stderr) if it does not.
    pub fn start(name: &str, spec: &NodeSpec) -> NodeProcess {
        NodeProcess::spawn(name, spec).listening()
    }

    /// Starts a node process without waiting for it (see [`NodeProcess::listening`]).
    pub fn spawn(name: &str, spec: &NodeSpec) -> NodeProcess {
        let exe = std::env::current_exe().expect("test binary path");
        let mut child = Command::new(exe)
            .args(["--exact", "node_process", "--ignored", "--nocapture"])
            .args(["--test-threads", "1"])
            .env(NODE_ENV, spec.encode())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn a node process");
        let output = Arc::new(Output::default());
        let stdout = child.stdout.take().expect("piped stdout");
        let sink = Arc::clone(&output);
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                sink.lines.lock().unwrap().push(line);
                sink.changed.notify_all();
            }
            *sink.closed.lock().unwrap() = true;
            let _guard = sink.lines.lock().unwrap();
            sink.changed.notify_all();
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let stderr_pipe = child.stderr.take().expect("piped stderr");
        let sink = Arc::clone(&stderr);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr_pipe).lines().map_while(Result::ok) {
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        let stdin = child.stdin.take();
        NodeProcess {
            child,
            stdin,
            output,
            stderr,
            addr: "0.0.0.0:0".parse().unwrap(),
            name: name.to_owned(),
        }
    }

    /// Waits until the node listens; panics (with its stderr) if it does not.
    pub fn listening(self) -> NodeProcess {
        let name = self.name.clone();
        match self.try_listening() {
            Ok(node) => node,
            Err((why, stderr)) => panic!("node {name} did not start: {why}\nstderr:\n{stderr}"),
        }
    }

    /// Waits until the node listens, or returns the `FAILED` line (or why there was none)
    /// and the node's stderr.
    pub fn try_listening(mut self) -> Result<NodeProcess, (String, String)> {
        // libtest may print `test node_process ... ` before the node's first line.
        let found = self.try_wait_line(Duration::from_secs(30), 0, |line| {
            after(line, "LISTENING ").is_some() || after(line, "FAILED ").is_some()
        });
        let Some(line) = found else {
            let _ = self.child.kill();
            let _ = self.child.wait();
            std::thread::sleep(Duration::from_millis(100));
            return Err(("no LISTENING line".into(), self.stderr()));
        };
        if let Some(why) = after(&line, "FAILED ") {
            let _ = self.child.wait();
            std::thread::sleep(Duration::from_millis(100));
            return Err((why.to_owned(), self.stderr()));
        }
        self.addr = after(&line, "LISTENING ")
            .unwrap()
            .trim()
            .parse()
            .expect("node address");
        Ok(self)
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident memory, KiB.
    pub fn rss_kib(&self) -> u64 {
        proc_status_kib(self.pid(), "VmRSS:")
    }

    /// Peak resident memory so far, KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        proc_status_kib(self.pid(), "VmHWM:")
    }

    /// Everything the node wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// The broker notices the node printed so far, in order (`Connected`, ...).
    pub fn notices(&self) -> Vec<String> {
        let lines = self.output.lines.lock().unwrap();
        lines
            .iter()
            .filter_map(|l| after(l, "BROKER "))
            .map(|n| n.trim().to_owned())
            .collect()
    }

    /// Waits until the notices so far satisfy `done`; panics after [`PATIENCE`].
    pub fn await_notices(&self, what: &str, done: impl Fn(&[String]) -> bool) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let notices = self.notices();
            if done(&notices) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "node {}: timed out waiting for {what}; notices: {notices:?}\nstderr:\n{}",
                self.name,
                self.stderr()
            );
            let lines = self.output.lines.lock().unwrap();
            let _ = self
                .output
                .changed
                .wait_timeout(lines, Duration::from_millis(50))
                .unwrap();
        }
    }

    /// Waits for the notice `notice` (`Connected`, ...) to have been printed `count` times.
    pub fn await_notice(&self, notice: &str, count: usize) {
        self.await_notices(&format!("{count} x {notice}"), |n| {
            n.iter().filter(|n| *n == notice).count() >= count
        });
    }

    /// The counters now.
    pub fn stats(&mut self) -> NodeStats {
        let from = self.output.lines.lock().unwrap().len();
        let stdin = self.stdin.as_mut().expect("node running");
        stdin.write_all(b"stats\n").expect("write to the node");
        stdin.flush().expect("flush to the node");
        let line = self
            .try_wait_line(PATIENCE, from, |l| after(l, "STATS ").is_some())
            .unwrap_or_else(|| panic!("node {}: no STATS line", self.name));
        let mut stats = NodeStats::default();
        for pair in after(&line, "STATS ").unwrap().split_whitespace() {
            let (key, value) = pair.split_once('=').expect("key=value");
            let number = || value.parse::<u64>().expect("a number");
            match key {
                "connections" => stats.connections = number(),
                "published" => stats.published = number(),
                "dropped" => stats.dropped = number(),
                "received" => stats.received = number(),
                "malformed" => stats.malformed = number(),
                "reconnects" => stats.reconnects = number(),
                "queued_messages" => stats.queued_messages = number(),
                "queued_bytes" => stats.queued_bytes = number(),
                "connected" => stats.connected = value == "true",
                "publishes" => stats.publishes = number(),
                _ => {}
            }
        }
        stats
    }

    /// Polls the counters until `done` holds for them; panics after [`PATIENCE`].
    pub fn await_stats(&mut self, what: &str, done: impl Fn(&NodeStats) -> bool) -> NodeStats {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let stats = self.stats();
            if done(&stats) {
                return stats;
            }
            assert!(
                Instant::now() < deadline,
                "node {}: timed out waiting for {what}; {stats:?}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The first line from index `from` on that satisfies `matches`, waiting at most `wait`.
    fn try_wait_line(
        &self,
        wait: Duration,
        from: usize,
        matches: impl Fn(&str) -> bool,
    ) -> Option<String> {
        let deadline = Instant::now() + wait;
        let mut lines = self.output.lines.lock().unwrap();
        loop {
            if let Some(line) = lines.iter().skip(from).find(|l| matches(l)) {
                return Some(line.clone());
            }
            if *self.output.closed.lock().unwrap() {
                return None;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            lines = self.output.changed.wait_timeout(lines, left).unwrap().0;
        }
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        // By PID, whatever state the test left it in.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// What follows `marker` in `line`.
fn after<'a>(line: &'a str, marker: &str) -> Option<&'a str> {
    line.find(marker).map(|i| &line[i + marker.len()..])
}

/// A `kB` field of `/proc/<pid>/status` (0 if missing).
fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

// ---- the child's side ----

/// The node's handler (see the module docs).
struct NodeHandler {
    publishes: Arc<AtomicU64>,
}

impl Handler for NodeHandler {
    type State = ();

    fn on_upgrade(&self, _: &Request<'_>, _: &mut Upgrade<()>) -> Decision<()> {
        Decision::Accept(())
    }

    fn on_message(&self, ws: &mut Ws<'_, ()>, msg: Message<'_>) {
        match msg {
            Message::Text(text) => {
                if let Some(topic) = text.strip_prefix("sub:") {
                    ws.subscribe(topic);
                    ws.send_text(&format!("subscribed:{topic}"));
                } else if let Some(topic) = text.strip_prefix("unsub:") {
                    ws.unsubscribe(topic);
                    ws.send_text(&format!("unsubscribed:{topic}"));
                } else if let Some((topic, payload)) =
                    text.strip_prefix("pub:").and_then(|r| r.split_once(':'))
                {
                    self.publishes.fetch_add(1, Ordering::Relaxed);
                    ws.publish(topic, Message::Text(payload));
                } else if text == "shard" {
                    let shard = ws.shard();
                    ws.send_text(&format!("shard:{shard}"));
                } else {
                    ws.send(msg);
                }
            }
            Message::Binary(bytes) => {
                let publication = bytes.strip_prefix(b"pub:").and_then(|rest| {
                    let colon = rest.iter().position(|&b| b == b':')?;
                    let topic = std::str::from_utf8(&rest[..colon]).ok()?;
                    Some((topic, &rest[colon + 1..]))
                });
                match publication {
                    Some((topic, payload)) => {
                        self.publishes.fetch_add(1, Ordering::Relaxed);
                        ws.publish(topic, Message::Binary(payload));
                    }
                    None => {
                        ws.send(msg);
                    }
                }
            }
        }
    }

    fn on_broker(&self, notice: BrokerNotice) {
        println!("BROKER {notice:?}");
    }
}

/// The child's body: reads its settings from [`NODE_ENV`] (returns at once without it),
/// starts the node, serves until stdin closes.
///
/// Settings: `kind` (`redis`, `redis-cluster`, `nats`), `url`, `shards`, `max_queued_bytes`,
/// `request_timeout_ms`.
pub fn node_main() {
    let Ok(spec) = std::env::var(NODE_ENV) else {
        return;
    };
    let mut settings = std::collections::HashMap::new();
    for pair in spec.split(',').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').expect("key=value");
        settings.insert(key.to_owned(), value.to_owned());
    }
    let kind = kind_from_name(&settings["kind"]);
    let mut config = config_for(kind, &settings["url"]);
    let number = |key: &str| settings.get(key).map(|v| v.parse::<usize>().expect(key));
    if let Some(bytes) = number("max_queued_bytes") {
        config.max_queued_bytes = bytes;
    }
    if let Some(ms) = number("request_timeout_ms") {
        config.request_timeout = Duration::from_millis(ms as u64);
    }
    let publishes = Arc::new(AtomicU64::new(0));
    let handler = NodeHandler {
        publishes: Arc::clone(&publishes),
    };
    let started = Builder::new()
        .addr("127.0.0.1:0")
        .shards(number("shards").unwrap_or(2))
        .pin_threads(false)
        .broker(config)
        .build(handler)
        .start();
    let handle = match started {
        Ok(handle) => handle,
        Err(e) => {
            println!("FAILED {e}");
            return;
        }
    };
    println!("LISTENING {}", handle.local_addr());
    for line in std::io::stdin().lock().lines().map_while(Result::ok) {
        if line.trim() == "stats" {
            let b = handle.broker_stats().expect("a broker is configured");
            println!(
                "STATS connections={} published={} dropped={} received={} malformed={} \
                 reconnects={} queued_messages={} queued_bytes={} connected={} publishes={}",
                handle.stats().total_connections(),
                b.published,
                b.dropped,
                b.received,
                b.malformed,
                b.reconnects,
                b.queued_messages,
                b.queued_bytes,
                b.connected,
                publishes.load(Ordering::Relaxed),
            );
        }
    }
    handle.shutdown().expect("clean shutdown");
    println!("STOPPED");
}
