//! The server side of one WebSocket connection after the handshake: frames in, events out,
//! frames encoded into a caller-owned [`Sink`]. No I/O, no clock.
//!
//! # Call protocol
//!
//! ```
//! use ringsock::proto::{Config, Connection, Event};
//!
//! let mut conn = Connection::new(Config::default(), None);
//! let mut out = Vec::new();
//! // A masked text frame "Hi" as a client sends it.
//! let mut read = vec![0x81, 0x82, 1, 2, 3, 4, b'H' ^ 1, b'i' ^ 2];
//! let mut pos = 0;
//! loop {
//!     let progress = conn.handle_read(&mut read[pos..], &mut out);
//!     pos += progress.consumed;
//!     match progress.event {
//!         Some(Event::Text(text)) => assert_eq!(text, "Hi"),
//!         Some(_) => {}
//!         None => break,
//!     }
//! }
//! assert_eq!(pos, read.len());
//! ```
//!
//! [`Connection::handle_read`] takes the bytes just read as `&mut [u8]` and returns at most one
//! [`Event`] per call, borrowing either that buffer (a message that arrived whole in one read:
//! unmasked in place, no copy) or the connection's reassembly buffer (a message that spanned
//! reads or frames: unmasked as it is copied there, one pass). Bytes of a frame that is not
//! complete yet are copied into the connection, so the caller never keeps unconsumed input:
//! once `event` is `None`, all of the buffer was consumed and it can be reused.
//!
//! Obligations the RFC puts on the server are queued into the `out` sink during the call: a
//! pong for every ping (§5.5.2), the close echo (§5.5.1), our close frame after a protocol error
//! (§7.1.7). When [`Connection::state`] becomes [`State::Closed`], the caller flushes `out` and
//! then closes TCP (the server closes first, §7.1.1); further input is ignored. Half-close
//! (`shutdown(SHUT_WR)`) and reading until the peer's FIN keep the close frame from being lost
//! to a reset.
//!
//! Text is validated as it arrives: invalid UTF-8 in a fragment or in a partial frame fails the
//! connection (1007) as soon as the offending bytes are seen (§8.1), not at the end of the
//! message.

use std::ops::Range;

use super::deflate::{Deflate, InflateError};
use super::error::{CloseCode, ProtocolError, SendError};
use super::frame::{self, Header, OpCode, MAX_HEADER_LEN};
use super::mask::apply_mask;
use super::utf8::{self, Utf8Buf, Utf8Validator};

/// Reassembly, inflate and compression buffers up to this capacity survive
/// [`Connection::shrink_buffers`]; larger ones are freed by it, so an idle connection holds no
/// large buffer. Between messages of a busy connection they are kept whatever their size:
/// freeing a 16 MiB buffer after each message made the next one fault in 4096 fresh pages,
/// most of the cost of echoing it (perf record of a 16 MiB echo).
const KEEP_CAPACITY: usize = 64 * 1024;

/// Limits on what a peer may send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// The largest single frame payload accepted (1009 above it). Default 16 MiB, the largest
    /// single frame of Autobahn's 9.x cases.
    pub max_frame_size: usize,
    /// The largest message accepted, after reassembly and inflation (1009 above it).
    /// Default 64 MiB: room for Autobahn's 16 MiB messages with headroom, while a peer can
    /// only make the connection hold as much as it actually sends.
    pub max_message_size: usize,
    /// Hand out messages that do not arrive whole in one read as [`Event::Fragment`]s, piece
    /// by piece as they arrive, instead of reassembling them: for messages too large to hold.
    /// Compressed messages are still reassembled (they inflate as a whole). Default off.
    pub stream_messages: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_frame_size: 16 << 20,
            max_message_size: 64 << 20,
            stream_messages: false,
        }
    }
}

/// Where encoded frames go: the connection's output buffer, owned by the caller.
pub trait Sink {
    /// Appends bytes.
    fn put(&mut self, bytes: &[u8]);

    /// A hint that `additional` more bytes are about to be put, so a growable sink grows
    /// once per frame rather than once per `put`.
    #[inline]
    fn reserve(&mut self, additional: usize) {
        let _ = additional;
    }
}

impl Sink for Vec<u8> {
    #[inline]
    fn put(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }

    #[inline]
    fn reserve(&mut self, additional: usize) {
        Vec::reserve(self, additional);
    }
}

