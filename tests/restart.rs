//! Restarts that lose nothing: under a running load, a new server process joins the old
//! one's address (`SO_REUSEPORT`), the old one gets SIGTERM and exits, and no client is
//! refused and no message that reached a server is lost.
//!
//! Connections waiting in a closed listener's accept queue move to another listener of the
//! group only with `net.ipv4.tcp_migrate_req=1`. The test does not touch the host's setting:
//! it runs in a network namespace of its own (a thread that called `unshare(CLONE_NEWNET)`;
//! the servers it spawns and the client threads it starts inherit it). That takes root: the
//! test is skipped with one line without it, and fails instead when `CI=true`.
//!
//! The servers are the test binary itself, re-run with `--exact child_server --ignored` and
//! `RINGSOCK_RESTART_CHILD` set (see [`child_main`]); each prints `LISTENING <addr>`, serves
//! until SIGTERM, then prints how many data messages its handler received. Every child is
//! killed by its guard if the test fails before it exits.

#[path = "common/mod.rs"]
mod common;

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::{masked_frame, parse_frame, Frame};
use ringsock::proto::handshake::Request;
use ringsock::server::{Builder, Decision, Handler, Message, Upgrade, Ws};

/// Carries the address a child server listens on.
const CHILD_ENV: &str = "RINGSOCK_RESTART_CHILD";
/// Client threads of the load.
const CLIENTS: usize = 16;
/// How long the load runs on each server before the next swap.
const DWELL: Duration = Duration::from_millis(1500);

/// The child-process server; a no-op unless a test spawned it.
#[test]
#[ignore = "helper process: run by restarts_under_load_refuse_nothing_and_lose_nothing"]
fn child_server() {
    child_main();
}

