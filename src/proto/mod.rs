//! The sans-IO protocol core: everything RFC 6455 and RFC 7692 ask of a server, and nothing
//! that touches a socket, a ring, a clock or a thread.
//!
//! * [`handshake`]: the HTTP/1.1 upgrade request, its validation and the 101 (or error) answer.
//! * [`frame`]: frame headers, opcodes, encoding.
//! * [`mask`]: (un)masking in place or while copying, SIMD where the CPU has it.
//! * [`utf8`]: incremental, fail-fast UTF-8 validation.
//! * [`deflate`]: permessage-deflate negotiation and the per-message codec.
//! * [`conn`]: the connection state machine that ties them together.
//!
//! `unsafe` is denied here except in [`mask`], where the SIMD kernels live (and one `set_len`
//! after a kernel filled a vector's spare capacity), and in two
//! `from_utf8_unchecked` lines of [`utf8`]: [`utf8::validate`]'s ASCII fast path (checked by
//! `is_ascii` just before it) and [`utf8::Utf8Buf::as_str`] (text validated as it was
//! appended).
#![deny(unsafe_code)]

pub mod conn;
pub mod deflate;
pub mod error;
pub mod frame;
pub mod handshake;
#[allow(unsafe_code)]
pub mod mask;
pub mod utf8;

pub use conn::{encode_frame, Closes, Config, Connection, Event, Progress, Sink, State};
pub use error::{CloseCode, ProtocolError, SendError};
pub use frame::OpCode;
