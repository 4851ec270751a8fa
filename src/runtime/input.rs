//! The receive path: a receive completion's bytes go to the connection by phase — the
//! upgrade request, or frames through the engine and on to the application — or into the
//! connection's stash while its output is over the high-water mark.

use std::io;

use super::app::{App, Delivery, Session};
use super::conn::{Phase, Recv, WsPart};
use super::fault;
use super::ring::Cqe;
use super::shard::{handler_panicked, Core, Shard};
use super::token::Token;
use super::{debug_log, warn_log};
use crate::proto::deflate::{self, Deflate};
use crate::proto::handshake::{self, HttpError};
use crate::proto::{CloseCode, Connection, Event, OpCode, State};

impl<A: App> Shard<A> {
    /// A receive completed: data, the peer's FIN, or the end of a (cancelled) receive.
    pub(super) fn on_recv(&mut self, cqe: Cqe) {
        let token = Token::from_raw(cqe.user_data());
        let Shard { ring, core, .. } = self;
        let have_bufs = ring.has_buf_ring();
        // Take the provided buffer first, even for a stale completion, so it is recycled.
        let mut guard = if cqe.buffer_id().is_some() {
            ring.take_buffer(&cqe)
        } else {
            None
        };
        let now = core.now;
        let Some(c) = core.conns.by_token(token) else {
            return;
        };
        let slot = c.link.id.slot;
        if !cqe.more() {
            c.recv = Recv::Idle;
        }
        let res = cqe.result();
        if res > 0 {
            c.last_rx = now;
            c.pinged_at = None;
            if let Some(guard) = guard.as_mut() {
                core.on_received(slot, guard.bytes());
            } else if let Some(mut buf) = c.recv_buf.take() {
                core.on_received(slot, buf.complete(cqe));
                if let Some(c) = core.conns.at(slot) {
                    c.recv_buf = Some(buf);
                }
            }
        } else {
            if let Some(buf) = c.recv_buf.as_mut().filter(|b| b.in_flight()) {
                buf.complete(cqe);
            }
            match -res {
                0 => {
                    // The peer's FIN. Input stashed over the high-water mark is still owed
                    // processing, and replies to it still go out (a half-closed peer reads):
                    // settling ends the connection once both are done, bounded by the close
                    // timeout.
                    c.peer_eof = true;
                    c.deadline.get_or_insert(now.saturating_add(core.close_ms));
                }
                libc::ENOBUFS | libc::ECANCELED => {} // settled below: re-armed if wanted
                libc::EINVAL if core.multishot_recv && have_bufs => {
                    warn_log!("multishot receive refused by the kernel: single-shot receives");
                    core.multishot_recv = false;
                }
                errno => {
                    debug_log!("recv failed: {}", io::Error::from_raw_os_error(errno));
                    c.kill();
                }
            }
        }
        drop(guard);
        if let Some(c) = core.conns.at(slot) {
            core.ctx.touch(&mut c.link);
        }
    }
}

impl<A: App> Core<A> {
    /// Received bytes: dispatched at once, or stashed while the connection's output is over
    /// the high-water mark (the receive is being cancelled, but completions already in the
    /// queue still arrive). So output stays within the mark plus one receive buffer's worth
    /// of replies, and the peer's excess waits in its own socket buffers.
    fn on_received(&mut self, slot: u32, data: &mut [u8]) {
        let mark = self.ctx.limits.high_water_mark;
        let Some(c) = self.conns.at(slot) else {
            return;
        };
        if c.over_mark || c.stash.is_pending() {
            c.stash.bytes.extend_from_slice(data);
            return;
        }
        self.on_bytes(slot, data);
        if let Some(c) = self.conns.at(slot) {
            if c.link.buffered() >= mark {
                c.over_mark = true;
            }
        }
    }

    /// Feeds stashed bytes back, one receive buffer's worth at a time, until the output is
    /// over the mark again or the stash is empty.
    pub(super) fn feed_stash(&mut self, slot: u32) {
        let mark = self.ctx.limits.high_water_mark;
        let chunk = self.config.buffers.recv_buffer_size.max(1);
        loop {
            let Some(c) = self.conns.at(slot) else {
                return;
            };
            if !c.stash.is_pending() {
                c.stash.pos = 0;
                c.stash.bytes.clear();
                return;
            }
            if c.is_dead() || c.over_mark {
                return;
            }
            let mut bytes = std::mem::take(&mut c.stash.bytes);
            let start = c.stash.pos;
            let end = bytes.len().min(start + chunk);
            c.stash.pos = end;
            self.on_bytes(slot, &mut bytes[start..end]);
            let Some(c) = self.conns.at(slot) else {
                return;
            };
            c.stash.bytes = bytes;
            if c.link.buffered() >= mark {
                c.over_mark = true;
            }
        }
    }

