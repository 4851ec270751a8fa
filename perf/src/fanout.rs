//! The publish/subscribe load: N subscriber connections on one topic, one publisher connection,
//! every delivery verified in order per subscriber ([`FanReader`]).
//!
//! `broadcast` runs publisher and subscribers against one server; `crossnode` connects the
//! publisher to node A and the subscribers to node B (the caller passes both addresses).
//!
//! Two modes:
//! - **closed loop** (`rate == 0`): at most `inflight` publications outstanding, a publication
//!   being done once every subscriber got it (or, having got a later one, provably never will);
//! - **fixed rate** (`rate > 0`): publications per second on a schedule, written in batches at
//!   each wakeup (at least every millisecond). When the server stops reading the publisher, the
//!   publisher stays at most 10 ms of schedule behind and gives up the rest, so the achieved
//!   publication rate shows it.
//!
//! Latency is from the stamp in the payload (taken just before the publication is written) to
//! the wakeup that reads the delivery's last byte. Deliveries, latencies and losses count in
//! the measured window by receive time; the window opens after the warm-up once every
//! subscriber has received something (a broker subscribes asynchronously), and closes after
//! `duration`, when the publisher stops. Then every subscriber must catch up with the last
//! publication; what has not arrived within [`DRAIN_TIMEOUT`] is counted as lost.
//!
//! With `threads > 1` the subscribers are split over that many threads, each with its own
//! epoll loop; thread 0 also runs the publisher and drives the phases, the others report
//! through atomics in [`Shared`].

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use mio::{Events, Interest, Poll, Token};

use crate::fanwire::{FanReader, Publications};
use crate::generator::{self, Scenario};
use crate::sys;
use crate::wire::{self, Rng};

/// How long subscribers may take to catch up with the last publication after the window
/// (the default of [`FanParams::drain_timeout`]).
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Closed loop: how long the slowest subscriber may go without a delivery before the run fails
/// (a publication lost in closed loop would otherwise stall it for good).
const STALL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long opening all connections may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(120);
/// How long after the warm-up every subscriber must have received something.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Unwritten publication bytes above which the publisher builds no more.
const PUB_OUT_CAP: usize = 256 * 1024;
/// Token of the publisher's connection.
const PUBLISHER: Token = Token(usize::MAX - 1);
/// Token of thread 0's waker.
const WAKE: Token = Token(usize::MAX - 2);
/// The error other threads return when one thread failed (the real error is preferred).
const ABORTED: &str = "stopped because another generator thread failed";

/// One fan-out run's settings.
#[derive(Debug, Clone)]
pub struct FanParams {
    /// `Broadcast` or `Crossnode` (for titles; the loop is the same).
    pub scenario: Scenario,
    /// Where the subscribers connect.
    pub sub_addr: SocketAddr,
    /// Where the publisher connects.
    pub pub_addr: SocketAddr,
    /// Subscriber connections.
    pub subscribers: usize,
    /// Closed loop: publications outstanding at most.
    pub inflight: usize,
    /// Publications per second; 0 for closed loop.
    pub rate: f64,
    /// Payload bytes per publication (at least 16).
    pub size: usize,
    /// Measured time.
    pub duration: Duration,
    /// Unmeasured time before it.
    pub warmup: Duration,
    /// Generator threads (subscribers split over them).
    pub threads: usize,
    /// Cores the generator threads are pinned to, in turn (empty: not pinned here).
    pub gen_cores: Vec<usize>,
    /// Processes whose CPU time (all threads) and peak RSS are measured: (name, pid).
    pub watch: Vec<(String, u32)>,
    /// The server core's `ksoftirqd` thread, whose CPU time is measured too.
    pub softirq: Option<u32>,
    /// Shown in the progress line.
    pub label: String,
    /// Handshakes in progress at once per thread while opening connections.
    pub open_window: usize,
    /// Stop after this many publications instead of after `duration`, all of them measured
    /// (tests).
    pub publications: Option<u64>,
    /// How long subscribers may take to catch up after the publisher stopped.
    pub drain_timeout: Duration,
}

/// A fan-out run's measurements.
#[derive(Debug)]
pub struct FanOutcome {
    /// Deliveries received in the measured window (over all subscribers).
    pub deliveries: u64,
    /// Publications written in the window.
    pub publications: u64,
    /// Deliveries that never came: gaps seen in the window, and what was missing after the
    /// drain.
    pub lost: u64,
    /// Length of the window.
    pub seconds: f64,
    /// Publish-to-deliver latency of each delivery in the window, in ns.
    pub latency: Histogram<u64>,
    /// CPU time of each watched process in the window: (name, run and wait).
    pub cpu: Vec<(String, sys::Sched)>,
    /// CPU time of the server core's `ksoftirqd` in the window.
    pub softirq: Option<sys::Sched>,
    /// The generator's CPU time in the window (all its threads).
    pub generator: sys::Sched,
    /// Peak RSS (`VmHWM`) of each watched process at the end of the run, in bytes.
    pub peak_rss: Vec<(String, u64)>,
    /// Seconds taken to open all connections.
    pub connect_seconds: f64,
}

