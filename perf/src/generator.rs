//! The load generator: one mio (epoll) loop per thread (one thread unless `--threads`), C client
//! connections over loopback.
//!
//! Each connection does a real opening handshake, then keeps up to `inflight` prebuilt masked
//! messages outstanding; every echo is verified byte-exact by [`wire::Reader`]. Writes are
//! batched: completions of one epoll wakeup refill the connection's queue, and each dirty
//! connection is flushed with one `writev` at the end of the wakeup. A mismatch, a protocol
//! violation or a lost connection ends the run with an `Err`; the caller exits non-zero.

use std::collections::VecDeque;
use std::io::{self, Write as _};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use mio::{Events, Interest, Poll, Token};

use crate::wire::{self, Pending, Pool, Reader, Rng};
use crate::{sys, tls};

/// What the generator does once its connections are open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    /// One message in flight per connection; latency of small to medium messages.
    Rtt,
    /// `conns × inflight` messages in flight; messages per second.
    Throughput,
    /// 64 KiB–16 MiB messages, whole or fragmented; bytes per second.
    Big,
    /// One big message written in small `write` calls (chops).
    Chop,
    /// N idle connections; server memory per connection.
    Connections,
    /// N subscribers on one topic, one publisher, one server (see `fanout`).
    Broadcast,
    /// The publisher on node A, N subscribers on node B, a broker between them.
    Crossnode,
}

impl Scenario {
    /// Parses a scenario name as given on the command line.
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "rtt" => Scenario::Rtt,
            "throughput" => Scenario::Throughput,
            "big" => Scenario::Big,
            "chop" => Scenario::Chop,
            "connections" => Scenario::Connections,
            "broadcast" => Scenario::Broadcast,
            "crossnode" => Scenario::Crossnode,
            _ => return None,
        })
    }

    /// The command-line name.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Rtt => "rtt",
            Scenario::Throughput => "throughput",
            Scenario::Big => "big",
            Scenario::Chop => "chop",
            Scenario::Connections => "connections",
            Scenario::Broadcast => "broadcast",
            Scenario::Crossnode => "crossnode",
        }
    }

    /// Whether this is a publish/subscribe scenario (run by `fanout`, not the echo loop).
    pub fn is_fanout(self) -> bool {
        matches!(self, Scenario::Broadcast | Scenario::Crossnode)
    }
}

/// One run's settings.
#[derive(Debug, Clone)]
pub struct Params {
    /// The echo server.
    pub addr: SocketAddr,
    /// What to do.
    pub scenario: Scenario,
    /// Client connections.
    pub conns: usize,
    /// Messages outstanding per connection.
    pub inflight: usize,
    /// Payload bytes per message.
    pub size: usize,
    /// Fragment payload size (0: one frame per message).
    pub fragment: usize,
    /// Bytes per `write` call (0: as much as the socket takes).
    pub chop: usize,
    /// Measured time.
    pub duration: Duration,
    /// Unmeasured time before it.
    pub warmup: Duration,
    /// Stop after this many echoes instead of after `duration` (no warmup).
    pub messages: Option<u64>,
    /// The server's pid, for its CPU time and memory.
    pub server_pid: Option<u32>,
    /// Shown in the progress line.
    pub label: String,
    /// Handshakes in progress at once while opening connections.
    pub open_window: usize,
    /// Busy-poll (`epoll_wait` with timeout 0) instead of sleeping: the server's writes then
    /// never have to wake the generator, at the price of a full core of generator CPU.
    pub spin: bool,
    /// Connections scenario: how long the open connections stay idle before the server's
    /// memory is read.
    pub idle_wait: Duration,
    /// With several generator threads: where they wait for each other between opening their
    /// connections and the load, so their windows line up.
    pub gate: Option<Arc<Gate>>,
    /// No progress line (every generator thread but the first).
    pub quiet: bool,
    /// Generator threads for [`run_threads`].
    pub threads: usize,
    /// Cores the generator threads are pinned to, in turn (empty: where they start).
    pub gen_cores: Vec<usize>,
    /// wss://: every connection speaks TLS with this client configuration.
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

/// Where the threads of one multi-threaded run wait for each other; a thread that fails opens
/// it for the others, who then stop too.
#[derive(Debug)]
pub struct Gate {
    parties: usize,
    arrived: AtomicUsize,
    failed: AtomicBool,
}

impl Gate {
    /// A gate for `parties` threads.
    pub fn new(parties: usize) -> Arc<Gate> {
        Arc::new(Gate {
            parties,
            arrived: AtomicUsize::new(0),
            failed: AtomicBool::new(false),
        })
    }