/// The server's side of the closing handshake (RFC 6455 §7).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Messages flow both ways.
    Open,
    /// We sent a close frame and wait for the peer's (§5.5.1); messages still arrive.
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
    /// A ping; its pong has been queued already (unless our close was sent).
    Ping(&'a [u8]),
    /// A pong.
    Pong(&'a [u8]),
    /// A piece of a message, with [`Config::stream_messages`] on: the bytes of the message
    /// that arrived in this read, in order. The pieces of one message come one after the
    /// other (control frames may come between them); text is validated as it arrives, so a
    /// piece may end inside a code point, but the whole is valid UTF-8 by the `last` piece
    /// (an [`Event::Error`] comes instead otherwise). Messages that arrive whole in one read
    /// still come as [`Event::Text`] or [`Event::Binary`].
    Fragment {
        /// [`OpCode::Text`] or [`OpCode::Binary`]: the message's type.
        opcode: OpCode,
        /// This piece's bytes.
        data: &'a [u8],
        /// The first piece of its message.
        first: bool,
        /// The last piece of its message.
        last: bool,
    },
    /// The peer's close frame. If we had not sent ours, the echo has been queued. Either way
    /// the state is now [`State::Closed`]: flush the output, then drop TCP.
    Close {
        /// The peer's code, `None` for an empty close frame (reported as 1005).
        code: Option<CloseCode>,
        /// The peer's reason.
        reason: &'a str,
    },
    /// The peer broke the protocol. Our close frame with the matching code has been queued and
    /// the state is [`State::Closed`]: the connection is failed (§7.1.7), so flush the output
    /// and close TCP without waiting for the peer's close.
    Error(ProtocolError),
}

/// What one [`Connection::handle_read`] call did.
#[derive(Debug)]
#[must_use = "the event must be handled and `consumed` bytes skipped"]
pub struct Progress<'a> {
    /// Bytes of the input consumed.
    pub consumed: usize,
    /// The event, if one is ready. `None` only once all input is consumed.
    pub event: Option<Event<'a>>,
    /// The event is a message that came compressed (permessage-deflate).
    pub compressed: bool,
    /// Frames whose header this call read: what the input cost beyond its bytes (an I/O
    /// layer that shares its time between connections charges for them).
    pub frames: u32,
}

/// The frame whose payload is being read.
#[derive(Clone, Copy, Debug)]
struct FrameState {
    opcode: OpCode,
    fin: bool,
    /// The first (or only) frame of a data message.
    first: bool,
    /// No part of the payload was read yet: it may be handed out in place.
    whole: bool,
    mask: [u8; 4],
    phase: usize,
    remaining: u64,
}

/// The data message being received.
#[derive(Clone, Debug)]
struct MessageState {
    opcode: OpCode,
    compressed: bool,
    utf8: Utf8Validator,
    /// Payload bytes received so far, for the size limit.
    len: u64,
    /// A piece of it was handed out already ([`Config::stream_messages`]).
    streamed: bool,
}

/// Where an event's bytes are.
#[derive(Clone, Debug)]
enum Source {
    Input(Range<usize>),
    Reassembly,
    Inflated,
    Control(Range<usize>),
}

/// An event found by the read loop, before its bytes are borrowed.
#[derive(Debug)]
enum Ready {
    Data(OpCode, Source),
    Fragment {
        opcode: OpCode,
        range: Range<usize>,
        first: bool,
        last: bool,
    },
    Ping(Source),
    Pong(Source),
    Close(Option<CloseCode>, Source),
    Error(ProtocolError),
}

/// One server-side WebSocket connection after the handshake. See the module docs for the
/// call protocol.
///
/// Only what every open connection needs is kept inline (about 100 bytes); the buffers for
/// input that spans reads and for compression live in a [`Spill`] allocated on first need
/// and given back by [`Connection::shrink_buffers`], so an idle connection stays small.
pub struct Connection {
    config: Config,
    deflate: Option<Box<Deflate>>,
    frame: Option<FrameState>,
    message: Option<MessageState>,
    /// The close frames sent and received (for metrics).
    closes: Closes,
    state: State,
    /// Bytes of a header split across reads, in `spill.header`.
    header_len: u8,
    /// Bytes of a control frame split across reads, in `spill.control`.
    control_len: u8,
    /// `reassembly`/`inflated` were lent to the last event: clear them on the next call.
    lent: bool,
    /// Buffers needed only while input spans reads, or to compress.
    spill: Option<Box<Spill>>,
}

/// A connection's buffers for input that spans reads and for compression, allocated on
/// first need.
struct Spill {
    /// A header split across reads.
    header: [u8; MAX_HEADER_LEN],
    /// A control frame that spans reads (§5.5: at most 125 bytes).
    control: [u8; 125],
    /// A message that spans frames or reads.
    /// Text in it was validated as it arrived, so it is handed out without a second pass.
    reassembly: Utf8Buf,
    /// The inflated message.
    inflated: Utf8Buf,
    /// Compressed output of [`Connection::send`].
    scratch: Vec<u8>,
}

