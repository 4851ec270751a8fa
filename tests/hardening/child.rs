//! A server in a child process, for what an in-process server cannot show: its own memory
//! (RSS of the server alone, not of the test's clients), its own descriptor limit, its own
//! stderr (the runtime's log lines), and system calls denied to it by seccomp.
//!
//! The child is the test binary itself, re-run with `--exact child_server --ignored` and the
//! server's settings in `RINGSOCK_HARDENING_CHILD`. Each test binary that uses this module
//! declares that `child_server` test (it returns at once without the variable). The child
//! prints `LISTENING <addr>` once it serves, answers `stats` on stdin with a `STATS` line, and
//! shuts down gracefully when its stdin closes.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ringsock::proto::handshake::Request;
use ringsock::proto::CloseCode;
use ringsock::server::{Builder, Decision, Handler, Message, SendStatus, Upgrade, Ws};

/// The environment variable carrying the child's settings.
pub const CHILD_ENV: &str = "RINGSOCK_HARDENING_CHILD";

/// A running child server.
pub struct ChildServer {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    stderr: Arc<Mutex<String>>,
    /// Where it listens.
    pub addr: SocketAddr,
}

/// Counters the child reports.
#[derive(Debug, Default, Clone, Copy)]
pub struct ChildStats {
    pub connections: usize,
    pub queued: usize,
    pub backpressure: usize,
    pub dropped: usize,
    pub messages: usize,
    /// Publications skipped for subscribers over the hard cap.
    pub publish_skipped: usize,
}

impl ChildServer {
    /// Starts a child server with `spec` (`key=value` pairs separated by commas; see
    /// [`child_main`]) and waits until it listens.
    ///
    /// # Panics
    /// When the child fails to start; the message carries its stderr.
    pub fn start(spec: &str) -> ChildServer {
        match ChildServer::try_start(spec) {
            Ok(child) => child,
            Err((why, stderr)) => panic!("child server did not start: {why}\nstderr:\n{stderr}"),
        }
    }

    /// Like [`ChildServer::start`], but returns the failure line and stderr instead.
    pub fn try_start(spec: &str) -> Result<ChildServer, (String, String)> {
        let exe = std::env::current_exe().expect("test binary path");
        let mut child = Command::new(exe)
            .args(["--exact", "child_server", "--ignored", "--nocapture"])
            .args(["--test-threads", "1"])
            .env(CHILD_ENV, spec)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn the child server");
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr_pipe = child.stderr.take().expect("piped stderr");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let sink = Arc::clone(&stderr);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr_pipe).lines().map_while(Result::ok) {
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        let stdin = child.stdin.take();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = match lines.recv_timeout(left) {
                Ok(line) => line,
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    std::thread::sleep(Duration::from_millis(100));
                    let err = stderr.lock().unwrap().clone();
                    return Err(("no LISTENING line".into(), err));
                }
            };
            // libtest may print `test child_server ... ` before the child's first line.
            if let Some(addr) = after(&line, "LISTENING ") {
                let addr = addr.trim().parse().expect("child address");
                return Ok(ChildServer {
                    child,
                    stdin,
                    lines,
                    stderr,
                    addr,
                });
            }
            if let Some(why) = after(&line, "FAILED ") {
                let _ = child.wait();
                std::thread::sleep(Duration::from_millis(100));
                let err = stderr.lock().unwrap().clone();
                return Err((why.to_owned(), err));
            }
        }
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident memory of the child, KiB.
    pub fn rss_kib(&self) -> u64 {
        proc_status_kib(self.pid(), "VmRSS:")
    }

    /// Peak resident memory of the child so far, KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        proc_status_kib(self.pid(), "VmHWM:")
    }

    /// Everything the child wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Asks the child for its counters.
    pub fn stats(&mut self) -> ChildStats {
        let stdin = self.stdin.as_mut().expect("child running");
        stdin.write_all(b"stats\n").expect("write to the child");
        stdin.flush().unwrap();
        loop {
            let line = self
                .lines
                .recv_timeout(Duration::from_secs(10))
                .expect("STATS line from the child");
            let Some(rest) = after(&line, "STATS ") else {
                continue;
            };
            let mut stats = ChildStats::default();
            for pair in rest.split_whitespace() {
                let (key, value) = pair.split_once('=').unwrap();
                let value: usize = value.parse().unwrap();
                match key {
                    "connections" => stats.connections = value,
                    "queued" => stats.queued = value,
                    "backpressure" => stats.backpressure = value,
                    "dropped" => stats.dropped = value,
                    "messages" => stats.messages = value,
                    "publish_skipped" => stats.publish_skipped = value,
                    _ => {}
                }
            }
            return stats;
        }
    }

    /// Polls the child's connection count until it is `n`, or panics after `secs`.
    pub fn wait_connections(&mut self, n: usize, secs: u64) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let now = self.stats().connections;
            if now == n {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "child server holds {now} connections, expected {n}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Shuts the child down gracefully (closes its stdin) and returns how it exited.
    pub fn stop(mut self) -> ExitStatus {
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for the child") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("child server did not stop within 20 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        // A panicking test must not leave the child running.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// What follows `marker` in `line`.
fn after<'a>(line: &'a str, marker: &str) -> Option<&'a str> {
    line.find(marker).map(|i| &line[i + marker.len()..])
}

