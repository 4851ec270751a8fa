//! Running under systemd, played by the test: `READY=1` once the server accepts and
//! `STOPPING=1` when it stops, on a `NOTIFY_SOCKET` the test binds; `WATCHDOG=1` every half
//! `WATCHDOG_USEC` while every shard ticks, and none while one is stuck; socket activation,
//! serving an inherited socket and the connections already waiting in its queue.
//!
//! Each server runs in a child process (the environment and descriptor 3 are per process):
//! this test binary re-run as `--exact child_server --ignored` with its settings in
//! `RINGSOCK_SYSTEMD_CHILD`. The child prints `LISTENING <addr>` once it serves, serves until
//! SIGTERM or until its stdin closes, and exits 0 after a clean shutdown. Every child is killed
//! by its pid when its test ends, however it ends; tests bind 127.0.0.1 only.

#[path = "common/mod.rs"]
mod common;

use std::io::{self, BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use common::RawClient;
use ringsock::proto::handshake::Request;
use ringsock::server::{Builder, Decision, Handler, Message, Upgrade, Ws};

/// The environment variable carrying the child's settings.
const CHILD_ENV: &str = "RINGSOCK_SYSTEMD_CHILD";

/// Every variable systemd may have set for the test itself; children get only the ones a
/// test sets.
const SYSTEMD_VARS: [&str; 6] = [
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_PID",
    "LISTEN_FDS",
    "LISTEN_FDNAMES",
];

// ---------------------------------------------------------------------------------------------
// The child

/// The child-process server; a no-op unless a test spawned it.
#[test]
#[ignore = "helper process: run by the other tests in this file"]
fn child_server() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    // SIGTERM is ignored until `run_until_signal` installs its handler, so a test's early
    // SIGTERM is lost (the test sends it again) instead of killing the child.
    // SAFETY: SIG_IGN runs no handler code; no other thread of this process uses signals.
    unsafe { libc::signal(libc::SIGTERM, libc::SIG_IGN) };
    let mut builder = Builder::new()
        .addr("127.0.0.1:0")
        .shards(1)
        .pin_threads(false);
    for item in spec.split(',').filter(|s| !s.is_empty()) {
        builder = match item.split_once('=') {
            Some(("shards", n)) => builder.shards(n.parse().expect("a shard count")),
            None if item == "activated" => builder.systemd_socket(),
            _ => panic!("unknown child setting {item}"),
        };
    }
    let handle = match builder.build(Echo).start() {
        Ok(handle) => handle,
        Err(e) => {
            println!("FAILED {e}");
            return;
        }
    };
    println!("LISTENING {}", handle.local_addr());
    let remote = handle.clone();
    std::thread::spawn(move || {
        for _ in io::stdin().lock().lines().map_while(Result::ok) {}
        remote.request_shutdown();
    });
    handle.run_until_signal().expect("clean shutdown");
    println!("STOPPED");
}

/// Echoes; the text `sleep` blocks the shard for two seconds first (a stuck handler).
struct Echo;

impl Handler for Echo {
    type State = ();

    fn on_upgrade(&self, _: &Request<'_>, _: &mut Upgrade<()>) -> Decision<()> {
        Decision::Accept(())
    }

    fn on_message(&self, ws: &mut Ws<'_, ()>, msg: Message<'_>) {
        if let Message::Text("sleep") = msg {
            println!("SLEEPING");
            std::thread::sleep(Duration::from_secs(2));
        }
        ws.send(msg);
    }
}

// ---------------------------------------------------------------------------------------------
// The test's side

/// A running child; killed by its pid when dropped, so a failing test leaves none behind.
struct ChildServer {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
}

impl ChildServer {
    /// Starts `command` (the child with its settings) and collects its stdout lines.
    fn spawn(mut command: Command) -> ChildServer {
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn the child server");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stdin = child.stdin.take();
        ChildServer {
            child,
            stdin,
            lines,
        }
    }