    /// Arrives and waits for every other party.
    ///
    /// # Errors
    ///
    /// Another party failed, or ctrl-c.
    pub fn pass(&self) -> Result<(), String> {
        self.arrived.fetch_add(1, Ordering::AcqRel);
        while self.arrived.load(Ordering::Acquire) < self.parties {
            if self.failed.load(Ordering::Acquire) {
                return Err(THREAD_FAILED.into());
            }
            if sys::interrupted() {
                return Err("interrupted".into());
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        Ok(())
    }

    /// Marks the run failed: threads waiting in [`Gate::pass`] return an error.
    pub fn fail(&self) {
        self.failed.store(true, Ordering::Release);
    }
}

/// The error of a thread stopped because another one failed.
const THREAD_FAILED: &str = "stopped because another generator thread failed";

/// A run's measurements.
#[derive(Debug)]
pub struct Outcome {
    /// Echoes completed in the measured window.
    pub messages: u64,
    /// Length of the measured window.
    pub seconds: f64,
    /// Send-to-echo latency of each measured message, in ns.
    pub latency: Histogram<u64>,
    /// Server CPU time in the window (all its threads).
    pub server_cpu_ns: Option<u64>,
    /// Time the server's threads waited for a CPU in the window.
    pub server_wait_ns: Option<u64>,
    /// The generator's own CPU time in the window.
    pub generator_cpu_ns: u64,
    /// Time the generator waited for a CPU in the window.
    pub generator_wait_ns: u64,
    /// Server memory before opening the connections and after opening all of them
    /// (connections scenario).
    pub memory: Option<(sys::Memory, sys::Memory)>,
    /// Server memory with half the connections open (connections scenario): the growth from
    /// there to all of them is the marginal memory per connection, without the server's fixed
    /// costs (allocator arenas, buffer pages touched once).
    pub memory_half: Option<sys::Memory>,
    /// Server memory once every connection has echoed one message (connections scenario).
    pub memory_active: Option<sys::Memory>,
    /// Time taken to open and handshake all connections.
    pub connect_seconds: f64,
    /// The TLS version and cipher suite negotiated (wss:// runs).
    pub tls_suite: Option<String>,
}

/// Queue entry standing for the close frame rather than a pool variant.
const CLOSE: usize = usize::MAX;
/// Most iovecs passed to one `writev`.
const MAX_IOV: usize = 64;
/// How long echoes may take to arrive after the window closes.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(20);
/// How long opening all connections may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(120);

/// One client connection.
struct Conn {
    sock: mio::net::TcpStream,
    key: String,
    /// Handshake response bytes while the handshake is in progress; `None` once open.
    handshake: Option<Vec<u8>>,
    reader: Reader,
    pending: VecDeque<Pending>,
    /// (pool variant or [`CLOSE`], bytes of it already written).
    out: VecDeque<(usize, usize)>,
    next_variant: usize,
    dirty: bool,
    /// wss://: the TLS layer between the frames and the socket (boxed: the plain path keeps a
    /// small `Conn`).
    tls: Option<Box<rustls::ClientConnection>>,
}

/// Runs one scenario against the server at `p.addr`.
///
/// # Errors
///
/// Any failure to connect, a failed handshake, a protocol violation, an echo that differs from
/// what was sent, a connection the server drops, or a timeout; also ctrl-c.
pub fn run(p: &Params) -> Result<Outcome, String> {
    let pool = Pool::new(p.size, p.fragment, 0x5EED ^ p.size as u64);
    let mut rng = Rng::new(std::process::id() as u64 ^ 0xC0FFEE);
    let close = wire::close_wire(&mut rng);
    let mut poll = Poll::new().map_err(|e| format!("epoll: {e}"))?;
    let mut events = Events::with_capacity(1024);
    let mut rbuf = vec![0u8; 256 * 1024];
    // Decrypted bytes on their way to the reader (wss:// only).
    let mut plain = if p.tls.is_some() {
        vec![0u8; 64 * 1024]
    } else {
        Vec::new()
    };
    let mut conns: Vec<Conn> = Vec::with_capacity(p.conns);
    let mut dirty: Vec<usize> = Vec::with_capacity(p.conns);
    let host = p.addr.to_string();

    let memory_before = match (p.scenario, p.server_pid) {
        (Scenario::Connections, Some(pid)) => Some(sys::memory(pid).map_err(|e| e.to_string())?),
        _ => None,
    };

    // Phase 1: open the connections, at most `open_window` handshakes at a time so the server's
    // accept queue never overflows (a dropped SYN would cost a 1 s retransmit).
    let start = Instant::now();
    let mut open = 0usize;
    let mut last_progress = start;
    let mut memory_half = None;
    // With half of them open, the connections scenario reads the server's memory once.
    let half = match (p.scenario, p.server_pid) {
        (Scenario::Connections, Some(_)) => p.conns / 2,
        _ => p.conns,
    };
    let mut target = half.max(1).min(p.conns);
    while open < p.conns {
        if open == target && conns.len() == open {
            if let Some(pid) = p.server_pid.filter(|_| target < p.conns) {
                pump_idle(&mut poll, &mut events, p.idle_wait)?;
                memory_half = Some(sys::memory(pid).map_err(|e| e.to_string())?);
            }
            target = p.conns;
        }
        while conns.len() < target && conns.len() - open < p.open_window {
            let token = Token(conns.len());
            conns.push(connect(p, &host, &mut rng, &poll, token)?);
        }
        wait(&mut poll, &mut events, 10)?;
        for ev in events.iter() {
            let i = ev.token().0;
            let conn = &mut conns[i];
            if conn.handshake.is_some() {
                if read_handshake(conn, &mut rbuf, &mut plain)
                    .map_err(|e| format!("connection {i}: {e}"))?
                {
                    open += 1;
                }
            } else if ev.is_readable() {
                return Err(format!("connection {i}: data before any message was sent"));
            }
        }
        if sys::interrupted() {
            return Err("interrupted".into());
        }
        if start.elapsed() > CONNECT_TIMEOUT {
            return Err(format!(
                "only {open} of {} connections open after 120 s",
                p.conns
            ));
        }
        if last_progress.elapsed() >= Duration::from_secs(1) {
            last_progress = Instant::now();
            if !p.quiet {
                progress(&format!("{}: {open}/{} connections open", p.label, p.conns));
            }
        }
    }
    let paused = if memory_half.is_some() {
        p.idle_wait
    } else {
        Duration::ZERO
    };
    let connect_seconds = start.elapsed().saturating_sub(paused).as_secs_f64();
    let tls_suite = conns.first().and_then(|c| {
        let tls = c.tls.as_deref()?;
        let version = tls.protocol_version()?;
        let suite = tls.negotiated_cipher_suite()?;
        Some(format!("{version:?} {:?}", suite.suite()))
    });

    let mut memory = None;
    if let (Some(before), Some(pid)) = (memory_before, p.server_pid) {
        // Let the server finish per-connection setup that follows the handshake, and give
        // back what an idle connection does not need (ringsock's sweep does after 1 s).
        pump_idle(&mut poll, &mut events, p.idle_wait)?;
        let after = sys::memory(pid).map_err(|e| e.to_string())?;
        memory = Some((before, after));
    }

    if let Some(gate) = &p.gate {
        gate.pass()?;
    }

    // Phase 2: load. The connections scenario sends one message per connection afterwards, so
    // every idle connection is shown to be alive.
    let (inflight, warmup, duration, limit) = match p.scenario {
        Scenario::Connections => (
            1,
            Duration::ZERO,
            Duration::from_secs(60),
            Some(p.conns as u64),
        ),
        _ if p.messages.is_some() => (p.inflight, Duration::ZERO, p.duration, p.messages),
        _ => (p.inflight, p.warmup, p.duration, None),
    };
    let mut latency = Histogram::<u64>::new_with_bounds(1, 120_000_000_000, 3)
        .map_err(|e| format!("histogram: {e}"))?;
    let load_start = Instant::now();
    let window_start = load_start + warmup;
    let window_end = window_start + duration;
    let mut measuring = warmup.is_zero();
    let mut cpu0 = cpu_now(p.server_pid);
    let mut cpu1 = None;
    let mut measured_at = load_start;
    let mut stopped_at = None;
    let mut sent = 0u64;
    let mut completed = 0u64;
    let mut measured = 0u64;
    let mut last_count = 0u64;
    let mut last_progress = load_start;
    for (i, conn) in conns.iter_mut().enumerate() {
        conn.dirty = true;
        dirty.push(i);
    }
    loop {
        let now = Instant::now();
        // Refill and flush every connection touched in the last wakeup: one writev each.
        for &i in &dirty {
            let conn = &mut conns[i];
            conn.dirty = false;
            while stopped_at.is_none()
                && conn.pending.len() < inflight
                && limit.is_none_or(|l| sent < l)
            {
                let variant = conn.next_variant;
                conn.next_variant = (variant + 1) % pool.variants();
                conn.pending.push_back(Pending { variant, sent: now });
                conn.out.push_back((variant, 0));
                sent += 1;
            }
            flush(conn, &pool, &close, p.chop).map_err(|e| format!("connection {i}: {e}"))?;
        }
        dirty.clear();

        let timeout = match (p.spin, stopped_at) {
            (true, None) => 0,
            (false, None) => 5,
            (_, Some(_)) => 10,
        };
        wait(&mut poll, &mut events, timeout)?;
        let now = Instant::now();
        if !measuring && now >= window_start {
            measuring = true;
            measured_at = now;
            cpu0 = cpu_now(p.server_pid);
            latency.reset();
            measured = 0;
        }
        for ev in events.iter() {
            let i = ev.token().0;
            let conn = &mut conns[i];
            if ev.is_readable() {
                let fd = conn.sock.as_raw_fd();
                loop {
                    let n = read_fd(fd, &mut rbuf).map_err(|e| format!("connection {i}: {e}"))?;
                    let Some(n) = n else { break };
                    if n == 0 {
                        return Err(format!(
                            "connection {i}: server closed the connection with {} echoes \
                             outstanding",
                            conn.pending.len()
                        ));
                    }
                    let counting = measuring && stopped_at.is_none();
                    let mut on_echo = |done: Pending| {
                        completed += 1;
                        if counting {
                            measured += 1;
                            let ns = now.saturating_duration_since(done.sent).as_nanos();
                            latency.saturating_record(ns.max(1) as u64);
                        }
                    };
                    let (reader, pending) = (&mut conn.reader, &mut conn.pending);
                    let closed = match conn.tls.as_deref_mut() {
                        None => reader
                            .feed(&rbuf[..n], &pool, pending, &mut on_echo)
                            .map(|()| false),
                        Some(tls) => tls::decrypt(tls, &rbuf[..n], &mut plain, |bytes| {
                            reader.feed(bytes, &pool, pending, &mut on_echo)
                        }),
                    }
                    .map_err(|e| format!("connection {i}: {e}"))?;
                    if closed {
                        return Err(format!(
                            "connection {i}: server sent close_notify with {} echoes \
                             outstanding",
                            conn.pending.len()
                        ));
                    }
                    // A short read drained the socket; edge-triggered epoll reports new data.
                    if n < rbuf.len() {
                        break;
                    }
                }
            }
            if !conn.dirty {
                conn.dirty = true;
                dirty.push(i);
            }
        }

        if sys::interrupted() {
            return Err("interrupted".into());
        }
        if p.gate
            .as_ref()
            .is_some_and(|g| g.failed.load(Ordering::Acquire))
        {
            return Err(THREAD_FAILED.into());
        }
        if stopped_at.is_none() {
            let done = match limit {
                Some(l) => completed >= l,
                None => measuring && now >= window_end,
            };
            if done {
                stopped_at = Some(now);
                cpu1 = Some(cpu_now(p.server_pid));
            } else if limit.is_some() && now >= load_start + duration {
                return Err(format!(
                    "only {completed} of {sent} echoes after {duration:?}"
                ));
            }
        }
        if let Some(stop) = stopped_at {
            let outstanding: usize = conns.iter().map(|c| c.pending.len()).sum();
            if outstanding == 0 {
                break;
            }
            if now.duration_since(stop) > DRAIN_TIMEOUT {
                return Err(format!(
                    "{outstanding} echoes still missing 20 s after the run"
                ));
            }
        }
        if !p.quiet && now.duration_since(last_progress) >= Duration::from_secs(1) {
            let rate =
                (completed - last_count) as f64 / now.duration_since(last_progress).as_secs_f64();
            last_progress = now;
            last_count = completed;
            progress(&format!(
                "{}: {:.0} s, {} msg/s{}",
                p.label,
                now.duration_since(load_start).as_secs_f64(),
                si(rate),
                if measuring { "" } else { " (warm-up)" }
            ));
        }
    }
    let memory_active = match (p.scenario, p.server_pid) {
        (Scenario::Connections, Some(pid)) => Some(sys::memory(pid).map_err(|e| e.to_string())?),
        _ => None,
    };
    let stop = stopped_at.unwrap_or(measured_at);
    let seconds = stop.duration_since(measured_at).as_secs_f64();
    let (server, generator) = match (cpu0, cpu1) {
        ((Some(s0), g0), Some((Some(s1), g1))) => (Some((s0, s1)), (g0, g1)),
        ((_, g0), Some((_, g1))) => (None, (g0, g1)),
        _ => (None, Default::default()),
    };
    let generator_cpu_ns = generator.1.run.saturating_sub(generator.0.run);
    let generator_wait_ns = generator.1.wait.saturating_sub(generator.0.wait);
    let server_cpu_ns = server.map(|(a, b)| b.run.saturating_sub(a.run));
    let server_wait_ns = server.map(|(a, b)| b.wait.saturating_sub(a.wait));

    // Phase 3: a clean close (RFC 6455 §7.1.2) on each connection; replies are not awaited.
    for (i, conn) in conns.iter_mut().enumerate() {
        conn.out.push_back((CLOSE, 0));
        flush(conn, &pool, &close, 0).map_err(|e| format!("connection {i} close: {e}"))?;
    }
    progress_done();
    Ok(Outcome {
        messages: if p.scenario == Scenario::Connections {
            completed
        } else {
            measured
        },
        seconds,
        latency,
        server_cpu_ns,
        server_wait_ns,
        generator_cpu_ns,
        generator_wait_ns,
        memory,
        memory_half,
        memory_active,
        connect_seconds,
        tls_suite,
    })
}

/// Runs `p` on `p.threads` generator threads (pinned to `p.gen_cores` in turn, if any), the
/// connections split evenly over them, and merges what they measured: messages and latencies
/// of all threads; window, server and generator CPU time (process-wide) from the first.
///
/// # Errors
///
/// As [`run`], from any thread; the connections scenario and message-count runs (`instr`)
/// are single-threaded only.
pub fn run_threads(p: &Params) -> Result<Outcome, String> {
    let threads = p.threads.clamp(1, p.conns.max(1));
    let cores = &p.gen_cores;
    if threads == 1 {
        return run(p);
    }
    if p.scenario == Scenario::Connections || p.messages.is_some() {
        return Err("--threads applies to rtt, throughput, big and chop".into());
    }
    let gate = Gate::new(threads);
    let results: Vec<Result<Outcome, String>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let mut q = p.clone();
                q.conns = p.conns / threads + usize::from(t < p.conns % threads);
                q.gate = Some(Arc::clone(&gate));
                q.quiet = t > 0;
                let gate = Arc::clone(&gate);
                let core = cores.get(t % cores.len().max(1)).copied();
                scope.spawn(move || {
                    if let Some(core) = core {
                        if let Err(e) = sys::pin_to_core(core) {
                            eprintln!("note: cannot pin generator thread {t} to core {core}: {e}");
                        }
                    }
                    let r = run(&q);
                    if r.is_err() {
                        gate.fail();
                    }
                    r
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("generator thread panicked".into()))
            })
            .collect()
    });
    let mut errors: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    errors.sort_by_key(|e| *e == THREAD_FAILED);
    if let Some(e) = errors.first() {
        return Err((*e).clone());
    }
    let mut outcomes = results.into_iter().flatten();
    let mut first = outcomes.next().ok_or("no generator thread ran")?;
    for o in outcomes {
        first.messages += o.messages;
        let _ = first.latency.add(&o.latency);
        first.connect_seconds = first.connect_seconds.max(o.connect_seconds);
    }
    Ok(first)
}

