//! One connection's shard-side state and its close state machine.
//!
//! Life of a connection ([`Phase`]):
//!
//! ```text
//! Handshake ──upgrade──▶ Ws ──closing handshake done, or protocol failure──▶ Flushing
//!     │                   │                                                    │
//!     └─HTTP answer, refusal──────────────────────────────────────────────────▶│
//!                                                            output written ▼
//!                                                   HalfClosed (SHUT_WR, read until FIN)
//! any phase ──reset, EOF when done, timeout, ring error──▶ Dead ──no operation in flight──▶ freed
//! ```
//!
//! While in `Ws`, the engine ([`crate::proto::Connection`]) tracks the closing handshake
//! itself: after our close is sent ([`State::CloseSent`]) frames still arrive and are
//! delivered, until the peer's close completes it ([`State::Closed`]) and the phase moves to
//! `Flushing`. RFC 6455 §7.1.1: the server closes TCP first, so `Flushing` ends in a
//! half-close and a wait for the peer's FIN, bounded by the close timeout.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use super::app::Link;
use super::ring::RecvBuf;
use super::sys;
use super::tls::TlsConn;
use crate::proto::deflate::DeflateParams;
use crate::proto::{self, CloseCode, Connection, State};

/// Where a connection is in its life (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Reading the upgrade request (or, with keep-alive, the next plain HTTP request); the
    /// bytes so far are in [`ConnExtra::request`].
    Handshake,
    /// The application deferred its decision on the upgrade; the answer arrives as a
    /// command, within the handshake timeout. What it needs is in [`ConnExtra::deferred`].
    Deferred,
    /// A WebSocket: frames go through the engine, which tracks the closing handshake.
    Ws,
    /// Writing the last output (an HTTP answer, a refusal, or what follows the closing
    /// handshake or a protocol failure); then half-close. Input is discarded.
    Flushing,
    /// Our side is half-closed (`SHUT_WR`); reading (and discarding) until the peer's FIN.
    HalfClosed,
    /// Shut down both ways; freed once no operation is in flight.
    Dead,
}

/// What an upgrade waiting for the application's answer keeps.
#[derive(Debug)]
pub(crate) struct Deferred {
    /// The client's `Sec-WebSocket-Key`.
    pub key: String,
    /// permessage-deflate as it would be negotiated, if the answer allows compression.
    pub negotiated: Option<(DeflateParams, String)>,
    /// Bytes that arrived after the request (frames sent before the 101, which a client
    /// should not do; bounded by the request size limit).
    pub early: Vec<u8>,
}

/// The connection's receive operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Recv {
    /// None in flight.
    Idle,
    /// In flight (a multishot one stays armed across completions).
    Armed,
    /// In flight with a cancellation asked for (backpressure): its last completion is due.
    Cancelling,
}

/// The engine and the application's state, from the upgrade on.
pub(crate) struct WsPart<S> {
    /// The protocol engine.
    pub engine: Connection,
    /// The application's per-connection state.
    pub state: S,
    /// A callback panicked: no more deliveries, only the close.
    pub poisoned: bool,
}

/// What a connection holds only at times: the request being read, a deferred upgrade, input
/// held back over the high-water mark, the receive buffer without a buffer ring.
#[derive(Default)]
pub(crate) struct ConnExtra {
    /// The bytes of the request being read (phase `Handshake`).
    pub request: Vec<u8>,
    /// The deferred upgrade (phase `Deferred`).
    pub deferred: Option<Deferred>,
    /// Input received while over the mark.
    pub stash: Stash,
    /// The receive buffer, without a buffer ring (single-shot receives).
    pub recv_buf: Option<RecvBuf>,
}

/// Input held back while the output is over the high-water mark (see `input.rs`).
#[derive(Default)]
pub(crate) struct Stash {
    /// Received bytes not yet fed to the engine.
    pub bytes: Vec<u8>,
    /// How far they were fed.
    pub pos: usize,
}

impl Stash {
    /// Whether bytes are waiting.
    pub fn is_pending(&self) -> bool {
        self.pos < self.bytes.len()
    }
}

