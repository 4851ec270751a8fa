//! `compare` and `bench` for the fan-out scenarios: `broadcast` (ringsock's `examples/fanout`
//! against the tokio-tungstenite broadcast peer) and `crossnode` (two `examples/fanout` nodes on
//! a redis-server or nats-server that this command starts and stops).

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use hdrhistogram::Histogram;

use crate::fanout::{self, FanOutcome, FanParams, DRAIN_TIMEOUT};
use crate::fanreport::{self, FanResult, FanSample};
use crate::generator::{self, Scenario};
use crate::servers::{self, Kind, Peer, ServerProc};
use crate::{sys, Args};

/// What one fan-out comparison runs: servers (broadcast) or broker engines (crossnode).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    /// One server, publisher and subscribers on it.
    Server(Kind),
    /// Two ringsock nodes (`examples/fanout` at this path) on a broker.
    Nodes(Engine, PathBuf),
    /// ringsock (`examples/fanout` at this path) with a publish linger of this many
    /// microseconds (`--linger`).
    Lingering(PathBuf, u64),
}

impl Target {
    fn name(&self) -> String {
        match self {
            Target::Server(kind) => kind.name().into(),
            Target::Nodes(engine, _) => engine.name().into(),
            Target::Lingering(_, us) => format!("ringsock-linger-{us}us"),
        }
    }
}

/// The brokers `crossnode` can start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Engine {
    Redis,
    Nats,
}

impl Engine {
    fn parse(name: &str) -> Option<Engine> {
        match name {
            "redis" => Some(Engine::Redis),
            "nats" => Some(Engine::Nats),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Engine::Redis => "redis",
            Engine::Nats => "nats",
        }
    }
}

/// The cases (one per subscriber count × size) that the options describe.
pub fn cases(args: &Args, scenario: Scenario) -> Result<Vec<FanParams>, String> {
    let (conns, size, rate) = match scenario {
        Scenario::Crossnode => (100, 64, 10_000.0),
        _ => (1000, 1024, 0.0),
    };
    let rate = match args.get("rate") {
        Some(v) => v
            .parse::<f64>()
            .ok()
            .filter(|r| r.is_finite() && *r >= 0.0)
            .ok_or_else(|| format!("--rate: not a rate: {v:?}"))?,
        None => rate,
    };
    let inflight = args.num("inflight", 8)? as usize;
    let threads = args.num("threads", 1)?.max(1) as usize;
    let gen_cores = args
        .list("gen-core", 1)?
        .into_iter()
        .map(|c| c as usize)
        .collect::<Vec<_>>();
    if rate == 0.0 && inflight == 0 {
        return Err("closed loop needs --inflight of at least 1".into());
    }
    let addr: SocketAddr = "127.0.0.1:9".parse().map_err(|e| format!("{e}"))?;
    let mut cases = Vec::new();
    for &subscribers in &args.list("conns", conns)? {
        for &size in &args.list("size", size)? {
            if subscribers == 0 {
                return Err("--conns must be at least 1".into());
            }
            if size > 16 << 20 {
                return Err("fan-out sizes above 16 MiB are not supported".into());
            }
            cases.push(FanParams {
                scenario,
                sub_addr: addr,
                pub_addr: addr,
                subscribers: subscribers as usize,
                inflight,
                rate,
                size: size as usize,
                duration: args.secs("duration", 5.0)?,
                warmup: args.secs("warmup", 1.0)?,
                threads,
                gen_cores: gen_cores.clone(),
                watch: Vec::new(),
                softirq: None,
                label: String::new(),
                open_window: 128,
                publications: None,
                drain_timeout: DRAIN_TIMEOUT,
            });
        }
    }
    Ok(cases)
}

/// The ringsock fan-out node: `--ringsock-bin`, or `target/release/examples/fanout`.
fn fanout_bin(args: &Args) -> PathBuf {
    args.get("ringsock-bin")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/examples/fanout")
        })
}

/// The publish lingers ringsock runs with (`--linger`, microseconds; 0, the default, is
/// ringsock as it ships), one row each.
fn lingers(args: &Args) -> Result<Vec<u64>, String> {
    args.get("linger")
        .unwrap_or("0")
        .split(',')
        .map(|v| {
            v.trim()
                .parse()
                .map_err(|_| format!("--linger: not microseconds: {v:?}"))
        })
        .collect()
}