    /// Waits for a stdout line containing `marker` and returns what follows it.
    fn line_after(&self, marker: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no {marker:?} line from the child"));
            // libtest may print `test child_server ... ` before the child's line.
            if let Some(i) = line.find(marker) {
                return line[i + marker.len()..].trim().to_owned();
            }
            assert!(!line.contains("FAILED "), "child failed: {line}");
        }
    }

    /// The address from the `LISTENING` line.
    fn addr(&self) -> SocketAddr {
        self.line_after("LISTENING ")
            .parse()
            .expect("child address")
    }

    fn pid(&self) -> libc::pid_t {
        libc::pid_t::try_from(self.child.id()).expect("a pid")
    }

    /// Sends SIGTERM to the child by its pid.
    fn terminate(&self) {
        // SAFETY: kill(2) on the pid of our own child, which has not been reaped yet (so the
        // pid cannot have been reused).
        unsafe { libc::kill(self.pid(), libc::SIGTERM) };
    }

    /// Closes the child's stdin: it shuts down gracefully.
    fn close_stdin(&mut self) {
        drop(self.stdin.take());
    }

    /// Waits up to 20 s for the child to exit.
    fn exit_status(&mut self) -> ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for the child") {
                return status;
            }
            assert!(Instant::now() < deadline, "child did not exit within 20 s");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The child server with `spec`, the systemd variables of the test's own environment
/// removed.
fn child_command(spec: &str) -> Command {
    let mut command = Command::new(std::env::current_exe().expect("test binary path"));
    child_args(&mut command, spec);
    command
}

fn child_args(command: &mut Command, spec: &str) {
    command
        .args(["--exact", "child_server", "--ignored", "--nocapture"])
        .args(["--test-threads", "1"])
        .env(CHILD_ENV, spec);
    for var in SYSTEMD_VARS {
        command.env_remove(var);
    }
}

/// The service manager's end of `NOTIFY_SOCKET`: a datagram socket in a fresh directory,
/// removed when dropped.
struct Manager {
    dir: PathBuf,
    path: PathBuf,
    socket: UnixDatagram,
}

impl Manager {
    fn new() -> Manager {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("ringsock-sd-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("notify");
        let socket = UnixDatagram::bind(&path).expect("bind the notify socket");
        Manager { dir, path, socket }
    }

    /// The next notification within `within`.
    fn next(&self, within: Duration) -> Option<String> {
        let deadline = Instant::now() + within;
        let left = deadline.saturating_duration_since(Instant::now());
        self.socket
            .set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        let mut buf = [0u8; 4096];
        match self.socket.recv(&mut buf) {
            Ok(n) => Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                None
            }
            Err(e) => panic!("recv on the notify socket: {e}"),
        }
    }

    /// Every notification over the next `period`.
    fn collect(&self, period: Duration) -> Vec<String> {
        let end = Instant::now() + period;
        let mut got = Vec::new();
        while let Some(left) = end.checked_duration_since(Instant::now()) {
            match self.next(left) {
                Some(state) => got.push(state),
                None => break,
            }
        }
        got
    }

    /// Waits for `state`, skipping `WATCHDOG=1`; panics on anything else or after `within`.
    fn expect(&self, state: &str, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next(left) {
                Some(got) if got == state => return,
                Some(got) if got == "WATCHDOG=1" => {}
                Some(got) => panic!("expected {state}, got {got}"),
                None => panic!("no {state} within {within:?}"),
            }
        }
    }
}

impl Drop for Manager {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One echo round trip on a client that completed the handshake.
fn echo(c: &mut RawClient, text: &str) {
    c.send_frame(true, 1, text.as_bytes());
    let frame = c.read_frame();
    assert_eq!(
        (frame.opcode, frame.payload.as_slice()),
        (1, text.as_bytes())
    );
}

fn upgrade_request() -> &'static [u8] {
    b"GET / HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
      Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
}

/// Starts a child with `NOTIFY_SOCKET` pointing at a fresh manager and `extra` variables.
fn notified_child(spec: &str, extra: &[(&str, &str)]) -> (Manager, ChildServer) {
    let manager = Manager::new();
    let mut command = child_command(spec);
    command.env("NOTIFY_SOCKET", &manager.path);
    command.envs(extra.iter().copied());
    (manager, ChildServer::spawn(command))
}

