//! Server configuration: address, shard count, limits, timeouts, buffer sizing,
//! permessage-deflate policy and what to do when a shard fails. Every default states its
//! reason.

use std::net::SocketAddr;

pub use crate::proto::deflate::DeflateConfig;
pub use crate::runtime::{Buffers, Limits, ShardFailure, TestHooks, Timeouts};

/// Everything a server is configured with. Build one with [`crate::server::Builder`].
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Config {
    /// The address every shard listens on (with `SO_REUSEPORT`). Default `127.0.0.1:9001`.
    pub addr: SocketAddr,
    /// Shard threads; 0 means one per CPU this process may run on. Default 0.
    pub shards: usize,
    /// Pin each shard to its own CPU (`sched_setaffinity`). Default on: a shard's ring, slab
    /// and buffers stay in that core's caches.
    pub pin_threads: bool,
    /// The listen backlog. Default 1024.
    pub backlog: i32,
    /// Join the listeners another process already has on [`Config::addr`] instead of
    /// refusing to start (`AddrInUse`): for a restart that loses nothing, where the new
    /// process starts while the old one still serves and the kernel spreads new connections
    /// over both until the old one stops (see the README's "Restarts that lose nothing"). Both must run as the same
    /// user. Default off: a second server started on a taken address by mistake would
    /// otherwise silently get half of its connections.
    pub share_address: bool,
    /// Caps on what peers may send.
    pub limits: Limits,
    /// Handshake, idle and close timeouts.
    pub timeouts: Timeouts,
    /// Ring and buffer sizing, and the backpressure marks.
    pub buffers: Buffers,
    /// permessage-deflate (RFC 7692) policy. Default: enabled, no context takeover.
    pub deflate: DeflateConfig,
    /// What happens when a shard fails (a ringsock bug, not a handler panic). Default:
    /// [`ShardFailure::ShutDown`], so a supervisor restarts the process.
    pub on_shard_failure: ShardFailure,
    /// Where plain `GET` requests get the server's metrics in the Prometheus text format
    /// (e.g. `/metrics`), answered by the shard itself before [`crate::server::Handler::on_http`]
    /// sees them. Default `None`: off, since metrics are not for the public.
    pub metrics_path: Option<String>,
    /// Test hooks of ringsock itself.
    #[doc(hidden)]
    pub testing: TestHooks,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            addr: SocketAddr::from(([127, 0, 0, 1], 9001)),
            shards: 0,
            pin_threads: true,
            backlog: 1024,
            share_address: false,
            limits: Limits::default(),
            timeouts: Timeouts::default(),
            buffers: Buffers::default(),
            deflate: DeflateConfig::default(),
            on_shard_failure: ShardFailure::default(),
            metrics_path: None,
            testing: TestHooks::default(),
        }
    }
}
