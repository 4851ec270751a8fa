//! What applications program against: [`Builder`] and [`Config`] to set a server up,
//! [`Handler`] for the callbacks, [`Ws`] inside callbacks, [`Remote`] and [`ServerHandle`]
//! from other threads; [`systemd`] for running as a service.
//!
//! ```no_run
//! use ringsock::proto::handshake::{HttpError, Request};
//! use ringsock::server::{Decision, Builder, Handler, Message, Upgrade, Ws};
//!
//! struct Echo;
//!
//! impl Handler for Echo {
//!     type State = ();
//!     fn on_upgrade(&self, _: &Request<'_>, _: &mut Upgrade<()>) -> Decision<()> {
//!         Decision::Accept(())
//!     }
//!     fn on_message(&self, ws: &mut Ws<'_, ()>, msg: Message<'_>) {
//!         ws.send(msg);
//!     }
//! }
//!
//! Builder::new().addr("127.0.0.1:9001").build(Echo).run().unwrap();
//! ```

mod adapter;
#[cfg(any(feature = "redis", feature = "nats"))]
mod cluster;
mod config;
mod handler;
pub mod metrics;
pub mod systemd;
mod tls;
mod ws;

use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use self::adapter::HandlerApp;
pub use self::config::{Buffers, Config, DeflateConfig, Limits, ShardFailure, Timeouts};
pub use self::handler::{
    BrokerNotice, Decision, Handler, HttpResponse, Message, PendingUpgrade, Upgrade,
};
pub use self::tls::TlsConfig;
pub use self::ws::{Remote, Ws};
use crate::runtime::command::Command;
use crate::runtime::config::ShardConfig;
use crate::runtime::fleet::Fleet;
use crate::runtime::shard::Listener;
use crate::runtime::sys;
pub use crate::runtime::SendStatus;
pub use crate::runtime::{ByCloseCode, ByProtocolError, ByStatus, Metrics, Traffic};

/// Sets a server up. Every setting has a documented default (see [`Config`]).
#[derive(Clone, Debug, Default)]
pub struct Builder {
    config: Config,
    addr_error: Option<String>,
    /// A socket to serve on instead of binding `addr`, shared by every shard.
    listener: Option<Arc<OwnedFd>>,
    /// Why [`Builder::systemd_socket`] found no socket to serve on.
    listener_error: Option<String>,
    /// TLS on the main address.
    tls: Option<TlsConfig>,
    /// More addresses, with TLS.
    tls_addrs: Vec<(Result<SocketAddr, String>, TlsConfig)>,
    #[cfg(any(feature = "redis", feature = "nats"))]
    broker: Option<crate::broker::BrokerConfig>,
}

impl Builder {
    /// The defaults: `127.0.0.1:9001`, one shard per CPU.
    pub fn new() -> Builder {
        Builder::default()
    }

    /// The address to listen on (the first one it resolves to). Port 0 picks a free port
    /// for all shards; read it from [`ServerHandle::local_addr`]. Not used with
    /// [`Builder::listener`].
    pub fn addr(mut self, addr: impl ToSocketAddrs) -> Builder {
        match addr.to_socket_addrs().map(|mut a| a.next()) {
            Ok(Some(addr)) => {
                self.config.addr = addr;
                self.addr_error = None;
            }
            Ok(None) => self.addr_error = Some("address resolved to nothing".into()),
            Err(e) => self.addr_error = Some(e.to_string()),
        }
        self
    }

    /// Serves on `socket`, a listening TCP socket made elsewhere, instead of binding the
    /// address: every shard accepts from its own duplicate of it, so they share its one
    /// accept queue (where [`Builder::addr`] gives each shard its own `SO_REUSEPORT`
    /// socket). Leaving shards close their duplicates and never shut the socket down, so
    /// whoever else holds it (a service manager, say) can pass it on.
    pub fn listener(mut self, socket: OwnedFd) -> Builder {
        self.listener = Some(Arc::new(socket));
        self.listener_error = None;
        self
    }

    /// Serves on the socket systemd passed to this process (socket activation, see
    /// [`systemd`]): [`Builder::listener`] with the one socket [`systemd::listen_fds`] returns.
    /// [`Server::start`] fails, saying why, when there is none (whatever the address), more
    /// than one, or a malformed `LISTEN_*` variable. To bind an address when systemd passed
    /// nothing, call [`systemd::listen_fds`] and [`Builder::listener`] yourself.
    pub fn systemd_socket(mut self) -> Builder {
        let why = match systemd::listen_fds() {
            Ok(fds) if fds.len() <= 1 => match fds.into_iter().next() {
                Some(passed) => return self.listener(passed.fd),
                None => "no socket passed by systemd: LISTEN_PID and LISTEN_FDS do not name \
                         this process (no socket unit, or started by hand)"
                    .to_owned(),
            },
            Ok(fds) => {
                let names: Vec<&str> = fds.iter().map(|f| f.name.as_str()).collect();
                format!(
                    "systemd passed {} sockets ({}); ringsock serves one: pass it to \
                     Builder::listener",
                    fds.len(),
                    names.join(", ")
                )
            }
            Err(e) => e.to_string(),
        };
        self.listener_error = Some(why);
        self
    }

