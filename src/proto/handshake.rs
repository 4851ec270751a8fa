//! The opening handshake (RFC 6455 §4.2): parsing the HTTP/1.1 upgrade request, validating it,
//! and writing the `101 Switching Protocols` answer or a clear HTTP error.
//!
//! Call protocol, on the server side of one connection:
//!
//! 1. Feed [`parse_request`] everything received so far until it returns a request (it returns
//!    `Ok(None)` while the head is incomplete). Size and header count are capped by [`Limits`].
//! 2. [`Request::is_upgrade`] tells a WebSocket upgrade from a plain HTTP request, which the
//!    server may answer itself with [`write_response`].
//! 3. [`Request::websocket_key`] checks every rule of RFC 6455 §4.2.1 and yields the key.
//! 4. Answer with [`write_accept`], or with [`HttpError::write_response`] on any error and then
//!    close the connection. Bytes after the head (the count `parse_request` returns) belong to
//!    the WebSocket stream.
//!
//! This module never panics on peer input and never allocates more than the request needs
//! (bounded by [`Limits`]). It performs no I/O.

use std::fmt;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use sha1::{Digest, Sha1};

/// The GUID appended to the key before hashing (RFC 6455 §1.3, §4.2.2).
const WEBSOCKET_GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Header slots kept on the stack; larger [`Limits::max_headers`] fall back to the heap.
const INLINE_HEADERS: usize = 64;

/// The shortest possible header line, `a:\n`: bounds how many headers a head can hold.
const MIN_HEADER_LINE: usize = 3;

/// The value of the `Server` header on every response; Autobahn|Testsuite reports it as the
/// agent name.
const SERVER: &[u8] = b"ringsock";

/// Caps on the opening request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// The most bytes the request line and headers may take, final blank line included (431
    /// above it). Default 8 KiB, the common proxy default, ample for browser handshakes.
    pub max_request_bytes: usize,
    /// The most header lines (431 above it). Default 64: browsers send about 15.
    pub max_headers: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_request_bytes: 8 * 1024,
            max_headers: 64,
        }
    }
}

/// An HTTP answer that refuses the upgrade.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum HttpError {
    /// 400: the request is malformed, is not HTTP/1.1, or misses or repeats a header the
    /// upgrade needs. The text says which, and goes into the response body.
    BadRequest(&'static str),
    /// 403: refused by the origin check.
    Forbidden,
    /// 404: no route for the path.
    NotFound,
    /// 405: not a GET.
    MethodNotAllowed,
    /// 426: a `Sec-WebSocket-Version` other than 13 (RFC 6455 §4.2.2, §4.4).
    UpgradeRequired,
    /// 413: a plain HTTP request's body is larger than the server takes.
    PayloadTooLarge,
    /// 431: the request or its header count exceeds [`Limits`].
    HeadersTooLarge,
    /// 500: the application failed while deciding (its handler panicked).
    InternalServerError,
    /// 501: a request body with `Transfer-Encoding` (chunked bodies are not supported:
    /// send `Content-Length`).
    NotImplemented,
    /// 503: the server is at its connection limit.
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
            HttpError::PayloadTooLarge => 413,
            HttpError::HeadersTooLarge => 431,
            HttpError::InternalServerError => 500,
            HttpError::NotImplemented => 501,
            HttpError::ServiceUnavailable => 503,
        }
    }

    /// The standard reason phrase for the status, e.g. `Bad Request`.
    pub fn reason(&self) -> &'static str {
        match self {
            HttpError::BadRequest(_) => "Bad Request",
            HttpError::Forbidden => "Forbidden",
            HttpError::NotFound => "Not Found",
            HttpError::MethodNotAllowed => "Method Not Allowed",
            HttpError::UpgradeRequired => "Upgrade Required",
            HttpError::PayloadTooLarge => "Content Too Large",
            HttpError::HeadersTooLarge => "Request Header Fields Too Large",
            HttpError::InternalServerError => "Internal Server Error",
            HttpError::NotImplemented => "Not Implemented",
            HttpError::ServiceUnavailable => "Service Unavailable",
        }
    }

    /// Appends the complete HTTP response (status line, headers, short text body) to `out`.
    ///
    /// Every response carries `Connection: close`: the caller closes the connection after
    /// writing it. 426 carries `Upgrade: websocket` and `Sec-WebSocket-Version: 13` (RFC 6455
    /// §4.2.2 step 4, RFC 9110 §15.5.22); 405 carries `Allow: GET` (RFC 9110 §15.5.6).
    pub fn write_response(&self, out: &mut Vec<u8>) {
        let extra: &[u8] = match self {
            // Upgrade is hop-by-hop, so its sender lists it in Connection (RFC 9110 §7.8).
            HttpError::UpgradeRequired => {
                b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\nConnection: Upgrade, close\r\n"
            }
            HttpError::MethodNotAllowed => b"Allow: GET\r\nConnection: close\r\n",
            _ => b"Connection: close\r\n",
        };
        let detail = match self {
            HttpError::BadRequest(detail) => detail.as_bytes(),
            _ => b"",
        };
        let reason = self.reason().as_bytes();
        // Body: `<reason>[: <detail>]\n`.
        let body_len = reason.len()
            + if detail.is_empty() {
                0
            } else {
                2 + detail.len()
            }
            + 1;
        write_head(
            out,
            self.status(),
            reason,
            b"text/plain; charset=utf-8",
            body_len,
            extra,
        );
        out.extend_from_slice(reason);
        if !detail.is_empty() {
            out.extend_from_slice(b": ");
            out.extend_from_slice(detail);
        }
        out.push(b'\n');
    }
}

impl fmt::Display for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HTTP {} {}", self.status(), self.reason())?;
        if let HttpError::BadRequest(detail) = self {
            write!(f, ": {detail}")?;
        }
        Ok(())
    }
}

impl std::error::Error for HttpError {}

/// A parsed HTTP/1.1 request head. Borrows from the receive buffer.
///
/// [`parse_request`] guarantees the head is syntactically valid HTTP/1.1; whether it is a valid
/// WebSocket upgrade is [`Request::websocket_key`]'s question.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request<'a> {
    method: &'a str,
    path: &'a str,
    headers: Vec<(&'a str, &'a [u8])>,
    body: &'a [u8],
}

impl<'a> Request<'a> {
    /// The request with its body (see [`body_length`]).
    pub fn with_body(self, body: &'a [u8]) -> Request<'a> {
        Request { body, ..self }
    }

    /// The body of a plain HTTP request (empty for upgrades and requests without one).
    pub fn body(&self) -> &'a [u8] {
        self.body
    }

