//! The application's side: the [`Handler`] callbacks and the small types they take and give.
//!
//! Callbacks run on a shard thread between completions. They must not block: a blocked
//! callback stalls every connection of that shard. A callback that panics costs only its own
//! connection (see [`Handler`]).

use crate::proto::handshake::{HttpError, Request};
use crate::proto::CloseCode;
use crate::server::Ws;

/// A whole message, borrowed from the receive buffer (or the reassembly buffer for
/// fragmented or compressed messages). Copy what you need to keep.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Message<'a> {
    /// A text message, valid UTF-8.
    Text(&'a str),
    /// A binary message.
    Binary(&'a [u8]),
}

impl<'a> Message<'a> {
    /// The payload bytes.
    pub fn as_bytes(&self) -> &'a [u8] {
        match self {
            Message::Text(text) => text.as_bytes(),
            Message::Binary(bytes) => bytes,
        }
    }
}

/// Choices made while accepting an upgrade.
#[derive(Clone, Debug, Default)]
pub struct Upgrade {
    pub(crate) protocol: Option<String>,
    pub(crate) no_compression: bool,
}

impl Upgrade {
    /// Answers with this subprotocol (`Sec-WebSocket-Protocol`). Pick one the client offered
    /// (see [`Request::subprotocols`]); RFC 6455 §4.2.2 forbids any other.
    pub fn protocol(&mut self, protocol: &str) {
        self.protocol = Some(protocol.to_owned());
    }

    /// Declines permessage-deflate on this connection even if the server enables it.
    pub fn disable_compression(&mut self) {
        self.no_compression = true;
    }
}

/// What a node learns about its link to the broker (see `Builder::broker`, features `redis`
/// and `nats`), reported to [`Handler::on_broker`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum BrokerNotice {
    /// The link is up (the first time, and after every reconnect).
    Connected,
    /// The link is down; the node keeps serving local traffic and reconnects with backoff.
    /// Publications meanwhile wait in a bounded queue, and what does not fit is dropped.
    Disconnected,
    /// After a reconnect: every topic with local subscribers is subscribed again. With `gap`,
    /// messages other nodes published while the link was down were missed (Redis pub/sub and
    /// NATS core keep no history): resync whatever state you derive from them.
    Resubscribed {
        /// Messages may have been missed.
        gap: bool,
    },
}

/// A plain HTTP response for a request that is not an upgrade (see [`Handler::on_http`]).
/// The connection is closed after it is sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpResponse {
    /// The status code.
    pub status: u16,
    /// The reason phrase.
    pub reason: &'static str,
    /// The `Content-Type`.
    pub content_type: &'static str,
    /// The body.
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// `200 OK` with an HTML body.
    pub fn html(body: impl Into<Vec<u8>>) -> HttpResponse {
        HttpResponse {
            status: 200,
            reason: "OK",
            content_type: "text/html; charset=utf-8",
            body: body.into(),
        }
    }

    /// `200 OK` with a plain-text body.
    pub fn text(body: impl Into<Vec<u8>>) -> HttpResponse {
        HttpResponse {
            status: 200,
            reason: "OK",
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
        }
    }

    /// `404 Not Found`.
    pub fn not_found() -> HttpResponse {
        HttpResponse {
            status: 404,
            reason: "Not Found",
            content_type: "text/plain; charset=utf-8",
            body: b"not found\n".to_vec(),
        }
    }
}

