//! Figures of the fan-out scenarios (`broadcast`, `crossnode`): per-run samples, medians over
//! repetitions, the tables and the JSON document. Pure formatting, like `report`.

use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde_json::{json, Value};

use crate::fanout::{FanOutcome, FanParams};
use crate::generator::{si, Scenario};
use crate::report::{bytes, QUANTILES};

/// The figures of one repetition against one server (broadcast) or engine (crossnode).
///
/// "Server" is the process the subscribers are connected to: the server in `broadcast`, node B
/// in `crossnode`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FanSample {
    /// Deliveries (one publication reaching one subscriber) per second.
    pub deliveries_per_sec: f64,
    /// Publications written per second.
    pub publications_per_sec: f64,
    /// Deliveries lost, in percent of those due (delivered + lost).
    pub lost_pct: f64,
    /// Publish-to-deliver latency in µs: p50, p90, p99, p99.9, max.
    pub latency_us: [f64; 5],
    /// Server CPU time / wall time, percent of one core.
    pub server_cpu_pct: f64,
    /// Server time runnable but not running / wall time, percent.
    pub server_wait_pct: f64,
    /// The server core's ksoftirqd CPU time / wall time, percent.
    pub softirq_pct: f64,
    /// Server CPU time plus its core's ksoftirqd time per delivery, ns.
    pub server_ns_per_delivery: f64,
    /// Node A's CPU, percent (crossnode).
    pub node_a_cpu_pct: f64,
    /// Node A's CPU time per publication, ns (crossnode).
    pub node_a_ns_per_pub: f64,
    /// The broker's CPU, percent (crossnode).
    pub broker_cpu_pct: f64,
    /// The broker's CPU time per publication, ns (crossnode).
    pub broker_ns_per_pub: f64,
    /// Peak RSS (`VmHWM`) of the server, node A and the broker, bytes (0 where absent).
    pub peak_rss: [f64; 3],
    /// Generator CPU time / wall time, percent (all threads).
    pub generator_cpu_pct: f64,
    /// Generator time runnable but not running / wall time, percent.
    pub generator_wait_pct: f64,
    /// Generator CPU time per delivery, ns.
    pub generator_ns_per_delivery: f64,
    /// Seconds taken to open every connection.
    pub connect_seconds: f64,
}

/// Number of figures in [`FanSample::to_array`].
const FIGURES: usize = 21;

impl FanSample {
    /// The figures of one outcome.
    pub fn from_outcome(o: &FanOutcome) -> FanSample {
        let secs = o.seconds.max(1e-9);
        let wall = secs * 1e9;
        let cpu = |i: usize| o.cpu.get(i).map_or(Default::default(), |c| c.1);
        let per = |ns: u64, n: u64| if n > 0 { ns as f64 / n as f64 } else { 0.0 };
        let softirq = o.softirq.unwrap_or_default();
        let mut latency_us = [0.0; 5];
        for (slot, q) in latency_us.iter_mut().zip(QUANTILES) {
            *slot = o.latency.value_at_quantile(q) as f64 / 1e3;
        }
        latency_us[4] = o.latency.max() as f64 / 1e3;
        let mut peak_rss = [0.0; 3];
        for (slot, (_, rss)) in peak_rss.iter_mut().zip(&o.peak_rss) {
            *slot = *rss as f64;
        }
        let due = o.deliveries + o.lost;
        FanSample {
            deliveries_per_sec: o.deliveries as f64 / secs,
            publications_per_sec: o.publications as f64 / secs,
            lost_pct: if due > 0 {
                o.lost as f64 / due as f64 * 100.0
            } else {
                0.0
            },
            latency_us,
            server_cpu_pct: cpu(0).run as f64 / wall * 100.0,
            server_wait_pct: cpu(0).wait as f64 / wall * 100.0,
            softirq_pct: softirq.run as f64 / wall * 100.0,
            server_ns_per_delivery: per(cpu(0).run + softirq.run, o.deliveries),
            node_a_cpu_pct: cpu(1).run as f64 / wall * 100.0,
            node_a_ns_per_pub: per(cpu(1).run, o.publications),
            broker_cpu_pct: cpu(2).run as f64 / wall * 100.0,
            broker_ns_per_pub: per(cpu(2).run, o.publications),
            peak_rss,
            generator_cpu_pct: o.generator.run as f64 / wall * 100.0,
            generator_wait_pct: o.generator.wait as f64 / wall * 100.0,
            generator_ns_per_delivery: per(o.generator.run, o.deliveries),
            connect_seconds: o.connect_seconds,
        }
    }

