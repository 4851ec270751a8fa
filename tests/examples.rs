//! The examples as programs: the command line every example shares (usage, exit statuses),
//! and `echo` serving `/healthz` and `/metrics` on a port it picked, then stopping on SIGTERM.
//!
//! These run the binaries `cargo test` builds beside the test binaries
//! (`target/<profile>/examples/`); a test run that builds no examples (`--test examples`
//! alone) fails with a message saying how to build them.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

/// The flags of `examples/common`, in every example's usage.
const SHARED_FLAGS: [&str; 8] = [
    "--addr",
    "RINGSOCK_ADDR",
    "--shards",
    "RINGSOCK_SHARDS",
    "--no-buffer-ring",
    "--systemd-socket",
    "--share-address",
    "--metrics-path",
];

/// The path of example `name`, built by cargo beside this test's binary.
fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    // target/<profile>/deps/examples-HASH → target/<profile>/examples/NAME
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("the test binary sits in target/<profile>/deps");
    let path = profile_dir.join("examples").join(name);
    assert!(
        path.is_file(),
        "{} is missing: build the examples first (`cargo test` does, as does \
         `cargo build --examples` with the same features and profile)",
        path.display()
    );
    path
}

/// `example` as a command with a clean environment for the shared flags.
fn command(name: &str) -> Command {
    let mut cmd = Command::new(example(name));
    for var in [
        "RINGSOCK_ADDR",
        "RINGSOCK_SHARDS",
        "LISTEN_PID",
        "LISTEN_FDS",
        "NOTIFY_SOCKET",
    ] {
        cmd.env_remove(var);
    }
    cmd.stdin(Stdio::null());
    cmd
}

/// Runs `name` with `args` to completion (these runs exit on their own).
fn run(name: &str, args: &[&str]) -> Output {
    command(name)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {name}: {e}"))
}

fn text(bytes: &[u8]) -> &str {
    std::str::from_utf8(bytes).expect("UTF-8 output")
}

/// A running example, killed (SIGKILL) and reaped when dropped unless it has exited, so a
/// failing test leaves no process behind.
struct Running {
    child: Child,
}

impl Running {
    /// SIGTERM to this process by its pid.
    fn terminate(&self) {
        let pid = libc::pid_t::try_from(self.child.id()).expect("a pid fits pid_t");
        // SAFETY: kill(2) only sends a signal; the pid is our own child's, not reaped yet
        // (only `wait_exit` and drop reap it), so it names no other process.
        let sent = unsafe { libc::kill(pid, libc::SIGTERM) };
        assert_eq!(sent, 0, "kill: {}", std::io::Error::last_os_error());
    }

    /// Waits up to `limit` for the process to exit.
    fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(start.elapsed() < limit, "still running after {limit:?}");
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Reads one HTTP/1.1 response with a `Content-Length` body: the status and the body.
fn read_response(reader: &mut BufReader<TcpStream>) -> (u16, String) {
    let mut status_line = String::new();
    reader.read_line(&mut status_line).expect("status line");
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let mut length = None;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).expect("header line");
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        let (name, value) = line.split_once(':').expect("a header line");
        if name.eq_ignore_ascii_case("content-length") {
            length = Some(value.trim().parse::<usize>().expect("a length"));
        }
        assert!(
            !(name.eq_ignore_ascii_case("connection") && value.trim() == "close"),
            "the server closes a keep-alive connection"
        );
    }
    let mut body = vec![0; length.expect("Content-Length")];
    reader.read_exact(&mut body).expect("body");
    (status, String::from_utf8(body).expect("UTF-8 body"))
}

#[test]
fn help_lists_the_shared_flags_and_exits_zero() {
    let out = run("echo", &["--help"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let usage = text(&out.stdout);
    assert!(usage.contains("Usage: echo"), "{usage}");
    for flag in SHARED_FLAGS {
        assert!(usage.contains(flag), "echo --help lacks {flag}:\n{usage}");
    }
}

#[test]
fn unknown_flag_prints_usage_and_exits_two() {
    let out = run("echo", &["--bogus"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = text(&out.stderr);
    assert!(stderr.contains("--bogus"), "{stderr}");
    assert!(stderr.contains("Usage: echo"), "{stderr}");
    assert!(out.stdout.is_empty(), "{out:?}");
}

#[test]
fn every_example_takes_the_shared_flags() {
    for name in ["chat", "fanout"] {
        let out = run(name, &["--help"]);
        assert_eq!(out.status.code(), Some(0), "{name}: {out:?}");
        let usage = text(&out.stdout);
        for flag in SHARED_FLAGS.iter().chain(&["--redis", "--nats"]) {
            assert!(usage.contains(flag), "{name} --help lacks {flag}:\n{usage}");
        }
    }
}

#[test]
fn two_brokers_are_a_usage_error() {
    let out = run("fanout", &["--redis", "redis://a", "--nats", "nats://b"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(text(&out.stderr).contains("Usage: fanout"), "{out:?}");
}

#[test]
fn systemd_socket_without_one_exits_one_saying_why() {
    let out = run("echo", &["--systemd-socket"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = text(&out.stderr);
    assert!(stderr.contains("no socket passed by systemd"), "{stderr}");
}

#[test]
fn echo_serves_health_and_metrics_then_stops_on_sigterm() {
    let child = command("echo")
        .args(["--addr", "127.0.0.1:0"])
        .env("RINGSOCK_SHARDS", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start echo");
    let mut echo = Running { child };

    // The first stdout line names the port it picked: `echo: listening on ws://ADDR with ...`.
    let stdout = echo.child.stdout.take().expect("piped stdout");
    let (line_tx, line_rx) = mpsc::channel();
    thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = line_tx.send(line);
    });
    let line = line_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("echo printed no line within 10 s");
    let addr = line
        .strip_prefix("echo: listening on ws://")
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"));
    assert!(
        line.contains(" with 1 shards"),
        "RINGSOCK_SHARDS ignored: {line:?}"
    );

    // Both requests on one kept-alive connection.
    let stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    let mut writer = stream.try_clone().expect("clone");
    let mut reader = BufReader::new(stream);
    writer
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
        .expect("send");
    let (status, body) = read_response(&mut reader);
    assert_eq!((status, body.trim()), (200, "ok"));
    writer
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n")
        .expect("send on the same connection");
    let (status, body) = read_response(&mut reader);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("ringsock_accepted_total"), "{body}");
    drop((reader, writer));

    echo.terminate();
    let status = echo.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "{status}");
}