impl Spill {
    /// Whether it holds nothing: no bytes and no allocated buffer.
    fn is_empty(&self) -> bool {
        self.reassembly.is_empty()
            && self.inflated.is_empty()
            && self.reassembly.capacity() == 0
            && self.inflated.capacity() == 0
            && self.scratch.capacity() == 0
    }
}

/// The connection's spill, allocated if it is not yet.
#[inline]
fn spill(spill: &mut Option<Box<Spill>>) -> &mut Spill {
    spill.get_or_insert_with(|| {
        Box::new(Spill {
            header: [0; MAX_HEADER_LEN],
            control: [0; 125],
            reassembly: Utf8Buf::default(),
            inflated: Utf8Buf::default(),
            scratch: Vec::new(),
        })
    })
}

/// The close frames a connection saw: `None` for none yet, `Some(None)` for one without a
/// code.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Closes {
    /// The close frame we sent (ours, or the echo of the peer's).
    pub sent: Option<Option<CloseCode>>,
    /// The peer's close frame.
    pub received: Option<Option<CloseCode>>,
}

impl Connection {
    /// A connection with these limits and, if negotiated, a permessage-deflate codec.
    pub fn new(config: Config, deflate: Option<Deflate>) -> Self {
        Connection {
            config,
            deflate: deflate.map(Box::new),
            frame: None,
            message: None,
            closes: Closes::default(),
            state: State::Open,
            header_len: 0,
            control_len: 0,
            lent: false,
            spill: None,
        }
    }

    /// The close frames sent and received so far.
    pub fn closes(&self) -> Closes {
        self.closes
    }

    /// The closing-handshake state.
    pub fn state(&self) -> State {
        self.state
    }

    /// Whether permessage-deflate was negotiated.
    pub fn is_compressed(&self) -> bool {
        self.deflate.is_some()
    }

    /// Feeds received bytes; payloads handed out from `buf` are unmasked in place. Call again
    /// with `&mut buf[consumed..]` until `event` is `None`; by then all of `buf` was consumed.
    pub fn handle_read<'a, S: Sink>(&'a mut self, buf: &'a mut [u8], out: &mut S) -> Progress<'a> {
        if self.lent {
            self.release_lent();
        }
        let mut pos = 0;
        let mut frames = 0;
        let ready = loop {
            if self.state == State::Closed {
                // RFC 6455 §5.5.1: nothing after the close frame is processed.
                pos = buf.len();
                break None;
            }
            if pos == buf.len() && self.frame.map_or(true, |f| f.remaining > 0) {
                // Out of input; a zero-length frame whose header just arrived still completes.
                break None;
            }
            if self.frame.is_none() && self.header_len == 0 && self.message.is_none() {
                if let Some(ready) = self.read_whole_frame(buf, &mut pos) {
                    frames += 1;
                    break Some(ready);
                }
            }
            if self.frame.is_none() {
                match self.read_header(&buf[pos..]) {
                    Ok(Some(used)) => {
                        pos += used;
                        frames += 1;
                    }
                    Ok(None) => {
                        pos = buf.len();
                        break None;
                    }
                    Err(e) => break Some(self.fail(e, out)),
                }
            }
            match self.read_payload(buf, &mut pos, out) {
                Ok(None) => {}
                Ok(Some(ready)) => break Some(ready),
                Err(e) => break Some(self.fail(e, out)),
            }
        };
        let buf: &'a [u8] = buf;
        let mut compressed = false;
        let event = match ready {
            None => None,
            Some(Ready::Data(opcode, Source::Input(range))) => {
                let bytes = &buf[range];
                if opcode == OpCode::Text {
                    match utf8::validate(bytes) {
                        Ok(text) => Some(Event::Text(text)),
                        // RFC 6455 §8.1: invalid UTF-8 fails the connection with 1007.
                        Err(_) => match self.fail(ProtocolError::InvalidUtf8, out) {
                            Ready::Error(e) => Some(Event::Error(e)),
                            _ => None,
                        },
                    }
                } else {
                    Some(Event::Binary(bytes))
                }
            }
            Some(Ready::Data(opcode, source)) => {
                self.lent = true;
                compressed = matches!(source, Source::Inflated);
                let bytes = self.spill.as_deref().map(|spill| match source {
                    Source::Inflated => &spill.inflated,
                    _ => &spill.reassembly,
                });
                if opcode == OpCode::Text {
                    // Validated while it arrived (or after inflation) in `read_payload`.
                    let text = bytes.and_then(Utf8Buf::as_str).unwrap_or_default();
                    Some(Event::Text(text))
                } else {
                    Some(Event::Binary(bytes.map_or(&[][..], Utf8Buf::as_bytes)))
                }
            }
            Some(Ready::Fragment {
                opcode,
                range,
                first,
                last,
            }) => Some(Event::Fragment {
                opcode,
                data: &buf[range],
                first,
                last,
            }),
            Some(Ready::Ping(source)) => Some(Event::Ping(self.bytes(buf, source))),
            Some(Ready::Pong(source)) => Some(Event::Pong(self.bytes(buf, source))),
            Some(Ready::Close(code, source)) => {
                // The reason was validated in `handle_control`.
                let reason = utf8::validate(self.bytes(buf, source)).unwrap_or_default();
                Some(Event::Close { code, reason })
            }
            Some(Ready::Error(e)) => Some(Event::Error(e)),
        };
        Progress {
            consumed: pos,
            event,
            compressed,
            frames,
        }
    }