    fn to_array(&self) -> [f64; FIGURES] {
        let l = self.latency_us;
        let r = self.peak_rss;
        [
            self.deliveries_per_sec,
            self.publications_per_sec,
            self.lost_pct,
            l[0],
            l[1],
            l[2],
            l[3],
            l[4],
            self.server_cpu_pct,
            self.server_wait_pct,
            self.softirq_pct,
            self.server_ns_per_delivery,
            self.node_a_cpu_pct,
            self.node_a_ns_per_pub,
            self.broker_cpu_pct,
            self.broker_ns_per_pub,
            r[0],
            r[1],
            r[2],
            self.generator_cpu_pct,
            self.generator_ns_per_delivery,
        ]
    }

    fn from_array(a: [f64; FIGURES], wait: f64, connect: f64) -> FanSample {
        FanSample {
            deliveries_per_sec: a[0],
            publications_per_sec: a[1],
            lost_pct: a[2],
            latency_us: [a[3], a[4], a[5], a[6], a[7]],
            server_cpu_pct: a[8],
            server_wait_pct: a[9],
            softirq_pct: a[10],
            server_ns_per_delivery: a[11],
            node_a_cpu_pct: a[12],
            node_a_ns_per_pub: a[13],
            broker_cpu_pct: a[14],
            broker_ns_per_pub: a[15],
            peak_rss: [a[16], a[17], a[18]],
            generator_cpu_pct: a[19],
            generator_wait_pct: wait,
            generator_ns_per_delivery: a[20],
            connect_seconds: connect,
        }
    }

    /// The per-figure median of `samples` (the upper median for an even count).
    pub fn median(samples: &[FanSample]) -> FanSample {
        let med = |v: &mut Vec<f64>| {
            v.sort_by(|a, b| a.total_cmp(b));
            v.get(v.len() / 2).copied().unwrap_or(0.0)
        };
        let mut out = [0.0; FIGURES];
        for (i, slot) in out.iter_mut().enumerate() {
            *slot = med(&mut samples.iter().map(|s| s.to_array()[i]).collect());
        }
        let wait = med(&mut samples.iter().map(|s| s.generator_wait_pct).collect());
        let connect = med(&mut samples.iter().map(|s| s.connect_seconds).collect());
        FanSample::from_array(out, wait, connect)
    }

    /// The sample as JSON.
    pub fn to_json(&self) -> Value {
        let l = self.latency_us;
        json!({
            "deliveries_per_sec": self.deliveries_per_sec,
            "publications_per_sec": self.publications_per_sec,
            "lost_pct": self.lost_pct,
            "latency_us": {"p50": l[0], "p90": l[1], "p99": l[2], "p99_9": l[3], "max": l[4]},
            "server_cpu_pct": self.server_cpu_pct,
            "server_wait_pct": self.server_wait_pct,
            "softirq_pct": self.softirq_pct,
            "server_ns_per_delivery_with_softirq": self.server_ns_per_delivery,
            "node_a_cpu_pct": self.node_a_cpu_pct,
            "node_a_ns_per_publication": self.node_a_ns_per_pub,
            "broker_cpu_pct": self.broker_cpu_pct,
            "broker_ns_per_publication": self.broker_ns_per_pub,
            "peak_rss": {
                "server": self.peak_rss[0], "node_a": self.peak_rss[1], "broker": self.peak_rss[2],
            },
            "generator_cpu_pct": self.generator_cpu_pct,
            "generator_wait_pct": self.generator_wait_pct,
            "generator_ns_per_delivery": self.generator_ns_per_delivery,
            "connect_seconds": self.connect_seconds,
        })
    }
}