    /// Received bytes for a connection, by phase.
    fn on_bytes(&mut self, slot: u32, data: &mut [u8]) {
        let Some(c) = self.conns.at(slot) else {
            return;
        };
        match c.phase {
            Phase::Handshake(_) => self.on_request_bytes(slot, data),
            Phase::Ws => self.on_frames(slot, data),
            // An HTTP answer or a refusal is being flushed, or the connection is closing:
            // the bytes are discarded.
            Phase::Flushing | Phase::HalfClosed | Phase::Dead => {}
        }
    }

    /// Bytes of the upgrade request: once its head parses, answer an HTTP request, refuse,
    /// or upgrade (then frames that came with the request go on to the engine).
    fn on_request_bytes(&mut self, slot: u32, data: &[u8]) {
        let Some(c) = self.conns.at(slot) else {
            return;
        };
        let Phase::Handshake(request) = &mut c.phase else {
            return;
        };
        let mut buf = std::mem::take(request);
        buf.extend_from_slice(data);
        let (req, head) = match handshake::parse_request(&buf, &self.hs_limits) {
            Ok(None) => {
                c.phase = Phase::Handshake(buf);
                return;
            }
            Err(e) => {
                debug_log!("bad request: {e}");
                e.write_response(&mut c.link.out);
                c.flush_then_close();
                return;
            }
            Ok(Some(parsed)) => parsed,
        };
        let app = &*self.app;
        if !req.is_upgrade() {
            let start = c.link.out.len();
            if let Err(message) = fault::guard(|| app.http(&req, &mut c.link.out)) {
                self.mailbox.count_panic();
                warn_log!(
                    "shard {}: handler panicked in on_http (connection from {}): {message}; \
                     answering 500",
                    self.ctx.shard,
                    c.link.peer
                );
                c.link.out.truncate(start);
                HttpError::InternalServerError.write_response(&mut c.link.out);
            }
            c.flush_then_close();
            return;
        }
        let refuse = |out: &mut Vec<u8>, e: HttpError| {
            debug_log!("upgrade refused: {e}");
            e.write_response(out);
        };
        let key = match req.websocket_key() {
            Ok(key) => key,
            Err(e) => {
                refuse(&mut c.link.out, e);
                c.flush_then_close();
                return;
            }
        };
        let accept = match fault::guard(|| app.upgrade(&req)) {
            Ok(Ok(accept)) => accept,
            Ok(Err(e)) => {
                refuse(&mut c.link.out, e);
                c.flush_then_close();
                return;
            }
            Err(message) => {
                self.mailbox.count_panic();
                warn_log!(
                    "shard {}: handler panicked in on_upgrade (connection from {}): {message}; \
                     answering 500",
                    self.ctx.shard,
                    c.link.peer
                );
                refuse(&mut c.link.out, HttpError::InternalServerError);
                c.flush_then_close();
                return;
            }
        };
        let dcfg = &self.config.deflate;
        let negotiated = if dcfg.enabled && accept.compress {
            deflate::negotiate(req.extension_offers(), dcfg)
        } else {
            None
        };
        handshake::write_accept(
            &mut c.link.out,
            key,
            accept.protocol.as_deref(),
            negotiated.as_ref().map(|(_, header)| header.as_str()),
        );
        let codec = negotiated.map(|(params, _)| Deflate::new(params, dcfg));
        c.link.compress = codec.is_some();
        c.link.min_compress = dcfg.min_compress_size;
        c.ws = Some(WsPart {
            engine: Connection::new(self.proto_config, codec),
            state: accept.state,
            poisoned: false,
        });
        c.phase = Phase::Ws;
        c.link.open = true;
        c.deadline = None;
        c.last_rx = self.now;
        self.call(slot, "on_open", |app, session| app.open(session));
        if head < buf.len() {
            self.on_frames(slot, &mut buf[head..]);
        }
        if self.shutting_down {
            self.going_away(slot);
        }
    }