/// State the generator threads share.
#[derive(Debug)]
struct Shared {
    /// Time zero of the stamps.
    epoch: Instant,
    /// Publications written so far (and the sequence number of the next).
    published: AtomicU64,
    /// Per thread: the lowest sequence number some subscriber of that thread still waits for
    /// (`u64::MAX` for a thread without subscribers).
    bases: Vec<AtomicU64>,
    /// Subscribers whose handshake completed.
    opened: AtomicUsize,
    /// Subscribers that received at least one publication.
    heard: AtomicUsize,
    /// Deliveries so far (for the progress line).
    delivered: AtomicU64,
    /// Window start and end, ns after `epoch` (`u64::MAX` until known).
    window_start: AtomicU64,
    window_end: AtomicU64,
    /// The publisher stopped; `published` is final.
    stopped: AtomicBool,
    /// Threads whose subscribers caught up (or gave up) after the stop.
    drained: AtomicUsize,
    /// Some thread failed; the others stop.
    failed: AtomicBool,
    /// Wakes thread 0 when another thread's base advances (closed loop).
    waker: OnceLock<mio::Waker>,
}

impl Shared {
    fn ns(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.epoch).as_nanos() as u64
    }

    fn in_window(&self, ns: u64) -> bool {
        ns >= self.window_start.load(Ordering::Acquire)
            && ns < self.window_end.load(Ordering::Acquire)
    }

    /// The lowest sequence number any subscriber still waits for.
    fn base(&self) -> u64 {
        self.bases
            .iter()
            .map(|b| b.load(Ordering::Acquire))
            .min()
            .unwrap_or(u64::MAX)
    }
}

/// The lowest of many counters that only grow, in O(1) amortised per step: how many members
/// sit at each value from the lowest up.
#[derive(Debug)]
pub struct MinTracker {
    base: u64,
    counts: VecDeque<u32>,
}

impl MinTracker {
    /// `members` counters, all at 0.
    pub fn new(members: usize) -> Self {
        let counts = if members == 0 {
            VecDeque::new()
        } else {
            VecDeque::from([members as u32])
        };
        MinTracker { base: 0, counts }
    }

    /// The lowest counter (`u64::MAX` with no members).
    pub fn min(&self) -> u64 {
        if self.counts.is_empty() {
            u64::MAX
        } else {
            self.base
        }
    }

    /// One member's counter moved from `from` up to `to`.
    pub fn advance(&mut self, from: u64, to: u64) {
        debug_assert!(from >= self.base && to > from);
        let (from, to) = ((from - self.base) as usize, (to - self.base) as usize);
        self.counts[from] -= 1;
        if self.counts.len() <= to {
            self.counts.resize(to + 1, 0);
        }
        self.counts[to] += 1;
        while self.counts.front() == Some(&0) {
            self.counts.pop_front();
            self.base += 1;
        }
    }
}

/// One subscriber connection.
struct Sub {
    sock: mio::net::TcpStream,
    key: String,
    handshake: Option<Vec<u8>>,
    reader: FanReader,
}

/// What one thread measured.
struct Partial {
    deliveries: u64,
    lost: u64,
    latency: Histogram<u64>,
}

/// Thread 0's extra results.
struct Lead {
    publications: u64,
    seconds: f64,
    cpu0: Vec<sys::Sched>,
    cpu1: Vec<sys::Sched>,
    connect_seconds: f64,
}