/// Everything measured for one server or engine in one fan-out case.
#[derive(Debug)]
pub struct FanResult {
    /// The table name.
    pub name: String,
    /// One sample per repetition.
    pub samples: Vec<FanSample>,
    /// Latency histograms of all repetitions merged (for the plot).
    pub merged: Histogram<u64>,
    /// Why it failed the case, if it did.
    pub failure: Option<String>,
}

impl FanResult {
    /// Medians over the repetitions.
    pub fn median(&self) -> FanSample {
        FanSample::median(&self.samples)
    }
}

/// A one-line description of the case.
pub fn title(p: &FanParams) -> String {
    let mode = if p.rate > 0.0 {
        format!("{} pub/s", si(p.rate))
    } else {
        format!("closed loop, {} in flight", p.inflight)
    };
    let mut t = match p.scenario {
        Scenario::Crossnode => format!(
            "crossnode {}: publisher on node A, {} subscribers on node B, {mode}",
            bytes(p.size as f64),
            p.subscribers
        ),
        _ => format!(
            "broadcast {} to {} subscribers, {mode}",
            bytes(p.size as f64),
            p.subscribers
        ),
    };
    if p.threads > 1 {
        write!(t, ", {} generator threads", p.threads).ok();
    }
    t
}

/// A short file-name fragment for the case.
pub fn slug(p: &FanParams) -> String {
    let mode = if p.rate > 0.0 {
        format!("r{}", p.rate as u64)
    } else {
        format!("k{}", p.inflight)
    };
    format!("{}-{}-n{}-{mode}", p.scenario.name(), p.size, p.subscribers)
}

/// The table of medians: broadcast with ratios to ringsock, crossnode one row per engine.
pub fn table(p: &FanParams, results: &[FanResult], reps: usize) -> String {
    let meds: Vec<FanSample> = results.iter().map(FanResult::median).collect();
    let mut out = String::new();
    if p.scenario == Scenario::Crossnode {
        writeln!(out, "\n## {} (median of {reps})", title(p)).ok();
        writeln!(
            out,
            "{:<8} {:>9} {:>9} {:>6} {:>8} {:>8} {:>8} {:>5} {:>5} {:>8} {:>5} {:>7} {:>7} \
             {:>7} {:>5} {:>9} {:>9} {:>9} {:>5} {:>5} {:>7}",
            "engine",
            "dlv/s",
            "pub/s",
            "lost%",
            "p50 us",
            "p99 us",
            "max us",
            "B%",
            "Bwait",
            "B ns/dlv",
            "A%",
            "A ns/pub",
            "broker%",
            "brk ns",
            "sirq%",
            "B RSS",
            "A RSS",
            "brk RSS",
            "gen%",
            "gwait",
            "gen ns",
        )
        .ok();
        for (r, m) in results.iter().zip(&meds) {
            if let Some(f) = &r.failure {
                writeln!(out, "{:<8} FAILED: {f}", r.name).ok();
                continue;
            }
            writeln!(
                out,
                "{:<8} {:>9} {:>9} {:>6.2} {:>8.1} {:>8.1} {:>8.1} {:>5.0} {:>5.0} {:>8.0} \
                 {:>5.0} {:>7.0} {:>7.0} {:>7.0} {:>5.0} {:>9} {:>9} {:>9} {:>5.0} {:>5.0} \
                 {:>7.0}",
                r.name,
                si(m.deliveries_per_sec),
                si(m.publications_per_sec),
                m.lost_pct,
                m.latency_us[0],
                m.latency_us[2],
                m.latency_us[4],
                m.server_cpu_pct,
                m.server_wait_pct,
                m.server_ns_per_delivery,
                m.node_a_cpu_pct,
                m.node_a_ns_per_pub,
                m.broker_cpu_pct,
                m.broker_ns_per_pub,
                m.softirq_pct,
                bytes(m.peak_rss[0]),
                bytes(m.peak_rss[1]),
                bytes(m.peak_rss[2]),
                m.generator_cpu_pct,
                m.generator_wait_pct,
                m.generator_ns_per_delivery,
            )
            .ok();
        }
        out.push_str(&notes(p, results, &meds));
        return out;
    }
    let base = results
        .iter()
        .position(|r| r.name == "ringsock" && r.failure.is_none())
        .map(|i| meds[i].clone());
    let ratio = |v: f64, b: Option<f64>| match b {
        Some(b) if b != 0.0 => format!("{:.2}x", v / b),
        _ => "-".into(),
    };
    writeln!(
        out,
        "\n## {} (median of {reps}; ratio = server / ringsock)",
        title(p)
    )
    .ok();
    writeln!(
        out,
        "{:<24} {:>9} {:>6} {:>8} {:>6} {:>8} {:>6} {:>8} {:>6} {:>8} {:>5} {:>5} {:>5} {:>7} \
         {:>6} {:>9} {:>6} {:>5} {:>5} {:>6}",
        "server",
        "dlv/s",
        "ratio",
        "pub/s",
        "lost%",
        "p50 us",
        "ratio",
        "p99 us",
        "ratio",
        "max us",
        "srv%",
        "wait%",
        "sirq%",
        "ns/dlv",
        "ratio",
        "peak RSS",
        "ratio",
        "gen%",
        "gwait",
        "gen ns",
    )
    .ok();
    for (r, m) in results.iter().zip(&meds) {
        if let Some(f) = &r.failure {
            writeln!(out, "{:<24} FAILED: {f}", r.name).ok();
            continue;
        }
        let b = base.as_ref();
        writeln!(
            out,
            "{:<24} {:>9} {:>6} {:>8} {:>6.2} {:>8.1} {:>6} {:>8.1} {:>6} {:>8.1} {:>5.0} {:>5.0} \
             {:>5.0} {:>7.0} {:>6} {:>9} {:>6} {:>5.0} {:>5.0} {:>6.0}",
            r.name,
            si(m.deliveries_per_sec),
            ratio(m.deliveries_per_sec, b.map(|b| b.deliveries_per_sec)),
            si(m.publications_per_sec),
            m.lost_pct,
            m.latency_us[0],
            ratio(m.latency_us[0], b.map(|b| b.latency_us[0])),
            m.latency_us[2],
            ratio(m.latency_us[2], b.map(|b| b.latency_us[2])),
            m.latency_us[4],
            m.server_cpu_pct,
            m.server_wait_pct,
            m.softirq_pct,
            m.server_ns_per_delivery,
            ratio(
                m.server_ns_per_delivery,
                b.map(|b| b.server_ns_per_delivery)
            ),
            bytes(m.peak_rss[0]),
            ratio(m.peak_rss[0], b.map(|b| b.peak_rss[0])),
            m.generator_cpu_pct,
            m.generator_wait_pct,
            m.generator_ns_per_delivery,
        )
        .ok();
    }
    out.push_str(&notes(p, results, &meds));
    out
}