#[test]
fn restarts_under_load_refuse_nothing_and_lose_nothing() {
    // The namespace is entered on a thread of our own, so the test harness's threads keep
    // theirs whatever way the test runs. A thread started before it stays outside too: it
    // checks that the host's setting is untouched.
    let (ask, asked) = mpsc::channel::<()>();
    let (answer, answered) = mpsc::channel();
    let outside = thread::spawn(move || {
        while asked.recv().is_ok() {
            let _ = answer.send((read_migrate_req(), net_namespace()));
        }
    });
    let outcome = thread::spawn(move || {
        let look_outside = || {
            ask.send(()).unwrap();
            answered.recv().unwrap()
        };
        let (host_before, host_ns) = look_outside();
        enter_private_network()?;
        assert_ne!(net_namespace(), host_ns, "a namespace of our own");
        std::fs::write("/proc/sys/net/ipv4/tcp_migrate_req", "1").expect("set tcp_migrate_req");
        assert_eq!(read_migrate_req(), "1", "tcp_migrate_req in our namespace");
        assert_eq!(
            look_outside().0,
            host_before,
            "the host's tcp_migrate_req is untouched"
        );
        swap_twice_under_load();
        Ok::<(), String>(())
    })
    .join();
    drop(outside);
    match outcome {
        Ok(Ok(())) => {}
        Ok(Err(why)) if std::env::var("CI").as_deref() != Ok("true") => {
            println!("skipped: {why} (needs root for a network namespace of its own)");
        }
        Ok(Err(why)) => panic!("cannot run under CI: {why}"),
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// Without `tcp_migrate_req` (the host's setting, when it is 0: no namespace here), a server
/// that shares its address with another process says at SIGTERM that the connections in its
/// accept queues will be reset, and how to avoid it; with the setting it says nothing.
#[test]
fn an_old_server_warns_when_its_queued_connections_would_be_reset() {
    let host = read_migrate_req();
    let mut old = ChildServer::start("127.0.0.1:0");
    let mut new = ChildServer::start(&old.addr.to_string());
    old.terminate();
    let (status, _) = old.wait_exit(30);
    assert!(status.success(), "the old server exits 0: {status}");
    let stderr = old.stderr();
    assert_eq!(
        stderr.contains("net.ipv4.tcp_migrate_req is 0"),
        host == "0",
        "tcp_migrate_req {host}; the old server's stderr:\n{stderr}"
    );
    new.terminate();
    let (status, _) = new.wait_exit(30);
    assert!(status.success(), "the new server exits 0: {status}");
    // Alone on the address, it has nobody to hand its queue to: nothing to warn about.
    assert!(
        !new.stderr().contains("tcp_migrate_req"),
        "{}",
        new.stderr()
    );
}

/// A → B → C under a load of churning clients; then the counts.
fn swap_twice_under_load() {
    let mut current = ChildServer::start("127.0.0.1:0");
    let addr = current.addr;
    let tally = Arc::new(Tally::default());
    let stop = StopOnDrop(Arc::new(AtomicBool::new(false)));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|id| {
            let (tally, stop) = (Arc::clone(&tally), Arc::clone(&stop.0));
            thread::spawn(move || client(id, addr, &tally, &stop))
        })
        .collect();
    common::wait_for(30, "the load to start", || {
        tally.echoed.load(Ordering::Relaxed) > 200
    });
    thread::sleep(DWELL);
    let mut received = 0;
    for name in ["B", "C"] {
        let next = ChildServer::start(&addr.to_string());
        assert_eq!(next.addr, addr, "{name} listens on the same address");
        let connections_before = tally.connections.load(Ordering::Relaxed);
        current.terminate();
        let (status, got) = current.wait_exit(30);
        assert!(status.success(), "the old server exits 0: {status}");
        assert!(
            !current.stderr().contains("tcp_migrate_req"),
            "no warning with tcp_migrate_req=1"
        );
        received += got;
        thread::sleep(DWELL);
        let through_new = tally.connections.load(Ordering::Relaxed) - connections_before;
        eprintln!("restart: swap to {name}: {through_new} connections since, {got} messages received by the old one");
        current = next;
    }
    drop(stop);
    for c in clients {
        c.join().expect("client thread");
    }
    current.terminate();
    let (status, got) = current.wait_exit(30);
    assert!(status.success(), "the last server exits 0: {status}");
    received += got;

    let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let sent = load(&tally.sent);
    let lost = sent.saturating_sub(received);
    let refused = load(&tally.refused);
    let broken = load(&tally.broken);
    eprintln!(
        "restart: {} connections, {} messages sent, {} echoed, {} received by the servers, \
         {} closes with 1001 ({} before any echo); refused {refused}, broken {broken}, \
         lost {lost}",
        load(&tally.connections),
        sent,
        load(&tally.echoed),
        received,
        load(&tally.going_away),
        load(&tally.going_away_at_once),
    );
    let reasons = tally.reasons.lock().unwrap();
    assert_eq!(refused, 0, "refused connections, e.g. {reasons:?}");
    assert_eq!(
        broken, 0,
        "connections broken after the upgrade, e.g. {reasons:?}"
    );
    assert_eq!(
        lost, 0,
        "messages written before the server's close but never received"
    );
    assert!(
        load(&tally.going_away) > 0,
        "the swaps happened while clients were connected"
    );
}

// ---------------------------------------------------------------------------------------------
// The clients

/// Tells the clients to stop when dropped: at the end, or when the test fails.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// What the clients counted.
#[derive(Default)]
struct Tally {
    /// Upgrades that got a 101.
    connections: AtomicU64,
    /// Connect errors, resets before the 101, and answers other than 101.
    refused: AtomicU64,
    /// Connections that ended without a close frame from the server after the 101.
    broken: AtomicU64,
    /// Data messages written before the client saw the server's close.
    sent: AtomicU64,
    /// Echoes read back.
    echoed: AtomicU64,
    /// Closes with 1001 from a server going away.
    going_away: AtomicU64,
    /// Of those, closes before the first echo: upgrades answered during a shutdown.
    going_away_at_once: AtomicU64,
    /// The first few failures, for the assertion message.
    reasons: Mutex<Vec<String>>,
}

impl Tally {
    fn failed(&self, counter: &AtomicU64, why: String) {
        counter.fetch_add(1, Ordering::Relaxed);
        let mut reasons = self.reasons.lock().unwrap();
        if reasons.len() < 8 {
            reasons.push(why);
        }
    }
}

/// One client thread: connect, upgrade, send bursts of messages and read the echoes; after
/// a bounded number of messages close normally, on the server's close finish the handshake;
/// either way connect again, until told to stop.
fn client(id: usize, addr: SocketAddr, tally: &Tally, stop: &AtomicBool) {
    let mut round = 0usize;
    while !stop.load(Ordering::Relaxed) {
        round += 1;
        // Every other request arrives in two parts, 10 to 30 ms apart, as over a slow
        // network: so some connections are always mid-handshake when a server stops.
        let pause =
            (round % 2 == 0).then(|| Duration::from_millis(10 * (1 + (id + round) % 3) as u64));
        let mut conn = match Conn::open(addr, pause) {
            Ok(conn) => conn,
            Err(why) => {
                tally.failed(&tally.refused, format!("client {id}: {why}"));
                thread::sleep(Duration::from_millis(20));
                continue;
            }
        };
        tally.connections.fetch_add(1, Ordering::Relaxed);
        let quota = 10 + (id * 7 + round * 13) % 30;
        if let Err(why) = conn.talk(id, round, quota, tally) {
            tally.failed(&tally.broken, format!("client {id}: {why}"));
        }
    }
}

/// A blocking WebSocket client connection.
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

/// How a read ended when it did not bring a frame.
type Failure = String;

impl Conn {
    /// Connects and upgrades (pausing mid-request for `pause`); any failure before the 101
    /// is a refusal.
    fn open(addr: SocketAddr, pause: Option<Duration>) -> Result<Conn, Failure> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
            .map_err(|e| format!("connect: {e}"))?;
        stream
            .set_read_timeout(Some(Duration::from_secs(15)))
            .unwrap();
        stream.set_nodelay(true).unwrap();
        let mut conn = Conn {
            stream,
            buf: Vec::new(),
        };
        let request = "GET / HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n\
                       Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
                       Sec-WebSocket-Version: 13\r\n\r\n";
        let (first, rest) = request.as_bytes().split_at(40);
        for (i, part) in [first, rest].into_iter().enumerate() {
            if i == 1 {
                if let Some(pause) = pause {
                    thread::sleep(pause);
                }
            }
            conn.stream
                .write_all(part)
                .map_err(|e| format!("writing the request: {e}"))?;
        }
        loop {
            if let Some(end) = conn.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head: Vec<u8> = conn.buf.drain(..end + 4).collect();
                let head = String::from_utf8_lossy(&head);
                if !head.starts_with("HTTP/1.1 101") {
                    return Err(format!("answer {:?}", head.lines().next()));
                }
                return Ok(conn);
            }
            conn.fill().map_err(|e| format!("before the 101: {e}"))?;
        }
    }

    fn fill(&mut self) -> Result<(), Failure> {
        let mut chunk = [0u8; 16384];
        match self.stream.read(&mut chunk) {
            Ok(0) => Err("EOF".into()),
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(())
            }
            Err(e) => Err(e.to_string()),
        }
    }

    fn read_frame(&mut self) -> Result<Frame, Failure> {
        loop {
            if let Some((frame, used)) = parse_frame(&self.buf) {
                self.buf.drain(..used);
                return Ok(frame);
            }
            self.fill()?;
        }
    }

    fn write(&mut self, bytes: &[u8]) -> Result<(), Failure> {
        self.stream.write_all(bytes).map_err(|e| e.to_string())
    }

    /// Messages in bursts of one to three, each echo checked, until `quota` (then a normal
    /// close) or the server's close.
    fn talk(
        &mut self,
        id: usize,
        round: usize,
        quota: usize,
        tally: &Tally,
    ) -> Result<(), Failure> {
        let (mut sent, mut echoed) = (0, 0);
        while sent < quota {
            let burst = (1 + (sent + id) % 3).min(quota - sent);
            let payloads: Vec<Vec<u8>> = (sent..sent + burst)
                .map(|i| format!("client {id} round {round} message {i}").into_bytes())
                .collect();
            let mut bytes = Vec::new();
            for p in &payloads {
                bytes.extend(masked_frame(true, 2, p));
            }
            self.write(&bytes)
                .map_err(|e| format!("write after the 101: {e}"))?;
            tally.sent.fetch_add(burst as u64, Ordering::Relaxed);
            sent += burst;
            for p in &payloads {
                let frame = self.next_data_or_close()?;
                if frame.opcode == 8 {
                    if echoed == 0 {
                        tally.going_away_at_once.fetch_add(1, Ordering::Relaxed);
                    }
                    return self.answer_close(&frame, tally);
                }
                if frame.payload != *p {
                    return Err(format!("echo {:?} for {:?}", frame.payload, p));
                }
                tally.echoed.fetch_add(1, Ordering::Relaxed);
                echoed += 1;
            }
        }
        self.write(&masked_frame(true, 8, &1000u16.to_be_bytes()))?;
        let frame = self.next_data_or_close()?;
        if frame.opcode != 8 {
            return Err(format!("data after our close: {frame:?}"));
        }
        if frame.close_code() == Some(1001) {
            tally.going_away.fetch_add(1, Ordering::Relaxed);
        }
        self.expect_eof()
    }

    /// The next data or close frame (pings are ignored: the server does not wait for pongs
    /// within this test's time).
    fn next_data_or_close(&mut self) -> Result<Frame, Failure> {
        loop {
            let frame = self.read_frame()?;
            if frame.opcode != 9 && frame.opcode != 10 {
                return Ok(frame);
            }
        }
    }

    /// The server closed first: it must be 1001 (going away); answer it, then see TCP end.
    fn answer_close(&mut self, frame: &Frame, tally: &Tally) -> Result<(), Failure> {
        if frame.close_code() != Some(1001) {
            return Err(format!("server closed with {:?}", frame.close_code()));
        }
        tally.going_away.fetch_add(1, Ordering::Relaxed);
        self.write(&masked_frame(true, 8, &1001u16.to_be_bytes()))?;
        self.expect_eof()
    }

    fn expect_eof(&mut self) -> Result<(), Failure> {
        let mut chunk = [0u8; 4096];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => return Ok(()),
                Ok(_) => continue,
                // After both close frames a reset only means the server closed before our
                // last bytes were read: nothing is lost.
                Err(e) if e.kind() == ErrorKind::ConnectionReset => return Ok(()),
                Err(e) => return Err(format!("waiting for EOF: {e}")),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The network namespace

/// Moves the calling thread into a new network namespace and brings its loopback up.
fn enter_private_network() -> Result<(), String> {
    // SAFETY: plain syscalls; unshare changes only the calling thread's namespace.
    if unsafe { libc::geteuid() } != 0 {
        return Err("not root".into());
    }
    // SAFETY: as above.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(format!(
            "unshare(CLONE_NEWNET): {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: `ifr` is a zeroed ifreq on this frame, named "lo"; SIOCGIFFLAGS fills its
    // flags and SIOCSIFFLAGS reads them; the socket is closed once.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let mut ifr: libc::ifreq = std::mem::zeroed();
        for (dst, src) in ifr.ifr_name.iter_mut().zip(b"lo") {
            *dst = *src as libc::c_char;
        }
        let mut ok = libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut ifr) == 0;
        if ok {
            ifr.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
            ok = libc::ioctl(fd, libc::SIOCSIFFLAGS, &ifr) == 0;
        }
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        assert!(ok, "bring lo up: {err}");
    }
    Ok(())
}