    /// Queues a data message: one frame, compressed if permessage-deflate was negotiated,
    /// `compress` asks for it and the codec finds it worth it.
    ///
    /// # Errors
    /// [`SendError::Closed`] once our close frame was sent; [`SendError::InvalidOpCode`] for
    /// anything but [`OpCode::Text`] and [`OpCode::Binary`].
    pub fn send<S: Sink>(
        &mut self,
        out: &mut S,
        opcode: OpCode,
        payload: &[u8],
        compress: bool,
    ) -> Result<(), SendError> {
        if !matches!(opcode, OpCode::Text | OpCode::Binary) {
            return Err(SendError::InvalidOpCode);
        }
        if self.state != State::Open {
            return Err(SendError::Closed);
        }
        if let (true, Some(deflate)) = (compress, self.deflate.as_mut()) {
            let scratch = &mut spill(&mut self.spill).scratch;
            if deflate.compress(payload, scratch) {
                // RFC 7692 §6: RSV1 marks the first frame of a compressed message.
                encode_frame(out, true, true, opcode, scratch);
                return Ok(());
            }
        }
        encode_frame(out, true, false, opcode, payload);
        Ok(())
    }

    /// Queues one frame of a message sent in fragments, never compressed. The first call
    /// names the opcode ([`OpCode::Text`] or [`OpCode::Binary`]), the following ones
    /// [`OpCode::Continuation`]; the last has `fin` set (§5.4). Keeping that order is the
    /// caller's job.
    ///
    /// # Errors
    /// [`SendError::Closed`] once our close frame was sent; [`SendError::InvalidOpCode`] for a
    /// control opcode.
    pub fn send_fragment<S: Sink>(
        &mut self,
        out: &mut S,
        opcode: OpCode,
        payload: &[u8],
        fin: bool,
    ) -> Result<(), SendError> {
        if opcode.is_control() {
            return Err(SendError::InvalidOpCode);
        }
        if self.state != State::Open {
            return Err(SendError::Closed);
        }
        encode_frame(out, fin, false, opcode, payload);
        Ok(())
    }

    /// Queues a ping (§5.5.2).
    ///
    /// # Errors
    /// [`SendError::Closed`], [`SendError::ControlTooLong`].
    pub fn send_ping<S: Sink>(&mut self, out: &mut S, payload: &[u8]) -> Result<(), SendError> {
        self.send_control(out, OpCode::Ping, payload)
    }

    /// Queues an unsolicited pong (§5.5.3), e.g. as a heartbeat.
    ///
    /// # Errors
    /// [`SendError::Closed`], [`SendError::ControlTooLong`].
    pub fn send_pong<S: Sink>(&mut self, out: &mut S, payload: &[u8]) -> Result<(), SendError> {
        self.send_control(out, OpCode::Pong, payload)
    }

    /// Starts the closing handshake: queues our close frame (§5.5.1). The state becomes
    /// [`State::CloseSent`]; messages may still arrive until the peer's close.
    ///
    /// # Errors
    /// [`SendError::Closed`] if a close was already sent, [`SendError::ControlTooLong`] for a
    /// reason over 123 bytes, [`SendError::InvalidCloseCode`] for a code that may not be sent.
    pub fn close<S: Sink>(
        &mut self,
        out: &mut S,
        code: CloseCode,
        reason: &str,
    ) -> Result<(), SendError> {
        if self.state != State::Open {
            return Err(SendError::Closed);
        }
        if !code.is_valid_on_wire() {
            return Err(SendError::InvalidCloseCode);
        }
        if reason.len() > 123 {
            return Err(SendError::ControlTooLong);
        }
        encode_close(out, Some(code), reason.as_bytes());
        self.closes.sent = Some(Some(code));
        self.state = State::CloseSent;
        Ok(())
    }