    /// Shard threads; 0 for one per CPU.
    pub fn shards(mut self, shards: usize) -> Builder {
        self.config.shards = shards;
        self
    }

    /// Whether to pin each shard to a CPU.
    pub fn pin_threads(mut self, pin: bool) -> Builder {
        self.config.pin_threads = pin;
        self
    }

    /// permessage-deflate policy.
    pub fn deflate(mut self, deflate: DeflateConfig) -> Builder {
        self.config.deflate = deflate;
        self
    }

    /// The largest message accepted (after reassembly and inflation).
    pub fn max_message_size(mut self, bytes: usize) -> Builder {
        self.config.limits.max_message_size = bytes;
        self
    }

    /// The largest frame payload accepted.
    pub fn max_frame_size(mut self, bytes: usize) -> Builder {
        self.config.limits.max_frame_size = bytes;
        self
    }

    /// Deliver messages that do not arrive whole in one read piece by piece to
    /// [`Handler::on_fragment`] instead of reassembling them (default off).
    pub fn stream_messages(mut self, on: bool) -> Builder {
        self.config.limits.stream_messages = on;
        self
    }

    /// Connections per shard before new ones get a 503.
    pub fn max_connections_per_shard(mut self, n: usize) -> Builder {
        self.config.limits.max_connections_per_shard = n;
        self
    }

    /// The per-connection high-water mark for queued output.
    pub fn high_water_mark(mut self, bytes: usize) -> Builder {
        self.config.buffers.high_water_mark = bytes;
        self
    }

    /// How long publications may wait in subscribers' outputs for more to join them
    /// ([`Buffers::publish_linger`]). Default zero: each goes out at the end of its round.
    pub fn publish_linger(mut self, linger: Duration) -> Builder {
        self.config.buffers.publish_linger = linger;
        self
    }

    /// Join another process's listeners on the same address instead of failing with
    /// `AddrInUse` (see [`Config::share_address`]): the new process of a restart that
    /// loses nothing.
    pub fn share_address(mut self, share: bool) -> Builder {
        self.config.share_address = share;
        self
    }

    /// The handshake timeout.
    pub fn handshake_timeout(mut self, timeout: Duration) -> Builder {
        self.config.timeouts.handshake = timeout;
        self
    }

    /// The idle timeout (`None` to disable) and whether to ping at half of it.
    pub fn idle_timeout(mut self, timeout: Option<Duration>, auto_ping: bool) -> Builder {
        self.config.timeouts.idle = timeout;
        self.config.timeouts.auto_ping = auto_ping;
        self
    }

    /// The close-handshake timeout (also bounds graceful shutdown).
    pub fn close_timeout(mut self, timeout: Duration) -> Builder {
        self.config.timeouts.close = timeout;
        self
    }

    /// What to do when a shard fails (see [`ShardFailure`]).
    pub fn on_shard_failure(mut self, policy: ShardFailure) -> Builder {
        self.config.on_shard_failure = policy;
        self
    }

    /// Connects this server to a broker, so `publish` reaches the subscribers of every node
    /// on it (features `redis`, `nats`; see "Running more than one node" in the README).
    /// Without one, publish/subscribe stays within this process and costs nothing more.
    #[cfg(any(feature = "redis", feature = "nats"))]
    pub fn broker(mut self, config: crate::broker::BrokerConfig) -> Builder {
        self.broker = Some(config);
        self
    }

    /// Serves `wss://` instead of `ws://` on the main address (or the given listener): every
    /// connection starts with a TLS handshake, bounded by the handshake timeout.
    pub fn tls(mut self, config: TlsConfig) -> Builder {
        self.tls = Some(config);
        self
    }

    /// Also listens on `addr` for `wss://`, next to the main address (port 0 picks a free
    /// port; see [`ServerHandle::tls_addr`]). Every shard accepts on both.
    pub fn tls_addr(mut self, addr: impl ToSocketAddrs, config: TlsConfig) -> Builder {
        let resolved = match addr.to_socket_addrs().map(|mut a| a.next()) {
            Ok(Some(addr)) => Ok(addr),
            Ok(None) => Err("the TLS address resolves to nothing".to_owned()),
            Err(e) => Err(format!("bad TLS address: {e}")),
        };
        self.tls_addrs.push((resolved, config));
        self
    }