/// The targets of the comparison, from `--servers` (broadcast) or `--brokers` (crossnode).
fn targets(args: &Args, scenario: Scenario) -> Result<Vec<Target>, String> {
    let bin = fanout_bin(args);
    let mut out = Vec::new();
    if scenario == Scenario::Crossnode {
        if !bin.exists() {
            return Err(format!(
                "{} missing: cargo build --release --example fanout --features redis,nats",
                bin.display()
            ));
        }
        for name in args.get("brokers").unwrap_or("redis,nats").split(',') {
            let engine = Engine::parse(name).ok_or_else(|| format!("unknown broker {name:?}"))?;
            out.push(Target::Nodes(engine, bin.clone()));
        }
        return Ok(out);
    }
    let names = args
        .get("servers")
        .unwrap_or("ringsock,tokio-tungstenite-fanout");
    for name in names.split(',') {
        if name == "ringsock" {
            if bin.exists() {
                for us in lingers(args)? {
                    out.push(match us {
                        0 => Target::Server(Kind::Ringsock(bin.clone())),
                        us => Target::Lingering(bin.clone(), us),
                    });
                }
            } else {
                eprintln!(
                    "note: {} missing (cargo build --release --example fanout); ringsock \
                     skipped, no ratios",
                    bin.display()
                );
            }
            continue;
        }
        match Peer::parse(name) {
            Some(peer) if peer.is_fanout() => out.push(Target::Server(Kind::Peer(peer))),
            Some(_) => {
                return Err(format!(
                    "{name} is an echo server; {} compares ringsock with \
                     tokio-tungstenite-fanout",
                    scenario.name()
                ))
            }
            None => return Err(format!("unknown server {name:?}")),
        }
    }
    Ok(out)
}

/// `compare --scenario broadcast|crossnode`.
pub fn compare(args: &Args, scenario: Scenario) -> Result<(), String> {
    let targets = targets(args, scenario)?;
    let reps = args.num("reps", 3)?.max(1) as usize;
    let core = args.num("server-core", 0)? as usize;
    let broker_core = args.num("broker-core", core as u64)? as usize;
    let node_a_core = args.num("node-a-core", core as u64)? as usize;
    let mut documents = Vec::new();
    let mut failures = 0;
    for case in cases(args, scenario)? {
        let mut results: Vec<FanResult> = targets
            .iter()
            .map(|t| FanResult {
                name: t.name(),
                samples: Vec::new(),
                merged: Histogram::new_with_bounds(1, 120_000_000_000, 3).expect("static bounds"),
                failure: None,
            })
            .collect();
        for rep in 0..reps {
            // Round robin, each repetition starting one target later (as the echo compare).
            for i in (0..targets.len()).map(|i| (i + rep) % targets.len()) {
                let (target, result) = (&targets[i], &mut results[i]);
                if result.failure.is_some() {
                    continue;
                }
                let mut p = case.clone();
                p.label = format!("{} rep {}/{reps}", target.name(), rep + 1);
                let cores = Cores {
                    server: core,
                    node_a: node_a_core,
                    broker: broker_core,
                };
                match run_one(args, target, cores, &mut p) {
                    Ok(outcome) => {
                        result.samples.push(FanSample::from_outcome(&outcome));
                        let _ = result.merged.add(&outcome.latency);
                    }
                    Err(e) if sys::interrupted() => return Err(e),
                    Err(e) => {
                        generator::progress_done();
                        eprintln!("FAILED: {} ({}): {e}", target.name(), p.label);
                        result.failure = Some(e);
                    }
                }
            }
        }
        failures += results.iter().filter(|r| r.failure.is_some()).count();
        documents.push(emit(args, &case, &results, reps)?);
    }
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&documents).map_err(|e| e.to_string())?
        );
    }
    match failures {
        0 => Ok(()),
        n => Err(format!("{n} run(s) failed (see FAILED lines above)")),
    }
}

/// Where the processes of one run are pinned.
#[derive(Debug, Clone, Copy)]
struct Cores {
    /// The server (broadcast) or node B (crossnode), and the ksoftirqd whose time is counted.
    server: usize,
    node_a: usize,
    broker: usize,
}

/// Starts what `target` needs, runs the case, and stops every process it started (by the
/// guards' `Drop`, on every path).
fn run_one(
    args: &Args,
    target: &Target,
    cores: Cores,
    p: &mut FanParams,
) -> Result<FanOutcome, String> {
    p.softirq = sys::ksoftirqd_pid(cores.server);
    // One server, with the arguments its target adds.
    let (kind, extra) = match target {
        Target::Server(kind) => (kind.clone(), Vec::new()),
        Target::Lingering(bin, us) => (
            Kind::Ringsock(bin.clone()),
            vec!["--publish-linger-us".to_owned(), us.to_string()],
        ),
        Target::Nodes(engine, bin) => return run_nodes(args, *engine, bin, cores, p),
    };
    let addr = servers::free_addr()?;
    let server =
        ServerProc::start_with(&kind, addr, Some(cores.server), &[], &extra, None, secs(10))?;
    p.sub_addr = addr;
    p.pub_addr = addr;
    p.watch = vec![("server".into(), server.pid())];
    let outcome = fanout::run(p);
    drop(server);
    outcome
}

