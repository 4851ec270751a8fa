//! `ringsock-perf`: a load generator for WebSocket echo servers and side-by-side runs of ringsock
//! against tokio-websockets, fastwebsockets and tokio-tungstenite. See `perf/README.md`.
//!
//! Subcommands:
//! - `compare`: starts each server as a pinned child, runs the scenario against each in turn
//!   (round-robin repetitions), prints medians with ratios to ringsock, writes JSON and an SVG
//!   latency plot to `perf/results/`.
//! - `bench`: one scenario against a server that is already running (`--addr`, optional `--pid`).
//! - `instr`: instructions per echoed message under valgrind (cachegrind).
//! - `serve PEER --addr A` (hidden): runs a peer's echo server; `compare` starts it.
//!
//! The binary never links ringsock: it tests the server from outside, over loopback only.

mod fancmd;
mod fanout;
mod fanreport;
mod fanwire;
mod generator;
mod report;
mod sendzc;
mod servers;
mod sys;
mod tls;
mod wire;

use std::collections::HashMap;
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;

use generator::{Params, Scenario};
use report::{Sample, ServerResult};
use servers::{Kind, Peer, ServerProc};

const USAGE: &str = "\
usage:
  ringsock-perf compare [options]   start ringsock and the peers, run each in turn, compare
  ringsock-perf bench --addr HOST:PORT [--pid PID] [options]   run against a running server
  ringsock-perf instr [--messages N] [options]   instructions per message under valgrind
  ringsock-perf sendzc send|zc [MESSAGES]   io_uring SEND against SEND_ZC on loopback, 16 MiB

options:
  --scenario rtt|throughput|big|chop|connections|broadcast|crossnode   (default throughput)
  --conns N          client connections (rtt 1, throughput 100, big 1, chop 1, connections 10000);
                     broadcast/crossnode: subscribers, a list (1000 / 100)
  --inflight N       messages in flight per connection (throughput 16, else 1); broadcast and
                     crossnode closed loop: publications in flight (8)
  --linger LIST      broadcast: ringsock's publish linger in microseconds, one ringsock row
                     per value, e.g. 0,5000 (default 0: ringsock as it ships)
  --rate R           broadcast/crossnode: publications per second, 0 = closed loop
                     (broadcast 0, crossnode 10000)
  --threads N        generator threads, connections split over them (default 1)
  --size LIST        payload sizes, e.g. 16,64,1k,64KiB,16M (rtt/throughput 16, big 16M, chop 1M,
                     broadcast 1k, crossnode 64; fan-out sizes at least 16)
  --fragment LIST    big: fragment payload sizes, 0 = whole message (default 0)
  --chop LIST        chop: bytes per write call (default 64)
  --duration SECS    measured seconds per run (default 5)
  --warmup SECS      unmeasured seconds before (default 1)
  --reps N           compare: repetitions, round-robin over the servers (default 3)
  --servers LIST     compare/instr: subset of ringsock,tokio-websockets,fastwebsockets,tokio-tungstenite
                     (broadcast: ringsock,tokio-tungstenite-fanout)
  --brokers LIST     crossnode: redis,nats (default both)
  --ringsock-bin P   ringsock binary (default target/release/examples/echo; broadcast and
                     crossnode: target/release/examples/fanout)
  --server-core N    core the servers (crossnode: node B) are pinned to (default 0)
  --node-a-core N    crossnode: core of node A (default the server core)
  --broker-core N    crossnode: core of the broker (default the server core)
  --redis-server P   crossnode: redis-server binary (default from PATH)
  --nats-server P    crossnode: nats-server binary (default from PATH)
  --pub-addr A       bench crossnode: node A, where the publisher connects (--addr: node B)
  --gen-core LIST    cores the generator threads are pinned to, in turn (default 1)
  --messages N       instr: echoes per measured run (default 20000)
  --out DIR          where JSON and SVG go (default perf/results)
  --json             print JSON on stdout (the table goes to stderr)
  --spin             busy-poll in the generator instead of sleeping in epoll_wait
  --idle-wait SECS   connections: idle time before the server's memory is read (default 3,
                     past ringsock's idle sweep, which gives back buffers after 1 s quiet)
  --tls              wss:// (rtt, throughput, big, connections): compare makes a self-signed
                     certificate in <out>/tls/, starts ringsock's echo with --tls CERT KEY and
                     the TLS peer tokio-tungstenite-tls; bench trusts --cert FILE (default
                     <out>/tls/cert.pem, made if missing)
  --cert FILE        bench --tls: the server's certificate (PEM), the only one trusted
  --tls-record N     --tls: the generator's largest record, header included (default rustls'
                     16 KiB + 5)
