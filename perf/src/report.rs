//! Turning runs into figures: per-run samples, medians over repetitions, the stdout table with
//! ratios to ringsock, the JSON document, and the SVG percentile-distribution plot.
//!
//! Pure formatting over collected numbers: nothing here runs or times anything.

use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde_json::{json, Value};

use crate::generator::{Outcome, Params, Scenario};

/// The figures of one repetition against one server.
#[derive(Debug, Clone, Default)]
pub struct Sample {
    /// Echoed messages per second.
    pub msgs_per_sec: f64,
    /// Echoed payload bytes per second (one direction).
    pub bytes_per_sec: f64,
    /// Latency percentiles and max, in µs: p50, p90, p99, p99.9, max.
    pub latency_us: [f64; 5],
    /// Server CPU time / wall time, in percent of one core.
    pub server_cpu_pct: f64,
    /// Time the server was runnable but not running / wall time, in percent: CPU the server
    /// wanted and did not get because other processes held its core.
    pub server_wait_pct: f64,
    /// Generator CPU time / wall time, in percent of one core.
    pub generator_cpu_pct: f64,
    /// Time the generator was runnable but not running / wall time, in percent.
    pub generator_wait_pct: f64,
    /// Server CPU time per echoed message, in ns.
    pub server_ns_per_msg: f64,
    /// Generator CPU time per echoed message, in ns: below the server's, the generator can
    /// outpace it.
    pub generator_ns_per_msg: f64,
    /// Server RSS growth per connection, in bytes (connections scenario).
    pub rss_per_conn: f64,
    /// Server PSS growth per connection, in bytes (connections scenario).
    pub pss_per_conn: f64,
    /// Server RSS growth per connection once each has echoed one message, in bytes.
    pub active_rss_per_conn: f64,
    /// Server RSS growth per connection from half the connections to all of them, in bytes:
    /// the memory each further idle connection costs, without fixed costs.
    pub marginal_rss_per_conn: f64,
    /// Seconds taken to open all connections.
    pub connect_seconds: f64,
}

/// Latency quantiles reported, matching [`Sample::latency_us`] (the last is the max).
pub const QUANTILES: [f64; 4] = [0.5, 0.9, 0.99, 0.999];

impl Sample {
    /// The figures of one outcome of a run with `p`.
    pub fn from_outcome(p: &Params, o: &Outcome) -> Sample {
        let secs = o.seconds.max(1e-9);
        let mut latency_us = [0.0; 5];
        for (slot, q) in latency_us.iter_mut().zip(QUANTILES) {
            *slot = o.latency.value_at_quantile(q) as f64 / 1e3;
        }
        latency_us[4] = o.latency.max() as f64 / 1e3;
        let server_cpu = o.server_cpu_ns.unwrap_or(0) as f64;
        let (rss_per_conn, pss_per_conn) = match o.memory {
            Some((before, after)) => {
                let n = p.conns.max(1) as f64;
                (
                    (after.rss as f64 - before.rss as f64) / n,
                    (after.pss as f64 - before.pss as f64) / n,
                )
            }
            None => (0.0, 0.0),
        };
        let marginal_rss_per_conn = match (o.memory, o.memory_half) {
            (Some((_, after)), Some(half)) => {
                let n = (p.conns - p.conns / 2).max(1) as f64;
                (after.rss as f64 - half.rss as f64) / n
            }
            _ => 0.0,
        };
        let active_rss_per_conn = match (o.memory, o.memory_active) {
            (Some((before, _)), Some(active)) => {
                (active.rss as f64 - before.rss as f64) / p.conns.max(1) as f64
            }
            _ => 0.0,
        };
        Sample {
            msgs_per_sec: o.messages as f64 / secs,
            bytes_per_sec: o.messages as f64 * p.size as f64 / secs,
            latency_us,
            server_cpu_pct: server_cpu / (secs * 1e9) * 100.0,
            server_wait_pct: o.server_wait_ns.unwrap_or(0) as f64 / (secs * 1e9) * 100.0,
            generator_cpu_pct: o.generator_cpu_ns as f64 / (secs * 1e9) * 100.0,
            generator_wait_pct: o.generator_wait_ns as f64 / (secs * 1e9) * 100.0,
            generator_ns_per_msg: if o.messages > 0 {
                o.generator_cpu_ns as f64 / o.messages as f64
            } else {
                0.0
            },
            server_ns_per_msg: if o.messages > 0 {
                server_cpu / o.messages as f64
            } else {
                0.0
            },
            rss_per_conn,
            pss_per_conn,
            active_rss_per_conn,
            marginal_rss_per_conn,
            connect_seconds: o.connect_seconds,
        }
    }

