//! The application's side: the [`Handler`] callbacks and the small types they take and give.
//!
//! Callbacks run on a shard thread between completions. They must not block: a blocked
//! callback stalls every connection of that shard. A callback that panics costs only its own
//! connection (see [`Handler`]).

use std::marker::PhantomData;

use crate::proto::handshake::{self, HttpError, Request};
use crate::proto::CloseCode;
use crate::runtime::app::{Accept, DeferKey, Verdict};
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

/// What [`Handler::on_upgrade`] decides.
#[derive(Debug)]
pub enum Decision<S> {
    /// Upgrade, with this per-connection state (and what [`Upgrade`] set).
    Accept(S),
    /// Answer this HTTP response instead and close the connection.
    Reject(HttpResponse),
    /// Decide later: [`Upgrade::defer`] was called and its [`PendingUpgrade`] will answer
    /// from another thread. Returning `Defer` without that answers 500.
    Defer,
}

impl<S> From<HttpError> for Decision<S> {
    fn from(e: HttpError) -> Decision<S> {
        Decision::Reject(HttpResponse::from(e))
    }
}

impl<S> From<Result<S, HttpError>> for Decision<S> {
    fn from(result: Result<S, HttpError>) -> Decision<S> {
        match result {
            Ok(state) => Decision::Accept(state),
            Err(e) => e.into(),
        }
    }
}

/// The choices of an accepted upgrade: subprotocol, compression, extra response headers.
#[derive(Clone, Debug, Default)]
pub(crate) struct UpgradeOptions {
    pub protocol: Option<String>,
    pub no_compression: bool,
    pub headers: Vec<(String, String)>,
}

impl UpgradeOptions {
    fn header(&mut self, name: &str, value: &str) {
        assert!(
            handshake::is_header_name(name) && handshake::is_header_value(value),
            "invalid response header {name:?}: {value:?}"
        );
        self.headers.push((name.to_owned(), value.to_owned()));
    }
}

/// Choices made while accepting an upgrade, and the way to decide later
/// ([`Upgrade::defer`]).
pub struct Upgrade<S> {
    pub(crate) options: UpgradeOptions,
    pub(crate) key: Option<DeferKey>,
    pub(crate) _state: PhantomData<fn(S)>,
}

impl<S: Send + 'static> Upgrade<S> {
    pub(crate) fn new(key: DeferKey) -> Upgrade<S> {
        Upgrade {
            options: UpgradeOptions::default(),
            key: Some(key),
            _state: PhantomData,
        }
    }

    /// Answers with this subprotocol (`Sec-WebSocket-Protocol`). Pick one the client offered
    /// (see [`Request::subprotocols`]); RFC 6455 §4.2.2 forbids any other.
    pub fn protocol(&mut self, protocol: &str) {
        self.options.protocol = Some(protocol.to_owned());
    }

    /// Declines permessage-deflate on this connection even if the server enables it.
    pub fn disable_compression(&mut self) {
        self.options.no_compression = true;
    }

    /// Adds a header line to the 101 answer, e.g. `Set-Cookie`.
    ///
    /// # Panics
    /// When `name` is not an HTTP token or `value` holds CR, LF or NUL (a panic in
    /// `on_upgrade` answers 500).
    pub fn header(&mut self, name: &str, value: &str) {
        self.options.header(name, value);
    }

    /// Takes the decision off the shard: returns a [`PendingUpgrade`] to answer from any
    /// thread (a task asking a database, say), and `on_upgrade` returns [`Decision::Defer`].
    /// The shard serves other connections meanwhile; without an answer within the
    /// handshake timeout the connection is dropped. Choices made on `self` so far carry
    /// over.
    ///
    /// # Panics
    /// When called twice.
    pub fn defer(&mut self) -> PendingUpgrade<S> {
        let key = self.key.take().expect("Upgrade::defer called twice");
        PendingUpgrade {
            options: std::mem::take(&mut self.options),
            key: Some(key),
            _state: PhantomData,
        }
    }
}