/// Runs one fan-out case.
///
/// # Errors
///
/// A failed connection or handshake, a protocol violation, a delivery that is duplicated,
/// reordered, corrupted or never published, a subscriber that receives nothing, or ctrl-c.
pub fn run(p: &FanParams) -> Result<FanOutcome, String> {
    if p.subscribers == 0 || p.threads == 0 || (p.rate <= 0.0 && p.inflight == 0) {
        return Err("need at least one subscriber, thread, and publication in flight".into());
    }
    let pubs = Publications::new(p.size, 0xFA_0007 ^ p.size as u64)?;
    let threads = p.threads.min(p.subscribers);
    let shared = Shared {
        epoch: Instant::now(),
        published: AtomicU64::new(0),
        bases: (0..threads).map(|_| AtomicU64::new(0)).collect(),
        opened: AtomicUsize::new(0),
        heard: AtomicUsize::new(0),
        delivered: AtomicU64::new(0),
        window_start: AtomicU64::new(u64::MAX),
        window_end: AtomicU64::new(u64::MAX),
        stopped: AtomicBool::new(false),
        drained: AtomicUsize::new(0),
        failed: AtomicBool::new(false),
        waker: OnceLock::new(),
    };
    let mut watched: Vec<u32> = p.watch.iter().map(|w| w.1).collect();
    watched.extend(p.softirq);
    watched.push(std::process::id());
    let (lead, partials) = std::thread::scope(|scope| {
        let handles: Vec<_> = (1..threads)
            .map(|t| {
                let (shared, pubs) = (&shared, &pubs);
                scope.spawn(move || {
                    pin(p, t);
                    let r = worker(p, t, threads, shared, pubs, None);
                    if r.is_err() {
                        shared.failed.store(true, Ordering::Release);
                    }
                    r
                })
            })
            .collect();
        let mut lead = None;
        let first = worker(p, 0, threads, &shared, &pubs, Some((&mut lead, &watched)));
        if first.is_err() {
            shared.failed.store(true, Ordering::Release);
        }
        let mut partials = vec![first];
        for h in handles {
            partials.push(
                h.join()
                    .unwrap_or_else(|_| Err("generator thread panicked".into())),
            );
        }
        (lead, partials)
    });
    // The first real error, not another thread's "stopped because".
    let mut errors: Vec<String> = partials
        .iter()
        .filter_map(|r| r.as_ref().err().cloned())
        .collect();
    errors.sort_by_key(|e| e == ABORTED);
    if let Some(e) = errors.into_iter().next() {
        return Err(e);
    }
    let lead = lead.ok_or("thread 0 finished without results")?;
    let mut latency = Histogram::<u64>::new_with_bounds(1, 120_000_000_000, 3)
        .map_err(|e| format!("histogram: {e}"))?;
    let (mut deliveries, mut lost) = (0, 0);
    for part in partials.into_iter().flatten() {
        deliveries += part.deliveries;
        lost += part.lost;
        let _ = latency.add(&part.latency);
    }
    let delta = |i: usize| sys::Sched {
        run: lead.cpu1[i].run.saturating_sub(lead.cpu0[i].run),
        wait: lead.cpu1[i].wait.saturating_sub(lead.cpu0[i].wait),
    };
    let cpu = p
        .watch
        .iter()
        .enumerate()
        .map(|(i, (name, _))| (name.clone(), delta(i)))
        .collect();
    let softirq = p.softirq.map(|_| delta(p.watch.len()));
    let generator = delta(watched.len() - 1);
    let peak_rss = p
        .watch
        .iter()
        .map(|(name, pid)| (name.clone(), sys::peak_rss(*pid).unwrap_or(0)))
        .collect();
    Ok(FanOutcome {
        deliveries,
        publications: lead.publications,
        lost,
        seconds: lead.seconds,
        latency,
        cpu,
        softirq,
        generator,
        peak_rss,
        connect_seconds: lead.connect_seconds,
    })
}

/// Pins generator thread `t` to its core from `p.gen_cores`, if any.
fn pin(p: &FanParams, t: usize) {
    if let Some(&core) = p.gen_cores.get(t % p.gen_cores.len().max(1)) {
        if let Err(e) = sys::pin_to_core(core) {
            eprintln!("note: cannot pin generator thread {t} to core {core}: {e}");
        }
    }
}

/// The publisher's connection and schedule (thread 0 only).
struct Publisher {
    sock: mio::net::TcpStream,
    reader: FanReader,
    out: Vec<u8>,
    written: usize,
    /// Publications written in the window.
    in_window: u64,
    /// Fixed rate: schedule slots given up, the publisher having fallen more than 10 ms
    /// behind: because the server did not take what was written (the socket was full)...
    given_up: u64,
    /// ...or, of those, because the generator itself came back late (busy reading, or
    /// waiting for its core).
    late: u64,
    rng: Rng,
}

