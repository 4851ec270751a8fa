//! The connection state machine (stub: API contract, being implemented by the lead).

use super::deflate::Deflate;
use super::error::{CloseCode, ProtocolError, SendError};
use super::frame::OpCode;

/// Caps on what a peer may send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// The largest single frame payload accepted (1009 above it). Default 16 MiB.
    pub max_frame_size: usize,
    /// The largest message accepted, after reassembly and inflation (1009 above it).
    /// Default 64 MiB.
    pub max_message_size: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config { max_frame_size: 16 << 20, max_message_size: 64 << 20 }
    }
}

/// Where encoded frames go.
pub trait Sink {
    /// Appends bytes.
    fn put(&mut self, bytes: &[u8]);
}

impl Sink for Vec<u8> {
    #[inline]
    fn put(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
}

/// The server's side of the closing handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Messages flow both ways.
    Open,
    /// We sent a close frame and wait for the peer's.
    CloseSent,
    /// Both close frames were exchanged: flush the output, then drop TCP (§7.1.1).
    Closed,
}

/// Something the peer did.
#[derive(Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event<'a> {
    /// A whole text message.
    Text(&'a str),
    /// A whole binary message.
    Binary(&'a [u8]),
    /// A ping; the pong has been queued already.
    Ping(&'a [u8]),
    /// A pong.
    Pong(&'a [u8]),
    /// The peer's close frame. If we had not sent ours, the echo has been queued. Either way
    /// the state is now [`State::Closed`].
    Close {
        /// The peer's code, `None` for an empty close frame (1005).
        code: Option<CloseCode>,
        /// The peer's reason.
        reason: &'a str,
    },
    /// The peer broke the protocol. Our close frame with the matching code has been queued;
    /// keep feeding reads to see the peer's close, or drop TCP after the close timeout.
    Error(ProtocolError),
}

/// What one [`Connection::handle_read`] call did.
#[derive(Debug)]
#[must_use]
pub struct Progress<'a> {
    /// Bytes of the input consumed.
    pub consumed: usize,
    /// The event, if one is ready. `None` only once all input is consumed.
    pub event: Option<Event<'a>>,
}

/// Role placeholder (server only for now).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The server side.
    Server,
}

/// One server-side WebSocket connection after the handshake.
pub struct Connection {
    config: Config,
    deflate: Option<Deflate>,
    state: State,
}

impl Connection {
    /// A connection with these limits and, if negotiated, a permessage-deflate codec.
    pub fn new(config: Config, deflate: Option<Deflate>) -> Self {
        Connection { config, deflate, state: State::Open }
    }

    /// Feeds received bytes (unmasked in place). Call again with `&mut buf[consumed..]` until
    /// `event` is `None`.
    pub fn handle_read<'a, S: Sink>(&'a mut self, buf: &'a mut [u8], out: &mut S) -> Progress<'a> {
        let _ = (buf, out, &self.config, &self.deflate);
        todo!()
    }

    /// Queues a data message (compressed if negotiated and `compress`).
    ///
    /// # Errors
    /// [`SendError::Closed`] once our close frame was sent.
    pub fn send<S: Sink>(
        &mut self,
        out: &mut S,
        opcode: OpCode,
        payload: &[u8],
        compress: bool,
    ) -> Result<(), SendError> {
        let _ = (out, opcode, payload, compress);
        todo!()
    }

    /// Queues a ping.
    ///
    /// # Errors
    /// [`SendError::Closed`], [`SendError::ControlTooLong`].
    pub fn send_ping<S: Sink>(&mut self, out: &mut S, payload: &[u8]) -> Result<(), SendError> {
        let _ = (out, payload);
        todo!()
    }

    /// Starts the closing handshake.
    ///
    /// # Errors
    /// [`SendError::Closed`], [`SendError::ControlTooLong`], [`SendError::InvalidCloseCode`].
    pub fn close<S: Sink>(
        &mut self,
        out: &mut S,
        code: CloseCode,
        reason: &str,
    ) -> Result<(), SendError> {
        let _ = (out, code, reason);
        todo!()
    }

    /// The closing-handshake state.
    pub fn state(&self) -> State {
        self.state
    }
}