";

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    if argv.first().map(String::as_str) != Some("serve") {
        // The peers' servers keep the default SIGTERM action: killed at once, and valgrind
        // still writes its counts.
        sys::install_signal_handlers();
    }
    let result = match argv.first().map(String::as_str) {
        Some("serve") => serve_cmd(&argv[1..]),
        Some("compare") => Args::parse(&argv[1..]).and_then(|a| match a.fanout()? {
            Some(s) => prepare(&a).and_then(|()| fancmd::compare(&a, s)),
            None => compare_cmd(&a),
        }),
        Some("bench") => Args::parse(&argv[1..]).and_then(|a| match a.fanout()? {
            Some(s) => prepare(&a).and_then(|()| fancmd::bench(&a, s)),
            None => bench_cmd(&a),
        }),
        Some("instr") => Args::parse(&argv[1..]).and_then(|a| instr_cmd(&a)),
        Some("sendzc") => sendzc::run(&argv[1..]),
        _ => Err(USAGE.to_string()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            generator::progress_done();
            eprintln!("ringsock-perf: FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `--key value` options and `--flag` switches.
struct Args {
    values: HashMap<String, String>,
    json: bool,
    spin: bool,
    tls: bool,
}

impl Args {
    fn parse(argv: &[String]) -> Result<Args, String> {
        let mut values = HashMap::new();
        let mut json = false;
        let mut spin = false;
        let mut tls = false;
        let mut it = argv.iter();
        while let Some(arg) = it.next() {
            let Some(key) = arg.strip_prefix("--") else {
                return Err(format!("unexpected argument {arg:?}\n{USAGE}"));
            };
            if key == "json" {
                json = true;
                continue;
            }
            if key == "spin" {
                spin = true;
                continue;
            }
            if key == "tls" {
                tls = true;
                continue;
            }
            let value = it.next().ok_or_else(|| format!("--{key} needs a value"))?;
            values.insert(key.to_string(), value.clone());
        }
        Ok(Args {
            values,
            json,
            spin,
            tls,
        })
    }

    /// The scenario if it is a fan-out one (`broadcast`, `crossnode`).
    fn fanout(&self) -> Result<Option<Scenario>, String> {
        let name = self.get("scenario").unwrap_or("throughput");
        let scenario = Scenario::parse(name).ok_or_else(|| format!("unknown scenario {name:?}"))?;
        if self.tls && scenario.is_fanout() {
            return Err(format!("--tls: {name} runs ws:// only"));
        }
        Ok(scenario.is_fanout().then_some(scenario))
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.values.get(key).map(String::as_str)
    }

    fn num(&self, key: &str, default: u64) -> Result<u64, String> {
        match self.get(key) {
            Some(v) => parse_size(v).ok_or_else(|| format!("--{key}: not a number: {v:?}")),
            None => Ok(default),
        }
    }

    fn secs(&self, key: &str, default: f64) -> Result<Duration, String> {
        let v = match self.get(key) {
            Some(v) => v
                .parse::<f64>()
                .map_err(|_| format!("--{key}: not seconds: {v:?}"))?,
            None => default,
        };
        Duration::try_from_secs_f64(v).map_err(|e| format!("--{key}: {e}"))
    }

    fn list(&self, key: &str, default: u64) -> Result<Vec<u64>, String> {
        match self.get(key) {
            Some(v) => v
                .split(',')
                .map(|s| parse_size(s).ok_or_else(|| format!("--{key}: bad value {s:?}")))
                .collect(),
            None => Ok(vec![default]),
        }
    }

    /// The cases (one `Params` per size × fragment × chop) that the options describe.
    fn cases(&self, addr: SocketAddr) -> Result<Vec<Params>, String> {
        let name = self.get("scenario").unwrap_or("throughput");
        let scenario = Scenario::parse(name).ok_or_else(|| format!("unknown scenario {name:?}"))?;
        let (conns, inflight, size) = match scenario {
            Scenario::Rtt => (1, 1, 16),
            Scenario::Throughput => (100, 16, 16),
            Scenario::Big => (1, 1, 16 << 20),
            Scenario::Chop => (1, 1, 1 << 20),
            Scenario::Connections => (10_000, 1, 16),
            Scenario::Broadcast | Scenario::Crossnode => {
                return Err(format!(
                    "{name} is a fan-out scenario, not an echo scenario"
                ))
            }
        };
        if self.tls && scenario == Scenario::Chop {
            return Err("--tls: chop writes plaintext in chops, which TLS records hide".into());
        }
        let conns = self.num("conns", conns)? as usize;
        let inflight = self.num("inflight", inflight)? as usize;
        if conns == 0 || inflight == 0 {
            return Err("--conns and --inflight must be at least 1".into());
        }
        let chops = if scenario == Scenario::Chop {
            self.list("chop", 64)?
        } else {
            vec![0]
        };
        let fragments = if scenario == Scenario::Big {
            self.list("fragment", 0)?
        } else {
            vec![0]
        };
        let mut cases = Vec::new();
        for &size in &self.list("size", size)? {
            for &fragment in &fragments {
                for &chop in &chops {
                    if size > 64 << 20 {
                        return Err("sizes above 64 MiB are not supported".into());
                    }
                    if fragment > 0 && (size as usize).div_ceil(fragment as usize) > 65536 {
                        eprintln!(
                            "note: {size} B in {fragment} B fragments is more than 65536 frames; \
                             servers may refuse it"
                        );
                    }
                    cases.push(Params {
                        addr,
                        scenario,
                        conns,
                        inflight,
                        size: size as usize,
                        fragment: fragment as usize,
                        chop: chop as usize,
                        duration: self.secs("duration", 5.0)?,
                        warmup: self.secs("warmup", 1.0)?,
                        messages: None,
                        server_pid: None,
                        label: String::new(),
                        open_window: 128,
                        spin: self.spin,
                        idle_wait: self.secs("idle-wait", 3.0)?,
                        gate: None,
                        quiet: false,
                        threads: self.num("threads", 1)?.max(1) as usize,
                        gen_cores: self
                            .list("gen-core", 1)?
                            .iter()
                            .map(|&c| c as usize)
                            .collect(),
                        tls: None,
                    });
                }
            }
        }
        Ok(cases)
    }

    /// The client configuration with `--tls-record`'s limit, if given.
    fn record_limit(
        &self,
        config: &Arc<rustls::ClientConfig>,
    ) -> Result<Arc<rustls::ClientConfig>, String> {
        match self.num("tls-record", 0)? {
            0 => Ok(Arc::clone(config)),
            n => tls::with_max_record(config, n as usize),
        }
    }

    fn out_dir(&self) -> PathBuf {
        match self.get("out") {
            Some(d) => PathBuf::from(d),
            None => Path::new(env!("CARGO_MANIFEST_DIR")).join("results"),
        }
    }

    fn servers(&self) -> Result<Vec<Kind>, String> {
        let default_bin =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/examples/echo");
        let bin = self
            .get("ringsock-bin")
            .map(PathBuf::from)
            .unwrap_or(default_bin);
        let all = if self.tls {
            "ringsock,tokio-tungstenite-tls"
        } else {
            "ringsock,tokio-websockets,fastwebsockets,tokio-tungstenite"
        };
        let names = self.get("servers").unwrap_or(all);
        let mut kinds = Vec::new();
        for name in names.split(',') {
            if name == "ringsock" {
                if bin.exists() {
                    kinds.push(Kind::Ringsock(bin.clone()));
                } else {
                    eprintln!(
                        "note: {} missing (cargo build --release --example echo); ringsock \
                         skipped, no ratios",
                        bin.display()
                    );
                }
            } else {
                let peer = Peer::parse(name).ok_or_else(|| format!("unknown server {name:?}"))?;
                if peer.is_fanout() {
                    return Err(format!("{name} serves the broadcast scenario, not echo"));
                }
                if peer.is_tls() != self.tls {
                    return Err(match self.tls {
                        true => format!("{name} serves ws://, not wss:// (--tls)"),
                        false => format!("{name} serves wss:// only (add --tls)"),
                    });
                }
                kinds.push(Kind::Peer(peer));
            }
        }
        Ok(kinds)
    }
}

/// `16`, `64k`, `64KiB`, `16M`, `1MiB` → bytes (binary multiples).
fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let n: u64 = digits.parse().ok()?;
    let mult = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" | "kb" => 1 << 10,
        "m" | "mib" | "mb" => 1 << 20,
        _ => return None,
    };
    n.checked_mul(mult)
}

/// Pins the generator and raises the fd limit (inherited by the servers started later).
fn prepare(args: &Args) -> Result<(), String> {
    let core = args.list("gen-core", 1)?[0] as usize;
    if let Err(e) = sys::pin_to_core(core) {
        eprintln!("note: cannot pin the generator to core {core}: {e}");
    }
    let load = sys::loadavg();
    if load > 1.5 {
        eprintln!(
            "note: load average {load:.1}: other processes compete for the cores, so rates and \
             latencies are noisy; server ns/msg and wait% show how much"
        );
    }
    let limit = sys::raise_fd_limit().map_err(|e| format!("setrlimit(NOFILE): {e}"))?;
    if let Some(c) = args.list("conns", 0)?.into_iter().max() {
        if c + 64 > limit {
            return Err(format!(
                "--conns {c} needs more fds than the hard limit {limit}"
            ));
        }
    }
    Ok(())
}

fn compare_cmd(args: &Args) -> Result<(), String> {
    prepare(args)?;
    let kinds = args.servers()?;
    let reps = args.num("reps", 3)?.max(1) as usize;
    let core = args.num("server-core", 0)? as usize;
    let mut cases = args.cases(servers::free_addr()?)?;
    // One certificate for the whole run: every server reads the same files.
    let tls = match args.tls {
        true => Some(tls::TlsFiles::generate(&args.out_dir().join("tls"))?),
        false => None,
    };
    let client = match &tls {
        Some(t) => Some(args.record_limit(&t.client)?),
        None => None,
    };
    for case in &mut cases {
        case.tls = client.clone();
    }
    let mut suite_noted = false;
    let mut documents = Vec::new();
    let mut failures = 0;
    for case in &cases {
        let mut results: Vec<ServerResult> = kinds
            .iter()
            .map(|k| ServerResult {
                name: k.name().into(),
                samples: Vec::new(),
                merged: Histogram::new_with_bounds(1, 120_000_000_000, 3).expect("static bounds"),
                failure: None,
            })
            .collect();
        for rep in 0..reps {
            // Each repetition starts one server later, so no server always runs first (on a
            // cold cache) or right after the same neighbour.
            for i in (0..kinds.len()).map(|i| (i + rep) % kinds.len()) {
                let (kind, result) = (&kinds[i], &mut results[i]);
                if result.failure.is_some() {
                    continue;
                }
                let mut p = case.clone();
                p.label = format!("{} rep {}/{reps}", kind.name(), rep + 1);
                // A failing server is reported and dropped from the case; the others still run,
                // and the whole command exits non-zero at the end.
                match run_one(kind, core, &mut p, tls.as_ref()) {
                    Ok(outcome) => {
                        if let Some(suite) = outcome.tls_suite.as_ref().filter(|_| !suite_noted) {
                            generator::progress_done();
                            eprintln!("note: TLS {suite}");
                            suite_noted = true;
                        }
                        result.samples.push(Sample::from_outcome(&p, &outcome));
                        let _ = result.merged.add(&outcome.latency);
                    }
                    Err(e) if sys::interrupted() => return Err(e),
                    Err(e) => {
                        generator::progress_done();
                        eprintln!("FAILED: {} ({}): {e}", kind.name(), p.label);
                        result.failure = Some(e);
                    }
                }
            }
        }
        failures += results.iter().filter(|r| r.failure.is_some()).count();
        documents.push(emit(args, case, &results, reps)?);
    }
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&documents).map_err(|e| e.to_string())?
        );
    }
    match failures {
        0 => Ok(()),
        n => Err(format!("{n} server run(s) failed (see FAILED lines above)")),
    }
}

