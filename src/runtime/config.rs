//! What the shards are configured with: limits on what peers may send, timeouts, buffer
//! sizing. `server::Config` holds these next to the settings that only the server needs
//! (address, shard count); every default states its reason.

use std::time::Duration;

use crate::proto::deflate::DeflateConfig;

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
    /// The largest body of a plain HTTP request (413 above it; bodies need
    /// `Content-Length`, chunked ones get 501). Default 64 KiB.
    pub max_http_body: usize,
    /// Connections per shard; the next one gets a 503 and is closed. Default 100 000.
    pub max_connections_per_shard: usize,
    /// Deliver messages that do not arrive whole in one read piece by piece to
    /// the handler's `on_fragment` instead of reassembling them, so a handler can
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
            max_http_body: 64 * 1024,
            max_connections_per_shard: 100_000,
            stream_messages: false,
        }
    }
}

/// Timeouts. They are checked by one timer sweep per shard, so they fire up to one sweep
/// interval (a quarter of the shortest timeout, at most 500 ms) late. Any duration is
/// accepted: very long ones (`Duration::MAX`) mean "never".
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
    /// Provided receive buffers (a power of two). Default 128: with 32 KiB each, 4 MiB of
    /// receive memory per shard however many connections are idle.
    pub recv_buffers: u16,
    /// Bytes per receive buffer. Default 32 KiB: one receive then takes what a connection
    /// with 16 pipelined 1 KiB messages (or one 16 KiB message) has in flight. Measured
    /// against 256 of 16 KiB, 100 connections x 16 in flight, alternated, 3 runs each: 1 KiB
    /// 434/410/453 -> 386/373/391 ns of server CPU per echo (the window no longer arrives in
    /// two receives, one of them with a frame cut in two), 16 KiB p99 12.8/12.3/12.7 ->
    /// 9.0/9.1/9.0 ms, 16 B and 16 MiB unchanged. Single-shot receives (without the ring)
    /// give each armed connection a buffer of this size; idle, only what was received is
    /// resident (5,000 connections: 8.6 KiB RSS each with 16 or 32 KiB buffers).
    pub recv_buffer_size: usize,
    /// Queued output above which the shard stops reading from a connection and `send`
    /// reports backpressure; `on_drain` fires when it falls below again. Default 1 MiB.
    pub high_water_mark: usize,
    /// Queued output above which sends are dropped. Default 2 MiB (twice the mark): room for
    /// the replies to what was already received, while a peer that never reads costs at most
    /// this much. A message is accepted whole while the queue is below the limit, so one large
    /// message may exceed it.
    pub max_buffered: usize,
    /// Use a provided-buffer ring with multishot receive; off means single-shot receive into
    /// a per-connection buffer. Default on (off is forced automatically on old kernels, and
    /// when the ring cannot be registered, with one log line).
    pub use_buffer_ring: bool,
    /// Requests from other threads (`Remote` sends and closes, publishes and broadcasts) a
    /// shard holds before refusing more with [`SendStatus::QueueFull`](super::SendStatus).
    /// Default 65 536: a burst of that many waits,
    /// a producer that outruns the shard for good is told so instead of growing memory.
    pub command_queue: usize,
    /// How long a publication may wait in a subscriber's output for more to join it before
    /// it is sent. Zero (the default) sends at the end of the round that queued it, as every
    /// other output. Each send has a fixed cost besides its bytes (measured as server CPU per
    /// send, 1 KiB publications to 1,000 loopback subscribers: ~6 µs carrying 3.4 of them,
    /// ~10 µs carrying 10), so a shard fanning out one publication per send saturates early;
    /// with a linger, what is published within it goes out in one send per subscriber. The
    /// latency added is the linger, counted from the first publication held, plus the
    /// longer send phase of the batch. Held output goes out at once when it reaches 64 KiB,
    /// or when the subscriber gets anything else (the 101, a message, a ping or pong), closes
    /// or stops sending. At most 30 s. Measured in perf/README ("Publish linger"), 1 KiB at
    /// 500/s to 1,000 subscribers: 10 ms cuts server CPU per delivery by 46% (p50 7.4 ->
    /// 14.2 ms); a linger shorter than the shard's own send phase changes little.
    pub publish_linger: Duration,
}

impl Default for Buffers {
    fn default() -> Self {
        Buffers {
            ring_entries: 1024,
            recv_buffers: 128,
            recv_buffer_size: 32 * 1024,
            high_water_mark: 1 << 20,
            max_buffered: 2 << 20,
            use_buffer_ring: true,
            command_queue: 1 << 16,
            publish_linger: Duration::ZERO,
        }
    }
}

/// What the server does when a shard thread dies of a bug in ringsock itself (handler
/// panics never kill a shard: they cost their connection only).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum ShardFailure {
    /// Shut the whole server down gracefully and report the failure from
    /// `ServerHandle::wait` and `Server::run`, so the
    /// process exits with an error and a supervisor restarts it. The default.
    #[default]
    ShutDown,
    /// Keep the other shards serving. The failed shard's listener has left the
    /// `SO_REUSEPORT` group, so new connections go to the others; the failure is still
    /// reported when the server stops.
    KeepServing,
}

/// Knobs for tests of ringsock itself; not part of the API.
#[doc(hidden)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TestHooks {
    /// How far a slot's generation moves on each reuse (1 in production). A stride of 2^24
    /// makes every reuse look like 2^24 reuses, to show that handles cannot wrap.
    pub generation_stride: u64,
    /// Re-arms of each shard's wake-up read or timer that fail on purpose (0 in production):
    /// a few are retried, more fail the shard.
    pub fail_rearms: u32,
}

impl Default for TestHooks {
    fn default() -> Self {
        TestHooks {
            generation_stride: 1,
            fail_rearms: 0,
        }
    }
}

/// Everything one shard is configured with.
#[derive(Clone, Debug, Default)]
pub(crate) struct ShardConfig {
    pub limits: Limits,
    pub timeouts: Timeouts,
    pub buffers: Buffers,
    pub deflate: DeflateConfig,
    pub on_failure: ShardFailure,
    /// The listeners are descriptors of one socket that others hold too (a socket inherited
    /// from a service manager, say): a shard leaving closes its descriptor only, never
    /// `shutdown(2)`s the socket, which would stop every holder's accepts.
    pub shared_listener: bool,
    /// The longest sweep interval, so that a watchdog reading the heartbeat sees it advance
    /// often enough; `None`: as the timeouts need.
    pub max_tick: Option<Duration>,
    pub hooks: TestHooks,
}

/// A duration in whole milliseconds, saturating (`Duration::MAX` stays far in the future).
pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_saturate_instead_of_wrapping() {
        assert_eq!(millis(Duration::from_millis(1500)), 1500);
        assert_eq!(millis(Duration::MAX), u64::MAX);
        assert_eq!(millis(Duration::MAX).saturating_add(5), u64::MAX);
    }
}