    /// Serves the Prometheus text format at `path` (e.g. `/metrics`) on the server's own
    /// address (see [`Config::metrics_path`]).
    pub fn metrics_path(mut self, path: &str) -> Builder {
        self.config.metrics_path = Some(path.to_owned());
        self
    }

    /// Any other setting.
    pub fn configure(mut self, f: impl FnOnce(&mut Config)) -> Builder {
        f(&mut self.config);
        self
    }

    /// The configuration so far.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// A server for this handler.
    pub fn build<H: Handler>(self, handler: H) -> Server<H> {
        let metrics_path = self.config.metrics_path.clone();
        Server {
            builder: self,
            app: Arc::new(HandlerApp {
                handler,
                metrics_path,
                mailboxes: std::sync::OnceLock::new(),
            }),
        }
    }
}

/// A configured server, not yet started.
pub struct Server<H: Handler> {
    builder: Builder,
    app: Arc<HandlerApp<H>>,
}

impl<H: Handler> Server<H> {
    /// Binds, starts the shards in background threads and returns once every shard is up.
    /// Under systemd (`NOTIFY_SOCKET` set) it then sends `READY=1`, and starts the watchdog
    /// when `WATCHDOG_USEC` asks for one (see [`systemd`]).
    ///
    /// # Errors
    /// A bad address, bind failures, a given listener that is not a listening TCP socket,
    /// a malformed systemd variable, or io_uring unavailable (the message names the cause).
    pub fn start(self) -> io::Result<ServerHandle> {
        let b = &self.builder;
        // The address is not used with a listener.
        let unusable = b
            .listener_error
            .as_ref()
            .or(b.addr_error.as_ref().filter(|_| b.listener.is_none()));
        if let Some(e) = unusable {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, e.clone()));
        }
        // A bad broker configuration is reported as such before anything is bound, not
        // masked by a bind failure (and without taking the address meanwhile).
        #[cfg(any(feature = "redis", feature = "nats"))]
        if let Some(broker) = &b.broker {
            broker.validate()?;
        }
        let config = self.builder.config;
        let cpus = sys::allowed_cpus();
        let count = if config.shards == 0 {
            cpus.len().max(1)
        } else {
            config.shards
        };
        let mut service = systemd::Service::from_env()?;
        let main = match &self.builder.listener {
            Some(socket) => share(socket, count)?,
            None => bind_all(&config, config.addr, count)?,
        };
        let local_addr = sys::local_addr(main[0].as_raw_fd())?;
        let tls = self.builder.tls.as_ref().map(|t| Arc::clone(&t.rustls));
        let mut listeners: Vec<Vec<Listener>> = main
            .into_iter()
            .map(|fd| {
                let tls = tls.clone();
                vec![Listener { fd, tls }]
            })
            .collect();
        let mut tls_addr = None;
        for (addr, tls) in &self.builder.tls_addrs {
            let addr = addr
                .clone()
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
            let sockets = bind_all(&config, addr, count)?;
            tls_addr.get_or_insert(sys::local_addr(sockets[0].as_raw_fd())?);
            for (shard, fd) in listeners.iter_mut().zip(sockets) {
                let tls = Some(Arc::clone(&tls.rustls));
                shard.push(Listener { fd, tls });
            }
        }
        let pins = (0..count)
            .map(|i| (config.pin_threads && !cpus.is_empty()).then(|| cpus[i % cpus.len()]))
            .collect();
        let shard_config = ShardConfig {
            limits: config.limits,
            timeouts: config.timeouts,
            buffers: config.buffers,
            deflate: config.deflate,
            on_failure: config.on_shard_failure,
            shared_listener: self.builder.listener.is_some(),
            max_tick: service.max_tick(),
            hooks: config.testing,
        };
        #[cfg(any(feature = "redis", feature = "nats"))]
        let cluster = match self.builder.broker {
            Some(broker) => Some(cluster::Cluster::start(
                broker,
                count,
                Arc::clone(&self.app),
            )?),
            None => None,
        };
        #[cfg(any(feature = "redis", feature = "nats"))]
        let uplink = cluster
            .clone()
            .map(|c| c as Arc<dyn crate::runtime::pubsub::Uplink>);
        #[cfg(not(any(feature = "redis", feature = "nats")))]
        let uplink = None;
        let app = Arc::clone(&self.app);
        let fleet = Fleet::start(self.app, shard_config, listeners, pins, uplink)?;
        let _ = app.mailboxes.set(Arc::clone(fleet.mailboxes()));
        #[cfg(any(feature = "redis", feature = "nats"))]
        if let Some(cluster) = &cluster {
            cluster.attach(fleet.mailboxes());
        }
        if let Err(e) = service.ready(fleet.mailboxes()) {
            fleet.request_shutdown();
            let _ = fleet.wait();
            return Err(e);
        }
        Ok(ServerHandle {
            inner: Arc::new(Inner {
                fleet,
                local_addr,
                tls_addr,
                service,
                #[cfg(any(feature = "redis", feature = "nats"))]
                cluster,
            }),
        })
    }

    /// Starts and blocks until shutdown; SIGINT and SIGTERM shut down gracefully. Prints
    /// nothing; use [`Server::start`] and [`ServerHandle::local_addr`] to report the address.
    ///
    /// # Errors
    /// As [`Server::start`]; and when a shard failed (see [`ShardFailure`]), so that a
    /// `main` returning this error exits non-zero and a supervisor restarts it.
    pub fn run(self) -> io::Result<()> {
        let handle = self.start()?;
        handle.run_until_signal()
    }
}