    /// The per-field median of `samples` (the upper median for an even count).
    pub fn median(samples: &[Sample]) -> Sample {
        let med = |f: &dyn Fn(&Sample) -> f64| {
            let mut v: Vec<f64> = samples.iter().map(f).collect();
            v.sort_by(|a, b| a.total_cmp(b));
            v.get(v.len() / 2).copied().unwrap_or(0.0)
        };
        let mut latency_us = [0.0; 5];
        for (i, slot) in latency_us.iter_mut().enumerate() {
            *slot = med(&|s| s.latency_us[i]);
        }
        Sample {
            msgs_per_sec: med(&|s| s.msgs_per_sec),
            bytes_per_sec: med(&|s| s.bytes_per_sec),
            latency_us,
            server_cpu_pct: med(&|s| s.server_cpu_pct),
            server_wait_pct: med(&|s| s.server_wait_pct),
            generator_cpu_pct: med(&|s| s.generator_cpu_pct),
            generator_wait_pct: med(&|s| s.generator_wait_pct),
            server_ns_per_msg: med(&|s| s.server_ns_per_msg),
            generator_ns_per_msg: med(&|s| s.generator_ns_per_msg),
            rss_per_conn: med(&|s| s.rss_per_conn),
            pss_per_conn: med(&|s| s.pss_per_conn),
            active_rss_per_conn: med(&|s| s.active_rss_per_conn),
            marginal_rss_per_conn: med(&|s| s.marginal_rss_per_conn),
            connect_seconds: med(&|s| s.connect_seconds),
        }
    }

    /// The sample as JSON.
    pub fn to_json(&self) -> Value {
        json!({
            "msgs_per_sec": self.msgs_per_sec,
            "bytes_per_sec": self.bytes_per_sec,
            "latency_us": {
                "p50": self.latency_us[0], "p90": self.latency_us[1], "p99": self.latency_us[2],
                "p99_9": self.latency_us[3], "max": self.latency_us[4],
            },
            "server_cpu_pct": self.server_cpu_pct,
            "server_wait_pct": self.server_wait_pct,
            "generator_cpu_pct": self.generator_cpu_pct,
            "generator_wait_pct": self.generator_wait_pct,
            "server_ns_per_msg": self.server_ns_per_msg,
            "generator_ns_per_msg": self.generator_ns_per_msg,
            "rss_per_conn": self.rss_per_conn,
            "pss_per_conn": self.pss_per_conn,
            "active_rss_per_conn": self.active_rss_per_conn,
            "marginal_rss_per_conn": self.marginal_rss_per_conn,
            "connect_seconds": self.connect_seconds,
        })
    }
}

/// Everything measured for one server in one case.
#[derive(Debug)]
pub struct ServerResult {
    /// The server's table name.
    pub name: String,
    /// One sample per repetition.
    pub samples: Vec<Sample>,
    /// Latency histograms of all repetitions merged (for the plot).
    pub merged: Histogram<u64>,
    /// Why the server failed the case, if it did (its samples then stop there).
    pub failure: Option<String>,
}

impl ServerResult {
    /// Medians over the repetitions.
    pub fn median(&self) -> Sample {
        Sample::median(&self.samples)
    }
}

/// A one-line description of the case `p` runs.
pub fn case_title(p: &Params) -> String {
    let mut t = format!("{} size {}", p.scenario.name(), bytes(p.size as f64));
    match p.scenario {
        Scenario::Connections => return format!("connections: {} idle", p.conns),
        Scenario::Big if p.fragment > 0 => write!(t, " in {} fragments", bytes(p.fragment as f64)),
        Scenario::Chop => write!(t, " in {} chops", bytes(p.chop as f64)),
        _ => Ok(()),
    }
    .ok();
    write!(t, ", {} conns x {} in flight", p.conns, p.inflight).ok();
    if p.threads > 1 {
        write!(t, ", {} generator threads", p.threads).ok();
    }
    if p.tls.is_some() {
        t.push_str(", wss://");
    }
    t
}

