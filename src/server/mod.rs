//! What applications program against: [`Builder`] and [`Config`] to set a server up,
//! [`Handler`] for the callbacks, [`Ws`] inside callbacks, [`Remote`] and [`ServerHandle`]
//! from other threads.
//!
//! ```no_run
//! use ringsock::proto::handshake::{HttpError, Request};
//! use ringsock::server::{Builder, Handler, Message, Upgrade, Ws};
//!
//! struct Echo;
//!
//! impl Handler for Echo {
//!     type State = ();
//!     fn on_upgrade(&self, _: &Request<'_>, _: &mut Upgrade) -> Result<(), HttpError> {
//!         Ok(())
//!     }
//!     fn on_message(&self, ws: &mut Ws<'_, ()>, msg: Message<'_>) {
//!         ws.send(msg);
//!     }
//! }
//!
//! Builder::new().addr("127.0.0.1:9001").build(Echo).run().unwrap();
//! ```

mod config;
mod handler;
pub(crate) mod ws;

use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

pub use self::config::{Buffers, Config, Limits, Timeouts};
pub use self::handler::{Handler, HttpResponse, Message, SendStatus, Upgrade};
pub use self::ws::{Remote, Ws};
pub use crate::proto::deflate::DeflateConfig;
use crate::runtime::shard::Shard;
use crate::runtime::{sys, Command, RingGate, ShardShared};

/// Sets a server up. Every setting has a documented default (see [`Config`]).
#[derive(Clone, Debug, Default)]
pub struct Builder {
    config: Config,
    addr_error: Option<String>,
}

impl Builder {
    /// The defaults: `127.0.0.1:9001`, one shard per CPU.
    pub fn new() -> Builder {
        Builder::default()
    }

    /// The address to listen on (the first one it resolves to). Port 0 picks a free port
    /// for all shards; read it from [`ServerHandle::local_addr`].
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
        Server {
            builder: self,
            handler: Arc::new(handler),
        }
    }
}

/// A configured server, not yet started.
pub struct Server<H: Handler> {
    builder: Builder,
    handler: Arc<H>,
}

impl<H: Handler> Server<H> {
    /// Binds, starts the shards in background threads and returns once every shard is up.
    ///
    /// # Errors
    /// A bad address, bind failures, or io_uring unavailable (the message names the cause).
    pub fn start(self) -> io::Result<ServerHandle> {
        if let Some(e) = self.builder.addr_error {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, e));
        }
        let config = Arc::new(self.builder.config);
        let cpus = sys::allowed_cpus();
        let count = if config.shards == 0 {
            cpus.len().max(1)
        } else {
            config.shards
        };
        let listeners = bind_all(&config, count)?;
        let addr = match sys::local_addr(listeners[0]) {
            Ok(addr) => addr,
            Err(e) => {
                listeners.iter().for_each(|&fd| sys::close(fd));
                return Err(e);
            }
        };
        let shards: Vec<Arc<ShardShared>> = match (0..count)
            .map(|i| ShardShared::new(i).map(Arc::new))
            .collect::<io::Result<Vec<_>>>()
        {
            Ok(shards) => shards,
            Err(e) => {
                listeners.iter().for_each(|&fd| sys::close(fd));
                return Err(e);
            }
        };
        let shards: Arc<[Arc<ShardShared>]> = shards.into();
        let (tx, rx) = mpsc::channel();
        let mut threads = Vec::with_capacity(count);
        let mut spawn_error = None;
        let gate = Arc::new(RingGate::new(count));
        for (index, fd) in listeners.into_iter().enumerate() {
            if spawn_error.is_some() {
                sys::close(fd);
                gate.arrive(false);
                continue;
            }
            let (handler, config, shards, tx, ring_gate) = (
                Arc::clone(&self.handler),
                Arc::clone(&config),
                Arc::clone(&shards),
                tx.clone(),
                Arc::clone(&gate),
            );
            let cpu = (config.pin_threads && !cpus.is_empty()).then(|| cpus[index % cpus.len()]);
            let spawned = thread::Builder::new()
                .name(format!("ringsock-{index}"))
                .spawn(move || {
                    if let Some(cpu) = cpu {
                        let _ = sys::pin_to_cpu(cpu);
                    }
                    match Shard::new(handler, config, Arc::clone(&shards), index, fd, &ring_gate) {
                        Ok(shard) => {
                            let _ = tx.send(Ok(()));
                            shard.run();
                        }
                        Err(e) => {
                            sys::close(fd);
                            shards[index].set_stopped();
                            let _ = tx.send(Err(e));
                        }
                    }
                });
            match spawned {
                Ok(thread) => threads.push(thread),
                Err(e) => {
                    sys::close(fd);
                    gate.arrive(false);
                    spawn_error = Some(e);
                }
            }
        }
        drop(tx);
        let mut first_error = spawn_error;
        // One report per started thread (a thread that died without one closes the channel).
        for _ in 0..threads.len() {
            match rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    first_error.get_or_insert(e);
                }
                Err(_) => {
                    first_error.get_or_insert(io::Error::other("a shard thread died at start"));
                    break;
                }
            }
        }
        let handle = ServerHandle {
            inner: Arc::new(Inner {
                shards,
                local_addr: addr,
                threads: Mutex::new(threads),
            }),
        };
        if let Some(e) = first_error {
            handle.shutdown();
            return Err(e);
        }
        Ok(handle)
    }

    /// Starts and blocks until shutdown; SIGINT and SIGTERM shut down gracefully. Prints
    /// nothing; use [`Server::start`] and [`ServerHandle::local_addr`] to report the address.
    ///
    /// # Errors
    /// As [`Server::start`].
    pub fn run(self) -> io::Result<()> {
        let handle = self.start()?;
        handle.run_until_signal()
    }
}