/// Opens one connection: TCP_NODELAY, the upgrade request written (over TLS: queued behind the
/// ClientHello), then non-blocking in mio.
fn connect(
    p: &Params,
    host: &str,
    rng: &mut Rng,
    poll: &Poll,
    token: Token,
) -> Result<Conn, String> {
    let (sock, key, tls) = match &p.tls {
        None => {
            let (sock, key) = open_socket(p.addr, host, "/", rng, poll, token, Interest::WRITABLE)?;
            (sock, key, None)
        }
        Some(config) => {
            let (sock, key, tls) = open_tls_socket(p.addr, host, config, rng, poll, token)?;
            (sock, key, Some(Box::new(tls)))
        }
    };
    Ok(Conn {
        sock,
        key,
        handshake: Some(Vec::new()),
        reader: Reader::default(),
        pending: VecDeque::new(),
        out: VecDeque::new(),
        next_variant: 0,
        dirty: false,
        tls,
    })
}

/// [`open_socket`] over TLS: the ClientHello is written, the upgrade request waits in rustls
/// until the handshake is done. Registered for reading and writing (the handshake's later
/// flights may find the socket full).
fn open_tls_socket(
    addr: SocketAddr,
    host: &str,
    config: &Arc<rustls::ClientConfig>,
    rng: &mut Rng,
    poll: &Poll,
    token: Token,
) -> Result<(mio::net::TcpStream, String, rustls::ClientConnection), String> {
    let std_sock = std::net::TcpStream::connect(addr)
        .map_err(|e| format!("connect to {addr} (connection {}): {e}", token.0))?;
    std_sock.set_nodelay(true).map_err(|e| e.to_string())?;
    let key = wire::new_key(rng);
    let mut tls = tls::client(config, addr)?;
    tls.writer()
        .write_all(&wire::request(host, "/", &key))
        .map_err(|e| format!("TLS: {e}"))?;
    // The ClientHello always fits in a fresh socket's send buffer.
    tls::write_ciphertext(&mut tls, std_sock.as_raw_fd())
        .map_err(|e| format!("ClientHello write: {e}"))?;
    std_sock.set_nonblocking(true).map_err(|e| e.to_string())?;
    let mut sock = mio::net::TcpStream::from_std(std_sock);
    poll.registry()
        .register(&mut sock, token, Interest::READABLE | Interest::WRITABLE)
        .map_err(|e| format!("epoll_ctl: {e}"))?;
    Ok((sock, key, tls))
}