/// One generator thread: opens its share of the subscribers (every `threads`-th from `t`),
/// then reads and verifies deliveries until the drain ends. Thread 0 (`lead` set) also runs
/// the publisher, opens and closes the window, and samples the CPU times of `watched`.
fn worker(
    p: &FanParams,
    t: usize,
    threads: usize,
    shared: &Shared,
    pubs: &Publications,
    lead: Option<(&mut Option<Lead>, &[u32])>,
) -> Result<Partial, String> {
    let mut poll = Poll::new().map_err(|e| format!("epoll: {e}"))?;
    let mut events = Events::with_capacity(1024);
    let mut rbuf = vec![0u8; 256 * 1024];
    let mut rng = Rng::new(std::process::id() as u64 ^ 0xFA40 ^ (t as u64) << 32);
    let mut latency = Histogram::<u64>::new_with_bounds(1, 120_000_000_000, 3)
        .map_err(|e| format!("histogram: {e}"))?;
    let is_lead = lead.is_some();
    if is_lead && threads > 1 {
        let waker = mio::Waker::new(poll.registry(), WAKE).map_err(|e| format!("waker: {e}"))?;
        let _ = shared.waker.set(waker);
    }
    let topic_path = "/sub/perf";
    let host = p.sub_addr.to_string();
    let mine: Vec<usize> = (t..p.subscribers).step_by(threads).collect();

    // Phase 1: open this thread's subscribers, `open_window` handshakes at a time.
    let start = Instant::now();
    let mut subs: Vec<Sub> = Vec::with_capacity(mine.len());
    let mut open = 0;
    let mut last_progress = start;
    while open < mine.len() {
        while subs.len() < mine.len() && subs.len() - open < p.open_window {
            let token = Token(subs.len());
            let (sock, key) = generator::open_socket(
                p.sub_addr,
                &host,
                topic_path,
                &mut rng,
                &poll,
                token,
                Interest::READABLE,
            )
            .map_err(|e| format!("subscriber {}: {e}", mine[subs.len()]))?;
            subs.push(Sub {
                sock,
                key,
                handshake: Some(Vec::new()),
                reader: FanReader::default(),
            });
        }
        generator::wait(&mut poll, &mut events, 10)?;
        for ev in events.iter() {
            let i = ev.token().0;
            let Some(sub) = subs.get_mut(i) else { continue };
            let Some(buf) = sub.handshake.as_mut() else {
                return Err(format!(
                    "subscriber {}: data before any publication",
                    mine[i]
                ));
            };
            let fd = sub.sock.as_raw_fd();
            if generator::handshake_step(fd, buf, &sub.key, &mut rbuf)
                .map_err(|e| format!("subscriber {}: {e}", mine[i]))?
            {
                sub.handshake = None;
                open += 1;
                shared.opened.fetch_add(1, Ordering::AcqRel);
            }
        }
        check_abort(shared)?;
        if start.elapsed() > CONNECT_TIMEOUT {
            return Err(format!(
                "only {open} of {} subscribers open after {CONNECT_TIMEOUT:?}",
                mine.len()
            ));
        }
        if is_lead && last_progress.elapsed() >= Duration::from_secs(1) {
            last_progress = Instant::now();
            generator::progress(&format!(
                "{}: {}/{} subscribers open",
                p.label,
                shared.opened.load(Ordering::Acquire),
                p.subscribers
            ));
        }
    }

    // Thread 0: once every thread's subscribers are open, the publisher connects.
    let mut publisher = None;
    if is_lead {
        while shared.opened.load(Ordering::Acquire) < p.subscribers {
            generator::wait(&mut poll, &mut events, 10)?;
            if events.iter().any(|e| e.token() != WAKE) {
                return Err("a subscriber got data before any publication".into());
            }
            check_abort(shared)?;
            if start.elapsed() > CONNECT_TIMEOUT {
                return Err("subscribers of other threads did not open in time".into());
            }
        }
        publisher = Some(open_publisher(
            p,
            &mut poll,
            &mut events,
            &mut rng,
            &mut rbuf,
            shared,
        )?);
    }
    let connect_seconds = start.elapsed().as_secs_f64();

    // Phase 2: publish (thread 0), read and verify (every thread).
    let mut tracker = MinTracker::new(subs.len());
    if subs.is_empty() {
        shared.bases[t].store(u64::MAX, Ordering::Release);
    }
    let (mut deliveries, mut lost) = (0u64, 0u64);
    let load_start = Instant::now();
    let mut cpu0 = Vec::new();
    let mut cpu1 = Vec::new();
    let mut window = None::<(Instant, Instant)>;
    if let (Some((_, watched)), Some(_)) = (lead.as_ref(), p.publications) {
        // Test mode: everything is measured.
        window = Some((load_start, load_start));
        cpu0 = snapshot(watched);
        shared.window_start.store(0, Ordering::Release);
    }
    let mut stop_seen = None::<Instant>;
    let mut last_base = (0, load_start);
    let mut last_count = 0;
    let mut last_progress = load_start;
    loop {
        if let Some(pb) = publisher
            .as_mut()
            .filter(|_| !shared.stopped.load(Ordering::Acquire))
        {
            publish(p, pb, pubs, shared, load_start)?;
        }
        let timeout = match (&publisher, p.rate > 0.0) {
            (Some(_), true) => 1,
            _ if stop_seen.is_some() => 10,
            _ => 5,
        };
        generator::wait(&mut poll, &mut events, timeout)?;
        let now = Instant::now();
        let now_ns = shared.ns(now);
        let counting = shared.in_window(now_ns);
        let published = shared.published.load(Ordering::Acquire);
        let mut turn = 0u64;
        for ev in events.iter() {
            match ev.token() {
                WAKE => continue,
                PUBLISHER => {
                    let Some(pb) = publisher.as_mut() else {
                        continue;
                    };
                    if ev.is_writable() {
                        flush_publisher(pb).map_err(|e| format!("publisher: {e}"))?;
                    }
                    if ev.is_readable() {
                        let fd = pb.sock.as_raw_fd();
                        read_all(fd, &mut rbuf, |data| {
                            pb.reader.feed(data, pubs, published, |_| {})
                        })
                        .map_err(|e| format!("publisher: {e}"))?;
                    }
                }
                Token(i) => {
                    let Some(sub) = subs.get_mut(i) else { continue };
                    let fd = sub.sock.as_raw_fd();
                    let reader = &mut sub.reader;
                    let tracker = &mut tracker;
                    read_all(fd, &mut rbuf, |data| {
                        // Loaded after the read: with several threads, the publisher may have
                        // written (and counted) more since this turn began.
                        let published = shared.published.load(Ordering::Acquire);
                        reader.feed(data, pubs, published, |d| {
                            tracker.advance(d.seq - d.skipped, d.seq + 1);
                            if d.seq == d.skipped {
                                shared.heard.fetch_add(1, Ordering::AcqRel);
                            }
                            turn += 1;
                            if counting {
                                deliveries += 1;
                                lost += d.skipped;
                                let ns = now_ns.saturating_sub(d.stamp_ns);
                                latency.saturating_record(ns.max(1));
                            }
                        })
                    })
                    .map_err(|e| format!("subscriber {}: {e}", mine[i]))?;
                }
            }
        }
        if turn > 0 {
            shared.delivered.fetch_add(turn, Ordering::Relaxed);
            let base = tracker.min();
            if shared.bases[t].swap(base, Ordering::AcqRel) != base && !is_lead {
                if let Some(w) = shared.waker.get() {
                    let _ = w.wake();
                }
            }
        }
        check_abort(shared)?;

        if let Some(pb) = publisher.as_mut() {
            let (_, watched) = lead.as_ref().expect("the publisher runs on thread 0");
            let stop_now = match (window, p.publications) {
                (_, Some(n)) => {
                    if published >= n && !shared.stopped.load(Ordering::Acquire) {
                        window = Some((load_start, now));
                        true
                    } else {
                        false
                    }
                }
                (None, None) => {
                    let warm = now >= load_start + p.warmup;
                    let heard = shared.heard.load(Ordering::Acquire);
                    if warm && heard >= p.subscribers {
                        window = Some((now, now + p.duration));
                        cpu0 = snapshot(watched);
                        shared
                            .window_end
                            .store(now_ns + p.duration.as_nanos() as u64, Ordering::Release);
                        shared.window_start.store(now_ns, Ordering::Release);
                        pb.in_window = 0;
                    } else if warm && now > load_start + p.warmup + READY_TIMEOUT {
                        return Err(format!(
                            "only {heard} of {} subscribers received anything {:?} after the \
                             first publication",
                            p.subscribers,
                            now - load_start
                        ));
                    }
                    false
                }
                (Some((_, end)), None) => now >= end && !shared.stopped.load(Ordering::Acquire),
            };
            if stop_now {
                cpu1 = snapshot(watched);
                shared.stopped.store(true, Ordering::Release);
            } else if p.rate <= 0.0 && !shared.stopped.load(Ordering::Acquire) {
                let base = shared.base();
                if base != last_base.0 {
                    last_base = (base, now);
                } else if published > base && now.duration_since(last_base.1) > STALL_TIMEOUT {
                    return Err(format!(
                        "closed loop stalled: publication {base} has not reached every \
                         subscriber in {STALL_TIMEOUT:?} (lost by the server?); --rate runs at a \
                         fixed rate and counts losses instead"
                    ));
                }
            }
        }
        if shared.stopped.load(Ordering::Acquire) {
            let stop = *stop_seen.get_or_insert(now);
            let last = shared.published.load(Ordering::Acquire);
            let behind: u64 = subs.iter().map(|s| last - s.reader.next).sum();
            if behind == 0 {
                break;
            }
            if now.duration_since(stop) > p.drain_timeout {
                lost += behind;
                break;
            }
        }
        if is_lead && now.duration_since(last_progress) >= Duration::from_secs(1) {
            let total = shared.delivered.load(Ordering::Relaxed);
            let rate =
                (total - last_count) as f64 / now.duration_since(last_progress).as_secs_f64();
            last_progress = now;
            last_count = total;
            let phase = match (window, stop_seen) {
                (_, Some(_)) => " (drain)",
                (None, _) => " (warm-up)",
                _ => "",
            };
            generator::progress(&format!(
                "{}: {:.0} s, {} deliveries/s{phase}",
                p.label,
                now.duration_since(load_start).as_secs_f64(),
                generator::si(rate),
            ));
        }
    }

    // Phase 3: a clean close on every connection; replies are not awaited. The publisher
    // closes last, once every thread has drained.
    shared.drained.fetch_add(1, Ordering::AcqRel);
    let close = wire::close_wire(&mut rng);
    for sub in &subs {
        let _ = write_some(sub.sock.as_raw_fd(), &close);
    }
    if let Some(pb) = publisher.as_ref() {
        while shared.drained.load(Ordering::Acquire) < threads {
            check_abort(shared)?;
            std::thread::sleep(Duration::from_millis(1));
        }
        let _ = write_some(pb.sock.as_raw_fd(), &close);
    }
    if let Some((slot, _)) = lead {
        let (from, to) = window.unwrap_or((load_start, load_start));
        *slot = Some(Lead {
            publications: publisher.as_ref().map_or(0, |pb| pb.in_window),
            seconds: to.duration_since(from).as_secs_f64(),
            cpu0,
            cpu1,
            connect_seconds,
        });
        if let Some(pb) = publisher.as_ref().filter(|pb| pb.given_up > 0) {
            generator::progress_done();
            eprintln!(
                "note: {}: the publisher fell behind its schedule and gave up {} publications: \
                 {} with its socket full (the server did not read them in time), {} with the \
                 generator itself late (busy reading, or waiting for its core: gwait)",
                p.label,
                pb.given_up,
                pb.given_up - pb.late,
                pb.late
            );
        }
        generator::progress_done();
    }
    Ok(Partial {
        deliveries,
        lost,
        latency,
    })
}