/// An upgrade whose decision was deferred ([`Upgrade::defer`]): `Send`, answered once from
/// any thread with [`PendingUpgrade::accept`] or [`PendingUpgrade::reject`]. Dropping it
/// unanswered answers 500.
pub struct PendingUpgrade<S: Send + 'static> {
    options: UpgradeOptions,
    key: Option<DeferKey>,
    _state: PhantomData<fn(S)>,
}

impl<S: Send + 'static> PendingUpgrade<S> {
    /// As [`Upgrade::protocol`].
    pub fn protocol(&mut self, protocol: &str) {
        self.options.protocol = Some(protocol.to_owned());
    }

    /// As [`Upgrade::disable_compression`].
    pub fn disable_compression(&mut self) {
        self.options.no_compression = true;
    }

    /// As [`Upgrade::header`].
    ///
    /// # Panics
    /// As [`Upgrade::header`].
    pub fn header(&mut self, name: &str, value: &str) {
        self.options.header(name, value);
    }

    /// Accepts the upgrade with this state: the shard answers 101 and calls `on_open`.
    /// Returns `false` if the server has stopped; a connection that timed out or went away
    /// meanwhile drops the state instead.
    pub fn accept(mut self, state: S) -> bool {
        let options = std::mem::take(&mut self.options);
        let accept = Accept {
            state,
            protocol: options.protocol,
            compress: !options.no_compression,
            headers: options.headers,
        };
        self.answer(Verdict::Accept(accept))
    }

    /// Refuses the upgrade with this response; the connection is closed after it.
    pub fn reject(mut self, response: HttpResponse) -> bool {
        let mut bytes = Vec::new();
        response.write(&mut bytes, true, false);
        self.answer(Verdict::Reject(bytes))
    }

    fn answer(&mut self, verdict: Verdict<S>) -> bool {
        self.key.take().is_some_and(|key| key.answer(verdict))
    }
}

impl<S: Send + 'static> Drop for PendingUpgrade<S> {
    fn drop(&mut self) {
        if self.key.is_some() {
            let mut bytes = Vec::new();
            HttpError::InternalServerError.write_response(&mut bytes);
            self.answer(Verdict::Reject(bytes));
        }
    }
}

impl<S: Send + 'static> std::fmt::Debug for PendingUpgrade<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingUpgrade")
            .field("answered", &self.key.is_none())
            .finish()
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

/// An HTTP response: for a plain request ([`Handler::on_http`]) or a refused upgrade
/// ([`Decision::Reject`]). `Content-Length` and `Connection` are written by the server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpResponse {
    /// The status code (the reason phrase is the standard one).
    pub status: u16,
    /// Header lines, in order (valid names; values without CR, LF or NUL).
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
    /// Close the connection after this response even if the client would keep it.
    pub close: bool,
}

impl HttpResponse {
    /// A response with this status, no headers and an empty body.
    pub fn new(status: u16) -> HttpResponse {
        HttpResponse {
            status,
            headers: Vec::new(),
            body: Vec::new(),
            close: false,
        }
    }