/// Starts `kind` pinned to `core` (serving wss:// with `tls`'s files if given), runs the case
/// `p` against it, and stops it.
fn run_one(
    kind: &Kind,
    core: usize,
    p: &mut Params,
    tls: Option<&tls::TlsFiles>,
) -> Result<generator::Outcome, String> {
    let addr = servers::free_addr()?;
    let extra = tls.map_or(Vec::new(), |t| t.args(matches!(kind, Kind::Ringsock(_))));
    let ready = Duration::from_secs(10);
    let server = ServerProc::start_with(kind, addr, Some(core), &[], &extra, None, ready)?;
    p.addr = addr;
    p.server_pid = Some(server.pid());
    let outcome = generator::run_threads(p);
    drop(server);
    outcome
}

fn bench_cmd(args: &Args) -> Result<(), String> {
    prepare(args)?;
    let addr: SocketAddr = args
        .get("addr")
        .ok_or("bench needs --addr HOST:PORT")?
        .parse()
        .map_err(|e| format!("--addr: {e}"))?;
    if !addr.ip().is_loopback() {
        return Err("only loopback addresses are allowed".into());
    }
    let pid = match args.get("pid") {
        Some(v) => Some(v.parse::<u32>().map_err(|e| format!("--pid: {e}"))?),
        None => None,
    };
    let tls = match args.tls {
        true => Some(args.record_limit(&bench_tls(args)?)?),
        false => None,
    };
    let mut documents = Vec::new();
    for mut p in args.cases(addr)? {
        p.server_pid = pid;
        p.tls = tls.clone();
        p.label = "server".into();
        let outcome = generator::run_threads(&p)?;
        let mut merged = Histogram::new_with_bounds(1, 120_000_000_000, 3).expect("static bounds");
        let _ = merged.add(&outcome.latency);
        let result = ServerResult {
            name: args.get("name").unwrap_or("server").into(),
            samples: vec![Sample::from_outcome(&p, &outcome)],
            merged,
            failure: None,
        };
        documents.push(emit(args, &p, &[result], 1)?);
    }
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&documents).map_err(|e| e.to_string())?
        );
    }
    Ok(())
}