/// Connects to `addr`, sets TCP_NODELAY, writes the upgrade request for `path`, and registers
/// the socket, non-blocking, for reading (and `extra`) under `token`. Returns the socket and
/// its `Sec-WebSocket-Key`.
pub fn open_socket(
    addr: SocketAddr,
    host: &str,
    path: &str,
    rng: &mut Rng,
    poll: &Poll,
    token: Token,
    extra: Interest,
) -> Result<(mio::net::TcpStream, String), String> {
    let mut std_sock = std::net::TcpStream::connect(addr)
        .map_err(|e| format!("connect to {addr} (connection {}): {e}", token.0))?;
    std_sock.set_nodelay(true).map_err(|e| e.to_string())?;
    let key = wire::new_key(rng);
    // The ~200-byte request always fits in a fresh socket's send buffer.
    std_sock
        .write_all(&wire::request(host, path, &key))
        .map_err(|e| format!("handshake write: {e}"))?;
    std_sock.set_nonblocking(true).map_err(|e| e.to_string())?;
    let mut sock = mio::net::TcpStream::from_std(std_sock);
    poll.registry()
        .register(&mut sock, token, Interest::READABLE | extra)
        .map_err(|e| format!("epoll_ctl: {e}"))?;
    Ok((sock, key))
}