/// The application: callbacks for one server, shared by all shards, each connection with
/// its own [`Handler::State`].
///
/// Order per connection: `on_upgrade`, `on_open`, then any of `on_message`, `on_fragment`,
/// `on_ping`, `on_pong`, `on_drain`, and `on_close` exactly once last (for every connection
/// that was opened).
///
/// # What is delivered around a close
/// Every message the peer sent before its close frame reaches `on_message`, also when our
/// close went first ([`Ws::close`], the idle timeout, graceful shutdown): RFC 6455 lets the
/// peer keep sending until it has seen our close, and what it sent is delivered, in order,
/// before `on_close`. Sends from those callbacks report [`crate::server::SendStatus::Closed`]. Nothing after
/// the peer's close frame is read.
///
/// # Panics
/// Each callback runs under `catch_unwind`. A panic closes its connection with 1011
/// (internal error) — or answers HTTP 500 from `on_upgrade` and `on_http` — is logged once
/// with the peer's address and counted ([`crate::server::Stats::handler_panics`]); the shard
/// goes on serving every other connection. After a panic the connection gets no more
/// callbacks but `on_close` (unless `on_close` itself panicked). Per-connection state may be
/// left half-updated by the panic; `on_close` should not rely on it being consistent.
pub trait Handler: Send + Sync + 'static {
    /// Per-connection state, created by [`Handler::on_upgrade`].
    type State: Send + 'static;

    /// Decides on an upgrade request (routing, origin checks, subprotocol choice via
    /// `upgrade`). The request was validated against RFC 6455 §4.2.1 already.
    ///
    /// # Errors
    /// An [`HttpError`] to refuse; it is answered and the connection closed.
    fn on_upgrade(
        &self,
        req: &Request<'_>,
        upgrade: &mut Upgrade,
    ) -> Result<Self::State, HttpError>;

    /// The connection is open (the 101 answer is queued).
    fn on_open(&self, ws: &mut Ws<'_, Self::State>) {
        let _ = ws;
    }

    /// A whole message arrived.
    fn on_message(&self, ws: &mut Ws<'_, Self::State>, msg: Message<'_>) {
        let _ = (ws, msg);
    }

    /// A piece of a message, with [`crate::server::Config`]'s `limits.stream_messages` on
    /// (see [`crate::Builder::stream_messages`]): the bytes that arrived in this read, in
    /// order, borrowed from the receive buffer. `text` tells the message's type; text pieces
    /// may end inside a code point, and the message as a whole is valid UTF-8 by the `last`
    /// piece (otherwise the connection fails with 1007 and `on_close` comes instead).
    /// Messages that arrive whole in one read still come to [`Handler::on_message`].
    fn on_fragment(
        &self,
        ws: &mut Ws<'_, Self::State>,
        text: bool,
        data: &[u8],
        first: bool,
        last: bool,
    ) {
        let _ = (ws, text, data, first, last);
    }

    /// A ping arrived; the pong is queued already (RFC 6455 §5.5.2).
    fn on_ping(&self, ws: &mut Ws<'_, Self::State>, payload: &[u8]) {
        let _ = (ws, payload);
    }

    /// A pong arrived.
    fn on_pong(&self, ws: &mut Ws<'_, Self::State>, payload: &[u8]) {
        let _ = (ws, payload);
    }

    /// The queued output fell below the high-water mark after [`crate::server::SendStatus::Backpressure`].
    fn on_drain(&self, ws: &mut Ws<'_, Self::State>) {
        let _ = ws;
    }

    /// The connection is closing or gone: `code` is the peer's close code (`None` for an
    /// empty close frame), the code of our close for a protocol error, or 1006 when TCP
    /// ended without a close handshake. Sends report [`crate::server::SendStatus::Closed`] from here on.
    fn on_close(&self, ws: &mut Ws<'_, Self::State>, code: Option<CloseCode>, reason: &str) {
        let _ = (ws, code, reason);
    }

    /// The link to the broker changed (only with `Builder::broker`). Called on the broker's
    /// own thread, not a shard: keep it short, and reach connections through a
    /// [`crate::server::ServerHandle`] or [`crate::server::Remote`] you kept.
    fn on_broker(&self, notice: BrokerNotice) {
        let _ = notice;
    }

    /// A request that is not a WebSocket upgrade. `None` answers 426 Upgrade Required.
    fn on_http(&self, req: &Request<'_>) -> Option<HttpResponse> {
        let _ = req;
        None
    }
}