fn bind_all(config: &Config, count: usize) -> io::Result<Vec<i32>> {
    if config.addr.port() != 0 {
        sys::ensure_free(&config.addr).map_err(|e| {
            io::Error::new(e.kind(), format!("cannot listen on {}: {e}", config.addr))
        })?;
    }
    let first = sys::listen(&config.addr, config.backlog)?;
    let addr = match sys::local_addr(first) {
        Ok(addr) => addr,
        Err(e) => {
            sys::close(first);
            return Err(e);
        }
    };
    let mut fds = vec![first];
    for _ in 1..count {
        match sys::listen(&addr, config.backlog) {
            Ok(fd) => fds.push(fd),
            Err(e) => {
                fds.iter().for_each(|&fd| sys::close(fd));
                return Err(e);
            }
        }
    }
    Ok(fds)
}

struct Inner {
    shards: Arc<[Arc<ShardShared>]>,
    local_addr: SocketAddr,
    threads: Mutex<Vec<JoinHandle<()>>>,
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

    /// The number of shards.
    pub fn shards(&self) -> usize {
        self.inner.shards.len()
    }

    /// Live connection counts.
    pub fn stats(&self) -> Stats {
        Stats {
            connections: self.inner.shards.iter().map(|s| s.connections()).collect(),
        }
    }

    /// Sends a message to every subscriber of `topic` on every shard (encoded once).
    pub fn publish(&self, topic: &str, msg: Message<'_>) {
        let frame = ws::encode_shared(msg);
        let topic: Arc<str> = Arc::from(topic);
        for shard in self.inner.shards.iter() {
            shard.post(Command::Publish {
                topic: Arc::clone(&topic),
                frame: frame.clone(),
            });
        }
    }

    /// Sends a message to every open connection (encoded once).
    pub fn broadcast(&self, msg: Message<'_>) {
        let frame = ws::encode_shared(msg);
        for shard in self.inner.shards.iter() {
            shard.post(Command::Broadcast {
                frame: frame.clone(),
            });
        }
    }

    /// Asks every shard to shut down gracefully and returns at once: accepting stops, every
    /// connection gets close 1001 after its queued output, and shards exit once their
    /// connections closed or the close timeout passed.
    pub fn request_shutdown(&self) {
        for shard in self.inner.shards.iter() {
            shard.post(Command::Shutdown);
        }
    }

    /// Shuts down gracefully and waits for every shard to exit.
    ///
    /// Do not call this from a handler callback: the shard would wait for itself. Use
    /// [`ServerHandle::request_shutdown`] there.
    pub fn shutdown(&self) {
        self.request_shutdown();
        self.wait();
    }

    /// Waits for every shard to exit.
    pub fn wait(&self) {
        let mut threads = match self.inner.threads.lock() {
            Ok(threads) => threads,
            Err(poisoned) => poisoned.into_inner(),
        };
        for thread in threads.drain(..) {
            let _ = thread.join();
        }
    }

    /// Whether every shard has stopped.
    pub fn is_stopped(&self) -> bool {
        self.inner.shards.iter().all(|s| s.is_stopped())
    }

    /// Makes SIGINT and SIGTERM shut this server down gracefully, then waits for it.
    ///
    /// # Errors
    /// When the signal handlers cannot be installed.
    pub fn run_until_signal(&self) -> io::Result<()> {
        let fds: Vec<i32> = self.inner.shards.iter().map(|s| s.eventfd()).collect();
        sys::on_shutdown_signal(&fds)?;
        self.wait();
        Ok(())
    }
}

impl std::fmt::Debug for ServerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerHandle")
            .field("local_addr", &self.inner.local_addr)
            .field("shards", &self.inner.shards.len())
            .finish()
    }
}