/// Connects the publisher to `p.pub_addr` and completes its handshake.
fn open_publisher(
    p: &FanParams,
    poll: &mut Poll,
    events: &mut Events,
    rng: &mut Rng,
    rbuf: &mut [u8],
    shared: &Shared,
) -> Result<Publisher, String> {
    let host = p.pub_addr.to_string();
    let (sock, key) = generator::open_socket(
        p.pub_addr,
        &host,
        "/pub/perf",
        rng,
        poll,
        PUBLISHER,
        Interest::WRITABLE,
    )
    .map_err(|e| format!("publisher: {e}"))?;
    let mut buf = Vec::new();
    let start = Instant::now();
    while !generator::handshake_step(sock.as_raw_fd(), &mut buf, &key, rbuf)
        .map_err(|e| format!("publisher: {e}"))?
    {
        generator::wait(poll, events, 10)?;
        if events
            .iter()
            .any(|e| e.token() != PUBLISHER && e.token() != WAKE)
        {
            return Err("a subscriber got data before any publication".into());
        }
        check_abort(shared)?;
        if start.elapsed() > Duration::from_secs(10) {
            return Err("publisher: no handshake response after 10 s".into());
        }
    }
    Ok(Publisher {
        sock,
        reader: FanReader::publisher(),
        out: Vec::with_capacity(PUB_OUT_CAP + 64 * 1024),
        written: 0,
        in_window: 0,
        given_up: 0,
        late: 0,
        rng: Rng::new(0x9B_0B ^ std::process::id() as u64),
    })
}

