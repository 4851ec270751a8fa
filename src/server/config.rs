//! Server configuration: address, shard count, limits, timeouts, buffer sizing and
//! permessage-deflate policy. Every default states its reason.

use std::net::SocketAddr;
use std::time::Duration;

use crate::proto::deflate::DeflateConfig;

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
    /// Caps on what peers may send.
    pub limits: Limits,
    /// Handshake, idle and close timeouts.
    pub timeouts: Timeouts,
    /// Ring and buffer sizing, and the backpressure marks.
    pub buffers: Buffers,
    /// permessage-deflate (RFC 7692) policy. Default: enabled, no context takeover.
    pub deflate: DeflateConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            addr: SocketAddr::from(([127, 0, 0, 1], 9001)),
            shards: 0,
            pin_threads: true,
            backlog: 1024,
            limits: Limits::default(),
            timeouts: Timeouts::default(),
            buffers: Buffers::default(),
            deflate: DeflateConfig::default(),
        }
    }
}

/// Caps on what a peer may send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Limits {
    /// The largest frame payload (close 1009 above it). Default 16 MiB: the largest single
    /// frame the Autobahn suite sends.
    pub max_frame_size: usize,
    /// The largest message after reassembly and inflation (close 1009 above it). Default
    /// 64 MiB.
    pub max_message_size: usize,
    /// The most bytes an opening request head may take (431 above it). Default 8 KiB, what
    /// common HTTP servers allow.
    pub max_request_bytes: usize,
    /// The most request header lines (431 above it). Default 64.
    pub max_headers: usize,
    /// Connections per shard; the next one gets a 503 and is closed. Default 100 000.
    pub max_connections_per_shard: usize,
    /// Deliver messages that do not arrive whole in one read piece by piece to
    /// [`crate::server::Handler::on_fragment`] instead of reassembling them, so a handler can
    /// take messages larger than it wants to hold (`max_message_size` still applies). Default
    /// off: every message comes whole to `on_message`.
    pub stream_messages: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_frame_size: 16 << 20,
            max_message_size: 64 << 20,
            max_request_bytes: 8 * 1024,
            max_headers: 64,
            max_connections_per_shard: 100_000,
            stream_messages: false,
        }
    }
}

/// Timeouts. They are checked by one timer sweep per shard, so they fire up to one sweep
/// interval (a quarter of the shortest timeout, at most 500 ms) late.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Timeouts {
    /// From accept to a complete upgrade request; then TCP is dropped (slowloris). Default
    /// 10 s.
    pub handshake: Duration,
    /// With nothing received for this long the connection is closed (1001). `None` disables
    /// it. Default 120 s.
    pub idle: Option<Duration>,
    /// Send a ping after half the idle timeout, and close only if nothing (not even the pong)
    /// arrives in the other half, so live but quiet peers are kept. Default on.
    pub auto_ping: bool,
    /// How long to wait for the peer's close frame after ours, and for its FIN after the
    /// closing handshake, before dropping TCP. Also bounds graceful shutdown. Default 5 s.
    pub close: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            handshake: Duration::from_secs(10),
            idle: Some(Duration::from_secs(120)),
            auto_ping: true,
            close: Duration::from_secs(5),
        }
    }
}

/// Ring and buffer sizing, per shard.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Buffers {
    /// Submission queue entries (the completion queue gets four times as many). Default 1024.
    pub ring_entries: u32,
    /// Provided receive buffers (a power of two). Default 256: with 16 KiB each, 4 MiB of
    /// receive memory per shard however many connections are idle.
    pub recv_buffers: u16,
    /// Bytes per receive buffer. Default 16 KiB (a typical TCP segment train).
    pub recv_buffer_size: usize,
    /// Registered send slabs. Default 64.
    pub send_slabs: u16,
    /// Bytes per send slab; larger outputs are sent from the heap. Default 16 KiB, so the
    /// pool (1 MiB per shard) fits the common 8 MiB locked-memory limit on a few shards.
    pub send_slab_size: usize,
    /// Queued output above which the shard stops reading from a connection and `send`
    /// reports backpressure; `on_drain` fires when it falls below again. Default 1 MiB.
    pub high_water_mark: usize,
    /// Queued output above which sends are dropped. Default 2 MiB (twice the mark): room for
    /// the replies to what was already received, while a peer that never reads costs at most
    /// this much. A message is accepted whole while the queue is below the limit, so one large
    /// message may exceed it.
    pub max_buffered: usize,
    /// Use a provided-buffer ring with multishot receive; off means single-shot receive into
    /// a per-connection buffer. Default on (off is forced automatically on old kernels).
    pub use_buffer_ring: bool,
    /// Register the send slabs as fixed buffers; off means plain heap sends. Default on
    /// (registration failure falls back automatically, with one log line).
    pub use_registered_buffers: bool,
}

impl Default for Buffers {
    fn default() -> Self {
        Buffers {
            ring_entries: 1024,
            recv_buffers: 256,
            recv_buffer_size: 16 * 1024,
            send_slabs: 64,
            send_slab_size: 16 * 1024,
            high_water_mark: 1 << 20,
            max_buffered: 2 << 20,
            use_buffer_ring: true,
            use_registered_buffers: true,
        }
    }
}
