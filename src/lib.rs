#![doc = include_str!("../README.md")]
#![warn(missing_docs)]
#![warn(clippy::undocumented_unsafe_blocks, clippy::missing_safety_doc)]

#[cfg(any(feature = "redis", feature = "nats"))]
pub mod broker;
pub mod proto;
mod runtime;
pub mod server;

pub use server::{Builder, Handler, Message, Remote, SendStatus, Server, ServerHandle, Ws};
