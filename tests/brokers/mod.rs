//! Broker servers for tests: `redis-server` and `nats-server` started on free loopback ports
//! and killed by PID when dropped, with what a test needs to look at them from outside (the
//! broker's own count of subscriptions, a configuration pointing at them). Used by
//! `tests/broker.rs` (the engines) and `tests/cluster.rs` (ringsock nodes in child processes).
//!
//! A missing server binary skips the test with one line on stderr, except under `CI=true`,
//! where it fails: CI installs both (`.ci/run`).
#![allow(dead_code)]

use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ringsock::broker::BrokerConfig;

/// How long any awaited condition may take before the test fails.
pub const PATIENCE: Duration = Duration::from_secs(15);

/// Which broker a scenario runs on.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Kind {
    #[cfg(feature = "redis")]
    Redis,
    /// Redis with `--cluster-enabled yes`, one node owning every slot: sharded pub/sub.
    #[cfg(feature = "redis")]
    RedisCluster,
    #[cfg(feature = "nats")]
    Nats,
}

/// A broker server process, killed (SIGKILL, by PID) on drop.
pub struct BrokerServer {
    pub kind: Kind,
    pub port: u16,
    /// The NATS monitoring port.
    pub monitor: u16,
    extra: Vec<String>,
    dir: PathBuf,
    child: Option<Child>,
}

impl BrokerServer {
    /// Starts a server of `kind` on a free port, or `None` (after one line) when its binary is
    /// not installed outside CI.
    pub fn start(kind: Kind) -> Option<BrokerServer> {
        BrokerServer::start_with(kind, &[])
    }

    /// As [`BrokerServer::start`], with extra command-line arguments.
    pub fn start_with(kind: Kind, extra: &[&str]) -> Option<BrokerServer> {
        let binary = kind.binary();
        if find_binary(binary).is_none() {
            if std::env::var_os("CI").is_some_and(|v| v != "false" && !v.is_empty()) {
                panic!("{binary} is required in CI (apt-get install {binary})");
            }
            eprintln!("skipped: {binary} is not installed (apt-get install {binary})");
            return None;
        }
        let dir = std::env::temp_dir().join(format!("ringsock-broker-test-{}", free_port()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let mut server = BrokerServer {
            kind,
            port: free_port(),
            monitor: free_port(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            dir,
            child: None,
        };
        server.spawn();
        Some(server)
    }

    /// A server that is not running yet, on a reserved port (for "broker absent at start").
    pub fn reserve(kind: Kind) -> Option<BrokerServer> {
        let mut server = BrokerServer::start(kind)?;
        server.kill();
        Some(server)
    }

    /// Starts the process (again, on the same ports) and waits until it answers.
    pub fn spawn(&mut self) {
        let port = self.port.to_string();
        let mut command = Command::new(find_binary(self.kind.binary()).expect("binary"));
        match self.kind {
            #[cfg(feature = "redis")]
            Kind::Redis | Kind::RedisCluster => {
                command.args([
                    "--port",
                    &port,
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ]);
                command.arg("--dir").arg(&self.dir);
                if self.kind == Kind::RedisCluster {
                    let _ = std::fs::remove_file(self.dir.join("nodes.conf"));
                    command.args([
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        "nodes.conf",
                    ]);
                }
            }
            #[cfg(feature = "nats")]
            Kind::Nats => {
                command.args([
                    "-p",
                    &port,
                    "-a",
                    "127.0.0.1",
                    "-m",
                    &self.monitor.to_string(),
                ]);
            }
        }
        command
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: prctl is async-signal-safe, so it may run between fork and exec. Should the
        // test process die without dropping this guard (killed by a signal), the kernel kills
        // the broker too. (The signal follows the death of the spawning thread: the test's.)
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        self.child = Some(command.spawn().expect("spawn broker server"));
        let deadline = Instant::now() + PATIENCE;
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "{:?} did not come up on {port}",
                self.kind
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        #[cfg(feature = "redis")]
        if self.kind == Kind::RedisCluster {
            let mut connection = self.redis();
            let _: () = ::redis::cmd("CLUSTER")
                .arg("ADDSLOTSRANGE")
                .arg(0)
                .arg(16383)
                .query(&mut connection)
                .expect("assign every slot");
            eventually("the one-node cluster is ok", || {
                let info: String = ::redis::cmd("CLUSTER")
                    .arg("INFO")
                    .query(&mut connection)
                    .unwrap();
                info.contains("cluster_state:ok")
            });
        }
    }

    /// Kills the process (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Sends `signal` (`STOP`, `CONT`) to the process.
    pub fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("running").id().to_string();
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &pid])
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{signal} {pid}");
    }