    /// The request target's path, without the query string, e.g. `/chat`.
    pub fn path_only(&self) -> &'a str {
        self.path
            .split_once('?')
            .map_or(self.path, |(path, _)| path)
    }

    /// The query string after `?`, without it (`None` without one), e.g. `room=1&x=2`.
    pub fn query(&self) -> Option<&'a str> {
        self.path.split_once('?').map(|(_, query)| query)
    }

    /// The value of one `name=value` parameter of the query string, as sent (not
    /// percent-decoded).
    pub fn query_param(&self, name: &str) -> Option<&'a str> {
        self.query()?
            .split('&')
            .filter_map(|pair| pair.split_once('=').or(Some((pair, ""))))
            .find(|&(key, _)| key == name)
            .map(|(_, value)| value)
    }

    /// The value of a cookie from the `Cookie` headers (RFC 6265 §5.4), as sent.
    pub fn cookie(&self, name: &str) -> Option<&'a str> {
        self.values("cookie")
            .filter_map(|v| std::str::from_utf8(v).ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|pair| pair.trim().split_once('='))
            .find(|&(key, _)| key == name)
            .map(|(_, value)| value.trim_matches('"'))
    }

    /// Whether the client asked to close the connection after this request
    /// (`Connection: close`, RFC 9112 §9.6).
    pub fn wants_close(&self) -> bool {
        self.has_token("connection", "close")
    }

    /// The method, e.g. `GET`.
    pub fn method(&self) -> &'a str {
        self.method
    }

    /// The request target, e.g. `/chat?room=1`.
    pub fn path(&self) -> &'a str {
        self.path
    }

    /// The first header with this name (case-insensitive), its value without surrounding
    /// whitespace.
    pub fn header(&self, name: &str) -> Option<&'a [u8]> {
        self.values(name).next()
    }

    /// Every header, in order.
    pub fn headers(&self) -> impl Iterator<Item = (&'a str, &'a [u8])> + '_ {
        self.headers.iter().copied()
    }

    /// The `Host` header, if present and UTF-8. After [`Request::websocket_key`] succeeded it
    /// is always `Some`.
    pub fn host(&self) -> Option<&'a str> {
        self.header("host")
            .and_then(|v| std::str::from_utf8(v).ok())
    }

    /// The `Origin` header (RFC 6455 §4.2.1 item 7, RFC 6454 §7), if present and UTF-8.
    ///
    /// After [`Request::websocket_key`] succeeded, `None` means the client sent no `Origin`
    /// (typically a non-browser client): that method rejects a repeated or non-UTF-8 `Origin`,
    /// so an origin check cannot be dodged by sending a malformed one.
    pub fn origin(&self) -> Option<&'a str> {
        self.header("origin")
            .and_then(|v| std::str::from_utf8(v).ok())
    }

    /// Whether the request asks for a WebSocket upgrade at all (an `Upgrade` header listing
    /// `websocket`), so a server can serve plain HTTP on other requests.
    pub fn is_upgrade(&self) -> bool {
        self.has_token("upgrade", "websocket")
    }

    /// Checks every rule of RFC 6455 §4.2.1 and returns the `Sec-WebSocket-Key`.
    ///
    /// The HTTP/1.1 requirement (item 1) is already enforced by [`parse_request`]. Beyond the
    /// RFC, it refuses what would make the handshake ambiguous: a repeated `Host`, `Origin` or
    /// key, a non-UTF-8 `Host` or `Origin`, and a request body (`Transfer-Encoding`, or a
    /// `Content-Length` other than 0), whose bytes would otherwise be taken for frames.
    ///
    /// # Errors
    /// 405 for a method other than GET; 400 for a missing or repeated Host, missing Upgrade or
    /// Connection tokens, a key that is missing, repeated or does not decode to 16 bytes, or a
    /// body; 426 for a version other than 13.
    pub fn websocket_key(&self) -> Result<&'a str, HttpError> {
        // RFC 6455 §4.2.1 item 1: the method is GET (methods are case-sensitive).
        if self.method != "GET" {
            return Err(HttpError::MethodNotAllowed);
        }
        // Item 2: a Host header; RFC 9112 §3.2: exactly one, else 400.
        match self.count("host") {
            0 => return Err(HttpError::BadRequest("missing Host header")),
            1 => {}
            _ => return Err(HttpError::BadRequest("repeated Host header")),
        }
        if self.host().map_or(true, str::is_empty) {
            return Err(HttpError::BadRequest("invalid Host header"));
        }
        // Item 3: Upgrade lists `websocket`.
        if !self.is_upgrade() {
            return Err(HttpError::BadRequest(
                "not a WebSocket upgrade: no Upgrade: websocket",
            ));
        }
        // Item 4: Connection lists `Upgrade`, in any of its headers.
        if !self.has_token("connection", "upgrade") {
            return Err(HttpError::BadRequest(
                "Connection header does not list Upgrade",
            ));
        }
        // Item 6, §4.2.2 step 4: exactly version 13, else 426 naming the one we speak.
        if self.count("sec-websocket-version") != 1
            || self.header("sec-websocket-version") != Some(&b"13"[..])
        {
            return Err(HttpError::UpgradeRequired);
        }
        // Item 5: one key, base64 of 16 bytes.
        let key = match self.count("sec-websocket-key") {
            0 => return Err(HttpError::BadRequest("missing Sec-WebSocket-Key header")),
            1 => self.header("sec-websocket-key").unwrap_or_default(),
            _ => return Err(HttpError::BadRequest("repeated Sec-WebSocket-Key header")),
        };
        let key = valid_key(key).ok_or(HttpError::BadRequest("invalid Sec-WebSocket-Key"))?;
        // Item 7 and RFC 6454 §7.3: at most one Origin; UTF-8 so `origin()` sees it.
        match self.count("origin") {
            0 => {}
            1 if self.origin().is_some() => {}
            _ => return Err(HttpError::BadRequest("invalid or repeated Origin header")),
        }
        // A GET upgrade has no body; one would be read as WebSocket frames.
        if self.count("transfer-encoding") != 0 || self.values("content-length").any(|v| v != b"0")
        {
            return Err(HttpError::BadRequest("unexpected request body"));
        }
        Ok(key)
    }

    /// The subprotocols offered in `Sec-WebSocket-Protocol` (RFC 6455 §4.2.1 item 8), over all
    /// such headers, in order: comma-separated, trimmed, empty entries and non-UTF-8 entries
    /// skipped.
    pub fn subprotocols(&self) -> impl Iterator<Item = &'a str> + '_ {
        self.values("sec-websocket-protocol")
            .flat_map(tokens)
            .filter_map(|t| std::str::from_utf8(t).ok())
    }

    /// The raw values of every `Sec-WebSocket-Extensions` header, in order.
    pub fn extension_offers(&self) -> impl Iterator<Item = &'a [u8]> + '_ {
        self.values("sec-websocket-extensions")
    }

    /// The values of every header with this name (case-insensitive), in order.
    fn values<'s>(&'s self, name: &'s str) -> impl Iterator<Item = &'a [u8]> + 's {
        self.headers
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| *v)
    }

    /// How many headers carry this name.
    fn count(&self, name: &str) -> usize {
        self.values(name).count()
    }

    /// Whether any header `name` lists `token` (case-insensitive) in its comma-separated value
    /// (RFC 9110 §5.6.1, §5.3: repeated headers combine into one list).
    fn has_token(&self, name: &str, token: &str) -> bool {
        self.values(name)
            .flat_map(tokens)
            .any(|t| t.eq_ignore_ascii_case(token.as_bytes()))
    }
}