    fn send_control<S: Sink>(
        &mut self,
        out: &mut S,
        opcode: OpCode,
        payload: &[u8],
    ) -> Result<(), SendError> {
        if self.state != State::Open {
            return Err(SendError::Closed);
        }
        if payload.len() > 125 {
            return Err(SendError::ControlTooLong);
        }
        encode_frame(out, true, false, opcode, payload);
        Ok(())
    }

    /// The bytes of a control frame's payload or a close reason.
    fn bytes<'a>(&'a self, input: &'a [u8], source: Source) -> &'a [u8] {
        let Some(spill) = self.spill.as_deref() else {
            return match source {
                Source::Input(range) => &input[range],
                _ => &[],
            };
        };
        match source {
            Source::Input(range) => &input[range],
            Source::Control(range) => &spill.control[range],
            Source::Reassembly => spill.reassembly.as_bytes(),
            Source::Inflated => spill.inflated.as_bytes(),
        }
    }

    /// Frees the reassembly, inflate and compression buffers that no message in progress
    /// needs, and with them the spill, if nothing in it is still in use. They are kept
    /// between messages, so a stream of large messages does not allocate (and fault in) a new
    /// buffer for each; call this when the connection has been quiet for a while (the runtime
    /// does, from its timer sweep) so an idle connection holds nothing but its inline state.
    /// Returns the buffer bytes freed.
    pub fn shrink_buffers(&mut self) -> usize {
        let Some(spill) = self.spill.as_deref_mut() else {
            return 0;
        };
        let mut freed = 0;
        if self.lent || (self.frame.is_none() && self.message.is_none()) {
            self.lent = false;
            freed += spill.reassembly.shrink(0);
            freed += spill.inflated.shrink(0);
        }
        freed += spill.scratch.capacity();
        spill.scratch = Vec::new();
        if self.header_len == 0 && self.control_len == 0 && spill.is_empty() {
            self.spill = None;
        }
        freed
    }

    /// Takes the buffer that holds the message the last event lent out (one reassembled or
    /// inflated; not one handed out in place from the input), with its allocation: the
    /// caller may send it on without copying. `None` if the last event lent no buffer.
    pub fn take_lent_message(&mut self) -> Option<Vec<u8>> {
        if !self.lent {
            return None;
        }
        let spill = self.spill.as_deref_mut()?;
        self.lent = false;
        // A compressed message was inflated from the reassembled input.
        let message = if spill.inflated.is_empty() {
            spill.reassembly.take_bytes()
        } else {
            spill.reassembly.clear();
            spill.inflated.take_bytes()
        };
        Some(message)
    }

    /// Gives a buffer for reassembling messages (one taken by
    /// [`Connection::take_lent_message`] and written out, this connection's or another's): it
    /// is kept if the reassembly buffer is empty and smaller, so the next message that spans
    /// reads needs no fresh allocation. Otherwise it is handed back.
    pub fn recycle(&mut self, buffer: Vec<u8>) -> Option<Vec<u8>> {
        if self.lent {
            return Some(buffer);
        }
        spill(&mut self.spill).reassembly.adopt(buffer)
    }

    /// Whether the buffers for input that spans reads are allocated (they are freed by
    /// [`Connection::shrink_buffers`] when nothing needs them).
    pub fn has_spill(&self) -> bool {
        self.spill.is_some()
    }

    fn release_lent(&mut self) {
        self.lent = false;
        if let Some(spill) = self.spill.as_deref_mut() {
            spill.reassembly.clear();
            spill.inflated.clear();
        }
    }

    /// Fails the connection (§7.1.7): queues our close with the error's code (unless ours is
    /// out already) and ends the connection; everything after is ignored.
    fn fail<S: Sink>(&mut self, error: ProtocolError, out: &mut S) -> Ready {
        if self.state == State::Open {
            encode_close(out, Some(error.close_code()), b"");
            self.closes.sent = Some(Some(error.close_code()));
        }
        self.state = State::Closed;
        self.frame = None;
        self.message = None;
        self.header_len = 0;
        self.control_len = 0;
        self.lent = false;
        self.spill = None;
        Ready::Error(error)
    }