/// A short file-name fragment for the case.
pub fn case_slug(p: &Params) -> String {
    let mut s = format!("{}-{}", p.scenario.name(), p.size);
    if p.fragment > 0 {
        write!(s, "-f{}", p.fragment).ok();
    }
    if p.chop > 0 {
        write!(s, "-c{}", p.chop).ok();
    }
    if p.scenario == Scenario::Connections {
        s = format!("connections-{}", p.conns);
    }
    if p.tls.is_some() {
        s.push_str("-tls");
    }
    s
}

/// The table of medians, each key figure followed by its ratio to ringsock's.
pub fn table(p: &Params, results: &[ServerResult], reps: usize) -> String {
    let meds: Vec<Sample> = results.iter().map(ServerResult::median).collect();
    let base = results
        .iter()
        .position(|r| r.name == "ringsock" && r.failure.is_none())
        .map(|i| meds[i].clone());
    let ratio = |v: f64, b: Option<f64>| match b {
        Some(b) if b != 0.0 => format!("{:.2}x", v / b),
        _ => "-".into(),
    };
    // The name column fits the longest name (tokio-tungstenite-tls).
    let w = results.iter().map(|r| r.name.len()).fold(18, usize::max);
    let mut out = String::new();
    writeln!(
        out,
        "\n## {} (median of {reps}; ratio = server / ringsock)",
        case_title(p)
    )
    .ok();
    if p.scenario == Scenario::Connections {
        writeln!(
            out,
            "{:<w$} {:>12} {:>7} {:>12} {:>7} {:>12} {:>7} {:>16} {:>7} {:>8}",
            "server",
            "RSS/conn",
            "ratio",
            "marginal",
            "ratio",
            "PSS/conn",
            "ratio",
            "after 1 msg RSS",
            "ratio",
            "open s"
        )
        .ok();
        for (r, m) in results.iter().zip(&meds) {
            if let Some(f) = &r.failure {
                writeln!(out, "{:<w$} FAILED: {f}", r.name).ok();
                continue;
            }
            writeln!(
                out,
                "{:<w$} {:>12} {:>7} {:>12} {:>7} {:>12} {:>7} {:>16} {:>7} {:>8.2}",
                r.name,
                bytes(m.rss_per_conn),
                ratio(m.rss_per_conn, base.as_ref().map(|b| b.rss_per_conn)),
                bytes(m.marginal_rss_per_conn),
                ratio(
                    m.marginal_rss_per_conn,
                    base.as_ref().map(|b| b.marginal_rss_per_conn)
                ),
                bytes(m.pss_per_conn),
                ratio(m.pss_per_conn, base.as_ref().map(|b| b.pss_per_conn)),
                bytes(m.active_rss_per_conn),
                ratio(
                    m.active_rss_per_conn,
                    base.as_ref().map(|b| b.active_rss_per_conn)
                ),
                m.connect_seconds
            )
            .ok();
        }
        out.push_str(&target(p, results, &meds));
        return out;
    }
    writeln!(
        out,
        "{:<w$} {:>9} {:>6} {:>10} {:>6} {:>8} {:>6} {:>8} {:>8} {:>6} {:>8} {:>8} {:>5} {:>5} {:>5} {:>6} \
         {:>8} {:>6} {:>8}",
        "server",
        "msg/s",
        "ratio",
        "B/s",
        "ratio",
        "p50 us",
        "ratio",
        "p90",
        "p99 us",
        "ratio",
        "p99.9",
        "max",
        "srv%",
        "wait%",
        "gen%",
        "gwait%",
        "ns/msg",
        "ratio",
        "gen ns"
    )
    .ok();
    for (r, m) in results.iter().zip(&meds) {
        if let Some(f) = &r.failure {
            writeln!(out, "{:<w$} FAILED: {f}", r.name).ok();
            continue;
        }
        let b = base.as_ref();
        writeln!(
            out,
            "{:<w$} {:>9} {:>6} {:>10} {:>6} {:>8.1} {:>6} {:>8.1} {:>8.1} {:>6} {:>8.1} {:>8.1} \
             {:>5.0} {:>5.0} {:>5.0} {:>6.0} {:>8.0} {:>6} {:>8.0}",
            r.name,
            crate::generator::si(m.msgs_per_sec),
            ratio(m.msgs_per_sec, b.map(|b| b.msgs_per_sec)),
            bytes(m.bytes_per_sec),
            ratio(m.bytes_per_sec, b.map(|b| b.bytes_per_sec)),
            m.latency_us[0],
            ratio(m.latency_us[0], b.map(|b| b.latency_us[0])),
            m.latency_us[1],
            m.latency_us[2],
            ratio(m.latency_us[2], b.map(|b| b.latency_us[2])),
            m.latency_us[3],
            m.latency_us[4],
            m.server_cpu_pct,
            m.server_wait_pct,
            m.generator_cpu_pct,
            m.generator_wait_pct,
            m.server_ns_per_msg,
            ratio(m.server_ns_per_msg, b.map(|b| b.server_ns_per_msg)),
            m.generator_ns_per_msg,
        )
        .ok();
    }
    out.push_str(&target(p, results, &meds));
    out
}