/// Parses a request head from everything received so far.
///
/// Returns `Ok(None)` while the head is incomplete (and still within [`Limits`]), or the
/// request and the number of bytes its head took, blank line included; bytes after it are not
/// looked at. Each call parses from the start: with tiny reads the total work is bounded by
/// `max_request_bytes` squared over the read size.
///
/// A method other than GET parses fine (so the server may answer it as plain HTTP);
/// [`Request::websocket_key`] refuses it with 405.
///
/// # Errors
/// 400 for malformed HTTP (binary garbage, bad tokens, bare CR) or a version other than
/// HTTP/1.1. HTTP/1.0 gets 400 rather than 426 because RFC 6455 §4.1 asks for HTTP/1.1 or
/// higher and our 426 names WebSocket version 13, which would mislead the client. 431 when the
/// head exceeds `max_request_bytes` (as soon as more bytes arrived than that, even if the head
/// is incomplete) or has more than `max_headers` headers.
pub fn parse_request<'a>(
    buf: &'a [u8],
    limits: &Limits,
) -> Result<Option<(Request<'a>, usize)>, HttpError> {
    // Parse at most the allowed bytes: a head that does not end within them is too large.
    let window = &buf[..buf.len().min(limits.max_request_bytes)];
    // More slots than the window can fill would be wasted, so a huge `max_headers` costs
    // nothing; with fewer slots than that, httparse reports TooManyHeaders exactly when the
    // window holds more than `max_headers` headers.
    let slots = limits.max_headers.min(window.len() / MIN_HEADER_LINE + 1);
    let mut inline = [httparse::EMPTY_HEADER; INLINE_HEADERS];
    let mut heap;
    let headers = if slots <= INLINE_HEADERS {
        &mut inline[..slots]
    } else {
        heap = vec![httparse::EMPTY_HEADER; slots];
        &mut heap[..]
    };
    let mut parsed = httparse::Request::new(headers);
    let result = parsed.parse(window);
    // Known as soon as the request line is in, whatever follows: refuse early, and the same
    // way however the bytes were split. RFC 6455 §4.1: HTTP/1.1 or higher.
    if parsed.version == Some(0) {
        return Err(HttpError::BadRequest("HTTP/1.1 required"));
    }
    match result {
        Ok(httparse::Status::Complete(len)) => {
            let (Some(method), Some(path), Some(1)) = (parsed.method, parsed.path, parsed.version)
            else {
                return Err(HttpError::BadRequest("HTTP/1.1 required"));
            };
            let headers = parsed.headers.iter().map(|h| (h.name, h.value)).collect();
            Ok(Some((
                Request {
                    method,
                    path,
                    headers,
                    body: &[],
                },
                len,
            )))
        }
        Ok(httparse::Status::Partial) => {
            if buf.len() >= limits.max_request_bytes {
                // The window is full and the head has not ended: it needs more than the cap.
                Err(HttpError::HeadersTooLarge)
            } else {
                Ok(None)
            }
        }
        Err(httparse::Error::TooManyHeaders) => Err(HttpError::HeadersTooLarge),
        Err(e) => Err(HttpError::BadRequest(match e {
            httparse::Error::HeaderName => "invalid header name",
            httparse::Error::HeaderValue => "invalid header value",
            httparse::Error::NewLine => "invalid line ending",
            httparse::Error::Version => "HTTP/1.1 required",
            _ => "malformed request line",
        })),
    }
}

/// The length of a plain HTTP request's body (RFC 9112 §6.3): `Content-Length`, or 0.
///
/// # Errors
/// 501 for `Transfer-Encoding` (chunked bodies are not supported), 400 for a malformed or
/// repeated-and-different `Content-Length` or both headers, 413 above `max_body`.
pub fn body_length(req: &Request<'_>, max_body: usize) -> Result<usize, HttpError> {
    let mut lengths = req.values("content-length");
    let length = match lengths.next() {
        None => None,
        Some(value) => {
            if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
                return Err(HttpError::BadRequest("invalid Content-Length"));
            }
            if lengths.any(|other| other != value) {
                return Err(HttpError::BadRequest("conflicting Content-Length"));
            }
            // All digits: only overflow can fail, and that is too large anyway.
            let n = std::str::from_utf8(value)
                .ok()
                .and_then(|v| v.parse::<usize>().ok());
            Some(n.unwrap_or(usize::MAX))
        }
    };
    if req.header("transfer-encoding").is_some() {
        if length.is_some() {
            return Err(HttpError::BadRequest(
                "both Content-Length and Transfer-Encoding",
            ));
        }
        return Err(HttpError::NotImplemented);
    }
    match length {
        Some(n) if n > max_body => Err(HttpError::PayloadTooLarge),
        n => Ok(n.unwrap_or(0)),
    }
}

/// The standard reason phrase of a status code (RFC 9110 §15), or `"Unknown"`.
pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        101 => "Switching Protocols",
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        301 => "Moved Permanently",
        302 => "Found",
        303 => "See Other",
        304 => "Not Modified",
        307 => "Temporary Redirect",
        308 => "Permanent Redirect",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        410 => "Gone",
        411 => "Length Required",
        413 => "Content Too Large",
        414 => "URI Too Long",
        415 => "Unsupported Media Type",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    }
}

/// Whether `name` is a valid header name (an RFC 9110 token).
pub fn is_header_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Whether `value` may be written as a header value (no CR, LF or NUL).
pub fn is_header_value(value: &str) -> bool {
    !value.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0)
}