    pub fn url(&self) -> String {
        match self.kind {
            #[cfg(feature = "redis")]
            Kind::Redis | Kind::RedisCluster => format!("redis://127.0.0.1:{}", self.port),
            #[cfg(feature = "nats")]
            Kind::Nats => format!("nats://127.0.0.1:{}", self.port),
        }
    }

    /// A configuration for this server with quick retries, as tests want them.
    pub fn config(&self) -> BrokerConfig {
        config_for(self.kind, &self.url())
    }

    /// How many subscriptions the broker itself has on `topic`'s channel or subject.
    pub fn upstream_subscriptions(&self, topic: &str) -> usize {
        match self.kind {
            #[cfg(feature = "redis")]
            Kind::Redis | Kind::RedisCluster => {
                let which = if self.kind == Kind::Redis {
                    "NUMSUB"
                } else {
                    "SHARDNUMSUB"
                };
                let (_, count): (String, usize) = ::redis::cmd("PUBSUB")
                    .arg(which)
                    .arg(format!("ringsock:{topic}"))
                    .query(&mut self.redis())
                    .expect("PUBSUB NUMSUB");
                count
            }
            #[cfg(feature = "nats")]
            Kind::Nats => {
                // Topics in these tests are plain tokens, so the subject is the topic itself.
                let connz = http_get(self.monitor, "/connz?subs=1");
                connz.matches(&format!("\"ringsock.{topic}\"")).count()
            }
        }
    }

    /// A plain (synchronous) Redis connection for checking the broker's view.
    #[cfg(feature = "redis")]
    pub fn redis(&self) -> ::redis::Connection {
        let client = ::redis::Client::open(self.url()).expect("redis url");
        client
            .get_connection_with_timeout(Duration::from_secs(2))
            .expect("redis connection")
    }

    /// Waits until the broker has `count` subscriptions on `topic`.
    pub fn await_subscriptions(&self, topic: &str, count: usize) {
        eventually(
            &format!("{count} upstream subscriptions on {topic}"),
            || self.upstream_subscriptions(topic) == count,
        );
    }
}

impl Drop for BrokerServer {
    fn drop(&mut self) {
        if let Some(child) = &self.child {
            // A stopped process takes SIGKILL all the same; CONT lets it close its sockets.
            let _ = Command::new("kill")
                .args(["-CONT", &child.id().to_string()])
                .status();
        }
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Kind {
    pub fn binary(self) -> &'static str {
        match self {
            #[cfg(feature = "redis")]
            Kind::Redis | Kind::RedisCluster => "redis-server",
            #[cfg(feature = "nats")]
            Kind::Nats => "nats-server",
        }
    }
}

pub fn config_for(kind: Kind, url: &str) -> BrokerConfig {
    let mut config = match kind {
        #[cfg(feature = "redis")]
        Kind::Redis => BrokerConfig::redis(url),
        #[cfg(feature = "redis")]
        Kind::RedisCluster => BrokerConfig::redis_cluster(url),
        #[cfg(feature = "nats")]
        Kind::Nats => BrokerConfig::nats(url),
    }
    .expect("valid config");
    config.retry_max = Duration::from_millis(500);
    config
}

// ---- helpers ----

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `name` on `PATH` or in the sbin directories (Debian puts `nats-server` in `/usr/sbin`).
pub fn find_binary(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// Polls `done` until it holds; fails after [`PATIENCE`].
pub fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// This process's resident memory.
pub fn rss_bytes() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: usize = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

/// The body of `GET path` from the NATS monitoring port.
#[cfg(feature = "nats")]
pub fn http_get(port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("monitoring port");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").unwrap();
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .expect("monitoring response");
    assert!(
        response.starts_with("HTTP/1.0 200") || response.starts_with("HTTP/1.1 200"),
        "{response}"
    );
    response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default()
}