/// The issue's target for this case, checked against the medians: a line saying what was
/// required, the figures, and MET or MISSED (empty when the case has no target or no ringsock).
fn target(p: &Params, results: &[ServerResult], meds: &[Sample]) -> String {
    let ok: Vec<(&str, &Sample)> = results
        .iter()
        .zip(meds)
        .filter(|(r, _)| r.failure.is_none())
        .map(|(r, m)| (r.name.as_str(), m))
        .collect();
    let Some(&(_, rs)) = ok.iter().find(|(n, _)| *n == "ringsock") else {
        return String::new();
    };
    let peers: Vec<(&str, &Sample)> = ok.into_iter().filter(|(n, _)| *n != "ringsock").collect();
    if peers.is_empty() {
        return String::new();
    }
    let best = |f: &dyn Fn(&Sample) -> f64| {
        peers
            .iter()
            .map(|(n, m)| (*n, f(m)))
            .fold(("", f64::MIN), |a, b| if b.1 > a.1 { b } else { a })
    };
    let verdict = |met: bool| if met { "MET" } else { "MISSED" };
    let (needed, figures, met) = match p.scenario {
        // wss:// (issue 12): server CPU per message 1.5x below the TLS peer's up to 1 KiB, no
        // worse above.
        Scenario::Throughput | Scenario::Big if p.tls.is_some() => {
            let (name, c) = best(&|m| -m.server_ns_per_msg);
            let factor = if p.size <= 1024 { 1.5 } else { 1.0 };
            (
                format!("server CPU/msg {factor}x below the TLS peer"),
                format!(
                    "{name} {:.0} ns vs ringsock {:.0} ns = {:.2}x",
                    -c,
                    rs.server_ns_per_msg,
                    -c / rs.server_ns_per_msg
                ),
                -c >= factor * rs.server_ns_per_msg,
            )
        }
        Scenario::Throughput => {
            let (name, v) = best(&|m| m.msgs_per_sec);
            let (cname, c) = best(&|m| -m.server_ns_per_msg);
            (
                "msg/s >= 1.5x best peer".to_string(),
                format!(
                    "ringsock {} vs {name} {} = {:.2}x; CPU/msg: {cname} {:.0} ns vs ringsock {:.0} \
                     ns = {:.2}x",
                    crate::generator::si(rs.msgs_per_sec),
                    crate::generator::si(v),
                    rs.msgs_per_sec / v,
                    -c,
                    rs.server_ns_per_msg,
                    -c / rs.server_ns_per_msg
                ),
                rs.msgs_per_sec >= 1.5 * v,
            )
        }
        Scenario::Rtt => {
            let p50 = peers
                .iter()
                .map(|(_, m)| m.latency_us[0])
                .fold(f64::MAX, f64::min);
            let p99 = peers
                .iter()
                .map(|(_, m)| m.latency_us[2])
                .fold(f64::MAX, f64::min);
            (
                "p50 and p99 <= every peer".to_string(),
                format!(
                    "ringsock p50 {:.1} us (best peer {p50:.1}), p99 {:.1} us (best peer {p99:.1})",
                    rs.latency_us[0], rs.latency_us[2]
                ),
                rs.latency_us[0] <= p50 && rs.latency_us[2] <= p99,
            )
        }
        Scenario::Big if p.size >= 16 << 20 => {
            let (name, v) = best(&|m| m.bytes_per_sec);
            (
                "bytes/s >= 1.2x best peer".to_string(),
                format!(
                    "ringsock {} /s vs {name} {} /s = {:.2}x",
                    bytes(rs.bytes_per_sec),
                    bytes(v),
                    rs.bytes_per_sec / v
                ),
                rs.bytes_per_sec >= 1.2 * v,
            )
        }
        Scenario::Connections => {
            let (name, v) = best(&|m| -m.rss_per_conn);
            (
                "memory per connection below every peer".to_string(),
                format!(
                    "ringsock {} vs {name} {}",
                    bytes(rs.rss_per_conn),
                    bytes(-v)
                ),
                rs.rss_per_conn < -v,
            )
        }
        _ => return String::new(),
    };
    let mut line = format!("target: {needed}: {figures}: {}\n", verdict(met));
    if p.scenario == Scenario::Connections && p.tls.is_none() {
        // Issue 10: at or below uWebSockets' 0.25 KiB per idle connection.
        let v = rs.marginal_rss_per_conn;
        line.push_str(&format!(
            "target: marginal memory per idle connection at most 256 B: ringsock {}: {}\n",
            bytes(v),
            verdict(v <= 256.0)
        ));
    }
    line
}