/// Appends an HTTP/1.1 response with any status, the given header lines, `Content-Length`,
/// and `Connection: close` when `close`. Header names and values must satisfy
/// [`is_header_name`] and [`is_header_value`] (checked in debug builds); `Content-Length`
/// and `Connection` among them are the caller's mistake (they are written here). With
/// `head_only` (the answer to `HEAD`) the body is left out but its length is still given;
/// 1xx, 204 and 304 never carry a body or a length (RFC 9110 §6.4.1, §8.6).
pub fn write_http(
    out: &mut Vec<u8>,
    status: u16,
    headers: &[(String, String)],
    body: &[u8],
    close: bool,
    head_only: bool,
) {
    let bodiless = matches!(status, 100..=199 | 204 | 304);
    debug_assert!(headers
        .iter()
        .all(|(n, v)| is_header_name(n) && is_header_value(v)));
    out.extend_from_slice(b"HTTP/1.1 ");
    push_decimal(out, status.into());
    out.push(b' ');
    out.extend_from_slice(reason_phrase(status).as_bytes());
    out.extend_from_slice(b"\r\nServer: ");
    out.extend_from_slice(SERVER);
    push_headers(out, headers);
    if !bodiless {
        out.extend_from_slice(b"\r\nContent-Length: ");
        push_decimal(out, body.len());
    }
    if close {
        out.extend_from_slice(b"\r\nConnection: close");
    }
    out.extend_from_slice(b"\r\n\r\n");
    if !bodiless && !head_only {
        out.extend_from_slice(body);
    }
}

/// The `Sec-WebSocket-Accept` value for a key (RFC 6455 §4.2.2 step 5.4):
/// base64(SHA-1(key + GUID)).
pub fn accept_key(key: &[u8]) -> [u8; 28] {
    let mut sha1 = Sha1::new();
    sha1.update(key);
    sha1.update(WEBSOCKET_GUID);
    let digest = sha1.finalize();
    let mut out = [0u8; 28];
    // A 20-byte digest is exactly 28 base64 characters with padding, so this cannot fail.
    let written = BASE64.encode_slice(digest, &mut out);
    debug_assert_eq!(written, Ok(28));
    out
}

/// Appends the `101 Switching Protocols` response (RFC 6455 §4.2.2 step 5) to `out`.
///
/// `key` is the client's key as [`Request::websocket_key`] returned it. `protocol` is the
/// subprotocol chosen from [`Request::subprotocols`], `extensions` the negotiated extension
/// response; both are written verbatim, so they must be valid header values (no CR or LF).
pub fn write_accept(
    out: &mut Vec<u8>,
    key: &str,
    protocol: Option<&str>,
    extensions: Option<&str>,
) {
    write_accept_with(out, key, protocol, extensions, &[]);
}

/// [`write_accept`] with more header lines (e.g. `Set-Cookie`), which must satisfy
/// [`is_header_name`] and [`is_header_value`].
pub fn write_accept_with(
    out: &mut Vec<u8>,
    key: &str,
    protocol: Option<&str>,
    extensions: Option<&str>,
    headers: &[(String, String)],
) {
    debug_assert!(protocol.into_iter().chain(extensions).all(is_header_value));
    const HEAD: &[u8] = b"HTTP/1.1 101 Switching Protocols\r\n\
        Upgrade: websocket\r\n\
        Connection: Upgrade\r\n\
        Sec-WebSocket-Accept: ";
    const PROTOCOL: &[u8] = b"\r\nSec-WebSocket-Protocol: ";
    const EXTENSIONS: &[u8] = b"\r\nSec-WebSocket-Extensions: ";
    const SERVER_LINE: &[u8] = b"\r\nServer: ";
    let accept = accept_key(key.as_bytes());
    let optional = |prefix: &[u8], v: Option<&str>| v.map_or(0, |v| prefix.len() + v.len());
    out.reserve(
        HEAD.len()
            + accept.len()
            + optional(PROTOCOL, protocol)
            + optional(EXTENSIONS, extensions)
            + SERVER_LINE.len()
            + SERVER.len()
            + 4,
    );
    out.extend_from_slice(HEAD);
    out.extend_from_slice(&accept);
    if let Some(protocol) = protocol {
        out.extend_from_slice(PROTOCOL);
        out.extend_from_slice(protocol.as_bytes());
    }
    if let Some(extensions) = extensions {
        out.extend_from_slice(EXTENSIONS);
        out.extend_from_slice(extensions.as_bytes());
    }
    out.extend_from_slice(SERVER_LINE);
    out.extend_from_slice(SERVER);
    push_headers(out, headers);
    out.extend_from_slice(b"\r\n\r\n");
}

/// Appends a plain HTTP/1.1 response (for pages served beside the WebSocket endpoint), with
/// `Content-Length`, `Content-Type` and `Connection: close`.
///
/// `status` should be a three-digit code that allows a body (not 1xx, 204 or 304); `reason`
/// and `content_type` are written verbatim, so they must not contain CR or LF.
pub fn write_response(
    out: &mut Vec<u8>,
    status: u16,
    reason: &str,
    content_type: &str,
    body: &[u8],
) {
    debug_assert!(is_header_value(reason) && is_header_value(content_type));
    write_head(
        out,
        status,
        reason.as_bytes(),
        content_type.as_bytes(),
        body.len(),
        b"Connection: close\r\n",
    );
    out.extend_from_slice(body);
}

/// Appends a status line and the common headers; `extra` is zero or more complete header
/// lines. The caller appends exactly `body_len` body bytes.
fn write_head(
    out: &mut Vec<u8>,
    status: u16,
    reason: &[u8],
    content_type: &[u8],
    body_len: usize,
    extra: &[u8],
) {
    out.extend_from_slice(b"HTTP/1.1 ");
    push_decimal(out, status.into());
    out.push(b' ');
    out.extend_from_slice(reason);
    out.extend_from_slice(b"\r\nServer: ");
    out.extend_from_slice(SERVER);
    out.extend_from_slice(b"\r\nContent-Type: ");
    out.extend_from_slice(content_type);
    out.extend_from_slice(b"\r\nContent-Length: ");
    push_decimal(out, body_len);
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(extra);
    out.extend_from_slice(b"\r\n");
}

/// Appends header lines, each after a CRLF (the caller ends the head).
fn push_headers(out: &mut Vec<u8>, headers: &[(String, String)]) {
    for (name, value) in headers {
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
    }
}

/// Appends `n` in decimal, without going through `fmt`.
fn push_decimal(out: &mut Vec<u8>, mut n: usize) {
    let mut digits = [0u8; 20]; // usize::MAX has 20 digits
    let mut start = digits.len();
    loop {
        start -= 1;
        digits[start] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[start..]);
}

/// The non-empty entries of a comma-separated header value, without surrounding whitespace
/// (RFC 9110 §5.6.1: empty list elements are ignored).
fn tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(trim_ows)
        .filter(|t| !t.is_empty())
}

/// `s` without leading and trailing spaces and tabs (RFC 9110 §5.6.3 OWS).
fn trim_ows(s: &[u8]) -> &[u8] {
    let is_ows = |b: &u8| *b == b' ' || *b == b'\t';
    let start = s.iter().position(|b| !is_ows(b)).unwrap_or(s.len());
    let end = s.iter().rposition(|b| !is_ows(b)).map_or(start, |i| i + 1);
    &s[start..end]
}