/// Writes the publications that are due: closed loop, up to `inflight` beyond the slowest
/// subscriber; fixed rate, up to the schedule. Each is stamped just before it is written.
fn publish(
    p: &FanParams,
    pb: &mut Publisher,
    pubs: &Publications,
    shared: &Shared,
    load_start: Instant,
) -> Result<(), String> {
    let mut next = shared.published.load(Ordering::Acquire);
    let limit = if p.rate > 0.0 {
        let elapsed = load_start.elapsed().as_secs_f64();
        let due = (elapsed * p.rate) as u64 - pb.given_up;
        // At most 10 ms of schedule is caught up in a burst; the rest is given up.
        let slack = (p.rate / 100.0).max(1.0) as u64;
        if due > next + slack {
            pb.given_up += due - next - slack;
            if pb.out.len() == pb.written {
                pb.late += due - next - slack;
            }
        }
        due.min(next + slack)
    } else {
        shared.base().saturating_add(p.inflight as u64)
    };
    let limit = p.publications.map_or(limit, |n| limit.min(n));
    if next >= limit || pb.out.len() - pb.written >= PUB_OUT_CAP {
        return Ok(());
    }
    let stamp = shared.ns(Instant::now());
    let counting = shared.in_window(stamp);
    while next < limit && pb.out.len() - pb.written < PUB_OUT_CAP {
        pubs.push_wire(&mut pb.out, next, stamp, &mut pb.rng);
        next += 1;
        if counting {
            pb.in_window += 1;
        }
    }
    // Published before written: a subscriber that reads it finds it counted.
    shared.published.store(next, Ordering::Release);
    flush_publisher(pb).map_err(|e| format!("publisher: {e}"))
}

/// Writes as much of the publisher's queued bytes as the socket takes.
fn flush_publisher(pb: &mut Publisher) -> io::Result<()> {
    while pb.written < pb.out.len() {
        match write_some(pb.sock.as_raw_fd(), &pb.out[pb.written..])? {
            0 => return Ok(()),
            n => pb.written += n,
        }
    }
    pb.out.clear();
    pb.written = 0;
    Ok(())
}