/// [`run_one`] for two ringsock nodes (`examples/fanout` at `bin`) on a broker it starts.
fn run_nodes(
    args: &Args,
    engine: Engine,
    bin: &Path,
    cores: Cores,
    p: &mut FanParams,
) -> Result<FanOutcome, String> {
    let (broker, url) = start_broker(args, engine, cores.broker)?;
    let flag = format!("--{}", engine.name());
    let extra = [flag, url];
    let kind = Kind::Ringsock(bin.to_path_buf());
    let (a_addr, b_addr) = (servers::free_addr()?, servers::free_addr()?);
    // The nodes' own lines (broker link up or down) go to a log, not between tables.
    let log = args.out_dir().join(format!("nodes-{}.log", engine.name()));
    let start = |addr, core| {
        ServerProc::start_with(&kind, addr, Some(core), &[], &extra, Some(&log), secs(10))
    };
    let node_a = start(a_addr, cores.node_a).map_err(|e| format!("node A: {e}"))?;
    let node_b = start(b_addr, cores.server).map_err(|e| format!("node B: {e}"))?;
    p.sub_addr = b_addr;
    p.pub_addr = a_addr;
    p.watch = vec![
        ("node B".into(), node_b.pid()),
        ("node A".into(), node_a.pid()),
        ("broker".into(), broker.pid()),
    ];
    let outcome = fanout::run(p);
    drop(node_b);
    drop(node_a);
    drop(broker);
    outcome
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// Starts redis-server or nats-server on a free loopback port, pinned to `core`, logging to
/// `<out>/broker-<engine>.log`; returns its guard and URL.
fn start_broker(args: &Args, engine: Engine, core: usize) -> Result<(ServerProc, String), String> {
    let addr = servers::free_addr()?;
    let port = addr.port().to_string();
    let (bin, url, argv): (&str, String, Vec<&str>) = match engine {
        Engine::Redis => (
            args.get("redis-server").unwrap_or("redis-server"),
            format!("redis://{addr}"),
            // No persistence: nothing is written to disk, and a stop is immediate.
            vec![
                "--port",
                &port,
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "no",
                "--loglevel",
                "warning",
            ],
        ),
        Engine::Nats => (
            args.get("nats-server").unwrap_or("nats-server"),
            format!("nats://{addr}"),
            vec!["-a", "127.0.0.1", "-p", &port],
        ),
    };
    let dir = args.out_dir();
    fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let log_path = dir.join(format!("broker-{}.log", engine.name()));
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| format!("{}: {e}", log_path.display()))?;
    let out = log.try_clone().map_err(|e| e.to_string())?;
    let mut cmd = Command::new(bin);
    cmd.args(&argv);
    let output = (Stdio::from(out), Stdio::from(log));
    let proc = ServerProc::spawn(engine.name(), cmd, addr, Some(core), output, secs(10))
        .map_err(|e| format!("{e} (log: {})", log_path.display()))?;
    Ok((proc, url))
}

/// `bench --scenario broadcast|crossnode --addr SUBSCRIBERS [--pub-addr PUBLISHER] [--pid P]`.
pub fn bench(args: &Args, scenario: Scenario) -> Result<(), String> {
    let loopback = |key: &str| -> Result<Option<SocketAddr>, String> {
        let Some(v) = args.get(key) else {
            return Ok(None);
        };
        let addr: SocketAddr = v.parse().map_err(|e| format!("--{key}: {e}"))?;
        if !addr.ip().is_loopback() {
            return Err("only loopback addresses are allowed".into());
        }
        Ok(Some(addr))
    };
    let sub_addr = loopback("addr")?.ok_or("bench needs --addr HOST:PORT")?;
    let pub_addr = loopback("pub-addr")?.unwrap_or(sub_addr);
    let pid = match args.get("pid") {
        Some(v) => Some(v.parse::<u32>().map_err(|e| format!("--pid: {e}"))?),
        None => None,
    };
    let core = args.num("server-core", 0)? as usize;
    let name = args.get("name").unwrap_or("server");
    let mut documents = Vec::new();
    for mut p in cases(args, scenario)? {
        p.sub_addr = sub_addr;
        p.pub_addr = pub_addr;
        p.label = name.into();
        if let Some(pid) = pid {
            p.watch = vec![("server".into(), pid)];
            p.softirq = sys::ksoftirqd_pid(core);
        }
        let outcome = fanout::run(&p)?;
        let mut merged = Histogram::new_with_bounds(1, 120_000_000_000, 3).expect("static bounds");
        let _ = merged.add(&outcome.latency);
        let result = FanResult {
            name: name.into(),
            samples: vec![FanSample::from_outcome(&outcome)],
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

/// Prints the table (stdout, or stderr under `--json`) and writes the case's JSON and SVG.
fn emit(
    args: &Args,
    p: &FanParams,
    results: &[FanResult],
    reps: usize,
) -> Result<serde_json::Value, String> {
    let title = format!(
        "{} - publish-to-deliver latency by percentile",
        fanreport::title(p)
    );
    let lines = results
        .iter()
        .map(|r| (r.name.as_str(), &r.merged))
        .collect();
    crate::write_case(
        args,
        &fanreport::table(p, results, reps),
        fanreport::case_json(p, results, reps),
        &fanreport::slug(p),
        Some((title, lines)),
    )
}