/// The target for the case (MET/MISSED against the medians) and a warning for losses.
fn notes(p: &FanParams, results: &[FanResult], meds: &[FanSample]) -> String {
    let mut out = String::new();
    let ok: Vec<(&str, &FanSample)> = results
        .iter()
        .zip(meds)
        .filter(|(r, _)| r.failure.is_none())
        .map(|(r, m)| (r.name.as_str(), m))
        .collect();
    for (name, m) in &ok {
        if m.lost_pct > 0.0 {
            writeln!(
                out,
                "lost: {name} lost {:.3}% of its deliveries (skipped by the server or a \
                 lagging channel; the rest arrived in order)",
                m.lost_pct
            )
            .ok();
        }
    }
    let verdict = |met: bool| if met { "MET" } else { "MISSED" };
    match p.scenario {
        Scenario::Broadcast => {
            // Every ringsock row (with and without a publish linger) against the best peer.
            let ours = |n: &str| n.starts_with("ringsock");
            let peer = ok.iter().filter(|(n, _)| !ours(n)).min_by(|a, b| {
                a.1.server_ns_per_delivery
                    .total_cmp(&b.1.server_ns_per_delivery)
            });
            for (rs_name, rs) in ok.iter().filter(|(n, _)| ours(n)) {
                let Some((name, peer)) = peer else { break };
                let gain = peer.server_ns_per_delivery / rs.server_ns_per_delivery;
                writeln!(
                    out,
                    "target: server CPU per delivery (with ksoftirqd) 1.5x below the peer's: \
                     {rs_name} {:.0} ns vs {name} {:.0} ns = {gain:.2}x: {}",
                    rs.server_ns_per_delivery,
                    peer.server_ns_per_delivery,
                    verdict(gain >= 1.5)
                )
                .ok();
            }
        }
        Scenario::Crossnode if p.subscribers == 100 && p.rate == 10_000.0 => {
            for (name, m) in &ok {
                writeln!(
                    out,
                    "target: p99 publish->deliver below 1 ms at 10,000 msg/s with 100 \
                     subscribers: {name} {:.0} us: {}",
                    m.latency_us[2],
                    verdict(m.latency_us[2] < 1000.0)
                )
                .ok();
            }
        }
        _ => {}
    }
    out
}