// ---------------------------------------------------------------------------------------------
// sd_notify

#[test]
fn ready_comes_once_the_server_accepts_and_stopping_when_sigterm_stops_it() {
    let (manager, mut child) = notified_child("shards=2", &[]);
    manager.expect("READY=1", Duration::from_secs(30));
    let addr = child.addr();
    let mut c = RawClient::connect(addr);
    echo(&mut c, "after ready");
    // The first SIGTERM may come before the child waits for it (it then ignores it).
    let mut stopping = false;
    for _ in 0..10 {
        child.terminate();
        match manager.next(Duration::from_secs(2)) {
            Some(state) if state == "STOPPING=1" => {
                stopping = true;
                break;
            }
            Some(state) => panic!("expected STOPPING=1, got {state}"),
            None => {}
        }
    }
    assert!(stopping, "no STOPPING=1 after SIGTERM");
    assert_eq!(
        c.read_close(),
        Some(1001),
        "the client is told the server goes away"
    );
    assert!(child.exit_status().success());
    assert_eq!(
        manager.collect(Duration::from_millis(100)),
        Vec::<String>::new()
    );
}

#[test]
fn stopping_is_sent_once_when_a_shutdown_is_requested() {
    let (manager, mut child) = notified_child("", &[]);
    manager.expect("READY=1", Duration::from_secs(30));
    let addr = child.addr();
    echo(&mut RawClient::connect(addr), "hello");
    child.close_stdin();
    manager.expect("STOPPING=1", Duration::from_secs(10));
    assert!(child.exit_status().success());
    assert_eq!(
        manager.collect(Duration::from_millis(100)),
        Vec::<String>::new()
    );
}

// ---------------------------------------------------------------------------------------------
// Watchdog

#[test]
fn watchdog_pings_arrive_every_half_interval() {
    let (manager, mut child) = notified_child("shards=2", &[("WATCHDOG_USEC", "200000")]);
    manager.expect("READY=1", Duration::from_secs(30));
    let got = manager.collect(Duration::from_secs(1));
    let pings = got.iter().filter(|s| *s == "WATCHDOG=1").count();
    assert_eq!(pings, got.len(), "only pings: {got:?}");
    // One per 100 ms; a loaded machine may skip some.
    assert!(pings >= 4, "{pings} pings in a second");
    child.close_stdin();
    manager.expect("STOPPING=1", Duration::from_secs(10));
    assert!(child.exit_status().success());
}

#[test]
fn watchdog_for_another_pid_is_not_ours() {
    let (manager, mut child) =
        notified_child("", &[("WATCHDOG_USEC", "200000"), ("WATCHDOG_PID", "1")]);
    manager.expect("READY=1", Duration::from_secs(30));
    assert_eq!(
        manager.collect(Duration::from_millis(600)),
        Vec::<String>::new()
    );
    child.close_stdin();
    assert!(child.exit_status().success());
}

#[test]
fn a_stuck_shard_stops_the_watchdog_until_it_recovers() {
    let (manager, mut child) = notified_child("shards=1", &[("WATCHDOG_USEC", "200000")]);
    manager.expect("READY=1", Duration::from_secs(30));
    let addr = child.addr();
    manager.expect("WATCHDOG=1", Duration::from_secs(2));
    let mut c = RawClient::connect(addr);
    c.send_frame(true, 1, b"sleep");
    child.line_after("SLEEPING");
    let asleep = Instant::now();
    // A look just after the handler fell asleep may still see the tick before it.
    manager.collect(Duration::from_millis(300));
    let during = manager.collect(Duration::from_millis(1300));
    assert!(
        asleep.elapsed() < Duration::from_millis(1900),
        "the test itself was too slow to tell"
    );
    assert_eq!(
        during,
        Vec::<String>::new(),
        "no ping while the shard is stuck"
    );
    let frame = c.read_frame();
    assert_eq!(frame.payload, b"sleep", "the echo after the sleep");
    manager.expect("WATCHDOG=1", Duration::from_secs(1));
    child.close_stdin();
    assert!(child.exit_status().success());
}