/// One `write`; 0 when the socket is full.
fn write_some(fd: i32, data: &[u8]) -> io::Result<usize> {
    loop {
        // SAFETY: `data` is valid for reads of `data.len()` bytes for the duration of the call.
        let rc = unsafe { libc::write(fd, data.as_ptr() as *const libc::c_void, data.len()) };
        if rc >= 0 {
            return Ok(rc as usize);
        }
        let err = io::Error::last_os_error();
        match err.kind() {
            io::ErrorKind::WouldBlock => return Ok(0),
            io::ErrorKind::Interrupted => continue,
            _ => return Err(err),
        }
    }
}

/// Reads the socket until it would block (edge-triggered), handing each chunk to `sink`.
fn read_all(
    fd: i32,
    rbuf: &mut [u8],
    mut sink: impl FnMut(&[u8]) -> Result<(), String>,
) -> Result<(), String> {
    loop {
        let Some(n) = generator::read_fd(fd, rbuf).map_err(|e| e.to_string())? else {
            return Ok(());
        };
        if n == 0 {
            return Err("server closed the connection".into());
        }
        sink(&rbuf[..n])?;
        if n < rbuf.len() {
            return Ok(());
        }
    }
}

/// `Err` when another thread failed or ctrl-c arrived.
fn check_abort(shared: &Shared) -> Result<(), String> {
    if sys::interrupted() {
        return Err("interrupted".into());
    }
    if shared.failed.load(Ordering::Acquire) {
        return Err(ABORTED.into());
    }
    Ok(())
}

/// Scheduler times of `pids` now (zero for a process that cannot be read).
fn snapshot(pids: &[u32]) -> Vec<sys::Sched> {
    pids.iter()
        .map(|&pid| sys::process_sched(pid).unwrap_or_default())
        .collect()
}

#[cfg(test)]
mod tests {
    use std::io::{Read as _, Write as _};
    use std::net::TcpListener;
    use std::sync::{Arc, Mutex};

    use super::*;

    #[test]
    fn min_tracker_follows_the_slowest_member() {
        let mut t = MinTracker::new(3);
        assert_eq!(t.min(), 0);
        t.advance(0, 1);
        t.advance(0, 5); // a member that skipped 1..4
        assert_eq!(t.min(), 0);
        t.advance(0, 2);
        assert_eq!(t.min(), 1);
        t.advance(1, 6);
        assert_eq!(t.min(), 2);
        t.advance(2, 6);
        assert_eq!(t.min(), 5);
        assert_eq!(MinTracker::new(0).min(), u64::MAX);
    }