/// No deadline ([`Conn::deadline`]).
pub(crate) const NO_DEADLINE: u64 = u64::MAX;

/// A connection on a shard.
///
/// An idle upgraded connection is this struct and nothing else (240 bytes with a zero-sized
/// application state): its output ([`Link::output`]), the engine's buffers and
/// everything held only at times ([`ConnExtra`]) are allocated when needed and given back by
/// the idle sweep ([`Conn::shrink`]).
pub(crate) struct Conn<S> {
    /// The socket; closed when the connection is dropped.
    pub socket: OwnedFd,
    /// Where it is in its life.
    pub phase: Phase,
    /// The receive operation.
    pub recv: Recv,
    /// Cancellations submitted whose completion has not arrived.
    pub cancels: u8,
    /// The peer's FIN arrived.
    pub peer_eof: bool,
    /// A plain HTTP request was answered and the connection kept for the next one.
    pub kept_alive: bool,
    /// Output is over the high-water mark: reading stops until it drains.
    pub over_mark: bool,
    /// The completion loop's round (its low 16 bits) in which `recv_kib` was counted.
    pub recv_round: u16,
    /// KiB received in that round plus a charge per frame parsed, against the per-round
    /// budget (see `Shard::over_budget`). Input fed from the stash (in `settle`) is charged
    /// too, to whatever round was counted last; the next receive of a later round resets it.
    pub recv_kib: u16,
    /// What sessions touch: output, open flag, topics.
    pub link: Link,
    /// The engine and state, from the upgrade on.
    pub ws: Option<WsPart<S>>,
    /// When the idle ping was sent (ms), 0 if none is outstanding.
    pub pinged_at: u64,
    /// When something was last received (ms).
    pub last_rx: u64,
    /// Handshake or closing deadline (ms since shard start), [`NO_DEADLINE`] if none.
    pub deadline: u64,
    /// TLS, on a connection from a TLS listener.
    pub tls: Option<Box<TlsConn>>,
    /// What is held only at times.
    pub extra: Option<Box<ConnExtra>>,
}

impl<S> Conn<S> {
    /// A freshly accepted connection in `phase`.
    pub fn new(socket: OwnedFd, link: Link, phase: Phase, now: u64, deadline: u64) -> Conn<S> {
        Conn {
            socket,
            phase,
            recv: Recv::Idle,
            cancels: 0,
            peer_eof: false,
            kept_alive: false,
            over_mark: false,
            recv_round: 0,
            recv_kib: 0,
            link,
            ws: None,
            pinged_at: 0,
            last_rx: now,
            deadline,
            tls: None,
            extra: None,
        }
    }

    /// The part held only at times, allocated on first use.
    pub fn extra(&mut self) -> &mut ConnExtra {
        self.extra.get_or_insert_with(Box::default)
    }

    /// Whether stashed input waits to be fed.
    #[inline]
    pub fn stash_pending(&self) -> bool {
        self.extra.as_ref().is_some_and(|e| e.stash.is_pending())
    }

    /// Whether a send is in flight.
    #[inline]
    pub fn send_in_flight(&self) -> bool {
        self.link
            .output
            .as_ref()
            .is_some_and(|o| o.send.in_flight())
    }

    /// Whether it may read now, as far as its own state goes: not over the high-water mark,
    /// no stashed input to feed first, no FIN from the peer, not dead.
    #[inline]
    pub fn may_read(&self) -> bool {
        !self.over_mark && !self.stash_pending() && !self.peer_eof && !self.is_dead()
    }