/// Reads handshake response bytes (over TLS: drives the TLS handshake and decrypts them);
/// returns `true` once the response is complete and valid.
fn read_handshake(conn: &mut Conn, rbuf: &mut [u8], plain: &mut [u8]) -> Result<bool, String> {
    let fd = conn.sock.as_raw_fd();
    let Some(buf) = conn.handshake.as_mut() else {
        return Ok(true);
    };
    let done = match conn.tls.as_deref_mut() {
        None => handshake_step(fd, buf, &conn.key, rbuf)?,
        Some(tls) => tls_handshake_step(fd, tls, buf, &conn.key, rbuf, plain)?,
    };
    if done {
        conn.handshake = None;
    }
    Ok(done)
}

/// [`handshake_step`] over TLS: writes what rustls has for the server (its handshake flights,
/// then the upgrade request), reads and decrypts what the server sent.
fn tls_handshake_step(
    fd: i32,
    tls: &mut rustls::ClientConnection,
    buf: &mut Vec<u8>,
    key: &str,
    rbuf: &mut [u8],
    plain: &mut [u8],
) -> Result<bool, String> {
    let write = |tls: &mut rustls::ClientConnection| {
        tls::write_ciphertext(tls, fd).map_err(|e| format!("TLS handshake write: {e}"))
    };
    write(tls)?;
    while let Some(n) = read_fd(fd, rbuf).map_err(|e| format!("handshake read: {e}"))? {
        if n == 0 {
            return Err("server closed the connection during the handshake".into());
        }
        let closed = tls::decrypt(tls, &rbuf[..n], plain, |bytes| {
            buf.extend_from_slice(bytes);
            Ok(())
        })?;
        write(tls)?;
        if closed {
            return Err("server sent close_notify during the handshake".into());
        }
        if let Some(used) = wire::check_response(buf, key)? {
            if used != buf.len() {
                return Err("server sent frames before any message".into());
            }
            return Ok(true);
        }
    }
    Ok(false)
}