    /// The hot path: a complete, unfragmented, masked text or binary frame of up to 64 KiB
    /// with no RSV bits, wholly inside `buf[*pos..]`, and no partial state to continue. It is
    /// unmasked in place and handed out; anything else returns `None` and takes the general
    /// path, which applies every rule.
    #[inline]
    fn read_whole_frame(&mut self, buf: &mut [u8], pos: &mut usize) -> Option<Ready> {
        let input = &buf[*pos..];
        let (&b0, &b1) = (input.first()?, input.get(1)?);
        // FIN set, RSV clear, opcode text (1) or binary (2); MASK set.
        let opcode = match b0 {
            0x81 => OpCode::Text,
            0x82 => OpCode::Binary,
            _ => return None,
        };
        if b1 & 0x80 == 0 {
            return None;
        }
        let (len, header_len) = match b1 & 0x7F {
            126 => (
                usize::from(u16::from_be_bytes([*input.get(2)?, *input.get(3)?])),
                8,
            ),
            127 => return None,
            n => (usize::from(n), 6),
        };
        if input.len() < header_len + len
            || len > self.config.max_frame_size
            || len > self.config.max_message_size
        {
            return None;
        }
        let mask = [
            input[header_len - 4],
            input[header_len - 3],
            input[header_len - 2],
            input[header_len - 1],
        ];
        let start = *pos + header_len;
        let end = start + len;
        apply_mask(&mut buf[start..end], mask, 0);
        *pos = end;
        Some(Ready::Data(opcode, Source::Input(start..end)))
    }

    /// Reads a frame header from `input`, possibly completing one split across reads.
    /// Returns the bytes of `input` it used, or `None` if all of `input` went into the
    /// partial header.
    fn read_header(&mut self, input: &[u8]) -> Result<Option<usize>, ProtocolError> {
        if self.header_len == 0 {
            if let Some(used) = self.parse_header(input)? {
                return Ok(Some(used));
            }
            // Incomplete, so shorter than the longest header.
            spill(&mut self.spill).header[..input.len()].copy_from_slice(input);
            self.header_len = input.len() as u8;
            return Ok(None);
        }
        let old = usize::from(self.header_len);
        let take = (MAX_HEADER_LEN - old).min(input.len());
        let mut joined = spill(&mut self.spill).header;
        joined[old..old + take].copy_from_slice(&input[..take]);
        match self.parse_header(&joined[..old + take])? {
            Some(used) => {
                self.header_len = 0;
                Ok(Some(used - old))
            }
            None => {
                spill(&mut self.spill).header = joined;
                self.header_len = (old + take) as u8;
                Ok(None)
            }
        }
    }

    /// Parses and validates a header at the start of `bytes` and sets up the frame. Returns
    /// the header length, or `None` if incomplete.
    fn parse_header(&mut self, bytes: &[u8]) -> Result<Option<usize>, ProtocolError> {
        let Some(header) = frame::parse_header(bytes)? else {
            return Ok(None);
        };
        self.begin_frame(&header)?;
        Ok(Some(header.header_len))
    }

    /// Applies the rules that need the connection's state to a new frame's header.
    fn begin_frame(&mut self, header: &Header) -> Result<(), ProtocolError> {
        // RFC 6455 §5.1: a server MUST close on an unmasked client frame.
        let Some(mask) = header.mask else {
            return Err(ProtocolError::UnmaskedFrame);
        };
        let starts_message = matches!(header.opcode, OpCode::Text | OpCode::Binary);
        // RFC 6455 §5.2: RSV bits need an extension that defines them. RFC 7692 §6: RSV1
        // marks the first frame of a compressed message, and only that.
        if header.rsv23 || (header.rsv1 && !(starts_message && self.deflate.is_some())) {
            return Err(ProtocolError::ReservedBits);
        }
        if header.opcode.is_control() {
            self.control_len = 0;
        } else {
            match (header.opcode, &self.message) {
                // RFC 6455 §5.4: continuation frames need a message; a new message needs
                // the previous one finished.
                (OpCode::Continuation, None) => return Err(ProtocolError::UnexpectedContinuation),
                (OpCode::Text | OpCode::Binary, Some(_)) => {
                    return Err(ProtocolError::ExpectedContinuation)
                }
                _ => {}
            }
            if header.payload_len > self.config.max_frame_size as u64 {
                return Err(ProtocolError::FrameTooBig);
            }
            let so_far = self.message.as_ref().map_or(0, |m| m.len);
            if so_far + header.payload_len > self.config.max_message_size as u64 {
                return Err(ProtocolError::MessageTooBig);
            }
            if starts_message {
                self.message = Some(MessageState {
                    opcode: header.opcode,
                    compressed: header.rsv1,
                    utf8: Utf8Validator::new(),
                    len: 0,
                    streamed: false,
                });
            }
        }
        self.frame = Some(FrameState {
            opcode: header.opcode,
            fin: header.fin,
            first: starts_message,
            whole: true,
            mask,
            phase: 0,
            remaining: header.payload_len,
        });
        Ok(())
    }