// ---------------------------------------------------------------------------------------------
// Socket activation

/// The child with `socket` as descriptor 3, `LISTEN_FDS=1` and `LISTEN_PID` set to its own
/// pid: started through `sh`, which exports its pid and then execs the child in place.
fn activated_child(socket: RawFd, spec: &str, listen_pid: Option<&str>) -> ChildServer {
    let exe = std::env::current_exe().expect("test binary path");
    let mut command = match listen_pid {
        None => {
            let mut c = Command::new("sh");
            c.arg("-c")
                .arg(r#"export LISTEN_PID=$$; exec "$0" "$@""#)
                .arg(exe);
            c
        }
        Some(_) => Command::new(exe),
    };
    child_args(&mut command, spec);
    if let Some(pid) = listen_pid {
        command.env("LISTEN_PID", pid);
    }
    command.env("LISTEN_FDS", "1").env("LISTEN_FDNAMES", "web");
    // SAFETY: the closure runs in the forked child before exec, where only async-signal-safe
    // calls are allowed: it makes fcntl(2) and dup2(2) calls on integers and reads errno,
    // and allocates nothing.
    unsafe {
        command.pre_exec(move || {
            if socket == 3 {
                // Already in place; only its close-on-exec flag must go.
                let flags = libc::fcntl(3, libc::F_GETFD);
                if flags < 0 || libc::fcntl(3, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                    return Err(io::Error::last_os_error());
                }
            } else if libc::dup2(socket, 3) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        })
    };
    ChildServer::spawn(command)
}

#[test]
fn socket_activation_serves_the_inherited_socket_and_the_connections_waiting_in_it() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    // Connected and asking to upgrade before any server runs: they wait in the queue.
    let mut early: Vec<RawClient> = (0..20)
        .map(|_| {
            let mut c = RawClient::connect_tcp(addr);
            c.send(upgrade_request());
            c
        })
        .collect();
    let mut child = activated_child(listener.as_raw_fd(), "shards=2,activated", None);
    assert_eq!(child.addr(), addr, "local_addr is the inherited socket's");
    for (i, c) in early.iter_mut().enumerate() {
        let head = c.read_head();
        assert!(head.starts_with("HTTP/1.1 101"), "early client {i}: {head}");
        echo(c, &format!("early {i}"));
    }
    let mut late = RawClient::connect(addr);
    echo(&mut late, "late");
    drop((early, late));
    child.close_stdin();
    assert!(child.exit_status().success());
    // The socket was closed, not shut down: it still listens for whoever holds it next.
    let _next = TcpStream::connect(addr).expect("the inherited socket still listens");
    listener.set_nonblocking(false).unwrap();
    let (_, peer) = listener
        .accept()
        .expect("the connection waits in its queue");
    assert!(peer.ip().is_loopback());
}

#[test]
fn listen_pid_of_another_process_passes_no_socket() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut child = activated_child(listener.as_raw_fd(), "activated", Some("1"));
    let why = child.line_after("FAILED ");
    assert!(why.contains("no socket passed by systemd"), "{why}");
    assert!(child.exit_status().success());
}

#[test]
fn a_given_listener_is_shared_by_every_shard() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let handle = Builder::new()
        .shards(2)
        .pin_threads(false)
        .listener(OwnedFd::from(listener))
        .build(Echo)
        .start()
        .expect("serves the given socket");
    assert_eq!(handle.local_addr(), addr);
    let mut clients: Vec<RawClient> = (0..8).map(|_| RawClient::connect(addr)).collect();
    for (i, c) in clients.iter_mut().enumerate() {
        echo(c, &format!("client {i}"));
    }
    drop(clients);
    handle.shutdown().expect("clean shutdown");
}

#[test]
fn a_socket_that_does_not_listen_is_refused_by_name() {
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let err = Builder::new()
        .shards(1)
        .listener(OwnedFd::from(udp))
        .build(Echo)
        .start()
        .unwrap_err();
    assert!(
        err.to_string().contains("not a listening TCP socket"),
        "{err}"
    );
}
