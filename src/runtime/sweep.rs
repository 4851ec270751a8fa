//! The timer sweep, once per tick (a quarter of the shortest timeout, 10–500 ms): handshake
//! and closing deadlines, the idle ping and idle close, the forced end of a graceful
//! shutdown, the accept retry after descriptor exhaustion, freeing the large buffers of
//! quiet connections, and the heartbeat a watchdog reads from the mailbox.

use super::app::App;
use super::config::millis;
use super::conn::Conn;
use super::shard::Shard;
use super::sys;
use crate::proto::{self, CloseCode, OpCode};

/// A connection with nothing received for this long gives back what it allocated on demand.
const SHRINK_AFTER_MS: u64 = 1000;

/// After this many connections gave memory back, the heap is trimmed (at most once a
/// second), so the memory reaches the kernel.
const TRIM_AFTER: u64 = 64;

/// The least time between two heap trims.
const TRIM_EVERY_MS: u64 = 1000;

impl<A: App> Shard<A> {
    /// The sweep.
    pub(super) fn on_tick(&mut self) {
        self.retry_accept();
        self.core.publish_metrics();
        let core = &mut self.core;
        let now = core.now;
        core.mailbox.beat(now);
        let t = core.config.timeouts;
        let idle = t.idle.map(millis);
        let force = core.shutting_down && now >= core.shutdown_deadline;
        let (close_ms, keep) = (core.close_ms, core.keep_capacity);
        for slot in 0..core.conns.end() {
            let Some(c) = core.conns.at(slot) else {
                continue;
            };
            if c.is_dead() {
                continue;
            }
            if force || now >= c.deadline {
                tracing::debug!(shard = core.ctx.shard, peer = %c.link.peer, "connection timed out");
                c.kill();
                core.ctx.touch(&mut c.link);
                continue;
            }
            if now.saturating_sub(c.last_rx) >= SHRINK_AFTER_MS && c.shrink(keep) {
                core.gave_back += 1;
            }
            if let Some(idle) = idle.filter(|_| c.link.open) {
                let pinged = c.pinged_at;
                if idle_expired(c, idle, t.auto_ping, now) {
                    c.start_close(CloseCode::GOING_AWAY, "idle timeout", now, close_ms);
                    core.ctx.touch(&mut c.link);
                } else if c.pinged_at != pinged {
                    core.ctx.touch(&mut c.link);
                }
            }
        }
        core.gave_back += core.ctx.spares.sweep() as u64;
        if core.gave_back >= TRIM_AFTER && now >= core.trimmed_at.saturating_add(TRIM_EVERY_MS) {
            sys::trim_heap();
            core.gave_back = 0;
            core.trimmed_at = now;
        }
    }
}

/// With auto ping: ping after half the idle time, expire if the other half passes without
/// anything received (a pong resets both). Without: expire after the idle time.
fn idle_expired<S>(c: &mut Conn<S>, idle: u64, auto_ping: bool, now: u64) -> bool {
    let quiet = now.saturating_sub(c.last_rx);
    match (auto_ping, c.pinged_at) {
        (true, 0) => {
            if quiet >= idle / 2 {
                // Never 0, which means "not pinged".
                c.pinged_at = now.max(1);
                proto::encode_frame(c.link.out(), true, false, OpCode::Ping, b"");
            }
            false
        }
        (true, at) => now.saturating_sub(at) >= idle - idle / 2,
        (false, _) => quiet >= idle,
    }
}
