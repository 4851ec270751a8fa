//! What a shard counts: plain integers in the shard's own [`Metrics`], bumped on its thread
//! with no atomics or locks, and copied out for readers at each timer tick and on request.
//! A reader sums the shards' copies ([`Metrics::add`]).
//!
//! Counters only grow; the two gauges (`connections_open`, `queued_output_bytes`) are set
//! when the copy is made. Per-connection close codes are recorded when the connection is
//! freed, so they lag the closing handshake by at most the close timeout.

use crate::proto::{CloseCode, ProtocolError};

/// The HTTP statuses counted one by one in [`ByStatus`]; any other is counted as "other".
const STATUSES: [u16; 16] = [
    400, 401, 403, 404, 405, 408, 411, 413, 414, 426, 429, 431, 500, 501, 503, 505,
];

/// Counts per HTTP status of refused upgrades and bad requests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ByStatus([u64; STATUSES.len() + 1]);

impl ByStatus {
    fn index(status: u16) -> usize {
        STATUSES
            .iter()
            .position(|&s| s == status)
            .unwrap_or(STATUSES.len())
    }

    /// Counts one answer with this status.
    pub(crate) fn count(&mut self, status: u16) {
        self.0[ByStatus::index(status)] += 1;
    }

    /// How many answers had this status (statuses outside the common ones are summed in
    /// [`ByStatus::other`]).
    pub fn get(&self, status: u16) -> u64 {
        match STATUSES.iter().position(|&s| s == status) {
            Some(i) => self.0[i],
            None => 0,
        }
    }

    /// Answers with a status not in the common set.
    pub fn other(&self) -> u64 {
        self.0[STATUSES.len()]
    }

    /// Every status with a non-zero count (`None` for the "other" bucket).
    pub fn iter(&self) -> impl Iterator<Item = (Option<u16>, u64)> + '_ {
        let named = STATUSES.iter().map(|&s| Some(s)).chain([None]);
        named.zip(self.0.iter().copied()).filter(|&(_, n)| n > 0)
    }

    /// The sum over every status.
    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }
}

/// Counts per close code: 1000–1015 one by one, an empty close frame (no code), and any other
/// code (4000–4999 application codes, 3000–3999 registered ones).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ByCloseCode([u64; 18]);

impl ByCloseCode {
    const EMPTY: usize = 16;
    const OTHER: usize = 17;

    fn index(code: Option<CloseCode>) -> usize {
        match code {
            None => ByCloseCode::EMPTY,
            Some(CloseCode(c @ 1000..=1015)) => usize::from(c - 1000),
            Some(_) => ByCloseCode::OTHER,
        }
    }

    /// Counts one close with this code (`None`: a close frame without a code).
    pub(crate) fn count(&mut self, code: Option<CloseCode>) {
        self.0[ByCloseCode::index(code)] += 1;
    }

    /// How many closes had this code (`None`: no code); codes outside 1000–1015 are summed
    /// in [`ByCloseCode::other`].
    pub fn get(&self, code: Option<CloseCode>) -> u64 {
        match code {
            Some(CloseCode(1016..)) | Some(CloseCode(..1000)) => 0,
            code => self.0[ByCloseCode::index(code)],
        }
    }

    /// Closes with a code outside 1000–1015.
    pub fn other(&self) -> u64 {
        self.0[ByCloseCode::OTHER]
    }

    /// Every label with a non-zero count: the code as text, `"none"` or `"other"`.
    pub fn iter(&self) -> impl Iterator<Item = (String, u64)> + '_ {
        self.0
            .iter()
            .enumerate()
            .filter(|&(_, &n)| n > 0)
            .map(|(i, &n)| {
                let label = match i {
                    ByCloseCode::EMPTY => "none".to_owned(),
                    ByCloseCode::OTHER => "other".to_owned(),
                    i => (1000 + i).to_string(),
                };
                (label, n)
            })
    }

    /// The sum over every code.
    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }
}

/// Counts per kind of protocol error (each failed its connection).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ByProtocolError([u64; ProtocolError::KINDS]);

impl ByProtocolError {
    /// Counts one error.
    pub(crate) fn count(&mut self, error: ProtocolError) {
        self.0[error.index()] += 1;
    }

    /// How many errors of this kind.
    pub fn get(&self, error: ProtocolError) -> u64 {
        self.0[error.index()]
    }

