//! # ringsock
//!
//! An io_uring WebSocket server framework for Linux.
//!
//! The crate has three layers; dependencies point down only:
//!
//! * [`proto`]: the sans-IO RFC 6455 / RFC 7692 core. It parses and encodes bytes and never
//!   performs I/O, so it is unit-, property- and fuzz-testable on its own.
//! * `runtime`: per-core shards, each with its own io_uring ring, listener, provided-buffer ring
//!   and registered buffer pool. All `unsafe` ring code is fenced in `runtime::ring`.
//! * [`server`]: what users program against: [`Builder`], [`Handler`], [`Ws`], [`Remote`].
//!
//! See the README for a quick start.
#![warn(missing_docs)]
#![warn(clippy::undocumented_unsafe_blocks, clippy::missing_safety_doc)]

pub mod proto;
mod runtime;
pub mod server;

pub use server::{Builder, Handler, Message, Remote, SendStatus, Server, ServerHandle, Ws};