/// `net.ipv4.tcp_migrate_req` as the calling thread sees it.
fn read_migrate_req() -> String {
    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_migrate_req")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|e| format!("unreadable: {e}"))
}

/// The calling thread's network namespace.
fn net_namespace() -> String {
    std::fs::read_link("/proc/thread-self/ns/net")
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// The child servers

/// A running child server; killed on drop unless it has exited.
struct ChildServer {
    child: Option<Child>,
    lines: Receiver<String>,
    stderr: Arc<Mutex<String>>,
    /// Reads stderr until the child closes it.
    stderr_reader: Option<thread::JoinHandle<()>>,
    addr: SocketAddr,
}

impl ChildServer {
    /// Starts a child server on `addr` and waits until it listens.
    fn start(addr: &str) -> ChildServer {
        let exe = std::env::current_exe().expect("test binary path");
        let mut child = Command::new(exe)
            .args(["--exact", "child_server", "--ignored", "--nocapture"])
            .args(["--test-threads", "1"])
            .env(CHILD_ENV, addr)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn a child server");
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr_pipe = child.stderr.take().expect("piped stderr");
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let sink = Arc::clone(&stderr);
        let stderr_reader = thread::spawn(move || {
            for line in BufReader::new(stderr_pipe).lines().map_while(Result::ok) {
                eprintln!("child: {line}");
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        let mut server = ChildServer {
            child: Some(child),
            lines,
            stderr,
            stderr_reader: Some(stderr_reader),
            addr: "0.0.0.0:0".parse().unwrap(),
        };
        let line = server.line_after("LISTENING ", 30);
        server.addr = line.trim().parse().expect("child address");
        server
    }

    /// The next line after `marker` on the child's stdout, within `secs`.
    fn line_after(&mut self, marker: &str, secs: u64) -> String {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                // libtest may print `test child_server ... ` before the child's own line.
                Ok(line) => {
                    if let Some(i) = line.find(marker) {
                        return line[i + marker.len()..].to_owned();
                    }
                }
                Err(_) => {
                    thread::sleep(Duration::from_millis(100));
                    panic!(
                        "no {marker:?} line from the child within {secs} s; stderr:\n{}",
                        self.stderr.lock().unwrap()
                    );
                }
            }
        }
    }

    /// Everything the child wrote to stderr (all of it once it has exited).
    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Sends SIGTERM, as a service manager stopping the unit would.
    fn terminate(&self) {
        let pid = self.child.as_ref().expect("a running child").id();
        // SAFETY: plain syscall; the pid is our own child's, not yet reaped.
        let rc = unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
        assert_eq!(rc, 0, "SIGTERM: {}", std::io::Error::last_os_error());
    }

    /// Waits for the child to exit; returns its status and the messages it received.
    fn wait_exit(&mut self, secs: u64) -> (ExitStatus, u64) {
        let received = self
            .line_after("RECEIVED ", secs)
            .trim()
            .parse()
            .expect("a count");
        let child = self.child.as_mut().expect("a running child");
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(status) = child.try_wait().expect("wait for the child") {
                self.child = None;
                if let Some(reader) = self.stderr_reader.take() {
                    let _ = reader.join();
                }
                return (status, received);
            }
            assert!(Instant::now() < deadline, "the child did not exit");
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        // A failing test must not leave a server running.
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Echoes, and counts every data message it receives.
struct Echo {
    received: Arc<AtomicU64>,
}

impl Handler for Echo {
    type State = ();

    fn on_upgrade(&self, _: &Request<'_>, _: &mut Upgrade<()>) -> Decision<()> {
        Decision::Accept(())
    }

    fn on_message(&self, ws: &mut Ws<'_, ()>, msg: Message<'_>) {
        self.received.fetch_add(1, Ordering::Relaxed);
        ws.send(msg);
    }
}

/// The child's body: serve on the address in `RINGSOCK_RESTART_CHILD` (joining another
/// process's listeners there) with two shards until SIGTERM, then print `RECEIVED <n>`.
fn child_main() {
    let Ok(addr) = std::env::var(CHILD_ENV) else {
        return;
    };
    // The runtime's warnings on stderr, where the tests read them.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_max_level(tracing::Level::WARN)
        .init();
    let received = Arc::new(AtomicU64::new(0));
    let handler = Echo {
        received: Arc::clone(&received),
    };
    let handle = Builder::new()
        .addr(addr.as_str())
        .shards(2)
        .pin_threads(false)
        .share_address(true)
        .build(handler)
        .start()
        .expect("start the child server");
    println!("LISTENING {}", handle.local_addr());
    let result = handle.run_until_signal();
    println!("RECEIVED {}", received.load(Ordering::Relaxed));
    result.expect("clean shutdown");
}