    /// Every kind with a non-zero count, by its label (e.g. `invalid_utf8`).
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        ProtocolError::ALL
            .iter()
            .map(|e| (e.kind(), self.0[e.index()]))
            .filter(|&(_, n)| n > 0)
    }

    /// The sum over every kind.
    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }
}

/// Data messages and their payload bytes one way, split by whether they went compressed
/// (permessage-deflate). Bytes are payload bytes as the application sees them (inflated).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Messages sent or received uncompressed.
    pub messages: u64,
    /// Their payload bytes.
    pub bytes: u64,
    /// Messages sent or received compressed.
    pub compressed_messages: u64,
    /// Their payload bytes before compression (after inflation).
    pub compressed_bytes: u64,
}

impl Traffic {
    /// Counts one message.
    #[inline]
    pub(crate) fn count(&mut self, len: usize, compressed: bool) {
        let (messages, bytes) = if compressed {
            (&mut self.compressed_messages, &mut self.compressed_bytes)
        } else {
            (&mut self.messages, &mut self.bytes)
        };
        *messages += 1;
        *bytes += len as u64;
    }

    fn add(&mut self, other: &Traffic) {
        self.messages += other.messages;
        self.bytes += other.bytes;
        self.compressed_messages += other.compressed_messages;
        self.compressed_bytes += other.compressed_bytes;
    }
}

/// A server's counters: one shard's, or the sum over shards (see the module docs of
/// `ServerHandle::metrics`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Metrics {
    /// Gauge: connections on the shards (handshaking, open and closing).
    pub connections_open: u64,
    /// Gauge: bytes queued for sending and not yet written, over every connection.
    pub queued_output_bytes: u64,
    /// Connections accepted.
    pub accepted: u64,
    /// Connections answered 503 at the per-shard connection limit.
    pub refused_at_limit: u64,
    /// Accepts that failed because the process or system was out of descriptors or memory
    /// (`EMFILE`, `ENFILE`, `ENOBUFS`, `ENOMEM`): the peer waits in the backlog or is reset.
    pub refused_no_descriptors: u64,
    /// Upgrades answered 101.
    pub upgrades: u64,
    /// Plain HTTP requests answered by the application (`on_http`) or the built-in metrics
    /// path.
    pub http_requests: u64,
    /// Upgrade requests and bad requests answered with an error, by status.
    pub handshakes_failed: ByStatus,
    /// Data messages received.
    pub received: Traffic,
    /// Data messages queued for sending (fan-out deliveries included).
    pub sent: Traffic,
    /// Close frames received, by code.
    pub closes_received: ByCloseCode,
    /// Close frames sent, by code (ours, and the echo of the peer's).
    pub closes_sent: ByCloseCode,
    /// Connections failed for a protocol error, by kind.
    pub protocol_errors: ByProtocolError,
    /// Handler callbacks that panicked.
    pub handler_panics: u64,
    /// Times a connection's output went over the high-water mark (reading paused).
    pub backpressure_entered: u64,
    /// Times it drained below the mark again (`on_drain`).
    pub backpressure_drained: u64,
    /// Messages not queued because the connection's output was over the hard cap.
    pub dropped_over_cap: u64,
    /// Receives that found the provided-buffer ring empty (`ENOBUFS`) and were re-armed.
    pub recv_buffers_exhausted: u64,
    /// Shards running without a provided-buffer ring (single-shot receives instead), because
    /// the kernel or the locked-memory limit did not allow one.
    pub buffer_ring_fallbacks: u64,
    /// Receive completions held back to the next round because their connection had had
    /// its share of the round's input (256 KiB, each frame parsed counted as 1 KiB more),
    /// counted once for each round a completion is held. Any connection with more than a
    /// round's share ready at once shows here: a flood of small frames, a large message.
    pub recvs_held_back: u64,
    /// Publications and broadcasts queued for a subscriber.
    pub fanout_deliveries: u64,
    /// Of those, the ones queued by reference to the one shared frame, not copied (frames of
    /// 512 B or more to plain-TCP subscribers).
    pub fanout_shared: u64,
    /// Messages sent on from the engine's buffer without a copy: reassembled or inflated
    /// messages of 8 KiB or more that a callback sent as it was handed them.
    pub sent_lent: u64,
    /// Publications and broadcasts skipped for a subscriber over the hard cap.
    pub fanout_skipped: u64,
    /// Sends submitted to the kernel: at most one per connection per round, with what was
    /// queued for it (the rest of a partial send, or of more pieces than one send takes, is
    /// another), so sent messages per send shows how much was batched; with a publish
    /// linger, how many publications went out together.
    pub socket_sends: u64,
    /// Requests from other threads refused because a shard's queue was full.
    pub commands_refused: u64,
    /// TLS connections ended by a TLS failure (a failed handshake, a bad record, an alert, a
    /// plain-HTTP client on a TLS port).
    pub tls_failures: u64,
}