/// The key itself if it is base64 that decodes to exactly 16 bytes (RFC 6455 §4.2.1 item 5).
fn valid_key(key: &[u8]) -> Option<&str> {
    // 16 bytes encode to 24 characters, 2 of them padding. Checking the length first keeps
    // the decoder's work bounded; the decoder rejects non-canonical trailing bits.
    if key.len() != 24 {
        return None;
    }
    let mut decoded = [0u8; 18];
    match BASE64.decode_slice(key, &mut decoded) {
        Ok(16) => std::str::from_utf8(key).ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// The client handshake of RFC 6455 §1.2.
    const RFC_REQUEST: &[u8] = b"GET /chat HTTP/1.1\r\n\
        Host: server.example.com\r\n\
        Upgrade: websocket\r\n\
        Connection: Upgrade\r\n\
        Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
        Origin: http://example.com\r\n\
        Sec-WebSocket-Protocol: chat, superchat\r\n\
        Sec-WebSocket-Version: 13\r\n\r\n";

    const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

    fn parse(buf: &[u8]) -> Result<Option<(Request<'_>, usize)>, HttpError> {
        parse_request(buf, &Limits::default())
    }

    fn parse_complete(buf: &[u8]) -> Request<'_> {
        match parse(buf) {
            Ok(Some((req, len))) => {
                assert_eq!(len, buf.len());
                req
            }
            other => panic!("expected a complete request, got {other:?}"),
        }
    }

    /// A valid upgrade request with `headers` replacing the defaults of the same names
    /// (an empty value removes the header) and `extra` lines appended verbatim.
    fn request_with(headers: &[(&str, &str)], extra: &str) -> Vec<u8> {
        let mut defaults = vec![
            ("Host", "localhost:9001"),
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Key", KEY),
            ("Sec-WebSocket-Version", "13"),
        ];
        for (name, value) in headers {
            match defaults.iter_mut().find(|(n, _)| n == name) {
                Some(slot) => slot.1 = value,
                None => defaults.push((name, value)),
            }
        }
        let mut out = b"GET / HTTP/1.1\r\n".to_vec();
        for (name, value) in defaults.iter().filter(|(_, v)| !v.is_empty()) {
            out.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
        }
        out.extend_from_slice(extra.as_bytes());
        out.extend_from_slice(b"\r\n");
        out
    }

    /// `buf` with every `~` replaced by the non-UTF-8 byte 0xFF.
    fn tilde_to_ff(mut buf: Vec<u8>) -> Vec<u8> {
        buf.iter_mut()
            .filter(|b| **b == b'~')
            .for_each(|b| *b = 0xff);
        buf
    }

    fn key_of(buf: &[u8]) -> Result<&str, HttpError> {
        parse_complete(buf).websocket_key()
    }

    #[test]
    fn accept_key_matches_rfc_example() {
        // RFC 6455 §1.3.
        assert_eq!(&accept_key(KEY.as_bytes()), b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    #[test]
    fn accepts_rfc_example_request() {
        let req = parse_complete(RFC_REQUEST);
        assert_eq!(req.method(), "GET");
        assert_eq!(req.path(), "/chat");
        assert_eq!(req.host(), Some("server.example.com"));
        assert_eq!(req.origin(), Some("http://example.com"));
        assert!(req.is_upgrade());
        assert_eq!(req.websocket_key(), Ok(KEY));
        assert_eq!(
            req.subprotocols().collect::<Vec<_>>(),
            ["chat", "superchat"]
        );
        assert_eq!(req.extension_offers().count(), 0);
        assert_eq!(req.headers().count(), 7);
    }

    #[test]
    fn writes_rfc_example_response() {
        let mut out = b"prefix".to_vec();
        write_accept(&mut out, KEY, Some("chat"), Some("permessage-deflate"));
        assert_eq!(
            out,
            b"prefixHTTP/1.1 101 Switching Protocols\r\n\
            Upgrade: websocket\r\n\
            Connection: Upgrade\r\n\
            Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\
            Sec-WebSocket-Protocol: chat\r\n\
            Sec-WebSocket-Extensions: permessage-deflate\r\n\
            Server: ringsock\r\n\r\n"
        );
    }

    #[test]
    fn accept_without_protocol_or_extensions_omits_their_headers() {
        let mut out = Vec::new();
        write_accept(&mut out, KEY, None, None);
        let text = std::str::from_utf8(&out).unwrap();
        assert!(text.starts_with("HTTP/1.1 101 Switching Protocols\r\n"));
        assert!(!text.contains("Sec-WebSocket-Protocol"));
        assert!(!text.contains("Sec-WebSocket-Extensions"));
        assert!(text.ends_with("Server: ringsock\r\n\r\n"));
        assert_eq!(out.capacity(), out.len(), "reserve computes the exact size");
    }

    #[test]
    fn leaves_bytes_after_the_head_unconsumed() {
        let mut buf = RFC_REQUEST.to_vec();
        buf.extend_from_slice(b"\x81\x85frame");
        let (_, len) = parse(&buf).unwrap().unwrap();
        assert_eq!(len, RFC_REQUEST.len());
    }

    #[test]
    fn parses_at_every_split_point_only_when_complete() {
        let whole = parse_complete(RFC_REQUEST);
        for split in 0..RFC_REQUEST.len() {
            assert!(
                matches!(parse(&RFC_REQUEST[..split]), Ok(None)),
                "prefix of {split} bytes must be incomplete"
            );
        }
        // Byte by byte, as a reader with one-byte reads would call it.
        let mut received = Vec::new();
        let mut completions = 0;
        for &b in RFC_REQUEST {
            received.push(b);
            if let Some((req, len)) = parse(&received).unwrap() {
                assert_eq!((&req, len), (&whole, RFC_REQUEST.len()));
                completions += 1;
            }
        }
        assert_eq!(completions, 1);
    }

    #[test]
    fn accepts_bare_lf_line_endings() {
        let buf = String::from_utf8(request_with(&[], ""))
            .unwrap()
            .replace("\r\n", "\n");
        assert_eq!(key_of(buf.as_bytes()), Ok(KEY));
    }

    #[test]
    fn rejects_non_get_with_405() {
        for method in ["POST", "get", "HEAD", "PUT"] {
            let buf = request_with(&[], "");
            let buf = [method.as_bytes(), &buf[3..]].concat();
            let req = parse_complete(&buf);
            assert_eq!(req.method(), method);
            assert_eq!(
                req.websocket_key(),
                Err(HttpError::MethodNotAllowed),
                "{method}"
            );
        }
    }

    #[test]
    fn rejects_http_1_0_with_400() {
        let buf = request_with(&[], "");
        let buf = String::from_utf8(buf)
            .unwrap()
            .replace("HTTP/1.1", "HTTP/1.0");
        let err = parse(buf.as_bytes()).unwrap_err();
        assert_eq!(err.status(), 400);
        // Refused as soon as the request line is in.
        assert_eq!(parse(b"GET / HTTP/1.0\r\n").unwrap_err().status(), 400);
    }

    #[test]
    fn rejects_other_http_versions_with_400() {
        for version in ["HTTP/2.0", "HTTP/1.2", "HTTP/0.9", "HTTPS/1.1"] {
            let buf = format!("GET / {version}\r\nHost: a\r\n\r\n");
            assert_eq!(
                parse(buf.as_bytes()).unwrap_err().status(),
                400,
                "{version}"
            );
        }
    }

    #[test]
    fn rejects_missing_or_repeated_or_empty_host_with_400() {
        let missing = request_with(&[("Host", "")], "");
        assert_eq!(key_of(&missing).unwrap_err().status(), 400);
        let repeated = request_with(&[], "Host: other\r\n");
        assert_eq!(key_of(&repeated).unwrap_err().status(), 400);
        let empty = request_with(&[("Host", "")], "Host:\r\n");
        assert_eq!(key_of(&empty).unwrap_err().status(), 400);
        let binary = tilde_to_ff(request_with(&[("Host", "~")], ""));
        assert_eq!(key_of(&binary).unwrap_err().status(), 400);
    }

    #[test]
    fn rejects_missing_websocket_upgrade_token_with_400() {
        for upgrade in ["", "h2c", "websockets", "web socket", "TLS/1.0"] {
            let buf = request_with(&[("Upgrade", upgrade)], "");
            let req = parse_complete(&buf);
            assert!(!req.is_upgrade(), "{upgrade}");
            assert_eq!(req.websocket_key().unwrap_err().status(), 400, "{upgrade}");
        }
    }

    #[test]
    fn finds_websocket_in_upgrade_token_lists_case_insensitively() {
        for upgrade in ["WebSocket", "WEBSOCKET", "h2c, websocket", " ,websocket ,"] {
            let buf = request_with(&[("Upgrade", upgrade)], "");
            assert!(parse_complete(&buf).is_upgrade(), "{upgrade}");
            assert_eq!(key_of(&buf), Ok(KEY), "{upgrade}");
        }
        let split = request_with(&[("Upgrade", "h2c")], "Upgrade: websocket\r\n");
        assert_eq!(key_of(&split), Ok(KEY));
    }

    #[test]
    fn plain_http_request_is_not_an_upgrade() {
        let req = parse_complete(b"GET /index.html HTTP/1.1\r\nHost: a\r\n\r\n");
        assert!(!req.is_upgrade());
        assert_eq!(req.websocket_key().unwrap_err().status(), 400);
    }

    #[test]
    fn finds_upgrade_in_connection_token_lists() {
        for connection in [
            "keep-alive, Upgrade",
            "UPGRADE",
            "upgrade",
            "Upgrade,",
            "a,\tupgrade",
        ] {
            let buf = request_with(&[("Connection", connection)], "");
            assert_eq!(key_of(&buf), Ok(KEY), "{connection}");
        }
    }

    #[test]
    fn finds_upgrade_over_several_connection_headers() {
        let buf = request_with(&[("Connection", "keep-alive")], "Connection: Upgrade\r\n");
        assert_eq!(key_of(&buf), Ok(KEY));
    }

    #[test]
    fn rejects_connection_without_upgrade_token_with_400() {
        for connection in [
            "",
            "keep-alive",
            "close",
            "upgrades",
            "up grade",
            "keep-alive; Upgrade",
        ] {
            let buf = request_with(&[("Connection", connection)], "");
            assert_eq!(key_of(&buf).unwrap_err().status(), 400, "{connection:?}");
        }
    }

    #[test]
    fn rejects_other_websocket_versions_with_426() {
        for version in ["", "8", "12", "14", "13, 8", "013", "thirteen"] {
            let buf = request_with(&[("Sec-WebSocket-Version", version)], "");
            assert_eq!(key_of(&buf), Err(HttpError::UpgradeRequired), "{version:?}");
        }
        let twice = request_with(&[], "Sec-WebSocket-Version: 13\r\n");
        assert_eq!(key_of(&twice), Err(HttpError::UpgradeRequired));
    }

    #[test]
    fn accepts_version_with_surrounding_whitespace() {
        let buf = request_with(&[("Sec-WebSocket-Version", "  13\t")], "");
        assert_eq!(key_of(&buf), Ok(KEY));
    }

    #[test]
    fn rejects_missing_or_repeated_key_with_400() {
        let missing = request_with(&[("Sec-WebSocket-Key", "")], "");
        assert_eq!(key_of(&missing).unwrap_err().status(), 400);
        let repeated = request_with(&[], &format!("Sec-WebSocket-Key: {KEY}\r\n"));
        assert_eq!(key_of(&repeated).unwrap_err().status(), 400);
    }

    #[test]
    fn rejects_keys_that_do_not_decode_to_16_bytes_with_400() {
        for key in [
            "dGhlIHNhbXBsZSBub25jZQ",       // missing padding
            "dGhlIHNhbXBsZSBub25jZQ=",      // short padding
            "dGhlIHNhbXBsZSBub25jZR==",     // non-zero trailing bits
            "dGhlIHNhbXBsZSBub25jZQ==AAAA", // 19 bytes
            "dGhlIHNhbXBsZSBub25j",         // 15 bytes
            "dGhlIHNhbXBsZSBub25jZQ=!",     // bad character
            "dGhlIHNhbXBsZSBub25jZQ=-",     // URL-safe alphabet is not base64
            "dGhlIHNhbXBsZSBub25jZ_==",     // URL-safe alphabet is not base64
            "dGhlIHNhbXBsZSBub2 5jZQ==",    // inner space
            "AAAAAAAAAAAAAAAAAAAAAAAA",     // 18 bytes
        ] {
            let buf = request_with(&[("Sec-WebSocket-Key", key)], "");
            assert_eq!(key_of(&buf).unwrap_err().status(), 400, "{key}");
        }
    }

    #[test]
    fn accepts_any_16_byte_key() {
        let key = "AAAAAAAAAAAAAAAAAAAAAA==";
        let buf = request_with(&[("Sec-WebSocket-Key", key)], "");
        assert_eq!(key_of(&buf), Ok(key));
    }

    #[test]
    fn rejects_repeated_or_binary_origin_with_400() {
        let repeated = request_with(&[("Origin", "http://a")], "Origin: http://b\r\n");
        assert_eq!(key_of(&repeated).unwrap_err().status(), 400);
        let binary = tilde_to_ff(request_with(&[("Origin", "http://~")], ""));
        let req = parse_complete(&binary);
        assert_eq!(req.origin(), None);
        assert_eq!(req.websocket_key().unwrap_err().status(), 400);
    }

    #[test]
    fn rejects_a_request_body_with_400() {
        for extra in ["Content-Length: 5\r\n", "Transfer-Encoding: chunked\r\n"] {
            let buf = request_with(&[], extra);
            assert_eq!(key_of(&buf).unwrap_err().status(), 400, "{extra}");
        }
        let zero = request_with(&[], "Content-Length: 0\r\n");
        assert_eq!(key_of(&zero), Ok(KEY));
    }

    #[test]
    fn collects_subprotocols_over_all_headers() {
        let buf = request_with(
            &[("Sec-WebSocket-Protocol", " chat ,, superchat,")],
            "Sec-WebSocket-Protocol: v2.json\r\nSec-WebSocket-Protocol:\r\n",
        );
        let req = parse_complete(&buf);
        assert_eq!(
            req.subprotocols().collect::<Vec<_>>(),
            ["chat", "superchat", "v2.json"]
        );
    }

    #[test]
    fn collects_extension_offers_in_order() {
        let buf = request_with(
            &[(
                "Sec-WebSocket-Extensions",
                "permessage-deflate; client_max_window_bits",
            )],
            "sec-websocket-extensions: x-foo\r\n",
        );
        let req = parse_complete(&buf);
        let offers: Vec<&[u8]> = req.extension_offers().collect();
        assert_eq!(
            offers,
            [&b"permessage-deflate; client_max_window_bits"[..], b"x-foo"]
        );
    }

    #[test]
    fn header_lookup_is_case_insensitive() {
        let req = parse_complete(RFC_REQUEST);
        assert_eq!(req.header("SEC-WEBSOCKET-KEY"), Some(KEY.as_bytes()));
        assert_eq!(req.header("x-missing"), None);
    }

    #[test]
    fn rejects_oversized_head_with_431_even_if_incomplete() {
        let limits = Limits {
            max_request_bytes: 100,
            max_headers: 64,
        };
        // A request line that never ends.
        let line = [b"GET /".as_slice(), &[b'a'; 200]].concat();
        assert_eq!(parse_request(&line[..99], &limits).unwrap(), None);
        assert_eq!(
            parse_request(&line[..100], &limits),
            Err(HttpError::HeadersTooLarge)
        );
        assert_eq!(
            parse_request(&line, &limits),
            Err(HttpError::HeadersTooLarge)
        );
        // Endless headers.
        let mut headers = b"GET / HTTP/1.1\r\n".to_vec();
        while headers.len() < 300 {
            headers.extend_from_slice(b"X: y\r\n");
        }
        assert_eq!(
            parse_request(&headers, &limits),
            Err(HttpError::HeadersTooLarge)
        );
        // Endless blank lines before the request line.
        assert_eq!(
            parse_request(&[b'\n'; 100], &limits),
            Err(HttpError::HeadersTooLarge)
        );
    }

    #[test]
    fn accepts_head_of_exactly_max_request_bytes() {
        let buf = request_with(&[], "");
        let exact = Limits {
            max_request_bytes: buf.len(),
            max_headers: 64,
        };
        assert!(parse_request(&buf, &exact).unwrap().is_some());
        let mut longer = buf.clone();
        longer.extend_from_slice(b"trailing frame bytes");
        assert_eq!(
            parse_request(&longer, &exact).unwrap().unwrap().1,
            buf.len()
        );
        let short = Limits {
            max_request_bytes: buf.len() - 1,
            max_headers: 64,
        };
        assert_eq!(parse_request(&buf, &short), Err(HttpError::HeadersTooLarge));
    }

    #[test]
    fn rejects_too_many_headers_with_431() {
        let limits = Limits {
            max_request_bytes: 1 << 20,
            max_headers: 6,
        };
        let six = request_with(&[], "X-A: 1\r\n");
        assert!(parse_request(&six, &limits).unwrap().is_some());
        let seven = request_with(&[], "X-A: 1\r\nX-B: 2\r\n");
        assert_eq!(
            parse_request(&seven, &limits),
            Err(HttpError::HeadersTooLarge)
        );
        // Refused before the head ends.
        let open = &seven[..seven.len() - 2];
        assert_eq!(
            parse_request(open, &limits),
            Err(HttpError::HeadersTooLarge)
        );
    }

    #[test]
    fn counts_headers_beyond_the_inline_slots() {
        let limits = Limits {
            max_request_bytes: 1 << 20,
            max_headers: 1000,
        };
        let many: String = (0..900).map(|i| format!("X-{i}: v\r\n")).collect();
        let buf = request_with(&[], &many);
        let req = parse_request(&buf, &limits).unwrap().unwrap().0;
        assert_eq!(req.headers().count(), 905);
        assert_eq!(req.websocket_key(), Ok(KEY));
        let over: String = (0..996).map(|i| format!("X-{i}: v\r\n")).collect();
        let buf = request_with(&[], &over);
        assert_eq!(
            parse_request(&buf, &limits),
            Err(HttpError::HeadersTooLarge)
        );
    }

    #[test]
    fn huge_limits_do_not_allocate_up_front() {
        let limits = Limits {
            max_request_bytes: usize::MAX,
            max_headers: usize::MAX,
        };
        assert!(parse_request(RFC_REQUEST, &limits).unwrap().is_some());
        assert_eq!(parse_request(b"GET / HT", &limits).unwrap(), None);
    }

    #[test]
    fn rejects_binary_garbage_with_400() {
        for garbage in [
            &b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"[..], // a TLS ClientHello
            b"\x00\x00\x00\x00",
            b"\x81\x85\x37\xfa\x21\x3d",              // a WebSocket frame
            b"GET / HTTP/1.1\r\nHost: a\rb\r\n\r\n",  // bare CR
            b"GET / HTTP/1.1\r\nHo st: a\r\n\r\n",    // space in a name
            b"GET / HTTP/1.1\r\nHost: a\x00\r\n\r\n", // NUL in a value
            b"GET / HTTP/1.1\r\n Host: a\r\n\r\n",    // obsolete line folding
            b"GET /\x7f HTTP/1.1\r\n\r\n",            // DEL in the target
            b"GET  / HTTP/1.1\r\n\r\n",               // double space
        ] {
            assert_eq!(parse(garbage).unwrap_err().status(), 400, "{garbage:?}");
        }
    }

    #[test]
    fn error_responses_are_complete_and_close() {
        let errors = [
            HttpError::BadRequest("missing Host header"),
            HttpError::Forbidden,
            HttpError::NotFound,
            HttpError::MethodNotAllowed,
            HttpError::UpgradeRequired,
            HttpError::HeadersTooLarge,
            HttpError::InternalServerError,
            HttpError::ServiceUnavailable,
        ];
        for error in errors {
            let mut out = Vec::new();
            error.write_response(&mut out);
            let (head, body) = split_response(&out);
            let status_line = format!("HTTP/1.1 {} {}\r\n", error.status(), error.reason());
            assert!(head.starts_with(&status_line), "{head}");
            assert!(
                head.contains("\r\nContent-Type: text/plain; charset=utf-8\r\n"),
                "{head}"
            );
            assert!(head.contains(&format!("\r\nContent-Length: {}\r\n", body.len())));
            assert!(head.contains("\r\nServer: ringsock\r\n"), "{head}");
            let connection = head
                .lines()
                .find(|l| l.starts_with("Connection: "))
                .unwrap();
            assert!(connection.ends_with("close"), "{head}");
            assert!(body.starts_with(error.reason()), "{body}");
        }
    }

    #[test]
    fn bad_request_body_names_the_problem() {
        let mut out = Vec::new();
        HttpError::BadRequest("missing Host header").write_response(&mut out);
        assert_eq!(split_response(&out).1, "Bad Request: missing Host header\n");
        assert_eq!(
            HttpError::BadRequest("missing Host header").to_string(),
            "HTTP 400 Bad Request: missing Host header"
        );
    }

    #[test]
    fn upgrade_required_names_version_13() {
        let mut out = Vec::new();
        HttpError::UpgradeRequired.write_response(&mut out);
        let (head, _) = split_response(&out);
        assert!(head.contains("\r\nSec-WebSocket-Version: 13\r\n"), "{head}");
        assert!(head.contains("\r\nUpgrade: websocket\r\n"), "{head}");
        assert!(
            head.contains("\r\nConnection: Upgrade, close\r\n"),
            "{head}"
        );
    }

    #[test]
    fn method_not_allowed_lists_get() {
        let mut out = Vec::new();
        HttpError::MethodNotAllowed.write_response(&mut out);
        assert!(split_response(&out).0.contains("\r\nAllow: GET\r\n"));
    }

    #[test]
    fn plain_response_carries_length_type_and_close() {
        let mut out = Vec::new();
        write_response(&mut out, 200, "OK", "text/html", b"<p>hi</p>");
        assert_eq!(
            out,
            b"HTTP/1.1 200 OK\r\nServer: ringsock\r\nContent-Type: text/html\r\n\
            Content-Length: 9\r\nConnection: close\r\n\r\n<p>hi</p>"
        );
    }

    #[test]
    fn writes_decimal_numbers() {
        for n in [0usize, 7, 10, 99, 100, 12345, usize::MAX] {
            let mut out = Vec::new();
            push_decimal(&mut out, n);
            assert_eq!(out, n.to_string().as_bytes());
        }
    }

    /// Splits a response into head (with its final CRLF CRLF) and body, checking that the
    /// body has the announced length.
    fn split_response(out: &[u8]) -> (&str, &str) {
        let text = std::str::from_utf8(out).unwrap();
        let end = text.find("\r\n\r\n").unwrap() + 4;
        (&text[..end], &text[end..])
    }

    /// Checks that parsing `buf` and its prefix `buf[..split]` agree, as a caller that
    /// receives the bytes in two reads relies on.
    fn check_split_consistency(buf: &[u8], split: usize, limits: &Limits) {
        let full = parse_request(buf, limits);
        let prefix = parse_request(&buf[..split], limits);
        if let Ok(Some((_, len))) = &full {
            assert!(*len <= buf.len());
        }
        match (&prefix, &full) {
            (Ok(None), _) => {}
            (Ok(Some(a)), Ok(Some(b))) => assert_eq!(a, b),
            (Err(a), Err(b)) => assert_eq!(a, b),
            _ => panic!("prefix {prefix:?} disagrees with whole {full:?}"),
        }
        if let Ok(Some((_, len))) = full {
            if split < len {
                assert!(matches!(prefix, Ok(None)), "{prefix:?}");
            }
        }
    }

    /// Everything a server calls on a parsed request, to prove none of it panics.
    fn exercise(req: &Request<'_>) {
        let _ = req.is_upgrade();
        let _ = (req.host(), req.origin(), req.method(), req.path());
        let _ = req.subprotocols().count() + req.extension_offers().count();
        let mut out = Vec::new();
        match req.websocket_key() {
            Ok(key) => {
                let protocol = req.subprotocols().next();
                write_accept(&mut out, key, protocol, None);
                assert!(out.starts_with(b"HTTP/1.1 101 "));
            }
            Err(e) => e.write_response(&mut out),
        }
        assert!(out.ends_with(b"\n"));
    }

    fn header_line() -> impl Strategy<Value = String> {
        let names = prop::sample::select(vec![
            "Host",
            "upgrade",
            "CONNECTION",
            "Sec-WebSocket-Key",
            "Sec-WebSocket-Version",
            "Sec-WebSocket-Protocol",
            "Origin",
            "X",
        ]);
        let values = prop::sample::select(vec![
            "websocket",
            "Upgrade",
            "keep-alive, upgrade",
            KEY,
            "13",
            "chat, ,x",
            "",
            "\u{e9}",
        ]);
        (names, values).prop_map(|(n, v)| format!("{n}: {v}\r\n"))
    }

    proptest! {
        #![proptest_config(crate::proto::conn::tests::proptest_config())]
        #[test]
        fn arbitrary_bytes_never_panic(
            buf in prop::collection::vec(any::<u8>(), 0..512),
            split in any::<prop::sample::Index>(),
            max_request_bytes in 0usize..600,
            max_headers in 0usize..80,
        ) {
            let limits = Limits { max_request_bytes, max_headers };
            check_split_consistency(&buf, split.index(buf.len() + 1), &limits);
            if let Ok(Some((req, _))) = parse_request(&buf, &limits) {
                exercise(&req);
            }
        }

        #[test]
        fn header_soup_never_panics_and_splits_agree(
            method in prop::sample::select(vec!["GET", "POST", "get"]),
            lines in prop::collection::vec(header_line(), 0..12),
            tail in prop::collection::vec(any::<u8>(), 0..16),
            split in any::<prop::sample::Index>(),
        ) {
            let mut buf = format!("{method} /p HTTP/1.1\r\n").into_bytes();
            buf.extend(lines.concat().into_bytes());
            buf.extend_from_slice(b"\r\n");
            buf.extend_from_slice(&tail);
            let limits = Limits::default();
            check_split_consistency(&buf, split.index(buf.len() + 1), &limits);
            let (req, _) = parse_request(&buf, &limits).unwrap().unwrap();
            exercise(&req);
        }

        #[test]
        fn valid_request_is_accepted_at_any_split(
            split in any::<prop::sample::Index>(),
            key in prop::array::uniform16(any::<u8>()),
        ) {
            let key = BASE64.encode(key);
            let buf = request_with(&[("Sec-WebSocket-Key", &key)], "");
            let split = split.index(buf.len());
            prop_assert!(matches!(parse(&buf[..split]), Ok(None)));
            prop_assert_eq!(key_of(&buf), Ok(key.as_str()));
        }
    }
}