/// A `kB` field of `/proc/<pid>/status` (0 if missing).
pub fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Counters of the child's handler.
#[derive(Default)]
struct Counters {
    queued: AtomicUsize,
    backpressure: AtomicUsize,
    dropped: AtomicUsize,
    messages: AtomicUsize,
}

/// The child's handler: echo, with text commands `sub:T` (subscribe, answers `subscribed`),
/// `pub:T:M` (publish text M to T) and `stream:N:SIZE` (send N binary messages of SIZE
/// bytes). Every send's status is counted.
struct ChildHandler {
    counters: Arc<Counters>,
}

impl ChildHandler {
    fn count(&self, status: SendStatus) {
        let counter = match status {
            SendStatus::Queued => &self.counters.queued,
            SendStatus::Backpressure => &self.counters.backpressure,
            // Not queued, whatever the reason (over the cap, or closing).
            SendStatus::Dropped | SendStatus::Closed | SendStatus::QueueFull => {
                &self.counters.dropped
            }
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

impl Handler for ChildHandler {
    type State = ();

    fn on_upgrade(&self, _: &Request<'_>, _: &mut Upgrade<()>) -> Decision<()> {
        Decision::Accept(())
    }

    fn on_message(&self, ws: &mut Ws<'_, ()>, msg: Message<'_>) {
        self.counters.messages.fetch_add(1, Ordering::Relaxed);
        if let Message::Text(text) = msg {
            if let Some(topic) = text.strip_prefix("sub:") {
                ws.subscribe(topic);
                let status = ws.send_text("subscribed");
                self.count(status);
                return;
            }
            if let Some(rest) = text.strip_prefix("pub:") {
                if let Some((topic, body)) = rest.split_once(':') {
                    ws.publish(topic, Message::Text(body));
                }
                return;
            }
            if let Some(rest) = text.strip_prefix("stream:") {
                let (n, size) = rest.split_once(':').unwrap_or(("0", "0"));
                let payload = vec![0x5a; size.parse().unwrap_or(0)];
                for _ in 0..n.parse::<usize>().unwrap_or(0) {
                    let status = ws.send_binary(&payload);
                    self.count(status);
                }
                return;
            }
        }
        let status = ws.send(msg);
        self.count(status);
    }

    fn on_close(&self, _: &mut Ws<'_, ()>, _: Option<CloseCode>, _: &str) {}
}

/// What the child is asked to deny itself through seccomp.
fn deny_rules(what: &str) -> Vec<SeccompRule> {
    let mut rules = Vec::new();
    for item in what.split('+') {
        match item {
            // io_uring_setup fails as if a container policy forbade it.
            "setup" => rules.push(SeccompRule {
                syscall: libc::SYS_io_uring_setup,
                arg1: None,
                errno: libc::EPERM,
            }),
            // IORING_REGISTER_BUFFERS (0): as if the locked-memory limit were exhausted.
            "register_buffers" => rules.push(SeccompRule {
                syscall: libc::SYS_io_uring_register,
                arg1: Some(0),
                errno: libc::ENOMEM,
            }),
            // IORING_REGISTER_PBUF_RING (22).
            "pbuf_ring" => rules.push(SeccompRule {
                syscall: libc::SYS_io_uring_register,
                arg1: Some(22),
                errno: libc::ENOMEM,
            }),
            "" => {}
            other => panic!("unknown deny rule {other}"),
        }
    }
    rules
}

/// The child's body: reads its settings, starts the server, serves until stdin closes.
///
/// Settings: `shards`, `hwm` (high-water mark), `max_buffered`, `max_frame`, `max_message`,
/// `handshake_ms`, `close_ms`, `nofile` (descriptor limit), `memlock` (locked-memory limit,
/// with `CAP_IPC_LOCK` dropped so it applies to root too), `deny` (`setup`,
/// `register_buffers`, `pbuf_ring`, joined by `+`), `sigpipe` (any value: the default
/// SIGPIPE action, which kills).
pub fn child_main() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    // The runtime's log lines (warnings and up) on stderr, where the tests read them.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_max_level(tracing::Level::WARN)
        .init();
    let mut builder = Builder::new()
        .addr("127.0.0.1:0")
        .shards(1)
        .pin_threads(false);
    for pair in spec.split(',').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').expect("key=value");
        let number = || value.parse::<usize>().expect("a number");
        builder = match key {
            "shards" => builder.shards(number()),
            "hwm" => builder.high_water_mark(number()),
            "max_buffered" => {
                let n = number();
                builder.configure(|c| c.buffers.max_buffered = n)
            }
            "max_frame" => builder.max_frame_size(number()),
            "max_message" => builder.max_message_size(number()),
            "handshake_ms" => builder.handshake_timeout(Duration::from_millis(number() as u64)),
            "close_ms" => builder.close_timeout(Duration::from_millis(number() as u64)),
            "nofile" => {
                let limit = number() as libc::rlim_t;
                let rl = libc::rlimit {
                    rlim_cur: limit,
                    rlim_max: limit,
                };
                // SAFETY: `rl` is a valid rlimit for the duration of the call.
                let rc = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &rl) };
                assert_eq!(rc, 0, "setrlimit NOFILE");
                builder
            }
            "sigpipe" => {
                // As an embedding in a C program has it: SIGPIPE kills (Rust's runtime
                // ignores it otherwise).
                // SAFETY: sets a signal disposition before any thread of the server exists.
                unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
                builder
            }
            "memlock" => {
                lower_memlock(number() as libc::rlim_t).expect("lower the locked-memory limit");
                builder
            }
            "deny" => {
                install_seccomp(&deny_rules(value)).expect("install seccomp filter");
                builder
            }
            other => panic!("unknown child setting {other}"),
        };
    }
    let counters = Arc::new(Counters::default());
    let handler = ChildHandler {
        counters: Arc::clone(&counters),
    };
    let handle = match builder.build(handler).start() {
        Ok(handle) => handle,
        Err(e) => {
            println!("FAILED {e}");
            return;
        }
    };
    println!("LISTENING {}", handle.local_addr());
    let stdin = std::io::stdin();
    for line in stdin.lock().lines().map_while(Result::ok) {
        if line.trim() == "stats" {
            println!(
                "STATS connections={} queued={} backpressure={} dropped={} messages={} \
                 publish_skipped={}",
                handle.stats().total_connections(),
                counters.queued.load(Ordering::Relaxed),
                counters.backpressure.load(Ordering::Relaxed),
                counters.dropped.load(Ordering::Relaxed),
                counters.messages.load(Ordering::Relaxed),
                handle.stats().publish_skipped,
            );
        }
    }
    handle.shutdown().expect("clean shutdown");
    println!("STOPPED");
}