impl Metrics {
    /// Adds another shard's counters to these.
    pub fn add(&mut self, o: &Metrics) {
        self.connections_open += o.connections_open;
        self.queued_output_bytes += o.queued_output_bytes;
        self.accepted += o.accepted;
        self.refused_at_limit += o.refused_at_limit;
        self.refused_no_descriptors += o.refused_no_descriptors;
        self.upgrades += o.upgrades;
        self.http_requests += o.http_requests;
        for (a, b) in self
            .handshakes_failed
            .0
            .iter_mut()
            .zip(o.handshakes_failed.0)
        {
            *a += b;
        }
        self.received.add(&o.received);
        self.sent.add(&o.sent);
        for (a, b) in self.closes_received.0.iter_mut().zip(o.closes_received.0) {
            *a += b;
        }
        for (a, b) in self.closes_sent.0.iter_mut().zip(o.closes_sent.0) {
            *a += b;
        }
        for (a, b) in self.protocol_errors.0.iter_mut().zip(o.protocol_errors.0) {
            *a += b;
        }
        self.handler_panics += o.handler_panics;
        self.backpressure_entered += o.backpressure_entered;
        self.backpressure_drained += o.backpressure_drained;
        self.dropped_over_cap += o.dropped_over_cap;
        self.recv_buffers_exhausted += o.recv_buffers_exhausted;
        self.buffer_ring_fallbacks += o.buffer_ring_fallbacks;
        self.recvs_held_back += o.recvs_held_back;
        self.fanout_deliveries += o.fanout_deliveries;
        self.fanout_shared += o.fanout_shared;
        self.sent_lent += o.sent_lent;
        self.fanout_skipped += o.fanout_skipped;
        self.socket_sends += o.socket_sends;
        self.commands_refused += o.commands_refused;
        self.tls_failures += o.tls_failures;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_and_sums() {
        let mut a = Metrics::default();
        a.handshakes_failed.count(404);
        a.handshakes_failed.count(418);
        a.closes_sent.count(Some(CloseCode::NORMAL));
        a.closes_sent.count(None);
        a.closes_sent.count(Some(CloseCode(4000)));
        a.protocol_errors.count(ProtocolError::InvalidUtf8);
        a.received.count(10, false);
        a.received.count(5, true);
        let mut sum = Metrics::default();
        sum.add(&a);
        sum.add(&a);
        assert_eq!(sum.handshakes_failed.get(404), 2);
        assert_eq!(sum.handshakes_failed.get(418), 0);
        assert_eq!(sum.handshakes_failed.other(), 2);
        assert_eq!(sum.handshakes_failed.total(), 4);
        assert_eq!(sum.closes_sent.get(Some(CloseCode::NORMAL)), 2);
        assert_eq!(sum.closes_sent.get(None), 2);
        assert_eq!(sum.closes_sent.get(Some(CloseCode(4000))), 0);
        assert_eq!(sum.closes_sent.other(), 2);
        let labels: Vec<_> = sum.closes_sent.iter().collect();
        assert_eq!(
            labels,
            [
                ("1000".to_owned(), 2),
                ("none".to_owned(), 2),
                ("other".to_owned(), 2)
            ]
        );
        assert_eq!(sum.protocol_errors.get(ProtocolError::InvalidUtf8), 2);
        assert_eq!(
            sum.protocol_errors.iter().collect::<Vec<_>>(),
            [("invalid_utf8", 2)]
        );
        assert_eq!((sum.received.messages, sum.received.bytes), (2, 20));
        assert_eq!(
            (
                sum.received.compressed_messages,
                sum.received.compressed_bytes
            ),
            (2, 10)
        );
    }
}