fn bind_all(config: &Config, addr: SocketAddr, count: usize) -> io::Result<Vec<OwnedFd>> {
    if addr.port() != 0 && !config.share_address {
        sys::ensure_free(&addr)
            .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))?;
    }
    let first = sys::listen(&addr, config.backlog)?;
    // Port 0: the others bind the port the first one got.
    let addr = sys::local_addr(first.as_raw_fd())?;
    let mut sockets = vec![first];
    for _ in 1..count {
        sockets.push(sys::listen(&addr, config.backlog)?);
    }
    Ok(sockets)
}

/// Duplicates of a given listener, one per shard.
fn share(socket: &OwnedFd, count: usize) -> io::Result<Vec<OwnedFd>> {
    systemd::check_listening(socket.as_raw_fd())
        .and_then(|()| sys::local_addr(socket.as_raw_fd()).map(drop))
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("the given listener is not a listening TCP socket: {e}"),
            )
        })?;
    (0..count).map(|_| socket.try_clone()).collect()
}

struct Inner {
    fleet: Fleet,
    local_addr: SocketAddr,
    /// The first extra TLS address ([`Builder::tls_addr`]).
    tls_addr: Option<SocketAddr>,
    /// What the service manager is told.
    service: systemd::Service,
    /// The link to other nodes, with a broker configured.
    #[cfg(any(feature = "redis", feature = "nats"))]
    cluster: Option<Arc<cluster::Cluster>>,
}

/// A `Send + Clone` handle to a running server: address, stats, broadcast, shutdown.
#[derive(Clone)]
pub struct ServerHandle {
    inner: Arc<Inner>,
}

/// Counters of a running server.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Live connections per shard (handshaking, open and closing).
    pub connections: Vec<usize>,
    /// Handler callbacks that panicked (each closed its connection), over all shards.
    pub handler_panics: u64,
    /// Requests from other threads refused because a shard's queue was full (a `Remote`
    /// got `QueueFull`, or a publish or broadcast missed that shard).
    pub commands_refused: u64,
    /// Publications not delivered to a subscriber because its output was over the hard cap
    /// ([`Buffers::max_buffered`]): it had not been reading.
    pub publish_skipped: u64,
}

impl Stats {
    /// Live connections over all shards.
    pub fn total_connections(&self) -> usize {
        self.connections.iter().sum()
    }
}