/// Reads what the socket `fd` has of the handshake response into `buf`; returns `true` once
/// the response is complete and valid for `key`.
///
/// # Errors
///
/// A read error, the server closing, an invalid response, or frames right behind it (nothing
/// was sent yet that a server could answer).
pub fn handshake_step(
    fd: i32,
    buf: &mut Vec<u8>,
    key: &str,
    rbuf: &mut [u8],
) -> Result<bool, String> {
    while let Some(n) = read_fd(fd, rbuf).map_err(|e| format!("handshake read: {e}"))? {
        if n == 0 {
            return Err("server closed the connection during the handshake".into());
        }
        buf.extend_from_slice(&rbuf[..n]);
        if let Some(used) = wire::check_response(buf, key)? {
            if used != buf.len() {
                return Err("server sent frames before any message".into());
            }
            return Ok(true);
        }
    }
    Ok(false)
}

/// Writes as much of the connection's queue as the socket takes: one `writev` over up to
/// [`MAX_IOV`] queued messages, or with `chop > 0`, repeated writes of at most `chop` bytes.
/// Over TLS the same messages go to [`tls::flush`] (several to a record; `chop` does not apply).
fn flush(conn: &mut Conn, pool: &Pool, close: &[u8], chop: usize) -> io::Result<()> {
    let fd = conn.sock.as_raw_fd();
    let wire_of = |v: usize| if v == CLOSE { close } else { pool.wire(v) };
    if let Some(tls) = conn.tls.as_deref_mut() {
        return flush_tls(tls, fd, &mut conn.out, wire_of);
    }
    while !conn.out.is_empty() {
        let mut iov = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; MAX_IOV];
        let mut count = 0;
        let mut total = 0;
        for &(v, off) in conn.out.iter().take(MAX_IOV) {
            let mut bytes = &wire_of(v)[off..];
            if chop > 0 {
                bytes = &bytes[..bytes.len().min(chop - total)];
            }
            iov[count] = libc::iovec {
                iov_base: bytes.as_ptr() as *mut libc::c_void,
                iov_len: bytes.len(),
            };
            count += 1;
            total += bytes.len();
            if chop > 0 && total == chop {
                break;
            }
        }
        // SAFETY: each iovec points into a pool wire or the close frame, which outlive the call
        // and are only read by writev; `count <= MAX_IOV`.
        let rc = unsafe { libc::writev(fd, iov.as_ptr(), count as libc::c_int) };
        if rc < 0 {
            let err = io::Error::last_os_error();
            match err.kind() {
                io::ErrorKind::WouldBlock => return Ok(()),
                io::ErrorKind::Interrupted => continue,
                _ => return Err(err),
            }
        }
        advance(&mut conn.out, rc as usize, wire_of);
        if (rc as usize) < total {
            // The socket buffer is full; the next writable edge resumes.
            return Ok(());
        }
    }
    Ok(())
}

/// [`flush`] over TLS: up to [`MAX_IOV`] queued messages at a time to [`tls::flush`], until
/// the queue is empty or the socket full.
fn flush_tls<'a>(
    tls: &mut rustls::ClientConnection,
    fd: i32,
    out: &mut VecDeque<(usize, usize)>,
    wire_of: impl Fn(usize) -> &'a [u8] + Copy,
) -> io::Result<()> {
    loop {
        let mut iov = [io::IoSlice::new(&[]); MAX_IOV];
        let mut count = 0;
        let mut total = 0;
        for &(v, off) in out.iter().take(MAX_IOV) {
            iov[count] = io::IoSlice::new(&wire_of(v)[off..]);
            total += iov[count].len();
            count += 1;
        }
        let taken = tls::flush(tls, fd, &iov[..count])?;
        advance(out, taken, wire_of);
        if taken < total || out.is_empty() {
            // Done, or the socket is full: its writable edge resumes.
            return Ok(());
        }
    }
}

