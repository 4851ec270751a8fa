//! The opening handshake (RFC 6455 §4.2): parsing the HTTP/1.1 upgrade request, validating it,
//! and writing the `101 Switching Protocols` answer or a clear HTTP error.
//!
//! The request may arrive in pieces: call [`parse_request`] with everything received so far
//! until it returns a request. Size and header count are capped by [`Limits`].
//!
//! API CONTRACT (stubs to be filled in; signatures are what the runtime builds against).

use std::fmt;

/// Caps on the opening request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// The most bytes the request line and headers may take (431 above it). Default 8 KiB.
    pub max_request_bytes: usize,
    /// The most header lines (431 above it). Default 64.
    pub max_headers: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_request_bytes: 8 * 1024, max_headers: 64 }
    }
}

/// An HTTP answer that refuses the upgrade.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum HttpError {
    /// 400: the request is malformed or misses a header the upgrade needs.
    BadRequest(&'static str),
    /// 403: refused by the origin check.
    Forbidden,
    /// 404: no route for the path.
    NotFound,
    /// 405: not a GET.
    MethodNotAllowed,
    /// 426: not a WebSocket upgrade, or a `Sec-WebSocket-Version` other than 13.
    UpgradeRequired,
    /// 431: the request or its header count exceeds [`Limits`].
    HeadersTooLarge,
    /// 503: the server is at its connection limit or shutting down.
    ServiceUnavailable,
}

impl HttpError {
    /// The status code.
    pub fn status(&self) -> u16 {
        match self {
            HttpError::BadRequest(_) => 400,
            HttpError::Forbidden => 403,
            HttpError::NotFound => 404,
            HttpError::MethodNotAllowed => 405,
            HttpError::UpgradeRequired => 426,
            HttpError::HeadersTooLarge => 431,
            HttpError::ServiceUnavailable => 503,
        }
    }

    /// Appends the complete HTTP response (status line, headers, short text body) to `out`.
    /// 426 carries `Sec-WebSocket-Version: 13`; every response carries `Connection: close`.
    pub fn write_response(&self, out: &mut Vec<u8>) {
        let _ = out;
        todo!("handshake helper")
    }
}

impl fmt::Display for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HTTP {}", self.status())
    }
}

impl std::error::Error for HttpError {}

/// A parsed HTTP/1.1 request head. Borrows from the receive buffer.
#[derive(Clone, Debug)]
pub struct Request<'a> {
    method: &'a str,
    path: &'a str,
    headers: Vec<(&'a str, &'a [u8])>,
}

impl<'a> Request<'a> {
    /// The method, e.g. `GET`.
    pub fn method(&self) -> &'a str {
        self.method
    }

    /// The request target, e.g. `/chat?room=1`.
    pub fn path(&self) -> &'a str {
        self.path
    }

    /// The first header with this name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&'a [u8]> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| *v)
    }

    /// Every header, in order.
    pub fn headers(&self) -> impl Iterator<Item = (&'a str, &'a [u8])> + '_ {
        self.headers.iter().copied()
    }

    /// Whether the request asks for a WebSocket upgrade at all (`Upgrade: websocket`), so a
    /// server can serve plain HTTP on other requests.
    pub fn is_upgrade(&self) -> bool {
        todo!("handshake helper")
    }

    /// Checks every rule of RFC 6455 §4.2.1 and returns the `Sec-WebSocket-Key`.
    ///
    /// # Errors
    /// 405 for a method other than GET, 400 for a missing Host, Upgrade/Connection tokens or a
    /// key that does not decode to 16 bytes, 426 for a version other than 13.
    pub fn websocket_key(&self) -> Result<&'a str, HttpError> {
        todo!("handshake helper")
    }

    /// The subprotocols offered in `Sec-WebSocket-Protocol`, over all such headers, in order.
    pub fn subprotocols(&self) -> impl Iterator<Item = &'a str> + '_ {
        std::iter::empty()
    }

    /// The raw values of every `Sec-WebSocket-Extensions` header, in order.
    pub fn extension_offers(&self) -> impl Iterator<Item = &'a [u8]> + '_ {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case("sec-websocket-extensions"))
            .map(|(_, v)| *v)
    }
}

/// Parses a request head from everything received so far.
///
/// Returns `Ok(None)` while the head is incomplete (and still within [`Limits`]), or the
/// request and the number of bytes its head took.
///
/// # Errors
/// 400 for malformed HTTP or a version other than HTTP/1.1, 431 when over [`Limits`].
pub fn parse_request<'a>(
    buf: &'a [u8],
    limits: &Limits,
) -> Result<Option<(Request<'a>, usize)>, HttpError> {
    let _ = (buf, limits);
    todo!("handshake helper")
}

/// The `Sec-WebSocket-Accept` value for a key (RFC 6455 §4.2.2): base64(SHA-1(key + GUID)).
pub fn accept_key(key: &[u8]) -> [u8; 28] {
    let _ = key;
    todo!("handshake helper")
}

/// Appends the `101 Switching Protocols` response to `out`.
pub fn write_accept(
    out: &mut Vec<u8>,
    key: &str,
    protocol: Option<&str>,
    extensions: Option<&str>,
) {
    let _ = (out, key, protocol, extensions);
    todo!("handshake helper")
}

/// Appends a plain HTTP/1.1 response (for pages served beside the WebSocket endpoint).
pub fn write_response(
    out: &mut Vec<u8>,
    status: u16,
    reason: &str,
    content_type: &str,
    body: &[u8],
) {
    let _ = (out, status, reason, content_type, body);
    todo!("handshake helper")
}