    /// Adds a header line.
    ///
    /// # Panics
    /// When `name` is not an HTTP token or `value` holds CR, LF or NUL.
    pub fn header(mut self, name: &str, value: &str) -> HttpResponse {
        assert!(
            handshake::is_header_name(name) && handshake::is_header_value(value),
            "invalid response header {name:?}: {value:?}"
        );
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Sets the body.
    pub fn body(mut self, body: impl Into<Vec<u8>>) -> HttpResponse {
        self.body = body.into();
        self
    }

    /// `200 OK` with an HTML body.
    pub fn html(body: impl Into<Vec<u8>>) -> HttpResponse {
        HttpResponse::new(200)
            .header("Content-Type", "text/html; charset=utf-8")
            .body(body)
    }

    /// `200 OK` with a plain-text body.
    pub fn text(body: impl Into<Vec<u8>>) -> HttpResponse {
        HttpResponse::new(200)
            .header("Content-Type", "text/plain; charset=utf-8")
            .body(body)
    }

    /// `404 Not Found`.
    pub fn not_found() -> HttpResponse {
        HttpResponse::new(404)
            .header("Content-Type", "text/plain; charset=utf-8")
            .body("not found\n")
    }

    /// Appends the whole response; `close` adds `Connection: close`, `head_only` leaves the
    /// body out (the answer to `HEAD`). The fields are public, so they are checked here: a
    /// status outside 200-599 becomes 500, and a header line that could split the response
    /// is left out, each with a warning.
    pub(crate) fn write(&self, out: &mut Vec<u8>, close: bool, head_only: bool) {
        if !(200..=599).contains(&self.status) {
            tracing::warn!(
                status = self.status,
                "an HTTP response status out of range: 500"
            );
            let error = HttpResponse::from(HttpError::InternalServerError);
            return error.write(out, close, head_only);
        }
        // Headers the server writes itself are not repeated.
        let own = |name: &str| {
            name.eq_ignore_ascii_case("content-length") || name.eq_ignore_ascii_case("connection")
        };
        let valid = |name: &str, value: &str| {
            handshake::is_header_name(name) && handshake::is_header_value(value)
        };
        let (status, body) = (self.status, &self.body);
        if self.headers.iter().all(|(n, v)| !own(n) && valid(n, v)) {
            handshake::write_http(out, status, &self.headers, body, close, head_only);
            return;
        }
        let mut headers = Vec::with_capacity(self.headers.len());
        for (name, value) in &self.headers {
            if !valid(name, value) {
                tracing::warn!(header = ?name, "an invalid HTTP response header left out");
            } else if !own(name) {
                headers.push((name.clone(), value.clone()));
            }
        }
        handshake::write_http(out, status, &headers, body, close, head_only);
    }
}

impl From<HttpError> for HttpResponse {
    fn from(e: HttpError) -> HttpResponse {
        let mut bytes = Vec::new();
        e.write_response(&mut bytes);
        // The body is what follows the head.
        let body = bytes
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map_or(Vec::new(), |at| bytes[at + 4..].to_vec());
        let mut response = HttpResponse::new(e.status())
            .header("Content-Type", "text/plain; charset=utf-8")
            .body(body);
        match e {
            HttpError::UpgradeRequired => {
                response = response
                    .header("Upgrade", "websocket")
                    .header("Sec-WebSocket-Version", "13");
            }
            HttpError::MethodNotAllowed => response = response.header("Allow", "GET"),
            _ => {}
        }
        response.close = true;
        response
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

    /// Decides on an upgrade request: routing, origin and token checks on the path, query
    /// string, headers and cookies ([`Request`]); subprotocol, compression and response
    /// headers through `upgrade`. The request was validated against RFC 6455 §4.2.1
    /// already. Return [`Decision::Accept`] with the connection's state,
    /// [`Decision::Reject`] with any response (`HttpError` converts with `.into()`), or
    /// [`Decision::Defer`] after [`Upgrade::defer`] to decide on another thread.
    fn on_upgrade(
        &self,
        req: &Request<'_>,
        upgrade: &mut Upgrade<Self::State>,
    ) -> Decision<Self::State>;

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

    /// A plain HTTP request (not a WebSocket upgrade), its body in [`Request::body`]
    /// (bounded by `Limits::max_http_body`; chunked bodies get 501 without reaching here).
    /// `None` answers 426 Upgrade Required. HTTP/1.1 keep-alive and pipelining are handled:
    /// the connection stays open for the next request unless the client or the response
    /// ([`HttpResponse::close`]) asks to close it, or the server is shutting down.
    fn on_http(&self, req: &Request<'_>) -> Option<HttpResponse> {
        let _ = req;
        None
    }
}
