//! The io_uring runtime: one shard per core, each a thread with its own ring, its own
//! `SO_REUSEPORT` listener and its own provided-buffer ring, driving per-connection state
//! machines from completions (no futures on the hot path). It depends on [`crate::proto`]
//! only; the application reaches it through the [`app::App`] trait, which `server`
//! implements.
//!
//! | file | what it holds |
//! | --- | --- |
//! | [`fleet`] | a server's shards as a whole: start, stop, wait, failure policy, signals |
//! | [`shard`] | one shard: the event loop, completion dispatch, commands, shutdown, exit |
//! | [`input`] | the receive path: request bytes, frames to the application, the stash |
//! | [`output`] | settling touched connections: sends, half-close, backpressure, arming reads |
//! | [`sweep`] | the timer sweep: deadlines, idle ping and close, buffer shrinking, heartbeat |
//! | [`conn`] | one connection's state: its phase and close state machine |
//! | [`app`] | the seam to the application: `App`, `Session`, `SendStatus`, handles |
//! | [`pubsub`] | topics and local fan-out |
//! | [`command`] | the mailbox other threads post commands to |
//! | [`metrics`] | per-shard counters, plain integers copied out for readers |
//! | [`slab`] | the connection slab with 64-bit generations |
//! | [`token`] | the `user_data` layout |
//! | [`setup`] | kernel checks, buffer-ring fallback, the locked-memory gate |
//! | [`ring`] | the io_uring seam: every pointer handed to the kernel, and its owner types |
//! | [`fault`] | `catch_unwind` around callbacks and the panic-message hook |
//! | [`signal`] | per-server SIGINT/SIGTERM registration |
//! | [`tls`] | rustls driven sans-IO: ciphertext in, plaintext out, output encrypted per batch |
//! | [`sys`] | cold-path system calls |
//! | [`config`] | limits, timeouts, buffer sizing, failure policy |
//!
//! Shards share nothing mutable on the hot path. Cross-thread requests arrive through a
//! per-shard bounded queue plus an eventfd the shard keeps a read armed on.

pub(crate) mod app;
pub(crate) mod command;
pub(crate) mod config;
pub(crate) mod conn;
pub(crate) mod fault;
pub(crate) mod fleet;
mod input;
pub(crate) mod metrics;
mod output;
pub(crate) mod pubsub;
pub(crate) mod ring;
pub(crate) mod setup;
pub(crate) mod shard;
pub(crate) mod signal;
pub(crate) mod slab;
mod sweep;
pub(crate) mod sys;
pub(crate) mod tls;
pub(crate) mod token;

pub use self::app::SendStatus;
pub use self::config::{Buffers, Limits, ShardFailure, TestHooks, Timeouts};
pub use self::metrics::{ByCloseCode, ByProtocolError, ByStatus, Metrics, Traffic};