/// The JSON document of one case.
pub fn case_json(p: &Params, results: &[ServerResult], reps: usize) -> Value {
    json!({
        "case": case_title(p),
        "scenario": p.scenario.name(),
        "size": p.size,
        "fragment": p.fragment,
        "chop": p.chop,
        "conns": p.conns,
        "inflight": p.inflight,
        "tls": p.tls.is_some(),
        "duration_s": p.duration.as_secs_f64(),
        "reps": reps,
        "cpu": crate::sys::cpu_model(),
        "loadavg_1m": crate::sys::loadavg(),
        "servers": results.iter().map(|r| json!({
            "name": r.name,
            "failure": r.failure,
            "median": r.median().to_json(),
            "samples": r.samples.iter().map(Sample::to_json).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

/// `1536.0` as `1.5 KiB`.
pub fn bytes(v: f64) -> String {
    let units = ["B", "KiB", "MiB", "GiB"];
    let mut v = v;
    let mut u = 0;
    while v.abs() >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{v:.0} B")
    } else {
        format!("{v:.1} {}", units[u])
    }
}

/// The latency percentile distribution of each server as an SVG line plot: x is the percentile
/// on a log scale of 1/(1-q) (0% to 99.999%), y the latency in µs.
pub fn svg(title: &str, results: &[(&str, &Histogram<u64>)]) -> String {
    const W: f64 = 900.0;
    const H: f64 = 500.0;
    const L: f64 = 80.0;
    const R: f64 = 200.0;
    const T: f64 = 40.0;
    const B: f64 = 50.0;
    const DECADES: f64 = 5.0;
    const COLORS: [&str; 6] = [
        "#d62728", "#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
    ];
    let quantile = |x: f64| 1.0 - 10f64.powf(-x);
    let y_max = results
        .iter()
        .filter(|r| !r.1.is_empty())
        .map(|r| r.1.value_at_quantile(quantile(DECADES)) as f64 / 1e3)
        .fold(1.0, f64::max);
    let y_max = nice_ceiling(y_max * 1.02);
    let px = |x: f64| L + x / DECADES * (W - L - R);
    let py = |y: f64| H - B - y / y_max * (H - T - B);
    let mut s = String::new();
    writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">"#
    )
    .ok();
    writeln!(s, r#"<rect width="{W}" height="{H}" fill="white"/>"#).ok();
    writeln!(
        s,
        r#"<text x="{}" y="24" font-size="15">{}</text>"#,
        L,
        xml(title)
    )
    .ok();
    for (i, label) in ["0%", "90%", "99%", "99.9%", "99.99%", "99.999%"]
        .iter()
        .enumerate()
    {
        let x = px(i as f64);
        writeln!(
            s,
            r##"<line x1="{x}" y1="{}" x2="{x}" y2="{}" stroke="#ddd"/><text x="{x}" y="{}" text-anchor="middle">{label}</text>"##,
            T,
            H - B,
            H - B + 18.0
        )
        .ok();
    }
    for i in 0..=5 {
        let v = y_max * i as f64 / 5.0;
        let y = py(v);
        writeln!(
            s,
            r##"<line x1="{L}" y1="{y}" x2="{}" y2="{y}" stroke="#ddd"/><text x="{}" y="{}" text-anchor="end">{v:.0}</text>"##,
            W - R,
            L - 6.0,
            y + 4.0
        )
        .ok();
    }
    writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">percentile</text><text x="16" y="{}" transform="rotate(-90 16 {})" text-anchor="middle">latency (µs)</text>"#,
        (L + W - R) / 2.0,
        H - 10.0,
        H / 2.0,
        H / 2.0
    )
    .ok();
    for (i, &(name, merged)) in results.iter().enumerate() {
        if merged.is_empty() {
            continue;
        }
        let color = COLORS[i % COLORS.len()];
        let points: Vec<String> = (0..=250)
            .map(|k| {
                let x = DECADES * k as f64 / 250.0;
                let v = merged.value_at_quantile(quantile(x)) as f64 / 1e3;
                format!("{:.1},{:.1}", px(x), py(v.min(y_max)))
            })
            .collect();
        writeln!(
            s,
            r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>"#,
            points.join(" ")
        )
        .ok();
        let ly = T + 20.0 + 20.0 * i as f64;
        writeln!(
            s,
            r#"<line x1="{}" y1="{ly}" x2="{}" y2="{ly}" stroke="{color}" stroke-width="3"/><text x="{}" y="{}">{}</text>"#,
            W - R + 15.0,
            W - R + 40.0,
            W - R + 46.0,
            ly + 4.0,
            xml(name)
        )
        .ok();
    }
    s.push_str("</svg>\n");
    s
}

/// The smallest 1, 2, 2.5 or 5 times a power of ten that is at least `v`: round axis ticks.
fn nice_ceiling(v: f64) -> f64 {
    let decade = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 2.5, 5.0, 10.0]
        .into_iter()
        .map(|m| m * decade)
        .find(|&c| c >= v)
        .unwrap_or(10.0 * decade)
}

/// Escapes text for SVG.
fn xml(t: &str) -> String {
    t.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_takes_middle_value_per_field() {
        let s = |v: f64| Sample {
            msgs_per_sec: v,
            server_ns_per_msg: 10.0 - v,
            ..Sample::default()
        };
        let m = Sample::median(&[s(3.0), s(1.0), s(2.0)]);
        assert_eq!(m.msgs_per_sec, 2.0);
        assert_eq!(m.server_ns_per_msg, 8.0);
    }

    #[test]
    fn svg_has_one_line_per_server() {
        let mut h = Histogram::<u64>::new(3).unwrap();
        for v in 1..1000u64 {
            h.record(v * 1000).unwrap();
        }
        let svg = svg("t <x>", &[("a", &h), ("b", &h)]);
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains("t &lt;x&gt;"));
    }

    #[test]
    fn nice_ceiling_rounds_up_to_round_numbers() {
        assert_eq!(nice_ceiling(71428.0), 100000.0);
        assert_eq!(nice_ceiling(1.3), 2.0);
        assert_eq!(nice_ceiling(230.0), 250.0);
    }

    #[test]
    fn throughput_target_needs_one_and_a_half_times_the_best_peer() {
        let params = Params {
            addr: "127.0.0.1:1".parse().unwrap(),
            scenario: Scenario::Throughput,
            conns: 100,
            inflight: 16,
            size: 16,
            fragment: 0,
            chop: 0,
            duration: std::time::Duration::from_secs(1),
            warmup: std::time::Duration::ZERO,
            messages: None,
            server_pid: None,
            label: String::new(),
            open_window: 1,
            spin: false,
            idle_wait: std::time::Duration::from_millis(500),
            gate: None,
            quiet: false,
            threads: 1,
            gen_cores: Vec::new(),
            tls: None,
        };
        let result = |name: &str, rate: f64| ServerResult {
            name: name.into(),
            samples: vec![Sample {
                msgs_per_sec: rate,
                server_ns_per_msg: 1000.0,
                ..Sample::default()
            }],
            merged: Histogram::new(3).unwrap(),
            failure: None,
        };
        let check = |rs: f64| {
            let results = [
                result("ringsock", rs),
                result("a", 100.0),
                result("b", 200.0),
            ];
            table(&params, &results, 1)
        };
        assert!(check(300.0).contains(": MET"));
        assert!(check(299.0).contains(": MISSED"));
    }

    #[test]
    fn bytes_uses_binary_units() {
        assert_eq!(bytes(512.0), "512 B");
        assert_eq!(bytes(1536.0), "1.5 KiB");
        assert_eq!(bytes(16.0 * 1024.0 * 1024.0), "16.0 MiB");
    }
}