    /// An upgrade that completes while the server shuts down (the request was under way, or
    /// the connection was still in the accept queue) is accepted and at once closed with
    /// 1001, after the frames that came with the request: not refused with a 503.
    ///
    /// In a restart the client did nothing wrong and a new process is already serving; a
    /// 1001 "going away" after a 101 is the close every WebSocket client treats as "reconnect"
    /// (RFC 6455 §7.4.1), and the application sees the usual `on_open` … `on_close`. A 503 is
    /// a failed handshake: browsers report it as an error with close 1006 and give the
    /// application no reason, and client libraries often back off or give up on it.
    fn going_away(&mut self, slot: u32) {
        let (now, close_ms) = (self.now, self.close_ms);
        let Some(c) = self.conns.at(slot) else {
            return;
        };
        if matches!(c.phase, Phase::Ws) {
            c.start_close(CloseCode::GOING_AWAY, "server shutting down", now, close_ms);
            self.ctx.touch(&mut c.link);
        }
    }

    /// Frames: through the engine, each event to the application. Data that arrives after
    /// our close was sent (and before the peer's close) is delivered too; sends from those
    /// calls report `Closed`. A connection whose handler panicked gets no more deliveries,
    /// only its close.
    fn on_frames(&mut self, slot: u32, data: &mut [u8]) {
        let (now, close_ms) = (self.now, self.close_ms);
        let Core {
            app,
            conns,
            ctx,
            mailbox,
            ..
        } = self;
        let app = &**app;
        let Some(c) = conns.at(slot) else {
            return;
        };
        let mut pos = 0;
        while matches!(c.phase, Phase::Ws) {
            let Some(ws) = c.ws.as_mut() else { break };
            let WsPart {
                engine,
                state,
                poisoned,
            } = ws;
            let progress = engine.handle_read(&mut data[pos..], &mut c.link.out);
            pos += progress.consumed;
            let Some(event) = progress.event else { break };
            let failed = matches!(event, Event::Error(_));
            let link = &mut c.link;
            let session = Session {
                link,
                engine: None,
                state,
                ctx,
            };
            let (what, outcome) = match event {
                Event::Close { code, reason } if !session.link.notified => {
                    session.link.notified = true;
                    session.link.open = false;
                    (
                        "on_close",
                        fault::guard(|| app.close(session, code, reason)),
                    )
                }
                Event::Error(e) if !session.link.notified => {
                    debug_log!("protocol error from {}: {e}", session.link.peer);
                    session.link.notified = true;
                    session.link.open = false;
                    let (code, reason) = (Some(e.close_code()), e.to_string());
                    (
                        "on_close",
                        fault::guard(|| app.close(session, code, &reason)),
                    )
                }
                Event::Close { .. } | Event::Error(_) => ("", Ok(())),
                _ if *poisoned => ("", Ok(())),
                Event::Text(text) => (
                    "on_message",
                    fault::guard(|| app.deliver(session, Delivery::Text(text))),
                ),
                Event::Binary(bytes) => (
                    "on_message",
                    fault::guard(|| app.deliver(session, Delivery::Binary(bytes))),
                ),
                Event::Fragment {
                    opcode,
                    data,
                    first,
                    last,
                } => {
                    let text = opcode == OpCode::Text;
                    let piece = Delivery::Fragment {
                        text,
                        data,
                        first,
                        last,
                    };
                    ("on_fragment", fault::guard(|| app.deliver(session, piece)))
                }
                Event::Ping(payload) => (
                    "on_ping",
                    fault::guard(|| app.deliver(session, Delivery::Ping(payload))),
                ),
                Event::Pong(payload) => (
                    "on_pong",
                    fault::guard(|| app.deliver(session, Delivery::Pong(payload))),
                ),
            };
            if let Err(message) = outcome {
                handler_panicked(c, mailbox, what, &message, now, close_ms);
            }
            c.after_callback(now, close_ms);
            if failed {
                // RFC 6455 §7.1.7: failing the connection closes it; after our close frame
                // the server closes TCP first (§7.1.1) and reads on only until the peer's FIN.
                c.flush_then_close();
            }
            let closed =
                c.ws.as_ref()
                    .is_some_and(|w| w.engine.state() == State::Closed);
            if pos >= data.len() && closed {
                break;
            }
        }
        ctx.touch(&mut c.link);
    }
}
