//! Settling, after each batch of completions, every connection the batch touched: local
//! fan-out of what callbacks published, then per connection at most one send, the
//! half-close after the last byte of a closing connection, backpressure (stop or resume
//! reading, `on_drain`, feeding back stashed input), the end of a connection whose peer
//! finished, and freeing connections with no operation left in flight.

use super::app::App;
use super::conn::{Phase, Recv};
use super::shard::Shard;
use super::sys;
use super::token::{Op, Token};

impl<A: App> Shard<A> {
    /// Settles every touched connection (see the module docs).
    pub(super) fn settle(&mut self) {
        loop {
            let publishes = std::mem::take(&mut self.core.ctx.publishes);
            for (topic, frame) in &publishes {
                self.core.fan_out(Some(topic), frame);
            }
            if self.core.ctx.publishes.is_empty() {
                // Keep the vector's capacity.
                self.core.ctx.publishes = publishes;
                self.core.ctx.publishes.clear();
            }
            let Some(slot) = self.core.ctx.touched.pop() else {
                if self.core.ctx.publishes.is_empty() {
                    break;
                }
                continue;
            };
            self.settle_one(slot);
        }
        self.core.mailbox.set_connections(self.core.conns.len());
        self.core
            .mailbox
            .set_fanout_skipped(self.core.ctx.metrics.fanout_skipped);
    }

    fn settle_one(&mut self, slot: u32) {
        let Shard { ring, core, .. } = self;
        let now = core.now;
        let Some(c) = core.conns.at(slot) else {
            return;
        };
        c.link.touched = false;
        let id = c.link.id;
        if c.is_dead() {
            if !c.has_operations() {
                core.free(slot);
            }
            return;
        }
        // One send per connection per batch; on TLS, the output encrypted as a whole first.
        let fd = c.fd();
        let output = match c.tls {
            // TLS may have records of its own to send (handshake, alerts, close_notify).
            Some(_) => Some(c.link.output.get_or_insert_with(Box::default)),
            None => c.link.output.as_mut(),
        };
        // Publications lingering: nothing goes out until the linger ends, anything else is
        // queued, the connection closes or its peer has finished (see `Link::lingering`).
        let held = c.link.lingering
            && !c.link.send_now
            && c.link.open
            && !c.peer_eof
            && output.as_ref().is_some_and(|o| o.only_publications());
        if let Some(output) = output.filter(|o| !o.send.in_flight()) {
            if output.send.remaining() == 0 && !held {
                c.link.send_now = false;
                output.published = 0;
                match c.tls.as_mut() {
                    None if output.has_queued() => output.load(),
                    None => {}
                    Some(tls) => {
                        // Frames are never shared with a TLS connection (see `fan_out`).
                        debug_assert!(output.pieces.is_empty());
                        if let Err(e) = tls.encrypt(&mut output.corked) {
                            let metrics = &mut core.ctx.metrics;
                            super::tls::tls_failed(metrics, core.ctx.shard, c.link.peer, &e);
                            c.kill();
                            core.ctx.touch(&mut c.link);
                            return;
                        }
                        if tls.has_output() {
                            output.send.load(tls.outgoing());
                        }
                    }
                }
            }
            let send = &mut output.send;
            if send.remaining() > 0 {
                let token = Token::conn(Op::Send, id).raw();
                if let Err(e) = ring.send(fd, send, token) {
                    tracing::warn!(shard = core.ctx.shard, peer = %c.link.peer, error = %e, "cannot submit a send");
                    c.kill();
                    core.ctx.touch(&mut c.link);
                    return;
                }
                core.ctx.metrics.socket_sends += 1;
            }
        }
        if matches!(c.phase, Phase::Flushing) && c.is_flushed() {
            if let Some(tls) = c.tls.as_mut().filter(|t| t.established() && !t.notified()) {
                // Our close_notify goes out before the half-close (on the next pass).
                tls.close_notify();
                core.ctx.touch(&mut c.link);
                return;
            }
            if c.peer_eof {
                c.kill();
                core.ctx.touch(&mut c.link);
                return;
            }
            // RFC 6455 §7.1.1: the server closes TCP first; half-close and wait for the FIN.
            sys::shutdown(c.fd(), true);
            c.phase = Phase::HalfClosed;
            c.deadline = now.saturating_add(core.close_ms);
        }
        // Backpressure.
        let buffered = c.link.buffered();
        let mark = core.ctx.limits.high_water_mark;
        if c.over_mark && buffered < mark {
            c.over_mark = false;
            core.ctx.metrics.backpressure_drained += 1;
            let held = c.extra.as_ref().is_some_and(|e| !e.request.is_empty());
            if c.phase == Phase::Handshake && held {
                // Pipelined HTTP requests held back over the mark.
                core.on_request_bytes(slot, &[]);
            } else {
                core.call(slot, "on_drain", |app, session| app.drain(session));
            }
        } else if !c.over_mark && buffered >= mark {
            c.over_mark = true;
            core.ctx.metrics.backpressure_entered += 1;
        }
        let Some(c) = core.conns.at(slot) else {
            return;
        };
        if !c.over_mark && c.stash_pending() {
            core.feed_stash(slot);
        }
        let Some(c) = core.conns.at(slot) else {
            return;
        };
        let stashed = c.stash_pending();
        if c.peer_eof && !stashed && c.is_flushed() {
            // The peer's FIN, and everything received before it was processed and every reply
            // written (after a closing handshake, or without one: 1006): nothing is lost by
            // ending the connection now. On TLS our close_notify goes first (RFC 5246 §7.2.1:
            // answer the peer's; RFC 8446 §6.1: before closing our write side).
            if let Some(tls) = c.tls.as_mut().filter(|t| t.established() && !t.notified()) {
                tls.close_notify();
                core.ctx.touch(&mut c.link);
                return;
            }
            c.kill();
            core.ctx.touch(&mut c.link);
            return;
        }
        let want_read = c.may_read();
        match (want_read, c.recv) {
            (true, Recv::Idle) => {
                let token = Token::conn(Op::Recv, id).raw();
                let armed = if core.multishot_recv {
                    ring.recv_multi(c.fd(), token)
                } else {
                    let size = core.config.buffers.recv_buffer_size;
                    let fd = c.fd();
                    let buf = c
                        .extra()
                        .recv_buf
                        .get_or_insert_with(|| super::ring::RecvBuf::new(size));
                    ring.recv(fd, buf, token)
                };
                match armed {
                    Ok(()) => c.recv = Recv::Armed,
                    Err(e) => {
                        tracing::warn!(shard = core.ctx.shard, peer = %c.link.peer, error = %e, "cannot arm a receive");
                        c.kill();
                        core.ctx.touch(&mut c.link);
                    }
                }
            }
            (false, Recv::Armed) => {
                let target = Token::conn(Op::Recv, id).raw();
                if ring
                    .cancel(target, Token::conn(Op::Cancel, id).raw())
                    .is_ok()
                {
                    c.recv = Recv::Cancelling;
                    c.cancels += 1;
                }
            }
            _ => {}
        }
    }
}