    /// The socket's descriptor.
    pub fn fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }

    /// Whether it is shut down and only waits for its operations.
    pub fn is_dead(&self) -> bool {
        matches!(self.phase, Phase::Dead)
    }

    /// Whether an operation that points at this connection's memory is in flight.
    pub fn has_operations(&self) -> bool {
        self.recv != Recv::Idle || self.send_in_flight() || self.cancels > 0
    }

    /// Whether everything queued was written.
    pub fn is_flushed(&self) -> bool {
        self.link.buffered() == 0
            && !self.send_in_flight()
            && self.tls.as_ref().map_or(true, |t| !t.has_output())
    }

    /// Shuts the socket down both ways so every operation in flight completes; the
    /// connection is freed once they have.
    pub fn kill(&mut self) {
        if !self.is_dead() {
            self.phase = Phase::Dead;
            self.link.open = false;
            sys::shutdown(self.fd(), false);
        }
    }

    /// Writes what is queued, then closes (an HTTP answer, a refusal).
    pub fn flush_then_close(&mut self) {
        if matches!(self.phase, Phase::Handshake | Phase::Deferred | Phase::Ws) {
            self.phase = Phase::Flushing;
        }
    }

    /// Sets the deadline unless one is set.
    pub fn arm_deadline(&mut self, at: u64) {
        if self.deadline == NO_DEADLINE {
            self.deadline = at;
        }
    }

    /// Starts the closing handshake from our side (RFC 6455 §7.1.2), after queued output.
    pub fn start_close(&mut self, code: CloseCode, reason: &str, now: u64, close_ms: u64) {
        let Some(ws) = self.ws.as_mut() else { return };
        self.link.open = false;
        if let Some(extra) = self.link.extra.as_deref_mut() {
            extra.close_req = None;
        }
        if ws.engine.state() == State::Open {
            let _ = ws.engine.close(self.link.out(), code, reason);
        }
        self.follow_engine(now, close_ms);
    }

    /// Follows the engine's closing state: a deadline while our close waits for the peer's,
    /// and flush-then-close once both were exchanged (or the connection failed).
    pub fn follow_engine(&mut self, now: u64, close_ms: u64) {
        let Some(ws) = self.ws.as_ref() else { return };
        match ws.engine.state() {
            State::Open => {}
            State::CloseSent => {
                self.link.open = false;
                self.arm_deadline(now.saturating_add(close_ms));
            }
            State::Closed => {
                self.link.open = false;
                self.flush_then_close();
                self.arm_deadline(now.saturating_add(close_ms));
            }
        }
    }

    /// Applies what a callback left behind: deferred (compressed) sends, then a requested
    /// close.
    pub fn after_callback(&mut self, now: u64, close_ms: u64) {
        let Some(ws) = self.ws.as_mut() else { return };
        let Some(extra) = self.link.extra.as_deref_mut() else {
            return self.follow_engine(now, close_ms);
        };
        if !extra.deferred_msgs.is_empty() {
            let out = &mut self.link.output.get_or_insert_with(Box::default).corked;
            let mut start = 0;
            for &(opcode, len, compress) in &extra.deferred_msgs {
                let payload = &extra.deferred[start..start + len];
                start += len;
                if compress {
                    let _ = ws.engine.send(out, opcode, payload, true);
                } else {
                    proto::encode_frame(out, true, false, opcode, payload);
                }
            }
            extra.deferred_msgs.clear();
            extra.deferred.clear();
        }
        if let Some((code, reason)) = extra.close_req.take() {
            self.start_close(code, &reason, now, close_ms);
        } else {
            self.follow_engine(now, close_ms);
        }
    }

    /// Gives back what a quiet connection does not need: the engine's buffers, the output
    /// and the link's rarely used part when empty (else buffers above `keep` bytes), the
    /// stash, and the part held only at times once it holds nothing. Returns whether a part
    /// allocated on demand was freed.
    pub fn shrink(&mut self, keep: usize) -> bool {
        let mut freed = false;
        if let Some(ws) = self.ws.as_mut() {
            let spilled = ws.engine.has_spill();
            ws.engine.shrink_buffers();
            freed |= spilled && !ws.engine.has_spill();
        }
        freed |= self.link.shrink(keep);
        if let Some(tls) = self.tls.as_mut() {
            tls.shrink(keep);
        }
        if let Some(extra) = self.extra.as_deref_mut() {
            if !extra.stash.is_pending() {
                extra.stash = Stash::default();
            }
            let unused = extra.request.is_empty()
                && extra.deferred.is_none()
                && extra.stash.bytes.capacity() == 0
                && extra.recv_buf.is_none();
            if unused {
                self.extra = None;
                freed = true;
            } else if extra.request.is_empty() {
                extra.request = Vec::new();
            }
        }
        freed
    }
}
