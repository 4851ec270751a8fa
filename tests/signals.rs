//! Shutdown signals are per server: SIGTERM stops the server waiting in
//! `ServerHandle::run_until_signal` at that moment, and a server started later in the same
//! process serves normally (echoes, timers, `Remote` commands) until the next SIGTERM.
//!
//! Signal dispositions are process-wide, so this is its own test binary with one test.
//! The signal is sent only while SIGTERM has a handler, so it cannot kill the test process.

mod common;

use std::io;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, Receiver, TryRecvError};
use std::time::Duration;

use common::{builder, start, wait_for, RawClient};
use ringsock::server::{SendStatus, ServerHandle};

/// A running server, shut down when dropped (so a failing test stops its server too).
struct Running(ServerHandle);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.shutdown();
    }
}

/// Calls `run_until_signal` in a thread; the receiver gets its result when it returns.
fn run_until_signal(handle: &ServerHandle) -> Receiver<io::Result<()>> {
    let (tx, rx) = mpsc::channel();
    let handle = handle.clone();
    std::thread::spawn(move || {
        let _ = tx.send(handle.run_until_signal());
    });
    rx
}

/// Whether SIGTERM has a handler (not the default action, which ends the process).
fn sigterm_is_handled() -> bool {
    // SAFETY: only reads the current disposition into a zeroed struct on this frame.
    unsafe {
        let mut current: libc::sigaction = std::mem::zeroed();
        libc::sigaction(libc::SIGTERM, std::ptr::null(), &mut current) == 0
            && current.sa_sigaction != libc::SIG_DFL
    }
}

/// Sends SIGTERM to this process once a handler is installed.
fn sigterm() {
    wait_for(5, "a SIGTERM handler", sigterm_is_handled);
    // SAFETY: kill(2) on our own pid; the handler was checked to be installed.
    let sent = unsafe { libc::kill(libc::getpid(), libc::SIGTERM) };
    assert_eq!(sent, 0, "kill: {}", io::Error::last_os_error());
}

/// Sends a text message and checks that the next frame is its echo.
fn echo(client: &mut RawClient, text: &str) {
    client.send_frame(true, 1, text.as_bytes());
    let frame = client.read_frame();
    assert!(
        frame.opcode == 1 && frame.payload == text.as_bytes(),
        "expected the echo of {text:?}, got {}",
        match frame.close_code() {
            Some(code) => format!("close {code}: the server stopped serving"),
            None => format!("{frame:?}"),
        }
    );
}

#[test]
fn sigterm_stops_the_waiting_server_and_a_later_server_serves_until_the_next() {
    let (a, _) = start(builder());
    let a = Running(a);
    let a_done = run_until_signal(&a.0);
    sigterm();
    a_done
        .recv_timeout(Duration::from_secs(10))
        .expect("run_until_signal of the first server returns after SIGTERM")
        .expect("run_until_signal succeeds");
    assert!(a.0.is_stopped());

    let (b, probe) = start(builder());
    let b = Running(b);
    let b_done = run_until_signal(&b.0);
    let mut client = RawClient::connect(b.0.local_addr());
    echo(&mut client, "first");
    std::thread::sleep(Duration::from_millis(300));
    echo(&mut client, "after 300 ms");
    wait_for(5, "the open", || probe.opens.load(Ordering::SeqCst) == 1);
    let remote = probe.remotes.lock().unwrap()[0].clone();
    assert_eq!(
        remote.send_text("via remote"),
        SendStatus::Queued,
        "the second server runs"
    );
    assert_eq!(client.read_frame().payload, b"via remote");
    echo(&mut client, "after a remote command");
    assert!(
        matches!(b_done.try_recv(), Err(TryRecvError::Empty)),
        "run_until_signal of the second server returned before any signal to it"
    );

    sigterm();
    assert_eq!(client.read_close(), Some(1001), "SIGTERM closes with 1001");
    client.send_frame(true, 8, &1001u16.to_be_bytes());
    drop(client);
    b_done
        .recv_timeout(Duration::from_secs(10))
        .expect("run_until_signal of the second server returns after SIGTERM")
        .expect("run_until_signal succeeds");
    assert!(b.0.is_stopped());
}