impl ServerHandle {
    /// The address the server listens on (with the real port when bound to port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.local_addr
    }

    /// Where the first [`Builder::tls_addr`] listener listens (with its real port).
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.inner.tls_addr
    }

    /// The number of shards.
    pub fn shards(&self) -> usize {
        self.inner.fleet.mailboxes().len()
    }

    /// Live connection counts and fault counters.
    pub fn stats(&self) -> Stats {
        let mailboxes = self.inner.fleet.mailboxes();
        Stats {
            connections: mailboxes.iter().map(|m| m.connections()).collect(),
            handler_panics: mailboxes.iter().map(|m| m.handler_panics()).sum(),
            commands_refused: mailboxes.iter().map(|m| m.refused()).sum(),
            publish_skipped: mailboxes.iter().map(|m| m.fanout_skipped()).sum(),
        }
    }

    /// Every counter, summed over the shards: each shard copies its own counters when asked
    /// (this waits up to a second for each; a stopped shard contributes its last copy).
    /// Close codes are counted when a connection is freed.
    pub fn metrics(&self) -> Metrics {
        let mailboxes = self.inner.fleet.mailboxes();
        let (done, copied) = std::sync::mpsc::channel();
        let asked = mailboxes
            .iter()
            .filter(|m| {
                let done = done.clone();
                m.post(Command::Report { done }) == crate::runtime::command::Posted::Queued
            })
            .count();
        let deadline = std::time::Instant::now() + Duration::from_secs(1);
        for _ in 0..asked {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if copied.recv_timeout(left).is_err() {
                break;
            }
        }
        metrics::last_published(mailboxes)
    }

    /// [`ServerHandle::metrics`] in the Prometheus text format (see [`metrics::encode`]).
    pub fn metrics_text(&self) -> String {
        metrics::encode(&self.metrics())
    }

    /// Sends a message to every subscriber of `topic` on every shard (encoded once), and on
    /// every other node with a broker configured. Shards whose command queue is full miss it:
    /// the result counts the local shards that took it.
    pub fn publish(&self, topic: &str, msg: Message<'_>) -> usize {
        let frame = ws::encode_shared(msg);
        let topic: Arc<str> = Arc::from(topic);
        #[cfg(any(feature = "redis", feature = "nats"))]
        if let Some(cluster) = &self.inner.cluster {
            use crate::runtime::pubsub::Uplink;
            cluster.publish(&topic, &frame);
        }
        self.inner.fleet.post_all(|| Command::Publish {
            topic: Arc::clone(&topic),
            frame: frame.clone(),
        })
    }

    /// Sends a message to every open connection (encoded once); the result counts the
    /// shards that took it (see [`ServerHandle::publish`]).
    pub fn broadcast(&self, msg: Message<'_>) -> usize {
        let frame = ws::encode_shared(msg);
        self.inner.fleet.post_all(|| Command::Broadcast {
            frame: frame.clone(),
        })
    }

    /// Asks every shard to shut down gracefully and returns at once: accepting stops, every
    /// connection gets close 1001 after its queued output (one already accepted but still in
    /// its handshake is upgraded first, then closed the same way), messages its peer sent
    /// before answering are still delivered, and shards exit once their connections closed
    /// or the close timeout passed. Under systemd, the first request sends `STOPPING=1`. See
    /// the README's "Restarts" for a restart that loses nothing.
    pub fn request_shutdown(&self) {
        self.inner.service.stopping();
        self.inner.fleet.request_shutdown();
    }

    /// Shuts down gracefully and waits for every shard to exit.
    ///
    /// Do not call this from a handler callback: the shard would wait for itself. Use
    /// [`ServerHandle::request_shutdown`] there.
    ///
    /// # Errors
    /// As [`ServerHandle::wait`].
    pub fn shutdown(&self) -> io::Result<()> {
        self.request_shutdown();
        self.wait()
    }

    /// Waits for every shard to exit.
    ///
    /// # Errors
    /// When a shard failed (a bug in ringsock, or a ring that broke), naming each.
    pub fn wait(&self) -> io::Result<()> {
        let result = self.inner.fleet.wait();
        self.inner.service.stopped();
        result
    }

    /// Whether every shard has stopped.
    pub fn is_stopped(&self) -> bool {
        self.inner.fleet.is_stopped()
    }

    /// Serves until SIGINT or SIGTERM, then shuts down gracefully and waits; also returns
    /// when every shard stopped otherwise. The signal handling is this server's only while
    /// it waits here: afterwards (or with no server waiting) the signals act as usual.
    ///
    /// # Errors
    /// When the signal handlers cannot be installed, or a shard failed.
    pub fn run_until_signal(&self) -> io::Result<()> {
        let result = self
            .inner
            .fleet
            .run_until_signal(|| self.inner.service.stopping());
        self.inner.service.stopped();
        result
    }

    /// The broker link's counters (`None` without [`Builder::broker`]).
    #[cfg(any(feature = "redis", feature = "nats"))]
    pub fn broker_stats(&self) -> Option<crate::broker::BrokerStats> {
        self.inner.cluster.as_ref().map(|c| c.stats())
    }

    /// Test hook: makes shard `shard` panic in its own code, as a bug in ringsock would.
    #[doc(hidden)]
    pub fn inject_shard_fault(&self, shard: usize) {
        if let Some(mailbox) = self.inner.fleet.mailboxes().get(shard) {
            mailbox.post(Command::InjectFault);
        }
    }
}

impl std::fmt::Debug for ServerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerHandle")
            .field("local_addr", &self.inner.local_addr)
            .field("shards", &self.shards())
            .finish()
    }
}
