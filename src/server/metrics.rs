//! The server's counters in the Prometheus text format (OpenMetrics 1.0, which Prometheus
//! scrapes natively), encoded by the `prometheus-client` crate from a [`Metrics`] snapshot.
//!
//! Shards count in plain per-shard integers (see [`Metrics`]); a scrape sums the copies the
//! shards made at their last timer tick (at most 500 ms old), so serving `/metrics` never
//! waits on another shard. [`crate::server::ServerHandle::metrics`] asks every shard for a
//! fresh copy instead.

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::runtime::command::Mailbox;
use crate::runtime::Metrics;

/// The `Content-Type` of [`encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Encodes a snapshot in the OpenMetrics text format, every name prefixed `ringsock_`.
pub fn encode(metrics: &Metrics) -> String {
    let mut registry = Registry::with_prefix("ringsock");
    registry.register_collector(Box::new(Snapshot(metrics.clone())));
    let mut text = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut text, &registry);
    text
}

/// The sum of every shard's last copy of its counters.
pub(crate) fn last_published(mailboxes: &Arc<[Arc<Mailbox>]>) -> Metrics {
    let mut sum = Metrics::default();
    for mailbox in mailboxes.iter() {
        sum.add(&mailbox.metrics());
    }
    sum
}

#[derive(Debug)]
struct Snapshot(Metrics);

fn counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: u64,
) -> Result<(), std::fmt::Error> {
    let metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    ConstCounter::new(value).encode(metric)
}

fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: u64,
) -> Result<(), std::fmt::Error> {
    let metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX)).encode(metric)
}

/// A counter family with one label.
fn labelled(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    label: &str,
    values: impl Iterator<Item = (String, u64)>,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (value, n) in values {
        let labels = [(label, value.as_str())];
        ConstCounter::new(n).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

impl Collector for Snapshot {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let m = &self.0;
        let e = &mut e;
        gauge(
            e,
            "connections",
            "Connections open (handshaking, open and closing).",
            m.connections_open,
        )?;
        gauge(
            e,
            "queued_output_bytes",
            "Bytes queued for sending and not yet written.",
            m.queued_output_bytes,
        )?;
        counter(e, "accepted", "Connections accepted.", m.accepted)?;
        counter(
            e,
            "refused_at_limit",
            "Connections answered 503 at the per-shard limit.",
            m.refused_at_limit,
        )?;
        counter(
            e,
            "refused_no_descriptors",
            "Accepts failed for lack of descriptors or memory.",
            m.refused_no_descriptors,
        )?;
        counter(e, "upgrades", "Upgrades answered 101.", m.upgrades)?;
        counter(
            e,
            "http_requests",
            "Plain HTTP requests answered.",
            m.http_requests,
        )?;
        let statuses = m.handshakes_failed.iter().map(|(status, n)| {
            (
                status.map_or_else(|| "other".to_owned(), |s| s.to_string()),
                n,
            )
        });
        labelled(
            e,
            "handshakes_failed",
            "Upgrade and bad requests answered with an error.",
            "status",
            statuses,
        )?;
        for (dir, t) in [("received", &m.received), ("sent", &m.sent)] {
            let messages = [("false", t.messages), ("true", t.compressed_messages)];
            let bytes = [("false", t.bytes), ("true", t.compressed_bytes)];
            let help = format!("Data messages {dir}, by permessage-deflate.");
            let pairs = messages.iter().map(|&(c, n)| (c.to_owned(), n));
            labelled(e, &format!("messages_{dir}"), &help, "compressed", pairs)?;
            let help = format!("Payload bytes of data messages {dir} (uncompressed size).");
            let pairs = bytes.iter().map(|&(c, n)| (c.to_owned(), n));
            labelled(e, &format!("bytes_{dir}"), &help, "compressed", pairs)?;
        }
        labelled(
            e,
            "closes_received",
            "Close frames received, by code.",
            "code",
            m.closes_received.iter(),
        )?;
        labelled(
            e,
            "closes_sent",
            "Close frames sent, by code.",
            "code",
            m.closes_sent.iter(),
        )?;
        let kinds = m.protocol_errors.iter().map(|(k, n)| (k.to_owned(), n));
        labelled(
            e,
            "protocol_errors",
            "Connections failed for a protocol error.",
            "kind",
            kinds,
        )?;
        counter(
            e,
            "handler_panics",
            "Handler callbacks that panicked.",
            m.handler_panics,
        )?;
        counter(
            e,
            "backpressure_entered",
            "Outputs that went over the high-water mark.",
            m.backpressure_entered,
        )?;
        counter(
            e,
            "backpressure_drained",
            "Outputs that drained below the mark again.",
            m.backpressure_drained,
        )?;
        counter(
            e,
            "dropped_over_cap",
            "Messages dropped over the hard cap of queued output.",
            m.dropped_over_cap,
        )?;
        counter(
            e,
            "recv_buffers_exhausted",
            "Receives that found the buffer ring empty (ENOBUFS).",
            m.recv_buffers_exhausted,
        )?;
        gauge(
            e,
            "buffer_ring_fallbacks",
            "Shards receiving without a provided-buffer ring.",
            m.buffer_ring_fallbacks,
        )?;
        counter(
            e,
            "recvs_held_back",
            "Receives held back to the next round (once per round held): their connection had had its share of it.",
            m.recvs_held_back,
        )?;
        counter(
            e,
            "fanout_deliveries",
            "Publications queued for a subscriber.",
            m.fanout_deliveries,
        )?;
        counter(
            e,
            "fanout_shared",
            "Publications queued for a subscriber by reference, not copied.",
            m.fanout_shared,
        )?;
        counter(
            e,
            "sent_lent",
            "Large messages sent on from the receive buffer without a copy.",
            m.sent_lent,
        )?;
        counter(
            e,
            "fanout_skipped",
            "Publications skipped for a subscriber over the hard cap.",
            m.fanout_skipped,
        )?;
        counter(
            e,
            "socket_sends",
            "Sends submitted to the kernel (at most one per connection per round).",
            m.socket_sends,
        )?;
        counter(
            e,
            "tls_failures",
            "TLS connections ended by a TLS failure.",
            m.tls_failures,
        )?;
        counter(
            e,
            "commands_refused",
            "Requests from other threads refused on a full queue.",
            m.commands_refused,
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_names_every_family_and_ends_with_eof() {
        let mut m = Metrics {
            accepted: 3,
            ..Metrics::default()
        };
        m.handshakes_failed.count(404);
        m.closes_sent.count(Some(crate::proto::CloseCode::NORMAL));
        let text = encode(&m);
        assert!(
            text.contains("# TYPE ringsock_accepted counter\n"),
            "{text}"
        );
        assert!(text.contains("ringsock_accepted_total 3\n"), "{text}");
        assert!(
            text.contains("ringsock_handshakes_failed_total{status=\"404\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("ringsock_closes_sent_total{code=\"1000\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("ringsock_connections 0\n"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