/// The JSON document of one case.
pub fn case_json(p: &FanParams, results: &[FanResult], reps: usize) -> Value {
    json!({
        "case": title(p),
        "scenario": p.scenario.name(),
        "size": p.size,
        "subscribers": p.subscribers,
        "inflight": if p.rate > 0.0 { Value::Null } else { json!(p.inflight) },
        "rate": p.rate,
        "threads": p.threads,
        "duration_s": p.duration.as_secs_f64(),
        "reps": reps,
        "cpu": crate::sys::cpu_model(),
        "loadavg_1m": crate::sys::loadavg(),
        "servers": results.iter().map(|r| json!({
            "name": r.name,
            "failure": r.failure,
            "median": r.median().to_json(),
            "samples": r.samples.iter().map(FanSample::to_json).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(name: &str, ns: f64, lost: f64) -> FanResult {
        FanResult {
            name: name.into(),
            samples: vec![FanSample {
                deliveries_per_sec: 1e6,
                server_ns_per_delivery: ns,
                lost_pct: lost,
                ..FanSample::default()
            }],
            merged: Histogram::new(3).unwrap(),
            failure: None,
        }
    }

    fn params(scenario: Scenario) -> FanParams {
        FanParams {
            scenario,
            sub_addr: "127.0.0.1:1".parse().unwrap(),
            pub_addr: "127.0.0.1:1".parse().unwrap(),
            subscribers: 100,
            inflight: 8,
            rate: 10_000.0,
            size: 64,
            duration: std::time::Duration::from_secs(1),
            warmup: std::time::Duration::ZERO,
            threads: 1,
            gen_cores: vec![],
            watch: vec![],
            softirq: None,
            label: String::new(),
            open_window: 1,
            publications: None,
            drain_timeout: std::time::Duration::ZERO,
        }
    }

    #[test]
    fn median_is_taken_per_figure() {
        let s = |v: f64| FanSample {
            deliveries_per_sec: v,
            latency_us: [v; 5],
            peak_rss: [10.0 - v; 3],
            generator_wait_pct: v,
            ..FanSample::default()
        };
        let m = FanSample::median(&[s(3.0), s(1.0), s(2.0)]);
        assert_eq!(m, s(2.0));
    }

    #[test]
    fn broadcast_target_needs_one_and_a_half_times_less_cpu_and_losses_are_flagged() {
        let p = params(Scenario::Broadcast);
        let t = table(
            &p,
            &[result("ringsock", 100.0, 0.0), result("peer", 150.0, 0.0)],
            1,
        );
        assert!(t.contains("= 1.50x: MET"), "{t}");
        let t = table(
            &p,
            &[result("ringsock", 101.0, 0.0), result("peer", 150.0, 2.5)],
            1,
        );
        assert!(t.contains(": MISSED"), "{t}");
        assert!(t.contains("lost: peer lost 2.500%"), "{t}");
    }

    #[test]
    fn crossnode_target_is_checked_per_engine() {
        let p = params(Scenario::Crossnode);
        let mut fast = result("redis", 0.0, 0.0);
        fast.samples[0].latency_us[2] = 900.0;
        let mut slow = result("nats", 0.0, 0.0);
        slow.samples[0].latency_us[2] = 1100.0;
        let t = table(&p, &[fast, slow], 1);
        assert!(t.contains("redis 900 us: MET"), "{t}");
        assert!(t.contains("nats 1100 us: MISSED"), "{t}");
    }
}