/// One seccomp rule: `syscall` (with its second argument equal to `arg1`, if given) fails
/// with `errno`.
pub struct SeccompRule {
    pub syscall: libc::c_long,
    pub arg1: Option<u32>,
    pub errno: i32,
}

/// Installs a seccomp filter on the calling thread (threads it spawns later inherit it):
/// every rule's system call fails with its errno, everything else is allowed.
///
/// # Errors
/// When the kernel refuses the filter (no seccomp, or not permitted).
pub fn install_seccomp(rules: &[SeccompRule]) -> std::io::Result<()> {
    const LD_W_ABS: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
    const JEQ_K: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
    const RET_K: u16 = 0x06; // BPF_RET | BPF_K
    const RET_ALLOW: u32 = 0x7fff_0000;
    const RET_ERRNO: u32 = 0x0005_0000;
    #[cfg(target_arch = "x86_64")]
    const ARCH: u32 = 0xc000_003e;
    #[cfg(target_arch = "aarch64")]
    const ARCH: u32 = 0xc000_00b7;
    let op = |code, jt, jf, k| libc::sock_filter { code, jt, jf, k };
    // seccomp_data: nr at 0, arch at 4, args[i] at 16 + 8 i (low half first, little endian).
    let mut prog = vec![
        op(LD_W_ABS, 0, 0, 4),
        op(JEQ_K, 1, 0, ARCH),
        op(RET_K, 0, 0, RET_ALLOW),
    ];
    for rule in rules {
        let nr = rule.syscall as u32;
        let ret = op(RET_K, 0, 0, RET_ERRNO | (rule.errno as u32 & 0xffff));
        match rule.arg1 {
            None => {
                prog.push(op(LD_W_ABS, 0, 0, 0));
                prog.push(op(JEQ_K, 0, 1, nr));
                prog.push(ret);
            }
            Some(arg) => {
                prog.push(op(LD_W_ABS, 0, 0, 0));
                prog.push(op(JEQ_K, 0, 3, nr));
                prog.push(op(LD_W_ABS, 0, 0, 16 + 8));
                prog.push(op(JEQ_K, 0, 1, arg));
                prog.push(ret);
            }
        }
    }
    prog.push(op(RET_K, 0, 0, RET_ALLOW));
    let fprog = libc::sock_fprog {
        len: prog.len() as u16,
        filter: prog.as_mut_ptr(),
    };
    // SAFETY: plain prctl calls; `fprog` points at `prog`, alive for the call, and the kernel
    // copies the filter.
    unsafe {
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if libc::prctl(
            libc::PR_SET_SECCOMP,
            libc::SECCOMP_MODE_FILTER,
            &fprog as *const libc::sock_fprog,
        ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Sets RLIMIT_MEMLOCK to `bytes` and drops `CAP_IPC_LOCK` from the calling thread (threads
/// it spawns later inherit that), so io_uring accounts registered memory against the limit
/// even when running as root.
///
/// # Errors
/// When the kernel refuses either change.
pub fn lower_memlock(bytes: libc::rlim_t) -> std::io::Result<()> {
    const CAP_IPC_LOCK: u32 = 14;
    const VERSION_3: u32 = 0x2008_0522;
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let rl = libc::rlimit {
        rlim_cur: bytes,
        rlim_max: bytes,
    };
    let mut header = Header {
        version: VERSION_3,
        pid: 0,
    };
    let mut data = [Data::default(); 2];
    // SAFETY: `rl`, `header` and `data` are valid for the calls; capget/capset with version 3
    // read and write two `Data` entries.
    unsafe {
        if libc::setrlimit(libc::RLIMIT_MEMLOCK, &rl) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        data[0].effective &= !(1 << CAP_IPC_LOCK);
        if libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}