/// Drops `n` written bytes from the front of the queue.
fn advance<'a>(
    out: &mut VecDeque<(usize, usize)>,
    mut n: usize,
    wire_of: impl Fn(usize) -> &'a [u8],
) {
    while n > 0 {
        let Some(front) = out.front_mut() else {
            break;
        };
        let rest = wire_of(front.0).len() - front.1;
        if n >= rest {
            n -= rest;
            out.pop_front();
        } else {
            front.1 += n;
            n = 0;
        }
    }
}

/// One `read`; `Ok(None)` when the socket has no data (EAGAIN).
pub fn read_fd(fd: i32, buf: &mut [u8]) -> io::Result<Option<usize>> {
    loop {
        // SAFETY: `buf` is valid and writable for `buf.len()` bytes for the duration of the call.
        let rc = unsafe { libc::read(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len()) };
        if rc >= 0 {
            return Ok(Some(rc as usize));
        }
        let err = io::Error::last_os_error();
        match err.kind() {
            io::ErrorKind::WouldBlock => return Ok(None),
            io::ErrorKind::Interrupted => continue,
            _ => return Err(err),
        }
    }
}

/// `epoll_wait` for up to `ms`; a signal (EINTR) counts as a wakeup with no events, so the
/// caller's loop sees the interrupted flag.
pub fn wait(poll: &mut Poll, events: &mut Events, ms: u64) -> Result<(), String> {
    match poll.poll(events, Some(Duration::from_millis(ms))) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::Interrupted => {
            events.clear();
            Ok(())
        }
        Err(e) => Err(format!("epoll_wait: {e}")),
    }
}

/// Keeps the loop alive (for `d`) while waiting, failing on any unexpected server data.
fn pump_idle(poll: &mut Poll, events: &mut Events, d: Duration) -> Result<(), String> {
    let end = Instant::now() + d;
    while Instant::now() < end {
        wait(poll, events, 50)?;
        if events.iter().any(|e| e.is_readable()) {
            return Err("server sent data on an idle connection".into());
        }
        if sys::interrupted() {
            return Err("interrupted".into());
        }
    }
    Ok(())
}

/// (server, generator) scheduler times now. The generator is this single-threaded process.
fn cpu_now(pid: Option<u32>) -> (Option<sys::Sched>, sys::Sched) {
    (
        pid.and_then(|p| sys::process_sched(p).ok()),
        sys::process_sched(std::process::id()).unwrap_or_default(),
    )
}

/// Rewrites the progress line on stderr.
pub fn progress(text: &str) {
    let mut err = io::stderr().lock();
    let _ = write!(err, "\r{text}\x1b[K");
    let _ = err.flush();
}

/// Clears the progress line.
pub fn progress_done() {
    let _ = write!(io::stderr().lock(), "\r\x1b[K");
}