    /// Reads payload bytes of the current frame from `buf[*pos..]`.
    fn read_payload<S: Sink>(
        &mut self,
        buf: &mut [u8],
        pos: &mut usize,
        out: &mut S,
    ) -> Result<Option<Ready>, ProtocolError> {
        let Some(mut frame) = self.frame else {
            return Ok(None);
        };
        let start = *pos;
        let available = buf.len() - start;
        let take = usize::try_from(frame.remaining).map_or(available, |r| r.min(available));
        let end = start + take;
        *pos = end;
        let complete = take as u64 == frame.remaining;
        let chunk = &mut buf[start..end];
        let whole = frame.whole;
        // Each branch below unmasks the chunk from `phase`: in place where it is handed out
        // from `buf`, on the way into the reassembly buffer where it is copied there.
        let (mask, phase) = (frame.mask, frame.phase);
        frame.phase = (phase + take) & 3;
        frame.remaining -= take as u64;
        frame.whole = false;
        self.frame = if complete { None } else { Some(frame) };

        if frame.opcode.is_control() {
            apply_mask(chunk, mask, phase);
            if complete && whole {
                let payload = &buf[start..end];
                return self.handle_control(frame.opcode, payload, Source::Input(start..end), out);
            }
            let at = usize::from(self.control_len);
            spill(&mut self.spill).control[at..at + take].copy_from_slice(chunk);
            // A control frame's payload is at most 125 bytes (checked in `parse_header`).
            self.control_len += take as u8;
            if !complete {
                return Ok(None);
            }
            let control = spill(&mut self.spill).control;
            let len = usize::from(std::mem::take(&mut self.control_len));
            return self.handle_control(
                frame.opcode,
                &control[..len],
                Source::Control(0..len),
                out,
            );
        }

        let Some(message) = self.message.as_mut() else {
            return Ok(None);
        };
        if frame.first && frame.fin && whole && complete {
            // The whole message is in this read: hand it out in place, no copy.
            apply_mask(chunk, mask, phase);
            let opcode = message.opcode;
            let compressed = message.compressed;
            self.message = None;
            if compressed {
                return self.inflate(opcode, start..end, buf).map(Some);
            }
            return Ok(Some(Ready::Data(opcode, Source::Input(start..end))));
        }
        // RFC 6455 §8.1 and Autobahn 6.4: text fails as soon as invalid UTF-8 arrives, in the
        // streamed piece here or in the reassembly buffer's push below.
        let text = message.opcode == OpCode::Text && !message.compressed;
        message.len += take as u64;
        if self.config.stream_messages && !message.compressed {
            apply_mask(chunk, mask, phase);
            if text {
                message
                    .utf8
                    .feed(chunk)
                    .map_err(|_| ProtocolError::InvalidUtf8)?;
            }
            let last = complete && frame.fin;
            if take == 0 && !last {
                return Ok(None);
            }
            if last && message.opcode == OpCode::Text {
                message
                    .utf8
                    .finish()
                    .map_err(|_| ProtocolError::InvalidUtf8)?;
            }
            let (opcode, first) = (message.opcode, !message.streamed);
            message.streamed = true;
            if last {
                self.message = None;
            }
            return Ok(Some(Ready::Fragment {
                opcode,
                range: start..end,
                first,
                last,
            }));
        }
        let reassembly = &mut spill(&mut self.spill).reassembly;
        if frame.first && frame.remaining > 0 && reassembly.is_empty() {
            // A message split across reads: reserve once, bounded by what can still arrive
            // soon, so a 14-byte header cannot make us allocate its claimed length.
            let expected = (take as u64 + frame.remaining).min(KEEP_CAPACITY as u64);
            reassembly.reserve(expected as usize);
        }
        reassembly
            .push_masked(chunk, mask, phase, text)
            .map_err(|_| ProtocolError::InvalidUtf8)?;
        if !(complete && frame.fin) {
            return Ok(None);
        }
        let Some(message) = self.message.take() else {
            return Ok(None);
        };
        if message.compressed {
            let input = std::mem::take(&mut spill(&mut self.spill).reassembly);
            let ready = self.inflate(message.opcode, 0..input.as_bytes().len(), input.as_bytes());
            if let Some(spill) = self.spill.as_deref_mut() {
                spill.reassembly = input;
            }
            self.lent = true;
            return ready.map(Some);
        }
        if text && !spill(&mut self.spill).reassembly.is_complete_text() {
            // The message ended inside a code point.
            return Err(ProtocolError::InvalidUtf8);
        }
        Ok(Some(Ready::Data(message.opcode, Source::Reassembly)))
    }