/// `bench --tls`: a client configuration trusting `--cert FILE`, or `<out>/tls/cert.pem`; when
/// neither exists, makes that certificate (with its key) and asks for the server to be
/// started with it.
fn bench_tls(args: &Args) -> Result<Arc<rustls::ClientConfig>, String> {
    let dir = args.out_dir().join("tls");
    let cert = match args.get("cert") {
        Some(c) => PathBuf::from(c),
        None => dir.join("cert.pem"),
    };
    if args.get("cert").is_none() && !cert.exists() {
        let made = tls::TlsFiles::generate(&dir)?;
        return Err(format!(
            "made a certificate: start the server with --tls {} {} and run bench again",
            made.cert.display(),
            made.key.display()
        ));
    }
    tls::trusting(&cert)
}

/// Prints the table (stdout, or stderr under `--json`) and writes the case's JSON and SVG.
fn emit(
    args: &Args,
    p: &Params,
    results: &[ServerResult],
    reps: usize,
) -> Result<serde_json::Value, String> {
    let svg = (p.scenario != Scenario::Connections).then(|| {
        let title = format!("{} - latency by percentile", report::case_title(p));
        let lines = results
            .iter()
            .map(|r| (r.name.as_str(), &r.merged))
            .collect();
        (title, lines)
    });
    write_case(
        args,
        &report::table(p, results, reps),
        report::case_json(p, results, reps),
        &report::case_slug(p),
        svg,
    )
}