/// `1234567.0` as `1.23M`.
pub fn si(v: f64) -> String {
    if v >= 1e9 {
        format!("{:.2}G", v / 1e9)
    } else if v >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.1}k", v / 1e3)
    } else {
        format!("{v:.0}")
    }
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    use super::*;

    /// A minimal blocking echo server, a thread per connection: answers the handshake, then echoes
    /// each client frame unmasked, XOR-ing payload byte `corrupt_at` of message `corrupt_msg`
    /// with 1 (when set). Frames are echoed one by one, so fragmented messages stay fragmented.
    fn raw_echo(corrupt: Option<(usize, usize)>) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for sock in listener.incoming() {
                let Ok(sock) = sock else { return };
                std::thread::spawn(move || echo_one(sock, corrupt));
            }
        });
        addr
    }

    /// [`raw_echo`] over TLS: each accepted socket in rustls' blocking `StreamOwned`.
    fn raw_echo_tls(
        config: Arc<rustls::ServerConfig>,
        corrupt: Option<(usize, usize)>,
    ) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for sock in listener.incoming() {
                let Ok(sock) = sock else { return };
                let conn = rustls::ServerConnection::new(Arc::clone(&config)).unwrap();
                let stream = rustls::StreamOwned::new(conn, sock);
                std::thread::spawn(move || echo_one(stream, corrupt));
            }
        });
        addr
    }

    /// The echo side of [`raw_echo`] for one accepted connection.
    fn echo_one(mut sock: impl io::Read + io::Write, corrupt: Option<(usize, usize)>) {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let key = loop {
            let n = sock.read(&mut chunk).unwrap();
            buf.extend_from_slice(&chunk[..n]);
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_string();
                buf.drain(..end + 4);
                let line = head
                    .lines()
                    .find(|l| l.to_ascii_lowercase().starts_with("sec-websocket-key:"))
                    .unwrap()
                    .to_string();
                break line.split(':').nth(1).unwrap().trim().to_string();
            }
        };
        let reply = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {}\r\n\r\n",
            wire::accept_for(&key)
        );
        sock.write_all(reply.as_bytes()).unwrap();
        let mut message = 0;
        loop {
            // Parse one complete client frame from `buf`, reading more as needed.
            let frame = loop {
                if buf.len() >= 2 {
                    let (ext, len) = match buf[1] & 0x7F {
                        126 if buf.len() >= 4 => (2, u16::from_be_bytes([buf[2], buf[3]]) as usize),
                        127 if buf.len() >= 10 => (
                            8,
                            u64::from_be_bytes(buf[2..10].try_into().unwrap()) as usize,
                        ),
                        126 | 127 => (usize::MAX, 0),
                        n => (0, n as usize),
                    };
                    if ext != usize::MAX && buf.len() >= 2 + ext + 4 + len {
                        let mask: [u8; 4] = buf[2 + ext..6 + ext].try_into().unwrap();
                        let mut payload: Vec<u8> = buf[6 + ext..6 + ext + len]
                            .iter()
                            .enumerate()
                            .map(|(i, b)| b ^ mask[i & 3])
                            .collect();
                        let b0 = buf[0];
                        buf.drain(..6 + ext + len);
                        if let Some((msg, at)) = corrupt {
                            if msg == message && at < payload.len() {
                                payload[at] ^= 1;
                            }
                        }
                        break (b0, payload);
                    }
                }
                match sock.read(&mut chunk) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            };
            let (b0, payload) = frame;
            if b0 & 0x0F == 0x8 {
                return;
            }
            if b0 & 0x80 != 0 {
                message += 1;
            }
            let out = crate::wire::server_frame(b0 & 0x80 != 0, b0 & 0x0F, &payload);
            if sock.write_all(&out).is_err() {
                return;
            }
        }
    }

    fn params(addr: SocketAddr, size: usize, fragment: usize, messages: u64) -> Params {
        Params {
            addr,
            scenario: Scenario::Throughput,
            conns: 1,
            inflight: 4,
            size,
            fragment,
            chop: 0,
            duration: Duration::from_secs(20),
            warmup: Duration::ZERO,
            messages: Some(messages),
            server_pid: None,
            label: "test".into(),
            open_window: 1,
            spin: false,
            idle_wait: Duration::from_millis(500),
            gate: None,
            quiet: false,
            threads: 1,
            gen_cores: Vec::new(),
            tls: None,
        }
    }

    #[test]
    fn run_completes_against_a_correct_echo_including_fragments() {
        let outcome = run(&params(raw_echo(None), 300, 0, 50)).unwrap();
        assert_eq!(outcome.messages, 50);
        assert_eq!(outcome.latency.len(), 50);
        let outcome = run(&params(raw_echo(None), 1000, 128, 20)).unwrap();
        assert_eq!(outcome.messages, 20);
    }

    #[test]
    fn run_fails_when_one_echoed_byte_differs() {
        let err = run(&params(raw_echo(Some((7, 200))), 300, 0, 50)).unwrap_err();
        assert!(err.contains("mismatch at byte 200"), "{err}");
    }

    #[test]
    fn threads_split_the_connections_and_merge_their_counts() {
        let mut p = params(raw_echo(None), 100, 0, 0);
        p.messages = None;
        p.conns = 5;
        p.threads = 2;
        p.duration = Duration::from_millis(300);
        let outcome = run_threads(&p).unwrap();
        assert!(outcome.messages > 0);
        assert_eq!(outcome.latency.len(), outcome.messages);
        p.messages = Some(10);
        assert!(run_threads(&p).unwrap_err().contains("--threads"));
    }

    #[test]
    fn a_failure_in_one_thread_fails_the_threaded_run_with_its_own_error() {
        let mut p = params(raw_echo(Some((3, 10))), 100, 0, 0);
        p.messages = None;
        p.conns = 3;
        p.threads = 3;
        p.duration = Duration::from_secs(5);
        let err = run_threads(&p).unwrap_err();
        assert!(err.contains("mismatch at byte 10"), "{err}");
    }

    #[test]
    fn run_completes_over_tls_and_fails_when_one_decrypted_byte_differs() {
        let dir = std::env::temp_dir().join(format!("ringsock-perf-tls-{}", std::process::id()));
        let files = tls::TlsFiles::generate(&dir).unwrap();
        let server = tls::server_config(&files.cert, &files.key).unwrap();
        let over_tls = |addr, size, fragment, messages| {
            let mut p = params(addr, size, fragment, messages);
            p.tls = Some(Arc::clone(&files.client));
            p
        };
        let addr = raw_echo_tls(Arc::clone(&server), None);
        assert_eq!(run(&over_tls(addr, 300, 0, 50)).unwrap().messages, 50);
        // Messages of several records each, in fragments: records cut by reads on both sides.
        let outcome = run(&over_tls(addr, 100_000, 3000, 12)).unwrap();
        assert_eq!(outcome.messages, 12);
        assert_eq!(
            outcome.tls_suite.as_deref(),
            Some("TLSv1_3 TLS13_AES_256_GCM_SHA384")
        );
        let addr = raw_echo_tls(server, Some((5, 70_000)));
        let err = run(&over_tls(addr, 100_000, 0, 12)).unwrap_err();
        assert!(err.contains("mismatch at byte 70000"), "{err}");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn run_fails_when_written_in_chops_and_corrupted() {
        let mut p = params(raw_echo(Some((0, 4000))), 8192, 0, 3);
        p.chop = 64;
        let err = run(&p).unwrap_err();
        assert!(err.contains("mismatch at byte 4000"), "{err}");
    }
}
