//! The receive path: a receive completion's bytes go to the connection by phase — the
//! upgrade request, or frames through the engine and on to the application — or into the
//! connection's stash while its output is over the high-water mark.

use std::io;

use std::any::Any;
use std::sync::Arc;

use super::app::LEND_FROM;
use super::app::{App, Ctx, DeferKey, Delivery, Session, Verdict};
use super::config::millis;
use super::conn::{Conn, Deferred, Phase, Recv, WsPart, NO_DEADLINE};
use super::fault;
use super::ring::Cqe;
use super::shard::{handler_panicked, Core, Shard, FRAME_COST_KIB};
use super::slab::ConnId;
use super::tls::tls_failed;
use super::token::{Op, Token};
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
            c.pinged_at = 0;
            if let Some(guard) = guard.as_mut() {
                core.on_received(slot, guard.bytes());
            } else if let Some(mut buf) = c.extra.as_mut().and_then(|e| e.recv_buf.take()) {
                core.on_received(slot, buf.complete(cqe));
                if let Some(c) = core.conns.at(slot) {
                    c.extra().recv_buf = Some(buf);
                }
            }
        } else {
            let extra = c.extra.as_deref_mut();
            if let Some(buf) = extra.and_then(|e| e.recv_buf.as_mut().filter(|b| b.in_flight())) {
                buf.complete(cqe);
            }
            match -res {
                0 => {
                    // The peer's FIN. Input stashed over the high-water mark is still owed
                    // processing, and replies to it still go out (a half-closed peer reads):
                    // settling ends the connection once both are done, bounded by the close
                    // timeout.
                    c.peer_eof = true;
                    c.arm_deadline(now.saturating_add(core.close_ms));
                }
                libc::ENOBUFS => {
                    core.ctx.metrics.recv_buffers_exhausted += 1;
                    let order = core.starved.len();
                    core.starved.push((c.last_rx, order, c.link.id));
                }
                libc::ECANCELED => {} // settled below: re-armed if wanted
                libc::EINVAL if core.multishot_recv && have_bufs => {
                    tracing::warn!(
                        shard = core.ctx.shard,
                        "multishot receive refused by the kernel: single-shot receives"
                    );
                    core.multishot_recv = false;
                }
                errno => {
                    tracing::debug!(shard = core.ctx.shard, peer = %c.link.peer, error = %io::Error::from_raw_os_error(errno), "receive failed");
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

impl<A: App> Shard<A> {
    /// Re-arms, before anything else is submitted, the receives that ended with `ENOBUFS` in
    /// this batch: the connection that has waited longest for data first.
    ///
    /// A receive re-armed on a socket with data waiting takes its buffers when it is
    /// submitted, ahead of the receives still armed (whose data is taken when the kernel
    /// runs their task work, later); among the re-armed, the first submitted take the most.
    /// So the order of re-arming decides who is served. Left to `settle`, which pops the
    /// connections a batch touched from the end of a stack, the connections whose `ENOBUFS`
    /// came first in the batch — those re-armed last the batch before, that found the ring
    /// empty at once — were re-armed last again, and again found it empty: measured at 100
    /// connections × 16 in flight of 16 KiB, some got `ENOBUFS` on 200 re-arms in a row and
    /// waited 0.5–3 s while the others were served. Completion order is no better: a
    /// connection that takes every buffer and runs out posts its `ENOBUFS` before the one
    /// re-armed after it, which finds none, so a flooding connection re-armed first stays
    /// first (with a 32-buffer ring, a second connection then waited seconds for one echo).
    /// Ordered by when each last received data (ties in completion order), a connection
    /// that missed out goes first the next time, and one that was just served goes last.
    pub(super) fn rearm_starved(&mut self) {
        let Shard { ring, core, .. } = self;
        if core.starved.is_empty() || !core.multishot_recv {
            core.starved.clear();
            return;
        }
        // Unstable, but the keys are distinct (completion order breaks ties): no allocation.
        core.starved
            .sort_unstable_by_key(|&(last_rx, order, _)| (last_rx, order));
        let mark = core.ctx.limits.high_water_mark;
        for (_, _, id) in core.starved.drain(..) {
            let Some(c) = core.conns.get(id) else {
                continue;
            };
            // What `settle` would decide (its over-mark flag is updated there, so the output
            // is checked against the mark here): the others are left to it.
            let want_read = c.recv == Recv::Idle && c.may_read() && c.link.buffered() < mark;
            if !want_read {
                continue;
            }
            // A failure is left to `settle`, which tries again and ends the connection if
            // that fails too.
            if ring
                .recv_multi(c.fd(), Token::conn(Op::Recv, id).raw())
                .is_ok()
            {
                c.recv = Recv::Armed;
            }
        }
    }
}

impl<A: App> Core<A> {
    /// Received bytes: on a TLS connection decrypted first (a TLS failure ends the
    /// connection after the alert), then on to [`Core::on_plaintext`].
    fn on_received(&mut self, slot: u32, data: &mut [u8]) {
        let Some(c) = self.conns.at(slot) else {
            return;
        };
        let Some(tls) = c.tls.as_mut() else {
            return self.on_plaintext(slot, data);
        };
        let mut plain = tls.take_plain();
        match tls.read(data, &mut plain) {
            Ok(outcome) => {
                if outcome.peer_closed {
                    // close_notify: like a FIN, after everything it follows.
                    c.peer_eof = true;
                    c.arm_deadline(self.now.saturating_add(self.close_ms));
                }
            }
            Err(e) => {
                // The stream cannot carry anything more (a close frame included): send the
                // alert rustls queued, if any, and end the connection.
                tls_failed(&mut self.ctx.metrics, self.ctx.shard, c.link.peer, &e);
                plain.clear();
                c.link.out().clear();
                c.link.open = false;
                c.peer_eof = true;
                c.flush_then_close();
                c.arm_deadline(self.now.saturating_add(self.close_ms));
            }
        }
        self.ctx.touch(&mut c.link);
        if !plain.is_empty() {
            self.on_plaintext(slot, &mut plain);
        }
        if let Some(tls) = self.conns.at(slot).and_then(|c| c.tls.as_mut()) {
            tls.put_plain(plain);
        }
    }

    /// Received plaintext: dispatched at once, or stashed while the connection's output is
    /// over the high-water mark (the receive is being cancelled, but completions already in
    /// the queue still arrive). So output stays within the mark plus one receive buffer's
    /// worth of replies, and the peer's excess waits in its own socket buffers.
    fn on_plaintext(&mut self, slot: u32, data: &mut [u8]) {
        let mark = self.ctx.limits.high_water_mark;
        let Some(c) = self.conns.at(slot) else {
            return;
        };
        if c.over_mark || c.stash_pending() {
            c.extra().stash.bytes.extend_from_slice(data);
            return;
        }
        self.on_bytes(slot, data);
        if let Some(c) = self.conns.at(slot) {
            if !c.over_mark && c.link.buffered() >= mark {
                c.over_mark = true;
                self.ctx.metrics.backpressure_entered += 1;
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
            if !c.stash_pending() {
                if let Some(extra) = c.extra.as_deref_mut() {
                    extra.stash.pos = 0;
                    extra.stash.bytes.clear();
                }
                return;
            }
            if c.is_dead() || c.over_mark {
                return;
            }
            let stash = &mut c.extra().stash;
            let mut bytes = std::mem::take(&mut stash.bytes);
            let start = stash.pos;
            let end = bytes.len().min(start + chunk);
            stash.pos = end;
            self.on_bytes(slot, &mut bytes[start..end]);
            let Some(c) = self.conns.at(slot) else {
                return;
            };
            c.extra().stash.bytes = bytes;
            if !c.over_mark && c.link.buffered() >= mark {
                c.over_mark = true;
                self.ctx.metrics.backpressure_entered += 1;
            }
        }
    }

    /// Received bytes for a connection, by phase.
    fn on_bytes(&mut self, slot: u32, data: &mut [u8]) {
        let Some(c) = self.conns.at(slot) else {
            return;
        };
        match c.phase {
            Phase::Handshake => self.on_request_bytes(slot, data),
            Phase::Ws => self.on_frames(slot, data),
            Phase::Deferred => {
                // Frames before the 101 (a client should wait for it): kept for after the
                // answer, within the request size limit.
                let limit = self.hs_limits.max_request_bytes;
                match c.extra().deferred.as_mut() {
                    Some(d) if d.early.len() + data.len() <= limit => {
                        d.early.extend_from_slice(data)
                    }
                    _ => c.kill(),
                }
            }
            // An HTTP answer or a refusal is being flushed, or the connection is closing:
            // the bytes are discarded.
            Phase::Flushing | Phase::HalfClosed | Phase::Dead => {}
        }
    }

    /// Bytes of a request: each complete one is answered in order (plain HTTP, with
    /// keep-alive and pipelining), refused, deferred, or upgraded (then frames that came with
    /// the request go on to the engine).
    pub(super) fn on_request_bytes(&mut self, slot: u32, data: &[u8]) {
        let Some(c) = self.conns.at(slot) else {
            return;
        };
        if c.phase != Phase::Handshake {
            return;
        }
        let mut buf = std::mem::take(&mut c.extra().request);
        buf.extend_from_slice(data);
        let mut start = 0;
        loop {
            let Some(c) = self.conns.at(slot) else {
                return;
            };
            let (req, head) = match handshake::parse_request(&buf[start..], &self.hs_limits) {
                Ok(None) => break,
                Err(e) => {
                    self.refuse(slot, e, "bad request");
                    return;
                }
                Ok(Some(parsed)) => parsed,
            };
            if req.is_upgrade() {
                // Re-parsed from a buffer of its own, so that the rest can move on.
                let rest = buf.split_off(start + head);
                buf.drain(..start);
                self.on_upgrade_request(slot, &buf, rest);
                return;
            }
            let body_len = match handshake::body_length(&req, self.config.limits.max_http_body) {
                Ok(n) => n,
                Err(e) => {
                    self.refuse(slot, e, "bad request body");
                    return;
                }
            };
            let Some(end) = (start + head).checked_add(body_len) else {
                self.refuse(slot, HttpError::PayloadTooLarge, "bad request body");
                return;
            };
            if buf.len() < end {
                // The body is not all here yet.
                break;
            }
            let req = req.with_body(&buf[start + head..end]);
            let app = &*self.app;
            let keep_alive = !self.shutting_down && !req.wants_close();
            let out = c.link.out();
            let before = out.len();
            self.ctx.metrics.http_requests += 1;
            let kept = match fault::guard(|| app.http(&req, keep_alive, out)) {
                Ok(kept) => kept && keep_alive,
                Err(message) => {
                    self.mailbox.count_panic();
                    tracing::warn!(
                        shard = self.ctx.shard,
                        peer = %c.link.peer,
                        callback = "on_http",
                        "handler panicked: {message}; answering 500"
                    );
                    c.link.out().truncate(before);
                    HttpError::InternalServerError.write_response(c.link.out());
                    false
                }
            };
            self.ctx.touch(&mut c.link);
            if !kept {
                c.flush_then_close();
                return;
            }
            // Waiting for the next request is bounded like the first one.
            c.kept_alive = true;
            c.deadline = self
                .now
                .saturating_add(millis(self.config.timeouts.handshake));
            start = end;
            if c.link.buffered() >= self.ctx.limits.high_water_mark {
                // Pipelined requests wait until the answers drain (`settle` resumes them).
                c.over_mark = true;
                self.ctx.metrics.backpressure_entered += 1;
                break;
            }
        }
        buf.drain(..start);
        if let Some(c) = self.conns.at(slot) {
            c.extra().request = buf;
        }
    }

    /// Answers an error status and closes (a bad request, or a refused upgrade).
    fn refuse(&mut self, slot: u32, e: HttpError, what: &str) {
        let Some(c) = self.conns.at(slot) else {
            return;
        };
        tracing::debug!(
            shard = self.ctx.shard,
            peer = %c.link.peer,
            status = e.status(),
            "{what}: {e}"
        );
        self.ctx.metrics.handshakes_failed.count(e.status());
        e.write_response(c.link.out());
        c.flush_then_close();
        self.ctx.touch(&mut c.link);
    }

    /// A complete upgrade request (`head`, parsed again here) and what followed it.
    fn on_upgrade_request(&mut self, slot: u32, head: &[u8], rest: Vec<u8>) {
        let req = match handshake::parse_request(head, &self.hs_limits) {
            Ok(Some((req, _))) => req,
            Ok(None) | Err(_) => {
                self.refuse(
                    slot,
                    HttpError::BadRequest("malformed request"),
                    "bad request",
                );
                return;
            }
        };
        let key = match req.websocket_key() {
            Ok(key) => key,
            Err(e) => return self.refuse(slot, e, "upgrade refused"),
        };
        if !matches!(handshake::body_length(&req, 0), Ok(0)) {
            let e = HttpError::BadRequest("a body on an upgrade request");
            return self.refuse(slot, e, "upgrade refused");
        }
        let Some(c) = self.conns.at(slot) else {
            return;
        };
        let dcfg = &self.config.deflate;
        let negotiated = dcfg
            .enabled
            .then(|| deflate::negotiate(req.extension_offers(), dcfg))
            .flatten();
        let app = &*self.app;
        let defer = DeferKey::new(Arc::clone(&self.mailbox), c.link.id);
        let verdict = match fault::guard(|| app.upgrade(&req, defer)) {
            Ok(verdict) => verdict,
            Err(message) => {
                self.mailbox.count_panic();
                tracing::warn!(
                    shard = self.ctx.shard,
                    peer = %c.link.peer,
                    callback = "on_upgrade",
                    "handler panicked: {message}; answering 500"
                );
                let e = HttpError::InternalServerError;
                return self.refuse(slot, e, "upgrade failed");
            }
        };
        if rest.len() > self.hs_limits.max_request_bytes {
            // Frames before the 101 (a client should wait for it), more than a request's
            // worth: not kept.
            c.kill();
            return;
        }
        let deferred = Deferred {
            key: key.to_owned(),
            negotiated,
            early: rest,
        };
        self.decide(slot, verdict, deferred);
    }

    /// Applies the application's verdict on an upgrade: 101 and open, an HTTP answer and
    /// close, or wait for the deferred answer.
    pub(super) fn decide(&mut self, slot: u32, verdict: Verdict<A::State>, d: Deferred) {
        let Some(c) = self.conns.at(slot) else {
            return;
        };
        let accept = match verdict {
            Verdict::Accept(accept) => accept,
            Verdict::Reject(response) => {
                let status = response_status(&response);
                tracing::debug!(shard = self.ctx.shard, peer = %c.link.peer, status, "upgrade refused");
                self.ctx.metrics.handshakes_failed.count(status);
                c.link.out().extend_from_slice(&response);
                c.flush_then_close();
                self.ctx.touch(&mut c.link);
                return;
            }
            Verdict::Defer => {
                c.phase = Phase::Deferred;
                c.extra().deferred = Some(d);
                return;
            }
        };
        let Deferred {
            key,
            negotiated,
            mut early,
        } = d;
        let negotiated = negotiated.filter(|_| accept.compress);
        handshake::write_accept_with(
            c.link.out(),
            &key,
            accept.protocol.as_deref(),
            negotiated.as_ref().map(|(_, header)| header.as_str()),
            &accept.headers,
        );
        self.ctx.metrics.upgrades += 1;
        let dcfg = &self.config.deflate;
        let codec = negotiated.map(|(params, _)| Deflate::new(params, dcfg));
        if codec.is_some() {
            c.link.min_compress = dcfg.min_compress_size;
        }
        c.ws = Some(WsPart {
            engine: Connection::new(self.proto_config, codec),
            state: accept.state,
            poisoned: false,
        });
        c.phase = Phase::Ws;
        c.link.open = true;
        // A FIN that came while the upgrade waited still bounds the connection.
        c.deadline = match c.peer_eof {
            true => self.now.saturating_add(self.close_ms),
            false => NO_DEADLINE,
        };
        c.last_rx = self.now;
        self.ctx.touch(&mut c.link);
        self.call(slot, "on_open", |app, session| app.open(session));
        if !early.is_empty() {
            self.on_frames(slot, &mut early);
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

    /// The answer to a deferred upgrade, from another thread: applied if the connection is
    /// still waiting for it; otherwise dropped (timed out, or gone).
    pub(super) fn on_decide(&mut self, id: ConnId, verdict: Box<dyn Any + Send>) {
        let Ok(verdict) = verdict.downcast::<Verdict<A::State>>() else {
            return;
        };
        let Some(c) = self.conns.get(id) else {
            // The state inside is the application's: its drop runs guarded.
            let _ = fault::guard(move || drop(verdict));
            return;
        };
        let deferred = c.extra.as_mut().and_then(|e| e.deferred.take());
        let Some(deferred) = deferred.filter(|_| c.phase == Phase::Deferred) else {
            let _ = fault::guard(move || drop(verdict));
            return;
        };
        c.phase = Phase::Handshake;
        self.decide(id.slot, *verdict, deferred);
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
        let ctx_shard = ctx.shard;
        let Some(c) = conns.at(slot) else {
            return;
        };
        // The input's address range: a message outside it was reassembled or inflated by the
        // engine, in a buffer that may be sent on without a copy.
        let input = data.as_ptr_range();
        let shares = c.link.shares;
        let lendable = |bytes: &[u8]| {
            (shares && bytes.len() >= LEND_FROM && !input.contains(&bytes.as_ptr()))
                .then_some((bytes.as_ptr() as usize, bytes.len()))
        };
        let mut pos = 0;
        let mut frames = 0u32;
        while matches!(c.phase, Phase::Ws) {
            let Some(ws) = c.ws.as_mut() else { break };
            let WsPart {
                engine,
                state,
                poisoned,
            } = ws;
            let progress = engine.handle_read(&mut data[pos..], c.link.out());
            pos += progress.consumed;
            frames += progress.frames;
            let Some(event) = progress.event else { break };
            let compressed = progress.compressed;
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
                Event::Error(e) => ("on_close", protocol_error(app, session, e, ctx_shard)),
                Event::Close { .. } => ("", Ok(())),
                _ if *poisoned => ("", Ok(())),
                Event::Text(text) => {
                    session.ctx.metrics.received.count(text.len(), compressed);
                    session.ctx.lent.at = lendable(text.as_bytes());
                    (
                        "on_message",
                        fault::guard(|| app.deliver(session, Delivery::Text(text))),
                    )
                }
                Event::Binary(bytes) => {
                    session.ctx.metrics.received.count(bytes.len(), compressed);
                    session.ctx.lent.at = lendable(bytes);
                    (
                        "on_message",
                        fault::guard(|| app.deliver(session, Delivery::Binary(bytes))),
                    )
                }
                Event::Fragment {
                    opcode,
                    data,
                    first,
                    last,
                } => {
                    let received = &mut session.ctx.metrics.received;
                    received.bytes += data.len() as u64;
                    received.messages += u64::from(last);
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
            ctx.lent.at = None;
            if let Some(offset) = ctx.lent.offset.take() {
                place_lent(c, offset, ctx);
            }
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
        // Against the connection's share of the round (see `Shard::over_budget`).
        let cost = frames.saturating_mul(FRAME_COST_KIB);
        c.recv_kib = c
            .recv_kib
            .saturating_add(u16::try_from(cost).unwrap_or(u16::MAX));
        ctx.touch(&mut c.link);
    }
}

/// Places the message the callback sent on (see `send_lent`) after its frame header: its
/// buffer is taken from the engine and goes out from where it is. The engine gets a spare
/// buffer in its place, if the shard has one.
#[inline(never)]
fn place_lent<S>(c: &mut Conn<S>, offset: usize, ctx: &mut Ctx) {
    let message = c.ws.as_mut().and_then(|ws| {
        let message = ws.engine.take_lent_message();
        if let Some(spare) = message.as_ref().and_then(|_| ctx.spares.take()) {
            if let Some(unused) = ws.engine.recycle(spare) {
                ctx.spares.put(unused);
            }
        }
        message
    });
    let output = c.link.output.as_deref_mut();
    let placed = match (message, output) {
        (Some(message), Some(output)) => output.lend(offset, message),
        _ => false,
    };
    if placed {
        ctx.metrics.sent_lent += 1;
    } else {
        // Cannot happen: the message was lent by the engine and its header queued, and
        // nothing queues a piece during a callback. The stream would lack the payload its
        // header announced, so it ends here.
        c.kill();
    }
}

/// A protocol error from the engine (its close frame is queued already): counted, logged at
/// debug level, and `on_close` with its code unless the application was told already. Out of
/// line, so the per-message loop stays small.
#[cold]
#[inline(never)]
fn protocol_error<A: App>(
    app: &A,
    session: Session<'_, A::State>,
    e: crate::proto::ProtocolError,
    shard: usize,
) -> Result<(), String> {
    session.ctx.metrics.protocol_errors.count(e);
    if session.link.notified {
        return Ok(());
    }
    tracing::debug!(
        shard,
        peer = %session.link.peer,
        code = e.close_code().0,
        "protocol error: {e}"
    );
    session.link.notified = true;
    session.link.open = false;
    let (code, reason) = (Some(e.close_code()), e.to_string());
    fault::guard(|| app.close(session, code, &reason))
}

/// The status code of a whole HTTP response (`HTTP/1.1 NNN ...`), or 0.
fn response_status(response: &[u8]) -> u16 {
    response
        .get(9..12)
        .and_then(|code| std::str::from_utf8(code).ok())
        .and_then(|code| code.parse().ok())
        .unwrap_or(0)
}