/// One latency histogram per server, named, for an SVG.
pub(crate) type LatencyLines<'a> = Vec<(&'a str, &'a Histogram<u64>)>;

/// Prints a case's table (stdout, or stderr under `--json`), writes its JSON and, given a
/// title and one latency histogram per server, its SVG to `<out>/<unix time>-<slug>`, and
/// returns the JSON.
pub(crate) fn write_case(
    args: &Args,
    table: &str,
    doc: serde_json::Value,
    slug: &str,
    svg: Option<(String, LatencyLines<'_>)>,
) -> Result<serde_json::Value, String> {
    if args.json {
        eprint!("{table}");
    } else {
        print!("{table}");
    }
    let dir = args.out_dir();
    fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let base = dir.join(format!("{stamp}-{slug}"));
    let json_text = serde_json::to_string_pretty(&doc).map_err(|e| e.to_string())?;
    fs::write(base.with_extension("json"), json_text).map_err(|e| e.to_string())?;
    if let Some((title, lines)) = svg {
        fs::write(base.with_extension("svg"), report::svg(&title, &lines))
            .map_err(|e| e.to_string())?;
    }
    eprintln!("results: {}.{{json,svg}}", base.display());
    Ok(doc)
}

/// Instructions per echoed message: each server runs under cachegrind twice, for N and 2N
/// echoes; the difference over N cancels start-up, handshake and shutdown.
fn instr_cmd(args: &Args) -> Result<(), String> {
    if args.tls {
        return Err("instr runs ws:// only; --tls is for compare and bench".into());
    }
    prepare(args)?;
    let kinds = args.servers()?;
    let n = args.num("messages", 20_000)?.max(1);
    let core = args.num("server-core", 0)? as usize;
    let out = args.out_dir();
    fs::create_dir_all(&out).map_err(|e| e.to_string())?;
    for mut case in args.cases(servers::free_addr()?)? {
        instr_case(&kinds, &mut case, n, core, &out)?;
    }
    Ok(())
}

/// One case of `instr`: every server twice under cachegrind, one table.
fn instr_case(
    kinds: &[Kind],
    case: &mut Params,
    n: u64,
    core: usize,
    out: &Path,
) -> Result<(), String> {
    if case.scenario == Scenario::Connections {
        return Err("instr runs a message scenario, not connections".into());
    }
    case.duration = Duration::from_secs(600);
    println!(
        "\n## instructions per echoed message (valgrind cachegrind): {}",
        report::case_title(case)
    );
    println!(
        "{:<18} {:>14} {:>14} {:>12}",
        "server", "Ir (N)", "Ir (2N)", "Ir/msg"
    );
    for kind in kinds {
        let mut counts = Vec::new();
        for count in [n, 2 * n] {
            let file = out.join(format!(
                "cachegrind-{}-{}-{count}.out",
                kind.name(),
                report::case_slug(case)
            ));
            let _ = fs::remove_file(&file);
            let wrapper = vec![
                "valgrind".to_string(),
                "--tool=cachegrind".into(),
                "--cache-sim=no".into(),
                format!("--cachegrind-out-file={}", file.display()),
                format!("--log-file={}", file.with_extension("log").display()),
            ];
            let addr = servers::free_addr()?;
            let mut server =
                ServerProc::start(kind, addr, Some(core), &wrapper, Duration::from_secs(120))?;
            let mut p = case.clone();
            p.addr = addr;
            p.messages = Some(count);
            p.server_pid = Some(server.pid());
            p.label = format!("{} under valgrind, {count} msgs", kind.name());
            generator::run(&p).map_err(|e| format!("{}: {e}", kind.name()))?;
            // Let the server see the close frames before it is stopped.
            std::thread::sleep(Duration::from_millis(500));
            server.stop_poking(Duration::from_secs(60), Some(addr));
            counts.push(read_ir(&file)?);
        }
        let per = (counts[1] as f64 - counts[0] as f64) / n as f64;
        println!(
            "{:<18} {:>14} {:>14} {:>12.0}",
            kind.name(),
            counts[0],
            counts[1],
            per
        );
    }
    Ok(())
}

/// The total instruction count (`summary:` line) of a cachegrind output file.
fn read_ir(file: &Path) -> Result<u64, String> {
    let text = fs::read_to_string(file)
        .map_err(|e| format!("{}: {e} (did valgrind run the server?)", file.display()))?;
    text.lines()
        .find_map(|l| l.strip_prefix("summary:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| format!("{}: no summary line", file.display()))
}

/// `serve PEER --addr ADDR`.
fn serve_cmd(argv: &[String]) -> Result<(), String> {
    let peer = argv
        .first()
        .and_then(|n| Peer::parse(n))
        .ok_or("serve needs a peer name")?;
    let args = Args::parse(&argv[1..])?;
    let addr: SocketAddr = args
        .get("addr")
        .ok_or("serve needs --addr")?
        .parse()
        .map_err(|e| format!("--addr: {e}"))?;
    let tls = match (args.get("cert"), args.get("key")) {
        (Some(cert), Some(key)) => Some(tls::server_config(Path::new(cert), Path::new(key))?),
        _ => None,
    };
    servers::serve(peer, addr, tls)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_size_accepts_binary_suffixes() {
        assert_eq!(parse_size("16"), Some(16));
        assert_eq!(parse_size("64k"), Some(65536));
        assert_eq!(parse_size("64KiB"), Some(65536));
        assert_eq!(parse_size("16M"), Some(16 << 20));
        assert_eq!(parse_size("12x"), None);
    }
}