    /// Inflates a compressed message (RFC 7692 §7.2.2) into `inflated`.
    fn inflate(
        &mut self,
        opcode: OpCode,
        range: Range<usize>,
        input: &[u8],
    ) -> Result<Ready, ProtocolError> {
        let Some(deflate) = self.deflate.as_mut() else {
            return Err(ProtocolError::ReservedBits);
        };
        let max = self.config.max_message_size;
        let inflated = &mut spill(&mut self.spill).inflated;
        deflate
            .decompress(&input[range], max, inflated.vec_mut())
            .map_err(|e| match e {
                InflateError::TooBig => ProtocolError::MessageTooBig,
                InflateError::Invalid => ProtocolError::InvalidCompressedData,
            })?;
        if opcode == OpCode::Text {
            inflated
                .check_text()
                .map_err(|_| ProtocolError::InvalidUtf8)?;
        }
        Ok(Ready::Data(opcode, Source::Inflated))
    }

    /// Acts on a complete control frame (§5.5).
    fn handle_control<S: Sink>(
        &mut self,
        opcode: OpCode,
        payload: &[u8],
        source: Source,
        out: &mut S,
    ) -> Result<Option<Ready>, ProtocolError> {
        match opcode {
            OpCode::Ping => {
                // RFC 6455 §5.5.2: answer with a pong carrying the same payload, unless our
                // close is already out (§5.5.1: nothing may follow it).
                if self.state == State::Open {
                    encode_frame(out, true, false, OpCode::Pong, payload);
                }
                Ok(Some(Ready::Ping(source)))
            }
            OpCode::Pong => Ok(Some(Ready::Pong(source))),
            _ => self.handle_close(payload, source, out).map(Some),
        }
    }

    fn handle_close<S: Sink>(
        &mut self,
        payload: &[u8],
        source: Source,
        out: &mut S,
    ) -> Result<Ready, ProtocolError> {
        let reason_source = match &source {
            Source::Input(r) => Source::Input((r.start + 2).min(r.end)..r.end),
            Source::Control(r) => Source::Control((r.start + 2).min(r.end)..r.end),
            other => other.clone(),
        };
        let code = parse_close(payload)?;
        self.closes.received = Some(code);
        if self.state == State::Open {
            // RFC 6455 §5.5.1: echo the status code.
            encode_close(out, code, b"");
            self.closes.sent = Some(code);
        }
        self.state = State::Closed;
        self.message = None;
        Ok(Ready::Close(code, reason_source))
    }
}

/// Parses a close frame's payload (§5.5.1, §7.4): empty, or a valid code and a UTF-8 reason.
fn parse_close(payload: &[u8]) -> Result<Option<CloseCode>, ProtocolError> {
    match payload {
        [] => Ok(None),
        [_] => Err(ProtocolError::InvalidClosePayload),
        [hi, lo, reason @ ..] => {
            let code = CloseCode(u16::from_be_bytes([*hi, *lo]));
            if !code.is_valid_on_wire() {
                return Err(ProtocolError::InvalidCloseCode);
            }
            utf8::validate(reason).map_err(|_| ProtocolError::InvalidUtf8)?;
            Ok(Some(code))
        }
    }
}

/// Encodes one unmasked frame (a server's) into `out`. Useful for encoding a message once and
/// copying it to many connections (broadcast).
#[inline]
pub fn encode_frame<S: Sink>(out: &mut S, fin: bool, rsv1: bool, opcode: OpCode, payload: &[u8]) {
    let mut header = [0u8; MAX_HEADER_LEN];
    let n = frame::encode_header(&mut header, fin, rsv1, opcode, payload.len(), None);
    out.reserve(n + payload.len());
    out.put(&header[..n]);
    out.put(payload);
}

/// Encodes a close frame; `reason` must fit (≤ 123 bytes).
fn encode_close<S: Sink>(out: &mut S, code: Option<CloseCode>, reason: &[u8]) {
    let mut payload = [0u8; 125];
    let len = match code {
        Some(code) => {
            payload[..2].copy_from_slice(&code.0.to_be_bytes());
            let n = reason.len().min(123);
            payload[2..2 + n].copy_from_slice(&reason[..n]);
            2 + n
        }
        None => 0,
    };
    encode_frame(out, true, false, OpCode::Close, &payload[..len]);
}

#[cfg(test)]
pub(crate) mod tests;