    /// Reads one client frame (masked) from `sock`, after `buf`'s leftovers; returns
    /// (opcode, unmasked payload).
    fn read_frame(sock: &mut std::net::TcpStream, buf: &mut Vec<u8>) -> Option<(u8, Vec<u8>)> {
        let mut chunk = [0u8; 4096];
        loop {
            if buf.len() >= 2 {
                let (ext, len) = match buf[1] & 0x7F {
                    126 if buf.len() >= 4 => (2, u16::from_be_bytes([buf[2], buf[3]]) as usize),
                    126 => (usize::MAX, 0),
                    n => (0, n as usize),
                };
                if ext != usize::MAX && buf.len() >= 6 + ext + len {
                    let mask: [u8; 4] = buf[2 + ext..6 + ext].try_into().unwrap();
                    let payload = buf[6 + ext..6 + ext + len]
                        .iter()
                        .enumerate()
                        .map(|(i, b)| b ^ mask[i & 3])
                        .collect();
                    let op = buf[0] & 0x0F;
                    buf.drain(..6 + ext + len);
                    return Some((op, payload));
                }
            }
            match sock.read(&mut chunk) {
                Ok(0) | Err(_) => return None,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Answers the upgrade on `sock`; returns the request path and leftover bytes.
    fn accept_ws(sock: &mut std::net::TcpStream) -> (String, Vec<u8>) {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let n = sock.read(&mut chunk).unwrap();
            buf.extend_from_slice(&chunk[..n]);
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_string();
                buf.drain(..end + 4);
                let path = head.split(' ').nth(1).unwrap().to_string();
                let key = head
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("sec-websocket-key")
                            .then(|| v.trim().to_string())
                    })
                    .unwrap();
                let reply = format!(
                    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: \
                     Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
                    wire::accept_for(&key)
                );
                sock.write_all(reply.as_bytes()).unwrap();
                return (path, buf);
            }
        }
    }

    /// A minimal blocking fan-out server for `subscribers` subscribers and one publisher,
    /// relaying each publication unmasked to every subscriber; `fault(sub, index)` may drop
    /// (`None`) or rewrite the payload of the `index`-th publication to subscriber `sub`.
    fn raw_fanout(
        subscribers: usize,
        fault: fn(usize, usize, Vec<u8>) -> Option<Vec<u8>>,
    ) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            let subs = Arc::new(Mutex::new(Vec::new()));
            let mut publisher = None;
            while publisher.is_none() {
                let (mut sock, _) = listener.accept().unwrap();
                let (path, rest) = accept_ws(&mut sock);
                if path.starts_with("/sub/") {
                    subs.lock().unwrap().push(sock);
                } else {
                    assert_eq!(subs.lock().unwrap().len(), subscribers);
                    publisher = Some((sock, rest));
                }
            }
            let (mut sock, mut buf) = publisher.unwrap();
            let mut index = 0;
            while let Some((op, payload)) = read_frame(&mut sock, &mut buf) {
                if op == 0x8 {
                    return;
                }
                for (s, sub) in subs.lock().unwrap().iter_mut().enumerate() {
                    let Some(payload) = fault(s, index, payload.clone()) else {
                        continue;
                    };
                    let mut out = vec![0x82];
                    if payload.len() < 126 {
                        out.push(payload.len() as u8);
                    } else {
                        out.push(126);
                        out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
                    }
                    out.extend_from_slice(&payload);
                    let _ = sub.write_all(&out);
                }
                index += 1;
            }
        });
        addr
    }

    fn params(addr: SocketAddr, subscribers: usize, threads: usize, rate: f64) -> FanParams {
        FanParams {
            scenario: Scenario::Broadcast,
            sub_addr: addr,
            pub_addr: addr,
            subscribers,
            inflight: 4,
            rate,
            size: 100,
            duration: Duration::from_secs(20),
            warmup: Duration::ZERO,
            threads,
            gen_cores: Vec::new(),
            watch: Vec::new(),
            softirq: None,
            label: "test".into(),
            open_window: 4,
            publications: Some(60),
            drain_timeout: Duration::from_millis(300),
        }
    }

    fn intact(_: usize, _: usize, payload: Vec<u8>) -> Option<Vec<u8>> {
        Some(payload)
    }

    #[test]
    fn closed_loop_delivers_every_publication_to_every_subscriber() {
        for threads in [1, 2] {
            let outcome = run(&params(raw_fanout(5, intact), 5, threads, 0.0)).unwrap();
            assert_eq!(outcome.publications, 60, "threads {threads}");
            assert_eq!(outcome.deliveries, 300, "threads {threads}");
            assert_eq!(outcome.lost, 0);
            assert_eq!(outcome.latency.len(), 300);
        }
    }

    #[test]
    fn fixed_rate_runs_on_schedule() {
        let outcome = run(&params(raw_fanout(3, intact), 3, 1, 2000.0)).unwrap();
        assert_eq!(outcome.deliveries, 180);
        // 60 publications at 2000/s: about 30 ms.
        assert!(outcome.seconds < 1.0, "{}", outcome.seconds);
    }

    #[test]
    fn a_dropped_delivery_is_counted_as_lost() {
        fn drop_some(sub: usize, index: usize, p: Vec<u8>) -> Option<Vec<u8>> {
            // Subscriber 1 misses publications 10 and 11, subscriber 0 the last one.
            let dropped = (sub == 1 && (index == 10 || index == 11)) || (sub == 0 && index == 59);
            (!dropped).then_some(p)
        }
        let outcome = run(&params(raw_fanout(2, drop_some), 2, 1, 0.0)).unwrap();
        assert_eq!(outcome.deliveries, 117);
        assert_eq!(outcome.lost, 3);
    }

    #[test]
    fn a_duplicated_delivery_fails_the_run() {
        fn duplicate(sub: usize, index: usize, mut p: Vec<u8>) -> Option<Vec<u8>> {
            if sub == 2 && index == 7 {
                // Publication 7 carries publication 6's sequence number (and filler).
                p[..8].copy_from_slice(&6u64.to_le_bytes());
            }
            Some(p)
        }
        let err = run(&params(raw_fanout(3, duplicate), 3, 1, 0.0)).unwrap_err();
        assert!(err.contains("subscriber 2"), "{err}");
        assert!(err.contains("duplicate or out of order"), "{err}");
    }

    #[test]
    fn a_corrupted_delivery_fails_the_run_from_any_thread() {
        fn corrupt(sub: usize, index: usize, mut p: Vec<u8>) -> Option<Vec<u8>> {
            if sub == 3 && index == 20 {
                p[50] ^= 0x40;
            }
            Some(p)
        }
        let err = run(&params(raw_fanout(4, corrupt), 4, 2, 0.0)).unwrap_err();
        // Which generator thread's subscriber the server accepted fourth varies.
        assert!(err.contains("subscriber "), "{err}");
        assert!(err.contains("differs at byte 50"), "{err}");
    }
}
